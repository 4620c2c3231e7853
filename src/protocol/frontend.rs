//! Messages a client sends: what pgmux itself writes to Postgres (cleanup,
//! parameter sync, cancel), appended to the caller's buffer.

use bytes::{BufMut, BytesMut};

use super::backend::{put_cstr, write_message};
use super::tag;

pub fn query(buf: &mut BytesMut, sql: &str) {
    write_message(buf, tag::QUERY, |b| put_cstr(b, sql));
}

pub fn sync(buf: &mut BytesMut) {
    write_message(buf, tag::SYNC, |_| {});
}

pub fn terminate(buf: &mut BytesMut) {
    write_message(buf, tag::TERMINATE, |_| {});
}

pub fn copy_fail(buf: &mut BytesMut, reason: &str) {
    write_message(buf, tag::COPY_FAIL, |b| put_cstr(b, reason));
}

/// The 16-byte CancelRequest packet (a startup-phase packet: no tag).
pub fn cancel_request(buf: &mut BytesMut, pid: i32, secret: i32) {
    buf.put_i32(16);
    buf.put_i32(super::startup::CANCEL_REQUEST_CODE);
    buf.put_i32(pid);
    buf.put_i32(secret);
}

/// Parse `name` with a statement body (query, NUL, parameter types), as the
/// client sent it: bytes, not text, since pgmux forwards them unread.
pub fn parse_raw(buf: &mut BytesMut, name: &[u8], body: &[u8]) {
    write_message(buf, tag::PARSE, |b| {
        b.put_slice(name);
        b.put_u8(0);
        b.put_slice(body);
    });
}

/// Close of a prepared statement.
pub fn close_statement(buf: &mut BytesMut, name: &[u8]) {
    write_message(buf, tag::CLOSE, |b| {
        b.put_u8(b'S');
        b.put_slice(name);
        b.put_u8(0);
    });
}

/// Bind with the statement name replaced (the relay renames in place; this
/// builds reference frames for the tests): `portal` and `rest` (everything
/// after the client's statement name) are copied unchanged.
#[cfg(test)]
pub fn bind_raw(buf: &mut BytesMut, portal: &[u8], statement: &[u8], rest: &[u8]) {
    write_message(buf, tag::BIND, |b| {
        b.put_slice(portal);
        b.put_u8(0);
        b.put_slice(statement);
        b.put_u8(0);
        b.put_slice(rest);
    });
}

/// Bind of the unnamed statement to the unnamed portal, without parameters.
pub fn bind_unnamed(buf: &mut BytesMut) {
    // Portal, statement, no parameter formats, no parameters, no result formats.
    write_message(buf, tag::BIND, |b| b.put_slice(&[0, 0, 0, 0, 0, 0, 0, 0]));
}

/// Parse of the unnamed statement from `sql`, parameter types left to the server.
pub fn parse_unnamed(buf: &mut BytesMut, sql: &str) {
    write_message(buf, tag::PARSE, |b| {
        b.put_u8(0);
        put_cstr(b, sql);
        b.put_i16(0);
    });
}

/// Bind of the unnamed statement to the unnamed portal with text parameters.
pub fn bind_text_params(buf: &mut BytesMut, params: &[&str]) {
    write_message(buf, tag::BIND, |b| {
        // Portal, statement, no format codes (all text).
        b.put_slice(&[0, 0, 0, 0]);
        b.put_i16(params.len() as i16);
        for p in params {
            b.put_i32(p.len() as i32);
            b.put_slice(p.as_bytes());
        }
        // No result format codes: all text.
        b.put_i16(0);
    });
}

/// Execute of the unnamed portal, all rows.
pub fn execute_unnamed(buf: &mut BytesMut) {
    write_message(buf, tag::EXECUTE, |b| b.put_slice(&[0, 0, 0, 0, 0]));
}
