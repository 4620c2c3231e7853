//! Transaction mode that drivers cannot tell from a direct connection:
//! named prepared statements, unnamed statements across Syncs, DEALLOCATE and
//! DISCARD ALL, and session settings that follow the client.

mod support;

use support::{code, scalar};

use std::time::Duration;

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use support::proxy::Proxy;
use support::raw::{Raw, tags};
use support::{APP, DB, TRUST, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_prepare_once_and_execute_across_transactions() {
    let cluster = support::cluster_async().await;
    let proxy = Proxy::standard(cluster, 3, "query_wait_timeout = \"30s\"").await;
    let mut tasks = Vec::new();
    for i in 0..20i32 {
        let port = proxy.port();
        tasks.push(tokio::spawn(async move {
            let mut config = tokio_postgres::Config::new();
            config.host("127.0.0.1").port(port).user(TRUST).dbname(DB);
            let (c, conn) = config.connect(tokio_postgres::NoTls).await.expect("connect");
            tokio::spawn(conn);
            let add = c.prepare("SELECT $1::int + $2::int").await.unwrap();
            let echo = c.prepare("SELECT $1::text || '!'").await.unwrap();
            let pid = c.prepare("SELECT pg_backend_pid()").await.unwrap();
            let mut pids = std::collections::HashSet::new();
            for j in 0..100i32 {
                let sum: i32 = c.query_one(&add, &[&i, &j]).await.unwrap().get(0);
                assert_eq!(sum, i + j);
                let s: String = c.query_one(&echo, &[&format!("c{i}")]).await.unwrap().get(0);
                assert_eq!(s, format!("c{i}!"));
                pids.insert(c.query_one(&pid, &[]).await.unwrap().get::<_, i32>(0));
            }
            pids.len()
        }));
    }
    let mut max_backends_seen = 0;
    for t in tasks {
        max_backends_seen = max_backends_seen.max(t.await.unwrap());
    }
    // The statements really crossed backends: some client ran on more than one.
    assert!(max_backends_seen > 1, "every client stayed on one backend; the test proves nothing");
    assert!(max_backends_seen <= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_statement_name_different_texts_in_two_clients() {
    let cluster = support::cluster_async().await;
    let proxy = Proxy::standard(cluster, 1, "").await;
    let (a, b) = (proxy.app().await, proxy.app().await);
    // tokio-postgres names its first statement "s0" in both clients.
    let sa = a.prepare("SELECT 'from a'::text").await.unwrap();
    let sb = b.prepare("SELECT 'from b'::text, 2").await.unwrap();
    for _ in 0..20 {
        assert_eq!(a.query_one(&sa, &[]).await.unwrap().get::<_, String>(0), "from a");
        let row = b.query_one(&sb, &[]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), "from b");
        assert_eq!(row.len(), 2);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_survives_its_backend_being_terminated() {
    let cluster = support::cluster_async().await;
    let proxy = Proxy::standard(cluster, 2, "").await;
    let c = proxy.app().await;
    let st = c.prepare("SELECT pg_backend_pid()").await.unwrap();
    let pid: i32 = c.query_one(&st, &[]).await.unwrap().get(0);
    let su = support::superuser(DB).await;
    su.simple_query(&format!("SELECT pg_terminate_backend({pid})")).await.unwrap();
    eventually(Duration::from_secs(5), "backend gone", || async {
        scalar(&su, &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}")).await == "0"
    })
    .await;
    let again: i32 = c.query_one(&st, &[]).await.unwrap().get(0);
    assert_ne!(again, pid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alter_table_invalidates_like_a_direct_connection_and_reprepare_works() {
    let cluster = support::cluster_async().await;
    let su = support::superuser(DB).await;
    su.batch_execute(
        "DROP TABLE IF EXISTS prep_ddl; CREATE TABLE prep_ddl (a int); INSERT INTO prep_ddl VALUES (1);
         GRANT ALL ON prep_ddl TO PUBLIC;",
    )
    .await
    .unwrap();
    let proxy = Proxy::standard(cluster, 1, "").await;
    let c = proxy.app().await;
    let st = c.prepare("SELECT * FROM prep_ddl").await.unwrap();
    assert_eq!(c.query(&st, &[]).await.unwrap()[0].len(), 1);
    su.batch_execute("ALTER TABLE prep_ddl ADD COLUMN b int DEFAULT 2").await.unwrap();
    // Directly, Postgres answers this; through pgmux the client must see the same.
    let err = c.query(&st, &[]).await.unwrap_err();
    assert_eq!(code(&err), "0A000", "{err:?}");
    // The client re-prepares the same text: it must get a fresh server statement.
    let st2 = c.prepare("SELECT * FROM prep_ddl").await.unwrap();
    for _ in 0..3 {
        assert_eq!(c.query(&st2, &[]).await.unwrap()[0].len(), 2);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unnamed_statement_bound_after_a_sync_on_another_backend() {
    let cluster = support::cluster_async().await;
    let proxy = Proxy::standard(cluster, 2, "").await;
    let mut raw = Raw::login(proxy.addr, TRUST, DB).await;
    let mut out = BytesMut::new();
    frontend::parse("", "SELECT $1::int * 2", [23u32], &mut out).unwrap();
    frontend::describe(b'S', "", &mut out).unwrap();
    frontend::sync(&mut out);
    raw.send(&out).await;
    assert_eq!(tags(&raw.until_ready().await), "1tTZ");
    // Another client now holds the backend that has the unnamed statement.
    let holder = proxy.connect(TRUST, None, DB).await.unwrap();
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let mut out = BytesMut::new();
    // Bind "" "" with one text parameter "21".
    out.extend_from_slice(&[b'B', 0, 0, 0, 18, 0, 0, 0, 0, 0, 1, 0, 0, 0, 2, b'2', b'1', 0, 0]);
    frontend::execute("", 0, &mut out).unwrap();
    frontend::sync(&mut out);
    raw.send(&out).await;
    let msgs = raw.until_ready().await;
    assert_eq!(tags(&msgs), "2DCZ");
    assert!(msgs[1].body.ends_with(b"42"), "{:?}", msgs[1]);
    holder.batch_execute("COMMIT").await.unwrap();
}

/// libpq's PQprepare (Parse + Sync) of a text the pool already knows is
/// answered without a backend: a client preparing while every backend is
/// held in a transaction does not wait (pgbench -M prepared deadlocked on
/// exactly this). A text never parsed before still goes to a server, so its
/// errors come at prepare time as directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preparing_a_known_statement_needs_no_backend() {
    let cluster = support::cluster_async().await;
    let proxy = Proxy::standard(cluster, 1, "query_wait_timeout = \"30s\"").await;
    let prepare = |name: &str, sql: &str| {
        let mut out = BytesMut::new();
        frontend::parse(name, sql, [23u32], &mut out).unwrap();
        frontend::sync(&mut out);
        out
    };
    let sql = "SELECT $1::int * 3";
    let mut first = Raw::login(proxy.addr, TRUST, DB).await;
    first.send(&prepare("s1", sql)).await;
    assert_eq!(tags(&first.until_ready().await), "1Z");
    // The only backend is now held inside a transaction.
    let holder = proxy.connect(TRUST, None, DB).await.unwrap();
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let mut second = Raw::login(proxy.addr, TRUST, DB).await;
    second.send(&prepare("mine", sql)).await;
    let answer = tokio::time::timeout(Duration::from_secs(5), second.until_ready()).await;
    assert_eq!(tags(&answer.expect("answered while the pool is exhausted")), "1Z");
    // An unknown text waits for a backend like any request.
    second.send(&prepare("other", "SELECT $1::int + 1")).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), second.until_ready()).await.is_err(),
        "an unvalidated statement must be parsed by a server"
    );
    holder.batch_execute("COMMIT").await.unwrap();
    assert_eq!(tags(&second.until_ready().await), "1Z");
    // The locally prepared statement runs, created on the backend at first use.
    let mut out = BytesMut::new();
    // Bind "" "mine" with one text parameter "14".
    out.extend_from_slice(&[b'B', 0, 0, 0, 22, 0, b'm', b'i', b'n', b'e', 0, 0, 0, 0, 1, 0, 0, 0, 2, b'1', b'4', 0, 0]);
    frontend::execute("", 0, &mut out).unwrap();
    frontend::sync(&mut out);
    second.send(&out).await;
    let msgs = second.until_ready().await;
    assert_eq!(tags(&msgs), "2DCZ");
    assert!(msgs[1].body.ends_with(b"42"), "{:?}", msgs[1]);
    // A bad text is refused at prepare time, as directly.
    second.send(&prepare("bad", "SELEC 1")).await;
    let msgs = second.until_ready().await;
    assert_eq!(tags(&msgs), "EZ");
    assert_eq!(msgs[0].error().code, "42601");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deallocate_and_discard_all_act_on_the_clients_own_statements() {
    let cluster = support::cluster_async().await;
    let proxy = Proxy::standard(cluster, 1, "").await;
    let mut a = Raw::login(proxy.addr, TRUST, DB).await;
    let mut b = Raw::login(proxy.addr, TRUST, DB).await;
    for raw in [&mut a, &mut b] {
        let mut out = BytesMut::new();
        frontend::parse("mystmt", "SELECT 7", std::iter::empty(), &mut out).unwrap();
        frontend::sync(&mut out);
        raw.send(&out).await;
        assert_eq!(tags(&raw.until_ready().await), "1Z");
    }
    let bind_execute = |name: &str| {
        let mut out = BytesMut::new();
        out.extend_from_slice(b"B");
        let len = 4 + 1 + name.len() + 1 + 2 + 2 + 2;
        out.extend_from_slice(&(len as u32).to_be_bytes());
        out.extend_from_slice(&[0]);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0]);
        frontend::execute("", 0, &mut out).unwrap();
        frontend::sync(&mut out);
        out
    };
    let msgs = a.simple_query("DEALLOCATE mystmt").await;
    assert_eq!(tags(&msgs), "CZ");
    assert_eq!(&msgs[0].body[..], b"DEALLOCATE\0");
    a.send(&bind_execute("mystmt")).await;
    let msgs = a.until_ready().await;
    assert_eq!(tags(&msgs), "EZ");
    assert_eq!(msgs[0].error().code, "26000");
    // b's statement of the same name and text is untouched.
    b.send(&bind_execute("mystmt")).await;
    assert_eq!(tags(&b.until_ready().await), "2DCZ");
    // DISCARD ALL drops b's statements only.
    assert_eq!(tags(&b.simple_query("DISCARD ALL").await), "CZ");
    b.send(&bind_execute("mystmt")).await;
    assert_eq!(b.until_ready().await[0].error().code, "26000");
    let mut out = BytesMut::new();
    frontend::parse("mystmt", "SELECT 8", std::iter::empty(), &mut out).unwrap();
    frontend::sync(&mut out);
    a.send(&out).await;
    assert_eq!(tags(&a.until_ready().await), "1Z");
    a.send(&bind_execute("mystmt")).await;
    let msgs = a.until_ready().await;
    assert_eq!(tags(&msgs), "2DCZ");
    assert!(msgs[1].body.ends_with(b"8"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreported_settings_follow_the_client_and_stay_private() {
    let cluster = support::cluster_async().await;
    let su = support::superuser(DB).await;
    su.batch_execute("CREATE SCHEMA IF NOT EXISTS s_priv; GRANT USAGE ON SCHEMA s_priv TO PUBLIC").await.unwrap();
    let proxy = Proxy::standard(cluster, 2, "").await;
    let a = proxy.app().await;
    let others: Vec<_> = futures_util::future::join_all((0..4).map(|_| proxy.app())).await;
    let default_path = scalar(&others[0], "SHOW search_path").await;
    let default_timeout = scalar(&others[0], "SHOW statement_timeout").await;
    a.batch_execute("SET search_path = s_priv, public").await.unwrap();
    a.batch_execute("SET statement_timeout = '12s'").await.unwrap();
    a.batch_execute("BEGIN; SET LOCAL work_mem = '1234kB'; COMMIT").await.unwrap();
    for _ in 0..10 {
        for o in &others {
            assert_eq!(scalar(o, "SHOW search_path").await, default_path);
            assert_eq!(scalar(o, "SHOW statement_timeout").await, default_timeout);
            assert_ne!(scalar(o, "SHOW work_mem").await, "1234kB");
        }
        assert_eq!(scalar(&a, "SHOW search_path").await, "s_priv, public");
        assert_eq!(scalar(&a, "SHOW statement_timeout").await, "12s");
        assert_ne!(scalar(&a, "SHOW work_mem").await, "1234kB");
    }
    // A SET rolled back never happened.
    a.batch_execute("BEGIN; SET statement_timeout = '99s'; ROLLBACK").await.unwrap();
    for _ in 0..4 {
        assert_eq!(scalar(&a, "SHOW statement_timeout").await, "12s");
    }
    a.batch_execute("RESET search_path").await.unwrap();
    assert_eq!(scalar(&a, "SHOW search_path").await, default_path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timezone_of_one_client_never_reaches_fifty_others_on_five_backends() {
    let cluster = support::cluster_async().await;
    let proxy = Proxy::standard(cluster, 5, "query_wait_timeout = \"30s\"").await;
    let tokyo = proxy.app().await;
    tokyo.batch_execute("SET TimeZone = 'Asia/Tokyo'").await.unwrap();
    let default_tz = scalar(&proxy.app().await, "SHOW TimeZone").await;
    assert_ne!(default_tz, "Asia/Tokyo");
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let port = proxy.port();
        let expected = default_tz.clone();
        tasks.push(tokio::spawn(async move {
            let mut config = tokio_postgres::Config::new();
            config.host("127.0.0.1").port(port).user(APP.0).password(APP.1).dbname(DB);
            let (c, conn) = config.connect(tokio_postgres::NoTls).await.expect("connect");
            tokio::spawn(conn);
            for _ in 0..10 {
                assert_eq!(scalar(&c, "SHOW TimeZone").await, expected);
            }
        }));
    }
    for _ in 0..50 {
        assert_eq!(scalar(&tokyo, "SHOW TimeZone").await, "Asia/Tokyo");
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_options_apply_to_the_session() {
    let cluster = support::cluster_async().await;
    let proxy = Proxy::standard(cluster, 1, "").await;
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(proxy.port())
        .user(APP.0)
        .password(APP.1)
        .dbname(DB)
        .options("-c statement_timeout=7s --lock-timeout=3s")
        .application_name("opts-test");
    let (c, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let other = proxy.app().await;
    for _ in 0..3 {
        assert_eq!(scalar(&c, "SHOW statement_timeout").await, "7s");
        assert_eq!(scalar(&c, "SHOW lock_timeout").await, "3s");
        assert_eq!(scalar(&c, "SHOW application_name").await, "opts-test");
        assert_ne!(scalar(&other, "SHOW statement_timeout").await, "7s");
        assert_ne!(scalar(&other, "SHOW application_name").await, "opts-test");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_of_departed_clients_are_closed_before_others_see_them() {
    let cluster = support::cluster_async().await;
    let proxy = Proxy::standard(cluster, 1, "").await;
    let stayer = proxy.app().await;
    let kept = stayer.prepare("SELECT 'kept'::text").await.unwrap();
    {
        let leaver = proxy.app().await;
        let st = leaver.prepare("SELECT 'gone'::text").await.unwrap();
        assert_eq!(leaver.query_one(&st, &[]).await.unwrap().get::<_, String>(0), "gone");
    }
    let observer = proxy.app().await;
    let visible = "SELECT string_agg(statement, ',' ORDER BY statement) FROM pg_prepared_statements";
    eventually(Duration::from_secs(5), "the departed client's statement closed", || async {
        !scalar(&observer, visible).await.contains("gone")
    })
    .await;
    // A statement still in use stays usable.
    assert_eq!(stayer.query_one(&kept, &[]).await.unwrap().get::<_, String>(0), "kept");
}
