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

use super::lex::{Lexer, Tok, block_comment_end, line_comment_end, skip_space};

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

/// The hint in the first comment, if it comes before the first token and
/// says exactly `pgmux:primary` or `pgmux:replica` (ASCII case and
/// whitespace around the words ignored). `-- pgmux:replica` works too.
fn hint(sql: &[u8]) -> Option<Hint> {
    let i = skip_space(sql, 0);
    let rest = &sql[i..];
    let body = if rest.starts_with(b"/*") {
        let end = block_comment_end(sql, i)?;
        &sql[i + 2..end - 2]
    } else if rest.starts_with(b"--") {
        &sql[i + 2..line_comment_end(sql, i)]
    } else {
        return None;
    };
    let body = body.trim_ascii();
    let (word, rest) = body.split_at_checked(5)?;
    if !word.eq_ignore_ascii_case(b"pgmux") {
        return None;
    }
    let rest = rest.trim_ascii_start().strip_prefix(b":")?.trim_ascii_start();
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

struct Stmt {
    class: Class,
    /// `PREPARE TRANSACTION`: a write that also ends the transaction block.
    ends_transaction: bool,
}

impl From<Class> for Stmt {
    fn from(class: Class) -> Self {
        Stmt { class, ends_transaction: false }
    }
}

/// What came just before the current token, for function calls and locking clauses.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Prev<'a> {
    Other,
    Dot,
    For,
    Name { raw: &'a [u8], quoted: bool, unicode: bool },
}

/// Raise `class` to `to` where Session > Write > Read.
fn raise(class: &mut Class, to: Class) {
    if *class == Class::Read || to == Class::Session {
        *class = to;
    }
}

/// How deep statements may nest in statements (`COPY (COPY (...`,
/// `EXPLAIN ANALYZE EXPLAIN ANALYZE ...`). Each level recurses, so without a
/// bound a crafted query overflows the stack and aborts the process.
/// PostgreSQL accepts two levels at most; anything deeper is a write.
const MAX_NESTING: u32 = 16;

struct Cx<'a, 'w> {
    lx: Lexer<'a>,
    peeked: Option<Tok<'a>>,
    wf: &'w WriteFunctions,
    /// Statements entered through [`Cx::inner_statement`] and not yet left.
    nesting: u32,
    /// A `;` inside parentheses was skipped (only CREATE RULE actions and
    /// BEGIN ATOMIC bodies hold one in SQL PostgreSQL accepts), or the text
    /// ended with parentheses open: never a read.
    broken_parens: bool,
}

impl<'a> Cx<'a, '_> {
    fn next(&mut self) -> Tok<'a> {
        self.peeked.take().unwrap_or_else(|| self.lx.next_tok())
    }

    fn peek(&mut self) -> Tok<'a> {
        match self.peeked {
            Some(t) => t,
            None => {
                let t = self.lx.next_tok();
                self.peeked = Some(t);
                t
            }
        }
    }

    fn peek_kw(&mut self) -> u128 {
        match self.peek() {
            Tok::Word(w) => pack(w),
            _ => 0,
        }
    }

    fn eat_kw(&mut self, k: u128) -> bool {
        let hit = self.peek_kw() == k;
        if hit {
            self.next();
        }
        hit
    }

    /// The next token ends the statement: `;`, end of input, or in a nested
    /// statement (`COPY (...)`) the closing parenthesis.
    fn at_end(&mut self, nested: bool) -> bool {
        match self.peek() {
            Tok::Eof | Tok::Semi => true,
            Tok::RParen => nested,
            _ => false,
        }
    }

    /// `class` if nothing but the terminator follows, else `Write` (PostgreSQL
    /// would reject the statement; we don't guess what it meant).
    fn exact(&mut self, nested: bool, class: Class) -> Class {
        let clean = self.at_end(nested);
        self.skip_rest(nested, false);
        if clean { class } else { Class::Write }
    }

    /// Consumes the rest of the statement including its terminator. `;` ends it
    /// only outside parentheses (CREATE RULE actions hold `;`) and, in CREATE,
    /// outside `BEGIN ATOMIC ... END` bodies, as psql splits statements. In a
    /// nested statement (`COPY (...)`) a `;` is inside COPY's parentheses.
    fn skip_rest(&mut self, nested: bool, create: bool) {
        let (mut depth, mut atomic) = (0u32, 0u32);
        let mut after_begin = false;
        loop {
            let t = self.next();
            let mut begin = false;
            match t {
                // Parentheses left open: PostgreSQL rejects the string; not a read.
                Tok::Eof => {
                    self.broken_parens |= depth > 0;
                    return;
                }
                Tok::Semi if depth == 0 && atomic == 0 && !nested => return,
                Tok::Semi => self.broken_parens = true,
                Tok::LParen => depth += 1,
                Tok::RParen if depth == 0 && nested => return,
                // A stray `)` at the top level: PostgreSQL rejects the string.
                Tok::RParen => depth = depth.saturating_sub(1),
                Tok::Word(w) if create => match pack(w) {
                    kw::BEGIN => begin = true,
                    kw::ATOMIC if after_begin => atomic += 1,
                    kw::CASE if atomic > 0 => atomic += 1,
                    kw::END if atomic > 0 => atomic -= 1,
                    _ => {}
                },
                _ => {}
            }
            after_begin = begin;
        }
    }

    /// One statement, consumed with its terminator; `None` at end of input.
    fn statement(&mut self, nested: bool) -> Option<Stmt> {
        let first = self.next();
        let k = match first {
            Tok::Eof => return None,
            Tok::Semi => return Some(Class::Empty.into()),
            Tok::LParen => return Some(self.query(first, nested).into()),
            Tok::Word(w) => pack(w),
            _ => 0,
        };
        let class = match k {
            kw::SELECT | kw::WITH | kw::VALUES | kw::TABLE => self.query(first, nested),
            kw::SHOW => {
                let node = matches!(self.peek(), Tok::Word(w) if node_setting(w));
                self.skip_rest(nested, false);
                if node { Class::Write } else { Class::Read }
            }
            kw::EXPLAIN => self.explain(nested),
            kw::COPY => self.copy(nested),
            kw::BEGIN => {
                let _ = self.eat_kw(kw::WORK) || self.eat_kw(kw::TRANSACTION);
                self.begin(nested)
            }
            kw::START if self.eat_kw(kw::TRANSACTION) => self.begin(nested),
            kw::COMMIT | kw::END if self.peek_kw() != kw::PREPARED => {
                let _ = self.eat_kw(kw::WORK) || self.eat_kw(kw::TRANSACTION);
                match self.chain() {
                    Some(chain) => self.exact(nested, Class::Commit { chain }),
                    None => self.exact(nested, Class::Write),
                }
            }
            kw::ROLLBACK | kw::ABORT if self.peek_kw() != kw::PREPARED => {
                let _ = self.eat_kw(kw::WORK) || self.eat_kw(kw::TRANSACTION);
                if self.eat_kw(kw::TO) {
                    self.skip_rest(nested, false);
                    Class::Savepoint
                } else {
                    match self.chain() {
                        Some(chain) => self.exact(nested, Class::Rollback { chain }),
                        None => self.exact(nested, Class::Write),
                    }
                }
            }
            kw::SAVEPOINT | kw::RELEASE => {
                self.skip_rest(nested, false);
                Class::Savepoint
            }
            kw::PREPARE if self.eat_kw(kw::TRANSACTION) => {
                self.skip_rest(nested, false);
                return Some(Stmt { class: Class::Write, ends_transaction: true });
            }
            kw::SET => self.set(nested),
            kw::PREPARE
            | kw::EXECUTE
            | kw::DEALLOCATE
            | kw::RESET
            | kw::DISCARD
            | kw::LISTEN
            | kw::UNLISTEN
            | kw::LOAD
            | kw::DECLARE
            | kw::FETCH
            | kw::MOVE
            | kw::CLOSE => {
                self.skip_rest(nested, false);
                Class::Session
            }
            kw::CREATE => self.create(nested),
            _ => {
                self.skip_rest(nested, false);
                Class::Write
            }
        };
        Some(class.into())
    }

    /// [`Cx::statement`] for a statement inside another (`COPY (...)`,
    /// `EXPLAIN ANALYZE ...`): past [`MAX_NESTING`] levels the rest of it is
    /// skipped as a write instead of recursing further.
    fn inner_statement(&mut self, nested: bool) -> Option<Stmt> {
        if self.nesting >= MAX_NESTING {
            self.skip_rest(nested, false);
            return Some(Class::Write.into());
        }
        self.nesting += 1;
        let st = self.statement(nested);
        self.nesting -= 1;
        st
    }

    /// `[AND [NO] CHAIN]` → `Some(chain)`, `None` if malformed.
    fn chain(&mut self) -> Option<bool> {
        if !self.eat_kw(kw::AND) {
            return Some(false);
        }
        let no = self.eat_kw(kw::NO);
        self.eat_kw(kw::CHAIN).then_some(!no)
    }

    fn begin(&mut self, nested: bool) -> Class {
        let modes = self.transaction_modes(nested);
        self.skip_rest(nested, false);
        match modes {
            Some(read_only) => Class::Begin { read_only },
            None => Class::Write,
        }
    }

    /// `transaction_mode [[,] ...]` up to the end of the statement →
    /// `Some(read_only)`; `None` on anything else. READ ONLY counts only
    /// without a READ WRITE (the last would win; we take the safe one).
    fn transaction_modes(&mut self, nested: bool) -> Option<bool> {
        let (mut ro, mut rw) = (false, false);
        while !self.at_end(nested) {
            match self.next() {
                Tok::Comma => {}
                Tok::Word(w) => match pack(w) {
                    kw::ISOLATION => {
                        if !self.eat_kw(kw::LEVEL) {
                            return None;
                        }
                        match pack(self.word()?) {
                            kw::SERIALIZABLE => {}
                            kw::REPEATABLE if self.eat_kw(kw::READ) => {}
                            kw::READ if self.eat_kw(kw::COMMITTED) || self.eat_kw(kw::UNCOMMITTED) => {}
                            _ => return None,
                        }
                    }
                    kw::READ => match pack(self.word()?) {
                        kw::ONLY => ro = true,
                        kw::WRITE => rw = true,
                        _ => return None,
                    },
                    kw::NOT if self.eat_kw(kw::DEFERRABLE) => {}
                    kw::DEFERRABLE => {}
                    _ => return None,
                },
                _ => return None,
            }
        }
        Some(ro && !rw)
    }

    fn word(&mut self) -> Option<&'a [u8]> {
        match self.next() {
            Tok::Word(w) => Some(w),
            _ => None,
        }
    }

    fn set(&mut self, nested: bool) -> Class {
        let _ = self.eat_kw(kw::LOCAL) || self.eat_kw(kw::SESSION);
        match self.peek() {
            Tok::Word(w) if pack(w) == kw::TRANSACTION => {
                self.next();
                let read_only = self.peek_kw() != kw::SNAPSHOT && self.transaction_modes(nested) == Some(true);
                self.skip_rest(nested, false);
                if read_only { Class::SetTransactionReadOnly } else { Class::Session }
            }
            Tok::Word(w) if w.eq_ignore_ascii_case(b"transaction_read_only") => {
                self.next();
                let assigned = match self.next() {
                    Tok::Op(b'=') => true,
                    Tok::Word(w) => pack(w) == kw::TO,
                    _ => false,
                };
                let truthy = assigned
                    && match self.next() {
                        Tok::Word(v) | Tok::Str(v) | Tok::Num(v) => {
                            [&b"on"[..], b"true", b"yes", b"1"].iter().any(|t| v.eq_ignore_ascii_case(t))
                        }
                        _ => false,
                    };
                match self.exact(nested, Class::SetTransactionReadOnly) {
                    Class::SetTransactionReadOnly if truthy => Class::SetTransactionReadOnly,
                    _ => Class::Session,
                }
            }
            _ => {
                self.skip_rest(nested, false);
                Class::Session
            }
        }
    }

    /// Temporary objects are session state; every other CREATE is a write.
    fn create(&mut self, nested: bool) -> Class {
        if self.eat_kw(kw::OR) {
            self.eat_kw(kw::REPLACE);
        }
        let _ = self.eat_kw(kw::GLOBAL) || self.eat_kw(kw::LOCAL);
        let temp = self.eat_kw(kw::TEMP) || self.eat_kw(kw::TEMPORARY);
        self.skip_rest(nested, true);
        if temp { Class::Session } else { Class::Write }
    }

    /// Scans a query (`first` is its first token) to its end. Reads unless it
    /// locks rows, writes via a CTE, creates a table with INTO, or calls a
    /// write function.
    fn query(&mut self, first: Tok<'a>, nested: bool) -> Class {
        let mut class = Class::Read;
        let mut depth = 0u32;
        let mut prev = Prev::Other;
        let mut t = first;
        loop {
            let mut now = Prev::Other;
            match t {
                Tok::Eof => {
                    if depth > 0 {
                        raise(&mut class, Class::Write);
                    }
                    return class;
                }
                Tok::Semi if depth == 0 && !nested => return class,
                // `;` inside parentheses, COPY's included: PostgreSQL rejects the string.
                Tok::Semi => raise(&mut class, Class::Write),
                Tok::RParen if depth == 0 => {
                    if nested {
                        return class;
                    }
                    raise(&mut class, Class::Write);
                }
                Tok::RParen => depth -= 1,
                Tok::LParen => {
                    // A call: `name(`, `schema.name(`, `"name"(`. U&"..." names
                    // could spell anything, so their calls count as writes.
                    if let Prev::Name { raw, quoted, unicode } = prev
                        && (unicode || self.wf.matches(raw, quoted))
                    {
                        raise(&mut class, Class::Write);
                    }
                    // current_setting($1): which setting is not in the text;
                    // it may be one of the node's (see `node_setting`).
                    if let Prev::Name { raw, quoted: false, .. } = prev
                        && raw.eq_ignore_ascii_case(b"current_setting")
                        && !matches!(self.peek(), Tok::Str(_))
                    {
                        raise(&mut class, Class::Write);
                    }
                    depth += 1;
                }
                Tok::Word(w) => {
                    now = Prev::Name { raw: w, quoted: false, unicode: false };
                    // After a dot it is a column or function name, not a keyword.
                    if prev != Prev::Dot {
                        match pack(w) {
                            kw::INSERT | kw::UPDATE | kw::DELETE | kw::MERGE => raise(&mut class, Class::Write),
                            kw::INTO => {
                                raise(&mut class, Class::Write);
                                if matches!(self.peek_kw(), kw::TEMP | kw::TEMPORARY | kw::LOCAL | kw::GLOBAL) {
                                    raise(&mut class, Class::Session);
                                }
                            }
                            kw::FOR => now = Prev::For,
                            // FOR SHARE, FOR KEY SHARE, FOR NO KEY UPDATE (FOR UPDATE is caught above).
                            kw::SHARE | kw::KEY | kw::NO if prev == Prev::For => raise(&mut class, Class::Write),
                            _ => {}
                        }
                    }
                }
                Tok::QIdent { raw, unicode } => now = Prev::Name { raw, quoted: true, unicode },
                Tok::Dot => now = Prev::Dot,
                // current_setting('transaction_read_only'), pg_settings rows.
                Tok::Str(s) if node_setting(s) => raise(&mut class, Class::Write),
                _ => {}
            }
            prev = now;
            t = self.next();
        }
    }

    /// EXPLAIN without ANALYZE only plans, so any plannable statement is a
    /// read; with ANALYZE the statement runs and keeps its own class.
    fn explain(&mut self, nested: bool) -> Class {
        let mut analyze = false;
        loop {
            match self.peek_kw() {
                kw::ANALYZE | kw::ANALYSE => analyze = true,
                kw::VERBOSE => {}
                _ => break,
            }
            self.next();
        }
        if self.peek() == Tok::LParen {
            // `EXPLAIN (SELECT 1)` is a query, `EXPLAIN (ANALYZE) ...` an option list.
            let mut ahead = self.lx;
            let is_query = match ahead.next_tok() {
                Tok::LParen => true,
                Tok::Word(w) => matches!(pack(w), kw::SELECT | kw::VALUES | kw::WITH | kw::TABLE),
                _ => false,
            };
            if !is_query {
                self.next();
                match self.explain_options() {
                    Some(a) => analyze |= a,
                    None => {
                        self.skip_rest(nested, false);
                        return Class::Write;
                    }
                }
            }
        }
        if analyze {
            return match self.inner_statement(nested) {
                Some(Stmt { class: Class::Read, .. }) => Class::Read,
                Some(Stmt { class: Class::Session, .. }) => Class::Session,
                _ => Class::Write,
            };
        }
        let k = match self.peek() {
            Tok::LParen => kw::SELECT,
            Tok::Word(w) => pack(w),
            _ => 0,
        };
        self.skip_rest(nested, false);
        match k {
            kw::SELECT | kw::WITH | kw::VALUES | kw::TABLE | kw::INSERT | kw::UPDATE | kw::DELETE | kw::MERGE => {
                Class::Read
            }
            // The prepared statement exists only on the pinned connection.
            kw::EXECUTE => Class::Session,
            _ => Class::Write,
        }
    }

    /// After `EXPLAIN (`: `Some(analyze)` once the `)` is consumed. ANALYZE is
    /// off only when its value is exactly false/off/0 (what defGetBoolean reads).
    fn explain_options(&mut self) -> Option<bool> {
        let mut analyze = false;
        loop {
            let is_analyze = matches!(pack(self.word()?), kw::ANALYZE | kw::ANALYSE);
            let (mut values, mut falsy, mut depth) = (0u32, false, 0u32);
            let done = loop {
                match self.next() {
                    Tok::Comma if depth == 0 => break false,
                    Tok::RParen if depth == 0 => break true,
                    Tok::Eof | Tok::Semi => return None,
                    Tok::LParen => depth += 1,
                    Tok::RParen => depth -= 1,
                    t => {
                        values += 1;
                        falsy = match t {
                            Tok::Word(v) | Tok::Str(v) | Tok::Num(v) => {
                                [&b"false"[..], b"off", b"0"].iter().any(|f| v.eq_ignore_ascii_case(f))
                            }
                            _ => false,
                        };
                    }
                }
            };
            if is_analyze && !(values == 1 && falsy) {
                analyze = true;
            }
            if done {
                return Some(analyze);
            }
        }
    }

    /// `COPY table|(query) TO STDOUT` reads; FROM, a server file or a program write.
    fn copy(&mut self, nested: bool) -> Class {
        self.eat_kw(kw::BINARY);
        let source = if self.peek() == Tok::LParen {
            self.next();
            self.inner_statement(true).map_or(Class::Write, |s| s.class)
        } else {
            while matches!(self.peek(), Tok::Word(w) if !matches!(pack(w), kw::FROM | kw::TO))
                || matches!(self.peek(), Tok::QIdent { .. } | Tok::Dot)
            {
                self.next();
            }
            if self.peek() == Tok::LParen {
                self.next();
                self.skip_rest(true, false);
            }
            Class::Read
        };
        let class = if source == Class::Read && self.eat_kw(kw::TO) && self.eat_kw(kw::STDOUT) {
            Class::Read
        } else {
            Class::Write
        };
        self.skip_rest(nested, false);
        class
    }
}
