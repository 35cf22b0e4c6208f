//! Market-data fan-out: ticks from publishers (raw TCP, WebSocket) verified once on ingest
//! and handed, as the same reference-counted bytes, to every subscriber (raw TCP, WebSocket,
//! or a streaming HTTP response on HTTP/1.1, HTTP/2 or HTTP/3).
//!
//! The one place where data crosses workers (see `hub`): ingest appends each batch of ticks
//! once per worker that has subscribers, under the feed's lock, and wakes that worker's
//! dispatcher (`local`), which queues the batch for its own subscribers. The cross-thread
//! cost of a tick grows with the number of workers, never with the number of subscribers;
//! each subscriber's writes stay on its worker, one vectored write per wake.
//!
//! The control protocol: `Kind::Control` frames whose payload is one line of text.
//! - A subscriber sends `auth KEY`, `sub PATTERNS [resume EPOCH INST:SEQ,..]` and
//!   `unsub PATTERNS` (patterns as in `[feed.groups]`: `42`, `1-99`, `*`, `@group`).
//! - The gateway sends `hello feed=NAME epoch=E`, `subscribed ..`, `refused ..`,
//!   `gap instrument=I from=A to=B`, `recovery-failed ..`, `dropped count=N`,
//!   `heartbeat`, `stale ..`, `live ..` and `disconnect reason=..`; to a publisher,
//!   `rejected instrument=I seq=S reason=..`.
//!
//! Over HTTP the subscription is the query: `?sub=PATTERNS&resume=EPOCH:INST.SEQ,..`, with
//! the key in the feed's `api_key_header`.

pub(crate) mod hub;
pub(crate) mod local;
pub(crate) mod nats;
pub(crate) mod session;

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use fluxgate_codecs::envelope::{write_frame, Kind};
use fluxgate_codecs::{TickView, VerifiedTick};
use fluxgate_wire::ws::{server_head, Opcode};

/// Which last value of an instrument a tick replaces: the conflation key and the snapshot's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Last {
    Trade,
    Quote,
    /// Side and level.
    Book(u8, u16),
}

/// One message as every subscriber receives it: a tick or a notice, with its WebSocket head
/// built once.
pub(crate) struct Msg {
    /// Header and payload, shared with the buffer it was read into (ticks) or built once.
    pub(crate) frame: Bytes,
    ws_head: [u8; 10],
    ws_len: u8,
    pub(crate) instrument: u32,
    pub(crate) seq: u64,
    /// Its place in the feed's stream (see `hub::State::ordinal`); 0 for a message made for
    /// one subscriber (snapshots, replays, its own notices), which is never compared.
    pub(crate) ordinal: u64,
    /// Which last value it is (ticks); None for a notice.
    pub(crate) last: Option<Last>,
    /// The verified tick (for snapshots); None for a notice.
    pub(crate) tick: Option<VerifiedTick>,
    /// When ingest took it, for the delivery lag.
    pub(crate) received: Instant,
}

impl Msg {
    pub(crate) fn tick(tick: VerifiedTick, ordinal: u64, received: Instant) -> Msg {
        let last = match tick.view() {
            TickView::Trade(_) => Last::Trade,
            TickView::Quote(_) => Last::Quote,
            TickView::BookLevel(b) => Last::Book(b.side().0 as u8, b.level()),
        };
        Msg::new(
            tick.shared_frame(),
            tick.instrument(),
            tick.seq(),
            ordinal,
            Some(last),
            Some(tick),
            received,
        )
    }

    fn new(
        frame: Bytes,
        instrument: u32,
        seq: u64,
        ordinal: u64,
        last: Option<Last>,
        tick: Option<VerifiedTick>,
        received: Instant,
    ) -> Msg {
        let (ws_head, ws_len) = server_head(Opcode::Binary, frame.len());
        Msg {
            frame,
            ws_head,
            ws_len: ws_len as u8,
            instrument,
            seq,
            ordinal,
            last,
            tick,
            received,
        }
    }

    /// A control frame of one line of text.
    pub(crate) fn notice(text: &str, instrument: u32, seq: u64, ordinal: u64) -> Arc<Msg> {
        Arc::new(Msg::new(
            control_frame(text, instrument, seq),
            instrument,
            seq,
            ordinal,
            None,
            None,
            Instant::now(),
        ))
    }

    /// Whether a newer message of the same instrument and `Last` may replace it in a queue.
    pub(crate) fn conflatable(&self) -> bool {
        matches!(self.last, Some(Last::Quote | Last::Book(..)))
    }

    /// The bytes written for it: the WebSocket head (when `ws`), then the frame.
    pub(crate) fn parts(&self, ws: bool) -> [&[u8]; 2] {
        let head: &[u8] = if ws {
            &self.ws_head[..self.ws_len as usize]
        } else {
            &[]
        };
        [head, &self.frame]
    }
}

pub(crate) fn control_frame(text: &str, instrument: u32, seq: u64) -> Bytes {
    let mut out = BytesMut::new();
    write_frame(&mut out, Kind::Control, 0, instrument, seq, text.as_bytes());
    out.freeze()
}

/// How a subscriber is reached, for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    Tcp = 0,
    WebSocket = 1,
    Http = 2,
}

impl Transport {
    pub(crate) const ALL: [Transport; 3] = [Transport::Tcp, Transport::WebSocket, Transport::Http];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::WebSocket => "websocket",
            Transport::Http => "http",
        }
    }
}

/// Why ingest refused a frame, for the metrics and the publisher's notice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rejected {
    /// The envelope does not parse (the publisher is closed: the stream cannot be resynced).
    Malformed = 0,
    /// The payload is over `max_payload` (skipped).
    Oversized = 1,
    /// The payload is not a valid tick (or not a tick at all).
    Corrupt = 2,
    /// Its sequence number is not after the instrument's last one.
    Sequence = 3,
    /// One instrument more than `max_instruments`.
    Instruments = 4,
}

impl Rejected {
    pub(crate) const ALL: [Rejected; 5] = [
        Rejected::Malformed,
        Rejected::Oversized,
        Rejected::Corrupt,
        Rejected::Sequence,
        Rejected::Instruments,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Rejected::Malformed => "malformed",
            Rejected::Oversized => "oversized",
            Rejected::Corrupt => "corrupt",
            Rejected::Sequence => "sequence",
            Rejected::Instruments => "instruments",
        }
    }
}

/// Upper bounds of the delivery lag histogram, in microseconds.
pub(crate) const LAG_BUCKETS_US: [u64; 10] =
    [50, 100, 250, 500, 1000, 2500, 5000, 10_000, 50_000, 250_000];

/// A feed's counters, shared by every worker (added to once per batch, not per subscriber).
#[derive(Default)]
pub(crate) struct FeedStats {
    pub(crate) ingested: AtomicU64,
    pub(crate) rejected: [AtomicU64; 5],
    pub(crate) gaps: AtomicU64,
    pub(crate) delivered: AtomicU64,
    pub(crate) conflated: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) disconnected: AtomicU64,
    pub(crate) subscribers: [AtomicI64; 3],
    /// Per transport: lag histogram buckets (one more for +Inf), sum in microseconds, count.
    pub(crate) lag: [[AtomicU64; 11]; 3],
    pub(crate) lag_sum_us: [AtomicU64; 3],
    /// 1 while subscribed on the NATS server (`[feed.nats]`).
    pub(crate) nats_up: AtomicU64,
    pub(crate) nats_connects: AtomicU64,
}

impl FeedStats {
    pub(crate) fn reject(&self, why: Rejected) {
        self.rejected[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// One write's messages: delivered, and their lag from ingest.
    pub(crate) fn wrote(&self, t: Transport, msgs: &[Arc<Msg>], now: Instant) {
        self.delivered
            .fetch_add(msgs.len() as u64, Ordering::Relaxed);
        let mut sum = 0;
        let mut counts = [0u64; 11];
        for m in msgs {
            let us = now.saturating_duration_since(m.received).as_micros() as u64;
            sum += us;
            let b = LAG_BUCKETS_US.iter().position(|&l| us <= l).unwrap_or(10);
            counts[b] += 1;
        }
        let t = t as usize;
        for (b, n) in counts.iter().enumerate().filter(|(_, n)| **n > 0) {
            self.lag[t][b].fetch_add(*n, Ordering::Relaxed);
        }
        self.lag_sum_us[t].fetch_add(sum, Ordering::Relaxed);
    }
}

/// Every feed's counters, in the Prometheus text format.
pub(crate) fn render_metrics(o: &mut String, feeds: &[Arc<hub::FeedHub>]) {
    use crate::telemetry::metrics::family;
    use std::fmt::Write;
    if feeds.is_empty() {
        return;
    }
    type Counter = (&'static str, &'static str, fn(&FeedStats) -> u64);
    let counters: [Counter; 6] = [
        (
            "fluxgate_feed_ingested_total",
            "Ticks taken from publishers.",
            |s| s.ingested.load(Ordering::Relaxed),
        ),
        (
            "fluxgate_feed_gaps_total",
            "Sequence gaps seen on ingest.",
            |s| s.gaps.load(Ordering::Relaxed),
        ),
        (
            "fluxgate_feed_deliveries_total",
            "Messages written to subscribers.",
            |s| s.delivered.load(Ordering::Relaxed),
        ),
        (
            "fluxgate_feed_conflated_total",
            "Queued quotes and book levels replaced by newer ones.",
            |s| s.conflated.load(Ordering::Relaxed),
        ),
        (
            "fluxgate_feed_dropped_total",
            "Messages dropped from full queues (drop_oldest).",
            |s| s.dropped.load(Ordering::Relaxed),
        ),
        (
            "fluxgate_feed_disconnected_total",
            "Slow subscribers cut off.",
            |s| s.disconnected.load(Ordering::Relaxed),
        ),
    ];
    for (name, help, get) in counters {
        per_feed(o, name, "counter", help, feeds, |f| get(&f.stats));
    }
    family(
        o,
        "fluxgate_feed_rejected_total",
        "counter",
        "Frames refused on ingest, by reason.",
    );
    for f in feeds {
        for why in Rejected::ALL {
            let n = f.stats.rejected[why as usize].load(Ordering::Relaxed);
            let _ = writeln!(
                o,
                "fluxgate_feed_rejected_total{{feed=\"{}\",reason=\"{}\"}} {n}",
                f.name,
                why.label()
            );
        }
    }
    per_transport(
        o,
        "fluxgate_feed_subscribers",
        "Subscribers connected, by transport.",
        feeds,
        |i, t| feeds[i].stats.subscribers[t].load(Ordering::Relaxed).max(0) as u64,
    );
    let depths: Vec<_> = feeds.iter().map(|f| f.queue_depths()).collect();
    per_transport(
        o,
        "fluxgate_feed_queued_messages",
        "Messages queued for subscribers, by transport (counted every 100 ms).",
        feeds,
        |i, t| depths[i].0[t],
    );
    per_transport(
        o,
        "fluxgate_feed_queue_deepest_messages",
        "Messages in the deepest single subscriber queue, by transport.",
        feeds,
        |i, t| depths[i].1[t],
    );
    per_feed(
        o,
        "fluxgate_feed_stale",
        "gauge",
        "1 while no tick came for longer than stale_after.",
        feeds,
        |f| (f.silent_for() > f.config().stale_after) as u64,
    );
    let followed: Vec<_> = feeds
        .iter()
        .filter(|f| f.config().nats.is_some())
        .cloned()
        .collect();
    if !followed.is_empty() {
        per_feed(
            o,
            "fluxgate_feed_nats_connected",
            "gauge",
            "1 while the feed is subscribed on its NATS server.",
            &followed,
            |f| f.stats.nats_up.load(Ordering::Relaxed),
        );
        per_feed(
            o,
            "fluxgate_feed_nats_connects_total",
            "counter",
            "Subscriptions made on the NATS server (the first, then each reconnect).",
            &followed,
            |f| f.stats.nats_connects.load(Ordering::Relaxed),
        );
    }
    family(
        o,
        "fluxgate_feed_delivery_lag_seconds",
        "histogram",
        "Time from ingest to the write to a subscriber, by transport.",
    );
    for f in feeds {
        for t in Transport::ALL {
            let labels = format!("feed=\"{}\",transport=\"{}\"", f.name, t.label());
            let mut cumulative = 0;
            for (b, limit) in LAG_BUCKETS_US.iter().enumerate() {
                cumulative += f.stats.lag[t as usize][b].load(Ordering::Relaxed);
                let _ = writeln!(
                    o,
                    "fluxgate_feed_delivery_lag_seconds_bucket{{{labels},le=\"{}\"}} {cumulative}",
                    *limit as f64 / 1e6
                );
            }
            cumulative += f.stats.lag[t as usize][10].load(Ordering::Relaxed);
            let _ = writeln!(
                o,
                "fluxgate_feed_delivery_lag_seconds_bucket{{{labels},le=\"+Inf\"}} {cumulative}"
            );
            let sum = f.stats.lag_sum_us[t as usize].load(Ordering::Relaxed) as f64 / 1e6;
            let _ = writeln!(
                o,
                "fluxgate_feed_delivery_lag_seconds_sum{{{labels}}} {sum}"
            );
            let _ = writeln!(
                o,
                "fluxgate_feed_delivery_lag_seconds_count{{{labels}}} {cumulative}"
            );
        }
    }
}

/// One family with a value per feed.
fn per_feed(
    o: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    feeds: &[Arc<hub::FeedHub>],
    get: impl Fn(&hub::FeedHub) -> u64,
) {
    let family = (name, kind, help);
    crate::telemetry::metrics::per_label(o, family, "feed", feeds, |f| &f.name, |f| get(f));
}

/// One gauge family with a value per feed and transport: `get(feed index, transport)`.
fn per_transport(
    o: &mut String,
    name: &str,
    help: &str,
    feeds: &[Arc<hub::FeedHub>],
    get: impl Fn(usize, usize) -> u64,
) {
    use std::fmt::Write;
    crate::telemetry::metrics::family(o, name, "gauge", help);
    for (i, f) in feeds.iter().enumerate() {
        for t in Transport::ALL {
            let _ = writeln!(
                o,
                "{name}{{feed=\"{}\",transport=\"{}\"}} {}",
                f.name,
                t.label(),
                get(i, t as usize)
            );
        }
    }
}
