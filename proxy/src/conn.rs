//! One client connection: the protocol told by its first bytes (the HTTP/2 preface or not),
//! the socket wrapper that enforces the header-read and keep-alive timeouts, and the server:
//! hyper's for HTTP/1.1, ours (`h2`) for HTTP/2.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use crate::body::ClientBody;
use crate::framing::HeadScan;
use crate::h2::PREFACE;
pub(crate) use crate::stream::ClientStream;
use crate::worker::HandlerSlot;

/// An HTTP/1.1 connection idle this long is parked: hyper's per-connection state and buffers
/// (about 20 KiB) are freed and only the socket is watched, until the next request arrives
/// and a fresh hyper connection takes over. Busy connections never pay for the restart.
const PARK_AFTER: Duration = Duration::from_secs(1);

/// Written by the socket wrapper itself when a started request head times out; hyper then
/// closes the connection.
const TIMEOUT_408: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";

/// What the request handler and the socket wrapper of one connection share.
pub(crate) struct ConnState {
    /// Requests received whose response body has not been dropped yet.
    in_flight: Count,
    /// Bytes arrived since the last request was handed over: a head is being read.
    partial: Flag,
    /// When `partial` last became true.
    head_started: Stamp,
    /// When the connection last became idle (no request in flight).
    idle_since: Stamp,
    /// Told by the first bytes; an HTTP/2 connection never gets a raw 408 nor is parked.
    h2: Flag,
    /// hyper's read buffer is known to be empty when the connection is idle: the last head
    /// ended exactly at the end of a read and nothing was read while a request was in flight.
    /// Only then may the connection be parked without losing bytes hyper holds.
    clean: Flag,
    /// Set when the socket wrapper ended hyper's connection to park it, or told our HTTP/2
    /// server to free its buffers.
    parked: Flag,
    /// An HTTP/2 connection freed its buffers in this idle period.
    slim: Flag,
    header_timeout: Duration,
    idle_timeout: Duration,
    /// The head being read carries both Content-Length and Transfer-Encoding.
    ambiguous: Flag,
    /// The socket, handed back by `ClientIo` when hyper drops it, unless the client already
    /// closed its side.
    leftover: Slot,
    /// The connection was upgraded (WebSocket and the like): the tunnel has no timeouts
    /// here and is never parked.
    upgraded: Flag,
    /// The client's IP address, ready for X-Forwarded-For.
    pub(crate) peer_ip: http::HeaderValue,
    /// "http" or "https", for X-Forwarded-Proto.
    pub(crate) scheme: http::HeaderValue,
}

// The fields of `ConnState` are touched by one thread only, but hyper's upgrade machinery
// wants the socket wrapper to be Send, so they are relaxed atomics rather than Cells.

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

/// The socket handed back by `ClientIo`.
#[derive(Default)]
struct Slot(std::sync::Mutex<Option<ClientStream>>);

impl Slot {
    fn set(&self, s: Option<ClientStream>) {
        *self.0.lock().expect("slot lock") = s;
    }
    fn take(&self) -> Option<ClientStream> {
        self.0.lock().expect("slot lock").take()
    }
}

/// Held by a response body: the connection counts as busy until it is dropped.
pub(crate) struct InFlight(Arc<ConnState>);

impl ConnState {
    /// Marks a request as received; the returned guard marks it finished when dropped.
    pub(crate) fn begin_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.set(self.in_flight.get() + 1);
        self.partial.set(false);
        InFlight(Arc::clone(self))
    }

    /// The connection becomes a tunnel: no more request timeouts or parking.
    pub(crate) fn mark_upgraded(&self) {
        self.upgraded.set(true);
    }

    /// Whether the request just received had ambiguous framing (and must be refused).
    pub(crate) fn take_ambiguous(&self) -> bool {
        self.ambiguous.replace(false)
    }

    fn parkable(&self) -> bool {
        self.in_flight.get() == 0
            && !self.partial.get()
            && !self.upgraded.get()
            // HTTP/1.1: only with hyper's buffer known empty; HTTP/2: once per idle period.
            && if self.h2.get() {
                !self.slim.get()
            } else {
                self.clean.get()
            }
    }

    /// Whether the socket wrapper asked the HTTP/2 server to free its buffers (once).
    pub(crate) fn take_park(&self) -> bool {
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
        if self.in_flight.get() > 0 || self.upgraded.get() {
            // Nothing to enforce while a request is served, but hyper may not read again when
            // it ends, so keep a timer armed to look again later.
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

/// The client socket as the server (hyper's or ours) sees it. When the server waits for bytes
/// and the connection's deadline has passed, the read fails with `TimedOut` (after writing a 408 when a request
/// head had started), which ends the connection.
pub(crate) struct ClientIo {
    // Always Some until dropped.
    stream: Option<ClientStream>,
    eof: bool,
    state: Arc<ConnState>,
    // Armed lazily, and only moved when the deadline moves earlier; firing early just re-arms.
    timer: Option<Pin<Box<Sleep>>>,
    /// The timer is set to look again soon (a request is in flight): no need to move it.
    recheck_armed: bool,
    /// Bytes to read before the stream's (TLS 0-RTT data).
    prefix: Option<bytes::Bytes>,
    scan: HeadScan,
}

impl Drop for ClientIo {
    fn drop(&mut self) {
        if !self.eof {
            self.state.leftover.set(self.stream.take());
        }
    }
}

impl ClientIo {
    fn stream(&mut self) -> Pin<&mut ClientStream> {
        Pin::new(self.stream.as_mut().expect("stream present until drop"))
    }

    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let st = &self.state;
        if st.in_flight.get() > 0 || st.upgraded.get() {
            if let Some(timer) = &mut self.timer {
                // Nothing to enforce now, but hyper may not read again when the request
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
            None => this.stream().poll_read(cx, buf),
        };
        match polled {
            Poll::Ready(Ok(())) => {
                let got = &buf.filled()[before..];
                if got.is_empty() {
                    this.eof = buf.remaining() > 0;
                } else {
                    let st = &this.state;
                    if st.h2.get() {
                        // Frames with no stream open (pings, settings) keep it alive; while
                        // streams are open, the last one to end stamps the idle start.
                        if st.in_flight.get() == 0 {
                            st.idle_since.set(Instant::now());
                        }
                        st.slim.set(false);
                    } else if st.in_flight.get() == 0 {
                        if !st.partial.get() {
                            st.partial.set(true);
                            st.head_started.set(Instant::now());
                            this.scan = HeadScan::default();
                        }
                        let was_done = this.scan.done();
                        if !was_done && this.scan.feed(got) {
                            st.ambiguous.set(true);
                        }
                        // A TLS session's state cannot be parked: only plain sockets are.
                        let plain = matches!(this.stream, Some(ClientStream::Plain(_)));
                        st.clean.set(
                            plain
                                && !was_done
                                && this.scan.done()
                                && this.scan.ended_at_chunk_end(),
                        );
                    } else {
                        st.clean.set(false);
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                if this.poll_deadline(cx).is_ready() {
                    let st = &this.state;
                    if st.partial.get() && !st.h2.get() {
                        // Written raw on plain sockets; a TLS client just sees the close.
                        if let Some(ClientStream::Plain(s)) = &this.stream {
                            let _ = s.try_write(TIMEOUT_408);
                        }
                    } else if st.parkable() && Instant::now() < st.idle_deadline() {
                        // Looks like a clean end of stream to hyper, which then drops us and
                        // hands the socket back (see `ConnServer::serve`); our HTTP/2 server
                        // frees its buffers and reads on (see `h2::Conn::slim`).
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
        self.get_mut().stream().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().stream().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().stream().poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.state.parked.get() {
            // Parking, not closing: the socket stays open for the next request.
            return Poll::Ready(Ok(()));
        }
        self.get_mut().stream().poll_shutdown(cx)
    }
}

/// The server side of one listener on one worker: hyper's HTTP/1.1 builder and the limits,
/// configured once.
pub(crate) struct ConnServer {
    http1: http1::Builder,
    /// Turns true when the worker drains: finish in-flight requests, then close.
    draining: watch::Receiver<bool>,
    /// Connections parked so far on this worker (see `worker_housekeeping`); a metric.
    parks: Arc<AtomicU64>,
    header_timeout: Duration,
    idle_timeout: Duration,
    /// HTTP/2's SETTINGS_MAX_HEADER_LIST_SIZE.
    max_header_list: usize,
}

impl ConnServer {
    pub(crate) fn new(
        limits: &fluxgate_conf::HttpLimits,
        parks: Arc<AtomicU64>,
        draining: watch::Receiver<bool>,
    ) -> ConnServer {
        let mut http1 = http1::Builder::new();
        http1
            .header_read_timeout(None)
            // One buffer, one send(2) per response: the head and a small body are copied
            // together rather than handed to sendmsg(2) as a vector.
            .writev(false)
            .max_headers(limits.max_headers)
            // hyper answers 431 when a head does not fit its read buffer.
            .max_buf_size(limits.max_header_bytes);
        ConnServer {
            http1,
            draining,
            parks,
            header_timeout: limits.header_read_timeout,
            idle_timeout: limits.keepalive_timeout,
            max_header_list: limits.max_header_bytes,
        }
    }

    pub(crate) fn header_timeout(&self) -> Duration {
        self.header_timeout
    }

    /// Serves one accepted connection to its end; each request takes the listener's handler
    /// current when it arrives.
    /// `early`: bytes that arrived as TLS 0-RTT data, read before the stream's own.
    pub(crate) async fn serve(
        &self,
        stream: ClientStream,
        early: Option<bytes::Bytes>,
        peer: SocketAddr,
        handler: HandlerSlot,
    ) {
        let mut stream = stream;
        let Some((h2, first)) = self.sniff(&mut stream, early).await else {
            return;
        };
        let now = Instant::now();
        let state = Arc::new(ConnState {
            in_flight: Count(AtomicU32::new(0)),
            partial: Flag::default(),
            head_started: Stamp::new(now),
            idle_since: Stamp::new(now),
            h2: Flag::new(h2),
            clean: Flag::default(),
            parked: Flag::default(),
            slim: Flag::default(),
            ambiguous: Flag::default(),
            upgraded: Flag::default(),
            leftover: Slot::default(),
            header_timeout: self.header_timeout,
            idle_timeout: self.idle_timeout,
            scheme: http::HeaderValue::from_static(match stream {
                ClientStream::Plain(_) => "http",
                ClientStream::Tls(_) => "https",
            }),
            peer_ip: http::HeaderValue::from_str(&peer.ip().to_string())
                .expect("an IP address is a valid header value"),
        });
        let mut first = Some(first);
        let mut draining = self.draining.clone();
        loop {
            let io = ClientIo {
                stream: Some(stream),
                eof: false,
                state: Arc::clone(&state),
                timer: None,
                recheck_armed: false,
                prefix: first.take().filter(|b| !b.is_empty()),
                scan: HeadScan::default(),
            };
            if h2 {
                crate::h2::serve(
                    io,
                    Arc::clone(&state),
                    handler,
                    draining,
                    self.max_header_list,
                    Arc::clone(&self.parks),
                )
                .await;
                if let Some(s) = state.leftover.take() {
                    Box::pin(linger(s)).await;
                }
                return;
            }
            let svc_state = Arc::clone(&state);
            let svc_handler = Rc::clone(&handler);
            let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let handler = Rc::clone(&svc_handler.borrow());
                let inflight = svc_state.begin_request();
                handler.handle(req.map(ClientBody::H1), inflight)
            });
            // Boxed so a parked connection keeps none of hyper's state. Errors here are the
            // client's (reset, timeout, malformed head already answered by hyper).
            let mut conn = Box::pin(
                self.http1
                    .serve_connection(TokioIo::new(io), service)
                    .with_upgrades(),
            );
            tokio::select! {
                biased;
                _ = conn.as_mut() => {}
                _ = draining.wait_for(|d| *d) => {
                    // No more keep-alive: idle connections close now, busy ones after their
                    // response.
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.as_mut().await;
                }
            }
            // Dropping hyper's connection drops `ClientIo`, which hands the socket back.
            drop(conn);
            let Some(s) = state.leftover.take() else {
                return;
            };
            let s = match s {
                ClientStream::Plain(s) if state.parked.replace(false) && !*draining.borrow() => s,
                // Boxed: the linger buffer must not grow every connection's future.
                other => return Box::pin(linger(other)).await,
            };
            self.parks.fetch_add(1, Ordering::Relaxed);
            // Parked: wait for the next request's first bytes, or close at the idle deadline
            // or when the worker drains.
            tokio::select! {
                biased;
                _ = draining.wait_for(|d| *d) => return,
                r = tokio::time::timeout_at(state.idle_deadline(), s.readable()) => match r {
                    Ok(Ok(())) => stream = ClientStream::Plain(s),
                    _ => return,
                },
            }
        }
    }

    /// Reads until the first bytes tell the protocol: true for HTTP/2 (they are its preface).
    /// Returns the bytes read, which the server reads first; None if the client left or sent
    /// nothing in time.
    async fn sniff(
        &self,
        stream: &mut ClientStream,
        early: Option<bytes::Bytes>,
    ) -> Option<(bool, bytes::Bytes)> {
        use tokio::io::AsyncReadExt;
        let mut got = bytes::BytesMut::from(early.unwrap_or_default());
        loop {
            let n = got.len().min(PREFACE.len());
            if got[..n] != PREFACE[..n] {
                return Some((false, got.freeze()));
            }
            if n == PREFACE.len() {
                return Some((true, got.freeze()));
            }
            // Nothing yet: an idle connection; a start of the preface: a head being read.
            let limit = if got.is_empty() {
                self.idle_timeout
            } else {
                self.header_timeout
            };
            got.reserve(4096);
            match tokio::time::timeout(limit, stream.read_buf(&mut got)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return None,
                Ok(Ok(_)) => {}
                Err(_) => {
                    // A head (as far as it went) that did not arrive in time.
                    if let (false, ClientStream::Plain(s)) = (got.is_empty(), &*stream) {
                        let _ = s.try_write(TIMEOUT_408);
                    }
                    return None;
                }
            }
        }
    }
}

/// Closes a connection the client may still be writing to without losing our last answer:
/// closing with unread bytes would send RST, and a client that gets RST before reading may
/// discard the response. So send FIN, then read and discard for a bounded time and amount.
async fn linger(mut stream: ClientStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const LINGER_TIME: Duration = Duration::from_secs(2);
    const LINGER_BYTES: usize = 1 << 20;
    // TLS: close_notify, then the same drain.
    if tokio::time::timeout(LINGER_TIME, stream.shutdown())
        .await
        .is_err()
    {
        return;
    }
    let mut sink = [0u8; 4096];
    let mut total = 0;
    let _ = tokio::time::timeout(LINGER_TIME, async {
        while total < LINGER_BYTES {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    })
    .await;
}

impl InFlight {
    pub(crate) fn state(&self) -> &ConnState {
        &self.0
    }
}

/// Once a second, if connections were parked since the last look, hands the memory they freed
/// back to the kernel (see `fluxgate_sys::release_free_memory`).
pub(crate) async fn worker_housekeeping(parks: Arc<AtomicU64>) {
    let mut seen = parks.load(Ordering::Relaxed);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if parks.load(Ordering::Relaxed) != seen {
            seen = parks.load(Ordering::Relaxed);
            fluxgate_sys::release_free_memory();
        }
    }
}
