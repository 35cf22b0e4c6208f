//! Messages encoded by independent implementations (Python's `flatbuffers` and `protobuf`
//! packages, code generated from the same schema files) decode, verify and validate here.
//! scripts/interop.sh prepares the input (it installs the Python packages in a venv under
//! target/ on first use).

use std::path::Path;
use std::process::Command;

use bytes::BytesMut;
use fluxgate_codecs::gen::orders::{OrderType, Side, TimeInForce};
use fluxgate_codecs::tick::{BookLevel, Quote, Side as MdSide, Trade};
use fluxgate_codecs::*;

fn md_side(v: &str) -> MdSide {
    MdSide(v.parse().unwrap())
}

#[test]
fn python_encoded_ticks_and_orders_decode_and_validate() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let status = Command::new("bash")
        .arg(root.join("scripts/interop.sh"))
        .status()
        .expect("run scripts/interop.sh");
    assert!(status.success(), "scripts/interop.sh failed");
    let frames = std::fs::read(root.join("target/interop/frames.bin")).unwrap();
    let expected = std::fs::read_to_string(root.join("target/interop/expected.txt")).unwrap();

    let validator = OrderValidator::new([
        (1, InstrumentRule { tick_e4: 500 }),
        (2, InstrumentRule { tick_e4: 1 }),
    ]);
    let parser = FrameParser::default();
    let mut buf = BytesMut::from(&frames[..]);
    let mut n = 0;
    for line in expected.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let u = |i: usize| f[i].parse::<u64>().unwrap();
        let i = |i: usize| f[i].parse::<i64>().unwrap();
        let frame = parser.parse(&mut buf).unwrap().expect("a frame per line");
        match f[0] {
            "trade" | "quote" | "book" => {
                let tick = VerifiedTick::verify(frame).expect("Python tick verifies");
                let want = match f[0] {
                    "trade" => TickMsg::Trade(Trade {
                        instrument: u(1) as u32,
                        seq: u(2),
                        price: i(3),
                        size: i(4),
                        price_scale: u(5) as u8,
                        aggressor: md_side(f[6]),
                        exchange_ts_ns: u(7),
                        flags: u(8) as u32,
                    }),
                    "quote" => TickMsg::Quote(Quote {
                        instrument: u(1) as u32,
                        seq: u(2),
                        bid_price: i(3),
                        bid_size: i(4),
                        ask_price: i(5),
                        ask_size: i(6),
                        price_scale: u(7) as u8,
                        exchange_ts_ns: u(8),
                        flags: u(9) as u32,
                    }),
                    _ => TickMsg::BookLevel(BookLevel {
                        instrument: u(1) as u32,
                        seq: u(2),
                        side: md_side(f[3]),
                        level: u(4) as u16,
                        price: i(5),
                        size: i(6),
                        price_scale: u(7) as u8,
                        exchange_ts_ns: u(8),
                        flags: u(9) as u32,
                    }),
                };
                assert_eq!(tick.view().to_msg(), want, "{line}");
            }
            "order" => {
                let decoded = decode_order(&frame).expect("Python order decodes");
                let v = validator
                    .validate(&decoded, Some(&frame))
                    .expect("Python order validates");
                assert_eq!(&v.client_order_id[..], f[1].as_bytes());
                assert_eq!(&v.account[..], f[2].as_bytes());
                assert_eq!(v.instrument, u(3) as u32);
                assert_eq!(v.side, Side::try_from(i(4) as i32).unwrap());
                assert_eq!(v.order_type, OrderType::try_from(i(5) as i32).unwrap());
                assert_eq!(v.price_e4, Some(i(6)));
                assert_eq!(v.quantity, i(7));
                assert_eq!(v.time_in_force, TimeInForce::try_from(i(8) as i32).unwrap());
                assert_eq!(v.seq, u(9));
            }
            "cancel" => {
                let decoded = decode_cancel(&frame).expect("Python cancel decodes");
                let v = validate_cancel(&decoded, Some(&frame)).expect("Python cancel validates");
                assert_eq!(&v.client_order_id[..], f[1].as_bytes());
                assert_eq!(&v.account[..], f[2].as_bytes());
                assert_eq!(&v.orig_client_order_id[..], f[3].as_bytes());
                assert_eq!((v.instrument, v.seq), (u(4) as u32, u(5)));
            }
            "ack" => {
                let a = decode_ack(&frame).expect("Python ack decodes");
                assert_eq!(a.client_order_id.as_deref(), Some(f[1].as_bytes()));
                assert_eq!(a.status, Some(i(2) as i32));
                assert_eq!(a.reason, Some(i(3) as i32));
                assert_eq!(a.text.as_deref(), Some(f[4]));
                assert_eq!(a.upstream_status, Some(u(5) as u32));
                assert_eq!(a.upstream_body.as_deref(), Some(f[6].as_bytes()));
                assert_eq!((frame.header().seq, a.seq), (u(7), Some(u(7))));
            }
            other => panic!("unknown line kind {other}"),
        }
        n += 1;
    }
    assert!(buf.is_empty(), "frames left over");
    assert_eq!(n, 600);
}
