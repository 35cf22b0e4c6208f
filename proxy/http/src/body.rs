//! The request body as the client sends it, read by our HTTP/1.1 or HTTP/2 server; also what
//! goes upstream.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::recv::RecvBody;
use crate::BoxError;

/// A request body as the client sends it, read by our HTTP/1.1 or HTTP/2 server; also what
/// goes upstream.
pub enum ClientBody {
    Stream(RecvBody),
    /// None: an HTTP/2 request that ended with its head, or a retry of a bodiless request
    /// (whose original body the failed attempt consumed).
    Empty,
    /// A whole body the gateway made (an order it forwards); None once sent.
    Full(Option<Bytes>),
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ClientBody::Stream(b) => Pin::new(b).poll_frame(cx),
            ClientBody::Empty => Poll::Ready(None),
            ClientBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Stream(b) => b.is_end_stream(),
            ClientBody::Empty => true,
            ClientBody::Full(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Stream(b) => b.size_hint(),
            ClientBody::Empty => SizeHint::with_exact(0),
            ClientBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}

impl ClientBody {
    /// Makes the body fail with `BodyError::TooLarge` once more than `max` bytes arrived.
    pub fn limit(&self, max: u64) {
        if let ClientBody::Stream(b) = self {
            b.recv.lock().expect("recv lock").limit = Some(max);
        }
    }
}
