//! The retry rule, one for every upstream protocol (RFC 9110 9.2.2, RFC 9112 9.3.1, RFC 9113
//! 8.7): the upstream side reports the facts of a failed attempt, this decides.

/// Whether `method` may be applied twice with the effect of once (RFC 9110 9.2.2).
pub fn idempotent(method: &http::Method) -> bool {
    use http::Method;
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// What a failed upstream attempt tells about sending the request once more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttemptFacts {
    /// The connection, not the request, failed: a pooled HTTP/1.1 connection that closed
    /// before any byte of a response, or a broken or refused HTTP/2 stream. Timeouts and
    /// malformed answers are not.
    pub connection_failed: bool,
    /// The upstream may have received (and acted on) the request. False when no byte reached
    /// the socket, or the upstream refused the stream unprocessed (REFUSED_STREAM, or above
    /// the last stream id of a GOAWAY: RFC 9113 8.7).
    pub maybe_received: bool,
    /// The whole request is still at hand: it has no body, or it came back unsent.
    pub replayable: bool,
    /// The method may be applied twice with the effect of once (RFC 9110 9.2.2).
    pub idempotent: bool,
    /// The attempt went over a connection used before (pooled, or a shared HTTP/2 one).
    pub reused: bool,
}

impl AttemptFacts {
    /// The retry rule for every upstream protocol: once (the caller never asks after a
    /// retry), after a failure of the connection, with the whole request at hand, and only
    /// if the upstream never got it or the method is idempotent (RFC 9112 9.3.1).
    pub fn may_retry(self) -> bool {
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
            reused: true,
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
