//! The io_uring data path's system calls at one client: a request's send
//! and the wait for its answer are one `io_uring_enter`, so a request and
//! its answer cost two (four when the send was submitted apart from the
//! wait, and six `recv`/`send`/`epoll_wait` on epoll).
//!
//! A test binary of its own: the count is the whole process's, so no other
//! test may run beside this one.

mod support;

use support::proxy::{Proxy, standard_config};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_and_its_answer_cost_two_io_uring_enters() {
    let cluster = support::cluster_async().await;
    // Not polling before sleeping: each poll would be a call of its own.
    let proxy = Proxy::start(&standard_config(cluster, 1, "io = \"uring\"\nidle_poll = \"0\"")).await;
    // After 20 requests: logged in, on the ring, its server connection open.
    let per_request = proxy.count_per_select_1(20, 500, pgmux::net::uring::enters).await;
    assert!(
        per_request < 3.0,
        "{per_request:.2} io_uring_enter calls per request and answer (2 when each send goes with the wait)"
    );
    proxy.shutdown().await;
}
