//! The HTTP/3 server side (RFC 9114) over a QUIC connection quinn accepted: the h3 crate
//! frames and QPACK-decodes, and each request goes through the same service as HTTP/1.1 and
//! HTTP/2. One local task per request: its body is fed from the QUIC stream into the same
//! queue the other servers fill (QUIC flow control holds the client while the queue is
//! full), and its response streams back frame by frame.

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::task::Poll;

use bytes::{Buf, Bytes};
use h3::error::Code;
use h3::server::RequestStream;
use http::{Request, Response};
use http_body::Body;
use tokio::sync::watch;

use crate::body::ClientBody;
use crate::conn::{ConnState, HeadLimits};
use crate::headers::http_date;
use crate::recv::{BodyError, Credit, Recv, RecvBody};
use crate::service::{Reply, Service};

/// How long a draining connection waits, once its requests are answered, for the client to
/// acknowledge the answers (four round trips, within these bounds).
const LINGER_MIN: std::time::Duration = std::time::Duration::from_millis(100);
const LINGER_MAX: std::time::Duration = std::time::Duration::from_secs(1);

/// A request body queued past this much stops being read from the stream.
const RECV_HIGH: usize = 256 * 1024;

type SendHalf = RequestStream<h3_quinn::SendStream<Bytes>, Bytes>;
type RecvHalf = RequestStream<h3_quinn::RecvStream, Bytes>;

/// Whether a connection's handshake has completed, for a connection taken before it did
/// (0-RTT): a request whose head came before is early data, which an attacker may replay.
#[derive(Clone, Default)]
pub struct Handshake {
    done: Rc<std::cell::Cell<bool>>,
    notify: Rc<tokio::sync::Notify>,
}

impl Handshake {
    /// The handshake completed: requests waiting for it go on.
    pub fn complete(&self) {
        self.done.set(true);
        self.notify.notify_waiters();
    }

    fn is_done(&self) -> bool {
        self.done.get()
    }

    async fn wait(&self) {
        while !self.done.get() {
            let notified = self.notify.notified();
            if self.done.get() {
                return;
            }
            notified.await;
        }
    }
}

/// What a connection served, for the metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct Served {
    pub requests: u64,
    /// 0-RTT requests forwarded before the handshake, and held until it.
    pub early_forwarded: u64,
    pub early_held: u64,
}

/// Serves one QUIC connection's requests until it ends. On drain it sends GOAWAY and lets
/// the requests it took finish. `handshake` is given for a connection taken before its
/// handshake completed (0-RTT): early safe requests without a body go on with
/// `Early-Data: 1` (RFC 8470), any other early request waits for the handshake, so a
/// replayed first flight, which cannot complete one, never has it acted on.
pub async fn serve<S: Service>(
    conn: quinn::Connection,
    state: Arc<ConnState>,
    svc: Rc<S>,
    mut draining: watch::Receiver<bool>,
    limits: HeadLimits,
    handshake: Option<Handshake>,
) -> Served {
    // No GREASE frames: aioquic 1.x drops a stream's end that follows one.
    let built = h3::server::builder()
        .max_field_section_size(limits.max_head as u64)
        .send_grease(false)
        .build::<_, Bytes>(h3_quinn::Connection::new(conn.clone()))
        .await;
    let Ok(mut h3) = built else {
        return Served::default();
    };
    let served = Rc::new(std::cell::Cell::new(Served::default()));
    // The request loop; returning from it closes the connection (when `h3` drops).
    let serve_requests = async {
        // Requests in their tasks: the connection (closed when `h3` drops) outlives them.
        let open = Open::default();
        let mut shutting = false;
        loop {
            let next = tokio::select! {
                biased;
                _ = draining.wait_for(|d| *d), if !shutting => {
                    // GOAWAY naming the first stream not taken (RFC 9114 5.2); then on until
                    // what was taken is answered.
                    shutting = true;
                    if h3.shutdown(1).await.is_err() {
                        return;
                    }
                    continue;
                }
                _ = open.none(), if shutting => {
                    // Answered, but maybe not yet delivered: closing now would throw away what
                    // the client has not acknowledged. It may close first; else a few round
                    // trips (at most a second) go by before the close.
                    let linger = (conn.rtt() * 4).clamp(LINGER_MIN, LINGER_MAX);
                    let _ = tokio::time::timeout(linger, conn.closed()).await;
                    return;
                }
                next = h3.accept() => next,
            };
            let resolver = match next {
                Ok(Some(r)) => r,
                // The client closed, or broke the connection's rules (h3 closed it with the
                // code they call for).
                Ok(None) | Err(_) => return,
            };
            let state = Arc::clone(&state);
            let svc = Rc::clone(&svc);
            let handshake = handshake.clone();
            let taken = open.take();
            let served = Rc::clone(&served);
            tokio::task::spawn_local(async move {
                let _taken = taken;
                let count = |f: fn(&mut Served)| {
                    let mut s = served.get();
                    f(&mut s);
                    served.set(s);
                };
                count(|s| s.requests += 1);
                // A malformed head resets its stream (h3 answers it) and reaches no one.
                let Ok((mut req, mut stream)) = resolver.resolve_request().await else {
                    return;
                };
                if malformed(&req) {
                    // What h3 lets pass but RFC 9114 4.2 calls malformed.
                    svc.reset(crate::service::Refusal::MalformedStream, &state);
                    stream.stop_sending(Code::H3_MESSAGE_ERROR);
                    stream.stop_stream(Code::H3_MESSAGE_ERROR);
                    return;
                }
                if let Some(h) = handshake.filter(|h| !h.is_done()) {
                    if replay_safe(&req) {
                        count(|s| s.early_forwarded += 1);
                        req.headers_mut().insert(
                            http::HeaderName::from_static("early-data"),
                            http::HeaderValue::from_static("1"),
                        );
                    } else {
                        count(|s| s.early_held += 1);
                        h.wait().await;
                    }
                }
                serve_request(req, stream, &state, &*svc, limits).await;
            });
        }
    };
    serve_requests.await;
    served.get()
}

/// The requests of a connection still in their tasks.
#[derive(Default, Clone)]
struct Open {
    n: Rc<std::cell::Cell<usize>>,
    ended: Rc<tokio::sync::Notify>,
}

/// One request in its task, counted until dropped.
struct Taken(Open);

impl Open {
    fn take(&self) -> Taken {
        self.n.set(self.n.get() + 1);
        Taken(self.clone())
    }

    /// Resolves once no request is open.
    async fn none(&self) {
        while self.n.get() > 0 {
            let ended = self.ended.notified();
            if self.n.get() == 0 {
                return;
            }
            ended.await;
        }
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        self.0.n.set(self.0.n.get() - 1);
        self.0.ended.notify_waiters();
    }
}

/// A request head with a connection-specific field, or TE other than "trailers" (RFC 9114
/// 4.2); h3 checks the rest (pseudo-fields, upper-case names).
fn malformed(req: &Request<()>) -> bool {
    req.headers().iter().any(|(name, value)| {
        fluxgate_wire::h2::hpack::connection_specific(name)
            || (name == http::header::TE && value != "trailers")
    })
}

/// An early request that may go before the handshake: a safe method and no body.
fn replay_safe(req: &Request<()>) -> bool {
    use http::Method;
    matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS)
        && !req.headers().contains_key(http::header::CONTENT_LENGTH)
        && !req.headers().contains_key(http::header::TRANSFER_ENCODING)
}

async fn serve_request<S: Service>(
    req: Request<()>,
    stream: RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>,
    state: &Arc<ConnState>,
    svc: &S,
    limits: HeadLimits,
) {
    let (mut send, mut recv) = stream.split();
    let inflight = state.begin_request();
    let (parts, ()) = req.into_parts();
    let declared = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    // A stream that ended with its head (a GET, mostly: the FIN came with HEADERS) is a
    // request without a body, and goes upstream as one; else its body streams.
    let mut data_done = false;
    let mut first = None;
    match std::future::poll_fn(|cx| Poll::Ready(recv.poll_recv_data(cx))).await {
        Poll::Ready(Ok(None)) => data_done = true,
        Poll::Ready(Ok(Some(mut data))) => first = Some(data.copy_to_bytes(data.remaining())),
        Poll::Ready(Err(_)) | Poll::Pending => {}
    }
    let bodiless = data_done
        && declared.is_none_or(|n| n == 0)
        && matches!(
            std::future::poll_fn(|cx| Poll::Ready(recv.poll_recv_trailers(cx))).await,
            Poll::Ready(Ok(None))
        );
    // The queue a body streams through; none for a request without one.
    let queue = (!bodiless).then(|| {
        let mut r = Recv::new(declared);
        if let Some(data) = first {
            r.received += data.len() as u64;
            r.push(data);
        }
        Arc::new(Mutex::new(r))
    });
    let body = match &queue {
        None => ClientBody::Empty,
        Some(q) => ClientBody::Stream(RecvBody {
            recv: Arc::clone(q),
            credit: Credit::H1(RECV_HIGH / 2),
        }),
    };
    let fields = parts.headers.len();
    let reply = if fields > limits.max_headers {
        Reply::Ready(Some(Box::new(
            svc.refuse(crate::service::Refusal::TooManyFields, inflight),
        )))
    } else {
        svc.call(Request::from_parts(parts, body), inflight)
    };
    let respond = async {
        let resp = match reply {
            Reply::Ready(Some(resp)) => *resp,
            Reply::Ready(None) => return,
            Reply::Later(f) => f.await,
        };
        respond(&mut send, resp).await;
    };
    let Some(queue) = queue else {
        respond.await;
        return;
    };
    // The body is fed while the response is worked on; the response may end first.
    let feed = feed(recv, &queue, data_done);
    tokio::pin!(feed);
    tokio::pin!(respond);
    let mut fed = false;
    std::future::poll_fn(|cx| {
        if !fed && feed.as_mut().poll(cx).is_ready() {
            fed = true;
        }
        respond.as_mut().poll(cx)
    })
    .await;
    // Whatever of the body nobody read is refused (STOP_SENDING when dropped).
    queue.lock().expect("recv lock").dropped = true;
}

/// Sends the response: head (with Date), data, trailers, the stream's end. A body that
/// fails upstream resets the stream: the client must not take a part for the whole.
async fn respond<B: Body<Data = Bytes> + Unpin>(send: &mut SendHalf, resp: Response<B>) {
    let (mut parts, mut body) = resp.into_parts();
    if !parts.headers.contains_key(http::header::DATE) {
        parts.headers.insert(http::header::DATE, http_date());
    }
    // HTTP/3 forbids the connection-specific fields (RFC 9114 4.2).
    crate::headers::strip_hop_by_hop(&mut parts.headers);
    parts.version = http::Version::HTTP_3;
    if send
        .send_response(Response::from_parts(parts, ()))
        .await
        .is_err()
    {
        return;
    }
    loop {
        let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        match frame {
            None => break,
            Some(Ok(f)) => match f.into_data() {
                Ok(data) => {
                    if !data.is_empty() && send.send_data(data).await.is_err() {
                        return;
                    }
                }
                Err(f) => {
                    if let Ok(t) = f.into_trailers() {
                        if send.send_trailers(t).await.is_err() {
                            return;
                        }
                    }
                }
            },
            Some(Err(_)) => {
                send.stop_stream(Code::H3_INTERNAL_ERROR);
                return;
            }
        }
    }
    let _ = send.finish().await;
}

/// The request's DATA has ended: checks its length, takes the trailers, ends the body.
async fn finish_body(recv: &mut RecvHalf, queue: &Arc<Mutex<Recv>>) {
    let short = {
        let r = queue.lock().expect("recv lock");
        r.declared.is_some_and(|n| r.received != n)
    };
    let trailers = match short {
        true => None,
        false => recv.recv_trailers().await.ok().flatten(),
    };
    let mut r = queue.lock().expect("recv lock");
    if short {
        // Shorter than its Content-Length (RFC 9114 4.1.2).
        r.fail(BodyError::StreamReset(Code::H3_MESSAGE_ERROR.value() as u32));
    } else {
        r.trailers = trailers;
        r.end = true;
        r.wake();
    }
}

/// Moves the request body from the stream into its queue, holding off while the queue is
/// full (QUIC flow control then holds the client), until the body ends, fails, or its
/// reader is gone.
async fn feed(mut recv: RecvHalf, queue: &Arc<Mutex<Recv>>, data_done: bool) {
    if data_done {
        // Only trailers may still come.
        finish_body(&mut recv, queue).await;
        return;
    }
    loop {
        let room = std::future::poll_fn(|cx| {
            let mut r = queue.lock().expect("recv lock");
            if r.dropped {
                Poll::Ready(false)
            } else if r.queued < RECV_HIGH {
                Poll::Ready(true)
            } else {
                r.producer = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await;
        if !room {
            recv.stop_sending(Code::H3_NO_ERROR);
            return;
        }
        let message_error = BodyError::StreamReset(Code::H3_MESSAGE_ERROR.value() as u32);
        match recv.recv_data().await {
            Ok(Some(mut data)) => {
                let data = data.copy_to_bytes(data.remaining());
                let mut r = queue.lock().expect("recv lock");
                r.received += data.len() as u64;
                if r.declared.is_some_and(|n| r.received > n) {
                    // Longer than its Content-Length (RFC 9114 4.1.2).
                    r.fail(message_error);
                    drop(r);
                    recv.stop_sending(Code::H3_MESSAGE_ERROR);
                    return;
                }
                r.push(data);
                r.wake();
            }
            Ok(None) => {
                finish_body(&mut recv, queue).await;
                return;
            }
            Err(_) => {
                queue
                    .lock()
                    .expect("recv lock")
                    .fail(BodyError::ClientReset);
                return;
            }
        }
    }
}
