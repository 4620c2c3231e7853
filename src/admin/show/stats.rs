//! SHOW STATS, STATS_TOTALS, STATS_AVERAGES and TOTALS (PgBouncer's
//! src/stats.c), and SHOW NODE_STATS (SHOW STATS per node).
//!
//! Definitions, as PgBouncer documents them, and where pgmux's counts come
//! from (the same counters `/metrics` reads):
//! - `server_assignment_count`: a client was given a server connection
//!   (a pool checkout).
//! - `xact_count`: transactions: in transaction mode one per checkout; in
//!   session mode (or for a pinned client) one per transaction the server
//!   ends idle.
//! - `query_count`: requests answered with ReadyForQuery (a simple Query,
//!   or extended-protocol messages up to their Sync).
//! - `received` / `sent`: bytes from clients, bytes of server answers to clients.
//! - `xact_time`: time a server connection was held by a client (in
//!   session mode, the whole session); `query_time`: from a request reaching
//!   the server to its ReadyForQuery; `wait_time`: time clients waited for a
//!   server connection (queued or while one was opened).
//! - `client_parse_count`, `server_parse_count`, `bind_count`: named
//!   prepared statements clients created, ones servers parsed for pgmux, and
//!   Binds of them.
//!
//! Averages are PgBouncer's: rates per second, times per transaction, query
//! and assignment, over the last [`STATS_PERIOD`] or so.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::pools::{NODE, pool_views};
use super::{ResultSet, Row, Spec, row};
use crate::live::Shared;
use crate::pool::counters::Totals;

/// PgBouncer's `stats_period` default (1.25): the span averages cover.
pub const STATS_PERIOD: Duration = Duration::from_secs(60);

/// PgBouncer 1.25 `admin_database_stats`.
pub(super) const STATS: Spec = Spec {
    types: "sNNNNNNNNNNNNNNNNNNNNNN",
    names: &[
        "database",
        "total_server_assignment_count",
        "total_xact_count",
        "total_query_count",
        "total_received",
        "total_sent",
        "total_xact_time",
        "total_query_time",
        "total_wait_time",
        "total_client_parse_count",
        "total_server_parse_count",
        "total_bind_count",
        "avg_server_assignment_count",
        "avg_xact_count",
        "avg_query_count",
        "avg_recv",
        "avg_sent",
        "avg_xact_time",
        "avg_query_time",
        "avg_wait_time",
        "avg_client_parse_count",
        "avg_server_parse_count",
        "avg_bind_count",
    ],
};

/// PgBouncer 1.25 `admin_database_stats_totals`.
pub(super) const STATS_TOTALS: Spec = Spec {
    types: "sNNNNNNNNNNN",
    names: &[
        "database",
        "server_assignment_count",
        "xact_count",
        "query_count",
        "bytes_received",
        "bytes_sent",
        "xact_time",
        "query_time",
        "wait_time",
        "client_parse_count",
        "server_parse_count",
        "bind_count",
    ],
};

/// PgBouncer 1.25 `admin_database_stats_averages` (its last three names do
/// carry an `avg_` prefix the others lack).
pub(super) const STATS_AVERAGES: Spec = Spec {
    types: "sNNNNNNNNNNN",
    names: &[
        "database",
        "server_assignment_count",
        "xact_count",
        "query_count",
        "bytes_received",
        "bytes_sent",
        "xact_time",
        "query_time",
        "wait_time",
        "avg_client_parse_count",
        "avg_server_parse_count",
        "avg_bind_count",
    ],
};

/// PgBouncer 1.25 `show_stat_totals`: a row per figure.
pub(super) const TOTALS: Spec = Spec { types: "sN", names: &["name", "value"] };

/// The names of SHOW TOTALS' rows after `total_` / `avg_` (PgBouncer's
/// `PgStats` field names), in [`values`] order.
const TOTALS_ROWS: [&str; 11] = [
    "server_assignment_count",
    "xact_count",
    "query_count",
    "client_bytes",
    "server_bytes",
    "xact_time",
    "query_time",
    "wait_time",
    "ps_client_parse_count",
    "ps_server_parse_count",
    "ps_bind_count",
];

/// PgBouncer's figures in its column order.
fn values(t: &Totals) -> [u64; 11] {
    [
        t.server_assignments,
        t.xacts,
        t.queries,
        t.received,
        t.sent,
        t.xact_us,
        t.query_us,
        t.wait_us,
        t.client_parses,
        t.server_parses,
        t.binds,
    ]
}

/// Totals and averages of a group of pools.
#[derive(Debug, Default)]
struct Sum {
    totals: Totals,
    /// What happened over each pool's averaging window.
    recent: Totals,
    /// Each pool's rates per second over its window, summed.
    rates: Totals,
}

impl Sum {
    fn add(&mut self, totals: Totals, (recent, over): (Totals, Duration)) {
        self.totals = self.totals.plus(totals);
        self.recent = self.recent.plus(recent);
        let us = over.as_micros().max(1);
        let per_second = |n: u64| (u128::from(n) * 1_000_000 / us).min(u128::from(u64::MAX)) as u64;
        let rates = Totals {
            server_assignments: per_second(recent.server_assignments),
            xacts: per_second(recent.xacts),
            queries: per_second(recent.queries),
            received: per_second(recent.received),
            sent: per_second(recent.sent),
            client_parses: per_second(recent.client_parses),
            server_parses: per_second(recent.server_parses),
            binds: per_second(recent.binds),
            ..Totals::default()
        };
        self.rates = self.rates.plus(rates);
    }

    /// PgBouncer's `calc_average`: counts and bytes per second; times per
    /// transaction, query and server assignment.
    fn averages(&self) -> Totals {
        let r = &self.recent;
        let per = |total: u64, n: u64| total.checked_div(n).unwrap_or(0);
        Totals {
            xact_us: per(r.xact_us, r.xacts),
            query_us: per(r.query_us, r.queries),
            wait_us: per(r.wait_us, r.server_assignments),
            ..self.rates
        }
    }
}

/// Sums by `key` (which also orders the rows) over every pool.
fn sums<K: Ord>(shared: &Shared, key: impl Fn(&super::PoolView) -> K) -> BTreeMap<K, Sum> {
    let now = Instant::now();
    let mut out: BTreeMap<K, Sum> = BTreeMap::new();
    for v in pool_views(shared) {
        let counters = v.pool.counters();
        let totals = counters.totals(v.pool.statements.tally());
        let window = counters.since_window(now, totals, STATS_PERIOD);
        out.entry(key(&v)).or_default().add(totals, window);
    }
    out
}

fn stats_row(database: &str, s: &Sum) -> Row {
    let mut row = row!(database);
    row.extend(values(&s.totals).into_iter().chain(values(&s.averages())).map(|n| Some(n.to_string())));
    row
}

/// Per database, summed over users and nodes.
pub fn stats(shared: &Shared) -> ResultSet {
    let mut rs = ResultSet::new(&[&STATS]);
    for (database, s) in sums(shared, |v| v.database.clone()) {
        rs.push(stats_row(&database, &s));
    }
    rs
}

/// SHOW STATS' columns per node of each database (primary first).
pub fn node_stats(shared: &Shared) -> ResultSet {
    let mut rs = ResultSet::new(&[&STATS, &NODE]);
    for ((database, role, node), s) in sums(shared, |v| (v.database.clone(), v.role, v.node.clone())) {
        let mut row = stats_row(&database, &s);
        row.extend(row!(node, role));
        rs.push(row);
    }
    rs
}

pub fn stats_totals(shared: &Shared) -> ResultSet {
    let mut rs = ResultSet::new(&[&STATS_TOTALS]);
    for (database, s) in sums(shared, |v| v.database.clone()) {
        let mut row = row!(database);
        row.extend(values(&s.totals).map(|n| Some(n.to_string())));
        rs.push(row);
    }
    rs
}

pub fn stats_averages(shared: &Shared) -> ResultSet {
    let mut rs = ResultSet::new(&[&STATS_AVERAGES]);
    for (database, s) in sums(shared, |v| v.database.clone()) {
        let mut row = row!(database);
        row.extend(values(&s.averages()).map(|n| Some(n.to_string())));
        rs.push(row);
    }
    rs
}

/// Every database together, a row per figure: `total_...`, then `avg_...`.
pub fn totals(shared: &Shared) -> ResultSet {
    let mut rs = ResultSet::new(&[&TOTALS]);
    let s = sums(shared, |_| ()).remove(&()).unwrap_or_default();
    for (prefix, figures) in [("total_", values(&s.totals)), ("avg_", values(&s.averages()))] {
        for (name, n) in TOTALS_ROWS.iter().zip(figures) {
            rs.push(row!(format!("{prefix}{name}"), n));
        }
    }
    rs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn averages_are_rates_and_times_per_event() {
        let mut s = Sum::default();
        let recent = Totals {
            server_assignments: 4,
            xacts: 5,
            queries: 10,
            received: 3000,
            xact_us: 500,
            query_us: 2000,
            wait_us: 40,
            binds: 2,
            ..Totals::default()
        };
        s.add(recent.plus(Totals { xacts: 100, ..Totals::default() }), (recent, Duration::from_secs(2)));
        // A second pool over a shorter window: its rate adds to the first's.
        s.add(Totals::default(), (Totals { xacts: 1, ..Totals::default() }, Duration::from_millis(500)));
        let a = s.averages();
        assert_eq!(s.totals.xacts, 105);
        assert_eq!((a.xacts, a.queries, a.received, a.binds, a.server_assignments), (2 + 2, 5, 1500, 1, 2));
        assert_eq!((a.xact_us, a.query_us, a.wait_us), (500 / 6, 200, 10));
    }

    #[test]
    fn totals_rows_follow_pgbouncer_field_order() {
        assert_eq!(TOTALS_ROWS.len(), STATS_TOTALS.names.len() - 1);
        // SHOW STATS' total_ columns name the same figures in the same order.
        let stats_names: Vec<&str> = STATS.names[1..12].iter().map(|n| n.trim_start_matches("total_")).collect();
        assert_eq!(stats_names[..3], TOTALS_ROWS[..3]);
        assert_eq!(stats_names[5..8], TOTALS_ROWS[5..8]);
    }
}
