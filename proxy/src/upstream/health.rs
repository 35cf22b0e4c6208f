//! Active health checks: one prober per upstream per process, a plain HTTP/1.1 GET per
//! endpoint per interval on a fresh connection. Results go into the shared `Health`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use fluxgate_conf::{HealthCheck, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use fluxgate_policy::balance::Health;

/// Probes every endpoint of `upstream` forever (until the worker stops).
pub(crate) async fn probe_forever(upstream: Upstream, check: HealthCheck, health: Arc<Health>) {
    let n = upstream.endpoints.len();
    let mut passes = vec![0u32; n];
    let mut fails = vec![0u32; n];
    let mut tick = tokio::time::interval(check.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for (i, ep) in upstream.endpoints.iter().enumerate() {
            let ok = probe(ep.addr, &check.path, check.timeout).await;
            let state = &health.endpoints[i].active_ok;
            if ok {
                passes[i] += 1;
                fails[i] = 0;
                if passes[i] >= check.healthy_threshold && !state.load(Ordering::Relaxed) {
                    state.store(true, Ordering::Relaxed);
                    tracing::info!(
                        upstream = %upstream.name,
                        endpoint = %ep.addr,
                        "endpoint healthy again"
                    );
                }
            } else {
                fails[i] += 1;
                passes[i] = 0;
                if fails[i] >= check.unhealthy_threshold && state.load(Ordering::Relaxed) {
                    state.store(false, Ordering::Relaxed);
                    tracing::warn!(
                        upstream = %upstream.name,
                        endpoint = %ep.addr,
                        "endpoint failed its health check; out of rotation"
                    );
                }
            }
        }
    }
}

/// One probe: true when the endpoint answers `GET path` with 2xx within `limit`.
async fn probe(addr: std::net::SocketAddr, path: &str, limit: Duration) -> bool {
    let attempt = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: fluxgate-health-check\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.ok()?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head).await.ok()?;
        // "HTTP/1.1 2xx"
        Some(head.starts_with(b"HTTP/1.") && head[9] == b'2')
    };
    matches!(tokio::time::timeout(limit, attempt).await, Ok(Some(true)))
}
