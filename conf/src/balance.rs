//! `[[upstream]]` endpoint weights, load-balancing policy and health checking.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::{ConfError, Source};

/// One upstream endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// Relative share for weighted policies (and ring points for `hash`). Default 1.
    pub weight: u32,
}

/// How a request picks an endpoint among the healthy ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Balance {
    /// In turn (the default).
    RoundRobin,
    /// In turn, in proportion to weights (smooth weighted round robin).
    WeightedRoundRobin,
    /// The endpoint with the fewest requests in flight (this worker's view).
    LeastRequest,
    /// Two endpoints at random; the one with the lower peak-EWMA latency times load.
    P2cEwma,
    /// Consistent hashing (a ketama-style ring): the same key goes to the same endpoint, and
    /// losing an endpoint moves only its keys.
    Hash(HashKey),
}

/// What `Balance::Hash` hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// A request header's value (lowercase name).
    Header(String),
    /// A cookie's value.
    Cookie(String),
    /// The client's IP address.
    ClientIp,
}

/// Active health checking: a GET to `path` on each endpoint every `interval`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub path: String,
    /// Default 5 s.
    pub interval: Duration,
    /// A probe without a 2xx answer within this fails. Default 1 s.
    pub timeout: Duration,
    /// Consecutive passes that bring an endpoint back. Default 2.
    pub healthy_threshold: u32,
    /// Consecutive failures that take it out. Default 3.
    pub unhealthy_threshold: u32,
}

/// Passive health: endpoints answering 5xx or refusing connections are ejected for a while.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Passive {
    /// Consecutive 5xx answers or connect errors that eject an endpoint. Default 5; 0 is off.
    pub consecutive_failures: u32,
    /// How long an ejected endpoint gets no traffic. Default 10 s.
    pub ejection: Duration,
}

impl Default for Passive {
    fn default() -> Self {
        Passive {
            consecutive_failures: 5,
            ejection: Duration::from_secs(10),
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(crate) enum RawEndpoint {
    Addr(String),
    Weighted {
        address: String,
        weight: Option<i64>,
    },
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(crate) enum RawHashKey {
    Named(String),
    Header { header: String },
    Cookie { cookie: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHealthCheck {
    path: String,
    interval: Option<String>,
    timeout: Option<String>,
    healthy_threshold: Option<i64>,
    unhealthy_threshold: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPassive {
    consecutive_failures: Option<i64>,
    ejection: Option<String>,
}

pub(crate) fn endpoints(
    src: &Source<'_>,
    key: &str,
    raw: &Spanned<Vec<Spanned<RawEndpoint>>>,
) -> Result<Vec<Endpoint>, ConfError> {
    if raw.get_ref().is_empty() {
        return Err(src.invalid(
            format!("{key}.endpoints"),
            raw,
            "needs at least one endpoint",
        ));
    }
    raw.get_ref()
        .iter()
        .enumerate()
        .map(|(j, e)| {
            let k = format!("{key}.endpoints[{j}]");
            let (addr, weight) = match e.get_ref() {
                RawEndpoint::Addr(a) => (a, 1),
                RawEndpoint::Weighted { address, weight } => (address, weight.unwrap_or(1)),
            };
            let addr = addr.parse().map_err(|_| {
                src.invalid(k.clone(), e, format!("{addr:?} is not an IP:port address"))
            })?;
            if !(1..=1000).contains(&weight) {
                return Err(src.invalid(format!("{k}.weight"), e, "weight must be 1..=1000"));
            }
            Ok(Endpoint {
                addr,
                weight: weight as u32,
            })
        })
        .collect()
}

pub(crate) fn balance(
    src: &Source<'_>,
    key: &str,
    policy: &Option<Spanned<String>>,
    hash_key: &Option<Spanned<RawHashKey>>,
) -> Result<Balance, ConfError> {
    let name = policy
        .as_ref()
        .map_or("round_robin", |p| p.get_ref().as_str());
    let b = match name {
        "round_robin" => Balance::RoundRobin,
        "weighted_round_robin" => Balance::WeightedRoundRobin,
        "least_request" => Balance::LeastRequest,
        "p2c_ewma" => Balance::P2cEwma,
        "hash" => {
            let Some(k) = hash_key else {
                let p = policy.as_ref().expect("hash was named");
                return Err(src.invalid(
                    format!("{key}.hash_key"),
                    p,
                    "`balance = \"hash\"` needs `hash_key`",
                ));
            };
            Balance::Hash(match k.get_ref() {
                RawHashKey::Named(n) if n == "client_ip" => HashKey::ClientIp,
                RawHashKey::Header { header } => HashKey::Header(header.to_ascii_lowercase()),
                RawHashKey::Cookie { cookie } => HashKey::Cookie(cookie.clone()),
                RawHashKey::Named(_) => {
                    return Err(src.invalid(
                        format!("{key}.hash_key"),
                        k,
                        "expects \"client_ip\", { header = \"...\" } or { cookie = \"...\" }",
                    ))
                }
            })
        }
        other => {
            let p = policy.as_ref().expect("a name was given");
            return Err(src.invalid(
                format!("{key}.balance"),
                p,
                format!(
                    "unknown policy {other:?} (round_robin, weighted_round_robin, least_request, p2c_ewma, hash)"
                ),
            ));
        }
    };
    if hash_key.is_some() && !matches!(b, Balance::Hash(_)) {
        let k = hash_key.as_ref().expect("checked");
        return Err(src.invalid(
            format!("{key}.hash_key"),
            k,
            "only used with `balance = \"hash\"`",
        ));
    }
    Ok(b)
}

fn positive(
    src: &Source<'_>,
    key: String,
    at: &Spanned<impl Sized>,
    v: Option<i64>,
    default: u32,
) -> Result<u32, ConfError> {
    match v {
        None => Ok(default),
        Some(n) if (1..=100).contains(&n) => Ok(n as u32),
        Some(_) => Err(src.invalid(key, at, "must be 1..=100")),
    }
}

fn dur(
    src: &Source<'_>,
    key: String,
    at: &Spanned<impl Sized>,
    v: &Option<String>,
    default: Duration,
) -> Result<Duration, ConfError> {
    match v {
        None => Ok(default),
        Some(s) => crate::parse_duration(s)
            .filter(|d| !d.is_zero())
            .ok_or_else(|| src.invalid(key, at, format!("{s:?} is not a positive duration"))),
    }
}

pub(crate) fn health_check(
    src: &Source<'_>,
    key: &str,
    raw: &Option<Spanned<RawHealthCheck>>,
) -> Result<Option<HealthCheck>, ConfError> {
    let Some(h) = raw else { return Ok(None) };
    let r = h.get_ref();
    let k = |f: &str| format!("{key}.health_check.{f}");
    if !r.path.starts_with('/') {
        return Err(src.invalid(k("path"), h, "paths start with '/'"));
    }
    Ok(Some(HealthCheck {
        path: r.path.clone(),
        interval: dur(src, k("interval"), h, &r.interval, Duration::from_secs(5))?,
        timeout: dur(src, k("timeout"), h, &r.timeout, Duration::from_secs(1))?,
        healthy_threshold: positive(src, k("healthy_threshold"), h, r.healthy_threshold, 2)?,
        unhealthy_threshold: positive(src, k("unhealthy_threshold"), h, r.unhealthy_threshold, 3)?,
    }))
}

pub(crate) fn passive(
    src: &Source<'_>,
    key: &str,
    raw: &Option<Spanned<RawPassive>>,
) -> Result<Passive, ConfError> {
    let Some(p) = raw else {
        return Ok(Passive::default());
    };
    let r = p.get_ref();
    let failures = match r.consecutive_failures {
        None => 5,
        Some(n) if (0..=1000).contains(&n) => n as u32,
        Some(_) => {
            return Err(src.invalid(
                format!("{key}.passive.consecutive_failures"),
                p,
                "must be 0..=1000",
            ))
        }
    };
    Ok(Passive {
        consecutive_failures: failures,
        ejection: dur(
            src,
            format!("{key}.passive.ejection"),
            p,
            &r.ejection,
            Duration::from_secs(10),
        )?,
    })
}
