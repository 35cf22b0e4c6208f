//! The PROXY protocol in front of a client connection: only from trusted sources, read before
//! anything else (TLS included), and the addresses it carries then stand for the socket's.

use std::net::SocketAddr;
use std::time::Duration;

use fluxgate_wire::proxy_protocol::{parse, V2_MAX_BODY};
use tokio::net::TcpStream;

/// The client's address and the one it reached, as the header from `peer` says (the
/// socket's own for a LOCAL or UNKNOWN header); None, to close the connection, when `peer`
/// is not `trusted` or its header is missing, malformed or not whole within `limit`. Takes
/// exactly the header's bytes off the socket.
pub(crate) async fn take_header(
    stream: &TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    trusted: &[ipnet::IpNet],
    limit: Duration,
) -> Option<(SocketAddr, SocketAddr)> {
    if !trusted.iter().any(|n| n.contains(&peer.ip())) {
        return None;
    }
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = vec![0u8; 16 + V2_MAX_BODY];
    let header = super::peek_until(stream, &mut buf, deadline, |b, full| match parse(b) {
        Ok(Some(h)) => Some(Some(h)),
        Ok(None) if !full => None,
        _ => Some(None),
    })
    .await??;
    let mut got = 0;
    while got < header.len {
        tokio::time::timeout_at(deadline, stream.readable())
            .await
            .ok()?
            .ok()?;
        match stream.try_read(&mut buf[got..header.len]) {
            Ok(0) => return None,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return None,
        }
    }
    Some(match header.addresses {
        Some(a) => (a.source, a.destination),
        None => (peer, local),
    })
}
