//! Hot reload (SIGHUP, admin `RELOAD`): what a new `proxy.toml` changes, and
//! when each change takes effect. [`crate::live::Shared::reload`] runs it.
//!
//! - At once, for existing pools (the primaries' and the replicas'): `pool_size`, `min_pool_size`,
//!   `query_wait_timeout`, `server_lifetime`, `server_idle_timeout`,
//!   `server_connect_timeout`, `max_prepared_statements`, and a user's
//!   `server_password` for new server connections. Growing a pool hands the
//!   new slots to waiting clients; shrinking closes surplus idle server
//!   connections now and busy ones when their transaction ends.
//! - At once, for the serving threads' next wait: `idle_poll`.
//! - A database's `primary` or `dbname` changed: the pool's server
//!   connections to the old target close (idle ones now, busy ones when they
//!   come back); its clients, old and new, are served by the new target.
//! - A database or user removed: new logins are refused; clients already
//!   connected keep working, each transaction on a fresh server connection
//!   that closes after it; the pool is gone once they leave.
//! - New logins: users and passwords, databases added, `pool_mode`,
//!   `idle_transaction_timeout`, `on_session_state`, `[admin] users`.
//!   A client keeps the values it logged in with.
//! - New connections: `max_client_conn` (nobody is disconnected).
//! - `shutdown_timeout`: read when a shutdown begins.
//! - A replica removed from `replicas`: its pools retire like a removed
//!   database's, and it takes no more reads, even from clients that
//!   logged in before. A replica added serves clients that log in after.
//! - `[routing]`, TLS keys: swapped in with the rest.
//! - `[[peers]]`: the next cancel request forwarded uses the new list.
//! - `[proxy] listen`, `metrics_listen`, `peer_listen`, `so_reuseport`,
//!   `peer_id`, `workers`: need a restart; the old values stay (and
//!   `SHOW CONFIG` keeps showing them).

use std::path::Path;

use crate::config::{Config, ConfigError, DatabaseConfig, UserConfig, diff_requires_restart};
use crate::settings::Settings;

/// A successful reload's report.
#[derive(Debug, Default)]
pub struct Reloaded {
    /// One line per changed setting, `key: old -> new` (never a password).
    pub changes: Vec<String>,
    /// Keys changed in the file that only a restart applies; not applied.
    pub needs_restart: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("pgmux was started without a configuration file; there is nothing to reload")]
    NoConfigFile,
    /// The file could not be read or is invalid; the message names file, line and key.
    #[error("configuration not reloaded: {0}")]
    Invalid(#[from] ConfigError),
    /// A TLS certificate, key or CA file could not be loaded.
    #[error("configuration not reloaded: TLS: {0}")]
    Tls(String),
}

/// Loads and validates `path` and compares it with `old`. The returned
/// config keeps `old`'s values of the settings that need a restart.
pub fn prepare(old: &Config, path: &Path) -> Result<(Settings, Reloaded), ReloadError> {
    let mut new = Config::load(path)?;
    let (was, wanted) = (crate::config::values::config_values(old), crate::config::values::config_values(&new));
    let value = |values: &[(&str, String)], key: &str| {
        values.iter().find(|(k, _)| *k == key).map_or("unset".to_owned(), |(_, v)| shown(v).to_owned())
    };
    let needs_restart = diff_requires_restart(old, &new)
        .into_iter()
        .map(|key| {
            let (was, wanted) = (value(&was, key), value(&wanted, key));
            format!("{key} changed to {wanted} but needs a restart; still {was}")
        })
        .collect();
    new.keep_restart_settings(old);
    let changes = changes(old, &new);
    let new = Settings::build(new).map_err(ReloadError::Tls)?;
    Ok((new, Reloaded { changes, needs_restart }))
}

/// What differs between two configurations, one line per setting. Users'
/// passwords are reported as changed, never shown.
pub fn changes(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let before = crate::config::values::config_values(old);
    let after = crate::config::values::config_values(new);
    for ((key, a), (_, b)) in before.into_iter().zip(after) {
        if a != b {
            out.push(format!("{key}: {} -> {}", shown(&a), shown(&b)));
        }
    }
    if old.admin.users != new.admin.users {
        out.push(format!("admin.users: {:?} -> {:?}", old.admin.users, new.admin.users));
    }
    if old.peers != new.peers {
        let peers = |c: &Config| c.peers.iter().map(|p| format!("{}={}", p.id, p.addr)).collect::<Vec<_>>().join(", ");
        out.push(format!("peers: [{}] -> [{}]", peers(old), peers(new)));
    }
    for db in &old.databases {
        match new.database(&db.name) {
            None => out.push(format!("databases.{}: removed", db.name)),
            Some(n) => database_changes(db, n, &mut out),
        }
    }
    for db in new.databases.iter().filter(|d| old.database(&d.name).is_none()) {
        out.push(format!("databases.{}: added", db.name));
    }
    for user in &old.users {
        match new.user(&user.name) {
            None => out.push(format!("users.{}: removed", user.name)),
            Some(n) => user_changes(user, n, &mut out),
        }
    }
    for user in new.users.iter().filter(|u| old.user(&u.name).is_none()) {
        out.push(format!("users.{}: added", user.name));
    }
    out
}

fn shown(v: &str) -> &str {
    if v.is_empty() { "unset" } else { v }
}

fn database_changes(old: &DatabaseConfig, new: &DatabaseConfig, out: &mut Vec<String>) {
    let name = &old.name;
    let mut field = |key: &str, a: String, b: String| {
        if a != b {
            out.push(format!("databases.{name}.{key}: {a} -> {b}"));
        }
    };
    field("primary", old.primary.clone(), new.primary.clone());
    field("dbname", old.server_dbname().to_owned(), new.server_dbname().to_owned());
    field("pool_size", old.pool_size.to_string(), new.pool_size.to_string());
    field("min_pool_size", old.min_pool_size.to_string(), new.min_pool_size.to_string());
    let mode = |d: &DatabaseConfig| d.pool_mode.map_or("unset".to_owned(), |m| format!("{m:?}").to_lowercase());
    field("pool_mode", mode(old), mode(new));
    let replicas = |d: &DatabaseConfig| {
        d.replicas.iter().map(|r| format!("{}*{}", r.addr(), r.weight())).collect::<Vec<_>>().join(", ")
    };
    field("replicas", format!("[{}]", replicas(old)), format!("[{}]", replicas(new)));
    let hosts = |d: &DatabaseConfig| {
        d.hosts.iter().map(|r| format!("{}*{}", r.addr(), r.weight())).collect::<Vec<_>>().join(", ")
    };
    field("hosts", format!("[{}]", hosts(old)), format!("[{}]", hosts(new)));
}

fn user_changes(old: &UserConfig, new: &UserConfig, out: &mut Vec<String>) {
    if old.password != new.password {
        out.push(format!("users.{}.password: changed", old.name));
    }
    if old.server_password != new.server_password {
        out.push(format!("users.{}.server_password: changed", old.name));
    }
    if old.auth != new.auth {
        out.push(format!("users.{}.auth: {:?} -> {:?}", old.name, old.auth, new.auth));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[proxy]
listen = "127.0.0.1:6432"
query_wait_timeout = "5s"

[[databases]]
name = "app"
primary = "127.0.0.1:5432"
pool_size = 10

[[databases]]
name = "gone"
primary = "127.0.0.1:5432"

[[users]]
name = "app"
password = "secret-one"
"#;

    #[test]
    fn changes_name_settings_but_never_passwords() {
        let old = Config::parse(BASE, "old.toml").unwrap();
        let text = BASE
            .replace("6432", "7777")
            .replace("\"5s\"", "\"7s\"")
            .replace("pool_size = 10", "pool_size = 3")
            .replace("secret-one", "secret-two")
            .replace("name = \"gone\"", "name = \"new\"");
        let new = Config::parse(&text, "new.toml").unwrap();
        let lines = changes(&old, &new);
        assert!(lines.contains(&"proxy.query_wait_timeout: 5s -> 7s".to_owned()), "{lines:?}");
        assert!(lines.contains(&"databases.app.pool_size: 10 -> 3".to_owned()), "{lines:?}");
        assert!(lines.contains(&"databases.gone: removed".to_owned()), "{lines:?}");
        assert!(lines.contains(&"databases.new: added".to_owned()), "{lines:?}");
        assert!(lines.contains(&"users.app.password: changed".to_owned()), "{lines:?}");
        assert!(!lines.iter().any(|l| l.contains("secret")), "{lines:?}");
    }

    #[test]
    fn restart_settings_are_reported_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.toml");
        let old = Config::parse(BASE, "old.toml").unwrap();
        let text = BASE.replace("6432", "7777").replace(
            "query_wait_timeout = \"5s\"",
            "query_wait_timeout = \"5s\"\nworkers = 2\nso_reuseport = true\npeer_id = 3\npeer_listen = \"127.0.0.1:7778\"",
        );
        std::fs::write(&path, text).unwrap();
        let (new, report) = prepare(&old, &path).unwrap();
        assert_eq!(new.proxy.listen, old.proxy.listen);
        assert_eq!((new.proxy.workers, new.proxy.so_reuseport), (1, false));
        assert_eq!((new.proxy.peer_id, new.proxy.peer_listen), (0, None));
        let restart = &report.needs_restart;
        assert_eq!(restart.len(), 5, "{report:?}");
        assert!(restart[0].contains("proxy.listen changed to 127.0.0.1:7777"), "{report:?}");
        assert!(restart.contains(&"proxy.workers changed to 2 but needs a restart; still 1".to_owned()), "{report:?}");
        assert!(
            restart
                .contains(&"proxy.peer_listen changed to 127.0.0.1:7778 but needs a restart; still unset".to_owned()),
            "{report:?}"
        );
        assert!(report.changes.is_empty(), "{report:?}");
    }

    #[test]
    fn invalid_file_is_an_error_naming_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.toml");
        let old = Config::parse(BASE, "old.toml").unwrap();
        std::fs::write(&path, BASE.replace("pool_size = 10", "pool_size = \"ten\"")).unwrap();
        let e = prepare(&old, &path).unwrap_err().to_string();
        assert!(e.contains("proxy.toml:9:13: databases[0].pool_size"), "{e}");
    }
}
