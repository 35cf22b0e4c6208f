//! The HTTP/2 server side (RFC 9113), for cleartext prior knowledge and TLS with ALPN h2.
//!
//! One connection is one future: it reads frames, starts each request's handler future inside
//! itself (no task per stream), polls only the streams whose waker fired, and writes every
//! frame the pass produced with one write. The request body is a queue the DATA frames fill
//! and the upstream side drains; flow-control credit goes back as the upstream side reads.
//! It never pushes, never uses priorities, and never adds to the client's HPACK table.

mod input;
mod request;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use bytes::{Buf, Bytes, BytesMut};
use http::Response;
use http_body::Body;
use tokio::io::AsyncWrite;
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use crate::conn::{
    free_buffers, poll_drain, ClientIo, ClientStream, ConnState, HeadLimits, StallWatch,
};
use crate::headers::http_date;
use crate::recv::{BodyError, Recv};
use crate::service::Service;
pub use fluxgate_wire::h2::frame::PREFACE;
use fluxgate_wire::h2::frame::*;
use fluxgate_wire::h2::hpack;

/// SETTINGS_MAX_FRAME_SIZE as we announce it (the protocol default).
const MAX_FRAME: usize = 16_384;
/// SETTINGS_MAX_CONCURRENT_STREAMS as we announce it.
const MAX_STREAMS: usize = 256;
/// The receive window of each request body: what one stream may buffer here. As large as
/// the connection's, so one upload may run ahead of a slow upstream as far as it allows.
const STREAM_WINDOW: u32 = 1024 * 1024;
/// The connection's receive window: what all of its request bodies together may buffer
/// (credit returns as the upstream side reads, not as frames arrive).
const CONN_WINDOW: u32 = 1024 * 1024;
/// The protocol's initial window, before SETTINGS and WINDOW_UPDATE change it.
const DEFAULT_WINDOW: i64 = 65_535;
const MAX_WINDOW: i64 = (1 << 31) - 1;
/// Above this much unwritten output, no more frames are read and no more body is pulled.
const WRITE_HIGH: usize = 64 * 1024;
/// Resets of running streams a client may send beyond the streams it lets finish (a client
/// that opens and cancels streams in a loop makes us start work it never takes).
const RESET_ALLOWANCE: i64 = 200;
/// Frames one header block may span (HEADERS and CONTINUATION).
const MAX_BLOCK_FRAMES: usize = 64;
/// How many closed streams are remembered, with how they closed (see `Closed`).
const RECENT_CLOSED: usize = 128;

/// How a stream that left the table closed: what a frame arriving on it later means
/// (RFC 9113 5.1, "closed").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closed {
    /// We sent RST_STREAM: frames the client sent before it saw it are ignored.
    WeReset,
    /// The client sent RST_STREAM: anything but PRIORITY (and RST_STREAM) after it is a
    /// stream error STREAM_CLOSED.
    ClientReset,
    /// Both sides sent END_STREAM: DATA or HEADERS after it is a connection error
    /// STREAM_CLOSED; WINDOW_UPDATE and RST_STREAM are let pass.
    Ended,
}

/// A connection error: GOAWAY with this code; the text goes in its debug data.
#[derive(Debug)]
struct ConnError(u32, Fault);

/// Why a connection ends with GOAWAY; its text goes out as the GOAWAY's debug data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
enum Fault {
    #[error("CONTINUATION without HEADERS")]
    ContinuationWithoutHeaders,
    #[error("DATA on a closed stream")]
    DataOnAClosedStream,
    #[error("DATA on an idle stream")]
    DataOnAnIdleStream,
    #[error("DATA on stream 0")]
    DataOnStream0,
    #[error("DATA padding")]
    DataPadding,
    #[error("GOAWAY length")]
    GoawayLength,
    #[error("GOAWAY on a stream")]
    GoawayOnAStream,
    #[error("HEADERS on a closed stream")]
    HeadersOnAClosedStream,
    #[error("HEADERS on an old stream id")]
    HeadersOnAnOldStreamId,
    #[error("HEADERS on a stream a client cannot open")]
    HeadersOnAStreamAClientCannotOpen,
    #[error("HEADERS padding")]
    HeadersPadding,
    #[error("HEADERS priority")]
    HeadersPriority,
    #[error("PING length")]
    PingLength,
    #[error("PING on a stream")]
    PingOnAStream,
    #[error("PRIORITY on stream 0")]
    PriorityOnStream0,
    #[error("PUSH_PROMISE from a client")]
    PushPromiseFromAClient,
    #[error("RST_STREAM length")]
    RstStreamLength,
    #[error("RST_STREAM on an idle stream")]
    RstStreamOnAnIdleStream,
    #[error("SETTINGS ACK with a payload")]
    SettingsAckWithAPayload,
    #[error("SETTINGS length")]
    SettingsLength,
    #[error("SETTINGS on a stream")]
    SettingsOnAStream,
    #[error("SETTINGS_ENABLE_PUSH above 1")]
    SettingsEnablePushAbove1,
    #[error("SETTINGS_MAX_FRAME_SIZE range")]
    SettingsMaxFrameSizeRange,
    #[error("WINDOW_UPDATE length")]
    WindowUpdateLength,
    #[error("WINDOW_UPDATE of 0")]
    WindowUpdateOf0,
    #[error("WINDOW_UPDATE on an idle stream")]
    WindowUpdateOnAnIdleStream,
    #[error("bad connection preface")]
    BadConnectionPreface,
    #[error("connection window exceeded")]
    ConnectionWindowExceeded,
    #[error("connection window overflow")]
    ConnectionWindowOverflow,
    #[error("first frame is not SETTINGS")]
    FirstFrameIsNotSettings,
    #[error("frame above SETTINGS_MAX_FRAME_SIZE")]
    FrameAboveSettingsMaxFrameSize,
    #[error("header block does not decode")]
    HeaderBlockDoesNotDecode,
    #[error("header block interrupted")]
    HeaderBlockInterrupted,
    #[error("header block too large")]
    HeaderBlockTooLarge,
    #[error("idle timeout")]
    IdleTimeout,
    #[error("initial window too large")]
    InitialWindowTooLarge,
    #[error("padding longer than the frame")]
    PaddingLongerThanTheFrame,
    #[error("shutting down")]
    ShuttingDown,
    #[error("stream window overflow")]
    StreamWindowOverflow,
    #[error("too many streams reset")]
    TooManyStreamsReset,
}

/// What the connection and its stream wakers share.
#[derive(Default)]
struct Shared {
    ready: Mutex<Ready>,
    /// Request body bytes the upstream side has read and the client may send again.
    released: AtomicUsize,
}

#[derive(Default)]
struct Ready {
    /// Streams whose waker fired since the connection last looked.
    ids: Vec<u32>,
    /// The connection's task.
    waker: Option<Waker>,
}

impl crate::recv::WindowRelease for Shared {
    /// Returns request body credit; wakes the connection once enough gathered to announce.
    fn release(&self, n: usize) {
        let before = self.released.fetch_add(n, Ordering::Relaxed);
        if before < CONN_WINDOW as usize / 4 && before + n >= CONN_WINDOW as usize / 4 {
            self.wake_conn();
        }
    }
}

impl Shared {
    fn wake_conn(&self) {
        if let Some(w) = &self.ready.lock().expect("ready lock").waker {
            w.wake_by_ref();
        }
    }
}

/// One stream's waker: queues the stream for the connection to poll.
struct StreamWake {
    id: u32,
    queued: AtomicBool,
    shared: Arc<Shared>,
}

impl StreamWake {
    /// Queues the stream; wakes the connection if `wake` and nothing was queued before (the
    /// connection takes the whole queue each time it looks, so one wake covers the rest).
    fn queue(&self, wake: bool) {
        if self.queued.swap(true, Ordering::Relaxed) {
            return;
        }
        let mut r = self.shared.ready.lock().expect("ready lock");
        r.ids.push(self.id);
        if wake && r.ids.len() == 1 {
            if let Some(w) = &r.waker {
                w.wake_by_ref();
            }
        }
    }
}

impl Wake for StreamWake {
    fn wake(self: Arc<Self>) {
        self.queue(true)
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.queue(true)
    }
}

/// Where a stream's response is.
// Every stream reaches `Body`; boxing it would cost an allocation per stream.
#[allow(clippy::large_enum_variant)]
enum ResponseState<S: Service> {
    /// Answered at once, the head not written yet (None once it is).
    Ready(Option<Box<Response<S::Body>>>),
    /// The service is working on it.
    Waiting(S::Future),
    /// The head is sent; `data` is body not yet sent (flow control), `end` once it is the last.
    Body {
        body: S::Body,
        data: Bytes,
        end: bool,
    },
    Done,
}

struct Stream<S: Service> {
    out: ResponseState<S>,
    /// The request body's state while the client may still send on it.
    recv: Option<Arc<Mutex<Recv>>>,
    /// What the client may still send before we widen the window.
    recv_window: i64,
    send_window: i64,
    /// When the stream opened (its HEADERS came).
    opened: Instant,
    /// When request body bytes last came, or the client last got room to send them.
    body_at: Instant,
    /// Since when response data has waited on a flow-control window.
    send_blocked: Option<Instant>,
    wake: Arc<StreamWake>,
    waker: Waker,
}

/// Serves one HTTP/2 connection whose preface `io` starts with, until it ends.
pub async fn serve<S: Service>(
    io: ClientIo,
    state: Arc<ConnState>,
    svc: Rc<S>,
    mut draining: watch::Receiver<bool>,
    limits: HeadLimits,
    parks: Arc<AtomicU64>,
) -> Option<ClientStream> {
    let mut conn = H2Connection::new(io, state, svc, limits, parks);
    let probe = draining.clone();
    let mut registered = false;
    let mut drain = std::pin::pin!(draining.wait_for(|d| *d));
    // Set once the drain is announced: the final GOAWAY goes by then, acknowledged or not.
    let mut last_call: Option<Pin<Box<tokio::time::Sleep>>> = None;
    std::future::poll_fn(|cx| {
        if conn.closing.is_none()
            && last_call.is_none()
            && poll_drain(drain.as_mut(), &probe, &mut registered, cx)
        {
            // A GOAWAY that lets in what is on its way, a PING to learn when it arrived, then
            // (on its ACK) the GOAWAY with the real last stream (RFC 9113 6.8).
            conn.announce_drain();
            last_call = Some(Box::pin(tokio::time::sleep(DRAIN_ACK_WAIT)));
        }
        if let Some(t) = &mut last_call {
            if conn.closing.is_none() && t.as_mut().poll(cx).is_ready() {
                conn.go_away(ConnError(NO_ERROR, Fault::ShuttingDown));
            }
        }
        conn.poll(cx)
    })
    .await;
    let _ = std::future::poll_fn(|cx| Pin::new(&mut conn.io).poll_flush(cx)).await;
    conn.io.into_stream()
}

/// The payload of the PING that follows the first GOAWAY of a drain.
const DRAIN_PING: [u8; 8] = *b"fg-drain";
/// How long the final GOAWAY waits for that PING's ACK.
const DRAIN_ACK_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

struct H2Connection<S: Service> {
    /// The first GOAWAY of a drain went out; its PING's ACK sends the final one.
    drain_announced: bool,
    io: ClientIo,
    rbuf: BytesMut,
    wbuf: Vec<u8>,
    /// How much of `wbuf` is written.
    written: usize,
    /// The stream and `wbuf` offset of the last DATA frame queued: body chunks that follow
    /// it at once go into the same frame while it is unsent and the last thing in `wbuf`
    /// (a client may take a flood of tiny DATA frames for an attack).
    last_data: Option<(u32, usize)>,
    /// Scratch for encoding a header block before it is cut into frames.
    block: Vec<u8>,
    /// The header block being received (HEADERS then CONTINUATION) and for which stream.
    partial: Option<(u32, bool)>,
    /// Frames the block being received came in so far.
    block_frames: usize,
    decoder: hpack::Decoder,
    streams: HashMap<u32, Stream<S>>,
    shared: Arc<Shared>,
    /// Streams taken from `shared.ready`, kept to reuse the allocation.
    batch: Vec<u32>,
    /// Streams that stopped for the write buffer or the connection window.
    deferred: Vec<u32>,
    last_id: u32,
    preface: bool,
    settings: bool,
    conn_send: i64,
    conn_recv: i64,
    /// Credit gathered for the connection window, not yet announced.
    conn_unacked: usize,
    peer_window: i64,
    peer_max_frame: usize,
    /// The GOAWAY code sent, once one is.
    closing: Option<u32>,
    /// The client sent GOAWAY: close once its open streams end.
    client_gone: bool,
    resets: i64,
    /// Streams recently closed, and how (see `Closed`).
    closed: VecDeque<(u32, Closed)>,
    /// The header block being received declared the stream dependent on itself.
    self_dependent: bool,
    state: Arc<ConnState>,
    svc: Rc<S>,
    limits: HeadLimits,
    /// The worker's count of parked connections (see `slim`).
    parks: Arc<AtomicU64>,
    /// Output the socket does not take (`http.send_timeout`).
    send_watch: StallWatch,
    /// When to look for stalled streams (see `sweep`); set while a stream may stall.
    sweep: Option<Pin<Box<Sleep>>>,
}

impl<S: Service> H2Connection<S> {
    fn new(
        io: ClientIo,
        state: Arc<ConnState>,
        svc: Rc<S>,
        limits: HeadLimits,
        parks: Arc<AtomicU64>,
    ) -> H2Connection<S> {
        let mut wbuf = Vec::with_capacity(MAX_FRAME);
        let settings: [(u16, u32); 3] = [
            (SETTINGS_MAX_CONCURRENT_STREAMS, MAX_STREAMS as u32),
            (SETTINGS_INITIAL_WINDOW_SIZE, STREAM_WINDOW),
            (SETTINGS_MAX_HEADER_LIST_SIZE, limits.max_head as u32),
        ];
        frame_head(&mut wbuf, settings.len() * 6, SETTINGS, 0, 0);
        for (k, v) in settings {
            wbuf.extend_from_slice(&k.to_be_bytes());
            wbuf.extend_from_slice(&v.to_be_bytes());
        }
        frame_head(&mut wbuf, 4, WINDOW_UPDATE, 0, 0);
        wbuf.extend_from_slice(&(CONN_WINDOW - DEFAULT_WINDOW as u32).to_be_bytes());
        H2Connection {
            drain_announced: false,
            io,
            rbuf: BytesMut::new(),
            wbuf,
            written: 0,
            last_data: None,
            block: Vec::new(),
            partial: None,
            block_frames: 0,
            decoder: hpack::Decoder::default(),
            streams: HashMap::new(),
            shared: Arc::default(),
            batch: Vec::new(),
            deferred: Vec::new(),
            last_id: 0,
            preface: false,
            settings: false,
            conn_send: DEFAULT_WINDOW,
            conn_recv: CONN_WINDOW as i64,
            conn_unacked: 0,
            peer_window: DEFAULT_WINDOW,
            peer_max_frame: MAX_FRAME,
            closing: None,
            client_gone: false,
            resets: RESET_ALLOWANCE,
            closed: VecDeque::new(),
            self_dependent: false,
            state,
            svc,
            limits,
            parks,
            send_watch: StallWatch::default(),
            sweep: None,
        }
    }

    /// Resets the streams stalled past a limit (CANCEL; dropping the response cancels its
    /// upstream side): a request body the client has room to send and does not
    /// (`body_timeout`), or that misses the request deadline or minimum rate; a response the
    /// client's window keeps waiting (`send_timeout`). Looks again at the next due time.
    fn sweep(&mut self) {
        let now = Instant::now();
        let st = &self.state;
        let mut next: Option<Instant> = None;
        let mut late = Vec::new();
        for (&id, s) in &self.streams {
            let mut due: Option<Instant> = None;
            if let Some(recv) = &s.recv {
                if s.recv_window > 0 && self.conn_recv > 0 {
                    let received = recv.lock().expect("recv lock").received;
                    let idle = s.body_at + st.body_timeout;
                    due = Some(match st.body_deadline(s.opened, received) {
                        Some(d) => d.min(idle),
                        None => idle,
                    });
                }
            }
            if let Some(t) = s.send_blocked {
                let d = t + st.send_timeout;
                due = Some(due.map_or(d, |x| x.min(d)));
            }
            match due {
                Some(d) if d <= now => late.push(id),
                Some(d) => next = Some(next.map_or(d, |x| x.min(d))),
                None => {}
            }
        }
        for id in late {
            self.refuse(id, CANCEL);
            if let Some(s) = self.streams.remove(&id) {
                self.close_recv(&s, BodyError::IdleTimeout);
            }
        }
        self.sweep = None;
        if let Some(at) = next {
            sweep_by(&mut self.sweep, at);
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        {
            let mut r = self.shared.ready.lock().expect("ready lock");
            if !r.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                r.waker = Some(cx.waker().clone());
            }
        }
        if self
            .sweep
            .as_mut()
            .is_some_and(|t| t.as_mut().poll(cx).is_ready())
        {
            self.sweep();
        }
        loop {
            let mut progress = false;
            if self.closing.is_none_or(|c| c == NO_ERROR) && self.unwritten() < WRITE_HIGH {
                match self.io.poll_input(&mut self.rbuf, MAX_FRAME, cx) {
                    // Idle a while (see `ClientIo`): keep the socket, not the buffers.
                    Poll::Ready(Ok(0)) if self.state.take_park() => {
                        self.slim();
                        progress = true;
                    }
                    // The client closed: whatever is open is cancelled.
                    Poll::Ready(Ok(0)) => return Poll::Ready(()),
                    Poll::Ready(Ok(_)) => {
                        progress = true;
                        let mut buf = std::mem::take(&mut self.rbuf);
                        let r = self.frames(&mut buf);
                        self.rbuf = buf;
                        if let Err(e) = r {
                            self.go_away(e);
                        }
                    }
                    // Idle past the keep-alive timeout (see `ClientIo`): say so, then close.
                    Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::TimedOut => {
                        self.go_away(ConnError(NO_ERROR, Fault::IdleTimeout));
                        self.client_gone = true;
                    }
                    Poll::Ready(Err(_)) => return Poll::Ready(()),
                    Poll::Pending => {}
                }
            }
            let released = self.shared.released.swap(0, Ordering::Relaxed);
            self.credit(released);
            progress |= self.run_ready();
            let before = self.unwritten();
            let wrote = self
                .io
                .poll_write_buf(&mut self.wbuf, &mut self.written, WRITE_HIGH, cx);
            // A client whose socket takes nothing for the send timeout is closed; dropping
            // the streams cancels their upstream side.
            let left = self.unwritten();
            if self
                .send_watch
                .stalled(left, left < before, self.state.send_timeout, cx)
            {
                return Poll::Ready(());
            }
            match wrote {
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Ready(Ok(())) if !self.deferred.is_empty() => {
                    for id in self.deferred.drain(..) {
                        if let Some(s) = self.streams.get(&id) {
                            s.wake.queue(false);
                        }
                    }
                    progress = true;
                }
                _ => {}
            }
            if self.unwritten() == 0 {
                let graceful = self.closing == Some(NO_ERROR) || self.client_gone;
                // Streams only dropping what is left of an upload do not hold the close up.
                let answered = || {
                    self.streams
                        .values()
                        .all(|s| matches!(s.out, ResponseState::Done))
                };
                if self.closing.is_some_and(|c| c != NO_ERROR) || (graceful && answered()) {
                    return Poll::Ready(());
                }
            }
            if !progress {
                return Poll::Pending;
            }
        }
    }

    /// Frees the buffers of a connection idle a while; the HPACK table and settings stay.
    fn slim(&mut self) {
        free_buffers(&mut self.rbuf, &mut self.wbuf, &mut self.written);
        self.block = Vec::new();
        self.batch = Vec::new();
        self.deferred = Vec::new();
        self.streams.shrink_to_fit();
        self.shared.ready.lock().expect("ready lock").ids = Vec::new();
        self.parks.fetch_add(1, Ordering::Relaxed);
    }

    fn unwritten(&self) -> usize {
        self.wbuf.len() - self.written
    }

    /// A stream done both ways leaves; each one that does earns back a reset allowance.
    fn finished(&mut self, id: u32) {
        self.streams.remove(&id);
        self.remember(id, Closed::Ended);
        self.resets = (self.resets + 1).min(RESET_ALLOWANCE);
    }

    /// Notes how stream `id` closed, forgetting the oldest beyond `RECENT_CLOSED`.
    fn remember(&mut self, id: u32, how: Closed) {
        if self.closed.len() == RECENT_CLOSED {
            self.closed.pop_front();
        }
        self.closed.push_back((id, how));
    }

    /// How stream `id` closed, if it is remembered.
    fn closed_as(&self, id: u32) -> Option<Closed> {
        self.closed.iter().rev().find(|c| c.0 == id).map(|c| c.1)
    }

    /// The first GOAWAY of a graceful shutdown, with the largest stream id, and a PING whose
    /// ACK tells that every stream the client opened before it has arrived.
    fn announce_drain(&mut self) {
        self.write_goaway(0x7fff_ffff, ConnError(NO_ERROR, Fault::ShuttingDown));
        frame_head(&mut self.wbuf, 8, PING, 0, 0);
        self.wbuf.extend_from_slice(&DRAIN_PING);
        self.drain_announced = true;
    }

    /// Sends GOAWAY: NO_ERROR lets the open streams finish, any other code ends the
    /// connection once it is written.
    fn go_away(&mut self, e: ConnError) {
        if self.closing.is_some_and(|c| c != NO_ERROR) {
            return;
        }
        if self.closing == Some(NO_ERROR) && e.0 == NO_ERROR {
            return;
        }
        self.closing = Some(e.0);
        self.write_goaway(self.last_id, e);
    }

    /// A GOAWAY naming `last_id`, with the error's code and its text as debug data.
    fn write_goaway(&mut self, last_id: u32, e: ConnError) {
        let debug = e.1.to_string();
        frame_head(&mut self.wbuf, 8 + debug.len(), GOAWAY, 0, 0);
        self.wbuf.extend_from_slice(&last_id.to_be_bytes());
        self.wbuf.extend_from_slice(&e.0.to_be_bytes());
        self.wbuf.extend_from_slice(debug.as_bytes());
    }

    /// Polls the streams whose wakers fired; true if any was polled.
    fn run_ready(&mut self) -> bool {
        let mut any = false;
        loop {
            std::mem::swap(
                &mut self.batch,
                &mut self.shared.ready.lock().expect("ready lock").ids,
            );
            if self.batch.is_empty() {
                return any;
            }
            any = true;
            let batch = std::mem::take(&mut self.batch);
            for &id in &batch {
                self.poll_stream(id);
            }
            self.batch = batch;
            self.batch.clear();
        }
    }

    fn poll_stream(&mut self, id: u32) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        s.wake.queued.store(false, Ordering::Relaxed);
        // Widen the stream's window for what its reader took.
        if let Some(recv) = &s.recv {
            let mut r = recv.lock().expect("recv lock");
            if r.consumed >= STREAM_WINDOW as usize / 2 {
                let n = std::mem::take(&mut r.consumed);
                s.recv_window += n as i64;
                s.body_at = Instant::now();
                frame_head(&mut self.wbuf, 4, WINDOW_UPDATE, 0, id);
                self.wbuf.extend_from_slice(&(n as u32).to_be_bytes());
            }
        }
        let mut cx = Context::from_waker(&s.waker);
        loop {
            match &mut s.out {
                ResponseState::Ready(resp) => {
                    s.out = match resp.take() {
                        Some(resp) => write_head(
                            &mut self.wbuf,
                            &mut self.block,
                            id,
                            *resp,
                            self.peer_max_frame,
                            &self.state,
                        ),
                        None => ResponseState::Done,
                    }
                }
                ResponseState::Waiting(f) => match Pin::new(f).poll(&mut cx) {
                    Poll::Pending => return,
                    Poll::Ready(resp) => {
                        s.out = write_head(
                            &mut self.wbuf,
                            &mut self.block,
                            id,
                            resp,
                            self.peer_max_frame,
                            &self.state,
                        )
                    }
                },
                ResponseState::Body { body, data, end } => {
                    if !data.is_empty() || *end {
                        let room = self.conn_send.min(s.send_window).max(0) as usize;
                        let n = data.len().min(room).min(self.peer_max_frame);
                        if n == 0 && !data.is_empty() {
                            // Blocked on a window: WINDOW_UPDATE queues the stream again.
                            if s.send_blocked.is_none() {
                                let now = Instant::now();
                                s.send_blocked = Some(now);
                                sweep_by(&mut self.sweep, now + self.state.send_timeout);
                            }
                            return;
                        }
                        s.send_blocked = None;
                        let last = *end && n == data.len();
                        let w = &mut self.wbuf;
                        let grow = match self.last_data {
                            Some((sid, at))
                                if sid == id && at >= self.written && at + 9 <= w.len() =>
                            {
                                let cur =
                                    u32::from_be_bytes([0, w[at], w[at + 1], w[at + 2]]) as usize;
                                (at + 9 + cur == w.len() && cur + n <= self.peer_max_frame)
                                    .then_some((at, cur))
                            }
                            _ => None,
                        };
                        match grow {
                            Some((at, cur)) => {
                                w[at..at + 3]
                                    .copy_from_slice(&((cur + n) as u32).to_be_bytes()[1..]);
                                if last {
                                    w[at + 4] |= END_STREAM;
                                }
                            }
                            None => {
                                self.last_data = Some((id, w.len()));
                                frame_head(w, n, DATA, if last { END_STREAM } else { 0 }, id);
                            }
                        }
                        self.wbuf.extend_from_slice(&data[..n]);
                        data.advance(n);
                        self.conn_send -= n as i64;
                        s.send_window -= n as i64;
                        if last {
                            s.out = ResponseState::Done;
                        }
                        continue;
                    }
                    if self.wbuf.len() - self.written >= WRITE_HIGH {
                        self.deferred.push(id);
                        return;
                    }
                    match Pin::new(&mut *body).poll_frame(&mut cx) {
                        Poll::Pending => return,
                        Poll::Ready(None) => *end = true,
                        Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                            Ok(d) => {
                                *data = d;
                                *end = body.is_end_stream();
                            }
                            Err(frame) => {
                                let trailers = frame.into_trailers().unwrap_or_default();
                                self.block.clear();
                                hpack::encode_fields(&trailers, &mut self.block);
                                write_block(
                                    &mut self.wbuf,
                                    &self.block,
                                    id,
                                    true,
                                    self.peer_max_frame,
                                );
                                s.out = ResponseState::Done;
                            }
                        },
                        Poll::Ready(Some(Err(_))) => {
                            // The upstream broke off mid-body: the client must not take
                            // what it got for the whole.
                            // The upstream body failed.
                            self.reset(id, INTERNAL_ERROR);
                            return;
                        }
                    }
                }
                ResponseState::Done => {
                    // Answered before the client finished sending: what it still sends is
                    // read and dropped until its END_STREAM, at most a window's worth (see
                    // `on_data`), rather than reset at once. Some clients (curl 7) throw a
                    // complete response away when RST_STREAM follows it mid-upload.
                    if s.recv.is_none() {
                        self.finished(id);
                    }
                    return;
                }
            }
        }
    }
}

/// Makes sure the stalled streams are looked for by `at` (see `H2Connection::sweep`).
fn sweep_by(sweep: &mut Option<Pin<Box<Sleep>>>, at: Instant) {
    match sweep {
        Some(t) if t.deadline() <= at => {}
        Some(t) => t.as_mut().reset(at),
        None => *sweep = Some(Box::pin(tokio::time::sleep_until(at))),
    }
}

/// Writes a response head (adding Date if the response has none); returns where the stream
/// goes next: its body, or nothing more when the head ends it.
fn write_head<S: Service>(
    wbuf: &mut Vec<u8>,
    block: &mut Vec<u8>,
    id: u32,
    resp: Response<S::Body>,
    max_frame: usize,
    state: &ConnState,
) -> ResponseState<S> {
    let (parts, body) = resp.into_parts();
    let end = body.is_end_stream();
    let mut headers = parts.headers;
    if !headers.contains_key(http::header::DATE) {
        headers.insert(http::header::DATE, http_date());
    }
    if let Some(v) = &state.alt_svc {
        headers
            .entry(http::header::ALT_SVC)
            .or_insert_with(|| v.clone());
    }
    block.clear();
    hpack::encode_response(parts.status, &headers, block);
    write_block(wbuf, block, id, end, max_frame);
    if end {
        ResponseState::Done
    } else {
        ResponseState::Body {
            body,
            data: Bytes::new(),
            end: false,
        }
    }
}
