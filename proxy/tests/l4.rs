//! Edge features below HTTP, through real sockets: the PROXY protocol (v1 and v2) taken from
//! trusted sources only and sent to upstreams, TCP-mode listeners carrying bytes (1 GB,
//! checked, over splice and over the copy path), and TLS passed through by SNI to two
//! origins.

#[macro_use]
mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use fluxgate_conf::IoMode;
use fluxgate_wire::proxy_protocol::{encode, parse, Version};
use support::*;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A gateway whose listener takes PROXY headers from `trusted`, forwarding to `up`, its
/// access log read by `access_log(up)`.
fn proxied_gateway(up: SocketAddr, trusted: &str, upstream_extra: &str) -> fluxgate::Handle {
    let log = scratch("l4-log").join(format!("access-{}.log", up.port()));
    let _ = std::fs::remove_file(&log);
    start(
        &format!(
            "[access_log]\npath = \"{}\"\nflush_interval = \"100ms\"\n\
             [admin]\naddress = \"127.0.0.1:0\"\n\
             [[listener]]\naddress = \"127.0.0.1:0\"\nupstream = \"u\"\n\
             proxy_protocol = {{ trusted = [{trusted}] }}\n\
             [[upstream]]\nname = \"u\"\nendpoints = [\"{up}\"]\n{upstream_extra}\n",
            log.display()
        ),
        IoMode::Epoll,
    )
}

/// The access log lines `proxied_gateway(up, ..)` wrote so far.
fn access_log(up: SocketAddr) -> String {
    let log = scratch("l4-log").join(format!("access-{}.log", up.port()));
    std::fs::read_to_string(log).unwrap_or_default()
}

fn header(v: Version, src: &str, dst: &str) -> Vec<u8> {
    let mut h = Vec::new();
    encode(v, sa(src), sa(dst), &mut h);
    h
}

#[test]
fn proxy_headers_from_a_trusted_source_name_the_client() {
    let up = upstream(Behavior::Echo);
    let fg = proxied_gateway(up.addr, "\"127.0.0.0/8\"", "");
    let addr = fg.local_addrs()[0];
    for (v, client) in [
        (Version::V1, "192.0.2.7:5555"),
        (Version::V2, "203.0.113.9:6666"),
        (Version::V2, "[2001:db8::5]:7777"),
    ] {
        let mut c = RawClient::connect(addr);
        // The header in two pieces, the request right behind it.
        let h = header(v, client, &addr.to_string());
        c.send(&h[..10]);
        std::thread::sleep(Duration::from_millis(30));
        let mut rest = h[10..].to_vec();
        rest.extend_from_slice(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        c.send(&rest);
        let r = c.read_response().expect("answered");
        let ip = sa(client).ip().to_string();
        assert_eq!(r.header("x-up-xff"), Some(ip.as_str()), "{v:?}");
        // Keep-alive: the next request on the connection is the same client's.
        c.send(b"GET /again HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(
            c.read_response().unwrap().header("x-up-xff"),
            Some(ip.as_str())
        );
    }
    // LOCAL (the balancer's own check) and UNKNOWN: the socket's address.
    let mut local = header(Version::V2, "192.0.2.1:1", "192.0.2.2:2");
    local[12] = 0x20;
    for h in [local, b"PROXY UNKNOWN\r\n".to_vec()] {
        let mut c = RawClient::connect(addr);
        c.send(&[h, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()].concat());
        assert_eq!(
            c.read_response().unwrap().header("x-up-xff"),
            Some("127.0.0.1")
        );
    }
    // The access log names the client the header named.
    assert!(
        eventually(Duration::from_secs(3), || access_log(up.addr)
            .contains("\"client\":\"203.0.113.9\"")),
        "{}",
        access_log(up.addr)
    );
    fg.shutdown();
}

#[test]
fn proxy_headers_are_refused_from_untrusted_sources_and_when_malformed() {
    let up = upstream(Behavior::Echo);
    let untrusting = proxied_gateway(up.addr, "\"10.0.0.0/8\", \"192.0.2.1\"", "");
    // (The gateway may close before the bytes are written: a failed write is no failure.)
    let mut c = RawClient::connect(untrusting.local_addrs()[0]);
    let bytes = [
        header(Version::V1, "192.0.2.7:1", "127.0.0.1:80"),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
    ]
    .concat();
    let _ = c.stream.write_all(&bytes);
    assert!(c.closed(), "an untrusted source's header is not taken");

    let fg = proxied_gateway(up.addr, "\"127.0.0.1\"", "");
    let addr = fg.local_addrs()[0];
    let mut bad_v2 = header(Version::V2, "192.0.2.1:1", "192.0.2.2:2");
    bad_v2[12] = 0x23;
    for bytes in [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 80\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        b"PROXY TCP4 1.2.3.4\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        bad_v2,
    ] {
        let mut c = RawClient::connect(addr);
        let _ = c.stream.write_all(&bytes);
        assert!(c.closed(), "{:?}", String::from_utf8_lossy(&bytes));
    }
    assert_eq!(up.requests(), 0, "nothing reached the upstream");
    let metrics = get(fg.admin_addr().unwrap(), "/metrics").body;
    let refused = metric(
        &String::from_utf8_lossy(&metrics),
        "fluxgate_refusals_total{listener=",
    );
    assert!(
        String::from_utf8_lossy(&metrics).contains("reason=\"proxy_header\"} 4"),
        "{refused:?}"
    );
    untrusting.shutdown();
    fg.shutdown();
}

#[test]
fn balancing_by_client_ip_follows_the_proxy_header() {
    let a = upstream(Behavior::Echo);
    let b = upstream(Behavior::Echo);
    let fg = start(
        &format!(
            "[[listener]]\naddress = \"127.0.0.1:0\"\nupstream = \"u\"\n\
             proxy_protocol = {{ trusted = [\"127.0.0.1\"] }}\n\
             [[upstream]]\nname = \"u\"\nendpoints = [\"{}\", \"{}\"]\n\
             balance = \"hash\"\nhash_key = \"client_ip\"\n",
            a.addr, b.addr
        ),
        IoMode::Epoll,
    );
    let addr = fg.local_addrs()[0];
    let port_for = |client: &str| {
        let mut c = RawClient::connect(addr);
        c.send(&header(Version::V1, client, &addr.to_string()));
        c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        c.read_response()
            .unwrap()
            .header("x-up-port")
            .unwrap()
            .to_owned()
    };
    let mut ports = std::collections::HashSet::new();
    for i in 0..20 {
        let client = format!("198.51.100.{i}:4000");
        let first = port_for(&client);
        assert_eq!(port_for(&client), first, "one client, one endpoint");
        ports.insert(first);
    }
    assert_eq!(
        ports.len(),
        2,
        "20 client addresses spread over both endpoints"
    );
    fg.shutdown();
}

/// An upstream that reads a PROXY header, then answers one HTTP request with the header's
/// source address as its body.
fn proxy_reading_upstream() -> SocketAddr {
    serve_in_background(|mut s| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = Vec::new();
        let header = loop {
            let mut b = [0u8; 512];
            match s.read(&mut b).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&b[..n]),
            }
            match parse(&buf) {
                Ok(Some(h)) => break h,
                Ok(None) => {}
                Err(_) => return,
            }
        };
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            let mut b = [0u8; 512];
            match s.read(&mut b).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&b[..n]),
            }
        }
        let kind = if buf.starts_with(b"PROXY ") {
            "v1"
        } else {
            "v2"
        };
        let body = format!("{kind} {}", header.addresses.unwrap().source);
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let _ = s.write_all(resp.as_bytes()).await;
    })
}

#[test]
fn proxy_headers_are_sent_to_upstreams() {
    let up = proxy_reading_upstream();
    for v in ["v1", "v2"] {
        // The header the gateway took is the one it sends on.
        let fg = proxied_gateway(up, "\"127.0.0.1\"", &format!("proxy_protocol = \"{v}\""));
        let addr = fg.local_addrs()[0];
        let mut c = RawClient::connect(addr);
        c.send(&header(Version::V2, "192.0.2.44:1234", &addr.to_string()));
        c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        let r = c.read_response().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&r.body),
            format!("{v} 192.0.2.44:1234")
        );
        // A second request goes on a connection of its own, with its own header.
        c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        let r = c.read_response().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&r.body),
            format!("{v} 192.0.2.44:1234")
        );
        fg.shutdown();
    }
}

/// The period of the test stream: a prime, so no shift or reordering by whole buffers
/// keeps it.
const PERIOD: usize = 1_048_573;

/// The test stream's first period: pseudo-random bytes.
fn period() -> &'static [u8] {
    static P: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    P.get_or_init(|| {
        let mut x: u32 = 0x9e37_79b9;
        (0..PERIOD)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    })
}

/// Bytes `at..` of the test stream into `out` (whole slices copied: fast in a debug build).
fn pattern(at: u64, out: &mut [u8]) {
    let p = period();
    let mut i = (at % PERIOD as u64) as usize;
    let mut done = 0;
    while done < out.len() {
        let n = (PERIOD - i).min(out.len() - done);
        out[done..done + n].copy_from_slice(&p[i..i + n]);
        done += n;
        i = 0;
    }
}

/// A TCP echo server on a thread per connection.
fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                let _ = std::io::copy(&mut s, &mut w);
                let _ = w.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    addr
}

/// Sends `len` pattern bytes through `addr` and checks that the same come back, then the
/// end of the stream (the half close passed both ways).
fn echo_through(addr: SocketAddr, len: u64) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let mut block = vec![0u8; 1 << 20];
        let mut at = 0;
        while at < len {
            let n = (len - at).min(block.len() as u64) as usize;
            pattern(at, &mut block[..n]);
            w.write_all(&block[..n]).unwrap();
            at += n as u64;
        }
        w.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut got = vec![0u8; 1 << 20];
    let mut want = vec![0u8; 1 << 20];
    let mut at = 0u64;
    loop {
        let n = s.read(&mut got).expect("bytes keep coming");
        if n == 0 {
            break;
        }
        pattern(at, &mut want[..n]);
        assert!(got[..n] == want[..n], "bytes differ after {at}");
        at += n as u64;
    }
    writer.join().unwrap();
    assert_eq!(at, len, "every byte came back, then the end");
}

fn tcp_gateway(up: SocketAddr, extra: &str, io: IoMode) -> fluxgate::Handle {
    start(
        &format!(
            "[[listener]]\naddress = \"127.0.0.1:0\"\nmode = \"tcp\"\nupstream = \"u\"\n{extra}\n\
             [[upstream]]\nname = \"u\"\nendpoints = [\"{up}\"]\n"
        ),
        io,
    )
}

on_both_acceptors!(a_tcp_tunnel_carries_a_gigabyte_each_way_over_splice);

fn a_tcp_tunnel_carries_a_gigabyte_each_way_over_splice(io: IoMode) {
    let fg = tcp_gateway(echo_server(), "", io);
    echo_through(fg.local_addrs()[0], 1 << 30);
    fg.shutdown();
}

#[test]
fn a_tcp_tunnel_carries_bytes_over_the_copy_path() {
    let fg = tcp_gateway(echo_server(), "splice = false", IoMode::Epoll);
    echo_through(fg.local_addrs()[0], 64 << 20);
    fg.shutdown();
}

#[test]
fn a_tcp_tunnel_skips_a_dead_endpoint_and_sends_the_proxy_header() {
    let dead = dead_addr();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let live = l.local_addr().unwrap();
    let fg = start(
        &format!(
            "[[listener]]\naddress = \"127.0.0.1:0\"\nmode = \"tcp\"\nupstream = \"u\"\n\
             [[upstream]]\nname = \"u\"\nendpoints = [\"{}\", \"{live}\"]\n\
             proxy_protocol = \"v2\"\nconnect_timeout = \"500ms\"\n",
            dead.addr
        ),
        IoMode::Epoll,
    );
    let addr = fg.local_addrs()[0];
    for _ in 0..2 {
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(b"hello").unwrap();
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = vec![0u8; 28 + 5];
        s.read_exact(&mut buf).unwrap();
        let h = parse(&buf).unwrap().expect("a PROXY v2 header first");
        let a = h.addresses.unwrap();
        assert_eq!(
            a.source,
            c.local_addr().unwrap(),
            "the client's own address"
        );
        assert_eq!(a.destination, addr);
        assert_eq!(&buf[h.len..], b"hello");
    }
    fg.shutdown();
}

/// A rustls client config trusting each of `cas`.
fn client_config(cas: &[&std::path::Path]) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        roots
            .add(rustls::pki_types::CertificateDer::from_pem_file(ca.join("ca.pem")).unwrap())
            .unwrap();
    }
    Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// A TLS origin (a fluxgate terminating TLS) for `name`, answering `body`.
fn tls_origin(dir: &std::path::Path, name: &str, body: &str) -> fluxgate::Handle {
    let c = test_certs(&dir.join(name), &[name]);
    start(
        &format!(
            "[[listener]]\naddress = \"127.0.0.1:0\"\n\
             respond = {{ status = 200, body = \"{body}\" }}\n\
             [listener.tls]\ncertificates = [{{ cert = \"{}\", key = \"{}\" }}]\n",
            c.join("cert.pem").display(),
            c.join("key.pem").display()
        ),
        IoMode::Epoll,
    )
}

/// GET / over TLS to `addr` with server name `name`: the body, or None if the handshake or
/// the exchange failed.
fn get_tls(addr: SocketAddr, name: &str, cfg: Arc<rustls::ClientConfig>) -> Option<String> {
    let server = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
    let conn = rustls::ClientConnection::new(cfg, server).unwrap();
    let sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, sock);
    tls.write_all(
        format!("GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .ok()?;
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    text.starts_with("HTTP/1.1 200")
        .then(|| text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned())
}

#[test]
fn sni_passthrough_reaches_two_tls_origins_untouched() {
    let dir = scratch("sni-pass");
    let a = tls_origin(&dir, "a.example", "origin a");
    let b = tls_origin(&dir, "b.example", "origin b");
    let fg = start(
        &format!(
            "[[listener]]\naddress = \"127.0.0.1:0\"\nmode = \"tcp\"\n\
             [[listener.sni]]\nnames = [\"a.example\"]\nupstream = \"a\"\n\
             [[listener.sni]]\nnames = [\"*.b.example\", \"b.example\"]\nupstream = \"b\"\n\
             [[upstream]]\nname = \"a\"\nendpoints = [\"{}\"]\n\
             [[upstream]]\nname = \"b\"\nendpoints = [\"{}\"]\n",
            a.local_addrs()[0],
            b.local_addrs()[0]
        ),
        IoMode::Epoll,
    );
    let addr = fg.local_addrs()[0];
    // Each client verifies its origin's own certificate: the TLS went through untouched.
    let cfg = client_config(&[&dir.join("a.example"), &dir.join("b.example")]);
    assert_eq!(
        get_tls(addr, "a.example", cfg.clone()).as_deref(),
        Some("origin a")
    );
    assert_eq!(
        get_tls(addr, "b.example", cfg.clone()).as_deref(),
        Some("origin b")
    );
    assert_eq!(
        get_tls(addr, "a.example", cfg.clone()).as_deref(),
        Some("origin a")
    );
    // No route for the name and no default: closed.
    assert_eq!(get_tls(addr, "c.example", cfg), None);
    fg.shutdown();
    a.shutdown();
    b.shutdown();
}

#[test]
fn an_idle_tcp_tunnel_is_closed_at_its_idle_timeout_on_both_paths() {
    for splice in ["true", "false"] {
        let fg = tcp_gateway(
            echo_server(),
            &format!("splice = {splice}\ntcp_idle_timeout = \"500ms\""),
            IoMode::Epoll,
        );
        let mut c = TcpStream::connect(fg.local_addrs()[0]).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // Busy for longer than the timeout: bytes keep it open.
        let t = std::time::Instant::now();
        let mut b = [0u8; 1];
        for _ in 0..8 {
            std::thread::sleep(Duration::from_millis(150));
            c.write_all(b"x").unwrap();
            c.read_exact(&mut b).unwrap();
        }
        assert!(t.elapsed() > Duration::from_millis(1000));
        // Then idle: closed within a timeout or two.
        let idle = std::time::Instant::now();
        let n = c.read(&mut b).unwrap_or(0);
        assert_eq!(n, 0, "splice = {splice}: closed, not answered");
        let waited = idle.elapsed();
        assert!(
            waited >= Duration::from_millis(400) && waited < Duration::from_secs(3),
            "splice = {splice}: closed after {waited:?}"
        );
        fg.shutdown();
    }
}
