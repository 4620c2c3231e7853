//! One transaction on a backend: settings synced first, the relay, the
//! settings read back after, and what becomes of the backend.

use super::*;

/// How a transaction on a backend ended, and what becomes of the backend.
pub(super) enum Ended {
    /// At a boundary: back to the pool as is. `ready_owed`: the final
    /// ReadyForQuery (idle) was held back (`RelayOptions::hold_final_ready`)
    /// and the caller sends it.
    Clean { ready_owed: bool },
    /// The client is gone or being closed: clean the backend up in the
    /// background; tell the client why (if it is still there) and close.
    Recover(Box<Link>, Option<(SqlState, String)>),
    /// The backend is unusable: close it; tell the client why and close.
    Discard(Option<(SqlState, String)>),
    /// The backend failed before any of the client's request was sent (a
    /// server that went away while it idled in the pool): close it, run
    /// the request on another.
    Unused,
    /// The server was lost mid-transaction and the client's connection can
    /// stay: close the backend, answer what the client is owed.
    Lost(Lost),
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
pub(super) async fn transaction(
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
            // Nothing of the client's request was sent: another backend can take it.
            Ok((None, _)) | Err(_) => return Ended::Unused,
        }
    } else {
        backend.mark_synced(session.params.profile());
    }
    // Statements whose last client left are closed here, before this client
    // can see them (one round trip, only after such a departure).
    let unused = backend.prepared.sweep_unused(&session.pool.statements);
    if !unused.is_empty() && backend.close_statements(&unused).await.is_err() {
        return Ended::Unused;
    }
    let mut link = Link::reusing(std::mem::take(&mut backend.spare_queue));
    link.hold = hold_for_retry;
    link.route_each = opts.route_each;
    link.survive_loss = session.mode == PoolMode::Transaction && !hold_for_retry;
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
            // At a boundary only a held final ReadyForQuery can be left over.
            let ready_owed = !backend.from_server.is_empty();
            backend.from_server.clear();
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
            Ended::Clean { ready_owed }
        }
        Outcome::Terminated | Outcome::ClientGone => {
            link.reset_session = link.pin.is_some() || session.mode == PoolMode::Session;
            // The client left: a final ReadyForQuery held for it goes nowhere.
            let held = link.final_ready_held(opts.hold_final_ready, &backend.from_server);
            if link.at_transaction_boundary_holding(&backend.from_server, held) && !link.reset_session {
                backend.to_server.clear();
                backend.from_server.clear();
                Ended::Clean { ready_owed: false }
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
            tokio::spawn(relay::cancel_backend(backend.addr.clone(), backend.pid, backend.secret));
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
        Outcome::ServerGone(why) => {
            tracing::warn!(client = opts.client, pid = backend.pid, reason = %why, "server connection lost");
            if let Some(lost) = link.lost(&mut backend.to_server, pending, scope.client) {
                return Ended::Lost(lost);
            }
            match link.fatal_seen.take() {
                // The server said why it closed (a FATAL, relayed): as from Postgres, nothing follows it.
                None if link.server_fatal => Ended::Discard(None),
                // Withheld or reworded for a client that could not keep its connection after all.
                Some((_, message)) => Ended::Discard(Some((SqlState::CONNECTION_FAILURE, message))),
                None => Ended::Discard(Some((SqlState::CONNECTION_FAILURE, format!("server connection lost: {why}")))),
            }
        }
    }
}

/// After a transaction whose SQL may have changed settings the server does not
/// report, reads their session values back so they follow the client to its
/// next backend. `false` if the backend failed meanwhile.
pub(super) async fn read_back_settings(backend: &mut Backend, session: &mut Session, touched: &[String]) -> bool {
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
