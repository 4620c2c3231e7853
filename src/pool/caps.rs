//! Limits on server connections shared by several pools:
//! `max_db_connections` (every user's pool of one database) and
//! `max_user_connections` (one user's pools of every database), each
//! counted per server.
//!
//! A backend holds a [`Permit`] of each cap of its pool for as long as it
//! exists, so every way a backend ends (closed, dropped, expired) gives its
//! place back. A pool that needs a new backend while a cap is full first
//! closes an idle backend of another pool under that cap (PgBouncer evicts
//! the same way), and otherwise waits for a place, within the checkout's
//! `query_wait_timeout`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::Notify;

use super::Pool;

#[derive(Debug)]
pub struct Cap {
    /// 0: no limit (the cap still counts, so a reload can set one).
    max: AtomicUsize,
    used: AtomicUsize,
    /// Woken whenever a permit is given back, or a backend under the cap
    /// goes idle (it can be evicted now) while someone waits.
    freed: Notify,
    /// Checkouts waiting for a place: only then does a backend going idle
    /// wake anyone (a load per checkin otherwise).
    waiting: AtomicUsize,
    /// The pools under this cap, to evict idle backends from.
    pools: Mutex<Vec<Weak<Pool>>>,
}

/// One backend's place under a cap; given back on drop.
#[derive(Debug)]
pub struct Permit(Arc<Cap>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.used.fetch_sub(1, Ordering::AcqRel);
        self.0.freed.notify_waiters();
    }
}

impl Cap {
    pub fn new(max: usize) -> Arc<Cap> {
        Arc::new(Cap {
            max: AtomicUsize::new(max),
            used: AtomicUsize::new(0),
            freed: Notify::new(),
            waiting: AtomicUsize::new(0),
            pools: Mutex::new(Vec::new()),
        })
    }

    /// A reload's new limit: backends over it are not closed, new ones wait.
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Release);
        self.freed.notify_waiters();
    }

    pub fn max(&self) -> usize {
        self.max.load(Ordering::Acquire)
    }

    /// Server connections under this cap right now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// A backend under this cap went idle: a waiter may evict it now.
    pub(super) fn went_idle(&self) {
        if self.waiting.load(Ordering::Acquire) > 0 {
            self.freed.notify_waiters();
        }
    }

    pub(super) fn register(&self, pool: &Arc<Pool>) {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools.retain(|p| p.strong_count() > 0);
        pools.push(Arc::downgrade(pool));
    }

    pub(super) fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                let max = self.max.load(Ordering::Acquire);
                (max == 0 || n < max).then_some(n + 1)
            })
            .ok()?;
        Some(Permit(self.clone()))
    }

    /// Closes one idle backend of a pool under this cap other than `except`.
    pub(super) fn evict_elsewhere(&self, except: &Pool) -> bool {
        let pools: Vec<Arc<Pool>> = {
            let pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
            pools.iter().filter_map(Weak::upgrade).collect()
        };
        pools.iter().filter(|p| !std::ptr::eq(Arc::as_ptr(p), except)).any(|p| p.evict_idle())
    }
}

/// What waiting for room under the caps gave.
pub(super) enum Acquired {
    /// A permit of every cap.
    Permits(Vec<Permit>),
    /// The pool itself has an idle backend now: no new one is needed.
    OwnIdle,
    TimedOut,
}

/// A permit of every cap in `caps` for a new backend of `me`, waiting until
/// `deadline` for places.
pub(super) async fn acquire_all(caps: &[Arc<Cap>], me: &Pool, deadline: tokio::time::Instant) -> Acquired {
    let mut first = true;
    loop {
        if !std::mem::take(&mut first) && me.has_idle() {
            return Acquired::OwnIdle;
        }
        let mut permits = Vec::with_capacity(caps.len());
        let mut full = None;
        for cap in caps {
            match cap.try_acquire() {
                Some(p) => permits.push(p),
                None => {
                    full = Some(cap);
                    break;
                }
            }
        }
        let Some(cap) = full else { return Acquired::Permits(permits) };
        drop(permits);
        // Counted and registered before looking for room, so a place freed or
        // a backend going idle after the look still wakes us.
        cap.waiting.fetch_add(1, Ordering::AcqRel);
        let freed = cap.freed.notified();
        tokio::pin!(freed);
        freed.as_mut().enable();
        let max = cap.max();
        let waited = match cap.evict_elsewhere(me) || max == 0 || cap.used() < max {
            true => Ok(()),
            false => tokio::time::timeout_at(deadline, freed).await,
        };
        cap.waiting.fetch_sub(1, Ordering::AcqRel);
        if waited.is_err() {
            return Acquired::TimedOut;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_count_and_come_back() {
        let cap = Cap::new(2);
        let a = cap.try_acquire().unwrap();
        let _b = cap.try_acquire().unwrap();
        assert!(cap.try_acquire().is_none());
        assert_eq!(cap.used(), 2);
        drop(a);
        assert_eq!(cap.used(), 1);
        assert!(cap.try_acquire().is_some());
        cap.set_max(0);
        let more: Vec<_> = (0..10).map(|_| cap.try_acquire().unwrap()).collect();
        assert_eq!(cap.used(), 11);
        drop(more);
    }
}
