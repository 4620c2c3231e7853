//! A client whose server connection was lost mid-transaction (a failover, a
//! shutdown, a crash) keeps its connection to pgmux, and gets what Postgres
//! gives for an error at that point: each request it had sent fails (the
//! server's own 57P01 when it said why, else 08006); inside a transaction
//! block the transaction is then *aborted*, as after any error: every
//! statement gets 25P02 until the client ends the block (`ROLLBACK`, or a
//! `COMMIT` that reports `ROLLBACK`), and its next transaction runs on a new
//! server connection. The client can never go on as if the lost
//! transaction were alive. When the loss cannot be answered that way (its
//! session state lived on the backend, a COPY or a half-sent message was in
//! flight), [`super::relay::Link::lost`] says so and the client is closed.

use bytes::{Buf, BufMut, BytesMut};

use super::request::{Request, read_unit};
use super::statements::ClientStatements;
use crate::net::Stream;
use crate::protocol::backend::{self as msg, Severity};
use crate::protocol::sqlstate::SqlState;
use crate::protocol::tag;
use crate::sql::{Class, WriteFunctions, classify};

use super::relay::Lost;

const ABORTED: &str = "current transaction is aborted, commands ignored until end of transaction block";

/// What the session still owes a client after a loss, answered from its
/// next requests.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct LostState {
    /// Inside a transaction block: aborted until the client ends it.
    in_transaction: bool,
    /// The loss's error (SQLSTATE, message).
    error: (String, String),
    /// Whether the client got it. It may have landed on a response the
    /// driver ignores (a Close sent in the background): a COMMIT of the lost
    /// transaction fails with it whatever came before.
    reported: bool,
    /// Extended-protocol messages were in flight without a Sync: the
    /// client's messages up to its next Sync are skipped, as the server does
    /// after an error.
    skip_to_sync: bool,
}

impl LostState {
    fn done(&self) -> bool {
        !self.in_transaction && !self.skip_to_sync && self.reported
    }
}

/// The answer owed at once for the requests in flight, and what remains.
pub(super) fn answer_loss(lost: Lost) -> (BytesMut, Option<LostState>) {
    let status = if lost.in_transaction { msg::FAILED_TRANSACTION } else { msg::IDLE };
    let mut out = BytesMut::new();
    let mut state = LostState {
        in_transaction: lost.in_transaction,
        error: (lost.code, lost.message),
        reported: false,
        skip_to_sync: lost.unsynced,
    };
    for _ in 0..lost.owed {
        state.refuse(&mut out);
        msg::ready_for_query(&mut out, status);
    }
    if lost.unsynced {
        state.refuse(&mut out);
    }
    let done = state.done();
    (out, (!done).then_some(state))
}

impl LostState {
    /// The error for a request: the loss's the first time; inside the
    /// aborted block, 25P02 after that.
    fn refuse(&mut self, out: &mut BytesMut) {
        if self.reported && self.in_transaction {
            msg::error_response(out, Severity::Error, SqlState::IN_FAILED_SQL_TRANSACTION, ABORTED);
        } else {
            msg::error_response_code(out, Severity::Error, &self.error.0, &self.error.1);
            self.reported = true;
        }
    }
}

/// How the next request unit of a client in `state` is answered.
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    /// The transaction block ends here: answered, and the session is clean again.
    EndBlock(BytesMut),
    /// An error (or nothing), the rest of the request skipped, ReadyForQuery.
    Refuse(BytesMut, u8),
}

/// Decides the answer to `unit` (a whole request, ended by Query or Sync).
fn reply(state: &mut LostState, unit: &[u8], statements: &ClientStatements) -> Reply {
    let status = if state.in_transaction { msg::FAILED_TRANSACTION } else { msg::IDLE };
    let mut out = BytesMut::new();
    if state.skip_to_sync {
        // Its error was sent with the loss; the server skips to the Sync.
        return Reply::Refuse(out, status);
    }
    if state.in_transaction
        && let Some((rollback, answer)) = transaction_end(unit, statements)
    {
        if rollback {
            return Reply::EndBlock(answer);
        }
        // A COMMIT of a transaction that is gone fails (as on a direct
        // connection, which the loss would have closed), and ends the block.
        msg::error_response_code(&mut out, Severity::Error, &state.error.0, &state.error.1);
        msg::ready_for_query(&mut out, msg::IDLE);
        return Reply::EndBlock(out);
    }
    state.refuse(&mut out);
    Reply::Refuse(out, status)
}

/// If `unit` only ends the transaction block (`ROLLBACK`, `ABORT`,
/// `COMMIT`, `END`, without `AND CHAIN`; a simple Query, or unnamed
/// Parse/Bind/Describe/Execute then Sync), Postgres's answer in an aborted
/// block (the tag is `ROLLBACK` either way), and whether it was a rollback.
fn transaction_end(unit: &[u8], statements: &ClientStatements) -> Option<(bool, BytesMut)> {
    let sql = Request::new(unit).sql(statements);
    let [sql] = sql.as_slice() else { return None };
    let rollback = match classify(sql, &WriteFunctions::default()) {
        c if c.statements != 1 => return None,
        c => match c.class {
            Class::Rollback { chain: false } => true,
            Class::Commit { chain: false } => false,
            _ => return None,
        },
    };
    let mut out = BytesMut::new();
    for m in Request::new(unit).messages() {
        let unnamed = |b: &[u8]| b.first() == Some(&0);
        match m.tag {
            tag::QUERY | tag::EXECUTE => msg::command_complete(&mut out, "ROLLBACK"),
            tag::PARSE if unnamed(m.body) => msg::parse_complete(&mut out),
            // Portal and statement both unnamed.
            tag::BIND if m.body.starts_with(&[0, 0]) => short(&mut out, b'2'),
            tag::DESCRIBE if m.body.first() == Some(&b'S') => {
                out.put_u8(b't');
                out.put_u32(6);
                out.put_u16(0);
                short(&mut out, b'n');
            }
            tag::DESCRIBE => short(&mut out, b'n'),
            tag::SYNC => {}
            _ => return None,
        }
    }
    msg::ready_for_query(&mut out, msg::IDLE);
    Some((rollback, out))
}

/// A message with no body (BindComplete, NoData).
fn short(out: &mut BytesMut, t: u8) {
    out.put_u8(t);
    out.put_u32(4);
}

/// Answers the client's next request from `state`. Returns whether the
/// session goes on (`false`: the client left), and the state that remains.
pub(super) async fn answer_next(
    stream: &mut Stream,
    pending: &mut BytesMut,
    statements: &ClientStatements,
    mut state: LostState,
) -> std::io::Result<(bool, Option<LostState>)> {
    match read_unit(stream, pending).await? {
        Ok(Some(super::request::Unit::Ends(t))) if t != tag::FLUSH => {}
        // Left, or a request pgmux cannot answer in place (a Flush with
        // nothing to flush, a stream too long to hold): the connection ends.
        Ok(None) => return Ok((false, None)),
        Ok(Some(_)) | Err(_) => {
            let mut out = BytesMut::new();
            msg::error_response(
                &mut out,
                Severity::Fatal,
                SqlState::CONNECTION_FAILURE,
                "server connection lost mid-transaction",
            );
            stream.write_all(&out).await?;
            return Ok((false, None));
        }
    }
    let len = Request::new(pending).messages().last().map_or(0, |m| m.end);
    match reply(&mut state, &pending[..len], statements) {
        Reply::EndBlock(out) => {
            pending.advance(len);
            stream.write_all(&out).await?;
            Ok((true, None))
        }
        Reply::Refuse(mut out, status) => {
            pending.advance(len);
            msg::ready_for_query(&mut out, status);
            stream.write_all(&out).await?;
            state.skip_to_sync = false;
            let done = state.done();
            Ok((true, (!done).then_some(state)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lost(owed: usize, unsynced: bool, in_transaction: bool) -> Lost {
        Lost { owed, unsynced, code: "57P01".into(), message: "terminating".into(), in_transaction, completed: false }
    }

    fn tags(b: &[u8]) -> Vec<(u8, Vec<u8>)> {
        crate::protocol::frame::Messages::new(b, 1 << 20).map(|m| (m.tag, m.body.to_vec())).collect()
    }

    fn query(sql: &str) -> BytesMut {
        let mut b = BytesMut::new();
        b.put_u8(b'Q');
        b.put_u32((4 + sql.len() + 1) as u32);
        b.put_slice(sql.as_bytes());
        b.put_u8(0);
        b
    }

    #[test]
    fn idle_in_transaction_then_a_statement_then_rollback() {
        let (out, state) = answer_loss(lost(0, false, true));
        assert!(out.is_empty(), "nothing was in flight: nothing to say yet");
        let mut state = state.expect("the block is aborted");
        let statements = ClientStatements::default();
        // The next statement gets the loss's error, then 25P02 for the ones after.
        let Reply::Refuse(e, s) = reply(&mut state, &query("INSERT INTO t VALUES (1)"), &statements) else { panic!() };
        assert_eq!((tags(&e)[0].0, s), (b'E', msg::FAILED_TRANSACTION));
        assert!(String::from_utf8_lossy(&e).contains("57P01"));
        let Reply::Refuse(e, _) = reply(&mut state, &query("SELECT 1"), &statements) else { panic!() };
        assert!(String::from_utf8_lossy(&e).contains("25P02"));
        // ROLLBACK ends it, as the server answers it.
        let Reply::EndBlock(end) = reply(&mut state, &query("rollback"), &statements) else { panic!() };
        let t = tags(&end);
        assert_eq!(t[0].0, b'C');
        assert_eq!(t[1], (b'Z', vec![b'I']));
    }

    #[test]
    fn a_commit_of_a_lost_transaction_fails() {
        // Even when the error went to a response the driver may ignore.
        let (_, state) = answer_loss(lost(1, false, true));
        let mut state = state.unwrap();
        let Reply::EndBlock(out) = reply(&mut state, &query("COMMIT"), &ClientStatements::default()) else { panic!() };
        let t = tags(&out);
        assert_eq!((t[0].0, &t[1]), (b'E', &(b'Z', vec![b'I'])));
    }

    #[test]
    fn requests_in_flight_fail_once_each() {
        // Two requests in flight inside a block: the loss's error + RFQ(E),
        // then 25P02 + RFQ(E).
        let (out, state) = answer_loss(lost(2, false, true));
        let t: Vec<u8> = tags(&out).into_iter().map(|(t, _)| t).collect();
        assert_eq!(t, [b'E', b'Z', b'E', b'Z']);
        assert!(String::from_utf8_lossy(&out).contains("57P01") && String::from_utf8_lossy(&out).contains("25P02"));
        assert!(state.is_some_and(|s| s.in_transaction && s.reported));
        // Outside a block: each gets the loss's error, and nothing remains.
        let (out, state) = answer_loss(lost(1, false, false));
        let t: Vec<u8> = tags(&out).into_iter().map(|(t, _)| t).collect();
        assert_eq!((t, state), (vec![b'E', b'Z'], None));
    }
}
