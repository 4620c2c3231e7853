//! Property tests of the admin console's command parser and the /metrics
//! request line, both private to their modules.

use proptest::collection::vec;
use proptest::prelude::*;

use super::console::{Reply, parse};
use super::metrics::request_target;
use crate::protocol::sqlstate::SqlState;

/// See `cases` in tests/fuzz/main.rs: PROPTEST_CASES, when set, wins.
fn cases(n: u32) -> ProptestConfig {
    ProptestConfig { cases: n, failure_persistence: None, ..ProptestConfig::default() }
}

/// The console's commands and whether they take an argument (kept in step
/// with `COMMANDS` in console.rs by hand: that table is private).
const COMMANDS: &[(&str, Arg)] = &[
    ("SHOW HELP", Arg::None),
    ("SHOW POOLS", Arg::None),
    ("SHOW NODE_POOLS", Arg::None),
    ("SHOW CLIENTS", Arg::None),
    ("SHOW SERVERS", Arg::None),
    ("SHOW SOCKETS", Arg::None),
    ("SHOW ACTIVE_SOCKETS", Arg::None),
    ("SHOW STATS", Arg::None),
    ("SHOW STATS_TOTALS", Arg::None),
    ("SHOW STATS_AVERAGES", Arg::None),
    ("SHOW TOTALS", Arg::None),
    ("SHOW NODE_STATS", Arg::None),
    ("SHOW DATABASES", Arg::None),
    ("SHOW USERS", Arg::None),
    ("SHOW REPLICAS", Arg::None),
    ("SHOW CONFIG", Arg::None),
    ("SHOW LISTS", Arg::None),
    ("SHOW MEM", Arg::None),
    ("SHOW STATE", Arg::None),
    ("SHOW FDS", Arg::None),
    ("SHOW DNS_HOSTS", Arg::None),
    ("SHOW DNS_ZONES", Arg::None),
    ("SHOW VERSION", Arg::None),
    ("PAUSE", Arg::Optional),
    ("RESUME", Arg::Optional),
    ("KILL_CLIENT", Arg::Required),
    ("SHUTDOWN", Arg::Optional),
    ("RELOAD", Arg::None),
    ("RECONNECT", Arg::Optional),
    ("KILL", Arg::Required),
    ("DISABLE", Arg::Required),
    ("ENABLE", Arg::Required),
    ("SUSPEND", Arg::None),
    ("WAIT_CLOSE", Arg::Optional),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arg {
    None,
    Optional,
    Required,
}

/// Whitespace as `split_whitespace` sees it, ASCII and not.
fn space() -> impl Strategy<Value = String> {
    vec(proptest::sample::select(vec![' ', '\t', '\n', '\r', '\u{a0}', '\u{2003}', '\u{3000}']), 1..3)
        .prop_map(|v| v.into_iter().collect())
}

/// An argument word: no whitespace, not ending in `;` (trailing `;` are trimmed).
fn argument() -> impl Strategy<Value = String> {
    "[^\\s;]([^\\s]{0,10}[^\\s;])?"
}

fn random_case(s: &str, flips: &[bool]) -> String {
    s.chars()
        .zip(flips.iter().copied().chain(std::iter::repeat(false)))
        .map(|(c, f)| if f { c.to_ascii_lowercase() } else { c })
        .collect()
}

type Parsed<'a> = Result<Option<(&'static super::console::Command, Option<&'a str>)>, Reply>;

fn syntax_error(r: &Parsed<'_>) -> bool {
    matches!(r, Err(Reply::Error(SqlState::SYNTAX_ERROR, _)))
}

/// `r` in a form that prints (commands have no Debug).
fn shown<'a>(r: &Parsed<'a>) -> Result<Option<(&'static str, Option<&'a str>)>, String> {
    match r {
        Ok(c) => Ok(c.map(|(c, a)| (c.name, a))),
        Err(e) => Err(format!("{e:?}")),
    }
}

proptest! {
    #![proptest_config(cases(6000))]

    /// Any text is a command, nothing (only whitespace and `;`), or a
    /// syntax error; never a panic.
    #[test]
    fn console_parse_total(query in prop_oneof![
        any::<String>(),
        vec(prop_oneof![
            proptest::sample::select(vec!["show", "SHOW", "pools", "pause", "kill_client", ";", " ", "\u{a0}", "\"", "7"])
                .prop_map(str::to_owned),
            any::<String>(),
        ], 0..5).prop_map(|w| w.concat()),
    ]) {
        let r = parse(&query);
        match &r {
            Ok(None) => prop_assert!(query.chars().all(|c| c == ';' || c.is_whitespace())),
            Ok(Some((c, arg))) => {
                // The command's words, then its argument, are the query's words
                // once trailing `;` and whitespace are dropped.
                let trimmed = query.trim_end_matches(|c: char| c == ';' || c.is_whitespace());
                let words: Vec<&str> = trimmed.split_whitespace().collect();
                let n = c.name.split(' ').count();
                prop_assert!(c.name.split(' ').zip(&words).all(|(a, b)| a.eq_ignore_ascii_case(b)));
                prop_assert_eq!(words.get(n).copied(), *arg);
                prop_assert!(words.len() <= n + 1);
            }
            Err(_) => prop_assert!(syntax_error(&r), "{:?}", shown(&r)),
        }
    }

    /// Every command, in any ASCII case, with any whitespace between and
    /// around its words, an argument where it takes one, and trailing `;`,
    /// parses to itself and its argument; one argument too many or too few
    /// is a syntax error.
    #[test]
    fn console_commands_parse_back(
        which in 0..COMMANDS.len(),
        flips in vec(any::<bool>(), 0..16),
        spaces in vec(space(), 4),
        arg in argument(),
        give_arg in any::<bool>(),
        semis in 0..3usize,
    ) {
        let (name, takes) = COMMANDS[which];
        let words = random_case(name, &flips).split(' ').map(str::to_owned).collect::<Vec<_>>();
        let mut query = format!("{}{}", spaces[0], words.join(&spaces[1]));
        if give_arg {
            query = format!("{query}{}{arg}", spaces[2]);
        }
        query = format!("{query}{}{}", ";".repeat(semis), spaces[3]);
        let r = parse(&query);
        let wants_arg_ok = match takes {
            Arg::None => !give_arg,
            Arg::Optional => true,
            Arg::Required => give_arg,
        };
        if wants_arg_ok {
            let (c, got) = r.unwrap().unwrap();
            prop_assert_eq!(c.name, name);
            prop_assert_eq!(got, give_arg.then_some(arg.as_str()));
        } else {
            prop_assert!(syntax_error(&r), "{:?}: {:?}", query, shown(&r));
        }
        // One word more than any command takes is always refused.
        let extra = format!("{query} {arg} {arg}");
        prop_assert!(syntax_error(&parse(&extra)), "{:?}", extra);
    }

    /// The /metrics request line: any bytes give a method and a path (query
    /// string dropped) without spaces, or nothing; only the first line counts.
    #[test]
    fn metrics_request_line_total(
        head in prop_oneof![
            vec(any::<u8>(), 0..64),
            "(GET|POST|get) ?[ -~]{0,12}( HTTP/1\\.[01]| HTTP/2)?\\r?\\n[ -~]{0,12}".prop_map(String::into_bytes),
        ],
        tail in vec(any::<u8>(), 0..16),
    ) {
        let r = request_target(&head);
        if let Some((method, path)) = r {
            prop_assert!(!method.contains(' ') && !path.contains(' ') && !path.contains('?'));
            let line = head.split(|&b| b == b'\n').next().unwrap();
            prop_assert!(line.windows(7).any(|w| w == b"HTTP/1."));
        }
        // Replacing everything after the first line changes nothing.
        if let Some(nl) = head.iter().position(|&b| b == b'\n') {
            let other = [&head[..=nl], &tail[..]].concat();
            prop_assert_eq!(request_target(&other), r);
        }
    }

    /// A scrape of /metrics, with any query string and headers, is recognised.
    #[test]
    fn metrics_scrape_is_recognised(query in proptest::option::of("[!-~&&[^ ]]{0,16}"), version in 0..2u8, headers in "[ -~\\r\\n]{0,40}") {
        let q = query.map(|q| format!("?{q}")).unwrap_or_default();
        let head = format!("GET /metrics{q} HTTP/1.{version}\r\n{headers}");
        prop_assert_eq!(request_target(head.as_bytes()), Some(("GET", "/metrics")));
    }
}
