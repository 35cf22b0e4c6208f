//! fluxgate's message codecs: the frame envelope, FlatBuffers market-data ticks and Protobuf
//! orders, with their validation.
//!
//! Sans-IO: no sockets, no tokio, no clock reads, no serde. Parsing works on `BytesMut` and
//! returns "need more bytes" rather than failing on a partial frame; a verified tick and a
//! decoded order keep pointing into the bytes they arrived in (no copy, no allocation per
//! field on the hot path).

pub mod envelope;
pub mod order;
pub mod tick;

/// Code generated from `codecs/schema/` by `scripts/gen-codecs.sh`; do not edit.
#[allow(unsafe_code, clippy::all, unused_imports, dead_code, missing_docs)]
pub mod gen {
    #[path = "market_data_generated.rs"]
    mod market_data;
    pub use market_data::fluxgate::md;

    pub mod orders {
        include!("gen/orders.rs");
    }
}

pub use envelope::{Frame, FrameError, FrameParser, Header, Kind};
pub use order::{
    decode_ack, decode_cancel, decode_order, frame_bare, validate_cancel, InstrumentRule,
    OrderEncoder, OrderError, OrderValidator, ValidCancel, ValidOrder,
};
pub use tick::{TickEncoder, TickError, TickMsg, TickView, VerifiedTick};
