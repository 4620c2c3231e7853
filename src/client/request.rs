//! A client's request as buffered: a borrowed view of its messages and of
//! the SQL they run, for routing and for answering without a backend.

use bytes::BytesMut;
use tokio::io::AsyncReadExt;

use crate::net::Stream;
use crate::protocol::frame::{FrameError, MAX_MESSAGE_LEN, Message, Messages};
use crate::protocol::tag;

use super::statements::{ClientStatements, cstr};

/// Messages the server answers without waiting for more: ReadyForQuery
/// follows a Query, FunctionCall or Sync; a Flush makes it send what it has.
pub(super) fn ends_unit(tag: u8) -> bool {
    matches!(tag, tag::QUERY | tag::SYNC | tag::FUNCTION_CALL | tag::FLUSH)
}

#[derive(Clone, Copy)]
pub(super) struct Request<'a> {
    buf: &'a [u8],
}

impl<'a> Request<'a> {
    pub fn new(buf: &'a [u8]) -> Request<'a> {
        Request { buf }
    }

    /// The request's whole messages, up to and including the one that ends it.
    pub fn messages(self) -> impl Iterator<Item = Message<'a>> {
        let mut ended = false;
        Messages::new(self.buf, MAX_MESSAGE_LEN).take_while(move |m| !std::mem::replace(&mut ended, ends_unit(m.tag)))
    }

    /// Whether more than the request is buffered: requests the client
    /// pipelined after it, which its routing decision did not look at.
    pub fn followed(self) -> bool {
        self.messages().last().is_some_and(|m| m.end < self.buf.len())
    }

    /// Whether the request runs nothing: it only closes statements or
    /// portals, or only syncs (or flushes).
    pub fn runs_nothing(self) -> bool {
        self.messages().all(|m| matches!(m.tag, tag::CLOSE | tag::SYNC | tag::FLUSH))
    }

    /// The SQL texts the request runs: each Query's and Parse's, and the
    /// statement's a Bind or Describe names (the client's own statements,
    /// `statements`). Each text is cut at its NUL.
    pub fn sql(self, statements: &'a ClientStatements) -> Vec<&'a [u8]> {
        let cut = |b: &'a [u8]| &b[..memchr::memchr(0, b).unwrap_or(b.len())];
        let mut parts = Vec::new();
        for m in self.messages() {
            let named = match m.tag {
                tag::QUERY => {
                    parts.push(cut(m.body));
                    continue;
                }
                tag::PARSE => {
                    if let Some((_, rest)) = cstr(m.body) {
                        parts.push(cut(rest));
                    }
                    continue;
                }
                // Bind: portal, then statement.
                tag::BIND => cstr(m.body).and_then(|(_, rest)| cstr(rest)).map(|(n, _)| n),
                tag::DESCRIBE => {
                    m.body.split_first().filter(|(k, _)| **k == b'S').and_then(|(_, rest)| cstr(rest)).map(|(n, _)| n)
                }
                _ => continue,
            };
            match named {
                Some(n) if !n.is_empty() => {
                    if let Some(st) = statements.get(n) {
                        parts.push(cut(&st.body));
                    }
                }
                Some(_) => {
                    if let Some(u) = &statements.unnamed {
                        parts.push(cut(u));
                    }
                }
                None => {}
            }
        }
        parts
    }
}

/// How a request unit read for routing ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Unit {
    /// With this message: Query, FunctionCall or Sync (ReadyForQuery will
    /// answer it), or Flush (no ReadyForQuery until the client sends more).
    Ends(u8),
    /// Not whole within [`UNIT_LIMIT`] bytes (or ended by a message the
    /// server will refuse): routed to the primary unread; the rest streams.
    Open,
}

/// How much of one request pgmux buffers to classify it before it gives up
/// and routes it as a write: a client streaming Bind/Execute without Sync
/// costs no more than this.
pub(super) const UNIT_LIMIT: usize = 64 * 1024;

/// Reads until `pending` holds a whole request unit. `None` if the client
/// left or terminated first.
pub(super) async fn read_unit(
    stream: &mut Stream,
    pending: &mut BytesMut,
) -> std::io::Result<Result<Option<Unit>, FrameError>> {
    loop {
        let mut messages = Messages::new(pending, MAX_MESSAGE_LEN);
        for m in messages.by_ref() {
            if m.tag == tag::TERMINATE && m.start == 0 {
                return Ok(Ok(None));
            }
            // Answered by the relay as Postgres would, after what came before.
            if !tag::is_frontend(m.tag) || m.end > UNIT_LIMIT {
                return Ok(Ok(Some(Unit::Open)));
            }
            if ends_unit(m.tag) {
                return Ok(Ok(Some(Unit::Ends(m.tag))));
            }
        }
        // Stopped before a message that is not whole yet, or at a bad header.
        if let Some(e) = messages.error() {
            return Ok(Err(e.clone()));
        }
        match messages.incomplete() {
            Some(h) if h.tag == tag::TERMINATE && messages.consumed() == 0 => return Ok(Ok(None)),
            // Never buffered whole here: the relay streams it or refuses it.
            Some(h) if !tag::is_frontend(h.tag) || messages.consumed() + h.frame_len() > UNIT_LIMIT => {
                return Ok(Ok(Some(Unit::Open)));
            }
            _ => {}
        }
        if pending.len() >= UNIT_LIMIT {
            return Ok(Ok(Some(Unit::Open)));
        }
        pending.reserve(4096);
        if stream.read_buf(pending).await? == 0 {
            return Ok(Ok(None));
        }
    }
}

/// The first read of an idle client's next request: readiness first, so no
/// buffer exists while nothing is there (an idle client owns none).
pub(super) fn poll_first_read(
    stream: &mut Stream,
    cx: &mut std::task::Context<'_>,
    pending: &mut BytesMut,
) -> std::task::Poll<std::io::Result<usize>> {
    std::task::ready!(stream.poll_read_ready(cx))?;
    pending.reserve(FIRST_READ);
    let read = stream.poll_read_buf(cx, pending);
    if read.is_pending() {
        // The readiness was stale: give the buffer back while idle.
        *pending = BytesMut::new();
    }
    read
}

/// A typical request fits; a longer one streams on into the backend's buffer.
pub(super) const FIRST_READ: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    #[test]
    fn a_request_ends_with_its_sync_and_names_its_sql() {
        let mut buf = BytesMut::new();
        crate::protocol::frontend::parse_raw(&mut buf, b"", b"SELECT 1\0\0\0");
        crate::protocol::frontend::bind_unnamed(&mut buf);
        crate::protocol::frontend::execute_unnamed(&mut buf);
        buf.extend_from_slice(b"S\0\0\0\x04");
        crate::protocol::frontend::query(&mut buf, "SELECT 2");
        let mut statements = ClientStatements::default();
        statements.remember_unnamed(b"SELECT 1\0\0\0", true);
        let r = Request::new(&buf);
        let tags: Vec<u8> = r.messages().map(|m| m.tag).collect();
        assert_eq!(tags, b"PBES");
        assert_eq!(r.sql(&statements), [&b"SELECT 1"[..], b"SELECT 1"]);
        // Cut off inside the Query: the request still ends at the Sync.
        assert_eq!(Request::new(&buf[..buf.len() - 3]).messages().count(), 4);
    }
}
