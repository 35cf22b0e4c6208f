//! The one metrics registry: counters sharded per worker (each worker writes only its own
//! shard, relaxed atomics, no contention), summed when the admin listener renders them in
//! Prometheus text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fluxgate_conf::Config;

use fluxgate_policy::balance::Health;

/// Upper bounds of the latency histogram buckets, in microseconds.
const BUCKETS_US: [u64; 14] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000,
];

/// `BUCKETS_US` in milliseconds, for the admin page's quantiles.
pub(crate) fn latency_bounds_ms() -> impl Iterator<Item = f64> {
    BUCKETS_US.iter().map(|us| *us as f64 / 1e3)
}

/// Upper bounds of the finer histograms (order acknowledgement, journal), in microseconds.
const FINE_BUCKETS_US: [u64; 12] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 100_000, 1_000_000, 10_000_000,
];

/// A latency histogram over `FINE_BUCKETS_US`, written from any thread (relaxed atomics).
#[derive(Debug, Default)]
pub(crate) struct Histogram {
    /// Per-bucket counts, the last one +Inf; made cumulative when rendered.
    buckets: [AtomicU64; FINE_BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    pub(crate) fn record(&self, elapsed: Duration) {
        let us = elapsed.as_micros() as u64;
        let b = FINE_BUCKETS_US.partition_point(|&limit| limit < us);
        self.buckets[b].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Its `_bucket`, `_sum` and `_count` lines, with `labels` (`k="v",..`) on each.
    pub(crate) fn render(&self, o: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            cumulative += b.load(Ordering::Relaxed);
            let le = FINE_BUCKETS_US
                .get(i)
                .map_or("+Inf".to_owned(), |us| format!("{}", *us as f64 / 1e6));
            let _ = writeln!(o, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}");
        }
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(o, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(o, "{name}_count{{{labels}}} {cumulative}");
    }
}

/// Requests of one route (or of no route) on one worker.
#[derive(Debug, Default)]
pub(crate) struct RouteStats {
    /// By status class: 1xx .. 5xx.
    by_class: [AtomicU64; 5],
    /// Cumulative-at-render histogram: per-bucket counts, the last one +Inf.
    buckets: [AtomicU64; BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
}

impl RouteStats {
    /// Counts one request answered with `status` after `elapsed` (time to response head).
    pub(crate) fn record(&self, status: u16, elapsed: Duration) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.by_class[class].fetch_add(1, Ordering::Relaxed);
        let us = elapsed.as_micros() as u64;
        let b = BUCKETS_US.partition_point(|&limit| limit < us);
        self.buckets[b].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }
}

/// Requests of one listener on one worker, by route. New with every config generation.
#[derive(Debug)]
pub(crate) struct RouteSet {
    pub(crate) routes: Vec<RouteStats>,
    /// Requests no route matched (answered 404) or refused before routing (400, 414).
    pub(crate) unrouted: RouteStats,
    /// Refusals by the servers themselves, by `Refusal::index`.
    pub(crate) refused: [AtomicU64; fluxgate_http::service::Refusal::ALL.len()],
}

#[derive(Debug, Default)]
pub(crate) struct UpstreamStats {
    pub(crate) pool_hits: AtomicU64,
    pub(crate) pool_misses: AtomicU64,
    /// Open connections (HTTP/1.1 and HTTP/2).
    pub(crate) open: AtomicI64,
    /// Of those, lent to a request right now.
    pub(crate) busy: AtomicI64,
    /// Attempts sent again, and retries the budget refused.
    pub(crate) retries: AtomicI64,
    pub(crate) retries_denied: AtomicI64,
}

/// The registry of one config generation. Gauges and counters that describe something that
/// outlives a reload (a kept listener's connections, a kept upstream's pool) are shared with
/// the previous generation; per-route request counts start afresh.
#[derive(Debug)]
pub struct Metrics {
    /// [listener][worker]: client connections open.
    pub(crate) active: Vec<Vec<Arc<AtomicI64>>>,
    /// [listener]: TLS handshakes (shared by the workers; kept across reloads).
    pub(crate) tls: Vec<Arc<TlsStats>>,
    /// [listener]: HTTP/3 over QUIC (shared by the workers; kept across reloads).
    pub(crate) quic: Vec<Arc<QuicStats>>,
    /// [listener][worker]
    pub(crate) routes: Vec<Vec<Arc<RouteSet>>>,
    /// [upstream][worker]
    pub(crate) upstreams: Vec<Vec<Arc<UpstreamStats>>>,
    pub(crate) reloads_ok: Arc<AtomicU64>,
    pub(crate) reloads_failed: Arc<AtomicU64>,
    /// [worker]: idle connections parked (their HTTP state freed), for the process's life.
    pub(crate) parked: Vec<Arc<AtomicU64>>,
}

/// The previous registry, and for each listener / upstream of the new config the index of
/// the old one it continues.
pub(crate) type Continuing<'a> = (&'a Metrics, &'a [Option<usize>], &'a [Option<usize>]);

/// Why a TLS handshake failed, as counted.
pub(crate) const TLS_ERRORS: [&str; 6] = [
    "timeout",
    "closed",
    "alert_received",
    "incompatible",
    "misbehaved",
    "other",
];

/// HTTP/3 over QUIC on one listener.
#[derive(Debug, Default)]
pub(crate) struct QuicStats {
    /// Connections open now.
    pub(crate) connections: AtomicI64,
    pub(crate) handshakes_ok: AtomicU64,
    pub(crate) handshakes_failed: AtomicU64,
    /// Handshakes that resumed a session (found in the cache, or a ticket that opened); the
    /// QUIC TLS config counts them (see `io::tls::quic_config`).
    pub(crate) resumed: Arc<AtomicU64>,
    /// Retry packets sent (address validation under load).
    pub(crate) retries: AtomicU64,
    /// Request streams served.
    pub(crate) streams: AtomicU64,
    /// 0-RTT requests forwarded before the handshake, and held until it.
    pub(crate) early_forwarded: AtomicU64,
    pub(crate) early_held: AtomicU64,
    /// Of closed connections: their last smoothed RTT (sum, in µs, and count), and the
    /// packets they sent and lost.
    pub(crate) rtt_us_sum: AtomicU64,
    pub(crate) rtt_count: AtomicU64,
    pub(crate) packets_sent: AtomicU64,
    pub(crate) packets_lost: AtomicU64,
}

impl QuicStats {
    /// A connection ended: its counts go in.
    pub(crate) fn closed(&self, conn: &quinn::Connection, served: &fluxgate_http::h3::Served) {
        let add = |c: &AtomicU64, n: u64| {
            c.fetch_add(n, Ordering::Relaxed);
        };
        add(&self.streams, served.requests);
        add(&self.early_forwarded, served.early_forwarded);
        add(&self.early_held, served.early_held);
        let s = conn.stats();
        add(&self.rtt_us_sum, s.path.rtt.as_micros() as u64);
        add(&self.rtt_count, 1);
        add(&self.packets_sent, s.path.sent_packets);
        add(&self.packets_lost, s.path.lost_packets);
    }
}

/// TLS handshakes of one listener. Index = kind * 6 + version * 3 + alpn.
#[derive(Debug, Default)]
pub(crate) struct TlsStats {
    handshakes: [AtomicU64; 12],
    errors: [AtomicU64; TLS_ERRORS.len()],
    /// Handshakes whose 0-RTT data was accepted, and those that offered it in vain.
    early_accepted: AtomicU64,
    early_rejected: AtomicU64,
}

impl TlsStats {
    /// Counts a finished handshake: `resumed`, TLS 1.3 (else 1.2), the negotiated ALPN.
    pub(crate) fn handshake(&self, resumed: bool, tls13: bool, alpn: Option<&[u8]>) {
        let a = match alpn {
            Some(b"h2") => 0,
            Some(b"http/1.1") => 1,
            _ => 2,
        };
        let i = usize::from(resumed) * 6 + usize::from(tls13) * 3 + a;
        self.handshakes[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a handshake that offered 0-RTT data: accepted or rejected.
    pub(crate) fn early(&self, accepted: bool) {
        let c = if accepted {
            &self.early_accepted
        } else {
            &self.early_rejected
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a failed handshake; `reason` indexes `TLS_ERRORS`.
    pub(crate) fn error(&self, reason: usize) {
        self.errors[reason.min(TLS_ERRORS.len() - 1)].fetch_add(1, Ordering::Relaxed);
    }

    fn labels(i: usize) -> (&'static str, &'static str, &'static str) {
        (
            ["full", "resumed"][i / 6],
            ["1.2", "1.3"][i / 3 % 2],
            ["h2", "http/1.1", "none"][i % 3],
        )
    }
}

pub(crate) fn inc(a: &AtomicI64) {
    a.fetch_add(1, Ordering::Relaxed);
}

pub(crate) fn dec(a: &AtomicI64) {
    a.fetch_add(-1, Ordering::Relaxed);
}

impl Metrics {
    /// Per listener, the counter of its resumed QUIC handshakes.
    pub(crate) fn resumed_counters(&self) -> Vec<Arc<AtomicU64>> {
        self.quic.iter().map(|q| Arc::clone(&q.resumed)).collect()
    }

    /// The HTTP/3 families, for listeners that serve it.
    fn render_quic(&self, o: &mut String, addrs: &[std::net::SocketAddr]) {
        use std::fmt::Write;
        let each = |o: &mut String,
                    name: &str,
                    kind: &str,
                    help: &str,
                    rows: &dyn Fn(&QuicStats) -> Vec<(String, u64)>| {
            family(o, name, kind, help);
            for (li, q) in self.quic.iter().enumerate() {
                for (labels, n) in rows(q) {
                    let _ = writeln!(o, "{name}{{listener=\"{}\"{labels}}} {n}", addrs[li]);
                }
            }
        };
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        each(
            o,
            "fluxgate_http3_connections",
            "gauge",
            "HTTP/3 connections open.",
            &|q| {
                vec![(
                    String::new(),
                    q.connections.load(Ordering::Relaxed).max(0) as u64,
                )]
            },
        );
        each(
            o,
            "fluxgate_http3_handshakes_total",
            "counter",
            "QUIC handshakes, by result.",
            &|q| {
                vec![
                    (",result=\"ok\"".into(), get(&q.handshakes_ok)),
                    (",result=\"failed\"".into(), get(&q.handshakes_failed)),
                ]
            },
        );
        each(
            o,
            "fluxgate_http3_resumed_total",
            "counter",
            "QUIC handshakes that resumed a TLS session.",
            &|q| vec![(String::new(), get(&q.resumed))],
        );
        each(
            o,
            "fluxgate_http3_retries_total",
            "counter",
            "Retry packets sent to validate client addresses.",
            &|q| vec![(String::new(), get(&q.retries))],
        );
        each(
            o,
            "fluxgate_http3_streams_total",
            "counter",
            "HTTP/3 requests served (of closed connections).",
            &|q| vec![(String::new(), get(&q.streams))],
        );
        each(
            o,
            "fluxgate_http3_early_requests_total",
            "counter",
            "0-RTT requests: forwarded at once, or held for the handshake.",
            &|q| {
                vec![
                    (",action=\"forwarded\"".into(), get(&q.early_forwarded)),
                    (",action=\"held\"".into(), get(&q.early_held)),
                ]
            },
        );
        family(
            o,
            "fluxgate_http3_rtt_seconds",
            "summary",
            "Smoothed RTT of closed HTTP/3 connections.",
        );
        for (li, q) in self.quic.iter().enumerate() {
            let _ = writeln!(
                o,
                "fluxgate_http3_rtt_seconds_sum{{listener=\"{}\"}} {}",
                addrs[li],
                get(&q.rtt_us_sum) as f64 / 1e6
            );
            let _ = writeln!(
                o,
                "fluxgate_http3_rtt_seconds_count{{listener=\"{}\"}} {}",
                addrs[li],
                get(&q.rtt_count)
            );
        }
        each(
            o,
            "fluxgate_http3_packets_total",
            "counter",
            "QUIC packets of closed connections, sent and lost.",
            &|q| {
                vec![
                    (",kind=\"sent\"".into(), get(&q.packets_sent)),
                    (",kind=\"lost\"".into(), get(&q.packets_lost)),
                ]
            },
        );
    }

    /// A registry for `config`; `keep_listener[i]` / `keep_upstream[i]` name the entry of
    /// `previous` that listener / upstream `i` continues (same address / same settings).
    pub(crate) fn new(
        config: &Config,
        workers: usize,
        previous: Option<Continuing<'_>>,
    ) -> Arc<Metrics> {
        let fresh_i64 = || {
            (0..workers)
                .map(|_| Arc::new(AtomicI64::new(0)))
                .collect::<Vec<_>>()
        };
        let active = (0..config.listeners.len())
            .map(|i| match previous {
                Some((p, keep, _)) => keep[i].map_or_else(fresh_i64, |j| p.active[j].clone()),
                None => fresh_i64(),
            })
            .collect();
        let tls = (0..config.listeners.len())
            .map(|i| match previous {
                Some((p, keep, _)) => {
                    keep[i].map_or_else(Default::default, |j| Arc::clone(&p.tls[j]))
                }
                None => Default::default(),
            })
            .collect();
        let quic = (0..config.listeners.len())
            .map(|i| match previous {
                Some((p, keep, _)) => {
                    keep[i].map_or_else(Default::default, |j| Arc::clone(&p.quic[j]))
                }
                None => Default::default(),
            })
            .collect();
        let routes = config
            .listeners
            .iter()
            .map(|l| {
                (0..workers)
                    .map(|_| {
                        Arc::new(RouteSet {
                            routes: l.routes.iter().map(|_| RouteStats::default()).collect(),
                            unrouted: RouteStats::default(),
                            refused: Default::default(),
                        })
                    })
                    .collect()
            })
            .collect();
        let fresh_up = || {
            (0..workers)
                .map(|_| Arc::new(UpstreamStats::default()))
                .collect::<Vec<_>>()
        };
        let upstreams = (0..config.upstreams.len())
            .map(|i| match previous {
                Some((p, _, keep)) => keep[i].map_or_else(fresh_up, |j| p.upstreams[j].clone()),
                None => fresh_up(),
            })
            .collect();
        let (reloads_ok, reloads_failed, parked) = match previous {
            Some((p, _, _)) => (
                Arc::clone(&p.reloads_ok),
                Arc::clone(&p.reloads_failed),
                p.parked.clone(),
            ),
            None => (
                Default::default(),
                Default::default(),
                (0..workers).map(|_| Default::default()).collect(),
            ),
        };
        Arc::new(Metrics {
            active,
            tls,
            quic,
            routes,
            upstreams,
            reloads_ok,
            reloads_failed,
            parked,
        })
    }

    /// Prometheus text exposition (version 0.0.4).
    /// `addrs` are the listeners' bound addresses, the `listener` label.
    pub(crate) fn render(
        &self,
        config: &Config,
        addrs: &[std::net::SocketAddr],
        health: &[Arc<Health>],
    ) -> String {
        let mut o = String::with_capacity(8 << 10);

        family(
            &mut o,
            "fluxgate_requests_total",
            "counter",
            "Requests answered, by listener, route, upstream and status class.",
        );
        let upstream_of = |l: usize, r: usize| match &config.listeners[l].routes[r].action {
            fluxgate_conf::RouteAction::Forward(u) => config.upstreams[*u].name.as_str(),
            _ => "",
        };
        for (li, l) in config.listeners.iter().enumerate() {
            let routes = l
                .routes
                .iter()
                .enumerate()
                .map(|(ri, r)| (r.name.as_str(), upstream_of(li, ri), Some(ri)))
                .chain([("", "", None)]);
            for (name, up, ri) in routes {
                for (c, class) in ["1xx", "2xx", "3xx", "4xx", "5xx"].iter().enumerate() {
                    let n = self.route_sum(li, ri, |r| r.by_class[c].load(Ordering::Relaxed));
                    if n > 0 {
                        let _ = writeln!(
                            o,
                            "fluxgate_requests_total{{listener=\"{}\",route=\"{name}\",upstream=\"{up}\",code=\"{class}\"}} {n}",
                            addrs[li]
                        );
                    }
                }
            }
        }

        family(
            &mut o,
            "fluxgate_refusals_total",
            "counter",
            "Requests the servers refused or streams they reset themselves, by listener and reason.",
        );
        for (sets, addr) in self.routes.iter().zip(addrs) {
            for why in fluxgate_http::service::Refusal::ALL {
                let n: u64 = sets
                    .iter()
                    .map(|set| set.refused[why.index()].load(Ordering::Relaxed))
                    .sum();
                if n > 0 {
                    let _ = writeln!(
                        o,
                        "fluxgate_refusals_total{{listener=\"{addr}\",reason=\"{}\"}} {n}",
                        why.reason()
                    );
                }
            }
        }

        family(
            &mut o,
            "fluxgate_request_duration_seconds",
            "histogram",
            "Time to the response head, by listener and route.",
        );
        for (li, l) in config.listeners.iter().enumerate() {
            let routes = l
                .routes
                .iter()
                .enumerate()
                .map(|(ri, r)| (r.name.as_str(), Some(ri)))
                .chain([("", None)]);
            for (name, ri) in routes {
                let labels = format!("listener=\"{}\",route=\"{name}\"", addrs[li]);
                let mut cumulative = 0;
                for (b, limit) in BUCKETS_US.iter().enumerate() {
                    cumulative += self.route_sum(li, ri, |r| r.buckets[b].load(Ordering::Relaxed));
                    let _ = writeln!(
                        o,
                        "fluxgate_request_duration_seconds_bucket{{{labels},le=\"{}\"}} {cumulative}",
                        *limit as f64 / 1e6
                    );
                }
                cumulative += self.route_sum(li, ri, |r| {
                    r.buckets[BUCKETS_US.len()].load(Ordering::Relaxed)
                });
                let _ = writeln!(
                    o,
                    "fluxgate_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {cumulative}"
                );
                let secs =
                    self.route_sum(li, ri, |r| r.sum_us.load(Ordering::Relaxed)) as f64 / 1e6;
                let _ = writeln!(
                    o,
                    "fluxgate_request_duration_seconds_sum{{{labels}}} {secs}"
                );
                let _ = writeln!(
                    o,
                    "fluxgate_request_duration_seconds_count{{{labels}}} {cumulative}"
                );
            }
        }

        family(
            &mut o,
            "fluxgate_active_connections",
            "gauge",
            "Client connections open now.",
        );
        for (li, addr) in addrs.iter().enumerate() {
            let n: i64 = self.active[li]
                .iter()
                .map(|a| a.load(Ordering::Relaxed))
                .sum();
            let _ = writeln!(o, "fluxgate_active_connections{{listener=\"{addr}\"}} {n}");
        }

        type Counter = fn(&UpstreamStats) -> i64;
        let pool: [(&str, &str, &str, Counter); 6] = [
            (
                "fluxgate_upstream_retries_total",
                "counter",
                "Attempts sent again under the retry rule.",
                |u| u.retries.load(Ordering::Relaxed),
            ),
            (
                "fluxgate_upstream_retries_denied_total",
                "counter",
                "Retries the retry budget refused.",
                |u| u.retries_denied.load(Ordering::Relaxed),
            ),
            (
                "fluxgate_upstream_pool_hits_total",
                "counter",
                "Requests served on a pooled connection.",
                |u| u.pool_hits.load(Ordering::Relaxed) as i64,
            ),
            (
                "fluxgate_upstream_pool_misses_total",
                "counter",
                "Requests that needed a new connection.",
                |u| u.pool_misses.load(Ordering::Relaxed) as i64,
            ),
            (
                "fluxgate_upstream_connections",
                "gauge",
                "Upstream connections open now.",
                |u| u.open.load(Ordering::Relaxed),
            ),
            (
                "fluxgate_upstream_pool_idle_connections",
                "gauge",
                "Open upstream connections not lent to a request.",
                |u| u.open.load(Ordering::Relaxed) - u.busy.load(Ordering::Relaxed),
            ),
        ];
        for (metric, kind, help, f) in pool {
            family(&mut o, metric, kind, help);
            for (ui, u) in config.upstreams.iter().enumerate() {
                let n: i64 = self.upstreams[ui].iter().map(|u| f(u)).sum();
                let _ = writeln!(o, "{metric}{{upstream=\"{}\"}} {n}", u.name);
            }
        }

        family(
            &mut o,
            "fluxgate_endpoint_healthy",
            "gauge",
            "Whether an endpoint gets traffic (1) or is out (0).",
        );
        for (u, h) in config.upstreams.iter().zip(health) {
            for (i, e) in u.endpoints.iter().enumerate() {
                let _ = writeln!(
                    o,
                    "fluxgate_endpoint_healthy{{upstream=\"{}\",endpoint=\"{}\"}} {}",
                    u.name,
                    e.addr,
                    u8::from(h.is_healthy(i))
                );
            }
        }

        family(
            &mut o,
            "fluxgate_tls_handshakes_total",
            "counter",
            "Completed TLS handshakes, by kind, version and ALPN.",
        );
        for (li, t) in self.tls.iter().enumerate() {
            for (i, n) in t.handshakes.iter().enumerate() {
                let n = n.load(Ordering::Relaxed);
                if n > 0 {
                    let (kind, version, alpn) = TlsStats::labels(i);
                    let _ = writeln!(
                        o,
                        "fluxgate_tls_handshakes_total{{listener=\"{}\",kind=\"{kind}\",version=\"{version}\",alpn=\"{alpn}\"}} {n}",
                        addrs[li]
                    );
                }
            }
        }
        family(
            &mut o,
            "fluxgate_tls_early_data_total",
            "counter",
            "Handshakes that offered 0-RTT data, by result.",
        );
        for (li, t) in self.tls.iter().enumerate() {
            for (result, c) in [
                ("accepted", &t.early_accepted),
                ("rejected", &t.early_rejected),
            ] {
                let n = c.load(Ordering::Relaxed);
                if n > 0 {
                    let _ = writeln!(
                        o,
                        "fluxgate_tls_early_data_total{{listener=\"{}\",result=\"{result}\"}} {n}",
                        addrs[li]
                    );
                }
            }
        }
        family(
            &mut o,
            "fluxgate_tls_handshake_errors_total",
            "counter",
            "Failed TLS handshakes, by reason.",
        );
        for (li, t) in self.tls.iter().enumerate() {
            for (reason, n) in TLS_ERRORS.iter().zip(&t.errors) {
                let n = n.load(Ordering::Relaxed);
                if n > 0 {
                    let _ = writeln!(
                        o,
                        "fluxgate_tls_handshake_errors_total{{listener=\"{}\",reason=\"{reason}\"}} {n}",
                        addrs[li]
                    );
                }
            }
        }

        self.render_quic(&mut o, addrs);

        family(
            &mut o,
            "fluxgate_connections_parked_total",
            "counter",
            "Idle client connections whose read and write buffers were freed.",
        );
        let parked: u64 = self.parked.iter().map(|p| p.load(Ordering::Relaxed)).sum();
        let _ = writeln!(o, "fluxgate_connections_parked_total {parked}");

        family(
            &mut o,
            "fluxgate_config_reloads_total",
            "counter",
            "Config reloads, by result.",
        );
        let _ = writeln!(
            o,
            "fluxgate_config_reloads_total{{result=\"ok\"}} {}",
            self.reloads_ok.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            o,
            "fluxgate_config_reloads_total{{result=\"failed\"}} {}",
            self.reloads_failed.load(Ordering::Relaxed)
        );
        family(
            &mut o,
            "fluxgate_log_lines_suppressed_total",
            "counter",
            "Log lines dropped by the per-place repeat bound ([log] repeats).",
        );
        let _ = writeln!(
            o,
            "fluxgate_log_lines_suppressed_total {}",
            crate::telemetry::log::SUPPRESSED.load(Ordering::Relaxed)
        );
        o
    }
}

/// Writes a metric family's HELP and TYPE lines.
pub(crate) fn family(o: &mut String, metric: &str, kind: &str, help: &str) {
    let _ = writeln!(o, "# HELP {metric} {help}\n# TYPE {metric} {kind}");
}

/// Requests each rate-limited route refused, by listener and route; for limits kept in
/// Redis, the calls Redis did not answer in time.
pub(crate) fn render_rate_limits(
    o: &mut String,
    config: &Config,
    addrs: &[std::net::SocketAddr],
    limiters: &[Arc<[Option<Arc<fluxgate_policy::ratelimit::Limiter>>]>],
) {
    let mut rows = Vec::new();
    for (li, l) in config.listeners.iter().enumerate() {
        for (ri, r) in l.routes.iter().enumerate() {
            if let (Some(limiter), Some(limit)) = (limiters[li][ri].as_ref(), &r.rate_limit) {
                let labels = format!("listener=\"{}\",route=\"{}\"", addrs[li], r.name);
                rows.push((labels, limiter, limit.redis.is_some()));
            }
        }
    }
    if rows.is_empty() {
        return;
    }
    family(
        o,
        "fluxgate_rate_limited_total",
        "counter",
        "Requests a route's rate limit answered 429, by listener and route.",
    );
    for (labels, l, _) in &rows {
        let n = l.refused.load(Ordering::Relaxed);
        let _ = writeln!(o, "fluxgate_rate_limited_total{{{labels}}} {n}");
    }
    if rows.iter().any(|r| r.2) {
        family(
            o,
            "fluxgate_rate_limit_redis_errors_total",
            "counter",
            "Calls to the Redis of a fleet-wide rate limit that got no answer in time.",
        );
        for (labels, l, _) in rows.iter().filter(|r| r.2) {
            let n = l.redis_errors.load(Ordering::Relaxed);
            let _ = writeln!(o, "fluxgate_rate_limit_redis_errors_total{{{labels}}} {n}");
        }
    }
}

/// Each watched canary's state (0 active, 1 rolled back, 2 probing) and rollbacks.
pub(crate) fn render_canaries(
    o: &mut String,
    config: &Config,
    addrs: &[std::net::SocketAddr],
    canaries: &[fluxgate_policy::canary::RouteCanaries],
) {
    let mut rows = Vec::new();
    for (li, l) in config.listeners.iter().enumerate() {
        for (ri, r) in l.routes.iter().enumerate() {
            let (Some(watches), fluxgate_conf::RouteAction::Split(s)) =
                (&canaries[li][ri], &r.action)
            else {
                continue;
            };
            for (t, c) in watches.iter().enumerate() {
                if let Some(c) = c {
                    let labels = format!(
                        "listener=\"{}\",route=\"{}\",upstream=\"{}\"",
                        addrs[li], r.name, s.targets[t].name
                    );
                    rows.push((labels, c));
                }
            }
        }
    }
    if rows.is_empty() {
        return;
    }
    family(
        o,
        "fluxgate_canary_state",
        "gauge",
        "A canary's state: 0 active, 1 rolled back, 2 probing.",
    );
    for (labels, c) in &rows {
        let _ = writeln!(o, "fluxgate_canary_state{{{labels}}} {}", c.state());
    }
    family(
        o,
        "fluxgate_canary_rollbacks_total",
        "counter",
        "Times a canary was rolled back.",
    );
    for (labels, c) in &rows {
        let _ = writeln!(
            o,
            "fluxgate_canary_rollbacks_total{{{labels}}} {}",
            c.rollbacks.load(Ordering::Relaxed)
        );
    }
}

/// Every upstream breaker's state (0 closed, 1 open, 2 half-open), openings and refusals.
pub(crate) fn render_breakers(
    o: &mut String,
    config: &Config,
    breakers: &[Option<Arc<fluxgate_policy::breaker::Breaker>>],
) {
    let with: Vec<(&str, &fluxgate_policy::breaker::Breaker)> = config
        .upstreams
        .iter()
        .zip(breakers)
        .filter_map(|(u, b)| Some((u.name.as_str(), b.as_deref()?)))
        .collect();
    if with.is_empty() {
        return;
    }
    use fluxgate_policy::breaker::Breaker;
    type Family = (&'static str, &'static str, &'static str);
    type Row = (Family, fn(&Breaker) -> u64);
    let families: [Row; 3] = [
        (
            (
                "fluxgate_breaker_state",
                "gauge",
                "An upstream breaker's state: 0 closed, 1 open, 2 half-open.",
            ),
            |b| u64::from(b.state()),
        ),
        (
            (
                "fluxgate_breaker_opened_total",
                "counter",
                "Times an upstream breaker opened.",
            ),
            |b| b.opened.load(Ordering::Relaxed),
        ),
        (
            (
                "fluxgate_breaker_refused_total",
                "counter",
                "Requests an upstream breaker kept from its upstream.",
            ),
            |b| b.refused.load(Ordering::Relaxed),
        ),
    ];
    for (family, get) in families {
        per_label(o, family, "upstream", &with, |(n, _)| n, |(_, b)| get(b));
    }
}

/// One family with a line per item: `NAME{LABEL="item's value"} get(item)`.
pub(crate) fn per_label<T>(
    o: &mut String,
    (name, kind, help): (&str, &str, &str),
    label: &str,
    items: &[T],
    value: impl Fn(&T) -> &str,
    get: impl Fn(&T) -> u64,
) {
    family(o, name, kind, help);
    for item in items {
        let _ = writeln!(o, "{name}{{{label}=\"{}\"}} {}", value(item), get(item));
    }
}

impl Metrics {
    /// Sums `f` over every worker's stats of route `route` (None: unrouted) of `listener`.
    /// One route's (or, `None`, the unrouted requests') counts summed over the workers:
    /// by status class, the cumulative latency histogram over `LATENCY_BOUNDS_MS` (+Inf
    /// last), and the latency sum in seconds.
    pub(crate) fn route_snapshot(
        &self,
        listener: usize,
        route: Option<usize>,
    ) -> ([u64; 5], Vec<u64>, f64) {
        let classes = std::array::from_fn(|c| {
            self.route_sum(listener, route, |r| r.by_class[c].load(Ordering::Relaxed))
        });
        let mut cumulative = 0;
        let buckets = (0..=BUCKETS_US.len())
            .map(|b| {
                cumulative +=
                    self.route_sum(listener, route, |r| r.buckets[b].load(Ordering::Relaxed));
                cumulative
            })
            .collect();
        let sum = self.route_sum(listener, route, |r| r.sum_us.load(Ordering::Relaxed));
        (classes, buckets, sum as f64 / 1e6)
    }

    fn route_sum(
        &self,
        listener: usize,
        route: Option<usize>,
        f: impl Fn(&RouteStats) -> u64,
    ) -> u64 {
        self.routes[listener]
            .iter()
            .map(|set| f(route.map_or(&set.unrouted, |i| &set.routes[i])))
            .sum()
    }
}
