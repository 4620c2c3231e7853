//! `proxy.toml`: types, defaults, loading and validation.
//!
//! Loaded once at start (and on reload); the rest of pgmux reads a shared
//! `Arc<Config>` and never mutates it.

mod addr;
mod duration;
mod locate;
mod set;
mod validate;
pub mod values;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use addr::{Listen, check_host_port};
pub use duration::parse_duration;
use locate::Locator;

/// Every key at its default and nothing to serve: what `SHOW CONFIG` compares
/// against. Not a valid configuration (see [`Config::parse`]).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub proxy: ProxyConfig,
    #[serde(default)]
    pub routing: RoutingConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub databases: Vec<DatabaseConfig>,
    #[serde(default)]
    pub users: Vec<UserConfig>,
    /// The other pgmux instances cancel requests may be forwarded to.
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolMode {
    Transaction,
    Session,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IoMode {
    Epoll,
    Uring,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnSessionState {
    Pin,
    Error,
    Allow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsMode {
    Disable,
    Allow,
    Require,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServerTlsMode {
    Disable,
    Prefer,
    Require,
    VerifyFull,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// `ip:port`, or a Unix-domain socket (`"/dir:port"` or a file's path).
    #[serde(deserialize_with = "addr::listen")]
    pub listen: Listen,
    /// A Unix-domain socket beside a TCP `listen`, as PgBouncer's
    /// `unix_socket_dir`: `<dir>/.s.PGSQL.<listen's port>`.
    pub unix_socket_dir: Option<PathBuf>,
    /// The socket file's permissions (PgBouncer's default, 0777: the
    /// directory's and the password check do the guarding).
    #[serde(deserialize_with = "addr::file_mode")]
    pub unix_socket_mode: u32,
    /// The socket file's group (a name or a number); the process's when unset.
    pub unix_socket_group: Option<String>,
    #[serde(deserialize_with = "addr::opt_socket_addr")]
    pub metrics_listen: Option<SocketAddr>,
    /// Bind `listen` with SO_REUSEPORT, so that several pgmux processes
    /// share the address (the kernel spreads connections over them).
    pub so_reuseport: bool,
    /// This instance's own address, never shared: the one its peers forward
    /// cancel requests to, and an operator reaches this very instance on
    /// (its admin console). Serves exactly what `listen` serves.
    #[serde(deserialize_with = "addr::opt_socket_addr")]
    pub peer_listen: Option<SocketAddr>,
    /// This instance's number among its peers, carried in every cancel key
    /// it issues (1..=16383); 0 turns peering off.
    pub peer_id: u32,
    /// Threads serving connections: 1 runs everything on one thread (a
    /// current-thread runtime, like PgBouncer's single process), N > 1 a
    /// work-stealing runtime of N threads, 0 one thread per CPU core.
    pub workers: usize,
    /// How pooled connections' bytes move: `epoll` (readiness, then
    /// `recv`/`send`) or `uring` (batched io_uring submissions; needs
    /// `workers = 1`, falls back to epoll where the kernel refuses it).
    pub io: IoMode,
    /// How long a serving thread that ran out of work may poll for more
    /// before it sleeps (the window adapts up to this; "0": never poll).
    /// Buys latency with CPU: see `net::idle_poll`.
    #[serde(with = "duration::serde_duration")]
    pub idle_poll: Duration,
    pub pool_mode: PoolMode,
    pub max_client_conn: usize,
    #[serde(with = "duration::serde_duration")]
    pub query_wait_timeout: Duration,
    /// Zero disables.
    #[serde(with = "duration::serde_duration")]
    pub idle_transaction_timeout: Duration,
    /// A request the server has not finished answering after this long is
    /// cancelled and its server connection closed (PgBouncer's
    /// `query_timeout`). Zero disables.
    #[serde(with = "duration::serde_duration")]
    pub query_timeout: Duration,
    /// The largest Query, Parse, Describe or Close message pgmux holds whole
    /// to inspect, in bytes; a larger one ends the session with `54000`.
    pub max_query_size: usize,
    #[serde(with = "duration::serde_duration")]
    pub server_idle_timeout: Duration,
    #[serde(with = "duration::serde_duration")]
    pub server_lifetime: Duration,
    #[serde(with = "duration::serde_duration")]
    pub shutdown_timeout: Duration,
    #[serde(with = "duration::serde_duration")]
    pub server_connect_timeout: Duration,
    /// TCP keepalives on server connections (pooled and monitors): a server
    /// whose host died or whose network dropped is found and closed.
    pub server_tcp_keepalive: bool,
    #[serde(with = "duration::serde_duration")]
    pub server_tcp_keepalive_idle: Duration,
    #[serde(with = "duration::serde_duration")]
    pub server_tcp_keepalive_interval: Duration,
    pub server_tcp_keepalive_count: u32,
    pub max_prepared_statements: usize,
    pub on_session_state: OnSessionState,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_mode: TlsMode,
    pub server_tls: ServerTlsMode,
    pub server_tls_ca: Option<PathBuf>,
    /// A `[[users]]` entry that looks up the secrets of users not listed in
    /// proxy.toml with `auth_query`, on the database's primary (PgBouncer's
    /// `auth_user`). Per database, `auth_user` overrides it.
    pub auth_user: Option<String>,
    /// Returns the stored secret (SCRAM verifier or md5 hash, or NULL) of
    /// the user named by `$1`. Runs on pgmux's own connection as
    /// `auth_user`, never with a client's settings.
    pub auth_query: String,
    /// How long a looked-up secret is reused; a miss is kept for a tenth of it.
    #[serde(with = "duration::serde_duration")]
    pub auth_cache_ttl: Duration,
    /// A pool the `"*"` database made that has had no client and no
    /// server connection in use for this long is closed and forgotten.
    #[serde(with = "duration::serde_duration")]
    pub pool_idle_timeout: Duration,
    /// Server connections to one database on one server, all its users'
    /// pools together; 0: no limit. `[[databases]] max_db_connections` overrides.
    pub max_db_connections: usize,
    /// Server connections of one user on one server, all databases together; 0: no limit.
    pub max_user_connections: usize,
    /// Logged-in clients of one database; 0: no limit.
    /// `[[databases]] max_db_client_connections` overrides.
    pub max_db_client_connections: usize,
    /// Logged-in clients of one user, all databases together; 0: no limit.
    pub max_user_client_connections: usize,
    /// Extra server connections per pool for clients that waited
    /// `reserve_pool_timeout` (PgBouncer's reserve pool); 0: none.
    pub reserve_pool_size: usize,
    #[serde(with = "duration::serde_duration")]
    pub reserve_pool_timeout: Duration,
}

/// The `[[databases]] name` that serves every database not listed by name.
pub const WILDCARD_DATABASE: &str = "*";

/// The default `auth_query`: the role's password while it can log in and is
/// not past `VALID UNTIL`. Schema-qualified to the operators, so that no
/// `search_path` can change what runs (PgBouncer's CVE-2025-12819 kind).
pub const DEFAULT_AUTH_QUERY: &str = "SELECT CASE WHEN r.rolvaliduntil IS NULL \
     OR r.rolvaliduntil OPERATOR(pg_catalog.>) pg_catalog.now() THEN r.rolpassword END \
     FROM pg_catalog.pg_authid r WHERE r.rolname OPERATOR(pg_catalog.=) $1 AND r.rolcanlogin";

/// TCP keepalive settings for a socket; see `server_tcp_keepalive`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpKeepalive {
    pub idle: Duration,
    pub interval: Duration,
    pub count: u32,
}

impl ProxyConfig {
    /// The keepalive for server connections, `None` when turned off.
    pub fn server_keepalive(&self) -> Option<TcpKeepalive> {
        self.server_tcp_keepalive.then_some(TcpKeepalive {
            idle: self.server_tcp_keepalive_idle,
            interval: self.server_tcp_keepalive_interval,
            count: self.server_tcp_keepalive_count,
        })
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            listen: Listen::Tcp("127.0.0.1:6432".parse().expect("literal address")),
            unix_socket_dir: None,
            unix_socket_mode: 0o777,
            unix_socket_group: None,
            metrics_listen: None,
            so_reuseport: false,
            peer_listen: None,
            peer_id: 0,
            workers: 1,
            io: IoMode::Epoll,
            idle_poll: Duration::ZERO,
            pool_mode: PoolMode::Transaction,
            max_client_conn: 10_000,
            query_wait_timeout: Duration::from_secs(5),
            idle_transaction_timeout: Duration::from_secs(60),
            query_timeout: Duration::ZERO,
            max_query_size: 64 * 1024 * 1024,
            server_idle_timeout: Duration::from_secs(600),
            server_lifetime: Duration::from_secs(3600),
            shutdown_timeout: Duration::from_secs(30),
            server_connect_timeout: Duration::from_secs(5),
            // A dead peer is found in idle + interval * count = 90 s rather
            // than the kernel's default two hours and more.
            server_tcp_keepalive: true,
            server_tcp_keepalive_idle: Duration::from_secs(60),
            server_tcp_keepalive_interval: Duration::from_secs(10),
            server_tcp_keepalive_count: 3,
            max_prepared_statements: 200,
            on_session_state: OnSessionState::Pin,
            tls_cert: None,
            tls_key: None,
            tls_mode: TlsMode::Disable,
            server_tls: ServerTlsMode::Prefer,
            server_tls_ca: None,
            auth_user: None,
            auth_query: DEFAULT_AUTH_QUERY.to_owned(),
            auth_cache_ttl: Duration::from_secs(10),
            pool_idle_timeout: Duration::from_secs(3600),
            max_db_connections: 0,
            max_user_connections: 0,
            max_db_client_connections: 0,
            max_user_client_connections: 0,
            reserve_pool_size: 0,
            reserve_pool_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadYourWrites {
    Lsn,
    Window,
    Off,
    /// Every read sees every transaction committed before it arrived, by
    /// anyone: the primary's position is read after the read arrives.
    Global,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StickyScope {
    Connection,
    User,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadBalance {
    LeastConnections,
    RoundRobin,
    Random,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    pub read_write_split: bool,
    pub read_your_writes: ReadYourWrites,
    #[serde(with = "duration::serde_duration")]
    pub sticky_window: Duration,
    pub sticky_scope: StickyScope,
    #[serde(with = "duration::serde_duration")]
    pub max_replica_lag: Duration,
    pub max_replica_lag_bytes: Option<u64>,
    /// How long a read that needs a write the replicas have not shown yet
    /// may wait for one of them to replay it (asked on demand) before it
    /// goes to the primary. Zero: never wait.
    #[serde(with = "duration::serde_duration")]
    pub max_replica_wait: Duration,
    pub load_balance: LoadBalance,
    #[serde(with = "duration::serde_duration")]
    pub monitor_interval: Duration,
    pub write_functions: Vec<String>,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            read_write_split: true,
            read_your_writes: ReadYourWrites::Lsn,
            sticky_window: Duration::from_secs(1),
            sticky_scope: StickyScope::Connection,
            max_replica_lag: Duration::from_secs(2),
            max_replica_lag_bytes: None,
            max_replica_wait: Duration::from_millis(10),
            load_balance: LoadBalance::LeastConnections,
            monitor_interval: Duration::from_millis(20),
            write_functions: Vec::new(),
        }
    }
}

/// The largest `peer_id`: cancel keys carry it in 14 bits (PgBouncer's range).
pub const MAX_PEER_ID: u32 = 16383;

/// Another pgmux instance: `{ id = 2, addr = "10.0.0.2:6433" }`, `addr`
/// being where it accepts forwarded cancel requests (its `peer_listen`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub id: u32,
    /// `host:port`; a name is resolved at each forward, like server addresses.
    #[serde(deserialize_with = "addr::host_port")]
    pub addr: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub users: Vec<String>,
}

/// `"host:port"` or `{ addr = "host:port", weight = N }` (weight defaults to 1).
/// `Deserialize` is implemented in `addr.rs` for readable errors.
#[derive(Debug, Clone)]
pub enum ReplicaConfig {
    Addr(String),
    Weighted { addr: String, weight: u32 },
}

impl ReplicaConfig {
    pub fn addr(&self) -> &str {
        match self {
            ReplicaConfig::Addr(a) | ReplicaConfig::Weighted { addr: a, .. } => a,
        }
    }

    /// Relative share of reads; the plain string form weighs 1.
    pub fn weight(&self) -> u32 {
        match self {
            ReplicaConfig::Addr(_) => 1,
            ReplicaConfig::Weighted { weight, .. } => *weight,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// The name clients ask for.
    pub name: String,
    /// The real database name on the servers; defaults to `name`.
    pub dbname: Option<String>,
    /// `host:port` of the node expected to be the primary; empty when
    /// `hosts` lists the nodes instead.
    #[serde(default, deserialize_with = "addr::host_port")]
    pub primary: String,
    #[serde(default)]
    pub replicas: Vec<ReplicaConfig>,
    /// Every node, roles discovered (`pg_is_in_recovery()`): the alternative
    /// to `primary` + `replicas`.
    #[serde(default)]
    pub hosts: Vec<ReplicaConfig>,
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    #[serde(default)]
    pub min_pool_size: usize,
    /// Per-database override of `[proxy] pool_mode`.
    pub pool_mode: Option<PoolMode>,
    /// Per-database overrides of `[proxy] auth_user` and `auth_query`.
    pub auth_user: Option<String>,
    pub auth_query: Option<String>,
    /// Per-database override of `[proxy] max_db_connections`.
    pub max_db_connections: Option<usize>,
    /// Per-database override of `[proxy] max_db_client_connections`.
    pub max_db_client_connections: Option<usize>,
    /// Per-database override of `[proxy] reserve_pool_size`.
    pub reserve_pool_size: Option<usize>,
}

fn default_pool_size() -> usize {
    20
}

/// The role proxy.toml states for a node (`primary` or `replicas`);
/// `hosts` states none. Routing follows the observed role either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatedRole {
    Primary,
    Replica,
}

/// One node of a database, whatever form listed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    pub addr: String,
    /// Relative share of reads while it is a replica.
    pub weight: u32,
    pub stated: Option<StatedRole>,
}

impl DatabaseConfig {
    pub fn server_dbname(&self) -> &str {
        self.dbname.as_deref().unwrap_or(&self.name)
    }

    /// Every node: `hosts`, or the primary then the replicas, each address once.
    pub fn nodes(&self) -> Vec<NodeConfig> {
        let mut out: Vec<NodeConfig> = Vec::new();
        let stated = (!self.primary.is_empty())
            .then_some((self.primary.as_str(), 1, Some(StatedRole::Primary)))
            .into_iter()
            .chain(self.replicas.iter().map(|r| (r.addr(), r.weight(), Some(StatedRole::Replica))))
            .chain(self.hosts.iter().map(|h| (h.addr(), h.weight(), None)));
        for (addr, weight, role) in stated {
            if !out.iter().any(|n| n.addr == addr) {
                out.push(NodeConfig { addr: addr.to_owned(), weight, stated: role });
            }
        }
        out
    }

    /// Where a new pool of the database points before its nodes' roles are
    /// known: the stated primary, or the first host. Pools of a database with
    /// several nodes follow the observed primary instead (`Pool::follow`).
    pub fn first_addr(&self) -> &str {
        match self.hosts.first() {
            Some(h) if self.primary.is_empty() => h.addr(),
            _ => &self.primary,
        }
    }

    /// Whether pgmux watches the nodes' roles (more than one node).
    pub fn has_topology(&self) -> bool {
        self.nodes().len() > 1
    }
}

/// How pgmux checks a client's password.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMethod {
    // kebab-case alone would give "scram-sha256"; Postgres spells it with the extra dash.
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    Md5,
    Trust,
}

/// `Debug` is by hand so that passwords never reach logs.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    /// Plaintext, a `SCRAM-SHA-256$...` verifier, an `md5...` hash, or
    /// `env:VAR`. Resolved by `load`, so this never holds the `env:` form.
    pub password: Option<String>,
    /// The password pgmux uses to log in to Postgres; defaults to `password`
    /// when that is plaintext.
    pub server_password: Option<String>,
    #[serde(default = "default_auth")]
    pub auth: AuthMethod,
}

fn default_auth() -> AuthMethod {
    AuthMethod::ScramSha256
}

impl fmt::Debug for UserConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redact = |p: &Option<String>| p.as_ref().map(|_| "<redacted>");
        f.debug_struct("UserConfig")
            .field("name", &self.name)
            .field("password", &redact(&self.password))
            .field("server_password", &redact(&self.server_password))
            .field("auth", &self.auth)
            .finish()
    }
}

impl UserConfig {
    /// A user not listed in proxy.toml, whose secret `auth_query` returned
    /// (or will): no password pgmux could log in with.
    pub fn looked_up(name: &str) -> UserConfig {
        UserConfig { name: name.to_owned(), password: None, server_password: None, auth: AuthMethod::ScramSha256 }
    }

    /// The plaintext password for logging in to Postgres, if pgmux has one.
    pub fn backend_password(&self) -> Option<&str> {
        self.server_password
            .as_deref()
            .or_else(|| self.password.as_deref().filter(|p| !p.starts_with("SCRAM-SHA-256$") && !is_md5_hash(p)))
    }
}

/// `md5` followed by 32 hex digits: the form Postgres stores md5 passwords in.
pub fn is_md5_hash(p: &str) -> bool {
    p.len() == 35 && p.starts_with("md5") && p[3..].bytes().all(|b| b.is_ascii_hexdigit())
}

/// Formats a toml/serde error as `origin:line:col: key.path: message`.
fn toml_error(loc: &Locator<'_>, e: &toml::de::Error, prefix: &str) -> String {
    let span = e.span().unwrap_or(0..0);
    let mut path = loc.path_at(&span);
    let mut message = e.message().to_owned();
    // serde names the missing field only in the message; the span is its table.
    if let Some(field) = message.strip_prefix("missing field `").and_then(|m| m.strip_suffix('`')) {
        path = path.key(field);
        message = "missing required key".to_owned();
    }
    // serde quotes the offending value ("invalid type: integer `123`"), which
    // for a password is the password.
    if matches!(path.last_key(), Some("password" | "server_password")) {
        message = match message.split_once(", expected ") {
            Some((_, expected)) => format!("invalid value (not shown), expected {expected}"),
            None => "invalid value (not shown)".to_owned(),
        };
    }
    // serde and toml quote with backticks; match the rest of our messages.
    let message = message.replace('`', "\"");
    loc.error(span.start, &path, &format!("{prefix}{message}")).1
}

/// The `[proxy]` keys only a restart applies: a reload cannot re-bind
/// listening sockets or rebuild the runtime, and the cancel keys already
/// issued carry the peer id.
pub const RESTART_ONLY: &[&str] = &[
    "listen",
    "unix_socket_dir",
    "unix_socket_mode",
    "unix_socket_group",
    "metrics_listen",
    "workers",
    "io",
    "so_reuseport",
    "peer_listen",
    "peer_id",
];

/// Names (`proxy.x`) of settings that differ between `old` and `new` and
/// only take effect after a restart ([`RESTART_ONLY`]).
pub fn diff_requires_restart(old: &Config, new: &Config) -> Vec<&'static str> {
    let (o, n) = (&old.proxy, &new.proxy);
    let differs = [
        o.listen != n.listen,
        o.unix_socket_dir != n.unix_socket_dir,
        o.unix_socket_mode != n.unix_socket_mode,
        o.unix_socket_group != n.unix_socket_group,
        o.metrics_listen != n.metrics_listen,
        o.workers != n.workers,
        o.io != n.io,
        o.so_reuseport != n.so_reuseport,
        o.peer_listen != n.peer_listen,
        o.peer_id != n.peer_id,
    ];
    const KEYS: [&str; 10] = [
        "proxy.listen",
        "proxy.unix_socket_dir",
        "proxy.unix_socket_mode",
        "proxy.unix_socket_group",
        "proxy.metrics_listen",
        "proxy.workers",
        "proxy.io",
        "proxy.so_reuseport",
        "proxy.peer_listen",
        "proxy.peer_id",
    ];
    KEYS.into_iter().zip(differs).filter_map(|(k, d)| d.then_some(k)).collect()
}

impl Config {
    /// Puts back `running`'s values of the [`RESTART_ONLY`] settings: what a
    /// reload applies keeps what the process actually runs with.
    pub fn keep_restart_settings(&mut self, running: &Config) {
        let (p, r) = (&mut self.proxy, &running.proxy);
        p.listen.clone_from(&r.listen);
        p.unix_socket_dir.clone_from(&r.unix_socket_dir);
        p.unix_socket_mode = r.unix_socket_mode;
        p.unix_socket_group.clone_from(&r.unix_socket_group);
        p.metrics_listen = r.metrics_listen;
        p.workers = r.workers;
        p.io = r.io;
        p.so_reuseport = r.so_reuseport;
        p.peer_listen = r.peer_listen;
        p.peer_id = r.peer_id;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// Parse or validation errors, already formatted as `path:line:col: key: message`,
    /// one per line (validation reports every problem it finds, in file order).
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let io = |source| ConfigError::Io { path: path.to_owned(), source };
        let bytes = read_bounded(path, MAX_CONFIG_FILE).map_err(io)?;
        let text = String::from_utf8(bytes).map_err(|_| io(std::io::Error::other("not valid UTF-8")))?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Parses and validates `text`; `origin` names the file in error messages.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        Config::parse_with_env(text, origin, &|var| std::env::var(var))
    }

    /// `parse` with the environment injected, so tests need not mutate the
    /// process environment (unsafe, and racy across test threads).
    fn parse_with_env(text: &str, origin: &str, env: validate::Env<'_>) -> Result<Config, ConfigError> {
        let (loc, syntax_errors) = Locator::new(text, origin);
        // Only the first syntax error: later ones are usually fallout from it.
        if let Some(e) = syntax_errors.first() {
            return Err(ConfigError::Invalid(toml_error(&loc, e, "syntax error: ")));
        }
        // serde stops at the first error, so there is only ever one here.
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Invalid(toml_error(&loc, &e, "")))?;
        let mut errors = validate::validate(&mut config, &loc, env);
        if errors.is_empty() {
            return Ok(config);
        }
        errors.sort();
        Err(ConfigError::Invalid(errors.into_iter().map(|(_, msg)| msg).collect::<Vec<_>>().join("\n")))
    }

    /// The database listed under `name` (not the wildcard).
    pub fn database(&self, name: &str) -> Option<&DatabaseConfig> {
        self.databases.iter().find(|d| d.name == name)
    }

    /// The database a client asking for `name` gets: the one listed under
    /// that name, or else the `"*"` wildcard's settings toward the
    /// same-named database on its server (PgBouncer's fallback database).
    pub fn resolve(&self, name: &str) -> Option<std::borrow::Cow<'_, DatabaseConfig>> {
        if let Some(db) = self.database(name) {
            return Some(std::borrow::Cow::Borrowed(db));
        }
        let wildcard = self.database(WILDCARD_DATABASE).filter(|_| name != WILDCARD_DATABASE)?;
        let mut db = wildcard.clone();
        name.clone_into(&mut db.name);
        Some(std::borrow::Cow::Owned(db))
    }

    /// [`Config::resolve`] for a replica pool: `name`'s database, if `addr`
    /// is one of its replicas.
    pub fn resolve_replica(&self, name: &str, addr: &str) -> Option<std::borrow::Cow<'_, DatabaseConfig>> {
        self.resolve(name).filter(|d| d.nodes().iter().any(|n| n.addr == addr))
    }

    /// Database `name`, if `addr` is one of its replicas.
    pub fn replica(&self, name: &str, addr: &str) -> Option<&DatabaseConfig> {
        self.database(name).filter(|d| d.nodes().iter().any(|n| n.addr == addr))
    }

    pub fn user(&self, name: &str) -> Option<&UserConfig> {
        self.users.iter().find(|u| u.name == name)
    }

    pub fn pool_mode(&self, db: &DatabaseConfig) -> PoolMode {
        db.pool_mode.unwrap_or(self.proxy.pool_mode)
    }

    /// `db`'s limit on server connections per server (0: none).
    pub fn max_db_connections(&self, db: &DatabaseConfig) -> usize {
        db.max_db_connections.unwrap_or(self.proxy.max_db_connections)
    }

    /// Who looks up unlisted users of `db`, and with what query, if anyone.
    pub fn auth_lookup<'a>(&'a self, db: &'a DatabaseConfig) -> Option<(&'a UserConfig, &'a str)> {
        let user = db.auth_user.as_deref().or(self.proxy.auth_user.as_deref())?;
        let query = db.auth_query.as_deref().unwrap_or(&self.proxy.auth_query);
        Some((self.user(user)?, query))
    }
}

/// A proxy.toml is a few kilobytes; a file this large was named by mistake.
pub const MAX_CONFIG_FILE: u64 = 4 << 20;

/// Reads a file the configuration names, refusing one larger than `limit`
/// bytes instead of allocating for it: `/dev/zero` or a log file named by
/// mistake must fail the load (and a reload keeps the running config),
/// not exhaust memory.
pub fn read_bounded(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(std::io::Error::other(format!("larger than {} KiB; is this the right file?", limit >> 10)));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests;
