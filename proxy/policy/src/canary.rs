//! A canary target of a split, watched (`rollback`): over a sliding window of ten slots it
//! counts requests, failures and requests slower than the P95 threshold (the P95 passes the
//! threshold exactly when more than 5% of requests are slower). When either rate passes its
//! threshold with `min_requests` in the window, the canary is rolled back: weight 0 for the
//! hold time of its cause; then it probes with `probe_weight` for one window, and gets its
//! full weight back when that window passes clean. Shared by every worker (atomics).

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::time::{Duration, Instant};

use fluxgate_conf::Rollback;

const ACTIVE: u8 = 0;
const BACK: u8 = 1;
const PROBING: u8 = 2;
const SLOTS: usize = 10;

/// A listener's canary watches: by route (None: no split with a rollback there), by split
/// target (None: not a canary).
pub type RouteCanaries = std::sync::Arc<[Option<std::sync::Arc<[Option<Canary>]>>]>;

/// A canary's state, for metrics: 0 active, 1 rolled back, 2 probing.
pub type State = u8;

/// A transition, for the log (each is reported once, by the request that made it).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Change {
    /// Rolled back: the error rate (or the share of slow requests) over the window.
    Errors {
        rate: f64,
    },
    Latency {
        slow_share: f64,
    },
    Probing,
    Recovered,
}

#[derive(Default)]
struct Slot {
    period: AtomicU64,
    total: AtomicU32,
    failed: AtomicU32,
    slow: AtomicU32,
}

pub struct Canary {
    cfg: Rollback,
    start: Instant,
    state: AtomicU8,
    /// Rolled back: when probing starts; probing: when it is active again (ms after start).
    until: AtomicU64,
    slots: [Slot; SLOTS],
    pub rollbacks: AtomicU64,
}

impl Canary {
    pub fn new(cfg: &Rollback) -> Canary {
        Canary {
            cfg: cfg.clone(),
            start: Instant::now(),
            state: AtomicU8::new(ACTIVE),
            until: AtomicU64::new(0),
            slots: Default::default(),
            rollbacks: AtomicU64::new(0),
        }
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

    /// The canary's weight now, of its configured `full` one; moves from rolled back to
    /// probing and from probing to active when their time is up.
    pub fn weight(&self, full: u32, now: Instant) -> (u32, Option<Change>) {
        let t = self.ms(now);
        match self.state.load(Relaxed) {
            BACK if t >= self.until.load(Relaxed) => {
                if self
                    .state
                    .compare_exchange(BACK, PROBING, Relaxed, Relaxed)
                    .is_ok()
                {
                    self.reset();
                    self.until
                        .store(t + self.cfg.window.as_millis() as u64, Relaxed);
                    return (self.probe(full), Some(Change::Probing));
                }
                (self.probe(full), None)
            }
            BACK => (0, None),
            PROBING if t >= self.until.load(Relaxed) => {
                let won = self
                    .state
                    .compare_exchange(PROBING, ACTIVE, Relaxed, Relaxed)
                    .is_ok();
                (full, won.then_some(Change::Recovered))
            }
            PROBING => (self.probe(full), None),
            _ => (full, None),
        }
    }

    fn probe(&self, full: u32) -> u32 {
        self.cfg.probe_weight.min(full.max(1))
    }

    /// One request's outcome: its time to the response head and whether it failed.
    pub fn record(&self, latency: Duration, failed: bool, now: Instant) -> Option<Change> {
        if self.state.load(Relaxed) == BACK {
            return None;
        }
        let t = self.ms(now);
        let period = t / self.slot_ms();
        let slot = &self.slots[period as usize % SLOTS];
        if slot.period.swap(period, Relaxed) != period {
            slot.total.store(0, Relaxed);
            slot.failed.store(0, Relaxed);
            slot.slow.store(0, Relaxed);
        }
        slot.total.fetch_add(1, Relaxed);
        slot.failed.fetch_add(u32::from(failed), Relaxed);
        slot.slow
            .fetch_add(u32::from(latency > self.cfg.p95), Relaxed);
        let (total, bad, slow) = self
            .slots
            .iter()
            .filter(|s| period.saturating_sub(s.period.load(Relaxed)) < SLOTS as u64)
            .fold((0u32, 0u32, 0u32), |(a, b, c), s| {
                (
                    a + s.total.load(Relaxed),
                    b + s.failed.load(Relaxed),
                    c + s.slow.load(Relaxed),
                )
            });
        if total < self.cfg.min_requests {
            return None;
        }
        let (rate, slow_share) = (
            f64::from(bad) / f64::from(total),
            f64::from(slow) / f64::from(total),
        );
        let (change, hold) = if rate > self.cfg.error_rate {
            (Change::Errors { rate }, self.cfg.error_hold)
        } else if slow_share > 0.05 {
            (Change::Latency { slow_share }, self.cfg.latency_hold)
        } else {
            return None;
        };
        let was = self.state.load(Relaxed);
        if was == BACK
            || self
                .state
                .compare_exchange(was, BACK, Relaxed, Relaxed)
                .is_err()
        {
            return None;
        }
        self.until.store(t + hold.as_millis() as u64, Relaxed);
        self.rollbacks.fetch_add(1, Relaxed);
        self.reset();
        Some(change)
    }

    fn reset(&self) {
        for s in &self.slots {
            s.total.store(0, Relaxed);
            s.failed.store(0, Relaxed);
            s.slow.store(0, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollback() -> Rollback {
        Rollback {
            p95: Duration::from_millis(800),
            error_rate: 0.03,
            min_requests: 20,
            window: Duration::from_secs(60),
            latency_hold: Duration::from_secs(300),
            error_hold: Duration::from_secs(600),
            probe_weight: 1,
        }
    }

    #[test]
    fn slow_requests_roll_it_back_and_it_probes_then_recovers() {
        let c = Canary::new(&rollback());
        let t = Instant::now();
        let fast = Duration::from_millis(100);
        let slow = Duration::from_millis(900);
        // 19 slow of 19: not yet the minimum volume.
        for _ in 0..19 {
            assert_eq!(c.record(slow, false, t), None);
        }
        assert!(matches!(
            c.record(slow, false, t),
            Some(Change::Latency { .. })
        ));
        assert_eq!(c.weight(10, t), (0, None));
        let probe_at = t + Duration::from_secs(300);
        assert_eq!(c.weight(10, probe_at), (1, Some(Change::Probing)));
        assert_eq!(c.weight(10, probe_at), (1, None));
        for _ in 0..30 {
            assert_eq!(c.record(fast, false, probe_at), None);
        }
        let back_at = probe_at + Duration::from_secs(60);
        assert_eq!(c.weight(10, back_at), (10, Some(Change::Recovered)));
        assert_eq!(c.rollbacks.load(Relaxed), 1);
    }

    #[test]
    fn errors_roll_it_back_for_the_longer_hold_and_a_bad_probe_again() {
        let c = Canary::new(&rollback());
        let t = Instant::now();
        let fast = Duration::from_millis(1);
        // 3% is the threshold: 1 of 20 is 5%.
        for _ in 0..19 {
            c.record(fast, false, t);
        }
        assert!(matches!(
            c.record(fast, true, t),
            Some(Change::Errors { .. })
        ));
        assert_eq!(c.weight(10, t + Duration::from_secs(599)).0, 0);
        let probe_at = t + Duration::from_secs(600);
        assert_eq!(c.weight(10, probe_at).1, Some(Change::Probing));
        for _ in 0..19 {
            c.record(fast, false, probe_at);
        }
        assert!(matches!(
            c.record(fast, true, probe_at),
            Some(Change::Errors { .. })
        ));
        assert_eq!(c.weight(10, probe_at + Duration::from_secs(60)).0, 0);
        // A healthy share stays: 5% slow is not more than 5%.
        let c = Canary::new(&rollback());
        for i in 0..100 {
            let l = if i % 20 == 19 {
                Duration::from_secs(1)
            } else {
                fast
            };
            assert_eq!(c.record(l, false, t), None);
        }
    }
}
