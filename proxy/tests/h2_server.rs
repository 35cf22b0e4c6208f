//! fluxgate's HTTP/2 server against a client that writes frames by hand: protocol errors get
//! the GOAWAY or RST_STREAM code RFC 9113 names, a bad stream leaves the others serving,
//! limits answer 431, floods and idle connections are closed, and draining lets open streams
//! finish. (Well-behaved clients are covered with the h2 crate in `data_path.rs`.)

#[macro_use]
mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use fluxgate_conf::IoMode;
use support::*;

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const WINDOW_UPDATE: u8 = 8;
const CONTINUATION: u8 = 9;
const END_STREAM: u8 = 1;
const END_HEADERS: u8 = 4;

const PROTOCOL_ERROR: u32 = 1;
const FLOW_CONTROL_ERROR: u32 = 3;
const FRAME_SIZE_ERROR: u32 = 6;
const COMPRESSION_ERROR: u32 = 9;
const ENHANCE_YOUR_CALM: u32 = 11;

struct Frame {
    kind: u8,
    flags: u8,
    id: u32,
    payload: Vec<u8>,
}

impl Frame {
    /// The error code of RST_STREAM or GOAWAY.
    fn code(&self) -> u32 {
        let at = if self.kind == GOAWAY { 4 } else { 0 };
        u32::from_be_bytes(self.payload[at..at + 4].try_into().unwrap())
    }

    /// `:status` of a response head as fluxgate encodes it: an indexed static entry, or a
    /// literal with the static name `:status` and a plain value.
    fn status(&self) -> u16 {
        let p = &self.payload;
        match p[0] {
            b if b & 0x80 != 0 => [200, 204, 206, 304, 400, 404, 500][(b & 0x7f) as usize - 8],
            0x08 => std::str::from_utf8(&p[2..2 + p[1] as usize])
                .unwrap()
                .parse()
                .unwrap(),
            other => panic!("unexpected first field byte {other:#x}"),
        }
    }
}

/// A client speaking HTTP/2 frames over a plain socket, with a short read timeout.
struct H2Raw {
    s: TcpStream,
}

impl H2Raw {
    /// Connects, sends the preface and an empty SETTINGS.
    fn connect(addr: SocketAddr) -> H2Raw {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut c = H2Raw { s };
        c.raw(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        c.send(SETTINGS, 0, 0, &[]);
        c
    }

    fn raw(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).unwrap();
    }

    fn send(&mut self, kind: u8, flags: u8, id: u32, payload: &[u8]) {
        let len = (payload.len() as u32).to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, flags];
        f.extend_from_slice(&id.to_be_bytes());
        f.extend_from_slice(payload);
        // The server may have closed already; what it sent is what the test reads.
        let _ = self.s.write_all(&f);
    }

    /// A request head: every field a literal without indexing, plain strings.
    fn request(&mut self, id: u32, fields: &[(&str, &str)], end_stream: bool) {
        let flags = END_HEADERS | if end_stream { END_STREAM } else { 0 };
        self.send(HEADERS, flags, id, &block(fields));
    }

    fn get(&mut self, id: u32, path: &str) {
        self.request(
            id,
            &[
                (":method", "GET"),
                (":scheme", "http"),
                (":authority", "x"),
                (":path", path),
            ],
            true,
        );
    }

    /// A POST head, the body to follow; `content_length` if it declares one.
    fn post(&mut self, id: u32, path: &str, content_length: Option<&str>) {
        let mut fields = vec![
            (":method", "POST"),
            (":scheme", "http"),
            (":authority", "x"),
            (":path", path),
        ];
        fields.extend(content_length.map(|n| ("content-length", n)));
        self.request(id, &fields, false);
    }

    /// A GET on stream `id` is answered 200: the connection still serves.
    fn assert_serves(&mut self, id: u32) {
        self.get(id, "/next");
        assert_eq!(self.expect(HEADERS, id).status(), 200);
    }

    /// The next frame, or None at end of stream.
    fn read(&mut self) -> Option<Frame> {
        let mut head = [0u8; 9];
        match self.s.read_exact(&mut head) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => return None,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return None,
            Err(e) => panic!("reading a frame: {e}"),
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0; len];
        self.s.read_exact(&mut payload).unwrap();
        Some(Frame {
            kind: head[3],
            flags: head[4],
            id: u32::from_be_bytes(head[5..9].try_into().unwrap()) & 0x7fff_ffff,
            payload,
        })
    }

    /// Reads until a frame of `kind` on stream `id` (other frames are skipped; a PING is
    /// answered by the server, never sent by it).
    fn expect(&mut self, kind: u8, id: u32) -> Frame {
        loop {
            let f = self
                .read()
                .unwrap_or_else(|| panic!("connection closed before frame type {kind}"));
            if f.kind == kind && f.id == id {
                return f;
            }
            assert!(
                f.kind != GOAWAY,
                "GOAWAY code {} while waiting for frame type {kind}",
                f.code()
            );
        }
    }

    /// Reads until GOAWAY, then expects the close; returns the GOAWAY.
    fn expect_goaway(&mut self) -> Frame {
        let f = loop {
            let f = self.read().expect("GOAWAY before the close");
            if f.kind == GOAWAY {
                break f;
            }
        };
        while self.read().is_some() {}
        f
    }
}

fn block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut b = Vec::new();
    for (name, value) in fields {
        b.push(0);
        for s in [name, value] {
            assert!(s.len() < 127, "one-byte lengths only");
            b.push(s.len() as u8);
            b.extend_from_slice(s.as_bytes());
        }
    }
    b
}

on_both_acceptors!(
    settings_are_acknowledged_and_pings_answered,
    malformed_heads_reset_only_their_stream,
    oversized_header_list_in_continuations_gets_431,
    body_shorter_than_content_length_resets_the_stream,
    trailers_on_a_request_are_accepted,
    protocol_errors_close_with_goaway,
    reset_flood_gets_enhance_your_calm,
    idle_connection_gets_goaway_then_close,
    drain_lets_open_streams_finish,
    response_data_waits_for_the_clients_window,
    early_answer_lets_the_upload_finish_without_reset,
    idle_connection_frees_its_buffers_and_serves_on,
    too_many_header_fields_get_431,
    stream_refusals_are_counted_by_reason,
    stalled_upload_is_reset_at_the_body_timeout,
    response_the_window_holds_is_reset_at_the_send_timeout,
    client_that_stops_reading_is_closed_at_the_send_timeout,
    trickling_upload_is_reset_at_the_request_deadline,
);

fn settings_are_acknowledged_and_pings_answered(io: IoMode) {
    let up = upstream(Behavior::Echo);
    let fg = proxy_to(up.addr, "", "", io);
    let mut c = H2Raw::connect(fg.local_addrs()[0]);
    let ack = c.expect(SETTINGS, 0);
    let ack = if ack.flags & 1 == 0 {
        c.expect(SETTINGS, 0)
    } else {
        ack
    };
    assert_eq!((ack.flags, ack.payload.len()), (1, 0), "SETTINGS ACK");
    c.send(PING, 0, 0, b"12345678");
    let pong = c.expect(PING, 0);
    assert_eq!((pong.flags, pong.payload.as_slice()), (1, &b"12345678"[..]));
    c.get(1, "/after-ping");
    assert_eq!(c.expect(HEADERS, 1).status(), 200);
    fg.shutdown();
}

fn malformed_heads_reset_only_their_stream(io: IoMode) {
    let up = upstream(Behavior::Echo);
    let fg = proxy_to(up.addr, "", "", io);
    let mut c = H2Raw::connect(fg.local_addrs()[0]);
    let base = [
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", "x"),
        (":path", "/"),
    ];
    let bad: [&[(&str, &str)]; 5] = [
        // Upper case in a field name.
        &[base[0], base[1], base[2], base[3], ("X-Upper", "1")],
        // A connection-specific field.
        &[
            base[0],
            base[1],
            base[2],
            base[3],
            ("connection", "keep-alive"),
        ],
        // No :path.
        &[base[0], base[1], base[2]],
        // A pseudo-header after a regular field.
        &[base[0], base[1], base[2], ("x-a", "1"), base[3]],
        // An unknown pseudo-header.
        &[base[0], base[1], base[2], base[3], (":bogus", "1")],
    ];
    let mut id = 1;
    for fields in bad {
        c.request(id, fields, true);
        let rst = c.expect(RST_STREAM, id);
        assert_eq!(rst.code(), PROTOCOL_ERROR, "stream {id}");
        id += 2;
    }
    c.get(id, "/still-serving");
    assert_eq!(c.expect(HEADERS, id).status(), 200);
    fg.shutdown();
}

fn oversized_header_list_in_continuations_gets_431(io: IoMode) {
    let up = upstream(Behavior::Echo);
    let fg = proxy_to(up.addr, "", "max_header_bytes = \"8KiB\"", io);
    let mut c = H2Raw::connect(fg.local_addrs()[0]);
    let mut b = block(&[
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", "x"),
        (":path", "/"),
    ]);
    // 120 fields of 100 bytes: 12 KB, sent as HEADERS and two CONTINUATION frames.
    let value = "v".repeat(100);
    for i in 0..120 {
        b.extend(block(&[(&format!("x-f{i}"), &value)]));
    }
    let third = b.len() / 3;
    c.send(HEADERS, END_STREAM, 1, &b[..third]);
    c.send(CONTINUATION, 0, 1, &b[third..2 * third]);
    c.send(CONTINUATION, END_HEADERS, 1, &b[2 * third..]);
    assert_eq!(c.expect(HEADERS, 1).status(), 431);
    // The connection's decoder kept step: the next request is served.
    c.assert_serves(3);
    assert_eq!(up.requests(), 1, "the 431 never reached the upstream");
    fg.shutdown();
}

fn body_shorter_than_content_length_resets_the_stream(io: IoMode) {
    let up = upstream(Behavior::Echo);
    let fg = proxy_to(up.addr, "", "", io);
    let mut c = H2Raw::connect(fg.local_addrs()[0]);
    c.post(1, "/echo", Some("10"));
    c.send(DATA, END_STREAM, 1, b"short");
    assert_eq!(c.expect(RST_STREAM, 1).code(), PROTOCOL_ERROR);
    c.assert_serves(3);
    fg.shutdown();
}

fn trailers_on_a_request_are_accepted(io: IoMode) {
    let up = upstream(Behavior::Echo);
    let fg = proxy_to(up.addr, "", "", io);
    let mut c = H2Raw::connect(fg.local_addrs()[0]);
    c.post(1, "/echo", None);
    c.send(DATA, 0, 1, b"hello");
    c.send(
        HEADERS,
        END_STREAM | END_HEADERS,
        1,
        &block(&[("x-checksum", "1")]),
    );
    assert_eq!(c.expect(HEADERS, 1).status(), 200);
    let mut body = Vec::new();
    loop {
        let f = c.expect(DATA, 1);
        body.extend_from_slice(&f.payload);
        if f.flags & END_STREAM != 0 {
            break;
        }
    }
    assert_eq!(body, b"hello");
    fg.shutdown();
}

/// Errors beyond the per-rule tests below (`rfc9113`): HPACK, the first frame, floods.
fn protocol_errors_close_with_goaway(io: IoMode) {
    let up = upstream(Behavior::Echo);
    let fg = proxy_to(up.addr, "", "", io);
    let addr = fg.local_addrs()[0];
    // The first frame is not SETTINGS.
    let mut c = H2Raw::connect_without_settings(addr);
    c.send(PING, 0, 0, b"12345678");
    assert_eq!(c.expect_goaway().code(), PROTOCOL_ERROR);
    // A header block that does not decode (index 70 is beyond both tables).
    let mut c = H2Raw::connect(addr);
    c.send(HEADERS, END_HEADERS | END_STREAM, 1, &[0xbf, 0x07]);
    let g = c.expect_goaway();
    assert_eq!(g.code(), COMPRESSION_ERROR);
    assert!(!g.payload[8..].is_empty(), "GOAWAY says why");
    // A header block that never ends: empty CONTINUATION frames, one after another.
    let mut c = H2Raw::connect(addr);
    c.send(HEADERS, END_STREAM, 1, &[0x82]);
    for _ in 0..100 {
        c.send(CONTINUATION, 0, 1, &[]);
    }
    assert_eq!(c.expect_goaway().code(), ENHANCE_YOUR_CALM);
    fg.shutdown();
}

impl H2Raw {
    fn connect_without_settings(addr: SocketAddr) -> H2Raw {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut c = H2Raw { s };
        c.raw(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        c
    }
}

fn reset_flood_gets_enhance_your_calm(io: IoMode) {
    let up = upstream(Behavior::Slow(Duration::from_secs(2)));
    let fg = proxy_to(up.addr, "", "", io);
    let mut c = H2Raw::connect(fg.local_addrs()[0]);
    let mut frames = Vec::new();
    for i in 0..400u32 {
        let id = 2 * i + 1;
        let b = block(&[
            (":method", "GET"),
            (":scheme", "http"),
            (":authority", "x"),
            (":path", "/"),
        ]);
        for (kind, flags, payload) in [
            (HEADERS, END_HEADERS | END_STREAM, b),
            (RST_STREAM, 0, 8u32.to_be_bytes().to_vec()),
        ] {
            let len = (payload.len() as u32).to_be_bytes();
            frames.extend_from_slice(&[len[1], len[2], len[3], kind, flags]);
            frames.extend_from_slice(&id.to_be_bytes());
            frames.extend_from_slice(&payload);
        }
    }
    let _ = c.s.write_all(&frames);
    assert_eq!(c.expect_goaway().code(), ENHANCE_YOUR_CALM);
    fg.shutdown();
}

fn idle_connection_gets_goaway_then_close(io: IoMode) {
    let up = upstream(Behavior::Echo);
    let fg = proxy_to(up.addr, "", "keepalive_timeout = \"300ms\"", io);
    let mut c = H2Raw::connect(fg.local_addrs()[0]);
    c.get(1, "/");
    assert_eq!(c.expect(HEADERS, 1).status(), 200);
    let started = Instant::now();
    let g = c.expect_goaway();
    assert_eq!((g.code(), &g.payload[..4]), (0, &1u32.to_be_bytes()[..]));
    assert!(started.elapsed() < Duration::from_secs(3));
    fg.shutdown();
}

fn drain_lets_open_streams_finish(io: IoMode) {
    let up = upstream(Behavior::Slow(Duration::from_millis(500)));
    let fg = proxy_to(up.addr, "", "", io);
    let mut c = H2Raw::connect(fg.local_addrs()[0]);
    c.get(1, "/slow");
    // Let the request reach the upstream before the drain starts.
    assert!(eventually(Duration::from_secs(2), || up.requests() == 1));
    let drain = std::thread::spawn(move || fg.drain(Duration::from_secs(5)));
    // The first GOAWAY lets in what may be on its way (RFC 9113 6.8): the largest stream id.
    let g = c.expect(GOAWAY, 0);
    assert_eq!(
        (g.code(), &g.payload[..4]),
        (0, &0x7fff_ffffu32.to_be_bytes()[..])
    );
    // A stream the client opens before it answers the PING that came with it is served.
    c.get(3, "/in-time");
    let ping = c.expect(PING, 0);
    assert_eq!(ping.flags & 1, 0, "a PING to answer, not an ACK");
    c.send(PING, 1, 0, &ping.payload);
    // Then the real last stream, and anything newer is refused.
    let g = c.expect(GOAWAY, 0);
    assert_eq!((g.code(), &g.payload[..4]), (0, &3u32.to_be_bytes()[..]));
    c.get(5, "/late");
    let mut answered = Vec::new();
    let mut refused = false;
    while let Some(f) = c.read() {
        match (f.kind, f.id) {
            (HEADERS, id) => answered.push((id, f.status())),
            (RST_STREAM, 5) => refused = f.code() == 7,
            _ => {}
        }
    }
    answered.sort();
    assert_eq!(
        answered,
        [(1, 200), (3, 200)],
        "both streams in time were answered"
    );
    assert!(
        refused,
        "the stream after the final GOAWAY got REFUSED_STREAM"
    );
    assert!(drain.join().unwrap(), "drained within the grace time");
}

fn response_data_waits_for_the_clients_window(io: IoMode) {
    let up = upstream(Behavior::Echo);
    let fg = proxy_to(up.addr, "", "", io);
    let mut c = H2Raw::connect_without_settings(fg.local_addrs()[0]);
    // SETTINGS_INITIAL_WINDOW_SIZE = 100: each stream may get 100 bytes until widened.
    c.send(SETTINGS, 0, 0, &[0, 4, 0, 0, 0, 100]);
    c.post(1, "/echo", Some("300"));
    c.send(DATA, END_STREAM, 1, &[7; 300]);
    assert_eq!(c.expect(HEADERS, 1).status(), 200);
    let first = c.expect(DATA, 1);
    assert_eq!((first.payload.len(), first.flags & END_STREAM), (100, 0));
    // Nothing more until the window grows: the next frame is our PING's answer.
    c.send(PING, 0, 0, b"waiting!");
    let next = c.read().unwrap();
    assert_eq!(
        (next.kind, next.payload.as_slice()),
        (PING, &b"waiting!"[..])
    );
    c.send(WINDOW_UPDATE, 0, 1, &200u32.to_be_bytes());
    let mut got = first.payload.len();
    loop {
        let f = c.expect(DATA, 1);
        got += f.payload.len();
        if f.flags & END_STREAM != 0 {
            break;
        }
    }
    assert_eq!(got, 300);
    fg.shutdown();
}

/// The upstream answers before the upload ends: the rest of the upload is read and dropped
/// (no RST_STREAM), so clients that discard a response followed by a reset see it.
fn early_answer_lets_the_upload_finish_without_reset(io: IoMode) {
    let up = upstream(Behavior::Fail500);
    let fg = proxy_to(up.addr, "", "", io);
    let mut c = H2Raw::connect(fg.local_addrs()[0]);
    c.post(1, "/upload", Some("20000"));
    c.send(DATA, 0, 1, &[1; 10_000]);
    let head = c.expect(HEADERS, 1);
    assert_eq!(head.status(), 500);
    let mut ended = head.flags & END_STREAM != 0;
    while !ended {
        ended = c.expect(DATA, 1).flags & END_STREAM != 0;
    }
    c.send(DATA, END_STREAM, 1, &[2; 10_000]);
    c.send(PING, 0, 0, b"after-up");
    loop {
        let f = c.read().expect("PING answered");
        assert!(f.kind != RST_STREAM, "stream reset, code {}", f.code());
        if f.kind == PING {
            assert_eq!(f.payload, b"after-up");
            break;
        }
    }
    c.get(3, "/next");
    assert_eq!(c.expect(HEADERS, 3).status(), 500);
    fg.shutdown();
}

/// Idle past the park delay (1 s), the connection frees its buffers (counted with parked
/// HTTP/1.1 connections); its HPACK table stays, so the next request still decodes.
fn idle_connection_frees_its_buffers_and_serves_on(io: IoMode) {
    let up = upstream(Behavior::Echo);
    let fg = proxy_with_admin(up.addr, io);
    let parked = || parked_connections(&fg);
    let mut c = H2Raw::connect(fg.local_addrs()[0]);
    // A field the decoder's table keeps (literal with incremental indexing), then used again
    // by index after the buffers are gone.
    let mut head = block(&[(":method", "GET"), (":scheme", "http"), (":authority", "x")]);
    head.extend_from_slice(&[0x44, 7]);
    head.extend_from_slice(b"/before");
    c.send(HEADERS, END_HEADERS | END_STREAM, 1, &head);
    assert_eq!(c.expect(HEADERS, 1).status(), 200);
    assert!(
        eventually(Duration::from_secs(3), || parked() == 1),
        "slimmed"
    );
    let mut head = block(&[(":method", "GET"), (":scheme", "http"), (":authority", "x")]);
    head.push(0x80 | 62);
    c.send(HEADERS, END_HEADERS | END_STREAM, 3, &head);
    assert_eq!(c.expect(HEADERS, 3).status(), 200);
    fg.shutdown();
}

fn too_many_header_fields_get_431(io: IoMode) {
    let up = upstream(Behavior::Echo);
    let fg = proxy_to(up.addr, "", "max_headers = 10", io);
    let mut c = H2Raw::connect(fg.local_addrs()[0]);
    let head = |extra: usize| {
        let names: Vec<String> = (0..extra).map(|i| format!("x-f{i}")).collect();
        let mut fields = vec![
            (":method", "GET"),
            (":scheme", "http"),
            (":authority", "x"),
            (":path", "/"),
        ];
        fields.extend(names.iter().map(|n| (n.as_str(), "v")));
        block(&fields)
    };
    // Ten regular fields are allowed (pseudo-headers are not fields), eleven are not.
    c.send(HEADERS, END_HEADERS | END_STREAM, 1, &head(10));
    assert_eq!(c.expect(HEADERS, 1).status(), 200);
    c.send(HEADERS, END_HEADERS | END_STREAM, 3, &head(11));
    assert_eq!(c.expect(HEADERS, 3).status(), 431);
    c.assert_serves(5);
    assert_eq!(up.requests(), 2, "the 431 never reached the upstream");
    fg.shutdown();
}

fn stream_refusals_are_counted_by_reason(io: IoMode) {
    let up = upstream(Behavior::Echo);
    let fg = start(
        &format!(
            "[admin]\naddress = \"127.0.0.1:0\"\n[http]\nmax_headers = 10\n\
             [[listener]]\naddress = \"127.0.0.1:0\"\nupstream = \"u\"\n\
             [[upstream]]\nname = \"u\"\nendpoints = [\"{}\"]\n",
            up.addr
        ),
        io,
    );
    let addr = fg.local_addrs()[0];
    let mut c = H2Raw::connect(addr);
    let base = [
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", "x"),
        (":path", "/"),
    ];
    c.request(
        1,
        &[base[0], base[1], base[2], base[3], ("X-Upper", "1")],
        true,
    );
    assert_eq!(c.expect(RST_STREAM, 1).code(), PROTOCOL_ERROR);
    let names: Vec<String> = (0..11).map(|i| format!("x-f{i}")).collect();
    let mut fields = base.to_vec();
    fields.extend(names.iter().map(|n| (n.as_str(), "v")));
    c.request(3, &fields, true);
    assert_eq!(c.expect(HEADERS, 3).status(), 431);
    let m = String::from_utf8(get(fg.admin_addr().unwrap(), "/metrics").body).unwrap();
    for reason in ["malformed_stream", "too_many_fields"] {
        let series = format!("fluxgate_refusals_total{{listener=\"{addr}\",reason=\"{reason}\"}} ");
        assert_eq!(metric(&m, &series), Some(1.0), "{reason}: {m}");
    }
    assert_eq!(up.requests(), 0);
    fg.shutdown();
}

/// Reads frames until RST_STREAM on `id`; returns its code and when it came.
fn reset_of(c: &mut H2Raw, id: u32) -> (u32, Instant) {
    let f = c.expect(RST_STREAM, id);
    (f.code(), Instant::now())
}

fn stalled_upload_is_reset_at_the_body_timeout(io: IoMode) {
    let up = upstream(Behavior::Echo);
    let fg = proxy_to(
        up.addr,
        "response_timeout = \"20s\"",
        "body_timeout = \"1s\"",
        io,
    );
    let mut c = H2Raw::connect(fg.local_addrs()[0]);
    c.post(1, "/up", Some("100"));
    c.send(DATA, 0, 1, b"0123456789");
    let t = Instant::now();
    // Other streams are served meanwhile.
    c.assert_serves(3);
    let (code, at) = reset_of(&mut c, 1);
    assert_eq!(code, CANCEL);
    let waited = at - t;
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "reset at the 1 s body timeout: {waited:?}"
    );
    c.assert_serves(5);
    fg.shutdown();
}

fn response_the_window_holds_is_reset_at_the_send_timeout(io: IoMode) {
    let up = upstream(Behavior::Echo);
    let fg = proxy_to(up.addr, "", "send_timeout = \"1s\"", io);
    let mut c = H2Raw::connect_without_settings(fg.local_addrs()[0]);
    // Each stream may get 100 bytes, and the client never widens the window.
    c.send(SETTINGS, 0, 0, &[0, 4, 0, 0, 0, 100]);
    c.post(1, "/echo", Some("300"));
    c.send(DATA, END_STREAM, 1, &[7; 300]);
    assert_eq!(c.expect(HEADERS, 1).status(), 200);
    assert_eq!(c.expect(DATA, 1).payload.len(), 100);
    let t = Instant::now();
    let (code, at) = reset_of(&mut c, 1);
    assert_eq!(code, CANCEL);
    let waited = at - t;
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "reset at the 1 s send timeout: {waited:?}"
    );
    c.send(SETTINGS, 0, 0, &[0, 4, 0, 1, 0, 0]);
    c.assert_serves(3);
    fg.shutdown();
}

fn client_that_stops_reading_is_closed_at_the_send_timeout(io: IoMode) {
    let (addr, cut) = big_upstream(BIG_RESPONSE);
    let fg = proxy_to(
        addr,
        "response_timeout = \"30s\"",
        "send_timeout = \"1s\"",
        io,
    );
    let before = rss_kib();
    let mut c = H2Raw::connect_without_settings(fg.local_addrs()[0]);
    // All the window it can give, then no more reading.
    c.send(SETTINGS, 0, 0, &[0, 4, 0x7f, 0xff, 0xff, 0xff]);
    c.send(
        WINDOW_UPDATE,
        0,
        0,
        &(0x7fff_ffffu32 - 65_535).to_be_bytes(),
    );
    c.get(1, "/big");
    assert_cancelled_in_bounded_memory(&cut, before);
    // What the socket buffers held arrives, then the close.
    let got = bytes_until_close(&mut c.s);
    assert!(
        got < BIG_RESPONSE / 2,
        "{got} bytes came through a connection to be closed"
    );
    fg.shutdown();
}

fn trickling_upload_is_reset_at_the_request_deadline(io: IoMode) {
    let up = upstream(Behavior::Echo);
    let fg = proxy_to(
        up.addr,
        "response_timeout = \"20s\"",
        "request_timeout = \"1s\"",
        io,
    );
    let mut c = H2Raw::connect(fg.local_addrs()[0]);
    let t = Instant::now();
    c.post(1, "/up", Some("100"));
    // A byte every 100 ms: never idle for the body timeout (20 s), never done (the echo
    // comes back as it goes).
    let code = 'sending: loop {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "no reset at the deadline"
        );
        c.send(DATA, 0, 1, b"x");
        std::thread::sleep(Duration::from_millis(100));
        c.s.set_nonblocking(true).unwrap();
        let mut head = [0u8; 9];
        while let Ok(9) = c.s.peek(&mut head) {
            c.s.set_nonblocking(false).unwrap();
            let f = c.read().unwrap();
            if f.kind == RST_STREAM {
                break 'sending f.code();
            }
            c.s.set_nonblocking(true).unwrap();
        }
        c.s.set_nonblocking(false).unwrap();
    };
    assert_eq!(code, CANCEL);
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    fg.shutdown();
}

// One test per rule of RFC 9113 about stream states (5.1), priority signals (5.3.1) and
// frame definitions (4.2, 6): the frames a client sends by hand, then the answers it must
// get in order. After the last one the connection must say nothing more unasked (a PING
// is answered with no RST_STREAM or GOAWAY before it), unless it ended with GOAWAY.

const PRIORITY: u8 = 2;
const PUSH_PROMISE: u8 = 5;
const PRIORITY_FLAG: u8 = 0x20;
const PADDED: u8 = 0x8;
const ACK: u8 = 1;
const STREAM_CLOSED: u32 = 5;
const CANCEL: u32 = 8;

/// An answer a rule's frames must get.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Want {
    /// GOAWAY with this code, then the close.
    Goaway(u32),
    /// RST_STREAM on this stream with this code.
    Reset(u32, u32),
    /// A 200 response head on this stream.
    Answered(u32),
}
use Want::*;

fn get_block() -> Vec<u8> {
    block(&[
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", "x"),
        (":path", "/"),
    ])
}

/// A priority signal: depends on `on`, weight 16.
fn priority(on: u32) -> Vec<u8> {
    let mut p = on.to_be_bytes().to_vec();
    p.push(15);
    p
}

/// A stream's request answered in full (both sides sent END_STREAM): it is closed.
fn answered_get(c: &mut H2Raw, id: u32) {
    c.get(id, "/");
    let mut f = c.expect(HEADERS, id);
    while f.flags & END_STREAM == 0 {
        f = c.expect(DATA, id);
    }
}

fn check_rule(behavior: Behavior, send: impl FnOnce(&mut H2Raw), wants: &[Want]) {
    let up = upstream(behavior);
    let fg = proxy_to(up.addr, "", "", IoMode::Epoll);
    let mut c = H2Raw::connect(fg.local_addrs()[0]);
    send(&mut c);
    for &want in wants {
        loop {
            let f = c
                .read()
                .unwrap_or_else(|| panic!("connection closed before {want:?}"));
            let got = match f.kind {
                GOAWAY => Goaway(f.code()),
                RST_STREAM => Reset(f.id, f.code()),
                HEADERS if f.status() == 200 => Answered(f.id),
                _ => continue,
            };
            // A reset the rule wants may follow the answer to the stream's request: when the
            // upstream is quick, its head goes out before the server reads the frames that
            // earn the reset. A race, not an order; an answer after the reset still fails.
            if matches!(want, Reset(id, _) if got == Answered(id)) {
                continue;
            }
            // So may an answer to a stream the client itself reset: the head can be on its
            // way before the server reads the client's RST_STREAM. Only the answers a rule
            // names are checked.
            if matches!(got, Answered(id) if !wants.contains(&Answered(id))) {
                continue;
            }
            assert_eq!(got, want, "frames came in another order than the rule says");
            break;
        }
        if let Goaway(_) = want {
            while c.read().is_some() {}
            fg.shutdown();
            return;
        }
    }
    c.send(PING, 0, 0, b"nothing?");
    loop {
        let f = c.read().expect("the connection still serves");
        assert!(
            f.kind != RST_STREAM && f.kind != GOAWAY,
            "an answer the rule does not give: frame type {} on stream {}, code {}",
            f.kind,
            f.id,
            f.code()
        );
        if f.kind == PING && f.flags & ACK != 0 {
            assert_eq!(f.payload, b"nothing?");
            break;
        }
    }
    fg.shutdown();
}

macro_rules! rules {
    ($($name:ident: $behavior:expr, |$c:ident| $send:block => [$($want:expr),* $(,)?];)*) => {
        mod rfc9113 {
            use super::*;
            $(
                #[test]
                fn $name() {
                    check_rule($behavior, |$c: &mut H2Raw| $send, &[$($want),*]);
                }
            )*
        }
    };
}

fn slow() -> Behavior {
    Behavior::Slow(Duration::from_millis(300))
}

rules! {
    // 5.1 idle: only HEADERS and PRIORITY; anything else is PROTOCOL_ERROR.
    idle_data_is_a_connection_error: Behavior::Echo, |c| {
        c.send(DATA, 0, 5, b"x");
    } => [Goaway(PROTOCOL_ERROR)];
    idle_rst_stream_is_a_connection_error: Behavior::Echo, |c| {
        c.send(RST_STREAM, 0, 5, &CANCEL.to_be_bytes());
    } => [Goaway(PROTOCOL_ERROR)];
    idle_window_update_is_a_connection_error: Behavior::Echo, |c| {
        c.send(WINDOW_UPDATE, 0, 5, &100u32.to_be_bytes());
    } => [Goaway(PROTOCOL_ERROR)];
    idle_continuation_is_a_connection_error: Behavior::Echo, |c| {
        c.send(CONTINUATION, END_HEADERS, 5, &get_block());
    } => [Goaway(PROTOCOL_ERROR)];
    idle_priority_is_allowed_and_opens_nothing: Behavior::Echo, |c| {
        c.send(PRIORITY, 0, 5, &priority(0));
        c.send(RST_STREAM, 0, 3, &CANCEL.to_be_bytes());
    } => [Goaway(PROTOCOL_ERROR)];
    idle_stream_after_priority_opens_with_headers: Behavior::Echo, |c| {
        c.send(PRIORITY, 0, 3, &priority(0));
        c.get(3, "/");
    } => [Answered(3)];

    // 5.1 half-closed (remote): after the client's END_STREAM, only WINDOW_UPDATE,
    // PRIORITY and RST_STREAM; anything else is a stream error STREAM_CLOSED.
    half_closed_data_is_stream_closed: slow(), |c| {
        c.get(1, "/");
        c.send(DATA, 0, 1, b"x");
        c.get(3, "/");
    } => [Reset(1, STREAM_CLOSED), Answered(3)];
    half_closed_headers_are_stream_closed: slow(), |c| {
        c.get(1, "/");
        c.send(HEADERS, END_HEADERS | END_STREAM, 1, &block(&[("x-trailer", "1")]));
        c.get(3, "/");
    } => [Reset(1, STREAM_CLOSED), Answered(3)];
    half_closed_window_update_and_priority_are_allowed: slow(), |c| {
        c.get(1, "/");
        c.send(WINDOW_UPDATE, 0, 1, &100u32.to_be_bytes());
        c.send(PRIORITY, 0, 1, &priority(0));
    } => [Answered(1)];

    // 5.1 closed, after END_STREAM both ways: DATA or HEADERS is a connection error
    // STREAM_CLOSED; WINDOW_UPDATE and RST_STREAM may still come.
    closed_data_is_a_connection_error: Behavior::Echo, |c| {
        answered_get(c, 1);
        c.send(DATA, 0, 1, b"x");
    } => [Goaway(STREAM_CLOSED)];
    closed_headers_are_a_connection_error: Behavior::Echo, |c| {
        answered_get(c, 1);
        c.get(1, "/");
    } => [Goaway(STREAM_CLOSED)];
    closed_window_update_and_rst_stream_are_ignored: Behavior::Echo, |c| {
        answered_get(c, 1);
        c.send(WINDOW_UPDATE, 0, 1, &100u32.to_be_bytes());
        c.send(RST_STREAM, 0, 1, &CANCEL.to_be_bytes());
        c.get(3, "/");
    } => [Answered(3)];

    // 5.1 closed, after the client's RST_STREAM: anything but PRIORITY is a stream error
    // STREAM_CLOSED, except a RST_STREAM, which is never answered with one.
    reset_by_client_data_is_stream_closed: Behavior::Echo, |c| {
        c.post(1, "/", None);
        c.send(RST_STREAM, 0, 1, &CANCEL.to_be_bytes());
        c.send(DATA, 0, 1, b"x");
        c.get(3, "/");
    } => [Reset(1, STREAM_CLOSED), Answered(3)];
    reset_by_client_window_update_is_stream_closed: Behavior::Echo, |c| {
        c.post(1, "/", None);
        c.send(RST_STREAM, 0, 1, &CANCEL.to_be_bytes());
        c.send(WINDOW_UPDATE, 0, 1, &100u32.to_be_bytes());
        c.get(3, "/");
    } => [Reset(1, STREAM_CLOSED), Answered(3)];
    reset_by_client_rst_stream_and_priority_are_not_answered: Behavior::Echo, |c| {
        c.post(1, "/", None);
        c.send(RST_STREAM, 0, 1, &CANCEL.to_be_bytes());
        c.send(RST_STREAM, 0, 1, &CANCEL.to_be_bytes());
        c.send(PRIORITY, 0, 1, &priority(0));
        c.get(3, "/");
    } => [Answered(3)];

    // 5.1 closed, after our RST_STREAM: what the client sent before it saw it is ignored.
    reset_by_us_later_data_is_ignored: Behavior::Echo, |c| {
        c.post(1, "/", Some("1"));
        c.send(DATA, 0, 1, b"too long");
        c.send(DATA, END_STREAM, 1, b"more");
        c.get(3, "/");
    } => [Reset(1, PROTOCOL_ERROR), Answered(3)];

    // 5.1.1: a new stream's id is above every one before, and odd.
    stream_id_going_backwards_is_a_connection_error: Behavior::Echo, |c| {
        answered_get(c, 5);
        c.post(3, "/", None);
    } => [Goaway(PROTOCOL_ERROR)];
    even_stream_id_is_a_connection_error: Behavior::Echo, |c| {
        c.get(2, "/");
    } => [Goaway(PROTOCOL_ERROR)];

    // 5.3.1: a stream cannot depend on itself (stream error PROTOCOL_ERROR).
    headers_depending_on_their_own_stream_are_a_stream_error: Behavior::Echo, |c| {
        let mut p = priority(1);
        p.extend(get_block());
        c.send(HEADERS, END_HEADERS | END_STREAM | PRIORITY_FLAG, 1, &p);
        c.get(3, "/");
    } => [Reset(1, PROTOCOL_ERROR), Answered(3)];
    priority_depending_on_its_own_stream_is_a_stream_error: slow(), |c| {
        c.get(1, "/");
        c.send(PRIORITY, 0, 1, &priority(1));
        c.get(3, "/");
    } => [Reset(1, PROTOCOL_ERROR), Answered(3)];

    // 6.3 PRIORITY: on stream 0 a connection error, of another length a stream error.
    priority_on_stream_0_is_a_connection_error: Behavior::Echo, |c| {
        c.send(PRIORITY, 0, 0, &priority(1));
    } => [Goaway(PROTOCOL_ERROR)];
    priority_of_four_bytes_is_a_stream_error: slow(), |c| {
        c.get(1, "/");
        c.send(PRIORITY, 0, 1, &[0, 0, 0, 0]);
        c.get(3, "/");
    } => [Reset(1, FRAME_SIZE_ERROR), Answered(3)];

    // 4.2: a frame above SETTINGS_MAX_FRAME_SIZE.
    frame_above_max_frame_size_is_a_connection_error: Behavior::Echo, |c| {
        c.post(1, "/", None);
        c.send(DATA, 0, 1, &vec![0; 16_385]);
    } => [Goaway(FRAME_SIZE_ERROR)];

    // 6.1 DATA.
    data_on_stream_0_is_a_connection_error: Behavior::Echo, |c| {
        c.send(DATA, 0, 0, b"x");
    } => [Goaway(PROTOCOL_ERROR)];
    data_padding_as_long_as_the_frame_is_a_connection_error: Behavior::Echo, |c| {
        c.post(1, "/", None);
        c.send(DATA, PADDED, 1, &[4, 1, 2, 3]);
    } => [Goaway(PROTOCOL_ERROR)];

    // 6.2 HEADERS.
    headers_on_stream_0_are_a_connection_error: Behavior::Echo, |c| {
        c.send(HEADERS, END_HEADERS | END_STREAM, 0, &get_block());
    } => [Goaway(PROTOCOL_ERROR)];
    headers_padding_longer_than_the_frame_is_a_connection_error: Behavior::Echo, |c| {
        c.send(HEADERS, END_HEADERS | END_STREAM | PADDED, 1, &[200, 0x82]);
    } => [Goaway(PROTOCOL_ERROR)];

    // 6.4 RST_STREAM.
    rst_stream_on_stream_0_is_a_connection_error: Behavior::Echo, |c| {
        c.send(RST_STREAM, 0, 0, &CANCEL.to_be_bytes());
    } => [Goaway(PROTOCOL_ERROR)];
    rst_stream_of_three_bytes_is_a_connection_error: slow(), |c| {
        c.get(1, "/");
        c.send(RST_STREAM, 0, 1, &[0, 0, 8]);
    } => [Goaway(FRAME_SIZE_ERROR)];

    // 6.5 SETTINGS.
    settings_on_a_stream_are_a_connection_error: Behavior::Echo, |c| {
        c.send(SETTINGS, 0, 1, &[]);
    } => [Goaway(PROTOCOL_ERROR)];
    settings_of_five_bytes_are_a_connection_error: Behavior::Echo, |c| {
        c.send(SETTINGS, 0, 0, &[0, 3, 0, 0, 1]);
    } => [Goaway(FRAME_SIZE_ERROR)];
    settings_ack_with_a_payload_is_a_connection_error: Behavior::Echo, |c| {
        c.send(SETTINGS, ACK, 0, &[0, 3, 0, 0, 0, 1]);
    } => [Goaway(FRAME_SIZE_ERROR)];
    enable_push_of_2_is_a_connection_error: Behavior::Echo, |c| {
        c.send(SETTINGS, 0, 0, &[0, 2, 0, 0, 0, 2]);
    } => [Goaway(PROTOCOL_ERROR)];
    initial_window_above_2_31_is_a_connection_error: Behavior::Echo, |c| {
        c.send(SETTINGS, 0, 0, &[0, 4, 0x80, 0, 0, 0]);
    } => [Goaway(FLOW_CONTROL_ERROR)];
    max_frame_size_below_16384_is_a_connection_error: Behavior::Echo, |c| {
        c.send(SETTINGS, 0, 0, &[0, 5, 0, 0, 0x3f, 0xff]);
    } => [Goaway(PROTOCOL_ERROR)];
    initial_window_pushing_a_stream_past_2_31_is_a_connection_error: slow(), |c| {
        c.get(1, "/");
        c.send(WINDOW_UPDATE, 0, 1, &(0x7fff_ffffu32 - 65_535).to_be_bytes());
        c.send(SETTINGS, 0, 0, &[0, 4, 0, 1, 0, 0]);
    } => [Goaway(FLOW_CONTROL_ERROR)];

    // 6.6 PUSH_PROMISE: a client cannot send one.
    push_promise_from_a_client_is_a_connection_error: Behavior::Echo, |c| {
        c.send(PUSH_PROMISE, END_HEADERS, 1, &[0, 0, 0, 2, 0x82]);
    } => [Goaway(PROTOCOL_ERROR)];

    // 6.7 PING.
    ping_on_a_stream_is_a_connection_error: Behavior::Echo, |c| {
        c.send(PING, 0, 1, b"12345678");
    } => [Goaway(PROTOCOL_ERROR)];
    ping_of_seven_bytes_is_a_connection_error: Behavior::Echo, |c| {
        c.send(PING, 0, 0, b"1234567");
    } => [Goaway(FRAME_SIZE_ERROR)];

    // 6.8 GOAWAY.
    goaway_on_a_stream_is_a_connection_error: Behavior::Echo, |c| {
        c.send(GOAWAY, 0, 1, &[0; 8]);
    } => [Goaway(PROTOCOL_ERROR)];

    // 6.9 WINDOW_UPDATE.
    window_update_of_3_bytes_is_a_connection_error: Behavior::Echo, |c| {
        c.send(WINDOW_UPDATE, 0, 0, &[0, 0, 1]);
    } => [Goaway(FRAME_SIZE_ERROR)];
    window_update_of_0_on_the_connection_is_a_connection_error: Behavior::Echo, |c| {
        c.send(WINDOW_UPDATE, 0, 0, &0u32.to_be_bytes());
    } => [Goaway(PROTOCOL_ERROR)];
    window_update_of_0_on_a_stream_is_a_stream_error: slow(), |c| {
        c.get(1, "/");
        c.send(WINDOW_UPDATE, 0, 1, &0u32.to_be_bytes());
        c.get(3, "/");
    } => [Reset(1, PROTOCOL_ERROR), Answered(3)];
    connection_window_past_2_31_is_a_connection_error: Behavior::Echo, |c| {
        c.send(WINDOW_UPDATE, 0, 0, &0x7fff_ffffu32.to_be_bytes());
    } => [Goaway(FLOW_CONTROL_ERROR)];
    stream_window_past_2_31_is_a_stream_error: slow(), |c| {
        c.get(1, "/");
        c.send(WINDOW_UPDATE, 0, 1, &0x7fff_ffffu32.to_be_bytes());
        c.get(3, "/");
    } => [Reset(1, FLOW_CONTROL_ERROR), Answered(3)];

    // 6.10 CONTINUATION: only right after HEADERS (or CONTINUATION) of the same stream.
    continuation_without_headers_is_a_connection_error: Behavior::Echo, |c| {
        answered_get(c, 1);
        c.send(CONTINUATION, END_HEADERS, 1, &get_block());
    } => [Goaway(PROTOCOL_ERROR)];
    header_block_interrupted_by_another_frame_is_a_connection_error: Behavior::Echo, |c| {
        c.send(HEADERS, END_STREAM, 1, &get_block());
        c.send(PING, 0, 0, b"12345678");
    } => [Goaway(PROTOCOL_ERROR)];
    continuation_on_another_stream_is_a_connection_error: Behavior::Echo, |c| {
        c.send(HEADERS, END_STREAM, 1, &get_block());
        c.send(CONTINUATION, END_HEADERS, 3, &[]);
    } => [Goaway(PROTOCOL_ERROR)];
}
