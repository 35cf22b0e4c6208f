#!/usr/bin/env bash
# TCP-mode passthrough: 1 GB per run through fluxgate with splice(2), fluxgate copying through
# user space (splice = false), HAProxy in `mode tcp` as it comes, and HAProxy with
# `option splice-auto`, in alternation (each round runs all four, the order turning), one
# worker / thread each. Prints the proxy's CPU seconds per GB and the transfer's GB/s per
# run, then the means and ratios.
# Usage: scripts/bench-l4.sh FLUXGATE_BIN [ROUNDS] [GB] [cold|hot]   (defaults 3, 1, cold)
# cold: the payload is not in cache when a proxy touches it (as from a network card); hot:
# one 4 MiB buffer sent again and again (see scripts/l4_load.py).
# Exits non-zero when any run lost bytes. Load (python source and sink) on CPU 0, proxies on
# CPU 1.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench-lib.sh
BIN=$1 R=${2:-3} GB=${3:-1} SOURCE=${4:-cold}
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
for ha in haproxy haproxy-splice; do
  port=18303; extra=""
  [ $ha = haproxy-splice ] && port=18304 && extra="  option splice-auto"
  printf '%s\n' global '  nbthread 1' defaults '  mode tcp' '  timeout connect 5s' \
    '  timeout client 60s' '  timeout server 60s' "$extra" 'frontend f' "  bind 127.0.0.1:$port" \
    '  default_backend b' 'backend b' "  server s1 127.0.0.1:$SINK" > "$W/$ha.cfg"
done
declare -A PID PORT SUM
taskset -c 1 "$BIN" run -c "$W/splice.toml" 2>"$W/splice.log" & PID[splice]=$!
taskset -c 1 "$BIN" run -c "$W/copy.toml" 2>"$W/copy.log" & PID[copy]=$!
taskset -c 1 haproxy -f "$W/haproxy.cfg" & PID[haproxy]=$!
taskset -c 1 haproxy -f "$W/haproxy-splice.cfg" & PID[haproxy-splice]=$!
PORT=([splice]=18301 [copy]=18302 [haproxy]=18303 [haproxy-splice]=18304)
sleep 1
printf "%-14s %8s %10s\n" proxy gb_s cpu_s_gb
all=(splice copy haproxy haproxy-splice)
for round in $(seq "$R"); do
  # The order turns each round.
  k=$(( (round - 1) % 4 )); order="${all[*]:k} ${all[*]:0:k}"
  for p in $order; do
    c0=$(ticks ${PID[$p]})
    if ! out=$(taskset -c 0 python3 scripts/l4_load.py ${PORT[$p]} $SINK $BYTES $SOURCE); then
      failed_run "round $round $p: $out bytes of $BYTES"
    fi
    c1=$(ticks ${PID[$p]})
    read -r got secs <<<"$out"
    cpu=$(awk -v a=$c0 -v b=$c1 -v t=$TCK -v g=$GB 'BEGIN{printf "%.3f", (b-a)/t/g}')
    rate=$(awk -v s=$secs -v g=$GB 'BEGIN{printf "%.2f", g/s}')
    printf "%-14s %8s %10s\n" $p "$rate" "$cpu"
    SUM[$p]=$(awk -v a=${SUM[$p]:-0} -v b=$cpu 'BEGIN{print a+b}')
  done
done
awk -v s=${SUM[splice]} -v c=${SUM[copy]} -v h=${SUM[haproxy]} -v hs=${SUM[haproxy-splice]} -v r=$R -v src=$SOURCE \
  'BEGIN{printf "mean cpu_s_gb (%s): splice %.3f, copy %.3f, haproxy %.3f, haproxy-splice %.3f (splice/copy %.2f, splice/haproxy %.2f, splice/haproxy-splice %.2f)\n", src, s/r, c/r, h/r, hs/r, s/c, s/h, s/hs}'
exit_if_failed
