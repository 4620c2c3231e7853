//! The untagged packets a client sends before its session starts:
//! SSLRequest, GSSENCRequest, CancelRequest and StartupMessage.

use bytes::{Buf, BytesMut};

pub const SSL_REQUEST_CODE: i32 = 80877103;
pub const GSSENC_REQUEST_CODE: i32 = 80877104;
pub const CANCEL_REQUEST_CODE: i32 = 80877102;
/// Protocol 3.0; minor versions above 0 are negotiated down.
pub const PROTOCOL_3_0: i32 = 196608;

/// Postgres' own bound on a startup packet (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_LEN: usize = 10_000;

#[derive(Debug, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    Cancel { pid: i32, secret: i32 },
    Startup(Startup),
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Startup {
    /// Requested minor protocol version (major is always 3).
    pub minor: u16,
    /// Parameters in the order sent, `_pq_.` options excluded.
    pub params: Vec<(String, String)>,
    /// `_pq_.` protocol options the client asked for; pgmux supports none.
    pub protocol_options: Vec<String>,
}

impl Startup {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StartupError {
    #[error("invalid length of startup packet: {0}")]
    BadLength(usize),
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0")]
    UnsupportedProtocol { major: u16, minor: u16 },
    #[error("invalid startup packet layout: {0}")]
    Malformed(&'static str),
}

impl StartupError {
    /// What Postgres answers with; `None`: it closes without a word.
    pub fn sqlstate(&self) -> Option<crate::protocol::sqlstate::SqlState> {
        use crate::protocol::sqlstate::SqlState;
        match self {
            StartupError::BadLength(_) => None,
            StartupError::UnsupportedProtocol { .. } => Some(SqlState::FEATURE_NOT_SUPPORTED),
            StartupError::Malformed(_) => Some(SqlState::PROTOCOL_VIOLATION),
        }
    }
}

/// Splits one startup-phase packet off `buf`; `Ok(None)` means more bytes are needed.
pub fn split_startup(buf: &mut BytesMut) -> Result<Option<StartupPacket>, StartupError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if !(8..=MAX_STARTUP_LEN).contains(&len) {
        return Err(StartupError::BadLength(len));
    }
    if buf.len() < len {
        buf.reserve(len - buf.len());
        return Ok(None);
    }
    let mut packet = buf.split_to(len);
    packet.advance(4);
    let code = packet.get_i32();
    let packet = match code {
        SSL_REQUEST_CODE => StartupPacket::SslRequest,
        GSSENC_REQUEST_CODE => StartupPacket::GssEncRequest,
        CANCEL_REQUEST_CODE => {
            if packet.len() != 8 {
                return Err(StartupError::Malformed("cancel request must be 16 bytes"));
            }
            StartupPacket::Cancel { pid: packet.get_i32(), secret: packet.get_i32() }
        }
        _ => {
            let (major, minor) = ((code >> 16) as u16, code as u16);
            if major != 3 {
                return Err(StartupError::UnsupportedProtocol { major, minor });
            }
            StartupPacket::Startup(parse_params(minor, &packet)?)
        }
    };
    Ok(Some(packet))
}

fn parse_params(minor: u16, mut body: &[u8]) -> Result<Startup, StartupError> {
    let mut startup = Startup { minor, ..Startup::default() };
    loop {
        let name = take_cstr(&mut body)?;
        if name.is_empty() {
            break;
        }
        let value = take_cstr(&mut body)?;
        if let Some(option) = name.strip_prefix("_pq_.") {
            startup.protocol_options.push(format!("_pq_.{option}"));
        } else {
            startup.params.push((name, value));
        }
    }
    if !body.is_empty() {
        return Err(StartupError::Malformed("bytes after the parameter list"));
    }
    Ok(startup)
}

fn take_cstr(body: &mut &[u8]) -> Result<String, StartupError> {
    let end = memchr::memchr(0, body).ok_or(StartupError::Malformed("expected terminator as last byte"))?;
    let s = std::str::from_utf8(&body[..end]).map_err(|_| StartupError::Malformed("invalid UTF-8"))?;
    *body = &body[end + 1..];
    Ok(s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    fn packet(code: i32, body: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        b.put_i32(8 + body.len() as i32);
        b.put_i32(code);
        b.put_slice(body);
        b
    }

    #[test]
    fn startup_with_params_and_pq_options() {
        let mut b = packet(PROTOCOL_3_0 + 2, b"user\0app\0_pq_.x\0y\0database\0db\0\0");
        let Some(StartupPacket::Startup(s)) = split_startup(&mut b).unwrap() else { panic!() };
        assert_eq!(s.minor, 2);
        assert_eq!(s.param("user"), Some("app"));
        assert_eq!(s.param("database"), Some("db"));
        assert_eq!(s.protocol_options, vec!["_pq_.x".to_owned()]);
        assert!(b.is_empty());
    }

    #[test]
    fn ssl_and_cancel() {
        assert_eq!(split_startup(&mut packet(SSL_REQUEST_CODE, b"")).unwrap(), Some(StartupPacket::SslRequest));
        let mut c = packet(CANCEL_REQUEST_CODE, &[0, 0, 0, 7, 0, 0, 0, 9]);
        assert_eq!(split_startup(&mut c).unwrap(), Some(StartupPacket::Cancel { pid: 7, secret: 9 }));
    }

    #[test]
    fn malformed_packets_are_errors() {
        let mut huge = BytesMut::from(&[0x7f, 0xff, 0xff, 0xff][..]);
        assert_eq!(split_startup(&mut huge), Err(StartupError::BadLength(0x7fff_ffff)));
        assert!(split_startup(&mut packet(PROTOCOL_3_0, b"user\0app")).is_err());
        assert!(split_startup(&mut packet(2 << 16, b"\0")).is_err());
        assert_eq!(split_startup(&mut BytesMut::from(&b"\0\0"[..])), Ok(None));
    }
}
