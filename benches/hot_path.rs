//! Micro-benchmarks of the per-transaction hot path, no I/O:
//!
//! - `frame/*`: header parsing, `split_frame`, and the relay's [`Scanner`]
//!   over typical responses (whole, and cut into TCP-sized chunks);
//! - `relay/*`: [`Link::scan_client`] on a pgbench-style request, and a whole
//!   round trip (`scan_client` + `scan_server`) in the simple, extended
//!   (unnamed Parse) and prepared (named statement rewritten) protocols;
//! - `pool/*`: checkout/return on the pool's state machine [`Inner`];
//! - `statements/*`: the prepared-statement name rewrite [`rename`].
//!
//!   cargo bench --bench hot_path [-- FILTER]        e.g. `-- relay/`
//!
//! Buffers are rebuilt outside the timed section (`iter_batched`), so each
//! figure is the cost of the operation alone.

use std::hint::black_box;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use pgmux::client::relay::{Link, StatementScope};
use pgmux::client::statements::{ClientStatements, rename};
use pgmux::config::OnSessionState;
use pgmux::pool::inner::{Aged, Grant, Inner, Take};
use pgmux::pool::statements::{PreparedSet, Registry};
use pgmux::protocol::backend as msg;
use pgmux::protocol::frame::{Header, MAX_MESSAGE_LEN, Scanner, split_frame};
use pgmux::protocol::tag;

const SELECT_SQL: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = $1;";
const CLIENT_NAME: &[u8] = b"P_0";

// ---------------------------------------------------------------- messages

fn message(buf: &mut BytesMut, tag: u8, body: &[u8]) {
    buf.put_u8(tag);
    buf.put_u32(body.len() as u32 + 4);
    buf.put_slice(body);
}

fn cstrs(parts: &[&[u8]]) -> Vec<u8> {
    let mut v = Vec::new();
    for p in parts {
        v.extend_from_slice(p);
        v.push(0);
    }
    v
}

/// Parse(name, SELECT_SQL, no parameter types).
fn parse(buf: &mut BytesMut, name: &[u8]) {
    let mut body = cstrs(&[name, SELECT_SQL.as_bytes()]);
    body.extend_from_slice(&0u16.to_be_bytes());
    message(buf, tag::PARSE, &body);
}

/// What libpq sends after Parse for PQsendQueryParams / PQsendQueryPrepared:
/// Bind(unnamed portal, `statement`, one text parameter), Describe portal,
/// Execute, Sync.
fn bind_describe_execute_sync(buf: &mut BytesMut, statement: &[u8]) {
    let mut bind = cstrs(&[b"", statement]);
    bind.extend_from_slice(&0u16.to_be_bytes()); // parameter formats
    bind.extend_from_slice(&1u16.to_be_bytes()); // parameters
    bind.extend_from_slice(&5u32.to_be_bytes());
    bind.extend_from_slice(b"12345");
    bind.extend_from_slice(&0u16.to_be_bytes()); // result formats
    message(buf, tag::BIND, &bind);
    message(buf, tag::DESCRIBE, b"P\0");
    message(buf, tag::EXECUTE, b"\0\0\0\0\0");
    message(buf, tag::SYNC, b"");
}

#[derive(Clone, Copy)]
enum Mode {
    Simple,
    Extended,
    Prepared,
}

impl Mode {
    const ALL: [Mode; 3] = [Mode::Simple, Mode::Extended, Mode::Prepared];

    fn name(self) -> &'static str {
        match self {
            Mode::Simple => "simple",
            Mode::Extended => "extended",
            Mode::Prepared => "prepared",
        }
    }

    /// pgbench -S's one statement, as the client sends it in this mode.
    fn request(self) -> BytesMut {
        let mut buf = BytesMut::new();
        match self {
            Mode::Simple => {
                message(&mut buf, tag::QUERY, &cstrs(&[b"SELECT abalance FROM pgbench_accounts WHERE aid = 12345;"]))
            }
            Mode::Extended => {
                parse(&mut buf, b"");
                bind_describe_execute_sync(&mut buf, b"");
            }
            Mode::Prepared => bind_describe_execute_sync(&mut buf, CLIENT_NAME),
        }
        buf
    }

    /// The server's answer to [`Mode::request`].
    fn response(self) -> BytesMut {
        let mut buf = BytesMut::new();
        match self {
            Mode::Simple => {}
            Mode::Extended => {
                message(&mut buf, tag::PARSE_COMPLETE, b"");
                message(&mut buf, tag::BIND_COMPLETE, b"");
            }
            Mode::Prepared => message(&mut buf, tag::BIND_COMPLETE, b""),
        }
        result_set(&mut buf, 1);
        buf
    }
}

/// RowDescription (3 columns), `rows` DataRows, CommandComplete, ReadyForQuery.
fn result_set(buf: &mut BytesMut, rows: usize) {
    msg::row_description(buf, &["aid", "abalance", "filler"]);
    for i in 0..rows {
        let aid = (12345 + i).to_string();
        msg::data_row(buf, &[Some(aid.as_str()), Some("0"), Some("                                        ")]);
    }
    msg::command_complete(buf, &format!("SELECT {rows}"));
    msg::ready_for_query(buf, b'I');
}

/// A copy of `bytes` in a buffer with room to spare, like the relay's read
/// buffers (an in-place rewrite that grows a frame need not reallocate).
fn read_buffer(bytes: &[u8]) -> BytesMut {
    let mut buf = BytesMut::with_capacity(8 * 1024);
    buf.extend_from_slice(bytes);
    buf
}

// ---------------------------------------------------------------- frame

fn frame(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame");

    let one_row = Mode::Extended.response();
    g.bench_function("header_parse", |b| b.iter(|| Header::parse(black_box(&one_row[..]), MAX_MESSAGE_LEN)));

    // Every frame split off whole, as startup/auth/pgmux's own queries do.
    g.throughput(Throughput::Bytes(one_row.len() as u64));
    g.bench_function("split_frame/1_row_response", |b| {
        b.iter_batched_ref(
            || read_buffer(&one_row),
            |buf| {
                let mut n = 0;
                while let Some((tag, body)) = split_frame(buf, MAX_MESSAGE_LEN).expect("valid") {
                    n += tag as usize + body.len();
                }
                n
            },
            BatchSize::SmallInput,
        )
    });

    // The relay's walk over a server response, capturing what it captures.
    let mut hundred_rows = BytesMut::new();
    result_set(&mut hundred_rows, 100);
    for (name, data, chunk) in [
        ("scanner/1_row_response", &one_row, usize::MAX),
        ("scanner/100_row_response", &hundred_rows, usize::MAX),
        ("scanner/100_row_response_1460b_chunks", &hundred_rows, 1460),
    ] {
        g.throughput(Throughput::Bytes(data.len() as u64));
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut scanner = Scanner::new(MAX_MESSAGE_LEN);
                let mut frames = 0usize;
                let data: &[u8] = black_box(&data[..]);
                let mut pos = 0;
                while pos < data.len() {
                    // A partial header left unwalked is offered again with the
                    // next chunk, as it stays in the relay's read buffer.
                    let end = data.len().min(pos.saturating_add(chunk));
                    pos += scanner
                        .scan(
                            &data[pos..end],
                            |t| matches!(t, tag::READY_FOR_QUERY | tag::PARAMETER_STATUS | tag::ERROR_RESPONSE),
                            |f| {
                                frames += 1 + f.body.map_or(0, <[u8]>::len);
                                true
                            },
                        )
                        .expect("valid");
                }
                frames
            })
        });
    }
    g.finish();
}

// ---------------------------------------------------------------- relay

/// The long-lived per-client and per-backend state a [`Link`] works against.
struct Session {
    client: ClientStatements,
    registry: Registry,
    prepared: PreparedSet,
}

impl Session {
    /// A client that already prepared `CLIENT_NAME` on the backend it holds,
    /// as after pgbench -M prepared's first transaction.
    fn new() -> Session {
        let mut s = Session {
            client: ClientStatements::default(),
            registry: Registry::default(),
            prepared: PreparedSet::default(),
        };
        let mut req = BytesMut::new();
        parse(&mut req, CLIENT_NAME);
        message(&mut req, tag::SYNC, b"");
        let mut resp = BytesMut::new();
        message(&mut resp, tag::PARSE_COMPLETE, b"");
        msg::ready_for_query(&mut resp, b'I');
        let mut link = Link::new();
        s.round_trip(&mut link, &mut req, &mut resp);
        assert_eq!(link.pending_ready, 0);
        s
    }

    fn scan_client(&mut self, link: &mut Link, req: &mut BytesMut) {
        let mut scope = StatementScope {
            client: &mut self.client,
            registry: &self.registry,
            max_prepared: 200,
            on_session_state: OnSessionState::Pin,
            max_query_size: 64 << 20,
        };
        link.scan_client(req, &mut scope, &mut self.prepared).expect("valid request");
    }

    fn round_trip(&mut self, link: &mut Link, req: &mut BytesMut, resp: &mut BytesMut) {
        self.scan_client(link, req);
        link.scan_server(resp, Some(&mut self.client), &self.registry, &mut self.prepared).expect("valid response");
    }
}

fn relay(c: &mut Criterion) {
    let mut g = c.benchmark_group("relay");
    for mode in Mode::ALL {
        let (req, resp) = (mode.request(), mode.response());
        let mut session = Session::new();

        // Check once that the pair is a complete, forwarded transaction.
        let (mut link, mut r, mut s) = (Link::new(), req.clone(), resp.clone());
        session.round_trip(&mut link, &mut r, &mut s);
        assert_eq!((link.pending_ready, link.unpoolable, link.status), (0, false, b'I'), "{}", mode.name());
        if let Mode::Prepared = mode {
            assert!(r.windows(b"pgmux_".len()).any(|w| w == b"pgmux_"), "statement name rewritten");
        }

        g.bench_function(format!("scan_client/{}", mode.name()), |b| {
            b.iter_batched_ref(
                || (Link::new(), read_buffer(&req)),
                |(link, req)| session.scan_client(link, req),
                BatchSize::SmallInput,
            )
        });
        g.bench_function(format!("round_trip/{}", mode.name()), |b| {
            b.iter_batched_ref(
                || (Link::new(), read_buffer(&req), read_buffer(&resp)),
                |(link, req, resp)| session.round_trip(link, req, resp),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

// ---------------------------------------------------------------- pool

#[derive(Debug)]
struct Dummy {
    created: Instant,
    last_used: Instant,
}

impl Aged for Dummy {
    fn created(&self) -> Instant {
        self.created
    }
    fn last_used(&self) -> Instant {
        self.last_used
    }
    fn generation(&self) -> u64 {
        0
    }
}

/// A pool of `pool_size` with default lifetimes and every backend idle.
fn full_pool(pool_size: usize) -> Inner<Dummy> {
    let now = Instant::now();
    let mut inner = Inner::new(pool_size, Duration::from_secs(3600), Duration::from_secs(600));
    let mut out = Vec::new();
    let held: Vec<Dummy> = (0..pool_size)
        .map(|_| {
            assert!(matches!(inner.take(now, now, &mut out), Take::Create));
            Dummy { created: now, last_used: now }
        })
        .collect();
    for b in held {
        assert!(inner.put(b, now).is_none());
    }
    inner
}

fn pool(c: &mut Criterion) {
    let mut g = c.benchmark_group("pool");

    // The state machine alone: take an idle backend, put it back.
    let mut inner = full_pool(20);
    let now = Instant::now();
    let mut expired = Vec::new();
    g.bench_function("take_put_idle", |b| {
        b.iter(|| {
            let Take::Idle(backend) = inner.take(black_box(now), now, &mut expired) else { unreachable!() };
            inner.put(backend, now)
        })
    });

    // As Pool::checkout/checkin run it: std mutex, a clock read each way.
    let pool = Mutex::new(full_pool(20));
    g.bench_function("take_put_idle_locked_with_clock", |b| {
        b.iter(|| {
            let mut expired = Vec::new();
            let asked = Instant::now();
            let take = pool.lock().expect("lock").take(asked, asked, &mut expired);
            let Take::Idle(mut backend) = take else { unreachable!() };
            backend.last_used = Instant::now();
            pool.lock().expect("lock").put(backend, Instant::now())
        })
    });

    // Pool exhausted: the client queues (oneshot), the backend coming back
    // is handed to it directly.
    let mut inner = full_pool(1);
    let mut expired = Vec::new();
    let Take::Idle(first) = inner.take(now, now, &mut expired) else { unreachable!() };
    let mut held = Some(first);
    g.bench_function("wait_then_handoff", |b| {
        b.iter(|| {
            let Take::Wait(mut rx) = inner.take(now, now, &mut expired) else { unreachable!() };
            assert!(inner.put(held.take().expect("held"), now).is_none());
            let Ok(Grant::Backend(backend)) = rx.try_recv() else { unreachable!() };
            held = Some(backend);
        })
    });
    g.finish();
}

// ---------------------------------------------------------------- statements

fn statements(c: &mut Criterion) {
    let mut g = c.benchmark_group("statements");
    // pgbench -M prepared's Bind: client name "P_0" → pgmux's "pgmux_1",
    // then a name of the same length, and a shorter one.
    let mut frame = BytesMut::new();
    bind_describe_execute_sync(&mut frame, CLIENT_NAME);
    let bind_len = Header::parse(&frame, MAX_MESSAGE_LEN).expect("valid").expect("whole").frame_len();
    let name_start = 5 + 1; // header, empty portal name
    for (label, new_name) in [("rename/grow", &b"pgmux_1"[..]), ("rename/same_len", b"P_9"), ("rename/shrink", b"x")] {
        g.bench_function(label, |b| {
            b.iter_batched_ref(
                || read_buffer(&frame),
                |buf| rename(buf, 0, bind_len, name_start, name_start + CLIENT_NAME.len(), black_box(new_name)),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, frame, relay, pool, statements);
criterion_main!(benches);
