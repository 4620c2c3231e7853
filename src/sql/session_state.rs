//! Session state that transaction pooling cannot carry from one backend to
//! the next: pgmux pins the client to its backend, refuses the statement or
//! lets it through (`on_session_state`).

use super::lex::Tok;
use super::{Statement, each_reading};
pub use crate::vocab::reasons::PinReason;

/// The first statement in `sql` that creates session state. Conservative: a
/// false positive only pins (or refuses) needlessly, so an advisory-lock
/// call is looked for anywhere in the text, literals included. Runs on
/// every request: no allocation.
pub fn session_state(sql: &[u8]) -> Option<PinReason> {
    if calls_advisory_lock(sql) {
        // The transaction-level variants are spelled pg_advisory_xact_lock*.
        return Some(PinReason::AdvisoryLock);
    }
    each_reading(sql, |statements| statements.find_map(|mut stmt| of_statement(stmt.word()?, &mut stmt)))
}

/// The session state a statement starting with the word `first` creates;
/// `stmt` is positioned after that word.
pub(super) fn of_statement(first: &[u8], stmt: &mut Statement<'_>) -> Option<PinReason> {
    // Every keyword below starts with one of these.
    if !matches!(first[0].to_ascii_lowercase(), b'l' | b'p' | b'c' | b'd') {
        return None;
    }
    if first.eq_ignore_ascii_case(b"listen") {
        return Some(PinReason::Listen);
    }
    if first.eq_ignore_ascii_case(b"prepare") {
        // PREPARE TRANSACTION is two-phase commit, not a statement.
        return match stmt.word() {
            Some(w) if w.eq_ignore_ascii_case(b"transaction") => None,
            _ => Some(PinReason::SqlPrepare),
        };
    }
    if first.eq_ignore_ascii_case(b"create") {
        // CREATE [GLOBAL | LOCAL] {TEMP | TEMPORARY} [UNLOGGED] TABLE | VIEW | SEQUENCE ...
        for _ in 0..3 {
            match stmt.word() {
                Some(w) if w.eq_ignore_ascii_case(b"temp") || w.eq_ignore_ascii_case(b"temporary") => {
                    return Some(PinReason::TempTable);
                }
                Some(w) if w.eq_ignore_ascii_case(b"global") || w.eq_ignore_ascii_case(b"local") => {}
                _ => return None,
            }
        }
        return None;
    }
    if first.eq_ignore_ascii_case(b"declare") {
        // DECLARE name [options] CURSOR [{WITH | WITHOUT} HOLD] FOR query
        let mut with = false;
        while let Some(t) = stmt.next() {
            match t {
                Tok::Word(w) if w.eq_ignore_ascii_case(b"for") => return None,
                Tok::Word(w) if with && w.eq_ignore_ascii_case(b"hold") => return Some(PinReason::HoldCursor),
                Tok::Word(w) => with = w.eq_ignore_ascii_case(b"with"),
                _ => with = false,
            }
        }
    }
    None
}

/// A call of `...advisory_lock(` or `...advisory_lock_shared(`: checked at
/// each `(`, which is far rarer than any letter.
pub(super) fn calls_advisory_lock(sql: &[u8]) -> bool {
    memchr::memchr_iter(b'(', sql).any(|i| {
        let before = sql[..i].trim_ascii_end();
        ends_with_ci(before, b"advisory_lock") || ends_with_ci(before, b"advisory_lock_shared")
    })
}

fn ends_with_ci(s: &[u8], suffix: &[u8]) -> bool {
    s.len() >= suffix.len() && s[s.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_session_state() {
        let cases: &[(&str, Option<PinReason>)] = &[
            ("LISTEN chan", Some(PinReason::Listen)),
            ("  listen \"x\";", Some(PinReason::Listen)),
            ("SELECT pg_advisory_lock(1)", Some(PinReason::AdvisoryLock)),
            ("select PG_TRY_ADVISORY_LOCK_SHARED(1, 2)", Some(PinReason::AdvisoryLock)),
            ("SELECT pg_advisory_xact_lock(1)", None),
            ("PREPARE q AS SELECT 1", Some(PinReason::SqlPrepare)),
            ("PREPARE TRANSACTION 'x'", None),
            ("CREATE TEMP TABLE t (a int)", Some(PinReason::TempTable)),
            ("create local temporary table t as select 1", Some(PinReason::TempTable)),
            ("CREATE TEMPORARY SEQUENCE s", Some(PinReason::TempTable)),
            ("CREATE TABLE temp (a int)", None),
            ("BEGIN; DECLARE c CURSOR WITH HOLD FOR SELECT 1", Some(PinReason::HoldCursor)),
            ("DECLARE c NO SCROLL CURSOR WITH HOLD FOR SELECT 1", Some(PinReason::HoldCursor)),
            ("DECLARE c CURSOR WITHOUT HOLD FOR SELECT 1", None),
            ("DECLARE c CURSOR FOR SELECT 1; SELECT 'with hold'", None),
            ("SELECT 1; UPDATE t SET a = 1", None),
            // A statement boundary inside a literal, a comment or a quoted name is none.
            ("SELECT ';LISTEN x'", None),
            ("SELECT 1 -- ; LISTEN x", None),
            ("SELECT 1 /* ; LISTEN x */", None),
            ("SELECT \";LISTEN x\"", None),
            ("SELECT $$ ; LISTEN x $$", None),
            ("SELECT 1 /* c */; /* c */ LISTEN x", Some(PinReason::Listen)),
            ("/* lead */ LISTEN x", Some(PinReason::Listen)),
        ];
        for (sql, want) in cases {
            assert_eq!(session_state(sql.as_bytes()), *want, "{sql}");
        }
    }

    /// With standard_conforming_strings off, `'a\';` is one literal still
    /// open; with it on, the literal ends at the second quote. Either way the
    /// LISTEN a server might run is found.
    #[test]
    fn both_readings_of_a_backslash_quote() {
        // On: 'x\' then LISTEN runs. Off: one literal up to the last quote.
        assert_eq!(session_state(br"SELECT 'x\'; LISTEN a; SELECT '1'"), Some(PinReason::Listen));
        // Off: 'x\'' is one literal, then LISTEN runs. On: the LISTEN is inside a literal.
        assert_eq!(session_state(br"SELECT 'x\''; LISTEN a; SELECT ''''"), Some(PinReason::Listen));
        // No backslash: one reading, and the LISTEN is in a literal.
        assert_eq!(session_state(b"SELECT 'x''; LISTEN a; SELECT '''"), None);
    }
}
