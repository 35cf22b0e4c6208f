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
    /// The tick carries no update, or more than one.
    #[error("tick must carry exactly one update")]
    NotOneUpdate,
    /// The header's routing metadata does not match the payload.
    #[error("header says instrument {header_instrument} seq {header_seq}, payload says {instrument} {seq}")]
    HeaderMismatch {
        header_instrument: u32,
        header_seq: u64,
        instrument: u32,
        seq: u64,
    },
}

/// A tick is one table holding one struct: anything deeper or with more tables is hostile. The
/// verifier's apparent size adds up every range it checks (the vtable is looked at more than
/// once), so honest input exceeds its own length a little; four times is ample.
fn verifier_options(payload_len: usize) -> VerifierOptions {
    VerifierOptions {
        max_depth: 2,
        max_tables: 1,
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

/// The update a tick carries, read in place (fixed-layout structs inside the frame's bytes).
#[derive(Debug, Clone, Copy)]
pub enum TickView<'a> {
    Trade(&'a md::Trade),
    Quote(&'a md::Quote),
    BookLevel(&'a md::BookLevel),
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
        let (instrument, seq) = view_of(tick).ok_or(TickError::NotOneUpdate)?.route();
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
        view_of(tick).expect("verify checked there is exactly one update")
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

/// The one update of a tick; None when it has none or several.
fn view_of(tick: md::Tick<'_>) -> Option<TickView<'_>> {
    match (tick.trade(), tick.quote(), tick.book_level()) {
        (Some(t), None, None) => Some(TickView::Trade(t)),
        (None, Some(q), None) => Some(TickView::Quote(q)),
        (None, None, Some(b)) => Some(TickView::BookLevel(b)),
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
    /// Instrument and sequence number.
    pub fn route(&self) -> (u32, u64) {
        match self {
            TickView::Trade(t) => (t.instrument(), t.seq()),
            TickView::Quote(q) => (q.instrument(), q.seq()),
            TickView::BookLevel(b) => (b.instrument(), b.seq()),
        }
    }

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
        let mut args = md::TickArgs::default();
        let (trade, quote, book);
        match msg {
            TickMsg::Trade(t) => {
                trade = md::Trade::new(
                    t.seq,
                    t.price,
                    t.size,
                    t.exchange_ts_ns,
                    t.instrument,
                    t.flags,
                    t.price_scale,
                    t.aggressor,
                );
                args.trade = Some(&trade);
            }
            TickMsg::Quote(q) => {
                quote = md::Quote::new(
                    q.seq,
                    q.bid_price,
                    q.bid_size,
                    q.ask_price,
                    q.ask_size,
                    q.exchange_ts_ns,
                    q.instrument,
                    q.flags,
                    q.price_scale,
                );
                args.quote = Some(&quote);
            }
            TickMsg::BookLevel(b) => {
                book = md::BookLevel::new(
                    b.seq,
                    b.price,
                    b.size,
                    b.exchange_ts_ns,
                    b.instrument,
                    b.flags,
                    b.level,
                    b.price_scale,
                    b.side,
                );
                args.book_level = Some(&book);
            }
        }
        let tick = md::Tick::create(fbb, &args);
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
