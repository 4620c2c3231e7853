//! Failover benchmark: two nodes trade the primary role N times (clean stop
//! of the primary, promotion of the replica, the old primary restarted as a
//! standby of the new one) while clients write through pgmux (`hosts`, roles
//! discovered). Reports, per failover, the time from the promotion request
//! (`pg_promote(wait => false)`, so the server's own promotion time is
//! included) to the first write acknowledged through pgmux, and the failed
//! transactions per client.
//!
//!   cargo bench --bench failover [-- FAILOVERS CLIENTS]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgmux::cluster::{Cluster, ClusterSpec, ClusterUser, Node};
use pgmux::config::Config;

const USER: &str = "bench";
const PASSWORD: &str = "bench";
const DB: &str = "bench";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let failovers: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(10);
    let clients: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(20);
    let spec = ClusterSpec::default().replicas(1).user(ClusterUser::scram(USER, PASSWORD)).database(DB, USER);
    let cluster = Cluster::start(&spec).expect("start primary + replica (needs PostgreSQL server binaries)");
    cluster
        .primary()
        .psql_db(
            DB,
            "CREATE TABLE acct (id int PRIMARY KEY, n bigint NOT NULL); \
             INSERT INTO acct SELECT g, 0 FROM generate_series(0, 999) g; GRANT ALL ON acct TO bench; \
             GRANT pg_monitor TO bench;",
        )
        .expect("schema");
    cluster.wait_replicas_caught_up(Duration::from_secs(30)).expect("replica caught up");
    let mut nodes = [cluster.primary().clone(), cluster.replicas()[0].clone()];
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    runtime.block_on(async {
        let (addr, stop_proxy) = start_pgmux(&nodes).await;
        let stop = Arc::new(AtomicBool::new(false));
        let promoted: Arc<Mutex<Option<Instant>>> = Arc::default();
        let first_after: Arc<Mutex<Option<Instant>>> = Arc::default();
        let failed: Arc<Vec<AtomicU64>> = Arc::new((0..clients).map(|_| AtomicU64::new(0)).collect());
        let commits = Arc::new(AtomicU64::new(0));
        let tasks: Vec<_> = (0..clients)
            .map(|i| {
                let (stop, promoted, first_after, failed, commits) =
                    (stop.clone(), promoted.clone(), first_after.clone(), failed.clone(), commits.clone());
                tokio::spawn(async move {
                    let c = connect(addr).await;
                    while !stop.load(Ordering::Relaxed) {
                        let mut ok = write(&c, i as i32).await;
                        if !ok {
                            failed[i].fetch_add(1, Ordering::Relaxed);
                            ok = write(&c, i as i32).await;
                            if !ok {
                                failed[i].fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        if ok {
                            commits.fetch_add(1, Ordering::Relaxed);
                            if promoted.lock().unwrap().is_some() {
                                first_after.lock().unwrap().get_or_insert_with(Instant::now);
                            }
                        }
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut latencies = Vec::new();
        println!(
            "failover: {failovers} failovers, {clients} clients writing, {} cores, {}",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            cluster.binaries().version().unwrap_or_default().trim()
        );
        for round in 0..failovers {
            let [old, new] = nodes.clone();
            *promoted.lock().unwrap() = None;
            *first_after.lock().unwrap() = None;
            let o = old.clone();
            tokio::task::spawn_blocking(move || o.stop().expect("stop the primary")).await.unwrap();
            // Timed from the promotion request: the server's promotion, pgmux
            // noticing it (one monitor sample) and the first commit, all in.
            *promoted.lock().unwrap() = Some(Instant::now());
            let at = Instant::now();
            let n = new.clone();
            tokio::task::spawn_blocking(move || n.psql("SELECT pg_promote(wait => false)").expect("promote"))
                .await
                .unwrap();
            let deadline = at + Duration::from_secs(30);
            let first = loop {
                if let Some(f) = *first_after.lock().unwrap() {
                    break f;
                }
                assert!(Instant::now() < deadline, "no write within 30 s of the promotion");
                tokio::time::sleep(Duration::from_millis(1)).await;
            };
            let latency = first.duration_since(at);
            latencies.push(latency);
            println!("  failover {}: first write {:.1} ms after the promotion request", round + 1, ms(latency));
            // The old primary, stopped cleanly, follows the new one without a rewind.
            let (o, n) = (old.clone(), new.clone());
            tokio::task::spawn_blocking(move || {
                o.start_as_standby_of(&n).expect("restart the old primary as a standby");
                wait_streaming(&n, &o);
            })
            .await
            .unwrap();
            nodes = [new, old];
        }
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            let _ = t.await;
        }
        let _ = stop_proxy.send(());
        latencies.sort();
        let per_client: Vec<u64> = failed.iter().map(|f| f.load(Ordering::Relaxed)).collect();
        println!(
            "promotion request → first write through pgmux: median {:.1} ms, max {:.1} ms; failed transactions per client per failover: \
             mean {:.2}, max over the run {} ({} commits in all)",
            ms(latencies[latencies.len() / 2]),
            ms(*latencies.last().unwrap()),
            per_client.iter().sum::<u64>() as f64 / (clients * failovers) as f64,
            per_client.iter().max().unwrap(),
            commits.load(Ordering::Relaxed),
        );
    });
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn wait_streaming(primary: &Node, standby: &Node) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let sql = format!("SELECT count(*) FROM pg_stat_replication WHERE application_name = '{}'", standby.name());
    while primary.psql(&sql).map(|r| r != "1").unwrap_or(true) {
        assert!(Instant::now() < deadline, "{} is not streaming from {}", standby.name(), primary.name());
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn write(c: &tokio_postgres::Client, id: i32) -> bool {
    let r = c.batch_execute(&format!("BEGIN; UPDATE acct SET n = n + 1 WHERE id = {id}; COMMIT")).await;
    if r.is_err() {
        let _ = c.batch_execute("ROLLBACK").await;
    }
    r.is_ok()
}

async fn start_pgmux(nodes: &[Node; 2]) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let toml = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nquery_wait_timeout = \"30s\"\n\
         [[databases]]\nname = \"{DB}\"\nhosts = [\"{}\", \"{}\"]\npool_size = 20\n\
         [[users]]\nname = \"{USER}\"\npassword = \"{PASSWORD}\"\n",
        nodes[0].host_port(),
        nodes[1].host_port()
    );
    let config = Config::parse(&toml, "failover").expect("config");
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
