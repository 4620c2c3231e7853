//! Authentication, both sides: clients to pgmux, pgmux to Postgres.
