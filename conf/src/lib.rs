//! fluxgate's configuration: the TOML schema, its defaults and its validation.
//!
//! Input is parsed once into typed values (`Config::from_toml`); every error names the key path
//! and the line at fault. This crate does no I/O beyond reading the file it is given and never
//! touches sockets or the runtime.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

mod balance;
mod breaker;
mod feed;
mod orders;
mod route;
mod telemetry;
pub use balance::{Balance, Endpoint, HashKey, HealthCheck, Passive};
pub use breaker::{Breaker, Retry};
pub use feed::{
    Entitlement, Feed, FeedEndpoint, FeedRole, InstrumentSet, NatsIngest, SlowConsumer,
};
pub use orders::{AccountLimits, Desk, DeskInstrument, DeskRoute, JournalSettings};
pub use route::{
    GlobalLimit, HeaderMatch, HeaderOps, HostMatch, KeySource, PathMatch, QueryMatch, RateKey,
    RateLimit, Rollback, Route, RouteAction, RouteMatch, Split, SplitTarget, ValueMatch,
};
pub use telemetry::{check_directives, Log, LogFormat, Tracing};

/// The config `fluxgate run` serves when given no file (see README, "Embedded default").
pub const DEFAULT_TOML: &str = include_str!("../examples/default.toml");

/// Why a config was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// The text is not valid TOML or does not fit the schema (unknown key, wrong type).
    #[error("{0}")]
    Syntax(String),
    /// A value has the right type but is not acceptable.
    #[error("line {line}: `{key}`: {reason}")]
    Invalid {
        key: String,
        line: usize,
        reason: String,
    },
}

/// How worker threads accept connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoMode {
    /// io_uring when it can be set up, otherwise epoll (one log line says why).
    Auto,
    /// io_uring accept; start-up fails if unavailable.
    Uring,
    /// epoll through tokio.
    Epoll,
}

impl std::str::FromStr for IoMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(IoMode::Auto),
            "uring" => Ok(IoMode::Uring),
            "epoll" => Ok(IoMode::Epoll),
            other => Err(format!("unknown io mode {other:?} (auto, uring, epoll)")),
        }
    }
}

impl fmt::Display for IoMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IoMode::Auto => "auto",
            IoMode::Uring => "uring",
            IoMode::Epoll => "epoll",
        })
    }
}

/// The whole, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub runtime: Runtime,
    pub http: HttpLimits,
    pub listeners: Vec<Listener>,
    pub upstreams: Vec<Upstream>,
    /// `[admin] address`: where /metrics, /healthz, /readyz and /config are served.
    /// Default: no admin listener.
    pub admin: Option<SocketAddr>,
    /// `[access_log]`. Default: off.
    pub access_log: Option<AccessLog>,
    /// `[http3]`: QUIC settings of every listener that serves HTTP/3.
    pub http3: Http3,
    /// `[[feed]]`: market-data feeds fanned out to subscribers. Default: none.
    pub feeds: Vec<Feed>,
    /// `[[orders]]`: order desks. Default: none.
    pub desks: Vec<Desk>,
    /// `[log]`: the gateway's own log lines.
    pub log: Log,
    /// `[tracing]`: OpenTelemetry spans per request. Default: off.
    pub tracing: Option<Tracing>,
}

/// `[http3]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Http3 {
    /// Request streams a client may have open at once on one connection. Default 100.
    pub max_streams: u32,
    /// A connection with nothing received for this long is closed. Default 30 s.
    pub idle_timeout: Duration,
    /// PING sent after this long without sending, to keep idle connections (and the NAT
    /// bindings on their way) alive. Default 10 s.
    pub keepalive_interval: Duration,
    /// Take 0-RTT data from resuming clients: early safe requests without a body go on with
    /// `Early-Data: 1`; any other early request waits for the handshake. Default false.
    pub early_data: bool,
    /// Handshakes in progress per worker past which new clients must prove their address
    /// with a Retry first. Default 256; 0 sends Retry to every new client.
    pub retry_threshold: usize,
}

/// `[access_log]`: one JSON line per request, buffered per worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLog {
    /// File appended to (created if missing).
    pub path: std::path::PathBuf,
    /// Bytes a worker gathers before writing. Default 64 KiB.
    pub buffer: usize,
    /// Longest a line waits in the buffer. Default 1 s.
    pub flush_interval: Duration,
}

/// `[runtime]`
#[derive(Debug, Clone)]
pub struct Runtime {
    /// Worker threads, each with its own listener sockets. Default: available cores.
    pub workers: usize,
    /// Default: auto.
    pub io: IoMode,
    /// On SIGTERM, how long requests in flight may take to finish before the process exits
    /// anyway. Default 30 s.
    pub drain_timeout: Duration,
}

/// `[http]`: limits on what downstream clients may send.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// Longest request target in bytes; longer gets 414. Default 8 KiB.
    pub max_request_line: usize,
    /// Largest request head (request line and headers) in bytes; larger gets 431. Default 32 KiB,
    /// at least 8 KiB.
    pub max_header_bytes: usize,
    /// Most header fields in one request; more gets 431. Default 100.
    pub max_headers: usize,
    /// A started request head must be complete within this, else 408 and close. Default 10 s.
    pub header_read_timeout: Duration,
    /// An idle client connection is closed after this. Default 60 s.
    pub keepalive_timeout: Duration,
    /// A client that takes no response bytes for this long is closed (HTTP/2: a stream whose
    /// window stays shut this long is reset), and its upstream request cancelled.
    /// Default 20 s.
    pub send_timeout: Duration,
    /// A client sending a request body that sends no byte of it for this long (while it has
    /// room to) gets 408 and is closed (HTTP/2: the stream is reset). Default 20 s.
    pub body_timeout: Duration,
    /// The whole request, head and body, must arrive within this (as `body_timeout`'s
    /// answer). Default: off.
    pub request_timeout: Option<Duration>,
    /// After a first `body_timeout`, a request body must have averaged at least this many
    /// bytes per second (as `body_timeout`'s answer). Default: off.
    pub body_min_rate: Option<u64>,
}

/// `[[listener]]`
#[derive(Debug, Clone)]
pub struct Listener {
    pub address: SocketAddr,
    /// listen(2) backlog. Default 4096.
    pub backlog: u32,
    /// TCP_FASTOPEN queue length; 0 turns it off. Default 256.
    pub tcp_fastopen: u32,
    /// Open client connections per worker; beyond it new ones are closed at once. Default 10000.
    pub max_connections: usize,
    /// In order, first match wins; no match answers 404. `upstream = "x"` and `respond = {..}`
    /// on the listener are shorthands for one route matching everything.
    pub routes: Vec<Route>,
    /// `[listener.tls]`: terminate TLS on this listener. Default: cleartext.
    pub tls: Option<Tls>,
    /// `mode = "tcp"`: forward bytes, not requests (`routes` is then empty). Default http.
    pub tcp: Option<TcpRoutes>,
    /// `proxy_protocol = { trusted = [..] }`: every connection starts with a PROXY protocol
    /// header (v1 or v2), taken only from these sources; a connection from anywhere else,
    /// or with no or a malformed header, is closed. The client address it carries stands for
    /// the peer's everywhere (X-Forwarded-For, balancing, logs). Default: off.
    pub proxy_protocol: Option<Vec<ipnet::IpNet>>,
    /// Tunnels (TCP mode, upgraded connections) move bytes with splice(2); false copies them
    /// through user space. Default true.
    pub splice: bool,
    /// TCP mode: a tunnel where no byte moves either way for this long is closed. Default
    /// 10 min (nginx's `proxy_timeout`).
    pub tcp_idle_timeout: Duration,
    /// HTTP/3 over QUIC on the same port number over UDP, with the same certificates; its
    /// HTTP/1.1 and HTTP/2 answers carry `Alt-Svc`. Default true on TLS listeners (false
    /// turns it off); only TLS listeners can have it.
    pub http3: bool,
    /// `mode = "feed"`: every connection publishes to, or subscribes to, this feed (raw
    /// TCP, TLS when [listener.tls] is set; `routes` is then empty).
    pub feed: Option<FeedEndpoint>,
    /// `mode = "orders"`: every connection is an order session of this desk (index into
    /// `Config::desks`): envelope frames over raw TCP, TLS when [listener.tls] is set.
    pub orders: Option<usize>,
}

/// Where a TCP-mode listener sends a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpRoutes {
    /// `[[listener.sni]]`, in order: a TLS client whose ClientHello names one of `names`
    /// (exact, or `*.example.com` for one label) goes to that upstream, its TLS untouched.
    pub sni: Vec<SniRoute>,
    /// `upstream`: everything else (no TLS, no SNI, no match); None: closed.
    pub default: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SniRoute {
    pub names: Vec<String>,
    /// Index into `Config::upstreams`.
    pub upstream: usize,
}

/// The PROXY protocol version an upstream is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyProtocol {
    V1,
    V2,
}

/// Lowest TLS version a listener accepts (TLS 1.0 and 1.1 never).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    Tls12,
    Tls13,
}

/// One certificate chain and key, and the server names it answers for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsCertificate {
    /// PEM certificate chain.
    pub cert: std::path::PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: std::path::PathBuf,
    /// SNI names (`a.example.com`, `*.example.com`); empty: only as the default.
    pub names: Vec<String>,
}

/// `[listener.tls]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    /// The first is the default, for clients without SNI or with an unknown name.
    pub certificates: Vec<TlsCertificate>,
    /// Default 1.2.
    pub min_version: TlsVersion,
    /// TLS 1.3 stateless session tickets with rotating keys. Default true (false when
    /// `early_data` is set).
    pub session_tickets: bool,
    /// Ticket keys from a file (one 64-hex-digit key per line; the first encrypts, all
    /// decrypt), so instances sharing the file resume each other's sessions. Default: random
    /// keys rotated in memory.
    pub ticket_keys: Option<std::path::PathBuf>,
    /// Stateful session cache entries; 0 turns it off. Default 1024.
    pub session_cache: usize,
    /// Most TLS 1.3 early (0-RTT) bytes accepted from a resuming client; 0 turns 0-RTT off.
    /// Needs the session cache and no tickets (rustls offers 0-RTT only on stateful
    /// resumption). Default 0.
    pub early_data: usize,
    /// `client_ca`: PEM roots that client certificates are verified against (mutual TLS);
    /// with `client_certificate = "optional"` a client without one is let in too. A verified
    /// certificate's subject common name is the client's identity (feed entitlements).
    /// Default: no client certificates asked for.
    pub client_auth: Option<ClientAuth>,
}

/// Client certificates on a TLS listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientAuth {
    pub ca: std::path::PathBuf,
    /// Clients without a certificate are refused in the handshake. Default true.
    pub required: bool,
}

/// TLS to an upstream's endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTls {
    /// Server name sent and verified. Default: the endpoint's IP address.
    pub sni: Option<String>,
    /// PEM roots to verify the upstream against. Default: the system's roots.
    pub ca: Option<std::path::PathBuf>,
    /// PEM client certificate chain and key, for upstreams that require mutual TLS.
    pub client: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

/// Upstream application protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    Http1,
    /// HTTP/2 cleartext with prior knowledge; one multiplexed connection per endpoint per worker.
    H2c,
    /// HTTP/3 over QUIC (needs `tls`); one multiplexed connection per endpoint per worker.
    H3,
}

/// `[[upstream]]`
#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    pub name: String,
    pub endpoints: Vec<Endpoint>,
    /// Default round robin.
    pub balance: Balance,
    /// Default none (endpoints are healthy until passive checks say otherwise).
    pub health_check: Option<HealthCheck>,
    pub passive: Passive,
    /// `[upstream.breaker]`. Default: none.
    pub breaker: Option<Breaker>,
    /// `[upstream.retry]`.
    pub retry: Retry,
    /// Default http1. `h2c` (or `h2`) is HTTP/2: cleartext with prior knowledge, or by ALPN
    /// over TLS.
    pub protocol: UpstreamProtocol,
    /// `tls = { .. }`: speak TLS to the endpoints. Default: cleartext.
    pub tls: Option<UpstreamTls>,
    /// Connect failure or timeout answers 502. Default 1 s.
    pub connect_timeout: Duration,
    /// No response head within this answers 504. Default 30 s.
    pub response_timeout: Duration,
    /// Idle pooled connections kept per endpoint per worker. Default 256.
    pub max_idle_per_host: usize,
    /// An idle pooled connection is closed after this. Default 30 s.
    pub idle_timeout: Duration,
    /// Connections opened per endpoint per worker at start. Default 0.
    pub prewarm: usize,
    /// Open connections per endpoint per worker; 0 is unlimited. Default 0.
    pub max_connections: usize,
    /// `proxy_protocol = "v1" | "v2"`: each connection opened to an endpoint starts with a
    /// PROXY protocol header naming the client. Such connections carry one client each: on
    /// HTTP/1.1 they are not pooled (one per request); HTTP/2 upstreams cannot have it.
    /// Default: off.
    pub proxy_protocol: Option<ProxyProtocol>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    runtime: RawRuntime,
    #[serde(default)]
    http: RawHttp,
    #[serde(default)]
    listener: Vec<RawListener>,
    #[serde(default)]
    upstream: Vec<RawUpstream>,
    admin: Option<RawAdmin>,
    access_log: Option<RawAccessLog>,
    #[serde(default)]
    http3: RawHttp3,
    #[serde(default)]
    feed: Vec<feed::RawFeed>,
    #[serde(default)]
    orders: Vec<orders::RawDesk>,
    log: Option<telemetry::RawLog>,
    tracing: Option<telemetry::RawTracing>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHttp3 {
    max_streams: Option<Spanned<i64>>,
    idle_timeout: Option<Spanned<String>>,
    keepalive_interval: Option<Spanned<String>>,
    early_data: Option<bool>,
    retry_threshold: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccessLog {
    path: Spanned<String>,
    buffer: Option<Spanned<RawSize>>,
    flush_interval: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    address: Spanned<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRuntime {
    workers: Option<Spanned<i64>>,
    io: Option<Spanned<String>>,
    drain_timeout: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    max_request_line: Option<Spanned<RawSize>>,
    max_header_bytes: Option<Spanned<RawSize>>,
    max_headers: Option<Spanned<i64>>,
    header_read_timeout: Option<Spanned<String>>,
    keepalive_timeout: Option<Spanned<String>>,
    send_timeout: Option<Spanned<String>>,
    body_timeout: Option<Spanned<String>>,
    request_timeout: Option<Spanned<String>>,
    body_min_rate: Option<Spanned<RawSize>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    address: Spanned<String>,
    backlog: Option<Spanned<i64>>,
    tcp_fastopen: Option<Spanned<i64>>,
    max_connections: Option<Spanned<i64>>,
    upstream: Option<Spanned<String>>,
    respond: Option<Spanned<route::RawRespond>>,
    #[serde(default)]
    route: Vec<route::RawRoute>,
    tls: Option<Spanned<RawTls>>,
    mode: Option<Spanned<String>>,
    splice: Option<bool>,
    tcp_idle_timeout: Option<Spanned<String>>,
    http3: Option<Spanned<bool>>,
    #[serde(default)]
    sni: Vec<RawSniRoute>,
    proxy_protocol: Option<Spanned<RawProxyIn>>,
    feed: Option<Spanned<String>>,
    role: Option<Spanned<String>>,
    orders: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSniRoute {
    names: Spanned<Vec<String>>,
    upstream: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProxyIn {
    trusted: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    certificates: Vec<RawTlsCertificate>,
    min_version: Option<String>,
    session_tickets: Option<bool>,
    ticket_keys: Option<String>,
    early_data: Option<RawSize>,
    session_cache: Option<i64>,
    client_ca: Option<String>,
    client_certificate: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTlsCertificate {
    cert: String,
    key: String,
    #[serde(default)]
    names: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    name: Spanned<String>,
    endpoints: Spanned<Vec<Spanned<balance::RawEndpoint>>>,
    balance: Option<Spanned<String>>,
    hash_key: Option<Spanned<balance::RawHashKey>>,
    health_check: Option<Spanned<balance::RawHealthCheck>>,
    passive: Option<Spanned<balance::RawPassive>>,
    breaker: Option<Spanned<breaker::RawBreaker>>,
    retry: Option<Spanned<breaker::RawRetry>>,
    protocol: Option<Spanned<String>>,
    connect_timeout: Option<Spanned<String>>,
    response_timeout: Option<Spanned<String>>,
    max_idle_per_host: Option<Spanned<i64>>,
    idle_timeout: Option<Spanned<String>>,
    prewarm: Option<Spanned<i64>>,
    max_connections: Option<Spanned<i64>>,
    tls: Option<Spanned<RawUpstreamTls>>,
    proxy_protocol: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstreamTls {
    sni: Option<String>,
    ca: Option<String>,
    client_cert: Option<String>,
    client_key: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(crate) enum RawSize {
    Bytes(i64),
    Text(String),
}

/// Turns spans into line numbers and builds errors that name the key.
pub(crate) struct Source<'a>(&'a str);

impl Source<'_> {
    fn line_of(&self, offset: usize) -> usize {
        self.0[..offset.min(self.0.len())]
            .bytes()
            .filter(|&b| b == b'\n')
            .count()
            + 1
    }

    fn invalid<T>(&self, key: String, at: &Spanned<T>, reason: impl Into<String>) -> ConfError {
        ConfError::Invalid {
            key,
            line: self.line_of(at.span().start),
            reason: reason.into(),
        }
    }

    fn count(
        &self,
        key: impl Fn() -> String,
        v: &Option<Spanned<i64>>,
        default: usize,
        min: i64,
        max: i64,
    ) -> Result<usize, ConfError> {
        match v {
            None => Ok(default),
            Some(s) if (min..=max).contains(s.get_ref()) => Ok(*s.get_ref() as usize),
            Some(s) => Err(self.invalid(key(), s, format!("must be between {min} and {max}"))),
        }
    }

    fn duration(
        &self,
        key: impl Fn() -> String,
        v: &Option<Spanned<String>>,
        default: Duration,
    ) -> Result<Duration, ConfError> {
        match v {
            None => Ok(default),
            Some(s) => parse_duration(s.get_ref())
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    self.invalid(
                        key(),
                        s,
                        format!(
                            "{:?} is not a positive duration (e.g. \"250ms\", \"10s\", \"2m\")",
                            s.get_ref()
                        ),
                    )
                }),
        }
    }

    fn size(
        &self,
        key: impl Fn() -> String,
        v: &Option<Spanned<RawSize>>,
        default: usize,
        min: usize,
    ) -> Result<usize, ConfError> {
        let Some(s) = v else { return Ok(default) };
        let n = match s.get_ref() {
            RawSize::Bytes(n) => usize::try_from(*n).ok(),
            RawSize::Text(t) => parse_size(t),
        };
        match n {
            Some(n) if n >= min && n <= 1 << 30 => Ok(n),
            _ => Err(self.invalid(
                key(),
                s,
                format!("must be a size from {min} bytes to 1GiB (e.g. 8192, \"8KiB\")"),
            )),
        }
    }

    fn addr(&self, key: String, v: &Spanned<String>) -> Result<SocketAddr, ConfError> {
        v.get_ref().parse().map_err(|_| {
            self.invalid(
                key,
                v,
                format!("{:?} is not an IP:port address", v.get_ref()),
            )
        })
    }
}

/// The desk (by index into `Config::desks`) a listener or route names.
fn desk_index(
    src: &Source<'_>,
    key: String,
    name: &Spanned<String>,
    desks: &[&str],
) -> Result<usize, ConfError> {
    desks
        .iter()
        .position(|d| d == name.get_ref())
        .ok_or_else(|| {
            src.invalid(
                key,
                name,
                format!("no [[orders]] named {:?}", name.get_ref()),
            )
        })
}

fn tls_settings(src: &Source<'_>, key: &str, t: &Spanned<RawTls>) -> Result<Tls, ConfError> {
    let r = t.get_ref();
    if r.certificates.is_empty() {
        return Err(src.invalid(
            format!("{key}.certificates"),
            t,
            "needs at least one certificate",
        ));
    }
    let min_version = match r.min_version.as_deref() {
        None | Some("1.2") => TlsVersion::Tls12,
        Some("1.3") => TlsVersion::Tls13,
        Some(v) => {
            return Err(src.invalid(
                format!("{key}.min_version"),
                t,
                format!("{v:?}: \"1.2\" or \"1.3\" (1.0 and 1.1 are never offered)"),
            ))
        }
    };
    let session_cache = match r.session_cache {
        None => 1024,
        Some(n) if (0..=1 << 20).contains(&n) => n as usize,
        Some(_) => {
            return Err(src.invalid(format!("{key}.session_cache"), t, "must be 0..=1048576"))
        }
    };
    let early_data = match &r.early_data {
        None => Some(0),
        Some(RawSize::Bytes(n)) => usize::try_from(*n).ok().filter(|n| *n <= 1 << 20),
        Some(RawSize::Text(t)) => parse_size(t).filter(|n| *n <= 1 << 20),
    }
    .map_or_else(
        || Err(src.invalid(format!("{key}.early_data"), t, "a size up to 1MiB")),
        Ok,
    )?;
    let session_tickets = r.session_tickets.unwrap_or(early_data == 0);
    if early_data > 0 && (session_cache == 0 || session_tickets || r.ticket_keys.is_some()) {
        return Err(src.invalid(
            format!("{key}.early_data"),
            t,
            "0-RTT needs the session cache and no session tickets (rustls offers it only on stateful resumption)",
        ));
    }
    let client_auth = match (&r.client_ca, r.client_certificate.as_deref()) {
        (None, None) => None,
        (None, Some(_)) => {
            return Err(src.invalid(
                format!("{key}.client_certificate"),
                t,
                "needs `client_ca` (the roots client certificates are verified against)",
            ))
        }
        (Some(ca), how) => Some(ClientAuth {
            ca: ca.into(),
            required: match how {
                None | Some("required") => true,
                Some("optional") => false,
                Some(other) => {
                    return Err(src.invalid(
                        format!("{key}.client_certificate"),
                        t,
                        format!("{other:?}: \"required\" or \"optional\""),
                    ))
                }
            },
        }),
    };
    Ok(Tls {
        early_data,
        client_auth,
        certificates: r
            .certificates
            .iter()
            .map(|c| TlsCertificate {
                cert: c.cert.clone().into(),
                key: c.key.clone().into(),
                names: c.names.iter().map(|n| n.to_ascii_lowercase()).collect(),
            })
            .collect(),
        min_version,
        session_tickets,
        ticket_keys: r.ticket_keys.as_ref().map(Into::into),
        session_cache,
    })
}

/// Parses "250ms", "10s", "2m", "1h".
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    match unit.trim() {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        "h" => n.checked_mul(3600).map(Duration::from_secs),
        _ => None,
    }
}

/// Parses "512", "8KiB", "1MiB" (also "8k", "1m").
pub fn parse_size(s: &str) -> Option<usize> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: usize = num.parse().ok()?;
    let mul = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        _ => return None,
    };
    n.checked_mul(mul)
}

impl Config {
    /// Reads and validates a TOML file.
    pub fn from_file(path: &Path) -> Result<Config, ConfError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::from_toml(&text)
    }

    /// The embedded default (see `DEFAULT_TOML`).
    pub fn embedded_default() -> Config {
        Config::from_toml(DEFAULT_TOML).expect("the embedded default config is valid")
    }

    /// Parses and validates TOML text.
    pub fn from_toml(text: &str) -> Result<Config, ConfError> {
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| ConfError::Syntax(e.to_string().trim().to_owned()))?;
        Config::build(raw, &Source(text))
    }

    fn build(raw: RawConfig, src: &Source<'_>) -> Result<Config, ConfError> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let workers = match src.count(
            || "runtime.workers".into(),
            &raw.runtime.workers,
            0,
            0,
            1024,
        )? {
            0 => cores,
            n => n,
        };
        let io = match &raw.runtime.io {
            None => IoMode::Auto,
            Some(s) => s
                .get_ref()
                .parse()
                .map_err(|e: String| src.invalid("runtime.io".into(), s, e))?,
        };
        let h = &raw.http;
        let http = HttpLimits {
            max_request_line: src.size(
                || "http.max_request_line".into(),
                &h.max_request_line,
                8 << 10,
                64,
            )?,
            max_header_bytes: src.size(
                || "http.max_header_bytes".into(),
                &h.max_header_bytes,
                32 << 10,
                8 << 10,
            )?,
            max_headers: src.count(|| "http.max_headers".into(), &h.max_headers, 100, 1, 10_000)?,
            header_read_timeout: src.duration(
                || "http.header_read_timeout".into(),
                &h.header_read_timeout,
                Duration::from_secs(10),
            )?,
            keepalive_timeout: src.duration(
                || "http.keepalive_timeout".into(),
                &h.keepalive_timeout,
                Duration::from_secs(60),
            )?,
            send_timeout: src.duration(
                || "http.send_timeout".into(),
                &h.send_timeout,
                Duration::from_secs(20),
            )?,
            body_timeout: src.duration(
                || "http.body_timeout".into(),
                &h.body_timeout,
                Duration::from_secs(20),
            )?,
            request_timeout: match &h.request_timeout {
                None => None,
                Some(_) => Some(src.duration(
                    || "http.request_timeout".into(),
                    &h.request_timeout,
                    Duration::ZERO,
                )?),
            },
            body_min_rate: match &h.body_min_rate {
                None => None,
                Some(_) => {
                    Some(src.size(|| "http.body_min_rate".into(), &h.body_min_rate, 0, 1)? as u64)
                }
            },
        };

        let mut upstreams = Vec::with_capacity(raw.upstream.len());
        for (i, u) in raw.upstream.iter().enumerate() {
            let key = |k: &str| format!("upstream[{i}].{k}");
            let name = u.name.get_ref().clone();
            if name.is_empty() {
                return Err(src.invalid(key("name"), &u.name, "must not be empty"));
            }
            if upstreams.iter().any(|x: &Upstream| x.name == name) {
                return Err(src.invalid(
                    key("name"),
                    &u.name,
                    format!("duplicate upstream {name:?}"),
                ));
            }
            let ukey = format!("upstream[{i}]");
            let endpoints = balance::endpoints(src, &ukey, &u.endpoints)?;
            let balance = balance::balance(src, &ukey, &u.balance, &u.hash_key)?;
            let health_check = balance::health_check(src, &ukey, &u.health_check)?;
            let passive = balance::passive(src, &ukey, &u.passive)?;
            let protocol = match &u.protocol {
                None => UpstreamProtocol::Http1,
                Some(p) => match p.get_ref().as_str() {
                    "http1" => UpstreamProtocol::Http1,
                    "h2c" | "h2" => UpstreamProtocol::H2c,
                    "h3" => UpstreamProtocol::H3,
                    other => {
                        return Err(src.invalid(
                            key("protocol"),
                            p,
                            format!("unknown protocol {other:?} (http1, h2c, h2 or h3)"),
                        ))
                    }
                },
            };
            let tls = match &u.tls {
                None => None,
                Some(t) => {
                    let r = t.get_ref();
                    let client = match (&r.client_cert, &r.client_key) {
                        (Some(c), Some(k)) => Some((c.into(), k.into())),
                        (None, None) => None,
                        _ => {
                            return Err(src.invalid(
                                key("tls"),
                                t,
                                "client_cert and client_key go together",
                            ))
                        }
                    };
                    if u.health_check.is_some() {
                        return Err(src.invalid(
                            key("health_check"),
                            t,
                            "active health checks speak cleartext HTTP: not available with `tls` yet",
                        ));
                    }
                    Some(UpstreamTls {
                        sni: r.sni.clone(),
                        ca: r.ca.as_ref().map(Into::into),
                        client,
                    })
                }
            };
            let proxy_protocol = match &u.proxy_protocol {
                None => None,
                Some(v) => Some(match v.get_ref().as_str() {
                    "v1" => ProxyProtocol::V1,
                    "v2" => ProxyProtocol::V2,
                    other => {
                        return Err(src.invalid(
                            key("proxy_protocol"),
                            v,
                            format!("unknown PROXY protocol version {other:?} (v1 or v2)"),
                        ))
                    }
                }),
            };
            if protocol == UpstreamProtocol::H3 && u.tls.is_none() {
                return Err(src.invalid(
                    key("protocol"),
                    u.protocol.as_ref().expect("set"),
                    "HTTP/3 runs over QUIC, always encrypted: add tls = { .. } (`{}` for the \
                     system roots)",
                ));
            }
            if proxy_protocol.is_some() && protocol != UpstreamProtocol::Http1 {
                return Err(src.invalid(
                    key("proxy_protocol"),
                    u.proxy_protocol.as_ref().expect("set"),
                    "an HTTP/2 connection is shared by every client: no PROXY header fits it \
                     (use protocol = \"http1\" or a tcp listener)",
                ));
            }
            upstreams.push(Upstream {
                proxy_protocol,
                tls,
                name,
                endpoints,
                balance,
                health_check,
                passive,
                breaker: match &u.breaker {
                    None => None,
                    Some(b) => Some(breaker::build(src, &key("breaker"), b)?),
                },
                retry: breaker::retry(src, &key("retry"), &u.retry)?,
                protocol,
                connect_timeout: src.duration(
                    || key("connect_timeout"),
                    &u.connect_timeout,
                    Duration::from_secs(1),
                )?,
                response_timeout: src.duration(
                    || key("response_timeout"),
                    &u.response_timeout,
                    Duration::from_secs(30),
                )?,
                max_idle_per_host: src.count(
                    || key("max_idle_per_host"),
                    &u.max_idle_per_host,
                    256,
                    0,
                    1 << 20,
                )?,
                idle_timeout: src.duration(
                    || key("idle_timeout"),
                    &u.idle_timeout,
                    Duration::from_secs(30),
                )?,
                prewarm: src.count(|| key("prewarm"), &u.prewarm, 0, 0, 1024)?,
                max_connections: src.count(
                    || key("max_connections"),
                    &u.max_connections,
                    0,
                    0,
                    1 << 20,
                )?,
            });
        }

        // Fallbacks name upstreams, any of them: resolved once all are known.
        for (i, u) in raw.upstream.iter().enumerate() {
            let Some(name) = u
                .breaker
                .as_ref()
                .and_then(|b| b.get_ref().fallback.as_ref())
            else {
                continue;
            };
            let key = format!("upstream[{i}].breaker.fallback");
            let f = route::upstream_index(src, key.clone(), name, &upstreams)?;
            if f == i {
                return Err(src.invalid(key, name, "an upstream is not its own fallback"));
            }
            if let Some(b) = upstreams[i].breaker.as_mut() {
                b.fallback = Some(f);
            }
        }
        let feeds = feed::build(src, &raw.feed)?;
        let desks = orders::build(src, &raw.orders, &upstreams, &feeds)?;
        let desk_names: Vec<&str> = desks.iter().map(|d| d.name.as_str()).collect();
        let mut listeners = Vec::with_capacity(raw.listener.len());
        for (i, l) in raw.listener.iter().enumerate() {
            let key = |k: &str| format!("listener[{i}].{k}");
            let address = src.addr(key("address"), &l.address)?;
            if listeners
                .iter()
                .any(|x: &Listener| x.address == address && address.port() != 0)
            {
                return Err(src.invalid(
                    key("address"),
                    &l.address,
                    format!("{address} is already a listener"),
                ));
            }
            let (tcp, feed, order_mode) = match l.mode.as_ref().map(|m| m.get_ref().as_str()) {
                None | Some("http") => (false, false, false),
                Some("tcp") => (true, false, false),
                Some("feed") => (false, true, false),
                Some("orders") => (false, false, true),
                Some(other) => {
                    return Err(src.invalid(
                        key("mode"),
                        l.mode.as_ref().expect("mode is set"),
                        format!("unknown mode {other:?} (http, tcp, feed or orders)"),
                    ))
                }
            };
            let orders = match (&l.orders, order_mode) {
                (Some(name), true) => {
                    if l.respond.is_some() || !l.route.is_empty() || l.upstream.is_some() {
                        return Err(src.invalid(
                            key("mode"),
                            l.mode.as_ref().expect("mode is set"),
                            "an orders listener takes `orders`, not `upstream`, `respond` or [[listener.route]]",
                        ));
                    }
                    Some(desk_index(src, key("orders"), name, &desk_names)?)
                }
                (None, true) => {
                    return Err(src.invalid(
                        key("mode"),
                        l.mode.as_ref().expect("mode is set"),
                        "an orders listener needs `orders = \"NAME\"`",
                    ))
                }
                (Some(o), false) => {
                    return Err(src.invalid(
                        key("orders"),
                        o,
                        "`orders` is for mode = \"orders\" (HTTP listeners take orders on routes)",
                    ))
                }
                (None, false) => None,
            };
            let feed = match (&l.feed, feed) {
                (Some(name), true) => {
                    if l.respond.is_some() || !l.route.is_empty() || l.upstream.is_some() {
                        return Err(src.invalid(
                            key("mode"),
                            l.mode.as_ref().expect("mode is set"),
                            "a feed listener takes `feed` and `role`, not `upstream`, `respond` or [[listener.route]]",
                        ));
                    }
                    Some(FeedEndpoint {
                        feed: feed::feed_index(src, key("feed"), name, &feeds)?,
                        role: feed::role(src, key("role"), l.role.as_ref())?,
                    })
                }
                (None, true) => {
                    return Err(src.invalid(
                        key("mode"),
                        l.mode.as_ref().expect("mode is set"),
                        "a feed listener needs `feed = \"NAME\"`",
                    ))
                }
                (Some(f), false) => {
                    return Err(src.invalid(
                        key("feed"),
                        f,
                        "`feed` is for mode = \"feed\" (HTTP listeners serve feeds on routes)",
                    ))
                }
                (None, false) => None,
            };
            if !tcp && !l.sni.is_empty() {
                return Err(src.invalid(
                    key("address"),
                    &l.address,
                    "[[listener.sni]] is for mode = \"tcp\" (HTTP listeners route with [[listener.route]])",
                ));
            }
            let proxy_protocol = match &l.proxy_protocol {
                None => None,
                Some(p) => {
                    let mut nets = Vec::new();
                    for (j, t) in p.get_ref().trusted.iter().enumerate() {
                        let text = t.get_ref();
                        let net = text
                            .parse::<ipnet::IpNet>()
                            .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                            .map_err(|_| {
                                src.invalid(
                                    key(&format!("proxy_protocol.trusted[{j}]")),
                                    t,
                                    format!("{text:?} is not an address or CIDR block"),
                                )
                            })?;
                        nets.push(net);
                    }
                    if nets.is_empty() {
                        return Err(src.invalid(
                            key("proxy_protocol.trusted"),
                            p,
                            "list at least one trusted source",
                        ));
                    }
                    Some(nets)
                }
            };
            let tcp = if tcp {
                if l.tls.is_some() || l.respond.is_some() || !l.route.is_empty() {
                    return Err(src.invalid(
                        key("mode"),
                        l.mode.as_ref().expect("mode is set"),
                        "a tcp listener forwards bytes: it takes `upstream` and [[listener.sni]], \
                         not [listener.tls], `respond` or [[listener.route]]",
                    ));
                }
                // Bytes go to an upstream as they came: it cannot add TLS of its own.
                let plain = |k: String, name: &Spanned<String>| {
                    let i = route::upstream_index(src, k.clone(), name, &upstreams)?;
                    match upstreams[i].tls {
                        Some(_) => Err(src.invalid(
                            k,
                            name,
                            "a tcp listener's upstream cannot have `tls` (TLS passes through)",
                        )),
                        None => Ok(i),
                    }
                };
                let default = match &l.upstream {
                    None => None,
                    Some(name) => Some(plain(key("upstream"), name)?),
                };
                let mut sni = Vec::new();
                for (j, r) in l.sni.iter().enumerate() {
                    let k = key(&format!("sni[{j}]"));
                    if r.names.get_ref().is_empty() {
                        return Err(src.invalid(
                            format!("{k}.names"),
                            &r.names,
                            "list at least one name",
                        ));
                    }
                    sni.push(SniRoute {
                        names: r
                            .names
                            .get_ref()
                            .iter()
                            .map(|n| n.to_ascii_lowercase())
                            .collect(),
                        upstream: plain(format!("{k}.upstream"), &r.upstream)?,
                    });
                }
                if default.is_none() && sni.is_empty() {
                    return Err(src.invalid(
                        key("address"),
                        &l.address,
                        "a tcp listener needs `upstream` or [[listener.sni]]",
                    ));
                }
                Some(TcpRoutes { sni, default })
            } else {
                None
            };
            let routes = match (&l.upstream, &l.respond, l.route.is_empty()) {
                _ if tcp.is_some() || feed.is_some() || orders.is_some() => Vec::new(),
                (Some(name), None, true) => vec![route::catch_all(RouteAction::Forward(
                    route::upstream_index(src, key("upstream"), name, &upstreams)?,
                ))],
                (None, Some(r), true) => {
                    vec![route::catch_all(route::respond_action(
                        src,
                        &key("respond"),
                        r,
                    )?)]
                }
                (None, None, false) => l
                    .route
                    .iter()
                    .enumerate()
                    .map(|(j, r)| {
                        let at = key(&format!("route[{j}]"));
                        route::build(src, &at, j, r, &upstreams, &feeds, &desk_names)
                    })
                    .collect::<Result<_, _>>()?,
                _ => {
                    return Err(src.invalid(
                        key("address"),
                        &l.address,
                        "needs exactly one of `upstream`, `respond` or [[listener.route]]",
                    ))
                }
            };
            listeners.push(Listener {
                address,
                backlog: src.count(|| key("backlog"), &l.backlog, 4096, 1, 65535)? as u32,
                tcp_fastopen: src.count(|| key("tcp_fastopen"), &l.tcp_fastopen, 256, 0, 65535)?
                    as u32,
                max_connections: src.count(
                    || key("max_connections"),
                    &l.max_connections,
                    10_000,
                    1,
                    1 << 24,
                )?,
                routes,
                tls: match &l.tls {
                    None => None,
                    Some(t) => Some(tls_settings(src, &key("tls"), t)?),
                },
                tcp,
                proxy_protocol,
                splice: l.splice.unwrap_or(true),
                tcp_idle_timeout: src.duration(
                    || key("tcp_idle_timeout"),
                    &l.tcp_idle_timeout,
                    Duration::from_secs(600),
                )?,
                http3: match &l.http3 {
                    Some(h) if *h.get_ref() && l.tls.is_none() => {
                        return Err(src.invalid(
                            key("http3"),
                            h,
                            "HTTP/3 needs [listener.tls] (QUIC is always encrypted)",
                        ))
                    }
                    Some(h) if *h.get_ref() && (feed.is_some() || orders.is_some()) => {
                        return Err(src.invalid(
                            key("http3"),
                            h,
                            "a feed or orders listener is not HTTP",
                        ))
                    }
                    Some(h) => *h.get_ref(),
                    None => l.tls.is_some() && feed.is_none() && orders.is_none(),
                },
                feed,
                orders,
            });
        }
        if listeners.is_empty() {
            return Err(ConfError::Invalid {
                key: "listener".into(),
                line: 1,
                reason: "at least one [[listener]] is required".into(),
            });
        }
        Ok(Config {
            runtime: Runtime {
                workers,
                io,
                drain_timeout: src.duration(
                    || "runtime.drain_timeout".into(),
                    &raw.runtime.drain_timeout,
                    Duration::from_secs(30),
                )?,
            },
            http,
            listeners,
            upstreams,
            admin: match &raw.admin {
                None => None,
                Some(a) => Some(src.addr("admin.address".into(), &a.address)?),
            },
            http3: Http3 {
                max_streams: src.count(
                    || "http3.max_streams".into(),
                    &raw.http3.max_streams,
                    100,
                    1,
                    10_000,
                )? as u32,
                idle_timeout: src.duration(
                    || "http3.idle_timeout".into(),
                    &raw.http3.idle_timeout,
                    Duration::from_secs(30),
                )?,
                keepalive_interval: src.duration(
                    || "http3.keepalive_interval".into(),
                    &raw.http3.keepalive_interval,
                    Duration::from_secs(10),
                )?,
                early_data: raw.http3.early_data.unwrap_or(false),
                retry_threshold: src.count(
                    || "http3.retry_threshold".into(),
                    &raw.http3.retry_threshold,
                    256,
                    0,
                    1 << 20,
                )?,
            },
            feeds,
            desks,
            log: telemetry::log(src, &raw.log)?,
            tracing: telemetry::tracing(src, &raw.tracing)?,
            access_log: match &raw.access_log {
                None => None,
                Some(a) => {
                    if a.path.get_ref().is_empty() {
                        return Err(src.invalid(
                            "access_log.path".into(),
                            &a.path,
                            "must not be empty",
                        ));
                    }
                    Some(AccessLog {
                        path: a.path.get_ref().into(),
                        buffer: src.size(|| "access_log.buffer".into(), &a.buffer, 64 << 10, 0)?,
                        flush_interval: src.duration(
                            || "access_log.flush_interval".into(),
                            &a.flush_interval,
                            Duration::from_secs(1),
                        )?,
                    })
                }
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn examples_parse() {
        let d = Config::embedded_default();
        assert_eq!(d.listeners.len(), 2);
        assert!(matches!(
            d.listeners[0].routes[0].action,
            RouteAction::Forward(0)
        ));
        let full = Config::from_toml(include_str!("../examples/full.toml")).unwrap();
        assert_eq!(full.runtime.workers, 2);
        assert_eq!(full.http.max_request_line, 8192);
        assert_eq!(full.upstreams[0].prewarm, 4);
        assert_eq!(full.upstreams[0].idle_timeout, Duration::from_secs(30));
        let fan = Config::from_toml(include_str!("../examples/fanout.toml")).unwrap();
        let md = &fan.feeds[0];
        assert_eq!((md.queue_bytes, md.replay), (4 << 20, 1024));
        assert!(md.groups["majors"].contains(42) && !md.groups["majors"].contains(11));
        assert!(md.entitle[0].instruments.contains(150));
        assert_eq!(
            fan.listeners[0].feed,
            Some(FeedEndpoint {
                feed: 0,
                role: FeedRole::Publish
            })
        );
        assert!(matches!(
            fan.listeners[2].routes[0].action,
            RouteAction::Feed(FeedEndpoint {
                feed: 0,
                role: FeedRole::Subscribe
            })
        ));
    }

    /// Each config text (after a listener of its own) is refused, naming its key.
    fn refused_at(cases: &[(String, &str)]) {
        for (text, key) in cases {
            let err = Config::from_toml(&format!(
                "[[listener]]\naddress = \"127.0.0.1:1\"\nrespond = {{ status = 200 }}\n{text}"
            ))
            .unwrap_err()
            .to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
    }

    #[test]
    fn log_and_tracing_settings_are_checked() {
        let cases: Vec<(String, &str)> = [
            ("[log]\nlevel = \"loud\"", "log.level"),
            ("[log]\nformat = \"xml\"", "log.format"),
            (
                "[log]\nfilter = \"fluxgate::upstream=chatty\"",
                "log.filter",
            ),
            ("[log]\nfilter = \"bad target=info\"", "log.filter"),
            ("[log]\nrepeats = -1", "log.repeats"),
            (
                "[tracing]\nendpoint = \"127.0.0.1:4318\"",
                "tracing.endpoint",
            ),
            (
                "[tracing]\nendpoint = \"http://collector/v1/traces\"",
                "tracing.endpoint",
            ),
            (
                "[tracing]\nendpoint = \"http://127.0.0.1:4318/v1/traces\"\nsample = 1.5",
                "tracing.sample",
            ),
            (
                "[tracing]\nendpoint = \"http://127.0.0.1:4318/v1/traces\"\nbatch = 0",
                "tracing.batch",
            ),
        ]
        .into_iter()
        .map(|(t, k)| (t.to_owned(), k))
        .collect();
        refused_at(&cases);
        let l = "[[listener]]\naddress = \"127.0.0.1:1\"\nrespond = { status = 200 }\n";
        let c = Config::from_toml(&format!(
            "{l}[log]\nlevel = \"warn\"\nfilter = \"fluxgate::upstream=debug\"\nformat = \"json\"\n\
             [tracing]\nendpoint = \"http://127.0.0.1:4318/v1/traces\"\nsample = 0.25\n"
        ))
        .unwrap();
        assert_eq!(c.log.directives, "warn,fluxgate::upstream=debug");
        assert_eq!(c.log.format, LogFormat::Json);
        let t = c.tracing.unwrap();
        assert_eq!((t.sample, t.parent_based, t.batch), (0.25, true, 512));
        let d = Config::from_toml(l).unwrap();
        assert_eq!((d.log, d.tracing), (Log::default(), None));
    }

    #[test]
    fn rate_limit_errors_name_the_key() {
        let route = |rl: &str| {
            format!("[[listener]]\naddress = \"127.0.0.1:0\"\n[[listener.route]]\nrespond = {{ status = 200 }}\nrate_limit = {rl}\n")
        };
        let cases = [
            (
                route("{ rate = 0 }"),
                "listener[1].route[0].rate_limit.rate",
            ),
            (
                route("{ rate = 5, burst = 0 }"),
                "listener[1].route[0].rate_limit.burst",
            ),
            (
                route("{ rate = 5, key = \"ip\" }"),
                "listener[1].route[0].rate_limit.key",
            ),
            (
                route("{ rate = 5, key = \"header:bad name\" }"),
                "listener[1].route[0].rate_limit.key",
            ),
            (
                route("{ rate = 5, redis = \"127.0.0.1:6379\" }"),
                "listener[1].route[0].rate_limit.redis",
            ),
            (
                route("{ rate = 5, redis = \"localhost\" }"),
                "listener[1].route[0].rate_limit.redis",
            ),
        ];
        refused_at(&cases);
        let c = Config::from_toml(&route("{ rate = 2.5 }")).unwrap();
        let rl = c.listeners[0].routes[0].rate_limit.as_ref().unwrap();
        assert_eq!((rl.burst, &rl.key), (3, &RateKey::Client));
    }

    #[test]
    fn breaker_errors_name_the_key() {
        let up = |b: &str| {
            format!("[[upstream]]\nname = \"a\"\nendpoints = [\"127.0.0.1:9\"]\n[upstream.breaker]\n{b}\n")
        };
        let cases = [
            (up("error_rate = 1.5"), "upstream[0].breaker.error_rate"),
            (up("window = \"soon\""), "upstream[0].breaker.window"),
            (
                up("half_open_probes = 0"),
                "upstream[0].breaker.half_open_probes",
            ),
            (up("status = 200"), "upstream[0].breaker.status"),
            (up("fallback = \"nope\""), "upstream[0].breaker.fallback"),
            (up("fallback = \"a\""), "upstream[0].breaker.fallback"),
            (
                up("").replace("breaker", "retry") + "attempts = 0\n",
                "upstream[0].retry.attempts",
            ),
            (
                up("").replace("breaker", "retry") + "budget = 1.5\n",
                "upstream[0].retry.budget",
            ),
            (
                up("").replace("breaker", "retry") + "backoff = \"x\"\n",
                "upstream[0].retry.backoff",
            ),
        ];
        refused_at(&cases);
    }

    #[test]
    fn split_errors_name_the_key() {
        let ups = "[[upstream]]\nname = \"a\"\nendpoints = [\"127.0.0.1:9\"]\n\
                   [[upstream]]\nname = \"b\"\nendpoints = [\"127.0.0.1:9\"]\n";
        let route = |split: &str| {
            format!("{ups}[[listener]]\naddress = \"127.0.0.1:0\"\n[[listener.route]]\nsplit = {split}\n")
        };
        let two = "targets = [{ upstream = \"a\", weight = 1 }, { upstream = \"b\", weight = 1 }]";
        let cases = [
            (route("{ targets = [{ upstream = \"a\", weight = 1 }] }"), "listener[1].route[0].split.targets"),
            (route("{ targets = [{ upstream = \"a\", weight = 0 }, { upstream = \"b\", weight = 0 }] }"), "listener[1].route[0].split.targets"),
            (route("{ targets = [{ upstream = \"a\", weight = 1 }, { upstream = \"c\", weight = 1 }] }"), "listener[1].route[0].split.targets[1].upstream"),
            (route("{ targets = [{ upstream = \"a\", weight = 1 }, { upstream = \"a\", weight = 1 }] }"), "listener[1].route[0].split.targets[1].upstream"),
            (route("{ targets = [{ upstream = \"a\", weight = -1 }, { upstream = \"b\", weight = 1 }] }"), "listener[1].route[0].split.targets[0].weight"),
            (route(&format!("{{ {two}, sticky_header = \"bad header\" }}")), "listener[1].route[0].split.sticky_header"),
            (route(&format!("{{ {two}, force_cookie = \"a=b\" }}")), "listener[1].route[0].split.force_cookie"),
            (route(&format!("{{ {two}, sticky_header = \"x\", sticky_cookie = \"y\" }}")), "listener[1].route[0].split.sticky_header"),
            (route(&format!("{{ {two}, rollback = {{ p95 = \"1s\" }} }}")), "listener[1].route[0].split.rollback"),
            (route("{ targets = [{ upstream = \"a\", weight = 1 }, { upstream = \"b\", weight = 1, canary = true }] }"), "listener[1].route[0].split.targets"),
            (route("{ targets = [{ upstream = \"a\", weight = 1 }, { upstream = \"b\", weight = 1, canary = true }], rollback = { error_rate = 2.0 } }"), "listener[1].route[0].split.rollback.error_rate"),
            (route("{ targets = [{ upstream = \"a\", weight = 1 }, { upstream = \"b\", weight = 1, canary = true }], rollback = { window = \"0s\" } }"), "listener[1].route[0].split.rollback.window"),
        ];
        refused_at(&cases);
        let ok =
            Config::from_toml(&route(&format!("{{ {two}, sticky_cookie = \"uid\" }}"))).unwrap();
        let RouteAction::Split(s) = &ok.listeners[0].routes[0].action else {
            panic!("a split route")
        };
        assert_eq!(s.sticky, Some(KeySource::Cookie("uid".into())));
        assert_eq!(s.targets[1].name, "b");
    }

    #[test]
    fn the_orders_example_parses() {
        let c = Config::from_toml(include_str!("../examples/orders.toml")).unwrap();
        let d = &c.desks[0];
        assert_eq!((d.upstream, d.feed, d.session_in_flight), (0, Some(0), 64));
        assert_eq!(d.instruments[0].reference_e4, Some(1_000_000));
        assert_eq!(d.instruments[1].tick_e4, 2500);
        assert!(d.routes[0].matches(1500, b"anyone") && !d.routes[0].matches(15, b"anyone"));
        assert_eq!(d.accounts[0].price_band_bps, 500);
        assert_eq!(d.accounts[1].burst, 10);
        assert_eq!(d.journal.as_ref().unwrap().segment_size, 64 << 20);
        assert_eq!(c.listeners[1].orders, Some(0));
        assert!(matches!(
            c.listeners[2].routes[0].action,
            RouteAction::Orders(0)
        ));
    }

    #[test]
    fn orders_errors_name_the_key() {
        let up = "[[upstream]]\nname = \"oms\"\nendpoints = [\"127.0.0.1:9\"]\n";
        let desk = format!("{up}[[orders]]\nname = \"d\"\nupstream = \"oms\"\n");
        let inst = "[[orders.instrument]]\nids = [\"1-9\"]\ntick = 0.01\n";
        let acct = "[[orders.account]]\nname = \"a\"\nmax_quantity = 1\nmax_notional = 1.0\nrate = 1\nmax_open = 1\n";
        let cases = [
            (format!("{up}[[orders]]\nname = \"d\"\nupstream = \"nope\"\n{inst}"), "orders[0].upstream"),
            (desk.clone(), "orders[0].name"),
            (format!("{desk}[[orders.instrument]]\nids = [\"1-9\"]\ntick = 0.00001\n"), "orders[0].instrument[0].tick"),
            (format!("{desk}[[orders.instrument]]\nids = [\"9-1\"]\ntick = 0.01\n"), "orders[0].instrument[0].ids"),
            (format!("{desk}[[orders.instrument]]\nids = [\"1\"]\ntick = 0.05\nreference_price = 1.01\n"), "orders[0].instrument[0].reference_price"),
            (format!("{desk}[[orders.instrument]]\nids = [\"*\"]\ntick = 0.01\n"), "orders[0].instrument[0].ids"),
            (format!("{desk}{inst}{acct}{acct}"), "orders[0].account[1].name"),
            (format!("{desk}{inst}{}", acct.replace("rate = 1", "rate = 0")), "orders[0].account[0].rate"),
            (format!("{desk}{inst}{}", acct.replace("max_open = 1", "max_open = 0")), "orders[0].account[0].max_open"),
            (format!("{desk}{inst}{acct}price_band = 2.0\n"), "orders[0].account[0].price_band"),
            (format!("{desk}{inst}[[orders.route]]\nupstream = \"oms\"\n"), "orders[0].route[0]"),
            (format!("{desk}order_path = \"orders\"\n{inst}"), "orders[0].order_path"),
            (format!("{desk}feed = \"md\"\n{inst}"), "orders[0].feed"),
            (format!("{desk}[orders.journal]\ndir = \"\"\n{inst}"), "orders[0].journal.dir"),
            (
                format!("{desk}{inst}[[listener]]\naddress = \"127.0.0.1:0\"\nmode = \"orders\"\norders = \"x\"\n"),
                "listener[1].orders",
            ),
            (
                format!("{desk}{inst}[[listener]]\naddress = \"127.0.0.1:0\"\norders = \"d\"\nrespond = {{ status = 200 }}\n"),
                "listener[1].orders",
            ),
            (
                format!("{desk}{inst}[[listener]]\naddress = \"127.0.0.1:0\"\n[[listener.route]]\norders = \"d\"\nrespond = {{ status = 200 }}\n"),
                "listener[1].route[0].orders",
            ),
        ];
        refused_at(&cases);
    }

    #[test]
    fn feed_errors_name_the_key() {
        let feed = "[[feed]]\nname = \"md\"\n";
        let cases = [
            (format!("{feed}slow_consumer = \"nope\"\n"), "feed[0].slow_consumer"),
            (format!("{feed}[feed.groups]\na = [\"@b\"]\n"), "feed[0].groups.a"),
            (format!("{feed}[[feed.entitle]]\nkey = \"k\"\ninstruments = [\"9-1\"]\n"), "feed[0].entitle[0].instruments"),
            (format!("{feed}{feed}"), "feed[1].name"),
            (format!("{feed}[[feed.entitle]]\nkey = \"k\"\nclient_cn = \"c\"\ninstruments = [\"1\"]\n"), "feed[0].entitle[0]"),
            (format!("{feed}[feed.nats]\nurl = \"nats://host\"\nsubject = \"a\"\n"), "feed[0].nats.url"),
            (format!("{feed}[feed.nats]\nurl = \"127.0.0.1:4222\"\nsubject = \"a.>.b\"\n"), "feed[0].nats.subject"),
            (format!("{feed}[feed.nats]\nurl = \"127.0.0.1:4222\"\nsubject = \"a\"\nreconnect = \"0s\"\n"), "feed[0].nats.reconnect"),
            (
                format!("{feed}[[listener]]\naddress = \"127.0.0.1:0\"\nmode = \"feed\"\nfeed = \"other\"\n"),
                "listener[1].feed",
            ),
            (
                format!("{feed}[[listener]]\naddress = \"127.0.0.1:0\"\nmode = \"feed\"\nfeed = \"md\"\nrole = \"watch\"\n"),
                "listener[1].role",
            ),
            (
                format!("{feed}[[listener]]\naddress = \"127.0.0.1:0\"\n[[listener.route]]\nfeed = {{ name = \"md\" }}\nrespond = {{ status = 200 }}\n"),
                "listener[1].route[0].feed",
            ),
        ];
        refused_at(&cases);
    }

    #[test]
    fn errors_name_key_and_line() {
        let text = "[[upstream]]\nname = \"a\"\nendpoints = [\"127.0.0.1:1\", \"nope\"]\n";
        let err = Config::from_toml(text).unwrap_err().to_string();
        assert!(err.contains("upstream[0].endpoints[1]"), "{err}");
        assert!(err.contains("line 3"), "{err}");

        let text = "[[listener]]\naddress = \"127.0.0.1:1\"\n\nupstream = \"missing\"\n";
        let err = Config::from_toml(text).unwrap_err().to_string();
        assert!(
            err.contains("listener[0].upstream") && err.contains("line 4"),
            "{err}"
        );

        let text = "[http]\nheader_read_timeout = \"soon\"\n";
        let err = Config::from_toml(text).unwrap_err().to_string();
        assert!(
            err.contains("http.header_read_timeout") && err.contains("line 2"),
            "{err}"
        );

        let err = Config::from_toml("[http]\nbogus = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("bogus") && err.contains("line 2"), "{err}");
    }

    #[test]
    fn edge_settings_are_checked_with_their_key() {
        let up = "[[upstream]]\nname = \"u\"\nendpoints = [\"127.0.0.1:1\"]\n";
        let bad = |listener: &str, upstream_extra: &str| {
            let text = format!(
                "[[listener]]\naddress = \"127.0.0.1:0\"\n{listener}\n{up}{upstream_extra}\n"
            );
            Config::from_toml(&text).unwrap_err().to_string()
        };
        for (listener, extra, key) in [
            ("mode = \"udp\"\nupstream = \"u\"", "", "listener[0].mode"),
            (
                "upstream = \"u\"\nproxy_protocol = { trusted = [\"10.0.0.0/33\"] }",
                "",
                "listener[0].proxy_protocol.trusted[0]",
            ),
            (
                "upstream = \"u\"\nproxy_protocol = { trusted = [] }",
                "",
                "listener[0].proxy_protocol.trusted",
            ),
            (
                "upstream = \"u\"\n[[listener.sni]]\nnames = [\"a\"]\nupstream = \"u\"",
                "",
                "listener[0].address",
            ),
            ("mode = \"tcp\"", "", "listener[0].address"),
            (
                "mode = \"tcp\"\n[[listener.sni]]\nnames = [\"a\"]\nupstream = \"x\"",
                "",
                "listener[0].sni[0].upstream",
            ),
            (
                "mode = \"tcp\"\nupstream = \"u\"",
                "tls = { sni = \"a\" }",
                "listener[0].upstream",
            ),
            (
                "upstream = \"u\"",
                "proxy_protocol = \"v3\"",
                "upstream[0].proxy_protocol",
            ),
            (
                "upstream = \"u\"",
                "proxy_protocol = \"v1\"\nprotocol = \"h2c\"",
                "upstream[0].proxy_protocol",
            ),
        ] {
            let err = bad(listener, extra);
            assert!(err.contains(key), "{key}: {err}");
        }
        let ok = format!(
            "[[listener]]\naddress = \"127.0.0.1:0\"\nmode = \"tcp\"\nupstream = \"u\"\n\
             proxy_protocol = {{ trusted = [\"10.0.0.0/8\", \"192.0.2.1\", \"::1\"] }}\n\
             [[listener.sni]]\nnames = [\"A.example\"]\nupstream = \"u\"\n{up}\
             proxy_protocol = \"v2\"\n"
        );
        let c = Config::from_toml(&ok).unwrap();
        let l = &c.listeners[0];
        assert_eq!(l.proxy_protocol.as_ref().unwrap().len(), 3);
        assert_eq!(l.tcp.as_ref().unwrap().sni[0].names, ["a.example"]);
        assert!(l.splice && l.routes.is_empty());
        assert_eq!(c.upstreams[0].proxy_protocol, Some(ProxyProtocol::V2));
    }

    #[test]
    fn units() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_size("8KiB"), Some(8192));
        assert_eq!(parse_size("1m"), Some(1 << 20));
        assert_eq!(parse_size("3 parsecs"), None);
    }
}
