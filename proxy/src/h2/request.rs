//! A request as it arrives on a stream: its head, decoded and checked field by field, and
//! its body, a queue that DATA frames fill and the upstream side drains.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Uri};
use http_body::{Body, Frame, SizeHint};

use super::hpack::{self, Field, Name};
use super::{Shared, STREAM_WINDOW};
use crate::body::ClientBody;
use crate::error::BoxError;

/// A request body as DATA frames deliver it.
pub(super) struct Recv {
    pub(super) queue: VecDeque<Bytes>,
    pub(super) queued: usize,
    pub(super) trailers: Option<HeaderMap>,
    pub(super) end: bool,
    /// Why the body failed (the stream was reset); the reader gets it as an error.
    pub(super) failed: Option<&'static str>,
    pub(super) reader: Option<Waker>,
    /// The reader is gone: further data is dropped and credited at once.
    pub(super) dropped: bool,
    /// Read since the stream's window was last widened.
    pub(super) consumed: usize,
    /// Content-Length, if declared, and what arrived so far.
    pub(super) declared: Option<u64>,
    pub(super) received: u64,
}

impl Recv {
    /// A body the client is about to send, `declared` its Content-Length if any.
    pub(super) fn new(declared: Option<u64>) -> Recv {
        Recv {
            queue: VecDeque::new(),
            queued: 0,
            trailers: None,
            end: false,
            failed: None,
            reader: None,
            dropped: false,
            consumed: 0,
            declared,
            received: 0,
        }
    }

    /// Something changed for the reader: more data, the end, or a failure.
    pub(super) fn wake(&mut self) {
        if let Some(w) = self.reader.take() {
            w.wake();
        }
    }

    pub(super) fn fail(&mut self, why: &'static str) {
        self.failed = Some(why);
        self.wake();
    }
}

/// The reading end of a request body, handed to the proxy inside the request.
pub(crate) struct RecvBody {
    pub(super) recv: Arc<Mutex<Recv>>,
    pub(super) shared: Arc<Shared>,
    /// The stream's waker: told when enough was read to widen the stream's window.
    pub(super) stream: Waker,
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
        if let Some(data) = r.queue.pop_front() {
            r.queued -= data.len();
            r.consumed += data.len();
            let widen = !r.end && r.consumed >= STREAM_WINDOW as usize / 2;
            drop(r);
            this.shared.release(data.len());
            if widen {
                this.stream.wake_by_ref();
            }
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if let Some(why) = r.failed {
            return Poll::Ready(Some(Err(why.into())));
        }
        if let Some(t) = r.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(t))));
        }
        if r.end {
            return Poll::Ready(None);
        }
        r.reader = Some(cx.waker().clone());
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
        drop(r);
        self.shared.release(unread);
    }
}

/// The request head being decoded.
pub(super) struct Head {
    pub(super) method: Option<HeaderValue>,
    pub(super) scheme: Option<HeaderValue>,
    pub(super) authority: Option<HeaderValue>,
    pub(super) path: Option<HeaderValue>,
    pub(super) headers: HeaderMap,
    /// The list size as RFC 9113 counts it; past `limit`, fields are counted, not kept.
    pub(super) size: usize,
    pub(super) limit: usize,
    pub(super) malformed: bool,
    pub(super) regular: bool,
}

impl Head {
    pub(super) fn new(limit: usize) -> Head {
        Head {
            method: None,
            scheme: None,
            authority: None,
            path: None,
            headers: HeaderMap::new(),
            size: 0,
            limit,
            malformed: false,
            regular: false,
        }
    }

    pub(super) fn has_pseudo(&self) -> bool {
        self.method.is_some()
            || self.scheme.is_some()
            || self.authority.is_some()
            || self.path.is_some()
    }

    pub(super) fn add(&mut self, f: Field) {
        self.size += f.size;
        if self.size > self.limit {
            return;
        }
        let Some(value) = f.value else {
            self.malformed = true;
            return;
        };
        let slot = match f.name {
            Name::Method => &mut self.method,
            Name::Scheme => &mut self.scheme,
            Name::Authority => &mut self.authority,
            Name::Path => &mut self.path,
            Name::OtherPseudo | Name::Invalid => {
                self.malformed = true;
                return;
            }
            Name::Header(name) => {
                self.regular = true;
                if hpack::connection_specific(&name)
                    || (name == http::header::TE && value != "trailers")
                {
                    self.malformed = true;
                }
                self.headers.append(name, value);
                return;
            }
        };
        // Pseudo-headers come first, once each (RFC 9113 8.3).
        if self.regular || slot.is_some() {
            self.malformed = true;
        }
        *slot = Some(value);
    }

    /// The request, or None when the head is malformed.
    pub(super) fn into_request(self, body: ClientBody) -> Option<Request<ClientBody>> {
        let method = Method::from_bytes(self.method?.as_bytes()).ok()?;
        let mut uri = http::uri::Parts::default();
        if method == Method::CONNECT {
            if self.scheme.is_some() || self.path.is_some() {
                return None;
            }
            uri.authority = Some(self.authority?.as_bytes().try_into().ok()?);
        } else {
            uri.scheme = Some(self.scheme?.as_bytes().try_into().ok()?);
            uri.authority = match self.authority {
                Some(a) => Some(a.as_bytes().try_into().ok()?),
                None => None,
            };
            let path = self.path?;
            if path.is_empty() {
                return None;
            }
            uri.path_and_query = Some(path.as_bytes().try_into().ok()?);
        }
        let mut req = Request::new(body);
        *req.method_mut() = method;
        *req.uri_mut() = Uri::from_parts(uri).ok()?;
        *req.version_mut() = http::Version::HTTP_2;
        *req.headers_mut() = self.headers;
        Some(req)
    }
}
