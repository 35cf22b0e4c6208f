//! A `mode = "tcp"` listener's connections: bytes forwarded to an upstream cluster, chosen
//! by the TLS server name the ClientHello carries (the TLS itself passes through untouched)
//! or the listener's default, through the upstream's balancing, health and connect timeout,
//! with its PROXY protocol header when it has one.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use fluxgate_conf::TcpRoutes;
use fluxgate_policy::balance::hash64;
use fluxgate_wire::tls::{client_hello_extensions, server_name, SERVER_NAME};
use tokio::net::TcpStream;

use crate::io::tls::SniMap;
use crate::upstream::pool::{Proxied, UpstreamPool};

/// The largest ClientHello record looked into (a TLS record's limit, and its head).
const HELLO_MAX: usize = 5 + (1 << 14);
/// Endpoints tried for one connection when connecting fails.
const CONNECT_TRIES: usize = 3;

/// One TCP-mode listener as one worker forwards it (swapped by reloads).
pub(crate) struct TcpForward {
    sni: SniMap<usize>,
    default: Option<usize>,
    /// This worker's pools, indexed like `Config::upstreams`.
    pools: Rc<[Rc<UpstreamPool>]>,
    /// How long the ClientHello may take (`http.header_read_timeout`).
    hello_timeout: Duration,
    /// splice(2), else the copy path (`listener.splice`).
    splice: bool,
    /// `listener.tcp_idle_timeout`.
    idle: Duration,
}

impl TcpForward {
    pub(crate) fn new(
        routes: &TcpRoutes,
        pools: Rc<[Rc<UpstreamPool>]>,
        hello_timeout: Duration,
        splice: bool,
        idle: Duration,
    ) -> TcpForward {
        let mut sni = SniMap::new();
        for r in &routes.sni {
            for n in &r.names {
                sni.insert(n, r.upstream);
            }
        }
        TcpForward {
            sni,
            default: routes.default,
            pools,
            hello_timeout,
            splice,
            idle,
        }
    }

    /// Forwards `client` (from `peer`, which reached `local`) until both sides are done.
    pub(crate) async fn forward(&self, client: TcpStream, peer: SocketAddr, local: SocketAddr) {
        let Some(upstream) = self.upstream_for(&client).await else {
            return;
        };
        let pool = &self.pools[upstream];
        let proxied = Proxied {
            source: peer,
            destination: local,
        };
        let key = Some(hash64(peer.ip().to_string().as_bytes()));
        for _ in 0..CONNECT_TRIES.min(pool.cfg.endpoints.len()) {
            let Some(pick) = pool.pick_endpoint(key) else {
                return;
            };
            let ep = pick.ep;
            let dialed = pool.connect_tcp(ep, Some(proxied)).await;
            pool.record_outcome(ep, dialed.is_err());
            if let Ok(mut up) = dialed {
                let mut client = client;
                let idle = Some(self.idle);
                let _ = fluxgate_http::stream::pump(&mut client, &mut up, self.splice, idle).await;
                pool.balancer.done(pick);
                return;
            }
            pool.balancer.done(pick);
        }
    }

    /// The upstream for a connection: by the server name of its ClientHello when the
    /// listener routes by SNI, else (not TLS, no name, no match) the default.
    async fn upstream_for(&self, client: &TcpStream) -> Option<usize> {
        if self.sni.is_empty() {
            return self.default;
        }
        let deadline = tokio::time::Instant::now() + self.hello_timeout;
        let mut buf = vec![0u8; HELLO_MAX];
        super::peek_until(client, &mut buf, deadline, |b, full| {
            let mut name = None;
            let whole = client_hello_extensions(b, |kind, data| {
                if kind == SERVER_NAME {
                    name = server_name(data);
                }
            });
            match whole {
                Some(true) => Some(name.and_then(|n| self.sni.get(n)).copied().or(self.default)),
                Some(false) if !full => None,
                // Not TLS, or a hello larger than one record.
                _ => Some(self.default),
            }
        })
        .await
        .flatten()
    }
}
