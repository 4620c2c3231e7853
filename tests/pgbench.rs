//! pgbench through pgmux: 200 clients over 10 backends, zero failed transactions,
//! in extended and prepared modes.

mod support;

use std::process::Command;

use support::proxy::Proxy;
use support::{APP, DB};

fn pgbench(port: u16, args: &[&str]) -> String {
    let out = Command::new("pgbench")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", APP.0])
        .args(args)
        .arg(DB)
        .env("PGPASSWORD", APP.1)
        .output()
        .expect("pgbench is installed (apt-get install postgresql-contrib or postgresql-client)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "pgbench {args:?} failed:\n{text}");
    text
}

fn processed(report: &str) -> u64 {
    report
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|v| v.split(['/', ' ']).next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no transaction count in:\n{report}"))
}

fn failed(report: &str) -> u64 {
    report
        .lines()
        .find_map(|l| l.strip_prefix("number of failed transactions: "))
        .and_then(|v| v.split(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no failure count in:\n{report}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_200_clients_over_10_backends_extended_and_prepared() {
    let cluster = support::cluster_async().await;
    let proxy = Proxy::standard(cluster, 10, "query_wait_timeout = \"60s\"").await;
    let port = proxy.port();
    tokio::task::spawn_blocking(move || {
        pgbench(port, &["-i", "-s", "1", "-q"]);
        for script in [&["-S"][..], &[][..]] {
            let mut args = vec!["-c", "200", "-j", "2", "-T", "10", "-M", "extended"];
            args.extend_from_slice(script);
            let report = pgbench(port, &args);
            assert_eq!(failed(&report), 0, "{report}");
            assert!(processed(&report) > 200, "{report}");
        }
        // Named prepared statements across transactions and backends. The
        // tpcb-like script is the hard case: pgbench prepares synchronously
        // (PQprepare) while the same thread's other clients hold every
        // backend in open transactions; pgmux answers prepares of known
        // statements without a backend, so this must not stall.
        for script in [&["-S"][..], &[][..]] {
            let mut args = vec!["-c", "200", "-j", "2", "-T", "10", "-M", "prepared"];
            args.extend_from_slice(script);
            let report = pgbench(port, &args);
            assert_eq!(failed(&report), 0, "{report}");
            assert!(processed(&report) > 200, "{report}");
        }
    })
    .await
    .unwrap();
}
