//! The relay loop: moves bytes between the client and its backend until a
//! transaction boundary (or the end), reading straight into the backend's
//! buffers and writing out of them.

use super::*;

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
    /// Read nothing more from the client while answers are owed: what it
    /// sends meanwhile waits in the socket and is routed on its own. Set
    /// for routed requests that are not writes: a write the client sends
    /// while a read is answered would otherwise ride along unrouted (on a
    /// replica: refused with 25006; on the primary: uncounted by
    /// read-your-writes, so the client's next reads could miss it).
    pub route_each: bool,
    /// Leave the ReadyForQuery that ends the transaction in `from_server`
    /// for the caller, who sends something before it (a write token: the
    /// client must have it when its commit returns).
    pub hold_final_ready: bool,
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
        let hold_final_ready = opts.hold_final_ready && opts.release_at_boundary && !link.hold;
        let held = link.final_ready_held(hold_final_ready, from_server);
        if opts.release_at_boundary && link.pin.is_none() && link.at_transaction_boundary_holding(from_server, held) {
            return Outcome::Boundary;
        }
        if link.unscanned && link.pending_ready == 0 {
            // Answered, and the link goes on (a transaction, or an extended-
            // protocol sequence before its Sync): what the client sent
            // after the request belongs here.
            link.unscanned = false;
            if let Err(end) = take_client_bytes(link, server, to_server, scope, prepared) {
                return end;
            }
            query_started = Instant::now();
            idle_since = query_started;
            continue;
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
            if ((link.server_ready > held && !link.hold) || client.wants_write())
                && let Poll::Ready(r) = client.poll_write_ready(cx)
            {
                return Poll::Ready(Event::ClientWritable(r));
            }
            if from_server.len() < HIGH_WATER
                && let Poll::Ready(r) = server.poll_read_buf(cx, from_server)
            {
                return Poll::Ready(Event::ServerRead(r));
            }
            // See `route_each` (a read-only transaction goes on here: its
            // next statement is read once the last one is answered).
            if link.may_read_client(to_server.len())
                && !(link.route_each && link.pending_ready > 0)
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
                let mut none = 0;
                let ready = if link.hold { &mut none } else { &mut link.server_ready };
                if r.and_then(|_| flush_holding(client, from_server, ready, held)).is_err() {
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
                let held = link.final_ready_held(hold_final_ready, from_server);
                if !link.hold && flush_holding(client, from_server, &mut link.server_ready, held).is_err() {
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
                if let Err(end) = take_client_bytes(link, server, to_server, scope, prepared) {
                    return end;
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
            }
            Event::IdleTimeout => return Outcome::IdleInTransaction,
            Event::QueryTimeout => return Outcome::QueryTimeout,
            Event::NodeDown => return Outcome::NodeDown,
            Event::Shutdown => return Outcome::Shutdown,
            Event::Killed => return Outcome::Killed,
        }
    }
}

/// Client bytes join the link (just read, or waiting since a request's
/// end): scanned, and sent as far as the server's socket takes them.
fn take_client_bytes(
    link: &mut Link,
    server: &mut Stream,
    to_server: &mut BytesMut,
    scope: &mut StatementScope<'_>,
    prepared: &mut PreparedSet,
) -> Result<(), Outcome> {
    // More requests on the link: the held answer can no longer be retried alone.
    link.hold = false;
    link.misrouted = false;
    link.scan_client(to_server, scope, prepared).map_err(Outcome::ClientProtocol)?;
    flush(server, to_server, &mut link.client_ready)
        .map_err(|e| Outcome::ServerGone(format!("write to server failed: {e}")))
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

/// [`flush`], keeping the last `held` of the `*ready` bytes back.
fn flush_holding(stream: &mut Stream, buf: &mut BytesMut, ready: &mut usize, held: usize) -> std::io::Result<()> {
    let mut sendable = *ready - held;
    let r = flush(stream, buf, &mut sendable);
    *ready = sendable + held;
    r
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
