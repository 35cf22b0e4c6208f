//! A route's rate limit, shared by every worker so that its rate is the process's: GCRA (the
//! generic cell rate algorithm, a token bucket kept as one "theoretical arrival time" per
//! key). A route-wide limit is one atomic; keyed limits (client address, a header) keep their
//! times in sharded maps, each a short lock, trimmed of keys whose bucket is full again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fluxgate_conf::RateLimit;

const SHARDS: usize = 16;
/// Keys a shard holds before it drops those whose bucket is full again.
const SHARD_KEYS: usize = 4096;

pub struct Limiter {
    /// Nanoseconds between two requests at the rate, and the burst's worth of them.
    interval: u64,
    tolerance: u64,
    start: Instant,
    /// The route-wide key's theoretical arrival time (ns after `start`).
    whole: AtomicU64,
    shards: Vec<Mutex<HashMap<Box<[u8]>, u64>>>,
    /// Requests refused.
    pub refused: AtomicU64,
    /// For a limit kept in Redis: calls Redis did not answer in time.
    pub redis_errors: AtomicU64,
}

impl Limiter {
    pub fn new(cfg: &RateLimit) -> Limiter {
        let interval = (1e9 / cfg.rate).max(1.0) as u64;
        Limiter {
            interval,
            tolerance: interval * u64::from(cfg.burst.max(1) - 1),
            start: Instant::now(),
            whole: AtomicU64::new(0),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            refused: AtomicU64::new(0),
            redis_errors: AtomicU64::new(0),
        }
    }

    /// One request of `key` (None: the route-wide key) at `now`: Ok, or how long until one
    /// would be allowed.
    pub fn check(&self, key: Option<&[u8]>, now: Instant) -> Result<(), Duration> {
        let t = now.saturating_duration_since(self.start).as_nanos() as u64
            // Time 0 must not look like a bucket already in use.
            + self.tolerance
            + self.interval;
        let verdict = match key {
            None => {
                let mut tat = self.whole.load(Relaxed);
                loop {
                    let next = match self.next(tat, t) {
                        Ok(next) => next,
                        Err(wait) => break Err(wait),
                    };
                    match self
                        .whole
                        .compare_exchange_weak(tat, next, Relaxed, Relaxed)
                    {
                        Ok(_) => break Ok(()),
                        Err(now_tat) => tat = now_tat,
                    }
                }
            }
            Some(k) => {
                let shard = &self.shards[shard_of(k)];
                let mut map = shard.lock().unwrap_or_else(|e| e.into_inner());
                if map.len() >= SHARD_KEYS && !map.contains_key(k) {
                    // Keys whose bucket is full again are as good as new: forget them; and
                    // when all are in use (keys sprayed faster than buckets fill), all: the
                    // memory stays bounded, those keys start with a full bucket.
                    map.retain(|_, tat| *tat > t);
                    if map.len() >= SHARD_KEYS {
                        map.clear();
                    }
                }
                let tat = map.get(k).copied().unwrap_or(0);
                match self.next(tat, t) {
                    Ok(next) => {
                        match map.get_mut(k) {
                            Some(v) => *v = next,
                            None => {
                                map.insert(k.into(), next);
                            }
                        }
                        Ok(())
                    }
                    Err(wait) => Err(wait),
                }
            }
        };
        if verdict.is_err() {
            self.refused.fetch_add(1, Relaxed);
        }
        verdict
    }

    /// The emission interval and burst tolerance, in microseconds (for a limit in Redis).
    pub fn gcra_us(&self) -> (u64, u64) {
        (self.interval / 1000, self.tolerance / 1000)
    }

    /// GCRA: the arrival time after a request at `t`, or the wait before one is allowed.
    fn next(&self, tat: u64, t: u64) -> Result<u64, Duration> {
        let tat = tat.max(t);
        if tat - t > self.tolerance {
            return Err(Duration::from_nanos(tat - t - self.tolerance));
        }
        Ok(tat + self.interval)
    }
}

fn shard_of(key: &[u8]) -> usize {
    // FNV-1a: a key's shard, cheaply.
    let h = key.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    (h % SHARDS as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use fluxgate_conf::RateKey;

    fn limiter(rate: f64, burst: u32) -> Limiter {
        Limiter::new(&RateLimit {
            rate,
            burst,
            key: RateKey::Route,
            redis: None,
        })
    }

    #[test]
    fn a_burst_then_the_rate() {
        let l = limiter(10.0, 5);
        let t = Instant::now();
        for _ in 0..5 {
            assert!(l.check(None, t).is_ok());
        }
        let wait = l.check(None, t).unwrap_err();
        assert!(
            wait <= Duration::from_millis(100) && wait > Duration::ZERO,
            "{wait:?}"
        );
        // One more every 100 ms.
        assert!(l.check(None, t + Duration::from_millis(100)).is_ok());
        assert!(l.check(None, t + Duration::from_millis(100)).is_err());
        // Over a second at the rate: 10 more.
        let mut ok = 0;
        // Allowed at 200, 300, .. 1100 ms.
        for ms in (101..=1101).step_by(10) {
            ok += usize::from(l.check(None, t + Duration::from_millis(ms)).is_ok());
        }
        assert_eq!(ok, 10);
        assert_eq!(l.refused.load(Relaxed), 2 + 91);
    }

    #[test]
    fn keys_have_buckets_of_their_own_and_old_ones_are_forgotten() {
        let l = limiter(1.0, 1);
        let t = Instant::now();
        assert!(l.check(Some(b"a"), t).is_ok());
        assert!(l.check(Some(b"a"), t).is_err());
        assert!(l.check(Some(b"b"), t).is_ok());
        for i in 0..(SHARDS * SHARD_KEYS * 2) as u32 {
            let _ = l.check(Some(&i.to_le_bytes()), t + Duration::from_secs(5));
        }
        let held: usize = l.shards.iter().map(|s| s.lock().unwrap().len()).sum();
        assert!(held <= SHARDS * SHARD_KEYS, "{held}");
    }
}
