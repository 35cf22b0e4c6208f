//! TLS configuration for listeners and upstreams, and the session-ticket keys instances
//! share. Knows nothing of HTTP.

pub(crate) mod tickets;
pub mod tls;
