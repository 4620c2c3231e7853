//! SCRAM on both sides: pgmux verifying a client, pgmux logging in to a server.

use super::*;

// ---------------------------------------------------------------------------
// SCRAM, server side (pgmux verifying a client)

/// Byte strings that mean something to a SCRAM parser, for mutations.
pub(crate) const SCRAM_BITS: &[&[u8]] = &[
    b",",
    b"=",
    b",p=",
    b",r=",
    b"c=",
    b"n,,",
    b"y,,",
    b"p=tls-server-end-point,,",
    b"n,a=x,",
    b"m=x,",
    b",x=y",
    b"==",
    b"\0",
    b"\xff",
    b"\xc3\xa9",
];

pub(crate) fn scram_bits() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![proptest::sample::select(SCRAM_BITS).prop_map(<[u8]>::to_vec), vec(any::<u8>(), 0..4)]
}

/// One edit of a message: where (modulo its length), how much, and with what.
#[derive(Debug, Clone)]
pub(crate) enum Edit {
    Replace {
        at: usize,
        len: usize,
        with: Vec<u8>,
    },
    Truncate {
        at: usize,
    },
    /// Repeats `msg[at..at + len]` right after itself.
    Duplicate {
        at: usize,
        len: usize,
    },
}

pub(crate) fn edits() -> impl Strategy<Value = Vec<Edit>> {
    let edit = prop_oneof![
        4 => (any::<usize>(), 0..4usize, scram_bits()).prop_map(|(at, len, with)| Edit::Replace { at, len, with }),
        1 => any::<usize>().prop_map(|at| Edit::Truncate { at }),
        1 => (any::<usize>(), 1..12usize).prop_map(|(at, len)| Edit::Duplicate { at, len }),
    ];
    vec(edit, 1..4)
}

pub(crate) fn apply(msg: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut m = msg.to_vec();
    for e in edits {
        match e {
            Edit::Replace { at, len, with } => {
                let at = at % (m.len() + 1);
                let end = (at + len).min(m.len());
                m.splice(at..end, with.iter().copied());
            }
            Edit::Truncate { at } => m.truncate(at % (m.len() + 1)),
            Edit::Duplicate { at, len } => {
                let at = at % (m.len() + 1);
                let end = (at + len).min(m.len());
                let copy = m[at..end].to_vec();
                m.splice(end..end, copy);
            }
        }
    }
    m
}

/// A verifier with few PBKDF2 rounds: the properties test parsing, not cost.
pub(crate) fn cheap_verifier(password: &str, salt: &[u8], iterations: u32) -> ScramVerifier {
    ScramVerifier::from_password_with_salt(password, salt.to_vec(), iterations)
}

/// A real client (postgres-protocol's, as libpq behaves) against `server`,
/// with `tamper_first`/`tamper_final` applied to what the client sends.
/// `Ok` only if the server accepted the proof and the client the signature.
pub(crate) fn scram_exchange(
    server: &mut ScramServer,
    password: &str,
    tamper_first: impl FnOnce(&[u8]) -> Vec<u8>,
    tamper_final: impl FnOnce(&[u8]) -> Vec<u8>,
) -> Result<(), String> {
    let mut client = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
    let server_first = server.server_first(&tamper_first(client.message())).map_err(|e| format!("server: {e}"))?;
    client.update(&server_first).map_err(|e| format!("client: {e}"))?;
    let server_final = server.verify_final(&tamper_final(client.message())).map_err(|e| format!("server: {e}"))?;
    client.finish(&server_final).map_err(|e| format!("client: {e}"))
}

pub(crate) fn salt() -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 1..24)
}

proptest! {
    #![proptest_config(cases(900))]

    /// A valid exchange succeeds for any password (SASLprep'd or raw, as
    /// clients do), salt and iteration count; another password fails with
    /// InvalidProof unless both normalise to the same.
    #[test]
    fn scram_valid_exchange(password in any::<String>(), other in any::<String>(), salt in salt(), iterations in 1..32u32) {
        let verifier = cheap_verifier(&password, &salt, iterations);
        let keep = |m: &[u8]| m.to_vec();
        prop_assert_eq!(scram_exchange(&mut ScramServer::new(verifier.clone()), &password, keep, keep), Ok(()));
        let prep = |p: &str| stringprep::saslprep(p).map(|c| c.into_owned()).unwrap_or_else(|_| p.to_owned());
        if prep(&password) != prep(&other) {
            let mut server = ScramServer::new(verifier);
            let mut client = ScramSha256::new(other.as_bytes(), ChannelBinding::unsupported());
            let server_first = server.server_first(client.message()).unwrap();
            client.update(&server_first).unwrap();
            prop_assert_eq!(server.verify_final(client.message()), Err(ScramError::InvalidProof));
        }
    }

    /// Any change to the client's messages makes the exchange fail (never
    /// panic): every byte of them is bound by the proof or checked.
    #[test]
    fn scram_tampered_messages_fail(
        salt in salt(),
        iterations in 1..8u32,
        first_edits in proptest::option::of(edits()),
        final_edits in proptest::option::of(edits()),
    ) {
        let verifier = cheap_verifier("pw", &salt, iterations);
        let changed = std::cell::Cell::new(false);
        let r = scram_exchange(
            &mut ScramServer::new(verifier),
            "pw",
            |m| {
                let t = first_edits.as_deref().map_or_else(|| m.to_vec(), |e| apply(m, e));
                changed.set(changed.get() | (t != m));
                t
            },
            |m| {
                let t = final_edits.as_deref().map_or_else(|| m.to_vec(), |e| apply(m, e));
                changed.set(changed.get() | (t != m));
                t
            },
        );
        prop_assert_eq!(r.is_ok(), !changed.get(), "{:?}", r);
    }

    /// Arbitrary client-first bytes: an error, or a server-first that
    /// extends the client's nonce; after an error the exchange is over.
    #[test]
    fn scram_server_first_any_bytes(
        msg in prop_oneof![
            vec(any::<u8>(), 0..64),
            (vec(scram_bits(), 0..8)).prop_map(|v| v.concat()),
            edits().prop_map(|e| apply(b"n,,n=,r=rOprNGfwEbeRWgbNEkqO", &e)),
        ],
    ) {
        let mut server = ScramServer::new(cheap_verifier("pw", b"salt", 1));
        match server.server_first(&msg) {
            Ok(sf) => {
                let text = std::str::from_utf8(&msg).unwrap();
                let nonce = text.split(',').find_map(|a| a.strip_prefix("r=")).unwrap();
                let sf = String::from_utf8(sf).unwrap();
                prop_assert!(sf.starts_with(&format!("r={nonce}")), "{sf}");
                prop_assert!(sf.ends_with(",s=c2FsdA==,i=1"), "{sf}");
                // A nonsense client-final is refused, not accepted.
                prop_assert!(server.verify_final(&msg).is_err());
            }
            Err(_) => {
                prop_assert!(matches!(server.verify_final(b"c=biws,r=x,p=AAAA"), Err(ScramError::Protocol(_))));
            }
        }
    }

    /// Arbitrary client-final bytes after a valid client-first never pass.
    #[test]
    fn scram_verify_final_any_bytes(
        msg in prop_oneof![
            vec(any::<u8>(), 0..96),
            (vec(scram_bits(), 0..10)).prop_map(|v| v.concat()),
        ],
    ) {
        let mut server = ScramServer::new(cheap_verifier("pw", b"salt", 1));
        server.server_first(b"n,,n=,r=abc").unwrap();
        prop_assert!(server.verify_final(&msg).is_err());
    }

    /// Stored verifiers (from the config) parse or are refused, never panic;
    /// Postgres' own form, as postgres-protocol writes it, always parses.
    #[test]
    fn scram_verifier_parse_total(
        s in any::<String>(),
        edits in edits(),
        password in "[a-z]{0,8}",
    ) {
        let _ = ScramVerifier::parse(&s);
        let stored = postgres_protocol::password::scram_sha_256(password.as_bytes());
        prop_assert!(ScramVerifier::parse(&stored).is_some());
        let _ = ScramVerifier::parse(&String::from_utf8_lossy(&apply(stored.as_bytes(), &edits)));
    }
}

// ---------------------------------------------------------------------------
// Server login (pgmux as the client): postgres-protocol's SCRAM client and
// pgmux's login loop fed what a broken or hostile server sends.

pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Reads one frame (`Some(tag, body)`) from `stream`, `None` at EOF.
pub(crate) async fn read_frame(stream: &mut DuplexStream, buf: &mut BytesMut) -> Option<(u8, BytesMut)> {
    loop {
        if let Some(f) = split_frame(buf, 1 << 16).unwrap() {
            return Some(f);
        }
        if stream.read_buf(buf).await.ok()? == 0 {
            return None;
        }
    }
}

pub(crate) async fn read_startup(stream: &mut DuplexStream, buf: &mut BytesMut) -> Option<()> {
    loop {
        if let Some(StartupPacket::Startup(_)) = split_startup(buf).unwrap() {
            return Some(());
        }
        if stream.read_buf(buf).await.ok()? == 0 {
            return None;
        }
    }
}

/// A server that runs SCRAM with pgmux's own ScramServer, tampering with its
/// server-first and server-final messages, then finishes the login.
pub(crate) async fn tampering_server(
    mut s: DuplexStream,
    first_edits: Option<Vec<Edit>>,
    final_edits: Option<Vec<Edit>>,
    changed: &std::cell::Cell<bool>,
) -> Option<()> {
    let mut buf = BytesMut::new();
    read_startup(&mut s, &mut buf).await?;
    let mut out = BytesMut::new();
    msg::authentication_sasl(&mut out, &["SCRAM-SHA-256"]);
    s.write_all(&out).await.ok()?;
    // SASLInitialResponse: mechanism, NUL, int32 length, client-first.
    let (_, body) = read_frame(&mut s, &mut buf).await?;
    let nul = body.iter().position(|&b| b == 0)?;
    let client_first = &body[nul + 5..];
    let mut server = ScramServer::new(cheap_verifier("pw", b"salty", 2));
    let server_first = server.server_first(client_first).ok()?;
    let tampered = first_edits.map_or_else(|| server_first.clone(), |e| apply(&server_first, &e));
    changed.set(changed.get() | (tampered != server_first));
    out.clear();
    msg::authentication_sasl_continue(&mut out, &tampered);
    s.write_all(&out).await.ok()?;
    let (_, client_final) = read_frame(&mut s, &mut buf).await?;
    out.clear();
    match server.verify_final(&client_final) {
        Ok(server_final) => {
            let tampered = final_edits.map_or_else(|| server_final.clone(), |e| apply(&server_final, &e));
            changed.set(changed.get() | (tampered != server_final));
            msg::authentication_sasl_final(&mut out, &tampered);
            msg::authentication_ok(&mut out);
            msg::backend_key_data(&mut out, 1, 2);
            msg::ready_for_query(&mut out, msg::IDLE);
        }
        Err(_) => msg::error_response(
            &mut out,
            msg::Severity::Fatal,
            pgmux::protocol::sqlstate::SqlState("28P01"),
            "password authentication failed",
        ),
    }
    s.write_all(&out).await.ok()
}

/// Server messages in a plausible login order, with arbitrary contents.
pub(crate) fn login_script() -> impl Strategy<Value = Vec<u8>> {
    let auth = (
        prop_oneof![Just(0i32), Just(3), Just(5), Just(10), Just(11), Just(12), any::<i32>()],
        vec(any::<u8>(), 0..24),
    )
        .prop_map(|(code, data)| {
            let mut body = code.to_be_bytes().to_vec();
            body.extend_from_slice(&data);
            frame(b'R', &body)
        });
    let sasl = vec(prop_oneof![Just("SCRAM-SHA-256".to_owned()), "[A-Z0-9-]{0,20}"], 0..3).prop_map(|ms| {
        let mut out = BytesMut::new();
        msg::authentication_sasl(&mut out, &ms.iter().map(String::as_str).collect::<Vec<_>>());
        out.to_vec()
    });
    let sasl_continue = prop_oneof![
        vec(any::<u8>(), 0..40),
        "r=[ -~]{0,30},s=[A-Za-z0-9+/=]{0,12},i=[0-9]{1,7}".prop_map(String::into_bytes),
    ]
    .prop_map(|data| {
        let mut out = BytesMut::new();
        msg::authentication_sasl_continue(&mut out, &data);
        out.to_vec()
    });
    let other =
        (prop_oneof![Just(b'S'), Just(b'K'), Just(b'Z'), Just(b'E'), Just(b'N'), any::<u8>()], vec(any::<u8>(), 0..24))
            .prop_map(|(tag, body)| frame(tag, &body));
    let hello = Just({
        let mut out = BytesMut::new();
        msg::authentication_ok(&mut out);
        msg::parameter_status(&mut out, "server_version", "15.0");
        msg::backend_key_data(&mut out, 7, 9);
        msg::ready_for_query(&mut out, msg::IDLE);
        out.to_vec()
    });
    let piece =
        prop_oneof![3 => auth, 2 => sasl, 2 => sasl_continue, 3 => other, 1 => hello, 1 => vec(any::<u8>(), 1..8)];
    vec(piece, 0..6).prop_map(|p| p.concat())
}

/// Runs `login_backend` against a server that sends `script` after the
/// startup packet and drains whatever pgmux answers.
pub(crate) async fn login_against(script: Vec<u8>) -> Result<pgmux::auth::ServerHello, BackendLoginError> {
    let (mut client, mut server) = tokio::io::duplex(1 << 16);
    let server_side = async move {
        let mut buf = BytesMut::new();
        read_startup(&mut server, &mut buf).await?;
        let _ = server.write_all(&script).await;
        // Then silence: EOF to pgmux. Drain what it sends until it hangs up.
        let _ = server.shutdown().await;
        let mut sink = [0u8; 4096];
        while server.read(&mut sink).await.is_ok_and(|n| n > 0) {}
        Some(())
    };
    let client_side = async move {
        let r =
            login_backend(&mut client, "bob", "db", Some(&pgmux::auth::Credential::Password("pw".into())), &[]).await;
        drop(client);
        r
    };
    tokio::join!(server_side, client_side).1
}

proptest! {
    #![proptest_config(cases(600))]

    /// Tampered server-first or server-final messages make the login fail
    /// (a server that does not know the password cannot pass), never panic;
    /// untouched ones log in.
    #[test]
    fn backend_scram_tampered_server(first_edits in proptest::option::of(edits()), final_edits in proptest::option::of(edits())) {
        let changed = std::cell::Cell::new(false);
        let r = runtime().block_on(async {
            let (mut client, server) = tokio::io::duplex(1 << 16);
            let server_side = tampering_server(server, first_edits, final_edits, &changed);
            let client_side = async move {
                let r = login_backend(&mut client, "bob", "db", Some(&pgmux::auth::Credential::Password("pw".into())), &[]).await;
                drop(client);
                r
            };
            tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(server_side, client_side).1 }).await
        });
        let r = r.expect("login did not finish");
        prop_assert_eq!(r.is_ok(), !changed.get(), "{:?}", r);
    }

    /// Whatever a server sends during login, pgmux ends with a result
    /// (never a panic, never a hang once the server stops talking).
    #[test]
    fn backend_login_any_server_bytes(script in login_script()) {
        let r = runtime().block_on(async {
            tokio::time::timeout(Duration::from_secs(10), login_against(script)).await
        });
        prop_assert!(r.is_ok(), "login did not finish");
    }
}

proptest! {
    #![proptest_config(cases(3000))]

    /// The readers of server messages (ErrorResponse fields, DataRow,
    /// ParameterStatus) are total over any body and invert pgmux's writers.
    #[test]
    fn server_message_readers(
        body in vec(any::<u8>(), 0..64),
        values in vec(proptest::option::of(any::<String>()), 0..6),
        name in any::<String>(),
        value in any::<String>(),
    ) {
        let _ = msg::parse_error_fields(&body);
        let _ = msg::parse_data_row(&body);
        let _ = msg::parse_parameter_status(&body);

        let mut out = BytesMut::new();
        msg::data_row(&mut out, &values);
        let (_, row) = split_frame(&mut out, MAX_MESSAGE_LEN).unwrap().unwrap();
        prop_assert_eq!(msg::parse_data_row(&row), values);

        // The writers drop interior NULs: a C string cannot carry them.
        let (name, value) = (name.replace('\0', ""), value.replace('\0', ""));
        msg::parameter_status(&mut out, &name, &value);
        let (_, status) = split_frame(&mut out, MAX_MESSAGE_LEN).unwrap().unwrap();
        prop_assert_eq!(msg::parse_parameter_status(&status), Some((name.as_str(), value.as_str())));

        msg::error_response(&mut out, msg::Severity::Error, pgmux::protocol::sqlstate::SqlState("XX000"), &value);
        let (_, error) = split_frame(&mut out, MAX_MESSAGE_LEN).unwrap().unwrap();
        let fields = msg::parse_error_fields(&error);
        prop_assert_eq!((fields.severity.as_str(), fields.code.as_str(), fields.message.as_str()), ("ERROR", "XX000", value.as_str()));
    }
}
