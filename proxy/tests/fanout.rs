//! The market-data fan-out through real sockets: publishers on raw TCP and WebSocket,
//! subscribers on raw TCP, WebSocket and HTTP/2 streaming responses.

mod support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use fluxgate::Handle;
use fluxgate_codecs::envelope::{write_frame, Kind};
use fluxgate_codecs::tick::{BookLevel, Quote, Trade};
use fluxgate_codecs::{FrameParser, TickEncoder, TickMsg, TickView, VerifiedTick};
use fluxgate_conf::IoMode;
use fluxgate_wire::ws;
use support::{eventually, metric};

/// Longest a test waits for what it expects.
const LIMIT: Duration = Duration::from_secs(30);

/// What a subscriber received.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Got {
    Tick {
        instrument: u32,
        seq: u64,
        /// 'T'rade, 'Q'uote or 'B'ook level.
        kind: char,
        snapshot: bool,
    },
    Note(String),
}

impl Got {
    fn note(&self) -> Option<&str> {
        match self {
            Got::Note(n) => Some(n),
            Got::Tick { .. } => None,
        }
    }
}

fn quote(instrument: u32, seq: u64) -> TickMsg {
    TickMsg::Quote(Quote {
        instrument,
        seq,
        bid_price: 10_000 + seq as i64,
        bid_size: 5,
        ask_price: 10_005 + seq as i64,
        ask_size: 7,
        price_scale: 2,
        exchange_ts_ns: seq,
        flags: 0,
    })
}

fn trade(instrument: u32, seq: u64) -> TickMsg {
    TickMsg::Trade(Trade {
        instrument,
        seq,
        price: 10_001,
        size: 3,
        price_scale: 2,
        exchange_ts_ns: seq,
        ..Trade::default()
    })
}

fn book(instrument: u32, seq: u64, level: u16) -> TickMsg {
    TickMsg::BookLevel(BookLevel {
        instrument,
        seq,
        level,
        price: 9_900 - level as i64,
        size: 10,
        price_scale: 2,
        ..BookLevel::default()
    })
}

fn frames(ticks: &[TickMsg]) -> Vec<u8> {
    let mut enc = TickEncoder::new();
    let mut out = BytesMut::new();
    for t in ticks {
        enc.encode(t, 0, &mut out);
    }
    out.to_vec()
}

fn control(text: &str) -> Vec<u8> {
    let mut out = BytesMut::new();
    write_frame(&mut out, Kind::Control, 0, 0, 0, text.as_bytes());
    out.to_vec()
}

/// A byte stream a test client talks over: plain TCP, or TLS over it.
trait Io: Read + Write + Send {}
impl<T: Read + Write + Send> Io for T {}

/// A feed connection seen from the client side: raw TCP frames, or WebSocket messages.
struct FeedConn {
    s: Box<dyn Io>,
    /// Bytes read and not yet parsed (WebSocket: frames; then `frames`).
    raw: BytesMut,
    frames: BytesMut,
    ws: bool,
}

impl FeedConn {
    fn tcp(addr: SocketAddr) -> FeedConn {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        FeedConn {
            s: Box::new(s),
            raw: BytesMut::new(),
            frames: BytesMut::new(),
            ws: false,
        }
    }

    /// Raw frames over TLS with `cfg` (the server is `localhost`).
    fn tls(addr: SocketAddr, cfg: &std::sync::Arc<rustls::ClientConfig>) -> FeedConn {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let conn = rustls::ClientConnection::new(cfg.clone(), name).unwrap();
        FeedConn {
            s: Box::new(rustls::StreamOwned::new(conn, s)),
            raw: BytesMut::new(),
            frames: BytesMut::new(),
            ws: false,
        }
    }

    /// A WebSocket to `path`, with `headers` (CRLF-terminated lines) in the upgrade.
    fn ws(addr: SocketAddr, path: &str, headers: &str) -> Result<FeedConn, String> {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: feed\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{headers}\r\n"
        )
        .unwrap();
        let mut raw = BytesMut::new();
        let mut chunk = [0u8; 4096];
        let end = loop {
            if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = s.read(&mut chunk).map_err(|e| e.to_string())?;
            if n == 0 {
                return Err(String::from_utf8_lossy(&raw).into_owned());
            }
            raw.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
        if !head.starts_with("http/1.1 101") {
            return Err(head);
        }
        assert!(
            head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
            "{head}"
        );
        let _ = raw.split_to(end);
        Ok(FeedConn {
            s: Box::new(s),
            raw,
            frames: BytesMut::new(),
            ws: true,
        })
    }

    fn send(&mut self, bytes: &[u8]) {
        if self.ws {
            let mut out = Vec::new();
            ws::client_frame(ws::Opcode::Binary, bytes, [7, 1, 8, 2], &mut out);
            self.s.write_all(&out).unwrap();
        } else {
            self.s.write_all(bytes).unwrap();
        }
    }

    fn command(&mut self, text: &str) {
        self.send(&control(text));
    }

    /// The next message; None at the end of the connection (or after a WebSocket close).
    fn next(&mut self) -> Option<Got> {
        loop {
            if let Some(f) = FrameParser::default()
                .parse(&mut self.frames)
                .expect("frames")
            {
                return Some(match f.header().kind {
                    Kind::Control => Got::Note(String::from_utf8_lossy(f.payload_slice()).into()),
                    Kind::Tick => {
                        let t = VerifiedTick::verify(f).expect("a valid tick");
                        let (kind, flags) = match t.view() {
                            TickView::Trade(x) => ('T', x.flags()),
                            TickView::Quote(x) => ('Q', x.flags()),
                            TickView::BookLevel(x) => ('B', x.flags()),
                        };
                        Got::Tick {
                            instrument: t.instrument(),
                            seq: t.seq(),
                            kind,
                            snapshot: flags & 1 != 0,
                        }
                    }
                    k => panic!("unexpected frame kind {k:?}"),
                });
            }
            if self.ws {
                if let Some(h) = ws::parse_head(&self.raw, false, 1 << 20).expect("server frame") {
                    let total = h.head_len + h.len as usize;
                    if self.raw.len() >= total {
                        let _ = self.raw.split_to(h.head_len);
                        let payload = self.raw.split_to(h.len as usize);
                        match h.opcode {
                            ws::Opcode::Binary => self.frames.extend_from_slice(&payload),
                            ws::Opcode::Close => return None,
                            op => panic!("unexpected opcode {op:?}"),
                        }
                        continue;
                    }
                }
            }
            let mut chunk = [0u8; 64 << 10];
            let n = match self.s.read(&mut chunk) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => 0,
                Err(e) => panic!("read: {e}"),
            };
            if n == 0 {
                return None;
            }
            match self.ws {
                true => self.raw.extend_from_slice(&chunk[..n]),
                false => self.frames.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Everything up to and including the first note starting with `prefix`.
    fn until(&mut self, prefix: &str) -> Vec<Got> {
        let mut got = Vec::new();
        let started = Instant::now();
        loop {
            // Heartbeats keep reads from timing out: bound the wait itself.
            assert!(started.elapsed() < LIMIT, "no {prefix:?} in time: {got:?}");
            let g = self
                .next()
                .unwrap_or_else(|| panic!("ended before {prefix:?}: {got:?}"));
            let done = g.note().is_some_and(|n| n.starts_with(prefix));
            got.push(g);
            if done {
                return got;
            }
        }
    }

    /// Whether `command` is refused as not entitled.
    fn refused(&mut self, command: &str) -> bool {
        self.command(command);
        let notes = self.until("refused");
        notes
            .last()
            .and_then(Got::note)
            .is_some_and(|n| n.contains("not entitled"))
    }

    /// The next `n` ticks (notes skipped, but returned in `notes`).
    fn ticks(&mut self, n: usize, notes: &mut Vec<String>) -> Vec<Got> {
        let mut got = Vec::with_capacity(n);
        let started = Instant::now();
        while got.len() < n {
            assert!(
                started.elapsed() < LIMIT,
                "{} of {n} ticks in time",
                got.len()
            );
            match self.next() {
                Some(Got::Note(t)) => notes.push(t),
                Some(t) => got.push(t),
                None => panic!("ended after {} of {n} ticks; notes {notes:?}", got.len()),
            }
        }
        got
    }
}

/// A feed with a raw TCP publisher listener, a raw TCP subscriber listener and an HTTP
/// listener with /md (subscribe) and /publish; `extra` goes into `[[feed]]`.
struct Fixture {
    fg: Handle,
    publish: SocketAddr,
    subscribe: SocketAddr,
    http: SocketAddr,
}

fn fixture(extra: &str) -> Fixture {
    let fg = support::start(
        &format!(
            "[admin]\naddress = \"127.0.0.1:0\"\n\
             [[feed]]\nname = \"md\"\n{extra}\n\
             [[listener]]\naddress = \"127.0.0.1:0\"\nmode = \"feed\"\nfeed = \"md\"\nrole = \"publish\"\n\
             [[listener]]\naddress = \"127.0.0.1:0\"\nmode = \"feed\"\nfeed = \"md\"\nrole = \"subscribe\"\n\
             [[listener]]\naddress = \"127.0.0.1:0\"\n\
             [[listener.route]]\npath = \"/md\"\nfeed = {{ name = \"md\" }}\n\
             [[listener.route]]\npath = \"/publish\"\nfeed = {{ name = \"md\", role = \"publish\" }}\n"
        ),
        IoMode::Epoll,
    );
    let a = fg.local_addrs();
    Fixture {
        publish: a[0],
        subscribe: a[1],
        http: a[2],
        fg,
    }
}

impl Fixture {
    fn metrics(&self) -> String {
        String::from_utf8(
            support::get(self.fg.admin_addr().expect("admin"), "/metrics")
                .body
                .clone(),
        )
        .unwrap()
    }

    /// A raw TCP subscriber to `patterns`, its snapshot read through `subscribed`.
    fn tcp_subscriber(&self, patterns: &str) -> (FeedConn, Vec<Got>) {
        let mut c = FeedConn::tcp(self.subscribe);
        c.command(&format!("sub {patterns}"));
        let first = c.until("subscribed");
        (c, first)
    }
}

/// The instrument and sequence of each tick, in order.
fn seqs(got: &[Got]) -> Vec<(u32, u64)> {
    got.iter()
        .filter_map(|g| match g {
            Got::Tick {
                instrument, seq, ..
            } => Some((*instrument, *seq)),
            Got::Note(_) => None,
        })
        .collect()
}

#[test]
fn one_publisher_to_100_subscribers_on_each_transport_in_sequence_order() {
    let f = fixture("");
    const TICKS: u64 = 300;
    let mut tcp: Vec<FeedConn> = (0..100).map(|_| f.tcp_subscriber("*").0).collect();
    let mut wss: Vec<FeedConn> = (0..100)
        .map(|_| {
            let mut c = FeedConn::ws(f.http, "/md?sub=1-2", "").expect("upgrade");
            c.until("subscribed");
            c
        })
        .collect();
    // HTTP/2 subscribers: 100 streaming responses over two connections.
    let (h2_ready_tx, h2_ready) = std::sync::mpsc::channel();
    let http = f.http;
    let h2_thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut bodies = Vec::new();
            let mut conns: Vec<h2::client::SendRequest<bytes::Bytes>> = Vec::new();
            for _ in 0..2 {
                let tcp = tokio::net::TcpStream::connect(http).await.unwrap();
                // Bodies are read one after another: the connection's window must hold what
                // the others receive meanwhile.
                let (client, conn) = h2::client::Builder::new()
                    .initial_connection_window_size(64 << 20)
                    .handshake(tcp)
                    .await
                    .unwrap();
                tokio::spawn(conn);
                conns.push(client);
            }
            for i in 0..100 {
                let mut client = conns[i % 2].clone().ready().await.unwrap();
                let req = http::Request::get(format!("http://{http}/md?sub=*"))
                    .body(())
                    .unwrap();
                let (resp, _) = client.send_request(req, true).unwrap();
                let resp = resp.await.unwrap();
                assert_eq!(resp.status(), 200);
                assert_eq!(
                    resp.headers()["content-type"],
                    "application/x-fluxgate-frames"
                );
                bodies.push(resp.into_body());
            }
            let mut parsed = Vec::new();
            for mut b in bodies {
                let mut buf = BytesMut::new();
                // Read through "subscribed".
                loop {
                    let chunk = b.data().await.unwrap().unwrap();
                    let _ = b.flow_control().release_capacity(chunk.len());
                    buf.extend_from_slice(&chunk);
                    if buf.windows(10).any(|w| w == b"subscribed") {
                        break;
                    }
                }
                parsed.push((b, buf));
            }
            h2_ready_tx.send(()).unwrap();
            let mut all = Vec::new();
            for (mut b, mut buf) in parsed {
                let mut got = Vec::new();
                let p = FrameParser::default();
                while got.len() < TICKS as usize {
                    while let Some(fr) = p.parse(&mut buf).unwrap() {
                        if fr.header().kind == Kind::Tick {
                            let t = VerifiedTick::verify(fr).unwrap();
                            got.push((t.instrument(), t.seq()));
                        }
                    }
                    if got.len() >= TICKS as usize {
                        break;
                    }
                    let chunk = tokio::time::timeout(Duration::from_secs(10), b.data())
                        .await
                        .expect("h2 data in time")
                        .unwrap()
                        .unwrap();
                    let _ = b.flow_control().release_capacity(chunk.len());
                    buf.extend_from_slice(&chunk);
                }
                all.push(got);
            }
            all
        })
    });
    h2_ready
        .recv_timeout(Duration::from_secs(20))
        .expect("h2 subscribers ready");

    let mut p = TcpStream::connect(f.publish).unwrap();
    let ticks: Vec<TickMsg> = (1..=TICKS)
        .map(|i| match i % 3 {
            0 => trade(1 + (i % 2) as u32, i / 2 + 1),
            _ => quote(1 + (i % 2) as u32, i / 2 + 1),
        })
        .collect();
    // Per instrument the sequence runs 1, 2, 3..: instrument 1 gets the odd i, 2 the even.
    let want: Vec<(u32, u64)> = ticks
        .iter()
        .map(|t| match t {
            TickMsg::Trade(x) => (x.instrument, x.seq),
            TickMsg::Quote(x) => (x.instrument, x.seq),
            TickMsg::BookLevel(x) => (x.instrument, x.seq),
        })
        .collect();
    p.write_all(&frames(&ticks)).unwrap();

    let mut notes = Vec::new();
    for c in tcp.iter_mut().chain(wss.iter_mut()) {
        assert_eq!(seqs(&c.ticks(TICKS as usize, &mut notes)), want);
    }
    for got in h2_thread.join().unwrap() {
        assert_eq!(got, want);
    }
    assert!(notes.iter().all(|n| n == "heartbeat"), "{notes:?}");
    let m = f.metrics();
    assert_eq!(
        metric(&m, "fluxgate_feed_ingested_total{feed=\"md\"}"),
        Some(TICKS as f64)
    );
    assert_eq!(
        metric(
            &m,
            "fluxgate_feed_subscribers{feed=\"md\",transport=\"websocket\"}"
        ),
        Some(100.0)
    );
    assert!(eventually(Duration::from_secs(5), || {
        metric(
            &f.metrics(),
            "fluxgate_feed_subscribers{feed=\"md\",transport=\"http\"}",
        ) == Some(0.0)
    }));
}

/// Publishes `n` quotes of instrument 1 with a trade of instrument 2 after every tenth,
/// while one subscriber does not read; returns the stalled one and a reader that kept up.
/// Instrument and sequence number of each tick, in order.
type Seqs = Vec<(u32, u64)>;

fn stall(f: &Fixture, n: u64) -> (FeedConn, Seqs, Seqs) {
    let mut stalled = {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_recv_buffer_size(4096).unwrap();
        s.connect(&f.subscribe.into()).unwrap();
        let s: TcpStream = s.into();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        FeedConn {
            s: Box::new(s),
            raw: BytesMut::new(),
            frames: BytesMut::new(),
            ws: false,
        }
    };
    stalled.command("sub 1-2");
    stalled.until("subscribed");
    let (mut keeper, _) = f.tcp_subscriber("1-2");
    let mut ticks = Vec::new();
    let mut trades = 0;
    for i in 1..=n {
        ticks.push(quote(1, i));
        if i % 10 == 0 {
            trades += 1;
            ticks.push(trade(2, trades));
        }
    }
    let want = seqs(
        &ticks
            .iter()
            .map(|t| match t {
                TickMsg::Quote(q) => Got::Tick {
                    instrument: q.instrument,
                    seq: q.seq,
                    kind: 'Q',
                    snapshot: false,
                },
                TickMsg::Trade(t) => Got::Tick {
                    instrument: t.instrument,
                    seq: t.seq,
                    kind: 'T',
                    snapshot: false,
                },
                TickMsg::BookLevel(_) => unreachable!(),
            })
            .collect::<Vec<_>>(),
    );
    let mut p = TcpStream::connect(f.publish).unwrap();
    // In steps of 1,000 ticks, each sent once the reader that keeps up has the one before:
    // it stays within a step, the stalled one falls behind by all of them.
    let (progress_tx, progress) = std::sync::mpsc::channel::<(u32, u64)>();
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        let mut notes = Vec::new();
        let started = Instant::now();
        while got.len() < want.len() {
            assert!(
                started.elapsed() < LIMIT,
                "the keeper got {} ticks",
                got.len()
            );
            let t = seqs(&keeper.ticks(1, &mut notes))[0];
            got.push(t);
            let _ = progress_tx.send(t);
            if t == *want.last().expect("ticks") {
                break;
            }
        }
        (got, want)
    });
    for step in ticks.chunks(1000) {
        p.write_all(&frames(step)).unwrap();
        let end = match step.last().expect("a step") {
            TickMsg::Quote(q) => (1, q.seq),
            TickMsg::Trade(t) => (2, t.seq),
            TickMsg::BookLevel(_) => unreachable!(),
        };
        while progress.recv_timeout(LIMIT).expect("the keeper keeps up") != end {}
    }
    // The subscriber that keeps up got every tick (in time) while the other is stalled.
    let (kept, want) = reader.join().unwrap();
    (stalled, kept, want)
}

#[test]
fn a_stalled_subscriber_is_conflated_newest_quote_kept_and_every_trade() {
    let f =
        fixture("slow_consumer = \"conflate\"\nqueue_messages = 20000\nqueue_bytes = \"16MiB\"");
    const N: u64 = 100_000;
    let (mut stalled, kept, want) = stall(&f, N);
    assert!(kept == want, "the reader that kept up lost ticks");
    // Now it reads: every trade in order, quotes in order ending with the newest.
    let mut got = Vec::new();
    let mut notes = Vec::new();
    let started = Instant::now();
    let (mut last_quote, mut last_trade) = (false, false);
    while !(last_quote && last_trade) {
        assert!(started.elapsed() < LIMIT, "{} ticks so far", got.len());
        match stalled.next().expect("not cut off") {
            Got::Note(n) => notes.push(n),
            t => {
                last_quote |= matches!(t, Got::Tick { kind: 'Q', seq, .. } if seq == N);
                last_trade |= matches!(t, Got::Tick { kind: 'T', seq, .. } if seq == N / 10);
                got.push(t);
            }
        }
    }
    let trades: Vec<u64> = got
        .iter()
        .filter_map(|g| match g {
            Got::Tick { kind: 'T', seq, .. } => Some(*seq),
            _ => None,
        })
        .collect();
    assert_eq!(trades, (1..=N / 10).collect::<Vec<_>>());
    let quotes: Vec<u64> = got
        .iter()
        .filter_map(|g| match g {
            Got::Tick { kind: 'Q', seq, .. } => Some(*seq),
            _ => None,
        })
        .collect();
    assert!(quotes.windows(2).all(|w| w[0] < w[1]), "quotes in order");
    assert!(
        (quotes.len() as u64) < N,
        "some quotes were conflated: {}",
        quotes.len()
    );
    let conflated = metric(&f.metrics(), "fluxgate_feed_conflated_total{feed=\"md\"}").unwrap();
    assert_eq!(conflated as u64, N - quotes.len() as u64);
}

#[test]
fn a_stalled_subscriber_under_drop_oldest_is_told_what_it_lost() {
    let f = fixture("slow_consumer = \"drop_oldest\"\nqueue_messages = 2000");
    const N: u64 = 100_000;
    let (mut stalled, kept, want) = stall(&f, N);
    assert!(kept == want, "the reader that kept up lost ticks");
    // Its queue shows in the metrics: full, while the keeper's is empty.
    let deepest = "fluxgate_feed_queue_deepest_messages{feed=\"md\",transport=\"tcp\"}";
    assert!(
        eventually(LIMIT, || metric(&f.metrics(), deepest) >= Some(1000.0)),
        "{}",
        f.metrics()
    );
    let mut got = Vec::new();
    let dropped: u64 = loop {
        match stalled.next().expect("not cut off") {
            Got::Note(n) if n.starts_with("dropped count=") => {
                break n["dropped count=".len()..].parse().unwrap()
            }
            Got::Note(_) => {}
            t => got.push(t),
        }
    };
    assert!(dropped > 0);
    let counted = metric(&f.metrics(), "fluxgate_feed_dropped_total{feed=\"md\"}").unwrap();
    assert_eq!(counted as u64, dropped);
    // What it does get stays in order per instrument.
    let mut last = HashMap::new();
    for (i, s) in seqs(&got) {
        assert!(last.insert(i, s).is_none_or(|prev| prev < s));
    }
}

#[test]
fn a_stalled_subscriber_under_disconnect_is_cut_with_its_reason() {
    let f = fixture("slow_consumer = \"disconnect\"\nqueue_messages = 2000");
    let (mut stalled, kept, want) = stall(&f, 100_000);
    assert!(kept == want, "the reader that kept up lost ticks");
    let reason = loop {
        match stalled.next() {
            Some(Got::Note(n)) if n.starts_with("disconnect") => break n,
            Some(_) => {}
            None => panic!("closed without a reason"),
        }
    };
    assert!(reason.contains("slow consumer"), "{reason}");
    assert_eq!(stalled.next(), None, "closed after the reason");
    let m = f.metrics();
    assert_eq!(
        metric(&m, "fluxgate_feed_disconnected_total{feed=\"md\"}"),
        Some(1.0)
    );
}

#[test]
fn a_late_joiner_gets_the_last_values_then_live_ticks() {
    let f = fixture("");
    let mut p = TcpStream::connect(f.publish).unwrap();
    p.write_all(&frames(&[
        quote(1, 1),
        trade(1, 2),
        quote(1, 3),
        book(1, 4, 0),
        book(1, 5, 1),
        book(1, 6, 0),
        quote(7, 1),
    ]))
    .unwrap();
    let m = || metric(&f.metrics(), "fluxgate_feed_ingested_total{feed=\"md\"}");
    assert!(eventually(Duration::from_secs(5), || m() == Some(7.0)));
    let (mut c, first) = f.tcp_subscriber("1");
    let snap: Vec<_> = first
        .iter()
        .filter(|g| g.note().is_none())
        .cloned()
        .collect();
    let t = |seq, kind| Got::Tick {
        instrument: 1,
        seq,
        kind,
        snapshot: true,
    };
    // The last trade, the last quote, and each book level's last, in sequence order.
    assert_eq!(snap, vec![t(2, 'T'), t(3, 'Q'), t(5, 'B'), t(6, 'B')]);
    p.write_all(&frames(&[quote(7, 2), quote(1, 7)])).unwrap();
    let mut notes = Vec::new();
    assert_eq!(
        c.ticks(1, &mut notes),
        vec![Got::Tick {
            instrument: 1,
            seq: 7,
            kind: 'Q',
            snapshot: false
        }]
    );
}

#[test]
fn a_reconnect_replays_exactly_the_missed_ticks_or_says_recovery_failed() {
    let f = fixture("replay = 50");
    let mut p = TcpStream::connect(f.publish).unwrap();
    let (mut c, first) = f.tcp_subscriber("1");
    let epoch: u64 = first
        .iter()
        .find_map(|g| g.note()?.strip_prefix("hello feed=md epoch="))
        .expect("hello")
        .parse()
        .unwrap();
    p.write_all(&frames(&(1..=10).map(|s| quote(1, s)).collect::<Vec<_>>()))
        .unwrap();
    let mut notes = Vec::new();
    assert_eq!(c.ticks(10, &mut notes).len(), 10);
    drop(c);
    p.write_all(&frames(&(11..=30).map(|s| trade(1, s)).collect::<Vec<_>>()))
        .unwrap();
    let ingested = || metric(&f.metrics(), "fluxgate_feed_ingested_total{feed=\"md\"}");
    assert!(eventually(Duration::from_secs(5), || ingested() == Some(30.0)));

    let (_c, again) = f.tcp_subscriber(&format!("1 resume {epoch} 1:10"));
    let want: Vec<(u32, u64)> = (11..=30).map(|s| (1, s)).collect();
    assert_eq!(seqs(&again), want, "{again:?}");
    assert!(again
        .iter()
        .all(|g| !matches!(g, Got::Tick { snapshot: true, .. })));

    // Past the ring (50 kept): a notice, then the snapshot (the last quote and trade).
    p.write_all(&frames(
        &(31..=130).map(|s| trade(1, s)).collect::<Vec<_>>(),
    ))
    .unwrap();
    assert!(eventually(Duration::from_secs(5), || ingested() == Some(130.0)));
    let (_c, late) = f.tcp_subscriber(&format!("1 resume {epoch} 1:30"));
    assert!(
        late.iter()
            .any(|g| g.note() == Some("recovery-failed instrument=1 after=30 reason=history")),
        "{late:?}"
    );
    assert_eq!(
        late.iter()
            .filter(|g| g.note().is_none())
            .collect::<Vec<_>>(),
        vec![
            &Got::Tick {
                instrument: 1,
                seq: 10,
                kind: 'Q',
                snapshot: true
            },
            &Got::Tick {
                instrument: 1,
                seq: 130,
                kind: 'T',
                snapshot: true
            }
        ]
    );
    // Another epoch (a restart lost the history): the same.
    let (_c, other) = f.tcp_subscriber(&format!("1 resume {} 1:129", epoch + 1));
    assert!(other.iter().any(|g| g
        .note()
        .is_some_and(|n| n.starts_with("recovery-failed epoch="))));
    assert!(other.iter().any(|g| matches!(
        g,
        Got::Tick {
            seq: 130,
            snapshot: true,
            ..
        }
    )));
}

#[test]
fn corrupt_and_oversized_frames_are_rejected_without_disturbing_anyone() {
    let f = fixture("max_payload = 1024");
    let (mut c, _) = f.tcp_subscriber("*");
    let mut p = FeedConn::tcp(f.publish);
    let mut bytes = frames(&[quote(1, 1)]);
    // A tick frame whose payload is not a FlatBuffers tick.
    let mut bad = BytesMut::new();
    write_frame(&mut bad, Kind::Tick, 0, 1, 2, &[0xAB; 40]);
    bytes.extend_from_slice(&bad);
    // One over the payload limit.
    let mut big = BytesMut::new();
    write_frame(&mut big, Kind::Tick, 0, 1, 3, &[0u8; 2000]);
    bytes.extend_from_slice(&big);
    bytes.extend_from_slice(&frames(&[quote(1, 4)]));
    p.send(&bytes);
    let mut notes = Vec::new();
    assert_eq!(seqs(&c.ticks(2, &mut notes)), vec![(1, 1), (1, 4)]);
    let n1 = p.next().and_then(|g| g.note().map(str::to_owned)).unwrap();
    let n2 = p.next().and_then(|g| g.note().map(str::to_owned)).unwrap();
    assert!(
        n1.starts_with("rejected instrument=1 seq=2 reason=corrupt"),
        "{n1}"
    );
    assert!(
        n2.starts_with("rejected instrument=1 seq=3 reason=oversized"),
        "{n2}"
    );

    // A stream that is not frames at all is closed with its reason; the feed carries on.
    let mut junk = FeedConn::tcp(f.publish);
    junk.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    let why = junk
        .next()
        .and_then(|g| g.note().map(str::to_owned))
        .unwrap();
    assert!(
        why.starts_with("disconnect reason=\"not a frame stream"),
        "{why}"
    );
    assert_eq!(junk.next(), None);
    p.send(&frames(&[quote(1, 5)]));
    assert_eq!(seqs(&c.ticks(1, &mut notes)), vec![(1, 5)]);
    let m = f.metrics();
    for (reason, n) in [("corrupt", 1.0), ("oversized", 1.0), ("malformed", 1.0)] {
        let line = format!("fluxgate_feed_rejected_total{{feed=\"md\",reason=\"{reason}\"}}");
        assert_eq!(metric(&m, &line), Some(n), "{reason}");
    }
}

#[test]
fn subscribers_get_only_what_their_key_entitles() {
    let f = fixture(
        "[feed.groups]\nmajors = [\"1-3\"]\n\
         [[feed.entitle]]\nkey = \"desk\"\ninstruments = [\"@majors\"]\n",
    );
    // HTTP without a key, or with an unknown one: 403 before any upgrade.
    let err = FeedConn::ws(f.http, "/md?sub=1", "").err().unwrap();
    assert!(err.starts_with("http/1.1 403"), "{err}");
    let err = FeedConn::ws(f.http, "/md?sub=1", "x-api-key: nope\r\n")
        .err()
        .unwrap();
    assert!(err.starts_with("http/1.1 403"), "{err}");
    let mut ws = FeedConn::ws(f.http, "/md?sub=1-9", "x-api-key: desk\r\n").unwrap();
    let first = ws.until("subscribed");
    assert!(first.iter().any(|g| g
        .note()
        .is_some_and(|n| n.starts_with("refused reason=\"not entitled\""))));
    // Raw TCP: nothing until `auth`.
    let mut c = FeedConn::tcp(f.subscribe);
    assert!(c.refused("sub 1"));
    c.command("auth desk");
    c.until("authenticated");
    c.command("sub 1-9");
    c.until("subscribed");
    let mut p = TcpStream::connect(f.publish).unwrap();
    p.write_all(&frames(&[quote(5, 1), quote(2, 1)])).unwrap();
    let mut notes = Vec::new();
    assert_eq!(seqs(&ws.ticks(1, &mut notes)), vec![(2, 1)]);
    assert_eq!(seqs(&c.ticks(1, &mut notes)), vec![(2, 1)]);
}

#[test]
fn websocket_publishers_and_mid_connection_unsubscribe() {
    let f = fixture("");
    let mut pubws = FeedConn::ws(f.http, "/publish", "").unwrap();
    let mut sub = FeedConn::ws(f.http, "/md", "").unwrap();
    sub.command("sub 1-2");
    sub.until("subscribed");
    // Two frames in one message, then one.
    pubws.send(&frames(&[quote(1, 1), quote(2, 1)]));
    pubws.send(&frames(&[quote(1, 2)]));
    let mut notes = Vec::new();
    assert_eq!(
        seqs(&sub.ticks(3, &mut notes)),
        vec![(1, 1), (2, 1), (1, 2)]
    );
    sub.command("unsub 1");
    sub.until("unsubscribed");
    pubws.send(&frames(&[quote(1, 3), quote(2, 2)]));
    assert_eq!(seqs(&sub.ticks(1, &mut notes)), vec![(2, 2)]);
    // A plain GET to the publish route is told to upgrade.
    let r = support::get(f.http, "/publish");
    assert_eq!(r.status, 426);
}

#[test]
fn idle_subscribers_get_heartbeats_and_a_silent_feed_raises_the_stale_alarm() {
    let f = fixture("heartbeat = \"200ms\"\nstale_after = \"400ms\"");
    let (mut c, _) = f.tcp_subscriber("*");
    let started = Instant::now();
    let got = c.until("stale feed=md");
    assert!(got.iter().any(|g| g.note() == Some("heartbeat")), "{got:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let stale = || metric(&f.metrics(), "fluxgate_feed_stale{feed=\"md\"}");
    assert_eq!(stale(), Some(1.0));
    let mut p = TcpStream::connect(f.publish).unwrap();
    p.write_all(&frames(&[quote(1, 1)])).unwrap();
    c.until("live feed=md");
    assert_eq!(stale(), Some(0.0));
}

/// A NATS publisher: the test's own client, speaking the protocol with `fluxgate_wire::nats`.
fn nats_publisher(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut out = Vec::new();
    fluxgate_wire::nats::connect(&mut out, "test-publisher");
    s.write_all(&out).unwrap();
    s
}

fn nats_publish(s: &mut TcpStream, subject: &str, payload: &[u8]) {
    let mut out = Vec::new();
    fluxgate_wire::nats::pub_head(&mut out, subject, payload.len());
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
    s.write_all(&out).unwrap();
}

fn nats_connected(f: &Fixture) -> bool {
    metric(&f.metrics(), "fluxgate_feed_nats_connected{feed=\"md\"}") == Some(1.0)
}

#[test]
fn two_gateways_fan_out_one_feed_from_a_real_nats_server_and_reconnect_after_it_restarts() {
    let nats = support::NatsServer::start();
    let follow = format!(
        "[feed.nats]\nurl = \"nats://{}\"\nsubject = \"md.>\"\nreconnect = \"100ms\"\n",
        nats.addr
    );
    let (a, b) = (fixture(&follow), fixture(&follow));
    for f in [&a, &b] {
        assert!(eventually(LIMIT, || nats_connected(f)), "{}", f.metrics());
    }
    let (mut sa, _) = a.tcp_subscriber("1-2");
    let (mut sb, _) = b.tcp_subscriber("1-2");
    let mut p = nats_publisher(nats.addr);
    // Messages of one frame and of several; a subject outside the pattern never arrives.
    nats_publish(&mut p, "md.eq", &frames(&[quote(1, 1)]));
    nats_publish(&mut p, "other", &frames(&[quote(1, 2)]));
    nats_publish(
        &mut p,
        "md.eq.x",
        &frames(&[trade(2, 1), quote(1, 2), book(2, 2, 0)]),
    );
    // A corrupt tick in a message is refused; the good ones around it go on.
    let mut bad = BytesMut::new();
    write_frame(&mut bad, Kind::Tick, 0, 1, 3, &[0xAB; 40]);
    let mut mixed = frames(&[quote(2, 3)]);
    mixed.extend_from_slice(&bad);
    mixed.extend_from_slice(&frames(&[quote(1, 4)]));
    nats_publish(&mut p, "md.eq", &mixed);
    let want = vec![(1, 1), (2, 1), (1, 2), (2, 2), (2, 3), (1, 4)];
    let mut notes = Vec::new();
    assert_eq!(seqs(&sa.ticks(want.len(), &mut notes)), want);
    assert_eq!(seqs(&sb.ticks(want.len(), &mut notes)), want);
    for f in [&a, &b] {
        let m = f.metrics();
        assert_eq!(
            metric(&m, "fluxgate_feed_ingested_total{feed=\"md\"}"),
            Some(6.0),
            "{m}"
        );
        let corrupt = "fluxgate_feed_rejected_total{feed=\"md\",reason=\"corrupt\"}";
        assert_eq!(metric(&m, corrupt), Some(1.0), "{m}");
    }
    // The server restarts on the same port: both gateways subscribe again on their own, and
    // the feed goes on where it was.
    let port = nats.addr.port() as i32;
    drop(p);
    drop(nats);
    for f in [&a, &b] {
        assert!(eventually(LIMIT, || !nats_connected(f)));
    }
    let nats = support::NatsServer::on_port(port);
    for f in [&a, &b] {
        assert!(eventually(LIMIT, || nats_connected(f)), "{}", f.metrics());
        let m = f.metrics();
        assert_eq!(
            metric(&m, "fluxgate_feed_nats_connects_total{feed=\"md\"}"),
            Some(2.0)
        );
    }
    let mut p = nats_publisher(nats.addr);
    nats_publish(&mut p, "md.eq", &frames(&[quote(1, 5)]));
    assert_eq!(seqs(&sa.ticks(1, &mut notes)), vec![(1, 5)]);
    assert_eq!(seqs(&sb.ticks(1, &mut notes)), vec![(1, 5)]);
}

/// A rustls client trusting `server_ca`, presenting `client` (cert.pem, key.pem) if given.
fn tls_client(
    server_ca: &std::path::Path,
    client: Option<&std::path::Path>,
) -> std::sync::Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(server_ca.join("ca.pem")).unwrap())
        .unwrap();
    let b = rustls::ClientConfig::builder().with_root_certificates(roots);
    std::sync::Arc::new(match client {
        None => b.with_no_client_auth(),
        Some(c) => b
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(c.join("cert.pem"))
                    .unwrap()
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_file(c.join("key.pem")).unwrap(),
            )
            .unwrap(),
    })
}

#[test]
fn a_client_certificate_is_an_identity_its_common_name_entitled() {
    let dir = support::scratch("feed-mtls");
    let server = support::test_certs(&dir.join("server"), &["localhost"]);
    // Two clients' certificates from one client CA; a third from a CA nobody trusts.
    let desk = support::test_certs(&dir.join("desk"), &["desk-a"]);
    let other = support::test_certs(&dir.join("other"), &["desk-b"]);
    let tls = format!(
        "[listener.tls]\ncertificates = [{{ cert = \"{}\", key = \"{}\" }}]\n\
         client_ca = \"{}\"\nclient_certificate = \"optional\"\n",
        server.join("cert.pem").display(),
        server.join("key.pem").display(),
        desk.join("ca.pem").display(),
    );
    let fg = support::start(
        &format!(
            "[[feed]]\nname = \"md\"\n\
             [[feed.entitle]]\nclient_cn = \"desk-a\"\ninstruments = [\"1-3\"]\n\
             [[feed.entitle]]\nkey = \"ops\"\ninstruments = [\"*\"]\n\
             [[listener]]\naddress = \"127.0.0.1:0\"\nmode = \"feed\"\nfeed = \"md\"\nrole = \"publish\"\n\
             [[listener]]\naddress = \"127.0.0.1:0\"\nmode = \"feed\"\nfeed = \"md\"\nrole = \"subscribe\"\n{tls}\
             [[listener]]\naddress = \"127.0.0.1:0\"\nhttp3 = false\n\
             [[listener.route]]\npath = \"/md\"\nfeed = {{ name = \"md\" }}\n{tls}"
        ),
        IoMode::Epoll,
    );
    let a = fg.local_addrs();
    let (publish, subscribe, http) = (a[0], a[1], a[2]);
    // Raw TCP over TLS with desk-a's certificate: entitled to 1-3 without a word.
    let mut c = FeedConn::tls(subscribe, &tls_client(&server, Some(&desk)));
    c.command("sub 1-9");
    let first = c.until("subscribed");
    assert!(
        first.iter().any(|g| g
            .note()
            .is_some_and(|n| n.starts_with("refused") && n.contains("not entitled"))),
        "4-9 refused: {first:?}"
    );
    // Without a certificate: nothing until a key.
    let mut anon = FeedConn::tls(subscribe, &tls_client(&server, None));
    assert!(anon.refused("sub 1"));
    // A certificate from a CA the listener does not trust: the handshake fails.
    let mut stranger = FeedConn::tls(subscribe, &tls_client(&server, Some(&other)));
    let refused = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        stranger.command("sub 1");
        stranger.next()
    }));
    assert!(
        !matches!(refused, Ok(Some(_))),
        "an untrusted certificate is refused"
    );
    // HTTP over TLS: the certificate entitles a streaming subscription; none gets 403.
    let get = |cfg: &std::sync::Arc<rustls::ClientConfig>| {
        let mut s = FeedConn::tls(http, cfg);
        s.s.write_all(b"GET /md?sub=1-3 HTTP/1.1\r\nHost: feed\r\n\r\n")
            .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(
                s.s.read(&mut byte).unwrap(),
                1,
                "{}",
                String::from_utf8_lossy(&head)
            );
            head.push(byte[0]);
        }
        String::from_utf8_lossy(&head).into_owned()
    };
    assert!(get(&tls_client(&server, Some(&desk))).starts_with("HTTP/1.1 200"));
    assert!(get(&tls_client(&server, None)).starts_with("HTTP/1.1 403"));
    // And the entitled subscriber receives its instruments only.
    let mut p = TcpStream::connect(publish).unwrap();
    p.write_all(&frames(&[quote(5, 1), quote(2, 1)])).unwrap();
    let mut notes = Vec::new();
    assert_eq!(seqs(&c.ticks(1, &mut notes)), vec![(2, 1)]);
}

#[test]
fn http3_subscribers_get_a_streaming_response_of_frames() {
    let dir = support::scratch("feed-h3");
    let certs = support::test_certs(&dir, &["localhost"]);
    let fg = support::start(
        &format!(
            "[[feed]]\nname = \"md\"\n\
             [[listener]]\naddress = \"127.0.0.1:0\"\nmode = \"feed\"\nfeed = \"md\"\nrole = \"publish\"\n\
             [[listener]]\naddress = \"127.0.0.1:0\"\n\
             [[listener.route]]\npath = \"/md\"\nfeed = {{ name = \"md\" }}\n\
             [listener.tls]\ncertificates = [{{ cert = \"{}\", key = \"{}\" }}]\n",
            certs.join("cert.pem").display(),
            certs.join("key.pem").display(),
        ),
        IoMode::Epoll,
    );
    let (publish, https) = (fg.local_addrs()[0], fg.local_addrs()[1]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let got = rt.block_on(async {
        let (_ep, mut sender) = support::h3_connect(https, &certs).await;
        let uri = format!("https://localhost:{}/md?sub=1-2", https.port());
        let req = http::Request::get(uri).body(()).unwrap();
        let mut s = sender.send_request(req).await.unwrap();
        s.finish().await.unwrap();
        let resp = s.recv_response().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers()["content-type"],
            "application/x-fluxgate-frames"
        );
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut published = false;
        let limit = tokio::time::Instant::now() + LIMIT;
        while got.len() < 3 {
            let chunk = tokio::time::timeout_at(limit, s.recv_data())
                .await
                .expect("ticks in time")
                .unwrap()
                .expect("the stream goes on");
            buf.extend_from_slice(bytes::Buf::chunk(&chunk));
            while let Some(f) = FrameParser::default().parse(&mut buf).unwrap() {
                match f.header().kind {
                    Kind::Control => {
                        let note = String::from_utf8_lossy(f.payload_slice()).into_owned();
                        if note.starts_with("subscribed") && !published {
                            // Live now: publish two ticks of ours and one of another's.
                            let mut p = TcpStream::connect(publish).unwrap();
                            p.write_all(&frames(&[
                                quote(1, 1),
                                quote(7, 1),
                                trade(2, 1),
                                quote(1, 2),
                            ]))
                            .unwrap();
                            published = true;
                        }
                    }
                    _ => {
                        let t = VerifiedTick::verify(f).unwrap();
                        got.push((t.instrument(), t.seq()));
                    }
                }
            }
        }
        got
    });
    assert_eq!(got, vec![(1, 1), (2, 1), (1, 2)]);
}
