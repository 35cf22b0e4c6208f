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

/// The endpoint on `sock`, serving with `config`.
pub(crate) fn endpoint(
    sock: std::net::UdpSocket,
    config: quinn::ServerConfig,
) -> io::Result<quinn::Endpoint> {
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(config),
        sock,
        Arc::new(quinn::TokioRuntime),
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
        let ctx = Rc::clone(&ctx);
        ctx.active.set(ctx.active.get() + 1);
        metrics::inc(&ctx.active_gauge);
        tokio::task::spawn_local(async move {
            let server = ctx.server.borrow().clone();
            // A handshake gets as long as a request head would.
            let shaken = tokio::time::timeout(server.header_timeout(), incoming).await;
            if let Ok(Ok(conn)) = shaken {
                server.serve_h3(conn, local, Rc::clone(&ctx.gateway)).await;
            }
            ctx.active.set(ctx.active.get() - 1);
            metrics::dec(&ctx.active_gauge);
        });
    }
}
