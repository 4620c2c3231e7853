//! Why a request went where it went, and why a client was pinned: named by
//! routing and the client, counted by the pool, reported by the admin views.

use std::fmt;

/// Why a request went where it went; counted per reason in `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteReason {
    /// A read served by a replica.
    Read,
    /// Not a read (or not surely one).
    Write,
    /// An explicit read-write transaction.
    Transaction,
    /// Read-your-writes kept this scope on the primary.
    Sticky,
    /// A `/* pgmux:... */` hint decided.
    Hint,
    /// A read that waited (up to `max_replica_wait`) for a replica to replay
    /// the scope's write, and was served by it.
    CaughtUp,
    /// Replicas are up but none has replayed far enough (or lags too much).
    ReplicaLagging,
    /// No healthy replica.
    NoReplica,
    /// A replica refused a write (25006); re-run on the primary.
    MisrouteRetry,
    /// The chosen replica could not give a connection.
    ReplicaFailed,
}

impl RouteReason {
    pub const ALL: [RouteReason; 10] = [
        RouteReason::Read,
        RouteReason::Write,
        RouteReason::Transaction,
        RouteReason::Sticky,
        RouteReason::Hint,
        RouteReason::CaughtUp,
        RouteReason::ReplicaLagging,
        RouteReason::NoReplica,
        RouteReason::MisrouteRetry,
        RouteReason::ReplicaFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RouteReason::Read => "read",
            RouteReason::Write => "write",
            RouteReason::Transaction => "transaction",
            RouteReason::Sticky => "sticky",
            RouteReason::Hint => "hint",
            RouteReason::CaughtUp => "caught_up",
            RouteReason::ReplicaLagging => "replica_lagging",
            RouteReason::NoReplica => "no_replica",
            RouteReason::MisrouteRetry => "misroute_retry",
            RouteReason::ReplicaFailed => "replica_failed",
        }
    }
}

/// Why a client needs its backend for the rest of its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinReason {
    Listen,
    AdvisoryLock,
    SqlPrepare,
    TempTable,
    HoldCursor,
}

impl PinReason {
    pub const ALL: [PinReason; 5] = [
        PinReason::Listen,
        PinReason::AdvisoryLock,
        PinReason::SqlPrepare,
        PinReason::TempTable,
        PinReason::HoldCursor,
    ];

    /// A label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            PinReason::Listen => "listen",
            PinReason::AdvisoryLock => "advisory_lock",
            PinReason::SqlPrepare => "sql_prepare",
            PinReason::TempTable => "temp_table",
            PinReason::HoldCursor => "with_hold_cursor",
        }
    }

    /// What the client did, for its error message.
    pub fn statement(self) -> &'static str {
        match self {
            PinReason::Listen => "LISTEN",
            PinReason::AdvisoryLock => "a session-level advisory lock",
            PinReason::SqlPrepare => "SQL PREPARE",
            PinReason::TempTable => "CREATE TEMPORARY TABLE",
            PinReason::HoldCursor => "DECLARE ... WITH HOLD",
        }
    }
}

impl fmt::Display for PinReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
