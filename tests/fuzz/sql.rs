//! The SQL scans: the read/write classifier, session state, settings.

use super::*;

// ---------------------------------------------------------------------------
// SQL classification (read/write routing)

/// Pieces of SQL that steer the lexer: quotes of every kind, comments,
/// dollar quotes, parentheses, keywords the classifier acts on, non-UTF-8.
pub(crate) const SQL_BITS: &[&str] = &[
    "SELECT ",
    "select 1",
    "WITH x AS (",
    "VALUES (1)",
    "TABLE t",
    "(",
    ")",
    ";",
    ",",
    ".",
    " ",
    "\n",
    "'",
    "''",
    "'a\\'",
    "e'",
    "E'\\'",
    "\\",
    "\"",
    "\"\"",
    "U&\"",
    "u&'",
    "$",
    "$$",
    "$a$",
    "$A$",
    "$1",
    "--",
    "-- x\n",
    "/*",
    "*/",
    "/* a /* b */ c */",
    "/* pgmux:primary */",
    "/* pgmux:replica */",
    "1e",
    "1.5e-3",
    ".5",
    "0x1F",
    "INSERT",
    "UPDATE",
    "DELETE",
    "MERGE",
    "INTO",
    "TEMP",
    "FOR",
    "SHARE",
    "KEY",
    "NO",
    "nextval(",
    "x.nextval(",
    "\"NEXTVAL\"(",
    "EXPLAIN ",
    "ANALYZE ",
    "EXPLAIN (ANALYZE) ",
    "EXPLAIN (ANALYZE off) ",
    "COPY ",
    "COPY (",
    " TO STDOUT",
    "FROM",
    "BEGIN",
    "BEGIN ATOMIC ",
    "END",
    "CASE ",
    "COMMIT",
    "AND CHAIN",
    "ROLLBACK",
    "TO",
    "SAVEPOINT",
    "PREPARE",
    "TRANSACTION",
    "SET ",
    "transaction_read_only = on",
    "READ ONLY",
    "READ WRITE",
    "CREATE ",
    "CREATE TEMP TABLE t",
    "SHOW x",
    "\u{e9}",
    "\u{a0}",
];

/// SQL-shaped inputs: lexically awkward soup, plain bytes, and soup with invalid UTF-8.
pub(crate) fn sql_soup() -> impl Strategy<Value = Vec<u8>> {
    let soup = vec(proptest::sample::select(SQL_BITS), 0..24).prop_map(|v| v.concat().into_bytes());
    prop_oneof![
        4 => soup.clone(),
        1 => vec(any::<u8>(), 0..64),
        1 => (soup, vec((any::<usize>(), any::<u8>()), 1..4)).prop_map(|(mut s, noise)| {
            for (at, b) in noise {
                let at = at % (s.len() + 1);
                s.insert(at, b);
            }
            s
        }),
    ]
}

/// `classify` with the built-in write functions plus a configured one.
pub(crate) fn wf() -> WriteFunctions {
    WriteFunctions::new(["audit_*", "billing.charge"])
}

/// Everything but the hint.
pub(crate) fn unhinted(c: Classified) -> Classified {
    Classified { hint: None, ..c }
}

/// Inputs a hostile client could send to make classification slow or deep:
/// one piece repeated up to 1 MiB, after an ordinary start.
pub(crate) fn pathological_sql() -> impl Strategy<Value = Vec<u8>> {
    const MIB: usize = 1 << 20;
    (
        prop_oneof![Just(""), Just("SELECT "), Just("EXPLAIN ANALYZE "), Just("CREATE FUNCTION f() BEGIN ATOMIC ")],
        proptest::sample::select(SQL_BITS),
        1..=MIB,
    )
        .prop_map(|(head, piece, n)| {
            let mut s = head.as_bytes().to_vec();
            s.extend(piece.as_bytes().repeat(n.min(MIB / piece.len().max(1))));
            s
        })
}

proptest! {
    #![proptest_config(cases(9000))]

    /// Classification never panics, never allocates (the module promises a
    /// pure function), is deterministic, and an ambiguous text is never a read.
    #[test]
    fn classify_total(sql in sql_soup()) {
        let wf = wf();
        let (c, _, allocations) = alloc_probe::measure(|| classify(&sql, &wf));
        prop_assert_eq!(allocations, 0);
        prop_assert_eq!(c, classify(&sql, &wf));
        if c.ambiguous {
            prop_assert_ne!(c.class, Class::Read);
        }
        prop_assert!(usize::from(c.statements) <= sql.len());
    }

    /// `/* pgmux:primary */` (or `-- pgmux:primary`) in front of any text
    /// routes it to the primary, and changes nothing but the hint.
    #[test]
    fn primary_hint_prefix(sql in sql_soup(), line in any::<bool>()) {
        let wf = wf();
        let prefix: &[u8] = if line { b"-- pgmux:primary\n" } else { b"/* pgmux:primary */ " };
        let hinted = [prefix, &sql].concat();
        let c = classify(&hinted, &wf);
        prop_assert_eq!(c.hint, Some(Hint::Primary));
        prop_assert_eq!(unhinted(c), unhinted(classify(&sql, &wf)));
        prop_assert_eq!(intent_of([&hinted[..]], &wf), Intent::HintPrimary);
        let replica = [&b"/* pgmux:replica */ "[..], &sql].concat();
        prop_assert_eq!(intent_of([&replica[..]], &wf), Intent::HintReplica);
    }

    /// Several statements are a read only when each one is: two reads joined
    /// by `;` stay a read, and a text whose first statement is not a read
    /// never becomes one by what follows it.
    #[test]
    fn reads_compose(a in statement_like(), b in statement_like()) {
        let wf = wf();
        let (ca, cb) = (classify(&a, &wf), classify(&b, &wf));
        // Inputs that end inside a literal or comment would swallow the `;`.
        if ca.ambiguous || cb.ambiguous || ca.class == Class::Empty || cb.class == Class::Empty {
            return Ok(());
        }
        let joined = classify(&[&a[..], b"\n;\n", &b[..]].concat(), &wf);
        if ca.class == Class::Read && cb.class == Class::Read {
            prop_assert_eq!(joined.class, Class::Read);
        }
        if ca.class != Class::Read {
            prop_assert_ne!(joined.class, Class::Read);
        }
    }
}

/// A word the lexer sees as code: something complete and self-delimiting.
pub(crate) fn code_token() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z_][a-z0-9_$]{0,8}",
        "[0-9]{1,4}(\\.[0-9]{1,3})?",
        "'([^'\\\\]|'')*'".prop_map(|s| s),
        "\"([^\"]|\"\"){1,6}\"",
        "\\$q\\$[^$]{0,8}\\$q\\$",
        "/\\*[^*/]{0,8}\\*/",
        "--[^\n\r]{0,8}\n",
        proptest::sample::select(vec![
            "(", ")", ",", "+", "-", "*", "=", "<", ">", "::", "[", "]", "$1", "FOR", "SHARE"
        ])
        .prop_map(str::to_owned),
    ]
}

/// A statement of some kind followed by code words, or soup.
pub(crate) fn statement_like() -> impl Strategy<Value = Vec<u8>> {
    let head = proptest::sample::select(vec![
        "SELECT",
        "VALUES",
        "TABLE t",
        "(SELECT",
        "WITH x AS (SELECT 1)",
        "SHOW",
        "EXPLAIN",
        "EXPLAIN ANALYZE",
        "COPY t TO STDOUT",
        "COPY (SELECT 1) TO STDOUT",
        // Openings and endings that could join across a `;`.
        "COPY (SELECT",
        "COPY t (",
        "EXPLAIN ANALYZE COPY (",
        "TO STDOUT",
        ") TO STDOUT",
        "SHOW (",
        "UPDATE t SET",
        "BEGIN",
        "BEGIN READ ONLY",
        "COMMIT",
        "ROLLBACK",
        "SET",
        "SET TRANSACTION",
        "CREATE TEMP TABLE",
        "CREATE TABLE",
        "DECLARE",
        "PREPARE",
    ]);
    let structured =
        (head, vec(code_token(), 0..6)).prop_map(|(h, t)| [vec![h.to_owned()], t].concat().join(" ").into_bytes());
    prop_oneof![3 => structured, 1 => sql_soup()]
}

proptest! {
    #![proptest_config(cases(6000))]

    /// A query (SELECT, WITH, VALUES, TABLE or a parenthesised one) with
    /// INSERT/UPDATE/DELETE/MERGE/INTO as a code word anywhere (not after a
    /// `.`, where it names a column), or a call of a write function, is never
    /// a read. (Outside queries the words are not promised to matter:
    /// `EXPLAIN UPDATE ...` only plans, `SHOW x` reads.)
    #[test]
    fn write_word_in_query_is_never_read(
        first in proptest::sample::select(vec!["SELECT", "select", "WITH", "VALUES", "TABLE", "(", "( SELECT"]),
        before in vec(code_token(), 0..8),
        after in vec(code_token(), 0..8),
        write in proptest::sample::select(vec![
            "INSERT", "update", "Delete", "MERGE", "into", "nextval (", "pg_catalog.NEXTVAL(", "\"setval\"(",
            "pg_advisory_lock(", "audit_log(", "x.charge(", "FOR UPDATE", "for no key update", "FOR KEY SHARE",
        ]),
    ) {
        let sql = [&[first.to_owned()][..], &before, &[write.to_owned()], &after].concat().join(" ");
        let c = classify(sql.as_bytes(), &wf());
        prop_assert_ne!(c.class, Class::Read, "{}", sql);
    }
}

/// Linear time, bounded stack: up to 1 MiB of one repeated piece (deep
/// parentheses, nested COPY/EXPLAIN, endless comments or quotes) classifies
/// well under a second, even in a debug build.
#[test]
pub(crate) fn classify_pathological_input_is_fast() {
    let wf = wf();
    run_heavy(48, pathological_sql(), |sql| {
        let started = std::time::Instant::now();
        let c = classify(&sql, &wf);
        let took = started.elapsed();
        prop_assert!(took < Duration::from_secs(1), "{} bytes took {took:?}", sql.len());
        if c.ambiguous {
            prop_assert_ne!(c.class, Class::Read);
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------
// The relay's other lexical scans of client SQL: settings a statement may
// change (read back after the transaction) and session state (pinning).

/// Complete pieces of SQL: each ends outside any literal, quoted name or
/// comment, several hide a `;` or a statement inside one.
pub(crate) const COMPLETE_BITS: &[&str] = &[
    "SELECT 1",
    "SELECT ';LISTEN x'",
    "SELECT $$;$$",
    "SELECT $t$ ' ; $t$",
    "SELECT \"a;b\"",
    "-- ; LISTEN x\n",
    "/* ; /* SET a = 1 */ */",
    "SELECT E'\\';'",
    "SELECT 'it''s'",
    "(",
    ")",
    ";",
    " ",
    "\n",
    "UPDATE t SET a = 1",
    "BEGIN",
    "SET LOCAL x = 1",
    "SELECT U&'\\0041'",
    "SELECT 1e5",
    "x.y",
    "$1",
    "set_config",
];

/// Text the server would lex to the end: what comes before a statement it runs.
pub(crate) fn complete_sql() -> impl Strategy<Value = Vec<u8>> {
    vec(proptest::sample::select(COMPLETE_BITS), 0..12).prop_map(|v| v.concat().into_bytes())
}

/// Up to 1 MiB of one piece repeated, or of distinct names: the shapes that
/// make a per-occurrence copy or a per-name search quadratic.
pub(crate) fn pathological_settings_sql() -> impl Strategy<Value = Vec<u8>> {
    const MIB: usize = 1 << 20;
    let pieces = proptest::sample::select(vec![
        "set_config(",
        "set_config('x",
        "set_config('x'",
        " set_config(  'a',",
        "SET x = 1;",
        "set a;",
        "reset a;",
        "LISTEN x;",
        "(",
        "advisory_lock",
        "advisory_lock (",
        " ",
        ";",
        "DECLARE c WITH HOLD",
        "create temp ",
    ]);
    let repeated = (pieces, 1..=MIB).prop_map(|(p, n)| p.repeat(n.min(MIB / p.len())).into_bytes());
    let distinct =
        (proptest::sample::select(vec!["set_config('n{}', 'v', false) ", "SET n{} = 1;", "RESET n{};"]), 1..=MIB / 16)
            .prop_map(|(shape, n)| {
                (0..n).map(|i| shape.replace("{}", &i.to_string())).collect::<String>().into_bytes()
            });
    prop_oneof![repeated, distinct]
}

/// Linear time: up to 1 MiB of `set_config(` calls, SET/RESET statements or
/// pinning triggers scans in seconds at most, even in a debug build.
#[test]
pub(crate) fn settings_and_pinning_scans_are_fast() {
    run_heavy(48, pathological_settings_sql(), |sql| {
        let started = std::time::Instant::now();
        let mut out = Vec::new();
        settings_named_in(&sql, &mut out);
        let _ = session_state(&sql);
        let took = started.elapsed();
        // Linear is about 0.2 s per MiB of `SET n1 = 1;` in a debug build
        // (it allocates per name), more on a busy machine; quadratic was minutes.
        prop_assert!(took < Duration::from_secs(5), "{} bytes took {took:?}", sql.len());
        Ok(())
    });
}

proptest! {
    #![proptest_config(cases(6000))]

    /// Any SQL: settings_named_in names lowercase settings without quotes,
    /// each once; session_state never allocates (a hot-path byte scan).
    #[test]
    fn settings_and_pinning_scans_total(sql in sql_soup(), extra in vec(proptest::sample::select(vec![
        "SET ", "set session ", "RESET ", "set_config(", "set_config('A'", "'", "\"X\"", " TIME ZONE", "all", "local ",
    ]), 0..6)) {
        let sql = [sql, extra.concat().into_bytes()].concat();
        let mut out = Vec::new();
        settings_named_in(&sql, &mut out);
        for (i, n) in out.iter().enumerate() {
            prop_assert!(!out[..i].contains(n), "{n:?} twice");
            prop_assert_eq!(n.to_ascii_lowercase(), n.clone());
        }
        let (_, _, allocations) = alloc_probe::measure(|| session_state(&sql));
        prop_assert_eq!(allocations, 0);
    }

    /// A setting named in SET, RESET or set_config() is found, whatever
    /// complete SQL comes before it.
    #[test]
    fn settings_named_are_found(
        before in complete_sql(),
        name in "[a-z_][a-z0-9_]{0,6}(\\.[a-z_][a-z0-9_]{0,6})?".prop_filter("a keyword", |n| {
            !matches!(n.as_str(), "local" | "session" | "time" | "names" | "schema" | "transaction" | "constraints" | "role" | "all")
        }),
        upper in any::<bool>(),
        form in 0..3u8,
    ) {
        let shown = if upper { name.to_uppercase() } else { name.clone() };
        let stmt = match form {
            0 => format!(";SET {shown} = 1"),
            1 => format!(";RESET {shown}"),
            _ => format!(" set_config('{shown}', 'v', false)"),
        };
        let mut out = Vec::new();
        settings_named_in(&[&before[..], stmt.as_bytes()].concat(), &mut out);
        prop_assert!(out.contains(&name), "{:?} not in {:?}", name, out);
    }

    /// The one-pass sniff the relay runs says what the two scans say.
    #[test]
    fn sniff_agrees_with_the_scans(sql in prop_oneof![sql_soup(), complete_sql()], extra in vec(proptest::sample::select(vec![
        ";SET a = 1", "; LISTEN x", "; reset all", "set_config(", " 'x\\'", ";PREPARE p AS SELECT 1", ";", "'", "$$",
    ]), 0..4)) {
        let sql = [sql, extra.concat().into_bytes()].concat();
        let sniffed = pgmux::sql::sniff(&sql);
        prop_assert_eq!(sniffed.session_state, session_state(&sql));
        prop_assert_eq!(sniffed.touches_settings, pgmux::sql::settings::touches_settings(&sql));
    }

    /// A statement that creates session state pins, whatever complete SQL
    /// comes before it.
    #[test]
    fn session_state_is_found(
        before in complete_sql(),
        stmt in proptest::sample::select(vec![
            "LISTEN chan", "PREPARE p AS SELECT 1", "CREATE TEMP TABLE t (x int)", "create temporary view v as select 1",
            "DECLARE c CURSOR WITH HOLD FOR SELECT 1", "SELECT pg_advisory_lock(1)", "select pg_try_advisory_lock_shared (2)",
        ]),
    ) {
        prop_assert!(session_state(&[&before[..], b";", stmt.as_bytes()].concat()).is_some());
    }
}
