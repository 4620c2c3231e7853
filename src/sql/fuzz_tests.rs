//! Property tests of the lexer, which is private to the crate. The
//! classifier's own properties, over the public API, are in tests/fuzz/.

use proptest::collection::vec;
use proptest::prelude::*;

use super::corpus::CORPUS;
use super::lex::{Lexer, Tok, block_comment_end};

/// See `cases` in tests/fuzz/main.rs: PROPTEST_CASES, when set, wins.
fn cases(n: u32) -> ProptestConfig {
    ProptestConfig { cases: n, failure_persistence: None, ..ProptestConfig::default() }
}

/// All tokens of `s` up to Eof, and whether the lexer found it ambiguous.
fn tokens(s: &[u8]) -> (Vec<Tok<'_>>, bool) {
    let mut lx = Lexer::new(s);
    let mut out = Vec::new();
    loop {
        match lx.next_tok() {
            Tok::Eof => return (out, lx.ambiguous),
            t => out.push(t),
        }
        // Every token consumes at least one byte.
        assert!(out.len() <= s.len(), "more tokens than bytes in {s:?}");
    }
}

/// The text a token carries, if any.
fn raw<'a>(t: &Tok<'a>) -> Option<&'a [u8]> {
    match *t {
        Tok::Word(w) | Tok::Str(w) | Tok::Num(w) | Tok::QIdent { raw: w, .. } => Some(w),
        _ => None,
    }
}

const BITS: &[&str] = &[
    "select", " ", "\n", "\r", "\t", "'", "''", "\\", "\\'", "e'", "E'", "\"", "\"\"", "U&\"", "u&'", "$", "$$", "$a$",
    "$b$", "$1", "$a", "a$$b", "--", "/*", "*/", "/**/", "/*/", "1", "1e", "1e+", "1.5", "..", ".5", "0x", "0xF",
    "0b1", "_", "(", ")", ";", ",", ".", "é", "\u{a0}",
];

fn sql_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => vec(proptest::sample::select(BITS), 0..24).prop_map(|v| v.concat().into_bytes()),
        1 => vec(any::<u8>(), 0..48),
        1 => (proptest::sample::select(CORPUS), any::<usize>(), vec(proptest::sample::select(BITS), 0..3))
            .prop_map(|((sql, _), at, bits)| {
                // A corpus statement with awkward pieces spliced in.
                let mut s = sql.as_bytes().to_vec();
                let at = at % (s.len() + 1);
                s.splice(at..at, bits.concat().into_bytes());
                s
            }),
    ]
}

/// Marker-free text for comment bodies.
fn comment_text() -> impl Strategy<Value = String> {
    "[^*/]{0,12}"
}

proptest! {
    #![proptest_config(cases(9000))]

    /// The lexer terminates (a token per byte at most), its tokens are
    /// slices of the input in order without overlap, and a word is whole.
    #[test]
    fn lexer_tokens_are_ordered_slices(s in sql_bytes()) {
        let (toks, _) = tokens(&s);
        let base = s.as_ptr() as usize;
        let mut last_end = 0;
        for t in &toks {
            if let Some(r) = raw(t) {
                let start = r.as_ptr() as usize - base;
                prop_assert!(start >= last_end && start + r.len() <= s.len(), "{t:?} out of order");
                last_end = start + r.len();
                if let Tok::Word(w) = t {
                    prop_assert!(!w.is_empty() && super::lex::is_ident_start(w[0]));
                    // The byte after a word cannot continue it.
                    let next = s.get(last_end).copied().unwrap_or(b' ');
                    prop_assert!(!(next.is_ascii_alphanumeric() || next == b'_' || next == b'$' || next >= 0x80));
                }
            }
        }
    }

    /// After an input the lexer finished with certainty, a newline resets
    /// it: `a \n b` lexes as a's tokens then b's.
    #[test]
    fn lexing_is_context_free_after_a_complete_input(a in sql_bytes(), b in sql_bytes()) {
        let (ta, amb_a) = tokens(&a);
        if amb_a {
            return Ok(());
        }
        let (tb, amb_b) = tokens(&b);
        let joined = [&a[..], b"\n", &b[..]].concat();
        let (tj, amb_j) = tokens(&joined);
        prop_assert_eq!(tj, [ta, tb].concat());
        prop_assert_eq!(amb_j, amb_b);
    }

    /// Block comments nest: the end is found after the matching `*/`, and a
    /// comment missing one is unterminated.
    #[test]
    fn block_comments_nest(
        x in comment_text(), y in comment_text(), z in comment_text(), rest in comment_text(), depth in 1..5usize,
    ) {
        let open = format!("/*{x}").repeat(depth);
        let close = format!("{y}*/").repeat(depth);
        let s = format!("{open}{z}{close}{rest}");
        prop_assert_eq!(block_comment_end(s.as_bytes(), 0), Some(open.len() + z.len() + close.len()));
        let cut = format!("{open}{z}{}", format!("{y}*/").repeat(depth - 1));
        prop_assert_eq!(block_comment_end(cut.as_bytes(), 0), None);
    }
}

/// One piece repeated up to 1 MiB lexes in well under a second. Cases are
/// a megabyte each: a hundredth of PROPTEST_CASES (see `run_heavy` in
/// tests/fuzz/).
#[test]
fn lexer_is_linear() {
    let long = std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse::<u32>().ok());
    let mut runner = proptest::test_runner::TestRunner::new(cases(long.map_or(24, |c| (c / 100).max(24))));
    let strategy = (proptest::sample::select(BITS), 1..(1usize << 20));
    let r = runner.run(&strategy, |(piece, n)| {
        let s = piece.repeat(n.min((1 << 20) / piece.len()));
        let started = std::time::Instant::now();
        let _ = tokens(s.as_bytes());
        let took = started.elapsed();
        prop_assert!(took < std::time::Duration::from_secs(1), "{piece:?} x {n}: {took:?}");
        Ok(())
    });
    if let Err(e) = r {
        panic!("{e}\n{runner}");
    }
}
