//! Process-wide counters for `/metrics` (per-pool ones live in `Pool`).

use std::sync::atomic::AtomicU64;

#[derive(Debug, Default)]
pub struct Stats {
    /// Connections accepted and handed to a client task (cancel requests and
    /// failed logins included).
    pub client_connections: AtomicU64,
    /// Logins refused for a wrong password or an unknown user.
    pub auth_failures: AtomicU64,
}
