//! `min_pool_size` keeps backends open before any client, and
//! `server_idle_timeout` closes the surplus. Own binary: it counts the
//! backends of one user, which no other test may share.

mod support;

use std::time::Duration;

use support::proxy::{Proxy, standard_config};
use support::{DB, MD5, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_pool_size_is_kept_warm_and_idle_surplus_closes() {
    let cluster = support::cluster_async().await;
    let toml = standard_config(cluster, 4, "server_idle_timeout = \"1s\"").replace(
        "pool_size = 4\n\n[[databases]]\nname = \"postgres\"",
        "pool_size = 4\nmin_pool_size = 2\n\n[[databases]]\nname = \"postgres\"",
    );
    assert!(toml.contains("min_pool_size = 2"));
    let proxy = Proxy::start(&toml).await;
    let su = support::connect(cluster.primary(), "postgres", None, DB).await.unwrap();
    let count = || async {
        let row = su
            .query_one("SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND datname = $2", &[&MD5.0, &DB])
            .await
            .unwrap();
        row.get::<_, i64>(0)
    };
    // No client yet: the janitor opens min_pool_size backends for every configured user.
    eventually(Duration::from_secs(5), "two warm backends", || async { count().await == 2 }).await;
    // Four concurrent transactions open the pool to four.
    let clients: Vec<_> = futures_util::future::join_all((0..4).map(|_| proxy.connect(MD5.0, Some(MD5.1), DB))).await;
    let clients: Vec<_> = clients.into_iter().map(|c| c.unwrap()).collect();
    for c in &clients {
        c.batch_execute("BEGIN; SELECT 1").await.unwrap();
    }
    assert_eq!(count().await, 4);
    for c in &clients {
        c.batch_execute("COMMIT").await.unwrap();
    }
    // Idle beyond server_idle_timeout: back down to min_pool_size, not below.
    eventually(Duration::from_secs(10), "surplus closed", || async { count().await == 2 }).await;
}
