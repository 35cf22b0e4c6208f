//! One worker's side of a feed: its subscribers, the dispatcher that moves each batch from
//! the worker's lane into their queues, and the queue with its slow-consumer policy.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::{Rc, Weak};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Waker;
use std::time::Duration;

use fluxgate_conf::{Feed, InstrumentSet, SlowConsumer};

use super::hub::{FeedHub, Lane, Resume};
use super::{Last, Msg, Transport};

/// A feed as one worker serves it.
pub(crate) struct LocalFeed {
    pub(crate) hub: Arc<FeedHub>,
    lane: Arc<Lane>,
    subs: RefCell<Vec<Rc<Sub>>>,
    /// Subscribers by instrument, filled as instruments are seen; cleared when any
    /// subscription changes.
    index: RefCell<HashMap<u32, Vec<Rc<Sub>>>>,
    /// The stale alarm as this worker last told its subscribers.
    stale: Cell<bool>,
    /// Subscribers one batch reached (kept for its capacity).
    touched: RefCell<Vec<Rc<Sub>>>,
}

impl LocalFeed {
    /// This worker's side of `hub`, with its dispatcher running on the worker.
    pub(crate) fn start(hub: Arc<FeedHub>) -> Rc<LocalFeed> {
        let lane = Arc::new(Lane::default());
        hub.add_lane(&lane);
        let local = Rc::new(LocalFeed {
            hub,
            lane,
            subs: RefCell::default(),
            index: RefCell::default(),
            stale: Cell::new(false),
            touched: RefCell::default(),
        });
        tokio::task::spawn_local(dispatch(Rc::downgrade(&local)));
        local
    }

    /// A new subscriber, allowed `allowed` (its entitlement), receiving nothing yet.
    pub(crate) fn subscriber(
        self: &Rc<Self>,
        allowed: InstrumentSet,
        transport: Transport,
    ) -> Rc<Sub> {
        let cfg = self.hub.config();
        let sub = Rc::new(Sub {
            q: RefCell::new(Queue::default()),
            waker: Cell::new(None),
            set: RefCell::default(),
            late: RefCell::default(),
            floor: Cell::new(u64::MAX),
            allowed: RefCell::new(allowed),
            cfg,
            transport,
            pending: Cell::new(false),
            busy: Cell::new(false),
        });
        self.hub.stats.subscribers[transport as usize].fetch_add(1, Ordering::Relaxed);
        self.subs.borrow_mut().push(Rc::clone(&sub));
        sub
    }

    /// Adds `want` to what `sub` receives, within its entitlement: first its snapshot (or
    /// its replay, with `resume`), then live ticks. Returns the part it may not have.
    pub(crate) fn subscribe(
        &self,
        sub: &Rc<Sub>,
        want: &InstrumentSet,
        resume: Option<&Resume>,
    ) -> InstrumentSet {
        let granted = want.intersect(&sub.allowed.borrow());
        let mut refused = want.clone();
        refused.remove(&granted);
        if granted.is_empty() {
            return refused;
        }
        let (first, ordinal) = self.hub.join(&granted, resume, &self.lane);
        if sub.floor.get() == u64::MAX {
            sub.floor.set(ordinal);
        } else {
            // Already live for other instruments: only the new ones skip what the lane
            // still holds from before their snapshot.
            sub.late.borrow_mut().push((granted.clone(), ordinal));
        }
        sub.set.borrow_mut().union(&granted);
        self.index.borrow_mut().clear();
        for m in first {
            sub.offer(m, &self.hub);
        }
        sub.wake();
        refused
    }

    pub(crate) fn unsubscribe(&self, sub: &Sub, set: &InstrumentSet) {
        sub.set.borrow_mut().remove(set);
        self.index.borrow_mut().clear();
    }

    /// The subscriber is gone (its connection ended).
    pub(crate) fn leave(&self, sub: &Rc<Sub>) {
        let mut subs = self.subs.borrow_mut();
        if let Some(i) = subs.iter().position(|s| Rc::ptr_eq(s, sub)) {
            subs.swap_remove(i);
            self.hub.stats.subscribers[sub.transport as usize].fetch_sub(1, Ordering::Relaxed);
        }
        if subs.is_empty() {
            self.lane.active.store(false, Ordering::Relaxed);
        }
        self.index.borrow_mut().clear();
    }

    /// Hands one batch to the subscribers of each message's instrument, then wakes each
    /// subscriber it gave something once. The batch is left empty, its capacity kept.
    fn deliver(&self, batch: &mut Vec<Arc<Msg>>) {
        let mut touched = self.touched.borrow_mut();
        let mut index = self.index.borrow_mut();
        for m in batch.drain(..) {
            let subs = index.entry(m.instrument).or_insert_with(|| {
                self.subs
                    .borrow()
                    .iter()
                    .filter(|s| s.set.borrow().contains(m.instrument))
                    .cloned()
                    .collect()
            });
            for s in subs.iter() {
                if m.ordinal <= s.floor.get() || s.late_skips(&m) {
                    continue;
                }
                if !s.pending.replace(true) {
                    touched.push(Rc::clone(s));
                }
                s.offer(Arc::clone(&m), &self.hub);
            }
        }
        drop(index);
        for s in touched.drain(..) {
            s.pending.set(false);
            s.wake();
        }
    }

    /// Counts what is queued for this worker's subscribers, for the metrics.
    fn count_queues(&self) {
        let (mut all, mut deepest) = ([0u64; 3], [0u64; 3]);
        for s in self.subs.borrow().iter() {
            let n = s.q.borrow().items.len() as u64;
            let t = s.transport as usize;
            all[t] += n;
            deepest[t] = deepest[t].max(n);
        }
        for t in 0..3 {
            self.lane.queued[t].store(all[t], Ordering::Relaxed);
            self.lane.deepest[t].store(deepest[t], Ordering::Relaxed);
        }
    }

    /// Tells every subscriber, once, that the feed went stale or came back.
    fn check_stale(&self) {
        let cfg = self.hub.config();
        let silent = self.hub.silent_for();
        let stale = silent > cfg.stale_after;
        if stale == self.stale.replace(stale) {
            return;
        }
        let text = match stale {
            true => format!("stale feed={} silent_ms={}", cfg.name, silent.as_millis()),
            false => format!("live feed={}", cfg.name),
        };
        let notice = Msg::notice(&text, 0, 0, 0);
        for s in self.subs.borrow().iter() {
            s.offer(Arc::clone(&notice), &self.hub);
            s.wake();
        }
    }
}

/// Moves batches from the lane to the subscribers until the feed is gone from this worker.
async fn dispatch(local: Weak<LocalFeed>) {
    let (lane, hub) = match local.upgrade() {
        Some(l) => (Arc::clone(&l.lane), Arc::clone(&l.hub)),
        None => return,
    };
    // The lane's queue and this one trade places at each wake, so neither allocates once
    // both have grown to the usual batch.
    let mut batch = Vec::new();
    let mut counted = std::time::Instant::now();
    loop {
        let every = (hub.config().stale_after / 2).max(Duration::from_millis(50));
        let woken = tokio::time::timeout(every, lane.wake.notified())
            .await
            .is_ok();
        let Some(local) = local.upgrade() else { return };
        if woken {
            std::mem::swap(
                &mut *lane.queue.lock().unwrap_or_else(|e| e.into_inner()),
                &mut batch,
            );
            local.deliver(&mut batch);
        }
        local.check_stale();
        if counted.elapsed() >= Duration::from_millis(100) {
            local.count_queues();
            counted = std::time::Instant::now();
        }
    }
}

/// One subscriber: what it receives, and its queue.
pub(crate) struct Sub {
    q: RefCell<Queue>,
    waker: Cell<Option<Waker>>,
    /// What it receives: subscribed and entitled.
    set: RefCell<InstrumentSet>,
    /// Instruments added while live, with the ordinal their snapshot was taken at.
    late: RefCell<Vec<(InstrumentSet, u64)>>,
    /// Live messages up to this ordinal were in its first snapshot (MAX: not joined yet).
    floor: Cell<u64>,
    /// Its entitlement.
    allowed: RefCell<InstrumentSet>,
    cfg: Arc<Feed>,
    pub(crate) transport: Transport,
    pending: Cell<bool>,
    /// Its writer holds a batch it has not finished writing.
    busy: Cell<bool>,
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Arc<Msg>>,
    bytes: usize,
    /// Items taken off the front so far: `items[i]` is number `popped + i`.
    popped: u64,
    /// Where a conflatable message of each instrument and `Last` sits (its number).
    slots: HashMap<(u32, Last), u64>,
    /// Dropped since the subscriber was last told.
    dropped: u64,
    /// Cut off, and why.
    cut: Option<String>,
}

/// What a writer takes from a subscriber's queue.
pub(crate) enum Next {
    /// Messages to write, in order (moved out of the queue).
    Batch,
    /// Nothing queued.
    Empty,
    /// Cut off: write this reason and close.
    Cut(String),
}

impl Sub {
    /// Queues `m`, applying the feed's slow-consumer policy when the queue is full.
    fn offer(&self, m: Arc<Msg>, hub: &FeedHub) {
        let mut q = self.q.borrow_mut();
        if q.cut.is_some() {
            return;
        }
        // Only behind a write that is still going out: a batch that reaches an idle
        // subscriber is written whole.
        let conflate =
            self.cfg.slow_consumer == SlowConsumer::Conflate && m.conflatable() && self.busy.get();
        if conflate {
            let key = (
                m.instrument,
                m.last.expect("conflatable messages have a Last"),
            );
            if let Some(&n) = q.slots.get(&key) {
                if let Some(i) = n.checked_sub(q.popped) {
                    let i = i as usize;
                    let old_len = q.items[i].frame.len();
                    q.bytes = q.bytes - old_len + m.frame.len();
                    q.items[i] = m;
                    hub.stats.conflated.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
        let full = |q: &Queue, len: usize| {
            q.items.len() >= self.cfg.queue_messages || q.bytes + len > self.cfg.queue_bytes
        };
        // The policy is for a subscriber that is behind: one whose writer still holds a
        // batch. An idle one takes whatever one dispatch hands it.
        if self.busy.get() && full(&q, m.frame.len()) {
            match self.cfg.slow_consumer {
                SlowConsumer::DropOldest => {
                    while full(&q, m.frame.len()) {
                        let Some(old) = q.items.pop_front() else {
                            break;
                        };
                        q.popped += 1;
                        q.bytes -= old.frame.len();
                        q.dropped += 1;
                        hub.stats.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
                SlowConsumer::Conflate | SlowConsumer::Disconnect => {
                    hub.stats.disconnected.fetch_add(1, Ordering::Relaxed);
                    q.cut = Some(format!(
                        "slow consumer: {} messages, {} bytes queued (limits {}, {})",
                        q.items.len(),
                        q.bytes,
                        self.cfg.queue_messages,
                        self.cfg.queue_bytes
                    ));
                    q.items.clear();
                    q.slots.clear();
                    return;
                }
            }
        }
        if conflate {
            let n = q.popped + q.items.len() as u64;
            let key = (
                m.instrument,
                m.last.expect("conflatable messages have a Last"),
            );
            q.slots.insert(key, n);
        }
        q.bytes += m.frame.len();
        q.items.push_back(m);
    }

    fn late_skips(&self, m: &Msg) -> bool {
        let mut late = self.late.borrow_mut();
        if late.is_empty() {
            return false;
        }
        // Ordinals reach a lane in order: a snapshot point passed is passed for good.
        late.retain(|(_, at)| m.ordinal <= *at);
        late.iter().any(|(set, _)| set.contains(m.instrument))
    }

    /// Wakes its writer (also with nothing queued: it may have bytes of its own to send).
    pub(crate) fn wake(&self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// Moves everything queued into `out` (a `dropped` notice first when messages were
    /// dropped since the last batch); registers `waker` when there is nothing.
    pub(crate) fn take(&self, out: &mut Vec<Arc<Msg>>, waker: &Waker) -> Next {
        let mut q = self.q.borrow_mut();
        if let Some(why) = &q.cut {
            return Next::Cut(why.clone());
        }
        if q.items.is_empty() {
            self.busy.set(false);
            self.waker.set(Some(waker.clone()));
            return Next::Empty;
        }
        self.busy.set(true);
        if q.dropped > 0 {
            out.push(Msg::notice(
                &format!("dropped count={}", q.dropped),
                0,
                0,
                0,
            ));
            q.dropped = 0;
        }
        q.popped += q.items.len() as u64;
        q.bytes = 0;
        q.slots.clear();
        out.extend(q.items.drain(..));
        Next::Batch
    }

    /// Queues a message for this subscriber alone (its own notices).
    pub(crate) fn tell(&self, text: &str, hub: &FeedHub) {
        self.offer(Msg::notice(text, 0, 0, 0), hub);
        self.wake();
    }

    /// A new entitlement (`auth KEY`), for subscriptions from now on.
    pub(crate) fn entitle(&self, set: InstrumentSet) {
        *self.allowed.borrow_mut() = set;
    }

    pub(crate) fn heartbeat(&self) -> Duration {
        self.cfg.heartbeat
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use fluxgate_codecs::tick::Quote;
    use fluxgate_codecs::{FrameParser, TickEncoder, TickMsg, VerifiedTick};

    #[test]
    fn every_subscriber_is_handed_the_same_memory() {
        let cfg = fluxgate_conf::Config::from_toml(
            "[[feed]]\nname = \"md\"\n[[listener]]\naddress = \"127.0.0.1:0\"\nrespond = { status = 200 }\n",
        )
        .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        tokio::task::LocalSet::new().block_on(&rt, async {
            let local = LocalFeed::start(Arc::new(FeedHub::new(&cfg.feeds[0])));
            let subs: Vec<_> = (0..3)
                .map(|_| {
                    let s = local.subscriber(InstrumentSet::all(), Transport::Tcp);
                    local.subscribe(&s, &InstrumentSet::all(), None);
                    s
                })
                .collect();
            let waker = std::task::Waker::noop();
            for s in &subs {
                // Nothing yet: no snapshot for a feed without ticks.
                assert!(matches!(s.take(&mut Vec::new(), waker), Next::Empty));
            }
            let mut buf = BytesMut::new();
            let quote = Quote {
                instrument: 5,
                seq: 1,
                ..Quote::default()
            };
            TickEncoder::new().encode(&TickMsg::Quote(quote), 0, &mut buf);
            let received_at = buf.as_ptr() as usize;
            let tick =
                VerifiedTick::verify(FrameParser::default().parse(&mut buf).unwrap().unwrap())
                    .unwrap();
            local.hub.ingest([tick], &mut Vec::new());
            // Let the dispatcher move the batch.
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            for s in &subs {
                let mut out = Vec::new();
                assert!(matches!(s.take(&mut out, waker), Next::Batch));
                assert_eq!(out.len(), 1);
                assert_eq!(out[0].frame.as_ptr() as usize, received_at, "not a copy");
            }
        });
    }
}
