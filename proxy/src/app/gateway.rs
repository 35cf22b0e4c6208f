//! The request handler: limits that need the parsed request, route selection, direct answers
//! and redirects, header edits, and forwarding to an upstream with the stale-connection retry.

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fluxgate_conf::{
    Balance, FeedEndpoint, FeedRole, HashKey, HeaderOps, KeySource, RateKey, Route, RouteAction,
    Split, UpstreamProtocol,
};
use http::header::{self, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;

use crate::app::body::{FeedSocket, OrderSocket, ProxyBody, Upgrade};
use crate::app::fanout::local::LocalFeed;
use crate::app::fanout::session::{self, FeedBody};
use crate::error::ProxyError;
use crate::telemetry::accesslog::{AccessLog, Pending};
use crate::telemetry::metrics::RouteSet;
use crate::telemetry::trace::{TraceIds, Tracer, TRACEPARENT, TRACESTATE};
use crate::upstream::pool::{Proxied, UpstreamPool};
use crate::upstream::send::{UpstreamBody, UpstreamRequest};
use fluxgate_http::body::ClientBody;
use fluxgate_http::conn::{ConnState, InFlight};
use fluxgate_http::headers::{append_list, connection_has, strip_hop_by_hop};
use fluxgate_http::service::{Refusal, Reply, Service};
use fluxgate_policy::balance::{hash64, Pick};
use fluxgate_policy::breaker::{Breaker, Change as BreakerChange, Pass};
use fluxgate_policy::canary::{Change, RouteCanaries};
use fluxgate_policy::ratelimit::Limiter;
use fluxgate_policy::route::{RequestHead, RouteTable};

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Handles every request of one listener on one worker.
pub(crate) struct Handler {
    /// This worker's request counters for the listener's routes.
    pub(crate) stats: Arc<RouteSet>,
    /// The listener's routes, shared by all workers.
    pub(crate) routes: Arc<RouteTable>,
    /// Their rate limits, by route, shared by all workers.
    pub(crate) limiters: Arc<[Option<Arc<Limiter>>]>,
    /// By route, for a limit kept in Redis: this worker's link to that Redis.
    pub(crate) redis: Rc<[Option<Rc<crate::upstream::redis::Redis>>]>,
    /// By route, for splits with a `rollback`: each target's canary watch (None for a
    /// target that is not a canary), shared by all workers.
    pub(crate) canaries: RouteCanaries,
    /// This worker's pools, indexed like `Config::upstreams`.
    pub(crate) pools: Rc<[Rc<UpstreamPool>]>,
    pub(crate) max_request_line: usize,
    /// This worker's access log, when `[access_log]` is on.
    pub(crate) access_log: Option<Rc<AccessLog>>,
    /// The process's tracer, when `[tracing]` is on.
    pub(crate) tracer: Option<Arc<Tracer>>,
    /// This worker's side of each feed, indexed like `Config::feeds`.
    pub(crate) feeds: Rc<[Rc<LocalFeed>]>,
    /// Every order desk, indexed like `Config::desks`.
    pub(crate) desks: Rc<[Arc<crate::app::orders::desk::Desk>]>,
    /// The state of the splits' weighted draws (xorshift64; never 0).
    pub(crate) draws: std::cell::Cell<u64>,
}

impl Handler {
    /// Answers one request. Everything but the exchange with the upstream is a plain
    /// function: a request answered here needs no future at all, and a forwarded one awaits in
    /// one small state (each nested async level copies its whole state when it is built).
    pub(crate) fn handle(
        self: &Rc<Self>,
        req: Request<ClientBody>,
        inflight: InFlight,
    ) -> Reply<Forwarding, ProxyBody> {
        let started = std::time::Instant::now();
        let ids = (self.tracer.as_ref()).map(|t| t.decide(req.headers(), || self.draw()));
        let logged = self.pending(started, &inflight, Some(&req), None, ids.as_ref());
        match self.route(req, inflight) {
            Routed::Answer(route, resp) => {
                let resp = self.finish(started, logged, route, None, None, resp);
                Reply::Ready(Some(Box::new(resp)))
            }
            Routed::Forward(f) => {
                let (out, request) = self.outgoing(f, started, logged, ids);
                Reply::Later(Box::pin(out.run(request)))
            }
            Routed::Later(index, answer) => {
                let handler = Rc::clone(self);
                Reply::Later(Box::pin(async move {
                    let resp = answer.await;
                    handler.finish(started, logged, Some(index), None, None, resp)
                }))
            }
        }
    }

    /// A random draw (xorshift64: no lock, no syscall).
    fn draw(&self) -> u64 {
        let mut x = self.draws.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.draws.set(x);
        x
    }

    /// The access log line and the trace begun for a request (or a refusal: no request
    /// head), when either is on.
    fn pending(
        &self,
        started: std::time::Instant,
        inflight: &InFlight,
        req: Option<&Request<ClientBody>>,
        refused: Option<Refusal>,
        ids: Option<&TraceIds>,
    ) -> Option<Box<Pending>> {
        let trace = match (&self.tracer, req, ids) {
            (Some(t), Some(req), Some(ids)) if ids.sampled => Some(t.begin(
                ids,
                req.method(),
                req.uri().path(),
                req.version(),
                &inflight.state().peer_ip,
            )),
            _ => None,
        };
        if self.access_log.is_none() && trace.is_none() {
            return None;
        }
        let mut p = Pending::new(
            self.access_log.clone(),
            started,
            inflight.state().peer_ip.clone(),
        );
        p.trace = trace;
        p.trace_id = ids.map(|i| i.trace);
        if let (Some(req), Some(_)) = (req, &self.access_log) {
            p.method = Some(req.method().clone());
            p.path = req.uri().path().to_owned();
        }
        p.reason = refused.map(Refusal::reason);
        Some(Box::new(p))
    }

    /// Counts the answer and hands it its access log line.
    fn finish(
        &self,
        started: std::time::Instant,
        logged: Option<Box<Pending>>,
        route: Option<usize>,
        upstream_time: Option<Duration>,
        pool: Option<usize>,
        mut resp: Response<ProxyBody>,
    ) -> Response<ProxyBody> {
        let status = resp.status().as_u16();
        tracing::trace!(route, status, "answered");
        let stats = route.map_or(&self.stats.unrouted, |i| &self.stats.routes[i]);
        stats.record(status, started.elapsed());
        if let Some(mut p) = logged {
            if let Some(r) = route.map(|i| &self.routes.routes()[i]) {
                p.route.clone_from(&r.name);
                if let Some(u) = pool {
                    p.upstream.clone_from(&self.pools[u].cfg.name);
                }
            }
            p.status = status;
            p.upstream_time = upstream_time;
            resp.body_mut().attach_log(p);
        }
        resp
    }

    /// Refuses, answers or prepares to forward a request; the route index comes along
    /// (None: refused or unmatched).
    fn route(&self, req: Request<ClientBody>, inflight: InFlight) -> Routed<'_> {
        let target = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
        if target > self.max_request_line {
            return Routed::Answer(None, short_answer(StatusCode::URI_TOO_LONG, true, inflight));
        }
        let head = RequestHead {
            method: req.method(),
            host: request_host(&req),
            path: req.uri().path(),
            query: req.uri().query(),
            headers: req.headers(),
        };
        let Some((index, route)) = self.routes.match_request(&head) else {
            return Routed::Answer(None, short_answer(StatusCode::NOT_FOUND, false, inflight));
        };
        let mut global = None;
        if let (Some(limiter), Some(limit)) = (&self.limiters[index], &route.rate_limit) {
            let key = match &limit.key {
                RateKey::Route => None,
                RateKey::Client => Some(inflight.state().peer_ip.as_bytes()),
                RateKey::Header(h) => Some(req.headers().get(h).map_or(&b""[..], |v| v.as_bytes())),
            };
            if limit.redis.is_some() {
                // Asked of Redis on the way to the upstream (`Outgoing::run`): the route's
                // name (or place) and the key make the bucket every gateway shares.
                let mut k = format!("fluxgate:rl:{}:", route_id(route, index)).into_bytes();
                k.extend_from_slice(key.unwrap_or_default());
                global = Some(k);
            } else if let Err(wait) = limiter.check(key, std::time::Instant::now()) {
                let mut resp = short_answer(StatusCode::TOO_MANY_REQUESTS, false, inflight);
                // Whole seconds, rounded up (RFC 9110 10.2.3).
                let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
                return Routed::Answer(Some(index), resp);
            }
        }
        let mut resp = match &route.action {
            RouteAction::Respond {
                status,
                body,
                headers,
            } => {
                let mut resp = Response::new(ProxyBody::full(body.clone(), inflight));
                *resp.status_mut() = StatusCode::from_u16(*status).unwrap_or(StatusCode::OK);
                for (k, v) in headers {
                    resp.headers_mut().insert(k, v.clone());
                }
                resp
            }
            RouteAction::Redirect {
                status,
                location,
                keep_path,
            } => redirect(*status, location, *keep_path, req.uri(), inflight),
            RouteAction::Feed(ep) => self.feed_answer(*ep, &req, inflight),
            RouteAction::Orders(d) => {
                let desk = Arc::clone(&self.desks[*d]);
                let pools = Rc::clone(&self.pools);
                if upgrade_protocol(&req).is_some() {
                    let socket = Upgrade::Orders(OrderSocket { desk, pools });
                    return Routed::Answer(Some(index), websocket_switch(&req, socket, inflight));
                }
                if req.method() != Method::POST {
                    let mut resp = short_answer(StatusCode::METHOD_NOT_ALLOWED, false, inflight);
                    resp.headers_mut()
                        .insert(header::ALLOW, HeaderValue::from_static("POST"));
                    return Routed::Answer(Some(index), resp);
                }
                let answer = async move {
                    let a = crate::app::orders::session::post(desk, pools, req).await;
                    let mut resp = Response::new(ProxyBody::full(a.body, inflight));
                    *resp.status_mut() = a.status;
                    resp.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static(a.content_type),
                    );
                    resp
                };
                return Routed::Later(index, Box::pin(answer));
            }
            RouteAction::Forward(_) | RouteAction::Split(_) => {
                let (mut pool, watch) = match &route.action {
                    RouteAction::Split(s) => self.split_target(index, s, &req),
                    RouteAction::Forward(pool) => (*pool, None),
                    _ => unreachable!("matched above"),
                };
                // The upstream's breaker: through, to the fallback, or answered here.
                let mut admitted = None;
                if let Some(b) = &self.pools[pool].breaker {
                    match b.admit(std::time::Instant::now()) {
                        Ok(pass) => {
                            if pass.began_probing() {
                                tracing::info!(
                                    upstream = %self.pools[pool].cfg.name,
                                    "circuit breaker half-open: probing"
                                );
                            }
                            admitted = Some(Admitted::new(b, pass))
                        }
                        Err(_) => match b.settings().fallback {
                            Some(f) => pool = f,
                            None => {
                                let status = StatusCode::from_u16(b.settings().status)
                                    .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                                let resp = short_answer(status, false, inflight);
                                return Routed::Answer(Some(index), resp);
                            }
                        },
                    }
                }
                let mut req = req;
                if let Some(max) = route.max_body {
                    if req.body().size_hint().exact().is_some_and(|n| n > max) {
                        let resp = short_answer(StatusCode::PAYLOAD_TOO_LARGE, true, inflight);
                        return Routed::Answer(Some(index), resp);
                    }
                    req.body().limit(max);
                }
                edit_headers(req.headers_mut(), &route.request_headers);
                if let Some(to) = &route.rewrite_prefix {
                    rewrite_prefix(&mut req, route, to);
                }
                let upgrade = upgrade_protocol(&req);
                return Routed::Forward(Forward {
                    index,
                    route,
                    pool,
                    req,
                    inflight,
                    upgrade,
                    admitted,
                    watch,
                    global,
                });
            }
        };
        edit_headers(resp.headers_mut(), &route.response_headers);
        Routed::Answer(Some(index), resp)
    }

    /// The upstream (index into the pools) split `s` of route `index` sends this request
    /// to, and the target when it is a watched canary. A rolled-back canary's weight goes to
    /// the first target that is not a canary.
    fn split_target(
        &self,
        index: usize,
        s: &Split,
        req: &Request<ClientBody>,
    ) -> (usize, Option<usize>) {
        let read = |k: &Option<KeySource>| k.as_ref().and_then(|k| key_value(k, req.headers()));
        let day = fluxgate_policy::split::day_of(std::time::SystemTime::now());
        let x = self.draw();
        let (forced, user) = (read(&s.force), read(&s.sticky));
        let Some(watches) = self.canaries[index].as_deref() else {
            let t = fluxgate_policy::split::pick(s, |i| s.targets[i].weight, forced, user, day, x);
            return (s.targets[t].upstream, None);
        };
        let now = std::time::Instant::now();
        let mut weights: Vec<u32> = s.targets.iter().map(|t| t.weight).collect();
        let stable = s.targets.iter().position(|t| !t.canary).unwrap_or(0);
        for (i, w) in watches.iter().enumerate() {
            if let Some(c) = w {
                let (now_weight, change) = c.weight(weights[i], now);
                if let Some(change) = change {
                    canary_log(
                        &self.routes.routes()[index].name,
                        &s.targets[i].name,
                        change,
                    );
                }
                weights[stable] += weights[i] - now_weight;
                weights[i] = now_weight;
            }
        }
        let t = fluxgate_policy::split::pick(s, |i| weights[i], forced, user, day, x);
        (s.targets[t].upstream, watches[t].as_ref().map(|_| t))
    }

    /// A feed route's answer: a WebSocket upgrade (publisher or subscriber), or the
    /// subscription as a streaming response of envelope frames; 403 without a key the feed
    /// knows (when it has entitlements), 400 for a subscription that does not parse.
    fn feed_answer(
        &self,
        ep: FeedEndpoint,
        req: &Request<ClientBody>,
        inflight: InFlight,
    ) -> Response<ProxyBody> {
        let local = &self.feeds[ep.feed];
        let cfg = local.hub.config();
        let text = |status: StatusCode, why: String, inflight| {
            let mut resp = Response::new(ProxyBody::full(Bytes::from(why + "\n"), inflight));
            *resp.status_mut() = status;
            resp.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            resp
        };
        let key = req
            .headers()
            .get(&cfg.api_key_header)
            .map(HeaderValue::as_bytes);
        let cn = inflight.state().client_cn.as_deref();
        let allowed = match (ep.role, session::entitled(&cfg, key, cn)) {
            (FeedRole::Subscribe, None) => {
                let why = format!(
                    "feed {:?}: not entitled (a known key in {}, or client certificate)",
                    cfg.name, cfg.api_key_header
                );
                return text(StatusCode::FORBIDDEN, why, inflight);
            }
            (_, allowed) => allowed.unwrap_or_default(),
        };
        let asked = req
            .uri()
            .query()
            .is_some_and(|q| q.split('&').any(|p| p.starts_with("sub=")));
        let first = match (ep.role, asked) {
            (FeedRole::Subscribe, true) => {
                match session::http_subscription(req.uri().query(), &cfg) {
                    Ok(s) => Some(s),
                    Err(e) => return text(StatusCode::BAD_REQUEST, e, inflight),
                }
            }
            _ => None,
        };
        let websocket =
            upgrade_protocol(req).is_some_and(|p| p.as_bytes().eq_ignore_ascii_case(b"websocket"));
        if websocket {
            let socket = FeedSocket {
                local: Rc::clone(local),
                role: ep.role,
                allowed,
                first,
            };
            return websocket_switch(req, Upgrade::Feed(socket), inflight);
        }
        match (ep.role, first) {
            (FeedRole::Subscribe, Some((set, resume))) => {
                let body = FeedBody::new(Rc::clone(local), allowed, &set, resume.as_ref());
                let mut resp = Response::new(ProxyBody::feed(body, inflight));
                let h = resp.headers_mut();
                h.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/x-fluxgate-frames"),
                );
                h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                resp
            }
            (FeedRole::Subscribe, None) => text(
                StatusCode::BAD_REQUEST,
                "name the instruments: ?sub=PATTERNS (e.g. 1-99,@group,*)".into(),
                inflight,
            ),
            (FeedRole::Publish, _) => {
                let mut resp = text(
                    StatusCode::UPGRADE_REQUIRED,
                    "publishers connect with a WebSocket upgrade".into(),
                    inflight,
                );
                resp.headers_mut()
                    .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
                resp
            }
        }
    }

    /// Prepares a routed request for its upstream: picks the endpoint and rewrites the head
    /// (for HTTP/1.1, encodes it), all before anything awaits.
    fn outgoing(
        self: &Rc<Self>,
        f: Forward<'_>,
        started: std::time::Instant,
        mut logged: Option<Box<Pending>>,
        ids: Option<TraceIds>,
    ) -> (Outgoing, UpstreamRequest) {
        let Forward {
            index,
            route,
            pool: pool_index,
            req,
            inflight,
            upgrade,
            admitted,
            watch,
            global,
        } = f;
        let pool = &self.pools[pool_index];
        let key = hash_key(&pool.cfg.balance, &req, &inflight.state().peer_ip);
        let pick = pool.pick_endpoint(key);
        let (mut parts, body) = req.into_parts();
        let endpoint = pick.as_ref().map(|p| pool.cfg.endpoints[p.ep].addr);
        prepare(&mut parts, inflight.state(), pool.cfg.protocol, endpoint);
        // The upstream's parent is our client span (or, unsampled, our server span's id).
        let trace = match logged.as_mut().and_then(|p| p.trace.as_mut()) {
            Some(t) => Some(t.forwarded(&route_id(route, index), &pool.cfg.name, endpoint)),
            None => ids.map(|i| i.headers()),
        };
        if let Some((parent, state)) = trace {
            parts.headers.insert(TRACEPARENT, parent);
            match state {
                Some(s) => parts.headers.insert(TRACESTATE, s),
                None => parts.headers.remove(TRACESTATE),
            };
        }
        let request = match pool.cfg.protocol {
            UpstreamProtocol::Http1 => {
                restore_upgrade(&mut parts.headers, upgrade.clone());
                // Asked once: on an HTTP/2 stream each answer takes a lock.
                let body = (!body.is_end_stream()).then_some(body);
                let (head, chunked) = fluxgate_wire::h1::request::encode(
                    &parts,
                    body.as_ref().map(|b| b.size_hint().exact()),
                );
                UpstreamRequest::H1 {
                    idempotent: fluxgate_policy::retry::idempotent(&parts.method),
                    head_request: parts.method == Method::HEAD,
                    head,
                    chunked,
                    body,
                    proxied: pool.cfg.proxy_protocol.map(|_| {
                        let st = inflight.state();
                        Proxied {
                            source: st.peer,
                            destination: st.local,
                        }
                    }),
                }
            }
            UpstreamProtocol::H2c => {
                UpstreamRequest::H2(Box::new(Request::from_parts(parts, body)))
            }
            UpstreamProtocol::H3 => UpstreamRequest::H3(Box::new(Request::from_parts(parts, body))),
        };
        let out = Outgoing {
            handler: Rc::clone(self),
            index,
            pool: pool_index,
            pick,
            inflight,
            upgrade,
            timeout: route.timeout.unwrap_or(pool.cfg.response_timeout),
            started,
            logged,
            admitted,
            watch,
            global,
        };
        (out, request)
    }
}

/// A forwarded request's answer, worked on.
pub(crate) type Forwarding = Pin<Box<dyn Future<Output = Response<ProxyBody>>>>;

/// The gateway as one listener's servers see it: the listener's current handler, swapped
/// by reloads (a request keeps the handler it started with).
pub(crate) struct Gateway {
    current: std::cell::RefCell<Rc<Handler>>,
}

impl Gateway {
    pub(crate) fn new(handler: Rc<Handler>) -> Gateway {
        Gateway {
            current: std::cell::RefCell::new(handler),
        }
    }

    /// Serves new requests with `handler`.
    pub(crate) fn replace(&self, handler: Rc<Handler>) {
        *self.current.borrow_mut() = handler;
    }

    pub(crate) fn handler(&self) -> Rc<Handler> {
        Rc::clone(&self.current.borrow())
    }
}

impl Service for Gateway {
    type Body = ProxyBody;
    type Future = Forwarding;

    fn call(&self, req: Request<ClientBody>, inflight: InFlight) -> Reply<Forwarding, ProxyBody> {
        self.handler().handle(req, inflight)
    }

    fn refuse(&self, why: Refusal, inflight: InFlight) -> Response<ProxyBody> {
        let handler = self.handler();
        let started = std::time::Instant::now();
        let status = why.status().unwrap_or(StatusCode::BAD_REQUEST);
        let logged = handler.pending(started, &inflight, None, Some(why), None);
        handler.stats.refused[why.index()].fetch_add(1, Ordering::Relaxed);
        log_refusal(why, &inflight.state().peer_ip, Some(status));
        // Whether the connection closes after it is the server's to say.
        let resp = short_answer(status, false, inflight);
        handler.finish(started, logged, None, None, None, resp)
    }

    fn reset(&self, why: Refusal, conn: &ConnState) {
        self.refused_without_answer(why, &conn.peer_ip);
    }
}

impl Gateway {
    /// Counts and logs a refusal no answer goes with (a stream reset, a connection closed
    /// before any request), from `peer_ip`.
    pub(crate) fn refused_without_answer(&self, why: Refusal, peer_ip: &HeaderValue) {
        let handler = self.handler();
        handler.stats.refused[why.index()].fetch_add(1, Ordering::Relaxed);
        log_refusal(why, peer_ip, None);
        if let Some(log) = &handler.access_log {
            let mut p = Pending::new(
                Some(Rc::clone(log)),
                std::time::Instant::now(),
                peer_ip.clone(),
            );
            p.reason = Some(why.reason());
            p.finish();
        }
    }
}

/// One line per refusal (bounded by the log's repeat limit): a hostile or broken client.
fn log_refusal(why: Refusal, client: &HeaderValue, status: Option<StatusCode>) {
    tracing::info!(
        target: "fluxgate::refusal",
        reason = why.reason(),
        client = client.to_str().unwrap_or("?"),
        status = status.map(|s| s.as_u16()),
        "request refused"
    );
}

/// A request prepared for its upstream, with what its answer needs.
struct Outgoing {
    handler: Rc<Handler>,
    /// The route's index in the table.
    index: usize,
    /// Index into the handler's pools.
    pool: usize,
    /// None: no endpoint is healthy.
    pick: Option<Pick>,
    inflight: InFlight,
    /// The protocol an HTTP/1.1 upgrade asks for.
    upgrade: Option<HeaderValue>,
    timeout: Duration,
    started: std::time::Instant,
    logged: Option<Box<Pending>>,
    admitted: Option<Admitted>,
    watch: Option<usize>,
    global: Option<Vec<u8>>,
}

impl Outgoing {
    /// Forwards the request and answers the client.
    async fn run(mut self, request: UpstreamRequest) -> Response<ProxyBody> {
        let asked = self.logged.is_some().then(std::time::Instant::now);
        if let Some(key) = self.global.take() {
            if let Some(secs) = self.fleet_limit(&key).await {
                return self.respond(Err(ProxyError::RateLimited(secs)), None);
            }
        }
        let result = self.send(request).await;
        let upstream_time = asked.map(|t| t.elapsed());
        self.respond(result, upstream_time)
    }

    /// A fleet-wide limit's verdict from Redis: None to go on, or the seconds to wait. Redis
    /// not answering in time counts, and passes (`fail = "open"`) or refuses.
    async fn fleet_limit(&self, key: &[u8]) -> Option<u64> {
        let h = &self.handler;
        let (Some(limiter), Some(link)) = (&h.limiters[self.index], &h.redis[self.index]) else {
            return None;
        };
        let cfg = h.routes.routes()[self.index]
            .rate_limit
            .as_ref()?
            .redis
            .as_ref()?;
        let (interval, tolerance) = limiter.gcra_us();
        let asked = crate::upstream::redis::gcra_command(key, interval, tolerance);
        match link.call(asked, cfg.timeout).await {
            Some(fluxgate_wire::resp::Reply::Integer(0)) => None,
            Some(fluxgate_wire::resp::Reply::Integer(us)) => {
                limiter.refused.fetch_add(1, Ordering::Relaxed);
                Some((us as u64).div_ceil(1_000_000).max(1))
            }
            _ => {
                limiter.redis_errors.fetch_add(1, Ordering::Relaxed);
                if cfg.fail_open {
                    None
                } else {
                    limiter.refused.fetch_add(1, Ordering::Relaxed);
                    Some(1)
                }
            }
        }
    }

    /// Sends the request and waits for the response head, sending it once more when the
    /// retry rule allows. This is the only await of a proxied request.
    async fn send(&self, request: UpstreamRequest) -> Result<Response<UpstreamBody>, ProxyError> {
        let pool = &self.handler.pools[self.pool];
        let ep = self.pick.as_ref().ok_or(ProxyError::NoHealthyEndpoint)?.ep;
        let retry = &pool.cfg.retry;
        let timeout = retry.per_try_timeout.unwrap_or(self.timeout);
        pool.budget.request(std::time::Instant::now());
        let (mut request, mut fresh) = (request, false);
        let trace = self.logged.as_ref().and_then(|p| p.trace.as_ref());
        for attempt in 1.. {
            let mut span = trace.and_then(|t| t.attempt(attempt, pool.cfg.endpoints[ep].addr));
            let sent = pool.send(ep, request, timeout, fresh).await;
            if let Some(s) = &mut span {
                let outcome = match &sent {
                    Ok(resp) => Ok(resp.status().as_u16()),
                    Err(f) => Err(&f.error as &dyn std::fmt::Display),
                };
                crate::telemetry::trace::end_with(s, outcome);
            }
            let failed = match sent {
                Ok(resp) => return Ok(resp),
                Err(failed) => failed,
            };
            // The first retry under the strict rule; more only where `attempts` allows them.
            let rule = match attempt {
                1 => {
                    failed.facts.may_retry()
                        || (retry.attempts > 2 && failed.facts.may_retry_again())
                }
                _ => failed.facts.may_retry_again(),
            };
            let again = match failed.again.filter(|_| rule) {
                Some(again) if attempt < retry.attempts => again,
                _ => return Err(failed.error),
            };
            // A pooled connection that closed under the request is the keep-alive race, not
            // trouble at the upstream: its one retry on a new connection is free.
            let stale = attempt == 1 && failed.facts.reused;
            if !stale && !pool.budget.retry(std::time::Instant::now()) {
                pool.stats.retries_denied.fetch_add(1, Ordering::Relaxed);
                return Err(failed.error);
            }
            pool.stats.retries.fetch_add(1, Ordering::Relaxed);
            if attempt >= 2 {
                // Full jitter over an exponential back-off.
                let cap = retry
                    .backoff
                    .saturating_mul(1 << (attempt - 2).min(16))
                    .min(retry.max_backoff);
                let draw = self.handler.draw();
                tokio::time::sleep(cap.mul_f64((draw >> 11) as f64 / (1u64 << 53) as f64)).await;
            }
            (request, fresh) = (again, true);
        }
        unreachable!("the loop returns")
    }

    /// Tells the balancer and passive health how the exchange went (5xx answers and connect
    /// or protocol failures count against the endpoint) and turns the upstream's answer, or
    /// the failure, into the client's response.
    fn respond(
        self,
        result: Result<Response<UpstreamBody>, ProxyError>,
        upstream_time: Option<Duration>,
    ) -> Response<ProxyBody> {
        let Outgoing {
            handler,
            index,
            pool,
            pick,
            inflight,
            upgrade,
            started,
            mut logged,
            admitted,
            watch,
            ..
        } = self;
        if let Some(t) = logged.as_mut().and_then(|p| p.trace.as_mut()) {
            t.answered(match &result {
                Ok(resp) => Ok(resp.status().as_u16()),
                Err(e) => Err(e as &dyn std::fmt::Display),
            });
        }
        let route = &handler.routes.routes()[index];
        let pool_index = pool;
        let pool = &handler.pools[pool];
        let failed = match &result {
            Ok(resp) => resp.status().is_server_error(),
            Err(e) => matches!(e, ProxyError::Connect { .. } | ProxyError::Upstream(_)),
        };
        if let Some(pick) = pick {
            let ep = pick.ep;
            pool.balancer.done(pick);
            pool.record_outcome(ep, failed);
        }
        if let Some(a) = admitted {
            a.finish(failed || matches!(result, Err(ProxyError::NoHealthyEndpoint)));
        }
        let watched =
            watch.and_then(|t| Some((t, handler.canaries[index].as_deref()?[t].as_ref()?)));
        if let Some((t, canary)) = watched {
            let failed =
                failed || matches!(result, Err(ref e) if !matches!(e, ProxyError::RateLimited(_)));
            if let Some(change) =
                canary.record(started.elapsed(), failed, std::time::Instant::now())
            {
                if let RouteAction::Split(s) = &route.action {
                    canary_log(&route.name, &s.targets[t].name, change);
                }
            }
        }
        let asked_upgrade = upgrade.is_some();
        let mut resp = match result {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                let switching = parts.status == StatusCode::SWITCHING_PROTOCOLS;
                let proto = parts.headers.get(header::UPGRADE).cloned().or(upgrade);
                strip_hop_by_hop(&mut parts.headers);
                match (asked_upgrade && switching, body) {
                    (true, UpstreamBody::H1(b)) => match b.into_upgraded() {
                        Some(up) => {
                            restore_upgrade(&mut parts.headers, proto);
                            // Our HTTP/1.1 server writes the 101, then joins the two sockets.
                            Response::from_parts(
                                parts,
                                ProxyBody::tunnel(Upgrade::Upstream(up), inflight),
                            )
                        }
                        None => short_answer(StatusCode::BAD_GATEWAY, false, inflight),
                    },
                    (_, body) => Response::from_parts(parts, ProxyBody::upstream(body, inflight)),
                }
            }
            Err(e) => {
                tracing::debug!(
                    upstream = %pool.cfg.name,
                    route = %route.name,
                    error = %e,
                    "upstream exchange failed"
                );
                let mut resp = short_answer(e.status(), e.closes_client(), inflight);
                if let ProxyError::RateLimited(secs) = e {
                    resp.headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
                }
                resp
            }
        };
        edit_headers(resp.headers_mut(), &route.response_headers);
        handler.finish(
            started,
            logged,
            Some(index),
            upstream_time,
            Some(pool_index),
            resp,
        )
    }
}

/// The 101 answer to a WebSocket upgrade (RFC 6455 4.2.2) that makes the connection `up`;
/// 400 when the request is not a valid upgrade.
fn websocket_switch<B>(req: &Request<B>, up: Upgrade, inflight: InFlight) -> Response<ProxyBody> {
    let h = req.headers();
    let version = h
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes);
    let websocket =
        upgrade_protocol(req).is_some_and(|p| p.as_bytes().eq_ignore_ascii_case(b"websocket"));
    let (true, Some(ws_key), Some(b"13"), &Method::GET) = (
        websocket,
        h.get(header::SEC_WEBSOCKET_KEY),
        version,
        req.method(),
    ) else {
        let why = "a WebSocket upgrade is a GET with Upgrade: websocket, Sec-WebSocket-Key and Sec-WebSocket-Version: 13\n";
        let mut resp = Response::new(ProxyBody::full(
            Bytes::from_static(why.as_bytes()),
            inflight,
        ));
        *resp.status_mut() = StatusCode::BAD_REQUEST;
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        h.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return resp;
    };
    let accept = session::websocket_accept(ws_key.as_bytes());
    let mut resp = Response::new(ProxyBody::tunnel(up, inflight));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).expect("base64 is a valid header value"),
    );
    resp
}

/// What routing decided.
enum Routed<'a> {
    /// Answered here (refused, unmatched, a direct answer or a redirect).
    Answer(Option<usize>, Response<ProxyBody>),
    Forward(Forward<'a>),
    /// Answered by a future of its own (an order POST), for route `.0`.
    Later(usize, Forwarding),
}

/// A request on its way to an upstream.
struct Forward<'a> {
    index: usize,
    route: &'a Route,
    /// Index into the handler's pools.
    pool: usize,
    req: Request<ClientBody>,
    inflight: InFlight,
    /// The protocol an HTTP/1.1 upgrade asks for.
    upgrade: Option<HeaderValue>,
    /// The upstream breaker's pass, when it has one.
    admitted: Option<Admitted>,
    /// The split target, when it is a watched canary.
    watch: Option<usize>,
    /// The Redis bucket of a fleet-wide rate limit, to ask before sending.
    global: Option<Vec<u8>>,
}

/// A request an upstream's breaker let through: its outcome goes back once (a request
/// dropped before its answer, the client gone, counts as no failure).
struct Admitted {
    breaker: Arc<Breaker>,
    pass: Pass,
    done: bool,
}

impl Admitted {
    fn new(breaker: &Arc<Breaker>, pass: Pass) -> Admitted {
        Admitted {
            breaker: Arc::clone(breaker),
            pass,
            done: false,
        }
    }

    fn finish(mut self, failed: bool) {
        self.done = true;
        self.report(failed);
    }

    fn report(&self, failed: bool) {
        let b = &self.breaker;
        let upstream = b.upstream();
        match b.done(self.pass, failed, std::time::Instant::now()) {
            Some(BreakerChange::Opened) => tracing::warn!(
                upstream,
                open_for = ?b.settings().open_for,
                "circuit breaker opened"
            ),
            Some(BreakerChange::Closed) => {
                tracing::info!(upstream, "circuit breaker closed: probes succeeded")
            }
            None => {}
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if !self.done {
            self.report(false);
        }
    }
}

/// The protocol an HTTP/1.1 request asks to switch to (`Connection: upgrade` with `Upgrade`).
/// An upgrade to h2c is never forwarded (RFC 9113 3.1): its headers are dropped and the
/// request goes on as a plain HTTP/1.1 one.
fn upgrade_protocol<B>(req: &Request<B>) -> Option<HeaderValue> {
    let asks = req.version() == Version::HTTP_11 && connection_has(req.headers(), "upgrade");
    let proto = asks.then(|| req.headers().get(header::UPGRADE)).flatten()?;
    let h2c = proto.to_str().map_or(true, |p| {
        p.split(',').any(|t| t.trim().eq_ignore_ascii_case("h2c"))
    });
    (!h2c).then(|| proto.clone())
}

/// Puts back the two headers an upgrade needs, which the hop-by-hop rule removed.
fn restore_upgrade(h: &mut http::HeaderMap, proto: Option<HeaderValue>) {
    if let Some(p) = proto {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, p);
    }
}

/// The request's host for routing: Host, or the HTTP/2 authority, without the port.
fn request_host<B>(req: &Request<B>) -> Option<&str> {
    let raw = match req.headers().get(header::HOST) {
        Some(h) => h.to_str().ok()?,
        None => req.uri().host()?,
    };
    // "[v6]:port", "name:port" or bare.
    Some(match raw.rfind(':') {
        Some(i) if !raw[i..].contains(']') => &raw[..i],
        _ => raw,
    })
}

fn edit_headers(h: &mut http::HeaderMap, ops: &HeaderOps) {
    if ops.is_empty() {
        return;
    }
    for name in &ops.remove {
        h.remove(name);
    }
    for (k, v) in &ops.set {
        h.insert(k, v.clone());
    }
    for (k, v) in &ops.add {
        h.append(k, v.clone());
    }
}

/// Replaces the route's matched path prefix with `to`, keeping the rest and the query.
fn rewrite_prefix<B>(req: &mut Request<B>, route: &Route, to: &str) {
    let Some(fluxgate_conf::PathMatch::Prefix(from)) = &route.matcher.path else {
        return;
    };
    let uri = req.uri();
    let rest = uri.path().strip_prefix(from.as_str()).unwrap_or(uri.path());
    let mut target =
        String::with_capacity(to.len() + rest.len() + 1 + uri.query().map_or(0, str::len));
    target.push_str(
        to.strip_suffix('/')
            .filter(|_| rest.starts_with('/'))
            .unwrap_or(to),
    );
    target.push_str(rest);
    if let Some(q) = uri.query() {
        target.push('?');
        target.push_str(q);
    }
    let mut parts = uri.clone().into_parts();
    if let Ok(pq) = http::uri::PathAndQuery::try_from(target) {
        parts.path_and_query = Some(pq);
        if let Ok(u) = Uri::from_parts(parts) {
            *req.uri_mut() = u;
        }
    }
}

fn redirect(
    status: u16,
    location: &str,
    keep_path: bool,
    uri: &Uri,
    inflight: InFlight,
) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::full(Bytes::new(), inflight));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::MOVED_PERMANENTLY);
    let value = if keep_path {
        let pq = uri.path_and_query().map_or("/", |p| p.as_str());
        HeaderValue::from_str(&format!("{}{pq}", location.trim_end_matches('/')))
    } else {
        HeaderValue::from_str(location)
    };
    if let Ok(v) = value {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

/// A short gateway-made answer; `close` ends the client connection after it.
pub(crate) fn short_answer(
    status: StatusCode,
    close: bool,
    inflight: InFlight,
) -> Response<ProxyBody> {
    let text = format!(
        "{} {}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    let mut resp = Response::new(ProxyBody::full(Bytes::from(text), inflight));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    if close {
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// Rewrites the request head for the upstream: hop-by-hop headers out, X-Forwarded-* in,
/// Host kept, the target in the form the upstream protocol wants.
/// An HTTP/1.0 request may come without a host; HTTP/1.1 upstream needs one, and gets the
/// endpoint's address, as nginx's `$proxy_host` does.
fn prepare(
    parts: &mut Parts,
    client: &ConnState,
    protocol: UpstreamProtocol,
    endpoint: Option<std::net::SocketAddr>,
) {
    strip_hop_by_hop(&mut parts.headers);
    let host = match parts.headers.get(header::HOST) {
        Some(h) => Some(h.clone()),
        None => parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
    };
    append_list(&mut parts.headers, X_FORWARDED_FOR, &client.peer_ip);
    append_list(&mut parts.headers, X_FORWARDED_PROTO, &client.scheme);
    if let Some(h) = &host {
        append_list(&mut parts.headers, X_FORWARDED_HOST, h);
    }
    match protocol {
        UpstreamProtocol::Http1 => {
            parts.version = Version::HTTP_11;
            let host =
                host.or_else(|| endpoint.and_then(|a| HeaderValue::from_str(&a.to_string()).ok()));
            if let Some(h) = host {
                parts.headers.entry(header::HOST).or_insert(h);
            }
            if parts.uri.scheme().is_some() {
                let mut p = http::uri::Parts::default();
                p.path_and_query = parts.uri.path_and_query().cloned();
                if let Ok(u) = Uri::from_parts(p) {
                    parts.uri = u;
                }
            }
        }
        UpstreamProtocol::H2c | UpstreamProtocol::H3 => {
            let (version, scheme) = match protocol {
                UpstreamProtocol::H3 => (Version::HTTP_3, http::uri::Scheme::HTTPS),
                _ => (Version::HTTP_2, http::uri::Scheme::HTTP),
            };
            parts.version = version;
            let h3_needs_https =
                protocol == UpstreamProtocol::H3 && parts.uri.scheme() != Some(&scheme);
            if parts.uri.authority().is_none() || h3_needs_https {
                let mut p = http::uri::Parts::default();
                p.scheme = Some(scheme);
                p.authority = host
                    .and_then(|h| h.to_str().ok()?.parse().ok())
                    .or_else(|| parts.uri.authority().cloned());
                p.path_and_query = parts.uri.path_and_query().cloned();
                if let Ok(u) = Uri::from_parts(p) {
                    parts.uri = u;
                }
            }
            // :authority carries it in HTTP/2 and HTTP/3.
            parts.headers.remove(header::HOST);
        }
    }
}

/// The hashed key a `hash` policy balances on, read from the request as it arrived.
fn hash_key<B>(balance: &Balance, req: &Request<B>, peer_ip: &HeaderValue) -> Option<u64> {
    let Balance::Hash(key) = balance else {
        return None;
    };
    match key {
        HashKey::Header(name) => req
            .headers()
            .get(name.as_str())
            .map(|v| hash64(v.as_bytes())),
        HashKey::Cookie(name) => req
            .headers()
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().split_once('='))
            .find(|(k, _)| k == name)
            .map(|(_, v)| hash64(v.as_bytes())),
        HashKey::ClientIp => Some(hash64(peer_ip.as_bytes())),
    }
}

/// The value of a request header, or of a cookie (`Cookie: a=1; b=2`), as it came.
fn key_value<'a>(k: &KeySource, headers: &'a http::HeaderMap) -> Option<&'a [u8]> {
    match k {
        KeySource::Header(name) => headers.get(name).map(HeaderValue::as_bytes),
        KeySource::Cookie(name) => headers
            .get_all(header::COOKIE)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b';'))
            .find_map(|pair| {
                let pair = pair.trim_ascii();
                pair.strip_prefix(name.as_bytes())?.strip_prefix(b"=")
            }),
    }
}

/// One line per canary transition.
fn canary_log(route: &str, upstream: &str, change: Change) {
    match change {
        Change::Errors { rate } => tracing::warn!(
            route,
            canary = upstream,
            error_rate = rate,
            "canary rolled back: error rate over the threshold"
        ),
        Change::Latency { slow_share } => tracing::warn!(
            route,
            canary = upstream,
            slow_share,
            "canary rolled back: P95 over the threshold"
        ),
        Change::Probing => {
            tracing::info!(
                route,
                canary = upstream,
                "canary probing with its probe weight"
            )
        }
        Change::Recovered => {
            tracing::info!(
                route,
                canary = upstream,
                "canary recovered: back to its full weight"
            )
        }
    }
}

/// A route's name for shared state (a fleet's Redis buckets): its name, else its place.
fn route_id(route: &Route, index: usize) -> std::borrow::Cow<'_, str> {
    match route.name.is_empty() {
        true => std::borrow::Cow::Owned(format!("#{index}")),
        false => std::borrow::Cow::Borrowed(&route.name),
    }
}
