//! The core data path through real sockets: every test runs once with the io_uring acceptor
//! and once with epoll.

#[macro_use]
mod support;

use std::io::Write;
use std::time::{Duration, Instant};

use fluxgate_conf::IoMode;
use support::*;

on_both_acceptors!(
    http1_is_proxied_with_forwarding_headers,
    h2c_downstream_is_proxied,
    h2c_ten_megabytes_stream_both_ways,
    h2c_many_streams_share_one_connection,
    h2c_reset_stream_leaves_the_connection_serving,
    h2c_upstream_is_used,
    h2c_trailers_pass_both_ways_over_an_h2c_upstream,
    pipelined_requests_are_answered_in_order,
    ten_megabytes_stream_both_ways,
    sequential_requests_reuse_pooled_connections,
    idle_pooled_connections_close_after_idle_timeout,
    burst_surplus_is_reused_then_closed,
    prewarm_opens_connections_at_start,
    dead_upstream_gives_502_fast,
    slow_upstream_gives_504,
    stale_pooled_connection_is_retried_for_idempotent_only,
    long_request_line_gives_414_and_close,
    large_headers_give_431_and_close,
    slow_header_gives_408_and_close,
    idle_client_is_closed_after_keepalive_timeout,
    content_length_with_transfer_encoding_gives_400,
    conflicting_content_lengths_give_400,
    invalid_chunk_size_gives_400_and_close,
    connections_over_the_worker_cap_are_closed,
    a_burst_of_connections_past_the_completion_queue_is_all_served,
    idle_connection_is_parked_and_serves_the_next_request,
    pipelined_bytes_held_while_idle_are_not_lost,
    upstream_connection_cap_queues_then_gives_503,
    expect_100_continue_is_answered_when_the_body_is_wanted,
    http10_closes_unless_keep_alive_is_asked,
    request_line_past_the_head_limit_gives_414,
    chunked_request_body_streams_upstream,
    too_many_headers_give_431_and_close,
    hop_by_hop_headers_are_removed_both_ways,
    hop_by_hop_headers_stop_before_an_h2c_upstream,
    expect_100_continue_is_not_sent_when_the_answer_comes_first,
    http1_request_body_is_read_only_as_the_upstream_takes_it,
    h2_request_body_is_held_to_what_the_upstream_takes,
    drain_closes_http1_answers_in_flight,
    absolute_form_without_a_path_goes_upstream_as_a_slash,
    a_client_that_stops_reading_is_closed_at_the_send_timeout,
    a_stalled_upload_gets_408_at_the_body_timeout,
    a_trickling_upload_gets_408_at_the_request_deadline,
    an_upload_below_the_minimum_rate_gets_408,
);

fn http1_is_proxied_with_forwarding_headers(io: IoMode) {
    let up = upstream(Behavior::Echo);
    let fg = proxy_to(up.addr, "", "", io);
    let mut c = RawClient::connect(fg.local_addrs()[0]);
    c.send(
        b"GET /a?b=1 HTTP/1.1\r\nHost: app.example\r\nConnection: keep-alive, X-Drop\r\n\
          X-Drop: secret\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nX-Forwarded-For: 10.1.1.1\r\n\
          X-Keep: yes\r\n\r\n",
    );
    let r = c.read_response().expect("response");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-up-path"), Some("/a?b=1"));
    assert_eq!(
        r.header("x-up-host"),
        Some("app.example"),
        "Host is preserved"
    );
    assert_eq!(r.header("x-up-xff"), Some("10.1.1.1, 127.0.0.1"));
    assert_eq!(r.header("x-up-xfp"), Some("http"));
    assert_eq!(r.header("x-up-xfh"), Some("app.example"));
    let seen = r.header("x-up-headers").unwrap();
    for gone in ["x-drop", "keep-alive", "connection", "te"] {
        assert!(
            !seen.split(',').any(|h| h == gone),
            "{gone} reached the upstream: {seen}"
        );
    }
    assert!(seen.split(',').any(|h| h == "x-keep"));
    // The upstream's hop-by-hop response headers stop at the proxy.
    assert!(r.header("x-up-hop").is_none());
    assert!(r.header("keep-alive").is_none());
    assert!(r.header("connection").is_none());
    // And the client connection is still usable.
    c.send(b"GET /second HTTP/1.1\r\nHost: app.example\r\n\r\n");
    assert_eq!(
        c.read_response().unwrap().header("x-up-path"),
        Some("/second")
    );
    fg.shutdown();
}

fn h2c_downstream_is_proxied(io: IoMode) {
    let up = upstream(Behavior::Echo);
    let fg = proxy_to(up.addr, "", "", io);
    with_h2(fg.local_addrs()[0], |mut send| async move {
        let req = http::Request::post("http://app.example/h2?x=1")
            .body(())
            .unwrap();
        let (resp, mut tx) = send.send_request(req, false).unwrap();
        h2_send_all(&mut tx, bytes::Bytes::from_static(b"over h2c"), true).await;
        let (parts, mut rx) = resp.await.unwrap().into_parts();
        let mut body = Vec::new();
        h2_read(&mut rx, &mut body, usize::MAX).await;
        assert_eq!(parts.status, 200);
        assert_eq!(parts.version, http::Version::HTTP_2);
        assert_eq!(parts.headers["x-up-version"], "HTTP/1.1");
        assert_eq!(parts.headers["x-up-path"], "/h2?x=1");
        assert_eq!(parts.headers["x-up-host"], "app.example");
        assert_eq!(&body[..], b"over h2c");
    });
    fg.shutdown();
}

/// Runs `f` with an h2 client connection to `addr` (prior knowledge), on a current-thread
/// runtime that also drives the connection.
fn with_h2<F, Fut>(addr: std::net::SocketAddr, f: F)
where
    F: FnOnce(h2::client::SendRequest<bytes::Bytes>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (send, conn) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let send = send.ready().await.unwrap();
        tokio::time::timeout(Duration::from_secs(20), f(send))
            .await
            .expect("h2 exchange finished in time");
    })
}

/// Sends `data` on an h2 stream as the peer's window allows; `end` closes the stream after.
async fn h2_send_all(tx: &mut h2::SendStream<bytes::Bytes>, mut data: bytes::Bytes, end: bool) {
    while !data.is_empty() {
        tx.reserve_capacity(data.len());
        let cap = std::future::poll_fn(|cx| tx.poll_capacity(cx))
            .await
            .expect("stream open")
            .expect("capacity");
        let chunk = data.split_to(cap.min(data.len()));
        tx.send_data(chunk, end && data.is_empty()).unwrap();
    }
}

/// Reads h2 body chunks (returning flow-control credit) until at least `want` bytes are in
/// `into`, or the body ends.
async fn h2_read(body: &mut h2::RecvStream, into: &mut Vec<u8>, want: usize) {
    while into.len() < want {
        match body.data().await {
            Some(chunk) => {
                let chunk = chunk.expect("body chunk");
                let _ = body.flow_control().release_capacity(chunk.len());
                into.extend_from_slice(&chunk);
            }
            None => break,
        }
    }
}

fn h2c_ten_megabytes_stream_both_ways(io: IoMode) {
    const LEN: usize = 10 << 20;
    const FIRST: usize = 1 << 20;
    let up = upstream(Behavior::Echo);
    let fg = proxy_to(up.addr, "", "", io);
    let body: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8).collect();
    let body = bytes::Bytes::from(body);
    let expect = body.clone();
    with_h2(fg.local_addrs()[0], |mut send| async move {
        let req = http::Request::post("http://x/echo")
            .header("content-length", LEN)
            .body(())
            .unwrap();
        let (resp, mut tx) = send.send_request(req, false).unwrap();
        h2_send_all(&mut tx, body.slice(..FIRST), false).await;
        // The echo must start coming back while 9 MB are still unsent: neither direction
        // is buffered whole.
        let resp = resp.await.unwrap();
        assert_eq!(resp.status(), 200);
        let mut rx = resp.into_body();
        let mut echoed = Vec::new();
        h2_read(&mut rx, &mut echoed, 100_000).await;
        assert!(echoed.len() >= 100_000, "echo starts before the body ends");
        let rest = body.slice(FIRST..);
        let sender = tokio::spawn(async move { h2_send_all(&mut tx, rest, true).await });
        h2_read(&mut rx, &mut echoed, LEN + 1).await;
        sender.await.unwrap();
        assert_eq!(echoed.len(), LEN);
        assert!(echoed == expect, "echoed body differs");
    });
    fg.shutdown();
}

fn h2c_many_streams_share_one_connection(io: IoMode) {
    const STREAMS: usize = 100;
    let up = upstream(Behavior::Echo);
    let fg = proxy_to(up.addr, "", "", io);
    let round = || {
        with_h2(fg.local_addrs()[0], |mut send| async move {
            let mut pending = Vec::new();
            for i in 0..STREAMS {
                send = send.ready().await.unwrap();
                let req = http::Request::post(format!("http://x/s/{i}"))
                    .body(())
                    .unwrap();
                let (resp, mut tx) = send.send_request(req, false).unwrap();
                tx.send_data(bytes::Bytes::from(format!("body {i}")), true)
                    .unwrap();
                pending.push((i, resp));
            }
            // All in flight at once; answered each to its own stream.
            for (i, resp) in pending {
                let resp = resp.await.unwrap();
                assert_eq!(resp.status(), 200);
                assert_eq!(resp.headers()["x-up-path"], format!("/s/{i}").as_str());
                let mut got = Vec::new();
                h2_read(&mut resp.into_body(), &mut got, usize::MAX).await;
                assert_eq!(got, format!("body {i}").as_bytes());
            }
        })
    };
    round();
    let opened = up.accepted();
    // Right after, the same load finds the connections the first round pooled (the burst
    // surplus is kept about a second): none is opened again.
    round();
    assert_eq!(
        up.accepted(),
        opened,
        "the second round reused pooled connections"
    );
    fg.shutdown();
}

fn h2c_reset_stream_leaves_the_connection_serving(io: IoMode) {
    // An upstream that never answers /slow but notes when its connection is closed under it.
    let cancelled = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = cancelled.clone();
    let addr = serve_in_background(move |mut stream| {
        let seen = seen.clone();
        async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut buf = Vec::new();
            let Some(head) = read_head(&mut stream, &mut buf).await else {
                return;
            };
            if head.starts_with("GET /slow ") {
                // Held until the proxy gives up on the request and closes the connection.
                let mut byte = [0u8; 1];
                let gone = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte));
                if matches!(gone.await, Ok(Ok(0) | Err(_))) {
                    seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                return;
            }
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await;
        }
    });
    let fg = proxy_to(addr, "", "", io);
    let cancelled_seen = cancelled.clone();
    with_h2(fg.local_addrs()[0], |mut send| async move {
        let req = |p: &str| http::Request::get(format!("http://x{p}")).body(()).unwrap();
        let (_first, mut tx) = send.send_request(req("/slow"), true).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        tx.send_reset(h2::Reason::CANCEL);
        // The upstream sees its request abandoned: the proxy closed that connection.
        let deadline = Instant::now() + Duration::from_secs(3);
        while cancelled_seen.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            assert!(
                Instant::now() < deadline,
                "the upstream request was not cancelled"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        send = send.ready().await.unwrap();
        let (second, _) = send.send_request(req("/fast"), true).unwrap();
        assert_eq!(second.await.unwrap().status(), 200);
    });
    assert_eq!(cancelled.load(std::sync::atomic::Ordering::SeqCst), 1);
    fg.shutdown();
}

fn h2c_upstream_is_used(io: IoMode) {
    let up = h2c_upstream();
    let fg = proxy_to(up.addr, "protocol = \"h2c\"", "", io);
    for i in 0..5 {
        let r = get(fg.local_addrs()[0], &format!("/over-h2/{i}"));
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-up-version"), Some("HTTP/2.0"));
        assert_eq!(
            r.header("x-up-path"),
            Some(format!("/over-h2/{i}").as_str())
        );
    }
    assert_eq!(up.accepted(), 1, "one multiplexed upstream connection");
    fg.shutdown();
}

/// gRPC's shape: a request body with trailers, echoed by an h2c upstream with its trailers;
/// both reach the other side through fluxgate's HTTP/2 server and client.
fn h2c_trailers_pass_both_ways_over_an_h2c_upstream(io: IoMode) {
    let up = h2c_upstream();
    let fg = proxy_to(up.addr, "protocol = \"h2c\"", "", io);
    with_h2(fg.local_addrs()[0], |mut send| async move {
        let req = http::Request::post("http://x/svc.Echo/Call")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        let (resp, mut tx) = send.send_request(req, false).unwrap();
        h2_send_all(
            &mut tx,
            bytes::Bytes::from_static(b"\0\0\0\0\x05hello"),
            false,
        )
        .await;
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        tx.send_trailers(trailers).unwrap();
        let resp = resp.await.unwrap();
        assert_eq!(resp.status(), 200);
        let mut rx = resp.into_body();
        let mut body = Vec::new();
        h2_read(&mut rx, &mut body, usize::MAX).await;
        assert_eq!(body, b"\0\0\0\0\x05hello");
        let got = rx.trailers().await.unwrap().expect("response trailers");
        assert_eq!(got["grpc-status"], "0");
    });
    fg.shutdown();
}

fn pipelined_requests_are_answered_in_order(io: IoMode) {
    let up = upstream(Behavior::Echo);
    let fg = proxy_to(up.addr, "", "", io);
    let mut c = RawClient::connect(fg.local_addrs()[0]);
    let mut batch = Vec::new();
    for i in 0..5 {
        batch.extend_from_slice(format!("GET /p{i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
    }
    c.send(&batch);
    for i in 0..5 {
        let r = c.read_response().expect("pipelined response");
        assert_eq!(r.header("x-up-path"), Some(format!("/p{i}").as_str()));
    }
    fg.shutdown();
}

fn ten_megabytes_stream_both_ways(io: IoMode) {
    const LEN: usize = 10 << 20;
    const FIRST: usize = 1 << 20;
    let up = upstream(Behavior::Echo);
    let fg = proxy_to(up.addr, "", "", io);
    let body: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8).collect();
    let mut c = RawClient::connect(fg.local_addrs()[0]);
    c.send(format!("POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {LEN}\r\n\r\n").as_bytes());
    c.send(&body[..FIRST]);
    // The echo must start coming back while 9 MB are still unsent: neither direction is
    // buffered whole. Read the head and the start of the body, then send the rest.
    let mut reader = c.stream.try_clone().unwrap();
    let mut got = Vec::new();
    let mut chunk = vec![0u8; 65536];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") || got.len() < 100_000 {
        let n =
            std::io::Read::read(&mut reader, &mut chunk).expect("echo starts before the body ends");
        assert!(n > 0, "closed early");
        got.extend_from_slice(&chunk[..n]);
    }
    let mut writer = c.stream.try_clone().unwrap();
    let rest = body[FIRST..].to_vec();
    let w = std::thread::spawn(move || writer.write_all(&rest).unwrap());
    let head_end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let mut echoed = got.split_off(head_end);
    while echoed.len() < LEN {
        let n = std::io::Read::read(&mut reader, &mut chunk).unwrap();
        assert!(n > 0, "closed after {} bytes", echoed.len());
        echoed.extend_from_slice(&chunk[..n]);
    }
    w.join().unwrap();
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    assert_eq!(echoed.len(), LEN);
    assert!(echoed == body, "echoed body differs");
    fg.shutdown();
}

fn sequential_requests_reuse_pooled_connections(io: IoMode) {
    let up = upstream(Behavior::Echo);
    let fg = proxy_to(up.addr, "", "", io);
    for i in 0..1000 {
        // A new client connection each time: reuse must come from the upstream pool.
        let r = get(fg.local_addrs()[0], &format!("/n{i}"));
        assert_eq!(r.status, 200);
    }
    assert!(
        up.accepted() <= 4,
        "{} upstream connections for 1000 requests",
        up.accepted()
    );
    fg.shutdown();
}

fn idle_pooled_connections_close_after_idle_timeout(io: IoMode) {
    let up = upstream(Behavior::Echo);
    let fg = proxy_to(up.addr, "idle_timeout = \"300ms\"", "", io);
    assert_eq!(get(fg.local_addrs()[0], "/").status, 200);
    assert_eq!(up.accepted(), 1);
    assert!(
        eventually(Duration::from_secs(5), || up.open() == 0),
        "pooled connection still open"
    );
    fg.shutdown();
}

fn burst_surplus_is_reused_then_closed(io: IoMode) {
    const BURST: usize = 4;
    let up = upstream(Behavior::Together(BURST));
    let fg = proxy_to(up.addr, "max_idle_per_host = 1", "", io);
    let addr = fg.local_addrs()[0];
    let burst = || {
        let clients: Vec<_> = (0..BURST)
            .map(|i| std::thread::spawn(move || get(addr, &format!("/b{i}")).status))
            .collect();
        for c in clients {
            assert_eq!(c.join().unwrap(), 200);
        }
    };
    burst();
    assert_eq!(
        up.accepted(),
        BURST,
        "the upstream held the burst until all four were in flight"
    );
    // One connection is kept as the idle set, the rest as short-lived surplus: a burst right
    // after reuses all of them.
    burst();
    assert_eq!(
        up.accepted(),
        BURST,
        "the second burst reused the pooled connections"
    );
    // The surplus closes after about a second; the configured idle set stays.
    assert!(
        eventually(Duration::from_secs(5), || up.open() == 1),
        "{} upstream connections open",
        up.open()
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(up.open(), 1);
    fg.shutdown();
}

fn prewarm_opens_connections_at_start(io: IoMode) {
    let up = upstream(Behavior::Echo);
    let fg = proxy_to(up.addr, "prewarm = 3", "", io);
    assert!(eventually(Duration::from_secs(5), || up.accepted() == 3));
    assert!(eventually(Duration::from_secs(5), || up.open() == 3));
    for _ in 0..3 {
        assert_eq!(get(fg.local_addrs()[0], "/").status, 200);
    }
    assert_eq!(up.accepted(), 3, "requests used the pre-warmed connections");
    fg.shutdown();
}

fn dead_upstream_gives_502_fast(io: IoMode) {
    let dead = dead_addr();
    let fg = proxy_to(dead.addr, "", "", io);
    let t = Instant::now();
    let r = get(fg.local_addrs()[0], "/");
    assert_eq!(r.status, 502);
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "took {:?}",
        t.elapsed()
    );
    fg.shutdown();
}

fn slow_upstream_gives_504(io: IoMode) {
    let up = upstream(Behavior::Slow(Duration::from_secs(3)));
    let fg = proxy_to(up.addr, "response_timeout = \"200ms\"", "", io);
    assert_eq!(get(fg.local_addrs()[0], "/").status, 504);
    fg.shutdown();
}

fn stale_pooled_connection_is_retried_for_idempotent_only(io: IoMode) {
    let up = upstream(Behavior::DropSecond);
    let fg = proxy_to(up.addr, "", "", io);
    let addr = fg.local_addrs()[0];
    assert_eq!(get(addr, "/first").status, 200);
    // The pooled connection dies under the second request: GET is retried on a new one.
    let r = get(addr, "/second");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-up-path"), Some("/second"));
    assert_eq!(up.accepted(), 2);
    // POST is not idempotent: the same failure is a 502, not a second delivery.
    let mut c = RawClient::connect(addr);
    c.send(b"POST /order HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi");
    assert_eq!(c.read_response().unwrap().status, 502);
    assert_eq!(up.accepted(), 2, "POST was not sent again");
    fg.shutdown();
}

fn long_request_line_gives_414_and_close(io: IoMode) {
    let up = upstream(Behavior::Echo);
    let fg = proxy_to(up.addr, "", "max_request_line = \"1KiB\"", io);
    let mut c = RawClient::connect(fg.local_addrs()[0]);
    c.send(format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(2000)).as_bytes());
    assert_eq!(c.read_response().unwrap().status, 414);
    assert!(c.closed());
    assert_eq!(up.accepted(), 0);
    fg.shutdown();
}

fn large_headers_give_431_and_close(io: IoMode) {
    let up = upstream(Behavior::Echo);
    let fg = proxy_to(up.addr, "", "max_header_bytes = \"16KiB\"", io);
    let mut c = RawClient::connect(fg.local_addrs()[0]);
    let mut req = String::from("GET / HTTP/1.1\r\nHost: x\r\n");
    for i in 0..40 {
        req.push_str(&format!("X-Big-{i}: {}\r\n", "v".repeat(500)));
    }
    req.push_str("\r\n");
    c.send(req.as_bytes());
    assert_eq!(c.read_response().unwrap().status, 431);
    assert!(c.closed());
    assert_eq!(up.accepted(), 0);
    fg.shutdown();
}

fn slow_header_gives_408_and_close(io: IoMode) {
    let up = upstream(Behavior::Echo);
    let fg = proxy_to(up.addr, "", "header_read_timeout = \"300ms\"", io);
    let mut c = RawClient::connect(fg.local_addrs()[0]);
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n");
    assert_eq!(c.read_response().unwrap().status, 408);
    assert!(c.closed());
    fg.shutdown();
}

fn idle_client_is_closed_after_keepalive_timeout(io: IoMode) {
    let up = upstream(Behavior::Echo);
    let fg = proxy_to(up.addr, "", "keepalive_timeout = \"300ms\"", io);
    let mut c = RawClient::connect(fg.local_addrs()[0]);
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(c.read_response().unwrap().status, 200);
    assert!(
        c.closed(),
        "idle connection closed without another response"
    );
    fg.shutdown();
}

fn content_length_with_transfer_encoding_gives_400(io: IoMode) {
    let up = upstream(Behavior::Echo);
    let fg = proxy_to(up.addr, "", "", io);
    let mut c = RawClient::connect(fg.local_addrs()[0]);
    c.send(
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n\
          4\r\nabcd\r\n0\r\n\r\n",
    );
    assert_eq!(c.read_response().unwrap().status, 400);
    assert!(c.closed());
    assert_eq!(up.accepted(), 0, "nothing was forwarded");
    fg.shutdown();
}

fn conflicting_content_lengths_give_400(io: IoMode) {
    let up = upstream(Behavior::Echo);
    let fg = proxy_to(up.addr, "", "", io);
    let mut c = RawClient::connect(fg.local_addrs()[0]);
    c.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde");
    assert_eq!(c.read_response().unwrap().status, 400);
    assert!(c.closed());
    assert_eq!(up.accepted(), 0, "nothing was forwarded");
    fg.shutdown();
}

fn invalid_chunk_size_gives_400_and_close(io: IoMode) {
    let up = upstream(Behavior::Echo);
    let fg = proxy_to(up.addr, "", "", io);
    let mut c = RawClient::connect(fg.local_addrs()[0]);
    c.send(
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabcd\r\n0\r\n\r\n",
    );
    assert_eq!(c.read_response().unwrap().status, 400);
    assert!(c.closed());
    fg.shutdown();
}

fn connections_over_the_worker_cap_are_closed(io: IoMode) {
    let up = upstream(Behavior::Echo);
    let fg = start(
        &format!(
            "[[listener]]\naddress = \"127.0.0.1:0\"\nupstream = \"u\"\nmax_connections = 1\n\
             [[upstream]]\nname = \"u\"\nendpoints = [\"{}\"]\n",
            up.addr
        ),
        io,
    );
    let addr = fg.local_addrs()[0];
    let mut first = RawClient::connect(addr);
    first.send(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(first.read_response().unwrap().status, 200);
    let mut second = RawClient::connect(addr);
    second.send(b"GET /2 HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(
        second.read_response().is_none() && second.closed(),
        "over the cap: closed"
    );
    first.send(b"GET /3 HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(
        first.read_response().unwrap().status,
        200,
        "the first still works"
    );
    fg.shutdown();
}

/// More connections at once than the io_uring acceptor's completion queue holds (the
/// kernel keeps the surplus on its overflow list, and may end the multishot accept there):
/// every one is accepted and answered.
fn a_burst_of_connections_past_the_completion_queue_is_all_served(io: IoMode) {
    let fg = start(
        "[[listener]]\naddress = \"127.0.0.1:0\"\nrespond = { status = 200 }\n",
        io,
    );
    let addr = fg.local_addrs()[0];
    for round in 0..3 {
        let mut clients: Vec<_> = (0..700).map(|_| RawClient::connect(addr)).collect();
        for c in &mut clients {
            c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        }
        for (i, c) in clients.iter_mut().enumerate() {
            let status = c.read_response().map(|r| r.status);
            assert_eq!(status, Some(200), "round {round}: connection {i} of 700");
        }
    }
    fg.shutdown();
}

fn idle_connection_is_parked_and_serves_the_next_request(io: IoMode) {
    let up = upstream(Behavior::Echo);
    let fg = proxy_with_admin(up.addr, io);
    let parked = || parked_connections(&fg);
    let mut c = RawClient::connect(fg.local_addrs()[0]);
    c.send(b"GET /before HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(c.read_response().unwrap().status, 200);
    assert_eq!(parked(), 0);
    // Idle past the park delay (1 s): hyper's state is dropped, the socket kept.
    assert!(
        eventually(Duration::from_secs(3), || parked() == 1),
        "parked"
    );
    c.send(b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n");
    let r = c.read_response().expect("served after parking");
    assert_eq!(r.header("x-up-path"), Some("/after"));
    fg.shutdown();
}

fn pipelined_bytes_held_while_idle_are_not_lost(io: IoMode) {
    let up = upstream(Behavior::Echo);
    let fg = proxy_to(up.addr, "", "", io);
    let mut c = RawClient::connect(fg.local_addrs()[0]);
    // The second head arrives half in the first read: the connection must not be parked
    // while hyper holds those bytes.
    c.send(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\nGET /two HTTP/1.1\r\nHo");
    assert_eq!(c.read_response().unwrap().header("x-up-path"), Some("/one"));
    std::thread::sleep(Duration::from_millis(1500));
    c.send(b"st: x\r\n\r\n");
    assert_eq!(c.read_response().unwrap().header("x-up-path"), Some("/two"));
    fg.shutdown();
}

fn upstream_connection_cap_queues_then_gives_503(io: IoMode) {
    let up = upstream(Behavior::Slow(Duration::from_millis(400)));
    let fg = proxy_to(
        up.addr,
        "max_connections = 1\nconnect_timeout = \"1s\"",
        "",
        io,
    );
    let addr = fg.local_addrs()[0];
    // Two at once through one allowed connection: the second waits for the first.
    let a = std::thread::spawn(move || get(addr, "/a").status);
    let b = std::thread::spawn(move || get(addr, "/b").status);
    assert_eq!((a.join().unwrap(), b.join().unwrap()), (200, 200));
    assert_eq!(up.accepted(), 1, "the cap held");
    fg.shutdown();

    // When the wait for a free connection outlasts connect_timeout: 503.
    let up = upstream(Behavior::Slow(Duration::from_millis(1500)));
    let fg = proxy_to(
        up.addr,
        "max_connections = 1\nconnect_timeout = \"200ms\"",
        "",
        io,
    );
    let addr = fg.local_addrs()[0];
    let slow = std::thread::spawn(move || get(addr, "/slow").status);
    assert!(eventually(Duration::from_secs(2), || up.accepted() == 1));
    assert_eq!(get(addr, "/queued").status, 503);
    assert_eq!(slow.join().unwrap(), 200);
    fg.shutdown();
}

fn expect_100_continue_is_answered_when_the_body_is_wanted(io: IoMode) {
    let up = upstream(Behavior::Echo);
    let fg = proxy_to(up.addr, "", "", io);
    let mut c = RawClient::connect(fg.local_addrs()[0]);
    c.send(b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n");
    // Nothing of the body is sent until the server invites it.
    assert_eq!(c.read_response().expect("interim answer").status, 100);
    c.send(b"hello");
    let r = c.read_response().expect("final answer");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"hello");
    fg.shutdown();
}

fn http10_closes_unless_keep_alive_is_asked(io: IoMode) {
    let up = upstream(Behavior::Echo);
    let fg = proxy_to(up.addr, "", "", io);
    let addr = fg.local_addrs()[0];
    let mut c = RawClient::connect(addr);
    c.send(b"GET /old HTTP/1.0\r\n\r\n");
    let r = c.read_response().expect("response");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("close"));
    assert!(c.closed());
    let mut c = RawClient::connect(addr);
    for i in 0..2 {
        c.send(format!("GET /ka{i} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").as_bytes());
        let r = c.read_response().expect("kept-alive response");
        assert_eq!(r.header("connection"), Some("keep-alive"));
        assert_eq!(r.header("x-up-path"), Some(format!("/ka{i}").as_str()));
    }
    fg.shutdown();
}

fn request_line_past_the_head_limit_gives_414(io: IoMode) {
    let up = upstream(Behavior::Echo);
    let fg = proxy_to(up.addr, "", "max_header_bytes = \"8KiB\"", io);
    let mut c = RawClient::connect(fg.local_addrs()[0]);
    // Longer than the whole head may be, with no line end in sight.
    c.send(format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(12_000)).as_bytes());
    assert_eq!(c.read_response().unwrap().status, 414);
    assert!(c.closed());
    assert_eq!(up.accepted(), 0);
    fg.shutdown();
}

fn chunked_request_body_streams_upstream(io: IoMode) {
    let up = upstream(Behavior::Echo);
    let fg = proxy_to(up.addr, "", "", io);
    let mut c = RawClient::connect(fg.local_addrs()[0]);
    c.send(b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n");
    c.send(b"7;ext=1\r\n, world\r\n0\r\n\r\n");
    let r = c.read_response().expect("response");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("x-up-te"),
        Some("chunked"),
        "length unknown: chunked upstream too"
    );
    assert_eq!(r.body, b"hello, world");
    // The connection is in step for the next request.
    c.send(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(
        c.read_response().unwrap().header("x-up-path"),
        Some("/next")
    );
    fg.shutdown();
}

fn too_many_headers_give_431_and_close(io: IoMode) {
    let up = upstream(Behavior::Echo);
    let fg = proxy_to(up.addr, "", "max_headers = 10", io);
    let addr = fg.local_addrs()[0];
    let head = |n: usize| {
        let mut req = String::from("GET / HTTP/1.1\r\nHost: x\r\n");
        for i in 1..n {
            req.push_str(&format!("X-F{i}: v\r\n"));
        }
        req + "\r\n"
    };
    // Ten fields, Host included, are allowed; eleven are not.
    let mut c = RawClient::connect(addr);
    c.send(head(10).as_bytes());
    assert_eq!(c.read_response().unwrap().status, 200);
    let mut c = RawClient::connect(addr);
    c.send(head(11).as_bytes());
    assert_eq!(c.read_response().unwrap().status, 431);
    assert!(c.closed());
    assert_eq!(up.requests(), 1, "the refused head was not forwarded");
    fg.shutdown();
}

/// Every hop-by-hop field the README names (and one the Connection header names), as a
/// request sends them.
const HOP_REQUEST: &str = "Connection: keep-alive, X-Named\r\nX-Named: 1\r\n\
    Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\nTrailer: X-T\r\n\
    Upgrade: websocket\r\nProxy-Authorization: Basic eA==\r\nProxy-Authenticate: Basic\r\n\
    X-Keep: 1\r\n";
const HOP_NAMES: [&str; 10] = [
    "connection",
    "x-named",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
    "transfer-encoding",
];

/// The field names of an HTTP/1.1 head, lower-cased.
fn field_names(head: &str) -> Vec<String> {
    head.split("\r\n")
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, _)| k.trim().to_ascii_lowercase())
        .collect()
}

/// An upstream that keeps each request head it reads and answers it with every hop-by-hop
/// field (chunked, so Transfer-Encoding is one of them).
fn hop_upstream() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    let heads = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = heads.clone();
    let addr = serve_in_background(move |mut stream| {
        let seen = seen.clone();
        async move {
            use tokio::io::AsyncWriteExt;
            let mut buf = Vec::new();
            while let Some(head) = read_head(&mut stream, &mut buf).await {
                seen.lock().unwrap().push(head);
                let answer = b"HTTP/1.1 200 OK\r\nConnection: X-Resp-Named\r\nX-Resp-Named: 1\r\n\
                    Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\n\
                    Trailer: X-T\r\nUpgrade: h2c\r\nProxy-Authenticate: Basic\r\n\
                    Proxy-Authorization: Basic eA==\r\nTransfer-Encoding: chunked\r\nX-Kept: 1\r\n\r\n\
                    2\r\nok\r\n0\r\n\r\n";
                if stream.write_all(answer).await.is_err() {
                    return;
                }
            }
        }
    });
    (addr, heads)
}

fn hop_by_hop_headers_are_removed_both_ways(io: IoMode) {
    let (up, heads) = hop_upstream();
    let fg = proxy_to(up, "", "", io);
    let addr = fg.local_addrs()[0];
    // HTTP/1.1 client.
    let mut c = RawClient::connect(addr);
    c.send(format!("GET /hop HTTP/1.1\r\nHost: x\r\n{HOP_REQUEST}\r\n").as_bytes());
    let r = c.read_response().expect("response");
    assert_eq!((r.status, &r.body[..]), (200, &b"ok"[..]));
    let upstream_saw = field_names(&heads.lock().unwrap()[0]);
    for name in HOP_NAMES {
        assert!(
            !upstream_saw.contains(&name.to_owned()),
            "{name} reached the upstream: {upstream_saw:?}"
        );
        if name != "transfer-encoding" {
            // (the client's own framing is the gateway's: chunked, since the length is unknown)
            assert!(
                r.header(name).is_none(),
                "{name} reached the client: {:?}",
                r.headers
            );
        }
    }
    assert!(r.header("x-resp-named").is_none() && r.header("x-kept").is_some());
    assert!(upstream_saw.contains(&"x-keep".to_owned()));

    // HTTP/2 client: only TE (trailers) and the proxy-auth pair may be sent on HTTP/2; the
    // answer must carry no connection-specific field (the h2 client refuses one as malformed).
    with_h2(addr, |mut send| async move {
        let req = http::Request::get("http://x/hop2")
            .header("te", "trailers")
            .header("proxy-authorization", "Basic eA==")
            .header("x-keep", "1")
            .body(())
            .unwrap();
        let (resp, _) = send.send_request(req, true).unwrap();
        let resp = resp.await.expect("a well-formed HTTP/2 answer");
        assert_eq!(resp.status(), 200);
        for name in HOP_NAMES.iter().chain(&["x-resp-named"]) {
            assert!(
                resp.headers().get(*name).is_none(),
                "{name} reached the h2 client"
            );
        }
        let mut body = Vec::new();
        h2_read(&mut resp.into_body(), &mut body, usize::MAX).await;
        assert_eq!(body, b"ok");
    });
    let upstream_saw = field_names(&heads.lock().unwrap()[1]);
    for name in ["te", "proxy-authorization"] {
        assert!(
            !upstream_saw.contains(&name.to_owned()),
            "{name} from h2: {upstream_saw:?}"
        );
    }
    assert!(upstream_saw.contains(&"x-keep".to_owned()));
    fg.shutdown();
}

fn hop_by_hop_headers_stop_before_an_h2c_upstream(io: IoMode) {
    let up = h2c_upstream();
    let fg = proxy_to(up.addr, "protocol = \"h2c\"", "", io);
    let mut c = RawClient::connect(fg.local_addrs()[0]);
    c.send(format!("GET /hop HTTP/1.1\r\nHost: x\r\n{HOP_REQUEST}\r\n").as_bytes());
    let r = c.read_response().expect("response");
    assert_eq!(r.status, 200);
    let seen: Vec<&str> = r.header("x-up-headers").unwrap().split(',').collect();
    for name in HOP_NAMES {
        assert!(
            !seen.contains(&name),
            "{name} reached the h2c upstream: {seen:?}"
        );
    }
    assert!(seen.contains(&"x-keep"));
    fg.shutdown();
}

fn expect_100_continue_is_not_sent_when_the_answer_comes_first(io: IoMode) {
    let fg = start(
        "[[listener]]\naddress = \"127.0.0.1:0\"\nrespond = { status = 403, body = \"no\" }\n",
        io,
    );
    let mut c = RawClient::connect(fg.local_addrs()[0]);
    c.send(
        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    );
    let r = c.read_response().expect("the answer");
    assert_eq!(
        r.status, 403,
        "the final answer, with no 100 Continue before it"
    );
    // The upload never came: the connection is out of step and closes.
    assert!(c.closed());
    fg.shutdown();
}

/// An upstream that reads each request head and then nothing more, holding the connection
/// open for 10 s: whatever a client sends beyond the head piles up in front of it.
fn stalled_upstream() -> std::net::SocketAddr {
    serve_in_background(|mut stream| async move {
        use tokio::io::AsyncReadExt;
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match stream.read(&mut b).await {
                Ok(1) => head.push(b[0]),
                _ => return,
            }
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
    })
}

/// Bytes of an upload a client gets out before the path to a stalled upstream stops taking
/// them, out of this many offered. The socket buffers on the way (client, gateway, upstream)
/// hold a few MiB on loopback; a gateway that read the upload whole would take it all.
const UPLOAD: usize = 64 << 20;
const STALL_BOUND: usize = 16 << 20;

fn http1_request_body_is_read_only_as_the_upstream_takes_it(io: IoMode) {
    let fg = proxy_to(stalled_upstream(), "response_timeout = \"20s\"", "", io);
    let mut c = RawClient::connect(fg.local_addrs()[0]);
    c.send(format!("POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: {UPLOAD}\r\n\r\n").as_bytes());
    c.stream
        .set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let chunk = vec![b'x'; 64 << 10];
    let mut sent = 0;
    while sent < UPLOAD {
        match c.stream.write(&chunk) {
            Ok(n) => sent += n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break
            }
            Err(e) => panic!("upload failed: {e}"),
        }
    }
    assert!(
        sent < STALL_BOUND,
        "{sent} bytes taken before the stall: the body was not held back"
    );
    assert!(sent > 256 << 10, "only {sent} bytes taken");
    fg.shutdown();
}

fn h2_request_body_is_held_to_what_the_upstream_takes(io: IoMode) {
    let fg = proxy_to(stalled_upstream(), "response_timeout = \"20s\"", "", io);
    with_h2(fg.local_addrs()[0], |mut send| async move {
        let req = http::Request::post("http://x/up")
            .header("content-length", UPLOAD)
            .body(())
            .unwrap();
        let (_resp, mut tx) = send.send_request(req, false).unwrap();
        let mut sent = 0;
        while sent < UPLOAD {
            tx.reserve_capacity(64 << 10);
            let credit = std::future::poll_fn(|cx| tx.poll_capacity(cx));
            match tokio::time::timeout(Duration::from_millis(500), credit).await {
                Ok(Some(Ok(n))) => {
                    tx.send_data(bytes::Bytes::from(vec![b'x'; n]), false)
                        .unwrap();
                    sent += n;
                }
                Ok(other) => panic!("stream ended: {other:?}"),
                Err(_) => break,
            }
        }
        assert!(
            sent < STALL_BOUND,
            "{sent} bytes of window granted: credit did not wait for the upstream"
        );
        assert!(
            sent >= 1 << 20,
            "only {sent} bytes: less than one stream window"
        );
    });
    fg.shutdown();
}

fn drain_closes_http1_answers_in_flight(io: IoMode) {
    let up = upstream(Behavior::Slow(Duration::from_millis(500)));
    let fg = proxy_to(up.addr, "", "", io);
    let mut c = RawClient::connect(fg.local_addrs()[0]);
    c.send(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(eventually(Duration::from_secs(2), || up.requests() == 1));
    let drain = std::thread::spawn(move || fg.drain(Duration::from_secs(5)));
    let r = c
        .read_response()
        .expect("the request in flight is answered");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("connection"),
        Some("close"),
        "told not to reuse it"
    );
    assert!(c.closed());
    assert!(drain.join().unwrap(), "drained within the grace time");
}

/// Regression (found by the h1_request_head fuzz target): an absolute-form target with a query
/// and no path went upstream as "GET ?x=1", which no server takes.
fn absolute_form_without_a_path_goes_upstream_as_a_slash(io: IoMode) {
    let up = upstream(Behavior::Echo);
    let fg = proxy_to(up.addr, "", "", io);
    let mut c = RawClient::connect(fg.local_addrs()[0]);
    c.send(b"GET http://app.example?x=1 HTTP/1.1\r\nHost: app.example\r\n\r\n");
    let r = c.read_response().expect("response");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-up-path"), Some("/?x=1"));
    fg.shutdown();
}

fn a_client_that_stops_reading_is_closed_at_the_send_timeout(io: IoMode) {
    let (addr, cut) = big_upstream(BIG_RESPONSE);
    let fg = proxy_to(
        addr,
        "response_timeout = \"30s\"",
        "send_timeout = \"1s\"",
        io,
    );
    let before = rss_kib();
    let mut c = RawClient::connect(fg.local_addrs()[0]);
    c.send(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n");
    let asked = Instant::now();
    // The client reads nothing; the gateway gives up on it and cancels the upstream side.
    assert_cancelled_in_bounded_memory(&cut, before);
    // What the socket buffers held arrives, then the close.
    let got = bytes_until_close(&mut c.stream);
    assert!(
        got < BIG_RESPONSE / 2,
        "{got} bytes came through a connection that was to be closed"
    );
    assert!(asked.elapsed() < Duration::from_secs(10));
    fg.shutdown();
}

fn a_stalled_upload_gets_408_at_the_body_timeout(io: IoMode) {
    let fg = start(
        &format!(
            "[http]\nbody_timeout = \"1s\"\n\
             [[upstream]]\nname = \"u\"\nendpoints = [\"{}\"]\nresponse_timeout = \"20s\"\n\
             [[listener]]\naddress = \"127.0.0.1:0\"\n\
             [[listener.route]]\npath = \"/ok\"\nrespond = {{ status = 200, body = \"ok\" }}\n\
             [[listener.route]]\nupstream = \"u\"\n",
            stalled_upstream()
        ),
        io,
    );
    let addr = fg.local_addrs()[0];
    let mut c = RawClient::connect(addr);
    c.send(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789");
    let t = Instant::now();
    // Other clients are served meanwhile.
    assert_eq!(get(addr, "/ok").status, 200);
    let r = c.read_response().expect("an answer");
    assert_eq!(r.status, 408, "the upload stalled past the body timeout");
    assert!(c.closed());
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "answered at the 1 s body timeout, not the 20 s response timeout: {:?}",
        t.elapsed()
    );
    fg.shutdown();
}

/// Sends `chunk` every 100 ms after `head` until the gateway answers; returns the answer's
/// status and when it came, from the head on.
fn trickle(http_extra: &str, io: IoMode, chunk: &[u8]) -> (u16, Duration) {
    let fg = start(
        &format!(
            "[http]\n{http_extra}\n\
             [[upstream]]\nname = \"u\"\nendpoints = [\"{}\"]\nresponse_timeout = \"20s\"\n\
             [[listener]]\naddress = \"127.0.0.1:0\"\nupstream = \"u\"\n",
            stalled_upstream()
        ),
        io,
    );
    let mut c = RawClient::connect(fg.local_addrs()[0]);
    let t = Instant::now();
    c.send(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n");
    let mut b = [0u8; 1];
    loop {
        assert!(t.elapsed() < Duration::from_secs(5), "no answer");
        c.send(chunk);
        std::thread::sleep(Duration::from_millis(100));
        c.stream.set_nonblocking(true).unwrap();
        let answered = matches!(c.stream.peek(&mut b), Ok(1));
        c.stream.set_nonblocking(false).unwrap();
        if answered {
            break;
        }
    }
    let at = t.elapsed();
    let r = c.read_response().expect("an answer");
    fg.shutdown();
    (r.status, at)
}

fn a_trickling_upload_gets_408_at_the_request_deadline(io: IoMode) {
    // Never idle for the body timeout (20 s), never done.
    let (status, at) = trickle("request_timeout = \"1s\"", io, b"x");
    assert_eq!(status, 408);
    assert!(at >= Duration::from_millis(900), "answered at {at:?}");
}

fn an_upload_below_the_minimum_rate_gets_408(io: IoMode) {
    // 50 bytes per second against 100 after a first 500 ms: the deadline, 500 ms plus 1 s
    // per 100 bytes, passes at 1 s.
    let (status, at) = trickle(
        "body_timeout = \"500ms\"\nbody_min_rate = 100",
        io,
        b"xxxxx",
    );
    assert_eq!(status, 408);
    assert!(at >= Duration::from_millis(900), "answered at {at:?}");
}
