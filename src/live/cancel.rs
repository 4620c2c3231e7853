//! Cancel keys: each client gets a pgmux-made (pid, secret); a CancelRequest
//! carrying it is forwarded to whichever backend that client holds right now.
//!
//! The backend a client holds is already published in its
//! [`ClientInfo::link`] (for SHOW CLIENTS); the key maps to that, so linking
//! a backend costs one store, and a client costs no cancel slot of its own.
//!
//! Several instances (`[proxy] peer_id`, `[[peers]]`): a CancelRequest opens
//! a connection of its own, which a shared port or a load balancer may hand
//! to another instance than the client's. So a key names the instance that
//! issued it, and the one receiving it forwards it there. The layout is
//! PgBouncer's peering: of the 8 key bytes (pid then secret, big-endian),
//! pid bytes 1 and 2 hold the peer id (low byte, high byte), the pid's sign
//! bit is clear, and the low 2 bits of the secret's last byte are a TTL, 1
//! when issued: a cancel is forwarded at most once, and never loops.

use std::sync::Arc;

use dashmap::DashMap;

use super::registry::ClientInfo;
use crate::config::PeerConfig;

/// The secret's TTL bits.
const TTL_MASK: i32 = 0b11;

/// Where a cancel for a client must go at this moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelTarget {
    pub addr: crate::net::ServerAddr,
    pub pid: i32,
    pub secret: i32,
}

/// What to do with a CancelRequest.
#[derive(Debug, PartialEq, Eq)]
pub enum CancelRoute<'a> {
    /// One of this instance's clients: cancel what its backend runs now
    /// (`None`: it holds none, there is nothing to cancel).
    Local(Option<CancelTarget>),
    /// Issued by the peer at `addr`: send it `(pid, secret)`, its TTL spent.
    Forward { peer: u16, addr: &'a str, pid: i32, secret: i32 },
    /// Nobody's key, or one that may not travel further; the reason is for the log.
    Drop(&'static str),
}

/// What became of CancelRequests, as `/metrics` labels them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// A key of a client here.
    Local,
    /// Sent on to the peer that issued the key.
    Forwarded,
    /// No such client, TTL spent, or an unknown peer.
    Dropped,
}

impl CancelOutcome {
    pub const ALL: [CancelOutcome; 3] = [CancelOutcome::Local, CancelOutcome::Forwarded, CancelOutcome::Dropped];

    pub fn as_str(self) -> &'static str {
        match self {
            CancelOutcome::Local => "local",
            CancelOutcome::Forwarded => "forwarded",
            CancelOutcome::Dropped => "dropped",
        }
    }
}

/// All live client keys. Shared by the accept loop and client tasks.
#[derive(Debug, Default)]
pub struct CancelRegistry {
    /// This instance's `[proxy] peer_id`; 0: peering off.
    peer_id: u16,
    /// (pid, secret without its TTL bits) → the client it was issued to.
    /// Keyed by both, not by the pid: with a peer id in it the pid keeps
    /// only 15 random bits, too few to be unique among thousands of clients.
    /// Matching the secret as part of the key is as blind as a
    /// constant-time comparison: one integer comparison, after probes that
    /// follow a hash keyed at random per process, which says nothing about
    /// how close a guess came.
    keys: DashMap<u64, Arc<ClientInfo>>,
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
        self.registry.keys.remove(&slot(self.pid, self.secret));
    }
}

/// The registry's key for (pid, secret): the TTL is not part of a key's identity.
fn slot(pid: i32, secret: i32) -> u64 {
    (u64::from(pid as u32) << 32) | u64::from((secret & !TTL_MASK) as u32)
}

/// The peer id a key's pid carries.
pub fn peer_of(pid: i32) -> u16 {
    let b = pid.to_be_bytes();
    u16::from_le_bytes([b[1], b[2]])
}

impl CancelRegistry {
    /// The keys of the instance with `peer_id` (`[proxy] peer_id`, at most
    /// 16383; 0: peering off).
    pub fn new(peer_id: u16) -> CancelRegistry {
        CancelRegistry { peer_id, keys: DashMap::new() }
    }

    /// Issues a fresh key for `client`: positive pid (like real ones) that
    /// carries this instance's peer id, TTL 1, unique among live clients.
    pub fn issue(&self, client: &Arc<ClientInfo>) -> CancelKey<'_> {
        loop {
            let mut pid: [u8; 4] = rand::random();
            let mut secret: [u8; 4] = rand::random();
            pid[0] &= 0x7f;
            if self.peer_id > 0 {
                [pid[1], pid[2]] = self.peer_id.to_le_bytes();
            }
            secret[3] = (secret[3] & !(TTL_MASK as u8)) | 1;
            let (pid, secret) = (i32::from_be_bytes(pid), i32::from_be_bytes(secret));
            if pid == 0 {
                continue;
            }
            if let dashmap::Entry::Vacant(e) = self.keys.entry(slot(pid, secret)) {
                e.insert(client.clone());
                return CancelKey { registry: self, pid, secret };
            }
        }
    }

    /// Where a CancelRequest for (pid, secret) goes. A key of this instance
    /// (or any key, with peering off) is looked up here, its TTL ignored; one
    /// issued by a listed peer is forwarded to it while its TTL allows.
    pub fn route<'a>(&self, pid: i32, secret: i32, peers: &'a [PeerConfig]) -> CancelRoute<'a> {
        let issuer = peer_of(pid);
        if self.peer_id == 0 || issuer == self.peer_id {
            return match self.keys.get(&slot(pid, secret)) {
                Some(client) => CancelRoute::Local(
                    client.link().and_then(|l| Some(CancelTarget { addr: l.addr()?, pid: l.pid, secret: l.secret })),
                ),
                None => CancelRoute::Drop("no client has this key"),
            };
        }
        if secret & TTL_MASK == 0 {
            return CancelRoute::Drop("issued by another instance and forwarded already");
        }
        match peers.iter().find(|p| p.id == u32::from(issuer)) {
            // Spent whatever it was: even a key crafted with a higher TTL travels once.
            Some(p) => CancelRoute::Forward { peer: issuer, addr: &p.addr, pid, secret: secret & !TTL_MASK },
            None => CancelRoute::Drop("issued by an instance not in [[peers]]"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::live::registry::ClientRegistry;
    use crate::live::stats::Stats;

    fn peer(id: u32, addr: &str) -> PeerConfig {
        PeerConfig { id, addr: addr.to_owned() }
    }

    #[test]
    fn keys_carry_the_peer_id_a_positive_pid_and_ttl_one() {
        let (clients, stats) = (ClientRegistry::default(), Stats::default());
        let info = clients.register(&stats, 1, None, None);
        for id in [1u16, 2, 255, 256, 16383] {
            let registry = CancelRegistry::new(id);
            let keys: Vec<_> = (0..200).map(|_| registry.issue(&info)).collect();
            for k in &keys {
                assert!(k.pid > 0, "{}", k.pid);
                assert_eq!(peer_of(k.pid), id);
                assert_eq!(k.secret & TTL_MASK, 1);
            }
            assert_eq!(registry.keys.len(), 200, "unique");
        }
        let off = CancelRegistry::new(0);
        assert!((0..200).map(|_| off.issue(&info)).all(|k| k.pid > 0 && k.secret & TTL_MASK == 1));
    }

    /// 15 random pid bits: many clients share a pid, and keys stay unique
    /// without spinning; each key finds its own client and no other.
    #[test]
    fn thousands_of_keys_with_a_peer_id_stay_apart() {
        let (clients, stats) = (ClientRegistry::default(), Stats::default());
        let registry = CancelRegistry::new(7);
        let infos: Vec<_> = (0..20_000).map(|i| clients.register(&stats, i, None, None)).collect();
        let keys: Vec<_> = infos.iter().map(|i| registry.issue(i)).collect();
        let mut pids: Vec<i32> = keys.iter().map(|k| k.pid).collect();
        pids.sort_unstable();
        pids.dedup();
        assert!(pids.len() < keys.len(), "some pids are shared: the secret must tell them apart");
        assert_eq!(registry.keys.len(), keys.len());
        for (k, info) in keys.iter().zip(&infos) {
            let found = registry.keys.get(&slot(k.pid, k.secret)).expect("its own key");
            assert!(Arc::ptr_eq(found.value(), info));
        }
        drop(keys);
        assert!(registry.keys.is_empty(), "keys leave with their clients");
    }

    #[test]
    fn routes_local_forward_or_drop() {
        let (clients, stats) = (ClientRegistry::default(), Stats::default());
        let info = clients.register(&stats, 1, None, None);
        let peers = [peer(2, "10.0.0.2:6433"), peer(300, "pgmux-3:6433")];
        let a = CancelRegistry::new(1);
        let key = a.issue(&info);
        // Its own key: looked up here, TTL ignored; the client holds no backend.
        assert_eq!(a.route(key.pid, key.secret, &peers), CancelRoute::Local(None));
        assert_eq!(a.route(key.pid, key.secret & !TTL_MASK, &peers), CancelRoute::Local(None));
        assert_eq!(a.route(key.pid, key.secret | TTL_MASK, &peers), CancelRoute::Local(None));
        // A wrong secret (beyond the TTL bits) or pid finds nothing.
        assert!(matches!(a.route(key.pid, key.secret ^ 4, &peers), CancelRoute::Drop(_)));
        assert!(matches!(a.route(key.pid ^ 1, key.secret, &peers), CancelRoute::Drop(_)));
        assert!(matches!(a.route(key.pid ^ (1 << 24), key.secret, &peers), CancelRoute::Drop(_)));

        // Keys of peers 2 and 300, as they issue them.
        let (b, c) = (CancelRegistry::new(2), CancelRegistry::new(300));
        let (kb, kc) = (b.issue(&info), c.issue(&info));
        assert_eq!(
            a.route(kb.pid, kb.secret, &peers),
            CancelRoute::Forward { peer: 2, addr: "10.0.0.2:6433", pid: kb.pid, secret: kb.secret & !TTL_MASK }
        );
        // Forwarded once (TTL 0 now), a key of another instance goes nowhere:
        // a misconfigured [[peers]] cannot bounce it around.
        let CancelRoute::Forward { pid, secret, .. } = a.route(kc.pid, kc.secret, &peers) else { panic!() };
        assert_eq!(secret & TTL_MASK, 0);
        assert!(matches!(a.route(pid, secret, &peers), CancelRoute::Drop(_)));
        // Even with a crafted higher TTL, it travels once.
        let CancelRoute::Forward { secret, .. } = a.route(kc.pid, kc.secret | TTL_MASK, &peers) else { panic!() };
        assert_eq!(secret & TTL_MASK, 0);
        // Forwarded to the issuer, it is the issuer's own key there.
        assert_eq!(b.route(kb.pid, kb.secret & !TTL_MASK, &peers), CancelRoute::Local(None));
        // An id not listed: dropped.
        let d = CancelRegistry::new(9);
        let kd = d.issue(&info);
        assert!(matches!(a.route(kd.pid, kd.secret, &peers), CancelRoute::Drop(_)));

        // Peering off: every key is looked up here.
        let off = CancelRegistry::new(0);
        let ko = off.issue(&info);
        assert_eq!(off.route(ko.pid, ko.secret, &peers), CancelRoute::Local(None));
        assert!(matches!(off.route(kb.pid, kb.secret, &peers), CancelRoute::Drop(_)));
    }
}
