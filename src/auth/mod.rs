//! Authentication, both sides: clients to pgmux, pgmux to Postgres.
//! TEMPORARY STUB (replaced by the auth branch).

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::config::UserConfig;
use crate::protocol::sqlstate::SqlState;

#[derive(Debug, thiserror::Error)]
#[error("auth stub")]
pub struct AuthError;
impl AuthError {
    pub fn sqlstate(&self) -> SqlState {
        SqlState::INVALID_PASSWORD
    }
}

#[derive(Debug, thiserror::Error)]
#[error("login stub")]
pub struct BackendLoginError;
impl BackendLoginError {
    pub fn sqlstate(&self) -> SqlState {
        SqlState::CONNECTION_FAILURE
    }
}

pub struct ServerHello {
    pub pid: i32,
    pub secret: i32,
    pub params: Vec<(String, String)>,
}

pub async fn authenticate_client<S: AsyncRead + AsyncWrite + Unpin>(
    _stream: &mut S,
    _read_buf: &mut BytesMut,
    _user: &UserConfig,
) -> Result<(), AuthError> {
    Ok(())
}

pub async fn login_backend<S: AsyncRead + AsyncWrite + Unpin>(
    _stream: &mut S,
    _user: &str,
    _database: &str,
    _password: Option<&str>,
    _params: &[(&str, &str)],
) -> Result<ServerHello, BackendLoginError> {
    Err(BackendLoginError)
}
