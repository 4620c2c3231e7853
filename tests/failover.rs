//! Failover and switchover against real clusters: a primary and two
//! streaming replicas per test, promoted and re-pointed by the harness while
//! clients run through pgmux with read/write splitting on.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pgmux::cluster::{Cluster, ClusterSpec, ClusterUser, Node};
use support::console::{psql_on, show_on};
use support::proxy::Proxy;
use support::raw::{self, Raw};
use support::{APP, DB, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CLIENTS: usize = 50;

/// Primary + two replicas; `app` may read the WAL receiver's timeline
/// (`pg_monitor`), as the README asks of the monitor's login.
async fn start_cluster() -> Cluster {
    tokio::task::spawn_blocking(|| {
        let spec = ClusterSpec::default().replicas(2).user(ClusterUser::scram(APP.0, APP.1)).database(DB, APP.0);
        let cluster = Cluster::start(&spec).expect("start a primary and two replicas");
        cluster.primary().psql("GRANT pg_monitor TO app").expect("grant pg_monitor");
        cluster
            .primary()
            .psql_db(
                DB,
                "CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL);
                 INSERT INTO accounts SELECT g, 0 FROM generate_series(0, 99) g;
                 CREATE TABLE history (client int, seq int, at_port int);
                 CREATE TABLE marks (note text);
                 ALTER TABLE accounts OWNER TO app; ALTER TABLE history OWNER TO app; ALTER TABLE marks OWNER TO app;",
            )
            .expect("create the tables");
        cluster.wait_replicas_caught_up(Duration::from_secs(30)).expect("replicas caught up");
        cluster
    })
    .await
    .expect("cluster start")
}

fn config(cluster: &Cluster, extra_routing: &str) -> String {
    let hosts: Vec<String> = cluster.nodes().map(|n| format!("\"{}\"", n.host_port())).collect();
    format!(
        r#"
[proxy]
listen = "127.0.0.1:0"
query_wait_timeout = "15s"

[routing]
{extra_routing}

[[databases]]
name = "{DB}"
hosts = [{hosts}]
pool_size = 20

[[users]]
name = "{app}"
password = "{pw}"

[[users]]
name = "postgres"
auth = "trust"

[admin]
users = ["postgres"]
"#,
        hosts = hosts.join(", "),
        app = APP.0,
        pw = APP.1,
    )
}

/// Runs blocking harness work (pg_ctl, psql) off the runtime's threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("harness task")
}

/// What one client saw.
#[derive(Debug, Default)]
struct Seen {
    committed: u64,
    failed: Vec<String>,
    /// A retried transaction failed again.
    failed_twice: bool,
    /// A read of the client's own row showed less than it had committed.
    ryw_violations: u64,
    reads: u64,
    /// When the first commit after the promotion was acknowledged.
    first_commit_after: Option<Instant>,
    /// Sequence numbers of the acknowledged commits.
    acked: Vec<i32>,
}

/// A TPC-B-like transaction (extended protocol, prepared statements): one
/// account row and a history row.
async fn write(c: &tokio_postgres::Client, id: i32, seq: i32) -> Result<(), tokio_postgres::Error> {
    c.batch_execute("BEGIN").await?;
    let r = async {
        c.execute("UPDATE accounts SET balance = balance + 1 WHERE id = $1", &[&id]).await?;
        c.execute("INSERT INTO history VALUES ($1, $2, inet_server_port())", &[&id, &seq]).await?;
        c.batch_execute("COMMIT").await
    }
    .await;
    if r.is_err() {
        // Rolled back already if the server went away; harmless otherwise.
        let _ = c.batch_execute("ROLLBACK").await;
    }
    r
}

async fn client_loop(
    proxy_port: u16,
    id: i32,
    stop: Arc<AtomicBool>,
    promoted: Arc<std::sync::Mutex<Option<Instant>>>,
) -> Seen {
    let c = connect(proxy_port).await;
    let mut seen = Seen::default();
    let mut seq = 0;
    let start: i64 = c.query_one("SELECT balance FROM accounts WHERE id = $1", &[&id]).await.unwrap().get(0);
    let mut expected = start;
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        let mut outcome = write(&c, id, seq).await;
        if let Err(e) = &outcome {
            seen.failed.push(format!("{e:?}"));
            // Whether it committed is unknown: its row counts no further.
            let now: i64 = match c.query_one("SELECT balance FROM accounts WHERE id = $1", &[&id]).await {
                Ok(r) => r.get(0),
                Err(e) => panic!(
                    "client {id}: its connection did not survive a failed transaction: {e:?} after {:?}",
                    seen.failed
                ),
            };
            expected = expected.max(now);
            seq += 1;
            outcome = write(&c, id, seq).await;
            if outcome.is_err() {
                seen.failed_twice = true;
            }
        }
        if outcome.is_ok() {
            seen.acked.push(seq);
            seen.committed += 1;
            expected += 1;
            if seen.first_commit_after.is_none() && promoted.lock().unwrap().is_some() {
                seen.first_commit_after = Some(Instant::now());
            }
        }
        // Read-your-writes: a read routed anywhere sees this client's commits.
        match c.query_one("SELECT balance, inet_server_port() FROM accounts WHERE id = $1", &[&id]).await {
            Ok(r) => {
                seen.reads += 1;
                if r.get::<_, i64>(0) < expected {
                    seen.ryw_violations += 1;
                }
            }
            Err(e) => seen.failed.push(format!("read: {e:?}")),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    seen
}

async fn connect(port: u16) -> tokio_postgres::Client {
    let mut config = tokio_postgres::Config::new();
    config.host("127.0.0.1").port(port).user(APP.0).password(APP.1).dbname(DB);
    let (client, connection) = config.connect(tokio_postgres::NoTls).await.expect("connect through pgmux");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

async fn metrics(addr: std::net::SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect to /metrics");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").await.unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    body
}

fn node_row<'a>(t: &'a support::console::Table, node: &Node) -> &'a Vec<String> {
    t.one("node", &node.host_port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_under_load_then_split_brain() {
    if let Ok(f) = std::env::var("RUST_LOG") {
        let _ = tracing_subscriber::fmt().with_env_filter(f).with_test_writer().try_init();
    }
    let cluster = start_cluster().await;
    let proxy = Proxy::start_with_metrics(&config(&cluster, "")).await;
    let (old, r1, r2) = (cluster.primary().clone(), cluster.replicas()[0].clone(), cluster.replicas()[1].clone());

    // Idle clients from before the failover: a named prepared statement, and
    // a pinned session (a temporary table lives on its backend).
    let idle = proxy.app().await;
    let prepared = idle.prepare("SELECT balance FROM accounts WHERE id = $1").await.unwrap();
    idle.query_one(&prepared, &[&99i32]).await.unwrap();
    let pinned = proxy.app().await;
    pinned.batch_execute("CREATE TEMP TABLE scratch (x int)").await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let promoted = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let clients: Vec<_> = (0..CLIENTS as i32)
        .map(|id| tokio::spawn(client_loop(proxy.port(), id, stop.clone(), promoted.clone())))
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The primary fails (a clean stop hands its WAL to the replicas, so no
    // acknowledged commit is lost); replica 1 is promoted, replica 2 follows it.
    let old_for_stop = old.clone();
    blocking(move || old_for_stop.stop().expect("stop the primary")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r1_for_promote = r1.clone();
    blocking(move || r1_for_promote.promote().expect("promote replica 1")).await;
    let promoted_at = Instant::now();
    *promoted.lock().unwrap() = Some(promoted_at);
    let (r2c, r1c) = (r2.clone(), r1.clone());
    blocking(move || r2c.follow(&r1c).expect("re-point replica 2")).await;

    // Replica 2 streams the new timeline and takes reads again.
    eventually(Duration::from_secs(30), "replica 2 back in rotation on timeline 2", || async {
        let t = show_on(&proxy, "pgmux", "REPLICAS").await;
        let row = node_row(&t, &r2);
        t.get(row, "timeline") == "2" && t.get(row, "in_rotation") == "yes"
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for c in clients {
        all.push(c.await.expect("client task"));
    }

    // Atomicity and durability across the switch: each client's balance is
    // its history's length (no transaction half-applied, none carried on on
    // another server after its first one died), and every acknowledged commit is there.
    let c = proxy.app().await;
    for (id, s) in all.iter().enumerate() {
        let r = c
            .query_one(
                "SELECT (SELECT balance FROM accounts WHERE id = $1), (SELECT count(*) FROM history WHERE client = $1), \
                        (SELECT array_agg(seq) FROM history WHERE client = $1)",
                &[&(id as i32)],
            )
            .await
            .unwrap();
        assert_eq!(r.get::<_, i64>(0), r.get::<_, i64>(1), "client {id}: balance and history disagree");
        let present: Vec<i32> = r.get(2);
        let lost: Vec<i32> = s.acked.iter().copied().filter(|q| !present.contains(q)).collect();
        assert!(lost.is_empty(), "client {id}: acknowledged commits missing: {lost:?}");
    }
    let first_write = all.iter().filter_map(|s| s.first_commit_after).min().expect("a commit after the promotion");
    let latency = first_write.duration_since(promoted_at);
    let failed: usize = all.iter().map(|s| s.failed.len()).sum();
    let reads: u64 = all.iter().map(|s| s.reads).sum();
    let violations: u64 = all.iter().map(|s| s.ryw_violations).sum();
    println!(
        "failover: first write {latency:?} after promotion; {failed} failed transactions over {CLIENTS} clients; \
         {reads} reads, {violations} read-your-writes violations"
    );
    for (id, s) in all.iter().enumerate() {
        assert!(s.failed.len() <= 1, "client {id} saw more than one failed transaction: {:?}", s.failed);
        assert!(!s.failed_twice, "client {id}: a retried transaction failed: {:?}", s.failed);
        assert!(s.committed > 0);
        // No write was ever sent to a node in recovery (it would refuse with 25006).
        assert!(!s.failed.iter().any(|e| e.contains("25006")), "client {id}: {:?}", s.failed);
    }
    assert_eq!(violations, 0, "read-your-writes violations across the failover");
    assert!(latency <= Duration::from_secs(1), "first write {latency:?} after the promotion");

    // The idle client's prepared statement runs on the new primary's replicas or itself.
    idle.query_one(&prepared, &[&99i32]).await.expect("a statement prepared before the failover");
    // The pinned session's state died with its backend: the connection is
    // closed, as a direct one to the stopped server would be.
    let err = pinned.simple_query("SELECT * FROM scratch").await.expect_err("pinned session lost");
    assert!(err.is_closed() || err.code().is_some(), "{err:?}");
    assert!(pinned.simple_query("SELECT 1").await.is_err(), "the pinned session's connection is closed");

    // The admin console and /metrics report the change.
    let t = show_on(&proxy, "pgmux", "REPLICAS").await;
    assert_eq!((t.get(node_row(&t, &r1), "role"), t.get(node_row(&t, &r1), "in_rotation")), ("primary", "primary"));
    assert_eq!(t.get(node_row(&t, &old), "state"), "down");
    let m = metrics(proxy.metrics.unwrap()).await;
    assert!(m.contains(&format!("pgmux_primary_changes_total{{database=\"{DB}\"}} 1")), "{m}");

    // Split brain: the old primary starts again as a primary, without rewind.
    let old_for_start = old.clone();
    blocking(move || old_for_start.start().expect("restart the old primary")).await;
    eventually(Duration::from_secs(30), "the old primary fenced", || async {
        let t = show_on(&proxy, "pgmux", "REPLICAS").await;
        t.get(node_row(&t, &old), "state") == "fenced"
    })
    .await;
    let fenced_metric = format!("pgmux_node_fenced{{database=\"{DB}\",node=\"{}\"}} 1", old.host_port());
    assert!(metrics(proxy.metrics.unwrap()).await.contains(&fenced_metric));
    for i in 0..50 {
        c.execute("INSERT INTO marks VALUES ($1)", &[&format!("after-{i}")]).await.expect("write after the split");
        let port: i32 = c.query_one("SELECT inet_server_port()", &[]).await.unwrap().get(0);
        assert_ne!(port, i32::from(old.port()), "a read went to the fenced node");
    }
    let old_for_check = old.clone();
    let on_old = blocking(move || old_for_check.psql_db(DB, "SELECT count(*) FROM marks").unwrap()).await;
    assert_eq!(on_old, "0", "a write through pgmux reached the fenced old primary");
    let on_new = scalar(&c, "SELECT count(*) FROM marks").await;
    assert_eq!(on_new, "50");
    proxy.shutdown().await;
}

async fn scalar(c: &tokio_postgres::Client, sql: &str) -> String {
    support::scalar(c, sql).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planned_switchover_with_pause_and_resume_costs_no_errors() {
    let cluster = start_cluster().await;
    let proxy = Proxy::start(&config(&cluster, "")).await;
    let (old, r1, r2) = (cluster.primary().clone(), cluster.replicas()[0].clone(), cluster.replicas()[1].clone());
    let stop = Arc::new(AtomicBool::new(false));
    let promoted = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let clients: Vec<_> =
        (0..20).map(|id| tokio::spawn(client_loop(proxy.port(), id, stop.clone(), promoted.clone()))).collect();
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The documented procedure: PAUSE, stop the old primary cleanly (its
    // replicas receive all its WAL), promote, re-point, RESUME.
    psql_on(&proxy, "pgmux", "PAUSE app").await.expect("PAUSE");
    let (o, a, b) = (old.clone(), r1.clone(), r2.clone());
    blocking(move || {
        o.stop().expect("stop the old primary");
        a.promote().expect("promote replica 1");
        b.follow(&a).expect("re-point replica 2");
    })
    .await;
    *promoted.lock().unwrap() = Some(Instant::now());
    psql_on(&proxy, "pgmux", "RESUME app").await.expect("RESUME");
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for (id, c) in clients.into_iter().enumerate() {
        let seen = c.await.expect("client task");
        assert!(seen.failed.is_empty(), "client {id} saw errors across a planned switchover: {:?}", seen.failed);
        assert_eq!(seen.ryw_violations, 0, "client {id}");
        assert!(seen.first_commit_after.is_some(), "client {id} committed nothing after the switchover");
    }
    let t = show_on(&proxy, "pgmux", "REPLICAS").await;
    assert_eq!(t.get(node_row(&t, &r1), "role"), "primary");
    proxy.shutdown().await;
}

/// While no node accepts writes, a write waits for one up to
/// query_wait_timeout and then gets 53300 naming the cause; reads go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_wait_for_a_primary_then_fail_with_53300() {
    let cluster = start_cluster().await;
    let toml = config(&cluster, "").replace("query_wait_timeout = \"15s\"", "query_wait_timeout = \"3s\"");
    let proxy = Proxy::start(&toml).await;
    let c = proxy.app().await;
    // Logged in while there is a primary (a new login needs one).
    let mut through = Raw::login(proxy.addr, "postgres", DB).await;
    c.execute("UPDATE accounts SET balance = balance WHERE id = 1", &[]).await.unwrap();
    // The session's next request waits for the write's post-commit position
    // query: with it settled, the scope's reads may use replicas. (A primary
    // gone before that query answers leaves the position unknown, and the
    // scope's reads wait for a primary instead: see the README.)
    c.simple_query("SELECT 1").await.unwrap();
    let old = cluster.primary().clone();
    blocking(move || old.stop().expect("stop the primary")).await;
    let started = Instant::now();
    let err = c.execute("UPDATE accounts SET balance = balance WHERE id = 1", &[]).await.expect_err("no primary");
    let waited = started.elapsed();
    let db = err.as_db_error().expect("an error from pgmux");
    assert_eq!(db.code().code(), "53300", "{db:?}");
    assert!(db.message().contains("no primary is available"), "{}", db.message());
    assert!(waited >= Duration::from_millis(2900), "the write waited only {waited:?}");
    // Reads still go to the replicas, and the connection is usable.
    eventually(Duration::from_secs(10), "a read from a replica", || async {
        match c.query_one("SELECT count(*) FROM accounts", &[]).await {
            Ok(_) => true,
            Err(e) => {
                eprintln!("read: {}", support::code(&e));
                false
            }
        }
    })
    .await;
    // A new client of a pool that has met its server logs in with no
    // primary (the pool keeps the server's parameters) and reads.
    let late = proxy.app().await;
    late.query_one("SELECT count(*) FROM accounts", &[])
        .await
        .expect("a read by a client that logged in with no primary");
    // Closing a statement, or a lone Sync, runs nothing: it is answered as
    // a replica answers it, at once, not after waiting for a primary (and it
    // does not count as a write of the scope: drivers close a statement
    // after each one-off query, and one sent as the primary stopped cost
    // this test's reads the replicas, once, in CI).
    let mut sync = bytes::BytesMut::new();
    postgres_protocol::message::frontend::sync(&mut sync);
    let mut close = bytes::BytesMut::new();
    postgres_protocol::message::frontend::close(b'S', "never_prepared", &mut close).unwrap();
    close.extend_from_slice(&sync);
    let mut direct = Raw::login(cluster.replicas()[0].addr(), "postgres", DB).await;
    let started = Instant::now();
    for request in [&close, &sync] {
        direct.send(request).await;
        through.send(request).await;
        let expected = raw::tags(&direct.until_ready().await);
        assert_eq!(raw::tags(&through.until_ready().await), expected, "as Postgres answers {request:?}");
    }
    assert!(started.elapsed() < Duration::from_secs(2), "waited {:?} for a primary", started.elapsed());
    // A promotion while a write waits: it goes through.
    let r1 = cluster.replicas()[0].clone();
    let write = tokio::spawn({
        let c = proxy.app().await;
        async move { c.execute("UPDATE accounts SET balance = balance WHERE id = 2", &[]).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    blocking(move || r1.promote().expect("promote")).await;
    write.await.unwrap().expect("the waiting write ran on the promoted replica");
    proxy.shutdown().await;
}

/// `/etc/hosts` with one name pointed where a test says, restored on drop.
struct HostsEntry {
    original: String,
}

const HOSTS_FILE: &str = "/etc/hosts";

impl HostsEntry {
    /// `None` where the file cannot be written (not root): the test says so and stops.
    fn set(name: &str, ip: &str) -> Option<HostsEntry> {
        let original = std::fs::read_to_string(HOSTS_FILE).ok()?;
        let entry = HostsEntry { original };
        entry.point(name, ip).then_some(entry)
    }

    fn point(&self, name: &str, ip: &str) -> bool {
        std::fs::write(HOSTS_FILE, format!("{}\n{ip} {name}\n", self.original.trim_end())).is_ok()
    }
}

impl Drop for HostsEntry {
    fn drop(&mut self) {
        let _ = std::fs::write(HOSTS_FILE, &self.original);
    }
}

/// Forwards connections to `listen` on to `to`, until dropped.
async fn forward(listen: std::net::SocketAddr, to: std::net::SocketAddr) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::TcpListener::bind(listen).await.expect("bind the forwarder");
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    })
}

/// A host name is resolved again for every new server connection: moved
/// (as managed services move endpoints), new connections follow it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_names_are_resolved_for_every_new_server_connection() {
    const NAME: &str = "pgmux-dns-test.internal";
    let Some(hosts) = HostsEntry::set(NAME, "127.0.0.1") else {
        eprintln!("skipped: {HOSTS_FILE} is not writable (run as root)");
        return;
    };
    let cluster = start_cluster().await;
    let (a, b) = (cluster.primary().clone(), cluster.replicas()[0].clone());
    // The same port on 127.0.0.2 leads to another server.
    let moved = std::net::SocketAddr::from(([127, 0, 0, 2], a.port()));
    let forwarder = forward(moved, b.addr()).await;
    let toml = config(&cluster, "").replace(
        "[[databases]]",
        &format!(
            "[[databases]]\nname = \"dns\"\ndbname = \"{DB}\"\nprimary = \"{NAME}:{}\"\n\n[[databases]]",
            a.port()
        ),
    );
    let proxy = Proxy::start(&toml).await;
    let c = proxy.connect(APP.0, Some(APP.1), "dns").await.expect("connect to the named database");
    assert_eq!(scalar(&c, "SELECT inet_server_port()").await, a.port().to_string());
    assert!(hosts.point(NAME, "127.0.0.2"), "rewrite {HOSTS_FILE}");
    // Connections already open stay where they are; new ones follow the name.
    psql_on(&proxy, "pgmux", "RECONNECT dns").await.expect("RECONNECT");
    eventually(Duration::from_secs(10), "a new server connection on the moved address", || async {
        scalar(&c, "SELECT inet_server_port()").await == b.port().to_string()
    })
    .await;
    forwarder.abort();
    proxy.shutdown().await;
}
