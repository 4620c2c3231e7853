//! The SHOW result sets, built from the registries and pools without I/O.
//!
//! Commands PgBouncer has answer with PgBouncer 1.25's columns, in its order
//! and with its types (src/admin.c, src/stats.c), so that tools written for
//! PgBouncer read them unchanged; pgmux's own columns follow PgBouncer's.
//! Rows are at PgBouncer's grain too (a pool per (database, user), stats per
//! database): a monitoring tool keys its series on those columns, and two
//! rows with the same key would break it (a Prometheus exporter fails the
//! whole scrape). The per-node breakdown has commands of its own.

mod config;
mod databases;
mod pools;
mod process;
mod sockets;
mod stats;

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

pub use config::config;
pub use databases::{databases, replicas, users};
pub use pools::{PoolView, node_pools, pool_views, pools};
pub use process::{dns_hosts, dns_zones, lists, mem, state, version};
pub use sockets::{active_sockets, clients, fds, servers, sockets};
pub use stats::{STATS_PERIOD, node_stats, stats, stats_averages, stats_totals, totals};

/// A column's type, as PgBouncer's console declares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    Text,
    Int4,
    Int8,
    Numeric,
    Bytea,
}

impl Type {
    /// PgBouncer's tupdesc letters (`pktbuf_write_RowDescription`): `s`
    /// text, `i` int4, `q` int8, `N` numeric, `T` a time sent as text, `b`
    /// bytea. Anything else is text.
    fn from_letter(c: u8) -> Type {
        match c {
            b'i' => Type::Int4,
            b'q' => Type::Int8,
            b'N' => Type::Numeric,
            b'b' => Type::Bytea,
            _ => Type::Text,
        }
    }

    pub fn oid(self) -> u32 {
        match self {
            Type::Text => 25,
            Type::Int4 => 23,
            Type::Int8 => 20,
            Type::Numeric => 1700,
            Type::Bytea => 17,
        }
    }

    /// The type's length in RowDescription (-1: variable).
    pub fn size(self) -> i16 {
        match self {
            Type::Int4 => 4,
            Type::Int8 => 8,
            _ => -1,
        }
    }

    fn is_integer(self) -> bool {
        matches!(self, Type::Int4 | Type::Int8 | Type::Numeric)
    }
}

/// A block of columns: their types in PgBouncer's tupdesc letters, one per
/// name. Written as consts so a unit test can check every one.
#[derive(Debug)]
pub struct Spec {
    pub types: &'static str,
    pub names: &'static [&'static str],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Column {
    pub name: &'static str,
    pub ty: Type,
}

/// One row; `None` is SQL NULL (where PgBouncer sends NULL).
pub type Row = Vec<Option<String>>;

/// Columns and text rows; sent as RowDescription, DataRows, `SHOW`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultSet {
    pub columns: Vec<Column>,
    pub rows: Vec<Row>,
}

impl ResultSet {
    /// PgBouncer's block of columns, then pgmux's own (if any).
    pub fn new(specs: &[&Spec]) -> ResultSet {
        let columns = specs
            .iter()
            .flat_map(|s| {
                debug_assert_eq!(s.types.len(), s.names.len(), "{:?}", s.names);
                let types = s.types.bytes().map(Type::from_letter).chain(std::iter::repeat(Type::Text));
                s.names.iter().zip(types).map(|(&name, ty)| Column { name, ty })
            })
            .collect();
        ResultSet { columns, rows: Vec::new() }
    }

    pub fn push(&mut self, row: Row) {
        debug_assert_eq!(row.len(), self.columns.len(), "{:?}", self.names());
        debug_assert!(
            self.columns.iter().zip(&row).all(|(c, v)| !c.ty.is_integer() || v.as_ref().is_none_or(|v| is_integer(v))),
            "a non-integer in an integer column: {row:?}"
        );
        self.rows.push(row);
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.columns.iter().map(|c| c.name).collect()
    }
}

fn is_integer(v: &str) -> bool {
    let digits = v.strip_prefix('-').unwrap_or(v);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

/// A value as a cell: numbers in decimal, text as is, `Option` as NULL.
pub trait Cell {
    fn cell(self) -> Option<String>;
}

impl Cell for String {
    fn cell(self) -> Option<String> {
        Some(self)
    }
}

impl Cell for &String {
    fn cell(self) -> Option<String> {
        Some(self.clone())
    }
}

impl Cell for &str {
    fn cell(self) -> Option<String> {
        Some(self.to_owned())
    }
}

impl Cell for bool {
    /// PgBouncer's flags are 0 or 1.
    fn cell(self) -> Option<String> {
        Some(u8::from(self).to_string())
    }
}

macro_rules! number_cells {
    ($($t:ty),*) => {$(
        impl Cell for $t {
            fn cell(self) -> Option<String> {
                Some(self.to_string())
            }
        }
    )*};
}
number_cells!(u8, u16, u32, u64, usize, i32, i64);

impl<T: Cell> Cell for Option<T> {
    fn cell(self) -> Option<String> {
        self.and_then(Cell::cell)
    }
}

/// SQL NULL.
pub const NULL: Option<&str> = None;

/// A row from values of mixed types.
macro_rules! row {
    ($($v:expr),* $(,)?) => { vec![$($crate::admin::show::Cell::cell($v)),*] };
}
pub(crate) use row;

pub(crate) fn split_addr(a: Option<SocketAddr>) -> (String, u16) {
    a.map(|a| (a.ip().to_string(), a.port())).unwrap_or_default()
}

/// A server connection's address as PgBouncer shows it: IP and port, or
/// `unix` and the port of the socket's `.s.PGSQL.<port>` name.
pub(crate) fn server_addr(a: &crate::net::ServerAddr) -> (String, u16) {
    match a {
        crate::net::ServerAddr::Tcp(a) => split_addr(Some(*a)),
        crate::net::ServerAddr::Unix(p) => {
            let port = p.file_name().and_then(|n| n.to_str()?.strip_prefix(".s.PGSQL.")?.parse().ok());
            ("unix".to_owned(), port.unwrap_or_default())
        }
    }
}

/// `host:port` or `[v6]:port` from the config, as host and port.
pub(crate) fn split_host_port(s: &str) -> (String, Option<u16>) {
    match s.rsplit_once(':') {
        Some((h, p)) => (h.trim_start_matches('[').trim_end_matches(']').to_owned(), p.parse().ok()),
        None => (s.to_owned(), None),
    }
}

/// `YYYY-MM-DD HH:MM:SS UTC`, as PgBouncer prints times.
pub fn format_time(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Every column block, for the unit test below.
#[cfg(test)]
const ALL_SPECS: &[&Spec] = &[
    &pools::POOLS,
    &pools::POOLS_EXTRA,
    &pools::NODE,
    &stats::STATS,
    &stats::STATS_TOTALS,
    &stats::STATS_AVERAGES,
    &stats::TOTALS,
    &sockets::SOCKET,
    &sockets::SOCKET_DEBUG,
    &sockets::FDS,
    &databases::DATABASES,
    &databases::USERS,
    &databases::REPLICAS,
    &process::LISTS,
    &process::MEM,
    &process::STATE,
    &process::VERSION,
    &process::DNS_HOSTS,
    &process::DNS_ZONES,
    &config::CONFIG,
];

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn every_spec_has_a_type_per_column_and_known_letters() {
        for s in ALL_SPECS {
            assert_eq!(s.types.len(), s.names.len(), "{:?}", s.names);
            assert!(s.types.bytes().all(|c| b"siqNTb".contains(&c)), "{}", s.types);
        }
    }

    #[test]
    fn columns_take_pgbouncer_types() {
        let rs = ResultSet::new(&[&Spec { types: "siqNTb", names: &["a", "b", "c", "d", "e", "f"] }]);
        let oids: Vec<u32> = rs.columns.iter().map(|c| c.ty.oid()).collect();
        assert_eq!(oids, [25, 23, 20, 1700, 25, 17]);
        assert_eq!(rs.names(), ["a", "b", "c", "d", "e", "f"]);
    }

    #[test]
    fn cells_render_like_pgbouncer() {
        let r: Row = row!(1u64, "x", true, NULL, Some(5usize), -3i32);
        assert_eq!(
            r,
            [Some("1".into()), Some("x".into()), Some("1".into()), None, Some("5".into()), Some("-3".into())]
        );
        assert!(is_integer("-12") && is_integer("0") && !is_integer("") && !is_integer("1.5") && !is_integer("-"));
    }

    #[test]
    fn times_format_like_pgbouncer() {
        assert_eq!(format_time(UNIX_EPOCH), "1970-01-01 00:00:00 UTC");
        // 2024-02-29 12:34:56 UTC: a leap day.
        assert_eq!(format_time(UNIX_EPOCH + Duration::from_secs(1_709_210_096)), "2024-02-29 12:34:56 UTC");
    }

    #[test]
    fn host_port_splits() {
        assert_eq!(split_host_port("db:5432"), ("db".into(), Some(5432)));
        assert_eq!(split_host_port("[::1]:5432"), ("::1".into(), Some(5432)));
        assert_eq!(split_host_port("db"), ("db".into(), None));
    }
}
