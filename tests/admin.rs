//! The admin console through psql and tokio-postgres, and `/metrics` over raw
//! HTTP, against pgmux in front of the real test cluster.

mod support;

use support::{code, scalar};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use support::console::{Table, psql_on, show_on};
use support::proxy::{Proxy, admin_config, standard_config};
use support::{APP, DB, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Long enough for pgmux to have acted on a request if it were going to.
const HELD: Duration = Duration::from_millis(300);
/// Generous bound for things that must happen.
const SOON: Duration = Duration::from_secs(10);

/// Runs `sql` on the console (database `pgmux`) with psql.
async fn psql(proxy: &Proxy, sql: &str) -> Result<(Table, String), String> {
    psql_on(proxy, "pgmux", sql).await
}

async fn show(proxy: &Proxy, what: &str) -> Table {
    show_on(proxy, "pgmux", what).await
}

async fn admin_client(proxy: &Proxy) -> tokio_postgres::Client {
    proxy.connect("postgres", None, "pgmux").await.expect("admin console login")
}

/// `app` on database `app`, announcing `application_name`.
async fn app_named(proxy: &Proxy, name: &str) -> tokio_postgres::Client {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(proxy.port())
        .user(APP.0)
        .password(APP.1)
        .dbname(DB)
        .application_name(name)
        .connect_timeout(SOON);
    let (client, connection) = config.connect(tokio_postgres::NoTls).await.expect("connect through pgmux");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// `admin_config` whose database also has the cluster's first replica;
/// `db_extra` adds lines to that database's table.
fn admin_config_with_replica(
    cluster: &pgmux::cluster::Cluster,
    pool_size: usize,
    proxy_extra: &str,
    db_extra: &str,
) -> String {
    let primary = cluster.primary().host_port();
    let replica = cluster.replicas()[0].host_port();
    admin_config(cluster, pool_size, proxy_extra).replacen(
        &format!("primary = \"{primary}\"\n"),
        &format!("primary = \"{primary}\"\nreplicas = [\"{replica}\"]\n{db_extra}"),
        1,
    )
}

async fn admin_proxy(pool_size: usize) -> Proxy {
    let cluster = support::cluster_async().await;
    Proxy::start(&admin_config(cluster, pool_size, "")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_pools_clients_and_servers_after_known_traffic() {
    let proxy = admin_proxy(2).await;
    let a = app_named(&proxy, "holder").await;
    let b = app_named(&proxy, "idle_b").await;
    let c = app_named(&proxy, "idle_c").await;
    for client in [&a, &b, &c] {
        client.simple_query("SELECT 1").await.unwrap();
    }
    a.batch_execute("BEGIN").await.unwrap();
    let pid = scalar(&a, "SELECT pg_backend_pid()").await;

    let pools = show(&proxy, "POOLS").await;
    // PgBouncer's columns (checked in admin_parity.rs), then pgmux's.
    assert_eq!(pools.columns[17..], ["cl_idle", "sv_open", "pinned"]);
    let row = pools.one("database", DB);
    assert_eq!(pools.get(row, "user"), APP.0);
    // PgBouncer's cl_active counts idle clients too; cl_idle is those alone.
    assert_eq!(pools.get(row, "cl_active"), "3");
    assert_eq!(pools.get(row, "cl_waiting"), "0");
    assert_eq!(pools.get(row, "cl_idle"), "2");
    assert_eq!(pools.get(row, "sv_active"), "1");
    assert_eq!(pools.get(row, "pool_mode"), "transaction");
    assert_eq!(pools.get(row, "maxwait"), "0");
    assert_eq!(pools.get(row, "pinned"), "0");
    let n = |col| pools.get(row, col).parse::<usize>().unwrap();
    assert_eq!(n("sv_open"), n("sv_active") + n("sv_idle") + n("sv_login"));

    let clients = show(&proxy, "CLIENTS").await;
    let holder = clients.one("application_name", "holder");
    assert_eq!(clients.get(holder, "state"), "active");
    // Its link is the server connection's ptr.
    let server_ptr = format!("{:#x}", pid.parse::<i32>().unwrap());
    assert_eq!(clients.get(holder, "link"), server_ptr);
    assert_eq!(clients.get(holder, "database"), DB);
    assert_eq!(clients.get(holder, "user"), APP.0);
    assert_eq!(clients.get(holder, "addr"), "127.0.0.1");
    assert_eq!(clients.get(holder, "local_port"), proxy.port().to_string());
    assert!(clients.get(holder, "connect_time").ends_with(" UTC"));
    for idle in ["idle_b", "idle_c"] {
        let r = clients.one("application_name", idle);
        assert_eq!((clients.get(r, "state"), clients.get(r, "link")), ("idle", ""));
    }
    // psql's own console session is listed too.
    let console = clients.one("database", "pgmux");
    assert_eq!((clients.get(console, "user"), clients.get(console, "state")), ("postgres", "active"));

    let servers = show(&proxy, "SERVERS").await;
    assert_eq!(servers.columns[21..], ["node", "role"]);
    let s = servers.one("remote_pid", &pid);
    assert_eq!((servers.get(s, "state"), servers.get(s, "database"), servers.get(s, "user")), ("active", DB, APP.0));
    assert_eq!(servers.get(s, "port"), support::cluster_async().await.primary().port().to_string());
    assert_eq!((servers.get(s, "ptr"), servers.get(s, "link")), (server_ptr.as_str(), clients.get(holder, "ptr")));
    assert_eq!(servers.get(s, "application_name"), "holder");

    a.batch_execute("COMMIT").await.unwrap();
    // The client may read COMMIT's answer a moment before pgmux checks the backend in.
    eventually(SOON, "the backend to be idle after COMMIT", || async {
        let servers = show(&proxy, "SERVERS").await;
        servers.find("remote_pid", &pid).iter().any(|r| servers.get(r, "state") == "idle")
    })
    .await;
    let pools = show(&proxy, "POOLS").await;
    let row = pools.one("database", DB);
    assert_eq!((pools.get(row, "cl_active"), pools.get(row, "sv_active")), ("3", "0"));
    assert_eq!(pools.get(row, "cl_idle"), "3");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_stats_counts_transactions() {
    let proxy = admin_proxy(2).await;
    let c = proxy.app().await;
    c.simple_query("SELECT 1").await.unwrap();
    let before = show(&proxy, "STATS").await;
    let total = |t: &Table, col| t.get(t.one("database", DB), col).parse::<u64>().unwrap();
    for _ in 0..4 {
        c.simple_query("SELECT 1").await.unwrap();
    }
    c.batch_execute("BEGIN").await.unwrap();
    c.batch_execute("SELECT pg_sleep(0.05)").await.unwrap();
    c.batch_execute("COMMIT").await.unwrap();
    // Transaction time is added when the backend is released, which may be a
    // moment after the client read COMMIT's answer.
    eventually(SOON, "the explicit transaction's time to be counted", || async {
        let after = show(&proxy, "STATS").await;
        total(&after, "total_xact_time") - total(&before, "total_xact_time") >= 50_000
    })
    .await;
    let after = show(&proxy, "STATS").await;
    assert_eq!(total(&after, "total_xact_count") - total(&before, "total_xact_count"), 5);
    assert!(total(&after, "avg_xact_time") > 0);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_databases_config_replicas_version_and_help() {
    let cluster = support::cluster_async().await;
    let toml = admin_config_with_replica(cluster, 3, "query_wait_timeout = \"7s\"", "min_pool_size = 1\n");
    let proxy = Proxy::start(&toml).await;

    let dbs = show(&proxy, "DATABASES").await;
    let app = dbs.one("name", DB);
    assert_eq!(dbs.get(app, "host"), cluster.primary().host());
    assert_eq!(dbs.get(app, "port"), cluster.primary().port().to_string());
    assert_eq!(dbs.get(app, "database"), DB);
    assert_eq!((dbs.get(app, "pool_size"), dbs.get(app, "min_pool_size")), ("3", "1"));
    // pool_mode is the database's own (NULL, printed empty: it inherits [proxy]'s).
    assert_eq!((dbs.get(app, "pool_mode"), dbs.get(app, "paused"), dbs.get(app, "disabled")), ("", "0", "0"));
    assert_eq!((dbs.get(app, "force_user"), dbs.get(app, "server_lifetime")), ("", "3600"));
    assert_eq!(dbs.get(dbs.one("name", "postgres"), "min_pool_size"), "0");

    let config = show(&proxy, "CONFIG").await;
    assert_eq!(config.columns, ["key", "value", "default", "changeable"]);
    let qwt = config.one("key", "proxy.query_wait_timeout");
    assert_eq!((config.get(qwt, "value"), config.get(qwt, "default")), ("7s", "5s"));
    let listen = config.one("key", "proxy.listen");
    assert_eq!(config.get(listen, "value"), "127.0.0.1:0");
    assert_eq!(config.get(config.one("key", "routing.load_balance"), "value"), "least_connections");
    // PgBouncer's names follow pgmux's, in PgBouncer's formats.
    let qwt = config.one("key", "query_wait_timeout");
    assert_eq!(
        (config.get(qwt, "value"), config.get(qwt, "default"), config.get(qwt, "changeable")),
        ("7", "5", "yes")
    );
    assert_eq!(config.get(config.one("key", "listen_port"), "changeable"), "no");
    // No password setting, and no password's value (the default auth_query
    // names the catalog column `rolpassword`: a query, not a secret).
    let key = config.col("key");
    assert!(!config.rows.iter().any(|r| r[key].contains("password")));
    assert!(!config.rows.iter().flatten().any(|v| v.contains(APP.1)));

    let replicas = show(&proxy, "REPLICAS").await;
    assert_eq!(
        replicas.columns,
        ["database", "node", "role", "host", "port", "weight", "state", "lsn", "lag_bytes", "lag_ms", "in_rotation"]
    );
    let r = replicas.one("role", "replica");
    assert_eq!(replicas.get(r, "database"), DB);
    assert_eq!(replicas.get(r, "port"), cluster.replicas()[0].port().to_string());
    assert_eq!(replicas.get(r, "weight"), "1");
    // Monitors start with the database's first routed client, and report within a few intervals.
    assert!(["unmonitored", "up", "down"].contains(&replicas.get(r, "state")), "{replicas:?}");
    assert_eq!(replicas.get(replicas.one("role", "primary"), "port"), cluster.primary().port().to_string());

    let version = show(&proxy, "VERSION").await;
    assert_eq!(version.columns, ["version"]);
    assert_eq!(version.rows, [[format!("pgmux {}", env!("CARGO_PKG_VERSION"))]]);

    let (_, notices) = psql(&proxy, "show help;").await.expect("SHOW HELP");
    for cmd in
        ["SHOW POOLS", "SHOW NODE_STATS", "SHOW STATS_TOTALS", "PAUSE [db]", "KILL_CLIENT id", "SHUTDOWN", "RELOAD"]
    {
        assert!(notices.contains(cmd), "SHOW HELP lacks {cmd}: {notices}");
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_refuses_non_admins_and_unknown_commands() {
    let proxy = admin_proxy(2).await;
    let e = proxy.connect(APP.0, Some(APP.1), "pgmux").await.expect_err("app is not an admin");
    assert_eq!(code(&e), "28000");

    let admin = admin_client(&proxy).await;
    let e = admin.simple_query("SHOW NOTHING").await.unwrap_err();
    assert_eq!(code(&e), "42601");
    assert!(e.as_db_error().unwrap().message().contains("SHOW POOLS"), "{e}");
    // Started from a string, not a file: nothing to reload.
    assert_eq!(code(&admin.simple_query("RELOAD").await.unwrap_err()), "55000");
    assert_eq!(code(&admin.simple_query("KILL_CLIENT 999999").await.unwrap_err()), "42704");
    assert_eq!(code(&admin.simple_query("PAUSE nosuchdb").await.unwrap_err()), "3D000");
    // The session survives errors.
    assert!(!admin.simple_query("show version").await.unwrap().is_empty());

    let err = psql(&proxy, "SELECT 1").await.expect_err("not a console command");
    assert!(err.contains("42601"), "{err}");
    proxy.shutdown().await;
}

/// Tools written for PgBouncer connect to database `pgbouncer`: the same
/// console, for the same users.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_answers_on_database_pgbouncer_too() {
    let proxy = admin_proxy(2).await;
    let e = proxy.connect(APP.0, Some(APP.1), "pgbouncer").await.expect_err("app is not an admin");
    assert_eq!(code(&e), "28000");
    let console = proxy.connect("postgres", None, "pgbouncer").await.expect("console on database pgbouncer");
    let rows = console.simple_query("SHOW VERSION").await.unwrap();
    assert!(rows.iter().any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_))));
    let clients = show(&proxy, "CLIENTS").await;
    assert_eq!(clients.find("database", "pgbouncer").len(), 1, "{clients:?}");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_waits_for_the_open_transaction_then_holds_new_ones_until_resume() {
    let proxy = admin_proxy(2).await;
    let holder = proxy.app().await;
    let later = app_named(&proxy, "later").await;
    holder.batch_execute("BEGIN").await.unwrap();
    holder.simple_query("SELECT 1").await.unwrap();

    let pauser = admin_client(&proxy).await;
    let mut pause = tokio::spawn(async move { pauser.simple_query("PAUSE app").await.map(|_| ()) });
    eventually(SOON, "SHOW DATABASES to report app paused", || async {
        let dbs = show(&proxy, "DATABASES").await;
        dbs.get(dbs.one("name", DB), "paused") == "1"
    })
    .await;
    // The open transaction keeps PAUSE waiting, and may go on.
    assert!(tokio::time::timeout(HELD, &mut pause).await.is_err(), "PAUSE returned with a transaction open");
    holder.simple_query("SELECT 2").await.unwrap();
    holder.batch_execute("COMMIT").await.unwrap();
    tokio::time::timeout(SOON, &mut pause).await.expect("PAUSE returns once the transaction ended").unwrap().unwrap();

    // New transactions wait; the client stays connected.
    let mut held = tokio::spawn(async move { later.simple_query("SELECT 3").await.map(|_| later) });
    assert!(tokio::time::timeout(HELD, &mut held).await.is_err(), "a transaction ran while paused");
    let clients = show(&proxy, "CLIENTS").await;
    assert_eq!(clients.get(clients.one("application_name", "later"), "state"), "waiting");
    let pools = show(&proxy, "POOLS").await;
    assert_eq!(pools.get(pools.one("database", DB), "cl_waiting"), "1");

    let resumer = admin_client(&proxy).await;
    resumer.simple_query("RESUME app").await.unwrap();
    let later = tokio::time::timeout(SOON, held).await.expect("RESUME releases the held client").unwrap().unwrap();
    assert_eq!(scalar(&later, "SELECT 4").await, "4");
    assert_eq!(code(&resumer.simple_query("RESUME app").await.unwrap_err()), "55000");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_client_closes_the_victim() {
    let proxy = admin_proxy(2).await;
    let victim = app_named(&proxy, "victim").await;
    let bystander = app_named(&proxy, "bystander").await;
    victim.simple_query("SELECT 1").await.unwrap();
    let clients = show(&proxy, "CLIENTS").await;
    let id = clients.get(clients.one("application_name", "victim"), "id").to_owned();

    let (_, _) = psql(&proxy, &format!("KILL_CLIENT {id}")).await.expect("KILL_CLIENT");
    eventually(SOON, "the victim's connection to close", || async { victim.is_closed() }).await;
    assert!(victim.simple_query("SELECT 1").await.is_err());
    eventually(SOON, "the victim to leave SHOW CLIENTS", || async {
        show(&proxy, "CLIENTS").await.find("application_name", "victim").is_empty()
    })
    .await;
    assert_eq!(scalar(&bystander, "SELECT 5").await, "5");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_the_proxy() {
    let mut proxy = admin_proxy(2).await;
    let c = proxy.app().await;
    c.simple_query("SELECT 1").await.unwrap();
    psql(&proxy, "SHUTDOWN").await.expect("SHUTDOWN");
    tokio::time::timeout(SOON, proxy.wait_stopped()).await.expect("pgmux stopped after SHUTDOWN");
    eventually(SOON, "the idle client to be closed", || async { c.is_closed() }).await;
    assert!(TcpStream::connect(proxy.addr).await.is_err(), "pgmux still accepts connections");
}

/// GET `path` over a raw socket; returns the status line and body.
async fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect to /metrics");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: pgmux\r\n\r\n").as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(SOON, s.read_to_string(&mut response)).await.expect("response in time").unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("HTTP head and body");
    (head.lines().next().unwrap_or_default().to_owned(), body.to_owned())
}

/// Samples by their full series name (`name{labels}`).
async fn scrape(proxy: &Proxy) -> (String, HashMap<String, f64>) {
    let (status, body) = http_get(proxy.metrics.expect("metrics enabled"), "/metrics").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    let samples = body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("malformed sample line {l:?}"));
            (series.to_owned(), value.parse::<f64>().unwrap_or_else(|_| panic!("bad value in {l:?}")))
        })
        .collect();
    (body, samples)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_transactions_exactly() {
    let cluster = support::cluster_async().await;
    let proxy = Proxy::start_with_metrics(&standard_config(cluster, 2, "")).await;
    let c = proxy.app().await;
    c.simple_query("SELECT 1").await.unwrap();
    let xacts = r#"pgmux_transactions_total{database="app",user="app"}"#;

    let idle = r#"pgmux_clients{database="app",user="app",state="idle"}"#;
    eventually(SOON, "the client to be idle", || async { scrape(&proxy).await.1[idle] == 1.0 }).await;
    let (body, before) = scrape(&proxy).await;
    for name in [
        "pgmux_clients",
        "pgmux_server_connections",
        "pgmux_pool_waiting_clients",
        "pgmux_transactions_total",
        "pgmux_client_connections_total",
        "pgmux_auth_failures_total",
        "pgmux_pool_wait_timeouts_total",
    ] {
        assert!(body.contains(&format!("\n# HELP {name} ")) || body.starts_with(&format!("# HELP {name} ")));
        assert!(body.contains(&format!("# TYPE {name} ")), "no TYPE for {name}");
    }
    assert_eq!(before[r#"pgmux_clients{database="app",user="app",state="active"}"#], 0.0);

    for _ in 0..3 {
        c.simple_query("SELECT 1").await.unwrap();
    }
    for _ in 0..2 {
        c.batch_execute("BEGIN").await.unwrap();
        c.simple_query("SELECT 1").await.unwrap();
        c.batch_execute("COMMIT").await.unwrap();
    }
    let e = proxy.connect(APP.0, Some("wrong"), DB).await.expect_err("wrong password");
    assert_eq!(code(&e), "28P01");

    let (_, after) = scrape(&proxy).await;
    assert_eq!(after[xacts] - before[xacts], 5.0);
    assert_eq!(after["pgmux_auth_failures_total"] - before["pgmux_auth_failures_total"], 1.0);
    assert!(after["pgmux_client_connections_total"] >= before["pgmux_client_connections_total"] + 1.0);
    assert_eq!(after["pgmux_pool_wait_timeouts_total"], 0.0);
    assert_eq!(http_get(proxy.metrics.unwrap(), "/other").await.0, "HTTP/1.1 404 Not Found");
    proxy.shutdown().await;
}

/// `app` on `app` as `name`, with the connection task's own result: an
/// error the server (pgmux) sends outside any query ends it.
async fn app_watched(
    proxy: &Proxy,
    name: &str,
) -> (tokio_postgres::Client, tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>) {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(proxy.port())
        .user(APP.0)
        .password(APP.1)
        .dbname(DB)
        .application_name(name)
        .connect_timeout(SOON);
    let (client, connection) = config.connect(tokio_postgres::NoTls).await.expect("connect through pgmux");
    (client, tokio::spawn(connection))
}

async fn client_id(proxy: &Proxy, application_name: &str) -> String {
    let clients = show(proxy, "CLIENTS").await;
    clients.get(clients.one("application_name", application_name), "id").to_owned()
}

/// `state` of a server session in pg_stat_activity, seen directly on the primary.
async fn backend_state(su: &tokio_postgres::Client, pid: &str) -> String {
    scalar(
        su,
        &format!(
            "SELECT coalesce(state, 'gone') FROM pg_stat_activity WHERE pid = {pid} UNION ALL SELECT 'gone' LIMIT 1"
        ),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_client_inside_a_transaction_acts_at_once_and_cleans_the_backend() {
    let su = support::superuser(DB).await;
    su.batch_execute(
        "CREATE TABLE IF NOT EXISTS admin_kill_lock (id int PRIMARY KEY);
         INSERT INTO admin_kill_lock VALUES (1) ON CONFLICT DO NOTHING;
         GRANT ALL ON admin_kill_lock TO app;",
    )
    .await
    .unwrap();
    let proxy = admin_proxy(3).await;

    // Idle inside a transaction, holding a row lock.
    let (holder, holder_conn) = app_watched(&proxy, "kill_holder").await;
    holder.batch_execute("BEGIN").await.unwrap();
    holder.simple_query("SELECT id FROM admin_kill_lock WHERE id = 1 FOR UPDATE").await.unwrap();
    let holder_pid = scalar(&holder, "SELECT pg_backend_pid()").await;
    // Running a statement inside a transaction.
    let (sleeper, _sleeper_conn) = app_watched(&proxy, "kill_sleeper").await;
    sleeper.batch_execute("BEGIN").await.unwrap();
    let sleeper_pid = scalar(&sleeper, "SELECT pg_backend_pid()").await;
    let sleeping = tokio::spawn(async move { sleeper.simple_query("SELECT pg_sleep(60)").await.map(|_| ()) });
    eventually(SOON, "the sleeper's statement to run", || async { backend_state(&su, &sleeper_pid).await == "active" })
        .await;

    let id = client_id(&proxy, "kill_holder").await;
    psql(&proxy, &format!("KILL_CLIENT {id}")).await.expect("KILL_CLIENT");
    // Without acting at once, the holder would stay linked until it ends its transaction.
    let ended = tokio::time::timeout(SOON, holder_conn).await.expect("the holder is closed at once").unwrap();
    assert_eq!(code(&ended.expect_err("closed with an error")), "57P01");
    assert!(holder.is_closed());

    let id = client_id(&proxy, "kill_sleeper").await;
    psql(&proxy, &format!("KILL_CLIENT {id}")).await.expect("KILL_CLIENT");
    let e = tokio::time::timeout(SOON, sleeping).await.expect("the running statement ends at once").unwrap();
    assert_eq!(code(&e.expect_err("the statement fails")), "57P01");

    // Both backends are rolled back and go back to the pool clean.
    let other = proxy.app().await;
    tokio::time::timeout(
        SOON,
        other.batch_execute("BEGIN; SELECT id FROM admin_kill_lock WHERE id = 1 FOR UPDATE; COMMIT"),
    )
    .await
    .expect("the row lock was released")
    .unwrap();
    for pid in [&holder_pid, &sleeper_pid] {
        eventually(SOON, "the killed client's backend to be idle on the server", || async {
            backend_state(&su, pid).await == "idle"
        })
        .await;
        eventually(SOON, "the killed client's backend to be idle in the pool", || async {
            let servers = show(&proxy, "SERVERS").await;
            servers.find("remote_pid", pid).iter().any(|r| servers.get(r, "state") == "idle")
        })
        .await;
    }
    proxy.shutdown().await;
}

/// A scrape parsed by a Prometheus text-format parser.
struct Scraped(prometheus_parse::Scrape);

impl Scraped {
    async fn take(proxy: &Proxy) -> Scraped {
        let (status, body) = http_get(proxy.metrics.expect("metrics enabled"), "/metrics").await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).expect("parse /metrics");
        // Every histogram is well formed: buckets never decrease, and +Inf is the count.
        for s in &scrape.samples {
            if let prometheus_parse::Value::Histogram(buckets) = &s.value {
                let mut sorted = buckets.clone();
                sorted.sort_by(|a, b| a.less_than.total_cmp(&b.less_than));
                assert!(sorted.windows(2).all(|w| w[0].count <= w[1].count), "{s:?}");
                let inf = sorted.last().expect("buckets");
                assert!(inf.less_than.is_infinite());
                let count = Scraped(scrape.clone()).get(&format!("{}_count", s.metric), &label_pairs(&s.labels));
                assert_eq!(Some(inf.count), count, "{s:?}");
            }
        }
        Scraped(scrape)
    }

    /// The value of the series `name` whose labels are exactly `labels`.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        use prometheus_parse::Value;
        let found: Vec<f64> = self
            .0
            .samples
            .iter()
            .filter(|s| s.metric == name && label_pairs(&s.labels).len() == labels.len())
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .filter_map(|s| match s.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(v),
                _ => None,
            })
            .collect();
        assert!(found.len() <= 1, "several {name}{labels:?}");
        found.first().copied()
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or_else(|| panic!("no {name}{labels:?} in /metrics"))
    }
}

fn label_pairs(labels: &prometheus_parse::Labels) -> Vec<(&str, &str)> {
    labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_show_stats_count_queries_bytes_errors_and_prepared_statements() {
    let cluster = support::cluster_async().await;
    // One server connection: the prepared statement is always on the backend used.
    let proxy = Proxy::start_with_metrics(&admin_config(cluster, 1, "")).await;
    let c = proxy.app().await;
    c.simple_query("SELECT 1").await.unwrap();
    let primary = cluster.primary().host_port();
    let pool = [("database", DB), ("user", APP.0), ("node", primary.as_str())];
    let unrouted = [("database", DB), ("user", APP.0), ("node", primary.as_str()), ("reason", "unrouted")];
    let xacts = r#"pgmux_transaction_duration_seconds_count"#;
    // Transaction time is counted when the backend is released, just after
    // the client got its answer: wait for the warm-up to be counted.
    eventually(SOON, "the warm-up transaction to be counted", || async {
        Scraped::take(&proxy).await.get(xacts, &pool) == Some(1.0)
    })
    .await;
    let before = Scraped::take(&proxy).await;

    // Simple queries: bytes counted exactly. `Q` + length + "SELECT 1\0" in;
    // RowDescription (34) + DataRow (12) + CommandComplete (14) + ReadyForQuery (6) out.
    for _ in 0..5 {
        c.simple_query("SELECT 1").await.unwrap();
    }
    // Parse/Describe/Sync, then Bind/Execute/Sync twice: each Describe and
    // Bind finds the statement on the backend.
    let st = c.prepare("SELECT $1::int").await.unwrap();
    for i in 0..2 {
        assert_eq!(c.query_one(&st, &[&i]).await.unwrap().get::<_, i32>(0), i);
    }
    // Last: the client hears of the error before the ReadyForQuery, and a
    // request sent at once could join this transaction.
    let e = c.simple_query("SELECT 1/0").await.unwrap_err();
    assert_eq!(code(&e), "22012");
    // 5 + 1 + 2 + 1 transactions of one request each.
    let done = 9.0;
    let queries = "pgmux_query_duration_seconds_count";
    eventually(SOON, "every transaction to be counted", || async {
        let m = Scraped::take(&proxy).await;
        m.value(xacts, &pool) - before.value(xacts, &pool) >= done
            && m.value(queries, &pool) - before.value(queries, &pool) >= done
    })
    .await;
    let after = Scraped::take(&proxy).await;
    let delta = |name: &str, labels: &[(&str, &str)]| after.value(name, labels) - before.value(name, labels);
    assert_eq!(delta(xacts, &pool), done);
    assert_eq!(delta(queries, &pool), done);
    assert_eq!(delta("pgmux_pool_wait_seconds_count", &pool), done);
    assert_eq!(delta("pgmux_node_transactions_total", &unrouted), done);
    assert_eq!(delta("pgmux_node_queries_total", &unrouted), done);
    assert_eq!(delta("pgmux_transactions_total", &[("database", DB), ("user", APP.0)]), done);
    assert!(delta("pgmux_query_duration_seconds_sum", &pool) > 0.0);
    assert!(delta("pgmux_bytes_in_total", &pool) > 5.0 * 14.0);
    assert!(delta("pgmux_bytes_out_total", &pool) > 5.0 * 66.0);
    assert_eq!(delta("pgmux_prepared_cache_hits_total", &pool), 3.0);
    assert_eq!(delta("pgmux_prepared_cache_misses_total", &pool), 0.0);
    assert_eq!(after.value("pgmux_errors_total", &[("class", "22")]), 1.0);
    assert_eq!(after.get("pgmux_errors_total", &[("class", "42")]), None);
    assert_eq!(
        after.value(
            "pgmux_server_connections",
            &[("database", DB), ("user", APP.0), ("node", &primary), ("state", "idle")]
        ),
        1.0
    );

    // Exactly the bytes of five simple queries.
    let before = Scraped::take(&proxy).await;
    for _ in 0..5 {
        c.simple_query("SELECT 1").await.unwrap();
    }
    eventually(SOON, "the five queries to be counted", || async {
        Scraped::take(&proxy).await.value(xacts, &pool) - before.value(xacts, &pool) >= 5.0
    })
    .await;
    let after = Scraped::take(&proxy).await;
    assert_eq!(after.value("pgmux_bytes_in_total", &pool) - before.value("pgmux_bytes_in_total", &pool), 5.0 * 14.0);
    assert_eq!(after.value("pgmux_bytes_out_total", &pool) - before.value("pgmux_bytes_out_total", &pool), 5.0 * 66.0);

    let stats = show(&proxy, "NODE_STATS").await;
    let row = stats.one("database", DB);
    let n = |col| stats.num(row, col);
    // Checkouts also count the one that learnt the server's parameters at
    // the first login: a server assignment, not a client's transaction.
    assert_eq!((n("total_query_count"), n("total_xact_count")), (1 + 9 + 5, 1 + 9 + 5));
    assert_eq!(n("total_server_assignment_count"), 1 + 1 + 9 + 5);
    assert_eq!((n("total_client_parse_count"), n("total_server_parse_count"), n("total_bind_count")), (1, 1, 2));
    assert!(n("total_received") >= 10 * 14, "{stats:?}");
    assert_eq!(n("total_received"), after.value("pgmux_bytes_in_total", &pool) as u64);
    assert_eq!(n("total_sent"), after.value("pgmux_bytes_out_total", &pool) as u64);
    assert!(n("total_query_time") > 0 && n("avg_query_time") > 0, "{stats:?}");
    assert_eq!(n("avg_query_time"), n("total_query_time") / n("total_query_count"));
    assert_eq!((stats.get(row, "node"), stats.get(row, "role")), (primary.as_str(), "primary"));
    assert_eq!(after.value("pgmux_prepared_binds_total", &pool), 2.0);
    let pair = [("database", DB), ("user", APP.0)];
    assert_eq!(after.value("pgmux_prepared_client_parses_total", &pair), 1.0);
    assert_eq!(after.value("pgmux_prepared_server_parses_total", &pair), 1.0);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_pools_show_up_in_metrics_and_show_commands() {
    let cluster = support::cluster_async().await;
    let primary = cluster.primary().host_port();
    let replica = cluster.replicas()[0].host_port();
    let toml = admin_config_with_replica(cluster, 2, "", "") + "\n[routing]\nmonitor_interval = \"10ms\"\n";
    let proxy = Proxy::start_with_metrics(&toml).await;
    let c = proxy.app().await;
    // The replica takes reads once its monitor has reported it healthy.
    eventually(SOON, "a read to be served by the replica", || async {
        scalar(&c, "SELECT inet_server_port()").await == cluster.replicas()[0].port().to_string()
    })
    .await;
    let node = [("database", DB), ("node", replica.as_str())];
    let on_replica = [("database", DB), ("user", APP.0), ("node", replica.as_str())];
    eventually(SOON, "the replica's transaction to be counted", || async {
        let m = Scraped::take(&proxy).await;
        m.get("pgmux_transaction_duration_seconds_count", &on_replica).unwrap_or(0.0) >= 1.0
    })
    .await;
    let m = Scraped::take(&proxy).await;
    let conns: f64 = ["active", "idle", "login"]
        .iter()
        .map(|s| m.value("pgmux_server_connections", &[on_replica[0], on_replica[1], on_replica[2], ("state", s)]))
        .sum();
    assert!(conns >= 1.0, "no server connection to the replica counted");
    let read = [on_replica[0], on_replica[1], on_replica[2], ("reason", "read")];
    assert!(m.value("pgmux_node_transactions_total", &read) >= 1.0);
    assert!(m.value("pgmux_node_queries_total", &read) >= 1.0);
    assert!(m.value("pgmux_query_duration_seconds_count", &on_replica) >= 1.0);
    assert!(m.value("pgmux_bytes_out_total", &on_replica) > 0.0);
    assert_eq!(m.value("pgmux_replica_in_rotation", &node), 1.0);
    assert!(m.value("pgmux_replica_lag_seconds", &node) >= 0.0);
    assert!(m.value("pgmux_replica_lag_bytes", &node) >= 0.0);
    assert_eq!(m.value("pgmux_node_up", &node), 1.0);

    let pools = show(&proxy, "NODE_POOLS").await;
    let r = pools.one("node", &replica);
    assert_eq!((pools.get(r, "database"), pools.get(r, "user"), pools.get(r, "role")), (DB, APP.0, "replica"));
    let p = pools.one("node", &primary);
    assert_eq!(pools.get(p, "role"), "primary");
    // SHOW POOLS has PgBouncer's one row per (database, user): the nodes summed.
    let summed = show(&proxy, "POOLS").await;
    let s = summed.one("database", DB);
    assert_eq!(summed.num(s, "sv_open"), pools.num(r, "sv_open") + pools.num(p, "sv_open"), "{summed:?} {pools:?}");
    let servers = show(&proxy, "SERVERS").await;
    let on = servers.find("role", "replica");
    assert!(!on.is_empty(), "{servers:?}");
    assert!(on.iter().all(|r| servers.get(r, "port") == cluster.replicas()[0].port().to_string()), "{servers:?}");
    let stats = show(&proxy, "NODE_STATS").await;
    let r = stats.one("node", &replica);
    assert_eq!(stats.get(r, "role"), "replica");
    assert!(stats.num(r, "total_query_count") >= 1, "{stats:?}");
    // SHOW STATS sums the nodes (once the last read is counted, just after its answer).
    eventually(SOON, "SHOW STATS to be NODE_STATS summed", || async {
        let nodes = show(&proxy, "NODE_STATS").await;
        let stats = show(&proxy, "STATS").await;
        let q = |t: &Table, r: &Vec<String>| t.num(r, "total_query_count");
        q(&stats, stats.one("database", DB))
            == q(&nodes, nodes.one("node", &replica)) + q(&nodes, nodes.one("node", &primary))
    })
    .await;
    proxy.shutdown().await;
}

/// A replica with `weight = 0` takes no reads, and the admin views say so
/// (they ask routing's own rule; they once reported it in rotation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_of_weight_zero_is_reported_out_of_rotation() {
    let cluster = support::cluster_async().await;
    let replica = cluster.replicas()[0].host_port();
    let toml = admin_config_with_replica(cluster, 2, "", "").replace(
        &format!("replicas = [\"{replica}\"]"),
        &format!("replicas = [{{ addr = \"{replica}\", weight = 0 }}]"),
    );
    let proxy = Proxy::start_with_metrics(&toml).await;
    let c = proxy.app().await;
    let node = [("database", DB), ("node", replica.as_str())];
    eventually(SOON, "the replica's monitor to see it up", || async {
        c.simple_query("SELECT 1").await.unwrap();
        Scraped::take(&proxy).await.get("pgmux_node_up", &node) == Some(1.0)
    })
    .await;
    assert_eq!(Scraped::take(&proxy).await.value("pgmux_replica_in_rotation", &node), 0.0);
    let replicas = show(&proxy, "REPLICAS").await;
    let r = replicas.one("role", "replica");
    assert_eq!(replicas.get(r, "in_rotation"), "no (weight 0)");
    assert_ne!(scalar(&c, "SELECT inet_server_port()").await, cluster.replicas()[0].port().to_string());
    proxy.shutdown().await;
}

/// Server connections of `db` open on the primary (all users).
async fn server_connections(su: &tokio_postgres::Client, db: &str) -> String {
    scalar(su, &format!("SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND pid <> pg_backend_pid()"))
        .await
}

/// `RECONNECT db` closes idle server connections now and busy ones when
/// their transaction ends; `KILL db` closes the database's clients and
/// server connections at once, so `DROP DATABASE` succeeds, and holds its
/// new transactions until `RESUME` (PgBouncer's semantics).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_and_kill_free_a_database() {
    let cluster = support::cluster_async().await;
    let su = support::superuser("postgres").await;
    su.batch_execute("DROP DATABASE IF EXISTS killme").await.unwrap();
    su.batch_execute("CREATE DATABASE killme OWNER app").await.unwrap();
    let toml = format!(
        "{}\n[[databases]]\nname = \"killme\"\nprimary = \"{}\"\npool_size = 3\n",
        admin_config(cluster, 2, ""),
        cluster.primary().host_port()
    );
    let proxy = Proxy::start(&toml).await;
    let admin = admin_client(&proxy).await;
    let c1 = proxy.connect(APP.0, Some(APP.1), "killme").await.unwrap();
    let c2 = proxy.connect(APP.0, Some(APP.1), "killme").await.unwrap();
    c2.batch_execute("BEGIN").await.unwrap();
    c2.simple_query("SELECT 1").await.unwrap();
    c1.simple_query("SELECT 1").await.unwrap();
    assert_eq!(server_connections(&su, "killme").await, "2");

    admin.simple_query("RECONNECT killme").await.unwrap();
    eventually(SOON, "the idle server connection to close", || async {
        server_connections(&su, "killme").await == "1"
    })
    .await;
    c2.batch_execute("COMMIT").await.unwrap();
    eventually(SOON, "the busy one to close after its transaction", || async {
        server_connections(&su, "killme").await == "0"
    })
    .await;
    assert_eq!(scalar(&c1, "SELECT 2").await, "2");
    assert_eq!(code(&admin.simple_query("RECONNECT nosuchdb").await.unwrap_err()), "3D000");

    c2.batch_execute("BEGIN").await.unwrap();
    admin.simple_query("KILL killme").await.unwrap();
    eventually(SOON, "killme's clients to be closed", || async { c1.is_closed() && c2.is_closed() }).await;
    eventually(SOON, "killme's server connections to close", || async {
        server_connections(&su, "killme").await == "0"
    })
    .await;
    su.batch_execute("DROP DATABASE killme").await.expect("DROP DATABASE right after KILL");
    // The app database's clients never noticed.
    assert_eq!(scalar(&proxy.app().await, "SELECT 3").await, "3");

    su.batch_execute("CREATE DATABASE killme OWNER app").await.unwrap();
    let c3 = proxy.connect(APP.0, Some(APP.1), "killme").await.unwrap();
    let mut held = tokio::spawn(async move { c3.simple_query("SELECT 4").await.map(|_| c3) });
    assert!(tokio::time::timeout(HELD, &mut held).await.is_err(), "a transaction ran on a killed database");
    admin.simple_query("RESUME killme").await.unwrap();
    let c3 = tokio::time::timeout(SOON, held).await.expect("RESUME releases it").unwrap().unwrap();
    assert_eq!(scalar(&c3, "SELECT 5").await, "5");
    drop(c3);
    admin.simple_query("KILL killme").await.unwrap();
    eventually(SOON, "killme's server connections to close", || async {
        server_connections(&su, "killme").await == "0"
    })
    .await;
    su.batch_execute("DROP DATABASE killme").await.unwrap();
    proxy.shutdown().await;
}
