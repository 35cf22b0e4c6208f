//! fluxgate's HTTP/1.1 upstream client against an upstream that writes scripted bytes:
//! every way a response body can be delimited, interim answers, reuse only after a cleanly
//! ended exchange, and malformed or cut-short responses that must not reach the client as
//! complete answers.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use fluxgate_conf::IoMode;
use support::*;
use tokio::io::AsyncWriteExt;

/// What the scripted upstream answers to a request for `path`, and whether it then closes.
fn script(path: &str) -> (&'static [u8], bool) {
    match path {
        "/chunked" => (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
              5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-Trailer: 1\r\n\r\n",
            false,
        ),
        "/len" => (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", false),
        "/until-close" => (b"HTTP/1.1 200 OK\r\n\r\nread until close", true),
        "/close-header" => (
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
            false,
        ),
        "/continue" => (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            false,
        ),
        "/no-content" => (b"HTTP/1.1 204 No Content\r\n\r\n", false),
        "/two-lengths" => (
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            false,
        ),
        "/length-and-chunked" => (
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            false,
        ),
        "/short" => (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", true),
        "/bad-chunk" => (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhi\r\n",
            false,
        ),
        _ => (b"SSH-2.0-not-http\r\n\r\n", false),
    }
}

/// The scripted upstream; counts the connections it accepted.
fn scripted_upstream() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    let addr = serve_in_background(move |mut s: tokio::net::TcpStream| {
        count.fetch_add(1, Ordering::SeqCst);
        async move {
            let mut buf = Vec::new();
            while let Some(head) = read_head(&mut s, &mut buf).await {
                let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
                let (answer, close) = script(&path);
                if s.write_all(answer).await.is_err() || close {
                    return;
                }
            }
        }
    });
    (addr, accepted)
}

#[test]
fn every_response_framing_reaches_the_client_and_reuse_follows_it() {
    let (up, accepted) = scripted_upstream();
    let fg = proxy_to(up, "", "", IoMode::Epoll);
    let addr = fg.local_addrs()[0];

    let r = get(addr, "/chunked");
    assert_eq!((r.status, r.body.as_slice()), (200, &b"hello, world"[..]));
    let r = get(addr, "/len");
    assert_eq!((r.status, r.body.as_slice()), (200, &b"abc"[..]));
    let r = get(addr, "/continue");
    assert_eq!((r.status, r.body.as_slice()), (200, &b"ok"[..]));
    let r = get(addr, "/no-content");
    assert_eq!(r.status, 204);
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "chunked, length, 1xx and 204 exchanges end cleanly: one connection serves them all"
    );

    let r = get(addr, "/until-close");
    assert_eq!(
        (r.status, r.body.as_slice()),
        (200, &b"read until close"[..])
    );
    assert_eq!(get(addr, "/len").body, b"abc");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "a body delimited by close is not reused"
    );
    assert_eq!(get(addr, "/close-header").body, b"ok");
    assert_eq!(get(addr, "/len").body, b"abc");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        3,
        "Connection: close is honoured"
    );
    fg.shutdown();
}

#[test]
fn malformed_or_cut_responses_never_look_complete() {
    let (up, accepted) = scripted_upstream();
    let fg = proxy_to(up, "", "", IoMode::Epoll);
    let addr = fg.local_addrs()[0];

    for path in ["/two-lengths", "/length-and-chunked", "/not-http"] {
        assert_eq!(get(addr, path).status, 502, "{path}");
    }
    // The head was good, the body is not: the client sees its connection end before a
    // complete response.
    for path in ["/short", "/bad-chunk"] {
        let mut c = RawClient::connect(addr);
        c.send(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
        assert!(
            c.read_response().is_none(),
            "{path} came through as complete"
        );
    }
    let before = accepted.load(Ordering::SeqCst);
    assert_eq!(get(addr, "/len").body, b"abc");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        before + 1,
        "no connection that failed was pooled"
    );
    fg.shutdown();
}
