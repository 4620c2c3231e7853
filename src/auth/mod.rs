//! Authentication, both sides: clients to pgmux, pgmux to Postgres.
//!
//! The protocol cores are sans-I/O ([`scram::ScramServer`], [`md5`]); the
//! async driver [`client::authenticate_client`] only moves their messages
//! over a stream.

pub mod client;
pub mod md5;
pub mod scram;

pub use client::{AuthError, authenticate_client};
pub use scram::{ScramError, ScramServer, ScramVerifier};
