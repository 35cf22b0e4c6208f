//! Config generations and reloads. A config becomes a `Generation` (bound addresses, route
//! tables, shared health, metrics), which every worker applies; a reload builds the next
//! generation from the previous one, keeping what did not change.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fluxgate_conf::{Config, IoMode};
use tokio::sync::mpsc;

use crate::app::fanout::hub::FeedHub;
use crate::telemetry::metrics::Metrics;
use fluxgate_policy::balance::Health;
use fluxgate_policy::breaker::Breaker;
use fluxgate_policy::canary::{Canary, RouteCanaries};
use fluxgate_policy::ratelimit::Limiter;
use fluxgate_policy::route::RouteTable;

/// What the reloader sends a worker.
pub(crate) struct Apply {
    pub(crate) generation: Arc<Generation>,
    /// Per listener of the generation: this worker's socket when the listener is new, None
    /// when it continues a listener of the previous generation.
    pub(crate) sockets: Vec<Option<ListenerSockets>>,
    /// Per listener: the index, in the previous generation, of the listener it continues.
    pub(crate) previous: Vec<Option<usize>>,
    /// Told once the worker has switched over: the acceptor its new listeners run (epoll if
    /// any fell back to it), or the first error of a listener it could not serve.
    pub(crate) applied: Option<std::sync::mpsc::Sender<std::io::Result<IoMode>>>,
}

/// Where the workers are in their life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Running,
    /// Not accepting; finishing what is in flight.
    Draining,
    /// Stop now, whatever is in flight.
    Stopped,
}

/// Everything derived from one config that the workers share read-only.
pub(crate) struct Generation {
    pub(crate) config: Arc<Config>,
    /// Bound address of each listener, in config order.
    pub(crate) addrs: Vec<SocketAddr>,
    pub(crate) tables: Vec<Arc<RouteTable>>,
    /// Per listener, per route: its rate limit's buckets, shared by the workers.
    pub(crate) limiters: Vec<Arc<[Option<Arc<Limiter>>]>>,
    /// Per listener, per route with a split `rollback`: each canary target's watch.
    pub(crate) canaries: Vec<RouteCanaries>,
    pub(crate) health: Vec<Arc<Health>>,
    /// Per upstream with `[upstream.breaker]`: its breaker, shared by the workers.
    pub(crate) breakers: Vec<Option<Arc<Breaker>>>,
    pub(crate) metrics: Arc<Metrics>,
    /// TLS settings per listener (certificates read when the generation was built).
    pub(crate) tls: Vec<Option<Arc<rustls::ServerConfig>>>,
    /// QUIC settings per listener that serves HTTP/3.
    pub(crate) quic: Vec<Option<quinn::ServerConfig>>,
    /// TLS client settings per upstream.
    pub(crate) upstream_tls: Vec<Option<Arc<rustls::ClientConfig>>>,
    /// Per feed: its shared state, kept across reloads while a feed of its name exists.
    pub(crate) feeds: Vec<Arc<FeedHub>>,
    /// Per order desk: its shared state and journal, kept across reloads by name.
    pub(crate) desks: Vec<Arc<crate::app::orders::desk::Desk>>,
    /// `[tracing]`'s tracer, made at start and kept by every reload.
    pub(crate) tracer: Option<Arc<crate::telemetry::trace::Tracer>>,
}

/// Applies new configs to running workers; shared by the `Handle` and the admin listener.
pub(crate) struct Reloader {
    pub(crate) current: Mutex<Arc<Generation>>,
    pub(crate) workers: Vec<mpsc::UnboundedSender<Apply>>,
    /// The file `reload_source` reads, when there is one.
    pub(crate) source: Option<PathBuf>,
}

impl Reloader {
    pub(crate) fn current(&self) -> Arc<Generation> {
        Arc::clone(&self.current.lock().expect("reloader lock"))
    }

    /// Re-reads the config file and applies it. An invalid config (or one that cannot be
    /// bound) is refused, counted and logged; the running one carries on.
    pub(crate) fn reload_source(&self) -> Result<(), String> {
        let Some(path) = &self.source else {
            return Err("fluxgate was started without a config file".into());
        };
        let result = Config::from_file(path)
            .map_err(|e| e.to_string())
            .and_then(|c| self.apply(c).map_err(|e| e.to_string()));
        match &result {
            Ok(()) => {
                crate::telemetry::log::apply(&self.current().config.log);
                tracing::info!(path = %path.display(), "reloaded");
            }
            Err(e) => {
                self.current()
                    .metrics
                    .reloads_failed
                    .fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    path = %path.display(),
                    error = %e,
                    "reload refused; still serving the old config"
                );
            }
        }
        result
    }

    /// Swaps in `config`: listeners with an address the old config had keep their sockets,
    /// upstreams with unchanged settings keep their pools and health; the rest start fresh.
    pub(crate) fn apply(&self, config: Config) -> io::Result<()> {
        let mut current = self.current.lock().expect("reloader lock");
        let old = Arc::clone(&current);
        let workers = self.workers.len();
        if config.runtime.workers != old.config.runtime.workers
            || config.runtime.io != old.config.runtime.io
        {
            tracing::warn!("runtime.workers and runtime.io take effect on restart only");
        }
        // A listener continues the first old one with its configured address not yet taken.
        let mut taken = vec![false; old.config.listeners.len()];
        let keep_listener: Vec<Option<usize>> = config
            .listeners
            .iter()
            .map(|l| {
                let j = (0..taken.len())
                    .find(|&j| !taken[j] && old.config.listeners[j].address == l.address)?;
                taken[j] = true;
                Some(j)
            })
            .collect();
        let keep_upstream: Vec<Option<usize>> = config
            .upstreams
            .iter()
            .map(|u| old.config.upstreams.iter().position(|o| o == u))
            .collect();
        // Read certificates and bind every new listener before touching anything, so a
        // failure changes nothing.
        let tls = crate::io::tls::listener_configs(&config).map_err(io::Error::other)?;
        let upstream_tls = crate::io::tls::upstream_configs(&config).map_err(io::Error::other)?;
        let mut addrs = Vec::with_capacity(config.listeners.len());
        let mut sockets: Vec<Vec<Option<ListenerSockets>>> =
            (0..workers).map(|_| Vec::new()).collect();
        for (l, keep) in config.listeners.iter().zip(&keep_listener) {
            match keep {
                Some(j) => {
                    addrs.push(old.addrs[*j]);
                    sockets.iter_mut().for_each(|s| s.push(None));
                }
                None => {
                    let (bound, per_worker) = bind_all(l, workers)?;
                    for (s, sock) in sockets.iter_mut().zip(per_worker) {
                        s.push(Some(sock));
                    }
                    addrs.push(bound);
                }
            }
        }
        let health = config
            .upstreams
            .iter()
            .zip(&keep_upstream)
            .map(|(u, keep)| match keep {
                Some(j) => Arc::clone(&old.health[*j]),
                None => Arc::new(Health::new(u.endpoints.len(), u.passive.clone())),
            })
            .collect();
        let breakers = config
            .upstreams
            .iter()
            .zip(&keep_upstream)
            .map(|(u, keep)| match keep {
                Some(j) => old.breakers[*j].clone(),
                None => u
                    .breaker
                    .as_ref()
                    .map(|b| Arc::new(Breaker::new(&u.name, b))),
            })
            .collect();
        let metrics = Metrics::new(
            &config,
            workers,
            Some((&old.metrics, &keep_listener, &keep_upstream)),
        );
        let quic = crate::io::tls::quic_configs(&config, &metrics.resumed_counters())
            .map_err(io::Error::other)?;
        let feeds = feed_hubs(&config, &old.feeds);
        let desks = crate::app::orders::desk::desks(&config, &old.desks, &feeds)?;
        if config.tracing != old.config.tracing {
            tracing::warn!("[tracing] takes effect on restart only");
        }
        let generation = Arc::new(Generation {
            tracer: old.tracer.clone(),
            feeds,
            desks,
            tables: route_tables(&config),
            limiters: route_limiters(&config, Some(&old)),
            canaries: route_canaries(&config, Some(&old)),
            config: Arc::new(config),
            addrs,
            health,
            breakers,
            metrics,
            tls,
            quic,
            upstream_tls,
        });
        let (applied, acks) = std::sync::mpsc::channel::<io::Result<IoMode>>();
        for (tx, sockets) in self.workers.iter().zip(sockets) {
            let _ = tx.send(Apply {
                generation: Arc::clone(&generation),
                sockets,
                previous: keep_listener.clone(),
                applied: Some(applied.clone()),
            });
        }
        // Return once every worker serves the new config (a stopped worker never answers).
        let deadline = Instant::now() + Duration::from_secs(5);
        for _ in 0..workers {
            if acks
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .is_err()
            {
                break;
            }
        }
        generation
            .metrics
            .reloads_ok
            .fetch_add(1, Ordering::Relaxed);
        *current = generation;
        Ok(())
    }
}

/// One worker's sockets of one listener: TCP, and for HTTP/3 UDP on the same port number.
pub(crate) struct ListenerSockets {
    pub(crate) tcp: std::net::TcpListener,
    pub(crate) udp: Option<std::net::UdpSocket>,
}

/// One socket per worker for a listener (two with HTTP/3). The first bind resolves port 0;
/// the others join its SO_REUSEPORT group on the resolved port.
pub(crate) fn bind_all(
    l: &fluxgate_conf::Listener,
    workers: usize,
) -> io::Result<(SocketAddr, Vec<ListenerSockets>)> {
    let first = crate::listen::accept::bind(l, l.address)?;
    let bound = first.local_addr()?;
    let mut tcp = vec![first];
    for _ in 1..workers {
        tcp.push(crate::listen::accept::bind(l, bound)?);
    }
    tcp.into_iter()
        .map(|tcp| {
            let udp = match l.http3 {
                true => Some(crate::listen::quic::bind(bound)?),
                false => None,
            };
            Ok(ListenerSockets { tcp, udp })
        })
        .collect::<io::Result<_>>()
        .map(|all| (bound, all))
}

/// Each feed's hub: the one of the same name in `old` (its history and subscribers stay,
/// with the new settings), else a new one.
pub(crate) fn feed_hubs(config: &Config, old: &[Arc<FeedHub>]) -> Vec<Arc<FeedHub>> {
    let hubs: Vec<_> = config
        .feeds
        .iter()
        .map(|f| match old.iter().find(|h| h.name == f.name) {
            Some(h) => {
                h.set_config(f);
                Arc::clone(h)
            }
            None => Arc::new(FeedHub::new(f)),
        })
        .collect();
    // Feeds gone from the config stop following NATS; the others follow their settings.
    for h in old
        .iter()
        .filter(|h| !hubs.iter().any(|n| Arc::ptr_eq(h, n)))
    {
        h.nats.stop();
    }
    hubs.iter().for_each(crate::app::fanout::nats::follow);
    hubs
}

/// The generation before, for state a reload keeps.
pub(crate) type Before<'a> = Option<&'a Generation>;

/// The same route in the generation before: on the listener of the same address, by name
/// (by place when it has none).
fn before<'a>(
    old: Before<'a>,
    l: &fluxgate_conf::Listener,
    ri: usize,
) -> Option<(&'a Generation, usize, usize, &'a fluxgate_conf::Route)> {
    let g = old?;
    let name = &l.routes[ri].name;
    let li = g
        .config
        .listeners
        .iter()
        .position(|o| o.address == l.address)?;
    let routes = &g.config.listeners[li].routes;
    let oi = match name.is_empty() {
        true => ri,
        false => routes.iter().position(|o| &o.name == name)?,
    };
    Some((g, li, oi, routes.get(oi)?))
}

/// One value per route of every listener (`f(listener, route index, route)`).
fn per_route<T>(
    config: &Config,
    mut f: impl FnMut(&fluxgate_conf::Listener, usize, &fluxgate_conf::Route) -> Option<T>,
) -> Vec<Arc<[Option<T>]>> {
    config
        .listeners
        .iter()
        .map(|l| {
            l.routes
                .iter()
                .enumerate()
                .map(|(ri, r)| f(l, ri, r))
                .collect()
        })
        .collect()
}

/// Each route's rate limit; an unchanged limit of the same route keeps its buckets.
pub(crate) fn route_limiters(config: &Config, old: Before<'_>) -> Vec<Arc<[Option<Arc<Limiter>>]>> {
    per_route(config, |l, ri, r| {
        let limit = r.rate_limit.as_ref()?;
        let kept = before(old, l, ri).and_then(|(g, li, oi, o)| {
            (o.rate_limit.as_ref() == Some(limit)).then(|| g.limiters[li][oi].clone())?
        });
        Some(kept.unwrap_or_else(|| Arc::new(Limiter::new(limit))))
    })
}

/// Each split's canary watches; an unchanged split of the same route keeps them.
pub(crate) fn route_canaries(config: &Config, old: Before<'_>) -> Vec<RouteCanaries> {
    per_route(config, |l, ri, r| {
        let fluxgate_conf::RouteAction::Split(s) = &r.action else {
            return None;
        };
        let rb = s.rollback.as_ref()?;
        let kept = before(old, l, ri).and_then(|(g, li, oi, o)| match &o.action {
            fluxgate_conf::RouteAction::Split(os) if os == s => g.canaries[li][oi].clone(),
            _ => None,
        });
        Some(kept.unwrap_or_else(|| {
            s.targets
                .iter()
                .map(|t| t.canary.then(|| Canary::new(rb)))
                .collect()
        }))
    })
}

pub(crate) fn route_tables(config: &Config) -> Vec<Arc<RouteTable>> {
    config
        .listeners
        .iter()
        .map(|l| Arc::new(RouteTable::new(l.routes.clone())))
        .collect()
}
