//! Fan-out load for `scripts/bench-fanout.sh`: one publisher at a fixed rate and N subscriber
//! connections, against fluxgate (raw TCP feed listeners) or nats-server (the NATS protocol,
//! spoken with `fluxgate_wire::nats`), with the same message: one envelope frame of a trade
//! tick (trades are never conflated, so every one must arrive).
//!
//! The publisher stamps each tick's publish time in a table indexed by its sequence number;
//! each receiver reads the sequence from the frame header and records publish-to-receive
//! latency. Publisher and receivers run on two threads of this process (one clock).
//!
//! Usage:
//!   fanout-load fluxgate PUB_ADDR SUB_ADDR RATE SECONDS N
//!   fanout-load nats ADDR RATE SECONDS N
//!     prints `offered O delivered D deliveries/s X p50 A ms p99 B ms lost L closed C`
//!   fanout-load allocs N TICKS
//!     runs fluxgate in this process under a counting allocator and prints
//!     `allocs/tick X (N subscribers, TICKS ticks)`: heap allocations made by fluxgate's
//!     threads while the ticks were fanned out, per tick.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use fluxgate_codecs::envelope::{write_frame, Header, Kind, HEADER_LEN};
use fluxgate_codecs::tick::Trade;
use fluxgate_codecs::{TickEncoder, TickMsg};
use fluxgate_wire::nats::{self, ServerOp};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[global_allocator]
static ALLOC: fluxgate_sys::CountingAlloc = fluxgate_sys::CountingAlloc;

/// Publish times, nanoseconds after `Shared::base`, by sequence number (modulo the size).
const STAMPS: usize = 1 << 22;
/// Latency histogram: 10 µs buckets up to 2 s, then one overflow bucket.
const BUCKET_US: u64 = 10;
const BUCKETS: usize = 200_000;

struct Shared {
    base: Instant,
    stamps: Vec<AtomicU64>,
    hist: Vec<AtomicU64>,
    delivered: AtomicU64,
    /// Ticks numbered below this are from before the run (a gateway's snapshot of an
    /// earlier run's last tick): not counted.
    first_seq: AtomicU64,
    closed: AtomicUsize,
    /// Set once the publisher is done and the drain time has passed.
    stop: AtomicBool,
}

impl Shared {
    fn new() -> Arc<Shared> {
        Arc::new(Shared {
            base: Instant::now(),
            stamps: (0..STAMPS).map(|_| AtomicU64::new(0)).collect(),
            hist: (0..=BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            delivered: AtomicU64::new(0),
            first_seq: AtomicU64::new(0),
            closed: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        })
    }

    fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    /// One tick received: its latency recorded.
    fn got(&self, seq: u64, now_ns: u64) {
        if seq < self.first_seq.load(Ordering::Relaxed) {
            return;
        }
        let sent = self.stamps[seq as usize % STAMPS].load(Ordering::Relaxed);
        let b = (now_ns.saturating_sub(sent) / 1000 / BUCKET_US) as usize;
        self.hist[b.min(BUCKETS)].fetch_add(1, Ordering::Relaxed);
        self.delivered.fetch_add(1, Ordering::Relaxed);
    }

    /// The latency below which `q` of the deliveries fell, in milliseconds (the top of its
    /// bucket; `inf` past the last).
    fn quantile(&self, q: f64) -> f64 {
        let total: u64 = self.hist.iter().map(|h| h.load(Ordering::Relaxed)).sum();
        let want = (total as f64 * q).ceil() as u64;
        let mut seen = 0;
        for (b, h) in self.hist.iter().enumerate() {
            seen += h.load(Ordering::Relaxed);
            if seen >= want.max(1) {
                return match b < BUCKETS {
                    true => ((b as u64 + 1) * BUCKET_US) as f64 / 1000.0,
                    false => f64::INFINITY,
                };
            }
        }
        f64::NAN
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Peer {
    Fluxgate,
    Nats,
}

const SUBJECT: &str = "md.ticks";

fn tick_frame(enc: &mut TickEncoder, seq: u64, out: &mut BytesMut) {
    let t = TickMsg::Trade(Trade {
        instrument: 1,
        seq,
        price: 1_000_000 + (seq % 100) as i64,
        size: 100,
        price_scale: 4,
        exchange_ts_ns: seq,
        ..Trade::default()
    });
    enc.encode(&t, 0, out);
}

fn main() {
    fluxgate_sys::exclude_this_thread();
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: fanout-load fluxgate PUB SUB RATE SECONDS N | nats ADDR RATE SECONDS N | allocs N TICKS";
    let arg = |i: usize| -> &str {
        args.get(i).map(String::as_str).unwrap_or_else(|| {
            eprintln!("{usage}");
            std::process::exit(2)
        })
    };
    let addr = |s: &str| -> SocketAddr { s.parse().expect("IP:PORT") };
    let num = |s: &str| -> f64 { s.parse().expect("a number") };
    // fluxgate takes a publisher and a subscriber address, nats-server one for both.
    let (peer, sub_at) = match arg(1) {
        "fluxgate" => (Peer::Fluxgate, 3),
        "nats" => (Peer::Nats, 2),
        "allocs" => return allocs(num(arg(2)) as usize, num(arg(3)) as u64),
        _ => {
            eprintln!("{usage}");
            std::process::exit(2)
        }
    };
    let at = |k: usize| num(arg(sub_at + k));
    load(
        peer,
        addr(arg(2)),
        addr(arg(sub_at)),
        at(1),
        at(2),
        at(3) as usize,
    );
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

/// Connects and subscribes `n` receivers; returns once every one is subscribed.
async fn subscribers(peer: Peer, addr: SocketAddr, n: usize, shared: &Arc<Shared>) {
    let ready = Arc::new(tokio::sync::Semaphore::new(0));
    for _ in 0..n {
        let (shared, ready) = (Arc::clone(shared), Arc::clone(&ready));
        let mut s = TcpStream::connect(addr).await.expect("subscriber connects");
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            receive(peer, &mut s, &shared, &ready).await;
            shared.closed.fetch_add(1, Ordering::Relaxed);
        });
    }
    ready.acquire_many(n as u32).await.expect("open").forget();
}

/// One receiver: subscribe, tell `ready`, then record every tick until the end.
async fn receive(peer: Peer, s: &mut TcpStream, shared: &Shared, ready: &tokio::sync::Semaphore) {
    let mut hello = Vec::new();
    match peer {
        Peer::Fluxgate => {
            let mut b = BytesMut::new();
            write_frame(&mut b, Kind::Control, 0, 0, 0, b"sub 1");
            hello.extend_from_slice(&b);
        }
        Peer::Nats => {
            nats::connect(&mut hello, "fanout-load");
            nats::sub(&mut hello, SUBJECT, 1);
            hello.extend_from_slice(nats::PING);
        }
    }
    if s.write_all(&hello).await.is_err() {
        return;
    }
    let mut buf = BytesMut::with_capacity(256 << 10);
    let mut subscribed = false;
    // No timer per read (it would cost as much as the read): the receivers end with the
    // process, their counts already in `shared`.
    loop {
        if buf.capacity() - buf.len() < 64 << 10 {
            buf.reserve(128 << 10);
        }
        match s.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let now = shared.now_ns();
        let mut at = 0;
        loop {
            let rest = &buf[at..];
            match peer {
                Peer::Fluxgate => {
                    let Ok(Some(h)) = Header::peek(rest) else {
                        break;
                    };
                    let len = HEADER_LEN + h.payload_len as usize;
                    if rest.len() < len {
                        break;
                    }
                    match h.kind {
                        Kind::Tick => shared.got(h.seq, now),
                        _ if !subscribed && rest[HEADER_LEN..len].starts_with(b"subscribed") => {
                            subscribed = true;
                            ready.add_permits(1);
                        }
                        _ => {}
                    }
                    at += len;
                }
                Peer::Nats => match nats::parse(rest, 1 << 20) {
                    Ok(Some((op, used))) => {
                        match op {
                            ServerOp::Msg { payload, .. } => {
                                if let Ok(Some(h)) = Header::peek(&rest[payload]) {
                                    shared.got(h.seq, now);
                                }
                            }
                            ServerOp::Pong if !subscribed => {
                                subscribed = true;
                                ready.add_permits(1);
                            }
                            ServerOp::Ping => {
                                let _ = s.write_all(nats::PONG).await;
                            }
                            _ => {}
                        }
                        at += used;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        eprintln!("fanout-load: NATS protocol: {e}");
                        return;
                    }
                },
            }
        }
        let _ = buf.split_to(at);
    }
}

async fn publisher(peer: Peer, addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("publisher connects");
    let _ = s.set_nodelay(true);
    if peer == Peer::Nats {
        let mut out = Vec::new();
        nats::connect(&mut out, "fanout-publisher");
        s.write_all(&out).await.expect("CONNECT");
    }
    s
}

/// Publishes `rate` ticks per second for `secs`, in 1 ms steps, each tick's time stamped,
/// numbered on from `seq`; returns how many.
async fn publish(
    s: &mut TcpStream,
    peer: Peer,
    (rate, secs): (f64, f64),
    shared: &Shared,
    seq: &mut u64,
) -> u64 {
    let mut out = Vec::new();
    let mut enc = TickEncoder::new();
    let mut frame = BytesMut::new();
    let first = *seq;
    let start = Instant::now();
    let mut step = tokio::time::interval(Duration::from_millis(1));
    step.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    loop {
        step.tick().await;
        let elapsed = start.elapsed().as_secs_f64();
        if elapsed >= secs {
            return *seq - first;
        }
        let due = first + (elapsed * rate) as u64;
        out.clear();
        let now = shared.now_ns();
        while *seq < due {
            *seq += 1;
            frame.clear();
            tick_frame(&mut enc, *seq, &mut frame);
            shared.stamps[*seq as usize % STAMPS].store(now, Ordering::Relaxed);
            if peer == Peer::Nats {
                nats::pub_head(&mut out, SUBJECT, frame.len());
                out.extend_from_slice(&frame);
                out.extend_from_slice(b"\r\n");
            } else {
                out.extend_from_slice(&frame);
            }
        }
        if !out.is_empty() && s.write_all(&out).await.is_err() {
            eprintln!("fanout-load: the publisher's connection closed");
            return *seq - first;
        }
    }
}

/// Starts `n` receivers on a thread of their own (left out of allocation counts); returns
/// once every one is subscribed. They stop when `shared.stop` is set.
fn receivers(
    peer: Peer,
    addr: SocketAddr,
    n: usize,
    shared: &Arc<Shared>,
) -> std::thread::JoinHandle<()> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let shared = Arc::clone(shared);
    let thread = std::thread::spawn(move || {
        fluxgate_sys::exclude_this_thread();
        runtime().block_on(async {
            subscribers(peer, addr, n, &shared).await;
            let _ = ready_tx.send(());
            while !shared.stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
    });
    ready_rx.recv().expect("subscribers ready");
    thread
}

/// Waits until `want` deliveries in all arrived, for up to `limit`; returns how many did.
fn delivered_by(shared: &Shared, want: u64, limit: Duration) -> u64 {
    let end = Instant::now() + limit;
    while shared.delivered.load(Ordering::Relaxed) < want && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(5));
    }
    shared.delivered.load(Ordering::Relaxed)
}

fn load(peer: Peer, pub_addr: SocketAddr, sub_addr: SocketAddr, rate: f64, secs: f64, n: usize) {
    let shared = Shared::new();
    // Numbered on from the clock, so a gateway that saw an earlier run's ticks takes these
    // as newer (one gap notice), never as repeats.
    let mut seq = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    shared.first_seq.store(seq + 1, Ordering::Relaxed);
    // nats-server: each subscription is in place once the PING after it was answered.
    let receivers = receivers(peer, sub_addr, n, &shared);
    let rt = runtime();
    let started = Instant::now();
    let offered = rt.block_on(async {
        let mut s = publisher(peer, pub_addr).await;
        publish(&mut s, peer, (rate, secs), &shared, &mut seq).await
    });
    let spent = started.elapsed().as_secs_f64();
    // What is still in flight arrives, or never will.
    let want = offered * n as u64;
    let drain = Instant::now();
    let delivered = delivered_by(&shared, want, Duration::from_secs(3));
    let busy = spent + drain.elapsed().as_secs_f64();
    shared.stop.store(true, Ordering::Relaxed);
    let _ = receivers.join();
    println!(
        "offered {offered} delivered {delivered} deliveries/s {:.0} p50 {:.2} ms p99 {:.2} ms lost {} closed {}",
        delivered as f64 / busy.max(spent),
        shared.quantile(0.50),
        shared.quantile(0.99),
        want.saturating_sub(delivered),
        shared.closed.load(Ordering::Relaxed),
    );
}

/// fluxgate in this process: heap allocations of its threads per tick fanned out to `n`.
fn allocs(n: usize, ticks: u64) {
    let toml = "[runtime]\nworkers = 1\n[[feed]]\nname = \"md\"\n\
        [[listener]]\naddress = \"127.0.0.1:0\"\nmode = \"feed\"\nfeed = \"md\"\nrole = \"publish\"\n\
        [[listener]]\naddress = \"127.0.0.1:0\"\nmode = \"feed\"\nfeed = \"md\"\nrole = \"subscribe\"\n";
    let config = fluxgate_conf::Config::from_toml(toml).expect("config");
    let fg = fluxgate::Server::start(config).expect("fluxgate starts");
    let (publish_at, subscribe_at) = (fg.local_addrs()[0], fg.local_addrs()[1]);
    let shared = Shared::new();
    let receivers = receivers(Peer::Fluxgate, subscribe_at, n, &shared);
    // A warm-up, so buffers and queues have their working size; then the measured run, at
    // the same rate (1,000 ticks per second).
    let rt = runtime();
    let mut s = rt.block_on(publisher(Peer::Fluxgate, publish_at));
    let mut seq = 0;
    let mut count = |ticks: u64| {
        let before_delivered = shared.delivered.load(Ordering::Relaxed);
        let before = fluxgate_sys::count_process_allocations();
        let run = (1000.0, ticks as f64 / 1000.0 + 0.0015);
        let sent = rt.block_on(publish(&mut s, Peer::Fluxgate, run, &shared, &mut seq));
        let want = before_delivered + sent * n as u64;
        let got = delivered_by(&shared, want, Duration::from_secs(10)) - before_delivered;
        assert_eq!(got, sent * n as u64, "every tick reached every subscriber");
        (fluxgate_sys::count_process_allocations() - before, sent)
    };
    let _ = count(ticks / 4);
    let (made, sent) = count(ticks);
    shared.stop.store(true, Ordering::Relaxed);
    let _ = receivers.join();
    println!(
        "allocs/tick {:.2} ({n} subscribers, {sent} ticks)",
        made as f64 / sent as f64
    );
    fg.shutdown();
}
