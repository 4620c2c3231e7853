//! The io_uring data path (`[proxy] io = "uring"`): what is particular to
//! it. (The rest of the suite runs on it too: `PGMUX_TEST_IO=uring`, as
//! `.ci/run` does for the protocol-heavy test binaries.)
//!
//! - Pooled clients and their server connections move onto the ring once
//!   logged in, large answers and requests cross it intact in both
//!   directions, and a client's socket is closed when it leaves.
//! - Where io_uring is refused (here: a seccomp filter like Docker's default
//!   profile, on the binary), pgmux says so and serves on epoll.
//! - The runtime thread waits in the ring instead of in `epoll_wait`, and
//!   still meets tokio's timers and its other descriptors there (new
//!   clients); `PGMUX_IO_URING_PARK=off` keeps the eventfd.

mod support;

use std::process::Stdio;
use std::time::Duration;

use support::proxy::{Proxy, standard_config};
use support::{APP, DB, TRUST, eventually};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// `pgmux_io_uring_sockets` from `/metrics`.
async fn uring_sockets(proxy: &Proxy) -> u64 {
    let mut s = tokio::net::TcpStream::connect(proxy.metrics.expect("metrics enabled")).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: pgmux\r\n\r\n").await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut response)).await.expect("scraped").unwrap();
    let line = response.lines().find(|l| l.starts_with("pgmux_io_uring_sockets ")).expect("the gauge is exported");
    line.rsplit(' ').next().unwrap().parse::<f64>().unwrap() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_traffic_crosses_the_ring_intact_and_sockets_close_with_their_clients() {
    let cluster = support::cluster_async().await;
    let su = support::superuser(DB).await;
    su.batch_execute(&format!(
        "DROP TABLE IF EXISTS uring_rows; CREATE TABLE uring_rows (id int PRIMARY KEY, n int NOT NULL, blob text); \
         INSERT INTO uring_rows SELECT g, 0 FROM generate_series(0, 7) g; GRANT ALL ON uring_rows TO {}",
        APP.0
    ))
    .await
    .unwrap();
    let proxy = Proxy::start_with_metrics(&standard_config(cluster, 2, "io = \"uring\"")).await;

    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(proxy.connect(APP.0, Some(APP.1), DB).await.expect("client through pgmux"));
    }
    // 8 clients and at least the one server connection their logins did not need yet.
    let on_ring = uring_sockets(&proxy).await;
    assert!(on_ring >= 8, "every logged-in client is on the ring: {on_ring} sockets");

    let mut tasks = Vec::new();
    for (id, client) in clients.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            for i in 0..50 {
                // Simple protocol, a transaction of three statements.
                client
                    .batch_execute(&format!("BEGIN; UPDATE uring_rows SET n = n + 1 WHERE id = {id}; COMMIT"))
                    .await
                    .expect("transaction");
                // Extended protocol with parameters.
                let row =
                    client.query_one("SELECT $1::int + n FROM uring_rows WHERE id = $2", &[&i, &(id as i32)]).await;
                assert_eq!(row.expect("extended query").get::<_, i32>(0), i + i + 1);
            }
            client
        }));
    }
    let mut clients = Vec::new();
    for t in tasks {
        clients.push(t.await.unwrap());
    }
    let on_ring = uring_sockets(&proxy).await;
    assert!(on_ring >= 9, "clients and the server connections they used: {on_ring} sockets");

    // Answers far bigger than a provided buffer and than the write-behind
    // limit (the client reads them while pgmux writes), and a request as
    // large the other way.
    let c = &clients[0];
    let big: String = c.query_one("SELECT repeat('abcdefgh', 1000000)", &[]).await.unwrap().get(0);
    assert_eq!(big.len(), 8_000_000);
    assert!(big.as_bytes().chunks(8).all(|w| w == b"abcdefgh"), "the answer arrived in order");
    let blob = "0123456789".repeat(300_000);
    c.execute("UPDATE uring_rows SET blob = $1 WHERE id = 0", &[&blob]).await.unwrap();
    let back: i32 = su.query_one("SELECT length(blob) FROM uring_rows WHERE id = 0", &[]).await.unwrap().get(0);
    assert_eq!(back, 3_000_000);
    let md5: String = c.query_one("SELECT md5(blob) FROM uring_rows WHERE id = 0", &[]).await.unwrap().get(0);
    let direct: String = su.query_one("SELECT md5($1)", &[&blob]).await.unwrap().get(0);
    assert_eq!(md5, direct, "the request crossed the ring byte for byte");

    let sum: i64 = su.query_one("SELECT sum(n)::bigint FROM uring_rows", &[]).await.unwrap().get(0);
    assert_eq!(sum, 8 * 50);

    // Clients leave: their sockets close (the pool keeps its two at most).
    drop(clients);
    eventually(Duration::from_secs(10), "the clients' sockets closed", || async { uring_sockets(&proxy).await <= 2 })
        .await;
    proxy.shutdown().await;
}

/// A client that sends without reading meets backpressure, as over epoll:
/// its multishot receive is paused once a bounded inbox is full, so pgmux
/// never buffers what the client sends faster than the server takes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_without_reading_is_held_back() {
    let cluster = support::cluster_async().await;
    let proxy = Proxy::start_with_metrics(&standard_config(cluster, 2, "io = \"uring\"")).await;
    let mut raw = support::raw::Raw::login(([127, 0, 0, 1], proxy.port()).into(), TRUST, DB).await;
    // `SELECT 1` after `SELECT 1`, never reading: the answers fill the
    // client's socket, the server blocks writing them, pgmux stops reading
    // it, and then the client's writes must block in turn. What the kernel
    // takes meanwhile is its socket buffers (a few MiB on loopback) and
    // pgmux's bounded ones, not the 256 MiB offered.
    let query = b"Q\0\0\0\x0dSELECT 1\0";
    let chunk: Vec<u8> = query.iter().copied().cycle().take(query.len() * 4096).collect();
    let mut accepted = 0usize;
    while accepted < 256 << 20 {
        match tokio::time::timeout(Duration::from_secs(1), raw.stream.write(&chunk)).await {
            Ok(Ok(n)) => accepted += n,
            Ok(Err(e)) => panic!("pgmux closed the flooding client instead of holding it back: {e}"),
            Err(_) => break,
        }
    }
    assert!(
        accepted < 32 << 20,
        "{} MiB went in without a byte read back: nothing held the client back",
        accepted >> 20
    );
    drop(raw);
    // The others are served meanwhile and after.
    let c = proxy.connect(TRUST, None, DB).await.expect("another client");
    assert_eq!(c.query_one("SELECT 7", &[]).await.unwrap().get::<_, i32>(0), 7);
    proxy.shutdown().await;
}

/// A seccomp filter that makes the io_uring system calls fail with EPERM,
/// as Docker's default profile does (their numbers are the same on every
/// architecture).
fn refuse_io_uring() -> std::io::Result<()> {
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    let stmt = |code, k| libc::sock_filter { code, jt: 0, jf: 0, k };
    let jeq = |k, jt| libc::sock_filter { code: JEQ_K, jt, jf: 0, k };
    let filter = [
        stmt(LD_W_ABS, 0), // the system call's number
        jeq(425, 3),       // io_uring_setup
        jeq(426, 2),       // io_uring_enter
        jeq(427, 1),       // io_uring_register
        stmt(RET_K, libc::SECCOMP_RET_ALLOW),
        stmt(RET_K, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32),
    ];
    let prog = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_ptr() as *mut _ };
    // SAFETY: plain prctl calls in the child between fork and exec; `prog` outlives them.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &prog as *const libc::sock_fprog) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Starts the binary with `io = "uring"` (under the filter when `refused`),
/// returns the "data path" log line, and checks a query through it.
async fn binary_data_path(refused: bool) -> String {
    binary_data_path_with(refused, None).await
}

async fn binary_data_path_with(refused: bool, park: Option<&str>) -> String {
    let cluster = support::cluster_async().await;
    let port = pgmux::cluster::pick_port().expect("a free loopback port");
    let config = standard_config(cluster, 2, "io = \"uring\"").replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, config).unwrap();
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgmux"));
    command.arg("--config").arg(&path).args(["--log-level", "info"]).stderr(Stdio::piped()).kill_on_drop(true);
    if let Some(park) = park {
        command.env("PGMUX_IO_URING_PARK", park);
    }
    if refused {
        // SAFETY: the hook only calls prctl, which is async-signal-safe.
        unsafe { command.pre_exec(refuse_io_uring) };
    }
    let mut child = command.spawn().expect("start pgmux");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("data path") {
                return line;
            }
        }
        panic!("pgmux exited without naming its data path");
    })
    .await
    .expect("the data path is logged at start");
    let url = format!("host=127.0.0.1 port={port} user={TRUST} dbname={DB} connect_timeout=5");
    eventually(Duration::from_secs(10), "pgmux accepting", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
    })
    .await;
    let (client, conn) =
        tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("connect through the binary");
    tokio::spawn(conn);
    let answer: i32 = client.query_one("SELECT 40 + 2", &[]).await.expect("a query through the binary").get(0);
    assert_eq!(answer, 42);
    child.kill().await.unwrap();
    line
}

#[tokio::test]
async fn the_binary_says_it_runs_on_io_uring() {
    let line = binary_data_path(false).await;
    assert!(line.contains("data path: io_uring") && line.contains("waits in the ring"), "{line}");
}

#[tokio::test]
async fn the_binary_keeps_the_eventfd_when_told_not_to_wait_in_the_ring() {
    let line = binary_data_path_with(false, Some("off")).await;
    assert!(line.contains("data path: io_uring") && line.contains("eventfd"), "{line}");
}

/// A thread waiting in its ring still meets tokio's timers (the wait's
/// timeout is tokio's next deadline) and tokio's own descriptors (a new
/// client's connection, accepted by tokio while the ring waits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timers_and_new_clients_are_met_while_the_thread_waits_in_the_ring() {
    let cluster = support::cluster_async().await;
    let proxy =
        Proxy::start(&standard_config(cluster, 1, "io = \"uring\"\nidle_transaction_timeout = \"300ms\"")).await;
    let waits = pgmux::net::uring::waits_in_ring();
    let c = proxy.connect(APP.0, Some(APP.1), DB).await.expect("client through pgmux");
    c.batch_execute("BEGIN").await.unwrap();
    // Nothing moves on any socket now: only the timer can end the wait.
    eventually(Duration::from_secs(5), "idle-in-transaction client disconnected", || async { c.is_closed() }).await;
    assert!(pgmux::net::uring::waits_in_ring() > waits, "the proxy's thread waited in its ring");
    let other = proxy.connect(APP.0, Some(APP.1), DB).await.expect("a client accepted while the ring waits");
    assert_eq!(other.query_one("SELECT 6 * 7", &[]).await.unwrap().get::<_, i32>(0), 42);
    proxy.shutdown().await;
}

#[tokio::test]
async fn refused_io_uring_falls_back_to_epoll_and_says_so() {
    let line = binary_data_path(true).await;
    assert!(line.contains("io_uring refused") && line.contains("data path: epoll"), "{line}");
}
