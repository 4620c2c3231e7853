//! A CancelRequest: cancel what a client here runs, forward it to the peer
//! instance that issued its key, or drop it ([`crate::live::cancel`] decides).

use std::sync::atomic::Ordering;

use crate::live::Shared;
use crate::live::cancel::{CancelOutcome, CancelRoute};
use crate::settings::Settings;

/// Acts on a CancelRequest for (pid, secret) that arrived as connection
/// `client`; returns once the server (or the peer) has taken it, so that
/// closing the requester's connection afterwards tells it the cancel is done.
pub(super) async fn cancel(shared: &Shared, config: &Settings, client: u64, pid: i32, secret: i32) {
    let route = shared.cancels.route(pid, secret, &config.peers);
    let outcome = match &route {
        CancelRoute::Local(_) => CancelOutcome::Local,
        CancelRoute::Forward { .. } => CancelOutcome::Forwarded,
        CancelRoute::Drop(_) => CancelOutcome::Dropped,
    };
    shared.stats.cancel_requests[outcome as usize].fetch_add(1, Ordering::Relaxed);
    match route {
        CancelRoute::Local(Some(t)) => {
            tracing::debug!(client, backend_pid = t.pid, "forwarding cancel request to the server");
            super::relay::cancel_backend(t.addr, t.pid, t.secret).await;
        }
        CancelRoute::Local(None) => tracing::debug!(client, "cancel request for a client without a server connection"),
        CancelRoute::Forward { peer, addr, pid, secret } => {
            tracing::debug!(client, peer, addr, "forwarding cancel request to the instance that issued its key");
            super::relay::forward_cancel(addr, pid, secret).await;
        }
        CancelRoute::Drop(why) => tracing::debug!(client, why, "cancel request dropped"),
    }
}
