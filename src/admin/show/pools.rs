//! SHOW POOLS (a row per (database, user), as PgBouncer) and SHOW NODE_POOLS
//! (a row per node of each: the primary's pool and each replica's).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::{NULL, ResultSet, Row, Spec, row};
use crate::config::values::mode_str;
use crate::config::{Config, PoolMode};
use crate::live::Shared;
use crate::live::registry::{ClientState, pool_id};
use crate::pool::Pool;

/// PgBouncer 1.25 `admin_show_pools`.
pub(super) const POOLS: Spec = Spec {
    types: "ssiiiiiiiiiiiiiss",
    names: &[
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
        "load_balance_hosts",
    ],
};

/// pgmux's own: clients without a server connection (PgBouncer counts them
/// in `cl_active`), every server connection the pool counts, and clients
/// holding theirs for the whole session.
pub(super) const POOLS_EXTRA: Spec = Spec { types: "iii", names: &["cl_idle", "sv_open", "pinned"] };

/// The node a per-node row is about: its address as configured, and
/// `primary` or `replica`.
pub(crate) const NODE: Spec = Spec { types: "ss", names: &["node", "role"] };

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
    /// Clients linked to a backend of this pool.
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
    config.resolve(database).map(|d| config.pool_mode(&d)).unwrap_or(config.proxy.pool_mode)
}

/// The counts of one row: a pool, or the sum of a (database, user)'s pools.
#[derive(Debug, Default)]
struct Counts {
    linked: usize,
    waiting: usize,
    idle_clients: usize,
    sv_active: usize,
    sv_idle: usize,
    sv_login: usize,
    sv_open: usize,
    maxwait: Duration,
}

impl Counts {
    fn add(&mut self, v: &PoolView) {
        self.linked += v.cl_active;
        self.waiting += v.cl_waiting;
        self.idle_clients += v.cl_idle;
        self.sv_active += v.sv_active;
        self.sv_idle += v.sv_idle;
        self.sv_login += v.sv_login();
        self.sv_open += v.sv_open;
        self.maxwait = self.maxwait.max(v.maxwait);
    }

    fn row(&self, database: &str, user: &str, mode: PoolMode) -> Row {
        // A session-mode client keeps its backend for the whole session.
        let pinned = if mode == PoolMode::Session { self.linked } else { 0 };
        row!(
            database,
            user,
            // PgBouncer's cl_active: logged-in clients not waiting, with or
            // without a server connection.
            self.linked + self.idle_clients,
            self.waiting,
            // Cancel requests are forwarded at once, never queued: always 0.
            0u8,
            0u8,
            self.sv_active,
            0u8,
            0u8,
            self.sv_idle,
            // pgmux does not test idle servers before reuse: no used/tested states.
            0u8,
            0u8,
            self.sv_login,
            self.maxwait.as_secs(),
            self.maxwait.subsec_micros(),
            mode_str(mode),
            // No multi-host databases (replicas are routed, see NODE_POOLS): NULL, as PgBouncer for one host.
            NULL,
            self.idle_clients,
            self.sv_open,
            pinned,
        )
    }
}

/// PgBouncer's SHOW POOLS: one row per (database, user), its primary's and
/// replicas' pools summed.
pub fn pools(shared: &Shared) -> ResultSet {
    let config = shared.config();
    let mut rs = ResultSet::new(&[&POOLS, &POOLS_EXTRA]);
    let views = pool_views(shared);
    // Sorted by (database, user): each pair's pools are adjacent.
    for group in views.chunk_by(|a, b| (&a.database, &a.user) == (&b.database, &b.user)) {
        let mut counts = Counts::default();
        group.iter().for_each(|v| counts.add(v));
        let (database, user) = (&group[0].database, &group[0].user);
        rs.push(counts.row(database, user, pool_mode_of(&config, database)));
    }
    rs
}

/// SHOW POOLS' columns for every pool, the replicas' included, with the
/// node it connects to.
pub fn node_pools(shared: &Shared) -> ResultSet {
    let config = shared.config();
    let mut rs = ResultSet::new(&[&POOLS, &POOLS_EXTRA, &NODE]);
    for v in pool_views(shared) {
        let mut counts = Counts::default();
        counts.add(&v);
        let mut row = counts.row(&v.database, &v.user, pool_mode_of(&config, &v.database));
        row.extend(row!(v.node, v.role));
        rs.push(row);
    }
    rs
}
