//! Codec hot paths, per message: frame parse; tick parse + verify + routing metadata; tick
//! field read; order decode + validate, and with the desk's pre-trade checks; encode of each. Also prints heap allocations per
//! message, counted by `fluxgate_sys::CountingAlloc`.
//!
//! Run: `cargo bench -p fluxgate-benches --bench codecs`

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fluxgate_codecs::gen::orders::{NewOrder, OrderType, Side, TimeInForce};
use fluxgate_codecs::tick::{Side as MdSide, Trade};
use fluxgate_codecs::*;
use fluxgate_sys::count_allocations;

#[global_allocator]
static ALLOC: fluxgate_sys::CountingAlloc = fluxgate_sys::CountingAlloc;

fn trade(i: u64) -> TickMsg {
    TickMsg::Trade(Trade {
        instrument: (i % 500) as u32,
        seq: i,
        price: 1_012_500 + i as i64,
        size: 300,
        price_scale: 4,
        aggressor: MdSide::Buy,
        exchange_ts_ns: 1_763_700_000_000_000_000 + i,
        flags: 0,
    })
}

fn order(i: u64) -> NewOrder {
    NewOrder {
        client_order_id: Some(Bytes::from(format!("cl-{i:08}"))),
        account: Some(Bytes::from_static(b"ACCT-0042")),
        instrument: Some(1),
        side: Some(Side::Buy as i32),
        r#type: Some(OrderType::Limit as i32),
        price_mantissa: Some(10_125),
        price_scale: Some(2),
        quantity: Some(100),
        time_in_force: Some(TimeInForce::Day as i32),
        seq: Some(i),
        client_ts_ns: Some(1_763_700_000_000_000_000),
    }
}

fn tick_stream(n: u64) -> BytesMut {
    let mut enc = TickEncoder::new();
    let mut b = BytesMut::with_capacity(n as usize * 128);
    for i in 0..n {
        enc.encode(&trade(i), 0, &mut b);
    }
    b
}

fn order_stream(n: u64) -> BytesMut {
    let mut enc = OrderEncoder::new();
    let mut b = BytesMut::with_capacity(n as usize * 128);
    for i in 0..n {
        enc.encode(&order(i), 0, &mut b);
    }
    b
}

fn validator() -> OrderValidator {
    OrderValidator::new((0..500).map(|i| (i, InstrumentRule { tick_e4: 25 })))
}

/// Times `per_frame` over a fresh stream of `iters` frames (built outside the timing).
fn over_stream(
    iters: u64,
    make: fn(u64) -> BytesMut,
    mut per_frame: impl FnMut(Frame),
) -> Duration {
    let mut stream = make(iters);
    let parser = FrameParser::default();
    // Take the one-time Vec-to-shared promotion of the buffer outside the timing.
    let first = parser.parse(&mut stream).unwrap().unwrap();
    black_box(first);
    let start = Instant::now();
    while let Some(frame) = parser.parse(&mut stream).unwrap() {
        per_frame(frame);
    }
    start.elapsed()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("codecs");
    g.throughput(Throughput::Elements(1));
    g.bench_function("frame_parse", |b| {
        b.iter_custom(|n| over_stream(n + 1, tick_stream, |f| drop(black_box(f))))
    });
    g.bench_function("tick_parse_verify_route", |b| {
        b.iter_custom(|n| {
            over_stream(n + 1, tick_stream, |f| {
                let t = VerifiedTick::verify(f).unwrap();
                black_box((t.instrument(), t.seq(), t.shared_frame()));
            })
        })
    });
    let mut one = tick_stream(1);
    let verified =
        VerifiedTick::verify(FrameParser::default().parse(&mut one).unwrap().unwrap()).unwrap();
    g.bench_function("tick_read_fields", |b| {
        b.iter(|| black_box(black_box(&verified).view().to_msg()))
    });
    let v = validator();
    g.bench_function("order_decode_validate", |b| {
        b.iter_custom(|n| {
            over_stream(n + 1, order_stream, |f| {
                let o = decode_order(&f).unwrap();
                black_box(v.validate(&o, Some(&f)).unwrap());
            })
        })
    });
    // The whole per-order path before the journal: decode, validate, then the account's
    // checks (rate, quantity, notional, price band, open orders) against a reference price.
    let limits = fluxgate_conf::AccountLimits {
        name: "ACCT-0042".into(),
        max_quantity: 10_000,
        max_notional_e4: 10_000_000 * 10_000,
        price_band_bps: 500,
        rate: 1e9,
        burst: 1_000_000_000,
        max_open: usize::MAX,
    };
    let mut account = fluxgate_policy::risk::AccountState::new(&limits, Instant::now());
    g.bench_function("order_decode_validate_check", |b| {
        b.iter_custom(|n| {
            over_stream(n + 1, order_stream, |f| {
                let o = decode_order(&f).unwrap();
                let v = v.validate(&o, Some(&f)).unwrap();
                let now = Instant::now();
                let checked = fluxgate_policy::risk::check_order(
                    &limits,
                    &mut account,
                    v.quantity,
                    v.price_e4,
                    Some(1_012_500),
                    now,
                );
                black_box((v, checked.unwrap()));
            })
        })
    });
    let mut tenc = TickEncoder::new();
    let mut out = BytesMut::with_capacity(1 << 20);
    let msg = trade(7);
    g.bench_function("tick_encode", |b| {
        b.iter(|| {
            if out.len() > (1 << 19) {
                out.clear();
            }
            tenc.encode(black_box(&msg), 0, &mut out)
        })
    });
    let mut oenc = OrderEncoder::new();
    let o = order(7);
    g.bench_function("order_encode", |b| {
        b.iter(|| {
            if out.len() > (1 << 19) {
                out.clear();
            }
            oenc.encode(black_box(&o), 0, &mut out)
        })
    });
    g.finish();
    allocation_report();
}

/// Heap allocations per message on each path, over 10,000 messages in steady state.
fn allocation_report() {
    const N: u64 = 10_000;
    let per = |n: u64| n as f64 / N as f64;
    let parser = FrameParser::default();

    let mut s = tick_stream(N + 1);
    black_box(parser.parse(&mut s).unwrap());
    let a = count_allocations(|| {
        while let Some(f) = parser.parse(&mut s).unwrap() {
            let t = VerifiedTick::verify(f).unwrap();
            black_box((t.instrument(), t.seq(), t.shared_frame(), t.view().to_msg()));
        }
    });
    println!(
        "allocations/message: tick parse+verify+route+read {:.3}",
        per(a)
    );

    let v = validator();
    let mut s = order_stream(N + 1);
    black_box(parser.parse(&mut s).unwrap());
    let (mut dec, mut val) = (0, 0);
    while let Some(f) = parser.parse(&mut s).unwrap() {
        let mut o = None;
        dec += count_allocations(|| o = Some(decode_order(&f).unwrap()));
        let o = o.unwrap();
        val += count_allocations(|| drop(black_box(v.validate(&o, Some(&f)).unwrap())));
    }
    println!(
        "allocations/message: order decode {:.3}, validate {:.3}",
        per(dec),
        per(val)
    );

    let mut out = BytesMut::with_capacity(N as usize * 256);
    let (mut te, mut oe) = (TickEncoder::new(), OrderEncoder::new());
    te.encode(&trade(0), 0, &mut out);
    oe.encode(&order(0), 0, &mut out);
    let msgs: Vec<_> = (0..N).map(order).collect();
    let t = count_allocations(|| (0..N).for_each(|i| te.encode(&trade(i), 0, &mut out)));
    let o = count_allocations(|| msgs.iter().for_each(|m| oe.encode(m, 0, &mut out)));
    println!(
        "allocations/message: tick encode {:.3}, order encode {:.3}",
        per(t),
        per(o)
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
