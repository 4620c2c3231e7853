//! pgmux read by a PgBouncer monitoring client: what the Prometheus
//! community's pgbouncer_exporter queries, and how it reads the answers.
//!
//! Source: github.com/prometheus-community/pgbouncer_exporter, collector.go
//! (commit 6918f4e): `metricMaps` (SHOW DATABASES, STATS_TOTALS, POOLS: label
//! and metric columns), `queryShowLists`, `queryShowConfig`,
//! `queryShowClients`, `queryVersion`, and `getDB`'s SHOW STATS. The exporter
//! talks to database `pgbouncer` with lib/pq, whose argument-less queries use
//! the simple query protocol, as tokio-postgres' `simple_query` does here.
//! lib/pq decodes each value by its declared type: integers must be integers,
//! and a label column must be text or an integer (a numeric or bytea label
//! becomes `<invalid>`). A metric it converts with `strconv.ParseFloat`
//! (NULL is allowed). Two rows with the same labels would make the Prometheus
//! registry fail the whole scrape.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use support::pgbouncer::columns;
use support::proxy::{Proxy, admin_config};
use support::raw::Raw;
use support::{APP, DB, eventually, scalar};
use tokio_postgres::SimpleQueryMessage;

const SOON: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Use {
    Label,
    /// A gauge or counter: parsed as a float.
    Metric,
    /// Mapped by the exporter for PgBouncers older than 1.25, which does not
    /// have it either (`reserve_pool` became `reserve_pool_size`, `requests`
    /// went with 1.8's statistics).
    Legacy,
}

use Use::{Label, Legacy, Metric};

/// `metricMaps`: the command (the exporter sends `SHOW <key>;`) and the columns it maps.
const METRIC_MAPS: &[(&str, &[(&str, Use)])] = &[
    (
        "databases",
        &[
            ("name", Label),
            ("host", Label),
            ("port", Label),
            ("database", Label),
            ("force_user", Label),
            ("pool_size", Metric),
            ("reserve_pool", Legacy),
            ("reserve_pool_size", Metric),
            ("pool_mode", Label),
            ("max_connections", Metric),
            ("current_connections", Metric),
            ("paused", Metric),
            ("disabled", Metric),
        ],
    ),
    (
        "stats_totals",
        &[
            ("database", Label),
            ("query_count", Metric),
            ("query_time", Metric),
            ("bytes_received", Metric),
            ("requests", Legacy),
            ("bytes_sent", Metric),
            ("wait_time", Metric),
            ("xact_count", Metric),
            ("xact_time", Metric),
            ("client_parse_count", Metric),
            ("server_parse_count", Metric),
            ("bind_count", Metric),
            ("server_assignment_count", Metric),
        ],
    ),
    (
        "pools",
        &[
            ("database", Label),
            ("user", Label),
            ("cl_active", Metric),
            ("cl_active_cancel_req", Metric),
            ("cl_waiting", Metric),
            ("cl_waiting_cancel_req", Metric),
            ("sv_active", Metric),
            ("sv_active_cancel", Metric),
            ("sv_being_canceled", Metric),
            ("sv_idle", Metric),
            ("sv_used", Metric),
            ("sv_tested", Metric),
            ("sv_login", Metric),
            ("maxwait", Metric),
        ],
    ),
];

/// `listsMap`: the SHOW LISTS rows it exports.
const LISTS: &[&str] = &[
    "databases",
    "users",
    "pools",
    "free_clients",
    "used_clients",
    "login_clients",
    "free_servers",
    "used_servers",
    "dns_names",
    "dns_zones",
    "dns_queries",
];

/// `configMap`: the SHOW CONFIG keys it exports.
const CONFIG_KEYS: &[&str] = &["max_client_conn", "max_user_connections"];

/// `queryShowClients`: the columns it groups clients by (application_name if present).
const CLIENT_COLUMNS: &[&str] = &["database", "user", "state", "application_name"];

/// A result set as the exporter sees it: column names and text values.
struct Answer {
    columns: Vec<String>,
    rows: Vec<Vec<Option<String>>>,
}

impl Answer {
    fn col(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c == name)
    }
}

async fn query(console: &tokio_postgres::Client, sql: &str) -> Answer {
    let msgs = console.simple_query(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    let mut answer = Answer { columns: Vec::new(), rows: Vec::new() };
    for m in msgs {
        match m {
            SimpleQueryMessage::RowDescription(cols) => {
                answer.columns = cols.iter().map(|c| c.name().to_owned()).collect();
            }
            SimpleQueryMessage::Row(r) => {
                answer.rows.push((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect());
            }
            _ => {}
        }
    }
    answer
}

fn parses_as_float(v: &Option<String>) -> bool {
    v.as_deref().is_none_or(|v| v.parse::<f64>().is_ok())
}

/// Type OIDs of `sql`'s columns, by name, as lib/pq learns them.
async fn column_types(raw: &mut Raw, sql: &str) -> Vec<(String, u32)> {
    columns(&raw.simple_query(sql).await[0])
}

/// A database with a replica, traffic on both nodes, clients idle and
/// active: every row the exporter would read, through one console session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbouncer_exporter_reads_every_column_it_maps() {
    let cluster = support::cluster_async().await;
    let primary = cluster.primary().host_port();
    let replica = cluster.replicas()[0].host_port();
    let toml = admin_config(cluster, 2, "").replacen(
        &format!("primary = \"{primary}\"\n"),
        &format!("primary = \"{primary}\"\nreplicas = [\"{replica}\"]\n"),
        1,
    ) + "\n[routing]\nmonitor_interval = \"10ms\"\n";
    let proxy = Proxy::start(&toml).await;
    let c = proxy.app().await;
    eventually(SOON, "a read to be served by the replica", || async {
        scalar(&c, "SELECT inet_server_port()").await == cluster.replicas()[0].port().to_string()
    })
    .await;
    c.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let other = proxy.app().await;
    other.simple_query("SELECT 1").await.unwrap();

    let console = proxy.connect("postgres", None, "pgbouncer").await.expect("console on database pgbouncer");
    let mut raw = Raw::login(proxy.addr, "postgres", "pgbouncer").await;

    // getDB: SHOW STATS answers.
    assert!(!query(&console, "SHOW STATS").await.rows.is_empty());

    // queryVersion: one column, named version.
    let version = query(&console, "SHOW VERSION;").await;
    assert_eq!(version.columns, ["version"]);
    assert!(version.rows.iter().all(|r| r[0].is_some()));

    // queryShowLists: two columns; every items value is a float; the rows it exports are there.
    let lists = query(&console, "SHOW LISTS;").await;
    assert_eq!(lists.columns.len(), 2);
    assert!(lists.rows.iter().all(|r| r[0].is_some() && r[1].as_deref().is_some_and(|v| v.parse::<f64>().is_ok())));
    for name in LISTS {
        assert!(lists.rows.iter().any(|r| r[0].as_deref() == Some(name)), "SHOW LISTS lacks {name}");
    }

    // queryShowConfig: three or four columns; key and changeable scanned into
    // strings (no NULL); the exported keys' values are floats.
    let config = query(&console, "SHOW CONFIG;").await;
    assert_eq!(config.columns, ["key", "value", "default", "changeable"]);
    assert!(config.rows.iter().all(|r| r[0].is_some() && r[3].is_some()));
    for key in CONFIG_KEYS {
        let row = config.rows.iter().find(|r| r[0].as_deref() == Some(key)).unwrap_or_else(|| panic!("no {key}"));
        assert!(row[1].as_deref().is_some_and(|v| v.parse::<f64>().is_ok()), "{key} = {:?}", row[1]);
    }

    // queryShowClients: grouped by database, user, application_name and state.
    let clients = query(&console, "SHOW CLIENTS;").await;
    let idx: Vec<usize> =
        CLIENT_COLUMNS.iter().map(|c| clients.col(c).unwrap_or_else(|| panic!("SHOW CLIENTS lacks {c}"))).collect();
    let app_clients = clients.rows.iter().filter(|r| r[idx[0]].as_deref() == Some(DB)).count();
    assert_eq!(app_clients, 2);

    // metricMaps.
    for (namespace, mapping) in METRIC_MAPS {
        let sql = format!("SHOW {namespace};");
        let answer = query(&console, &sql).await;
        assert!(!answer.rows.is_empty(), "{sql}: no rows");
        let types = column_types(&mut raw, &sql).await;
        let mut label_sets = HashSet::new();
        for row in &answer.rows {
            let mut labels = Vec::new();
            for (column, usage) in *mapping {
                let found = answer.col(column);
                match usage {
                    Legacy => assert!(found.is_none(), "{sql}: {column} is not in PgBouncer 1.25"),
                    Label => {
                        let i = found.unwrap_or_else(|| panic!("{sql}: no label column {column}"));
                        // text, int4 or int8: a string or an integer to lib/pq.
                        assert!([25, 23, 20].contains(&types[i].1), "{sql}: label {column} has type {}", types[i].1);
                        labels.push(row[i].clone().unwrap_or_default());
                    }
                    Metric => {
                        let i = found.unwrap_or_else(|| panic!("{sql}: no metric column {column}"));
                        assert!(parses_as_float(&row[i]), "{sql}: {column} = {:?}", row[i]);
                    }
                }
            }
            assert!(label_sets.insert(labels.clone()), "{sql}: two rows labelled {labels:?}");
        }
        // The database with a replica is one series, both nodes counted.
        if *namespace == "pools" {
            let db = answer.col("database").unwrap();
            let user = answer.col("user").unwrap();
            let row = answer.rows.iter().find(|r| r[db].as_deref() == Some(DB) && r[user].as_deref() == Some(APP.0));
            let sv_active = row.map(|r| r[answer.col("sv_active").unwrap()].clone());
            assert_eq!(sv_active, Some(Some("1".into())), "{sql}");
        }
    }
    c.batch_execute("COMMIT").await.unwrap();
    proxy.shutdown().await;
}
