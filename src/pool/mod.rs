//! Backend connection pools.
