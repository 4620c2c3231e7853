//! SHOW CLIENTS, SERVERS, SOCKETS, ACTIVE_SOCKETS and FDS: PgBouncer's
//! per-connection rows (`socket_header` / `socket_row` in its admin.c).
//!
//! `ptr` and `link` pair a client with its server connection: a client's
//! `ptr` is its id in hex, a server connection's is its backend pid in hex,
//! and each one's `link` is the other's `ptr`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::pools::{NODE, PoolView, pool_views};
use super::{ResultSet, Row, Spec, format_time, row, server_addr, split_addr};
use crate::live::Shared;
use crate::live::registry::{ClientInfo, ClientState, pool_id, wall_time};
use crate::net::ServerAddr;

/// PgBouncer 1.25 `socket_header` (SKF_STD).
pub(super) const SOCKET: Spec = Spec {
    types: "ssssssisiTTiiississii",
    names: &[
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
    ],
};

/// The buffer positions SOCKETS adds (SKF_DBG). pgmux's buffers belong to
/// the client tasks and are not visible here: always 0.
pub(super) const SOCKET_DEBUG: Spec = Spec {
    types: "iiiiiii",
    names: &["recv_pos", "pkt_pos", "pkt_remain", "send_pos", "send_remain", "pkt_avail", "send_avail"],
};

/// PgBouncer 1.25 `admin_show_fds`.
pub(super) const FDS: Spec = Spec {
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
};

/// One connection, client or server, before it is cut to a command's columns.
struct Socket {
    server: bool,
    user: String,
    database: String,
    state: &'static str,
    addr: (String, u16),
    local: (String, u16),
    connect_time: SystemTime,
    request_time: SystemTime,
    wait: Duration,
    close_needed: bool,
    ptr: String,
    link: String,
    remote_pid: i32,
    tls: String,
    application_name: String,
    prepared: usize,
    id: u64,
}

impl Socket {
    fn row(&self) -> Row {
        row!(
            if self.server { "S" } else { "C" },
            &self.user,
            &self.database,
            // pgmux serves no replication connections.
            "none",
            self.state,
            &self.addr.0,
            self.addr.1,
            &self.local.0,
            self.local.1,
            format_time(self.connect_time),
            format_time(self.request_time),
            self.wait.as_secs(),
            self.wait.subsec_micros(),
            self.close_needed,
            &self.ptr,
            &self.link,
            self.remote_pid,
            &self.tls,
            &self.application_name,
            self.prepared,
            self.id,
        )
    }

    fn debug_row(&self) -> Row {
        let mut row = self.row();
        row.extend(std::iter::repeat_n(Some("0".to_owned()), SOCKET_DEBUG.names.len()));
        row
    }
}

fn client_ptr(id: u64) -> String {
    format!("{id:#x}")
}

fn server_ptr(pid: i32) -> String {
    format!("{pid:#x}")
}

/// A client as a socket, in `state`.
fn client_socket(c: &ClientInfo, state: &'static str) -> Socket {
    let login = c.login();
    let waiting = matches!(c.state(), ClientState::Waiting | ClientState::Paused);
    Socket {
        server: false,
        // PgBouncer's placeholders for a client still logging in.
        user: login.map_or("(nouser)".into(), |l| l.user().to_owned()),
        database: login.map_or("(nodb)".into(), |l| l.database().to_owned()),
        state,
        addr: split_addr(c.peer()),
        local: split_addr(c.local()),
        connect_time: c.connect_time(),
        request_time: wall_time(c.since()),
        wait: if waiting { c.since().elapsed() } else { Duration::ZERO },
        close_needed: c.close_needed(),
        ptr: client_ptr(c.id),
        link: c.link().map(|l| server_ptr(l.pid)).unwrap_or_default(),
        // Only known for Unix-socket clients, which pgmux does not accept.
        remote_pid: 0,
        tls: c.tls().to_owned(),
        application_name: login.map(|l| l.application_name().to_owned()).unwrap_or_default(),
        // A client's statements live in its own task: not counted here.
        prepared: 0,
        id: c.id,
    }
}

/// A server connection of pool `v`.
struct Server<'a> {
    v: &'a PoolView,
    socket: Socket,
}

fn server_socket(
    v: &PoolView,
    state: &'static str,
    addr: &ServerAddr,
    connected: Instant,
    request: Instant,
    pid: i32,
) -> Socket {
    Socket {
        server: true,
        user: v.user.clone(),
        database: v.database.clone(),
        state,
        addr: server_addr(addr),
        local: (String::new(), 0),
        connect_time: wall_time(connected),
        request_time: wall_time(request),
        wait: Duration::ZERO,
        close_needed: false,
        ptr: server_ptr(pid),
        link: String::new(),
        remote_pid: pid,
        tls: String::new(),
        application_name: String::new(),
        prepared: 0,
        id: u64::try_from(pid).unwrap_or_default(),
    }
}

/// Every server connection: linked ones (from their clients), then idle
/// ones (from the pools). A linked one's local address, TLS and statements
/// are with its client's task: empty and 0 until it is idle again.
fn server_sockets<'a>(views: &'a [PoolView], clients: &[Arc<ClientInfo>]) -> Vec<Server<'a>> {
    let by_id: HashMap<usize, &PoolView> = views.iter().map(|v| (pool_id(&v.pool), v)).collect();
    let mut out = Vec::new();
    for c in clients {
        let Some(link) = c.link() else { continue };
        // A retired pool (its database removed by a reload) is in no view.
        let Some(v) = by_id.get(&link.pool) else { continue };
        let Some(addr) = link.addr() else { continue };
        let mut socket = server_socket(v, "active", &addr, link.connected(), c.since(), link.pid);
        socket.link = client_ptr(c.id);
        socket.application_name = c.login().map(|l| l.application_name().to_owned()).unwrap_or_default();
        out.push(Server { v, socket });
    }
    for v in views {
        for b in v.pool.idle_backends() {
            let mut socket = server_socket(v, "idle", &b.addr, b.created, b.last_used, b.pid);
            socket.local = split_addr(b.local);
            socket.tls = b.tls.unwrap_or_default();
            socket.prepared = b.prepared;
            out.push(Server { v, socket });
        }
    }
    out
}

pub fn clients(shared: &Shared) -> ResultSet {
    let mut rs = ResultSet::new(&[&SOCKET]);
    for c in shared.clients.snapshot() {
        // PgBouncer lists clients once logged in.
        if c.login().is_some() {
            rs.push(client_socket(&c, c.state().as_str()).row());
        }
    }
    rs
}

pub fn servers(shared: &Shared) -> ResultSet {
    let mut rs = ResultSet::new(&[&SOCKET, &NODE]);
    let views = pool_views(shared);
    let mut servers = server_sockets(&views, &shared.clients.snapshot());
    fn key<'s>(s: &'s Server<'_>) -> (&'s str, &'s str, &'s str, &'s str, &'s str, i32) {
        (&s.v.database, &s.v.user, s.v.role, &s.v.node, s.socket.state, s.socket.remote_pid)
    }
    servers.sort_by(|a, b| key(a).cmp(&key(b)));
    for s in servers {
        let mut row = s.socket.row();
        row.extend(row!(&s.v.node, s.v.role));
        rs.push(row);
    }
    rs
}

/// SOCKETS' state names: PgBouncer's list names.
fn socket_state(c: &ClientInfo) -> &'static str {
    match c.state() {
        ClientState::Login => "cl_login",
        ClientState::Waiting | ClientState::Paused => "cl_waiting",
        ClientState::Idle | ClientState::Active | ClientState::Admin => "cl_active",
    }
}

/// Every client (those still logging in last) and server connection, with
/// PgBouncer's buffer columns.
pub fn sockets(shared: &Shared) -> ResultSet {
    let mut rs = ResultSet::new(&[&SOCKET, &SOCKET_DEBUG]);
    let clients = shared.clients.snapshot();
    let (logging_in, logged_in): (Vec<_>, Vec<_>) = clients.iter().partition(|c| c.login().is_none());
    for c in logged_in {
        rs.push(client_socket(c, socket_state(c)).debug_row());
    }
    let views = pool_views(shared);
    for mut s in server_sockets(&views, &clients) {
        s.socket.state = if s.socket.state == "active" { "sv_active" } else { "sv_idle" };
        rs.push(s.socket.debug_row());
    }
    for c in logging_in {
        rs.push(client_socket(c, socket_state(c)).debug_row());
    }
    rs
}

/// PgBouncer lists the sockets with data in their buffers. pgmux cannot see
/// its buffers from here; the connections that can hold data in flight are
/// the linked pairs: clients holding a server connection, and those.
pub fn active_sockets(shared: &Shared) -> ResultSet {
    let mut rs = ResultSet::new(&[&SOCKET, &SOCKET_DEBUG]);
    let clients = shared.clients.snapshot();
    for c in clients.iter().filter(|c| c.login().is_some() && c.link().is_some()) {
        rs.push(client_socket(c, "cl_active").debug_row());
    }
    let views = pool_views(shared);
    for mut s in server_sockets(&views, &clients).into_iter().filter(|s| s.socket.state == "active") {
        s.socket.state = "sv_active";
        rs.push(s.socket.debug_row());
    }
    rs
}

/// PgBouncer's online restart hands its sockets (and their clients' cancel
/// keys and passwords) to a new process through this command. pgmux has no
/// such handover: the columns, and no rows.
pub fn fds(_: &Shared) -> ResultSet {
    ResultSet::new(&[&FDS])
}
