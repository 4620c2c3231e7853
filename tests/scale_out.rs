//! Several `pgmux` processes behaving as one: a shared SO_REUSEPORT port,
//! each instance's own `peer_listen`, rolling restarts by SIGTERM under
//! load, and cancel requests forwarded to the instance that issued the key.
//! Runs the real binary, as ops do (see tests/binary.rs).

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use support::proxy::admin_config;
use support::raw::Raw;
use support::{DB, TRUST, code, eventually, scalar};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The heavy tests run one at a time: on a small machine, one's load would
/// slow the other's cancels and logins, and latency is what they measure.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long an instance gets to start, and to exit once it should.
const START: Duration = Duration::from_secs(15);
const EXIT: Duration = Duration::from_secs(15);

fn port() -> u16 {
    pgmux::cluster::pick_port().expect("a free loopback port")
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// One instance's addresses and identity.
struct Spec {
    /// The shared port (SO_REUSEPORT).
    shared: u16,
    peer_listen: u16,
    metrics: u16,
    peer_id: u32,
    /// `[[peers]]`: (id, port of its peer_listen).
    peers: Vec<(u32, u16)>,
    pool_size: usize,
    /// More `[proxy]` lines.
    extra: String,
}

impl Spec {
    fn new(shared: u16) -> Spec {
        Spec {
            shared,
            peer_listen: port(),
            metrics: port(),
            peer_id: 0,
            peers: Vec::new(),
            pool_size: 4,
            extra: String::new(),
        }
    }

    fn config(&self, cluster: &pgmux::cluster::Cluster) -> String {
        let proxy = format!(
            "so_reuseport = true\npeer_listen = \"127.0.0.1:{}\"\nmetrics_listen = \"127.0.0.1:{}\"\npeer_id = {}\n{}",
            self.peer_listen, self.metrics, self.peer_id, self.extra
        );
        let mut text = admin_config(cluster, self.pool_size, &proxy)
            .replace("listen = \"127.0.0.1:0\"", &format!("listen = \"127.0.0.1:{}\"", self.shared));
        for (id, port) in &self.peers {
            text += &format!("\n[[peers]]\nid = {id}\naddr = \"127.0.0.1:{port}\"\n");
        }
        text
    }
}

/// A running `pgmux` process; killed if dropped while running.
struct Instance {
    name: &'static str,
    child: tokio::process::Child,
    pid: u32,
    peer_listen: SocketAddr,
    metrics: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Instance {
    /// Starts the binary with `spec` and waits until it answers on its own
    /// address (the admin console over `peer_listen`).
    async fn start(name: &'static str, spec: &Spec) -> Instance {
        let cluster = support::cluster_async().await;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.toml");
        std::fs::write(&path, spec.config(cluster)).unwrap();
        // A file, not a pipe: nobody reads a pipe while the test runs, and a
        // full one would block pgmux's logging.
        let log = dir.path().join("pgmux.log");
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgmux"))
            .arg("--config")
            .arg(&path)
            .args(["--log-level", "info"])
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .expect("start pgmux");
        let pid = child.id().expect("pid");
        let instance = Instance {
            name,
            child,
            pid,
            peer_listen: local(spec.peer_listen),
            metrics: local(spec.metrics),
            log,
            _dir: dir,
        };
        let started = Instant::now();
        loop {
            if instance.console().await.is_ok() {
                return instance;
            }
            assert!(started.elapsed() < START, "{name} did not answer on its peer_listen: {}", instance.log_text());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The admin console of this very instance, through its own address.
    async fn console(&self) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        connect(self.peer_listen, "postgres", "pgmux").await
    }

    fn signal(&self, signal: i32) {
        // SAFETY: signalling our own child by its pid.
        assert_eq!(unsafe { libc::kill(self.pid as i32, signal) }, 0);
    }

    /// Waits for the process to exit; asserts it did so successfully within [`EXIT`].
    /// Returns how long it took.
    async fn exited(&mut self) -> Duration {
        let started = Instant::now();
        let status = match tokio::time::timeout(EXIT, self.child.wait()).await {
            Ok(status) => status.unwrap(),
            Err(_) => panic!("{} did not exit within {EXIT:?}: {}", self.name, self.log_text()),
        };
        assert!(status.success(), "{} exited with {status}: {}", self.name, self.log_text());
        started.elapsed()
    }

    fn log_text(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        format!("last lines of {}'s log:\n{}", self.name, tail.into_iter().rev().collect::<Vec<_>>().join("\n"))
    }

    /// Pooled clients this instance logged in, from its log.
    fn logins(&self) -> usize {
        std::fs::read_to_string(&self.log).unwrap_or_default().matches("client logged in").count()
    }

    /// `/metrics` samples by their full series name (`name{labels}`).
    async fn metrics(&self) -> HashMap<String, f64> {
        let mut s = TcpStream::connect(self.metrics).await.expect("connect to /metrics");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: pgmux\r\n\r\n").await.unwrap();
        let mut response = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut response))
            .await
            .expect("a scrape answered in time")
            .unwrap();
        let (_, body) = response.split_once("\r\n\r\n").expect("HTTP head and body");
        body.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| l.rsplit_once(' '))
            .map(|(series, value)| (series.to_owned(), value.parse::<f64>().expect("a number")))
            .collect()
    }

    /// `pgmux_cancel_requests_total` by result: (local, forwarded, dropped).
    async fn cancels(&self) -> (u64, u64, u64) {
        let m = self.metrics().await;
        let get = |r: &str| m[&format!("pgmux_cancel_requests_total{{result=\"{r}\"}}")] as u64;
        (get("local"), get("forwarded"), get("dropped"))
    }
}

async fn connect(addr: SocketAddr, user: &str, db: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::new();
    config.host("127.0.0.1").port(addr.port()).user(user).dbname(db).connect_timeout(Duration::from_secs(5));
    let (client, conn) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

/// Sets `net.ipv4.tcp_migrate_req` (root only) and puts the old value back
/// when dropped, also when the test panics.
struct MigrateReq(String);

const MIGRATE_REQ: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

impl MigrateReq {
    fn set(value: &str) -> MigrateReq {
        let old = std::fs::read_to_string(MIGRATE_REQ)
            .unwrap_or_else(|e| panic!("{MIGRATE_REQ}: {e} (Linux 5.14 or later is needed)"));
        std::fs::write(MIGRATE_REQ, value).unwrap_or_else(|e| panic!("cannot write {MIGRATE_REQ} (root?): {e}"));
        MigrateReq(old.trim().to_owned())
    }
}

impl Drop for MigrateReq {
    fn drop(&mut self) {
        let _ = std::fs::write(MIGRATE_REQ, &self.0);
    }
}

/// What the load saw.
#[derive(Default)]
struct Load {
    stop: AtomicBool,
    connections: AtomicU64,
    committed: AtomicU64,
    failures: std::sync::Mutex<Vec<String>>,
}

/// One client of the load: connect to the shared port, one transaction on
/// its own row, disconnect; again, until told to stop.
async fn client_loop(shared: SocketAddr, table: String, id: usize, load: Arc<Load>) {
    while !load.stop.load(Ordering::Relaxed) {
        load.connections.fetch_add(1, Ordering::Relaxed);
        let client = match connect(shared, TRUST, DB).await {
            Ok(c) => c,
            Err(e) => {
                load.failures.lock().unwrap().push(format!("client {id}: connect: {e:?}"));
                continue;
            }
        };
        match client.batch_execute(&format!("BEGIN; UPDATE {table} SET n = n + 1 WHERE id = {id}; COMMIT")).await {
            Ok(()) => {
                load.committed.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => load.failures.lock().unwrap().push(format!("client {id}: transaction: {e:?}")),
        }
    }
}

/// Rolling restart on one port, twice (A → B → C), under 8 clients that
/// connect, run a transaction and disconnect in a loop: no connection
/// refused or reset, no transaction failed, every old instance exits by
/// itself once its clients left, each instance served clients, and the
/// table holds exactly the acknowledged transactions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_under_load_fails_nothing() {
    let _heavy = HEAVY.lock().await;
    let _migrate = MigrateReq::set("1");
    const CLIENTS: usize = 8;
    let table = "scale_out_rolling";
    let su = support::superuser(DB).await;
    su.batch_execute(&format!(
        "DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (id int PRIMARY KEY, n int NOT NULL); \
         INSERT INTO {table} SELECT g, 0 FROM generate_series(0, {}) g; GRANT ALL ON {table} TO {TRUST}",
        CLIENTS - 1
    ))
    .await
    .unwrap();

    let shared = port();
    let spec = |extra: &str| Spec { extra: extra.to_owned(), ..Spec::new(shared) };
    let mut a = Instance::start("A", &spec("shutdown_timeout = \"10s\"")).await;
    let load = Arc::new(Load::default());
    let clients: Vec<_> =
        (0..CLIENTS).map(|id| tokio::spawn(client_loop(local(shared), table.to_owned(), id, load.clone()))).collect();
    let committed = || load.committed.load(Ordering::Relaxed);
    eventually(Duration::from_secs(20), "load flowing through A", || async { committed() >= 50 }).await;

    // Start the new instance on the same port, then SIGTERM the old one.
    let mut b = Instance::start("B", &spec("shutdown_timeout = \"10s\"")).await;
    let a_exit = roll(&mut a, &load).await;
    let mut c = Instance::start("C", &spec("shutdown_timeout = \"10s\"")).await;
    let b_exit = roll(&mut b, &load).await;

    // The load stops; each client finishes its transaction in flight.
    load.stop.store(true, Ordering::Relaxed);
    for task in clients {
        task.await.unwrap();
    }
    c.signal(libc::SIGTERM);
    let c_exit = c.exited().await;
    let failures = load.failures.lock().unwrap().clone();
    let (connections, committed) = (load.connections.load(Ordering::Relaxed), load.committed.load(Ordering::Relaxed));
    assert!(failures.is_empty(), "{} of {connections} connections failed: {failures:#?}", failures.len());
    assert_eq!(scalar(&su, &format!("SELECT sum(n) FROM {table}")).await, committed.to_string());
    let logins = [a.logins(), b.logins(), c.logins()];
    println!(
        "rolling restart: {connections} connections, {committed} transactions, 0 failed; logins A/B/C {logins:?}; \
         exit after SIGTERM A {a_exit:?}, B {b_exit:?}, C {c_exit:?}"
    );
    assert!(logins.iter().all(|&n| n > 0), "every instance served clients: {logins:?}");
    assert_eq!(logins.iter().sum::<usize>() as u64, connections, "each connection logged in on one instance");
}

/// SIGTERMs `old` (a newer instance shares its port), asserts it exits by
/// itself once its clients left, then lets the load run on for 2 s more,
/// asserting it made progress. Returns how long the exit took.
async fn roll(old: &mut Instance, load: &Load) -> Duration {
    let committed = || load.committed.load(Ordering::Relaxed);
    old.signal(libc::SIGTERM);
    let exit = old.exited().await;
    // Well before shutdown_timeout (10 s), after which it would have drained.
    assert!(exit < Duration::from_secs(8), "{} took {exit:?} to exit: {}", old.name, old.log_text());
    let before = committed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(committed() > before, "the load went on after {} left", old.name);
    exit
}

/// A query through pgmux, running `SELECT pg_sleep(30)` (tagged), with its
/// cancel token; the task yields its outcome and when it came.
struct Sleeper {
    token: tokio_postgres::CancelToken,
    query: tokio::task::JoinHandle<(Result<(), tokio_postgres::Error>, Instant)>,
}

async fn sleeper(addr: SocketAddr, tag: &str) -> Sleeper {
    let client = connect(addr, TRUST, DB).await.expect("a client through pgmux");
    let token = client.cancel_token();
    let sql = format!("SELECT pg_sleep(30) /* {tag} */");
    let query = tokio::spawn(async move {
        let r = client.simple_query(&sql).await.map(drop);
        (r, Instant::now())
    });
    Sleeper { token, query }
}

/// Waits until `n` queries tagged `tag` run on Postgres.
async fn running(su: &tokio_postgres::Client, tag: &str, n: usize) {
    let sql = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE 'SELECT pg_sleep(%) /* {tag} */'"
    );
    let what = format!("{n} queries {tag} running");
    eventually(Duration::from_secs(20), &what, || async { scalar(su, &sql).await == n.to_string() }).await;
}

/// Cancels `s` by `cancel`, then asserts its query failed with 57014
/// within 1 s of the cancel; returns the time the cancel took to work.
async fn cancelled(
    s: Sleeper,
    cancel: impl std::future::Future<Output = Result<(), tokio_postgres::Error>>,
) -> Duration {
    let sent = Instant::now();
    cancel.await.expect("the cancel request is sent");
    let (result, at) =
        tokio::time::timeout(Duration::from_secs(5), s.query).await.expect("the cancelled query ends in time").unwrap();
    let e = result.expect_err("the query is cancelled");
    assert_eq!(code(&e), "57014", "{e:?}");
    let took = at.saturating_duration_since(sent);
    assert!(took < Duration::from_secs(1), "cancelled {took:?} after the cancel request");
    took
}

/// Two instances on one port, peers of each other. 50 clients on the shared
/// port, each cancelled through the shared port (landing on either
/// instance), and 10 more cancelled explicitly through the other
/// instance's own address: every query ends with 57014 within 1 s of its
/// cancel, every cancel was acted on by its client's instance exactly once,
/// and at least those 10 were forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancels_reach_the_backend_whichever_instance_receives_them() {
    let _heavy = HEAVY.lock().await;
    let su = support::superuser(DB).await;
    let shared = port();
    let (mut sa, mut sb) = (Spec::new(shared), Spec::new(shared));
    sa.peer_id = 1;
    sb.peer_id = 2;
    sa.peers = vec![(2, sb.peer_listen)];
    sb.peers = vec![(1, sa.peer_listen)];
    // Every client may land on the same instance.
    sa.pool_size = 64;
    sb.pool_size = 64;
    let (mut a, mut b) = (Instance::start("A", &sa).await, Instance::start("B", &sb).await);

    let tag = "cancel-across";
    let mut via_shared = Vec::new();
    for _ in 0..50 {
        via_shared.push(sleeper(local(shared), tag).await);
    }
    // Clients known to be on A and on B, cancelled through the other one.
    let mut on_a = Vec::new();
    let mut on_b = Vec::new();
    for _ in 0..5 {
        on_a.push(sleeper(a.peer_listen, tag).await);
        on_b.push(sleeper(b.peer_listen, tag).await);
    }
    running(&su, tag, 60).await;

    let mut latencies = Vec::new();
    for s in via_shared {
        let token = s.token.clone();
        latencies.push(cancelled(s, async move { token.cancel_query(tokio_postgres::NoTls).await }).await);
    }
    for (list, other) in [(on_a, b.peer_listen), (on_b, a.peer_listen)] {
        for s in list {
            let token = s.token.clone();
            let cancel = async move {
                let stream = TcpStream::connect(other).await.expect("connect to the other instance");
                token.cancel_query_raw(stream, tokio_postgres::NoTls).await
            };
            latencies.push(cancelled(s, cancel).await);
        }
    }

    let (ca, cb) = (a.cancels().await, b.cancels().await);
    latencies.sort();
    println!(
        "cancels: A (local, forwarded, dropped) {ca:?}, B {cb:?}; latency median {:?}, max {:?}",
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1],
    );
    assert_eq!(ca.0 + cb.0, 60, "each cancel acted on once, by its client's instance: A {ca:?}, B {cb:?}");
    assert!(ca.1 >= 5 && cb.1 >= 5, "the explicit cross-instance cancels were forwarded: A {ca:?}, B {cb:?}");
    assert_eq!((ca.2, cb.2), (0, 0), "nothing dropped");
    // Both instances still serve.
    for addr in [a.peer_listen, b.peer_listen] {
        let c = connect(addr, TRUST, DB).await.unwrap();
        assert_eq!(scalar(&c, "SELECT 1").await, "1");
    }
    a.signal(libc::SIGINT);
    b.signal(libc::SIGINT);
    a.exited().await;
    b.exited().await;
}

/// Logs in with the raw client; returns it and its cancel key.
async fn raw_with_key(addr: SocketAddr) -> (Raw, i32, i32) {
    let mut raw = Raw::connect(addr).await;
    let mut out = BytesMut::new();
    postgres_protocol::message::frontend::startup_message([("user", TRUST), ("database", DB)], &mut out).unwrap();
    raw.send(&out).await;
    let msgs = raw.until_ready().await;
    let key = msgs.iter().find(|m| m.tag == b'K').expect("BackendKeyData");
    let int = |b: &[u8]| i32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    (raw, int(&key.body[0..4]), int(&key.body[4..8]))
}

/// Sends a CancelRequest and waits until pgmux closes the connection, which
/// it does once it has acted on it.
async fn raw_cancel(addr: SocketAddr, pid: i32, secret: i32) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut out = BytesMut::new();
    postgres_protocol::message::frontend::cancel_request(pid, secret, &mut out);
    s.write_all(&out).await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("pgmux closes the cancel connection in time")
        .unwrap();
    assert!(rest.is_empty(), "a CancelRequest gets no answer: {rest:?}");
}

/// A key with peer id `peer` and TTL `ttl`, otherwise arbitrary.
fn key_of_peer(peer: u16, ttl: u8) -> (i32, i32) {
    let [lo, hi] = peer.to_le_bytes();
    (i32::from_be_bytes([0x12, lo, hi, 0x34]), i32::from_be_bytes([0x56, 0x78, 0x9a, 0xbc | ttl]))
}

/// A [[peers]] entry that points back at the instance itself: a cancel
/// naming it is forwarded once, then dropped (no loop, even with a crafted
/// TTL), and an unknown peer's is dropped at once; the instance stays
/// healthy. A key with the right peer id and a wrong secret or pid cancels
/// nobody's query; the right key does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_forwarding_loop_and_no_cancel_of_another_client() {
    let su = support::superuser(DB).await;
    let mut spec = Spec::new(port());
    spec.peer_id = 1;
    // Misconfigured: peer 2's address is this instance's own.
    spec.peers = vec![(2, spec.peer_listen)];
    let mut a = Instance::start("A", &spec).await;
    let shared = local(spec.shared);

    let (pid, secret) = key_of_peer(2, 1);
    raw_cancel(shared, pid, secret).await;
    assert_eq!(a.cancels().await, (0, 1, 1), "forwarded to itself once, then dropped");
    // A crafted TTL of 3 travels once all the same.
    let (pid, secret) = key_of_peer(2, 3);
    raw_cancel(a.peer_listen, pid, secret).await;
    assert_eq!(a.cancels().await, (0, 2, 2));
    // TTL spent, or a peer not listed: dropped here.
    let (pid, secret) = key_of_peer(2, 0);
    raw_cancel(shared, pid, secret).await;
    let (pid, secret) = key_of_peer(7, 1);
    raw_cancel(shared, pid, secret).await;
    assert_eq!(a.cancels().await, (0, 2, 4));

    // Another client's query, and a client with a key of its own.
    let tag = "not-yours";
    let (mut victim, pid, secret) = raw_with_key(shared).await;
    let (_other, other_pid, other_secret) = raw_with_key(shared).await;
    assert_eq!(pgmux::live::cancel::peer_of(pid), 1, "keys carry the instance's peer id");
    let mut q = BytesMut::new();
    postgres_protocol::message::frontend::query(&format!("SELECT pg_sleep(3) /* {tag} */"), &mut q).unwrap();
    victim.send(&q).await;
    running(&su, tag, 1).await;
    let flip_pid = pid ^ (1 << 24); // byte 0: the peer id stays
    for (p, s) in
        [(pid, secret ^ 0x100), (pid, secret ^ 0x4), (flip_pid, secret), (pid, other_secret), (other_pid, secret)]
    {
        raw_cancel(shared, p, s).await;
    }
    assert_eq!(a.cancels().await, (0, 2, 9), "five wrong keys dropped");
    // The other client's own key cancels what it runs: nothing.
    raw_cancel(shared, other_pid, other_secret).await;
    assert_eq!(a.cancels().await, (1, 2, 9));
    running(&su, tag, 1).await;
    let msgs = victim.until_ready().await;
    assert!(msgs.iter().all(|m| m.tag != b'E'), "the query ran to its end: {msgs:?}");

    // The right key does cancel: the wrong ones failed for being wrong.
    let tag = "yours";
    let mut q = BytesMut::new();
    postgres_protocol::message::frontend::query(&format!("SELECT pg_sleep(30) /* {tag} */"), &mut q).unwrap();
    victim.send(&q).await;
    running(&su, tag, 1).await;
    raw_cancel(shared, pid, secret).await;
    let msgs = victim.until_ready().await;
    let error = msgs.iter().find(|m| m.tag == b'E').expect("cancelled").error();
    assert_eq!(error.code, "57014");
    assert_eq!(a.cancels().await, (2, 2, 9));

    let c = connect(shared, TRUST, DB).await.expect("still healthy");
    assert_eq!(scalar(&c, "SELECT 1").await, "1");
    drop((c, victim, _other));
    a.signal(libc::SIGTERM);
    a.exited().await;
}

/// SIGTERM: new connections are refused at once; a connected client goes on
/// undisturbed until shutdown_timeout, then the drain closes it (57P01) and
/// pgmux exits. A second SIGTERM drains at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_serves_connected_clients_until_shutdown_timeout() {
    let mut spec = Spec::new(port());
    spec.extra = "shutdown_timeout = \"2s\"".into();
    let mut a = Instance::start("A", &spec).await;
    let shared = local(spec.shared);
    let client = connect(shared, TRUST, DB).await.unwrap();
    let in_block = connect(shared, TRUST, DB).await.unwrap();
    in_block.batch_execute("BEGIN").await.unwrap();
    a.signal(libc::SIGTERM);
    let sent = Instant::now();
    eventually(Duration::from_secs(5), "new connections refused", || async {
        TcpStream::connect(shared).await.is_err()
    })
    .await;
    // Past the moment an idle client would have been drained, it still works.
    while sent.elapsed() < Duration::from_millis(1500) {
        assert_eq!(scalar(&client, "SELECT 1").await, "1");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // shutdown_timeout passed: the drain lets the open transaction finish
    // (within another shutdown_timeout) and closes the idle client.
    let e = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Err(e) = client.simple_query("SELECT 1").await {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the idle client is drained after shutdown_timeout");
    assert!(sent.elapsed() >= Duration::from_secs(2), "drained only after shutdown_timeout: {:?}", sent.elapsed());
    assert!(e.as_db_error().is_none_or(|d| d.code().code() == "57P01"), "{e:?}");
    in_block.batch_execute("SELECT 1; COMMIT").await.expect("the open transaction finishes during the drain");
    a.exited().await;
    println!("SIGTERM: exited {:?} after the signal (shutdown_timeout 2s)", sent.elapsed());

    // A second SIGTERM does not wait.
    let mut b = Instance::start("B", &spec).await;
    let client = connect(shared, TRUST, DB).await.unwrap();
    b.signal(libc::SIGTERM);
    eventually(Duration::from_secs(5), "new connections refused", || async {
        TcpStream::connect(shared).await.is_err()
    })
    .await;
    let sent = Instant::now();
    b.signal(libc::SIGTERM);
    b.exited().await;
    assert!(sent.elapsed() < Duration::from_secs(1), "drained at once: {:?}", sent.elapsed());
    assert!(client.simple_query("SELECT 1").await.is_err());
}
