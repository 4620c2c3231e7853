//! The floor relay (`examples/floor_relay.rs`) on io_uring instead of epoll,
//! as a yardstick for `benches/load.sh` (target `uring`): does io_uring make
//! the kernel's part of relaying cheaper on this machine?
//!
//!   cargo run --release --example floor_relay_uring -- 127.0.0.1:26501 127.0.0.1:5432 [--multishot]
//!
//! Same relay as the epoll floor: one thread, every client connection paired
//! with a server connection of its own, bytes passed on untouched. What
//! io_uring changes is how the kernel is asked: the receives and sends of
//! every connection that got data since the last call go in one
//! `io_uring_enter`, and their completions come back from the same call, so
//! the syscalls per transaction fall from four (recv and send, each side) to
//! a fraction of one. The sockets' own work (loopback TCP, waking the peer)
//! stays. With `--multishot`, each socket has one standing receive drawing
//! from a ring of provided buffers, instead of one receive armed per message.
//!
//! Exits with status 3 and one line on stderr when io_uring is refused
//! (`kernel.io_uring_disabled`, a seccomp profile, a kernel before 6.0).
//! Not a product: errors just close the pair.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};

use io_uring::types::Fd;
use io_uring::{IoUring, cqueue, opcode, squeue};
use pgmux::net::uring::BufRing;

/// Bytes a receive may take: pgbench's messages are far smaller.
const BUF: usize = 16 * 1024;
/// Provided buffers in the ring (a power of two), for `--multishot`.
const RING_BUFS: u16 = 4096;
const GROUP: u16 = 0;

/// What a completion is for: the operation in the high half of its user
/// data, the socket in the low half.
const ACCEPT: u64 = 0;
const RECV: u64 = 1;
const SEND: u64 = 2;

fn user_data(op: u64, fd: RawFd) -> u64 {
    (op << 32) | fd as u32 as u64
}

/// One relayed socket: where its bytes go, and the receive/send in flight.
struct Conn {
    peer: RawFd,
    /// Per-connection buffer (one-shot mode): received bytes until they are sent.
    buf: Box<[u8]>,
    /// Received and not yet sent on, in order: (provided buffer id in
    /// multishot mode, length); the front one is being sent.
    queue: std::collections::VecDeque<(Option<u16>, usize)>,
    /// Bytes of the front message already sent.
    sent: usize,
    /// Whether a receive is armed (for multishot: standing).
    receiving: bool,
    /// Operations submitted and not completed: the fd is closed only at 0,
    /// so a completion never names a number already reused.
    inflight: u32,
    closing: bool,
}

struct Relay {
    ring: IoUring,
    conns: Vec<Option<Conn>>,
    server: SocketAddr,
    multishot: bool,
    /// The provided-buffer ring and its memory (`--multishot`).
    bufs: Option<BufRing>,
}

fn main() {
    let mut args = std::env::args().skip(1);
    let usage = "usage: floor_relay_uring LISTEN_ADDR SERVER_ADDR [--multishot]";
    let listen: SocketAddr = args.next().expect(usage).parse().expect(usage);
    let server: SocketAddr = args.next().expect(usage).parse().expect(usage);
    let multishot = args.next().as_deref() == Some("--multishot");
    let ring = match setup() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("floor_relay_uring: io_uring unavailable ({e}); nothing to measure");
            std::process::exit(3);
        }
    };
    if let Err(e) = run(ring, listen, server, multishot) {
        eprintln!("floor_relay_uring: {e}");
        std::process::exit(if e.kind() == io::ErrorKind::Unsupported { 3 } else { 1 });
    }
}

/// A ring with the flags that suit one thread that submits and reaps
/// itself (task work run at `io_uring_enter`, not by interrupting it);
/// plainer rings on kernels that refuse them.
fn setup() -> io::Result<IoUring> {
    let (ring, flags) = match IoUring::builder().setup_single_issuer().setup_defer_taskrun().setup_cqsize(CQ).build(SQ)
    {
        Ok(r) => (r, "single issuer, deferred task work"),
        Err(_) => match IoUring::builder().setup_coop_taskrun().setup_cqsize(CQ).build(SQ) {
            Ok(r) => (r, "cooperative task work"),
            Err(_) => (IoUring::new(SQ)?, "default"),
        },
    };
    eprintln!("floor_relay_uring: io_uring ring ({flags})");
    Ok(ring)
}

/// Submission and completion queue sizes: room for every socket of 512
/// clients to have a receive and a send in flight.
const SQ: u32 = 4096;
const CQ: u32 = 16 * 1024;

fn run(ring: IoUring, listen: SocketAddr, server: SocketAddr, multishot: bool) -> io::Result<()> {
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    for code in [opcode::AcceptMulti::CODE, opcode::Recv::CODE, opcode::Send::CODE] {
        if !probe.is_supported(code) {
            return Err(io::Error::new(io::ErrorKind::Unsupported, format!("io_uring lacks opcode {code}")));
        }
    }
    let listener = TcpListener::bind(listen)?;
    let mut relay = Relay { ring, conns: Vec::new(), server, multishot, bufs: None };
    if multishot {
        relay.bufs = Some(BufRing::register(&relay.ring, RING_BUFS, BUF, GROUP)?);
    }
    let accept = opcode::AcceptMulti::new(Fd(listener.as_raw_fd())).build().user_data(user_data(ACCEPT, 0));
    relay.push(accept)?;
    let mut completions = Vec::with_capacity(1024);
    loop {
        match relay.ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) || e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => return Err(e),
        }
        completions.extend(relay.ring.completion().map(|c| (c.user_data(), c.result(), c.flags())));
        for (data, result, flags) in completions.drain(..) {
            let fd = data as u32 as RawFd;
            match data >> 32 {
                ACCEPT => relay.accepted(result, flags, &listener)?,
                RECV => relay.received(fd, result, flags)?,
                _ => relay.sent(fd, result)?,
            }
        }
    }
}

impl Relay {
    /// Queues an entry, submitting what is queued first when the ring is full.
    fn push(&mut self, entry: squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: every buffer an entry names lives in `conns` or `bufs`
            // until its completion is reaped.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return Ok(());
            }
            self.ring.submit()?;
        }
    }

    fn accepted(&mut self, result: i32, flags: u32, listener: &TcpListener) -> io::Result<()> {
        if !cqueue::more(flags) {
            // The multishot accept ended (e.g. out of descriptors): arm it again.
            let accept = opcode::AcceptMulti::new(Fd(listener.as_raw_fd())).build().user_data(user_data(ACCEPT, 0));
            self.push(accept)?;
        }
        if result < 0 {
            return Ok(());
        }
        // SAFETY: a descriptor the kernel just handed us.
        let client = unsafe { <TcpStream as std::os::fd::FromRawFd>::from_raw_fd(result) };
        // A client whose server is unreachable is just dropped.
        let Ok(backend) = TcpStream::connect(self.server) else { return Ok(()) };
        for s in [&client, &backend] {
            s.set_nodelay(true)?;
        }
        let (a, b) = (client.into_raw_fd(), backend.into_raw_fd());
        let highest = a.max(b) as usize;
        if self.conns.len() <= highest {
            self.conns.resize_with(highest + 1, || None);
        }
        for (fd, peer) in [(a, b), (b, a)] {
            let buf = if self.multishot { Box::default() } else { vec![0u8; BUF].into_boxed_slice() };
            let queue = Default::default();
            self.conns[fd as usize] =
                Some(Conn { peer, buf, queue, sent: 0, receiving: false, inflight: 0, closing: false });
            self.arm_recv(fd)?;
        }
        Ok(())
    }

    fn arm_recv(&mut self, fd: RawFd) -> io::Result<()> {
        let multishot = self.multishot;
        let Some(conn) = self.conns[fd as usize].as_mut() else { return Ok(()) };
        let entry = if multishot {
            opcode::RecvMulti::new(Fd(fd), GROUP).build()
        } else {
            opcode::Recv::new(Fd(fd), conn.buf.as_mut_ptr(), BUF as u32).build()
        };
        conn.inflight += 1;
        conn.receiving = true;
        self.push(entry.user_data(user_data(RECV, fd)))
    }

    fn received(&mut self, fd: RawFd, result: i32, flags: u32) -> io::Result<()> {
        let Some(conn) = self.conns[fd as usize].as_mut() else { return Ok(()) };
        if !cqueue::more(flags) {
            conn.inflight -= 1;
            conn.receiving = false;
        }
        let buffer = cqueue::buffer_select(flags);
        if result == -libc::ENOBUFS && !conn.closing {
            // Every provided buffer is waiting on a send: re-armed when one returns.
            return if conn.queue.is_empty() { self.arm_recv(fd) } else { Ok(()) };
        }
        if result <= 0 || conn.closing {
            if let (Some(id), Some(bufs)) = (buffer, self.bufs.as_mut()) {
                bufs.give_back(id);
            }
            return self.close_pair(fd);
        }
        conn.queue.push_back((buffer, result as usize));
        if conn.queue.len() == 1 {
            conn.sent = 0;
            return self.send_front(fd);
        }
        Ok(())
    }

    /// Sends (the rest of) the front message of `fd` to its peer.
    fn send_front(&mut self, fd: RawFd) -> io::Result<()> {
        let Some(conn) = self.conns[fd as usize].as_mut() else { return Ok(()) };
        let Some(&(buffer, len)) = conn.queue.front() else { return Ok(()) };
        let base = match (buffer, self.bufs.as_ref()) {
            (Some(id), Some(bufs)) => bufs.ptr(id),
            _ => conn.buf.as_ptr(),
        };
        // SAFETY: `sent` < `len` <= the buffer's length.
        let from = unsafe { base.add(conn.sent) };
        let send = opcode::Send::new(Fd(conn.peer), from, (len - conn.sent) as u32).flags(libc::MSG_NOSIGNAL).build();
        conn.inflight += 1;
        self.push(send.user_data(user_data(SEND, fd)))
    }

    /// A send of `fd`'s bytes to its peer completed.
    fn sent(&mut self, fd: RawFd, result: i32) -> io::Result<()> {
        let Some(conn) = self.conns[fd as usize].as_mut() else { return Ok(()) };
        conn.inflight -= 1;
        if result <= 0 || conn.closing {
            let held: Vec<u16> = conn.queue.drain(..).filter_map(|(b, _)| b).collect();
            if let Some(bufs) = self.bufs.as_mut() {
                held.into_iter().for_each(|id| bufs.give_back(id));
            }
            return self.close_pair(fd);
        }
        conn.sent += result as usize;
        let (buffer, len) = *conn.queue.front().expect("a send was in flight");
        if conn.sent < len {
            // A short send: the rest, from where it stopped.
            return self.send_front(fd);
        }
        conn.queue.pop_front();
        conn.sent = 0;
        let (more, receiving) = (!conn.queue.is_empty(), conn.receiving);
        if let (Some(id), Some(bufs)) = (buffer, self.bufs.as_mut()) {
            bufs.give_back(id);
        }
        if more {
            return self.send_front(fd);
        }
        // One-shot: the next receive; multishot: re-armed only if it ended.
        if !receiving {
            return self.arm_recv(fd);
        }
        Ok(())
    }

    /// Ends both sockets of a pair: shutdown wakes any receive still in
    /// flight; each descriptor is closed once nothing names it any more.
    fn close_pair(&mut self, fd: RawFd) -> io::Result<()> {
        let peer = self.conns[fd as usize].as_ref().map(|c| c.peer);
        for f in std::iter::once(fd).chain(peer) {
            let Some(conn) = self.conns[f as usize].as_mut() else { continue };
            if !conn.closing {
                conn.closing = true;
                unsafe { libc::shutdown(f, libc::SHUT_RDWR) };
            }
            if conn.inflight == 0 {
                if let Some(bufs) = self.bufs.as_mut() {
                    conn.queue.drain(..).filter_map(|(b, _)| b).for_each(|id| bufs.give_back(id));
                }
                self.conns[f as usize] = None;
                unsafe { libc::close(f) };
            }
        }
        Ok(())
    }
}
