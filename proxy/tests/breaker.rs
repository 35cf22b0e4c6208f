//! Upstream circuit breakers through sockets: a test upstream that fails or succeeds on
//! command, a fallback upstream, the answers seen by the client and the counts at the
//! upstreams and on /metrics.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fluxgate_conf::IoMode;
use support::{metric, read_head, serve_in_background, upstream, Behavior, RawClient};

/// An HTTP/1.1 upstream that answers 500 while `failing`, else 200; counts requests.
struct Flaky {
    addr: SocketAddr,
    failing: Arc<AtomicBool>,
    requests: Arc<AtomicUsize>,
}

fn flaky() -> Flaky {
    let failing = Arc::new(AtomicBool::new(true));
    let requests = Arc::new(AtomicUsize::new(0));
    let (f, r) = (Arc::clone(&failing), Arc::clone(&requests));
    let addr = serve_in_background(move |mut conn| {
        let (f, r) = (Arc::clone(&f), Arc::clone(&r));
        async move {
            use tokio::io::AsyncWriteExt;
            let mut buf = Vec::new();
            while read_head(&mut conn, &mut buf).await.is_some() {
                r.fetch_add(1, Ordering::SeqCst);
                let status = match f.load(Ordering::SeqCst) {
                    true => "500 Internal Server Error",
                    false => "200 OK",
                };
                let resp = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
                if conn.write_all(resp.as_bytes()).await.is_err() {
                    return;
                }
            }
        }
    });
    Flaky {
        addr,
        failing,
        requests,
    }
}

fn status(c: &mut RawClient) -> u16 {
    c.send(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n");
    c.read_response().expect("an answer").status
}

#[test]
fn a_breaker_opens_answers_from_the_fallback_half_opens_and_closes() {
    let (main, solo, backup) = (flaky(), flaky(), upstream(Behavior::Echo));
    let fg = support::start(
        &format!(
            "[admin]\naddress = \"127.0.0.1:0\"\n\
             [[listener]]\naddress = \"127.0.0.1:0\"\nupstream = \"main\"\n\
             [[listener]]\naddress = \"127.0.0.1:0\"\nupstream = \"solo\"\n\
             [[upstream]]\nname = \"main\"\nendpoints = [\"{}\"]\npassive = {{ consecutive_failures = 0 }}\n\
             [upstream.breaker]\nconsecutive_failures = 3\nopen_for = \"300ms\"\nhalf_open_probes = 2\nfallback = \"backup\"\n\
             [[upstream]]\nname = \"solo\"\nendpoints = [\"{}\"]\npassive = {{ consecutive_failures = 0 }}\n\
             [upstream.breaker]\nconsecutive_failures = 3\nopen_for = \"60s\"\nstatus = 503\n\
             [[upstream]]\nname = \"backup\"\nendpoints = [\"{}\"]\n",
            main.addr, solo.addr, backup.addr
        ),
        IoMode::Epoll,
    );
    let metrics =
        || String::from_utf8(support::get(fg.admin_addr().unwrap(), "/metrics").body).unwrap();
    let mut c = RawClient::connect(fg.local_addrs()[0]);
    // Three failures in a row open it.
    for _ in 0..3 {
        assert_eq!(status(&mut c), 500);
    }
    assert_eq!(main.requests.load(Ordering::SeqCst), 3);
    // Open: answered by the fallback, the failing upstream untouched.
    for _ in 0..5 {
        assert_eq!(status(&mut c), 200);
    }
    assert_eq!(main.requests.load(Ordering::SeqCst), 3);
    assert_eq!(backup.requests(), 5);
    let m = metrics();
    assert_eq!(
        metric(&m, "fluxgate_breaker_state{upstream=\"main\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, "fluxgate_breaker_opened_total{upstream=\"main\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, "fluxgate_breaker_refused_total{upstream=\"main\"}"),
        Some(5.0)
    );
    // After open_for, with the upstream well again: two probes go to it and close it.
    main.failing.store(false, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(350));
    for _ in 0..2 {
        assert_eq!(status(&mut c), 200);
    }
    assert_eq!(main.requests.load(Ordering::SeqCst), 5);
    let m = metrics();
    assert_eq!(
        metric(&m, "fluxgate_breaker_state{upstream=\"main\"}"),
        Some(0.0)
    );
    for _ in 0..10 {
        assert_eq!(status(&mut c), 200);
    }
    assert_eq!(main.requests.load(Ordering::SeqCst), 15);
    assert_eq!(backup.requests(), 5);
    // A failing probe opens it again at once.
    main.failing.store(true, Ordering::SeqCst);
    for _ in 0..3 {
        assert_eq!(status(&mut c), 500);
    }
    std::thread::sleep(Duration::from_millis(350));
    assert_eq!(status(&mut c), 500, "the probe fails");
    assert_eq!(status(&mut c), 200, "open again: the fallback");
    assert_eq!(main.requests.load(Ordering::SeqCst), 19);

    // Without a fallback: the configured answer, the upstream untouched.
    let mut c = RawClient::connect(fg.local_addrs()[1]);
    for _ in 0..3 {
        assert_eq!(status(&mut c), 500);
    }
    for _ in 0..4 {
        assert_eq!(status(&mut c), 503);
    }
    assert_eq!(solo.requests.load(Ordering::SeqCst), 3);
    fg.shutdown();
}

#[test]
fn a_cap_on_concurrent_requests_refuses_the_excess() {
    let slow = upstream(Behavior::Slow(Duration::from_secs(2)));
    let fg = support::start(
        &format!(
            "[[listener]]\naddress = \"127.0.0.1:0\"\nupstream = \"slow\"\n\
             [[upstream]]\nname = \"slow\"\nendpoints = [\"{}\"]\n\
             [upstream.breaker]\nmax_concurrent = 4\n",
            slow.addr
        ),
        IoMode::Epoll,
    );
    let addr = fg.local_addrs()[0];
    // Four in flight, each held two seconds by the upstream; a fifth is refused.
    let held: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                let mut c = RawClient::connect(addr);
                status(&mut c)
            })
        })
        .collect();
    assert!(support::eventually(Duration::from_secs(10), || slow
        .requests()
        >= 4));
    let mut c = RawClient::connect(addr);
    assert_eq!(status(&mut c), 503);
    assert_eq!(slow.requests(), 4);
    // The held four are answered as usual.
    for h in held {
        assert_eq!(h.join().unwrap(), 200);
    }
    fg.shutdown();
}
