//! One setting changed at runtime (the admin console's `SET key = value`):
//! parsed by the same types and checked by the same rules as the file.

use super::locate::Locator;
use super::{Config, ConfigError, ProxyConfig, RESTART_ONLY, RoutingConfig, toml_error, validate};

/// Copies field `key` from `from` to `to`; `false` for a key not listed.
macro_rules! copy_field {
    ($key:expr, $to:expr, $from:expr, [$($f:ident),* $(,)?]) => {
        match $key {
            $(stringify!($f) => { $to.$f = $from.$f.clone(); true })*
            _ => false,
        }
    };
}

impl Config {
    /// Settings a `SET` may change are those a reload applies: not [`RESTART_ONLY`].
    ///
    /// This configuration with `key` (`proxy.x`, `routing.x`, or a bare
    /// `[proxy]` key) set to `value`, written as in proxy.toml (`"5s"`,
    /// `100`, `true`; a bare word is taken as a string). A number for a
    /// duration is seconds, as PgBouncer's settings are.
    pub fn with_setting(&self, key: &str, value: &str) -> Result<Config, ConfigError> {
        let invalid = |m: String| ConfigError::Invalid(m);
        let (section, name) = match key.split_once('.') {
            Some((s @ ("proxy" | "routing"), n)) => (s, n),
            Some(_) => return Err(invalid(format!("unknown setting \"{key}\""))),
            None => ("proxy", key),
        };
        if section == "proxy" && RESTART_ONLY.contains(&name) {
            return Err(invalid(format!("proxy.{name} cannot be changed at runtime: it needs a restart")));
        }
        let value = value.trim();
        let literal = toml_value(value);
        let text = format!("[{section}]\n{name} = {literal}\n");
        let (loc, syntax) = Locator::new(&text, "SET");
        if let Some(e) = syntax.first() {
            return Err(invalid(toml_error(&loc, e, "syntax error: ")));
        }
        #[derive(serde::Deserialize)]
        struct One {
            #[serde(default)]
            proxy: Option<ProxyConfig>,
            #[serde(default)]
            routing: Option<RoutingConfig>,
        }
        let parsed: One = match toml::from_str(&text) {
            Ok(p) => p,
            // A duration given as a number: PgBouncer's seconds.
            Err(_) if value.parse::<f64>().is_ok() => {
                let text =
                    format!("[{section}]\n{name} = \"{}ms\"\n", (value.parse::<f64>().unwrap_or(0.0) * 1000.0) as u64);
                toml::from_str(&text).map_err(|e| invalid(toml_error(&loc, &e, "")))?
            }
            Err(e) => return Err(invalid(toml_error(&loc, &e, ""))),
        };
        let mut new = self.clone();
        let copied = match (parsed.proxy, parsed.routing) {
            (Some(p), _) => copy_field!(
                name,
                new.proxy,
                p,
                [
                    idle_poll,
                    pool_mode,
                    max_client_conn,
                    query_wait_timeout,
                    idle_transaction_timeout,
                    query_timeout,
                    max_query_size,
                    server_idle_timeout,
                    server_lifetime,
                    shutdown_timeout,
                    server_connect_timeout,
                    server_tcp_keepalive,
                    server_tcp_keepalive_idle,
                    server_tcp_keepalive_interval,
                    server_tcp_keepalive_count,
                    max_prepared_statements,
                    on_session_state,
                    tls_cert,
                    tls_key,
                    tls_mode,
                    server_tls,
                    server_tls_ca,
                    auth_user,
                    auth_query,
                    auth_cache_ttl,
                    pool_idle_timeout,
                    max_db_connections,
                    max_user_connections,
                    max_db_client_connections,
                    max_user_client_connections,
                    reserve_pool_size,
                    reserve_pool_timeout,
                ]
            ),
            (_, Some(r)) => copy_field!(
                name,
                new.routing,
                r,
                [
                    read_write_split,
                    read_your_writes,
                    sticky_window,
                    sticky_scope,
                    max_replica_lag,
                    max_replica_lag_bytes,
                    max_replica_wait,
                    load_balance,
                    monitor_interval,
                    write_functions,
                ]
            ),
            (None, None) => false,
        };
        if !copied {
            return Err(invalid(format!("unknown setting \"{key}\"")));
        }
        let errors = validate::validate(&mut new, &loc, &|var| std::env::var(var));
        if let Some((_, first)) = errors.into_iter().next() {
            return Err(invalid(first));
        }
        Ok(new)
    }
}

/// `value` as a TOML value: as written when it already is one (a number, a
/// boolean, a quoted string, an array), else quoted.
fn toml_value(value: &str) -> String {
    let v = value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')).unwrap_or(value);
    let is_literal = v.parse::<i64>().is_ok()
        || v.parse::<f64>().is_ok()
        || matches!(v, "true" | "false")
        || v.starts_with('"')
        || v.starts_with('[');
    if is_literal { v.to_owned() } else { format!("{v:?}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Config {
        Config::parse(
            "[[databases]]\nname = \"app\"\nprimary = \"127.0.0.1:5432\"\n[[users]]\nname = \"app\"\npassword = \"pw\"\n",
            "t.toml",
        )
        .unwrap()
    }

    #[test]
    fn settings_change_as_in_the_file() {
        let c = base();
        assert_eq!(c.with_setting("query_wait_timeout", "7s").unwrap().proxy.query_wait_timeout.as_secs(), 7);
        assert_eq!(
            c.with_setting("proxy.query_wait_timeout", "'250ms'").unwrap().proxy.query_wait_timeout.as_millis(),
            250
        );
        // PgBouncer's seconds.
        assert_eq!(c.with_setting("query_wait_timeout", "30").unwrap().proxy.query_wait_timeout.as_secs(), 30);
        assert_eq!(c.with_setting("max_client_conn", "77").unwrap().proxy.max_client_conn, 77);
        assert!(!c.with_setting("routing.read_write_split", "false").unwrap().routing.read_write_split);
        assert_eq!(c.with_setting("pool_mode", "session").unwrap().proxy.pool_mode, super::super::PoolMode::Session);
    }

    #[test]
    fn bad_keys_and_values_are_refused_with_the_files_words() {
        let c = base();
        let msg = |r: Result<Config, ConfigError>| r.unwrap_err().to_string();
        assert!(msg(c.with_setting("listen", "0.0.0.0:1")).contains("needs a restart"));
        assert!(msg(c.with_setting("proxy.peer_id", "3")).contains("needs a restart"));
        assert!(msg(c.with_setting("so_reuseport", "true")).contains("needs a restart"));
        assert!(msg(c.with_setting("no_such_key", "1")).contains("no_such_key"));
        assert!(msg(c.with_setting("nosection.x", "1")).contains("unknown setting"));
        assert!(msg(c.with_setting("pool_mode", "statement")).contains("pool_mode"));
        assert!(msg(c.with_setting("auth_user", "ghost")).contains("not defined"));
        assert!(msg(c.with_setting("server_tcp_keepalive_count", "0")).contains("1 to 127"));
    }
}
