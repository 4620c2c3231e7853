//! One server of a cluster: its data directory, its process, its port.

use super::*;

/// The OS identity the servers run as when we are root.
#[derive(Debug, Clone)]
pub(super) struct RunAs {
    pub(super) uid: u32,
    pub(super) gid: u32,
    pub(super) home: PathBuf,
}

pub(super) fn server_os_user() -> Result<Option<RunAs>, ClusterError> {
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
pub(super) struct Env {
    pub(super) bins: PgBinaries,
    pub(super) run_as: Option<RunAs>,
    /// The cluster's temp dir: holds data dirs, logs and Unix sockets.
    pub(super) root: PathBuf,
}

impl Env {
    /// A server-side program, as the `postgres` OS user when we are root.
    pub(super) fn server_cmd(&self, program: &Path) -> Command {
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

    pub(super) fn chown(&self, path: &Path) -> Result<(), ClusterError> {
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
pub(super) fn run(cmd: &mut Command, what: &str) -> Result<String, ClusterError> {
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
    pub(super) name: String,
    pub(super) port: u16,
    pub(super) data_dir: PathBuf,
    pub(super) log_file: PathBuf,
    pub(super) env: Arc<Env>,
}

/// Why one `pg_ctl start` attempt failed.
pub(super) enum StartFailure {
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

    pub(super) fn try_start(&self) -> Result<(), StartFailure> {
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

    pub(super) fn start_error(&self, detail: String) -> ClusterError {
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

    pub(super) fn pg_ctl_stop(&self, mode: &str) -> Result<(), ClusterError> {
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

    /// Re-points a running standby at `primary` (a promoted sibling, say):
    /// it follows the newest timeline there (`recovery_target_timeline`
    /// defaults to `latest`) if its history allows.
    pub fn follow(&self, primary: &Node) -> Result<(), ClusterError> {
        let conninfo = format!("host={HOST} port={} user=postgres application_name={}", primary.port, self.name);
        self.psql(&format!("ALTER SYSTEM SET primary_conninfo = {}", quote_literal(&conninfo)))?;
        self.psql("SELECT pg_reload_conf()").map(drop)
    }

    /// Starts this stopped node as a standby of `primary`: how an old primary
    /// stopped cleanly (so that `primary` received all its WAL) rejoins
    /// after a switchover, without a rewind.
    pub fn start_as_standby_of(&self, primary: &Node) -> Result<(), ClusterError> {
        let signal = self.data_dir.join("standby.signal");
        fs::write(&signal, "").map_err(io_err(format!("write {}", signal.display())))?;
        self.env.chown(&signal)?;
        let auto = self.data_dir.join("postgresql.auto.conf");
        let mut text = fs::read_to_string(&auto).unwrap_or_default();
        let conninfo = format!("host={HOST} port={} user=postgres application_name={}", primary.port, self.name);
        text.push_str(&format!("primary_conninfo = {}\n", quote_literal(&conninfo)));
        fs::write(&auto, text).map_err(io_err(format!("write {}", auto.display())))?;
        self.env.chown(&auto)?;
        self.start()
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
    pub(super) fn write_conf(&self, settings: &[&[(String, String)]]) -> Result<(), ClusterError> {
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
pub(super) fn read_from(path: &Path, offset: u64) -> String {
    let mut buf = Vec::new();
    if let Ok(mut f) = fs::File::open(path)
        && f.seek(SeekFrom::Start(offset)).is_ok()
    {
        let _ = f.read_to_end(&mut buf);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

pub(super) fn conninfo_quote(v: &str) -> String {
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
pub(super) static HANDED_OUT: Mutex<Vec<u16>> = Mutex::new(Vec::new());

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
