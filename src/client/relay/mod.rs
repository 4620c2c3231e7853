//! Relaying one client's traffic over a checked-out backend, and the
//! transaction-boundary bookkeeping that decides when the backend can go back.
//!
//! This file holds the link's state and its scanners of both directions;
//! `rewrite` the changes to client messages (statement names, session-state
//! policy), `poll` the loop that moves the bytes, `cleanup` what happens to
//! a backend its client left mid-flight.
//!
//! Bytes are read straight into the backend's buffers and written out of the
//! same buffers: a frame is never copied or decoded on the way through. The
//! scanners look at headers only, capturing the few bodies that matter
//! (ReadyForQuery's status byte, ParameterStatus, ErrorResponse).

mod cleanup;
mod poll;
mod rewrite;

pub use cleanup::{apply_param_changes, cancel_backend, forward_cancel, recover};
pub use poll::{Outcome, RelayOptions, record_traffic, relay};

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::pinning::{self, PinReason};
use super::statements::{self, ClientStatements};
use crate::config::OnSessionState;
use crate::live::registry::Signal;
use crate::live::stats::{Stats, sqlstate_class};
use crate::net::{ServerAddr, Stream};
use crate::pool::expect::{Expect, SpareQueue};
use crate::pool::statements::{PreparedSet, Registry, Statement};
use crate::pool::{Backend, PoolCounters, Traffic};
use crate::protocol::backend::{self as msg};
use crate::protocol::frame::{FrameError, HEADER_LEN, Header, MAX_MESSAGE_LEN, Scanner};
use crate::protocol::sqlstate::SqlState;
use crate::protocol::{frontend, tag};
use crate::routing::route::RouteReason;
use crate::sql::statements::{StatementCommand, statement_command};

/// Stop reading a side while this many bytes wait to be written to the other:
/// backpressure instead of unbounded buffering.
const HIGH_WATER: usize = 256 * 1024;

/// How long pgmux spends cleaning a backend a client abandoned before it
/// gives up and closes it instead.
const RECOVER_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the statements a client refers to live: its own names, the pool's
/// interning table, and the per-backend cap.
pub struct StatementScope<'a> {
    pub client: &'a mut ClientStatements,
    pub registry: &'a Registry,
    pub max_prepared: usize,
    /// What to do with statements that create session state.
    pub on_session_state: OnSessionState,
    /// The largest Query/Parse/Describe/Close pgmux holds whole to inspect.
    pub max_query_size: usize,
}

/// What a client whose server was lost mid-transaction is owed: Postgres's
/// answer to an error in each request it sent (ErrorResponse, then
/// ReadyForQuery), the transaction being gone.
#[derive(Debug)]
pub struct Lost {
    /// Requests sent and not answered (each owes a ReadyForQuery).
    pub owed: usize,
    /// Extended-protocol messages sent after the last Sync: the server
    /// would skip the client's messages up to its next Sync.
    pub unsynced: bool,
    pub code: String,
    pub message: String,
    /// The client was inside a transaction block: it is aborted now.
    pub in_transaction: bool,
    /// Some request ended (and may have committed) before the loss.
    pub completed: bool,
}

/// What the relay knows about the backend's protocol state while linked.
#[derive(Debug)]
pub struct Link {
    /// ReadyForQuery messages still owed: one per Query, Sync and FunctionCall sent.
    pub pending_ready: usize,
    /// Extended-protocol messages were sent since the last Sync.
    pub unsynced: bool,
    /// The server is in COPY FROM STDIN and the client has not ended it.
    pub copy_in: bool,
    /// The last ReadyForQuery status: idle, in a transaction, or failed.
    pub status: u8,
    /// Body bytes of the client frame being streamed through, still to come.
    client_body_remaining: usize,
    /// The client frame at `client_ready` must be whole before it is inspected.
    need_whole_frame: bool,
    server_scan: Scanner,
    /// Bytes at the front of `to_server` that are whole, scanned frames ready to write.
    client_ready: usize,
    /// Bytes at the front of `from_server` that are scanned and ready to write.
    server_ready: usize,
    /// The client sent Terminate; it has been cut out of the stream.
    pub terminated: bool,
    /// The client's stream broke here (a message of an invalid type or
    /// length, or too large to inspect); it and what follows were cut out.
    /// The session ends with this error (FATAL, as from Postgres) once what
    /// came before is answered.
    pub broken: Option<FrameError>,
    /// After an error in an extended-protocol message the server discards
    /// everything up to the next Sync; no Sync was on its way.
    skipping: bool,
    /// The server sent a FATAL (or PANIC) error: it closes next, and the
    /// client must get nothing after it.
    pub server_fatal: bool,
    /// Transaction mode, nothing held for a retry: if the server is lost,
    /// the client may keep its connection ([`Link::lost`]).
    pub survive_loss: bool,
    /// The server's FATAL (SQLSTATE, message), withheld under `survive_loss`.
    pub fatal_seen: Option<(String, String)>,
    /// A request ended outside a transaction block (it may have committed).
    pub completed: bool,
    /// The server sent something pgmux cannot pool (CopyBoth, or a stray ReadyForQuery).
    pub unpoolable: bool,
    /// The backend holds the client's unnamed statement.
    unnamed_here: bool,
    expect: VecDeque<Expect>,
    /// Server frames to cut out of the current chunk (responses to injected
    /// messages), or to replace (a reworded error).
    drops: Vec<(usize, usize, Option<BytesMut>)>,
    /// Session parameter changes reported by the server since the last call to `take_param_changes`.
    param_changes: Vec<(String, String)>,
    /// Settings the client's SQL may have changed for the session (`SET`,
    /// `RESET`, `set_config`): read back when the transaction ends.
    pub touched_settings: Vec<String>,
    /// Session state the client created: the backend stays with it to the end.
    pub pin: Option<PinReason>,
    /// A statement refused under `on_session_state = "error"`.
    pub refused: Option<PinReason>,
    /// Reset the session (DISCARD ALL) before the backend serves anyone else.
    pub reset_session: bool,
    pin_reported: bool,
    /// Routed to a replica with a retry possible: hold the server's answer
    /// until it is clear the replica did not refuse a write (25006).
    pub hold: bool,
    /// The replica refused a write; its answer is held, not forwarded.
    pub misrouted: bool,
    /// Each request is routed on its own (`RelayOptions::route_each`): the
    /// client's bytes after a request's end wait, unscanned and unsent,
    /// until it is answered. Then they start the next request at a
    /// boundary, or go on here if the link does.
    pub route_each: bool,
    /// Bytes after a request's end wait in `to_server` past `client_ready`.
    pub unscanned: bool,
    /// This transaction's bytes, queries, cache hits and errors, counted in
    /// plain integers and added to the pool once ([`record_traffic`]).
    pub traffic: Traffic,
}

impl Link {
    pub fn new() -> Link {
        Link::reusing(SpareQueue::default())
    }

    /// A fresh link whose expected-response queue reuses `spare`'s allocation.
    pub fn reusing(spare: SpareQueue) -> Link {
        let SpareQueue(mut expect) = spare;
        expect.clear();
        Link {
            pending_ready: 0,
            unsynced: false,
            copy_in: false,
            status: msg::IDLE,
            client_body_remaining: 0,
            need_whole_frame: false,
            server_scan: Scanner::new(MAX_MESSAGE_LEN),
            client_ready: 0,
            server_ready: 0,
            terminated: false,
            broken: None,
            skipping: false,
            server_fatal: false,
            survive_loss: false,
            fatal_seen: None,
            completed: false,
            unpoolable: false,
            unnamed_here: false,
            expect,
            drops: Vec::new(),
            param_changes: Vec::new(),
            touched_settings: Vec::new(),
            pin: None,
            refused: None,
            reset_session: false,
            pin_reported: false,
            hold: false,
            misrouted: false,
            route_each: false,
            unscanned: false,
            traffic: Traffic::default(),
        }
    }

    /// The backend can serve someone else: every request answered, idle
    /// outside a transaction, and no partial message in flight either way.
    pub fn at_transaction_boundary(&self, from_server: &BytesMut) -> bool {
        self.at_transaction_boundary_ignoring_output() && self.server_ready == 0 && from_server.is_empty()
    }

    /// How many bytes at the end of what is ready for the client are the
    /// ReadyForQuery (idle) that ended the transaction, when the caller asked
    /// to send that one itself (`RelayOptions::hold_final_ready`): 6 or 0.
    /// Only at a boundary, where the relay returns once the rest is written:
    /// a ReadyForQuery held while the link goes on could be one the client
    /// waits for before it sends more.
    ///
    /// The last six bytes say it: at a boundary every ReadyForQuery owed has
    /// come, and what a server may send after the last one unasked (Notice,
    /// ParameterStatus, NotificationResponse) ends with a string's 0 byte,
    /// never with `I`, and a server sends nothing else unasked.
    pub fn final_ready_held(&self, hold_final_ready: bool, from_server: &BytesMut) -> usize {
        let n = msg::READY_IDLE.len();
        let held = hold_final_ready
            && self.pin.is_none()
            && self.at_transaction_boundary_ignoring_output()
            && from_server.len() == self.server_ready
            && self.server_ready >= n
            && from_server[self.server_ready - n..self.server_ready] == msg::READY_IDLE;
        if held { n } else { 0 }
    }

    /// [`Link::at_transaction_boundary`] with `held` bytes of the answer
    /// (the final ReadyForQuery) left for the caller to send.
    pub fn at_transaction_boundary_holding(&self, from_server: &BytesMut, held: usize) -> bool {
        self.at_transaction_boundary_ignoring_output() && self.server_ready == held && from_server.len() == held
    }

    /// Like [`Link::at_transaction_boundary`], for a held answer that is
    /// about to be dropped rather than forwarded.
    pub fn at_transaction_boundary_ignoring_output(&self) -> bool {
        self.pending_ready == 0
            && !self.unsynced
            && !self.copy_in
            && !self.unpoolable
            && self.status == msg::IDLE
            && self.client_body_remaining == 0
            && !self.need_whole_frame
            && self.server_scan.at_boundary()
            && self.client_ready == 0
            && self.expect.is_empty()
    }

    /// The server is gone mid-transaction: what the client is owed, if its
    /// connection can stay (transaction mode, no session state on the lost
    /// backend, not inside COPY, no client message cut in half), else `None`.
    /// Bytes of the client's next message already read move to `pending`.
    pub fn lost(
        &mut self,
        to_server: &mut BytesMut,
        pending: &mut BytesMut,
        client: &mut ClientStatements,
    ) -> Option<Lost> {
        let keep = self.survive_loss
            && self.pin.is_none()
            && !self.reset_session
            && !self.copy_in
            && !self.unpoolable
            && !self.terminated
            && self.broken.is_none()
            && self.client_body_remaining == 0;
        if !keep {
            return None;
        }
        let owed = owed_to_client(&self.expect);
        // A Parse the server never confirmed created nothing, for the client either.
        for e in self.expect.drain(..) {
            if let Expect::Parse { statement: Some(st), client_name: Some(name), .. } = e
                && client.get(&name).is_some_and(|cur| Arc::ptr_eq(cur, &st))
            {
                client.remove(&name);
            }
        }
        // Not scanned yet (a message not whole): the start of the client's next request.
        pending.extend_from_slice(&to_server[self.client_ready.min(to_server.len())..]);
        to_server.clear();
        let (code, message) = self
            .fatal_seen
            .take()
            .unwrap_or_else(|| (SqlState::CONNECTION_FAILURE.code().to_owned(), "server connection lost".to_owned()));
        Some(Lost {
            owed,
            unsynced: self.unsynced,
            code,
            message,
            in_transaction: self.status != msg::IDLE,
            completed: self.completed,
        })
    }

    /// The queue's allocation, for the session's next link.
    pub fn into_spare(self) -> SpareQueue {
        SpareQueue(self.expect)
    }

    pub fn take_param_changes(&mut self) -> Vec<(String, String)> {
        std::mem::take(&mut self.param_changes)
    }

    /// Scans newly read client bytes in `to_server[client_ready..]`, rewriting
    /// statement names and injecting what the backend lacks.
    pub fn scan_client(
        &mut self,
        buf: &mut BytesMut,
        scope: &mut StatementScope<'_>,
        prepared: &mut PreparedSet,
    ) -> Result<(), FrameError> {
        let mut pos = self.client_ready;
        loop {
            if self.client_body_remaining > 0 {
                let take = self.client_body_remaining.min(buf.len() - pos);
                pos += take;
                self.client_body_remaining -= take;
                if self.client_body_remaining > 0 {
                    break;
                }
                continue;
            }
            // The type first, as Postgres reads it: an invalid one ends the
            // session whatever length follows. (During COPY FROM STDIN the
            // server reads it whole and fails the COPY instead: forwarded.)
            let header = match buf.get(pos) {
                None => break,
                Some(&t) if !tag::is_frontend(t) && !self.copy_in => Err(FrameError::InvalidType(t)),
                Some(_) => Header::parse(&buf[pos..], MAX_MESSAGE_LEN),
            };
            let header = match header {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => {
                    pos = self.break_at(buf, pos, e);
                    break;
                }
            };
            let end = pos + header.frame_len();
            let whole = buf.len() >= end;
            // A Sync or FunctionCall (a Query's end is checked after its rewrite).
            let mut ends_request = false;
            if self.skipping && !matches!(header.tag, tag::SYNC | tag::TERMINATE) {
                // The server discards it unread (an error came before, no Sync
                // since): no answer to expect, nothing to rewrite.
            } else {
                match header.tag {
                    tag::QUERY | tag::PARSE | tag::BIND | tag::DESCRIBE | tag::CLOSE => {
                        if !whole {
                            if header.tag == tag::BIND && bind_prefix_len(&buf[pos + HEADER_LEN..]).is_some() {
                                // Only the statement name is rewritten: the
                                // parameters (a large bytea, say) stream through.
                                self.need_whole_frame = false;
                                let new_end = self.inspect(buf, pos, end, header.tag, scope, prepared);
                                self.client_body_remaining = new_end - buf.len();
                                pos = buf.len();
                                continue;
                            }
                            let held = if header.tag == tag::BIND { buf.len() - pos } else { header.frame_len() };
                            if held > scope.max_query_size {
                                let e = FrameError::TooLargeToInspect {
                                    tag: header.tag,
                                    len: header.frame_len(),
                                    limit: scope.max_query_size,
                                };
                                pos = self.break_at(buf, pos, e);
                                break;
                            }
                            self.need_whole_frame = true;
                            break;
                        }
                        self.need_whole_frame = false;
                        pos = self.inspect(buf, pos, end, header.tag, scope, prepared);
                        if header.tag == tag::QUERY && self.pause_after(pos, buf.len()) {
                            break;
                        }
                        continue;
                    }
                    tag::TERMINATE => {
                        // Terminate is for pgmux, not for the pooled server: drop it and anything after.
                        self.terminated = true;
                        buf.truncate(pos);
                        break;
                    }
                    tag::FUNCTION_CALL => {
                        self.pending_ready += 1;
                        self.expect.push_back(Expect::QUERY);
                        ends_request = true;
                    }
                    // During COPY FROM STDIN the server ignores Sync: no ReadyForQuery for it.
                    tag::SYNC if !self.copy_in => {
                        ends_request = true;
                        self.pending_ready += 1;
                        self.unsynced = false;
                        self.skipping = false;
                        self.expect.push_back(Expect::SYNC);
                    }
                    tag::EXECUTE => {
                        self.unsynced = true;
                        self.expect.push_back(Expect::Execute);
                    }
                    // A Flush with a body gets an error, and the server then
                    // waits for a Sync: the backend must stay until it comes.
                    tag::FLUSH if header.len != 4 => {
                        self.unsynced = true;
                        self.expect.push_back(Expect::BadFlush);
                    }
                    tag::COPY_DONE | tag::COPY_FAIL => self.copy_in = false,
                    _ => {}
                }
            }
            if whole {
                pos = end;
                if ends_request && self.pause_after(pos, buf.len()) {
                    break;
                }
            } else {
                self.client_body_remaining = end - buf.len();
                pos = buf.len();
            }
        }
        self.client_ready = pos;
        Ok(())
    }

    /// Whether scanning stops at `pos`, a request's end, with more buffered
    /// (see [`Link::route_each`]).
    fn pause_after(&mut self, pos: usize, len: usize) -> bool {
        let pause = self.route_each && pos < len;
        self.unscanned |= pause;
        pause
    }

    /// Scans newly read server bytes in `from_server[server_ready..]`,
    /// dropping responses to injected messages.
    pub fn scan_server(
        &mut self,
        from_server: &mut BytesMut,
        mut client: Option<&mut ClientStatements>,
        registry: &Registry,
        prepared: &mut PreparedSet,
    ) -> Result<(), FrameError> {
        let Link {
            server_scan,
            pending_ready,
            copy_in,
            status,
            unpoolable,
            param_changes,
            expect,
            drops,
            hold,
            misrouted,
            traffic,
            skipping,
            server_fatal,
            survive_loss,
            fatal_seen,
            pin,
            completed,
            ..
        } = self;
        drops.clear();
        let used = server_scan.scan(
            &from_server[self.server_ready..],
            |t| matches!(t, tag::READY_FOR_QUERY | tag::PARAMETER_STATUS | tag::ERROR_RESPONSE),
            |f| {
                if *hold && !*misrouted {
                    match f.tag {
                        // Nothing the client can act on yet: keep holding.
                        tag::PARSE_COMPLETE | tag::BIND_COMPLETE | b't' | b'n' | b'T' | tag::PARAMETER_STATUS => {}
                        tag::ERROR_RESPONSE => {
                            let err = f.body.map(msg::parse_error_fields).unwrap_or_default();
                            if err.code == "25006" {
                                *misrouted = true;
                            } else {
                                *hold = false;
                            }
                        }
                        _ => *hold = false,
                    }
                }
                match f.tag {
                    tag::PARSE_COMPLETE => match expect.pop_front() {
                        Some(Expect::Parse { forward, statement, .. }) => {
                            if let Some(st) = statement {
                                st.mark_validated();
                            }
                            if !forward {
                                drops.extend(f.start.map(|s| (s, f.end, None)));
                            }
                        }
                        _ => *unpoolable = true,
                    },
                    tag::BIND_COMPLETE if !matches!(expect.pop_front(), Some(Expect::Bind { .. })) => {
                        *unpoolable = true;
                    }
                    // Inside a simple Query's answer these come unasked: only
                    // an awaited Describe or Execute ends with them.
                    tag::ROW_DESCRIPTION | tag::NO_DATA if matches!(expect.front(), Some(Expect::Describe)) => {
                        expect.pop_front();
                    }
                    tag::COMMAND_COMPLETE | tag::EMPTY_QUERY_RESPONSE | tag::PORTAL_SUSPENDED
                        if matches!(expect.front(), Some(Expect::Execute)) =>
                    {
                        expect.pop_front();
                    }
                    tag::CLOSE_COMPLETE => match expect.pop_front() {
                        Some(Expect::Close { forward }) => {
                            if !forward {
                                drops.extend(f.start.map(|s| (s, f.end, None)));
                            }
                        }
                        _ => *unpoolable = true,
                    },
                    tag::ERROR_RESPONSE => {
                        let err = f.body.map(msg::parse_error_fields).unwrap_or_default();
                        if !*misrouted {
                            // A misrouted write's 25006 never reaches the client: not counted.
                            traffic.errors.push(sqlstate_class(&err.code));
                        }
                        if matches!(err.severity.as_str(), "FATAL" | "PANIC") {
                            *server_fatal = true;
                            match f.start {
                                // The client may keep its connection: the error
                                // is withheld, and answers what the client had
                                // sent once the server has closed (`Link::lost`).
                                // Forwarded now, the client could react to it
                                // before pgmux knows what it owes.
                                Some(s) if *survive_loss && pin.is_none() => {
                                    drops.push((s, f.end, None));
                                    *fatal_seen = Some((err.code.clone(), err.message.clone()));
                                }
                                // Partly sent already: it goes as the server wrote it.
                                _ => *survive_loss = false,
                            }
                        }
                        if let Some(Expect::DuplicateParse { client_name }) = expect.front()
                            && err.code == SqlState::DUPLICATE_PREPARED_STATEMENT.code()
                        {
                            // The server named its own statement: name the client's, as directly.
                            let mut reworded = BytesMut::new();
                            let text = format!(
                                "prepared statement \"{}\" already exists",
                                String::from_utf8_lossy(client_name)
                            );
                            msg::error_response(
                                &mut reworded,
                                msg::Severity::Error,
                                SqlState::DUPLICATE_PREPARED_STATEMENT,
                                &text,
                            );
                            // A frame begun in an earlier read was partly sent: it stays as the server wrote it.
                            if let Some(s) = f.start {
                                drops.push((s, f.end, Some(reworded)));
                            }
                        }
                        if let Some(Expect::Bind { statement: Some(st) }) = expect.front()
                            && err.code == "0A000"
                            && err.message.contains("cached plan must not change result type")
                        {
                            // Never hand this server copy out again: the client's
                            // re-prepare must get a fresh statement.
                            registry.invalidate(st);
                            prepared.remove(st.id, true);
                        }
                        // An error of a simple Query or FunctionCall (or of a
                        // malformed Sync) is followed by its ReadyForQuery; one of
                        // an extended-protocol message makes the server skip
                        // everything up to the next Sync, Queries included.
                        if !matches!(expect.front(), Some(Expect::Ready { .. }) | None) {
                            *skipping = skip_to_sync(expect, pending_ready, prepared, client.as_deref_mut());
                        }
                    }
                    tag::READY_FOR_QUERY => {
                        match expect.pop_front() {
                            Some(Expect::Ready { forward, .. }) if *pending_ready > 0 => {
                                if !forward {
                                    drops.extend(f.start.map(|s| (s, f.end, None)));
                                }
                            }
                            // A ReadyForQuery nobody asked for: our count is off, never pool this backend.
                            _ => *unpoolable = true,
                        }
                        *pending_ready = pending_ready.saturating_sub(1);
                        *status = f.body.and_then(|b| b.first().copied()).unwrap_or(msg::FAILED_TRANSACTION);
                        *completed |= *status == msg::IDLE;
                        *copy_in = false;
                    }
                    tag::COPY_IN_RESPONSE => *copy_in = true,
                    tag::COPY_BOTH_RESPONSE => *unpoolable = true,
                    tag::PARAMETER_STATUS => {
                        if let Some((k, v)) = f.body.and_then(msg::parse_parameter_status) {
                            param_changes.push((k.to_owned(), v.to_owned()));
                        }
                    }
                    _ => {}
                }
                true
            },
        )?;
        let mut used = used;
        let base = self.server_ready;
        for (s, e, with) in self.drops.drain(..).rev() {
            let tail = from_server.split_off(base + e);
            from_server.truncate(base + s);
            used -= e - s;
            if let Some(with) = with {
                from_server.extend_from_slice(&with);
                used += with.len();
            }
            from_server.unsplit(tail);
        }
        self.server_ready += used;
        self.traffic.bytes_out += used as u64;
        Ok(())
    }

    /// `n` requests were answered, `took` after the server had the first.
    fn count_queries(&mut self, n: usize, took: Duration) {
        // Answers that arrive together share the time (pipelined requests).
        let each = took.as_micros() as u64 / n as u64;
        for _ in 0..n {
            self.traffic.queries.observe_us(each);
        }
    }

    /// More client bytes may be read: under the high-water mark, or the frame
    /// at the front must be whole before pgmux can inspect it.
    fn may_read_client(&self, buffered: usize) -> bool {
        !self.terminated && self.broken.is_none() && (buffered < HIGH_WATER || self.need_whole_frame)
    }

    /// Cuts the client's stream at `pos` (see [`Link::broken`]); returns the
    /// end of what still goes to the server. A Flush brings the answers to
    /// what came before without a Sync, as the server's own exit would.
    fn break_at(&mut self, buf: &mut BytesMut, mut pos: usize, e: FrameError) -> usize {
        self.broken = Some(e);
        buf.truncate(pos);
        if self.unsynced && !self.skipping {
            buf.extend_from_slice(FLUSH);
            pos += FLUSH.len();
        }
        pos
    }

    /// The client's stream broke and everything before it has been
    /// answered: time for the FATAL.
    fn broken_due(&self, from_server: &BytesMut) -> Option<FrameError> {
        let answered = self.client_ready == 0
            && self.expect.is_empty()
            && self.server_ready == 0
            && from_server.is_empty()
            && self.server_scan.at_boundary();
        self.broken.clone().filter(|_| answered)
    }
}

/// Server names pgmux never creates: targets for no-op Close and DEALLOCATE.
const CLOSE_NOOP_NAME: &[u8] = b"pgmux_noop";
const SYNC: &[u8] = b"S\0\0\0\x04";
const FLUSH: &[u8] = b"H\0\0\0\x04";

/// After an error in an extended-protocol message: drops the expectations of
/// everything the server will skip, up to the next Sync's ReadyForQuery
/// (Queries included, so `pending_ready` shrinks too). A Parse that failed
/// creates nothing, on the server or for the client. Returns `true` when no
/// Sync is on its way: what the client sends before one is discarded too.
fn skip_to_sync(
    expect: &mut VecDeque<Expect>,
    pending_ready: &mut usize,
    prepared: &mut PreparedSet,
    mut client: Option<&mut ClientStatements>,
) -> bool {
    loop {
        match expect.front() {
            Some(Expect::Ready { sync: true, .. }) => return false,
            None => return true,
            _ => {}
        }
        match expect.pop_front() {
            Some(Expect::Parse { statement: Some(st), client_name, .. }) => {
                prepared.remove(st.id, false);
                if let (Some(name), Some(client)) = (client_name, client.as_deref_mut())
                    && client.get(&name).is_some_and(|cur| Arc::ptr_eq(cur, &st))
                {
                    client.remove(&name);
                }
            }
            Some(Expect::Ready { sync: false, .. }) => *pending_ready = pending_ready.saturating_sub(1),
            _ => {}
        }
    }
}

/// ReadyForQuery messages the client waits for (pgmux's own Syncs aside).
fn owed_to_client(expect: &VecDeque<Expect>) -> usize {
    expect.iter().filter(|e| matches!(e, Expect::Ready { forward: true, .. })).count()
}

/// How many bytes of a Bind body hold its portal and statement names (what
/// pgmux rewrites), once both are there.
fn bind_prefix_len(body: &[u8]) -> Option<usize> {
    let portal = memchr::memchr(0, body)?;
    let statement = memchr::memchr(0, &body[portal + 1..])?;
    Some(portal + 1 + statement + 1)
}

impl Default for Link {
    fn default() -> Self {
        Link::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parse (unnamed) + Sync of `sql`, scanned as a new transaction's request.
    fn scan_unnamed(client: &mut ClientStatements, sql: &str) -> Link {
        let registry = Registry::default();
        let mut prepared = PreparedSet::default();
        let mut scope = StatementScope {
            client,
            registry: &registry,
            max_prepared: 10,
            on_session_state: OnSessionState::Pin,
            max_query_size: 1 << 20,
        };
        let mut buf = BytesMut::new();
        postgres_protocol::message::frontend::parse("", sql, [], &mut buf).unwrap();
        postgres_protocol::message::frontend::sync(&mut buf);
        let mut link = Link::new();
        link.scan_client(&mut buf, &mut scope, &mut prepared).unwrap();
        link
    }

    /// One frontend message for [`pausing_at_request_ends_sends_the_same_bytes`].
    fn message(kind: u8, n: u8, out: &mut BytesMut) {
        use postgres_protocol::message::frontend;
        let name = ["", "a", "b"][usize::from(n % 3)];
        let sql = ["SELECT 1", "SET work_mem = '8MB'", "DEALLOCATE a", "UPDATE t SET v = 1"][usize::from(n % 4)];
        match kind % 7 {
            0 => frontend::query(sql, out).unwrap(),
            1 => frontend::parse(name, sql, [], out).unwrap(),
            // No parameter formats, no parameters, no result formats.
            2 => crate::protocol::frontend::bind_raw(out, b"", name.as_bytes(), &[0; 6]),
            3 => frontend::describe(b'S', name, out).unwrap(),
            4 => frontend::execute("", 0, out).unwrap(),
            5 => frontend::close(b'S', name, out).unwrap(),
            _ => frontend::sync(out),
        }
    }

    /// What a link sends for `stream`, read in `cuts` pieces: with
    /// `route_each`, each request's end pauses the scan and the rest is
    /// scanned once the request is (taken as) answered, as the relay does.
    fn sent(stream: &[u8], cuts: &[usize], route_each: bool) -> Vec<u8> {
        let (mut client, registry, mut prepared) =
            (ClientStatements::default(), Registry::default(), PreparedSet::default());
        let mut scope = StatementScope {
            client: &mut client,
            registry: &registry,
            max_prepared: 2,
            on_session_state: OnSessionState::Pin,
            max_query_size: 1 << 20,
        };
        let mut link = Link::new();
        link.route_each = route_each;
        let (mut buf, mut out, mut at) = (BytesMut::new(), Vec::new(), 0);
        let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
        bounds.push(stream.len());
        bounds.sort_unstable();
        for end in bounds {
            buf.extend_from_slice(&stream[at..end.max(at)]);
            at = at.max(end);
            link.scan_client(&mut buf, &mut scope, &mut prepared).unwrap();
            loop {
                out.extend_from_slice(&buf.split_to(link.client_ready));
                link.client_ready = 0;
                if !std::mem::take(&mut link.unscanned) {
                    break;
                }
                // Answered: the waiting requests are scanned.
                link.pending_ready = 0;
                link.scan_client(&mut buf, &mut scope, &mut prepared).unwrap();
            }
        }
        out.extend_from_slice(&buf);
        out
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 2000, failure_persistence: None, ..Default::default() })]

        /// Pausing the scan at each request's end (`route_each`) changes
        /// when bytes go, never which: the server gets the same stream,
        /// rewrites included, however the client's bytes were cut.
        #[test]
        fn pausing_at_request_ends_sends_the_same_bytes(
            msgs in proptest::collection::vec((0u8..7, proptest::prelude::any::<u8>()), 1..24),
            cuts in proptest::collection::vec(proptest::prelude::any::<usize>(), 0..6),
        ) {
            let mut stream = BytesMut::new();
            for (kind, n) in msgs {
                message(kind, n, &mut stream);
            }
            let plain = sent(&stream, &cuts, false);
            let paused = sent(&stream, &cuts, true);
            proptest::prop_assert_eq!(plain, paused);
        }
    }

    #[test]
    fn a_repeated_unnamed_parse_is_inspected_unless_plain() {
        let mut client = ClientStatements::default();
        for _ in 0..2 {
            let link = scan_unnamed(&mut client, "SET statement_timeout = 5");
            assert_eq!(link.touched_settings, ["statement_timeout"], "every time: it is read back after each");
        }
        for _ in 0..2 {
            let link = scan_unnamed(&mut client, "LISTEN x");
            assert!(link.pin.is_some(), "every time: each transaction's link must pin");
        }
        for _ in 0..2 {
            let link = scan_unnamed(&mut client, "SELECT 1");
            assert!(link.touched_settings.is_empty() && link.pin.is_none());
            assert_eq!((link.expect.len(), link.pending_ready), (2, 1));
        }
        assert!(client.is_plain_unnamed(b"SELECT 1\0\0\0"));
    }
}
