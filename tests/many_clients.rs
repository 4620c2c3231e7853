//! Many clients over a small pool: Postgres never sees more than `pool_size`
//! backends, and every client's work completes.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use support::proxy::Proxy;
use support::{DB, TRUST};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_clients_share_ten_backends() {
    let cluster = support::cluster_async().await;
    let proxy = Proxy::standard(cluster, 10, "query_wait_timeout = \"60s\"").await;
    let su = support::connect(cluster.primary(), "postgres", None, DB).await.unwrap();

    let done = Arc::new(AtomicBool::new(false));
    let max_seen = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (done, max_seen) = (done.clone(), max_seen.clone());
        tokio::spawn(async move {
            let count_sql = format!("SELECT count(*) FROM pg_stat_activity WHERE usename = '{TRUST}'");
            while !done.load(Ordering::Relaxed) {
                let row = su.query_one(count_sql.as_str(), &[]).await.unwrap();
                let n = row.get::<_, i64>(0) as usize;
                max_seen.fetch_max(n, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    let mut clients = Vec::new();
    for i in 0..500 {
        let port = proxy.port();
        clients.push(tokio::spawn(async move {
            let mut config = tokio_postgres::Config::new();
            config.host("127.0.0.1").port(port).user(TRUST).dbname(DB);
            let (c, conn) = config.connect(tokio_postgres::NoTls).await.expect("connect");
            tokio::spawn(conn);
            for j in 0..4 {
                let msgs = c.simple_query(&format!("SELECT {i} + {j}")).await.expect("query");
                let values: Vec<String> = msgs
                    .iter()
                    .filter_map(|m| match m {
                        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                        _ => None,
                    })
                    .collect();
                assert_eq!(values, vec![(i + j).to_string()]);
            }
            c.batch_execute("BEGIN; SELECT pg_sleep(0.001); COMMIT").await.expect("transaction");
        }));
    }
    for c in clients {
        c.await.expect("client task");
    }
    done.store(true, Ordering::Relaxed);
    sampler.await.unwrap();
    let max = max_seen.load(Ordering::Relaxed);
    assert!(max <= 10, "Postgres saw {max} backends for pool_size = 10");
    assert!(max >= 1, "the sampler saw the pool at work");
}
