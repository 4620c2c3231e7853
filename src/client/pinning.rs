//! Session state that transaction pooling cannot carry from one backend to
//! the next, detected in the client's SQL so pgmux can pin the client to its
//! backend, refuse the statement, or let it through (`on_session_state`).

pub use crate::vocab::reasons::PinReason;

/// Finds the first statement in `sql` that creates session state. Lexical and
/// conservative: a false positive only pins (or refuses) needlessly. Kept
/// cheap for the hot path: a byte scan, no allocation.
pub fn session_state(sql: &[u8]) -> Option<PinReason> {
    if calls_advisory_lock(sql) {
        // The transaction-level variants are spelled pg_advisory_xact_lock*.
        return Some(PinReason::AdvisoryLock);
    }
    for stmt in statement_starts(sql) {
        // Every keyword below starts with one of these: skip the word split for the rest.
        if !matches!(stmt.first().map(u8::to_ascii_lowercase), Some(b'l' | b'p' | b'c' | b'd')) {
            continue;
        }
        let mut words =
            stmt.split(|b: &u8| b.is_ascii_whitespace() || *b == b'(' || *b == b';').filter(|w| !w.is_empty()).take(6);
        let first = words.next().unwrap_or_default();
        if first.eq_ignore_ascii_case(b"listen") {
            return Some(PinReason::Listen);
        }
        if first.eq_ignore_ascii_case(b"prepare") {
            // PREPARE TRANSACTION is two-phase commit, not a statement.
            if !words.next().is_some_and(|w| w.eq_ignore_ascii_case(b"transaction")) {
                return Some(PinReason::SqlPrepare);
            }
            continue;
        }
        if first.eq_ignore_ascii_case(b"create") {
            let temp = words
                .take(3)
                .take_while(|w| !w.eq_ignore_ascii_case(b"table") && !w.eq_ignore_ascii_case(b"view"))
                .any(|w| w.eq_ignore_ascii_case(b"temp") || w.eq_ignore_ascii_case(b"temporary"));
            if temp {
                return Some(PinReason::TempTable);
            }
            continue;
        }
        if first.eq_ignore_ascii_case(b"declare") {
            let end = memchr::memchr(b';', stmt).unwrap_or(stmt.len());
            if contains_ci(&stmt[..end], b"with hold") {
                return Some(PinReason::HoldCursor);
            }
        }
    }
    None
}

/// The text of each statement, starting at its first non-blank byte.
fn statement_starts(sql: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(sql);
    std::iter::from_fn(move || {
        let s = rest?;
        let start = s.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(s.len());
        let s = &s[start..];
        rest = memchr::memchr(b';', s).map(|i| &s[i + 1..]);
        Some(s)
    })
}

/// A call of `...advisory_lock(` or `...advisory_lock_shared(`: checked at
/// each `(`, which is far rarer than any letter.
fn calls_advisory_lock(sql: &[u8]) -> bool {
    memchr::memchr_iter(b'(', sql).any(|i| {
        let before = sql[..i].trim_ascii_end();
        ends_with_ci(before, b"advisory_lock") || ends_with_ci(before, b"advisory_lock_shared")
    })
}

fn ends_with_ci(s: &[u8], suffix: &[u8]) -> bool {
    s.len() >= suffix.len() && s[s.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
}

fn contains_ci(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w.eq_ignore_ascii_case(needle))
}

fn refusal_message(reason: PinReason) -> String {
    format!("{} is not supported in transaction pooling mode (on_session_state = \"error\")", reason.statement())
}

/// A statement that raises the refusal with SQLSTATE 0A000 when run, put in
/// place of a refused simple Query so the error arrives where the client
/// expects it and the server's transaction state matches what it is told.
pub fn refusal_sql(reason: PinReason) -> String {
    format!(
        "DO $pgmux$BEGIN RAISE EXCEPTION USING ERRCODE = '0A000', MESSAGE = '{}'; END$pgmux$",
        refusal_message(reason)
    )
}

/// The Parse-time refusal for the extended protocol: a literal that fails its
/// cast while the statement is parsed (SQLSTATE 22P02, the refusal quoted in
/// the message). A DO block would only fail at Execute, after the client had
/// been told the statement takes no parameters.
pub fn refusal_parse_sql(reason: PinReason) -> String {
    format!("SELECT 'pgmux: {}'::pg_catalog.int4", refusal_message(reason))
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
            ("CREATE TABLE temp (a int)", None),
            ("BEGIN; DECLARE c CURSOR WITH HOLD FOR SELECT 1", Some(PinReason::HoldCursor)),
            ("DECLARE c CURSOR FOR SELECT 1; SELECT 'with hold'", None),
            ("SELECT 1; UPDATE t SET a = 1", None),
        ];
        for (sql, want) in cases {
            assert_eq!(session_state(sql.as_bytes()), *want, "{sql}");
        }
    }
}
