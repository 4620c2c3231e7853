//! TLS on both sides: clients to pgmux (`tls_mode`, driven with psql, i.e.
//! libpq + OpenSSL) and pgmux to Postgres (`server_tls`, against a private
//! cluster with `ssl = on` whose pg_hba.conf refuses plaintext for the test user).

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use pgmux::cluster::{Cluster, ClusterSpec, ClusterUser, PgBinaries};
use support::proxy::Proxy;

const USER: &str = "tlsuser";
const PASSWORD: &str = "tls_pw";
const DB: &str = "tlsdb";

/// A test CA and a server certificate it signed for `localhost` and `127.0.0.1`.
struct Pki {
    dir: tempfile::TempDir,
    cert_pem: String,
    key_pem: String,
}

impl Pki {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn pki() -> &'static Pki {
    static P: OnceLock<Pki> = OnceLock::new();
    P.get_or_init(|| {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "pgmux test CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, "localhost");
        let cert = params.signed_by(&key, &issuer).unwrap();
        // A second, unrelated CA: verify-full against it must fail.
        let other_key = KeyPair::generate().unwrap();
        let mut other = CertificateParams::new(Vec::<String>::new()).unwrap();
        other.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let other_cert = other.self_signed(&other_key).unwrap();

        let dir = tempfile::tempdir().unwrap();
        let pki = Pki { dir, cert_pem: cert.pem(), key_pem: key.serialize_pem() };
        std::fs::write(pki.path("ca.crt"), ca_cert.pem()).unwrap();
        std::fs::write(pki.path("other-ca.crt"), other_cert.pem()).unwrap();
        std::fs::write(pki.path("server.crt"), &pki.cert_pem).unwrap();
        std::fs::write(pki.path("server.key"), &pki.key_pem).unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(pki.path("server.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        pki
    })
}

/// A primary with `ssl = on`; `tlsuser` may log in over TLS only.
static CLUSTER: OnceLock<Cluster> = OnceLock::new();

fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(|| {
        let pki = pki();
        let mut spec = ClusterSpec::default()
            .user(ClusterUser::scram(USER, PASSWORD))
            .database(DB, USER)
            .primary_setting("ssl", "on")
            .primary_setting("ssl_cert_file", "server.crt")
            .primary_setting("ssl_key_file", "server.key");
        spec.data_files.push(("server.crt".into(), pki.cert_pem.clone().into_bytes()));
        spec.data_files.push(("server.key".into(), pki.key_pem.clone().into_bytes()));
        spec.extra_hba.push(format!("hostssl all {USER} 127.0.0.1/32 scram-sha-256"));
        spec.extra_hba.push(format!("hostnossl all {USER} 127.0.0.1/32 reject"));
        let cluster = Cluster::start(&spec).expect("start a primary with ssl = on");
        register_teardown();
        cluster
    })
}

/// The cluster is a static: stop it when the test process exits (libtest
/// ends with `exit`, which runs `atexit` hooks).
fn register_teardown() {
    extern "C" fn teardown() {
        // Unwinding out of an extern "C" fn would abort; stopping is best effort anyway.
        let _ = std::panic::catch_unwind(|| {
            if let Some(c) = CLUSTER.get() {
                c.stop();
            }
        });
    }
    // SAFETY: a plain extern "C" fn that lives for the whole program.
    assert_eq!(unsafe { libc::atexit(teardown) }, 0);
}

async fn cluster_async() -> &'static Cluster {
    tokio::task::spawn_blocking(cluster).await.expect("cluster start")
}

fn config(cluster: &Cluster, proxy_extra: &str) -> String {
    let pki = pki();
    format!(
        r#"
[proxy]
listen = "127.0.0.1:0"
tls_cert = "{cert}"
tls_key = "{key}"
{proxy_extra}

[[databases]]
name = "{DB}"
primary = "{primary}"
pool_size = 2

[[users]]
name = "{USER}"
password = "{PASSWORD}"

[admin]
users = ["{USER}"]
"#,
        cert = pki.path("server.crt").display(),
        key = pki.path("server.key").display(),
        primary = cluster.primary().host_port(),
    )
}

/// `SELECT ssl FROM pg_stat_ssl` for the backend pgmux runs the query on.
async fn backend_ssl(proxy: &Proxy) -> Result<bool, tokio_postgres::Error> {
    let client = proxy.connect(USER, Some(PASSWORD), DB).await?;
    let row = client.query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).await?;
    Ok(row.get(0))
}

#[tokio::test]
async fn server_tls_require_encrypts_backends() {
    let cluster = cluster_async().await;
    let proxy = Proxy::start(&config(cluster, "server_tls = \"require\"")).await;
    assert!(backend_ssl(&proxy).await.expect("login through pgmux over a TLS backend"));
    // Larger traffic both ways through the TLS backend connection.
    let client = proxy.connect(USER, Some(PASSWORD), DB).await.unwrap();
    let big = "y".repeat(3 << 20);
    let row = client.query_one("SELECT length($1::text), repeat('x', 4000000)", &[&big]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 3 << 20);
    assert_eq!(row.get::<_, String>(1).len(), 4_000_000);
    let rows = client.query("SELECT g, md5(g::text) FROM generate_series(1, 50000) g", &[]).await.unwrap();
    assert_eq!(rows.len(), 50000);
    // Idle TLS backends pass the liveness check at checkout: they are reused, not replaced.
    let mut pids = std::collections::HashSet::new();
    for _ in 0..10 {
        pids.insert(client.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get::<_, i32>(0));
    }
    assert!(pids.len() <= 2, "pool_size = 2, yet {} backends served: {pids:?}", pids.len());
    proxy.shutdown().await;
}

#[tokio::test]
async fn server_tls_prefer_uses_tls_when_offered() {
    let cluster = cluster_async().await;
    let proxy = Proxy::start(&config(cluster, "server_tls = \"prefer\"")).await;
    assert!(backend_ssl(&proxy).await.expect("login through pgmux"));
    proxy.shutdown().await;
}

#[tokio::test]
async fn server_tls_verify_full_checks_the_ca() {
    let cluster = cluster_async().await;
    let ca = pki().path("ca.crt");
    let extra = format!("server_tls = \"verify-full\"\nserver_tls_ca = \"{}\"", ca.display());
    let proxy = Proxy::start(&config(cluster, &extra)).await;
    assert!(backend_ssl(&proxy).await.expect("verify-full with the right CA"));
    proxy.shutdown().await;

    // Host name `localhost` is in the certificate too.
    let toml = config(cluster, &extra)
        .replace("127.0.0.1:", "localhost:")
        .replace("listen = \"localhost:", "listen = \"127.0.0.1:");
    let proxy = Proxy::start(&toml).await;
    assert!(backend_ssl(&proxy).await.expect("verify-full by host name"));
    proxy.shutdown().await;

    let other = pki().path("other-ca.crt");
    let extra = format!("server_tls = \"verify-full\"\nserver_tls_ca = \"{}\"", other.display());
    let proxy = Proxy::start(&config(cluster, &extra)).await;
    let err = backend_ssl(&proxy).await.expect_err("a certificate from another CA is refused");
    let text = err.as_db_error().map(|e| e.message().to_owned()).unwrap_or_else(|| err.to_string());
    assert!(text.contains("TLS"), "{text}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn server_tls_disable_is_refused_by_hostnossl() {
    let cluster = cluster_async().await;
    let proxy = Proxy::start(&config(cluster, "server_tls = \"disable\"")).await;
    let err = backend_ssl(&proxy).await.expect_err("the server refuses plaintext");
    let db = err.as_db_error().expect("an ErrorResponse relayed from the server");
    assert!(db.message().contains("pg_hba.conf"), "{}", db.message());
    proxy.shutdown().await;
}

/// Runs psql through pgmux with `conninfo` (plus host/port/user/dbname);
/// returns (success, stdout, stderr).
async fn psql(proxy: &Proxy, conninfo: &str, sql: &str) -> (bool, String, String) {
    let conn = format!("host=127.0.0.1 port={} user={USER} dbname={DB} {conninfo}", proxy.port());
    let sql = sql.to_owned();
    tokio::task::spawn_blocking(move || {
        let bins = PgBinaries::find().expect("PostgreSQL binaries");
        let mut cmd = Command::new(&bins.psql);
        pgmux::cluster::scrub_pg_env(&mut cmd);
        cmd.env("PGPASSWORD", PASSWORD).env("PGCONNECT_TIMEOUT", "10");
        cmd.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-f", "-", &conn]);
        cmd.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("run psql");
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(sql.as_bytes()).unwrap();
        }
        let out = child.wait_with_output().expect("psql output");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn client_tls_require() {
    let cluster = cluster_async().await;
    let proxy = Proxy::start(&config(cluster, "tls_mode = \"require\"\nserver_tls = \"require\"")).await;

    let (ok, out, err) = psql(&proxy, "sslmode=require", "SELECT 1;").await;
    assert!(ok, "{err}");
    assert_eq!(out, "1");

    // SHOW CLIENTS names the protocol and cipher suite (this psql is the only client).
    let (ok, out, err) = psql(&proxy, "sslmode=require dbname=pgmux", "SHOW CLIENTS;").await;
    assert!(ok, "{err}");
    assert!(out.contains("|TLSv1_3/TLS13_"), "{out}");

    let (ok, _, err) = psql(&proxy, "sslmode=disable", "SELECT 1;").await;
    assert!(!ok);
    assert!(err.contains("TLS required"), "{err}");

    let ca = pki().path("ca.crt");
    for host in ["127.0.0.1", "localhost"] {
        let conninfo = format!("sslmode=verify-full sslrootcert={} host={host}", ca.display());
        let (ok, out, err) = psql(&proxy, &conninfo, "SELECT 1;").await;
        assert!(ok, "verify-full for {host}: {err}");
        assert_eq!(out, "1");
    }
    let other = pki().path("other-ca.crt");
    let (ok, _, _) = psql(&proxy, &format!("sslmode=verify-full sslrootcert={}", other.display()), "SELECT 1;").await;
    assert!(!ok, "a client trusting another CA must refuse pgmux's certificate");

    // Big frames both ways, many messages, through client TLS and server TLS.
    let big = "z".repeat(2 << 20);
    let sql = format!(
        "SELECT length('{big}');\nSELECT length(repeat('x', 3000000));\nSELECT count(*) FROM (SELECT md5(g::text) FROM generate_series(1, 20000) g) s;\nSELECT sum(length(x)) FROM (VALUES ('a'), ('bb')) v(x);\n"
    );
    let (ok, out, err) = psql(&proxy, "sslmode=require", &sql).await;
    assert!(ok, "{err}");
    assert_eq!(out.lines().collect::<Vec<_>>(), [(2 << 20).to_string().as_str(), "3000000", "20000", "3"]);
    let (ok, out, err) = psql(&proxy, "sslmode=require", "SELECT repeat('q', 5000000);").await;
    assert!(ok, "{err}");
    assert_eq!(out.len(), 5_000_000);
    proxy.shutdown().await;
}

#[tokio::test]
async fn client_tls_allow_accepts_both() {
    let cluster = cluster_async().await;
    let proxy = Proxy::start(&config(cluster, "tls_mode = \"allow\"\nserver_tls = \"require\"")).await;
    for mode in ["require", "disable", "prefer"] {
        let (ok, out, err) = psql(&proxy, &format!("sslmode={mode}"), "SELECT 1;").await;
        assert!(ok, "sslmode={mode}: {err}");
        assert_eq!(out, "1");
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn client_tls_disable_declines() {
    let cluster = cluster_async().await;
    let proxy = Proxy::start(&config(cluster, "server_tls = \"require\"")).await;
    let (ok, _, _) = psql(&proxy, "sslmode=require", "SELECT 1;").await;
    assert!(!ok, "no TLS offered with tls_mode = disable");
    let (ok, out, err) = psql(&proxy, "sslmode=prefer", "SELECT 1;").await;
    assert!(ok, "{err}");
    assert_eq!(out, "1");
    proxy.shutdown().await;
}
