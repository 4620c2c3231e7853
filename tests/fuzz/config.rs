//! Configuration parsing and validation.

use super::*;

// ---------------------------------------------------------------------------
// Configuration

/// The shipped example, with a password that must never appear in an error.
pub(crate) fn base_config() -> String {
    include_str!("../../proxy.toml").replace("password = \"postgres\"", "password = \"Pw-7qZ-secret\"")
}

pub(crate) const CONFIG_SECRET: &str = "Pw-7qZ-secret";

/// Values of every type and shape a key could be given, as TOML text
/// (some not TOML at all).
pub(crate) const CONFIG_VALUES: &[&str] = &[
    "\"5s\"",
    "\"0\"",
    "0",
    "\"250ms\"",
    "\"10m\"",
    "\"1h\"",
    "\"2min\"",
    "\"-1s\"",
    "\"1.5s\"",
    "\"5 s\"",
    "\"s\"",
    "\"\"",
    "\"5x\"",
    "\"18446744073709551615h\"",
    "\"18446744073709551615ms\"",
    "\"99999999999999999999s\"",
    "5",
    "-1",
    "1",
    "4294967296",
    "18446744073709551615",
    "9223372036854775807",
    "-9223372036854775808",
    "1e309",
    "nan",
    "-inf",
    "1.5",
    "0x10",
    "true",
    "false",
    "[]",
    "[\"a\"]",
    "[1, \"a\"]",
    "[[]]",
    "{}",
    "{ addr = \"h:1\" }",
    "{ addr = \"h:1\", weight = -1 }",
    "{ addr = \"h:1\", weight = 4294967296 }",
    "{ addr = \"h:1\", extra = 1 }",
    "[\"h:1\", { addr = \"h:2\", weight = 2 }]",
    "\"127.0.0.1:6432\"",
    "\"[::1]:5432\"",
    "\"[::1]\"",
    "\"::1:5432\"",
    "\"h:0\"",
    "\"h:65536\"",
    "\":5432\"",
    "\"a..b:1\"",
    "\"-a:1\"",
    "\"db.internal:5432\"",
    "\"env:\"",
    "\"env:PGMUX_FUZZ_UNSET\"",
    "\"SCRAM-SHA-256$4096:c2FsdA==$AAAA:AAAA\"",
    "\"md5a3556571e93b0d20722ba62be61e8c2d\"",
    "\"\\u0000\"",
    "\"\\n\"",
    "\"é\"",
    "\"transaction\"",
    "\"session\"",
    "\"pin\"",
    "\"error\"",
    "\"allow\"",
    "\"require\"",
    "\"verify-full\"",
    "\"lsn\"",
    "\"window\"",
    "\"user\"",
    "\"random\"",
    "\"scram-sha-256\"",
    "\"md5\"",
    "\"trust\"",
    "\"postgres\"",
    "'literal'",
    "\"\"\"multi\nline\"\"\"",
    "\"unterminated",
    "[1,",
    "{ a = ",
    "1979-05-27T07:32:00Z",
];

pub(crate) const CONFIG_KEYS: &[&str] = &[
    "listen",
    "metrics_listen",
    "workers",
    "pool_mode",
    "max_client_conn",
    "query_wait_timeout",
    "idle_transaction_timeout",
    "query_timeout",
    "max_query_size",
    "server_idle_timeout",
    "server_lifetime",
    "shutdown_timeout",
    "server_connect_timeout",
    "max_prepared_statements",
    "on_session_state",
    "tls_cert",
    "tls_key",
    "tls_mode",
    "server_tls",
    "server_tls_ca",
    "read_write_split",
    "read_your_writes",
    "sticky_window",
    "sticky_scope",
    "max_replica_lag",
    "max_replica_lag_bytes",
    "max_replica_wait",
    "load_balance",
    "monitor_interval",
    "write_functions",
    "users",
    "name",
    "dbname",
    "primary",
    "replicas",
    "hosts",
    "pool_size",
    "min_pool_size",
    "password",
    "server_password",
    "auth",
    "unknown_key",
    "\"quoted key\"",
    "\"new\\nline\"",
    "a.b",
    "é",
];

pub(crate) const CONFIG_LINES: &[&str] = &[
    "[proxy]",
    "[routing]",
    "[admin]",
    "[[databases]]",
    "[[users]]",
    "[databases]",
    "[[proxy]]",
    "[unknown]",
    "name = \"x\"",
    "primary = \"h:1\"",
    "auth = \"trust\"",
    "[",
    "]]",
    "= 1",
    "key =",
    "# comment",
    "",
    "\"k\" = 1",
    "proxy.workers = 2",
    "[[databases]]\nname = \"postgres\"\nprimary = \"h:1\"",
];

#[derive(Debug, Clone)]
pub(crate) enum ConfigEdit {
    SetValue(usize, usize),
    SetKey(usize, usize),
    Delete(usize),
    Duplicate(usize),
    Insert(usize, usize),
    Truncate(usize),
}

pub(crate) fn config_edits() -> impl Strategy<Value = Vec<ConfigEdit>> {
    let edit = prop_oneof![
        6 => (any::<usize>(), 0..CONFIG_VALUES.len()).prop_map(|(l, v)| ConfigEdit::SetValue(l, v)),
        2 => (any::<usize>(), 0..CONFIG_KEYS.len()).prop_map(|(l, k)| ConfigEdit::SetKey(l, k)),
        2 => any::<usize>().prop_map(ConfigEdit::Delete),
        1 => any::<usize>().prop_map(ConfigEdit::Duplicate),
        2 => (any::<usize>(), 0..CONFIG_LINES.len()).prop_map(|(l, i)| ConfigEdit::Insert(l, i)),
        1 => any::<usize>().prop_map(ConfigEdit::Truncate),
    ];
    vec(edit, 1..5)
}

pub(crate) fn edit_config(text: &str, edits: &[ConfigEdit]) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    for e in edits {
        let n = lines.len().max(1);
        match *e {
            ConfigEdit::SetValue(l, v) => {
                if let Some((key, _)) = lines.get(l % n).and_then(|line| line.split_once(" = ")) {
                    lines[l % n] = format!("{key} = {}", CONFIG_VALUES[v]);
                }
            }
            ConfigEdit::SetKey(l, k) => {
                if let Some((_, value)) = lines.get(l % n).and_then(|line| line.split_once(" = ")) {
                    lines[l % n] = format!("{} = {value}", CONFIG_KEYS[k]);
                }
            }
            ConfigEdit::Delete(l) if !lines.is_empty() => {
                lines.remove(l % n);
            }
            ConfigEdit::Duplicate(l) if !lines.is_empty() => lines.insert(l % n, lines[l % n].clone()),
            ConfigEdit::Insert(l, i) => lines.insert(l % (lines.len() + 1), CONFIG_LINES[i].to_owned()),
            ConfigEdit::Truncate(at) => {
                let mut text = lines.join("\n");
                let mut at = at % (text.len() + 1);
                while !text.is_char_boundary(at) {
                    at -= 1;
                }
                text.truncate(at);
                lines = text.lines().map(str::to_owned).collect();
            }
            _ => {}
        }
    }
    lines.join("\n")
}

/// Parses `text`; on error, checks every line of the message starts with
/// `origin:line:col: ` inside the text, and never shows the password.
pub(crate) fn check_config(text: &str) -> Result<(), TestCaseError> {
    match Config::parse(text, "fuzz.toml") {
        Ok(_) => {}
        Err(ConfigError::Invalid(msg)) => {
            prop_assert!(!msg.is_empty());
            let lines = text.split('\n').count();
            for line in msg.lines() {
                let mut parts = line.splitn(4, ':');
                let (origin, l, c) = (parts.next(), parts.next(), parts.next());
                prop_assert_eq!(origin, Some("fuzz.toml"), "no origin: {:?}\nin {:?}", line, msg);
                let l: usize =
                    l.and_then(|l| l.parse().ok()).ok_or_else(|| TestCaseError::fail(format!("line in {line:?}")))?;
                let c: usize =
                    c.and_then(|c| c.parse().ok()).ok_or_else(|| TestCaseError::fail(format!("col in {line:?}")))?;
                prop_assert!((1..=lines).contains(&l) && c >= 1, "{line:?} outside the text");
                prop_assert!(parts.next().is_some_and(|rest| rest.starts_with(' ')), "{line:?}");
            }
            prop_assert!(!msg.contains(CONFIG_SECRET), "password in {msg:?}");
        }
        Err(e) => prop_assert!(false, "parse returned an I/O error: {e}"),
    }
    Ok(())
}

proptest! {
    #![proptest_config(cases(4500))]

    /// The shipped config with values of the wrong type, shape or size,
    /// renamed, deleted, duplicated or inserted keys and tables, or cut
    /// off: a config or errors that each carry `file:line:col:`, never a
    /// panic, never the password.
    #[test]
    fn config_mutations(edits in config_edits()) {
        check_config(&edit_config(&base_config(), &edits))?;
    }

    /// Any text at all: the same.
    #[test]
    fn config_any_text(text in prop_oneof![
        any::<String>(),
        vec(prop_oneof![
            proptest::sample::select(CONFIG_LINES).prop_map(str::to_owned),
            (proptest::sample::select(CONFIG_KEYS), proptest::sample::select(CONFIG_VALUES)).prop_map(|(k, v)| format!("{k} = {v}")),
            any::<String>(),
        ], 0..8).prop_map(|v| v.join("\n")),
    ]) {
        check_config(&text)?;
    }
}

#[test]
pub(crate) fn base_config_is_valid() {
    Config::parse(&base_config(), "fuzz.toml").unwrap();
}
