//! What a cluster is made of: roles, their passwords, pg_hba methods.

use super::*;

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
