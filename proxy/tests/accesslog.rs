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

/// The answers the servers make themselves go through the same seam as every other answer:
/// counted in /metrics by reason and written to the access log with it.
#[test]
fn refusals_made_by_the_servers_are_counted_and_logged() {
    let up = upstream(Behavior::Echo);
    let dir = scratch("log-refusals");
    let path = dir.join("access.log");
    let _ = std::fs::remove_file(&path);
    let fg = start(
        &format!(
            "[admin]\naddress = \"127.0.0.1:0\"\n\
             [access_log]\npath = \"{}\"\nflush_interval = \"100ms\"\n\
             [http]\nheader_read_timeout = \"300ms\"\nmax_headers = 10\n\
             [[upstream]]\nname = \"app\"\nendpoints = [\"{}\"]\n\
             [[listener]]\naddress = \"127.0.0.1:0\"\nupstream = \"app\"\n",
            path.display(),
            up.addr
        ),
        IoMode::Epoll,
    );
    let addr = fg.local_addrs()[0];
    let refused = |raw: &[u8]| {
        let mut c = RawClient::connect(addr);
        c.send(raw);
        let status = c.read_response().expect("an answer").status;
        assert!(c.closed());
        status
    };
    assert_eq!(refused(b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n"), 400);
    assert_eq!(
        refused(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"),
        400
    );
    assert_eq!(refused(b"GET / HTTP/1.1\r\nHost: x\r\n"), 408);
    let mut many = String::from("GET / HTTP/1.1\r\nHost: x\r\n");
    for i in 0..20 {
        many.push_str(&format!("X-F{i}: v\r\n"));
    }
    assert_eq!(refused(format!("{many}\r\n").as_bytes()), 431);
    assert_eq!(up.requests(), 0, "nothing refused was forwarded");

    let metrics = String::from_utf8(get(fg.admin_addr().unwrap(), "/metrics").body).unwrap();
    for (reason, n) in [
        ("malformed_head", 1.0),
        ("ambiguous_framing", 1.0),
        ("head_timeout", 1.0),
        ("too_many_fields", 1.0),
    ] {
        let series = format!("fluxgate_refusals_total{{listener=\"{addr}\",reason=\"{reason}\"}} ");
        assert_eq!(metric(&metrics, &series), Some(n), "{reason}: {metrics}");
    }
    let series = format!(
        "fluxgate_requests_total{{listener=\"{addr}\",route=\"\",upstream=\"\",code=\"4xx\"}} "
    );
    assert_eq!(metric(&metrics, &series), Some(4.0), "{metrics}");

    let mut lines = Vec::new();
    assert!(eventually(Duration::from_secs(3), || {
        lines = std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect();
        lines.len() == 4
    }));
    for (status, reason) in [
        (400, "malformed_head"),
        (400, "ambiguous_framing"),
        (408, "head_timeout"),
        (431, "too_many_fields"),
    ] {
        let want = [
            format!("\"status\":{status}"),
            format!("\"reason\":\"{reason}\""),
            "\"client\":\"127.0.0.1\"".to_owned(),
        ];
        assert!(
            lines
                .iter()
                .any(|l| want.iter().all(|w| l.contains(w.as_str()))),
            "{status} {reason} in {lines:?}"
        );
    }
    fg.shutdown();
}
