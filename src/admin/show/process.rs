//! SHOW VERSION, STATE, LISTS, MEM, DNS_HOSTS and DNS_ZONES: the process
//! as a whole.

use super::pools::pool_views;
use super::{ResultSet, Spec, row};
use crate::config::{DatabaseConfig, UserConfig};
use crate::live::Shared;
use crate::live::registry::{ClientInfo, ClientState};
use crate::pool::{Backend, Pool};

pub(super) const VERSION: Spec = Spec { types: "s", names: &["version"] };
/// PgBouncer 1.25 `admin_show_state`.
pub(super) const STATE: Spec = Spec { types: "ss", names: &["key", "value"] };
/// PgBouncer 1.25 `admin_show_lists`.
pub(super) const LISTS: Spec = Spec { types: "si", names: &["list", "items"] };
/// PgBouncer 1.25 `admin_show_mem`.
pub(super) const MEM: Spec = Spec { types: "siiii", names: &["name", "size", "used", "free", "memtotal"] };
/// PgBouncer 1.25 `admin_show_dns_hosts`.
pub(super) const DNS_HOSTS: Spec = Spec { types: "sqs", names: &["hostname", "ttl", "addrs"] };
/// PgBouncer 1.25 `admin_show_dns_zones`.
pub(super) const DNS_ZONES: Spec = Spec { types: "sqi", names: &["zonename", "serial", "count"] };

pub fn version() -> ResultSet {
    let mut rs = ResultSet::new(&[&VERSION]);
    rs.push(row!(format!("pgmux {}", env!("CARGO_PKG_VERSION"))));
    rs
}

/// PgBouncer's process-wide mode, one of three: `PAUSE` without a
/// database is `paused`; `SUSPEND` (which pauses too) is `suspended`.
pub fn state(shared: &Shared) -> ResultSet {
    let mut rs = ResultSet::new(&[&STATE]);
    let suspended = shared.is_suspended();
    let paused = shared.pause.all_paused() && !suspended;
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    rs.push(row!("active", yes_no(!paused && !suspended)));
    rs.push(row!("paused", yes_no(paused)));
    rs.push(row!("suspended", yes_no(suspended)));
    rs
}

/// Live object counts, in PgBouncer's rows. pgmux keeps no free lists of
/// client or server objects (each is freed when its connection ends), no
/// pools for peers (it only forwards their cancels: `peers` counts
/// `[[peers]]`), and resolves host names when it connects, without a DNS
/// cache: those rows are 0.
pub fn lists(shared: &Shared) -> ResultSet {
    let config = shared.config();
    let views = pool_views(shared);
    let clients = shared.clients.snapshot();
    let logging_in = clients.iter().filter(|c| c.state() == ClientState::Login).count();
    // A pool per (database, user), as SHOW POOLS lists them.
    let mut pairs: Vec<(&str, &str)> = views.iter().map(|v| (v.database.as_str(), v.user.as_str())).collect();
    pairs.dedup();
    let servers: usize = views.iter().map(|v| v.sv_open).sum();
    let mut rs = ResultSet::new(&[&LISTS]);
    for (list, items) in [
        ("databases", config.databases.len()),
        ("users", config.users.len()),
        ("peers", config.peers.len()),
        ("pools", pairs.len()),
        ("peer_pools", 0),
        ("free_clients", 0),
        ("used_clients", clients.len()),
        ("login_clients", logging_in),
        ("free_servers", 0),
        ("used_servers", servers),
        ("dns_names", 0),
        ("dns_zones", 0),
        ("dns_queries", 0),
        ("dns_pending", 0),
    ] {
        rs.push(row!(list, items));
    }
    rs
}

/// PgBouncer lists its slab caches. pgmux allocates each object on its own:
/// the rows give, under PgBouncer's names, the size of each kind of object
/// (its fixed part; buffers and strings it owns are not counted), how many
/// exist, none kept free, and their product.
pub fn mem(shared: &Shared) -> ResultSet {
    let config = shared.config();
    let views = pool_views(shared);
    let servers: usize = views.iter().map(|v| v.sv_open).sum();
    let mut rs = ResultSet::new(&[&MEM]);
    for (name, size, used) in [
        ("user_cache", size_of::<UserConfig>(), config.users.len()),
        ("db_cache", size_of::<DatabaseConfig>(), config.databases.len()),
        ("pool_cache", size_of::<Pool>(), views.len()),
        ("server_cache", size_of::<Backend>(), servers),
        ("client_cache", size_of::<ClientInfo>(), shared.clients.snapshot().len()),
    ] {
        let total = size.saturating_mul(used);
        rs.push(row!(name, size, used, 0u8, total.min(i32::MAX as usize)));
    }
    rs
}

/// pgmux resolves a server's host name each time it connects and caches
/// nothing: the columns, no rows.
pub fn dns_hosts(_: &Shared) -> ResultSet {
    ResultSet::new(&[&DNS_HOSTS])
}

/// As [`dns_hosts`]: no DNS cache, no zones.
pub fn dns_zones(_: &Shared) -> ResultSet {
    ResultSet::new(&[&DNS_ZONES])
}
