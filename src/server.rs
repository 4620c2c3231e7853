//! Listener, accept loop, shutdown and drain.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use crate::config::Config;
use crate::live::Shared;
use crate::live::registry::Signal;
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
}

/// Serves clients on `listener` until `shutdown` resolves (or an admin runs
/// SHUTDOWN), then drains: stop accepting, let open transactions finish
/// within `shutdown_timeout`, then close everyone with 57P01.
pub async fn run(
    config: Arc<Config>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    options: Options,
) -> std::io::Result<()> {
    let Options { config_path, metrics } = options;
    let config = Settings::build(Arc::unwrap_or_clone(config))
        .map(Arc::new)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("TLS: {e}")))?;
    let pools = Arc::new(Pools::default());
    pools.prewarm(&config);
    let janitor = tokio::spawn(pools.clone().janitor());
    let config_reloadable = config_path.is_some();
    let shared = Arc::new(Shared::new(config, pools.clone(), config_path));
    // Scrapes keep working during the drain; they stop when `run` returns.
    let metrics = metrics.map(|l| tokio::spawn(crate::admin::metrics::serve(l, shared.clone())));
    let sighup = config_reloadable.then(|| reload_on_sighup(shared.clone()));

    tokio::pin!(shutdown);
    tokio::select! {
        _ = accept_loop(&listener, &shared) => {}
        _ = &mut shutdown => {}
        _ = shared.shutdown_requested() => tracing::info!("SHUTDOWN from the admin console"),
    }
    drop(listener);
    if shared.waits_for_clients() {
        tracing::info!(
            clients = shared.connected(),
            "not accepting clients; exiting once the connected ones have left"
        );
        tokio::select! {
            _ = shared.all_gone() => {}
            // A SIGTERM meanwhile drains them after all.
            _ = &mut shutdown => tracing::info!("draining the remaining clients"),
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
        // SUSPENDed: connections wait in the listen queue until RESUME.
        if shared.is_suspended() {
            shared.not_suspended().await;
        }
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
        match shared.take_slot() {
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
