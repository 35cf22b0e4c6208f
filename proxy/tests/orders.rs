//! Order entry through real sockets: sessions over raw TCP and WebSocket, single orders over
//! HTTP/1.1 and h2c POST, against the test's own order service (an HTTP/1.1 server that
//! decodes each order and records its client order id). The crash tests run the `fluxgate`
//! binary and kill it with SIGKILL.

mod support;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use fluxgate_codecs::envelope::Kind;
use fluxgate_codecs::gen::orders::{
    AckStatus, CancelOrder, NewOrder, OrderAck, OrderType, RejectReason, Side, TimeInForce,
};
use fluxgate_codecs::{decode_ack, decode_order, frame_bare, FrameParser, OrderEncoder};
use fluxgate_conf::IoMode;
use fluxgate_wire::ws;
use support::{eventually, metric, read_head, scratch, serve_in_background};

/// Longest a test waits for what it expects.
const LIMIT: Duration = Duration::from_secs(30);

/// The test's order service: every order (or cancel) POSTed to it is decoded, its client
/// order id recorded, and answered 200 `took ID` (409 `refused ID` for ids starting with
/// `refuse-`); while `stalled`, it holds its answers.
struct OrderService {
    addr: SocketAddr,
    /// Client order ids in the order they arrived (`BAD` for a body that did not decode).
    seen: Arc<Mutex<Vec<String>>>,
    stalled: Arc<AtomicBool>,
}

impl OrderService {
    fn start() -> OrderService {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stalled = Arc::new(AtomicBool::new(false));
        let (s2, st2) = (Arc::clone(&seen), Arc::clone(&stalled));
        let addr = serve_in_background(move |mut conn| {
            let (seen, stalled) = (Arc::clone(&s2), Arc::clone(&st2));
            async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = Vec::new();
                while let Some(head) = read_head(&mut conn, &mut buf).await {
                    let header = |name: &str| {
                        head.lines().find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
                        })
                    };
                    let len: usize = header("content-length")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    let mut chunk = [0u8; 4096];
                    while buf.len() < len {
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body: Vec<u8> = buf.drain(..len).collect();
                    let id = header("x-fluxgate-client-order-id").unwrap_or_default();
                    let cancel = header("content-type").is_some_and(|c| c.contains("CancelOrder"));
                    let kind = if cancel {
                        Kind::CancelOrder
                    } else {
                        Kind::NewOrder
                    };
                    let mut framed = BytesMut::new();
                    frame_bare(kind, &body, &mut framed);
                    let frame = FrameParser::default().parse(&mut framed).ok().flatten();
                    let decoded = frame.is_some_and(|f| {
                        cancel
                            || decode_order(&f)
                                .is_ok_and(|o| o.client_order_id.as_deref() == Some(id.as_bytes()))
                    });
                    while stalled.load(Ordering::Relaxed) {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    seen.lock()
                        .unwrap()
                        .push(if decoded { id.clone() } else { "BAD".into() });
                    let (status, text) = match id.starts_with("refuse-") {
                        true => ("409 Conflict", format!("refused {id}")),
                        false => ("200 OK", format!("took {id}")),
                    };
                    let resp = format!(
                        "HTTP/1.1 {status}\r\ncontent-length: {}\r\n\r\n{text}",
                        text.len()
                    );
                    if conn.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            }
        });
        OrderService {
            addr,
            seen,
            stalled,
        }
    }

    fn count(&self, id: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| *s == id)
            .count()
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

/// A gateway config: an orders listener, an HTTP listener with the desk on `/orders`, an
/// admin listener, the desk with `desk_extra` lines, and accounts:
/// - `acct`: max quantity 1000, notional 50000, band 5%, 1000/s, 100 open;
/// - `slow`: 2 orders then 1 per second; `few`: 2 open orders.
fn config(service: SocketAddr, desk_extra: &str) -> String {
    format!(
        r#"
[[listener]]
address = "127.0.0.1:0"
mode = "orders"
orders = "desk"

[[listener]]
address = "127.0.0.1:0"
[[listener.route]]
path = "/orders"
orders = "desk"

[admin]
address = "127.0.0.1:0"

[[upstream]]
name = "oms"
endpoints = ["{service}"]

[[orders]]
name = "desk"
upstream = "oms"
{desk_extra}

[[orders.instrument]]
ids = ["1-9"]
tick = 0.01
reference_price = 100.0

[[orders.instrument]]
ids = ["50"]
tick = 0.01

[[orders.account]]
name = "acct"
max_quantity = 1000
max_notional = 50000.0
price_band = 0.05
rate = 100000
burst = 100000
max_open = 100000

[[orders.account]]
name = "slow"
max_quantity = 1000
max_notional = 50000.0
rate = 0.01
burst = 2
max_open = 100

[[orders.account]]
name = "few"
max_quantity = 1000
max_notional = 50000.0
rate = 1000
max_open = 2
"#
    )
}

/// A limit order at `price` hundredths (None: a market order).
fn order(account: &str, id: &str, instrument: u32, quantity: i64, price: Option<i64>) -> NewOrder {
    NewOrder {
        client_order_id: Some(id.as_bytes().to_vec().into()),
        account: Some(account.as_bytes().to_vec().into()),
        instrument: Some(instrument),
        side: Some(Side::Buy as i32),
        r#type: Some(match price {
            Some(_) => OrderType::Limit as i32,
            None => OrderType::Market as i32,
        }),
        price_mantissa: price,
        price_scale: price.map(|_| 2),
        quantity: Some(quantity),
        time_in_force: Some(TimeInForce::Day as i32),
        seq: Some(1),
        client_ts_ns: None,
    }
}

fn cancel(account: &str, id: &str, orig: &str) -> CancelOrder {
    CancelOrder {
        client_order_id: Some(id.as_bytes().to_vec().into()),
        account: Some(account.as_bytes().to_vec().into()),
        orig_client_order_id: Some(orig.as_bytes().to_vec().into()),
        instrument: Some(1),
        seq: Some(1),
    }
}

fn id_of(a: &OrderAck) -> String {
    String::from_utf8_lossy(a.client_order_id.as_deref().unwrap_or_default()).into_owned()
}

/// An order session over raw TCP.
struct Session {
    s: TcpStream,
    buf: BytesMut,
    enc: OrderEncoder,
}

impl Session {
    fn connect(addr: SocketAddr) -> Session {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(LIMIT)).unwrap();
        Session {
            s,
            buf: BytesMut::new(),
            enc: OrderEncoder::new(),
        }
    }

    fn send(&mut self, o: &NewOrder) {
        let mut out = BytesMut::new();
        self.enc.encode(o, 0, &mut out);
        self.s.write_all(&out).unwrap();
    }

    fn send_cancel(&mut self, c: &CancelOrder) {
        let mut out = BytesMut::new();
        self.enc.encode_cancel(c, 0, &mut out);
        self.s.write_all(&out).unwrap();
    }

    /// The next acknowledgement; None when the gateway closed the session.
    fn ack(&mut self) -> Option<OrderAck> {
        loop {
            if let Some(f) = FrameParser::default().parse(&mut self.buf).unwrap() {
                return Some(decode_ack(&f).expect("an OrderAck frame"));
            }
            let mut chunk = [0u8; 8192];
            match self.s.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Acknowledgements until one for `id` with `status` (the others are kept by id).
    fn ack_for(&mut self, id: &str, status: AckStatus, others: &mut Vec<OrderAck>) -> OrderAck {
        loop {
            let a = self.ack().expect("session open");
            if id_of(&a) == id && a.status() == status {
                return a;
            }
            others.push(a);
        }
    }
}

fn reason_of(a: &OrderAck) -> (AckStatus, RejectReason) {
    (a.status(), a.reason())
}

fn admin_metrics(fg: &fluxgate::Handle) -> String {
    String::from_utf8(support::get(fg.admin_addr().unwrap(), "/metrics").body).unwrap()
}

#[test]
fn every_refusal_reaches_the_client_with_its_code_and_is_counted() {
    let service = OrderService::start();
    let fg = support::start(&config(service.addr, ""), IoMode::Epoll);
    let mut s = Session::connect(fg.local_addrs()[0]);
    let mut others = Vec::new();
    let refused = |s: &mut Session, o: NewOrder, want: RejectReason| {
        s.send(&o);
        let a = s.ack_for(&id_of_order(&o), AckStatus::Rejected, &mut Vec::new());
        assert_eq!(reason_of(&a), (AckStatus::Rejected, want), "{:?}", a.text);
        assert!(a.text.as_deref().is_some_and(|t| !t.is_empty()));
    };
    let mut missing = order("acct", "bad-1", 1, 10, Some(10_000));
    missing.quantity = None;
    refused(&mut s, missing, RejectReason::Invalid);
    refused(
        &mut s,
        order("nobody", "who-1", 1, 10, Some(10_000)),
        RejectReason::UnknownAccount,
    );
    refused(
        &mut s,
        order("acct", "big-1", 1, 1001, Some(10_000)),
        RejectReason::MaxQuantity,
    );
    // 600 at 100.00 is 60000, above 50000.
    refused(
        &mut s,
        order("acct", "rich-1", 1, 600, Some(10_000)),
        RejectReason::MaxNotional,
    );
    // 5% around the reference price of 100.00.
    refused(
        &mut s,
        order("acct", "far-1", 1, 1, Some(10_600)),
        RejectReason::PriceBand,
    );
    refused(
        &mut s,
        order("acct", "far-2", 1, 1, Some(9_400)),
        RejectReason::PriceBand,
    );
    refused(
        &mut s,
        order("acct", "noref-1", 50, 1, Some(10_000)),
        RejectReason::NoReferencePrice,
    );
    // `slow` has a burst of 2.
    for id in ["slow-1", "slow-2"] {
        s.send(&order("slow", id, 1, 1, Some(10_000)));
        s.ack_for(id, AckStatus::UpstreamAccepted, &mut others);
    }
    refused(
        &mut s,
        order("slow", "slow-3", 1, 1, Some(10_000)),
        RejectReason::RateLimit,
    );
    // `few` may have 2 open: DAY orders stay open after the upstream took them.
    for id in ["few-1", "few-2"] {
        s.send(&order("few", id, 1, 1, Some(10_000)));
        s.ack_for(id, AckStatus::UpstreamAccepted, &mut others);
    }
    refused(
        &mut s,
        order("few", "few-3", 1, 1, Some(10_000)),
        RejectReason::OpenOrders,
    );
    // A cancel the upstream takes closes one, and there is room again.
    s.send_cancel(&cancel("few", "few-x1", "few-1"));
    s.ack_for("few-x1", AckStatus::UpstreamAccepted, &mut others);
    s.send(&order("few", "few-4", 1, 1, Some(10_000)));
    s.ack_for("few-4", AckStatus::UpstreamAccepted, &mut others);
    // A cancel of an order the desk does not know open.
    s.send_cancel(&cancel("few", "few-x2", "never-sent"));
    let a = s.ack_for("few-x2", AckStatus::Rejected, &mut others);
    assert_eq!(a.reason(), RejectReason::UnknownOrder);
    // Nothing refused reached the upstream.
    let seen = service.seen();
    assert_eq!(
        seen,
        ["slow-1", "slow-2", "few-1", "few-2", "few-x1", "few-4"]
    );
    let m = admin_metrics(&fg);
    for (reason, n) in [
        ("invalid", 1.0),
        ("unknown_account", 1.0),
        ("max_quantity", 1.0),
        ("max_notional", 1.0),
        ("price_band", 2.0),
        ("no_reference_price", 1.0),
        ("rate_limit", 1.0),
        ("open_orders", 1.0),
        ("unknown_order", 1.0),
    ] {
        let line = format!("fluxgate_orders_rejected_total{{desk=\"desk\",reason=\"{reason}\"}}");
        assert_eq!(metric(&m, &line), Some(n), "{line}");
    }
    assert_eq!(
        metric(&m, "fluxgate_orders_accepted_total{desk=\"desk\"}"),
        Some(6.0)
    );
    fg.shutdown();
}

fn id_of_order(o: &NewOrder) -> String {
    String::from_utf8_lossy(o.client_order_id.as_deref().unwrap_or_default()).into_owned()
}

#[test]
fn a_repeated_client_order_id_gets_the_first_acknowledgement_and_reaches_the_upstream_once() {
    let service = OrderService::start();
    let fg = support::start(&config(service.addr, ""), IoMode::Uring);
    let mut s = Session::connect(fg.local_addrs()[0]);
    let mut others = Vec::new();
    let o = order("acct", "dup-1", 1, 10, Some(10_000));
    s.send(&o);
    let first = s.ack_for("dup-1", AckStatus::Accepted, &mut others);
    let answer = s.ack_for("dup-1", AckStatus::UpstreamAccepted, &mut others);
    assert_eq!(answer.upstream_status, Some(200));
    assert_eq!(answer.upstream_body.as_deref(), Some(&b"took dup-1"[..]));
    // Sent again, on the same session and on another: the same two acknowledgements.
    let mut again = Session::connect(fg.local_addrs()[0]);
    s.send(&o);
    assert_eq!(s.ack(), Some(first.clone()));
    assert_eq!(s.ack(), Some(answer.clone()));
    again.send(&o);
    assert_eq!(again.ack(), Some(first.clone()));
    assert_eq!(again.ack(), Some(answer.clone()));
    // And as an HTTP POST: the upstream's answer.
    let body = encode_bare(&o);
    let resp = post(fg.local_addrs()[1], "application/x-protobuf", &body);
    assert_eq!(resp.status, 200);
    assert_eq!(ack_body(&resp.body), answer);
    // Even a refusal is remembered: the same id is refused again, though it is now fine.
    s.send(&order("acct", "dup-2", 1, 5000, Some(10_000)));
    let refused = s.ack_for("dup-2", AckStatus::Rejected, &mut others);
    s.send(&order("acct", "dup-2", 1, 1, Some(10_000)));
    assert_eq!(s.ack(), Some(refused));
    assert_eq!(service.count("dup-1"), 1);
    assert_eq!(service.count("dup-2"), 0);
    let m = admin_metrics(&fg);
    assert_eq!(
        metric(&m, "fluxgate_orders_duplicates_total{desk=\"desk\"}"),
        Some(4.0)
    );
    fg.shutdown();
}

fn encode_bare(o: &NewOrder) -> Vec<u8> {
    let mut out = BytesMut::new();
    OrderEncoder::new().encode(o, 0, &mut out);
    out[fluxgate_codecs::envelope::HEADER_LEN..].to_vec()
}

fn ack_body(body: &[u8]) -> OrderAck {
    let mut framed = BytesMut::new();
    // An OrderAck's bytes framed as a cancel would be: the decoder only wants the kind.
    fluxgate_codecs::envelope::write_frame(&mut framed, Kind::OrderAck, 0, 0, 0, body);
    decode_ack(&FrameParser::default().parse(&mut framed).unwrap().unwrap()).unwrap()
}

struct Posted {
    status: u16,
    body: Vec<u8>,
}

/// One HTTP/1.1 POST to /orders.
fn post(addr: SocketAddr, ctype: &str, body: &[u8]) -> Posted {
    let mut c = support::RawClient::connect(addr);
    let mut req = format!(
        "POST /orders HTTP/1.1\r\nhost: gw\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    c.send(&req);
    let r = c.read_response().expect("an answer");
    Posted {
        status: r.status,
        body: r.body.clone(),
    }
}

#[test]
fn orders_arrive_over_websocket_and_http_posts_on_http1_and_h2c() {
    let service = OrderService::start();
    let fg = support::start(&config(service.addr, ""), IoMode::Epoll);
    let http = fg.local_addrs()[1];

    // WebSocket: one binary message carrying two order frames.
    let mut s = TcpStream::connect(http).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    s.write_all(
        b"GET /orders HTTP/1.1\r\nhost: gw\r\nupgrade: websocket\r\nconnection: upgrade\r\n\
          sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n",
    )
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).unwrap();
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    let mut frames = BytesMut::new();
    let mut enc = OrderEncoder::new();
    enc.encode(&order("acct", "ws-1", 1, 1, Some(10_000)), 0, &mut frames);
    enc.encode(&order("acct", "refuse-ws-2", 2, 1, None), 0, &mut frames);
    let mut msg = Vec::new();
    let mask = [1, 2, 3, 4];
    msg.push(0x82);
    match frames.len() {
        n @ 0..=125 => msg.push(0x80 | n as u8),
        n => {
            msg.push(0x80 | 126);
            msg.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    msg.extend_from_slice(&mask);
    let mut payload = frames.to_vec();
    ws::apply_mask(&mut payload, mask, 0);
    msg.extend_from_slice(&payload);
    s.write_all(&msg).unwrap();
    let mut got = HashMap::new();
    let mut buf = BytesMut::new();
    while got.len() < 4 {
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "the gateway closed the WebSocket");
        buf.extend_from_slice(&chunk[..n]);
        while let Some(h) = ws::parse_head(&buf, false, 1 << 20).unwrap() {
            let total = h.head_len + h.len as usize;
            if buf.len() < total {
                break;
            }
            let mut framed = BytesMut::from(&buf[h.head_len..total]);
            let _ = buf.split_to(total);
            assert_ne!(
                h.opcode,
                ws::Opcode::Close,
                "closed: {:?}",
                String::from_utf8_lossy(&framed)
            );
            let a =
                decode_ack(&FrameParser::default().parse(&mut framed).unwrap().unwrap()).unwrap();
            got.insert((id_of(&a), a.status()), a);
        }
    }
    assert!(got.contains_key(&("ws-1".into(), AckStatus::Accepted)));
    assert!(got.contains_key(&("ws-1".into(), AckStatus::UpstreamAccepted)));
    assert!(got.contains_key(&("refuse-ws-2".into(), AckStatus::Accepted)));
    let refused = &got[&("refuse-ws-2".into(), AckStatus::UpstreamRejected)];
    assert_eq!(refused.upstream_status, Some(409));
    assert_eq!(
        refused.upstream_body.as_deref(),
        Some(&b"refused refuse-ws-2"[..])
    );

    // HTTP/1.1 POSTs: taken, refused upstream, refused here, not Protobuf.
    let r = post(
        http,
        "application/x-protobuf",
        &encode_bare(&order("acct", "h1-1", 1, 1, Some(10_000))),
    );
    assert_eq!(
        (r.status, ack_body(&r.body).status()),
        (200, AckStatus::UpstreamAccepted)
    );
    let r = post(
        http,
        "application/x-protobuf",
        &encode_bare(&order("acct", "refuse-h1", 1, 1, Some(10_000))),
    );
    assert_eq!(
        (r.status, ack_body(&r.body).status()),
        (409, AckStatus::UpstreamRejected)
    );
    let r = post(
        http,
        "application/x-protobuf",
        &encode_bare(&order("acct", "h1-big", 1, 5000, Some(10_000))),
    );
    assert_eq!(r.status, 422);
    assert_eq!(
        reason_of(&ack_body(&r.body)),
        (AckStatus::Rejected, RejectReason::MaxQuantity)
    );
    let r = post(http, "application/x-protobuf", b"\xff\xff\xff");
    assert_eq!(
        (r.status, ack_body(&r.body).reason()),
        (422, RejectReason::Invalid)
    );
    assert_eq!(post(http, "application/json", b"{}").status, 415);

    // h2c POST.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (status, body) = rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(http).await.unwrap();
        let (mut client, conn) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(conn);
        let req = http::Request::post(format!("http://{http}/orders"))
            .header("content-type", "application/x-protobuf")
            .body(())
            .unwrap();
        let (resp, mut send) = client.send_request(req, false).unwrap();
        let bytes = encode_bare(&order("acct", "h2-1", 1, 1, Some(10_000)));
        send.send_data(bytes.into(), true).unwrap();
        let resp = resp.await.unwrap();
        let status = resp.status().as_u16();
        let mut body = resp.into_body();
        let mut all = Vec::new();
        while let Some(chunk) = body.data().await {
            all.extend_from_slice(&chunk.unwrap());
        }
        (status, all)
    });
    assert_eq!(status, 200);
    let a = ack_body(&body);
    assert_eq!(
        (id_of(&a), a.status()),
        ("h2-1".into(), AckStatus::UpstreamAccepted)
    );
    let mut seen = service.seen();
    seen.sort();
    assert_eq!(seen, ["h1-1", "h2-1", "refuse-h1", "refuse-ws-2", "ws-1"]);
    fg.shutdown();
}

#[test]
fn a_stalled_order_upstream_stops_the_session_being_read_and_loses_nothing() {
    const ORDERS: usize = 30_000;
    let service = OrderService::start();
    service.stalled.store(true, Ordering::Relaxed);
    let extra = "session_in_flight = 8\nupstream_timeout = \"60s\"";
    let fg = support::start(&config(service.addr, extra), IoMode::Uring);
    let addr = fg.local_addrs()[0];
    let rss_before = support::rss_kib();
    let sent = Arc::new(AtomicUsize::new(0));
    let mut s = Session::connect(addr);
    let mut writer = s.s.try_clone().unwrap();
    let sent2 = Arc::clone(&sent);
    let feeder = std::thread::spawn(move || {
        let mut enc = OrderEncoder::new();
        let mut out = BytesMut::new();
        for i in 0..ORDERS {
            out.clear();
            enc.encode(
                &order("acct", &format!("st-{i}"), 1, 1, Some(10_000)),
                0,
                &mut out,
            );
            if writer.write_all(&out).is_err() {
                return;
            }
            sent2.store(i + 1, Ordering::Relaxed);
        }
    });
    // Eight orders in flight, held by the upstream; the rest waits in the socket buffers
    // and the client is blocked writing.
    let m = || admin_metrics(&fg);
    let in_flight = "fluxgate_orders_in_flight{desk=\"desk\",upstream=\"oms\"}";
    assert!(eventually(LIMIT, || metric(&m(), in_flight) == Some(8.0)));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        metric(&m(), in_flight),
        Some(8.0),
        "never more in flight than the session may have"
    );
    // The rest waits unread in the kernel's buffers: the gateway's socket has bytes queued
    // that it does not take, and the client sends nothing more.
    let queued = unread_bytes(addr, s.s.local_addr().unwrap());
    let sent_now = sent.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(300));
    assert!(queued > 0, "the gateway read everything");
    assert_eq!(
        unread_bytes(addr, s.s.local_addr().unwrap()),
        queued,
        "the gateway kept reading"
    );
    assert_eq!(sent.load(Ordering::Relaxed), sent_now);
    assert!(service.seen().is_empty());
    let grown = support::rss_kib().saturating_sub(rss_before);
    assert!(
        grown < 64 << 10,
        "memory grew {grown} KiB while the upstream stalled"
    );
    // Let go: every order arrives, once.
    service.stalled.store(false, Ordering::Relaxed);
    let mut answered = 0;
    while answered < ORDERS {
        let a = s.ack().expect("session open");
        if a.status() == AckStatus::UpstreamAccepted {
            answered += 1;
        }
    }
    feeder.join().unwrap();
    let seen = service.seen();
    assert_eq!(seen.len(), ORDERS);
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), ORDERS);
    fg.shutdown();
}

/// Bytes received on the gateway's side of the connection from `client` to `listener` and
/// not read by the gateway yet (`rx_queue` in /proc/net/tcp).
fn unread_bytes(listener: SocketAddr, client: SocketAddr) -> u64 {
    let hex = |a: SocketAddr| format!("0100007F:{:04X}", a.port());
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let line = table
        .lines()
        .find(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 4 && f[1] == hex(listener) && f[2] == hex(client)
        })
        .expect("the gateway's side of the session");
    let queues = line.split_whitespace().nth(4).unwrap();
    u64::from_str_radix(queues.split(':').nth(1).unwrap(), 16).unwrap()
}

/// The `fluxgate` binary serving `config`, its order listener's address read from its log.
struct Gateway {
    child: Child,
    orders: SocketAddr,
    log: Arc<Mutex<String>>,
}

impl Gateway {
    fn start(config: &std::path::Path) -> Gateway {
        Gateway::start_under(config, &[])
    }

    /// The same, started through `wrapper` (a command and its arguments, e.g. `prlimit`).
    fn start_under(config: &std::path::Path, wrapper: &[&str]) -> Gateway {
        let bin = env!("CARGO_BIN_EXE_fluxgate");
        let (cmd, args) = match wrapper.split_first() {
            Some((cmd, args)) => (*cmd, [args, &[bin]].concat()),
            None => (bin, Vec::new()),
        };
        let mut child = Command::new(cmd)
            .args(args)
            .args(["run", "-c"])
            .arg(config)
            .args(["--workers", "1"])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let log = Arc::new(Mutex::new(String::new()));
        let log2 = Arc::clone(&log);
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split_once("listening on ").map(|(_, r)| r) {
                    if rest.contains("order sessions") {
                        let addr = rest
                            .split(' ')
                            .next()
                            .unwrap()
                            .parse::<SocketAddr>()
                            .unwrap();
                        let _ = tx.send(addr);
                    }
                }
                log2.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let orders = rx.recv_timeout(LIMIT).expect("the gateway started");
        Gateway { child, orders, log }
    }

    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A config file for the binary with the desk's journal under the test's scratch directory
/// (emptied when `fresh`), its orders going to `service`.
fn journaled_config(
    tag: &str,
    service: SocketAddr,
    fresh: bool,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = scratch(tag);
    let journal = dir.join("journal");
    if fresh {
        let _ = std::fs::remove_dir_all(&journal);
    }
    let extra = format!(
        "session_in_flight = 64\nretry_backoff = \"20ms\"\n[orders.journal]\ndir = \"{}\"\nsegment_size = \"64KiB\"\n",
        journal.display()
    );
    let path = dir.join("gateway.toml");
    let text = config(service, &extra).replace("[admin]\naddress = \"127.0.0.1:0\"\n", "");
    std::fs::write(&path, text).unwrap();
    (path, journal)
}

#[test]
fn orders_seen_accepted_reach_the_upstream_after_a_sigkill_none_lost() {
    let service = OrderService::start();
    let (config, _) = journaled_config("orders-crash", service.addr, true);
    let gw = Gateway::start(&config);
    let mut s = Session::connect(gw.orders);
    let writer = s.s.try_clone().unwrap();
    // A stream of orders; the reader notes every acceptance the client sees.
    let feeder = std::thread::spawn(move || {
        let mut writer = writer;
        let mut enc = OrderEncoder::new();
        let mut out = BytesMut::new();
        for i in 0..1_000_000 {
            out.clear();
            enc.encode(
                &order("acct", &format!("cr-{i}"), 1, 1, Some(10_000)),
                0,
                &mut out,
            );
            if writer.write_all(&out).is_err() {
                return i;
            }
        }
        1_000_000
    });
    let mut accepted = HashSet::new();
    let started = Instant::now();
    while accepted.len() < 3000 && started.elapsed() < LIMIT {
        match s.ack() {
            Some(a) if a.status() == AckStatus::Accepted => {
                accepted.insert(id_of(&a));
            }
            Some(_) => {}
            None => break,
        }
    }
    assert!(accepted.len() >= 3000, "only {} accepted", accepted.len());
    gw.kill();
    // What was in flight at the kill is read from the rest of the socket.
    while let Some(a) = s.ack() {
        if a.status() == AckStatus::Accepted {
            accepted.insert(id_of(&a));
        }
    }
    let sent = feeder.join().unwrap();
    assert!(sent > accepted.len(), "the kill came mid-stream");
    let before = service.seen().len();
    let gw = Gateway::start(&config);
    let all_there = || {
        let seen: HashSet<String> = service.seen().into_iter().collect();
        accepted.iter().all(|id| seen.contains(id))
    };
    assert!(eventually(LIMIT, all_there), "an accepted order was lost");
    // Settle: nothing more comes.
    std::thread::sleep(Duration::from_millis(300));
    let seen = service.seen();
    let mut count: HashMap<&str, usize> = HashMap::new();
    for id in &seen {
        *count.entry(id.as_str()).or_default() += 1;
    }
    assert!(!count.contains_key("BAD"));
    let repeats: Vec<_> = count.iter().filter(|(_, n)| **n > 1).collect();
    // Only an order in flight at the kill (at most the session's 64) may arrive twice, and
    // never more than twice; the upstream knows it by its client order id.
    // Bounded by what was in flight (64) plus answers whose settling the kill beat to disk.
    assert!(
        repeats.len() <= 256,
        "{} orders arrived twice",
        repeats.len()
    );
    assert!(repeats.iter().all(|(_, n)| **n == 2));
    let resent = seen.len() - before;
    assert!(resent <= 256, "{resent} sent again after the restart");
    for id in count.keys() {
        assert!(id.starts_with("cr-"), "{id}");
    }
    drop(gw);
}

#[test]
fn a_torn_journal_tail_is_cut_at_start_and_the_unsettled_orders_are_sent_again() {
    // First to an upstream nothing listens on: the orders stay unsettled.
    let dead = support::dead_addr();
    let (config, journal) = journaled_config("orders-torn", dead.addr, true);
    let gw = Gateway::start(&config);
    let mut s = Session::connect(gw.orders);
    let mut others = Vec::new();
    for i in 0..5 {
        s.send(&order("acct", &format!("torn-{i}"), 1, 1, Some(10_000)));
        s.ack_for(&format!("torn-{i}"), AckStatus::Accepted, &mut others);
    }
    gw.kill();
    // Half a record at the end of the last segment, as a crash mid-write leaves it.
    let mut segments: Vec<_> = std::fs::read_dir(&journal)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    segments.sort();
    let last = segments.last().unwrap();
    let len = std::fs::metadata(last).unwrap().len();
    let mut f = std::fs::OpenOptions::new().append(true).open(last).unwrap();
    f.write_all(&[200, 0, 0, 0, 1, 2, 3, 4, 1, 9, 9]).unwrap();
    drop(f);
    // Started again, now with a live upstream: the five come from the journal, once each.
    let service = OrderService::start();
    let (config, _) = journaled_config("orders-torn", service.addr, false);
    let gw = Gateway::start(&config);
    let want: Vec<String> = (0..5).map(|i| format!("torn-{i}")).collect();
    assert!(eventually(LIMIT, || service.seen().len() >= 5));
    std::thread::sleep(Duration::from_millis(200));
    let mut seen = service.seen();
    seen.sort();
    assert_eq!(seen, want);
    let log = gw.log.lock().unwrap().clone();
    assert!(
        log.contains("cut a torn last record") && log.contains(&format!("at={len} bytes=11")),
        "{log}"
    );
    drop(gw);
}

#[test]
fn the_price_band_follows_the_feeds_last_trade_and_routes_pick_the_upstream() {
    use fluxgate_codecs::tick::Trade;
    use fluxgate_codecs::{TickEncoder, TickMsg};
    let (main, other) = (OrderService::start(), OrderService::start());
    // Instrument 50 has no reference price: only the feed's trades centre its band. Its
    // orders, and account `few`'s, go to the other order service.
    let text = config(main.addr, "feed = \"md\"\n[[orders.route]]\ninstruments = [\"50\"]\nupstream = \"other\"\n[[orders.route]]\naccounts = [\"few\"]\nupstream = \"other\"")
        .replace(
            "[admin]",
            &format!(
                "[[feed]]\nname = \"md\"\n[[listener]]\naddress = \"127.0.0.1:0\"\nmode = \"feed\"\n\
                 feed = \"md\"\nrole = \"publish\"\n[[upstream]]\nname = \"other\"\n\
                 endpoints = [\"{}\"]\n[admin]",
                other.addr
            ),
        );
    let fg = support::start(&text, IoMode::Epoll);
    let mut s = Session::connect(fg.local_addrs()[0]);
    let mut others = Vec::new();
    s.send(&order("acct", "before", 50, 1, Some(20_000)));
    let a = s.ack_for("before", AckStatus::Rejected, &mut others);
    assert_eq!(a.reason(), RejectReason::NoReferencePrice);
    // A trade at 200.00 on the feed.
    let mut publisher = TcpStream::connect(fg.local_addrs()[2]).unwrap();
    let mut out = BytesMut::new();
    let trade = TickMsg::Trade(Trade {
        instrument: 50,
        seq: 1,
        price: 20_000,
        size: 5,
        price_scale: 2,
        ..Trade::default()
    });
    TickEncoder::new().encode(&trade, 0, &mut out);
    publisher.write_all(&out).unwrap();
    let mut n = 0;
    assert!(eventually(LIMIT, || {
        n += 1;
        let id = format!("probe-{n}");
        s.send(&order("acct", &id, 50, 1, Some(20_000)));
        let a = s.ack().unwrap();
        others.push(a.clone());
        a.status() == AckStatus::Accepted
    }));
    // 5% around 200.00: 210.00 is in, 210.01 and 189.99 are out.
    s.send(&order("acct", "in-band", 50, 1, Some(21_000)));
    s.ack_for("in-band", AckStatus::UpstreamAccepted, &mut others);
    for (id, price) in [("above", 21_001), ("below", 18_999)] {
        s.send(&order("acct", id, 50, 1, Some(price)));
        let a = s.ack_for(id, AckStatus::Rejected, &mut others);
        assert_eq!(a.reason(), RejectReason::PriceBand, "{id}");
    }
    // Instrument 1 goes to the main service; `few` to the other whatever its instrument.
    s.send(&order("acct", "main-1", 1, 1, Some(10_000)));
    s.ack_for("main-1", AckStatus::UpstreamAccepted, &mut others);
    s.send(&order("few", "few-1", 1, 1, Some(10_000)));
    s.ack_for("few-1", AckStatus::UpstreamAccepted, &mut others);
    assert_eq!(main.seen(), ["main-1"]);
    let to_other = other.seen();
    assert!(to_other.contains(&"in-band".to_owned()) && to_other.contains(&"few-1".to_owned()));
    assert!(to_other.iter().all(|id| id != "main-1"));
    fg.shutdown();
}

#[test]
fn orders_arrive_over_tls_sessions_and_http3_posts() {
    use rustls::pki_types::pem::PemObject;
    let service = OrderService::start();
    let dir = scratch("orders-tls");
    let certs = support::test_certs(&dir, &["localhost"]);
    let tls = format!(
        "[listener.tls]\ncertificates = [{{ cert = \"{}\", key = \"{}\" }}]\n",
        certs.join("cert.pem").display(),
        certs.join("key.pem").display(),
    );
    // Both listeners over TLS (the HTTP one serves HTTP/3 too).
    let text = config(service.addr, "")
        .replace(
            "orders = \"desk\"\n\n[[listener]]",
            &format!("orders = \"desk\"\n{tls}\n[[listener]]"),
        )
        .replace(
            "orders = \"desk\"\n\n[admin]",
            &format!("orders = \"desk\"\n{tls}\n[admin]"),
        );
    let fg = support::start(&text, IoMode::Epoll);
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_file(certs.join("ca.pem")).unwrap())
        .unwrap();
    let client = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();

    // A session over TLS.
    let tcp = TcpStream::connect(fg.local_addrs()[0]).unwrap();
    tcp.set_read_timeout(Some(LIMIT)).unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(client), name).unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    let mut out = BytesMut::new();
    OrderEncoder::new().encode(&order("acct", "tls-1", 1, 1, Some(10_000)), 0, &mut out);
    s.write_all(&out).unwrap();
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    while got.len() < 2 {
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "the gateway closed the session");
        buf.extend_from_slice(&chunk[..n]);
        while let Some(f) = FrameParser::default().parse(&mut buf).unwrap() {
            got.push(decode_ack(&f).unwrap().status());
        }
    }
    assert_eq!(got, [AckStatus::Accepted, AckStatus::UpstreamAccepted]);

    // A POST over HTTP/3.
    let https = fg.local_addrs()[1];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (status, body) = rt.block_on(async {
        let (_ep, mut sender) = support::h3_connect(https, &certs).await;
        let uri = format!("https://localhost:{}/orders", https.port());
        let req = http::Request::post(uri)
            .header("content-type", "application/x-protobuf")
            .body(())
            .unwrap();
        let mut stream = sender.send_request(req).await.unwrap();
        let bytes = encode_bare(&order("acct", "h3-1", 1, 1, Some(10_000)));
        stream.send_data(bytes::Bytes::from(bytes)).await.unwrap();
        stream.finish().await.unwrap();
        let resp = stream.recv_response().await.unwrap();
        let mut all = Vec::new();
        while let Some(chunk) = stream.recv_data().await.unwrap() {
            all.extend_from_slice(bytes::Buf::chunk(&chunk));
        }
        (resp.status().as_u16(), all)
    });
    assert_eq!(status, 200);
    let a = ack_body(&body);
    assert_eq!(
        (id_of(&a), a.status()),
        ("h3-1".into(), AckStatus::UpstreamAccepted)
    );
    let mut seen = service.seen();
    seen.sort();
    assert_eq!(seen, ["h3-1", "tls-1"]);
    fg.shutdown();
}

#[test]
fn a_journal_that_cannot_write_refuses_orders_with_its_code_and_they_never_go_out() {
    let service = OrderService::start();
    let (config, _) = journaled_config("orders-full", service.addr, true);
    // One segment (64 KiB) may not grow past 8 KiB: writes past it fail with EFBIG.
    let gw = Gateway::start_under(&config, &["prlimit", "--fsize=8192"]);
    let mut s = Session::connect(gw.orders);
    let mut accepted = Vec::new();
    let mut refused = None;
    for i in 0..500 {
        let id = format!("full-{i}");
        s.send(&order("acct", &id, 1, 1, Some(10_000)));
        let a = loop {
            let a = s.ack().expect("the gateway stays up");
            if id_of(&a) == id && a.status() != AckStatus::UpstreamAccepted {
                break a;
            }
        };
        match a.status() {
            AckStatus::Accepted => accepted.push(id),
            _ => {
                assert_eq!(reason_of(&a), (AckStatus::Rejected, RejectReason::Journal));
                refused = Some(id);
                break;
            }
        }
    }
    let refused = refused.expect("the journal filled up");
    assert!(!accepted.is_empty());
    // Still serving, still refusing, and only what was accepted went out.
    s.send(&order("acct", "after", 1, 1, Some(10_000)));
    let a = s.ack_for("after", AckStatus::Rejected, &mut Vec::new());
    assert_eq!(a.reason(), RejectReason::Journal);
    assert!(eventually(LIMIT, || service.seen().len() >= accepted.len()));
    std::thread::sleep(Duration::from_millis(200));
    let mut seen = service.seen();
    seen.sort();
    accepted.sort();
    assert_eq!(seen, accepted);
    assert!(!seen.contains(&refused));
    drop(gw);
}
