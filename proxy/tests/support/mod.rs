//! The one harness for "start fluxgate with this config" and the test upstreams it talks to.
//! Everything binds 127.0.0.1 port 0 and reads the port back.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fluxgate::{Handle, Server};
use fluxgate_conf::{Config, IoMode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// Defines, for each named `fn(IoMode)`, one test with the io_uring acceptor (in `uring::`)
/// and one with epoll (in `epoll::`).
#[allow(unused_macros)]
macro_rules! on_both_acceptors {
    ($($name:ident),* $(,)?) => {
        mod uring {
            $( #[test] fn $name() { super::$name(fluxgate_conf::IoMode::Uring) } )*
        }
        mod epoll {
            $( #[test] fn $name() { super::$name(fluxgate_conf::IoMode::Epoll) } )*
        }
    };
}

/// Starts fluxgate from TOML text with the given acceptor and one worker (so connection
/// counts at the upstream are per worker and deterministic).
pub fn start(toml: &str, io: IoMode) -> Handle {
    let mut config = Config::from_toml(toml).expect("test config is valid");
    config.runtime.io = io;
    config.runtime.workers = 1;
    let h = Server::start(config).expect("fluxgate starts");
    assert_eq!(h.io_mode(), io);
    h
}

/// A fluxgate proxying one listener to `upstream` with extra `[upstream]` lines.
pub fn proxy_to(
    upstream: SocketAddr,
    upstream_extra: &str,
    http_extra: &str,
    io: IoMode,
) -> Handle {
    start(
        &format!(
            "[http]\n{http_extra}\n[[listener]]\naddress = \"127.0.0.1:0\"\nupstream = \"u\"\n\
             [[upstream]]\nname = \"u\"\nendpoints = [\"{upstream}\"]\n{upstream_extra}\n"
        ),
        io,
    )
}

/// One listener to `upstream`, plus the admin listener (for tests that read metrics).
pub fn proxy_with_admin(upstream: SocketAddr, io: IoMode) -> Handle {
    start(
        &format!(
            "[admin]\naddress = \"127.0.0.1:0\"\n[[listener]]\naddress = \"127.0.0.1:0\"\n\
             upstream = \"u\"\n[[upstream]]\nname = \"u\"\nendpoints = [\"{upstream}\"]\n"
        ),
        io,
    )
}

/// The value of the first metric line in `text` that starts with `line_start`.
pub fn metric(text: &str, line_start: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// `fluxgate_connections_parked_total`, read from the admin listener.
pub fn parked_connections(fg: &Handle) -> u64 {
    let text = String::from_utf8(get(fg.admin_addr().unwrap(), "/metrics").body).unwrap();
    metric(&text, "fluxgate_connections_parked_total ").expect("parked metric") as u64
}

/// How a test upstream behaves.
#[derive(Clone, Copy)]
pub enum Behavior {
    /// Echoes the request body and reports what it saw in `x-up-*` response headers.
    Echo,
    /// Sleeps this long before answering.
    Slow(Duration),
    /// Answers the first request of each connection, then closes the connection on reading
    /// the second without answering (a keep-alive connection gone stale under the proxy).
    DropSecond,
    /// Answers the first request this upstream gets, then closes each connection on reading
    /// any later one, on every connection: a retry fails too.
    DropAllButFirst,
    /// Holds each request until this many are in flight at once (then answers them all, and
    /// so on for each group): a burst that must be concurrent is, however the threads run.
    Together(usize),
    /// Answers every request with 500.
    Fail500,
}

/// A test upstream (HTTP/1.1 or h2c) on its own thread, counting connections.
pub struct Upstream {
    pub addr: SocketAddr,
    /// Connections accepted so far.
    pub accepted: Arc<AtomicUsize>,
    /// Connections open now.
    pub open: Arc<AtomicUsize>,
    /// Requests answered (health probes excluded).
    pub requests: Arc<AtomicUsize>,
    /// What `GET /healthz` answers: 200 while true, 503 after.
    pub healthy: Arc<std::sync::atomic::AtomicBool>,
    /// When each request (health probes excluded) arrived, in order.
    pub arrivals: Arc<std::sync::Mutex<Vec<std::time::Instant>>>,
}

impl Upstream {
    /// Fresh counters for an upstream about to bind; its serving closure takes clones, and
    /// `addr` is set once it listens.
    fn unbound() -> Upstream {
        Upstream {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            accepted: Arc::default(),
            open: Arc::default(),
            requests: Arc::default(),
            healthy: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            arrivals: Arc::default(),
        }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
    pub fn set_healthy(&self, up: bool) {
        self.healthy.store(up, Ordering::SeqCst);
    }
    pub fn arrivals(&self) -> Vec<std::time::Instant> {
        self.arrivals.lock().unwrap().clone()
    }
}

pub fn upstream(behavior: Behavior) -> Upstream {
    spawn_upstream(behavior, false)
}

pub fn h2c_upstream() -> Upstream {
    spawn_upstream(Behavior::Echo, true)
}

fn spawn_upstream(behavior: Behavior, h2: bool) -> Upstream {
    let mut up = Upstream::unbound();
    let gate = match behavior {
        Behavior::Together(n) => Some(Arc::new(tokio::sync::Barrier::new(n))),
        _ => None,
    };
    let (acc, op) = (up.accepted.clone(), up.open.clone());
    let (reqs, hl, arr) = (up.requests.clone(), up.healthy.clone(), up.arrivals.clone());
    up.addr = serve_in_background(move |stream| {
        acc.fetch_add(1, Ordering::SeqCst);
        op.fetch_add(1, Ordering::SeqCst);
        let op = op.clone();
        let (reqs, hl, arr) = (reqs.clone(), hl.clone(), arr.clone());
        let gate = gate.clone();
        let port = stream.local_addr().map_or(0, |a| a.port());
        async move {
            let served = Arc::new(AtomicUsize::new(0));
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let probe = req.uri().path() == "/healthz";
                let up = hl.load(Ordering::SeqCst);
                let overall = if probe {
                    0
                } else {
                    arr.lock().unwrap().push(std::time::Instant::now());
                    reqs.fetch_add(1, Ordering::SeqCst)
                };
                let n = served.fetch_add(1, Ordering::SeqCst);
                // Dropping all but the first is dropping the second of one long connection.
                let (behavior, n) = match behavior {
                    Behavior::DropAllButFirst => (Behavior::DropSecond, overall),
                    b => (b, n),
                };
                respond(behavior, req, n, port, probe.then_some(up), gate.clone())
            });
            let io = TokioIo::new(stream);
            if h2 {
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(io, svc)
                        .await;
            } else {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .await;
            }
            op.fetch_sub(1, Ordering::SeqCst);
        }
    });
    up
}

type UpResponse = Response<http_body_util::combinators::BoxBody<Bytes, hyper::Error>>;

async fn respond(
    behavior: Behavior,
    req: Request<Incoming>,
    nth: usize,
    port: u16,
    probe: Option<bool>,
    gate: Option<Arc<tokio::sync::Barrier>>,
) -> Result<UpResponse, std::io::Error> {
    let empty = || Full::new(Bytes::new()).map_err(|e| match e {}).boxed();
    if let Some(up) = probe {
        let status = if up { 200 } else { 503 };
        return Ok(Response::builder().status(status).body(empty()).unwrap());
    }
    match behavior {
        Behavior::Fail500 => {
            return Ok(Response::builder()
                .status(500)
                .header("x-up-port", port)
                .body(empty())
                .unwrap())
        }
        Behavior::Slow(d) => tokio::time::sleep(d).await,
        Behavior::Together(_) => {
            if let Some(g) = gate {
                g.wait().await;
            }
        }
        Behavior::DropSecond if nth >= 1 => {
            return Err(std::io::Error::other("dropping a kept-alive connection"))
        }
        _ => {}
    }
    let h = req.headers();
    let get = |n: &str| {
        h.get_all(n)
            .iter()
            .map(|v| v.to_str().unwrap_or("?").to_owned())
            .collect::<Vec<_>>()
            .join("|")
    };
    let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
    let fields: Vec<String> = h
        .iter()
        .map(|(k, v)| format!("{k}={}", v.to_str().unwrap_or("?")))
        .collect();
    let mut resp = Response::builder()
        .header("x-up-port", port)
        .header(
            "x-up-path",
            req.uri().path_and_query().map_or("", |p| p.as_str()),
        )
        .header("x-up-method", req.method().as_str())
        .header("x-up-version", format!("{:?}", req.version()))
        .header("x-up-host", get("host"))
        .header("x-up-xff", get("x-forwarded-for"))
        .header("x-up-xfp", get("x-forwarded-proto"))
        .header("x-up-xfh", get("x-forwarded-host"))
        .header("x-up-cl", get("content-length"))
        .header("x-up-te", get("transfer-encoding"))
        .header("x-up-headers", names.join(","))
        .header("x-up-fields", fields.join(";"))
        // Hop-by-hop response headers the proxy must not pass on.
        .header("connection", "x-up-hop")
        .header("x-up-hop", "1")
        .header("keep-alive", "timeout=30");
    if let Some(cl) = h.get("content-length") {
        resp = resp.header("content-length", cl);
    }
    if req.method() == hyper::Method::HEAD {
        return Ok(resp
            .body(Full::new(Bytes::new()).map_err(|e| match e {}).boxed())
            .unwrap());
    }
    Ok(resp.body(req.into_body().boxed()).unwrap())
}

/// What a scripted h2c upstream does with the request it gets.
#[derive(Clone, Copy, Debug)]
pub enum H2Act {
    /// 200, with the method and path in `x-up-method` and `x-up-path`.
    Answer,
    /// RST_STREAM REFUSED_STREAM: not processed, safe to send again (RFC 9113 8.7).
    Refuse,
    /// Closes the whole connection with the request unanswered.
    Drop,
}

/// An h2c upstream (the h2 crate's server, so each stream can be answered, refused or cut
/// off) that does `act(n)` with the n-th request it receives over all its connections.
/// `requests` counts every request received, answered or not (`arrivals` stays empty).
pub fn h2c_upstream_acting(act: fn(usize) -> H2Act) -> Upstream {
    let mut up = Upstream::unbound();
    let (acc, op, reqs) = (up.accepted.clone(), up.open.clone(), up.requests.clone());
    up.addr = serve_in_background(move |stream| {
        acc.fetch_add(1, Ordering::SeqCst);
        op.fetch_add(1, Ordering::SeqCst);
        let (op, reqs) = (op.clone(), reqs.clone());
        async move {
            if let Ok(mut conn) = h2::server::handshake(stream).await {
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    match act(reqs.fetch_add(1, Ordering::SeqCst)) {
                        H2Act::Answer => {
                            let resp = Response::builder()
                                .header("x-up-method", req.method().as_str())
                                .header("x-up-path", req.uri().path())
                                .body(())
                                .unwrap();
                            let _ = respond.send_response(resp, true);
                        }
                        H2Act::Refuse => respond.send_reset(h2::Reason::REFUSED_STREAM),
                        H2Act::Drop => break,
                    }
                }
            }
            op.fetch_sub(1, Ordering::SeqCst);
        }
    });
    up
}

/// A parsed HTTP/1.1 response read off a raw socket.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// How long a read may wait for the server before the test fails: longer than any behaviour
/// under test takes to answer.
pub const READ_LIMIT: Duration = Duration::from_secs(10);
/// How soon a close must be seen for `closed()`: shorter than every default timeout that would
/// close the connection anyway (keep-alive 60 s, header read 10 s), so a close that should
/// have come at once and did not fails the test.
pub const CLOSE_WITHIN: Duration = Duration::from_secs(3);

/// What one read of the socket saw.
enum Got {
    Bytes,
    /// FIN or reset.
    Closed,
    TimedOut,
}

/// A blocking HTTP/1.1 client connection that writes raw bytes and parses responses. A
/// server that goes silent fails the test; it is never read as a close.
pub struct RawClient {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl RawClient {
    pub fn connect(addr: SocketAddr) -> RawClient {
        let stream = TcpStream::connect(addr).unwrap();
        // For tests that read `stream` themselves: silence is an error there too.
        stream.set_read_timeout(Some(READ_LIMIT)).unwrap();
        RawClient {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Reads once, waiting until `deadline` at most.
    fn fill_by(&mut self, deadline: std::time::Instant) -> Got {
        let mut chunk = [0u8; 65536];
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Got::TimedOut;
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            return match self.stream.read(&mut chunk) {
                Ok(0) => Got::Closed,
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    Got::Bytes
                }
                Err(e) => match e.kind() {
                    std::io::ErrorKind::Interrupted => continue,
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => Got::TimedOut,
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted => {
                        Got::Closed
                    }
                    _ => panic!("reading from the server: {e}"),
                },
            };
        }
    }

    /// More bytes: true, or false at a close. Panics when the server stays silent for
    /// `READ_LIMIT`.
    fn fill(&mut self) -> bool {
        match self.fill_by(std::time::Instant::now() + READ_LIMIT) {
            Got::Bytes => true,
            Got::Closed => false,
            Got::TimedOut => panic!(
                "the server sent nothing for {READ_LIMIT:?} (and did not close); have {} bytes: {:?}",
                self.buf.len(),
                String::from_utf8_lossy(&self.buf)
            ),
        }
    }

    /// Reads one response (Content-Length or chunked body; none for HEAD/1xx/204/304 is not
    /// handled: tests do not need it). None if the connection closed (FIN or reset) before a
    /// whole response; a server that stays silent fails the test.
    pub fn read_response(&mut self) -> Option<RawResponse> {
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i;
            }
            if !self.fill() {
                return None;
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        self.buf.drain(..head_end + 4);
        let mut lines = head.split("\r\n");
        let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let mut resp = RawResponse {
            status,
            headers,
            body: Vec::new(),
        };
        if let Some(cl) = resp.header("content-length") {
            let n: usize = cl.parse().ok()?;
            while self.buf.len() < n {
                if !self.fill() {
                    return None;
                }
            }
            resp.body = self.buf.drain(..n).collect();
        } else if resp.header("transfer-encoding").is_some() {
            loop {
                let line_end = loop {
                    if let Some(i) = find(&self.buf, b"\r\n") {
                        break i;
                    }
                    if !self.fill() {
                        return None;
                    }
                };
                let size = usize::from_str_radix(
                    std::str::from_utf8(&self.buf[..line_end]).ok()?.trim(),
                    16,
                )
                .ok()?;
                self.buf.drain(..line_end + 2);
                while self.buf.len() < size + 2 {
                    if !self.fill() {
                        return None;
                    }
                }
                resp.body.extend(self.buf.drain(..size));
                self.buf.drain(..2);
                if size == 0 {
                    break;
                }
            }
        }
        Some(resp)
    }

    /// True when the server closes the connection (FIN or reset) within `CLOSE_WITHIN`
    /// with nothing more to read; false if bytes come or the bound passes first.
    pub fn closed(&mut self) -> bool {
        self.closed_within(CLOSE_WITHIN)
    }

    /// `closed()` with a bound of the caller's.
    pub fn closed_within(&mut self, bound: Duration) -> bool {
        self.buf.is_empty()
            && matches!(self.fill_by(std::time::Instant::now() + bound), Got::Closed)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One request on a fresh connection.
pub fn get(addr: SocketAddr, path: &str) -> RawResponse {
    let mut c = RawClient::connect(addr);
    c.send(format!("GET {path} HTTP/1.1\r\nHost: test.local\r\n\r\n").as_bytes());
    c.read_response().expect("a response")
}

/// Polls `cond` every 10 ms for up to `limit`; true if it became true.
pub fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + limit;
    while std::time::Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}

/// A fresh directory for one test's files.
pub fn scratch(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("fluxgate-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A throwaway CA and a certificate for `names` (scripts/cert.sh, needs openssl) in `out`:
/// `out/cert.pem`, `out/key.pem`, `out/ca.pem`.
pub fn test_certs(out: &std::path::Path, names: &[&str]) -> std::path::PathBuf {
    let ok = std::process::Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/cert.sh"))
        .arg(out)
        .args(names)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("scripts/cert.sh runs")
        .success();
    assert!(ok, "scripts/cert.sh (needs openssl)");
    out.to_path_buf()
}

/// Binds 127.0.0.1 port 0 and, on a thread of its own, hands every accepted connection to
/// `conn` as a task. Returns the bound address.
pub fn serve_in_background<F, Fut>(conn: F) -> SocketAddr
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            loop {
                let (stream, _) = l.accept().await.unwrap();
                tokio::spawn(conn(stream));
            }
        });
    });
    addr
}

/// Reads one request head (through its blank line) off a raw test upstream's connection;
/// bytes past it stay in `buf` for the next call. None when the peer closes first.
pub async fn read_head(stream: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head: Vec<u8> = buf.drain(..end + 4).collect();
            return Some(String::from_utf8_lossy(&head).into_owned());
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// An address nothing listens on, held for as long as the value lives: the port is bound
/// (so no other test can take it) but not listening, so a connect gets a reset at once.
pub struct DeadAddr {
    pub addr: SocketAddr,
    _bound: socket2::Socket,
}

pub fn dead_addr() -> DeadAddr {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let addr = s.local_addr().unwrap().as_socket().unwrap();
    DeadAddr { addr, _bound: s }
}

/// Bytes `big_upstream` sends in one response.
pub const BIG_RESPONSE: usize = 100 << 20;

/// An upstream that answers every request with `len` bytes, and notes when a connection is
/// cut before it sent them all.
pub fn big_upstream(len: usize) -> (SocketAddr, Arc<std::sync::atomic::AtomicBool>) {
    let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let noted = cut.clone();
    let addr = serve_in_background(move |mut s| {
        let noted = noted.clone();
        async move {
            use tokio::io::AsyncWriteExt;
            let mut buf = Vec::new();
            if read_head(&mut s, &mut buf).await.is_none() {
                return;
            }
            let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\n\r\n");
            if s.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let chunk = vec![b'x'; 64 << 10];
            for _ in 0..len / chunk.len() {
                if s.write_all(&chunk).await.is_err() {
                    noted.store(true, std::sync::atomic::Ordering::Relaxed);
                    return;
                }
            }
        }
    });
    (addr, cut)
}

/// The `big_upstream` request cut by the gateway within 8 s, this process's RSS grown by
/// less than 64 MiB from `before` (KiB) meanwhile: a stalled client costs bounded memory.
pub fn assert_cancelled_in_bounded_memory(cut: &std::sync::atomic::AtomicBool, before: u64) {
    assert!(
        eventually(Duration::from_secs(8), || cut.load(Ordering::Relaxed)),
        "the upstream request was not cancelled"
    );
    let grown = rss_kib().saturating_sub(before);
    assert!(
        grown < 64 << 10,
        "RSS grew {grown} KiB while the client stalled"
    );
}

/// Reads `s` to its end (a close, a reset or the read limit); the bytes that came.
pub fn bytes_until_close(s: &mut TcpStream) -> usize {
    let mut got = 0;
    let mut chunk = vec![0u8; 1 << 16];
    loop {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return got,
            Ok(n) => got += n,
        }
    }
}

/// The resident memory of this process (the gateway runs in it), in KiB.
pub fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A real `nats-server` (Debian's) on 127.0.0.1, on a port it picked itself (or `port`),
/// killed when dropped.
pub struct NatsServer {
    child: std::process::Child,
    pub addr: SocketAddr,
}

impl NatsServer {
    pub fn start() -> NatsServer {
        NatsServer::on_port(-1)
    }

    /// `-1`: a free port of the server's choosing.
    pub fn on_port(port: i32) -> NatsServer {
        use std::io::BufRead;
        let mut child = std::process::Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("nats-server runs (scripts/deps.sh installs it)");
        let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let marker = "Listening for client connections on ";
        let addr = loop {
            let line = lines
                .next()
                .expect("nats-server said where it listens")
                .unwrap();
            if let Some(i) = line.find(marker) {
                break line[i + marker.len()..].trim().parse().expect("IP:port");
            }
        };
        // Keep draining its log so it never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        NatsServer { child, addr }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP/3 connection to `addr` as `localhost`, trusting `certs/ca.pem` (see
/// `test_certs`); its driver runs as a task of the current runtime. The endpoint must live
/// as long as the connection is used.
pub async fn h3_connect(
    addr: SocketAddr,
    certs: &std::path::Path,
) -> (
    quinn::Endpoint,
    h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
) {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_file(certs.join("ca.pem")).unwrap())
        .unwrap();
    let mut tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    let conn = ep.connect(addr, "localhost").unwrap().await.unwrap();
    let (mut driver, sender) = h3::client::new(h3_quinn::Connection::new(conn))
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
    });
    (ep, sender)
}

/// A real `redis-server` (Debian's) on 127.0.0.1, on a port free when it started, with no
/// persistence; killed when dropped.
pub struct RedisServer {
    child: std::process::Child,
    pub addr: SocketAddr,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server runs (scripts/deps.sh installs it)");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        assert!(
            eventually(Duration::from_secs(10), || TcpStream::connect(addr).is_ok()),
            "redis-server listens"
        );
        RedisServer { child, addr }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `fluxgate` binary, its first listener's address and everything it has logged.
pub struct Running {
    pub child: std::process::Child,
    pub addr: SocketAddr,
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

pub fn spawn(args: &[&str]) -> Running {
    spawn_command(
        std::process::Command::new(env!("CARGO_BIN_EXE_fluxgate")),
        args,
    )
}

/// `spawn` with `cmd` (the binary, with its environment set) in place of the plain binary.
pub fn spawn_command(mut cmd: std::process::Command, args: &[&str]) -> Running {
    use std::io::BufRead;
    let mut child = cmd
        .args(args)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let addr: SocketAddr = loop {
        let line = lines.next().expect("fluxgate printed its address").unwrap();
        log.lock().unwrap().push(line.clone());
        if let Some(rest) = line.split_once("listening on ").map(|(_, r)| r) {
            break rest.split_whitespace().next().unwrap().parse().unwrap();
        }
    };
    // Keep reading its log so it never blocks on a full pipe.
    let sink = log.clone();
    std::thread::spawn(move || {
        lines
            .map_while(Result::ok)
            .for_each(|l| sink.lock().unwrap().push(l))
    });
    Running { child, addr, log }
}
