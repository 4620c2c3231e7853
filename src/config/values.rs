//! The `[proxy]` and `[routing]` settings as text, as proxy.toml spells
//! them: SHOW CONFIG prints them and a reload reports what changed.

use std::time::Duration;

use super::{Config, LoadBalance, OnSessionState, PoolMode, ReadYourWrites, ServerTlsMode, StickyScope, TlsMode};

pub fn tls_mode(m: TlsMode) -> &'static str {
    match m {
        TlsMode::Disable => "disable",
        TlsMode::Allow => "allow",
        TlsMode::Require => "require",
    }
}

pub fn server_tls_mode(m: ServerTlsMode) -> &'static str {
    match m {
        ServerTlsMode::Disable => "disable",
        ServerTlsMode::Prefer => "prefer",
        ServerTlsMode::Require => "require",
        ServerTlsMode::VerifyFull => "verify-full",
    }
}

pub fn mode_str(m: PoolMode) -> &'static str {
    match m {
        PoolMode::Transaction => "transaction",
        PoolMode::Session => "session",
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
        ("proxy.unix_socket_dir", path(&p.unix_socket_dir)),
        ("proxy.unix_socket_mode", format!("{:04o}", p.unix_socket_mode)),
        ("proxy.unix_socket_group", p.unix_socket_group.clone().unwrap_or_default()),
        ("proxy.metrics_listen", p.metrics_listen.map(|a| a.to_string()).unwrap_or_default()),
        ("proxy.so_reuseport", p.so_reuseport.to_string()),
        ("proxy.peer_listen", p.peer_listen.map(|a| a.to_string()).unwrap_or_default()),
        ("proxy.peer_id", p.peer_id.to_string()),
        ("proxy.workers", p.workers.to_string()),
        ("proxy.idle_poll", format_duration(p.idle_poll)),
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
        ("proxy.auth_user", p.auth_user.clone().unwrap_or_default()),
        ("proxy.auth_query", p.auth_query.clone()),
        ("proxy.auth_cache_ttl", format_duration(p.auth_cache_ttl)),
        ("proxy.pool_idle_timeout", format_duration(p.pool_idle_timeout)),
        ("proxy.max_db_connections", p.max_db_connections.to_string()),
        ("proxy.max_user_connections", p.max_user_connections.to_string()),
        ("proxy.max_db_client_connections", p.max_db_client_connections.to_string()),
        ("proxy.max_user_client_connections", p.max_user_client_connections.to_string()),
        ("proxy.reserve_pool_size", p.reserve_pool_size.to_string()),
        ("proxy.reserve_pool_timeout", format_duration(p.reserve_pool_timeout)),
        ("routing.read_write_split", r.read_write_split.to_string()),
        (
            "routing.read_your_writes",
            match r.read_your_writes {
                ReadYourWrites::Lsn => "lsn",
                ReadYourWrites::Window => "window",
                ReadYourWrites::Off => "off",
                ReadYourWrites::Global => "global",
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
        ("routing.max_replica_wait", format_duration(r.max_replica_wait)),
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
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if d.is_zero() {
        "0".into()
    } else if !d.as_micros().is_multiple_of(1000) || ms == 0 {
        format!("{}us", d.as_micros())
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
        assert_eq!(format_duration(Duration::from_micros(50)), "50us");
        assert_eq!(format_duration(Duration::from_micros(1500)), "1500us");
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
}
