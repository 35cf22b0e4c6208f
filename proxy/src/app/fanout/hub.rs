//! A feed's shared state: per-instrument sequence, last values and replay ring, and the lanes
//! to the workers that have subscribers. Ingest takes the lock once per batch; a joining
//! subscriber takes it once to read its snapshot or replay.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::BytesMut;
use fluxgate_codecs::gen::md::TickFlags;
use fluxgate_codecs::{TickEncoder, TickMsg, VerifiedTick};
use fluxgate_conf::{Feed, InstrumentSet, NatsIngest};

use super::{FeedStats, Msg, Rejected};

/// One feed, shared by every worker; kept across reloads while a feed of its name exists.
pub(crate) struct FeedHub {
    pub(crate) name: String,
    /// Changes whenever the gateway starts without the feed's history (a restart): a
    /// subscriber resuming from another epoch gets a snapshot instead of a replay.
    pub(crate) epoch: u64,
    state: Mutex<State>,
    pub(crate) stats: FeedStats,
    /// The thread taking ticks from NATS (`[feed.nats]`), if any.
    pub(crate) nats: Follower,
    started: Instant,
    /// Milliseconds after `started` of the last tick taken.
    last_ingest_ms: AtomicU64,
}

struct State {
    cfg: Arc<Feed>,
    /// Messages that went to the lanes so far (ticks and gap notices): a subscriber that
    /// joined when it was N skips what its lane still holds up to N.
    ordinal: u64,
    instruments: HashMap<u32, Instrument>,
    lanes: Vec<Arc<Lane>>,
    /// One batch on its way to the lanes (kept for its capacity).
    out: Vec<Arc<Msg>>,
}

#[derive(Default)]
struct Instrument {
    /// The last sequence number taken (0: none yet).
    seq: u64,
    last: HashMap<super::Last, Arc<Msg>>,
    /// The last `replay` ticks, oldest first.
    ring: VecDeque<Arc<Msg>>,
}

/// Where ingest hands a worker its batches.
#[derive(Default)]
pub(crate) struct Lane {
    pub(crate) queue: Mutex<Vec<Arc<Msg>>>,
    pub(crate) wake: tokio::sync::Notify,
    /// The worker has subscribers; ingest skips the lane otherwise.
    pub(crate) active: AtomicBool,
    /// Per transport, as the worker last counted them (at most every 100 ms): messages
    /// queued for its subscribers in all, and in its deepest queue.
    pub(crate) queued: [AtomicU64; 3],
    pub(crate) deepest: [AtomicU64; 3],
}

/// A subscriber's resume point: the feed epoch it last saw and, per instrument, the last
/// sequence number it received.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Resume {
    pub(crate) epoch: u64,
    pub(crate) last: Vec<(u32, u64)>,
}

impl FeedHub {
    pub(crate) fn new(cfg: &Feed) -> FeedHub {
        let started = Instant::now();
        // Distinct across restarts: the wall clock, in nanoseconds.
        let epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        FeedHub {
            name: cfg.name.clone(),
            epoch,
            state: Mutex::new(State {
                cfg: Arc::new(cfg.clone()),
                ordinal: 0,
                instruments: HashMap::new(),
                lanes: Vec::new(),
                out: Vec::new(),
            }),
            stats: FeedStats::default(),
            nats: Default::default(),
            started,
            last_ingest_ms: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic elsewhere never leaves the state half-updated in a way readers trip on.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn config(&self) -> Arc<Feed> {
        Arc::clone(&self.lock().cfg)
    }

    /// New settings from a reload; state and subscribers stay.
    pub(crate) fn set_config(&self, cfg: &Feed) {
        let mut st = self.lock();
        if *st.cfg != *cfg {
            st.cfg = Arc::new(cfg.clone());
        }
    }

    /// Per transport: messages queued for subscribers on every worker, and the deepest
    /// single queue.
    pub(crate) fn queue_depths(&self) -> ([u64; 3], [u64; 3]) {
        let (mut all, mut deepest) = ([0; 3], [0; 3]);
        for lane in &self.lock().lanes {
            for t in 0..3 {
                all[t] += lane.queued[t].load(Ordering::Relaxed);
                deepest[t] = deepest[t].max(lane.deepest[t].load(Ordering::Relaxed));
            }
        }
        (all, deepest)
    }

    /// The price of the instrument's last trade, in units of 10^-4 (an order desk's price
    /// band centre); None before its first trade.
    pub(crate) fn last_trade_e4(&self, instrument: u32) -> Option<i64> {
        let st = self.lock();
        let msg = st
            .instruments
            .get(&instrument)?
            .last
            .get(&super::Last::Trade)?;
        let fluxgate_codecs::TickView::Trade(t) = msg.tick.as_ref()?.view() else {
            return None;
        };
        let scale = u32::from(t.price_scale());
        match scale.checked_sub(4) {
            None => t.price().checked_mul(10i64.pow(4 - scale)),
            Some(extra) => 10i64.checked_pow(extra).map(|d| t.price() / d),
        }
    }

    pub(crate) fn add_lane(&self, lane: &Arc<Lane>) {
        self.lock().lanes.push(Arc::clone(lane));
    }

    /// How long since the last tick (since start when none came yet).
    pub(crate) fn silent_for(&self) -> std::time::Duration {
        let last = std::time::Duration::from_millis(self.last_ingest_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }

    /// Takes a batch of verified ticks: each must come after its instrument's last sequence
    /// number (a jump is a gap: counted, and a notice goes before the tick); the accepted go
    /// to every active lane at once. Refusals are appended to `rejected`.
    pub(crate) fn ingest(
        &self,
        ticks: impl IntoIterator<Item = VerifiedTick>,
        rejected: &mut Vec<(u32, u64, Rejected)>,
    ) {
        let now = Instant::now();
        let mut st = self.lock();
        let State {
            cfg,
            ordinal,
            instruments,
            lanes,
            out,
        } = &mut *st;
        out.clear();
        for t in ticks {
            let (id, seq) = (t.instrument(), t.seq());
            let room = instruments.len() < cfg.max_instruments;
            let inst = match instruments.get_mut(&id) {
                Some(i) => i,
                None if room => instruments.entry(id).or_default(),
                None => {
                    self.stats.reject(Rejected::Instruments);
                    rejected.push((id, seq, Rejected::Instruments));
                    continue;
                }
            };
            if seq <= inst.seq {
                self.stats.reject(Rejected::Sequence);
                rejected.push((id, seq, Rejected::Sequence));
                continue;
            }
            if inst.seq != 0 && seq > inst.seq + 1 {
                self.stats.gaps.fetch_add(1, Ordering::Relaxed);
                *ordinal += 1;
                let text = format!("gap instrument={id} from={} to={}", inst.seq + 1, seq - 1);
                out.push(Msg::notice(&text, id, seq, *ordinal));
            }
            inst.seq = seq;
            *ordinal += 1;
            let msg = Arc::new(Msg::tick(t, *ordinal, now));
            if let Some(last) = msg.last {
                inst.last.insert(last, Arc::clone(&msg));
            }
            if cfg.replay > 0 {
                if inst.ring.len() == cfg.replay {
                    inst.ring.pop_front();
                }
                inst.ring.push_back(Arc::clone(&msg));
            }
            out.push(msg);
        }
        let ticks = out.iter().filter(|m| m.tick.is_some()).count() as u64;
        if ticks > 0 {
            self.stats.ingested.fetch_add(ticks, Ordering::Relaxed);
            self.last_ingest_ms
                .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
        }
        if out.is_empty() {
            return;
        }
        for lane in lanes.iter().filter(|l| l.active.load(Ordering::Relaxed)) {
            lane.queue
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(out.iter().cloned());
            lane.wake.notify_one();
        }
        out.clear();
    }

    /// What a subscriber joining for `set` gets before live messages, and the ordinal live
    /// messages must pass (see `State::ordinal`). Marks `lane` active, under the same lock,
    /// so nothing ingested after the snapshot misses it. With `resume` from this epoch, an
    /// instrument's missed ticks come from its ring when the ring still holds the one after
    /// the subscriber's last; otherwise (or from another epoch) a `recovery-failed` notice
    /// and the snapshot. Instruments not in `resume` get the snapshot.
    pub(crate) fn join(
        &self,
        set: &InstrumentSet,
        resume: Option<&Resume>,
        lane: &Lane,
    ) -> (Vec<Arc<Msg>>, u64) {
        let st = self.lock();
        lane.active.store(true, Ordering::Relaxed);
        let mut first = Vec::new();
        let same_epoch = resume.is_some_and(|r| r.epoch == self.epoch);
        if resume.is_some() && !same_epoch {
            first.push(Msg::notice(
                &format!("recovery-failed epoch={} reason=epoch", self.epoch),
                0,
                0,
                0,
            ));
        }
        let mut enc = TickEncoder::new();
        let mut ids: Vec<_> = st
            .instruments
            .iter()
            .filter(|(id, _)| set.contains(**id))
            .collect();
        ids.sort_unstable_by_key(|(id, _)| **id);
        for (&id, inst) in ids {
            let from = resume
                .filter(|_| same_epoch)
                .and_then(|r| r.last.iter().find(|(i, _)| *i == id).map(|(_, s)| *s));
            match from {
                Some(last) if last >= inst.seq => {}
                Some(last) if inst.ring.front().is_some_and(|m| m.seq <= last + 1) => {
                    first.extend(inst.ring.iter().filter(|m| m.seq > last).cloned());
                }
                Some(last) => {
                    first.push(Msg::notice(
                        &format!("recovery-failed instrument={id} after={last} reason=history"),
                        id,
                        last,
                        0,
                    ));
                    snapshot(inst, &mut enc, &mut first);
                }
                None => snapshot(inst, &mut enc, &mut first),
            }
        }
        (first, st.ordinal)
    }
}

/// The instrument's last values, each marked with the Snapshot flag, in sequence order.
fn snapshot(inst: &Instrument, enc: &mut TickEncoder, out: &mut Vec<Arc<Msg>>) {
    let mut last: Vec<_> = inst.last.values().collect();
    last.sort_unstable_by_key(|m| m.seq);
    for m in last {
        let Some(t) = &m.tick else { continue };
        let mut msg = t.view().to_msg();
        let flags = match &mut msg {
            TickMsg::Trade(t) => &mut t.flags,
            TickMsg::Quote(q) => &mut q.flags,
            TickMsg::BookLevel(b) => &mut b.flags,
        };
        *flags |= TickFlags::Snapshot.bits();
        let mut buf = BytesMut::new();
        enc.encode(&msg, 0, &mut buf);
        let Some(v) = verified(buf) else { continue };
        out.push(Arc::new(Msg::tick(v, 0, m.received)));
    }
}

/// A frame this process encoded, verified like any other.
fn verified(mut buf: BytesMut) -> Option<VerifiedTick> {
    let frame = fluxgate_codecs::FrameParser::default()
        .parse(&mut buf)
        .ok()??;
    VerifiedTick::verify(frame).ok()
}

/// The thread following a hub's subject, if any: its settings and its stop flag.
#[derive(Default)]
pub(crate) struct Follower(pub(crate) Mutex<Option<(NatsIngest, Arc<AtomicBool>)>>);

impl Follower {
    /// Stops the thread (a feed removed by a reload).
    pub(crate) fn stop(&self) {
        let mut cur = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, stop)) = cur.take() {
            stop.store(true, Ordering::Relaxed);
        }
    }
}
