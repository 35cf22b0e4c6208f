//! The request role: a request head parsed at the front of the read buffer, with the body
//! framing it declares, or the reason it is refused.

use std::mem::MaybeUninit;

use std::fmt::Write as _;

use bytes::{BufMut, Bytes, BytesMut};
use http::request::Parts;
use http::{header, Method, Request, Uri, Version};

use super::{chunked_last, content_length, field_spans, header_map, put_fields, Chunk, Span};

/// Header fields parsed in place on the stack; a higher `max_headers` parses on the heap.
const STACK_FIELDS: usize = 128;

/// The limits a request head must keep.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The most bytes a head may take.
    pub max_head: usize,
    /// The most header fields.
    pub max_headers: usize,
}

/// A request head, parsed; its values point into the head's bytes.
#[derive(Debug)]
pub struct RequestHead {
    pub req: Request<()>,
    /// None: no body.
    pub framing: Option<RequestFraming>,
}

/// How a request body is delimited.
#[derive(Debug, Clone, Copy)]
pub enum RequestFraming {
    /// This many bytes remain.
    Length(u64),
    Chunked(Chunk),
}

/// Why a request head is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadError {
    /// It does not parse.
    Malformed,
    /// It leaves the body's length ambiguous (RFC 9112 6.1, 6.3): Content-Length with
    /// Transfer-Encoding, two lengths, a last coding other than chunked, chunked on 1.0.
    AmbiguousFraming,
    /// More fields than `max_headers`.
    TooManyFields,
    /// Over `max_head` bytes.
    HeadTooLarge,
    /// Its request line alone is over `max_head` bytes.
    TargetTooLong,
    /// An HTTP/1.1 request with no Host, or any request with two (RFC 9112 3.2).
    BadHost,
}

/// Parses the request head at the front of `buf`, splitting it off when complete. Ok(None):
/// more bytes are needed. Err: why it is refused.
pub fn parse(
    buf: &mut BytesMut,
    limits: Limits,
    spans: &mut Vec<Span>,
) -> Result<Option<RequestHead>, HeadError> {
    let bad = HeadError::Malformed;
    let ambiguous = HeadError::AmbiguousFraming;
    // Left uninitialised: httparse writes each slot it uses, and clearing 128 slots per head
    // would cost more than the parse.
    let mut stack = [const { MaybeUninit::uninit() }; STACK_FIELDS];
    let mut heap = Vec::new();
    let fields = if limits.max_headers <= STACK_FIELDS {
        &mut stack[..limits.max_headers]
    } else {
        heap.resize_with(limits.max_headers, MaybeUninit::uninit);
        &mut heap[..]
    };
    let mut parsed = httparse::Request::new(&mut []);
    let len = match parsed.parse_with_uninit_headers(buf, fields) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyFields),
        Err(_) => return Err(bad),
    };
    if len > limits.max_head {
        return Err(too_large(buf, limits.max_head));
    }
    let method = Method::from_bytes(parsed.method.unwrap_or("").as_bytes()).map_err(|_| bad)?;
    let version = match parsed.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let target = parsed.path.unwrap_or("");
    let base = buf.as_ptr() as usize;
    let target = target.as_ptr() as usize - base..target.as_ptr() as usize - base + target.len();
    field_spans(buf, parsed.headers, spans);
    let head = buf.split_to(len).freeze();
    let uri = Uri::from_maybe_shared(head.slice(target)).map_err(|_| bad)?;
    // Room for what the proxy adds: X-Forwarded-For, -Proto, -Host, and Host.
    let headers = header_map(&head, spans, 4).map_err(|_| bad)?;
    let framing = if headers.contains_key(header::TRANSFER_ENCODING) {
        // Both, or a coding other than chunked last, leave the length to guesswork: the shape
        // of request smuggling (RFC 9112 6.1, 6.3).
        if headers.contains_key(header::CONTENT_LENGTH)
            || version == Version::HTTP_10
            || !chunked_last(&headers)
        {
            return Err(ambiguous);
        }
        Some(RequestFraming::Chunked(Chunk::Size))
    } else {
        match content_length(&headers).map_err(|_| ambiguous)? {
            None | Some(0) => None,
            Some(n) => Some(RequestFraming::Length(n)),
        }
    };
    // An HTTP/1.1 request carries exactly one Host (RFC 9112 3.2); with a target in absolute
    // form, the target's authority is the host whatever Host says (3.2.2).
    let mut headers = headers;
    let hosts = headers.get_all(header::HOST).iter().count();
    if hosts > 1 || (hosts == 0 && version == Version::HTTP_11) {
        return Err(HeadError::BadHost);
    }
    if let (Some(_), Some(authority)) = (uri.scheme(), uri.authority()) {
        let host = http::HeaderValue::from_str(authority.as_str()).map_err(|_| bad)?;
        headers.insert(header::HOST, host);
    }
    let mut req = Request::new(());
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = version;
    *req.headers_mut() = headers;
    Ok(Some(RequestHead { req, framing }))
}

/// Why a head is over `max_head` bytes: its request line alone, or its fields.
pub fn too_large(head: &[u8], max_head: usize) -> HeadError {
    if head[..max_head].contains(&b'\n') {
        HeadError::HeadTooLarge
    } else {
        HeadError::TargetTooLong
    }
}

/// How the request body is framed on the wire.
#[derive(Clone, Copy, PartialEq)]
enum ReqFraming {
    None,
    Length(u64),
    Chunked,
}

/// Serializes a request head (hop-by-hop headers already removed by the caller) with the
/// framing its body needs: `body` is None for no body, else the body's exact length if
/// known. Returns the head and whether the body is to be chunk-coded.
pub fn encode(parts: &Parts, body: Option<Option<u64>>) -> (Bytes, bool) {
    let framing = match body {
        None => {
            let has_len = parts.headers.contains_key(header::CONTENT_LENGTH);
            if has_len || matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) {
                ReqFraming::Length(0)
            } else {
                ReqFraming::None
            }
        }
        Some(Some(n)) => ReqFraming::Length(n),
        Some(None) => ReqFraming::Chunked,
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
    // An absolute-form target with an empty path ("http://a?q") goes out as "/?q" (RFC 9112
    // 3.2.1: the path of the origin form is never empty).
    if target.starts_with('?') {
        out.put_u8(b'/');
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Result<Option<RequestHead>, HeadError> {
        let limits = Limits {
            max_head: 1024,
            max_headers: 8,
        };
        super::parse(&mut BytesMut::from(raw), limits, &mut Vec::new())
    }

    #[test]
    fn heads_and_their_framing() {
        let h = parse(b"POST /a?b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
            .unwrap()
            .unwrap();
        assert_eq!(h.req.uri().path(), "/a");
        assert_eq!(h.req.headers()["host"], "x");
        assert!(matches!(h.framing, Some(RequestFraming::Length(3))));
        let h = parse(b"GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert_eq!(h.req.version(), Version::HTTP_10);
        assert!(h.framing.is_none());
        let h = parse(b"PUT / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n");
        assert!(matches!(
            h,
            Ok(Some(RequestHead {
                framing: Some(RequestFraming::Chunked(_)),
                ..
            }))
        ));
        assert!(parse(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap().is_none());
    }

    #[test]
    fn ambiguous_or_malformed_heads_are_refused() {
        let bad = |raw: &[u8]| parse(raw).err();
        let r400 = Some(HeadError::Malformed);
        let ambiguous = Some(HeadError::AmbiguousFraming);
        assert_eq!(
            bad(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            ambiguous
        );
        assert_eq!(
            bad(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"),
            ambiguous
        );
        assert_eq!(
            bad(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
            ambiguous
        );
        assert_eq!(
            bad(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            ambiguous
        );
        assert_eq!(bad(b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n"), r400);
        assert_eq!(bad(b"GET /\x01 HTTP/1.1\r\n\r\n"), r400);
        assert_eq!(
            bad(b"GET / HTTP/1.1\r\na: 1\r\nb: 1\r\nc: 1\r\nd: 1\r\ne: 1\r\nf: 1\r\ng: 1\r\nh: 1\r\ni: 1\r\n\r\n"),
            Some(HeadError::TooManyFields)
        );
    }

    #[test]
    fn an_empty_path_goes_out_as_a_slash() {
        let head = parse(b"GET http://a.example?q=1 HTTP/1.1\r\nHost: b\r\n\r\n")
            .unwrap()
            .unwrap();
        let (parts, ()) = head.req.into_parts();
        let (encoded, chunked) = encode(&parts, None);
        assert!(!chunked);
        assert!(
            encoded.starts_with(b"GET /?q=1 HTTP/1.1\r\n"),
            "{encoded:?}"
        );
    }

    #[test]
    fn one_host_and_the_absolute_form_wins() {
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\n\r\n").unwrap_err(),
            HeadError::BadHost
        );
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n").unwrap_err(),
            HeadError::BadHost
        );
        assert_eq!(
            parse(b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n").unwrap_err(),
            HeadError::BadHost
        );
        assert!(
            parse(b"GET / HTTP/1.0\r\n\r\n").unwrap().is_some(),
            "1.0 needs none"
        );
        let h = parse(b"GET http://a.example:8080/p HTTP/1.1\r\nHost: other\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.req.headers()["host"], "a.example:8080");
        assert_eq!(h.req.headers().get_all("host").iter().count(), 1);
    }
}
