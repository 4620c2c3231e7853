//! Listener, accept loop, shutdown and drain.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, watch};

use crate::admin::pause::Pause;
use crate::admin::registry::ClientRegistry;
use crate::admin::stats::Stats;
use crate::client::cancel::CancelRegistry;
use crate::config::Config;
use crate::pool::Pools;
use crate::protocol::backend::{self as msg, Severity};
use crate::protocol::sqlstate::SqlState;

/// State every client task shares. Read-only apart from the registries' own
/// interior locking.
#[derive(Debug)]
pub struct Shared {
    config: Arc<Config>,
    pub pools: Arc<Pools>,
    pub cancels: CancelRegistry,
    /// Becomes true on shutdown: finish the current transaction, take no new one.
    pub draining: watch::Receiver<bool>,
    /// Becomes true when `shutdown_timeout` runs out: close everything now.
    pub force_close: watch::Receiver<bool>,
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
}

impl Shared {
    pub fn config(&self) -> Arc<Config> {
        self.config.clone()
    }

    /// Starts the same graceful shutdown as SIGTERM.
    pub fn request_shutdown(&self) {
        // notify_one keeps a permit, so a request is never lost.
        self.shutdown_request.notify_one();
    }
}

/// Serves clients on `listener` until `shutdown` resolves (or an admin runs
/// SHUTDOWN), then drains: stop accepting, let open transactions finish
/// within `shutdown_timeout`, then close everyone with 57P01. Binds
/// `[proxy] metrics_listen` when set.
pub async fn run(
    config: Arc<Config>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let metrics = match config.proxy.metrics_listen {
        Some(addr) => {
            let l = TcpListener::bind(addr).await?;
            tracing::info!(listen = %l.local_addr()?, "metrics listening");
            Some(l)
        }
        None => None,
    };
    run_with_metrics(config, listener, metrics, shutdown).await
}

/// [`run`] with the metrics listener already bound (tests bind port 0 and
/// need to know the port).
pub async fn run_with_metrics(
    config: Arc<Config>,
    listener: TcpListener,
    metrics: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let (draining_tx, draining) = watch::channel(false);
    let (force_tx, force_close) = watch::channel(false);
    let pools = Arc::new(Pools::default());
    pools.prewarm(&config);
    let janitor = tokio::spawn(pools.clone().janitor());
    let max_clients = config.proxy.max_client_conn;
    let shared = Arc::new(Shared {
        config,
        pools: pools.clone(),
        cancels: CancelRegistry::default(),
        draining,
        force_close,
        clients: ClientRegistry::default(),
        stats: Stats::default(),
        pause: Pause::default(),
        shutdown_request: Notify::new(),
        routing: crate::routing::Routing::default(),
    });
    let permits = Arc::new(Semaphore::new(max_clients));
    // Scrapes keep working during the drain; they stop when `run` returns.
    let metrics = metrics.map(|l| tokio::spawn(crate::admin::metrics::serve(l, shared.clone())));

    tokio::pin!(shutdown);
    tokio::select! {
        _ = accept_loop(&listener, &shared, &permits) => {}
        _ = &mut shutdown => {}
        _ = shared.shutdown_request.notified() => tracing::info!("SHUTDOWN from the admin console"),
    }
    drop(listener);
    let _ = draining_tx.send(true);
    let grace = shared.config.proxy.shutdown_timeout;
    let all_gone = permits.acquire_many(max_clients as u32);
    tokio::pin!(all_gone);
    if tokio::time::timeout(grace, &mut all_gone).await.is_err() {
        tracing::info!(remaining = max_clients - permits.available_permits(), "shutdown_timeout reached; closing");
        let _ = force_tx.send(true);
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

async fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>, permits: &Arc<Semaphore>) {
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
        match permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let shared = shared.clone();
                tokio::spawn(async move {
                    crate::client::serve(stream, shared, id).await;
                    drop(permit);
                });
            }
            Err(_) => {
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
