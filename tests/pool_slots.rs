//! A pool slot is never lost, whatever happens between its checkout and its
//! release: here, a server that accepts but never answers a login until the
//! client's own login timeout gives up on it.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use support::faults::stalling_relay;
use support::proxy::Proxy;
use support::raw::{Raw, tags};
use support::{DB, TRUST};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_timed_out_on_a_slow_server_gives_its_slot_back() {
    let cluster = support::cluster_async().await;
    let stalled = Arc::new(AtomicBool::new(true));
    let relay = stalling_relay(cluster.primary().addr(), stalled.clone()).await;
    // The server connect timeout outlasts the client's login timeout (15 s):
    // the login gives up while the pool's new backend is still connecting.
    let toml =
        support::proxy::standard_config(cluster, 1, "server_connect_timeout = \"60s\"\nquery_wait_timeout = \"1s\"")
            .replace(&format!("primary = \"{}\"", cluster.primary().host_port()), &format!("primary = \"{relay}\""));
    let proxy = Proxy::start(&toml).await;

    let started = Instant::now();
    let mut first = Raw::connect(proxy.addr).await;
    let mut out = bytes::BytesMut::new();
    postgres_protocol::message::frontend::startup_message([("user", TRUST), ("database", DB)], &mut out).unwrap();
    first.send(&out).await;
    let msgs = first.until_closed().await;
    assert_eq!(msgs.last().map(|m| m.error().code), Some("08P01".to_owned()), "login timed out: {}", tags(&msgs));
    eprintln!("login gave up after {:?}", started.elapsed());

    // The server answers again: the pool of one must still have its slot.
    stalled.store(false, Ordering::SeqCst);
    let mut next = Raw::login(proxy.addr, TRUST, DB).await;
    assert_eq!(tags(&next.simple_query("SELECT 1").await), "TDCZ");
}
