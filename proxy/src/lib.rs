//! fluxgate, the gateway: worker threads with their own listeners, the io_uring or epoll
//! acceptor, HTTP/1.1 and HTTP/2 served by our own servers (`h1::server`, `h2`),
//! and per-worker upstream pools.
//!
//! Nothing here blocks a worker thread, and nothing here is shared between workers but the
//! read-only config: every pool and counter belongs to one thread. Unsafe code lives only in
//! `fluxgate-sys`.

mod accept;
mod accesslog;
mod admin;
mod balance;
mod body;
mod conn;
mod error;
mod h1;
mod h2;
mod headers;
mod health;
mod json;
mod metrics;
mod pool;
mod proxy;
mod recv;
pub mod route;
mod server;
mod service;
mod stream;
mod tickets;
pub mod tls;
mod worker;

pub use error::ProxyError;
pub use server::{Handle, Server};
