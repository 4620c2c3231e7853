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

/// A checkout dropped without a release (a panic, a cancelled future, a path
/// that forgot) closes its backend, whose state is unknown, and frees the
/// slot: on a pool of one, the next checkout gets a new connection at once.
#[tokio::test]
async fn a_checkout_dropped_without_release_frees_its_slot() {
    let cluster = support::cluster_async().await;
    let toml = support::proxy::standard_config(cluster, 1, "query_wait_timeout = \"2s\"");
    let settings = pgmux::settings::Settings::build(pgmux::config::Config::parse(&toml, "t.toml").unwrap()).unwrap();
    let (db, user) = (settings.database(DB).unwrap(), settings.user(TRUST).unwrap());
    let pool = pgmux::pool::Pool::new(pgmux::pool::PoolSettings::new(&settings, db, user));

    let first = pool.checkout().await.expect("first checkout");
    let pid = first.pid;
    drop(first);
    let second = tokio::time::timeout(std::time::Duration::from_secs(10), pool.checkout())
        .await
        .expect("checkout finished")
        .expect("the slot came back");
    assert_ne!(second.pid, pid, "a dropped checkout's backend is closed, not reused");
    let second_pid = second.pid;
    second.release(pgmux::pool::Release::Clean(Instant::now()));
    let third = pool.checkout().await.expect("third checkout");
    assert_eq!(third.pid, second_pid, "a released clean backend is reused");
    third.release(pgmux::pool::Release::Clean(Instant::now()));
}
