#!/usr/bin/env bash
# A bounded smoke run of every cargo-fuzz target (fuzz/), starting from the committed seed
# corpus. New inputs go to a scratch directory, not the committed corpus. cargo fuzz needs
# nightly features; RUSTC_BOOTSTRAP=1 enables them on the stable toolchain.
# Usage: scripts/fuzz-smoke.sh [RUNS]   (default 200000 per target)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-200000}
command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked cargo-fuzz
export RUSTC_BOOTSTRAP=1
scratch=$(mktemp -d); trap 'rm -rf "$scratch"' EXIT
cd fuzz
for t in envelope tick_verify order_decode h1_request_head h1_response_head h1_chunked h2_frame hpack config route_match proxy_protocol ws_frame; do
  mkdir -p "$scratch/$t"
  if ! cargo fuzz run "$t" "$scratch/$t" "corpus/$t" -- -runs="$RUNS" -max_total_time=60 \
      -print_final_stats=1 >"$scratch/$t.log" 2>&1; then
    tail -40 "$scratch/$t.log"
    echo "fuzz-smoke: $t FAILED"
    exit 1
  fi
  echo "fuzz-smoke: $t ok ($(grep -o 'stat::number_of_executed_units: [0-9]*' "$scratch/$t.log"))"
done
