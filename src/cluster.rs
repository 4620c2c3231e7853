//! Throwaway PostgreSQL clusters (primary + streaming replicas) for `demo` and tests.
