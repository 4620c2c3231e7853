//! Client authentication and the relay's scan of client messages.

use super::*;

// ---------------------------------------------------------------------------
// Client authentication (before a client has proven anything)

/// The users of a config: SCRAM with a plaintext password and with a
/// stored verifier, md5 with a plaintext password and with a stored hash.
pub(crate) fn auth_users() -> Vec<UserConfig> {
    let verifier = postgres_protocol::password::scram_sha_256(b"pw");
    let text = format!(
        "[[databases]]\nname = \"db\"\nprimary = \"h:1\"\n\
         [[users]]\nname = \"a\"\npassword = \"pw\"\n\
         [[users]]\nname = \"b\"\npassword = \"{verifier}\"\n\
         [[users]]\nname = \"c\"\npassword = \"pw\"\nauth = \"md5\"\n\
         [[users]]\nname = \"d\"\npassword = \"md5a3556571e93b0d20722ba62be61e8c2d\"\nauth = \"md5\"\n"
    );
    Config::parse(&text, "auth.toml").unwrap().users
}

/// What a client may send during authentication: PasswordMessage-tagged
/// SASLInitialResponse / SASLResponse / password shapes, other messages, junk.
pub(crate) fn auth_script() -> impl Strategy<Value = Vec<u8>> {
    let mechanism =
        prop_oneof![Just(b"SCRAM-SHA-256".to_vec()), Just(b"SCRAM-SHA-256-PLUS".to_vec()), vec(1..=255u8, 0..8)];
    let client_first = prop_oneof![
        edits().prop_map(|e| apply(b"n,,n=,r=rOprNGfwEbeRWgbNEkqO", &e)),
        vec(scram_bits(), 0..6).prop_map(|v| v.concat()),
        Just(Vec::new()),
    ];
    let length = prop_oneof![4 => Just(None), 1 => Just(Some(-1i32)), 1 => any::<i32>().prop_map(Some)];
    let initial = (mechanism, length, client_first).prop_map(|(m, len, data)| {
        let mut body = m;
        body.push(0);
        body.extend_from_slice(&len.unwrap_or(data.len() as i32).to_be_bytes());
        body.extend_from_slice(&data);
        frame(b'p', &body)
    });
    let response = prop_oneof![
        vec(scram_bits(), 0..8).prop_map(|v| v.concat()),
        edits()
            .prop_map(|e| apply(b"c=biws,r=rOprNGfwEbeRWgbNEkqO,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=", &e)),
        "md5[0-9a-f]{0,33}\0?".prop_map(String::into_bytes),
    ]
    .prop_map(|body| frame(b'p', &body));
    let other =
        (prop_oneof![Just(b'X'), Just(b'Q'), any::<u8>()], vec(any::<u8>(), 0..8)).prop_map(|(t, b)| frame(t, &b));
    let junk = prop_oneof![other, vec(any::<u8>(), 1..8)];
    // Mostly in protocol order, so the exchange gets deep; sometimes not.
    let ordered =
        (proptest::option::of(initial.clone()), vec(response.clone(), 0..3), proptest::option::of(junk.clone()))
            .prop_map(|(i, r, j)| [i.unwrap_or_default(), r.concat(), j.unwrap_or_default()].concat());
    let shuffled = vec(prop_oneof![initial, response, junk], 0..4).prop_map(|p| p.concat());
    prop_oneof![3 => ordered, 1 => shuffled]
}

proptest! {
    #![proptest_config(cases(900))]

    /// Whatever a client sends while authenticating, pgmux ends with an
    /// error (never success without the password, never a panic, never a
    /// hang once the client stops talking).
    #[test]
    fn client_auth_any_client_bytes(user in 0..4usize, script in auth_script()) {
        static USERS: std::sync::LazyLock<Vec<UserConfig>> = std::sync::LazyLock::new(auth_users);
        let user = &USERS[user];
        let r = runtime().block_on(async {
            let (mut server, mut client) = tokio::io::duplex(1 << 16);
            let client_side = async move {
                let _ = client.write_all(&script).await;
                let _ = client.shutdown().await;
                let mut sink = [0u8; 4096];
                while client.read(&mut sink).await.is_ok_and(|n| n > 0) {}
            };
            let server_side = async move {
                let mut buf = BytesMut::new();
                let r = authenticate_client(&mut server, &mut buf, user, &Default::default()).await;
                drop(server);
                r
            };
            tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(client_side, server_side).1 }).await
        });
        let r = r.expect("authentication did not finish");
        prop_assert!(r.is_err(), "authenticated without the password");
    }
}

// ---------------------------------------------------------------------------
// The relay's scan of client messages after login (statement renames,
// injected Parse/Close/Sync, refusals), fed arbitrary client streams.

/// Client messages after login: extended-protocol shapes with statement
/// names a session reuses, simple queries that prepare or deallocate, other
/// frontend messages, invalid types and lengths.
pub(crate) fn client_stream() -> impl Strategy<Value = Vec<u8>> {
    use postgres_protocol::message::frontend as fe;
    let name = prop_oneof![Just(""), Just("s1"), Just("s2"), Just("pgmux_1"), Just("pgmux_noop")];
    let sql = prop_oneof![
        Just("SELECT 1"),
        Just("SELECT $1"),
        Just("SET x = 1"),
        Just("LISTEN c"),
        Just("DEALLOCATE s1"),
        Just("DEALLOCATE ALL"),
        Just("DISCARD ALL"),
        Just("PREPARE p AS SELECT 1"),
        Just("BEGIN"),
        Just("COMMIT"),
        Just(""),
    ];
    let message = prop_oneof![
        (name.clone(), sql.clone()).prop_map(|(n, q)| {
            let mut b = BytesMut::new();
            fe::parse(n, q, [], &mut b).unwrap();
            b.to_vec()
        }),
        (name.clone(), name.clone(), vec(any::<u8>(), 0..12)).prop_map(|(portal, n, rest)| {
            let mut body = [portal.as_bytes(), b"\0", n.as_bytes(), b"\0"].concat();
            body.extend_from_slice(&rest);
            frame(b'B', &body)
        }),
        (prop_oneof![Just(b'D'), Just(b'C')], prop_oneof![Just(b'S'), Just(b'P'), any::<u8>()], name.clone())
            .prop_map(|(t, kind, n)| frame(t, &[&[kind], n.as_bytes(), b"\0"].concat())),
        sql.prop_map(|q| {
            let mut b = BytesMut::new();
            fe::query(q, &mut b).unwrap();
            b.to_vec()
        }),
        Just(frame(b'E', b"\0\0\0\0\0")),
        Just(frame(b'S', b"")),
        Just(frame(b'H', b"")),
        Just(frame(b'H', b"x")),
        Just(frame(b'd', b"copy data")),
        Just(frame(b'c', b"")),
        Just(frame(b'X', b"")),
        // Arbitrary bodies of the inspected types, invalid types, garbage.
        (prop_oneof![Just(b'P'), Just(b'B'), Just(b'D'), Just(b'C'), Just(b'Q'), any::<u8>()], vec(any::<u8>(), 0..16))
            .prop_map(|(t, b)| frame(t, &b)),
        vec(any::<u8>(), 1..6),
    ];
    vec(message, 0..10).prop_map(|m| m.concat())
}

/// Scans `pieces` as the relay does when the server takes nothing yet (the
/// forwarded bytes stay in the buffer); stops where the relay would.
pub(crate) fn relay_scan(pieces: &[&[u8]], policy: OnSessionState) -> (Vec<u8>, Option<FrameError>, bool) {
    let registry = Registry::default();
    let mut client = ClientStatements::default();
    let mut prepared = PreparedSet::default();
    let mut link = Link::new();
    let mut buf = BytesMut::new();
    for p in pieces {
        buf.extend_from_slice(p);
        let mut scope = StatementScope {
            client: &mut client,
            registry: &registry,
            max_prepared: 2,
            on_session_state: policy,
            max_query_size: 1 << 20,
        };
        link.scan_client(&mut buf, &mut scope, &mut prepared).unwrap();
        if link.broken.is_some() || link.terminated {
            break;
        }
    }
    (buf.to_vec(), link.broken.clone(), link.terminated)
}

proptest! {
    #![proptest_config(cases(3000))]

    /// Any client stream, read in any pieces: never a panic, and the bytes
    /// for the server are the same as when read whole. When the client sent
    /// whole messages only, so are they: a chain of well-formed frames.
    #[test]
    fn relay_client_scan(
        data in client_stream(),
        cuts in vec(any::<usize>(), 0..6),
        policy in prop_oneof![Just(OnSessionState::Pin), Just(OnSessionState::Error), Just(OnSessionState::Allow)],
    ) {
        let whole = relay_scan(&[&data[..]], policy);
        let pieces = relay_scan(&chunks(&data, &cuts), policy);
        prop_assert_eq!(&whole, &pieces);
        let (out, broken, _) = whole;
        let (_, err, incomplete_at) = reference_frames(&data, MAX_MESSAGE_LEN);
        if broken.is_none() && err.is_none() && incomplete_at == data.len() {
            let (_, out_err, out_end) = reference_frames(&out, MAX_MESSAGE_LEN);
            prop_assert!(out_err.is_none() && out_end == out.len(), "output is not whole frames: {:?}", out);
        }
    }
}
