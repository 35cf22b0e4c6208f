//! The admin listener through real sockets: the metrics a scraper reads, health and
//! readiness (503 while draining), and the JSON view of the running config.

mod support;

use std::time::Duration;

use fluxgate_conf::IoMode;
use support::*;

#[test]
fn metrics_health_readiness_and_config() {
    let up = upstream(Behavior::Echo);
    let slow = upstream(Behavior::Slow(Duration::from_millis(800)));
    let fg = start(
        &format!(
            "[admin]\naddress = \"127.0.0.1:0\"\n\
             [[upstream]]\nname = \"app\"\nendpoints = [\"{}\"]\n\
             [[upstream]]\nname = \"slow\"\nendpoints = [\"{}\"]\n\
             [[listener]]\naddress = \"127.0.0.1:0\"\n\
             [[listener.route]]\nname = \"api\"\npath_prefix = \"/api/\"\nupstream = \"app\"\n\
             [[listener.route]]\nname = \"lag\"\npath = \"/slow\"\nupstream = \"slow\"\n\
             [[listener.route]]\nname = \"gone\"\npath = \"/gone\"\nrespond = {{ status = 410 }}\n",
            up.addr, slow.addr
        ),
        IoMode::Epoll,
    );
    let addr = fg.local_addrs()[0];
    let admin = fg.admin_addr().expect("admin listener");
    for _ in 0..5 {
        assert_eq!(get(addr, "/api/x").status, 200);
    }
    assert_eq!(get(addr, "/gone").status, 410);
    assert_eq!(get(addr, "/nowhere").status, 404);
    let listener = format!("listener=\"{addr}\"");

    let m = get(admin, "/metrics");
    assert_eq!(m.status, 200);
    let text = String::from_utf8(m.body).unwrap();
    let req = |route: &str, up: &str, code: &str| {
        metric(&text, &format!("fluxgate_requests_total{{{listener},route=\"{route}\",upstream=\"{up}\",code=\"{code}\"}}"))
    };
    assert_eq!(req("api", "app", "2xx"), Some(5.0), "{text}");
    assert_eq!(req("gone", "", "4xx"), Some(1.0));
    assert_eq!(
        req("", "", "4xx"),
        Some(1.0),
        "unmatched requests counted apart"
    );
    assert_eq!(
        metric(
            &text,
            &format!("fluxgate_request_duration_seconds_count{{{listener},route=\"api\"}}")
        ),
        Some(5.0)
    );
    assert_eq!(
        metric(
            &text,
            &format!(
                "fluxgate_request_duration_seconds_bucket{{{listener},route=\"api\",le=\"+Inf\"}}"
            )
        ),
        Some(5.0)
    );
    assert_eq!(
        metric(
            &text,
            "fluxgate_upstream_pool_misses_total{upstream=\"app\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&text, "fluxgate_upstream_pool_hits_total{upstream=\"app\"}"),
        Some(4.0)
    );
    assert_eq!(
        metric(&text, "fluxgate_upstream_connections{upstream=\"app\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &text,
            "fluxgate_upstream_pool_idle_connections{upstream=\"app\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &text,
            &format!(
                "fluxgate_endpoint_healthy{{upstream=\"app\",endpoint=\"{}\"}}",
                up.addr
            )
        ),
        Some(1.0)
    );
    // The scrape's own connection is not on the proxy listener: a client held open shows.
    let mut held = RawClient::connect(addr);
    held.send(b"GET /api/held HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(held.read_response().unwrap().status, 200);
    let text = String::from_utf8(get(admin, "/metrics").body).unwrap();
    assert_eq!(
        metric(&text, &format!("fluxgate_active_connections{{{listener}}}")),
        Some(1.0)
    );
    drop(held);

    assert_eq!(get(admin, "/healthz").status, 200);
    assert_eq!(get(admin, "/readyz").status, 200);
    let cfg = String::from_utf8(get(admin, "/config").body).unwrap();
    assert!(
        cfg.contains("\"name\":\"app\"") && cfg.contains("\"healthy\":true"),
        "{cfg}"
    );
    assert!(
        cfg.contains("\"name\":\"api\",\"action\":{\"upstream\":\"app\"}"),
        "{cfg}"
    );

    // Draining: readiness turns 503 while the slow request finishes.
    let inflight = std::thread::spawn(move || get(addr, "/slow").status);
    assert!(eventually(Duration::from_secs(3), || slow.requests() == 1));
    let drain = std::thread::spawn(move || fg.drain(Duration::from_secs(5)));
    assert!(eventually(Duration::from_secs(2), || get(admin, "/readyz")
        .status
        == 503));
    assert_eq!(inflight.join().unwrap(), 200);
    assert!(drain.join().unwrap(), "drained within the grace time");
}
