//! The admin console through psql and tokio-postgres, and `/metrics` over raw
//! HTTP, against pgmux in front of the real test cluster.

#[path = "../support/mod.rs"]
mod support;

mod metrics;

use metrics::Scraped;

use support::{code, scalar};

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
    app_watched(proxy, name).await.0
}

/// `app` on `app` as `name`, with the connection task's own result: an
/// error the server (pgmux) sends outside any query ends it.
pub(crate) async fn app_watched(
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
        [
            "database",
            "node",
            "role",
            "host",
            "port",
            "weight",
            "state",
            "lsn",
            "lag_bytes",
            "lag_ms",
            "in_rotation",
            "timeline",
            "stated_role",
            "since_s"
        ]
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
    let killed = std::time::Instant::now();
    admin.simple_query("KILL killme").await.unwrap();
    eventually(SOON, "killme's clients to be closed", || async { c1.is_closed() && c2.is_closed() }).await;
    eventually(SOON, "killme's server connections to close", || async {
        server_connections(&su, "killme").await == "0"
    })
    .await;
    // At once, not at the end of a transaction or a timeout.
    assert!(killed.elapsed() < Duration::from_secs(1), "KILL took {:?}", killed.elapsed());
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
