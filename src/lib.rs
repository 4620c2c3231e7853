//! pgmux: a PostgreSQL connection-pooling proxy.
//!
//! The binary (`main.rs`) is a thin CLI; everything else lives here so that
//! integration tests and the `demo` command drive the same code.

pub mod admin;
pub mod auth;
pub mod client;
pub mod cluster;
pub mod config;
pub mod convert;
pub mod demo;
pub mod live;
pub mod net;
pub mod pool;
pub mod protocol;
pub mod reload;
pub mod routing;
pub mod server;
pub mod settings;
pub mod sql;
pub mod tls;
pub mod vocab;
