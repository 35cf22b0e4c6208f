//! One client connection as both servers see it: its shared state (requests in flight,
//! timers, parking), the socket wrapper that enforces the header-read and keep-alive timeouts
//! and parks idle connections, and the head limits.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

pub use crate::stream::ClientStream;

/// A connection idle this long is parked: its server frees its read and write buffers and
/// keeps the socket, taking buffers again when the next request comes. Busy connections never
/// pay for the restart.
const PARK_AFTER: Duration = Duration::from_secs(1);

/// What the request handler and the socket wrapper of one connection share.
pub struct ConnState {
    /// Requests received whose response body has not been dropped yet.
    in_flight: Count,
    /// Bytes arrived since the last request was handed over: a head is being read.
    partial: Flag,
    /// When `partial` last became true.
    head_started: Stamp,
    /// When the connection last became idle (no request in flight).
    idle_since: Stamp,
    /// Told by the first bytes; an HTTP/2 connection has no request heads to time.
    h2: Flag,
    /// Set when the socket wrapper told the server to free its buffers.
    parked: Flag,
    /// The server freed its buffers in this idle period.
    slim: Flag,
    header_timeout: Duration,
    idle_timeout: Duration,
    /// How long the client may take no response bytes (see `StallWatch`).
    pub send_timeout: Duration,
    /// How long the client may send no bytes of a request body it is sending.
    pub body_timeout: Duration,
    /// See `body_deadline`.
    request_timeout: Option<Duration>,
    body_min_rate: Option<u64>,
    /// The client's IP address, ready for X-Forwarded-For.
    pub peer_ip: http::HeaderValue,
    /// The client's address, and the one it connected to (both as a PROXY protocol header
    /// in front of the connection said, if one did).
    pub peer: SocketAddr,
    pub local: SocketAddr,
    /// `Alt-Svc` for the responses (a TLS listener that also serves HTTP/3).
    pub alt_svc: Option<http::HeaderValue>,
    /// "http" or "https", for X-Forwarded-Proto.
    pub scheme: http::HeaderValue,
    /// The common name of the client certificate the TLS handshake verified, if any.
    pub client_cn: Option<Box<str>>,
}

// The fields of `ConnState` are touched by one thread only, but the response body holds them
// (through `InFlight`) and hyper's HTTP/2 client wants bodies to be Send, so they are relaxed
// atomics rather than Cells.

/// A `Cell<bool>` that is Sync.
#[derive(Default)]
struct Flag(AtomicBool);

impl Flag {
    fn new(v: bool) -> Flag {
        Flag(AtomicBool::new(v))
    }
    fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
    fn set(&self, v: bool) {
        self.0.store(v, Ordering::Relaxed)
    }
    fn replace(&self, v: bool) -> bool {
        self.0.swap(v, Ordering::Relaxed)
    }
}

/// A `Cell<u32>` that is Sync (one writer: plain load and store).
struct Count(AtomicU32);

impl Count {
    fn get(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }
    fn set(&self, v: u32) {
        self.0.store(v, Ordering::Relaxed)
    }
}

/// A `Cell<Instant>` that is Sync: nanoseconds since a process-wide base.
struct Stamp(AtomicU64);

fn base() -> Instant {
    static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

impl Stamp {
    fn new(at: Instant) -> Stamp {
        let s = Stamp(AtomicU64::new(0));
        s.set(at);
        s
    }
    fn get(&self) -> Instant {
        base() + Duration::from_nanos(self.0.load(Ordering::Relaxed))
    }
    fn set(&self, at: Instant) {
        let n = at.saturating_duration_since(base()).as_nanos() as u64;
        self.0.store(n, Ordering::Relaxed)
    }
}

/// Held by a response body: the connection counts as busy until it is dropped.
pub struct InFlight(Arc<ConnState>);

impl ConnState {
    /// Marks a request as received; the returned guard marks it finished when dropped.
    pub fn begin_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.set(self.in_flight.get() + 1);
        self.partial.set(false);
        InFlight(Arc::clone(self))
    }

    /// Bytes of a request head are here: the header-read timeout runs from now (unless it
    /// already runs).
    pub fn begin_head(&self) {
        if !self.partial.replace(true) {
            self.head_started.set(Instant::now());
        }
    }

    /// Idle, with no head begun, and not yet parked in this idle period.
    fn parkable(&self) -> bool {
        self.in_flight.get() == 0 && !self.partial.get() && !self.slim.get()
    }

    /// Whether the socket wrapper asked the server to free its buffers (once).
    pub fn take_park(&self) -> bool {
        let parked = self.parked.replace(false);
        if parked {
            self.slim.set(true);
        }
        parked
    }

    /// When the keep-alive idle period ends.
    fn idle_deadline(&self) -> Instant {
        self.idle_since.get() + self.idle_timeout
    }

    /// The next moment the socket wrapper must look again: 408, idle close or park.
    fn deadline(&self) -> Instant {
        if self.in_flight.get() > 0 {
            // Nothing to enforce while a request is served, but the server may not read
            // again when it ends, so keep a timer armed to look again later.
            return Instant::now() + PARK_AFTER.min(self.idle_timeout);
        }
        if self.partial.get() && !self.h2.get() {
            return self.head_started.get() + self.header_timeout;
        }
        let close = self.idle_deadline();
        if self.parkable() {
            close.min(self.idle_since.get() + PARK_AFTER)
        } else {
            close
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let n = self.0.in_flight.get() - 1;
        self.0.in_flight.set(n);
        if n == 0 {
            self.0.idle_since.set(Instant::now());
        }
    }
}

/// The client socket as the server sees it. When the server waits for bytes and the
/// connection's deadline has passed, the read fails with `TimedOut` (the HTTP/1.1 server then
/// answers 408 if a head had begun), which ends the connection; when it is time to park, the
/// read returns no bytes and `ConnState::take_park` says why.
pub struct ClientIo {
    stream: ClientStream,
    eof: bool,
    state: Arc<ConnState>,
    // Armed lazily, and only moved when the deadline moves earlier; firing early just re-arms.
    timer: Option<Pin<Box<Sleep>>>,
    /// The timer is set to look again soon (a request is in flight): no need to move it.
    recheck_armed: bool,
    /// Bytes to read before the stream's (read while sniffing, or TLS 0-RTT data).
    prefix: Option<bytes::Bytes>,
}

impl ClientIo {
    /// The socket, unless the client closed its side.
    pub fn into_stream(self) -> Option<ClientStream> {
        (!self.eof).then_some(self.stream)
    }

    /// Reads what the client sent into `rbuf` (room for `size`). A server that freed its
    /// buffers (`rbuf` without capacity) reads a little first, so that it only takes a buffer
    /// again when bytes come.
    pub fn poll_input(
        &mut self,
        rbuf: &mut BytesMut,
        size: usize,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        if rbuf.capacity() > 0 {
            return crate::stream::poll_fill(self, rbuf, size, cx);
        }
        let mut small = [0u8; 64];
        let mut buf = ReadBuf::new(&mut small);
        std::task::ready!(Pin::new(&mut *self).poll_read(cx, &mut buf))?;
        rbuf.extend_from_slice(buf.filled());
        Poll::Ready(Ok(buf.filled().len()))
    }

    /// Writes `wbuf` from `written` on, then empties it; a buffer a large body grew past
    /// `keep` is given back.
    pub fn poll_write_buf(
        &mut self,
        wbuf: &mut Vec<u8>,
        written: &mut usize,
        keep: usize,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        while *written < wbuf.len() {
            let n = std::task::ready!(Pin::new(&mut *self).poll_write(cx, &wbuf[*written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *written += n;
        }
        *written = 0;
        wbuf.clear();
        if wbuf.capacity() > 4 * keep {
            *wbuf = Vec::new();
        }
        Poll::Ready(Ok(()))
    }

    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let st = &self.state;
        if st.in_flight.get() > 0 {
            if let Some(timer) = &mut self.timer {
                // Nothing to enforce now, but the server may not read again when the request
                // ends: keep the timer within a re-check period.
                let recheck = || Instant::now() + PARK_AFTER.min(st.idle_timeout);
                if !self.recheck_armed {
                    // Moved only when set later than that: firing early just re-arms, and a
                    // timer moved per request costs the wheel two updates each time.
                    let at = recheck();
                    if timer.deadline() > at {
                        timer.as_mut().reset(at);
                    }
                    self.recheck_armed = true;
                }
                while timer.as_mut().poll(cx).is_ready() {
                    timer.as_mut().reset(recheck());
                }
                return Poll::Pending;
            }
        }
        self.recheck_armed = false;
        let deadline = self.state.deadline();
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() > deadline {
            timer.as_mut().reset(deadline);
        }
        while timer.as_mut().poll(cx).is_ready() {
            let deadline = self.state.deadline();
            if self.state.in_flight.get() == 0 && Instant::now() >= deadline {
                return Poll::Ready(());
            }
            timer.as_mut().reset(deadline);
        }
        Poll::Pending
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = match &mut this.prefix {
            Some(p) => {
                let n = p.len().min(buf.remaining());
                buf.put_slice(&p.split_to(n));
                if p.is_empty() {
                    this.prefix = None;
                }
                Poll::Ready(Ok(()))
            }
            None => Pin::new(&mut this.stream).poll_read(cx, buf),
        };
        match polled {
            Poll::Ready(Ok(())) => {
                let st = &this.state;
                if buf.filled().len() == before {
                    this.eof = buf.remaining() > 0;
                } else {
                    st.slim.set(false);
                    if st.h2.get() {
                        // Frames with no stream open (pings, settings) keep it alive; while
                        // streams are open, the last one to end stamps the idle start.
                        if st.in_flight.get() == 0 {
                            st.idle_since.set(Instant::now());
                        }
                    } else if st.in_flight.get() == 0 {
                        st.begin_head();
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                if this.poll_deadline(cx).is_ready() {
                    let st = &this.state;
                    if st.parkable() && Instant::now() < st.idle_deadline() {
                        // Looks like the end of the stream; the server sees `take_park` and
                        // frees its buffers instead of closing.
                        st.parked.set(true);
                        return Poll::Ready(Ok(()));
                    }
                    return Poll::Ready(Err(io::ErrorKind::TimedOut.into()));
                }
                Poll::Pending
            }
            other => other,
        }
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// The limits a request head must keep, on every protocol.
#[derive(Clone, Copy)]
pub struct HeadLimits {
    /// The most bytes a head may take (431 beyond; on HTTP/1.1, 414 when the request line
    /// alone does).
    pub max_head: usize,
    /// The most header fields, pseudo-headers not counted (431 beyond).
    pub max_headers: usize,
}

/// Frees an idle connection's read and write buffers, unless they still hold bytes.
pub fn free_buffers(rbuf: &mut BytesMut, wbuf: &mut Vec<u8>, written: &mut usize) {
    if rbuf.is_empty() {
        *rbuf = BytesMut::new();
    }
    if *written == wbuf.len() {
        *wbuf = Vec::new();
        *written = 0;
    }
}

/// Whether the worker started draining, for a connection future that polls this each time it
/// is polled. The wait (`draining.wait_for`) is polled once to register and again only after
/// the value changed: a registered wait keeps the task's waker, and each poll of it takes a
/// lock. `probe` is a clone of the receiver the wait borrows.
pub fn poll_drain<F: Future>(
    wait: Pin<&mut F>,
    probe: &watch::Receiver<bool>,
    registered: &mut bool,
    cx: &mut Context<'_>,
) -> bool {
    if *registered && !probe.has_changed().unwrap_or(true) {
        return false;
    }
    *registered = true;
    wait.poll(cx).is_ready()
}

impl InFlight {
    pub fn state(&self) -> &ConnState {
        &self.0
    }
}

impl ConnState {
    /// The state of a connection accepted now, from `peer`, whose first bytes told `h2`.
    pub fn new(
        h2: bool,
        timeouts: Timeouts,
        scheme: &'static str,
        peer: SocketAddr,
        local: SocketAddr,
        alt_svc: Option<http::HeaderValue>,
        client_cn: Option<Box<str>>,
    ) -> Arc<ConnState> {
        let now = Instant::now();
        let Timeouts {
            header: header_timeout,
            idle: idle_timeout,
            send: send_timeout,
            body: body_timeout,
            request: request_timeout,
            body_min_rate,
        } = timeouts;
        Arc::new(ConnState {
            in_flight: Count(AtomicU32::new(0)),
            partial: Flag::default(),
            head_started: Stamp::new(now),
            idle_since: Stamp::new(now),
            h2: Flag::new(h2),
            parked: Flag::default(),
            slim: Flag::default(),
            header_timeout,
            idle_timeout,
            send_timeout,
            body_timeout,
            request_timeout,
            body_min_rate,
            scheme: http::HeaderValue::from_static(scheme),
            client_cn,
            peer_ip: http::HeaderValue::from_str(&peer.ip().to_string())
                .expect("an IP address is a valid header value"),
            peer,
            local,
            alt_svc,
        })
    }
}

/// A client connection's timeouts (`[http]`).
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// `header_read_timeout`.
    pub header: Duration,
    /// `keepalive_timeout`.
    pub idle: Duration,
    /// `send_timeout`.
    pub send: Duration,
    /// `body_timeout`.
    pub body: Duration,
    /// `request_timeout`.
    pub request: Option<Duration>,
    /// `body_min_rate`, bytes per second.
    pub body_min_rate: Option<u64>,
}

impl ConnState {
    /// When a request whose head began at `start`, with `received` body bytes so far, must
    /// be whole: by the whole-request deadline, and by the minimum body rate (after a first
    /// `body_timeout`, at least `body_min_rate` bytes per second on average). None when
    /// neither is set. It only moves later as bytes come, so a timer set to it may fire
    /// early and look again.
    pub fn body_deadline(&self, start: Instant, received: u64) -> Option<Instant> {
        let whole = self.request_timeout.map(|t| start + t);
        let rate = self.body_min_rate.map(|r| {
            let earned = Duration::from_secs_f64(received as f64 / r as f64);
            start + self.body_timeout + earned.min(Duration::from_secs(86_400 * 365))
        });
        match (whole, rate) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// When the current request head began (HTTP/1.1).
    pub fn head_started(&self) -> Instant {
        self.head_started.get()
    }
}

/// Watches one direction of a connection: true once nothing moved for a limit while
/// something waits (response bytes the client does not take, request body bytes it does not
/// send). The timer exists only while something waits.
#[derive(Default)]
pub struct StallWatch {
    timer: Option<Pin<Box<Sleep>>>,
}

impl StallWatch {
    /// After an attempt: `left` is what still waits (0: nothing, the watch stops), `moved`
    /// whether anything went.
    pub fn stalled(
        &mut self,
        left: usize,
        moved: bool,
        limit: Duration,
        cx: &mut Context<'_>,
    ) -> bool {
        if left == 0 {
            self.timer = None;
            return false;
        }
        let timer = match &mut self.timer {
            Some(t) => {
                if moved {
                    t.as_mut().reset(Instant::now() + limit);
                }
                t
            }
            None => self.timer.insert(Box::pin(tokio::time::sleep(limit))),
        };
        timer.as_mut().poll(cx).is_ready()
    }
}

/// A timer to a deadline that only moves later (see `ConnState::body_deadline`): armed at
/// the first one given, it fires, looks again, and re-arms until the deadline it is given
/// has passed. It exists only while a deadline is given.
#[derive(Default)]
pub struct LateDeadline {
    timer: Option<Pin<Box<Sleep>>>,
}

impl LateDeadline {
    /// True once `at`, the deadline as it is now, has passed; None stops the watch.
    pub fn passed(&mut self, at: Option<Instant>, cx: &mut Context<'_>) -> bool {
        let Some(at) = at else {
            self.timer = None;
            return false;
        };
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
        while timer.as_mut().poll(cx).is_ready() {
            if Instant::now() >= at {
                return true;
            }
            timer.as_mut().reset(at);
        }
        false
    }
}

impl ClientIo {
    /// The socket of a connection with `state`; `first` is what was read from it already.
    pub fn new(stream: ClientStream, state: Arc<ConnState>, first: bytes::Bytes) -> Self {
        ClientIo {
            stream,
            eof: false,
            state,
            timer: None,
            recheck_armed: false,
            prefix: Some(first).filter(|b| !b.is_empty()),
        }
    }
}
