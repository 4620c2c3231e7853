//! The run-time settings a client's SQL may change for its session (`SET`,
//! `RESET`, `set_config`), which pgmux reads back from the server to carry
//! them to the client's next backend.

use std::collections::HashSet;

use super::lex::Tok;
use super::{Statement, each_reading, unquote_ident};

/// Whether `sql` may change a setting: a statement starting with `SET` or
/// `RESET`, or a `set_config` anywhere. False positives only cost a
/// read-back. Runs on every request: no allocation.
pub fn touches_settings(sql: &[u8]) -> bool {
    calls_set_config(sql)
        || each_reading(sql, |statements| statements.filter_map(|mut s| s.word()).any(sets).then_some(())).is_some()
}

/// A `set_config` anywhere in the text.
pub(super) fn calls_set_config(sql: &[u8]) -> bool {
    // Built once: constructing a searcher per call cost more than the search.
    static SET_CONFIG: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"set_config"));
    SET_CONFIG.find(sql).is_some()
}

/// Whether a statement starting with `first` is a SET or RESET.
pub(super) fn sets(first: &[u8]) -> bool {
    first.eq_ignore_ascii_case(b"set") || first.eq_ignore_ascii_case(b"reset")
}

/// The names of settings a client's SQL may change for the session, lower
/// case, each once, appended to `out`: `SET [SESSION] name ...`, `RESET
/// name`, `set_config('name', ...)`. `SET LOCAL` is skipped (it ends with the
/// transaction). `RESET ALL` yields `*`.
pub fn settings_named_in(sql: &[u8], out: &mut Vec<String>) {
    // One message can name thousands of settings: a set, not a search of `out`.
    let mut seen: HashSet<String> = out.iter().cloned().collect();
    let mut push = |name: &str| {
        if seen.insert(name.to_owned()) {
            out.push(name.to_owned());
        }
    };
    let calls_set_config = calls_set_config(sql);
    each_reading::<()>(sql, |statements| {
        for stmt in statements {
            named_in(stmt, calls_set_config, &mut push);
        }
        None
    });
}

fn named_in(stmt: Statement<'_>, calls_set_config: bool, push: &mut impl FnMut(&str)) {
    let whole = Statement { lx: stmt.lx, ended: stmt.ended };
    set_or_reset(stmt, push);
    if calls_set_config {
        set_config_calls(whole, push);
    }
}

/// `SET name ...` or `RESET name`.
fn set_or_reset(mut stmt: Statement<'_>, push: &mut impl FnMut(&str)) {
    let first = stmt.next();
    let word = |t: Option<Tok<'_>>, kw: &[u8]| matches!(t, Some(Tok::Word(w)) if w.eq_ignore_ascii_case(kw));
    if word(first, b"set") {
        let mut name = stmt.next();
        if word(name, b"local") {
            return;
        }
        if word(name, b"session") {
            name = stmt.next();
            // SET SESSION AUTHORIZATION / CHARACTERISTICS: not a plain setting.
            if word(name, b"authorization") || word(name, b"characteristics") {
                return;
            }
        }
        match name {
            _ if word(name, b"time") => push("timezone"),
            _ if word(name, b"names") => push("client_encoding"),
            _ if word(name, b"schema") => push("search_path"),
            _ if word(name, b"transaction") || word(name, b"constraints") || word(name, b"role") => {}
            Some(t) => {
                if let Some(n) = setting_name(t, &mut stmt) {
                    push(&n)
                }
            }
            None => {}
        }
    } else if word(first, b"reset") {
        let name = stmt.next();
        match name {
            _ if word(name, b"all") => push("*"),
            _ if word(name, b"session") || word(name, b"role") => {}
            Some(t) => {
                if let Some(n) = setting_name(t, &mut stmt) {
                    push(&n)
                }
            }
            None => {}
        }
    }
}

/// `set_config('name', ...)` anywhere in the statement: the first argument,
/// when it is a literal.
fn set_config_calls(mut stmt: Statement<'_>, push: &mut impl FnMut(&str)) {
    let mut prev = [None, None];
    let mut tok = stmt.next();
    while let Some(t) = tok {
        if let ([Some(Tok::Word(f)), Some(Tok::LParen)], Tok::Str(raw)) = (prev, t)
            && f.eq_ignore_ascii_case(b"set_config")
        {
            let name = String::from_utf8_lossy(raw).replace("''", "'");
            push(&name.to_ascii_lowercase());
        }
        prev = [prev[1], Some(t)];
        tok = stmt.next();
    }
}

/// A setting's name starting at `first`: a word or quoted name, with
/// `.`-separated parts (`myapp.user_id`), in lower case as Postgres looks
/// names up.
fn setting_name(first: Tok<'_>, stmt: &mut Statement<'_>) -> Option<String> {
    let part = |t: Tok<'_>| match t {
        Tok::Word(w) => Some(String::from_utf8_lossy(w).to_ascii_lowercase()),
        Tok::QIdent { raw, .. } => Some(String::from_utf8_lossy(&unquote_ident(raw)).to_ascii_lowercase()),
        _ => None,
    };
    let mut name = part(first)?;
    let mut probe = Statement { lx: stmt.lx, ended: stmt.ended };
    while probe.next() == Some(Tok::Dot) {
        let Some(p) = probe.next().and_then(part) else { break };
        name.push('.');
        name.push_str(&p);
        *stmt = Statement { lx: probe.lx, ended: probe.ended };
    }
    Some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_settings_changed_by_sql() {
        let mut names = Vec::new();
        settings_named_in(
            b"SET search_path = a, b; set local work_mem='1MB'; SET SESSION statement_timeout TO 5; \
              RESET lock_timeout; SELECT set_config('application_name', 'x', false); SET TIME ZONE 'UTC'",
            &mut names,
        );
        assert_eq!(names, ["search_path", "statement_timeout", "lock_timeout", "application_name", "timezone"]);
        let mut names = Vec::new();
        settings_named_in(b"SET TRANSACTION READ ONLY; RESET ALL", &mut names);
        assert_eq!(names, ["*"]);
        let mut names = Vec::new();
        settings_named_in(b"SET myapp.user_id = 5; SET \"Work_Mem\" TO '1MB'; SET x=1", &mut names);
        assert_eq!(names, ["myapp.user_id", "work_mem", "x"]);
    }

    #[test]
    fn statements_in_literals_and_comments_are_not_settings() {
        let mut names = Vec::new();
        settings_named_in(b"SELECT 'x; SET a = 1'; SELECT 1 -- ; SET b = 1\n; /* ; SET c = 1 */ SET d = 1", &mut names);
        assert_eq!(names, ["d"]);
        assert!(!touches_settings(b"SELECT 'x; SET a = 1'"));
        assert!(!touches_settings(b"SELECT 1 /* ; RESET a */"));
    }

    /// Each `set_config(` used to copy the rest of the text, and each name
    /// was searched for in all names found so far: quadratic in a Query that
    /// repeats either (77 KB took over a second in a debug build, 64 MiB
    /// would take hours). Found by tests/fuzz/,
    /// settings_and_pinning_scans_are_fast.
    #[test]
    fn many_set_config_calls_or_names_take_linear_time() {
        let started = std::time::Instant::now();
        let mut names = Vec::new();
        settings_named_in("set_config(".repeat(100_000).as_bytes(), &mut names);
        assert!(names.is_empty());
        let distinct: String = (0..50_000).map(|i| format!("SET n{i} = 1; set_config('n{i}', 'v', false);")).collect();
        settings_named_in(distinct.as_bytes(), &mut names);
        assert_eq!(names.len(), 50_000);
        assert_eq!((names[0].as_str(), names[49_999].as_str()), ("n0", "n49999"));
        // Linear is milliseconds; the quadratic scans took minutes.
        assert!(started.elapsed() < std::time::Duration::from_secs(5), "{:?}", started.elapsed());
    }

    #[test]
    fn settings_changes_are_spotted() {
        for sql in [
            "SET search_path = a",
            "  reset all",
            "SELECT 1; SET\tTimeZone TO 'UTC'",
            "select pg_catalog.set_config('x', 'y', false)",
        ] {
            assert!(touches_settings(sql.as_bytes()), "{sql}");
        }
        for sql in ["SELECT 1", "SELECT settings FROM t", "UPDATE t SET a = 1", "resetting", ""] {
            assert!(!touches_settings(sql.as_bytes()), "{sql}");
        }
    }
}
