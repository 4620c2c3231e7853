//! SIGHUP reloads the config file. A binary of its own: a signal reaches the
//! whole process, so it must hold exactly one proxy.

mod support;

use std::time::Duration;

use support::proxy::Proxy;
use support::{APP, DB, eventually};
use tokio_postgres::SimpleQueryMessage;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_config_file() {
    let cluster = support::cluster_async().await;
    // A handler of our own first: even if pgmux's were somehow not installed
    // yet, the signal must not take its default action (end the test process).
    let mut own = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).expect("SIGHUP handler");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    let text = |pool_size: usize, wait: &str| {
        format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\nquery_wait_timeout = \"{wait}\"\n\n[admin]\nusers = [\"postgres\"]\n\n\
             [[databases]]\nname = \"{DB}\"\nprimary = \"{}\"\npool_size = {pool_size}\n\n\
             [[users]]\nname = \"postgres\"\nauth = \"trust\"\n\n[[users]]\nname = \"{}\"\npassword = \"{}\"\n",
            cluster.primary().host_port(),
            APP.0,
            APP.1,
        )
    };
    std::fs::write(&path, text(2, "5s")).unwrap();
    let proxy = Proxy::start_file(&path).await;
    let client = proxy.app().await;
    let admin = proxy.connect("postgres", None, "pgmux").await.expect("admin console");
    let setting = |key: &'static str| {
        let admin = &admin;
        async move {
            let msgs = admin.simple_query("SHOW CONFIG").await.unwrap();
            msgs.iter()
                .find_map(|m| match m {
                    SimpleQueryMessage::Row(r) if r.get("key") == Some(key) => r.get("value").map(str::to_owned),
                    _ => None,
                })
                .unwrap()
        }
    };
    assert_eq!(setting("proxy.query_wait_timeout").await, "5s");

    // pgmux accepted clients, so its handler is installed.
    std::fs::write(&path, text(4, "8s")).unwrap();
    // SAFETY: kill(2) on our own pid with a signal that has handlers installed.
    assert_eq!(unsafe { libc::kill(libc::getpid(), libc::SIGHUP) }, 0);
    own.recv().await;
    eventually(Duration::from_secs(15), "SIGHUP to apply the new file", || async {
        setting("proxy.query_wait_timeout").await == "8s"
    })
    .await;
    let msgs = admin.simple_query("SHOW DATABASES").await.unwrap();
    let pool_size = msgs.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) if r.get("name") == Some(DB) => r.get("pool_size").map(str::to_owned),
        _ => None,
    });
    assert_eq!(pool_size.as_deref(), Some("4"));
    // A broken file on SIGHUP: logged, counted, and the config stays.
    std::fs::write(&path, "[proxy\n").unwrap();
    assert_eq!(unsafe { libc::kill(libc::getpid(), libc::SIGHUP) }, 0);
    own.recv().await;
    eventually(Duration::from_secs(15), "the failed reload to be counted", || async {
        let (_, body) = http_get(proxy.metrics.unwrap()).await;
        body.contains("pgmux_config_reloads_total{result=\"failed\"} 1")
            && body.contains("pgmux_config_reloads_total{result=\"ok\"} 1")
    })
    .await;
    assert_eq!(setting("proxy.query_wait_timeout").await, "8s");
    assert!(!client.simple_query("SELECT 1").await.unwrap().is_empty());
    proxy.shutdown().await;
}

async fn http_get(addr: std::net::SocketAddr) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.to_owned(), body.to_owned())
}
