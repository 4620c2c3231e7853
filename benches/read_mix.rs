//! Load benchmark for read/write splitting: a 90/10 read/write mix through
//! pgmux with the replica in rotation and without it, in one run, on a real
//! primary + streaming replica. Reports throughput, the share of reads the
//! replica served, read-your-writes violations, and how soon after a write a
//! client's reads may go back to the replica.
//!
//!   cargo bench --bench read_mix [-- SECONDS CLIENTS]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use pgmux::cluster::{Cluster, ClusterSpec, ClusterUser};
use pgmux::config::Config;
use tokio_postgres::SimpleQueryMessage;

const USER: &str = "bench";
const PASSWORD: &str = "bench";
const DB: &str = "bench";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let seconds: u64 = args.first().and_then(|a| a.parse().ok()).unwrap_or(10);
    let clients: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(16);
    let spec = ClusterSpec::default().replicas(1).user(ClusterUser::scram(USER, PASSWORD)).database(DB, USER);
    let cluster = Cluster::start(&spec).expect("start primary + replica (needs PostgreSQL server binaries)");
    cluster
        .primary()
        .psql_db(DB, "CREATE TABLE kv (id int PRIMARY KEY, v int NOT NULL); INSERT INTO kv SELECT g, 0 FROM generate_series(1, 1000) g; GRANT ALL ON kv TO bench;")
        .expect("schema");
    cluster.wait_replicas_caught_up(Duration::from_secs(30)).expect("replica caught up");
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    runtime.block_on(async {
        println!(
            "read_mix: {clients} clients, 90% reads / 10% writes on own rows, {seconds} s per target, {} cores, {}",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            cluster.binaries().version().unwrap_or_default().trim()
        );
        println!(
            "| target | ops/s | reads on replica | violations | read latency (median, p90) | replica-eligible after a write (median, p90) |"
        );
        println!("|---|---|---|---|---|---|");
        for (label, with_replica, ryw) in [
            ("pgmux, primary only", false, "lsn"),
            ("pgmux + replica (lsn)", true, "lsn"),
            ("pgmux + replica (global)", true, "global"),
        ] {
            let (addr, stop) = start_pgmux(&cluster, with_replica, ryw).await;
            let mut r = run(addr, cluster.replicas()[0].port(), clients, Duration::from_secs(seconds)).await;
            let eligible = if with_replica { eligibility(addr, cluster.replicas()[0].port()).await } else { None };
            r.read_latency.sort();
            let at = |q: usize| r.read_latency.get(r.read_latency.len() * q / 100).copied().unwrap_or_default();
            println!(
                "| {label} | {:.0} | {:.1}% | {} | {:.3} ms, {:.3} ms | {} |",
                r.ops as f64 / r.elapsed.as_secs_f64(),
                100.0 * r.on_replica as f64 / r.reads.max(1) as f64,
                r.violations,
                ms(at(50)),
                ms(at(90)),
                eligible.map_or("-".to_owned(), |(m, p)| format!("{:.1} ms, {:.1} ms", ms(m), ms(p)))
            );
            let _ = stop.send(());
        }
    });
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn start_pgmux(
    cluster: &Cluster,
    with_replica: bool,
    read_your_writes: &str,
) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let replicas =
        if with_replica { format!("replicas = [\"{}\"]", cluster.replicas()[0].host_port()) } else { String::new() };
    let toml = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nquery_wait_timeout = \"30s\"\n[routing]\nmonitor_interval = \"10ms\"\nread_your_writes = \"{read_your_writes}\"\n\
         [[databases]]\nname = \"{DB}\"\nprimary = \"{}\"\n{replicas}\npool_size = 20\n\
         [[users]]\nname = \"{USER}\"\npassword = \"{PASSWORD}\"\n",
        cluster.primary().host_port()
    );
    let config = Config::parse(&toml, "read_mix").expect("config");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(pgmux::server::run(
        Arc::new(config),
        listener,
        async {
            let _ = stopped.await;
        },
        Default::default(),
    ));
    (addr, stop)
}

async fn connect(addr: std::net::SocketAddr) -> tokio_postgres::Client {
    let mut config = tokio_postgres::Config::new();
    config.host("127.0.0.1").port(addr.port()).user(USER).password(PASSWORD).dbname(DB);
    let (c, conn) = config.connect(tokio_postgres::NoTls).await.expect("connect through pgmux");
    tokio::spawn(conn);
    c
}

fn first_row(msgs: &[SimpleQueryMessage]) -> (String, String) {
    msgs.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some((r.get(0).unwrap_or("").to_owned(), r.get(1).unwrap_or("").to_owned())),
            _ => None,
        })
        .expect("a row")
}

struct Result {
    ops: usize,
    reads: usize,
    on_replica: usize,
    violations: usize,
    elapsed: Duration,
    read_latency: Vec<Duration>,
}

async fn run(addr: std::net::SocketAddr, replica_port: u16, clients: usize, duration: Duration) -> Result {
    let (ops, reads, on_replica, violations) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let start = Instant::now();
    let mut tasks = Vec::new();
    for id in 1..=clients {
        let c = connect(addr).await;
        let (ops, reads, on_replica, violations) = (ops.clone(), reads.clone(), on_replica.clone(), violations.clone());
        tasks.push(tokio::spawn(async move {
            let mut expected = 0;
            let mut n = 0usize;
            let mut latency = Vec::new();
            c.simple_query(&format!("UPDATE kv SET v = 0 WHERE id = {id}")).await.expect("reset");
            while start.elapsed() < duration {
                if n.is_multiple_of(10) {
                    expected += 1;
                    c.simple_query(&format!("UPDATE kv SET v = {expected} WHERE id = {id}")).await.expect("write");
                } else {
                    let sent = Instant::now();
                    let (v, port) = first_row(
                        &c.simple_query(&format!("SELECT v, inet_server_port() FROM kv WHERE id = {id}"))
                            .await
                            .expect("read"),
                    );
                    latency.push(sent.elapsed());
                    reads.fetch_add(1, Ordering::Relaxed);
                    if v != expected.to_string() {
                        violations.fetch_add(1, Ordering::Relaxed);
                    }
                    if port == replica_port.to_string() {
                        on_replica.fetch_add(1, Ordering::Relaxed);
                    }
                }
                n += 1;
                ops.fetch_add(1, Ordering::Relaxed);
            }
            latency
        }));
    }
    let mut read_latency = Vec::new();
    for t in tasks {
        read_latency.extend(t.await.expect("client task"));
    }
    Result {
        ops: ops.load(Ordering::Relaxed),
        reads: reads.load(Ordering::Relaxed),
        on_replica: on_replica.load(Ordering::Relaxed),
        violations: violations.load(Ordering::Relaxed),
        elapsed: start.elapsed(),
        read_latency,
    }
}

/// After a write, how long until this client's reads are served by the
/// replica again (median and p90 over 30 writes).
async fn eligibility(addr: std::net::SocketAddr, replica_port: u16) -> Option<(Duration, Duration)> {
    let c = connect(addr).await;
    let mut samples = Vec::new();
    for n in 0..30 {
        c.simple_query(&format!("UPDATE kv SET v = {n} WHERE id = 1000")).await.ok()?;
        let wrote = Instant::now();
        loop {
            let (_, port) =
                first_row(&c.simple_query("SELECT v, inet_server_port() FROM kv WHERE id = 1000").await.ok()?);
            if port == replica_port.to_string() {
                samples.push(wrote.elapsed());
                break;
            }
            if wrote.elapsed() > Duration::from_secs(5) {
                return None;
            }
        }
    }
    samples.sort();
    Some((samples[samples.len() / 2], samples[samples.len() * 9 / 10]))
}
