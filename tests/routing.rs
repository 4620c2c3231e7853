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
static STOPPABLE: OnceLock<Cluster> = OnceLock::new();

/// Primary + a replica that applies WAL 500 ms late.
fn delayed() -> &'static Cluster {
    DELAYED.get_or_init(|| start(Some("500ms")))
}

/// Primary + an ordinary replica.
fn prompt() -> &'static Cluster {
    PROMPT.get_or_init(|| start(None))
}

/// Primary + an ordinary replica that a test stops and restarts: its own,
/// so that tests reading from [`prompt`]'s replica meanwhile don't find it
/// down (CI once saw 0 of 864 reads on the replica that way).
fn stoppable() -> &'static Cluster {
    STOPPABLE.get_or_init(|| start(None))
}

/// Statics are never dropped; libtest ends with `exit`, which runs atexit hooks.
fn stop_clusters_at_exit() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        extern "C" fn stop() {
            let _ = std::panic::catch_unwind(|| {
                for c in [DELAYED.get(), PROMPT.get(), STOPPABLE.get()].into_iter().flatten() {
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
    let mut spec = ClusterSpec::default()
        .replicas(1)
        .user(ClusterUser::scram(APP.0, APP.1))
        .database(DB, APP.0)
        .primary_setting("max_prepared_transactions", "4")
        .replica_setting("max_prepared_transactions", "4");
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
    proxy_with(cluster, routing, "").await
}

/// [`proxy`] with extra lines for the `app` user's entry.
async fn proxy_with(cluster: &Cluster, routing: &str, user_extra: &str) -> Proxy {
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
{user_extra}
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

/// A hot standby lists no prepared transactions: a transaction manager
/// recovering 2PC through pgmux must see the primary's list, or it leaves
/// them (and their locks) for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_transactions_are_listed_as_the_primary_lists_them() {
    let cluster = cluster_of(prompt).await;
    let replica_port = cluster.replicas()[0].port().to_string();
    let proxy = proxy(cluster, "").await;
    let recovering = proxy.app().await;
    await_replica_reads(&recovering, &replica_port).await;
    let preparer = proxy.app().await;
    preparer.batch_execute("BEGIN; SELECT 1; PREPARE TRANSACTION 'pgmux_2pc_probe'").await.unwrap();
    let list = "SELECT gid FROM pg_catalog.pg_prepared_xacts WHERE gid LIKE 'pgmux_2pc%'";
    let on_primary = cluster.primary().psql_db(DB, list).expect("psql on the primary");
    assert_eq!(on_primary.trim(), "pgmux_2pc_probe");
    let on_replica = cluster.replicas()[0].psql_db(DB, list).expect("psql on the replica");
    assert_eq!(on_replica.trim(), "", "a standby lists none (the reason for this test)");
    let through = recovering.simple_query(list).await.unwrap();
    recovering.batch_execute("ROLLBACK PREPARED 'pgmux_2pc_probe'").await.unwrap();
    assert_eq!(row(&through), vec!["pgmux_2pc_probe".to_string()], "as on the primary");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_transactions_and_hints() {
    let cluster = cluster_of(prompt).await;
    let replica_port = cluster.replicas()[0].port().to_string();
    let primary_port = cluster.primary().port().to_string();
    let proxy = proxy(cluster, "").await;
    let c = proxy.app().await;
    await_replica_reads(&c, &replica_port).await;
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
    let cluster = cluster_of(stoppable).await;
    let replica = &cluster.replicas()[0];
    let replica_port = replica.port().to_string();
    let proxy = proxy(cluster, "").await;
    let c = proxy.app().await;
    await_replica_reads(&c, &replica_port).await;
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
    await_replica_reads(&c, &replica_port).await;
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
    await_replica_reads(&reader, &replica_port).await;
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

/// Waits until `c`'s reads go to the replica (in the rotation once the
/// monitor has sampled it; after an idle spell a delayed replica's replay
/// delay, since its last replayed commit, can exceed `max_replica_lag`
/// until the next write is replayed).
async fn await_replica_reads(c: &tokio_postgres::Client, replica_port: &str) {
    eventually(Duration::from_secs(10), "reads served by the replica", || async {
        row(&c.simple_query("SELECT inet_server_port()").await.unwrap())[0] == replica_port
    })
    .await;
}

/// A client of `proxy` as `app`, with a startup `options` value.
async fn app_with_options(proxy: &Proxy, options: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::new();
    config.host("127.0.0.1").port(proxy.addr.port()).user(APP.0).password(APP.1).dbname(DB).options(options);
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// Runs `sql` on a raw connection; returns the `pgmux.write_lsn` token it
/// was handed, checking it came before the ReadyForQuery that ended the
/// transaction (a driver reading it as its commit returns has it).
async fn write_for_token(raw: &mut support::raw::Raw, sql: &str) -> Option<String> {
    let msgs = raw.simple_query(sql).await;
    assert!(msgs.iter().all(|m| m.tag != b'E'), "{sql}: {msgs:?}");
    assert_eq!(msgs.last().map(|m| m.tag), Some(b'Z'));
    msgs.iter().filter(|m| m.tag == b'S').find_map(|m| {
        let mut parts = m.body[..].split(|&b| b == 0);
        let name = parts.next()?;
        let value = parts.next()?;
        (name == b"pgmux.write_lsn").then(|| String::from_utf8_lossy(value).into_owned())
    })
}

/// The `v` of row `id` and the port of the server that answered.
async fn read_row(c: &tokio_postgres::Client, prefix: &str, id: i32) -> (String, String) {
    let r =
        row(&c.simple_query(&format!("{prefix}SELECT v, inet_server_port() FROM kv WHERE id = {id}")).await.unwrap());
    (r[0].clone(), r[1].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_token_carries_read_your_writes_to_another_connection_on_another_instance() {
    let cluster = cluster_of(delayed).await;
    let (primary_port, replica_port) = (cluster.primary().port().to_string(), cluster.replicas()[0].port().to_string());
    // Two instances that share nothing; the writer's logs in without a password (raw client).
    let a = proxy_with(cluster, r#"read_your_writes = "lsn""#, r#"auth = "trust""#).await;
    let b = proxy(cluster, r#"read_your_writes = "lsn""#).await;
    let mut writer = support::raw::Raw::login(a.addr, APP.0, DB).await;
    // Without asking, a session gets only what Postgres would send.
    assert_eq!(write_for_token(&mut writer, "UPDATE kv SET v = 0 WHERE id = 60").await, None);
    writer.simple_query("SET pgmux.write_token = on").await;
    let reader = b.app().await;
    let id = 60;
    let mut violations = 0;
    for n in 1..=24 {
        let token = write_for_token(&mut writer, &format!("UPDATE kv SET v = {n} WHERE id = {id}"))
            .await
            .expect("a transaction that wrote gets a pgmux.write_lsn token");
        // Each way a client can present it, in turn.
        let (v, _) = match n % 3 {
            0 => {
                reader.simple_query(&format!("SET pgmux.read_after = '{token}'")).await.unwrap();
                read_row(&reader, "", id).await
            }
            1 => read_row(&reader, &format!("/* pgmux:after={token} */ "), id).await,
            _ => {
                let c = app_with_options(&b, &format!("-c pgmux.read_after={token}")).await.unwrap();
                read_row(&c, "", id).await
            }
        };
        if v != n.to_string() {
            violations += 1;
        }
    }
    assert_eq!(violations, 0, "{violations} of 24 token reads on instance B missed the write made through A");

    // Without the token, B's connection knows nothing of A's write: with the
    // replica 500 ms behind its reads are stale (the assertion above can fail).
    reader.simple_query("RESET pgmux.read_after").await.unwrap();
    await_replica_reads(&reader, &replica_port).await;
    let mut stale = 0;
    for n in 100..110 {
        write_for_token(&mut writer, &format!("UPDATE kv SET v = {n} WHERE id = {id}")).await;
        let (v, port) = read_row(&reader, "", id).await;
        if v != n.to_string() {
            assert_eq!(port, replica_port, "only a replica read can be stale");
            stale += 1;
        }
    }
    assert!(stale > 0, "reads without the token never went stale: the check above proves nothing");

    // A token the replicas cannot satisfy: one from another timeline, or a
    // position far ahead. The read goes to the primary, never stale.
    for token in ["99/0/1", "1/FF/0"] {
        let (v, port) = read_row(&reader, &format!("/* pgmux:after={token} */ "), id).await;
        assert_eq!((v.as_str(), port.as_str()), ("109", primary_port.as_str()), "token {token}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_lets_reads_use_the_replica_once_it_has_the_write() {
    let cluster = cluster_of(prompt).await;
    let replica_port = cluster.replicas()[0].port().to_string();
    let a = proxy_with(cluster, r#"read_your_writes = "lsn""#, r#"auth = "trust""#).await;
    // Waits long enough for the replica's replay on a loaded machine: what
    // is under test is that a token lets the read there, not how fast.
    let b = proxy(cluster, "read_your_writes = \"lsn\"\nmax_replica_wait = \"500ms\"").await;
    let mut writer = support::raw::Raw::login(a.addr, APP.0, DB).await;
    writer.simple_query("SET pgmux.write_token = on").await;
    let reader = b.app().await;
    let mut on_replica = 0;
    for n in 1..=20 {
        let token = write_for_token(&mut writer, &format!("UPDATE kv SET v = {n} WHERE id = 61")).await.unwrap();
        let (v, port) = read_row(&reader, &format!("/* pgmux:after={token} */ "), 61).await;
        assert_eq!(v, n.to_string());
        on_replica += usize::from(port == replica_port);
    }
    // The replica replays within a millisecond or so; asked at once, it serves the read.
    assert!(on_replica >= 15, "only {on_replica} of 20 token reads on a prompt replica");

    // Extended protocol, two transactions pipelined in one request: the
    // token comes once, after the first ReadyForQuery and before the last.
    let mut out = bytes::BytesMut::new();
    support::raw::extended_query(&mut out, "UPDATE kv SET v = 100 WHERE id = 61");
    support::raw::extended_query(&mut out, "UPDATE kv SET v = 101 WHERE id = 61");
    writer.send(&out).await;
    let mut msgs = writer.until_ready().await;
    msgs.extend(writer.until_ready().await);
    assert_eq!(support::raw::tags(&msgs), "12CZ12CSZ", "{msgs:?}");
    let token = String::from_utf8_lossy(&msgs[7].body).split('\0').nth(1).unwrap().to_owned();
    let (v, _) = read_row(&reader, &format!("/* pgmux:after={token} */ "), 61).await;
    assert_eq!(v, "101");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_tokens_get_postgres_answer_for_a_bad_setting_value() {
    let cluster = cluster_of(prompt).await;
    let proxy = proxy(cluster, r#"read_your_writes = "lsn""#).await;
    let c = proxy.app().await;
    // Postgres's own answer for a value a setting does not take, for comparison.
    let direct = support::connect(cluster.primary(), APP.0, Some(APP.1), DB).await.unwrap();
    let pg = direct.simple_query("SET work_mem = 'garbage'").await.unwrap_err();
    let pg = pg.as_db_error().unwrap();
    assert_eq!(pg.message(), r#"invalid value for parameter "work_mem": "garbage""#);

    let e = c.simple_query("SET pgmux.read_after = 'garbage'").await.unwrap_err();
    let e = e.as_db_error().expect("an ErrorResponse");
    assert_eq!((e.code(), e.severity()), (pg.code(), pg.severity()));
    assert_eq!(e.message(), r#"invalid value for parameter "pgmux.read_after": "garbage""#);
    // Refused before the server: the session has no token, reads work.
    assert_eq!(read_row(&c, "", 1).await.0, "0");

    let e = c.simple_query("/* pgmux:after=1/zz */ SELECT 1").await.unwrap_err();
    assert_eq!(e.as_db_error().map(|d| d.code().code()), Some("22023"), "{e:?}");
    // A value that reached the session another way (set_config) fails the reads it would steer...
    c.simple_query("SELECT set_config('pgmux.read_after', 'nope', false)").await.unwrap();
    let e = c.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(e.as_db_error().map(|d| d.message()), Some(r#"invalid value for parameter "pgmux.read_after": "nope""#));
    // ...until it is reset.
    c.simple_query("RESET pgmux.read_after").await.unwrap();
    assert_eq!(read_row(&c, "", 1).await.0, "0");

    // pgmux.write_token is a boolean, read as Postgres reads one.
    let pg = direct.simple_query("SET enable_seqscan = 'maybe'").await.unwrap_err();
    let e = c.simple_query("SET pgmux.write_token = 'maybe'").await.unwrap_err();
    let (pg, e) = (pg.as_db_error().unwrap(), e.as_db_error().unwrap());
    assert_eq!(pg.message(), r#"parameter "enable_seqscan" requires a Boolean value"#);
    assert_eq!((e.code(), e.message()), (pg.code(), r#"parameter "pgmux.write_token" requires a Boolean value"#));
    c.simple_query("SET pgmux.write_token = of").await.unwrap();

    // At login, as Postgres refuses a bad startup option: FATAL 22023.
    for options in ["-c pgmux.read_after=1/x", "-c pgmux.write_token=maybe"] {
        let Err(e) = app_with_options(&proxy, options).await else { panic!("login accepted with {options}") };
        let e = e.as_db_error().expect("an ErrorResponse");
        assert_eq!((e.code().code(), e.severity()), ("22023", "FATAL"), "{options}");
    }
}

/// Readers through two instances in `global` mode, a writer straight to the
/// primary: every read sees every write committed before it was sent.
async fn global_mode_readers(cluster: &Cluster, rounds: i32, pace: Duration) -> (usize, usize, usize) {
    let replica_port = cluster.replicas()[0].port().to_string();
    let a = proxy(cluster, r#"read_your_writes = "global""#).await;
    let b = proxy(cluster, r#"read_your_writes = "global""#).await;
    let writer = support::connect(cluster.primary(), APP.0, Some(APP.1), DB).await.unwrap();
    let readers = [a.app().await, b.app().await, a.app().await, b.app().await];
    let (mut reads, mut violations, mut on_replica) = (0, 0, 0);
    for n in 1..=rounds {
        writer.simple_query(&format!("UPDATE kv SET v = {n} WHERE id = 70")).await.unwrap();
        for r in &readers {
            let (v, port) = read_row(r, "", 70).await;
            reads += 1;
            violations += usize::from(v != n.to_string());
            on_replica += usize::from(port == replica_port);
            tokio::time::sleep(pace).await;
        }
    }
    (reads, violations, on_replica)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_mode_sees_writes_made_by_anyone_even_straight_to_the_primary() {
    let delayed = cluster_of(delayed).await;
    let (reads, violations, _) = global_mode_readers(delayed, 10, Duration::ZERO).await;
    assert_eq!(
        violations, 0,
        "{violations} of {reads} reads missed a write committed before them (replica 500 ms late)"
    );
    // The same readers in lsn mode do not know of a writer that bypasses
    // pgmux: stale reads (the assertion above can fail).
    let lsn = proxy(delayed, r#"read_your_writes = "lsn""#).await;
    let writer = support::connect(delayed.primary(), APP.0, Some(APP.1), DB).await.unwrap();
    let reader = lsn.app().await;
    await_replica_reads(&reader, &delayed.replicas()[0].port().to_string()).await;
    let mut stale = 0;
    for n in 100..105 {
        writer.simple_query(&format!("UPDATE kv SET v = {n} WHERE id = 70")).await.unwrap();
        stale += usize::from(read_row(&reader, "", 70).await.0 != n.to_string());
    }
    assert!(stale > 0, "lsn mode never read stale after a direct write");

    let prompt = cluster_of(prompt).await;
    let (reads, violations, on_replica) = global_mode_readers(prompt, 60, Duration::from_millis(5)).await;
    eprintln!(
        "global mode, prompt replica, 5 ms pace: {on_replica} of {reads} reads on the replica, {violations} violations"
    );
    assert_eq!(violations, 0);
    assert!(on_replica * 100 >= reads * 50, "only {on_replica} of {reads} reads on the replica");
}

/// A proxy with `routing` on the delayed cluster, its reads already on the
/// replica, and a raw connection through it (`app` trusted); the primary's
/// and the replica's ports.
async fn raw_on_delayed(routing: &str) -> (Proxy, support::raw::Raw, String, String) {
    let cluster = cluster_of(delayed).await;
    let (primary_port, replica_port) = (cluster.primary().port().to_string(), cluster.replicas()[0].port().to_string());
    let proxy = proxy_with(cluster, routing, r#"auth = "trust""#).await;
    await_replica_reads(&proxy.app().await, &replica_port).await;
    let raw = support::raw::Raw::login(proxy.addr, APP.0, DB).await;
    (proxy, raw, primary_port, replica_port)
}

/// A write pipelined behind a read (one buffer, as tokio-postgres, pgx and
/// libpq's pipeline mode send them) runs where Postgres would run it: on the
/// primary, and read-your-writes counts it. Before, it went with the read
/// to the replica and failed with 25006.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_pipelined_behind_a_read_runs_on_the_primary() {
    let (_proxy, mut raw, primary_port, _) = raw_on_delayed(r#"read_your_writes = "lsn""#).await;
    for n in 1..=5 {
        let mut out = bytes::BytesMut::new();
        support::raw::extended_query(&mut out, "SELECT inet_server_port()");
        postgres_protocol::message::frontend::query(
            &format!("BEGIN; UPDATE kv SET v = {n} WHERE id = 90; COMMIT"),
            &mut out,
        )
        .unwrap();
        raw.send(&out).await;
        let (read, write) = (raw.until_ready().await, raw.until_ready().await);
        assert_eq!(support::raw::tags(&read), "12DCZ");
        assert_eq!(support::raw::tags(&write), "CCCZ", "{:?}", write.iter().find(|m| m.tag == b'E').map(|m| m.error()));
        // The write counted: with the replica 500 ms behind, the next read is the primary's.
        let msgs = raw.simple_query("SELECT v, inet_server_port() FROM kv WHERE id = 90").await;
        assert_eq!(data_row(&msgs[1].body), [n.to_string(), primary_port.clone()]);
    }
}

/// The text columns of a DataRow body.
fn data_row(body: &[u8]) -> Vec<String> {
    let mut at = 2;
    let mut out = Vec::new();
    for _ in 0..u16::from_be_bytes([body[0], body[1]]) {
        let len = i32::from_be_bytes(body[at..at + 4].try_into().unwrap());
        at += 4;
        let len = usize::try_from(len).unwrap_or(0);
        out.push(String::from_utf8_lossy(&body[at..at + len]).into_owned());
        at += len;
    }
    out
}

/// A write the client sends while a read routed to the primary is still
/// being answered (after the read's buffer, so routing never saw it) is
/// routed on its own: it runs as a write and read-your-writes counts it.
/// Before, it rode along on the read's server connection uncounted, and the
/// client's next reads went to a replica that did not have it yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_sent_while_a_read_runs_on_the_primary_counts_as_a_write() {
    // No waiting for the replica: a read it cannot serve goes to the primary.
    let routing = "read_your_writes = \"lsn\"\nmax_replica_wait = \"0s\"";
    let (_proxy, mut raw, primary_port, replica_port) = raw_on_delayed(routing).await;
    let mut on_replica = 0;
    for n in 1..=3 {
        // A write the replica (500 ms behind) lacks: the next read is the primary's.
        let first = format!("UPDATE kv SET v = {n}0 WHERE id = 91");
        assert_eq!(support::raw::tags(&raw.simple_query(&first).await), "CZ");
        let mut out = bytes::BytesMut::new();
        postgres_protocol::message::frontend::query("SELECT pg_sleep(0.3), inet_server_port()", &mut out).unwrap();
        raw.send(&out).await;
        // The second write, sent while that read sleeps on the primary.
        tokio::time::sleep(Duration::from_millis(100)).await;
        out.clear();
        postgres_protocol::message::frontend::query(&format!("UPDATE kv SET v = {n}1 WHERE id = 91"), &mut out)
            .unwrap();
        raw.send(&out).await;
        let read = raw.until_ready().await;
        assert_eq!(data_row(&read[1].body)[1], primary_port, "the read went to the primary");
        assert_eq!(support::raw::tags(&raw.until_ready().await), "CZ");
        // Until the replica has replayed the second write, reads are the
        // primary's; then the replica's. Either way they see it.
        let until = std::time::Instant::now() + Duration::from_millis(1500);
        while std::time::Instant::now() < until {
            let msgs = raw.simple_query("SELECT v, inet_server_port() FROM kv WHERE id = 91").await;
            let row = data_row(&msgs[1].body);
            assert_eq!(row[0], format!("{n}1"), "round {n}: a read on port {} missed the second write", row[1]);
            on_replica += usize::from(row[1] == replica_port);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    assert!(on_replica > 0, "no read was served by the replica");
}

/// What a client sends after a request that ends with a Flush, or inside a
/// read-only transaction, goes on that server connection (it may need the
/// statement or the transaction there); but a request it pipelines after
/// the Sync that ends the sequence is routed on its own: a write among
/// them runs on the primary, as Postgres would run it, instead of failing
/// with 25006 on the replica. Statements pipelined inside a read-only
/// transaction on the replica are all answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_pipelined_after_a_flushed_read_runs_on_the_primary() {
    use postgres_protocol::message::frontend;
    let (proxy, mut raw, primary_port, replica_port) = raw_on_delayed(r#"read_your_writes = "lsn""#).await;
    for n in 1..=3 {
        // A read that ends with a Flush (the client waits for its rows
        // before it sends the Sync), on the replica once it has the last
        // round's write.
        let mut out = bytes::BytesMut::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            out.clear();
            support::raw::extended_query(&mut out, "SELECT inet_server_port()");
            out.truncate(out.len() - 5);
            frontend::flush(&mut out);
            raw.send(&out).await;
            let mut got = Vec::new();
            for _ in 0..4 {
                got.push(raw.recv().await.expect("an answer before the Sync"));
            }
            assert_eq!(support::raw::tags(&got), "12DC");
            if data_row(&got[2].body) == [replica_port.as_str()] {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "no flushed read on the replica");
            out.clear();
            frontend::sync(&mut out);
            raw.send(&out).await;
            assert_eq!(support::raw::tags(&raw.until_ready().await), "Z");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The Sync, and a write pipelined right behind it.
        out.clear();
        frontend::sync(&mut out);
        frontend::query(&format!("UPDATE kv SET v = {n} WHERE id = 92"), &mut out).unwrap();
        raw.send(&out).await;
        assert_eq!(support::raw::tags(&raw.until_ready().await), "Z");
        let write = raw.until_ready().await;
        assert_eq!(support::raw::tags(&write), "CZ", "{:?}", write.iter().find(|m| m.tag == b'E').map(|m| m.error()));
        let msgs = raw.simple_query("SELECT v, inet_server_port() FROM kv WHERE id = 92").await;
        assert_eq!(data_row(&msgs[1].body), [n.to_string(), primary_port.clone()], "the write counted");
    }
    // A read-only transaction on the replica, its statements pipelined.
    let mut raw = support::raw::Raw::login(proxy.addr, APP.0, DB).await;
    assert_eq!(support::raw::tags(&raw.simple_query("BEGIN READ ONLY").await), "CZ");
    let mut out = bytes::BytesMut::new();
    for sql in ["SELECT inet_server_port()", "SELECT 2", "COMMIT"] {
        frontend::query(sql, &mut out).unwrap();
    }
    raw.send(&out).await;
    let first = raw.until_ready().await;
    assert_eq!(data_row(&first[1].body), [replica_port.as_str()]);
    assert_eq!(support::raw::tags(&raw.until_ready().await), "TDCZ");
    assert_eq!(support::raw::tags(&raw.until_ready().await), "CZ");
}

/// A message of an invalid type sent while a routed read is answered waits
/// with the rest (see above): the client gets the read's answer, then the
/// FATAL Postgres sends for it (as a direct connection does, see
/// tests/protocol_safety.rs), and the next client's reads are untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_message_sent_while_a_routed_read_runs_ends_that_client_only() {
    let (proxy, mut raw, _, replica_port) = raw_on_delayed(r#"read_your_writes = "lsn""#).await;
    let mut out = bytes::BytesMut::new();
    postgres_protocol::message::frontend::query("SELECT pg_sleep(0.2), inet_server_port()", &mut out).unwrap();
    raw.send(&out).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    raw.send(&[b'r', 0, 0, 0, 4]).await;
    let msgs = raw.until_closed().await;
    assert_eq!(support::raw::tags(&msgs), "TDCZE");
    assert_eq!(data_row(&msgs[1].body)[1], replica_port);
    let fatal = msgs[4].error();
    assert_eq!((fatal.code.as_str(), fatal.message.as_str()), ("08P01", "invalid frontend message type 114"));
    let next = proxy.app().await;
    for _ in 0..5 {
        assert_eq!(row(&next.simple_query("SELECT count(*) FROM kv").await.unwrap()), ["100"]);
    }
}
