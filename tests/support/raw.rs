//! A raw protocol client for tests that must send exact bytes: pipelines,
//! malformed messages, abrupt disconnects.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use pgmux::protocol::backend::{ErrorFields, parse_error_fields};
use pgmux::protocol::frame::split_frame;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct Raw {
    pub stream: TcpStream,
    buf: BytesMut,
}

/// One message from the server: tag and body.
#[derive(Debug)]
pub struct Msg {
    pub tag: u8,
    pub body: BytesMut,
}

impl Msg {
    pub fn error(&self) -> ErrorFields {
        assert_eq!(self.tag, b'E', "expected an ErrorResponse, got '{}'", self.tag as char);
        parse_error_fields(&self.body)
    }
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).await.expect("connect");
        Raw { stream, buf: BytesMut::new() }
    }

    /// Connects and logs in as a trust-authenticated user, up to the first ReadyForQuery.
    pub async fn login(addr: SocketAddr, user: &str, db: &str) -> Raw {
        let mut raw = Raw::connect(addr).await;
        let mut out = BytesMut::new();
        frontend::startup_message([("user", user), ("database", db)], &mut out).expect("startup message");
        raw.send(&out).await;
        let msgs = raw.until_ready().await;
        assert!(msgs.iter().all(|m| m.tag != b'E'), "login failed: {msgs:?}");
        raw
    }

    /// [`Raw::login`] that may fail (a server restarting): `None` when the
    /// login ends in an error or a close.
    pub async fn try_login(addr: SocketAddr, user: &str, db: &str) -> Option<Raw> {
        let mut raw = Raw::connect(addr).await;
        let mut out = BytesMut::new();
        frontend::startup_message([("user", user), ("database", db)], &mut out).expect("startup message");
        raw.send(&out).await;
        raw.until_closed_or_ready().await.then_some(raw)
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write to pgmux");
    }

    /// Reads one message; `None` on EOF.
    pub async fn recv(&mut self) -> Option<Msg> {
        loop {
            if let Some((tag, body)) = split_frame(&mut self.buf, 1 << 30).expect("well-formed server message") {
                return Some(Msg { tag, body });
            }
            let n = tokio::time::timeout(Duration::from_secs(30), self.stream.read_buf(&mut self.buf))
                .await
                .expect("server answered within 30s")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
        }
    }

    /// Reads messages up to and including the next ReadyForQuery.
    pub async fn until_ready(&mut self) -> Vec<Msg> {
        let mut out = Vec::new();
        loop {
            let m = self.recv().await.expect("connection closed before ReadyForQuery");
            let done = m.tag == b'Z';
            out.push(m);
            if done {
                return out;
            }
        }
    }

    /// Reads until EOF, returning what came.
    pub async fn until_closed(&mut self) -> Vec<Msg> {
        let mut out = Vec::new();
        while let Some(m) = self.recv().await {
            out.push(m);
        }
        out
    }

    /// Reads up to ReadyForQuery (`true`, unless an error came first) or EOF (`false`).
    pub async fn until_closed_or_ready(&mut self) -> bool {
        self.until_ready_or_closed().await.is_some_and(|msgs| msgs.iter().all(|m| m.tag != b'E'))
    }

    /// Reads messages up to the next ReadyForQuery; `None` if the connection closed first.
    pub async fn until_ready_or_closed(&mut self) -> Option<Vec<Msg>> {
        let mut out = Vec::new();
        loop {
            let m = self.recv().await?;
            let done = m.tag == b'Z';
            out.push(m);
            if done {
                return Some(out);
            }
        }
    }

    pub async fn simple_query(&mut self, sql: &str) -> Vec<Msg> {
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out).expect("query message");
        self.send(&out).await;
        self.until_ready().await
    }
}

/// Parse (unnamed) + Bind + Execute + Sync for `sql` without parameters.
pub fn extended_query(out: &mut BytesMut, sql: &str) {
    frontend::parse("", sql, std::iter::empty(), out).expect("parse");
    // Bind: unnamed portal and statement, no parameter formats, no parameters, no result formats.
    out.put_u8(b'B');
    out.put_u32(4 + 1 + 1 + 2 + 2 + 2);
    out.put_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
    frontend::execute("", 0, out).expect("execute");
    frontend::sync(out);
}

/// A message with an arbitrary tag and declared length, for malformed-input tests.
pub fn bogus_header(tag: u8, declared_len: u32) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_u8(tag);
    b.put_u32(declared_len);
    b
}

/// Tags of messages, as a string, for compact assertions.
pub fn tags(msgs: &[Msg]) -> String {
    msgs.iter().map(|m| m.tag as char).collect()
}
