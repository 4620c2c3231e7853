//! `pgmux demo`: a throwaway primary + replica, pgmux in front, pgbench through it.
//!
//! Everything lives in one future raced against Ctrl-C: when it is dropped the
//! proxy, any running pgbench (`kill_on_drop`) and the [`Cluster`] (whose
//! `Drop` stops the servers and deletes the temp dir) all go with it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;

use crate::cluster::{Cluster, ClusterSpec, ClusterUser, Node, PgBinaries};
use crate::config::Config;

const USER: &str = "app";
const PASSWORD: &str = "app";
const DB: &str = "app";
const POOL_SIZE: usize = 10;
const CLIENTS: usize = 20;
const SECONDS_PER_RUN: u64 = 5;
/// Slack on top of a pgbench run before we call it stuck (e.g. the proxy never answers).
const PGBENCH_GRACE: Duration = Duration::from_secs(60);

const PGBENCH_MISSING: &str = "pgbench not found (looked next to the server binaries and in PATH). \
     On Debian/Ubuntu it comes with postgresql-contrib on older releases and with postgresql-client on newer ones: \
     apt-get install postgresql-contrib (or postgresql-client)";

pub async fn run() -> Result<(), String> {
    let bins = PgBinaries::find().map_err(|e| e.to_string())?;
    let pgbench = bins.pgbench.clone().ok_or(PGBENCH_MISSING)?;
    let interrupted = async {
        // Without a SIGINT handler Ctrl-C kills us the default way; the servers
        // share our process group, so they receive it too and shut down.
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        result = demo(bins, pgbench) => result,
        () = interrupted => Err("interrupted; the throwaway cluster has been stopped and removed".into()),
    }
}

async fn demo(bins: PgBinaries, pgbench: PathBuf) -> Result<(), String> {
    let version = bins.version().unwrap_or_else(|_| "PostgreSQL".into());
    println!("{version} from {}", bins.bindir.display());
    println!("starting a throwaway primary + 1 streaming replica ...");
    let spec = ClusterSpec::default().replicas(1).user(ClusterUser::scram(USER, PASSWORD)).database(DB, USER);
    // Blocking start off the runtime threads. If Ctrl-C drops this await, the
    // task still finishes and its Cluster is dropped (= cleaned up) on its own.
    let cluster = tokio::task::spawn_blocking(move || Cluster::start_with(bins, &spec))
        .await
        .map_err(|e| format!("cluster start task failed: {e}"))?
        .map_err(|e| e.to_string())?;
    // Dropping it on a runtime thread is fine: pg_ctl stop -m immediate is quick.
    let cluster = Arc::new(cluster);
    let primary = cluster.primary().clone();
    let replica = cluster.replicas()[0].clone();
    println!("  primary  {}  (data in {})", primary.host_port(), cluster.root_dir().display());
    println!("  replica1 {}  streaming", replica.host_port());

    let listener = TcpListener::bind(("127.0.0.1", 0)).await.map_err(|e| format!("cannot bind the proxy port: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let config = Config::parse(&config_toml(addr, &primary, &replica), "demo").map_err(|e| e.to_string())?;

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = crate::server::run(
        Arc::new(config),
        listener,
        async {
            let _ = stop_rx.await;
        },
        Default::default(),
    );
    // Polled in this task next to the workload rather than spawned, so it
    // needs no Send bound and cannot outlive the demo.
    tokio::pin!(server);

    println!(
        "pgmux listening on {addr}: pool_size = {POOL_SIZE}, transaction pooling, reads routed to the replica with read-your-writes"
    );
    println!();
    println!("DATABASE_URL=postgres://{USER}:{PASSWORD}@{addr}/{DB}");
    println!();

    let workload = workload(&pgbench, addr.port(), &primary, &replica);
    let result = tokio::select! {
        r = &mut server => Err(match r {
            Ok(()) => "pgmux stopped unexpectedly".to_string(),
            Err(e) => format!("pgmux failed: {e}"),
        }),
        r = workload => r,
    };
    let _ = stop_tx.send(());
    if tokio::time::timeout(Duration::from_secs(10), &mut server).await.is_err() {
        eprintln!("pgmux did not shut down within 10 s; dropping it");
    }
    println!("stopping the cluster ...");
    result
}

/// The user's `auth` is left at its default, SCRAM-SHA-256.
fn config_toml(listen: std::net::SocketAddr, primary: &Node, replica: &Node) -> String {
    format!(
        r#"
[proxy]
listen = "{listen}"
pool_mode = "transaction"

[[databases]]
name = "{DB}"
primary = "{primary}"
replicas = ["{replica}"]
pool_size = {POOL_SIZE}

[[users]]
name = "{USER}"
password = "{PASSWORD}"
"#,
        primary = primary.host_port(),
        replica = replica.host_port(),
    )
}

/// What one pgbench run reported.
struct RunSummary {
    label: &'static str,
    tps: Option<String>,
    failed: Option<String>,
    processed: Option<String>,
}

async fn workload(pgbench: &Path, port: u16, primary: &Node, replica: &Node) -> Result<(), String> {
    println!("== pgbench -i -s 1 (through pgmux)");
    run_pgbench(pgbench, port, &["-i", "-s", "1"], Duration::ZERO).await?;

    // Sample how many server connections user app holds while the clients run.
    let peaks = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let sampler = tokio::spawn(sample_backends([primary.clone(), replica.clone()], Arc::clone(&peaks)));
    let _sampler = AbortOnDrop(sampler.abort_handle());

    let mut summaries = Vec::new();
    let clients = CLIENTS.to_string();
    let secs = SECONDS_PER_RUN.to_string();
    for (label, extra) in [("select-only", Some("-S")), ("tpcb-like", None)] {
        println!();
        println!("== {label}: {CLIENTS} clients, {SECONDS_PER_RUN} s, extended protocol");
        let mut args = vec!["-c", &clients, "-j", "2", "-T", &secs, "-P", "2", "-M", "extended"];
        args.extend(extra);
        let lines = run_pgbench(pgbench, port, &args, Duration::from_secs(SECONDS_PER_RUN)).await?;
        summaries.push(summarize(label, &lines));
    }
    sampler.abort();

    println!();
    println!("== summary");
    for s in &summaries {
        let na = || "n/a".to_string();
        println!(
            "  {:<12} {:>10} tps   {} transactions, {} failed",
            s.label,
            s.tps.clone().unwrap_or_else(na),
            s.processed.clone().unwrap_or_else(na),
            s.failed.clone().unwrap_or_else(na),
        );
    }
    let (p, r) = (peaks[0].load(Ordering::Relaxed), peaks[1].load(Ordering::Relaxed));
    println!(
        "  {CLIENTS} pgbench clients -> at most {p} server connections for user {USER} on the primary, \
         {r} on the replica (pool_size = {POOL_SIZE} per server)"
    );
    if p.max(r) > POOL_SIZE as u64 {
        println!("  note: more server connections than pool_size; pooling is not in effect");
    }
    Ok(())
}

/// Runs pgbench against pgmux, echoing its output as it comes; returns the lines.
async fn run_pgbench(pgbench: &Path, port: u16, args: &[&str], duration: Duration) -> Result<Vec<String>, String> {
    let mut cmd = tokio::process::Command::new(pgbench);
    for key in crate::cluster::pg_env_keys() {
        cmd.env_remove(key);
    }
    cmd.env("PGPASSWORD", PASSWORD)
        .args(args)
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", USER, DB])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let shown = format!("pgbench {}", args.join(" "));
    let mut child = cmd.spawn().map_err(|e| format!("cannot run {}: {e}", pgbench.display()))?;
    // Both were set to piped() just above.
    let mut out = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
    let mut err = BufReader::new(child.stderr.take().expect("piped stderr")).lines();

    let mut lines = Vec::new();
    let drive = async {
        let (mut out_done, mut err_done) = (false, false);
        while !(out_done && err_done) {
            let line = tokio::select! {
                l = out.next_line(), if !out_done => l.ok().flatten().or_else(|| { out_done = true; None }),
                l = err.next_line(), if !err_done => l.ok().flatten().or_else(|| { err_done = true; None }),
            };
            if let Some(line) = line {
                println!("   | {line}");
                lines.push(line);
            }
        }
        child.wait().await
    };
    let limit = duration + PGBENCH_GRACE;
    let status = tokio::time::timeout(limit, drive)
        .await
        .map_err(|_| format!("`{shown}` did not finish within {limit:?}; is pgmux serving connections?"))?
        .map_err(|e| format!("`{shown}`: {e}"))?;
    if !status.success() {
        return Err(format!("`{shown}` failed ({status}); its output is above"));
    }
    Ok(lines)
}

fn summarize(label: &'static str, lines: &[String]) -> RunSummary {
    let after = |prefix: &str| {
        lines.iter().find_map(|l| l.trim().strip_prefix(prefix)).map(|rest| {
            // "12345", "0 (0.000%)", "1234.5 (without initial connection time)": keep the number.
            rest.split_whitespace().next().unwrap_or_default().to_string()
        })
    };
    RunSummary {
        label,
        tps: after("tps = ").map(|t| t.parse::<f64>().map_or(t, |v| format!("{v:.0}"))),
        failed: after("number of failed transactions:"),
        processed: after("number of transactions actually processed:"),
    }
}

/// Records, per node, the highest `pg_stat_activity` count for user app seen so far.
async fn sample_backends(nodes: [Node; 2], peaks: Arc<[AtomicU64; 2]>) {
    let sql = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE usename = '{USER}' AND application_name <> '{}'",
        crate::routing::monitor::MONITOR_APPLICATION_NAME
    );
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        for (node, peak) in nodes.iter().zip(peaks.iter()) {
            let (node, sql) = (node.clone(), sql.clone());
            // psql is a blocking child process.
            let count = tokio::task::spawn_blocking(move || node.psql(&sql)).await;
            if let Ok(Ok(n)) = count
                && let Ok(n) = n.parse::<u64>()
            {
                peak.fetch_max(n, Ordering::Relaxed);
            }
        }
    }
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
