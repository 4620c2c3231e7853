//! The SHOW result sets, built from the registries and pools without I/O.
//! Every value is text; names follow PgBouncer's where one exists.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::config::values::{config_values, mode_str};
use crate::config::{Config, PoolMode};
use crate::live::Shared;
use crate::live::registry::{ClientState, pool_id, wall_time};
use crate::pool::Pool;
use crate::routing::monitor::NodeView;
use crate::routing::route::{Candidate, Policy, out_of_rotation};

/// Columns and text rows; sent as RowDescription, DataRows, `SHOW`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultSet {
    pub columns: Vec<&'static str>,
    pub rows: Vec<Vec<String>>,
}

impl ResultSet {
    fn new(columns: &[&'static str]) -> ResultSet {
        ResultSet { columns: columns.to_vec(), rows: Vec::new() }
    }

    fn push(&mut self, row: Vec<String>) {
        debug_assert_eq!(row.len(), self.columns.len());
        self.rows.push(row);
    }
}

/// One pool's live counts, shared by SHOW POOLS and `/metrics`.
#[derive(Debug)]
pub struct PoolView {
    pub database: String,
    pub user: String,
    /// The server the pool connects to, as the configuration spells it.
    pub node: String,
    /// `primary` or `replica`.
    pub role: &'static str,
    pub pool: Arc<Pool>,
    pub cl_active: usize,
    pub cl_waiting: usize,
    pub cl_idle: usize,
    /// Backends linked to a client.
    pub sv_active: usize,
    pub sv_idle: usize,
    /// Backends counted by the pool: idle, linked, being opened, or being
    /// cleaned up after a client left mid-transaction.
    pub sv_open: usize,
    /// How long the longest-waiting client has waited.
    pub maxwait: Duration,
}

impl PoolView {
    /// Open backends neither idle nor linked: being opened, or being cleaned
    /// up in the background (pgmux has no separate state for those yet).
    pub fn sv_login(&self) -> usize {
        self.sv_open.saturating_sub(self.sv_idle + self.sv_active)
    }
}

/// Every pool, the primaries' and the replicas', sorted by (database, user,
/// primary first, node), with client counts from the registry. A client
/// holding a backend counts toward the pool it came from; idle and waiting
/// clients toward their database's primary pool (where every request starts).
pub fn pool_views(shared: &Shared) -> Vec<PoolView> {
    let view = |database: String, user: String, role: &'static str, pool: Arc<Pool>| {
        let stats = pool.stats();
        PoolView {
            database,
            user,
            node: pool.settings().addr.clone(),
            role,
            pool,
            cl_active: 0,
            cl_waiting: 0,
            cl_idle: 0,
            sv_active: 0,
            sv_idle: stats.idle,
            sv_open: stats.open,
            maxwait: Duration::ZERO,
        }
    };
    let mut views: Vec<PoolView> = shared.pools.all().into_iter().map(|((d, u), p)| view(d, u, "primary", p)).collect();
    views.extend(shared.pools.replicas().into_iter().map(|((d, u, _), p)| view(d, u, "replica", p)));
    views.sort_by(|a, b| (&a.database, &a.user, a.role, &a.node).cmp(&(&b.database, &b.user, b.role, &b.node)));
    let index: HashMap<usize, usize> = views.iter().enumerate().map(|(i, v)| (pool_id(&v.pool), i)).collect();
    for c in shared.clients.snapshot() {
        let Some(login) = c.login() else { continue };
        let Some(home) = login.pool.as_ref().and_then(|p| index.get(&pool_id(p))) else { continue };
        match c.state() {
            ClientState::Idle => views[*home].cl_idle += 1,
            ClientState::Paused | ClientState::Waiting => {
                let view = &mut views[*home];
                view.cl_waiting += 1;
                view.maxwait = view.maxwait.max(c.since().elapsed());
            }
            ClientState::Active => {
                let linked = c.link().and_then(|l| index.get(&l.pool)).unwrap_or(home);
                views[*linked].cl_active += 1;
                views[*linked].sv_active += 1;
            }
            ClientState::Login | ClientState::Admin => {}
        }
    }
    views
}

fn pool_mode_of(config: &Config, database: &str) -> PoolMode {
    config.database(database).map(|d| config.pool_mode(d)).unwrap_or(config.proxy.pool_mode)
}

pub fn pools(shared: &Shared) -> ResultSet {
    let config = shared.config();
    let mut rs = ResultSet::new(&[
        "database",
        "user",
        "cl_active",
        "cl_waiting",
        "cl_active_cancel_req",
        "cl_waiting_cancel_req",
        "sv_active",
        "sv_active_cancel",
        "sv_being_canceled",
        "sv_idle",
        "sv_used",
        "sv_tested",
        "sv_login",
        "maxwait",
        "maxwait_us",
        "pool_mode",
        "cl_idle",
        "sv_open",
        "pinned",
        "node",
        "role",
    ]);
    for v in pool_views(shared) {
        let mode = pool_mode_of(&config, &v.database);
        // A session-mode client keeps its backend for the whole session.
        let pinned = if mode == PoolMode::Session { v.cl_active } else { 0 };
        rs.push(vec![
            v.database.clone(),
            v.user.clone(),
            v.cl_active.to_string(),
            v.cl_waiting.to_string(),
            // Cancel requests are forwarded at once, never queued: always 0.
            "0".into(),
            "0".into(),
            v.sv_active.to_string(),
            "0".into(),
            "0".into(),
            v.sv_idle.to_string(),
            // pgmux does not test idle servers before reuse: no used/tested states.
            "0".into(),
            "0".into(),
            v.sv_login().to_string(),
            v.maxwait.as_secs().to_string(),
            v.maxwait.subsec_micros().to_string(),
            mode_str(mode).into(),
            v.cl_idle.to_string(),
            v.sv_open.to_string(),
            pinned.to_string(),
            v.node.clone(),
            v.role.into(),
        ]);
    }
    rs
}

pub fn stats(shared: &Shared) -> ResultSet {
    let mut rs = ResultSet::new(&[
        "database",
        "total_xact_count",
        "total_query_count",
        "total_received",
        "total_sent",
        "total_xact_time",
        "total_query_time",
        "total_wait_time",
        "avg_xact_count",
        "avg_query_count",
        "avg_recv",
        "avg_sent",
        "avg_xact_time",
        "avg_query_time",
        "avg_wait_time",
        "node",
        "role",
    ]);
    // PgBouncer reports per database, summed over users; pgmux has a row per
    // node of the database, since its replicas are pools of their own.
    #[derive(Default)]
    struct Sum {
        role: &'static str,
        xacts: u64,
        queries: u64,
        received: u64,
        sent: u64,
        xact_us: u64,
        query_us: u64,
        wait_us: u64,
        oldest: Option<Instant>,
    }
    let mut by_node: BTreeMap<(String, bool, String), Sum> = BTreeMap::new();
    for v in pool_views(shared) {
        let c = v.pool.counters();
        let s = by_node.entry((v.database, v.role != "primary", v.node)).or_default();
        s.role = v.role;
        s.xacts += c.checkouts.load(Ordering::Relaxed);
        s.queries += c.query.count();
        s.received += c.bytes_in.load(Ordering::Relaxed);
        s.sent += c.bytes_out.load(Ordering::Relaxed);
        s.xact_us += c.xact.sum_us();
        s.query_us += c.query.sum_us();
        s.wait_us += c.wait.sum_us();
        s.oldest = Some(s.oldest.map_or(v.pool.created(), |o| o.min(v.pool.created())));
    }
    for ((database, _, node), s) in by_node {
        // Averages are since the pool was created, not over PgBouncer's 15 s
        // stats_period: rates per second, times per transaction or query.
        let secs = s.oldest.map_or(0, |o| o.elapsed().as_secs()).max(1);
        let per = |total: u64, n: u64| total.checked_div(n).unwrap_or(0).to_string();
        rs.push(vec![
            database,
            s.xacts.to_string(),
            s.queries.to_string(),
            s.received.to_string(),
            s.sent.to_string(),
            s.xact_us.to_string(),
            s.query_us.to_string(),
            s.wait_us.to_string(),
            (s.xacts / secs).to_string(),
            (s.queries / secs).to_string(),
            (s.received / secs).to_string(),
            (s.sent / secs).to_string(),
            per(s.xact_us, s.xacts),
            per(s.query_us, s.queries),
            per(s.wait_us, s.xacts),
            node,
            s.role.into(),
        ]);
    }
    rs
}

pub fn clients(shared: &Shared) -> ResultSet {
    let mut rs = ResultSet::new(&[
        "type",
        "user",
        "database",
        "state",
        "addr",
        "port",
        "local_addr",
        "local_port",
        "connect_time",
        "request_time",
        "wait",
        "wait_us",
        "close_needed",
        "ptr",
        "link",
        "remote_pid",
        "tls",
        "application_name",
        "id",
    ]);
    for c in shared.clients.snapshot() {
        // Clients still authenticating have no user or database to show.
        let Some(login) = c.login() else { continue };
        let state = c.state();
        let wait = if matches!(state, ClientState::Waiting | ClientState::Paused) {
            c.since().elapsed()
        } else {
            Duration::ZERO
        };
        let (addr, port) = split_addr(c.peer);
        let (local_addr, local_port) = split_addr(c.local);
        rs.push(vec![
            "C".into(),
            login.user.clone(),
            login.database.clone(),
            state.as_str().into(),
            addr,
            port,
            local_addr,
            local_port,
            format_time(c.connect_time),
            format_time(wall_time(c.since())),
            wait.as_secs().to_string(),
            wait.subsec_micros().to_string(),
            u8::from(c.close_needed()).to_string(),
            format!("{:#x}", c.id),
            c.link().map(|l| l.pid.to_string()).unwrap_or_default(),
            // Only meaningful for Unix-socket clients, which pgmux does not accept.
            "0".into(),
            c.tls().to_owned(),
            login.application_name.clone(),
            c.id.to_string(),
        ]);
    }
    rs
}

pub fn servers(shared: &Shared) -> ResultSet {
    let mut rs = ResultSet::new(&[
        "type",
        "user",
        "database",
        "state",
        "addr",
        "port",
        "connect_time",
        "request_time",
        "remote_pid",
        "node",
        "role",
    ]);
    let row = |v: &PoolView, state: &str, addr: SocketAddr, connected: Instant, request: Instant, pid| {
        vec![
            "S".into(),
            v.user.clone(),
            v.database.clone(),
            state.to_owned(),
            addr.ip().to_string(),
            addr.port().to_string(),
            format_time(wall_time(connected)),
            format_time(wall_time(request)),
            i32::to_string(&pid),
            v.node.clone(),
            v.role.into(),
        ]
    };
    let views = pool_views(shared);
    let by_id: HashMap<usize, &PoolView> = views.iter().map(|v| (pool_id(&v.pool), v)).collect();
    let mut rows = Vec::new();
    for c in shared.clients.snapshot() {
        let Some(link) = c.link() else { continue };
        // A retired pool (its database removed by a reload) is in no view.
        let Some(v) = by_id.get(&link.pool) else { continue };
        rows.push(row(v, "active", link.addr, link.connected, c.since(), link.pid));
    }
    for v in &views {
        for b in v.pool.idle_backends() {
            rows.push(row(v, "idle", b.addr, b.created, b.last_used, b.pid));
        }
    }
    rows.sort_by(|a, b| (&a[2], &a[1], &a[10], &a[9], &a[3], &a[8]).cmp(&(&b[2], &b[1], &b[10], &b[9], &b[3], &b[8])));
    rs.rows = rows;
    rs
}

pub fn databases(shared: &Shared) -> ResultSet {
    let config = shared.config();
    let mut rs = ResultSet::new(&[
        "name",
        "host",
        "port",
        "database",
        "pool_size",
        "min_pool_size",
        "pool_mode",
        "max_connections",
        "current_connections",
        "paused",
        "disabled",
    ]);
    let pools = shared.pools.all();
    for db in &config.databases {
        let (host, port) = split_host_port(&db.primary);
        let current: usize = pools.iter().filter(|((d, _), _)| d == &db.name).map(|(_, p)| p.stats().open).sum();
        rs.push(vec![
            db.name.clone(),
            host,
            port,
            db.server_dbname().to_owned(),
            db.pool_size.to_string(),
            db.min_pool_size.to_string(),
            mode_str(config.pool_mode(db)).into(),
            // No per-database cap beyond pool_size per user: 0, as PgBouncer prints "unlimited".
            "0".into(),
            current.to_string(),
            u8::from(shared.pause.is_paused(&db.name)).to_string(),
            "0".into(),
        ]);
    }
    rs
}

pub fn replicas(shared: &Shared) -> ResultSet {
    let config = shared.config();
    let mut rs = ResultSet::new(&[
        "database",
        "node",
        "role",
        "host",
        "port",
        "weight",
        "state",
        "lsn",
        "lag_bytes",
        "lag_ms",
        "in_rotation",
    ]);
    let nodes = shared.routing.nodes();
    let view_of = |db: &str, addr: &str| nodes.iter().find(|((d, a), _)| d == db && a == addr).map(|(_, n)| n.view());
    for db in &config.databases {
        let primary = view_of(&db.name, &db.primary);
        let mut row = |role: &str, addr: &str, weight: u32| {
            let (host, port) = split_host_port(addr);
            let view = view_of(&db.name, addr);
            let (state, lsn, lag_bytes, lag_ms, rotation) = match view {
                // Monitors start with a database's first routed client.
                None => ("unmonitored".to_owned(), String::new(), String::new(), String::new(), "no".to_owned()),
                Some(v) => {
                    let lag = primary.filter(|p| p.healthy && role == "replica").map(|p| p.lsn.saturating_sub(v.lsn));
                    let why_not = match role {
                        "replica" => out_of_rotation(
                            &Policy::new(&config.routing),
                            &Candidate { view: v, active: 0, weight },
                            &primary.unwrap_or(NodeView::UNKNOWN),
                        ),
                        _ if !v.healthy => Some("down"),
                        _ => None,
                    };
                    (
                        if v.healthy { "up" } else { "down" }.to_owned(),
                        format!("{:X}/{:X}", v.lsn >> 32, v.lsn & 0xffff_ffff),
                        lag.map(|l| l.to_string()).unwrap_or_default(),
                        if role == "replica" { v.replay_delay.as_millis().to_string() } else { String::new() },
                        match (role, why_not) {
                            ("primary", _) => "primary".to_owned(),
                            (_, None) => "yes".to_owned(),
                            (_, Some(why)) => format!("no ({why})"),
                        },
                    )
                }
            };
            rs.push(vec![
                db.name.clone(),
                addr.to_owned(),
                role.to_owned(),
                host,
                port,
                weight.to_string(),
                state,
                lsn,
                lag_bytes,
                lag_ms,
                rotation,
            ]);
        };
        if db.replicas.is_empty() {
            continue;
        }
        row("primary", &db.primary, 0);
        for r in &db.replicas {
            row("replica", r.addr(), r.weight());
        }
    }
    rs
}

pub fn version() -> ResultSet {
    let mut rs = ResultSet::new(&["version"]);
    rs.push(vec![format!("pgmux {}", env!("CARGO_PKG_VERSION"))]);
    rs
}

/// `key, value, default, changeable` for every `[proxy]` and `[routing]` key.
/// Changeable means a reload (SIGHUP, RELOAD) applies it; the listening
/// addresses need a restart.
pub fn config(shared: &Shared) -> ResultSet {
    let mut rs = ResultSet::new(&["key", "value", "default", "changeable"]);
    let current = config_values(&shared.config());
    let defaults = config_values(&Config::default());
    for ((key, value), (_, default)) in current.into_iter().zip(defaults) {
        let changeable =
            if matches!(key, "proxy.listen" | "proxy.metrics_listen" | "proxy.workers") { "no" } else { "yes" };
        rs.push(vec![key.into(), value, default, changeable.into()]);
    }
    rs
}

fn split_addr(a: Option<SocketAddr>) -> (String, String) {
    a.map(|a| (a.ip().to_string(), a.port().to_string())).unwrap_or_default()
}

/// `host:port` or `[v6]:port` from the config, as two columns.
fn split_host_port(s: &str) -> (String, String) {
    match s.rsplit_once(':') {
        Some((h, p)) => (h.trim_start_matches('[').trim_end_matches(']').to_owned(), p.to_owned()),
        None => (s.to_owned(), String::new()),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_format_like_pgbouncer() {
        assert_eq!(format_time(UNIX_EPOCH), "1970-01-01 00:00:00 UTC");
        // 2024-02-29 12:34:56 UTC: a leap day.
        assert_eq!(format_time(UNIX_EPOCH + Duration::from_secs(1_709_210_096)), "2024-02-29 12:34:56 UTC");
    }

    #[test]
    fn host_port_splits() {
        assert_eq!(split_host_port("db:5432"), ("db".into(), "5432".into()));
        assert_eq!(split_host_port("[::1]:5432"), ("::1".into(), "5432".into()));
    }
}
