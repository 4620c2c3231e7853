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

use super::md5;
use super::scram::{self, ScramError, ScramServer, ScramVerifier};
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
) -> Result<(), AuthError> {
    // Unusable secrets still run the full exchange and fail at the end, as
    // Postgres does, so a client learns nothing beyond "wrong password".
    const MISMATCH: &str = "password does not match";
    let (plan, reason) = match (user.auth, secret(user)) {
        (AuthMethod::Trust, _) => return Ok(()),
        (AuthMethod::ScramSha256, Secret::Plain(p)) => {
            (Plan::Scram(ScramServer::new(verifier.get_or_derive(p).await?.clone())), MISMATCH)
        }
        // Like Postgres: method md5 with a SCRAM secret runs SCRAM instead.
        (AuthMethod::ScramSha256 | AuthMethod::Md5, Secret::Scram(v)) => (Plan::Scram(ScramServer::new(v)), MISMATCH),
        (AuthMethod::ScramSha256, Secret::Md5Hash(_)) => {
            (Plan::Scram(ScramServer::mock()), "an md5 hash cannot be used for SCRAM authentication")
        }
        (AuthMethod::ScramSha256, Secret::Unusable(reason)) => (Plan::Scram(ScramServer::mock()), reason),
        (AuthMethod::Md5, Secret::Plain(p)) => (Plan::Md5(Some(md5::stored_hash(p, &user.name))), MISMATCH),
        (AuthMethod::Md5, Secret::Md5Hash(h)) => (Plan::Md5(Some(h.to_owned())), MISMATCH),
        (AuthMethod::Md5, Secret::Unusable(reason)) => (Plan::Md5(None), reason),
    };
    let mut conn = Conn { stream, read_buf };
    let verified = match plan {
        Plan::Scram(server) => conn.scram(server).await?,
        Plan::Md5(stored_hash) => conn.md5(stored_hash.as_deref()).await?,
    };
    if verified { Ok(()) } else { Err(AuthError::Failed { user: user.name.clone(), reason }) }
}

enum Plan {
    Scram(ScramServer),
    /// `None`: run the exchange, then fail.
    Md5(Option<String>),
}

struct Conn<'a, S> {
    stream: &'a mut S,
    read_buf: &'a mut BytesMut,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<'_, S> {
    /// Runs the SASL exchange; `Ok(false)` means a wrong proof.
    async fn scram(&mut self, mut server: ScramServer) -> Result<bool, AuthError> {
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
        Ok(true)
    }

    /// Runs the md5 exchange; `Ok(false)` means a wrong response.
    async fn md5(&mut self, stored_hash: Option<&str>) -> Result<bool, AuthError> {
        let salt = md5::random_salt();
        let mut out = BytesMut::new();
        authentication_md5(&mut out, salt);
        self.send(&out).await?;

        // PasswordMessage: one NUL-terminated string filling the body.
        let mut body = self.read_password_message().await?;
        let response =
            take_cstr(&mut body).filter(|_| body.is_empty()).ok_or_else(|| protocol("invalid password packet size"))?;
        Ok(stored_hash.is_some_and(|h| md5::verify_response(h, salt, &response)))
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

fn scram_verdict(e: ScramError) -> Result<bool, AuthError> {
    match e {
        ScramError::InvalidProof => Ok(false),
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
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
    use postgres_protocol::message::frontend;
    use tokio::io::DuplexStream;

    fn user(auth: AuthMethod, password: Option<&str>) -> UserConfig {
        UserConfig { name: "alice".into(), password: password.map(Into::into), server_password: None, auth }
    }

    /// The test's side of the connection: a hand-driven client.
    struct Client {
        stream: DuplexStream,
        buf: BytesMut,
    }

    impl Client {
        /// Reads one Authentication message: (request code, data).
        async fn auth_request(&mut self) -> (i32, BytesMut) {
            loop {
                if let Some((t, mut body)) = split_frame(&mut self.buf, 1 << 16).unwrap() {
                    assert_eq!(t, tag::AUTHENTICATION);
                    return (body.get_i32(), body);
                }
                assert_ne!(self.stream.read_buf(&mut self.buf).await.unwrap(), 0, "server closed");
            }
        }

        async fn send(&mut self, write: impl FnOnce(&mut BytesMut) -> io::Result<()>) {
            let mut out = BytesMut::new();
            write(&mut out).unwrap();
            self.stream.write_all(&out).await.unwrap();
        }

        /// Runs a SCRAM exchange; returns whether the server sent SASLFinal
        /// (and the client verified it).
        async fn scram(&mut self, password: &str) -> bool {
            self.scram_salt(password).await.0
        }

        /// [`scram`](Self::scram), also returning the salt (`s=`) of the
        /// server-first message: equal salts mean one derived verifier.
        async fn scram_salt(&mut self, password: &str) -> (bool, String) {
            let (code, mechanisms) = self.auth_request().await;
            assert_eq!((code, &mechanisms[..]), (10, &b"SCRAM-SHA-256\0\0"[..]));
            let mut scram = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
            self.send(|b| frontend::sasl_initial_response("SCRAM-SHA-256", scram.message(), b)).await;
            let (code, server_first) = self.auth_request().await;
            assert_eq!(code, 11);
            let salt = std::str::from_utf8(&server_first)
                .unwrap()
                .split(',')
                .find_map(|a| a.strip_prefix("s="))
                .expect("server-first has a salt")
                .to_owned();
            scram.update(&server_first).unwrap();
            self.send(|b| frontend::sasl_response(scram.message(), b)).await;
            // On failure the server writes nothing more and the caller closes.
            let mut probe = self.buf.clone();
            if split_frame(&mut probe, 1 << 16).unwrap().is_none()
                && self.stream.read_buf(&mut self.buf).await.unwrap() == 0
            {
                return (false, salt);
            }
            let (code, server_final) = self.auth_request().await;
            assert_eq!(code, 12);
            scram.finish(&server_final).expect("server signature verifies");
            (true, salt)
        }

        async fn md5(&mut self, password: &str) {
            let (code, salt) = self.auth_request().await;
            assert_eq!(code, 5);
            let response = postgres_protocol::authentication::md5_hash(
                b"alice",
                password.as_bytes(),
                salt[..].try_into().unwrap(),
            );
            self.send(|b| frontend::password_message(response.as_bytes(), b)).await;
        }

        /// Nothing else was written (no AuthenticationOk: the caller sends it).
        async fn assert_no_more(mut self) {
            assert!(self.buf.is_empty());
            assert_eq!(self.stream.read_buf(&mut self.buf).await.unwrap(), 0);
        }
    }

    /// Runs `authenticate_client` against `client_side`, returning the result
    /// once both finish. The server end is dropped when auth returns, so the
    /// client sees EOF.
    async fn run<T, F: Future<Output = T>>(
        user: UserConfig,
        client_side: impl FnOnce(Client) -> F,
    ) -> (Result<(), AuthError>, T) {
        run_with(user, DerivedVerifier::default(), client_side).await
    }

    /// [`run`] with the verifier cache given, to look into afterwards.
    async fn run_with<T, F: Future<Output = T>>(
        user: UserConfig,
        verifier: DerivedVerifier,
        client_side: impl FnOnce(Client) -> F,
    ) -> (Result<(), AuthError>, T) {
        let (mut server, client) = tokio::io::duplex(64 * 1024);
        let server_task = async move {
            let r = authenticate_client(&mut server, &mut BytesMut::new(), &user, &verifier).await;
            drop(server);
            r
        };
        tokio::join!(server_task, client_side(Client { stream: client, buf: BytesMut::new() }))
    }

    fn assert_wrong_password(r: Result<(), AuthError>) {
        let e = r.unwrap_err();
        assert_eq!(e.sqlstate(), SqlState::INVALID_PASSWORD, "{e}");
        assert_eq!(e.message(), r#"password authentication failed for user "alice""#);
    }

    #[tokio::test]
    async fn scram_with_plaintext_password() {
        let (r, client) = run(user(AuthMethod::ScramSha256, Some("pw")), |mut c| async {
            assert!(c.scram("pw").await);
            c
        })
        .await;
        r.unwrap();
        client.assert_no_more().await;
    }

    /// Logs in to `user` with `password` by SCRAM; returns (success, salt).
    async fn scram_login(user: &UserConfig, verifier: &DerivedVerifier, password: &'static str) -> (bool, String) {
        let (r, (ok, salt)) =
            run_with(user.clone(), verifier.clone(), |mut c| async move { c.scram_salt(password).await }).await;
        assert_eq!(r.is_ok(), ok);
        (ok, salt)
    }

    #[tokio::test]
    async fn plaintext_verifier_is_derived_once_per_config() {
        let alice = user(AuthMethod::ScramSha256, Some("pw"));
        let cache = DerivedVerifier::default();
        let (ok, first) = scram_login(&alice, &cache, "pw").await;
        assert!(ok);
        // Later logins, a wrong password and concurrent logins all use the
        // verifier of the first: its salt (random per derivation) comes back.
        assert_eq!(scram_login(&alice, &cache, "pw").await, (true, first.clone()));
        assert_eq!(scram_login(&alice, &cache, "nope").await, (false, first.clone()));
        let dbg = format!("{alice:?} {cache:?}");
        assert!(!dbg.contains("ScramVerifier") && !dbg.contains(&first), "{dbg}");
        let (a, b) = tokio::join!(scram_login(&alice, &cache, "pw"), scram_login(&alice, &cache, "pw"));
        assert_eq!((a, b), ((true, first.clone()), (true, first.clone())));
        // Settings built anew (what a reload does) come with empty caches: derived again.
        let reloaded = crate::settings::Settings::build(crate::config::Config {
            users: vec![alice.clone()],
            ..Default::default()
        })
        .unwrap();
        let (ok, second) = scram_login(&alice, &reloaded.verifier("alice"), "pw").await;
        assert!(ok);
        assert_ne!(second, first);
    }

    /// Many first logins at once: one derivation, on the blocking pool. The
    /// test runtime is single-threaded, so its thread is the runtime thread.
    #[tokio::test]
    async fn concurrent_first_logins_derive_once_off_the_runtime_thread() {
        use std::sync::Mutex;
        use std::sync::atomic::{AtomicUsize, Ordering};

        let cell = DerivedVerifier::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let threads = Arc::new(Mutex::new(Vec::new()));
        let logins = (0..8).map(|_| {
            let (calls, threads) = (calls.clone(), threads.clone());
            cell.get_or_derive_with("pw", move |p| {
                calls.fetch_add(1, Ordering::SeqCst);
                threads.lock().unwrap().push(std::thread::current().id());
                ScramVerifier::from_password(p)
            })
        });
        let verifiers = futures_util::future::join_all(logins).await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_ne!(threads.lock().unwrap()[0], std::thread::current().id(), "derived on the runtime thread");
        let first = verifiers[0].as_ref().unwrap();
        assert!(verifiers.iter().all(|v| std::ptr::eq(*v.as_ref().unwrap(), *first)));
    }

    /// A reload parses a new config; its new password works at once, the old
    /// one no longer does, and the old config (still held by logins that
    /// started before the reload) keeps its own.
    #[tokio::test]
    async fn reloaded_password_is_honoured() {
        let load = |pw: &str| {
            let text = format!(
                "[[databases]]\nname = \"d\"\nprimary = \"127.0.0.1:5432\"\n[[users]]\nname = \"alice\"\npassword = \"{pw}\"\n"
            );
            let config = crate::config::Config::parse(&text, "proxy.toml").unwrap();
            let settings = crate::settings::Settings::build(config).unwrap();
            (settings.user("alice").unwrap().clone(), settings.verifier("alice"))
        };
        let (old, old_cache) = load("old-pw");
        assert!(scram_login(&old, &old_cache, "old-pw").await.0);
        let (new, new_cache) = load("new-pw");
        assert!(scram_login(&new, &new_cache, "new-pw").await.0);
        assert!(!scram_login(&new, &new_cache, "old-pw").await.0);
        assert!(scram_login(&old, &old_cache, "old-pw").await.0);
        assert!(!scram_login(&old, &old_cache, "new-pw").await.0);
    }

    #[tokio::test]
    async fn scram_with_stored_verifier_and_wrong_password() {
        let stored = postgres_protocol::password::scram_sha_256(b"pw");
        let (r, _) = run(user(AuthMethod::ScramSha256, Some(&stored)), |mut c| async {
            assert!(c.scram("pw").await);
            c
        })
        .await;
        r.unwrap();
        let (r, _) = run(user(AuthMethod::ScramSha256, Some(&stored)), |mut c| async {
            assert!(!c.scram("nope").await);
            c
        })
        .await;
        assert_wrong_password(r);
    }

    #[tokio::test]
    async fn scram_user_without_usable_secret_fails_like_a_wrong_password() {
        for password in [None, Some("md54a0a68b43b6cd5cf266fa02f196e2371"), Some("SCRAM-SHA-256$broken")] {
            let u = user(AuthMethod::ScramSha256, password);
            let verifier = DerivedVerifier::default();
            let (r, _) = run_with(u, verifier.clone(), |mut c| async {
                assert!(!c.scram("secret").await);
                c
            })
            .await;
            let e = r.unwrap_err();
            assert!(matches!(e, AuthError::Failed { .. }), "{e}");
            // The log text says why; the client text does not.
            assert!(!e.message().contains('('));
            // The fake exchange derives nothing (no PBKDF2 for such users).
            assert!(!verifier.0.initialized());
        }
    }

    #[tokio::test]
    async fn md5_with_plaintext_hash_and_scram_secret() {
        for password in ["secret", "md54a0a68b43b6cd5cf266fa02f196e2371"] {
            let (r, client) = run(user(AuthMethod::Md5, Some(password)), |mut c| async {
                c.md5("secret").await;
                c
            })
            .await;
            r.unwrap();
            client.assert_no_more().await;
        }
        let (r, _) = run(user(AuthMethod::Md5, Some("secret")), |mut c| async {
            c.md5("wrong").await;
            c
        })
        .await;
        assert_wrong_password(r);
        // As in Postgres, md5 with a SCRAM secret runs SCRAM.
        let stored = postgres_protocol::password::scram_sha_256(b"pw");
        let (r, _) = run(user(AuthMethod::Md5, Some(&stored)), |mut c| async {
            assert!(c.scram("pw").await);
            c
        })
        .await;
        r.unwrap();
    }

    #[tokio::test]
    async fn trust_writes_nothing() {
        let (r, client) = run(user(AuthMethod::Trust, None), |c| async { c }).await;
        r.unwrap();
        client.assert_no_more().await;
    }

    #[tokio::test]
    async fn sasl_initial_response_without_data() {
        let (r, _) = run(user(AuthMethod::ScramSha256, Some("pw")), |mut c| async {
            c.auth_request().await;
            // mechanism, then length -1: no initial response.
            c.send(|b| {
                b.extend_from_slice(b"p\0\0\0\x16SCRAM-SHA-256\0\xff\xff\xff\xff");
                Ok(())
            })
            .await;
            assert_eq!(c.auth_request().await, (11, BytesMut::new()));
            let mut scram = ScramSha256::new(b"pw", ChannelBinding::unsupported());
            c.send(|b| frontend::sasl_response(scram.message(), b)).await;
            let (_, server_first) = c.auth_request().await;
            scram.update(&server_first).unwrap();
            c.send(|b| frontend::sasl_response(scram.message(), b)).await;
            let (code, server_final) = c.auth_request().await;
            assert_eq!(code, 12);
            scram.finish(&server_final).unwrap();
            c
        })
        .await;
        r.unwrap();
    }

    async fn protocol_error(auth: AuthMethod, bytes: &'static [u8]) -> AuthError {
        let (r, _) = run(user(auth, Some("pw")), |mut c| async move {
            c.auth_request().await;
            c.stream.write_all(bytes).await.unwrap();
            c
        })
        .await;
        r.unwrap_err()
    }

    #[tokio::test]
    async fn malformed_messages_are_protocol_violations() {
        let cases: [(AuthMethod, &[u8], &str); 7] = [
            // Length 64 KiB, beyond the 8 KiB bound: refused before reading the body.
            (AuthMethod::ScramSha256, b"p\0\x01\0\0", "exceeds the limit of 8192 bytes"),
            (AuthMethod::Md5, b"p\0\0\0\x03", "invalid message length 3"),
            (AuthMethod::Md5, b"Q\0\0\0\x0dSELECT 1\0", "expected password response, got message type 'Q'"),
            (AuthMethod::Md5, b"p\0\0\0\x07md5", "invalid password packet size"),
            // A mechanism we did not offer.
            (AuthMethod::ScramSha256, b"p\0\0\0\x0ePLAIN\0\0\0\0\0", "invalid SASL authentication mechanism"),
            // Initial-response length 9 but 8 bytes follow.
            (AuthMethod::ScramSha256, b"p\0\0\0\x1eSCRAM-SHA-256\0\0\0\0\x09n,,n=,r=", "malformed SASLInitialResponse"),
            // Well-framed client-first with an empty nonce.
            (AuthMethod::ScramSha256, b"p\0\0\0\x1eSCRAM-SHA-256\0\0\0\0\x08n,,n=,r=", "invalid nonce"),
        ];
        for (auth, bytes, expected) in cases {
            let e = protocol_error(auth, bytes).await;
            assert_eq!(e.sqlstate(), SqlState::PROTOCOL_VIOLATION, "{e}");
            assert!(e.message().contains(expected), "{e}");
        }
    }

    #[tokio::test]
    async fn client_leaving_is_quiet() {
        let (r, _) = run(user(AuthMethod::ScramSha256, Some("pw")), |mut c| async {
            c.auth_request().await;
            c.stream.shutdown().await.unwrap();
            c
        })
        .await;
        assert!(r.unwrap_err().is_client_gone());
        let e = protocol_error(AuthMethod::Md5, b"X\0\0\0\x04").await;
        assert!(e.is_client_gone());
        // A half-sent message, then EOF.
        let (r, _) = run(user(AuthMethod::Md5, Some("pw")), |mut c| async {
            c.auth_request().await;
            c.stream.write_all(b"p\0\0\0\x28md5").await.unwrap();
            c.stream.shutdown().await.unwrap();
            c
        })
        .await;
        assert!(r.unwrap_err().is_client_gone());
    }

    #[tokio::test]
    async fn bytes_past_the_exchange_stay_in_read_buf() {
        const QUERY: &[u8] = b"Q\0\0\0\x0dSELECT 1\0";
        let (mut server, stream) = tokio::io::duplex(4096);
        let u = user(AuthMethod::Md5, Some("secret"));
        let mut read_buf = BytesMut::new();
        let client_task = async {
            let mut c = Client { stream, buf: BytesMut::new() };
            let (_, salt) = c.auth_request().await;
            let response = md5::salted_response(&md5::stored_hash("secret", "alice"), salt[..].try_into().unwrap());
            // Password and a pipelined Query in one write: only the password is auth's.
            let mut out = BytesMut::new();
            frontend::password_message(response.as_bytes(), &mut out).unwrap();
            out.extend_from_slice(QUERY);
            c.stream.write_all(&out).await.unwrap();
            c
        };
        let verifier = DerivedVerifier::default();
        let (r, _client) = tokio::join!(authenticate_client(&mut server, &mut read_buf, &u, &verifier), client_task);
        r.unwrap();
        assert_eq!(&read_buf[..], QUERY);
    }

    /// A real client library end to end: tokio-postgres logs in to
    /// `authenticate_client`, and sees 28P01 with Postgres' text on failure.
    #[tokio::test]
    async fn tokio_postgres_logs_in() {
        use crate::protocol::backend as msg;
        use crate::protocol::startup::{StartupPacket, split_startup};

        let scram_verifier = postgres_protocol::password::scram_sha_256(b"pw");
        let cases = [
            (AuthMethod::ScramSha256, "pw", "pw", true),
            (AuthMethod::ScramSha256, scram_verifier.as_str(), "pw", true),
            (AuthMethod::ScramSha256, "pw", "wrong", false),
            (AuthMethod::Md5, "pw", "pw", true),
            (AuthMethod::Md5, "pw", "wrong", false),
        ];
        for (auth, stored, given, ok) in cases {
            let u = user(auth, Some(stored));
            let (mut server, client) = tokio::io::duplex(4096);
            let server_side = async move {
                let mut buf = BytesMut::new();
                while !matches!(split_startup(&mut buf).unwrap(), Some(StartupPacket::Startup(_))) {
                    assert_ne!(server.read_buf(&mut buf).await.unwrap(), 0);
                }
                let mut out = BytesMut::new();
                match authenticate_client(&mut server, &mut buf, &u, &DerivedVerifier::default()).await {
                    Ok(()) => {
                        msg::authentication_ok(&mut out);
                        msg::parameter_status(&mut out, "server_version", "15.0");
                        msg::backend_key_data(&mut out, 1, 2);
                        msg::ready_for_query(&mut out, msg::IDLE);
                    }
                    Err(e) => msg::error_response(&mut out, msg::Severity::Fatal, e.sqlstate(), &e.message()),
                }
                server.write_all(&out).await.unwrap();
                server
            };
            let mut config = tokio_postgres::Config::new();
            config.user("alice").password(given).dbname("db").ssl_mode(tokio_postgres::config::SslMode::Disable);
            let client_side = config.connect_raw(client, tokio_postgres::NoTls);
            let (_server, result) = tokio::join!(server_side, client_side);
            match result {
                Ok(_) => assert!(ok, "{auth:?} {stored} {given}: logged in"),
                Err(e) => {
                    assert!(!ok, "{auth:?} {stored} {given}: {e}");
                    let db = e.as_db_error().expect("a server error");
                    assert_eq!(db.code().code(), "28P01");
                    assert_eq!(db.message(), r#"password authentication failed for user "alice""#);
                }
            }
        }
    }
}
