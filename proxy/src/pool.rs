//! Per-worker upstream connection pools.
//!
//! HTTP/1.1 idle connections sit in a pingora-pool `ConnectionPool` keyed by endpoint; this
//! module adds what it lacks: a per-endpoint idle cap, an open-connection cap, pre-warming and
//! counters. Idle expiry is done by the task that already drives each connection (it looks
//! at the connection's idle time on a coarse timer and takes it out of the pool), rather than
//! by pingora's per-release watcher task: no spawn, channel or timer per request. HTTP/2 connections are multiplexed and shared, so they are kept apart, one per
//! endpoint. Everything here belongs to one worker thread (`Rc`, `Cell`): no locks on the path.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use fluxgate_conf::{Upstream, UpstreamProtocol};
use std::sync::Arc;

use crate::balance::{Balancer, Health, Pick};
use crate::metrics::UpstreamStats;
use crate::stream::UpstreamStream;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::TokioIo;
use pingora_pool::{ConnectionMeta, ConnectionPool};
use rustls::pki_types::ServerName;
use std::sync::atomic::Ordering;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::body::UpBody;
use crate::error::ProxyError;
use crate::server::LocalExec;

/// Idle connections beyond `max_idle_per_host` are kept only this long: long enough to serve
/// the next burst (closing them at once makes bursty load reconnect constantly), short enough
/// that the idle set settles at the configured size.
const SURPLUS_IDLE_TIMEOUT: Duration = Duration::from_secs(1);

/// How many times `max_idle_per_host` the idle set may reach during a burst.
const SURPLUS_FACTOR: usize = 4;

/// An idle-able HTTP/1.1 upstream connection.
pub(crate) struct H1Conn {
    pub(crate) sender: http1::SendRequest<UpBody>,
    meta: ConnectionMeta,
    idle: Rc<IdleMark>,
}

/// Shared between a pooled connection and the task driving it.
struct IdleMark {
    /// When it last went into the pool, and how long it may stay there; None while lent out.
    since: Cell<Option<(Instant, Duration)>>,
}

struct Endpoint {
    addr: SocketAddr,
    /// Connections open now (idle, busy or being evicted).
    open: Cell<usize>,
    /// Connections checked out to requests now.
    busy: Cell<usize>,
    /// Signalled when a connection closes or returns, for requests waiting on the cap.
    freed: Notify,
    h2: RefCell<Option<http2::SendRequest<UpBody>>>,
}

/// The connections of one upstream on one worker.
pub(crate) struct UpstreamPool {
    pub(crate) cfg: Upstream,
    idle: Rc<ConnectionPool<H1Conn>>,
    endpoints: Vec<Endpoint>,
    /// Shared with the other workers and the active checker.
    pub(crate) health: Arc<Health>,
    pub(crate) balancer: Balancer,
    next_id: Cell<i32>,
    /// This worker's counters for the upstream; they follow the pool across reloads.
    stats: Arc<UpstreamStats>,
    /// TLS to the endpoints, with the configured server name (else each endpoint's IP).
    tls: Option<(tokio_rustls::TlsConnector, Option<ServerName<'static>>)>,
}

/// A connection lent to one request. Dropping it closes the connection; `release` returns it
/// to the pool.
pub(crate) struct Checkout {
    pool: Rc<UpstreamPool>,
    endpoint: usize,
    conn: Option<H1Conn>,
    /// Whether it came from the idle pool (and so may have gone stale).
    pub(crate) reused: bool,
}

impl Checkout {
    pub(crate) fn sender(&mut self) -> &mut http1::SendRequest<UpBody> {
        &mut self
            .conn
            .as_mut()
            .expect("checkout holds a connection")
            .sender
    }

    /// Returns the connection to the idle pool, or closes it when the pool is full or the
    /// connection is no longer usable.
    pub(crate) fn release(mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.checkin(self.endpoint, conn);
        }
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if self.conn.take().is_some() {
            self.pool.busy_add(self.endpoint, -1);
        }
    }
}

impl UpstreamPool {
    pub(crate) fn new(
        cfg: Upstream,
        health: Arc<Health>,
        stats: Arc<UpstreamStats>,
        tls: Option<Arc<rustls::ClientConfig>>,
        seed: u64,
    ) -> Rc<UpstreamPool> {
        let tls = tls.map(|c| {
            let name = cfg
                .tls
                .as_ref()
                .and_then(|t| t.sni.clone())
                .and_then(|n| ServerName::try_from(n).ok());
            (tokio_rustls::TlsConnector::from(c), name)
        });
        // Room for burst surplus beyond `max_idle_per_host` (see `checkin`).
        let lru_size = (cfg.max_idle_per_host * SURPLUS_FACTOR).max(1024) * cfg.endpoints.len();
        let endpoints = cfg
            .endpoints
            .iter()
            .map(|e| Endpoint {
                addr: e.addr,
                open: Cell::new(0),
                busy: Cell::new(0),
                freed: Notify::new(),
                h2: RefCell::new(None),
            })
            .collect();
        Rc::new(UpstreamPool {
            idle: Rc::new(ConnectionPool::new(lru_size)),
            endpoints,
            balancer: Balancer::new(cfg.balance.clone(), &cfg.endpoints, seed),
            health,
            next_id: Cell::new(0),
            stats,
            tls,
            cfg,
        })
    }

    /// Connections of `ep` lent out: this worker's count and the metric.
    fn busy_add(&self, ep: usize, d: i64) {
        let b = &self.endpoints[ep].busy;
        b.set(b.get().saturating_add_signed(d as isize));
        self.stats.busy.fetch_add(d, Ordering::Relaxed);
    }

    /// Connections of `ep` open: this worker's count and the metric.
    fn open_add(&self, ep: usize, d: i64) {
        let o = &self.endpoints[ep].open;
        o.set(o.get().saturating_add_signed(d as isize));
        self.stats.open.fetch_add(d, Ordering::Relaxed);
    }

    /// The endpoint for the next request, among the healthy ones (None: none is healthy).
    /// `key_hash` feeds consistent hashing.
    pub(crate) fn pick_endpoint(&self, key_hash: Option<u64>) -> Option<Pick> {
        self.balancer
            .pick(|ep| self.health.is_healthy(ep), key_hash)
    }

    /// Opens `cfg.prewarm` idle connections to each endpoint. Failures are logged, not fatal:
    /// the upstream may come up later.
    pub(crate) async fn prewarm(self: Rc<Self>) {
        if self.cfg.protocol != UpstreamProtocol::Http1 {
            return;
        }
        for ep in 0..self.endpoints.len() {
            for _ in 0..self.cfg.prewarm {
                match self.connect_h1(ep).await {
                    Ok(conn) => {
                        self.busy_add(ep, 1);
                        self.checkin(ep, conn);
                    }
                    Err(e) => {
                        eprintln!("fluxgate: pre-warm of upstream {:?}: {e}", self.cfg.name);
                        break;
                    }
                }
            }
        }
    }

    /// Lends an HTTP/1.1 connection to `ep`: an idle one when there is one (unless `fresh`),
    /// else a new one (waiting for a free slot when the endpoint is at `max_connections`).
    pub(crate) async fn checkout(
        self: &Rc<Self>,
        ep: usize,
        fresh: bool,
    ) -> Result<Checkout, ProxyError> {
        let endpoint = &self.endpoints[ep];
        let deadline = tokio::time::Instant::now() + self.cfg.connect_timeout;
        loop {
            while let Some(conn) = (!fresh).then(|| self.idle.get(&(ep as u64))).flatten() {
                if conn.sender.is_closed() {
                    continue;
                }
                conn.idle.since.set(None);
                self.busy_add(ep, 1);
                self.stats.pool_hits.fetch_add(1, Ordering::Relaxed);
                return Ok(Checkout {
                    pool: Rc::clone(self),
                    endpoint: ep,
                    conn: Some(conn),
                    reused: true,
                });
            }
            let cap = self.cfg.max_connections;
            if cap == 0 || endpoint.open.get() < cap {
                break;
            }
            if tokio::time::timeout_at(deadline, endpoint.freed.notified())
                .await
                .is_err()
            {
                return Err(ProxyError::Overloaded);
            }
        }
        let conn = self.connect_h1(ep).await?;
        self.busy_add(ep, 1);
        self.stats.pool_misses.fetch_add(1, Ordering::Relaxed);
        Ok(Checkout {
            pool: Rc::clone(self),
            endpoint: ep,
            conn: Some(conn),
            reused: false,
        })
    }

    fn checkin(self: &Rc<Self>, ep: usize, conn: H1Conn) {
        let endpoint = &self.endpoints[ep];
        self.busy_add(ep, -1);
        // Idle connections of this endpoint besides this one.
        let idle_now = (endpoint.open.get() - endpoint.busy.get()).saturating_sub(1);
        let cap = self.cfg.max_idle_per_host;
        if conn.sender.is_closed() || idle_now >= cap * SURPLUS_FACTOR {
            drop(conn);
            return;
        }
        let limit = if idle_now >= cap {
            SURPLUS_IDLE_TIMEOUT.min(self.cfg.idle_timeout)
        } else {
            self.cfg.idle_timeout
        };
        conn.idle.since.set(Some((Instant::now(), limit)));
        let meta = conn.meta.clone();
        // pingora hands back an eviction notifier and a pick-up channel for a watcher task;
        // the connection's own driver watches instead (see `connect_h1`).
        drop(self.idle.put(&meta, conn));
        endpoint.freed.notify_one();
    }

    /// A connection to endpoint `ep`: TCP, then TLS when the upstream has `tls`, all within
    /// `connect_timeout`. Any failure is a connect failure (502).
    async fn dial(&self, ep: usize) -> Result<UpstreamStream, ProxyError> {
        let addr = self.endpoints[ep].addr;
        let connect = async {
            let stream = TcpStream::connect(addr).await?;
            let _ = stream.set_nodelay(true);
            match &self.tls {
                None => Ok(UpstreamStream::Plain(stream)),
                Some((connector, name)) => {
                    let name = name.clone().unwrap_or_else(|| addr.ip().into());
                    let tls = connector.connect(name, stream).await?;
                    Ok(UpstreamStream::Tls(Box::new(tls)))
                }
            }
        };
        match tokio::time::timeout(self.cfg.connect_timeout, connect).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(source)) => Err(ProxyError::Connect { addr, source }),
            Err(_) => Err(ProxyError::Connect {
                addr,
                source: std::io::ErrorKind::TimedOut.into(),
            }),
        }
    }

    async fn connect_h1(self: &Rc<Self>, ep: usize) -> Result<H1Conn, ProxyError> {
        let endpoint = &self.endpoints[ep];
        // Counted from the start of the dial, so concurrent requests see the slot taken.
        self.open_add(ep, 1);
        let handshake = async {
            let stream = self.dial(ep).await?;
            http1::Builder::new()
                .handshake(TokioIo::new(stream))
                .await
                .map_err(ProxyError::Upstream)
        };
        let (sender, connection) = match handshake.await {
            Ok(pair) => pair,
            Err(e) => {
                self.open_add(ep, -1);
                endpoint.freed.notify_one();
                return Err(e);
            }
        };
        let id = self.next_id.get();
        self.next_id.set(id.wrapping_add(1));
        let meta = ConnectionMeta::new(ep as u64, id);
        let idle = Rc::new(IdleMark {
            since: Cell::new(None),
        });
        let pool = Rc::clone(self);
        let (driver_meta, mark) = (meta.clone(), Rc::clone(&idle));
        tokio::task::spawn_local(async move {
            // Look at the idle time this often: expiry lands within one period of its limit.
            let period = idle_check_period(pool.cfg.idle_timeout);
            // With upgrades: a 101 hands the socket over to the tunnel instead of closing.
            let mut connection = std::pin::pin!(connection.with_upgrades());
            let check = tokio::time::sleep(period);
            let mut check = std::pin::pin!(check);
            loop {
                tokio::select! {
                    biased;
                    _ = &mut connection => break,
                    _ = &mut check => {
                        let now = Instant::now();
                        if let Some((since, limit)) = mark.since.get() {
                            if now >= since + limit {
                                // Dropping the sender pingora returns lets hyper close the
                                // connection, which ends `connection` above.
                                pool.idle.pop_closed(&driver_meta);
                                mark.since.set(None);
                            }
                        }
                        check.as_mut().reset(now + period);
                    }
                }
            }
            // Gone while idle (the upstream closed it): out of the pool at once.
            pool.idle.pop_closed(&driver_meta);
            pool.open_add(ep, -1);
            pool.endpoints[ep].freed.notify_one();
        });
        Ok(H1Conn { sender, meta, idle })
    }

    /// The shared HTTP/2 connection to `ep`, opened on first use or after it closed.
    pub(crate) async fn h2_sender(
        self: &Rc<Self>,
        ep: usize,
    ) -> Result<http2::SendRequest<UpBody>, ProxyError> {
        let endpoint = &self.endpoints[ep];
        if let Some(s) = endpoint.h2.borrow().as_ref() {
            if !s.is_closed() {
                return Ok(s.clone());
            }
        }
        let stream = self.dial(ep).await?;
        let (sender, connection) = http2::Builder::new(LocalExec)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(ProxyError::Upstream)?;
        self.open_add(ep, 1);
        let pool = Rc::clone(self);
        tokio::task::spawn_local(async move {
            let _ = connection.await;
            pool.open_add(ep, -1);
        });
        *endpoint.h2.borrow_mut() = Some(sender.clone());
        Ok(sender)
    }

    /// Drops the cached HTTP/2 connection of `ep` if it is `broken`, so the next request dials.
    pub(crate) fn forget_h2(&self, ep: usize) {
        let mut slot = self.endpoints[ep].h2.borrow_mut();
        if slot.as_ref().is_some_and(|s| s.is_closed()) {
            *slot = None;
        }
    }
}

/// How often a connection driver looks at its idle time.
fn idle_check_period(idle_timeout: Duration) -> Duration {
    idle_timeout.min(SURPLUS_IDLE_TIMEOUT)
}
