//! A connection that is plain TCP, TLS over TCP or a Unix-domain socket,
//! with the poll-based reads and non-blocking writes the relay uses on
//! `TcpStream`; and where server connections go ([`connect`], [`ServerAddr`]).
//!
//! TLS uses rustls' sans-I/O connection directly over the socket, so the
//! relay keeps its shape: [`Stream::poll_read_buf`] and `try_write` on the
//! same buffers. The differences that matter:
//! - "socket readable" is not "plaintext available": a read may consume a
//!   partial record and find nothing yet; and decrypted plaintext may be
//!   buffered while the socket is not readable, so
//!   [`Stream::poll_read_ready`] is ready at once then.
//! - `try_write` accepts plaintext once earlier TLS output is flushed; what
//!   the socket did not take stays in the TLS connection
//!   ([`Stream::wants_write`]) and goes out with the next write or
//!   [`Stream::try_flush`].
//!
//! The plain path is one enum match away from `TcpStream`. Unix-domain
//! sockets never carry TLS, as in Postgres: nothing crosses the machine.

use std::future::Future;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

pub mod idle_poll;
pub mod uring;

/// Room made in a read buffer before each read: a smaller read would cost a
/// syscall per few bytes.
const MIN_READ_SPACE: usize = 1024;
/// What a read buffer grows by when it lacks that room.
const READ_CHUNK: usize = 8 * 1024;

/// A client or server connection.
#[derive(Debug)]
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream>),
    Unix(UnixStream),
    /// A plain TCP or Unix socket on this thread's io_uring ([`Stream::adopt_uring`]).
    Uring(uring::Socket),
}

/// rustls over a non-blocking socket.
pub struct TlsStream {
    io: TcpStream,
    conn: rustls::Connection,
    /// Decrypted bytes waiting in `conn`'s reader.
    plain: usize,
    /// The peer closed (TCP EOF or close_notify); report EOF once `plain` is drained.
    eof: bool,
    /// close_notify queued by shutdown.
    closing: bool,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream").field("io", &self.io).field("plain", &self.plain).finish_non_exhaustive()
    }
}

/// `std::io` over a tokio socket's non-blocking calls (which clear readiness
/// on `WouldBlock`, so the next readiness poll really waits).
struct SyncIo<'a>(&'a TcpStream);

impl Read for SyncIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl Write for SyncIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

impl TlsStream {
    /// Runs the handshake to completion on `io`.
    pub async fn handshake(io: TcpStream, conn: impl Into<rustls::Connection>) -> io::Result<TlsStream> {
        let mut s = TlsStream { io, conn: conn.into(), plain: 0, eof: false, closing: false };
        while s.conn.is_handshaking() {
            while s.conn.wants_write() {
                match s.write_pending() {
                    Ok(()) => {}
                    Err(e) if would_block(&e) => s.io.writable().await?,
                    Err(e) => return Err(e),
                }
            }
            if !s.conn.is_handshaking() {
                break;
            }
            match s.conn.read_tls(&mut SyncIo(&s.io)) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "peer closed during TLS handshake")),
                Ok(_) => s.process()?,
                Err(e) if would_block(&e) => s.io.readable().await?,
                Err(e) => return Err(e),
            }
        }
        // The last flight (and TLS 1.3 session tickets) still to send.
        s.flush_all().await?;
        Ok(s)
    }

    /// Decrypts what `read_tls` took in; on a TLS error the alert goes out best-effort.
    fn process(&mut self) -> io::Result<()> {
        match self.conn.process_new_packets() {
            Ok(state) => {
                self.plain = state.plaintext_bytes_to_read();
                if state.peer_has_closed() {
                    self.eof = true;
                }
                if self.conn.wants_write() {
                    match self.write_pending() {
                        Err(e) if !would_block(&e) => return Err(e),
                        _ => {}
                    }
                }
                Ok(())
            }
            Err(e) => {
                let _ = self.write_pending();
                Err(io::Error::new(io::ErrorKind::InvalidData, e))
            }
        }
    }

    /// Reads records until plaintext is available or the peer closed;
    /// `WouldBlock` when the socket has no more for now.
    fn fill(&mut self) -> io::Result<()> {
        while self.plain == 0 && !self.eof {
            match self.conn.read_tls(&mut SyncIo(&self.io))? {
                0 => {
                    self.eof = true;
                    self.process()?;
                }
                _ => self.process()?,
            }
        }
        Ok(())
    }

    /// Writes queued TLS output; `WouldBlock` if the socket is full.
    fn write_pending(&mut self) -> io::Result<()> {
        while self.conn.wants_write() {
            if self.conn.write_tls(&mut SyncIo(&self.io))? == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
        }
        Ok(())
    }

    async fn flush_all(&mut self) -> io::Result<()> {
        loop {
            match self.write_pending() {
                Ok(()) => return Ok(()),
                Err(e) if would_block(&e) => self.io.writable().await?,
                Err(e) => return Err(e),
            }
        }
    }

    fn read_plain(&mut self, dst: &mut [u8]) -> io::Result<usize> {
        let n = self.conn.reader().read(dst)?;
        self.plain -= n.min(self.plain);
        Ok(n)
    }

    fn try_write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.write_pending()?;
        let n = self.conn.writer().write(data)?;
        if n == 0 && !data.is_empty() {
            return Err(io::ErrorKind::WriteZero.into());
        }
        match self.write_pending() {
            Err(e) if !would_block(&e) => Err(e),
            _ => Ok(n),
        }
    }
}

impl Stream {
    /// Like `TcpStream::try_write`. For TLS, accepted bytes may still sit in
    /// the TLS connection: see [`Stream::wants_write`].
    #[inline]
    pub fn try_write(&mut self, data: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.try_write(data),
            Stream::Tls(t) => t.try_write(data),
            Stream::Unix(s) => s.try_write(data),
            Stream::Uring(s) => s.try_write(data),
        }
    }

    /// Moves a plain TCP or Unix socket onto this thread's io_uring, when
    /// it runs one (`[proxy] io = "uring"`); anything else stays as it is.
    /// Called once a connection is past its login: only pooled traffic
    /// takes the new path.
    pub fn adopt_uring(self) -> io::Result<Stream> {
        if !uring::running() {
            return Ok(self);
        }
        let (fd, unix): (std::os::fd::OwnedFd, bool) = match self {
            Stream::Plain(s) => (s.into_std()?.into(), false),
            Stream::Unix(s) => (s.into_std()?.into(), true),
            other => return Ok(other),
        };
        Ok(match uring::Socket::adopt(fd, unix) {
            Ok(s) => Stream::Uring(s),
            Err(fd) if unix => Stream::Unix(UnixStream::from_std(fd.into())?),
            Err(fd) => Stream::Plain(TcpStream::from_std(fd.into())?),
        })
    }

    /// Encrypted output accepted but not yet taken by the socket.
    #[inline]
    pub fn wants_write(&self) -> bool {
        match self {
            Stream::Plain(_) | Stream::Unix(_) | Stream::Uring(_) => false,
            Stream::Tls(t) => t.conn.wants_write(),
        }
    }

    /// Pushes pending TLS output to the socket as far as it takes it now.
    #[inline]
    pub fn try_flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(_) | Stream::Unix(_) | Stream::Uring(_) => Ok(()),
            Stream::Tls(t) => match t.write_pending() {
                Err(e) if !would_block(&e) => Err(e),
                _ => Ok(()),
            },
        }
    }

    /// Reads what is there into `buf` (at least `MIN_READ_SPACE` of room is
    /// made first); `Ok(0)` at EOF. Plain sockets go through tokio's
    /// `poll_read`, which treats a read shorter than the room offered as
    /// "drained" and clears the readiness: the next poll waits for epoll
    /// instead of spending a `recv` on `EAGAIN` (`try_read` keeps the stale
    /// readiness). That is one syscall saved per side per transaction.
    pub fn poll_read_buf(&mut self, cx: &mut Context<'_>, buf: &mut BytesMut) -> Poll<io::Result<usize>> {
        if let Stream::Uring(s) = self {
            return s.poll_read_buf(cx, buf);
        }
        if buf.capacity() - buf.len() < MIN_READ_SPACE {
            buf.reserve(READ_CHUNK);
        }
        let before = buf.len();
        ready!(std::pin::pin!(tokio::io::AsyncReadExt::read_buf(self, buf)).poll(cx))?;
        Poll::Ready(Ok(buf.len() - before))
    }

    /// Readiness for a read without reading (for TLS: plaintext is buffered,
    /// or the socket is readable).
    #[inline]
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Plain(s) => s.poll_read_ready(cx),
            Stream::Tls(t) if t.plain > 0 || t.eof => Poll::Ready(Ok(())),
            Stream::Tls(t) => t.io.poll_read_ready(cx),
            Stream::Unix(s) => s.poll_read_ready(cx),
            Stream::Uring(s) => s.poll_read_ready(cx),
        }
    }

    /// Readiness for a write (registers `cx` when not ready).
    #[inline]
    pub fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Plain(s) => s.poll_write_ready(cx),
            Stream::Tls(t) => t.io.poll_write_ready(cx),
            Stream::Unix(s) => s.poll_write_ready(cx),
            Stream::Uring(s) => s.poll_write_ready(cx),
        }
    }

    /// Writes all of `data` and, for TLS, every encrypted byte it produced.
    pub async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.write_all(data).await,
            Stream::Unix(s) => s.write_all(data).await,
            // Written behind: done when the kernel has it all, as for a socket.
            Stream::Tls(_) | Stream::Uring(_) => {
                AsyncWriteExt::write_all(self, data).await?;
                AsyncWriteExt::flush(self).await
            }
        }
    }

    /// For an idle server connection: true while nothing at all arrived.
    /// Any readable byte (even a TLS record) or EOF means "discard".
    pub fn is_quiet(&self) -> bool {
        let mut probe = [0u8; 1];
        let probed = match self {
            Stream::Plain(s) => s.try_read(&mut probe),
            Stream::Tls(t) if t.plain > 0 || t.eof => return false,
            Stream::Tls(t) => t.io.try_read(&mut probe),
            Stream::Unix(s) => s.try_read(&mut probe),
            Stream::Uring(s) => return s.is_quiet(),
        };
        matches!(probed, Err(e) if would_block(&e))
    }

    /// Best-effort last words, without waiting: `data`, then close_notify for TLS.
    pub fn close_quietly(mut self, data: &[u8]) {
        let _ = self.try_write(data);
        if let Stream::Tls(t) = &mut self {
            t.conn.send_close_notify();
            let _ = t.write_pending();
        }
    }

    /// The TCP socket under a plain or TLS stream (`None` for a Unix socket).
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Stream::Plain(s) => Some(s),
            Stream::Tls(t) => Some(&t.io),
            Stream::Unix(_) | Stream::Uring(_) => None,
        }
    }

    pub fn is_unix(&self) -> bool {
        match self {
            Stream::Unix(_) => true,
            Stream::Uring(s) => s.is_unix(),
            _ => false,
        }
    }

    /// `TLSv1_3/TLS13_AES_256_GCM_SHA384`-style protocol and cipher suite; `None` for plain.
    pub fn tls_description(&self) -> Option<String> {
        let Stream::Tls(t) = self else { return None };
        let version = t.conn.protocol_version().map(|v| format!("{v:?}")).unwrap_or_default();
        let suite = t.conn.negotiated_cipher_suite().map(|s| format!("{:?}", s.suite())).unwrap_or_default();
        Some(format!("{version}/{suite}"))
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// The TCP peer's address; `None` for a Unix socket (or a socket already reset).
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        match self {
            Stream::Uring(s) if !s.is_unix() => socket2::SockRef::from(s).peer_addr().ok()?.as_socket(),
            _ => self.tcp()?.peer_addr().ok(),
        }
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Stream::Uring(s) if !s.is_unix() => socket2::SockRef::from(s).local_addr().ok()?.as_socket(),
            _ => self.tcp()?.local_addr().ok(),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Uring(s) => s.poll_read(cx, buf),
            Stream::Tls(t) => loop {
                match t.fill() {
                    Ok(()) if t.plain == 0 => return Poll::Ready(Ok(())),
                    Ok(()) => {
                        let want = t.plain.min(buf.remaining());
                        let n = t.read_plain(buf.initialize_unfilled_to(want))?;
                        buf.advance(n);
                        return Poll::Ready(Ok(()));
                    }
                    Err(e) if would_block(&e) => ready!(t.io.poll_read_ready(cx))?,
                    Err(e) => return Poll::Ready(Err(e)),
                }
            },
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, data),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, data),
            Stream::Uring(s) => loop {
                match s.try_write(data) {
                    Err(e) if would_block(&e) => ready!(s.poll_write_ready(cx))?,
                    r => return Poll::Ready(r),
                }
            },
            Stream::Tls(t) => loop {
                match t.try_write(data) {
                    Err(e) if would_block(&e) => ready!(t.io.poll_write_ready(cx))?,
                    r => return Poll::Ready(r),
                }
            },
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
            Stream::Uring(s) => s.poll_flush(cx),
            Stream::Tls(t) => loop {
                match t.write_pending() {
                    Err(e) if would_block(&e) => ready!(t.io.poll_write_ready(cx))?,
                    r => return Poll::Ready(r),
                }
            },
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Stream::Tls(t) = &mut *self
            && !t.closing
        {
            t.closing = true;
            t.conn.send_close_notify();
        }
        ready!(self.as_mut().poll_flush(cx))?;
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Uring(s) => Poll::Ready(s.shutdown_write()),
            Stream::Tls(t) => Pin::new(&mut t.io).poll_shutdown(cx),
        }
    }
}

/// Addresses many connections share (the listeners' local addresses, the
/// servers'), each kept once in a process-wide table and named by a 2-byte
/// id, so a per-client record carries the id instead of a 32-byte address.
/// Few distinct ones ever exist; past 65,535 an address gets id 0 (none).
pub(crate) struct AddrTable<T>(std::sync::RwLock<Vec<T>>);

impl<T: Clone + PartialEq> AddrTable<T> {
    pub const fn new() -> Self {
        AddrTable(std::sync::RwLock::new(Vec::new()))
    }

    /// `addr`'s id: its index plus one (0 once the table is full).
    pub fn intern(&self, addr: &T) -> u16 {
        let find = |v: &[T]| v.iter().position(|a| a == addr).map(|i| (i + 1) as u16);
        if let Some(id) = find(&self.0.read().unwrap_or_else(|e| e.into_inner())) {
            return id;
        }
        let mut v = self.0.write().unwrap_or_else(|e| e.into_inner());
        match find(&v) {
            Some(id) => id,
            None if v.len() < usize::from(u16::MAX) => {
                v.push(addr.clone());
                v.len() as u16
            }
            None => 0,
        }
    }

    pub fn get(&self, id: u16) -> Option<T> {
        let i = usize::from(id).checked_sub(1)?;
        self.0.read().unwrap_or_else(|e| e.into_inner()).get(i).cloned()
    }
}

/// Every server address a backend was opened to ([`ServerAddr::id`]).
static SERVER_ADDRS: AddrTable<ServerAddr> = AddrTable::new();

/// Where a server connection was opened to. Cancel requests for it go to
/// this very place: the address the name resolved to then, not the name again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerAddr {
    Tcp(SocketAddr),
    /// The socket file itself (`/dir/.s.PGSQL.5432`).
    Unix(Arc<Path>),
}

impl std::fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerAddr::Tcp(a) => a.fmt(f),
            ServerAddr::Unix(p) => p.display().fmt(f),
        }
    }
}

impl ServerAddr {
    /// A 2-byte name for this address ([`AddrTable`]); 0 names none.
    pub fn id(&self) -> u16 {
        SERVER_ADDRS.intern(self)
    }

    pub fn by_id(id: u16) -> Option<ServerAddr> {
        SERVER_ADDRS.get(id)
    }

    /// A new connection to the same place (a cancel request's).
    pub async fn connect(&self) -> io::Result<Stream> {
        match self {
            ServerAddr::Tcp(a) => Ok(Stream::Plain(TcpStream::connect(a).await?)),
            ServerAddr::Unix(p) => connect_unix(p).await,
        }
    }
}

pub use crate::vocab::socket::{MAX_SOCKET_PATH, unix_socket};

/// Opens a connection to a server address as proxy.toml writes it:
/// `host:port` (a name resolved now, each of its addresses tried in turn;
/// TCP_NODELAY set, as request/response traffic must never wait for Nagle),
/// or `/dir:port` for Postgres's Unix-domain socket in `/dir`.
pub async fn connect(addr: &str) -> io::Result<(Stream, ServerAddr)> {
    if let Some(path) = unix_socket(addr) {
        let stream = connect_unix(&path).await?;
        return Ok((stream, ServerAddr::Unix(path.into())));
    }
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let peer = tcp.peer_addr()?;
    Ok((Stream::Plain(tcp), ServerAddr::Tcp(peer)))
}

/// With the path in the error, as libpq's `connection to server on socket "…" failed`.
async fn connect_unix(path: &Path) -> io::Result<Stream> {
    match UnixStream::connect(path).await {
        Ok(s) => Ok(Stream::Unix(s)),
        Err(e) => Err(io::Error::new(e.kind(), format!("socket \"{}\": {e}", path.display()))),
    }
}

/// A boxed future for a path taken rarely (errors, routing extras).
pub type RarePath<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Writes a FATAL ErrorResponse and closes.
///
/// Boxed, like the other rare paths: a client's task is sized for its
/// largest await, and an idle client should not pay for its last words.
pub fn fatal<'a>(
    stream: &'a mut Stream,
    code: crate::protocol::sqlstate::SqlState,
    text: &'a str,
) -> RarePath<'a, io::Result<()>> {
    Box::pin(async move {
        let mut out = BytesMut::new();
        crate::protocol::backend::error_response(&mut out, crate::protocol::backend::Severity::Fatal, code, text);
        stream.write_all(&out).await?;
        stream.shutdown().await
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::BytesMut;
    use tokio::net::TcpSocket;

    use super::{Stream, TlsStream};

    /// A TLS connection over loopback: (pgmux as server, pgmux as client).
    async fn pair() -> (Stream, Stream) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap().self_signed(&key).unwrap();
        let server_config =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(
                    vec![cert.der().clone()],
                    rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
                )
                .unwrap();
        // Small socket buffers: a writer meets a full socket quickly.
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(16 * 1024).unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(8).unwrap();
        let addr = listener.local_addr().unwrap();
        let accept = async {
            let (tcp, _) = listener.accept().await.unwrap();
            crate::tls::accept(tcp, &Arc::new(server_config)).await.unwrap()
        };
        let connect = async {
            let socket = TcpSocket::new_v4().unwrap();
            socket.set_send_buffer_size(16 * 1024).unwrap();
            let tcp = socket.connect(addr).await.unwrap();
            let config = crate::tls::unverified_client_config().unwrap();
            let conn = rustls::ClientConnection::new(config, "localhost".try_into().unwrap()).unwrap();
            Stream::Tls(Box::new(TlsStream::handshake(tcp, conn).await.unwrap()))
        };
        tokio::join!(accept, connect)
    }

    /// The relay's pattern: write readiness then non-blocking writes, poll-based
    /// reads; a full socket leaves TLS output pending, flushed on the next writable.
    #[tokio::test]
    async fn relay_style_io_moves_megabytes_through_a_slow_reader() {
        let (mut server, mut client) = pair().await;
        let data: Vec<u8> = (0..4_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut pending_seen = 0;
        let writer = async {
            let mut pos = 0;
            while pos < data.len() || client.wants_write() {
                std::future::poll_fn(|cx| client.poll_write_ready(cx)).await.unwrap();
                while pos < data.len() {
                    match client.try_write(&data[pos..]) {
                        Ok(n) => {
                            pos += n;
                            pending_seen += usize::from(client.wants_write());
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) => panic!("{e}"),
                    }
                }
                client.try_flush().unwrap();
            }
        };
        let reader = async {
            // Start late so that the writer's socket fills up first.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let mut got = BytesMut::new();
            while got.len() < data.len() {
                let n = std::future::poll_fn(|cx| server.poll_read_buf(cx, &mut got)).await.unwrap();
                assert!(n > 0, "early EOF");
            }
            got
        };
        let ((), got) = tokio::time::timeout(Duration::from_secs(20), async { tokio::join!(writer, reader) })
            .await
            .expect("no deadlock");
        assert!(got[..] == data[..]);
        assert!(pending_seen > 0, "the socket never filled: the pending-output path was not exercised");
    }

    /// Plaintext decrypted by an earlier read sits in the TLS connection
    /// while the socket has nothing more: a read must not wait for the socket.
    #[tokio::test]
    async fn buffered_plaintext_is_readable_without_socket_data() {
        let (mut server, mut client) = pair().await;
        client.write_all(b"Qhello").await.unwrap();
        let mut first = [0u8; 1];
        assert_eq!(tokio::io::AsyncReadExt::read(&mut server, &mut first).await.unwrap(), 1);
        assert_eq!(first[0], b'Q');
        tokio::time::timeout(Duration::from_millis(500), std::future::poll_fn(|cx| server.poll_read_ready(cx)))
            .await
            .expect("ready at once")
            .unwrap();
        let mut buf = BytesMut::new();
        let n = tokio::time::timeout(
            Duration::from_millis(500),
            std::future::poll_fn(|cx| server.poll_read_buf(cx, &mut buf)),
        )
        .await
        .expect("read at once")
        .unwrap();
        assert_eq!(n, 5);
        assert_eq!(&buf[..], b"hello");
        // A clean close: close_notify, then EOF.
        tokio::io::AsyncWriteExt::shutdown(&mut client).await.unwrap();
        let n = std::future::poll_fn(|cx| server.poll_read_buf(cx, &mut buf)).await.unwrap();
        assert_eq!(n, 0);
        assert!(!server.is_quiet(), "a closed peer is not quiet");
    }
}
