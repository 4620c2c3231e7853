//! A pool's cumulative counters (SHOW STATS, `/metrics`), and the
//! per-transaction tally the relay keeps in plain integers and adds to them
//! once per transaction.
//!
//! Relaxed atomics throughout: each is an independent tally read for display.

use std::sync::atomic::{AtomicU64, Ordering};

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
    /// Transactions by the routing reason that sent them here.
    pub xacts_by_reason: [AtomicU64; REASON_SLOTS],
    /// Queries by the routing reason of their transaction.
    pub queries_by_reason: [AtomicU64; REASON_SLOTS],
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
    /// Adds one transaction's tally (routed for `reason`) to the pool.
    pub fn record(&self, reason: Option<RouteReason>, t: &Traffic) {
        let slot = reason_slot(reason);
        self.xacts_by_reason[slot].fetch_add(1, Ordering::Relaxed);
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transaction_tally_lands_in_the_pool_counters() {
        let c = PoolCounters::default();
        let mut t = Traffic { bytes_in: 10, bytes_out: 20, prepared_hits: 2, ..Traffic::default() };
        t.queries.observe_us(30);
        t.queries.observe_us(40);
        t.queries.observe_us(2_000_000);
        c.record(Some(RouteReason::Read), &t);
        c.record(None, &Traffic::default());
        let q = c.query.snapshot();
        assert_eq!((q.count, q.sum_us, q.buckets[0]), (3, 2_000_070, 2));
        assert_eq!(c.bytes_in.load(Ordering::Relaxed), 10);
        assert_eq!(c.bytes_out.load(Ordering::Relaxed), 20);
        assert_eq!(c.prepared_hits.load(Ordering::Relaxed), 2);
        assert_eq!(c.xacts_by_reason[RouteReason::Read as usize].load(Ordering::Relaxed), 1);
        assert_eq!(c.queries_by_reason[RouteReason::Read as usize].load(Ordering::Relaxed), 3);
        assert_eq!(c.xacts_by_reason[REASON_SLOTS - 1].load(Ordering::Relaxed), 1);
        assert_eq!(reason_label(REASON_SLOTS - 1), UNROUTED);
        assert_eq!(reason_label(0), "read");
    }
}
