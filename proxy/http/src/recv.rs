//! A request body as a client connection receives it: a queue the connection fills (our
//! HTTP/1.1 server from the socket, our HTTP/2 server from DATA frames) and the upstream side
//! drains. The connection stops taking bytes from the client while the queue is full, so a
//! slow upstream slows the client rather than filling our memory.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use crate::BoxError;

/// Why a request body ended before it was whole; the reader gets it as the body's error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// The client closed the connection before the body ended.
    #[error("client closed before the body ended")]
    ClientClosed,
    /// The client reset the stream (HTTP/2 RST_STREAM).
    #[error("client reset the stream")]
    ClientReset,
    /// The server reset the stream with this HTTP/2 error code.
    #[error("stream reset with error code {0}")]
    StreamReset(u32),
    /// The client sent no body bytes for `body_timeout`.
    #[error("no request body bytes for the body timeout")]
    IdleTimeout,
    /// The body passed the route's `max_body`.
    #[error("request body larger than {0} bytes")]
    TooLarge(u64),
    /// The body's chunked coding or length is broken.
    #[error("bad request body framing: {0}")]
    Framing(#[from] fluxgate_wire::h1::FieldError),
}

/// The shared state of one request body.
pub struct Recv {
    pub queue: VecDeque<Bytes>,
    pub queued: usize,
    pub trailers: Option<HeaderMap>,
    pub end: bool,
    /// Why the body failed (the stream was reset, the client left); the reader gets it as
    /// an error.
    pub failed: Option<BodyError>,
    pub reader: Option<Waker>,
    /// The reader is gone: further data is dropped at once.
    pub dropped: bool,
    /// The reader has asked for data it did not have yet (HTTP/1.1: time for a 100 Continue).
    pub asked: bool,
    /// HTTP/2: read since the stream's window was last widened.
    pub consumed: usize,
    /// Content-Length, if declared, and what arrived so far.
    pub declared: Option<u64>,
    pub received: u64,
    /// The most bytes the reader takes (a route's `max_body`); past it the body fails.
    pub limit: Option<u64>,
    /// HTTP/1.1: the connection, waiting for room in the queue or for the reader to ask.
    pub producer: Option<Waker>,
}

impl Recv {
    /// A body the client is about to send, `declared` its Content-Length if any.
    pub fn new(declared: Option<u64>) -> Recv {
        Recv {
            queue: VecDeque::new(),
            queued: 0,
            trailers: None,
            end: false,
            failed: None,
            reader: None,
            dropped: false,
            asked: false,
            consumed: 0,
            declared,
            received: 0,
            limit: None,
            producer: None,
        }
    }

    /// Something changed for the reader: more data, the end, or a failure.
    pub fn wake(&mut self) {
        if let Some(w) = self.reader.take() {
            w.wake();
        }
    }

    pub fn fail(&mut self, why: BodyError) {
        self.failed = Some(why);
        self.wake();
    }

    /// Queues body bytes for the reader (dropped if it is gone).
    pub fn push(&mut self, data: Bytes) {
        if !self.dropped && !data.is_empty() {
            self.queued += data.len();
            self.queue.push_back(data);
        }
    }

    fn wake_producer(&mut self) {
        if let Some(w) = self.producer.take() {
            w.wake();
        }
    }
}

/// How a connection learns that its reader took bytes.
pub enum Credit {
    /// HTTP/1.1: the connection reads on once the queue is below this.
    H1(usize),
    /// HTTP/2 (and later HTTP/3): flow-control credit for the stream and the connection.
    H2(WindowCredit),
}

/// A multiplexed connection that takes back the window its streams' readers free.
pub trait WindowRelease: Send + Sync {
    /// `n` bytes were read (or dropped unread) by a stream's reader.
    fn release(&self, n: usize);
}

/// What a stream's body reader gives back as it reads: connection credit, and a wake of the
/// stream once enough was read to widen its window.
pub struct WindowCredit {
    pub conn: Arc<dyn WindowRelease>,
    pub stream: Waker,
    /// Read this much since the last widening, the stream's window is worth widening.
    pub widen_at: usize,
}

impl WindowCredit {
    fn widens(&self, consumed: usize) -> bool {
        consumed >= self.widen_at
    }

    fn took(&self, n: usize, widen: bool) {
        self.conn.release(n);
        if widen {
            self.stream.wake_by_ref();
        }
    }
}

/// The reading end of a request body, handed to the proxy inside the request.
pub struct RecvBody {
    pub recv: Arc<Mutex<Recv>>,
    pub credit: Credit,
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
        if let Some(max) = r.limit.filter(|&max| r.received > max) {
            return Poll::Ready(Some(Err(Box::new(BodyError::TooLarge(max)))));
        }
        if let Some(data) = r.queue.pop_front() {
            r.queued -= data.len();
            match &this.credit {
                Credit::H1(low) => {
                    if r.queued < *low {
                        r.wake_producer();
                    }
                }
                Credit::H2(c) => {
                    r.consumed += data.len();
                    let widen = !r.end && c.widens(r.consumed);
                    drop(r);
                    c.took(data.len(), widen);
                }
            }
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if let Some(why) = r.failed {
            return Poll::Ready(Some(Err(Box::new(why))));
        }
        if let Some(t) = r.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(t))));
        }
        if r.end {
            return Poll::Ready(None);
        }
        r.reader = Some(cx.waker().clone());
        if !r.asked {
            r.asked = true;
            r.wake_producer();
        }
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
        match &self.credit {
            Credit::H1(_) => r.wake_producer(),
            Credit::H2(c) => {
                drop(r);
                c.took(unread, false);
            }
        }
    }
}
