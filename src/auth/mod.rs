//! Authentication, both sides: clients to pgmux, pgmux to Postgres.
//!
//! The protocol cores are sans-I/O ([`scram::ScramServer`], [`md5`]); the
//! async drivers ([`client::authenticate_client`],
//! [`backend::login_backend`]) only move their messages over a stream.

pub mod backend;
pub mod client;
pub mod md5;
pub mod scram;

pub use backend::{BackendLoginError, ServerHello, login_backend};
pub use client::{AuthError, DerivedVerifier, authenticate_client};
pub use scram::{ScramError, ScramServer, ScramVerifier};
