//! Feed connections: publishers and subscribers over raw TCP (envelope frames both ways) or
//! WebSocket (binary messages of frames), and subscribers as a streaming HTTP response body.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::io::IoSlice;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use fluxgate_codecs::envelope::{FrameError, Header, Kind, HEADER_LEN};
use fluxgate_codecs::{FrameParser, VerifiedTick};
use fluxgate_conf::{Feed, InstrumentSet};
use fluxgate_wire::ws::{self, Opcode, WsError};
use http_body::{Body, Frame};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::hub::{FeedHub, Resume};
use super::local::{LocalFeed, Next, Sub};
use super::{control_frame, Msg, Rejected, Transport};
use crate::error::BoxError;

/// Largest control frame a subscriber may send, and largest WebSocket message from one.
const CONTROL_MAX: usize = 4096;
/// Messages gathered into one vectored write (two slices each on WebSocket).
const WRITE_BATCH: usize = 512;
/// Up to this many messages left, a write fills a small slice array rather than the whole
/// `WRITE_BATCH` one (the usual case at low rates: one tick per write).
const WRITE_SMALL: usize = 16;

/// What a subscriber's identity allows: its key, or the common name of its verified client
/// certificate (everything when the feed has no entitlements; the union when both are
/// known). None: an identity is needed and neither is known.
pub(crate) fn entitled(cfg: &Feed, key: Option<&[u8]>, cn: Option<&str>) -> Option<InstrumentSet> {
    if cfg.entitle.is_empty() {
        return Some(InstrumentSet::all());
    }
    let mut allowed: Option<InstrumentSet> = None;
    for e in &cfg.entitle {
        let by_key = key.is_some_and(|k| e.key.as_deref().is_some_and(|x| x.as_bytes() == k));
        let by_cn = cn.is_some_and(|c| e.client_cn.as_deref() == Some(c));
        if by_key || by_cn {
            allowed
                .get_or_insert_with(InstrumentSet::default)
                .union(&e.instruments);
        }
    }
    allowed
}

/// A subscriber's command.
#[derive(Debug, PartialEq, Eq)]
enum Command {
    Auth(String),
    Sub(InstrumentSet, Option<Resume>),
    Unsub(InstrumentSet),
}

fn command(text: &str, cfg: &Feed) -> Result<Command, String> {
    let mut words = text.split_ascii_whitespace();
    let verb = words.next().unwrap_or("");
    let patterns = |w: Option<&str>| {
        InstrumentSet::parse(w, &cfg.groups).and_then(|s| match s.is_empty() {
            true => Err("no instruments named".to_owned()),
            false => Ok(s),
        })
    };
    match verb {
        "auth" => Ok(Command::Auth(words.next().unwrap_or("").to_owned())),
        "sub" => {
            let set = patterns(words.next())?;
            let resume = match (words.next(), words.next(), words.next()) {
                (None, _, _) => None,
                (Some("resume"), Some(epoch), last) => {
                    Some(parse_resume(epoch, last.unwrap_or(""), ':')?)
                }
                _ => return Err("sub PATTERNS [resume EPOCH INST:SEQ,..]".into()),
            };
            Ok(Command::Sub(set, resume))
        }
        "unsub" => Ok(Command::Unsub(patterns(words.next())?)),
        other => Err(format!("unknown command {other:?} (auth, sub, unsub)")),
    }
}

/// `EPOCH` and `INST<sep>SEQ,..`.
fn parse_resume(epoch: &str, last: &str, sep: char) -> Result<Resume, String> {
    let epoch = epoch.parse().map_err(|_| format!("bad epoch {epoch:?}"))?;
    let last = last
        .split(',')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (i, s) = p
                .split_once(sep)
                .ok_or_else(|| format!("bad resume point {p:?}"))?;
            Ok((
                i.parse().map_err(|_| format!("bad instrument {i:?}"))?,
                s.parse().map_err(|_| format!("bad sequence {s:?}"))?,
            ))
        })
        .collect::<Result<_, String>>()?;
    Ok(Resume { epoch, last })
}

/// The HTTP form of a subscription: `sub=PATTERNS&resume=EPOCH:INST.SEQ,..` from the query.
pub(crate) fn http_subscription(
    query: Option<&str>,
    cfg: &Feed,
) -> Result<(InstrumentSet, Option<Resume>), String> {
    let mut set = None;
    let mut resume = None;
    for pair in query.unwrap_or("").split('&') {
        match pair.split_once('=') {
            Some(("sub", v)) => set = Some(InstrumentSet::parse([v], &cfg.groups)?),
            Some(("resume", v)) => {
                let (epoch, last) = v.split_once(':').unwrap_or((v, ""));
                resume = Some(parse_resume(epoch, last, '.')?);
            }
            _ => {}
        }
    }
    match set {
        Some(s) if !s.is_empty() => Ok((s, resume)),
        _ => Err("name the instruments: ?sub=PATTERNS (e.g. 1-99,@group,*)".into()),
    }
}

/// Cuts ticks off a publisher's byte stream (or a NATS message's payload) and hands each
/// batch to the feed.
pub(crate) struct Ingest {
    parser: FrameParser,
    /// Payload bytes of an oversized frame still to skip.
    skip: usize,
    rejected: Vec<(u32, u64, Rejected)>,
    /// Verified ticks not yet handed to the feed.
    ticks: Vec<VerifiedTick>,
}

impl Ingest {
    pub(crate) fn new(cfg: &Feed) -> Ingest {
        Ingest {
            parser: FrameParser::new(cfg.max_payload),
            skip: 0,
            rejected: Vec::new(),
            ticks: Vec::new(),
        }
    }

    /// Takes every whole frame in `buf` (a partial one stays) and hands them to the feed
    /// (one lock); the notices for the publisher go to `reply`. Err: the stream is not a
    /// frame stream; close it with this.
    fn take(
        &mut self,
        buf: &mut BytesMut,
        hub: &FeedHub,
        reply: &mut Vec<Bytes>,
    ) -> Result<(), String> {
        let result = self.verify(buf, hub, reply);
        self.commit(hub, reply);
        result
    }

    /// Verifies every whole frame in `buf` (a partial one stays) and keeps the ticks for
    /// `commit`, so that several buffers may go to the feed as one batch.
    pub(crate) fn verify(
        &mut self,
        buf: &mut BytesMut,
        hub: &FeedHub,
        reply: &mut Vec<Bytes>,
    ) -> Result<(), String> {
        let ticks = &mut self.ticks;
        loop {
            if self.skip > 0 {
                let n = self.skip.min(buf.len());
                let _ = buf.split_to(n);
                self.skip -= n;
                if self.skip > 0 {
                    break Ok(());
                }
            }
            match self.parser.parse(buf) {
                Ok(Some(frame)) => {
                    let h = *frame.header();
                    match VerifiedTick::verify(frame) {
                        Ok(t) => ticks.push(t),
                        Err(e) => {
                            hub.stats.reject(Rejected::Corrupt);
                            reply.push(rejection(
                                h.instrument,
                                h.seq,
                                Rejected::Corrupt,
                                &e.to_string(),
                            ));
                        }
                    }
                }
                Ok(None) => break Ok(()),
                Err(FrameError::TooLarge { len, max }) => {
                    let h = Header::peek(buf).ok().flatten();
                    let (i, s) = h.map_or((0, 0), |h| (h.instrument, h.seq));
                    hub.stats.reject(Rejected::Oversized);
                    reply.push(rejection(
                        i,
                        s,
                        Rejected::Oversized,
                        &format!("payload of {len} bytes over {max}"),
                    ));
                    let _ = buf.split_to(HEADER_LEN);
                    self.skip = len;
                }
                Err(e) => {
                    hub.stats.reject(Rejected::Malformed);
                    break Err(format!("not a frame stream: {e}"));
                }
            }
        }
    }

    /// The end of a message that holds whole frames (WebSocket, NATS): a frame being
    /// skipped ends with it.
    pub(crate) fn message_end(&mut self) {
        self.skip = 0;
    }

    /// Hands the verified ticks to the feed, one lock for all of them.
    pub(crate) fn commit(&mut self, hub: &FeedHub, reply: &mut Vec<Bytes>) {
        if !self.ticks.is_empty() {
            hub.ingest(self.ticks.drain(..), &mut self.rejected);
            for (i, s, why) in self.rejected.drain(..) {
                reply.push(rejection(
                    i,
                    s,
                    why,
                    "sequence not after the last, or too many instruments",
                ));
            }
        }
    }
}

fn rejection(instrument: u32, seq: u64, why: Rejected, detail: &str) -> Bytes {
    control_frame(
        &format!(
            "rejected instrument={instrument} seq={seq} reason={} detail={detail:?}",
            why.label()
        ),
        instrument,
        seq,
    )
}

/// Reads WebSocket messages off a client's byte stream.
pub(crate) struct WsReader {
    pub(crate) max: usize,
    /// A fragmented message so far, and its opcode.
    pub(crate) partial: Option<(Opcode, BytesMut)>,
}

pub(crate) enum WsEvent {
    /// A whole data message.
    Message(Opcode, BytesMut),
    Ping(Bytes),
    /// The client's close; answered and the connection ends.
    Close,
}

impl WsReader {
    pub(crate) fn next(&mut self, buf: &mut BytesMut) -> Result<Option<WsEvent>, WsError> {
        loop {
            let Some(h) = ws::parse_head(buf, true, self.max as u64)? else {
                return Ok(None);
            };
            let total = h.head_len + h.len as usize;
            if buf.len() < total {
                buf.reserve(total - buf.len());
                return Ok(None);
            }
            let _ = buf.split_to(h.head_len);
            let mut payload = buf.split_to(h.len as usize);
            ws::apply_mask(&mut payload, h.mask.expect("client frames are masked"), 0);
            match h.opcode {
                Opcode::Ping => return Ok(Some(WsEvent::Ping(payload.freeze()))),
                Opcode::Pong => continue,
                Opcode::Close => return Ok(Some(WsEvent::Close)),
                Opcode::Continuation => {
                    let Some((op, mut so_far)) = self.partial.take() else {
                        return Err(WsError::Opcode(0));
                    };
                    if so_far.len() + payload.len() > self.max {
                        return Err(WsError::TooLarge {
                            len: (so_far.len() + payload.len()) as u64,
                            max: self.max as u64,
                        });
                    }
                    so_far.extend_from_slice(&payload);
                    match h.fin {
                        true => return Ok(Some(WsEvent::Message(op, so_far))),
                        false => self.partial = Some((op, so_far)),
                    }
                }
                op if self.partial.is_some() => return Err(WsError::Opcode(op as u8)),
                op if h.fin => return Ok(Some(WsEvent::Message(op, payload))),
                op => self.partial = Some((op, payload)),
            }
        }
    }
}

pub(crate) fn ws_frame(op: Opcode, payload: &[u8]) -> Bytes {
    let (h, n) = ws::server_head(op, payload.len());
    let mut out = BytesMut::with_capacity(n + payload.len());
    out.extend_from_slice(&h[..n]);
    out.extend_from_slice(payload);
    out.freeze()
}

/// A publisher, to the end of its connection: frames in (raw, or inside WebSocket binary
/// messages), rejections out.
pub(crate) async fn publish<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    local: Rc<LocalFeed>,
    websocket: bool,
    mut buf: BytesMut,
) {
    let cfg = local.hub.config();
    let mut ingest = Ingest::new(&cfg);
    let mut reader = WsReader {
        max: cfg.max_payload + HEADER_LEN + 64 * 1024,
        partial: None,
    };
    // Envelope frames for the publisher, and (WebSocket) pongs.
    let mut reply = Vec::new();
    let mut pongs = Vec::new();
    let mut frames = BytesMut::new();
    loop {
        let mut closing = None;
        if websocket {
            loop {
                match reader.next(&mut buf) {
                    Ok(None) => break,
                    Ok(Some(WsEvent::Message(Opcode::Binary, mut msg))) => {
                        frames.unsplit(msg.split());
                        if let Err(e) = ingest.take(&mut frames, &local.hub, &mut reply) {
                            closing = Some((1007, e));
                            break;
                        }
                        if !frames.is_empty() {
                            frames.clear();
                            hub_reject(&local.hub, &mut reply, "a message ended inside a frame");
                        }
                        ingest.message_end();
                    }
                    Ok(Some(WsEvent::Message(..))) => {
                        closing = Some((1003, "feed messages are binary".to_owned()));
                        break;
                    }
                    Ok(Some(WsEvent::Ping(p))) => pongs.push(ws_frame(Opcode::Pong, &p)),
                    Ok(Some(WsEvent::Close)) => {
                        closing = Some((1000, String::new()));
                        break;
                    }
                    Err(e) => {
                        closing = Some((e.close_code(), e.to_string()));
                        break;
                    }
                }
            }
        } else if let Err(e) = ingest.take(&mut buf, &local.hub, &mut reply) {
            reply.push(control_frame(&format!("disconnect reason={e:?}"), 0, 0));
            closing = Some((0, e));
        }
        let framed = reply.drain(..).map(|r| match websocket {
            true => ws_frame(Opcode::Binary, &r),
            false => r,
        });
        for out in pongs.drain(..).chain(framed).collect::<Vec<_>>() {
            if io.write_all(&out).await.is_err() {
                return;
            }
        }
        if let Some((code, why)) = closing {
            if websocket {
                let _ = io
                    .write_all(&ws_frame(Opcode::Close, &ws::close_payload(code, &why)))
                    .await;
            }
            let _ = io.shutdown().await;
            return;
        }
        read_room(&mut buf);
        match io.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Keeps room in an ingest read buffer: ticks cut from it keep their part of it alive, so a
/// new 64 KiB block is taken only when less than 16 KiB is left, not at every read (one
/// allocation per block, not per read).
pub(crate) fn read_room(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < 16 << 10 {
        buf.reserve(64 << 10);
    }
}

pub(crate) fn hub_reject(hub: &FeedHub, reply: &mut Vec<Bytes>, detail: &str) {
    hub.stats.reject(Rejected::Malformed);
    reply.push(rejection(0, 0, Rejected::Malformed, detail));
}

/// A subscriber over a byte stream, to the end of its connection: its commands in (control
/// frames, raw or inside WebSocket binary messages), its messages out. `first`: a
/// subscription made before the connection carried any (from the upgrade request's query).
pub(crate) async fn subscribe<S: AsyncRead + AsyncWrite + Unpin>(
    io: S,
    local: Rc<LocalFeed>,
    websocket: bool,
    allowed: InstrumentSet,
    first: Option<(InstrumentSet, Option<Resume>)>,
    mut buf: BytesMut,
) {
    let transport = match websocket {
        true => Transport::WebSocket,
        false => Transport::Tcp,
    };
    let cfg = local.hub.config();
    let sub = local.subscriber(allowed, transport);
    let hello = format!("hello feed={} epoch={}", cfg.name, local.hub.epoch);
    // Bytes the reader wants written ahead of the next batch (pongs, the close reply), and
    // whether the connection ends once they are.
    let raw: RefCell<Vec<Bytes>> = RefCell::default();
    let ending = std::cell::Cell::new(false);
    sub.tell(&hello, &local.hub);
    if let Some((set, resume)) = first {
        answer_sub(&local, &sub, &set, resume.as_ref());
    }
    let (mut rd, mut wr) = tokio::io::split(io);
    let reader = async {
        let mut reader = WsReader {
            max: CONTROL_MAX,
            partial: None,
        };
        let parser = FrameParser::new(CONTROL_MAX);
        let mut frames = BytesMut::new();
        loop {
            let mut closing = false;
            if websocket {
                loop {
                    match reader.next(&mut buf) {
                        Ok(None) => break,
                        Ok(Some(WsEvent::Message(_, mut msg))) => frames.unsplit(msg.split()),
                        Ok(Some(WsEvent::Ping(p))) => {
                            raw.borrow_mut().push(ws_frame(Opcode::Pong, &p));
                            sub.wake();
                        }
                        Ok(Some(WsEvent::Close)) | Err(_) => {
                            closing = true;
                            break;
                        }
                    }
                }
            } else {
                frames.unsplit(buf.split());
            }
            loop {
                match parser.parse(&mut frames) {
                    Ok(Some(f)) if f.header().kind == Kind::Control => {
                        let text = String::from_utf8_lossy(f.payload_slice());
                        handle_command(&local, &sub, &text);
                    }
                    Ok(Some(_)) => sub.tell(
                        "refused reason=\"subscribers send control frames only\"",
                        &local.hub,
                    ),
                    Ok(None) => break,
                    Err(_) => {
                        closing = true;
                        break;
                    }
                }
            }
            if closing {
                if websocket {
                    // The writer sends the close reply, then ends the connection.
                    raw.borrow_mut()
                        .push(ws_frame(Opcode::Close, &ws::close_payload(1000, "")));
                    ending.set(true);
                    sub.wake();
                    std::future::pending::<()>().await;
                }
                return;
            }
            buf.reserve(CONTROL_MAX);
            match rd.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    let writer = write_loop(&mut wr, &local, &sub, websocket, &raw, &ending);
    tokio::select! {
        _ = reader => {}
        _ = writer => {}
    }
    local.leave(&sub);
}

fn handle_command(local: &LocalFeed, sub: &Rc<Sub>, text: &str) {
    let cfg = local.hub.config();
    match command(text, &cfg) {
        Ok(Command::Auth(key)) => match entitled(&cfg, Some(key.as_bytes()), None) {
            Some(set) => {
                sub.entitle(set);
                sub.tell("authenticated", &local.hub);
            }
            None => sub.tell("refused reason=\"unknown key\"", &local.hub),
        },
        Ok(Command::Sub(set, resume)) => answer_sub(local, sub, &set, resume.as_ref()),
        Ok(Command::Unsub(set)) => {
            local.unsubscribe(sub, &set);
            sub.tell("unsubscribed", &local.hub);
        }
        Err(e) => sub.tell(&format!("refused reason={e:?}"), &local.hub),
    }
}

fn answer_sub(local: &LocalFeed, sub: &Rc<Sub>, set: &InstrumentSet, resume: Option<&Resume>) {
    let refused = local.subscribe(sub, set, resume);
    if !refused.is_empty() {
        sub.tell(
            "refused reason=\"not entitled\" to some instruments asked for",
            &local.hub,
        );
    }
    if &refused != set {
        // After its snapshot or replay: what follows is live.
        sub.tell("subscribed", &local.hub);
    }
}

/// Writes the subscriber's queue, one vectored write per wake, with a heartbeat when idle;
/// returns when it is cut off (after writing why) or the connection fails.
async fn write_loop<W: AsyncWrite + Unpin>(
    wr: &mut W,
    local: &LocalFeed,
    sub: &Sub,
    websocket: bool,
    raw: &RefCell<Vec<Bytes>>,
    closing: &std::cell::Cell<bool>,
) {
    let mut batch: Vec<Arc<Msg>> = Vec::new();
    let heartbeat = Msg::notice("heartbeat", 0, 0, 0);
    let mut idle = Box::pin(tokio::time::sleep(sub.heartbeat()));
    loop {
        let next = poll_fn(|cx| {
            if !raw.borrow().is_empty() {
                return Poll::Ready(Next::Batch);
            }
            match sub.take(&mut batch, cx.waker()) {
                Next::Empty => match idle.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        batch.push(Arc::clone(&heartbeat));
                        Poll::Ready(Next::Batch)
                    }
                    Poll::Pending => Poll::Pending,
                },
                other => Poll::Ready(other),
            }
        })
        .await;
        let pre: Vec<Bytes> = std::mem::take(&mut *raw.borrow_mut());
        for b in &pre {
            if wr.write_all(b).await.is_err() {
                return;
            }
        }
        if closing.get() {
            let _ = wr.shutdown().await;
            return;
        }
        if let Next::Cut(why) = next {
            let notice = control_frame(&format!("disconnect reason={why:?}"), 0, 0);
            let _ = match websocket {
                true => {
                    let _ = wr.write_all(&ws_frame(Opcode::Binary, &notice)).await;
                    wr.write_all(&ws_frame(Opcode::Close, &ws::close_payload(1008, &why)))
                        .await
                }
                false => wr.write_all(&notice).await,
            };
            let _ = wr.shutdown().await;
            return;
        }
        if write_batch(wr, &batch, websocket).await.is_err() {
            return;
        }
        local.hub.stats.wrote(sub.transport, &batch, Instant::now());
        batch.clear();
        idle.as_mut()
            .reset(tokio::time::Instant::now() + sub.heartbeat());
    }
}

/// Writes every message of `batch` with as few vectored writes as the socket allows.
async fn write_batch<W: AsyncWrite + Unpin>(
    wr: &mut W,
    batch: &[Arc<Msg>],
    websocket: bool,
) -> std::io::Result<()> {
    // Position: message, part (WebSocket head or frame), offset into it.
    let (mut m, mut part, mut off) = (0usize, if websocket { 0 } else { 1 }, 0usize);
    while m < batch.len() {
        // The slices are built inside each poll, on the stack: held across the await they
        // would grow every subscriber's task by the whole array.
        let mut wrote = poll_fn(|cx| {
            let at = (m, part, off);
            if batch.len() - m <= WRITE_SMALL {
                poll_write_from::<_, { 2 * WRITE_SMALL }>(&mut *wr, cx, batch, websocket, at)
            } else {
                poll_write_from::<_, { 2 * WRITE_BATCH }>(&mut *wr, cx, batch, websocket, at)
            }
        })
        .await?;
        if wrote == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        // Advance the position by what went out.
        while wrote > 0 {
            let p = batch[m].parts(websocket)[part];
            let left = p.len() - off;
            if wrote < left {
                off += wrote;
                wrote = 0;
            } else {
                wrote -= left;
                off = 0;
                part += 1;
                if part == 2 {
                    part = if websocket { 0 } else { 1 };
                    m += 1;
                }
            }
        }
    }
    wr.flush().await
}

/// One vectored write of what is left of `batch` from `at`, through an array of `K` slices.
fn poll_write_from<W: AsyncWrite + Unpin, const K: usize>(
    wr: &mut W,
    cx: &mut Context<'_>,
    batch: &[Arc<Msg>],
    websocket: bool,
    at: (usize, usize, usize),
) -> Poll<std::io::Result<usize>> {
    let mut slices = [IoSlice::new(&[]); K];
    let n = fill(&mut slices, batch, websocket, at);
    Pin::new(wr).poll_write_vectored(cx, &slices[..n])
}

/// Fills `slices` with what is left of `batch` from position `(message, part, offset)`;
/// returns how many it filled.
fn fill<'a>(
    slices: &mut [IoSlice<'a>],
    batch: &'a [Arc<Msg>],
    websocket: bool,
    (mut m, mut part, mut off): (usize, usize, usize),
) -> usize {
    let mut n = 0;
    while m < batch.len() && n < slices.len() {
        let p = batch[m].parts(websocket)[part];
        if off < p.len() {
            slices[n] = IoSlice::new(&p[off..]);
            n += 1;
        }
        off = 0;
        part += 1;
        if part == 2 {
            part = if websocket { 0 } else { 1 };
            m += 1;
        }
    }
    n
}

/// A subscriber as a streaming HTTP response body: one data frame per message (the servers
/// gather them into their writes), a heartbeat when idle, the reason when cut off.
pub(crate) struct FeedBody {
    local: Rc<LocalFeed>,
    sub: Rc<Sub>,
    batch: Vec<Arc<Msg>>,
    /// Next message of `batch` to hand out.
    at: usize,
    idle: Pin<Box<tokio::time::Sleep>>,
    heartbeat: Bytes,
    ended: bool,
}

impl FeedBody {
    pub(crate) fn new(
        local: Rc<LocalFeed>,
        allowed: InstrumentSet,
        set: &InstrumentSet,
        resume: Option<&Resume>,
    ) -> FeedBody {
        let sub = local.subscriber(allowed, Transport::Http);
        let cfg = local.hub.config();
        sub.tell(
            &format!("hello feed={} epoch={}", cfg.name, local.hub.epoch),
            &local.hub,
        );
        answer_sub(&local, &sub, set, resume);
        FeedBody {
            idle: Box::pin(tokio::time::sleep(sub.heartbeat())),
            heartbeat: control_frame("heartbeat", 0, 0),
            local,
            sub,
            batch: Vec::new(),
            at: 0,
            ended: false,
        }
    }

    pub(crate) fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            if self.ended {
                return Poll::Ready(None);
            }
            if let Some(m) = self.batch.get(self.at) {
                self.at += 1;
                return Poll::Ready(Some(Ok(Frame::data(m.frame.clone()))));
            }
            if !self.batch.is_empty() {
                self.local
                    .hub
                    .stats
                    .wrote(Transport::Http, &self.batch, Instant::now());
                self.batch.clear();
                self.at = 0;
                self.idle
                    .as_mut()
                    .reset(tokio::time::Instant::now() + self.sub.heartbeat());
            }
            match self.sub.take(&mut self.batch, cx.waker()) {
                Next::Batch => continue,
                Next::Cut(why) => {
                    self.ended = true;
                    let notice = control_frame(&format!("disconnect reason={why:?}"), 0, 0);
                    return Poll::Ready(Some(Ok(Frame::data(notice))));
                }
                Next::Empty => {
                    return match self.idle.as_mut().poll(cx) {
                        Poll::Ready(()) => {
                            self.idle
                                .as_mut()
                                .reset(tokio::time::Instant::now() + self.sub.heartbeat());
                            Poll::Ready(Some(Ok(Frame::data(self.heartbeat.clone()))))
                        }
                        Poll::Pending => Poll::Pending,
                    }
                }
            }
        }
    }
}

impl Drop for FeedBody {
    fn drop(&mut self) {
        self.local.leave(&self.sub);
    }
}

impl Body for FeedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        FeedBody::poll_frame(self.get_mut(), cx)
    }
}

/// The `Sec-WebSocket-Accept` value for a client's key (RFC 6455 section 4.2.2).
pub(crate) fn websocket_accept(key: &[u8]) -> String {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key);
    ctx.update(ws::ACCEPT_GUID);
    base64(ctx.finish().as_ref())
}

fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_accept_matches_rfc_6455_example() {
        assert_eq!(
            websocket_accept(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
