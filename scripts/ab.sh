#!/usr/bin/env bash
# Two fluxgate builds and HAProxy, measured in alternation on this noisy machine: each round
# runs wrk (HTTP/1.1) and h2load (h2c) against each proxy in turn, so drift hits all three
# alike. Prints the proxy's CPU microseconds per request and req/s per run, then the means.
# Usage: scripts/ab.sh OLD_BIN NEW_BIN [ROUNDS] [DURATION_S]   (defaults 3 rounds of 6 s)
#   NEW_ARGS="-c FILE": the new one serves a config (listening on 127.0.0.1:18093) instead of
#   the quick mode, e.g. the same binary with a policy route (scripts/bench.sh part 5);
#   OLD_ARGS likewise for the old one (listening on 127.0.0.1:18090).
# Exits non-zero when any run had errors (non-2xx answers, socket errors, failed requests).
# Layout as in ../shared/bench/peers.sh: upstream nginx and load on CPU 0, proxies on CPU 1.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench-lib.sh
OLD=$1 NEW=$2 R=${3:-3} D=${4:-6}
scripts/deps.sh bench
W=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$W"' EXIT
cat > "$W/up.conf" <<NG
worker_processes 1; daemon off; pid $W/up.pid; error_log $W/up.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:18081 backlog=4096;
    location / { return 200 "hello from upstream, a small body of 64 bytes..................\n"; } } }
NG
haproxy_cfg "127.0.0.1:18092" "127.0.0.1:18192 proto h2" > "$W/ha.cfg"
taskset -c 0 nginx -c "$W/up.conf" &
sleep 0.5
declare -A PID H1 H2
taskset -c 1 haproxy -f "$W/ha.cfg" & PID[haproxy]=$!
OLD_ARGS=${OLD_ARGS:---listen 127.0.0.1:18090 --upstream 127.0.0.1:18081 --workers 1}
# shellcheck disable=SC2086 # OLD_ARGS is words
taskset -c 1 "$OLD" run $OLD_ARGS 2>"$W/old.log" & PID[old]=$!
NEW_ARGS=${NEW_ARGS:---listen 127.0.0.1:18093 --upstream 127.0.0.1:18081 --workers 1}
# shellcheck disable=SC2086 # NEW_ARGS is words
taskset -c 1 "$NEW" run $NEW_ARGS 2>"$W/new.log" & PID[new]=$!
H1=([haproxy]=18092 [old]=18090 [new]=18093)
H2=([haproxy]=18192 [old]=18090 [new]=18093)
sleep 1
declare -A SUM
printf "%-8s %-4s %10s %11s\n" proxy prot req_s cpu_us_req
for round in $(seq "$R"); do
  # The order turns each round: whichever runs first in a round measured about 1% higher.
  order="old new haproxy"; [ $((round % 3)) = 2 ] && order="new haproxy old"; [ $((round % 3)) = 0 ] && order="haproxy old new"
  for p in $order; do
    c0=$(ticks ${PID[$p]})
    out=$(taskset -c 0 wrk -t1 -c50 -d${D}s http://127.0.0.1:${H1[$p]}/)
    c1=$(ticks ${PID[$p]})
    check_wrk "round $round $p h1" "$out"
    n=$(echo "$out" | awk '/requests in/ {print $1}'); rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    us=$(awk -v a=$c0 -v b=$c1 -v n=$n -v t=$TCK 'BEGIN{printf "%.1f", (b-a)/t*1e6/n}')
    printf "%-8s %-4s %10s %11s\n" $p h1 "$rps" "$us"
    SUM[$p.h1]=$(awk -v a=${SUM[$p.h1]:-0} -v b=$us 'BEGIN{print a+b}')
    c0=$(ticks ${PID[$p]})
    out=$(taskset -c 0 h2load -c50 -m10 -D $D -t1 http://127.0.0.1:${H2[$p]}/)
    c1=$(ticks ${PID[$p]})
    check_h2load "round $round $p h2c" "$out"
    n=$(echo "$out" | awk '/^requests:/ {print $2}'); rps=$(echo "$out" | awk '/finished in/ {print $4}')
    us=$(awk -v a=$c0 -v b=$c1 -v n=$n -v t=$TCK 'BEGIN{printf "%.1f", (b-a)/t*1e6/n}')
    printf "%-8s %-4s %10s %11s\n" $p h2c "$rps" "$us"
    SUM[$p.h2c]=$(awk -v a=${SUM[$p.h2c]:-0} -v b=$us 'BEGIN{print a+b}')
  done
done
for proto in h1 h2c; do
  awk -v o=${SUM[old.$proto]} -v n=${SUM[new.$proto]} -v h=${SUM[haproxy.$proto]} -v r=$R -v p=$proto \
    'BEGIN{printf "mean cpu_us_req %-3s: old %.1f, new %.1f, haproxy %.1f (new/old %.2f, new/haproxy %.2f)\n", p, o/r, n/r, h/r, n/o, n/h}'
done
exit_if_failed
