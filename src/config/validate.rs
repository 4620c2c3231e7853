//! Checks that need more than one field, and `env:` password resolution.
//!
//! Messages never include a password value: they may end up in logs.

use std::collections::HashMap;
use std::env::VarError;

use super::locate::{KeyPath, Locator};
use super::{AuthMethod, Config, Listen, MAX_PEER_ID, ServerTlsMode, TlsMode, UserConfig};

pub(super) type Env<'e> = &'e dyn Fn(&str) -> Result<String, VarError>;

/// Returns `(offset, formatted message)` pairs; empty means valid.
pub(super) fn validate(config: &mut Config, loc: &Locator<'_>, env: Env<'_>) -> Vec<(usize, String)> {
    let mut errors = Vec::new();
    let mut err = |path: KeyPath, msg: String| errors.push(loc.error_at(&path, &msg));

    let proxy = &config.proxy;
    let tls_needs_cert = matches!(proxy.tls_mode, TlsMode::Require | TlsMode::Allow);
    match (&proxy.tls_cert, &proxy.tls_key) {
        (Some(_), None) => err(KeyPath::new("proxy").key("tls_key"), "tls_cert is set but tls_key is not".into()),
        (None, Some(_)) => err(KeyPath::new("proxy").key("tls_cert"), "tls_key is set but tls_cert is not".into()),
        (None, None) if tls_needs_cert => {
            let mode = if proxy.tls_mode == TlsMode::Require { "require" } else { "allow" };
            err(KeyPath::new("proxy").key("tls_mode"), format!("tls_mode = \"{mode}\" needs tls_cert and tls_key"));
        }
        _ => {}
    }
    if proxy.server_tls == ServerTlsMode::VerifyFull && proxy.server_tls_ca.is_none() {
        err(
            KeyPath::new("proxy").key("server_tls"),
            "server_tls = \"verify-full\" needs server_tls_ca (the CA that signed the servers' certificates)".into(),
        );
    }
    // A poll longer than this outlasts any sleep it could save; a typo
    // ("100ms" for "100us") would keep a core busy for nothing.
    if proxy.idle_poll > std::time::Duration::from_millis(1) {
        err(KeyPath::new("proxy").key("idle_poll"), "must be from 0 (off) to 1ms, e.g. \"100us\"".into());
    }
    if proxy.server_tcp_keepalive {
        // The kernel takes whole seconds, at least one, and at most 127 probes.
        for (key, d) in [
            ("server_tcp_keepalive_idle", proxy.server_tcp_keepalive_idle),
            ("server_tcp_keepalive_interval", proxy.server_tcp_keepalive_interval),
        ] {
            if d < std::time::Duration::from_secs(1) || d.subsec_nanos() != 0 || d.as_secs() > 32767 {
                err(KeyPath::new("proxy").key(key), "must be a whole number of seconds from 1s to 32767s".into());
            }
        }
        if !(1..=127).contains(&proxy.server_tcp_keepalive_count) {
            err(KeyPath::new("proxy").key("server_tcp_keepalive_count"), "must be from 1 to 127".into());
        }
    }
    match (&proxy.listen, &proxy.unix_socket_dir) {
        (Listen::Unix(_), Some(_)) => err(
            KeyPath::new("proxy").key("unix_socket_dir"),
            "adds a Unix socket beside a TCP listen; listen is a Unix socket already".into(),
        ),
        (Listen::Tcp(a), Some(dir)) => {
            if let Err(e) = super::addr::socket_path(dir.join(format!(".s.PGSQL.{}", a.port()))) {
                err(KeyPath::new("proxy").key("unix_socket_dir"), e);
            }
        }
        _ => {}
    }
    if proxy.so_reuseport && matches!(proxy.listen, Listen::Unix(_)) {
        err(
            KeyPath::new("proxy").key("so_reuseport"),
            "shares a TCP port between processes; listen is a Unix socket, which one process owns".into(),
        );
    }
    if proxy.peer_listen.is_some_and(|a| Some(a) == proxy.listen.tcp()) {
        err(
            KeyPath::new("proxy").key("peer_listen"),
            "must differ from listen: it is this instance's own address, never shared".into(),
        );
    }
    peering(config, &mut err);
    // tokio's interval() panics on a zero period, and polling in a busy loop is never intended.
    if config.routing.monitor_interval.is_zero() {
        err(KeyPath::new("routing").key("monitor_interval"), "must be greater than 0".into());
    }

    // An empty or truncated file must not start a proxy that serves nothing,
    // nor (through a reload) turn a running one into it.
    if config.databases.is_empty() {
        err(KeyPath::new("databases"), "no [[databases]] entry: there is nothing to serve".into());
    }
    if config.users.is_empty() {
        err(KeyPath::new("users"), "no [[users]] entry: no client could log in".into());
    }

    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, db) in config.databases.iter().enumerate() {
        let path = KeyPath::new("databases").index(i);
        if let Some(first) = seen.insert(&db.name, i) {
            let (line, _) = loc.line_col(loc.offset_of(&KeyPath::new("databases").index(first).key("name")));
            err(
                path.clone().key("name"),
                format!("duplicate database name {:?} (first defined on line {line})", db.name),
            );
        }
        match (db.primary.is_empty(), db.hosts.is_empty()) {
            (true, true) => {
                err(path.clone().key("primary"), "missing required key (or `hosts`, the list of every node)".into())
            }
            (false, false) => err(
                path.clone().key("hosts"),
                "give either `hosts` (roles discovered) or `primary` and `replicas`, not both".into(),
            ),
            (true, false) if !db.replicas.is_empty() => err(
                path.clone().key("replicas"),
                "`hosts` lists every node: put the replicas there too (roles are discovered)".into(),
            ),
            _ => {}
        }
        if db.pool_size == 0 {
            err(path.clone().key("pool_size"), "must be at least 1".into());
        } else if db.min_pool_size > db.pool_size {
            err(
                path.clone().key("min_pool_size"),
                format!("min_pool_size ({}) is larger than pool_size ({})", db.min_pool_size, db.pool_size),
            );
        }
    }

    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, user) in config.users.iter_mut().enumerate() {
        let path = KeyPath::new("users").index(i);
        if let Some(first) = seen.insert(user.name.clone(), i) {
            let (line, _) = loc.line_col(loc.offset_of(&KeyPath::new("users").index(first).key("name")));
            err(
                path.clone().key("name"),
                format!("duplicate user name {:?} (first defined on line {line})", user.name),
            );
        }
        for (key, secret) in [("password", &mut user.password), ("server_password", &mut user.server_password)] {
            if let Err(msg) = resolve_secret(secret, env) {
                err(path.clone().key(key), msg);
            }
        }
        if let Err((key, msg)) = check_user_auth(user) {
            err(path.clone().key(key), msg);
        }
    }

    for (i, name) in config.admin.users.iter().enumerate() {
        if !seen.contains_key(name) {
            err(KeyPath::new("admin").key("users").index(i), format!("user {name:?} is not defined in [[users]]"));
        }
    }

    // The auth_user logs in to Postgres itself: it needs a plaintext password.
    let auth_users = std::iter::once((KeyPath::new("proxy").key("auth_user"), config.proxy.auth_user.as_deref()))
        .chain(
            config
                .databases
                .iter()
                .enumerate()
                .map(|(i, d)| (KeyPath::new("databases").index(i).key("auth_user"), d.auth_user.as_deref())),
        );
    for (path, name) in auth_users {
        let Some(name) = name else { continue };
        match config.users.iter().find(|u| u.name == name) {
            None => err(path, format!("user {name:?} is not defined in [[users]]")),
            Some(u) if u.backend_password().is_none() => err(
                path,
                format!("user {name:?} runs auth_query on Postgres and needs a plaintext password or server_password"),
            ),
            Some(_) => {}
        }
    }

    errors
}

/// `[proxy] peer_id` and `[[peers]]`: ids in range and unique, none this
/// instance's own, and a list only when this instance has an id (a peer
/// forwards a cancel by the id in its key, which only an id'd instance issues).
fn peering(config: &Config, err: &mut impl FnMut(KeyPath, String)) {
    let own = config.proxy.peer_id;
    if own > MAX_PEER_ID {
        err(KeyPath::new("proxy").key("peer_id"), format!("must be from 0 (peering off) to {MAX_PEER_ID}"));
    }
    if own == 0 && !config.peers.is_empty() {
        err(
            KeyPath::new("proxy").key("peer_id"),
            "[[peers]] needs this instance's own peer_id (1 to 16383): cancel keys must name the instance that issued them"
                .into(),
        );
    }
    let mut seen: HashMap<u32, usize> = HashMap::new();
    for (i, peer) in config.peers.iter().enumerate() {
        let path = KeyPath::new("peers").index(i).key("id");
        if !(1..=MAX_PEER_ID).contains(&peer.id) {
            err(path, format!("must be from 1 to {MAX_PEER_ID}"));
        } else if peer.id == own {
            err(path, format!("{} is this instance's own [proxy] peer_id: list only the other instances", peer.id));
        } else if let Some(first) = seen.insert(peer.id, i) {
            err(path, format!("duplicate peer id {} (first in peers[{first}])", peer.id));
        }
    }
}

/// Replaces `env:VAR` with the variable's value.
fn resolve_secret(secret: &mut Option<String>, env: Env<'_>) -> Result<(), String> {
    let Some(value) = secret.as_deref() else { return Ok(()) };
    if let Some(var) = value.strip_prefix("env:") {
        if var.is_empty() {
            return Err("\"env:\" needs a variable name, e.g. \"env:PGMUX_APP_PASSWORD\"".into());
        }
        let resolved = match env(var) {
            Ok(v) => v,
            Err(VarError::NotPresent) => return Err(format!("environment variable {var} is not set")),
            Err(VarError::NotUnicode(_)) => return Err(format!("environment variable {var} is not valid UTF-8")),
        };
        if resolved.is_empty() {
            return Err(format!("environment variable {var} is empty"));
        }
        *secret = Some(resolved);
    } else if value.is_empty() {
        // Postgres refuses empty passwords, so this can only be a mistake.
        return Err("must not be empty (omit it instead)".into());
    }
    Ok(())
}

/// Combinations of `auth` and password forms that can never authenticate.
fn check_user_auth(user: &UserConfig) -> Result<(), (&'static str, String)> {
    let password = user.password.as_deref();
    let is_scram = |p: &str| p.starts_with("SCRAM-SHA-256$");
    match (user.auth, password) {
        (AuthMethod::Trust, _) => {}
        (auth, None) => {
            let auth = if auth == AuthMethod::Md5 { "md5" } else { "scram-sha-256" };
            return Err(("password", format!("required with auth = \"{auth}\" (or set auth = \"trust\")")));
        }
        (AuthMethod::Md5, Some(p)) if is_scram(p) => {
            return Err((
                "auth",
                "auth = \"md5\" cannot work with a SCRAM-SHA-256 verifier as password; \
                 use auth = \"scram-sha-256\" or a plaintext/md5 password"
                    .into(),
            ));
        }
        (AuthMethod::ScramSha256, Some(p)) if super::is_md5_hash(p) => {
            return Err((
                "auth",
                "auth = \"scram-sha-256\" cannot work with an md5 hash as password; \
                 use auth = \"md5\" or a plaintext/SCRAM-SHA-256 password"
                    .into(),
            ));
        }
        _ => {}
    }
    if user.server_password.as_deref().is_some_and(is_scram) {
        return Err((
            "server_password",
            "a SCRAM-SHA-256 verifier cannot be used to log in to Postgres; give the plaintext password".into(),
        ));
    }
    Ok(())
}
