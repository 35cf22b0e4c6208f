//! fluxgate's wire formats, sans-IO: HTTP/1.1 heads for both roles (parsed into header maps
//! whose values point into the head's bytes, and encoded), the chunked coding, HTTP/2 frame
//! heads and HPACK, the PROXY protocol header, a TLS ClientHello's server name, WebSocket
//! frames, the NATS client protocol, RESP (Redis). Bytes in, values out, and back.
//!
//! Never does I/O: no tokio, no sockets, no clock. Errors are values; nothing here panics on
//! input.

pub mod date;
pub mod h1;
pub mod h2;
pub mod nats;
pub mod proxy_protocol;
pub mod resp;
pub mod tls;
pub mod ws;
