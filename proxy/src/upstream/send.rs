//! The upstream side's one way to answer a request: `UpstreamPool::send`, one attempt over
//! HTTP/1.1, h2c or HTTP/3, whose failure carries the facts the retry rule needs (was it sent, was
//! the connection reused, is the whole request still at hand) and the request to send again.

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use h3::client::RequestStream;
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::TrySendError;

use crate::error::{BoxError, ProxyError};
use crate::upstream::h1::{Exchange, H1Body};
use crate::upstream::pool::{Proxied, UpstreamPool};
use fluxgate_http::body::ClientBody;
use fluxgate_policy::retry::AttemptFacts;

/// A request in the form its upstream protocol takes.
pub(crate) enum UpstreamRequest {
    /// The encoded head and the body still to stream (None: no body).
    H1 {
        head: Bytes,
        chunked: bool,
        body: Option<ClientBody>,
        idempotent: bool,
        head_request: bool,
        /// The client's and the address it reached, for an upstream sent the PROXY
        /// protocol: the request goes on a connection of its own.
        proxied: Option<Proxied>,
    },
    /// Boxed: the head is large and HTTP/2 upstreams are the less common case.
    H2(Box<Request<ClientBody>>),
    /// Boxed, as HTTP/2's.
    H3(Box<Request<ClientBody>>),
}

/// A response body as an upstream sends it.
#[allow(clippy::large_enum_variant)]
pub(crate) enum UpstreamBody {
    /// Read by fluxgate's HTTP/1.1 client, which returns the connection to its pool.
    H1(H1Body),
    /// A stream of a shared HTTP/2 connection.
    H2(Incoming),
    /// A stream of a shared HTTP/3 connection.
    H3(H3Body),
}

impl UpstreamBody {
    /// Reads the whole body, keeping its first `max` bytes (the rest is read and dropped, so
    /// an HTTP/1.1 connection goes back to its pool).
    pub(crate) async fn read_up_to(self, max: usize) -> Result<Bytes, BoxError> {
        async fn read<B: Body<Data = Bytes> + Unpin>(
            mut b: B,
            max: usize,
        ) -> Result<Bytes, BoxError>
        where
            B::Error: Into<BoxError>,
        {
            let mut kept = bytes::BytesMut::new();
            while let Some(frame) = b.frame().await {
                if let Ok(data) = frame.map_err(Into::into)?.into_data() {
                    let room = max.saturating_sub(kept.len());
                    kept.extend_from_slice(&data[..data.len().min(room)]);
                }
            }
            Ok(kept.freeze())
        }
        match self {
            UpstreamBody::H1(b) => read(b, max).await,
            UpstreamBody::H2(b) => read(b, max).await,
            UpstreamBody::H3(b) => read(b, max).await,
        }
    }
}

/// A failed attempt: why, its facts, and the request again when it is still whole.
pub(crate) struct Failed {
    pub(crate) error: ProxyError,
    pub(crate) facts: AttemptFacts,
    /// The same request, ready to go again (whether it may is the retry rule's to say).
    pub(crate) again: Option<UpstreamRequest>,
}

impl UpstreamPool {
    /// One attempt: sends `request` to endpoint `ep` (on a new connection when `fresh`) and
    /// waits for the response head within `timeout`.
    pub(crate) async fn send(
        self: &Rc<Self>,
        ep: usize,
        request: UpstreamRequest,
        timeout: Duration,
        fresh: bool,
    ) -> Result<Response<UpstreamBody>, Failed> {
        let (head, chunked, body, idempotent, head_request, proxied) = match request {
            UpstreamRequest::H1 {
                head,
                chunked,
                body,
                idempotent,
                head_request,
                proxied,
            } => (head, chunked, body, idempotent, head_request, proxied),
            UpstreamRequest::H2(req) => {
                // Boxed: its state is large and must not grow every HTTP/1.1 request's future.
                return Box::pin(send_over_h2(self, ep, *req, timeout, fresh)).await;
            }
            UpstreamRequest::H3(req) => {
                let sent = send_over_h3(self, ep, *req, timeout, fresh);
                return Box::pin(sent).await;
            }
        };
        // Moved into the exchange, a body is gone; a bodiless request keeps its head.
        let again = body.is_none().then(|| UpstreamRequest::H1 {
            head: head.clone(),
            chunked: false,
            body: None,
            idempotent,
            head_request,
            proxied,
        });
        let conn = match self.checkout(ep, fresh, proxied).await {
            Ok(conn) => conn,
            Err(error) => {
                let facts = AttemptFacts {
                    connection_failed: false,
                    maybe_received: false,
                    replayable: again.is_some(),
                    idempotent,
                    reused: false,
                    reset: false,
                };
                return Err(Failed {
                    error,
                    facts,
                    again,
                });
            }
        };
        let reused = conn.reused;
        let exchange = Exchange::new(conn, head, chunked, body, head_request);
        match exchange.response(timeout).await {
            Ok(resp) => Ok(resp.map(UpstreamBody::H1)),
            Err(failed) => Err(Failed {
                error: failed.error,
                facts: AttemptFacts {
                    connection_failed: failed.stale,
                    maybe_received: !failed.unsent,
                    replayable: again.is_some(),
                    idempotent,
                    reused,
                    reset: failed.closed,
                },
                again,
            }),
        }
    }
}

/// A failed HTTP/2 attempt, with the request back when hyper never sent it.
struct Attempt {
    error: ProxyError,
    unsent: Option<Request<ClientBody>>,
}

/// One attempt over the endpoint's shared HTTP/2 connection (a new one when `fresh`).
async fn send_over_h2(
    pool: &Rc<UpstreamPool>,
    ep: usize,
    req: Request<ClientBody>,
    timeout: Duration,
    fresh: bool,
) -> Result<Response<UpstreamBody>, Failed> {
    if fresh {
        pool.forget_h2(ep);
    }
    let idempotent = fluxgate_policy::retry::idempotent(req.method());
    // A bodiless request is kept whatever its method: a refused stream was never processed.
    let replay = req.body().is_end_stream().then(|| replay_copy(&req));
    let failed = match send_h2(pool, ep, req, timeout).await {
        Ok(resp) => return Ok(resp.map(UpstreamBody::H2)),
        Err(a) => a,
    };
    let facts = AttemptFacts {
        connection_failed: matches!(failed.error, ProxyError::Upstream(_)),
        maybe_received: failed.unsent.is_none() && !refused_unprocessed(&failed.error),
        replayable: failed.unsent.is_some() || replay.is_some(),
        idempotent,
        reused: !fresh,
        reset: matches!(failed.error, ProxyError::Upstream(_)),
    };
    let again = failed
        .unsent
        .or(replay)
        .map(|r| UpstreamRequest::H2(Box::new(r)));
    Err(Failed {
        error: failed.error,
        facts,
        again,
    })
}

async fn send_h2(
    pool: &Rc<UpstreamPool>,
    ep: usize,
    req: Request<ClientBody>,
    timeout: Duration,
) -> Result<Response<Incoming>, Attempt> {
    let mut sender = match pool.h2_sender(ep).await {
        Ok(s) => s,
        Err(error) => {
            return Err(Attempt {
                error,
                unsent: None,
            })
        }
    };
    if let Err(e) = sender.ready().await {
        return Err(Attempt {
            error: ProxyError::Upstream(Box::new(e)),
            unsent: Some(req),
        });
    }
    await_response(timeout, sender.try_send_request(req)).await
}

/// Waits for the response head within `limit`.
async fn await_response(
    limit: Duration,
    sent: impl Future<Output = Result<Response<Incoming>, TrySendError<Request<ClientBody>>>>,
) -> Result<Response<Incoming>, Attempt> {
    match tokio::time::timeout(limit, sent).await {
        Err(_) => Err(Attempt {
            error: ProxyError::ResponseTimeout,
            unsent: None,
        }),
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(mut e)) => {
            let unsent = e.take_message();
            Err(Attempt {
                error: ProxyError::from_upstream(e.into_error()),
                unsent,
            })
        }
    }
}
/// Whether an HTTP/2 upstream refused the stream without processing it: REFUSED_STREAM, or a
/// stream above the last one a graceful GOAWAY let through (RFC 9113 8.1.4 and 6.8). A GOAWAY
/// with an error code also ends streams it may have processed, so it does not count.
fn refused_unprocessed(e: &ProxyError) -> bool {
    let ProxyError::Upstream(e) = e else {
        return false;
    };
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e.as_ref());
    while let Some(c) = cause {
        if let Some(h2) = c.downcast_ref::<h2::Error>() {
            return match h2.reason() {
                Some(h2::Reason::REFUSED_STREAM) => true,
                Some(h2::Reason::NO_ERROR) => h2.is_go_away(),
                _ => false,
            };
        }
        cause = c.source();
    }
    false
}

/// A copy of a bodiless request head, kept so an HTTP/2 request that reached a broken
/// connection can be sent again.
fn replay_copy(req: &Request<ClientBody>) -> Request<ClientBody> {
    let mut r = Request::new(ClientBody::Empty);
    *r.method_mut() = req.method().clone();
    *r.uri_mut() = req.uri().clone();
    *r.version_mut() = req.version();
    *r.headers_mut() = req.headers().clone();
    r
}

/// One attempt over the endpoint's shared HTTP/3 connection (a new one when `fresh`).
async fn send_over_h3(
    pool: &Rc<UpstreamPool>,
    ep: usize,
    req: Request<ClientBody>,
    timeout: Duration,
    fresh: bool,
) -> Result<Response<UpstreamBody>, Failed> {
    if fresh {
        pool.forget_h3(ep);
    }
    let idempotent = fluxgate_policy::retry::idempotent(req.method());
    // A bodiless request is kept whatever its method, to go again if it never went out.
    let replay = req.body().is_end_stream().then(|| replay_copy(&req));
    let fail = |error: ProxyError, sent: bool, replay: Option<Request<ClientBody>>| Failed {
        facts: AttemptFacts {
            connection_failed: matches!(error, ProxyError::Connect { .. }) || !sent,
            maybe_received: sent,
            replayable: replay.is_some(),
            idempotent,
            reused: !fresh,
            reset: matches!(error, ProxyError::Upstream(_)),
        },
        error,
        again: replay.map(|r| UpstreamRequest::H3(Box::new(r))),
    };
    let mut sender = match pool.h3_sender(ep).await {
        Ok(s) => s,
        Err(e) => return Err(fail(e, false, replay)),
    };
    let (parts, body) = req.into_parts();
    let stream = match sender.send_request(Request::from_parts(parts, ())).await {
        Ok(s) => s,
        Err(e) => {
            // The connection is gone: the next request opens another.
            pool.forget_h3(ep);
            return Err(fail(ProxyError::Upstream(Box::new(e)), false, replay));
        }
    };
    let (mut send, mut recv) = stream.split();
    tokio::task::spawn_local(async move {
        let mut body = body;
        while let Some(frame) = body.frame().await {
            let sent = match frame {
                Ok(f) => match f.into_data() {
                    Ok(data) => send.send_data(data).await,
                    Err(f) => match f.into_trailers() {
                        Ok(t) => send.send_trailers(t).await,
                        Err(_) => Ok(()),
                    },
                },
                Err(_) => {
                    // The client's body failed: the upstream must not take it for whole.
                    send.stop_stream(h3::error::Code::H3_REQUEST_CANCELLED);
                    return;
                }
            };
            if sent.is_err() {
                return;
            }
        }
        let _ = send.finish().await;
    });
    match tokio::time::timeout(timeout, recv.recv_response()).await {
        Err(_) => Err(fail(ProxyError::ResponseTimeout, true, None)),
        Ok(Err(e)) => Err(fail(ProxyError::Upstream(Box::new(e)), true, None)),
        Ok(Ok(resp)) => Ok(resp.map(|()| {
            UpstreamBody::H3(H3Body {
                recv,
                data_done: false,
                ended: false,
            })
        })),
    }
}

/// A response body from an HTTP/3 upstream: its DATA, then its trailers.
pub(crate) struct H3Body {
    recv: RequestStream<h3_quinn::RecvStream, Bytes>,
    data_done: bool,
    ended: bool,
}

impl Body for H3Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        if !this.data_done {
            match ready!(this.recv.poll_recv_data(cx)) {
                Ok(Some(mut data)) => {
                    let data = data.copy_to_bytes(data.remaining());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(None) => this.data_done = true,
                Err(e) => {
                    this.ended = true;
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
            }
        }
        let trailers = ready!(this.recv.poll_recv_trailers(cx));
        this.ended = true;
        Poll::Ready(match trailers {
            Ok(Some(t)) => Some(Ok(Frame::trailers(t))),
            Ok(None) => None,
            Err(e) => Some(Err(Box::new(e))),
        })
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}
