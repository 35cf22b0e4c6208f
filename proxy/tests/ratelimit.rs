//! Rate limits through sockets: the rate holds for the process with two workers, per key
//! buckets are separate, refusals are 429 with Retry-After and counted.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fluxgate::Server;
use fluxgate_conf::{Config, IoMode};
use support::{metric, RawClient};

fn two_workers(text: &str) -> fluxgate::Handle {
    let mut config = Config::from_toml(text).unwrap();
    config.runtime.workers = 2;
    config.runtime.io = IoMode::Epoll;
    Server::start(config).unwrap()
}

/// Keep-alive GETs from `clients` connections, spread over `addrs` in turn, for `run`:
/// (answered 200, answered 429, seconds taken). Every 429 carries a Retry-After of 1 s
/// or more; any other status fails the test.
fn load(addrs: &[std::net::SocketAddr], clients: usize, run: Duration) -> (usize, usize, f64) {
    let (ok, refused) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let started = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|i| {
            let (ok, refused) = (Arc::clone(&ok), Arc::clone(&refused));
            let addr = addrs[i % addrs.len()];
            std::thread::spawn(move || {
                let mut c = RawClient::connect(addr);
                while started.elapsed() < run {
                    c.send(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n");
                    let r = c.read_response().expect("an answer");
                    match r.status {
                        200 => ok.fetch_add(1, Ordering::Relaxed),
                        429 => {
                            let after: u64 = r.header("retry-after").unwrap().parse().unwrap();
                            assert!(after >= 1);
                            refused.fetch_add(1, Ordering::Relaxed)
                        }
                        s => panic!("status {s}"),
                    };
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    let elapsed = started.elapsed().as_secs_f64();
    (
        ok.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
        elapsed,
    )
}

#[test]
fn a_route_limit_holds_its_rate_across_two_workers() {
    let fg = two_workers(
        "[admin]\naddress = \"127.0.0.1:0\"\n[[listener]]\naddress = \"127.0.0.1:0\"\n\
         [[listener.route]]\nname = \"limited\"\npath = \"/\"\nrespond = { status = 200 }\n\
         rate_limit = { rate = 50, burst = 10, key = \"route\" }\n",
    );
    let addr = fg.local_addrs()[0];
    // Sixteen connections: SO_REUSEPORT spreads them over both workers.
    let (ok, refused, elapsed) = load(&[addr], 16, Duration::from_millis(1500));
    let ok = ok as f64;
    // The burst and then 50 a second, for the process: never twice that with two workers.
    let most = 10.0 + 50.0 * elapsed;
    assert!(
        ok <= most + 2.0,
        "{ok} allowed in {elapsed:.2} s, at most {most:.0}"
    );
    assert!(
        ok >= 0.8 * most,
        "{ok} allowed in {elapsed:.2} s, about {most:.0} expected"
    );
    assert!(
        refused > 100,
        "the clients pressed hard enough: {refused} refused"
    );
    let m = String::from_utf8(support::get(fg.admin_addr().unwrap(), "/metrics").body).unwrap();
    let line = format!("fluxgate_rate_limited_total{{listener=\"{addr}\",route=\"limited\"}}");
    assert_eq!(metric(&m, &line), Some(refused as f64));
    fg.shutdown();
}

#[test]
fn keyed_limits_keep_a_bucket_per_key() {
    let fg = two_workers(
        "[[listener]]\naddress = \"127.0.0.1:0\"\n\
         [[listener.route]]\npath = \"/\"\nrespond = { status = 200 }\n\
         rate_limit = { rate = 0.5, burst = 2, key = \"header:x-api-key\" }\n",
    );
    let mut c = RawClient::connect(fg.local_addrs()[0]);
    let mut get = |key: &str| {
        c.send(format!("GET / HTTP/1.1\r\nhost: t\r\nx-api-key: {key}\r\n\r\n").as_bytes());
        c.read_response().unwrap()
    };
    assert_eq!(get("a").status, 200);
    assert_eq!(get("a").status, 200);
    let r = get("a");
    assert_eq!(r.status, 429);
    // 0.5 a second: the next one in 2 s, rounded up.
    assert_eq!(r.header("retry-after"), Some("2"));
    assert_eq!(get("b").status, 200, "another key, another bucket");
    fg.shutdown();
}

#[test]
fn a_limit_in_redis_holds_for_two_gateway_processes() {
    let redis = support::RedisServer::start();
    let up = support::upstream(support::Behavior::Echo);
    let dir = support::scratch("ratelimit-fleet");
    let path = dir.join("gw.toml");
    std::fs::write(
        &path,
        format!(
            "[runtime]\nworkers = 2\n[[listener]]\naddress = \"127.0.0.1:0\"\n\
             [[listener.route]]\nname = \"api\"\npath_prefix = \"/\"\nupstream = \"u\"\n\
             rate_limit = {{ rate = 40, burst = 10, key = \"route\", redis = \"{}\", redis_timeout = \"500ms\" }}\n\
             [[upstream]]\nname = \"u\"\nendpoints = [\"{}\"]\n",
            redis.addr, up.addr
        ),
    )
    .unwrap();
    let config = ["run", "-c", path.to_str().unwrap()];
    let (mut a, mut b) = (support::spawn(&config), support::spawn(&config));
    let (ok, _, elapsed) = load(&[a.addr, b.addr], 8, Duration::from_millis(1500));
    let ok = ok as f64;
    let most = 10.0 + 40.0 * elapsed;
    assert!(
        ok <= most + 3.0,
        "{ok} allowed by both in {elapsed:.2} s, at most {most:.0}"
    );
    assert!(
        ok >= 0.7 * most,
        "{ok} allowed by both in {elapsed:.2} s, about {most:.0} expected"
    );
    assert_eq!(
        up.requests() as f64,
        ok,
        "only what was allowed reached the upstream"
    );
    for g in [&mut a, &mut b] {
        let _ = g.child.kill();
        let _ = g.child.wait();
    }
}

#[test]
fn without_redis_a_limit_fails_open_or_closed_as_configured() {
    let redis = support::RedisServer::start();
    let gone = redis.addr;
    drop(redis);
    let up = support::upstream(support::Behavior::Echo);
    let fg = support::start(
        &format!(
            "[admin]\naddress = \"127.0.0.1:0\"\n[[listener]]\naddress = \"127.0.0.1:0\"\n\
             [[listener.route]]\nname = \"open\"\npath = \"/open\"\nupstream = \"u\"\n\
             rate_limit = {{ rate = 1, key = \"route\", redis = \"{gone}\" }}\n\
             [[listener.route]]\nname = \"closed\"\npath = \"/closed\"\nupstream = \"u\"\n\
             rate_limit = {{ rate = 1, key = \"route\", redis = \"{gone}\", fail = \"closed\" }}\n\
             [[upstream]]\nname = \"u\"\nendpoints = [\"{}\"]\n",
            up.addr
        ),
        IoMode::Epoll,
    );
    let mut c = RawClient::connect(fg.local_addrs()[0]);
    let mut status = |path: &str| {
        c.send(format!("GET {path} HTTP/1.1\r\nhost: t\r\n\r\n").as_bytes());
        c.read_response().unwrap().status
    };
    for _ in 0..5 {
        assert_eq!(
            status("/open"),
            200,
            "fail open: passes while Redis is away"
        );
        assert_eq!(
            status("/closed"),
            429,
            "fail closed: refused while Redis is away"
        );
    }
    let m = String::from_utf8(support::get(fg.admin_addr().unwrap(), "/metrics").body).unwrap();
    let errors = |route: &str| {
        let line = format!(
            "fluxgate_rate_limit_redis_errors_total{{listener=\"{}\",route=\"{route}\"}}",
            fg.local_addrs()[0]
        );
        metric(&m, &line).unwrap()
    };
    assert_eq!((errors("open"), errors("closed")), (5.0, 5.0));
    assert_eq!(up.requests(), 5);
    fg.shutdown();
}

#[test]
fn a_reload_keeps_the_buckets_of_an_unchanged_limit() {
    let text = |burst: u32| {
        format!(
            "[[listener]]\naddress = \"127.0.0.1:0\"\n\
             [[listener.route]]\nname = \"r\"\npath = \"/\"\nrespond = {{ status = 200 }}\n\
             rate_limit = {{ rate = 0.1, burst = {burst}, key = \"route\" }}\n"
        )
    };
    let fg = support::start(&text(2), IoMode::Epoll);
    let addr = fg.local_addrs()[0];
    let status = || {
        let mut c = RawClient::connect(addr);
        c.send(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n");
        c.read_response().unwrap().status
    };
    assert_eq!((status(), status(), status()), (200, 200, 429));
    // The same limit after a reload: still spent.
    let mut same = Config::from_toml(&text(2)).unwrap();
    same.runtime.workers = 1;
    same.runtime.io = IoMode::Epoll;
    fg.reload(same).unwrap();
    assert_eq!(
        status(),
        429,
        "a reload does not refill an unchanged bucket"
    );
    // A changed limit starts afresh.
    let mut changed = Config::from_toml(&text(3)).unwrap();
    changed.runtime.workers = 1;
    changed.runtime.io = IoMode::Epoll;
    fg.reload(changed).unwrap();
    assert_eq!(
        (status(), status(), status(), status()),
        (200, 200, 200, 429)
    );
    fg.shutdown();
}
