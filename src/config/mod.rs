//! `proxy.toml`: types, defaults, loading and validation.
//!
//! Loaded once at start (and on reload); the rest of pgmux reads a shared
//! `Arc<Config>` and never mutates it.

mod duration;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use duration::parse_duration;

#[derive(Debug, Clone, Deserialize)]
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolMode {
    Transaction,
    Session,
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
    pub listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    pub pool_mode: PoolMode,
    pub max_client_conn: usize,
    #[serde(with = "duration::serde_duration")]
    pub query_wait_timeout: Duration,
    /// Zero disables.
    #[serde(with = "duration::serde_duration")]
    pub idle_transaction_timeout: Duration,
    #[serde(with = "duration::serde_duration")]
    pub server_idle_timeout: Duration,
    #[serde(with = "duration::serde_duration")]
    pub server_lifetime: Duration,
    #[serde(with = "duration::serde_duration")]
    pub shutdown_timeout: Duration,
    #[serde(with = "duration::serde_duration")]
    pub server_connect_timeout: Duration,
    pub max_prepared_statements: usize,
    pub on_session_state: OnSessionState,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_mode: TlsMode,
    pub server_tls: ServerTlsMode,
    pub server_tls_ca: Option<PathBuf>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            listen: "127.0.0.1:6432".parse().expect("literal address"),
            metrics_listen: None,
            pool_mode: PoolMode::Transaction,
            max_client_conn: 10_000,
            query_wait_timeout: Duration::from_secs(5),
            idle_transaction_timeout: Duration::from_secs(60),
            server_idle_timeout: Duration::from_secs(600),
            server_lifetime: Duration::from_secs(3600),
            shutdown_timeout: Duration::from_secs(30),
            server_connect_timeout: Duration::from_secs(5),
            max_prepared_statements: 200,
            on_session_state: OnSessionState::Pin,
            tls_cert: None,
            tls_key: None,
            tls_mode: TlsMode::Disable,
            server_tls: ServerTlsMode::Prefer,
            server_tls_ca: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadYourWrites {
    Lsn,
    Window,
    Off,
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
            load_balance: LoadBalance::LeastConnections,
            monitor_interval: Duration::from_millis(20),
            write_functions: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub users: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, untagged)]
pub enum ReplicaConfig {
    Addr(String),
    Weighted { addr: String, weight: u32 },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// The name clients ask for.
    pub name: String,
    /// The real database name on the servers; defaults to `name`.
    pub dbname: Option<String>,
    /// `host:port`.
    pub primary: String,
    #[serde(default)]
    pub replicas: Vec<ReplicaConfig>,
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    #[serde(default)]
    pub min_pool_size: usize,
    /// Per-database override of `[proxy] pool_mode`.
    pub pool_mode: Option<PoolMode>,
}

fn default_pool_size() -> usize {
    20
}

impl DatabaseConfig {
    pub fn server_dbname(&self) -> &str {
        self.dbname.as_deref().unwrap_or(&self.name)
    }
}

/// How pgmux checks a client's password.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMethod {
    ScramSha256,
    Md5,
    Trust,
}

#[derive(Debug, Clone, Deserialize)]
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

impl UserConfig {
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

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// A parse or validation error, already formatted as `path:line:col: key: message`.
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.to_owned(), source })?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Parses and validates `text`; `origin` names the file in error messages.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Invalid(format!("{origin}: {e}")))?;
        Ok(config)
    }

    pub fn database(&self, name: &str) -> Option<&DatabaseConfig> {
        self.databases.iter().find(|d| d.name == name)
    }

    pub fn user(&self, name: &str) -> Option<&UserConfig> {
        self.users.iter().find(|u| u.name == name)
    }

    pub fn pool_mode(&self, db: &DatabaseConfig) -> PoolMode {
        db.pool_mode.unwrap_or(self.proxy.pool_mode)
    }
}
