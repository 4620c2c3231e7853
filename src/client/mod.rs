//! One task per client connection.
