//! Messages a server sends: writers for what pgmux answers clients itself,
//! and the small readers for what pgmux must understand from Postgres.
//! Writers append to the caller's buffer so several go out in one write.

use bytes::{BufMut, BytesMut};

use super::sqlstate::SqlState;
use super::tag;

/// Appends `tag`, a length placeholder, the body written by `body`, then fills
/// in the length. Bodies pgmux writes are small, so the length always fits.
pub(crate) fn write_message(buf: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    buf.put_u8(tag);
    let len_at = buf.len();
    buf.put_u32(0);
    body(buf);
    let len = (buf.len() - len_at) as u32;
    buf[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
}

/// Appends `s` and a NUL, dropping interior NULs (they would end the field early).
pub(crate) fn put_cstr(buf: &mut BytesMut, s: &str) {
    buf.extend(s.bytes().filter(|&b| b != 0));
    buf.put_u8(0);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

pub fn error_response(buf: &mut BytesMut, severity: Severity, code: SqlState, message: &str) {
    error_response_code(buf, severity, code.code(), message);
}

/// [`error_response`] with a SQLSTATE the server chose (relayed, reworded).
pub fn error_response_code(buf: &mut BytesMut, severity: Severity, code: &str, message: &str) {
    write_message(buf, tag::ERROR_RESPONSE, |b| {
        b.put_u8(b'S');
        put_cstr(b, severity.as_str());
        b.put_u8(b'V');
        put_cstr(b, severity.as_str());
        b.put_u8(b'C');
        put_cstr(b, code);
        b.put_u8(b'M');
        put_cstr(b, message);
        b.put_u8(0);
    });
}

pub fn authentication_ok(buf: &mut BytesMut) {
    write_message(buf, tag::AUTHENTICATION, |b| b.put_u32(0));
}

pub fn authentication_cleartext(buf: &mut BytesMut) {
    write_message(buf, tag::AUTHENTICATION, |b| b.put_u32(3));
}

pub fn authentication_md5(buf: &mut BytesMut, salt: [u8; 4]) {
    write_message(buf, tag::AUTHENTICATION, |b| {
        b.put_u32(5);
        b.put_slice(&salt);
    });
}

pub fn authentication_sasl(buf: &mut BytesMut, mechanisms: &[&str]) {
    write_message(buf, tag::AUTHENTICATION, |b| {
        b.put_u32(10);
        for m in mechanisms {
            put_cstr(b, m);
        }
        b.put_u8(0);
    });
}

pub fn authentication_sasl_continue(buf: &mut BytesMut, data: &[u8]) {
    write_message(buf, tag::AUTHENTICATION, |b| {
        b.put_u32(11);
        b.put_slice(data);
    });
}

pub fn authentication_sasl_final(buf: &mut BytesMut, data: &[u8]) {
    write_message(buf, tag::AUTHENTICATION, |b| {
        b.put_u32(12);
        b.put_slice(data);
    });
}

pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    write_message(buf, tag::PARAMETER_STATUS, |b| {
        put_cstr(b, name);
        put_cstr(b, value);
    });
}

pub fn backend_key_data(buf: &mut BytesMut, pid: i32, secret: i32) {
    write_message(buf, tag::BACKEND_KEY_DATA, |b| {
        b.put_i32(pid);
        b.put_i32(secret);
    });
}

pub fn parse_complete(buf: &mut BytesMut) {
    write_message(buf, tag::PARSE_COMPLETE, |_| {});
}

pub fn ready_for_query(buf: &mut BytesMut, status: u8) {
    write_message(buf, tag::READY_FOR_QUERY, |b| b.put_u8(status));
}

/// Tells a client which minor version and `_pq_.` options this server lacks.
pub fn negotiate_protocol_version(buf: &mut BytesMut, newest_minor: i32, unsupported: &[String]) {
    write_message(buf, tag::NEGOTIATE_PROTOCOL_VERSION, |b| {
        b.put_i32(newest_minor);
        b.put_i32(unsupported.len() as i32);
        for opt in unsupported {
            put_cstr(b, opt);
        }
    });
}

/// Transaction status carried by ReadyForQuery.
pub const IDLE: u8 = b'I';
pub const IN_TRANSACTION: u8 = b'T';
pub const FAILED_TRANSACTION: u8 = b'E';

/// ReadyForQuery (idle) as it is on the wire.
pub const READY_IDLE: [u8; 6] = [tag::READY_FOR_QUERY, 0, 0, 0, 5, IDLE];

/// The fields of an ErrorResponse/NoticeResponse body that pgmux looks at.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ErrorFields {
    pub severity: String,
    pub code: String,
    pub message: String,
}

/// Reads the severity, SQLSTATE and message out of an ErrorResponse body.
/// Tolerates a truncated body (the relay captures only a prefix).
pub fn parse_error_fields(body: &[u8]) -> ErrorFields {
    let mut fields = ErrorFields::default();
    let mut rest = body;
    while let Some((&kind, tail)) = rest.split_first() {
        if kind == 0 {
            break;
        }
        let end = memchr::memchr(0, tail).unwrap_or(tail.len());
        let value = String::from_utf8_lossy(&tail[..end]).into_owned();
        match kind {
            b'V' => fields.severity = value,
            b'S' if fields.severity.is_empty() => fields.severity = value,
            b'C' => fields.code = value,
            b'M' => fields.message = value,
            _ => {}
        }
        rest = tail.get(end + 1..).unwrap_or(&[]);
    }
    fields
}

/// The text values of a DataRow body (NULL as `None`); malformed → empty.
pub fn parse_data_row(body: &[u8]) -> Vec<Option<String>> {
    let mut out = Vec::new();
    let Some(count) = body.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]])) else { return out };
    let mut rest = &body[2..];
    for _ in 0..count {
        let Some(len) = rest.get(..4).map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]])) else { return Vec::new() };
        rest = &rest[4..];
        if len < 0 {
            out.push(None);
            continue;
        }
        let Some(value) = rest.get(..len as usize) else { return Vec::new() };
        out.push(Some(String::from_utf8_lossy(value).into_owned()));
        rest = &rest[len as usize..];
    }
    out
}

/// Splits a ParameterStatus body into name and value.
pub fn parse_parameter_status(body: &[u8]) -> Option<(&str, &str)> {
    let mut parts = body.split(|&b| b == 0);
    let name = std::str::from_utf8(parts.next()?).ok()?;
    let value = std::str::from_utf8(parts.next()?).ok()?;
    Some((name, value))
}

/// Text columns: OID 25, variable length.
const TEXT_OID: u32 = 25;

/// A RowDescription of text columns (format 0, no table).
pub fn row_description(buf: &mut BytesMut, columns: &[&str]) {
    let typed: Vec<(&str, u32, i16)> = columns.iter().map(|&name| (name, TEXT_OID, -1)).collect();
    row_description_typed(buf, &typed);
}

/// A RowDescription of `(name, type OID, type length)` columns, values sent
/// as text (format 0, no table): the admin console declares PgBouncer's types.
pub fn row_description_typed(buf: &mut BytesMut, columns: &[(&str, u32, i16)]) {
    write_message(buf, tag::ROW_DESCRIPTION, |b| {
        b.put_u16(columns.len() as u16);
        for &(name, oid, len) in columns {
            put_cstr(b, name);
            b.put_u32(0); // table OID
            b.put_u16(0); // column number
            b.put_u32(oid);
            b.put_i16(len);
            b.put_i32(-1); // no type modifier
            b.put_u16(0); // text format
        }
    });
}

/// One row of text values; `None` is SQL NULL.
pub fn data_row<S: AsRef<str>>(buf: &mut BytesMut, values: &[Option<S>]) {
    write_message(buf, tag::DATA_ROW, |b| {
        b.put_u16(values.len() as u16);
        for v in values {
            match v {
                Some(v) => {
                    b.put_u32(v.as_ref().len() as u32);
                    b.put_slice(v.as_ref().as_bytes());
                }
                None => b.put_i32(-1),
            }
        }
    });
}

pub fn command_complete(buf: &mut BytesMut, command_tag: &str) {
    write_message(buf, tag::COMMAND_COMPLETE, |b| put_cstr(b, command_tag));
}

pub fn empty_query_response(buf: &mut BytesMut) {
    write_message(buf, tag::EMPTY_QUERY_RESPONSE, |_| {});
}

/// A NOTICE; like [`error_response`] but informational (psql prints it on stderr).
pub fn notice_response(buf: &mut BytesMut, code: SqlState, message: &str) {
    write_message(buf, tag::NOTICE_RESPONSE, |b| {
        b.put_u8(b'S');
        put_cstr(b, "NOTICE");
        b.put_u8(b'V');
        put_cstr(b, "NOTICE");
        b.put_u8(b'C');
        put_cstr(b, code.code());
        b.put_u8(b'M');
        put_cstr(b, message);
        b.put_u8(0);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frame::split_frame;

    #[test]
    fn error_response_round_trips() {
        let mut buf = BytesMut::new();
        error_response(&mut buf, Severity::Fatal, SqlState::INVALID_PASSWORD, "no\0pe");
        let (t, body) = split_frame(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(t, b'E');
        let f = parse_error_fields(&body);
        assert_eq!((f.severity.as_str(), f.code.as_str(), f.message.as_str()), ("FATAL", "28P01", "nope"));
    }

    #[test]
    fn truncated_error_body_is_tolerated() {
        assert_eq!(parse_error_fields(b"SERROR\0C250").code, "250");
        assert_eq!(parse_error_fields(b"").code, "");
    }

    #[test]
    fn parameter_status_parses() {
        assert_eq!(parse_parameter_status(b"TimeZone\0UTC\0"), Some(("TimeZone", "UTC")));
        assert_eq!(parse_parameter_status(b"bad"), None);
    }

    #[test]
    fn result_set_messages_are_well_formed() {
        let mut buf = BytesMut::new();
        row_description(&mut buf, &["a", "bb"]);
        data_row(&mut buf, &[Some("x"), None]);
        command_complete(&mut buf, "SHOW");
        let (t, body) = split_frame(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(t, b'T');
        assert_eq!(&body[..2], &[0, 2]);
        assert_eq!(body.len(), 2 + (2 + 18) + (3 + 18));
        let (t, body) = split_frame(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(t, b'D');
        assert_eq!(&body[..], &[0, 2, 0, 0, 0, 1, b'x', 0xff, 0xff, 0xff, 0xff]);
        let (t, body) = split_frame(&mut buf, 1024).unwrap().unwrap();
        assert_eq!((t, &body[..]), (b'C', &b"SHOW\0"[..]));
        assert!(buf.is_empty());
    }
}
