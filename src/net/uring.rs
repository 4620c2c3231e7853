//! The io_uring data path (`[proxy] io = "uring"`): the plain TCP and Unix
//! sockets of pooled sessions and their server connections, once logged in,
//! are read and written through one io_uring per runtime thread instead of
//! `recv`/`send` per readiness.
//!
//! The ring lives beside tokio, not instead of it: tokio still runs the
//! tasks, the timers and everything else (logins, TLS, the admin console).
//! A driver task owns the ring's side of the bargain:
//! - **Submission is batched per scheduler turn.** An operation is queued
//!   in the submission ring and the driver task woken; it runs after the
//!   tasks already scheduled, and submits what they queued in one
//!   `io_uring_enter` once there are `SUBMIT_AT` entries. Fewer wait for
//!   the thread's wait (next), which submits them and sleeps in one call.
//! - **The thread waits in the ring.** When tokio has nothing to run it
//!   blocks in `epoll_wait`; pgmux defines that symbol (see [`epoll_wait`])
//!   and, on a ring's thread, blocks in `io_uring_enter` instead: one call
//!   submits what is still queued, waits for the next completion (tokio's
//!   epoll descriptor is polled through the ring, tokio's timer deadline is
//!   the wait's timeout) and runs the completions. A transaction at one
//!   client then costs two `io_uring_enter` (one each way: the forwarded
//!   bytes go out and the thread sleeps until the answer), where
//!   `recv`/`send`/`epoll_wait` cost six. That needs sends whose success
//!   posts no completion (else the send would end its own wait): see
//!   `send`'s fast sends.
//! - **Otherwise, completion is signalled through an eventfd** registered
//!   with the ring and watched by tokio's epoll (where the symbol is not
//!   ours, or `PGMUX_IO_URING_PARK=off`): with deferred task work (Linux
//!   6.1+) the kernel signals it when completions are ready to be run, and
//!   the next `io_uring_enter` runs them all at once.
//! - **Receives are multishot and draw from a ring of provided buffers**:
//!   one standing receive per socket (armed once, not per message), and an
//!   idle connection holds no buffer; a receive whose task was dropped never
//!   names memory that could be freed. Data is copied out of the buffer at
//!   once into the connection's inbox and the buffer goes back, so slow
//!   readers cannot starve the ring; an inbox past [`INBOX_LIMIT`] cancels
//!   the receive until its reader catches up (backpressure, as a full
//!   socket buffer gives on epoll).
//! - **Sends are written behind**: `try_write` copies into the connection's
//!   outbox and returns; the kernel takes it in the next batch. At most
//!   [`WRITE_LIMIT`] bytes wait per connection (then `WouldBlock`, as a full
//!   socket), and a failed send is reported by the next call. A send's
//!   completion wakes its task only when it waits to write (room, or a
//!   flush): a relay waiting for its server's answer is not polled again
//!   because its own request went out.
//!
//! A connection's state stays in the driver until every operation naming it
//! has completed, and only then is its descriptor closed: a completion never
//! meets a reused number, a buffer is never freed under the kernel.
//!
//! Where io_uring is refused (`kernel.io_uring_disabled`, a seccomp profile
//! such as Docker's default, a kernel before 6.0), [`start`] says so and
//! nothing adopts sockets: the epoll path runs.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::task::{Context, Poll, Waker};

use bytes::BytesMut;
use io_uring::types::{BufRingEntry, Fd};
use io_uring::{IoUring, cqueue, opcode, squeue};
use tokio::io::ReadBuf;
use tokio::io::unix::AsyncFd;

/// Bytes one receive may take.
const BUF: usize = 16 * 1024;
/// Provided buffers per thread (a power of two). Each returns to the ring as
/// soon as its completion is reaped, so this bounds one batch, not the
/// connections: a receive that finds none fails with `ENOBUFS` and is armed
/// again.
const BUFS: u16 = 128;
const GROUP: u16 = 0;
/// A connection's received bytes not yet read, beyond which its receive is
/// cancelled until they are read (the relay's own high-water mark then holds
/// the peer back, as a full socket buffer would).
const INBOX_LIMIT: usize = 64 * 1024;
/// Bytes a connection may have accepted but not yet sent.
pub const WRITE_LIMIT: usize = 256 * 1024;
/// Submission entries; a full ring is submitted at once, so this only sets the batch size.
const SQ_ENTRIES: u32 = 1024;
const CQ_ENTRIES: u32 = 8192;
/// Entries queued in a scheduler turn that the driver task submits at once
/// rather than leave to the thread's wait (see [`drive`]).
const SUBMIT_AT: usize = 8;

/// What a completion is for (the low bits of its user data; the connection's key above).
const RECV: u64 = 0;
const SEND: u64 = 1;
const CANCEL: u64 = 2;
/// tokio's epoll descriptor became readable (no connection: key 0).
const EPOLL: u64 = 3;
/// A send that completes as it is submitted, or fails (see [`send`]): a
/// completion comes only when it did not send everything.
const FAST_SEND: u64 = 4;
const OP_BITS: u32 = 3;
const OP_MASK: u64 = (1 << OP_BITS) - 1;

fn user_data(key: u32, op: u64) -> u64 {
    ((key as u64) << OP_BITS) | op
}

thread_local! {
    static DRIVER: RefCell<Option<Driver>> = const { RefCell::new(None) };
    /// Set by [`epoll_wait`]: whether calls reach pgmux's definition.
    static EPOLL_WAIT_SEEN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Which driver a socket belongs to: a socket met on another thread (or
/// after its driver ended) is never looked up in the wrong table.
static NEXT_DRIVER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);

/// Sockets on a ring (all threads): `pgmux_io_uring_sockets`.
static SOCKETS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Sockets whose I/O goes through io_uring now (every thread's ring).
pub fn sockets() -> u64 {
    SOCKETS.load(std::sync::atomic::Ordering::Relaxed)
}

/// `io_uring_enter` calls made by runtime threads (every thread's).
static ENTERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many `io_uring_enter` calls the rings have made (every thread's):
/// the data path's system calls, as nothing else is called per message.
pub fn enters() -> u64 {
    ENTERS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Times a runtime thread waited in its ring (every thread's).
static WAITS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many times a runtime thread has waited in its ring instead of in
/// `epoll_wait` (every thread's): it moves while a ring waits.
pub fn waits_in_ring() -> u64 {
    WAITS.load(std::sync::atomic::Ordering::Relaxed)
}

fn closed(fd: RawFd) {
    // SAFETY: called once per adopted descriptor, when nothing names it any more.
    unsafe { libc::close(fd) };
    SOCKETS.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
}

/// What [`start`] found.
#[derive(Debug)]
pub enum Started {
    /// The ring runs; the text names its flags (for the log line).
    Running(&'static str),
    /// This thread already runs one.
    AlreadyRunning,
    /// io_uring is refused or lacks something needed; the epoll path runs.
    Refused(io::Error),
}

/// Starts this thread's ring and its driver task (on the current-thread
/// runtime this is called from). Sockets adopted afterwards on this thread
/// use it; until then, and where it is refused, nothing changes.
/// `sockets` sizes the table up front (untouched until used, so it costs
/// address space, not memory): growing it later copies it.
pub fn start(sockets: usize) -> Started {
    if DRIVER.with(|d| d.borrow().is_some()) {
        return Started::AlreadyRunning;
    }
    let (mut driver, deferred, events) = match Driver::new(sockets) {
        Ok(d) => d,
        Err(e) => return Started::Refused(e),
    };
    // Waiting in the ring needs deferred task work (cooperative task work
    // does not wake a waiting thread: the kernel only flags it), a timeout
    // on the wait (Linux 5.11+) and calls that reach our `epoll_wait`; the
    // eventfd then only costs wake-ups.
    driver.parks = deferred
        && driver.ring.params().is_feature_ext_arg()
        && std::env::var("PGMUX_IO_URING_PARK").map_or(true, |v| v != "off")
        && interposed()
        && driver.ring.submitter().unregister_eventfd().is_ok();
    if driver.ring.params().is_feature_no_iowait() {
        driver.wait_flags = io_uring::EnterFlags::NO_IOWAIT;
    }
    let flags = match (deferred, driver.parks, driver.fast_sends) {
        (_, true, true) => "deferred task work, waits in the ring, sends complete as submitted",
        (_, true, false) => "deferred task work, waits in the ring",
        (true, false, true) => "deferred task work, eventfd, sends complete as submitted",
        (true, false, false) => "deferred task work, eventfd",
        (false, false, true) => "cooperative task work, eventfd, sends complete as submitted",
        (false, false, false) => "cooperative task work, eventfd",
    };
    let (id, driver_parks) = (driver.id, driver.parks);
    DRIVER.with(|d| *d.borrow_mut() = Some(driver));
    tokio::spawn(drive(events, id, driver_parks));
    Started::Running(flags)
}

/// Whether this thread runs a ring (sockets adopted here use it).
pub fn running() -> bool {
    DRIVER.with(|d| d.borrow().is_some())
}

/// An eventfd the kernel signals when the ring has work for us.
struct EventFd(OwnedFd);

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Submits what the scheduler turn queued and hands out completions, until
/// the ring is idle; then waits for the eventfd or a newly queued entry.
async fn drive(events: EventFd, id: u32, parks: bool) {
    // When the runtime goes (and this task with it), so does the ring:
    // nothing would submit for it any more.
    struct Stop(u32);
    impl Drop for Stop {
        fn drop(&mut self) {
            let driver = DRIVER.try_with(|d| {
                let mut d = d.borrow_mut();
                if d.as_ref().is_some_and(|d| d.id == self.0) { d.take() } else { None }
            });
            drop(driver);
        }
    }
    let _stop = Stop(id);
    // Where the thread waits in the ring, completions are met there; this
    // task still submits mid-turn what the tasks before it queued, so that
    // under load a send does not wait for the turn's end.
    let events = if parks {
        None
    } else {
        // SAFETY: the eventfd is owned by `events` and closed only when it drops.
        match unsafe { AsyncFd::register_with_interest(events, tokio::io::Interest::READABLE) } {
            Ok(e) => Some(e),
            Err(e) => {
                tracing::warn!(error = %e, "io_uring: cannot watch the ring's eventfd; sockets stay on epoll");
                return;
            }
        }
    };
    let mut wake = Vec::new();
    std::future::poll_fn(|cx| {
        // Rounds of submit-and-reap per poll before the woken tasks get
        // their turn (a socket that keeps receiving must not starve them).
        for _ in 0..8 {
            // Readiness first, cleared before the ring is read: a signal
            // after this point is seen by the next poll.
            let signalled = match events.as_ref().map(|e| e.poll_read_ready(cx)) {
                Some(Poll::Ready(Ok(mut g))) => {
                    g.clear_ready();
                    true
                }
                Some(Poll::Ready(Err(_))) => return Poll::Ready(()),
                Some(Poll::Pending) | None => false,
            };
            let Some(more) = with(id, |d| {
                if d.task.as_ref().is_none_or(|w| !w.will_wake(cx.waker())) {
                    d.task = Some(cx.waker().clone());
                }
                d.kicked = false;
                if !signalled && d.ring.submission().is_empty() {
                    return false;
                }
                // A few entries can wait for the thread's wait, which
                // submits them and sleeps in one call (a fast send's success
                // does not end it); the next entry queued this turn wakes
                // this task again, and a busy turn still submits mid-way.
                if !signalled && d.parks && d.fast_sends && d.ring.submission().len() < SUBMIT_AT {
                    return false;
                }
                d.enter();
                d.reap(&mut wake);
                true
            }) else {
                return Poll::Ready(());
            };
            for w in wake.drain(..) {
                w.wake();
            }
            if !more {
                return Poll::Pending;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await
}

fn with<R>(id: u32, f: impl FnOnce(&mut Driver) -> R) -> Option<R> {
    DRIVER.with(|d| match d.borrow_mut().as_mut() {
        Some(d) if d.id == id => Some(f(d)),
        _ => None,
    })
}

struct Driver {
    id: u32,
    ring: IoUring,
    bufs: BufRing,
    /// Connections by key; `None` is a free key (also listed in `free`).
    conns: Vec<Option<Conn>>,
    free: Vec<u32>,
    /// The driver task, woken when a scheduler turn queues its first entry.
    task: Option<Waker>,
    kicked: bool,
    /// The driver is being dropped: nothing is armed or sent any more.
    stopping: bool,
    /// The thread waits in the ring ([`epoll_wait`]), which submits what
    /// is still queued and reaps: the eventfd is not registered.
    parks: bool,
    /// Flags for that wait (`NO_IOWAIT` where known: a proxy waiting for
    /// its peers is idle, not waiting for a disk).
    wait_flags: io_uring::EnterFlags,
    /// tokio's epoll descriptor (-1 until its first wait), whether a poll
    /// of it is armed on the ring, and whether that poll fired.
    epoll: RawFd,
    epoll_armed: bool,
    epoll_ready: bool,
    /// Wakers collected while the ring is borrowed (reused).
    woken: Vec<Waker>,
    /// Receives are multishot (Linux 6.0+).
    multishot: bool,
    /// Sends are submitted as [`FAST_SEND`]s (the probe in [`Driver::new`] passed).
    fast_sends: bool,
    /// Connections whose fast send is queued, maybe not yet submitted.
    fast_queued: Vec<u32>,
    /// ... submitted, and done unless a completion said otherwise: settled
    /// once the completions of the call that submitted them are reaped.
    fast_submitted: Vec<u32>,
    /// Completions copied out of the ring before they are handled (reused).
    completed: Vec<(u64, i32, u32)>,
    /// Kept open as long as the ring: its registration names it.
    _events: OwnedFd,
}

/// One adopted socket's state: 48 bytes while it has moved no byte (an
/// idle client costs that, not a tokio registration).
struct Conn {
    fd: RawFd,
    /// Operations submitted (or queued) and not completed.
    ops: u8,
    /// A receive is armed (multishot: until a completion without MORE).
    receiving: bool,
    /// Its cancel is on the way (the inbox is full).
    pausing: bool,
    eof: bool,
    /// Its send in flight is a fast one, not yet settled.
    fast: bool,
    /// The waiting task waits to write (room, or a flush), not only to
    /// read: a send's completion wakes it. Otherwise a send completes
    /// silently (a relay waiting for its server's answer is not polled
    /// once more for its own request having gone out).
    writer: bool,
    /// The socket's owner dropped it: closed once `ops` is 0.
    dropped: bool,
    /// errno of a failed receive or send (0: none).
    read_error: i32,
    write_error: i32,
    /// Bytes of `sending` already sent.
    sent: u32,
    /// Allocated with the first byte moved.
    bufs: Option<Box<Bufs>>,
    /// The task waiting on this socket, to read or to write: one waker
    /// rather than one per direction keeps an idle socket's slot at 48
    /// bytes. A socket serves one task at a time (pgmux never splits a
    /// stream); a second task would still be woken, see [`register`].
    waker: Option<Waker>,
}

#[derive(Default)]
struct Bufs {
    /// Received, not yet read.
    inbox: BytesMut,
    /// The bytes of the send in flight (empty: none).
    sending: Vec<u8>,
    /// Accepted while a send was in flight: the next send.
    staged: Vec<u8>,
}

/// Buffer capacity kept once drained; a larger one (a big answer went
/// through) is given back, so an idle connection stays small.
const KEEP_CAPACITY: usize = 16 * 1024;

impl Conn {
    fn bufs(&mut self) -> &mut Bufs {
        self.bufs.get_or_insert_default()
    }

    fn inbox_len(&self) -> usize {
        self.bufs.as_ref().map_or(0, |b| b.inbox.len())
    }

    fn sending(&self) -> bool {
        self.bufs.as_ref().is_some_and(|b| !b.sending.is_empty())
    }

    fn unsent(&self) -> usize {
        self.bufs.as_ref().map_or(0, |b| b.sending.len() - self.sent as usize + b.staged.len())
    }

    fn error(errno: i32) -> Option<io::Error> {
        (errno != 0).then(|| io::Error::from_raw_os_error(errno))
    }
}

impl Driver {
    /// The driver, whether task work is deferred, and the eventfd.
    fn new(sockets: usize) -> io::Result<(Driver, bool, EventFd)> {
        // Deferred task work: completions run in our `io_uring_enter`, in a
        // batch, instead of interrupting the thread (or its epoll_wait).
        let (ring, flags) = match IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_cqsize(CQ_ENTRIES)
            .build(SQ_ENTRIES)
        {
            Ok(r) => (r, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                (IoUring::builder().setup_coop_taskrun().setup_cqsize(CQ_ENTRIES).build(SQ_ENTRIES)?, false)
            }
            Err(e) => return Err(e),
        };
        let mut probe = io_uring::Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for (code, name) in
            [(opcode::Recv::CODE, "recv"), (opcode::Send::CODE, "send"), (opcode::AsyncCancel::CODE, "cancel")]
        {
            if !probe.is_supported(code) {
                return Err(io::Error::new(io::ErrorKind::Unsupported, format!("io_uring lacks {name}")));
            }
        }
        let fast_sends = ring.params().is_feature_skip_cqe_on_success() && fast_sends_work(&ring);
        let bufs = BufRing::register(&ring, BUFS, BUF, GROUP)?;
        // SAFETY: a plain eventfd(2) call; the descriptor is owned at once.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: just created, owned nowhere else.
        let efd = unsafe { OwnedFd::from_raw_fd(efd) };
        ring.submitter().register_eventfd(efd.as_raw_fd())?;
        let events = EventFd(efd.try_clone()?);
        let id = NEXT_DRIVER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let driver = Driver {
            id,
            ring,
            bufs,
            conns: Vec::with_capacity(sockets),
            free: Vec::new(),
            task: None,
            kicked: false,
            stopping: false,
            parks: false,
            wait_flags: io_uring::EnterFlags::empty(),
            epoll: -1,
            epoll_armed: false,
            epoll_ready: false,
            woken: Vec::new(),
            multishot: true,
            fast_sends,
            fast_queued: Vec::new(),
            fast_submitted: Vec::new(),
            completed: Vec::with_capacity(CQ_ENTRIES as usize),
            _events: efd,
        };
        Ok((driver, flags, events))
    }

    /// Queues an entry; the first of a scheduler turn wakes the driver task.
    fn push(&mut self, entry: squeue::Entry) {
        // SAFETY: every buffer an entry names (an outbox, a provided buffer)
        // stays allocated until its completion is reaped: connections are
        // freed only with no operation outstanding.
        while unsafe { self.ring.submission().push(&entry) }.is_err() {
            self.enter();
        }
        if !self.kicked {
            self.kicked = true;
            if let Some(w) = &self.task {
                w.wake_by_ref();
            }
        }
    }

    /// Submits what is queued and runs the kernel's completion work.
    fn enter(&mut self) {
        let queued = self.ring.submission().len() as u32;
        loop {
            ENTERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // SAFETY: no argument pointer is passed.
            let r = unsafe {
                self.ring.submitter().enter::<libc::sigset_t>(queued, 0, io_uring::EnterFlags::GETEVENTS.bits(), None)
            };
            match r {
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // The completion ring is full: what is there gets reaped by
                // the caller, and the rest is submitted next time.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::EAGAIN)) => return,
                Err(e) => {
                    tracing::error!(error = %e, "io_uring_enter failed");
                    return;
                }
                Ok(_) => return self.submitted(),
            }
        }
    }

    /// After a call that submitted: once nothing is left queued, every fast
    /// send queued so far has been tried (in that call or an earlier one).
    fn submitted(&mut self) {
        if !self.fast_queued.is_empty() && self.ring.submission().is_empty() {
            self.fast_submitted.append(&mut self.fast_queued);
        }
    }

    /// Fast sends that posted no completion sent everything: settled as a
    /// send's completion would be. Only once the completion queue has not
    /// overflowed (a failure could be waiting in the kernel's overflow list).
    fn settle_fast(&mut self, wake: &mut Vec<Waker>) {
        if self.fast_submitted.is_empty() || self.ring.submission().cq_overflow() {
            return;
        }
        let mut keys = std::mem::take(&mut self.fast_submitted);
        for &key in &keys {
            let Some(mut conn) = self.conns.get_mut(key as usize).and_then(Option::take) else { continue };
            if conn.fast {
                conn.fast = false;
                conn.ops -= 1;
                let rest = conn.bufs().sending.len() - conn.sent as usize;
                self.send_done(&mut conn, key, rest as i32, false, wake);
            }
            self.put_back(conn, key);
        }
        keys.clear();
        if self.fast_submitted.is_empty() {
            self.fast_submitted = keys;
        }
    }

    /// tokio's wait, in the ring: submits what is queued, waits up to
    /// `timeout_ms` (-1: no limit; 0: not at all) for a completion, tokio's
    /// epoll descriptor included, and runs the completions' task work.
    fn wait(&mut self, epfd: RawFd, timeout_ms: i32) {
        if !self.epoll_armed {
            // One-shot, armed again after each firing: arming polls the
            // descriptor at once, so events tokio left unread are seen.
            self.epoll_armed = true;
            let poll = opcode::PollAdd::new(Fd(epfd), libc::POLLIN as u32).build();
            self.push(poll.user_data(user_data(0, EPOLL)));
        }
        // A task waiting for a fast send to settle would otherwise sleep
        // until an unrelated completion: submit, settle, and let it run.
        let writer_waits = !self.fast_submitted.is_empty()
            || self.fast_queued.iter().any(|&k| self.conns[k as usize].as_ref().is_some_and(|c| c.fast && c.writer));
        if timeout_ms == 0 || writer_waits {
            return self.enter();
        }
        // Polling: each call submits what is queued (the first one all of
        // it) and runs the completions' task work without sleeping.
        super::idle_poll::wait(
            timeout_ms,
            self,
            |d| {
                d.enter();
                ((), !d.ring.completion().is_empty())
            },
            |d| d.sleep(timeout_ms),
        )
    }

    /// Submits what is queued and sleeps until a completion or the timeout;
    /// says whether there are completions.
    fn sleep(&mut self, timeout_ms: i32) -> ((), bool) {
        WAITS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        ENTERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let timeout = io_uring::types::Timespec::from(std::time::Duration::from_millis(timeout_ms as u64));
        let args = io_uring::types::SubmitArgs::new();
        let args = if timeout_ms > 0 { args.timespec(&timeout) } else { args };
        match self.ring.submitter().submit_with_args_and_flags(1, &args, self.wait_flags) {
            Ok(_) => self.submitted(),
            // The timer is due, a signal came, or the completion ring is
            // full (reaped next): tokio's turn goes on either way.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)) => {}
            Err(e) => tracing::error!(error = %e, "io_uring_enter failed"),
        }
        ((), !self.ring.completion().is_empty())
    }

    fn reap(&mut self, wake: &mut Vec<Waker>) {
        let mut completed = std::mem::take(&mut self.completed);
        loop {
            completed.extend(self.ring.completion().map(|c| (c.user_data(), c.result(), c.flags())));
            if completed.is_empty() {
                break;
            }
            for (data, result, flags) in completed.drain(..) {
                self.complete(data, result, flags, wake);
            }
        }
        self.completed = completed;
        self.settle_fast(wake);
    }

    fn complete(&mut self, data: u64, result: i32, flags: u32, wake: &mut Vec<Waker>) {
        if data & OP_MASK == EPOLL {
            self.epoll_armed = cqueue::more(flags);
            self.epoll_ready = true;
            return;
        }
        let key = (data >> OP_BITS) as u32;
        let buffer = cqueue::buffer_select(flags);
        // Taken out while handled, so entries can be queued on `self`.
        let Some(mut conn) = self.conns.get_mut(key as usize).and_then(Option::take) else {
            if let Some(id) = buffer {
                self.bufs.give_back(id);
            }
            return;
        };
        // A multishot receive goes on (and stays counted) while flagged MORE.
        let more = cqueue::more(flags);
        if !more {
            conn.ops -= 1;
        }
        match data & OP_MASK {
            RECV => {
                if !more {
                    conn.receiving = false;
                }
                if let Some(id) = buffer {
                    if result > 0 && !conn.dropped {
                        conn.bufs().inbox.extend_from_slice(self.bufs.get(id, result as usize));
                    }
                    self.bufs.give_back(id);
                }
                match result {
                    // No buffer was free: armed again below.
                    r if r == -libc::ENOBUFS => {}
                    r if r == -libc::ECANCELED => {}
                    // A kernel before 6.0: no multishot receive; one-shot ones from now on.
                    r if r == -libc::EINVAL && self.multishot => self.multishot = false,
                    r if r < 0 => conn.read_error = -r,
                    0 => conn.eof = true,
                    _ => {}
                }
                conn.writer = false;
                if let Some(w) = conn.waker.take() {
                    wake.push(w);
                }
                if conn.receiving && !conn.pausing && conn.inbox_len() >= INBOX_LIMIT {
                    // The reader is behind: stop receiving until it catches
                    // up (what arrives before the cancel still lands).
                    conn.pausing = true;
                    cancel(self, &mut conn, key, RECV);
                }
                if !conn.receiving {
                    conn.pausing = false;
                    if !conn.dropped && !self.stopping {
                        arm_recv(self, &mut conn, key);
                    }
                }
            }
            SEND => self.send_done(&mut conn, key, result, false, wake),
            // Only when it did not send everything: the rest goes as a send
            // the kernel retries once the socket has room.
            FAST_SEND => {
                conn.fast = false;
                // Not to be settled again: once this connection is freed its
                // key may name another one (failures are rare: a full socket).
                self.fast_queued.retain(|&k| k != key);
                self.fast_submitted.retain(|&k| k != key);
                let result = if result == -libc::EAGAIN { 0 } else { result };
                self.send_done(&mut conn, key, result, true, wake);
            }
            _ => {}
        }
        self.put_back(conn, key);
    }

    /// A connection's state goes back to its slot, or is freed (and its
    /// descriptor closed) when dropped with nothing in flight.
    fn put_back(&mut self, conn: Conn, key: u32) {
        if conn.dropped && conn.ops == 0 {
            closed(conn.fd);
            self.free.push(key);
            return;
        }
        self.conns[key as usize] = Some(conn);
    }

    /// A send took `result` bytes (or failed): what is left of it, then what
    /// was staged meanwhile, goes next; a waiting writer is woken. `short`:
    /// a fast send stopped on a full socket, so the rest must wait for room.
    fn send_done(&mut self, conn: &mut Conn, key: u32, result: i32, short: bool, wake: &mut Vec<Waker>) {
        if result < 0 {
            conn.write_error = -result;
            // Unsendable now; what was received stays readable (a
            // server's FATAL sent before it closed), as on epoll.
            if let Some(b) = conn.bufs.as_mut() {
                b.sending = Vec::new();
                b.staged = Vec::new();
            }
            conn.sent = 0;
        } else {
            conn.sent += result as u32;
            let sent = conn.sent as usize;
            let b = conn.bufs();
            if sent >= b.sending.len() {
                b.sending.clear();
                if b.sending.capacity() > KEEP_CAPACITY {
                    b.sending = Vec::new();
                }
                std::mem::swap(&mut b.sending, &mut b.staged);
                conn.sent = 0;
            }
            // A short send goes on from where it stopped; then what was staged meanwhile.
            if conn.sending() && !conn.dropped && !self.stopping {
                let fast = !short && conn.sent == 0;
                send(self, conn, key, fast);
            }
        }
        if (conn.writer || result < 0)
            && let Some(w) = conn.waker.take()
        {
            conn.writer = false;
            wake.push(w);
        }
    }

    fn adopt(&mut self, fd: RawFd) -> u32 {
        let conn = Conn {
            fd,
            ops: 0,
            receiving: false,
            pausing: false,
            eof: false,
            fast: false,
            writer: false,
            dropped: false,
            read_error: 0,
            write_error: 0,
            sent: 0,
            bufs: None,
            waker: None,
        };
        let key = match self.free.pop() {
            Some(k) => {
                self.conns[k as usize] = Some(conn);
                k
            }
            None => {
                self.conns.push(Some(conn));
                (self.conns.len() - 1) as u32
            }
        };
        SOCKETS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut conn = self.conns[key as usize].take().expect("just stored");
        arm_recv(self, &mut conn, key);
        self.conns[key as usize] = Some(conn);
        key
    }

    /// The owner dropped the socket: what is queued to send still goes (a
    /// last ErrorResponse, a Terminate), anything waiting on the peer is
    /// cancelled, and the descriptor closes once nothing names it.
    fn drop_conn(&mut self, key: u32) {
        let Some(mut conn) = self.conns[key as usize].take() else { return };
        if conn.ops == 0 {
            closed(conn.fd);
            self.free.push(key);
            return;
        }
        conn.dropped = true;
        conn.waker = None;
        if let Some(b) = conn.bufs.as_mut() {
            b.staged = Vec::new();
            b.inbox = BytesMut::new();
        }
        cancel_all(self, &mut conn, key);
        self.conns[key as usize] = Some(conn);
    }
}

impl Drop for Driver {
    /// The runtime is going: whatever is in flight is cancelled and waited
    /// for (briefly), so that the sockets dropped meanwhile really close
    /// and no buffer is freed under the kernel. Live sockets close when
    /// their owners drop them.
    fn drop(&mut self) {
        self.stopping = true;
        for key in 0..self.conns.len() as u32 {
            let Some(mut conn) = self.conns[key as usize].take() else { continue };
            cancel_all(self, &mut conn, key);
            self.conns[key as usize] = Some(conn);
        }
        let mut wake = Vec::new();
        let pause = io_uring::types::Timespec::new().nsec(10_000_000);
        for _ in 0..100 {
            if !self.conns.iter().flatten().any(|c| c.ops > 0) {
                break;
            }
            let args = io_uring::types::SubmitArgs::new().timespec(&pause);
            let _ = self.ring.submitter().submit_with_args(1, &args);
            self.submitted();
            self.reap(&mut wake);
            wake.clear();
        }
        for c in self.conns.iter().flatten().filter(|c| c.dropped && c.ops > 0) {
            closed(c.fd);
        }
        if self.conns.iter().flatten().any(|c| c.ops > 0) {
            // The kernel still names some buffers: leaked, not freed under it.
            std::mem::forget(std::mem::take(&mut self.conns));
            self.bufs.leak();
        }
    }
}

/// A socket whose reads and writes go through this thread's ring.
#[derive(Debug)]
pub struct Socket {
    key: u32,
    driver: u32,
    fd: RawFd,
    unix: bool,
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "io_uring socket used off its driver's thread")
}

impl Socket {
    /// Takes over a connected socket when this thread runs a ring; gives it
    /// back otherwise.
    pub fn adopt(fd: OwnedFd, unix: bool) -> Result<Socket, OwnedFd> {
        DRIVER.with(|d| match d.borrow_mut().as_mut() {
            Some(d) => {
                let raw = fd.into_raw_fd();
                Ok(Socket { key: d.adopt(raw), driver: d.id, fd: raw, unix })
            }
            None => Err(fd),
        })
    }

    pub fn is_unix(&self) -> bool {
        self.unix
    }

    fn with<R>(&self, f: impl FnOnce(&mut Driver, &mut Conn) -> R) -> io::Result<R> {
        with(self.driver, |d| {
            // Taken out for the call, so `f` may queue entries on `d`.
            let mut conn = d.conns[self.key as usize].take().expect("a live socket's key names its state");
            let r = f(d, &mut conn);
            d.conns[self.key as usize] = Some(conn);
            r
        })
        .ok_or_else(gone)
    }

    /// Moves what was received into `buf` (all of it: at most
    /// `INBOX_LIMIT` + `BUF`); `Ok(0)` at EOF.
    pub fn poll_read_buf(&self, cx: &mut Context<'_>, buf: &mut BytesMut) -> Poll<io::Result<usize>> {
        self.poll_take(cx, |inbox| {
            let n = inbox.len();
            buf.extend_from_slice(inbox);
            n
        })
    }

    pub fn poll_read(&self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.poll_take(cx, |inbox| {
            let n = inbox.len().min(buf.remaining());
            buf.put_slice(&inbox[..n]);
            n
        })
        .map_ok(|_| ())
    }

    fn poll_take(&self, cx: &mut Context<'_>, take: impl FnOnce(&[u8]) -> usize) -> Poll<io::Result<usize>> {
        let key = self.key;
        self.with(|d, conn| {
            if conn.inbox_len() > 0 {
                let inbox = &mut conn.bufs().inbox;
                let n = take(inbox);
                // `advance`/`clear`, not `split_to`: no shared handle is
                // made, and the allocation is reused in place.
                if n == inbox.len() {
                    inbox.clear();
                    if inbox.capacity() > KEEP_CAPACITY {
                        *inbox = BytesMut::new();
                    }
                } else {
                    bytes::Buf::advance(inbox, n);
                }
                arm_recv(d, conn, key);
                return Poll::Ready(Ok(n));
            }
            if let Some(e) = Conn::error(conn.read_error) {
                return Poll::Ready(Err(e));
            }
            if conn.eof {
                return Poll::Ready(Ok(0));
            }
            register(&mut conn.waker, cx);
            arm_recv(d, conn, key);
            Poll::Pending
        })?
    }

    /// Ready when received bytes (or EOF, or an error) wait.
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.with(|_, conn| {
            if conn.inbox_len() > 0 || conn.eof || conn.read_error != 0 {
                return Poll::Ready(Ok(()));
            }
            register(&mut conn.waker, cx);
            Poll::Pending
        })?
    }

    /// Accepts what fits under [`WRITE_LIMIT`]; the kernel takes it in the
    /// next batch. `WouldBlock` when full.
    pub fn try_write(&self, data: &[u8]) -> io::Result<usize> {
        let key = self.key;
        self.with(|d, conn| {
            if let Some(e) = Conn::error(conn.write_error) {
                return Err(e);
            }
            let n = data.len().min(WRITE_LIMIT.saturating_sub(conn.unsent()));
            if n == 0 && !data.is_empty() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            if conn.sending() {
                conn.bufs().staged.extend_from_slice(&data[..n]);
            } else {
                conn.bufs().sending.extend_from_slice(&data[..n]);
                send(d, conn, key, true);
            }
            Ok(n)
        })?
    }

    /// Ready when there is room to write (or an error to report).
    pub fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.with(|_, conn| {
            if conn.write_error != 0 || conn.unsent() < WRITE_LIMIT {
                return Poll::Ready(Ok(()));
            }
            conn.writer = true;
            register(&mut conn.waker, cx);
            Poll::Pending
        })?
    }

    /// Ready when the kernel has taken every accepted byte.
    pub fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.with(|_, conn| {
            if let Some(e) = Conn::error(conn.write_error) {
                return Poll::Ready(Err(e));
            }
            if conn.unsent() == 0 {
                return Poll::Ready(Ok(()));
            }
            conn.writer = true;
            register(&mut conn.waker, cx);
            Poll::Pending
        })?
    }

    /// Half-closes after a flush (the caller flushed).
    pub fn shutdown_write(&self) -> io::Result<()> {
        // SAFETY: our own descriptor.
        if unsafe { libc::shutdown(self.fd, libc::SHUT_WR) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// True while nothing at all arrived (for an idle server connection).
    pub fn is_quiet(&self) -> bool {
        self.with(|_, conn| conn.inbox_len() == 0 && !conn.eof && conn.read_error == 0).unwrap_or(false)
    }
}

/// Cancels `conn`'s operation `op` (its completion, and the cancel's own, still come).
fn cancel(d: &mut Driver, conn: &mut Conn, key: u32, op: u64) {
    conn.ops += 1;
    d.push(opcode::AsyncCancel::new(user_data(key, op)).build().user_data(user_data(key, CANCEL)));
}

/// Cancels whatever `conn` has in flight: its receive and its send.
fn cancel_all(d: &mut Driver, conn: &mut Conn, key: u32) {
    if conn.receiving {
        cancel(d, conn, key, RECV);
    }
    // A fast send is over once submitted: nothing to cancel.
    if conn.sending() && !conn.fast {
        cancel(d, conn, key, SEND);
    }
}

/// Whether fast sends ([`send`]) behave here as they must: one that sends
/// everything posts no completion, and one that meets a full socket fails
/// in the call that submits it. Tried on a socket pair before anything
/// else uses the ring (a kernel that retried such a send later would let
/// its buffer be reused under it).
fn fast_sends_work(ring: &IoUring) -> bool {
    let mut fds = [0; 2];
    // SAFETY: a plain socketpair(2) call; the descriptors are owned at once.
    if unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) } < 0 {
        return false;
    }
    // SAFETY: just created, owned nowhere else.
    let (a, _b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let data = vec![0u8; 4 << 20];
    let try_send = |len: usize| -> Option<Vec<i32>> {
        let entry = fast_send_entry(a.as_raw_fd(), &data[..len]).user_data(u64::MAX);
        // SAFETY: `data` outlives the call, which completes (or fails) the send.
        unsafe { ring.submission_shared().push(&entry).ok()? };
        // SAFETY: no argument pointer is passed.
        unsafe { ring.submitter().enter::<libc::sigset_t>(1, 0, io_uring::EnterFlags::GETEVENTS.bits(), None).ok()? };
        // SAFETY: this thread is the ring's only user while it is probed.
        Some(unsafe { ring.completion_shared() }.map(|c| c.result()).collect())
    };
    // 100 bytes fit: no completion. 4 MiB do not (a socket pair buffers a
    // few hundred KiB): one completion, there and then, with what went.
    matches!(try_send(100).as_deref(), Some([]))
        && matches!(try_send(data.len()).as_deref(), Some([n]) if (*n > 0 && (*n as usize) < data.len()) || *n == -libc::EAGAIN)
}

/// A fast send of `data` (see [`send`]): the one entry both the probe and
/// the data path submit, so the probe checks what is used.
fn fast_send_entry(fd: RawFd, data: &[u8]) -> squeue::Entry {
    opcode::Send::new(Fd(fd), data.as_ptr(), data.len() as u32)
        .flags(libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT | libc::MSG_WAITALL)
        .build()
        .flags(squeue::Flags::SKIP_SUCCESS)
}

/// Sends (the rest of) `conn.sending`.
///
/// `fast` (where the driver's probe passed): `MSG_DONTWAIT | MSG_WAITALL`
/// with `IOSQE_CQE_SKIP_SUCCESS`. The kernel then never retries it later:
/// it sends everything in the call that submits it (no completion at all),
/// or fails there and then, with a completion that says how much went
/// (`EAGAIN`: nothing). So a request's send costs no completion, and the
/// thread's wait is not ended by its own send: submitting the send and
/// sleeping until the answer can be one `io_uring_enter`. Otherwise (and
/// for the rest of a short fast send) a plain send, which the kernel
/// retries when the socket has room.
fn send(d: &mut Driver, conn: &mut Conn, key: u32, fast: bool) {
    let fast = fast && d.fast_sends;
    let (sent, fd) = (conn.sent as usize, conn.fd);
    let rest = &conn.bufs().sending[sent..];
    let entry = if fast {
        fast_send_entry(fd, rest).user_data(user_data(key, FAST_SEND))
    } else {
        opcode::Send::new(Fd(fd), rest.as_ptr(), rest.len() as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(user_data(key, SEND))
    };
    conn.ops += 1;
    conn.fast = fast;
    d.push(entry);
    if fast {
        d.fast_queued.push(key);
    }
}

/// Arms a receive unless one is in flight (or the inbox is full, or the peer is done).
fn arm_recv(d: &mut Driver, conn: &mut Conn, key: u32) {
    if conn.receiving || conn.eof || conn.read_error != 0 || conn.inbox_len() >= INBOX_LIMIT {
        return;
    }
    conn.receiving = true;
    conn.ops += 1;
    // Multishot: armed once, completing for every arrival until cancelled
    // (one submission per socket instead of one per message).
    let entry = if d.multishot {
        opcode::RecvMulti::new(Fd(conn.fd), GROUP).build()
    } else {
        opcode::Recv::new(Fd(conn.fd), std::ptr::null_mut(), BUF as u32)
            .buf_group(GROUP)
            .build()
            .flags(squeue::Flags::BUFFER_SELECT)
    };
    d.push(entry.user_data(user_data(key, RECV)));
}

/// Records the task to wake. A different task's waker it displaces is
/// woken, so that no wake-up is ever lost: that task polls again and finds
/// its readiness or registers anew.
fn register(slot: &mut Option<Waker>, cx: &Context<'_>) {
    if slot.as_ref().is_none_or(|w| !w.will_wake(cx.waker()))
        && let Some(old) = slot.replace(cx.waker().clone())
    {
        old.wake();
    }
}

/// pgmux's own `epoll_wait(2)`. An executable's definition of a symbol is
/// preferred to a shared library's, so every `epoll_wait` in the process
/// comes here, tokio's (mio's) included: tokio offers no way to replace the
/// call it blocks in, and this is the one place to wait in the ring instead
/// (see the module notes). On a thread whose ring waits, the call is
/// answered by [`park`]; every other call goes on, unchanged, to the
/// kernel's `epoll_pwait` (what libc's `epoll_wait` is, with no signal mask).
///
/// # Safety
/// As `epoll_wait(2)`: `events` must have room for `maxevents` entries.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn epoll_wait(
    epfd: libc::c_int,
    events: *mut libc::epoll_event,
    maxevents: libc::c_int,
    timeout: libc::c_int,
) -> libc::c_int {
    let _ = EPOLL_WAIT_SEEN.try_with(|seen| seen.set(true));
    match park(epfd, timeout) {
        // Nothing for tokio's own descriptors: as a timed-out wait.
        Some(false) => 0,
        // SAFETY: the caller's arguments; `Some(true)`: only what is there, without waiting.
        Some(true) => unsafe { libc::epoll_pwait(epfd, events, maxevents, 0, std::ptr::null()) },
        // SAFETY (both calls): the caller's arguments, passed on as they came.
        None => super::idle_poll::wait(
            timeout,
            &mut (),
            |_| {
                let n = unsafe { libc::epoll_pwait(epfd, events, maxevents, 0, std::ptr::null()) };
                (n, n != 0)
            },
            |_| {
                let n = unsafe { libc::epoll_pwait(epfd, events, maxevents, timeout, std::ptr::null()) };
                (n, n > 0)
            },
        ),
    }
}

/// tokio's wait on a ring's thread: in the ring, then the completions are
/// handed out (their tasks are woken into tokio's local queue: tokio holds
/// its scheduler in context while it waits). `Some(ready)`: whether tokio's
/// epoll descriptor has events; `None`: not a ring's wait (another thread,
/// another descriptor, the eventfd mode), left to the kernel.
fn park(epfd: RawFd, timeout_ms: i32) -> Option<bool> {
    let (ready, mut wake) = DRIVER
        .try_with(|cell| {
            let mut guard = cell.try_borrow_mut().ok()?;
            let d = guard.as_mut().filter(|d| d.parks && (d.epoll == epfd || d.epoll < 0))?;
            d.epoll = epfd;
            d.wait(epfd, timeout_ms);
            let mut wake = std::mem::take(&mut d.woken);
            d.reap(&mut wake);
            Some((std::mem::take(&mut d.epoll_ready), wake))
        })
        .ok()
        .flatten()?;
    for w in wake.drain(..) {
        w.wake();
    }
    // The vector goes back for the next wait (its allocation kept).
    let _ = DRIVER.try_with(|cell| {
        if let Ok(mut d) = cell.try_borrow_mut()
            && let Some(d) = d.as_mut()
        {
            d.woken = wake;
        }
    });
    Some(ready)
}

/// Whether this thread's `epoll_wait` calls reach pgmux's definition (they
/// would not if the binary were linked so that libc's came first).
fn interposed() -> bool {
    EPOLL_WAIT_SEEN.set(false);
    let mut event = libc::epoll_event { events: 0, u64: 0 };
    // SAFETY: no descriptor -1: fails with EBADF, having written nothing.
    unsafe { libc::epoll_wait(-1, &mut event, 1, 0) };
    EPOLL_WAIT_SEEN.get()
}

impl AsFd for Socket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the descriptor stays open while the socket lives.
        unsafe { BorrowedFd::borrow_raw(self.fd) }
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        if with(self.driver, |d| d.drop_conn(self.key)).is_none() {
            // Its driver is gone (the runtime ended): nothing names the
            // descriptor any more but us.
            closed(self.fd);
        }
    }
}

/// A ring of provided buffers registered with the kernel (a buffer group):
/// each receive that selects a buffer takes the next free one, and gives it
/// back with [`BufRing::give_back`]. Public for the io_uring floor relay
/// (`examples/floor_relay_uring.rs`), which uses the same kind of ring.
pub struct BufRing {
    /// `count` entries, page-aligned as the kernel requires.
    entries: *mut BufRingEntry,
    memory: Box<[u8]>,
    size: usize,
    mask: u16,
    tail: u16,
}

impl BufRing {
    /// Registers `count` (a power of two) buffers of `size` bytes as buffer group `group`.
    pub fn register(ring: &IoUring, count: u16, size: usize, group: u16) -> io::Result<BufRing> {
        if !count.is_power_of_two() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "a buffer ring's size is a power of two"));
        }
        let layout = std::alloc::Layout::from_size_align(count as usize * size_of::<BufRingEntry>(), 4096)
            .map_err(io::Error::other)?;
        // SAFETY: a non-zero layout; zeroed entries are valid (tail 0).
        let entries = unsafe { std::alloc::alloc_zeroed(layout) } as *mut BufRingEntry;
        if entries.is_null() {
            return Err(io::ErrorKind::OutOfMemory.into());
        }
        // SAFETY: the entries live as long as the process (never freed: the
        // kernel may read them until the ring is gone).
        unsafe { ring.submitter().register_buf_ring_with_flags(entries as u64, count, group, 0)? };
        let memory = vec![0u8; count as usize * size].into_boxed_slice();
        let mut bufs = BufRing { entries, memory, size, mask: count - 1, tail: 0 };
        for id in 0..count {
            bufs.add(id);
        }
        bufs.publish();
        Ok(bufs)
    }

    /// Where buffer `id` starts.
    pub fn ptr(&self, id: u16) -> *const u8 {
        self.memory[id as usize * self.size..].as_ptr()
    }

    /// The first `len` bytes of buffer `id`.
    pub fn get(&self, id: u16, len: usize) -> &[u8] {
        let start = id as usize * self.size;
        &self.memory[start..start + len.min(self.size)]
    }

    fn add(&mut self, id: u16) {
        let addr = self.ptr(id) as u64;
        // SAFETY: the index is masked into the ring.
        let entry = unsafe { &mut *self.entries.add((self.tail & self.mask) as usize) };
        entry.set_addr(addr);
        entry.set_len(self.size as u32);
        entry.set_bid(id);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes the added buffers visible to the kernel.
    fn publish(&self) {
        // SAFETY: the tail lives in the first entry's reserved field.
        let tail = unsafe { BufRingEntry::tail(self.entries) } as *const std::sync::atomic::AtomicU16;
        unsafe { &*tail }.store(self.tail, std::sync::atomic::Ordering::Release);
    }

    /// Returns buffer `id` to the kernel.
    pub fn give_back(&mut self, id: u16) {
        self.add(id);
        self.publish();
    }

    /// Never frees the buffers (the kernel may still write into them).
    fn leak(&mut self) {
        std::mem::forget(std::mem::replace(&mut self.memory, Box::new([])));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// An idle client's socket costs its slot (docs/benchmarks.md, idle memory).
    #[test]
    fn a_socket_slot_is_48_bytes() {
        assert!(size_of::<Option<Conn>>() <= 48, "{}", size_of::<Option<Conn>>());
    }

    /// A fast send that meets a full socket goes on as a plain one: 8 MiB
    /// written faster than the peer reads arrive whole and in order, the
    /// flush waits for the last byte, and the socket closes after it.
    #[test]
    fn a_send_that_meets_a_full_socket_goes_on_intact() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            if let Started::Refused(e) = start(16) {
                eprintln!("io_uring refused here ({e}): nothing to test");
                return;
            }
            assert!(with_driver(|d| d.fast_sends), "this kernel passes the fast-send probe");
            let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
            let socket = Socket::adopt(OwnedFd::from(ours), true).expect("a ring runs on this thread");
            let reader = std::thread::spawn(move || {
                let mut theirs = theirs;
                // Slow at first, so that sends meet a full socket.
                std::thread::sleep(std::time::Duration::from_millis(200));
                let mut got = Vec::new();
                std::io::Read::read_to_end(&mut theirs, &mut got).unwrap();
                got
            });
            let data: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 251) as u8).collect();
            let mut off = 0;
            while off < data.len() {
                match socket.try_write(&data[off..off + (64 << 10).min(data.len() - off)]) {
                    Ok(n) => off += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::future::poll_fn(|cx| socket.poll_write_ready(cx)).await.unwrap()
                    }
                    Err(e) => panic!("write failed: {e}"),
                }
            }
            std::future::poll_fn(|cx| socket.poll_flush(cx)).await.unwrap();
            drop(socket);
            let got = tokio::task::spawn_blocking(move || reader.join().unwrap()).await.unwrap();
            assert_eq!(got.len(), data.len());
            assert!(got == data, "the bytes arrived in order");
        });
    }

    fn with_driver<R>(f: impl FnOnce(&Driver) -> R) -> R {
        DRIVER.with(|d| f(d.borrow().as_ref().expect("a ring runs")))
    }

    struct Count(std::sync::atomic::AtomicUsize);
    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// One waker per slot loses no wake-up: the task a second one displaces
    /// is woken (to poll again), the same task re-registering is not.
    #[test]
    fn a_displaced_waker_is_woken() {
        let (a, b) = (Arc::new(Count(0.into())), Arc::new(Count(0.into())));
        let (wa, wb) = (Waker::from(a.clone()), Waker::from(b.clone()));
        let woken = |c: &Count| c.0.load(std::sync::atomic::Ordering::SeqCst);
        let mut slot = None;
        register(&mut slot, &Context::from_waker(&wa));
        register(&mut slot, &Context::from_waker(&wa));
        assert_eq!(woken(&a), 0, "re-registering the same task wakes nobody");
        register(&mut slot, &Context::from_waker(&wb));
        assert_eq!(woken(&a), 1, "the displaced task is woken");
        assert_eq!(woken(&b), 0);
        assert!(slot.as_ref().is_some_and(|w| w.will_wake(&wb)), "the newcomer is the one kept");
    }
}
