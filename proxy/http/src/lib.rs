//! The protocol servers clients talk to, and the seam they serve through. `service` is the
//! seam: the HTTP/1.1 server (`h1`) and the HTTP/2 server (`h2`) are generic over its
//! `Service` and hand it each request with a streaming body. What both servers share lives
//! beside them: a client connection's state and timers (`conn`), request bodies and their
//! receive queue (`body`, `recv`), header rules (`headers`) and the sockets (`stream`).
//!
//! Never names the gateway, a route, a pool or an upstream: those are the service's.

#![forbid(unsafe_code)]

pub mod body;
pub mod conn;
pub mod h1;
pub mod h2;
pub mod h3;
pub mod headers;
pub mod recv;
pub mod service;
pub mod stream;

/// Any error, as a body or a service hands it on.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
