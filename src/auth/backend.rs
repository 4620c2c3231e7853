//! pgmux logging in to Postgres as a client: startup, authentication, and the
//! ParameterStatus/BackendKeyData that precede the first ReadyForQuery.
//!
//! The SCRAM client is postgres-protocol's. Every frame is read through
//! `split_frame` with a bound, and every malformed or unexpected message is
//! an error, never a panic. The caller bounds the whole login with
//! `server_connect_timeout`.

use std::io;

use bytes::{Buf, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};

use super::Credential;
use super::scram::KeyedScramClient;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::md5;
use crate::protocol::backend::{parse_error_fields, parse_parameter_status};
use crate::protocol::frame::split_frame;
use crate::protocol::sqlstate::SqlState;
use crate::protocol::tag;

/// Longest message accepted from the server during login. Login messages are
/// small; the bound is generous for long NOTICEs (e.g. from login triggers)
/// while still capping what a broken server can make pgmux allocate.
pub const MAX_LOGIN_MESSAGE_LEN: u32 = 1024 * 1024;

/// What Postgres tells a new session before it is ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerHello {
    pub pid: i32,
    pub secret: i32,
    /// ParameterStatus pairs in the order received.
    pub params: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendLoginError {
    /// Postgres refused (ErrorResponse): its SQLSTATE and text, unchanged,
    /// so pgmux can pass them on to the client.
    #[error("server error {code}: {message}")]
    Server { code: String, message: String },
    #[error("server requested {method} authentication but pgmux has no password for this user")]
    NoPassword { method: &'static str },
    #[error("server requested an unsupported authentication method: {0}")]
    UnsupportedAuth(String),
    /// The SCRAM exchange failed on pgmux's side, including a server
    /// signature that does not verify (the server does not know the password).
    #[error("SCRAM authentication with the server failed: {0}")]
    Scram(String),
    #[error("protocol violation by the server: {0}")]
    Protocol(String),
    /// A startup parameter or the password contains a NUL byte, which the
    /// protocol's C strings cannot carry. Only configuration can cause this:
    /// client startup packets are split at NULs already.
    #[error("cannot send the {0} to the server: it contains a NUL byte")]
    NulByte(&'static str),
    #[error("server closed the connection during login")]
    Closed,
    #[error("I/O error during server login: {0}")]
    Io(#[from] io::Error),
}

impl BackendLoginError {
    /// For `Server`, pgmux's typed form of the server's code (exact, or its
    /// class; see [`SqlState::from_code`]); the exact string stays in `code`.
    pub fn sqlstate(&self) -> SqlState {
        match self {
            BackendLoginError::Server { code, .. } => SqlState::from_code(code).unwrap_or(SqlState::CONNECTION_FAILURE),
            _ => SqlState::CONNECTION_FAILURE,
        }
    }

    /// The text for the client's ErrorResponse.
    pub fn message(&self) -> String {
        match self {
            BackendLoginError::Server { message, .. } => message.clone(),
            other => format!("server login failed: {other}"),
        }
    }
}

/// Where authentication stands. SCRAM must end with a verified SASLFinal
/// before AuthenticationOk counts: otherwise a server (or a man in the
/// middle) that does not know the password could skip proving it.
enum Auth {
    Pending,
    Scram(Box<ScramSha256>),
    /// SCRAM with keys a client's proof revealed (pass-through).
    Keyed(Box<KeyedScramClient>),
    ScramFinished,
    Done,
}

/// Logs in to Postgres on `stream` and reads up to the first ReadyForQuery.
/// `params` follow `user` and `database` in the StartupMessage.
pub async fn login_backend<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    user: &str,
    database: &str,
    credential: Option<&Credential>,
    params: &[(&str, &str)],
) -> Result<ServerHello, BackendLoginError> {
    let mut out = BytesMut::new();
    let startup = [("user", user), ("database", database)].into_iter().chain(params.iter().copied());
    frontend::startup_message(startup, &mut out).map_err(|_| BackendLoginError::NulByte("startup parameters"))?;
    send(stream, &mut out).await?;

    let mut buf = BytesMut::with_capacity(1024);
    let mut auth = Auth::Pending;
    let mut key = None;
    let mut server_params = Vec::new();
    loop {
        let (msg_tag, mut body) = read_frame(stream, &mut buf).await?;
        let authenticated = matches!(auth, Auth::Done);
        match msg_tag {
            tag::AUTHENTICATION if !authenticated => {
                if body.len() < 4 {
                    return Err(protocol("short Authentication message"));
                }
                let code = body.get_i32();
                auth = authenticate(auth, code, body, user, credential, &mut out).await?;
                if !out.is_empty() {
                    send(stream, &mut out).await?;
                }
            }
            tag::ERROR_RESPONSE => {
                let fields = parse_error_fields(&body);
                return Err(BackendLoginError::Server { code: fields.code, message: fields.message });
            }
            tag::NOTICE_RESPONSE => {}
            tag::PARAMETER_STATUS if authenticated => {
                let (name, value) =
                    parse_parameter_status(&body).ok_or_else(|| protocol("malformed ParameterStatus"))?;
                server_params.push((name.to_owned(), value.to_owned()));
            }
            tag::BACKEND_KEY_DATA if authenticated => {
                // Protocol 3.0 (what we ask for): exactly two int32s.
                if body.len() != 8 {
                    return Err(protocol("malformed BackendKeyData"));
                }
                key = Some((body.get_i32(), body.get_i32()));
            }
            tag::READY_FOR_QUERY if authenticated => {
                // Postgres sends nothing after ReadyForQuery until asked.
                if !buf.is_empty() {
                    return Err(protocol("unexpected data after ReadyForQuery"));
                }
                let (pid, secret) = key.ok_or_else(|| protocol("no BackendKeyData before ReadyForQuery"))?;
                return Ok(ServerHello { pid, secret, params: server_params });
            }
            other => {
                return Err(protocol(&format!("unexpected message type '{}' during login", other.escape_ascii())));
            }
        }
    }
}

/// Handles one Authentication message, appending any reply to `out`.
async fn authenticate(
    state: Auth,
    code: i32,
    data: BytesMut,
    user: &str,
    credential: Option<&Credential>,
    out: &mut BytesMut,
) -> Result<Auth, BackendLoginError> {
    // The frontend writers fail only on a NUL inside a C string.
    let nul = |_| BackendLoginError::NulByte("password");
    let password = match credential {
        Some(Credential::Password(p)) => Some(p.as_str()),
        _ => None,
    };
    match (code, state) {
        (0, Auth::Pending | Auth::ScramFinished) if data.is_empty() => Ok(Auth::Done),
        (0, Auth::Scram(_)) => Err(BackendLoginError::Scram("server skipped the SCRAM final message".into())),
        (3, Auth::Pending) if data.is_empty() => {
            let password = password.ok_or(BackendLoginError::NoPassword { method: "cleartext password" })?;
            frontend::password_message(password.as_bytes(), out).map_err(nul)?;
            Ok(Auth::Pending)
        }
        (5, Auth::Pending) => {
            let salt: [u8; 4] = data[..].try_into().map_err(|_| protocol("malformed AuthenticationMD5Password"))?;
            // The stored hash is all md5 needs: it is what the server salts.
            let stored = match credential {
                Some(Credential::Password(p)) => md5::stored_hash(p, user),
                Some(Credential::Md5Hash(h)) => h.clone(),
                _ => return Err(BackendLoginError::NoPassword { method: "md5" }),
            };
            let response = md5::salted_response(&stored, salt);
            frontend::password_message(response.as_bytes(), out).map_err(nul)?;
            Ok(Auth::Pending)
        }
        (10, Auth::Pending) => {
            let mechanisms = sasl_mechanisms(&data)?;
            if !mechanisms.contains(&SCRAM_SHA_256) {
                return Err(BackendLoginError::UnsupportedAuth(format!("SASL mechanisms {mechanisms:?}")));
            }
            if let Some(Credential::Scram(keys)) = credential {
                let (client, first) = KeyedScramClient::new(keys.clone());
                frontend::sasl_initial_response(SCRAM_SHA_256, &first, out).map_err(nul)?;
                return Ok(Auth::Keyed(Box::new(client)));
            }
            let password = password.ok_or(BackendLoginError::NoPassword { method: "SCRAM-SHA-256" })?;
            // pgmux speaks to Postgres without TLS here, so no channel binding.
            let scram = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
            // `message()` panics only after `finish`; here and in the
            // SASLContinue arm the client is before it.
            frontend::sasl_initial_response(SCRAM_SHA_256, scram.message(), out).map_err(nul)?;
            Ok(Auth::Scram(Box::new(scram)))
        }
        (11, Auth::Scram(mut scram)) => {
            // `update` runs PBKDF2 with the server's salt and iteration count
            // (4096 by default, up to 100 000: milliseconds of CPU), so on the
            // blocking pool, not on the runtime thread every client shares.
            let scram = tokio::task::spawn_blocking(move || scram.update(&data).map(|()| scram))
                .await
                .map_err(|e| BackendLoginError::Io(io::Error::other(e)))?
                .map_err(|e| BackendLoginError::Scram(e.to_string()))?;
            frontend::sasl_response(scram.message(), out).map_err(nul)?;
            Ok(Auth::Scram(scram))
        }
        (11, Auth::Keyed(mut client)) => {
            let last = client.client_final(&data).map_err(|e| BackendLoginError::Scram(e.to_string()))?;
            frontend::sasl_response(&last, out).map_err(nul)?;
            Ok(Auth::Keyed(client))
        }
        (12, Auth::Keyed(client)) => {
            client.verify_server(&data).map_err(|e| BackendLoginError::Scram(e.to_string()))?;
            Ok(Auth::ScramFinished)
        }
        (0, Auth::Keyed(_)) => Err(BackendLoginError::Scram("server skipped the SCRAM final message".into())),
        (12, Auth::Scram(mut scram)) => {
            scram.finish(&data).map_err(|e| BackendLoginError::Scram(e.to_string()))?;
            Ok(Auth::ScramFinished)
        }
        (2 | 6 | 7 | 8 | 9, _) => Err(BackendLoginError::UnsupportedAuth(
            match code {
                2 => "Kerberos V5",
                6 => "SCM credentials",
                9 => "SSPI",
                _ => "GSSAPI",
            }
            .to_owned(),
        )),
        (code, _) => Err(protocol(&format!("unexpected authentication request {code}"))),
    }
}

/// The NUL-terminated mechanism names of AuthenticationSASL, ended by an empty one.
fn sasl_mechanisms(data: &[u8]) -> Result<Vec<&str>, BackendLoginError> {
    let malformed = || protocol("malformed AuthenticationSASL");
    let list = data.strip_suffix(b"\0\0").ok_or_else(malformed)?;
    list.split(|&b| b == 0).map(|m| std::str::from_utf8(m).map_err(|_| malformed())).collect()
}

async fn send<S: AsyncWrite + Unpin>(stream: &mut S, out: &mut BytesMut) -> Result<(), BackendLoginError> {
    stream.write_all(out).await?;
    stream.flush().await?;
    out.clear();
    Ok(())
}

async fn read_frame<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> Result<(u8, BytesMut), BackendLoginError> {
    loop {
        if let Some(frame) = split_frame(buf, MAX_LOGIN_MESSAGE_LEN).map_err(|e| protocol(&e.to_string()))? {
            return Ok(frame);
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(BackendLoginError::Closed);
        }
    }
}

fn protocol(message: &str) -> BackendLoginError {
    BackendLoginError::Protocol(message.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::authenticate_client;
    use crate::config::{AuthMethod, UserConfig};
    use crate::protocol::backend as msg;
    use crate::protocol::startup::{StartupPacket, split_startup};
    use tokio::io::DuplexStream;

    /// Reads the StartupMessage off `stream`, returning its parameters and
    /// whatever was read past it.
    async fn read_startup(stream: &mut DuplexStream) -> (Vec<(String, String)>, BytesMut) {
        let mut buf = BytesMut::new();
        loop {
            if let Some(StartupPacket::Startup(s)) = split_startup(&mut buf).unwrap() {
                assert_eq!(s.minor, 0);
                return (s.params, buf);
            }
            assert_ne!(stream.read_buf(&mut buf).await.unwrap(), 0);
        }
    }

    fn hello_messages(out: &mut BytesMut) {
        msg::authentication_ok(out);
        msg::parameter_status(out, "server_version", "15.0");
        msg::backend_key_data(out, 42, 7);
        msg::ready_for_query(out, msg::IDLE);
    }

    /// pgmux's own client-facing auth as the server: both halves of pgmux agree.
    #[tokio::test]
    async fn logs_in_to_authenticate_client() {
        for (auth, stored) in [
            (AuthMethod::ScramSha256, "pw".to_owned()),
            (AuthMethod::ScramSha256, postgres_protocol::password::scram_sha_256(b"pw")),
            (AuthMethod::Md5, "pw".to_owned()),
            (AuthMethod::Md5, md5::stored_hash("pw", "bob")),
            (AuthMethod::Trust, String::new()),
        ] {
            let user = UserConfig { name: "bob".into(), password: Some(stored), server_password: None, auth };
            let (mut client, mut server) = tokio::io::duplex(4096);
            let server_side = async {
                let (params, mut buf) = read_startup(&mut server).await;
                assert_eq!(params[..2], [("user".into(), "bob".into()), ("database".into(), "db".into())]);
                assert_eq!(params[2], ("TimeZone".into(), "UTC".into()));
                authenticate_client(&mut server, &mut buf, &user, &Default::default()).await?;
                let mut out = BytesMut::new();
                hello_messages(&mut out);
                server.write_all(&out).await.unwrap();
                Ok::<_, crate::auth::AuthError>(())
            };
            let pw = Credential::Password("pw".into());
            let client_side = login_backend(&mut client, "bob", "db", Some(&pw), &[("TimeZone", "UTC")]);
            let (s, c) = tokio::join!(server_side, client_side);
            s.unwrap();
            let hello = c.unwrap();
            assert_eq!(
                hello,
                ServerHello { pid: 42, secret: 7, params: vec![("server_version".into(), "15.0".into())] }
            );
        }
    }

    /// The SCRAM key derivation runs on the blocking pool. On a current-thread
    /// runtime the only threads tokio starts are blocking-pool threads, and
    /// the server side here (a stored verifier) needs none.
    #[test]
    fn scram_derivation_leaves_the_runtime_thread() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};

        let started = Arc::new(AtomicUsize::new(0));
        let counter = started.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .on_thread_start(move || {
                counter.fetch_add(1, Ordering::SeqCst);
            })
            .build()
            .unwrap();
        let stored = postgres_protocol::password::scram_sha_256(b"pw");
        let user = UserConfig {
            name: "bob".into(),
            password: Some(stored),
            server_password: None,
            auth: AuthMethod::ScramSha256,
        };
        rt.block_on(async {
            let (mut client, mut server) = tokio::io::duplex(4096);
            let server_side = async {
                let (_, mut buf) = read_startup(&mut server).await;
                authenticate_client(&mut server, &mut buf, &user, &Default::default()).await.unwrap();
                let mut out = BytesMut::new();
                hello_messages(&mut out);
                server.write_all(&out).await.unwrap();
            };
            let pw = Credential::Password("pw".into());
            let (_, hello) = tokio::join!(server_side, login_backend(&mut client, "bob", "db", Some(&pw), &[]));
            hello.unwrap();
        });
        assert!(started.load(Ordering::SeqCst) >= 1, "no blocking-pool thread: derived on the runtime thread");
    }

    /// A server-first the SCRAM client rejects (here: a nonce that does not
    /// extend ours) is a SCRAM error, also now that it is checked off-thread.
    #[tokio::test]
    async fn bad_server_first_is_a_scram_error() {
        let r = against_script(Some("pw"), |out| {
            msg::authentication_sasl(out, &["SCRAM-SHA-256"]);
            msg::authentication_sasl_continue(out, b"r=not-our-nonce,s=c2FsdA==,i=4096");
        })
        .await;
        assert!(matches!(&r, Err(BackendLoginError::Scram(m)) if m.contains("nonce")), "{r:?}");
    }

    /// Runs `login_backend` against a server that answers the startup packet
    /// with `script` and then closes.
    async fn against_script(
        password: Option<&str>,
        script: impl FnOnce(&mut BytesMut),
    ) -> Result<ServerHello, BackendLoginError> {
        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        let mut out = BytesMut::new();
        script(&mut out);
        let server_side = async move {
            read_startup(&mut server).await;
            // The peer may have given up already; that is what some tests check.
            let _ = server.write_all(&out).await;
            // Drain what the client answers until it hangs up.
            let mut sink = BytesMut::new();
            while server.read_buf(&mut sink).await.is_ok_and(|n| n > 0) {
                sink.clear();
            }
        };
        let client_side = async move {
            let credential = password.map(|p| Credential::Password(p.to_owned()));
            let r = login_backend(&mut client, "bob", "db", credential.as_ref(), &[]).await;
            drop(client); // Hang up, so the server side stops draining.
            r
        };
        tokio::join!(server_side, client_side).1
    }

    fn protocol_text(r: Result<ServerHello, BackendLoginError>) -> String {
        match r {
            Err(BackendLoginError::Protocol(m) | BackendLoginError::Scram(m)) => m,
            other => panic!("expected a protocol/SCRAM error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn trust_and_notices() {
        let r = against_script(None, |out| {
            msg::write_message(out, tag::NOTICE_RESPONSE, |b| b.extend_from_slice(b"SNOTICE\0Mhi\0\0"));
            hello_messages(out);
        })
        .await;
        assert_eq!(r.unwrap().pid, 42);
    }

    #[tokio::test]
    async fn server_error_keeps_code_and_text() {
        let r = against_script(None, |out| {
            msg::error_response(
                out,
                msg::Severity::Fatal,
                SqlState::TOO_MANY_CONNECTIONS,
                "sorry, too many clients already",
            );
        })
        .await;
        let e = r.unwrap_err();
        assert_eq!(e.sqlstate(), SqlState::TOO_MANY_CONNECTIONS);
        assert_eq!(e.message(), "sorry, too many clients already");
    }

    #[tokio::test]
    async fn scram_server_must_send_final() {
        // A server that accepts without proving it knows the password.
        let r = against_script(Some("pw"), |out| {
            msg::authentication_sasl(out, &["SCRAM-SHA-256"]);
            msg::authentication_ok(out);
        })
        .await;
        assert!(protocol_text(r).contains("skipped the SCRAM final"));
    }

    #[tokio::test]
    async fn unsupported_and_passwordless() {
        let r = against_script(Some("pw"), |out| msg::authentication_sasl(out, &["SCRAM-SHA-256-PLUS"])).await;
        assert!(matches!(r, Err(BackendLoginError::UnsupportedAuth(_))), "{r:?}");
        let r = against_script(Some("pw"), |out| {
            msg::write_message(out, tag::AUTHENTICATION, |b| b.extend_from_slice(&7i32.to_be_bytes()))
        })
        .await;
        assert!(matches!(r, Err(BackendLoginError::UnsupportedAuth(_))), "{r:?}");
        let r = against_script(None, msg::authentication_cleartext).await;
        assert!(matches!(r, Err(BackendLoginError::NoPassword { method: "cleartext password" })), "{r:?}");
    }

    #[tokio::test]
    async fn malformed_server_messages() {
        let too_long = |out: &mut BytesMut| out.extend_from_slice(b"N\x7f\0\0\0");
        assert!(protocol_text(against_script(None, too_long).await).contains("exceeds the limit"));
        let after_ready = |out: &mut BytesMut| {
            hello_messages(out);
            msg::ready_for_query(out, msg::IDLE);
        };
        assert!(protocol_text(against_script(None, after_ready).await).contains("after ReadyForQuery"));
        // Session messages before authentication completed.
        let early = |out: &mut BytesMut| msg::ready_for_query(out, msg::IDLE);
        assert!(protocol_text(against_script(None, early).await).contains("unexpected message type 'Z'"));
        let no_key = |out: &mut BytesMut| {
            msg::authentication_ok(out);
            msg::ready_for_query(out, msg::IDLE);
        };
        assert!(protocol_text(against_script(None, no_key).await).contains("BackendKeyData"));
        let short_md5 = |out: &mut BytesMut| {
            msg::write_message(out, tag::AUTHENTICATION, |b| b.extend_from_slice(&[0, 0, 0, 5, 1]))
        };
        assert!(protocol_text(against_script(Some("pw"), short_md5).await).contains("MD5"));
        let bad_sasl = |out: &mut BytesMut| msg::authentication_sasl_continue(out, b"r=x,s=,i=1");
        assert!(matches!(against_script(Some("pw"), bad_sasl).await, Err(BackendLoginError::Protocol(_))));
    }

    #[tokio::test]
    async fn eof_mid_login() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        let server_side = async move {
            read_startup(&mut server).await;
            server.write_all(b"R\0\0\0").await.unwrap(); // Half a header, then gone.
        };
        let (_, r) = tokio::join!(server_side, login_backend(&mut client, "bob", "db", None, &[]));
        assert!(matches!(r, Err(BackendLoginError::Closed)), "{r:?}");
    }

    #[tokio::test]
    async fn nul_in_startup_parameter() {
        let (mut client, _server) = tokio::io::duplex(1024);
        let r = login_backend(&mut client, "b\0b", "db", None, &[]).await;
        assert!(matches!(r, Err(BackendLoginError::NulByte("startup parameters"))), "{r:?}");
    }
}
