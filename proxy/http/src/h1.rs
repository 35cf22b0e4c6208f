//! The HTTP/1.1 server side (RFC 9112).
//!
//! One connection is one future: it parses each request head, starts the request's handler
//! future inside itself, moves the request body from the socket into a queue the upstream
//! side drains, and writes the response as it comes: the head and a small body go out in one
//! write. Requests are served one at a time, in order; pipelined requests wait in the read
//! buffer. Framing is strict: a head whose body length is ambiguous gets 400, and the
//! connection closes after any answer that leaves it out of step.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::BytesMut;
use http::header;
use http::{Method, Response, StatusCode, Version};
use http_body::Body;
use tokio::sync::watch;

use crate::body::ClientBody;
use crate::conn::{
    free_buffers, poll_drain, ClientIo, ClientStream, ConnState, HeadLimits, LateDeadline,
    StallWatch,
};
use crate::headers::{connection_has, http_date};
use crate::recv::{BodyError, Credit, Recv, RecvBody};
use crate::service::{Refusal, Reply, ResponseBody, Service, Upgraded as _};
use fluxgate_wire::h1::request::{RequestFraming, RequestHead};
use fluxgate_wire::h1::response::put_status_line;
use fluxgate_wire::h1::{decode_chunk, put_fields, Span};

/// How much room a read asks for.
const READ_SIZE: usize = 16 * 1024;
/// Request body bytes queued for the upstream side before the socket is left unread; reading
/// resumes once the queue is below half of it.
const RECV_HIGH: usize = 256 * 1024;
/// Above this much unwritten output, no more response body is pulled and nothing is read.
const WRITE_HIGH: usize = 64 * 1024;

/// Serves one HTTP/1.1 connection until it ends. Returns the socket to close gently (see
/// `conn::linger`), or None when the client already closed it or it carried a tunnel.
pub fn serve<S: Service>(
    io: ClientIo,
    state: Arc<ConnState>,
    svc: Rc<S>,
    draining: watch::Receiver<bool>,
    limits: HeadLimits,
    parks: Arc<AtomicU64>,
    splice: bool,
) -> impl Future<Output = Option<ClientStream>> {
    let mut conn = H1Connection {
        io,
        rbuf: BytesMut::new(),
        wbuf: Vec::new(),
        written: 0,
        spans: Vec::new(),
        state,
        svc,
        limits,
        parks,
        cur: None,
        closing: false,
        eof: false,
        tunnel: None,
        send_watch: StallWatch::default(),
        body_watch: StallWatch::default(),
        body_deadline: LateDeadline::default(),
    };
    let mut draining = draining;
    // An async block, not an async fn: the fn's arguments would be stored in the future and
    // again as its locals, and every idle connection pays for the future's size.
    async move {
        let probe = draining.clone();
        let mut registered = false;
        let mut drain = std::pin::pin!(draining.wait_for(|d| *d));
        std::future::poll_fn(|cx| {
            if !conn.closing && poll_drain(drain.as_mut(), &probe, &mut registered, cx) {
                // No more keep-alive: an idle connection closes now, a busy one after its
                // answer.
                conn.closing = true;
            }
            conn.poll(cx)
        })
        .await;
        let stream = conn.io.into_stream()?;
        match conn.tunnel.take() {
            Some(up) => {
                // Boxed, and in its own statement (a temporary would live across the await):
                // rare, and its state must not grow every connection's future.
                let served = up.serve(stream, conn.rbuf, splice);
                served.await;
                None
            }
            None => Some(stream),
        }
    }
}

struct H1Connection<S: Service> {
    io: ClientIo,
    rbuf: BytesMut,
    wbuf: Vec<u8>,
    /// How much of `wbuf` is written.
    written: usize,
    /// Where the fields of the head being parsed lie (kept to reuse the allocation).
    spans: Vec<Span>,
    state: Arc<ConnState>,
    svc: Rc<S>,
    limits: HeadLimits,
    /// The worker's count of parked connections (see `slim`).
    parks: Arc<AtomicU64>,
    /// The request being served.
    cur: Option<Current<S>>,
    /// No request after the current one: close once it is answered (at once when idle).
    closing: bool,
    /// Nothing more is read: the client closed its side, or a body could not be delimited.
    eof: bool,
    /// Answered 101: once written, the connection carries this upstream's protocol.
    tunnel: Option<Upgraded<S>>,
    send_watch: StallWatch,
    /// Request body bytes awaited from the client (see `http.body_timeout`).
    body_watch: StallWatch,
    /// The request's deadline and minimum body rate (`http.request_timeout`, `body_min_rate`).
    body_deadline: LateDeadline,
}

/// What a 101 answer hands over: the connection, and what it sent past the answer's head.
type Upgraded<S> = <<S as Service>::Body as ResponseBody>::Upgraded;

/// One request in service.
struct Current<S: Service> {
    out: ResponseState<S>,
    /// The request body while the client is still sending it.
    upload: Option<Upload>,
    /// HEAD: the response has no body, whatever its head says.
    head: bool,
    http10: bool,
    keep_alive: bool,
    /// The client waits for `100 Continue` before it sends the body.
    expect: bool,
}

/// A request body on its way from the socket to its reader.
struct Upload {
    recv: Arc<Mutex<Recv>>,
    framing: RequestFraming,
    /// When the request's head began (see `ConnState::body_deadline`).
    started: tokio::time::Instant,
}

/// Where the response is.
// Every request reaches `Body`; boxing it would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
enum ResponseState<S: Service> {
    /// The service is working on it (or answered, the head not written yet).
    Waiting(Reply<S::Future, S::Body>),
    /// The head is written; the body follows, chunk-coded or not.
    Body {
        body: S::Body,
        chunked: bool,
    },
    Done,
}

impl<S: Service> H1Connection<S> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let mut progress = false;
            if self.cur.is_none() && !self.closing && !self.rbuf.is_empty() {
                progress |= self.start();
            }
            if self.wants_input() {
                match self.io.poll_input(&mut self.rbuf, READ_SIZE, cx) {
                    // Idle a while (see `ClientIo`): keep the socket, not the buffers.
                    Poll::Ready(Ok(0)) if self.state.take_park() => {
                        self.slim();
                        progress = true;
                    }
                    Poll::Ready(Ok(0)) => {
                        self.client_closed();
                        progress = true;
                    }
                    Poll::Ready(Ok(_)) => progress = true,
                    // A head begun and not finished in time (see `ClientIo`).
                    Poll::Ready(Err(e))
                        if e.kind() == io::ErrorKind::TimedOut
                            && self.cur.is_none()
                            && !self.rbuf.is_empty() =>
                    {
                        self.refuse(Refusal::HeadTimeout);
                        progress = true;
                    }
                    // Idle past the keep-alive timeout, or the socket failed.
                    Poll::Ready(Err(_)) => return Poll::Ready(()),
                    Poll::Pending => {}
                }
            }
            progress |= self.feed(cx);
            progress |= self.respond(cx);
            let before = self.unwritten();
            if let Poll::Ready(Err(_)) =
                self.io
                    .poll_write_buf(&mut self.wbuf, &mut self.written, WRITE_HIGH, cx)
            {
                return Poll::Ready(());
            }
            // A client that takes nothing for the send timeout is closed; dropping the
            // request cancels its upstream side.
            let left = self.unwritten();
            let limit = self.state.send_timeout;
            if self.send_watch.stalled(left, left < before, limit, cx) {
                return Poll::Ready(());
            }
            if self.unwritten() == 0 {
                match &self.cur {
                    Some(c) if matches!(c.out, ResponseState::Done) => {
                        // A body still arriving after its answer: closing is the only way
                        // to stay in step with a client that may never send the rest.
                        let reuse = c.keep_alive && c.upload.is_none() && !self.closing;
                        self.cur = None;
                        if !reuse || self.tunnel.is_some() {
                            return Poll::Ready(());
                        }
                        if !self.rbuf.is_empty() {
                            self.state.begin_head();
                        }
                        progress = true;
                    }
                    None if self.closing || self.eof => return Poll::Ready(()),
                    _ => {}
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

    /// Whether the socket is to be read now: for a head, or for a body with room left in
    /// its queue. Bytes of a pipelined request wait in the socket while one is answered.
    fn wants_input(&self) -> bool {
        if self.eof || self.unwritten() >= WRITE_HIGH {
            return false;
        }
        match &self.cur {
            None => !self.closing,
            Some(c) => c.upload.as_ref().is_some_and(|u| {
                let r = u.recv.lock().expect("recv lock");
                r.dropped || r.queued < RECV_HIGH
            }),
        }
    }

    /// Frees the buffers of a connection idle a while; the socket stays open.
    fn slim(&mut self) {
        free_buffers(&mut self.rbuf, &mut self.wbuf, &mut self.written);
        self.spans = Vec::new();
        self.parks.fetch_add(1, Ordering::Relaxed);
    }

    /// The client closed its side: a body it was sending is cut short.
    fn client_closed(&mut self) {
        self.eof = true;
        if let Some(c) = &mut self.cur {
            if let Some(up) = c.upload.take() {
                up.recv
                    .lock()
                    .expect("recv lock")
                    .fail(BodyError::ClientClosed);
                c.keep_alive = false;
            }
        }
    }

    /// Parses the head at the front of the read buffer and starts its request; true if one
    /// started or was refused.
    fn start(&mut self) -> bool {
        let limits = self.limits;
        let wire_limits = fluxgate_wire::h1::request::Limits {
            max_head: limits.max_head,
            max_headers: limits.max_headers,
        };
        match fluxgate_wire::h1::request::parse(&mut self.rbuf, wire_limits, &mut self.spans) {
            Ok(None) if self.rbuf.len() > limits.max_head => {
                let why = fluxgate_wire::h1::request::too_large(&self.rbuf, limits.max_head);
                self.refuse(why.into());
                true
            }
            Ok(None) => false,
            Err(why) => {
                self.refuse(why.into());
                true
            }
            Ok(Some(head)) => {
                self.begin(head);
                true
            }
        }
    }

    fn begin(&mut self, head: RequestHead) {
        let RequestHead { req, framing } = head;
        let http10 = req.version() == Version::HTTP_10;
        let headers = req.headers();
        let keep_alive = if http10 {
            connection_has(headers, "keep-alive")
        } else {
            !connection_has(headers, "close")
        };
        let expect = !http10
            && framing.is_some()
            && headers
                .get(header::EXPECT)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        let upload = framing.map(|framing| Upload {
            recv: Arc::new(Mutex::new(Recv::new(match framing {
                RequestFraming::Length(n) => Some(n),
                RequestFraming::Chunked(_) => None,
            }))),
            framing,
            started: self.state.head_started(),
        });
        let body = match &upload {
            Some(u) => ClientBody::Stream(RecvBody {
                recv: Arc::clone(&u.recv),
                credit: Credit::H1(RECV_HIGH / 2),
            }),
            None => ClientBody::Empty,
        };
        let is_head = req.method() == Method::HEAD;
        let inflight = self.state.begin_request();
        let out = ResponseState::Waiting(self.svc.call(req.map(|()| body), inflight));
        self.cur = Some(Current {
            out,
            upload,
            head: is_head,
            http10,
            keep_alive,
            expect,
        });
    }

    /// Answers the refusal here and closes after it: the connection is out of step.
    fn refuse(&mut self, why: Refusal) {
        let resp = self.svc.refuse(why, self.state.begin_request());
        self.cur = Some(Current {
            out: ResponseState::Waiting(Reply::Ready(Some(Box::new(resp)))),
            upload: None,
            head: false,
            http10: false,
            keep_alive: false,
            expect: false,
        });
        self.closing = true;
    }

    /// Moves request body bytes from the read buffer into the body's queue; true if any
    /// moved, the body ended, or a 100 Continue was written.
    fn feed(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(c) = &mut self.cur else {
            return false;
        };
        let Some(up) = &mut c.upload else {
            return false;
        };
        let mut r = up.recv.lock().expect("recv lock");
        let mut progress = false;
        if c.expect && r.asked && matches!(c.out, ResponseState::Waiting(_)) {
            // The reader wants the body before any answer is ready: invite it.
            self.wbuf
                .extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
            c.expect = false;
            progress = true;
        }
        let mut failed = None;
        while r.dropped || r.queued < RECV_HIGH {
            let data = match &mut up.framing {
                RequestFraming::Length(0) => break,
                RequestFraming::Length(left) => {
                    if self.rbuf.is_empty() {
                        break;
                    }
                    let n = (*left).min(self.rbuf.len() as u64) as usize;
                    *left -= n as u64;
                    self.rbuf.split_to(n).freeze()
                }
                RequestFraming::Chunked(state) => match decode_chunk(state, &mut self.rbuf) {
                    Ok(Some(data)) => data,
                    Ok(None) => break,
                    Err(why) => {
                        failed = Some(why);
                        break;
                    }
                },
            };
            r.received += data.len() as u64;
            r.push(data);
            progress = true;
        }
        let ended = match up.framing {
            RequestFraming::Length(left) => left == 0,
            RequestFraming::Chunked(state) => state.ended(),
        };
        // Waiting on the client for more of the body, with room for it: it has the body
        // timeout to send some.
        let waiting = !ended && failed.is_none() && !self.eof && !r.dropped && r.queued < RECV_HIGH;
        let limit = self.state.body_timeout;
        let deadline = waiting
            .then(|| self.state.body_deadline(up.started, r.received))
            .flatten();
        let stalled = self
            .body_watch
            .stalled(usize::from(waiting), progress, limit, cx)
            | self.body_deadline.passed(deadline, cx);
        if let Some(why) = failed {
            // The rest of the connection cannot be told apart from this body.
            r.fail(BodyError::Framing(why));
            c.keep_alive = false;
            self.eof = true;
        } else if stalled {
            r.fail(BodyError::IdleTimeout);
            c.keep_alive = false;
            self.eof = true;
        } else if ended {
            r.end = true;
        } else {
            if !r.producer.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                r.producer = Some(cx.waker().clone());
            }
            if progress {
                r.wake();
            }
            return progress;
        }
        r.wake();
        drop(r);
        c.upload = None;
        self.body_watch = StallWatch::default();
        self.body_deadline = LateDeadline::default();
        true
    }

    /// Writes the response as far as it is ready; true if anything was written.
    fn respond(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(c) = &mut self.cur else {
            return false;
        };
        let mut progress = false;
        loop {
            match &mut c.out {
                ResponseState::Waiting(reply) => match Pin::new(reply).poll(cx) {
                    Poll::Pending => return progress,
                    Poll::Ready(resp) => {
                        let keep = c.keep_alive && !self.closing;
                        let (out, keep) = write_head(
                            &mut self.wbuf,
                            &mut self.tunnel,
                            c,
                            resp,
                            keep,
                            &self.state,
                        );
                        c.out = out;
                        c.keep_alive = keep;
                        progress = true;
                    }
                },
                ResponseState::Body { body, chunked } => {
                    if self.wbuf.len() - self.written >= WRITE_HIGH {
                        return progress;
                    }
                    match Pin::new(&mut *body).poll_frame(cx) {
                        Poll::Pending => return progress,
                        Poll::Ready(None) => {
                            if *chunked {
                                self.wbuf.extend_from_slice(b"0\r\n\r\n");
                            }
                            c.out = ResponseState::Done;
                        }
                        Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                            Ok(data) if data.is_empty() => {}
                            Ok(data) => {
                                if *chunked {
                                    put_chunk_size(&mut self.wbuf, data.len());
                                    self.wbuf.extend_from_slice(&data);
                                    self.wbuf.extend_from_slice(b"\r\n");
                                } else {
                                    self.wbuf.extend_from_slice(&data);
                                }
                            }
                            Err(frame) => {
                                if let (true, Ok(trailers)) = (*chunked, frame.into_trailers()) {
                                    self.wbuf.extend_from_slice(b"0\r\n");
                                    put_fields(&mut self.wbuf, &trailers);
                                    self.wbuf.extend_from_slice(b"\r\n");
                                    c.out = ResponseState::Done;
                                }
                            }
                        },
                        Poll::Ready(Some(Err(_))) => {
                            // The upstream broke off mid-body: closing without the end of
                            // the body tells the client it did not get the whole.
                            c.keep_alive = false;
                            c.out = ResponseState::Done;
                        }
                    }
                    progress = true;
                }
                ResponseState::Done => return progress,
            }
        }
    }
}

/// Writes the response head of request `c`; returns where the response goes next and whether
/// the connection stays open after it. A 101 answer hands over its upstream for the tunnel.
fn write_head<S: Service>(
    w: &mut Vec<u8>,
    tunnel: &mut Option<Upgraded<S>>,
    c: &Current<S>,
    resp: Response<S::Body>,
    keep: bool,
    state: &ConnState,
) -> (ResponseState<S>, bool) {
    use std::io::Write;
    let (parts, mut body) = resp.into_parts();
    let status = parts.status;
    let headers = &parts.headers;
    let mut keep = keep && !connection_has(headers, "close");
    put_status_line(w, status);
    put_fields(w, headers);
    if !headers.contains_key(header::DATE) {
        put_fields(w, [(&header::DATE, &http_date())]);
    }
    if let Some(v) = state
        .alt_svc
        .as_ref()
        .filter(|_| !headers.contains_key(header::ALT_SVC))
    {
        put_fields(w, [(&header::ALT_SVC, v)]);
    }
    let bodiless = c.head
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let mut chunked = false;
    if !bodiless && !headers.contains_key(header::CONTENT_LENGTH) {
        match body.size_hint().exact() {
            Some(n) => {
                let _ = write!(w, "content-length: {n}\r\n");
            }
            None if c.http10 => keep = false,
            None => {
                w.extend_from_slice(b"transfer-encoding: chunked\r\n");
                chunked = true;
            }
        }
    }
    if status == StatusCode::SWITCHING_PROTOCOLS {
        *tunnel = body.take_upgrade();
        keep = tunnel.is_some();
    } else if !keep && !connection_has(headers, "close") {
        w.extend_from_slice(b"connection: close\r\n");
    } else if keep && c.http10 {
        w.extend_from_slice(b"connection: keep-alive\r\n");
    }
    w.extend_from_slice(b"\r\n");
    let out = if bodiless || body.is_end_stream() {
        ResponseState::Done
    } else {
        ResponseState::Body { body, chunked }
    };
    (out, keep)
}

fn put_chunk_size(w: &mut Vec<u8>, n: usize) {
    use std::io::Write;
    let _ = write!(w, "{n:x}\r\n");
}
