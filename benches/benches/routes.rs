//! Route matching against a table of 1,000 routes of mixed kinds, for a request that matches
//! an exact-host route, a wildcard-host route, a host-less prefix route late in the table,
//! a header-conditioned route, and one that matches nothing (the whole host-less list tried).
//!
//! Run: `cargo bench -p fluxgate-benches --bench routes`

use std::fmt::Write;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use fluxgate_conf::Config;
use fluxgate_policy::route::{RequestHead, RouteTable};
use http::{HeaderMap, HeaderValue, Method};

fn thousand_routes() -> RouteTable {
    let mut t = String::from(
        "[[upstream]]\nname = \"u\"\nendpoints = [\"127.0.0.1:1\"]\n\
         [[listener]]\naddress = \"127.0.0.1:0\"\n",
    );
    for i in 0..1000 {
        t.push_str("[[listener.route]]\nupstream = \"u\"\n");
        match i % 10 {
            0..=3 => writeln!(t, "host = \"svc{i}.example.com\"\npath_prefix = \"/api/\""),
            4 => writeln!(t, "host = \"*.tenant{i}.example.net\""),
            5..=7 => writeln!(
                t,
                "path_prefix = \"/svc{i}/\"\nmethods = [\"GET\", \"POST\"]"
            ),
            8 => writeln!(
                t,
                "path_prefix = \"/h{i}/\"\nheaders = [{{ name = \"x-tenant\", exact = \"t{i}\" }}]"
            ),
            _ => writeln!(t, "path_regex = \"^/r{i}/[0-9]+$\""),
        }
        .unwrap();
    }
    let c = Config::from_toml(&t).expect("bench config");
    RouteTable::new(c.listeners[0].routes.clone())
}

fn bench(c: &mut Criterion) {
    let table = thousand_routes();
    let mut headers = HeaderMap::new();
    headers.insert("user-agent", HeaderValue::from_static("bench/1"));
    headers.insert("accept", HeaderValue::from_static("*/*"));
    let mut tenant = headers.clone();
    tenant.insert("x-tenant", HeaderValue::from_static("t988"));
    let get = Method::GET;
    let cases: [(&str, Option<&str>, &str, &HeaderMap); 5] = [
        (
            "exact_host",
            Some("svc990.example.com"),
            "/api/orders",
            &headers,
        ),
        (
            "wildcard_host",
            Some("a.b.tenant994.example.net"),
            "/x",
            &headers,
        ),
        (
            "late_prefix",
            Some("unknown.example.org"),
            "/svc997/items",
            &headers,
        ),
        ("header_match", None, "/h988/x", &tenant),
        (
            "no_match",
            Some("unknown.example.org"),
            "/nothing/here",
            &headers,
        ),
    ];
    let mut g = c.benchmark_group("route_match_1000");
    for (name, host, path, h) in cases {
        let head = RequestHead {
            method: &get,
            host,
            path,
            query: None,
            headers: h,
        };
        let expect_match = name != "no_match";
        assert_eq!(table.match_request(&head).is_some(), expect_match, "{name}");
        g.bench_function(name, |b| {
            b.iter(|| black_box(table.match_request(black_box(&head)).is_some()))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
