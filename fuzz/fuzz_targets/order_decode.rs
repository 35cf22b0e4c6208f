//! Arbitrary payloads behind an order, cancel and acknowledgement header: decoding and
//! validation give errors, never panics; whatever decodes re-encodes to the same message
//! (decode(encode(x)) == x).
#![no_main]

use bytes::BytesMut;
use fluxgate_codecs::envelope::{write_frame, Kind};
use fluxgate_codecs::{
    decode_ack, decode_cancel, decode_order, validate_cancel, FrameParser, InstrumentRule,
    OrderEncoder, OrderValidator,
};
use libfuzzer_sys::fuzz_target;

fn frame(kind: Kind, data: &[u8]) -> Option<fluxgate_codecs::Frame> {
    let mut buf = BytesMut::new();
    write_frame(&mut buf, kind, 0, 1, 1, data);
    FrameParser::new(1 << 16).parse(&mut buf).ok().flatten()
}

fn again(encode: impl FnOnce(&mut OrderEncoder, &mut BytesMut)) -> fluxgate_codecs::Frame {
    let mut out = BytesMut::new();
    encode(&mut OrderEncoder::new(), &mut out);
    FrameParser::new(1 << 16).parse(&mut out).unwrap().unwrap()
}

fuzz_target!(|data: &[u8]| {
    if let Some(f) = frame(Kind::NewOrder, data) {
        if let Ok(order) = decode_order(&f) {
            let validator = OrderValidator::new([(1, InstrumentRule { tick_e4: 100 })]);
            let _ = validator.validate(&order, Some(&f));
            let _ = validator.validate(&order, None);
            let f = again(|e, out| e.encode(&order, 0, out));
            assert_eq!(decode_order(&f).expect("our own encoding decodes"), order);
        }
    }
    if let Some(f) = frame(Kind::CancelOrder, data) {
        if let Ok(cancel) = decode_cancel(&f) {
            let _ = validate_cancel(&cancel, Some(&f));
            let f = again(|e, out| e.encode_cancel(&cancel, 0, out));
            assert_eq!(decode_cancel(&f).expect("our own encoding decodes"), cancel);
        }
    }
    if let Some(f) = frame(Kind::OrderAck, data) {
        if let Ok(ack) = decode_ack(&f) {
            let f = again(|e, out| e.encode_ack(&ack, 1, out));
            assert_eq!(decode_ack(&f).expect("our own encoding decodes"), ack);
        }
    }
});
