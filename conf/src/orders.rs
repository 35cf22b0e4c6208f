//! `[[orders]]`: an order desk. Trading clients send orders (a `mode = "orders"` listener:
//! envelope frames over raw TCP or TLS; or a route with `orders = "NAME"`: a WebSocket
//! upgrade, or one order per `POST` of `application/x-protobuf`); the desk validates them,
//! runs the account's pre-trade checks, journals what it accepts and forwards it to the
//! order upstream its rules pick, relaying that upstream's answer.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::feed::InstrumentSet;
use crate::{ConfError, RawSize, Source, Upstream};

/// One desk.
#[derive(Debug, Clone, PartialEq)]
pub struct Desk {
    pub name: String,
    /// `upstream`: where orders go when no `[[orders.route]]` matches (index into
    /// `Config::upstreams`).
    pub upstream: usize,
    /// `[[orders.route]]`, first match wins.
    pub routes: Vec<DeskRoute>,
    /// The path orders are POSTed to on the upstream. Default `/orders`.
    pub order_path: String,
    /// The path cancels are POSTed to. Default `/cancels`.
    pub cancel_path: String,
    /// `feed`: the feed whose last trade price centres the price band (index into
    /// `Config::feeds`). Default none: the instrument's `reference_price`.
    pub feed: Option<usize>,
    /// `[[orders.instrument]]`: the instruments orders may name, with tick sizes.
    pub instruments: Vec<DeskInstrument>,
    /// `[[orders.account]]`: limits per account; one named `*` applies to every account
    /// not listed (without it, an unlisted account is refused).
    pub accounts: Vec<AccountLimits>,
    /// `[orders.journal]`: accepted orders are made durable here before the client hears
    /// they were accepted. Default none (no journal: acknowledged at once).
    pub journal: Option<JournalSettings>,
    /// Orders of one session accepted and not yet answered by the upstream, past which the
    /// gateway stops reading the session. Default 64.
    pub session_in_flight: usize,
    /// The same, for all sessions of one account. Default 1024.
    pub account_in_flight: usize,
    /// How long the upstream has to answer one order before it is sent again. Default 5 s.
    pub upstream_timeout: Duration,
    /// Wait before sending an order again after its upstream failed. Default 200 ms.
    pub retry_backoff: Duration,
    /// Orders remembered for idempotency: a repeated client order id is known for at least
    /// half this many newer orders, at most this many. Default 200000.
    pub remember: usize,
    /// Largest order frame payload; a larger one closes the session. Default 16 KiB.
    pub max_payload: usize,
}

/// `[[orders.route]]`: orders of these instruments, or of these accounts, go to `upstream`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeskRoute {
    /// None: any instrument.
    pub instruments: Option<InstrumentSet>,
    /// Empty: any account.
    pub accounts: Vec<String>,
    pub upstream: usize,
}

impl DeskRoute {
    pub fn matches(&self, instrument: u32, account: &[u8]) -> bool {
        self.instruments
            .as_ref()
            .is_none_or(|s| s.contains(instrument))
            && (self.accounts.is_empty() || self.accounts.iter().any(|a| a.as_bytes() == account))
    }
}

/// `[[orders.instrument]]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeskInstrument {
    pub ids: InstrumentSet,
    /// Tick size in units of 10^-4 (`tick = 0.01` is 100).
    pub tick_e4: i64,
    /// `reference_price`, in units of 10^-4: the band's centre while the feed has no trade.
    pub reference_e4: Option<i64>,
}

/// `[[orders.account]]`
#[derive(Debug, Clone, PartialEq)]
pub struct AccountLimits {
    /// The account, or `*` for every account not listed.
    pub name: String,
    /// Largest quantity of one order.
    pub max_quantity: i64,
    /// Largest quantity × price of one order, in units of 10^-4 of the price currency.
    pub max_notional_e4: i128,
    /// A limit price may be at most this far from the reference, in basis points. Default
    /// 500 (5%).
    pub price_band_bps: u32,
    /// Orders (and cancels) per second, and the burst above it.
    pub rate: f64,
    pub burst: u32,
    /// Orders open at once (accepted, not yet cancelled or finished).
    pub max_open: usize,
}

/// `[orders.journal]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalSettings {
    pub dir: PathBuf,
    /// A segment grows to this size before the next starts. Default 64 MiB.
    pub segment_size: u64,
}

/// Ids a desk's instruments may cover in all (each is a table entry).
const MAX_INSTRUMENT_IDS: u64 = 1 << 20;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDesk {
    name: Spanned<String>,
    upstream: Spanned<String>,
    #[serde(default)]
    route: Vec<Spanned<RawDeskRoute>>,
    order_path: Option<Spanned<String>>,
    cancel_path: Option<Spanned<String>>,
    feed: Option<Spanned<String>>,
    #[serde(default)]
    instrument: Vec<Spanned<RawInstrument>>,
    #[serde(default)]
    account: Vec<Spanned<RawAccount>>,
    journal: Option<Spanned<RawJournal>>,
    session_in_flight: Option<Spanned<i64>>,
    account_in_flight: Option<Spanned<i64>>,
    upstream_timeout: Option<Spanned<String>>,
    retry_backoff: Option<Spanned<String>>,
    remember: Option<Spanned<i64>>,
    max_payload: Option<Spanned<RawSize>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDeskRoute {
    instruments: Option<Vec<String>>,
    #[serde(default)]
    accounts: Vec<String>,
    upstream: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInstrument {
    ids: Vec<String>,
    tick: f64,
    reference_price: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccount {
    name: String,
    max_quantity: i64,
    max_notional: f64,
    price_band: Option<f64>,
    rate: f64,
    burst: Option<i64>,
    max_open: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJournal {
    dir: String,
    segment_size: Option<Spanned<RawSize>>,
}

/// A decimal from the config in units of 10^-4, when it is one (positive, at most 4
/// decimals, in range).
fn e4(v: f64) -> Option<i64> {
    let scaled = (v * 1e4).round();
    ((scaled - v * 1e4).abs() < 1e-6 * scaled.abs().max(1.0) && (1.0..9e18).contains(&scaled))
        .then_some(scaled as i64)
}

pub(crate) fn build(
    src: &Source<'_>,
    raw: &[RawDesk],
    upstreams: &[Upstream],
    feeds: &[crate::Feed],
) -> Result<Vec<Desk>, ConfError> {
    let mut desks: Vec<Desk> = Vec::with_capacity(raw.len());
    for (i, d) in raw.iter().enumerate() {
        let key = |k: &str| format!("orders[{i}].{k}");
        let name = d.name.get_ref().clone();
        if name.is_empty() || desks.iter().any(|x| x.name == name) {
            return Err(src.invalid(key("name"), &d.name, "desk names are unique and not empty"));
        }
        let upstream = crate::route::upstream_index(src, key("upstream"), &d.upstream, upstreams)?;
        let no_groups = Default::default();
        let mut routes = Vec::new();
        for (j, r) in d.route.iter().enumerate() {
            let rr = r.get_ref();
            let instruments = match &rr.instruments {
                None => None,
                Some(p) => Some(
                    InstrumentSet::parse(p.iter().map(String::as_str), &no_groups)
                        .map_err(|e| src.invalid(key(&format!("route[{j}].instruments")), r, e))?,
                ),
            };
            if instruments.is_none() && rr.accounts.is_empty() {
                return Err(src.invalid(
                    key(&format!("route[{j}]")),
                    r,
                    "a route names `instruments`, `accounts` or both",
                ));
            }
            routes.push(DeskRoute {
                instruments,
                accounts: rr.accounts.clone(),
                upstream: crate::route::upstream_index(
                    src,
                    key(&format!("route[{j}].upstream")),
                    &rr.upstream,
                    upstreams,
                )?,
            });
        }
        let path = |k: &str, v: &Option<Spanned<String>>, default: &str| match v {
            None => Ok(default.to_owned()),
            Some(p) if p.get_ref().starts_with('/') && p.get_ref().parse::<http::Uri>().is_ok() => {
                Ok(p.get_ref().clone())
            }
            Some(p) => Err(src.invalid(key(k), p, "a path starts with `/`")),
        };
        let mut instruments = Vec::new();
        let mut ids = 0u64;
        for (j, r) in d.instrument.iter().enumerate() {
            let ri = r.get_ref();
            let at = || key(&format!("instrument[{j}]"));
            let set = InstrumentSet::parse(ri.ids.iter().map(String::as_str), &no_groups)
                .map_err(|e| src.invalid(format!("{}.ids", at()), r, e))?;
            ids += set.len();
            if ids > MAX_INSTRUMENT_IDS {
                return Err(src.invalid(
                    format!("{}.ids", at()),
                    r,
                    format!("a desk's instruments cover at most {MAX_INSTRUMENT_IDS} ids"),
                ));
            }
            let tick_e4 = e4(ri.tick).ok_or_else(|| {
                src.invalid(
                    format!("{}.tick", at()),
                    r,
                    "a positive price with at most 4 decimals",
                )
            })?;
            let reference_e4 = match ri.reference_price {
                None => None,
                Some(p) => Some(e4(p).filter(|p| p % tick_e4 == 0).ok_or_else(|| {
                    src.invalid(
                        format!("{}.reference_price", at()),
                        r,
                        "a positive price, a whole number of ticks",
                    )
                })?),
            };
            instruments.push(DeskInstrument {
                ids: set,
                tick_e4,
                reference_e4,
            });
        }
        if instruments.is_empty() {
            return Err(src.invalid(
                key("name"),
                &d.name,
                "a desk needs at least one [[orders.instrument]]",
            ));
        }
        let mut accounts: Vec<AccountLimits> = Vec::new();
        for (j, a) in d.account.iter().enumerate() {
            let ra = a.get_ref();
            let at = |k: &str| key(&format!("account[{j}].{k}"));
            let bad = |k: &str, why: &str| Err(src.invalid(at(k), a, why));
            if ra.name.is_empty() || accounts.iter().any(|x| x.name == ra.name) {
                return bad("name", "account names are unique and not empty");
            }
            if ra.max_quantity < 1 {
                return bad("max_quantity", "at least 1");
            }
            let Some(notional) = e4(ra.max_notional) else {
                return bad("max_notional", "a positive amount with at most 4 decimals");
            };
            let band = ra.price_band.unwrap_or(0.05);
            if !(band > 0.0 && band <= 1.0) {
                return bad(
                    "price_band",
                    "a fraction above 0 and at most 1 (0.05 is 5%)",
                );
            }
            if !(ra.rate > 0.0 && ra.rate <= 1e7) {
                return bad("rate", "orders per second, above 0");
            }
            let burst = ra.burst.unwrap_or((ra.rate.ceil() as i64).max(1));
            if !(1..=10_000_000).contains(&burst) {
                return bad("burst", "between 1 and 10000000");
            }
            if !(1..=10_000_000).contains(&ra.max_open) {
                return bad("max_open", "between 1 and 10000000");
            }
            accounts.push(AccountLimits {
                name: ra.name.clone(),
                max_quantity: ra.max_quantity,
                max_notional_e4: notional as i128,
                price_band_bps: (band * 10_000.0).round() as u32,
                rate: ra.rate,
                burst: burst as u32,
                max_open: ra.max_open as usize,
            });
        }
        let journal = match &d.journal {
            None => None,
            Some(j) => {
                let rj = j.get_ref();
                if rj.dir.is_empty() {
                    return Err(src.invalid(key("journal.dir"), j, "a directory"));
                }
                Some(JournalSettings {
                    dir: PathBuf::from(&rj.dir),
                    segment_size: src.size(
                        || key("journal.segment_size"),
                        &rj.segment_size,
                        64 << 20,
                        4096,
                    )? as u64,
                })
            }
        };
        let feed = match &d.feed {
            None => None,
            Some(f) => Some(crate::feed::feed_index(src, key("feed"), f, feeds)?),
        };
        desks.push(Desk {
            name,
            upstream,
            routes,
            order_path: path("order_path", &d.order_path, "/orders")?,
            cancel_path: path("cancel_path", &d.cancel_path, "/cancels")?,
            feed,
            instruments,
            accounts,
            journal,
            session_in_flight: src.count(
                || key("session_in_flight"),
                &d.session_in_flight,
                64,
                1,
                1 << 16,
            )?,
            account_in_flight: src.count(
                || key("account_in_flight"),
                &d.account_in_flight,
                1024,
                1,
                1 << 20,
            )?,
            upstream_timeout: src.duration(
                || key("upstream_timeout"),
                &d.upstream_timeout,
                Duration::from_secs(5),
            )?,
            retry_backoff: src.duration(
                || key("retry_backoff"),
                &d.retry_backoff,
                Duration::from_millis(200),
            )?,
            remember: src.count(|| key("remember"), &d.remember, 200_000, 2, 1 << 26)?,
            max_payload: src.size(|| key("max_payload"), &d.max_payload, 16 << 10, 64)?,
        });
    }
    Ok(desks)
}

#[cfg(test)]
mod tests {
    use super::e4;

    #[test]
    fn decimals_become_units_of_ten_thousandths() {
        assert_eq!(e4(0.01), Some(100));
        assert_eq!(e4(101.25), Some(1_012_500));
        assert_eq!(e4(1e6), Some(10_000_000_000));
        assert_eq!(e4(0.00001), None);
        assert_eq!(e4(0.12345), None);
        assert_eq!(e4(-1.0), None);
        assert_eq!(e4(0.0), None);
    }
}
