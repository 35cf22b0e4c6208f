#!/usr/bin/env bash
# Market-data fan-out against nats-server, in one run: one publisher at a fixed rate and N
# subscriber connections (default 1,000), through fluxgate (raw TCP feed listeners, one
# worker) and through Debian's nats-server (GOMAXPROCS=1), each server pinned to CPU 1 and
# the load tool (benches/src/bin/fanout-load.rs, publisher and receivers in one process) to
# CPU 0. The message is the same for both: one envelope frame of a trade tick (as the NATS
# message's payload), never conflated, so every tick must reach every subscriber.
#
# 1. A rate sweep, the two servers in alternation at each rate: deliveries per second
#    (ticks received by all subscribers over the run and its drain), p50 and p99 delivery
#    latency (publish to receive), ticks not delivered, subscribers cut off. A server's peak
#    is its highest deliveries per second in a run it sustained: every tick reached every
#    subscriber, with a p99 under 1 s (a backlog that kept growing is not a rate served).
# 2. Both servers again at half of the tick rate where fluxgate peaked: p50 / p99 there.
# 3. Heap allocations per tick on fluxgate's fan-out path (fluxgate in the tool's process
#    under a counting allocator) for N = 10 and N = 1,000.
# Prints, last:
#   fanout: fluxgate D1 deliveries/s p99 X ms; nats-server D2 deliveries/s p99 Y ms
# (D: the peak over the sweep; p99: at half of fluxgate's peak rate).
# Usage: scripts/bench-fanout.sh FLUXGATE_BIN [SECONDS] [SUBSCRIBERS] [RATES...]
#   (defaults 4 s per run, 1000 subscribers, rates 1000 3000 10000 20000 40000 ticks/s)
# Exits non-zero when a run had errors.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench-lib.sh
BIN=$1 D=${2:-4} N=${3:-1000}
shift $(($# < 3 ? $# : 3))
RATES=("$@")
[ ${#RATES[@]} -gt 0 ] || RATES=(1000 3000 10000 20000 40000)
scripts/deps.sh test
cargo build --release -q -p fluxgate-benches --bin fanout-load
LOAD=$PWD/target/release/fanout-load
W=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$W"' EXIT
cat > "$W/fg.toml" <<TOML
[runtime]
workers = 1
[[feed]]
name = "md"
[[listener]]
address = "127.0.0.1:17000"
mode = "feed"
feed = "md"
role = "publish"
[[listener]]
address = "127.0.0.1:17001"
mode = "feed"
feed = "md"
role = "subscribe"
TOML
ulimit -n 65536 2>/dev/null || true
taskset -c 1 "$BIN" run -c "$W/fg.toml" 2>"$W/fg.log" &
GOMAXPROCS=1 taskset -c 1 nats-server -a 127.0.0.1 -p 17222 2>"$W/nats.log" &
sleep 1
run() { # PEER RATE SECONDS: one line of fanout-load
  case $1 in
    fluxgate) taskset -c 0 "$LOAD" fluxgate 127.0.0.1:17000 127.0.0.1:17001 "$2" "$3" "$N" ;;
    nats-server) taskset -c 0 "$LOAD" nats 127.0.0.1:17222 "$2" "$3" "$N" ;;
  esac
}
field() { echo "$1" | awk -v k="$2" '{for (i = 1; i < NF; i++) if ($i == k) {print $(i + 1); exit}}'; }
checked() { # LABEL LINE: the line, or a counted failure when nothing arrived
  local got; got=$(field "$2" delivered)
  [ "${got:-0}" -gt 0 ] || failed_run "$1: nothing delivered: $2"
}
declare -A PEAK PEAK_RATE
echo "| ticks/s offered | server | deliveries/s | p50 ms | p99 ms | not delivered | cut off |"
echo "| --- | --- | --- | --- | --- | --- | --- |"
i=0
for rate in "${RATES[@]}"; do
  order=(fluxgate nats-server); [ $((i % 2)) = 0 ] || order=(nats-server fluxgate); i=$((i + 1))
  for peer in "${order[@]}"; do
    line=$(run "$peer" "$rate" "$D")
    checked "$peer at $rate/s" "$line"
    dps=$(field "$line" deliveries/s)
    echo "| $rate | $peer | $dps | $(field "$line" p50) | $(field "$line" p99) | $(field "$line" lost) | $(field "$line" closed) |"
    # The peak counts sustained runs only (see above).
    p99=$(field "$line" p99)
    if [ "$(field "$line" lost)" = 0 ] && [ "$(field "$line" closed)" = 0 ] &&
       [ "$p99" != inf ] && [ "${p99%.*}" -lt 1000 ] &&
       [ "${dps%.*}" -gt "${PEAK[$peer]:-0}" ]; then
      PEAK[$peer]=${dps%.*}; PEAK_RATE[$peer]=$rate
    fi
  done
done
half=$(( ${PEAK_RATE[fluxgate]:-${RATES[0]}} / 2 ))
echo
echo "At half of fluxgate's peak rate ($half ticks/s, $N subscribers, $((2 * D)) s):"
declare -A P99
for peer in fluxgate nats-server; do
  line=$(run "$peer" "$half" $((2 * D)))
  checked "$peer at $half/s" "$line"
  P99[$peer]=$(field "$line" p99)
  echo "  $peer: $line"
done
echo
echo "Heap allocations per tick on fluxgate's fan-out path:"
for n in 10 1000; do
  echo "  $("$LOAD" allocs $n 8000)"
done
exit_if_failed
echo "peak rates (ticks/s): fluxgate ${PEAK_RATE[fluxgate]:-none}, nats-server ${PEAK_RATE[nats-server]:-none}"
echo "fanout: fluxgate ${PEAK[fluxgate]:-0} deliveries/s p99 ${P99[fluxgate]} ms; nats-server ${PEAK[nats-server]:-0} deliveries/s p99 ${P99[nats-server]} ms"
