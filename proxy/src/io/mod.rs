//! TLS configuration for listeners and upstreams, the session-ticket keys instances share,
//! and moving a tunnel's bytes (splice). Knows nothing of HTTP.

pub(crate) mod splice;
pub(crate) mod tickets;
pub mod tls;
