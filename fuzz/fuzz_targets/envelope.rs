//! The frame parser over arbitrary byte streams, fed in arbitrary pieces: it never panics,
//! never consumes on error or on "need more", and every frame it returns re-encodes to the
//! bytes it was cut from.
#![no_main]

use bytes::BytesMut;
use fluxgate_codecs::envelope::write_frame;
use fluxgate_codecs::FrameParser;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&step, rest)) = data.split_first() else {
        return;
    };
    let step = usize::from(step).max(1);
    let parser = FrameParser::new(4096);
    let mut buf = BytesMut::new();
    for piece in rest.chunks(step) {
        buf.extend_from_slice(piece);
        loop {
            let before = buf.len();
            match parser.parse(&mut buf) {
                Ok(Some(frame)) => {
                    let h = *frame.header();
                    let mut again = BytesMut::new();
                    write_frame(&mut again, h.kind, h.flags, h.instrument, h.seq, frame.payload_slice());
                    assert_eq!(&again[..], &frame.bytes()[..]);
                }
                Ok(None) => {
                    assert_eq!(buf.len(), before);
                    break;
                }
                Err(_) => {
                    assert_eq!(buf.len(), before);
                    return;
                }
            }
        }
    }
});
