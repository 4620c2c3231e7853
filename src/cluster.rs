//! Throwaway PostgreSQL clusters (primary + streaming replicas) for `demo` and tests.
//!
//! A [`Cluster`] lives in a fresh temporary directory: one `initdb`'d primary,
//! `pg_basebackup`'d streaming replicas, server logs next to them. Dropping the
//! cluster (or calling [`Cluster::stop`]) stops every server with
//! `pg_ctl stop -m immediate` and deletes the directory.
//!
//! Everything here is blocking (`std::process`): call it from
//! `tokio::task::spawn_blocking` or before entering async code.
//!
//! When running as root, every PostgreSQL binary runs as the `postgres` OS
//! user, because the server refuses to run as root.

use std::collections::HashSet;
use std::ffi::{CStr, CString, OsString};
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// All servers listen on loopback only.
const HOST: &str = "127.0.0.1";
/// Below the kernel's ephemeral range (32768+), where client sockets could take our port between check and bind.
const PORT_RANGE: std::ops::Range<u16> = 15000..32000;
/// How often [`wait_until`] re-checks its condition.
const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// Attempts to start a postmaster on a fresh port when the chosen one turns out to be taken.
const PORT_ATTEMPTS: usize = 8;
/// The managed settings file, included from `postgresql.conf`; rewritten per node.
const CONF_FILE: &str = "pgmux-cluster.conf";
/// Binaries the cluster cannot work without (`psql` is the harness's admin client).
const REQUIRED: [&str; 5] = ["initdb", "pg_ctl", "postgres", "pg_basebackup", "psql"];
/// Overrides the binary search with one directory.
pub const BINDIR_ENV: &str = "PGMUX_PG_BINDIR";

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "PostgreSQL server binaries not found (initdb, pg_ctl, pg_basebackup). \
         On Debian/Ubuntu: apt-get install postgresql postgresql-contrib \
         (pgbench comes with postgresql-contrib on older releases, with postgresql-client on newer ones). \
         Missing: {missing}; searched {searched}"
    )]
    BinariesNotFound { missing: String, searched: String },
    #[error(
        "running as root, but there is no `postgres` OS user to run PostgreSQL as (the server refuses to run \
         as root). The Debian/Ubuntu postgresql package creates it; otherwise: \
         useradd --system --home-dir /var/lib/postgresql postgres"
    )]
    NoPostgresUser,
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
    #[error("cannot start {node}: {detail}\n--- tail of {log} ---\n{tail}")]
    Start { node: String, detail: String, log: PathBuf, tail: String },
    #[error("timed out: {0}")]
    Timeout(String),
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ClusterError {
    let context = context.into();
    move |source| ClusterError::Io { context, source }
}

/// Polls `cond` every few milliseconds until it returns true (→ `true`) or
/// `deadline` passes (→ `false`). The condition is checked at least once.
pub fn wait_until(deadline: Instant, mut cond: impl FnMut() -> bool) -> bool {
    wait_for(deadline, || cond().then_some(())).is_some()
}

/// Like [`wait_until`], but returns the first `Some` value `f` produces.
pub fn wait_for<T>(deadline: Instant, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

// ---------------------------------------------------------------------------
// Binaries

/// Where the PostgreSQL programs live. All required ones come from one
/// directory so that `initdb`, the server and `pg_basebackup` share a version.
#[derive(Debug, Clone)]
pub struct PgBinaries {
    pub bindir: PathBuf,
    pub initdb: PathBuf,
    pub pg_ctl: PathBuf,
    pub postgres: PathBuf,
    pub pg_basebackup: PathBuf,
    pub psql: PathBuf,
    /// Optional: only the demo needs it.
    pub pgbench: Option<PathBuf>,
}

impl PgBinaries {
    /// Searches `$PGMUX_PG_BINDIR` (if set, exclusively), then `PATH`,
    /// `pg_config --bindir` and `/usr/lib/postgresql/*/bin` (newest first).
    pub fn find() -> Result<PgBinaries, ClusterError> {
        let path_dirs: Vec<PathBuf> =
            std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
        let overridden = std::env::var_os(BINDIR_ENV);
        let (candidates, searched) = match &overridden {
            Some(dir) => (vec![PathBuf::from(dir)], format!("${BINDIR_ENV} ({})", Path::new(dir).display())),
            None => (candidate_dirs(&path_dirs), "PATH, `pg_config --bindir`, /usr/lib/postgresql/*/bin".to_string()),
        };
        // Prefer one directory holding everything (a consistent installation)...
        if let Some(dir) = candidates.iter().find(|d| REQUIRED.iter().all(|b| is_executable(&d.join(b)))) {
            return Ok(PgBinaries::in_dir(dir, &path_dirs));
        }
        // ...and otherwise name what is nowhere to be found.
        let found = |b: &str| {
            candidates.iter().any(|d| is_executable(&d.join(b)))
                || (overridden.is_none() && find_in(&path_dirs, b).is_some())
        };
        let missing: Vec<&str> = REQUIRED.iter().copied().filter(|b| !found(b)).collect();
        let missing = if missing.is_empty() {
            format!("none, but they are spread over several directories; set ${BINDIR_ENV} to one holding them all")
        } else {
            missing.join(", ")
        };
        Err(ClusterError::BinariesNotFound { missing, searched })
    }

    fn in_dir(dir: &Path, path_dirs: &[PathBuf]) -> PgBinaries {
        let pgbench = Some(dir.join("pgbench")).filter(|p| is_executable(p)).or_else(|| find_in(path_dirs, "pgbench"));
        PgBinaries {
            bindir: dir.to_owned(),
            initdb: dir.join("initdb"),
            pg_ctl: dir.join("pg_ctl"),
            postgres: dir.join("postgres"),
            pg_basebackup: dir.join("pg_basebackup"),
            psql: dir.join("psql"),
            pgbench,
        }
    }

    /// `postgres --version`, e.g. `postgres (PostgreSQL) 15.8 (Debian 15.8-1)`.
    pub fn version(&self) -> Result<String, ClusterError> {
        let mut cmd = Command::new(&self.postgres);
        cmd.arg("--version");
        run(&mut cmd, "postgres --version")
    }
}

/// Candidate bin directories in search order, without duplicates.
fn candidate_dirs(path_dirs: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    // A PATH entry is often a symlink farm (/usr/local/bin/initdb ->
    // /usr/lib/postgresql/15/bin/initdb); the real directory is the one with
    // the full set. Debian's pg_wrapper has no initdb, so it is skipped here.
    for d in path_dirs {
        if let Ok(real) = fs::canonicalize(d.join("initdb"))
            && real.file_name().is_some_and(|n| n == "initdb")
            && let Some(parent) = real.parent()
        {
            dirs.push(parent.to_owned());
        }
    }
    if let Some(pg_config) = find_in(path_dirs, "pg_config")
        && let Ok(out) = Command::new(pg_config).arg("--bindir").stderr(Stdio::null()).output()
        && out.status.success()
    {
        let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !dir.is_empty() {
            dirs.push(PathBuf::from(dir));
        }
    }
    let mut versioned: Vec<(Vec<u32>, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let version = name.split('.').map(|s| s.parse().ok()).collect::<Option<Vec<u32>>>()?;
            Some((version, e.path().join("bin")))
        })
        .collect();
    versioned.sort_by(|a, b| b.0.cmp(&a.0));
    dirs.extend(versioned.into_iter().map(|(_, d)| d));

    let mut seen = HashSet::new();
    dirs.retain(|d| seen.insert(d.clone()));
    dirs
}

fn find_in(dirs: &[PathBuf], name: &str) -> Option<PathBuf> {
    dirs.iter().map(|d| d.join(name)).find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

// ---------------------------------------------------------------------------
// Spec

/// A `pg_hba.conf` authentication method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HbaMethod {
    Trust,
    /// Cleartext password.
    Password,
    Md5,
    ScramSha256,
    Reject,
}

impl HbaMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            HbaMethod::Trust => "trust",
            HbaMethod::Password => "password",
            HbaMethod::Md5 => "md5",
            HbaMethod::ScramSha256 => "scram-sha-256",
            HbaMethod::Reject => "reject",
        }
    }
}

/// How the server stores a role's password (`password_encryption` at `CREATE ROLE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasswordStorage {
    Md5,
    ScramSha256,
}

/// A login role plus the `pg_hba.conf` line for it on 127.0.0.1/32.
#[derive(Debug, Clone)]
pub struct ClusterUser {
    pub name: String,
    pub password: Option<String>,
    pub auth: HbaMethod,
    pub storage: PasswordStorage,
    pub superuser: bool,
}

impl ClusterUser {
    fn new(name: &str, password: Option<&str>, auth: HbaMethod, storage: PasswordStorage) -> ClusterUser {
        ClusterUser { name: name.into(), password: password.map(Into::into), auth, storage, superuser: false }
    }

    /// `scram-sha-256` in pg_hba, SCRAM verifier stored.
    pub fn scram(name: &str, password: &str) -> ClusterUser {
        ClusterUser::new(name, Some(password), HbaMethod::ScramSha256, PasswordStorage::ScramSha256)
    }

    /// `md5` in pg_hba, stored as an md5 hash (with a SCRAM verifier the server would silently upgrade to SCRAM).
    pub fn md5(name: &str, password: &str) -> ClusterUser {
        ClusterUser::new(name, Some(password), HbaMethod::Md5, PasswordStorage::Md5)
    }

    /// `password` (cleartext over the wire) in pg_hba.
    pub fn cleartext(name: &str, password: &str) -> ClusterUser {
        ClusterUser::new(name, Some(password), HbaMethod::Password, PasswordStorage::ScramSha256)
    }

    /// `trust` in pg_hba, no password.
    pub fn trust(name: &str) -> ClusterUser {
        ClusterUser::new(name, None, HbaMethod::Trust, PasswordStorage::ScramSha256)
    }

    pub fn superuser(mut self) -> ClusterUser {
        self.superuser = true;
        self
    }
}

/// What to build. The superuser `postgres` always exists and is trusted over
/// loopback and the Unix socket (the harness's admin connections and replication).
///
/// Settings are `(name, value)`; values are written single-quoted, so pass
/// them bare: `("recovery_min_apply_delay", "500ms")`, `("ssl", "on")`.
/// Replicas get the primary's settings (a base backup copies them, and e.g.
/// `max_connections` must not be lower on a hot standby) and then
/// `replica_settings` on top. Later entries win; `ALTER SYSTEM` beats all.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub replicas: usize,
    pub primary_settings: Vec<(String, String)>,
    pub replica_settings: Vec<(String, String)>,
    pub users: Vec<ClusterUser>,
    /// `(name, owner)`, created after the users.
    pub databases: Vec<(String, String)>,
    /// For loopback TCP logins by roles not in `users` (and not `postgres`).
    pub hba_method: HbaMethod,
    /// Raw `pg_hba.conf` lines placed before the per-user lines (e.g. `hostssl ...`).
    pub extra_hba: Vec<String>,
    /// Files written into the primary's data directory before it starts
    /// (mode 0600, e.g. `server.crt`/`server.key` for `ssl = on`); replicas
    /// get them through the base backup.
    pub data_files: Vec<(PathBuf, Vec<u8>)>,
    /// Budget for each server start and for replicas to start streaming.
    pub start_timeout: Duration,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        ClusterSpec {
            replicas: 0,
            primary_settings: Vec::new(),
            replica_settings: Vec::new(),
            users: Vec::new(),
            databases: Vec::new(),
            hba_method: HbaMethod::ScramSha256,
            extra_hba: Vec::new(),
            data_files: Vec::new(),
            start_timeout: Duration::from_secs(60),
        }
    }
}

impl ClusterSpec {
    pub fn replicas(mut self, n: usize) -> Self {
        self.replicas = n;
        self
    }

    pub fn user(mut self, user: ClusterUser) -> Self {
        self.users.push(user);
        self
    }

    pub fn database(mut self, name: &str, owner: &str) -> Self {
        self.databases.push((name.into(), owner.into()));
        self
    }

    pub fn primary_setting(mut self, name: &str, value: &str) -> Self {
        self.primary_settings.push((name.into(), value.into()));
        self
    }

    pub fn replica_setting(mut self, name: &str, value: &str) -> Self {
        self.replica_settings.push((name.into(), value.into()));
        self
    }
}

// ---------------------------------------------------------------------------
// Nodes

/// The OS identity the servers run as when we are root.
#[derive(Debug, Clone)]
struct RunAs {
    uid: u32,
    gid: u32,
    home: PathBuf,
}

fn server_os_user() -> Result<Option<RunAs>, ClusterError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let name = CString::new("postgres").expect("literal without NUL");
    // SAFETY: passwd is plain old data; all-zero is a valid (empty) value.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; the reentrant variant keeps
    // this safe when several test threads start clusters at once.
    let rc = unsafe { libc::getpwnam_r(name.as_ptr(), &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
    if rc != 0 || result.is_null() {
        return Err(ClusterError::NoPostgresUser);
    }
    // SAFETY: on success pw_dir points at a NUL-terminated string inside `buf`, which is still alive.
    let home = unsafe { CStr::from_ptr(pwd.pw_dir) }.to_string_lossy().into_owned();
    Ok(Some(RunAs { uid: pwd.pw_uid, gid: pwd.pw_gid, home: PathBuf::from(home) }))
}

/// What every node of one cluster shares.
#[derive(Debug)]
struct Env {
    bins: PgBinaries,
    run_as: Option<RunAs>,
    /// The cluster's temp dir: holds data dirs, logs and Unix sockets.
    root: PathBuf,
}

impl Env {
    /// A server-side program, as the `postgres` OS user when we are root.
    fn server_cmd(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        scrub_pg_env(&mut cmd);
        // English messages: start failures are recognised by their log text.
        cmd.env("LC_ALL", "C").current_dir(&self.root).stdin(Stdio::null());
        if let Some(r) = &self.run_as {
            // std drops supplementary groups when root sets a uid.
            cmd.uid(r.uid).gid(r.gid).env("HOME", &r.home);
        }
        cmd
    }

    fn chown(&self, path: &Path) -> Result<(), ClusterError> {
        match &self.run_as {
            Some(r) => std::os::unix::fs::chown(path, Some(r.uid), Some(r.gid))
                .map_err(io_err(format!("chown {} to postgres", path.display()))),
            None => Ok(()),
        }
    }
}

/// Removes inherited `PG*` variables (PGHOST, PGPORT, PGDATA, PGSSLMODE, ...)
/// so that the caller's environment cannot redirect the harness's commands.
pub fn scrub_pg_env(cmd: &mut Command) {
    for key in pg_env_keys() {
        cmd.env_remove(key);
    }
}

/// The names of the `PG*` variables in our environment.
pub fn pg_env_keys() -> Vec<OsString> {
    std::env::vars_os().map(|(k, _)| k).filter(|k| k.to_string_lossy().starts_with("PG")).collect()
}

/// Runs `cmd`; on failure the error carries its exit status and output.
fn run(cmd: &mut Command, what: &str) -> Result<String, ClusterError> {
    let out = cmd.stdin(Stdio::null()).output().map_err(io_err(format!("cannot run {what}")))?;
    let stdout = String::from_utf8_lossy(&out.stdout).trim_end().to_string();
    if out.status.success() {
        return Ok(stdout);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    Err(ClusterError::Command {
        command: what.to_string(),
        detail: format!("{}: {}{}", out.status, stderr.trim(), if stdout.is_empty() { "" } else { "\n" }) + &stdout,
    })
}

/// One server of a [`Cluster`]. Cheap to clone; clones address the same server.
#[derive(Debug, Clone)]
pub struct Node {
    name: String,
    port: u16,
    data_dir: PathBuf,
    log_file: PathBuf,
    env: Arc<Env>,
}

/// Why one `pg_ctl start` attempt failed.
enum StartFailure {
    PortTaken,
    Other(ClusterError),
}

impl Node {
    /// `primary`, `replica1`, ...; also the server's `cluster_name` (and so the
    /// replica's `application_name` in `pg_stat_replication`).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn host(&self) -> &'static str {
        HOST
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// `127.0.0.1:PORT`, the form `proxy.toml` uses.
    pub fn host_port(&self) -> String {
        format!("{HOST}:{}", self.port)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn log_file(&self) -> &Path {
        &self.log_file
    }

    /// A libpq/tokio-postgres key-value connection string (no password).
    pub fn connection_string(&self, user: &str, db: &str) -> String {
        format!("host={HOST} port={} user={} dbname={}", self.port, conninfo_quote(user), conninfo_quote(db))
    }

    /// Runs `sql` as `postgres` in database `postgres`; returns unaligned,
    /// tuples-only output (`t`/`f` for booleans, `|` between columns).
    pub fn psql(&self, sql: &str) -> Result<String, ClusterError> {
        self.psql_db("postgres", sql)
    }

    pub fn psql_db(&self, db: &str, sql: &str) -> Result<String, ClusterError> {
        let mut cmd = Command::new(&self.env.bins.psql);
        scrub_pg_env(&mut cmd);
        cmd.env("PGCONNECT_TIMEOUT", "10")
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h", HOST, "-U", "postgres"])
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-d")
            .arg(db)
            .arg("-c")
            .arg(sql);
        run(&mut cmd, &format!("psql -p {} -c {sql:?}", self.port))
    }

    /// Starts the server and waits until it accepts connections (for a
    /// standby: until it reached a consistent state).
    pub fn start(&self) -> Result<(), ClusterError> {
        match self.try_start() {
            Ok(()) => Ok(()),
            Err(StartFailure::PortTaken) => Err(self.start_error(format!("port {} is taken", self.port))),
            Err(StartFailure::Other(e)) => Err(e),
        }
    }

    fn try_start(&self) -> Result<(), StartFailure> {
        // Only this attempt's log lines decide whether the port was the problem.
        let log_start = fs::metadata(&self.log_file).map(|m| m.len()).unwrap_or(0);
        let mut cmd = self.env.server_cmd(&self.env.bins.pg_ctl);
        cmd.args(["start", "-w", "-t", "60", "-D"]).arg(&self.data_dir).arg("-l").arg(&self.log_file);
        match run(&mut cmd, &format!("pg_ctl start ({})", self.name)) {
            Ok(_) => Ok(()),
            Err(e) => {
                let log = read_from(&self.log_file, log_start);
                if log.contains("could not bind") || log.contains("could not create any TCP/IP sockets") {
                    Err(StartFailure::PortTaken)
                } else {
                    Err(StartFailure::Other(self.start_error(e.to_string())))
                }
            }
        }
    }

    fn start_error(&self, detail: String) -> ClusterError {
        ClusterError::Start { node: self.name.clone(), detail, log: self.log_file.clone(), tail: self.log_tail(30) }
    }

    /// Clean shutdown (`-m fast`: disconnects clients, checkpoints).
    pub fn stop(&self) -> Result<(), ClusterError> {
        self.pg_ctl_stop("fast")
    }

    /// Crash-like shutdown (`-m immediate`): the way to simulate a dead server.
    pub fn stop_immediate(&self) -> Result<(), ClusterError> {
        self.pg_ctl_stop("immediate")
    }

    fn pg_ctl_stop(&self, mode: &str) -> Result<(), ClusterError> {
        let mut cmd = self.env.server_cmd(&self.env.bins.pg_ctl);
        cmd.args(["stop", "-w", "-t", "60", "-m", mode, "-D"]).arg(&self.data_dir);
        run(&mut cmd, &format!("pg_ctl stop -m {mode} ({})", self.name)).map(drop)
    }

    /// Fast stop, then start on the same port.
    pub fn restart(&self) -> Result<(), ClusterError> {
        self.stop()?;
        self.start()
    }

    /// Promotes a standby to a primary and waits until it accepts writes.
    pub fn promote(&self) -> Result<(), ClusterError> {
        let mut cmd = self.env.server_cmd(&self.env.bins.pg_ctl);
        cmd.args(["promote", "-w", "-t", "60", "-D"]).arg(&self.data_dir);
        run(&mut cmd, &format!("pg_ctl promote ({})", self.name)).map(drop)
    }

    /// Whether a postmaster is running on this data directory.
    pub fn is_running(&self) -> bool {
        let mut cmd = self.env.server_cmd(&self.env.bins.pg_ctl);
        cmd.arg("status").arg("-D").arg(&self.data_dir).stdout(Stdio::null()).stderr(Stdio::null());
        cmd.status().is_ok_and(|s| s.success())
    }

    /// The last `lines` lines of the server log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = read_from(&self.log_file, 0);
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Writes this node's managed settings file (included from postgresql.conf).
    fn write_conf(&self, settings: &[&[(String, String)]]) -> Result<(), ClusterError> {
        let root = self.env.root.to_string_lossy();
        let mut text = String::from("# Written by pgmux::cluster for a throwaway test/demo server.\n");
        let base = [
            ("listen_addresses", HOST.to_string()),
            ("port", self.port.to_string()),
            ("unix_socket_directories", root.into_owned()),
            ("cluster_name", self.name.clone()),
            ("wal_level", "replica".into()),
            ("max_wal_senders", "10".into()),
            ("max_replication_slots", "10".into()),
            ("hot_standby", "on".into()),
            // Replicas report their replay position every second, so lag shows up promptly.
            ("wal_receiver_status_interval", "1s".into()),
            // Throwaway data: surviving an OS crash is pointless, speed is not.
            ("fsync", "off".into()),
            ("max_connections", "200".into()),
            // Small, so that several clusters fit on one machine.
            ("shared_buffers", "32MB".into()),
        ];
        let base: Vec<(String, String)> = base.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        for (k, v) in std::iter::once(base.as_slice()).chain(settings.iter().copied()).flatten() {
            text.push_str(&format!("{k} = '{}'\n", v.replace('\\', "\\\\").replace('\'', "''")));
        }
        let path = self.data_dir.join(CONF_FILE);
        fs::write(&path, text).map_err(io_err(format!("write {}", path.display())))?;
        self.env.chown(&path)
    }
}

/// Reads `path` from byte `offset` on; empty if unreadable (a log may not exist yet).
fn read_from(path: &Path, offset: u64) -> String {
    let mut buf = Vec::new();
    if let Ok(mut f) = fs::File::open(path)
        && f.seek(SeekFrom::Start(offset)).is_ok()
    {
        let _ = f.read_to_end(&mut buf);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

fn conninfo_quote(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// `"name"` as an SQL identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `'text'` as an SQL string literal (standard_conforming_strings is on).
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Ports handed out by this process but perhaps not bound yet, so that two
/// clusters started concurrently never pick the same one.
static HANDED_OUT: Mutex<Vec<u16>> = Mutex::new(Vec::new());

/// A loopback port below the ephemeral range that is free right now and
/// not handed out before by this process. Also for tests and benchmarks
/// that start a server of their own next to the cluster.
pub fn pick_port() -> Result<u16, ClusterError> {
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(PoisonError::into_inner);
    for _ in 0..1000 {
        let port = rand::random_range(PORT_RANGE);
        if handed_out.contains(&port) {
            continue;
        }
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            handed_out.push(port);
            return Ok(port);
        }
    }
    Err(ClusterError::Io {
        context: format!("no free loopback port in {PORT_RANGE:?}"),
        source: std::io::ErrorKind::AddrInUse.into(),
    })
}

// ---------------------------------------------------------------------------
// Cluster

/// A running primary plus streaming replicas in a temp dir; see the module docs.
#[derive(Debug)]
pub struct Cluster {
    primary: Node,
    replicas: Vec<Node>,
    env: Arc<Env>,
    /// `None` once stopped: makes [`Cluster::stop`] idempotent and callable
    /// through `&'static Cluster` (e.g. from an `atexit` hook).
    root: Mutex<Option<TempDir>>,
}

/// Owns what a half-built cluster has started, so that an error stops it.
struct Partial {
    root: Option<TempDir>,
    nodes: Vec<Node>,
}

impl Drop for Partial {
    fn drop(&mut self) {
        if self.root.is_some() {
            for node in &self.nodes {
                let _ = node.stop_immediate();
            }
        }
    }
}

impl Cluster {
    /// Finds the binaries and starts a cluster; see [`Cluster::start_with`].
    pub fn start(spec: &ClusterSpec) -> Result<Cluster, ClusterError> {
        Cluster::start_with(PgBinaries::find()?, spec)
    }

    /// Creates, configures and starts the primary, its users and databases,
    /// then the replicas, and returns once every replica is streaming.
    pub fn start_with(bins: PgBinaries, spec: &ClusterSpec) -> Result<Cluster, ClusterError> {
        let run_as = server_os_user()?;
        let root = tempfile::Builder::new().prefix("pgmux-cluster-").tempdir().map_err(io_err("create temp dir"))?;
        let env = Arc::new(Env { bins, run_as, root: root.path().to_owned() });
        env.chown(&env.root)?;
        let mut partial = Partial { root: Some(root), nodes: Vec::new() };

        let primary = Cluster::init_primary(&env, spec)?;
        partial.nodes.push(primary.clone());
        let primary = start_on_free_port(primary, &[&spec.primary_settings])?;
        partial.nodes[0] = primary.clone();
        create_roles(&primary, spec)?;

        let mut replicas = Vec::new();
        for i in 1..=spec.replicas {
            let replica = Cluster::base_backup(&env, &primary, &format!("replica{i}"))?;
            partial.nodes.push(replica.clone());
            let replica = start_on_free_port(replica, &[&spec.primary_settings, &spec.replica_settings])?;
            *partial.nodes.last_mut().expect("pushed above") = replica.clone();
            replicas.push(replica);
        }
        let deadline = Instant::now() + spec.start_timeout;
        for replica in &replicas {
            wait_streaming(&primary, replica, deadline)?;
        }

        let root = partial.root.take();
        Ok(Cluster { primary, replicas, env, root: Mutex::new(root) })
    }

    fn init_primary(env: &Arc<Env>, spec: &ClusterSpec) -> Result<Node, ClusterError> {
        let node = new_node(env, "primary");
        let mut cmd = env.server_cmd(&env.bins.initdb);
        // --no-sync: see fsync = off. -U: the superuser is `postgres` whoever we run as.
        cmd.arg("-D").arg(&node.data_dir).args([
            "-U",
            "postgres",
            "--auth-local=trust",
            "--auth-host=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]);
        run(&mut cmd, "initdb")?;

        let conf = node.data_dir.join("postgresql.conf");
        let mut text = fs::read_to_string(&conf).map_err(io_err(format!("read {}", conf.display())))?;
        text.push_str(&format!("\ninclude = '{CONF_FILE}'\n"));
        // Overwriting in place keeps the file's owner.
        fs::write(&conf, text).map_err(io_err(format!("write {}", conf.display())))?;

        let hba = node.data_dir.join("pg_hba.conf");
        fs::write(&hba, hba_conf(spec)).map_err(io_err(format!("write {}", hba.display())))?;

        for (rel, contents) in &spec.data_files {
            let path = node.data_dir.join(rel);
            fs::write(&path, contents).map_err(io_err(format!("write {}", path.display())))?;
            // The server insists on private key files being private.
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
                .map_err(io_err(format!("chmod {}", path.display())))?;
            env.chown(&path)?;
        }
        Ok(node)
    }

    fn base_backup(env: &Arc<Env>, primary: &Node, name: &str) -> Result<Node, ClusterError> {
        let node = new_node(env, name);
        let mut cmd = env.server_cmd(&env.bins.pg_basebackup);
        // -R: standby.signal + primary_conninfo; -c fast: don't wait for a spread checkpoint.
        cmd.arg("-D").arg(&node.data_dir).args(["-R", "-X", "stream", "-c", "fast", "--no-sync", "-h", HOST]).args([
            "-p",
            &primary.port.to_string(),
            "-U",
            "postgres",
        ]);
        run(&mut cmd, &format!("pg_basebackup ({name})"))?;
        Ok(node)
    }

    pub fn primary(&self) -> &Node {
        &self.primary
    }

    pub fn replicas(&self) -> &[Node] {
        &self.replicas
    }

    /// The primary, then the replicas.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        std::iter::once(&self.primary).chain(&self.replicas)
    }

    /// The temp dir holding data dirs, logs and sockets.
    pub fn root_dir(&self) -> &Path {
        &self.env.root
    }

    pub fn binaries(&self) -> &PgBinaries {
        &self.env.bins
    }

    /// Waits until every running replica has replayed the primary's current
    /// WAL position, i.e. sees everything committed so far.
    pub fn wait_replicas_caught_up(&self, timeout: Duration) -> Result<(), ClusterError> {
        let lsn = self.primary.psql("SELECT pg_current_wal_lsn()")?;
        let deadline = Instant::now() + timeout;
        let sql = format!("SELECT pg_last_wal_replay_lsn() >= {}::pg_lsn", quote_literal(&lsn));
        for replica in &self.replicas {
            if !wait_until(deadline, || replica.psql(&sql).is_ok_and(|r| r == "t")) {
                return Err(ClusterError::Timeout(format!("{} did not replay up to {lsn}", replica.name)));
            }
        }
        Ok(())
    }

    /// Stops every server (`-m immediate`) and deletes the temp dir. Idempotent;
    /// also run by `Drop`.
    pub fn stop(&self) {
        let Some(root) = self.root.lock().unwrap_or_else(PoisonError::into_inner).take() else {
            return;
        };
        for node in self.replicas.iter().chain(std::iter::once(&self.primary)) {
            // Failure means it is not running (e.g. a test stopped it): nothing to do.
            let _ = node.stop_immediate();
        }
        if let Err(e) = root.close() {
            tracing::warn!(dir = %self.env.root.display(), error = %e, "cannot remove the cluster's temp dir");
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

fn new_node(env: &Arc<Env>, name: &str) -> Node {
    Node {
        name: name.to_string(),
        port: 0,
        data_dir: env.root.join(name),
        log_file: env.root.join(format!("{name}.log")),
        env: Arc::clone(env),
    }
}

/// Starts `node` on a random free port, moving to another port if the
/// postmaster finds it taken after all (another process won the race).
fn start_on_free_port(mut node: Node, settings: &[&[(String, String)]]) -> Result<Node, ClusterError> {
    for _ in 0..PORT_ATTEMPTS {
        node.port = pick_port()?;
        node.write_conf(settings)?;
        match node.try_start() {
            Ok(()) => return Ok(node),
            Err(StartFailure::PortTaken) => {
                tracing::debug!(node = %node.name, port = node.port, "port taken, retrying on another");
            }
            Err(StartFailure::Other(e)) => return Err(e),
        }
    }
    Err(node.start_error(format!("no free port after {PORT_ATTEMPTS} attempts")))
}

fn hba_conf(spec: &ClusterSpec) -> String {
    let mut text = String::from(
        "# Written by pgmux::cluster; the first matching line wins.\n\
         local all all trust\n\
         host all postgres 127.0.0.1/32 trust\n\
         host replication postgres 127.0.0.1/32 trust\n",
    );
    for line in &spec.extra_hba {
        text.push_str(line);
        text.push('\n');
    }
    for user in &spec.users {
        text.push_str(&format!("host all {} 127.0.0.1/32 {}\n", quote_ident(&user.name), user.auth.as_str()));
    }
    text.push_str(&format!("host all all 127.0.0.1/32 {}\n", spec.hba_method.as_str()));
    text
}

fn create_roles(primary: &Node, spec: &ClusterSpec) -> Result<(), ClusterError> {
    for user in &spec.users {
        let encryption = match user.storage {
            PasswordStorage::Md5 => "md5",
            PasswordStorage::ScramSha256 => "scram-sha-256",
        };
        let password = user.password.as_deref().map(|p| format!(" PASSWORD {}", quote_literal(p))).unwrap_or_default();
        let superuser = if user.superuser { " SUPERUSER" } else { "" };
        primary.psql(&format!(
            "SET password_encryption = '{encryption}'; CREATE ROLE {} LOGIN{superuser}{password}",
            quote_ident(&user.name)
        ))?;
    }
    for (name, owner) in &spec.databases {
        // Alone: CREATE DATABASE cannot run inside the implicit transaction of a multi-statement -c.
        primary.psql(&format!("CREATE DATABASE {} OWNER {}", quote_ident(name), quote_ident(owner)))?;
    }
    Ok(())
}

/// Waits until `replica` is in recovery and the primary sees it streaming.
fn wait_streaming(primary: &Node, replica: &Node, deadline: Instant) -> Result<(), ClusterError> {
    let streaming = format!(
        "SELECT count(*) FROM pg_stat_replication WHERE application_name = {} AND state = 'streaming'",
        quote_literal(&replica.name)
    );
    let ok = wait_until(deadline, || {
        replica.psql("SELECT pg_is_in_recovery()").is_ok_and(|r| r == "t")
            && primary.psql(&streaming).is_ok_and(|r| r == "1")
    });
    if ok {
        return Ok(());
    }
    Err(ClusterError::Start {
        node: replica.name.clone(),
        detail: "replica did not start streaming in time".into(),
        log: replica.log_file.clone(),
        tail: replica.log_tail(30),
    })
}
