//! Session state transaction pooling cannot carry: pin the client to its
//! backend (default), refuse the statement, or allow it, per `on_session_state`.

mod support;

use support::scalar;

use std::time::Duration;

use support::proxy::Proxy;
use support::{DB, TRUST, eventually};

async fn trust(proxy: &Proxy) -> tokio_postgres::Client {
    proxy.connect(TRUST, None, DB).await.expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_client_keeps_its_session_state_and_the_backend_is_reset_after() {
    let cluster = support::cluster_async().await;
    let proxy = Proxy::standard(cluster, 2, "query_wait_timeout = \"300ms\"").await;
    let a = trust(&proxy).await;
    a.batch_execute("CREATE TEMP TABLE pin_tmp (a int); INSERT INTO pin_tmp VALUES (42)").await.unwrap();
    let pid = scalar(&a, "SELECT pg_backend_pid()").await;
    // Another client uses the other backend meanwhile; a stays on its own.
    let b = trust(&proxy).await;
    for _ in 0..5 {
        assert_eq!(scalar(&b, "SELECT to_regclass('pin_tmp') IS NULL").await, "t");
        assert_eq!(scalar(&a, "SELECT a FROM pin_tmp").await, "42");
        assert_eq!(scalar(&a, "SELECT pg_backend_pid()").await, pid);
    }
    a.batch_execute("PREPARE sqlprep AS SELECT 7; SELECT pg_advisory_lock(4242); LISTEN pin_chan").await.unwrap();
    assert_eq!(scalar(&a, "EXECUTE sqlprep").await, "7");
    drop(a);
    // The backend comes back reset: no temp table, no lock, no listener, no statement.
    let c = trust(&proxy).await;
    let d = trust(&proxy).await;
    // Both pooled backends busy at once: one of them must be the reset one.
    // (One at a time, the pool's LIFO would keep handing out the other.)
    eventually(Duration::from_secs(10), "the pinned backend back in the pool", || async {
        c.batch_execute("BEGIN").await.unwrap();
        if d.batch_execute("BEGIN").await.is_err() {
            // Still being reset: d waited past query_wait_timeout.
            c.batch_execute("ROLLBACK").await.unwrap();
            return false;
        }
        let (x, y) = (scalar(&c, "SELECT pg_backend_pid()").await, scalar(&d, "SELECT pg_backend_pid()").await);
        let on_reset_backend = if x == pid {
            Some(&c)
        } else if y == pid {
            Some(&d)
        } else {
            None
        };
        if let Some(client) = on_reset_backend {
            // Checked inside the transaction, so surely on the backend that was pinned.
            assert_eq!(scalar(client, "SELECT to_regclass('pin_tmp') IS NULL").await, "t");
            assert_eq!(scalar(client, "SELECT count(*) FROM pg_prepared_statements WHERE name = 'sqlprep'").await, "0");
            assert_eq!(scalar(client, "SELECT count(*) FROM pg_listening_channels()").await, "0");
            assert_eq!(
                scalar(client, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()")
                    .await,
                "0"
            );
        }
        c.batch_execute("COMMIT").await.unwrap();
        d.batch_execute("COMMIT").await.unwrap();
        on_reset_backend.is_some()
    })
    .await;
    // And no one holds the pinned client's advisory lock any more.
    assert_eq!(scalar(&c, "SELECT pg_try_advisory_lock(4242)").await, "t");
    c.batch_execute("SELECT pg_advisory_unlock_all()").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_policy_refuses_with_a_clear_message_and_keeps_the_transaction_consistent() {
    let cluster = support::cluster_async().await;
    let proxy = Proxy::standard(cluster, 2, "on_session_state = \"error\"").await;
    let c = trust(&proxy).await;
    for sql in
        ["LISTEN chan", "CREATE TEMP TABLE t_refused (a int)", "SELECT pg_advisory_lock(1)", "PREPARE p AS SELECT 1"]
    {
        let err = c.simple_query(sql).await.unwrap_err();
        let db = err.as_db_error().unwrap_or_else(|| panic!("{sql}: {err}"));
        assert_eq!(db.code().code(), "0A000", "{sql}");
        assert!(db.message().contains("on_session_state"), "{sql}: {}", db.message());
    }
    // Inside a transaction the refusal aborts it, exactly as a server error would.
    c.batch_execute("BEGIN").await.unwrap();
    assert!(c.simple_query("LISTEN chan").await.is_err());
    assert_eq!(c.simple_query("SELECT 1").await.unwrap_err().code().unwrap().code(), "25P02");
    c.batch_execute("ROLLBACK").await.unwrap();
    // The extended protocol too: refused when parsed (the literal's cast fails, 22P02).
    let err = c.query("SELECT pg_advisory_lock($1)", &[&1i64]).await.unwrap_err();
    let db = err.as_db_error().unwrap_or_else(|| panic!("{err}"));
    assert_eq!(db.code().code(), "22P02");
    assert!(db.message().contains("session-level advisory lock is not supported"), "{}", db.message());
    assert_eq!(scalar(&c, "SELECT 1").await, "1");
    // Transaction-scoped state is fine.
    c.batch_execute("BEGIN; SELECT pg_advisory_xact_lock(9); COMMIT").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_policy_lets_session_state_through_without_pinning() {
    let cluster = support::cluster_async().await;
    let proxy = Proxy::standard(cluster, 1, "on_session_state = \"allow\"").await;
    let a = trust(&proxy).await;
    let b = trust(&proxy).await;
    a.batch_execute("CREATE TEMP TABLE allow_tmp (a int)").await.unwrap();
    // Not pinned: b gets the same (only) backend and sees a's temp table —
    // exactly what "allow" trades away.
    assert_eq!(scalar(&b, "SELECT to_regclass('allow_tmp') IS NOT NULL").await, "t");
    b.batch_execute("DROP TABLE allow_tmp").await.unwrap();
}
