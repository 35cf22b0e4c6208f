//! The one error type of the data path and the one place it becomes what a client sees.

use fluxgate_http::recv::BodyError;
use http::StatusCode;

pub(crate) use fluxgate_http::BoxError;

/// Why a proxied request failed.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The upstream endpoint refused the connection, or the connect timed out.
    #[error("connect to {addr} failed: {source}")]
    Connect {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    /// The upstream sent no response head within the response timeout.
    #[error("upstream response timed out")]
    ResponseTimeout,
    /// The upstream broke the exchange: reset, closed early, malformed response.
    #[error("upstream failed: {0}")]
    Upstream(BoxError),
    /// The client's request body was malformed (bad chunk framing) or cut short.
    #[error("client request body failed: {0}")]
    ClientBody(BoxError),
    /// Every endpoint of the upstream is unhealthy (failed checks or ejected).
    #[error("no healthy upstream endpoint")]
    NoHealthyEndpoint,
    /// Every allowed connection to the endpoint was busy and none freed up in time.
    #[error("upstream connection limit reached")]
    Overloaded,
    /// A fleet-wide rate limit (in Redis) refused the request: wait this many seconds.
    #[error("rate limited")]
    RateLimited(u64),
}

impl ProxyError {
    /// The status the client receives for this failure.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Connect { .. } | ProxyError::Upstream(_) => StatusCode::BAD_GATEWAY,
            ProxyError::ResponseTimeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::ClientBody(e) => match body_error(e.as_ref()) {
                Some(BodyError::TooLarge(_)) => StatusCode::PAYLOAD_TOO_LARGE,
                Some(BodyError::IdleTimeout) => StatusCode::REQUEST_TIMEOUT,
                _ => StatusCode::BAD_REQUEST,
            },
            ProxyError::Overloaded | ProxyError::NoHealthyEndpoint => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// Whether the client connection must close after the answer: after a broken request
    /// body the framing of what follows cannot be trusted.
    pub fn closes_client(&self) -> bool {
        matches!(self, ProxyError::ClientBody(_))
    }

    /// Classifies a hyper (HTTP/2) client error: a failure of the body we were streaming from the
    /// client is the client's fault, anything else the upstream's.
    pub(crate) fn from_upstream(err: hyper::Error) -> ProxyError {
        if err.is_user() {
            ProxyError::ClientBody(Box::new(err))
        } else {
            ProxyError::Upstream(Box::new(err))
        }
    }
}

/// The request body's own failure, however wrapped (an h2 upstream wraps it in hyper's).
fn body_error(e: &(dyn std::error::Error + 'static)) -> Option<BodyError> {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if let Some(b) = c.downcast_ref::<BodyError>() {
            return Some(*b);
        }
        cause = c.source();
    }
    None
}
