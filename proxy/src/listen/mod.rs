//! Listening sockets and what happens to a connection before a server takes it: the
//! io_uring or epoll acceptor, the PROXY protocol header, the TLS handshake, telling HTTP/2
//! from HTTP/1.1 by the first bytes, and the lingering close after; and TCP-mode listeners,
//! whose connections no server takes (forwarded as bytes).

pub(crate) mod accept;
pub(crate) mod amplification;
pub(crate) mod proxied;
pub(crate) mod quic;
pub(crate) mod sniff;
pub(crate) mod tcp;

use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

/// How long to wait before looking again at first bytes that came in pieces.
const PIECES: Duration = Duration::from_millis(5);

/// Looks at a connection's first bytes, without taking them, until `decide` says what they
/// are: it gets what is there so far and whether `buf` is full, and returns None to see
/// more. None when the client left or `deadline` passed first.
pub(crate) async fn peek_until<T>(
    stream: &TcpStream,
    buf: &mut [u8],
    deadline: Instant,
    mut decide: impl FnMut(&[u8], bool) -> Option<T>,
) -> Option<T> {
    let mut seen = 0;
    loop {
        let n = tokio::time::timeout_at(deadline, stream.peek(buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        if let Some(t) = decide(&buf[..n], n == buf.len()) {
            return Some(t);
        }
        if n == seen {
            // Nothing new since the last look: the rest is on its way.
            tokio::time::sleep(PIECES).await;
        }
        seen = n;
    }
}
