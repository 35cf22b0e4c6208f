//! fluxgate, the gateway: worker threads with their own listeners, the io_uring or epoll
//! acceptor, HTTP/1.1 and HTTP/2 served by our own servers, and per-worker upstream pools.
//!
//! Floors, top down: `server` and `worker` (wiring), `control` (reload, admin), `listen`
//! (accept, sniff), `app` (the gateway, the service the servers call), `upstream` (pools,
//! client, health), `telemetry`, `io` (TLS); below them the crates `fluxgate-http` (the
//! downstream servers and the service seam; it never imports `upstream` or `app`),
//! `fluxgate-policy` (decisions), `fluxgate-wire` (wire formats) and `fluxgate-sys` (the only
//! unsafe code).
//! Nothing here blocks a worker thread, and nothing here is shared between workers but the
//! read-only config: every pool and counter belongs to one thread. Unsafe code lives only in
//! `fluxgate-sys`.

mod app;
mod control;
mod error;
mod io;
mod listen;
mod server;
mod telemetry;
mod upstream;
mod worker;

pub use app::orders::journal;
pub use error::ProxyError;
pub use io::tls;
pub use server::{Handle, Server};
pub use telemetry::log as logging;
