//! `[[feed]]`: a market-data feed the gateway fans out. Publishers send envelope frames of
//! ticks (a `mode = "feed"` listener with `role = "publish"`, or a WebSocket route with
//! `feed = { name, role = "publish" }`); subscribers receive them (a `role = "subscribe"`
//! listener, or a route: WebSocket, or a streaming HTTP response on any HTTP version).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::{ConfError, RawSize, Source};

/// One feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Feed {
    pub name: String,
    /// What a subscriber whose queue is full gets. Default conflate.
    pub slow_consumer: SlowConsumer,
    /// Messages queued for one subscriber past which the policy applies. Default 4096.
    pub queue_messages: usize,
    /// Bytes queued for one subscriber past which the policy applies. Default 4 MiB.
    pub queue_bytes: usize,
    /// Ticks kept per instrument for subscribers that resume after a disconnect. Default 1024.
    pub replay: usize,
    /// Largest tick payload taken from a publisher; a larger frame closes the publisher.
    /// Default 64 KiB.
    pub max_payload: usize,
    /// Instruments the feed keeps state for; a tick of one more is refused. Default 100000.
    pub max_instruments: usize,
    /// A subscriber sent nothing for this long gets a heartbeat. Default 5 s.
    pub heartbeat: Duration,
    /// No tick from any publisher for this long raises the stale alarm. Default 10 s.
    pub stale_after: Duration,
    /// `[feed.groups]`: names for instrument sets, used as `@name` in patterns.
    pub groups: BTreeMap<String, InstrumentSet>,
    /// `[[feed.entitle]]`: when any is given, a subscriber must present one of these
    /// identities, a key (the `api_key_header` on HTTP, `auth KEY` on a raw TCP
    /// subscription) or a client certificate (its common name), and may only receive its
    /// instruments. Default: none, every subscriber may receive everything.
    pub entitle: Vec<Entitlement>,
    /// The request header carrying a subscriber's key. Default `x-api-key`.
    pub api_key_header: http::HeaderName,
    /// `[feed.nats]`: ticks also taken from a NATS subject. Default: none.
    pub nats: Option<NatsIngest>,
}

/// `[feed.nats]`: the feed subscribes to `subject` on a NATS server and ingests each
/// message's payload (one or more envelope frames) as a publisher's, so several gateways fan
/// out one feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsIngest {
    /// `nats://IP:PORT` (or `IP:PORT`).
    pub address: std::net::SocketAddr,
    /// The subject or pattern (`*` a token, `>` the rest) subscribed to.
    pub subject: String,
    /// Wait between connection attempts while the server is unreachable. Default 1 s.
    pub reconnect: Duration,
}

/// What happens to a subscriber that is behind (its writer still sending an earlier batch):
/// to its queued messages, and when its queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlowConsumer {
    /// A queued quote or book level is replaced by the newer one of the same instrument (and
    /// side and level); trades are never conflated. Still full: disconnect.
    Conflate,
    /// The oldest queued message is dropped, counted, and the subscriber told how many.
    DropOldest,
    /// The subscriber is sent the reason and cut off (as NATS does).
    Disconnect,
}

/// A key and the instruments it may receive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entitlement {
    /// An API key (the `api_key_header` on HTTP, `auth KEY` on raw TCP).
    pub key: Option<String>,
    /// Or the subject common name of a client certificate verified by the listener's
    /// `client_ca` (`[listener.tls]`).
    pub client_cn: Option<String>,
    pub instruments: InstrumentSet,
}

/// A set of instrument ids: single ids, inclusive ranges, or everything.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InstrumentSet {
    /// Sorted, inclusive ranges.
    ranges: Vec<(u32, u32)>,
}

impl InstrumentSet {
    /// Every instrument.
    pub fn all() -> InstrumentSet {
        InstrumentSet {
            ranges: vec![(0, u32::MAX)],
        }
    }

    pub fn contains(&self, id: u32) -> bool {
        // Few ranges in practice: a linear scan beats a search.
        self.ranges.iter().any(|&(a, b)| a <= id && id <= b)
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// How many ids it holds.
    pub fn len(&self) -> u64 {
        self.ranges.iter().map(|&(a, b)| u64::from(b - a) + 1).sum()
    }

    /// Its inclusive ranges, in order.
    pub fn ranges(&self) -> &[(u32, u32)] {
        &self.ranges
    }

    /// The ids in both.
    pub fn intersect(&self, other: &InstrumentSet) -> InstrumentSet {
        let mut out = InstrumentSet::default();
        for &(a, b) in &self.ranges {
            for &(c, d) in &other.ranges {
                let (lo, hi) = (a.max(c), b.min(d));
                if lo <= hi {
                    out.add(lo, hi);
                }
            }
        }
        out
    }

    /// The ids in either.
    pub fn union(&mut self, other: &InstrumentSet) {
        for &(a, b) in &other.ranges {
            self.add(a, b);
        }
    }

    /// The ids in `self` and not in `other`.
    pub fn remove(&mut self, other: &InstrumentSet) {
        let mut out = Vec::new();
        for &(a, b) in &self.ranges {
            let mut pieces = vec![(a, b)];
            for &(c, d) in &other.ranges {
                pieces = pieces
                    .into_iter()
                    .flat_map(|(x, y)| {
                        let mut keep = Vec::new();
                        if d < x || c > y {
                            keep.push((x, y));
                        } else {
                            if c > x {
                                keep.push((x, c - 1));
                            }
                            if d < y {
                                keep.push((d + 1, y));
                            }
                        }
                        keep
                    })
                    .collect();
            }
            out.extend(pieces);
        }
        self.ranges = out;
    }

    fn add(&mut self, a: u32, b: u32) {
        self.ranges.push((a, b));
        self.ranges.sort_unstable();
        let mut merged: Vec<(u32, u32)> = Vec::with_capacity(self.ranges.len());
        for &(x, y) in &self.ranges {
            match merged.last_mut() {
                Some(last) if x <= last.1.saturating_add(1) => last.1 = last.1.max(y),
                _ => merged.push((x, y)),
            }
        }
        self.ranges = merged;
    }

    /// Parses patterns: `42`, `100-199`, `*`, or `@group` (a name of `groups`), each alone
    /// or comma-separated in one string.
    pub fn parse<'a>(
        patterns: impl IntoIterator<Item = &'a str>,
        groups: &BTreeMap<String, InstrumentSet>,
    ) -> Result<InstrumentSet, String> {
        let mut set = InstrumentSet::default();
        for p in patterns.into_iter().flat_map(|p| p.split(',')) {
            let p = p.trim();
            if p == "*" {
                set.add(0, u32::MAX);
            } else if let Some(name) = p.strip_prefix('@') {
                let g = groups
                    .get(name)
                    .ok_or_else(|| format!("no instrument group named {name:?}"))?;
                set.union(g);
            } else if let Some((a, b)) = p.split_once('-') {
                let (a, b) = (id(a)?, id(b)?);
                if a > b {
                    return Err(format!("range {p:?} runs backwards"));
                }
                set.add(a, b);
            } else if !p.is_empty() {
                let n = id(p)?;
                set.add(n, n);
            }
        }
        Ok(set)
    }
}

fn id(s: &str) -> Result<u32, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("{s:?} is not an instrument id, range, `*` or `@group`"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFeed {
    name: Spanned<String>,
    slow_consumer: Option<Spanned<String>>,
    queue_messages: Option<Spanned<i64>>,
    queue_bytes: Option<Spanned<RawSize>>,
    replay: Option<Spanned<i64>>,
    max_payload: Option<Spanned<RawSize>>,
    max_instruments: Option<Spanned<i64>>,
    heartbeat: Option<Spanned<String>>,
    stale_after: Option<Spanned<String>>,
    #[serde(default)]
    groups: BTreeMap<String, Spanned<Vec<String>>>,
    #[serde(default)]
    entitle: Vec<Spanned<RawEntitlement>>,
    api_key_header: Option<Spanned<String>>,
    nats: Option<Spanned<RawNats>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNats {
    url: Spanned<String>,
    subject: Spanned<String>,
    reconnect: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntitlement {
    key: Option<String>,
    client_cn: Option<String>,
    instruments: Vec<String>,
}

pub(crate) fn build(src: &Source<'_>, raw: &[RawFeed]) -> Result<Vec<Feed>, ConfError> {
    let mut feeds: Vec<Feed> = Vec::with_capacity(raw.len());
    for (i, f) in raw.iter().enumerate() {
        let key = |k: &str| format!("feed[{i}].{k}");
        let name = f.name.get_ref().clone();
        if name.is_empty() || feeds.iter().any(|x| x.name == name) {
            return Err(src.invalid(key("name"), &f.name, "feed names are unique and not empty"));
        }
        let slow_consumer = match f.slow_consumer.as_ref().map(|s| s.get_ref().as_str()) {
            None | Some("conflate") => SlowConsumer::Conflate,
            Some("drop_oldest") => SlowConsumer::DropOldest,
            Some("disconnect") => SlowConsumer::Disconnect,
            Some(other) => {
                return Err(src.invalid(
                    key("slow_consumer"),
                    f.slow_consumer.as_ref().expect("set"),
                    format!("{other:?}: conflate, drop_oldest or disconnect"),
                ))
            }
        };
        // Groups may name groups defined before them (in name order), never themselves.
        let mut groups = BTreeMap::new();
        for (g, patterns) in &f.groups {
            let set = InstrumentSet::parse(patterns.get_ref().iter().map(String::as_str), &groups)
                .map_err(|e| src.invalid(key(&format!("groups.{g}")), patterns, e))?;
            groups.insert(g.clone(), set);
        }
        let mut entitle = Vec::new();
        for (j, e) in f.entitle.iter().enumerate() {
            let r = e.get_ref();
            match (&r.key, &r.client_cn) {
                (Some(k), None) if k.is_empty() || http::HeaderValue::from_str(k).is_err() => {
                    return Err(src.invalid(
                        key(&format!("entitle[{j}].key")),
                        e,
                        "a key is a non-empty header value",
                    ));
                }
                (None, Some(cn)) if cn.is_empty() => {
                    return Err(src.invalid(
                        key(&format!("entitle[{j}].client_cn")),
                        e,
                        "a client certificate's common name is not empty",
                    ));
                }
                (Some(_), None) | (None, Some(_)) => {}
                _ => {
                    return Err(src.invalid(
                        key(&format!("entitle[{j}]")),
                        e,
                        "an entitlement names one identity: `key` or `client_cn`",
                    ));
                }
            }
            let instruments =
                InstrumentSet::parse(r.instruments.iter().map(String::as_str), &groups)
                    .map_err(|m| src.invalid(key(&format!("entitle[{j}].instruments")), e, m))?;
            entitle.push(Entitlement {
                key: r.key.clone(),
                client_cn: r.client_cn.clone(),
                instruments,
            });
        }
        let api_key_header = match &f.api_key_header {
            None => http::HeaderName::from_static("x-api-key"),
            Some(h) => http::HeaderName::from_bytes(h.get_ref().as_bytes())
                .map_err(|_| src.invalid(key("api_key_header"), h, "not a header name"))?,
        };
        let nats = match &f.nats {
            None => None,
            Some(n) => {
                let r = n.get_ref();
                let url = r.url.get_ref();
                let bare = url.strip_prefix("nats://").unwrap_or(url);
                let address = bare.parse().map_err(|_| {
                    src.invalid(
                        key("nats.url"),
                        &r.url,
                        format!("{url:?} is not nats://IP:PORT"),
                    )
                })?;
                if !fluxgate_wire::nats::valid_subject(r.subject.get_ref(), true) {
                    return Err(src.invalid(
                        key("nats.subject"),
                        &r.subject,
                        "a subject is dot-separated tokens (`*` a token, `>` the last)",
                    ));
                }
                Some(NatsIngest {
                    address,
                    subject: r.subject.get_ref().clone(),
                    reconnect: src.duration(
                        || key("nats.reconnect"),
                        &r.reconnect,
                        Duration::from_secs(1),
                    )?,
                })
            }
        };
        feeds.push(Feed {
            name,
            slow_consumer,
            queue_messages: src.count(
                || key("queue_messages"),
                &f.queue_messages,
                4096,
                1,
                1 << 24,
            )?,
            queue_bytes: src.size(|| key("queue_bytes"), &f.queue_bytes, 4 << 20, 1024)?,
            replay: src.count(|| key("replay"), &f.replay, 1024, 0, 1 << 20)?,
            max_payload: src.size(|| key("max_payload"), &f.max_payload, 64 << 10, 64)?,
            max_instruments: src.count(
                || key("max_instruments"),
                &f.max_instruments,
                100_000,
                1,
                1 << 24,
            )?,
            heartbeat: src.duration(|| key("heartbeat"), &f.heartbeat, Duration::from_secs(5))?,
            stale_after: src.duration(
                || key("stale_after"),
                &f.stale_after,
                Duration::from_secs(10),
            )?,
            groups,
            entitle,
            api_key_header,
            nats,
        });
    }
    Ok(feeds)
}

/// The feed a listener or route names.
pub(crate) fn feed_index(
    src: &Source<'_>,
    key: String,
    name: &Spanned<String>,
    feeds: &[Feed],
) -> Result<usize, ConfError> {
    feeds
        .iter()
        .position(|f| &f.name == name.get_ref())
        .ok_or_else(|| src.invalid(key, name, format!("no [[feed]] named {:?}", name.get_ref())))
}

/// What a connection does with a feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedRole {
    Publish,
    Subscribe,
}

/// `feed = { name = "..", role = "publish" | "subscribe" }` on a route, or `feed` and
/// `role` on a `mode = "feed"` listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeedEndpoint {
    /// Index into `Config::feeds`.
    pub feed: usize,
    pub role: FeedRole,
}

pub(crate) fn role(
    src: &Source<'_>,
    key: String,
    role: Option<&Spanned<String>>,
) -> Result<FeedRole, ConfError> {
    match role.map(|r| r.get_ref().as_str()) {
        None | Some("subscribe") => Ok(FeedRole::Subscribe),
        Some("publish") => Ok(FeedRole::Publish),
        Some(other) => Err(src.invalid(
            key,
            role.expect("set"),
            format!("{other:?}: publish or subscribe"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_parse_and_match() {
        let mut groups = BTreeMap::new();
        groups.insert(
            "tech".to_owned(),
            InstrumentSet::parse(["1-3", "9"], &groups).unwrap(),
        );
        let s = InstrumentSet::parse(["@tech,20-22", "5"], &groups).unwrap();
        for id in [1, 2, 3, 5, 9, 20, 21, 22] {
            assert!(s.contains(id), "{id}");
        }
        for id in [0, 4, 6, 8, 10, 19, 23] {
            assert!(!s.contains(id), "{id}");
        }
        assert!(InstrumentSet::parse(["*"], &groups)
            .unwrap()
            .contains(u32::MAX));
        assert!(InstrumentSet::parse(["@nope"], &groups).is_err());
        assert!(InstrumentSet::parse(["5-1"], &groups).is_err());
        assert!(InstrumentSet::parse(["x"], &groups).is_err());
        let mut all = InstrumentSet::all();
        all.remove(&InstrumentSet::parse(["10-20"], &groups).unwrap());
        assert!(all.contains(9) && !all.contains(10) && !all.contains(20) && all.contains(21));
        let both = s.intersect(&InstrumentSet::parse(["2-21"], &groups).unwrap());
        assert!(both.contains(2) && both.contains(21) && !both.contains(1) && !both.contains(22));
    }
}
