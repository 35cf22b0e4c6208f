//! The chunked decoder over arbitrary bytes fed in arbitrary pieces: it never panics, never
//! yields more bytes than came in, and a body it decodes to the end, chunk-coded again in one
//! chunk, decodes to the same bytes.
#![no_main]

use bytes::BytesMut;
use fluxgate_wire::h1::{decode_chunk, Chunk};
use libfuzzer_sys::fuzz_target;

fn decode_all(input: &[u8], step: usize) -> Option<Vec<u8>> {
    let mut state = Chunk::Size;
    let mut buf = BytesMut::new();
    let mut body = Vec::new();
    for piece in input.chunks(step) {
        buf.extend_from_slice(piece);
        loop {
            match decode_chunk(&mut state, &mut buf) {
                Err(_) => return None,
                Ok(Some(data)) => body.extend_from_slice(&data),
                Ok(None) if state.ended() => return Some(body),
                Ok(None) => break,
            }
        }
    }
    None
}

fuzz_target!(|data: &[u8]| {
    let Some((&step, rest)) = data.split_first() else {
        return;
    };
    let step = usize::from(step).max(1);
    if let Some(body) = decode_all(rest, step) {
        assert!(body.len() <= rest.len());
        let mut again = format!("{:x}\r\n", body.len()).into_bytes();
        if !body.is_empty() {
            again.extend_from_slice(&body);
            again.extend_from_slice(b"\r\n0\r\n");
        }
        again.extend_from_slice(b"\r\n");
        assert_eq!(decode_all(&again, again.len()), Some(body));
    }
});
