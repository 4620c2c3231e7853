use super::*;
use crate::config::{AuthMethod, Config, PoolMode};

/// A production-like pgbouncer.ini, written for this test: two databases
/// (one with its own pool settings and a forced user), a Unix-socket one, a
/// wildcard, TLS to clients and servers, and settings pgmux has no use for.
pub(crate) const REALISTIC_INI: &str = r#"
;; PgBouncer for the billing service
[databases]
billing = host=10.1.0.5 port=5433 dbname=billing_prod pool_size=40 min_pool_size=5 max_db_connections=60
reports = host=10.1.0.6,10.1.0.7 dbname=reports pool_mode=session user=reporter password='s3cr et'
local = host=/var/run/postgresql dbname=local
* = host=10.1.0.5 port=5433

[users]
batch = pool_mode=session max_user_connections=10

[pgbouncer]
logfile = /var/log/pgbouncer/pgbouncer.log
pidfile = /var/run/pgbouncer/pgbouncer.pid
listen_addr = *
listen_port = 6432
unix_socket_dir = /var/run/postgresql
auth_type = scram-sha-256
auth_file = /etc/pgbouncer/userlist.txt
admin_users = admin, ghost
auth_user = admin
auth_query = SELECT usename, passwd FROM pg_shadow WHERE usename=$1
stats_users = monitor
pool_mode = transaction
max_client_conn = 2000
default_pool_size = 25
reserve_pool_size = 5
max_user_connections = 80
server_lifetime = 1800
server_idle_timeout = 300
server_connect_timeout = 5
query_wait_timeout = 30
idle_transaction_timeout = 0.5
max_prepared_statements = 100
client_tls_sslmode = prefer
client_tls_key_file = /etc/pgbouncer/server.key
client_tls_cert_file = /etc/pgbouncer/server.crt
server_tls_sslmode = verify-ca
server_tls_ca_file = /etc/pgbouncer/root.crt
tcp_keepalive = 1
tcp_keepidle = 60
server_reset_query = DISCARD ALL
ignore_startup_parameters = extra_float_digits
"#;

pub(crate) const REALISTIC_USERLIST: &str = r#"
"admin" "admin-pw"
"app" "SCRAM-SHA-256$4096:c2FsdHNhbHQ=$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g=:aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g="
"legacy" "md5d41d8cd98f00b204e9800998ecf8427e"
"quo""te" "pw"
"#;

#[test]
fn realistic_configuration_converts_to_a_valid_proxy_toml() {
    let out = convert(REALISTIC_INI, Some(REALISTIC_USERLIST));
    let config = Config::parse(&out.toml, "converted.toml").unwrap_or_else(|e| panic!("{e}\n{}", out.toml));
    let p = &config.proxy;
    assert_eq!(p.listen.to_string(), "0.0.0.0:6432");
    assert_eq!(p.unix_socket_dir.as_deref(), Some(std::path::Path::new("/var/run/postgresql")));
    assert_eq!(p.pool_mode, PoolMode::Transaction);
    assert_eq!(p.max_client_conn, 2000);
    assert_eq!(p.server_lifetime.as_secs(), 1800);
    assert_eq!(p.server_idle_timeout.as_secs(), 300);
    assert_eq!(p.server_connect_timeout.as_secs(), 5);
    assert_eq!(p.query_wait_timeout.as_secs(), 30);
    assert_eq!(p.idle_transaction_timeout.as_millis(), 500);
    assert_eq!(p.max_prepared_statements, 100);
    assert_eq!(p.tls_cert.as_deref(), Some(std::path::Path::new("/etc/pgbouncer/server.crt")));
    assert!(p.server_tcp_keepalive);
    assert_eq!(p.server_tcp_keepalive_idle.as_secs(), 60);

    let billing = config.database("billing").unwrap();
    assert_eq!((billing.primary.as_str(), billing.server_dbname()), ("10.1.0.5:5433", "billing_prod"));
    assert_eq!((billing.pool_size, billing.min_pool_size), (40, 5));
    assert_eq!((billing.max_db_connections, p.max_user_connections), (Some(60), 80));
    assert_eq!(p.reserve_pool_size, 5);
    let reports = config.database("reports").unwrap();
    assert_eq!(reports.primary, "10.1.0.6:5432");
    assert_eq!(reports.pool_size, 25, "default_pool_size applies");
    assert_eq!(reports.pool_mode, Some(PoolMode::Session));
    assert_eq!(config.database("local").expect("a socket directory converts").primary, "/var/run/postgresql:5432");
    assert_eq!(config.database("*").expect("the wildcard carried over").primary, "10.1.0.5:5433");

    assert_eq!(config.user("admin").unwrap().auth, AuthMethod::ScramSha256);
    assert_eq!(config.user("app").unwrap().auth, AuthMethod::ScramSha256);
    assert_eq!(config.user("legacy").unwrap().auth, AuthMethod::Md5, "an md5 hash cannot do SCRAM");
    assert_eq!(config.user("quo\"te").unwrap().password.as_deref(), Some("pw"));
    assert_eq!(config.admin.users, ["admin"]);
    assert_eq!(config.proxy.auth_user.as_deref(), Some("admin"));
    assert_eq!(config.proxy.auth_query, "SELECT usename, passwd FROM pg_shadow WHERE usename=$1");

    // Each setting left behind is named, with a reason, in the file too.
    for what in [
        "logfile",
        "pidfile",
        "stats_users",
        "server_reset_query",
        "ignore_startup_parameters",
        "admin_users ghost",
        "databases reports host",
        "databases reports user",
        "databases reports password",
        "users batch",
        "server_tls_sslmode",
        "user legacy",
    ] {
        let line =
            out.skipped.iter().find(|s| s.starts_with(what)).unwrap_or_else(|| panic!("{what}: {:#?}", out.skipped));
        assert!(out.toml.contains(&format!("#   {line}")), "{line}");
    }
    // A password in a database's connection string is named, never copied.
    assert!(!out.toml.contains("s3cr et"));
}

#[test]
fn connection_strings_and_userlists_parse_like_pgbouncer() {
    assert_eq!(
        parse_connstr(r"host=h  port = 5 password='a \'b\' c' dbname=x\ y"),
        [("host", "h"), ("port", "5"), ("password", "a 'b' c"), ("dbname", "x y")]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
    );
    assert_eq!(parse_userlist("\"a\"\"b\" \"p\"\"w\" extra\n; comment\n\"x\"\n"), [("a\"b".into(), "p\"w".into())]);
}

#[test]
fn unix_sockets_carry_over() {
    // Unix socket only: listen_addr unset, in PgBouncer's default directory or the one named.
    for (ini, listen, mode) in [
        ("[pgbouncer]\nlisten_port = 6000\n", "/tmp/.s.PGSQL.6000", 0o777),
        ("[pgbouncer]\nunix_socket_dir = /run/pgb\nunix_socket_mode = 0770\n", "/run/pgb/.s.PGSQL.6432", 0o770),
    ] {
        let out = convert(&format!("[databases]\nx = host=/run/pg\n{ini}"), Some("\"u\" \"p\"\n"));
        let config = Config::parse(&out.toml, "converted.toml").unwrap_or_else(|e| panic!("{e}\n{}", out.toml));
        assert_eq!(config.proxy.listen.to_string(), listen);
        assert_eq!(config.proxy.unix_socket_dir, None);
        assert_eq!(config.proxy.unix_socket_mode, mode);
        assert_eq!(config.database("x").unwrap().primary, "/run/pg:5432");
    }
}

#[test]
fn times_are_seconds_and_bad_values_are_reported() {
    assert_eq!(seconds("120").as_deref(), Some("\"120s\""));
    assert_eq!(seconds("0.25").as_deref(), Some("\"250ms\""));
    assert_eq!(seconds("soon"), None);
    let out = convert("[pgbouncer]\nquery_timeout = soon\nlisten_addr = localhost\n", None);
    assert!(out.skipped.iter().any(|s| s.starts_with("query_timeout")), "{:?}", out.skipped);
    assert!(out.toml.contains("listen = \"127.0.0.1:6432\""));
}

#[test]
fn peering_converts_to_peer_id_and_peers() {
    let ini = "[databases]\napp = host=10.0.0.9\n\n[pgbouncer]\nlisten_addr = *\nso_reuseport = 1\npeer_id = 1\n\n\
               [peers]\n2 = host=10.0.0.2 port=6433 pool_size=4\n3 = host=pgmux-3.internal\n4 = host=/tmp\nx = host=h\n";
    let out = convert(ini, Some("\"app\" \"pw\""));
    let config = Config::parse(&out.toml, "converted.toml").unwrap_or_else(|e| panic!("{e}\n{}", out.toml));
    assert!(config.proxy.so_reuseport);
    assert_eq!(config.proxy.peer_id, 1);
    let peers: Vec<(u32, &str)> = config.peers.iter().map(|p| (p.id, p.addr.as_str())).collect();
    assert_eq!(peers, [(2, "10.0.0.2:6433"), (3, "pgmux-3.internal:6432")]);
    for what in ["peers 2 pool_size", "peers 4", "peers x"] {
        assert!(out.skipped.iter().any(|s| s.starts_with(what)), "{what}: {:#?}", out.skipped);
    }
}
