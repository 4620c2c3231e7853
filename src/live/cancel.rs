//! Cancel keys: each client gets a pgmux-made (pid, secret); a CancelRequest
//! carrying it is forwarded to whichever backend that client holds right now.
//!
//! The backend a client holds is already published in its
//! [`ClientInfo::link`] (for SHOW CLIENTS); the key maps to that, so linking
//! a backend costs one store, and a client costs no cancel slot of its own.

use std::net::SocketAddr;
use std::sync::Arc;

use dashmap::DashMap;
use subtle::ConstantTimeEq;

use super::registry::ClientInfo;

/// Where a cancel for a client must go at this moment.
#[derive(Debug, Clone, Copy)]
pub struct CancelTarget {
    pub addr: SocketAddr,
    pub pid: i32,
    pub secret: i32,
}

/// All live client keys. Shared by the accept loop and client tasks.
#[derive(Debug, Default)]
pub struct CancelRegistry {
    /// pid → (secret, the client it was issued to).
    keys: DashMap<i32, (i32, Arc<ClientInfo>)>,
}

/// Removes the key when the client task ends.
#[derive(Debug)]
pub struct CancelKey<'a> {
    registry: &'a CancelRegistry,
    pub pid: i32,
    pub secret: i32,
}

impl Drop for CancelKey<'_> {
    fn drop(&mut self) {
        self.registry.keys.remove(&self.pid);
    }
}

impl CancelRegistry {
    /// Issues a fresh key for `client`. Pids are positive (like real ones)
    /// and unique among live clients.
    pub fn issue(&self, client: &Arc<ClientInfo>) -> CancelKey<'_> {
        loop {
            let pid = rand::random::<i32>() & i32::MAX;
            let secret = rand::random::<i32>();
            if pid == 0 {
                continue;
            }
            if let dashmap::Entry::Vacant(e) = self.keys.entry(pid) {
                e.insert((secret, client.clone()));
                return CancelKey { registry: self, pid, secret };
            }
        }
    }

    /// The backend to cancel for this key, if the key is genuine and its client holds one.
    pub fn target(&self, pid: i32, secret: i32) -> Option<CancelTarget> {
        let (expected, client) = self.keys.get(&pid)?.clone();
        if !bool::from(expected.to_be_bytes().ct_eq(&secret.to_be_bytes())) {
            return None;
        }
        client.link().map(|l| CancelTarget { addr: l.addr, pid: l.pid, secret: l.secret })
    }
}
