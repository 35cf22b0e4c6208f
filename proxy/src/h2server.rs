//! The HTTP/2 side of a client connection, served with the h2 crate directly: every stream
//! runs inside the connection's own task (no task spawned per stream), each woken on its own
//! (see `Streams`), and its response is written as the body yields it, within the client's
//! flow-control window.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use bytes::Bytes;
use h2::server::SendResponse;
use h2::SendStream;
use http::header::{self, HeaderValue};
use http::{Request, Response};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use crate::body::{ClientBody, H2Recv, ProxyBody};
use crate::conn::ConnState;
use crate::headers::strip_hop_by_hop;
use crate::worker::HandlerSlot;

/// Window sizes and buffers as hyper's server had them: the RFC's 64 KiB default windows
/// make a large upload crawl over any real round-trip time.
const WINDOW: u32 = 1024 * 1024;
const MAX_SEND_BUFFER: usize = 400 * 1024;
const MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// The h2 settings of one listener.
pub(crate) fn builder(limits: &fluxgate_conf::HttpLimits) -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(WINDOW)
        .initial_connection_window_size(WINDOW)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
        .max_header_list_size(limits.max_header_bytes as u32)
        .max_concurrent_streams(256);
    b
}

/// Serves one HTTP/2 connection to its end. When the worker drains, the client gets GOAWAY
/// and the open streams finish.
pub(crate) async fn serve<T>(
    builder: &h2::server::Builder,
    io: T,
    state: &Arc<ConnState>,
    handler: &HandlerSlot,
    draining: &mut watch::Receiver<bool>,
) where
    T: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let drain = draining.wait_for(|d| *d);
    tokio::pin!(drain);
    let mut shutting_down = false;
    let mut conn = tokio::select! {
        biased;
        _ = drain.as_mut() => return,
        c = builder.handshake::<T, Bytes>(io) => match c {
            Ok(c) => c,
            Err(_) => return,
        },
    };
    let mut streams = Streams::new();
    poll_fn(|cx| {
        if !shutting_down && drain.as_mut().poll(cx).is_ready() {
            conn.graceful_shutdown();
            shutting_down = true;
        }
        loop {
            streams.poll(cx);
            // Accepting also drives the connection: it reads frames and writes what the
            // streams queued.
            match conn.poll_accept(cx) {
                Poll::Ready(Some(Ok((req, respond)))) => {
                    let handler = Rc::clone(&handler.borrow());
                    streams.push(Box::pin(stream(handler, req, respond, Arc::clone(state))));
                }
                // A connection error, or the client (or our GOAWAY) closed it.
                Poll::Ready(Some(Err(_)) | None) => return Poll::Ready(()),
                Poll::Pending if streams.has_woken() => {}
                Poll::Pending => return Poll::Pending,
            }
        }
    })
    .await;
}

/// One request stream: the handler's answer, then its body. A reset from the client drops
/// the request (and whatever upstream exchange it had started).
async fn stream(
    handler: Rc<crate::proxy::Handler>,
    req: Request<h2::RecvStream>,
    mut respond: SendResponse<Bytes>,
    state: Arc<ConnState>,
) {
    // Scoped: the handler's state is gone before the body is sent.
    let resp = {
        let (parts, recv) = req.into_parts();
        let len = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok());
        let req = Request::from_parts(parts, ClientBody::H2(H2Recv::new(recv, len)));
        let inflight = state.begin_request();
        let mut answer = std::pin::pin!(handler.handle(req, inflight));
        poll_fn(|cx| {
            if let Poll::Ready(r) = answer.as_mut().poll(cx) {
                return Poll::Ready(Some(r));
            }
            match respond.poll_reset(cx) {
                Poll::Ready(_) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    };
    if let Some(resp) = resp {
        send(respond, resp).await;
    }
}

/// Writes a response: the head, then the body frame by frame as send capacity allows.
async fn send(mut respond: SendResponse<Bytes>, resp: Response<ProxyBody>) {
    let (mut parts, mut body) = resp.into_parts();
    // HTTP/2 has no connection-specific headers (a gateway answer may carry `close`).
    strip_hop_by_hop(&mut parts.headers);
    if !parts.headers.contains_key(header::DATE) {
        parts.headers.insert(header::DATE, date_now());
    }
    let end = body.is_end_stream();
    if !end {
        if let Some(n) = body.size_hint().exact() {
            parts
                .headers
                .entry(header::CONTENT_LENGTH)
                .or_insert_with(|| HeaderValue::from(n));
        }
    }
    let Ok(mut tx) = respond.send_response(Response::from_parts(parts, ()), end) else {
        return;
    };
    if end {
        return;
    }
    let mut body = Pin::new(&mut body);
    // A chunk waiting for send capacity.
    let mut held: Option<(Bytes, bool)> = None;
    let done = poll_fn(|cx| pump(cx, &mut tx, body.as_mut(), &mut held)).await;
    if !done {
        tx.send_reset(h2::Reason::INTERNAL_ERROR);
    }
}

/// Moves the body into the stream; Ready(true) when it all went, Ready(false) when the body
/// failed or the client reset the stream.
fn pump(
    cx: &mut Context<'_>,
    tx: &mut SendStream<Bytes>,
    mut body: Pin<&mut ProxyBody>,
    held: &mut Option<(Bytes, bool)>,
) -> Poll<bool> {
    loop {
        if tx.poll_reset(cx).is_ready() {
            return Poll::Ready(false);
        }
        if let Some((data, eos)) = held.take() {
            // Send what the window allows now; the rest waits for more capacity.
            let mut data = data;
            while tx.capacity() == 0 {
                match tx.poll_capacity(cx) {
                    Poll::Ready(Some(Ok(_))) => {}
                    Poll::Ready(Some(Err(_)) | None) => return Poll::Ready(false),
                    Poll::Pending => {
                        *held = Some((data, eos));
                        return Poll::Pending;
                    }
                }
            }
            let n = tx.capacity().min(data.len());
            let rest = data.split_off(n);
            let last = rest.is_empty();
            if tx.send_data(data, eos && last).is_err() {
                return Poll::Ready(false);
            }
            if !last {
                tx.reserve_capacity(rest.len());
                *held = Some((rest, eos));
                continue;
            }
            if eos {
                return Poll::Ready(true);
            }
        }
        match body.as_mut().poll_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => return Poll::Ready(tx.send_data(Bytes::new(), true).is_ok()),
            Poll::Ready(Some(Err(_))) => return Poll::Ready(false),
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => {
                    let eos = body.is_end_stream();
                    if data.is_empty() {
                        if tx.send_data(data, eos).is_err() {
                            return Poll::Ready(false);
                        }
                        if eos {
                            return Poll::Ready(true);
                        }
                        continue;
                    }
                    tx.reserve_capacity(data.len());
                    *held = Some((data, eos));
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        tx.reserve_capacity(0);
                        return Poll::Ready(tx.send_trailers(trailers).is_ok());
                    }
                }
            },
        }
    }
}

/// The Date header value for now, formatted once a second per thread.
fn date_now() -> HeaderValue {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static CACHED: RefCell<(u64, Option<HeaderValue>)> = const { RefCell::new((0, None)) };
    }
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHED.with_borrow_mut(|(at, value)| match value {
        Some(v) if *at == secs => v.clone(),
        _ => {
            let v = HeaderValue::from_str(&httpdate::fmt_http_date(now))
                .expect("an HTTP date is a valid header value");
            *at = secs;
            *value = Some(v.clone());
            v
        }
    })
}

type StreamFuture = Pin<Box<dyn Future<Output = ()>>>;

/// The streams of one connection, polled inside the connection's task. Each slot has its own
/// waker, so a wake-up polls only the streams that were woken, not all of them.
struct Streams {
    slots: Vec<Option<StreamFuture>>,
    wakers: Vec<Waker>,
    free: Vec<usize>,
    woken: Arc<Woken>,
    /// Reused between polls: the slots to poll this time.
    batch: Vec<usize>,
}

#[derive(Default)]
struct Woken {
    inner: Mutex<WokenInner>,
}

#[derive(Default)]
struct WokenInner {
    slots: Vec<usize>,
    /// The connection task's waker.
    task: Option<Waker>,
}

struct SlotWaker {
    slot: usize,
    woken: Arc<Woken>,
}

impl Wake for SlotWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let task = {
            let mut w = self.woken.inner.lock().expect("woken lock");
            if !w.slots.contains(&self.slot) {
                w.slots.push(self.slot);
            }
            w.task.clone()
        };
        if let Some(t) = task {
            t.wake();
        }
    }
}

impl Streams {
    fn new() -> Streams {
        Streams {
            slots: Vec::new(),
            wakers: Vec::new(),
            free: Vec::new(),
            woken: Arc::default(),
            batch: Vec::new(),
        }
    }

    fn push(&mut self, fut: StreamFuture) {
        let slot = match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(fut);
                i
            }
            None => {
                self.slots.push(Some(fut));
                let slot = self.slots.len() - 1;
                self.wakers.push(Waker::from(Arc::new(SlotWaker {
                    slot,
                    woken: Arc::clone(&self.woken),
                })));
                slot
            }
        };
        self.woken
            .inner
            .lock()
            .expect("woken lock")
            .slots
            .push(slot);
    }

    fn has_woken(&self) -> bool {
        !self
            .woken
            .inner
            .lock()
            .expect("woken lock")
            .slots
            .is_empty()
    }

    /// Polls the streams woken since the last call; finished ones free their slot.
    fn poll(&mut self, cx: &mut Context<'_>) {
        {
            let mut w = self.woken.inner.lock().expect("woken lock");
            if !w.task.as_ref().is_some_and(|t| t.will_wake(cx.waker())) {
                w.task = Some(cx.waker().clone());
            }
            std::mem::swap(&mut w.slots, &mut self.batch);
        }
        for i in self.batch.drain(..) {
            let Some(fut) = &mut self.slots[i] else {
                continue;
            };
            let mut scx = Context::from_waker(&self.wakers[i]);
            if fut.as_mut().poll(&mut scx).is_ready() {
                self.slots[i] = None;
                self.free.push(i);
            }
        }
    }
}
