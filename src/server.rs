//! Listener, accept loop, shutdown and drain.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use crate::admin::pause::Pause;
use crate::admin::registry::ClientRegistry;
use crate::admin::stats::Stats;
use crate::client::cancel::CancelRegistry;
use crate::config::Config;
use crate::pool::Pools;
use crate::protocol::backend::{self as msg, Severity};
use crate::protocol::sqlstate::SqlState;
use crate::reload::{ReloadError, Reloaded};

/// State every client task shares. Read-only apart from the registries' own
/// interior locking and the configuration, which a reload swaps whole.
#[derive(Debug)]
pub struct Shared {
    /// Read lock-free by every login; replaced by [`Shared::reload`].
    config: ArcSwap<Config>,
    /// The file the configuration came from; `None` disables reloading.
    config_path: Option<PathBuf>,
    /// Serialises reloads (SIGHUP and RELOAD at once would race otherwise).
    reload_lock: std::sync::Mutex<()>,
    pub pools: Arc<Pools>,
    pub cancels: CancelRegistry,
    /// Connected clients and their states (SHOW CLIENTS, PAUSE, KILL_CLIENT).
    pub clients: ClientRegistry,
    /// Process-wide counters for `/metrics`.
    pub stats: Stats,
    /// Databases held by the admin PAUSE command.
    pub pause: Pause,
    /// The admin SHUTDOWN command; `run` treats it like SIGTERM.
    shutdown_request: Notify,
    /// Replica monitors, read-your-writes scopes, routing counters.
    pub routing: crate::routing::Routing,
    /// Connected clients, against `max_client_conn`, and the cleanups of
    /// clients that left: a shutdown waits for both.
    slots: Arc<ClientSlots>,
}

impl Shared {
    /// The configuration in force. A session keeps the one it logged in
    /// with; a reload affects it only through its pool's settings.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// Re-reads the config file and applies it (SIGHUP, admin RELOAD). On
    /// error the current configuration stays. See [`crate::reload`] for
    /// what applies when.
    pub fn reload(&self) -> Result<Reloaded, ReloadError> {
        let Some(path) = &self.config_path else { return Err(ReloadError::NoConfigFile) };
        let _one_at_a_time = self.reload_lock.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.config();
        let result = crate::reload::prepare(&old, path);
        let (new, reloaded) = match result {
            Ok(r) => r,
            Err(e) => {
                self.stats.reloads_failed.fetch_add(1, Ordering::Relaxed);
                // Config errors name file, line and key, never a password's value.
                tracing::error!(path = %path.display(), error = %e, "reload failed; keeping the current configuration");
                return Err(e);
            }
        };
        let new = Arc::new(new);
        self.config.store(new.clone());
        self.pools.reconfigure(&new);
        self.stats.reloads_ok.fetch_add(1, Ordering::Relaxed);
        for key in &reloaded.needs_restart {
            tracing::warn!(key = %key, "setting changed in the file but needs a restart; keeping the current value");
        }
        if reloaded.changes.is_empty() {
            tracing::info!(path = %path.display(), "configuration reloaded; nothing changed");
        }
        for change in &reloaded.changes {
            tracing::info!(change = %change, "configuration reloaded");
        }
        Ok(reloaded)
    }

    /// Starts the same graceful shutdown as SIGTERM.
    pub fn request_shutdown(&self) {
        // notify_one keeps a permit, so a request is never lost.
        self.shutdown_request.notify_one();
    }
}

/// Options of [`run_with`] beyond the configuration itself.
#[derive(Debug, Default)]
pub struct ServerOptions {
    /// The file `config` was loaded from. When set, SIGHUP and the admin
    /// console's RELOAD re-read it; otherwise reloading is refused.
    pub config_path: Option<PathBuf>,
    /// An already bound `/metrics` listener (tests bind port 0 and need to
    /// know the port). When `None`, `[proxy] metrics_listen` is bound if set.
    pub metrics: Option<TcpListener>,
}

/// Serves clients on `listener` until `shutdown` resolves (or an admin runs
/// SHUTDOWN), then drains: stop accepting, let open transactions finish
/// within `shutdown_timeout`, then close everyone with 57P01. Binds
/// `[proxy] metrics_listen` when set. No reloading: see [`run_with`].
pub async fn run(
    config: Arc<Config>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    run_with(config, listener, shutdown, ServerOptions::default()).await
}

/// [`run`] with options: a config file to reload on SIGHUP and RELOAD, a
/// pre-bound metrics listener.
pub async fn run_with(
    config: Arc<Config>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    options: ServerOptions,
) -> std::io::Result<()> {
    let metrics = match (options.metrics, config.proxy.metrics_listen) {
        (Some(l), _) => Some(l),
        (None, Some(addr)) => {
            let l = TcpListener::bind(addr).await?;
            tracing::info!(listen = %l.local_addr()?, "metrics listening");
            Some(l)
        }
        (None, None) => None,
    };
    serve(config, listener, metrics, shutdown, options.config_path).await
}

/// Loads the certificates and keys `[proxy]` names (once, at start).
fn with_tls(config: Arc<Config>) -> std::io::Result<Arc<Config>> {
    let tls = crate::tls::TlsContext::load(&config.proxy)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("TLS: {e}")))?;
    let mut config = Arc::unwrap_or_clone(config);
    config.tls = tls;
    Ok(Arc::new(config))
}

/// [`run`] with the metrics listener already bound, or none at all
/// whatever `metrics_listen` says.
pub async fn run_with_metrics(
    config: Arc<Config>,
    listener: TcpListener,
    metrics: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    serve(config, listener, metrics, shutdown, None).await
}

async fn serve(
    config: Arc<Config>,
    listener: TcpListener,
    metrics: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
    config_path: Option<PathBuf>,
) -> std::io::Result<()> {
    let config = with_tls(config)?;
    let pools = Arc::new(Pools::default());
    pools.prewarm(&config);
    let janitor = tokio::spawn(pools.clone().janitor());
    let shared = Arc::new(Shared {
        config: ArcSwap::new(config),
        config_path,
        reload_lock: std::sync::Mutex::new(()),
        pools: pools.clone(),
        cancels: CancelRegistry::default(),
        clients: ClientRegistry::default(),
        stats: Stats::default(),
        pause: Pause::default(),
        shutdown_request: Notify::new(),
        routing: crate::routing::Routing::default(),
        slots: Arc::default(),
    });
    // Scrapes keep working during the drain; they stop when `run` returns.
    let metrics = metrics.map(|l| tokio::spawn(crate::admin::metrics::serve(l, shared.clone())));
    let sighup = shared.config_path.is_some().then(|| reload_on_sighup(shared.clone()));

    tokio::pin!(shutdown);
    tokio::select! {
        _ = accept_loop(&listener, &shared) => {}
        _ = &mut shutdown => {}
        _ = shared.shutdown_request.notified() => tracing::info!("SHUTDOWN from the admin console"),
    }
    drop(listener);
    // Clients (admin sessions included) learn it through their Signal:
    // idle ones leave now, busy ones at their transaction's end.
    shared.clients.raise_all(crate::admin::registry::Signal::DRAIN);
    if let Some(h) = sighup {
        h.abort();
    }
    let grace = shared.config().proxy.shutdown_timeout;
    let all_gone = shared.slots.all_gone();
    tokio::pin!(all_gone);
    if tokio::time::timeout(grace, &mut all_gone).await.is_err() {
        tracing::info!(remaining = shared.slots.count(), "shutdown_timeout reached; closing");
        shared.clients.raise_all(crate::admin::registry::Signal::FORCE_CLOSE);
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

/// Counts connected clients against `max_client_conn`, read from the
/// configuration in force at each accept (a reload that lowers it refuses
/// newcomers until enough clients have left; nobody is disconnected).
#[derive(Debug, Default)]
struct ClientSlots {
    count: AtomicUsize,
    /// Woken when the count drops to zero.
    empty: Notify,
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
        tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build()
    }
}

/// One connected client; frees its slot when dropped. It is also the
/// client task's handle on [`Shared`].
pub struct ClientSlot(Arc<Shared>);

impl ClientSlot {
    pub fn shared(&self) -> &Shared {
        &self.0
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.slots.release();
    }
}

/// The cleanup of a backend its client left mid-transaction: counted with
/// the clients, so that a shutdown waits for it (bounded by the cleanup's
/// own timeout) instead of ending the process with the query still running.
pub struct Lingering(Arc<ClientSlots>);

impl Shared {
    pub fn lingering(&self) -> Lingering {
        self.slots.count.fetch_add(1, Ordering::AcqRel);
        Lingering(self.slots.clone())
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        self.0.release();
    }
}

impl ClientSlots {
    /// One client or cleanup fewer; wakes the drain when none is left.
    fn release(&self) {
        if self.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.empty.notify_waiters();
        }
    }

    fn try_take(shared: &Arc<Shared>, max: usize) -> Option<ClientSlot> {
        let slots = &shared.slots;
        slots.count.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).ok()?;
        Some(ClientSlot(shared.clone()))
    }

    fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Resolves once no client is connected.
    async fn all_gone(&self) {
        loop {
            let empty = self.empty.notified();
            tokio::pin!(empty);
            // Registered before the check, so a drop to zero in between still wakes us.
            empty.as_mut().enable();
            if self.count() == 0 {
                return;
            }
            empty.await;
        }
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

async fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    let next_id = AtomicU64::new(1);
    let mut backoff = Duration::from_millis(5);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => {
                backoff = Duration::from_millis(5);
                c
            }
            Err(e) => {
                // Usually EMFILE: wait for descriptors to free rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        match ClientSlots::try_take(shared, shared.config.load().proxy.max_client_conn) {
            Some(slot) => {
                tokio::spawn(crate::client::serve(stream, slot, id));
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
}

async fn refuse(mut stream: TcpStream, code: SqlState, text: &'static str) {
    let mut out = BytesMut::new();
    msg::error_response(&mut out, Severity::Fatal, code, text);
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&out)).await;
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        // Without signal handlers the proxy still serves; it just cannot drain on a signal.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}
