//! SHOW DATABASES and USERS (PgBouncer's, from the configuration and live
//! counts) and SHOW REPLICAS (pgmux's own).

use std::collections::HashMap;

use super::pools::pool_views;
use super::{NULL, ResultSet, Spec, row, split_host_port};
use crate::config::StatedRole;
use crate::config::values::mode_str;
use crate::live::Shared;
use crate::live::registry::ClientState;
use crate::routing::route::Policy;

/// PgBouncer 1.25 `admin_show_databases`.
pub(super) const DATABASES: Spec = Spec {
    types: "ssissiiiissiiiiii",
    names: &[
        "name",
        "host",
        "port",
        "database",
        "force_user",
        "pool_size",
        "min_pool_size",
        "reserve_pool_size",
        "server_lifetime",
        "pool_mode",
        "load_balance_hosts",
        "max_connections",
        "current_connections",
        "max_client_connections",
        "current_client_connections",
        "paused",
        "disabled",
    ],
};

/// PgBouncer 1.25 `admin_show_users`.
pub(super) const USERS: Spec = Spec {
    types: "ssssiiii",
    names: &[
        "name",
        "pool_size",
        "reserve_pool_size",
        "pool_mode",
        "max_user_connections",
        "current_connections",
        "max_user_client_connections",
        "current_client_connections",
    ],
};

pub(super) const REPLICAS: Spec = Spec {
    types: "ssssssssssssss",
    names: &[
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
        "timeline",
        "stated_role",
        "since_s",
    ],
};

/// Open server connections and logged-in clients (console sessions
/// aside), by user when `by_user`, else by database.
fn live_counts(shared: &Shared, by_user: bool) -> (HashMap<String, usize>, HashMap<String, usize>) {
    let pick = |database: &str, user: &str| if by_user { user.to_owned() } else { database.to_owned() };
    let mut servers: HashMap<String, usize> = HashMap::new();
    for v in pool_views(shared) {
        *servers.entry(pick(&v.database, &v.user)).or_default() += v.sv_open;
    }
    let mut clients: HashMap<String, usize> = HashMap::new();
    for c in shared.clients.snapshot() {
        if let Some(l) = c.login().filter(|_| c.state() != ClientState::Admin) {
            *clients.entry(pick(l.database(), l.user())).or_default() += 1;
        }
    }
    (servers, clients)
}

/// Every configured database, with its reserve pool and connection caps (0:
/// none). Where PgBouncer has a setting pgmux lacks, the value PgBouncer
/// shows when it is unset: no forced user (NULL).
pub fn databases(shared: &Shared) -> ResultSet {
    let config = shared.config();
    let mut rs = ResultSet::new(&[&DATABASES]);
    let (servers, clients) = live_counts(shared, false);
    for db in &config.databases {
        let (host, port) =
            split_host_port(&shared.routing.primary_of(&db.name).unwrap_or_else(|| db.first_addr().to_owned()));
        rs.push(row!(
            &db.name,
            host,
            port,
            db.server_dbname(),
            NULL,
            db.pool_size,
            db.min_pool_size,
            db.reserve_pool_size.unwrap_or(config.proxy.reserve_pool_size),
            config.proxy.server_lifetime.as_secs(),
            // The database's own pool_mode; NULL when it inherits [proxy]'s, as PgBouncer.
            db.pool_mode.map(mode_str),
            // No multi-host databases (replicas are routed, see SHOW REPLICAS).
            NULL,
            config.max_db_connections(db),
            servers.get(&db.name).copied().unwrap_or(0),
            db.max_db_client_connections.unwrap_or(config.proxy.max_db_client_connections),
            clients.get(&db.name).copied().unwrap_or(0),
            shared.pause.is_paused(&db.name),
            shared.disabled.is_disabled(&db.name),
        ));
    }
    rs
}

/// Every configured user: names, caps and live counts, never a password.
/// pgmux has no per-user pool settings: empty overrides (PgBouncer sends an
/// empty string, not NULL, for an unset pool size), NULL pool_mode; the
/// caps are the global ones (0: no limit).
pub fn users(shared: &Shared) -> ResultSet {
    let config = shared.config();
    let mut rs = ResultSet::new(&[&USERS]);
    let (servers, clients) = live_counts(shared, true);
    for u in &config.users {
        rs.push(row!(
            &u.name,
            "",
            "",
            NULL,
            config.proxy.max_user_connections,
            servers.get(&u.name).copied().unwrap_or(0),
            config.proxy.max_user_client_connections,
            clients.get(&u.name).copied().unwrap_or(0),
        ));
    }
    rs
}

/// Every node of the databases with several: observed role and timeline,
/// state (`up`, `down`, `lagging`, `fenced`, `timeline`, or `unmonitored`
/// before the database's first client), position, lag, whether (or why
/// not) it takes reads, and since when its role or state is what it is.
pub fn replicas(shared: &Shared) -> ResultSet {
    let config = shared.config();
    let policy = Policy::new(&config.routing);
    let mut rs = ResultSet::new(&[&REPLICAS]);
    let topologies = shared.routing.topologies();
    let stated = |r: Option<StatedRole>| match r {
        Some(StatedRole::Primary) => "primary",
        Some(StatedRole::Replica) => "replica",
        None => "",
    };
    for db in &config.databases {
        if !db.has_topology() {
            continue;
        }
        let nodes = db.nodes();
        let topology =
            topologies.iter().find(|t| t.db == db.name && t.addrs().eq(nodes.iter().map(|n| n.addr.as_str())));
        let Some(topology) = topology else {
            // Monitors start with the database's first client.
            for n in &nodes {
                let (host, port) = split_host_port(&n.addr);
                let role = stated(n.stated);
                rs.push(row!(
                    &db.name,
                    &n.addr,
                    if role.is_empty() { "unknown" } else { role },
                    host,
                    port.map(|p| p.to_string()).unwrap_or_default(),
                    n.weight.to_string(),
                    "unmonitored",
                    "",
                    "",
                    "",
                    "no",
                    "",
                    stated(n.stated),
                    "",
                ));
            }
            continue;
        };
        for n in topology.report(&policy) {
            let (host, port) = split_host_port(n.addr);
            let v = n.view;
            let rotation = match (n.is_primary, n.out_of_rotation) {
                (true, _) => "primary".to_owned(),
                (false, None) => "yes".to_owned(),
                (false, Some(why)) => format!("no ({why})"),
            };
            let monitored = v.sampled_at.is_some();
            rs.push(row!(
                &db.name,
                n.addr,
                n.role,
                host,
                port.map(|p| p.to_string()).unwrap_or_default(),
                n.weight.to_string(),
                n.state,
                if monitored { format!("{:X}/{:X}", v.lsn >> 32, v.lsn & 0xffff_ffff) } else { String::new() },
                n.lag_bytes.map(|l| l.to_string()).unwrap_or_default(),
                if n.role == "replica" { v.replay_delay.as_millis().to_string() } else { String::new() },
                rotation,
                if v.timeline != 0 { v.timeline.to_string() } else { String::new() },
                stated(n.stated),
                format!("{:.1}", n.since.elapsed().as_secs_f64()),
            ));
        }
    }
    rs
}
