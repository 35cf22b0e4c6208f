//! RFC 9000 8.1 to the letter: before a client's address is validated, a server sends it at
//! most three times what it received. quinn lets the datagram that crosses the limit go out
//! whole (quinn issue 1082), so the socket under it holds the count: per address that
//! started with an Initial, bytes in and out until the client shows it got our packets (a
//! Handshake or 1-RTT packet from it); datagrams past the budget are not sent, as if lost
//! (quinn sends their data again once the client's next packets widen the budget).
//!
//! The book is a mutex the worker's thread alone takes (quinn's socket API must be
//! `Sync`); while nobody is handshaking it is empty and a send does not lock it.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncTimer, AsyncUdpSocket, Runtime, TokioRuntime, UdpPoller};

/// Addresses tracked at most; past it new ones are left to quinn's own limit.
const MAX_TRACKED: usize = 65_536;
/// A tracked address that never validated is forgotten after this.
const FORGET_AFTER: Duration = Duration::from_secs(30);

/// quinn's tokio runtime, with sockets that keep the budget.
#[derive(Debug)]
pub(crate) struct Guarded;

impl Runtime for Guarded {
    fn new_timer(&self, i: Instant) -> Pin<Box<dyn AsyncTimer>> {
        TokioRuntime.new_timer(i)
    }

    fn spawn(&self, future: Pin<Box<dyn std::future::Future<Output = ()> + Send>>) {
        TokioRuntime.spawn(future)
    }

    fn wrap_udp_socket(&self, t: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        Ok(Arc::new(GuardedSocket {
            inner: TokioRuntime.wrap_udp_socket(t)?,
            tracked: AtomicUsize::new(0),
            book: Mutex::new(HashMap::new()),
        }))
    }
}

struct Budget {
    received: u64,
    sent: u64,
    since: Instant,
}

struct GuardedSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    /// `book.len()`, read without the lock.
    tracked: AtomicUsize,
    book: Mutex<HashMap<SocketAddr, Budget>>,
}

impl fmt::Debug for GuardedSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuardedSocket")
            .field("inner", &self.inner)
            .finish()
    }
}

/// What a packet's first byte says: (long header, its type).
fn kind(first: u8) -> (bool, u8) {
    (first & 0x80 != 0, (first & 0x30) >> 4)
}

impl GuardedSocket {
    fn received(&self, from: SocketAddr, first: u8, len: usize) {
        let (long, ty) = kind(first);
        if self.tracked.load(Ordering::Relaxed) == 0 && !(long && ty == 0) {
            return;
        }
        let mut book = self.book.lock().expect("amplification book");
        match book.get_mut(&from) {
            // A Handshake or 1-RTT packet: the client has our keys, so our packets.
            Some(_) if !long || ty == 2 => {
                book.remove(&from);
            }
            Some(b) => b.received += len as u64,
            // A new client's Initial.
            None if long && ty == 0 => {
                if book.len() >= MAX_TRACKED / 2 {
                    let now = Instant::now();
                    book.retain(|_, b| now - b.since < FORGET_AFTER);
                }
                if book.len() < MAX_TRACKED {
                    book.insert(
                        from,
                        Budget {
                            received: len as u64,
                            sent: 0,
                            since: Instant::now(),
                        },
                    );
                }
            }
            None => {}
        }
        self.tracked.store(book.len(), Ordering::Relaxed);
    }

    /// How many bytes of `t` may go: all of it, or whole datagrams up to the budget.
    fn allowed(&self, t: &Transmit<'_>) -> usize {
        if self.tracked.load(Ordering::Relaxed) == 0 {
            return t.contents.len();
        }
        let mut book = self.book.lock().expect("amplification book");
        let Some(b) = book.get_mut(&t.destination) else {
            return t.contents.len();
        };
        let room = (3 * b.received).saturating_sub(b.sent) as usize;
        let seg = t.segment_size.unwrap_or(t.contents.len()).max(1);
        let n = if t.contents.len() <= room {
            t.contents.len()
        } else {
            room / seg * seg
        };
        b.sent += n as u64;
        n
    }
}

impl AsyncUdpSocket for GuardedSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Arc::clone(&self.inner).create_io_poller()
    }

    fn try_send(&self, t: &Transmit<'_>) -> io::Result<()> {
        let n = self.allowed(t);
        if n == t.contents.len() {
            return self.inner.try_send(t);
        }
        if n == 0 {
            // Over the budget: as if lost on the way.
            return Ok(());
        }
        let part = Transmit {
            destination: t.destination,
            ecn: t.ecn,
            contents: &t.contents[..n],
            segment_size: t.segment_size.filter(|&s| s < n),
            src_ip: t.src_ip,
        };
        self.inner.try_send(&part)
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let n = std::task::ready!(self.inner.poll_recv(cx, bufs, meta))?;
        for (m, buf) in meta.iter().zip(bufs.iter()).take(n) {
            let stride = m.stride.max(1);
            let mut at = 0;
            while at < m.len {
                let len = stride.min(m.len - at);
                self.received(m.addr, buf[at], len);
                at += len;
            }
        }
        Poll::Ready(Ok(n))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}
