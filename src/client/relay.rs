//! Relaying one client's traffic over a checked-out backend, and the
//! transaction-boundary bookkeeping that decides when the backend can go back.
//!
//! Bytes are read straight into the backend's buffers and written out of the
//! same buffers: a frame is never copied or decoded on the way through. The
//! scanners look at headers only, capturing the few bodies that matter
//! (ReadyForQuery's status byte, ParameterStatus, ErrorResponse).

use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::pool::Backend;
use crate::protocol::backend::{self as msg};
use crate::protocol::frame::{FrameError, MAX_MESSAGE_LEN, Scanner};
use crate::protocol::{frontend, tag};

/// Stop reading a side while this many bytes wait to be written to the other:
/// backpressure instead of unbounded buffering.
const HIGH_WATER: usize = 256 * 1024;

/// How long pgmux spends cleaning a backend a client abandoned before it
/// gives up and closes it instead.
const RECOVER_TIMEOUT: Duration = Duration::from_secs(5);

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
    client_scan: Scanner,
    server_scan: Scanner,
    /// Bytes at the front of `to_server` that are whole, scanned frames ready to write.
    client_ready: usize,
    /// Bytes at the front of `from_server` that are scanned and ready to write.
    server_ready: usize,
    /// The client sent Terminate; it has been cut out of the stream.
    pub terminated: bool,
    /// The server sent something pgmux cannot pool (CopyBoth, or a stray ReadyForQuery).
    pub unpoolable: bool,
    /// Session parameter changes reported by the server since the last call to `take_param_changes`.
    param_changes: Vec<(String, String)>,
}

impl Link {
    pub fn new() -> Link {
        Link {
            pending_ready: 0,
            unsynced: false,
            copy_in: false,
            status: msg::IDLE,
            client_scan: Scanner::new(MAX_MESSAGE_LEN),
            server_scan: Scanner::new(MAX_MESSAGE_LEN),
            client_ready: 0,
            server_ready: 0,
            terminated: false,
            unpoolable: false,
            param_changes: Vec::new(),
        }
    }

    /// The backend can serve someone else: every request answered, idle
    /// outside a transaction, and no partial message in flight either way.
    pub fn at_transaction_boundary(&self, from_server: &BytesMut) -> bool {
        self.pending_ready == 0
            && !self.unsynced
            && !self.copy_in
            && !self.unpoolable
            && self.status == msg::IDLE
            && self.client_scan.at_boundary()
            && self.server_scan.at_boundary()
            && self.client_ready == 0
            && self.server_ready == 0
            && from_server.is_empty()
    }

    pub fn take_param_changes(&mut self) -> Vec<(String, String)> {
        std::mem::take(&mut self.param_changes)
    }

    /// Scans newly read client bytes in `to_server[client_ready..]`.
    pub fn scan_client(&mut self, to_server: &mut BytesMut) -> Result<(), FrameError> {
        let Link { client_scan, pending_ready, unsynced, copy_in, terminated, .. } = self;
        let mut cut_at = None;
        let used = client_scan.scan(
            &to_server[self.client_ready..],
            |_| false,
            |f| {
                match f.tag {
                    tag::QUERY | tag::FUNCTION_CALL => *pending_ready += 1,
                    // During COPY FROM STDIN the server ignores Sync: no ReadyForQuery for it.
                    tag::SYNC if !*copy_in => {
                        *pending_ready += 1;
                        *unsynced = false;
                    }
                    tag::PARSE | tag::BIND | tag::DESCRIBE | tag::EXECUTE | tag::CLOSE => *unsynced = true,
                    tag::COPY_DONE | tag::COPY_FAIL => *copy_in = false,
                    tag::TERMINATE => {
                        *terminated = true;
                        cut_at = f.start;
                        return false;
                    }
                    _ => {}
                }
                true
            },
        )?;
        match cut_at {
            Some(start) => {
                // Terminate is for pgmux, not for the pooled server: drop it and anything after.
                to_server.truncate(self.client_ready + start);
                self.client_ready = to_server.len();
            }
            None => self.client_ready += used,
        }
        Ok(())
    }

    /// Scans newly read server bytes in `from_server[server_ready..]`.
    pub fn scan_server(&mut self, from_server: &BytesMut) -> Result<(), FrameError> {
        let Link { server_scan, pending_ready, copy_in, status, unpoolable, param_changes, .. } = self;
        let used = server_scan.scan(
            &from_server[self.server_ready..],
            |t| t == tag::READY_FOR_QUERY || t == tag::PARAMETER_STATUS,
            |f| {
                match f.tag {
                    tag::READY_FOR_QUERY => {
                        if *pending_ready == 0 {
                            // A ReadyForQuery nobody asked for: our count is off, never pool this backend.
                            *unpoolable = true;
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
        self.server_ready += used;
        Ok(())
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
}

pub struct RelayOptions {
    /// Release the backend at transaction boundaries (transaction pooling).
    pub release_at_boundary: bool,
    pub idle_transaction_timeout: Duration,
}

/// Relays until the transaction ends (or anything else stops it). `link`
/// must already account for the bytes waiting in `backend.to_server`.
pub async fn relay(
    client: &mut TcpStream,
    backend: &mut Backend,
    link: &mut Link,
    opts: &RelayOptions,
    force_close: &mut tokio::sync::watch::Receiver<bool>,
) -> Outcome {
    let Backend { stream: server, to_server, from_server, .. } = backend;
    let mut idle_since = Instant::now();
    loop {
        if link.terminated && link.client_ready == 0 {
            return Outcome::Terminated;
        }
        if opts.release_at_boundary && link.at_transaction_boundary(from_server) {
            return Outcome::Boundary;
        }
        let idle_in_txn = link.pending_ready == 0
            && link.status != msg::IDLE
            && link.client_ready == 0
            && link.server_ready == 0
            && !opts.idle_transaction_timeout.is_zero();
        // Readiness, then non-blocking I/O on the same buffers: a read and a
        // write of one buffer never need to be borrowed at once, and after a
        // read the forward is tried at once, saving a wakeup per message.
        tokio::select! {
            biased;
            r = server.writable(), if link.client_ready > 0 => {
                if let Err(e) = r.and_then(|_| flush(server, to_server, &mut link.client_ready)) {
                    return Outcome::ServerGone(format!("write to server failed: {e}"));
                }
            }
            r = client.writable(), if link.server_ready > 0 => {
                if r.and_then(|_| flush(client, from_server, &mut link.server_ready)).is_err() {
                    return Outcome::ClientGone;
                }
            }
            r = server.readable(), if from_server.len() < HIGH_WATER => {
                match r.and_then(|_| server.try_read_buf(from_server)) {
                    Ok(0) => return Outcome::ServerGone("server closed the connection".into()),
                    Ok(_) => {
                        if let Err(e) = link.scan_server(from_server) {
                            return Outcome::ServerGone(format!("server sent a malformed message: {e}"));
                        }
                        if flush(client, from_server, &mut link.server_ready).is_err() {
                            return Outcome::ClientGone;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Outcome::ServerGone(format!("read from server failed: {e}")),
                }
            }
            r = client.readable(), if !link.terminated && to_server.len() < HIGH_WATER => {
                match r.and_then(|_| client.try_read_buf(to_server)) {
                    Ok(0) => return Outcome::ClientGone,
                    Ok(_) => {
                        idle_since = Instant::now();
                        if let Err(e) = link.scan_client(to_server) {
                            return Outcome::ClientProtocol(e);
                        }
                        if let Err(e) = flush(server, to_server, &mut link.client_ready) {
                            return Outcome::ServerGone(format!("write to server failed: {e}"));
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => return Outcome::ClientGone,
                }
            }
            _ = tokio::time::sleep_until(idle_since + opts.idle_transaction_timeout), if idle_in_txn => {
                return Outcome::IdleInTransaction;
            }
            _ = force_close.changed() => return Outcome::Shutdown,
        }
    }
}

/// Writes as much of the first `*ready` bytes of `buf` as the socket takes now.
fn flush(stream: &TcpStream, buf: &mut BytesMut, ready: &mut usize) -> std::io::Result<()> {
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
    Ok(())
}

/// Brings a backend whose client left mid-flight back to idle: flush the whole
/// messages already accepted, end any COPY, cancel what runs, sync, roll back.
/// Returns `false` when the backend must be closed instead.
pub async fn recover(backend: &mut Backend, link: &mut Link) -> bool {
    if !link.client_scan.at_boundary() || link.unpoolable {
        // The server holds part of a message: nothing can resynchronise it.
        return false;
    }
    match tokio::time::timeout(RECOVER_TIMEOUT, recover_inner(backend, link)).await {
        Ok(Ok(clean)) => clean,
        Ok(Err(e)) => {
            tracing::debug!(pid = backend.pid, error = %e, "server connection failed during cleanup");
            false
        }
        Err(_) => {
            tracing::info!(pid = backend.pid, "cleanup of an abandoned server connection timed out");
            false
        }
    }
}

async fn recover_inner(backend: &mut Backend, link: &mut Link) -> std::io::Result<bool> {
    // Whole frames already scanned go out so the ReadyForQuery count stays exact;
    // a trailing partial header was never sent and is dropped.
    backend.to_server.truncate(link.client_ready);
    let mut extra = BytesMut::new();
    if link.copy_in {
        frontend::copy_fail(&mut extra, "client disconnected");
        link.copy_in = false;
    }
    let was_running = link.pending_ready > 0;
    if link.unsynced {
        frontend::sync(&mut extra);
        link.pending_ready += 1;
        link.unsynced = false;
    }
    backend.to_server.extend_from_slice(&extra);
    backend.stream.write_all(&backend.to_server).await?;
    backend.to_server.clear();
    link.client_ready = 0;
    if was_running {
        cancel_backend(backend.addr, backend.pid, backend.secret).await;
    }
    // Whatever was scanned but not delivered is for nobody now.
    backend.from_server.advance(link.server_ready);
    link.server_ready = 0;
    while link.pending_ready > 0 || !link.server_scan.at_boundary() {
        if backend.stream.read_buf(&mut backend.from_server).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        link.scan_server(&backend.from_server).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
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
