//! A pool's state under its lock, and the decisions taken on it.
//!
//! No I/O and no clock here: callers pass `now` in, take a decision, drop the
//! lock, and only then await (connect, hand over, close). That keeps every
//! critical section a few instructions long and testable without sockets.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// What a waiting client is handed when its turn comes.
#[derive(Debug)]
pub enum Grant<B> {
    /// An idle backend, ready to use.
    Backend(B),
    /// Permission to open a new backend (a slot was freed by a closed one).
    Slot,
}

/// A client queued for a backend, since its request arrived.
#[derive(Debug)]
struct Waiter<B> {
    since: Instant,
    tx: oneshot::Sender<Grant<B>>,
}

/// The outcome of asking for a backend.
#[derive(Debug)]
pub enum Take<B> {
    Idle(B),
    /// Under `pool_size`: the caller opens a new backend (the slot is counted).
    Create,
    /// At `pool_size`: wait in FIFO order. The sender is dropped, failing
    /// the receive, when [`Inner::sweep_waiters`] finds the wait too long.
    Wait(oneshot::Receiver<Grant<B>>),
}

/// What the pool does with a backend coming back clean.
#[derive(Debug, PartialEq, Eq)]
pub enum Release {
    /// Handed to the longest waiter or kept idle.
    Keep,
    /// Closed: its lifetime is over, or the pool is over size after a reload.
    Close(CloseReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    LifetimeOver,
    IdleTooLong,
    PoolShrunk,
    /// A reload changed the pool's server or database: it belongs to the old target.
    Retargeted,
    /// A reload removed the pool's database or user.
    Retired,
    Dirty,
    Dead,
    /// `RECONNECT` or `KILL` from the admin console.
    Reconnect,
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CloseReason::LifetimeOver => "server_lifetime over",
            CloseReason::IdleTooLong => "server_idle_timeout over",
            CloseReason::PoolShrunk => "pool_size reduced",
            CloseReason::Retargeted => "database target changed by a reload",
            CloseReason::Retired => "database or user removed by a reload",
            CloseReason::Dirty => "connection left in an unknown state",
            CloseReason::Dead => "connection closed by the server",
            CloseReason::Reconnect => "RECONNECT or KILL from the admin console",
        })
    }
}

/// Anything the pool holds: it only needs to know ages, and which target
/// (see [`Inner::generation`]) it was opened for.
pub trait Aged {
    fn created(&self) -> Instant;
    fn last_used(&self) -> Instant;
    fn generation(&self) -> u64;
}

impl<T: Aged> Aged for Box<T> {
    fn created(&self) -> Instant {
        (**self).created()
    }
    fn last_used(&self) -> Instant {
        (**self).last_used()
    }
    fn generation(&self) -> u64 {
        (**self).generation()
    }
}

#[derive(Debug)]
pub struct Inner<B> {
    pub pool_size: usize,
    pub lifetime: Duration,
    pub idle_timeout: Duration,
    /// Bumped when a reload changes the pool's target (server, database) or
    /// the admin console asks to reconnect: backends of an older generation
    /// are closed when they come back, for `stale_reason`.
    generation: u64,
    stale_reason: CloseReason,
    /// Set when a reload removes the pool's database or user: every backend
    /// is closed when it comes back; no new client reaches this pool.
    retired: bool,
    /// Most recently returned last: taken from the back (warm caches, and the
    /// front ages out under `idle_timeout`).
    idle: VecDeque<B>,
    /// Backends that exist or are being opened, idle ones included.
    open: usize,
    /// Of those, the ones of an older generation, closed when they come
    /// back (WAIT_CLOSE waits for none to be left).
    stale: usize,
    waiters: VecDeque<Waiter<B>>,
    /// A task is sweeping `waiters` for timeouts (see `Pool::checkout`).
    sweeping: bool,
}

impl<B: Aged> Inner<B> {
    pub fn new(pool_size: usize, lifetime: Duration, idle_timeout: Duration) -> Self {
        Inner {
            pool_size,
            lifetime,
            idle_timeout,
            generation: 0,
            stale_reason: CloseReason::Retargeted,
            retired: false,
            idle: VecDeque::new(),
            open: 0,
            stale: 0,
            waiters: VecDeque::new(),
            sweeping: false,
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// A reload's new sizes and ages. Growing hands the new slots to waiting
    /// clients at once; shrinking closes surplus idle backends now (returned
    /// for the caller to close) and busy ones as they come back ([`Inner::put`]).
    pub fn reconfigure(
        &mut self,
        pool_size: usize,
        lifetime: Duration,
        idle_timeout: Duration,
    ) -> Vec<(B, CloseReason)> {
        self.pool_size = pool_size;
        self.lifetime = lifetime;
        self.idle_timeout = idle_timeout;
        let mut out = Vec::new();
        // Oldest returned first: the most recently used (warmest) stay.
        while self.open > self.pool_size {
            let Some(b) = self.idle.pop_front() else { break };
            self.open -= 1;
            out.push((b, CloseReason::PoolShrunk));
        }
        self.grant_slots();
        out
    }

    /// A reload changed the target: idle backends (returned) and busy ones
    /// (when they come back) belong to the old one and are closed.
    pub fn retarget(&mut self) -> Vec<(B, CloseReason)> {
        self.renew(CloseReason::Retargeted)
    }

    /// Every current backend is closed: idle ones now (returned), busy ones
    /// when they come back. New ones open as needed.
    pub fn renew(&mut self, reason: CloseReason) -> Vec<(B, CloseReason)> {
        self.generation += 1;
        self.stale_reason = reason;
        let idle = self.drain_idle();
        // Every backend not idle (in use, or being opened) is now stale.
        self.stale = self.open;
        self.grant_slots();
        idle.into_iter().map(|b| (b, reason)).collect()
    }

    /// A reload removed the pool's database or user: close the idle backends
    /// (returned) and every other one as it comes back.
    pub fn retire(&mut self) -> Vec<(B, CloseReason)> {
        self.retired = true;
        self.drain_idle().into_iter().map(|b| (b, CloseReason::Retired)).collect()
    }

    pub fn open(&self) -> usize {
        self.open
    }

    pub fn retired(&self) -> bool {
        self.retired
    }

    pub fn idle_count(&self) -> usize {
        self.idle.len()
    }

    /// Idle backends, oldest returned first (for SHOW SERVERS).
    pub fn idle(&self) -> impl Iterator<Item = &B> {
        self.idle.iter()
    }

    pub fn waiting(&self) -> usize {
        self.waiters.iter().filter(|w| !w.tx.is_closed()).count()
    }

    /// Asks for a backend. Expired idle backends met on the way are returned
    /// in `expired` for the caller to close outside the lock. A wait is timed
    /// from `asked` (the request's arrival, even when this is a retry).
    pub fn take(&mut self, now: Instant, asked: Instant, expired: &mut Vec<(B, CloseReason)>) -> Take<B> {
        // Waiters first: a newcomer must not overtake the queue.
        if self.waiters.iter().all(|w| w.tx.is_closed()) {
            self.waiters.clear();
            while let Some(b) = self.idle.pop_back() {
                match self.expiry(&b, now) {
                    None => return Take::Idle(b),
                    Some(reason) => {
                        self.open -= 1;
                        expired.push((b, reason));
                    }
                }
            }
            if self.open < self.pool_size {
                self.open += 1;
                return Take::Create;
            }
        }
        let (tx, rx) = oneshot::channel();
        self.waiters.push_back(Waiter { since: asked, tx });
        Take::Wait(rx)
    }

    /// True once per stretch of waiting: the caller then starts the task
    /// that calls [`Inner::sweep_waiters`] until the queue is empty.
    pub fn claim_sweeper(&mut self) -> bool {
        !std::mem::replace(&mut self.sweeping, true)
    }

    /// Times out waiters queued for `wait` or longer (dropping their sender
    /// fails their receive; a zero `wait` never times out, as in PgBouncer)
    /// and forgets those that gave up. Returns whether anyone is still
    /// waiting, i.e. whether the sweeper must go on.
    pub fn sweep_waiters(&mut self, now: Instant, wait: Duration) -> bool {
        let unlimited = wait.is_zero();
        self.waiters.retain(|w| !w.tx.is_closed() && (unlimited || now.saturating_duration_since(w.since) < wait));
        self.sweeping = !self.waiters.is_empty();
        self.sweeping
    }

    /// PgBouncer's reserve pool: waiters queued for `timeout` or longer may
    /// open up to `reserve` backends beyond `pool_size`. Such backends close
    /// when they come back with nobody waiting.
    pub fn grant_reserve(&mut self, now: Instant, reserve: usize, timeout: Duration) {
        while self.open < self.pool_size + reserve {
            let Some(w) = self.waiters.front() else { return };
            if now.saturating_duration_since(w.since) < timeout {
                return;
            }
            let w = self.waiters.pop_front().expect("just looked");
            self.open += 1;
            if w.tx.send(Grant::Slot).is_err() {
                self.open -= 1;
            }
        }
    }

    fn expiry(&self, b: &B, now: Instant) -> Option<CloseReason> {
        if !self.lifetime.is_zero() && now.duration_since(b.created()) >= self.lifetime {
            Some(CloseReason::LifetimeOver)
        } else if !self.idle_timeout.is_zero() && now.duration_since(b.last_used()) >= self.idle_timeout {
            Some(CloseReason::IdleTooLong)
        } else {
            None
        }
    }

    /// A clean backend comes back. Returns it when the caller must close it.
    pub fn put(&mut self, mut b: B, now: Instant) -> Option<(B, CloseReason)> {
        let stale = if self.retired {
            Some(CloseReason::Retired)
        } else if b.generation() != self.generation {
            Some(self.stale_reason)
        } else {
            None
        };
        if let Some(reason) = stale {
            if b.generation() != self.generation {
                self.stale = self.stale.saturating_sub(1);
            }
            self.open -= 1;
            self.grant_slots();
            return Some((b, reason));
        }
        // Beyond pool_size (a reserve backend, or pool_size lowered by a
        // reload): closed, unless someone is waiting for it right now.
        if self.open > self.pool_size && self.waiters.iter().all(|w| w.tx.is_closed()) {
            self.waiters.clear();
            self.open -= 1;
            return Some((b, CloseReason::PoolShrunk));
        }
        if !self.lifetime.is_zero() && now.duration_since(b.created()) >= self.lifetime {
            self.open -= 1;
            self.grant_slots();
            return Some((b, CloseReason::LifetimeOver));
        }
        while let Some(w) = self.waiters.pop_front() {
            match w.tx.send(Grant::Backend(b)) {
                Ok(()) => return None,
                // That waiter gave up (timeout, disconnect): try the next one.
                Err(Grant::Backend(back)) => b = back,
                Err(Grant::Slot) => unreachable!("we sent a backend"),
            }
        }
        if self.open > self.pool_size {
            self.open -= 1;
            return Some((b, CloseReason::PoolShrunk));
        }
        self.idle.push_back(b);
        None
    }

    /// A backend was closed (dirty, dead, expired) or never opened: free its
    /// slot, and let the longest waiter open a replacement.
    pub fn forget(&mut self) {
        self.open -= 1;
        // A backend whose opening failed may have been counted stale: never
        // more stale than open, so WAIT_CLOSE cannot wait for a ghost.
        self.stale = self.stale.min(self.open);
        self.grant_slots();
    }

    /// [`Inner::forget`] for a backend of `generation`, closed on the way.
    pub fn forget_of(&mut self, generation: u64) {
        if generation != self.generation {
            self.stale = self.stale.saturating_sub(1);
        }
        self.forget();
    }

    /// Backends of an older generation still open (in use or being cleaned).
    pub fn stale(&self) -> usize {
        self.stale
    }

    fn grant_slots(&mut self) {
        while self.open < self.pool_size {
            let Some(w) = self.waiters.pop_front() else { return };
            self.open += 1;
            if w.tx.send(Grant::Slot).is_err() {
                self.open -= 1;
            }
        }
    }

    /// Idle backends past their lifetime, or idle for too long while more
    /// than `keep_at_least` exist; for the janitor to close.
    pub fn expire_idle(&mut self, now: Instant, keep_at_least: usize) -> Vec<(B, CloseReason)> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.idle.len() {
            let close = match self.expiry(&self.idle[i], now) {
                Some(CloseReason::IdleTooLong) => self.open > keep_at_least,
                Some(_) => true,
                None => false,
            };
            if close {
                let b = self.idle.remove(i).expect("index checked");
                let reason = self.expiry(&b, now).expect("checked above");
                self.open -= 1;
                out.push((b, reason));
            } else {
                i += 1;
            }
        }
        self.grant_slots();
        out
    }

    /// How many backends to open so that `min` exist (never above `pool_size`).
    pub fn reserve_for_min(&mut self, min: usize) -> usize {
        let target = min.min(self.pool_size);
        let n = target.saturating_sub(self.open);
        self.open += n;
        n
    }

    pub fn has_idle(&self) -> bool {
        !self.idle.is_empty()
    }

    /// Takes the longest-idle backend out, to be closed (another pool needs
    /// its place under a connection cap).
    pub fn evict_oldest_idle(&mut self) -> Option<B> {
        let b = self.idle.pop_front()?;
        self.open -= 1;
        self.grant_slots();
        Some(b)
    }

    /// Drains idle backends (shutdown, reload that removes the pool).
    /// A backend of this pool died: the server may be going away (a shutdown
    /// ends every session), so the idle ones are not handed out unchecked;
    /// returned to be closed, their slots to waiters.
    pub fn drop_idle(&mut self) -> Vec<B> {
        let idle = self.drain_idle();
        self.grant_slots();
        idle
    }

    pub fn drain_idle(&mut self) -> Vec<B> {
        let out: Vec<B> = self.idle.drain(..).collect();
        self.open -= out.len();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct Fake {
        id: u32,
        created: Instant,
        used: Instant,
        generation: u64,
    }

    impl Aged for Fake {
        fn created(&self) -> Instant {
            self.created
        }
        fn last_used(&self) -> Instant {
            self.used
        }
        fn generation(&self) -> u64 {
            self.generation
        }
    }

    fn fake(id: u32, t: Instant) -> Fake {
        Fake { id, created: t, used: t, generation: 0 }
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn creates_up_to_pool_size_then_queues_fifo() {
        let t = Instant::now();
        let mut p = Inner::<Fake>::new(2, HOUR, HOUR);
        let mut ex = Vec::new();
        assert!(matches!(p.take(t, t, &mut ex), Take::Create));
        assert!(matches!(p.take(t, t, &mut ex), Take::Create));
        let Take::Wait(mut first) = p.take(t, t, &mut ex) else { panic!("should wait") };
        let Take::Wait(mut second) = p.take(t, t, &mut ex) else { panic!("should wait") };
        assert_eq!(p.waiting(), 2);
        assert!(p.put(fake(1, t), t).is_none());
        assert!(matches!(first.try_recv(), Ok(Grant::Backend(Fake { id: 1, .. }))));
        assert!(second.try_recv().is_err());
        p.forget();
        assert!(matches!(second.try_recv(), Ok(Grant::Slot)));
        assert_eq!(p.open(), 2);
    }

    #[test]
    fn stale_backends_are_counted_until_they_are_closed() {
        let t = Instant::now();
        let mut p = Inner::<Fake>::new(3, HOUR, HOUR);
        let mut ex = Vec::new();
        for _ in 0..3 {
            assert!(matches!(p.take(t, t, &mut ex), Take::Create));
        }
        assert!(p.put(fake(1, t), t).is_none());
        // One idle (closed now), two in use or opening: those two are stale.
        assert_eq!(p.renew(CloseReason::Reconnect).len(), 1);
        assert_eq!(p.stale(), 2);
        assert!(matches!(p.put(fake(2, t), t), Some((_, CloseReason::Reconnect))));
        assert_eq!(p.stale(), 1);
        // The other one's opening failed: its slot is forgotten, and so is its staleness.
        p.forget();
        assert_eq!((p.open(), p.stale()), (0, 0));
    }

    #[test]
    fn reserve_slots_go_to_long_waiters_and_close_when_nobody_waits() {
        let t = Instant::now();
        let timeout = Duration::from_secs(5);
        let mut p = Inner::<Fake>::new(1, HOUR, HOUR);
        let mut ex = Vec::new();
        assert!(matches!(p.take(t, t, &mut ex), Take::Create));
        let Take::Wait(mut first) = p.take(t, t, &mut ex) else { panic!("should wait") };
        let Take::Wait(mut second) = p.take(t + timeout, t + timeout, &mut ex) else { panic!("should wait") };
        p.grant_reserve(t + timeout - Duration::from_millis(1), 1, timeout);
        assert!(matches!(first.try_recv(), Err(oneshot::error::TryRecvError::Empty)), "not waited long enough");
        p.grant_reserve(t + timeout, 1, timeout);
        assert!(matches!(first.try_recv(), Ok(Grant::Slot)), "waited reserve_pool_timeout: a reserve slot");
        assert!(matches!(second.try_recv(), Err(oneshot::error::TryRecvError::Empty)), "one reserve slot only");
        // A backend back while someone waits goes to them, reserve or not...
        assert!(p.put(fake(1, t), t).is_none());
        assert!(matches!(second.try_recv(), Ok(Grant::Backend(Fake { id: 1, .. }))));
        // ...and with nobody waiting, the surplus one closes.
        assert!(matches!(p.put(fake(2, t), t), Some((Fake { id: 2, .. }, CloseReason::PoolShrunk))));
        assert!(p.put(fake(1, t), t).is_none(), "within pool_size: kept");
    }

    #[test]
    fn sweep_times_out_long_waits_and_keeps_the_rest_in_order() {
        let t = Instant::now();
        let wait = Duration::from_secs(5);
        let mut p = Inner::<Fake>::new(1, HOUR, HOUR);
        let mut ex = Vec::new();
        assert!(matches!(p.take(t, t, &mut ex), Take::Create));
        let Take::Wait(mut old) = p.take(t, t, &mut ex) else { panic!("should wait") };
        assert!(p.claim_sweeper(), "the first waiter starts the sweeper");
        let Take::Wait(gave_up) = p.take(t + Duration::from_secs(1), t + Duration::from_secs(1), &mut ex) else {
            panic!("should wait")
        };
        let Take::Wait(mut young) = p.take(t + Duration::from_secs(2), t + Duration::from_secs(2), &mut ex) else {
            panic!("should wait")
        };
        assert!(!p.claim_sweeper(), "one sweeper at a time");
        drop(gave_up);
        // At t+5s the first has waited 5s: timed out; the one that gave up is forgotten.
        assert!(p.sweep_waiters(t + wait, wait), "someone still waits");
        assert!(matches!(old.try_recv(), Err(oneshot::error::TryRecvError::Closed)));
        assert_eq!(p.waiting(), 1);
        assert!(p.put(fake(1, t), t).is_none());
        assert!(matches!(young.try_recv(), Ok(Grant::Backend(Fake { id: 1, .. }))));
        // Nobody left: the sweeper stops, and the next waiter starts a new one.
        assert!(!p.sweep_waiters(t + wait, wait));
        let Take::Wait(_next) = p.take(t + wait, t + wait, &mut ex) else { panic!("should wait") };
        assert!(p.claim_sweeper());
    }

    #[test]
    fn a_retried_wait_is_timed_from_the_request_not_the_retry() {
        let t = Instant::now();
        let wait = Duration::from_secs(5);
        let mut p = Inner::<Fake>::new(1, HOUR, HOUR);
        let mut ex = Vec::new();
        assert!(matches!(p.take(t, t, &mut ex), Take::Create));
        // Asked at t, queued again at t+4s (its granted backend was dead).
        let Take::Wait(mut retry) = p.take(t + Duration::from_secs(4), t, &mut ex) else { panic!("should wait") };
        assert!(!p.sweep_waiters(t + wait, wait));
        assert!(matches!(retry.try_recv(), Err(oneshot::error::TryRecvError::Closed)));
    }

    /// `query_wait_timeout = 0` means no limit (PgBouncer's meaning), not "fail
    /// at once"; a waiter that gave up is still forgotten.
    #[test]
    fn a_zero_wait_never_times_out() {
        let t = Instant::now();
        let mut p = Inner::<Fake>::new(1, HOUR, HOUR);
        let mut ex = Vec::new();
        assert!(matches!(p.take(t, t, &mut ex), Take::Create));
        let Take::Wait(mut patient) = p.take(t, t, &mut ex) else { panic!("should wait") };
        let Take::Wait(gone) = p.take(t, t, &mut ex) else { panic!("should wait") };
        drop(gone);
        assert!(p.sweep_waiters(t + HOUR, Duration::ZERO), "the patient waiter is still queued");
        assert!(matches!(patient.try_recv(), Err(oneshot::error::TryRecvError::Empty)));
        assert!(p.put(fake(3, t), t).is_none());
        assert!(matches!(patient.try_recv(), Ok(Grant::Backend(Fake { id: 3, .. }))));
        assert!(!p.sweep_waiters(t + HOUR, Duration::ZERO), "nobody left to sweep");
    }

    #[test]
    fn newcomer_does_not_overtake_waiters() {
        let t = Instant::now();
        let mut p = Inner::<Fake>::new(1, HOUR, HOUR);
        let mut ex = Vec::new();
        assert!(matches!(p.take(t, t, &mut ex), Take::Create));
        let Take::Wait(_w) = p.take(t, t, &mut ex) else { panic!() };
        // The slot frees and goes to the waiter; a newcomer must queue.
        p.forget();
        assert!(matches!(p.take(t, t, &mut ex), Take::Wait(_)));
    }

    #[test]
    fn abandoned_waiter_is_skipped() {
        let t = Instant::now();
        let mut p = Inner::<Fake>::new(1, HOUR, HOUR);
        let mut ex = Vec::new();
        p.take(t, t, &mut ex);
        let Take::Wait(gone) = p.take(t, t, &mut ex) else { panic!() };
        drop(gone);
        let Take::Wait(mut live) = p.take(t, t, &mut ex) else { panic!() };
        assert!(p.put(fake(7, t), t).is_none());
        assert!(matches!(live.try_recv(), Ok(Grant::Backend(Fake { id: 7, .. }))));
    }

    #[test]
    fn expired_idle_backends_are_closed_not_handed_out() {
        let t = Instant::now();
        let mut p = Inner::<Fake>::new(2, Duration::from_secs(10), HOUR);
        let mut ex = Vec::new();
        p.take(t, t, &mut ex);
        assert!(p.put(fake(1, t), t).is_none());
        let later = t + Duration::from_secs(11);
        assert!(matches!(p.take(later, later, &mut ex), Take::Create));
        assert_eq!(ex.len(), 1);
        assert_eq!(ex[0].1, CloseReason::LifetimeOver);
        assert_eq!(p.open(), 1);
    }

    /// `server_lifetime = 0` and `server_idle_timeout = 0` disable them (as in PgBouncer).
    #[test]
    fn zero_lifetime_and_idle_timeout_never_expire() {
        let t = Instant::now();
        let mut p = Inner::<Fake>::new(1, Duration::ZERO, Duration::ZERO);
        let mut ex = Vec::new();
        p.take(t, t, &mut ex);
        let much_later = t + 1000 * HOUR;
        assert!(p.put(fake(1, t), much_later).is_none(), "kept on return");
        assert!(p.expire_idle(much_later, 0).is_empty(), "kept by the janitor");
        assert!(matches!(p.take(much_later, much_later, &mut ex), Take::Idle(Fake { id: 1, .. })));
        assert!(ex.is_empty());
    }

    #[test]
    fn lifetime_over_on_return_closes() {
        let t = Instant::now();
        let mut p = Inner::<Fake>::new(1, Duration::from_secs(10), HOUR);
        p.take(t, t, &mut Vec::new());
        let (_, why) = p.put(fake(1, t), t + Duration::from_secs(10)).expect("closed");
        assert_eq!(why, CloseReason::LifetimeOver);
        assert_eq!(p.open(), 0);
    }

    #[test]
    fn shrunk_pool_retires_surplus_on_return() {
        let t = Instant::now();
        let mut p = Inner::<Fake>::new(3, HOUR, HOUR);
        for _ in 0..3 {
            p.take(t, t, &mut Vec::new());
        }
        p.pool_size = 1;
        assert_eq!(p.put(fake(1, t), t).map(|x| x.1), Some(CloseReason::PoolShrunk));
        assert_eq!(p.put(fake(2, t), t).map(|x| x.1), Some(CloseReason::PoolShrunk));
        assert!(p.put(fake(3, t), t).is_none());
        assert_eq!(p.open(), 1);
    }

    #[test]
    fn janitor_expires_idle_but_keeps_min() {
        let t = Instant::now();
        let mut p = Inner::<Fake>::new(4, HOUR, Duration::from_secs(60));
        for _ in 0..3 {
            assert!(matches!(p.take(t, t, &mut Vec::new()), Take::Create));
        }
        for i in 0..3 {
            assert!(p.put(fake(i, t), t).is_none());
        }
        let closed = p.expire_idle(t + Duration::from_secs(61), 1);
        assert_eq!(closed.len(), 2);
        assert_eq!(p.open(), 1);
        assert_eq!(p.reserve_for_min(3), 2);
        assert_eq!(p.open(), 3);
    }

    #[test]
    fn growing_grants_slots_to_waiters() {
        let t = Instant::now();
        let mut p = Inner::<Fake>::new(1, HOUR, HOUR);
        let mut ex = Vec::new();
        assert!(matches!(p.take(t, t, &mut ex), Take::Create));
        let Take::Wait(mut a) = p.take(t, t, &mut ex) else { panic!() };
        let Take::Wait(mut b) = p.take(t, t, &mut ex) else { panic!() };
        assert!(p.reconfigure(3, HOUR, HOUR).is_empty());
        assert!(matches!(a.try_recv(), Ok(Grant::Slot)));
        assert!(matches!(b.try_recv(), Ok(Grant::Slot)));
        assert_eq!(p.open(), 3);
    }

    #[test]
    fn shrinking_closes_idle_surplus_now_and_busy_on_return() {
        let t = Instant::now();
        let mut p = Inner::<Fake>::new(4, HOUR, HOUR);
        for _ in 0..4 {
            p.take(t, t, &mut Vec::new());
        }
        for i in 0..3 {
            assert!(p.put(fake(i, t), t).is_none());
        }
        // 3 idle, 1 busy; shrink to 1: all 3 idle go now, the busy one is the survivor.
        let closed = p.reconfigure(1, HOUR, HOUR);
        assert_eq!(closed.iter().map(|c| c.0.id).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(p.open(), 1);
        assert!(p.put(fake(3, t), t).is_none());
        // Shrink below what is busy: the idle survivor stays until it is over size.
        let mut p = Inner::<Fake>::new(3, HOUR, HOUR);
        for _ in 0..3 {
            p.take(t, t, &mut Vec::new());
        }
        assert!(p.reconfigure(1, HOUR, HOUR).is_empty());
        assert_eq!(p.put(fake(1, t), t).map(|x| x.1), Some(CloseReason::PoolShrunk));
        assert_eq!(p.put(fake(2, t), t).map(|x| x.1), Some(CloseReason::PoolShrunk));
        assert!(p.put(fake(3, t), t).is_none());
    }

    #[test]
    fn retarget_closes_old_generation_and_retire_closes_all() {
        let t = Instant::now();
        let mut p = Inner::<Fake>::new(3, HOUR, HOUR);
        for _ in 0..3 {
            p.take(t, t, &mut Vec::new());
        }
        assert!(p.put(fake(1, t), t).is_none());
        let closed = p.retarget();
        assert_eq!((closed.len(), closed[0].1), (1, CloseReason::Retargeted));
        assert_eq!(p.put(fake(2, t), t).map(|x| x.1), Some(CloseReason::Retargeted));
        let fresh = Fake { generation: p.generation(), ..fake(3, t) };
        assert!(p.put(fresh, t).is_none());
        assert_eq!(p.open(), 1);
        let closed = p.retire();
        assert_eq!((closed.len(), closed[0].1), (1, CloseReason::Retired));
        assert_eq!(p.open(), 0);
        assert!(matches!(p.take(t, t, &mut Vec::new()), Take::Create));
        let fresh = Fake { generation: p.generation(), ..fake(4, t) };
        assert_eq!(p.put(fresh, t).map(|x| x.1), Some(CloseReason::Retired));
    }
}
