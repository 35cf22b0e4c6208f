//! WebSocket (and any HTTP/1.1 upgrade) passes through only after the upstream's 101.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use fluxgate_conf::IoMode;
use support::*;

/// An upstream that switches `/ws` to a raw echo after a 101 and refuses anything else.
fn websocket_echo_upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read(&mut b).unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(b[0]);
                }
                let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                if head.starts_with("get /ws ")
                    && head.contains("upgrade: websocket")
                    && head.contains("connection: upgrade")
                {
                    s.write_all(
                        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                          Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
                    )
                    .unwrap();
                    let mut buf = [0u8; 4096];
                    loop {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if s.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                } else {
                    let _ =
                        s.write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 6\r\n\r\nno ws\n");
                }
            });
        }
    });
    addr
}

const HANDSHAKE: &str = "Host: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

fn echo(c: &mut RawClient, msg: &[u8]) -> Vec<u8> {
    c.send(msg);
    let mut got = vec![0u8; msg.len()];
    c.stream.read_exact(&mut got).unwrap();
    got
}

fn websocket_echo(io: IoMode) {
    let up = websocket_echo_upstream();
    let fg = proxy_to(up, "", "", io);
    let addr = fg.local_addrs()[0];

    let mut c = RawClient::connect(addr);
    c.send(format!("GET /ws HTTP/1.1\r\n{HANDSHAKE}").as_bytes());
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 101);
    assert_eq!(r.header("upgrade"), Some("websocket"));
    assert_eq!(r.header("connection"), Some("upgrade"));
    assert_eq!(
        r.header("sec-websocket-accept"),
        Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    );
    // A masked text frame "hello", then raw bytes: whatever goes in comes back.
    let frame = [
        0x81,
        0x85,
        1,
        2,
        3,
        4,
        b'h' ^ 1,
        b'e' ^ 2,
        b'l' ^ 3,
        b'l' ^ 4,
        b'o' ^ 1,
    ];
    assert_eq!(echo(&mut c, &frame), frame);
    // Idle past the keep-alive park delay: a tunnel is never parked or timed out here.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(echo(&mut c, b"still there"), b"still there");

    // Refused by the upstream: the client gets its answer, and no tunnel.
    let mut c = RawClient::connect(addr);
    c.send(format!("GET /refuse HTTP/1.1\r\n{HANDSHAKE}").as_bytes());
    let r = c.read_response().unwrap();
    assert_eq!((r.status, &r.body[..]), (403, &b"no ws\n"[..]));
    fg.shutdown();
}

#[test]
fn websocket_echo_through_the_gateway_uring() {
    websocket_echo(IoMode::Uring);
}

#[test]
fn websocket_echo_through_the_gateway_epoll() {
    websocket_echo(IoMode::Epoll);
}
