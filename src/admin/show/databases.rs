//! SHOW DATABASES and USERS (PgBouncer's, from the configuration and live
//! counts) and SHOW REPLICAS (pgmux's own).

use std::collections::HashMap;

use super::pools::pool_views;
use super::{NULL, ResultSet, Spec, row, split_host_port};
use crate::config::values::mode_str;
use crate::live::Shared;
use crate::live::registry::ClientState;
use crate::routing::monitor::NodeView;
use crate::routing::route::{Candidate, Policy, out_of_rotation};

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
    types: "sssssssssss",
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
            *clients.entry(pick(&l.database, &l.user)).or_default() += 1;
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
        let (host, port) = split_host_port(&db.primary);
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

/// The nodes of databases with replicas: state, replay position, lag, and
/// whether (or why not) they take reads.
pub fn replicas(shared: &Shared) -> ResultSet {
    let config = shared.config();
    let mut rs = ResultSet::new(&[&REPLICAS]);
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
            rs.push(row!(
                &db.name,
                addr,
                role,
                host,
                port.map(|p| p.to_string()).unwrap_or_default(),
                weight.to_string(),
                state,
                lsn,
                lag_bytes,
                lag_ms,
                rotation,
            ));
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
