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
