//! fluxgate's own HTTP/1.1 client for upstream connections.
//!
//! hyper's client runs each connection as a separate task and talks to it through channels: a
//! request goes in over one, the response head comes back over a oneshot and every body chunk
//! over another, each hop a task wake-up. Here the request's own task writes the request and
//! reads the response straight off the socket, and the response body reads the socket when the
//! client side polls it, so a proxied request costs no extra task, channel or wake-up.
//!
//! The request body is pumped while the response is read (an upstream may answer, or echo,
//! before the request ends); both directions stream, neither is buffered whole. ResponseFraming is
//! strict: a response with conflicting lengths, a bad chunk or an oversized head is an
//! upstream failure (502), and a connection is reused only when both messages ended cleanly.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::Response;
use http_body::{Body, Frame, SizeHint};
use tokio::io::AsyncWrite;

use crate::upstream::pool::{Checkout, H1Conn};
use fluxgate_http::body::ClientBody;
use fluxgate_wire::h1::response::{self, ResponseFraming};
use fluxgate_wire::h1::{decode_chunk, put_fields};

/// Why an exchange with the upstream failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum H1Error {
    #[error("upstream closed the connection before the response ended")]
    Closed,
    #[error("upstream I/O: {0}")]
    Io(#[from] io::Error),
    #[error("malformed upstream response: {0}")]
    Malformed(#[from] fluxgate_wire::h1::response::ResponseError),
    #[error("malformed upstream body: {0}")]
    Body(#[from] fluxgate_wire::h1::FieldError),
}

impl H1Error {
    /// A failure that a connection which went stale in the pool would show.
    fn is_closed(&self) -> bool {
        match self {
            H1Error::Closed => true,
            H1Error::Io(e) => matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::UnexpectedEof
            ),
            H1Error::Malformed(_) | H1Error::Body(_) => false,
        }
    }
}

/// A failed exchange, with what the caller needs to decide on a retry.
pub(crate) struct Failed {
    pub(crate) error: crate::error::ProxyError,
    /// The connection came from the pool and closed before any byte of a response: it was
    /// stale when we picked it.
    pub(crate) stale: bool,
    /// Not one byte of the request reached the socket.
    pub(crate) unsent: bool,
    /// The connection (pooled or new) closed or was reset before any byte of a response.
    pub(crate) closed: bool,
}

/// One request on one connection: the bytes still to write and the body still to read.
pub(crate) struct Exchange {
    conn: Checkout,
    out: VecDeque<Bytes>,
    body: Option<ClientBody>,
    chunked: bool,
    /// Some bytes of the request reached the socket.
    wrote: bool,
    /// The whole request has been written (and flushed).
    sent: bool,
    /// Writing failed (the upstream stopped reading); the response may still come.
    send_failed: bool,
    head_request: bool,
}

impl Exchange {
    pub(crate) fn new(
        conn: Checkout,
        head: Bytes,
        chunked: bool,
        body: Option<ClientBody>,
        head_request: bool,
    ) -> Self {
        Exchange {
            conn,
            out: VecDeque::from([head]),
            body,
            chunked,
            wrote: false,
            sent: false,
            send_failed: false,
            head_request,
        }
    }

    /// Writes what is queued and pumps the request body until it would block or is done.
    /// A client body failure is returned; an upstream write failure stops sending only.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), crate::error::ProxyError>> {
        if self.sent || self.send_failed {
            return Poll::Ready(Ok(()));
        }
        loop {
            if !self.out.is_empty() {
                match self.poll_write_queue(cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(_)) => {
                        self.send_failed = true;
                        return Poll::Ready(Ok(()));
                    }
                    Poll::Pending => return Poll::Pending,
                }
            }
            let Some(body) = self.body.as_mut() else {
                let io = &mut self.conn.io_mut().stream;
                return match Pin::new(io).poll_flush(cx) {
                    Poll::Ready(Ok(())) => {
                        self.sent = true;
                        Poll::Ready(Ok(()))
                    }
                    Poll::Ready(Err(_)) => {
                        self.send_failed = true;
                        Poll::Ready(Ok(()))
                    }
                    Poll::Pending => Poll::Pending,
                };
            };
            match Pin::new(body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => {
                    self.body = None;
                    self.send_failed = true;
                    return Poll::Ready(Err(crate::error::ProxyError::ClientBody(e)));
                }
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) if data.is_empty() => {}
                    Ok(data) if self.chunked => {
                        self.out
                            .push_back(Bytes::from(format!("{:x}\r\n", data.len())));
                        self.out.push_back(data);
                        self.out.push_back(Bytes::from_static(b"\r\n"));
                    }
                    Ok(data) => self.out.push_back(data),
                    Err(frame) => {
                        if let (true, Ok(trailers)) = (self.chunked, frame.into_trailers()) {
                            let mut t = BytesMut::from(&b"0\r\n"[..]);
                            put_fields(&mut t, &trailers);
                            t.put_slice(b"\r\n");
                            self.out.push_back(t.freeze());
                            self.chunked = false;
                        }
                    }
                },
                Poll::Ready(None) => {
                    self.body = None;
                    if self.chunked {
                        self.out.push_back(Bytes::from_static(b"0\r\n\r\n"));
                    }
                }
            }
        }
    }

    fn poll_write_queue(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            let mut slices = [IoSlice::new(&[]); 4];
            let mut n = 0;
            for (slot, b) in slices.iter_mut().zip(self.out.iter()) {
                *slot = IoSlice::new(b);
                n += 1;
            }
            let io = &mut self.conn.io_mut().stream;
            let written = match Pin::new(io).poll_write_vectored(cx, &slices[..n]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(w)) => w,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            };
            self.wrote = true;
            let mut left = written;
            while left > 0 {
                let front = self.out.front_mut().expect("wrote at most what was queued");
                if front.len() <= left {
                    left -= front.len();
                    self.out.pop_front();
                } else {
                    front.advance(left);
                    left = 0;
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Sends the request and reads the response head within `limit`; 1xx interim answers
    /// are skipped. On failure the connection closes.
    pub(crate) async fn response(mut self, limit: Duration) -> Result<Response<H1Body>, Failed> {
        let head = std::future::poll_fn(|cx| self.poll_head(cx));
        let error = match tokio::time::timeout(limit, head).await {
            Ok(Ok((parts, framing, reusable))) => {
                let body = H1Body {
                    ex: Some(self),
                    framing,
                    reusable,
                };
                return Ok(Response::from_parts(parts, body.released_if_done()));
            }
            Ok(Err(error)) => error,
            Err(_) => AttemptError::Proxy(crate::error::ProxyError::ResponseTimeout),
        };
        let closed = self.conn.io_mut().rbuf.is_empty()
            && matches!(&error, AttemptError::H1(e) if e.is_closed());
        Err(Failed {
            error: error.into(),
            stale: self.conn.reused && closed,
            unsent: !self.wrote,
            closed,
        })
    }

    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(http::response::Parts, ResponseFraming, bool), AttemptError>> {
        if let Poll::Ready(Err(e)) = self.poll_send(cx) {
            return Poll::Ready(Err(AttemptError::Proxy(e)));
        }
        loop {
            let io = self.conn.io_mut();
            match response::parse(&mut io.rbuf, &mut io.spans, self.head_request) {
                Err(e) => return Poll::Ready(Err(AttemptError::H1(H1Error::Malformed(e)))),
                Ok(Some(head)) => return Poll::Ready(Ok(head)),
                Ok(None) => {}
            }
            match self.conn.io_mut().poll_fill(cx) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(AttemptError::H1(H1Error::Closed))),
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(AttemptError::H1(e.into()))),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// The error of an attempt before it is classified.
enum AttemptError {
    H1(H1Error),
    Proxy(crate::error::ProxyError),
}

impl From<AttemptError> for crate::error::ProxyError {
    fn from(u: AttemptError) -> Self {
        match u {
            AttemptError::H1(e) => crate::error::ProxyError::Upstream(Box::new(e)),
            AttemptError::Proxy(e) => e,
        }
    }
}

/// A response body read straight off the upstream connection. The connection goes back to
/// its pool when the body ends, if both messages ended cleanly; dropped early, it closes.
pub(crate) struct H1Body {
    ex: Option<Exchange>,
    framing: ResponseFraming,
    reusable: bool,
}

impl H1Body {
    /// Releases the connection at once when there is no body to read (HEAD, 204, 304,
    /// length 0): the client side may never poll it.
    fn released_if_done(mut self) -> Self {
        if self.framing == ResponseFraming::Done {
            self.finish();
        }
        self
    }

    /// The body ended: the connection goes back to the pool, or closes.
    fn finish(&mut self) {
        self.framing = ResponseFraming::Done;
        if let Some(mut ex) = self.ex.take() {
            if self.reusable && !ex.send_failed && ex.body.is_none() && ex.out.is_empty() {
                // The request is fully queued; a last flush is all that may remain.
                let flushed = {
                    let mut cx = Context::from_waker(std::task::Waker::noop());
                    matches!(ex.poll_send(&mut cx), Poll::Ready(Ok(()))) && ex.sent
                };
                if flushed {
                    ex.conn.release();
                }
            }
        }
    }

    /// For a 101 answer: the connection, with any bytes the upstream sent past the head,
    /// for the tunnel.
    pub(crate) fn into_upgraded(mut self) -> Option<H1Conn> {
        if self.framing != ResponseFraming::Upgrade {
            return None;
        }
        self.ex.take().map(|ex| ex.conn.into_tunnel())
    }

    /// The body ended with the connection unusable (an error, or a close-delimited end): it
    /// closes. `error` is what the client side sees, None for a clean end.
    fn end_closing(
        &mut self,
        error: Option<crate::error::BoxError>,
    ) -> Poll<Option<Result<Frame<Bytes>, crate::error::BoxError>>> {
        self.framing = ResponseFraming::Done;
        self.ex = None;
        Poll::Ready(error.map(Err))
    }
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = crate::error::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let Some(ex) = this.ex.as_mut() else {
            return Poll::Ready(None);
        };
        // Keep the request body flowing: the upstream may be echoing it.
        if let Poll::Ready(Err(e)) = ex.poll_send(cx) {
            return this.end_closing(Some(Box::new(e)));
        }
        loop {
            let io = ex.conn.io_mut();
            match &mut this.framing {
                ResponseFraming::Done | ResponseFraming::Upgrade => {
                    this.finish();
                    return Poll::Ready(None);
                }
                ResponseFraming::Length(left) => {
                    if !io.rbuf.is_empty() {
                        let n = (*left).min(io.rbuf.len() as u64) as usize;
                        *left -= n as u64;
                        let data = io.rbuf.split_to(n).freeze();
                        if *left == 0 {
                            this.finish();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                ResponseFraming::Close => {
                    if !io.rbuf.is_empty() {
                        let data = io.rbuf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                ResponseFraming::Chunked(state) => match decode_chunk(state, &mut io.rbuf) {
                    Err(e) => return this.end_closing(Some(Box::new(H1Error::Body(e)))),
                    Ok(Some(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(None) if state.ended() => {
                        this.finish();
                        return Poll::Ready(None);
                    }
                    Ok(None) => {}
                },
            }
            match io.poll_fill(cx) {
                Poll::Ready(Ok(0)) => {
                    let clean = this.framing == ResponseFraming::Close;
                    let error = (!clean).then(|| Box::new(H1Error::Closed) as _);
                    return this.end_closing(error);
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return this.end_closing(Some(Box::new(H1Error::from(e)))),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.framing == ResponseFraming::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            ResponseFraming::Done | ResponseFraming::Upgrade => SizeHint::with_exact(0),
            ResponseFraming::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}
