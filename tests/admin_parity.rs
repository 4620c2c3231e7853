//! The admin console as PgBouncer 1.25's, on database `pgbouncer`: every
//! SHOW with PgBouncer's columns, in its order and with its types, and
//! statistics that move by exactly the traffic sent, as PgBouncer defines it.
//! (What a PgBouncer exporter reads is in pgbouncer_exporter.rs.)

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use postgres_protocol::message::frontend;
use support::console::{Table, psql_on, show_on};
use support::pgbouncer::{SHOWS, columns, oid, values};
use support::proxy::{Proxy, admin_config};
use support::raw::{Msg, Raw};
use support::{APP, DB, TRUST, eventually};

const SOON: Duration = Duration::from_secs(10);
const CONSOLE: &str = "pgbouncer";

async fn console_proxy(extra: &str) -> Proxy {
    let cluster = support::cluster_async().await;
    Proxy::start_with_metrics(&(admin_config(cluster, 2, "") + extra)).await
}

async fn show(proxy: &Proxy, what: &str) -> Table {
    show_on(proxy, CONSOLE, what).await
}

/// Every SHOW PgBouncer 1.25 has, through psql on database `pgbouncer`:
/// PgBouncer's column names in PgBouncer's order, then pgmux's; through the
/// protocol: PgBouncer's types, and integers wherever one is declared (a
/// driver decoding by type, like lib/pq, fails the whole result otherwise).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_show_has_pgbouncer_columns_in_order_with_their_types() {
    let proxy = console_proxy("").await;
    // Something to list: an idle client, and one holding a server connection.
    let idle = proxy.app().await;
    idle.simple_query("SELECT 1").await.unwrap();
    let holder = proxy.app().await;
    holder.batch_execute("BEGIN").await.unwrap();
    holder.simple_query("SELECT 1").await.unwrap();

    let mut raw = Raw::login(proxy.addr, "postgres", CONSOLE).await;
    let mut tables = HashMap::new();
    for show_ in SHOWS {
        let table = show(&proxy, show_.command).await;
        let expected: Vec<&str> = show_.names.iter().chain(show_.extras).copied().collect();
        assert_eq!(table.columns, expected, "SHOW {}", show_.command);

        let msgs = raw.simple_query(&format!("SHOW {};", show_.command.to_lowercase())).await;
        let cols = columns(&msgs[0]);
        let names: Vec<&str> = cols.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, expected, "SHOW {} over the protocol", show_.command);
        let types: Vec<u32> = show_.types.bytes().map(oid).collect();
        let got: Vec<u32> = cols.iter().map(|(_, o)| *o).collect();
        assert_eq!(got[..types.len()], types, "SHOW {}: PgBouncer's types", show_.command);
        for row in msgs.iter().filter(|m| m.tag == b'D').map(values) {
            assert_eq!(row.len(), cols.len(), "SHOW {}: {row:?}", show_.command);
            for ((name, oid), v) in cols.iter().zip(&row) {
                if [20, 23, 1700].contains(oid) {
                    assert!(
                        v.as_deref().is_none_or(|v| v.parse::<i64>().is_ok()),
                        "SHOW {}: {name} = {v:?}",
                        show_.command
                    );
                }
            }
        }
        assert_eq!(msgs.last().map(|m| m.tag), Some(b'Z'));
        assert!(msgs.iter().any(|m| m.tag == b'C' && &m.body[..] == b"SHOW\0"), "SHOW {}", show_.command);
        tables.insert(show_.command, table);
    }

    // What the rows say about that traffic.
    let pools = &tables["POOLS"];
    let p = pools.one("database", DB);
    assert_eq!((pools.get(p, "user"), pools.num(p, "cl_active"), pools.num(p, "sv_active")), (APP.0, 2, 1));
    assert_eq!((pools.get(p, "pool_mode"), pools.get(p, "load_balance_hosts")), ("transaction", ""));
    let clients = &tables["CLIENTS"];
    assert_eq!(clients.find("database", DB).len(), 2, "{clients:?}");
    assert!(clients.rows.iter().all(|r| r[0] == "C" && r[3] == "none"), "{clients:?}");
    // Console sessions are active too; the app client holding a server is the one.
    let linked = *clients.find("database", DB).iter().find(|r| clients.get(r, "state") == "active").expect("linked");
    let servers = &tables["SERVERS"];
    let s = servers.one("state", "active");
    assert_eq!((servers.get(s, "type"), servers.get(s, "link")), ("S", clients.get(linked, "ptr")));
    assert_eq!(clients.get(linked, "link"), servers.get(s, "ptr"));
    // The linked pair is all ACTIVE_SOCKETS lists; SOCKETS lists everyone.
    let active = &tables["ACTIVE_SOCKETS"];
    let states: Vec<&str> = active.rows.iter().map(|r| r[4].as_str()).collect();
    assert_eq!(states, ["cl_active", "sv_active"], "{active:?}");
    let sockets = &tables["SOCKETS"];
    assert_eq!(sockets.find("state", "sv_active").len(), 1, "{sockets:?}");
    assert!(sockets.find("state", "cl_active").len() >= 3, "two app clients and the console: {sockets:?}");

    for stats in ["STATS", "STATS_TOTALS", "STATS_AVERAGES"] {
        let t = &tables[stats];
        t.one("database", DB);
        let mut names: Vec<&str> = t.rows.iter().map(|r| r[0].as_str()).collect();
        names.dedup();
        assert_eq!(names.len(), t.rows.len(), "a row per database: {t:?}");
    }
    let totals = &tables["TOTALS"];
    let names: Vec<&str> = totals.rows.iter().map(|r| r[0].as_str()).collect();
    let figures = [
        "server_assignment_count",
        "xact_count",
        "query_count",
        "client_bytes",
        "server_bytes",
        "xact_time",
        "query_time",
        "wait_time",
        "ps_client_parse_count",
        "ps_server_parse_count",
        "ps_bind_count",
    ];
    let expected: Vec<String> =
        ["total_", "avg_"].iter().flat_map(|p| figures.iter().map(move |f| format!("{p}{f}"))).collect();
    assert_eq!(names, expected, "show_stat_totals' WTOTAL/WAVG rows");

    let dbs = &tables["DATABASES"];
    let d = dbs.one("name", DB);
    assert_eq!((dbs.num(d, "pool_size"), dbs.num(d, "current_client_connections")), (2, 2));
    assert!(dbs.num(d, "current_connections") >= 1, "{dbs:?}");
    let users = &tables["USERS"];
    let u = users.one("name", APP.0);
    assert_eq!((users.get(u, "pool_size"), users.num(u, "current_client_connections")), ("", 2));
    for t in [users, &tables["CONFIG"], dbs] {
        assert!(!t.rows.iter().flatten().any(|v| v.contains(APP.1)), "a password in {t:?}");
    }
    let lists = &tables["LISTS"];
    let names: Vec<&str> = lists.rows.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(
        names,
        [
            "databases",
            "users",
            "peers",
            "pools",
            "peer_pools",
            "free_clients",
            "used_clients",
            "login_clients",
            "free_servers",
            "used_servers",
            "dns_names",
            "dns_zones",
            "dns_queries",
            "dns_pending"
        ]
    );
    assert_eq!(lists.num(lists.one("list", "databases"), "items"), 2);
    let mem = &tables["MEM"];
    for r in &mem.rows {
        assert_eq!(mem.num(r, "memtotal"), mem.num(r, "size") * mem.num(r, "used"), "{mem:?}");
    }
    // Clients: the two app ones and the raw console session, once psql's
    // sessions (each SHOW above) have all gone.
    let deadline = Instant::now() + SOON;
    loop {
        // (list or cache name, the column holding its count) of a DataRow.
        let count = |msgs: &[Msg], name: &str, col: usize| {
            let rows = msgs.iter().filter(|m| m.tag == b'D').map(values);
            rows.filter(|r| r[0].as_deref() == Some(name)).find_map(|r| r[col].clone())
        };
        let lists = raw.simple_query("SHOW LISTS").await;
        let mem = raw.simple_query("SHOW MEM").await;
        let counts = (count(&lists, "used_clients", 1), count(&mem, "client_cache", 2));
        if counts == (Some("3".into()), Some("3".into())) {
            break;
        }
        assert!(Instant::now() < deadline, "LISTS and MEM never counted three clients: {counts:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for empty in ["FDS", "DNS_HOSTS", "DNS_ZONES"] {
        assert!(tables[empty].rows.is_empty(), "SHOW {empty}: {:?}", tables[empty]);
    }
    let state: Vec<(&str, &str)> = tables["STATE"].rows.iter().map(|r| (r[0].as_str(), r[1].as_str())).collect();
    assert_eq!(state, [("active", "yes"), ("paused", "no"), ("suspended", "no")]);
    assert_eq!(tables["VERSION"].rows.len(), 1);

    // PAUSE without a database is PgBouncer's paused state.
    holder.batch_execute("COMMIT").await.unwrap();
    psql_on(&proxy, CONSOLE, "PAUSE").await.expect("PAUSE");
    let state = show(&proxy, "STATE").await;
    assert_eq!(
        (state.get(state.one("key", "active"), "value"), state.get(state.one("key", "paused"), "value")),
        ("no", "yes")
    );
    psql_on(&proxy, CONSOLE, "RESUME").await.expect("RESUME");
    proxy.shutdown().await;
}

/// The SHOW STATS_TOTALS row of `db` (through psql) by column.
async fn totals_of(proxy: &Proxy, db: &str) -> HashMap<String, u64> {
    let t = show(proxy, "STATS_TOTALS").await;
    let Some(row) = t.find("database", db).first().copied() else { return HashMap::new() };
    t.columns.iter().zip(row).skip(1).map(|(c, v)| (c.clone(), v.parse().expect("a number"))).collect()
}

fn delta(after: &HashMap<String, u64>, before: &HashMap<String, u64>, col: &str) -> u64 {
    after[col] - before.get(col).copied().unwrap_or(0)
}

/// Sends `sql` as one simple Query; returns (bytes sent, bytes of the answer).
async fn query_bytes(raw: &mut Raw, sql: &str) -> (u64, u64) {
    let mut out = BytesMut::new();
    frontend::query(sql, &mut out).unwrap();
    raw.send(&out).await;
    let answer = raw.until_ready().await;
    assert!(answer.iter().all(|m| m.tag != b'E'), "{sql}: {answer:?}");
    (out.len() as u64, answer.iter().map(|m| 5 + m.body.len() as u64).sum())
}

/// Waits until `db`'s totals show `queries` and `xacts` more than `before`
/// (each is counted just after the client has its answer) and, when
/// `released`, no client of `db` holds a server connection (a transaction's
/// time is added on release), then returns them.
async fn counted(
    proxy: &Proxy,
    db: &str,
    before: &HashMap<String, u64>,
    (queries, xacts): (u64, u64),
    released: bool,
) -> HashMap<String, u64> {
    eventually(SOON, "the traffic to be counted", || async {
        let now = totals_of(proxy, db).await;
        let pools = show(proxy, "POOLS").await;
        let holding: u64 = pools.find("database", db).iter().map(|r| pools.num(r, "sv_active")).sum();
        !now.is_empty()
            && delta(&now, before, "query_count") >= queries
            && delta(&now, before, "xact_count") >= xacts
            && (!released || holding == 0)
    })
    .await;
    totals_of(proxy, db).await
}

/// PgBouncer's definitions: a query is a request answered with
/// ReadyForQuery, a transaction ends when the server is idle again, an
/// assignment is a server connection given to a client; bytes are what
/// clients sent and what they were sent. Counted exactly, and SHOW TOTALS,
/// SHOW STATS and `/metrics` report the same numbers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statistics_move_by_exactly_the_traffic_sent() {
    let started = Instant::now();
    let proxy = console_proxy("").await;
    let mut raw = Raw::login(proxy.addr, TRUST, DB).await;
    query_bytes(&mut raw, "SELECT 1").await;
    let before = counted(&proxy, DB, &HashMap::new(), (1, 1), true).await;

    let (mut sent, mut received) = (0, 0);
    let mut run = |(s, r): (u64, u64)| {
        sent += s;
        received += r;
    };
    // Four autocommit queries: four transactions, four assignments.
    for _ in 0..4 {
        run(query_bytes(&mut raw, "SELECT 1").await);
    }
    // A three-statement transaction: one transaction, one assignment, three queries.
    for sql in ["BEGIN", "SELECT 1", "COMMIT"] {
        run(query_bytes(&mut raw, sql).await);
    }
    // Two statements in one Query message: one request, so one query.
    run(query_bytes(&mut raw, "SELECT 1; SELECT 2").await);
    let after = counted(&proxy, DB, &before, (8, 6), true).await;
    assert_eq!(delta(&after, &before, "query_count"), 8, "{after:?}");
    assert_eq!(delta(&after, &before, "xact_count"), 6, "{after:?}");
    assert_eq!(delta(&after, &before, "server_assignment_count"), 6, "{after:?}");
    assert_eq!(delta(&after, &before, "bytes_received"), sent, "{after:?}");
    assert_eq!(delta(&after, &before, "bytes_sent"), received, "{after:?}");
    assert!(delta(&after, &before, "xact_time") > 0 && delta(&after, &before, "query_time") > 0, "{after:?}");
    for prepared in ["client_parse_count", "server_parse_count", "bind_count"] {
        assert_eq!(delta(&after, &before, prepared), 0, "{prepared}: {after:?}");
    }

    // SHOW STATS has the same totals; SHOW TOTALS sums them over databases.
    let stats = show(&proxy, "STATS").await;
    let s = stats.one("database", DB);
    for (col, v) in &after {
        assert_eq!(stats.num(s, &format!("total_{col}").replace("bytes_", "")), *v, "{col}: {stats:?}");
    }
    let totals = show(&proxy, "TOTALS").await;
    let all = show(&proxy, "STATS_TOTALS").await;
    for (col, name) in [
        ("server_assignment_count", "total_server_assignment_count"),
        ("xact_count", "total_xact_count"),
        ("query_count", "total_query_count"),
        ("bytes_received", "total_client_bytes"),
        ("bytes_sent", "total_server_bytes"),
        ("xact_time", "total_xact_time"),
        ("query_time", "total_query_time"),
        ("wait_time", "total_wait_time"),
        ("client_parse_count", "total_ps_client_parse_count"),
        ("server_parse_count", "total_ps_server_parse_count"),
        ("bind_count", "total_ps_bind_count"),
    ] {
        let sum: u64 = all.rows.iter().map(|r| all.num(r, col)).sum();
        assert_eq!(totals.num(totals.one("name", name), "value"), sum, "{name}: {totals:?} {all:?}");
    }
    // Until the first stats_period ends, averages are over the pool's whole
    // life: times per event equal the totals' ratios exactly.
    if started.elapsed() < Duration::from_secs(55) {
        let n = |c| stats.num(s, c);
        assert_eq!(n("avg_query_time"), n("total_query_time") / n("total_query_count"));
        assert_eq!(n("avg_xact_time"), n("total_xact_time") / n("total_xact_count"));
        assert_eq!(n("avg_wait_time"), n("total_wait_time") / n("total_server_assignment_count"));
    }

    // /metrics reads the same counters.
    let m = scrape(&proxy).await;
    assert_eq!(m.sum("pgmux_node_transactions_total", DB), after["xact_count"] as f64);
    assert_eq!(m.sum("pgmux_node_queries_total", DB), after["query_count"] as f64);
    assert_eq!(m.sum("pgmux_transactions_total", DB), after["server_assignment_count"] as f64);
    assert_eq!(m.sum("pgmux_bytes_in_total", DB), after["bytes_received"] as f64);
    assert_eq!(m.sum("pgmux_bytes_out_total", DB), after["bytes_sent"] as f64);
    // Seconds there, per pool: equal to the microsecond.
    assert_eq!((m.sum("pgmux_pool_wait_seconds_sum", DB) * 1e6).round() as u64, after["wait_time"]);
    proxy.shutdown().await;
}

/// A Parse of a named statement, and a Sync.
fn parse_named(out: &mut BytesMut, name: &str, sql: &str) {
    frontend::parse(name, sql, std::iter::empty(), out).unwrap();
    frontend::sync(out);
}

/// Bind of named statement `name` (no parameters), Execute, Sync.
fn bind_named(out: &mut BytesMut, name: &str) {
    out.put_u8(b'B');
    out.put_u32(4 + 1 + name.len() as u32 + 1 + 2 + 2 + 2);
    out.put_u8(0);
    out.put_slice(name.as_bytes());
    out.put_u8(0);
    out.put_slice(&[0, 0, 0, 0, 0, 0]);
    frontend::execute("", 0, out).unwrap();
    frontend::sync(out);
}

async fn extended(raw: &mut Raw, build: impl FnOnce(&mut BytesMut)) {
    let mut out = BytesMut::new();
    build(&mut out);
    raw.send(&out).await;
    let answer = raw.until_ready().await;
    assert!(answer.iter().all(|m| m.tag != b'E'), "{answer:?}");
}

/// client_parse_count counts every named statement a client prepares,
/// server_parse_count those a server parsed for pgmux, bind_count the Binds
/// of them, prepare_locally's answers (no server involved) included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statement_counts_follow_parses_and_binds() {
    let cluster = support::cluster_async().await;
    // One server connection: the second client's Bind finds the statement on it.
    let proxy = Proxy::start_with_metrics(&admin_config(cluster, 1, "")).await;
    let mut first = Raw::login(proxy.addr, TRUST, DB).await;
    let mut second = Raw::login(proxy.addr, TRUST, DB).await;
    query_bytes(&mut first, "SELECT 1").await;
    let before = counted(&proxy, DB, &HashMap::new(), (1, 1), true).await;

    extended(&mut first, |o| parse_named(o, "s1", "SELECT 1")).await;
    for _ in 0..2 {
        extended(&mut first, |o| bind_named(o, "s1")).await;
    }
    // Known good on the server: the second client's Parse is answered by pgmux itself.
    extended(&mut second, |o| parse_named(o, "mine", "SELECT 1")).await;
    extended(&mut second, |o| bind_named(o, "mine")).await;
    let after = counted(&proxy, DB, &before, (4, 4), true).await;
    assert_eq!(delta(&after, &before, "client_parse_count"), 2, "{after:?}");
    assert_eq!(delta(&after, &before, "server_parse_count"), 1, "{after:?}");
    assert_eq!(delta(&after, &before, "bind_count"), 3, "{after:?}");
    let m = scrape(&proxy).await;
    assert_eq!(m.sum("pgmux_prepared_client_parses_total", DB), after["client_parse_count"] as f64);
    assert_eq!(m.sum("pgmux_prepared_server_parses_total", DB), after["server_parse_count"] as f64);
    assert_eq!(m.sum("pgmux_prepared_binds_total", DB), after["bind_count"] as f64);
    proxy.shutdown().await;
}

/// In session mode a client keeps its server connection: one assignment,
/// but a transaction per transaction, and none for the session's end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_counts_transactions_not_sessions() {
    let cluster = support::cluster_async().await;
    let extra = format!(
        "\n[[databases]]\nname = \"sess\"\ndbname = \"{DB}\"\nprimary = \"{}\"\npool_size = 2\npool_mode = \"session\"\n",
        cluster.primary().host_port()
    );
    let proxy = console_proxy(&extra).await;
    let mut raw = Raw::login(proxy.addr, TRUST, "sess").await;
    query_bytes(&mut raw, "SELECT 1").await;
    let before = counted(&proxy, "sess", &HashMap::new(), (1, 1), false).await;
    for sql in ["SELECT 1", "BEGIN", "SELECT 1", "COMMIT", "SELECT 1"] {
        query_bytes(&mut raw, sql).await;
    }
    let after = counted(&proxy, "sess", &before, (5, 3), false).await;
    assert_eq!((delta(&after, &before, "query_count"), delta(&after, &before, "xact_count")), (5, 3), "{after:?}");
    assert_eq!(delta(&after, &before, "server_assignment_count"), 0, "{after:?}");
    let pools = show(&proxy, "POOLS").await;
    assert_eq!(pools.num(pools.one("database", "sess"), "pinned"), 1);

    // Terminate: the session ends, its server connection goes back; no transaction.
    let mut out = BytesMut::new();
    frontend::terminate(&mut out);
    raw.send(&out).await;
    assert!(raw.until_closed().await.is_empty());
    eventually(SOON, "the session's server connection to be idle", || async {
        let pools = show(&proxy, "POOLS").await;
        pools.num(pools.one("database", "sess"), "sv_active") == 0
    })
    .await;
    let ended = totals_of(&proxy, "sess").await;
    assert_eq!(delta(&ended, &after, "xact_count"), 0, "{ended:?}");
    assert_eq!(delta(&ended, &after, "bytes_received"), 5, "Terminate's bytes: {ended:?}");
    proxy.shutdown().await;
}

/// `/metrics`, parsed.
struct Metrics(prometheus_parse::Scrape);

async fn scrape(proxy: &Proxy) -> Metrics {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(proxy.metrics.expect("metrics enabled")).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: pgmux\r\n\r\n").await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(SOON, s.read_to_string(&mut response)).await.expect("scraped in time").unwrap();
    let (_, body) = response.split_once("\r\n\r\n").expect("HTTP head and body");
    Metrics(prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).expect("parse /metrics"))
}

impl Metrics {
    /// The sum of `name`'s series of `database` (a histogram's `_sum` too).
    fn sum(&self, name: &str, database: &str) -> f64 {
        use prometheus_parse::Value;
        self.0
            .samples
            .iter()
            .filter(|s| s.metric == name && s.labels.get("database") == Some(database))
            .filter_map(|s| match s.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(v),
                _ => None,
            })
            .sum()
    }
}
