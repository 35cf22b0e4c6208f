//! The seam between the protocol servers and what answers their requests. Every downstream
//! server (HTTP/1.1, HTTP/2, and HTTP/3 next) is generic over `Service`, statically: it hands
//! each request over with its streaming body and writes back whatever response comes, and
//! never names the gateway, its body types, the pools or the worker.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::{Request, Response, StatusCode};

use crate::body::ClientBody;
use crate::conn::{ConnState, InFlight};
use crate::BoxError;

/// What answers a server's requests.
pub trait Service: 'static {
    /// The response body the servers stream to the client.
    type Body: ResponseBody;
    /// A response still being worked on.
    type Future: Future<Output = Response<Self::Body>> + Unpin;

    /// Answers one request; `inflight` marks it open on its connection until the response
    /// body is dropped.
    fn call(&self, req: Request<ClientBody>, inflight: InFlight)
        -> Reply<Self::Future, Self::Body>;

    /// The answer to a request the server refuses itself (a head it cannot parse, or one
    /// over a limit); counted and logged as every answer is, with the reason.
    fn refuse(&self, why: Refusal, inflight: InFlight) -> Response<Self::Body>;

    /// A stream the server reset without an answer (HTTP/2); counted and logged.
    fn reset(&self, why: Refusal, conn: &ConnState);
}

/// A response now, or a future of one.
pub enum Reply<F, B> {
    /// Boxed so that the common case, a future, does not carry a response's size. None once
    /// taken.
    Ready(Option<Box<Response<B>>>),
    Later(F),
}

impl<F, B> Future for Reply<F, B>
where
    F: Future<Output = Response<B>> + Unpin,
{
    type Output = Response<B>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Response<B>> {
        // Unpin: a box, or F by its bound.
        match Pin::into_inner(self) {
            Reply::Ready(resp) => match resp.take() {
                Some(resp) => Poll::Ready(*resp),
                // Polled again after completing: our servers never do.
                None => Poll::Pending,
            },
            Reply::Later(f) => Pin::new(f).poll(cx),
        }
    }
}

/// A response body as the servers take it, and what a 101 answer hands over.
pub trait ResponseBody: http_body::Body<Data = Bytes, Error = BoxError> + Unpin {
    /// What serves the client's connection after a 101.
    type Upgraded: Upgraded;

    /// What a 101 answer hands the connection to; taken once (None for any other answer).
    fn take_upgrade(&mut self) -> Option<Self::Upgraded>;
}

/// What a client's connection becomes once a 101 answer is written: a tunnel to the
/// upstream that switched protocols (`stream::tunnel`), or a protocol the service speaks
/// itself.
pub trait Upgraded: 'static {
    /// Serves the connection to its end; `from_client` is what the client sent past its
    /// request head, `splice` the listener's `splice` setting.
    fn serve(
        self,
        client: crate::stream::ClientStream,
        from_client: BytesMut,
        splice: bool,
    ) -> Pin<Box<dyn Future<Output = ()>>>;
}

/// Why a server refused a request or reset a stream itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 400: the request head does not parse.
    MalformedHead,
    /// 400: the head leaves the body's length ambiguous (RFC 9112 6.1, 6.3).
    AmbiguousFraming,
    /// 400: an HTTP/1.1 request with no Host, or one with two (RFC 9112 3.2).
    BadHost,
    /// 408: a request head was begun and not finished within `header_read_timeout`.
    HeadTimeout,
    /// 414: the request line alone is over the head limit.
    TargetTooLong,
    /// 431: the head is over `max_header_bytes`.
    HeadTooLarge,
    /// 431: more fields than `max_headers`.
    TooManyFields,
    /// HTTP/2 RST_STREAM PROTOCOL_ERROR: a malformed request head.
    MalformedStream,
    /// HTTP/2 RST_STREAM REFUSED_STREAM: the connection is closing or at its stream limit.
    StreamRefused,
    /// Closed: the connection did not start with a well-formed PROXY protocol header from a
    /// trusted source (`listener.proxy_protocol`).
    ProxyHeader,
}

impl From<fluxgate_wire::h1::request::HeadError> for Refusal {
    fn from(e: fluxgate_wire::h1::request::HeadError) -> Refusal {
        use fluxgate_wire::h1::request::HeadError;
        match e {
            HeadError::Malformed => Refusal::MalformedHead,
            HeadError::AmbiguousFraming => Refusal::AmbiguousFraming,
            HeadError::TooManyFields => Refusal::TooManyFields,
            HeadError::HeadTooLarge => Refusal::HeadTooLarge,
            HeadError::TargetTooLong => Refusal::TargetTooLong,
            HeadError::BadHost => Refusal::BadHost,
        }
    }
}

impl Refusal {
    /// Every refusal, in declaration order (`index` relies on it).
    pub const ALL: [Refusal; 10] = [
        Refusal::MalformedHead,
        Refusal::AmbiguousFraming,
        Refusal::BadHost,
        Refusal::HeadTimeout,
        Refusal::TargetTooLong,
        Refusal::HeadTooLarge,
        Refusal::TooManyFields,
        Refusal::MalformedStream,
        Refusal::StreamRefused,
        Refusal::ProxyHeader,
    ];

    /// The status it is answered with; None for a stream reset without an answer.
    pub fn status(self) -> Option<StatusCode> {
        Some(match self {
            Refusal::MalformedHead | Refusal::AmbiguousFraming | Refusal::BadHost => {
                StatusCode::BAD_REQUEST
            }
            Refusal::HeadTimeout => StatusCode::REQUEST_TIMEOUT,
            Refusal::TargetTooLong => StatusCode::URI_TOO_LONG,
            Refusal::HeadTooLarge | Refusal::TooManyFields => {
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            }
            Refusal::MalformedStream | Refusal::StreamRefused | Refusal::ProxyHeader => {
                return None
            }
        })
    }

    /// The metric label and access log reason.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::MalformedHead => "malformed_head",
            Refusal::AmbiguousFraming => "ambiguous_framing",
            Refusal::BadHost => "bad_host",
            Refusal::HeadTimeout => "head_timeout",
            Refusal::TargetTooLong => "target_too_long",
            Refusal::HeadTooLarge => "head_too_large",
            Refusal::TooManyFields => "too_many_fields",
            Refusal::MalformedStream => "malformed_stream",
            Refusal::StreamRefused => "stream_refused",
            Refusal::ProxyHeader => "proxy_header",
        }
    }

    /// Its place in `ALL` (and in the refusal counters): `ALL` is in declaration order.
    pub fn index(self) -> usize {
        self as usize
    }
}

#[cfg(test)]
mod tests {
    use super::Refusal;

    #[test]
    fn all_is_in_declaration_order() {
        for (i, r) in Refusal::ALL.iter().enumerate() {
            assert_eq!(r.index(), i, "{r:?}");
        }
    }
}
