//! Order sessions: envelope frames of orders and cancels in (raw TCP or TLS, or inside
//! WebSocket binary messages), acknowledgement frames out; and one order per HTTP `POST`.
//! Each accepted order lives on as a task of the session's worker (`life`): durable, then
//! acknowledged, then delivered to its upstream through the worker's pool until the upstream
//! answers, that answer relayed. A session with `session_in_flight` orders unanswered (or
//! whose account has `account_in_flight`) is not read until one is answered.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use fluxgate_codecs::envelope::{write_frame, FrameParser, Kind, HEADER_LEN};
use fluxgate_codecs::gen::orders::{AckStatus, RejectReason};
use fluxgate_conf::UpstreamProtocol;
use fluxgate_http::body::ClientBody;
use fluxgate_wire::ws::{self, Opcode};
use http::{header, HeaderValue, Method, Request, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::desk::{Accepted, Admit, Batch, Desk, Job};
use crate::app::fanout::session::{read_room, ws_frame, WsEvent, WsReader};
use crate::error::ProxyError;
use crate::upstream::pool::UpstreamPool;
use crate::upstream::send::UpstreamRequest;

/// The upstream's answer kept in an acknowledgement, at most.
const MAX_RELAYED: usize = 4096;

/// What a session's order tasks hand back to it.
#[derive(Default)]
struct Outbox {
    acks: RefCell<Vec<Bytes>>,
    wake: tokio::sync::Notify,
    /// Orders of the session accepted and not yet answered by the upstream.
    in_flight: Cell<usize>,
}

impl Outbox {
    fn push(&self, ack: Bytes) {
        self.acks.borrow_mut().push(ack);
        self.wake.notify_one();
    }

    fn answered(&self) {
        self.in_flight.set(self.in_flight.get() - 1);
        self.wake.notify_one();
    }
}

/// One order session, to the end of its connection.
pub(crate) async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    desk: Arc<Desk>,
    pools: Rc<[Rc<UpstreamPool>]>,
    websocket: bool,
    mut buf: BytesMut,
) {
    let settings = desk.settings();
    let max_in_flight = settings.cfg.session_in_flight;
    let parser = FrameParser::new(settings.cfg.max_payload);
    let mut reader = WsReader {
        max: settings.cfg.max_payload + HEADER_LEN + 4096,
        partial: None,
    };
    drop(settings);
    let outbox = Rc::new(Outbox::default());
    // WebSocket: the frames of the messages taken so far.
    let mut frames = BytesMut::new();
    let mut held = None;
    let mut pongs: Vec<Bytes> = Vec::new();
    let mut out = BytesMut::new();
    let mut batch = Batch::default();
    loop {
        let mut closing: Option<(u16, String)> = None;
        let settings = desk.settings();
        while outbox.in_flight.get() < max_in_flight {
            let frame = match held.take() {
                Some(f) => f,
                None => {
                    let src = if websocket { &mut frames } else { &mut buf };
                    match parser.parse(src) {
                        Ok(Some(f)) => f,
                        Ok(None) if !websocket => break,
                        Ok(None) => match reader.next(&mut buf) {
                            Ok(None) => break,
                            Ok(Some(WsEvent::Message(Opcode::Binary, mut msg))) => {
                                if !frames.is_empty() {
                                    closing = Some((1007, "a message ended inside a frame".into()));
                                    break;
                                }
                                frames.unsplit(msg.split());
                                continue;
                            }
                            Ok(Some(WsEvent::Message(..))) => {
                                closing = Some((1003, "order messages are binary".into()));
                                break;
                            }
                            Ok(Some(WsEvent::Ping(p))) => {
                                pongs.push(ws_frame(Opcode::Pong, &p));
                                continue;
                            }
                            Ok(Some(WsEvent::Close)) => {
                                closing = Some((1000, String::new()));
                                break;
                            }
                            Err(e) => {
                                closing = Some((e.close_code(), e.to_string()));
                                break;
                            }
                        },
                        Err(e) => {
                            closing = Some((1007, format!("not an envelope frame: {e}")));
                            break;
                        }
                    }
                }
            };
            match desk.admit(&settings, &frame, Instant::now(), &mut batch) {
                Admit::Answer(first, last) => {
                    outbox
                        .acks
                        .borrow_mut()
                        .extend([first].into_iter().chain(last));
                }
                Admit::Pending(key, durable) => {
                    let (desk, outbox) = (Arc::clone(&desk), Rc::clone(&outbox));
                    tokio::task::spawn_local(async move {
                        let _ = durable.await;
                        if let Some((first, last)) = desk.remembered(&key) {
                            outbox
                                .acks
                                .borrow_mut()
                                .extend([first].into_iter().chain(last));
                            outbox.wake.notify_one();
                        }
                    });
                }
                Admit::Busy => {
                    held = Some(frame);
                    break;
                }
                Admit::Accepted(acc) => {
                    outbox.in_flight.set(outbox.in_flight.get() + 1);
                    let task = life(
                        Arc::clone(&desk),
                        Rc::clone(&pools),
                        Rc::clone(&outbox),
                        acc,
                    );
                    tokio::task::spawn_local(task);
                }
            }
        }
        drop(settings);
        desk.flush(&mut batch);
        out.clear();
        for p in pongs.drain(..) {
            out.extend_from_slice(&p);
        }
        for ack in outbox.acks.borrow_mut().drain(..) {
            if websocket {
                let (h, n) = ws::server_head(Opcode::Binary, ack.len());
                out.extend_from_slice(&h[..n]);
            }
            out.extend_from_slice(&ack);
        }
        if let Some((code, why)) = &closing {
            if websocket {
                out.extend_from_slice(&ws_frame(Opcode::Close, &ws::close_payload(*code, why)));
            } else {
                let text = format!("disconnect reason={why}");
                write_frame(&mut out, Kind::Control, 0, 0, 0, text.as_bytes());
            }
        }
        if !out.is_empty() && io.write_all(&out).await.is_err() {
            return;
        }
        if closing.is_some() {
            let _ = io.shutdown().await;
            return;
        }
        if !outbox.acks.borrow().is_empty() {
            continue;
        }
        if held.is_some() {
            // The account's room comes back on another session's answer, maybe on another
            // worker: its notice, or a look every 50 ms.
            tokio::select! {
                _ = outbox.wake.notified() => {}
                _ = desk.room.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        } else if outbox.in_flight.get() < max_in_flight {
            read_room(&mut buf);
            tokio::select! {
                r = io.read_buf(&mut buf) => {
                    if matches!(r, Ok(0) | Err(_)) {
                        return;
                    }
                }
                _ = outbox.wake.notified() => {}
            }
        } else {
            outbox.wake.notified().await;
        }
    }
}

/// An accepted order, to its end: made durable, acknowledged, delivered, its upstream's
/// answer relayed. Runs on even when its session is gone: the order was accepted.
async fn life(
    desk: Arc<Desk>,
    pools: Rc<[Rc<UpstreamPool>]>,
    outbox: Rc<Outbox>,
    acc: Box<Accepted>,
) {
    let Accepted {
        durable,
        ack,
        mut job,
        arrived,
    } = *acc;
    if let Some(durable) = durable {
        match durable.await {
            Ok(Ok(seq)) => job.journal_seq = Some(seq),
            Ok(Err(why)) => return refused(&desk, &outbox, &job, why),
            Err(_) => return refused(&desk, &outbox, &job, "the journal stopped".into()),
        }
    }
    desk.stats.ack_latency.record(arrived.elapsed());
    outbox.push(ack);
    let (status, body) = deliver(&desk, &pools, &job).await;
    outbox.push(desk.finish(&job, status, body));
    outbox.answered();
}

fn refused(desk: &Desk, outbox: &Outbox, job: &Job, why: String) {
    outbox.push(desk.not_durable(job, why));
    outbox.answered();
}

/// Sends an accepted order to its upstream until the upstream answers it (any status but a
/// 5xx); failures wait `retry_backoff` and go again, so an order is never dropped (the
/// upstream knows a repeat by its client order id).
pub(crate) async fn deliver(desk: &Desk, pools: &[Rc<UpstreamPool>], job: &Job) -> (u16, Bytes) {
    loop {
        let s = desk.settings();
        let (timeout, backoff) = (s.cfg.upstream_timeout, s.cfg.retry_backoff);
        drop(s);
        if let Some(pool) = pools.get(job.upstream) {
            if let Some((status, body)) = attempt(pool, job, timeout).await {
                if status < 500 {
                    return (status, body);
                }
            }
        }
        desk.stats
            .upstream_retries
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tokio::time::sleep(backoff).await;
    }
}

/// One send of an order through the pool; None when it failed before a whole answer came.
async fn attempt(pool: &Rc<UpstreamPool>, job: &Job, timeout: Duration) -> Option<(u16, Bytes)> {
    let pick = pool.pick_endpoint(None)?;
    let ep = pick.ep;
    let request = upstream_request(pool.cfg.protocol, pool.cfg.endpoints[ep].addr, job);
    let result = pool.send(ep, request, timeout, false).await;
    // As the gateway counts for passive health: 5xx answers, connect and protocol failures
    // (not a pool at its connection limit).
    let failed = match &result {
        Ok(r) => r.status().is_server_error(),
        Err(f) => matches!(
            f.error,
            ProxyError::Connect { .. } | ProxyError::Upstream(_)
        ),
    };
    pool.balancer.done(pick);
    pool.record_outcome(ep, failed);
    let resp = result.ok()?;
    let status = resp.status().as_u16();
    let body = tokio::time::timeout(timeout, resp.into_body().read_up_to(MAX_RELAYED));
    Some((status, body.await.ok()?.ok()?))
}

/// The POST of an order (or cancel) to its upstream, in the upstream's protocol.
fn upstream_request(
    protocol: UpstreamProtocol,
    addr: std::net::SocketAddr,
    job: &Job,
) -> UpstreamRequest {
    let message = match job.kind {
        Kind::CancelOrder => "fluxgate.orders.CancelOrder",
        _ => "fluxgate.orders.NewOrder",
    };
    let ctype = format!("application/x-protobuf; messageType={message}");
    let mut req = Request::new(ClientBody::Full(Some(job.payload.clone())));
    *req.method_mut() = Method::POST;
    let h = req.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(&ctype).expect("ASCII"),
    );
    for (name, v) in [
        ("x-fluxgate-account", &job.key.0),
        ("x-fluxgate-client-order-id", &job.key.1),
    ] {
        // Validated ids are printable ASCII.
        if let Ok(v) = HeaderValue::from_bytes(v) {
            h.insert(name, v);
        }
    }
    let path: &str = &job.path;
    match protocol {
        UpstreamProtocol::Http1 => {
            *req.uri_mut() = Uri::try_from(path).unwrap_or_else(|_| Uri::from_static("/"));
            *req.version_mut() = Version::HTTP_11;
            if let Ok(host) = HeaderValue::from_str(&addr.to_string()) {
                req.headers_mut().insert(header::HOST, host);
            }
            let (mut parts, body) = req.into_parts();
            let len = job.payload.len() as u64;
            let (head, chunked) = fluxgate_wire::h1::request::encode(&parts, Some(Some(len)));
            parts.headers.clear();
            UpstreamRequest::H1 {
                head,
                chunked,
                body: Some(body),
                idempotent: false,
                head_request: false,
                proxied: None,
            }
        }
        UpstreamProtocol::H2c | UpstreamProtocol::H3 => {
            let (scheme, version) = match protocol {
                UpstreamProtocol::H3 => ("https", Version::HTTP_3),
                _ => ("http", Version::HTTP_2),
            };
            *req.uri_mut() = Uri::try_from(format!("{scheme}://{addr}{path}"))
                .unwrap_or_else(|_| Uri::from_static("/"));
            *req.version_mut() = version;
            req.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(job.payload.len()));
            match protocol {
                UpstreamProtocol::H3 => UpstreamRequest::H3(Box::new(req)),
                _ => UpstreamRequest::H2(Box::new(req)),
            }
        }
    }
}

/// Orders sent again after a restart: every order the journal held unsettled, delivered
/// and settled (no session waits for them; their clients were told they were accepted).
pub(crate) fn resend(desk: &Arc<Desk>, pools: &Rc<[Rc<UpstreamPool>]>) {
    for job in desk.take_recovered() {
        let (desk, pools) = (Arc::clone(desk), Rc::clone(pools));
        tokio::task::spawn_local(async move {
            let (status, body) = deliver(&desk, &pools, &job).await;
            desk.stats
                .resent
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            desk.finish(&job, status, body);
        });
    }
}

/// One order or cancel per `POST` of its Protobuf message (`Content-Type:
/// application/x-protobuf`, with `messageType=fluxgate.orders.CancelOrder` for a cancel).
/// The answer is an `OrderAck` message: the upstream's when it answered within
/// `upstream_timeout` (200, or 409 when it refused), else the acceptance (202, delivery goes
/// on); a refusal is 422 (429 for the rate limit, 503 for the journal).
/// A POST's answer, for the gateway to send.
pub(crate) struct PostAnswer {
    pub(crate) status: StatusCode,
    pub(crate) content_type: &'static str,
    pub(crate) body: Bytes,
}

pub(crate) async fn post(
    desk: Arc<Desk>,
    pools: Rc<[Rc<UpstreamPool>]>,
    req: Request<ClientBody>,
) -> PostAnswer {
    let plain = |status: StatusCode, why: &str| PostAnswer {
        status,
        content_type: "text/plain",
        body: Bytes::from(format!("{why}\n")),
    };
    let ctype = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mut params = ctype.split(';').map(str::trim);
    if !params
        .next()
        .is_some_and(|m| m.eq_ignore_ascii_case("application/x-protobuf"))
    {
        let why = "orders are POSTed as application/x-protobuf";
        return plain(StatusCode::UNSUPPORTED_MEDIA_TYPE, why);
    }
    let cancel = params.any(|p| p == "messageType=fluxgate.orders.CancelOrder");
    let max = desk.settings().cfg.max_payload;
    let body = req.into_body();
    let mut payload = BytesMut::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut body = body;
        while let Some(frame) = body.frame().await {
            // Err(true): too large; Err(false): the body failed.
            if let Ok(data) = frame.map_err(|_| false)?.into_data() {
                if payload.len() + data.len() > max {
                    return Err(true);
                }
                payload.extend_from_slice(&data);
            }
        }
        Ok(())
    });
    match read.await {
        Ok(Ok(())) => {}
        Ok(Err(true)) => return plain(StatusCode::PAYLOAD_TOO_LARGE, "order too large"),
        _ => return plain(StatusCode::BAD_REQUEST, "the order body did not arrive"),
    }
    // Framed as a session's would be, its routing metadata from the message itself.
    let kind = if cancel {
        Kind::CancelOrder
    } else {
        Kind::NewOrder
    };
    let mut framed = BytesMut::with_capacity(HEADER_LEN + payload.len());
    fluxgate_codecs::frame_bare(kind, &payload, &mut framed);
    let frame = match FrameParser::new(max).parse(&mut framed) {
        Ok(Some(f)) => f,
        _ => return plain(StatusCode::PAYLOAD_TOO_LARGE, "order too large"),
    };
    let timeout = desk.settings().cfg.upstream_timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    let ack = loop {
        let mut batch = Batch::default();
        let admitted = desk.admit(&desk.settings(), &frame, Instant::now(), &mut batch);
        desk.flush(&mut batch);
        match admitted {
            Admit::Answer(first, last) => break last.unwrap_or(first),
            Admit::Pending(key, durable) => {
                let _ = durable.await;
                match desk.remembered(&key) {
                    Some((first, last)) => break last.unwrap_or(first),
                    None => return plain(StatusCode::SERVICE_UNAVAILABLE, "try again"),
                }
            }
            Admit::Busy => {
                if tokio::time::Instant::now() >= deadline {
                    let why = "the account has too many orders in flight";
                    return plain(StatusCode::SERVICE_UNAVAILABLE, why);
                }
                tokio::select! {
                    _ = desk.room.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
            Admit::Accepted(acc) => {
                let outbox = Rc::new(Outbox::default());
                outbox.in_flight.set(1);
                tokio::task::spawn_local(life(Arc::clone(&desk), pools, Rc::clone(&outbox), acc));
                // The upstream's answer, or the acceptance when it is slow.
                let _ = tokio::time::timeout_at(deadline, async {
                    while outbox.in_flight.get() > 0 {
                        outbox.wake.notified().await;
                    }
                })
                .await;
                if outbox.acks.borrow().is_empty() {
                    // Not durable yet: its first acknowledgement decides.
                    while outbox.acks.borrow().is_empty() {
                        outbox.wake.notified().await;
                    }
                }
                let last = outbox.acks.borrow().last().cloned();
                break last.expect("an acknowledgement came");
            }
        }
    };
    let decoded = {
        let mut b = BytesMut::from(&ack[..]);
        FrameParser::default()
            .parse(&mut b)
            .ok()
            .flatten()
            .and_then(|f| fluxgate_codecs::decode_ack(&f).ok())
    };
    let status = match decoded.as_ref().map(|a| (a.status(), a.reason())) {
        Some((AckStatus::UpstreamAccepted, _)) => StatusCode::OK,
        Some((AckStatus::Accepted, _)) => StatusCode::ACCEPTED,
        Some((AckStatus::UpstreamRejected, _)) => StatusCode::CONFLICT,
        Some((_, RejectReason::RateLimit)) => StatusCode::TOO_MANY_REQUESTS,
        Some((_, RejectReason::Journal)) => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::UNPROCESSABLE_ENTITY,
    };
    PostAnswer {
        status,
        content_type: "application/x-protobuf; messageType=fluxgate.orders.OrderAck",
        body: ack.slice(HEADER_LEN..),
    }
}
