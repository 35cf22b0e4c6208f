//! Listening sockets and what happens to a connection before a server takes it: the
//! io_uring or epoll acceptor, the TLS handshake, telling HTTP/2 from HTTP/1.1 by the first
//! bytes, and the lingering close after.

pub(crate) mod accept;
pub(crate) mod sniff;
