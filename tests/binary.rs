//! The `pgmux` binary as ops run it: a config file, the runtime `[proxy]
//! workers` asks for, traffic from several clients, SIGTERM once they left.
//! (Every other test runs the proxy inside the test process;
//! tests/scale_out.rs runs several binaries on one port.)

mod support;

use std::time::Duration;

use support::proxy::standard_config;
use support::{DB, TRUST, eventually, scalar};

fn thread_count(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status.lines().find_map(|l| l.strip_prefix("Threads:")).and_then(|n| n.trim().parse().ok()).expect("Threads line")
}

/// Runs the binary with `workers`, drives 8 clients × 25 transactions
/// through a pool of 2, checks the result and the clean SIGTERM exit.
/// Returns the process's thread count while it served.
async fn serve_with_workers(workers: usize) -> usize {
    let cluster = support::cluster_async().await;
    let table = format!("binary_workers_{workers}");
    let su = support::superuser(DB).await;
    su.batch_execute(&format!(
        "DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (id int PRIMARY KEY, n int NOT NULL); \
         INSERT INTO {table} SELECT g, 0 FROM generate_series(0, 7) g; GRANT ALL ON {table} TO {TRUST}"
    ))
    .await
    .unwrap();

    let port = pgmux::cluster::pick_port().expect("a free loopback port");
    let config = standard_config(cluster, 2, &format!("workers = {workers}"))
        .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"))
        + "\n[admin]\nusers = [\"postgres\"]\n";
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, config).unwrap();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgmux"))
        .arg("--config")
        .arg(&path)
        .args(["--log-level", "info"])
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start pgmux");
    let pid = child.id().expect("pid");

    let url = |user: &str, password: &str, db: &str| {
        format!("host=127.0.0.1 port={port} user={user} password='{password}' dbname={db} connect_timeout=5")
    };
    let connect = |user: &'static str, password: &'static str, db: &'static str| {
        let url = url(user, password, db);
        async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            Ok::<_, tokio_postgres::Error>(client)
        }
    };
    // A trust user: SCRAM logins would start a blocking-pool thread for the
    // key derivation, and the thread count is the point here.
    eventually(Duration::from_secs(10), "pgmux accepting", || async { connect(TRUST, "", DB).await.is_ok() }).await;

    let mut clients = Vec::new();
    for id in 0..8 {
        let client = connect(TRUST, "", DB).await.expect("client");
        let table = table.clone();
        clients.push(tokio::spawn(async move {
            for _ in 0..25 {
                client
                    .batch_execute(&format!("BEGIN; UPDATE {table} SET n = n + 1 WHERE id = {id}; COMMIT"))
                    .await
                    .expect("transaction through pgmux");
            }
        }));
    }
    for c in clients {
        c.await.unwrap();
    }
    let threads = thread_count(pid);
    assert_eq!(scalar(&su, &format!("SELECT sum(n) FROM {table}")).await, "200");

    let admin = connect("postgres", "", "pgmux").await.expect("admin console");
    let rows = admin.simple_query("SHOW CONFIG").await.unwrap_or_else(|e| panic!("SHOW CONFIG: {e:?}"));
    let shown = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("proxy.workers") => r.get(1).map(str::to_owned),
        _ => None,
    });
    assert_eq!(shown.as_deref(), Some(workers.to_string().as_str()));

    // SIGTERM waits for the connected clients to leave (within
    // shutdown_timeout, 30 s here, longer than the exit is given below):
    // the last one leaves, and pgmux exits on its own.
    drop(admin);
    // SAFETY: signalling our own child by its pid.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output()).await.expect("exits").unwrap();
    assert!(out.status.success(), "pgmux exited with {}", out.status);
    // stderr is a pipe here, not a terminal: plain text, no colour codes.
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("client logged in"), "the log reached stderr: {log}");
    assert!(!log.contains('\u{1b}'), "ANSI escape codes in a non-terminal log: {log}");
    threads
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_worker_serves_everything_on_one_thread() {
    assert_eq!(serve_with_workers(1).await, 1, "workers = 1 is a current-thread runtime");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_workers_run_a_thread_each() {
    // The main thread blocks in the runtime; three workers serve.
    assert!(serve_with_workers(3).await >= 4);
}
