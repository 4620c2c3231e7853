//! What a server connection owes: the responses it will send, in order, for
//! the messages it was sent (PgBouncer's `outstanding_requests`). The relay
//! fills and drains the queue; it belongs to the backend, which keeps its
//! allocation from one transaction to the next.

use std::collections::VecDeque;
use std::sync::Arc;

use super::statements::Statement;

/// A response pgmux is waiting for, in the order the server will send it.
/// Every message that gets an answer is tracked, so that an ErrorResponse is
/// attributed to the message that caused it: after an error in an
/// extended-protocol message the server skips everything up to the next
/// Sync (Queries included), after a simple Query's error it does not.
#[derive(Debug)]
pub enum Expect {
    /// ParseComplete. `forward: false` for a Parse pgmux injected. `statement`
    /// is the server copy it creates; `client_name` the client's name for it.
    Parse { forward: bool, statement: Option<Arc<Statement>>, client_name: Option<Box<[u8]>> },
    /// A Parse of a name the client already uses, sent under that statement's
    /// server name so the server refuses it (42P05) in order; the error is
    /// reworded to name the client's statement.
    DuplicateParse { client_name: Box<[u8]> },
    /// BindComplete; `statement` lets a stale-plan error retire the right statement.
    Bind { statement: Option<Arc<Statement>> },
    /// Describe: ends with RowDescription or NoData.
    Describe,
    /// Execute: ends with CommandComplete, EmptyQueryResponse or PortalSuspended.
    Execute,
    /// A Flush with a body: the server answers it with an error only.
    BadFlush,
    /// CloseComplete. `forward: false` for a Close pgmux injected.
    Close { forward: bool },
    /// ReadyForQuery. `forward: false` for a Sync pgmux injected; `sync`
    /// when a Sync asked for it (not a Query or FunctionCall): the server
    /// stops skipping there.
    Ready { forward: bool, sync: bool },
}

impl Expect {
    pub const QUERY: Expect = Expect::Ready { forward: true, sync: false };
    pub const SYNC: Expect = Expect::Ready { forward: true, sync: true };
}

/// A transaction's expected-response queue, emptied and kept by the backend
/// for its next transaction so that the queue is not allocated again for each.
#[derive(Debug, Default)]
pub struct SpareQueue(pub VecDeque<Expect>);
