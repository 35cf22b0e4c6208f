//! Per-worker upstream connection pools.
//!
//! Each endpoint keeps up to `max_idle_per_host` idle HTTP/1.1 connections in a plain stack,
//! most recent on top: under load a connection comes back and goes out again within
//! microseconds, and a pingora-pool round trip (locks, hash lookups, LRU bookkeeping) cost more
//! than the rest of the pool together (perf, h2c load: 4-6% of all CPU). A pingora-pool
//! `ConnectionPool` keyed by endpoint holds the burst surplus beyond that, on the short surplus
//! timeout. This module adds what pingora lacks: a per-endpoint idle cap, an open-connection
//! cap, pre-warming and counters. An idle HTTP/1.1 connection has no task of its own
//! (fluxgate's client runs in the request's task): a connection the upstream closed is noticed
//! when it is next picked (a readiness check, no system call while nothing arrived) and by one
//! sweeper task per pool, which also expires idle connections, rather than by pingora's
//! per-release watcher task: no spawn, channel or timer per request. HTTP/2 connections are
//! multiplexed and shared, so they are kept apart, one per endpoint. Everything here belongs to
//! one worker thread (`Rc`, `Cell`): no locks on the path.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::net::SocketAddr;
use std::rc::{Rc, Weak};
use std::time::Duration;

use fluxgate_conf::{Upstream, UpstreamProtocol};
use std::sync::Arc;

use crate::telemetry::metrics::UpstreamStats;
use fluxgate_http::stream::UpstreamStream;
use fluxgate_policy::balance::{Balancer, Health, Pick};
use fluxgate_policy::breaker::Breaker;
use hyper::client::conn::http2;
use hyper_util::rt::TokioIo;
use pingora_pool::{ConnectionMeta, ConnectionPool};
use rustls::pki_types::ServerName;
use std::sync::atomic::Ordering;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::error::ProxyError;
use crate::upstream::conn::H1Io;
use fluxgate_http::body::ClientBody;

/// Idle connections beyond `max_idle_per_host` are kept only this long: long enough to serve
/// the next burst (closing them at once makes bursty load reconnect constantly), short enough
/// that the idle set settles at the configured size.
/// Spawns futures on the current thread's `LocalSet`: hyper's HTTP/2 tasks and upstream
/// connection drivers hold `Rc`s and never leave their worker.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LocalExec;

impl<F: Future + 'static> hyper::rt::Executor<F> for LocalExec {
    fn execute(&self, fut: F) {
        tokio::task::spawn_local(fut);
    }
}

const SURPLUS_IDLE_TIMEOUT: Duration = Duration::from_secs(1);

/// How many times `max_idle_per_host` the idle set may reach during a burst.
const SURPLUS_FACTOR: usize = 4;

/// An HTTP/1.1 upstream connection. It counts as open until dropped.
pub struct H1Conn {
    pub(crate) io: H1Io,
    meta: ConnectionMeta,
    /// When it last went into the pool, and how long it may stay there.
    idle_since: Option<(Instant, Duration)>,
    live: Rc<Live>,
}

/// A connection handed over by a 101 answer reads and writes its socket directly.
impl fluxgate_http::stream::TcpBacked for H1Conn {
    /// Bytes read past a 101 answer's head are handed over before the tunnel starts
    /// (`ProxyBody::take_upgrade`), so nothing is buffered above the socket.
    fn tcp(&self) -> Option<&TcpStream> {
        self.io.stream.tcp()
    }
}

impl tokio::io::AsyncRead for H1Conn {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for H1Conn {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io.stream).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io.stream).poll_shutdown(cx)
    }
}

impl Drop for H1Conn {
    fn drop(&mut self) {
        self.live.open_add(-1);
        self.live.freed.notify_one();
    }
}

/// The connection counts of one endpoint on this worker.
struct Live {
    /// Connections open now (idle, busy, being dialled, or carrying a tunnel).
    open: Cell<usize>,
    /// Connections checked out to requests now.
    busy: Cell<usize>,
    /// Signalled when a connection closes or returns, for requests waiting on the cap.
    freed: Notify,
    /// This worker's counters for the upstream (shared by its endpoints).
    stats: Arc<UpstreamStats>,
}

impl Live {
    fn busy_add(&self, d: i64) {
        self.busy
            .set(self.busy.get().saturating_add_signed(d as isize));
        self.stats.busy.fetch_add(d, Ordering::Relaxed);
    }

    fn open_add(&self, d: i64) {
        self.open
            .set(self.open.get().saturating_add_signed(d as isize));
        self.stats.open.fetch_add(d, Ordering::Relaxed);
    }
}

struct Endpoint {
    addr: SocketAddr,
    live: Rc<Live>,
    h2: RefCell<Option<http2::SendRequest<ClientBody>>>,
    /// The shared HTTP/3 connection, for `protocol = "h3"`.
    h3: RefCell<Option<H3Sender>>,
    /// Idle connections up to `max_idle_per_host`, most recent on top, taken before pingora's.
    hot: RefCell<Vec<H1Conn>>,
}

/// The connections of one upstream on one worker.
pub(crate) struct UpstreamPool {
    pub(crate) cfg: Upstream,
    idle: Rc<ConnectionPool<H1Conn>>,
    endpoints: Vec<Endpoint>,
    /// Shared with the other workers and the active checker.
    pub(crate) health: Arc<Health>,
    /// `[upstream.breaker]`, shared by the workers.
    pub(crate) breaker: Option<Arc<Breaker>>,
    /// This worker's retry budget for the upstream.
    pub(crate) budget: fluxgate_policy::retry::Budget,
    pub(crate) balancer: Balancer,
    next_id: Cell<i32>,
    /// This worker's counters for the upstream; they follow the pool across reloads.
    pub(crate) stats: Arc<UpstreamStats>,
    /// Whether the sweeper task is running (it stops when the pool has no idle connection).
    sweeping: Cell<bool>,
    /// TLS to the endpoints, with the configured server name (else each endpoint's IP).
    tls: Option<(tokio_rustls::TlsConnector, Option<ServerName<'static>>)>,
    /// QUIC to the endpoints (`protocol = "h3"`): the client settings, and this worker's
    /// client endpoint, opened on first use.
    quic: Option<quinn::ClientConfig>,
    quic_endpoint: RefCell<Option<quinn::Endpoint>>,
}

/// What sends requests on an endpoint's HTTP/3 connection.
pub(crate) type H3Sender = h3::client::SendRequest<h3_quinn::OpenStreams, bytes::Bytes>;

/// A connection lent to one request. Dropping it closes the connection; `release` returns it
/// to the pool.
pub(crate) struct Checkout {
    pool: Rc<UpstreamPool>,
    endpoint: usize,
    conn: Option<H1Conn>,
    /// Whether it came from the idle pool (and so may have gone stale).
    pub(crate) reused: bool,
    /// Opened for one client (PROXY protocol): closed after use, never pooled.
    private: bool,
}

/// A client connection's source and destination addresses, as a PROXY protocol header
/// names them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Proxied {
    pub(crate) source: SocketAddr,
    pub(crate) destination: SocketAddr,
}

impl Checkout {
    pub(crate) fn io_mut(&mut self) -> &mut H1Io {
        &mut self.conn.as_mut().expect("checkout holds a connection").io
    }

    /// Returns the connection to the idle pool, or closes it when the pool is full.
    pub(crate) fn release(mut self) {
        if let Some(conn) = self.conn.take() {
            if self.private {
                self.pool.endpoints[self.endpoint].live.busy_add(-1);
            } else {
                self.pool.checkin(self.endpoint, conn);
            }
        }
    }

    /// The connection leaves the pool's accounting of busy connections for a tunnel; it still
    /// counts as open until the tunnel drops it.
    pub(crate) fn into_tunnel(mut self) -> H1Conn {
        let conn = self.conn.take().expect("checkout holds a connection");
        self.pool.endpoints[self.endpoint].live.busy_add(-1);
        conn
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if self.conn.take().is_some() {
            self.pool.endpoints[self.endpoint].live.busy_add(-1);
        }
    }
}

impl UpstreamPool {
    pub(crate) fn new(
        cfg: Upstream,
        health: Arc<Health>,
        breaker: Option<Arc<Breaker>>,
        stats: Arc<UpstreamStats>,
        tls: Option<Arc<rustls::ClientConfig>>,
        seed: u64,
    ) -> Rc<UpstreamPool> {
        let quic = tls
            .as_ref()
            .filter(|_| cfg.protocol == UpstreamProtocol::H3)
            .and_then(|c| {
                let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::clone(c));
                // (TLS 1.3 only and the initial suite: `upstream_config` makes it so.)
                crypto.ok().map(|q| quinn::ClientConfig::new(Arc::new(q)))
            });
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
                live: Rc::new(Live {
                    open: Cell::new(0),
                    busy: Cell::new(0),
                    freed: Notify::new(),
                    stats: Arc::clone(&stats),
                }),
                h2: RefCell::new(None),
                h3: RefCell::new(None),
                hot: RefCell::new(Vec::new()),
            })
            .collect();
        Rc::new(UpstreamPool {
            idle: Rc::new(ConnectionPool::new(lru_size)),
            endpoints,
            balancer: Balancer::new(cfg.balance.clone(), &cfg.endpoints, seed),
            health,
            breaker,
            budget: fluxgate_policy::retry::Budget::new(cfg.retry.budget, cfg.retry.min_retries),
            next_id: Cell::new(0),
            stats,
            sweeping: Cell::new(false),
            tls,
            quic,
            quic_endpoint: RefCell::new(None),
            cfg,
        })
    }

    /// Passive health: the outcome of an exchange with endpoint `ep` (an ejection is logged).
    pub(crate) fn record_outcome(&self, ep: usize, failed: bool) {
        if self.health.record(ep, failed) {
            tracing::warn!(
                upstream = %self.cfg.name,
                endpoint = %self.cfg.endpoints[ep].addr,
                ejected_for = ?self.cfg.passive.ejection,
                "endpoint ejected after consecutive failures"
            );
        }
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
        // A connection with a PROXY header is opened for its client, never ahead.
        if self.cfg.protocol != UpstreamProtocol::Http1 || self.cfg.proxy_protocol.is_some() {
            return;
        }
        for ep in 0..self.endpoints.len() {
            for _ in 0..self.cfg.prewarm {
                match self.connect_h1(ep, None).await {
                    Ok(conn) => {
                        self.endpoints[ep].live.busy_add(1);
                        self.checkin(ep, conn);
                    }
                    Err(e) => {
                        tracing::warn!(upstream = %self.cfg.name, error = %e, "pre-warm failed");
                        break;
                    }
                }
            }
        }
    }

    /// Lends an HTTP/1.1 connection to `ep`: an idle one when there is one (unless `fresh`),
    /// else a new one (waiting for a free slot when the endpoint is at `max_connections`).
    /// One for a `proxied` client is always new, starts with its PROXY header, and is closed
    /// after the request.
    pub(crate) async fn checkout(
        self: &Rc<Self>,
        ep: usize,
        fresh: bool,
        proxied: Option<Proxied>,
    ) -> Result<Checkout, ProxyError> {
        let fresh = fresh || proxied.is_some();
        let live = &self.endpoints[ep].live;
        // Read the clock only when the wait for a free slot begins.
        let mut deadline = None;
        loop {
            while let Some(mut conn) = (!fresh).then(|| self.take_idle(ep)).flatten() {
                if conn.io.looks_closed() {
                    continue;
                }
                conn.idle_since = None;
                live.busy_add(1);
                self.stats.pool_hits.fetch_add(1, Ordering::Relaxed);
                return Ok(Checkout {
                    pool: Rc::clone(self),
                    endpoint: ep,
                    conn: Some(conn),
                    reused: true,
                    private: false,
                });
            }
            let cap = self.cfg.max_connections;
            if cap == 0 || live.open.get() < cap {
                break;
            }
            let deadline = *deadline
                .get_or_insert_with(|| tokio::time::Instant::now() + self.cfg.connect_timeout);
            if tokio::time::timeout_at(deadline, live.freed.notified())
                .await
                .is_err()
            {
                return Err(ProxyError::Overloaded);
            }
        }
        // Boxed: dialing (TCP, maybe TLS) is rare next to reuse and its state is large; it must
        // not grow every request's future.
        let conn = Box::pin(self.connect_h1(ep, proxied)).await?;
        live.busy_add(1);
        self.stats.pool_misses.fetch_add(1, Ordering::Relaxed);
        Ok(Checkout {
            pool: Rc::clone(self),
            endpoint: ep,
            conn: Some(conn),
            reused: false,
            private: proxied.is_some(),
        })
    }

    fn checkin(self: &Rc<Self>, ep: usize, mut conn: H1Conn) {
        let live = &self.endpoints[ep].live;
        live.busy_add(-1);
        // Idle connections of this endpoint besides this one.
        let idle_now = (live.open.get() - live.busy.get()).saturating_sub(1);
        let cap = self.cfg.max_idle_per_host;
        if idle_now >= cap * SURPLUS_FACTOR {
            return;
        }
        let limit = if idle_now >= cap {
            SURPLUS_IDLE_TIMEOUT.min(self.cfg.idle_timeout)
        } else {
            self.cfg.idle_timeout
        };
        conn.idle_since = Some((Instant::now(), limit));
        if idle_now < cap {
            self.endpoints[ep].hot.borrow_mut().push(conn);
        } else {
            let meta = conn.meta.clone();
            // pingora hands back an eviction notifier and a pick-up channel for a watcher
            // task; the sweeper watches instead.
            drop(self.idle.put(&meta, conn));
        }
        live.freed.notify_one();
        if !self.sweeping.replace(true) {
            tokio::task::spawn_local(sweep(Rc::downgrade(self)));
        }
    }

    /// The most recently returned idle connection of `ep`.
    fn take_idle(&self, ep: usize) -> Option<H1Conn> {
        let hot = self.endpoints[ep].hot.borrow_mut().pop();
        hot.or_else(|| self.idle.get(&(ep as u64)))
    }

    /// Closes the idle connections of every endpoint that expired or that the upstream
    /// closed; returns how many stay idle.
    fn sweep_once(&self) -> usize {
        let now = Instant::now();
        let mut kept = 0;
        let expired = |conn: &H1Conn| {
            conn.idle_since
                .is_none_or(|(since, limit)| now >= since + limit)
                || conn.io.looks_closed()
        };
        for (ep, endpoint) in self.endpoints.iter().enumerate() {
            let mut hot = endpoint.hot.borrow_mut();
            hot.retain(|c| !expired(c));
            kept += hot.len();
            drop(hot);
            let key = ep as u64;
            // Hottest first; put back coldest first so the order stays.
            let mut all = Vec::new();
            while let Some(conn) = self.idle.get(&key) {
                all.push(conn);
            }
            for conn in all.into_iter().rev() {
                if expired(&conn) {
                    continue;
                }
                kept += 1;
                let meta = conn.meta.clone();
                drop(self.idle.put(&meta, conn));
            }
        }
        kept
    }

    /// A connection to endpoint `ep`: TCP, the PROXY protocol header for a `proxied` client
    /// when the upstream has `proxy_protocol`, then TLS when it has `tls`, all within
    /// `connect_timeout`. Any failure is a connect failure (502).
    async fn dial(
        &self,
        ep: usize,
        proxied: Option<Proxied>,
    ) -> Result<UpstreamStream, ProxyError> {
        let addr = self.endpoints[ep].addr;
        let connect = async {
            let stream = self.open_tcp(addr, proxied).await?;
            match &self.tls {
                None => Ok(UpstreamStream::Plain(stream)),
                Some((connector, name)) => {
                    let name = name.clone().unwrap_or_else(|| addr.ip().into());
                    let tls = connector.connect(name, stream).await?;
                    Ok(UpstreamStream::Tls(Box::new(tls)))
                }
            }
        };
        self.within_connect_timeout(addr, connect).await
    }

    /// A TCP connection to endpoint `ep` within `connect_timeout`, its PROXY protocol
    /// header sent for a `proxied` client when the upstream has `proxy_protocol` (TCP mode).
    pub(crate) async fn connect_tcp(
        &self,
        ep: usize,
        proxied: Option<Proxied>,
    ) -> Result<TcpStream, ProxyError> {
        let addr = self.endpoints[ep].addr;
        self.within_connect_timeout(addr, self.open_tcp(addr, proxied))
            .await
    }

    /// `connect` within `connect_timeout`; any failure is a connect failure (502).
    async fn within_connect_timeout<T>(
        &self,
        addr: SocketAddr,
        connect: impl std::future::Future<Output = std::io::Result<T>>,
    ) -> Result<T, ProxyError> {
        match tokio::time::timeout(self.cfg.connect_timeout, connect).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(source)) => Err(ProxyError::Connect { addr, source }),
            Err(_) => Err(ProxyError::Connect {
                addr,
                source: std::io::ErrorKind::TimedOut.into(),
            }),
        }
    }

    /// TCP to `addr`, then the PROXY protocol header for a `proxied` client when the
    /// upstream has `proxy_protocol`.
    async fn open_tcp(
        &self,
        addr: SocketAddr,
        proxied: Option<Proxied>,
    ) -> std::io::Result<TcpStream> {
        use fluxgate_wire::proxy_protocol::{encode, Version};
        use tokio::io::AsyncWriteExt;
        let mut stream = TcpStream::connect(addr).await?;
        let _ = stream.set_nodelay(true);
        let (Some(v), Some(p)) = (self.cfg.proxy_protocol, proxied) else {
            return Ok(stream);
        };
        let version = match v {
            fluxgate_conf::ProxyProtocol::V1 => Version::V1,
            fluxgate_conf::ProxyProtocol::V2 => Version::V2,
        };
        let mut header = Vec::with_capacity(64);
        encode(version, p.source, p.destination, &mut header);
        stream.write_all(&header).await?;
        Ok(stream)
    }

    async fn connect_h1(
        self: &Rc<Self>,
        ep: usize,
        proxied: Option<Proxied>,
    ) -> Result<H1Conn, ProxyError> {
        let live = &self.endpoints[ep].live;
        // Counted from the start of the dial, so concurrent requests see the slot taken.
        live.open_add(1);
        let stream = match self.dial(ep, proxied).await {
            Ok(s) => s,
            Err(e) => {
                live.open_add(-1);
                live.freed.notify_one();
                return Err(e);
            }
        };
        let id = self.next_id.get();
        self.next_id.set(id.wrapping_add(1));
        Ok(H1Conn {
            io: H1Io::new(stream),
            meta: ConnectionMeta::new(ep as u64, id),
            idle_since: None,
            live: Rc::clone(live),
        })
    }

    /// The shared HTTP/2 connection to `ep`, opened on first use or after it closed.
    pub(crate) async fn h2_sender(
        self: &Rc<Self>,
        ep: usize,
    ) -> Result<http2::SendRequest<ClientBody>, ProxyError> {
        let endpoint = &self.endpoints[ep];
        if let Some(s) = endpoint.h2.borrow().as_ref() {
            if !s.is_closed() {
                return Ok(s.clone());
            }
        }
        let stream = Box::pin(self.dial(ep, None)).await?;
        let (sender, connection) = http2::Builder::new(LocalExec)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ProxyError::Upstream(Box::new(e)))?;
        let live = Rc::clone(&endpoint.live);
        live.open_add(1);
        tokio::task::spawn_local(async move {
            let _ = connection.await;
            live.open_add(-1);
        });
        *endpoint.h2.borrow_mut() = Some(sender.clone());
        Ok(sender)
    }

    /// The shared HTTP/3 connection to `ep`, opened on first use or after it closed: QUIC
    /// within `connect_timeout`, verified like the upstream's TLS, sessions resumed.
    pub(crate) async fn h3_sender(self: &Rc<Self>, ep: usize) -> Result<H3Sender, ProxyError> {
        let endpoint = &self.endpoints[ep];
        if let Some(s) = endpoint.h3.borrow().as_ref() {
            return Ok(s.clone());
        }
        let addr = endpoint.addr;
        let connect_failed = |source: std::io::Error| ProxyError::Connect { addr, source };
        let Some(config) = self.quic.clone() else {
            return Err(connect_failed(std::io::Error::other(
                "no QUIC client settings",
            )));
        };
        let client = {
            let mut slot = self.quic_endpoint.borrow_mut();
            match slot.as_ref() {
                Some(e) => e.clone(),
                None => {
                    let any: SocketAddr = match addr {
                        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
                        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
                    };
                    let e = quinn::Endpoint::client(any).map_err(connect_failed)?;
                    slot.insert(e).clone()
                }
            }
        };
        let name = self
            .cfg
            .tls
            .as_ref()
            .and_then(|t| t.sni.clone())
            .unwrap_or_else(|| addr.ip().to_string());
        let connect = async {
            let connecting = client
                .connect_with(config, addr, &name)
                .map_err(std::io::Error::other)?;
            let conn = connecting.await.map_err(std::io::Error::other)?;
            h3::client::new(h3_quinn::Connection::new(conn))
                .await
                .map_err(std::io::Error::other)
        };
        let (mut driver, sender) = self.within_connect_timeout(addr, connect).await?;
        let live = Rc::clone(&endpoint.live);
        live.open_add(1);
        let pool = Rc::downgrade(self);
        tokio::task::spawn_local(async move {
            let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
            live.open_add(-1);
            // Closed: the next request opens another.
            if let Some(p) = pool.upgrade() {
                *p.endpoints[ep].h3.borrow_mut() = None;
            }
        });
        *endpoint.h3.borrow_mut() = Some(sender.clone());
        Ok(sender)
    }

    /// Drops the cached HTTP/3 connection of `ep`, so the next request opens another.
    pub(crate) fn forget_h3(&self, ep: usize) {
        *self.endpoints[ep].h3.borrow_mut() = None;
    }

    /// Drops the cached HTTP/2 connection of `ep` if it is `broken`, so the next request dials.
    pub(crate) fn forget_h2(&self, ep: usize) {
        let mut slot = self.endpoints[ep].h2.borrow_mut();
        if slot.as_ref().is_some_and(|s| s.is_closed()) {
            *slot = None;
        }
    }
}

/// The pool's sweeper: every period, closes idle connections that expired or were closed by
/// the upstream. It ends when the pool is gone or holds no idle connection.
async fn sweep(pool: Weak<UpstreamPool>) {
    let period = match pool.upgrade() {
        Some(p) => p.cfg.idle_timeout.min(SURPLUS_IDLE_TIMEOUT),
        None => return,
    };
    loop {
        tokio::time::sleep(period).await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        if pool.sweep_once() == 0 {
            pool.sweeping.set(false);
            return;
        }
    }
}
