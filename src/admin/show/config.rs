//! SHOW CONFIG: pgmux's `[proxy]` and `[routing]` settings under their
//! proxy.toml names, then, under PgBouncer's names, those whose meaning
//! PgBouncer shares (what monitoring tools written for PgBouncer read, e.g.
//! `max_client_conn`), in PgBouncer's formats.

use std::time::Duration;

use super::{ResultSet, Spec, row};
use crate::config::Config;
use crate::config::values::{config_values, mode_str, server_tls_mode, tls_mode};
use crate::live::Shared;

/// PgBouncer 1.25 `admin_show_config`.
pub(super) const CONFIG: Spec = Spec { types: "ssss", names: &["key", "value", "default", "changeable"] };

/// PgBouncer-named keys only a restart changes, besides pgmux's own
/// [`crate::config::RESTART_ONLY`]; a reload (SIGHUP, RELOAD) applies the rest.
const RESTART_ONLY: &[&str] = &["listen_addr", "listen_port", "peer_id", "so_reuseport", "stats_period"];

/// PgBouncer settings pgmux has no knob for, shown with the value that
/// describes pgmux: no per-database or per-user server connection cap (0 is
/// PgBouncer's "unlimited"). Never changeable.
const FIXED: &[&str] = &["max_db_connections", "max_user_connections", "stats_period"];

/// `key, value, default, changeable` for every `[proxy]` and `[routing]`
/// key, then the PgBouncer-named ones.
pub fn config(shared: &Shared) -> ResultSet {
    let mut rs = ResultSet::new(&[&CONFIG]);
    let config = shared.config();
    let defaults = Config::default();
    let current = config_values(&config).into_iter().chain(pgbouncer_values(&config));
    let default = config_values(&defaults).into_iter().chain(pgbouncer_values(&defaults));
    for ((key, value), (_, default)) in current.zip(default) {
        let restart = match key.strip_prefix("proxy.") {
            Some(k) => crate::config::RESTART_ONLY.contains(&k),
            None => RESTART_ONLY.contains(&key),
        };
        let changeable = !restart && !FIXED.contains(&key);
        rs.push(row!(key, value, default, if changeable { "yes" } else { "no" }));
    }
    rs
}

/// Seconds as PgBouncer prints a time setting (C's `%g`: `120`, `0.5`).
fn seconds(d: Duration) -> String {
    format!("{}", d.as_secs_f64())
}

/// Settings under PgBouncer's names, alphabetical as PgBouncer lists them.
/// Every one is listed by hand, with pgmux's value in PgBouncer's format.
fn pgbouncer_values(c: &Config) -> Vec<(&'static str, String)> {
    let p = &c.proxy;
    let path = |p: &Option<std::path::PathBuf>| p.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
    vec![
        ("admin_users", c.admin.users.join(",")),
        ("client_tls_cert_file", path(&p.tls_cert)),
        ("client_tls_key_file", path(&p.tls_key)),
        ("client_tls_sslmode", tls_mode(p.tls_mode).into()),
        ("idle_transaction_timeout", seconds(p.idle_transaction_timeout)),
        ("listen_addr", p.listen.tcp().map(|a| a.ip().to_string()).unwrap_or_default()),
        ("listen_port", p.listen.port().to_string()),
        ("max_client_conn", p.max_client_conn.to_string()),
        ("max_db_connections", "0".into()),
        ("max_prepared_statements", p.max_prepared_statements.to_string()),
        ("max_user_connections", "0".into()),
        ("peer_id", p.peer_id.to_string()),
        ("pool_mode", mode_str(p.pool_mode).into()),
        ("query_timeout", seconds(p.query_timeout)),
        ("query_wait_timeout", seconds(p.query_wait_timeout)),
        ("server_connect_timeout", seconds(p.server_connect_timeout)),
        ("server_idle_timeout", seconds(p.server_idle_timeout)),
        ("server_lifetime", seconds(p.server_lifetime)),
        ("server_tls_ca_file", path(&p.server_tls_ca)),
        ("server_tls_sslmode", server_tls_mode(p.server_tls).into()),
        ("so_reuseport", u8::from(p.so_reuseport).to_string()),
        ("stats_period", super::STATS_PERIOD.as_secs().to_string()),
        ("unix_socket_dir", unix_socket_dir(p)),
        ("unix_socket_group", p.unix_socket_group.clone().unwrap_or_default()),
        ("unix_socket_mode", format!("{:04o}", p.unix_socket_mode)),
    ]
}

/// The directory clients find pgmux's socket in: `unix_socket_dir`, or that of a Unix `listen`.
fn unix_socket_dir(p: &crate::config::ProxyConfig) -> String {
    match (&p.unix_socket_dir, &p.listen) {
        (Some(dir), _) => dir.display().to_string(),
        (None, crate::config::Listen::Unix(path)) => path.parent().map(|d| d.display().to_string()).unwrap_or_default(),
        (None, crate::config::Listen::Tcp(_)) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pgbouncer_names_carry_pgbouncer_formats() {
        let c = Config {
            proxy: toml::from_str("query_wait_timeout = \"500ms\"\nmax_client_conn = 77").unwrap(),
            ..Config::default()
        };
        let values = pgbouncer_values(&c);
        let get = |k: &str| values.iter().find(|(key, _)| *key == k).map(|(_, v)| v.as_str());
        assert_eq!(get("query_wait_timeout"), Some("0.5"));
        assert_eq!(get("max_client_conn"), Some("77"));
        assert_eq!(get("max_user_connections"), Some("0"));
        let keys: Vec<&str> = values.iter().map(|(k, _)| *k).collect();
        assert!(keys.is_sorted(), "{keys:?}");
        assert_eq!(pgbouncer_values(&Config::default()).len(), keys.len());
    }
}
