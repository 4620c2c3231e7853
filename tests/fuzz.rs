//! Property-based fuzzing of everything pgmux parses from untrusted bytes,
//! through the public API (no database needed). Private parsers have their
//! own `fuzz_tests` modules next to them: src/routing (the SQL lexer),
//! src/admin (console commands, /metrics request line) and src/client
//! (statement-name rewrites); `cargo test --lib fuzz` runs those.
//!
//! The default run takes about 8 s in a debug build on two cores. For a long
//! run, PROPTEST_CASES overrides every property's case count:
//!
//!     PROPTEST_CASES=200000 cargo test --release --test fuzz
//!     PROPTEST_CASES=200000 cargo test --release --lib fuzz
//!
//! Measured on two cores: 200 s and 10 s, after a ~4 min LTO build; so
//! PROPTEST_CASES=N takes about N ms. Megabyte-sized cases run N/100 times.
//!
//! A failure prints the shrunk input; pin it as a plain `#[test]` next to the fix.

use std::time::Duration;

use bytes::BytesMut;
use proptest::collection::vec;
use proptest::prelude::*;

use pgmux::protocol::frame::{CAPTURE_LIMIT, FrameError, HEADER_LEN, Header, MAX_MESSAGE_LEN, Scanner, split_frame};
use pgmux::protocol::startup::{MAX_STARTUP_LEN, StartupError, StartupPacket, split_startup};

/// `n` cases by default. The proptest! macro applies PROPTEST_CASES (and the
/// other PROPTEST_* variables) over any config, `with_cases` included.
fn cases(n: u32) -> ProptestConfig {
    // Regressions are pinned as plain #[test]s, not in files proptest writes.
    ProptestConfig { cases: n, failure_persistence: None, ..ProptestConfig::default() }
}

/// Runs `test` over `strategy` as proptest! would, with `n` cases, or a
/// hundredth of PROPTEST_CASES when set: for properties whose cases are a
/// megabyte each, which would otherwise take most of a long run. (A
/// TestRunner built by hand, unlike the macro, keeps the case count given.)
fn run_heavy<S: Strategy>(n: u32, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>) {
    let long = std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse::<u32>().ok());
    let mut runner = proptest::test_runner::TestRunner::new(cases(long.map_or(n, |c| (c / 100).max(n))));
    if let Err(e) = runner.run(&strategy, test) {
        panic!("{e}\n{runner}");
    }
}

/// A global allocator that reports, per thread, the largest single
/// allocation made while [`alloc_probe::measure`] runs: how the properties
/// check that a declared length does not turn into a reservation.
mod alloc_probe {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    pub struct Probe;

    thread_local! {
        /// (measuring, largest allocation, number of allocations).
        static STATE: Cell<(bool, usize, usize)> = const { Cell::new((false, 0, 0)) };
    }

    fn note(size: usize) {
        // `try_with`: the slot is gone while the thread exits. A const-initialised
        // `Cell` of plain integers neither allocates nor registers a destructor.
        let _ = STATE.try_with(|s| {
            let (on, largest, count) = s.get();
            if on {
                s.set((true, largest.max(size), count + 1));
            }
        });
    }

    unsafe impl GlobalAlloc for Probe {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            note(layout.size());
            unsafe { System.alloc(layout) }
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            note(layout.size());
            unsafe { System.alloc_zeroed(layout) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            unsafe { System.dealloc(ptr, layout) }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            note(new_size);
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }

    /// Runs `f`; returns its result, the largest allocation it made and how many.
    pub fn measure<R>(f: impl FnOnce() -> R) -> (R, usize, usize) {
        STATE.with(|s| s.set((true, 0, 0)));
        let r = f();
        let (_, largest, count) = STATE.with(|s| s.replace((false, 0, 0)));
        (r, largest, count)
    }
}

#[global_allocator]
static ALLOC: alloc_probe::Probe = alloc_probe::Probe;

/// `data` cut at `cuts` (taken modulo its length): the same bytes as a peer
/// might deliver them, in arbitrary reads.
fn chunks<'a>(data: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut at: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
    at.extend([0, data.len()]);
    at.sort_unstable();
    at.dedup();
    at.windows(2).map(|w| &data[w[0]..w[1]]).collect()
}

fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// Tags the scanner tests capture; the strategies favour them.
fn captured(tag: u8) -> bool {
    matches!(tag, b'Z' | b'E')
}

fn any_tag() -> impl Strategy<Value = u8> {
    prop_oneof![Just(b'Z'), Just(b'E'), Just(b'D'), Just(b'Q'), any::<u8>()]
}

/// A byte stream of mostly well-formed frames (some longer than
/// CAPTURE_LIMIT) with garbage between them: bad or huge lengths, partial headers.
fn frame_stream() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        6 => (any_tag(), vec(any::<u8>(), 0..40)).prop_map(|(t, b)| frame(t, &b)),
        1 => (any_tag(), any::<u8>(), 0..3 * CAPTURE_LIMIT).prop_map(|(t, fill, n)| frame(t, &vec![fill; n])),
        1 => vec(any::<u8>(), 1..12),
    ];
    vec(piece, 0..10).prop_map(|pieces| pieces.concat())
}

/// One frame as the protocol defines it: tag, absolute start and end.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RefFrame {
    tag: u8,
    start: usize,
    end: usize,
}

/// The frames of `data` read straight from the definition, the error that
/// ends them (if any), and where the first incomplete frame starts.
fn reference_frames(data: &[u8], max_len: u32) -> (Vec<RefFrame>, Option<FrameError>, usize) {
    let mut frames = Vec::new();
    let mut pos = 0;
    while data.len() - pos >= HEADER_LEN {
        let tag = data[pos];
        let len = u32::from_be_bytes(data[pos + 1..pos + 5].try_into().unwrap());
        if len < 4 {
            return (frames, Some(FrameError::BadLength { tag, len }), pos);
        }
        if len > max_len {
            return (frames, Some(FrameError::TooLong { tag, len, max: max_len }), pos);
        }
        let end = pos + 1 + len as usize;
        if end > data.len() {
            break;
        }
        frames.push(RefFrame { tag, start: pos, end });
        pos = end;
    }
    (frames, None, pos)
}

/// What a scan reported per frame: tag, absolute start (if in the scanned
/// buffer), absolute end, captured body.
type Seen = Vec<(u8, Option<usize>, usize, Option<Vec<u8>>)>;

fn max_len_small() -> impl Strategy<Value = u32> {
    // split_frame reserves up to max_len for a frame still arriving: its
    // callers pass at most 1 MiB, and so do these tests (a 4 GiB bound would
    // make them reserve gigabytes on purpose).
    prop_oneof![0..64u32, 0..70_000u32, Just(8 * 1024), Just(1 << 20)]
}

fn max_len_any() -> impl Strategy<Value = u32> {
    prop_oneof![Just(MAX_MESSAGE_LEN), any::<u32>(), 0..70_000u32]
}

// ---------------------------------------------------------------------------
// Frame layer

proptest! {
    #![proptest_config(cases(6000))]

    /// Header::parse is total and agrees with the definition of a header.
    #[test]
    fn header_parse_matches_definition(buf in vec(any::<u8>(), 0..10), max_len in max_len_any()) {
        match Header::parse(&buf, max_len) {
            Ok(None) => prop_assert!(buf.len() < HEADER_LEN),
            Ok(Some(h)) => {
                let len = u32::from_be_bytes(buf[1..5].try_into().unwrap());
                prop_assert_eq!((h.tag, h.len), (buf[0], len));
                prop_assert!((4..=max_len).contains(&len));
                prop_assert_eq!(h.frame_len(), len as usize + 1);
                prop_assert_eq!(h.body_len(), len as usize - 4);
            }
            Err(FrameError::BadLength { tag, len }) => prop_assert!(len < 4 && tag == buf[0]),
            Err(FrameError::TooLong { len, max, .. }) => prop_assert!(len > max && max == max_len && len >= 4),
            Err(e) => prop_assert!(false, "unexpected error {e:?}"),
        }
    }
}

proptest! {
    #![proptest_config(cases(1500))]

    /// split_frame over a stream read in arbitrary pieces yields exactly the
    /// frames of the definition, then its error; and it never allocates more
    /// than the bytes received plus a frame of at most `max_len` allow.
    #[test]
    fn split_frame_in_any_chunks(data in frame_stream(), cuts in vec(any::<usize>(), 0..8), max_len in max_len_small()) {
        let (want, want_err, _) = reference_frames(&data, max_len);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut err = None;
        let mut received = 0usize;
        'read: for chunk in chunks(&data, &cuts) {
            buf.extend_from_slice(chunk);
            received += chunk.len();
            loop {
                let cap_before = buf.capacity();
                let (r, largest, _) = alloc_probe::measure(|| split_frame(&mut buf, max_len));
                // Growth is amortised (doubling), on top of what was received.
                let bound = 2 * (received + max_len as usize + 1).max(cap_before) + 64 * 1024;
                prop_assert!(largest <= bound, "allocated {largest} bytes (bound {bound})");
                match r {
                    Ok(Some((tag, body))) => got.push((tag, body.to_vec())),
                    Ok(None) => break,
                    Err(e) => {
                        err = Some(e);
                        break 'read;
                    }
                }
            }
        }
        let want: Vec<(u8, Vec<u8>)> = want.iter().map(|f| (f.tag, data[f.start + HEADER_LEN..f.end].to_vec())).collect();
        prop_assert_eq!(got, want);
        prop_assert_eq!(err, want_err);
    }

    /// A Scanner fed a stream in arbitrary pieces, stopped after arbitrary
    /// frames, reports the same frames (tag, position, captured body) and
    /// error as the definition, keeps at most a partial header unconsumed,
    /// and holds at most CAPTURE_LIMIT bytes of a captured body.
    #[test]
    fn scanner_in_any_chunks(
        data in frame_stream(),
        cuts in vec(any::<usize>(), 0..8),
        stops in vec(any::<bool>(), 0..16),
        max_len in max_len_any(),
    ) {
        let (want, want_err, incomplete_at) = reference_frames(&data, max_len);
        let mut scanner = Scanner::new(max_len);
        let mut pending: Vec<u8> = Vec::new();
        // Absolute offset of pending[0] in `data`.
        let mut base = 0usize;
        let mut seen: Seen = Vec::new();
        let mut err = None;
        'read: for chunk in chunks(&data, &cuts) {
            pending.extend_from_slice(chunk);
            loop {
                let mut stopped = false;
                let n_before = seen.len();
                let (r, largest, _) = alloc_probe::measure(|| {
                    scanner.scan(&pending, captured, |f| {
                        seen.push((f.tag, f.start.map(|s| s + base), f.end + base, f.body.map(<[u8]>::to_vec)));
                        let go_on = !stops.get(seen.len() - 1).copied().unwrap_or(false);
                        stopped = !go_on;
                        go_on
                    })
                });
                prop_assert!(largest <= 2 * CAPTURE_LIMIT + 4096, "allocated {largest} bytes");
                match r {
                    Ok(used) => {
                        prop_assert!(used <= pending.len());
                        if !stopped {
                            prop_assert!(pending.len() - used < HEADER_LEN, "left {} bytes", pending.len() - used);
                        }
                        // Every frame reported lies within what was walked.
                        for s in &seen[n_before..] {
                            prop_assert!(s.2 <= base + used);
                        }
                        pending.drain(..used);
                        base += used;
                        if !stopped {
                            break;
                        }
                    }
                    Err(e) => {
                        err = Some(e);
                        break 'read;
                    }
                }
            }
        }
        prop_assert_eq!(err.clone(), want_err);
        prop_assert_eq!(seen.len(), want.len());
        for (s, w) in seen.iter().zip(&want) {
            prop_assert_eq!((s.0, s.2), (w.tag, w.end));
            // The start is reported when the frame began in the scanned buffer.
            if let Some(start) = s.1 {
                prop_assert_eq!(start, w.start);
            }
            let body = &data[w.start + HEADER_LEN..w.end];
            let want_body = captured(w.tag).then(|| body[..body.len().min(CAPTURE_LIMIT)].to_vec());
            prop_assert_eq!(&s.3, &want_body);
        }
        if err.is_none() {
            // Mid-frame exactly when a whole header of an unfinished frame was read.
            prop_assert_eq!(scanner.at_boundary(), data.len() - incomplete_at < HEADER_LEN);
        }
    }

    /// The same stream scanned whole, and scanned a byte at a time, agree.
    #[test]
    fn scanner_whole_equals_bytewise(data in frame_stream(), max_len in max_len_any()) {
        let collect = |pieces: Vec<&[u8]>| {
            let mut scanner = Scanner::new(max_len);
            let mut pending = Vec::new();
            let mut base = 0;
            let mut out = Vec::new();
            for p in pieces {
                pending.extend_from_slice(p);
                match scanner.scan(&pending, captured, |f| {
                    out.push((f.tag, f.end + base, f.body.map(<[u8]>::to_vec)));
                    true
                }) {
                    Ok(used) => {
                        pending.drain(..used);
                        base += used;
                    }
                    Err(e) => return (out, Some(e)),
                }
            }
            (out, None)
        };
        let whole = collect(vec![&data[..]]);
        let bytewise = collect(data.chunks(1).collect());
        prop_assert_eq!(whole, bytewise);
    }
}

/// A header declaring 1 GiB, above the caller's bound, reserves nothing: the
/// allocation a peer can cause is capped by `max_len`, not by its claim.
#[test]
fn declared_gigabyte_reserves_nothing() {
    let mut buf = BytesMut::from(&b"R\x40\x00\x00\x00"[..]);
    let (r, largest, count) = alloc_probe::measure(|| split_frame(&mut buf, 1 << 20));
    assert!(matches!(r, Err(FrameError::TooLong { .. })), "{r:?}");
    assert_eq!((largest, count), (0, 0));
    // Within the bound, the reservation is the declared frame, no more.
    let mut buf = BytesMut::from(&b"R\x00\x01\x00\x00"[..]);
    let (r, largest, _) = alloc_probe::measure(|| split_frame(&mut buf, 1 << 20));
    assert_eq!(r, Ok(None));
    assert!((0x1_0001..=2 * 0x1_0001).contains(&largest), "{largest}");
}

// ---------------------------------------------------------------------------
// Startup packets

/// A startup-phase byte stream: framed packets with plausible codes, or junk.
fn startup_stream() -> impl Strategy<Value = Vec<u8>> {
    let code = prop_oneof![
        Just(80877103i32),
        Just(80877104),
        Just(80877102),
        Just(196608),
        (0..4u16).prop_map(|minor| 196608 + i32::from(minor)),
        any::<i32>(),
    ];
    let body =
        prop_oneof![vec(any::<u8>(), 0..32), vec(prop_oneof![Just(0u8), Just(b'a'), Just(b'_'), any::<u8>()], 0..32),];
    let packet = prop_oneof![
        6 => (code, body).prop_map(|(code, body)| {
            let mut v = ((body.len() + 8) as u32).to_be_bytes().to_vec();
            v.extend_from_slice(&code.to_be_bytes());
            v.extend_from_slice(&body);
            v
        }),
        1 => vec(any::<u8>(), 1..12),
    ];
    vec(packet, 0..4).prop_map(|p| p.concat())
}

/// Splits every packet out of `data` read in `pieces`; stops at the first error.
fn split_all_startup(pieces: Vec<&[u8]>) -> Result<Vec<StartupPacket>, StartupError> {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for p in pieces {
        buf.extend_from_slice(p);
        let cap_before = buf.capacity();
        loop {
            let (r, largest, _) = alloc_probe::measure(|| split_startup(&mut buf));
            assert!(largest <= 2 * (MAX_STARTUP_LEN.max(cap_before)) + 1024, "allocated {largest}");
            match r? {
                Some(packet) => out.push(packet),
                None => break,
            }
        }
    }
    Ok(out)
}

/// A name or value for a startup parameter: any text without NUL.
fn param_text() -> impl Strategy<Value = String> {
    prop_oneof![any::<String>(), "[a-z_]{0,12}", Just("_pq_.x".to_owned())].prop_map(|s| s.replace('\0', ""))
}

proptest! {
    #![proptest_config(cases(3000))]

    /// Startup-phase packets read in any pieces split the same as read whole
    /// (packets, then the same error), never panic, and never reserve more
    /// than Postgres' startup packet bound.
    #[test]
    fn split_startup_in_any_chunks(data in startup_stream(), cuts in vec(any::<usize>(), 0..6)) {
        let whole = split_all_startup(vec![&data[..]]);
        let pieces = split_all_startup(chunks(&data, &cuts));
        prop_assert_eq!(whole, pieces);
    }

    /// A StartupMessage written by postgres-protocol (what every libpq-style
    /// client sends) with arbitrary parameters reads back exactly: the
    /// `_pq_.` ones as protocol options, the rest as parameters, in order.
    #[test]
    fn startup_message_round_trips(params in vec((param_text(), param_text()), 0..6), cuts in vec(any::<usize>(), 0..4)) {
        // An empty name would end the list early: the protocol cannot carry it.
        let params: Vec<(String, String)> = params.into_iter().filter(|(k, _)| !k.is_empty()).collect();
        let mut out = BytesMut::new();
        postgres_protocol::message::frontend::startup_message(params.iter().map(|(k, v)| (k.as_str(), v.as_str())), &mut out)
            .unwrap();
        let r = split_all_startup(chunks(&out, &cuts));
        if out.len() > MAX_STARTUP_LEN {
            prop_assert_eq!(r, Err(StartupError::BadLength(out.len())));
            return Ok(());
        }
        let packets = r.unwrap();
        let [StartupPacket::Startup(s)] = &packets[..] else {
            return Err(TestCaseError::fail(format!("{packets:?}")));
        };
        let (options, plain): (Vec<_>, Vec<_>) = params.iter().cloned().partition(|(k, _)| k.starts_with("_pq_."));
        prop_assert_eq!(s.minor, 0);
        prop_assert_eq!(&s.params, &plain);
        prop_assert_eq!(&s.protocol_options, &options.into_iter().map(|(k, _)| k).collect::<Vec<_>>());
    }
}

// ---------------------------------------------------------------------------
// SCRAM, server side (pgmux verifying a client)

use pgmux::auth::scram::{ScramError, ScramServer, ScramVerifier};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

/// Byte strings that mean something to a SCRAM parser, for mutations.
const SCRAM_BITS: &[&[u8]] = &[
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

fn scram_bits() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![proptest::sample::select(SCRAM_BITS).prop_map(<[u8]>::to_vec), vec(any::<u8>(), 0..4)]
}

/// One edit of a message: where (modulo its length), how much, and with what.
#[derive(Debug, Clone)]
enum Edit {
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

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    let edit = prop_oneof![
        4 => (any::<usize>(), 0..4usize, scram_bits()).prop_map(|(at, len, with)| Edit::Replace { at, len, with }),
        1 => any::<usize>().prop_map(|at| Edit::Truncate { at }),
        1 => (any::<usize>(), 1..12usize).prop_map(|(at, len)| Edit::Duplicate { at, len }),
    ];
    vec(edit, 1..4)
}

fn apply(msg: &[u8], edits: &[Edit]) -> Vec<u8> {
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
fn cheap_verifier(password: &str, salt: &[u8], iterations: u32) -> ScramVerifier {
    ScramVerifier::from_password_with_salt(password, salt.to_vec(), iterations)
}

/// A real client (postgres-protocol's, as libpq behaves) against `server`,
/// with `tamper_first`/`tamper_final` applied to what the client sends.
/// `Ok` only if the server accepted the proof and the client the signature.
fn scram_exchange(
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

fn salt() -> impl Strategy<Value = Vec<u8>> {
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

use pgmux::auth::{BackendLoginError, login_backend};
use pgmux::protocol::backend as msg;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Reads one frame (`Some(tag, body)`) from `stream`, `None` at EOF.
async fn read_frame(stream: &mut DuplexStream, buf: &mut BytesMut) -> Option<(u8, BytesMut)> {
    loop {
        if let Some(f) = split_frame(buf, 1 << 16).unwrap() {
            return Some(f);
        }
        if stream.read_buf(buf).await.ok()? == 0 {
            return None;
        }
    }
}

async fn read_startup(stream: &mut DuplexStream, buf: &mut BytesMut) -> Option<()> {
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
async fn tampering_server(
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
fn login_script() -> impl Strategy<Value = Vec<u8>> {
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
async fn login_against(script: Vec<u8>) -> Result<pgmux::auth::ServerHello, BackendLoginError> {
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
        let r = login_backend(&mut client, "bob", "db", Some("pw"), &[]).await;
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
                let r = login_backend(&mut client, "bob", "db", Some("pw"), &[]).await;
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

// ---------------------------------------------------------------------------
// SQL classification (read/write routing)

use pgmux::routing::intent_of;
use pgmux::routing::route::Intent;
use pgmux::sql::{Class, Classified, Hint, WriteFunctions, classify};

/// Pieces of SQL that steer the lexer: quotes of every kind, comments,
/// dollar quotes, parentheses, keywords the classifier acts on, non-UTF-8.
const SQL_BITS: &[&str] = &[
    "SELECT ",
    "select 1",
    "WITH x AS (",
    "VALUES (1)",
    "TABLE t",
    "(",
    ")",
    ";",
    ",",
    ".",
    " ",
    "\n",
    "'",
    "''",
    "'a\\'",
    "e'",
    "E'\\'",
    "\\",
    "\"",
    "\"\"",
    "U&\"",
    "u&'",
    "$",
    "$$",
    "$a$",
    "$A$",
    "$1",
    "--",
    "-- x\n",
    "/*",
    "*/",
    "/* a /* b */ c */",
    "/* pgmux:primary */",
    "/* pgmux:replica */",
    "1e",
    "1.5e-3",
    ".5",
    "0x1F",
    "INSERT",
    "UPDATE",
    "DELETE",
    "MERGE",
    "INTO",
    "TEMP",
    "FOR",
    "SHARE",
    "KEY",
    "NO",
    "nextval(",
    "x.nextval(",
    "\"NEXTVAL\"(",
    "EXPLAIN ",
    "ANALYZE ",
    "EXPLAIN (ANALYZE) ",
    "EXPLAIN (ANALYZE off) ",
    "COPY ",
    "COPY (",
    " TO STDOUT",
    "FROM",
    "BEGIN",
    "BEGIN ATOMIC ",
    "END",
    "CASE ",
    "COMMIT",
    "AND CHAIN",
    "ROLLBACK",
    "TO",
    "SAVEPOINT",
    "PREPARE",
    "TRANSACTION",
    "SET ",
    "transaction_read_only = on",
    "READ ONLY",
    "READ WRITE",
    "CREATE ",
    "CREATE TEMP TABLE t",
    "SHOW x",
    "\u{e9}",
    "\u{a0}",
];

/// SQL-shaped inputs: lexically awkward soup, plain bytes, and soup with invalid UTF-8.
fn sql_soup() -> impl Strategy<Value = Vec<u8>> {
    let soup = vec(proptest::sample::select(SQL_BITS), 0..24).prop_map(|v| v.concat().into_bytes());
    prop_oneof![
        4 => soup.clone(),
        1 => vec(any::<u8>(), 0..64),
        1 => (soup, vec((any::<usize>(), any::<u8>()), 1..4)).prop_map(|(mut s, noise)| {
            for (at, b) in noise {
                let at = at % (s.len() + 1);
                s.insert(at, b);
            }
            s
        }),
    ]
}

/// `classify` with the built-in write functions plus a configured one.
fn wf() -> WriteFunctions {
    WriteFunctions::new(["audit_*", "billing.charge"])
}

/// Everything but the hint.
fn unhinted(c: Classified) -> Classified {
    Classified { hint: None, ..c }
}

/// Inputs a hostile client could send to make classification slow or deep:
/// one piece repeated up to 1 MiB, after an ordinary start.
fn pathological_sql() -> impl Strategy<Value = Vec<u8>> {
    const MIB: usize = 1 << 20;
    (
        prop_oneof![Just(""), Just("SELECT "), Just("EXPLAIN ANALYZE "), Just("CREATE FUNCTION f() BEGIN ATOMIC ")],
        proptest::sample::select(SQL_BITS),
        1..=MIB,
    )
        .prop_map(|(head, piece, n)| {
            let mut s = head.as_bytes().to_vec();
            s.extend(piece.as_bytes().repeat(n.min(MIB / piece.len().max(1))));
            s
        })
}

proptest! {
    #![proptest_config(cases(9000))]

    /// Classification never panics, never allocates (the module promises a
    /// pure function), is deterministic, and an ambiguous text is never a read.
    #[test]
    fn classify_total(sql in sql_soup()) {
        let wf = wf();
        let (c, _, allocations) = alloc_probe::measure(|| classify(&sql, &wf));
        prop_assert_eq!(allocations, 0);
        prop_assert_eq!(c, classify(&sql, &wf));
        if c.ambiguous {
            prop_assert_ne!(c.class, Class::Read);
        }
        prop_assert!(usize::from(c.statements) <= sql.len());
    }

    /// `/* pgmux:primary */` (or `-- pgmux:primary`) in front of any text
    /// routes it to the primary, and changes nothing but the hint.
    #[test]
    fn primary_hint_prefix(sql in sql_soup(), line in any::<bool>()) {
        let wf = wf();
        let prefix: &[u8] = if line { b"-- pgmux:primary\n" } else { b"/* pgmux:primary */ " };
        let hinted = [prefix, &sql].concat();
        let c = classify(&hinted, &wf);
        prop_assert_eq!(c.hint, Some(Hint::Primary));
        prop_assert_eq!(unhinted(c), unhinted(classify(&sql, &wf)));
        prop_assert_eq!(intent_of([&hinted[..]], &wf), Intent::HintPrimary);
        let replica = [&b"/* pgmux:replica */ "[..], &sql].concat();
        prop_assert_eq!(intent_of([&replica[..]], &wf), Intent::HintReplica);
    }

    /// Several statements are a read only when each one is: two reads joined
    /// by `;` stay a read, and a text whose first statement is not a read
    /// never becomes one by what follows it.
    #[test]
    fn reads_compose(a in statement_like(), b in statement_like()) {
        let wf = wf();
        let (ca, cb) = (classify(&a, &wf), classify(&b, &wf));
        // Inputs that end inside a literal or comment would swallow the `;`.
        if ca.ambiguous || cb.ambiguous || ca.class == Class::Empty || cb.class == Class::Empty {
            return Ok(());
        }
        let joined = classify(&[&a[..], b"\n;\n", &b[..]].concat(), &wf);
        if ca.class == Class::Read && cb.class == Class::Read {
            prop_assert_eq!(joined.class, Class::Read);
        }
        if ca.class != Class::Read {
            prop_assert_ne!(joined.class, Class::Read);
        }
    }
}

/// A word the lexer sees as code: something complete and self-delimiting.
fn code_token() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z_][a-z0-9_$]{0,8}",
        "[0-9]{1,4}(\\.[0-9]{1,3})?",
        "'([^'\\\\]|'')*'".prop_map(|s| s),
        "\"([^\"]|\"\"){1,6}\"",
        "\\$q\\$[^$]{0,8}\\$q\\$",
        "/\\*[^*/]{0,8}\\*/",
        "--[^\n\r]{0,8}\n",
        proptest::sample::select(vec![
            "(", ")", ",", "+", "-", "*", "=", "<", ">", "::", "[", "]", "$1", "FOR", "SHARE"
        ])
        .prop_map(str::to_owned),
    ]
}

/// A statement of some kind followed by code words, or soup.
fn statement_like() -> impl Strategy<Value = Vec<u8>> {
    let head = proptest::sample::select(vec![
        "SELECT",
        "VALUES",
        "TABLE t",
        "(SELECT",
        "WITH x AS (SELECT 1)",
        "SHOW",
        "EXPLAIN",
        "EXPLAIN ANALYZE",
        "COPY t TO STDOUT",
        "COPY (SELECT 1) TO STDOUT",
        // Openings and endings that could join across a `;`.
        "COPY (SELECT",
        "COPY t (",
        "EXPLAIN ANALYZE COPY (",
        "TO STDOUT",
        ") TO STDOUT",
        "SHOW (",
        "UPDATE t SET",
        "BEGIN",
        "BEGIN READ ONLY",
        "COMMIT",
        "ROLLBACK",
        "SET",
        "SET TRANSACTION",
        "CREATE TEMP TABLE",
        "CREATE TABLE",
        "DECLARE",
        "PREPARE",
    ]);
    let structured =
        (head, vec(code_token(), 0..6)).prop_map(|(h, t)| [vec![h.to_owned()], t].concat().join(" ").into_bytes());
    prop_oneof![3 => structured, 1 => sql_soup()]
}

proptest! {
    #![proptest_config(cases(6000))]

    /// A query (SELECT, WITH, VALUES, TABLE or a parenthesised one) with
    /// INSERT/UPDATE/DELETE/MERGE/INTO as a code word anywhere (not after a
    /// `.`, where it names a column), or a call of a write function, is never
    /// a read. (Outside queries the words are not promised to matter:
    /// `EXPLAIN UPDATE ...` only plans, `SHOW x` reads.)
    #[test]
    fn write_word_in_query_is_never_read(
        first in proptest::sample::select(vec!["SELECT", "select", "WITH", "VALUES", "TABLE", "(", "( SELECT"]),
        before in vec(code_token(), 0..8),
        after in vec(code_token(), 0..8),
        write in proptest::sample::select(vec![
            "INSERT", "update", "Delete", "MERGE", "into", "nextval (", "pg_catalog.NEXTVAL(", "\"setval\"(",
            "pg_advisory_lock(", "audit_log(", "x.charge(", "FOR UPDATE", "for no key update", "FOR KEY SHARE",
        ]),
    ) {
        let sql = [&[first.to_owned()][..], &before, &[write.to_owned()], &after].concat().join(" ");
        let c = classify(sql.as_bytes(), &wf());
        prop_assert_ne!(c.class, Class::Read, "{}", sql);
    }
}

/// Linear time, bounded stack: up to 1 MiB of one repeated piece (deep
/// parentheses, nested COPY/EXPLAIN, endless comments or quotes) classifies
/// well under a second, even in a debug build.
#[test]
fn classify_pathological_input_is_fast() {
    let wf = wf();
    run_heavy(48, pathological_sql(), |sql| {
        let started = std::time::Instant::now();
        let c = classify(&sql, &wf);
        let took = started.elapsed();
        prop_assert!(took < Duration::from_secs(1), "{} bytes took {took:?}", sql.len());
        if c.ambiguous {
            prop_assert_ne!(c.class, Class::Read);
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------
// Configuration

use pgmux::config::{Config, ConfigError};

/// The shipped example, with a password that must never appear in an error.
fn base_config() -> String {
    include_str!("../proxy.toml").replace("password = \"postgres\"", "password = \"Pw-7qZ-secret\"")
}

const CONFIG_SECRET: &str = "Pw-7qZ-secret";

/// Values of every type and shape a key could be given, as TOML text
/// (some not TOML at all).
const CONFIG_VALUES: &[&str] = &[
    "\"5s\"",
    "\"0\"",
    "0",
    "\"250ms\"",
    "\"10m\"",
    "\"1h\"",
    "\"2min\"",
    "\"-1s\"",
    "\"1.5s\"",
    "\"5 s\"",
    "\"s\"",
    "\"\"",
    "\"5x\"",
    "\"18446744073709551615h\"",
    "\"18446744073709551615ms\"",
    "\"99999999999999999999s\"",
    "5",
    "-1",
    "1",
    "4294967296",
    "18446744073709551615",
    "9223372036854775807",
    "-9223372036854775808",
    "1e309",
    "nan",
    "-inf",
    "1.5",
    "0x10",
    "true",
    "false",
    "[]",
    "[\"a\"]",
    "[1, \"a\"]",
    "[[]]",
    "{}",
    "{ addr = \"h:1\" }",
    "{ addr = \"h:1\", weight = -1 }",
    "{ addr = \"h:1\", weight = 4294967296 }",
    "{ addr = \"h:1\", extra = 1 }",
    "[\"h:1\", { addr = \"h:2\", weight = 2 }]",
    "\"127.0.0.1:6432\"",
    "\"[::1]:5432\"",
    "\"[::1]\"",
    "\"::1:5432\"",
    "\"h:0\"",
    "\"h:65536\"",
    "\":5432\"",
    "\"a..b:1\"",
    "\"-a:1\"",
    "\"db.internal:5432\"",
    "\"env:\"",
    "\"env:PGMUX_FUZZ_UNSET\"",
    "\"SCRAM-SHA-256$4096:c2FsdA==$AAAA:AAAA\"",
    "\"md5a3556571e93b0d20722ba62be61e8c2d\"",
    "\"\\u0000\"",
    "\"\\n\"",
    "\"é\"",
    "\"transaction\"",
    "\"session\"",
    "\"pin\"",
    "\"error\"",
    "\"allow\"",
    "\"require\"",
    "\"verify-full\"",
    "\"lsn\"",
    "\"window\"",
    "\"user\"",
    "\"random\"",
    "\"scram-sha-256\"",
    "\"md5\"",
    "\"trust\"",
    "\"postgres\"",
    "'literal'",
    "\"\"\"multi\nline\"\"\"",
    "\"unterminated",
    "[1,",
    "{ a = ",
    "1979-05-27T07:32:00Z",
];

const CONFIG_KEYS: &[&str] = &[
    "listen",
    "metrics_listen",
    "workers",
    "pool_mode",
    "max_client_conn",
    "query_wait_timeout",
    "idle_transaction_timeout",
    "query_timeout",
    "max_query_size",
    "server_idle_timeout",
    "server_lifetime",
    "shutdown_timeout",
    "server_connect_timeout",
    "max_prepared_statements",
    "on_session_state",
    "tls_cert",
    "tls_key",
    "tls_mode",
    "server_tls",
    "server_tls_ca",
    "read_write_split",
    "read_your_writes",
    "sticky_window",
    "sticky_scope",
    "max_replica_lag",
    "max_replica_lag_bytes",
    "load_balance",
    "monitor_interval",
    "write_functions",
    "users",
    "name",
    "dbname",
    "primary",
    "replicas",
    "pool_size",
    "min_pool_size",
    "password",
    "server_password",
    "auth",
    "unknown_key",
    "\"quoted key\"",
    "\"new\\nline\"",
    "a.b",
    "é",
];

const CONFIG_LINES: &[&str] = &[
    "[proxy]",
    "[routing]",
    "[admin]",
    "[[databases]]",
    "[[users]]",
    "[databases]",
    "[[proxy]]",
    "[unknown]",
    "name = \"x\"",
    "primary = \"h:1\"",
    "auth = \"trust\"",
    "[",
    "]]",
    "= 1",
    "key =",
    "# comment",
    "",
    "\"k\" = 1",
    "proxy.workers = 2",
    "[[databases]]\nname = \"postgres\"\nprimary = \"h:1\"",
];

#[derive(Debug, Clone)]
enum ConfigEdit {
    SetValue(usize, usize),
    SetKey(usize, usize),
    Delete(usize),
    Duplicate(usize),
    Insert(usize, usize),
    Truncate(usize),
}

fn config_edits() -> impl Strategy<Value = Vec<ConfigEdit>> {
    let edit = prop_oneof![
        6 => (any::<usize>(), 0..CONFIG_VALUES.len()).prop_map(|(l, v)| ConfigEdit::SetValue(l, v)),
        2 => (any::<usize>(), 0..CONFIG_KEYS.len()).prop_map(|(l, k)| ConfigEdit::SetKey(l, k)),
        2 => any::<usize>().prop_map(ConfigEdit::Delete),
        1 => any::<usize>().prop_map(ConfigEdit::Duplicate),
        2 => (any::<usize>(), 0..CONFIG_LINES.len()).prop_map(|(l, i)| ConfigEdit::Insert(l, i)),
        1 => any::<usize>().prop_map(ConfigEdit::Truncate),
    ];
    vec(edit, 1..5)
}

fn edit_config(text: &str, edits: &[ConfigEdit]) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    for e in edits {
        let n = lines.len().max(1);
        match *e {
            ConfigEdit::SetValue(l, v) => {
                if let Some((key, _)) = lines.get(l % n).and_then(|line| line.split_once(" = ")) {
                    lines[l % n] = format!("{key} = {}", CONFIG_VALUES[v]);
                }
            }
            ConfigEdit::SetKey(l, k) => {
                if let Some((_, value)) = lines.get(l % n).and_then(|line| line.split_once(" = ")) {
                    lines[l % n] = format!("{} = {value}", CONFIG_KEYS[k]);
                }
            }
            ConfigEdit::Delete(l) if !lines.is_empty() => {
                lines.remove(l % n);
            }
            ConfigEdit::Duplicate(l) if !lines.is_empty() => lines.insert(l % n, lines[l % n].clone()),
            ConfigEdit::Insert(l, i) => lines.insert(l % (lines.len() + 1), CONFIG_LINES[i].to_owned()),
            ConfigEdit::Truncate(at) => {
                let mut text = lines.join("\n");
                let mut at = at % (text.len() + 1);
                while !text.is_char_boundary(at) {
                    at -= 1;
                }
                text.truncate(at);
                lines = text.lines().map(str::to_owned).collect();
            }
            _ => {}
        }
    }
    lines.join("\n")
}

/// Parses `text`; on error, checks every line of the message starts with
/// `origin:line:col: ` inside the text, and never shows the password.
fn check_config(text: &str) -> Result<(), TestCaseError> {
    match Config::parse(text, "fuzz.toml") {
        Ok(_) => {}
        Err(ConfigError::Invalid(msg)) => {
            prop_assert!(!msg.is_empty());
            let lines = text.split('\n').count();
            for line in msg.lines() {
                let mut parts = line.splitn(4, ':');
                let (origin, l, c) = (parts.next(), parts.next(), parts.next());
                prop_assert_eq!(origin, Some("fuzz.toml"), "no origin: {:?}\nin {:?}", line, msg);
                let l: usize =
                    l.and_then(|l| l.parse().ok()).ok_or_else(|| TestCaseError::fail(format!("line in {line:?}")))?;
                let c: usize =
                    c.and_then(|c| c.parse().ok()).ok_or_else(|| TestCaseError::fail(format!("col in {line:?}")))?;
                prop_assert!((1..=lines).contains(&l) && c >= 1, "{line:?} outside the text");
                prop_assert!(parts.next().is_some_and(|rest| rest.starts_with(' ')), "{line:?}");
            }
            prop_assert!(!msg.contains(CONFIG_SECRET), "password in {msg:?}");
        }
        Err(e) => prop_assert!(false, "parse returned an I/O error: {e}"),
    }
    Ok(())
}

proptest! {
    #![proptest_config(cases(4500))]

    /// The shipped config with values of the wrong type, shape or size,
    /// renamed, deleted, duplicated or inserted keys and tables, or cut
    /// off: a config or errors that each carry `file:line:col:`, never a
    /// panic, never the password.
    #[test]
    fn config_mutations(edits in config_edits()) {
        check_config(&edit_config(&base_config(), &edits))?;
    }

    /// Any text at all: the same.
    #[test]
    fn config_any_text(text in prop_oneof![
        any::<String>(),
        vec(prop_oneof![
            proptest::sample::select(CONFIG_LINES).prop_map(str::to_owned),
            (proptest::sample::select(CONFIG_KEYS), proptest::sample::select(CONFIG_VALUES)).prop_map(|(k, v)| format!("{k} = {v}")),
            any::<String>(),
        ], 0..8).prop_map(|v| v.join("\n")),
    ]) {
        check_config(&text)?;
    }
}

#[test]
fn base_config_is_valid() {
    Config::parse(&base_config(), "fuzz.toml").unwrap();
}

// ---------------------------------------------------------------------------
// The relay's other lexical scans of client SQL: settings a statement may
// change (read back after the transaction) and session state (pinning).

use pgmux::sql::session_state::session_state;
use pgmux::sql::settings::settings_named_in;

/// Complete pieces of SQL: each ends outside any literal, quoted name or
/// comment, several hide a `;` or a statement inside one.
const COMPLETE_BITS: &[&str] = &[
    "SELECT 1",
    "SELECT ';LISTEN x'",
    "SELECT $$;$$",
    "SELECT $t$ ' ; $t$",
    "SELECT \"a;b\"",
    "-- ; LISTEN x\n",
    "/* ; /* SET a = 1 */ */",
    "SELECT E'\\';'",
    "SELECT 'it''s'",
    "(",
    ")",
    ";",
    " ",
    "\n",
    "UPDATE t SET a = 1",
    "BEGIN",
    "SET LOCAL x = 1",
    "SELECT U&'\\0041'",
    "SELECT 1e5",
    "x.y",
    "$1",
    "set_config",
];

/// Text the server would lex to the end: what comes before a statement it runs.
fn complete_sql() -> impl Strategy<Value = Vec<u8>> {
    vec(proptest::sample::select(COMPLETE_BITS), 0..12).prop_map(|v| v.concat().into_bytes())
}

/// Up to 1 MiB of one piece repeated, or of distinct names: the shapes that
/// make a per-occurrence copy or a per-name search quadratic.
fn pathological_settings_sql() -> impl Strategy<Value = Vec<u8>> {
    const MIB: usize = 1 << 20;
    let pieces = proptest::sample::select(vec![
        "set_config(",
        "set_config('x",
        "set_config('x'",
        " set_config(  'a',",
        "SET x = 1;",
        "set a;",
        "reset a;",
        "LISTEN x;",
        "(",
        "advisory_lock",
        "advisory_lock (",
        " ",
        ";",
        "DECLARE c WITH HOLD",
        "create temp ",
    ]);
    let repeated = (pieces, 1..=MIB).prop_map(|(p, n)| p.repeat(n.min(MIB / p.len())).into_bytes());
    let distinct =
        (proptest::sample::select(vec!["set_config('n{}', 'v', false) ", "SET n{} = 1;", "RESET n{};"]), 1..=MIB / 16)
            .prop_map(|(shape, n)| {
                (0..n).map(|i| shape.replace("{}", &i.to_string())).collect::<String>().into_bytes()
            });
    prop_oneof![repeated, distinct]
}

/// Linear time: up to 1 MiB of `set_config(` calls, SET/RESET statements or
/// pinning triggers scans in seconds at most, even in a debug build.
#[test]
fn settings_and_pinning_scans_are_fast() {
    run_heavy(48, pathological_settings_sql(), |sql| {
        let started = std::time::Instant::now();
        let mut out = Vec::new();
        settings_named_in(&sql, &mut out);
        let _ = session_state(&sql);
        let took = started.elapsed();
        // Linear is about 0.2 s per MiB of `SET n1 = 1;` in a debug build
        // (it allocates per name), more on a busy machine; quadratic was minutes.
        prop_assert!(took < Duration::from_secs(5), "{} bytes took {took:?}", sql.len());
        Ok(())
    });
}

proptest! {
    #![proptest_config(cases(6000))]

    /// Any SQL: settings_named_in names lowercase settings without quotes,
    /// each once; session_state never allocates (a hot-path byte scan).
    #[test]
    fn settings_and_pinning_scans_total(sql in sql_soup(), extra in vec(proptest::sample::select(vec![
        "SET ", "set session ", "RESET ", "set_config(", "set_config('A'", "'", "\"X\"", " TIME ZONE", "all", "local ",
    ]), 0..6)) {
        let sql = [sql, extra.concat().into_bytes()].concat();
        let mut out = Vec::new();
        settings_named_in(&sql, &mut out);
        for (i, n) in out.iter().enumerate() {
            prop_assert!(!out[..i].contains(n), "{n:?} twice");
            prop_assert_eq!(n.to_ascii_lowercase(), n.clone());
        }
        let (_, _, allocations) = alloc_probe::measure(|| session_state(&sql));
        prop_assert_eq!(allocations, 0);
    }

    /// A setting named in SET, RESET or set_config() is found, whatever
    /// complete SQL comes before it.
    #[test]
    fn settings_named_are_found(
        before in complete_sql(),
        name in "[a-z_][a-z0-9_]{0,6}(\\.[a-z_][a-z0-9_]{0,6})?".prop_filter("a keyword", |n| {
            !matches!(n.as_str(), "local" | "session" | "time" | "names" | "schema" | "transaction" | "constraints" | "role" | "all")
        }),
        upper in any::<bool>(),
        form in 0..3u8,
    ) {
        let shown = if upper { name.to_uppercase() } else { name.clone() };
        let stmt = match form {
            0 => format!(";SET {shown} = 1"),
            1 => format!(";RESET {shown}"),
            _ => format!(" set_config('{shown}', 'v', false)"),
        };
        let mut out = Vec::new();
        settings_named_in(&[&before[..], stmt.as_bytes()].concat(), &mut out);
        prop_assert!(out.contains(&name), "{:?} not in {:?}", name, out);
    }

    /// The one-pass sniff the relay runs says what the two scans say.
    #[test]
    fn sniff_agrees_with_the_scans(sql in prop_oneof![sql_soup(), complete_sql()], extra in vec(proptest::sample::select(vec![
        ";SET a = 1", "; LISTEN x", "; reset all", "set_config(", " 'x\\'", ";PREPARE p AS SELECT 1", ";", "'", "$$",
    ]), 0..4)) {
        let sql = [sql, extra.concat().into_bytes()].concat();
        let sniffed = pgmux::sql::sniff(&sql);
        prop_assert_eq!(sniffed.session_state, session_state(&sql));
        prop_assert_eq!(sniffed.touches_settings, pgmux::sql::settings::touches_settings(&sql));
    }

    /// A statement that creates session state pins, whatever complete SQL
    /// comes before it.
    #[test]
    fn session_state_is_found(
        before in complete_sql(),
        stmt in proptest::sample::select(vec![
            "LISTEN chan", "PREPARE p AS SELECT 1", "CREATE TEMP TABLE t (x int)", "create temporary view v as select 1",
            "DECLARE c CURSOR WITH HOLD FOR SELECT 1", "SELECT pg_advisory_lock(1)", "select pg_try_advisory_lock_shared (2)",
        ]),
    ) {
        prop_assert!(session_state(&[&before[..], b";", stmt.as_bytes()].concat()).is_some());
    }
}

// ---------------------------------------------------------------------------
// Client authentication (before a client has proven anything)

use pgmux::auth::authenticate_client;
use pgmux::config::UserConfig;

/// The users of a config: SCRAM with a plaintext password and with a
/// stored verifier, md5 with a plaintext password and with a stored hash.
fn auth_users() -> Vec<UserConfig> {
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
fn auth_script() -> impl Strategy<Value = Vec<u8>> {
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

use pgmux::client::relay::{Link, StatementScope};
use pgmux::client::statements::ClientStatements;
use pgmux::config::OnSessionState;
use pgmux::pool::statements::{PreparedSet, Registry};

/// Client messages after login: extended-protocol shapes with statement
/// names a session reuses, simple queries that prepare or deallocate, other
/// frontend messages, invalid types and lengths.
fn client_stream() -> impl Strategy<Value = Vec<u8>> {
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
fn relay_scan(pieces: &[&[u8]], policy: OnSessionState) -> (Vec<u8>, Option<FrameError>, bool) {
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
