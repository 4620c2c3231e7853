//! `pgmux demo`.
