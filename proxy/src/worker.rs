//! One worker thread: a current-thread tokio runtime with its own listener sockets, upstream
//! pools and acceptors. It applies each config generation it is sent: kept listeners and
//! unchanged upstreams carry on (sockets, pooled connections, counters), new ones start,
//! removed listeners stop accepting. Requests look up the handler when they arrive, so a
//! request in flight finishes on the generation it started with.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fluxgate_conf::{IoMode, Upstream};
use tokio::sync::{mpsc, watch};

use crate::app::fanout::local::LocalFeed;
use crate::app::gateway::{Gateway, Handler};
use crate::control::reload::{Apply, Phase};
use crate::listen::accept::{Acceptor, ListenerCtx};
use crate::listen::sniff::ConnServer;
use crate::listen::tcp::TcpForward;
use crate::telemetry::accesslog::AccessLog;
use crate::upstream::pool::UpstreamPool;

struct Worker {
    id: usize,
    io: Acceptor,
    pools: RefCell<Vec<(Upstream, Rc<UpstreamPool>)>>,
    listeners: RefCell<Vec<Rc<ListenerCtx>>>,
    /// Active health checkers (worker 0 only), by the upstream settings they probe.
    checkers: RefCell<Vec<(Upstream, tokio::task::AbortHandle)>>,
    parks: Arc<std::sync::atomic::AtomicU64>,
    draining: watch::Receiver<bool>,
    /// This worker's access log writer and the settings it was opened with.
    access_log: RefCell<Option<(fluxgate_conf::AccessLog, Rc<AccessLog>)>>,
    /// This worker's side of each feed, by the generation's feeds.
    feeds: RefCell<Vec<Rc<LocalFeed>>>,
    /// This worker's links to the Redis servers of fleet-wide rate limits (kept across
    /// reloads).
    redis: RefCell<Vec<Rc<crate::upstream::redis::Redis>>>,
}

impl Worker {
    /// Switches to the generation in `a`. A listener whose acceptor cannot start (io_uring
    /// asked for by name and not available) is not served by this worker, and the first such
    /// error is what `a.applied` is told.
    fn apply(&self, a: Apply) {
        let g = &a.generation;
        let mut sockets = a.sockets;
        let previous = a.previous;
        let applied = a.applied;

        let old = self.pools.take();
        let pools: Vec<(Upstream, Rc<UpstreamPool>)> = g
            .config
            .upstreams
            .iter()
            .enumerate()
            .map(|(i, u)| match old.iter().find(|(c, _)| c == u) {
                Some((c, p)) => (c.clone(), Rc::clone(p)),
                None => {
                    let p = UpstreamPool::new(
                        u.clone(),
                        Arc::clone(&g.health[i]),
                        g.breakers[i].clone(),
                        Arc::clone(&g.metrics.upstreams[i][self.id]),
                        g.upstream_tls[i].clone(),
                        (self.id * 1000 + i) as u64,
                    );
                    tokio::task::spawn_local(Rc::clone(&p).prewarm());
                    (u.clone(), p)
                }
            })
            .collect();
        let shared: Rc<[Rc<UpstreamPool>]> = pools.iter().map(|(_, p)| Rc::clone(p)).collect();
        *self.pools.borrow_mut() = pools;

        let access_log = {
            let mut current = self.access_log.borrow_mut();
            let wanted = &g.config.access_log;
            if current.as_ref().map(|(c, _)| c) != wanted.as_ref() {
                *current = wanted.as_ref().and_then(|cfg| match AccessLog::open(cfg) {
                    Ok(log) => Some((cfg.clone(), log)),
                    Err(e) => {
                        tracing::error!(
                            path = %cfg.path.display(),
                            error = %e,
                            "access log not opened"
                        );
                        None
                    }
                });
            }
            current.as_ref().map(|(_, log)| Rc::clone(log))
        };

        let feeds: Rc<[Rc<LocalFeed>]> = {
            let old = self.feeds.take();
            let now: Vec<Rc<LocalFeed>> = g
                .feeds
                .iter()
                .map(|h| match old.iter().find(|l| Arc::ptr_eq(&l.hub, h)) {
                    Some(l) => Rc::clone(l),
                    None => LocalFeed::start(Arc::clone(h)),
                })
                .collect();
            *self.feeds.borrow_mut() = now.clone();
            now.into()
        };

        let desks: Rc<[Arc<crate::app::orders::desk::Desk>]> = g.desks.iter().cloned().collect();
        // Orders a journal held unsettled at start go out once, from the first worker here.
        for d in desks.iter() {
            crate::app::orders::session::resend(d, &shared);
        }

        let old = self.listeners.take();
        let mut kept = Vec::with_capacity(g.config.listeners.len());
        let mut result = Ok(self.io.mode());
        for (i, l) in g.config.listeners.iter().enumerate() {
            let handler = Rc::new(Handler {
                routes: Arc::clone(&g.tables[i]),
                limiters: Arc::clone(&g.limiters[i]),
                redis: l
                    .routes
                    .iter()
                    .map(|r| {
                        let at = r.rate_limit.as_ref()?.redis.as_ref()?.address;
                        let mut links = self.redis.borrow_mut();
                        let link = match links.iter().find(|x| x.address == at) {
                            Some(x) => Rc::clone(x),
                            None => {
                                let x = crate::upstream::redis::Redis::start(at);
                                links.push(Rc::clone(&x));
                                x
                            }
                        };
                        Some(link)
                    })
                    .collect(),
                canaries: Arc::clone(&g.canaries[i]),
                pools: Rc::clone(&shared),
                stats: Arc::clone(&g.metrics.routes[i][self.id]),
                max_request_line: g.config.http.max_request_line,
                access_log: access_log.clone(),
                tracer: g.tracer.clone(),
                feeds: Rc::clone(&feeds),
                desks: Rc::clone(&desks),
                draws: Cell::new(0x9e37_79b9_7f4a_7c15 ^ ((self.id as u64 + 1) << 32 | i as u64)),
            });
            let feed = l.feed.map(|e| (Rc::clone(&feeds[e.feed]), e.role));
            let orders = l.orders.map(|d| Arc::clone(&desks[d]));
            let server = Rc::new(ConnServer::new(
                &g.config.http,
                l,
                g.addrs[i].port(),
                Arc::clone(&self.parks),
                self.draining.clone(),
            ));
            let tls = g.tls[i].clone().map(tokio_rustls::TlsAcceptor::from);
            let tcp = l.tcp.as_ref().map(|routes| {
                Rc::new(TcpForward::new(
                    routes,
                    Rc::clone(&shared),
                    g.config.http.header_read_timeout,
                    l.splice,
                    l.tcp_idle_timeout,
                ))
            });
            let ctx = match sockets[i].take() {
                Some(sock) => {
                    let (stop, stop_rx) = watch::channel(false);
                    let ctx = Rc::new(ListenerCtx {
                        server: RefCell::new(server),
                        gateway: Rc::new(Gateway::new(handler)),
                        active: Cell::new(0),
                        max_connections: Cell::new(l.max_connections),
                        active_gauge: Arc::clone(&g.metrics.active[i][self.id]),
                        tls: RefCell::new(tls),
                        tcp: RefCell::new(tcp),
                        feed: RefCell::new(feed),
                        orders: RefCell::new(orders),
                        tls_stats: Arc::clone(&g.metrics.tls[i]),
                        quic: RefCell::new(None),
                        early_data: Cell::new(g.config.http3.early_data),
                        handshaking: Rc::default(),
                        retry_threshold: Cell::new(g.config.http3.retry_threshold),
                        quic_stats: Arc::clone(&g.metrics.quic[i]),
                        stop,
                    });
                    if let (Some(udp), Some(cfg)) = (sock.udp, g.quic[i].clone()) {
                        match crate::listen::quic::endpoint(udp, cfg) {
                            Ok(ep) => {
                                *ctx.quic.borrow_mut() = Some(ep.clone());
                                tokio::task::spawn_local(crate::listen::quic::accept(
                                    ep,
                                    Rc::clone(&ctx),
                                    stop_rx.clone(),
                                ));
                            }
                            Err(e) => {
                                tracing::error!(listener = %g.addrs[i], error = %e, "HTTP/3 not served");
                                if result.is_ok() {
                                    result = Err(e);
                                }
                            }
                        }
                    }
                    let spawned = crate::listen::accept::spawn(
                        self.id,
                        self.io,
                        sock.tcp,
                        Rc::clone(&ctx),
                        stop_rx,
                    );
                    match spawned {
                        Ok(IoMode::Epoll) if result.is_ok() => result = Ok(IoMode::Epoll),
                        Ok(_) => {}
                        Err(e) => {
                            tracing::error!(listener = %g.addrs[i], error = %e, "listener not served");
                            if result.is_ok() {
                                result = Err(e);
                            }
                        }
                    }
                    ctx
                }
                None => {
                    let j = previous[i].expect("a listener without a socket continues one");
                    let ctx = Rc::clone(&old[j]);
                    *ctx.server.borrow_mut() = server;
                    ctx.gateway.replace(handler);
                    *ctx.tls.borrow_mut() = tls;
                    *ctx.tcp.borrow_mut() = tcp;
                    *ctx.feed.borrow_mut() = feed;
                    *ctx.orders.borrow_mut() = orders;
                    if let (Some(ep), Some(cfg)) = (&*ctx.quic.borrow(), g.quic[i].clone()) {
                        // New certificates for new HTTP/3 connections.
                        ep.set_server_config(Some(cfg));
                    }
                    ctx.max_connections.set(l.max_connections);
                    ctx.early_data.set(g.config.http3.early_data);
                    ctx.retry_threshold.set(g.config.http3.retry_threshold);
                    ctx
                }
            };
            kept.push(ctx);
        }
        for c in &old {
            if !kept.iter().any(|k| Rc::ptr_eq(k, c)) {
                // Its connections finish on their own; no new ones.
                let _ = c.stop.send(true);
            }
        }
        *self.listeners.borrow_mut() = kept;

        if self.id == 0 {
            let old = self.checkers.take();
            let mut checkers = Vec::new();
            for (u, h) in g.config.upstreams.iter().zip(&g.health) {
                let Some(check) = &u.health_check else {
                    continue;
                };
                match old.iter().position(|(c, _)| c == u) {
                    Some(j) => checkers.push((u.clone(), old[j].1.clone())),
                    None => {
                        let task =
                            tokio::task::spawn_local(crate::upstream::health::probe_forever(
                                u.clone(),
                                check.clone(),
                                Arc::clone(h),
                            ));
                        checkers.push((u.clone(), task.abort_handle()));
                    }
                }
            }
            for (u, handle) in old {
                if !checkers.iter().any(|(c, _)| *c == u) {
                    handle.abort();
                }
            }
            *self.checkers.borrow_mut() = checkers;
        }
        if let Some(tx) = applied {
            let _ = tx.send(result);
        }
    }

    fn open_connections(&self) -> usize {
        self.listeners.borrow().iter().map(|l| l.active.get()).sum()
    }
}

/// Runs worker `id` until told to stop: applies generations from `commands`, and on drain
/// stops accepting and waits for its connections to finish.
pub(crate) fn run(
    id: usize,
    io: Acceptor,
    first: Apply,
    mut commands: mpsc::UnboundedReceiver<Apply>,
    mut phase: watch::Receiver<Phase>,
) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let parks = Arc::clone(&first.generation.metrics.parked[id]);
        tokio::task::spawn_local(worker_housekeeping(Arc::clone(&parks)));
        let (drain_tx, draining) = watch::channel(false);
        let worker = Worker {
            id,
            io,
            pools: RefCell::new(Vec::new()),
            listeners: RefCell::new(Vec::new()),
            checkers: RefCell::new(Vec::new()),
            parks,
            draining,
            access_log: RefCell::new(None),
            feeds: RefCell::new(Vec::new()),
            redis: RefCell::new(Vec::new()),
        };
        worker.apply(first);
        loop {
            tokio::select! {
                biased;
                _ = phase.wait_for(|p| *p != Phase::Running) => break,
                cmd = commands.recv() => match cmd {
                    Some(a) => worker.apply(a),
                    None => break,
                },
            }
        }
        for l in worker.listeners.borrow().iter() {
            let _ = l.stop.send(true);
        }
        let _ = drain_tx.send(true);
        // Wait for the connections to finish, unless told to stop now.
        while worker.open_connections() > 0 && *phase.borrow() == Phase::Draining {
            let _ =
                tokio::time::timeout(std::time::Duration::from_millis(20), phase.changed()).await;
        }
        for (_, c) in worker.checkers.take() {
            c.abort();
        }
    });
    Ok(())
}

/// Once a second, if connections were parked since the last look, hands the memory they freed
/// back to the kernel (see `fluxgate_sys::release_free_memory`).
pub(crate) async fn worker_housekeeping(parks: Arc<AtomicU64>) {
    let mut seen = parks.load(Ordering::Relaxed);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if parks.load(Ordering::Relaxed) != seen {
            seen = parks.load(Ordering::Relaxed);
            fluxgate_sys::release_free_memory();
        }
    }
}
