//! Byte streams: the client and upstream sockets, plain or TLS, TLS configuration and the
//! shared session-ticket keys. Knows nothing of HTTP.

pub(crate) mod stream;
pub(crate) mod tickets;
pub mod tls;
