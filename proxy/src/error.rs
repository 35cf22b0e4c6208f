//! The one error type of the data path and the one place it becomes what a client sees.

use http::StatusCode;

/// Any error, as hyper takes it from a body.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

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
}

impl ProxyError {
    /// The status the client receives for this failure.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Connect { .. } | ProxyError::Upstream(_) => StatusCode::BAD_GATEWAY,
            ProxyError::ResponseTimeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::ClientBody(_) => StatusCode::BAD_REQUEST,
            ProxyError::Overloaded | ProxyError::NoHealthyEndpoint => {
                StatusCode::SERVICE_UNAVAILABLE
            }
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

/// What a failed upstream attempt tells about sending the request once more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AttemptFacts {
    /// The connection, not the request, failed: a pooled HTTP/1.1 connection that closed
    /// before any byte of a response, or a broken or refused HTTP/2 stream. Timeouts and
    /// malformed answers are not.
    pub(crate) connection_failed: bool,
    /// The upstream may have received (and acted on) the request. False when no byte reached
    /// the socket, or the upstream refused the stream unprocessed (REFUSED_STREAM, or above
    /// the last stream id of a GOAWAY: RFC 9113 8.7).
    pub(crate) maybe_received: bool,
    /// The whole request is still at hand: it has no body, or it came back unsent.
    pub(crate) replayable: bool,
    /// The method may be applied twice with the effect of once (RFC 9110 9.2.2).
    pub(crate) idempotent: bool,
}

impl AttemptFacts {
    /// The retry rule for every upstream protocol: once (the caller never asks after a
    /// retry), after a failure of the connection, with the whole request at hand, and only
    /// if the upstream never got it or the method is idempotent (RFC 9112 9.3.1).
    pub(crate) fn may_retry(self) -> bool {
        self.connection_failed && self.replayable && (!self.maybe_received || self.idempotent)
    }
}

#[cfg(test)]
mod tests {
    use super::AttemptFacts;

    #[test]
    fn retry_rule() {
        let facts = |connection_failed, maybe_received, replayable, idempotent| AttemptFacts {
            connection_failed,
            maybe_received,
            replayable,
            idempotent,
        };
        // Idempotent and whole: retried whether or not it arrived.
        assert!(facts(true, true, true, true).may_retry());
        assert!(facts(true, false, true, true).may_retry());
        // Not idempotent: only when it never arrived.
        assert!(!facts(true, true, true, false).may_retry());
        assert!(facts(true, false, true, false).may_retry());
        // Never when the request is gone, or the failure was not the connection's.
        assert!(!facts(true, false, false, false).may_retry());
        assert!(!facts(true, true, false, true).may_retry());
        assert!(!facts(false, false, true, true).may_retry());
    }
}
