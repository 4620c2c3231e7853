//! The admin console (`psql ... dbname=pgmux`) and the `/metrics` endpoint:
//! read-only views (apart from the console's commands) over the live state
//! ([`crate::live`]), the pools and the routing.

pub mod console;
pub mod metrics;
pub mod show;

#[cfg(test)]
mod fuzz_tests;

pub use console::serve;

/// The database name that selects the console.
pub const DATABASE: &str = "pgmux";

/// PgBouncer's name for it: monitoring tools and exporters written for
/// PgBouncer connect to `pgbouncer`, most of them without a setting to change it.
pub const PGBOUNCER_DATABASE: &str = "pgbouncer";

/// Whether a client asking for `database` gets the console (unless proxy.toml
/// lists a real database of that name, which wins).
pub fn is_console(database: &str) -> bool {
    database == DATABASE || database == PGBOUNCER_DATABASE
}
