//! OpenTelemetry traces, exported to an OTLP/HTTP receiver the test runs (hyper, decoding
//! the protobuf with `opentelemetry-proto`): the client's `traceparent` is the server span's
//! parent, the upstream sees a child `traceparent`, and the sample ratio holds.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fluxgate_conf::IoMode;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use support::{eventually, RawClient};

const LIMIT: Duration = Duration::from_secs(10);

/// Every span the receiver got, with the `service.name` of its resource.
type Spans = Arc<Mutex<Vec<(String, Span)>>>;

/// An OTLP/HTTP traces receiver on 127.0.0.1: decodes each export, answers 200.
fn receiver() -> (std::net::SocketAddr, Spans) {
    let spans: Spans = Arc::default();
    let sink = Arc::clone(&spans);
    let addr = support::serve_in_background(move |stream| {
        let sink = Arc::clone(&sink);
        async move {
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let sink = Arc::clone(&sink);
                    async move {
                        use http_body_util::BodyExt;
                        assert_eq!(req.uri().path(), "/v1/traces");
                        assert_eq!(req.headers()["content-type"], "application/x-protobuf");
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let export =
                            ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                        let mut got = sink.lock().unwrap();
                        for rs in export.resource_spans {
                            let service = rs
                                .resource
                                .iter()
                                .flat_map(|r| &r.attributes)
                                .find(|kv| kv.key == "service.name")
                                .and_then(|kv| kv.value.as_ref())
                                .map(|v| format!("{:?}", v.value))
                                .unwrap_or_default();
                            for ss in rs.scope_spans {
                                got.extend(ss.spans.into_iter().map(|s| (service.clone(), s)));
                            }
                        }
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            http_body_util::Full::new(bytes::Bytes::new()),
                        ))
                    }
                });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await;
        }
    });
    (addr, spans)
}

fn gateway(
    upstream: std::net::SocketAddr,
    otlp: std::net::SocketAddr,
    sample: f64,
    access_log: &std::path::Path,
) -> fluxgate::Handle {
    support::start(
        &format!(
            "[access_log]\npath = \"{}\"\nflush_interval = \"50ms\"\n[[listener]]\naddress = \"127.0.0.1:0\"\n\
             [[listener.route]]\nname = \"api\"\npath_prefix = \"/api\"\nupstream = \"u\"\n\
             [[upstream]]\nname = \"u\"\nendpoints = [\"{upstream}\"]\n\
             [tracing]\nendpoint = \"http://{otlp}/v1/traces\"\nsample = {sample}\n\
             flush_interval = \"100ms\"\nservice_name = \"edge-test\"\n",
            access_log.display()
        ),
        IoMode::Epoll,
    )
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn attr(s: &Span, key: &str) -> Option<String> {
    s.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .map(|v| match &v.value {
            Some(opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s)) => {
                s.clone()
            }
            Some(opentelemetry_proto::tonic::common::v1::any_value::Value::IntValue(i)) => {
                i.to_string()
            }
            other => format!("{other:?}"),
        })
}

/// The `traceparent` the upstream saw, from the echo upstream's `x-up-fields`.
fn upstream_traceparent(fields: &str) -> String {
    fields
        .split(';')
        .find_map(|f| f.strip_prefix("traceparent="))
        .expect("the upstream got a traceparent")
        .to_owned()
}

#[test]
fn a_sampled_parent_is_continued_and_the_upstream_sees_a_child() {
    let (otlp, spans) = receiver();
    let up = support::upstream(support::Behavior::Echo);
    // A ratio of 0: only the parent's sampled flag can make this request traced.
    let log = support::scratch("tracing-parent").join("access.log");
    let fg = gateway(up.addr, otlp, 0.0, &log);
    let addr = fg.local_addrs()[0];
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let mut c = RawClient::connect(addr);
    c.send(
        format!(
            "GET /api/x HTTP/1.1\r\nHost: t\r\ntraceparent: 00-{trace}-{parent}-01\r\n\
             tracestate: vendor=abc\r\n\r\n"
        )
        .as_bytes(),
    );
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 200);
    let fields = r.header("x-up-fields").unwrap().to_owned();
    let seen = upstream_traceparent(&fields);
    assert!(fields.contains("tracestate=vendor=abc"), "{fields}");
    let parts: Vec<&str> = seen.split('-').collect();
    assert_eq!(
        (parts[0], parts[1], parts[3]),
        ("00", trace, "01"),
        "{seen}"
    );
    assert_ne!(
        parts[2], parent,
        "the upstream's parent is our span, not the client's"
    );
    assert!(
        eventually(LIMIT, || spans.lock().unwrap().len() >= 5),
        "{:#?}",
        spans.lock().unwrap()
    );
    let got = spans.lock().unwrap().clone();
    let by_name = |n: &str| {
        got.iter()
            .map(|(_, s)| s)
            .find(|s| s.name == n)
            .unwrap_or_else(|| panic!("no {n} span in {got:#?}"))
            .clone()
    };
    let server = by_name("GET");
    let route = by_name("route");
    let client = by_name("upstream");
    let attempt = by_name("attempt");
    let response = by_name("response");
    assert!(got
        .iter()
        .all(|(service, s)| hex(&s.trace_id) == trace && service.contains("edge-test")));
    assert_eq!(hex(&server.parent_span_id), parent);
    assert_eq!(server.kind, 2, "SPAN_KIND_SERVER");
    assert_eq!(attr(&server, "http.route").as_deref(), Some("api"));
    assert_eq!(
        attr(&server, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(attr(&server, "url.path").as_deref(), Some("/api/x"));
    for child in [&route, &client, &response] {
        assert_eq!(child.parent_span_id, server.span_id, "{}", child.name);
    }
    assert_eq!(client.kind, 3, "SPAN_KIND_CLIENT");
    assert_eq!(
        hex(&client.span_id),
        parts[2],
        "the upstream's parent is the client span"
    );
    assert_eq!(attempt.parent_span_id, client.span_id);
    assert_eq!(
        attr(&attempt, "server.port"),
        Some(up.addr.port().to_string())
    );
    assert_eq!(
        attr(&attempt, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(attr(&route, "fluxgate.upstream").as_deref(), Some("u"));
    fg.shutdown();
    let line = std::fs::read_to_string(&log).unwrap();
    assert!(
        line.contains(&format!("\"trace_id\":\"{trace}\"")),
        "{line}"
    );
}

#[test]
fn the_sample_ratio_holds_and_unsampled_requests_still_propagate() {
    let (otlp, spans) = receiver();
    let up = support::upstream(support::Behavior::Echo);
    let log = support::scratch("tracing-ratio").join("access.log");
    let fg = gateway(up.addr, otlp, 0.25, &log);
    let addr = fg.local_addrs()[0];
    let n = 400;
    let mut c = RawClient::connect(addr);
    let mut sampled_flags = 0;
    let mut traces = std::collections::HashSet::new();
    for _ in 0..n {
        c.send(b"GET /api HTTP/1.1\r\nHost: t\r\n\r\n");
        let r = c.read_response().unwrap();
        assert_eq!(r.status, 200);
        let seen = upstream_traceparent(r.header("x-up-fields").unwrap());
        let parts: Vec<&str> = seen.split('-').collect();
        assert_eq!(parts.len(), 4, "{seen}");
        traces.insert(parts[1].to_owned());
        sampled_flags += usize::from(parts[3] == "01");
    }
    assert_eq!(
        traces.len(),
        n,
        "a new trace for each request without a parent"
    );
    // Binomial(400, 0.25): mean 100, sd 8.7; 60..140 is beyond 4.5 sd.
    assert!(
        (60..=140).contains(&sampled_flags),
        "{sampled_flags} of {n} sampled"
    );
    // A parent that is not sampled is followed too: not traced, flag kept off.
    c.send(b"GET /api HTTP/1.1\r\nHost: t\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00\r\n\r\n");
    let r = c.read_response().unwrap();
    let seen = upstream_traceparent(r.header("x-up-fields").unwrap());
    assert!(
        seen.starts_with("00-0af7651916cd43dd8448eb211c80319c-") && seen.ends_with("-00"),
        "{seen}"
    );
    fg.shutdown();
    // Shut down, the gateway has exported everything: the server spans are the sampled ones.
    let got = spans.lock().unwrap().clone();
    let servers: Vec<&Span> = got
        .iter()
        .map(|(_, s)| s)
        .filter(|s| s.name == "GET")
        .collect();
    assert_eq!(
        servers.len(),
        sampled_flags,
        "every sampled request and no other is exported"
    );
    assert!(servers
        .iter()
        .all(|s| hex(&s.trace_id) != "0af7651916cd43dd8448eb211c80319c"));
}
