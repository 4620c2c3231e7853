//! A backend whose client left mid-flight: brought back to idle (flush,
//! end COPY, cancel, sync, roll back) or closed.

use super::*;

/// Brings a backend whose client left mid-flight back to idle: flush the whole
/// messages already accepted, end any COPY, cancel what runs, sync, roll back.
/// Returns `false` when the backend must be closed instead.
pub async fn recover(backend: &mut Backend, link: &mut Link, registry: &Registry) -> bool {
    if link.client_body_remaining > 0 || link.unpoolable {
        // The server holds part of a message: nothing can resynchronise it.
        return false;
    }
    match tokio::time::timeout(RECOVER_TIMEOUT, recover_inner(backend, link, registry)).await {
        Ok(Ok(clean)) => clean,
        Ok(Err(e)) => {
            tracing::debug!(pid = backend.pid, error = %e, "server connection failed during cleanup");
            false
        }
        Err(_) => {
            tracing::info!(pid = backend.pid, pending = link.pending_ready, expect = ?link.expect, copy_in = link.copy_in, unsynced = link.unsynced, skipping = link.skipping, status = link.status, "cleanup of an abandoned server connection timed out");
            false
        }
    }
}

async fn recover_inner(backend: &mut Backend, link: &mut Link, registry: &Registry) -> std::io::Result<bool> {
    // Whole frames already scanned go out so the ReadyForQuery count stays exact;
    // a trailing partial header was never sent and is dropped.
    backend.to_server.truncate(link.client_ready);
    let mut extra = BytesMut::new();
    if link.copy_in {
        frontend::copy_fail(&mut extra, "client disconnected");
        link.copy_in = false;
    }
    let was_running = !link.expect.is_empty();
    if link.unsynced {
        if !link.skipping {
            // A Sync would commit the implicit transaction the client's
            // Executes opened, which the client never did. ROLLBACK, run
            // as an extended-protocol statement, aborts it first (and ends an
            // explicit block too). After an error the server skips it, and
            // the Sync ends the failed transaction anyway.
            frontend::parse_raw(&mut extra, b"", b"ROLLBACK\0\0\0");
            frontend::bind_unnamed(&mut extra);
            frontend::execute_unnamed(&mut extra);
            link.expect.push_back(Expect::Parse { forward: false, statement: None, client_name: None });
            link.expect.push_back(Expect::Bind { statement: None });
            link.expect.push_back(Expect::Execute);
        }
        frontend::sync(&mut extra);
        link.pending_ready += 1;
        link.expect.push_back(Expect::SYNC);
        link.unsynced = false;
    }
    backend.to_server.extend_from_slice(&extra);
    backend.stream.write_all(&backend.to_server).await?;
    backend.to_server.clear();
    link.client_ready = 0;
    // Whatever was scanned but not delivered is for nobody now.
    backend.from_server.advance(link.server_ready);
    link.server_ready = 0;
    // Postgres drops a cancel that arrives while it is between statements, so
    // one sent before the server started the client's last statement (just
    // written) is lost: cancel again, less and less often, while answers are owed.
    let mut next_cancel = was_running.then(tokio::time::Instant::now);
    let mut backoff = Duration::from_millis(20);
    while link.pending_ready > 0 || !link.server_scan.at_boundary() {
        let read = match next_cancel {
            Some(at) => tokio::select! {
                r = backend.stream.read_buf(&mut backend.from_server) => Some(r?),
                () = tokio::time::sleep_until(at) => None,
            },
            None => Some(backend.stream.read_buf(&mut backend.from_server).await?),
        };
        let Some(read) = read else {
            cancel_backend(backend.addr.clone(), backend.pid, backend.secret).await;
            next_cancel = Some(tokio::time::Instant::now() + backoff);
            backoff = (backoff * 2).min(Duration::from_millis(500));
            continue;
        };
        if read == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        link.scan_server(&mut backend.from_server, None, registry, &mut backend.prepared)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
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
    if link.status == msg::IDLE && link.reset_session {
        // The session's own state (LISTEN, locks, temp tables, WITH HOLD
        // cursors, SQL-prepared statements, settings) goes with its client.
        let (err, status) = backend.run_quietly("DISCARD ALL").await?;
        if err.is_some() {
            return Ok(false);
        }
        link.status = status;
        backend.prepared.clear();
        backend.forget_all_changed();
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
pub async fn cancel_backend(addr: ServerAddr, pid: i32, secret: i32) {
    send_cancel(addr.connect(), pid, secret).await
}

/// How a cancel is forwarded to the pgmux peer that issued its key, whose
/// `host:port` is resolved here, at each forward.
pub async fn forward_cancel(addr: &str, pid: i32, secret: i32) {
    send_cancel(async { Ok(crate::net::connect(addr).await?.0) }, pid, secret).await
}

async fn send_cancel(connect: impl Future<Output = std::io::Result<Stream>>, pid: i32, secret: i32) {
    let attempt = async {
        let mut s = connect.await?;
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
