//! Weighted and sticky splits through sockets: three test upstreams behind one route, the
//! shares counted at the upstreams.

mod support;

use fluxgate_conf::IoMode;
use support::{upstream, Behavior, RawClient};

fn gateway(extra: &str, ups: &[&support::Upstream]) -> fluxgate::Handle {
    let mut text = format!(
        "[[listener]]\naddress = \"127.0.0.1:0\"\n[[listener.route]]\npath_prefix = \"/\"\n\
         split = {{ targets = [{{ upstream = \"v1\", weight = 70 }}, {{ upstream = \"v2\", weight = 25 }}, \
         {{ upstream = \"v3\", weight = 5 }}]{extra} }}\n"
    );
    for (i, u) in ups.iter().enumerate() {
        text += &format!(
            "[[upstream]]\nname = \"v{}\"\nendpoints = [\"{}\"]\n",
            i + 1,
            u.addr
        );
    }
    support::start(&text, IoMode::Epoll)
}

fn counts(ups: &[&support::Upstream]) -> Vec<usize> {
    ups.iter().map(|u| u.requests()).collect()
}

/// One GET; its status (200, or 500 from a failing canary).
fn get(c: &mut RawClient, headers: &str) -> u16 {
    c.send(format!("GET / HTTP/1.1\r\nhost: t\r\n{headers}\r\n").as_bytes());
    c.read_response().expect("an answer").status
}

#[test]
fn sticky_users_split_70_25_5_stay_put_and_a_header_forces_the_canary() {
    let (a, b, c) = (
        upstream(Behavior::Echo),
        upstream(Behavior::Echo),
        upstream(Behavior::Echo),
    );
    let ups = [&a, &b, &c];
    let fg = gateway(
        ", sticky_header = \"x-user\", force_cookie = \"canary\"",
        &ups,
    );
    let mut client = RawClient::connect(fg.local_addrs()[0]);
    for i in 0..10_000 {
        assert_eq!(get(&mut client, &format!("x-user: user-{i}\r\n")), 200);
    }
    let n = counts(&ups);
    // 70 / 25 / 5 of 10,000 users, within 2 points each.
    for (got, want) in n.iter().zip([7_000usize, 2_500, 500]) {
        assert!(got.abs_diff(want) < 200, "{n:?}");
    }
    // A user comes back to the same upstream, request after request.
    for i in 0..30 {
        let before = counts(&ups);
        for _ in 0..5 {
            get(&mut client, &format!("x-user: user-{i}\r\n"));
        }
        let moved: Vec<usize> = counts(&ups)
            .iter()
            .zip(&before)
            .map(|(a, b)| a - b)
            .collect();
        assert!(moved.contains(&5), "user-{i} spread over {moved:?}");
    }
    // The tester's cookie names the canary, whatever the user's bucket.
    let before = counts(&ups);
    for i in 0..50 {
        get(
            &mut client,
            &format!("x-user: user-{i}\r\ncookie: a=1; canary=v3\r\n"),
        );
    }
    let after = counts(&ups);
    assert_eq!(after[2] - before[2], 50, "{before:?} -> {after:?}");
    fg.shutdown();
}

#[test]
fn without_a_user_key_requests_are_drawn_by_weight() {
    let (a, b, c) = (
        upstream(Behavior::Echo),
        upstream(Behavior::Echo),
        upstream(Behavior::Echo),
    );
    let ups = [&a, &b, &c];
    let fg = gateway(", force_header = \"x-canary\"", &ups);
    let mut client = RawClient::connect(fg.local_addrs()[0]);
    for _ in 0..5_000 {
        get(&mut client, "");
    }
    let n = counts(&ups);
    for (got, want) in n.iter().zip([3_500usize, 1_250, 250]) {
        assert!(got.abs_diff(want) < 150, "{n:?}");
    }
    // The override header sends a tester to the 5% target every time.
    for _ in 0..40 {
        get(&mut client, "x-canary: v3\r\n");
    }
    assert_eq!(counts(&ups)[2] - n[2], 40);
    fg.shutdown();
}

/// An HTTP/1.1 upstream whose delay and failure are set by the test; counts requests.
struct Tunable {
    addr: std::net::SocketAddr,
    delay_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
    failing: std::sync::Arc<std::sync::atomic::AtomicBool>,
    requests: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

fn tunable() -> Tunable {
    use std::sync::atomic::Ordering::SeqCst;
    use std::sync::Arc;
    let delay_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (d, f, r) = (
        Arc::clone(&delay_ms),
        Arc::clone(&failing),
        Arc::clone(&requests),
    );
    let addr = support::serve_in_background(move |mut conn| {
        let (d, f, r) = (Arc::clone(&d), Arc::clone(&f), Arc::clone(&r));
        async move {
            use tokio::io::AsyncWriteExt;
            let mut buf = Vec::new();
            while support::read_head(&mut conn, &mut buf).await.is_some() {
                r.fetch_add(1, SeqCst);
                tokio::time::sleep(std::time::Duration::from_millis(d.load(SeqCst))).await;
                let status = if f.load(SeqCst) { "500 Oops" } else { "200 OK" };
                let resp = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
                if conn.write_all(resp.as_bytes()).await.is_err() {
                    return;
                }
            }
        }
    });
    Tunable {
        addr,
        delay_ms,
        failing,
        requests,
    }
}

#[test]
fn a_misbehaving_canary_is_rolled_back_probes_and_recovers() {
    use std::sync::atomic::Ordering::SeqCst;
    use std::time::{Duration, Instant};
    let stable = upstream(Behavior::Echo);
    let canary = tunable();
    canary.delay_ms.store(150, SeqCst);
    let fg = support::start(
        &format!(
            "[admin]\naddress = \"127.0.0.1:0\"\n\
             [[listener]]\naddress = \"127.0.0.1:0\"\n[[listener.route]]\nname = \"app\"\npath_prefix = \"/\"\n\
             split = {{ targets = [{{ upstream = \"stable\", weight = 50 }}, {{ upstream = \"canary\", weight = 50, canary = true }}], \
             rollback = {{ p95 = \"50ms\", error_rate = 0.2, min_requests = 8, window = \"2s\", latency_hold = \"700ms\", error_hold = \"700ms\", probe_weight = 10 }} }}\n\
             [[upstream]]\nname = \"stable\"\nendpoints = [\"{}\"]\n\
             [[upstream]]\nname = \"canary\"\nendpoints = [\"{}\"]\npassive = {{ consecutive_failures = 0 }}\n",
            stable.addr, canary.addr
        ),
        IoMode::Epoll,
    );
    let addr = fg.local_addrs()[0];
    let state = || {
        let m = String::from_utf8(support::get(fg.admin_addr().unwrap(), "/metrics").body).unwrap();
        let line = format!(
            "fluxgate_canary_state{{listener=\"{addr}\",route=\"app\",upstream=\"canary\"}}"
        );
        support::metric(&m, &line)
    };
    // Load from four clients until `cond`, at most `limit`.
    let load_until = |limit: Duration, cond: &dyn Fn() -> bool| {
        let end = Instant::now() + limit;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let stop = std::sync::Arc::clone(&stop);
                std::thread::spawn(move || {
                    let mut c = RawClient::connect(addr);
                    while !stop.load(SeqCst) && Instant::now() < end {
                        get(&mut c, "");
                    }
                })
            })
            .collect();
        let met = support::eventually(limit, cond);
        stop.store(true, SeqCst);
        threads.into_iter().for_each(|t| t.join().unwrap());
        met
    };
    assert_eq!(state(), Some(0.0));
    // Slow: rolled back within one window.
    assert!(
        load_until(Duration::from_secs(3), &|| state() == Some(1.0)),
        "not rolled back"
    );
    // Rolled back: the canary gets nothing, the stable target everything.
    let (c0, s0) = (canary.requests.load(SeqCst), stable.requests());
    let mut c = RawClient::connect(addr);
    for _ in 0..20 {
        get(&mut c, "");
    }
    assert_eq!(canary.requests.load(SeqCst), c0);
    assert_eq!(stable.requests(), s0 + 20);
    // Healthy again: after the hold it probes with a small share, then comes back.
    canary.delay_ms.store(0, SeqCst);
    assert!(
        load_until(Duration::from_secs(2), &|| state() == Some(2.0)),
        "never probed"
    );
    assert!(
        load_until(Duration::from_secs(4), &|| state() == Some(0.0)),
        "never recovered"
    );
    let (c1, s1) = (canary.requests.load(SeqCst), stable.requests());
    for _ in 0..400 {
        get(&mut c, "");
    }
    let (dc, ds) = (canary.requests.load(SeqCst) - c1, stable.requests() - s1);
    assert!(
        dc > 140 && ds > 140,
        "back to 50/50: canary {dc}, stable {ds}"
    );
    // Failing: rolled back on its error rate.
    canary.failing.store(true, SeqCst);
    assert!(
        load_until(Duration::from_secs(3), &|| state() == Some(1.0)),
        "errors not rolled back"
    );
    let m = String::from_utf8(support::get(fg.admin_addr().unwrap(), "/metrics").body).unwrap();
    let line = format!(
        "fluxgate_canary_rollbacks_total{{listener=\"{addr}\",route=\"app\",upstream=\"canary\"}}"
    );
    assert_eq!(support::metric(&m, &line), Some(2.0));
    fg.shutdown();
}
