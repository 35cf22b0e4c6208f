//! HTTP/1.1 on the wire (RFC 9112): heads parsed by httparse into header maps whose values
//! keep pointing into the head's bytes (`request`, `response`), body framing, and the chunked
//! coding, for our server and our client alike.

pub mod request;
pub mod response;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Why HTTP/1.1 fields or a chunked body cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FieldError {
    /// A field name that is not a token.
    #[error("bad header name")]
    BadName,
    /// A field value with bytes a value may not hold.
    #[error("bad header value")]
    BadValue,
    /// Content-Length that is not a decimal number of at most 19 digits.
    #[error("bad content-length")]
    BadContentLength,
    /// Content-Length values that disagree.
    #[error("conflicting content-length")]
    ConflictingLengths,
    /// A chunk size that is not hexadecimal.
    #[error("bad chunk size")]
    BadChunkSize,
    /// Chunk data not followed by CRLF.
    #[error("chunk not followed by CRLF")]
    ChunkNotTerminated,
    /// A chunk-size line, or the trailers, over their limits.
    #[error("chunk line too long")]
    ChunkLineTooLong,
}

/// The longest chunk-size line, and the most trailer bytes, accepted.
const MAX_CHUNK_LINE: usize = 1024;
const MAX_TRAILERS: usize = 16 * 1024;

/// Where a field's name and value lie in its head: name start and end, value start and end.
pub type Span = [usize; 4];

/// Records where each field httparse found lies in `head` (the buffer it parsed).
pub fn field_spans(head: &[u8], fields: &[httparse::Header<'_>], spans: &mut Vec<Span>) {
    let base = head.as_ptr() as usize;
    spans.clear();
    spans.extend(fields.iter().map(|f| {
        let n = f.name.as_ptr() as usize - base;
        let v = f.value.as_ptr() as usize - base;
        [n, n + f.name.len(), v, v + f.value.len()]
    }));
}

/// The header map of a head split off its buffer, with room for `extra` more fields; values
/// share the head's bytes.
pub fn header_map(head: &Bytes, spans: &[Span], extra: usize) -> Result<HeaderMap, FieldError> {
    let mut headers = HeaderMap::with_capacity(spans.len() + extra);
    for &[n0, n1, v0, v1] in spans {
        let name = HeaderName::from_bytes(&head[n0..n1]).map_err(|_| FieldError::BadName)?;
        let value =
            HeaderValue::from_maybe_shared(head.slice(v0..v1)).map_err(|_| FieldError::BadValue)?;
        headers.append(name, value);
    }
    Ok(headers)
}

/// The message's Content-Length: None when absent; an error when malformed or when its
/// values disagree (RFC 9112 6.3: a list of equal values is one value).
pub fn content_length(headers: &HeaderMap) -> Result<Option<u64>, FieldError> {
    let mut length: Option<u64> = None;
    for v in headers.get_all(header::CONTENT_LENGTH) {
        for part in v
            .to_str()
            .map_err(|_| FieldError::BadContentLength)?
            .split(',')
        {
            let part = part.trim();
            if part.is_empty() || part.len() > 19 || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(FieldError::BadContentLength);
            }
            let n: u64 = part.parse().map_err(|_| FieldError::BadContentLength)?;
            if length.is_some_and(|l| l != n) {
                return Err(FieldError::ConflictingLengths);
            }
            length = Some(n);
        }
    }
    Ok(length)
}

/// Whether the last transfer coding is chunked (the only way a chunked body is delimited).
pub fn chunked_last(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .next_back()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"))
}

/// Writes `name: value` lines, one per field.
pub fn put_fields<'a>(
    out: &mut impl BufMut,
    fields: impl IntoIterator<Item = (&'a HeaderName, &'a HeaderValue)>,
) {
    for (name, value) in fields {
        out.put_slice(name.as_str().as_bytes());
        out.put_slice(b": ");
        out.put_slice(value.as_bytes());
        out.put_slice(b"\r\n");
    }
}

/// Where the chunked decoder is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    /// Trailer bytes seen so far; `usize::MAX` once the body has ended.
    Trailers(usize),
}

impl Chunk {
    pub fn ended(self) -> bool {
        self == Chunk::Trailers(usize::MAX)
    }
}

/// Advances the chunked decoder over `buf`: Some(data) for body bytes, None when more bytes
/// are needed or when the body has ended (`state.ended()`). Trailer fields are dropped.
pub fn decode_chunk(state: &mut Chunk, buf: &mut BytesMut) -> Result<Option<Bytes>, FieldError> {
    loop {
        match *state {
            Chunk::Size => {
                let Some(end) = find_crlf(buf, MAX_CHUNK_LINE)? else {
                    return Ok(None);
                };
                let line = &buf[..end];
                let digits = line
                    .iter()
                    .position(|b| !b.is_ascii_hexdigit())
                    .unwrap_or(line.len());
                let rest = &line[digits..];
                let ext_ok =
                    rest.is_empty() || rest[0] == b';' || rest[0] == b' ' || rest[0] == b'\t';
                if digits == 0 || digits > 15 || !ext_ok {
                    return Err(FieldError::BadChunkSize);
                }
                let size = line[..digits].iter().fold(0u64, |n, &d| {
                    n * 16 + (d as char).to_digit(16).unwrap_or(0) as u64
                });
                buf.advance(end + 2);
                *state = if size == 0 {
                    Chunk::Trailers(0)
                } else {
                    Chunk::Data(size)
                };
            }
            Chunk::Data(left) => {
                if buf.is_empty() {
                    return Ok(None);
                }
                let n = left.min(buf.len() as u64) as usize;
                *state = if n as u64 == left {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(left - n as u64)
                };
                return Ok(Some(buf.split_to(n).freeze()));
            }
            Chunk::DataEnd => {
                if buf.len() < 2 {
                    return Ok(None);
                }
                if &buf[..2] != b"\r\n" {
                    return Err(FieldError::ChunkNotTerminated);
                }
                buf.advance(2);
                *state = Chunk::Size;
            }
            Chunk::Trailers(usize::MAX) => return Ok(None),
            Chunk::Trailers(seen) => {
                let Some(end) = find_crlf(buf, MAX_TRAILERS - seen)? else {
                    return Ok(None);
                };
                buf.advance(end + 2);
                *state = Chunk::Trailers(if end == 0 { usize::MAX } else { seen + end + 2 });
            }
        }
    }
}

/// The position of the first CRLF in `buf`, looking at no more than `limit` bytes.
fn find_crlf(buf: &[u8], limit: usize) -> Result<Option<usize>, FieldError> {
    match buf.windows(2).take(limit).position(|w| w == b"\r\n") {
        Some(i) => Ok(Some(i)),
        None if buf.len() > limit => Err(FieldError::ChunkLineTooLong),
        None => Ok(None),
    }
}

/// Whether the Connection header lists `token` (case-insensitive).
pub fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(wire: &[u8], split: usize) -> Result<(Vec<u8>, bool), FieldError> {
        let mut state = Chunk::Size;
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in wire.chunks(split) {
            buf.extend_from_slice(piece);
            while let Some(d) = decode_chunk(&mut state, &mut buf)? {
                out.extend_from_slice(&d);
            }
        }
        Ok((out, state.ended()))
    }

    #[test]
    fn chunked_bodies_decode_however_they_are_split() {
        let wire = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nx-t: 1\r\n\r\n";
        for split in 1..wire.len() {
            let (out, done) = decode_all(wire, split).unwrap();
            assert_eq!(out, b"hello, world");
            assert!(done, "split {split}");
        }
    }

    #[test]
    fn bad_chunks_are_refused() {
        for wire in [
            &b"zz\r\nhi\r\n0\r\n\r\n"[..],
            b"2\r\nhiXX0\r\n\r\n",
            b"-1\r\n",
            b"ffffffffffffffffff\r\n",
        ] {
            assert!(decode_all(wire, wire.len()).is_err(), "{wire:?}");
        }
        assert!(
            decode_all(&[b'1'; 2000], 2000).is_err(),
            "endless size line"
        );
    }

    #[test]
    fn content_lengths() {
        let map = |vals: &[&'static str]| {
            let mut h = HeaderMap::new();
            for v in vals {
                h.append(header::CONTENT_LENGTH, HeaderValue::from_static(v));
            }
            content_length(&h)
        };
        assert_eq!(map(&[]), Ok(None));
        assert_eq!(map(&["5"]), Ok(Some(5)));
        assert_eq!(map(&["5", "5, 5"]), Ok(Some(5)));
        for bad in [
            &["4", "5"][..],
            &["+1"],
            &["-1"],
            &[""],
            &["1 2"],
            &["99999999999999999999"],
        ] {
            assert!(map(bad).is_err(), "{bad:?}");
        }
    }
}
