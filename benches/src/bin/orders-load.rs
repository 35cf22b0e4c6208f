//! Order-entry load for `scripts/bench-orders.sh`: one order session over raw TCP to a
//! fluxgate orders listener, and the order service it delivers to (an HTTP/1.1 server that
//! answers every POST 200), both in this process (one clock).
//!
//! Each order is an IOC limit order, its client order id new to the gateway (the run's
//! process id and its index), its envelope sequence number its index; the
//! acknowledgement carries it back, so the reader looks up the send time without decoding
//! more than the acknowledgement's status. Latency is send to acceptance (the first
//! acknowledgement, sent once the order is journaled); throughput counts orders the service
//! answered and the gateway relayed (the second acknowledgement).
//!
//! Usage:
//!   orders-load service ADDR
//!     serves the order service on ADDR until killed
//!   orders-load send GATEWAY RATE SECONDS [WINDOW]
//!     RATE 0: as fast as WINDOW orders in flight allow (default 512); else open loop at
//!     RATE orders per second. Prints
//!     `sent S answered A orders/s X p50 P ms p99 Q ms rejected R`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use fluxgate_codecs::gen::orders::{AckStatus, NewOrder, OrderType, Side, TimeInForce};
use fluxgate_codecs::{decode_ack, FrameParser, OrderEncoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Latency histogram: 10 µs buckets up to 2 s, then one overflow bucket.
const BUCKET_US: u64 = 10;
const BUCKETS: usize = 200_000;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    match args.get(1).map(String::as_str) {
        Some("service") => rt.block_on(service(args[2].parse().unwrap())),
        Some("send") => {
            let window = args.get(5).map_or(512, |w| w.parse().unwrap());
            rt.block_on(send(
                args[2].parse().unwrap(),
                args[3].parse().unwrap(),
                args[4].parse().unwrap(),
                window,
            ))
        }
        _ => {
            eprintln!("usage: orders-load service ADDR | send GATEWAY RATE SECONDS [WINDOW]");
            std::process::exit(2);
        }
    }
}

/// The order service: reads each request head and body, answers 200 `ok`, keep-alive.
async fn service(addr: SocketAddr) {
    let l = tokio::net::TcpListener::bind(addr).await.unwrap();
    loop {
        let (mut s, _) = l.accept().await.unwrap();
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let mut buf = BytesMut::with_capacity(16 << 10);
            let mut out = Vec::with_capacity(4096);
            loop {
                // Answer every whole request in the buffer, then read more.
                let mut answered = 0;
                while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = std::str::from_utf8(&buf[..end]).unwrap_or("");
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse().ok())?
                        })
                        .unwrap_or(0);
                    if buf.len() < end + 4 + len {
                        break;
                    }
                    let _ = buf.split_to(end + 4 + len);
                    out.extend_from_slice(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
                    answered += 1;
                }
                if answered > 0 {
                    if s.write_all(&out).await.is_err() {
                        return;
                    }
                    out.clear();
                }
                match s.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        });
    }
}

struct Stats {
    base: Instant,
    /// Send times, nanoseconds after `base`, by order index.
    sent_at: Vec<AtomicU64>,
    hist: Vec<AtomicU64>,
    accepted: AtomicU64,
    answered: AtomicU64,
    rejected: AtomicU64,
    last_answer_ns: AtomicU64,
    /// Wakes the closed-loop sender when answers came.
    room: tokio::sync::Notify,
}

impl Stats {
    fn quantile(&self, q: f64) -> f64 {
        let total: u64 = self.hist.iter().map(|b| b.load(Ordering::Relaxed)).sum();
        if total == 0 {
            return f64::INFINITY;
        }
        let want = (total as f64 * q).ceil() as u64;
        let mut seen = 0;
        for (i, b) in self.hist.iter().enumerate() {
            seen += b.load(Ordering::Relaxed);
            if seen >= want {
                return match i {
                    BUCKETS => f64::INFINITY,
                    _ => ((i as u64 + 1) * BUCKET_US) as f64 / 1000.0,
                };
            }
        }
        f64::INFINITY
    }
}

fn frame_of(enc: &mut OrderEncoder, i: u64, out: &mut BytesMut) {
    let o = NewOrder {
        // Distinct across runs (a repeated id would be answered from the desk's memory).
        client_order_id: Some(Bytes::from(format!("b{}-{i}", std::process::id()))),
        account: Some(Bytes::from_static(b"bench")),
        instrument: Some(1),
        side: Some(Side::Buy as i32),
        r#type: Some(OrderType::Limit as i32),
        price_mantissa: Some(10_000),
        price_scale: Some(2),
        quantity: Some(1),
        time_in_force: Some(TimeInForce::Ioc as i32),
        seq: Some(i),
        client_ts_ns: None,
    };
    enc.encode(&o, 0, out);
}

async fn send(gateway: SocketAddr, rate: u64, seconds: u64, window: u64) {
    let s = TcpStream::connect(gateway).await.unwrap();
    s.set_nodelay(true).unwrap();
    let (mut r, mut w) = s.into_split();
    let cap = if rate == 0 {
        4_000_000
    } else {
        (rate * seconds + 1) as usize
    };
    let stats = Arc::new(Stats {
        base: Instant::now(),
        sent_at: (0..cap).map(|_| AtomicU64::new(0)).collect(),
        hist: (0..=BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        accepted: AtomicU64::new(0),
        answered: AtomicU64::new(0),
        rejected: AtomicU64::new(0),
        last_answer_ns: AtomicU64::new(0),
        room: tokio::sync::Notify::new(),
    });
    let st = Arc::clone(&stats);
    let reader = tokio::spawn(async move {
        let mut buf = BytesMut::with_capacity(1 << 20);
        let parser = FrameParser::default();
        loop {
            while let Some(f) = parser.parse(&mut buf).unwrap() {
                let i = f.header().seq as usize;
                let now = st.base.elapsed().as_nanos() as u64;
                match decode_ack(&f).map(|a| a.status()) {
                    Ok(AckStatus::Accepted) => {
                        let at = st.sent_at[i % st.sent_at.len()].load(Ordering::Relaxed);
                        let us = now.saturating_sub(at) / 1000;
                        let b = ((us / BUCKET_US) as usize).min(BUCKETS);
                        st.hist[b].fetch_add(1, Ordering::Relaxed);
                        st.accepted.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(AckStatus::UpstreamAccepted) => {
                        st.answered.fetch_add(1, Ordering::Relaxed);
                        st.last_answer_ns.store(now, Ordering::Relaxed);
                    }
                    _ => {
                        st.rejected.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            st.room.notify_one();
            if buf.capacity() - buf.len() < 64 << 10 {
                buf.reserve(1 << 20);
            }
            match r.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    });
    let mut enc = OrderEncoder::new();
    let mut out = BytesMut::with_capacity(1 << 20);
    let end = Duration::from_secs(seconds);
    let mut sent: u64 = 0;
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    while start.elapsed() < end && (sent as usize) < cap {
        let allowed = match rate {
            0 => {
                let done =
                    stats.answered.load(Ordering::Relaxed) + stats.rejected.load(Ordering::Relaxed);
                (done + window).saturating_sub(sent)
            }
            r => (start.elapsed().as_micros() as u64 * r / 1_000_000).saturating_sub(sent),
        }
        .min(cap as u64 - sent);
        out.clear();
        let now = stats.base.elapsed().as_nanos() as u64;
        for _ in 0..allowed {
            stats.sent_at[sent as usize].store(now, Ordering::Relaxed);
            frame_of(&mut enc, sent, &mut out);
            sent += 1;
        }
        if !out.is_empty() {
            w.write_all(&out).await.unwrap();
        }
        match rate {
            // The window is full: wait for answers (never spin: the order service shares
            // this CPU).
            0 if allowed == 0 => {
                let _ =
                    tokio::time::timeout(Duration::from_millis(10), stats.room.notified()).await;
            }
            0 => {}
            _ => {
                tick.tick().await;
            }
        }
    }
    let elapsed = start.elapsed();
    // Drain: up to 5 s for the last answers.
    let drain = Instant::now();
    while stats.answered.load(Ordering::Relaxed) + stats.rejected.load(Ordering::Relaxed) < sent
        && drain.elapsed() < Duration::from_secs(5)
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    reader.abort();
    let answered = stats.answered.load(Ordering::Relaxed);
    let took = Duration::from_nanos(stats.last_answer_ns.load(Ordering::Relaxed))
        .saturating_sub(start.duration_since(stats.base))
        .max(elapsed);
    println!(
        "sent {sent} answered {answered} orders/s {:.0} p50 {:.2} ms p99 {:.2} ms rejected {}",
        answered as f64 / took.as_secs_f64(),
        stats.quantile(0.5),
        stats.quantile(0.99),
        stats.rejected.load(Ordering::Relaxed)
    );
}
