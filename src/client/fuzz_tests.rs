//! Property tests of the statement-name helpers the relay rewrites frames
//! with. A unit module because `protocol::frontend::bind_raw` exists only
//! under `cfg(test)`.

use bytes::BytesMut;
use proptest::collection::vec;
use proptest::prelude::*;

use super::statements::{cstr, rename, splice, statement_target};
use crate::protocol::frame::{HEADER_LEN, Header, MAX_MESSAGE_LEN, split_frame};
use crate::protocol::frontend::{
    bind_raw as write_bind, close_statement as write_close_statement, parse_raw as write_parse,
};
use crate::sql::statements::{StatementCommand, statement_command};
use std::borrow::Cow;

/// See `cases` in tests/fuzz/main.rs: PROPTEST_CASES, when set, wins.
fn cases(n: u32) -> ProptestConfig {
    ProptestConfig { cases: n, failure_persistence: None, ..ProptestConfig::default() }
}

/// A statement or portal name as it arrives: any bytes but NUL (cstr
/// splits at the first one).
fn name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        vec(1..=255u8, 0..12),
        "[a-z_][a-z0-9_]{0,8}".prop_map(String::into_bytes),
        Just(b"pgmux_noop".to_vec()),
    ]
}

/// Which frame carries the name, built with the writers the relay uses.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Parse,
    Bind,
    Describe,
    Close,
}

/// The frame of `kind` naming `name`, and where the name sits in it.
fn build(kind: Kind, name: &[u8], portal: &[u8], rest: &[u8]) -> (Vec<u8>, usize) {
    let mut out = BytesMut::new();
    let at = match kind {
        Kind::Parse => {
            write_parse(&mut out, name, rest);
            HEADER_LEN
        }
        Kind::Bind => {
            write_bind(&mut out, portal, name, rest);
            HEADER_LEN + portal.len() + 1
        }
        Kind::Describe => {
            // Describe has no writer: the same layout as Close, another tag.
            write_close_statement(&mut out, name);
            out[0] = b'D';
            HEADER_LEN + 1
        }
        Kind::Close => {
            write_close_statement(&mut out, name);
            HEADER_LEN + 1
        }
    };
    (out.to_vec(), at)
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![Just(Kind::Parse), Just(Kind::Bind), Just(Kind::Describe), Just(Kind::Close)]
}

proptest! {
    #![proptest_config(cases(6000))]

    /// cstr splits at the first NUL, or finds none; statement_target names
    /// a statement only for an `S` body, and then a NUL-free prefix of it.
    #[test]
    fn cstr_and_statement_target_total(body in vec(prop_oneof![Just(0u8), Just(b'S'), Just(b'P'), any::<u8>()], 0..24)) {
        match cstr(&body) {
            Some((s, rest)) => {
                prop_assert!(!s.contains(&0));
                prop_assert_eq!([s, &[0], rest].concat(), body.clone());
            }
            None => prop_assert!(!body.contains(&0)),
        }
        if let Some(name) = statement_target(&body) {
            prop_assert_eq!(body[0], b'S');
            prop_assert!(!name.contains(&0) && body[1..].starts_with(name));
        } else {
            prop_assert!(body.first() != Some(&b'S'));
        }
    }

    /// splice replaces exactly `buf[start..end]` and returns the end of
    /// what it put there.
    #[test]
    fn splice_replaces_exactly(buf in vec(any::<u8>(), 0..32), a in any::<usize>(), b in any::<usize>(), with in vec(any::<u8>(), 0..16)) {
        let (start, end) = { let (a, b) = (a % (buf.len() + 1), b % (buf.len() + 1)); (a.min(b), a.max(b)) };
        let mut bytes = BytesMut::from(&buf[..]);
        let new_end = splice(&mut bytes, start, end, &with);
        prop_assert_eq!(new_end, start + with.len());
        prop_assert_eq!(&bytes[..], &[&buf[..start], &with[..], &buf[end..]].concat()[..]);
    }

    /// The writers' frames read back: one whole frame, whose length field
    /// is right and whose names and rest come out as written.
    #[test]
    fn writers_round_trip(name in name(), portal in name(), rest in vec(any::<u8>(), 0..24)) {
        let mut out = BytesMut::new();
        write_parse(&mut out, &name, &rest);
        write_bind(&mut out, &portal, &name, &rest);
        write_close_statement(&mut out, &name);
        let (t, body) = split_frame(&mut out, MAX_MESSAGE_LEN).unwrap().unwrap();
        prop_assert_eq!(t, b'P');
        prop_assert_eq!(cstr(&body), Some((&name[..], &rest[..])));
        let (t, body) = split_frame(&mut out, MAX_MESSAGE_LEN).unwrap().unwrap();
        prop_assert_eq!(t, b'B');
        let (p, after) = cstr(&body).unwrap();
        prop_assert_eq!(p, &portal[..]);
        prop_assert_eq!(cstr(after), Some((&name[..], &rest[..])));
        let (t, body) = split_frame(&mut out, MAX_MESSAGE_LEN).unwrap().unwrap();
        prop_assert_eq!(t, b'C');
        prop_assert_eq!(statement_target(&body), Some(&name[..]));
        prop_assert!(out.is_empty());
    }

    /// Renaming the statement in a Parse, Bind, Describe or Close frame, with
    /// other bytes before and after it, gives the frame written with the new
    /// name (declared length included) and leaves the other bytes alone.
    /// For a Bind still streaming in (`frame_end` past the buffer), the
    /// buffered part is renamed and the returned end is the new frame end.
    #[test]
    fn rename_gives_the_frame_with_the_new_name(
        kind in kind(),
        old in name(),
        new in name(),
        portal in name(),
        rest in vec(any::<u8>(), 0..24),
        before in vec(any::<u8>(), 0..8),
        after in vec(any::<u8>(), 0..8),
        cut in any::<usize>(),
    ) {
        let (frame, name_at) = build(kind, &old, &portal, &rest);
        let (want, _) = build(kind, &new, &portal, &rest);
        let mut buf = BytesMut::from(&[&before[..], &frame, &after].concat()[..]);
        let start = before.len();
        let end = rename(&mut buf, start, start + frame.len(), start + name_at, start + name_at + old.len(), &new);
        prop_assert_eq!(end, start + want.len());
        prop_assert_eq!(&buf[..], &[&before[..], &want, &after].concat()[..]);
        let h = Header::parse(&buf[start..], MAX_MESSAGE_LEN).unwrap().unwrap();
        prop_assert_eq!(h.frame_len(), want.len());

        // Streaming: only a prefix reaching past the name is buffered.
        let name_end = name_at + old.len() + 1;
        let keep = name_end + cut % (frame.len() - name_end + 1);
        let mut buf = BytesMut::from(&frame[..keep]);
        let end = rename(&mut buf, 0, frame.len(), name_at, name_at + old.len(), &new);
        prop_assert_eq!(end, want.len());
        prop_assert_eq!(&buf[..], &want[..keep + want.len() - frame.len()]);
    }

    /// statement_command never panics; a DEALLOCATE's name is a piece of the
    /// query (folded to lower case, `""` unescaped).
    #[test]
    fn statement_command_total(query in prop_oneof![
        vec(any::<u8>(), 0..32),
        vec(proptest::sample::select(vec![
            &b"deallocate"[..], b"DEALLOCATE", b"prepare", b"all", b"discard", b"ALL", b" ", b"\t", b";", b"\0",
            b"\"", b"\"s1\"", b"s1", b"\xff",
        ]), 0..6).prop_map(|v| v.concat()),
    ]) {
        if let StatementCommand::Deallocate(name) = statement_command(&query) {
            let folded = query.to_ascii_lowercase();
            let piece = |q: &[u8]| q.windows(name.len()).any(|w| w == &name[..]);
            prop_assert!(name.is_empty() || piece(&query) || piece(&folded) || memchr::memmem::find(&query, b"\"\"").is_some());
        }
    }

    /// `DEALLOCATE [PREPARE] name` and `DISCARD ALL` / `DEALLOCATE [PREPARE]
    /// ALL`, in any case and spacing, with `;` and the Query's NUL, are recognised.
    #[test]
    fn statement_commands_recognised(
        name in "[a-z_][a-z0-9_]{0,8}".prop_filter("a keyword", |n| n != "all" && n != "prepare"),
        quoted in any::<bool>(),
        prepare in any::<bool>(),
        upper in any::<bool>(),
        space in "[ \t\n]{1,3}",
        semi in any::<bool>(),
    ) {
        let case = |s: &str| if upper { s.to_uppercase() } else { s.to_owned() };
        let end = format!("{}\0", if semi { ";" } else { "" });
        let prefix = if prepare { format!("{}{space}", case("prepare")) } else { String::new() };
        let target = if quoted { format!("\"{}\"", name.to_uppercase()) } else { name.clone() };
        let q = format!("{space}{}{space}{prefix}{target}{space}{end}", case("deallocate"));
        let want = if quoted { name.to_uppercase() } else { name.clone() };
        prop_assert_eq!(statement_command(q.as_bytes()), StatementCommand::Deallocate(Cow::Borrowed(want.as_bytes())));
        let q = format!("{}{space}{prefix}{}{end}", case("deallocate"), case("all"));
        prop_assert_eq!(statement_command(q.as_bytes()), StatementCommand::DropAll);
        let q = format!("{}{space}{}{end}", case("discard"), case("all"));
        prop_assert_eq!(statement_command(q.as_bytes()), StatementCommand::DropAll);
    }
}

proptest! {
    #![proptest_config(cases(3000))]

    /// unit_sql (the SQL texts routing classifies) over any pending bytes:
    /// never a panic; each text is cut at its NUL, one per inspected message.
    #[test]
    fn unit_sql_total(frames in vec((prop_oneof![Just(b'Q'), Just(b'P'), Just(b'B'), Just(b'D'), Just(b'S'), any::<u8>()], vec(prop_oneof![Just(0u8), Just(b'S'), any::<u8>()], 0..16)), 0..6), tail in vec(any::<u8>(), 0..6)) {
        let mut pending = Vec::new();
        for (tag, body) in &frames {
            pending.push(*tag);
            pending.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
            pending.extend_from_slice(body);
        }
        pending.extend_from_slice(&tail);
        let mut statements = super::statements::ClientStatements::default();
        statements.remember_unnamed(b"SELECT 1\0\0\0", true);
        let parts = super::request::Request::new(&pending).sql(&statements);
        prop_assert!(parts.len() <= frames.len() + 1);
        for p in parts {
            prop_assert!(!p.contains(&0));
        }
    }
}
