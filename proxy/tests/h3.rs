//! HTTP/3 over QUIC through real UDP sockets on 127.0.0.1, with an independent client
//! (aioquic from PyPI, scripts/h3_client.py, in a venv scripts/h3-venv.sh makes): requests go
//! through the same routes and upstreams as HTTP/1.1 and HTTP/2, bodies stream both ways, and
//! the TCP side of the listener advertises HTTP/3 with Alt-Svc.

mod support;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use fluxgate_conf::IoMode;
use support::*;

/// The venv's python with aioquic (installed on first use).
fn python() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new("bash")
        .arg(root.join("scripts/h3-venv.sh"))
        .output()
        .expect("scripts/h3-venv.sh runs");
    assert!(out.status.success(), "scripts/h3-venv.sh failed");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// One answer as scripts/h3_client.py prints it.
#[derive(Debug)]
struct Answer {
    json: String,
}

impl Answer {
    fn field(&self, key: &str) -> Option<String> {
        let at = self.json.find(&format!("\"{key}\": "))? + key.len() + 4;
        let rest = &self.json[at..];
        let value = if let Some(s) = rest.strip_prefix('"') {
            &s[..s.find('"')?]
        } else {
            &rest[..rest.find([',', '}'])?]
        };
        Some(value.to_owned())
    }
}

/// Makes `requests` over one HTTP/3 connection to `port`, trusting `ca`.
fn h3(port: u16, ca: &Path, requests: &[&str]) -> Vec<Answer> {
    h3_with(port, ca, &[], requests)
}

/// As `h3`, with client options (`--resume`, `--hold-handshake MS`).
fn h3_with(port: u16, ca: &Path, options: &[&str], requests: &[&str]) -> Vec<Answer> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(python())
        .arg(root.join("scripts/h3_client.py"))
        .args(["--port", &port.to_string(), "--ca"])
        .arg(ca.join("ca.pem"))
        .args(options)
        .args(requests)
        .output()
        .expect("the HTTP/3 client runs");
    assert!(
        out.status.success(),
        "h3_client.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answers: Vec<Answer> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| Answer { json: l.to_owned() })
        .collect();
    assert!(answers.len() >= requests.len(), "{answers:?}");
    answers
}

/// A TLS listener (HTTP/3 on by default) forwarding to `up`, with certificates in `certs`.
fn tls_gateway(up: SocketAddr, certs: &Path, extra: &str) -> fluxgate::Handle {
    tls_gateway_with(up, certs, "", extra)
}

/// As `tls_gateway`, with `top` (sections such as `[http3]`) before the listener.
fn tls_gateway_with(up: SocketAddr, certs: &Path, top: &str, extra: &str) -> fluxgate::Handle {
    start(
        &format!(
            "{top}\n[[listener]]\naddress = \"127.0.0.1:0\"\nupstream = \"u\"\n{extra}\n\
             [listener.tls]\ncertificates = [{{ cert = \"{}\", key = \"{}\" }}]\n\
             [[upstream]]\nname = \"u\"\nendpoints = [\"{up}\"]\n",
            certs.join("cert.pem").display(),
            certs.join("key.pem").display()
        ),
        IoMode::Epoll,
    )
}

#[test]
fn requests_over_http3_go_through_the_gateway_with_bodies_both_ways() {
    let certs = test_certs(&scratch("h3-basic"), &["localhost"]);
    let up = upstream(Behavior::Echo);
    let fg = tls_gateway(up.addr, &certs, "");
    let port = fg.local_addrs()[0].port();
    let a = h3(
        port,
        &certs,
        &["GET /hello?x=1", "POST /echo 1048576", "GET /again"],
    );
    assert_eq!(a[0].field("status").as_deref(), Some("200"), "{:?}", a[0]);
    assert_eq!(a[0].field("x-up-method").as_deref(), Some("GET"));
    assert_eq!(a[0].field("x-up-path").as_deref(), Some("/hello?x=1"));
    assert_eq!(a[0].field("x-up-xfp").as_deref(), Some("https"));
    assert_eq!(a[0].field("x-up-xff").as_deref(), Some("127.0.0.1"));
    // A GET whose stream ended with its head goes upstream without a body (no chunking).
    assert_eq!(a[0].field("x-up-te").as_deref(), Some(""), "{:?}", a[0]);
    assert_eq!(a[0].field("x-up-cl").as_deref(), Some(""), "{:?}", a[0]);
    // A megabyte up and back, streamed: the same bytes.
    assert_eq!(a[1].field("status").as_deref(), Some("200"), "{:?}", a[1]);
    assert_eq!(a[1].field("body_len").as_deref(), Some("1048576"));
    assert_eq!(a[1].field("body_sha256"), a[1].field("sent_sha256"));
    assert_eq!(a[2].field("status").as_deref(), Some("200"));
    assert_eq!(up.requests(), 3);
    fg.shutdown();
}

/// A GET over TLS (HTTP/1.1) to `addr`: the response head.
fn tls_head(addr: SocketAddr, certs: &Path) -> String {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_file(certs.join("ca.pem")).unwrap())
        .unwrap();
    let cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
    let sock = std::net::TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, sock);
    tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    text.split("\r\n\r\n").next().unwrap().to_ascii_lowercase()
}

#[test]
fn tcp_answers_advertise_http3_unless_it_is_off() {
    let certs = test_certs(&scratch("h3-altsvc"), &["localhost"]);
    let up = upstream(Behavior::Echo);
    let fg = tls_gateway(up.addr, &certs, "");
    let addr = fg.local_addrs()[0];
    let head = tls_head(addr, &certs);
    assert!(
        head.contains(&format!("alt-svc: h3=\":{}\"; ma=86400", addr.port())),
        "{head}"
    );
    fg.shutdown();

    let off = tls_gateway(up.addr, &certs, "http3 = false");
    let head = tls_head(off.local_addrs()[0], &certs);
    assert!(
        head.starts_with("http/1.1 200") && !head.contains("alt-svc"),
        "{head}"
    );
    // Nothing listens for QUIC: the client gets no answer.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(python())
        .arg(root.join("scripts/h3_client.py"))
        .args(["--port", &off.local_addrs()[0].port().to_string(), "--ca"])
        .arg(certs.join("ca.pem"))
        .args(["--connect-timeout", "1", "GET /"])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "an HTTP/3 answer from a listener with http3 = false"
    );
    off.shutdown();
}

#[test]
fn zero_rtt_forwards_safe_requests_early_and_holds_the_rest_for_the_handshake() {
    let certs = test_certs(&scratch("h3-0rtt"), &["localhost"]);
    let up = upstream(Behavior::Echo);
    let fg = tls_gateway_with(
        up.addr,
        &certs,
        "[admin]\naddress = \"127.0.0.1:0\"\n[http3]\nearly_data = true\n",
        "",
    );
    let port = fg.local_addrs()[0].port();
    // A resumed connection sends both as 0-RTT data; its Finished is held back 600 ms.
    let a = h3_with(
        port,
        &certs,
        &["--resume", "--hold-handshake", "600"],
        &["GET /early", "POST /late 10"],
    );
    for x in &a {
        assert_eq!(x.field("status").as_deref(), Some("200"), "{x:?}");
        assert_eq!(x.field("early_data").as_deref(), Some("true"), "{x:?}");
    }
    let fields = |x: &Answer| x.field("x-up-fields").unwrap_or_default();
    assert!(fields(&a[0]).contains("early-data=1"), "{:?}", a[0]);
    assert!(!fields(&a[1]).contains("early-data"), "{:?}", a[1]);
    // The first connection's GET, then the early GET at once, the POST only once the
    // handshake ended.
    let t = up.arrivals();
    assert_eq!(t.len(), 3, "each request reached the upstream once");
    assert!(
        t[2] - t[1] >= Duration::from_millis(500),
        "the POST went {:?} after the early GET, before the handshake ended",
        t[2] - t[1]
    );
    // The second connection resumed the first one's session, and the early requests are
    // counted.
    let text =
        String::from_utf8_lossy(&get(fg.admin_addr().unwrap(), "/metrics").body).into_owned();
    assert_eq!(
        metric(&text, "fluxgate_http3_resumed_total{"),
        Some(1.0),
        "{text}"
    );
    assert!(
        eventually(Duration::from_secs(5), || {
            let text = String::from_utf8_lossy(&get(fg.admin_addr().unwrap(), "/metrics").body)
                .into_owned();
            text.contains("action=\"forwarded\"} 1") && text.contains("action=\"held\"} 1")
        }),
        "early requests counted"
    );
    fg.shutdown();
}

#[test]
fn zero_rtt_is_refused_unless_turned_on() {
    let certs = test_certs(&scratch("h3-no0rtt"), &["localhost"]);
    let up = upstream(Behavior::Echo);
    let fg = tls_gateway(up.addr, &certs, "");
    let port = fg.local_addrs()[0].port();
    let a = h3_with(
        port,
        &certs,
        &["--resume"],
        &["GET /early", "POST /late 10"],
    );
    for x in &a {
        assert_eq!(x.field("status").as_deref(), Some("200"), "{x:?}");
        assert_eq!(x.field("early_data").as_deref(), Some("false"), "{x:?}");
        assert!(!x
            .field("x-up-fields")
            .unwrap_or_default()
            .contains("early-data"));
    }
    assert_eq!(up.requests(), 3);
    fg.shutdown();
}

#[test]
fn a_low_retry_threshold_makes_clients_prove_their_address_and_they_still_succeed() {
    let certs = test_certs(&scratch("h3-retry"), &["localhost"]);
    let up = upstream(Behavior::Echo);
    let fg = tls_gateway_with(
        up.addr,
        &certs,
        "[admin]\naddress = \"127.0.0.1:0\"\n[http3]\nretry_threshold = 0\n",
        "",
    );
    let a = h3(
        fg.local_addrs()[0].port(),
        &certs,
        &["GET /", "POST /echo 100000"],
    );
    for x in &a {
        assert_eq!(x.field("status").as_deref(), Some("200"), "{x:?}");
        assert_eq!(
            x.field("retried").as_deref(),
            Some("1"),
            "a Retry came first: {x:?}"
        );
    }
    assert_eq!(a[1].field("body_sha256"), a[1].field("sent_sha256"));
    // Counted: the Retry, the handshake, and (once the client has closed) two streams and
    // an RTT sample.
    let admin = fg.admin_addr().unwrap();
    let value = |text: &str, line: &str| metric(text, line).unwrap_or(-1.0);
    let mut text = String::new();
    assert!(
        eventually(Duration::from_secs(5), || {
            text = String::from_utf8_lossy(&get(admin, "/metrics").body).into_owned();
            value(&text, "fluxgate_http3_streams_total{") == 2.0
        }),
        "{text}"
    );
    assert!(
        value(&text, "fluxgate_http3_retries_total{") >= 1.0,
        "{text}"
    );
    assert!(
        value(&text, "fluxgate_http3_handshakes_total{") >= 1.0,
        "{text}"
    );
    assert_eq!(
        value(&text, "fluxgate_http3_rtt_seconds_count{"),
        1.0,
        "{text}"
    );
    assert_eq!(value(&text, "fluxgate_http3_connections{"), 0.0, "{text}");
    fg.shutdown();
    // Under the default threshold, no Retry.
    let fg = tls_gateway(up.addr, &certs, "");
    let a = h3(fg.local_addrs()[0].port(), &certs, &["GET /"]);
    assert_eq!(a[0].field("retried").as_deref(), Some("0"), "{:?}", a[0]);
    fg.shutdown();
}

#[test]
fn an_unvalidated_address_gets_at_most_three_times_what_it_sent() {
    let certs = test_certs(&scratch("h3-amp"), &["localhost"]);
    let up = upstream(Behavior::Echo);
    let fg = tls_gateway(up.addr, &certs, "");
    // One Initial from an address that never answers; the server's flight and its
    // retransmissions, 2 s of them, stay within 3x (RFC 9000 8.1).
    let a = h3_with(
        fg.local_addrs()[0].port(),
        &certs,
        &["--amplification", "2"],
        &["GET /"],
    );
    let sent: u64 = a[0].field("sent").unwrap().parse().unwrap();
    let received: u64 = a[0].field("received").unwrap().parse().unwrap();
    assert!(
        sent >= 1200,
        "a client Initial is padded to 1200 bytes: {sent}"
    );
    assert!(received > 0, "the server answered");
    assert!(
        received <= 3 * sent,
        "{received} bytes sent back for {sent}"
    );
    fg.shutdown();
}

#[test]
fn drain_sends_goaway_and_lets_the_open_request_finish() {
    let certs = test_certs(&scratch("h3-drain"), &["localhost"]);
    let up = upstream(Behavior::Slow(Duration::from_millis(800)));
    let fg = tls_gateway(up.addr, &certs, "");
    let port = fg.local_addrs()[0].port();
    let client = {
        let certs = certs.clone();
        std::thread::spawn(move || h3_with(port, &certs, &["--wait-close", "5"], &["GET /slow"]))
    };
    assert!(
        eventually(Duration::from_secs(10), || up.arrivals().len() == 1),
        "the request reached the upstream"
    );
    let drained = fg.drain(Duration::from_secs(5));
    let a = client.join().unwrap();
    assert_eq!(a[0].field("status").as_deref(), Some("200"), "{:?}", a[0]);
    // GOAWAY named the next stream id the server will not take (after stream 0), then the
    // connection closed with H3_NO_ERROR (0x100).
    assert_eq!(a[1].field("goaway").as_deref(), Some("4"), "{:?}", a[1]);
    assert_eq!(a[1].field("closed").as_deref(), Some("256"), "{:?}", a[1]);
    assert!(drained, "drained within the grace time");
}

#[test]
fn malformed_http3_heads_reset_their_stream_and_reach_no_upstream() {
    let certs = test_certs(&scratch("h3-malformed"), &["localhost"]);
    let up = upstream(Behavior::Echo);
    let fg = tls_gateway(up.addr, &certs, "");
    let port = fg.local_addrs()[0].port();
    for field in [
        "connection=close",
        "keep-alive=5",
        "transfer-encoding=chunked",
        "te=gzip",
        "Upper=x",
        ":bogus=1",
    ] {
        let a = h3_with(port, &certs, &["--header", field], &["GET /"]);
        // H3_MESSAGE_ERROR (0x10e), on the stream alone.
        assert_eq!(
            a[0].field("error").as_deref(),
            Some("stream reset 270"),
            "{field}: {:?}",
            a[0]
        );
    }
    assert_eq!(up.requests(), 0, "nothing malformed reached the upstream");
    let a = h3_with(port, &certs, &["--header", "te=trailers"], &["GET /"]);
    assert_eq!(a[0].field("status").as_deref(), Some("200"), "{:?}", a[0]);
    fg.shutdown();
}

/// Runs Debian's ngtcp2 client (GnuTLS) with `args`; its output (the HTTP exchange).
fn gtlsclient(args: &[&str]) -> String {
    let out = Command::new("gtlsclient")
        .args([
            "--exit-on-all-streams-close",
            "--no-quic-dump",
            "--sni=localhost",
            "--timeout=10s",
        ])
        .args(args)
        .output()
        .expect("gtlsclient (Debian's ngtcp2-client, scripts/deps.sh installs it) runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "gtlsclient failed: {text}");
    text
}

#[test]
fn ngtcp2_client_gets_posts_a_megabyte_resumes_and_sends_0rtt() {
    let dir = scratch("h3-ngtcp2");
    let certs = test_certs(&dir.join("c"), &["localhost"]);
    let up = upstream(Behavior::Echo);
    let fg = tls_gateway_with(up.addr, &certs, "[http3]\nearly_data = true\n", "");
    let port = fg.local_addrs()[0].port().to_string();
    let url = |path: &str| format!("https://localhost:{port}{path}");
    let session = dir.join("session");
    let tp = dir.join("tp");
    let _ = std::fs::remove_file(&session);
    let _ = std::fs::remove_file(&tp);
    let session_arg = format!("--session-file={}", session.display());
    let tp_arg = format!("--tp-file={}", tp.display());

    let first = gtlsclient(&[&session_arg, &tp_arg, "127.0.0.1", &port, &url("/first")]);
    assert!(first.contains("[:status: 200]"), "{first}");
    assert!(first.contains("[x-up-path: /first]"), "{first}");

    // A megabyte up and back.
    let body: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 + i / 251) as u8).collect();
    let sent = dir.join("mb.bin");
    std::fs::write(&sent, &body).unwrap();
    let down = dir.join("down");
    std::fs::create_dir_all(&down).unwrap();
    let data_arg = format!("--data={}", sent.display());
    let down_arg = format!("--download={}", down.display());
    let post = gtlsclient(&[
        "-m",
        "POST",
        &data_arg,
        &down_arg,
        "127.0.0.1",
        &port,
        &url("/echo"),
    ]);
    assert!(post.contains("[:status: 200]"), "{post}");
    assert_eq!(
        std::fs::read(down.join("echo")).unwrap(),
        body,
        "the same megabyte back"
    );

    // Resumed with its session and transport parameters: the request goes as 0-RTT data
    // and reaches the upstream with Early-Data: 1.
    let early = gtlsclient(&[&session_arg, &tp_arg, "127.0.0.1", &port, &url("/early")]);
    assert!(early.contains("[:status: 200]"), "{early}");
    assert!(
        early.contains("early-data=1"),
        "the upstream saw no Early-Data: 1: {early}"
    );
    fg.shutdown();
}

#[test]
fn an_http3_upstream_takes_requests_over_one_connection() {
    let certs = test_certs(&scratch("h3-upstream"), &["localhost"]);
    let up = upstream(Behavior::Echo);
    // The HTTP/3 origin: a fluxgate terminating QUIC, forwarding to the echo upstream.
    let origin = tls_gateway_with(up.addr, &certs, "[admin]\naddress = \"127.0.0.1:0\"\n", "");
    let front = start(
        &format!(
            "[[listener]]\naddress = \"127.0.0.1:0\"\nupstream = \"o\"\n\
             [[upstream]]\nname = \"o\"\nendpoints = [\"{}\"]\nprotocol = \"h3\"\n\
             tls = {{ sni = \"localhost\", ca = \"{}\" }}\n",
            origin.local_addrs()[0],
            certs.join("ca.pem").display()
        ),
        IoMode::Epoll,
    );
    let addr = front.local_addrs()[0];
    let mut c = RawClient::connect(addr);
    c.send(b"GET /over-h3?q=1 HTTP/1.1\r\nHost: app.example\r\n\r\n");
    let r = c.read_response().expect("answered");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-up-path"), Some("/over-h3?q=1"));
    assert_eq!(
        r.header("x-up-host"),
        Some("app.example"),
        "the authority went as :authority"
    );
    // A megabyte up and back through both gateways.
    let body: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    let mut req = format!(
        "POST /echo HTTP/1.1\r\nHost: app.example\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(&body);
    c.send(&req);
    let r = c.read_response().expect("answered");
    assert_eq!(r.status, 200);
    assert!(
        r.body == body,
        "the same megabyte back ({} bytes)",
        r.body.len()
    );
    // Both went over one QUIC connection, which stays open for the next.
    let metrics =
        String::from_utf8_lossy(&get(origin.admin_addr().unwrap(), "/metrics").body).into_owned();
    assert_eq!(
        metric(&metrics, "fluxgate_http3_connections{"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(up.requests(), 2);
    front.shutdown();
    origin.shutdown();
}

#[test]
fn a_reload_keeps_http3_serving_and_its_open_connections() {
    let certs = test_certs(&scratch("h3-reload"), &["localhost"]);
    let up = upstream(Behavior::Echo);
    let toml = |route: &str| {
        format!(
            "[[listener]]\naddress = \"127.0.0.1:0\"\n\
             [[listener.route]]\npath = \"/gen\"\nrespond = {{ status = 200, body = \"{route}\" }}\n\
             [[listener.route]]\nupstream = \"u\"\n\
             [listener.tls]\ncertificates = [{{ cert = \"{}\", key = \"{}\" }}]\n\
             [[upstream]]\nname = \"u\"\nendpoints = [\"{}\"]\n",
            certs.join("cert.pem").display(),
            certs.join("key.pem").display(),
            up.addr
        )
    };
    let fg = start(&toml("one"), IoMode::Epoll);
    let addr = fg.local_addrs()[0];
    let sha = |body: &str| {
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, body.as_bytes());
        d.as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let b = h3(addr.port(), &certs, &["GET /gen"]);
    assert_eq!(b[0].field("body_sha256"), Some(sha("one")), "{:?}", b[0]);
    // One connection across the reload: a request before it, one after.
    let client = {
        let certs = certs.clone();
        std::thread::spawn(move || {
            h3_with(
                addr.port(),
                &certs,
                &["--pause", "2"],
                &["GET /first", "GET /gen"],
            )
        })
    };
    assert!(eventually(Duration::from_secs(10), || up.requests() == 1));
    // The same configured address: the listener, its sockets and connections carry on.
    let mut next = fluxgate_conf::Config::from_toml(&toml("two")).unwrap();
    next.runtime.workers = 1;
    next.runtime.io = IoMode::Epoll;
    fg.reload(next).expect("reloads");
    let a = client.join().unwrap();
    assert_eq!(a[0].field("status").as_deref(), Some("200"), "{:?}", a[0]);
    assert_eq!(
        a[1].field("status").as_deref(),
        Some("200"),
        "the connection outlived the reload: {:?}",
        a[1]
    );
    assert_eq!(
        a[1].field("body_sha256"),
        Some(sha("two")),
        "served by the new routes: {:?}",
        a[1]
    );
    // And new connections are served on the kept UDP socket.
    let b = h3(addr.port(), &certs, &["GET /gen"]);
    assert_eq!(b[0].field("body_sha256"), Some(sha("two")));
    fg.shutdown();
}
