use super::corpus::CORPUS;
use super::*;

fn wf() -> WriteFunctions {
    WriteFunctions::default()
}

fn class(sql: &str) -> Class {
    classify(sql.as_bytes(), &wf()).class
}

#[test]
fn corpus() {
    let wf = wf();
    let mut failures = Vec::new();
    for &(sql, want) in CORPUS {
        let got = classify(sql.as_bytes(), &wf).class;
        if got != want {
            failures.push(format!("{sql:?}: want {want:?}, got {got:?}"));
        }
    }
    assert!(failures.is_empty(), "{} misclassified:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn corpus_size_and_mix() {
    let count = |f: fn(&Class) -> bool| CORPUS.iter().filter(|(_, c)| f(c)).count();
    let mut mix: Vec<(String, usize)> = Vec::new();
    for (_, c) in CORPUS {
        let name = format!("{c:?}");
        match mix.iter_mut().find(|(n, _)| *n == name) {
            Some((_, k)) => *k += 1,
            None => mix.push((name, 1)),
        }
    }
    eprintln!("corpus: {} statements, {mix:?}", CORPUS.len());
    assert!(CORPUS.len() >= 200, "corpus has {}", CORPUS.len());
    assert!(count(|c| *c == Class::Read) >= 80);
    assert!(count(|c| *c == Class::Write) >= 80);
    assert!(count(|c| *c == Class::Session) >= 20);
}

#[test]
fn hints() {
    let h = |sql: &str| classify(sql.as_bytes(), &wf()).hint;
    assert_eq!(h("/* pgmux:primary */ SELECT 1"), Some(Hint::Primary));
    assert_eq!(h("/*pgmux:replica*/SELECT 1"), Some(Hint::Replica));
    assert_eq!(h("  \n/*  PGMUX : Replica \n */ SELECT 1"), Some(Hint::Replica));
    assert_eq!(h("-- pgmux:primary\nSELECT 1"), Some(Hint::Primary));
    assert_eq!(h("/* pgmux:replica */ UPDATE t SET x = 1"), Some(Hint::Replica));
    // Only the first comment, and only before the first token.
    assert_eq!(h("/* app=x */ /* pgmux:primary */ SELECT 1"), None);
    assert_eq!(h("SELECT 1 /* pgmux:primary */"), None);
    assert_eq!(h("/* pgmux:primary please */ SELECT 1"), None);
    assert_eq!(h("/* pgmux:standby */ SELECT 1"), None);
    assert_eq!(h("/* pgmux:primary"), None);
    assert_eq!(h(""), None);
    // The hint does not change the class: the router decides what a hint may override.
    let c = classify(b"/* pgmux:replica */ UPDATE t SET x = 1", &wf());
    assert_eq!((c.class, c.hint), (Class::Write, Some(Hint::Replica)));
}

#[test]
fn transaction_structure() {
    let c = classify(b"BEGIN; UPDATE t SET x = 1; COMMIT", &wf());
    assert_eq!(c.statements, 3);
    assert!(c.starts_transaction && c.ends_transaction);
    assert_eq!(c.transaction_open_after, Some(false));

    let c = classify(b"BEGIN READ ONLY; SELECT 1", &wf());
    assert_eq!((c.class, c.transaction_open_after), (Class::Write, Some(true)));

    let c = classify(b"BEGIN READ ONLY", &wf());
    assert_eq!(c.class, Class::Begin { read_only: true });
    assert!(c.starts_transaction && !c.ends_transaction);

    let c = classify(b"COMMIT AND CHAIN", &wf());
    assert!(c.starts_transaction && c.ends_transaction);
    assert_eq!(c.transaction_open_after, Some(true));

    let c = classify(b"ROLLBACK TO SAVEPOINT a", &wf());
    assert!(!c.starts_transaction && !c.ends_transaction);
    assert_eq!(c.transaction_open_after, None);

    let c = classify(b"PREPARE TRANSACTION 'x'", &wf());
    assert_eq!((c.class, c.ends_transaction, c.transaction_open_after), (Class::Write, true, Some(false)));

    let c = classify(b"COMMIT PREPARED 'x'", &wf());
    assert!(!c.ends_transaction);

    let c = classify(b"SELECT 1", &wf());
    assert_eq!((c.statements, c.starts_transaction, c.ends_transaction), (1, false, false));

    // A BEGIN ATOMIC body's END is not a COMMIT.
    let c = classify(b"CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END; SELECT 2", &wf());
    assert_eq!((c.statements, c.ends_transaction), (2, false));
    let c = classify(b"CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END; COMMIT", &wf());
    assert_eq!((c.statements, c.ends_transaction), (2, true));
}

#[test]
fn statement_counts() {
    let n = |sql: &str| classify(sql.as_bytes(), &wf()).statements;
    assert_eq!(n(""), 0);
    assert_eq!(n(";;"), 0);
    assert_eq!(n("SELECT 1;;SELECT 2;"), 2);
    assert_eq!(n("SELECT ';'; SELECT $$;$$; SELECT 1 -- ;"), 3);
    assert_eq!(n("CREATE RULE r AS ON INSERT TO t DO ALSO (INSERT INTO a VALUES (1); DELETE FROM b); SELECT 1"), 2);
}

#[test]
fn configured_write_functions() {
    let wf = WriteFunctions::new(["Billing.Charge", "audit_*", "\"Bump\"", " ", "*"]);
    let c = |sql: &str| classify(sql.as_bytes(), &wf).class;
    assert_eq!(c("SELECT charge(1)"), Class::Write);
    assert_eq!(c("SELECT billing.CHARGE(1)"), Class::Write);
    assert_eq!(c("SELECT \"charge\"(1)"), Class::Write);
    assert_eq!(c("SELECT audit_log('x')"), Class::Write);
    assert_eq!(c("SELECT bump()"), Class::Write);
    assert_eq!(c("SELECT nextval('s')"), Class::Write, "built-ins stay");
    assert_eq!(c("SELECT charges(1), audit(2)"), Class::Read);
    assert!(wf.contains("AUDIT_x") && !wf.contains("chargeX"));
    // An empty `*` prefix is ignored rather than turning every call into a write.
    assert_eq!(c("SELECT lower('x')"), Class::Read);
}

#[test]
fn long_identifiers_truncate_like_postgres() {
    let name = "f".repeat(63);
    let wf = WriteFunctions::new([name.as_str()]);
    let longer = format!("SELECT {name}xyz(1)");
    assert_eq!(classify(longer.as_bytes(), &wf).class, Class::Write);
    assert_eq!(classify(format!("SELECT {}(1)", &name[1..]).as_bytes(), &wf).class, Class::Read);
    // A quoted name with `""` inside is compared unescaped.
    let wf = WriteFunctions::new(["a\"b"]);
    assert_eq!(classify(br#"SELECT "a""b"(1)"#, &wf).class, Class::Write);
}

#[test]
fn non_utf8_input() {
    assert_eq!(classify(b"SELECT '\xff\xfe' FROM t\xe9", &wf()).class, Class::Read);
    assert_eq!(classify(b"SELECT 1; UPDATE t\xe9 SET x = 1", &wf()).class, Class::Write);
    assert_eq!(classify(b"SELECT \xe9t\xe9(1)", &wf()).class, Class::Read);
}

#[test]
fn ambiguity_is_reported() {
    let c = classify(br"SELECT 'a\'", &wf());
    assert!(c.ambiguous);
    assert_eq!(c.class, Class::Write);
    let c = classify(br"SET search_path = 'a\'", &wf());
    assert_eq!((c.class, c.ambiguous), (Class::Session, true));
    assert!(!classify(br"SELECT 'a\\b'", &wf()).ambiguous);
}

/// Comments and whitespace in front never change the class (and so never
/// turn a write into a read); nor does a trailing `;` or comment.
#[test]
fn prefixes_and_suffixes_keep_the_class() {
    let wf = wf();
    let fronts = ["  ", "\n\t", "/* x */ ", "-- c\n", "/* a /* b */ c */\n", "/* pgmux:replica */ ", "--\r\n"];
    for &(sql, want) in CORPUS {
        for front in fronts {
            let s = format!("{front}{sql}");
            assert_eq!(classify(s.as_bytes(), &wf).class, want, "{s:?}");
        }
        // A trailing `;` after an unterminated literal is swallowed by it; skip those.
        if !classify(sql.as_bytes(), &wf).ambiguous {
            for back in [";", " ; ", "\n-- done", " /* ; DELETE FROM t */"] {
                let s = format!("{sql}{back}");
                assert_eq!(classify(s.as_bytes(), &wf).class, want, "{s:?}");
            }
        }
    }
}

/// ASCII case never matters: keywords, names (matched case-insensitively)
/// and dollar-quote tags (both ends change together) all keep their meaning.
#[test]
fn case_does_not_matter() {
    let wf = wf();
    for &(sql, want) in CORPUS {
        assert_eq!(classify(sql.to_ascii_uppercase().as_bytes(), &wf).class, want, "{sql:?} upper");
        assert_eq!(classify(sql.to_ascii_lowercase().as_bytes(), &wf).class, want, "{sql:?} lower");
    }
}

/// Every prefix of every corpus string (a cut-off message) classifies without
/// panicking, deterministically; a prefix may legitimately be a read.
#[test]
fn truncations_never_panic() {
    let wf = wf();
    for &(sql, _) in CORPUS {
        let b = sql.as_bytes();
        for end in 0..=b.len() {
            let a = classify(&b[..end], &wf);
            assert_eq!(a, classify(&b[..end], &wf));
            let _ = classify(&b[end..], &wf);
        }
    }
}

/// Splicing lexically awkward bytes into corpus strings never panics.
#[test]
fn spliced_bytes_never_panic() {
    let wf = wf();
    let bits: [&[u8]; 14] =
        [b"'", b"\"", b"$", b"$$", b"$a$", b"(", b")", b";", b"--", b"/*", b"*/", b"\\", b"e'", b"U&\""];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for &(sql, _) in CORPUS {
        for _ in 0..20 {
            let mut s = sql.as_bytes().to_vec();
            for _ in 0..3 {
                let at = (rnd() as usize) % (s.len() + 1);
                let bit = bits[(rnd() as usize) % bits.len()];
                s.splice(at..at, bit.iter().copied());
            }
            let a = classify(&s, &wf);
            assert_eq!(a, classify(&s, &wf));
        }
    }
}

/// Statements inside statements (COPY's query, what EXPLAIN ANALYZE runs)
/// are classified recursively. 1 MiB of `COPY (` or `EXPLAIN (ANALYZE) `
/// (a 60 KB query was enough in a debug build) overflowed the stack and
/// aborted the whole process; past 16 levels the rest is now a write.
#[test]
fn deep_nesting_is_a_write_not_a_stack_overflow() {
    for piece in ["COPY (", "EXPLAIN (ANALYZE) ", "EXPLAIN ANALYZE ", "COPY (EXPLAIN ANALYZE "] {
        let sql = piece.repeat((1 << 20) / piece.len());
        assert_eq!(class(&sql), Class::Write, "{piece:?}");
    }
    // Nesting PostgreSQL accepts keeps its class.
    assert_eq!(class("COPY (SELECT 1) TO STDOUT"), Class::Read);
    assert_eq!(class("EXPLAIN ANALYZE SELECT 1"), Class::Read);
    assert_eq!(class("COPY (COPY (SELECT 1) TO STDOUT) TO STDOUT"), Class::Read);
    assert_eq!(class(&format!("{}SELECT 1", "EXPLAIN ANALYZE ".repeat(16))), Class::Read);
    assert_eq!(class(&format!("{}SELECT 1", "EXPLAIN ANALYZE ".repeat(17))), Class::Write);
}

/// A `;` inside COPY's parentheses ended the nested statement, so what
/// followed it was read as the rest of the COPY: `COPY (SELECT 1; TO
/// STDOUT` was a read (PostgreSQL rejects it; found by tests/fuzz/,
/// reads_compose, with `COPY ( SELECT 1` and `TO STDOUT` joined by `;`).
#[test]
fn semicolon_inside_parentheses_is_never_a_read() {
    for sql in [
        "COPY (SELECT 1; TO STDOUT",
        "COPY (SELECT 1; SELECT 2) TO STDOUT",
        "COPY (SHOW x; y) TO STDOUT",
        "COPY t (x; y) TO STDOUT",
        "COPY t (x\n;\nTO STDOUT",
        "SHOW (;\nUPDATE t SET x = 1",
        "EXPLAIN ANALYZE COPY (SELECT 1; TO STDOUT",
    ] {
        assert_eq!(class(sql), Class::Write, "{sql:?}");
    }
    assert_eq!(class("COPY (SELECT 1) TO STDOUT; SELECT 2"), Class::Read);
    assert_eq!(class("COPY t (x, y) TO STDOUT"), Class::Read);
}

/// A text that ends with parentheses open is rejected by PostgreSQL; it is
/// never a read, so that joining it to a read by `;` cannot change what it
/// was (tests/fuzz/, reads_compose: `SHOW nextval(` and `SELECT`).
#[test]
fn parentheses_left_open_are_never_a_read() {
    for sql in ["SHOW nextval(", "SHOW nextval(\n;\nSELECT", "SHOW x((y)"] {
        assert_eq!(class(sql), Class::Write, "{sql:?}");
    }
    assert_eq!(class("SHOW x"), Class::Read);
}

#[test]
fn class_helpers() {
    assert!(Class::Read.is_read());
    assert!(!Class::Session.is_read());
    assert_eq!(class("SELECT 1"), Class::Read);
}
