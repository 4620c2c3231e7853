//! Polling before sleeping (`[proxy] idle_poll`): when the serving thread
//! runs out of work, it first asks the kernel again, without sleeping, for
//! up to a short window, and only then sleeps.
//!
//! Why: at low concurrency a transaction's latency through a proxy is set
//! less by the proxy's code than by its two extra sleeps and wake-ups: each
//! one makes the scheduler switch, and on a virtual machine an idle vCPU
//! halts and must be woken by an inter-processor interrupt through the host
//! (docs/benchmarks.md measures ~9 µs a sleep on the benchmark VM). A thread
//! still running when the server's answer or the client's next query
//! arrives takes it at once, and its peers' sends wake nothing.
//!
//! The window adapts as Linux's `cpuidle-haltpoll` governor's does: a sleep
//! that ended with work no later than `idle_poll` after the thread ran out
//! of it grows the window (so the next such gap is polled through), a sleep
//! that ran longer (or timed out) halves it. An idle proxy therefore polls
//! next to nothing, a proxy that is never out of work never polls, and one
//! whose clients send back to back stays awake between their messages: it
//! spends CPU (up to one core) to save their wake-ups. `idle_poll = "0"`
//! turns it off.
//!
//! Only threads that serve connections poll ([`enable_here`]); the limit is
//! process-wide and follows reloads ([`set_limit`]).

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// `[proxy] idle_poll` in nanoseconds; 0: off.
static LIMIT_NS: AtomicU64 = AtomicU64::new(0);

/// Waits that slept, on serving threads (tests and benchmarks read it).
static SLEEPS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Whether this thread serves connections (set once, on its runtime).
    static ENABLED: Cell<bool> = const { Cell::new(false) };
    /// The current window: how long the next wait polls before sleeping.
    static WINDOW_NS: Cell<u64> = const { Cell::new(0) };
}

/// The first window a grown one starts from, as a share of the limit
/// (haltpoll starts at a quarter of its maximum).
const GROW_START_DIV: u64 = 4;

/// Sets `[proxy] idle_poll` for every serving thread.
pub fn set_limit(limit: Duration) {
    LIMIT_NS.store(u64::try_from(limit.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
}

/// How many times the serving threads have gone to sleep for work (a wait
/// with a timeout of 0 never sleeps and is not counted).
pub fn sleeps() -> u64 {
    SLEEPS.load(Ordering::Relaxed)
}

/// Marks the calling thread as one that serves connections.
pub fn enable_here() {
    ENABLED.with(|e| e.set(true));
}

/// A wait of up to `timeout_ms` (-1: no limit, 0: none) on `waiter`:
/// `poll` asks without sleeping and says whether there was work; `sleep`
/// waits and says the same. Polls first, while this thread's window lasts.
pub fn wait<W, R>(
    timeout_ms: i32,
    waiter: &mut W,
    poll: impl FnMut(&mut W) -> (R, bool),
    sleep: impl FnOnce(&mut W) -> (R, bool),
) -> R {
    if !ENABLED.with(Cell::get) {
        return sleep(waiter).0;
    }
    // A zero timeout only asks: no sleep, nothing to poll for.
    if timeout_ms == 0 {
        return sleep(waiter).0;
    }
    let limit = LIMIT_NS.load(Ordering::Relaxed);
    if limit == 0 {
        SLEEPS.fetch_add(1, Ordering::Relaxed);
        return sleep(waiter).0;
    }
    // Never past the wait's own deadline (tokio's next timer).
    let limit = match u64::try_from(timeout_ms) {
        Ok(ms) => limit.min(ms.saturating_mul(1_000_000)),
        Err(_) => limit,
    };
    WINDOW_NS.with(|w| {
        let (r, window) = poll_then_sleep(w.get(), limit, waiter, poll, sleep);
        w.set(window);
        r
    })
}

/// [`wait`] with the window and limit given: returns the new window.
fn poll_then_sleep<W, R>(
    window: u64,
    limit: u64,
    waiter: &mut W,
    mut poll: impl FnMut(&mut W) -> (R, bool),
    sleep: impl FnOnce(&mut W) -> (R, bool),
) -> (R, u64) {
    let start = Instant::now();
    let window = window.min(limit);
    if window > 0 {
        loop {
            let (r, work) = poll(waiter);
            // Found while polling: the window was right, it stays.
            if work {
                return (r, window);
            }
            if start.elapsed() >= Duration::from_nanos(window) {
                break;
            }
            // A task runnable on this CPU (Postgres, the client) goes first:
            // the poll spends only time no one else here wants.
            std::thread::yield_now();
        }
    }
    SLEEPS.fetch_add(1, Ordering::Relaxed);
    let (r, work) = sleep(waiter);
    let waited = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
    (r, next_window(window, limit, work.then_some(waited)))
}

/// The window after a sleep: `woke_after` is how long after running out of
/// work the thread had work again (`None`: the wait timed out with none).
fn next_window(window: u64, limit: u64, woke_after: Option<u64>) -> u64 {
    match woke_after {
        Some(ns) if ns <= limit => (window * 2).max(limit / GROW_START_DIV).min(limit),
        _ => window / 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_grows_for_short_gaps_and_shrinks_for_long_ones() {
        let limit = 100_000;
        // A short gap from nothing: a quarter of the limit, then doubling up to it.
        assert_eq!(next_window(0, limit, Some(40_000)), 25_000);
        assert_eq!(next_window(25_000, limit, Some(40_000)), 50_000);
        assert_eq!(next_window(50_000, limit, Some(40_000)), 100_000);
        assert_eq!(next_window(100_000, limit, Some(90_000)), 100_000);
        // Longer than the limit, or no work at all: halved, down to nothing.
        assert_eq!(next_window(100_000, limit, Some(5_000_000)), 50_000);
        assert_eq!(next_window(50_000, limit, None), 25_000);
        assert_eq!(next_window(1, limit, None), 0);
    }

    #[test]
    fn work_found_while_polling_is_taken_without_sleeping() {
        let (r, window) = poll_then_sleep(
            1_000_000_000,
            1_000_000_000,
            &mut 0,
            |polls| {
                *polls += 1;
                (*polls, *polls == 3)
            },
            |_| panic!("slept"),
        );
        assert_eq!((r, window), (3, 1_000_000_000));
    }

    #[test]
    fn an_empty_window_sleeps_at_once_and_a_quick_wake_opens_it() {
        let (r, window) = poll_then_sleep(0, 1_000_000_000, &mut (), |_| panic!("polled"), |_| ("slept", true));
        assert_eq!((r, window), ("slept", 250_000_000));
    }

    #[test]
    fn a_thread_not_serving_connections_never_polls() {
        // No server runs in this test binary: the process-wide limit is
        // this test's. A thread of its own: `ENABLED` is per thread.
        set_limit(Duration::from_secs(1));
        std::thread::spawn(|| wait(5, &mut (), |_| panic!("polled"), |_| ((), true))).join().unwrap();
        std::thread::spawn(|| {
            enable_here();
            let mut polls = 0;
            // The first wait opens the window; the second polls.
            wait(5, &mut polls, |_| panic!("polled"), |_| ((), true));
            wait(
                5,
                &mut polls,
                |polls| {
                    *polls += 1;
                    ((), true)
                },
                |_| panic!("slept"),
            );
            assert_eq!(polls, 1);
        })
        .join()
        .unwrap();
        set_limit(Duration::ZERO);
    }
}
