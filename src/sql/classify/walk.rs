//! The walk over one statement's tokens that decides its class: a small
//! recursive-descent reader of just the grammar routing needs.

use super::*;

pub(super) struct Stmt {
    pub(super) class: Class,
    /// `PREPARE TRANSACTION`: a write that also ends the transaction block.
    pub(super) ends_transaction: bool,
}

impl From<Class> for Stmt {
    fn from(class: Class) -> Self {
        Stmt { class, ends_transaction: false }
    }
}

/// What came just before the current token, for function calls and locking clauses.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Prev<'a> {
    Other,
    Dot,
    For,
    Name { raw: &'a [u8], quoted: bool, unicode: bool },
}

/// Raise `class` to `to` where Session > Write > Read.
pub(super) fn raise(class: &mut Class, to: Class) {
    if *class == Class::Read || to == Class::Session {
        *class = to;
    }
}

/// How deep statements may nest in statements (`COPY (COPY (...`,
/// `EXPLAIN ANALYZE EXPLAIN ANALYZE ...`). Each level recurses, so without a
/// bound a crafted query overflows the stack and aborts the process.
/// PostgreSQL accepts two levels at most; anything deeper is a write.
pub(super) const MAX_NESTING: u32 = 16;

pub(super) struct Cx<'a, 'w> {
    pub(super) lx: Lexer<'a>,
    pub(super) peeked: Option<Tok<'a>>,
    pub(super) wf: &'w WriteFunctions,
    /// Statements entered through [`Cx::inner_statement`] and not yet left.
    pub(super) nesting: u32,
    /// A `;` inside parentheses was skipped (only CREATE RULE actions and
    /// BEGIN ATOMIC bodies hold one in SQL PostgreSQL accepts), or the text
    /// ended with parentheses open: never a read.
    pub(super) broken_parens: bool,
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
    pub(super) fn statement(&mut self, nested: bool) -> Option<Stmt> {
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
            // A name, quoted or not, in any position: pg_prepared_xacts.
            if let Prev::Name { raw, .. } = now
                && node_relation(raw)
            {
                raise(&mut class, Class::Write);
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
