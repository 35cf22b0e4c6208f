//! The admin listener's JSON documents. `GET /config`: the running config's shape and
//! endpoint health. `GET /status` on the admin listener: what the gateway is doing now, as one JSON object
//! (the admin page at `GET /` reads it every two seconds). Counters are totals since the
//! generation started; a reader takes rates from two readings.
//!
//! ```text
//! { "version", "uptime_s", "workers",
//!   "config": <GET /config: listeners with routes and actions, upstreams with endpoints
//!              and their health>,
//!   "latency_bounds_ms": [upper bound of each histogram bucket, +Inf last omitted],
//!   "listeners": [{ "address", "connections",
//!                   "routes": [{ "name", "by_class": [1xx..5xx], "latency": [cumulative
//!                               per bucket, +Inf last], "latency_sum_s" }],
//!                   "unrouted": { same } }],
//!   "upstreams": [{ "name", "open", "busy", "pool_hits", "pool_misses", "retries",
//!                   "breaker": null | { "state": "closed"|"open"|"half_open", "opened",
//!                   "refused" } }],
//!   "canaries": [{ "listener", "route", "upstream", "state": "active"|"rolled_back"|
//!                  "probing", "rollbacks" }],
//!   "feeds": [{ "name", "subscribers", "ingested", "delivered", "queued", "deepest_queue",
//!               "dropped", "gaps", "silent_s", "stale" }] }
//! ```

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use fluxgate_conf::{Balance, Config, RouteAction};
use fluxgate_policy::balance::Health;

use crate::control::reload::Generation;
use crate::telemetry::json;

fn push_stats(
    o: &mut String,
    name: Option<&str>,
    (classes, buckets, sum): ([u64; 5], Vec<u64>, f64),
) {
    o.push('{');
    if let Some(n) = name {
        let _ = write!(o, "\"name\":{},", json::string(n));
    }
    let list = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    let _ = write!(
        o,
        "\"by_class\":[{}],\"latency\":[{}],\"latency_sum_s\":{sum:.6}}}",
        list(&classes),
        list(&buckets)
    );
}

/// The status object of generation `g`; `started` is the process's start.
pub(crate) fn status_json(g: &Generation, started: Instant) -> String {
    let c = &g.config;
    let m = &g.metrics;
    let mut o = String::with_capacity(4096);
    let _ = write!(
        o,
        "{{\"version\":\"{}\",\"uptime_s\":{:.1},\"workers\":{},\"config\":{},\"latency_bounds_ms\":[{}],\"listeners\":[",
        env!("CARGO_PKG_VERSION"),
        started.elapsed().as_secs_f64(),
        c.runtime.workers,
        config_json(c, &g.health).trim_end(),
        crate::telemetry::metrics::latency_bounds_ms()
            .map(|b| b.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    for (li, l) in c.listeners.iter().enumerate() {
        if li > 0 {
            o.push(',');
        }
        let connections: i64 = m.active[li].iter().map(|a| a.load(Ordering::Relaxed)).sum();
        let _ = write!(
            o,
            "{{\"address\":{},\"connections\":{},\"routes\":[",
            json::string(&g.addrs[li].to_string()),
            connections.max(0)
        );
        for (ri, r) in l.routes.iter().enumerate() {
            if ri > 0 {
                o.push(',');
            }
            push_stats(&mut o, Some(&r.name), m.route_snapshot(li, Some(ri)));
        }
        o.push_str("],\"unrouted\":");
        push_stats(&mut o, None, m.route_snapshot(li, None));
        o.push('}');
    }
    o.push_str("],\"upstreams\":[");
    for (ui, u) in c.upstreams.iter().enumerate() {
        if ui > 0 {
            o.push(',');
        }
        let sum = |f: &dyn Fn(&crate::telemetry::metrics::UpstreamStats) -> i64| -> i64 {
            m.upstreams[ui].iter().map(|s| f(s)).sum()
        };
        let _ = write!(
            o,
            "{{\"name\":{},\"open\":{},\"busy\":{},\"pool_hits\":{},\"pool_misses\":{},\"retries\":{},\"breaker\":",
            json::string(&u.name),
            sum(&|s| s.open.load(Ordering::Relaxed)).max(0),
            sum(&|s| s.busy.load(Ordering::Relaxed)).max(0),
            sum(&|s| s.pool_hits.load(Ordering::Relaxed) as i64),
            sum(&|s| s.pool_misses.load(Ordering::Relaxed) as i64),
            sum(&|s| s.retries.load(Ordering::Relaxed)),
        );
        match g.breakers.get(ui).and_then(|b| b.as_deref()) {
            None => o.push_str("null"),
            Some(b) => {
                let state = match b.state() {
                    0 => "closed",
                    1 => "open",
                    _ => "half_open",
                };
                let _ = write!(
                    o,
                    "{{\"state\":\"{state}\",\"opened\":{},\"refused\":{}}}",
                    b.opened.load(Ordering::Relaxed),
                    b.refused.load(Ordering::Relaxed)
                );
            }
        }
        o.push('}');
    }
    o.push_str("],\"canaries\":[");
    let mut first = true;
    for (li, l) in c.listeners.iter().enumerate() {
        for (ri, r) in l.routes.iter().enumerate() {
            let (Some(watches), fluxgate_conf::RouteAction::Split(s)) =
                (&g.canaries[li][ri], &r.action)
            else {
                continue;
            };
            for (t, w) in watches.iter().enumerate() {
                let Some(w) = w else { continue };
                if !first {
                    o.push(',');
                }
                first = false;
                let state = match w.state() {
                    0 => "active",
                    1 => "rolled_back",
                    _ => "probing",
                };
                let _ = write!(
                    o,
                    "{{\"listener\":{},\"route\":{},\"upstream\":{},\"state\":\"{state}\",\"rollbacks\":{}}}",
                    json::string(&g.addrs[li].to_string()),
                    json::string(&r.name),
                    json::string(&s.targets[t].name),
                    w.rollbacks.load(Ordering::Relaxed)
                );
            }
        }
    }
    o.push_str("],\"feeds\":[");
    for (fi, f) in g.feeds.iter().enumerate() {
        if fi > 0 {
            o.push(',');
        }
        let s = &f.stats;
        let (queued, deepest) = f.queue_depths();
        let silent = f.silent_for();
        let _ = write!(
            o,
            "{{\"name\":{},\"subscribers\":{},\"ingested\":{},\"delivered\":{},\"queued\":{},\"deepest_queue\":{},\"dropped\":{},\"gaps\":{},\"silent_s\":{:.1},\"stale\":{}}}",
            json::string(&f.name),
            s.subscribers.iter().map(|n| n.load(Ordering::Relaxed).max(0)).sum::<i64>(),
            s.ingested.load(Ordering::Relaxed),
            s.delivered.load(Ordering::Relaxed),
            queued.iter().sum::<u64>(),
            deepest.iter().max().copied().unwrap_or(0),
            s.dropped.load(Ordering::Relaxed),
            s.gaps.load(Ordering::Relaxed),
            silent.as_secs_f64().min(1e9),
            silent > f.config().stale_after
        );
    }
    o.push_str("]}\n");
    o
}

/// The running config's shape and every endpoint's health, as JSON.
pub(crate) fn config_json(c: &Config, health: &[Arc<Health>]) -> String {
    let mut o = String::from("{\"listeners\":[");
    for (i, l) in c.listeners.iter().enumerate() {
        if i > 0 {
            o.push(',');
        }
        let _ = write!(
            o,
            "{{\"address\":{},\"routes\":[",
            json::string(&l.address.to_string())
        );
        for (j, r) in l.routes.iter().enumerate() {
            if j > 0 {
                o.push(',');
            }
            let action = match &r.action {
                RouteAction::Forward(u) => {
                    format!("{{\"upstream\":{}}}", json::string(&c.upstreams[*u].name))
                }
                RouteAction::Respond { status, .. } => format!("{{\"respond\":{status}}}"),
                RouteAction::Split(s) => {
                    let targets: Vec<String> = s
                        .targets
                        .iter()
                        .map(|t| {
                            format!(
                                "{{\"upstream\":{},\"weight\":{}}}",
                                json::string(&t.name),
                                t.weight
                            )
                        })
                        .collect();
                    format!("{{\"split\":[{}]}}", targets.join(","))
                }
                RouteAction::Orders(d) => {
                    format!("{{\"orders\":{}}}", json::string(&c.desks[*d].name))
                }
                RouteAction::Feed(e) => format!(
                    "{{\"feed\":{},\"role\":\"{}\"}}",
                    json::string(&c.feeds[e.feed].name),
                    match e.role {
                        fluxgate_conf::FeedRole::Publish => "publish",
                        fluxgate_conf::FeedRole::Subscribe => "subscribe",
                    }
                ),
                RouteAction::Redirect {
                    status, location, ..
                } => {
                    format!(
                        "{{\"redirect\":{status},\"location\":{}}}",
                        json::string(location)
                    )
                }
            };
            let _ = write!(
                o,
                "{{\"name\":{},\"action\":{action}}}",
                json::string(&r.name)
            );
        }
        o.push_str("]}");
    }
    o.push_str("],\"upstreams\":[");
    for (i, (u, h)) in c.upstreams.iter().zip(health).enumerate() {
        if i > 0 {
            o.push(',');
        }
        let balance = match &u.balance {
            Balance::RoundRobin => "round_robin",
            Balance::WeightedRoundRobin => "weighted_round_robin",
            Balance::LeastRequest => "least_request",
            Balance::P2cEwma => "p2c_ewma",
            Balance::Hash(_) => "hash",
        };
        let _ = write!(
            o,
            "{{\"name\":{},\"balance\":{},\"endpoints\":[",
            json::string(&u.name),
            json::string(balance)
        );
        for (j, e) in u.endpoints.iter().enumerate() {
            if j > 0 {
                o.push(',');
            }
            let _ = write!(
                o,
                "{{\"address\":{},\"weight\":{},\"healthy\":{}}}",
                json::string(&e.addr.to_string()),
                e.weight,
                h.is_healthy(j)
            );
        }
        o.push_str("]}");
    }
    o.push_str("]}\n");
    o
}
