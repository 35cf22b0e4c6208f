//! Requests to HTTP/3 upstreams: one attempt on the endpoint's shared QUIC connection, the
//! request body sent from a task of its own as the response comes, and the response body
//! read frame by frame.

use std::pin::Pin;
use std::rc::Rc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use h3::client::RequestStream;
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::BodyExt;

use crate::error::{BoxError, ProxyError};
use crate::upstream::pool::UpstreamPool;
use crate::upstream::send::{Failed, UpstreamBody, UpstreamRequest};
use fluxgate_http::body::ClientBody;
use fluxgate_policy::retry::AttemptFacts;

/// One attempt over the endpoint's shared HTTP/3 connection (a new one when `fresh`).
pub(crate) async fn send_over_h3(
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
    let replay = req
        .body()
        .is_end_stream()
        .then(|| crate::upstream::send::replay_copy(&req));
    let fail = |error: ProxyError, sent: bool, replay: Option<Request<ClientBody>>| Failed {
        facts: AttemptFacts {
            connection_failed: matches!(error, ProxyError::Connect { .. }) || !sent,
            maybe_received: sent,
            replayable: replay.is_some(),
            idempotent,
            reused: !fresh,
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
