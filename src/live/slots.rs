//! Client slots: connected clients counted against `max_client_conn`, and
//! the cleanups of clients that left, which a shutdown waits for as well.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

use super::Shared;

/// Counts connected clients against `max_client_conn`, read from the
/// configuration in force at each accept (a reload that lowers it refuses
/// newcomers until enough clients have left; nobody is disconnected).
#[derive(Debug, Default)]
pub(super) struct ClientSlots {
    count: AtomicUsize,
    /// Woken when the count drops to zero.
    empty: Notify,
}

/// One connected client; frees its slot when dropped. It is also the
/// client task's handle on [`Shared`].
pub struct ClientSlot(Arc<Shared>);

impl ClientSlot {
    pub fn shared(&self) -> &Shared {
        &self.0
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.slots.release();
    }
}

/// The cleanup of a backend its client left mid-transaction: counted with
/// the clients, so that a shutdown waits for it (bounded by the cleanup's
/// own timeout) instead of ending the process with the query still running.
pub struct Lingering(Arc<ClientSlots>);

impl Drop for Lingering {
    fn drop(&mut self) {
        self.0.release();
    }
}

impl ClientSlots {
    /// One client or cleanup fewer; wakes the drain when none is left.
    fn release(&self) {
        if self.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.empty.notify_waiters();
        }
    }

    pub(super) fn linger(slots: &Arc<ClientSlots>) -> Lingering {
        slots.count.fetch_add(1, Ordering::AcqRel);
        Lingering(slots.clone())
    }

    pub(super) fn try_take(shared: &Arc<Shared>, max: usize) -> Option<ClientSlot> {
        let slots = &shared.slots;
        slots.count.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).ok()?;
        Some(ClientSlot(shared.clone()))
    }

    pub(super) fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Resolves once no client is connected.
    pub(super) async fn all_gone(&self) {
        loop {
            let empty = self.empty.notified();
            tokio::pin!(empty);
            // Registered before the check, so a drop to zero in between still wakes us.
            empty.as_mut().enable();
            if self.count() == 0 {
                return;
            }
            empty.await;
        }
    }
}
