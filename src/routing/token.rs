//! Read-your-writes tokens: a commit's WAL position handed to the client
//! (`pgmux.write_lsn`) and presented back by any later connection, through
//! any pgmux instance (`pgmux.read_after`), so its reads see that commit.
//!
//! The text is `<timeline>/<lsn>`, the LSN spelled as Postgres spells it:
//! `1/0/3000148`. Positions compare only within one timeline.

use super::monitor::parse_lsn;
use super::route::Position;

/// The ParameterStatus pgmux sends after a transaction that wrote.
pub const WRITE_LSN: &str = "pgmux.write_lsn";
/// The setting (SET, startup option) a session asks for tokens with. Off
/// by default: a token costs the commit a round trip, and a session that
/// never reads one should get only the messages Postgres would send.
pub const WRITE_TOKEN: &str = "pgmux.write_token";
/// The setting (SET, startup option) a client presents a token with.
pub const READ_AFTER: &str = "pgmux.read_after";

/// `position` as a token.
pub fn format(position: Position) -> String {
    format!("{}/{:X}/{:X}", position.timeline, position.lsn >> 32, position.lsn & 0xFFFF_FFFF)
}

/// Text that is not a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed;

/// A token's position; `Ok(None)` for the empty value (no token: what
/// RESET leaves). `Err` for anything else that is not a token.
pub fn parse(text: &str) -> Result<Option<Position>, Malformed> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    // Digits and slashes only: the integer parsers would also take a sign.
    if !text.bytes().all(|b| b.is_ascii_hexdigit() || b == b'/') {
        return Err(Malformed);
    }
    let (timeline, lsn) = text.split_once('/').ok_or(Malformed)?;
    let timeline: u32 = timeline.parse().map_err(|_| Malformed)?;
    if timeline == 0 {
        return Err(Malformed);
    }
    Ok(Some(Position { timeline, lsn: parse_lsn(lsn).ok_or(Malformed)? }))
}

/// The token of a `/* pgmux:after=TOKEN */` (or `-- pgmux:after=TOKEN`)
/// first comment: `None` without one, `Some(Err(text))` for a malformed one.
pub fn after_hint(sql: &[u8]) -> Option<Result<Position, String>> {
    let (key, value) = crate::sql::directive(sql)?.split_at_checked(5)?;
    if !key.eq_ignore_ascii_case(b"after") {
        return None;
    }
    let value = value.trim_ascii_start().strip_prefix(b"=")?;
    let text = String::from_utf8_lossy(value).trim().to_owned();
    Some(match std::str::from_utf8(value).ok().map(parse) {
        Some(Ok(Some(p))) => Ok(p),
        _ => Err(text),
    })
}

/// A boolean setting's value as Postgres reads one (`on`, `off`, `true`,
/// `false`, `yes`, `no`, `1`, `0`, unambiguous prefixes of the words).
pub fn parse_bool(text: &str) -> Option<bool> {
    let t = text.trim().to_ascii_lowercase();
    let prefix_of = |word: &str, min: usize| t.len() >= min && word.starts_with(t.as_str());
    if t == "1" || prefix_of("true", 1) || prefix_of("yes", 1) || t == "on" {
        Some(true)
    } else if t == "0" || prefix_of("false", 1) || prefix_of("no", 1) || prefix_of("off", 2) {
        Some(false)
    } else {
        None
    }
}

/// Postgres's message for a boolean setting given something else.
pub fn not_boolean(name: &str) -> String {
    format!("parameter \"{name}\" requires a Boolean value")
}

/// Whether a session with `value` for [`WRITE_TOKEN`] gets tokens.
pub fn wants_tokens(value: Option<&str>) -> bool {
    value.and_then(parse_bool).unwrap_or(false)
}

/// What is wrong with `value` for pgmux's setting `name` (`None`: nothing,
/// or not a pgmux setting): the message of Postgres's 22023 for it.
pub fn check(name: &str, value: &str) -> Option<String> {
    if name.eq_ignore_ascii_case(READ_AFTER) {
        parse(value).is_err().then(|| invalid(READ_AFTER, value))
    } else if name.eq_ignore_ascii_case(WRITE_TOKEN) {
        parse_bool(value).is_none().then(|| not_boolean(WRITE_TOKEN))
    } else {
        None
    }
}

/// The value of a `SET [SESSION | LOCAL] name {= | TO} value` statement
/// (one, alone in `sql`) of one of pgmux's settings: what Postgres would
/// check against the setting's syntax before it succeeds. `None` for
/// anything else.
pub fn set_value(sql: &[u8]) -> Option<(&'static str, String)> {
    let text = std::str::from_utf8(sql).ok()?.trim().trim_end_matches(';').trim_end();
    let mut words = text.splitn(2, char::is_whitespace);
    if !words.next()?.eq_ignore_ascii_case("set") {
        return None;
    }
    let mut rest = words.next()?.trim_start();
    for scope in ["session ", "local "] {
        if rest.get(..scope.len()).is_some_and(|w| w.eq_ignore_ascii_case(scope)) {
            rest = rest[scope.len()..].trim_start();
        }
    }
    let name = [READ_AFTER, WRITE_TOKEN]
        .into_iter()
        .find(|n| rest.get(..n.len()).is_some_and(|w| w.eq_ignore_ascii_case(n)))?;
    let rest = rest[name.len()..].trim_start();
    let value = if let Some(v) = rest.strip_prefix('=') {
        v
    } else if rest.get(..3).is_some_and(|w| w.eq_ignore_ascii_case("to ")) {
        &rest[3..]
    } else {
        return None;
    };
    let value = value.trim();
    // A quoted literal ('' for a quote), or one bare word.
    let inner = value.strip_prefix('\'').and_then(|v| v.strip_suffix('\''));
    let value = match inner {
        Some(v) => v.replace("''", "'"),
        None if !value.contains(['\'', ' ', ';']) => value.to_owned(),
        None => return None,
    };
    Some((name, value))
}

/// The error a malformed token gets: Postgres's own for a bad setting value.
pub fn invalid(name: &str, value: &str) -> String {
    format!("invalid value for parameter \"{name}\": \"{value}\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_bad_ones_are_refused() {
        let p = Position { timeline: 3, lsn: 0x16_B374_D848 };
        assert_eq!(format(p), "3/16/B374D848");
        assert_eq!(parse("3/16/B374D848"), Ok(Some(p)));
        assert_eq!(parse(" 3/16/b374d848 "), Ok(Some(p)));
        assert_eq!(parse(""), Ok(None));
        for bad in ["16/B374D848x", "0/0/1", "x/0/1", "+1/0/1", "1/0", "1", "1/0/1/2", "-1/0/1"] {
            assert_eq!(parse(bad), Err(Malformed), "{bad}");
        }
    }

    #[test]
    fn set_statements_of_the_setting_are_recognised() {
        let v = |s: &str| Some((READ_AFTER, s.to_owned()));
        assert_eq!(set_value(b"SET pgmux.read_after = '1/0/3000148'"), v("1/0/3000148"));
        assert_eq!(set_value(b"set session PGMUX.READ_AFTER to 'x';"), v("x"));
        assert_eq!(set_value(b"SET LOCAL pgmux.read_after = ''"), v(""));
        assert_eq!(set_value(b"SET pgmux.read_after = 1"), v("1"));
        assert_eq!(set_value(b"SET pgmux.write_token = on"), Some((WRITE_TOKEN, "on".to_owned())));
        assert_eq!(check(WRITE_TOKEN, "o"), Some(not_boolean(WRITE_TOKEN)), "ambiguous, as in Postgres");
        assert_eq!(check(WRITE_TOKEN, "of"), None, "off, as in Postgres");
        assert_eq!(check(WRITE_TOKEN, "OFF"), None);
        assert_eq!(check(READ_AFTER, "1/0/1"), None);
        assert_eq!(check("work_mem", "x"), None);
        assert_eq!(set_value(b"SET search_path = x"), None);
        assert_eq!(set_value(b"SET pgmux.read_afterwards = 'x'"), None);
        assert_eq!(set_value(b"SELECT 1"), None);
    }

    #[test]
    fn the_after_hint_is_read_from_the_first_comment_only() {
        let p = Position { timeline: 1, lsn: 0x300_0148 };
        assert_eq!(after_hint(b"/* pgmux:after=1/0/3000148 */ SELECT 1"), Some(Ok(p)));
        assert_eq!(after_hint(b"-- pgmux: after = 1/0/3000148\nSELECT 1"), Some(Ok(p)));
        assert_eq!(after_hint(b"/* pgmux:after=nope */ SELECT 1"), Some(Err("nope".into())));
        assert_eq!(after_hint(b"/* pgmux:primary */ SELECT 1"), None);
        assert_eq!(after_hint(b"SELECT 1 /* pgmux:after=1/0/1 */"), None);
    }
}
