//! Process-wide counters for `/metrics` (per-pool ones live in `Pool`), and
//! the lock-free histogram and SQLSTATE-class table both use.
//!
//! Everything here is a plain atomic updated with `Relaxed` `fetch_add`s:
//! client tasks never take a lock to count, and a scrape reads whatever the
//! counters hold at that moment (each is an independent tally).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[derive(Debug, Default)]
pub struct Stats {
    /// Connections accepted and handed to a client task (cancel requests and
    /// failed logins included).
    pub client_connections: AtomicU64,
    /// Logins refused for a wrong password or an unknown user.
    pub auth_failures: AtomicU64,
    /// Clients pinned to their backend, by [`crate::client::pinning::PinReason::ALL`] index.
    pub pinned: [AtomicU64; 5],
    /// Statements refused under `on_session_state = "error"`, same indexing.
    pub session_state_refused: [AtomicU64; 5],
    /// Configuration reloads (SIGHUP, RELOAD) that were applied.
    pub reloads_ok: AtomicU64,
    /// Configuration reloads refused (unreadable or invalid file).
    pub reloads_failed: AtomicU64,
    /// ErrorResponses servers sent to clients, by SQLSTATE class.
    pub errors: ErrorClasses,
}

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

/// The SQLSTATE classes Postgres defines are two characters out of `0-9A-Z`:
/// 36 × 36 slots cover them all (about 10 KiB per process), so counting an
/// error is one index computation and one `fetch_add`, never an allocation.
const CLASS_SLOTS: usize = 36 * 36;

#[derive(Debug)]
pub struct ErrorClasses {
    by_class: Box<[AtomicU64; CLASS_SLOTS]>,
}

impl Default for ErrorClasses {
    fn default() -> Self {
        ErrorClasses { by_class: Box::new(std::array::from_fn(|_| AtomicU64::new(0))) }
    }
}

fn class_digit(b: u8) -> Option<usize> {
    match b {
        b'0'..=b'9' => Some(usize::from(b - b'0')),
        b'A'..=b'Z' => Some(usize::from(b - b'A') + 10),
        _ => None,
    }
}

fn digit_char(d: usize) -> char {
    char::from(if d < 10 { b'0' + d as u8 } else { b'A' + (d - 10) as u8 })
}

/// The class of a SQLSTATE: its first two characters. A code that is not
/// SQLSTATE-shaped is classed `XX` (internal error).
pub fn sqlstate_class(code: &str) -> [u8; 2] {
    match code.as_bytes() {
        [a, b, ..] if class_digit(*a).is_some() && class_digit(*b).is_some() => [*a, *b],
        _ => *b"XX",
    }
}

impl ErrorClasses {
    /// Counts an error of `class` (see [`sqlstate_class`]).
    pub fn count_class(&self, class: [u8; 2]) {
        let slot = class_digit(class[0]).zip(class_digit(class[1])).map_or(33 * 36 + 33, |(a, b)| a * 36 + b);
        self.by_class[slot].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an error by its SQLSTATE.
    pub fn count(&self, code: &str) {
        self.count_class(sqlstate_class(code));
    }

    /// Classes seen so far, in class order, with their counts.
    pub fn nonzero(&self) -> Vec<(String, u64)> {
        self.by_class
            .iter()
            .enumerate()
            .filter_map(|(i, n)| {
                let n = n.load(Ordering::Relaxed);
                (n > 0).then(|| ([digit_char(i / 36), digit_char(i % 36)].iter().collect(), n))
            })
            .collect()
    }
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

    #[test]
    fn error_classes_are_counted_by_their_first_two_characters() {
        let e = ErrorClasses::default();
        e.count("22012");
        e.count("22P02");
        e.count("42P01");
        e.count("x");
        e.count("");
        assert_eq!(e.nonzero(), [("22".to_owned(), 2), ("42".to_owned(), 1), ("XX".to_owned(), 2)]);
    }
}
