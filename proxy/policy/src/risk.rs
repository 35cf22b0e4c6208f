//! Pre-trade checks of an order desk: one account's limits (`[[orders.account]]`) against
//! one order, with the account's token bucket and open-order count. Plain arithmetic on
//! integers (prices in units of 10^-4); the caller passes the time and the reference price.

use std::time::Instant;

use fluxgate_conf::AccountLimits;

/// Why a check refused an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    MaxQuantity,
    MaxNotional,
    PriceBand,
    /// No last trade and no reference price to check against.
    NoReference,
    RateLimit,
    OpenOrders,
}

/// One account's running state.
#[derive(Debug, Clone)]
pub struct AccountState {
    tokens: f64,
    refilled: Instant,
    /// Orders accepted and not yet closed.
    pub open: usize,
    /// Orders accepted and not yet answered by the upstream.
    pub in_flight: usize,
}

impl AccountState {
    pub fn new(limits: &AccountLimits, now: Instant) -> AccountState {
        AccountState {
            tokens: f64::from(limits.burst),
            refilled: now,
            open: 0,
            in_flight: 0,
        }
    }

    /// Takes one token from the account's bucket (`rate` per second, `burst` at most).
    pub fn take_token(&mut self, limits: &AccountLimits, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        self.tokens = (self.tokens + dt * limits.rate).min(f64::from(limits.burst));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Checks a new order: the rate first (every order counts against it, refused or not), then
/// quantity, notional, the price band and the open-order cap. `price_e4` is None for a
/// market order, whose notional is taken at the reference price. On a refusal, also says
/// what was passed.
pub fn check_order(
    limits: &AccountLimits,
    state: &mut AccountState,
    quantity: i64,
    price_e4: Option<i64>,
    reference_e4: Option<i64>,
    now: Instant,
) -> Result<(), (Refusal, String)> {
    if !state.take_token(limits, now) {
        return Err((
            Refusal::RateLimit,
            format!("more than {} orders per second", limits.rate),
        ));
    }
    if quantity > limits.max_quantity {
        return Err((
            Refusal::MaxQuantity,
            format!("quantity {quantity} above {}", limits.max_quantity),
        ));
    }
    let at = match (price_e4, reference_e4) {
        (Some(p), _) => p,
        (None, Some(r)) => r,
        (None, None) => {
            return Err((
                Refusal::NoReference,
                "a market order needs a last trade or reference price".into(),
            ))
        }
    };
    let notional = i128::from(quantity) * i128::from(at);
    if notional > limits.max_notional_e4 {
        return Err((
            Refusal::MaxNotional,
            format!(
                "notional {} above {}",
                e4_text(notional),
                e4_text(limits.max_notional_e4)
            ),
        ));
    }
    if let Some(p) = price_e4 {
        let Some(r) = reference_e4 else {
            return Err((
                Refusal::NoReference,
                "no last trade or reference price for the price band".into(),
            ));
        };
        let off = i128::from((p - r).abs()) * 10_000;
        if off > i128::from(limits.price_band_bps) * i128::from(r) {
            return Err((
                Refusal::PriceBand,
                format!(
                    "price {} outside {} bp of {}",
                    e4_text(p.into()),
                    limits.price_band_bps,
                    e4_text(r.into())
                ),
            ));
        }
    }
    if state.open >= limits.max_open {
        return Err((
            Refusal::OpenOrders,
            format!("{} orders open already", state.open),
        ));
    }
    Ok(())
}

/// A value in units of 10^-4 as a decimal, trailing zeros dropped.
fn e4_text(v: i128) -> String {
    let s = format!("{}.{:04}", v / 10_000, (v % 10_000).abs());
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limits() -> AccountLimits {
        AccountLimits {
            name: "a".into(),
            max_quantity: 100,
            max_notional_e4: 10_000 * 10_000,
            price_band_bps: 500,
            rate: 10.0,
            burst: 2,
            max_open: 3,
        }
    }

    #[test]
    fn each_limit_refuses_with_its_reason() {
        let l = limits();
        let t0 = Instant::now();
        let mut s = AccountState::new(&l, t0);
        let r = Some(100 * 10_000);
        let mut at = t0;
        let mut go = |s: &mut AccountState, q, p| {
            at += Duration::from_secs(1);
            check_order(&l, s, q, p, r, at).map_err(|e| e.0)
        };
        assert_eq!(go(&mut s, 10, Some(100 * 10_000)), Ok(()));
        assert_eq!(
            go(&mut s, 101, Some(100 * 10_000)),
            Err(Refusal::MaxQuantity)
        );
        // 100 at 101 is 10,100 > 10,000.
        assert_eq!(
            go(&mut s, 100, Some(101 * 10_000)),
            Err(Refusal::MaxNotional)
        );
        assert_eq!(go(&mut s, 1, Some(106 * 10_000)), Err(Refusal::PriceBand));
        assert_eq!(go(&mut s, 1, Some(94 * 10_000)), Err(Refusal::PriceBand));
        assert_eq!(go(&mut s, 1, Some(95 * 10_000)), Ok(()));
        assert_eq!(go(&mut s, 1, None), Ok(()));
        s.open = 3;
        assert_eq!(go(&mut s, 1, None), Err(Refusal::OpenOrders));
        s.open = 0;
        let now = at + Duration::from_secs(1);
        assert_eq!(
            check_order(&l, &mut s, 1, None, None, now).map_err(|e| e.0),
            Err(Refusal::NoReference)
        );
        // Burst 2 within the same instant, then refused until a token comes back.
        let mut s = AccountState::new(&l, now);
        assert!(check_order(&l, &mut s, 1, None, r, now).is_ok());
        assert!(check_order(&l, &mut s, 1, None, r, now).is_ok());
        assert_eq!(
            check_order(&l, &mut s, 1, None, r, now).map_err(|e| e.0),
            Err(Refusal::RateLimit)
        );
        let later = now + Duration::from_millis(100);
        assert!(check_order(&l, &mut s, 1, None, r, later).is_ok());
    }

    #[test]
    fn amounts_print_as_decimals() {
        assert_eq!(e4_text(1_012_500), "101.25");
        assert_eq!(e4_text(10_000), "1");
        assert_eq!(e4_text(5), "0.0005");
    }
}
