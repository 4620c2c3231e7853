//! The admin console (`psql ... dbname=pgmux`) and the `/metrics` endpoint,
//! with the live-state registries both read.

pub mod console;
pub mod metrics;
pub mod pause;
pub mod registry;
pub mod show;
pub mod stats;

#[cfg(test)]
mod fuzz_tests;

pub use console::serve;

/// The database name that selects the console.
pub const DATABASE: &str = "pgmux";
