//! Transaction pooling end to end against a real Postgres: protocol coverage,
//! pool behaviour, and backend hygiene when clients misbehave.

mod support;

use support::{code, scalar};

use std::time::Duration;

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use support::proxy::Proxy;
use support::raw::{Raw, bogus_header, extended_query, tags};
use support::{APP, CLEAR, DB, MD5, TRUST, eventually};
use tokio_postgres::SimpleQueryMessage;
use tokio_postgres::types::Type;

/// A table only this test touches, readable and writable by every test user.
async fn fresh_table(name: &str, rows: i32) {
    let su = support::superuser(DB).await;
    su.batch_execute(&format!(
        "DROP TABLE IF EXISTS {name}; CREATE TABLE {name} (id int PRIMARY KEY, v text);
         INSERT INTO {name} SELECT g, 'x' FROM generate_series(1, {rows}) g;
         GRANT ALL ON {name} TO PUBLIC;"
    ))
    .await
    .expect("create test table");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_multi_statement_and_extended_queries() {
    let cluster = support::cluster_async().await;
    let proxy = Proxy::standard(cluster, 2, "").await;
    let c = proxy.app().await;
    let msgs = c.simple_query("SELECT 1; SELECT 2; SELECT 3").await.unwrap();
    let rows = msgs.iter().filter(|m| matches!(m, SimpleQueryMessage::Row(_))).count();
    assert_eq!(rows, 3);
    let row = c.query_typed_one("SELECT $1::int + 1", &[(&41i32, Type::INT4)]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    // Empty query string: EmptyQueryResponse + ReadyForQuery, no rows.
    let msgs = c.simple_query("").await.unwrap();
    assert!(!msgs.iter().any(|m| matches!(m, SimpleQueryMessage::Row(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_keeps_its_backend_and_clients_share_backends_between_transactions() {
    let cluster = support::cluster_async().await;
    let proxy = Proxy::standard(cluster, 1, "").await;
    let (a, b) = (proxy.app().await, proxy.app().await);
    a.batch_execute("BEGIN").await.unwrap();
    let pid_in_txn = scalar(&a, "SELECT pg_backend_pid()").await;
    assert_eq!(scalar(&a, "SELECT pg_backend_pid()").await, pid_in_txn);
    a.batch_execute("COMMIT").await.unwrap();
    // One backend for two clients: both see the same server process.
    assert_eq!(scalar(&b, "SELECT pg_backend_pid()").await, pid_in_txn);
    assert_eq!(scalar(&a, "SELECT pg_backend_pid()").await, pid_in_txn);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_inside_transaction_keeps_the_backend_until_rollback() {
    let cluster = support::cluster_async().await;
    let proxy = Proxy::standard(cluster, 2, "").await;
    let c = proxy.app().await;
    c.batch_execute("BEGIN").await.unwrap();
    assert_eq!(code(&c.simple_query("SELECT 1/0").await.unwrap_err()), "22012");
    // Still the same aborted transaction: proof the backend was not swapped.
    assert_eq!(code(&c.simple_query("SELECT 1").await.unwrap_err()), "25P02");
    c.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(scalar(&c, "SELECT 7").await, "7");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_extended_queries_with_an_error_in_the_middle() {
    let cluster = support::cluster_async().await;
    let proxy = Proxy::standard(cluster, 2, "").await;
    let mut raw = Raw::login(proxy.addr, TRUST, DB).await;
    let mut out = BytesMut::new();
    extended_query(&mut out, "SELECT 1");
    extended_query(&mut out, "SELECT 1/0");
    extended_query(&mut out, "SELECT 3");
    raw.send(&out).await;
    assert_eq!(tags(&raw.until_ready().await), "12DCZ");
    let second = raw.until_ready().await;
    // Parsed fine; the division fails when planned at Bind.
    assert_eq!(tags(&second), "1EZ");
    assert_eq!(second[1].error().code, "22012");
    let third = raw.until_ready().await;
    assert_eq!(tags(&third), "12DCZ");
    assert_eq!(&third.last().unwrap().body[..], b"I");

    // Several executes under one Sync, sent in one write.
    let mut out = BytesMut::new();
    frontend::parse("", "SELECT 5", std::iter::empty(), &mut out).unwrap();
    out.extend_from_slice(&[b'B', 0, 0, 0, 12, 0, 0, 0, 0, 0, 0, 0, 0]);
    frontend::execute("", 0, &mut out).unwrap();
    out.extend_from_slice(&[b'B', 0, 0, 0, 12, 0, 0, 0, 0, 0, 0, 0, 0]);
    frontend::execute("", 0, &mut out).unwrap();
    frontend::flush(&mut out);
    frontend::sync(&mut out);
    raw.send(&out).await;
    assert_eq!(tags(&raw.until_ready().await), "12DC2DCZ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_wait_timeout_answers_53300_and_the_client_survives() {
    let cluster = support::cluster_async().await;
    let proxy = Proxy::standard(cluster, 1, r#"query_wait_timeout = "200ms""#).await;
    let (holder, waiter) = (proxy.app().await, proxy.app().await);
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let asked = std::time::Instant::now();
    let err = waiter.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(code(&err), "53300", "{err}");
    // Never before the timeout; late by at most the waiter sweep's period
    // (100 ms) plus scheduling.
    let waited = asked.elapsed();
    assert!(waited >= Duration::from_millis(200) && waited < Duration::from_secs(2), "{waited:?}");
    // The same for the extended protocol.
    let err = waiter.query_typed("SELECT 1", &[]).await.unwrap_err();
    assert_eq!(code(&err), "53300", "{err}");
    holder.batch_execute("COMMIT").await.unwrap();
    assert_eq!(scalar(&waiter, "SELECT 2").await, "2");
}

/// `query_wait_timeout = 0` disables the limit, as in PgBouncer (and as 0
/// does for pgmux's other timeouts): a request waits as long as it takes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_query_wait_timeout_waits_without_limit() {
    let cluster = support::cluster_async().await;
    let proxy = Proxy::standard(cluster, 1, "query_wait_timeout = 0").await;
    let (holder, waiter) = (proxy.app().await, proxy.app().await);
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let asked = std::time::Instant::now();
    let query = tokio::spawn(async move { waiter.simple_query("SELECT 2").await.map(|_| waiter) });
    // Held well past several waiter sweeps (100 ms apart): a zero timeout
    // that meant "at once" would have failed the wait by now.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!query.is_finished(), "the waiting request was answered while no backend was free");
    holder.batch_execute("COMMIT").await.unwrap();
    let waiter = query.await.unwrap().expect("the request waits for the backend, then runs");
    assert!(asked.elapsed() >= Duration::from_millis(600));
    assert_eq!(scalar(&waiter, "SELECT 3").await, "3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_failures_carry_the_right_sqlstate() {
    let cluster = support::cluster_async().await;
    let proxy = Proxy::standard(cluster, 2, "").await;
    let err = proxy.connect(APP.0, Some("wrong"), DB).await.unwrap_err();
    assert_eq!(code(&err), "28P01");
    let text = err.as_db_error().map(|d| d.message().to_owned()).unwrap_or_default();
    assert_eq!(text, "password authentication failed for user \"app\"");
    let err = proxy.connect(MD5.0, Some("wrong"), DB).await.unwrap_err();
    assert_eq!(code(&err), "28P01");
    // An unknown user is answered as a wrong password: nothing tells which names exist.
    let err = proxy.connect("nobody", Some("x"), DB).await.unwrap_err();
    assert_eq!(code(&err), "28P01");
    let text = err.as_db_error().map(|d| d.message().to_owned()).unwrap_or_default();
    assert_eq!(text, "password authentication failed for user \"nobody\"");
    // As Postgres itself answers a role that does not exist.
    let direct = support::connect(cluster.primary(), "nobody", Some("x"), DB).await.map(drop).unwrap_err();
    assert_eq!((code(&direct), direct.as_db_error().map(|d| d.message().to_owned())), (code(&err), Some(text)));
    let err = proxy.connect(APP.0, Some(APP.1), "nodb").await.unwrap_err();
    assert_eq!(code(&err), "3D000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_auth_method_on_both_sides() {
    let cluster = support::cluster_async().await;
    let proxy = Proxy::standard(cluster, 2, "").await;
    // Client side: scram (app), md5 (md5user), scram with a cleartext backend (clearuser), trust.
    for (user, pw) in [(APP.0, Some(APP.1)), (MD5.0, Some(MD5.1)), (CLEAR.0, Some(CLEAR.1)), (TRUST, None)] {
        let c = proxy.connect(user, pw, DB).await.unwrap_or_else(|e| panic!("{user}: {e}"));
        assert_eq!(scalar(&c, "SELECT current_user").await, user);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_killed_idle_in_transaction_frees_its_row_lock() {
    let cluster = support::cluster_async().await;
    fresh_table("lock_kill", 1).await;
    let proxy = Proxy::standard(cluster, 2, "").await;
    let mut raw = Raw::login(proxy.addr, TRUST, DB).await;
    let msgs = raw.simple_query("BEGIN; SELECT * FROM lock_kill WHERE id = 1 FOR UPDATE").await;
    assert_eq!(&msgs.last().unwrap().body[..], b"T");
    let su = support::superuser(DB).await;
    assert_eq!(
        code(&su.simple_query("SELECT * FROM lock_kill WHERE id = 1 FOR UPDATE NOWAIT").await.unwrap_err()),
        "55P03"
    );
    drop(raw); // abrupt close, no Terminate
    let started = tokio::time::Instant::now();
    eventually(Duration::from_secs(1), "row lock released", || async {
        su.simple_query("SELECT * FROM lock_kill WHERE id = 1 FOR UPDATE NOWAIT").await.is_ok()
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_killed_mid_query_gets_its_backend_cancelled_and_reused() {
    let cluster = support::cluster_async().await;
    let proxy = Proxy::standard(cluster, 1, "").await;
    let mut raw = Raw::login(proxy.addr, TRUST, "postgres").await;
    let mut out = BytesMut::new();
    frontend::query("SELECT pg_sleep(60) /* kill-me */", &mut out).unwrap();
    raw.send(&out).await;
    let su = support::superuser(DB).await;
    let running = "SELECT pid FROM pg_stat_activity WHERE query LIKE '%kill-me%' AND state = 'active' AND pid <> pg_backend_pid()";
    eventually(Duration::from_secs(5), "pg_sleep running", || async {
        su.simple_query(running).await.unwrap().iter().any(|m| matches!(m, SimpleQueryMessage::Row(_)))
    })
    .await;
    let sleeper_pid = scalar(&su, running).await;
    drop(raw);
    eventually(Duration::from_secs(3), "pg_sleep cancelled", || async {
        !su.simple_query(running).await.unwrap().iter().any(|m| matches!(m, SimpleQueryMessage::Row(_)))
    })
    .await;
    // The pool has one backend: the next client gets the same, cleaned one.
    let next = proxy.connect(TRUST, None, "postgres").await.unwrap();
    assert_eq!(scalar(&next, "SELECT pg_backend_pid()").await, sleeper_pid);
    assert_eq!(scalar(&next, "SELECT txid_current_if_assigned() IS NULL").await, "t");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_idle_backend_is_replaced_unnoticed() {
    let cluster = support::cluster_async().await;
    let proxy = Proxy::standard(cluster, 1, "").await;
    let c = proxy.connect(CLEAR.0, Some(CLEAR.1), DB).await.unwrap();
    let pid = scalar(&c, "SELECT pg_backend_pid()").await;
    let su = support::superuser(DB).await;
    assert_eq!(scalar(&su, &format!("SELECT pg_terminate_backend({pid})")).await, "t");
    eventually(Duration::from_secs(5), "backend gone", || async {
        scalar(&su, &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}")).await == "0"
    })
    .await;
    let new_pid = scalar(&c, "SELECT pg_backend_pid()").await;
    assert_ne!(new_pid, pid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_killed_mid_transaction_errors_that_client_only() {
    let cluster = support::cluster_async().await;
    let proxy = Proxy::standard(cluster, 2, "").await;
    let (victim, bystander) = (proxy.connect(MD5.0, Some(MD5.1), DB).await.unwrap(), proxy.app().await);
    victim.batch_execute("BEGIN").await.unwrap();
    let pid = scalar(&victim, "SELECT pg_backend_pid()").await;
    let su = support::superuser(DB).await;
    su.simple_query(&format!("SELECT pg_terminate_backend({pid})")).await.unwrap();
    let err = victim.simple_query("SELECT 1").await.unwrap_err();
    assert!(err.as_db_error().is_some() || victim.is_closed(), "victim sees an error: {err}");
    assert_eq!(scalar(&bystander, "SELECT 1").await, "1");
    // A new connection for the same user gets a fresh backend.
    let again = proxy.connect(MD5.0, Some(MD5.1), DB).await.unwrap();
    assert_ne!(scalar(&again, "SELECT pg_backend_pid()").await, pid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_request_reaches_the_running_query() {
    let cluster = support::cluster_async().await;
    let proxy = Proxy::standard(cluster, 2, "").await;
    let c = proxy.app().await;
    let token = c.cancel_token();
    let started = tokio::time::Instant::now();
    let sleeper = tokio::spawn(async move {
        let r = c.simple_query("SELECT pg_sleep(20) /* cancel-me */").await.map(|_| ());
        (r, c)
    });
    let su = support::superuser(DB).await;
    eventually(Duration::from_secs(5), "pg_sleep running", || async {
        scalar(&su, "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%cancel-me%' AND state = 'active' AND pid <> pg_backend_pid()").await == "1"
    })
    .await;
    token.cancel_query(tokio_postgres::NoTls).await.expect("cancel through pgmux");
    let (result, c) = sleeper.await.unwrap();
    assert_eq!(code(&result.unwrap_err()), "57014");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(scalar(&c, "SELECT 1").await, "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out_of_10_megabytes() {
    use futures_util::{SinkExt, StreamExt};
    let cluster = support::cluster_async().await;
    fresh_table("copy_big", 0).await;
    let proxy = Proxy::standard(cluster, 2, "").await;
    let mut c = proxy.app().await;
    let payload = "y".repeat(1000);
    let rows = 10_000;
    let tx = c.transaction().await.unwrap();
    let sink = tx.copy_in("COPY copy_big (id, v) FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    let mut sent = 0usize;
    for chunk in 0..100 {
        let mut data = String::new();
        for i in 0..rows / 100 {
            data.push_str(&format!("{}\t{payload}\n", chunk * (rows / 100) + i + 1));
        }
        sent += data.len();
        sink.send(bytes::Bytes::from(data)).await.unwrap();
    }
    assert_eq!(sink.finish().await.unwrap(), rows as u64);
    tx.commit().await.unwrap();
    assert!(sent >= 10_000_000);
    let tx = c.transaction().await.unwrap();
    let stream = tx.copy_out("COPY copy_big TO STDOUT").await.unwrap();
    futures_util::pin_mut!(stream);
    let mut received = 0usize;
    while let Some(chunk) = stream.next().await {
        received += chunk.unwrap().len();
    }
    tx.commit().await.unwrap();
    assert_eq!(received, sent);
    assert_eq!(scalar(&c, "SELECT count(*) FROM copy_big").await, rows.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_gets_08p01_and_others_keep_working() {
    let cluster = support::cluster_async().await;
    let proxy = Proxy::standard(cluster, 2, "").await;
    // A startup packet claiming 2 GiB: closed without a word, as by Postgres
    // (tests/protocol_safety.rs compares).
    let mut raw = Raw::connect(proxy.addr).await;
    raw.send(&[0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0]).await;
    let msgs = raw.until_closed().await;
    assert_eq!(tags(&msgs), "");
    // After login: a message with an absurd length, and one with a length below 4.
    for header in [bogus_header(b'Q', 0x7fff_ffff), bogus_header(b'Q', 2)] {
        let mut raw = Raw::login(proxy.addr, TRUST, DB).await;
        raw.send(&header).await;
        let msgs = raw.until_closed().await;
        assert_eq!(tags(&msgs), "E");
        assert_eq!(msgs[0].error().code, "08P01");
    }
    let c = proxy.app().await;
    assert_eq!(scalar(&c, "SELECT 1").await, "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_request_declined_and_newer_protocol_negotiated_down() {
    let cluster = support::cluster_async().await;
    let proxy = Proxy::standard(cluster, 2, "").await;
    let mut raw = Raw::connect(proxy.addr).await;
    raw.send(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await;
    let mut answer = [0u8; 1];
    tokio::io::AsyncReadExt::read_exact(&mut raw.stream, &mut answer).await.unwrap();
    assert_eq!(&answer, b"N");
    // Protocol 3.2 with an unknown _pq_ option.
    let mut body = BytesMut::new();
    body.extend_from_slice(&(3i32 << 16 | 2).to_be_bytes());
    for s in ["user", TRUST, "database", DB, "_pq_.frobnicate", "on", ""] {
        body.extend_from_slice(s.as_bytes());
        body.extend_from_slice(&[0]);
    }
    let mut packet = BytesMut::new();
    packet.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    packet.extend_from_slice(&body);
    raw.send(&packet).await;
    let msgs = raw.until_ready().await;
    assert_eq!(msgs[0].tag, b'v');
    assert_eq!(&msgs[0].body[..8], &[0, 0, 0, 0, 0, 0, 0, 1]);
    assert!(msgs[0].body.ends_with(b"_pq_.frobnicate\0"));
    assert!(msgs.iter().any(|m| m.tag == b'K'));
    assert_eq!(tags(&raw.simple_query("SELECT 1").await), "TDCZ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_holds_the_backend_for_the_whole_session() {
    let cluster = support::cluster_async().await;
    let proxy = Proxy::standard(cluster, 1, "pool_mode = \"session\"\nquery_wait_timeout = \"300ms\"").await;
    let a = proxy.app().await;
    a.batch_execute("SET application_name = 'session-a'").await.unwrap();
    let pid = scalar(&a, "SELECT pg_backend_pid()").await;
    let b = proxy.app().await;
    assert_eq!(code(&b.simple_query("SELECT 1").await.unwrap_err()), "53300");
    assert_eq!(scalar(&a, "SELECT pg_backend_pid()").await, pid);
    drop(a);
    eventually(Duration::from_secs(5), "backend handed to the next session", || async {
        b.simple_query("SELECT 1").await.is_ok()
    })
    .await;
    assert_eq!(scalar(&b, "SELECT pg_backend_pid()").await, pid);
    assert_ne!(scalar(&b, "SHOW application_name").await, "session-a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_in_transaction_timeout_disconnects_and_frees_the_backend() {
    let cluster = support::cluster_async().await;
    fresh_table("idle_timeout", 1).await;
    let proxy = Proxy::standard(cluster, 1, "idle_transaction_timeout = \"300ms\"").await;
    let c = proxy.app().await;
    c.batch_execute("BEGIN; SELECT * FROM idle_timeout WHERE id = 1 FOR UPDATE").await.unwrap();
    eventually(Duration::from_secs(5), "idle client disconnected", || async { c.is_closed() }).await;
    let other = proxy.app().await;
    assert_eq!(scalar(&other, "SELECT count(*) FROM idle_timeout WHERE id = 1").await, "1");
    let su = support::superuser(DB).await;
    su.simple_query("SELECT * FROM idle_timeout WHERE id = 1 FOR UPDATE NOWAIT").await.expect("lock released");
}

/// The idle-in-transaction clock starts when the server has answered, not
/// when the client asked: a query running longer than the timeout must not
/// get its client closed the moment it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_longer_than_idle_transaction_timeout_is_not_idleness() {
    let cluster = support::cluster_async().await;
    let proxy = Proxy::standard(cluster, 1, "idle_transaction_timeout = \"400ms\"").await;
    let c = proxy.app().await;
    c.batch_execute("BEGIN; SELECT pg_sleep(0.8)").await.unwrap();
    assert_eq!(scalar(&c, "SELECT 41 + 1").await, "42", "the transaction goes on after the long query");
    c.batch_execute("COMMIT").await.unwrap();
    // Real idleness still ends it.
    c.batch_execute("BEGIN").await.unwrap();
    eventually(Duration::from_secs(5), "idle client disconnected", || async { c.is_closed() }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_client_conn_refuses_the_extra_client() {
    let cluster = support::cluster_async().await;
    let proxy = Proxy::standard(cluster, 2, "max_client_conn = 2").await;
    let (_a, _b) = (proxy.app().await, proxy.app().await);
    let err = proxy.connect(APP.0, Some(APP.1), DB).await.unwrap_err();
    assert_eq!(code(&err), "53300");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_clients_set_never_shows_in_anothers_session() {
    let cluster = support::cluster_async().await;
    let proxy = Proxy::standard(cluster, 1, "").await;
    let (a, b) = (proxy.app().await, proxy.app().await);
    let default_tz = scalar(&b, "SHOW TimeZone").await;
    a.batch_execute("SET TimeZone = 'Asia/Tokyo'").await.unwrap();
    assert_eq!(scalar(&b, "SHOW TimeZone").await, default_tz);
    assert_eq!(scalar(&a, "SHOW TimeZone").await, "Asia/Tokyo");
    assert_eq!(scalar(&b, "SHOW TimeZone").await, default_tz);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_open_transactions_finish_then_closes_with_57p01() {
    let cluster = support::cluster_async().await;
    fresh_table("shutdown_drain", 0).await;
    let mut proxy = Proxy::standard(cluster, 2, "shutdown_timeout = \"10s\"").await;
    let (busy, idle) = (proxy.app().await, proxy.app().await);
    busy.batch_execute("BEGIN; INSERT INTO shutdown_drain VALUES (1, 'kept')").await.unwrap();
    proxy.begin_shutdown();
    eventually(Duration::from_secs(5), "idle client closed", || async { idle.is_closed() }).await;
    assert!(proxy.connect(APP.0, Some(APP.1), DB).await.is_err(), "new clients refused");
    busy.batch_execute("COMMIT").await.expect("open transaction finishes");
    proxy.wait_stopped().await;
    assert!(busy.simple_query("SELECT 1").await.is_err());
    let su = support::superuser(DB).await;
    assert_eq!(scalar(&su, "SELECT v FROM shutdown_drain WHERE id = 1").await, "kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_split_across_reads_is_reassembled() {
    let cluster = support::cluster_async().await;
    let proxy = Proxy::standard(cluster, 1, "").await;
    let mut raw = Raw::login(proxy.addr, TRUST, DB).await;
    let sql = format!("SELECT '{}' AS long_literal", "x".repeat(5000));
    let mut out = BytesMut::new();
    frontend::query(&sql, &mut out).unwrap();
    // Header and a little body first, the rest later: pgmux must wait for the
    // whole Query before it takes (and keeps) a backend.
    raw.send(&out[..20]).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    raw.send(&out[20..]).await;
    let msgs = raw.until_ready().await;
    assert_eq!(tags(&msgs), "TDCZ");
    assert!(msgs[1].body.ends_with(&b"x".repeat(5000)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_killed_mid_copy_leaves_nothing_behind() {
    let cluster = support::cluster_async().await;
    fresh_table("copy_kill", 0).await;
    let proxy = Proxy::standard(cluster, 1, "").await;
    let mut raw = Raw::login(proxy.addr, TRUST, DB).await;
    let mut out = BytesMut::new();
    frontend::query("COPY copy_kill (id, v) FROM STDIN", &mut out).unwrap();
    raw.send(&out).await;
    assert_eq!(raw.recv().await.unwrap().tag, b'G');
    let mut out = BytesMut::new();
    let data = b"1\tone\n2\ttwo\n";
    out.extend_from_slice(b"d");
    out.extend_from_slice(&((data.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(data);
    raw.send(&out).await;
    drop(raw); // mid-COPY, no CopyDone
    // The single backend comes back clean: usable, and the COPY never committed.
    let c = proxy.connect(TRUST, None, DB).await.unwrap();
    eventually(Duration::from_secs(5), "backend recovered", || async { c.simple_query("SELECT 1").await.is_ok() })
        .await;
    assert_eq!(scalar(&c, "SELECT count(*) FROM copy_kill").await, "0");
    assert_eq!(scalar(&c, "SELECT txid_current_if_assigned() IS NULL").await, "t");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_lifetime_recycles_backends() {
    let cluster = support::cluster_async().await;
    let proxy = Proxy::standard(cluster, 1, "server_lifetime = \"300ms\"").await;
    let c = proxy.connect(CLEAR.0, Some(CLEAR.1), "postgres").await.unwrap();
    let first = scalar(&c, "SELECT pg_backend_pid()").await;
    eventually(Duration::from_secs(5), "a new backend after server_lifetime", || async {
        scalar(&c, "SELECT pg_backend_pid()").await != first
    })
    .await;
}
