//! What pgmux changes in the client's messages on their way to the server:
//! statement names (client names to pgmux's server names, created where a
//! backend lacks them), DEALLOCATE and Close, and statements that create
//! session state (pinned, refused or let through, `on_session_state`).

use super::*;

impl Link {
    /// Handles one whole Query/Parse/Bind/Describe/Close frame at
    /// `buf[start..end]`; returns the end of what replaced it.
    pub(super) fn inspect(
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
                let sniffed = crate::sql::sniff(body);
                if sniffed.touches_settings {
                    crate::sql::settings::settings_named_in(body, &mut self.touched_settings);
                }
                if let Some(reason) = self.session_state(sniffed.session_state, scope.on_session_state) {
                    crate::protocol::frontend::query(&mut out, &pinning::refusal_sql(reason));
                    return statements::splice(buf, start, end, &out);
                }
                match statement_command(body) {
                    StatementCommand::DropAll => {
                        scope.client.clear();
                        prepared.clear();
                    }
                    StatementCommand::Deallocate(name) => {
                        // The client's statement goes; the server copy is deallocated
                        // under its pgmux name (others re-prepare it transparently).
                        // Where this backend lacks it, it is created first (Parse +
                        // Sync, both answers dropped) so DEALLOCATE answers as directly.
                        if let Some(st) = scope.client.remove(&name) {
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
                let sniffed = crate::sql::sniff(rest);
                if sniffed.touches_settings {
                    crate::sql::settings::settings_named_in(rest, &mut self.touched_settings);
                }
                let refused = self.session_state(sniffed.session_state, scope.on_session_state).map(|reason| {
                    let mut body = pinning::refusal_parse_sql(reason).into_bytes();
                    body.extend_from_slice(&[0, 0, 0]);
                    body
                });
                let rest = refused.as_deref().unwrap_or(rest);
                if name.is_empty() {
                    // Judged on the text itself, whatever on_session_state did with it.
                    let plain = refused.is_none() && sniffed == crate::sql::Sniffed::default();
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
    /// Applies `on_session_state` to the session state a statement creates;
    /// `Some` when the statement is to be refused.
    pub(super) fn session_state(&mut self, found: Option<PinReason>, policy: OnSessionState) -> Option<PinReason> {
        if policy == OnSessionState::Allow || self.pin.is_some() {
            return None;
        }
        let reason = found?;
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
    pub(super) fn insert_in_front(&self, buf: &mut BytesMut, start: usize, end: usize, out: &[u8]) -> usize {
        if out.is_empty() {
            return end;
        }
        statements::splice(buf, start, start, out);
        end + out.len()
    }

    /// Queues `e` ahead of the last expectation (the current Query's ReadyForQuery),
    /// for messages injected in front of that Query.
    pub(super) fn insert_before_last(&mut self, e: Expect) {
        let last = self.expect.pop_back();
        self.expect.push_back(e);
        self.expect.extend(last);
    }

    /// Prepares `st` on this backend first if it lacks it (response dropped).
    pub(super) fn ensure_prepared(
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
    pub(super) fn ensure_unnamed(&mut self, scope: &StatementScope<'_>, out: &mut BytesMut) {
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
    pub(super) fn close_queued(&mut self, prepared: &mut PreparedSet, out: &mut BytesMut) {
        for name in prepared.to_close.drain(..) {
            frontend::close_statement(out, name.as_bytes());
            self.expect.push_back(Expect::Close { forward: false });
        }
    }
}
