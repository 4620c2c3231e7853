//! One server connection: opening it, and the few round trips pgmux runs on
//! it itself (parameter sync, rollback, reset). The relay borrows its socket
//! and buffers while a client holds it.

use std::time::Instant;

use bytes::BytesMut;
use tokio::io::AsyncReadExt;

use super::PoolError;
use super::inner::Aged;
use super::statements::PreparedSet;
use crate::auth;
use crate::net::{ServerAddr, Stream};
use crate::protocol::backend::{self as msg, ErrorFields};
use crate::protocol::frame::split_frame;
use crate::protocol::{frontend, tag};

/// Largest message pgmux reads whole from a server on its own round trips
/// (results of SET / ROLLBACK / DISCARD ALL are tiny; this only bounds memory).
const MAX_CONTROL_MESSAGE: u32 = 1 << 20;

/// Read buffers start small so that idle backends stay cheap; they grow with traffic.
const INITIAL_BUFFER: usize = 8 * 1024;

/// A server connection. Owned by the pool while idle, by one client task while checked out.
#[derive(Debug)]
pub struct Backend {
    /// Plain or TLS, as `server_tls` and the server decided; or a Unix socket.
    pub stream: Stream,
    /// The server's address, where cancel requests for this backend go.
    pub addr: ServerAddr,
    /// `addr`'s [`ServerAddr::id`], what a client's link records.
    pub addr_id: u16,
    pub pid: i32,
    pub secret: i32,
    created: Instant,
    pub last_used: Instant,
    /// Session parameter values as the server last reported them, or as pgmux last set them.
    pub params: Vec<(String, String)>,
    /// Bytes read from the server not yet relayed (always empty between checkouts).
    pub from_server: BytesMut,
    /// Client bytes not yet written to the server (always empty between checkouts).
    pub to_server: BytesMut,
    /// The prepared statements this server session holds.
    pub prepared: PreparedSet,
    /// The pool's target generation when this backend was opened (see
    /// [`super::inner::Inner::generation`]); set by the pool.
    pub generation: u64,
    /// How many of `params` came with the login; later ones were set by pgmux
    /// on a client's behalf and are reset for clients that never set them.
    login_params: usize,
    /// The client profile this session's settings were last brought in line
    /// with; `None` once anything changed them since. Lets a transaction skip
    /// the settings check when the backend last served equal settings.
    synced: Option<Profile>,
    /// The relay's expected-response queue, empty, kept between checkouts so
    /// a transaction does not allocate one (here rather than with the
    /// client: an idle client holds no buffers).
    pub spare_queue: super::expect::SpareQueue,
    /// Its places under the pool's connection caps, given back when it goes.
    pub(super) permits: Vec<super::caps::Permit>,
}

impl Aged for Backend {
    fn created(&self) -> Instant {
        self.created
    }
    fn last_used(&self) -> Instant {
        self.last_used
    }
    fn generation(&self) -> u64 {
        self.generation
    }
}

/// One set of session parameter values. Identical sets are interned (one
/// shared allocation, see `client::params`), so idle clients with the usual
/// settings cost no memory of their own, and "is this backend already set
/// up for this client?" is a pointer comparison rather than a
/// string-by-string check on every transaction.
pub type Profile = std::sync::Arc<[Setting]>;

/// A parameter name and its value.
pub type Setting = (Box<str>, Box<str>);

pub struct LoginParams<'a> {
    pub addr: &'a str,
    pub user: &'a str,
    pub dbname: &'a str,
    pub credential: Option<&'a crate::auth::Credential>,
    pub connect_timeout: std::time::Duration,
    pub keepalive: Option<crate::config::TcpKeepalive>,
    /// Startup parameters beyond user and database (e.g. the monitors' application_name).
    pub params: &'a [(&'a str, &'a str)],
    pub tls: &'a crate::tls::BackendTls,
}

impl Backend {
    pub async fn connect(login: &LoginParams<'_>) -> Result<Backend, PoolError> {
        let connect = async {
            let (stream, addr) = crate::net::connect(login.addr).await.map_err(PoolError::Connect)?;
            let mut stream = match stream {
                Stream::Plain(tcp) => {
                    if let Some(k) = login.keepalive {
                        let keepalive = socket2::TcpKeepalive::new()
                            .with_time(k.idle)
                            .with_interval(k.interval)
                            .with_retries(k.count);
                        socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive).map_err(PoolError::Connect)?;
                    }
                    crate::tls::connect(tcp, login.tls, login.addr).await.map_err(PoolError::Connect)?
                }
                // As libpq: no TLS (nor keepalives) on a Unix-domain socket.
                other => other,
            };
            let hello = auth::login_backend(&mut stream, login.user, login.dbname, login.credential, login.params)
                .await
                .map_err(PoolError::Login)?;
            let stream = stream.adopt_uring().map_err(PoolError::Connect)?;
            let now = Instant::now();
            Ok(Backend {
                stream,
                addr_id: addr.id(),
                addr,
                pid: hello.pid,
                secret: hello.secret,
                created: now,
                last_used: now,
                from_server: BytesMut::with_capacity(INITIAL_BUFFER),
                to_server: BytesMut::with_capacity(INITIAL_BUFFER),
                prepared: PreparedSet::default(),
                generation: 0,
                login_params: hello.params.len(),
                synced: None,
                spare_queue: Default::default(),
                permits: Vec::new(),
                params: hello.params,
            })
        };
        tokio::time::timeout(login.connect_timeout, connect).await.map_err(|_| PoolError::ConnectTimeout)?
    }

    /// True if the server has not closed or written to this idle connection.
    /// An idle server sends nothing unless it is going away (e.g. the FATAL
    /// sent by `pg_terminate_backend`), so any readable byte means "discard"
    /// (with TLS: any byte on the socket, or decrypted data already buffered).
    pub fn is_alive(&self) -> bool {
        self.stream.is_quiet()
    }

    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Settings changed on this session beyond what the server reported at login.
    /// The profile this backend's settings match, if known.
    pub fn synced_profile(&self) -> Option<&Profile> {
        self.synced.as_ref()
    }

    /// The backend's settings now match `profile` exactly (after a sync or a
    /// check that found nothing to change).
    pub fn mark_synced(&mut self, profile: &Profile) {
        self.synced = Some(profile.clone());
    }

    pub fn changed_settings(&self) -> impl Iterator<Item = &str> {
        self.params[self.login_params..].iter().map(|(k, _)| k.as_str())
    }

    /// The server reset these settings to their defaults: forget them.
    pub fn forget_changed(&mut self, names: &[&str]) {
        self.synced = None;
        let keep = self.login_params;
        let mut i = keep;
        while i < self.params.len() {
            if names.iter().any(|n| n.eq_ignore_ascii_case(&self.params[i].0)) {
                self.params.remove(i);
            } else {
                i += 1;
            }
        }
    }

    /// After DISCARD ALL: every setting pgmux changed is back to its default.
    pub fn forget_all_changed(&mut self) {
        self.synced = None;
        self.params.truncate(self.login_params);
    }

    /// The next whole server message on a round trip pgmux runs itself.
    async fn next_control_frame(&mut self) -> std::io::Result<(u8, BytesMut)> {
        loop {
            let frame = split_frame(&mut self.from_server, MAX_CONTROL_MESSAGE)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            if let Some(frame) = frame {
                return Ok(frame);
            }
            if self.stream.read_buf(&mut self.from_server).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Runs a query returning one row of text values (control round trips only).
    pub async fn query_row(&mut self, sql: &str) -> std::io::Result<(Vec<Option<String>>, Option<ErrorFields>)> {
        let mut out = BytesMut::new();
        frontend::query(&mut out, sql);
        self.stream.write_all(&out).await?;
        let mut row = Vec::new();
        let mut first_error = None;
        loop {
            let (t, body) = self.next_control_frame().await?;
            match t {
                tag::DATA_ROW => row = msg::parse_data_row(&body),
                tag::ERROR_RESPONSE if first_error.is_none() => first_error = Some(msg::parse_error_fields(&body)),
                tag::READY_FOR_QUERY => return Ok((row, first_error)),
                _ => {}
            }
        }
    }

    /// Runs `sql` with text parameters `$1..` (the extended protocol, so no
    /// value is ever spliced into the SQL). Returns the first row, if any,
    /// and the first error.
    pub async fn query_row_params(
        &mut self,
        sql: &str,
        params: &[&str],
    ) -> std::io::Result<(Option<Vec<Option<String>>>, Option<ErrorFields>)> {
        let mut out = BytesMut::new();
        frontend::parse_unnamed(&mut out, sql);
        frontend::bind_text_params(&mut out, params);
        frontend::execute_unnamed(&mut out);
        frontend::sync(&mut out);
        self.stream.write_all(&out).await?;
        let mut row = None;
        let mut first_error = None;
        loop {
            let (t, body) = self.next_control_frame().await?;
            match t {
                tag::DATA_ROW if row.is_none() => row = Some(msg::parse_data_row(&body)),
                tag::ERROR_RESPONSE if first_error.is_none() => first_error = Some(msg::parse_error_fields(&body)),
                tag::READY_FOR_QUERY => return Ok((row, first_error)),
                _ => {}
            }
        }
    }

    pub fn set_param(&mut self, name: &str, value: &str) {
        self.synced = None;
        match self.params.iter_mut().find(|(k, _)| k.eq_ignore_ascii_case(name)) {
            Some((_, v)) => value.clone_into(v),
            None => self.params.push((name.to_owned(), value.to_owned())),
        }
    }

    /// Runs `sql` with the simple protocol, swallowing the response up to
    /// ReadyForQuery. Returns the first error the server reported (if any) and
    /// the final transaction status. ParameterStatus updates are recorded.
    pub async fn run_quietly(&mut self, sql: &str) -> std::io::Result<(Option<ErrorFields>, u8)> {
        let mut out = BytesMut::new();
        frontend::query(&mut out, sql);
        self.stream.write_all(&out).await?;
        self.read_until_ready(1).await
    }

    /// Closes these server-side statements (Close each, then Sync).
    pub async fn close_statements(&mut self, names: &[Box<str>]) -> std::io::Result<()> {
        let mut out = BytesMut::new();
        for name in names {
            crate::protocol::frontend::close_statement(&mut out, name.as_bytes());
        }
        frontend::sync(&mut out);
        self.stream.write_all(&out).await?;
        match self.read_until_ready(1).await? {
            (None, msg::IDLE) => Ok(()),
            _ => Err(std::io::Error::other("closing unused statements failed")),
        }
    }

    /// Reads and discards server messages until `pending` ReadyForQuery
    /// messages have arrived. Returns the first error and the last status.
    pub async fn read_until_ready(&mut self, mut pending: usize) -> std::io::Result<(Option<ErrorFields>, u8)> {
        let mut first_error = None;
        let mut status = msg::IDLE;
        while pending > 0 {
            let (t, body) = self.next_control_frame().await?;
            match t {
                tag::READY_FOR_QUERY => {
                    pending -= 1;
                    status = body.first().copied().unwrap_or(msg::IDLE);
                }
                tag::ERROR_RESPONSE if first_error.is_none() => first_error = Some(msg::parse_error_fields(&body)),
                tag::PARAMETER_STATUS => {
                    if let Some((k, v)) = msg::parse_parameter_status(&body) {
                        let (k, v) = (k.to_owned(), v.to_owned());
                        self.set_param(&k, &v);
                    }
                }
                _ => {}
            }
        }
        // Control round trips leave nothing behind; drop a grown buffer's excess.
        if self.from_server.is_empty() && self.from_server.capacity() > 4 * INITIAL_BUFFER {
            self.from_server = BytesMut::with_capacity(INITIAL_BUFFER);
        }
        Ok((first_error, status))
    }

    /// Best-effort Terminate, then close. Never blocks: 5 bytes always fit in
    /// an idle socket's buffer, and a dead socket has nothing to lose.
    pub fn close(self) {
        let mut out = BytesMut::new();
        frontend::terminate(&mut out);
        self.stream.close_quietly(&out);
    }
}
