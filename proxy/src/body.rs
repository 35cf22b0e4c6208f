//! Body types at both edges of the proxy. Bodies are streamed frame by frame, never
//! collected; the upstream connection goes back to its pool only once the response body has
//! been read to the end.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::accesslog::Pending;
use crate::conn::InFlight;
use crate::pool::Checkout;

/// The body sent upstream: the client's own stream, or nothing (on a retry of a bodiless
/// request, whose original body was consumed by the failed attempt).
pub(crate) enum UpBody {
    Client(Incoming),
    Empty,
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            UpBody::Client(b) => Pin::new(b).poll_frame(cx),
            UpBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpBody::Client(b) => b.is_end_stream(),
            UpBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpBody::Client(b) => b.size_hint(),
            UpBody::Empty => SizeHint::with_exact(0),
        }
    }
}

/// The body sent to the client.
pub struct ProxyBody {
    inner: Inner,
    // Marks the request as in flight on its client connection until hyper drops the body.
    _inflight: InFlight,
    /// The access log line to write when the body ends, counting the bytes sent.
    log: Option<Box<Pending>>,
}

enum Inner {
    Upstream {
        body: Incoming,
        conn: Option<Checkout>,
    },
    Full(Option<Bytes>),
}

impl ProxyBody {
    pub(crate) fn full(bytes: Bytes, inflight: InFlight) -> ProxyBody {
        ProxyBody {
            inner: Inner::Full((!bytes.is_empty()).then_some(bytes)),
            _inflight: inflight,
            log: None,
        }
    }

    /// Streams an upstream response; `conn` returns to its pool when the body ends.
    pub(crate) fn upstream(body: Incoming, conn: Option<Checkout>, inflight: InFlight) -> Self {
        let mut conn = conn;
        if body.is_end_stream() {
            // HEAD, 204, 304 and empty bodies: hyper may never poll us, so release now.
            if let Some(c) = conn.take() {
                c.release();
            }
        }
        ProxyBody {
            inner: Inner::Upstream { body, conn },
            _inflight: inflight,
            log: None,
        }
    }

    /// Logs the request when this body is done (or dropped).
    pub(crate) fn attach_log(&mut self, pending: Box<Pending>) {
        self.log = Some(pending);
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        if let Some(p) = self.log.take() {
            p.finish();
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = this.poll_inner(cx);
        if let (Some(log), Poll::Ready(Some(Ok(frame)))) = (&mut this.log, &polled) {
            log.bytes += frame.data_ref().map_or(0, |d| d.len() as u64);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Full(b) => b.is_none(),
            Inner::Upstream { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Inner::Upstream { body, .. } => body.size_hint(),
        }
    }
}

impl ProxyBody {
    fn poll_inner(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match &mut self.inner {
            Inner::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Inner::Upstream { body, conn } => {
                let polled = Pin::new(&mut *body).poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Ok(_))) if body.is_end_stream() => {
                        if let Some(c) = conn.take() {
                            c.release();
                        }
                    }
                    Poll::Ready(None) => {
                        if let Some(c) = conn.take() {
                            c.release();
                        }
                    }
                    // An upstream body error drops the connection with the Checkout.
                    Poll::Ready(Some(Err(_))) => drop(conn.take()),
                    _ => {}
                }
                polled
            }
        }
    }
}
