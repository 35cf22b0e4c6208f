#!/usr/bin/env bash
# The README's first command, checked: `fluxgate run` with no config answers on 127.0.0.1:8080
# through its built-in upstream on :8081, over HTTP/1.1 and h2c, and exits 0 on SIGTERM.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q -p fluxgate
log=$(mktemp)
"${CARGO_TARGET_DIR:-target}/debug/fluxgate" run >"$log" 2>&1 & pid=$!
trap 'kill $pid 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 50); do grep -q "accepting through" "$log" && break; sleep 0.1; done
body=$(curl -sS --max-time 5 http://127.0.0.1:8080/)
h2=$(curl -sS --max-time 5 --http2-prior-knowledge -o /dev/null -w '%{http_version}' http://127.0.0.1:8080/)
kill -TERM $pid; rc=0; wait $pid || rc=$?
trap 'rm -f "$log"' EXIT
[ "$body" = "hello from fluxgate" ] || { echo "smoke: unexpected body: $body"; cat "$log"; exit 1; }
[ "$h2" = 2 ] || { echo "smoke: h2c answered with HTTP/$h2"; exit 1; }
[ $rc = 0 ] || { echo "smoke: exit $rc on SIGTERM"; exit 1; }
echo "smoke: ok ($(grep -o 'accepting through.*' "$log"))"
