//! The admin console through psql, as an operator (or a tool shelling out to
//! psql) uses it: `Table` is psql's unaligned output, header and rows.

use std::sync::OnceLock;
use std::time::Duration;

use super::proxy::Proxy;

/// A psql result in unaligned mode: header, rows (footer dropped). NULL
/// prints as an empty string.
#[derive(Debug)]
pub struct Table {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn col(&self, name: &str) -> usize {
        self.columns.iter().position(|c| c == name).unwrap_or_else(|| panic!("no column {name} in {:?}", self.columns))
    }

    /// Rows whose `column` equals `value`.
    pub fn find(&self, column: &str, value: &str) -> Vec<&Vec<String>> {
        let i = self.col(column);
        self.rows.iter().filter(|r| r[i] == value).collect()
    }

    /// The single row whose `column` equals `value`.
    pub fn one(&self, column: &str, value: &str) -> &Vec<String> {
        let found = self.find(column, value);
        assert_eq!(found.len(), 1, "expected one row with {column} = {value}: {self:?}");
        found[0]
    }

    pub fn get<'a>(&self, row: &'a [String], column: &str) -> &'a str {
        &row[self.col(column)]
    }

    /// `column` of `row` as a number.
    pub fn num(&self, row: &[String], column: &str) -> u64 {
        let v = self.get(row, column);
        v.parse().unwrap_or_else(|_| panic!("{column} = {v:?} is not a number: {self:?}"))
    }
}

fn psql_bin() -> &'static std::path::Path {
    static BIN: OnceLock<std::path::PathBuf> = OnceLock::new();
    BIN.get_or_init(|| pgmux::cluster::PgBinaries::find().expect("PostgreSQL binaries").psql)
}

/// Runs `sql` on the admin console (database `db`: `pgmux` or `pgbouncer`)
/// with psql as the trust superuser; `Err` carries psql's stderr (verbose,
/// so SQLSTATEs are in it). `Ok` carries the table and stderr.
pub async fn psql_on(proxy: &Proxy, db: &str, sql: &str) -> Result<(Table, String), String> {
    let mut cmd = tokio::process::Command::new(psql_bin());
    for key in pgmux::cluster::pg_env_keys() {
        cmd.env_remove(key);
    }
    cmd.env("PGCONNECT_TIMEOUT", "10")
        .args(["-X", "-A", "-F", "|", "-v", "VERBOSITY=verbose", "-h", "127.0.0.1", "-U", "postgres"])
        .arg("-p")
        .arg(proxy.port().to_string())
        .args([db, "-c", sql])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("psql finished within 30s")
        .expect("run psql");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err(stderr);
    }
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = stdout.lines().filter(|l| !(l.starts_with('(') && l.ends_with(")")));
    let columns = lines.next().map(|h| h.split('|').map(str::to_owned).collect()).unwrap_or_default();
    let rows = lines.map(|l| l.split('|').map(str::to_owned).collect()).collect();
    Ok((Table { columns, rows }, stderr))
}

/// `SHOW what` on database `db`'s console.
pub async fn show_on(proxy: &Proxy, db: &str, what: &str) -> Table {
    psql_on(proxy, db, &format!("SHOW {what}")).await.unwrap_or_else(|e| panic!("SHOW {what}: {e}")).0
}
