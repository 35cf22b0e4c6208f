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
    /// The connection, pooled or new, closed or was reset before any byte of a response.
    pub reset: bool,
}

impl AttemptFacts {
    /// The retry rule for every upstream protocol: once (the caller never asks after a
    /// retry), after a failure of the connection, with the whole request at hand, and only
    /// if the upstream never got it or the method is idempotent (RFC 9112 9.3.1).
    pub fn may_retry(self) -> bool {
        self.connection_failed && self.replayable && (!self.maybe_received || self.idempotent)
    }

    /// With `[upstream.retry] attempts` above 2, the rule for the tries after the first
    /// retry: also a new connection that closed or was reset before answering, with the
    /// whole request at hand, if the upstream never got it or the method is idempotent.
    pub fn may_retry_again(self) -> bool {
        (self.connection_failed || self.reset)
            && self.replayable
            && (!self.maybe_received || self.idempotent)
    }
}

/// A retry budget of one worker for one upstream: retries at most `share` of the requests
/// of the last ten seconds, but always `floor` of them; so a failing upstream gets at most
/// that many more attempts, never a multiple of the load.
pub struct Budget {
    share: f64,
    floor: u32,
    start: std::time::Instant,
    /// Per second (modulo 10): which second it counts, requests, retries.
    slots: [std::cell::Cell<(u64, u32, u32)>; 10],
}

impl Budget {
    pub fn new(share: f64, floor: u32) -> Budget {
        Budget {
            share,
            floor,
            start: std::time::Instant::now(),
            slots: Default::default(),
        }
    }

    fn slot(&self, now: std::time::Instant) -> (&std::cell::Cell<(u64, u32, u32)>, u64) {
        let sec = now.saturating_duration_since(self.start).as_secs();
        let slot = &self.slots[(sec % 10) as usize];
        if slot.get().0 != sec {
            slot.set((sec, 0, 0));
        }
        (slot, sec)
    }

    /// Counts a request.
    pub fn request(&self, now: std::time::Instant) {
        let (slot, _) = self.slot(now);
        let (s, r, t) = slot.get();
        slot.set((s, r + 1, t));
    }

    /// Takes one retry from the budget, when there is one left.
    pub fn retry(&self, now: std::time::Instant) -> bool {
        let (slot, sec) = self.slot(now);
        let (requests, retries) = self
            .slots
            .iter()
            .map(std::cell::Cell::get)
            .filter(|&(s, _, _)| sec.saturating_sub(s) < 10)
            .fold((0u32, 0u32), |(a, b), (_, r, t)| (a + r, b + t));
        let allowed = (self.share * f64::from(requests)) as u32;
        if retries >= allowed.max(self.floor) {
            return false;
        }
        let (s, r, t) = slot.get();
        slot.set((s, r, t + 1));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::AttemptFacts;

    #[test]
    fn the_budget_caps_retries_at_its_share() {
        let b = super::Budget::new(0.2, 3);
        let t = std::time::Instant::now();
        // Three always; then 20% of the requests.
        assert!((0..3).all(|_| b.retry(t)));
        assert!(!b.retry(t));
        for _ in 0..100 {
            b.request(t);
        }
        assert_eq!((0..50).filter(|_| b.retry(t)).count(), 17);
        // Ten seconds on, the window is empty again: the floor.
        let later = t + std::time::Duration::from_secs(10);
        assert_eq!((0..50).filter(|_| b.retry(later)).count(), 3);
    }

    #[test]
    fn retry_rule() {
        let facts = |connection_failed, maybe_received, replayable, idempotent| AttemptFacts {
            connection_failed,
            maybe_received,
            replayable,
            idempotent,
            reused: true,
            reset: connection_failed,
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
