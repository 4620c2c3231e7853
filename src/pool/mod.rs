//! Backend connection pools, one per (database, user) toward a node.
//!
//! A [`Pool`] owns idle [`Backend`]s and a FIFO queue of waiting clients; its
//! state sits behind a std mutex that is never held across an `.await`
//! (decisions live in [`inner`]). Clients take a backend with
//! [`Pool::checkout`] and give it back with [`Pool::checkin`] (clean) or
//! [`Pool::discard`] (closed).

pub mod backend;
pub mod caps;
pub mod checkout;
pub mod counters;
pub mod expect;
pub mod inner;
pub mod leader;
mod pools;
pub mod statements;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use dashmap::DashMap;

pub use backend::Backend;
use backend::LoginParams;
pub use checkout::{Checkout, Release};
pub use counters::{PoolCounters, Traffic};
use inner::{CloseReason, Grant, Inner, Take};
pub use leader::Leader;
pub use pools::Pools;

use crate::auth::BackendLoginError;
use crate::config::{DatabaseConfig, UserConfig};
use crate::protocol::sqlstate::SqlState;
use crate::settings::Settings;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("no server connection available within query_wait_timeout ({0:?})")]
    Timeout(Duration),
    #[error("could not connect to server: {0}")]
    Connect(std::io::Error),
    #[error("could not connect to server: connection timed out")]
    ConnectTimeout,
    #[error("{0}")]
    Login(BackendLoginError),
    #[error("no primary is available: no node of the database accepted writes within query_wait_timeout ({0:?})")]
    NoPrimary(Duration),
}

impl PoolError {
    pub fn sqlstate(&self) -> SqlState {
        match self {
            PoolError::Timeout(_) | PoolError::NoPrimary(_) => SqlState::TOO_MANY_CONNECTIONS,
            PoolError::Connect(_) | PoolError::ConnectTimeout => SqlState::CONNECTION_FAILURE,
            PoolError::Login(e) => e.sqlstate(),
        }
    }
}

/// Everything needed to open and size the backends of one pool. A reload
/// builds new settings and hands them to [`Pool::update`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSettings {
    pub addr: String,
    pub dbname: String,
    pub user: String,
    /// How pgmux logs in; `None` for a user known from a client's own
    /// login ([`Pool::set_passthrough`]).
    pub credential: Option<crate::auth::Credential>,
    pub pool_size: usize,
    pub min_pool_size: usize,
    pub query_wait_timeout: Duration,
    pub connect_timeout: Duration,
    pub keepalive: Option<crate::config::TcpKeepalive>,
    pub lifetime: Duration,
    pub idle_timeout: Duration,
    /// Server-side prepared statements kept per backend.
    pub max_prepared: usize,
    /// `server_tls` and its built rustls configuration.
    pub tls: crate::tls::BackendTls,
    /// For a pool the `"*"` database made: forgotten after this long unused.
    pub forget_after: Option<Duration>,
    /// Backends beyond `pool_size` for clients that waited `reserve_pool_timeout`.
    pub reserve_pool_size: usize,
    pub reserve_pool_timeout: Duration,
}

impl PoolSettings {
    pub fn new(config: &Settings, db: &DatabaseConfig, user: &UserConfig) -> PoolSettings {
        PoolSettings {
            addr: db.first_addr().to_owned(),
            dbname: db.server_dbname().to_owned(),
            user: user.name.clone(),
            credential: user.backend_password().map(|p| crate::auth::Credential::Password(p.to_owned())),
            pool_size: db.pool_size,
            min_pool_size: db.min_pool_size,
            query_wait_timeout: config.proxy.query_wait_timeout,
            connect_timeout: config.proxy.server_connect_timeout,
            keepalive: config.proxy.server_keepalive(),
            lifetime: config.proxy.server_lifetime,
            idle_timeout: config.proxy.server_idle_timeout,
            max_prepared: config.proxy.max_prepared_statements,
            tls: config.tls.client.clone(),
            forget_after: config.database(&db.name).is_none().then_some(config.proxy.pool_idle_timeout),
            reserve_pool_size: db.reserve_pool_size.unwrap_or(config.proxy.reserve_pool_size),
            reserve_pool_timeout: config.proxy.reserve_pool_timeout,
        }
    }

    /// The same settings toward `db`'s replica at `addr`.
    pub fn replica(config: &Settings, db: &DatabaseConfig, user: &UserConfig, addr: &str) -> PoolSettings {
        let mut settings = PoolSettings::new(config, db, user);
        addr.clone_into(&mut settings.addr);
        settings
    }
}

/// A server's ParameterStatus set, shared by every client of a pool.
pub type ServerParams = Arc<Vec<(String, String)>>;

/// Counts for SHOW POOLS and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    pub open: usize,
    pub idle: usize,
    pub waiting: usize,
    /// A reload removed the pool's database, user or replica.
    pub retired: bool,
}

/// An idle backend as SHOW SERVERS lists it; copied out under the lock.
#[derive(Debug, Clone)]
pub struct IdleBackend {
    pub pid: i32,
    pub addr: crate::net::ServerAddr,
    /// pgmux's end of the connection.
    pub local: Option<std::net::SocketAddr>,
    /// TLS protocol and cipher suite; `None` for plain.
    pub tls: Option<String>,
    pub created: Instant,
    pub last_used: Instant,
    /// Named statements prepared on it.
    pub prepared: usize,
}

#[derive(Debug)]
pub struct Pool {
    /// Read lock-free on every checkout; replaced whole by a reload.
    settings: ArcSwap<PoolSettings>,
    /// Boxed: a backend changes hands several times per transaction (pool,
    /// waiter queue, client); moving a pointer beats copying ~300 bytes.
    inner: Mutex<Inner<Box<Backend>>>,
    /// ParameterStatus values of the first backend ever opened, announced to
    /// clients at login (pgmux answers logins without holding a backend).
    server_params: Mutex<Option<ServerParams>>,
    counters: PoolCounters,
    /// When the pool was created: the base of SHOW STATS averages.
    created: Instant,
    /// Named statements of this pool's clients, interned by text.
    pub statements: statements::Registry,
    /// For a user without a configured password (auth_query): what the
    /// latest client login of this user proved, used to open backends.
    passthrough: Mutex<Option<crate::auth::Credential>>,
    /// Milliseconds after `created` of the last checkout: how long the pool
    /// has gone unused.
    last_used_ms: std::sync::atomic::AtomicU64,
    /// `max_db_connections` and `max_user_connections` of this pool's server.
    caps: Vec<Arc<caps::Cap>>,
    /// For the primary pools of a database with several nodes: the node
    /// observed to be the primary, which this pool's backends go to.
    leader: std::sync::OnceLock<Arc<Leader>>,
    /// The leader's generation this pool last followed.
    leader_seen: std::sync::atomic::AtomicU64,
}

/// How often queued clients are checked against `query_wait_timeout`: a
/// wait times out up to this late. (PgBouncer checks three times a second.)
const WAIT_SWEEP_PERIOD: Duration = Duration::from_millis(100);

impl Pool {
    pub fn new(settings: PoolSettings) -> Arc<Pool> {
        let inner = Inner::new(settings.pool_size, settings.lifetime, settings.idle_timeout);
        Arc::new(Pool {
            settings: ArcSwap::from_pointee(settings),
            inner: Mutex::new(inner),
            server_params: Mutex::new(None),
            counters: PoolCounters::default(),
            created: Instant::now(),
            statements: statements::Registry::default(),
            passthrough: Mutex::new(None),
            last_used_ms: std::sync::atomic::AtomicU64::new(0),
            caps: Vec::new(),
            leader: std::sync::OnceLock::new(),
            leader_seen: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// A pool whose backends count against `caps`.
    pub fn with_caps(settings: PoolSettings, caps: Vec<Arc<caps::Cap>>) -> Arc<Pool> {
        let mut pool = Pool::new(settings);
        Arc::get_mut(&mut pool).expect("just made").caps = caps;
        for cap in &pool.caps {
            cap.register(&pool);
        }
        pool
    }

    /// Closes the oldest idle backend, for a cap another pool needs room
    /// under. `false` when none is idle.
    /// Whether a backend is idle here now.
    pub fn has_idle(&self) -> bool {
        self.lock().has_idle()
    }

    pub fn evict_idle(&self) -> bool {
        let evicted = self.lock().evict_oldest_idle();
        match evicted {
            Some(b) => {
                tracing::debug!(
                    pid = b.pid,
                    "closing an idle server connection: another pool needs its place under a connection cap"
                );
                b.close();
                true
            }
            None => false,
        }
    }

    /// From now on, backends go to whichever node `leader` names, and
    /// checkouts wait (up to `query_wait_timeout`) while it names none. Set
    /// once: a pool serves one database.
    pub fn follow(&self, leader: Arc<Leader>) {
        let _ = self.leader.set(leader);
    }

    /// Points the pool at the leader's current primary. `false` while none is known.
    fn follow_now(&self, leader: &Leader) -> bool {
        let (generation, addr) = leader.current();
        let Some(addr) = addr else { return false };
        let settings = self.settings.load_full();
        if *settings.addr != *addr {
            tracing::info!(from = %settings.addr, to = %addr, db = %settings.dbname, user = %settings.user, "pool follows the new primary");
            let mut next = (*settings).clone();
            next.addr = addr.to_string();
            self.retarget(next);
        }
        self.leader_seen.store(generation, Ordering::Release);
        true
    }

    /// Before a checkout: follow the leader if it moved, waiting for one
    /// until `started` + `query_wait_timeout` while there is none.
    async fn follow_leader(&self, leader: &Leader, started: Instant) -> Result<(), PoolError> {
        let deadline = self.cap_deadline(started).expect("always a deadline");
        while !self.follow_now(leader) {
            if leader.known(deadline).await.is_none() {
                return Err(PoolError::NoPrimary(self.settings.load().query_wait_timeout));
            }
        }
        Ok(())
    }

    /// How long since the last checkout (or since creation).
    pub fn unused_for(&self) -> Duration {
        let last = self.created + Duration::from_millis(self.last_used_ms.load(Ordering::Relaxed));
        last.elapsed()
    }

    /// Records what a client's login proved for this pool's user (SCRAM keys
    /// or an md5 hash), for backends opened from now on. A changed password
    /// reaches new backends; open ones keep working until recycled.
    pub fn set_passthrough(&self, credential: crate::auth::Credential) {
        let mut slot = self.passthrough.lock().unwrap_or_else(|e| e.into_inner());
        if slot.as_ref() != Some(&credential) {
            *slot = Some(credential);
        }
    }

    /// The settings in force (a reload may replace them at any time).
    pub fn settings(&self) -> Arc<PoolSettings> {
        self.settings.load_full()
    }

    /// Applies a reload's settings. Sizes and ages take effect at once
    /// (waiting clients get new slots; surplus idle backends close now, busy
    /// ones when they come back). A new server address, database or user
    /// makes every current backend one of the old target: idle ones close
    /// now, busy ones when they come back, and new ones go to the new target.
    pub fn update(&self, mut new: PoolSettings) {
        let old = self.settings.load_full();
        if self.leader.get().is_some() {
            // The observed primary, not proxy.toml, says where backends go.
            new.addr.clone_from(&old.addr);
        }
        self.retarget(new);
    }

    fn retarget(&self, new: PoolSettings) {
        let old = self.settings.load_full();
        if *old == new {
            return;
        }
        let retarget = old.addr != new.addr || old.dbname != new.dbname || old.user != new.user;
        let (pool_size, lifetime, idle_timeout) = (new.pool_size, new.lifetime, new.idle_timeout);
        // Stored before the generation moves (under the lock), so that a
        // backend stamped with the new generation was opened with these settings.
        self.settings.store(Arc::new(new));
        let mut closed = {
            let mut inner = self.lock();
            let mut closed = if retarget { inner.retarget() } else { Vec::new() };
            closed.extend(inner.reconfigure(pool_size, lifetime, idle_timeout));
            closed
        };
        if retarget {
            // Re-learned from the new server by the next login.
            *self.server_params.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
        close_all(closed.drain(..));
    }

    /// A reload removed this pool's database or user: close its idle
    /// backends now and every other one when it comes back. Clients still on
    /// it keep working (each transaction opens a backend, closed after it).
    pub fn retire(&self) {
        let closed = self.lock().retire();
        close_all(closed);
    }

    /// Admin `RECONNECT`/`KILL`: closes idle backends now and busy ones when
    /// their transaction ends; new ones open as needed.
    pub fn reconnect(&self) {
        let closed = self.lock().renew(CloseReason::Reconnect);
        close_all(closed);
    }

    fn lock(&self) -> MutexGuard<'_, Inner<Box<Backend>>> {
        // A panic while holding this lock would be a bug in `inner`'s small,
        // non-panicking methods; recover the data rather than poison every client.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn stats(&self) -> PoolStats {
        let inner = self.lock();
        PoolStats { open: inner.open(), idle: inner.idle_count(), waiting: inner.waiting(), retired: inner.retired() }
    }

    pub fn checkouts(&self) -> u64 {
        self.counters.checkouts.load(Ordering::Relaxed)
    }

    pub fn counters(&self) -> &PoolCounters {
        &self.counters
    }

    pub fn created(&self) -> Instant {
        self.created
    }

    /// The idle backends right now (the lock is held only to copy them out).
    pub fn idle_backends(&self) -> Vec<IdleBackend> {
        use inner::Aged;
        let inner = self.lock();
        inner
            .idle()
            .map(|b| IdleBackend {
                pid: b.pid,
                addr: b.addr.clone(),
                local: b.stream.local_addr(),
                tls: b.stream.tls_description(),
                created: b.created(),
                last_used: b.last_used(),
                prepared: b.prepared.len(),
            })
            .collect()
    }

    /// Adds the time a client held a backend (checkout to release) to SHOW STATS.
    pub fn record_xact_time(&self, held: Duration) {
        self.counters.xact.observe(held);
    }

    /// Waits up to `query_wait_timeout` for a live backend, FIFO among waiters.
    pub async fn checkout(self: &Arc<Self>) -> Result<Checkout, PoolError> {
        self.checkout_at(Instant::now()).await.map(|(b, _)| b)
    }

    /// [`Pool::checkout`] for a request that asked at `started` (a clock
    /// reading the caller already has). Also returns when the backend was
    /// granted: `started` itself when an idle one was there, so the common
    /// case reads no clock at all.
    pub async fn checkout_at(self: &Arc<Self>, started: Instant) -> Result<(Checkout, Instant), PoolError> {
        let result = self.checkout_inner(started).await.map(|(b, at)| (Checkout::new(self.clone(), b), at));
        self.last_used_ms.store(self.created.elapsed().as_millis() as u64, Ordering::Relaxed);
        let granted = match &result {
            Ok((_, granted)) => *granted,
            Err(_) => Instant::now(),
        };
        self.counters.wait.observe(granted.saturating_duration_since(started));
        if let Err(PoolError::Timeout(_)) = result {
            self.counters.wait_timeouts.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    async fn checkout_inner(self: &Arc<Self>, started: Instant) -> Result<(Box<Backend>, Instant), PoolError> {
        let mut now = started;
        if let Some(leader) = self.leader.get()
            && leader.generation() != self.leader_seen.load(Ordering::Acquire)
        {
            // Boxed: the rare wait for a primary need not size every checkout.
            Box::pin(self.follow_leader(leader, started)).await?;
        }
        loop {
            // From here to the end of this round the slot the pool counted for
            // us (a new backend, or a grant in the queue) is ours: if this
            // future is dropped meanwhile (the login timeout while a slow
            // server accepts, a client gone while it waits), the guard gives
            // it back.
            let mut slot = SlotGuard { pool: self, held: false };
            let mut expired = Vec::new();
            let (take, start_sweeper) = {
                let mut inner = self.lock();
                let take = inner.take(now, started, &mut expired);
                let start_sweeper = matches!(take, Take::Wait(_)) && inner.claim_sweeper();
                (take, start_sweeper)
            };
            close_all(expired);
            if start_sweeper {
                // Weak: the sweeper must not keep a dropped pool alive.
                tokio::spawn(sweep_waiters(Arc::downgrade(self)));
            }
            let grant = match take {
                Take::Idle(b) => Grant::Backend(b),
                Take::Create => {
                    slot.held = true;
                    Grant::Slot
                }
                // No timer per wait (registering one in tokio's wheel and
                // removing it cost more than the rest of the hand-off): the
                // pool's sweeper times the queue out, by dropping the sender.
                // Grants and the sweep both happen under the pool lock, so a
                // timed-out waiter was granted nothing.
                Take::Wait(rx) => {
                    let mut waiting = Waiting { pool: self, rx };
                    match (&mut waiting.rx).await {
                        Ok(grant) => {
                            now = Instant::now();
                            slot.held = matches!(grant, Grant::Slot);
                            grant
                        }
                        Err(_) => return Err(PoolError::Timeout(self.settings.load().query_wait_timeout)),
                    }
                }
            };
            match grant {
                Grant::Backend(b) if b.is_alive() => {
                    self.counters.checkouts.fetch_add(1, Ordering::Relaxed);
                    return Ok((b, now));
                }
                Grant::Backend(b) => {
                    tracing::info!(pid = b.pid, "server connection closed while idle; replacing it");
                    self.discard(b, CloseReason::Dead);
                    now = Instant::now();
                }
                // Boxed: connecting (TLS, authentication) is a large future;
                // inline it would size every client's task for this rare path.
                Grant::Slot => match Box::pin(self.open_backend(self.cap_deadline(started))).await {
                    Ok(b) => {
                        slot.held = false;
                        self.counters.checkouts.fetch_add(1, Ordering::Relaxed);
                        return Ok((b, Instant::now()));
                    }
                    // While this checkout waited for room under a cap, one of
                    // this pool's own backends went idle: take that instead
                    // (the guard frees the slot, the next round finds it).
                    Err(OpenError::OwnIdle) => now = Instant::now(),
                    Err(OpenError::Pool(e)) => match (&e, self.leader.get()) {
                        // The primary may be going away: wait for the topology
                        // to name the next one rather than fail at once (the
                        // guard frees the slot; the next round follows).
                        // (A server shutting down refuses logins with 57P03.)
                        (PoolError::Connect(_) | PoolError::ConnectTimeout | PoolError::Login(_), Some(leader))
                            if e.sqlstate() == SqlState::CONNECTION_FAILURE
                                || e.sqlstate() == SqlState::CANNOT_CONNECT_NOW =>
                        {
                            let seen = self.leader_seen.load(Ordering::Acquire);
                            let deadline = self.cap_deadline(started).expect("always a deadline");
                            if !Box::pin(leader.moved(seen, deadline)).await {
                                return Err(e);
                            }
                            tracing::info!(error = %e, "server connection failed while the primary moved; following it");
                            Box::pin(self.follow_leader(leader, started)).await?;
                            now = Instant::now();
                        }
                        // The guard frees the slot.
                        _ => return Err(e),
                    },
                },
            }
        }
    }

    /// Until when a checkout that asked at `started` may wait for a place
    /// under the connection caps: its `query_wait_timeout`.
    fn cap_deadline(&self, started: Instant) -> Option<tokio::time::Instant> {
        let wait = self.settings.load().query_wait_timeout;
        // 0 waits without limit, as for the pool itself.
        Some(
            tokio::time::Instant::from_std(started)
                + if wait.is_zero() { Duration::from_secs(86_400 * 365) } else { wait },
        )
    }

    /// Opens a backend, first taking its places under the caps (waiting up
    /// to `deadline`; `None`: only if free now).
    async fn open_backend(&self, deadline: Option<tokio::time::Instant>) -> Result<Box<Backend>, OpenError> {
        let deadline = deadline.unwrap_or_else(tokio::time::Instant::now);
        let permits = match self.caps.is_empty() {
            true => Vec::new(),
            false => match caps::acquire_all(&self.caps, self, deadline).await {
                caps::Acquired::Permits(p) => p,
                caps::Acquired::OwnIdle => return Err(OpenError::OwnIdle),
                caps::Acquired::TimedOut => {
                    return Err(OpenError::Pool(PoolError::Timeout(self.settings.load().query_wait_timeout)));
                }
            },
        };
        // Generation first, then settings: see `update`.
        let generation = self.lock().generation();
        let s = self.settings.load_full();
        let passthrough = self.passthrough.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let login = LoginParams {
            addr: &s.addr,
            user: &s.user,
            dbname: &s.dbname,
            credential: s.credential.as_ref().or(passthrough.as_ref()),
            connect_timeout: s.connect_timeout,
            keepalive: s.keepalive,
            params: &[],
            tls: &s.tls,
        };
        let mut b = Box::new(Backend::connect(&login).await?);
        b.permits = permits;
        b.generation = generation;
        tracing::debug!(pid = b.pid, addr = %s.addr, db = %s.dbname, user = %s.user, "server connection opened");
        let mut cached = self.server_params.lock().unwrap_or_else(|e| e.into_inner());
        if cached.is_none() {
            *cached = Some(Arc::new(b.params.clone()));
        }
        Ok(b)
    }

    /// The server's ParameterStatus set, opening a backend the first time.
    pub async fn server_params(self: &Arc<Self>) -> Result<ServerParams, PoolError> {
        if let Some(p) = self.server_params.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Ok(p);
        }
        let b = self.checkout().await?;
        let params = Arc::new(b.params.clone());
        b.release(Release::Clean(Instant::now()));
        Ok(params)
    }

    /// Returns a clean backend: idle on the server, nothing unread, nothing unsent.
    fn checkin(&self, b: Box<Backend>) {
        self.checkin_at(b, Instant::now());
    }

    /// [`Pool::checkin`] with the caller's clock reading of when it was last used.
    fn checkin_at(&self, mut b: Box<Backend>, now: Instant) {
        if !b.from_server.is_empty() || !b.to_server.is_empty() {
            // Bytes the server sent after its last ReadyForQuery (a FATAL
            // from a shutdown or a crash, say) would reach the next client:
            // whatever they are, the protocol state is no longer certain.
            tracing::warn!(
                pid = b.pid,
                unread = b.from_server.len(),
                first = ?b.from_server.first().map(|&t| t as char),
                unsent = b.to_server.len(),
                "server connection returned with bytes in flight; closing it"
            );
            return self.discard(b, CloseReason::Dirty);
        }
        b.last_used = now;
        let closed = self.lock().put(b, now);
        close_all(closed);
        for cap in &self.caps {
            cap.went_idle();
        }
    }

    /// Closes a backend that must not be reused, freeing its slot.
    fn discard(&self, b: Box<Backend>, reason: CloseReason) {
        tracing::debug!(pid = b.pid, %reason, "closing server connection");
        let generation = b.generation;
        b.close();
        let suspects = {
            let mut inner = self.lock();
            inner.forget_of(generation);
            if reason == CloseReason::Dead { inner.drop_idle() } else { Vec::new() }
        };
        if !suspects.is_empty() {
            tracing::info!(count = suspects.len(), "a server connection died: closing the idle ones too");
        }
        for b in suspects {
            b.close();
        }
    }

    /// Server connections this pool still has from before the last
    /// RECONNECT, KILL or retargeting reload (PgBouncer's close_needed).
    pub fn stale_backends(&self) -> usize {
        self.lock().stale()
    }

    /// Periodic upkeep: close expired idle backends, keep `min_pool_size` open.
    /// (Waiters are swept by their own task: see `sweep_waiters`.)
    pub async fn maintain(self: &Arc<Self>) {
        if let Some(leader) = self.leader.get()
            && !self.follow_now(leader)
        {
            // No primary to keep connections to.
            return;
        }
        let min = self.settings.load().min_pool_size;
        let (expired, to_open) = {
            let mut inner = self.lock();
            let expired = inner.expire_idle(Instant::now(), min);
            (expired, inner.reserve_for_min(min))
        };
        for (b, reason) in expired {
            tracing::debug!(pid = b.pid, %reason, "closing idle server connection");
            b.close();
        }
        for _ in 0..to_open {
            match self.open_backend(None).await {
                Ok(b) => self.checkin(b),
                Err(e) => {
                    self.lock().forget();
                    match e {
                        OpenError::Pool(PoolError::Timeout(_)) => tracing::debug!(
                            addr = %self.settings.load().addr,
                            "min_pool_size not kept: a connection cap is full"
                        ),
                        OpenError::Pool(e) => {
                            tracing::warn!(addr = %self.settings.load().addr, error = %e, "could not open a min_pool_size connection")
                        }
                        OpenError::OwnIdle => {}
                    }
                    break;
                }
            }
        }
    }

    /// Closes every idle backend (shutdown).
    pub fn close_idle(&self) {
        let idle = self.lock().drain_idle();
        for b in idle {
            b.close();
        }
    }
}

/// Why [`Pool::open_backend`] opened nothing.
enum OpenError {
    Pool(PoolError),
    /// Waiting for room under a cap, the pool got an idle backend of its own.
    OwnIdle,
}

impl From<PoolError> for OpenError {
    fn from(e: PoolError) -> Self {
        OpenError::Pool(e)
    }
}

/// Closes backends the pool let go of, outside its lock.
fn close_all(closed: impl IntoIterator<Item = (Box<Backend>, CloseReason)>) {
    for (b, reason) in closed {
        tracing::debug!(pid = b.pid, %reason, "closing server connection");
        b.close();
    }
}

/// A slot counted for a backend not opened yet: freed on drop unless the
/// backend was opened (`held` cleared).
struct SlotGuard<'a> {
    pool: &'a Pool,
    held: bool,
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        if self.held {
            self.pool.lock().forget();
        }
    }
}

/// A place in the wait queue. Dropped before its grant was taken (the
/// waiting future cancelled), it hands the grant back: a backend to the
/// pool, a slot to the next waiter.
struct Waiting<'a> {
    pool: &'a Pool,
    rx: tokio::sync::oneshot::Receiver<Grant<Box<Backend>>>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        // Closed first, so no grant can arrive after the look.
        self.rx.close();
        match self.rx.try_recv() {
            Ok(Grant::Backend(b)) => self.pool.checkin(b),
            Ok(Grant::Slot) => self.pool.lock().forget(),
            Err(_) => {}
        }
    }
}

/// Times out a pool's waiting clients every [`WAIT_SWEEP_PERIOD`] while any
/// wait, then ends (the next client to queue starts another).
async fn sweep_waiters(pool: Weak<Pool>) {
    let mut tick = tokio::time::interval(WAIT_SWEEP_PERIOD);
    tick.tick().await; // the first tick is immediate
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        let settings = pool.settings.load();
        let mut inner = pool.lock();
        let now = Instant::now();
        if !inner.sweep_waiters(now, settings.query_wait_timeout) {
            return;
        }
        if settings.reserve_pool_size > 0 {
            inner.grant_reserve(now, settings.reserve_pool_size, settings.reserve_pool_timeout);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pool_size: usize, replicas: &str) -> Arc<Settings> {
        let toml = format!(
            "[[databases]]\nname = \"app\"\nprimary = \"127.0.0.1:5432\"\nreplicas = [{replicas}]\npool_size = {pool_size}\n\n\
             [[users]]\nname = \"u\"\npassword = \"p\"\n"
        );
        Arc::new(Settings::build(crate::config::Config::parse(&toml, "t.toml").unwrap()).unwrap())
    }

    #[test]
    fn reload_reconfigures_replica_pools_and_retires_removed_replicas() {
        let old = config(5, "\"127.0.0.1:5433\", \"127.0.0.1:5434\"");
        let pools = Pools::default();
        let (db, user) = (old.database("app").unwrap(), old.user("u").unwrap());
        let kept = pools.get_or_create_replica(&old, db, user, "127.0.0.1:5433");
        let removed = pools.get_or_create_replica(&old, db, user, "127.0.0.1:5434");
        assert_eq!(kept.settings().addr, "127.0.0.1:5433");

        let new = config(2, "\"127.0.0.1:5433\"");
        pools.reconfigure(&new);
        assert_eq!((kept.settings().pool_size, kept.settings().addr.as_str()), (2, "127.0.0.1:5433"));
        assert!(!kept.stats().retired);
        assert!(removed.stats().retired);
        let left: Vec<_> = pools.replicas().into_iter().map(|(k, _)| k.2).collect();
        assert_eq!(left, ["127.0.0.1:5433"]);
        // A session that read the old configuration gets the reload's settings,
        // and a retired one-off pool for the removed replica.
        assert!(Arc::ptr_eq(&pools.get_or_create_replica(&old, db, user, "127.0.0.1:5433"), &kept));
        let late = pools.get_or_create_replica(&old, db, user, "127.0.0.1:5434");
        assert!(late.stats().retired);
        assert_eq!(pools.replicas().len(), 1);
    }
}
