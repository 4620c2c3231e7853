//! One task per client connection: startup, authentication, then the loop
//! that takes a backend for each transaction and gives it back.

pub mod params;
pub mod pinning;
pub mod relay;
mod request;
pub mod statements;

#[cfg(test)]
mod fuzz_tests;

use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::{PoolMode, TlsMode};
use crate::live::Shared;
use crate::live::cancel::CancelKey;
use crate::live::registry::{ClientInfo, SHUTTING_DOWN, Signal, TERMINATED_BY_ADMIN};
use crate::live::slots::ClientSlot;
use crate::net::Stream;
use crate::pool::inner::CloseReason;
use crate::pool::{Backend, Pool, Release};
use crate::protocol::backend::{self as msg, Severity};
use crate::protocol::frame::{FrameError, Header, MAX_MESSAGE_LEN, Messages, Scanner};
use crate::protocol::sqlstate::SqlState;
use crate::protocol::startup::{self, StartupError, StartupPacket};
use crate::protocol::tag;
use crate::routing::monitor::{MonitorLogin, NodeState};
use crate::routing::route::{Candidate, Intent, Policy, Route, RouteReason, Sticky, Target};
use crate::settings::Settings;
use crate::sql::WriteFunctions;
use params::SessionParams;
use relay::{Link, Outcome, RelayOptions, StatementScope};
use request::{Request, ends_unit};
use statements::ClientStatements;

/// Time a client gets to finish startup and authentication.
const LOGIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// Serves one accepted connection until it ends. Never panics on client input:
/// every failure becomes an ErrorResponse or a close.
///
/// A plain function returning an `async move` block rather than an `async
/// fn`: an `async fn` keeps each argument twice (as argument and as local)
/// for the life of the task, and this future is most of what an idle client
/// costs. Log lines carry `client = id` instead of a per-client span, which
/// would cost an allocation per client and an enter/exit per poll.
#[allow(clippy::manual_async_fn)] // deliberate: see above
pub fn serve(tcp: TcpStream, slot: ClientSlot, client_id: u64) -> impl Future<Output = ()> + Send + 'static {
    async move {
        let shared = slot.shared();
        // Listed in the live registry (SHOW CLIENTS, KILL_CLIENT, drain) while the connection lives.
        let info = shared.clients.register(&shared.stats, client_id, tcp.peer_addr().ok(), tcp.local_addr().ok());
        // Boxed: startup, TLS and authentication state is large and short-lived;
        // it is freed before the session starts instead of sizing the task.
        let (mut stream, pending, session, config) = match Box::pin(establish(tcp, shared, &info)).await {
            Ok(Some(established)) => established,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(client = client_id, error = %e, "client connection ended with an I/O error");
                return;
            }
        };
        let key = shared.cancels.issue(&info);
        let mut result = Box::pin(greet(&mut stream, &session, &key)).await;
        if result.is_ok() {
            result = run_session(&mut stream, pending, shared, &config, session, &info).await;
        }
        if let Err(e) = result {
            tracing::debug!(client = client_id, error = %e, "client connection ended with an I/O error");
        }
        tracing::info!(client = client_id, "client disconnected");
    }
}

/// A session's view of its database's replicas.
struct SessionRouting {
    replicas: Vec<ReplicaTarget>,
    primary_node: Arc<NodeState>,
    sticky: Arc<std::sync::Mutex<Sticky>>,
    policy: Policy,
    write_functions: WriteFunctions,
}

struct ReplicaTarget {
    pool: Arc<Pool>,
    node: Arc<NodeState>,
    weight: u32,
}

impl SessionRouting {
    fn new(
        shared: &Shared,
        config: &Settings,
        db: &crate::config::DatabaseConfig,
        user: &crate::config::UserConfig,
    ) -> Option<Self> {
        if !config.routing.read_write_split || db.replicas.is_empty() || config.pool_mode(db) != PoolMode::Transaction {
            return None;
        }
        let login = MonitorLogin {
            user: user.name.clone(),
            password: user.backend_password().map(str::to_owned),
            dbname: db.server_dbname().to_owned(),
            tls: config.tls.client.clone(),
            keepalive: config.proxy.server_keepalive(),
        };
        let interval = config.routing.monitor_interval;
        let r = &config.routing;
        Some(SessionRouting {
            replicas: db
                .replicas
                .iter()
                .map(|rc| ReplicaTarget {
                    pool: shared.pools.get_or_create_replica(config, db, user, rc.addr()),
                    node: shared.routing.node(&db.name, rc.addr(), &login, interval),
                    weight: rc.weight(),
                })
                .collect(),
            primary_node: shared.routing.node(&db.name, &db.primary, &login, interval),
            sticky: shared.routing.sticky(r.sticky_scope, &db.name, &user.name),
            policy: Policy::new(r),
            write_functions: WriteFunctions::new(&r.write_functions),
        })
    }

    /// Where the request unit at the front of `pending` goes.
    fn route(&self, shared: &Shared, pending: &[u8], statements: &ClientStatements, now: Instant) -> (Intent, Route) {
        let intent = crate::routing::intent_of(Request::new(pending).sql(statements), &self.write_functions);
        let candidates: Vec<Candidate> = self
            .replicas
            .iter()
            .map(|r| {
                let s = r.pool.stats();
                let mut view = r.node.view();
                // A replica a reload removed takes no more reads, even from sessions that knew it.
                view.healthy &= !s.retired;
                Candidate { view, active: s.open.saturating_sub(s.idle), weight: r.weight }
            })
            .collect();
        let primary = self.primary_node.view();
        let mut sticky = self.sticky.lock().unwrap_or_else(|e| e.into_inner());
        let route = crate::routing::route::route(
            intent,
            &self.policy,
            &mut sticky,
            &primary,
            &candidates,
            now,
            shared.routing.spin(),
        );
        (intent, route)
    }
}

/// How a request unit read for routing ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
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
const UNIT_LIMIT: usize = 64 * 1024;

/// Reads until `pending` holds a whole request unit. `None` if the client
/// left or terminated first.
async fn read_unit(stream: &mut Stream, pending: &mut BytesMut) -> std::io::Result<Result<Option<Unit>, FrameError>> {
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
fn poll_first_read(
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
const FIRST_READ: usize = 1024;

/// What a successful login leads to.
enum Login {
    /// A pooled session on a configured database.
    Pooled { session: Box<Session>, user: String, database: String },
    /// The admin console (database `pgmux` or `pgbouncer`, an `[admin] users` member).
    Admin { user: String, database: String },
    /// The client asked for TLS and got `S`: handshake, then log in again over TLS.
    StartTls,
}

/// What login produced: enough to run the session.
struct Session {
    /// The primary's pool.
    pool: Arc<Pool>,
    /// The next request goes to the primary, and why: a replica refused it
    /// as a write, or stopped answering before anything reached the client.
    force_primary: Option<RouteReason>,
    /// Read/write splitting, when the database has replicas (boxed: most sessions have none).
    routing: Option<Box<SessionRouting>>,
    statements: ClientStatements,
    server_params: crate::pool::ServerParams,
    params: SessionParams,
    mode: PoolMode,
}

/// A logged-in pooled client, ready for its session.
type Established = (Stream, BytesMut, Box<Session>, Arc<Settings>);

/// Startup, TLS and authentication, up to a pooled session (`None` when the
/// connection ended, or was an admin console session, served here).
async fn establish(tcp: TcpStream, shared: &Shared, info: &ClientInfo) -> std::io::Result<Option<Established>> {
    let _ = tcp.set_nodelay(true);
    let config = shared.config();
    let mut buf = BytesMut::new();
    let deadline = tokio::time::Instant::now() + LOGIN_TIMEOUT;
    let mut stream = Stream::Plain(tcp);
    let login = loop {
        let login = tokio::time::timeout_at(deadline, login(&mut stream, &mut buf, shared, &config, info)).await;
        if !matches!(login, Ok(Ok(Some(Login::StartTls)))) {
            break login;
        }
        let (Stream::Plain(tcp), Some(tls)) = (stream, config.tls.server.as_ref()) else {
            unreachable!("StartTls is only answered on a plain connection with TLS configured")
        };
        stream = match tokio::time::timeout_at(deadline, crate::tls::accept(tcp, tls)).await {
            Ok(Ok(s)) => {
                if let Some(d) = s.tls_description() {
                    tracing::debug!(client = info.id, tls = %d, "client TLS handshake done");
                    info.tls_established(d);
                }
                s
            }
            Ok(Err(e)) => {
                tracing::info!(client = info.id, peer = ?info.peer, error = %e, "client TLS handshake failed");
                return Ok(None);
            }
            Err(_) => {
                tracing::info!(client = info.id, peer = ?info.peer, "client did not finish the TLS handshake in time");
                return Ok(None);
            }
        };
    };
    let (session, user, database) = match login {
        Ok(Ok(Some(Login::Pooled { session, user, database }))) => (session, user, database),
        Ok(Ok(Some(Login::Admin { user, database }))) => {
            tracing::info!(client = info.id, peer = ?info.peer, user = %user, "admin console login");
            info.logged_in(&user, &database, "", None);
            crate::admin::serve(&mut stream, buf, shared, info).await?;
            return Ok(None);
        }
        Ok(Ok(None)) => return Ok(None),
        Ok(Ok(Some(Login::StartTls))) => unreachable!("handled above"),
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            tracing::info!(client = info.id, peer = ?info.peer, "client did not finish login in time");
            fatal(&mut stream, SqlState::PROTOCOL_VIOLATION, "login timed out").await?;
            return Ok(None);
        }
    };
    tracing::info!(client = info.id, peer = ?info.peer, user = %user, database = %database, "client logged in");
    let app = session.params.get("application_name").unwrap_or_default();
    // The names live here only (not in the session as well): SHOW CLIENTS and the PAUSE gate read them.
    info.logged_in(&user, &database, app, Some(session.pool.clone()));
    // The login buffer shares its allocation with the startup packet's
    // pieces: an idle client keeps neither unless a request already follows.
    let buf = if buf.is_empty() { BytesMut::new() } else { buf };
    Ok(Some((stream, buf, session, config)))
}

/// AuthenticationOk, the session's parameters, the cancel key, ReadyForQuery.
async fn greet(stream: &mut Stream, session: &Session, key: &CancelKey<'_>) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    msg::authentication_ok(&mut out);
    for (k, v) in session.params.announce(&session.server_params) {
        msg::parameter_status(&mut out, &k, &v);
    }
    msg::backend_key_data(&mut out, key.pid, key.secret);
    msg::ready_for_query(&mut out, msg::IDLE);
    stream.write_all(&out).await
}

/// Startup and authentication. `Ok(None)` means the connection ended cleanly
/// (cancel request served, client gone, or an error already sent).
async fn login(
    stream: &mut Stream,
    buf: &mut BytesMut,
    shared: &Shared,
    config: &Settings,
    info: &ClientInfo,
) -> std::io::Result<Option<Login>> {
    let (client, peer) = (info.id, info.peer);
    let startup = loop {
        let packet = match startup::split_startup(buf) {
            Ok(Some(p)) => p,
            Ok(None) => {
                if stream.read_buf(buf).await? == 0 {
                    return Ok(None);
                }
                continue;
            }
            Err(e) => {
                tracing::info!(client, ?peer, error = %e, "malformed startup packet");
                // As Postgres: an impossible length is not worth an answer
                // (it logs it as COMMERROR and closes); the rest get a FATAL.
                if let StartupError::UnsupportedProtocol { major: ..3, .. } = e {
                    // A protocol-2 client reads errors in that protocol's
                    // format (one string), which Postgres uses for it.
                    stream.write_all(format!("EFATAL:  {e}\n\0").as_bytes()).await?;
                    stream.shutdown().await?;
                } else if let Some(code) = e.sqlstate() {
                    fatal(stream, code, &e.to_string()).await?;
                }
                return Ok(None);
            }
        };
        match packet {
            StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
                if !buf.is_empty() {
                    // Bytes sent after the request but before our answer could be a
                    // man-in-the-middle injection (CVE-2021-23222 class): refuse.
                    fatal(stream, SqlState::PROTOCOL_VIOLATION, "unexpected data after encryption request").await?;
                    return Ok(None);
                }
                if stream.is_tls() {
                    fatal(stream, SqlState::PROTOCOL_VIOLATION, "encryption request on an encrypted connection")
                        .await?;
                    return Ok(None);
                }
                let offer_tls = matches!(packet, StartupPacket::SslRequest)
                    && config.proxy.tls_mode != TlsMode::Disable
                    && config.tls.server.is_some();
                if offer_tls {
                    stream.write_all(b"S").await?;
                    return Ok(Some(Login::StartTls));
                }
                // GSS encryption (and TLS when disabled) is declined; the client may go on in plaintext.
                stream.write_all(b"N").await?;
            }
            StartupPacket::Cancel { pid, secret } => {
                if let Some(t) = shared.cancels.target(pid, secret) {
                    tracing::debug!(client, backend_pid = t.pid, "forwarding cancel request");
                    relay::cancel_backend(t.addr, t.pid, t.secret).await;
                }
                return Ok(None);
            }
            StartupPacket::Startup(s) => break s,
        }
    };
    if config.proxy.tls_mode == TlsMode::Require && !stream.is_tls() {
        // Like a `hostssl`-only pg_hba.conf: plaintext logins are refused.
        tracing::info!(client, ?peer, "login refused: TLS required");
        fatal(stream, SqlState::INVALID_AUTHORIZATION, "TLS required").await?;
        return Ok(None);
    }
    if startup.minor > 0 || !startup.protocol_options.is_empty() {
        let mut out = BytesMut::new();
        msg::negotiate_protocol_version(&mut out, 0, &startup.protocol_options);
        stream.write_all(&out).await?;
    }
    let Some(user_name) = startup.param("user").filter(|u| !u.is_empty()) else {
        fatal(stream, SqlState::INVALID_AUTHORIZATION, "no PostgreSQL user name specified in startup packet").await?;
        return Ok(None);
    };
    let database = startup.param("database").filter(|d| !d.is_empty()).unwrap_or(user_name).to_owned();
    let Some(user) = config.user(user_name) else {
        tracing::info!(client, ?peer, user = %user_name, "login refused: unknown user");
        shared.stats.auth_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let text = format!("no such user: \"{user_name}\"");
        fatal(stream, SqlState::INVALID_AUTHORIZATION, &text).await?;
        return Ok(None);
    };
    if let Err(e) = crate::auth::authenticate_client(stream, buf, user, &config.verifier(&user.name)).await {
        if e.is_client_gone() {
            return Ok(None);
        }
        tracing::info!(client, ?peer, user = %user.name, error = %e, "authentication failed");
        shared.stats.auth_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        fatal(stream, e.sqlstate(), &e.message()).await?;
        return Ok(None);
    }
    if crate::admin::is_console(&database) && config.database(&database).is_none() {
        if !config.admin.users.iter().any(|u| u == &user.name) {
            tracing::info!(client, ?peer, user = %user.name, "admin console refused: not an [admin] user");
            let text = format!("user \"{}\" is not allowed on the admin console", user.name);
            fatal(stream, SqlState::INVALID_AUTHORIZATION, &text).await?;
            return Ok(None);
        }
        return Ok(Some(Login::Admin { user: user.name.clone(), database }));
    }
    let Some(db) = config.database(&database) else {
        tracing::info!(client, ?peer, database = %database, "login refused: unknown database");
        let text = format!("database \"{database}\" does not exist");
        fatal(stream, SqlState::INVALID_CATALOG_NAME, &text).await?;
        return Ok(None);
    };
    let pool = shared.pools.get_or_create(config, db, user);
    // The client's view starts from the server's defaults, which the pool learns
    // from its first backend; an unreachable server fails the login here.
    let server_params = match pool.server_params().await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(client, error = %e, "cannot reach the server for a new client");
            fatal(stream, e.sqlstate(), &e.to_string()).await?;
            return Ok(None);
        }
    };
    let params = match SessionParams::from_startup(&server_params, &startup.params) {
        Ok(p) => p,
        Err(e) => {
            fatal(stream, SqlState::FEATURE_NOT_SUPPORTED, &e.to_string()).await?;
            return Ok(None);
        }
    };
    Ok(Some(Login::Pooled {
        session: Box::new(Session {
            force_primary: None,
            routing: SessionRouting::new(shared, config, db, user).map(Box::new),
            statements: ClientStatements::default(),
            mode: config.pool_mode(db),
            pool,
            server_params,
            params,
        }),
        user: user.name.clone(),
        database,
    }))
}

pub(crate) use crate::net::fatal;

use crate::net::RarePath;

/// The transaction loop: wait idle without a backend, take one when the
/// client speaks, relay, give it back at the transaction boundary.
///
/// Only the idle wait lives in this future; everything a request does is
/// in [`serve_request`], boxed per request. A task is sized for its largest
/// await, and an idle client should cost its task header and this loop.
#[allow(clippy::manual_async_fn)] // deliberate: see `serve`
fn run_session(
    stream: &mut Stream,
    mut pending: BytesMut,
    shared: &Shared,
    config: &Settings,
    mut session: Box<Session>,
    info: &ClientInfo,
) -> impl Future<Output = std::io::Result<()>> + Send {
    // An `async move` block, not an `async fn`: see `serve`.
    async move {
        loop {
            if pending.is_empty() {
                // Idle: no backend and no buffer; wait for the client (or shutdown,
                // or KILL_CLIENT). The request's first bytes go into a small buffer
                // made only once they are there, then into the backend's buffer; a
                // lone Terminate (or EOF) needs no backend.
                match std::future::poll_fn(|cx| poll_idle(stream, cx, &mut pending, info.signal())).await {
                    // KILL_CLIENT.
                    Idle::Signal(flags) => return fatal(stream, SqlState::ADMIN_SHUTDOWN, Signal::reason(flags)).await,
                    Idle::Read(read) => {
                        if read? == 0 {
                            return Ok(());
                        }
                        // The header checks below decide on what arrived.
                        continue;
                    }
                }
            }
            // Leftover bytes of the next request: decide on a whole header.
            // An invalid type needs no backend to be refused (as Postgres: by type first).
            if let Some(&t) = pending.first().filter(|t| !tag::is_frontend(**t)) {
                return fatal(stream, SqlState::PROTOCOL_VIOLATION, &FrameError::InvalidType(t).to_string()).await;
            }
            match Header::parse(&pending, MAX_MESSAGE_LEN) {
                Ok(Some(h)) if h.tag == tag::TERMINATE => return Ok(()),
                Ok(Some(_)) => {}
                Ok(None) => {
                    if stream.read_buf(&mut pending).await? == 0 {
                        return Ok(());
                    }
                    continue;
                }
                Err(e) => return fatal(stream, SqlState::PROTOCOL_VIOLATION, &e.to_string()).await,
            }
            let step = Box::pin(serve_request(stream, &mut pending, shared, config, &mut session, info)).await?;
            if step == Step::Done {
                return Ok(());
            }
            if info.signal().raised(Signal::DRAIN | Signal::FORCE_CLOSE) != 0 {
                return fatal(stream, SqlState::ADMIN_SHUTDOWN, SHUTTING_DOWN).await;
            }
        }
    }
}

/// What an idle client's wait ended with.
enum Idle {
    Read(std::io::Result<usize>),
    Signal(u8),
}

/// The idle wait: shutdown or KILL_CLIENT first, then pending TLS output
/// (it must reach the client before the client can answer), then the first
/// read of the next request.
fn poll_idle(
    stream: &mut Stream,
    cx: &mut std::task::Context<'_>,
    pending: &mut BytesMut,
    signal: &Signal,
) -> std::task::Poll<Idle> {
    use std::task::Poll;
    if let Poll::Ready(flags) = signal.poll(cx, Signal::ANY) {
        return Poll::Ready(Idle::Signal(flags));
    }
    match std::pin::Pin::new(&mut *stream).poll_flush(cx) {
        Poll::Ready(Ok(())) => {}
        Poll::Ready(Err(e)) => return Poll::Ready(Idle::Read(Err(e))),
        Poll::Pending => return Poll::Pending,
    }
    poll_first_read(stream, cx, pending).map(Idle::Read)
}

/// After a request: wait for the next, or the session is over (whatever had
/// to be said to the client has been said).
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Next,
    Done,
}

/// One request unit (transaction mode: a transaction; session mode: the
/// rest of the session): route it, take a backend, relay, give it back.
async fn serve_request(
    stream: &mut Stream,
    pending: &mut BytesMut,
    shared: &Shared,
    config: &Settings,
    session: &mut Session,
    info: &ClientInfo,
) -> std::io::Result<Step> {
    // Routing needs the whole request unit to classify it.
    let mut decided: Option<(Intent, Route)> = None;
    let mut unit = Unit::Open;
    if session.routing.is_some() {
        unit = match Box::pin(read_unit(stream, pending)).await? {
            Ok(Some(unit)) => unit,
            Ok(None) => return Ok(Step::Done),
            Err(e) => return fatal(stream, SqlState::PROTOCOL_VIOLATION, &e.to_string()).await.map(|()| Step::Done),
        };
    }
    // The request's one clock reading: routing, the PAUSE gate, the pool
    // wait, the link and, when the backend comes back, the relay's last
    // reading serve every timestamp of the request.
    let arrived = Instant::now();
    if let Some(routing) = &session.routing {
        decided = Some(routing.route(shared, pending, &session.statements, arrived));
        if let Some(reason) = session.force_primary.take()
            && let Some((intent, route)) = &mut decided
        {
            *intent = Intent::Write;
            *route = Route::primary(reason);
        } else if unit == Unit::Open
            && let Some((intent, route)) = &mut decided
        {
            // What was not read may write: the primary, as for any write.
            *intent = Intent::Write;
            *route = Route::primary(RouteReason::Write);
        }
    }
    if session.mode == PoolMode::Transaction
        && let Some(answer) = prepare_locally(pending, session)
    {
        stream.write_all(&answer).await?;
        return Ok(Step::Next);
    }
    // Never send a write to a node in recovery (a demoted or not yet promoted primary).
    if let (Some((Intent::Write | Intent::Transaction | Intent::HintPrimary, _)), Some(routing)) =
        (&decided, &session.routing)
    {
        let primary = routing.primary_node.view();
        if primary.healthy && primary.in_recovery {
            tracing::warn!(client = info.id, addr = %routing.primary_node.addr, "the configured primary is in recovery; refusing a write");
            let text =
                format!("the primary {} is in recovery: pgmux does not send writes to it", routing.primary_node.addr);
            if !reject_request(stream, pending, SqlState::READ_ONLY_TRANSACTION, &text).await? {
                return Ok(Step::Done);
            }
            return Ok(Step::Next);
        }
    }
    // The PAUSE gate; SHOW CLIENTS state "waiting".
    let database = info.login().map_or("", |l| l.database.as_str());
    let arrived = match info.wait_turn(&shared.pause, database, arrived).await {
        Ok(at) => at,
        Err(why) => return fatal(stream, SqlState::ADMIN_SHUTDOWN, why).await.map(|()| Step::Done),
    };
    let mut pool = session.pool.clone();
    let mut replica_node = None;
    if let (Some((_, route)), Some(routing)) = (&mut decided, &session.routing) {
        if let Target::Replica(i) = route.target {
            pool = routing.replicas[i].pool.clone();
            replica_node = Some(routing.replicas[i].node.clone());
        }
        shared.routing.count(route.reason);
    }
    // A write of a routed scope: its reads stay on the primary until the
    // write is settled with its post-commit WAL position (or given up).
    let write_scope = match (&decided, &session.routing) {
        (Some((Intent::Write | Intent::Transaction | Intent::HintPrimary, route)), Some(routing))
            if route.target == Target::Primary =>
        {
            routing.sticky.lock().unwrap_or_else(|e| e.into_inner()).begin_write(arrived);
            Some(routing.sticky.clone())
        }
        _ => None,
    };
    let settle = |lsn: Option<u64>| {
        if let Some(sticky) = &write_scope {
            sticky.lock().unwrap_or_else(|e| e.into_inner()).end_write(Instant::now(), lsn);
        }
    };
    let checked_out = match pool.checkout_at(arrived).await {
        Err(e) if !Arc::ptr_eq(&pool, &session.pool) => {
            // A replica that cannot give a connection: the read goes to the primary.
            tracing::info!(client = info.id, error = %e, addr = %pool.settings().addr, "replica unavailable; reading from the primary");
            shared.routing.count(RouteReason::ReplicaFailed);
            if let Some((_, route)) = &mut decided {
                *route = Route::primary(RouteReason::ReplicaFailed);
            }
            pool = session.pool.clone();
            replica_node = None;
            pool.checkout_at(Instant::now()).await
        }
        other => other,
    };
    let (mut backend, mut clock) = match checked_out {
        Ok(granted) => granted,
        Err(e) => {
            settle(None);
            info.released(&pool, Instant::now());
            tracing::info!(client = info.id, error = %e, "no server connection for a client request");
            if !reject_request(stream, pending, e.sqlstate(), &e.to_string()).await? {
                return Ok(Step::Done);
            }
            return Ok(Step::Next);
        }
    };
    // Cancel requests with the client's key go to this backend from here.
    info.linked(&backend, &pool, clock);
    // A read sent to a replica may still turn out to be a write (a function
    // that writes): keep the request so it can be re-run on the primary.
    // Only a unit that a ReadyForQuery will answer: after a Flush the client
    // waits for the answer before it sends more, so holding it would hang.
    let retry_copy = match (&decided, &session.routing) {
        (Some((Intent::Read | Intent::HintReplica, route)), Some(_))
            if route.target != Target::Primary && unit != Unit::Ends(tag::FLUSH) =>
        {
            Some(bytes::Bytes::copy_from_slice(pending))
        }
        _ => None,
    };
    let opts = RelayOptions {
        client: info.id,
        release_at_boundary: session.mode == PoolMode::Transaction,
        idle_transaction_timeout: config.proxy.idle_transaction_timeout,
        query_timeout: config.proxy.query_timeout,
        max_query_size: config.proxy.max_query_size,
        on_session_state: config.proxy.on_session_state,
        stats: &shared.stats,
        counters: pool.counters(),
        route: decided.map(|(_, route)| route.reason),
        node: replica_node.as_deref(),
    };
    // Not boxed apart: this future is already the boxed per-request one.
    let outcome =
        transaction(stream, &mut backend, pending, retry_copy.is_some(), session, &opts, info.signal(), &mut clock)
            .await;
    info.released(&pool, clock);
    match outcome {
        Ended::Clean if write_scope.is_some() => {
            // The primary's insert position, read on the same session right
            // after the commit, is exactly what a replica must have replayed.
            // One round trip before the backend goes back.
            let lsn = Box::pin(backend.query_row("SELECT pg_catalog.pg_current_wal_insert_lsn()")).await;
            let position = match &lsn {
                Ok((row, None)) => row.first().and_then(|v| v.as_deref()).and_then(crate::routing::monitor::parse_lsn),
                _ => None,
            };
            settle(position);
            match lsn {
                Ok((_, None)) => backend.release(Release::Clean(Instant::now())),
                _ => backend.release(Release::Close(CloseReason::Dirty)),
            }
        }
        Ended::Clean => {
            settle(None);
            backend.release(Release::Clean(clock));
        }
        Ended::Misrouted => {
            backend.release(Release::Clean(Instant::now()));
            shared.routing.count(RouteReason::MisrouteRetry);
            tracing::info!(client = info.id, "a replica refused a write (25006); re-running it on the primary");
            // The retry is routed as a write: it opens (and settles) the scope's write.
            *pending = BytesMut::from(&retry_copy.expect("held only with a copy")[..]);
            session.force_primary = Some(RouteReason::MisrouteRetry);
            return Ok(Step::Next);
        }
        Ended::ReplicaDown => {
            // Hung, not refused: its state is unknown, so it is closed.
            backend.release(Release::Close(CloseReason::Dead));
            shared.routing.count(RouteReason::ReplicaFailed);
            tracing::warn!(client = info.id, addr = %pool.settings().addr, "replica marked down while a read waited on it; re-running it on the primary");
            *pending = BytesMut::from(&retry_copy.expect("held only with a copy")[..]);
            session.force_primary = Some(RouteReason::ReplicaFailed);
            return Ok(Step::Next);
        }
        Ended::Recover(link, why) => {
            settle(None);
            let (registry_owner, mut link) = (session.pool.clone(), link);
            let lingering = shared.lingering();
            // Cleanup may wait on a cancelled query; the client need not wait for it.
            tokio::spawn(async move {
                let _lingering = lingering;
                let clean = relay::recover(&mut backend, &mut link, &registry_owner.statements).await;
                backend.release(if clean {
                    Release::Clean(Instant::now())
                } else {
                    Release::Close(CloseReason::Dirty)
                });
            });
            if let Some((code, text)) = why {
                return fatal(stream, code, &text).await.map(|()| Step::Done);
            }
            return Ok(Step::Done);
        }
        Ended::Discard(why) => {
            settle(None);
            backend.release(Release::Close(CloseReason::Dead));
            if let Some((code, text)) = why {
                return fatal(stream, code, &text).await.map(|()| Step::Done);
            }
            return Ok(Step::Done);
        }
    }
    Ok(Step::Next)
}

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
fn prepare_locally(pending: &mut BytesMut, session: &mut Session) -> Option<BytesMut> {
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
                    || crate::sql::settings::touches_settings(sql)
                    || pinning::session_state(sql).is_some()
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

/// How a transaction on a backend ended, and what becomes of the backend.
enum Ended {
    /// At a boundary: back to the pool as is.
    Clean,
    /// The client is gone or being closed: clean the backend up in the
    /// background; tell the client why (if it is still there) and close.
    Recover(Box<Link>, Option<(SqlState, String)>),
    /// The backend is unusable: close it; tell the client why and close.
    Discard(Option<(SqlState, String)>),
    /// The replica refused a write before anything reached the client: the
    /// backend is clean; re-run the request on the primary.
    Misrouted,
    /// The replica was marked down while the request waited on it and
    /// nothing reached the client: close the backend, re-run on the primary.
    ReplicaDown,
}

/// Runs one transaction (transaction mode) or the rest of the session (session mode).
/// `clock` is when the backend was granted; it is left at the relay's last
/// clock reading.
#[allow(clippy::too_many_arguments)]
async fn transaction(
    stream: &mut Stream,
    backend: &mut Backend,
    pending: &mut BytesMut,
    hold_for_retry: bool,
    session: &mut Session,
    opts: &RelayOptions<'_>,
    signal: &Signal,
    clock: &mut Instant,
) -> Ended {
    if let Some(sql) = session.params.sync_sql(backend) {
        let reset: Vec<String> =
            backend.changed_settings().filter(|n| session.params.get(n).is_none()).map(str::to_owned).collect();
        session.params.record_on(backend);
        match backend.run_quietly(&sql).await {
            Ok((None, msg::IDLE)) => {
                let reset: Vec<&str> = reset.iter().map(String::as_str).collect();
                backend.forget_changed(&reset);
                // Adopt the server's spelling of what was just set.
                for name in params::TRACKED {
                    if let Some(v) = backend.param(name) {
                        session.params.observe(name, v);
                    }
                }
                backend.mark_synced(session.params.profile());
            }
            Ok((Some(err), _)) => {
                tracing::info!(client = opts.client, code = %err.code, message = %err.message, "could not apply session parameters");
                return Ended::Discard(Some((
                    SqlState::FEATURE_NOT_SUPPORTED,
                    format!("could not apply session parameters: {}", err.message),
                )));
            }
            Ok((None, _)) | Err(_) => {
                return Ended::Discard(Some((SqlState::CONNECTION_FAILURE, "server connection lost".into())));
            }
        }
    } else {
        backend.mark_synced(session.params.profile());
    }
    // Statements whose last client left are closed here, before this client
    // can see them (one round trip, only after such a departure).
    let unused = backend.prepared.sweep_unused(&session.pool.statements);
    if !unused.is_empty() && backend.close_statements(&unused).await.is_err() {
        return Ended::Discard(Some((SqlState::CONNECTION_FAILURE, "server connection lost".into())));
    }
    let mut link = Link::reusing(std::mem::take(&mut backend.spare_queue));
    link.hold = hold_for_retry;
    // Copied, not swapped in: the backend keeps its grown buffer, and the
    // client's small one is freed while it idles.
    backend.to_server.extend_from_slice(pending);
    *pending = BytesMut::new();
    let mut scope = StatementScope {
        client: &mut session.statements,
        registry: &session.pool.statements,
        max_prepared: session.pool.settings().max_prepared,
        on_session_state: opts.on_session_state,
        max_query_size: opts.max_query_size,
    };
    if let Err(e) = link.scan_client(&mut backend.to_server, &mut scope, &mut backend.prepared) {
        return Ended::Recover(Box::new(link), Some((e.sqlstate(), e.to_string())));
    }
    // The request that opened the transaction was read before the relay.
    link.traffic.bytes_in = backend.to_server.len() as u64;
    let outcome = relay::relay(stream, backend, &mut link, &mut scope, opts, signal, clock).await;
    tracing::trace!(
        client = opts.client,
        ?outcome,
        pending_ready = link.pending_ready,
        status = link.status,
        "relay returned"
    );
    if !matches!(outcome, Outcome::Boundary) {
        // Cut short: what it did so far counts (cleanup traffic does not).
        relay::record_traffic(&mut link, opts);
    }
    for (k, v) in link.take_param_changes() {
        session.params.observe(&k, &v);
        backend.set_param(&k, &v);
    }
    match outcome {
        Outcome::Boundary => {
            // A partial header of the client's next message stays with the client
            // (and is counted with the transaction it starts).
            if !backend.to_server.is_empty() {
                pending.extend_from_slice(&backend.to_server);
                backend.to_server.clear();
            }
            link.traffic.bytes_in = link.traffic.bytes_in.saturating_sub(pending.len() as u64);
            relay::record_traffic(&mut link, opts);
            if !link.touched_settings.is_empty() && !read_back_settings(backend, session, &link.touched_settings).await
            {
                return Ended::Discard(None);
            }
            backend.spare_queue = link.into_spare();
            Ended::Clean
        }
        Outcome::Terminated | Outcome::ClientGone => {
            link.reset_session = link.pin.is_some() || session.mode == PoolMode::Session;
            if link.at_transaction_boundary(&backend.from_server) && !link.reset_session {
                backend.to_server.clear();
                Ended::Clean
            } else {
                Ended::Recover(Box::new(link), None)
            }
        }
        Outcome::ClientProtocol(e) => Ended::Recover(Box::new(link), Some((e.sqlstate(), e.to_string()))),
        Outcome::NodeDown if hold_for_retry && link.hold && !link.misrouted => Ended::ReplicaDown,
        Outcome::NodeDown => {
            tracing::warn!(client = opts.client, pid = backend.pid, "replica marked down mid-answer");
            Ended::Discard(Some((
                SqlState::CONNECTION_FAILURE,
                "server connection lost: the replica stopped answering".into(),
            )))
        }
        Outcome::QueryTimeout => {
            tracing::warn!(client = opts.client, pid = backend.pid, timeout = ?opts.query_timeout, "query_timeout: closing the server connection");
            // Cancelled, so the server stops working for nobody; closed, since
            // what it will still send is unknown.
            tokio::spawn(relay::cancel_backend(backend.addr, backend.pid, backend.secret));
            Ended::Discard(Some((
                SqlState::QUERY_CANCELED,
                format!("canceling statement due to query_timeout ({:?})", opts.query_timeout),
            )))
        }
        Outcome::IdleInTransaction => Ended::Recover(
            Box::new(link),
            Some((
                SqlState::IDLE_IN_TRANSACTION_TIMEOUT,
                "terminating connection due to idle-in-transaction timeout".to_owned(),
            )),
        ),
        // shutdown_timeout is over: cancelled and rolled back like an
        // abandoned backend, since a closed socket alone leaves Postgres
        // running the query until it next writes to the client.
        Outcome::Shutdown => Ended::Recover(Box::new(link), Some((SqlState::ADMIN_SHUTDOWN, SHUTTING_DOWN.into()))),
        // The backend goes through the same cleanup as an abandoned one
        // (cancel, roll back) in the background; the client is told at once.
        Outcome::Killed => Ended::Recover(Box::new(link), Some((SqlState::ADMIN_SHUTDOWN, TERMINATED_BY_ADMIN.into()))),
        Outcome::Misrouted => {
            if link.at_transaction_boundary_ignoring_output() {
                backend.from_server.clear();
                backend.to_server.clear();
                Ended::Misrouted
            } else {
                Ended::Discard(Some((SqlState::CONNECTION_FAILURE, "replica answer could not be retried".into())))
            }
        }
        // The server said why it closed (a FATAL, relayed): as from Postgres, nothing follows it.
        Outcome::ServerGone(_) if link.server_fatal => Ended::Discard(None),
        Outcome::ServerGone(why) => {
            tracing::warn!(client = opts.client, pid = backend.pid, reason = %why, "server connection lost");
            Ended::Discard(Some((SqlState::CONNECTION_FAILURE, format!("server connection lost: {why}"))))
        }
    }
}

/// After a transaction whose SQL may have changed settings the server does not
/// report, reads their session values back so they follow the client to its
/// next backend. `false` if the backend failed meanwhile.
async fn read_back_settings(backend: &mut Backend, session: &mut Session, touched: &[String]) -> bool {
    let mut names: Vec<String> = touched.iter().filter(|n| *n != "*").cloned().collect();
    if touched.iter().any(|n| n == "*") {
        names.extend(backend.changed_settings().map(str::to_owned));
    }
    if names.is_empty() {
        return true;
    }
    let mut sql = String::from("SELECT ");
    for (i, n) in names.iter().enumerate() {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str("pg_catalog.current_setting(E'");
        sql.push_str(&n.replace('\\', "\\\\").replace('\'', "''"));
        sql.push_str("', true)");
    }
    match backend.query_row(&sql).await {
        Ok((row, None)) => {
            for (name, value) in names.iter().zip(row) {
                if let Some(v) = value {
                    session.params.set_read_back(name, &v);
                    backend.set_param(name, &v);
                }
            }
            true
        }
        Ok((_, Some(err))) => {
            tracing::debug!(message = %err.message, "could not read settings back");
            true
        }
        Err(_) => false,
    }
}

/// Answers the request at the front of `pending` with an error instead of
/// running it: ErrorResponse at once, then skip the client's messages up to
/// the end of that request (Query, FunctionCall or Sync) and send
/// ReadyForQuery, as the server would after an error. Returns `false` if the
/// client terminated or went away meanwhile.
fn reject_request<'a>(
    stream: &'a mut Stream,
    pending: &'a mut BytesMut,
    code: SqlState,
    text: &'a str,
) -> RarePath<'a, std::io::Result<bool>> {
    Box::pin(reject_request_inner(stream, pending, code, text))
}

async fn reject_request_inner(
    stream: &mut Stream,
    pending: &mut BytesMut,
    code: SqlState,
    text: &str,
) -> std::io::Result<bool> {
    let mut out = BytesMut::new();
    msg::error_response(&mut out, Severity::Error, code, text);
    stream.write_all(&out).await?;
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
