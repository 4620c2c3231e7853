//! The test-cluster harness itself: real servers, replication, logins.

mod support;

use std::time::Duration;

use pgmux::cluster::{Cluster, ClusterSpec, ClusterUser};
use tokio_postgres::error::SqlState;

use support::{APP, CLEAR, DB, MD5, TRUST, cluster_async, connect, eventually};

#[tokio::test]
async fn primary_accepts_writes_and_replica_streams_them() {
    let cluster = cluster_async().await;
    let primary = connect(cluster.primary(), APP.0, Some(APP.1), DB).await.expect("connect to primary");
    primary
        .batch_execute("CREATE TABLE IF NOT EXISTS harness_check (id int PRIMARY KEY, note text)")
        .await
        .expect("create table");
    primary
        .execute("INSERT INTO harness_check VALUES (1, 'from the primary') ON CONFLICT (id) DO NOTHING", &[])
        .await
        .expect("insert on primary");
    let in_recovery: bool = primary.query_one("SELECT pg_is_in_recovery()", &[]).await.unwrap().get(0);
    assert!(!in_recovery, "primary must not be in recovery");

    let replica_node = &cluster.replicas()[0];
    let replica = connect(replica_node, APP.0, Some(APP.1), DB).await.expect("connect to replica");
    let in_recovery: bool = replica.query_one("SELECT pg_is_in_recovery()", &[]).await.unwrap().get(0);
    assert!(in_recovery, "replica must be in recovery");

    eventually(Duration::from_secs(10), "the row to reach the replica", || async {
        replica
            .query_opt("SELECT note FROM harness_check WHERE id = 1", &[])
            .await
            .ok()
            .flatten()
            .is_some_and(|row| row.get::<_, String>(0) == "from the primary")
    })
    .await;

    let err =
        replica.execute("INSERT INTO harness_check VALUES (2, 'x')", &[]).await.expect_err("replica is read-only");
    assert_eq!(err.code(), Some(&SqlState::READ_ONLY_SQL_TRANSACTION));
}

#[tokio::test]
async fn users_log_in_with_their_password_and_not_without() {
    let cluster = cluster_async().await;
    for node in cluster.nodes() {
        for (user, password) in [APP, MD5, CLEAR] {
            let client = connect(node, user, Some(password), DB)
                .await
                .unwrap_or_else(|e| panic!("{user} on {}: {e}", node.name()));
            let who: String = client.query_one("SELECT current_user::text", &[]).await.unwrap().get(0);
            assert_eq!(who, user);

            let err = connect(node, user, Some("wrong"), DB).await.err().unwrap_or_else(|| {
                panic!("{user} on {} logged in with a wrong password", node.name());
            });
            assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD), "{user} on {}: {err}", node.name());
        }
        connect(node, TRUST, None, DB).await.unwrap_or_else(|e| panic!("trustuser on {}: {e}", node.name()));
        connect(node, "postgres", None, "postgres").await.expect("postgres is trusted over loopback");
    }
}

#[tokio::test]
async fn passwords_are_stored_and_checked_as_specified() {
    let cluster = cluster_async().await;
    let primary = cluster.primary();
    let stored = |user: &str| primary.psql(&format!("SELECT rolpassword FROM pg_authid WHERE rolname = '{user}'"));
    assert!(stored(MD5.0).unwrap().starts_with("md5"), "md5user must be stored as md5");
    assert!(stored(APP.0).unwrap().starts_with("SCRAM-SHA-256$"));
    assert_eq!(stored(TRUST).unwrap(), "");

    let method = |user: &str| {
        primary
            .psql(&format!(
                "SELECT auth_method FROM pg_hba_file_rules WHERE '{user}' = ANY(user_name) AND type = 'host'"
            ))
            .unwrap()
    };
    assert_eq!(method(APP.0), "scram-sha-256");
    assert_eq!(method(MD5.0), "md5");
    assert_eq!(method(CLEAR.0), "password");
    assert_eq!(method(TRUST), "trust");
}

/// A private cluster: settings reach the right nodes, restart keeps the port,
/// and dropping the cluster stops the servers and removes the temp dir.
#[tokio::test]
async fn own_cluster_settings_restart_and_cleanup() {
    let spec = ClusterSpec::default()
        .replicas(1)
        .user(ClusterUser::scram("u", "p"))
        .primary_setting("max_connections", "50")
        .replica_setting("recovery_min_apply_delay", "500ms");
    let cluster = tokio::task::spawn_blocking(move || Cluster::start(&spec)).await.unwrap().expect("start cluster");
    let (primary, replica) = (cluster.primary().clone(), cluster.replicas()[0].clone());
    let root = cluster.root_dir().to_owned();
    assert!(primary.port() < 32768 && replica.port() < 32768, "ports stay out of the ephemeral range");
    assert_ne!(primary.port(), replica.port());

    let (p, r) = tokio::task::spawn_blocking(move || {
        let show = |n: &pgmux::cluster::Node, s: &str| n.psql(&format!("SHOW {s}")).unwrap();
        let values = (
            (show(&primary, "max_connections"), show(&primary, "recovery_min_apply_delay"), show(&primary, "fsync")),
            (show(&replica, "max_connections"), show(&replica, "recovery_min_apply_delay")),
        );
        let port = replica.port();
        replica.restart().expect("restart replica");
        assert_eq!(replica.port(), port);
        assert_eq!(replica.psql("SELECT pg_is_in_recovery()").unwrap(), "t");
        replica.stop_immediate().expect("stop replica");
        assert!(!replica.is_running());
        replica.start().expect("start replica again");
        assert!(replica.is_running());
        values
    })
    .await
    .unwrap();
    assert_eq!(p, ("50".into(), "0".into(), "off".into()));
    assert_eq!(r, ("50".into(), "500ms".into()));

    let nodes: Vec<_> = cluster.nodes().cloned().collect();
    tokio::task::spawn_blocking(move || drop(cluster)).await.unwrap();
    assert!(!root.exists(), "temp dir {} must be gone", root.display());
    for node in nodes {
        let refused = std::net::TcpStream::connect(node.addr()).is_err();
        assert!(refused, "{} still listening on {}", node.name(), node.port());
    }
}
