//! Authentication, both sides: clients to pgmux, pgmux to Postgres.
//!
//! The protocol cores are sans-I/O ([`scram::ScramServer`], [`md5`]).

pub mod md5;
pub mod scram;

pub use scram::{ScramError, ScramServer, ScramVerifier};
