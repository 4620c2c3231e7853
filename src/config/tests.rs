use std::env::VarError;
use std::time::Duration;

use super::*;

const SECRET: &str = "s3cret-pw";

/// The environment seen by every test: only `PGMUX_TEST_PW` is set.
fn test_env(var: &str) -> Result<String, VarError> {
    match var {
        "PGMUX_TEST_PW" => Ok("from-env-pw".to_owned()),
        _ => Err(VarError::NotPresent),
    }
}

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse_with_env(text, "proxy.toml", &test_env)
}

fn parse_ok(text: &str) -> Config {
    match parse(text) {
        Ok(c) => c,
        Err(e) => panic!("expected OK, got: {e}"),
    }
}

/// Parses `text`, expecting an error that starts with `proxy.toml:<line>:`,
/// names `path` and contains `needle`; never the test password.
fn parse_err(text: &str, line: usize, path: &str, needle: &str) -> String {
    let msg = match parse(text) {
        Ok(_) => panic!("expected an error for {path}"),
        Err(ConfigError::Invalid(msg)) => msg,
        Err(e) => panic!("unexpected error kind: {e}"),
    };
    let prefix = format!("proxy.toml:{line}:");
    let hit = msg.lines().find(|l| l.starts_with(&prefix) && l.contains(&format!(": {path}: ")));
    assert!(hit.is_some_and(|l| l.contains(needle)), "want line {line}, {path}, {needle:?}; got:\n{msg}");
    assert!(!msg.contains(SECRET) && !msg.contains("from-env-pw"), "password leaked: {msg}");
    msg
}

/// A valid config; tests append to it or replace lines. Line numbers:
/// 1 [proxy], 2 listen, 4 [[databases]], 5 name, 6 primary, 8 [[users]], 9 name, 10 password.
const BASE: &str = r#"[proxy]
listen = "127.0.0.1:6432"

[[databases]]
name = "app"
primary = "127.0.0.1:5432"

[[users]]
name = "app"
password = "s3cret-pw"
"#;

fn base_with(from: &str, to: &str) -> String {
    assert!(BASE.contains(from), "{from:?} not in BASE");
    BASE.replacen(from, to, 1)
}

#[test]
fn shipped_proxy_toml_parses() {
    let text = include_str!("../../proxy.toml");
    let c = parse_ok(text);
    assert_eq!(c.databases[0].name, "postgres");
    assert_eq!(c.databases[0].server_dbname(), "postgres");
    assert_eq!(c.users[0].auth, AuthMethod::ScramSha256);
    assert_eq!(c.proxy.metrics_listen, Some("127.0.0.1:9930".parse().unwrap()));
    assert_eq!(c.routing.monitor_interval, Duration::from_millis(20));
    // The commented-out scale-out lines are valid as they stand once uncommented.
    let mut uncommented = text.to_owned();
    for line in ["# peer_listen =", "# peer_id =", "# [[peers]]", "# id = 2", "# addr = "] {
        assert!(uncommented.contains(line), "{line}");
        uncommented = uncommented.replace(line, &line[2..]);
    }
    let c = parse_ok(&uncommented);
    assert_eq!((c.proxy.peer_id, c.peers.len()), (1, 1));
    assert_eq!(c.proxy.peer_listen, Some("127.0.0.1:6433".parse().unwrap()));
}

#[test]
fn contract_example_parses() {
    let c = parse_ok(
        r#"
[proxy]
listen = "127.0.0.1:6432"
metrics_listen = "127.0.0.1:9930"
pool_mode = "transaction"
idle_transaction_timeout = "0"
server_idle_timeout = "10m"
server_lifetime = "1h"
on_session_state = "error"
tls_cert = "server.crt"
tls_key = "server.key"
tls_mode = "require"
server_tls = "verify-full"
server_tls_ca = "root.crt"

[routing]
read_your_writes = "window"
sticky_scope = "user"
max_replica_lag_bytes = 1048576
load_balance = "round_robin"
write_functions = ["nextval", "setval"]

[admin]
users = ["admin"]

[[databases]]
name = "app"
primary = "db.internal:5432"
replicas = ["127.0.0.1:5433", { addr = "127.0.0.1:5434", weight = 2 }, { addr = "[::1]:5435" }]
pool_size = 20
min_pool_size = 5
pool_mode = "session"

[[users]]
name = "app"
password = "env:PGMUX_TEST_PW"

[[users]]
name = "admin"
password = "SCRAM-SHA-256$4096:c2FsdA==$c3RvcmVk:c2VydmVy"
server_password = "plain"

[[users]]
name = "legacy"
password = "md5a3556571e93b0d20722ba62be61e8c2d"
auth = "md5"

[[users]]
name = "anyone"
auth = "trust"
"#,
    );
    assert_eq!(c.proxy.idle_transaction_timeout, Duration::ZERO);
    assert_eq!(c.proxy.tls_mode, TlsMode::Require);
    assert_eq!(c.routing.load_balance, LoadBalance::RoundRobin);
    let db = &c.databases[0];
    assert_eq!(c.pool_mode(db), PoolMode::Session);
    let replicas: Vec<_> = db.replicas.iter().map(|r| (r.addr(), r.weight())).collect();
    assert_eq!(replicas, [("127.0.0.1:5433", 1), ("127.0.0.1:5434", 2), ("[::1]:5435", 1)]);
    // env: is resolved at load time.
    assert_eq!(c.users[0].password.as_deref(), Some("from-env-pw"));
    assert_eq!(c.users[0].backend_password(), Some("from-env-pw"));
    assert_eq!(c.users[1].backend_password(), Some("plain"));
    assert_eq!(c.users[2].backend_password(), None);
    assert_eq!(c.user("anyone").map(|u| u.auth), Some(AuthMethod::Trust));
}

#[test]
fn syntax_error() {
    parse_err(&base_with(r#"listen = "127.0.0.1:6432""#, "listen = 127.0.0.1:6432"), 2, "proxy.listen", "syntax error");
    parse_err(&base_with("[proxy]", "[proxy"), 1, "proxy", "syntax error");
    // An unterminated password string must not echo the password.
    parse_err(
        &base_with(r#"password = "s3cret-pw""#, r#"password = "s3cret-pw"#),
        10,
        "users[0].password",
        "syntax error",
    );
}

#[test]
fn duplicate_key_is_a_syntax_error() {
    parse_err(&format!("{BASE}name = \"again\"\n"), 11, "users[0].name", "duplicate key");
}

#[test]
fn unknown_keys() {
    parse_err(
        &base_with("[proxy]", "[proxy]\nlisten_addr = 1"),
        2,
        "proxy.listen_addr",
        "unknown field \"listen_addr\"",
    );
    parse_err(&format!("{BASE}[prxy]\n"), 11, "prxy", "unknown field \"prxy\"");
    parse_err(
        &base_with(r#"name = "app""#, "name = \"app\"\npol_size = 3"),
        6,
        "databases[0].pol_size",
        "unknown field",
    );
    parse_err(&format!("{BASE}\n[routing]\nsticky = true\n"), 13, "routing.sticky", "unknown field");
    parse_err(
        &base_with(
            "primary = \"127.0.0.1:5432\"",
            "primary = \"127.0.0.1:5432\"\nreplicas = [{ addr = \"h:1\", wieght = 2 }]",
        ),
        7,
        "databases[0].replicas[0].wieght",
        "unknown field",
    );
}

#[test]
fn missing_required_fields() {
    parse_err(&base_with("primary = \"127.0.0.1:5432\"\n", ""), 4, "databases[0].primary", "missing required key");
    parse_err(&format!("{BASE}\n[[users]]\npassword = \"x\"\n"), 12, "users[1].name", "missing required key");
    parse_err(
        &base_with("primary = \"127.0.0.1:5432\"", "primary = \"127.0.0.1:5432\"\nreplicas = [{ weight = 2 }]"),
        7,
        "databases[0].replicas[0].addr",
        "missing required key",
    );
}

#[test]
fn wrong_types() {
    parse_err(&base_with("[proxy]", "[proxy]\nmax_client_conn = \"many\""), 2, "proxy.max_client_conn", "invalid type");
    parse_err(&base_with("[proxy]", "[proxy]\nmax_client_conn = -1"), 2, "proxy.max_client_conn", "invalid value");
    parse_err(
        &format!("{BASE}[routing]\nread_write_split = \"yes\"\n"),
        12,
        "routing.read_write_split",
        "expected a boolean",
    );
    parse_err(
        &base_with(r#"name = "app""#, "name = \"app\"\npool_size = 2.5"),
        6,
        "databases[0].pool_size",
        "invalid type",
    );
    parse_err(
        &base_with("primary = \"127.0.0.1:5432\"", "primary = \"127.0.0.1:5432\"\nreplicas = [5433]"),
        7,
        "databases[0].replicas[0]",
        "invalid type",
    );
}

#[test]
fn wrong_type_for_password_does_not_echo_it() {
    let msg = parse_err(
        &base_with(r#"password = "s3cret-pw""#, "password = 918273645"),
        10,
        "users[0].password",
        "not shown",
    );
    assert!(!msg.contains("918273645"), "{msg}");
}

#[test]
fn bad_enum_variant() {
    let msg =
        parse_err(&base_with("[proxy]", "[proxy]\npool_mode = \"sesion\""), 2, "proxy.pool_mode", "unknown variant");
    assert!(
        msg.contains(
            r#"proxy.toml:2:13: proxy.pool_mode: unknown variant "sesion", expected "transaction" or "session""#
        ),
        "{msg}"
    );
    parse_err(&base_with("[proxy]", "[proxy]\nserver_tls = \"verify_full\""), 2, "proxy.server_tls", "verify-full");
    parse_err(&format!("{BASE}auth = \"scram\"\n"), 11, "users[0].auth", "scram-sha-256");
}

#[test]
fn bad_durations() {
    parse_err(
        &base_with("[proxy]", "[proxy]\nquery_wait_timeout = \"5 parsecs\""),
        2,
        "proxy.query_wait_timeout",
        "parsecs",
    );
    parse_err(&base_with("[proxy]", "[proxy]\nserver_lifetime = \"1d\""), 2, "proxy.server_lifetime", "unit");
    parse_err(&base_with("[proxy]", "[proxy]\nshutdown_timeout = 30"), 2, "proxy.shutdown_timeout", "\"30s\"");
    parse_err(&format!("{BASE}[routing]\nsticky_window = \"\"\n"), 12, "routing.sticky_window", "needs a unit");
    parse_err(
        &format!("{BASE}[routing]\nmonitor_interval = \"0\"\n"),
        12,
        "routing.monitor_interval",
        "greater than 0",
    );
}

#[test]
fn durations() {
    assert_eq!(parse_duration("50us"), Ok(Duration::from_micros(50)));
    assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
    assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
    assert_eq!(parse_duration("10min"), Ok(Duration::from_secs(600)));
    assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
    assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
    assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    for bad in ["", "5", "s", "5 parsecs", "1.5s", "-1s", "5S", "1d", "18446744073709551615h"] {
        assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
    }
    // A bare integer 0 is accepted in TOML too; other bare numbers are ambiguous.
    let c = parse_ok(&base_with("[proxy]", "[proxy]\nidle_transaction_timeout = 0"));
    assert_eq!(c.proxy.idle_transaction_timeout, Duration::ZERO);
}

#[test]
fn unix_sockets_listen_and_serve() {
    let listen = |v: &str| parse_ok(&base_with(r#"listen = "127.0.0.1:6432""#, &format!("listen = \"{v}\""))).proxy;
    let p = listen("/run/pgmux:6432");
    assert_eq!(p.listen, Listen::Unix("/run/pgmux/.s.PGSQL.6432".into()));
    assert_eq!(p.listen.port(), 6432);
    assert_eq!(listen("/run/pgmux/app.sock").listen, Listen::Unix("/run/pgmux/app.sock".into()));
    assert_eq!(p.unix_socket_mode, 0o777, "PgBouncer's default");
    let c = parse_ok(&base_with(
        "[[databases]]",
        "unix_socket_dir = \"/run/pgmux\"\nunix_socket_mode = \"0770\"\nunix_socket_group = \"pgmux\"\n[[databases]]",
    ));
    assert_eq!(c.proxy.unix_socket_dir.as_deref(), Some(std::path::Path::new("/run/pgmux")));
    assert_eq!(c.proxy.unix_socket_mode, 0o770);
    assert_eq!(
        parse_ok(&base_with("[[databases]]", "unix_socket_mode = 0o700\n[[databases]]")).proxy.unix_socket_mode,
        0o700
    );
    let c = parse_ok(&base_with(r#"primary = "127.0.0.1:5432""#, r#"primary = "/var/run/postgresql:5432""#));
    assert_eq!(c.databases[0].primary, "/var/run/postgresql:5432");

    let long = format!("/{}:6432", "d".repeat(100));
    parse_err(
        &base_with(r#"listen = "127.0.0.1:6432""#, &format!("listen = \"{long}\"")),
        2,
        "proxy.listen",
        "at most 107",
    );
    parse_err(
        &base_with(r#"primary = "127.0.0.1:5432""#, &format!("primary = \"{long}\"")),
        6,
        "databases[0].primary",
        "at most 107",
    );
    parse_err(&base_with(r#"listen = "127.0.0.1:6432""#, r#"listen = "/run/pgmux:0""#), 2, "proxy.listen", "1-65535");
    parse_err(
        &base_with("[[databases]]", "unix_socket_mode = \"0999\"\n[[databases]]"),
        4,
        "proxy.unix_socket_mode",
        "octal",
    );
    parse_err(
        &base_with(r#"listen = "127.0.0.1:6432""#, "listen = \"/run/pgmux:6432\"\nunix_socket_dir = \"/run/x\""),
        3,
        "proxy.unix_socket_dir",
        "listen is a Unix socket already",
    );
    parse_err(
        &base_with(r#"listen = "127.0.0.1:6432""#, "listen = \"/run/pgmux:6432\"\nso_reuseport = true"),
        3,
        "proxy.so_reuseport",
        "one process owns",
    );
}

#[test]
fn bad_listen_addresses() {
    parse_err(
        &base_with(r#"listen = "127.0.0.1:6432""#, r#"listen = "localhost:6432""#),
        2,
        "proxy.listen",
        "invalid socket address",
    );
    parse_err(&base_with(r#"listen = "127.0.0.1:6432""#, r#"listen = "127.0.0.1""#), 2, "proxy.listen", "ip:port");
    parse_err(
        &base_with("[proxy]", "[proxy]\nmetrics_listen = \"0.0.0.0:99999\""),
        2,
        "proxy.metrics_listen",
        "invalid socket",
    );
}

#[test]
fn bad_server_addresses() {
    let primary = r#"primary = "127.0.0.1:5432""#;
    for (bad, needle) in [
        ("127.0.0.1", "no port"),
        ("db:70000", "invalid port"),
        ("db:0", "invalid port"),
        ("db:x", "invalid port"),
        (":5432", "invalid host"),
        ("bad host:5432", "invalid host"),
        ("::1:5432", "brackets"),
        ("[zz]:5432", "IPv6"),
    ] {
        parse_err(&base_with(primary, &format!("primary = {bad:?}")), 6, "databases[0].primary", needle);
    }
    let text = base_with(primary, &format!("{primary}\nreplicas = [\"ok:1\", \"nope\"]"));
    parse_err(&text, 7, "databases[0].replicas[1]", "no port");
    let text = base_with(primary, &format!("{primary}\nreplicas = [{{ addr = \"h:99999\", weight = 1 }}]"));
    parse_err(&text, 7, "databases[0].replicas[0].addr", "invalid port");
    for ok in ["db.internal:5432", "10.0.0.1:5432", "[::1]:5432", "pg_primary:5432"] {
        assert_eq!(check_host_port(ok), Ok(()), "{ok}");
    }
}

#[test]
fn duplicate_names() {
    let msg = parse_err(
        &format!("{BASE}\n[[databases]]\nname = \"app\"\nprimary = \"h:1\"\n"),
        13,
        "databases[1].name",
        "duplicate database name \"app\"",
    );
    assert!(msg.contains("first defined on line 5"), "{msg}");
    parse_err(
        &format!("{BASE}\n[[users]]\nname = \"app\"\nauth = \"trust\"\n"),
        13,
        "users[1].name",
        "duplicate user name",
    );
}

#[test]
fn pool_sizes() {
    parse_err(
        &base_with(r#"name = "app""#, "name = \"app\"\npool_size = 0"),
        6,
        "databases[0].pool_size",
        "at least 1",
    );
    parse_err(
        &base_with(r#"name = "app""#, "name = \"app\"\npool_size = 5\nmin_pool_size = 6"),
        7,
        "databases[0].min_pool_size",
        "min_pool_size (6) is larger than pool_size (5)",
    );
    // min_pool_size is checked against the default pool_size (20) too.
    parse_err(
        &base_with(r#"name = "app""#, "name = \"app\"\nmin_pool_size = 21"),
        6,
        "databases[0].min_pool_size",
        "(20)",
    );
}

#[test]
fn admin_user_must_exist() {
    parse_err(
        &format!("{BASE}[admin]\nusers = [\"app\", \"root\"]\n"),
        12,
        "admin.users[1]",
        "\"root\" is not defined",
    );
}

#[test]
fn client_tls_needs_cert_and_key() {
    parse_err(
        &base_with("[proxy]", "[proxy]\ntls_mode = \"require\""),
        2,
        "proxy.tls_mode",
        "needs tls_cert and tls_key",
    );
    parse_err(
        &base_with("[proxy]", "[proxy]\ntls_mode = \"allow\""),
        2,
        "proxy.tls_mode",
        "needs tls_cert and tls_key",
    );
    parse_err(
        &base_with("[proxy]", "[proxy]\ntls_mode = \"require\"\ntls_cert = \"c.pem\""),
        1,
        "proxy.tls_key",
        "tls_cert is set but tls_key is not",
    );
    parse_ok(&base_with("[proxy]", "[proxy]\ntls_mode = \"require\"\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\""));
}

#[test]
fn verify_full_needs_ca() {
    parse_err(&base_with("[proxy]", "[proxy]\nserver_tls = \"verify-full\""), 2, "proxy.server_tls", "server_tls_ca");
}

#[test]
fn md5_auth_with_scram_verifier() {
    let verifier = format!("SCRAM-SHA-256$4096:{SECRET}$x:y");
    let text = base_with(r#"password = "s3cret-pw""#, &format!("password = {verifier:?}\nauth = \"md5\""));
    parse_err(&text, 11, "users[0].auth", "SCRAM-SHA-256 verifier");
}

#[test]
fn scram_auth_with_md5_hash() {
    let text = base_with(r#"password = "s3cret-pw""#, "password = \"md5a3556571e93b0d20722ba62be61e8c2d\"");
    let msg = parse_err(&text, 8, "users[0].auth", "md5 hash");
    assert!(!msg.contains("a3556571"), "{msg}");
}

#[test]
fn scram_verifier_as_server_password() {
    let text = base_with(
        r#"password = "s3cret-pw""#,
        &format!("password = \"{SECRET}\"\nserver_password = \"SCRAM-SHA-256$1:a$b:c\""),
    );
    parse_err(&text, 11, "users[0].server_password", "cannot be used to log in");
}

#[test]
fn password_required_unless_trust() {
    let no_pw = base_with("password = \"s3cret-pw\"\n", "");
    // Points at the [[users]] header, since the key is absent.
    parse_err(&no_pw, 8, "users[0].password", "required with auth = \"scram-sha-256\"");
    parse_err(&format!("{no_pw}auth = \"md5\"\n"), 8, "users[0].password", "auth = \"md5\"");
    parse_ok(&format!("{no_pw}auth = \"trust\"\n"));
}

#[test]
fn empty_password() {
    parse_err(
        &base_with(r#"password = "s3cret-pw""#, r#"password = """#),
        10,
        "users[0].password",
        "must not be empty",
    );
}

#[test]
fn env_passwords() {
    parse_err(
        &base_with(r#""s3cret-pw""#, r#""env:PGMUX_NOT_SET""#),
        10,
        "users[0].password",
        "PGMUX_NOT_SET is not set",
    );
    parse_err(&base_with(r#""s3cret-pw""#, r#""env:""#), 10, "users[0].password", "needs a variable name");
    let text = format!("{BASE}server_password = \"env:PGMUX_ALSO_NOT_SET\"\n");
    parse_err(&text, 11, "users[0].server_password", "PGMUX_ALSO_NOT_SET is not set");
    let c = parse_ok(&format!("{BASE}server_password = \"env:PGMUX_TEST_PW\"\n"));
    assert_eq!(c.users[0].server_password.as_deref(), Some("from-env-pw"));
    assert_eq!(c.users[0].backend_password(), Some("from-env-pw"));
}

#[test]
fn several_semantic_errors_are_all_reported_in_file_order() {
    let text = format!("{BASE}[admin]\nusers = [\"root\"]\n");
    let text = text.replacen(r#"name = "app""#, "name = \"app\"\npool_size = 0", 1);
    let msg = parse(&text).err().map(|e| e.to_string()).unwrap_or_default();
    let lines: Vec<_> = msg.lines().collect();
    assert_eq!(lines.len(), 2, "{msg}");
    assert!(lines[0].starts_with("proxy.toml:6:") && lines[1].starts_with("proxy.toml:13:"), "{msg}");
}

#[test]
fn debug_redacts_passwords() {
    let c = parse_ok(&format!("{BASE}server_password = \"other-secret\"\n"));
    let dbg = format!("{c:?}");
    assert!(dbg.contains(r#"password: Some("<redacted>")"#), "{dbg}");
    assert!(!dbg.contains(SECRET) && !dbg.contains("other-secret"), "{dbg}");
}

#[test]
fn load_reads_the_file_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgmux.toml");
    std::fs::write(&path, BASE.replace("[proxy]", "[proxy]\npool_mode = \"sesion\"")).unwrap();
    let msg = Config::load(&path).unwrap_err().to_string();
    assert!(msg.starts_with(&format!("{}:2:13: proxy.pool_mode: ", path.display())), "{msg}");
    assert!(matches!(Config::load(&dir.path().join("missing.toml")), Err(ConfigError::Io { .. })));
}

#[test]
fn restart_diff() {
    let old = parse_ok(BASE);
    assert!(diff_requires_restart(&old, &old).is_empty());
    let mut new = old.clone();
    new.proxy.pool_mode = PoolMode::Session;
    new.databases[0].pool_size = 50;
    assert!(diff_requires_restart(&old, &new).is_empty(), "reloadable settings need no restart");
    new.proxy.listen = "127.0.0.1:7000".parse().unwrap();
    assert_eq!(diff_requires_restart(&old, &new), ["proxy.listen"]);
    new.proxy.metrics_listen = Some("127.0.0.1:9930".parse().unwrap());
    assert_eq!(diff_requires_restart(&old, &new), ["proxy.listen", "proxy.metrics_listen"]);
    new.proxy.workers = 4;
    assert_eq!(diff_requires_restart(&old, &new), ["proxy.listen", "proxy.metrics_listen", "proxy.workers"]);
    let mut new = old.clone();
    new.proxy.so_reuseport = true;
    new.proxy.peer_listen = Some("127.0.0.1:6433".parse().unwrap());
    new.proxy.peer_id = 2;
    new.peers.push(PeerConfig { id: 3, addr: "127.0.0.1:6434".into() });
    assert_eq!(diff_requires_restart(&old, &new), ["proxy.so_reuseport", "proxy.peer_listen", "proxy.peer_id"]);
    // The peer list is reloadable; what the process runs with stays.
    new.keep_restart_settings(&old);
    assert!(diff_requires_restart(&old, &new).is_empty());
    assert_eq!(new.peers.len(), 1);
}

#[test]
fn scale_out_keys_parse() {
    let c = parse_ok(&base_with(
        "listen = \"127.0.0.1:6432\"",
        "listen = \"0.0.0.0:6432\"\nso_reuseport = true\npeer_listen = \"10.0.0.1:6433\"\npeer_id = 1",
    ));
    assert!(c.proxy.so_reuseport);
    assert_eq!(c.proxy.peer_listen, Some("10.0.0.1:6433".parse().unwrap()));
    assert_eq!(c.proxy.peer_id, 1);
    assert!(c.peers.is_empty());
    let c = parse_ok(&format!(
        "{}[[peers]]\nid = 2\naddr = \"pgmux-2.internal:6433\"\n\n[[peers]]\nid = 16383\naddr = \"[::1]:6433\"\n",
        base_with("listen = \"127.0.0.1:6432\"", "listen = \"127.0.0.1:6432\"\npeer_id = 1")
    ));
    assert_eq!(
        c.peers,
        [
            PeerConfig { id: 2, addr: "pgmux-2.internal:6433".into() },
            PeerConfig { id: 16383, addr: "[::1]:6433".into() }
        ]
    );
    // Off by default.
    let c = parse_ok(BASE);
    assert!(!c.proxy.so_reuseport && c.proxy.peer_listen.is_none() && c.proxy.peer_id == 0);
}

#[test]
fn scale_out_keys_are_validated_naming_the_key() {
    // One [proxy] line after `listen`: it is line 3.
    let with = |line: &str| base_with("listen = \"127.0.0.1:6432\"", &format!("listen = \"127.0.0.1:6432\"\n{line}"));
    let with_id = |id: &str| with(&format!("peer_id = {id}"));
    // Line numbers: peer_id is line 3; BASE has 11 lines after the insertion, peers start at 12.
    parse_err(&with_id("16384"), 3, "proxy.peer_id", "from 0 (peering off) to 16383");
    parse_err(&with_id("-1"), 3, "proxy.peer_id", "invalid value");
    parse_err(&with("peer_listen = \"127.0.0.1:6432\""), 3, "proxy.peer_listen", "must differ from listen");
    parse_err(&with("peer_listen = \"pgmux:6433\""), 3, "proxy.peer_listen", "expected ip:port");
    parse_err(&with("so_reuseport = \"yes\""), 3, "proxy.so_reuseport", "invalid type");
    let peers = |own: &str, entries: &[&str]| {
        let mut text = with_id(own);
        for e in entries {
            text.push_str(&format!("\n[[peers]]\n{e}\n"));
        }
        text
    };
    // Without an id of its own, an instance cannot take part.
    parse_err(
        &peers("0", &["id = 2\naddr = \"127.0.0.1:6433\""]),
        3,
        "proxy.peer_id",
        "needs this instance's own peer_id",
    );
    parse_err(&peers("1", &["id = 0\naddr = \"127.0.0.1:6433\""]), 14, "peers[0].id", "from 1 to 16383");
    parse_err(&peers("1", &["id = 20000\naddr = \"127.0.0.1:6433\""]), 14, "peers[0].id", "from 1 to 16383");
    parse_err(&peers("1", &["id = 1\naddr = \"127.0.0.1:6433\""]), 14, "peers[0].id", "this instance's own");
    parse_err(
        &peers("1", &["id = 2\naddr = \"127.0.0.1:6433\"", "id = 2\naddr = \"127.0.0.1:6434\""]),
        18,
        "peers[1].id",
        "duplicate peer id 2 (first in peers[0])",
    );
    parse_err(&peers("1", &["id = 2\naddr = \"127.0.0.1\""]), 15, "peers[0].addr", "no port");
    parse_err(&peers("1", &["id = 2"]), 13, "peers[0].addr", "missing required key");
    parse_err(&peers("1", &["id = 2\naddr = \"127.0.0.1:6433\"\nweight = 2"]), 16, "peers[0].weight", "unknown field");
}

#[test]
fn columns_count_characters_not_bytes() {
    let msg = parse_err(
        &format!("{BASE}[routing]\nwrite_functions = [\"nextvál\", 5]\n"),
        12,
        "routing.write_functions[1]",
        "",
    );
    assert!(msg.starts_with("proxy.toml:12:31: "), "{msg}");
}

/// A quoted key or a value may hold a newline; serde and our messages echo
/// them, which split one error over two lines, the second without its
/// `file:line:col:` (found by tests/fuzz/, config_any_text).
#[test]
fn an_error_is_one_line_whatever_it_quotes() {
    let msg = parse_err("\"new\\nline\" = \"5s\"", 1, "new\\nline", "unknown field \"new\\nline\"");
    assert_eq!(msg.lines().count(), 1, "{msg}");
    let msg =
        parse_err(&base_with("listen = \"127.0.0.1:6432\"", "pool_mode = \"a\\rb\""), 2, "proxy.pool_mode", "a\\rb");
    assert!(!msg.contains('\r') && msg.lines().count() == 1, "{msg}");
}

#[test]
fn a_config_without_databases_or_users_is_an_error() {
    parse_err("", 1, "databases", "no [[databases]] entry");
    parse_err("", 1, "users", "no [[users]] entry");
    parse_err("[proxy]\nlisten = \"127.0.0.1:6432\"\n", 1, "databases", "nothing to serve");
    let users_only = &BASE[BASE.find("[[users]]").unwrap()..];
    parse_err(users_only, 1, "databases", "nothing to serve");
}

#[test]
fn files_the_config_names_are_read_only_up_to_a_bound() {
    let e = read_bounded(std::path::Path::new("/dev/zero"), 1 << 20).unwrap_err();
    assert!(e.to_string().contains("larger than 1024 KiB"), "{e}");
    let e = Config::load(std::path::Path::new("/dev/zero")).unwrap_err();
    assert!(e.to_string().starts_with("/dev/zero: larger than"), "{e}");
    let small = std::env::temp_dir().join(format!("pgmux-bounded-{}", std::process::id()));
    std::fs::write(&small, b"abc").unwrap();
    assert_eq!(read_bounded(&small, 3).unwrap(), b"abc");
    assert!(read_bounded(&small, 2).is_err());
    std::fs::remove_file(&small).unwrap();
}

#[test]
fn keepalive_settings_are_whole_seconds_within_the_kernels_range() {
    let with = |extra: &str| base_with("[proxy]", &format!("[proxy]\n{extra}"));
    let c = parse_ok(&with("server_tcp_keepalive_idle = \"5s\""));
    assert_eq!(c.proxy.server_keepalive().unwrap().idle, Duration::from_secs(5));
    assert_eq!(parse_ok(&with("server_tcp_keepalive = false")).proxy.server_keepalive(), None);
    parse_err(&with("server_tcp_keepalive_idle = \"500ms\""), 2, "proxy.server_tcp_keepalive_idle", "whole number");
    parse_err(&with("server_tcp_keepalive_interval = 0"), 2, "proxy.server_tcp_keepalive_interval", "whole number");
    parse_err(&with("server_tcp_keepalive_count = 0"), 2, "proxy.server_tcp_keepalive_count", "from 1 to 127");
}

#[test]
fn idle_poll_is_microseconds_up_to_a_millisecond() {
    let with = |extra: &str| base_with("[proxy]", &format!("[proxy]\n{extra}"));
    assert_eq!(parse_ok(&with("idle_poll = \"100us\"")).proxy.idle_poll, Duration::from_micros(100));
    assert_eq!(parse_ok(&with("idle_poll = \"1ms\"")).proxy.idle_poll, Duration::from_millis(1));
    assert_eq!(Config::default().proxy.idle_poll, Duration::ZERO);
    parse_err(&with("idle_poll = \"100ms\""), 2, "proxy.idle_poll", "to 1ms");
}

#[test]
fn auth_user_must_be_a_user_with_a_password_pgmux_can_send() {
    let c = parse_ok(&base_with("listen = \"127.0.0.1:6432\"", "listen = \"127.0.0.1:6432\"\nauth_user = \"app\""));
    let db = c.database("app").unwrap();
    let (user, query) = c.auth_lookup(db).expect("the global auth_user applies");
    assert_eq!((user.name.as_str(), query), ("app", crate::config::DEFAULT_AUTH_QUERY));
    parse_err(
        &base_with("listen = \"127.0.0.1:6432\"", "listen = \"127.0.0.1:6432\"\nauth_user = \"ghost\""),
        3,
        "proxy.auth_user",
        "not defined",
    );
    let hashed =
        base_with("password = \"s3cret-pw\"", "password = \"md5d41d8cd98f00b204e9800998ecf8427e\"\nauth = \"md5\"");
    parse_err(
        &hashed.replacen("primary = \"127.0.0.1:5432\"", "primary = \"127.0.0.1:5432\"\nauth_user = \"app\"", 1),
        7,
        "databases[0].auth_user",
        "needs a plaintext password",
    );
}

#[test]
fn hosts_list_every_node_instead_of_primary_and_replicas() {
    use super::StatedRole;
    let c = parse_ok(&base_with(
        "primary = \"127.0.0.1:5432\"",
        "hosts = [\"10.0.0.1:5432\", { addr = \"db.internal:5433\", weight = 2 }]",
    ));
    let db = &c.databases[0];
    let nodes = db.nodes();
    assert_eq!(nodes.len(), 2);
    assert_eq!((nodes[1].addr.as_str(), nodes[1].weight, nodes[1].stated), ("db.internal:5433", 2, None));
    assert_eq!(db.first_addr(), "10.0.0.1:5432");
    assert!(db.has_topology());
    // primary + replicas state roles; an address listed twice is one node.
    let c = parse_ok(&base_with(
        "primary = \"127.0.0.1:5432\"",
        "primary = \"127.0.0.1:5432\"\nreplicas = [\"127.0.0.1:5433\", \"127.0.0.1:5432\"]",
    ));
    let nodes = c.databases[0].nodes();
    assert_eq!(
        nodes.iter().map(|n| n.stated).collect::<Vec<_>>(),
        [Some(StatedRole::Primary), Some(StatedRole::Replica)]
    );
    // A single node has no topology to follow.
    assert!(!parse_ok(BASE).databases[0].has_topology());
    // Either form, not both, and one of them.
    parse_err(
        &base_with("primary = \"127.0.0.1:5432\"", "primary = \"127.0.0.1:5432\"\nhosts = [\"127.0.0.1:5433\"]"),
        7,
        "databases[0].hosts",
        "not both",
    );
    parse_err(
        &base_with("primary = \"127.0.0.1:5432\"", "hosts = [\"127.0.0.1:5433\"]\nreplicas = [\"127.0.0.1:5434\"]"),
        7,
        "databases[0].replicas",
        "put the replicas there too",
    );
    parse_err(&base_with("primary = \"127.0.0.1:5432\"", "hosts = [\"nope\"]"), 6, "databases[0].hosts[0]", "no port");
}
