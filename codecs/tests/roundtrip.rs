//! Property tests over generated messages: encode then decode gives the message back, every
//! validation error is reachable by name, damaged frames give errors and never panic, and the
//! tick handed on is the very memory it arrived in.

use bytes::{Bytes, BytesMut};
use fluxgate_codecs::gen::orders::{NewOrder, OrderType, Side, TimeInForce};
use fluxgate_codecs::order::Field;
use fluxgate_codecs::tick::{BookLevel, Quote, Side as MdSide, Trade};
use fluxgate_codecs::*;

/// xorshift64*: a small deterministic generator, so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn side(&mut self) -> MdSide {
        [MdSide::Unknown, MdSide::Buy, MdSide::Sell][self.below(3) as usize]
    }
}

fn random_tick(r: &mut Rng) -> TickMsg {
    match r.below(3) {
        0 => TickMsg::Trade(Trade {
            instrument: r.next() as u32,
            seq: r.next(),
            price: r.next() as i64,
            size: r.next() as i64,
            price_scale: r.below(10) as u8,
            aggressor: r.side(),
            exchange_ts_ns: r.next(),
            flags: r.next() as u32,
        }),
        1 => TickMsg::Quote(Quote {
            instrument: r.next() as u32,
            seq: r.next(),
            bid_price: r.next() as i64,
            bid_size: r.next() as i64,
            ask_price: r.next() as i64,
            ask_size: r.next() as i64,
            price_scale: r.below(10) as u8,
            exchange_ts_ns: r.next(),
            flags: r.next() as u32,
        }),
        _ => TickMsg::BookLevel(BookLevel {
            instrument: r.next() as u32,
            seq: r.next(),
            side: r.side(),
            level: r.next() as u16,
            price: r.next() as i64,
            size: r.next() as i64,
            price_scale: r.below(10) as u8,
            exchange_ts_ns: r.next(),
            flags: r.next() as u32,
        }),
    }
}

fn random_order(r: &mut Rng) -> NewOrder {
    let maybe = |r: &mut Rng| r.below(8) != 0;
    let id = |r: &mut Rng| Bytes::from(format!("id-{}", r.below(1_000_000)));
    NewOrder {
        client_order_id: maybe(r).then(|| id(r)),
        account: maybe(r).then(|| id(r)),
        instrument: maybe(r).then(|| r.below(5) as u32),
        side: maybe(r).then(|| r.below(4) as i32),
        r#type: maybe(r).then(|| r.below(4) as i32),
        price_mantissa: maybe(r).then(|| r.next() as i64 % 10_000_000),
        price_scale: maybe(r).then(|| r.below(8) as u32),
        quantity: maybe(r).then(|| r.next() as i64 % 1000),
        time_in_force: maybe(r).then(|| r.below(6) as i32),
        seq: maybe(r).then(|| r.next()),
        client_ts_ns: maybe(r).then(|| r.next()),
    }
}

fn one_frame(bytes: &mut BytesMut) -> Frame {
    FrameParser::default()
        .parse(bytes)
        .expect("valid frame")
        .expect("whole frame")
}

#[test]
fn ticks_round_trip() {
    let mut r = Rng(0x5eed);
    let mut enc = TickEncoder::new();
    for _ in 0..2000 {
        let msg = random_tick(&mut r);
        let mut buf = BytesMut::new();
        enc.encode(&msg, 0, &mut buf);
        let tick = VerifiedTick::verify(one_frame(&mut buf)).expect("verifies");
        assert_eq!(tick.view().to_msg(), msg);
    }
}

#[test]
fn orders_round_trip() {
    let mut r = Rng(0xfeed);
    let mut enc = OrderEncoder::new();
    for _ in 0..2000 {
        let msg = random_order(&mut r);
        let mut buf = BytesMut::new();
        enc.encode(&msg, 0, &mut buf);
        let frame = one_frame(&mut buf);
        assert_eq!(frame.header().instrument, msg.instrument.unwrap_or(0));
        assert_eq!(decode_order(&frame).expect("decodes"), msg);
    }
}

#[test]
fn a_stream_of_mixed_frames_parses_byte_by_byte() {
    let mut r = Rng(7);
    let (mut te, mut oe) = (TickEncoder::new(), OrderEncoder::new());
    let mut stream = BytesMut::new();
    let mut sent = Vec::new();
    for i in 0..200 {
        if i % 3 == 0 {
            let o = random_order(&mut r);
            oe.encode(&o, 0, &mut stream);
            sent.push(Kind::NewOrder);
        } else {
            te.encode(&random_tick(&mut r), 0, &mut stream);
            sent.push(Kind::Tick);
        }
    }
    let parser = FrameParser::default();
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    for &b in stream.iter() {
        buf.extend_from_slice(&[b]);
        while let Some(f) = parser.parse(&mut buf).unwrap() {
            got.push(f.header().kind);
        }
    }
    assert_eq!(got, sent);
}

#[test]
fn the_tick_handed_on_is_the_same_memory() {
    let mut buf = BytesMut::new();
    TickEncoder::new().encode(
        &TickMsg::Trade(Trade {
            instrument: 3,
            seq: 9,
            ..Trade::default()
        }),
        0,
        &mut buf,
    );
    let start = buf.as_ptr() as usize;
    let end = start + buf.len();
    let tick = VerifiedTick::verify(one_frame(&mut buf)).unwrap();
    for shared in [
        tick.shared_frame(),
        tick.payload(),
        tick.clone().shared_frame(),
    ] {
        let p = shared.as_ptr() as usize;
        assert!(
            p >= start && p + shared.len() <= end,
            "copied out of the input"
        );
    }
    assert_eq!(tick.shared_frame().as_ptr() as usize, start);
    assert_eq!((tick.instrument(), tick.seq()), (3, 9));
}

#[test]
fn damaged_frames_give_errors_never_panics() {
    let mut r = Rng(99);
    let mut te = TickEncoder::new();
    let mut oe = OrderEncoder::new();
    let validator = OrderValidator::new([(1, InstrumentRule { tick_e4: 100 })]);
    // Payload damage may leave a message that still decodes (a flipped price bit is another
    // price): those are counted, and some of each kind must be refused.
    let (mut flips_refused, mut cuts_refused) = (0, 0);
    for round in 0..4000 {
        let mut buf = BytesMut::new();
        let tick = round % 2 == 0;
        if tick {
            te.encode(&random_tick(&mut r), 0, &mut buf);
        } else {
            let mut o = good_order();
            o.seq = Some(r.next());
            o.quantity = Some(1 + r.below(1000) as i64);
            oe.encode(&o, 0, &mut buf);
        }
        let len = buf.len();
        match (round / 2) % 4 {
            // The fixed part of the header: every bit is checked (but the one known flag).
            0 => {
                let (i, bit) = loop {
                    let (i, bit) = (r.below(8) as usize, r.below(8) as u8);
                    // Not the one known flag, nor a kind turned into another known kind.
                    let other_kind = i == 3 && (1..=5).contains(&(buf[3] ^ (1 << bit)));
                    if (i, bit) != (4, 0) && !other_kind {
                        break (i, bit);
                    }
                };
                buf[i] ^= 1 << bit;
                let err = FrameParser::default()
                    .parse(&mut buf)
                    .expect_err("a damaged header is refused");
                let named = match i {
                    0 | 1 => matches!(err, FrameError::BadMagic(_)),
                    2 => matches!(err, FrameError::UnsupportedVersion(_)),
                    3 => matches!(err, FrameError::UnknownKind(_)),
                    _ => matches!(err, FrameError::ReservedBits { .. }),
                };
                assert!(named, "byte {i} bit {bit}: {err:?}");
            }
            // The routing metadata: the decoders check it against the payload.
            1 => {
                let i = 12 + r.below(12) as usize;
                buf[i] ^= 1 << r.below(8);
                let frame = one_frame(&mut buf);
                if tick {
                    let err = VerifiedTick::verify(frame).expect_err("metadata mismatch");
                    assert!(matches!(err, TickError::HeaderMismatch { .. }), "{err:?}");
                } else {
                    let o = decode_order(&frame).expect("the payload is intact");
                    let err = validator
                        .validate(&o, Some(&frame))
                        .expect_err("metadata mismatch");
                    assert!(matches!(err, OrderError::HeaderMismatch { .. }), "{err:?}");
                }
            }
            // A few payload bits flipped, or the frame cut short with its length fixed up.
            kind => {
                if kind == 2 {
                    for _ in 0..1 + r.below(4) {
                        let i = 24 + r.below((len - 24) as u64) as usize;
                        buf[i] ^= 1 << r.below(8);
                    }
                } else {
                    let cut = 24 + r.below((len - 24) as u64) as usize;
                    buf.truncate(cut);
                    let plen = (cut - 24) as u32;
                    buf[8..12].copy_from_slice(&plen.to_le_bytes());
                }
                let frame = one_frame(&mut buf);
                let refused = if tick {
                    VerifiedTick::verify(frame)
                        .map(|t| t.view().to_msg())
                        .is_err()
                } else {
                    decode_order(&frame)
                        .and_then(|o| validator.validate(&o, Some(&frame)).map(drop))
                        .is_err()
                };
                match (kind, refused) {
                    (2, true) => flips_refused += 1,
                    (_, true) => cuts_refused += 1,
                    _ => {}
                }
            }
        }
    }
    assert!(
        flips_refused > 100,
        "{flips_refused} of 1000 flipped frames refused"
    );
    assert!(
        cuts_refused > 100,
        "{cuts_refused} of 1000 cut frames refused"
    );
}

fn good_order() -> NewOrder {
    NewOrder {
        client_order_id: Some(Bytes::from_static(b"c-1")),
        account: Some(Bytes::from_static(b"acct-7")),
        instrument: Some(1),
        side: Some(Side::Buy as i32),
        r#type: Some(OrderType::Limit as i32),
        price_mantissa: Some(10_125),
        price_scale: Some(2),
        quantity: Some(10),
        time_in_force: Some(TimeInForce::Day as i32),
        seq: Some(42),
        client_ts_ns: None,
    }
}

#[test]
fn every_validation_error_is_reachable() {
    let v = OrderValidator::new([(1, InstrumentRule { tick_e4: 500 })]);
    let ok = v.validate(&good_order(), None).expect("valid");
    assert_eq!(ok.price_e4, Some(1_012_500));
    assert_eq!(&ok.client_order_id[..], b"c-1");

    let case = |f: &dyn Fn(&mut NewOrder)| {
        let mut o = good_order();
        f(&mut o);
        v.validate(&o, None).unwrap_err()
    };
    use OrderError::*;
    assert_eq!(
        case(&|o| o.client_order_id = None),
        Missing(Field::ClientOrderId)
    );
    assert_eq!(case(&|o| o.account = None), Missing(Field::Account));
    assert_eq!(case(&|o| o.instrument = None), Missing(Field::Instrument));
    assert_eq!(case(&|o| o.seq = None), Missing(Field::Seq));
    assert_eq!(case(&|o| o.side = None), Missing(Field::Side));
    assert_eq!(case(&|o| o.r#type = None), Missing(Field::Type));
    assert_eq!(
        case(&|o| o.time_in_force = None),
        Missing(Field::TimeInForce)
    );
    assert_eq!(case(&|o| o.quantity = None), Missing(Field::Quantity));
    assert_eq!(case(&|o| o.price_mantissa = None), Missing(Field::Price));
    assert_eq!(case(&|o| o.price_scale = None), Missing(Field::PriceScale));
    assert_eq!(
        case(&|o| o.side = Some(9)),
        UnknownEnum {
            field: Field::Side,
            value: 9
        }
    );
    assert_eq!(
        case(&|o| o.r#type = Some(0)),
        UnknownEnum {
            field: Field::Type,
            value: 0
        }
    );
    assert_eq!(
        case(&|o| o.time_in_force = Some(-3)),
        UnknownEnum {
            field: Field::TimeInForce,
            value: -3
        }
    );
    assert_eq!(
        case(&|o| o.client_order_id = Some(Bytes::new())),
        BadIdentifier(Field::ClientOrderId)
    );
    assert_eq!(
        case(&|o| o.account = Some(Bytes::from_static(b"has space"))),
        BadIdentifier(Field::Account)
    );
    assert_eq!(case(&|o| o.quantity = Some(0)), NonPositiveQuantity(0));
    assert_eq!(case(&|o| o.quantity = Some(-5)), NonPositiveQuantity(-5));
    assert_eq!(case(&|o| o.price_mantissa = Some(-1)), NonPositivePrice(-1));
    assert_eq!(
        case(&|o| {
            o.price_mantissa = Some(101_251);
            o.price_scale = Some(5)
        }),
        TooManyDecimals {
            mantissa: 101_251,
            scale: 5
        }
    );
    assert_eq!(
        case(&|o| o.price_mantissa = Some(10_126)),
        OffTick {
            price_e4: 1_012_600,
            tick_e4: 500
        }
    );
    assert!(matches!(
        case(&|o| {
            o.price_mantissa = Some(i64::MAX);
            o.price_scale = Some(0)
        }),
        PriceOutOfRange { .. }
    ));
    assert_eq!(
        case(&|o| o.r#type = Some(OrderType::Market as i32)),
        PriceOnMarketOrder
    );
    assert_eq!(case(&|o| o.instrument = Some(2)), UnknownInstrument(2));

    // Market orders without a price are fine.
    let mut m = good_order();
    m.r#type = Some(OrderType::Market as i32);
    m.price_mantissa = None;
    m.price_scale = None;
    assert_eq!(v.validate(&m, None).unwrap().price_e4, None);

    // Header and payload must agree; frames of the other kind are refused by each decoder.
    let mut buf = BytesMut::new();
    OrderEncoder::new().encode(&good_order(), 0, &mut buf);
    buf[12] = 5;
    let frame = one_frame(&mut buf);
    assert!(matches!(
        v.validate(&decode_order(&frame).unwrap(), Some(&frame)),
        Err(HeaderMismatch { .. })
    ));
    assert!(matches!(
        VerifiedTick::verify(frame),
        Err(TickError::WrongKind(Kind::NewOrder))
    ));
    let mut buf = BytesMut::new();
    TickEncoder::new().encode(&TickMsg::Trade(Trade::default()), 0, &mut buf);
    let frame = one_frame(&mut buf);
    assert!(matches!(decode_order(&frame), Err(WrongKind(Kind::Tick))));
    let mut buf =
        BytesMut::from(&b"FG\x01\x02\0\0\0\0\x02\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\xff\xff"[..]);
    assert!(matches!(decode_order(&one_frame(&mut buf)), Err(Decode(_))));
}

#[test]
fn tick_header_must_match_payload() {
    let mut buf = BytesMut::new();
    TickEncoder::new().encode(
        &TickMsg::Quote(Quote {
            instrument: 4,
            seq: 8,
            ..Quote::default()
        }),
        0,
        &mut buf,
    );
    buf[16] = 9;
    assert!(matches!(
        VerifiedTick::verify(one_frame(&mut buf)),
        Err(TickError::HeaderMismatch {
            seq: 8,
            header_seq: 9,
            ..
        })
    ));
}

#[test]
fn cancels_and_acks_round_trip() {
    use fluxgate_codecs::gen::orders::{AckStatus, CancelOrder, OrderAck, RejectReason};
    let mut r = Rng(0xcafe);
    let mut enc = OrderEncoder::new();
    let id = |r: &mut Rng| Bytes::from(format!("id-{}", r.below(1_000_000)));
    for _ in 0..500 {
        let cancel = CancelOrder {
            client_order_id: Some(id(&mut r)),
            account: Some(id(&mut r)),
            orig_client_order_id: Some(id(&mut r)),
            instrument: Some(r.below(9) as u32),
            seq: Some(r.next()),
        };
        let mut buf = BytesMut::new();
        enc.encode_cancel(&cancel, 0, &mut buf);
        let frame = one_frame(&mut buf);
        assert_eq!(frame.header().kind, Kind::CancelOrder);
        let back = decode_cancel(&frame).expect("decodes");
        assert_eq!(back, cancel);
        let valid = validate_cancel(&back, Some(&frame)).expect("valid");
        assert_eq!(
            valid.orig_client_order_id,
            cancel.orig_client_order_id.unwrap()
        );
        assert!(decode_order(&frame).is_err(), "a cancel is not an order");

        let ack = OrderAck {
            client_order_id: Some(id(&mut r)),
            account: Some(id(&mut r)),
            status: Some(1 + r.below(4) as i32),
            reason: (r.below(2) == 0).then(|| 1 + r.below(10) as i32),
            text: Some(format!("t{}", r.below(99))),
            upstream_status: (r.below(2) == 0).then(|| 200 + r.below(300) as u32),
            upstream_body: (r.below(2) == 0).then(|| id(&mut r)),
            seq: Some(r.next()),
        };
        let mut buf = BytesMut::new();
        enc.encode_ack(&ack, 7, &mut buf);
        let frame = one_frame(&mut buf);
        assert_eq!(
            (
                frame.header().kind,
                frame.header().instrument,
                frame.header().seq
            ),
            (Kind::OrderAck, 7, ack.seq.unwrap())
        );
        assert_eq!(decode_ack(&frame).expect("decodes"), ack);
    }
    // Every field of a cancel is required.
    let good = CancelOrder {
        client_order_id: Some(Bytes::from_static(b"x-1")),
        account: Some(Bytes::from_static(b"a")),
        orig_client_order_id: Some(Bytes::from_static(b"c-1")),
        instrument: Some(1),
        seq: Some(2),
    };
    assert!(validate_cancel(&good, None).is_ok());
    let missing: [fn(&mut CancelOrder); 5] = [
        |c| c.client_order_id = None,
        |c| c.account = None,
        |c| c.orig_client_order_id = None,
        |c| c.instrument = None,
        |c| c.seq = None,
    ];
    for f in missing {
        let mut c = good.clone();
        f(&mut c);
        assert!(matches!(
            validate_cancel(&c, None),
            Err(OrderError::Missing(_))
        ));
    }
    let mut c = good.clone();
    c.orig_client_order_id = Some(Bytes::from_static(b"has space"));
    assert!(matches!(
        validate_cancel(&c, None),
        Err(OrderError::BadIdentifier(_))
    ));
    assert_eq!(AckStatus::try_from(3), Ok(AckStatus::UpstreamAccepted));
    assert_eq!(RejectReason::try_from(6), Ok(RejectReason::RateLimit));
}
