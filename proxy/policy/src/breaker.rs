//! A circuit breaker for one upstream, shared by every worker (relaxed atomics, no lock):
//! closed, it counts outcomes in a sliding window of ten slots and opens on the error rate
//! (with a minimum volume) or on consecutive failures; open, it refuses until `open_for` has
//! passed; half-open, it lets `half_open_probes` requests through, closes when they all
//! succeed and opens again on the first failure. A cap on requests in flight refuses the
//! excess in any state.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::time::Instant;

use fluxgate_conf::Breaker as Settings;

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;
const SLOTS: usize = 10;

/// The breaker's state, for metrics: 0 closed, 1 open, 2 half-open.
pub type State = u8;

/// Why a request may not go to the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Open,
    /// `max_concurrent` requests are in flight.
    Busy,
}

/// A request let through: give it back to `done` with its outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    probe: bool,
    /// This request moved the breaker from open to half-open.
    began_probing: bool,
}

impl Pass {
    /// Whether this request moved the breaker from open to half-open (for the log).
    pub fn began_probing(&self) -> bool {
        self.began_probing
    }
}

/// A change of state `done` made: the breaker opened or closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Opened,
    Closed,
}

#[derive(Default)]
struct Slot {
    /// Which slot-length period of time it counts (ms since start / slot length).
    period: AtomicU64,
    total: AtomicU32,
    failed: AtomicU32,
}

pub struct Breaker {
    /// The upstream's name, for the log.
    name: String,
    cfg: Settings,
    start: Instant,
    state: AtomicU8,
    /// When it last opened, ms since `start`.
    opened_at: AtomicU64,
    in_flight: AtomicU32,
    consecutive: AtomicU32,
    /// Half-open: probes let through, and probes that succeeded.
    probes: AtomicU32,
    probes_ok: AtomicU32,
    slots: [Slot; SLOTS],
    /// Times it opened, and requests it refused.
    pub opened: AtomicU64,
    pub refused: AtomicU64,
}

impl Breaker {
    pub fn new(upstream: &str, cfg: &Settings) -> Breaker {
        Breaker {
            name: upstream.to_owned(),
            cfg: cfg.clone(),
            start: Instant::now(),
            state: AtomicU8::new(CLOSED),
            opened_at: AtomicU64::new(0),
            in_flight: AtomicU32::new(0),
            consecutive: AtomicU32::new(0),
            probes: AtomicU32::new(0),
            probes_ok: AtomicU32::new(0),
            slots: Default::default(),
            opened: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    pub fn upstream(&self) -> &str {
        &self.name
    }

    pub fn settings(&self) -> &Settings {
        &self.cfg
    }

    pub fn state(&self) -> State {
        self.state.load(Relaxed)
    }

    fn ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.start).as_millis() as u64
    }

    fn slot_ms(&self) -> u64 {
        (self.cfg.window.as_millis() as u64 / SLOTS as u64).max(1)
    }

    /// Whether a request may go to the upstream now.
    pub fn admit(&self, now: Instant) -> Result<Pass, Refused> {
        let refuse = |why| {
            self.refused.fetch_add(1, Relaxed);
            Err(why)
        };
        let max = self.cfg.max_concurrent;
        if max > 0 && self.in_flight.load(Relaxed) >= max {
            return refuse(Refused::Busy);
        }
        let mut state = self.state.load(Relaxed);
        let mut began_probing = false;
        if state == OPEN {
            let open_for = self.cfg.open_for.as_millis() as u64;
            if self.ms(now) < self.opened_at.load(Relaxed) + open_for {
                return refuse(Refused::Open);
            }
            // Time to probe: the first to see it resets the probe counts.
            if self
                .state
                .compare_exchange(OPEN, HALF_OPEN, Relaxed, Relaxed)
                .is_ok()
            {
                self.probes.store(0, Relaxed);
                self.probes_ok.store(0, Relaxed);
                began_probing = true;
            }
            state = HALF_OPEN;
        }
        let probe = state == HALF_OPEN;
        if probe && self.probes.fetch_add(1, Relaxed) >= self.cfg.half_open_probes {
            return refuse(Refused::Open);
        }
        self.in_flight.fetch_add(1, Relaxed);
        Ok(Pass {
            probe,
            began_probing,
        })
    }

    /// The outcome of a request `admit` let through, and the change of state it made.
    pub fn done(&self, pass: Pass, failed: bool, now: Instant) -> Option<Change> {
        self.in_flight.fetch_sub(1, Relaxed);
        if pass.probe {
            if self.state.load(Relaxed) != HALF_OPEN {
                return None;
            }
            if failed {
                return self.open(now);
            } else if self.probes_ok.fetch_add(1, Relaxed) + 1 >= self.cfg.half_open_probes {
                self.close();
                return Some(Change::Closed);
            }
            return None;
        }
        if self.state.load(Relaxed) != CLOSED {
            return None;
        }
        self.count(failed, now);
        let streak = match failed {
            true => self.consecutive.fetch_add(1, Relaxed) + 1,
            false => {
                self.consecutive.store(0, Relaxed);
                0
            }
        };
        let limit = self.cfg.consecutive_failures;
        if limit > 0 && streak >= limit {
            return self.open(now);
        }
        if failed {
            let (total, bad) = self.window(now);
            if total >= self.cfg.min_requests
                && f64::from(bad) >= self.cfg.error_rate * f64::from(total)
            {
                return self.open(now);
            }
        }
        None
    }

    fn count(&self, failed: bool, now: Instant) {
        let period = self.ms(now) / self.slot_ms();
        let slot = &self.slots[period as usize % SLOTS];
        let was = slot.period.swap(period, Relaxed);
        if was != period {
            // A slot from an older period: start it again (a race may lose a count).
            slot.total.store(0, Relaxed);
            slot.failed.store(0, Relaxed);
        }
        slot.total.fetch_add(1, Relaxed);
        if failed {
            slot.failed.fetch_add(1, Relaxed);
        }
    }

    /// Requests and failures in the window ending now.
    fn window(&self, now: Instant) -> (u32, u32) {
        let period = self.ms(now) / self.slot_ms();
        self.slots
            .iter()
            .filter(|s| period.saturating_sub(s.period.load(Relaxed)) < SLOTS as u64)
            .fold((0, 0), |(t, f), s| {
                (t + s.total.load(Relaxed), f + s.failed.load(Relaxed))
            })
    }

    fn open(&self, now: Instant) -> Option<Change> {
        self.opened_at.store(self.ms(now), Relaxed);
        if self.state.swap(OPEN, Relaxed) == OPEN {
            return None;
        }
        self.opened.fetch_add(1, Relaxed);
        Some(Change::Opened)
    }

    fn close(&self) {
        for s in &self.slots {
            s.total.store(0, Relaxed);
            s.failed.store(0, Relaxed);
        }
        self.consecutive.store(0, Relaxed);
        self.state.store(CLOSED, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn settings() -> Settings {
        Settings {
            error_rate: 0.5,
            window: Duration::from_secs(10),
            min_requests: 10,
            consecutive_failures: 3,
            max_concurrent: 5,
            open_for: Duration::from_secs(1),
            half_open_probes: 2,
            fallback: None,
            status: 503,
        }
    }

    #[test]
    fn consecutive_failures_open_it_and_probes_close_it() {
        let b = Breaker::new("u", &settings());
        let t = Instant::now();
        let changes: Vec<_> = (0..3)
            .map(|_| {
                let p = b.admit(t).unwrap();
                b.done(p, true, t)
            })
            .collect();
        assert_eq!(changes, [None, None, Some(Change::Opened)]);
        assert_eq!(b.state(), OPEN);
        assert_eq!(b.admit(t + Duration::from_millis(999)), Err(Refused::Open));
        let later = t + Duration::from_secs(1);
        let (p1, p2) = (b.admit(later).unwrap(), b.admit(later).unwrap());
        assert!(p1.began_probing() && !p2.began_probing());
        assert_eq!(b.admit(later), Err(Refused::Open), "only two probes");
        assert_eq!(b.state(), HALF_OPEN);
        assert_eq!(b.done(p1, false, later), None);
        assert_eq!(b.done(p2, false, later), Some(Change::Closed));
        assert_eq!(b.state(), CLOSED);
        // A failed probe opens it again.
        for _ in 0..3 {
            let p = b.admit(later).unwrap();
            b.done(p, true, later);
        }
        let again = later + Duration::from_secs(1);
        let p = b.admit(again).unwrap();
        b.done(p, true, again);
        assert_eq!(b.state(), OPEN);
        assert_eq!(b.opened.load(Relaxed), 3);
    }

    #[test]
    fn the_error_rate_opens_it_past_the_minimum_volume() {
        let mut s = settings();
        s.consecutive_failures = 0;
        let b = Breaker::new("u", &s);
        let t = Instant::now();
        // Alternating: 50%, but only past 10 requests.
        for i in 0..9 {
            let p = b.admit(t).unwrap();
            b.done(p, i % 2 == 0, t);
        }
        assert_eq!(b.state(), CLOSED);
        let p = b.admit(t).unwrap();
        b.done(p, false, t);
        let p = b.admit(t).unwrap();
        b.done(p, true, t);
        assert_eq!(b.state(), OPEN);
        // Outcomes older than the window no longer count.
        let b = Breaker::new("u", &s);
        for _ in 0..9 {
            let p = b.admit(t).unwrap();
            b.done(p, true, t);
        }
        let later = t + Duration::from_secs(11);
        let p = b.admit(later).unwrap();
        b.done(p, true, later);
        assert_eq!(b.state(), CLOSED);
    }

    #[test]
    fn requests_past_the_cap_are_refused_in_any_state() {
        let b = Breaker::new("u", &settings());
        let t = Instant::now();
        let passes: Vec<_> = (0..5).map(|_| b.admit(t).unwrap()).collect();
        assert_eq!(b.admit(t), Err(Refused::Busy));
        b.done(passes[0], false, t);
        assert!(b.admit(t).is_ok());
        assert_eq!(b.refused.load(Relaxed), 1);
    }
}
