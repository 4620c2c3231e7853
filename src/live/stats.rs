//! Process-wide counters for `/metrics` (per-pool ones live in `Pool`), and
//! the lock-free histogram and SQLSTATE-class table both use.
//!
//! Everything here is a plain atomic updated with `Relaxed` `fetch_add`s:
//! client tasks never take a lock to count, and a scrape reads whatever the
//! counters hold at that moment (each is an independent tally).

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Stats {
    /// Connections accepted and handed to a client task (cancel requests and
    /// failed logins included).
    pub client_connections: AtomicU64,
    /// Logins refused for a wrong password or an unknown user.
    pub auth_failures: AtomicU64,
    /// Clients pinned to their backend, by [`crate::vocab::reasons::PinReason::ALL`] index.
    pub pinned: [AtomicU64; 5],
    /// Statements refused under `on_session_state = "error"`, same indexing.
    pub session_state_refused: [AtomicU64; 5],
    /// CancelRequests by what became of them, indexed as
    /// [`super::cancel::CancelOutcome::ALL`].
    pub cancel_requests: [AtomicU64; 3],
    /// Configuration reloads (SIGHUP, RELOAD) that were applied.
    pub reloads_ok: AtomicU64,
    /// Configuration reloads refused (unreadable or invalid file).
    pub reloads_failed: AtomicU64,
    /// ErrorResponses servers sent to clients, by SQLSTATE class.
    pub errors: ErrorClasses,
}

pub use crate::vocab::histogram::{Histogram, HistogramSnapshot, LATENCY_BOUNDS_US, bucket_of};

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
