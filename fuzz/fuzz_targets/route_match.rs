//! The route table's index against a plain first-match scan, over arbitrary request heads:
//! both pick the same route (or none), and neither panics.
#![no_main]

use std::sync::OnceLock;

use fluxgate_policy::route::{RequestHead, RouteTable};
use libfuzzer_sys::fuzz_target;

/// Every kind of condition, hosts exact and wildcard, paths that pin a first segment and
/// paths that do not.
const ROUTES: &str = r#"
[[upstream]]
name = "u"
endpoints = ["127.0.0.1:1"]
[[listener]]
address = "127.0.0.1:0"
[[listener.route]]
host = "api.example.com"
path_prefix = "/v1/"
upstream = "u"
[[listener.route]]
host = "*.example.com"
methods = ["GET", "HEAD"]
upstream = "u"
[[listener.route]]
host = "*.b.example.com"
upstream = "u"
[[listener.route]]
path = "/exact"
upstream = "u"
[[listener.route]]
path_prefix = "/static/"
headers = [{ name = "x-env", exact = "canary" }]
upstream = "u"
[[listener.route]]
path_regex = "^/v[0-9]+/"
upstream = "u"
[[listener.route]]
path_regex = "(a|b)+$"
query = [{ name = "q", present = true }]
upstream = "u"
[[listener.route]]
headers = [{ name = "x-trace", regex = "^[0-9a-f]{4}" }]
upstream = "u"
[[listener.route]]
query = [{ name = "beta", exact = "1" }]
upstream = "u"
[[listener.route]]
path_prefix = "/open/"
headers = [{ name = "authorization", absent = true }]
upstream = "u"
"#;

fn table() -> &'static RouteTable {
    static TABLE: OnceLock<RouteTable> = OnceLock::new();
    TABLE.get_or_init(|| {
        let config = fluxgate_conf::Config::from_toml(ROUTES).expect("the table parses");
        RouteTable::new(config.listeners[0].routes.clone())
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // method \n host \n path \n query \n then header lines "name: value".
    let mut lines = text.split('\n');
    let method = http::Method::from_bytes(lines.next().unwrap_or("GET").as_bytes())
        .unwrap_or(http::Method::GET);
    let host = lines.next().filter(|h| !h.is_empty());
    let path = lines.next().unwrap_or("/");
    let query = lines.next().filter(|q| !q.is_empty());
    let mut headers = http::HeaderMap::new();
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            if let (Ok(k), Ok(v)) = (
                http::HeaderName::from_bytes(k.trim().as_bytes()),
                http::HeaderValue::from_str(v.trim()),
            ) {
                headers.append(k, v);
            }
        }
    }
    let head = RequestHead {
        method: &method,
        host,
        path,
        query,
        headers: &headers,
    };
    let indexed = table().match_request(&head).map(|(i, _)| i);
    assert_eq!(indexed, table().match_linear(&head), "{head:?}");
});
