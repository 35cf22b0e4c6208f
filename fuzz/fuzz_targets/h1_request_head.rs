//! HTTP/1.1 request heads over arbitrary bytes fed in arbitrary pieces: the parser never
//! panics, consumes nothing while it needs more, and a head it accepts, encoded again, parses
//! whole to the same method, target and fields (when it has a Host: HTTP/1.0 may come
//! without, and the encoder's caller supplies one). (A refused head ends the connection, so
//! what a refusal leaves in the buffer does not matter.)
#![no_main]

use bytes::BytesMut;
use fluxgate_wire::h1::request::{self, Limits, RequestFraming};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&step, rest)) = data.split_first() else {
        return;
    };
    let step = usize::from(step).max(1);
    let limits = Limits {
        max_head: 8 << 10,
        max_headers: 64,
    };
    let mut buf = BytesMut::new();
    let mut spans = Vec::new();
    for piece in rest.chunks(step) {
        buf.extend_from_slice(piece);
        let before = buf.len();
        match request::parse(&mut buf, limits, &mut spans) {
            Ok(None) => {
                assert_eq!(buf.len(), before, "nothing consumed");
                continue;
            }
            Err(_) => return,
            // Without a Host (HTTP/1.0 allows it) the HTTP/1.1 head the encoder writes needs
            // one from its caller: nothing to compare.
            Ok(Some(head)) if !head.req.headers().contains_key(http::header::HOST) => return,
            Ok(Some(head)) => {
                let (parts, ()) = head.req.into_parts();
                let body = head.framing.map(|f| match f {
                    RequestFraming::Length(n) => Some(n),
                    RequestFraming::Chunked(_) => None,
                });
                let (encoded, _) = request::encode(&parts, body);
                // Room for the framing field the encoder adds.
                let wider = Limits {
                    max_head: limits.max_head + 64,
                    max_headers: limits.max_headers + 1,
                };
                let mut again = BytesMut::from(&encoded[..]);
                let back = request::parse(&mut again, wider, &mut spans)
                    .expect("an encoded head parses")
                    .expect("whole");
                assert!(again.is_empty(), "the whole encoded head was taken");
                let (back, ()) = back.req.into_parts();
                assert_eq!(back.method, parts.method);
                // Path and query: an absolute-form target with an empty path goes out as "/".
                if parts.uri.path_and_query().is_some() {
                    assert_eq!(back.uri.path(), parts.uri.path());
                    assert_eq!(back.uri.query(), parts.uri.query());
                }
                for (name, value) in &parts.headers {
                    if name != http::header::CONTENT_LENGTH
                        && name != http::header::TRANSFER_ENCODING
                    {
                        assert!(back.headers.get_all(name).iter().any(|v| v == value));
                    }
                }
                return;
            }
        }
    }
});
