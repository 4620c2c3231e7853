//! Console commands of PgBouncer's runbooks, through the `pgbouncer`
//! database as its tools connect: DISABLE / ENABLE.

mod support;

use support::proxy::{Proxy, admin_config};
use support::{APP, DB, code, scalar};

fn rows(msgs: Vec<tokio_postgres::SimpleQueryMessage>) -> Vec<tokio_postgres::SimpleQueryRow> {
    msgs.into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .collect()
}

/// DISABLE refuses new logins as Postgres does for a database with
/// ALLOW_CONNECTIONS false; sessions already in go on; ENABLE undoes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_and_enable_a_database() {
    let cluster = support::cluster_async().await;
    let proxy = Proxy::start(&admin_config(cluster, 2, "")).await;
    let admin = proxy.connect("postgres", None, "pgbouncer").await.unwrap();
    let before = proxy.connect(APP.0, Some(APP.1), DB).await.unwrap();

    admin.simple_query(&format!("DISABLE {DB}")).await.expect("DISABLE");
    let e = proxy.connect(APP.0, Some(APP.1), DB).await.expect_err("a new login to a disabled database");
    assert_eq!(code(&e), "55000");
    let text = e.as_db_error().map(|d| d.message().to_owned()).unwrap_or_default();
    assert_eq!(text, format!("database \"{DB}\" is not currently accepting connections"));
    // Side by side with Postgres refusing a database with ALLOW_CONNECTIONS false.
    let su = support::superuser("postgres").await;
    su.batch_execute("DROP DATABASE IF EXISTS aq_closed").await.unwrap();
    su.batch_execute("CREATE DATABASE aq_closed ALLOW_CONNECTIONS false").await.unwrap();
    let direct = support::connect(cluster.primary(), APP.0, Some(APP.1), "aq_closed").await.map(drop).unwrap_err();
    assert_eq!(code(&direct), "55000");
    assert_eq!(
        direct.as_db_error().map(|d| d.message().to_owned()),
        Some("database \"aq_closed\" is not currently accepting connections".to_owned())
    );
    su.batch_execute("DROP DATABASE aq_closed").await.unwrap();
    assert_eq!(scalar(&before, "SELECT 1").await, "1", "a session already in goes on");
    let dbs = rows(admin.simple_query("SHOW DATABASES").await.unwrap());
    let row = dbs.iter().find(|r| r.get("name") == Some(DB)).unwrap();
    assert_eq!(row.get("disabled"), Some("1"));
    // Other databases are not affected.
    proxy.connect(APP.0, Some(APP.1), "postgres").await.expect("another database");

    let e = admin.simple_query(&format!("DISABLE {DB}")).await.expect_err("twice");
    assert_eq!(code(&e), "55000");
    let e = admin.simple_query("DISABLE no_such_db").await.expect_err("unknown database");
    assert_eq!(code(&e), "3D000");

    admin.simple_query(&format!("ENABLE {DB}")).await.expect("ENABLE");
    let after = proxy.connect(APP.0, Some(APP.1), DB).await.expect("logins work again");
    assert_eq!(scalar(&after, "SELECT 1").await, "1");
    let e = admin.simple_query(&format!("ENABLE {DB}")).await.expect_err("not disabled");
    assert_eq!(code(&e), "55000");
    proxy.shutdown().await;
}

/// SHUTDOWN WAIT_FOR_CLIENTS: no new connections; connected clients keep
/// working, undisturbed; pgmux exits once they have all left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_wait_for_clients() {
    let cluster = support::cluster_async().await;
    let mut proxy = Proxy::start(&admin_config(cluster, 2, "shutdown_timeout = \"1s\"")).await;
    let app = proxy.connect(APP.0, Some(APP.1), DB).await.unwrap();
    let admin = proxy.connect("postgres", None, "pgbouncer").await.unwrap();
    let e = admin.simple_query("SHUTDOWN WAIT_FOR_NOTHING").await.expect_err("unknown mode");
    assert_eq!(code(&e), "42601");
    admin.simple_query("SHUTDOWN WAIT_FOR_CLIENTS").await.expect("SHUTDOWN WAIT_FOR_CLIENTS");
    support::eventually(std::time::Duration::from_secs(10), "new connections refused", || async {
        proxy.connect(APP.0, Some(APP.1), DB).await.is_err()
    })
    .await;
    // Well past shutdown_timeout (1 s), the connected client is neither
    // drained nor closed: it runs transactions as before.
    for _ in 0..3 {
        app.batch_execute("BEGIN; SELECT pg_sleep(0.5); COMMIT").await.expect("a connected client goes on");
    }
    drop(app);
    drop(admin);
    tokio::time::timeout(std::time::Duration::from_secs(10), proxy.wait_stopped())
        .await
        .expect("pgmux exits once the clients have left");
}

/// SHUTDOWN WAIT_FOR_SERVERS: the drain of SIGINT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_wait_for_servers() {
    let cluster = support::cluster_async().await;
    let mut proxy = Proxy::start(&admin_config(cluster, 2, "")).await;
    let app = proxy.connect(APP.0, Some(APP.1), DB).await.unwrap();
    app.batch_execute("BEGIN").await.unwrap();
    let admin = proxy.connect("postgres", None, "pgbouncer").await.unwrap();
    admin.simple_query("SHUTDOWN WAIT_FOR_SERVERS").await.expect("SHUTDOWN WAIT_FOR_SERVERS");
    // The open transaction finishes; then the client is let go.
    app.batch_execute("SELECT 1; COMMIT").await.expect("the transaction in flight finishes");
    tokio::time::timeout(std::time::Duration::from_secs(10), proxy.wait_stopped()).await.expect("pgmux exits");
    assert!(app.simple_query("SELECT 1").await.is_err(), "closed after its transaction");
}

/// SUSPEND: in-flight transactions finish first; then nothing is served and
/// no connection accepted until RESUME, which lets the waiting ones in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_then_resume() {
    let cluster = support::cluster_async().await;
    let proxy = Proxy::start(&admin_config(cluster, 2, "")).await;
    let app = proxy.connect(APP.0, Some(APP.1), DB).await.unwrap();
    let admin = proxy.connect("postgres", None, "pgbouncer").await.unwrap();
    admin.simple_query("SUSPEND").await.expect("SUSPEND");
    let state = rows(admin.simple_query("SHOW STATE").await.unwrap());
    assert!(state.iter().any(|r| r.get("key") == Some("suspended") && r.get("value") == Some("yes")), "SHOW STATE");
    // A query of a connected client and a new connection both wait.
    let query = tokio::spawn(async move { app.simple_query("SELECT 7").await.map(|_| ()) });
    let port = proxy.port();
    let newcomer = tokio::spawn(async move {
        let url = format!("host=127.0.0.1 port={port} user={} password={} dbname={DB}", APP.0, APP.1);
        let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        c.simple_query("SELECT 8").await.map(|_| ())
    });
    // Long enough for either to have been served if it were going to be.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(!query.is_finished() && !newcomer.is_finished(), "served while suspended");
    let e = admin.simple_query("SUSPEND").await.expect_err("twice");
    assert_eq!(code(&e), "55000");
    admin.simple_query("RESUME").await.expect("RESUME");
    tokio::time::timeout(std::time::Duration::from_secs(10), query)
        .await
        .unwrap()
        .unwrap()
        .expect("served after RESUME");
    tokio::time::timeout(std::time::Duration::from_secs(10), newcomer)
        .await
        .unwrap()
        .unwrap()
        .expect("accepted after RESUME");
    let state = rows(admin.simple_query("SHOW STATE").await.unwrap());
    assert!(state.iter().any(|r| r.get("key") == Some("suspended") && r.get("value") == Some("no")));
    proxy.shutdown().await;
}

/// WAIT_CLOSE after RECONNECT: returns only once the server connection a
/// transaction was using when RECONNECT ran has been closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_close_follows_reconnect() {
    let cluster = support::cluster_async().await;
    let proxy = Proxy::start(&admin_config(cluster, 2, "")).await;
    let app = proxy.connect(APP.0, Some(APP.1), DB).await.unwrap();
    app.batch_execute("BEGIN").await.unwrap();
    let pid = scalar(&app, "SELECT pg_backend_pid()").await;
    let admin = proxy.connect("postgres", None, "pgbouncer").await.unwrap();
    admin.simple_query(&format!("RECONNECT {DB}")).await.unwrap();
    let waiter = tokio::spawn(async move { admin.simple_query(&format!("WAIT_CLOSE {DB}")).await.map(|_| admin) });
    // Long enough for WAIT_CLOSE to have answered if it were going to.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "WAIT_CLOSE returned while the old connection is in use");
    app.batch_execute("COMMIT").await.unwrap();
    let admin = tokio::time::timeout(std::time::Duration::from_secs(10), waiter)
        .await
        .expect("WAIT_CLOSE returns once the old connection is closed")
        .unwrap()
        .expect("WAIT_CLOSE");
    let su = support::superuser(DB).await;
    let alive: i64 =
        scalar(&su, &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}")).await.parse().unwrap();
    assert_eq!(alive, 0, "the old server connection is gone");
    // With nothing stale, it answers at once; the client works on a new connection.
    tokio::time::timeout(std::time::Duration::from_secs(2), admin.simple_query("WAIT_CLOSE")).await.unwrap().unwrap();
    assert_ne!(scalar(&app, "SELECT pg_backend_pid()").await, pid);
    let e = admin.simple_query("WAIT_CLOSE no_such_db").await.expect_err("unknown database");
    assert_eq!(code(&e), "3D000");
    proxy.shutdown().await;
}

/// SET key = value: shown by SHOW CONFIG and in force at once; checked by
/// the file's rules; restart-only and unknown keys refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_changes_a_setting_at_runtime() {
    let cluster = support::cluster_async().await;
    let proxy = Proxy::start(&admin_config(cluster, 1, "query_wait_timeout = \"20s\"")).await;
    let admin = proxy.connect("postgres", None, "pgbouncer").await.unwrap();
    // PgBouncer's spelling: seconds.
    admin.simple_query("SET query_wait_timeout = 1").await.expect("SET");
    let config = rows(admin.simple_query("SHOW CONFIG").await.unwrap());
    let value = config.iter().find(|r| r.get("key") == Some("proxy.query_wait_timeout")).and_then(|r| r.get("value"));
    assert_eq!(value, Some("1s"));
    // In force: with the one connection held, a waiting client gives up after 1 s, not 20.
    let holder = proxy.connect(APP.0, Some(APP.1), DB).await.unwrap();
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let waiter = proxy.connect(APP.0, Some(APP.1), DB).await.unwrap();
    let started = std::time::Instant::now();
    let e = waiter.simple_query("SELECT 2").await.expect_err("no connection within the new query_wait_timeout");
    assert_eq!(code(&e), "53300");
    assert!(started.elapsed() < std::time::Duration::from_secs(10), "{:?}", started.elapsed());
    holder.batch_execute("COMMIT").await.unwrap();

    admin.simple_query("SET proxy.pool_mode TO 'session'").await.expect("SET ... TO");
    for bad in ["SET pool_mode = statement", "SET listen = '0.0.0.0:1'", "SET no_such_key = 1", "SET max_client_conn"] {
        let e = admin.simple_query(bad).await.expect_err(bad);
        assert!(matches!(code(&e).as_str(), "22023" | "42601"), "{bad}: {e}");
    }
    proxy.shutdown().await;
}
