//! The admin console (`psql ... dbname=pgmux`) and, later, `/metrics`.

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::protocol::backend::{self as msg, Severity};
use crate::protocol::frame::split_frame;
use crate::protocol::sqlstate::SqlState;
use crate::protocol::tag;
use crate::server::Shared;

/// The database name that selects the console.
pub const DATABASE: &str = "pgmux";

/// Console commands are short; anything longer is refused.
const MAX_COMMAND_LEN: u32 = 64 * 1024;

/// Serves an authenticated admin user until it disconnects.
pub async fn serve(stream: &mut TcpStream, mut buf: BytesMut, _shared: &Shared, _user: &str) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    msg::authentication_ok(&mut out);
    msg::parameter_status(&mut out, "server_version", "15.0 (pgmux)");
    msg::parameter_status(&mut out, "client_encoding", "UTF8");
    msg::parameter_status(&mut out, "server_encoding", "UTF8");
    msg::parameter_status(&mut out, "standard_conforming_strings", "on");
    msg::ready_for_query(&mut out, msg::IDLE);
    stream.write_all(&out).await?;
    loop {
        let frame = match split_frame(&mut buf, MAX_COMMAND_LEN) {
            Ok(f) => f,
            Err(e) => {
                out.clear();
                msg::error_response(&mut out, Severity::Fatal, SqlState::PROTOCOL_VIOLATION, &e.to_string());
                return stream.write_all(&out).await;
            }
        };
        let Some((t, _body)) = frame else {
            if stream.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
            continue;
        };
        out.clear();
        match t {
            tag::TERMINATE => return Ok(()),
            tag::QUERY => {
                msg::error_response(
                    &mut out,
                    Severity::Error,
                    SqlState::FEATURE_NOT_SUPPORTED,
                    "the admin console has no commands yet",
                );
                msg::ready_for_query(&mut out, msg::IDLE);
            }
            _ => {
                msg::error_response(
                    &mut out,
                    Severity::Fatal,
                    SqlState::PROTOCOL_VIOLATION,
                    "the admin console accepts the simple query protocol only",
                );
                stream.write_all(&out).await?;
                return Ok(());
            }
        }
        stream.write_all(&out).await?;
    }
}
