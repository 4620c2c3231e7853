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
pub use client::{AuthError, DerivedVerifier, authenticate_client, authenticate_client_rechecked};

/// What pgmux logs in to Postgres with, as some user.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// The plaintext password: any method.
    Password(String),
    /// The stored `md5...` hash: enough for md5, which hashes it with the salt.
    Md5Hash(String),
    /// Keys recovered from a client's SCRAM proof: SCRAM only.
    Scram(ScramKeys),
}

// Hand-written so no secret can reach a log line.
impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Credential::Password(_) => "Credential::Password(..)",
            Credential::Md5Hash(_) => "Credential::Md5Hash(..)",
            Credential::Scram(_) => "Credential::Scram(..)",
        })
    }
}
pub use scram::{KeyedScramClient, ScramError, ScramKeys, ScramServer, ScramVerifier};
