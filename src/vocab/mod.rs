//! Small types several layers name: latency histograms, the reasons
//! requests are routed and clients pinned, and Postgres's socket paths. Leaves: nothing here imports the
//! rest of pgmux, so the pool can count routing reasons without importing
//! routing, and the admin views report pins without importing the client.

pub mod histogram;
pub mod reasons;
pub mod socket;
