//! Process-wide counters for `/metrics` (per-pool ones live in `Pool`).

use std::sync::atomic::AtomicU64;

#[derive(Debug, Default)]
pub struct Stats {
    /// Connections accepted and handed to a client task (cancel requests and
    /// failed logins included).
    pub client_connections: AtomicU64,
    /// Logins refused for a wrong password or an unknown user.
    pub auth_failures: AtomicU64,
    /// Clients pinned to their backend, by [`crate::client::pinning::PinReason::ALL`] index.
    pub pinned: [AtomicU64; 5],
    /// Statements refused under `on_session_state = "error"`, same indexing.
    pub session_state_refused: [AtomicU64; 5],
    /// Configuration reloads (SIGHUP, RELOAD) that were applied.
    pub reloads_ok: AtomicU64,
    /// Configuration reloads refused (unreadable or invalid file).
    pub reloads_failed: AtomicU64,
}
