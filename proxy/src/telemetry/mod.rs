//! What fluxgate tells operators: the metrics registry and its Prometheus text, the JSON
//! access log and the JSON writer both use. Never decides anything about a request.

pub(crate) mod accesslog;
pub(crate) mod json;
pub mod log;
pub(crate) mod metrics;
pub(crate) mod trace;
