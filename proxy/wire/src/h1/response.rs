//! The response role: a response head parsed at the front of the read buffer (1xx interim
//! answers other than 101 skipped), with its body framing and whether the connection may be
//! reused after it.

use bytes::{Buf, BytesMut};
use http::header::{self, HeaderMap};
use http::{Response, StatusCode, Version};

use super::{chunked_last, connection_has, content_length, field_spans, header_map, Chunk, Span};

/// The largest response head accepted, and the most header fields in it.
const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 128;

/// Why a response head cannot be taken as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    /// Over 64 KiB without its end.
    #[error("response head too large")]
    TooLarge,
    /// More than 128 fields.
    #[error("too many header fields")]
    TooManyFields,
    /// Not an HTTP/1.x response head.
    #[error("bad response head")]
    Malformed,
    /// A status code outside 100..=999.
    #[error("bad status code")]
    BadStatus,
    /// Content-Length with Transfer-Encoding: the length is a guess either way.
    #[error("content-length with transfer-encoding")]
    AmbiguousLength,
    /// A field or its framing is bad.
    #[error(transparent)]
    Field(#[from] super::FieldError),
}

/// How the response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ResponseFraming {
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
pub fn parse(
    buf: &mut BytesMut,
    spans: &mut Vec<Span>,
    head_request: bool,
) -> Result<Option<(http::response::Parts, ResponseFraming, bool)>, ResponseError> {
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
            // However it arrived: a head that came whole in one read is held to the limit too.
            Ok(httparse::Status::Complete(len)) if len > MAX_HEAD => {
                return Err(ResponseError::TooLarge)
            }
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
                return Err(ResponseError::TooLarge)
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(ResponseError::TooManyFields),
            Err(_) => return Err(ResponseError::Malformed),
        };
        let code = resp.code.unwrap_or(0);
        let status = StatusCode::from_u16(code).map_err(|_| ResponseError::BadStatus)?;
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
        let headers = header_map(&head, spans, 0).map_err(ResponseError::Field)?;
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
) -> Result<(ResponseFraming, bool), ResponseError> {
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Ok((ResponseFraming::Upgrade, false));
    }
    if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok((ResponseFraming::Done, true));
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        if headers.contains_key(header::CONTENT_LENGTH) {
            // Either could be the truth: refuse rather than pass on a body of unknown length.
            return Err(ResponseError::AmbiguousLength);
        }
        return Ok(if chunked_last(headers) {
            (ResponseFraming::Chunked(Chunk::Size), true)
        } else {
            (ResponseFraming::Close, false)
        });
    }
    let length = content_length(headers).map_err(ResponseError::Field)?;
    Ok(match length {
        Some(0) => (ResponseFraming::Done, true),
        Some(n) => (ResponseFraming::Length(n), true),
        None => (ResponseFraming::Close, false),
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

/// `HTTP/1.1 200 OK`, and the like.
pub fn put_status_line(w: &mut Vec<u8>, status: StatusCode) {
    if status == StatusCode::OK {
        w.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        return;
    }
    w.extend_from_slice(b"HTTP/1.1 ");
    w.extend_from_slice(status.as_str().as_bytes());
    w.push(b' ');
    w.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    w.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_framing() {
        let head = |raw: &[u8], head_req: bool| {
            let mut b = BytesMut::from(raw);
            parse(&mut b, &mut Vec::new(), head_req)
                .map(|h| h.map(|(p, f, r)| (p.status.as_u16(), f, r)))
        };
        let ok = head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", false).unwrap();
        assert_eq!(ok, Some((200, ResponseFraming::Length(5), true)));
        let cont = head(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No\r\n\r\n",
            false,
        )
        .unwrap();
        assert_eq!(cont, Some((204, ResponseFraming::Done, true)));
        let chunked = head(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
        );
        assert_eq!(
            chunked.unwrap(),
            Some((200, ResponseFraming::Chunked(Chunk::Size), true))
        );
        let close = head(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", false).unwrap();
        assert_eq!(close, Some((200, ResponseFraming::Close, false)));
        let old = head(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false).unwrap();
        assert_eq!(old, Some((200, ResponseFraming::Length(1), false)));
        let head_req = head(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true).unwrap();
        assert_eq!(head_req, Some((200, ResponseFraming::Done, true)));
        assert_eq!(head(b"HTTP/1.1 200 OK\r\nContent-Le", false).unwrap(), None);
        assert!(head(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            false
        )
        .is_err());
        assert!(head(b"HTTP/1.1 200 OK\r\nContent-Length: +1\r\n\r\n", false).is_err());
        assert!(head(b"HTTP/1.1 2000 OK\r\n\r\n", false).is_err());
        assert!(head(b"SSH-2.0-OpenSSH\r\n\r\n", false).is_err());
        // Over the limit, even when it came whole in one read.
        let long = format!(
            "HTTP/1.1 200 OK\r\nX-Long: {}\r\n\r\n",
            "v".repeat(70 << 10)
        );
        assert_eq!(
            head(long.as_bytes(), false).unwrap_err(),
            ResponseError::TooLarge
        );
    }
}
