//! `[[listener.route]]`: what a request must look like to match, and what the gateway does
//! with it. Regexes are compiled and header names checked here, once, at load.

use std::collections::BTreeMap;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};
use regex::Regex;
use serde::Deserialize;
use toml::Spanned;

use crate::{ConfError, Source, Upstream};

/// One route. Routes are tried in order; the first that matches wins.
#[derive(Debug, Clone)]
pub struct Route {
    /// Label in metrics and logs. Default `route<index>` (`default` for the listener
    /// shorthands).
    pub name: String,
    pub matcher: RouteMatch,
    pub action: RouteAction,
    /// Replaces `upstream.response_timeout` for this route. Default: the upstream's.
    pub timeout: Option<Duration>,
    /// Largest request body in bytes: a longer Content-Length gets 413 at once, a streamed
    /// body 413 (or a reset stream) when it passes it. Default: none.
    pub max_body: Option<u64>,
    /// Replaces the matched `path_prefix` before forwarding. Default: none.
    pub rewrite_prefix: Option<String>,
    /// Applied to the request before forwarding. Default: none.
    pub request_headers: HeaderOps,
    /// Applied to the response (forwarded or direct). Default: none.
    pub response_headers: HeaderOps,
    /// `rate_limit`: requests past it get 429 with `Retry-After`. Default: none.
    pub rate_limit: Option<RateLimit>,
}

/// Every condition set must hold; an empty match matches everything.
#[derive(Debug, Clone, Default)]
pub struct RouteMatch {
    pub host: Option<HostMatch>,
    pub path: Option<PathMatch>,
    /// Any of these; empty means any method.
    pub methods: Vec<Method>,
    pub headers: Vec<HeaderMatch>,
    pub query: Vec<QueryMatch>,
}

/// Host (from Host or the HTTP/2 authority, port removed, compared without case).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    /// `api.example.com`, stored lowercase.
    Exact(String),
    /// `*.example.com`, stored as `.example.com`: any host ending in it (any depth).
    Suffix(String),
}

#[derive(Debug, Clone)]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

/// How a header or query parameter value must look.
#[derive(Debug, Clone)]
pub enum ValueMatch {
    Exact(String),
    Regex(Regex),
    Present,
    Absent,
}

#[derive(Debug, Clone)]
pub struct HeaderMatch {
    pub name: HeaderName,
    pub value: ValueMatch,
}

/// A query parameter, compared as it appears in the URL (no percent-decoding).
#[derive(Debug, Clone)]
pub struct QueryMatch {
    pub name: String,
    pub value: ValueMatch,
}

#[derive(Debug, Clone)]
pub enum RouteAction {
    /// Proxy to the upstream at this index of `Config::upstreams`.
    Forward(usize),
    /// Answer directly.
    Respond {
        status: u16,
        body: bytes::Bytes,
        headers: Vec<(HeaderName, HeaderValue)>,
    },
    /// Answer with a redirect to `location`, with the request's path and query appended when
    /// `keep_path`.
    Redirect {
        status: u16,
        location: String,
        keep_path: bool,
    },
    /// Publish to or subscribe to a feed: a WebSocket upgrade, or (subscribing) a streaming
    /// response of envelope frames.
    Feed(crate::FeedEndpoint),
    /// Proxy to one of several upstreams by weight (`split`).
    Split(Box<Split>),
    /// Order entry for a desk (index into `Config::desks`): a WebSocket upgrade to an order
    /// session, or one order per `POST` of `application/x-protobuf`.
    Orders(usize),
}

/// `split = { targets = [{ upstream, weight }, ..], sticky_header | sticky_cookie,
/// force_header | force_cookie }`: the route's traffic shared between upstreams.
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    pub targets: Vec<SplitTarget>,
    /// Where the user key of a sticky bucket is read (none: a weighted draw per request).
    pub sticky: Option<KeySource>,
    /// Where a tester names the target (its upstream's name) to force.
    pub force: Option<KeySource>,
    /// `rollback = { .. }`: canary targets leave the split on their own when they misbehave.
    pub rollback: Option<Rollback>,
}

/// When a canary target (`canary = true`) is taken out of its split, and how it comes back:
/// its P95 latency or its error rate over `window` (once it has `min_requests` there)
/// passes the threshold, its weight goes to the first target that is not a canary for
/// `latency_hold` or `error_hold`; then it gets `probe_weight` for a `window`, and its full
/// weight again when that window passes clean.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollback {
    /// Default 800 ms.
    pub p95: std::time::Duration,
    /// Default 0.03.
    pub error_rate: f64,
    /// Default 20.
    pub min_requests: u32,
    /// Default 60 s.
    pub window: std::time::Duration,
    /// Default 5 min.
    pub latency_hold: std::time::Duration,
    /// Default 10 min.
    pub error_hold: std::time::Duration,
    /// The canary's weight while it probes. Default 1.
    pub probe_weight: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitTarget {
    /// Index into `Config::upstreams`.
    pub upstream: usize,
    /// The upstream's name (what a forcing header or cookie names).
    pub name: String,
    pub weight: u32,
    /// Watched by the split's `rollback`.
    pub canary: bool,
}

/// `rate_limit = { rate, burst, key }` on a route: a token bucket per key, for the whole
/// process (every worker draws from the same buckets).
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimit {
    /// Requests per second.
    pub rate: f64,
    /// Requests allowed at once above the rate. Default: the rate (at least 1).
    pub burst: u32,
    pub key: RateKey,
    /// `redis = "IP:PORT"`: the buckets live in that Redis, shared by every gateway using
    /// it (a fleet's limit). Default: none, the process's own.
    pub redis: Option<GlobalLimit>,
}

/// A rate limit kept in Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalLimit {
    pub address: std::net::SocketAddr,
    /// `fail = "open"` (the default: requests pass while Redis cannot answer) or
    /// `"closed"` (they get 429).
    pub fail_open: bool,
    /// How long an answer from Redis may take before it counts as unreachable. Default 50 ms.
    pub timeout: std::time::Duration,
}

/// What a rate limit's buckets are kept by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RateKey {
    /// `key = "client"`: the client's address (the default).
    Client,
    /// `key = "route"`: one bucket for the route.
    Route,
    /// `key = "header:NAME"`: the header's value (requests without it share one bucket).
    Header(HeaderName),
}

/// A request header or cookie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    Header(HeaderName),
    Cookie(String),
}

/// Header edits: `remove` first, then `set` (replace), then `add` (append).
#[derive(Debug, Clone, Default)]
pub struct HeaderOps {
    pub remove: Vec<HeaderName>,
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
}

impl HeaderOps {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRoute {
    name: Option<String>,
    host: Option<Spanned<String>>,
    path: Option<Spanned<String>>,
    path_prefix: Option<Spanned<String>>,
    path_regex: Option<Spanned<String>>,
    #[serde(default)]
    methods: Vec<Spanned<String>>,
    #[serde(default)]
    headers: Vec<Spanned<RawValueMatch>>,
    #[serde(default)]
    query: Vec<Spanned<RawValueMatch>>,
    upstream: Option<Spanned<String>>,
    respond: Option<Spanned<RawRespond>>,
    redirect: Option<Spanned<RawRedirect>>,
    feed: Option<Spanned<RawFeedRoute>>,
    orders: Option<Spanned<String>>,
    split: Option<Spanned<RawSplit>>,
    rate_limit: Option<Spanned<RawRateLimit>>,
    timeout: Option<Spanned<String>>,
    max_body: Option<Spanned<crate::RawSize>>,
    rewrite_prefix: Option<Spanned<String>>,
    request_headers: Option<Spanned<RawHeaderOps>>,
    response_headers: Option<Spanned<RawHeaderOps>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    rate: f64,
    burst: Option<i64>,
    key: Option<String>,
    redis: Option<Spanned<String>>,
    fail: Option<Spanned<String>>,
    redis_timeout: Option<Spanned<String>>,
}

fn rate_limit(
    src: &Source<'_>,
    key: &str,
    raw: &Spanned<RawRateLimit>,
) -> Result<RateLimit, ConfError> {
    let r = raw.get_ref();
    if !(r.rate > 0.0 && r.rate <= 1e9) {
        return Err(src.invalid(format!("{key}.rate"), raw, "requests per second, above 0"));
    }
    let burst = r.burst.unwrap_or((r.rate.ceil() as i64).max(1));
    if !(1..=1_000_000_000).contains(&burst) {
        return Err(src.invalid(format!("{key}.burst"), raw, "between 1 and 1000000000"));
    }
    let k = match r.key.as_deref() {
        None | Some("client") => RateKey::Client,
        Some("route") => RateKey::Route,
        Some(h) if h.starts_with("header:") => RateKey::Header(header_name(
            src,
            format!("{key}.key"),
            raw,
            &h["header:".len()..],
        )?),
        Some(other) => {
            return Err(src.invalid(
                format!("{key}.key"),
                raw,
                format!("{other:?}: client, route or header:NAME"),
            ))
        }
    };
    let redis = match &r.redis {
        None => None,
        Some(a) => Some(GlobalLimit {
            address: src.addr(format!("{key}.redis"), a)?,
            fail_open: match r.fail.as_ref().map(|f| f.get_ref().as_str()) {
                None | Some("open") => true,
                Some("closed") => false,
                Some(_) => {
                    let f = r.fail.as_ref().expect("set");
                    return Err(src.invalid(format!("{key}.fail"), f, "open or closed"));
                }
            },
            timeout: src.duration(
                || format!("{key}.redis_timeout"),
                &r.redis_timeout,
                std::time::Duration::from_millis(50),
            )?,
        }),
    };
    Ok(RateLimit {
        rate: r.rate,
        burst: burst as u32,
        key: k,
        redis,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSplit {
    targets: Vec<RawSplitTarget>,
    sticky_header: Option<String>,
    sticky_cookie: Option<String>,
    force_header: Option<String>,
    force_cookie: Option<String>,
    rollback: Option<Spanned<RawRollback>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSplitTarget {
    upstream: Spanned<String>,
    weight: i64,
    #[serde(default)]
    canary: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRollback {
    p95: Option<Spanned<String>>,
    error_rate: Option<f64>,
    min_requests: Option<Spanned<i64>>,
    window: Option<Spanned<String>>,
    latency_hold: Option<Spanned<String>>,
    error_hold: Option<Spanned<String>>,
    probe_weight: Option<Spanned<i64>>,
}

fn split(
    src: &Source<'_>,
    key: &str,
    raw: &Spanned<RawSplit>,
    upstreams: &[Upstream],
) -> Result<Split, ConfError> {
    let r = raw.get_ref();
    let mut targets: Vec<SplitTarget> = Vec::new();
    for (i, t) in r.targets.iter().enumerate() {
        let at = format!("{key}.targets[{i}]");
        let upstream = upstream_index(src, format!("{at}.upstream"), &t.upstream, upstreams)?;
        if !(0..=1_000_000).contains(&t.weight) {
            return Err(src.invalid(format!("{at}.weight"), raw, "between 0 and 1000000"));
        }
        if targets.iter().any(|x| x.upstream == upstream) {
            return Err(src.invalid(format!("{at}.upstream"), &t.upstream, "named twice"));
        }
        targets.push(SplitTarget {
            upstream,
            name: t.upstream.get_ref().clone(),
            weight: t.weight as u32,
            canary: t.canary,
        });
    }
    if targets.len() < 2 || targets.iter().all(|t| t.weight == 0) {
        return Err(src.invalid(
            format!("{key}.targets"),
            raw,
            "a split has two targets or more, and some weight",
        ));
    }
    let source =
        |what: &str, header: &Option<String>, cookie: &Option<String>| match (header, cookie) {
            (None, None) => Ok(None),
            (Some(h), None) => Ok(Some(KeySource::Header(header_name(
                src,
                format!("{key}.{what}_header"),
                raw,
                h,
            )?))),
            (None, Some(c))
                if !c.is_empty()
                    && c.bytes()
                        .all(|b| b.is_ascii_graphic() && !b"=;,".contains(&b)) =>
            {
                Ok(Some(KeySource::Cookie(c.clone())))
            }
            (None, Some(_)) => {
                Err(src.invalid(format!("{key}.{what}_cookie"), raw, "not a cookie name"))
            }
            (Some(_), Some(_)) => Err(src.invalid(
                format!("{key}.{what}_header"),
                raw,
                format!("one of `{what}_header` and `{what}_cookie`"),
            )),
        };
    let rollback = match &r.rollback {
        None => None,
        Some(rb) => {
            let b = rb.get_ref();
            let at = |f: &str| format!("{key}.rollback.{f}");
            if !targets.iter().any(|t| t.canary) || targets.iter().all(|t| t.canary) {
                return Err(src.invalid(
                    at("p95").replace(".p95", ""),
                    rb,
                    "a rollback needs a target with `canary = true` and one without",
                ));
            }
            let error_rate = b.error_rate.unwrap_or(0.03);
            if !(error_rate > 0.0 && error_rate <= 1.0) {
                return Err(src.invalid(at("error_rate"), rb, "a fraction above 0, at most 1"));
            }
            let secs = std::time::Duration::from_secs;
            Some(Rollback {
                p95: src.duration(|| at("p95"), &b.p95, std::time::Duration::from_millis(800))?,
                error_rate,
                min_requests: src.count(|| at("min_requests"), &b.min_requests, 20, 1, 1 << 30)?
                    as u32,
                window: src.duration(|| at("window"), &b.window, secs(60))?,
                latency_hold: src.duration(|| at("latency_hold"), &b.latency_hold, secs(300))?,
                error_hold: src.duration(|| at("error_hold"), &b.error_hold, secs(600))?,
                probe_weight: src.count(|| at("probe_weight"), &b.probe_weight, 1, 1, 1_000_000)?
                    as u32,
            })
        }
    };
    if r.rollback.is_none() && targets.iter().any(|t| t.canary) {
        return Err(src.invalid(
            format!("{key}.targets"),
            raw,
            "`canary = true` needs the split's `rollback = { .. }`",
        ));
    }
    Ok(Split {
        targets,
        sticky: source("sticky", &r.sticky_header, &r.sticky_cookie)?,
        force: source("force", &r.force_header, &r.force_cookie)?,
        rollback,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFeedRoute {
    name: Spanned<String>,
    role: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRespond {
    #[serde(default = "default_status")]
    pub(crate) status: i64,
    #[serde(default)]
    pub(crate) body: String,
    #[serde(default)]
    pub(crate) headers: BTreeMap<String, String>,
}

fn default_status() -> i64 {
    200
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRedirect {
    location: String,
    #[serde(default = "default_redirect")]
    status: i64,
    #[serde(default)]
    keep_path: bool,
}

fn default_redirect() -> i64 {
    301
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawValueMatch {
    name: String,
    exact: Option<String>,
    regex: Option<String>,
    present: Option<bool>,
    absent: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHeaderOps {
    #[serde(default)]
    add: BTreeMap<String, String>,
    #[serde(default)]
    set: BTreeMap<String, String>,
    #[serde(default)]
    remove: Vec<String>,
}

fn regex(
    src: &Source<'_>,
    key: String,
    at: &Spanned<impl Sized>,
    re: &str,
) -> Result<Regex, ConfError> {
    Regex::new(re).map_err(|e| src.invalid(key, at, format!("bad regex: {e}")))
}

fn header_name(
    src: &Source<'_>,
    key: String,
    at: &Spanned<impl Sized>,
    n: &str,
) -> Result<HeaderName, ConfError> {
    HeaderName::from_bytes(n.as_bytes())
        .map_err(|_| src.invalid(key, at, format!("{n:?} is not a header name")))
}

fn header_pairs(
    src: &Source<'_>,
    key: &str,
    at: &Spanned<impl Sized>,
    map: &BTreeMap<String, String>,
) -> Result<Vec<(HeaderName, HeaderValue)>, ConfError> {
    map.iter()
        .map(|(k, v)| {
            let name = header_name(src, format!("{key}.{k}"), at, k)?;
            let value = HeaderValue::from_str(v).map_err(|_| {
                src.invalid(
                    format!("{key}.{k}"),
                    at,
                    format!("{v:?} is not a header value"),
                )
            })?;
            Ok((name, value))
        })
        .collect()
}

fn header_ops(
    src: &Source<'_>,
    key: &str,
    raw: &Option<Spanned<RawHeaderOps>>,
) -> Result<HeaderOps, ConfError> {
    let Some(r) = raw else {
        return Ok(HeaderOps::default());
    };
    let ops = r.get_ref();
    Ok(HeaderOps {
        remove: ops
            .remove
            .iter()
            .map(|n| header_name(src, format!("{key}.remove"), r, n))
            .collect::<Result<_, _>>()?,
        set: header_pairs(src, &format!("{key}.set"), r, &ops.set)?,
        add: header_pairs(src, &format!("{key}.add"), r, &ops.add)?,
    })
}

fn value_match(
    src: &Source<'_>,
    key: String,
    at: &Spanned<RawValueMatch>,
) -> Result<ValueMatch, ConfError> {
    let m = at.get_ref();
    match (&m.exact, &m.regex, m.present, m.absent) {
        (Some(e), None, None, None) => Ok(ValueMatch::Exact(e.clone())),
        (None, Some(r), None, None) => Ok(ValueMatch::Regex(regex(
            src,
            format!("{key}.regex"),
            at,
            r,
        )?)),
        (None, None, Some(true), None) => Ok(ValueMatch::Present),
        (None, None, None, Some(true)) => Ok(ValueMatch::Absent),
        _ => Err(src.invalid(
            key,
            at,
            "needs exactly one of `exact`, `regex`, `present = true`, `absent = true`",
        )),
    }
}

/// Checks a direct response's status and headers.
pub(crate) fn respond_action(
    src: &Source<'_>,
    key: &str,
    r: &Spanned<RawRespond>,
) -> Result<RouteAction, ConfError> {
    let raw = r.get_ref();
    if !(200..=599).contains(&raw.status) {
        return Err(src.invalid(format!("{key}.status"), r, "status must be 200..=599"));
    }
    Ok(RouteAction::Respond {
        status: raw.status as u16,
        body: bytes::Bytes::from(raw.body.clone()),
        headers: header_pairs(src, &format!("{key}.headers"), r, &raw.headers)?,
    })
}

/// Finds an upstream by name.
pub(crate) fn upstream_index(
    src: &Source<'_>,
    key: String,
    name: &Spanned<String>,
    upstreams: &[Upstream],
) -> Result<usize, ConfError> {
    upstreams
        .iter()
        .position(|u| &u.name == name.get_ref())
        .ok_or_else(|| {
            src.invalid(
                key,
                name,
                format!("no [[upstream]] named {:?}", name.get_ref()),
            )
        })
}

/// A route that matches everything and does `action`.
pub(crate) fn catch_all(action: RouteAction) -> Route {
    Route {
        name: "default".into(),
        matcher: RouteMatch::default(),
        action,
        timeout: None,
        max_body: None,
        rewrite_prefix: None,
        request_headers: HeaderOps::default(),
        response_headers: HeaderOps::default(),
        rate_limit: None,
    }
}

pub(crate) fn build(
    src: &Source<'_>,
    key: &str,
    index: usize,
    r: &RawRoute,
    upstreams: &[Upstream],
    feeds: &[crate::Feed],
    desks: &[&str],
) -> Result<Route, ConfError> {
    let k = |f: &str| format!("{key}.{f}");
    let host = match &r.host {
        None => None,
        Some(h) => {
            let v = h.get_ref().to_ascii_lowercase();
            match v.strip_prefix('*') {
                Some(suffix) if suffix.starts_with('.') && suffix.len() > 1 => {
                    Some(HostMatch::Suffix(suffix.to_owned()))
                }
                Some(_) => {
                    return Err(src.invalid(
                        k("host"),
                        h,
                        "a wildcard host looks like \"*.example.com\"",
                    ))
                }
                None if !v.is_empty() && !v.contains(['*', '/', ':']) => Some(HostMatch::Exact(v)),
                None => return Err(src.invalid(k("host"), h, "expects a host name without port")),
            }
        }
    };
    let path = match (&r.path, &r.path_prefix, &r.path_regex) {
        (None, None, None) => None,
        (Some(p), None, None) => Some(PathMatch::Exact(p.get_ref().clone())),
        (None, Some(p), None) => Some(PathMatch::Prefix(p.get_ref().clone())),
        (None, None, Some(p)) => Some(PathMatch::Regex(regex(
            src,
            k("path_regex"),
            p,
            p.get_ref(),
        )?)),
        (Some(p), _, _) | (None, Some(p), _) => {
            return Err(src.invalid(
                k("path"),
                p,
                "set one of `path`, `path_prefix`, `path_regex`",
            ))
        }
    };
    for p in [&r.path, &r.path_prefix].into_iter().flatten() {
        if !p.get_ref().starts_with('/') {
            return Err(src.invalid(k("path"), p, "paths start with '/'"));
        }
    }
    let methods = r
        .methods
        .iter()
        .map(|m| {
            Method::from_bytes(m.get_ref().to_ascii_uppercase().as_bytes()).map_err(|_| {
                src.invalid(
                    k("methods"),
                    m,
                    format!("{:?} is not a method", m.get_ref()),
                )
            })
        })
        .collect::<Result<_, _>>()?;
    let headers = r
        .headers
        .iter()
        .enumerate()
        .map(|(i, h)| {
            Ok(HeaderMatch {
                name: header_name(
                    src,
                    format!("{key}.headers[{i}].name"),
                    h,
                    &h.get_ref().name,
                )?,
                value: value_match(src, format!("{key}.headers[{i}]"), h)?,
            })
        })
        .collect::<Result<_, ConfError>>()?;
    let query = r
        .query
        .iter()
        .enumerate()
        .map(|(i, q)| {
            Ok(QueryMatch {
                name: q.get_ref().name.clone(),
                value: value_match(src, format!("{key}.query[{i}]"), q)?,
            })
        })
        .collect::<Result<_, ConfError>>()?;
    let action = match (&r.upstream, &r.respond, &r.redirect) {
        (None, None, None) if r.split.is_some() && r.orders.is_none() && r.feed.is_none() => {
            let s = r.split.as_ref().expect("checked");
            RouteAction::Split(Box::new(split(src, &k("split"), s, upstreams)?))
        }
        _ if r.split.is_some() => {
            return Err(src.invalid(
                k("split"),
                r.split.as_ref().expect("checked"),
                "needs exactly one action: `upstream`, `split`, `respond`, `redirect`, `feed` or `orders`",
            ))
        }
        (None, None, None) if r.orders.is_some() && r.feed.is_none() => {
            let name = r.orders.as_ref().expect("checked");
            RouteAction::Orders(crate::desk_index(src, k("orders"), name, desks)?)
        }
        _ if r.orders.is_some() => {
            return Err(src.invalid(
                k("orders"),
                r.orders.as_ref().expect("checked"),
                "needs exactly one action: `upstream`, `respond`, `redirect`, `feed` or `orders`",
            ))
        }
        (None, None, None) if r.feed.is_some() => {
            let f = r.feed.as_ref().expect("checked").get_ref();
            RouteAction::Feed(crate::FeedEndpoint {
                feed: crate::feed::feed_index(src, k("feed.name"), &f.name, feeds)?,
                role: crate::feed::role(src, k("feed.role"), f.role.as_ref())?,
            })
        }
        _ if r.feed.is_some() => {
            return Err(src.invalid(
                k("feed"),
                r.feed.as_ref().expect("checked"),
                "needs exactly one action: `upstream`, `respond`, `redirect` or `feed`",
            ))
        }
        (Some(u), None, None) => {
            RouteAction::Forward(upstream_index(src, k("upstream"), u, upstreams)?)
        }
        (None, Some(resp), None) => respond_action(src, &k("respond"), resp)?,
        (None, None, Some(red)) => {
            let raw = red.get_ref();
            if ![301, 302, 303, 307, 308].contains(&raw.status) {
                return Err(src.invalid(
                    k("redirect.status"),
                    red,
                    "redirect status is 301, 302, 303, 307 or 308",
                ));
            }
            if HeaderValue::from_str(&raw.location).is_err() || raw.location.is_empty() {
                return Err(src.invalid(k("redirect.location"), red, "not a valid Location value"));
            }
            RouteAction::Redirect {
                status: raw.status as u16,
                location: raw.location.clone(),
                keep_path: raw.keep_path,
            }
        }
        _ => {
            let at = r.host.as_ref().map_or(0, |h| h.span().start);
            return Err(ConfError::Invalid {
                key: key.to_owned(),
                line: src.line_of(at),
                reason: "needs exactly one action: `upstream`, `respond`, `redirect` or `feed`"
                    .into(),
            });
        }
    };
    let rewrite_prefix = match &r.rewrite_prefix {
        None => None,
        Some(rw) => {
            if !matches!(path, Some(PathMatch::Prefix(_)))
                || !matches!(action, RouteAction::Forward(_) | RouteAction::Split(_))
            {
                return Err(src.invalid(
                    k("rewrite_prefix"),
                    rw,
                    "needs `path_prefix` and `upstream` or `split`",
                ));
            }
            if !rw.get_ref().starts_with('/') {
                return Err(src.invalid(k("rewrite_prefix"), rw, "paths start with '/'"));
            }
            Some(rw.get_ref().clone())
        }
    };
    let rate_limit = match &r.rate_limit {
        None => None,
        Some(rl) => {
            let limit = rate_limit(src, &k("rate_limit"), rl)?;
            let forwards = matches!(action, RouteAction::Forward(_) | RouteAction::Split(_));
            if limit.redis.is_some() && !forwards {
                return Err(src.invalid(
                    k("rate_limit.redis"),
                    rl,
                    "a limit kept in Redis is for routes with `upstream` or `split`",
                ));
            }
            Some(limit)
        }
    };
    Ok(Route {
        name: r.name.clone().unwrap_or_else(|| format!("route{index}")),
        matcher: RouteMatch {
            host,
            path,
            methods,
            headers,
            query,
        },
        action,
        timeout: match &r.timeout {
            None => None,
            Some(t) => Some(src.duration(|| k("timeout"), &Some(t.clone()), Duration::ZERO)?),
        },
        max_body: match &r.max_body {
            None => None,
            Some(_) => Some(src.size(|| k("max_body"), &r.max_body, 0, 0)? as u64),
        },
        rewrite_prefix,
        request_headers: header_ops(src, &k("request_headers"), &r.request_headers)?,
        response_headers: header_ops(src, &k("response_headers"), &r.response_headers)?,
        rate_limit,
    })
}
