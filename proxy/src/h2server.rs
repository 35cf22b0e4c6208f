//! The HTTP/2 server side (RFC 9113), for cleartext prior knowledge and TLS with ALPN h2.
//!
//! One connection is one future: it reads frames, starts each request's handler future inside
//! itself (no task per stream), polls only the streams whose waker fired, and writes every
//! frame the pass produced with one write. The request body is a queue the DATA frames fill
//! and the upstream side drains; flow-control credit goes back as the upstream side reads.
//! It never pushes, never uses priorities, and never adds to the client's HPACK table.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use tokio::io::AsyncWrite;
use tokio::sync::watch;

use crate::body::{ClientBody, ProxyBody};
use crate::conn::{ClientIo, ConnState};
use crate::error::BoxError;
use crate::hpack::{self, Field, Name};
use crate::proxy::Handled;
use crate::worker::HandlerSlot;

pub(crate) const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const PRIORITY: u8 = 2;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PUSH_PROMISE: u8 = 5;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const WINDOW_UPDATE: u8 = 8;
const CONTINUATION: u8 = 9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY_FLAG: u8 = 0x20;

/// Error codes (RFC 9113 section 7).
const NO_ERROR: u32 = 0;
const PROTOCOL_ERROR: u32 = 1;
const INTERNAL_ERROR: u32 = 2;
const FLOW_CONTROL_ERROR: u32 = 3;
const STREAM_CLOSED: u32 = 5;
const FRAME_SIZE_ERROR: u32 = 6;
const REFUSED_STREAM: u32 = 7;
const COMPRESSION_ERROR: u32 = 9;
const ENHANCE_YOUR_CALM: u32 = 11;

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
/// How many of the streams we reset are remembered (see `Conn::refuse`).
const RECENT_RESETS: usize = 64;

/// A connection error: GOAWAY with this code; the text goes in its debug data.
#[derive(Debug)]
struct ConnError(u32, &'static str);

/// What the connection and its stream wakers share.
#[derive(Default)]
struct Shared {
    /// Streams whose waker fired since the connection last looked.
    ready: Mutex<Vec<u32>>,
    waker: Mutex<Option<Waker>>,
    /// Request body bytes the upstream side has read and the client may send again.
    released: AtomicUsize,
}

impl Shared {
    fn wake_conn(&self) {
        if let Some(w) = self.waker.lock().expect("waker lock").as_ref() {
            w.wake_by_ref();
        }
    }

    /// Returns request body credit; wakes the connection once enough gathered to announce.
    fn release(&self, n: usize) {
        let before = self.released.fetch_add(n, Ordering::Relaxed);
        if before < CONN_WINDOW as usize / 4 && before + n >= CONN_WINDOW as usize / 4 {
            self.wake_conn();
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
    /// Queues the stream without waking the connection (which is running when it does this).
    fn queue(&self) -> bool {
        let fresh = !self.queued.swap(true, Ordering::Relaxed);
        if fresh {
            self.shared.ready.lock().expect("ready lock").push(self.id);
        }
        fresh
    }
}

impl Wake for StreamWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }
    fn wake_by_ref(self: &Arc<Self>) {
        if self.queue() {
            self.shared.wake_conn();
        }
    }
}

/// A request body as DATA frames deliver it.
struct Recv {
    queue: VecDeque<Bytes>,
    queued: usize,
    trailers: Option<HeaderMap>,
    end: bool,
    /// Why the body failed (the stream was reset); the reader gets it as an error.
    failed: Option<&'static str>,
    reader: Option<Waker>,
    /// The reader is gone: further data is dropped and credited at once.
    dropped: bool,
    /// Read since the stream's window was last widened.
    consumed: usize,
    /// Content-Length, if declared, and what arrived so far.
    declared: Option<u64>,
    received: u64,
}

impl Recv {
    fn fail(&mut self, why: &'static str) {
        self.failed = Some(why);
        if let Some(w) = self.reader.take() {
            w.wake();
        }
    }
}

/// The reading end of a request body, handed to the proxy inside the request.
pub(crate) struct RecvBody {
    recv: Arc<Mutex<Recv>>,
    shared: Arc<Shared>,
    /// The stream's waker: told when enough was read to widen the stream's window.
    stream: Waker,
}

impl Body for RecvBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let mut r = this.recv.lock().expect("recv lock");
        if let Some(data) = r.queue.pop_front() {
            r.queued -= data.len();
            r.consumed += data.len();
            let widen = !r.end && r.consumed >= STREAM_WINDOW as usize / 2;
            drop(r);
            this.shared.release(data.len());
            if widen {
                this.stream.wake_by_ref();
            }
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if let Some(why) = r.failed {
            return Poll::Ready(Some(Err(why.into())));
        }
        if let Some(t) = r.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(t))));
        }
        if r.end {
            return Poll::Ready(None);
        }
        r.reader = Some(cx.waker().clone());
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        let r = self.recv.lock().expect("recv lock");
        r.end && r.queue.is_empty() && r.trailers.is_none() && r.failed.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        let r = self.recv.lock().expect("recv lock");
        match r.declared {
            Some(n) => SizeHint::with_exact(n - r.received + r.queued as u64),
            None => SizeHint::default(),
        }
    }
}

impl Drop for RecvBody {
    fn drop(&mut self) {
        let mut r = self.recv.lock().expect("recv lock");
        r.dropped = true;
        let unread = std::mem::take(&mut r.queued);
        r.queue.clear();
        drop(r);
        self.shared.release(unread);
    }
}

/// Where a stream's response is.
// Every stream reaches `Body`; boxing it would cost an allocation per stream.
#[allow(clippy::large_enum_variant)]
enum Out {
    /// The handler is working on it.
    Waiting(Pin<Box<dyn Future<Output = Response<ProxyBody>>>>),
    /// The head is sent; `data` is body not yet sent (flow control), `end` once it is the last.
    Body {
        body: ProxyBody,
        data: Bytes,
        end: bool,
    },
    Done,
}

struct Stream {
    out: Out,
    /// The request body's state while the client may still send on it.
    recv: Option<Arc<Mutex<Recv>>>,
    /// What the client may still send before we widen the window.
    recv_window: i64,
    send_window: i64,
    wake: Arc<StreamWake>,
    waker: Waker,
}

/// Serves one HTTP/2 connection whose preface `io` starts with, until it ends.
pub(crate) async fn serve(
    io: ClientIo,
    state: Arc<ConnState>,
    handler: HandlerSlot,
    mut draining: watch::Receiver<bool>,
    max_header_list: usize,
) {
    let mut conn = Conn::new(io, state, handler, max_header_list);
    let mut drain = std::pin::pin!(draining.wait_for(|d| *d));
    std::future::poll_fn(|cx| {
        if conn.closing.is_none() && drain.as_mut().poll(cx).is_ready() {
            // Streams open now finish; new ones are refused; then the connection closes.
            conn.go_away(ConnError(NO_ERROR, "shutting down"));
        }
        conn.poll(cx)
    })
    .await;
    let _ = std::future::poll_fn(|cx| Pin::new(&mut conn.io).poll_flush(cx)).await;
}

struct Conn {
    io: ClientIo,
    rbuf: BytesMut,
    wbuf: Vec<u8>,
    /// How much of `wbuf` is written.
    written: usize,
    /// Scratch for encoding a header block before it is cut into frames.
    block: Vec<u8>,
    /// The header block being received (HEADERS then CONTINUATION) and for which stream.
    partial: Option<(u32, bool)>,
    /// Frames the block being received came in so far.
    block_frames: usize,
    decoder: hpack::Decoder,
    streams: HashMap<u32, Stream>,
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
    /// Streams recently reset by us (see `refuse`).
    reset_ids: VecDeque<u32>,
    state: Arc<ConnState>,
    handler: HandlerSlot,
    max_header_list: usize,
}

impl Conn {
    fn new(
        io: ClientIo,
        state: Arc<ConnState>,
        handler: HandlerSlot,
        max_header_list: usize,
    ) -> Conn {
        let mut wbuf = Vec::with_capacity(MAX_FRAME);
        let settings: [(u16, u32); 3] = [
            (0x3, MAX_STREAMS as u32),
            (0x4, STREAM_WINDOW),
            (0x6, max_header_list as u32),
        ];
        frame_head(&mut wbuf, settings.len() * 6, SETTINGS, 0, 0);
        for (k, v) in settings {
            wbuf.extend_from_slice(&k.to_be_bytes());
            wbuf.extend_from_slice(&v.to_be_bytes());
        }
        frame_head(&mut wbuf, 4, WINDOW_UPDATE, 0, 0);
        wbuf.extend_from_slice(&(CONN_WINDOW - DEFAULT_WINDOW as u32).to_be_bytes());
        Conn {
            io,
            rbuf: BytesMut::new(),
            wbuf,
            written: 0,
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
            reset_ids: VecDeque::new(),
            state,
            handler,
            max_header_list,
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        {
            let mut w = self.shared.waker.lock().expect("waker lock");
            if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *w = Some(cx.waker().clone());
            }
        }
        loop {
            let mut progress = false;
            if self.closing.is_none_or(|c| c == NO_ERROR) && self.unwritten() < WRITE_HIGH {
                match crate::stream::poll_fill(&mut self.io, &mut self.rbuf, MAX_FRAME, cx) {
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
                        self.go_away(ConnError(NO_ERROR, "idle timeout"));
                        self.client_gone = true;
                    }
                    Poll::Ready(Err(_)) => return Poll::Ready(()),
                    Poll::Pending => {}
                }
            }
            let released = self.shared.released.swap(0, Ordering::Relaxed);
            self.credit(released);
            progress |= self.run_ready();
            match self.poll_write(cx) {
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Ready(Ok(())) if !self.deferred.is_empty() => {
                    for id in self.deferred.drain(..) {
                        if let Some(s) = self.streams.get(&id) {
                            s.wake.queue();
                        }
                    }
                    progress = true;
                }
                _ => {}
            }
            if self.unwritten() == 0 {
                let graceful = self.closing == Some(NO_ERROR) || self.client_gone;
                if self.closing.is_some_and(|c| c != NO_ERROR)
                    || (graceful && self.streams.is_empty())
                {
                    return Poll::Ready(());
                }
            }
            if !progress {
                return Poll::Pending;
            }
        }
    }

    fn unwritten(&self) -> usize {
        self.wbuf.len() - self.written
    }

    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.wbuf.len() {
            let n = std::task::ready!(
                Pin::new(&mut self.io).poll_write(cx, &self.wbuf[self.written..])
            )?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.written = 0;
        self.wbuf.clear();
        // A large body may have grown the buffer; an idle connection keeps a small one.
        if self.wbuf.capacity() > 4 * WRITE_HIGH {
            self.wbuf = Vec::with_capacity(MAX_FRAME);
        }
        Poll::Ready(Ok(()))
    }

    /// Handles every complete frame in `buf`.
    fn frames(&mut self, buf: &mut BytesMut) -> Result<(), ConnError> {
        if !self.preface {
            let n = buf.len().min(PREFACE.len());
            if buf[..n] != PREFACE[..n] {
                return Err(ConnError(PROTOCOL_ERROR, "bad connection preface"));
            }
            if n < PREFACE.len() {
                return Ok(());
            }
            buf.advance(n);
            self.preface = true;
        }
        while buf.len() >= 9 {
            let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
            if len > MAX_FRAME {
                return Err(ConnError(
                    FRAME_SIZE_ERROR,
                    "frame above SETTINGS_MAX_FRAME_SIZE",
                ));
            }
            if buf.len() < 9 + len {
                break;
            }
            let (kind, flags) = (buf[3], buf[4]);
            let id = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
            if !self.settings && kind != SETTINGS {
                return Err(ConnError(PROTOCOL_ERROR, "first frame is not SETTINGS"));
            }
            if self
                .partial
                .is_some_and(|(p, _)| kind != CONTINUATION || p != id)
            {
                return Err(ConnError(PROTOCOL_ERROR, "header block interrupted"));
            }
            if kind == DATA {
                buf.advance(9);
                let payload = buf.split_to(len).freeze();
                self.on_data(id, flags, payload)?;
            } else {
                let r = self.on_frame(kind, flags, id, &buf[9..9 + len]);
                buf.advance(9 + len);
                r?;
            }
            if self.closing.is_some_and(|c| c != NO_ERROR) {
                break;
            }
        }
        Ok(())
    }

    fn on_frame(&mut self, kind: u8, flags: u8, id: u32, p: &[u8]) -> Result<(), ConnError> {
        match kind {
            HEADERS => self.on_headers(id, flags, p),
            CONTINUATION => {
                let Some((_, end_stream)) = self.partial else {
                    return Err(ConnError(PROTOCOL_ERROR, "CONTINUATION without HEADERS"));
                };
                self.add_block(p)?;
                if flags & END_HEADERS != 0 {
                    self.partial = None;
                    self.end_headers(id, end_stream)?;
                }
                Ok(())
            }
            PRIORITY if p.len() != 5 => Err(ConnError(FRAME_SIZE_ERROR, "PRIORITY length")),
            RST_STREAM => self.on_reset(id, p),
            SETTINGS => self.on_settings(id, flags, p),
            PUSH_PROMISE => Err(ConnError(PROTOCOL_ERROR, "PUSH_PROMISE from a client")),
            PING => {
                if id != 0 {
                    return Err(ConnError(PROTOCOL_ERROR, "PING on a stream"));
                }
                if p.len() != 8 {
                    return Err(ConnError(FRAME_SIZE_ERROR, "PING length"));
                }
                if flags & ACK == 0 {
                    frame_head(&mut self.wbuf, 8, PING, ACK, 0);
                    self.wbuf.extend_from_slice(p);
                }
                Ok(())
            }
            GOAWAY => {
                if id != 0 {
                    return Err(ConnError(PROTOCOL_ERROR, "GOAWAY on a stream"));
                }
                if p.len() < 8 {
                    return Err(ConnError(FRAME_SIZE_ERROR, "GOAWAY length"));
                }
                self.client_gone = true;
                Ok(())
            }
            WINDOW_UPDATE => self.on_window_update(id, p),
            // PRIORITY is advisory; unknown frame types are ignored (RFC 9113 5.5).
            _ => Ok(()),
        }
    }

    fn on_settings(&mut self, id: u32, flags: u8, p: &[u8]) -> Result<(), ConnError> {
        if id != 0 {
            return Err(ConnError(PROTOCOL_ERROR, "SETTINGS on a stream"));
        }
        if flags & ACK != 0 {
            return match p.is_empty() {
                true => Ok(()),
                false => Err(ConnError(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")),
            };
        }
        if p.len() % 6 != 0 {
            return Err(ConnError(FRAME_SIZE_ERROR, "SETTINGS length"));
        }
        for s in p.chunks_exact(6) {
            let value = u32::from_be_bytes([s[2], s[3], s[4], s[5]]);
            match u16::from_be_bytes([s[0], s[1]]) {
                0x2 if value > 1 => {
                    return Err(ConnError(PROTOCOL_ERROR, "SETTINGS_ENABLE_PUSH above 1"))
                }
                0x4 => {
                    let value = value as i64;
                    if value > MAX_WINDOW {
                        return Err(ConnError(FLOW_CONTROL_ERROR, "initial window too large"));
                    }
                    let delta = value - self.peer_window;
                    self.peer_window = value;
                    for s in self.streams.values_mut() {
                        s.send_window += delta;
                        if delta > 0 {
                            s.wake.queue();
                        }
                    }
                }
                0x5 => {
                    if !(MAX_FRAME as u32..=0xff_ffff).contains(&value) {
                        return Err(ConnError(PROTOCOL_ERROR, "SETTINGS_MAX_FRAME_SIZE range"));
                    }
                    self.peer_max_frame = value as usize;
                }
                // The header table size needs nothing (the encoder adds no entries);
                // concurrency and header list limits are for pushes and requests we never make.
                _ => {}
            }
        }
        self.settings = true;
        frame_head(&mut self.wbuf, 0, SETTINGS, ACK, 0);
        Ok(())
    }

    fn on_window_update(&mut self, id: u32, p: &[u8]) -> Result<(), ConnError> {
        if p.len() != 4 {
            return Err(ConnError(FRAME_SIZE_ERROR, "WINDOW_UPDATE length"));
        }
        let inc = (u32::from_be_bytes([p[0], p[1], p[2], p[3]]) & 0x7fff_ffff) as i64;
        if id == 0 {
            if inc == 0 {
                return Err(ConnError(PROTOCOL_ERROR, "WINDOW_UPDATE of 0"));
            }
            self.conn_send += inc;
            if self.conn_send > MAX_WINDOW {
                return Err(ConnError(FLOW_CONTROL_ERROR, "connection window overflow"));
            }
            for s in self.streams.values() {
                s.wake.queue();
            }
            return Ok(());
        }
        match self.streams.get_mut(&id) {
            Some(s) if inc == 0 => {
                let _ = s;
                self.reset(id, PROTOCOL_ERROR);
            }
            Some(s) => {
                s.send_window += inc;
                if s.send_window > MAX_WINDOW {
                    self.reset(id, FLOW_CONTROL_ERROR);
                } else {
                    s.wake.queue();
                }
            }
            None if id > self.last_id => {
                return Err(ConnError(PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream"))
            }
            None => {}
        }
        Ok(())
    }

    fn on_reset(&mut self, id: u32, p: &[u8]) -> Result<(), ConnError> {
        if p.len() != 4 {
            return Err(ConnError(FRAME_SIZE_ERROR, "RST_STREAM length"));
        }
        if id == 0 || id > self.last_id {
            return Err(ConnError(PROTOCOL_ERROR, "RST_STREAM on an idle stream"));
        }
        if let Some(s) = self.streams.remove(&id) {
            if matches!(s.out, Out::Waiting(_)) {
                self.resets -= 1;
                if self.resets < 0 {
                    return Err(ConnError(ENHANCE_YOUR_CALM, "too many streams reset"));
                }
            }
            self.close_recv(&s, "client reset the stream");
        }
        Ok(())
    }

    fn on_headers(&mut self, id: u32, flags: u8, mut p: &[u8]) -> Result<(), ConnError> {
        if id == 0 || id % 2 == 0 {
            return Err(ConnError(
                PROTOCOL_ERROR,
                "HEADERS on a stream a client cannot open",
            ));
        }
        if flags & PADDED != 0 {
            let (&pad, rest) = p
                .split_first()
                .ok_or(ConnError(FRAME_SIZE_ERROR, "HEADERS padding"))?;
            if pad as usize > rest.len() {
                return Err(ConnError(PROTOCOL_ERROR, "padding longer than the frame"));
            }
            p = &rest[..rest.len() - pad as usize];
        }
        if flags & PRIORITY_FLAG != 0 {
            p = p
                .get(5..)
                .ok_or(ConnError(FRAME_SIZE_ERROR, "HEADERS priority"))?;
        }
        self.block.clear();
        self.block_frames = 0;
        self.add_block(p)?;
        let end_stream = flags & END_STREAM != 0;
        if flags & END_HEADERS != 0 {
            self.end_headers(id, end_stream)
        } else {
            self.partial = Some((id, end_stream));
            Ok(())
        }
    }

    fn add_block(&mut self, p: &[u8]) -> Result<(), ConnError> {
        // Compressed, a block is seldom larger than the list it decodes to; twice the list
        // limit leaves room and still bounds what a client can make us hold. Empty
        // CONTINUATION frames are counted too: a block may not go on for ever.
        self.block_frames += 1;
        if self.block.len() + p.len() > 2 * self.max_header_list + MAX_FRAME
            || self.block_frames > MAX_BLOCK_FRAMES
        {
            return Err(ConnError(ENHANCE_YOUR_CALM, "header block too large"));
        }
        self.block.extend_from_slice(p);
        Ok(())
    }

    /// A complete header block: a new request, or a request's trailers.
    fn end_headers(&mut self, id: u32, end_stream: bool) -> Result<(), ConnError> {
        let mut head = Head::new(self.max_header_list);
        let block = std::mem::take(&mut self.block);
        // Decoded whatever becomes of the stream: the table must stay in step with the client.
        let decoded = self.decoder.decode(&block, |f| head.add(f));
        self.block = block;
        decoded.map_err(|_| ConnError(COMPRESSION_ERROR, "header block does not decode"))?;
        if let Some(s) = self.streams.get_mut(&id) {
            let Some(recv) = s.recv.take() else {
                self.reset(id, STREAM_CLOSED);
                return Ok(());
            };
            let mut r = recv.lock().expect("recv lock");
            if !end_stream || head.malformed || head.has_pseudo() {
                r.fail("malformed trailers");
                drop(r);
                self.reset(id, PROTOCOL_ERROR);
                return Ok(());
            }
            if r.declared.is_some_and(|n| n != r.received) {
                r.fail("body shorter than its Content-Length");
                drop(r);
                self.reset(id, PROTOCOL_ERROR);
                return Ok(());
            }
            r.trailers = Some(head.headers);
            r.end = true;
            if let Some(w) = r.reader.take() {
                w.wake();
            }
            return Ok(());
        }
        if id <= self.last_id {
            // Trailers racing our reset of the stream are dropped; any other head on an old
            // stream id is the client's error (RFC 9113 5.1.1).
            if self.reset_ids.contains(&id) {
                return Ok(());
            }
            return Err(ConnError(PROTOCOL_ERROR, "HEADERS on a closed stream"));
        }
        self.last_id = id;
        if self.closing.is_some() || self.client_gone || self.streams.len() >= MAX_STREAMS {
            self.refuse(id, REFUSED_STREAM);
            return Ok(());
        }
        if head.malformed {
            self.refuse(id, PROTOCOL_ERROR);
            return Ok(());
        }
        self.open(id, head, end_stream);
        Ok(())
    }

    /// Starts a stream's request.
    fn open(&mut self, id: u32, head: Head, end_stream: bool) {
        let wake = Arc::new(StreamWake {
            id,
            queued: AtomicBool::new(false),
            shared: Arc::clone(&self.shared),
        });
        let waker = Waker::from(Arc::clone(&wake));
        let inflight = self.state.begin_request();
        let too_large = head.size > self.max_header_list;
        let declared = head
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let recv = (!end_stream).then(|| {
            Arc::new(Mutex::new(Recv {
                queue: VecDeque::new(),
                queued: 0,
                trailers: None,
                end: false,
                failed: None,
                reader: None,
                dropped: false,
                consumed: 0,
                declared,
                received: 0,
            }))
        });
        let body = match &recv {
            Some(r) => ClientBody::H2(RecvBody {
                recv: Arc::clone(r),
                shared: Arc::clone(&self.shared),
                stream: waker.clone(),
            }),
            None => ClientBody::Empty,
        };
        let out = if too_large {
            Out::Waiting(Box::pin(std::future::ready(crate::proxy::answer(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                false,
                inflight,
            ))))
        } else {
            match head.into_request(body) {
                Some(req) => {
                    let handler = Rc::clone(&self.handler.borrow());
                    match handler.handle(req, inflight) {
                        Handled::Ready(resp) => match resp {
                            Some(resp) => Out::Waiting(Box::pin(std::future::ready(*resp))),
                            None => Out::Done,
                        },
                        Handled::Forwarding(f) => Out::Waiting(f),
                    }
                }
                None => {
                    drop(inflight);
                    self.refuse(id, PROTOCOL_ERROR);
                    return;
                }
            }
        };
        wake.queue();
        self.streams.insert(
            id,
            Stream {
                out,
                recv,
                recv_window: STREAM_WINDOW as i64,
                send_window: self.peer_window,
                wake,
                waker,
            },
        );
    }

    fn on_data(&mut self, id: u32, flags: u8, mut p: Bytes) -> Result<(), ConnError> {
        if id == 0 {
            return Err(ConnError(PROTOCOL_ERROR, "DATA on stream 0"));
        }
        let len = p.len();
        self.conn_recv -= len as i64;
        if self.conn_recv < 0 {
            return Err(ConnError(FLOW_CONTROL_ERROR, "connection window exceeded"));
        }
        if flags & PADDED != 0 {
            let pad = *p
                .first()
                .ok_or(ConnError(FRAME_SIZE_ERROR, "DATA padding"))? as usize;
            if pad >= len {
                return Err(ConnError(PROTOCOL_ERROR, "padding longer than the frame"));
            }
            p = p.slice(1..len - pad);
        }
        // Padding is never read by anyone: credited now.
        let mut credit = len - p.len();
        let Some(s) = self.streams.get_mut(&id) else {
            if id > self.last_id {
                return Err(ConnError(PROTOCOL_ERROR, "DATA on an idle stream"));
            }
            // A stream already reset or answered in full: dropped, credited.
            self.credit(len);
            return Ok(());
        };
        let Some(recv) = &s.recv else {
            self.credit(len);
            self.reset(id, STREAM_CLOSED);
            return Ok(());
        };
        s.recv_window -= len as i64;
        let mut r = recv.lock().expect("recv lock");
        r.consumed += credit;
        if s.recv_window < 0 {
            r.fail("stream window exceeded");
            drop(r);
            self.credit(len);
            self.reset(id, FLOW_CONTROL_ERROR);
            return Ok(());
        }
        r.received += p.len() as u64;
        let end = flags & END_STREAM != 0;
        let bad_length = r
            .declared
            .is_some_and(|n| r.received > n || (end && r.received != n));
        if bad_length {
            r.fail("body length differs from its Content-Length");
            drop(r);
            self.credit(len);
            self.reset(id, PROTOCOL_ERROR);
            return Ok(());
        }
        if r.dropped {
            credit += p.len();
        } else if !p.is_empty() {
            r.queued += p.len();
            r.queue.push_back(p);
        }
        if end {
            r.end = true;
        }
        if let Some(w) = r.reader.take() {
            w.wake();
        }
        drop(r);
        if end {
            s.recv = None;
        }
        self.credit(credit);
        Ok(())
    }

    /// Gathers connection window credit; announces it once a quarter of the window is back.
    fn credit(&mut self, n: usize) {
        self.conn_unacked += n;
        if self.conn_unacked >= CONN_WINDOW as usize / 4 {
            self.conn_recv += self.conn_unacked as i64;
            frame_head(&mut self.wbuf, 4, WINDOW_UPDATE, 0, 0);
            self.wbuf
                .extend_from_slice(&(self.conn_unacked as u32).to_be_bytes());
            self.conn_unacked = 0;
        }
    }

    /// The stream's request body ends here: the reader fails unless it had it all, and what
    /// it never read is credited back.
    fn close_recv(&mut self, s: &Stream, why: &'static str) {
        if let Some(recv) = &s.recv {
            let mut r = recv.lock().expect("recv lock");
            r.fail(why);
            r.dropped = true;
            let unread = std::mem::take(&mut r.queued);
            r.queue.clear();
            drop(r);
            self.credit(unread);
        }
    }

    /// Sends RST_STREAM, remembering the id for a while: frames the client sent before it
    /// saw the reset may still come.
    fn refuse(&mut self, id: u32, code: u32) {
        frame_head(&mut self.wbuf, 4, RST_STREAM, 0, id);
        self.wbuf.extend_from_slice(&code.to_be_bytes());
        if self.reset_ids.len() == RECENT_RESETS {
            self.reset_ids.pop_front();
        }
        self.reset_ids.push_back(id);
    }

    /// Ends a stream with RST_STREAM.
    fn reset(&mut self, id: u32, code: u32) {
        self.refuse(id, code);
        if let Some(s) = self.streams.remove(&id) {
            self.close_recv(&s, "stream reset");
        }
    }

    fn go_away(&mut self, e: ConnError) {
        if self.closing.is_some_and(|c| c != NO_ERROR) {
            return;
        }
        if self.closing == Some(NO_ERROR) && e.0 == NO_ERROR {
            return;
        }
        self.closing = Some(e.0);
        frame_head(&mut self.wbuf, 8 + e.1.len(), GOAWAY, 0, 0);
        self.wbuf.extend_from_slice(&self.last_id.to_be_bytes());
        self.wbuf.extend_from_slice(&e.0.to_be_bytes());
        self.wbuf.extend_from_slice(e.1.as_bytes());
    }

    /// Polls the streams whose wakers fired; true if any was polled.
    fn run_ready(&mut self) -> bool {
        let mut any = false;
        loop {
            std::mem::swap(
                &mut self.batch,
                &mut self.shared.ready.lock().expect("ready lock"),
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
                frame_head(&mut self.wbuf, 4, WINDOW_UPDATE, 0, id);
                self.wbuf.extend_from_slice(&(n as u32).to_be_bytes());
            }
        }
        let mut cx = Context::from_waker(&s.waker);
        loop {
            match &mut s.out {
                Out::Waiting(f) => match f.as_mut().poll(&mut cx) {
                    Poll::Pending => return,
                    Poll::Ready(resp) => {
                        let (parts, body) = resp.into_parts();
                        let end = body.is_end_stream();
                        let mut headers = parts.headers;
                        if !headers.contains_key(http::header::DATE) {
                            headers.insert(http::header::DATE, http_date());
                        }
                        self.block.clear();
                        hpack::encode_response(parts.status, &headers, &mut self.block);
                        write_block(&mut self.wbuf, &self.block, id, end, self.peer_max_frame);
                        s.out = if end {
                            Out::Done
                        } else {
                            Out::Body {
                                body,
                                data: Bytes::new(),
                                end: false,
                            }
                        };
                    }
                },
                Out::Body { body, data, end } => {
                    if !data.is_empty() || *end {
                        let room = self.conn_send.min(s.send_window).max(0) as usize;
                        let n = data.len().min(room).min(self.peer_max_frame);
                        if n == 0 && !data.is_empty() {
                            // Blocked on a window: WINDOW_UPDATE queues the stream again.
                            return;
                        }
                        let last = *end && n == data.len();
                        frame_head(
                            &mut self.wbuf,
                            n,
                            DATA,
                            if last { END_STREAM } else { 0 },
                            id,
                        );
                        self.wbuf.extend_from_slice(&data[..n]);
                        data.advance(n);
                        self.conn_send -= n as i64;
                        s.send_window -= n as i64;
                        if last {
                            s.out = Out::Done;
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
                                s.out = Out::Done;
                            }
                        },
                        Poll::Ready(Some(Err(_))) => {
                            // The upstream broke off mid-body: the client must not take
                            // what it got for the whole.
                            self.reset(id, INTERNAL_ERROR);
                            return;
                        }
                    }
                }
                Out::Done => {
                    if s.recv.is_some() {
                        // Answered before the client finished sending: it may stop now.
                        self.reset(id, NO_ERROR);
                    } else {
                        self.streams.remove(&id);
                        self.resets = (self.resets + 1).min(RESET_ALLOWANCE);
                    }
                    return;
                }
            }
        }
    }
}

/// The request head being decoded.
struct Head {
    method: Option<HeaderValue>,
    scheme: Option<HeaderValue>,
    authority: Option<HeaderValue>,
    path: Option<HeaderValue>,
    headers: HeaderMap,
    /// The list size as RFC 9113 counts it; past `limit`, fields are counted, not kept.
    size: usize,
    limit: usize,
    malformed: bool,
    regular: bool,
}

impl Head {
    fn new(limit: usize) -> Head {
        Head {
            method: None,
            scheme: None,
            authority: None,
            path: None,
            headers: HeaderMap::new(),
            size: 0,
            limit,
            malformed: false,
            regular: false,
        }
    }

    fn has_pseudo(&self) -> bool {
        self.method.is_some()
            || self.scheme.is_some()
            || self.authority.is_some()
            || self.path.is_some()
    }

    fn add(&mut self, f: Field) {
        self.size += f.size;
        if self.size > self.limit {
            return;
        }
        let Some(value) = f.value else {
            self.malformed = true;
            return;
        };
        let slot = match f.name {
            Name::Method => &mut self.method,
            Name::Scheme => &mut self.scheme,
            Name::Authority => &mut self.authority,
            Name::Path => &mut self.path,
            Name::OtherPseudo | Name::Invalid => {
                self.malformed = true;
                return;
            }
            Name::Header(name) => {
                self.regular = true;
                if hpack::connection_specific(&name)
                    || (name == http::header::TE && value != "trailers")
                {
                    self.malformed = true;
                }
                self.headers.append(name, value);
                return;
            }
        };
        // Pseudo-headers come first, once each (RFC 9113 8.3).
        if self.regular || slot.is_some() {
            self.malformed = true;
        }
        *slot = Some(value);
    }

    /// The request, or None when the head is malformed.
    fn into_request(self, body: ClientBody) -> Option<Request<ClientBody>> {
        let method = Method::from_bytes(self.method?.as_bytes()).ok()?;
        let mut uri = http::uri::Parts::default();
        if method == Method::CONNECT {
            if self.scheme.is_some() || self.path.is_some() {
                return None;
            }
            uri.authority = Some(self.authority?.as_bytes().try_into().ok()?);
        } else {
            uri.scheme = Some(self.scheme?.as_bytes().try_into().ok()?);
            uri.authority = match self.authority {
                Some(a) => Some(a.as_bytes().try_into().ok()?),
                None => None,
            };
            let path = self.path?;
            if path.is_empty() {
                return None;
            }
            uri.path_and_query = Some(path.as_bytes().try_into().ok()?);
        }
        let mut req = Request::new(body);
        *req.method_mut() = method;
        *req.uri_mut() = Uri::from_parts(uri).ok()?;
        *req.version_mut() = http::Version::HTTP_2;
        *req.headers_mut() = self.headers;
        Some(req)
    }
}

fn frame_head(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, id: u32) {
    let l = (len as u32).to_be_bytes();
    out.extend_from_slice(&[l[1], l[2], l[3], kind, flags]);
    out.extend_from_slice(&id.to_be_bytes());
}

/// A header block as HEADERS and, if it does not fit one frame, CONTINUATION frames.
fn write_block(out: &mut Vec<u8>, block: &[u8], id: u32, end_stream: bool, max_frame: usize) {
    let mut chunks = block.chunks(max_frame).peekable();
    let mut kind = HEADERS;
    let mut flags = if end_stream { END_STREAM } else { 0 };
    loop {
        let chunk = chunks.next().unwrap_or_default();
        let last = chunks.peek().is_none();
        if last {
            flags |= END_HEADERS;
        }
        frame_head(out, chunk.len(), kind, flags, id);
        out.extend_from_slice(chunk);
        if last {
            return;
        }
        kind = CONTINUATION;
        flags = 0;
    }
}

/// The Date header value, formatted once a second per thread.
fn http_date() -> HeaderValue {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static CACHE: RefCell<(u64, Option<HeaderValue>)> = const { RefCell::new((0, None)) };
    }
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs || c.1.is_none() {
            let text = httpdate::fmt_http_date(now);
            *c = (secs, HeaderValue::from_str(&text).ok());
        }
        c.1.clone().unwrap_or(HeaderValue::from_static(""))
    })
}
