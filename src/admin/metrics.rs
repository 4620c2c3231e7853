//! `GET /metrics` in the Prometheus text format (0.0.4).
//!
//! A tiny HTTP/1.1 responder rather than a web framework: one request per
//! connection, answered and closed. The exposition itself is written by
//! `prometheus-client`'s text encoder (names, escaping, histogram series)
//! from a [`Collector`] that reads pgmux's own counters at scrape time:
//! client tasks count with plain atomics ([`super::stats`],
//! [`crate::pool::PoolCounters`]) and never touch the crate's types or locks.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::show::{PoolView, pool_views};
use crate::live::Shared;
use crate::live::stats::{HistogramSnapshot, LATENCY_BOUNDS_US};
use crate::pool::counters::{REASON_SLOTS, reason_label};
use crate::routing::route::Policy;

/// Request heads are small; anything bigger is not a scrape.
const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// A scraper that does not send its request promptly is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves scrapes until the task is aborted (when `server::run` ends).
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let registry = Arc::new(registry(shared));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            if let Err(e) = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &registry)).await.unwrap_or(Ok(())) {
                tracing::debug!(error = %e, "metrics request failed");
            }
        });
    }
}

async fn answer(mut stream: TcpStream, registry: &Registry) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        if head.len() >= MAX_REQUEST_HEAD || stream.read_buf(&mut head).await? == 0 {
            break;
        }
    }
    let response = match request_target(&head) {
        Some(("GET", "/metrics")) => {
            let body = render(registry);
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
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
pub(super) fn request_target(head: &[u8]) -> Option<(&str, &str)> {
    let line = head.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?.trim_end();
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    Some((method, target.split('?').next().unwrap_or(target)))
}

/// The registry `/metrics` encodes: one collector over the whole process.
pub fn registry(shared: Arc<Shared>) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(PgmuxCollector(shared)));
    registry
}

/// The whole exposition, encoded now.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail, and the collector never returns an error of its own.
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, registry) {
        tracing::warn!(error = %e, "metrics encoding failed");
    }
    out
}

/// Reads pgmux's counters at scrape time.
#[derive(Debug)]
struct PgmuxCollector(Arc<Shared>);

type Labels<'a> = Vec<(&'static str, &'a str)>;

/// One metric family: a descriptor, then its samples. Counter names are
/// given without `_total`: the encoder appends it.
fn gauges<'a, V: EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels<'a>, V)>,
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in samples {
        m.encode_family(&labels)?.encode_gauge(&v)?;
    }
    Ok(())
}

fn counters<'a, V: EncodeCounterValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels<'a>, V)>,
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in samples {
        m.encode_family(&labels)?.encode_counter::<Labels<'_>, V, f64>(&v, None)?;
    }
    Ok(())
}

/// Latency histograms, in seconds.
fn histograms<'a>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels<'a>, HistogramSnapshot)>,
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, h) in samples {
        let buckets: Vec<(f64, u64)> =
            LATENCY_BOUNDS_US.iter().map(|&us| us as f64 / 1e6).chain([f64::INFINITY]).zip(h.buckets).collect();
        m.encode_family(&labels)?.encode_histogram::<Labels<'_>>(h.sum_us as f64 / 1e6, h.count, &buckets, None)?;
    }
    Ok(())
}

/// The labels of a pool's node-scoped series. The role keeps them apart
/// after a failover, when a node's replica pool and the primary pool that
/// now follows it both exist.
fn node_labels(v: &PoolView) -> Labels<'_> {
    vec![("database", &v.database), ("user", &v.user), ("node", &v.node), ("role", v.role)]
}

impl Collector for PgmuxCollector {
    /// Every pool gets every state's series (zeros included) so that series
    /// do not appear and vanish with traffic; by-reason and by-class
    /// counters list what occurred.
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let shared = &*self.0;
        let views = pool_views(shared);
        let config = shared.config();

        // Per (database, user): clients belong to the pair, whichever node serves them.
        #[derive(Default)]
        struct PerUser {
            active: usize,
            idle: usize,
            waiting: usize,
            transactions: u64,
        }
        let mut per_user: BTreeMap<(&str, &str), PerUser> = BTreeMap::new();
        for v in &views {
            let p = per_user.entry((&v.database, &v.user)).or_default();
            p.active += v.cl_active;
            p.idle += v.cl_idle;
            p.waiting += v.cl_waiting;
            p.transactions += v.pool.counters().checkouts.load(Ordering::Relaxed);
        }
        gauges(
            &mut enc,
            "pgmux_clients",
            "Logged-in client connections by pool and state (active: holding a server connection).",
            per_user.iter().flat_map(|((db, user), p)| {
                [("active", p.active), ("idle", p.idle), ("waiting", p.waiting)]
                    .map(|(state, n)| (vec![("database", *db), ("user", *user), ("state", state)], n as u64))
            }),
        )?;
        gauges(
            &mut enc,
            "pgmux_server_connections",
            "Server connections by pool, node (primary or replica) and state (login: being opened or cleaned up).",
            views.iter().flat_map(|v| {
                [("active", v.sv_active), ("idle", v.sv_idle), ("login", v.sv_login())].map(|(state, n)| {
                    let mut labels = node_labels(v);
                    labels.push(("state", state));
                    (labels, n as u64)
                })
            }),
        )?;
        gauges(
            &mut enc,
            "pgmux_io_uring_sockets",
            "Client and server connections whose bytes go through io_uring ([proxy] io = \"uring\").",
            [(Vec::new(), crate::net::uring::sockets())],
        )?;
        gauges(
            &mut enc,
            "pgmux_pool_waiting_clients",
            "Clients waiting for a server connection (queued in the pool or held by PAUSE).",
            per_user.iter().map(|((db, user), p)| (vec![("database", *db), ("user", *user)], p.waiting as u64)),
        )?;
        counters(
            &mut enc,
            "pgmux_transactions",
            "Server connection checkouts, all nodes of the pool: one per transaction in transaction mode, per session in session mode.",
            per_user.iter().map(|((db, user), p)| (vec![("database", *db), ("user", *user)], p.transactions)),
        )?;
        let by_reason = |pick: fn(&crate::pool::PoolCounters) -> &[std::sync::atomic::AtomicU64; REASON_SLOTS]| {
            let mut out = Vec::new();
            for v in &views {
                for (i, n) in pick(v.pool.counters()).iter().enumerate() {
                    let n = n.load(Ordering::Relaxed);
                    if n > 0 {
                        let mut labels = node_labels(v);
                        labels.push(("reason", reason_label(i)));
                        out.push((labels, n));
                    }
                }
            }
            out
        };
        counters(
            &mut enc,
            "pgmux_node_transactions",
            "Transactions by node and the routing decision that sent them there (unrouted: the database has no read/write split).",
            by_reason(|c| &c.xacts_by_reason),
        )?;
        counters(
            &mut enc,
            "pgmux_node_queries",
            "Requests answered with ReadyForQuery, by node and the routing decision of their transaction.",
            by_reason(|c| &c.queries_by_reason),
        )?;
        histograms(
            &mut enc,
            "pgmux_pool_wait_seconds",
            "Time clients spent getting a server connection from the pool (waiting or connecting), by node.",
            views.iter().map(|v| (node_labels(v), v.pool.counters().wait.snapshot())),
        )?;
        histograms(
            &mut enc,
            "pgmux_transaction_duration_seconds",
            "Time a client held a server connection (one transaction in transaction mode), by node.",
            views.iter().map(|v| (node_labels(v), v.pool.counters().xact.snapshot())),
        )?;
        histograms(
            &mut enc,
            "pgmux_query_duration_seconds",
            "Time from a request reaching the server to its ReadyForQuery, by node.",
            views.iter().map(|v| (node_labels(v), v.pool.counters().query.snapshot())),
        )?;
        counters(
            &mut enc,
            "pgmux_bytes_in",
            "Bytes clients sent while linked to a server connection of the node.",
            views.iter().map(|v| (node_labels(v), v.pool.counters().bytes_in.load(Ordering::Relaxed))),
        )?;
        counters(
            &mut enc,
            "pgmux_bytes_out",
            "Bytes of server answers forwarded to clients, by node.",
            views.iter().map(|v| (node_labels(v), v.pool.counters().bytes_out.load(Ordering::Relaxed))),
        )?;
        counters(
            &mut enc,
            "pgmux_prepared_cache_hits",
            "Bind/Describe of a named prepared statement the server connection already had.",
            views.iter().map(|v| (node_labels(v), v.pool.counters().prepared_hits.load(Ordering::Relaxed))),
        )?;
        counters(
            &mut enc,
            "pgmux_prepared_cache_misses",
            "Bind/Describe of a named prepared statement pgmux first had to prepare on the server connection.",
            views.iter().map(|v| (node_labels(v), v.pool.counters().prepared_misses.load(Ordering::Relaxed))),
        )?;
        counters(
            &mut enc,
            "pgmux_prepared_binds",
            "Binds of a client's named prepared statement, by node (SHOW STATS bind_count).",
            views.iter().map(|v| (node_labels(v), v.pool.counters().binds.load(Ordering::Relaxed))),
        )?;
        // Named statements belong to the (database, user), whichever node parses them.
        let mut parses: BTreeMap<(&str, &str), (u64, u64)> = BTreeMap::new();
        for v in &views {
            let tally = v.pool.statements.tally();
            let p = parses.entry((&v.database, &v.user)).or_default();
            p.0 += tally.client_parses.load(Ordering::Relaxed);
            p.1 += tally.server_parses.load(Ordering::Relaxed);
        }
        counters(
            &mut enc,
            "pgmux_prepared_client_parses",
            "Named prepared statements clients created (SHOW STATS client_parse_count).",
            parses.iter().map(|((db, user), p)| (vec![("database", *db), ("user", *user)], p.0)),
        )?;
        counters(
            &mut enc,
            "pgmux_prepared_server_parses",
            "Named prepared statements servers parsed for pgmux (SHOW STATS server_parse_count).",
            parses.iter().map(|((db, user), p)| (vec![("database", *db), ("user", *user)], p.1)),
        )?;
        let classes = shared.stats.errors.nonzero();
        counters(
            &mut enc,
            "pgmux_errors",
            "ErrorResponses servers sent to clients, by SQLSTATE class (its first two characters).",
            classes.iter().map(|(class, n)| (vec![("class", class.as_str())], *n)),
        )?;

        counters(
            &mut enc,
            "pgmux_client_connections",
            "Client connections accepted (cancel requests and failed logins included).",
            [(vec![], shared.stats.client_connections.load(Ordering::Relaxed))],
        )?;
        counters(
            &mut enc,
            "pgmux_auth_failures",
            "Client logins refused for a wrong password or an unknown user.",
            [(vec![], shared.stats.auth_failures.load(Ordering::Relaxed))],
        )?;
        counters(
            &mut enc,
            "pgmux_routed",
            "Requests of databases with replicas, by where they went and why (read = served by a replica).",
            crate::routing::route::RouteReason::ALL
                .iter()
                .map(|r| (vec![("reason", r.as_str())], shared.routing.counted(*r))),
        )?;

        // Node roles and replica state, from the topologies' monitors.
        let policy = Policy::new(&config.routing);
        let topologies = shared.routing.topologies();
        let mut lag_bytes = Vec::new();
        let mut lag_seconds = Vec::new();
        let mut in_rotation = Vec::new();
        let mut up = Vec::new();
        let mut roles = Vec::new();
        let mut fenced = Vec::new();
        let mut timelines = Vec::new();
        for t in &topologies {
            for n in t.report(&policy) {
                let labels = vec![("database", t.db.as_str()), ("node", n.addr)];
                if let Some(lag) = n.lag_bytes {
                    lag_bytes.push((labels.clone(), lag));
                }
                if n.view.healthy && n.view.in_recovery {
                    lag_seconds.push((labels.clone(), n.view.replay_delay.as_secs_f64()));
                }
                if !n.is_primary {
                    in_rotation.push((labels.clone(), u64::from(n.out_of_rotation.is_none())));
                }
                up.push((labels.clone(), u64::from(n.view.healthy)));
                fenced.push((labels.clone(), u64::from(n.state == "fenced")));
                timelines.push((labels.clone(), u64::from(n.view.timeline)));
                for role in ["primary", "replica"] {
                    let mut l = labels.clone();
                    l.push(("role", role));
                    let is = if role == "primary" { n.is_primary } else { n.view.healthy && n.view.in_recovery };
                    roles.push((l, u64::from(is)));
                }
            }
        }
        gauges(
            &mut enc,
            "pgmux_replica_lag_bytes",
            "How far each monitored replica's replay is behind the primary's insert position.",
            lag_bytes,
        )?;
        gauges(
            &mut enc,
            "pgmux_replica_lag_seconds",
            "How long ago the last transaction a replica replayed committed on the primary (0 when replay has caught up).",
            lag_seconds,
        )?;
        gauges(
            &mut enc,
            "pgmux_replica_in_rotation",
            "1 when a node other than the primary takes reads now (up, in recovery on the primary's timeline, within max_replica_lag).",
            in_rotation,
        )?;
        gauges(&mut enc, "pgmux_node_up", "1 when a monitored node answered its last health check.", up)?;
        gauges(
            &mut enc,
            "pgmux_node_role",
            "1 for the node's current role: primary (the one pgmux writes to) or replica (in recovery).",
            roles,
        )?;
        gauges(
            &mut enc,
            "pgmux_node_fenced",
            "1 when a node accepts writes but is not the primary pgmux follows (split brain): it gets no writes and no reads.",
            fenced,
        )?;
        gauges(&mut enc, "pgmux_node_timeline", "The timeline each node is on (0: not known yet).", timelines)?;
        counters(
            &mut enc,
            "pgmux_primary_changes",
            "Times the primary of a database moved to another node.",
            topologies.iter().map(|t| (vec![("database", t.db.as_str())], t.primary_changes())),
        )?;

        let pins = crate::vocab::reasons::PinReason::ALL;
        counters(
            &mut enc,
            "pgmux_pinned_clients",
            "Clients pinned to their server connection for the rest of their session, by the session state that required it.",
            pins.iter()
                .zip(&shared.stats.pinned)
                .map(|(r, n)| (vec![("reason", r.as_str())], n.load(Ordering::Relaxed))),
        )?;
        counters(
            &mut enc,
            "pgmux_session_state_refused",
            "Statements refused because on_session_state = \"error\", by kind.",
            pins.iter()
                .zip(&shared.stats.session_state_refused)
                .map(|(r, n)| (vec![("reason", r.as_str())], n.load(Ordering::Relaxed))),
        )?;
        let timeouts: u64 = views.iter().map(|v| v.pool.counters().wait_timeouts.load(Ordering::Relaxed)).sum();
        counters(
            &mut enc,
            "pgmux_pool_wait_timeouts",
            "Requests that got no server connection within query_wait_timeout.",
            [(vec![], timeouts)],
        )?;
        counters(
            &mut enc,
            "pgmux_cancel_requests",
            "CancelRequests received: for a client here (local), sent on to the peer that issued the key (forwarded), or for nobody (dropped: no such key, a peer not listed, or forwarded already).",
            crate::live::cancel::CancelOutcome::ALL
                .iter()
                .zip(&shared.stats.cancel_requests)
                .map(|(o, n)| (vec![("result", o.as_str())], n.load(Ordering::Relaxed))),
        )?;
        counters(
            &mut enc,
            "pgmux_config_reloads",
            "Configuration reloads (SIGHUP, admin RELOAD): applied (ok) or refused for an unreadable or invalid file (failed).",
            [("ok", &shared.stats.reloads_ok), ("failed", &shared.stats.reloads_failed)]
                .map(|(result, n)| (vec![("result", result)], n.load(Ordering::Relaxed))),
        )?;
        Ok(())
    }
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

    /// The encoder's output for one family of each kind, exactly.
    #[test]
    fn families_encode_in_the_text_format() {
        #[derive(Debug)]
        struct Fixed;
        impl Collector for Fixed {
            fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
                counters(&mut enc, "m", "help", [(vec![("a", "x\"y\\z\nw")], 3u64)])?;
                let h = crate::live::stats::Histogram::default();
                h.observe_us(70);
                h.observe_us(20_000_000);
                histograms(&mut enc, "h_seconds", "hist", [(vec![("n", "1")], h.snapshot())])
            }
        }
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Fixed));
        let out = render(&registry);
        assert!(
            out.starts_with("# HELP m_total help\n# TYPE m_total counter\nm_total{a=\"x\\\"y\\\\z\\nw\"} 3\n"),
            "{out}"
        );
        assert!(out.contains("# TYPE h_seconds histogram\n"), "{out}");
        assert!(out.contains("h_seconds_bucket{n=\"1\",le=\"5e-05\"} 0\n"), "{out}");
        assert!(out.contains("h_seconds_bucket{n=\"1\",le=\"0.0001\"} 1\n"), "{out}");
        assert!(out.contains("h_seconds_bucket{n=\"1\",le=\"10\"} 1\n"), "{out}");
        assert!(out.contains("h_seconds_bucket{n=\"1\",le=\"+Inf\"} 2\n"), "{out}");
        assert!(out.contains("h_seconds_sum{n=\"1\"} 20.00007\n"), "{out}");
        assert!(out.contains("h_seconds_count{n=\"1\"} 2\n"), "{out}");
    }
}
