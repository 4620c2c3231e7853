use super::*;
use crate::auth::Credential;
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
        let response =
            postgres_protocol::authentication::md5_hash(b"alice", password.as_bytes(), salt[..].try_into().unwrap());
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
) -> (Result<Option<Credential>, AuthError>, T) {
    run_with(user, DerivedVerifier::default(), client_side).await
}

/// [`run`] with the verifier cache given, to look into afterwards.
async fn run_with<T, F: Future<Output = T>>(
    user: UserConfig,
    verifier: DerivedVerifier,
    client_side: impl FnOnce(Client) -> F,
) -> (Result<Option<Credential>, AuthError>, T) {
    let (mut server, client) = tokio::io::duplex(64 * 1024);
    let server_task = async move {
        let r = authenticate_client(&mut server, &mut BytesMut::new(), &user, &verifier).await;
        drop(server);
        r
    };
    tokio::join!(server_task, client_side(Client { stream: client, buf: BytesMut::new() }))
}

fn assert_wrong_password(r: Result<Option<Credential>, AuthError>) {
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
    let reloaded =
        crate::settings::Settings::build(crate::config::Config { users: vec![alice.clone()], ..Default::default() })
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
                Ok(_) => {
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
