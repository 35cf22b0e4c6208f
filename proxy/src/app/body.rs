//! The response body the gateway streams to the client, from an upstream or made here.
//! Bodies are streamed frame by frame, never collected; an HTTP/1.1 upstream connection goes
//! back to its pool only once the response body has been read to the end (see
//! `upstream::h1`).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::error::BoxError;
use crate::telemetry::accesslog::Pending;
use crate::upstream::h1::H1Body;
use crate::upstream::pool::H1Conn;
use crate::upstream::send::UpstreamBody;
use fluxgate_http::conn::InFlight;

/// The body sent to the client.
pub struct ProxyBody {
    inner: Inner,
    // Marks the request as in flight on its client connection until the server drops the body.
    _inflight: InFlight,
    /// The access log line to write when the body ends, counting the bytes sent.
    log: Option<Box<Pending>>,
}

// H1 is the common case; boxing it would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
enum Inner {
    H1(H1Body),
    H2(Incoming),
    H3(crate::upstream::send::H3Body),
    Full(Option<Bytes>),
    /// The empty body of a 101 answer, carrying the upstream connection the client's joins.
    Tunnel(Option<H1Conn>),
}

impl ProxyBody {
    pub(crate) fn full(bytes: Bytes, inflight: InFlight) -> ProxyBody {
        ProxyBody {
            inner: Inner::Full((!bytes.is_empty()).then_some(bytes)),
            _inflight: inflight,
            log: None,
        }
    }

    /// Streams an upstream response.
    pub(crate) fn upstream(body: UpstreamBody, inflight: InFlight) -> Self {
        ProxyBody {
            inner: match body {
                UpstreamBody::H1(b) => Inner::H1(b),
                UpstreamBody::H2(b) => Inner::H2(b),
                UpstreamBody::H3(b) => Inner::H3(b),
            },
            _inflight: inflight,
            log: None,
        }
    }

    /// The body of a 101 answer: none, but the upstream connection for the tunnel.
    pub(crate) fn tunnel(up: H1Conn, inflight: InFlight) -> Self {
        ProxyBody {
            inner: Inner::Tunnel(Some(up)),
            _inflight: inflight,
            log: None,
        }
    }

    /// Logs the request when this body is done (or dropped).
    pub(crate) fn attach_log(&mut self, pending: Box<Pending>) {
        self.log = Some(pending);
    }
}

impl fluxgate_http::service::ResponseBody for ProxyBody {
    type Upgraded = H1Conn;

    /// The upstream connection of a 101 answer (see `tunnel`), with what it sent past the
    /// answer's head.
    fn take_upgrade(&mut self) -> Option<(H1Conn, bytes::BytesMut)> {
        match &mut self.inner {
            Inner::Tunnel(up) => up.take().map(|mut c| {
                let early = c.io.rbuf.split();
                (c, early)
            }),
            _ => None,
        }
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
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
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
            Inner::Tunnel(_) => true,
            Inner::H1(b) => b.is_end_stream(),
            Inner::H2(b) => b.is_end_stream(),
            Inner::H3(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Inner::Tunnel(_) => SizeHint::with_exact(0),
            Inner::H1(b) => b.size_hint(),
            Inner::H2(b) => b.size_hint(),
            Inner::H3(b) => b.size_hint(),
        }
    }
}

impl ProxyBody {
    fn poll_inner(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.inner {
            Inner::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Inner::Tunnel(_) => Poll::Ready(None),
            Inner::H1(b) => Pin::new(b).poll_frame(cx),
            Inner::H2(b) => Pin::new(b)
                .poll_frame(cx)
                .map_err(|e| Box::new(e) as BoxError),
            Inner::H3(b) => Pin::new(b).poll_frame(cx),
        }
    }
}
