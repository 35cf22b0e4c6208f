#!/usr/bin/env bash
# TCP-mode passthrough: 1 GB per run through fluxgate with splice(2), fluxgate copying through
# user space (splice = false), and HAProxy in `mode tcp`, in alternation (each round runs all
# three, the order turning), one worker / thread each. Prints the proxy's CPU seconds per GB
# and the transfer's GB/s per run, then the means and ratios.
# Usage: scripts/bench-l4.sh FLUXGATE_BIN [ROUNDS] [GB]   (defaults 3 rounds of 1 GB)
# Exits non-zero when any run lost bytes. Load (python source and sink) on CPU 0, proxies on
# CPU 1.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench-lib.sh
BIN=$1 R=${2:-3} GB=${3:-1}
BYTES=$((GB << 30))
command -v haproxy >/dev/null || scripts/deps.sh bench
W=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$W"' EXIT
SINK=18300
for mode in splice copy; do
  splice=true; [ $mode = copy ] && splice=false
  port=18301; [ $mode = copy ] && port=18302
  cat > "$W/$mode.toml" <<TOML
[runtime]
workers = 1
[[listener]]
address = "127.0.0.1:$port"
mode = "tcp"
splice = $splice
upstream = "sink"
[[upstream]]
name = "sink"
endpoints = ["127.0.0.1:$SINK"]
TOML
done
printf '%s\n' global '  nbthread 1' defaults '  mode tcp' '  timeout connect 5s' \
  '  timeout client 60s' '  timeout server 60s' 'frontend f' '  bind 127.0.0.1:18303' \
  '  default_backend b' 'backend b' "  server s1 127.0.0.1:$SINK" > "$W/ha.cfg"
declare -A PID PORT SUM
taskset -c 1 "$BIN" run -c "$W/splice.toml" 2>"$W/splice.log" & PID[splice]=$!
taskset -c 1 "$BIN" run -c "$W/copy.toml" 2>"$W/copy.log" & PID[copy]=$!
taskset -c 1 haproxy -f "$W/ha.cfg" & PID[haproxy]=$!
PORT=([splice]=18301 [copy]=18302 [haproxy]=18303)
sleep 1
printf "%-8s %8s %10s\n" proxy gb_s cpu_s_gb
for round in $(seq "$R"); do
  order="splice copy haproxy"; [ $((round % 3)) = 2 ] && order="copy haproxy splice"; [ $((round % 3)) = 0 ] && order="haproxy splice copy"
  for p in $order; do
    c0=$(ticks ${PID[$p]})
    if ! out=$(taskset -c 0 python3 scripts/l4_load.py ${PORT[$p]} $SINK $BYTES); then
      failed_run "round $round $p: $out bytes of $BYTES"
    fi
    c1=$(ticks ${PID[$p]})
    read -r got secs <<<"$out"
    cpu=$(awk -v a=$c0 -v b=$c1 -v t=$TCK -v g=$GB 'BEGIN{printf "%.3f", (b-a)/t/g}')
    rate=$(awk -v s=$secs -v g=$GB 'BEGIN{printf "%.2f", g/s}')
    printf "%-8s %8s %10s\n" $p "$rate" "$cpu"
    SUM[$p]=$(awk -v a=${SUM[$p]:-0} -v b=$cpu 'BEGIN{print a+b}')
  done
done
awk -v s=${SUM[splice]} -v c=${SUM[copy]} -v h=${SUM[haproxy]} -v r=$R \
  'BEGIN{printf "mean cpu_s_gb: splice %.3f, copy %.3f, haproxy %.3f (splice/copy %.2f, splice/haproxy %.2f)\n", s/r, c/r, h/r, s/c, s/h}'
exit_if_failed
