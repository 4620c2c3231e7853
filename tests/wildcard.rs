//! The `"*"` database: any database a client asks for, created in Postgres
//! after pgmux started, gets a pool on first use; a database listed by name
//! wins; unused pools are forgotten after `pool_idle_timeout`.

mod support;

use std::time::Duration;

use support::proxy::{Proxy, admin_config};
use support::{APP, DB, code, scalar};

fn config(cluster: &pgmux::cluster::Cluster) -> String {
    admin_config(cluster, 2, "pool_idle_timeout = \"1s\"\nserver_idle_timeout = \"1h\"")
        + &format!(
            "\n[[databases]]\nname = \"*\"\nprimary = \"{p}\"\npool_size = 2\n\n\
             [[databases]]\nname = \"aq_alias\"\ndbname = \"{DB}\"\nprimary = \"{p}\"\n",
            p = cluster.primary().host_port()
        )
}

async fn pgmux_sessions(db: &str) -> i64 {
    let su = support::superuser(DB).await;
    scalar(&su, &format!("SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND usename = '{}'", APP.0))
        .await
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_database_through_the_wildcard() {
    let cluster = support::cluster_async().await;
    let proxy = Proxy::start(&config(cluster)).await;
    let su = support::superuser(DB).await;
    su.batch_execute("DROP DATABASE IF EXISTS aq_wild1").await.unwrap();
    su.batch_execute("CREATE DATABASE aq_wild1").await.unwrap();

    // Created after pgmux started, in no configuration.
    let c = proxy.connect(APP.0, Some(APP.1), "aq_wild1").await.expect("a database only the wildcard names");
    assert_eq!(scalar(&c, "SELECT current_database()").await, "aq_wild1");
    c.batch_execute("BEGIN; CREATE TEMP TABLE t (x int) ON COMMIT DROP; COMMIT").await.unwrap();
    // A database listed by name wins over the wildcard.
    let alias = proxy.connect(APP.0, Some(APP.1), "aq_alias").await.expect("listed database");
    assert_eq!(scalar(&alias, "SELECT current_database()").await, DB);
    // One that exists nowhere: Postgres's own answer, through the wildcard.
    let e = proxy.connect(APP.0, Some(APP.1), "aq_nowhere").await.expect_err("no such database");
    assert_eq!(code(&e), "3D000");

    // Unused for pool_idle_timeout: the pool and its server connections go.
    assert!(pgmux_sessions("aq_wild1").await >= 1);
    drop(c);
    let admin = proxy.connect("postgres", None, "pgmux").await.unwrap();
    support::eventually(Duration::from_secs(15), "the wildcard pool forgotten", || async {
        let pools = admin.simple_query("SHOW POOLS").await.unwrap();
        let listed = pools
            .iter()
            .any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("aq_wild1")));
        !listed && pgmux_sessions("aq_wild1").await == 0
    })
    .await;
    su.batch_execute("DROP DATABASE aq_wild1").await.expect("no pgmux connection keeps it");
    // A listed database's pool is not forgotten.
    assert_eq!(scalar(&alias, "SELECT 1").await, "1");
    assert!(pgmux_sessions(DB).await >= 1);
    proxy.shutdown().await;
}
