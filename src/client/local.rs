//! Answers pgmux gives without a backend: statements a pool has already
//! prepared, and a request refused before it reached a server.

use super::*;

/// Answers, without a backend, a request that only prepares statements a
/// server of this pool has already parsed: named Parse messages and a Sync
/// (libpq's `PQprepare`), each naming a known-good text. The server copy is
/// created on whichever backend first binds it, as for any statement that
/// backend lacks. Returns the answer (ParseComplete per Parse, then
/// ReadyForQuery) after consuming the request, or `None` to take the usual
/// path.
///
/// Why: a client that prepares synchronously while the pool is exhausted
/// would wait for a backend; if the same client thread holds the open
/// transactions that exhaust it (pgbench `-M prepared` with more clients
/// than `pool_size`), nothing ever moves. Statements that pin or change
/// settings take the usual path, where those are noticed.
pub(super) fn prepare_locally(pending: &mut BytesMut, session: &mut Session) -> Option<BytesMut> {
    // Cheap refusal first, on every request: it must start with a named Parse.
    if pending.first() != Some(&tag::PARSE) || pending.get(crate::protocol::frame::HEADER_LEN).is_none_or(|&b| b == 0) {
        return None;
    }
    let mut found = Vec::new();
    let mut messages = Request::new(pending).messages();
    loop {
        let m = messages.next()?;
        match m.tag {
            tag::PARSE => {
                let (name, rest) = statements::cstr(m.body)?;
                let sql = &rest[..memchr::memchr(0, rest)?];
                // A name in use is refused by the server (42P05), in order.
                if name.is_empty()
                    || session.statements.get(name).is_some()
                    || crate::sql::sniff(sql) != crate::sql::Sniffed::default()
                {
                    return None;
                }
                let st = session.pool.statements.find(rest).filter(|st| st.is_validated())?;
                found.push((name, st));
            }
            tag::SYNC if !found.is_empty() && m.end == pending.len() => break,
            _ => return None,
        }
    }
    let mut answer = BytesMut::new();
    for (name, st) in found {
        session.statements.insert(name.into(), st);
        msg::parse_complete(&mut answer);
    }
    msg::ready_for_query(&mut answer, msg::IDLE);
    drop(messages);
    pending.clear();
    Some(answer)
}

/// Answers the request at the front of `pending` with an error instead of
/// running it: ErrorResponse at once, then skip the client's messages up to
/// the end of that request (Query, FunctionCall or Sync) and send
/// ReadyForQuery, as the server would after an error. Returns `false` if the
/// client terminated or went away meanwhile.
pub(super) fn reject_request<'a>(
    stream: &'a mut Stream,
    pending: &'a mut BytesMut,
    code: SqlState,
    text: &'a str,
) -> RarePath<'a, std::io::Result<bool>> {
    Box::pin(reject_request_inner(stream, pending, code, text))
}

pub(super) async fn reject_request_inner(
    stream: &mut Stream,
    pending: &mut BytesMut,
    code: SqlState,
    text: &str,
) -> std::io::Result<bool> {
    let mut out = BytesMut::new();
    msg::error_response(&mut out, Severity::Error, code, text);
    skip_request(stream, pending, out).await
}

/// Sends `first` (an error, or nothing), skips the client's messages to the
/// end of the request at the front of `pending`, and sends ReadyForQuery.
async fn skip_request(stream: &mut Stream, pending: &mut BytesMut, mut out: BytesMut) -> std::io::Result<bool> {
    if !out.is_empty() {
        stream.write_all(&out).await?;
    }
    let mut scanner = Scanner::new(MAX_MESSAGE_LEN);
    loop {
        let mut end_of_request = None;
        let mut terminated = false;
        let used = match scanner.scan(
            pending,
            |_| false,
            |f| match f.tag {
                tag::QUERY | tag::FUNCTION_CALL | tag::SYNC => {
                    end_of_request = Some(f.end);
                    false
                }
                tag::TERMINATE => {
                    terminated = true;
                    false
                }
                _ => true,
            },
        ) {
            Ok(used) => used,
            Err(e) => {
                fatal(stream, SqlState::PROTOCOL_VIOLATION, &e.to_string()).await?;
                return Ok(false);
            }
        };
        if terminated {
            return Ok(false);
        }
        pending.advance(used);
        if end_of_request.is_some() {
            out.clear();
            msg::ready_for_query(&mut out, msg::IDLE);
            stream.write_all(&out).await?;
            return Ok(true);
        }
        if stream.read_buf(pending).await? == 0 {
            return Ok(false);
        }
    }
}
