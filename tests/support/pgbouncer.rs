//! PgBouncer 1.25's admin console result sets, as the tests compare pgmux's
//! with them, and decoders for the RowDescription and DataRow messages that
//! carry them.

use super::raw::Msg;

/// PgBouncer 1.25's result sets: the tupdesc letters and column names it
/// passes to `pktbuf_write_RowDescription`, copied from src/admin.c
/// (`admin_show_*`, `socket_header`) and src/stats.c (`admin_database_stats*`,
/// `show_stat_totals`) at tag pgbouncer_1_25_2. Letters: s text, i int4,
/// q int8, N numeric, T a time sent as text, b bytea.
pub struct PgBouncer {
    pub command: &'static str,
    pub types: &'static str,
    pub names: &'static [&'static str],
    /// pgmux's own columns, after PgBouncer's.
    pub extras: &'static [&'static str],
}

/// `socket_header(buf, false)`: SHOW CLIENTS and SHOW SERVERS.
const SOCKET_TYPES: &str = "ssssssisiTTiiississii";
const SOCKET_NAMES: &[&str] = &[
    "type",
    "user",
    "database",
    "replication",
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
    "prepared_statements",
    "id",
];
/// `socket_header(buf, true)`: SHOW SOCKETS and SHOW ACTIVE_SOCKETS.
const SOCKET_DEBUG_TYPES: &str = "ssssssisiTTiiississiiiiiiiii";
const SOCKET_DEBUG_NAMES: &[&str] = &[
    "type",
    "user",
    "database",
    "replication",
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
    "prepared_statements",
    "id",
    "recv_pos",
    "pkt_pos",
    "pkt_remain",
    "send_pos",
    "send_remain",
    "pkt_avail",
    "send_avail",
];
const POOLS_TYPES: &str = "ssiiiiiiiiiiiiiss";
const POOLS_NAMES: &[&str] = &[
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
];
const STATS_TYPES: &str = "sNNNNNNNNNNNNNNNNNNNNNN";
const STATS_NAMES: &[&str] = &[
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
];

pub const SHOWS: &[PgBouncer] = &[
    PgBouncer { command: "POOLS", types: POOLS_TYPES, names: POOLS_NAMES, extras: &["cl_idle", "sv_open", "pinned"] },
    PgBouncer { command: "CLIENTS", types: SOCKET_TYPES, names: SOCKET_NAMES, extras: &[] },
    PgBouncer { command: "SERVERS", types: SOCKET_TYPES, names: SOCKET_NAMES, extras: &["node", "role"] },
    PgBouncer { command: "SOCKETS", types: SOCKET_DEBUG_TYPES, names: SOCKET_DEBUG_NAMES, extras: &[] },
    PgBouncer { command: "ACTIVE_SOCKETS", types: SOCKET_DEBUG_TYPES, names: SOCKET_DEBUG_NAMES, extras: &[] },
    PgBouncer { command: "STATS", types: STATS_TYPES, names: STATS_NAMES, extras: &[] },
    PgBouncer {
        command: "STATS_TOTALS",
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
        extras: &[],
    },
    PgBouncer {
        command: "STATS_AVERAGES",
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
        extras: &[],
    },
    PgBouncer { command: "TOTALS", types: "sN", names: &["name", "value"], extras: &[] },
    PgBouncer {
        command: "DATABASES",
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
        extras: &[],
    },
    PgBouncer {
        command: "USERS",
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
        extras: &[],
    },
    PgBouncer { command: "LISTS", types: "si", names: &["list", "items"], extras: &[] },
    PgBouncer { command: "CONFIG", types: "ssss", names: &["key", "value", "default", "changeable"], extras: &[] },
    PgBouncer { command: "MEM", types: "siiii", names: &["name", "size", "used", "free", "memtotal"], extras: &[] },
    PgBouncer {
        command: "FDS",
        types: "issssiqisssssbb",
        names: &[
            "fd",
            "task",
            "user",
            "database",
            "addr",
            "port",
            "cancel",
            "link",
            "client_encoding",
            "std_strings",
            "datestyle",
            "timezone",
            "password",
            "scram_client_key",
            "scram_server_key",
        ],
        extras: &[],
    },
    PgBouncer { command: "STATE", types: "ss", names: &["key", "value"], extras: &[] },
    PgBouncer { command: "VERSION", types: "s", names: &["version"], extras: &[] },
    PgBouncer { command: "DNS_HOSTS", types: "sqs", names: &["hostname", "ttl", "addrs"], extras: &[] },
    PgBouncer { command: "DNS_ZONES", types: "sqi", names: &["zonename", "serial", "count"], extras: &[] },
    // pgmux's per-node forms of POOLS and STATS: PgBouncer's columns, then the node.
    PgBouncer {
        command: "NODE_POOLS",
        types: POOLS_TYPES,
        names: POOLS_NAMES,
        extras: &["cl_idle", "sv_open", "pinned", "node", "role"],
    },
    PgBouncer { command: "NODE_STATS", types: STATS_TYPES, names: STATS_NAMES, extras: &["node", "role"] },
];

/// The type OID a tupdesc letter declares (`pktbuf_write_RowDescription`).
pub fn oid(letter: u8) -> u32 {
    match letter {
        b'i' => 23,
        b'q' => 20,
        b'N' => 1700,
        b'b' => 17,
        _ => 25,
    }
}

fn int_at(body: &[u8], at: &mut usize, n: usize) -> i64 {
    let v = body[*at..*at + n].iter().fold(0i64, |acc, &b| (acc << 8) | i64::from(b));
    *at += n;
    // Sign-extend 2- and 4-byte fields.
    let bits = 8 * n as u32;
    (v << (64 - bits)) >> (64 - bits)
}

/// A RowDescription's columns: name and type OID.
pub fn columns(m: &Msg) -> Vec<(String, u32)> {
    assert_eq!(m.tag, b'T', "expected a RowDescription, got '{}'", m.tag as char);
    let body = &m.body[..];
    let mut at = 0;
    let n = int_at(body, &mut at, 2);
    (0..n)
        .map(|_| {
            let end = at + body[at..].iter().position(|&b| b == 0).expect("NUL-terminated name");
            let name = String::from_utf8(body[at..end].to_vec()).expect("UTF-8 name");
            at = end + 1 + 4 + 2;
            let oid = int_at(body, &mut at, 4) as u32;
            at += 2 + 4 + 2;
            (name, oid)
        })
        .collect()
}

/// A DataRow's values (`None`: NULL).
pub fn values(m: &Msg) -> Vec<Option<String>> {
    let body = &m.body[..];
    let mut at = 0;
    let n = int_at(body, &mut at, 2);
    (0..n)
        .map(|_| {
            let len = int_at(body, &mut at, 4);
            (len >= 0).then(|| {
                let v = String::from_utf8(body[at..at + len as usize].to_vec()).expect("UTF-8 value");
                at += len as usize;
                v
            })
        })
        .collect()
}
