//! Strict HTTP/1.1 (RFC 9112) through real sockets: the target's authority is the host of an
//! absolute-form request, Host is required once, h2c upgrades are never forwarded, a route's
//! body limit answers 413, and an oversized upstream head is a 502, never passed on.

mod support;

use fluxgate_conf::IoMode;
use support::*;

fn send(addr: std::net::SocketAddr, raw: &[u8]) -> RawResponse {
    let mut c = RawClient::connect(addr);
    c.send(raw);
    c.read_response().expect("a response")
}

#[test]
fn absolute_form_routes_and_forwards_by_the_targets_authority() {
    let (a, b) = (upstream(Behavior::Echo), upstream(Behavior::Echo));
    let fg = start(
        &format!(
            "[[upstream]]\nname = \"a\"\nendpoints = [\"{}\"]\n\
             [[upstream]]\nname = \"b\"\nendpoints = [\"{}\"]\n\
             [[listener]]\naddress = \"127.0.0.1:0\"\n\
             [[listener.route]]\nhost = \"a.example\"\nupstream = \"a\"\n\
             [[listener.route]]\nupstream = \"b\"\n",
            a.addr, b.addr
        ),
        IoMode::Epoll,
    );
    let r = send(
        fg.local_addrs()[0],
        b"GET http://a.example/p?q=1 HTTP/1.1\r\nHost: b.example\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("x-up-port"),
        Some(a.addr.port().to_string().as_str())
    );
    assert_eq!(
        r.header("x-up-host"),
        Some("a.example"),
        "one Host: the authority"
    );
    assert_eq!(
        r.header("x-up-path"),
        Some("/p?q=1"),
        "origin form upstream"
    );
    fg.shutdown();
}

#[test]
fn http11_needs_exactly_one_host() {
    let up = upstream(Behavior::Echo);
    let fg = proxy_with_admin(up.addr, IoMode::Epoll);
    let addr = fg.local_addrs()[0];
    for raw in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET http://a.example/ HTTP/1.1\r\n\r\n",
    ] {
        let mut c = RawClient::connect(addr);
        c.send(raw);
        assert_eq!(c.read_response().expect("an answer").status, 400, "{raw:?}");
        assert!(c.closed());
    }
    assert_eq!(
        send(addr, b"GET / HTTP/1.0\r\n\r\n").status,
        200,
        "HTTP/1.0 needs none"
    );
    assert_eq!(up.requests(), 1, "no refused request was forwarded");
    let m = String::from_utf8(get(fg.admin_addr().unwrap(), "/metrics").body).unwrap();
    let series = format!("fluxgate_refusals_total{{listener=\"{addr}\",reason=\"bad_host\"}} ");
    assert_eq!(metric(&m, &series), Some(3.0), "{m}");
    fg.shutdown();
}

#[test]
fn h2c_upgrades_are_never_forwarded_or_answered() {
    let up = upstream(Behavior::Echo);
    let fg = proxy_to(up.addr, "", "", IoMode::Epoll);
    let r = send(
        fg.local_addrs()[0],
        b"GET /up HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\
          HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    );
    assert_eq!(r.status, 200, "served as plain HTTP/1.1, not switched");
    let seen = r.header("x-up-headers").unwrap();
    for name in ["upgrade", "http2-settings", "connection"] {
        assert!(
            !seen.split(',').any(|h| h == name),
            "{name} forwarded: {seen}"
        );
    }
    // HTTP2-Settings goes even when Connection does not name it.
    let r = send(
        fg.local_addrs()[0],
        b"GET /up HTTP/1.1\r\nHost: x\r\nHTTP2-Settings: AAMAAABk\r\n\r\n",
    );
    assert!(!r.header("x-up-headers").unwrap().contains("http2-settings"));
    fg.shutdown();
}

#[test]
fn a_routes_body_limit_answers_413() {
    let up = upstream(Behavior::Echo);
    let fg = start(
        &format!(
            "[[upstream]]\nname = \"u\"\nendpoints = [\"{}\"]\n\
             [[listener]]\naddress = \"127.0.0.1:0\"\n\
             [[listener.route]]\nupstream = \"u\"\nmax_body = 10\n",
            up.addr
        ),
        IoMode::Epoll,
    );
    let addr = fg.local_addrs()[0];
    // Declared too long: refused at once, nothing forwarded, the upload never read.
    let mut c = RawClient::connect(addr);
    c.send(b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\n");
    assert_eq!(c.read_response().expect("an answer").status, 413);
    assert!(c.closed());
    assert_eq!(up.requests(), 0);
    // Within the limit: forwarded.
    let r = send(
        addr,
        b"POST /ok HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    );
    assert_eq!((r.status, &r.body[..]), (200, &b"hello"[..]));
    // Chunked, passing the limit as it streams.
    let mut c = RawClient::connect(addr);
    c.send(
        b"POST /stream HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n12345678\r\n",
    );
    c.send(b"8\r\n12345678\r\n0\r\n\r\n");
    assert_eq!(c.read_response().expect("an answer").status, 413);
    // HTTP/2: the same declared length.
    let body = "x".repeat(20);
    let h2 = std::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--http2-prior-knowledge",
        ])
        .args(["--max-time", "5", "--data", &body])
        .arg(format!("http://{addr}/h2"))
        .output()
        .expect("curl runs");
    assert_eq!(String::from_utf8_lossy(&h2.stdout), "413");
    fg.shutdown();
}

#[test]
fn an_oversized_upstream_head_is_a_502() {
    // 70 KiB of fields, then 200 small ones: over the 64 KiB and 128-field limits.
    let addr = serve_in_background(|mut s| async move {
        use tokio::io::AsyncWriteExt;
        let mut buf = Vec::new();
        let Some(head) = read_head(&mut s, &mut buf).await else {
            return;
        };
        let mut answer = String::from("HTTP/1.1 200 OK\r\n");
        if head.starts_with("GET /long ") {
            answer.push_str(&format!("X-Long: {}\r\n", "v".repeat(70 << 10)));
        } else {
            for i in 0..200 {
                answer.push_str(&format!("X-F{i}: v\r\n"));
            }
        }
        answer.push_str("Content-Length: 2\r\n\r\nok");
        let _ = s.write_all(answer.as_bytes()).await;
    });
    let fg = proxy_to(addr, "", "", IoMode::Epoll);
    for path in ["/long", "/many"] {
        let r = get(fg.local_addrs()[0], path);
        assert_eq!(r.status, 502, "{path}");
        assert!(r.header("x-long").is_none() && r.header("x-f0").is_none());
    }
    fg.shutdown();
}

/// Regression (found by the h1_request_head fuzz target): an HTTP/1.0 request without Host
/// went upstream as HTTP/1.1 without one. It now carries the endpoint's address.
#[test]
fn a_hostless_http10_request_goes_upstream_with_the_endpoints_address() {
    let up = upstream(Behavior::Echo);
    let fg = proxy_to(up.addr, "", "", IoMode::Epoll);
    let r = send(fg.local_addrs()[0], b"GET /old HTTP/1.0\r\n\r\n");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-up-version"), Some("HTTP/1.1"));
    assert_eq!(r.header("x-up-host"), Some(up.addr.to_string().as_str()));
    fg.shutdown();
}
