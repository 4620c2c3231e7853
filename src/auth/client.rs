//! Verifying a connecting client: the async driver around the sans-I/O cores.
//!
//! Runs after the startup packet, before AuthenticationOk: it writes the
//! Authentication* requests and reads the client's `p` messages. The caller
//! sends AuthenticationOk (batched with ParameterStatus, BackendKeyData and
//! ReadyForQuery) on `Ok`, or an ErrorResponse built from the error's
//! [`sqlstate`](AuthError::sqlstate) and [`message`](AuthError::message).
//! The caller also bounds the whole exchange with a timeout, as Postgres'
//! `authentication_timeout` does.

use std::io;
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::Credential;
use super::md5;
use super::scram::{self, ScramError, ScramKeys, ScramServer, ScramVerifier};
use crate::config::{AuthMethod, UserConfig, is_md5_hash};
use crate::protocol::backend::{
    authentication_md5, authentication_sasl, authentication_sasl_continue, authentication_sasl_final,
};
use crate::protocol::frame::split_frame;
use crate::protocol::sqlstate::SqlState;
use crate::protocol::tag;

/// Longest `p` message accepted. A SCRAM client-final is ~150 bytes and a
/// password rarely more than a few dozen; this only stops a peer from making
/// pgmux buffer much before it has proven anything.
pub const MAX_AUTH_MESSAGE_LEN: u32 = 8 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Wrong password, or a user that cannot log in with this method (which
    /// looks the same to the client, as in Postgres). `reason` is for the log.
    #[error("password authentication failed for user \"{user}\" ({reason})")]
    Failed { user: String, reason: &'static str },
    /// The client broke the protocol. The text never quotes client input.
    #[error("{0}")]
    Protocol(String),
    /// EOF, reset or Terminate mid-exchange: routine (libpq disconnects to
    /// prompt for a password), worth at most a debug line.
    #[error("client closed the connection during authentication")]
    ClientGone,
    #[error("I/O error during authentication: {0}")]
    Io(io::Error),
}

impl AuthError {
    pub fn sqlstate(&self) -> SqlState {
        match self {
            AuthError::Failed { .. } => SqlState::INVALID_PASSWORD,
            AuthError::Protocol(_) => SqlState::PROTOCOL_VIOLATION,
            AuthError::ClientGone | AuthError::Io(_) => SqlState::CONNECTION_FAILURE,
        }
    }

    /// The text for the client's ErrorResponse (the log reason left out).
    pub fn message(&self) -> String {
        match self {
            AuthError::Failed { user, .. } => format!("password authentication failed for user \"{user}\""),
            other => other.to_string(),
        }
    }

    /// True when the client simply went away; log it quietly.
    pub fn is_client_gone(&self) -> bool {
        matches!(self, AuthError::ClientGone)
    }
}

impl From<io::Error> for AuthError {
    fn from(e: io::Error) -> AuthError {
        match e.kind() {
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => {
                AuthError::ClientGone
            }
            _ => AuthError::Io(e),
        }
    }
}

/// The SCRAM verifier of a user's plaintext password, derived on the first
/// SCRAM login and kept by that user's [`UserConfig`] (clones share it).
///
/// Deriving costs 4096 PBKDF2 rounds, a few ms of CPU: per login that would
/// be a cost on every connection, and on the runtime thread it would stall
/// every other client of a single-threaded runtime. So it runs once, on the
/// blocking pool. A reload builds new `UserConfig`s with empty cells, so a
/// changed password is derived anew. This relies on `password` never changing
/// after load, which holds: only parsing sets it.
#[derive(Clone, Default)]
pub struct DerivedVerifier(Arc<tokio::sync::OnceCell<ScramVerifier>>);

impl std::fmt::Debug for DerivedVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the verifier itself: it is a password equivalent.
        f.write_str(if self.0.initialized() { "DerivedVerifier(derived)" } else { "DerivedVerifier(empty)" })
    }
}

impl DerivedVerifier {
    async fn get_or_derive(&self, password: &str) -> Result<&ScramVerifier, AuthError> {
        self.get_or_derive_with(password, ScramVerifier::from_password).await
    }

    /// `derive` injected so tests can count and place the derivations.
    async fn get_or_derive_with(
        &self,
        password: &str,
        derive: impl FnOnce(&str) -> ScramVerifier + Send + 'static,
    ) -> Result<&ScramVerifier, AuthError> {
        // Concurrent first logins wait for one derivation rather than each
        // running their own. If the deriving login is dropped (timeout), the
        // next one starts over.
        self.0
            .get_or_try_init(|| {
                let password = password.to_owned();
                async move {
                    tokio::task::spawn_blocking(move || derive(&password))
                        .await
                        .map_err(|e| AuthError::Io(io::Error::other(e)))
                }
            })
            .await
    }
}

/// How the configured password can be used.
enum Secret<'a> {
    Plain(&'a str),
    Scram(ScramVerifier),
    Md5Hash(&'a str),
    /// No password, or a malformed verifier: nobody can log in.
    Unusable(&'static str),
}

fn secret(user: &UserConfig) -> Secret<'_> {
    match user.password.as_deref() {
        None => Secret::Unusable("user has no password configured"),
        Some(p) if p.starts_with("SCRAM-SHA-256$") => match ScramVerifier::parse(p) {
            Some(v) => Secret::Scram(v),
            None => Secret::Unusable("configured SCRAM verifier is malformed"),
        },
        Some(p) if is_md5_hash(p) => Secret::Md5Hash(p),
        Some(p) => Secret::Plain(p),
    }
}

/// Authenticates the client on `stream` as `user`. `read_buf` holds whatever
/// was read past the startup packet and keeps whatever is read past the last
/// auth message. `verifier` caches the SCRAM verifier of a plaintext password
/// ([`crate::settings::Settings::verifier`]).
pub async fn authenticate_client<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    read_buf: &mut BytesMut,
    user: &UserConfig,
    verifier: &DerivedVerifier,
) -> Result<Option<Credential>, AuthError> {
    authenticate_client_rechecked(stream, read_buf, user, verifier, || async { None }).await
}

/// [`authenticate_client`] for a secret that may be stale (a cached
/// auth_query result): when an md5 response does not match, `fresh` is
/// asked once for the current md5 hash, and the same response is checked
/// against it. (A SCRAM proof cannot be checked again: it is bound to the
/// salt already sent, which a new verifier does not share.)
pub async fn authenticate_client_rechecked<S, F, Fut>(
    stream: &mut S,
    read_buf: &mut BytesMut,
    user: &UserConfig,
    verifier: &DerivedVerifier,
    fresh: F,
) -> Result<Option<Credential>, AuthError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Option<String>>,
{
    // Unusable secrets still run the full exchange and fail at the end, as
    // Postgres does, so a client learns nothing beyond "wrong password".
    const MISMATCH: &str = "password does not match";
    let (plan, reason) = match (user.auth, secret(user)) {
        (AuthMethod::Trust, _) => return Ok(None),
        (AuthMethod::ScramSha256, Secret::Plain(p)) => {
            (Plan::Scram(Box::new(ScramServer::new(verifier.get_or_derive(p).await?.clone()))), MISMATCH)
        }
        // Like Postgres: method md5 with a SCRAM secret runs SCRAM instead.
        (AuthMethod::ScramSha256 | AuthMethod::Md5, Secret::Scram(v)) => {
            (Plan::Scram(Box::new(ScramServer::new(v))), MISMATCH)
        }
        (AuthMethod::ScramSha256, Secret::Md5Hash(_)) => {
            (Plan::Scram(Box::new(ScramServer::mock())), "an md5 hash cannot be used for SCRAM authentication")
        }
        (AuthMethod::ScramSha256, Secret::Unusable(reason)) => (Plan::Scram(Box::new(ScramServer::mock())), reason),
        (AuthMethod::Md5, Secret::Plain(p)) => (Plan::Md5(Some(md5::stored_hash(p, &user.name))), MISMATCH),
        (AuthMethod::Md5, Secret::Md5Hash(h)) => (Plan::Md5(Some(h.to_owned())), MISMATCH),
        (AuthMethod::Md5, Secret::Unusable(reason)) => (Plan::Md5(None), reason),
    };
    let mut conn = Conn { stream, read_buf };
    // What the exchange proved lets pgmux log in as the user too.
    let proved = match plan {
        Plan::Scram(server) => conn.scram(server).await?.map(Credential::Scram),
        Plan::Md5(stored_hash) => match conn.md5(stored_hash.as_deref()).await? {
            (true, _, _) => stored_hash.map(Credential::Md5Hash),
            (false, salt, response) => match fresh().await {
                Some(h)
                    if is_md5_hash(&h)
                        && Some(&h) != stored_hash.as_ref()
                        && md5::verify_response(&h, salt, &response) =>
                {
                    Some(Credential::Md5Hash(h))
                }
                _ => None,
            },
        },
    };
    match proved {
        Some(c) => Ok(Some(c)),
        None => Err(AuthError::Failed { user: user.name.clone(), reason }),
    }
}

enum Plan {
    Scram(Box<ScramServer>),
    /// `None`: run the exchange, then fail.
    Md5(Option<String>),
}

struct Conn<'a, S> {
    stream: &'a mut S,
    read_buf: &'a mut BytesMut,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<'_, S> {
    /// Runs the SASL exchange; `Ok(None)` means a wrong proof, `Some` holds
    /// the keys the proof revealed.
    async fn scram(&mut self, mut server: Box<ScramServer>) -> Result<Option<ScramKeys>, AuthError> {
        let mut out = BytesMut::new();
        // Channel binding needs TLS; pgmux offers none, so no -PLUS mechanism.
        authentication_sasl(&mut out, &[scram::MECHANISM]);
        self.send(&out).await?;

        // SASLInitialResponse: mechanism\0, int32 length (-1: none), data.
        let mut body = self.read_password_message().await?;
        let mechanism = take_cstr(&mut body).ok_or_else(|| malformed("SASLInitialResponse"))?;
        if mechanism != scram::MECHANISM.as_bytes() {
            return Err(protocol("client selected an invalid SASL authentication mechanism"));
        }
        if body.len() < 4 {
            return Err(malformed("SASLInitialResponse"));
        }
        let client_first = match body.get_i32() {
            // No initial response: ask for it with an empty challenge, as Postgres does.
            -1 if body.is_empty() => {
                out.clear();
                authentication_sasl_continue(&mut out, b"");
                self.send(&out).await?;
                self.read_password_message().await?
            }
            n if usize::try_from(n).is_ok_and(|n| n == body.len()) => body,
            _ => return Err(malformed("SASLInitialResponse")),
        };

        let server_first = match server.server_first(&client_first) {
            Ok(m) => m,
            Err(e) => return scram_verdict(e),
        };
        out.clear();
        authentication_sasl_continue(&mut out, &server_first);
        self.send(&out).await?;

        // SASLResponse: the whole body is client-final-message.
        let client_final = self.read_password_message().await?;
        let server_final = match server.verify_final(&client_final) {
            Ok(m) => m,
            Err(e) => return scram_verdict(e),
        };
        out.clear();
        authentication_sasl_final(&mut out, &server_final);
        self.send(&out).await?;
        Ok(server.keys().cloned())
    }

    /// Runs the md5 exchange: whether the response matched, and the salt and
    /// response, to check against another hash.
    async fn md5(&mut self, stored_hash: Option<&str>) -> Result<(bool, [u8; 4], BytesMut), AuthError> {
        let salt = md5::random_salt();
        let mut out = BytesMut::new();
        authentication_md5(&mut out, salt);
        self.send(&out).await?;

        // PasswordMessage: one NUL-terminated string filling the body.
        let mut body = self.read_password_message().await?;
        let response =
            take_cstr(&mut body).filter(|_| body.is_empty()).ok_or_else(|| protocol("invalid password packet size"))?;
        let matched = stored_hash.is_some_and(|h| md5::verify_response(h, salt, &response));
        Ok((matched, salt, response))
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), AuthError> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// Reads the next message, which must be a `p` (password/SASL response).
    async fn read_password_message(&mut self) -> Result<BytesMut, AuthError> {
        loop {
            let frame =
                split_frame(self.read_buf, MAX_AUTH_MESSAGE_LEN).map_err(|e| AuthError::Protocol(e.to_string()))?;
            match frame {
                Some((tag::PASSWORD, body)) => return Ok(body),
                Some((tag::TERMINATE, _)) => return Err(AuthError::ClientGone),
                Some((other, _)) => {
                    return Err(AuthError::Protocol(format!(
                        "expected password response, got message type '{}'",
                        other.escape_ascii()
                    )));
                }
                None => {
                    if self.stream.read_buf(self.read_buf).await? == 0 {
                        return Err(AuthError::ClientGone);
                    }
                }
            }
        }
    }
}

fn scram_verdict(e: ScramError) -> Result<Option<ScramKeys>, AuthError> {
    match e {
        ScramError::InvalidProof => Ok(None),
        ScramError::Protocol(m) => Err(protocol(m)),
    }
}

fn protocol(message: &str) -> AuthError {
    AuthError::Protocol(message.to_owned())
}

fn malformed(what: &str) -> AuthError {
    AuthError::Protocol(format!("malformed {what} message"))
}

/// Splits a NUL-terminated string off the front of `body`.
fn take_cstr(body: &mut BytesMut) -> Option<BytesMut> {
    let end = memchr::memchr(0, body)?;
    let s = body.split_to(end);
    body.advance(1);
    Some(s)
}

#[cfg(test)]
mod tests;
