//! The io_uring data path's system calls at one client: a request's send
//! and the wait for its answer are one `io_uring_enter`, so a request and
//! its answer cost two (four when the send was submitted apart from the
//! wait, and six `recv`/`send`/`epoll_wait` on epoll).
//!
//! A test binary of its own: the count is the whole process's, so no other
//! test may run beside this one.

mod support;

use support::proxy::{Proxy, standard_config};
use support::{APP, DB};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_and_its_answer_cost_two_io_uring_enters() {
    let cluster = support::cluster_async().await;
    let proxy = Proxy::start(&standard_config(cluster, 1, "io = \"uring\"")).await;
    let c = proxy.connect(APP.0, Some(APP.1), DB).await.expect("client through pgmux");
    // Logged in, on the ring, its server connection open.
    for _ in 0..20 {
        c.simple_query("SELECT 1").await.unwrap();
    }
    let requests = 500;
    let before = pgmux::net::uring::enters();
    for _ in 0..requests {
        c.simple_query("SELECT 1").await.unwrap();
    }
    let per_request = (pgmux::net::uring::enters() - before) as f64 / requests as f64;
    assert!(
        per_request < 3.0,
        "{per_request:.2} io_uring_enter calls per request and answer (2 when each send goes with the wait)"
    );
    proxy.shutdown().await;
}
