//! Unix-domain sockets on both sides, through the binary as ops run it:
//! clients find pgmux's `.s.PGSQL.<port>` in `unix_socket_dir` (libpq's
//! `host=/dir port=N`), and every server connection — pools on the primary
//! and the replica, the routing monitor, auth_query, cancel requests — goes
//! to Postgres's own socket when proxy.toml names its directory.

mod support;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use support::{APP, DB, code, eventually, scalar};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Connects over pgmux's Unix socket in `dir`.
async fn connect_unix(
    dir: &Path,
    port: u16,
    user: &str,
    password: &str,
    db: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::new();
    config.host_path(dir).port(port).user(user).password(password).dbname(db);
    config.connect_timeout(Duration::from_secs(10));
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// The `addr` column of each SHOW SERVERS row.
async fn server_addrs(admin: &tokio_postgres::Client) -> Vec<String> {
    let rows = admin.simple_query("SHOW SERVERS").await.expect("SHOW SERVERS");
    rows.iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => {
                let i = r.columns().iter().position(|c| c.name() == "addr").expect("an addr column");
                r.get(i).map(str::to_owned)
            }
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_and_servers_over_unix_sockets() {
    let cluster = support::cluster_async().await;
    // Postgres's sockets are in the cluster's directory (unix_socket_directories).
    let pg_dir = cluster.root_dir().display().to_string();
    let primary = format!("{pg_dir}:{}", cluster.primary().port());
    let replica = format!("{pg_dir}:{}", cluster.replicas()[0].port());
    let su = support::superuser(DB).await;
    su.batch_execute("DROP ROLE IF EXISTS unix_aq; CREATE ROLE unix_aq LOGIN PASSWORD 'unix aq pw'").await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let sock_dir = dir.path().join("run");
    std::fs::create_dir(&sock_dir).unwrap();
    let pki = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(dir.path().join("server.crt"), pki.cert.pem()).unwrap();
    std::fs::write(dir.path().join("server.key"), pki.signing_key.serialize_pem()).unwrap();
    let port = pgmux::cluster::pick_port().expect("a free loopback port");
    let config = format!(
        r#"
[proxy]
listen = "127.0.0.1:{port}"
unix_socket_dir = "{sock}"
unix_socket_mode = "0770"
query_wait_timeout = "20s"
auth_user = "postgres"
# Plaintext over TCP is refused; a Unix socket never carries TLS, as in Postgres.
tls_mode = "require"
tls_cert = "{crt}"
tls_key = "{key}"

[routing]
monitor_interval = "20ms"

[[databases]]
name = "{DB}"
primary = "{primary}"
replicas = ["{replica}"]
pool_size = 4

[[users]]
name = "{app}"
password = "{app_pw}"

# Trusted by Postgres on its socket: the password is never asked for.
[[users]]
name = "postgres"
auth = "trust"
server_password = "unused"

[admin]
users = ["postgres"]
"#,
        sock = sock_dir.display(),
        crt = dir.path().join("server.crt").display(),
        key = dir.path().join("server.key").display(),
        app = APP.0,
        app_pw = APP.1,
    );
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, config).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgmux"))
        .arg("--config")
        .arg(&path)
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start pgmux");
    let pid = child.id().expect("pid");
    let socket = sock_dir.join(format!(".s.PGSQL.{port}"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while connect_unix(&sock_dir, port, APP.0, APP.1, DB).await.is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            let mut log = String::new();
            child.stderr.take().unwrap().read_to_string(&mut log).await.unwrap();
            panic!("pgmux exited: {status}: {log}");
        }
        assert!(tokio::time::Instant::now() < deadline, "pgmux not accepting on its Unix socket");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let meta = std::fs::symlink_metadata(&socket).expect("the socket file");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o770, "unix_socket_mode");

    // Both hops over Unix sockets: Postgres sees a client without an IP address.
    let app = connect_unix(&sock_dir, port, APP.0, APP.1, DB).await.expect("login over the Unix socket");
    let hop = scalar(&app, "BEGIN; SELECT inet_client_addr() IS NULL AND inet_server_addr() IS NULL").await;
    assert_eq!(hop, "t", "pgmux reached the primary over its Unix socket");
    app.batch_execute("COMMIT").await.unwrap();
    // A read goes to the replica once the monitor (also over the socket) has sampled it.
    let on_replica = format!("{} true", cluster.replicas()[0].port());
    eventually(Duration::from_secs(10), "a read served by the replica", || async {
        scalar(&app, "SELECT current_setting('port') || ' ' || (inet_server_addr() IS NULL)").await == on_replica
    })
    .await;

    // A user of auth_query: the lookup runs over the socket too.
    let aq = connect_unix(&sock_dir, port, "unix_aq", "unix aq pw", DB).await.expect("auth_query login");
    assert_eq!(scalar(&aq, "SELECT current_user").await, "unix_aq");
    let wrong = connect_unix(&sock_dir, port, "unix_aq", "wrong", DB).await.expect_err("a wrong password");
    assert_eq!(code(&wrong), "28P01");

    // A cancel request over the client socket reaches the server over its socket.
    let sleeper = connect_unix(&sock_dir, port, APP.0, APP.1, DB).await.unwrap();
    let token = sleeper.cancel_token();
    let sleep = tokio::spawn(async move { sleeper.batch_execute("SELECT pg_sleep(30)").await });
    // A read: on the replica.
    let replica_su = support::connect(&cluster.replicas()[0], "postgres", None, DB).await.unwrap();
    eventually(Duration::from_secs(10), "the sleep running", || async {
        let running = "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'";
        scalar(&replica_su, running).await == "1"
    })
    .await;
    token.cancel_query(tokio_postgres::NoTls).await.expect("cancel over the Unix socket");
    let err = tokio::time::timeout(Duration::from_secs(10), sleep).await.expect("cancelled in time").unwrap();
    assert_eq!(code(&err.expect_err("cancelled")), "57014");

    // The console over the socket; its server list names the sockets.
    let admin = connect_unix(&sock_dir, port, "postgres", "", "pgmux").await.expect("admin console over the socket");
    let addrs = server_addrs(&admin).await;
    assert!(!addrs.is_empty() && addrs.iter().all(|a| a == "unix"), "SHOW SERVERS addr: {addrs:?}");

    // SSLRequest over the Unix socket: 'N', as Postgres answers there, even with
    // tls_mode = require; over TCP, plaintext is refused.
    let mut raw = tokio::net::UnixStream::connect(&socket).await.unwrap();
    raw.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await.unwrap();
    assert_eq!(raw.read_u8().await.unwrap(), b'N');
    let tcp = format!("host=127.0.0.1 port={port} user={} password={} dbname={DB} sslmode=disable", APP.0, APP.1);
    let Err(refused) = tokio_postgres::connect(&tcp, tokio_postgres::NoTls).await else {
        panic!("plaintext over TCP was let in")
    };
    assert_eq!(code(&refused), "28000");

    // A second pgmux cannot take the socket of a running one.
    let second_config = std::fs::read_to_string(&path).unwrap().replace(
        &format!("listen = \"127.0.0.1:{port}\"\nunix_socket_dir = \"{}\"", sock_dir.display()),
        &format!("listen = \"{}:{port}\"", sock_dir.display()),
    );
    let second_path = dir.path().join("second.toml");
    std::fs::write(&second_path, second_config).unwrap();
    let second = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgmux"))
        .arg("--config")
        .arg(&second_path)
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start a second pgmux");
    let out = tokio::time::timeout(Duration::from_secs(10), second.wait_with_output()).await.expect("exits").unwrap();
    assert!(!out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("another process listens there"), "{log}");
    assert!(socket.exists(), "the running pgmux's socket stays");

    drop((app, aq, admin));
    // SAFETY: signalling our own child by its pid.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGINT) }, 0);
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output()).await.expect("exits").unwrap();
    assert!(out.status.success(), "pgmux exited with {}", out.status);
    assert!(!socket.exists(), "the socket file goes with the process");
}

/// `listen` itself may be a Unix socket: `"/dir:port"`, or a file's path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_on_a_unix_socket_only() {
    let cluster = support::cluster_async().await;
    let dir = tempfile::tempdir().unwrap();
    for listen in [format!("{}:7432", dir.path().display()), format!("{}/pgmux.sock", dir.path().display())] {
        let toml = support::proxy::standard_config(cluster, 2, "").replace("127.0.0.1:0", &listen);
        let path = dir.path().join("proxy.toml");
        std::fs::write(&path, toml).unwrap();
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgmux"))
            .arg("--config")
            .arg(&path)
            .kill_on_drop(true)
            .spawn()
            .expect("start pgmux");
        let socket = match listen.strip_suffix(":7432") {
            Some(d) => Path::new(d).join(".s.PGSQL.7432"),
            None => listen.clone().into(),
        };
        eventually(Duration::from_secs(10), "pgmux listening", || async { socket.exists() }).await;
        let stream = tokio::net::UnixStream::connect(&socket).await.expect("connect to the socket");
        let mut config = tokio_postgres::Config::new();
        config.user(APP.0).password(APP.1).dbname(DB);
        let (client, conn) = config.connect_raw(stream, tokio_postgres::NoTls).await.expect("login");
        tokio::spawn(conn);
        assert_eq!(scalar(&client, "SELECT 40 + 2").await, "42");
        drop(client);
        // SAFETY: signalling our own child by its pid.
        assert_eq!(unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGINT) }, 0);
        let status = tokio::time::timeout(Duration::from_secs(20), child.wait()).await.expect("exits").unwrap();
        assert!(status.success());
        assert!(!socket.exists(), "removed at exit");
    }
}
