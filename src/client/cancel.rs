//! Cancel keys: each client gets a pgmux-made (pid, secret); a CancelRequest
//! carrying it is forwarded to whichever backend that client holds right now.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use subtle::ConstantTimeEq;

/// Where a cancel for a client must go at this moment.
#[derive(Debug, Clone, Copy)]
pub struct CancelTarget {
    pub addr: SocketAddr,
    pub pid: i32,
    pub secret: i32,
}

#[derive(Debug)]
pub struct CancelSlot {
    secret: i32,
    target: Mutex<Option<CancelTarget>>,
}

impl CancelSlot {
    /// Called by the client task when it links to (Some) or releases (None) a backend.
    pub fn set(&self, target: Option<CancelTarget>) {
        *self.target.lock().unwrap_or_else(|e| e.into_inner()) = target;
    }
}

/// All live client keys. Shared by the accept loop and client tasks.
#[derive(Debug, Default)]
pub struct CancelRegistry {
    slots: DashMap<i32, Arc<CancelSlot>>,
}

/// Removes the key when the client task ends.
#[derive(Debug)]
pub struct CancelKey<'a> {
    registry: &'a CancelRegistry,
    pub pid: i32,
    pub secret: i32,
    pub slot: Arc<CancelSlot>,
}

impl Drop for CancelKey<'_> {
    fn drop(&mut self) {
        self.registry.slots.remove(&self.pid);
    }
}

impl CancelRegistry {
    /// Issues a fresh key. Pids are positive (like real ones) and unique among live clients.
    pub fn issue(&self) -> CancelKey<'_> {
        loop {
            let pid = rand::random::<i32>() & i32::MAX;
            let secret = rand::random::<i32>();
            if pid == 0 {
                continue;
            }
            let slot = Arc::new(CancelSlot { secret, target: Mutex::new(None) });
            if let dashmap::Entry::Vacant(e) = self.slots.entry(pid) {
                e.insert(slot.clone());
                return CancelKey { registry: self, pid, secret, slot };
            }
        }
    }

    /// The backend to cancel for this key, if the key is genuine and its client holds one.
    pub fn target(&self, pid: i32, secret: i32) -> Option<CancelTarget> {
        let slot = self.slots.get(&pid)?.clone();
        if !bool::from(slot.secret.to_be_bytes().ct_eq(&secret.to_be_bytes())) {
            return None;
        }
        *slot.target.lock().unwrap_or_else(|e| e.into_inner())
    }
}
