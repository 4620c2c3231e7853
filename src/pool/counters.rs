//! A pool's cumulative counters (SHOW STATS, `/metrics`), and the
//! per-transaction tally the relay keeps in plain integers and adds to them
//! once per transaction.
//!
//! Relaxed atomics throughout: each is an independent tally read for display.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::statements::Tally;
use crate::vocab::histogram::{Histogram, LATENCY_BOUNDS_US, bucket_of};
use crate::vocab::reasons::RouteReason;

/// Slots of the per-reason counters: one per [`RouteReason`], and a last
/// one for requests of databases that are not routed (no replicas, session
/// mode, `read_write_split = false`).
pub const REASON_SLOTS: usize = RouteReason::ALL.len() + 1;

/// The label of the last per-reason slot.
pub const UNROUTED: &str = "unrouted";

#[derive(Debug, Default)]
pub struct PoolCounters {
    /// Successful checkouts: one per transaction (transaction mode) or session.
    pub checkouts: AtomicU64,
    /// Checkouts that gave up after `query_wait_timeout`.
    pub wait_timeouts: AtomicU64,
    /// Time clients spent in `checkout`, waiting or connecting (failed ones included).
    pub wait: Histogram,
    /// Time backends spent checked out (reported by the client task).
    pub xact: Histogram,
    /// Requests answered with ReadyForQuery, and how long each took from the
    /// moment the server had it to its ReadyForQuery.
    pub query: Histogram,
    /// Bytes read from clients while linked to a backend of this pool.
    pub bytes_in: AtomicU64,
    /// Bytes of server answers forwarded to clients.
    pub bytes_out: AtomicU64,
    /// Bind/Describe of a named statement the backend already had.
    pub prepared_hits: AtomicU64,
    /// Bind/Describe of a named statement pgmux had to prepare on the backend first.
    pub prepared_misses: AtomicU64,
    /// Binds of a client's named prepared statement (PgBouncer's `bind_count`).
    pub binds: AtomicU64,
    /// Transactions by the routing reason that sent them here: tallies the
    /// server answered (see [`PoolCounters::record`]). Their sum is SHOW STATS'
    /// `xact_count`; `checkouts` is its `server_assignment_count`.
    pub xacts_by_reason: [AtomicU64; REASON_SLOTS],
    /// Queries by the routing reason of their transaction.
    pub queries_by_reason: [AtomicU64; REASON_SLOTS],
    /// The snapshots SHOW STATS averages over.
    window: Mutex<Window>,
}

/// The pool's statistics as PgBouncer defines them (its `PgStats`), read
/// from the counters at one moment. Times in microseconds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    /// Checkouts: a server connection given to a client.
    pub server_assignments: u64,
    pub xacts: u64,
    pub queries: u64,
    /// Bytes from clients.
    pub received: u64,
    /// Bytes to clients.
    pub sent: u64,
    pub xact_us: u64,
    pub query_us: u64,
    pub wait_us: u64,
    pub client_parses: u64,
    pub server_parses: u64,
    pub binds: u64,
}

impl Totals {
    fn zip(self, o: Totals, f: impl Fn(u64, u64) -> u64) -> Totals {
        Totals {
            server_assignments: f(self.server_assignments, o.server_assignments),
            xacts: f(self.xacts, o.xacts),
            queries: f(self.queries, o.queries),
            received: f(self.received, o.received),
            sent: f(self.sent, o.sent),
            xact_us: f(self.xact_us, o.xact_us),
            query_us: f(self.query_us, o.query_us),
            wait_us: f(self.wait_us, o.wait_us),
            client_parses: f(self.client_parses, o.client_parses),
            server_parses: f(self.server_parses, o.server_parses),
            binds: f(self.binds, o.binds),
        }
    }

    pub fn plus(self, o: Totals) -> Totals {
        self.zip(o, u64::saturating_add)
    }

    /// What happened between `earlier` and `self` (counters only grow).
    pub fn minus(self, earlier: Totals) -> Totals {
        self.zip(earlier, u64::saturating_sub)
    }
}

/// PgBouncer's `older_stats` and `newer_stats`: averages cover what happened
/// since the older snapshot. PgBouncer rotates them on a timer every
/// `stats_period`; pgmux rotates when they are read, so the older one is at
/// least a period old (or the pool's start) and usually less than two.
#[derive(Debug)]
struct Window {
    older: (Instant, Totals),
    newer: (Instant, Totals),
}

impl Default for Window {
    fn default() -> Window {
        let start = (Instant::now(), Totals::default());
        Window { older: start, newer: start }
    }
}

/// The slot of `reason` (`None`: not routed) in the per-reason counters.
pub fn reason_slot(reason: Option<RouteReason>) -> usize {
    reason.map_or(REASON_SLOTS - 1, |r| r as usize)
}

/// The label of slot `i` of the per-reason counters.
pub fn reason_label(i: usize) -> &'static str {
    RouteReason::ALL.get(i).map_or(UNROUTED, |r| r.as_str())
}

/// Query durations of one transaction, bucketed locally (no atomics) and
/// added to the pool's histogram in one go.
#[derive(Debug, Default, Clone)]
pub struct LocalHistogram {
    buckets: [u32; LATENCY_BOUNDS_US.len() + 1],
    sum_us: u64,
    count: u32,
}

impl LocalHistogram {
    pub fn observe_us(&mut self, us: u64) {
        let b = &mut self.buckets[bucket_of(us)];
        *b = b.saturating_add(1);
        self.sum_us = self.sum_us.saturating_add(us);
        self.count = self.count.saturating_add(1);
    }

    pub fn count(&self) -> u32 {
        self.count
    }

    /// Adds every observation to `into`: one `fetch_add` per non-empty bucket.
    fn add_to(&self, into: &Histogram) {
        if self.count == 0 {
            return;
        }
        into.add_buckets(self.buckets.iter().map(|&n| u64::from(n)), u64::from(self.count), self.sum_us);
    }
}

/// What one transaction did, counted by the relay in plain integers.
#[derive(Debug, Default, Clone)]
pub struct Traffic {
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub queries: LocalHistogram,
    pub prepared_hits: u32,
    pub prepared_misses: u32,
    /// Binds of named prepared statements.
    pub binds: u32,
    /// SQLSTATE classes of the ErrorResponses forwarded (errors are rare:
    /// this allocates only when one happens, next to the error's own parsing).
    pub errors: Vec<[u8; 2]>,
}

impl Traffic {
    pub fn is_empty(&self) -> bool {
        self.bytes_in == 0 && self.bytes_out == 0 && self.queries.count == 0
    }
}

impl PoolCounters {
    /// Adds one transaction's tally (routed for `reason`) to the pool. It
    /// counts as a transaction once the server answered any of it: the
    /// leftover of a session (its Terminate) is bytes, not a transaction,
    /// as in PgBouncer.
    pub fn record(&self, reason: Option<RouteReason>, t: &Traffic) {
        let slot = reason_slot(reason);
        if t.queries.count > 0 || t.bytes_out > 0 {
            self.xacts_by_reason[slot].fetch_add(1, Ordering::Relaxed);
        }
        if t.queries.count > 0 {
            self.queries_by_reason[slot].fetch_add(u64::from(t.queries.count), Ordering::Relaxed);
            t.queries.add_to(&self.query);
        }
        self.bytes_in.fetch_add(t.bytes_in, Ordering::Relaxed);
        self.bytes_out.fetch_add(t.bytes_out, Ordering::Relaxed);
        if t.prepared_hits > 0 {
            self.prepared_hits.fetch_add(u64::from(t.prepared_hits), Ordering::Relaxed);
        }
        if t.prepared_misses > 0 {
            self.prepared_misses.fetch_add(u64::from(t.prepared_misses), Ordering::Relaxed);
        }
        if t.binds > 0 {
            self.binds.fetch_add(u64::from(t.binds), Ordering::Relaxed);
        }
    }

    /// Transactions of every routing reason.
    pub fn xacts(&self) -> u64 {
        self.xacts_by_reason.iter().map(|n| n.load(Ordering::Relaxed)).sum()
    }

    /// The pool's totals now; `statements` is its registry's tally.
    pub fn totals(&self, statements: &Tally) -> Totals {
        Totals {
            server_assignments: self.checkouts.load(Ordering::Relaxed),
            xacts: self.xacts(),
            queries: self.query.count(),
            received: self.bytes_in.load(Ordering::Relaxed),
            sent: self.bytes_out.load(Ordering::Relaxed),
            xact_us: self.xact.sum_us(),
            query_us: self.query.sum_us(),
            wait_us: self.wait.sum_us(),
            client_parses: statements.client_parses.load(Ordering::Relaxed),
            server_parses: statements.server_parses.load(Ordering::Relaxed),
            binds: self.binds.load(Ordering::Relaxed),
        }
    }

    /// What happened from the older snapshot to `current` (the totals at
    /// `now`), and over how long. The snapshots move on first if `period`
    /// has passed since the newer one was taken.
    pub fn since_window(&self, now: Instant, current: Totals, period: Duration) -> (Totals, Duration) {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if now.saturating_duration_since(w.newer.0) >= period {
            w.older = w.newer;
            w.newer = (now, current);
        }
        (current.minus(w.older.1), now.saturating_duration_since(w.older.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transaction_tally_lands_in_the_pool_counters() {
        let c = PoolCounters::default();
        let mut t = Traffic { bytes_in: 10, bytes_out: 20, prepared_hits: 2, binds: 3, ..Traffic::default() };
        t.queries.observe_us(30);
        t.queries.observe_us(40);
        t.queries.observe_us(2_000_000);
        c.record(Some(RouteReason::Read), &t);
        c.record(None, &Traffic { bytes_out: 1, ..Traffic::default() });
        // A session's Terminate: bytes the server never answered, no transaction.
        c.record(None, &Traffic { bytes_in: 5, ..Traffic::default() });
        let q = c.query.snapshot();
        assert_eq!((q.count, q.sum_us, q.buckets[0]), (3, 2_000_070, 2));
        assert_eq!(c.bytes_in.load(Ordering::Relaxed), 15);
        assert_eq!(c.bytes_out.load(Ordering::Relaxed), 21);
        assert_eq!(c.binds.load(Ordering::Relaxed), 3);
        assert_eq!(c.xacts(), 2);
        assert_eq!(c.prepared_hits.load(Ordering::Relaxed), 2);
        assert_eq!(c.xacts_by_reason[RouteReason::Read as usize].load(Ordering::Relaxed), 1);
        assert_eq!(c.queries_by_reason[RouteReason::Read as usize].load(Ordering::Relaxed), 3);
        assert_eq!(c.xacts_by_reason[REASON_SLOTS - 1].load(Ordering::Relaxed), 1);
        assert_eq!(reason_label(REASON_SLOTS - 1), UNROUTED);
        assert_eq!(reason_label(0), "read");
        let totals = c.totals(&Tally::default());
        assert_eq!((totals.xacts, totals.queries, totals.received, totals.binds), (2, 3, 15, 3));
    }

    #[test]
    fn the_window_covers_at_least_a_period_once_one_has_passed() {
        let c = PoolCounters::default();
        let start = c.window.lock().unwrap().older.0;
        let at = |s: u64| start + Duration::from_secs(s);
        let t = |xacts: u64| Totals { xacts, ..Totals::default() };
        let period = Duration::from_secs(60);
        // Within the first period: since the pool started.
        assert_eq!(c.since_window(at(10), t(5), period), (t(5), Duration::from_secs(10)));
        // A period on: the snapshots rotate; still since the start.
        assert_eq!(c.since_window(at(70), t(8), period), (t(8), Duration::from_secs(70)));
        // Another period on: since the snapshot taken at 70 s.
        assert_eq!(c.since_window(at(130), t(20), period), (t(12), Duration::from_secs(60)));
        assert_eq!(c.since_window(at(150), t(21), period), (t(13), Duration::from_secs(80)));
    }
}
