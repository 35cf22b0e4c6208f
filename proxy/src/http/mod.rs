//! What every protocol server shares, and the seam they serve through (`service`): a client
//! connection's state and timers, request bodies and their receive queue, and header rules. Never names the gateway, a pool or an upstream.

pub(crate) mod body;
pub(crate) mod conn;
pub(crate) mod headers;
pub(crate) mod recv;
pub(crate) mod service;
