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

#[test]
fn a_route_limit_holds_its_rate_across_two_workers() {
    let fg = two_workers(
        "[admin]\naddress = \"127.0.0.1:0\"\n[[listener]]\naddress = \"127.0.0.1:0\"\n\
         [[listener.route]]\nname = \"limited\"\npath = \"/\"\nrespond = { status = 200 }\n\
         rate_limit = { rate = 50, burst = 10, key = \"route\" }\n",
    );
    let addr = fg.local_addrs()[0];
    let (ok, refused) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let started = Instant::now();
    let run = Duration::from_millis(1500);
    // Sixteen connections: SO_REUSEPORT spreads them over both workers.
    let threads: Vec<_> = (0..16)
        .map(|_| {
            let (ok, refused) = (Arc::clone(&ok), Arc::clone(&refused));
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
    let ok = ok.load(Ordering::Relaxed) as f64;
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
    let refused = refused.load(Ordering::Relaxed);
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
