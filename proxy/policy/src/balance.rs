//! Endpoint choice and endpoint health.
//!
//! `Balancer` is one worker's view (in-flight counts, latency averages, round-robin state:
//! no locks). `Health` is shared by all workers of a process: the active checker and passive
//! ejection write it, every pick reads it, all with relaxed atomics.

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use fluxgate_conf::{Balance, Endpoint, Passive};

/// Ring points per unit of weight for consistent hashing.
const POINTS_PER_WEIGHT: u32 = 160;

/// Milliseconds since the first call: a clock the atomics can hold.
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Health of one endpoint, shared across workers.
#[derive(Debug)]
pub struct EndpointHealth {
    /// The active checker's verdict (true when no checker runs).
    pub active_ok: AtomicBool,
    /// Consecutive passive failures (5xx answers, connect errors).
    failures: AtomicU32,
    /// Passively ejected until this `now_ms()`.
    ejected_until: AtomicU64,
}

/// Health of one upstream's endpoints.
#[derive(Debug)]
pub struct Health {
    pub endpoints: Vec<EndpointHealth>,
    passive: Passive,
}

impl Health {
    pub fn new(n: usize, passive: Passive) -> Health {
        Health {
            endpoints: (0..n)
                .map(|_| EndpointHealth {
                    active_ok: AtomicBool::new(true),
                    failures: AtomicU32::new(0),
                    ejected_until: AtomicU64::new(0),
                })
                .collect(),
            passive,
        }
    }

    pub fn is_healthy(&self, ep: usize) -> bool {
        let e = &self.endpoints[ep];
        if !e.active_ok.load(Ordering::Relaxed) {
            return false;
        }
        // The clock is read only while an ejection is on record.
        let until = e.ejected_until.load(Ordering::Relaxed);
        until == 0 || until <= now_ms()
    }

    /// Records the outcome of a request for passive health; true when this failure
    /// ejected the endpoint.
    pub fn record(&self, ep: usize, failed: bool) -> bool {
        let e = &self.endpoints[ep];
        if !failed {
            if e.failures.load(Ordering::Relaxed) != 0 {
                e.failures.store(0, Ordering::Relaxed);
            }
            return false;
        }
        let limit = self.passive.consecutive_failures;
        if limit > 0 && e.failures.fetch_add(1, Ordering::Relaxed) + 1 >= limit {
            e.failures.store(0, Ordering::Relaxed);
            let until = now_ms() + self.passive.ejection.as_millis() as u64;
            e.ejected_until.store(until, Ordering::Relaxed);
            return true;
        }
        false
    }
}

/// Per-endpoint load and latency, this worker's view.
#[derive(Debug)]
struct Load {
    weight: u32,
    in_flight: Cell<u32>,
    /// Peak-sensitive moving average of response-head latency, in nanoseconds.
    ewma_ns: Cell<f64>,
    last_sample: Cell<Instant>,
}

/// How latency samples decay: the average forgets half of itself in this time.
const EWMA_DECAY: Duration = Duration::from_secs(10);

/// One worker's endpoint chooser for one upstream.
#[derive(Debug)]
pub struct Balancer {
    policy: Balance,
    load: Vec<Load>,
    next: Cell<usize>,
    /// Smooth weighted round robin's running weights.
    current: RefCell<Vec<i64>>,
    /// (point, endpoint), sorted by point.
    ring: Vec<(u64, u32)>,
    rng: Cell<u64>,
}

/// A choice in progress: report how it went with `Balancer::done`.
#[derive(Debug, Clone, Copy)]
pub struct Pick {
    pub ep: usize,
    /// When the request went out; only latency-aware policies read the clock.
    started: Option<Instant>,
}

/// FNV-1a, then a 64-bit finaliser: stable across runs and machines, well spread.
pub fn hash64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

impl Balancer {
    pub fn new(policy: Balance, endpoints: &[Endpoint], seed: u64) -> Balancer {
        let now = Instant::now();
        let mut ring = Vec::new();
        if matches!(policy, Balance::Hash(_)) {
            for (i, e) in endpoints.iter().enumerate() {
                for p in 0..e.weight * POINTS_PER_WEIGHT {
                    ring.push((hash64(format!("{}-{p}", e.addr).as_bytes()), i as u32));
                }
            }
            ring.sort_unstable();
        }
        Balancer {
            policy,
            load: endpoints
                .iter()
                .map(|e| Load {
                    weight: e.weight,
                    in_flight: Cell::new(0),
                    ewma_ns: Cell::new(0.0),
                    last_sample: Cell::new(now),
                })
                .collect(),
            next: Cell::new(0),
            current: RefCell::new(vec![0; endpoints.len()]),
            ring,
            rng: Cell::new(seed | 1),
        }
    }

    fn random(&self, n: usize) -> usize {
        let mut x = self.rng.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.set(x);
        (x % n as u64) as usize
    }

    /// Chooses a healthy endpoint; `key` is the hashed key for `Balance::Hash` (a request
    /// without the key falls back to round robin). None when no endpoint is healthy.
    pub fn pick(&self, healthy: impl Fn(usize) -> bool, key: Option<u64>) -> Option<Pick> {
        let n = self.load.len();
        let ep = match &self.policy {
            Balance::RoundRobin => self.round_robin(&healthy),
            Balance::Hash(_) if key.is_none() => self.round_robin(&healthy),
            Balance::Hash(_) => {
                let h = key.unwrap_or_default();
                let start = self.ring.partition_point(|&(p, _)| p < h);
                (0..self.ring.len())
                    .map(|i| self.ring[(start + i) % self.ring.len()].1 as usize)
                    .find(|&e| healthy(e))
            }
            Balance::WeightedRoundRobin => {
                let mut cur = self.current.borrow_mut();
                let mut total = 0i64;
                let mut best: Option<usize> = None;
                for i in (0..n).filter(|&i| healthy(i)) {
                    let w = i64::from(self.load[i].weight);
                    cur[i] += w;
                    total += w;
                    if best.is_none_or(|b| cur[i] > cur[b]) {
                        best = Some(i);
                    }
                }
                if let Some(b) = best {
                    cur[b] -= total;
                }
                best
            }
            Balance::LeastRequest => {
                let start = self.next.get();
                self.next.set((start + 1) % n);
                (0..n)
                    .map(|i| (start + i) % n)
                    .filter(|&i| healthy(i))
                    .min_by_key(|&i| self.load[i].in_flight.get())
            }
            Balance::P2cEwma => {
                let a = self.random(n);
                let b = (a + 1 + self.random(n.max(2) - 1)) % n;
                match (healthy(a), healthy(b)) {
                    (true, true) => Some(if self.cost(a) <= self.cost(b) { a } else { b }),
                    (true, false) => Some(a),
                    (false, true) => Some(b),
                    (false, false) => self.round_robin(&healthy),
                }
            }
        }?;
        let l = &self.load[ep];
        l.in_flight.set(l.in_flight.get() + 1);
        Some(Pick {
            ep,
            started: matches!(self.policy, Balance::P2cEwma).then(Instant::now),
        })
    }

    fn round_robin(&self, healthy: &impl Fn(usize) -> bool) -> Option<usize> {
        let n = self.load.len();
        let start = self.next.get();
        let ep = (0..n).map(|i| (start + i) % n).find(|&i| healthy(i))?;
        self.next.set((ep + 1) % n);
        Some(ep)
    }

    /// Expected wait on an endpoint: its latency average times the requests it would queue
    /// behind (plus this one).
    fn cost(&self, ep: usize) -> f64 {
        let l = &self.load[ep];
        l.ewma_ns.get().max(1.0) * f64::from(l.in_flight.get() + 1)
    }

    /// The request got its answer (or failed): update in-flight and latency.
    pub fn done(&self, pick: Pick) {
        let l = &self.load[pick.ep];
        l.in_flight.set(l.in_flight.get().saturating_sub(1));
        if let Some(started) = pick.started {
            let now = Instant::now();
            let sample = now.duration_since(started).as_nanos() as f64;
            let elapsed = now.duration_since(l.last_sample.get()).as_secs_f64();
            let keep = (-elapsed / EWMA_DECAY.as_secs_f64() * std::f64::consts::LN_2).exp();
            let old = l.ewma_ns.get();
            // Peak-sensitive: a slower sample takes over at once, faster ones ease it down.
            l.ewma_ns.set(if sample > old {
                sample
            } else {
                old * keep + sample * (1.0 - keep)
            });
            l.last_sample.set(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fluxgate_conf::HashKey;

    fn eps(weights: &[u32]) -> Vec<Endpoint> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| Endpoint {
                addr: format!("10.0.0.{}:80", i + 1).parse().unwrap(),
                weight,
            })
            .collect()
    }

    fn counts(
        b: &Balancer,
        n: usize,
        rounds: usize,
        healthy: impl Fn(usize) -> bool,
    ) -> Vec<usize> {
        let mut c = vec![0; n];
        for _ in 0..rounds {
            let p = b.pick(&healthy, None).unwrap();
            c[p.ep] += 1;
            b.done(p);
        }
        c
    }

    #[test]
    fn round_robin_and_weighted_are_exact() {
        let b = Balancer::new(Balance::RoundRobin, &eps(&[1, 1, 1]), 1);
        assert_eq!(counts(&b, 3, 300, |_| true), [100, 100, 100]);
        assert_eq!(counts(&b, 3, 200, |i| i != 1), [100, 0, 100]);
        let b = Balancer::new(Balance::WeightedRoundRobin, &eps(&[1, 2, 3]), 1);
        assert_eq!(counts(&b, 3, 600, |_| true), [100, 200, 300]);
    }

    #[test]
    fn hash_ring_moves_only_the_lost_endpoints_keys() {
        let b = Balancer::new(Balance::Hash(HashKey::ClientIp), &eps(&[1, 1, 1, 1]), 1);
        let keys: Vec<String> = (0..2000).map(|i| format!("user-{i}")).collect();
        let before: Vec<usize> = keys
            .iter()
            .map(|k| b.pick(|_| true, Some(hash64(k.as_bytes()))).unwrap().ep)
            .collect();
        let after: Vec<usize> = keys
            .iter()
            .map(|k| b.pick(|i| i != 2, Some(hash64(k.as_bytes()))).unwrap().ep)
            .collect();
        let mut share = [0; 4];
        for (x, y) in before.iter().zip(&after) {
            share[*x] += 1;
            if *x != 2 {
                assert_eq!(x, y, "a key of a surviving endpoint moved");
            } else {
                assert_ne!(*y, 2);
            }
        }
        for s in share {
            assert!((350..650).contains(&s), "uneven ring: {share:?}");
        }
    }

    #[test]
    fn p2c_prefers_the_faster_endpoint() {
        let b = Balancer::new(Balance::P2cEwma, &eps(&[1, 1]), 7);
        // Teach it: endpoint 0 answers in 20 ms, endpoint 1 at once.
        let slow = Pick {
            ep: 0,
            started: Some(Instant::now() - Duration::from_millis(20)),
        };
        b.load[0].in_flight.set(1);
        b.done(slow);
        let c = counts(&b, 2, 100, |_| true);
        assert!(c[1] > 90, "{c:?}");
    }

    #[test]
    fn least_request_avoids_the_busy_one() {
        let b = Balancer::new(Balance::LeastRequest, &eps(&[1, 1, 1]), 1);
        let held = b.pick(|_| true, None).unwrap();
        for _ in 0..10 {
            let p = b.pick(|_| true, None).unwrap();
            assert_ne!(p.ep, held.ep);
            b.done(p);
        }
    }

    #[test]
    fn passive_ejection_and_return() {
        let h = Health::new(
            2,
            Passive {
                consecutive_failures: 3,
                ejection: Duration::from_millis(50),
            },
        );
        h.record(0, true);
        h.record(0, true);
        h.record(0, false);
        h.record(0, true);
        assert!(h.is_healthy(0), "failures must be consecutive");
        h.record(0, true);
        h.record(0, true);
        assert!(!h.is_healthy(0));
        assert!(h.is_healthy(1));
        std::thread::sleep(Duration::from_millis(60));
        assert!(h.is_healthy(0), "back after the ejection time");
    }
}
