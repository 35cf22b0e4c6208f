//! Arbitrary payloads behind an order header: decoding and validation give errors, never
//! panics; whatever decodes re-encodes to the same message (decode(encode(x)) == x).
#![no_main]

use bytes::BytesMut;
use fluxgate_codecs::envelope::{write_frame, Kind};
use fluxgate_codecs::{decode_order, FrameParser, InstrumentRule, OrderEncoder, OrderValidator};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::new();
    write_frame(&mut buf, Kind::NewOrder, 0, 1, 1, data);
    let Ok(Some(frame)) = FrameParser::new(1 << 16).parse(&mut buf) else {
        return;
    };
    let Ok(order) = decode_order(&frame) else {
        return;
    };
    let validator = OrderValidator::new([(1, InstrumentRule { tick_e4: 100 })]);
    let _ = validator.validate(&order, Some(&frame));
    let _ = validator.validate(&order, None);
    let mut again = BytesMut::new();
    OrderEncoder::new().encode(&order, 0, &mut again);
    let frame = FrameParser::new(1 << 16).parse(&mut again).unwrap().unwrap();
    assert_eq!(decode_order(&frame).expect("our own encoding decodes"), order);
});
