#!/usr/bin/env python3
"""Encodes ticks (flatbuffers package) and orders (protobuf package) with code generated from
codecs/schema/, wraps each in fluxgate's frame envelope, and writes the stream plus a plain
list of the values encoded, one message per line, for codecs/tests/interop.rs to compare."""
import random
import struct
import sys

import flatbuffers
from fluxgate.md import BookLevel, Quote, Tick, Trade
import orders_pb2

HEADER = struct.Struct("<2sBBHHIIQ")  # magic, version, kind, flags, reserved, len, instrument, seq
KIND_TICK, KIND_ORDER, KIND_CANCEL, KIND_ACK = 1, 2, 4, 5


def frame(kind, instrument, seq, payload):
    return HEADER.pack(b"FG", 1, kind, 0, 0, len(payload), instrument, seq) + payload


def tick(b, add, struct_offset_fn):
    """Finishes a Tick holding one struct update (structs are built inline in the table)."""
    Tick.TickStart(b)
    add(b, struct_offset_fn())
    b.Finish(Tick.TickEnd(b))
    return bytes(b.Output())


def trade(rng):
    v = dict(instrument=rng.randrange(1 << 32), seq=rng.randrange(1 << 64),
             price=rng.randrange(-(1 << 63), 1 << 63), size=rng.randrange(1 << 40),
             scale=rng.randrange(10), aggressor=rng.randrange(3),
             ts=rng.randrange(1 << 64), flags=rng.randrange(1 << 32))
    b = flatbuffers.Builder(128)
    payload = tick(b, Tick.TickAddTrade, lambda: Trade.CreateTrade(
        b, v["seq"], v["price"], v["size"], v["ts"], v["instrument"], v["flags"], v["scale"],
        v["aggressor"]))
    line = "trade {instrument} {seq} {price} {size} {scale} {aggressor} {ts} {flags}".format(**v)
    return frame(KIND_TICK, v["instrument"], v["seq"], payload), line


def quote(rng):
    v = dict(instrument=rng.randrange(1 << 32), seq=rng.randrange(1 << 64),
             bp=rng.randrange(1 << 40), bs=rng.randrange(1 << 40), ap=rng.randrange(1 << 40),
             az=rng.randrange(1 << 40), scale=rng.randrange(10), ts=rng.randrange(1 << 64),
             flags=rng.randrange(1 << 32))
    b = flatbuffers.Builder(128)
    payload = tick(b, Tick.TickAddQuote, lambda: Quote.CreateQuote(
        b, v["seq"], v["bp"], v["bs"], v["ap"], v["az"], v["ts"], v["instrument"], v["flags"],
        v["scale"]))
    line = "quote {instrument} {seq} {bp} {bs} {ap} {az} {scale} {ts} {flags}".format(**v)
    return frame(KIND_TICK, v["instrument"], v["seq"], payload), line


def book(rng):
    v = dict(instrument=rng.randrange(1 << 32), seq=rng.randrange(1 << 64),
             side=rng.randrange(3), level=rng.randrange(1 << 16), price=rng.randrange(1 << 40),
             size=rng.randrange(1 << 40), scale=rng.randrange(10), ts=rng.randrange(1 << 64),
             flags=rng.randrange(1 << 32))
    b = flatbuffers.Builder(128)
    payload = tick(b, Tick.TickAddBookLevel, lambda: BookLevel.CreateBookLevel(
        b, v["seq"], v["price"], v["size"], v["ts"], v["instrument"], v["flags"], v["level"],
        v["scale"], v["side"]))
    line = "book {instrument} {seq} {side} {level} {price} {size} {scale} {ts} {flags}".format(**v)
    return frame(KIND_TICK, v["instrument"], v["seq"], payload), line


def order(rng):
    """A valid limit order for instrument 1 (tick 0.05) or 2 (tick 0.0001)."""
    instrument = rng.choice([1, 2])
    tick_e4 = 500 if instrument == 1 else 1
    price_e4 = tick_e4 * rng.randrange(1, 1_000_000)
    o = orders_pb2.NewOrder(
        client_order_id=f"py-{rng.randrange(10**9)}".encode(),
        account=b"acct-py",
        instrument=instrument,
        side=rng.choice([orders_pb2.SIDE_BUY, orders_pb2.SIDE_SELL]),
        type=orders_pb2.ORDER_TYPE_LIMIT,
        price_mantissa=price_e4,
        price_scale=4,
        quantity=rng.randrange(1, 10_000),
        time_in_force=rng.choice([orders_pb2.TIME_IN_FORCE_DAY, orders_pb2.TIME_IN_FORCE_IOC]),
        seq=rng.randrange(1 << 64),
    )
    line = (f"order {o.client_order_id.decode()} {o.account.decode()} {o.instrument} {o.side} "
            f"{o.type} {price_e4} {o.quantity} {o.time_in_force} {o.seq}")
    return frame(KIND_ORDER, o.instrument, o.seq, o.SerializeToString()), line


def cancel(rng):
    c = orders_pb2.CancelOrder(
        client_order_id=f"cx-{rng.randrange(10**9)}".encode(),
        account=b"acct-py",
        orig_client_order_id=f"py-{rng.randrange(10**9)}".encode(),
        instrument=rng.choice([1, 2]),
        seq=rng.randrange(1 << 64),
    )
    line = (f"cancel {c.client_order_id.decode()} {c.account.decode()} "
            f"{c.orig_client_order_id.decode()} {c.instrument} {c.seq}")
    return frame(KIND_CANCEL, c.instrument, c.seq, c.SerializeToString()), line


def ack(rng):
    """An acknowledgement as an order service's client would read it: every field set."""
    a = orders_pb2.OrderAck(
        client_order_id=f"py-{rng.randrange(10**9)}".encode(),
        account=b"acct-py",
        status=rng.choice([orders_pb2.ACK_STATUS_ACCEPTED, orders_pb2.ACK_STATUS_REJECTED,
                           orders_pb2.ACK_STATUS_UPSTREAM_ACCEPTED]),
        reason=rng.choice([orders_pb2.REJECT_REASON_PRICE_BAND, orders_pb2.REJECT_REASON_RATE_LIMIT]),
        text=f"why-{rng.randrange(1000)}",
        upstream_status=rng.choice([200, 409]),
        upstream_body=f"body-{rng.randrange(1000)}".encode(),
        seq=rng.randrange(1 << 64),
    )
    line = (f"ack {a.client_order_id.decode()} {a.status} {a.reason} {a.text} "
            f"{a.upstream_status} {a.upstream_body.decode()} {a.seq}")
    return frame(KIND_ACK, 3, a.seq, a.SerializeToString()), line


def main():
    rng = random.Random(20261121)
    makers = [trade, quote, book, order, cancel, ack]
    frames, lines = [], []
    for i in range(600):
        f, line = makers[i % 6](rng)
        frames.append(f)
        lines.append(line)
    with open(sys.argv[1], "wb") as out:
        out.write(b"".join(frames))
    with open(sys.argv[2], "w") as out:
        out.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
