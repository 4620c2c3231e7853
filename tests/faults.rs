//! Servers that fail: stop answering, restart, crash, or get a client that
//! will not read. The worst any of these may do is fail the transactions on
//! the failed server; every other client keeps working, no pool slot is lost,
//! and nothing acknowledged as committed is missing afterwards.
//!
//! Destructive faults (restart, kill -9, SIGSTOP) run on a private primary
//! per test so they cannot reach the other tests of this binary.

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use pgmux::cluster::Cluster;
use postgres_protocol::message::frontend;
use support::faults::freezing_relay;
use support::proxy::{Proxy, standard_config};
use support::raw::{Raw, tags};
use support::{DB, TRUST, eventually, rss};

/// Held by every test here: they measure this process's memory and latency,
/// which a storm of 2,000 logins in a neighbouring test would distort.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A primary of its own (no replica), for faults that take it down.
async fn private_primary() -> Cluster {
    tokio::task::spawn_blocking(|| Cluster::start(&support::standard_spec().replicas(0)))
        .await
        .unwrap()
        .expect("private primary")
}

/// `n` clients hold a transaction open at once: every slot of a pool of `n`
/// is there to be had (none was lost to the fault before).
async fn all_slots_usable(proxy: &Proxy, n: usize) {
    let mut held = Vec::new();
    for i in 0..n {
        let mut c = Raw::login(proxy.addr, TRUST, DB).await;
        let msgs = c.simple_query("BEGIN; SELECT 1").await;
        assert_eq!(tags(&msgs), "CTDCZ", "client {i} of {n} could not get a slot: {msgs:?}");
        held.push(c);
    }
}

/// The pid of the backend running the query containing `marker`.
async fn backend_running(cluster: &Cluster, marker: &str) -> i32 {
    let su = support::connect(cluster.primary(), "postgres", None, "postgres").await.unwrap();
    let sql = format!(
        "SELECT pid FROM pg_stat_activity WHERE query LIKE '%{marker}%' AND pid <> pg_backend_pid() AND state = 'active'"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rows = su.simple_query(&sql).await.unwrap();
        if let Some(pid) = rows.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(|p| p.parse().unwrap()),
            _ => None,
        }) {
            return pid;
        }
        assert!(Instant::now() < deadline, "the query marked {marker} did not start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Logs a client in, starts `sql` (which names `marker` in a comment) and
/// sends `signal` to the backend running it: the client and that pid.
async fn signal_backend_of(proxy: &Proxy, cluster: &Cluster, sql: &str, marker: &str, signal: i32) -> (Raw, i32) {
    let mut victim = Raw::login(proxy.addr, TRUST, DB).await;
    let mut out = BytesMut::new();
    frontend::query(sql, &mut out).unwrap();
    victim.send(&out).await;
    let pid = backend_running(cluster, marker).await;
    // SAFETY: kill(2) on a pid just read from pg_stat_activity; no memory involved.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    (victim, pid)
}

/// A read in flight on a replica that stops answering (hung, not refused)
/// is re-run on the primary once the monitor marks the replica lost (a
/// sample times out after 1 s, then a new connection's login after 2 s),
/// instead of waiting on it for as long as the replica stays hung.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_on_a_hung_replica_is_rerun_on_the_primary() {
    let _serial = SERIAL.lock().await;
    let cluster = support::cluster_async().await;
    let frozen = Arc::new(AtomicBool::new(false));
    let relay = freezing_relay(cluster.replicas()[0].addr(), frozen.clone()).await;
    let primary = format!("primary = \"{}\"", cluster.primary().host_port());
    let toml = standard_config(cluster, 2, "").replacen(&primary, &format!("{primary}\nreplicas = [\"{relay}\"]"), 1);
    let proxy = Proxy::start(&toml).await;
    let mut client = Raw::login(proxy.addr, TRUST, DB).await;
    let on_replica = "/* pgmux:replica */ SELECT pg_is_in_recovery()";
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let msgs = client.simple_query(on_replica).await;
        if tags(&msgs) == "TDCZ" && msgs[1].body.ends_with(b"t") {
            break;
        }
        assert!(Instant::now() < deadline, "the replica did not enter rotation");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    frozen.store(true, Ordering::SeqCst);
    let started = Instant::now();
    let msgs = tokio::time::timeout(Duration::from_secs(10), client.simple_query(on_replica))
        .await
        .expect("a read on a hung replica still waits after 10 s");
    let took = started.elapsed();
    eprintln!("a read on a hung replica was answered after {took:?}");
    assert_eq!(tags(&msgs), "TDCZ", "{msgs:?}");
    assert!(msgs[1].body.ends_with(b"f"), "answered by the primary");
    assert!(took < Duration::from_secs(5), "{took:?}");
    // Later reads go to the primary at once while the replica is down.
    let started = Instant::now();
    assert_eq!(tags(&client.simple_query("SELECT 1").await), "TDCZ");
    assert!(started.elapsed() < Duration::from_secs(1));
    frozen.store(false, Ordering::SeqCst);
}

/// The primary restarts (fast shutdown) under write load. Transactions in
/// flight may fail; every one acknowledged as committed is in the table
/// afterwards, every client gets going again, and no slot is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_restart_under_load_loses_no_acknowledged_commit() {
    let _serial = SERIAL.lock().await;
    let cluster = private_primary().await;
    cluster.primary().psql_db(DB, "CREATE TABLE acked (worker int, n int); GRANT ALL ON acked TO trustuser").unwrap();
    let proxy = Proxy::start(&standard_config(&cluster, 4, "query_wait_timeout = \"20s\"")).await;
    let stop = Arc::new(AtomicBool::new(false));
    let after_restart = Arc::new(AtomicU64::new(0));
    let restarted = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..8 {
        let (addr, stop, after_restart, restarted) =
            (proxy.addr, stop.clone(), after_restart.clone(), restarted.clone());
        workers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut errors = 0;
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                let Some(mut c) = Raw::try_login(addr, TRUST, DB).await else {
                    errors += 1;
                    continue;
                };
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    let sql = format!("BEGIN; INSERT INTO acked VALUES ({w}, {n}); COMMIT");
                    let mut out = BytesMut::new();
                    frontend::query(&sql, &mut out).unwrap();
                    c.send(&out).await;
                    match c.until_ready_or_closed().await {
                        Some(msgs) if tags(&msgs) == "CCCZ" => {
                            acked.push(n);
                            if restarted.load(Ordering::SeqCst) {
                                after_restart.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        Some(_) => errors += 1,
                        None => {
                            errors += 1;
                            break;
                        }
                    }
                }
            }
            (w, acked, errors)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::task::block_in_place(|| cluster.primary().restart()).expect("restart");
    restarted.store(true, Ordering::SeqCst);
    let back = Instant::now();
    let mut probe = Raw::login(proxy.addr, TRUST, DB).await;
    while tags(&probe.simple_query("SELECT 1").await) != "TDCZ" {
        assert!(back.elapsed() < Duration::from_secs(10), "no success 10 s after the restart");
    }
    eprintln!("primary restart: first success {:?} after Postgres accepted connections again", back.elapsed());
    eventually(Duration::from_secs(20), "commits after the restart", || async {
        after_restart.load(Ordering::SeqCst) >= 200
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let mut acked_total = 0;
    let mut errors_total = 0;
    let su = support::connect(cluster.primary(), "postgres", None, DB).await.unwrap();
    let rows: HashSet<(i32, i32)> =
        su.query("SELECT worker, n FROM acked", &[]).await.unwrap().iter().map(|r| (r.get(0), r.get(1))).collect();
    for w in workers {
        let (w, acked, errors) = w.await.unwrap();
        acked_total += acked.len();
        errors_total += errors;
        for n in acked {
            assert!(rows.contains(&(w, n)), "worker {w}'s commit {n} was acknowledged but is not in the table");
        }
    }
    eprintln!("primary restart: {acked_total} commits acknowledged, all present; {errors_total} failed transactions");
    all_slots_usable(&proxy, 4).await;
}

/// A backend killed with SIGKILL makes Postgres restart every backend: each
/// client mid-transaction gets an error, later transactions work, and the
/// pool gets all its slots back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_killed_with_sigkill_costs_only_the_transactions_in_flight() {
    let _serial = SERIAL.lock().await;
    let cluster = private_primary().await;
    let proxy = Proxy::start(&standard_config(&cluster, 3, "")).await;
    let sql = "SELECT pg_sleep(30) /* sigkill-victim */";
    let (mut victim, _) = signal_backend_of(&proxy, &cluster, sql, "sigkill-victim", libc::SIGKILL).await;
    // The victim is told, and keeps its connection (README "Failover").
    let msgs = tokio::time::timeout(Duration::from_secs(10), victim.until_ready_or_closed())
        .await
        .expect("victim answered")
        .expect("the victim keeps its connection");
    let err = msgs.iter().find(|m| m.tag == b'E').expect("the victim is told").error();
    eprintln!("SIGKILLed backend: the client got {} {}", err.code, err.message);
    assert!(["08006", "57P01", "57P02", "57P03"].contains(&err.code.as_str()), "{err:?}");
    assert_eq!(err.severity, "ERROR", "{err:?}");
    // Postgres is in crash recovery for a moment; new clients wait or retry.
    eventually(Duration::from_secs(20), "the server back after crash recovery", || async {
        let Some(mut c) = Raw::try_login(proxy.addr, TRUST, DB).await else { return false };
        // While Postgres recovers, a new server connection's login fails
        // (57P03) and the client is closed, as PgBouncer closes it.
        let mut out = BytesMut::new();
        frontend::query("SELECT 1", &mut out).unwrap();
        c.send(&out).await;
        c.until_ready_or_closed().await.is_some_and(|m| tags(&m) == "TDCZ")
    })
    .await;
    // Its next transaction runs on a new server connection.
    let mut out = BytesMut::new();
    frontend::query("SELECT 1", &mut out).unwrap();
    victim.send(&out).await;
    let after = victim.until_ready_or_closed().await.expect("the victim's connection is usable");
    assert_eq!(tags(&after), "TDCZ");
    all_slots_usable(&proxy, 3).await;
}

/// A backend stopped with SIGSTOP (a hung server): `query_timeout` answers
/// its client with 57014 and closes that backend; the pool replaces it and
/// the other clients never notice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_backend_is_bounded_by_query_timeout() {
    let _serial = SERIAL.lock().await;
    let cluster = private_primary().await;
    let proxy = Proxy::start(&standard_config(&cluster, 2, "query_timeout = \"1s\"")).await;
    // Stopped mid-query: the backend is past parsing, inside pg_sleep.
    let sql = "SELECT pg_sleep(0.5) /* sigstop-victim */";
    let (mut victim, pid) = signal_backend_of(&proxy, &cluster, sql, "sigstop-victim", libc::SIGSTOP).await;
    let started = Instant::now();
    let msgs = tokio::time::timeout(Duration::from_secs(10), victim.until_closed()).await.expect("victim answered");
    let err = msgs.last().expect("an answer").error();
    assert_eq!(err.code, "57014", "{err:?}");
    eprintln!("SIGSTOPped backend: 57014 after {:?}", started.elapsed());
    let mut other = Raw::login(proxy.addr, TRUST, DB).await;
    for _ in 0..20 {
        assert_eq!(tags(&other.simple_query("SELECT 1").await), "TDCZ");
    }
    all_slots_usable(&proxy, 2).await;
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
}

/// A client that asks for a large result and does not read it makes pgmux
/// hold a bounded amount (the server is paused by TCP back-pressure), and
/// when it leaves, its backend comes back clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_holds_bounded_memory() {
    let _serial = SERIAL.lock().await;
    let cluster = support::cluster_async().await;
    let proxy = Proxy::start(&standard_config(cluster, 1, "")).await;
    let mut slow = Raw::login(proxy.addr, TRUST, DB).await;
    let before = rss();
    let mut out = BytesMut::new();
    // About 400 MiB of rows.
    frontend::query("SELECT repeat('x', 1000) FROM generate_series(1, 400000)", &mut out).unwrap();
    slow.send(&out).await;
    let mut peak = 0;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(rss().saturating_sub(before));
    }
    eprintln!("a client not reading a 400 MiB result: pgmux grew by {} KiB", peak / 1024);
    assert!(peak < 32 * 1024 * 1024, "grew by {} MiB", peak / (1024 * 1024));
    drop(slow);
    // The pool of one is usable again, by a client that did nothing wrong.
    let started = Instant::now();
    let mut next = Raw::login(proxy.addr, TRUST, DB).await;
    assert_eq!(tags(&next.simple_query("SELECT 1").await), "TDCZ");
    eprintln!("the next client got the backend after {:?}", started.elapsed());
}

/// 2,000 clients log in at once (SCRAM, the expensive kind) while a canary
/// runs queries on a connection it already has: the canary stays fast and
/// every login succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_storm_does_not_stall_a_connected_client() {
    let _serial = SERIAL.lock().await;
    let cluster = support::cluster_async().await;
    let proxy = Proxy::start(&standard_config(cluster, 4, "max_client_conn = 5000")).await;
    let mut canary = Raw::login(proxy.addr, TRUST, DB).await;
    let storm_done = Arc::new(AtomicBool::new(false));
    let storm = {
        let (addr, done) = (proxy.addr, storm_done.clone());
        tokio::spawn(async move {
            let mut logins = tokio::task::JoinSet::new();
            for _ in 0..2000 {
                logins.spawn(async move {
                    let url = format!("postgres://{}:{}@{addr}/{DB}", support::APP.0, support::APP.1);
                    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
                    tokio::spawn(conn);
                    c.simple_query("SELECT 1").await.map(drop)
                });
            }
            let mut failed = Vec::new();
            while let Some(r) = logins.join_next().await {
                if let Err(e) = r.unwrap() {
                    failed.push(e.to_string());
                }
            }
            done.store(true, Ordering::SeqCst);
            failed
        })
    };
    let mut lat = Vec::new();
    while !storm_done.load(Ordering::SeqCst) {
        let t = Instant::now();
        assert_eq!(tags(&canary.simple_query("SELECT 1").await), "TDCZ");
        lat.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let failed = storm.await.unwrap();
    lat.sort();
    let p = |q: f64| lat[((lat.len() - 1) as f64 * q) as usize];
    eprintln!("login storm of 2000: canary {} queries, p50 {:?} p99 {:?} max {:?}", lat.len(), p(0.5), p(0.99), p(1.0));
    assert!(failed.is_empty(), "{} logins failed, first: {}", failed.len(), failed[0]);
    assert!(p(0.99) < Duration::from_millis(500), "canary p99 {:?}", p(0.99));
}

/// Server connections carry TCP keepalives as configured (a dead server
/// host or a dropped network is found by the kernel, not after hours), as
/// the kernel reports them for the real socket; off means none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_connections_carry_the_configured_keepalive() {
    let _serial = SERIAL.lock().await;
    let cluster = support::cluster_async().await;
    for (extra, want) in [
        ("server_tcp_keepalive_idle = \"75s\"\nserver_tcp_keepalive_interval = \"2s\"", Some(75)),
        ("server_tcp_keepalive = false", None),
    ] {
        let proxy = Proxy::start(&standard_config(cluster, 1, extra)).await;
        let mut c = Raw::login(proxy.addr, TRUST, DB).await;
        let msgs = c.simple_query("SELECT client_port FROM pg_stat_activity WHERE pid = pg_backend_pid()").await;
        assert_eq!(tags(&msgs), "TDCZ");
        let body = &msgs[1].body;
        let port = String::from_utf8_lossy(&body[6..]).into_owned();
        let server = cluster.primary().port();
        let out = std::process::Command::new("ss")
            // The server's port too: the same local port may be another
            // connection's, to another server, on a shared machine.
            .args(["-tnoH", "state", "established", &format!("( sport = :{port} and dport = :{server} )")])
            .output()
            .expect("ss (iproute2)");
        let line = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(line.contains(&format!(":{port}")), "no socket on port {port}: {line:?}");
        eprintln!("{extra}: {}", line.trim());
        match want {
            Some(idle) => {
                // timer:(keepalive,1min14sec,0): the first probe within `idle`.
                let timer = line.split("timer:(keepalive,").nth(1).unwrap_or_else(|| panic!("no keepalive: {line}"));
                let (min, rest) = timer.split_once("min").unwrap_or_else(|| panic!("{line}"));
                let sec = rest.split("sec").next().unwrap();
                let secs: u64 = min.parse::<u64>().unwrap() * 60 + sec.parse::<u64>().unwrap();
                assert!(secs <= idle && secs + 5 > idle, "{line}");
            }
            None => assert!(!line.contains("keepalive"), "{line}"),
        }
    }
}

/// Every process of a server (postmaster and backends) stopped with
/// SIGSTOP, as a hung host: a request already on it ends at
/// `query_timeout` (57014), a new one waits at most `server_connect_timeout`
/// for a connection that cannot log in, and nothing hangs; after SIGCONT,
/// transactions succeed again and every slot is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_server_costs_bounded_waits_and_recovers_after_sigcont() {
    let _serial = SERIAL.lock().await;
    let cluster = private_primary().await;
    let extra = "query_timeout = \"1s\"\nquery_wait_timeout = \"2s\"\nserver_connect_timeout = \"1s\"";
    let proxy = Proxy::start(&standard_config(&cluster, 2, extra)).await;
    let mut busy = Raw::login(proxy.addr, TRUST, DB).await;
    assert_eq!(tags(&busy.simple_query("SELECT 1").await), "TDCZ");
    let mut fresh = Raw::login(proxy.addr, TRUST, DB).await;

    let postmaster: i32 = std::fs::read_to_string(cluster.primary().data_dir().join("postmaster.pid"))
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let children = std::process::Command::new("pgrep").args(["-P", &postmaster.to_string()]).output().unwrap();
    let mut pids: Vec<i32> = String::from_utf8_lossy(&children.stdout).lines().map(|l| l.parse().unwrap()).collect();
    pids.push(postmaster);
    let signal_all = |sig| {
        for &pid in &pids {
            // SAFETY: kill(2) on pids of the private server's processes.
            unsafe { libc::kill(pid, sig) };
        }
    };
    signal_all(libc::SIGSTOP);

    // The request on a backend: bounded by query_timeout.
    let mut out = BytesMut::new();
    frontend::query("SELECT 2", &mut out).unwrap();
    let started = Instant::now();
    busy.send(&out).await;
    let msgs = tokio::time::timeout(Duration::from_secs(10), busy.until_closed()).await.expect("busy answered");
    assert_eq!(msgs.last().expect("an answer").error().code, "57014");
    eprintln!("hung server: the request on a backend got 57014 after {:?}", started.elapsed());
    // A request needing a new server connection: its login cannot finish.
    let started = Instant::now();
    fresh.send(&out).await;
    let msgs = tokio::time::timeout(Duration::from_secs(10), fresh.until_ready_or_closed())
        .await
        .expect("a request waiting on a hung server hangs");
    let took = started.elapsed();
    let err = msgs.as_deref().and_then(|m| m.iter().find(|m| m.tag == b'E')).map(|m| m.error());
    eprintln!("hung server: a request needing a new connection got {err:?} after {took:?}");
    assert!(err.is_some() && took < Duration::from_secs(5), "{msgs:?} after {took:?}");

    signal_all(libc::SIGCONT);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(15);
    loop {
        let mut c = Raw::login(proxy.addr, TRUST, DB).await;
        if tags(&c.simple_query("SELECT 3").await) == "TDCZ" {
            break;
        }
        assert!(Instant::now() < deadline, "no recovery 15 s after SIGCONT");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("hung server: first success {:?} after SIGCONT", started.elapsed());
    all_slots_usable(&proxy, 2).await;
}

/// Whether a query containing `marker` still runs on the shared primary.
async fn still_running(marker: &str) -> bool {
    let su = support::superuser(DB).await;
    let sql = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%{marker}%' AND pid <> pg_backend_pid() \
         AND state = 'active'"
    );
    support::scalar(&su, &sql).await != "0"
}

/// A shutdown never leaves a query running on Postgres: not one a client
/// left just before the shutdown (its cleanup finishes first), nor one still
/// running at `shutdown_timeout` (cancelled, not just disconnected, which
/// Postgres notices only when it next writes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_leaves_no_query_running() {
    let _serial = SERIAL.lock().await;
    let cluster = support::cluster_async().await;
    for (case, leave_first) in [("at-shutdown-timeout", false), ("left-before-shutdown", true)] {
        let marker = format!("shutdown-{case}");
        let mut proxy = Proxy::start(&standard_config(cluster, 2, "shutdown_timeout = \"300ms\"")).await;
        let mut client = Raw::login(proxy.addr, TRUST, DB).await;
        let mut out = BytesMut::new();
        frontend::query(&format!("SELECT pg_sleep(60) /* {marker} */"), &mut out).unwrap();
        client.send(&out).await;
        eventually(Duration::from_secs(10), "the query to start", || still_running(&marker)).await;
        if leave_first {
            drop(client);
            proxy.begin_shutdown();
            proxy.wait_stopped().await;
        } else {
            proxy.begin_shutdown();
            let msgs = tokio::time::timeout(Duration::from_secs(10), client.until_closed()).await.unwrap();
            assert_eq!(msgs.last().expect("told").error().code, "57P01");
            proxy.wait_stopped().await;
        }
        // Postgres acts on a cancel at once; give it a moment, not the query's minute.
        let deadline = Instant::now() + Duration::from_secs(2);
        while still_running(&marker).await {
            assert!(Instant::now() < deadline, "{case}: the query still runs after pgmux stopped");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
