//! Protocol corners where a pooler can lose data or let one client's bytes
//! reach another: each sequence is sent directly to Postgres and through
//! pgmux (with read/write splitting off and on), and the answers and the
//! data left behind must be the same.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use pgmux::cluster::Cluster;
use postgres_protocol::message::frontend;
use support::proxy::{Proxy, standard_config};
use support::raw::{Msg, Raw, tags};
use support::{DB, TRUST, eventually, scalar};
use tokio::io::AsyncReadExt;

/// A table only this test touches.
async fn fresh_table(name: &str) {
    let su = support::superuser(DB).await;
    su.batch_execute(&format!(
        "DROP TABLE IF EXISTS {name}; CREATE TABLE {name} (id int PRIMARY KEY); GRANT ALL ON {name} TO PUBLIC;"
    ))
    .await
    .expect("create test table");
}

/// The standard config, with the shared cluster's replica added to `app`
/// (read/write splitting on, the default).
fn routed_config(cluster: &Cluster, pool_size: usize, extra: &str) -> String {
    let primary = format!("primary = \"{}\"", cluster.primary().host_port());
    let with_replica = format!("{primary}\nreplicas = [\"{}\"]", cluster.replicas()[0].host_port());
    standard_config(cluster, pool_size, extra).replacen(&primary, &with_replica, 1)
}

/// Where a sequence is sent: Postgres itself, pgmux, pgmux with a replica.
struct Targets {
    direct: SocketAddr,
    plain: Proxy,
    routed: Proxy,
}

impl Targets {
    async fn start(pool_size: usize) -> Targets {
        let cluster = support::cluster_async().await;
        let routed = Proxy::start(&routed_config(cluster, pool_size, "")).await;
        // Reads reach the replica only once its monitor has seen it healthy.
        let mut probe = Raw::login(routed.addr, TRUST, DB).await;
        let mut on_replica = false;
        for _ in 0..500 {
            // (pg_is_in_recovery() alone is routed to the primary on purpose.)
            let m = probe.simple_query("/* pgmux:replica */ SELECT pg_is_in_recovery()").await;
            if m.iter().any(|m| m.tag == b'D' && m.body.ends_with(b"t")) {
                on_replica = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(on_replica, "reads never reached the replica");
        Targets { direct: cluster.primary().addr(), plain: Proxy::standard(cluster, pool_size, "").await, routed }
    }

    fn all(&self) -> [(&'static str, SocketAddr); 3] {
        [("direct", self.direct), ("pgmux", self.plain.addr), ("pgmux+replica", self.routed.addr)]
    }
}

fn parse(out: &mut BytesMut, name: &str, sql: &str) {
    frontend::parse(name, sql, std::iter::empty(), out).unwrap();
}

/// Bind of statement `name` to the unnamed portal, no parameters.
fn bind(out: &mut BytesMut, name: &str) {
    out.put_u8(b'B');
    out.put_u32((4 + 1 + name.len() + 1 + 2 + 2 + 2) as u32);
    out.put_u8(0);
    out.put_slice(name.as_bytes());
    out.put_slice(&[0, 0, 0, 0, 0, 0, 0]);
}

fn execute(out: &mut BytesMut) {
    frontend::execute("", 0, out).unwrap();
}

fn flush(out: &mut BytesMut) {
    frontend::flush(out);
}

fn sync(out: &mut BytesMut) {
    frontend::sync(out);
}

fn query(out: &mut BytesMut, sql: &str) {
    frontend::query(sql, out).unwrap();
}

/// Reads messages until one with `tag` (included).
async fn until_tag(raw: &mut Raw, tag: u8) -> Vec<Msg> {
    let mut got = Vec::new();
    loop {
        let m = raw.recv().await.unwrap_or_else(|| panic!("closed before '{}': {}", tag as char, tags(&got)));
        let done = m.tag == tag;
        got.push(m);
        if done {
            return got;
        }
    }
}

/// How a client leaves.
#[derive(Debug, Clone, Copy)]
enum Leave {
    Close,
    Terminate,
    /// Reset: SO_LINGER 0, so the close sends RST.
    Reset,
}

async fn leave(mut raw: Raw, how: Leave) {
    match how {
        Leave::Close => drop(raw),
        Leave::Terminate => {
            let mut out = BytesMut::new();
            frontend::terminate(&mut out);
            raw.send(&out).await;
            drop(raw);
        }
        Leave::Reset => {
            // A zero linger cannot block the drop (the deprecation's concern): it sends RST at once.
            #[allow(deprecated)]
            raw.stream.set_linger(Some(Duration::ZERO)).unwrap();
            drop(raw);
        }
    }
}

/// Waits until no server process is still working on `table`'s statements
/// (the abandoned session ended, or pgmux cleaned the backend up).
async fn settled(table: &str) {
    let su = support::superuser(DB).await;
    let sql = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%{table}%' AND pid <> pg_backend_pid() \
         AND (state <> 'idle' OR backend_xid IS NOT NULL)"
    );
    eventually(Duration::from_secs(10), "the abandoned session to settle", || {
        let (su, sql) = (&su, &sql);
        async move { scalar(su, sql).await == "0" }
    })
    .await;
}

async fn rows(table: &str) -> String {
    scalar(&support::superuser(DB).await, &format!("SELECT count(*) FROM {table}")).await
}

/// A name, what the client sends (given its table), and the answer it waits
/// for before it leaves.
type Scenario = (&'static str, fn(&mut BytesMut, &str), u8);

/// Every way a client can leave with work it did not commit: nothing of it
/// is ever committed, as directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_never_gets_uncommitted_work_committed() {
    let t = Targets::start(2).await;
    let scenarios: [Scenario; 4] = [
        // Parse/Bind/Execute of an INSERT, no Sync: an implicit transaction.
        (
            "implicit",
            |out, table| {
                parse(out, "", &format!("INSERT INTO {table} VALUES (1)"));
                bind(out, "");
                execute(out);
                flush(out);
            },
            b'C',
        ),
        // A pipeline: BEGIN, a synced INSERT, then an unsynced one.
        (
            "pipeline",
            |out, table| {
                query(out, "BEGIN");
                parse(out, "", &format!("INSERT INTO {table} VALUES (1)"));
                bind(out, "");
                execute(out);
                sync(out);
                parse(out, "", &format!("INSERT INTO {table} VALUES (2)"));
                bind(out, "");
                execute(out);
                flush(out);
            },
            b'C',
        ),
        // Inside an explicit transaction.
        ("begin", |out, table| query(out, &format!("BEGIN; INSERT INTO {table} VALUES (1)")), b'Z'),
        // Mid-COPY FROM STDIN, rows sent, no CopyDone.
        ("copy", |out, table| query(out, &format!("COPY {table} FROM STDIN")), b'G'),
    ];
    for (scenario, write, wait_for) in scenarios {
        for how in [Leave::Close, Leave::Terminate, Leave::Reset] {
            for (target, addr) in t.all() {
                let table = format!("leave_{scenario}_{how:?}").to_lowercase();
                fresh_table(&table).await;
                let mut raw = Raw::login(addr, TRUST, DB).await;
                let mut out = BytesMut::new();
                write(&mut out, &table);
                raw.send(&out).await;
                until_tag(&mut raw, wait_for).await;
                if scenario == "copy" {
                    let mut out = BytesMut::new();
                    frontend::CopyData::new(&b"1\n2\n"[..]).unwrap().write(&mut out);
                    raw.send(&out).await;
                }
                leave(raw, how).await;
                settled(&table).await;
                assert_eq!(rows(&table).await, "0", "{scenario}, {how:?}, {target}: uncommitted rows were committed");
            }
        }
    }
}

/// A Query followed in the same packet by a message of an invalid type:
/// the client gets the Query's answer, then the FATAL Postgres sends; the
/// next client on the same backend never sees any of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_message_type_ends_that_client_only() {
    let t = Targets::start(1).await;
    let mut answers = Vec::new();
    for (target, addr) in t.all() {
        let mut out = BytesMut::new();
        query(&mut out, "SELECT 1");
        out.put_slice(&[b'r', 0, 0, 0, 4]);
        let mut raw = Raw::login(addr, TRUST, DB).await;
        raw.send(&out).await;
        let msgs = raw.until_closed().await;
        let fatal = msgs.last().expect("an answer").error();
        assert_eq!((fatal.code.as_str(), fatal.message.as_str()), ("08P01", "invalid frontend message type 114"));
        answers.push((target, tags(&msgs)));
        if target == "direct" {
            continue;
        }
        // Round after round on a pool of one, the next client is untouched.
        let next = Raw::login(addr, TRUST, DB).await;
        let mut next = next;
        for round in 0..20 {
            let mut bad = Raw::login(addr, TRUST, DB).await;
            bad.send(&out).await;
            let m = next.simple_query("SELECT 2").await;
            assert_eq!(tags(&m), "TDCZ", "{target}, round {round}: the next client's query failed: {m:?}");
            assert!(bad.until_closed().await.last().is_some_and(|m| m.tag == b'E'));
        }
    }
    assert!(answers.iter().all(|(_, a)| *a == answers[0].1), "answers differ from Postgres's: {answers:?}");
}

/// A Flush with a body: Postgres answers 08P01 and skips to the next Sync.
/// pgmux answers the same and keeps the server connection until that Sync;
/// clients that leave instead cost no pool slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_flush_is_answered_as_postgres_does_and_loses_no_backend() {
    let t = Targets::start(1).await;
    let bad_flush = [b'H', 0, 0, 0, 8, b'a', b'b', b'c', b'd'];
    let mut answers = Vec::new();
    for (target, addr) in t.all() {
        let mut raw = Raw::login(addr, TRUST, DB).await;
        raw.send(&bad_flush).await;
        let mut out = BytesMut::new();
        query(&mut out, "SELECT 1");
        sync(&mut out);
        raw.send(&out).await;
        // Error for the Flush; the Query is skipped; the Sync's ReadyForQuery.
        let msgs = raw.until_ready().await;
        assert_eq!(msgs[0].error().code, "08P01", "{target}");
        answers.push((target, tags(&msgs)));
        assert_eq!(tags(&raw.simple_query("SELECT 1").await), "TDCZ", "{target}: usable after the Sync");
        if target == "direct" {
            continue;
        }
        // Ten clients send it and leave: the pool of one still serves writes.
        for _ in 0..10 {
            let mut bad = Raw::login(addr, TRUST, DB).await;
            bad.send(&bad_flush).await;
            assert_eq!(bad.recv().await.expect("the error").error().code, "08P01");
            drop(bad);
        }
        fresh_table("malformed_flush").await;
        let c = tokio::time::timeout(Duration::from_secs(10), async {
            let mut c = Raw::login(addr, TRUST, DB).await;
            c.simple_query("INSERT INTO malformed_flush VALUES (1)").await
        })
        .await
        .unwrap_or_else(|_| panic!("{target}: the pool of one was lost"));
        assert_eq!(tags(&c), "CZ", "{target}");
    }
    assert!(answers.iter().all(|(_, a)| *a == answers[0].1), "answers differ from Postgres's: {answers:?}");
}

/// asyncpg prepares with Parse + Describe + Flush and waits for the answer
/// before it sends Bind/Execute/Sync: that must work with routing on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_ended_by_flush_is_answered_with_routing_on() {
    let t = Targets::start(2).await;
    for (target, addr) in t.all() {
        let mut raw = Raw::login(addr, TRUST, DB).await;
        let mut out = BytesMut::new();
        parse(&mut out, "s1", "SELECT 41 + 1");
        frontend::describe(b'S', "s1", &mut out).unwrap();
        flush(&mut out);
        raw.send(&out).await;
        let got = tokio::time::timeout(Duration::from_secs(5), until_tag(&mut raw, b'T'))
            .await
            .unwrap_or_else(|_| panic!("{target}: no answer to Parse/Describe/Flush"));
        assert_eq!(tags(&got), "1tT", "{target}");
        let mut out = BytesMut::new();
        bind(&mut out, "s1");
        execute(&mut out);
        sync(&mut out);
        raw.send(&out).await;
        let got = raw.until_ready().await;
        assert_eq!(tags(&got), "2DCZ", "{target}");
        assert_eq!(&got[1].body[6..8], b"42");
    }
}

/// A failed Parse makes Postgres skip everything up to Sync, a Query
/// included: the answer is the error and one ReadyForQuery, and the backend
/// goes back to the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_after_a_failed_parse_is_skipped_and_the_backend_returns() {
    let t = Targets::start(1).await;
    let mut answers = Vec::new();
    for (target, addr) in t.all() {
        let mut raw = Raw::login(addr, TRUST, DB).await;
        let mut out = BytesMut::new();
        parse(&mut out, "", "SELEC nonsense");
        query(&mut out, "SELECT 1");
        sync(&mut out);
        raw.send(&out).await;
        let msgs = raw.until_ready().await;
        assert_eq!(msgs[0].error().code, "42601", "{target}");
        answers.push((target, tags(&msgs)));
        if target != "direct" {
            // The single backend is free for another client while this one idles.
            let mut other = Raw::login(addr, TRUST, DB).await;
            let m = tokio::time::timeout(Duration::from_secs(5), other.simple_query("SELECT 1"))
                .await
                .unwrap_or_else(|_| panic!("{target}: the backend stayed with the idle client"));
            assert_eq!(tags(&m), "TDCZ");
        }
        assert_eq!(tags(&raw.simple_query("SELECT 1").await), "TDCZ");
    }
    assert!(answers.iter().all(|(_, a)| *a == answers[0].1), "answers differ from Postgres's: {answers:?}");
}

/// Parse of a name the client already has fails with 42P05 and keeps the
/// first statement, as directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parsing_an_existing_statement_name_fails_and_keeps_the_first() {
    let t = Targets::start(2).await;
    let mut answers = Vec::new();
    for (target, addr) in t.all() {
        let mut raw = Raw::login(addr, TRUST, DB).await;
        let mut out = BytesMut::new();
        parse(&mut out, "dup", "SELECT 1");
        sync(&mut out);
        parse(&mut out, "dup", "SELECT 2");
        sync(&mut out);
        bind(&mut out, "dup");
        execute(&mut out);
        sync(&mut out);
        raw.send(&out).await;
        let mut msgs = raw.until_ready().await;
        let second = raw.until_ready().await;
        let err = second[0].error();
        assert_eq!(
            (err.code.as_str(), err.message.as_str()),
            ("42P05", "prepared statement \"dup\" already exists"),
            "{target}"
        );
        let third = raw.until_ready().await;
        assert_eq!(&third[1].body[6..7], b"1", "{target}: the first statement is kept");
        msgs.extend(second);
        msgs.extend(third);
        answers.push((target, tags(&msgs)));
    }
    assert!(answers.iter().all(|(_, a)| *a == answers[0].1), "answers differ from Postgres's: {answers:?}");
}

/// A server connection terminated mid-query. Directly, the client gets the
/// server's FATAL 57P01 and the connection closes. Through pgmux (README
/// "Failover"), the client gets the same SQLSTATE and message as an ERROR,
/// then ReadyForQuery, and keeps its connection: its next query runs on
/// another server connection. With or without routing, the same answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_server_connection_costs_the_client_its_query_not_its_connection() {
    let t = Targets::start(2).await;
    let su = support::superuser(DB).await;
    let mut answers = Vec::new();
    for (target, addr) in t.all() {
        let mut raw = Raw::login(addr, TRUST, DB).await;
        let mut out = BytesMut::new();
        let marker = format!("fatal_last_{}", target.replace(['+', '-'], "_"));
        query(&mut out, &format!("/* pgmux:primary */ SELECT pg_sleep(30) AS {marker}"));
        raw.send(&out).await;
        let sql = format!("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE '%AS {marker}'");
        eventually(Duration::from_secs(10), "the query to be terminated", || {
            let (su, sql) = (&su, &sql);
            async move { scalar(su, &format!("SELECT count(*) FROM ({sql}) t WHERE pg_terminate_backend")).await == "1" }
        })
        .await;
        if target == "direct" {
            let msgs = raw.until_closed().await;
            let err = msgs.last().unwrap().error();
            assert_eq!((err.code.as_str(), err.severity.as_str()), ("57P01", "FATAL"));
            continue;
        }
        let msgs = raw.until_ready_or_closed().await.expect("the client keeps its connection");
        let err = msgs.iter().find(|m| m.tag == b'E').expect("the client is told").error();
        assert_eq!((err.code.as_str(), err.severity.as_str()), ("57P01", "ERROR"), "{target}");
        assert!(err.message.contains("terminating connection"), "{target}: {}", err.message);
        assert_eq!(msgs.last().map(|m| (m.tag, &m.body[..])), Some((b'Z', &b"I"[..])), "{target}");
        // The RowDescription comes or not, depending on when the signal lands.
        answers.push((target, tags(&msgs).trim_start_matches('T').to_owned()));
        assert_eq!(tags(&raw.simple_query("SELECT 1").await), "TDCZ", "{target}: the next query runs");
    }
    assert!(answers.iter().all(|(_, a)| *a == answers[0].1), "answers differ: {answers:?}");
}

/// A client that vanishes mid-COPY gives its backend back at once (CopyFail),
/// not after the cleanup time bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_mid_copy_frees_its_backend_at_once() {
    let cluster = support::cluster_async().await;
    fresh_table("copy_gone").await;
    let proxy = Proxy::standard(cluster, 1, "").await;
    let mut raw = Raw::login(proxy.addr, TRUST, DB).await;
    let mut out = BytesMut::new();
    query(&mut out, "COPY copy_gone FROM STDIN");
    raw.send(&out).await;
    until_tag(&mut raw, b'G').await;
    let mut other = Raw::login(proxy.addr, TRUST, DB).await;
    let left = Instant::now();
    drop(raw);
    assert_eq!(tags(&other.simple_query("SELECT 1").await), "TDCZ");
    let took = left.elapsed();
    assert!(took < Duration::from_secs(1), "the backend came back after {took:?}");
    assert_eq!(rows("copy_gone").await, "0");
}

/// Startup-phase input Postgres refuses: what it sends (nothing at all, for
/// a packet whose length is impossible, as node-postgres' `connect(); end()`
/// produces with a Terminate first; a FATAL with its SQLSTATE otherwise).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_startup_packets_are_answered_as_postgres_does() {
    let t = Targets::start(1).await;
    let cases: [(&str, Vec<u8>); 6] = [
        ("Terminate first", vec![b'X', 0, 0, 0, 4]),
        ("length 4", vec![0, 0, 0, 4, 0, 3, 0, 0]),
        ("length 1 GiB", vec![0x40, 0, 0, 0, 0, 3, 0, 0]),
        ("protocol 2.0", {
            let mut p = vec![0, 0, 0, 0, 0, 2, 0, 0];
            p.extend_from_slice(b"user\0trustuser\0\0");
            let len = p.len() as u32;
            p[..4].copy_from_slice(&len.to_be_bytes());
            p
        }),
        ("protocol 4.0", {
            let mut p = vec![0, 0, 0, 0, 0, 4, 0, 0];
            p.extend_from_slice(b"user\0trustuser\0\0");
            let len = p.len() as u32;
            p[..4].copy_from_slice(&len.to_be_bytes());
            p
        }),
        ("unterminated parameters", {
            let mut p = vec![0, 0, 0, 0, 0, 3, 0, 0];
            p.extend_from_slice(b"user\0trustuser");
            let len = p.len() as u32;
            p[..4].copy_from_slice(&len.to_be_bytes());
            p
        }),
    ];
    for (case, bytes) in cases {
        let mut answers = Vec::new();
        for (target, addr) in t.all() {
            let mut raw = Raw::connect(addr).await;
            raw.send(&bytes).await;
            let mut answer = Vec::new();
            tokio::time::timeout(Duration::from_secs(10), raw.stream.read_to_end(&mut answer))
                .await
                .unwrap_or_else(|_| panic!("{case}: {target} did not close"))
                .unwrap();
            // A protocol-3 ErrorResponse: its fields up to the source file
            // and line Postgres adds (the length differs by those).
            if answer.starts_with(b"E\0") {
                answer.drain(..5);
                if let Some(at) = answer.windows(2).position(|w| w == b"\0F") {
                    answer.truncate(at + 1);
                }
                while answer.ends_with(b"\0\0") {
                    answer.pop();
                }
            }
            let answer = String::from_utf8_lossy(&answer).into_owned();
            answers.push((target, answer));
        }
        eprintln!("{case}: {answers:?}");
        assert!(answers.iter().all(|(_, a)| *a == answers[0].1), "{case}: answers differ from Postgres's: {answers:?}");
    }
}

/// Reads that ask about the node (a standby reports them `on`) answer as a
/// direct connection does, with a replica in rotation too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_that_differ_on_a_standby_answer_as_postgres_does() {
    let t = Targets::start(2).await;
    for sql in [
        "SHOW transaction_read_only",
        "SELECT current_setting('transaction_read_only')",
        "SHOW in_hot_standby",
        "SELECT pg_is_in_recovery()",
    ] {
        let mut answers = Vec::new();
        for (target, addr) in t.all() {
            let mut raw = Raw::login(addr, TRUST, DB).await;
            let msgs = raw.simple_query(sql).await;
            assert_eq!(tags(&msgs), "TDCZ", "{target}: {sql}");
            answers.push((target, String::from_utf8_lossy(&msgs[1].body).into_owned()));
        }
        assert!(answers.iter().all(|(_, a)| *a == answers[0].1), "{sql}: answers differ from Postgres's: {answers:?}");
    }
    // The setting's name as a parameter (psycopg's own test does this).
    let mut answers = Vec::new();
    for (target, addr) in t.all() {
        let client = tokio_postgres::connect(
            &format!("host={} port={} user={TRUST} dbname={DB}", addr.ip(), addr.port()),
            tokio_postgres::NoTls,
        )
        .await;
        let (client, conn) = client.unwrap_or_else(|e| panic!("{target}: {e}"));
        tokio::spawn(conn);
        let row = client.query_one("SELECT current_setting($1)", &[&"transaction_read_only"]).await.unwrap();
        answers.push((target, row.get::<_, String>(0)));
    }
    assert!(answers.iter().all(|(_, a)| *a == answers[0].1), "current_setting($1): {answers:?}");
}
