//! Hot reload through the admin console's RELOAD, against pgmux started from
//! a config file in front of the real test cluster. (SIGHUP is tested in
//! `reload_sighup.rs`, its own binary: a signal reaches every proxy of a process.)

mod support;

use support::code;

use std::path::PathBuf;
use std::time::Duration;

use futures_util::StreamExt;
use support::proxy::Proxy;
use support::raw::Raw;
use support::{APP, CLEAR, DB, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, SimpleQueryMessage};

/// Generous bound for things that must happen.
const SOON: Duration = Duration::from_secs(15);

/// A proxy.toml in a temporary directory, rewritten by each test step.
struct ConfigFile {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl ConfigFile {
    fn new(text: &str) -> ConfigFile {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("proxy.toml");
        let file = ConfigFile { _dir: dir, path };
        file.write(text);
        file
    }

    fn write(&self, text: &str) {
        std::fs::write(&self.path, text).expect("write the config file");
    }
}

/// A config for the test cluster: `[proxy]` lines, one database per
/// `(name, dbname, pool_size)`, and the given `[[users]]` blocks; the trust
/// superuser `postgres` is always a user and the admin.
fn config(proxy: &str, databases: &[(&str, &str, usize)], users: &str) -> String {
    let primary = support::cluster().primary().host_port();
    let mut out = format!("[proxy]\nlisten = \"127.0.0.1:0\"\n{proxy}\n\n[admin]\nusers = [\"postgres\"]\n");
    for (name, dbname, pool_size) in databases {
        out += &format!(
            "\n[[databases]]\nname = \"{name}\"\ndbname = \"{dbname}\"\nprimary = \"{primary}\"\npool_size = {pool_size}\n"
        );
    }
    out += "\n[[users]]\nname = \"postgres\"\nauth = \"trust\"\n";
    out += users;
    out
}

fn app_user() -> String {
    format!("\n[[users]]\nname = \"{}\"\npassword = \"{}\"\n", APP.0, APP.1)
}

async fn start(file: &ConfigFile) -> Proxy {
    support::cluster_async().await;
    Proxy::start_file(&file.path).await
}

/// The admin console, with the notices it sends collected on a channel.
async fn admin(proxy: &Proxy) -> (tokio_postgres::Client, mpsc::UnboundedReceiver<String>) {
    let mut config = tokio_postgres::Config::new();
    config.host("127.0.0.1").port(proxy.port()).user("postgres").dbname("pgmux").connect_timeout(SOON);
    let (client, mut connection) = config.connect(tokio_postgres::NoTls).await.expect("admin console login");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let AsyncMessage::Notice(n) = m {
                let _ = tx.send(n.message().to_owned());
            }
        }
    });
    (client, rx)
}

/// Rows of an admin SHOW as column-name → value maps.
async fn show(admin: &tokio_postgres::Client, what: &str) -> Vec<std::collections::HashMap<String, String>> {
    let msgs = admin.simple_query(&format!("SHOW {what}")).await.unwrap_or_else(|e| panic!("SHOW {what}: {e}"));
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                r.columns()
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c.name().to_owned(), r.get(i).unwrap_or("").to_owned()))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// `SHOW CONFIG`'s value of `key`.
async fn config_value(admin: &tokio_postgres::Client, key: &str) -> String {
    let rows = show(admin, "CONFIG").await;
    rows.iter().find(|r| r["key"] == key).unwrap_or_else(|| panic!("no {key} in SHOW CONFIG"))["value"].clone()
}

/// `SHOW POOLS`' `column` for (`db`, `user`), 0 if there is no such pool.
async fn pool_stat(admin: &tokio_postgres::Client, db: &str, user: &str, column: &str) -> usize {
    let rows = show(admin, "POOLS").await;
    rows.iter().find(|r| r["database"] == db && r["user"] == user).map_or(0, |r| r[column].parse().unwrap())
}

async fn select_one(c: &tokio_postgres::Client) {
    let rows = c.simple_query("SELECT 1").await.expect("SELECT 1 through pgmux");
    assert!(rows.iter().any(|m| matches!(m, SimpleQueryMessage::Row(_))));
}

/// The trust superuser straight to the primary.
async fn superuser() -> tokio_postgres::Client {
    support::connect(support::cluster().primary(), "postgres", None, "postgres").await.expect("connect to the primary")
}

/// Server processes of `user` on database `dbname`, as Postgres sees them.
async fn backends(pg: &tokio_postgres::Client, user: &str, dbname: &str) -> i64 {
    let row = pg
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND datname = $2 AND backend_type = 'client backend'",
            &[&user, &dbname],
        )
        .await
        .expect("count backends");
    row.get(0)
}

/// `/metrics`' value of the sample written exactly as `series`.
async fn metric(proxy: &Proxy, series: &str) -> u64 {
    let mut s = tokio::net::TcpStream::connect(proxy.metrics.expect("metrics enabled")).await.expect("connect");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in /metrics:\n{body}"))
}

/// Reload applied: CommandComplete `RELOAD`, the notices it sent.
async fn reload(admin: &tokio_postgres::Client, notices: &mut mpsc::UnboundedReceiver<String>) -> Vec<String> {
    admin.simple_query("RELOAD").await.expect("RELOAD");
    // Notices precede CommandComplete, so they are all queued by now.
    let mut out = Vec::new();
    while let Ok(n) = notices.try_recv() {
        out.push(n);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shrinking_pool_size_retires_surplus_backends_and_clients_keep_working() {
    support::cluster_async().await;
    let pg = superuser().await;
    // A database of its own, so that other tests' backends are not counted.
    pg.batch_execute("CREATE DATABASE reload_shrink OWNER app").await.expect("create database");
    let file = ConfigFile::new(&config("", &[("shrink", "reload_shrink", 10)], &app_user()));
    let proxy = start(&file).await;
    let (admin, mut notices) = admin(&proxy).await;

    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(proxy.connect(APP.0, Some(APP.1), "shrink").await.expect("connect through pgmux"));
    }
    // Ten transactions open at once: ten backends.
    for c in &clients {
        c.simple_query("BEGIN").await.unwrap();
        select_one(c).await;
    }
    assert_eq!(backends(&pg, APP.0, "reload_shrink").await, 10);
    // Half finish (their backends go idle), half stay inside their transaction.
    for c in &clients[..5] {
        c.simple_query("COMMIT").await.unwrap();
    }

    file.write(&config("", &[("shrink", "reload_shrink", 3)], &app_user()));
    let changed = reload(&admin, &mut notices).await;
    assert!(changed.iter().any(|n| n.contains("databases.shrink.pool_size: 10 -> 3")), "{changed:?}");
    // Idle surplus goes at once; 5 are still busy.
    eventually(SOON, "idle surplus backends to close", || async { backends(&pg, APP.0, "reload_shrink").await == 5 })
        .await;
    // The clients inside a transaction across the reload finish it normally.
    for c in &clients[5..] {
        select_one(c).await;
        c.simple_query("COMMIT").await.unwrap();
    }
    eventually(SOON, "at most 3 backends after the reload", || async {
        backends(&pg, APP.0, "reload_shrink").await <= 3
    })
    .await;
    // Every client, including those connected across the reload, keeps
    // working, all at once, and Postgres never sees more than 3 again.
    let work = clients.iter().map(|c| async move {
        for _ in 0..5 {
            c.simple_query("SELECT pg_sleep(0.01)").await.expect("query after the reload");
        }
    });
    futures_util::future::join_all(work).await;
    assert!(backends(&pg, APP.0, "reload_shrink").await <= 3);
    assert!(pool_stat(&admin, "shrink", APP.0, "sv_open").await <= 3);
    let db = show(&admin, "DATABASES").await.into_iter().find(|r| r["name"] == "shrink").unwrap();
    assert_eq!(db["pool_size"], "3");
    drop(clients);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn growing_pool_size_lets_waiting_clients_run_at_once() {
    let file = ConfigFile::new(&config("query_wait_timeout = \"60s\"", &[("grow", DB, 1)], &app_user()));
    let proxy = start(&file).await;
    let (admin, mut notices) = admin(&proxy).await;
    let a = proxy.connect(APP.0, Some(APP.1), "grow").await.unwrap();
    let b = proxy.connect(APP.0, Some(APP.1), "grow").await.unwrap();
    let c = proxy.connect(APP.0, Some(APP.1), "grow").await.unwrap();

    // `a` holds the only backend; `b` and `c` queue for it.
    a.simple_query("BEGIN").await.unwrap();
    let pid = |c: tokio_postgres::Client| async move {
        c.simple_query("BEGIN").await.unwrap();
        let rows = c.simple_query("SELECT pg_backend_pid()").await.unwrap();
        let pid = rows
            .iter()
            .find_map(|m| match m {
                SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                _ => None,
            })
            .unwrap();
        (c, pid)
    };
    let (b, c) = (tokio::spawn(pid(b)), tokio::spawn(pid(c)));
    eventually(SOON, "two clients waiting", || async { pool_stat(&admin, "grow", APP.0, "cl_waiting").await == 2 })
        .await;

    file.write(&config("query_wait_timeout = \"60s\"", &[("grow", DB, 3)], &app_user()));
    reload(&admin, &mut notices).await;
    // `a` is still inside its transaction: `b` and `c` can only proceed on new backends.
    let (b, c) = tokio::time::timeout(SOON, async { (b.await.unwrap(), c.await.unwrap()) })
        .await
        .expect("waiting clients proceed after the pool grew");
    let rows = a.simple_query("SELECT pg_backend_pid()").await.unwrap();
    let a_pid = rows
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .unwrap();
    let mut pids = vec![a_pid, b.1.clone(), c.1.clone()];
    pids.sort();
    pids.dedup();
    assert_eq!(pids.len(), 3, "three transactions open at once on three backends");
    assert_eq!(pool_stat(&admin, "grow", APP.0, "sv_open").await, 3);
    for client in [&a, &b.0, &c.0] {
        client.simple_query("COMMIT").await.unwrap();
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_file_keeps_the_old_config() {
    let good = config("query_wait_timeout = \"7s\"", &[(DB, DB, 2)], &app_user());
    let file = ConfigFile::new(&good);
    let proxy = start(&file).await;
    let (admin, mut notices) = admin(&proxy).await;
    let client = proxy.app().await;
    select_one(&client).await;

    // Also changes query_wait_timeout, which must not apply.
    let broken = good.replace("\"7s\"", "\"9s\"").replace("pool_size = 2", "pool_size = \"two\"");
    let line = broken.lines().position(|l| l.contains("\"two\"")).unwrap() + 1;
    file.write(&broken);
    let e = admin.simple_query("RELOAD").await.expect_err("RELOAD of a broken file fails");
    assert_eq!(code(&e), "F0000");
    let message = e.as_db_error().unwrap().message();
    let at = format!("{}:{line}:", file.path.display());
    assert!(message.contains(&at) && message.contains("pool_size"), "expected {at} in: {message}");

    assert_eq!(config_value(&admin, "proxy.query_wait_timeout").await, "7s");
    select_one(&client).await;
    select_one(&proxy.app().await).await;
    assert_eq!(metric(&proxy, "pgmux_config_reloads_total{result=\"failed\"}").await, 1);
    assert_eq!(metric(&proxy, "pgmux_config_reloads_total{result=\"ok\"}").await, 0);

    // A missing file fails the same way.
    let moved = file.path.with_extension("moved");
    std::fs::rename(&file.path, &moved).unwrap();
    let e = admin.simple_query("RELOAD").await.expect_err("RELOAD of a missing file fails");
    assert_eq!(code(&e), "F0000");
    assert_eq!(metric(&proxy, "pgmux_config_reloads_total{result=\"failed\"}").await, 2);
    std::fs::rename(&moved, &file.path).unwrap();

    // An empty (say, truncated) file would remove every database and user.
    file.write("");
    let e = admin.simple_query("RELOAD").await.expect_err("RELOAD of an empty file fails");
    assert!(e.as_db_error().unwrap().message().contains("no [[databases]] entry"), "{e}");
    // A certificate path naming an endless file fails at once, without reading it all.
    file.write(
        &good.replace("query_wait_timeout", "tls_cert = \"/dev/zero\"\ntls_key = \"/dev/zero\"\nquery_wait_timeout"),
    );
    let e = admin.simple_query("RELOAD").await.expect_err("RELOAD with tls_cert = /dev/zero fails");
    assert!(e.as_db_error().unwrap().message().contains("/dev/zero: larger than"), "{e}");
    assert_eq!(metric(&proxy, "pgmux_config_reloads_total{result=\"failed\"}").await, 4);
    select_one(&client).await;
    select_one(&proxy.app().await).await;

    // Fixed, it applies.
    file.write(&good.replace("\"7s\"", "\"9s\""));
    let changed = reload(&admin, &mut notices).await;
    assert!(changed.iter().any(|n| n.contains("proxy.query_wait_timeout: 7s -> 9s")), "{changed:?}");
    assert_eq!(config_value(&admin, "proxy.query_wait_timeout").await, "9s");
    assert_eq!(metric(&proxy, "pgmux_config_reloads_total{result=\"ok\"}").await, 1);
    select_one(&client).await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_and_passwords_apply_to_new_logins() {
    // pgmux checks client passwords itself; `trustuser` needs none at the server.
    let trust = |pw: &str| format!("\n[[users]]\nname = \"trustuser\"\npassword = \"{pw}\"\n");
    let clear = format!("\n[[users]]\nname = \"{}\"\npassword = \"{}\"\n", CLEAR.0, CLEAR.1);
    let file = ConfigFile::new(&config("", &[(DB, DB, 2)], &(app_user() + &trust("first_pw"))));
    let proxy = start(&file).await;
    let (admin, mut notices) = admin(&proxy).await;

    let e = proxy.connect(CLEAR.0, Some(CLEAR.1), DB).await.expect_err("not a user yet");
    assert_eq!(code(&e), "28P01");
    let before = proxy.connect("trustuser", Some("first_pw"), DB).await.expect("first password");

    file.write(&config("", &[(DB, DB, 2)], &(app_user() + &trust("second_pw") + &clear)));
    let changed = reload(&admin, &mut notices).await;
    let changed = changed.join("\n");
    assert!(changed.contains("users.trustuser.password: changed"), "{changed}");
    assert!(changed.contains(&format!("users.{}: added", CLEAR.0)), "{changed}");
    assert!(!changed.contains("first_pw") && !changed.contains("second_pw"), "a password in: {changed}");

    let added = proxy.connect(CLEAR.0, Some(CLEAR.1), DB).await.expect("a user added by reload logs in");
    select_one(&added).await;
    let e = proxy.connect("trustuser", Some("first_pw"), DB).await.expect_err("old password");
    assert_eq!(code(&e), "28P01");
    select_one(&proxy.connect("trustuser", Some("second_pw"), DB).await.expect("new password")).await;
    // Logged in before the change: unaffected.
    select_one(&before).await;

    // A removed user cannot log in; its sessions go on.
    file.write(&config("", &[(DB, DB, 2)], &(app_user() + &trust("second_pw"))));
    reload(&admin, &mut notices).await;
    let e = proxy.connect(CLEAR.0, Some(CLEAR.1), DB).await.expect_err("removed");
    assert_eq!(code(&e), "28P01");
    for _ in 0..3 {
        select_one(&added).await;
    }
    proxy.shutdown().await;
}

/// The salt (`s=`) of the SCRAM server-first message pgmux sends `user`,
/// which is random per derived verifier. Hangs up after reading it.
async fn scram_salt(proxy: &Proxy, user: &str) -> String {
    use postgres_protocol::message::frontend;
    async fn auth_request(raw: &mut Raw) -> (i32, bytes::BytesMut) {
        let mut m = raw.recv().await.expect("an Authentication request");
        assert_eq!(m.tag, b'R');
        (bytes::Buf::get_i32(&mut m.body), m.body)
    }
    let mut raw = Raw::connect(proxy.addr).await;
    let mut out = bytes::BytesMut::new();
    frontend::startup_message([("user", user), ("database", DB)], &mut out).unwrap();
    raw.send(&out).await;
    assert_eq!(auth_request(&mut raw).await.0, 10, "AuthenticationSASL");
    out.clear();
    frontend::sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=0123456789abcdef", &mut out).unwrap();
    raw.send(&out).await;
    let (code, server_first) = auth_request(&mut raw).await;
    assert_eq!(code, 11, "AuthenticationSASLContinue");
    let server_first = String::from_utf8(server_first.to_vec()).unwrap();
    server_first.split(',').find_map(|a| a.strip_prefix("s=")).expect("a salt").to_owned()
}

/// A plaintext password's SCRAM verifier is derived once per loaded config
/// (not per login): logins see one salt until a reload changes the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_verifier_of_a_plaintext_password_is_derived_once_per_load() {
    let trust = |pw: &str| format!("\n[[users]]\nname = \"trustuser\"\npassword = \"{pw}\"\n");
    let file = ConfigFile::new(&config("", &[(DB, DB, 2)], &trust("first_pw")));
    let proxy = start(&file).await;
    let (admin, mut notices) = admin(&proxy).await;

    let salt = scram_salt(&proxy, "trustuser").await;
    select_one(&proxy.connect("trustuser", Some("first_pw"), DB).await.expect("first password")).await;
    assert_eq!(scram_salt(&proxy, "trustuser").await, salt);

    file.write(&config("", &[(DB, DB, 2)], &trust("second_pw")));
    reload(&admin, &mut notices).await;
    let new_salt = scram_salt(&proxy, "trustuser").await;
    assert_ne!(new_salt, salt, "the reloaded password got the old verifier");
    select_one(&proxy.connect("trustuser", Some("second_pw"), DB).await.expect("new password")).await;
    let e = proxy.connect("trustuser", Some("first_pw"), DB).await.expect_err("old password");
    assert_eq!(code(&e), "28P01");
    assert_eq!(scram_salt(&proxy, "trustuser").await, new_salt);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_change_needs_a_restart_and_the_rest_applies() {
    let file = ConfigFile::new(&config("", &[(DB, DB, 2)], &app_user()));
    let proxy = start(&file).await;
    let (admin, mut notices) = admin(&proxy).await;
    let client = proxy.app().await;

    let text = config("", &[(DB, DB, 4)], &app_user()).replace("127.0.0.1:0", "127.0.0.1:1");
    file.write(&text);
    let said = reload(&admin, &mut notices).await;
    assert!(
        said.iter().any(|n| n.contains("proxy.listen changed to 127.0.0.1:1 but needs a restart; still 127.0.0.1:0")),
        "{said:?}"
    );
    assert!(said.iter().any(|n| n.contains("databases.app.pool_size: 2 -> 4")), "{said:?}");
    assert_eq!(config_value(&admin, "proxy.listen").await, "127.0.0.1:0");
    let db = show(&admin, "DATABASES").await.into_iter().find(|r| r["name"] == DB).unwrap();
    assert_eq!(db["pool_size"], "4");
    // Still serving on the old address, old and new clients alike.
    select_one(&client).await;
    select_one(&proxy.app().await).await;
    assert_eq!(metric(&proxy, "pgmux_config_reloads_total{result=\"ok\"}").await, 1);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_target_change_moves_new_work_to_the_new_target() {
    support::cluster_async().await;
    let pg = superuser().await;
    for db in ["reload_target_a", "reload_target_b", "reload_gone"] {
        pg.batch_execute(&format!("CREATE DATABASE {db} OWNER app")).await.expect("create database");
    }
    let dbs = |moving: &str, gone: bool| {
        let mut dbs = vec![("moving", moving, 2)];
        if gone {
            dbs.push(("gone", "reload_gone", 2));
        }
        config("", &dbs, &app_user())
    };
    let file = ConfigFile::new(&dbs("reload_target_a", true));
    let proxy = start(&file).await;
    let (admin, mut notices) = admin(&proxy).await;
    let current_db = |c: tokio_postgres::Client| async move {
        let rows = c.simple_query("SELECT current_database()").await.expect("query");
        let db = rows
            .iter()
            .find_map(|m| match m {
                SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                _ => None,
            })
            .unwrap();
        (c, db)
    };
    // Two clients of `moving`: one idle, one inside a transaction across the reload.
    let busy = proxy.connect(APP.0, Some(APP.1), "moving").await.unwrap();
    busy.simple_query("BEGIN").await.unwrap();
    let (busy, db) = current_db(busy).await;
    assert_eq!(db, "reload_target_a");
    let (idle, db) = current_db(proxy.connect(APP.0, Some(APP.1), "moving").await.unwrap()).await;
    assert_eq!(db, "reload_target_a");
    assert_eq!(backends(&pg, APP.0, "reload_target_a").await, 2);
    let on_gone = proxy.connect(APP.0, Some(APP.1), "gone").await.unwrap();
    select_one(&on_gone).await;

    file.write(&dbs("reload_target_b", false));
    let said = reload(&admin, &mut notices).await.join("\n");
    assert!(said.contains("databases.moving.dbname: reload_target_a -> reload_target_b"), "{said}");
    assert!(said.contains("databases.gone: removed"), "{said}");
    // The idle old-target backend closes at once, the busy one when its transaction ends.
    eventually(SOON, "the idle old-target backend to close", || async {
        backends(&pg, APP.0, "reload_target_a").await == 1
    })
    .await;
    let (busy, db) = current_db(busy).await;
    assert_eq!(db, "reload_target_a", "a transaction stays where it began");
    busy.simple_query("COMMIT").await.unwrap();
    eventually(SOON, "the busy old-target backend to close", || async {
        backends(&pg, APP.0, "reload_target_a").await == 0
    })
    .await;
    // New and existing clients are served by the new target.
    let (_, db) = current_db(proxy.connect(APP.0, Some(APP.1), "moving").await.unwrap()).await;
    assert_eq!(db, "reload_target_b");
    let (_, db) = current_db(idle).await;
    assert_eq!(db, "reload_target_b");
    let (_, db) = current_db(busy).await;
    assert_eq!(db, "reload_target_b");
    assert_eq!(backends(&pg, APP.0, "reload_target_a").await, 0);

    // A removed database refuses new logins; its connected client goes on,
    // each transaction on a backend closed after it.
    let e = proxy.connect(APP.0, Some(APP.1), "gone").await.expect_err("removed database");
    assert_eq!(code(&e), "3D000");
    for _ in 0..3 {
        select_one(&on_gone).await;
    }
    eventually(SOON, "no backend left for the removed database", || async {
        backends(&pg, APP.0, "reload_gone").await == 0
    })
    .await;
    assert_eq!(pool_stat(&admin, "gone", APP.0, "sv_open").await, 0, "a retired pool is not listed");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_retires_the_pools_of_a_removed_replica() {
    let cluster = support::cluster_async().await;
    let primary = cluster.primary().host_port();
    let replica = cluster.replicas()[0].host_port();
    let routed = |replicas: &str| {
        config("", &[(DB, DB, 3)], &app_user()).replacen(
            &format!("primary = \"{primary}\"\n"),
            &format!("primary = \"{primary}\"\nreplicas = [{replicas}]\n"),
            1,
        ) + "\n[routing]\nmonitor_interval = \"10ms\"\n"
    };
    let file = ConfigFile::new(&routed(&format!("\"{replica}\"")));
    let proxy = start(&file).await;
    let (admin, _notices) = admin(&proxy).await;
    let c = proxy.app().await;
    let replica_port = cluster.replicas()[0].port().to_string();
    eventually(SOON, "a read to be served by the replica", || async { server_port(&c).await == replica_port }).await;
    let replica_rows = |rows: Vec<std::collections::HashMap<String, String>>| {
        rows.into_iter().filter(|r| r["role"] == "replica").count()
    };
    assert_eq!(replica_rows(show(&admin, "NODE_POOLS").await), 1);

    file.write(&routed(""));
    admin.simple_query("RELOAD").await.expect("RELOAD");
    assert_eq!(replica_rows(show(&admin, "NODE_POOLS").await), 0);
    // The client logged in while the replica was configured: its reads now stay on the primary.
    for _ in 0..5 {
        assert_eq!(server_port(&c).await, cluster.primary().port().to_string());
    }
    // The replica pool's idle server connections were closed.
    let on_replica = support::connect(&cluster.replicas()[0], "postgres", None, "postgres").await.unwrap();
    eventually(SOON, "pgmux's connections to the removed replica to close", || async {
        let row = on_replica
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND backend_type = 'client backend' \
                 AND application_name <> 'pgmux monitor'",
                &[&APP.0],
            )
            .await
            .unwrap();
        row.get::<_, i64>(0) == 0
    })
    .await;
    proxy.shutdown().await;
}

/// The port of the server that answered.
async fn server_port(c: &tokio_postgres::Client) -> String {
    support::scalar(c, "SELECT inet_server_port()").await
}

/// The maintenance pattern: PAUSE, change the config, RELOAD, RESUME. Every
/// client connected across it, including those held by PAUSE with a request
/// waiting, carries on; none is disconnected.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pause_reload_resume_loses_no_client() {
    support::cluster_async().await;
    let pg = superuser().await;
    pg.batch_execute("CREATE DATABASE reload_pause OWNER app").await.expect("create database");
    let file = ConfigFile::new(&config("", &[("paused", "reload_pause", 4)], &app_user()));
    let proxy = start(&file).await;
    let (admin, mut notices) = admin(&proxy).await;
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(std::sync::Arc::new(proxy.connect(APP.0, Some(APP.1), "paused").await.expect("connect")));
    }
    clients[0].simple_query("BEGIN").await.unwrap();
    select_one(&clients[0]).await;

    let (pauser, _pauser_notices) = self::admin(&proxy).await;
    let pause = tokio::spawn(async move { pauser.simple_query("PAUSE paused").await.map(|_| ()) });
    clients[0].simple_query("COMMIT").await.unwrap();
    tokio::time::timeout(SOON, pause).await.expect("PAUSE returns once the transaction ended").unwrap().unwrap();

    // Every client asks for something while paused: all of them are held.
    let held: Vec<_> = clients
        .iter()
        .map(|c| {
            let c = c.clone();
            tokio::spawn(async move { c.simple_query("SELECT 1").await.map(|rows| rows.len()) })
        })
        .collect();
    eventually(SOON, "all eight clients to wait at the PAUSE gate", || async {
        pool_stat(&admin, "paused", APP.0, "cl_waiting").await == 8
    })
    .await;
    assert!(held.iter().all(|h| !h.is_finished()), "a request ran while paused");

    file.write(&config("", &[("paused", "reload_pause", 2)], &app_user()));
    let changed = reload(&admin, &mut notices).await;
    assert!(changed.iter().any(|n| n.contains("databases.paused.pool_size: 4 -> 2")), "{changed:?}");
    admin.simple_query("RESUME paused").await.expect("RESUME");

    for h in held {
        let rows = tokio::time::timeout(SOON, h).await.expect("released by RESUME").unwrap();
        assert!(rows.expect("the held request succeeds") >= 2, "a row and CommandComplete");
    }
    for c in &clients {
        select_one(c).await;
    }
    eventually(SOON, "at most 2 backends under the reloaded pool_size", || async {
        backends(&pg, APP.0, "reload_pause").await <= 2
    })
    .await;
    let connected = show(&admin, "CLIENTS").await.iter().filter(|r| r["database"] == "paused").count();
    assert_eq!(connected, 8, "no client was disconnected");
    drop(clients);
    proxy.shutdown().await;
}
