//! `/metrics` and the SHOW views against it: exact counts, replicas.

use super::*;

use std::collections::HashMap;
use std::net::SocketAddr;

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
pub(crate) struct Scraped(prometheus_parse::Scrape);

impl Scraped {
    pub(crate) async fn take(proxy: &Proxy) -> Scraped {
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
    pub(crate) fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
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

    pub(crate) fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
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
    let pool = [("database", DB), ("user", APP.0), ("node", primary.as_str()), ("role", "primary")];
    let unrouted =
        [("database", DB), ("user", APP.0), ("node", primary.as_str()), ("role", "primary"), ("reason", "unrouted")];
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
            &[("database", DB), ("user", APP.0), ("node", &primary), ("role", "primary"), ("state", "idle")]
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
    let on_replica = [("database", DB), ("user", APP.0), ("node", replica.as_str()), ("role", "replica")];
    eventually(SOON, "the replica's transaction to be counted", || async {
        let m = Scraped::take(&proxy).await;
        m.get("pgmux_transaction_duration_seconds_count", &on_replica).unwrap_or(0.0) >= 1.0
    })
    .await;
    let m = Scraped::take(&proxy).await;
    let conns: f64 = ["active", "idle", "login"]
        .iter()
        .map(|s| {
            m.value(
                "pgmux_server_connections",
                &[on_replica[0], on_replica[1], on_replica[2], on_replica[3], ("state", s)],
            )
        })
        .sum();
    assert!(conns >= 1.0, "no server connection to the replica counted");
    let read = [on_replica[0], on_replica[1], on_replica[2], on_replica[3], ("reason", "read")];
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
