//! A live fuzzer: many logged-in clients send mutated requests and leave
//! abruptly, while a canary client of the same pool runs `SELECT 1` every few
//! milliseconds. Nothing they send may reach the canary, and afterwards every
//! pool slot is accounted for and no server connection is left dirty.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use pgmux::cluster::Cluster;
use postgres_protocol::message::frontend;
use rand::{Rng, RngExt, SeedableRng};
use support::proxy::{Proxy, standard_config};
use support::{DB, TRUST, eventually, scalar};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const POOL_SIZE: usize = 4;

fn routed_config(cluster: &Cluster, pool_size: usize, extra: &str) -> String {
    let primary = format!("primary = \"{}\"", cluster.primary().host_port());
    let with_replica = format!("{primary}\nreplicas = [\"{}\"]", cluster.replicas()[0].host_port());
    standard_config(cluster, pool_size, extra).replacen(&primary, &with_replica, 1)
}

fn pbes(out: &mut BytesMut, sql: &str, sync: bool) {
    frontend::parse("", sql, std::iter::empty(), out).unwrap();
    out.put_u8(b'B');
    out.put_u32(12);
    out.put_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
    frontend::execute("", 0, out).unwrap();
    if sync {
        frontend::sync(out);
    }
}

/// Well-formed requests the mutations start from.
fn corpus() -> Vec<BytesMut> {
    let mut all = Vec::new();
    let mut b = BytesMut::new();
    frontend::query("SELECT 1", &mut b).unwrap();
    all.push(b);
    let mut b = BytesMut::new();
    frontend::query("BEGIN; INSERT INTO fuzz VALUES (1); SELECT pg_sleep(0.01)", &mut b).unwrap();
    all.push(b);
    let mut b = BytesMut::new();
    pbes(&mut b, "INSERT INTO fuzz VALUES (2)", false);
    frontend::flush(&mut b);
    all.push(b);
    let mut b = BytesMut::new();
    pbes(&mut b, "SELECT 1", true);
    pbes(&mut b, "SELECT 1/0", true);
    pbes(&mut b, "SELECT 3", true);
    all.push(b);
    let mut b = BytesMut::new();
    frontend::parse("s1", "SELECT $1::int", std::iter::empty(), &mut b).unwrap();
    frontend::describe(b'S', "s1", &mut b).unwrap();
    frontend::flush(&mut b);
    all.push(b);
    let mut b = BytesMut::new();
    frontend::query("COPY fuzz FROM STDIN", &mut b).unwrap();
    frontend::CopyData::new(&b"7\n8\n"[..]).unwrap().write(&mut b);
    all.push(b);
    let mut b = BytesMut::new();
    frontend::parse("bad", "SELEC nonsense", std::iter::empty(), &mut b).unwrap();
    frontend::query("SELECT 1", &mut b).unwrap();
    frontend::sync(&mut b);
    all.push(b);
    all
}

/// One mutation of a corpus entry: flipped bytes, a changed tag or length,
/// a cut, or junk appended.
fn mutate(rng: &mut impl Rng, corpus: &[BytesMut]) -> Vec<u8> {
    let mut v = corpus[rng.random_range(0..corpus.len())].to_vec();
    for _ in 0..rng.random_range(1..4) {
        if v.is_empty() {
            break;
        }
        let i = rng.random_range(0..v.len());
        match rng.random_range(0..6) {
            0 => v[i] ^= 1 << rng.random_range(0..8),
            1 => v[i] = rng.random(),
            2 => v.truncate(i),
            3 => v.extend((0..rng.random_range(1..64)).map(|_| rng.random::<u8>())),
            4 => {
                // A frame with an arbitrary tag and a small, plausible length.
                let len: u32 = rng.random_range(4..40);
                v.push(rng.random());
                v.extend_from_slice(&len.to_be_bytes());
                v.extend((4..len).map(|_| rng.random::<u8>()));
            }
            _ => {
                let len = v.len().min(i + 5);
                if i + 5 <= len {
                    v[i + 1..i + 5].copy_from_slice(&rng.random_range(0u32..200).to_be_bytes());
                }
            }
        }
    }
    v
}

/// A fuzzing client: logs in, sends mutated requests in random pieces, reads
/// a little, and leaves in one of several abrupt ways.
async fn fuzz_client(addr: std::net::SocketAddr, seed: u64, corpus: Arc<Vec<BytesMut>>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let Ok(mut s) = TcpStream::connect(addr).await else { return };
    let mut out = BytesMut::new();
    frontend::startup_message([("user", TRUST), ("database", DB)], &mut out).unwrap();
    if s.write_all(&out).await.is_err() {
        return;
    }
    let mut sink = vec![0u8; 64 * 1024];
    // Up to ReadyForQuery of the login (the trust login is short).
    let _ = tokio::time::timeout(Duration::from_millis(500), s.read(&mut sink)).await;
    for _ in 0..rng.random_range(1..5) {
        let bytes = mutate(&mut rng, &corpus);
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let n = rng.random_range(1..=rest.len());
            if s.write_all(&rest[..n]).await.is_err() {
                return;
            }
            rest = &rest[n..];
        }
        let wait = Duration::from_millis(rng.random_range(0..30));
        let _ = tokio::time::timeout(wait, s.read(&mut sink)).await;
    }
    match rng.random_range(0..3) {
        0 => {
            let _ = s.write_all(&[b'X', 0, 0, 0, 4]).await;
        }
        1 => {
            #[allow(deprecated)] // a zero linger sends RST at once; it cannot block
            let _ = s.set_linger(Some(Duration::ZERO));
        }
        _ => {}
    }
}

async fn storm(proxy: &Proxy, label: &str) {
    let canary = proxy.connect(TRUST, None, DB).await.expect("canary connects");
    let stop = Arc::new(AtomicBool::new(false));
    let canary_task = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let (mut lat, mut errors) = (Vec::new(), Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                match canary.simple_query("SELECT 1").await {
                    Ok(m) if m.len() == 3 => {}
                    Ok(m) => errors.push(format!("unexpected answer: {} messages", m.len())),
                    Err(e) => {
                        errors.push(format!("{e}: {:?}", e.as_db_error().map(|d| (d.code().code(), d.message()))))
                    }
                }
                lat.push(t.elapsed());
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            (lat, errors)
        })
    };
    let corpus = Arc::new(corpus());
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for wave in 0..10u64 {
        for i in 0..40u64 {
            let (corpus, done, addr) = (corpus.clone(), done.clone(), proxy.addr);
            tasks.push(tokio::spawn(async move {
                fuzz_client(addr, wave * 1000 + i, corpus).await;
                done.fetch_add(1, Ordering::Relaxed);
            }));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for t in tasks {
        t.await.expect("fuzz client task");
    }
    stop.store(true, Ordering::Relaxed);
    let (mut lat, errors) = canary_task.await.expect("canary task");
    lat.sort();
    let p99 = lat[lat.len() * 99 / 100];
    let max = *lat.last().unwrap();
    eprintln!(
        "{label}: {} fuzz clients; canary {} queries, p50 {:?}, p99 {p99:?}, max {max:?}, {} errors",
        done.load(Ordering::Relaxed),
        lat.len(),
        lat[lat.len() / 2],
        errors.len()
    );
    assert!(errors.is_empty(), "{label}: the canary saw errors: {errors:?}");
    assert!(max < Duration::from_secs(3), "{label}: a canary query took {max:?}");

    // Afterwards: no server connection of the fuzzed user left working or in
    // a transaction, and every slot of the pool usable at once.
    let su = support::superuser(DB).await;
    eventually(Duration::from_secs(15), "fuzzed server connections to settle", || {
        let su = &su;
        async move {
            scalar(
                su,
                "SELECT count(*) FROM pg_stat_activity WHERE usename = 'trustuser' \
                 AND (state <> 'idle' OR backend_xid IS NOT NULL)",
            )
            .await
                == "0"
        }
    })
    .await;
    let mut holders = Vec::new();
    for _ in 0..POOL_SIZE {
        let c = proxy.connect(TRUST, None, DB).await.expect("connect after the storm");
        c.batch_execute("BEGIN; /* pgmux:primary */ SELECT 1").await.expect("every slot usable");
        holders.push(c);
    }
    for c in &holders {
        c.batch_execute("COMMIT").await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_frames_and_abrupt_exits_never_reach_the_canary() {
    // PGMUX_TEST_LOG=FILE writes pgmux's debug log there, to see what a failure left behind.
    if let Ok(f) = std::env::var("PGMUX_TEST_LOG") {
        let file = std::fs::File::create(f).unwrap();
        let _ = tracing_subscriber::fmt()
            .with_env_filter("pgmux=debug")
            .with_writer(std::sync::Mutex::new(file))
            .with_ansi(false)
            .try_init();
    }
    let cluster = support::cluster_async().await;
    let su = support::superuser(DB).await;
    su.batch_execute("DROP TABLE IF EXISTS fuzz; CREATE TABLE fuzz (v int); GRANT ALL ON fuzz TO PUBLIC;")
        .await
        .unwrap();
    let plain = Proxy::standard(cluster, POOL_SIZE, "").await;
    storm(&plain, "routing off").await;
    let routed = Proxy::start(&routed_config(cluster, POOL_SIZE, "")).await;
    storm(&routed, "routing on").await;
    // Nothing a fuzz client left uncommitted was committed: only whole,
    // synced inserts (which commit directly too) may be there, never the
    // BEGIN-ed or unsynced ones (1 and 2).
    let left = scalar(&su, "SELECT count(*) FROM fuzz WHERE v IN (1, 2)").await;
    assert_eq!(left, "0", "uncommitted inserts were committed");
}
