//! Relaying one client's traffic over a checked-out backend, and the
//! transaction-boundary bookkeeping that decides when the backend can go back.
//!
//! Bytes are read straight into the backend's buffers and written out of the
//! same buffers: a frame is never copied or decoded on the way through. The
//! scanners look at headers only, capturing the few bodies that matter
//! (ReadyForQuery's status byte, ParameterStatus, ErrorResponse).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::pinning::{self, PinReason};
use super::statements::{self, ClientStatements, StatementCommand};
use crate::admin::registry::Signal;
use crate::admin::stats::{Stats, sqlstate_class};
use crate::config::OnSessionState;
use crate::net::Stream;
use crate::pool::expect::{Expect, SpareQueue};
use crate::pool::statements::{PreparedSet, Registry, Statement};
use crate::pool::{Backend, PoolCounters, Traffic};
use crate::protocol::backend::{self as msg};
use crate::protocol::frame::{FrameError, HEADER_LEN, Header, MAX_MESSAGE_LEN, Scanner};
use crate::protocol::sqlstate::SqlState;
use crate::protocol::{frontend, tag};
use crate::routing::route::RouteReason;

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
            traffic: Traffic::default(),
        }
    }

    /// The backend can serve someone else: every request answered, idle
    /// outside a transaction, and no partial message in flight either way.
    pub fn at_transaction_boundary(&self, from_server: &BytesMut) -> bool {
        self.at_transaction_boundary_ignoring_output() && self.server_ready == 0 && from_server.is_empty()
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
                    }
                    // During COPY FROM STDIN the server ignores Sync: no ReadyForQuery for it.
                    tag::SYNC if !self.copy_in => {
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
            } else {
                self.client_body_remaining = end - buf.len();
                pos = buf.len();
            }
        }
        self.client_ready = pos;
        Ok(())
    }

    /// Handles one whole Query/Parse/Bind/Describe/Close frame at
    /// `buf[start..end]`; returns the end of what replaced it.
    fn inspect(
        &mut self,
        buf: &mut BytesMut,
        start: usize,
        end: usize,
        tag: u8,
        scope: &mut StatementScope<'_>,
        prepared: &mut PreparedSet,
    ) -> usize {
        // A streamed Bind is inspected on its first bytes only: `end` lies past the buffer.
        let body = &buf[start + HEADER_LEN..end.min(buf.len())];
        let mut out = BytesMut::new();
        match tag {
            tag::QUERY => {
                self.pending_ready += 1;
                self.expect.push_back(Expect::QUERY);
                // A simple Query destroys the unnamed statement.
                scope.client.unnamed = None;
                self.unnamed_here = false;
                if touches_settings(body) {
                    super::params::settings_named_in(body, &mut self.touched_settings);
                }
                if let Some(reason) = self.session_state(body, scope.on_session_state) {
                    crate::protocol::frontend::query(&mut out, &pinning::refusal_sql(reason));
                    return statements::splice(buf, start, end, &out);
                }
                match statements::statement_command(body) {
                    StatementCommand::DropAll => {
                        scope.client.clear();
                        prepared.clear();
                    }
                    StatementCommand::Deallocate(name) => {
                        // The client's statement goes; the server copy is deallocated
                        // under its pgmux name (others re-prepare it transparently).
                        // Where this backend lacks it, it is created first (Parse +
                        // Sync, both answers dropped) so DEALLOCATE answers as directly.
                        if let Some(st) = scope.client.remove(name) {
                            if !prepared.touch(st.id) {
                                frontend::parse_raw(&mut out, st.server_name.as_bytes(), &st.body);
                                self.insert_before_last(Expect::Parse {
                                    forward: false,
                                    statement: None,
                                    client_name: None,
                                });
                                out.extend_from_slice(SYNC);
                                self.insert_before_last(Expect::Ready { forward: false, sync: true });
                                self.pending_ready += 1;
                            }
                            prepared.remove(st.id, false);
                            let sql = format!("DEALLOCATE {}", st.server_name);
                            crate::protocol::frontend::query(&mut out, &sql);
                            return statements::splice(buf, start, end, &out);
                        }
                    }
                    StatementCommand::Other => {}
                }
                end
            }
            tag::PARSE => {
                self.unsynced = true;
                let Some((name, rest)) = statements::cstr(body) else {
                    // Malformed: let the server reject it, keeping counts honest.
                    self.expect.push_back(Expect::Parse { forward: true, statement: None, client_name: None });
                    return end;
                };
                if name.is_empty() && scope.client.is_plain_unnamed(rest) {
                    // The text of the client's last unnamed Parse, inspected then
                    // (drivers re-send it for every execution): forward as is.
                    self.unnamed_here = true;
                    self.expect.push_back(Expect::Parse { forward: true, statement: None, client_name: None });
                    return end;
                }
                if !name.is_empty()
                    && let Some(existing) = scope.client.get(name).cloned()
                {
                    // Postgres refuses a name in use (42P05), after checking the
                    // text, and keeps the first statement. The server does the
                    // refusing, in order: the Parse goes out under the existing
                    // statement's server name (made present on this backend).
                    self.ensure_prepared(&existing, scope, prepared, &mut out);
                    self.expect.push_back(Expect::DuplicateParse { client_name: name.into() });
                    let name_start = start + HEADER_LEN;
                    let new_end = statements::rename(
                        buf,
                        start,
                        end,
                        name_start,
                        name_start + name.len(),
                        existing.server_name.as_bytes(),
                    );
                    return self.insert_in_front(buf, start, new_end, &out);
                }
                let touches = touches_settings(rest);
                if touches {
                    super::params::settings_named_in(rest, &mut self.touched_settings);
                }
                let refused = self.session_state(rest, scope.on_session_state).map(|reason| {
                    let mut body = pinning::refusal_parse_sql(reason).into_bytes();
                    body.extend_from_slice(&[0, 0, 0]);
                    body
                });
                let rest = refused.as_deref().unwrap_or(rest);
                if name.is_empty() {
                    // Judged on the text itself, whatever on_session_state did with it.
                    let plain = refused.is_none() && !touches && pinning::session_state(rest).is_none();
                    scope.client.remember_unnamed(rest, plain);
                    self.unnamed_here = true;
                    self.expect.push_back(Expect::Parse { forward: true, statement: None, client_name: None });
                    if refused.is_none() {
                        return end;
                    }
                    frontend::parse_raw(&mut out, b"", rest);
                    return statements::splice(buf, start, end, &out);
                }
                let st = scope.registry.intern(rest);
                let rest_owned = refused.as_ref().map(|_| rest.to_vec());
                let name: Box<[u8]> = name.into();
                scope.client.insert(name.clone(), st.clone());
                if prepared.touch(st.id) {
                    // Already on this backend: close and re-create it so the
                    // client gets its ParseComplete from the server, in order.
                    frontend::close_statement(&mut out, st.server_name.as_bytes());
                    self.expect.push_back(Expect::Close { forward: false });
                } else {
                    prepared.insert(st.clone(), scope.max_prepared);
                }
                self.close_queued(prepared, &mut out);
                let server_name = st.server_name.clone();
                self.expect.push_back(Expect::Parse {
                    forward: true,
                    statement: Some(st),
                    client_name: Some(name.clone()),
                });
                if refused.is_some() {
                    frontend::parse_raw(&mut out, server_name.as_bytes(), rest_owned.as_deref().unwrap_or_default());
                    return statements::splice(buf, start, end, &out);
                }
                let name_start = start + HEADER_LEN;
                let new_end =
                    statements::rename(buf, start, end, name_start, name_start + name.len(), server_name.as_bytes());
                self.insert_in_front(buf, start, new_end, &out)
            }
            tag::BIND => {
                self.unsynced = true;
                let Some((portal, after_portal)) = statements::cstr(body) else {
                    self.expect.push_back(Expect::Bind { statement: None });
                    return end;
                };
                let Some((name, _)) = statements::cstr(after_portal) else {
                    self.expect.push_back(Expect::Bind { statement: None });
                    return end;
                };
                if name.is_empty() {
                    self.ensure_unnamed(scope, &mut out);
                    self.expect.push_back(Expect::Bind { statement: None });
                    return self.insert_in_front(buf, start, end, &out);
                }
                let Some(st) = scope.client.get(name).cloned() else {
                    // Unknown to the client: the server gives the error Postgres would.
                    self.expect.push_back(Expect::Bind { statement: None });
                    return end;
                };
                let name_start = start + HEADER_LEN + portal.len() + 1;
                let name_end = name_start + name.len();
                self.ensure_prepared(&st, scope, prepared, &mut out);
                self.traffic.binds += 1;
                let new_end = statements::rename(buf, start, end, name_start, name_end, st.server_name.as_bytes());
                self.expect.push_back(Expect::Bind { statement: Some(st) });
                self.insert_in_front(buf, start, new_end, &out)
            }
            tag::DESCRIBE => {
                self.unsynced = true;
                let Some(name) = statements::statement_target(body) else {
                    self.expect.push_back(Expect::Describe);
                    return end;
                };
                if name.is_empty() {
                    self.ensure_unnamed(scope, &mut out);
                    self.expect.push_back(Expect::Describe);
                    return self.insert_in_front(buf, start, end, &out);
                }
                let Some(st) = scope.client.get(name).cloned() else {
                    self.expect.push_back(Expect::Describe);
                    return end;
                };
                let name_start = start + HEADER_LEN + 1;
                let name_end = name_start + name.len();
                self.ensure_prepared(&st, scope, prepared, &mut out);
                self.expect.push_back(Expect::Describe);
                let new_end = statements::rename(buf, start, end, name_start, name_end, st.server_name.as_bytes());
                self.insert_in_front(buf, start, new_end, &out)
            }
            tag::CLOSE => {
                self.unsynced = true;
                self.expect.push_back(Expect::Close { forward: true });
                let Some(name) = statements::statement_target(body) else { return end };
                if name.is_empty() {
                    scope.client.unnamed = None;
                    self.unnamed_here = false;
                    return end;
                }
                // The client's view only; the server copy stays for others. Closing a
                // statement that does not exist is no error: the server still answers
                // CloseComplete, in order.
                let name_start = start + HEADER_LEN + 1;
                let name_end = name_start + name.len();
                scope.client.remove(name);
                statements::rename(buf, start, end, name_start, name_end, CLOSE_NOOP_NAME)
            }
            _ => end,
        }
    }

    /// Counts a new pin or refusal (once each) for metrics and logs it.
    pub fn report_session_state(&mut self, stats: &Stats, client: u64) {
        if let Some(reason) = self.refused.take() {
            tracing::info!(client, %reason, "statement refused: on_session_state = \"error\"");
            stats.session_state_refused[reason as usize].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        if let (Some(reason), false) = (self.pin, self.pin_reported) {
            self.pin_reported = true;
            tracing::info!(client, %reason, "client pinned to its server connection for the rest of its session");
            stats.pinned[reason as usize].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Applies `on_session_state` to SQL that creates session state: pins the
    /// link, or returns the reason when the statement must be refused.
    fn session_state(&mut self, sql: &[u8], policy: OnSessionState) -> Option<PinReason> {
        if policy == OnSessionState::Allow || self.pin.is_some() {
            return None;
        }
        let reason = pinning::session_state(sql)?;
        match policy {
            OnSessionState::Pin => {
                self.pin = Some(reason);
                None
            }
            OnSessionState::Error => {
                self.refused = Some(reason);
                Some(reason)
            }
            OnSessionState::Allow => None,
        }
    }

    /// Puts the injected messages in `out` in front of the frame at
    /// `buf[start..end]`; returns the new end of that frame.
    fn insert_in_front(&self, buf: &mut BytesMut, start: usize, end: usize, out: &[u8]) -> usize {
        if out.is_empty() {
            return end;
        }
        statements::splice(buf, start, start, out);
        end + out.len()
    }

    /// Queues `e` ahead of the last expectation (the current Query's ReadyForQuery),
    /// for messages injected in front of that Query.
    fn insert_before_last(&mut self, e: Expect) {
        let last = self.expect.pop_back();
        self.expect.push_back(e);
        self.expect.extend(last);
    }

    /// Prepares `st` on this backend first if it lacks it (response dropped).
    fn ensure_prepared(
        &mut self,
        st: &Arc<Statement>,
        scope: &StatementScope<'_>,
        prepared: &mut PreparedSet,
        out: &mut BytesMut,
    ) {
        if prepared.touch(st.id) {
            self.traffic.prepared_hits += 1;
            self.close_queued(prepared, out);
            return;
        }
        self.traffic.prepared_misses += 1;
        prepared.insert(st.clone(), scope.max_prepared);
        self.close_queued(prepared, out);
        frontend::parse_raw(out, st.server_name.as_bytes(), &st.body);
        self.expect.push_back(Expect::Parse { forward: false, statement: Some(st.clone()), client_name: None });
    }

    /// Re-creates the client's unnamed statement on this backend if it binds
    /// one it parsed on another backend (a Sync may separate Parse and Bind).
    fn ensure_unnamed(&mut self, scope: &StatementScope<'_>, out: &mut BytesMut) {
        if self.unnamed_here {
            return;
        }
        if let Some(body) = &scope.client.unnamed {
            frontend::parse_raw(out, b"", body);
            self.expect.push_back(Expect::Parse { forward: false, statement: None, client_name: None });
            self.unnamed_here = true;
        }
    }

    /// Closes server statements evicted from (or retired in) this backend's set.
    fn close_queued(&mut self, prepared: &mut PreparedSet, out: &mut BytesMut) {
        for name in prepared.to_close.drain(..) {
            frontend::close_statement(out, name.as_bytes());
            self.expect.push_back(Expect::Close { forward: false });
        }
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

/// How many bytes of a Bind body hold its portal and statement names (what
/// pgmux rewrites), once both are there.
fn bind_prefix_len(body: &[u8]) -> Option<usize> {
    let portal = memchr::memchr(0, body)?;
    let statement = memchr::memchr(0, &body[portal + 1..])?;
    Some(portal + 1 + statement + 1)
}

/// A cheap, conservative test for statements that may change a setting the
/// server does not report: a statement starting with SET or RESET, or a
/// `set_config(` call anywhere. False positives only cost a read-back.
pub(super) fn touches_settings(sql: &[u8]) -> bool {
    // Built once: constructing a searcher per call cost more than the search.
    static SET_CONFIG: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"set_config"));
    if SET_CONFIG.find(sql).is_some() {
        return true;
    }
    let starts = |word: &[u8], kw: &[u8]| {
        word.len() > kw.len() && word[..kw.len()].eq_ignore_ascii_case(kw) && word[kw.len()].is_ascii_whitespace()
    };
    let mut rest = sql;
    loop {
        let word = rest.trim_ascii_start();
        if starts(word, b"set") || starts(word, b"reset") {
            return true;
        }
        match memchr::memchr(b';', word) {
            Some(i) => rest = &word[i + 1..],
            None => return false,
        }
    }
}

impl Default for Link {
    fn default() -> Self {
        Link::new()
    }
}

/// Why the relay loop stopped.
#[derive(Debug)]
pub enum Outcome {
    /// At a transaction boundary: the backend is clean (transaction pooling).
    Boundary,
    /// The client sent Terminate.
    Terminated,
    /// The client's socket closed or failed.
    ClientGone,
    /// The client sent a malformed message.
    ClientProtocol(FrameError),
    /// The server closed, failed, or sent a malformed message.
    ServerGone(String),
    /// The client sat idle inside a transaction too long.
    IdleInTransaction,
    /// Shutdown's grace period ran out.
    Shutdown,
    /// KILL_CLIENT named this client.
    Killed,
    /// A replica refused the request as a write (25006); nothing reached the client.
    Misrouted,
    /// The server did not finish answering within `query_timeout`.
    QueryTimeout,
    /// The replica's monitor marked it down while answers were owed.
    NodeDown,
}

#[derive(Clone, Copy)]
pub struct RelayOptions<'a> {
    /// The client's id, for log lines.
    pub client: u64,
    /// Release the backend at transaction boundaries (transaction pooling).
    pub release_at_boundary: bool,
    pub idle_transaction_timeout: Duration,
    /// A request unanswered this long is given up on (0: never).
    pub query_timeout: Duration,
    /// See [`StatementScope::max_query_size`].
    pub max_query_size: usize,
    pub on_session_state: OnSessionState,
    /// Where pins, refusals and errors are counted.
    pub stats: &'a Stats,
    /// The counters of the pool the backend came from.
    pub counters: &'a PoolCounters,
    /// Why the transaction went to that pool (`None`: the database is not routed).
    pub route: Option<RouteReason>,
    /// The replica's health, when the transaction runs on one: a request
    /// waiting on it gives up when its monitor marks it down.
    pub node: Option<&'a crate::routing::monitor::NodeState>,
}

/// Adds the tally of the transaction that just ended to its pool (and its
/// errors to the process-wide table), and starts a new one.
pub fn record_traffic(link: &mut Link, opts: &RelayOptions<'_>) {
    let t = &mut link.traffic;
    if t.is_empty() {
        return;
    }
    opts.counters.record(opts.route, t);
    for class in t.errors.drain(..) {
        opts.stats.errors.count_class(class);
    }
    let errors = std::mem::take(&mut t.errors);
    *t = Traffic { errors, ..Traffic::default() };
}

/// Relays until the transaction ends (or anything else stops it). `link`
/// must already account for the bytes waiting in `backend.to_server`.
///
/// `clock` is the caller's latest clock reading (when the request now in
/// `to_server` was taken on); the relay moves it on at every answered
/// request and leaves it at the last one, so the caller can release the
/// backend without reading the clock again.
pub async fn relay(
    client: &mut Stream,
    backend: &mut Backend,
    link: &mut Link,
    scope: &mut StatementScope<'_>,
    opts: &RelayOptions<'_>,
    signal: &Signal,
    clock: &mut Instant,
) -> Outcome {
    let Backend { stream: server, to_server, from_server, prepared, .. } = backend;
    // Since when the client owes the next move (idle in a transaction).
    let mut idle_since = *clock;
    // Armed at the first idle-in-transaction wait; on firing it re-checks the
    // real deadline, so client activity never has to re-arm the timer.
    let mut idle_timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
    // Likewise for query_timeout: armed at the first wait for the server.
    let mut query_timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
    // Polled only while answers are owed; never resolves on a primary.
    let mut node_down = std::pin::pin!(async {
        match opts.node {
            Some(node) => node.went_down().await,
            None => std::future::pending().await,
        }
    });
    // When the server got the request it is now answering (for query durations).
    let mut query_started = *clock;
    // The request that opened the transaction goes out at once: a fresh
    // backend's socket has room, so waiting for write readiness first would
    // only cost a poll.
    if let Err(e) = flush(server, to_server, &mut link.client_ready) {
        return Outcome::ServerGone(format!("write to server failed: {e}"));
    }
    loop {
        link.report_session_state(opts.stats, opts.client);
        if link.terminated && link.client_ready == 0 {
            return Outcome::Terminated;
        }
        if let Some(e) = link.broken_due(from_server) {
            return Outcome::ClientProtocol(e);
        }
        if link.broken.is_some() && link.copy_in {
            // The stream broke while the server waits for COPY data (the
            // COPY began after the break was read): end it, so what came
            // before gets its answer.
            let before = to_server.len();
            frontend::copy_fail(to_server, "client sent a malformed message");
            link.client_ready += to_server.len() - before;
            link.copy_in = false;
        }
        if opts.release_at_boundary && link.pin.is_none() && link.at_transaction_boundary(from_server) {
            return Outcome::Boundary;
        }
        let idle_in_txn = link.pending_ready == 0
            && link.status != msg::IDLE
            && link.client_ready == 0
            && link.server_ready == 0
            && !opts.idle_transaction_timeout.is_zero();
        let owed = !link.expect.is_empty();
        let awaiting_server = owed && !opts.query_timeout.is_zero();
        // One poll over every source, in priority order (writes first: they
        // free buffer space). Reads happen inside the poll so that a short
        // read clears the socket's readiness (see `Stream::poll_read_buf`).
        let event = std::future::poll_fn(|cx| {
            // `wants_write`: TLS output a full socket did not take yet.
            if (link.client_ready > 0 || server.wants_write())
                && let Poll::Ready(r) = server.poll_write_ready(cx)
            {
                return Poll::Ready(Event::ServerWritable(r));
            }
            if ((link.server_ready > 0 && !link.hold) || client.wants_write())
                && let Poll::Ready(r) = client.poll_write_ready(cx)
            {
                return Poll::Ready(Event::ClientWritable(r));
            }
            if from_server.len() < HIGH_WATER
                && let Poll::Ready(r) = server.poll_read_buf(cx, from_server)
            {
                return Poll::Ready(Event::ServerRead(r));
            }
            if link.may_read_client(to_server.len())
                && let Poll::Ready(r) = client.poll_read_buf(cx, to_server)
            {
                return Poll::Ready(Event::ClientRead(r));
            }
            if idle_in_txn {
                let deadline = tokio::time::Instant::from_std(idle_since + opts.idle_transaction_timeout);
                let timer = idle_timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if timer.as_mut().poll(cx).is_ready() {
                    if tokio::time::Instant::now() >= deadline {
                        return Poll::Ready(Event::IdleTimeout);
                    }
                    timer.as_mut().reset(deadline);
                    // Registers the re-armed timer (it cannot be due yet).
                    let _ = timer.as_mut().poll(cx);
                }
            }
            if owed && opts.node.is_some() && node_down.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::NodeDown);
            }
            if awaiting_server {
                let deadline = tokio::time::Instant::from_std(query_started + opts.query_timeout);
                let timer = query_timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if timer.as_mut().poll(cx).is_ready() {
                    if tokio::time::Instant::now() >= deadline {
                        return Poll::Ready(Event::QueryTimeout);
                    }
                    timer.as_mut().reset(deadline);
                    let _ = timer.as_mut().poll(cx);
                }
            }
            if let Poll::Ready(flags) = signal.poll(cx, Signal::FORCE_CLOSE | Signal::KILL) {
                // KILL_CLIENT acts at once, even mid-transaction.
                return Poll::Ready(if flags & Signal::KILL != 0 { Event::Killed } else { Event::Shutdown });
            }
            Poll::Pending
        })
        .await;
        match event {
            Event::ServerWritable(r) => {
                if let Err(e) = r.and_then(|_| flush(server, to_server, &mut link.client_ready)) {
                    return Outcome::ServerGone(format!("write to server failed: {e}"));
                }
            }
            Event::ClientWritable(r) => {
                let mut held = 0;
                let ready = if link.hold { &mut held } else { &mut link.server_ready };
                if r.and_then(|_| flush(client, from_server, ready)).is_err() {
                    return Outcome::ClientGone;
                }
            }
            Event::ServerRead(Ok(0)) => {
                // The server's last words (a FATAL) reach the client before the close.
                deliver_rest(client, from_server, &mut link.server_ready).await;
                return Outcome::ServerGone("server closed the connection".into());
            }
            Event::ServerRead(Ok(_)) => {
                let owed = link.pending_ready;
                if let Err(e) = link.scan_server(from_server, Some(scope.client), scope.registry, prepared) {
                    return Outcome::ServerGone(format!("server sent a malformed message: {e}"));
                }
                if link.misrouted && link.pending_ready == 0 && link.server_scan.at_boundary() {
                    return Outcome::Misrouted;
                }
                if !link.hold && flush(client, from_server, &mut link.server_ready).is_err() {
                    return Outcome::ClientGone;
                }
                if link.pending_ready < owed {
                    // One clock read per answered request, none per message.
                    let now = Instant::now();
                    link.count_queries(owed - link.pending_ready, now.saturating_duration_since(query_started));
                    query_started = now;
                    idle_since = now;
                    *clock = now;
                    // Session mode (or a pinned client): the relay outlives
                    // transactions, so it records each as the server ends it.
                    let outlives = !opts.release_at_boundary || link.pin.is_some();
                    if outlives && link.pending_ready == 0 && link.status == msg::IDLE {
                        record_traffic(link, opts);
                    }
                }
            }
            Event::ServerRead(Err(e)) => {
                deliver_rest(client, from_server, &mut link.server_ready).await;
                return Outcome::ServerGone(format!("read from server failed: {e}"));
            }
            Event::ClientRead(Ok(0)) | Event::ClientRead(Err(_)) => return Outcome::ClientGone,
            Event::ClientRead(Ok(n)) => {
                link.traffic.bytes_in += n as u64;
                let was_answered = link.pending_ready == 0;
                // More requests on the link: the held answer can no longer be retried alone.
                link.hold = false;
                link.misrouted = false;
                if let Err(e) = link.scan_client(to_server, scope, prepared) {
                    return Outcome::ClientProtocol(e);
                }
                // A new request starts its queries' clock; bytes that complete
                // no request (a message in pieces, Parse/Bind before their
                // Sync) only show the client is not idle.
                if was_answered || (link.pending_ready == 0 && !opts.idle_transaction_timeout.is_zero()) {
                    let now = Instant::now();
                    if was_answered {
                        query_started = now;
                    }
                    idle_since = now;
                }
                if let Err(e) = flush(server, to_server, &mut link.client_ready) {
                    return Outcome::ServerGone(format!("write to server failed: {e}"));
                }
            }
            Event::IdleTimeout => return Outcome::IdleInTransaction,
            Event::QueryTimeout => return Outcome::QueryTimeout,
            Event::NodeDown => return Outcome::NodeDown,
            Event::Shutdown => return Outcome::Shutdown,
            Event::Killed => return Outcome::Killed,
        }
    }
}

/// What woke the relay.
enum Event {
    ServerWritable(std::io::Result<()>),
    ClientWritable(std::io::Result<()>),
    ServerRead(std::io::Result<usize>),
    ClientRead(std::io::Result<usize>),
    IdleTimeout,
    QueryTimeout,
    NodeDown,
    Shutdown,
    Killed,
}

/// Writes what was scanned for the client but not yet written, waiting a
/// little for a slow client: a server that closes leaves no later chance.
async fn deliver_rest(client: &mut Stream, from_server: &BytesMut, ready: &mut usize) {
    if *ready == 0 {
        return;
    }
    let rest = &from_server[..*ready];
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        client.write_all(rest).await?;
        client.flush().await
    })
    .await;
    *ready = 0;
}

/// Writes as much of the first `*ready` bytes of `buf` as the socket takes
/// now (and, for TLS, as much of the encrypted output as it takes).
fn flush(stream: &mut Stream, buf: &mut BytesMut, ready: &mut usize) -> std::io::Result<()> {
    while *ready > 0 {
        match stream.try_write(&buf[..*ready]) {
            Ok(n) => {
                buf.advance(n);
                *ready -= n;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    stream.try_flush()
}

/// Brings a backend whose client left mid-flight back to idle: flush the whole
/// messages already accepted, end any COPY, cancel what runs, sync, roll back.
/// Returns `false` when the backend must be closed instead.
pub async fn recover(backend: &mut Backend, link: &mut Link, registry: &Registry) -> bool {
    if link.client_body_remaining > 0 || link.unpoolable {
        // The server holds part of a message: nothing can resynchronise it.
        return false;
    }
    match tokio::time::timeout(RECOVER_TIMEOUT, recover_inner(backend, link, registry)).await {
        Ok(Ok(clean)) => clean,
        Ok(Err(e)) => {
            tracing::debug!(pid = backend.pid, error = %e, "server connection failed during cleanup");
            false
        }
        Err(_) => {
            tracing::info!(pid = backend.pid, pending = link.pending_ready, expect = ?link.expect, copy_in = link.copy_in, unsynced = link.unsynced, skipping = link.skipping, status = link.status, "cleanup of an abandoned server connection timed out");
            false
        }
    }
}

async fn recover_inner(backend: &mut Backend, link: &mut Link, registry: &Registry) -> std::io::Result<bool> {
    // Whole frames already scanned go out so the ReadyForQuery count stays exact;
    // a trailing partial header was never sent and is dropped.
    backend.to_server.truncate(link.client_ready);
    let mut extra = BytesMut::new();
    if link.copy_in {
        frontend::copy_fail(&mut extra, "client disconnected");
        link.copy_in = false;
    }
    let was_running = !link.expect.is_empty();
    if link.unsynced {
        if !link.skipping {
            // A Sync would commit the implicit transaction the client's
            // Executes opened, which the client never did. ROLLBACK, run
            // as an extended-protocol statement, aborts it first (and ends an
            // explicit block too). After an error the server skips it, and
            // the Sync ends the failed transaction anyway.
            frontend::parse_raw(&mut extra, b"", b"ROLLBACK\0\0\0");
            frontend::bind_unnamed(&mut extra);
            frontend::execute_unnamed(&mut extra);
            link.expect.push_back(Expect::Parse { forward: false, statement: None, client_name: None });
            link.expect.push_back(Expect::Bind { statement: None });
            link.expect.push_back(Expect::Execute);
        }
        frontend::sync(&mut extra);
        link.pending_ready += 1;
        link.expect.push_back(Expect::SYNC);
        link.unsynced = false;
    }
    backend.to_server.extend_from_slice(&extra);
    backend.stream.write_all(&backend.to_server).await?;
    backend.to_server.clear();
    link.client_ready = 0;
    // Whatever was scanned but not delivered is for nobody now.
    backend.from_server.advance(link.server_ready);
    link.server_ready = 0;
    // Postgres drops a cancel that arrives while it is between statements, so
    // one sent before the server started the client's last statement (just
    // written) is lost: cancel again, less and less often, while answers are owed.
    let mut next_cancel = was_running.then(tokio::time::Instant::now);
    let mut backoff = Duration::from_millis(20);
    while link.pending_ready > 0 || !link.server_scan.at_boundary() {
        let read = match next_cancel {
            Some(at) => tokio::select! {
                r = backend.stream.read_buf(&mut backend.from_server) => Some(r?),
                () = tokio::time::sleep_until(at) => None,
            },
            None => Some(backend.stream.read_buf(&mut backend.from_server).await?),
        };
        let Some(read) = read else {
            cancel_backend(backend.addr, backend.pid, backend.secret).await;
            next_cancel = Some(tokio::time::Instant::now() + backoff);
            backoff = (backoff * 2).min(Duration::from_millis(500));
            continue;
        };
        if read == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        link.scan_server(&mut backend.from_server, None, registry, &mut backend.prepared)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        backend.from_server.advance(link.server_ready);
        link.server_ready = 0;
    }
    if link.unpoolable || !backend.from_server.is_empty() {
        return Ok(false);
    }
    apply_param_changes(backend, link);
    if link.status != msg::IDLE {
        let (_, status) = backend.run_quietly("ROLLBACK").await?;
        link.status = status;
    }
    if link.status == msg::IDLE && link.reset_session {
        // The session's own state (LISTEN, locks, temp tables, WITH HOLD
        // cursors, SQL-prepared statements, settings) goes with its client.
        let (err, status) = backend.run_quietly("DISCARD ALL").await?;
        if err.is_some() {
            return Ok(false);
        }
        link.status = status;
        backend.prepared.clear();
        backend.forget_all_changed();
    }
    Ok(link.status == msg::IDLE)
}

/// Records the server-reported parameter changes on the backend itself.
pub fn apply_param_changes(backend: &mut Backend, link: &mut Link) {
    for (k, v) in link.take_param_changes() {
        backend.set_param(&k, &v);
    }
}

/// Sends a CancelRequest for `pid` to the server at `addr` and waits until the
/// server has taken it (it closes the connection after signalling the backend).
pub async fn cancel_backend(addr: std::net::SocketAddr, pid: i32, secret: i32) {
    let attempt = async {
        let mut s = TcpStream::connect(addr).await?;
        let mut buf = BytesMut::new();
        frontend::cancel_request(&mut buf, pid, secret);
        s.write_all(&buf).await?;
        let mut sink = [0u8; 16];
        while s.read(&mut sink).await? > 0 {}
        std::io::Result::Ok(())
    };
    match tokio::time::timeout(Duration::from_secs(2), attempt).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(pid, error = %e, "cancel request failed"),
        Err(_) => tracing::debug!(pid, "cancel request timed out"),
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

    #[test]
    fn settings_changes_are_spotted() {
        for sql in [
            "SET search_path = a",
            "  reset all",
            "SELECT 1; SET\tTimeZone TO 'UTC'",
            "select pg_catalog.set_config('x', 'y', false)",
        ] {
            assert!(touches_settings(sql.as_bytes()), "{sql}");
        }
        for sql in ["SELECT 1", "SELECT settings FROM t", "UPDATE t SET a = 1", "resetting", ""] {
            assert!(!touches_settings(sql.as_bytes()), "{sql}");
        }
    }
}
