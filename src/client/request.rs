//! A client's request as buffered: a borrowed view of its messages and of
//! the SQL they run, for routing and for answering without a backend.

use crate::protocol::frame::{MAX_MESSAGE_LEN, Message, Messages};
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
