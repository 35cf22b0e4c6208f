//! HTTP/1.1 response heads over arbitrary bytes: the parser never panics, consumes nothing
//! while it needs more or refuses, and what it returns is consistent: a 101 is an upgrade
//! and never reusable, HEAD answers and 204/304 have no body.
#![no_main]

use bytes::BytesMut;
use fluxgate_wire::h1::response::{self, ResponseFraming};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let head_request = flags & 1 == 1;
    let mut buf = BytesMut::from(rest);
    let mut spans = Vec::new();
    let before = buf.len();
    match response::parse(&mut buf, &mut spans, head_request) {
        Ok(None) | Err(_) => assert!(buf.len() <= before),
        Ok(Some((parts, framing, reusable))) => {
            let status = parts.status.as_u16();
            if status == 101 {
                assert_eq!(framing, ResponseFraming::Upgrade);
                assert!(!reusable);
            } else if head_request || status == 204 || status == 304 {
                assert_eq!(framing, ResponseFraming::Done);
            }
            if framing == ResponseFraming::Close {
                assert!(!reusable, "a body delimited by close never leaves a reusable connection");
            }
            assert!(!(100..200).contains(&status) || status == 101, "interim answers are skipped");
        }
    }
});
