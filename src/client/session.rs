//! The session loop (idle without a backend, a backend per transaction)
//! and one request's orchestration: route, check out, relay, release.

use super::*;
use crate::routing::token;

/// The transaction loop: wait idle without a backend, take one when the
/// client speaks, relay, give it back at the transaction boundary.
///
/// Only the idle wait lives in this future; everything a request does is
/// in [`serve_request`], boxed per request. A task is sized for its largest
/// await, and an idle client should cost its task header and this loop.
#[allow(clippy::manual_async_fn)] // deliberate: see `serve`
///
/// It owns what login established (rather than borrowing it from `serve`):
/// each value then has one place in the task, not a place in `serve` and a
/// reference here, and the task stays within 384 bytes (docs/benchmarks.md).
pub(super) fn run_session<'a>(
    established: login::Established<'a>,
    shared: &'a Shared,
    info: &'a ClientInfo,
) -> impl Future<Output = std::io::Result<()>> + Send + 'a {
    // Taken apart out here: the block captures each piece once, where
    // moving them out of a captured tuple inside would store both.
    let (mut stream, mut pending, mut session, config, key) = established;
    // An `async move` block, not an `async fn`: see `serve`.
    async move {
        // The cancel key stays registered while the session runs (captured,
        // not bound: a reference kept across the awaits would cost 8 bytes).
        let _ = &key;
        loop {
            if pending.is_empty() {
                // Idle: no backend and no buffer; wait for the client (or shutdown,
                // or KILL_CLIENT). The request's first bytes go into a small buffer
                // made only once they are there, then into the backend's buffer; a
                // lone Terminate (or EOF) needs no backend.
                match std::future::poll_fn(|cx| poll_idle(&mut stream, cx, &mut pending, info.signal())).await {
                    // KILL_CLIENT.
                    Idle::Signal(flags) => {
                        return fatal(&mut stream, SqlState::ADMIN_SHUTDOWN, Signal::reason(flags)).await;
                    }
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
                return fatal(&mut stream, SqlState::PROTOCOL_VIOLATION, &FrameError::InvalidType(t).to_string()).await;
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
                Err(e) => return fatal(&mut stream, SqlState::PROTOCOL_VIOLATION, &e.to_string()).await,
            }
            let step = Box::pin(serve_request(&mut stream, &mut pending, shared, &config, &mut session, info)).await?;
            if step == Step::Done {
                return Ok(());
            }
            if info.signal().raised(Signal::DRAIN | Signal::FORCE_CLOSE) != 0 {
                return fatal(&mut stream, SqlState::ADMIN_SHUTDOWN, SHUTTING_DOWN).await;
            }
        }
    }
}

/// What an idle client's wait ended with.
pub(super) enum Idle {
    Read(std::io::Result<usize>),
    Signal(u8),
}

/// The idle wait: shutdown or KILL_CLIENT first, then pending TLS output
/// (it must reach the client before the client can answer), then the first
/// read of the next request.
pub(super) fn poll_idle(
    stream: &mut Stream,
    cx: &mut std::task::Context<'_>,
    pending: &mut BytesMut,
    signal: &Signal,
) -> std::task::Poll<Idle> {
    use std::task::Poll;
    if let Poll::Ready(flags) = signal.poll(cx, Signal::ANY) {
        return Poll::Ready(Idle::Signal(flags));
    }
    // Only TLS output waits here: what a plain socket accepted is on its
    // way (on io_uring, waiting for the send's completion would cost a
    // wake-up per request).
    if stream.wants_write() {
        match std::pin::Pin::new(&mut *stream).poll_flush(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Idle::Read(Err(e))),
            Poll::Pending => return Poll::Pending,
        }
    }
    poll_first_read(stream, cx, pending).map(Idle::Read)
}

/// After a request: wait for the next, or the session is over (whatever had
/// to be said to the client has been said).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Step {
    Next,
    Done,
}

/// The primary's insert position and its timeline, read right after a
/// commit: positions compare only within one timeline.
const POSITION_SQL: &str = "SELECT pg_catalog.pg_current_wal_insert_lsn(), \
     pg_catalog.pg_walfile_name(pg_catalog.pg_current_wal_insert_lsn())";

fn parse_position(row: &[Option<String>]) -> Option<Position> {
    use crate::routing::monitor::{parse_lsn, walfile_timeline};
    let lsn = parse_lsn(row.first()?.as_deref()?)?;
    let timeline = walfile_timeline(row.get(1)?.as_deref()?)?;
    Some(Position { timeline, lsn })
}

/// How many backends in a row may fail before a request was sent to them
/// (each failure closes the pool's idle ones too) before the client is told.
const MAX_UNUSED_RETRIES: u8 = 3;

/// One request unit (transaction mode: a transaction; session mode: the
/// rest of the session): route it, take a backend, relay, give it back.
pub(super) async fn serve_request(
    stream: &mut Stream,
    pending: &mut BytesMut,
    shared: &Shared,
    config: &Settings,
    session: &mut Session,
    info: &ClientInfo,
) -> std::io::Result<Step> {
    if let Some(state) = session.lost.take() {
        let (more, state) = Box::pin(lost::answer_next(stream, pending, &session.statements, *state)).await?;
        session.lost = state.map(Box::new);
        return Ok(if more { Step::Next } else { Step::Done });
    }
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
        let read_after = session.params.get(token::READ_AFTER);
        match routing.route(shared, pending, &session.statements, read_after, arrived).await {
            Ok(d) => decided = Some(d),
            Err(text) => {
                return Ok(if reject_request(stream, pending, SqlState::INVALID_PARAMETER_VALUE, &text).await? {
                    Step::Next
                } else {
                    Step::Done
                });
            }
        }
        if let Some(reason) = session.force_primary.take()
            && let Some((intent, route)) = &mut decided
        {
            *intent = Intent::Write;
            *route = Route::primary(reason);
        } else if (unit == Unit::Open || Request::new(pending).followed())
            && let Some((intent, route)) = &mut decided
        {
            // What was not read may write: the primary, as for any write
            // (read-your-writes counts it). So may requests pipelined behind
            // this one, which go to the same server connection (on a replica
            // a write among them would fail with 25006).
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
    // A read that needs a write the replica's last sample predates: ask the
    // replica now, and read from it if it has replayed the write in time.
    if let (Some((_, route)), Some(routing)) = (&mut decided, &session.routing)
        && let Target::CatchUp { replica, timeline, lsn } = route.target
    {
        let deadline = tokio::time::Instant::from_std(arrived) + routing.policy.max_replica_wait;
        *route = if routing.replicas[replica].node.replayed_past(timeline, lsn, deadline).await {
            Route { target: Target::Replica(replica), reason: RouteReason::CaughtUp }
        } else {
            Route::primary(RouteReason::ReplicaLagging)
        };
    }
    // The PAUSE gate; SHOW CLIENTS state "waiting".
    let database = info.login().map_or("", crate::live::registry::LoginInfo::database);
    let arrived = match info.wait_turn(&shared.pause, database, arrived).await {
        Ok(at) => at,
        Err(why) => return fatal(stream, SqlState::ADMIN_SHUTDOWN, why).await.map(|()| Step::Done),
    };
    let mut pool = session.pool.clone();
    let mut replica_node = None;
    if let (Some((_, route)), Some(routing)) = (&mut decided, &session.routing) {
        if let Target::Replica(i) = route.target {
            pool = routing.replica_pool(shared, config, i);
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
    let settle = |lsn: Option<Position>| {
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
            if let Some(sticky) = &write_scope {
                sticky.lock().unwrap_or_else(|e| e.into_inner()).abandon_write();
            }
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
        (Some((Intent::Read | Intent::HintReplica | Intent::Inert, route)), Some(_))
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
        route_each: session.routing.is_some() && write_scope.is_none(),
        // Transactions that write get a token before their ReadyForQuery, in
        // sessions that asked for tokens (not a read re-run on the primary
        // because its replica failed).
        hold_final_ready: write_scope.is_some()
            && !matches!(&decided, Some((_, r)) if r.reason == RouteReason::ReplicaFailed)
            && token::wants_tokens(session.params.get(token::WRITE_TOKEN)),
    };
    // Not boxed apart: this future is already the boxed per-request one.
    let outcome =
        transaction(stream, &mut backend, pending, retry_copy.is_some(), session, &opts, info.signal(), &mut clock)
            .await;
    info.released(&pool, clock);
    if !matches!(outcome, Ended::Unused) {
        session.retries = 0;
    }
    match outcome {
        Ended::Clean { ready_owed } if write_scope.is_some() => {
            // The primary's insert position, read on the same session right
            // after the commit, is exactly what a replica must have replayed.
            // One round trip before the backend goes back.
            let lsn = Box::pin(backend.query_row(POSITION_SQL)).await;
            let position = match &lsn {
                Ok((row, None)) => parse_position(row),
                _ => None,
            };
            settle(position);
            match lsn {
                Ok((_, None)) => backend.release(Release::Clean(Instant::now())),
                _ => backend.release(Release::Close(CloseReason::Dirty)),
            }
            if ready_owed {
                // The token before the commit's ReadyForQuery: a client that
                // reads it as soon as its commit returns has this commit's.
                let mut out = BytesMut::new();
                if let Some(p) = position {
                    msg::parameter_status(&mut out, token::WRITE_LSN, &token::format(p));
                }
                msg::ready_for_query(&mut out, msg::IDLE);
                stream.write_all(&out).await?;
            }
        }
        Ended::Clean { ready_owed } => {
            settle(None);
            backend.release(Release::Clean(clock));
            if ready_owed {
                stream.write_all(&msg::READY_IDLE).await?;
            }
        }
        Ended::Unused => {
            if let Some(sticky) = &write_scope {
                sticky.lock().unwrap_or_else(|e| e.into_inner()).abandon_write();
            }
            backend.release(Release::Close(CloseReason::Dead));
            session.retries += 1;
            if session.retries > MAX_UNUSED_RETRIES {
                let text = "server connection lost before the request was sent, several times";
                return fatal(stream, SqlState::CONNECTION_FAILURE, text).await.map(|()| Step::Done);
            }
            tracing::info!(client = info.id, "server connection failed before the request was sent; taking another");
            // `pending` still holds the whole request.
            return Ok(Step::Next);
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
        Ended::Lost(lost) => {
            // Nothing the client was told succeeded committed: its reads
            // need nothing new. Else the position is unknown: the primary.
            match (&write_scope, lost.completed) {
                (Some(sticky), false) => sticky.lock().unwrap_or_else(|e| e.into_inner()).abandon_write(),
                _ => settle(None),
            }
            backend.release(Release::Close(CloseReason::Dead));
            tracing::info!(client = info.id, owed = lost.owed, code = %lost.code, "server lost mid-transaction; the client keeps its connection");
            let (out, state) = lost::answer_loss(lost);
            session.lost = state.map(Box::new);
            stream.write_all(&out).await?;
            return Ok(Step::Next);
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
