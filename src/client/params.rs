//! A client's session parameters, kept by pgmux because its backend changes
//! from one transaction to the next.
//!
//! The client's view starts as the server defaults, overlaid with what its
//! startup packet asked for, and follows every ParameterStatus relayed to it.
//! Before a backend serves the client, parameters that differ are set on it.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, LazyLock, Mutex, Weak};

use crate::pool::Backend;

/// Parameters pgmux keeps per client even when the client never set them, so
/// one client's `SET` cannot leak into another's session through a backend.
pub const TRACKED: &[&str] = &[
    "client_encoding",
    "DateStyle",
    "TimeZone",
    "IntervalStyle",
    "application_name",
    "standard_conforming_strings",
    "default_transaction_read_only",
    "search_path",
];

/// Startup keys that are not session parameters.
const NOT_PARAMETERS: &[&str] = &["user", "database"];

pub use crate::pool::backend::{Profile, Setting};

#[derive(Debug, Clone)]
pub struct SessionParams {
    values: Profile,
}

impl Default for SessionParams {
    fn default() -> Self {
        SessionParams { values: intern(Vec::new()) }
    }
}

/// Live profiles by content hash. Entries are weak: a profile goes when its
/// last client and backend drop it; dead entries are swept whenever the
/// table has doubled since the last sweep (amortised O(1) per intern).
struct Interner {
    by_hash: HashMap<u64, Vec<Weak<[Setting]>>>,
    entries: usize,
    sweep_at: usize,
}

static INTERNER: LazyLock<Mutex<Interner>> =
    LazyLock::new(|| Mutex::new(Interner { by_hash: HashMap::new(), entries: 0, sweep_at: 64 }));

/// The shared profile equal to `values`. Runs at login and when a client's
/// settings change, never per transaction.
fn intern(values: Vec<Setting>) -> Profile {
    let mut hasher = std::hash::DefaultHasher::new();
    values.hash(&mut hasher);
    let hash = hasher.finish();
    let mut table = INTERNER.lock().unwrap_or_else(|e| e.into_inner());
    let bucket = table.by_hash.entry(hash).or_default();
    if let Some(found) = bucket.iter().filter_map(Weak::upgrade).find(|p| **p == *values) {
        return found;
    }
    let profile: Profile = values.into();
    bucket.push(Arc::downgrade(&profile));
    table.entries += 1;
    if table.entries >= table.sweep_at {
        table.by_hash.retain(|_, bucket| {
            bucket.retain(|w| w.strong_count() > 0);
            !bucket.is_empty()
        });
        table.entries = table.by_hash.values().map(Vec::len).sum();
        table.sweep_at = (table.entries * 2).max(64);
    }
    profile
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StartupParamError {
    #[error("replication connections are not supported by pgmux")]
    Replication,
    #[error("unsupported startup option {0:?}: only -c name=value and --name=value are accepted")]
    UnsupportedOption(String),
}

impl SessionParams {
    /// The client's initial view: server defaults for [`TRACKED`] names, then
    /// the startup packet's parameters (and `options`' `-c` settings).
    pub fn from_startup(
        server: &[(String, String)],
        startup: &[(String, String)],
    ) -> Result<SessionParams, StartupParamError> {
        let mut values = Vec::new();
        for (k, v) in server {
            if TRACKED.iter().any(|t| t.eq_ignore_ascii_case(k)) {
                set_in(&mut values, k, v);
            }
        }
        for (k, v) in startup {
            if NOT_PARAMETERS.contains(&k.as_str()) {
                continue;
            }
            match k.as_str() {
                "replication" if v != "false" && v != "off" && v != "0" => return Err(StartupParamError::Replication),
                "replication" => {}
                "options" => {
                    for (name, value) in parse_options(v)? {
                        set_in(&mut values, &name, &value);
                    }
                }
                _ => set_in(&mut values, k, &canonical_value(k, v)),
            }
        }
        Ok(SessionParams { values: intern(values) })
    }

    /// The interned profile: equal for clients with equal settings.
    pub fn profile(&self) -> &Profile {
        &self.values
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.values.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| &**v)
    }

    fn set(&mut self, name: &str, value: &str) {
        if self.get(name) == Some(value) {
            return;
        }
        let mut values = self.values.to_vec();
        set_in(&mut values, name, value);
        self.values = intern(values);
    }

    /// A ParameterStatus reached the client: its session now has this value.
    pub fn observe(&mut self, name: &str, value: &str) {
        if self.get(name).is_some() || TRACKED.iter().any(|t| t.eq_ignore_ascii_case(name)) {
            self.set(name, value);
        }
    }

    /// What to announce at login: the server's ParameterStatus set with the
    /// client's own values where it has them.
    pub fn announce(&self, server: &[(String, String)]) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = server.to_vec();
        for (k, v) in self.values.iter() {
            match out.iter_mut().find(|(sk, _)| sk.eq_ignore_ascii_case(k)) {
                Some((_, sv)) => v.as_ref().clone_into(sv),
                // Only reported parameters are announced; others are applied silently.
                None if TRACKED.iter().any(|t| t.eq_ignore_ascii_case(k)) && &**k != "search_path" => {
                    out.push((k.to_string(), v.to_string()))
                }
                None => {}
            }
        }
        out
    }

    /// Records on `backend` the values a successful `sync_sql` has just set.
    /// Reported parameters are then overwritten by the server's own
    /// ParameterStatus (its canonical spelling); unreported ones keep these.
    pub fn record_on(&self, backend: &mut Backend) {
        for (k, v) in self.values.iter() {
            if backend.param(k) != Some(&**v) {
                backend.set_param(k, v);
            }
        }
    }

    /// Records a value read back from the server after the client changed it.
    pub fn set_read_back(&mut self, name: &str, value: &str) {
        self.set(name, value);
    }

    /// The statement that brings `backend` in line with this session, if it differs.
    /// `set_config` takes each value in its textual form, which is exactly what
    /// ParameterStatus reports (lists such as search_path included). Settings
    /// another client changed on this backend that this client never set are
    /// RESET to the server default.
    pub fn sync_sql(&self, backend: &Backend) -> Option<String> {
        if backend.synced_profile().is_some_and(|p| Arc::ptr_eq(p, &self.values)) {
            return None;
        }
        let mut sql = String::new();
        for (k, v) in self.values.iter() {
            if backend.param(k) == Some(&**v) {
                continue;
            }
            sql.push_str(if sql.is_empty() { "SELECT " } else { ", " });
            sql.push_str("pg_catalog.set_config(");
            push_literal(&mut sql, k);
            sql.push_str(", ");
            push_literal(&mut sql, v);
            sql.push_str(", false)");
        }
        for name in backend.changed_settings() {
            if self.get(name).is_none() {
                if !sql.is_empty() {
                    sql.push_str("; ");
                }
                sql.push_str("RESET ");
                push_ident(&mut sql, name);
            }
        }
        (!sql.is_empty()).then_some(sql)
    }
}

fn set_in(values: &mut Vec<Setting>, name: &str, value: &str) {
    match values.iter_mut().find(|(k, _)| k.eq_ignore_ascii_case(name)) {
        Some((_, v)) => *v = value.into(),
        None => values.push((name.into(), value.into())),
    }
}

/// Spells encoding names the way the server reports them (`utf-8` →
/// `UTF8`, `euc-jp` → `EUC_JP`), so clients that compare ParameterStatus
/// values (psycopg does) see what a direct connection would announce.
fn canonical_value(name: &str, value: &str) -> String {
    if name.eq_ignore_ascii_case("client_encoding") {
        return canonical_encoding(value).map_or_else(|| value.to_owned(), str::to_owned);
    }
    value.to_owned()
}

/// Postgres' encoding names and common aliases, compared as Postgres does:
/// case-insensitively, ignoring everything but letters and digits.
fn canonical_encoding(value: &str) -> Option<&'static str> {
    const NAMES: &[&str] = &[
        "SQL_ASCII",
        "EUC_JP",
        "EUC_CN",
        "EUC_KR",
        "EUC_TW",
        "EUC_JIS_2004",
        "UTF8",
        "MULE_INTERNAL",
        "LATIN1",
        "LATIN2",
        "LATIN3",
        "LATIN4",
        "LATIN5",
        "LATIN6",
        "LATIN7",
        "LATIN8",
        "LATIN9",
        "LATIN10",
        "WIN1256",
        "WIN1258",
        "WIN866",
        "WIN874",
        "KOI8R",
        "WIN1251",
        "WIN1252",
        "ISO_8859_5",
        "ISO_8859_6",
        "ISO_8859_7",
        "ISO_8859_8",
        "WIN1250",
        "WIN1253",
        "WIN1254",
        "WIN1255",
        "WIN1257",
        "KOI8U",
        "SJIS",
        "BIG5",
        "GBK",
        "UHC",
        "GB18030",
        "JOHAB",
        "SHIFT_JIS_2004",
    ];
    const ALIASES: &[(&str, &str)] = &[
        ("unicode", "UTF8"),
        ("koi8", "KOI8R"),
        ("shiftjis", "SJIS"),
        ("mskanji", "SJIS"),
        ("win", "WIN1251"),
        ("alt", "WIN866"),
        ("tcvn", "WIN1258"),
        ("tcvn5712", "WIN1258"),
        ("vscii", "WIN1258"),
        ("abc", "WIN1258"),
        ("iso88591", "LATIN1"),
        ("iso88592", "LATIN2"),
        ("iso88593", "LATIN3"),
        ("iso88594", "LATIN4"),
        ("iso88599", "LATIN5"),
        ("iso885910", "LATIN6"),
        ("iso885913", "LATIN7"),
        ("iso885914", "LATIN8"),
        ("iso885915", "LATIN9"),
        ("iso885916", "LATIN10"),
    ];
    let squash =
        |s: &str| s.chars().filter(char::is_ascii_alphanumeric).map(|c| c.to_ascii_lowercase()).collect::<String>();
    let wanted = squash(value);
    NAMES
        .iter()
        .copied()
        .find(|n| squash(n) == wanted)
        .or_else(|| ALIASES.iter().find(|(alias, _)| *alias == wanted).map(|(_, n)| *n))
        .or_else(|| {
            wanted.strip_prefix("windows").and_then(|n| NAMES.iter().copied().find(|c| squash(c) == format!("win{n}")))
        })
}

/// A string literal safe whatever `standard_conforming_strings` is: the E''
/// form with both quote and backslash escaped.
fn push_literal(out: &mut String, s: &str) {
    out.push_str("E'");
    for c in s.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            '\0' => {}
            c => out.push(c),
        }
    }
    out.push('\'');
}

/// A double-quoted identifier.
fn push_ident(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\"\""),
            '\0' => {}
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Parses the startup `options` value: `-c name=value` and `--name=value`,
/// separated by spaces, with backslash escaping a space (libpq's convention).
pub fn parse_options(options: &str) -> Result<Vec<(String, String)>, StartupParamError> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => word.extend(chars.next()),
            c if c.is_ascii_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    let mut out = Vec::new();
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        let setting = if w == "-c" {
            it.next().ok_or_else(|| StartupParamError::UnsupportedOption(w.clone()))?
        } else if let Some(rest) = w.strip_prefix("--").or_else(|| w.strip_prefix("-c")) {
            rest.to_owned()
        } else {
            return Err(StartupParamError::UnsupportedOption(w));
        };
        let (name, value) =
            setting.split_once('=').ok_or_else(|| StartupParamError::UnsupportedOption(setting.clone()))?;
        // Postgres accepts dashes for underscores in option names.
        out.push((name.replace('-', "_"), value.to_owned()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn options_forms() {
        assert_eq!(
            parse_options(r"-c search_path=a,b --statement-timeout=5s -c x=with\ space").unwrap(),
            pairs(&[("search_path", "a,b"), ("statement_timeout", "5s"), ("x", "with space")])
        );
        assert!(matches!(parse_options("-e"), Err(StartupParamError::UnsupportedOption(_))));
        assert!(matches!(parse_options("-c novalue"), Err(StartupParamError::UnsupportedOption(_))));
    }

    #[test]
    fn startup_overlays_server_defaults() {
        let server = pairs(&[("TimeZone", "UTC"), ("server_version", "15"), ("client_encoding", "UTF8")]);
        let startup = pairs(&[
            ("user", "u"),
            ("database", "d"),
            ("client_encoding", "utf-8"),
            ("application_name", "app"),
            ("options", "-c search_path=s1"),
        ]);
        let p = SessionParams::from_startup(&server, &startup).unwrap();
        assert_eq!(p.get("timezone"), Some("UTC"));
        assert_eq!(p.get("client_encoding"), Some("UTF8"));
        assert_eq!(p.get("search_path"), Some("s1"));
        assert_eq!(p.get("server_version"), None);
        assert_eq!(p.get("user"), None);
        let announced = p.announce(&server);
        assert!(announced.contains(&("application_name".into(), "app".into())));
        assert!(announced.contains(&("server_version".into(), "15".into())));
        assert!(!announced.iter().any(|(k, _)| k == "search_path"));
    }

    #[test]
    fn encodings_are_spelled_like_the_server() {
        for (given, want) in [
            ("utf-8", "UTF8"),
            ("euc-jp", "EUC_JP"),
            ("eucjp", "EUC_JP"),
            ("latin1", "LATIN1"),
            ("Windows-1252", "WIN1252"),
            ("sjis", "SJIS"),
            ("Unicode", "UTF8"),
            ("sql_ascii", "SQL_ASCII"),
        ] {
            assert_eq!(canonical_value("client_encoding", given), want, "{given}");
        }
        assert_eq!(canonical_value("client_encoding", "klingon"), "klingon");
    }

    #[test]
    fn equal_settings_share_one_profile() {
        let server = pairs(&[("TimeZone", "UTC"), ("client_encoding", "UTF8")]);
        let startup = pairs(&[("application_name", "profile-test")]);
        let a = SessionParams::from_startup(&server, &startup).unwrap();
        let mut b = SessionParams::from_startup(&server, &startup).unwrap();
        assert!(Arc::ptr_eq(a.profile(), b.profile()), "equal settings, one allocation");
        b.observe("TimeZone", "Europe/Paris");
        assert!(!Arc::ptr_eq(a.profile(), b.profile()));
        assert_eq!(a.get("timezone"), Some("UTC"), "a change is private to its client");
        b.observe("TimeZone", "UTC");
        assert!(Arc::ptr_eq(a.profile(), b.profile()), "back to equal, back to shared");
    }

    #[test]
    fn replication_is_refused() {
        let startup = pairs(&[("replication", "database")]);
        assert_eq!(SessionParams::from_startup(&[], &startup).unwrap_err(), StartupParamError::Replication);
    }

    #[test]
    fn literals_are_escaped() {
        let mut s = String::new();
        push_literal(&mut s, r"it's a \ path");
        assert_eq!(s, r"E'it''s a \\ path'");
    }
}
