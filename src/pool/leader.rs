//! Where the pools of a database with several nodes send their backends:
//! the primary its topology observes now, or nobody while none is known.
//! The topology ([`crate::routing::topology`]) publishes; pools follow on
//! their next checkout ([`super::Pool::follow`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::watch;

#[derive(Debug)]
pub struct Leader {
    /// Moves on every publication: a pool compares it with the one it last
    /// followed, one atomic load per checkout.
    generation: AtomicU64,
    addr: watch::Sender<Option<Arc<str>>>,
}

impl Default for Leader {
    fn default() -> Self {
        Leader { generation: AtomicU64::new(1), addr: watch::Sender::new(None) }
    }
}

impl Leader {
    /// The primary's address now (`None`: no writable primary is known).
    pub fn current(&self) -> (u64, Option<Arc<str>>) {
        // Generation first: a pool that saw it has at least this address.
        let generation = self.generation.load(Ordering::Acquire);
        (generation, self.addr.borrow().clone())
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Publishes a new primary (or none). No-op when unchanged.
    pub fn set(&self, addr: Option<&str>) {
        self.addr.send_if_modified(|cur| {
            if cur.as_deref() == addr {
                return false;
            }
            *cur = addr.map(Arc::from);
            // Under the channel's lock, before receivers are woken: whoever
            // sees the new value sees the new generation.
            self.generation.fetch_add(1, Ordering::AcqRel);
            true
        });
    }

    /// Resolves `true` once the generation is no longer `from`, `false` at `deadline`.
    pub async fn moved(&self, from: u64, deadline: tokio::time::Instant) -> bool {
        let mut rx = self.addr.subscribe();
        if self.generation() != from {
            return true;
        }
        matches!(tokio::time::timeout_at(deadline, rx.changed()).await, Ok(Ok(())))
    }

    /// Resolves with the primary's address once one is known, or `None` at `deadline`.
    pub async fn known(&self, deadline: tokio::time::Instant) -> Option<Arc<str>> {
        let mut rx = self.addr.subscribe();
        let wait = rx.wait_for(|a| a.is_some());
        match tokio::time::timeout_at(deadline, wait).await {
            Ok(Ok(addr)) => addr.clone(),
            _ => None,
        }
    }
}
