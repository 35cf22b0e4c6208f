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
