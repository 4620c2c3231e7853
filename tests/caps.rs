//! `max_db_connections` and `max_user_connections`: Postgres never sees
//! more server connections than the caps allow, whatever the number of
//! users and pools, and a pool that needs room takes an idle connection of
//! another pool instead of waiting for it to time out.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use support::proxy::{Proxy, standard_config};
use support::{APP, CLEAR, DB, MD5, TRUST, scalar};

/// These tests count sessions on the shared cluster: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const USERS: [(&str, Option<&str>); 4] =
    [(APP.0, Some(APP.1)), (MD5.0, Some(MD5.1)), (CLEAR.0, Some(CLEAR.1)), (TRUST, None)];

/// pgmux's pooled sessions on `db` (monitors and superuser sessions aside).
async fn sessions(su: &tokio_postgres::Client, filter: &str) -> i64 {
    let sql = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' \
         AND usename IN ('{}', '{}', '{}', '{}') AND {filter}",
        APP.0, MD5.0, CLEAR.0, TRUST
    );
    scalar(su, &sql).await.parse().unwrap()
}

/// Runs `per_user` concurrent transactions of 100 ms for each user on
/// `databases`, while sampling `filter`'s session count; returns the most seen.
async fn load(proxy: &Proxy, databases: &[&'static str], per_user: usize, filter: &str) -> i64 {
    let su = support::superuser(DB).await;
    let done = Arc::new(AtomicBool::new(false));
    let mut work = tokio::task::JoinSet::new();
    for (user, password) in USERS {
        for db in databases {
            for _ in 0..per_user {
                let c = proxy.connect(user, password, db).await.expect("login");
                work.spawn(async move {
                    for _ in 0..3 {
                        c.batch_execute("BEGIN; SELECT pg_sleep(0.1); COMMIT").await.expect("every transaction runs");
                    }
                });
            }
        }
    }
    let sampler = {
        let (done, filter) = (done.clone(), filter.to_owned());
        tokio::spawn(async move {
            let mut most = 0;
            while !done.load(Ordering::SeqCst) {
                most = most.max(sessions(&su, &filter).await);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            most
        })
    };
    while let Some(r) = work.join_next().await {
        r.unwrap();
    }
    done.store(true, Ordering::SeqCst);
    sampler.await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_db_connections_holds_across_users() {
    let _serial = SERIAL.lock().await;
    let cluster = support::cluster_async().await;
    let proxy =
        Proxy::start(&standard_config(cluster, 5, "max_db_connections = 3\nquery_wait_timeout = \"30s\"")).await;
    let most = load(&proxy, &[DB], 2, &format!("datname = '{DB}'")).await;
    eprintln!("max_db_connections = 3: at most {most} sessions on {DB} for 4 users x 2 clients");
    assert!(most <= 3, "Postgres saw {most} pgmux sessions on {DB}");
    assert!(most >= 2, "the cap was never reached: {most}");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_user_connections_holds_across_databases() {
    let _serial = SERIAL.lock().await;
    let cluster = support::cluster_async().await;
    let proxy =
        Proxy::start(&standard_config(cluster, 5, "max_user_connections = 2\nquery_wait_timeout = \"30s\"")).await;
    let su = support::superuser(DB).await;
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        tokio::spawn(async move {
            let mut most = 0;
            while !done.load(Ordering::SeqCst) {
                let n: i64 = scalar(
                    &su,
                    &format!("SELECT count(*) FROM pg_stat_activity WHERE usename = '{}' AND backend_type = 'client backend'", APP.0),
                )
                .await
                .parse()
                .unwrap();
                most = most.max(n);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            most
        })
    };
    let mut work = tokio::task::JoinSet::new();
    for db in [DB, "postgres"] {
        for _ in 0..3 {
            let c = proxy.connect(APP.0, Some(APP.1), db).await.expect("login");
            work.spawn(async move {
                for _ in 0..3 {
                    c.batch_execute("BEGIN; SELECT pg_sleep(0.1); COMMIT").await.expect("every transaction runs");
                }
            });
        }
    }
    while let Some(r) = work.join_next().await {
        r.unwrap();
    }
    done.store(true, Ordering::SeqCst);
    let most = sampler.await.unwrap();
    eprintln!("max_user_connections = 2: at most {most} sessions of {} over two databases", APP.0);
    assert!(most <= 2, "Postgres saw {most} sessions of {}", APP.0);
    proxy.shutdown().await;
}

/// A full cap with idle connections in another user's pool: the newcomer
/// closes one and goes on at once, instead of waiting for
/// server_idle_timeout (10 minutes here) or query_wait_timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_cap_evicts_idle_connections_of_other_pools() {
    let _serial = SERIAL.lock().await;
    let cluster = support::cluster_async().await;
    let proxy = Proxy::start(&standard_config(cluster, 5, "max_db_connections = 2\nquery_wait_timeout = \"3s\"")).await;
    // Two idle connections in app's pool fill the cap.
    let a = proxy.connect(APP.0, Some(APP.1), DB).await.unwrap();
    let b = proxy.connect(APP.0, Some(APP.1), DB).await.unwrap();
    let (x, y) = tokio::join!(
        a.batch_execute("BEGIN; SELECT pg_sleep(0.1); COMMIT"),
        b.batch_execute("BEGIN; SELECT pg_sleep(0.1); COMMIT")
    );
    x.unwrap();
    y.unwrap();
    let su = support::superuser(DB).await;
    assert_eq!(sessions(&su, &format!("datname = '{DB}'")).await, 2);
    let started = std::time::Instant::now();
    let other = proxy.connect(TRUST, None, DB).await.expect("login");
    assert_eq!(scalar(&other, "SELECT current_user").await, TRUST);
    assert!(started.elapsed() < Duration::from_secs(2), "waited {:?}", started.elapsed());
    assert!(sessions(&su, &format!("datname = '{DB}'")).await <= 2);
    proxy.shutdown().await;
}

/// Client caps answer as Postgres does for datconnlimit / rolconnlimit, and
/// a place comes back when a client leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_caps_refuse_like_postgres() {
    let _serial = SERIAL.lock().await;
    let cluster = support::cluster_async().await;
    let proxy = Proxy::start(&support::proxy::admin_config(
        cluster,
        2,
        "max_db_client_connections = 2\nmax_user_client_connections = 1\nmax_db_connections = 7",
    ))
    .await;
    let app = proxy.connect(APP.0, Some(APP.1), DB).await.unwrap();
    let e = proxy.connect(APP.0, Some(APP.1), "postgres").await.expect_err("a second app client");
    assert_eq!(support::code(&e), "53300");
    let text = e.as_db_error().map(|d| d.message().to_owned()).unwrap_or_default();
    assert_eq!(text, format!("too many connections for role \"{}\"", APP.0));
    let _md5 = proxy.connect(MD5.0, Some(MD5.1), DB).await.unwrap();
    let e = proxy.connect(TRUST, None, DB).await.expect_err("a third client of the database");
    assert_eq!(support::code(&e), "53300");
    let text = e.as_db_error().map(|d| d.message().to_owned()).unwrap_or_default();
    assert_eq!(text, format!("too many connections for database \"{DB}\""));
    // The console shows the caps and the counts, as PgBouncer's does.
    let admin = proxy.connect("postgres", None, "pgbouncer").await.unwrap();
    let row = |msgs: Vec<tokio_postgres::SimpleQueryMessage>, key: &str, name: &str| {
        msgs.into_iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) if r.get(key) == Some(name) => Some(r),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no row {name}"))
    };
    let db = row(admin.simple_query("SHOW DATABASES").await.unwrap(), "name", DB);
    assert_eq!(
        (db.get("max_connections"), db.get("max_client_connections"), db.get("current_client_connections")),
        (Some("7"), Some("2"), Some("2"))
    );
    let user = row(admin.simple_query("SHOW USERS").await.unwrap(), "name", APP.0);
    assert_eq!(
        (user.get("max_user_client_connections"), user.get("current_client_connections")),
        (Some("1"), Some("1"))
    );
    // The trust user may still use another database.
    let other = proxy.connect(TRUST, None, "postgres").await.expect("another database");
    assert_eq!(scalar(&other, "SELECT 1").await, "1");
    drop(app);
    support::eventually(Duration::from_secs(10), "the app client's place back", || async {
        proxy.connect(APP.0, Some(APP.1), "postgres").await.is_ok()
    })
    .await;
    proxy.shutdown().await;
}

/// A client that waited reserve_pool_timeout gets a connection beyond
/// pool_size; without a reserve pool it waits for the transaction ahead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserve_pool_serves_long_waiters() {
    let _serial = SERIAL.lock().await;
    let cluster = support::cluster_async().await;
    for (reserve, served_early) in [(1, true), (0, false)] {
        let extra =
            format!("reserve_pool_size = {reserve}\nreserve_pool_timeout = \"200ms\"\nquery_wait_timeout = \"10s\"");
        let proxy = Proxy::start(&standard_config(cluster, 1, &extra)).await;
        let holder = proxy.connect(APP.0, Some(APP.1), DB).await.unwrap();
        let waiter = proxy.connect(APP.0, Some(APP.1), DB).await.unwrap();
        holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
        let started = std::time::Instant::now();
        let quick = tokio::time::timeout(Duration::from_secs(2), waiter.simple_query("SELECT 2")).await;
        assert_eq!(
            quick.is_ok(),
            served_early,
            "reserve_pool_size = {reserve}: answered after {:?}",
            started.elapsed()
        );
        if served_early {
            assert!(started.elapsed() >= Duration::from_millis(150), "not before reserve_pool_timeout");
        }
        holder.batch_execute("COMMIT").await.unwrap();
        proxy.shutdown().await;
    }
}
