//! Which server takes a connection: the first bytes tell HTTP/2 (its preface) from HTTP/1.1.
//! Also the gentle close of a connection a server gave back.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use fluxgate_http::conn::{ClientIo, ClientStream, ConnState, HeadLimits, Timeouts};
use fluxgate_http::h2::PREFACE;
use fluxgate_http::service::Service;

/// Written when the start of the HTTP/2 preface (or a head too short to tell) stops coming.
const TIMEOUT_408: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";

/// The server side of one listener on one worker: the limits, configured once.
pub(crate) struct ConnServer {
    /// Turns true when the worker drains: finish in-flight requests, then close.
    draining: watch::Receiver<bool>,
    /// Connections parked so far on this worker (see `worker_housekeeping`); a metric.
    parks: Arc<AtomicU64>,
    timeouts: Timeouts,
    /// Sources whose connections start with a PROXY protocol header (`listener.proxy_protocol`).
    proxy_protocol: Option<Vec<ipnet::IpNet>>,
    /// Upgraded connections' tunnels use splice(2) (`listener.splice`).
    splice: bool,
    /// `Alt-Svc` on HTTP/1.1 and HTTP/2 answers when the listener serves HTTP/3 too.
    alt_svc: Option<http::HeaderValue>,
    /// HTTP/1.1 head limits; `max_head` is also HTTP/2's SETTINGS_MAX_HEADER_LIST_SIZE.
    limits: HeadLimits,
}

impl ConnServer {
    /// The server side of listener `l`, bound on `port`.
    pub(crate) fn new(
        limits: &fluxgate_conf::HttpLimits,
        l: &fluxgate_conf::Listener,
        port: u16,
        parks: Arc<AtomicU64>,
        draining: watch::Receiver<bool>,
    ) -> ConnServer {
        ConnServer {
            draining,
            parks,
            proxy_protocol: l.proxy_protocol.clone(),
            splice: l.splice,
            alt_svc: l.http3.then(|| {
                http::HeaderValue::from_str(&format!("h3=\":{port}\"; ma=86400"))
                    .expect("a port makes a valid header value")
            }),
            timeouts: Timeouts {
                header: limits.header_read_timeout,
                idle: limits.keepalive_timeout,
                send: limits.send_timeout,
                body: limits.body_timeout,
                request: limits.request_timeout,
                body_min_rate: limits.body_min_rate,
            },
            limits: HeadLimits {
                max_head: limits.max_header_bytes,
                max_headers: limits.max_headers,
            },
        }
    }

    pub(crate) fn header_timeout(&self) -> Duration {
        self.timeouts.header
    }

    /// The sources trusted to send a PROXY protocol header, when the listener takes one.
    pub(crate) fn proxy_protocol(&self) -> Option<&[ipnet::IpNet]> {
        self.proxy_protocol.as_deref()
    }

    /// Serves one accepted connection to its end, each request by `svc`.
    /// `early`: bytes that arrived as TLS 0-RTT data, read before the stream's own.
    pub(crate) async fn serve<S: Service>(
        &self,
        stream: ClientStream,
        early: Option<bytes::Bytes>,
        (peer, local): (SocketAddr, SocketAddr),
        svc: Rc<S>,
    ) {
        let mut stream = stream;
        let Some((h2, first)) = self.sniff(&mut stream, early).await else {
            return;
        };
        let scheme = match stream {
            ClientStream::Plain(_) => "http",
            ClientStream::Tls(_) => "https",
        };
        let cn = crate::io::tls::client_identity(&stream);
        let alt_svc = self.alt_svc.clone();
        let state = ConnState::new(h2, self.timeouts, scheme, peer, local, alt_svc, cn);
        let io = ClientIo::new(stream, Arc::clone(&state), first);
        let draining = self.draining.clone();
        let parks = Arc::clone(&self.parks);
        let left = if h2 {
            fluxgate_http::h2::serve(io, state, svc, draining, self.limits, parks).await
        } else {
            fluxgate_http::h1::serve(io, state, svc, draining, self.limits, parks, self.splice)
                .await
        };
        if let Some(s) = left {
            // Boxed, and in its own statement (a temporary would live across the await): the
            // linger buffer must not grow every connection's future.
            let linger = Box::pin(linger(s));
            linger.await;
        }
    }

    /// Serves one QUIC connection's HTTP/3 requests to its end, each by `svc`.
    pub(crate) async fn serve_h3<S: Service>(
        &self,
        conn: quinn::Connection,
        local: SocketAddr,
        svc: Rc<S>,
        handshake: Option<fluxgate_http::h3::Handshake>,
    ) -> fluxgate_http::h3::Served {
        let peer = conn.remote_address();
        let state = ConnState::new(true, self.timeouts, "https", peer, local, None, None);
        let draining = self.draining.clone();
        fluxgate_http::h3::serve(conn, state, svc, draining, self.limits, handshake).await
    }

    /// Reads until the first bytes tell the protocol: true for HTTP/2 (they are its preface).
    /// Returns the bytes read, which the server reads first; None if the client left or sent
    /// nothing in time.
    async fn sniff(
        &self,
        stream: &mut ClientStream,
        early: Option<bytes::Bytes>,
    ) -> Option<(bool, bytes::Bytes)> {
        use tokio::io::AsyncReadExt;
        let mut got = bytes::BytesMut::from(early.unwrap_or_default());
        loop {
            let n = got.len().min(PREFACE.len());
            if got[..n] != PREFACE[..n] {
                return Some((false, got.freeze()));
            }
            if n == PREFACE.len() {
                return Some((true, got.freeze()));
            }
            // Nothing yet: an idle connection; a start of the preface: a head being read.
            let limit = if got.is_empty() {
                self.timeouts.idle
            } else {
                self.timeouts.header
            };
            got.reserve(4096);
            match tokio::time::timeout(limit, stream.read_buf(&mut got)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return None,
                Ok(Ok(_)) => {}
                Err(_) => {
                    // A head (as far as it went) that did not arrive in time.
                    if let (false, ClientStream::Plain(s)) = (got.is_empty(), &*stream) {
                        let _ = s.try_write(TIMEOUT_408);
                    }
                    return None;
                }
            }
        }
    }
}

/// Closes a connection the client may still be writing to without losing our last answer:
/// closing with unread bytes would send RST, and a client that gets RST before reading may
/// discard the response. So send FIN, then read and discard for a bounded time and amount.
async fn linger(mut stream: ClientStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const LINGER_TIME: Duration = Duration::from_secs(2);
    const LINGER_BYTES: usize = 1 << 20;
    // TLS: close_notify, then the same drain.
    if tokio::time::timeout(LINGER_TIME, stream.shutdown())
        .await
        .is_err()
    {
        return;
    }
    let mut sink = [0u8; 4096];
    let mut total = 0;
    let _ = tokio::time::timeout(LINGER_TIME, async {
        while total < LINGER_BYTES {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    })
    .await;
}
