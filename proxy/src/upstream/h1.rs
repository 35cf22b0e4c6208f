//! fluxgate's own HTTP/1.1 client for upstream connections.
//!
//! hyper's client runs each connection as a separate task and talks to it through channels: a
//! request goes in over one, the response head comes back over a oneshot and every body chunk
//! over another, each hop a task wake-up. Here the request's own task writes the request and
//! reads the response straight off the socket, and the response body reads the socket when the
//! client side polls it, so a proxied request costs no extra task, channel or wake-up.
//!
//! The request body is pumped while the response is read (an upstream may answer, or echo,
//! before the request ends); both directions stream, neither is buffered whole. Framing is
//! strict: a response with conflicting lengths, a bad chunk or an oversized head is an
//! upstream failure (502), and a connection is reused only when both messages ended cleanly.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap};
use http::request::Parts;
use http::{Method, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::AsyncWrite;

use crate::http::body::ClientBody;
use crate::http::h1::{
    chunked_last, content_length, decode_chunk, field_spans, header_map, put_fields, Chunk, Span,
};
use crate::http::headers::connection_has;
use crate::upstream::pool::{Checkout, H1Conn};

/// The largest response head accepted, and the most header fields in it.
const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 128;

/// Why an exchange with the upstream failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum H1Error {
    #[error("upstream closed the connection before the response ended")]
    Closed,
    #[error("upstream I/O: {0}")]
    Io(#[from] io::Error),
    #[error("malformed upstream response: {0}")]
    Malformed(&'static str),
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
            H1Error::Malformed(_) => false,
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
}

/// How the request body is framed on the wire.
#[derive(Clone, Copy, PartialEq)]
enum ReqFraming {
    None,
    Length(u64),
    Chunked,
}

/// Serializes the request head (hop-by-hop headers already removed by the caller) with the
/// framing its body needs (None: the request has no body). The head is kept by the caller
/// for a retry.
pub(crate) fn encode_head(parts: &Parts, body: Option<&ClientBody>) -> (Bytes, bool) {
    let framing = match body {
        None => {
            let has_len = parts.headers.contains_key(header::CONTENT_LENGTH);
            if has_len || matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) {
                ReqFraming::Length(0)
            } else {
                ReqFraming::None
            }
        }
        Some(body) => match body.size_hint().exact() {
            Some(n) => ReqFraming::Length(n),
            None => ReqFraming::Chunked,
        },
    };
    let target = parts.uri.path_and_query().map_or(
        if parts.method == Method::OPTIONS {
            "*"
        } else {
            "/"
        },
        |p| p.as_str(),
    );
    let mut out = BytesMut::with_capacity(
        64 + target.len()
            + parts
                .headers
                .iter()
                .map(|(k, v)| k.as_str().len() + v.len() + 4)
                .sum::<usize>(),
    );
    out.put_slice(parts.method.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(target.as_bytes());
    out.put_slice(b" HTTP/1.1\r\n");
    let fields = parts
        .headers
        .iter()
        .filter(|(k, _)| *k != header::CONTENT_LENGTH);
    put_fields(&mut out, fields);
    match framing {
        ReqFraming::None => {}
        ReqFraming::Length(n) => {
            // Into the head's own buffer: no allocation for the number.
            let _ = write!(out, "content-length: {n}\r\n");
        }
        ReqFraming::Chunked => out.put_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.put_slice(b"\r\n");
    (out.freeze(), framing == ReqFraming::Chunked)
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
        let stale = self.conn.reused
            && self.conn.io_mut().rbuf.is_empty()
            && matches!(&error, AttemptError::H1(e) if e.is_closed());
        Err(Failed {
            error: error.into(),
            stale,
            unsent: !self.wrote,
        })
    }

    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(http::response::Parts, Framing, bool), AttemptError>> {
        if let Poll::Ready(Err(e)) = self.poll_send(cx) {
            return Poll::Ready(Err(AttemptError::Proxy(e)));
        }
        loop {
            let io = self.conn.io_mut();
            match parse_head(&mut io.rbuf, &mut io.spans, self.head_request) {
                Err(e) => return Poll::Ready(Err(AttemptError::H1(e))),
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

/// How the response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Framing {
    /// No body (HEAD, 204, 304), or the body has been read to the end.
    Done,
    /// This many bytes remain.
    Length(u64),
    Chunked(Chunk),
    /// Until the upstream closes.
    Close,
    /// 101: the connection now carries another protocol.
    Upgrade,
}

/// Parses one response head out of `buf`, skipping 1xx interim answers other than 101.
/// Ok(None): more bytes are needed.
fn parse_head(
    buf: &mut BytesMut,
    spans: &mut Vec<Span>,
    head_request: bool,
) -> Result<Option<(http::response::Parts, Framing, bool)>, H1Error> {
    loop {
        if buf.is_empty() {
            return Ok(None);
        }
        // Left uninitialised: httparse writes each slot it uses.
        let mut fields = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut resp,
            buf,
            &mut fields,
        );
        let len = match parsed {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
                return Err(H1Error::Malformed("response head too large"))
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(H1Error::Malformed("too many header fields"))
            }
            Err(_) => return Err(H1Error::Malformed("bad response head")),
        };
        let code = resp.code.unwrap_or(0);
        let status =
            StatusCode::from_u16(code).map_err(|_| H1Error::Malformed("bad status code"))?;
        if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
            buf.advance(len);
            continue;
        }
        let version = if resp.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        // Header values point into the head's bytes, which the response then owns.
        field_spans(buf, resp.headers, spans);
        let head = buf.split_to(len).freeze();
        let headers = header_map(&head, spans, 0).map_err(H1Error::Malformed)?;
        let (framing, delimited) = framing_of(status, &headers, head_request)?;
        let reusable = delimited && keeps_alive(version, &headers);
        let mut parts = Response::new(()).into_parts().0;
        parts.status = status;
        parts.version = version;
        parts.headers = headers;
        return Ok(Some((parts, framing, reusable)));
    }
}

/// The body framing of a response (RFC 9112 6.3), and whether its end is known without the
/// connection closing.
fn framing_of(
    status: StatusCode,
    headers: &HeaderMap,
    head_request: bool,
) -> Result<(Framing, bool), H1Error> {
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Ok((Framing::Upgrade, false));
    }
    if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok((Framing::Done, true));
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        if headers.contains_key(header::CONTENT_LENGTH) {
            // Either could be the truth: refuse rather than pass on a body of unknown length.
            return Err(H1Error::Malformed("content-length with transfer-encoding"));
        }
        return Ok(if chunked_last(headers) {
            (Framing::Chunked(Chunk::Size), true)
        } else {
            (Framing::Close, false)
        });
    }
    let length = content_length(headers).map_err(H1Error::Malformed)?;
    Ok(match length {
        Some(0) => (Framing::Done, true),
        Some(n) => (Framing::Length(n), true),
        None => (Framing::Close, false),
    })
}

/// Whether the upstream lets the connection be reused after this response.
fn keeps_alive(version: Version, headers: &HeaderMap) -> bool {
    if version == Version::HTTP_10 {
        connection_has(headers, "keep-alive")
    } else {
        !connection_has(headers, "close")
    }
}

/// A response body read straight off the upstream connection. The connection goes back to
/// its pool when the body ends, if both messages ended cleanly; dropped early, it closes.
pub(crate) struct H1Body {
    ex: Option<Exchange>,
    framing: Framing,
    reusable: bool,
}

impl H1Body {
    /// Releases the connection at once when there is no body to read (HEAD, 204, 304,
    /// length 0): the client side may never poll it.
    fn released_if_done(mut self) -> Self {
        if self.framing == Framing::Done {
            self.finish();
        }
        self
    }

    /// The body ended: the connection goes back to the pool, or closes.
    fn finish(&mut self) {
        self.framing = Framing::Done;
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
        if self.framing != Framing::Upgrade {
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
        self.framing = Framing::Done;
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
                Framing::Done | Framing::Upgrade => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Framing::Length(left) => {
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
                Framing::Close => {
                    if !io.rbuf.is_empty() {
                        let data = io.rbuf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                Framing::Chunked(state) => match decode_chunk(state, &mut io.rbuf) {
                    Err(e) => return this.end_closing(Some(Box::new(H1Error::Malformed(e)))),
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
                    let clean = this.framing == Framing::Close;
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
        self.framing == Framing::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Done | Framing::Upgrade => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_framing() {
        let head = |raw: &[u8], head_req: bool| {
            let mut b = BytesMut::from(raw);
            parse_head(&mut b, &mut Vec::new(), head_req)
                .map(|h| h.map(|(p, f, r)| (p.status.as_u16(), f, r)))
        };
        let ok = head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", false).unwrap();
        assert_eq!(ok, Some((200, Framing::Length(5), true)));
        let cont = head(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No\r\n\r\n",
            false,
        )
        .unwrap();
        assert_eq!(cont, Some((204, Framing::Done, true)));
        let chunked = head(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
        );
        assert_eq!(
            chunked.unwrap(),
            Some((200, Framing::Chunked(Chunk::Size), true))
        );
        let close = head(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", false).unwrap();
        assert_eq!(close, Some((200, Framing::Close, false)));
        let old = head(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false).unwrap();
        assert_eq!(old, Some((200, Framing::Length(1), false)));
        let head_req = head(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true).unwrap();
        assert_eq!(head_req, Some((200, Framing::Done, true)));
        assert_eq!(head(b"HTTP/1.1 200 OK\r\nContent-Le", false).unwrap(), None);
        assert!(head(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            false
        )
        .is_err());
        assert!(head(b"HTTP/1.1 200 OK\r\nContent-Length: +1\r\n\r\n", false).is_err());
        assert!(head(b"HTTP/1.1 2000 OK\r\n\r\n", false).is_err());
        assert!(head(b"SSH-2.0-OpenSSH\r\n\r\n", false).is_err());
    }
}
