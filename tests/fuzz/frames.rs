//! The frame layer and startup packets.

use super::*;

/// might deliver them, in arbitrary reads.
pub(crate) fn chunks<'a>(data: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut at: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
    at.extend([0, data.len()]);
    at.sort_unstable();
    at.dedup();
    at.windows(2).map(|w| &data[w[0]..w[1]]).collect()
}

pub(crate) fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// Tags the scanner tests capture; the strategies favour them.
pub(crate) fn captured(tag: u8) -> bool {
    matches!(tag, b'Z' | b'E')
}

pub(crate) fn any_tag() -> impl Strategy<Value = u8> {
    prop_oneof![Just(b'Z'), Just(b'E'), Just(b'D'), Just(b'Q'), any::<u8>()]
}

/// A byte stream of mostly well-formed frames (some longer than
/// CAPTURE_LIMIT) with garbage between them: bad or huge lengths, partial headers.
pub(crate) fn frame_stream() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        6 => (any_tag(), vec(any::<u8>(), 0..40)).prop_map(|(t, b)| frame(t, &b)),
        1 => (any_tag(), any::<u8>(), 0..3 * CAPTURE_LIMIT).prop_map(|(t, fill, n)| frame(t, &vec![fill; n])),
        1 => vec(any::<u8>(), 1..12),
    ];
    vec(piece, 0..10).prop_map(|pieces| pieces.concat())
}

/// One frame as the protocol defines it: tag, absolute start and end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RefFrame {
    tag: u8,
    start: usize,
    end: usize,
}

/// The frames of `data` read straight from the definition, the error that
/// ends them (if any), and where the first incomplete frame starts.
pub(crate) fn reference_frames(data: &[u8], max_len: u32) -> (Vec<RefFrame>, Option<FrameError>, usize) {
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

pub(crate) fn max_len_small() -> impl Strategy<Value = u32> {
    // split_frame reserves up to max_len for a frame still arriving: its
    // callers pass at most 1 MiB, and so do these tests (a 4 GiB bound would
    // make them reserve gigabytes on purpose).
    prop_oneof![0..64u32, 0..70_000u32, Just(8 * 1024), Just(1 << 20)]
}

pub(crate) fn max_len_any() -> impl Strategy<Value = u32> {
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
pub(crate) fn declared_gigabyte_reserves_nothing() {
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
pub(crate) fn startup_stream() -> impl Strategy<Value = Vec<u8>> {
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
pub(crate) fn split_all_startup(pieces: Vec<&[u8]>) -> Result<Vec<StartupPacket>, StartupError> {
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
pub(crate) fn param_text() -> impl Strategy<Value = String> {
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
