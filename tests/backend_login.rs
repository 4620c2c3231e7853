//! `login_backend` against a real PostgreSQL, one role per auth method.
//!
//! Self-contained on purpose: it starts its own throwaway cluster (initdb,
//! pg_ctl) in a temp dir on a free loopback port and stops it on drop, even
//! when an assertion fails. Needs the PostgreSQL server binaries: `PG_BIN`,
//! else `/usr/lib/postgresql/15/bin`, else `PATH`. As root, the server runs
//! as the `postgres` OS user (Postgres refuses to run as root).

use std::path::{Path, PathBuf};
use std::process::Command;

use pgmux::auth::{BackendLoginError, ServerHello, login_backend};
use pgmux::protocol::sqlstate::SqlState;
use tokio::net::TcpStream;

const HBA: &str = "\
local all all                    trust
host  all trust_user 127.0.0.1/32 trust
host  all md5_user   127.0.0.1/32 md5
host  all clear_user 127.0.0.1/32 password
host  all all        127.0.0.1/32 scram-sha-256
";

const ROLES: &str = "\
CREATE ROLE scram_user LOGIN PASSWORD 'scram pw';
SET password_encryption = 'md5';
CREATE ROLE md5_user LOGIN PASSWORD 'md5 pw';
RESET password_encryption;
CREATE ROLE clear_user LOGIN PASSWORD 'clear pw';
CREATE ROLE trust_user LOGIN;
";

struct Postgres {
    bin: PathBuf,
    /// Holds the data dir, socket and log; removed after the server stops.
    dir: tempfile::TempDir,
    port: u16,
    started: bool,
}

impl Postgres {
    fn start() -> Postgres {
        let bin = pg_bin();
        let dir = tempfile::Builder::new().prefix("pgmux-backend-login-").tempdir().expect("temp dir");
        let mut pg =
            Postgres { bin, dir, port: pgmux::cluster::pick_port().expect("a free loopback port"), started: false };
        if is_root() {
            run(Command::new("chown").arg("postgres:").arg(pg.dir.path()));
        }
        let data = pg.data_dir();
        run(pg.command("initdb").arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-sync",
            "-E",
            "UTF8",
        ]));
        // Root can write into the postgres-owned file without changing its owner.
        std::fs::write(data.join("pg_hba.conf"), HBA).expect("write pg_hba.conf");
        let options = format!(
            "-c port={} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c fsync=off",
            pg.port,
            pg.dir.path().display()
        );
        let log = pg.dir.path().join("postgres.log");
        let started = pg
            .command("pg_ctl")
            .arg("start")
            .arg("-w")
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(&log)
            .args(["-o", &options])
            .output();
        pg.started = true; // Stop on drop even if start half-worked.
        if !started.is_ok_and(|o| o.status.success()) {
            panic!("pg_ctl start failed; log:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
        }
        run(pg
            .command("psql")
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-U", "postgres", "-d", "postgres", "-h"])
            .arg(pg.dir.path())
            .args(["-p", &pg.port.to_string(), "-c", ROLES]));
        pg
    }

    /// One value, from psql over the Unix socket as the superuser.
    fn query(&self, sql: &str) -> String {
        let out = self
            .command("psql")
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-U", "postgres", "-d", "postgres", "-h"])
            .arg(self.dir.path())
            .args(["-p", &self.port.to_string(), "-c", sql])
            .output()
            .expect("run psql");
        assert!(out.status.success(), "{sql}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn command(&self, tool: &str) -> Command {
        let path = self.bin.join(tool);
        if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    async fn login(&self, user: &str, db: &str, password: Option<&str>) -> Result<ServerHello, BackendLoginError> {
        let credential = password.map(|p| pgmux::auth::Credential::Password(p.to_owned()));
        self.login_with(user, db, credential.as_ref()).await
    }

    async fn login_with(
        &self,
        user: &str,
        db: &str,
        credential: Option<&pgmux::auth::Credential>,
    ) -> Result<ServerHello, BackendLoginError> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).await.expect("connect to postgres");
        login_backend(&mut stream, user, db, credential, &[("application_name", "pgmux-test")]).await
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.started {
            let _ = self.command("pg_ctl").arg("stop").args(["-m", "immediate", "-D"]).arg(self.data_dir()).output();
        }
    }
}

fn pg_bin() -> PathBuf {
    if let Some(dir) = std::env::var_os("PG_BIN") {
        return dir.into();
    }
    let debian = Path::new("/usr/lib/postgresql/15/bin");
    if debian.join("initdb").exists() {
        return debian.to_owned();
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .find(|d| d.join("initdb").exists())
        .expect("PostgreSQL server binaries not found: set PG_BIN")
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn assert_hello(hello: &ServerHello) {
    assert_ne!(hello.pid, 0);
    let param = |name: &str| hello.params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    assert!(param("server_version").is_some_and(|v| !v.is_empty()), "{:?}", hello.params);
    // Startup params reach the server.
    assert_eq!(param("application_name"), Some("pgmux-test"));
}

fn assert_server_error(r: Result<ServerHello, BackendLoginError>, want: SqlState, text: &str) {
    match r {
        Err(e @ BackendLoginError::Server { .. }) => {
            assert_eq!(e.sqlstate(), want, "{e}");
            let BackendLoginError::Server { code, message } = &e else { unreachable!() };
            assert_eq!(code, want.code());
            assert!(message.contains(text), "{message}");
        }
        other => panic!("expected a {want} server error, got {other:?}"),
    }
}

#[tokio::test]
async fn login_with_every_auth_method() {
    let pg = Postgres::start();

    for (user, password) in [
        ("scram_user", Some("scram pw")),
        ("md5_user", Some("md5 pw")),
        ("clear_user", Some("clear pw")),
        ("trust_user", None),
    ] {
        let hello = pg.login(user, "postgres", password).await.unwrap_or_else(|e| panic!("{user}: {e}"));
        assert_hello(&hello);
    }

    for user in ["scram_user", "md5_user", "clear_user"] {
        let r = pg.login(user, "postgres", Some("wrong")).await;
        assert_server_error(
            r,
            SqlState::INVALID_PASSWORD,
            &format!("password authentication failed for user \"{user}\""),
        );
    }

    let r = pg.login("scram_user", "no_such_db", Some("scram pw")).await;
    assert_server_error(r, SqlState::INVALID_CATALOG_NAME, "database \"no_such_db\" does not exist");

    let r = pg.login("scram_user", "postgres", None).await;
    assert!(matches!(r, Err(BackendLoginError::NoPassword { method: "SCRAM-SHA-256" })), "{r:?}");
    let r = pg.login("md5_user", "postgres", None).await;
    assert!(matches!(r, Err(BackendLoginError::NoPassword { method: "md5" })), "{r:?}");
}

/// The keys a client's SCRAM proof reveals to a server holding `stored`
/// (as pgmux gets them when it checks a client against an auth_query result).
fn keys_from_client_proof(stored: &str, password: &str) -> pgmux::auth::ScramKeys {
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
    let mut server =
        pgmux::auth::ScramServer::new(pgmux::auth::ScramVerifier::parse(stored).expect("a SCRAM verifier"));
    let mut client = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
    let server_first = server.server_first(client.message()).unwrap();
    client.update(&server_first).unwrap();
    let server_final = server.verify_final(client.message()).expect("the client's proof matches");
    client.finish(&server_final).unwrap();
    server.keys().expect("keys after a matching proof").clone()
}

/// SCRAM and md5 pass-through: pgmux logs in to Postgres with what a
/// client's login proved, never the plaintext. A changed password makes the
/// old keys fail as a wrong password would.
#[tokio::test]
async fn login_with_what_a_client_proved() {
    use pgmux::auth::Credential;
    let pg = Postgres::start();
    let stored = pg.query("SELECT rolpassword FROM pg_catalog.pg_authid WHERE rolname = 'scram_user'");
    let keys = Credential::Scram(keys_from_client_proof(&stored, "scram pw"));
    assert_hello(&pg.login_with("scram_user", "postgres", Some(&keys)).await.expect("SCRAM pass-through"));

    let md5 = Credential::Md5Hash(pgmux::auth::md5::stored_hash("md5 pw", "md5_user"));
    assert_hello(&pg.login_with("md5_user", "postgres", Some(&md5)).await.expect("md5 with the stored hash"));

    // Each credential serves only its method.
    let r = pg.login_with("scram_user", "postgres", Some(&md5)).await;
    assert!(matches!(r, Err(BackendLoginError::NoPassword { method: "SCRAM-SHA-256" })), "{r:?}");
    let r = pg.login_with("md5_user", "postgres", Some(&keys)).await;
    assert!(matches!(r, Err(BackendLoginError::NoPassword { method: "md5" })), "{r:?}");

    // Keys of another verifier (here: the password after a change) are refused.
    pg.query("ALTER ROLE scram_user PASSWORD 'changed pw'");
    let r = pg.login_with("scram_user", "postgres", Some(&keys)).await;
    assert_server_error(r, SqlState::INVALID_PASSWORD, "password authentication failed for user \"scram_user\"");
    let stored = pg.query("SELECT rolpassword FROM pg_catalog.pg_authid WHERE rolname = 'scram_user'");
    let fresh = Credential::Scram(keys_from_client_proof(&stored, "changed pw"));
    assert_hello(&pg.login_with("scram_user", "postgres", Some(&fresh)).await.expect("the new password's keys"));
}
