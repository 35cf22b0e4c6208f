//! Arbitrary payloads behind a valid tick header: the verifier refuses or accepts without
//! panicking, and an accepted tick reads back every field and re-encodes to a tick with the
//! same values (decode(encode(x)) == x).
#![no_main]

use bytes::BytesMut;
use fluxgate_codecs::envelope::{write_frame, Kind};
use fluxgate_codecs::{FrameParser, TickEncoder, VerifiedTick};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 12 {
        return;
    }
    let instrument = u32::from_le_bytes(data[..4].try_into().unwrap());
    let seq = u64::from_le_bytes(data[4..12].try_into().unwrap());
    let mut buf = BytesMut::new();
    write_frame(&mut buf, Kind::Tick, 0, instrument, seq, &data[12..]);
    let Ok(Some(frame)) = FrameParser::new(1 << 16).parse(&mut buf) else {
        return;
    };
    let Ok(tick) = VerifiedTick::verify(frame) else {
        return;
    };
    let msg = tick.view().to_msg();
    let mut again = BytesMut::new();
    TickEncoder::new().encode(&msg, 0, &mut again);
    let frame = FrameParser::new(1 << 16).parse(&mut again).unwrap().unwrap();
    let round = VerifiedTick::verify(frame).expect("our own encoding verifies");
    assert_eq!(round.view().to_msg(), msg);
});
