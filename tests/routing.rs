//! Read/write splitting against a real primary and streaming replica, with
//! read-your-writes. Own clusters: one replica is delayed on purpose.

mod support;

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use pgmux::cluster::{Cluster, ClusterSpec, ClusterUser};
use support::proxy::Proxy;
use support::{APP, DB, eventually};
use tokio_postgres::SimpleQueryMessage;

static DELAYED: OnceLock<Cluster> = OnceLock::new();
static PROMPT: OnceLock<Cluster> = OnceLock::new();

/// Primary + a replica that applies WAL 500 ms late.
fn delayed() -> &'static Cluster {
    DELAYED.get_or_init(|| start(Some("500ms")))
}

/// Primary + an ordinary replica.
fn prompt() -> &'static Cluster {
    PROMPT.get_or_init(|| start(None))
}

/// Statics are never dropped; libtest ends with `exit`, which runs atexit hooks.
fn stop_clusters_at_exit() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        extern "C" fn stop() {
            let _ = std::panic::catch_unwind(|| {
                for c in [DELAYED.get(), PROMPT.get()].into_iter().flatten() {
                    c.stop();
                }
            });
        }
        // SAFETY: `stop` is a plain extern "C" fn that lives for the whole program.
        assert_eq!(unsafe { libc::atexit(stop) }, 0, "atexit registration failed");
    });
}

fn start(delay: Option<&str>) -> Cluster {
    stop_clusters_at_exit();
    let mut spec = ClusterSpec::default().replicas(1).user(ClusterUser::scram(APP.0, APP.1)).database(DB, APP.0);
    if let Some(d) = delay {
        spec = spec.replica_setting("recovery_min_apply_delay", d);
    }
    let cluster = Cluster::start(&spec).expect("start a primary and a streaming replica");
    cluster
        .primary()
        .psql_db(
            DB,
            "CREATE TABLE kv (id int PRIMARY KEY, v int NOT NULL DEFAULT 0);
             INSERT INTO kv SELECT g, 0 FROM generate_series(1, 100) g;
             GRANT ALL ON kv TO app;
             CREATE FUNCTION bump() RETURNS int LANGUAGE sql AS 'UPDATE kv SET v = v + 1 WHERE id = 100 RETURNING v';
             GRANT EXECUTE ON FUNCTION bump() TO app;",
        )
        .expect("schema");
    cluster.wait_replicas_caught_up(Duration::from_secs(30)).expect("replica caught up");
    cluster
}

async fn cluster_of(f: fn() -> &'static Cluster) -> &'static Cluster {
    tokio::task::spawn_blocking(f).await.expect("cluster start")
}

async fn proxy(cluster: &Cluster, routing: &str) -> Proxy {
    let toml = format!(
        r#"
[proxy]
listen = "127.0.0.1:0"
query_wait_timeout = "30s"

[routing]
{interval}
{routing}

[[databases]]
name = "{DB}"
primary = "{primary}"
replicas = ["{replica}"]
pool_size = 10

[[users]]
name = "{user}"
password = "{pw}"
"#,
        primary = cluster.primary().host_port(),
        replica = cluster.replicas()[0].host_port(),
        user = APP.0,
        pw = APP.1,
        interval = if routing.contains("monitor_interval") { "" } else { "monitor_interval = \"10ms\"" },
    );
    Proxy::start(&toml).await
}

fn row(msgs: &[SimpleQueryMessage]) -> Vec<String> {
    msgs.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some((0..r.len()).map(|i| r.get(i).unwrap_or("NULL").to_owned()).collect()),
            _ => None,
        })
        .expect("a row")
}

/// Each client updates its own row and reads it straight back; returns
/// (reads, violations, reads served by the replica).
async fn write_then_read(proxy: &Proxy, replica_port: u16, clients: i32, rounds: i32) -> (usize, usize, usize) {
    let violations = std::sync::Arc::new(AtomicUsize::new(0));
    let on_replica = std::sync::Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for id in 1..=clients {
        let c = proxy.app().await;
        let (violations, on_replica) = (violations.clone(), on_replica.clone());
        tasks.push(tokio::spawn(async move {
            for n in 1..=rounds {
                c.simple_query(&format!("UPDATE kv SET v = {n} WHERE id = {id}")).await.unwrap();
                let r = row(&c
                    .simple_query(&format!("SELECT v, inet_server_port() FROM kv WHERE id = {id}"))
                    .await
                    .unwrap());
                if r[0] != n.to_string() {
                    violations.fetch_add(1, Ordering::Relaxed);
                }
                if r[1] == replica_port.to_string() {
                    on_replica.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    ((clients * rounds) as usize, violations.load(Ordering::Relaxed), on_replica.load(Ordering::Relaxed))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lsn_mode_never_misses_a_write_even_with_a_lagging_replica() {
    let cluster = cluster_of(delayed).await;
    let replica_port = cluster.replicas()[0].port();
    let proxy = proxy(cluster, r#"read_your_writes = "lsn""#).await;
    let (reads, violations, _) = write_then_read(&proxy, replica_port, 8, 5).await;
    assert_eq!(violations, 0, "{violations} of {reads} reads missed the client's own write");
    // A client that never writes reads from the replica.
    let reader = proxy.app().await;
    eventually(Duration::from_secs(10), "a non-writer served by the replica", || async {
        row(&reader.simple_query("SELECT inet_server_port()").await.unwrap())[0] == replica_port.to_string()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_mode_shorter_than_the_lag_misses_writes_longer_does_not() {
    let cluster = cluster_of(delayed).await;
    let replica_port = cluster.replicas()[0].port();
    let short = proxy(cluster, "read_your_writes = \"window\"\nsticky_window = \"50ms\"").await;
    // Wait past the window before reading, so the read goes to the 500 ms-late replica.
    let c = short.app().await;
    let mut missed = 0;
    for n in 1..=5 {
        c.simple_query(&format!("UPDATE kv SET v = {n} WHERE id = 50")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(80)).await; // the window itself is what is under test
        let r = row(&c.simple_query("SELECT v, inet_server_port() FROM kv WHERE id = 50").await.unwrap());
        if r[0] != n.to_string() {
            assert_eq!(r[1], replica_port.to_string(), "only a replica read can be stale");
            missed += 1;
        }
    }
    assert!(missed > 0, "a 50 ms window over a 500 ms-late replica must show stale reads (the test can fail)");
    let long = proxy(cluster, "read_your_writes = \"window\"\nsticky_window = \"2s\"").await;
    let (reads, violations, _) = write_then_read(&long, replica_port, 4, 5).await;
    assert_eq!(violations, 0, "{violations} of {reads}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_paced_mix_reads_mostly_from_the_replica_without_violations() {
    let cluster = cluster_of(prompt).await;
    let replica_port = cluster.replicas()[0].port();
    // Samples far apart: a read after a write finds the replica eligible
    // only by asking it (max_replica_wait), not from the periodic sample.
    let asking = proxy(cluster, "read_your_writes = \"lsn\"\nmonitor_interval = \"500ms\"").await;
    let (reads, violations, on_replica) = web_paced_mix(&asking, replica_port).await;
    eprintln!("90/10 mix, samples every 500 ms: {on_replica} of {reads} reads on the replica, {violations} violations");
    assert_eq!(violations, 0);
    assert!(on_replica * 100 >= reads * 90, "only {on_replica} of {reads} reads on the replica");
    // Without asking, the same pace finds the replica eligible only at the
    // next sample: the share falls (the test above can fail).
    let no_wait =
        proxy(cluster, "read_your_writes = \"lsn\"\nmonitor_interval = \"500ms\"\nmax_replica_wait = \"0\"").await;
    let (reads, violations, on_replica) = web_paced_mix(&no_wait, replica_port).await;
    eprintln!("same without max_replica_wait: {on_replica} of {reads} reads on the replica, {violations} violations");
    assert_eq!(violations, 0);
    assert!(on_replica * 100 < reads * 90, "{on_replica} of {reads} reads on the replica without waiting");
}

/// 16 clients, each a 90/10 read/write mix on its own row, 5 ms between
/// operations; returns (reads, violations, reads served by the replica).
async fn web_paced_mix(proxy: &Proxy, replica_port: u16) -> (usize, usize, usize) {
    {
        let violations = std::sync::Arc::new(AtomicUsize::new(0));
        let on_replica = std::sync::Arc::new(AtomicUsize::new(0));
        let reads = std::sync::Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for id in 1..=16 {
            let c = proxy.app().await;
            let (violations, on_replica, reads) = (violations.clone(), on_replica.clone(), reads.clone());
            tasks.push(tokio::spawn(async move {
                let mut expected = 0;
                for op in 0..60 {
                    if op % 10 == 0 {
                        expected += 1;
                        c.simple_query(&format!("UPDATE kv SET v = {expected} WHERE id = {id}")).await.unwrap();
                    } else {
                        let r = row(&c
                            .simple_query(&format!("SELECT v, inet_server_port() FROM kv WHERE id = {id}"))
                            .await
                            .unwrap());
                        reads.fetch_add(1, Ordering::Relaxed);
                        if r[0] != expected.to_string() {
                            violations.fetch_add(1, Ordering::Relaxed);
                        }
                        if r[1] == replica_port.to_string() {
                            on_replica.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    // A web-like pace between operations: the workload, not synchronisation.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        (reads.load(Ordering::Relaxed), violations.load(Ordering::Relaxed), on_replica.load(Ordering::Relaxed))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_transactions_and_hints() {
    let cluster = cluster_of(prompt).await;
    let replica_port = cluster.replicas()[0].port().to_string();
    let primary_port = cluster.primary().port().to_string();
    let proxy = proxy(cluster, "").await;
    let c = proxy.app().await;
    eventually(Duration::from_secs(10), "replica in rotation", || async {
        row(&c.simple_query("SELECT inet_server_port()").await.unwrap())[0] == replica_port
    })
    .await;
    c.batch_execute("BEGIN READ ONLY").await.unwrap();
    assert_eq!(row(&c.simple_query("SELECT inet_server_port()").await.unwrap())[0], replica_port);
    c.batch_execute("COMMIT").await.unwrap();
    c.batch_execute("BEGIN").await.unwrap();
    assert_eq!(row(&c.simple_query("SELECT inet_server_port()").await.unwrap())[0], primary_port);
    c.batch_execute("COMMIT").await.unwrap();
    let hinted = row(&c.simple_query("/* pgmux:primary */ SELECT inet_server_port()").await.unwrap());
    assert_eq!(hinted[0], primary_port);
    // A SELECT calling a write function is a write.
    let r = row(&c.simple_query("SELECT txid_current() > 0, inet_server_port()").await.unwrap());
    assert_eq!(r[1], primary_port);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_down_reads_fall_back_and_it_rejoins() {
    let cluster = cluster_of(prompt).await;
    let replica = &cluster.replicas()[0];
    let replica_port = replica.port().to_string();
    let proxy = proxy(cluster, "").await;
    let c = proxy.app().await;
    eventually(Duration::from_secs(10), "replica in rotation", || async {
        row(&c.simple_query("SELECT inet_server_port()").await.unwrap())[0] == replica_port
    })
    .await;
    tokio::task::spawn_blocking({
        let r = replica.clone();
        move || r.stop_immediate().expect("stop replica")
    })
    .await
    .unwrap();
    // Reads keep working (from the primary) once the in-flight ones are done.
    let mut served = 0;
    for _ in 0..50 {
        if c.simple_query("SELECT 1").await.is_ok() {
            served += 1;
        }
    }
    assert!(served >= 48, "only {served} of 50 reads served with the replica down");
    eventually(Duration::from_secs(5), "reads on the primary", || async {
        c.simple_query("SELECT inet_server_port()").await.map(|m| row(&m)[0] != replica_port).unwrap_or(false)
    })
    .await;
    tokio::task::spawn_blocking({
        let r = replica.clone();
        move || r.start().expect("restart replica")
    })
    .await
    .unwrap();
    eventually(Duration::from_secs(20), "replica back in rotation", || async {
        c.simple_query("SELECT inet_server_port()").await.map(|m| row(&m)[0] == replica_port).unwrap_or(false)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_select_that_writes_is_retried_on_the_primary() {
    let cluster = cluster_of(prompt).await;
    let replica_port = cluster.replicas()[0].port().to_string();
    let proxy = proxy(cluster, "").await;
    let c = proxy.app().await;
    eventually(Duration::from_secs(10), "replica in rotation", || async {
        row(&c.simple_query("SELECT inet_server_port()").await.unwrap())[0] == replica_port
    })
    .await;
    // bump() updates a row: classified as a read, refused by the replica
    // (25006), re-run on the primary before the client saw anything.
    let first: i32 = row(&c.simple_query("SELECT bump()").await.expect("retried on the primary"))[0].parse().unwrap();
    let second: i32 = row(&c.simple_query("SELECT bump()").await.expect("retried on the primary"))[0].parse().unwrap();
    assert_eq!(second, first + 1);
    // The extended protocol too.
    let third: i32 = c.query_one("SELECT bump()", &[]).await.expect("retried on the primary").get(0);
    assert_eq!(third, second + 1);
    // Inside an explicit transaction there is no retry: the client sees what Postgres says.
    c.batch_execute("BEGIN READ ONLY").await.unwrap();
    let err = c.simple_query("SELECT bump()").await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("25006"));
    c.batch_execute("ROLLBACK").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_are_observed_not_taken_from_the_configuration() {
    let cluster = cluster_of(prompt).await;
    let standby = cluster.replicas()[0].host_port();
    let real_primary = cluster.primary().host_port();
    // Misconfigured (or configured before a failover): the stated roles are swapped.
    let toml = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nquery_wait_timeout = \"10s\"\n[routing]\nmonitor_interval = \"10ms\"\n\
         [[databases]]\nname = \"{DB}\"\nprimary = \"{standby}\"\nreplicas = [\"{real_primary}\"]\n\
         [[users]]\nname = \"{}\"\npassword = \"{}\"\n",
        APP.0, APP.1
    );
    let proxy = Proxy::start(&toml).await;
    let c = proxy.app().await;
    // Writes go to the node that is not in recovery, never to the standby.
    let port = c
        .simple_query("UPDATE kv SET v = v WHERE id = 1 RETURNING inet_server_port()")
        .await
        .expect("a write through swapped roles");
    assert_eq!(row(&port)[0], cluster.primary().port().to_string());
    // Reads go to the node that is in recovery.
    eventually(Duration::from_secs(10), "reads served by the standby", || async {
        row(&c.simple_query("SELECT inet_server_port()").await.unwrap())[0] == cluster.replicas()[0].port().to_string()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_scope_shares_read_your_writes_across_connections() {
    let cluster = cluster_of(delayed).await;
    let replica_port = cluster.replicas()[0].port().to_string();
    // Connection scope: a second connection that never wrote reads the 500 ms-late replica.
    let per_connection = proxy(cluster, "sticky_scope = \"connection\"").await;
    let (writer, reader) = (per_connection.app().await, per_connection.app().await);
    eventually(Duration::from_secs(10), "replica in rotation", || async {
        row(&reader.simple_query("SELECT inet_server_port()").await.unwrap())[0] == replica_port
    })
    .await;
    let mut stale = 0;
    for n in 1..=5 {
        writer.simple_query(&format!("UPDATE kv SET v = {n} WHERE id = 60")).await.unwrap();
        if row(&reader.simple_query("SELECT v FROM kv WHERE id = 60").await.unwrap())[0] != n.to_string() {
            stale += 1;
        }
    }
    assert!(stale > 0, "with connection scope another connection must be able to read stale data");
    // User scope: a write by any connection of the user pins them all.
    let per_user = proxy(cluster, "sticky_scope = \"user\"").await;
    let (writer, reader) = (per_user.app().await, per_user.app().await);
    for n in 11..=15 {
        writer.simple_query(&format!("UPDATE kv SET v = {n} WHERE id = 61")).await.unwrap();
        assert_eq!(row(&reader.simple_query("SELECT v FROM kv WHERE id = 61").await.unwrap())[0], n.to_string());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asynchronous_commit_still_never_misses_a_write() {
    let cluster = cluster_of(prompt).await;
    let replica_port = cluster.replicas()[0].port();
    let proxy = proxy(cluster, "").await;
    let mut tasks = Vec::new();
    let violations = std::sync::Arc::new(AtomicUsize::new(0));
    for id in 70..78 {
        let c = proxy.app().await;
        let violations = violations.clone();
        tasks.push(tokio::spawn(async move {
            for n in 1..=10 {
                // WAL reaches the replica only when the WAL writer flushes it.
                c.simple_query(&format!(
                    "BEGIN; SET LOCAL synchronous_commit = off; UPDATE kv SET v = {n} WHERE id = {id}; COMMIT"
                ))
                .await
                .unwrap();
                let r = row(&c
                    .simple_query(&format!("SELECT v, inet_server_port() FROM kv WHERE id = {id}"))
                    .await
                    .unwrap());
                if r[0] != n.to_string() {
                    violations.fetch_add(1, Ordering::Relaxed);
                }
                let _ = replica_port;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(violations.load(Ordering::Relaxed), 0);
}
