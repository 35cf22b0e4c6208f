//! The system-call edge of fluxgate: the io_uring acceptor, splice(2) and pipes, and the
//! socket options socket2 does not carry. Every `unsafe` block of the gateway lives here,
//! each with a SAFETY note.
//! This crate never touches HTTP or config: it hands out file descriptors, and its only tie
//! to tokio is registering the ring's descriptor with the reactor.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use io_uring::{opcode, squeue, types, IoUring};

mod probe;
pub mod tunnel;

/// Tag of the multishot accept request.
const ACCEPT_TAG: u64 = 0xacce;

/// Room for one peer address.
#[repr(C)]
struct Slot {
    addr: libc::sockaddr_storage,
    len: libc::socklen_t,
}

/// A small io_uring that keeps one multishot accept armed on a listening socket and signals
/// completions through an eventfd, which a readiness-based runtime polls.
///
/// The ring is set up with DEFER_TASKRUN where the kernel has it (6.1+): a completion then
/// does not interrupt the worker thread (no signal-style task work); the work waits until
/// `drain` asks for it with one io_uring_enter, which also batches a burst of accepts. Without
/// it, every accept interrupts the thread and io_uring loses to epoll on connection rate.
/// Multishot accept returns no address, so `drain` asks getpeername(2) for each connection.
///
/// One ring per listener per worker thread, created on that thread; it is never shared.
pub struct AcceptRing {
    ring: IoUring,
    eventfd: OwnedFd,
    listener: RawFd,
    deferred: bool,
    armed: bool,
}

impl AsRawFd for AcceptRing {
    /// The eventfd, readable when completions (or deferred completion work) are waiting.
    fn as_raw_fd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }
}

/// What one drain of the completion queue produced.
#[derive(Debug, Default)]
pub struct Drained {
    /// Accepted sockets (non-blocking, close-on-exec) with their peers, or the accept errors
    /// the kernel reported.
    pub accepted: Vec<io::Result<(OwnedFd, SocketAddr)>>,
}

impl AcceptRing {
    /// Sets up a ring for `listener` (which must stay open for the ring's lifetime) and arms
    /// the accept. Fails with the kernel's error when io_uring is unavailable (ENOSYS, EPERM
    /// from seccomp or `kernel.io_uring_disabled`).
    pub fn new(listener: RawFd) -> io::Result<Self> {
        let (ring, deferred) = match IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(64)
        {
            Ok(r) => (r, true),
            // Kernels before 6.1 refuse the flags: run without them.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (IoUring::new(64)?, false),
            Err(e) => return Err(e),
        };
        // SAFETY: eventfd(2) takes no pointers; a non-negative return is a fresh descriptor
        // that nothing else owns, so OwnedFd may take it.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: efd is valid and owned by no one else (see above).
        let eventfd = unsafe { OwnedFd::from_raw_fd(efd) };
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        let mut this = AcceptRing {
            ring,
            eventfd,
            listener,
            deferred,
            armed: false,
        };
        this.arm()?;
        Ok(this)
    }

    /// Whether completions are deferred to `drain` (DEFER_TASKRUN) rather than interrupting
    /// the thread.
    pub fn deferred(&self) -> bool {
        self.deferred
    }

    /// Registers the ring with the current tokio reactor: the result polls readable when
    /// completions are waiting. Must be called inside a tokio runtime.
    pub fn register(self) -> io::Result<tokio::io::unix::AsyncFd<AcceptRing>> {
        // SAFETY: the registered descriptor is the eventfd the ring owns, and AsyncFd owns the
        // ring, so the descriptor stays open until AsyncFd deregisters it on drop.
        unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(self, tokio::io::Interest::READABLE)
        }
        .map_err(|e| e.into_parts().1)
    }

    fn arm(&mut self) -> io::Result<()> {
        let entry = opcode::AcceptMulti::new(types::Fd(self.listener))
            .flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
            .build()
            .user_data(ACCEPT_TAG);
        push(&mut self.ring, &entry)?;
        self.ring.submit()?;
        self.armed = true;
        Ok(())
    }

    /// Clears the eventfd, runs deferred completion work, takes every completion (also those
    /// the kernel held back while the completion queue was full) and re-arms the accept if
    /// the kernel ended it (after an error or a full completion queue). Call it after the
    /// eventfd polled readable.
    pub fn drain(&mut self, out: &mut Drained) -> io::Result<()> {
        let mut counter = [0u8; 8];
        // SAFETY: reads 8 bytes into a live 8-byte buffer from a descriptor we own; EAGAIN
        // (nothing to clear) is fine and ignored.
        unsafe {
            libc::read(
                self.eventfd.as_raw_fd(),
                counter.as_mut_ptr().cast::<libc::c_void>(),
                counter.len(),
            );
        }
        let mut flush = self.deferred;
        loop {
            if flush {
                // IORING_ENTER_GETEVENTS without waiting: runs the deferred accept completions
                // and moves completions held back on overflow into the queue.
                // SAFETY: no submission entries and no argument pointer are passed.
                unsafe {
                    self.ring
                        .submitter()
                        .enter::<libc::sigset_t>(0, 0, ENTER_GETEVENTS, None)?;
                }
            }
            self.take_completions(out);
            // A burst larger than the completion queue: the rest waits in the kernel's
            // overflow list, which raises no new eventfd signal. Fetch it now, or the ending
            // of the multishot accept (among those held back) is never seen, and accepting
            // stops while the listen queue fills.
            if !self.ring.submission().cq_overflow() {
                break;
            }
            flush = true;
        }
        if !self.armed {
            self.arm()?;
        }
        Ok(())
    }

    fn take_completions(&mut self, out: &mut Drained) {
        for cqe in self.ring.completion() {
            if cqe.user_data() != ACCEPT_TAG {
                continue;
            }
            if !io_uring::cqueue::more(cqe.flags()) {
                self.armed = false;
            }
            let res = cqe.result();
            if res >= 0 {
                // SAFETY: a non-negative accept result is a new descriptor the kernel gave us
                // and nothing else refers to it.
                let fd = unsafe { OwnedFd::from_raw_fd(res) };
                match peer_of(&fd) {
                    Some(addr) => out.accepted.push(Ok((fd, addr))),
                    // The client left before we looked: nothing to serve.
                    None => drop(fd),
                }
            } else if res != -libc::ECANCELED {
                out.accepted.push(Err(io::Error::from_raw_os_error(-res)));
            }
        }
    }
}

/// IORING_ENTER_GETEVENTS from the kernel's uapi header.
const ENTER_GETEVENTS: u32 = 1;

fn peer_of(fd: &OwnedFd) -> Option<SocketAddr> {
    let mut slot = Slot {
        // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
        addr: unsafe { std::mem::zeroed() },
        len: std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t,
    };
    // SAFETY: getpeername writes at most `len` bytes into storage we own and updates `len`.
    let rc = unsafe {
        libc::getpeername(
            fd.as_raw_fd(),
            (&mut slot.addr as *mut libc::sockaddr_storage).cast::<libc::sockaddr>(),
            &mut slot.len,
        )
    };
    if rc == 0 {
        peer(&slot)
    } else {
        None
    }
}

/// Reads a peer address out of a sockaddr_storage.
fn peer(slot: &Slot) -> Option<SocketAddr> {
    match slot.addr.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in, which it is large and
            // aligned enough for.
            let a = unsafe {
                &*(&slot.addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>()
            };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let a = unsafe {
                &*(&slot.addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

fn push(ring: &mut IoUring, entry: &squeue::Entry) -> io::Result<()> {
    // SAFETY: the multishot accept entry references no user memory (it passes no address
    // buffer), so nothing must outlive the submission.
    unsafe {
        if ring.submission().push(entry).is_err() {
            ring.submit()?;
            ring.submission()
                .push(entry)
                .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        }
    }
    Ok(())
}

/// Checks that this process may create an io_uring and that the kernel supports accept
/// (multishot accept needs 5.19); the error says why not.
///
/// The probe runs on a short-lived thread of its own: tearing a ring down can interrupt a
/// blocking system call of the thread that created it (EINTR), which the caller should not see.
pub fn probe_uring() -> io::Result<()> {
    std::thread::spawn(probe::probe_on_this_thread)
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("io_uring probe panicked")))
}

/// Asks mimalloc (the binary's allocator) to return this thread's free pages to the kernel
/// now. mimalloc purges lazily, on later allocator calls of the same thread; a worker that
/// just parked thousands of idle connections may make no further calls for a long time.
/// Harmless when mimalloc is not the global allocator: its heaps are then empty.
pub fn release_free_memory() {
    // SAFETY: mi_collect takes no pointers and may be called at any time from any thread;
    // `force` also releases the thread's cached segments.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// Gives the calling thread the lowest CPU priority (nice 19): background work (freeing a
/// large structure) then takes what the workers leave on a shared core instead of half of it.
pub fn lower_this_thread_priority() {
    // SAFETY: gettid and setpriority take plain integers and touch no memory of ours; on
    // Linux a nice value belongs to one thread, the one gettid names.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 19);
    }
}

/// Makes a write past the process's file-size limit (RLIMIT_FSIZE) fail with EFBIG instead
/// of killing the process with SIGXFSZ: a full journal or log is an error to handle, not a
/// crash.
pub fn ignore_file_size_signal() {
    // SAFETY: setting a signal's disposition to SIG_IGN installs no handler code.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

/// Raises the soft limit on open files to the hard limit (a proxy holds two descriptors per
/// proxied connection) and returns the new soft limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we pass and keep no reference.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(io::Error::last_os_error());
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(lim.rlim_cur)
}

/// A global allocator that counts allocations made on threads that asked to be counted:
/// how tests and benchmarks check "no allocation on this path". Wraps the system allocator.
/// Two ways: `count_allocations` around work on this thread; or, for work spread over
/// threads one does not own (a gateway in the process), `count_process_allocations` counts
/// on every thread except those that called `exclude_this_thread` (the measuring ones).
///
/// ```ignore
/// #[global_allocator]
/// static ALLOC: fluxgate_sys::CountingAlloc = fluxgate_sys::CountingAlloc;
/// let n = fluxgate_sys::count_allocations(|| work());
/// ```
pub struct CountingAlloc;

thread_local! {
    static COUNTING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static ALLOCATIONS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    static EXCLUDED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

static PROCESS_COUNTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static PROCESS_ALLOCATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn counted() {
    use std::sync::atomic::Ordering::Relaxed;
    if COUNTING.with(|c| c.get()) {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
    }
    if PROCESS_COUNTING.load(Relaxed) && !EXCLUDED.with(|e| e.get()) {
        PROCESS_ALLOCATIONS.fetch_add(1, Relaxed);
    }
}

/// Leaves this thread's allocations out of `count_process_allocations`.
pub fn exclude_this_thread() {
    EXCLUDED.with(|e| e.set(true));
}

/// Starts counting allocations on every thread not excluded; returns the count so far (take
/// the difference of two calls).
pub fn count_process_allocations() -> u64 {
    use std::sync::atomic::Ordering::Relaxed;
    PROCESS_COUNTING.store(true, Relaxed);
    PROCESS_ALLOCATIONS.load(Relaxed)
}

// SAFETY: every call is forwarded unchanged to the system allocator; the counting touches
// only const-initialised thread-locals, which never allocate.
unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        counted();
        // SAFETY: same contract as the caller's.
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        counted();
        // SAFETY: same contract as the caller's.
        unsafe { std::alloc::System.realloc(ptr, layout, new) }
    }
}

/// Runs `f` and returns how many allocations (and reallocations) it made on this thread.
/// Meaningful only when `CountingAlloc` is the global allocator.
pub fn count_allocations(f: impl FnOnce()) -> u64 {
    ALLOCATIONS.with(|n| n.set(0));
    COUNTING.with(|c| c.set(true));
    f();
    COUNTING.with(|c| c.set(false));
    ALLOCATIONS.with(|n| n.get())
}

/// Sets TCP_FASTOPEN on a listening socket with the given pending-request queue length.
pub fn set_tcp_fastopen(fd: &impl AsRawFd, queue_len: u32) -> io::Result<()> {
    let val = queue_len as libc::c_int;
    // SAFETY: passes a pointer to a live c_int and its exact size; the kernel copies it.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_FASTOPEN,
            (&val as *const libc::c_int).cast::<libc::c_void>(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A nonblocking, close-on-exec pipe for splice(2): (read end, write end, capacity), its
/// buffer grown to `size` bytes when the kernel allows (the default is 64 KiB).
pub fn pipe(size: usize) -> io::Result<(OwnedFd, OwnedFd, usize)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two descriptors into the two-element array it is given.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just opened by pipe2 and are owned by nothing else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: F_SETPIPE_SZ takes an int and returns the size set; a refusal (over
    // /proc/sys/fs/pipe-max-size) leaves the default, asked for with F_GETPIPE_SZ.
    let set = unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int) };
    // SAFETY: F_GETPIPE_SZ takes no argument.
    let cap = if set > 0 {
        set
    } else {
        unsafe { libc::fcntl(w.as_raw_fd(), libc::F_GETPIPE_SZ) }
    };
    Ok((r, w, cap.max(4096) as usize))
}

/// Moves up to `len` bytes from `from` to `to` in the kernel, one of them a pipe, without
/// blocking (splice(2) with SPLICE_F_NONBLOCK): Ok(0) is the end of `from`, WouldBlock
/// that one side is not ready.
pub fn splice(from: &impl AsRawFd, to: &impl AsRawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the call (borrowed); null offsets mean the
    // files' own positions, as sockets and pipes require.
    let n = unsafe {
        libc::splice(
            from.as_raw_fd(),
            std::ptr::null_mut(),
            to.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn splice_moves_bytes_through_a_pipe() {
        use std::io::{Read, Write};
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        let (r, w, _) = pipe(1 << 20).unwrap();
        a.write_all(b"through the kernel").unwrap();
        a.shutdown(std::net::Shutdown::Write).unwrap();
        let mut moved = 0;
        while moved < 18 {
            match splice(&b, &w, 1 << 16) {
                Ok(n) => moved += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(splice(&b, &w, 1 << 16).unwrap(), 0, "the end of the stream");
        let mut out = [0u8; 18];
        std::fs::File::from(r).read_exact(&mut out).unwrap();
        assert_eq!(&out, b"through the kernel");
    }

    #[test]
    #[cfg_attr(
        io_uring_unavailable,
        ignore = "io_uring is unavailable on this machine"
    )]
    fn accepts_through_the_ring() {
        probe_uring().expect("io_uring available (build.rs said so)");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let mut ring = AcceptRing::new(listener.as_raw_fd()).unwrap();
        let addr = listener.local_addr().unwrap();
        let _a = TcpStream::connect(addr).unwrap();
        let _b = TcpStream::connect(addr).unwrap();
        let mut got = 0;
        for _ in 0..200 {
            let mut out = Drained::default();
            ring.drain(&mut out).unwrap();
            for r in &out.accepted {
                let (_, peer) = r.as_ref().unwrap();
                assert!(peer.ip().is_loopback() && peer.port() != 0);
                got += 1;
            }
            if got == 2 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(got, 2);
    }
}
