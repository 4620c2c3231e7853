//! SHOW CONFIG: pgmux's `[proxy]` and `[routing]` settings under their
//! proxy.toml names, then, under PgBouncer's names, those whose meaning
//! PgBouncer shares (what monitoring tools written for PgBouncer read, e.g.
//! `max_client_conn`), in PgBouncer's formats.

use std::time::Duration;

use super::pools::mode_str;
use super::{ResultSet, Spec, row};
use crate::config::{Config, LoadBalance, OnSessionState, ReadYourWrites, ServerTlsMode, StickyScope, TlsMode};
use crate::server::Shared;

/// PgBouncer 1.25 `admin_show_config`.
pub(super) const CONFIG: Spec = Spec { types: "ssss", names: &["key", "value", "default", "changeable"] };

/// Keys only a restart changes; a reload (SIGHUP, RELOAD) applies the rest.
const RESTART_ONLY: &[&str] =
    &["proxy.listen", "proxy.metrics_listen", "proxy.workers", "listen_addr", "listen_port", "stats_period"];

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
        let changeable = !RESTART_ONLY.contains(&key) && !FIXED.contains(&key);
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
        ("listen_addr", p.listen.ip().to_string()),
        ("listen_port", p.listen.port().to_string()),
        ("max_client_conn", p.max_client_conn.to_string()),
        ("max_db_connections", "0".into()),
        ("max_prepared_statements", p.max_prepared_statements.to_string()),
        ("max_user_connections", "0".into()),
        ("pool_mode", mode_str(p.pool_mode).into()),
        ("query_timeout", seconds(p.query_timeout)),
        ("query_wait_timeout", seconds(p.query_wait_timeout)),
        ("server_connect_timeout", seconds(p.server_connect_timeout)),
        ("server_idle_timeout", seconds(p.server_idle_timeout)),
        ("server_lifetime", seconds(p.server_lifetime)),
        ("server_tls_ca_file", path(&p.server_tls_ca)),
        ("server_tls_sslmode", server_tls_mode(p.server_tls).into()),
        ("stats_period", super::STATS_PERIOD.as_secs().to_string()),
    ]
}

fn tls_mode(m: TlsMode) -> &'static str {
    match m {
        TlsMode::Disable => "disable",
        TlsMode::Allow => "allow",
        TlsMode::Require => "require",
    }
}

fn server_tls_mode(m: ServerTlsMode) -> &'static str {
    match m {
        ServerTlsMode::Disable => "disable",
        ServerTlsMode::Prefer => "prefer",
        ServerTlsMode::Require => "require",
        ServerTlsMode::VerifyFull => "verify-full",
    }
}

/// The `[proxy]` and `[routing]` settings as proxy.toml spells them. Every key
/// is listed by hand: a new setting must be added here to be shown. None of
/// these sections holds a password; `[[users]]` is never printed.
pub fn config_values(c: &Config) -> Vec<(&'static str, String)> {
    let p = &c.proxy;
    let r = &c.routing;
    let path = |p: &Option<std::path::PathBuf>| p.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
    vec![
        ("proxy.listen", p.listen.to_string()),
        ("proxy.metrics_listen", p.metrics_listen.map(|a| a.to_string()).unwrap_or_default()),
        ("proxy.workers", p.workers.to_string()),
        ("proxy.pool_mode", mode_str(p.pool_mode).into()),
        ("proxy.max_client_conn", p.max_client_conn.to_string()),
        ("proxy.query_wait_timeout", format_duration(p.query_wait_timeout)),
        ("proxy.idle_transaction_timeout", format_duration(p.idle_transaction_timeout)),
        ("proxy.query_timeout", format_duration(p.query_timeout)),
        ("proxy.max_query_size", p.max_query_size.to_string()),
        ("proxy.server_idle_timeout", format_duration(p.server_idle_timeout)),
        ("proxy.server_lifetime", format_duration(p.server_lifetime)),
        ("proxy.shutdown_timeout", format_duration(p.shutdown_timeout)),
        ("proxy.server_connect_timeout", format_duration(p.server_connect_timeout)),
        ("proxy.server_tcp_keepalive", p.server_tcp_keepalive.to_string()),
        ("proxy.server_tcp_keepalive_idle", format_duration(p.server_tcp_keepalive_idle)),
        ("proxy.server_tcp_keepalive_interval", format_duration(p.server_tcp_keepalive_interval)),
        ("proxy.server_tcp_keepalive_count", p.server_tcp_keepalive_count.to_string()),
        ("proxy.max_prepared_statements", p.max_prepared_statements.to_string()),
        (
            "proxy.on_session_state",
            match p.on_session_state {
                OnSessionState::Pin => "pin",
                OnSessionState::Error => "error",
                OnSessionState::Allow => "allow",
            }
            .into(),
        ),
        ("proxy.tls_cert", path(&p.tls_cert)),
        ("proxy.tls_key", path(&p.tls_key)),
        ("proxy.tls_mode", tls_mode(p.tls_mode).into()),
        ("proxy.server_tls", server_tls_mode(p.server_tls).into()),
        ("proxy.server_tls_ca", path(&p.server_tls_ca)),
        ("routing.read_write_split", r.read_write_split.to_string()),
        (
            "routing.read_your_writes",
            match r.read_your_writes {
                ReadYourWrites::Lsn => "lsn",
                ReadYourWrites::Window => "window",
                ReadYourWrites::Off => "off",
            }
            .into(),
        ),
        ("routing.sticky_window", format_duration(r.sticky_window)),
        (
            "routing.sticky_scope",
            match r.sticky_scope {
                StickyScope::Connection => "connection",
                StickyScope::User => "user",
            }
            .into(),
        ),
        ("routing.max_replica_lag", format_duration(r.max_replica_lag)),
        ("routing.max_replica_lag_bytes", r.max_replica_lag_bytes.map(|b| b.to_string()).unwrap_or_default()),
        (
            "routing.load_balance",
            match r.load_balance {
                LoadBalance::LeastConnections => "least_connections",
                LoadBalance::RoundRobin => "round_robin",
                LoadBalance::Random => "random",
            }
            .into(),
        ),
        ("routing.monitor_interval", format_duration(r.monitor_interval)),
        ("routing.write_functions", r.write_functions.join(",")),
    ]
}

/// A duration in proxy.toml's own syntax, largest exact unit first.
fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        "0".into()
    } else if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_use_config_syntax() {
        assert_eq!(format_duration(Duration::ZERO), "0");
        assert_eq!(format_duration(Duration::from_millis(20)), "20ms");
        assert_eq!(format_duration(Duration::from_secs(90)), "90s");
        assert_eq!(format_duration(Duration::from_secs(600)), "10m");
        assert_eq!(format_duration(Duration::from_secs(3600)), "1h");
    }

    #[test]
    fn config_lists_every_key_with_its_default() {
        let c = Config { proxy: toml::from_str("query_wait_timeout = \"7s\"").unwrap(), ..Config::default() };
        let values = config_values(&c);
        let defaults = config_values(&Config::default());
        assert_eq!(values.len(), defaults.len());
        assert!(values.iter().any(|(k, v)| *k == "proxy.query_wait_timeout" && v == "7s"));
        assert!(defaults.iter().any(|(k, v)| *k == "proxy.query_wait_timeout" && v == "5s"));
    }

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
