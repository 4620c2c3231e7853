//! Fixed-bucket latency histograms: filled by the pool and the client on the
//! hot path, read by `/metrics` and SHOW STATS.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (µs) of the latency histograms' buckets: 50 µs to 10 s,
/// roughly ×2–2.5 per step. Pool checkouts are mostly microseconds, queries
/// and transactions milliseconds; one scale serves all so dashboards can
/// compare them. A last, implicit bucket holds everything slower (+Inf).
pub const LATENCY_BOUNDS_US: [u64; 17] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    5_000_000, 10_000_000,
];

const BUCKETS: usize = LATENCY_BOUNDS_US.len() + 1;

/// A fixed-bucket latency histogram in microseconds. An observation costs
/// three relaxed `fetch_add`s (its bucket, the sum, the count) and no lock;
/// buckets hold per-bucket (not cumulative) counts, summed at scrape time.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS],
    sum_us: AtomicU64,
    count: AtomicU64,
}

/// What a scrape reads out of a [`Histogram`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// Per-bucket counts; the last is +Inf.
    pub buckets: [u64; BUCKETS],
    pub sum_us: u64,
    pub count: u64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        self.observe_us(d.as_micros().min(u128::from(u64::MAX)) as u64);
    }

    pub fn observe_us(&self, us: u64) {
        self.buckets[bucket_of(us)].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds observations a caller bucketed itself (same bounds): `per_bucket`
    /// counts, `count` of them in all, totalling `sum_us`. Empty buckets
    /// cost nothing.
    pub fn add_buckets(&self, per_bucket: impl IntoIterator<Item = u64>, count: u64, sum_us: u64) {
        for (slot, n) in self.buckets.iter().zip(per_bucket) {
            if n > 0 {
                slot.fetch_add(n, Ordering::Relaxed);
            }
        }
        self.sum_us.fetch_add(sum_us, Ordering::Relaxed);
        self.count.fetch_add(count, Ordering::Relaxed);
    }

    pub fn sum_us(&self) -> u64 {
        self.sum_us.load(Ordering::Relaxed)
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        // Count read first: a concurrent observation may then show up in a
        // bucket but not in the count, never the other way round (which
        // would make `+Inf` smaller than a lower bucket).
        let count = self.count.load(Ordering::Relaxed);
        let sum_us = self.sum_us.load(Ordering::Relaxed);
        let buckets = std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed));
        HistogramSnapshot { buckets, sum_us, count }
    }
}

/// Index of the bucket that holds `us`.
pub fn bucket_of(us: u64) -> usize {
    LATENCY_BOUNDS_US.partition_point(|&bound| bound < us)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_by_upper_bound() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(50), 0);
        assert_eq!(bucket_of(51), 1);
        assert_eq!(bucket_of(10_000_000), LATENCY_BOUNDS_US.len() - 1);
        assert_eq!(bucket_of(u64::MAX), LATENCY_BOUNDS_US.len());
        let h = Histogram::default();
        h.observe(Duration::from_micros(70));
        h.observe(Duration::from_secs(100));
        h.add_buckets([0, 0, 0, 0, 0, 0, 2], 2, 7_000);
        let s = h.snapshot();
        assert_eq!((s.count, s.sum_us), (4, 100_007_070));
        assert_eq!((s.buckets[1], s.buckets[6], s.buckets[BUCKETS - 1]), (1, 2, 1));
    }
}
