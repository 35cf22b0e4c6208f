//! The upstream side: per-worker connection pools, fluxgate's HTTP/1.1 client, the h2c
//! client's executor and active health checks. Never imports `downstream` or `app`.

pub(crate) mod conn;
pub(crate) mod h1;
pub(crate) mod health;
pub(crate) mod pool;
pub(crate) mod send;
