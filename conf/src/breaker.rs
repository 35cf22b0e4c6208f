//! `[upstream.breaker]`: a circuit breaker per upstream. It opens on an error rate over a
//! sliding window (with a minimum volume), on consecutive failures, and refuses requests
//! past a cap on concurrent ones; while open, requests go to the `fallback` upstream or get
//! the configured answer without touching this one; after `open_for` it lets
//! `half_open_probes` requests through and closes when they all succeed.

use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::{ConfError, Source};

#[derive(Debug, Clone, PartialEq)]
pub struct Breaker {
    /// Failures (5xx answers, connect and protocol errors) per request over `window` at
    /// which it opens. Default 0.6.
    pub error_rate: f64,
    /// Default 60 s.
    pub window: Duration,
    /// Requests in the window before the rate counts. Default 20.
    pub min_requests: u32,
    /// Failures in a row that open it; 0 is off. Default 5.
    pub consecutive_failures: u32,
    /// Requests in flight at once (all workers) past which more are refused; 0 is
    /// unlimited. Default 2000.
    pub max_concurrent: u32,
    /// How long it stays open before probing. Default 10 s.
    pub open_for: Duration,
    /// Requests let through half-open; all must succeed to close it. Default 3.
    pub half_open_probes: u32,
    /// Where refused requests go (index into `Config::upstreams`), else `answer`.
    pub fallback: Option<usize>,
    /// The answer to a refused request without a fallback. Default 503.
    pub status: u16,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBreaker {
    error_rate: Option<f64>,
    window: Option<Spanned<String>>,
    min_requests: Option<Spanned<i64>>,
    consecutive_failures: Option<Spanned<i64>>,
    max_concurrent: Option<Spanned<i64>>,
    open_for: Option<Spanned<String>>,
    half_open_probes: Option<Spanned<i64>>,
    pub(crate) fallback: Option<Spanned<String>>,
    status: Option<Spanned<i64>>,
}

/// The breaker but its fallback, which names an upstream (resolved once all are known).
pub(crate) fn build(
    src: &Source<'_>,
    key: &str,
    raw: &Spanned<RawBreaker>,
) -> Result<Breaker, ConfError> {
    let r = raw.get_ref();
    let k = |f: &str| format!("{key}.{f}");
    let error_rate = r.error_rate.unwrap_or(0.6);
    if !(error_rate > 0.0 && error_rate <= 1.0) {
        return Err(src.invalid(k("error_rate"), raw, "a fraction above 0, at most 1"));
    }
    let status = match &r.status {
        None => 503,
        Some(s) if (400..=599).contains(s.get_ref()) => *s.get_ref() as u16,
        Some(s) => return Err(src.invalid(k("status"), s, "a 4xx or 5xx status")),
    };
    Ok(Breaker {
        error_rate,
        window: src.duration(|| k("window"), &r.window, Duration::from_secs(60))?,
        min_requests: src.count(|| k("min_requests"), &r.min_requests, 20, 1, 1 << 30)? as u32,
        consecutive_failures: src.count(
            || k("consecutive_failures"),
            &r.consecutive_failures,
            5,
            0,
            1 << 30,
        )? as u32,
        max_concurrent: src.count(|| k("max_concurrent"), &r.max_concurrent, 2000, 0, 1 << 30)?
            as u32,
        open_for: src.duration(|| k("open_for"), &r.open_for, Duration::from_secs(10))?,
        half_open_probes: src.count(|| k("half_open_probes"), &r.half_open_probes, 3, 1, 1 << 20)?
            as u32,
        fallback: None,
        status,
    })
}

/// `[upstream.retry]`: how a request whose attempt failed is sent again. A retry happens
/// only under the retry rule (the connection failed, the whole request is at hand, and the
/// upstream never got it or the method is idempotent), on a new connection.
#[derive(Debug, Clone, PartialEq)]
pub struct Retry {
    /// Tries in all, the first included. Default 2.
    pub attempts: u32,
    /// Before the second retry and later ones: a random wait up to `backoff` × 2^(n-2),
    /// at most `max_backoff` (the first retry, after a stale pooled connection, goes at
    /// once). Defaults 25 ms and 250 ms.
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// Retries at most this share of requests (over the last 10 s, per worker)... Default 0.2.
    pub budget: f64,
    /// ...but always this many in those 10 s. Default 10.
    pub min_retries: u32,
    /// Each try's own time limit for the response head. Default: the route's timeout.
    pub per_try_timeout: Option<Duration>,
}

impl Default for Retry {
    fn default() -> Retry {
        Retry {
            attempts: 2,
            backoff: Duration::from_millis(25),
            max_backoff: Duration::from_millis(250),
            budget: 0.2,
            min_retries: 10,
            per_try_timeout: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRetry {
    attempts: Option<Spanned<i64>>,
    backoff: Option<Spanned<String>>,
    max_backoff: Option<Spanned<String>>,
    budget: Option<f64>,
    min_retries: Option<Spanned<i64>>,
    per_try_timeout: Option<Spanned<String>>,
}

pub(crate) fn retry(
    src: &Source<'_>,
    key: &str,
    raw: &Option<Spanned<RawRetry>>,
) -> Result<Retry, ConfError> {
    let Some(raw) = raw else {
        return Ok(Retry::default());
    };
    let r = raw.get_ref();
    let k = |f: &str| format!("{key}.{f}");
    let d = Retry::default();
    let budget = r.budget.unwrap_or(d.budget);
    if !(0.0..=1.0).contains(&budget) {
        return Err(src.invalid(k("budget"), raw, "a fraction from 0 to 1"));
    }
    Ok(Retry {
        attempts: src.count(|| k("attempts"), &r.attempts, 2, 1, 10)? as u32,
        backoff: src.duration(|| k("backoff"), &r.backoff, d.backoff)?,
        max_backoff: src.duration(|| k("max_backoff"), &r.max_backoff, d.max_backoff)?,
        budget,
        min_retries: src.count(|| k("min_retries"), &r.min_retries, 10, 0, 1 << 20)? as u32,
        per_try_timeout: match &r.per_try_timeout {
            None => None,
            Some(_) => {
                Some(src.duration(|| k("per_try_timeout"), &r.per_try_timeout, d.backoff)?)
            }
        },
    })
}
