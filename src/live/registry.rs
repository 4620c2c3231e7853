//! Live client connections, for SHOW CLIENTS / POOLS / SERVERS, `/metrics`,
//! KILL_CLIENT and PAUSE.
//!
//! Each client task holds an `Arc<ClientInfo>` and updates it with atomics
//! (and one tiny std mutex for the linked backend) at its few state changes;
//! the console only reads. Nothing here is held across an `.await`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use dashmap::DashMap;

use super::pause::Pause;
use super::stats::Stats;
use crate::net::{AddrTable, ServerAddr};
use crate::pool::{Backend, Pool};

/// What SHOW CLIENTS reports for a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ClientState {
    /// Connected, not logged in yet (not listed).
    Login = 0,
    /// Logged in, no backend, not asking for one.
    Idle = 1,
    /// Held at the PAUSE gate before checkout.
    Paused = 2,
    /// Past the PAUSE gate, waiting for (or opening) a backend.
    Waiting = 3,
    /// Holding a backend.
    Active = 4,
    /// An admin console session.
    Admin = 5,
}

impl ClientState {
    fn from_u8(v: u8) -> ClientState {
        match v {
            1 => ClientState::Idle,
            2 => ClientState::Paused,
            3 => ClientState::Waiting,
            4 => ClientState::Active,
            5 => ClientState::Admin,
            _ => ClientState::Login,
        }
    }

    /// PgBouncer's vocabulary: a paused client is waiting too.
    pub fn as_str(self) -> &'static str {
        match self {
            ClientState::Login => "login",
            ClientState::Idle => "idle",
            ClientState::Paused | ClientState::Waiting => "waiting",
            ClientState::Active | ClientState::Admin => "active",
        }
    }
}

/// Who the client logged in as; set once, after authentication.
///
/// The names (and the TLS description) share one allocation: every idle
/// client carries this, and three strings cost three allocations and 72
/// bytes inline where one costs 16 (see docs/benchmarks.md, idle memory).
#[derive(Debug)]
pub struct LoginInfo {
    /// user, database, application_name and the TLS description, back to back.
    names: Box<str>,
    /// Where user, database and application_name end in `names`.
    ends: [u32; 3],
    /// `None` for admin console sessions.
    pub pool: Option<Arc<Pool>>,
}

impl LoginInfo {
    fn new(user: &str, database: &str, application_name: &str, tls: &str, pool: Option<Arc<Pool>>) -> LoginInfo {
        let names: Box<str> = [user, database, application_name, tls].concat().into();
        let end = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let ends = [
            end(user.len()),
            end(user.len() + database.len()),
            end(user.len() + database.len() + application_name.len()),
        ];
        LoginInfo { names, ends, pool }
    }

    fn part(&self, i: usize) -> &str {
        let from = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        let to = self.ends.get(i).map_or(self.names.len(), |&e| e as usize);
        self.names.get(from..to).unwrap_or_default()
    }

    pub fn user(&self) -> &str {
        self.part(0)
    }

    pub fn database(&self) -> &str {
        self.part(1)
    }

    pub fn application_name(&self) -> &str {
        self.part(2)
    }

    /// The TLS protocol and cipher suite; empty for plaintext clients.
    pub fn tls(&self) -> &str {
        self.part(3)
    }
}

/// The backend a client holds, for SHOW SERVERS and SHOW CLIENTS' `link`.
#[derive(Debug, Clone)]
pub struct LinkInfo {
    pub pid: i32,
    /// The backend's cancel secret: a CancelRequest for this client goes there.
    pub secret: i32,
    /// The backend's [`ServerAddr::id`]: 2 bytes where the address takes 32.
    addr: u16,
    /// When the backend was opened, as microseconds since [`base`].
    connected_us: u64,
    /// Which pool the backend came from (the primary's or a replica's), as
    /// [`pool_id`]: an identity to match pools by, never dereferenced.
    pub pool: usize,
}

/// A pool's identity for [`LinkInfo::pool`]. An address rather than an
/// `Arc` so that linking costs no reference count traffic on the pool.
pub fn pool_id(pool: &Arc<Pool>) -> usize {
    Arc::as_ptr(pool) as usize
}

#[derive(Debug)]
pub struct ClientInfo {
    pub id: u64,
    peer: Peer,
    /// The address the client connected to, as its id in [`LOCALS`]
    /// (0: none): a listener has one or a few, and 30 bytes less per
    /// client keeps `ClientInfo` in a smaller allocation.
    local: u16,
    /// Microseconds since [`base`] of the connection's arrival.
    connect_us: u64,
    login: OnceLock<LoginInfo>,
    state: AtomicU8,
    /// Microseconds since [`base`] of the last state change (request_time, wait start).
    since_us: AtomicU64,
    link: Mutex<Option<LinkInfo>>,
    /// KILL_CLIENT and shutdown, as seen by this client's task.
    signal: Signal,
}

impl LinkInfo {
    /// Where the backend is (`None` only past 65,535 distinct server addresses).
    pub fn addr(&self) -> Option<ServerAddr> {
        ServerAddr::by_id(self.addr)
    }

    /// When the backend was opened.
    pub fn connected(&self) -> Instant {
        base() + Duration::from_micros(self.connected_us)
    }
}

/// Every local address clients connected to ([`ClientInfo::local`]).
static LOCALS: AddrTable<SocketAddr> = AddrTable::new();

/// A client's address in 20 bytes where `Option<SocketAddr>` takes 32, which
/// keeps [`ClientInfo`] in a smaller allocation. IPv4 is kept IPv4-mapped;
/// an IPv6 flow label and scope id are not kept (only display would show them).
#[derive(Clone, Copy, Debug)]
struct Peer {
    ip: [u8; 16],
    port: u16,
    /// 0: none (a Unix socket), 4 or 6.
    family: u8,
}

impl Peer {
    fn new(addr: Option<SocketAddr>) -> Peer {
        match addr {
            None => Peer { ip: [0; 16], port: 0, family: 0 },
            Some(SocketAddr::V4(a)) => Peer { ip: a.ip().to_ipv6_mapped().octets(), port: a.port(), family: 4 },
            Some(SocketAddr::V6(a)) => Peer { ip: a.ip().octets(), port: a.port(), family: 6 },
        }
    }

    fn get(self) -> Option<SocketAddr> {
        let ip = std::net::Ipv6Addr::from(self.ip);
        match self.family {
            4 => Some(SocketAddr::new(ip.to_ipv4_mapped()?.into(), self.port)),
            6 => Some(SocketAddr::new(ip.into(), self.port)),
            _ => None,
        }
    }
}

/// A process-wide monotonic origin, so a timestamp fits in an atomic.
fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

fn now_us() -> u64 {
    micros_since_base(Instant::now())
}

fn micros_since_base(at: Instant) -> u64 {
    at.saturating_duration_since(base()).as_micros() as u64
}

/// Wall-clock time of a monotonic instant (for display only).
pub fn wall_time(at: Instant) -> SystemTime {
    SystemTime::now() - at.elapsed()
}

/// Why the PAUSE gate let a client go without a turn.
pub const TERMINATED_BY_ADMIN: &str = "terminated by admin (KILL_CLIENT)";
pub const SHUTTING_DOWN: &str = "pgmux is shutting down";

impl ClientInfo {
    fn new(id: u64, peer: Option<SocketAddr>, local: Option<SocketAddr>) -> ClientInfo {
        ClientInfo {
            id,
            peer: Peer::new(peer),
            local: local.map_or(0, |a| LOCALS.intern(&a)),
            connect_us: now_us(),
            login: OnceLock::new(),
            state: AtomicU8::new(ClientState::Login as u8),
            since_us: AtomicU64::new(now_us()),
            link: Mutex::new(None),
            signal: Signal::default(),
        }
    }

    /// The address the client connected to (`None` over a Unix socket).
    pub fn local(&self) -> Option<SocketAddr> {
        LOCALS.get(self.local)
    }

    /// The client's address (`None` over a Unix socket).
    pub fn peer(&self) -> Option<SocketAddr> {
        self.peer.get()
    }

    /// When the client connected (wall clock, for display).
    pub fn connect_time(&self) -> SystemTime {
        wall_time(base() + Duration::from_micros(self.connect_us))
    }

    pub fn login(&self) -> Option<&LoginInfo> {
        self.login.get()
    }

    pub fn state(&self) -> ClientState {
        ClientState::from_u8(self.state.load(Ordering::SeqCst))
    }

    /// When the current state began.
    pub fn since(&self) -> Instant {
        base() + Duration::from_micros(self.since_us.load(Ordering::Relaxed))
    }

    pub fn link(&self) -> Option<LinkInfo> {
        self.link.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// KILL_CLIENT named this client (SHOW CLIENTS' `close_needed`).
    pub fn close_needed(&self) -> bool {
        self.signal.raised(Signal::KILL) != 0
    }

    fn set_state(&self, s: ClientState) {
        self.set_state_at(s, now_us());
    }

    fn set_state_at(&self, s: ClientState, at_us: u64) {
        self.since_us.store(at_us, Ordering::Relaxed);
        // SeqCst: PAUSE reads these states after publishing its flag (see `wait_turn`).
        self.state.store(s as u8, Ordering::SeqCst);
    }

    /// Empty for plaintext clients (and until login).
    pub fn tls(&self) -> &str {
        self.login().map_or("", LoginInfo::tls)
    }

    /// After authentication: a pooled client (with its pool) or an admin
    /// session; `tls` is the connection's TLS description ("" for plaintext).
    pub fn logged_in(&self, user: &str, database: &str, application_name: &str, tls: &str, pool: Option<Arc<Pool>>) {
        let admin = pool.is_none();
        let _ = self.login.set(LoginInfo::new(user, database, application_name, tls, pool));
        self.set_state(if admin { ClientState::Admin } else { ClientState::Idle });
    }

    /// The PAUSE gate, just before checkout, for a request that arrived
    /// `at`. Returns when the client may take a backend (`at`, or the time
    /// the pause ended), or why it must close instead.
    ///
    /// Ordering: the client publishes `Waiting` and then reads the pause flag;
    /// PAUSE publishes its flag and then reads client states (both with a
    /// SeqCst fence between). So either PAUSE sees this client as in flight
    /// and waits for it, or the client sees the pause and stops here.
    pub async fn wait_turn(&self, pause: &Pause, database: &str, mut at: Instant) -> Result<Instant, &'static str> {
        loop {
            self.set_state_at(ClientState::Waiting, micros_since_base(at));
            std::sync::atomic::fence(Ordering::SeqCst);
            if !pause.is_paused(database) {
                return Ok(at);
            }
            self.set_state(ClientState::Paused);
            // Boxed: a rare wait whose futures would otherwise enlarge every
            // client's task, idle ones included.
            let paused = Box::pin(async {
                tokio::select! {
                    _ = pause.wait_resumed(database) => None,
                    flags = self.signal.wait(Signal::ANY) => Some(Signal::reason(flags)),
                }
            });
            if let Some(why) = paused.await {
                return Err(why);
            }
            at = Instant::now();
        }
    }

    /// The client got `backend` from `pool` at `at`. From here a
    /// CancelRequest with the client's key goes to this backend.
    pub fn linked(&self, backend: &Backend, pool: &Arc<Pool>, at: Instant) {
        use crate::pool::inner::Aged;
        *self.link.lock().unwrap_or_else(|e| e.into_inner()) = Some(LinkInfo {
            pid: backend.pid,
            secret: backend.secret,
            addr: backend.addr_id,
            connected_us: micros_since_base(backend.created()),
            pool: pool_id(pool),
        });
        self.set_state_at(ClientState::Active, micros_since_base(at));
    }

    /// The client gave its backend up at `at` (checked in, discarded or
    /// handed to cleanup), or its checkout from `pool` failed; counts the
    /// time a backend was held toward `pool`'s SHOW STATS and `/metrics`.
    pub fn released(&self, pool: &Pool, at: Instant) {
        let now = micros_since_base(at);
        if self.state() == ClientState::Active {
            let held = now.saturating_sub(self.since_us.load(Ordering::Relaxed));
            pool.record_xact_time(Duration::from_micros(held));
        }
        *self.link.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.set_state_at(ClientState::Idle, now);
    }

    /// What the client task watches for KILL_CLIENT and shutdown.
    pub fn signal(&self) -> &Signal {
        &self.signal
    }

    /// KILL_CLIENT: the client closes with 57P01 at once; a transaction it
    /// is in is cancelled and rolled back in the background.
    pub fn kill(&self) {
        self.signal.raise(Signal::KILL);
    }
}

/// Events for one client task: flags and a single waker slot (one task
/// polls it). Watching costs a couple of atomics per poll, where a
/// `Notify`/`watch` future takes a lock to register and again to drop, on
/// every transaction; and it adds no future state to an idle client.
#[derive(Debug, Default)]
pub struct Signal {
    flags: AtomicU8,
    waker: atomic_waker::AtomicWaker,
}

impl Signal {
    /// KILL_CLIENT for this client.
    pub const KILL: u8 = 1;
    /// Shutdown began: idle clients leave now, busy ones at their boundary.
    pub const DRAIN: u8 = 2;
    /// Shutdown's grace period is over: leave now, even mid-transaction.
    pub const FORCE_CLOSE: u8 = 4;
    /// Every event: what a client waiting idle watches for.
    pub const ANY: u8 = Self::KILL | Self::DRAIN | Self::FORCE_CLOSE;

    /// The FATAL message for a client closed by `flags`.
    pub fn reason(flags: u8) -> &'static str {
        if flags & Self::KILL != 0 { TERMINATED_BY_ADMIN } else { SHUTTING_DOWN }
    }

    /// Resolves with the raised flags among `mask`.
    pub async fn wait(&self, mask: u8) -> u8 {
        std::future::poll_fn(|cx| self.poll(cx, mask)).await
    }

    pub fn raise(&self, flag: u8) {
        self.flags.fetch_or(flag, Ordering::SeqCst);
        self.waker.wake();
    }

    /// The raised flags among `mask` (0 if none).
    pub fn raised(&self, mask: u8) -> u8 {
        self.flags.load(Ordering::SeqCst) & mask
    }

    /// Ready with the raised flags among `mask`; otherwise registers `cx`.
    pub fn poll(&self, cx: &mut std::task::Context<'_>, mask: u8) -> std::task::Poll<u8> {
        if self.raised(mask) != 0 {
            return std::task::Poll::Ready(self.raised(mask));
        }
        self.waker.register(cx.waker());
        // Re-check: a raise between the load and the registration woke nobody.
        match self.raised(mask) {
            0 => std::task::Poll::Pending,
            flags => std::task::Poll::Ready(flags),
        }
    }
}

/// All connected clients, by pgmux client id (SHOW CLIENTS' `id`).
#[derive(Debug, Default)]
pub struct ClientRegistry {
    clients: DashMap<u64, Arc<ClientInfo>>,
    /// Flags raised for everyone so far: clients listed later get them too.
    raised_for_all: AtomicU8,
}

/// Keeps a client listed while the connection lives.
#[derive(Debug)]
pub struct Registration<'a> {
    registry: &'a ClientRegistry,
    info: Arc<ClientInfo>,
}

impl std::ops::Deref for Registration<'_> {
    type Target = Arc<ClientInfo>;
    fn deref(&self) -> &Arc<ClientInfo> {
        &self.info
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.registry.clients.remove(&self.info.id);
    }
}

impl ClientRegistry {
    /// Lists a newly accepted connection and counts it.
    pub fn register<'a>(
        &'a self,
        stats: &Stats,
        id: u64,
        peer: Option<SocketAddr>,
        local: Option<SocketAddr>,
    ) -> Registration<'a> {
        stats.client_connections.fetch_add(1, Ordering::Relaxed);
        let info = Arc::new(ClientInfo::new(id, peer, local));
        self.clients.insert(id, info.clone());
        // After the insert (SeqCst both sides): either `raise_all` finds this
        // client in the map or this load sees its flag.
        let raised = self.raised_for_all.load(Ordering::SeqCst);
        if raised != 0 {
            info.signal.raise(raised);
        }
        Registration { registry: self, info }
    }

    /// Raises `flag` for every client, present and future (shutdown).
    pub fn raise_all(&self, flag: u8) {
        self.raised_for_all.fetch_or(flag, Ordering::SeqCst);
        for c in self.clients.iter() {
            c.signal.raise(flag);
        }
    }

    pub fn get(&self, id: u64) -> Option<Arc<ClientInfo>> {
        self.clients.get(&id).map(|c| c.clone())
    }

    /// Every client, sorted by id; shard locks are released on return.
    pub fn snapshot(&self) -> Vec<Arc<ClientInfo>> {
        let mut all: Vec<_> = self.clients.iter().map(|e| e.value().clone()).collect();
        all.sort_by_key(|c| c.id);
        all
    }

    /// Clients of `database` (all databases if `None`) holding a backend or
    /// past the PAUSE gate: what PAUSE waits for.
    pub fn in_flight(&self, database: Option<&str>) -> usize {
        std::sync::atomic::fence(Ordering::SeqCst);
        self.clients
            .iter()
            .filter(|c| matches!(c.state(), ClientState::Waiting | ClientState::Active))
            .filter(|c| match (database, c.login()) {
                (None, _) => true,
                (Some(db), Some(l)) => l.database() == db,
                (Some(_), None) => false,
            })
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The compact peer address gives back what it was given (an IPv4
    /// peer stays IPv4, not IPv4-mapped IPv6).
    #[test]
    fn peer_addresses_survive_compaction() {
        for addr in ["10.1.2.3:5432", "[2001:db8::7]:60000", "[::ffff:10.1.2.3]:1", "[::1]:6432", "0.0.0.0:0"] {
            let a: SocketAddr = addr.parse().unwrap();
            let back = Peer::new(Some(a)).get().unwrap();
            assert_eq!(back, a, "{addr}");
            assert_eq!(back.is_ipv4(), a.is_ipv4(), "{addr}");
        }
        assert_eq!(Peer::new(None).get(), None);
    }
}
