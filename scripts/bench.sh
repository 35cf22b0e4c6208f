#!/usr/bin/env bash
# The core data-path benchmark, in one run on this machine:
#  1. fluxgate beside nginx and HAProxy (../shared/bench/peers.sh): req/s, p99 and proxy CPU
#     microseconds per request, HTTP/1.1 (wrk) and h2c (h2load);
#  2. a new connection per request (wrk, Connection: close) with --io uring vs --io epoll;
#  3. RSS per idle keep-alive connection with 10,000 idle connections;
#  4. part 1 again with fluxgate on a 20-route table (conf/examples/bench-20-routes.toml);
#  5. the plain route against one with a split, breakers and a rate limit
#     (conf/examples/bench-policy.toml), alternating (scripts/ab.sh): CPU per request;
#  6. the plain route with tracing off against tracing at a 1% sample ratio
#     (conf/examples/bench-tracing.toml), alternating (scripts/ab.sh): CPU per request.
# Usage: scripts/bench.sh [DURATION_S]   (default 8; ONLY="1 3" runs just those parts)
# Exits non-zero when a run of parts 2 and 3 had errors (part 1 and 4 are ../shared/bench/peers.sh's).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench-lib.sh
D=${1:-8}
scripts/deps.sh bench
cargo build --release -q -p fluxgate
FG=$PWD/target/release/fluxgate
PEERS=${PEERS:-$PWD/../shared/bench/peers.sh}
ulimit -n 65536 2>/dev/null || true

ONLY=${ONLY:-1 2 3 4 5 6}
part() { [[ " $ONLY " == *" $1 "* ]]; }

if part 1; then
echo "== 1. fluxgate vs nginx vs HAProxy (proxy on CPU 1; upstream and load on CPU 0)"
OURS="$FG run --listen 127.0.0.1:18090 --upstream 127.0.0.1:18081 --workers 1" bash "$PEERS" "$D"
fi

if part 4; then
echo
echo "== 4. as 1, fluxgate routing through 20 routes (the match is the last one)"
OURS="$FG run -c $PWD/conf/examples/bench-20-routes.toml" bash "$PEERS" "$D"
fi

if part 5; then
echo
echo "== 5. traffic policy: the plain route (old) vs split + breakers + rate limit (new)"
NEW_ARGS="-c $PWD/conf/examples/bench-policy.toml" scripts/ab.sh "$FG" "$FG" 3 "$D"
fi

if part 6; then
echo
echo "== 6. tracing: off (old) vs on at a 1% sample ratio, exported over OTLP/HTTP (new)"
# The same config without its [tracing] section, on the old one's port.
OFF=$(mktemp); sed '/^\[tracing\]/,$d; s/18093/18090/' conf/examples/bench-tracing.toml > "$OFF"
OLD_ARGS="-c $OFF" NEW_ARGS="-c $PWD/conf/examples/bench-tracing.toml" scripts/ab.sh "$FG" "$FG" 3 "$D"
rm -f "$OFF"
fi

W=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$W"' EXIT
cat > "$W/up.conf" <<NG
worker_processes 1; daemon off; pid $W/up.pid; error_log $W/up.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:18081 backlog=4096; location / { return 200 "hello from upstream\n"; } } }
NG
taskset -c 0 nginx -c "$W/up.conf" & sleep 0.5


if part 2; then
echo
echo "== 2. new connection per request: --io uring vs --io epoll (wrk -c50 -H 'Connection: close')"
echo "   alternating, 3 rounds of ${D}s each; the proxy's CPU per request, then the means"
printf "%-6s %10s %12s\n" io req_s cpu_us_req
declare -A SUM=()
for round in 1 2 3; do
  for io in epoll uring; do
    taskset -c 1 "$FG" run --listen 127.0.0.1:18090 --upstream 127.0.0.1:18081 --workers 1 --io $io 2>"$W/fg-$io.log" & pid=$!
    sleep 0.5
    c0=$(ticks $pid)
    out=$(taskset -c 0 wrk -t1 -c50 -d${D}s -H 'Connection: close' http://127.0.0.1:18090/)
    c1=$(ticks $pid)
    check_wrk "part 2 round $round $io" "$out"
    kill $pid; wait $pid 2>/dev/null || true
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    n=$(echo "$out" | awk '/requests in/ {print $1}')
    cus=$(awk -v a=$c0 -v b=$c1 -v n=$n -v t=$TCK 'BEGIN{printf "%.1f", (b-a)/t*1e6/n}')
    SUM[$io]=$(awk -v a=${SUM[$io]:-0} -v b=$cus 'BEGIN{print a+b}')
    printf "%-6s %10s %12s %s\n" $io "$rps" "$cus" "$(echo "$out" | grep -E 'Socket errors|Non-2xx' | tr '\n' ' ')"
  done
done
awk -v u=${SUM[uring]} -v e=${SUM[epoll]} 'BEGIN{printf "mean cpu_us_req: uring %.1f, epoll %.1f (uring/epoll %.2f)\n", u/3, e/3, u/e}'
fi

if part 3; then
echo
echo "== 3. RSS per idle keep-alive connection (10,000 connections, one request each)"
cat > "$W/idle.toml" <<TOML
[runtime]
workers = 1
[http]
keepalive_timeout = "10m"
[[listener]]
address = "127.0.0.1:18090"
max_connections = 20000
upstream = "u"
[[upstream]]
name = "u"
endpoints = ["127.0.0.1:18081"]
TOML
"$FG" run -c "$W/idle.toml" 2>"$W/fg-idle.log" & pid=$!
sleep 0.5
curl -s -o /dev/null http://127.0.0.1:18090/
rss() { awk '/VmRSS/ {print $2}' /proc/$1/status; }
r0=$(rss $pid)
mkfifo "$W/hold"
python3 scripts/idle_conns.py 127.0.0.1 18090 10000 <"$W/hold" >"$W/idle.out" & cl=$!
exec 3>"$W/hold"
for _ in $(seq 600); do grep -qE "ready|only|failed" "$W/idle.out" 2>/dev/null && break; sleep 0.1; done
cat "$W/idle.out"
# Connections park after 1 s idle and memory is handed back once a second: wait until the
# RSS holds still (two readings 1 s apart within 1%), at most 15 s.
r1=$(rss $pid)
for _ in $(seq 15); do
  sleep 1; r2=$(rss $pid)
  awk -v a=$r1 -v b=$r2 'BEGIN{exit !(a-b < a/100 && b-a < a/100)}' && break
  r1=$r2
done
r1=$(rss $pid)
exec 3>&-; wait $cl || true
kill $pid; wait $pid 2>/dev/null || true
# Divide by the connections that were really open and answered, and count a shortfall.
held=$(awk '/^ready/ {print 10000} /^only/ {print $2}' "$W/idle.out")
[ "${held:-0}" = 10000 ] || failed_run "part 3: $(cat "$W/idle.out") (10000 wanted)"
if [ "${held:-0}" -gt 0 ]; then
  awk -v a=$r0 -v b=$r1 -v n=$held 'BEGIN{printf "rss before %d KiB, with %d idle %d KiB: %.2f KiB per idle connection\n", a, n, b, (b-a)/n}'
fi
fi
exit_if_failed
