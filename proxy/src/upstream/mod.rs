//! The upstream side: per-worker connection pools, fluxgate's HTTP/1.1 client, the h2c
//! client's executor, active health checks, and the link to Redis for fleet-wide rate
//! limits. Never imports `downstream` or `app`.

pub(crate) mod conn;
pub(crate) mod h1;
pub(crate) mod health;
pub(crate) mod pool;
pub(crate) mod redis;
pub(crate) mod send;
