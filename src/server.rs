//! Listener, accept loop, shutdown.
