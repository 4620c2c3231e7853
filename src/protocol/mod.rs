//! The PostgreSQL v3 wire protocol, as far as pgmux needs it. No I/O here:
//! frame splitting over byte buffers, and the few messages pgmux reads or writes.
//!
//! Module names say who *sends* the message: `backend` holds what a server
//! sends (pgmux writes these to clients, and reads them from Postgres),
//! `frontend` what a client sends.

pub mod backend;
pub mod frame;
pub mod frontend;
pub mod sqlstate;
pub mod startup;

/// Message tags, named so the relay reads as prose.
pub mod tag {
    // Frontend (client -> server).
    pub const QUERY: u8 = b'Q';
    pub const PARSE: u8 = b'P';
    pub const BIND: u8 = b'B';
    pub const DESCRIBE: u8 = b'D';
    pub const EXECUTE: u8 = b'E';
    pub const CLOSE: u8 = b'C';
    pub const SYNC: u8 = b'S';
    pub const FLUSH: u8 = b'H';
    pub const FUNCTION_CALL: u8 = b'F';
    pub const TERMINATE: u8 = b'X';
    pub const PASSWORD: u8 = b'p';
    pub const COPY_DATA: u8 = b'd';
    pub const COPY_DONE: u8 = b'c';
    pub const COPY_FAIL: u8 = b'f';

    /// A message type Postgres accepts from a logged-in client. Anything else
    /// ends the session with FATAL `08P01` "invalid frontend message type",
    /// right when the server reads it (after answering what came before).
    pub fn is_frontend(tag: u8) -> bool {
        matches!(
            tag,
            QUERY
                | PARSE
                | BIND
                | DESCRIBE
                | EXECUTE
                | CLOSE
                | SYNC
                | FLUSH
                | FUNCTION_CALL
                | TERMINATE
                | COPY_DATA
                | COPY_DONE
                | COPY_FAIL
        )
    }

    // Backend (server -> client).
    pub const AUTHENTICATION: u8 = b'R';
    pub const BACKEND_KEY_DATA: u8 = b'K';
    pub const PARAMETER_STATUS: u8 = b'S';
    pub const READY_FOR_QUERY: u8 = b'Z';
    pub const ERROR_RESPONSE: u8 = b'E';
    pub const NOTICE_RESPONSE: u8 = b'N';
    pub const NOTIFICATION_RESPONSE: u8 = b'A';
    pub const COMMAND_COMPLETE: u8 = b'C';
    pub const ROW_DESCRIPTION: u8 = b'T';
    pub const DATA_ROW: u8 = b'D';
    pub const EMPTY_QUERY_RESPONSE: u8 = b'I';
    pub const NO_DATA: u8 = b'n';
    pub const PORTAL_SUSPENDED: u8 = b's';
    pub const PARSE_COMPLETE: u8 = b'1';
    pub const BIND_COMPLETE: u8 = b'2';
    pub const CLOSE_COMPLETE: u8 = b'3';
    pub const COPY_IN_RESPONSE: u8 = b'G';
    pub const COPY_OUT_RESPONSE: u8 = b'H';
    pub const COPY_BOTH_RESPONSE: u8 = b'W';
    pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';
}
