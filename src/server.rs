//! Listener, accept loop, shutdown and drain.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use bytes::BytesMut;
use tokio::net::{TcpListener, TcpSocket, TcpStream, UnixListener, UnixStream};

use crate::config::Config;
use crate::live::Shared;
use crate::live::registry::Signal;
use crate::net::Stream;
use crate::pool::Pools;
use crate::protocol::backend::{self as msg, Severity};
use crate::protocol::sqlstate::SqlState;
use crate::settings::Settings;

/// What [`run`] needs beyond the configuration and the client listener.
#[derive(Debug, Default)]
pub struct Options {
    /// The file the configuration was loaded from. When set, SIGHUP and the
    /// admin console's RELOAD re-read it; otherwise reloading is refused.
    pub config_path: Option<PathBuf>,
    /// The `/metrics` listener, bound by the caller (`main` binds
    /// `[proxy] metrics_listen`; tests bind port 0 and need the port).
    pub metrics: Option<TcpListener>,
    /// `[proxy] peer_listen`'s listener: this instance's own address, served
    /// exactly as the client listener is.
    pub peer: Option<TcpListener>,
    /// The Unix-domain socket in `[proxy] unix_socket_dir`, served exactly
    /// as the client listener is.
    pub unix_socket: Option<Listener>,
}

/// A listening socket clients connect to.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixSocket),
}

impl From<TcpListener> for Listener {
    fn from(l: TcpListener) -> Listener {
        Listener::Tcp(l)
    }
}

/// A listening Unix-domain socket; its file goes when it closes, as
/// Postgres's does, so that clients find nothing rather than a dead socket.
#[derive(Debug)]
pub struct UnixSocket {
    listener: UnixListener,
    path: PathBuf,
    /// The file's identity at bind: a later process's socket of the same
    /// name is not ours to remove.
    inode: (u64, u64),
}

impl Drop for UnixSocket {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.inode) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Listener {
    fn poll_accept(&self, cx: &mut std::task::Context<'_>) -> Poll<std::io::Result<Stream>> {
        match self {
            Listener::Tcp(l) => l.poll_accept(cx).map_ok(|(s, _)| Stream::Plain(s)),
            Listener::Unix(u) => u.listener.poll_accept(cx).map_ok(|(s, _)| Stream::Unix(s)),
        }
    }

    /// One `accept` call, without waiting.
    fn accept_now(&self) -> std::io::Result<Stream> {
        let socket = match self {
            Listener::Tcp(l) => socket2::SockRef::from(l).accept(),
            Listener::Unix(u) => socket2::SockRef::from(&u.listener).accept(),
        }?
        .0;
        socket.set_nonblocking(true)?;
        Ok(match self {
            Listener::Tcp(_) => Stream::Plain(TcpStream::from_std(socket.into())?),
            Listener::Unix(_) => Stream::Unix(UnixStream::from_std(socket.into())?),
        })
    }

    /// Where it listens, for the log.
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            Listener::Unix(u) => u.path.display().to_string(),
        }
    }
}

/// How a shutdown begins: what the future given to [`run`] resolves to.
pub enum Shutdown {
    /// Stop accepting; idle clients get `57P01` at once, open transactions
    /// finish within `shutdown_timeout`, then everyone is closed (SIGINT,
    /// the admin console's SHUTDOWN).
    Drain,
    /// Stop accepting and go on serving the connected clients until they
    /// leave by themselves (SIGTERM, as PgBouncer and Postgres's smart
    /// shutdown): closing an idle client always races the query it may be
    /// sending, so only waiting fails nothing. [`Shutdown::Drain`] follows
    /// after `shutdown_timeout`, or when the future resolves (a second signal).
    WaitForClients(Escalation),
}

/// Resolves when a shutdown that waits for clients should drain them after all.
pub type Escalation = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// A shutdown future resolving to `()` asks for the drain, as it always has.
impl From<()> for Shutdown {
    fn from((): ()) -> Shutdown {
        Shutdown::Drain
    }
}

impl std::fmt::Debug for Shutdown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Shutdown::Drain => "Drain",
            Shutdown::WaitForClients(_) => "WaitForClients",
        })
    }
}

/// Serves clients on `listener` (and `options.peer`) until `shutdown`
/// resolves (or an admin runs SHUTDOWN), then stops accepting and shuts
/// down as [`Shutdown`] says: waiting for the clients first, or draining at
/// once (let open transactions finish within `shutdown_timeout`, then close
/// everyone with 57P01).
pub async fn run<F>(
    config: Arc<Config>,
    listener: impl Into<Listener>,
    shutdown: F,
    options: Options,
) -> std::io::Result<()>
where
    F: Future,
    F::Output: Into<Shutdown>,
{
    let Options { config_path, metrics, peer, unix_socket } = options;
    let config = Settings::build(Arc::unwrap_or_clone(config))
        .map(Arc::new)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("TLS: {e}")))?;
    start_io(&config.proxy);
    crate::net::idle_poll::set_limit(config.proxy.idle_poll);
    if !config.proxy.idle_poll.is_zero() {
        tracing::info!(idle_poll = ?config.proxy.idle_poll, "serving threads poll before they sleep");
    }
    if tokio::runtime::Handle::current().runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread {
        crate::net::idle_poll::enable_here();
    }
    let pools = Arc::new(Pools::default());
    pools.prewarm(&config);
    let janitor = tokio::spawn(pools.clone().janitor());
    let config_reloadable = config_path.is_some();
    let shared = Arc::new(Shared::new(config, pools.clone(), config_path));
    // Scrapes keep working during the drain; they stop when `run` returns.
    let metrics = metrics.map(|l| tokio::spawn(crate::admin::metrics::serve(l, shared.clone())));
    let sighup = config_reloadable.then(|| reload_on_sighup(shared.clone()));

    let listeners: Vec<Listener> =
        std::iter::once(listener.into()).chain(peer.map(Listener::Tcp)).chain(unix_socket).collect();
    let next_id = AtomicU64::new(1);
    tokio::pin!(shutdown);
    let wait = tokio::select! {
        _ = accept_loop(&listeners, &shared, &next_id) => Wait::No,
        mode = &mut shutdown => match mode.into() {
            Shutdown::Drain => Wait::No,
            Shutdown::WaitForClients(escalate) => Wait::Bounded(escalate),
        },
        _ = shared.shutdown_requested() => {
            tracing::info!("SHUTDOWN from the admin console");
            if shared.waits_for_clients() { Wait::Unbounded } else { Wait::No }
        }
    };
    // Connections the kernel has queued already are reset when their
    // listener closes (unless Linux moves them to another SO_REUSEPORT
    // listener): take them first, they are served like any other.
    let queued: usize = listeners.iter().map(|l| accept_queued(l, &shared, &next_id)).sum();
    drop(listeners);
    if queued > 0 {
        tracing::info!(clients = queued, "accepted the connections queued before the listener closed");
    }
    match wait {
        Wait::No => {}
        // A signal meanwhile drains them after all.
        Wait::Unbounded => {
            wait_for_clients(&shared, None, async {
                (&mut shutdown).await;
            })
            .await
        }
        Wait::Bounded(escalate) => {
            wait_for_clients(&shared, Some(shared.config().proxy.shutdown_timeout), escalate).await;
        }
    }
    // Clients (admin sessions included) learn it through their Signal:
    // idle ones leave now, busy ones at their transaction's end.
    shared.clients.raise_all(Signal::DRAIN);
    if let Some(h) = sighup {
        h.abort();
    }
    let grace = shared.config().proxy.shutdown_timeout;
    let all_gone = shared.all_gone();
    tokio::pin!(all_gone);
    if tokio::time::timeout(grace, &mut all_gone).await.is_err() {
        tracing::info!(remaining = shared.connected(), "shutdown_timeout reached; closing");
        shared.clients.raise_all(Signal::FORCE_CLOSE);
        // Clients close at once on force; this bound only guards against a stuck socket write.
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut all_gone).await;
    }
    janitor.abort();
    if let Some(m) = metrics {
        m.abort();
    }
    pools.close_idle();
    shared.routing.stop_monitors();
    tracing::info!("shutdown complete");
    Ok(())
}

/// Whether the shutdown under way waits for the clients before draining them.
enum Wait {
    No,
    /// SIGTERM: at most `shutdown_timeout`, or until the escalation resolves.
    Bounded(Escalation),
    /// `SHUTDOWN WAIT_FOR_CLIENTS`: as long as they stay, unless a signal comes.
    Unbounded,
}

/// Returns once every client has left, `bound` has passed, `escalate`
/// resolved, or an admin asked for a plain SHUTDOWN (a `SHUTDOWN
/// WAIT_FOR_CLIENTS` lifts the bound instead). The listeners are closed.
async fn wait_for_clients(shared: &Shared, bound: Option<Duration>, escalate: impl Future<Output = ()>) {
    tracing::info!(
        clients = shared.connected(),
        bound = ?bound,
        "not accepting clients; exiting once the connected ones have left"
    );
    let mut deadline = bound.map(|b| tokio::time::Instant::now() + b);
    tokio::pin!(escalate);
    loop {
        tokio::select! {
            _ = shared.all_gone() => return,
            _ = &mut escalate => {
                tracing::info!(remaining = shared.connected(), "draining the remaining clients");
                return;
            }
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => {
                tracing::info!(remaining = shared.connected(), "shutdown_timeout passed; draining the remaining clients");
                return;
            }
            _ = shared.shutdown_requested() => {
                if !shared.waits_for_clients() {
                    tracing::info!(remaining = shared.connected(), "SHUTDOWN from the admin console: draining the remaining clients");
                    return;
                }
                deadline = None;
            }
        }
    }
}

/// Binds a client listener (`[proxy] listen`, `peer_listen`). With
/// `so_reuseport`, other processes may bind the same address and the kernel
/// spreads new connections over all of them: several pgmux on one port.
pub fn bind(addr: SocketAddr, so_reuseport: bool) -> std::io::Result<TcpListener> {
    let bound = || {
        let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        // As TcpListener::bind: a restart need not wait out TIME_WAIT.
        socket.set_reuseaddr(true)?;
        if so_reuseport {
            socket.set_reuseport(true)?;
        }
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    let listener = bound().map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
    if so_reuseport {
        warn_unless_queued_connections_migrate();
    }
    Ok(listener)
}

/// Binds a Unix-domain socket at `path` with the file's `mode` and `group`
/// (`[proxy] listen` or `unix_socket_dir`). A socket file already there is
/// taken over when nothing answers on it (left by a process that died, as
/// Postgres does with its own); one that answers belongs to a running
/// process, and binding fails.
pub fn bind_unix(path: &Path, mode: u32, group: Option<&str>) -> std::io::Result<Listener> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    let fail = |e: std::io::Error| std::io::Error::new(e.kind(), format!("cannot listen on {}: {e}", path.display()));
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(fail(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a file that is not a socket is there",
            )));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(fail(std::io::Error::new(std::io::ErrorKind::AddrInUse, "another process listens there")));
        }
        std::fs::remove_file(path).map_err(fail)?;
    }
    let listener = UnixListener::bind(path).map_err(fail)?;
    // Built before anything can fail below, so that a failure removes the file again.
    let mut socket = UnixSocket { listener, path: path.to_owned(), inode: (0, 0) };
    let meta = std::fs::symlink_metadata(path).map_err(fail)?;
    socket.inode = (meta.dev(), meta.ino());
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(fail)?;
    if let Some(group) = group {
        std::os::unix::fs::chown(path, None, Some(group_id(group).map_err(fail)?)).map_err(fail)?;
    }
    Ok(Listener::Unix(socket))
}

/// A group's id from its name (or its number).
fn group_id(name: &str) -> std::io::Result<u32> {
    if let Ok(gid) = name.parse() {
        return Ok(gid);
    }
    let not_found = || std::io::Error::new(std::io::ErrorKind::NotFound, format!("no group named {name:?}"));
    let cname = std::ffi::CString::new(name).map_err(|_| not_found())?;
    // SAFETY: getgrnam_r writes only into `group` and `buf`, whose length it is given.
    let mut group: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 64 * 1024];
    let mut found = std::ptr::null_mut();
    let rc = unsafe { libc::getgrnam_r(cname.as_ptr(), &mut group, buf.as_mut_ptr(), buf.len(), &mut found) };
    match rc {
        0 if found.is_null() => Err(not_found()),
        0 => Ok(group.gr_gid),
        e => Err(std::io::Error::from_raw_os_error(e)),
    }
}

/// The listen queue's length, as tokio's and Postgres's default.
const LISTEN_BACKLOG: u32 = 1024;

/// When one of several SO_REUSEPORT listeners closes (a rolling restart),
/// Linux resets the connections queued on it, unless
/// `net.ipv4.tcp_migrate_req` is 1 (Linux 5.14 and later), which moves them
/// to the other listeners of the group.
fn warn_unless_queued_connections_migrate() {
    const SYSCTL: &str = "/proc/sys/net/ipv4/tcp_migrate_req";
    match std::fs::read_to_string(SYSCTL) {
        Ok(v) if v.trim() == "0" => tracing::warn!(
            "so_reuseport: net.ipv4.tcp_migrate_req is 0, so connections queued on this instance when it stops \
             are reset instead of moving to the other instances; for rolling restarts run \
             `sysctl -w net.ipv4.tcp_migrate_req=1`"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(
            error = %e,
            "so_reuseport: cannot read {SYSCTL} (Linux before 5.14?): connections queued on this instance when it \
             stops may be reset instead of moving to the other instances"
        ),
    }
}

/// Starts the io_uring data path when `[proxy] io` asks for it (before any
/// server connection opens), and says which path runs.
fn start_io(proxy: &crate::config::ProxyConfig) {
    use crate::net::uring::{self, Started};
    if proxy.io == crate::config::IoMode::Epoll {
        tracing::debug!("data path: epoll");
        return;
    }
    if tokio::runtime::Handle::current().runtime_flavor() != tokio::runtime::RuntimeFlavor::CurrentThread {
        tracing::warn!(
            "io = \"uring\" needs workers = 1 (one ring per thread, tasks that stay on it); data path: epoll"
        );
        return;
    }
    // Every client, and room for the server connections beside them.
    match uring::start(proxy.max_client_conn + 1024) {
        Started::Running(flags) => tracing::info!(ring = flags, "data path: io_uring"),
        Started::AlreadyRunning => {}
        Started::Refused(e) => tracing::warn!(error = %e, "io_uring refused; data path: epoll"),
    }
}

/// The runtime `[proxy] workers` asks for. One worker is a current-thread
/// runtime: no work stealing, no cross-thread wakeups, every client's state
/// in one core's cache. On a machine shared with Postgres, as poolers usually
/// are, that costs the least CPU per transaction (see docs/benchmarks.md).
pub fn runtime(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let workers = match workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    if workers == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .on_thread_start(crate::net::idle_poll::enable_here)
            .enable_all()
            .build()
    }
}

/// Reloads on every SIGHUP until the returned task is aborted. The handler
/// is installed before this returns, so a SIGHUP sent once pgmux accepts
/// clients can never take the default action (terminate). Errors are logged
/// and counted by `reload`.
fn reload_on_sighup(shared: Arc<Shared>) -> tokio::task::JoinHandle<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let hup = signal(SignalKind::hangup());
    tokio::spawn(async move {
        let mut hup = match hup {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; reload with the admin console's RELOAD");
                return;
            }
        };
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the configuration");
            let _ = shared.reload();
        }
    })
}

/// Accepts on every listener until the future is dropped.
async fn accept_loop(listeners: &[Listener], shared: &Arc<Shared>, next_id: &AtomicU64) {
    let mut backoff = Duration::from_millis(5);
    let mut turn = 0usize;
    loop {
        // SUSPENDed: connections wait in the listen queue until RESUME.
        if shared.is_suspended() {
            shared.not_suspended().await;
        }
        // Each listener gets the first look in turn: a busy shared port must
        // not starve `peer_listen`, where the peers' cancels arrive.
        turn = turn.wrapping_add(1);
        let accepted = std::future::poll_fn(|cx| {
            for i in 0..listeners.len() {
                if let Poll::Ready(r) = listeners[(turn + i) % listeners.len()].poll_accept(cx) {
                    return Poll::Ready(r);
                }
            }
            Poll::Pending
        })
        .await;
        match accepted {
            Ok(stream) => {
                backoff = Duration::from_millis(5);
                admit(stream, shared, next_id);
            }
            Err(e) => {
                // Usually EMFILE: wait for descriptors to free rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Accepts what the kernel has queued on `listener` without waiting (an
/// `accept` call each, not tokio's cached readiness, which may not know of
/// them yet); returns how many.
fn accept_queued(listener: &Listener, shared: &Arc<Shared>, next_id: &AtomicU64) -> usize {
    let mut accepted = 0;
    loop {
        match listener.accept_now() {
            Ok(stream) => {
                admit(stream, shared, next_id);
                accepted += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                if e.kind() != std::io::ErrorKind::WouldBlock {
                    tracing::warn!(error = %e, "accept of a queued connection failed");
                }
                return accepted;
            }
        }
    }
}

/// Hands an accepted connection to a client task, or refuses it at `max_client_conn`.
fn admit(stream: Stream, shared: &Arc<Shared>, next_id: &AtomicU64) {
    let id = next_id.fetch_add(1, Ordering::Relaxed);
    match shared.take_slot() {
        Some(slot) => {
            tokio::spawn(crate::client::serve(Box::new(crate::client::Accepted { stream, id }), slot));
        }
        None => {
            tracing::warn!("max_client_conn reached; refusing a client");
            tokio::spawn(refuse(
                stream,
                SqlState::TOO_MANY_CONNECTIONS,
                "no more connections allowed (max_client_conn)",
            ));
        }
    }
}

async fn refuse(mut stream: Stream, code: SqlState, text: &'static str) {
    let mut out = BytesMut::new();
    msg::error_response(&mut out, Severity::Fatal, code, text);
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&out)).await;
}

/// Resolves on SIGTERM, to [`Shutdown::WaitForClients`] (a second SIGTERM,
/// or a SIGINT, drains the clients still connected), or on SIGINT, to
/// [`Shutdown::Drain`].
pub async fn shutdown_signal() -> Shutdown {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        // Without signal handlers the proxy still serves; it just cannot drain on a signal.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {
            tracing::info!("SIGTERM: shutting down once the connected clients have left (SIGINT or SIGTERM again: drain them now)");
            Shutdown::WaitForClients(Box::pin(async move {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM again"),
                    _ = int.recv() => tracing::info!("SIGINT"),
                }
            }))
        }
        _ = int.recv() => {
            tracing::info!("SIGINT: shutting down");
            Shutdown::Drain
        }
    }
}
