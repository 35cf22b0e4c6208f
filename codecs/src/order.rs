//! Orders: Protobuf `NewOrder` and `CancelOrder` decoded from the frame's bytes (bytes fields
//! point into them), then validated into typed values; `OrderAck`, the gateway's answer.
//! Orders are validated into typed values. Validation never allocates on success; its errors are
//! plain values naming the field or rule at fault.

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};
use prost::Message;

use crate::envelope::{write_frame, Frame, Kind};
use crate::gen::orders::{CancelOrder, NewOrder, OrderAck, OrderType, Side, TimeInForce};

/// The most decimal places a price may carry (after trailing zeros are dropped).
pub const MAX_PRICE_DECIMALS: u32 = 4;
/// Longest client order id and account, in bytes.
pub const MAX_ID_LEN: usize = 32;

/// A field of `NewOrder`, as named in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    ClientOrderId,
    Account,
    Instrument,
    Side,
    Type,
    Price,
    PriceScale,
    Quantity,
    TimeInForce,
    Seq,
    OrigClientOrderId,
}

/// Why an order is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrderError {
    /// The frame carries another kind of message.
    #[error("frame carries {0:?}, not an order")]
    WrongKind(Kind),
    /// The payload is not a valid Protobuf `NewOrder`.
    #[error("payload is not a NewOrder: {0}")]
    Decode(#[from] prost::DecodeError),
    /// A required field is absent.
    #[error("missing required field {0:?}")]
    Missing(Field),
    /// An enum field holds a value the schema does not define (or the unspecified zero).
    #[error("{field:?} has unknown value {value}")]
    UnknownEnum { field: Field, value: i32 },
    /// An id is empty, longer than `MAX_ID_LEN` or not printable ASCII.
    #[error("{0:?} must be 1 to 32 printable ASCII bytes")]
    BadIdentifier(Field),
    /// Quantity is zero or negative.
    #[error("quantity {0} is not positive")]
    NonPositiveQuantity(i64),
    /// A limit price is zero or negative.
    #[error("price {0} is not positive")]
    NonPositivePrice(i64),
    /// A price with more than `MAX_PRICE_DECIMALS` significant decimal places.
    #[error("price {mantissa}e-{scale} has more than 4 decimal places")]
    TooManyDecimals { mantissa: i64, scale: u32 },
    /// A price that is not a whole number of ticks for its instrument.
    #[error("price {price_e4}e-4 is not a multiple of the tick size {tick_e4}e-4")]
    OffTick { price_e4: i64, tick_e4: i64 },
    /// A price too large to express with 4 decimals in 64 bits.
    #[error("price {mantissa}e-{scale} is out of range")]
    PriceOutOfRange { mantissa: i64, scale: u32 },
    /// A market order that names a price.
    #[error("market orders carry no price")]
    PriceOnMarketOrder,
    /// The instrument is not in the allow-list.
    #[error("instrument {0} is not allowed")]
    UnknownInstrument(u32),
    /// The header's routing metadata does not match the payload.
    #[error("header says instrument {header_instrument} seq {header_seq}, payload says {instrument} {seq}")]
    HeaderMismatch {
        header_instrument: u32,
        header_seq: u64,
        instrument: u32,
        seq: u64,
    },
}

/// An order that passed validation: every required field present and in range. The ids are
/// views of the frame's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidOrder {
    pub client_order_id: Bytes,
    pub account: Bytes,
    pub instrument: u32,
    pub side: Side,
    pub order_type: OrderType,
    /// Limit price in units of 10^-4; None for market orders.
    pub price_e4: Option<i64>,
    pub quantity: i64,
    pub time_in_force: TimeInForce,
    pub seq: u64,
    pub client_ts_ns: Option<u64>,
}

/// A cancel that passed validation; the ids are views of the frame's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidCancel {
    pub client_order_id: Bytes,
    pub account: Bytes,
    pub orig_client_order_id: Bytes,
    pub instrument: u32,
    pub seq: u64,
}

/// What the allow-list knows about one instrument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstrumentRule {
    /// Tick size in units of 10^-4 (100 = 0.01). Must be positive.
    pub tick_e4: i64,
}

/// Validates orders against an instrument allow-list.
#[derive(Debug, Clone, Default)]
pub struct OrderValidator {
    instruments: HashMap<u32, InstrumentRule>,
}

/// Decodes the `NewOrder` in an order frame. Bytes fields share the frame's memory.
pub fn decode_order(frame: &Frame) -> Result<NewOrder, OrderError> {
    let h = frame.header();
    if h.kind != Kind::NewOrder {
        return Err(OrderError::WrongKind(h.kind));
    }
    Ok(NewOrder::decode(frame.payload())?)
}

/// Decodes the `CancelOrder` in a cancel frame.
pub fn decode_cancel(frame: &Frame) -> Result<CancelOrder, OrderError> {
    let h = frame.header();
    if h.kind != Kind::CancelOrder {
        return Err(OrderError::WrongKind(h.kind));
    }
    Ok(CancelOrder::decode(frame.payload())?)
}

/// Decodes the `OrderAck` in an acknowledgement frame.
pub fn decode_ack(frame: &Frame) -> Result<OrderAck, OrderError> {
    let h = frame.header();
    if h.kind != Kind::OrderAck {
        return Err(OrderError::WrongKind(h.kind));
    }
    Ok(OrderAck::decode(frame.payload())?)
}

fn header_matches(frame: Option<&Frame>, instrument: u32, seq: u64) -> Result<(), OrderError> {
    if let Some(f) = frame {
        let h = f.header();
        if (h.instrument, h.seq) != (instrument, seq) {
            return Err(OrderError::HeaderMismatch {
                header_instrument: h.instrument,
                header_seq: h.seq,
                instrument,
                seq,
            });
        }
    }
    Ok(())
}

fn require<T>(v: Option<T>, f: Field) -> Result<T, OrderError> {
    v.ok_or(OrderError::Missing(f))
}

fn enum_field<E: TryFrom<i32>>(v: Option<i32>, f: Field) -> Result<E, OrderError> {
    let raw = require(v, f)?;
    // Zero is each enum's UNSPECIFIED: as good as missing.
    match E::try_from(raw) {
        Ok(e) if raw != 0 => Ok(e),
        _ => Err(OrderError::UnknownEnum {
            field: f,
            value: raw,
        }),
    }
}

fn identifier(v: &Option<Bytes>, f: Field) -> Result<Bytes, OrderError> {
    let b = v.as_ref().ok_or(OrderError::Missing(f))?;
    if b.is_empty() || b.len() > MAX_ID_LEN || !b.iter().all(|c| c.is_ascii_graphic()) {
        return Err(OrderError::BadIdentifier(f));
    }
    Ok(b.clone())
}

/// Brings a fixed-point price to units of 10^-4, refusing more than 4 significant decimals.
fn price_e4(mantissa: i64, scale: u32) -> Result<i64, OrderError> {
    let (mut m, mut s) = (mantissa, scale);
    while s > MAX_PRICE_DECIMALS && m % 10 == 0 {
        m /= 10;
        s -= 1;
    }
    if s > MAX_PRICE_DECIMALS {
        return Err(OrderError::TooManyDecimals { mantissa, scale });
    }
    10i64
        .checked_pow(MAX_PRICE_DECIMALS - s)
        .and_then(|f| m.checked_mul(f))
        .ok_or(OrderError::PriceOutOfRange { mantissa, scale })
}

impl OrderValidator {
    /// A validator allowing exactly these instruments.
    pub fn new(instruments: impl IntoIterator<Item = (u32, InstrumentRule)>) -> OrderValidator {
        OrderValidator {
            instruments: instruments.into_iter().collect(),
        }
    }

    /// Checks a decoded order (and, when given, the frame header it came in) and returns its
    /// typed form.
    pub fn validate(&self, o: &NewOrder, frame: Option<&Frame>) -> Result<ValidOrder, OrderError> {
        let client_order_id = identifier(&o.client_order_id, Field::ClientOrderId)?;
        let account = identifier(&o.account, Field::Account)?;
        let instrument = require(o.instrument, Field::Instrument)?;
        let seq = require(o.seq, Field::Seq)?;
        header_matches(frame, instrument, seq)?;
        let side: Side = enum_field(o.side, Field::Side)?;
        let order_type: OrderType = enum_field(o.r#type, Field::Type)?;
        let time_in_force: TimeInForce = enum_field(o.time_in_force, Field::TimeInForce)?;
        let quantity = require(o.quantity, Field::Quantity)?;
        if quantity <= 0 {
            return Err(OrderError::NonPositiveQuantity(quantity));
        }
        let rule = *self
            .instruments
            .get(&instrument)
            .ok_or(OrderError::UnknownInstrument(instrument))?;
        let price_e4 = match order_type {
            OrderType::Market => {
                if o.price_mantissa.is_some() || o.price_scale.is_some() {
                    return Err(OrderError::PriceOnMarketOrder);
                }
                None
            }
            _ => {
                let mantissa = require(o.price_mantissa, Field::Price)?;
                let scale = require(o.price_scale, Field::PriceScale)?;
                if mantissa <= 0 {
                    return Err(OrderError::NonPositivePrice(mantissa));
                }
                let p = price_e4(mantissa, scale)?;
                if p % rule.tick_e4 != 0 {
                    return Err(OrderError::OffTick {
                        price_e4: p,
                        tick_e4: rule.tick_e4,
                    });
                }
                Some(p)
            }
        };
        Ok(ValidOrder {
            client_order_id,
            account,
            instrument,
            side,
            order_type,
            price_e4,
            quantity,
            time_in_force,
            seq,
            client_ts_ns: o.client_ts_ns,
        })
    }
}

/// Checks a decoded cancel (and, when given, the frame header it came in). Its instrument
/// need not be in the allow-list: cancelling is always allowed.
pub fn validate_cancel(c: &CancelOrder, frame: Option<&Frame>) -> Result<ValidCancel, OrderError> {
    let client_order_id = identifier(&c.client_order_id, Field::ClientOrderId)?;
    let account = identifier(&c.account, Field::Account)?;
    let orig_client_order_id = identifier(&c.orig_client_order_id, Field::OrigClientOrderId)?;
    let instrument = require(c.instrument, Field::Instrument)?;
    let seq = require(c.seq, Field::Seq)?;
    header_matches(frame, instrument, seq)?;
    Ok(ValidCancel {
        client_order_id,
        account,
        orig_client_order_id,
        instrument,
        seq,
    })
}

/// Frames a bare `NewOrder` or `CancelOrder` message (an HTTP body), the header's routing
/// metadata taken from the message; one that does not decode is framed with zeros, and its
/// decoder then names the fault.
pub fn frame_bare(kind: Kind, message: &[u8], out: &mut BytesMut) {
    let (instrument, seq) = match kind {
        Kind::CancelOrder => CancelOrder::decode(message).map(|c| (c.instrument, c.seq)),
        _ => NewOrder::decode(message).map(|o| (o.instrument, o.seq)),
    }
    .unwrap_or_default();
    write_frame(
        out,
        kind,
        0,
        instrument.unwrap_or(0),
        seq.unwrap_or(0),
        message,
    );
}

/// Encodes order messages into frames, reusing one scratch buffer.
#[derive(Debug, Default)]
pub struct OrderEncoder {
    scratch: Vec<u8>,
}

impl OrderEncoder {
    pub fn new() -> OrderEncoder {
        OrderEncoder {
            scratch: Vec::with_capacity(128),
        }
    }

    /// Appends one framed order to `out`; the header's routing metadata comes from the order
    /// (zero where absent).
    pub fn encode(&mut self, order: &NewOrder, frame_flags: u16, out: &mut BytesMut) {
        let (instrument, seq) = (order.instrument.unwrap_or(0), order.seq.unwrap_or(0));
        self.message(Kind::NewOrder, order, frame_flags, instrument, seq, out);
    }

    /// Appends one framed cancel to `out`, its header from the cancel.
    pub fn encode_cancel(&mut self, cancel: &CancelOrder, frame_flags: u16, out: &mut BytesMut) {
        let (instrument, seq) = (cancel.instrument.unwrap_or(0), cancel.seq.unwrap_or(0));
        self.message(Kind::CancelOrder, cancel, frame_flags, instrument, seq, out);
    }

    /// Appends one framed acknowledgement to `out`; the header carries the instrument and
    /// the client's sequence number of what it answers.
    pub fn encode_ack(&mut self, ack: &OrderAck, instrument: u32, out: &mut BytesMut) {
        self.message(
            Kind::OrderAck,
            ack,
            0,
            instrument,
            ack.seq.unwrap_or(0),
            out,
        );
    }

    fn message(
        &mut self,
        kind: Kind,
        msg: &impl Message,
        frame_flags: u16,
        instrument: u32,
        seq: u64,
        out: &mut BytesMut,
    ) {
        self.scratch.clear();
        msg.encode(&mut self.scratch)
            .expect("a Vec grows as needed");
        write_frame(out, kind, frame_flags, instrument, seq, &self.scratch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prices_normalise_to_four_decimals() {
        assert_eq!(price_e4(12345, 2), Ok(1_234_500));
        assert_eq!(price_e4(1_234_500_000, 7), Ok(1_234_500));
        assert_eq!(
            price_e4(123_451, 5),
            Err(OrderError::TooManyDecimals {
                mantissa: 123_451,
                scale: 5
            })
        );
        assert!(matches!(
            price_e4(i64::MAX, 0),
            Err(OrderError::PriceOutOfRange { .. })
        ));
    }
}
