//! `[proxy] idle_poll`: a proxy whose client sends back to back stays
//! awake between the messages instead of sleeping for each, on both data
//! paths; with `idle_poll = "0"` it sleeps for each; the admin console's
//! SET (as a reload) changes it at once.
//!
//! A test binary of its own: the limit and the count of sleeps are the
//! whole process's, so no other proxy may run beside these.

mod support;

use support::proxy::{Proxy, admin_config, standard_config};

/// Sleeps of the proxy's thread per `SELECT 1` at one client.
async fn sleeps_per_request(cluster: &pgmux::cluster::Cluster, extra: &str) -> f64 {
    let proxy = Proxy::start(&standard_config(cluster, 1, extra)).await;
    let per_request = measure(&proxy).await;
    proxy.shutdown().await;
    per_request
}

/// The proxy's sleeps per request; after 50 requests that log in, open
/// the server connection and open the window.
async fn measure(proxy: &Proxy) -> f64 {
    proxy.count_per_select_1(50, 500, pgmux::net::idle_poll::sleeps).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_polling_proxy_does_not_sleep_between_a_clients_messages_and_set_turns_it_on_and_off() {
    let cluster = support::cluster_async().await;
    for io in ["epoll", "uring"] {
        // A millisecond: far more than a round trip to Postgres or to the
        // client here, even on a loaded machine.
        let polling = sleeps_per_request(cluster, &format!("io = \"{io}\"\nidle_poll = \"1ms\"")).await;
        let sleeping = sleeps_per_request(cluster, &format!("io = \"{io}\"\nidle_poll = \"0\"")).await;
        assert!(polling < 0.5, "io = {io}: {polling:.2} sleeps per request with idle_poll = 1ms");
        assert!(sleeping >= 1.0, "io = {io}: {sleeping:.2} sleeps per request with idle_poll = 0");
    }

    // The console's SET, as a reload, changes it at once. (In this test, not
    // one beside it: the limit and the count are the process's.)
    let proxy = Proxy::start(&admin_config(cluster, 1, "idle_poll = \"0\"")).await;
    let admin = proxy.connect("postgres", None, "pgbouncer").await.unwrap();
    let before = measure(&proxy).await;
    admin.simple_query("SET idle_poll = '1ms'").await.expect("SET");
    let after = measure(&proxy).await;
    admin.simple_query("SET idle_poll = '0'").await.expect("SET");
    let off_again = measure(&proxy).await;
    assert!(before >= 1.0, "{before:.2} sleeps per request before SET idle_poll");
    assert!(after < 0.5, "{after:.2} sleeps per request after SET idle_poll = '1ms'");
    assert!(off_again >= 1.0, "{off_again:.2} sleeps per request after SET idle_poll = '0'");
    proxy.shutdown().await;
}
