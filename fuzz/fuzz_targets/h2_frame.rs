//! HTTP/2 frame heads over arbitrary bytes: the decoder never panics, says "more" until the
//! whole frame is in, refuses lengths over the limit, and a head it returns writes back to
//! the same 9 bytes (the stream id's reserved bit cleared).
#![no_main]

use fluxgate_wire::h2::frame::{FrameHead, HEAD_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some(head)) = FrameHead::parse(rest, 16_384) {
        assert!(rest.len() >= HEAD_LEN + head.len);
        let mut again = Vec::new();
        head.write(&mut again);
        assert_eq!(&again[..5], &rest[..5]);
        assert_eq!(&again[5..9], &(u32::from_be_bytes(rest[5..9].try_into().unwrap()) & 0x7fff_ffff).to_be_bytes());
        rest = &rest[HEAD_LEN + head.len..];
    }
    if let Ok(None) = FrameHead::parse(rest, 16_384) {
        let len = rest.get(..3).map(|l| u32::from_be_bytes([0, l[0], l[1], l[2]]) as usize);
        assert!(rest.len() < HEAD_LEN || rest.len() < HEAD_LEN + len.unwrap_or(0));
    }
});
