//! The hot paths allocate nothing: tick parse + verify + routing metadata, and order
//! validation on success. Counted by a global allocator, on this thread only.

use bytes::{Bytes, BytesMut};
use fluxgate_codecs::gen::orders::{NewOrder, OrderType, Side, TimeInForce};
use fluxgate_codecs::tick::Trade;
use fluxgate_codecs::*;
use fluxgate_sys::count_allocations as allocations;

#[global_allocator]
static ALLOC: fluxgate_sys::CountingAlloc = fluxgate_sys::CountingAlloc;

#[test]
fn tick_parse_verify_route_allocates_nothing() {
    let mut stream = BytesMut::with_capacity(4096);
    let mut enc = TickEncoder::new();
    for i in 0..10 {
        enc.encode(
            &TickMsg::Trade(Trade {
                instrument: i,
                seq: i as u64,
                ..Trade::default()
            }),
            0,
            &mut stream,
        );
    }
    let parser = FrameParser::default();
    // The first split of a fresh BytesMut turns its Vec into a shared buffer: one allocation
    // per read buffer, not per message. Take it before counting.
    let first = parser.parse(&mut stream).unwrap().unwrap();
    let mut routed = VerifiedTick::verify(first).unwrap().seq();
    let n = allocations(|| {
        while let Some(frame) = parser.parse(&mut stream).unwrap() {
            let tick = VerifiedTick::verify(frame).unwrap();
            routed += tick.seq() + tick.instrument() as u64;
            let fanout = tick.shared_frame();
            assert!(!fanout.is_empty());
        }
    });
    assert_eq!(routed, 90);
    assert_eq!(n, 0, "allocations on the tick path");
}

#[test]
fn order_validation_allocates_nothing_on_success() {
    let order = NewOrder {
        client_order_id: Some(Bytes::from_static(b"c-1")),
        account: Some(Bytes::from_static(b"a-1")),
        instrument: Some(1),
        side: Some(Side::Sell as i32),
        r#type: Some(OrderType::Limit as i32),
        price_mantissa: Some(995),
        price_scale: Some(1),
        quantity: Some(3),
        time_in_force: Some(TimeInForce::Ioc as i32),
        seq: Some(1),
        client_ts_ns: Some(5),
    };
    let v = OrderValidator::new([(1, InstrumentRule { tick_e4: 500 })]);
    let mut buf = BytesMut::new();
    OrderEncoder::new().encode(&order, 0, &mut buf);
    let frame = FrameParser::default().parse(&mut buf).unwrap().unwrap();
    let decoded = decode_order(&frame).unwrap();
    let n = allocations(|| {
        let valid = v.validate(&decoded, Some(&frame)).unwrap();
        assert_eq!(valid.price_e4, Some(995_000));
    });
    assert_eq!(n, 0, "allocations in validate");
    // Decoding from Bytes points the id fields into the frame.
    let id = decoded.client_order_id.unwrap();
    let range =
        frame.bytes().as_ptr() as usize..frame.bytes().as_ptr() as usize + frame.bytes().len();
    assert!(range.contains(&(id.as_ptr() as usize)));
}
