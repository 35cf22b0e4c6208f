//! The response body the gateway streams to the client, from an upstream or made here.
//! Bodies are streamed frame by frame, never collected; an HTTP/1.1 upstream connection goes
//! back to its pool only once the response body has been read to the end (see
//! `upstream::h1`).

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use fluxgate_conf::{FeedRole, InstrumentSet};
use fluxgate_http::stream::ClientStream;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::app::fanout::hub::Resume;
use crate::app::fanout::local::LocalFeed;
use crate::app::fanout::session::{self, FeedBody};
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
    /// The empty body of a 101 answer, carrying what the client's connection becomes.
    Tunnel(Option<Upgrade>),
    /// A feed subscription streamed as the response.
    Feed(Box<FeedBody>),
}

/// What a client's connection becomes after a 101 answer.
pub enum Upgrade {
    /// Joined to the upstream connection that switched protocols.
    Upstream(H1Conn),
    /// A WebSocket feed publisher or subscriber.
    Feed(FeedSocket),
    /// A WebSocket order session.
    Orders(OrderSocket),
}

/// A WebSocket order session: its desk, and the worker's pools its orders go through.
pub struct OrderSocket {
    pub(crate) desk: std::sync::Arc<crate::app::orders::desk::Desk>,
    pub(crate) pools: Rc<[Rc<crate::upstream::pool::UpstreamPool>]>,
}

/// A WebSocket feed connection, as the upgrade request set it up.
pub struct FeedSocket {
    pub(crate) local: Rc<LocalFeed>,
    pub(crate) role: FeedRole,
    /// The subscriber's entitlement.
    pub(crate) allowed: InstrumentSet,
    /// A subscription the request's query made.
    pub(crate) first: Option<(InstrumentSet, Option<Resume>)>,
}

impl fluxgate_http::service::Upgraded for Upgrade {
    fn serve(
        self,
        client: ClientStream,
        from_client: BytesMut,
        splice: bool,
    ) -> Pin<Box<dyn Future<Output = ()>>> {
        match self {
            Upgrade::Upstream(mut up) => {
                let early = up.io.rbuf.split();
                Box::pin(fluxgate_http::stream::tunnel(
                    client,
                    from_client,
                    up,
                    early,
                    splice,
                ))
            }
            Upgrade::Orders(o) => Box::pin(crate::app::orders::session::serve(
                client,
                o.desk,
                o.pools,
                true,
                from_client,
            )),
            Upgrade::Feed(f) => match f.role {
                FeedRole::Publish => Box::pin(session::publish(client, f.local, true, from_client)),
                FeedRole::Subscribe => Box::pin(session::subscribe(
                    client,
                    f.local,
                    true,
                    f.allowed,
                    f.first,
                    from_client,
                )),
            },
        }
    }
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

    /// The body of a 101 answer: none, but what the connection becomes.
    pub(crate) fn tunnel(up: Upgrade, inflight: InFlight) -> Self {
        ProxyBody {
            inner: Inner::Tunnel(Some(up)),
            _inflight: inflight,
            log: None,
        }
    }

    /// A feed subscription as a streaming response.
    pub(crate) fn feed(body: FeedBody, inflight: InFlight) -> Self {
        ProxyBody {
            inner: Inner::Feed(Box::new(body)),
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
    type Upgraded = Upgrade;

    /// What a 101 answer hands the connection to (see `tunnel`).
    fn take_upgrade(&mut self) -> Option<Upgrade> {
        match &mut self.inner {
            Inner::Tunnel(up) => up.take(),
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
            Inner::Feed(_) => false,
            Inner::H1(b) => b.is_end_stream(),
            Inner::H2(b) => b.is_end_stream(),
            Inner::H3(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Inner::Tunnel(_) => SizeHint::with_exact(0),
            Inner::Feed(b) => b.size_hint(),
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
            Inner::Feed(b) => b.poll_frame(cx),
            Inner::H1(b) => Pin::new(b).poll_frame(cx),
            Inner::H2(b) => Pin::new(b)
                .poll_frame(cx)
                .map_err(|e| Box::new(e) as BoxError),
            Inner::H3(b) => Pin::new(b).poll_frame(cx),
        }
    }
}
