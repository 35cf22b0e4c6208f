#!/usr/bin/env bash
# Order entry through one worker, with the journal on (group commit, fdatasync) and off, in
# one run: one raw TCP order session (benches/src/bin/orders-load.rs) and the order service
# it delivers to (an HTTP/1.1 server in the same tool), the tool pinned to CPU 0 and fluxgate
# to CPU 1. The journal lives in a directory under target/ (the repository's disk).
# 1. Peak: as many orders as a window of 512 in flight allows (WINDOW=), for SECONDS: orders/s
#    answered end to end (accepted, delivered, the service's answer relayed), and the
#    acceptance latency p50 / p99 (order sent to its first acknowledgement).
# 2. Open loop at RATE orders/s (default 10,000): acceptance latency p50 / p99.
# Prints, last:
#   orders: journaled N1/s p99 X ms; unjournaled N2/s p99 Y ms
# (N: the peak; p99: at RATE.) Targets: N1 at least N2 / 2, X under 5 ms at 10,000/s.
# Usage: scripts/bench-orders.sh FLUXGATE_BIN [SECONDS] [RATE]   (defaults 5 s, 10000/s)
# Exits non-zero when a run had errors.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench-lib.sh
BIN=$1 D=${2:-5} RATE=${3:-10000} WINDOW=${WINDOW:-512}
cargo build --release -q -p fluxgate-benches --bin orders-load
LOAD=$PWD/target/release/orders-load
W=$(mktemp -d -p "$PWD/target" bench-orders.XXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$W"' EXIT
taskset -c 0 "$LOAD" service 127.0.0.1:17310 &
gateway() { # PORT JOURNAL(on|off): a config (its admin listener on PORT + 80)
  cat <<TOML
[runtime]
workers = 1
[admin]
address = "127.0.0.1:$(($1 + 80))"
[[listener]]
address = "127.0.0.1:$1"
mode = "orders"
orders = "desk"
[[upstream]]
name = "oms"
endpoints = ["127.0.0.1:17310"]
# One order per HTTP/1.1 connection at a time: the connections the window needs, opened at
# start; the one order service is never ejected for a slow connect under the burst.
prewarm = 512
passive = { consecutive_failures = 0 }
[[orders]]
name = "desk"
upstream = "oms"
session_in_flight = 4096
account_in_flight = 8192
TOML
  [ "$2" = off ] || printf '[orders.journal]\ndir = "%s"\n' "$W/journal-$1"
  cat <<TOML
[[orders.instrument]]
ids = ["1-9"]
tick = 0.01
reference_price = 100.0
[[orders.account]]
name = "bench"
max_quantity = 1000
max_notional = 1000000.0
rate = 10000000
max_open = 10000000
TOML
}
gateway 17311 on > "$W/on.toml"
gateway 17312 off > "$W/off.toml"
taskset -c 1 "$BIN" run -c "$W/on.toml" 2>"$W/on.log" &
taskset -c 1 "$BIN" run -c "$W/off.toml" 2>"$W/off.log" &
sleep 2
field() { echo "$1" | awk -v k="$2" '{for (i = 1; i < NF; i++) if ($i == k) {print $(i + 1); exit}}'; }
run() { # LABEL PORT RATE: one line of orders-load, checked
  local line
  line=$(taskset -c 0 "$LOAD" send "127.0.0.1:$2" "$3" "$D" "$WINDOW")
  [ "$(field "$line" rejected)" = 0 ] || failed_run "$1: refusals: $line"
  [ "$(field "$line" answered)" = "$(field "$line" sent)" ] || failed_run "$1: not all answered: $line"
  echo "$line"
}
echo "| journal | load | orders/s answered | accept p50 ms | accept p99 ms |"
echo "| --- | --- | --- | --- | --- |"
declare -A PEAK P99
for mode in on off; do
  port=17311; [ $mode = on ] || port=17312
  line=$(run "journal $mode peak" $port 0)
  PEAK[$mode]=$(field "$line" orders/s)
  echo "| $mode | peak ($WINDOW in flight) | ${PEAK[$mode]} | $(field "$line" p50) | $(field "$line" p99) |"
  # The journal's fdatasync times over the open-loop run, from its histogram: how many
  # took over 5 ms (the disk's share of a tail).
  slow() { curl -s "127.0.0.1:$((port + 80))/metrics" | awk '/journal_fsync_seconds_bucket/ && /le="0.005"/ {a=$NF} /journal_fsync_seconds_count/ {n=$NF} END {print n - a, n}'; }
  before=$(slow)
  line=$(run "journal $mode at $RATE/s" $port "$RATE")
  after=$(slow)
  P99[$mode]=$(field "$line" p99)
  echo "| $mode | $RATE/s | $(field "$line" orders/s) | $(field "$line" p50) | ${P99[$mode]} |"
  [ $mode = off ] || FSYNC=$(echo "$before $after" | awk '{printf "%d of %d fdatasyncs took over 5 ms", $3 - $1, $4 - $2}')
done
exit_if_failed
echo "journal at $RATE/s: $FSYNC"
echo "orders: journaled ${PEAK[on]}/s p99 ${P99[on]} ms; unjournaled ${PEAK[off]}/s p99 ${P99[off]} ms"
