//! Cutting the byte stream into protocol frames, looking only at headers.
//!
//! Every regular message is `tag: u8, len: u32 (counts itself), body`. The
//! relay never decodes a body it only forwards: [`Scanner`] walks headers over
//! arbitrary read chunks (a frame may straddle many reads) and reports each
//! frame's tag, capturing the body only for the few tags the caller asks for.

use bytes::{Buf, BytesMut};

/// Tag byte + length field.
pub const HEADER_LEN: usize = 5;

/// Postgres refuses messages longer than this (`PQ_LARGE_MESSAGE_LIMIT`); so do we.
pub const MAX_MESSAGE_LEN: u32 = 0x3fff_ffff;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub tag: u8,
    /// The length field: body length + 4.
    pub len: u32,
}

impl Header {
    /// Reads a header from the start of `buf` without consuming it.
    /// `Ok(None)` means more bytes are needed.
    pub fn parse(buf: &[u8], max_len: u32) -> Result<Option<Header>, FrameError> {
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let tag = buf[0];
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
        Self::check(tag, len, max_len).map(Some)
    }

    fn check(tag: u8, len: u32, max_len: u32) -> Result<Header, FrameError> {
        if len < 4 {
            return Err(FrameError::BadLength { tag, len });
        }
        if len > max_len {
            return Err(FrameError::TooLong { tag, len, max: max_len });
        }
        Ok(Header { tag, len })
    }

    pub fn body_len(&self) -> usize {
        self.len as usize - 4
    }

    pub fn frame_len(&self) -> usize {
        self.len as usize + 1
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("invalid message length {len} for message type '{}'", char::from(*tag))]
    BadLength { tag: u8, len: u32 },
    #[error("message type '{}' of length {len} exceeds the limit of {max} bytes", char::from(*tag))]
    TooLong { tag: u8, len: u32, max: u32 },
    /// Postgres's own words for a message type it does not know.
    #[error("invalid frontend message type {0}")]
    InvalidType(u8),
    /// A message pgmux must hold whole to inspect (a Query's or Parse's SQL)
    /// is larger than `max_query_size`.
    #[error("message type '{}' of length {len} exceeds max_query_size ({limit} bytes)", char::from(*tag))]
    TooLargeToInspect { tag: u8, len: usize, limit: usize },
}

impl FrameError {
    pub fn sqlstate(&self) -> crate::protocol::sqlstate::SqlState {
        use crate::protocol::sqlstate::SqlState;
        match self {
            FrameError::TooLargeToInspect { .. } => SqlState::PROGRAM_LIMIT_EXCEEDED,
            _ => SqlState::PROTOCOL_VIOLATION,
        }
    }
}

/// Splits one whole frame off the front of `buf`: `(tag, body)`.
/// Used outside the relay (startup, auth, backend login) where every frame is
/// small and wanted whole. `max_len` bounds the allocation a peer can cause.
pub fn split_frame(buf: &mut BytesMut, max_len: u32) -> Result<Option<(u8, BytesMut)>, FrameError> {
    let Some(header) = Header::parse(buf, max_len)? else {
        return Ok(None);
    };
    if buf.len() < header.frame_len() {
        buf.reserve(header.frame_len() - buf.len());
        return Ok(None);
    }
    buf.advance(HEADER_LEN);
    Ok(Some((header.tag, buf.split_to(header.body_len()))))
}

/// One whole message in a buffer, borrowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    pub tag: u8,
    pub body: &'a [u8],
    /// Offsets of the message's first byte and just past its last, in the buffer.
    pub start: usize,
    pub end: usize,
}

/// The whole messages at the front of a buffer, in order, without copying
/// (postgres-protocol's `Message::parse` over a borrowed buffer). Stops at
/// the first message not whole yet, whose header [`Messages::incomplete`]
/// reports, or at a header that fails the checks ([`Messages::error`]).
#[derive(Debug, Clone)]
pub struct Messages<'a> {
    buf: &'a [u8],
    pos: usize,
    max_len: u32,
    /// Where iteration stopped: the next message's header, if it arrived.
    stopped: Result<Option<Header>, FrameError>,
}

impl<'a> Messages<'a> {
    pub fn new(buf: &'a [u8], max_len: u32) -> Messages<'a> {
        Messages { buf, pos: 0, max_len, stopped: Ok(None) }
    }

    /// Bytes the messages returned so far take.
    pub fn consumed(&self) -> usize {
        self.pos
    }

    /// After iteration: the header of the message that is not whole yet.
    pub fn incomplete(&self) -> Option<Header> {
        self.stopped.as_ref().ok().copied().flatten()
    }

    /// After iteration: the header check that failed, if one did.
    pub fn error(&self) -> Option<&FrameError> {
        self.stopped.as_ref().err()
    }
}

impl<'a> Iterator for Messages<'a> {
    type Item = Message<'a>;

    fn next(&mut self) -> Option<Message<'a>> {
        let start = self.pos;
        match Header::parse(&self.buf[start..], self.max_len) {
            Ok(Some(h)) if self.buf.len() - start >= h.frame_len() => {
                let end = start + h.frame_len();
                self.pos = end;
                Some(Message { tag: h.tag, body: &self.buf[start + HEADER_LEN..end], start, end })
            }
            stopped => {
                self.stopped = stopped;
                None
            }
        }
    }
}

/// A frame the scanner finished, as reported to its caller.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub tag: u8,
    /// Offset in the current chunk where this frame's header started, when it
    /// started inside this chunk (a long body may span several chunks).
    pub start: Option<usize>,
    /// Offset in the current chunk just past this frame.
    pub end: usize,
    /// The body (or its first [`CAPTURE_LIMIT`] bytes), for captured tags only.
    pub body: Option<&'a [u8]>,
}

/// How many body bytes of a captured frame are kept. Enough for any
/// ParameterStatus pgmux tracks and for the leading fields of an ErrorResponse.
pub const CAPTURE_LIMIT: usize = 8 * 1024;

/// Incremental header walker over a byte stream read in arbitrary chunks.
///
/// It never consumes a partial header: [`Scanner::scan`] returns how many
/// bytes it walked, and the caller keeps the (< 5) remaining bytes in its read
/// buffer for the next round. So every frame's tag is known before any of its
/// bytes are forwarded, while long bodies still stream through without being
/// buffered whole. Owned by one relay direction of one connection.
#[derive(Debug)]
pub struct Scanner {
    max_len: u32,
    /// The frame whose body is being walked, if any.
    current: Option<Header>,
    body_remaining: usize,
    capturing: bool,
    capture: Vec<u8>,
}

impl Scanner {
    pub fn new(max_len: u32) -> Scanner {
        Scanner { max_len, current: None, body_remaining: 0, capturing: false, capture: Vec::new() }
    }

    /// True when no frame is partially walked.
    pub fn at_boundary(&self) -> bool {
        self.current.is_none()
    }

    /// Walks `chunk`, calling `on_frame` for every frame completed in it, and
    /// returns how many bytes were walked (all but a trailing partial header).
    /// `capture(tag)` selects the frames whose body is handed to `on_frame`.
    /// `on_frame` returns `false` to stop right after that frame.
    pub fn scan(
        &mut self,
        chunk: &[u8],
        capture: impl Fn(u8) -> bool,
        mut on_frame: impl FnMut(Frame<'_>) -> bool,
    ) -> Result<usize, FrameError> {
        let mut pos = 0;
        if let Some(header) = self.current {
            let take = self.body_remaining.min(chunk.len());
            if self.capturing {
                let room = CAPTURE_LIMIT.saturating_sub(self.capture.len()).min(take);
                self.capture.extend_from_slice(&chunk[..room]);
            }
            pos = take;
            self.body_remaining -= take;
            if self.body_remaining > 0 {
                return Ok(pos);
            }
            self.current = None;
            let body = self.capturing.then_some(self.capture.as_slice());
            let go_on = on_frame(Frame { tag: header.tag, start: None, end: pos, body });
            self.capturing = false;
            self.capture.clear();
            if !go_on {
                return Ok(pos);
            }
        }
        while let Some(header) = Header::parse(&chunk[pos..], self.max_len)? {
            let start = pos;
            pos += HEADER_LEN;
            let body_len = header.body_len();
            let wanted = capture(header.tag);
            if chunk.len() - pos >= body_len {
                let body = &chunk[pos..pos + body_len];
                pos += body_len;
                let body = wanted.then(|| &body[..body.len().min(CAPTURE_LIMIT)]);
                if !on_frame(Frame { tag: header.tag, start: Some(start), end: pos, body }) {
                    return Ok(pos);
                }
                continue;
            }
            // The body runs past this chunk: remember where we are.
            self.current = Some(header);
            self.capturing = wanted;
            if wanted {
                let take = (chunk.len() - pos).min(CAPTURE_LIMIT);
                self.capture.extend_from_slice(&chunk[pos..pos + take]);
            }
            self.body_remaining = body_len - (chunk.len() - pos);
            return Ok(chunk.len());
        }
        Ok(pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    type Seen = Vec<(u8, Option<usize>, usize, Option<Vec<u8>>)>;

    /// Scans like a relay does: unconsumed bytes are kept for the next chunk.
    fn scan_all(scanner: &mut Scanner, pending: &mut Vec<u8>, chunk: &[u8]) -> Seen {
        pending.extend_from_slice(chunk);
        let mut out = Vec::new();
        let used = scanner
            .scan(
                pending,
                |t| t == b'Z' || t == b'E',
                |f| {
                    out.push((f.tag, f.start, f.end, f.body.map(<[u8]>::to_vec)));
                    true
                },
            )
            .unwrap();
        pending.drain(..used);
        out
    }

    #[test]
    fn header_rejects_short_and_long_lengths() {
        assert_eq!(Header::parse(b"Q\0\0\0\x03", 100), Err(FrameError::BadLength { tag: b'Q', len: 3 }));
        assert_eq!(Header::parse(b"Q\0\0\x01\0", 100), Err(FrameError::TooLong { tag: b'Q', len: 256, max: 100 }));
        assert_eq!(Header::parse(b"Q\0\0", 100), Ok(None));
    }

    #[test]
    fn split_frame_waits_for_whole_frame() {
        let bytes = msg(b'R', b"\0\0\0\0");
        let mut buf = BytesMut::from(&bytes[..7]);
        assert_eq!(split_frame(&mut buf, 1000).unwrap(), None);
        buf.extend_from_slice(&bytes[7..]);
        buf.extend_from_slice(b"Z");
        let (tag, body) = split_frame(&mut buf, 1000).unwrap().unwrap();
        assert_eq!((tag, &body[..]), (b'R', &b"\0\0\0\0"[..]));
        assert_eq!(&buf[..], b"Z");
    }

    #[test]
    fn two_frames_in_one_chunk() {
        let mut chunk = msg(b'C', b"SELECT 1\0");
        chunk.extend(msg(b'Z', b"I"));
        let mut s = Scanner::new(MAX_MESSAGE_LEN);
        let frames = scan_all(&mut s, &mut Vec::new(), &chunk);
        assert_eq!(frames, vec![(b'C', Some(0), 14, None), (b'Z', Some(14), 20, Some(b"I".to_vec()))]);
        assert!(s.at_boundary());
    }

    #[test]
    fn frames_split_at_every_byte() {
        let mut stream = msg(b'D', b"0123456789");
        stream.extend(msg(b'E', b"SERROR\0C25006\0\0"));
        stream.extend(msg(b'Z', b"T"));
        for cut in 0..stream.len() {
            let mut s = Scanner::new(MAX_MESSAGE_LEN);
            let mut pending = Vec::new();
            let mut got = scan_all(&mut s, &mut pending, &stream[..cut]);
            got.extend(scan_all(&mut s, &mut pending, &stream[cut..]));
            let tags: Vec<u8> = got.iter().map(|f| f.0).collect();
            assert_eq!(tags, b"DEZ", "cut at {cut}");
            assert_eq!(got[1].3.as_deref(), Some(&b"SERROR\0C25006\0\0"[..]), "cut at {cut}");
            assert_eq!(got[2].3.as_deref(), Some(&b"T"[..]), "cut at {cut}");
            assert!(s.at_boundary());
        }
    }

    #[test]
    fn partial_header_is_never_consumed() {
        let stream = msg(b'X', b"");
        let mut s = Scanner::new(MAX_MESSAGE_LEN);
        let mut pending = Vec::new();
        for b in &stream[..4] {
            assert!(scan_all(&mut s, &mut pending, std::slice::from_ref(b)).is_empty());
        }
        assert_eq!(pending.len(), 4);
        assert_eq!(scan_all(&mut s, &mut pending, &stream[4..]), vec![(b'X', Some(0), 5, None)]);
    }

    #[test]
    fn bad_length_is_an_error() {
        let mut s = Scanner::new(1024);
        assert!(s.scan(b"Q\xff\xff\xff\xff", |_| false, |_| true).is_err());
        let mut s = Scanner::new(1024);
        assert!(s.scan(b"Q\0\0\0\x02", |_| false, |_| true).is_err());
    }
}
