//! Statement classification for read/write routing.
//!
//! [`classify`] looks at the text of a Query or Parse message and says whether
//! a replica may run it. It is deliberately conservative: a statement is a
//! [`Class::Read`] only when its shape proves it; anything unknown, cut off or
//! ambiguous is a [`Class::Write`]. It is pure, never allocates and works on
//! bytes, so non-UTF-8 client encodings are fine.
//!
//! Decisions worth knowing (the corpus in `corpus.rs` pins them down):
//! - Reads: `SELECT`, `WITH`, `VALUES`, `TABLE`, parenthesised queries, `SHOW`,
//!   `COPY table|(read query) TO STDOUT`, and `EXPLAIN` of a plannable statement
//!   unless ANALYZE runs a non-read. A query stops being a read on a locking
//!   clause at any depth, `INTO` anywhere (`SELECT ... INTO`), the words
//!   `INSERT`/`UPDATE`/`DELETE`/`MERGE` anywhere (data-modifying CTEs, and also
//!   an unquoted column named `update`: rare, and writes are the safe side),
//!   or a call of a function in [`WriteFunctions`]. User functions are reads.
//! - [`Class::Session`]: statements whose effect lives in the server session
//!   (`SET`, `RESET`, `DISCARD`, `PREPARE`, `EXECUTE`, `DEALLOCATE`, `LISTEN`,
//!   `UNLISTEN`, `LOAD`, cursors, temporary tables). They must run on the
//!   primary and the router should pin the client to that server connection.
//! - Transaction control has its own classes. `PREPARE TRANSACTION` is a write
//!   that ends the transaction; `COMMIT/ROLLBACK PREPARED` are plain writes.
//! - Only the text is seen: the router should still trust the server's
//!   ReadyForQuery status over `starts_transaction`/`ends_transaction`.

mod walk;

use super::lex::{Lexer, Tok, block_comment_end, line_comment_end, skip_space};
use walk::Cx;

/// A routing hint from the first comment: `/* pgmux:primary */` or `/* pgmux:replica */`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hint {
    Primary,
    Replica,
}

/// What one statement (or, in [`Classified::class`], the whole string) is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Only whitespace, comments and semicolons.
    Empty,
    /// Safe on a streaming replica.
    Read,
    /// Must run on the primary.
    Write,
    /// Must run on the primary and pins the client to its server connection.
    Session,
    /// `BEGIN` / `START TRANSACTION`; `read_only` when the modes say READ ONLY
    /// (and not also READ WRITE).
    Begin { read_only: bool },
    /// `SET TRANSACTION ... READ ONLY` or `SET transaction_read_only = on`.
    SetTransactionReadOnly,
    /// `COMMIT` / `END`; `chain` for `AND CHAIN`, which opens a new transaction.
    Commit { chain: bool },
    /// `ROLLBACK` / `ABORT` (not `ROLLBACK TO`).
    Rollback { chain: bool },
    /// `SAVEPOINT`, `RELEASE`, `ROLLBACK TO`: inside a transaction, ends nothing.
    Savepoint,
}

impl Class {
    pub fn is_read(self) -> bool {
        self == Class::Read
    }
}

/// The classification of a whole Query or Parse string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Classified {
    /// With one statement, its class. With several: `Read` when every one is a
    /// read, otherwise `Session` when any is, otherwise `Write` (transaction
    /// control mixed with reads included).
    pub class: Class,
    pub hint: Option<Hint>,
    /// Non-empty statements, saturating.
    pub statements: u16,
    /// Some statement opens a transaction block (`BEGIN`, `START TRANSACTION`, `... AND CHAIN`).
    pub starts_transaction: bool,
    /// Some statement ends one (`COMMIT`, `END`, `ROLLBACK`, `ABORT`, `PREPARE TRANSACTION`).
    pub ends_transaction: bool,
    /// After the last transaction-control statement: `Some(true)` a block is
    /// open, `Some(false)` none is; `None` when there is no such statement.
    pub transaction_open_after: Option<bool>,
    /// The text could not be lexed with certainty (unterminated literal or
    /// comment, or a string whose end depends on `standard_conforming_strings`);
    /// `class` is then never `Read`.
    pub ambiguous: bool,
}

/// Functions whose call makes a query a write. Built once from the config:
/// the built-in list plus `[routing] write_functions`.
///
/// Names match on the unqualified part, ASCII case-insensitively, quoted or
/// not: `pg_catalog.nextval`, `"NEXTVAL"` and `x.nextval` all match `nextval`
/// (over-matching only sends a read to the primary). A configured name ending
/// in `*` is a prefix; a schema in a configured name is ignored.
#[derive(Clone, Debug)]
pub struct WriteFunctions {
    /// Sorted, lowercase.
    exact: Vec<Box<[u8]>>,
    prefixes: Vec<Box<[u8]>>,
    /// Bitmap of the first bytes of all names and prefixes: most calls
    /// (`count`, `coalesce`, ...) are rejected with one lookup.
    first: [u64; 4],
}

/// Built-ins that write, hold session or transaction state, or answer
/// differently on a standby (`pg_is_in_recovery`, `pg_current_wal_lsn`, which
/// even fails there).
const BUILTIN_EXACT: &[&str] = &[
    "currval", // session state: only defined after nextval in the same session
    "lastval",
    "lowrite",
    "nextval",
    "pg_cancel_backend",
    "pg_export_snapshot",
    "pg_file_rename",
    "pg_file_sync",
    "pg_file_unlink",
    "pg_file_write",
    "pg_import_system_collations",
    "pg_is_in_recovery",
    "pg_log_backend_memory_contexts",
    "pg_notify",
    "pg_prepared_xact", // what pg_prepared_xacts reads: empty on a standby
    "pg_promote",
    "pg_reload_conf",
    "pg_rotate_logfile",
    "pg_start_backup",
    "pg_stat_statements_reset",
    "pg_stop_backup",
    "pg_switch_wal",
    "pg_switch_xlog",
    "pg_terminate_backend",
    "set_config",
    "setseed",
    "setval",
    "txid_current",
    "txid_current_if_assigned",
];

const BUILTIN_PREFIXES: &[&str] = &[
    "dblink", // dblink_exec, and dblink() can run anything remotely
    "lo_",    // large objects: lo_create, lo_import, lo_unlink, lo_put, lo_from_bytea, ...
    "pg_advisory_",
    "pg_backup_",
    "pg_copy_",
    "pg_create_",
    "pg_current_wal", // _lsn, _insert_lsn, _flush_lsn: fail on a standby
    "pg_current_xact_id",
    "pg_current_xlog",
    "pg_drop_",
    "pg_logical_",
    "pg_replication_origin_",
    "pg_replication_slot_",
    "pg_stat_reset",
    "pg_try_advisory_",
    "pg_wal_replay_",
    "pg_xlog_replay_",
];

/// Settings whose value is the node's, not the session's: a standby reports
/// them `on` whatever the client set. A read of one goes to the primary, so
/// the client sees what a direct connection to the primary shows (psycopg's
/// suite checks `transaction_read_only` after `SET SESSION CHARACTERISTICS`).
fn node_setting(name: &[u8]) -> bool {
    [&b"transaction_read_only"[..], b"in_hot_standby"].iter().any(|n| name.eq_ignore_ascii_case(n))
}

/// Catalog views whose rows are the node's: a hot standby lists no prepared
/// transactions, so a transaction manager recovering 2PC from a replica
/// would leave the primary's prepared ones (and their locks) for ever.
fn node_relation(name: &[u8]) -> bool {
    name.eq_ignore_ascii_case(b"pg_prepared_xacts")
}

/// PostgreSQL truncates identifiers to NAMEDATALEN - 1 bytes.
const MAX_IDENT: usize = 63;

impl Default for WriteFunctions {
    fn default() -> Self {
        Self::new(std::iter::empty::<&str>())
    }
}

impl WriteFunctions {
    /// The built-in list plus `extra` (e.g. `[routing] write_functions`).
    pub fn new<I, S>(extra: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut exact: Vec<Box<[u8]>> = BUILTIN_EXACT.iter().map(|n| n.as_bytes().into()).collect();
        let mut prefixes: Vec<Box<[u8]>> = BUILTIN_PREFIXES.iter().map(|n| n.as_bytes().into()).collect();
        for name in extra {
            let name = name.as_ref().trim();
            let (name, prefix) = match name.strip_suffix('*') {
                Some(p) => (p, true),
                None => (name, false),
            };
            let name = name.rsplit('.').next().unwrap_or(name).trim_matches('"');
            if name.is_empty() {
                continue;
            }
            let mut name = name.to_ascii_lowercase().into_bytes();
            name.truncate(clip_len(&name));
            if prefix { prefixes.push(name.into()) } else { exact.push(name.into()) }
        }
        exact.sort();
        exact.dedup();
        let mut first = [0u64; 4];
        for n in exact.iter().chain(&prefixes) {
            let b = n[0];
            first[usize::from(b >> 6)] |= 1 << (b & 63);
        }
        WriteFunctions { exact, prefixes, first }
    }

    /// Whether a call of `name` (unquoted spelling, unqualified) is a write.
    pub fn contains(&self, name: &str) -> bool {
        self.matches(name.as_bytes(), false)
    }

    /// `raw` is a name as written; `quoted` when it came from `"..."`.
    fn matches(&self, raw: &[u8], quoted: bool) -> bool {
        let mut buf = [0u8; MAX_IDENT + 1];
        let mut n = 0;
        let mut i = 0;
        while i < raw.len() && n < buf.len() {
            buf[n] = raw[i].to_ascii_lowercase();
            // `""` inside a quoted identifier is one `"`.
            i += if quoted && raw[i] == b'"' { 2 } else { 1 };
            n += 1;
        }
        let n = clip_len(&buf[..n]);
        let name = &buf[..n];
        let Some(&b) = name.first() else { return false };
        if self.first[usize::from(b >> 6)] & (1 << (b & 63)) == 0 {
            return false;
        }
        self.exact.binary_search_by(|e| e.as_ref().cmp(name)).is_ok()
            || self.prefixes.iter().any(|p| name.starts_with(p))
    }
}

/// Length of `name` after PostgreSQL's truncation to 63 bytes, which never
/// splits a UTF-8 character.
fn clip_len(name: &[u8]) -> usize {
    if name.len() <= MAX_IDENT {
        return name.len();
    }
    let mut n = MAX_IDENT;
    while n > 0 && name[n] & 0xC0 == 0x80 {
        n -= 1;
    }
    n
}

/// Classifies a whole Query or Parse string. See the module docs.
pub fn classify(sql: &[u8], write_functions: &WriteFunctions) -> Classified {
    let mut out = Classified {
        class: Class::Empty,
        hint: hint(sql),
        statements: 0,
        starts_transaction: false,
        ends_transaction: false,
        transaction_open_after: None,
        ambiguous: false,
    };
    let mut cx = Cx { lx: Lexer::new(sql), peeked: None, wf: write_functions, nesting: 0, broken_parens: false };
    let (mut all_read, mut session) = (true, false);
    while let Some(st) = cx.statement(false) {
        if st.class == Class::Empty {
            continue;
        }
        out.statements = out.statements.saturating_add(1);
        if out.statements == 1 {
            out.class = st.class;
        }
        all_read &= st.class == Class::Read;
        session |= st.class == Class::Session;
        let ends = st.ends_transaction || matches!(st.class, Class::Commit { .. } | Class::Rollback { .. });
        let starts =
            matches!(st.class, Class::Begin { .. } | Class::Commit { chain: true } | Class::Rollback { chain: true });
        if ends {
            out.ends_transaction = true;
            out.transaction_open_after = Some(false);
        }
        if starts {
            out.starts_transaction = true;
            out.transaction_open_after = Some(true);
        }
    }
    if out.statements > 1 {
        out.class = if all_read {
            Class::Read
        } else if session {
            Class::Session
        } else {
            Class::Write
        };
    }
    if cx.broken_parens && out.class == Class::Read {
        out.class = Class::Write;
    }
    if cx.lx.ambiguous {
        out.ambiguous = true;
        if out.class != Class::Session {
            out.class = Class::Write;
        }
    }
    out
}

/// The text of the comment `sql` starts with (after white space), without
/// its `/* */` or `--`: where pgmux looks for directives.
fn first_comment(sql: &[u8]) -> Option<&[u8]> {
    let i = skip_space(sql, 0);
    let rest = &sql[i..];
    if rest.starts_with(b"/*") {
        let end = block_comment_end(sql, i)?;
        Some(&sql[i + 2..end - 2])
    } else if rest.starts_with(b"--") {
        Some(&sql[i + 2..line_comment_end(sql, i)])
    } else {
        None
    }
}

/// What follows `pgmux:` in the comment `sql` starts with (white space
/// around both trimmed): a directive to pgmux, such as a routing hint.
pub fn directive(sql: &[u8]) -> Option<&[u8]> {
    let body = first_comment(sql)?.trim_ascii();
    let (word, rest) = body.split_at_checked(5)?;
    if !word.eq_ignore_ascii_case(b"pgmux") {
        return None;
    }
    Some(rest.trim_ascii_start().strip_prefix(b":")?.trim_ascii_start())
}

/// The hint in the first comment, if it comes before the first token and
/// says exactly `pgmux:primary` or `pgmux:replica` (ASCII case and
/// whitespace around the words ignored). `-- pgmux:replica` works too.
fn hint(sql: &[u8]) -> Option<Hint> {
    let rest = directive(sql)?;
    if rest.eq_ignore_ascii_case(b"primary") {
        Some(Hint::Primary)
    } else if rest.eq_ignore_ascii_case(b"replica") {
        Some(Hint::Replica)
    } else {
        None
    }
}

/// Keywords are compared as ASCII-lowercased bytes packed into a `u128`, so a
/// keyword test is one integer comparison and `match` can use constants.
const fn key(w: &[u8]) -> u128 {
    let mut v = 0u128;
    let mut i = 0;
    while i < w.len() {
        v |= (w[i].to_ascii_lowercase() as u128) << (8 * i);
        i += 1;
    }
    v
}

/// The longest keyword we look for ("serializable").
const MAX_KEYWORD: usize = 12;

/// `key(w)` at run time, `0` (no keyword) for longer words. Built from two
/// `u64` halves: per-byte `u128` shifts, or bytes stored to a buffer and
/// reloaded wide (a store-forwarding stall), were the query scan's hot spot.
fn pack(w: &[u8]) -> u128 {
    if w.len() > MAX_KEYWORD {
        return 0;
    }
    let (a, b) = w.split_at(w.len().min(8));
    let half = |bytes: &[u8]| {
        bytes.iter().enumerate().fold(0u64, |v, (i, c)| v | u64::from(c.to_ascii_lowercase()) << (8 * i))
    };
    u128::from(half(a)) | u128::from(half(b)) << 64
}

macro_rules! keywords {
    ($($name:ident)*) => {
        #[allow(dead_code)]
        mod kw {
            use super::key;
            $(pub const $name: u128 = key(stringify!($name).as_bytes());)*
            const _: () = { $(assert!(stringify!($name).len() <= super::MAX_KEYWORD);)* };
        }
    };
}

keywords! {
    ABORT AND ANALYSE ANALYZE ATOMIC BEGIN BINARY CASE CHAIN CLOSE COMMIT COMMITTED COPY CREATE
    DEALLOCATE DECLARE DEFERRABLE DELETE DISCARD END EXECUTE EXPLAIN FALSE FETCH FOR FROM GLOBAL
    INSERT INTO ISOLATION KEY LEVEL LISTEN LOAD LOCAL MERGE MOVE NO NOT OFF ON ONLY OR PREPARE
    PREPARED READ RELEASE REPEATABLE REPLACE RESET ROLLBACK SAVEPOINT SELECT SERIALIZABLE SESSION
    SET SHARE SHOW SNAPSHOT START STDOUT TABLE TEMP TEMPORARY TO TRANSACTION TRUE UNCOMMITTED
    UNLISTEN UPDATE VALUES VERBOSE WITH WORK WRITE YES
}
