//! Load balancing and endpoint health through real sockets: distribution counted at the
//! upstreams, health-check ejection and recovery, passive ejection, 503 with none healthy.

mod support;

use std::time::Duration;

use fluxgate_conf::IoMode;
use support::*;

fn cluster(ups: &[&Upstream], extra: &str, weights: Option<&[u32]>) -> fluxgate::Handle {
    let eps: Vec<String> = ups
        .iter()
        .enumerate()
        .map(|(i, u)| match weights {
            Some(w) => format!("{{ address = \"{}\", weight = {} }}", u.addr, w[i]),
            None => format!("\"{}\"", u.addr),
        })
        .collect();
    start(
        &format!(
            "[[listener]]\naddress = \"127.0.0.1:0\"\nupstream = \"c\"\n\
             [[upstream]]\nname = \"c\"\nendpoints = [{}]\n{extra}\n",
            eps.join(", ")
        ),
        IoMode::Epoll,
    )
}

fn three() -> [Upstream; 3] {
    [
        upstream(Behavior::Echo),
        upstream(Behavior::Echo),
        upstream(Behavior::Echo),
    ]
}

fn counts(ups: &[Upstream]) -> Vec<usize> {
    ups.iter().map(Upstream::requests).collect()
}

#[test]
fn round_robin_spreads_evenly() {
    let ups = three();
    let fg = cluster(&[&ups[0], &ups[1], &ups[2]], "", None);
    for _ in 0..300 {
        assert_eq!(get(fg.local_addrs()[0], "/").status, 200);
    }
    assert_eq!(counts(&ups), [100, 100, 100], "exact with one worker");
    fg.shutdown();
}

#[test]
fn weighted_round_robin_follows_weights() {
    let ups = three();
    let fg = cluster(
        &[&ups[0], &ups[1], &ups[2]],
        "balance = \"weighted_round_robin\"",
        Some(&[1, 2, 3]),
    );
    for _ in 0..600 {
        assert_eq!(get(fg.local_addrs()[0], "/").status, 200);
    }
    assert_eq!(counts(&ups), [100, 200, 300], "exact with one worker");
    fg.shutdown();
}

#[test]
fn least_request_sends_less_to_the_slow_endpoint() {
    let slow = upstream(Behavior::Slow(Duration::from_millis(300)));
    let (a, b) = (upstream(Behavior::Echo), upstream(Behavior::Echo));
    let fg = cluster(&[&slow, &a, &b], "balance = \"least_request\"", None);
    let addr = fg.local_addrs()[0];
    // Six clients in closed loops, 15 requests each: round robin would give each endpoint 30.
    let clients: Vec<_> = (0..6)
        .map(|_| std::thread::spawn(move || (0..15).all(|_| get(addr, "/").status == 200)))
        .collect();
    for c in clients {
        assert!(c.join().unwrap());
    }
    // Tolerance: the slow endpoint is picked only when its in-flight count drops to the
    // others', about once per 300 ms.
    let s = slow.requests();
    assert!(s <= 18, "slow got {s} of 90");
    assert_eq!(s + a.requests() + b.requests(), 90);
    fg.shutdown();
}

#[test]
fn p2c_ewma_prefers_the_fast_endpoint() {
    let slow = upstream(Behavior::Slow(Duration::from_millis(30)));
    let fast = upstream(Behavior::Echo);
    let fg = cluster(&[&slow, &fast], "balance = \"p2c_ewma\"", None);
    for _ in 0..200 {
        assert_eq!(get(fg.local_addrs()[0], "/").status, 200);
    }
    // Tolerance: a handful of early picks go to the slow one before its latency is known.
    assert!(slow.requests() <= 20, "slow got {} of 200", slow.requests());
    fg.shutdown();
}

fn port_for(addr: std::net::SocketAddr, key: &str) -> String {
    let mut c = RawClient::connect(addr);
    c.send(
        format!("GET / HTTP/1.1\r\nHost: x\r\nX-User: {key}\r\nCookie: a=1; sid={key}\r\n\r\n")
            .as_bytes(),
    );
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 200);
    r.header("x-up-port").unwrap().to_owned()
}

#[test]
fn consistent_hash_is_sticky_and_moves_only_lost_keys() {
    for key in [
        "hash_key = { header = \"x-user\" }",
        "hash_key = { cookie = \"sid\" }",
    ] {
        let ups = three();
        let fg = cluster(
            &[&ups[0], &ups[1], &ups[2]],
            &format!(
                "balance = \"hash\"\n{key}\n\
                 health_check = {{ path = \"/healthz\", interval = \"100ms\", healthy_threshold = 1, unhealthy_threshold = 1 }}"
            ),
            None,
        );
        let addr = fg.local_addrs()[0];
        let keys: Vec<String> = (0..150).map(|i| format!("u{i}")).collect();
        let first: Vec<String> = keys.iter().map(|k| port_for(addr, k)).collect();
        let again: Vec<String> = keys.iter().map(|k| port_for(addr, k)).collect();
        assert_eq!(first, again, "same key, same endpoint");
        assert!(
            counts(&ups).iter().all(|&c| c > 20),
            "spread: {:?}",
            counts(&ups)
        );
        // Take one endpoint out: only its keys move.
        ups[1].set_healthy(false);
        let gone = ups[1].addr.port().to_string();
        assert!(eventually(Duration::from_secs(3), || keys
            .iter()
            .all(|k| port_for(addr, k) != gone)));
        for (k, was) in keys.iter().zip(&first) {
            let now = port_for(addr, k);
            if *was != gone {
                assert_eq!(&now, was, "key {k} moved though its endpoint stayed");
            }
        }
        fg.shutdown();
    }
}

#[test]
fn health_check_ejects_and_restores() {
    let (a, b) = (upstream(Behavior::Echo), upstream(Behavior::Echo));
    let fg = cluster(
        &[&a, &b],
        "health_check = { path = \"/healthz\", interval = \"100ms\", timeout = \"500ms\", healthy_threshold = 2, unhealthy_threshold = 2 }",
        None,
    );
    let addr = fg.local_addrs()[0];
    b.set_healthy(false);
    // Once ejected, every request goes to a.
    assert!(eventually(Duration::from_secs(3), || {
        let before = b.requests();
        (0..10).all(|_| get(addr, "/").status == 200) && b.requests() == before
    }));
    b.set_healthy(true);
    assert!(
        eventually(Duration::from_secs(3), || {
            let before = b.requests();
            (0..4).for_each(|_| assert_eq!(get(addr, "/").status, 200));
            b.requests() > before
        }),
        "b back in rotation"
    );
    // None healthy: 503 from the gateway.
    a.set_healthy(false);
    b.set_healthy(false);
    assert!(eventually(Duration::from_secs(3), || get(addr, "/").status == 503));
    fg.shutdown();
}

#[test]
fn passive_ejection_after_consecutive_5xx() {
    let (good, bad) = (upstream(Behavior::Echo), upstream(Behavior::Fail500));
    let fg = cluster(
        &[&good, &bad],
        "passive = { consecutive_failures = 2, ejection = \"600ms\" }",
        None,
    );
    let addr = fg.local_addrs()[0];
    let statuses: Vec<u16> = (0..20).map(|_| get(addr, "/").status).collect();
    // Round robin sends bad two requests (its two failures), then it is ejected.
    assert_eq!(bad.requests(), 2, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|&&s| s == 500).count(), 2);
    // After the ejection time it gets traffic again (and is ejected again).
    std::thread::sleep(Duration::from_millis(700));
    for _ in 0..6 {
        get(addr, "/");
    }
    assert!(bad.requests() > 2, "bad tried again after ejection");
    fg.shutdown();
}

#[test]
fn hash_on_the_client_ip_keys_on_the_address() {
    let ups = three();
    let all = [&ups[0], &ups[1], &ups[2]];
    let by_ip = cluster(&all, "balance = \"hash\"\nhash_key = \"client_ip\"", None);
    let by_header = cluster(
        &all,
        "balance = \"hash\"\nhash_key = { header = \"x-user\" }",
        None,
    );
    // Every connection from 127.0.0.1 (each from another port) lands on one endpoint...
    let ports: Vec<String> = (0..20)
        .map(|_| port_for(by_ip.local_addrs()[0], "ignored"))
        .collect();
    assert!(ports.iter().all(|p| *p == ports[0]), "{ports:?}");
    // ... the one the same ring picks for the key "127.0.0.1" given as a header, while other
    // keys spread: the client address is the key, not a constant.
    assert_eq!(port_for(by_header.local_addrs()[0], "127.0.0.1"), ports[0]);
    let spread: std::collections::HashSet<String> = (0..30)
        .map(|i| port_for(by_header.local_addrs()[0], &format!("10.0.0.{i}")))
        .collect();
    assert!(spread.len() > 1, "{spread:?}");
    by_ip.shutdown();
    by_header.shutdown();
}

#[test]
fn passive_ejection_after_consecutive_connect_errors() {
    let good = upstream(Behavior::Echo);
    let dead = dead_addr();
    let fg = start(
        &format!(
            "[[listener]]\naddress = \"127.0.0.1:0\"\nupstream = \"c\"\n\
             [[upstream]]\nname = \"c\"\nendpoints = [\"{}\", \"{}\"]\n\
             passive = {{ consecutive_failures = 2, ejection = \"30s\" }}\n",
            good.addr, dead.addr
        ),
        IoMode::Epoll,
    );
    let addr = fg.local_addrs()[0];
    let statuses: Vec<u16> = (0..20).map(|_| get(addr, "/").status).collect();
    // Round robin tries the dead endpoint twice (502 each), then it is ejected.
    assert_eq!(
        statuses.iter().filter(|&&s| s == 502).count(),
        2,
        "{statuses:?}"
    );
    assert!(statuses[4..].iter().all(|&s| s == 200), "{statuses:?}");
    assert_eq!(good.requests(), 18);
    fg.shutdown();
}
