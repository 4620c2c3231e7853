//! From an accepted connection to a session: startup, TLS, authentication,
//! the pool, and the greeting.

use super::*;
use crate::config::UserConfig;

/// What a successful login leads to.
pub(super) enum Login {
    /// A pooled session on a configured database.
    /// `server_params` are the server's defaults, announced in the greeting
    /// (kept out of `Session`, which every idle client carries).
    Pooled { session: Box<Session>, server_params: crate::pool::ServerParams, user: String, database: String },
    /// The admin console (database `pgmux` or `pgbouncer`, an `[admin] users` member).
    Admin { user: String, database: String },
    /// The client asked for TLS and got `S`: handshake, then log in again over TLS.
    StartTls,
}

/// A logged-in pooled client, ready for its session.
/// A greeted pooled client, ready for its session; its cancel key is
/// registered while the tuple (the key) lives.
pub(super) type Established<'a> = (Stream, BytesMut, Box<Session>, Arc<Settings>, CancelKey<'a>);

/// Startup, TLS, authentication and the greeting, up to a pooled session (`None` when the
/// connection ended, or was an admin console session, served here).
pub(super) async fn establish<'a>(
    accepted: Box<Accepted>,
    shared: &'a Shared,
    info: &Arc<ClientInfo>,
) -> std::io::Result<Option<Established<'a>>> {
    let mut stream = accepted.stream;
    if let Some(tcp) = stream.tcp() {
        let _ = tcp.set_nodelay(true);
    }
    let config = shared.config();
    let mut buf = BytesMut::new();
    let deadline = tokio::time::Instant::now() + LOGIN_TIMEOUT;
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
                }
                s
            }
            Ok(Err(e)) => {
                tracing::info!(client = info.id, peer = ?info.peer(), error = %e, "client TLS handshake failed");
                return Ok(None);
            }
            Err(_) => {
                tracing::info!(client = info.id, peer = ?info.peer(), "client did not finish the TLS handshake in time");
                return Ok(None);
            }
        };
    };
    let (session, server_params, user, database) = match login {
        Ok(Ok(Some(Login::Pooled { session, server_params, user, database }))) => {
            (session, server_params, user, database)
        }
        Ok(Ok(Some(Login::Admin { user, database }))) => {
            tracing::info!(client = info.id, peer = ?info.peer(), user = %user, "admin console login");
            info.logged_in(&user, &database, "", &stream.tls_description().unwrap_or_default(), None);
            crate::admin::serve(&mut stream, buf, shared, info).await?;
            return Ok(None);
        }
        Ok(Ok(None)) => return Ok(None),
        Ok(Ok(Some(Login::StartTls))) => unreachable!("handled above"),
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            tracing::info!(client = info.id, peer = ?info.peer(), "client did not finish login in time");
            fatal(&mut stream, SqlState::PROTOCOL_VIOLATION, "login timed out").await?;
            return Ok(None);
        }
    };
    tracing::info!(client = info.id, peer = ?info.peer(), user = %user, database = %database, "client logged in");
    let app = session.params.get("application_name").unwrap_or_default();
    // The names live here only (not in the session as well): SHOW CLIENTS and the PAUSE gate read them.
    let tls = stream.tls_description().unwrap_or_default();
    info.logged_in(&user, &database, app, &tls, Some(session.pool.clone()));
    // The login buffer shares its allocation with the startup packet's
    // pieces: an idle client keeps neither unless a request already follows.
    let buf = if buf.is_empty() { BytesMut::new() } else { buf };
    let key = shared.cancels.issue(info);
    greet(&mut stream, &session, &server_params, &key).await?;
    let stream = stream.adopt_uring()?;
    Ok(Some((stream, buf, session, config, key)))
}

/// AuthenticationOk, the session's parameters, the cancel key, ReadyForQuery.
async fn greet(
    stream: &mut Stream,
    session: &Session,
    server_params: &[(String, String)],
    key: &CancelKey<'_>,
) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    msg::authentication_ok(&mut out);
    for (k, v) in session.params.announce(server_params) {
        msg::parameter_status(&mut out, &k, &v);
    }
    msg::backend_key_data(&mut out, key.pid, key.secret);
    msg::ready_for_query(&mut out, msg::IDLE);
    stream.write_all(&out).await
}

/// Startup and authentication. `Ok(None)` means the connection ended cleanly
/// (cancel request served, client gone, or an error already sent).
pub(super) async fn login(
    stream: &mut Stream,
    buf: &mut BytesMut,
    shared: &Shared,
    config: &Settings,
    info: &ClientInfo,
) -> std::io::Result<Option<Login>> {
    let (client, peer) = (info.id, info.peer());
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
                // As Postgres: never over a Unix-domain socket.
                let offer_tls = matches!(packet, StartupPacket::SslRequest)
                    && !stream.is_unix()
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
                super::cancel::cancel(shared, config, client, pid, secret).await;
                return Ok(None);
            }
            StartupPacket::Startup(s) => break s,
        }
    };
    if config.proxy.tls_mode == TlsMode::Require && !stream.is_tls() && !stream.is_unix() {
        // Like a `hostssl`-only pg_hba.conf: plaintext logins over TCP are
        // refused (a `local` line's Unix socket never carries TLS).
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
    // Who the client says it is: a user of proxy.toml, one the database's
    // auth_query finds, or nobody. Nobody still runs the whole exchange and
    // fails it as a wrong password would: the answer and its timing tell
    // nothing about which names exist.
    let resolved = config.resolve(&database);
    let lookup = match config.user(user_name) {
        Some(_) => None,
        None => resolved.as_deref().and_then(|db| Some((db, config.auth_lookup(db)?))),
    };
    let (looked_up, cached) = match lookup {
        None => (None, false),
        Some((db, (auth_user, query))) => {
            match auth_query::secret(shared, config, db, auth_user, query, user_name).await {
                Ok((secret, cached)) => (Some(auth_query::user_with(user_name, secret)), cached),
                Err(e) => {
                    tracing::warn!(client, database = %db.name, user = %user_name, error = %e, "auth_query lookup failed");
                    let text = format!("authentication lookup for user \"{user_name}\" failed");
                    fatal(stream, SqlState::CONNECTION_FAILURE, &text).await?;
                    return Ok(None);
                }
            }
        }
    };
    let unknown;
    let user = match (config.user(user_name), &looked_up) {
        (Some(u), _) => u,
        (None, Some(u)) => u,
        (None, None) => {
            unknown = UserConfig::looked_up(user_name);
            &unknown
        }
    };
    let known = config.user(user_name).is_some() || looked_up.is_some();
    // A cached md5 hash that fails the response is fetched again once, and
    // the same response checked against the current one.
    let fresh = || async {
        let (db, (auth_user, query)) = lookup.filter(|_| cached)?;
        shared.auth_cache.forget(&db.name, user_name);
        auth_query::secret(shared, config, db, auth_user, query, user_name).await.ok()?.0
    };
    let verdict = match crate::auth::authenticate_client_rechecked(
        stream,
        buf,
        user,
        &config.verifier(&user.name),
        fresh,
    )
    .await
    {
        // An unknown user has no secret: its exchange cannot succeed. Should it
        // ever, it is refused all the same.
        Ok(_) if !known => Err(crate::auth::AuthError::Failed { user: user_name.to_owned(), reason: "no such user" }),
        other => other,
    };
    let proved = match verdict {
        Ok(proved) => proved,
        Err(e) => {
            if e.is_client_gone() {
                return Ok(None);
            }
            if cached {
                // The password may have changed in Postgres since: the next login looks again.
                shared.auth_cache.forget(&database, user_name);
            }
            tracing::info!(client, ?peer, user = %user.name, error = %e, "authentication failed");
            shared.stats.auth_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            fatal(stream, e.sqlstate(), &e.message()).await?;
            return Ok(None);
        }
    };
    // How pgmux logs in to Postgres as this user: the configured password,
    // or for a looked-up user what the client's login just proved.
    let credential = match &looked_up {
        Some(_) => proved,
        None => user.backend_password().map(|p| crate::auth::Credential::Password(p.to_owned())),
    };
    // The console's names win over the wildcard, not over a database listed by name.
    if crate::admin::is_console(&database) && config.database(&database).is_none() {
        if !config.admin.users.iter().any(|u| u == &user.name) {
            tracing::info!(client, ?peer, user = %user.name, "admin console refused: not an [admin] user");
            let text = format!("user \"{}\" is not allowed on the admin console", user.name);
            fatal(stream, SqlState::INVALID_AUTHORIZATION, &text).await?;
            return Ok(None);
        }
        return Ok(Some(Login::Admin { user: user.name.clone(), database }));
    }
    let Some(db) = resolved.as_deref() else {
        tracing::info!(client, ?peer, database = %database, "login refused: unknown database");
        let text = format!("database \"{database}\" does not exist");
        fatal(stream, SqlState::INVALID_CATALOG_NAME, &text).await?;
        return Ok(None);
    };
    if shared.disabled.is_disabled(&db.name) {
        tracing::info!(client, ?peer, database = %db.name, "login refused: database disabled");
        let text = format!("database \"{}\" is not currently accepting connections", db.name);
        fatal(stream, SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE, &text).await?;
        return Ok(None);
    }
    // Postgres's own words and SQLSTATE for datconnlimit and rolconnlimit.
    let max_db = db.max_db_client_connections.unwrap_or(config.proxy.max_db_client_connections);
    let counted = match shared.client_caps.admit(&db.name, max_db, &user.name, config.proxy.max_user_client_connections)
    {
        Ok(c) => c,
        Err(exceeded) => {
            let text = match exceeded {
                crate::live::client_caps::Exceeded::Database => {
                    format!("too many connections for database \"{}\"", db.name)
                }
                crate::live::client_caps::Exceeded::User => format!("too many connections for role \"{}\"", user.name),
            };
            tracing::info!(client, ?peer, database = %db.name, user = %user.name, "login refused: {text}");
            fatal(stream, SqlState::TOO_MANY_CONNECTIONS, &text).await?;
            return Ok(None);
        }
    };
    let pool = shared.pools.get_or_create(config, db, user);
    if let (Some(_), Some(c)) = (&looked_up, &credential) {
        pool.set_passthrough(c.clone());
    }
    // Several nodes: the pool follows whichever is the primary now.
    let topology = route::topology(shared, config, db, || {
        route::monitor_login(config, db, user, credential.as_ref(), looked_up.is_some())
    });
    if let Some(t) = &topology {
        pool.follow(t.leader.clone());
    }
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
    // A bad value of a startup option is FATAL, as from Postgres.
    for name in [crate::routing::token::READ_AFTER, crate::routing::token::WRITE_TOKEN] {
        if let Some(message) = params.get(name).and_then(|v| crate::routing::token::check(name, v)) {
            fatal(stream, SqlState::INVALID_PARAMETER_VALUE, &message).await?;
            return Ok(None);
        }
    }
    Ok(Some(Login::Pooled {
        session: Box::new(Session {
            force_primary: None,
            lost: None,
            retries: 0,
            routing: SessionRouting::new(
                shared,
                config,
                db,
                user,
                credential.as_ref(),
                looked_up.is_some(),
                topology.as_ref(),
            )
            .map(Box::new),
            statements: ClientStatements::default(),
            mode: config.pool_mode(db),
            pool,
            params,
            _counted: counted,
        }),
        server_params,
        user: user.name.clone(),
        database,
    }))
}
