//! Routing through real sockets: every match kind, every action, header edits, prefix
//! rewrite, per-route timeout and the 404 when nothing matches.

mod support;

use std::time::Duration;

use fluxgate_conf::IoMode;
use support::*;

fn gateway(
    up_a: std::net::SocketAddr,
    up_b: std::net::SocketAddr,
    routes: &str,
) -> fluxgate::Handle {
    start(
        &format!(
            "[[upstream]]\nname = \"a\"\nendpoints = [\"{up_a}\"]\n\
             [[upstream]]\nname = \"b\"\nendpoints = [\"{up_b}\"]\n\
             [[listener]]\naddress = \"127.0.0.1:0\"\n{routes}"
        ),
        IoMode::Epoll,
    )
}

fn send(addr: std::net::SocketAddr, req: &str) -> RawResponse {
    let mut c = RawClient::connect(addr);
    c.send(req.as_bytes());
    c.read_response().expect("a response")
}

/// Which upstream answered ("a" or "b"), from the marker header each route adds.
fn served_by(r: &RawResponse) -> Option<&str> {
    r.header("x-up-headers")
        .and_then(|h| h.split(',').find_map(|n| n.strip_prefix("x-via-")))
}

#[test]
fn match_kinds_pick_the_first_matching_route() {
    let (a, b) = (upstream(Behavior::Echo), upstream(Behavior::Echo));
    let via = |x: &str| format!("request_headers = {{ add = {{ \"x-via-{x}\" = \"1\" }} }}\n");
    let fg = gateway(
        a.addr,
        b.addr,
        &format!(
            "[[listener.route]]\nhost = \"api.example.com\"\nupstream = \"a\"\n{}\
             [[listener.route]]\nhost = \"*.example.com\"\nupstream = \"b\"\n{}\
             [[listener.route]]\npath = \"/exact\"\nupstream = \"a\"\n{}\
             [[listener.route]]\npath_regex = \"^/v[0-9]+/\"\nupstream = \"b\"\n{}\
             [[listener.route]]\npath_prefix = \"/static/\"\nmethods = [\"GET\", \"HEAD\"]\nupstream = \"a\"\n{}\
             [[listener.route]]\nheaders = [{{ name = \"x-env\", exact = \"canary\" }}]\nupstream = \"b\"\n{}\
             [[listener.route]]\nheaders = [{{ name = \"user-agent\", regex = \"^curl/\" }}]\nupstream = \"a\"\n{}\
             [[listener.route]]\nheaders = [{{ name = \"x-trace\", present = true }}]\nupstream = \"b\"\n{}\
             [[listener.route]]\nquery = [{{ name = \"beta\", exact = \"1\" }}]\nupstream = \"a\"\n{}\
             [[listener.route]]\npath_prefix = \"/open/\"\nheaders = [{{ name = \"authorization\", absent = true }}]\nupstream = \"b\"\n{}",
            via("host-exact"),
            via("host-wild"),
            via("path-exact"),
            via("path-regex"),
            via("prefix-method"),
            via("header-exact"),
            via("header-regex"),
            via("header-present"),
            via("query"),
            via("header-absent"),
        ),
    );
    let addr = fg.local_addrs()[0];
    let cases: [(&str, Option<&str>); 14] = [
        (
            "GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
            Some("host-exact"),
        ),
        (
            "GET / HTTP/1.1\r\nHost: API.Example.com:8080\r\n\r\n",
            Some("host-exact"),
        ),
        (
            "GET / HTTP/1.1\r\nHost: shop.eu.example.com\r\n\r\n",
            Some("host-wild"),
        ),
        (
            "GET /exact HTTP/1.1\r\nHost: other\r\n\r\n",
            Some("path-exact"),
        ),
        (
            "GET /v2/users HTTP/1.1\r\nHost: other\r\n\r\n",
            Some("path-regex"),
        ),
        (
            "GET /static/app.js HTTP/1.1\r\nHost: other\r\n\r\n",
            Some("prefix-method"),
        ),
        (
            "POST /static/app.js HTTP/1.1\r\nHost: other\r\nContent-Length: 0\r\n\r\n",
            None,
        ),
        (
            "GET / HTTP/1.1\r\nHost: other\r\nX-Env: canary\r\n\r\n",
            Some("header-exact"),
        ),
        ("GET / HTTP/1.1\r\nHost: other\r\nX-Env: prod\r\n\r\n", None),
        (
            "GET / HTTP/1.1\r\nHost: other\r\nUser-Agent: curl/8.1\r\n\r\n",
            Some("header-regex"),
        ),
        (
            "GET / HTTP/1.1\r\nHost: other\r\nX-Trace: \r\n\r\n",
            Some("header-present"),
        ),
        (
            "GET /?a=2&beta=1 HTTP/1.1\r\nHost: other\r\n\r\n",
            Some("query"),
        ),
        (
            "GET /open/x HTTP/1.1\r\nHost: other\r\n\r\n",
            Some("header-absent"),
        ),
        (
            "GET /open/x HTTP/1.1\r\nHost: other\r\nAuthorization: Bearer t\r\n\r\n",
            None,
        ),
    ];
    // The upstream each route names.
    let upstream_of = |route: &str| match route {
        "host-exact" | "path-exact" | "prefix-method" | "header-regex" | "query" => &a,
        _ => &b,
    };
    for (req, want) in cases {
        let r = send(addr, req);
        match want {
            Some(w) => {
                assert_eq!(r.status, 200, "{req:?}");
                assert_eq!(served_by(&r), Some(w), "{req:?}");
                let port = upstream_of(w).addr.port().to_string();
                assert_eq!(
                    r.header("x-up-port"),
                    Some(port.as_str()),
                    "{w} went to its own upstream"
                );
            }
            None => assert_eq!(r.status, 404, "nothing matched: {req:?}"),
        }
    }
    fg.shutdown();
}

#[test]
fn actions_respond_redirect_edit_rewrite_and_time_out() {
    let (a, slow) = (
        upstream(Behavior::Echo),
        upstream(Behavior::Slow(Duration::from_secs(3))),
    );
    let fg = gateway(
        a.addr,
        slow.addr,
        "[[listener.route]]\npath = \"/health\"\n\
         respond = { status = 203, body = \"fine\\n\", headers = { \"content-type\" = \"text/plain\", \"x-direct\" = \"yes\" } }\n\
         [[listener.route]]\npath_prefix = \"/old/\"\n\
         redirect = { location = \"https://new.example.com\", status = 308, keep_path = true }\n\
         [[listener.route]]\npath = \"/moved\"\nredirect = { location = \"/elsewhere\" }\n\
         [[listener.route]]\npath_prefix = \"/api/\"\nrewrite_prefix = \"/v2/\"\nupstream = \"a\"\n\
         request_headers = { add = { \"x-added\" = \"1\" }, set = { \"x-set\" = \"new\" }, remove = [\"x-secret\"] }\n\
         response_headers = { add = { \"x-resp-added\" = \"r\" }, remove = [\"x-up-method\"] }\n\
         [[listener.route]]\npath = \"/slow\"\ntimeout = \"200ms\"\nupstream = \"b\"\n",
    );
    let addr = fg.local_addrs()[0];

    let r = send(addr, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!((r.status, &r.body[..]), (203, &b"fine\n"[..]));
    assert_eq!(r.header("x-direct"), Some("yes"));
    assert_eq!(r.header("content-type"), Some("text/plain"));

    let r = send(addr, "GET /old/page?q=1 HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(r.status, 308);
    assert_eq!(
        r.header("location"),
        Some("https://new.example.com/old/page?q=1")
    );
    let r = send(addr, "GET /moved HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!((r.status, r.header("location")), (301, Some("/elsewhere")));

    let r = send(
        addr,
        "GET /api/users?id=7 HTTP/1.1\r\nHost: x\r\nX-Secret: s\r\nX-Set: old\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("x-up-path"),
        Some("/v2/users?id=7"),
        "prefix rewritten"
    );
    let fields: Vec<&str> = r.header("x-up-fields").unwrap().split(';').collect();
    assert!(fields.contains(&"x-added=1"), "{fields:?}");
    assert!(
        fields.contains(&"x-set=new") && !fields.contains(&"x-set=old"),
        "set replaced the value: {fields:?}"
    );
    assert!(
        !fields.iter().any(|f| f.starts_with("x-secret=")),
        "{fields:?}"
    );
    assert_eq!(r.header("x-resp-added"), Some("r"));
    assert!(r.header("x-up-method").is_none(), "response header removed");

    let t = std::time::Instant::now();
    assert_eq!(
        send(addr, "GET /slow HTTP/1.1\r\nHost: x\r\n\r\n").status,
        504
    );
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "route timeout, not the upstream's 30 s"
    );

    assert_eq!(
        send(addr, "GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n").status,
        404
    );
    fg.shutdown();
}
