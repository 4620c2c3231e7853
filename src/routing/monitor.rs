//! Per-node health and WAL position sampling.
//!
//! One task per (database, node) polls `pg_is_in_recovery()` and the WAL
//! position — `pg_current_wal_insert_lsn()` on the primary,
//! `pg_last_wal_replay_lsn()` and replay delay on replicas — every
//! `monitor_interval`, and publishes a [`NodeView`] that routing reads
//! without awaiting anything.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What routing knows about a node right now. Cheap to copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeView {
    pub healthy: bool,
    pub in_recovery: bool,
    /// Insert LSN (primary) or replay LSN (replica) of the last sample.
    pub lsn: u64,
    /// When the last sample's query was *sent*: its LSN is at least the
    /// position of everything committed before then.
    pub sampled_at: Option<Instant>,
    /// Replica only: how long ago the last replayed transaction committed on
    /// the primary, or zero when replay has caught up with what it received.
    pub replay_delay: Duration,
    /// The primary's insert timeline, or the timeline a replica receives
    /// (0: unknown). Positions compare only within one timeline.
    pub timeline: u32,
}

impl NodeView {
    pub const UNKNOWN: NodeView = NodeView {
        healthy: false,
        in_recovery: false,
        lsn: 0,
        sampled_at: None,
        replay_delay: Duration::ZERO,
        timeline: 0,
    };
}

/// Shared between a monitor task (writer) and routing (readers).
#[derive(Debug)]
pub struct NodeState {
    pub addr: String,
    view: Mutex<NodeView>,
    /// Set when the monitor gives up (database removed, shutdown).
    stopped: AtomicBool,
    /// Woken when a sample fails: requests waiting on this node give up on it.
    down: tokio::sync::Notify,
    /// A read waits for this node's position: sample now, not at the next tick.
    wanted: tokio::sync::Notify,
    /// Woken after every sample, for the reads waiting on a position.
    sampled: tokio::sync::Notify,
}

impl NodeState {
    pub fn new(addr: &str) -> Arc<NodeState> {
        Arc::new(NodeState {
            addr: addr.to_owned(),
            view: Mutex::new(NodeView::UNKNOWN),
            stopped: AtomicBool::new(false),
            down: tokio::sync::Notify::new(),
            wanted: tokio::sync::Notify::new(),
            sampled: tokio::sync::Notify::new(),
        })
    }

    pub fn view(&self) -> NodeView {
        *self.view.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, v: NodeView) {
        *self.view.lock().unwrap_or_else(|e| e.into_inner()) = v;
        self.sampled.notify_waiters();
    }

    /// The node's first sample sent after `after` (waiting at most until
    /// `deadline`), asked for at once. Reads arriving while a sample is in
    /// flight all wait for the next one: one query per batch of reads.
    pub async fn sample_after(&self, after: Instant, deadline: tokio::time::Instant) -> Option<NodeView> {
        self.ask_until(deadline, |v| (v.healthy && v.sampled_at.is_some_and(|t| t > after)).then_some(*v)).await
    }

    /// Whether the node has replayed past `lsn` of `timeline`, asking it
    /// again at once (not at the next tick) until it has or `deadline`
    /// passes; a node that fails a sample meanwhile has not.
    pub async fn replayed_past(&self, timeline: u32, lsn: u64, deadline: tokio::time::Instant) -> bool {
        let has = |v: &NodeView| v.in_recovery && v.timeline == timeline && v.lsn >= lsn;
        self.ask_until(deadline, |v| if v.healthy { has(v).then_some(true) } else { Some(false) }).await == Some(true)
    }

    /// The first answer `decide` gives on the node's view, asking for a
    /// sample at once (not at the next tick) after each view it declines,
    /// until `deadline`. Concurrent waiters share each sample: one taken
    /// while others wait serves them all, so a read waits about one round
    /// trip (plus, for a replay position, the node's real replay latency)
    /// however many reads wait.
    async fn ask_until<T>(
        &self,
        deadline: tokio::time::Instant,
        mut decide: impl FnMut(&NodeView) -> Option<T>,
    ) -> Option<T> {
        loop {
            // Registered before the view is read: a sample published in
            // between still wakes this waiter.
            let sampled = self.sampled.notified();
            tokio::pin!(sampled);
            sampled.as_mut().enable();
            if let Some(answer) = decide(&self.view()) {
                return Some(answer);
            }
            if self.stopped.load(Ordering::Relaxed) {
                return None;
            }
            self.wanted.notify_one();
            tokio::select! {
                _ = sampled => {}
                _ = tokio::time::sleep_until(deadline) => return None,
            }
        }
    }

    /// Takes the node out of the rotation: new requests go elsewhere.
    fn mark_unhealthy(&self) {
        self.view.lock().unwrap_or_else(|e| e.into_inner()).healthy = false;
        self.sampled.notify_waiters();
    }

    /// The node is lost, not just slow: its connection broke, or a new one
    /// could not be made after a sample timed out. Requests waiting on it
    /// give up. A single slow sample (a loaded replica) only takes it out of
    /// the rotation: under a soak on two cores that happened every minute,
    /// and failing every read in flight each time would cost more than the
    /// wait.
    fn mark_lost(&self) {
        self.mark_unhealthy();
        self.down.notify_waiters();
    }

    /// Resolves once the monitor marks the node lost.
    pub async fn went_down(&self) {
        self.down.notified().await;
    }

    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
    }
}

/// The `application_name` monitor sessions show in `pg_stat_activity`.
pub const MONITOR_APPLICATION_NAME: &str = "pgmux monitor";

/// How the monitor logs in.
#[derive(Debug, Clone)]
pub struct MonitorLogin {
    pub user: String,
    pub credential: Option<crate::auth::Credential>,
    pub dbname: String,
    pub tls: crate::tls::BackendTls,
    pub keepalive: Option<crate::config::TcpKeepalive>,
}

/// In recovery, the timeline comes from the WAL receiver (0 while it
/// (re)connects, so not then), which shows it only
/// to roles with `pg_read_all_stats` (`pg_monitor`); without, from the last
/// restartpoint, which lags (a re-pointed replica rejoins the rotation only
/// after its first restartpoint on the new timeline) but never claims a
/// timeline the replica has not reached. On a primary, the insert
/// timeline is the first field of the current WAL file's name.
const SAMPLE_SQL: &str = "SELECT pg_catalog.pg_is_in_recovery(), \
     CASE WHEN pg_catalog.pg_is_in_recovery() THEN pg_catalog.pg_last_wal_replay_lsn() \
          ELSE pg_catalog.pg_current_wal_insert_lsn() END, \
     CASE WHEN NOT pg_catalog.pg_is_in_recovery() \
            OR pg_catalog.pg_last_wal_receive_lsn() = pg_catalog.pg_last_wal_replay_lsn() THEN 0 \
          ELSE COALESCE(EXTRACT(EPOCH FROM now() - pg_catalog.pg_last_xact_replay_timestamp()) * 1000, 0) END, \
     CASE WHEN pg_catalog.pg_is_in_recovery() THEN COALESCE( \
            (SELECT NULLIF(received_tli, 0) FROM pg_catalog.pg_stat_wal_receiver), \
            (SELECT timeline_id FROM pg_catalog.pg_control_checkpoint())) END, \
     CASE WHEN NOT pg_catalog.pg_is_in_recovery() \
          THEN pg_catalog.pg_walfile_name(pg_catalog.pg_current_wal_insert_lsn()) END";

/// The timeline in a WAL file name (`000000020000000000000003` → 2).
pub fn walfile_timeline(name: &str) -> Option<u32> {
    u32::from_str_radix(name.get(..8)?, 16).ok()
}

/// Polls `state`'s node until stopped. Reconnects after failures; a failed or
/// slow sample takes the node out of the rotation at once, and a broken
/// connection or a failed reconnect marks it lost.
pub async fn run(state: Arc<NodeState>, login: MonitorLogin, interval: Duration) {
    let interval = interval.max(Duration::from_millis(1));
    while !state.stopped.load(Ordering::Relaxed) {
        let mut conn = match connect(&state.addr, &login).await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(addr = %state.addr, error = %e, "monitor cannot connect");
                state.mark_lost();
                tokio::time::sleep(interval.max(Duration::from_millis(100))).await;
                continue;
            }
        };
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A position-only sample could not be had: the full one, at once.
        let mut full_next = false;
        while !state.stopped.load(Ordering::Relaxed) {
            // The next sample at the tick, or at once for a waiting read:
            // then only the position, which is all a waiting read needs and
            // costs the node a fraction of the full sample (under a write
            // load, waiting reads ask for one back to back).
            let on_demand = full_next
                || tokio::select! {
                    _ = tick.tick() => false,
                    _ = state.wanted.notified() => true,
                };
            let prev = state.view();
            let position_only = on_demand && !full_next && prev.healthy;
            full_next = false;
            let sql = match (position_only, prev.in_recovery) {
                (false, _) => SAMPLE_SQL,
                (true, true) => "SELECT pg_catalog.pg_last_wal_replay_lsn()",
                (true, false) => "SELECT pg_catalog.pg_current_wal_insert_lsn()",
            };
            let sent = Instant::now();
            // A node that takes more than a second to answer a trivial query
            // is not one to send reads to.
            let sample = tokio::time::timeout(Duration::from_secs(1), conn.query_row(sql)).await;
            match sample {
                Ok(Ok((row, None))) if position_only => {
                    match row.first().and_then(|v| v.as_deref()).and_then(parse_lsn) {
                        Some(lsn) => state.publish(NodeView { lsn, sampled_at: Some(sent), ..prev }),
                        None => full_next = true,
                    }
                }
                // The node's role changed since the last sample (a primary's
                // position function fails in recovery): the full sample says how.
                Ok(Ok((_, Some(_)))) if position_only => full_next = true,
                Ok(Ok((row, None))) => match parse_sample(&row) {
                    Some((in_recovery, lsn, delay, timeline)) => state.publish(NodeView {
                        healthy: true,
                        in_recovery,
                        lsn,
                        sampled_at: Some(sent),
                        replay_delay: delay,
                        timeline,
                    }),
                    None => state.mark_unhealthy(),
                },
                // The connection broke: the node is lost.
                Ok(_) => {
                    tracing::debug!(addr = %state.addr, "monitor sample failed; reconnecting");
                    state.mark_lost();
                    break;
                }
                // Slow: out of the rotation; lost only if a new connection fails too.
                Err(_) => {
                    tracing::debug!(addr = %state.addr, "monitor sample timed out; reconnecting");
                    state.mark_unhealthy();
                    break;
                }
            }
        }
    }
}

async fn connect(addr: &str, login: &MonitorLogin) -> std::io::Result<crate::pool::Backend> {
    let params = crate::pool::backend::LoginParams {
        addr,
        user: &login.user,
        dbname: &login.dbname,
        credential: login.credential.as_ref(),
        connect_timeout: Duration::from_secs(2),
        keepalive: login.keepalive,
        // Named, so operators (and pg_stat_activity queries) can tell it from pooled sessions.
        params: &[("application_name", MONITOR_APPLICATION_NAME)],
        tls: &login.tls,
    };
    crate::pool::Backend::connect(&params).await.map_err(std::io::Error::other)
}

fn parse_sample(row: &[Option<String>]) -> Option<(bool, u64, Duration, u32)> {
    let in_recovery = row.first()?.as_deref()? == "t";
    let lsn = parse_lsn(row.get(1)?.as_deref()?)?;
    let delay_ms: f64 = row.get(2)?.as_deref()?.parse().ok()?;
    let timeline = match (row.get(3).and_then(|v| v.as_deref()), row.get(4).and_then(|v| v.as_deref())) {
        (Some(tli), _) => tli.parse().ok()?,
        (None, Some(walfile)) => walfile_timeline(walfile)?,
        (None, None) => 0,
    };
    Some((in_recovery, lsn, Duration::from_micros((delay_ms.max(0.0) * 1000.0) as u64), timeline))
}

/// `16/B374D848` → 0x16_B374D848.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_parses() {
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(parse_lsn("x/1"), None);
        assert_eq!(parse_lsn("12"), None);
    }

    #[test]
    fn sample_parses() {
        let row = vec![
            Some("t".to_owned()),
            Some("0/3000148".to_owned()),
            Some("12.5".to_owned()),
            Some("3".to_owned()),
            None,
        ];
        assert_eq!(parse_sample(&row), Some((true, 0x3000148, Duration::from_micros(12500), 3)));
        let primary =
            [Some("f".into()), Some("0/10".into()), Some("0".into()), None, Some("0000000A0000000000000003".into())];
        assert_eq!(parse_sample(&primary), Some((false, 0x10, Duration::ZERO, 10)));
        assert_eq!(parse_sample(&[Some("f".into()), None, Some("0".into())]), None);
    }
}
