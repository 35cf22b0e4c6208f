//! Market-data ticks: verified once, then read in place and handed on by reference.

use bytes::{Bytes, BytesMut};
use flatbuffers::{FlatBufferBuilder, VerifierOptions};

use crate::envelope::{write_frame, Frame, Kind};
use crate::gen::md;

pub use md::Side;

/// Why a frame is not an acceptable tick.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TickError {
    /// The frame carries another kind of message.
    #[error("frame carries {0:?}, not a tick")]
    WrongKind(Kind),
    /// The FlatBuffers verifier refused the payload (out of bounds, too deep, too many tables).
    #[error("payload is not a valid Tick: {0}")]
    Invalid(#[from] flatbuffers::InvalidFlatbuffer),
    /// The tick has no update, or an update type this build does not know.
    #[error("tick has no known update")]
    NoUpdate,
    /// The header's routing metadata does not match the payload.
    #[error("header says instrument {header_instrument} seq {header_seq}, payload says {instrument} {seq}")]
    HeaderMismatch {
        header_instrument: u32,
        header_seq: u64,
        instrument: u32,
        seq: u64,
    },
}

/// A tick is a handful of scalars in two tables: anything deeper or larger is hostile. The
/// apparent size counts every table and vtable visited, so it may exceed the payload a little
/// even for honest input; four times the payload leaves no room for overlap tricks.
fn verifier_options(payload_len: usize) -> VerifierOptions {
    VerifierOptions {
        max_depth: 4,
        max_tables: 4,
        max_apparent_size: payload_len * 4,
        ignore_missing_null_terminator: false,
    }
}

/// A tick whose payload has been verified. It owns the frame's bytes; reading fields does not
/// verify again and does not copy.
#[derive(Debug, Clone)]
pub struct VerifiedTick {
    frame: Frame,
}

/// The update a tick carries, read in place.
#[derive(Debug, Clone, Copy)]
pub enum TickView<'a> {
    Trade(md::Trade<'a>),
    Quote(md::Quote<'a>),
    BookLevel(md::BookLevel<'a>),
}

impl VerifiedTick {
    /// Verifies the payload once with tight limits and checks the header's routing metadata
    /// against it.
    pub fn verify(frame: Frame) -> Result<VerifiedTick, TickError> {
        let h = *frame.header();
        if h.kind != Kind::Tick {
            return Err(TickError::WrongKind(h.kind));
        }
        let payload = frame.payload_slice();
        let tick = md::root_as_tick_with_opts(&verifier_options(payload.len()), payload)?;
        let (instrument, seq) = route_of(tick).ok_or(TickError::NoUpdate)?;
        if (instrument, seq) != (h.instrument, h.seq) {
            return Err(TickError::HeaderMismatch {
                header_instrument: h.instrument,
                header_seq: h.seq,
                instrument,
                seq,
            });
        }
        Ok(VerifiedTick { frame })
    }

    /// The update, read without verifying again.
    pub fn view(&self) -> TickView<'_> {
        // SAFETY: `verify` ran the FlatBuffers verifier over exactly these bytes, which are
        // immutable (Bytes) for as long as `self` lives, and found a known update.
        #[allow(unsafe_code)]
        let tick = unsafe { md::root_as_tick_unchecked(self.frame.payload_slice()) };
        match tick.update_type() {
            md::Update::Trade => TickView::Trade(tick.update_as_trade().expect("verified")),
            md::Update::Quote => TickView::Quote(tick.update_as_quote().expect("verified")),
            _ => TickView::BookLevel(tick.update_as_book_level().expect("verified")),
        }
    }

    /// Instrument id, from the header (checked against the payload).
    pub fn instrument(&self) -> u32 {
        self.frame.header().instrument
    }

    /// Sequence number, from the header (checked against the payload).
    pub fn seq(&self) -> u64 {
        self.frame.header().seq
    }

    /// The whole frame to hand to subscribers: a reference-counted view of the bytes it was
    /// received in, never a copy.
    pub fn shared_frame(&self) -> Bytes {
        self.frame.bytes().clone()
    }

    /// The payload alone, also shared.
    pub fn payload(&self) -> Bytes {
        self.frame.payload()
    }
}

fn route_of(tick: md::Tick<'_>) -> Option<(u32, u64)> {
    match tick.update_type() {
        md::Update::Trade => tick.update_as_trade().map(|t| (t.instrument(), t.seq())),
        md::Update::Quote => tick.update_as_quote().map(|q| (q.instrument(), q.seq())),
        md::Update::BookLevel => tick
            .update_as_book_level()
            .map(|b| (b.instrument(), b.seq())),
        _ => None,
    }
}

/// A trade, as plain values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Trade {
    pub instrument: u32,
    pub seq: u64,
    pub price: i64,
    pub size: i64,
    pub price_scale: u8,
    pub aggressor: Side,
    pub exchange_ts_ns: u64,
    pub flags: u32,
}

/// A top-of-book quote, as plain values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Quote {
    pub instrument: u32,
    pub seq: u64,
    pub bid_price: i64,
    pub bid_size: i64,
    pub ask_price: i64,
    pub ask_size: i64,
    pub price_scale: u8,
    pub exchange_ts_ns: u64,
    pub flags: u32,
}

/// One book level update, as plain values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BookLevel {
    pub instrument: u32,
    pub seq: u64,
    pub side: Side,
    pub level: u16,
    pub price: i64,
    pub size: i64,
    pub price_scale: u8,
    pub exchange_ts_ns: u64,
    pub flags: u32,
}

/// Any tick update, as plain values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TickMsg {
    Trade(Trade),
    Quote(Quote),
    BookLevel(BookLevel),
}

impl TickMsg {
    fn route(&self) -> (u32, u64) {
        match self {
            TickMsg::Trade(t) => (t.instrument, t.seq),
            TickMsg::Quote(q) => (q.instrument, q.seq),
            TickMsg::BookLevel(b) => (b.instrument, b.seq),
        }
    }
}

impl TickView<'_> {
    /// Copies the fields out into plain values.
    pub fn to_msg(&self) -> TickMsg {
        match *self {
            TickView::Trade(t) => TickMsg::Trade(Trade {
                instrument: t.instrument(),
                seq: t.seq(),
                price: t.price(),
                size: t.size(),
                price_scale: t.price_scale(),
                aggressor: t.aggressor(),
                exchange_ts_ns: t.exchange_ts_ns(),
                flags: t.flags(),
            }),
            TickView::Quote(q) => TickMsg::Quote(Quote {
                instrument: q.instrument(),
                seq: q.seq(),
                bid_price: q.bid_price(),
                bid_size: q.bid_size(),
                ask_price: q.ask_price(),
                ask_size: q.ask_size(),
                price_scale: q.price_scale(),
                exchange_ts_ns: q.exchange_ts_ns(),
                flags: q.flags(),
            }),
            TickView::BookLevel(b) => TickMsg::BookLevel(BookLevel {
                instrument: b.instrument(),
                seq: b.seq(),
                side: b.side(),
                level: b.level(),
                price: b.price(),
                size: b.size(),
                price_scale: b.price_scale(),
                exchange_ts_ns: b.exchange_ts_ns(),
                flags: b.flags(),
            }),
        }
    }
}

/// Encodes ticks into frames, reusing one FlatBuffers builder.
#[derive(Default)]
pub struct TickEncoder {
    fbb: FlatBufferBuilder<'static>,
}

impl TickEncoder {
    pub fn new() -> TickEncoder {
        TickEncoder {
            fbb: FlatBufferBuilder::with_capacity(256),
        }
    }

    /// Appends one framed tick to `out`.
    pub fn encode(&mut self, msg: &TickMsg, frame_flags: u16, out: &mut BytesMut) {
        let fbb = &mut self.fbb;
        fbb.reset();
        let (kind, update) = match msg {
            TickMsg::Trade(t) => (
                md::Update::Trade,
                md::Trade::create(
                    fbb,
                    &md::TradeArgs {
                        instrument: t.instrument,
                        seq: t.seq,
                        price: t.price,
                        size: t.size,
                        price_scale: t.price_scale,
                        aggressor: t.aggressor,
                        exchange_ts_ns: t.exchange_ts_ns,
                        flags: t.flags,
                    },
                )
                .as_union_value(),
            ),
            TickMsg::Quote(q) => (
                md::Update::Quote,
                md::Quote::create(
                    fbb,
                    &md::QuoteArgs {
                        instrument: q.instrument,
                        seq: q.seq,
                        bid_price: q.bid_price,
                        bid_size: q.bid_size,
                        ask_price: q.ask_price,
                        ask_size: q.ask_size,
                        price_scale: q.price_scale,
                        exchange_ts_ns: q.exchange_ts_ns,
                        flags: q.flags,
                    },
                )
                .as_union_value(),
            ),
            TickMsg::BookLevel(b) => (
                md::Update::BookLevel,
                md::BookLevel::create(
                    fbb,
                    &md::BookLevelArgs {
                        instrument: b.instrument,
                        seq: b.seq,
                        side: b.side,
                        level: b.level,
                        price: b.price,
                        size: b.size,
                        price_scale: b.price_scale,
                        exchange_ts_ns: b.exchange_ts_ns,
                        flags: b.flags,
                    },
                )
                .as_union_value(),
            ),
        };
        let tick = md::Tick::create(
            fbb,
            &md::TickArgs {
                update_type: kind,
                update: Some(update),
            },
        );
        fbb.finish(tick, None);
        let (instrument, seq) = msg.route();
        write_frame(
            out,
            Kind::Tick,
            frame_flags,
            instrument,
            seq,
            fbb.finished_data(),
        );
    }
}
