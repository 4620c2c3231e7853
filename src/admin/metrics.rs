//! `GET /metrics` in the Prometheus text format (0.0.4).
//!
//! A tiny HTTP/1.1 responder rather than a web framework: one request per
//! connection, answered and closed. The text format is written directly
//! (HELP, TYPE, samples with escaped labels); it is simple, and a crate for
//! it would bring a registry abstraction pgmux does not need.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::show::pool_views;
use crate::server::Shared;

/// Request heads are small; anything bigger is not a scrape.
const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// A scraper that does not send its request promptly is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves scrapes until the task is aborted (when `server::run` ends).
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &shared)).await.unwrap_or(Ok(())) {
                tracing::debug!(error = %e, "metrics request failed");
            }
        });
    }
}

async fn answer(mut stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        if head.len() >= MAX_REQUEST_HEAD || stream.read_buf(&mut head).await? == 0 {
            break;
        }
    }
    let response = match request_target(&head) {
        Some(("GET", "/metrics")) => {
            let body = render(shared);
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
        }
        _ => "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 10\r\n\
              Connection: close\r\n\r\nnot found\n"
            .to_owned(),
    };
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Method and path (query string dropped) of an HTTP request line.
fn request_target(head: &[u8]) -> Option<(&str, &str)> {
    let line = head.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?.trim_end();
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    Some((method, target.split('?').next().unwrap_or(target)))
}

/// Label values escaped per the text format: backslash, quote, newline.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: u64) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{k}=\"{}\"", escape(v));
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

/// The whole exposition. Every pool gets every state's series (zeros
/// included) so that series do not appear and vanish with traffic.
pub fn render(shared: &Shared) -> String {
    let views = pool_views(shared);
    let mut out = String::new();

    header(
        &mut out,
        "pgmux_clients",
        "gauge",
        "Logged-in client connections by pool and state (active: holding a server connection).",
    );
    for v in &views {
        for (state, n) in [("active", v.cl_active), ("idle", v.cl_idle), ("waiting", v.cl_waiting)] {
            sample(
                &mut out,
                "pgmux_clients",
                &[("database", &v.database), ("user", &v.user), ("state", state)],
                n as u64,
            );
        }
    }

    header(
        &mut out,
        "pgmux_server_connections",
        "gauge",
        "Server connections by pool and state (login: being opened or cleaned up).",
    );
    for v in &views {
        for (state, n) in [("active", v.sv_active), ("idle", v.sv_idle), ("login", v.sv_login())] {
            let labels = [("database", v.database.as_str()), ("user", v.user.as_str()), ("state", state)];
            sample(&mut out, "pgmux_server_connections", &labels, n as u64);
        }
    }

    header(
        &mut out,
        "pgmux_pool_waiting_clients",
        "gauge",
        "Clients waiting for a server connection (queued in the pool or held by PAUSE).",
    );
    for v in &views {
        sample(
            &mut out,
            "pgmux_pool_waiting_clients",
            &[("database", &v.database), ("user", &v.user)],
            v.cl_waiting as u64,
        );
    }

    header(
        &mut out,
        "pgmux_transactions_total",
        "counter",
        "Server connection checkouts: one per transaction in transaction mode, per session in session mode.",
    );
    for v in &views {
        let n = v.pool.counters().checkouts.load(Ordering::Relaxed);
        sample(&mut out, "pgmux_transactions_total", &[("database", &v.database), ("user", &v.user)], n);
    }

    header(
        &mut out,
        "pgmux_client_connections_total",
        "counter",
        "Client connections accepted (cancel requests and failed logins included).",
    );
    sample(&mut out, "pgmux_client_connections_total", &[], shared.stats.client_connections.load(Ordering::Relaxed));

    header(
        &mut out,
        "pgmux_auth_failures_total",
        "counter",
        "Client logins refused for a wrong password or an unknown user.",
    );
    sample(&mut out, "pgmux_auth_failures_total", &[], shared.stats.auth_failures.load(Ordering::Relaxed));

    header(
        &mut out,
        "pgmux_routed_total",
        "counter",
        "Requests of databases with replicas, by where they went and why (read = served by a replica).",
    );
    for reason in crate::routing::route::RouteReason::ALL {
        sample(&mut out, "pgmux_routed_total", &[("reason", reason.as_str())], shared.routing.counted(reason));
    }
    header(
        &mut out,
        "pgmux_replica_lag_bytes",
        "gauge",
        "How far each monitored replica's replay is behind the primary's insert position.",
    );
    let nodes = shared.routing.nodes();
    for ((db, addr), node) in &nodes {
        let v = node.view();
        if !v.in_recovery {
            continue;
        }
        let primary = nodes.iter().find(|((d, _), n)| d == db && !n.view().in_recovery && n.view().healthy);
        if let Some((_, p)) = primary {
            let lag = p.view().lsn.saturating_sub(v.lsn);
            sample(&mut out, "pgmux_replica_lag_bytes", &[("database", db), ("node", addr)], lag);
        }
    }
    header(&mut out, "pgmux_node_up", "gauge", "1 when a monitored node answered its last health check.");
    for ((db, addr), node) in &nodes {
        sample(&mut out, "pgmux_node_up", &[("database", db), ("node", addr)], u64::from(node.view().healthy));
    }

    header(
        &mut out,
        "pgmux_pinned_clients_total",
        "counter",
        "Clients pinned to their server connection for the rest of their session, by the session state that required it.",
    );
    for (i, reason) in crate::client::pinning::PinReason::ALL.iter().enumerate() {
        sample(
            &mut out,
            "pgmux_pinned_clients_total",
            &[("reason", reason.as_str())],
            shared.stats.pinned[i].load(Ordering::Relaxed),
        );
    }
    header(
        &mut out,
        "pgmux_session_state_refused_total",
        "counter",
        "Statements refused because on_session_state = \"error\", by kind.",
    );
    for (i, reason) in crate::client::pinning::PinReason::ALL.iter().enumerate() {
        sample(
            &mut out,
            "pgmux_session_state_refused_total",
            &[("reason", reason.as_str())],
            shared.stats.session_state_refused[i].load(Ordering::Relaxed),
        );
    }

    header(
        &mut out,
        "pgmux_pool_wait_timeouts_total",
        "counter",
        "Requests that got no server connection within query_wait_timeout.",
    );
    let timeouts: u64 = views.iter().map(|v| v.pool.counters().wait_timeouts.load(Ordering::Relaxed)).sum();
    sample(&mut out, "pgmux_pool_wait_timeouts_total", &[], timeouts);

    header(
        &mut out,
        "pgmux_config_reloads_total",
        "counter",
        "Configuration reloads (SIGHUP, admin RELOAD): applied (ok) or refused for an unreadable or invalid file (failed).",
    );
    for (result, n) in [("ok", &shared.stats.reloads_ok), ("failed", &shared.stats.reloads_failed)] {
        sample(&mut out, "pgmux_config_reloads_total", &[("result", result)], n.load(Ordering::Relaxed));
    }

    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_line_parses() {
        assert_eq!(request_target(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), Some(("GET", "/metrics")));
        assert_eq!(request_target(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"), Some(("GET", "/metrics")));
        assert_eq!(request_target(b"garbage"), None);
    }

    #[test]
    fn labels_are_escaped() {
        let mut out = String::new();
        sample(&mut out, "m", &[("a", "x\"y\\z\nw")], 3);
        assert_eq!(out, "m{a=\"x\\\"y\\\\z\\nw\"} 3\n");
    }
}
