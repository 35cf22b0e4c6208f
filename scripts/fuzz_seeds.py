#!/usr/bin/env python3
"""Writes the committed seed corpus under fuzz/corpus/ from the Python-encoded frames that
scripts/interop.sh produces (target/interop/frames.bin): whole frames and frame streams for
`envelope`, instrument+seq+payload for `tick_verify`, payloads for `order_decode`."""
import hashlib
import os
import struct
import sys

root = os.path.join(os.path.dirname(__file__), "..")
data = open(os.path.join(root, "target/interop/frames.bin"), "rb").read()
frames = []
i = 0
while i < len(data):
    _, _, kind, _, _, n, instrument, seq = struct.unpack_from("<2sBBHHIIQ", data, i)
    frames.append((kind, instrument, seq, data[i:i + 24 + n], data[i + 24:i + 24 + n]))
    i += 24 + n


def put(target, blob):
    d = os.path.join(root, "fuzz/corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, hashlib.sha1(blob).hexdigest()[:16]), "wb") as f:
        f.write(blob)


ticks = [f for f in frames if f[0] == 1][:12]
orders = [f for f in frames if f[0] == 2][:6]
for kind, instrument, seq, whole, payload in ticks + orders:
    put("envelope", b"\x07" + whole)
    if kind == 1:
        put("tick_verify", struct.pack("<IQ", instrument, seq) + payload)
    else:
        put("order_decode", payload)
put("envelope", b"\x05" + b"".join(f[3] for f in frames[:8]))
print("seeds written", file=sys.stderr)
