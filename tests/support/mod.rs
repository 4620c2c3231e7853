//! Shared by the integration tests: one real primary + streaming replica per
//! test binary, started on first use and stopped when the process exits.
//!
//! If PostgreSQL is not installed the first test to ask for the cluster fails
//! with the install hint from `pgmux::cluster`; there is deliberately no
//! "skip when missing" switch.

// Each test binary compiles its own copy and uses only part of it.
#![allow(dead_code)]

pub mod console;
pub mod faults;
pub mod pgbouncer;
pub mod proxy;
pub mod raw;

use std::sync::{Once, OnceLock};
use std::time::Duration;

use pgmux::cluster::{Cluster, ClusterSpec, ClusterUser};

/// `(user, password)` pairs the standard cluster accepts over TCP.
pub const APP: (&str, &str) = ("app", "app_pw");
pub const MD5: (&str, &str) = ("md5user", "md5_pw");
pub const CLEAR: (&str, &str) = ("clearuser", "clear_pw");
pub const TRUST: &str = "trustuser";
/// Owned by `app`.
pub const DB: &str = "app";

/// The standard spec: primary + 1 streaming replica, `app` (scram),
/// `md5user` (md5), `clearuser` (cleartext `password`), `trustuser` (trust),
/// superuser `postgres` (trust), database `app` owned by `app`.
pub fn standard_spec() -> ClusterSpec {
    ClusterSpec::default()
        .replicas(1)
        .user(ClusterUser::scram(APP.0, APP.1))
        .user(ClusterUser::md5(MD5.0, MD5.1))
        .user(ClusterUser::cleartext(CLEAR.0, CLEAR.1))
        .user(ClusterUser::trust(TRUST))
        .database(DB, APP.0)
}

/// The error is kept so that every later test fails with the same message
/// instead of retrying a start that cannot work.
static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();

/// The shared cluster, started on first call. Blocking: from async code use [`cluster_async`].
pub fn cluster() -> &'static Cluster {
    let result = CLUSTER.get_or_init(|| {
        register_teardown();
        Cluster::start(&standard_spec()).map_err(|e| e.to_string())
    });
    match result {
        Ok(c) => c,
        Err(e) => panic!("cannot start the test PostgreSQL cluster: {e}"),
    }
}

/// [`cluster`] without blocking the async runtime's thread.
pub async fn cluster_async() -> &'static Cluster {
    match tokio::task::spawn_blocking(cluster).await {
        Ok(c) => c,
        // Re-raise the start failure's own message rather than a JoinError.
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("cluster start task failed: {e}"),
    }
}

/// Statics are never dropped, but libtest ends the process with `exit`
/// after the last test, and `exit` runs `atexit` hooks.
fn register_teardown() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        extern "C" fn teardown() {
            // Unwinding out of an extern "C" fn would abort; stopping is best effort anyway.
            let _ = std::panic::catch_unwind(|| {
                if let Some(Ok(c)) = CLUSTER.get() {
                    c.stop();
                }
            });
        }
        // SAFETY: `teardown` is a plain extern "C" fn that lives for the whole program.
        let rc = unsafe { libc::atexit(teardown) };
        assert_eq!(rc, 0, "atexit registration failed");
    });
}

/// Polls `cond` (async) every few milliseconds until it is true; panics
/// with `what` once `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Connects with tokio-postgres (no TLS) and drives the connection in the background.
pub async fn connect(
    node: &pgmux::cluster::Node,
    user: &str,
    password: Option<&str>,
    db: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut config: tokio_postgres::Config = node.connection_string(user, db).parse()?;
    if let Some(p) = password {
        config.password(p);
    }
    config.connect_timeout(Duration::from_secs(10));
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        // Ends when the client is dropped or the server goes away; the test sees errors on the client.
        let _ = connection.await;
    });
    Ok(client)
}

/// The SQLSTATE of a database error, or a text saying there was none.
pub fn code(e: &tokio_postgres::Error) -> String {
    e.as_db_error().map(|d| d.code().code().to_owned()).unwrap_or_else(|| format!("no SQLSTATE: {e}"))
}

/// The first column of the first row `sql` returns (simple protocol).
pub async fn scalar(c: &tokio_postgres::Client, sql: &str) -> String {
    let msgs = c.simple_query(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    msgs.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("NULL").to_owned()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{sql}: no row"))
}

/// The trust superuser straight to the shared cluster's primary, on `db`.
pub async fn superuser(db: &str) -> tokio_postgres::Client {
    connect(cluster_async().await.primary(), "postgres", None, db).await.expect("direct superuser connection")
}

/// This process's resident memory (pgmux runs in-process), in bytes.
pub fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kb * 1024
}
