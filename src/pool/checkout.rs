//! A backend out of its pool, and its one way home.
//!
//! Whoever holds a [`Checkout`] ends it with [`Checkout::release`]: back to
//! the idle list when the caller knows the connection is clean, closed
//! otherwise. Anything else (a timeout or a cancelled future while it is
//! held, a panic, a path that forgot) ends in `Drop`, which closes the
//! connection, since its protocol state is unknown, and gives the slot back.
//! So a slot can never leak, whichever way a client task ends.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::Instant;

use super::inner::CloseReason;
use super::{Backend, Pool};

#[derive(Debug)]
pub struct Checkout {
    pool: Arc<Pool>,
    /// `Some` until released; only `release` and `Drop` take it.
    backend: Option<Box<Backend>>,
}

/// How a backend goes back.
#[derive(Debug, Clone, Copy)]
pub enum Release {
    /// Idle on the server, nothing unread or unsent; last used at the instant.
    Clean(Instant),
    /// Not to be reused.
    Close(CloseReason),
}

impl Checkout {
    pub(super) fn new(pool: Arc<Pool>, backend: Box<Backend>) -> Checkout {
        Checkout { pool, backend: Some(backend) }
    }

    /// The pool the backend came from.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    pub fn release(mut self, how: Release) {
        let b = self.backend.take().expect("a checkout is released once");
        match how {
            Release::Clean(at) => self.pool.checkin_at(b, at),
            Release::Close(reason) => self.pool.discard(b, reason),
        }
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if let Some(b) = self.backend.take() {
            tracing::debug!(pid = b.pid, "server connection dropped without a release; closing it");
            self.pool.discard(b, CloseReason::Dirty);
        }
    }
}

impl Deref for Checkout {
    type Target = Backend;

    fn deref(&self) -> &Backend {
        self.backend.as_deref().expect("held until released")
    }
}

impl DerefMut for Checkout {
    fn deref_mut(&mut self) -> &mut Backend {
        self.backend.as_deref_mut().expect("held until released")
    }
}
