//! HTTP/3 listeners: a UDP socket per worker (SO_REUSEPORT, on the TCP listener's port), a
//! quinn endpoint on it, and the loop that hands its connections to the HTTP/3 server.
//!
//! quinn spawns its endpoint and connection drivers as `Send` futures through its runtime;
//! here that runtime spawns them onto the worker's own current-thread runtime, so they run
//! on the worker's thread beside the (not `Send`) request futures, with no lock or channel of
//! ours between the two. What quinn locks inside (a connection's state) is only ever taken
//! from this one thread.

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use socket2::{Domain, Protocol, Socket, Type};
use std::sync::atomic::Ordering;

use tokio::sync::watch;

use crate::listen::accept::ListenerCtx;
use crate::telemetry::metrics;

/// One worker's UDP socket for HTTP/3 on `addr` (the TCP listener's, port resolved).
pub(crate) fn bind(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    sock.set_reuse_port(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())
        .map_err(|e| io::Error::new(e.kind(), format!("bind {addr}/udp: {e}")))?;
    Ok(sock.into())
}

/// The endpoint on `sock`, serving with `config`. Every worker's endpoint signs stateless
/// resets with one process-wide key, so a packet for a connection that lands on another
/// worker's socket is answered with a reset its client accepts.
pub(crate) fn endpoint(
    sock: std::net::UdpSocket,
    config: quinn::ServerConfig,
) -> io::Result<quinn::Endpoint> {
    static RESET_KEY: std::sync::OnceLock<Arc<aws_lc_rs::hmac::Key>> = std::sync::OnceLock::new();
    let key = RESET_KEY.get_or_init(|| {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let key = aws_lc_rs::hmac::Key::generate(aws_lc_rs::hmac::HMAC_SHA256, &rng)
            .expect("the system's random source works");
        Arc::new(key)
    });
    quinn::Endpoint::new(
        quinn::EndpointConfig::new(Arc::clone(key) as Arc<dyn quinn::crypto::HmacKey>),
        Some(config),
        sock,
        Arc::new(crate::listen::amplification::Guarded),
    )
}

/// Accepts QUIC connections until `stop` turns true; each is served as HTTP/3.
pub(crate) async fn accept(
    endpoint: quinn::Endpoint,
    ctx: Rc<ListenerCtx>,
    mut stop: watch::Receiver<bool>,
) {
    let Ok(local) = endpoint.local_addr() else {
        return;
    };
    loop {
        let incoming = tokio::select! {
            biased;
            _ = stop.wait_for(|d| *d) => return,
            i = endpoint.accept() => i,
        };
        let Some(incoming) = incoming else {
            return;
        };
        if ctx.active.get() >= ctx.max_connections.get() {
            incoming.refuse();
            continue;
        }
        // Under a flood of handshakes, a new client first proves it owns its address (a
        // Retry round trip): spoofed sources cannot, and cost no handshake state.
        if !incoming.remote_address_validated()
            && incoming.may_retry()
            && ctx.handshaking.get() >= ctx.retry_threshold.get()
        {
            if incoming.retry().is_ok() {
                ctx.quic_stats.retries.fetch_add(1, Ordering::Relaxed);
            }
            continue;
        }
        let ctx = Rc::clone(&ctx);
        ctx.active.set(ctx.active.get() + 1);
        metrics::inc(&ctx.active_gauge);
        let early_data = ctx.early_data.get();
        tokio::task::spawn_local(async move {
            serve_incoming(&ctx, incoming, local, early_data).await;
            ctx.active.set(ctx.active.get() - 1);
            metrics::dec(&ctx.active_gauge);
        });
    }
}

/// Completes one connection attempt and serves it as HTTP/3. With `early_data` it is taken
/// at once, so 0-RTT requests are read before the handshake ends (and told apart).
async fn serve_incoming(
    ctx: &ListenerCtx,
    incoming: quinn::Incoming,
    local: SocketAddr,
    early_data: bool,
) {
    let server = ctx.server.borrow().clone();
    let gateway = Rc::clone(&ctx.gateway);
    // A handshake gets as long as a request head would.
    let limit = server.header_timeout();
    let Ok(connecting) = incoming.accept() else {
        return;
    };
    // Counted while the handshake runs (see `http3.retry_threshold`).
    let counted = Handshaking::new(ctx);
    let stats = Arc::clone(&ctx.quic_stats);
    let (conn, handshake) = if !early_data {
        let shaken = tokio::time::timeout(limit, connecting).await;
        drop(counted);
        let Ok(Ok(conn)) = shaken else {
            stats.handshakes_failed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        stats.handshakes_ok.fetch_add(1, Ordering::Relaxed);
        (conn, None)
    } else {
        // A server's connection always converts (quinn says so).
        let Ok((conn, done)) = connecting.into_0rtt() else {
            return;
        };
        let handshake = fluxgate_http::h3::Handshake::default();
        let (h, c, stats) = (handshake.clone(), conn.clone(), Arc::clone(&stats));
        tokio::task::spawn_local(async move {
            let shaken = tokio::time::timeout(limit, done).await;
            drop(counted);
            match shaken {
                Ok(_) => {
                    stats.handshakes_ok.fetch_add(1, Ordering::Relaxed);
                    h.complete();
                }
                Err(_) => {
                    stats.handshakes_failed.fetch_add(1, Ordering::Relaxed);
                    c.close(0u32.into(), b"handshake timeout");
                }
            }
        });
        (conn, Some(handshake))
    };
    stats.connections.fetch_add(1, Ordering::Relaxed);
    let served = server
        .serve_h3(conn.clone(), local, gateway, handshake)
        .await;
    stats.connections.fetch_sub(1, Ordering::Relaxed);
    stats.closed(&conn, &served);
}

/// One handshake in progress on a listener's worker, counted until dropped.
struct Handshaking(Rc<std::cell::Cell<usize>>);

impl Handshaking {
    fn new(ctx: &ListenerCtx) -> Handshaking {
        let n = Rc::clone(&ctx.handshaking);
        n.set(n.get() + 1);
        Handshaking(n)
    }
}

impl Drop for Handshaking {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}
