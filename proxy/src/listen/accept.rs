//! Listening sockets and the two acceptors: io_uring multishot accept (completions signalled
//! through an eventfd the runtime polls, completion work deferred to the worker instead of
//! interrupting it) and tokio's epoll accept.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;

use fluxgate_conf::IoMode;
use fluxgate_sys::{AcceptRing, Drained};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::watch;

use std::cell::{Cell, RefCell};
use std::sync::atomic::AtomicI64;
use std::sync::Arc;

use crate::app::fanout::local::LocalFeed;
use crate::app::fanout::session;
use crate::app::gateway::Gateway;
use crate::listen::proxied;
use crate::listen::sniff::ConnServer;
use crate::listen::tcp::TcpForward;
use crate::telemetry::metrics;
use bytes::BytesMut;
use fluxgate_conf::FeedRole;
use fluxgate_http::conn::ClientStream;
use fluxgate_http::service::Refusal;

/// Binds one worker's socket for a listener (SO_REUSEPORT, TCP_NODELAY, backlog, TFO).
pub(crate) fn bind(
    l: &fluxgate_conf::Listener,
    addr: SocketAddr,
) -> io::Result<std::net::TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    // Port 0 with SO_REUSEPORT already set may hand out a port another reuseport listener of
    // the same user holds, silently sharing its traffic. So pick the port without it, then
    // join the group before listen(2), where Linux forms it.
    let any_port = addr.port() == 0;
    sock.set_reuse_port(!any_port)?;
    sock.set_tcp_nodelay(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())
        .map_err(|e| io::Error::new(e.kind(), format!("bind {addr}: {e}")))?;
    if any_port {
        sock.set_reuse_port(true)?;
    }
    sock.listen(l.backlog as i32)?;
    if l.tcp_fastopen > 0 {
        if let Err(e) = fluxgate_sys::set_tcp_fastopen(&sock, l.tcp_fastopen) {
            tracing::warn!(listener = %addr, error = %e, "TCP_FASTOPEN not set");
        }
    }
    Ok(sock.into())
}

/// Starts the acceptor for one listener socket; it runs until `stop` turns true. A worker
/// whose ring cannot be set up accepts through epoll when the acceptor was chosen
/// automatically (and says so), and fails when io_uring was asked for by name. Returns the
/// acceptor that runs.
pub(crate) fn spawn(
    worker: usize,
    io: Acceptor,
    sock: std::net::TcpListener,
    ctx: Rc<ListenerCtx>,
    stop: watch::Receiver<bool>,
) -> io::Result<IoMode> {
    let ring = match io {
        Acceptor::Uring { strict } => match AcceptRing::new(sock.as_raw_fd()) {
            Ok(ring) => Some(ring),
            Err(e) if strict => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("--io uring: worker {worker}: io_uring setup failed: {e}"),
                ))
            }
            Err(e) => {
                tracing::warn!(error = %e, "worker {worker}: io_uring setup failed; accepting through epoll");
                None
            }
        },
        Acceptor::Epoll => None,
    };
    Ok(match ring {
        Some(ring) => {
            tokio::task::spawn_local(accept_uring(sock, ring, ctx, stop));
            IoMode::Uring
        }
        None => {
            tokio::task::spawn_local(accept_epoll(sock, ctx, stop));
            IoMode::Epoll
        }
    })
}

/// The acceptor a worker runs, as resolved at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Acceptor {
    /// `strict`: io_uring was asked for by name, so a ring that cannot be set up is an error
    /// rather than a fall back to epoll.
    Uring {
        strict: bool,
    },
    Epoll,
}

impl Acceptor {
    pub(crate) fn mode(self) -> IoMode {
        match self {
            Acceptor::Uring { .. } => IoMode::Uring,
            Acceptor::Epoll => IoMode::Epoll,
        }
    }
}

fn start_conn(ctx: &Rc<ListenerCtx>, stream: std::net::TcpStream, peer: SocketAddr) {
    if ctx.active.get() >= ctx.max_connections.get() {
        // Over the per-worker cap: close at once rather than queue unbounded work.
        return;
    }
    let _ = stream.set_nodelay(true);
    let stream = match tokio::net::TcpStream::from_std(stream) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot register accepted socket");
            return;
        }
    };
    ctx.active.set(ctx.active.get() + 1);
    metrics::inc(&ctx.active_gauge);
    let ctx = Rc::clone(ctx);
    let tls = ctx.tls.borrow().clone();
    let tcp = ctx.tcp.borrow().clone();
    tokio::task::spawn_local(async move {
        serve_conn(&ctx, stream, peer, tls, tcp).await;
        ctx.active.set(ctx.active.get() - 1);
        metrics::dec(&ctx.active_gauge);
    });
}

/// One accepted connection, to its end: its PROXY protocol header when the listener takes
/// one, then forwarded as bytes (TCP mode), or TLS if configured and served as HTTP.
async fn serve_conn(
    ctx: &ListenerCtx,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    tcp: Option<Rc<TcpForward>>,
) {
    {
        // The limits and certificates in force when the connection arrived; routes are
        // looked up per request.
        let server = ctx.server.borrow().clone();
        let Ok(local) = stream.local_addr() else {
            return;
        };
        let (peer, local) = match server.proxy_protocol() {
            None => (peer, local),
            Some(trusted) => {
                let limit = server.header_timeout();
                match proxied::take_header(&stream, peer, local, trusted, limit).await {
                    Some(addrs) => addrs,
                    None => {
                        let ip = http::HeaderValue::from_str(&peer.ip().to_string())
                            .expect("an IP address is a valid header value");
                        ctx.gateway
                            .refused_without_answer(Refusal::ProxyHeader, &ip);
                        return;
                    }
                }
            }
        };
        if let Some(tcp) = tcp {
            tcp.forward(stream, peer, local).await;
            return;
        }
        let stream = match tls {
            None => Some((ClientStream::Plain(stream), None)),
            // A handshake gets as long as a request head would.
            Some(acceptor) => {
                // Whether the client offers 0-RTT, to count rejections: rustls only reports
                // acceptance. Looked at only where 0-RTT is on (one extra peek).
                let offered = if acceptor.config().max_early_data_size > 0 {
                    let mut head = [0u8; 1024];
                    let n = tokio::time::timeout(server.header_timeout(), stream.peek(&mut head))
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .unwrap_or(0);
                    crate::io::tls::offers_early_data(&head[..n])
                } else {
                    false
                };
                // Boxed: a handshake's state is large, and an inline one would grow every
                // connection's task, TLS or not, for its whole life.
                let shaken = tokio::time::timeout(
                    server.header_timeout(),
                    Box::pin(acceptor.accept(stream)),
                )
                .await;
                let stats = &ctx.tls_stats;
                match shaken {
                    Ok(Ok(mut s)) => {
                        // Early data rustls accepted, to be read before the rest.
                        let early = s.get_mut().1.early_data().and_then(|mut r| {
                            let mut v = Vec::new();
                            let _ = std::io::Read::read_to_end(&mut r, &mut v);
                            (!v.is_empty()).then(|| bytes::Bytes::from(v))
                        });
                        match (early.is_some(), offered) {
                            (true, _) => stats.early(true),
                            (false, true) => stats.early(false),
                            _ => {}
                        }
                        let c = s.get_ref().1;
                        stats.handshake(
                            c.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
                            c.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3),
                            c.alpn_protocol(),
                        );
                        Some((ClientStream::Tls(Box::new(s)), early))
                    }
                    Ok(Err(e)) => {
                        stats.error(handshake_error(&e));
                        None
                    }
                    Err(_) => {
                        stats.error(0);
                        None
                    }
                }
            }
        };
        let feed = ctx.feed.borrow().clone();
        let desk = ctx.orders.borrow().clone();
        match (stream, feed, desk) {
            (Some((stream, early)), Some((feed, role)), _) => {
                let buf = early.map_or_else(BytesMut::new, |e| BytesMut::from(&e[..]));
                let cn = crate::io::tls::client_identity(&stream);
                let allowed =
                    session::entitled(&feed.hub.config(), None, cn.as_deref()).unwrap_or_default();
                // Boxed: rare, and either state must not grow every connection's task.
                let served: std::pin::Pin<Box<dyn std::future::Future<Output = ()>>> = match role {
                    FeedRole::Publish => Box::pin(session::publish(stream, feed, false, buf)),
                    FeedRole::Subscribe => {
                        Box::pin(session::subscribe(stream, feed, false, allowed, None, buf))
                    }
                };
                served.await;
            }
            (Some((stream, early)), None, Some(desk)) => {
                let buf = early.map_or_else(BytesMut::new, |e| BytesMut::from(&e[..]));
                let pools = Rc::clone(&ctx.gateway.handler().pools);
                // Boxed, as a feed's.
                Box::pin(crate::app::orders::session::serve(
                    stream, desk, pools, false, buf,
                ))
                .await;
            }
            (Some((stream, early)), None, None) => {
                server
                    .serve(stream, early, (peer, local), Rc::clone(&ctx.gateway))
                    .await;
            }
            (None, ..) => {}
        }
    }
}

/// Which `metrics::TLS_ERRORS` entry a failed handshake counts as.
fn handshake_error(e: &io::Error) -> usize {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::AlertReceived(_)) => 2,
        Some(rustls::Error::PeerIncompatible(_)) => 3,
        Some(rustls::Error::PeerMisbehaved(_) | rustls::Error::InvalidMessage(_)) => 4,
        Some(_) => 5,
        None if e.kind() == io::ErrorKind::UnexpectedEof => 1,
        None => 5,
    }
}

/// Out of descriptors or memory: back off instead of spinning on a listener that stays ready.
async fn accept_backoff(e: &io::Error) {
    tracing::warn!(error = %e, "accept failed");
    if matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::ENOBUFS)
    ) {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

async fn accept_epoll(
    sock: std::net::TcpListener,
    ctx: Rc<ListenerCtx>,
    mut stop: watch::Receiver<bool>,
) {
    let listener = match tokio::net::TcpListener::from_std(sock) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot register listener");
            return;
        }
    };
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.wait_for(|d| *d) => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => match stream.into_std() {
                Ok(s) => start_conn(&ctx, s, peer),
                Err(e) => tracing::warn!(error = %e, "accepted socket unusable"),
            },
            Err(e) => accept_backoff(&e).await,
        }
    }
}

async fn accept_uring(
    sock: std::net::TcpListener,
    ring: AcceptRing,
    ctx: Rc<ListenerCtx>,
    mut stop: watch::Receiver<bool>,
) {
    // The listening socket stays open as long as this accept loop runs.
    let _listener = sock;
    let mut ring = match ring.register() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot poll the io_uring");
            return;
        }
    };
    let mut out = Drained::default();
    loop {
        let readable = tokio::select! {
            biased;
            _ = stop.wait_for(|d| *d) => return,
            r = ring.readable_mut() => r,
        };
        let mut ready = match readable {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "io_uring poll failed");
                return;
            }
        };
        ready.clear_ready();
        if let Err(e) = ready.get_inner_mut().drain(&mut out) {
            tracing::warn!(error = %e, "io_uring re-arm failed");
            accept_backoff(&e).await;
        }
        for r in out.accepted.drain(..) {
            match r {
                Ok((fd, peer)) => start_conn(&ctx, std::net::TcpStream::from(fd), peer),
                Err(e) => accept_backoff(&e).await,
            }
        }
    }
}

/// Per-listener state of one worker.
pub(crate) struct ListenerCtx {
    pub(crate) server: RefCell<Rc<ConnServer>>,
    /// What serves the listener's requests (its handler swapped by reloads).
    pub(crate) gateway: Rc<Gateway>,
    pub(crate) active: Cell<usize>,
    pub(crate) max_connections: Cell<usize>,
    /// This worker's share of `fluxgate_active_connections`; survives reloads.
    pub(crate) active_gauge: Arc<AtomicI64>,
    /// This listener's TLS handshake counters.
    pub(crate) tls_stats: Arc<crate::telemetry::metrics::TlsStats>,
    /// TLS termination for new connections, when the listener has `[listener.tls]`.
    pub(crate) tls: RefCell<Option<tokio_rustls::TlsAcceptor>>,
    /// Forwarding for new connections, when the listener is `mode = "tcp"`.
    pub(crate) tcp: RefCell<Option<Rc<TcpForward>>>,
    /// The feed new connections publish to or subscribe to, when the listener is
    /// `mode = "feed"`.
    pub(crate) feed: RefCell<Option<(Rc<LocalFeed>, FeedRole)>>,
    /// The desk new connections are order sessions of, when the listener is
    /// `mode = "orders"`.
    pub(crate) orders: RefCell<Option<Arc<crate::app::orders::desk::Desk>>>,
    /// This worker's QUIC endpoint, when the listener serves HTTP/3.
    pub(crate) quic: RefCell<Option<quinn::Endpoint>>,
    /// `http3.early_data`.
    pub(crate) early_data: Cell<bool>,
    /// QUIC handshakes in progress on this worker, and past how many a Retry comes first
    /// (`http3.retry_threshold`); Retry packets sent.
    pub(crate) handshaking: Rc<Cell<usize>>,
    pub(crate) retry_threshold: Cell<usize>,
    /// This listener's HTTP/3 counters (shared by the workers, kept across reloads).
    pub(crate) quic_stats: Arc<crate::telemetry::metrics::QuicStats>,
    /// Stops this listener's acceptor.
    pub(crate) stop: watch::Sender<bool>,
}
