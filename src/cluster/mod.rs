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

mod binaries;
mod node;
mod spec;

pub use binaries::PgBinaries;
use node::{Env, StartFailure, run, server_os_user};
pub use node::{Node, pg_env_keys, pick_port, quote_ident, quote_literal, scrub_pg_env};
pub use spec::{ClusterSpec, ClusterUser, HbaMethod, PasswordStorage};

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
