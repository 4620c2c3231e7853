//! A client's prepared statements, and the frame rewrites that map them onto
//! whatever backend serves the client right now.
//!
//! Names travel in Parse, Bind, Describe and Close. pgmux rewrites only those
//! frames, and only the name; everything else in the stream is forwarded as is.

use std::collections::HashMap;
use std::hash::{BuildHasher, DefaultHasher, RandomState};
use std::sync::{Arc, LazyLock};

use bytes::BytesMut;

use crate::pool::statements::Statement;

/// std's SipHash under keys drawn once per process: no bytes in each
/// client's map (a `RandomState` there costs every idle client 16), and
/// still keyed, so client-chosen statement names cannot flood a bucket.
#[derive(Debug, Clone, Copy, Default)]
struct ProcessKeys;

impl BuildHasher for ProcessKeys {
    type Hasher = DefaultHasher;

    fn build_hasher(&self) -> DefaultHasher {
        static KEYS: LazyLock<RandomState> = LazyLock::new(RandomState::new);
        KEYS.build_hasher()
    }
}

/// Owned by the client task; survives backend changes.
#[derive(Debug, Default)]
pub struct ClientStatements {
    /// The client's name → the interned statement (each entry holds one of
    /// the statement's user counts).
    named: HashMap<Box<[u8]>, Arc<Statement>, ProcessKeys>,
    /// The client's unnamed statement (Parse body after the name), re-created
    /// on a new backend when the client binds it across a Sync.
    pub unnamed: Option<Vec<u8>>,
    /// The remembered unnamed text neither changes settings nor creates
    /// session state: the same text again needs no inspection.
    pub unnamed_plain: bool,
}

impl Drop for ClientStatements {
    fn drop(&mut self) {
        self.clear();
    }
}

impl ClientStatements {
    pub fn get(&self, name: &[u8]) -> Option<&Arc<Statement>> {
        self.named.get(name)
    }

    pub fn insert(&mut self, name: Box<[u8]>, st: Arc<Statement>) {
        st.acquire();
        if let Some(old) = self.named.insert(name, st) {
            old.release();
        }
    }

    pub fn remove(&mut self, name: &[u8]) -> Option<Arc<Statement>> {
        let st = self.named.remove(name)?;
        st.release();
        Some(st)
    }

    pub fn clear(&mut self) {
        for (_, st) in self.named.drain() {
            st.release();
        }
    }

    /// True if `body` is the remembered unnamed text and it is plain.
    pub fn is_plain_unnamed(&self, body: &[u8]) -> bool {
        self.unnamed_plain && self.unnamed.as_deref() == Some(body)
    }

    pub fn remember_unnamed(&mut self, body: &[u8], plain: bool) {
        self.unnamed_plain = plain;
        // Reuse the allocation: unnamed Parse is on the hot path of every
        // extended-protocol query.
        match &mut self.unnamed {
            Some(v) => {
                v.clear();
                v.extend_from_slice(body);
            }
            None => self.unnamed = Some(body.to_vec()),
        }
    }
}

/// Splits a NUL-terminated string off the front of `body`.
pub fn cstr(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = memchr::memchr(0, body)?;
    Some((&body[..end], &body[end + 1..]))
}

/// The statement name a Describe or Close body targets; `None` when it
/// targets a portal (or is malformed, which the server will reject itself).
pub fn statement_target(body: &[u8]) -> Option<&[u8]> {
    match body.split_first() {
        Some((b'S', rest)) => Some(cstr(rest).map(|(n, _)| n).unwrap_or_default()),
        _ => None,
    }
}

/// Replaces `buf[start..end]` with `with`, returning the new end. Shifts the
/// tail in place: no allocation unless the buffer must grow.
pub fn splice(buf: &mut BytesMut, start: usize, end: usize, with: &[u8]) -> usize {
    let old_len = buf.len();
    let new_end = start + with.len();
    if new_end > end {
        let grow = new_end - end;
        buf.resize(old_len + grow, 0);
        buf.copy_within(end..old_len, end + grow);
    } else if new_end < end {
        buf.copy_within(end..old_len, new_end);
        buf.truncate(old_len - (end - new_end));
    }
    buf[start..new_end].copy_from_slice(with);
    new_end
}

/// Replaces the statement name at `buf[name_start..name_end]` inside the
/// frame that starts at `frame_start`, fixing the frame's length field.
/// Returns the new end of the frame, given its old `frame_end`.
pub fn rename(
    buf: &mut BytesMut,
    frame_start: usize,
    frame_end: usize,
    name_start: usize,
    name_end: usize,
    new_name: &[u8],
) -> usize {
    splice(buf, name_start, name_end, new_name);
    let new_end = frame_end + new_name.len() - (name_end - name_start);
    let len = (new_end - frame_start - 1) as u32;
    buf[frame_start + 1..frame_start + 5].copy_from_slice(&len.to_be_bytes());
    new_end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splice_grows_and_shrinks() {
        let mut b = BytesMut::from(&b"aaXXbb"[..]);
        assert_eq!(splice(&mut b, 2, 4, b"YYYY"), 6);
        assert_eq!(&b[..], b"aaYYYYbb");
        assert_eq!(splice(&mut b, 2, 6, b"Z"), 3);
        assert_eq!(&b[..], b"aaZbb");
    }

    #[test]
    fn rename_fixes_the_length() {
        let mut b = BytesMut::new();
        crate::protocol::frontend::bind_raw(&mut b, b"", b"s0", &[0, 0, 0, 0, 0, 0]);
        b.extend_from_slice(b"S\0\0\0\x04");
        let end = rename(&mut b, 0, 15, 6, 8, b"pgmux_1");
        let mut want = BytesMut::new();
        crate::protocol::frontend::bind_raw(&mut want, b"", b"pgmux_1", &[0, 0, 0, 0, 0, 0]);
        assert_eq!(end, want.len());
        assert_eq!(&b[..end], &want[..]);
        assert_eq!(&b[end..], b"S\0\0\0\x04");
    }

    #[test]
    fn bind_rewrite_keeps_everything_but_the_name() {
        let mut out = BytesMut::new();
        crate::protocol::frontend::bind_raw(&mut out, b"", b"pgmux_1", &[0, 0, 0, 0, 0, 0]);
        assert_eq!(&out[..], b"B\0\0\0\x13\0pgmux_1\0\0\0\0\0\0\0");
    }
}
