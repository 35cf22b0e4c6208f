//! The JSON access log: one line per request, written when the body ends, buffered and
//! flushed on the interval.

mod support;

use std::time::Duration;

use fluxgate_conf::IoMode;
use support::*;

#[test]
fn one_json_line_per_request() {
    let up = upstream(Behavior::Echo);
    let dir = scratch("log");
    let path = dir.join("access.log");
    let _ = std::fs::remove_file(&path);
    let fg = start(
        &format!(
            "[access_log]\npath = \"{}\"\nflush_interval = \"100ms\"\n\
             [[upstream]]\nname = \"app\"\nendpoints = [\"{}\"]\n\
             [[listener]]\naddress = \"127.0.0.1:0\"\n\
             [[listener.route]]\nname = \"api\"\npath_prefix = \"/api/\"\nupstream = \"app\"\n\
             [[listener.route]]\nname = \"hello\"\npath = \"/hello\"\nrespond = {{ status = 200, body = \"hi there\" }}\n",
            path.display(),
            up.addr
        ),
        IoMode::Epoll,
    );
    let addr = fg.local_addrs()[0];
    let mut c = RawClient::connect(addr);
    c.send(b"POST /api/echo?q=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nhello world");
    assert_eq!(c.read_response().unwrap().body, b"hello world");
    assert_eq!(get(addr, "/hello").status, 200);
    assert_eq!(get(addr, "/missing").status, 404);

    let mut lines = Vec::new();
    assert!(eventually(Duration::from_secs(3), || {
        lines = std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect();
        lines.len() == 3
    }));
    let find = |route: &str| {
        lines
            .iter()
            .find(|l| l.contains(&format!("\"route\":\"{route}\"")))
            .unwrap()
            .clone()
    };
    let api = find("api");
    for part in [
        "\"method\":\"POST\"",
        "\"path\":\"/api/echo\"",
        "\"upstream\":\"app\"",
        "\"status\":200",
        "\"bytes\":11",
        "\"client\":\"127.0.0.1\"",
    ] {
        assert!(api.contains(part), "{part} in {api}");
    }
    assert!(api.starts_with("{\"time\":\"20") && api.ends_with('}'));
    assert!(
        !api.contains("\"upstream_ms\":null"),
        "forwarded: upstream time known"
    );
    let hello = find("hello");
    assert!(
        hello.contains("\"bytes\":8") && hello.contains("\"upstream_ms\":null"),
        "{hello}"
    );
    let missing = find("");
    assert!(
        missing.contains("\"status\":404") && missing.contains("\"path\":\"/missing\""),
        "{missing}"
    );
    fg.shutdown();
}
