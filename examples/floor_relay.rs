//! The cheapest possible Postgres proxy, as a yardstick for `benches/load.sh`:
//! one thread, one `epoll` loop, every client TCP connection paired with its
//! own server connection, bytes relayed with one `recv` and one `send` per
//! readiness and nothing looked at. No pooling, no protocol, no timers.
//!
//!   cargo run --release --example floor_relay -- 127.0.0.1:26500 127.0.0.1:5432
//!
//! Any proxy — pgmux, PgBouncer — makes at least these system calls for every
//! round trip, so the CPU this process spends per transaction is the floor
//! of what a proxy can spend on this machine: it separates what the kernel
//! costs (socket calls, loopback TCP, waking the peer) from what pgmux's own
//! code costs. Not a product: a partial `send` is finished blocking, errors
//! just close the pair.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};

fn main() -> io::Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: floor_relay LISTEN_ADDR SERVER_ADDR";
    let listen: SocketAddr = args.next().expect(usage).parse().expect(usage);
    let server: SocketAddr = args.next().expect(usage).parse().expect(usage);

    let listener = TcpListener::bind(listen)?;
    listener.set_nonblocking(true)?;
    let epoll = check(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
    watch(epoll, listener.as_raw_fd())?;

    // peer[fd] = the other end of fd's pair, -1 when fd is not a relayed socket.
    let mut peer: Vec<RawFd> = Vec::new();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let ready = unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), events.len() as i32, -1) };
        if ready < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        for event in &events[..ready as usize] {
            let fd = event.u64 as RawFd;
            if fd == listener.as_raw_fd() {
                while let Ok((client, _)) = listener.accept() {
                    // A client whose server is unreachable is just dropped.
                    if let Ok(backend) = TcpStream::connect(server) {
                        pair(epoll, &mut peer, client, backend)?;
                    }
                }
                continue;
            }
            let to = peer[fd as usize];
            if to < 0 {
                continue; // closed earlier in this batch
            }
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n <= 0 {
                if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock {
                    continue;
                }
                close_pair(&mut peer, fd, to);
                continue;
            }
            if send_all(to, &buf[..n as usize]).is_err() {
                close_pair(&mut peer, fd, to);
            }
        }
    }
}

fn pair(epoll: RawFd, peer: &mut Vec<RawFd>, client: TcpStream, backend: TcpStream) -> io::Result<()> {
    for stream in [&client, &backend] {
        stream.set_nodelay(true)?;
        stream.set_nonblocking(true)?;
    }
    let (client, backend) = (client.into_raw_fd(), backend.into_raw_fd());
    let highest = client.max(backend) as usize;
    if peer.len() <= highest {
        peer.resize(highest + 1, -1);
    }
    peer[client as usize] = backend;
    peer[backend as usize] = client;
    watch(epoll, client)?;
    watch(epoll, backend)
}

fn watch(epoll: RawFd, fd: RawFd) -> io::Result<()> {
    let mut event = libc::epoll_event { events: libc::EPOLLIN as u32, u64: fd as u64 };
    check(unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, fd, &mut event) }).map(drop)
}

/// Closing a socket also removes it from the epoll set.
fn close_pair(peer: &mut [RawFd], a: RawFd, b: RawFd) {
    for fd in [a, b] {
        peer[fd as usize] = -1;
        unsafe { libc::close(fd) };
    }
}

/// Loopback sends of pgbench-sized messages complete at once; the rare
/// partial one is finished by waiting for writability.
fn send_all(fd: RawFd, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        let n = unsafe { libc::send(fd, bytes.as_ptr().cast(), bytes.len(), libc::MSG_NOSIGNAL) };
        if n >= 0 {
            bytes = &bytes[n as usize..];
            continue;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::WouldBlock {
            return Err(err);
        }
        let mut poll = libc::pollfd { fd, events: libc::POLLOUT, revents: 0 };
        check(unsafe { libc::poll(&mut poll, 1, -1) })?;
    }
    Ok(())
}

fn check(ret: i32) -> io::Result<i32> {
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(ret) }
}
