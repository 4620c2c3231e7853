//! The admin console's protocol loop and command table.
//!
//! Simple query protocol only, one command per Query message. Handlers are
//! plain functions from the shared state to a [`Reply`]; the one command
//! that must wait (PAUSE) says what to wait for, and the loop does the waiting.

use std::time::Duration;

use crate::net::{Stream, fatal};
use bytes::BytesMut;
use tokio::io::AsyncReadExt;

use super::show::{self, ResultSet};
use crate::live::Shared;
use crate::live::registry::{ClientInfo, Signal};
use crate::protocol::backend::{self as msg, Severity};
use crate::protocol::frame::split_frame;
use crate::protocol::sqlstate::SqlState;
use crate::protocol::tag;
use crate::reload::ReloadError;

/// Console commands are short; anything longer is refused.
const MAX_COMMAND_LEN: u32 = 64 * 1024;

/// How often PAUSE looks for in-flight transactions to finish. Polling costs
/// nothing while no PAUSE runs, whereas a wake-up on every release would
/// cost every transaction.
const PAUSE_POLL: Duration = Duration::from_millis(5);

/// What a command answers.
#[derive(Debug)]
pub enum Reply {
    Rows(ResultSet),
    /// CommandComplete with this tag.
    Done(&'static str),
    /// NOTICE lines, then CommandComplete with the tag.
    Notices(Vec<String>, &'static str),
    Error(SqlState, String),
    /// PAUSE: answer `PAUSE` once nothing of `database` (everything if `None`) is in flight.
    AfterDrain(Option<String>, &'static str),
    /// WAIT_CLOSE: answer once no server connection of `database` (all if
    /// `None`) from before the last RECONNECT / KILL / reload is left.
    AfterClose(Option<String>),
}

/// Whether a command takes an argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arg {
    None,
    Optional(&'static str),
    Required(&'static str),
    /// Everything after the command's words, as written (SET's `key = value`).
    Rest(&'static str),
}

pub(super) struct Command {
    /// Upper case, words separated by one space.
    pub(super) name: &'static str,
    arg: Arg,
    help: &'static str,
    run: fn(&Shared, Option<&str>) -> Reply,
}

const COMMANDS: &[Command] = &[
    Command { name: "SHOW HELP", arg: Arg::None, help: "this list", run: |_, _| help() },
    Command {
        name: "SHOW POOLS",
        arg: Arg::None,
        help: "clients and server connections per (database, user), all nodes summed (PgBouncer's columns, then cl_idle, sv_open, pinned)",
        run: |s, _| Reply::Rows(show::pools(s)),
    },
    Command {
        name: "SHOW NODE_POOLS",
        arg: Arg::None,
        help: "SHOW POOLS per node: the primary's pool and each replica's, with node and role",
        run: |s, _| Reply::Rows(show::node_pools(s)),
    },
    Command {
        name: "SHOW CLIENTS",
        arg: Arg::None,
        help: "client connections; `id` is what KILL_CLIENT takes",
        run: |s, _| Reply::Rows(show::clients(s)),
    },
    Command {
        name: "SHOW SERVERS",
        arg: Arg::None,
        help: "open server connections to primaries and replicas, active (linked to a client) or idle",
        run: |s, _| Reply::Rows(show::servers(s)),
    },
    Command {
        name: "SHOW SOCKETS",
        arg: Arg::None,
        help: "clients and server connections together, in PgBouncer's low-level form",
        run: |s, _| Reply::Rows(show::sockets(s)),
    },
    Command {
        name: "SHOW ACTIVE_SOCKETS",
        arg: Arg::None,
        help: "SHOW SOCKETS for linked clients and server connections only",
        run: |s, _| Reply::Rows(show::active_sockets(s)),
    },
    Command {
        name: "SHOW STATS",
        arg: Arg::None,
        help: "per database since start: assignments, transactions, queries, bytes, times (us); averages over the last minute or so",
        run: |s, _| Reply::Rows(show::stats(s)),
    },
    Command {
        name: "SHOW STATS_TOTALS",
        arg: Arg::None,
        help: "SHOW STATS' totals",
        run: |s, _| Reply::Rows(show::stats_totals(s)),
    },
    Command {
        name: "SHOW STATS_AVERAGES",
        arg: Arg::None,
        help: "SHOW STATS' averages",
        run: |s, _| Reply::Rows(show::stats_averages(s)),
    },
    Command {
        name: "SHOW TOTALS",
        arg: Arg::None,
        help: "SHOW STATS summed over every database, a row per figure",
        run: |s, _| Reply::Rows(show::totals(s)),
    },
    Command {
        name: "SHOW NODE_STATS",
        arg: Arg::None,
        help: "SHOW STATS per node of each database, with node and role",
        run: |s, _| Reply::Rows(show::node_stats(s)),
    },
    Command {
        name: "SHOW DATABASES",
        arg: Arg::None,
        help: "configured databases, their pool settings, connection counts, and whether they are paused",
        run: |s, _| Reply::Rows(show::databases(s)),
    },
    Command {
        name: "SHOW USERS",
        arg: Arg::None,
        help: "configured users and their connection counts",
        run: |s, _| Reply::Rows(show::users(s)),
    },
    Command {
        name: "SHOW REPLICAS",
        arg: Arg::None,
        help: "configured nodes: state, replay LSN, lag, in rotation or why not",
        run: |s, _| Reply::Rows(show::replicas(s)),
    },
    Command {
        name: "SHOW CONFIG",
        arg: Arg::None,
        help: "[proxy] and [routing] settings with their defaults, then those PgBouncer also has, by its names",
        run: |s, _| Reply::Rows(show::config(s)),
    },
    Command {
        name: "SHOW LISTS",
        arg: Arg::None,
        help: "counts of databases, users, pools, clients and server connections",
        run: |s, _| Reply::Rows(show::lists(s)),
    },
    Command {
        name: "SHOW MEM",
        arg: Arg::None,
        help: "size and count of each kind of object (fixed part)",
        run: |s, _| Reply::Rows(show::mem(s)),
    },
    Command {
        name: "SHOW STATE",
        arg: Arg::None,
        help: "whether everything is paused",
        run: |s, _| Reply::Rows(show::state(s)),
    },
    Command {
        name: "SHOW FDS",
        arg: Arg::None,
        help: "PgBouncer's online-restart socket list: no rows (pgmux hands no sockets over)",
        run: |s, _| Reply::Rows(show::fds(s)),
    },
    Command {
        name: "SHOW DNS_HOSTS",
        arg: Arg::None,
        help: "PgBouncer's DNS cache: no rows (pgmux resolves at each connect)",
        run: |s, _| Reply::Rows(show::dns_hosts(s)),
    },
    Command {
        name: "SHOW DNS_ZONES",
        arg: Arg::None,
        help: "PgBouncer's DNS zones: no rows",
        run: |s, _| Reply::Rows(show::dns_zones(s)),
    },
    Command { name: "SHOW VERSION", arg: Arg::None, help: "pgmux version", run: |_, _| Reply::Rows(show::version()) },
    Command {
        name: "PAUSE",
        arg: Arg::Optional("db"),
        help: "hold new transactions (of db, or all); returns once in-flight ones have finished",
        run: pause,
    },
    Command { name: "RESUME", arg: Arg::Optional("db"), help: "undo PAUSE (and SUSPEND)", run: resume },
    Command {
        name: "SUSPEND",
        arg: Arg::None,
        help: "PAUSE everything and stop accepting connections until RESUME (no socket handover in pgmux)",
        run: suspend,
    },
    Command {
        name: "KILL_CLIENT",
        arg: Arg::Required("id"),
        help: "close a client (57P01) at once; a transaction it is in is rolled back",
        run: kill_client,
    },
    Command {
        name: "RECONNECT",
        arg: Arg::Optional("db"),
        help: "close the server connections (of db, or all): idle ones now, busy ones when their transaction ends",
        run: reconnect,
    },
    Command {
        name: "KILL",
        arg: Arg::Required("db"),
        help: "close db's clients (57P01) and server connections at once; its new transactions wait for RESUME",
        run: kill_database,
    },
    Command {
        name: "WAIT_CLOSE",
        arg: Arg::Optional("db"),
        help: "return once the server connections from before the last RECONNECT, KILL or reload (of db, or all) are closed",
        run: |s, db| match db.map(|d| known_database(s, d)).transpose() {
            Ok(db) => Reply::AfterClose(db.map(str::to_owned)),
            Err(reply) => reply,
        },
    },
    Command {
        name: "SET",
        arg: Arg::Rest("key = value"),
        help: "change a setting a reload can change (checked as in the file; a later RELOAD takes the file's value)",
        run: set,
    },
    Command {
        name: "DISABLE",
        arg: Arg::Required("db"),
        help: "refuse new client logins to db (55000, as Postgres for ALLOW_CONNECTIONS false); its clients go on",
        run: disable,
    },
    Command { name: "ENABLE", arg: Arg::Required("db"), help: "undo DISABLE", run: enable },
    Command {
        name: "SHUTDOWN",
        arg: Arg::Optional("WAIT_FOR_SERVERS | WAIT_FOR_CLIENTS"),
        help: "drain as on SIGINT: open transactions finish, then everyone is closed (also WAIT_FOR_SERVERS); WAIT_FOR_CLIENTS: stop accepting, exit once every client has left",
        run: shutdown,
    },
    Command {
        name: "RELOAD",
        arg: Arg::None,
        help: "re-read the configuration file, as on SIGHUP; errors leave the current one in force",
        run: reload,
    },
];

fn usage(c: &Command) -> String {
    match c.arg {
        Arg::None => c.name.to_owned(),
        Arg::Optional(a) => format!("{} [{a}]", c.name),
        Arg::Required(a) | Arg::Rest(a) => format!("{} {a}", c.name),
    }
}

fn help() -> Reply {
    let mut lines = vec!["pgmux admin console; commands (case-insensitive, optional trailing ';'):".to_owned()];
    lines.extend(COMMANDS.iter().map(|c| format!("  {:<20} {}", usage(c), c.help)));
    Reply::Notices(vec![lines.join("\n")], "SHOW")
}

fn command_list() -> String {
    COMMANDS.iter().map(usage).collect::<Vec<_>>().join(", ")
}

/// An identifier argument: `app` or `"app"` (quoted keeps case; unquoted is
/// taken as written, as database names in proxy.toml are).
fn identifier(arg: &str) -> &str {
    arg.strip_prefix('"').and_then(|a| a.strip_suffix('"')).unwrap_or(arg)
}

fn pause(s: &Shared, db: Option<&str>) -> Reply {
    let db = db.map(identifier);
    if let Some(db) = db
        && s.config().database(db).is_none()
    {
        return Reply::Error(SqlState::INVALID_CATALOG_NAME, format!("database \"{db}\" does not exist"));
    }
    match s.pause.pause(db) {
        Ok(()) => Reply::AfterDrain(db.map(str::to_owned), "PAUSE"),
        Err(e) => Reply::Error(SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE, e),
    }
}

/// PgBouncer's SUSPEND: stop serving, for a handover. pgmux has no socket
/// handover, so it means: every database paused, new connections not
/// accepted (they wait in the listen queue), until RESUME.
fn suspend(s: &Shared, _: Option<&str>) -> Reply {
    if s.is_suspended() {
        return Reply::Error(SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE, "pgmux is already suspended".into());
    }
    if let Err(e) = s.pause.pause(None) {
        return Reply::Error(SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE, e);
    }
    s.set_suspended(true);
    Reply::AfterDrain(None, "SUSPEND")
}

fn resume(s: &Shared, db: Option<&str>) -> Reply {
    if db.is_none() {
        s.set_suspended(false);
    }
    match s.pause.resume(db.map(identifier)) {
        Ok(()) => Reply::Done("RESUME"),
        Err(e) => Reply::Error(SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE, e),
    }
}

fn reload(s: &Shared, _: Option<&str>) -> Reply {
    match s.reload() {
        Ok(r) => {
            let mut notices = r.needs_restart;
            if !r.changes.is_empty() {
                notices.push(format!("changed: {}", r.changes.join("; ")));
            }
            Reply::Notices(notices, "RELOAD")
        }
        Err(e @ ReloadError::NoConfigFile) => Reply::Error(SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE, e.to_string()),
        Err(e @ (ReloadError::Invalid(_) | ReloadError::Tls(_))) => {
            Reply::Error(SqlState::CONFIG_FILE_ERROR, e.to_string())
        }
    }
}

/// `db` as a configured database name, or the error reply.
fn known_database<'a>(s: &Shared, db: &'a str) -> Result<&'a str, Reply> {
    let db = identifier(db);
    match s.config().database(db) {
        Some(_) => Ok(db),
        None => Err(Reply::Error(SqlState::INVALID_CATALOG_NAME, format!("database \"{db}\" does not exist"))),
    }
}

fn reconnect(s: &Shared, db: Option<&str>) -> Reply {
    let db = match db.map(|d| known_database(s, d)).transpose() {
        Ok(db) => db,
        Err(reply) => return reply,
    };
    for pool in s.pools.of_database(db) {
        pool.reconnect();
    }
    Reply::Done("RECONNECT")
}

/// PgBouncer's `KILL db`: what frees a database for `DROP DATABASE` or a
/// restore without waiting for `server_idle_timeout`.
fn kill_database(s: &Shared, db: Option<&str>) -> Reply {
    let db = match known_database(s, db.unwrap_or_default()) {
        Ok(db) => db,
        Err(reply) => return reply,
    };
    // Paused first, so no client of db starts a transaction on a new
    // connection between the kills and the closes. Already paused is fine.
    let _ = s.pause.pause(Some(db));
    for client in s.clients.snapshot() {
        if client.login().is_some_and(|l| l.database() == db) {
            client.kill();
        }
    }
    // Killed clients' backends are cleaned up and come back to be closed.
    for pool in s.pools.of_database(Some(db)) {
        pool.reconnect();
    }
    Reply::Done("KILL")
}

fn set(s: &Shared, rest: Option<&str>) -> Reply {
    let rest = rest.unwrap_or_default();
    // `key = value` or `key TO value`, as Postgres's SET reads it.
    let split = rest.split_once('=').or_else(|| {
        let lower = rest.to_ascii_lowercase();
        lower.find(" to ").map(|i| (&rest[..i], &rest[i + 4..]))
    });
    let Some((key, value)) = split.map(|(k, v)| (k.trim(), v.trim())).filter(|(k, v)| !k.is_empty() && !v.is_empty())
    else {
        return Reply::Error(SqlState::SYNTAX_ERROR, "usage: SET key = value".into());
    };
    match s.set(key, value) {
        Ok(changes) if changes.is_empty() => Reply::Notices(vec!["nothing changed".into()], "SET"),
        Ok(changes) => Reply::Notices(vec![format!("changed: {}", changes.join("; "))], "SET"),
        Err(e) => Reply::Error(SqlState::INVALID_PARAMETER_VALUE, e),
    }
}

fn shutdown(s: &Shared, mode: Option<&str>) -> Reply {
    match mode.map(str::to_ascii_uppercase).as_deref() {
        // pgmux's plain SHUTDOWN already waits for transactions to finish,
        // which is what WAIT_FOR_SERVERS asks of PgBouncer.
        None | Some("WAIT_FOR_SERVERS") => s.request_shutdown(),
        Some("WAIT_FOR_CLIENTS") => s.request_shutdown_waiting_for_clients(),
        Some(other) => {
            return Reply::Error(
                SqlState::SYNTAX_ERROR,
                format!("SHUTDOWN takes WAIT_FOR_SERVERS or WAIT_FOR_CLIENTS, not \"{other}\""),
            );
        }
    }
    Reply::Done("SHUTDOWN")
}

fn disable(s: &Shared, db: Option<&str>) -> Reply {
    let db = match known_database(s, db.unwrap_or_default()) {
        Ok(db) => db,
        Err(reply) => return reply,
    };
    match s.disabled.disable(db) {
        Ok(()) => Reply::Done("DISABLE"),
        Err(e) => Reply::Error(SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE, e),
    }
}

fn enable(s: &Shared, db: Option<&str>) -> Reply {
    match s.disabled.enable(identifier(db.unwrap_or_default())) {
        Ok(()) => Reply::Done("ENABLE"),
        Err(e) => Reply::Error(SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE, e),
    }
}

fn kill_client(s: &Shared, id: Option<&str>) -> Reply {
    let id = id.unwrap_or_default();
    let Ok(n) = id.parse::<u64>() else {
        return Reply::Error(SqlState::INVALID_PARAMETER_VALUE, format!("KILL_CLIENT takes a client id, not \"{id}\""));
    };
    match s.clients.get(n) {
        Some(c) => {
            c.kill();
            Reply::Done("KILL_CLIENT")
        }
        None => Reply::Error(SqlState::UNDEFINED_OBJECT, format!("no client with id {n}")),
    }
}

/// Parses a query string into a command and its argument, or the error reply.
pub(super) fn parse(query: &str) -> Result<Option<(&'static Command, Option<&str>)>, Reply> {
    let query = query.trim().trim_end_matches(|c: char| c == ';' || c.is_whitespace());
    let words: Vec<&str> = query.split_whitespace().collect();
    if words.is_empty() {
        return Ok(None);
    }
    for c in COMMANDS {
        let n = c.name.split(' ').count();
        if words.len() < n || !c.name.split(' ').zip(&words).all(|(a, b)| a.eq_ignore_ascii_case(b)) {
            continue;
        }
        let args = &words[n..];
        let ok = match c.arg {
            Arg::None => args.is_empty(),
            Arg::Optional(_) => args.len() <= 1,
            Arg::Required(_) => args.len() == 1,
            Arg::Rest(_) => !args.is_empty(),
        };
        if !ok {
            return Err(Reply::Error(SqlState::SYNTAX_ERROR, format!("usage: {}", usage(c))));
        }
        if let (Arg::Rest(_), Some(first)) = (c.arg, args.first()) {
            // The words are slices of `query`: the rest starts at the first one.
            let at = first.as_ptr() as usize - query.as_ptr() as usize;
            return Ok(Some((c, Some(&query[at..]))));
        }
        return Ok(Some((c, args.first().copied())));
    }
    Err(Reply::Error(
        SqlState::SYNTAX_ERROR,
        format!("unknown command \"{}\"; commands: {}", words.join(" "), command_list()),
    ))
}

fn write_reply(out: &mut BytesMut, reply: Reply) {
    match reply {
        Reply::Rows(rs) => {
            let columns: Vec<(&str, u32, i16)> = rs.columns.iter().map(|c| (c.name, c.ty.oid(), c.ty.size())).collect();
            msg::row_description_typed(out, &columns);
            for row in &rs.rows {
                msg::data_row(out, row);
            }
            // PgBouncer's tag; psql counts the rows itself.
            msg::command_complete(out, "SHOW");
        }
        Reply::Done(t) => msg::command_complete(out, t),
        Reply::Notices(lines, t) => {
            for l in lines {
                msg::notice_response(out, SqlState("00000"), &l);
            }
            msg::command_complete(out, t);
        }
        Reply::Error(code, text) => msg::error_response(out, Severity::Error, code, &text),
        Reply::AfterDrain(..) | Reply::AfterClose(_) => unreachable!("the loop waits and answers itself"),
    }
}

/// Serves an authenticated admin user until it disconnects, is killed, or pgmux shuts down.
pub async fn serve(stream: &mut Stream, mut buf: BytesMut, shared: &Shared, info: &ClientInfo) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    msg::authentication_ok(&mut out);
    msg::parameter_status(&mut out, "server_version", "15.0 (pgmux)");
    msg::parameter_status(&mut out, "client_encoding", "UTF8");
    msg::parameter_status(&mut out, "server_encoding", "UTF8");
    msg::parameter_status(&mut out, "standard_conforming_strings", "on");
    msg::parameter_status(&mut out, "DateStyle", "ISO, MDY");
    msg::ready_for_query(&mut out, msg::IDLE);
    stream.write_all(&out).await?;
    loop {
        let frame = match split_frame(&mut buf, MAX_COMMAND_LEN) {
            Ok(f) => f,
            Err(e) => return fatal(stream, SqlState::PROTOCOL_VIOLATION, &e.to_string()).await,
        };
        let Some((t, body)) = frame else {
            // read_buf is cancel-safe: a losing branch has read nothing.
            tokio::select! {
                n = stream.read_buf(&mut buf) => if n? == 0 { return Ok(()) },
                flags = info.signal().wait(Signal::ANY) => {
                    return fatal(stream, SqlState::ADMIN_SHUTDOWN, Signal::reason(flags)).await;
                }
            }
            continue;
        };
        out.clear();
        match t {
            tag::TERMINATE => return Ok(()),
            tag::QUERY => {
                let text = body.strip_suffix(&[0]).unwrap_or(&body);
                let query = String::from_utf8_lossy(text);
                match parse(&query) {
                    Ok(None) => msg::empty_query_response(&mut out),
                    Ok(Some((cmd, arg))) => {
                        tracing::info!(command = cmd.name, arg = arg.unwrap_or(""), "admin command");
                        // The commands that wait answer when their condition holds;
                        // `None`: pgmux is shutting down meanwhile.
                        let reply = match (cmd.run)(shared, arg) {
                            Reply::AfterClose(db) => wait_close(shared, db.as_deref(), info.signal()).await,
                            Reply::AfterDrain(db, done) => drain(shared, db.as_deref(), done, info.signal()).await,
                            reply => Some(reply),
                        };
                        match reply {
                            Some(reply) => write_reply(&mut out, reply),
                            None => {
                                return fatal(stream, SqlState::ADMIN_SHUTDOWN, crate::live::registry::SHUTTING_DOWN)
                                    .await;
                            }
                        }
                    }
                    Err(reply) => write_reply(&mut out, reply),
                }
                msg::ready_for_query(&mut out, msg::IDLE);
            }
            _ => {
                return fatal(
                    stream,
                    SqlState::PROTOCOL_VIOLATION,
                    "the admin console accepts the simple query protocol only",
                )
                .await;
            }
        }
        stream.write_all(&out).await?;
    }
}

/// PAUSE's wait: until no client of `db` holds or is taking a backend.
/// `None` if pgmux starts shutting down meanwhile.
async fn wait_close(shared: &Shared, db: Option<&str>, signal: &Signal) -> Option<Reply> {
    loop {
        if shared.pools.of_database(db).iter().all(|p| p.stale_backends() == 0) {
            return Some(Reply::Done("WAIT_CLOSE"));
        }
        tokio::select! {
            _ = tokio::time::sleep(PAUSE_POLL) => {}
            _ = signal.wait(Signal::DRAIN | Signal::FORCE_CLOSE) => return None,
        }
    }
}

async fn drain(shared: &Shared, db: Option<&str>, done: &'static str, signal: &Signal) -> Option<Reply> {
    loop {
        if shared.clients.in_flight(db) == 0 {
            return Some(Reply::Done(done));
        }
        let still_paused = match db {
            Some(db) => shared.pause.is_paused(db),
            None => shared.pause.all_paused(),
        };
        if !still_paused {
            return Some(Reply::Error(SqlState::QUERY_CANCELED, "RESUME was issued before PAUSE completed".into()));
        }
        tokio::select! {
            _ = tokio::time::sleep(PAUSE_POLL) => {}
            _ = signal.wait(Signal::DRAIN | Signal::FORCE_CLOSE) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(q: &str) -> Option<(&'static str, Option<&str>)> {
        parse(q).ok().flatten().map(|(c, a)| (c.name, a))
    }

    fn code(q: &str) -> &'static str {
        match parse(q) {
            Err(Reply::Error(c, _)) => c.code(),
            Err(other) => panic!("{q}: expected an error, got {other:?}"),
            Ok(other) => panic!("{q}: expected an error, got {:?}", other.map(|(c, a)| (c.name, a))),
        }
    }

    #[test]
    fn commands_parse_case_insensitively_with_optional_semicolon() {
        assert_eq!(name("show pools"), Some(("SHOW POOLS", None)));
        assert_eq!(name("  SHOW   Clients ;; "), Some(("SHOW CLIENTS", None)));
        assert_eq!(name("pause app;"), Some(("PAUSE", Some("app"))));
        assert_eq!(name("PAUSE"), Some(("PAUSE", None)));
        assert_eq!(name("kill_client 7"), Some(("KILL_CLIENT", Some("7"))));
        assert!(matches!(parse(" ; "), Ok(None)));
    }

    #[test]
    fn unknown_or_malformed_commands_are_syntax_errors() {
        assert_eq!(code("SHOW NOTHING"), "42601");
        assert_eq!(code("SELECT 1"), "42601");
        assert_eq!(code("KILL_CLIENT"), "42601");
        assert_eq!(code("SHOW POOLS extra"), "42601");
        let Err(Reply::Error(_, text)) = parse("frobnicate") else { panic!() };
        assert!(text.contains("SHOW POOLS") && text.contains("KILL_CLIENT id"), "{text}");
    }
}
