//! An order desk's shared state, one per `[[orders]]`, used by every worker: the accounts'
//! risk state, the orders remembered for idempotency, and the link to the journal thread.
//! A session takes the lock once per order (`admit`) and once per upstream answer
//! (`finish`); fsync happens on the journal thread, never under the lock.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, Weak};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use fluxgate_codecs::envelope::{Frame, FrameParser, Kind};
use fluxgate_codecs::gen::orders::{AckStatus, OrderAck, RejectReason, TimeInForce};
use fluxgate_codecs::{
    decode_cancel, decode_order, validate_cancel, InstrumentRule, OrderEncoder, OrderError,
    OrderValidator,
};
use fluxgate_conf::{AccountLimits, Config};
use fluxgate_policy::risk::{check_order, AccountState, Refusal};
use tokio::sync::oneshot;

use crate::app::fanout::hub::FeedHub;
use crate::app::orders::journal::{self, Journal};
use crate::telemetry::metrics::Histogram;

/// An order's identity: account and client order id (copied out of the read buffer).
pub(crate) type OrderKey = (Bytes, Bytes);

/// A desk, shared by every worker; kept across reloads while a desk of its name exists.
pub(crate) struct Desk {
    pub(crate) name: String,
    settings: Mutex<Arc<Settings>>,
    state: Mutex<State>,
    /// To the journal thread, when the desk has a journal: one message per session batch
    /// (each message may wake the thread, which then preempts the worker that sent it).
    journal: Option<mpsc::Sender<Vec<Op>>>,
    /// Journal records whose orders the upstream answered, settled at the next commit (or
    /// within `SETTLE_EVERY`); no message, so no wake-up, per answer.
    settled: Mutex<Vec<u64>>,
    pub(crate) stats: DeskStats,
    /// Orders the journal held unsettled at start, to send again; taken by one worker.
    recovered: Mutex<Vec<Job>>,
    /// Wakes sessions waiting for their account's in-flight room.
    pub(crate) room: tokio::sync::Notify,
}

/// The desk's settings of the current config generation.
pub(crate) struct Settings {
    pub(crate) cfg: fluxgate_conf::Desk,
    validator: OrderValidator,
    /// The feed whose last trades centre the price band.
    feed: Option<Arc<FeedHub>>,
    /// Upstream names, indexed like `Config::upstreams`.
    upstreams: Vec<String>,
}

struct State {
    accounts: HashMap<Bytes, AccountState>,
    /// Remembered orders in two generations: new ones go into `orders`; when it holds half
    /// of `remember`, it becomes `older` and the generation before is forgotten (freed off
    /// the lock). No map ever grows past its first size, so none is rehashed under the lock.
    orders: HashMap<OrderKey, Entry>,
    older: HashMap<OrderKey, Entry>,
    /// The next generation's map, emptied, its memory already touched: the first writes
    /// to fresh memory are slow (milliseconds per huge page on a virtual machine), too slow
    /// for the lock. The forgotten generation becomes the next spare.
    spare: Arc<Mutex<Option<HashMap<OrderKey, Entry>>>>,
    /// New orders accepted and not yet closed (never forgotten while open).
    open: HashSet<OrderKey>,
    /// Orders sent and not yet answered, per upstream name.
    upstream_in_flight: HashMap<String, i64>,
}

/// Orders one generation of remembered orders holds.
fn generation(cfg: &fluxgate_conf::Desk) -> usize {
    (cfg.remember / 2).max(1)
}

/// What the desk remembers of one order or cancel.
struct Entry {
    /// The first acknowledgement frame (accepted or rejected); None while the journal has
    /// not made the order durable yet.
    first: Option<Bytes>,
    /// The upstream's answer, relayed, once it came.
    last: Option<Bytes>,
}

/// Counters and histograms, summed over workers by the relaxed atomics themselves.
#[derive(Default)]
pub(crate) struct DeskStats {
    pub(crate) accepted: AtomicU64,
    /// By `RejectReason` value.
    pub(crate) rejected: [AtomicU64; 11],
    pub(crate) duplicates: AtomicU64,
    pub(crate) upstream_accepted: AtomicU64,
    pub(crate) upstream_rejected: AtomicU64,
    /// Attempts to the upstream that failed and were made again.
    pub(crate) upstream_retries: AtomicU64,
    /// Orders sent again after a restart, from the journal.
    pub(crate) resent: AtomicU64,
    /// From an order's arrival to its first acknowledgement.
    pub(crate) ack_latency: Histogram,
    /// From an order handed to the journal to its record being durable.
    pub(crate) journal_append: Histogram,
    /// One fdatasync (a group commit).
    pub(crate) journal_fsync: Histogram,
}

/// An accepted order or cancel on its way to the upstream: what is sent, and what its
/// answer changes. Rebuilt from its journal record after a restart.
pub(crate) struct Job {
    pub(crate) kind: Kind,
    pub(crate) key: OrderKey,
    /// A cancel's order.
    orig: Option<Bytes>,
    pub(crate) instrument: u32,
    pub(crate) seq: u64,
    /// IOC and FOK orders are done once the upstream answers.
    closes_on_answer: bool,
    /// The Protobuf message, as the client sent it.
    pub(crate) payload: Bytes,
    /// Index into `Config::upstreams`.
    pub(crate) upstream: usize,
    pub(crate) path: String,
    /// Its journal record, when the desk journals.
    pub(crate) journal_seq: Option<u64>,
}

/// What `admit` made of one frame.
pub(crate) enum Admit {
    /// Answered at once: a rejection, or a duplicate's acknowledgements (the first, then
    /// the upstream's when it came).
    Answer(Bytes, Option<Bytes>),
    /// A duplicate of an order the journal is still making durable: its first
    /// acknowledgement comes with that commit (`first_ack` once `wait` fires).
    Pending(OrderKey, oneshot::Receiver<Result<u64, String>>),
    /// The account has no in-flight room: keep the frame and admit it again later.
    Busy,
    Accepted(Box<Accepted>),
}

pub(crate) struct Accepted {
    /// Fires when the journal made it durable; None without a journal.
    pub(crate) durable: Option<oneshot::Receiver<Result<u64, String>>>,
    /// The acceptance, sent once durable.
    pub(crate) ack: Bytes,
    pub(crate) job: Job,
    pub(crate) arrived: Instant,
}

/// Journal work gathered by a session over one read, sent as one message (`Desk::flush`).
#[derive(Default)]
pub(crate) struct Batch(Vec<Op>);

/// How soon answered orders are settled on disk when no new order comes to commit them.
const SETTLE_EVERY: std::time::Duration = std::time::Duration::from_millis(50);

enum Op {
    Append {
        record: Bytes,
        key: OrderKey,
        ack: Bytes,
        queued: Instant,
        done: oneshot::Sender<Result<u64, String>>,
    },
    /// Answered after everything before it is durable.
    Barrier(oneshot::Sender<Result<u64, String>>),
}

/// One acknowledgement frame.
pub(crate) fn ack_frame(
    key: &OrderKey,
    instrument: u32,
    seq: u64,
    status: AckStatus,
    reason: Option<(RejectReason, String)>,
    upstream: Option<(u16, Bytes)>,
) -> Bytes {
    let (reason, text) = reason.map_or((None, None), |(r, t)| (Some(r as i32), Some(t)));
    let (upstream_status, upstream_body) =
        upstream.map_or((None, None), |(s, b)| (Some(u32::from(s)), Some(b)));
    let ack = OrderAck {
        client_order_id: Some(key.1.clone()),
        account: Some(key.0.clone()),
        status: Some(status as i32),
        reason,
        text,
        upstream_status,
        upstream_body,
        seq: Some(seq),
    };
    let mut out = BytesMut::with_capacity(96);
    OrderEncoder::new().encode_ack(&ack, instrument, &mut out);
    out.freeze()
}

fn refusal_reason(r: Refusal) -> RejectReason {
    match r {
        Refusal::MaxQuantity => RejectReason::MaxQuantity,
        Refusal::MaxNotional => RejectReason::MaxNotional,
        Refusal::PriceBand => RejectReason::PriceBand,
        Refusal::NoReference => RejectReason::NoReferencePrice,
        Refusal::RateLimit => RejectReason::RateLimit,
        Refusal::OpenOrders => RejectReason::OpenOrders,
    }
}

impl Settings {
    fn new(cfg: &fluxgate_conf::Desk, config: &Config, feeds: &[Arc<FeedHub>]) -> Settings {
        let rules = cfg.instruments.iter().flat_map(|i| {
            let rule = InstrumentRule { tick_e4: i.tick_e4 };
            i.ids
                .ranges()
                .iter()
                .flat_map(move |&(a, b)| (a..=b).map(move |id| (id, rule)))
        });
        Settings {
            cfg: cfg.clone(),
            validator: OrderValidator::new(rules),
            feed: cfg.feed.map(|f| Arc::clone(&feeds[f])),
            upstreams: config.upstreams.iter().map(|u| u.name.clone()).collect(),
        }
    }

    fn limits(&self, account: &[u8]) -> Option<&AccountLimits> {
        let named = self
            .cfg
            .accounts
            .iter()
            .find(|a| a.name.as_bytes() == account);
        named.or_else(|| self.cfg.accounts.iter().find(|a| a.name == "*"))
    }

    /// The centre of the price band: the feed's last trade, else the reference price.
    fn reference(&self, instrument: u32) -> Option<i64> {
        self.feed
            .as_ref()
            .and_then(|f| f.last_trade_e4(instrument))
            .or_else(|| {
                self.cfg
                    .instruments
                    .iter()
                    .find(|i| i.ids.contains(instrument))
                    .and_then(|i| i.reference_e4)
            })
    }

    fn upstream_for(&self, instrument: u32, account: &[u8]) -> usize {
        self.cfg
            .routes
            .iter()
            .find(|r| r.matches(instrument, account))
            .map_or(self.cfg.upstream, |r| r.upstream)
    }

    pub(crate) fn upstream_name(&self, i: usize) -> &str {
        self.upstreams.get(i).map_or("", String::as_str)
    }
}

impl Desk {
    /// Opens the desk's journal (cutting a torn tail) and starts its journal thread; the
    /// orders it held unsettled wait in `recovered`, counted as open and in flight.
    pub(crate) fn open(
        cfg: &fluxgate_conf::Desk,
        config: &Config,
        feeds: &[Arc<FeedHub>],
    ) -> std::io::Result<Arc<Desk>> {
        let settings = Arc::new(Settings::new(cfg, config, feeds));
        let (journal, recovered) = match &cfg.journal {
            None => (None, journal::Recovered::default()),
            Some(j) => {
                let (journal, recovered) = Journal::open(journal::Settings {
                    dir: j.dir.clone(),
                    segment_size: j.segment_size,
                })
                .map_err(|e| {
                    std::io::Error::new(
                        e.kind(),
                        format!("orders journal {}: {e}", j.dir.display()),
                    )
                })?;
                if let Some((file, at, cut)) = &recovered.cut {
                    tracing::warn!(
                        file = %file.display(),
                        at,
                        bytes = cut,
                        "orders journal: cut a torn last record"
                    );
                }
                (Some(journal), recovered)
            }
        };
        let (tx, rx) = match journal {
            Some(j) => {
                let (tx, rx) = mpsc::channel();
                (Some(tx), Some((j, rx)))
            }
            None => (None, None),
        };
        let desk = Arc::new(Desk {
            name: cfg.name.clone(),
            settings: Mutex::new(Arc::clone(&settings)),
            state: Mutex::new(State::new(cfg)),
            journal: tx,
            settled: Mutex::new(Vec::new()),
            stats: DeskStats::default(),
            recovered: Mutex::new(Vec::new()),
            room: tokio::sync::Notify::new(),
        });
        let mut jobs = Vec::new();
        {
            let mut st = desk.lock();
            let now = Instant::now();
            for (seq, record) in recovered.unsettled {
                let Some(job) = settings.job_from_record(&record, seq) else {
                    tracing::error!(seq, "orders journal: record is not an order; skipped");
                    continue;
                };
                let ack = ack_frame(
                    &job.key,
                    job.instrument,
                    job.seq,
                    AckStatus::Accepted,
                    None,
                    None,
                );
                st.remember(
                    &settings.cfg,
                    job.key.clone(),
                    Some(ack),
                    job.kind == Kind::NewOrder,
                );
                if let Some(l) = settings.limits(&job.key.0) {
                    let a = st
                        .accounts
                        .entry(job.key.0.clone())
                        .or_insert_with(|| AccountState::new(l, now));
                    a.in_flight += 1;
                    a.open += usize::from(job.kind == Kind::NewOrder);
                }
                *st.upstream_in_flight
                    .entry(settings.upstream_name(job.upstream).to_owned())
                    .or_default() += 1;
                jobs.push(job);
            }
        }
        *desk.recovered.lock().expect("recovered lock") = jobs;
        if let Some((j, rx)) = rx {
            let weak = Arc::downgrade(&desk);
            std::thread::Builder::new()
                .name(format!("fluxgate-journal-{}", cfg.name))
                .spawn(move || journal_thread(j, rx, weak))?;
        }
        Ok(desk)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn settings(&self) -> Arc<Settings> {
        Arc::clone(&self.settings.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// New settings from a reload; accounts, remembered orders and the journal stay (the
    /// journal's place and segment size take effect at the next start).
    pub(crate) fn set_config(
        &self,
        cfg: &fluxgate_conf::Desk,
        config: &Config,
        feeds: &[Arc<FeedHub>],
    ) {
        *self.settings.lock().unwrap_or_else(|e| e.into_inner()) =
            Arc::new(Settings::new(cfg, config, feeds));
    }

    /// The orders to send again after a restart, once (the first worker to ask takes them).
    pub(crate) fn take_recovered(&self) -> Vec<Job> {
        std::mem::take(&mut *self.recovered.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn reject(
        &self,
        key: &OrderKey,
        instrument: u32,
        seq: u64,
        reason: RejectReason,
        text: String,
    ) -> Bytes {
        self.stats.rejected[reason as usize].fetch_add(1, Ordering::Relaxed);
        ack_frame(
            key,
            instrument,
            seq,
            AckStatus::Rejected,
            Some((reason, text)),
            None,
        )
    }

    /// Decodes, validates and checks one order or cancel frame, and accepts it (journaling
    /// it when the desk journals) or answers it at once.
    /// Journal work goes into `batch`, for `flush` once the caller has admitted what it has.
    pub(crate) fn admit(
        &self,
        s: &Settings,
        frame: &Frame,
        arrived: Instant,
        batch: &mut Batch,
    ) -> Admit {
        let h = *frame.header();
        let invalid = |e: OrderError, key: &OrderKey| {
            Admit::Answer(
                self.reject(
                    key,
                    h.instrument,
                    h.seq,
                    RejectReason::Invalid,
                    e.to_string(),
                ),
                None,
            )
        };
        let no_key = (Bytes::new(), Bytes::new());
        // The ids are copied: a remembered order must not pin its read buffer.
        let owned = |b: &Bytes| Bytes::copy_from_slice(b);
        let (key, job) = match h.kind {
            Kind::NewOrder => {
                let order = match decode_order(frame) {
                    Ok(o) => o,
                    Err(e) => return invalid(e, &no_key),
                };
                let key = (
                    order.account.as_ref().map(owned).unwrap_or_default(),
                    order
                        .client_order_id
                        .as_ref()
                        .map(owned)
                        .unwrap_or_default(),
                );
                let v = match s.validator.validate(&order, Some(frame)) {
                    Ok(v) => v,
                    Err(e) => return invalid(e, &key),
                };
                let job = Job {
                    kind: Kind::NewOrder,
                    key: key.clone(),
                    orig: None,
                    instrument: v.instrument,
                    seq: v.seq,
                    closes_on_answer: matches!(
                        v.time_in_force,
                        TimeInForce::Ioc | TimeInForce::Fok
                    ),
                    payload: frame.payload(),
                    upstream: s.upstream_for(v.instrument, &v.account),
                    path: s.cfg.order_path.clone(),
                    journal_seq: None,
                };
                (key, (job, Some((v.quantity, v.price_e4))))
            }
            Kind::CancelOrder => {
                let c = match decode_cancel(frame) {
                    Ok(c) => c,
                    Err(e) => return invalid(e, &no_key),
                };
                let key = (
                    c.account.as_ref().map(owned).unwrap_or_default(),
                    c.client_order_id.as_ref().map(owned).unwrap_or_default(),
                );
                let v = match validate_cancel(&c, Some(frame)) {
                    Ok(v) => v,
                    Err(e) => return invalid(e, &key),
                };
                let job = Job {
                    kind: Kind::CancelOrder,
                    key: key.clone(),
                    orig: Some(owned(&v.orig_client_order_id)),
                    instrument: v.instrument,
                    seq: v.seq,
                    closes_on_answer: false,
                    payload: frame.payload(),
                    upstream: s.upstream_for(v.instrument, &v.account),
                    path: s.cfg.cancel_path.clone(),
                    journal_seq: None,
                };
                (key, (job, None))
            }
            other => return invalid(OrderError::WrongKind(other), &no_key),
        };
        let (job, order) = job;
        let mut st = self.lock();
        if let Some(e) = st.entry(&key) {
            self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
            return match (&e.first, &self.journal) {
                (Some(first), _) => Admit::Answer(first.clone(), e.last.clone()),
                (None, Some(_)) => {
                    let (tx, rx) = oneshot::channel();
                    batch.0.push(Op::Barrier(tx));
                    Admit::Pending(key, rx)
                }
                (None, None) => Admit::Busy,
            };
        }
        let Some(limits) = s.limits(&key.0) else {
            drop(st);
            let why = "no limits for this account".to_owned();
            let ack = self.reject(
                &key,
                job.instrument,
                job.seq,
                RejectReason::UnknownAccount,
                why,
            );
            return Admit::Answer(ack, None);
        };
        let State { accounts, open, .. } = &mut *st;
        let account = accounts
            .entry(key.0.clone())
            .or_insert_with(|| AccountState::new(limits, arrived));
        if account.in_flight >= s.cfg.account_in_flight {
            return Admit::Busy;
        }
        let checked = match order {
            Some((quantity, price)) => {
                let reference = s.reference(job.instrument);
                check_order(limits, account, quantity, price, reference, arrived)
                    .map_err(|(r, why)| (refusal_reason(r), why))
            }
            None => {
                let open = job
                    .orig
                    .as_ref()
                    .is_some_and(|o| open.contains(&(key.0.clone(), o.clone())));
                if !account.take_token(limits, arrived) {
                    Err((
                        RejectReason::RateLimit,
                        format!("more than {} orders per second", limits.rate),
                    ))
                } else if !open {
                    Err((RejectReason::UnknownOrder, "no such open order".into()))
                } else {
                    Ok(())
                }
            }
        };
        if let Err((reason, why)) = checked {
            let ack = self.reject(&key, job.instrument, job.seq, reason, why);
            st.remember(&s.cfg, key, Some(ack.clone()), false);
            return Admit::Answer(ack, None);
        }
        account.in_flight += 1;
        if job.kind == Kind::NewOrder {
            account.open += 1;
        }
        *st.upstream_in_flight
            .entry(s.upstream_name(job.upstream).to_owned())
            .or_default() += 1;
        let ack = ack_frame(
            &key,
            job.instrument,
            job.seq,
            AckStatus::Accepted,
            None,
            None,
        );
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        let is_order = job.kind == Kind::NewOrder;
        let durable = match &self.journal {
            None => {
                st.remember(&s.cfg, key, Some(ack.clone()), is_order);
                None
            }
            Some(_) => {
                st.remember(&s.cfg, key.clone(), None, is_order);
                drop(st);
                let (done, rx) = oneshot::channel();
                let op = Op::Append {
                    record: frame.bytes().clone(),
                    key,
                    ack: ack.clone(),
                    queued: Instant::now(),
                    done,
                };
                batch.0.push(op);
                Some(rx)
            }
        };
        Admit::Accepted(Box::new(Accepted {
            durable,
            ack,
            job,
            arrived,
        }))
    }

    /// Hands a session's journal work to the journal thread, in one message. A journal
    /// thread gone answers through the dropped senders: those orders are then refused as
    /// not durable.
    pub(crate) fn flush(&self, batch: &mut Batch) {
        if let (Some(j), false) = (&self.journal, batch.0.is_empty()) {
            let _ = j.send(std::mem::take(&mut batch.0));
        }
    }

    /// The acknowledgements remembered for an order (after its `Pending` commit fired).
    pub(crate) fn remembered(&self, key: &OrderKey) -> Option<(Bytes, Option<Bytes>)> {
        let st = self.lock();
        let e = st.entry(key)?;
        Some((e.first.clone()?, e.last.clone()))
    }

    /// The journal could not make an accepted order durable: it is refused after all.
    pub(crate) fn not_durable(&self, job: &Job, why: String) -> Bytes {
        let ack = self.reject(
            &job.key,
            job.instrument,
            job.seq,
            RejectReason::Journal,
            why,
        );
        let s = self.settings();
        let mut st = self.lock();
        st.release(job, &s, job.kind == Kind::NewOrder);
        st.open.remove(&job.key);
        if let Some(e) = st.entry_mut(&job.key) {
            e.first = Some(ack.clone());
        }
        drop(st);
        self.room.notify_waiters();
        ack
    }

    /// The upstream answered `job` (its HTTP status and body): the order closes or stays
    /// open, its account and upstream get their room back, its journal record is settled.
    /// Returns the acknowledgement relaying the answer.
    pub(crate) fn finish(&self, job: &Job, status: u16, body: Bytes) -> Bytes {
        let took = (200..300).contains(&status);
        let ack_status = match took {
            true => AckStatus::UpstreamAccepted,
            false => AckStatus::UpstreamRejected,
        };
        match took {
            true => self.stats.upstream_accepted.fetch_add(1, Ordering::Relaxed),
            false => self.stats.upstream_rejected.fetch_add(1, Ordering::Relaxed),
        };
        let ack = ack_frame(
            &job.key,
            job.instrument,
            job.seq,
            ack_status,
            None,
            Some((status, body)),
        );
        let s = self.settings();
        let mut st = self.lock();
        let closes = match job.kind {
            Kind::NewOrder => !took || job.closes_on_answer,
            _ => false,
        };
        st.release(job, &s, closes);
        if closes {
            st.open.remove(&job.key);
        }
        if let Some(e) = st.entry_mut(&job.key) {
            e.last = Some(ack.clone());
        }
        // A cancel the upstream took closes its order.
        if let (true, Some(orig)) = (took, &job.orig) {
            let orig_key = (job.key.0.clone(), orig.clone());
            if st.open.remove(&orig_key) {
                if let Some(a) = st.accounts.get_mut(&job.key.0) {
                    a.open = a.open.saturating_sub(1);
                }
            }
        }
        drop(st);
        if let Some(seq) = job.journal_seq {
            self.settled
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(seq);
        }
        self.room.notify_waiters();
        ack
    }

    /// Prometheus lines for every desk.
    pub(crate) fn render_metrics(o: &mut String, desks: &[Arc<Desk>]) {
        use crate::telemetry::metrics::{family, per_label};
        use std::fmt::Write;
        if desks.is_empty() {
            return;
        }
        type Counter = (&'static str, &'static str, fn(&DeskStats) -> u64);
        let counters: [Counter; 6] = [
            (
                "fluxgate_orders_accepted_total",
                "Orders and cancels accepted (journaled).",
                |s| s.accepted.load(Ordering::Relaxed),
            ),
            (
                "fluxgate_orders_duplicates_total",
                "Repeated client order ids, answered with the first acknowledgement.",
                |s| s.duplicates.load(Ordering::Relaxed),
            ),
            (
                "fluxgate_orders_upstream_accepted_total",
                "Orders the order upstream took.",
                |s| s.upstream_accepted.load(Ordering::Relaxed),
            ),
            (
                "fluxgate_orders_upstream_rejected_total",
                "Orders the order upstream refused.",
                |s| s.upstream_rejected.load(Ordering::Relaxed),
            ),
            (
                "fluxgate_orders_upstream_retries_total",
                "Sends to the order upstream made again after a failure.",
                |s| s.upstream_retries.load(Ordering::Relaxed),
            ),
            (
                "fluxgate_orders_resent_total",
                "Orders sent again after a restart, from the journal.",
                |s| s.resent.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, get) in counters {
            let family = (name, "counter", help);
            per_label(o, family, "desk", desks, |d| &d.name, |d| get(&d.stats));
        }
        family(
            o,
            "fluxgate_orders_rejected_total",
            "counter",
            "Orders and cancels the gateway refused, by reason.",
        );
        for d in desks {
            for (i, n) in d.stats.rejected.iter().enumerate().skip(1) {
                let reason = RejectReason::try_from(i as i32)
                    .map_or("unknown", |r| r.as_str_name())
                    .trim_start_matches("REJECT_REASON_")
                    .to_ascii_lowercase();
                let _ = writeln!(
                    o,
                    "fluxgate_orders_rejected_total{{desk=\"{}\",reason=\"{reason}\"}} {}",
                    d.name,
                    n.load(Ordering::Relaxed)
                );
            }
        }
        family(
            o,
            "fluxgate_orders_in_flight",
            "gauge",
            "Orders sent to an order upstream and not answered yet.",
        );
        for d in desks {
            let st = d.lock();
            let mut ups: Vec<_> = st.upstream_in_flight.iter().collect();
            ups.sort();
            for (u, n) in ups {
                let _ = writeln!(
                    o,
                    "fluxgate_orders_in_flight{{desk=\"{}\",upstream=\"{u}\"}} {n}",
                    d.name
                );
            }
        }
        type Hist = (&'static str, &'static str, fn(&DeskStats) -> &Histogram);
        let hists: [Hist; 3] = [
            (
                "fluxgate_orders_ack_seconds",
                "From an order's arrival to its first acknowledgement.",
                |s| &s.ack_latency,
            ),
            (
                "fluxgate_orders_journal_append_seconds",
                "From an order handed to the journal to its record on disk.",
                |s| &s.journal_append,
            ),
            (
                "fluxgate_orders_journal_fsync_seconds",
                "One group commit's fdatasync.",
                |s| &s.journal_fsync,
            ),
        ];
        for (name, help, get) in hists {
            family(o, name, "histogram", help);
            for d in desks {
                get(&d.stats).render(o, name, &format!("desk=\"{}\"", d.name));
            }
        }
    }
}

impl Settings {
    /// The job a journal record (an order or cancel frame) stands for.
    fn job_from_record(&self, record: &Bytes, seq: u64) -> Option<Job> {
        let mut buf = BytesMut::from(&record[..]);
        let frame = FrameParser::new(self.cfg.max_payload.max(1 << 20))
            .parse(&mut buf)
            .ok()??;
        let h = *frame.header();
        let (key, orig, closes, path) = match h.kind {
            Kind::NewOrder => {
                let o = decode_order(&frame).ok()?;
                let tif = o.time_in_force.and_then(|t| TimeInForce::try_from(t).ok());
                let closes = matches!(tif, Some(TimeInForce::Ioc | TimeInForce::Fok));
                (
                    (o.account?, o.client_order_id?),
                    None,
                    closes,
                    &self.cfg.order_path,
                )
            }
            Kind::CancelOrder => {
                let c = decode_cancel(&frame).ok()?;
                let key = (c.account?, c.client_order_id?);
                (key, c.orig_client_order_id, false, &self.cfg.cancel_path)
            }
            _ => return None,
        };
        Some(Job {
            kind: h.kind,
            upstream: self.upstream_for(h.instrument, &key.0),
            key,
            orig,
            instrument: h.instrument,
            seq: h.seq,
            closes_on_answer: closes,
            payload: frame.payload(),
            path: path.clone(),
            journal_seq: Some(seq),
        })
    }
}

impl State {
    fn new(cfg: &fluxgate_conf::Desk) -> State {
        let size = generation(cfg);
        let spare: Arc<Mutex<Option<HashMap<OrderKey, Entry>>>> = Arc::default();
        // The first spare, touched all over on a thread of its own.
        let slot = Arc::clone(&spare);
        let _ = std::thread::Builder::new()
            .name("fluxgate-forget".into())
            .spawn(move || {
                fluxgate_sys::lower_this_thread_priority();
                let mut m = HashMap::with_capacity(size);
                for i in 0..size as u64 {
                    let key = (Bytes::new(), Bytes::copy_from_slice(&i.to_le_bytes()));
                    m.insert(
                        key,
                        Entry {
                            first: None,
                            last: None,
                        },
                    );
                }
                m.clear();
                *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(m);
            });
        State {
            accounts: HashMap::new(),
            orders: HashMap::with_capacity(size),
            older: HashMap::new(),
            spare,
            open: HashSet::new(),
            upstream_in_flight: HashMap::new(),
        }
    }

    fn entry(&self, key: &OrderKey) -> Option<&Entry> {
        self.orders.get(key).or_else(|| self.older.get(key))
    }

    fn entry_mut(&mut self, key: &OrderKey) -> Option<&mut Entry> {
        match self.orders.contains_key(key) {
            true => self.orders.get_mut(key),
            false => self.older.get_mut(key),
        }
    }

    /// Remembers an order's first acknowledgement for idempotency (an order stays
    /// remembered for at least half of the desk's `remember` newer ones, at most all).
    fn remember(
        &mut self,
        cfg: &fluxgate_conf::Desk,
        key: OrderKey,
        first: Option<Bytes>,
        open: bool,
    ) {
        let size = generation(cfg);
        if self.orders.len() >= size {
            let spare = self.spare.lock().unwrap_or_else(|e| e.into_inner()).take();
            let fresh = spare.unwrap_or_else(|| HashMap::with_capacity(size));
            let gone =
                std::mem::replace(&mut self.older, std::mem::replace(&mut self.orders, fresh));
            // Emptied off the desk's lock (a walk over all of it), then kept for the next
            // rotation.
            let slot = Arc::clone(&self.spare);
            let _ = std::thread::Builder::new()
                .name("fluxgate-forget".into())
                .spawn(move || {
                    fluxgate_sys::lower_this_thread_priority();
                    let mut gone = gone;
                    gone.clear();
                    *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(gone);
                });
        }
        if open {
            self.open.insert(key.clone());
        }
        self.orders.insert(key, Entry { first, last: None });
    }

    /// Gives an answered (or failed) job's room back to its account and upstream.
    fn release(&mut self, job: &Job, s: &Settings, closes: bool) {
        if let Some(a) = self.accounts.get_mut(&job.key.0) {
            a.in_flight = a.in_flight.saturating_sub(1);
            if closes {
                a.open = a.open.saturating_sub(1);
            }
        }
        if let Some(n) = self
            .upstream_in_flight
            .get_mut(s.upstream_name(job.upstream))
        {
            *n -= 1;
        }
    }
}

/// The journal thread: takes every batch queued, appends them and settles what was answered,
/// makes it all durable with one fdatasync (group commit), then records each order's
/// acceptance as its first acknowledgement and tells its session. Settles alone are
/// committed every `SETTLE_EVERY`.
fn journal_thread(mut journal: Journal, rx: mpsc::Receiver<Vec<Op>>, desk: Weak<Desk>) {
    let mut settled = Vec::new();
    loop {
        let first = match rx.recv_timeout(SETTLE_EVERY) {
            Ok(ops) => Some(ops),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let Some(desk) = desk.upgrade() else { return };
        std::mem::swap(
            &mut settled,
            &mut *desk.settled.lock().unwrap_or_else(|e| e.into_inner()),
        );
        if first.is_none() && settled.is_empty() {
            continue;
        }
        let mut appended = Vec::new();
        let mut barriers = Vec::new();
        for op in first.into_iter().chain(rx.try_iter()).flatten() {
            match op {
                Op::Append {
                    record,
                    key,
                    ack,
                    queued,
                    done,
                } => {
                    let seq = journal.append(&record);
                    appended.push((seq, key, ack, queued, done));
                }
                Op::Barrier(done) => barriers.push(done),
            }
        }
        for seq in settled.drain(..) {
            journal.settle(seq);
        }
        let started = Instant::now();
        let result = journal.commit();
        desk.stats.journal_fsync.record(started.elapsed());
        match result {
            Ok(()) => {
                {
                    let mut st = desk.lock();
                    for (_, key, ack, _, _) in &appended {
                        if let Some(e) = st.entry_mut(key) {
                            e.first = Some(ack.clone());
                        }
                    }
                }
                for (seq, _, _, queued, done) in appended {
                    desk.stats.journal_append.record(queued.elapsed());
                    let _ = done.send(Ok(seq));
                }
            }
            Err(e) => {
                tracing::error!(desk = %desk.name, error = %e, "orders journal commit failed");
                for (_, _, _, _, done) in appended {
                    let _ = done.send(Err(format!("journal commit failed: {e}")));
                }
            }
        }
        for done in barriers {
            let _ = done.send(Ok(0));
        }
    }
}

/// Each desk: the one of the same name in `old` (accounts, remembered orders and journal
/// stay, with the new settings), else a new one, its journal opened.
pub(crate) fn desks(
    config: &Config,
    old: &[Arc<Desk>],
    feeds: &[Arc<FeedHub>],
) -> std::io::Result<Vec<Arc<Desk>>> {
    config
        .desks
        .iter()
        .map(|d| match old.iter().find(|o| o.name == d.name) {
            Some(o) => {
                o.set_config(d, config, feeds);
                Ok(Arc::clone(o))
            }
            None => Desk::open(d, config, feeds),
        })
        .collect()
}
