//! `pgmux convert`: the binary on Debian's packaged pgbouncer.ini, and a
//! production-like configuration converted, checked and served against the
//! test cluster.

mod support;

use std::path::Path;
use std::process::Output;

use support::{APP, DB, scalar};

fn pgmux(args: &[&std::ffi::OsStr]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_pgmux")).args(args).output().expect("run pgmux")
}

fn convert(ini: &Path, userlist: Option<&Path>) -> (String, String) {
    let mut args = vec![std::ffi::OsStr::new("convert"), ini.as_os_str()];
    args.extend(userlist.map(Path::as_os_str));
    let out = pgmux(&args);
    assert!(out.status.success(), "convert failed: {}", String::from_utf8_lossy(&out.stderr));
    (String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

fn check(toml: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, toml).unwrap();
    pgmux(&["check".as_ref(), "--config".as_ref(), path.as_os_str()])
}

/// The example configuration Debian's `pgbouncer` package installs: no
/// databases, no users, a Unix socket, a log file. Everything it sets is
/// either carried over or named with a reason, and `pgmux check` says the
/// one thing missing.
#[test]
fn debian_packaged_configuration() {
    let ini = Path::new("/etc/pgbouncer/pgbouncer.ini");
    assert!(
        ini.exists(),
        "{} is missing: this test converts Debian's packaged PgBouncer configuration (apt-get install pgbouncer)",
        ini.display()
    );
    let userlist = Path::new("/etc/pgbouncer/userlist.txt");
    let (toml, stderr) = convert(ini, userlist.exists().then_some(userlist));
    // listen_addr = localhost, listen_port = 6432.
    assert!(toml.contains("listen = \"127.0.0.1:6432\""), "{toml}");
    // Its Unix socket carries over, beside the TCP address.
    assert!(toml.contains("unix_socket_dir = \"/var/run/postgresql\""), "{toml}");
    for key in ["logfile", "pidfile", "[databases]"] {
        assert!(stderr.contains(&format!("  {key}: ")), "{key} not reported: {stderr}");
        assert!(toml.contains(&format!("#   {key}: ")), "{key} not in the output: {toml}");
    }
    let out = check(&toml);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no [[databases]] entry"), "{out:?}");
}

/// A production-like configuration pointing at the test cluster: converted,
/// accepted by `pgmux check`, served: a user of the auth_file logs in with
/// SCRAM and runs a transaction through pgmux.
#[tokio::test]
async fn converted_configuration_serves_clients() {
    let cluster = support::cluster_async().await;
    let port = pgmux::cluster::pick_port().expect("a free loopback port");
    let dir = tempfile::tempdir().unwrap();
    let ini = dir.path().join("pgbouncer.ini");
    let userlist = dir.path().join("userlist.txt");
    std::fs::write(
        &ini,
        format!(
            "[databases]\n{DB} = host=127.0.0.1 port={pg} dbname={DB} pool_size=3\nother = host=/tmp dbname=x\n\n\
             [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nauth_type = scram-sha-256\n\
             auth_file = {userlist}\nadmin_users = {user}\npool_mode = transaction\nmax_client_conn = 50\n\
             query_wait_timeout = 7\nserver_reset_query = DISCARD ALL\nlogfile = /dev/null\n",
            pg = cluster.primary().port(),
            userlist = userlist.display(),
            user = APP.0,
        ),
    )
    .unwrap();
    std::fs::write(&userlist, format!("\"{}\" \"{}\"\n", APP.0, APP.1)).unwrap();

    let (toml, stderr) = convert(&ini, Some(&userlist));
    for key in ["server_reset_query", "logfile"] {
        assert!(stderr.contains(&format!("  {key}")), "{key} not reported: {stderr}");
    }
    // A database on a Unix socket carries over as its socket directory.
    assert!(toml.contains("primary = \"/tmp:5432\""), "{toml}");
    let checked = check(&toml);
    assert!(checked.status.success(), "pgmux check refused the output: {checked:?}\n{toml}");

    let config_dir = tempfile::tempdir().unwrap();
    let path = config_dir.path().join("proxy.toml");
    std::fs::write(&path, &toml).unwrap();
    let _child = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgmux"))
        .arg("--config")
        .arg(&path)
        .args(["--log-level", "warn"])
        .kill_on_drop(true)
        .spawn()
        .expect("start pgmux");
    let url = format!("host=127.0.0.1 port={port} user={} password={} dbname={DB} connect_timeout=5", APP.0, APP.1);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let client = loop {
        match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
            Ok((client, conn)) => {
                tokio::spawn(conn);
                break client;
            }
            // Not listening yet.
            Err(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) => panic!("could not log in through the converted configuration: {e}"),
        }
    };
    let n: i64 = scalar(&client, "SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE datname = current_database()")
        .await
        .parse()
        .unwrap();
    assert!(n >= 1);
    let admin_url = format!("host=127.0.0.1 port={port} user={} password={} dbname=pgbouncer", APP.0, APP.1);
    let (admin, conn) =
        tokio_postgres::connect(&admin_url, tokio_postgres::NoTls).await.expect("admin_users carried over");
    tokio::spawn(conn);
    let rows = admin.simple_query("SHOW CONFIG").await.unwrap();
    let wait = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("proxy.query_wait_timeout") => {
            r.get(1).map(str::to_owned)
        }
        _ => None,
    });
    assert_eq!(wait.as_deref(), Some("7s"));
}
