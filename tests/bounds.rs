//! What one client can make pgmux hold, and how long a request may sit on a
//! server that stopped answering.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use pgmux::cluster::Cluster;
use postgres_protocol::message::frontend;
use support::faults::freezing_relay;
use support::proxy::{Proxy, standard_config};
use support::raw::{Raw, tags};
use support::{DB, TRUST, rss};

/// The standard config with the shared cluster's replica added to `app`.
fn routed_config(cluster: &Cluster, pool_size: usize, extra: &str) -> String {
    let primary = format!("primary = \"{}\"", cluster.primary().host_port());
    let with_replica = format!("{primary}\nreplicas = [\"{}\"]", cluster.replicas()[0].host_port());
    standard_config(cluster, pool_size, extra).replacen(&primary, &with_replica, 1)
}

/// Held by every test here: they measure this process's memory, which a
/// neighbouring test's proxy and cluster start would distort.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const MIB: u64 = 1024 * 1024;

/// Bind of statement `name` with one binary parameter of `len` bytes, whose
/// header and first bytes are written here; the caller streams the rest.
fn bind_header(out: &mut BytesMut, name: &str, len: usize) {
    let body_len = 1 + name.len() + 1 + 2 + 2 + 2 + 4 + len + 2;
    out.put_u8(b'B');
    out.put_u32((4 + body_len) as u32);
    out.put_u8(0); // unnamed portal
    out.put_slice(name.as_bytes());
    out.put_u8(0);
    out.put_u16(1); // one parameter format code
    out.put_u16(1); // binary
    out.put_u16(1); // one parameter
    out.put_u32(len as u32);
}

/// One test, so that no other test's allocations blur the figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_cannot_make_pgmux_hold_much_memory() {
    let _serial = SERIAL.lock().await;
    let cluster = support::cluster_async().await;
    let proxy = Proxy::start(&routed_config(cluster, 2, "max_query_size = 1048576")).await;
    let base = rss();

    // 1. Bind/Execute streamed without Sync (routing on): the server skips
    // them after the first error; pgmux forwards at its pace, holds little.
    let mut raw = Raw::login(proxy.addr, TRUST, DB).await;
    let mut chunk = BytesMut::new();
    for _ in 0..2000 {
        bind_header(&mut chunk, "nope", 0);
        chunk.put_u16(0);
        frontend::execute("", 0, &mut chunk).unwrap();
    }
    let total = 200 * MIB as usize;
    let mut sent = 0;
    let mut peak = 0;
    while sent < total {
        raw.send(&chunk).await;
        sent += chunk.len();
        peak = peak.max(rss().saturating_sub(base));
    }
    let mut out = BytesMut::new();
    frontend::sync(&mut out);
    raw.send(&out).await;
    let msgs = raw.until_ready().await;
    assert_eq!(tags(&msgs), "EZ", "the first Bind's error, then the Sync's ReadyForQuery");
    eprintln!("{} MiB of Bind/Execute without Sync: pgmux grew by at most {} MiB", sent as u64 / MIB, peak / MIB);
    assert!(peak < 64 * MIB, "streaming without Sync grew pgmux by {} MiB", peak / MIB);

    // 2. A message larger than max_query_size that pgmux must hold whole: 54000
    // at its header, nothing buffered.
    let mut big = Raw::login(proxy.addr, TRUST, DB).await;
    let mut out = BytesMut::new();
    out.put_u8(b'Q');
    out.put_u32(256 * MIB as u32);
    out.put_slice(&[b'x'; 4096]);
    big.send(&out).await;
    let msgs = big.until_closed().await;
    let err = msgs.last().expect("an answer").error();
    assert_eq!(err.code, "54000", "{err:?}");
    assert!(err.message.contains("max_query_size"), "{err:?}");

    // 3. A Bind with a 100 MiB parameter streams through (only its
    // statement name is rewritten), and the server gets every byte.
    let mut raw = Raw::login(proxy.addr, TRUST, DB).await;
    let mut out = BytesMut::new();
    frontend::parse("len", "SELECT length($1::bytea)", std::iter::empty(), &mut out).unwrap();
    frontend::sync(&mut out);
    raw.send(&out).await;
    assert_eq!(tags(&raw.until_ready().await), "1Z");
    let param = 100 * MIB as usize;
    let before = rss();
    let mut out = BytesMut::new();
    bind_header(&mut out, "len", param);
    raw.send(&out).await;
    let block = vec![7u8; MIB as usize];
    let mut peak = 0;
    for _ in 0..100 {
        raw.send(&block).await;
        peak = peak.max(rss().saturating_sub(before));
    }
    let mut out = BytesMut::new();
    out.put_u16(0); // no result format codes
    frontend::execute("", 0, &mut out).unwrap();
    frontend::sync(&mut out);
    raw.send(&out).await;
    let msgs = raw.until_ready().await;
    assert_eq!(tags(&msgs), "2DCZ");
    assert!(msgs[1].body.ends_with(param.to_string().as_bytes()), "the server got the whole parameter");
    eprintln!("a 100 MiB Bind parameter: pgmux grew by at most {} MiB", peak / MIB);
    assert!(peak < 48 * MIB, "a streamed Bind grew pgmux by {} MiB", peak / MIB);
}

/// `query_timeout` bounds a request already on a server that stopped
/// answering; the client gets 57014 and other clients keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_timeout_bounds_a_request_on_a_hung_server() {
    let _serial = SERIAL.lock().await;
    let cluster = support::cluster_async().await;
    let frozen = Arc::new(AtomicBool::new(false));
    let relay = freezing_relay(cluster.primary().addr(), frozen.clone()).await;
    let toml = standard_config(cluster, 2, "query_timeout = \"500ms\"")
        .replace(&format!("primary = \"{}\"", cluster.primary().host_port()), &format!("primary = \"{relay}\""));
    let proxy = Proxy::start(&toml).await;
    let mut victim = Raw::login(proxy.addr, TRUST, DB).await;
    assert_eq!(tags(&victim.simple_query("SELECT 1").await), "TDCZ");

    frozen.store(true, Ordering::SeqCst);
    let started = Instant::now();
    let mut out = BytesMut::new();
    frontend::query("SELECT 2", &mut out).unwrap();
    victim.send(&out).await;
    let msgs = victim.until_closed().await;
    let took = started.elapsed();
    let err = msgs.last().expect("an answer").error();
    assert_eq!((err.severity.as_str(), err.code.as_str()), ("FATAL", "57014"), "{err:?}");
    eprintln!("query_timeout 500ms: the client got 57014 after {took:?}");
    assert!(took >= Duration::from_millis(500) && took < Duration::from_secs(3), "{took:?}");

    frozen.store(false, Ordering::SeqCst);
    let mut next = Raw::login(proxy.addr, TRUST, DB).await;
    assert_eq!(tags(&next.simple_query("SELECT 3").await), "TDCZ");
}
