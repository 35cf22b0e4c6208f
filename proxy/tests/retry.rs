//! The retry rule through sockets, for HTTP/1.1 and h2c upstreams: a request that fails with
//! its connection is sent once more on a new one when it is idempotent or the upstream never
//! got it; anything else gets 502 and is never delivered twice; nothing is tried three times.
//! Each upstream counts every request it received, answered or not.

mod support;

use fluxgate_conf::IoMode;
use support::*;

/// One request on a fresh client connection; bodiless (PUT and POST with Content-Length 0).
fn send(fg: &fluxgate::Handle, method: &str, path: &str) -> RawResponse {
    let mut c = RawClient::connect(fg.local_addrs()[0]);
    let len = if matches!(method, "PUT" | "POST") {
        "Content-Length: 0\r\n"
    } else {
        ""
    };
    c.send(format!("{method} {path} HTTP/1.1\r\nHost: x\r\n{len}\r\n").as_bytes());
    c.read_response().expect("a response")
}

const IDEMPOTENT: [&str; 4] = ["GET", "HEAD", "PUT", "DELETE"];

/// After one answered request, `method` fails on the first connection and is sent once more
/// on a new one: three requests reached the upstream over two connections.
fn assert_retried_once(up: &Upstream, fg: &fluxgate::Handle, method: &str, first_try: &str) {
    assert_eq!(send(fg, "GET", "/first").status, 200);
    let r = send(fg, method, "/second");
    assert_eq!(r.status, 200, "{method}");
    assert_eq!(r.header("x-up-method"), Some(method));
    assert_eq!(
        up.requests(),
        3,
        "{method}: first, the {first_try} attempt, the retry"
    );
    assert_eq!(
        up.accepted(),
        2,
        "{method}: the retry took a new connection"
    );
}

#[test]
fn http1_idempotent_requests_are_retried_once_on_a_stale_connection() {
    for method in IDEMPOTENT {
        // The pooled connection dies under the second request, after the upstream read it.
        let up = upstream(Behavior::DropSecond);
        let fg = proxy_to(up.addr, "", "", IoMode::Epoll);
        assert_retried_once(&up, &fg, method, "stale");
        fg.shutdown();
    }
}

#[test]
fn http1_bodiless_post_that_reached_the_upstream_is_not_retried() {
    let up = upstream(Behavior::DropSecond);
    let fg = proxy_to(up.addr, "", "", IoMode::Epoll);
    assert_eq!(send(&fg, "GET", "/first").status, 200);
    assert_eq!(send(&fg, "POST", "/order").status, 502);
    assert_eq!(up.requests(), 2, "the POST was delivered once");
    assert_eq!(
        up.accepted(),
        1,
        "no connection was opened to send it again"
    );
    fg.shutdown();
}

#[test]
fn http1_never_more_than_one_retry() {
    let up = upstream(Behavior::DropAllButFirst);
    let fg = proxy_to(up.addr, "", "", IoMode::Epoll);
    assert_eq!(send(&fg, "GET", "/first").status, 200);
    assert_eq!(send(&fg, "GET", "/again").status, 502);
    assert_eq!(up.requests(), 3, "first, the stale attempt, one retry");
    assert_eq!(up.accepted(), 2);
    fg.shutdown();
}

fn h2c(act: fn(usize) -> H2Act) -> (Upstream, fluxgate::Handle) {
    let up = h2c_upstream_acting(act);
    let fg = proxy_to(up.addr, "protocol = \"h2c\"", "", IoMode::Epoll);
    (up, fg)
}

#[test]
fn h2c_idempotent_requests_are_retried_once_when_the_connection_breaks() {
    for method in IDEMPOTENT {
        let (up, fg) = h2c(|n| if n == 1 { H2Act::Drop } else { H2Act::Answer });
        assert_retried_once(&up, &fg, method, "broken");
        fg.shutdown();
    }
}

#[test]
fn h2c_bodiless_post_that_reached_the_upstream_is_not_retried() {
    let (up, fg) = h2c(|n| if n == 1 { H2Act::Drop } else { H2Act::Answer });
    assert_eq!(send(&fg, "GET", "/first").status, 200);
    assert_eq!(send(&fg, "POST", "/order").status, 502);
    assert_eq!(up.requests(), 2, "the POST was delivered once");
    fg.shutdown();
}

#[test]
fn h2c_request_the_upstream_refused_unprocessed_is_retried_whatever_its_method() {
    for method in ["POST", "PATCH", "GET"] {
        let (up, fg) = h2c(|n| if n == 0 { H2Act::Refuse } else { H2Act::Answer });
        let r = send(&fg, method, "/refused");
        assert_eq!(r.status, 200, "{method}");
        assert_eq!(r.header("x-up-method"), Some(method));
        assert_eq!(up.requests(), 2, "{method}: refused, then answered");
        fg.shutdown();
    }
}

#[test]
fn h2c_never_more_than_one_retry() {
    let (up, fg) = h2c(|n| if n == 0 { H2Act::Answer } else { H2Act::Drop });
    assert_eq!(send(&fg, "GET", "/first").status, 200);
    assert_eq!(send(&fg, "GET", "/again").status, 502);
    assert_eq!(up.requests(), 3, "first, the broken attempt, one retry");
    assert_eq!(up.accepted(), 2);
    // Refused every time: still one retry only.
    let (up, fg2) = h2c(|_| H2Act::Refuse);
    assert_eq!(send(&fg2, "POST", "/refused").status, 502);
    assert_eq!(up.requests(), 2);
    fg.shutdown();
    fg2.shutdown();
}

#[test]
fn more_attempts_are_capped_by_the_retry_budget_under_a_failing_upstream() {
    // Every attempt after the very first request fails after the upstream read it: GETs may
    // go again, up to 5 tries each, but the budget allows 10% of requests (at least 2).
    let up = upstream(Behavior::DropAllButFirst);
    let fg = start(
        &format!(
            "[admin]\naddress = \"127.0.0.1:0\"\n[[listener]]\naddress = \"127.0.0.1:0\"\nupstream = \"u\"\n\
             [[upstream]]\nname = \"u\"\nendpoints = [\"{}\"]\npassive = {{ consecutive_failures = 0 }}\n\
             [upstream.retry]\nattempts = 5\nbackoff = \"1ms\"\nmax_backoff = \"2ms\"\nbudget = 0.1\nmin_retries = 2\n",
            up.addr
        ),
        IoMode::Epoll,
    );
    assert_eq!(send(&fg, "GET", "/first").status, 200);
    for _ in 0..60 {
        assert_eq!(send(&fg, "GET", "/again").status, 502);
    }
    let m = String::from_utf8(get(fg.admin_addr().unwrap(), "/metrics").body).unwrap();
    let retries = metric(&m, "fluxgate_upstream_retries_total{upstream=\"u\"}").unwrap();
    let denied = metric(&m, "fluxgate_upstream_retries_denied_total{upstream=\"u\"}").unwrap();
    // One free retry (the stale pooled connection), then 10% of 61 requests: 6.
    assert!(retries <= 7.0, "{retries} retries");
    assert!(
        retries >= 3.0,
        "{retries} retries: more attempts happen within the budget"
    );
    assert!(denied >= 50.0, "{denied} denied");
    // What reached the upstream: each request once, plus the retries; never 5 tries each.
    assert_eq!(up.requests() as f64, 61.0 + retries);
    // A POST that reached the upstream is never sent again, whatever the attempts.
    let before = up.requests();
    assert_eq!(send(&fg, "POST", "/order").status, 502);
    assert_eq!(up.requests(), before + 1);
    fg.shutdown();
}
