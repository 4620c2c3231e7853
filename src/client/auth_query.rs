//! Users not listed in proxy.toml, looked up in Postgres: the database's
//! `auth_query`, run as its `auth_user` on pgmux's own connection (never a
//! client's session), with the client's user name as a bound parameter.

use std::time::Duration;

use super::*;
use crate::config::{AuthMethod, DatabaseConfig, UserConfig, is_md5_hash};

/// How long a lookup may take before the login fails (a server that does
/// not answer must not hold logins until the login timeout).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// The stored secret of `user` on `db`, from the cache or the server:
/// `Ok(None)` when there is no usable one (unknown role, no password,
/// `VALID UNTIL` passed, cannot log in). `Err` when the lookup itself failed.
pub(super) async fn secret(
    shared: &Shared,
    config: &Settings,
    db: &DatabaseConfig,
    auth_user: &UserConfig,
    query: &str,
    user: &str,
) -> Result<(Option<String>, bool), String> {
    if let Some(cached) = shared.auth_cache.get(&db.name, user, config.proxy.auth_cache_ttl) {
        return Ok((cached, true));
    }
    let pool = shared.pools.auth_pool(config, db, auth_user);
    if let Some(t) =
        super::route::topology(shared, config, db, || super::route::monitor_login(config, db, auth_user, None, true))
    {
        pool.follow(t.leader.clone());
    }
    let lookup = async {
        let mut backend = pool.checkout().await.map_err(|e| e.to_string())?;
        match backend.query_row_params(query, &[user]).await {
            Ok((row, None)) => {
                backend.release(Release::Clean(Instant::now()));
                // One column (the secret), or PgBouncer's shape: (name, secret).
                Ok(row.and_then(|mut r| if r.len() >= 2 { r.swap_remove(1) } else { r.into_iter().next().flatten() }))
            }
            Ok((_, Some(e))) => {
                backend.release(Release::Clean(Instant::now()));
                Err(format!("auth_query failed: {}", e.message))
            }
            Err(e) => {
                backend.release(Release::Close(CloseReason::Dead));
                Err(format!("auth_query failed: {e}"))
            }
        }
    };
    let secret =
        tokio::time::timeout(LOOKUP_TIMEOUT, lookup).await.map_err(|_| "auth_query timed out".to_owned())??;
    shared.auth_cache.put(&db.name, user, secret.clone());
    Ok((secret, false))
}

/// The user a looked-up secret describes: SCRAM for a verifier, md5 for an
/// md5 hash; anything else (or nothing) fails the exchange like a wrong
/// password, as Postgres does for a role it cannot authenticate.
pub(super) fn user_with(name: &str, secret: Option<String>) -> UserConfig {
    let mut user = UserConfig::looked_up(name);
    match secret {
        Some(s) if s.starts_with("SCRAM-SHA-256$") => user.password = Some(s),
        Some(s) if is_md5_hash(&s) => {
            user.password = Some(s);
            user.auth = AuthMethod::Md5;
        }
        // A plaintext password stored in Postgres (password_encryption off,
        // long gone) or a malformed value: unusable.
        _ => {}
    }
    user
}
