#!/usr/bin/env bash
# TLS benchmark, in one run on this machine (each server pinned to CPU 1; clients and the
# upstream on CPU 0):
#  1. full vs resumed TLS 1.3 handshakes per second (and server CPU per handshake) on one
#     worker, fluxgate beside nginx with the same certificate (ssl_session_tickets on), with
#     an RSA-2048 certificate (KEY=ec for EC P-256), each connection one direct-answer GET;
#  2. h2load over TLS (-c 50 -m 10) through fluxgate, nginx and HAProxy: req/s and server CPU
#     microseconds per request.
# Usage: scripts/bench-tls.sh [DURATION_S]   (default 6)
# Exits non-zero when any run had errors (failed handshakes or requests, non-2xx answers).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench-lib.sh
D=${1:-6}
scripts/deps.sh bench
cargo build --release -q -p fluxgate -p fluxgate-benches --bin fluxgate --bin tls-handshakes
FG=$PWD/target/release/fluxgate
HS=$PWD/target/release/tls-handshakes
W=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$W"' EXIT
KEY=${KEY:-rsa} scripts/cert.sh "$W/c" localhost >/dev/null
cat "$W/c/cert.pem" "$W/c/key.pem" >"$W/c/haproxy.pem"

cat > "$W/up.conf" <<NG
worker_processes 1; daemon off; pid $W/up.pid; error_log $W/up.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:18081 backlog=4096; location / { return 200 "hello from upstream\n"; } } }
NG
cat > "$W/ng.conf" <<NG
worker_processes 1; daemon off; pid $W/ng.pid; error_log $W/ng.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  upstream up { server 127.0.0.1:18081; keepalive 128; }
  server { listen 127.0.0.1:18444 ssl http2 backlog=4096;
    ssl_certificate $W/c/cert.pem; ssl_certificate_key $W/c/key.pem;
    ssl_protocols TLSv1.2 TLSv1.3; ssl_session_tickets on; ssl_session_cache shared:S:10m;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; } }
  server { listen 127.0.0.1:18454 ssl backlog=4096;
    ssl_certificate $W/c/cert.pem; ssl_certificate_key $W/c/key.pem;
    ssl_protocols TLSv1.2 TLSv1.3; ssl_session_tickets on; ssl_session_cache shared:S:10m;
    location / { return 200 "direct\n"; } } }
NG
cat > "$W/hs.toml" <<TOML
[runtime]
workers = 1
[[listener]]
address = "127.0.0.1:18453"
respond = { status = 200, body = "direct\n" }
[listener.tls]
certificates = [{ cert = "$W/c/cert.pem", key = "$W/c/key.pem" }]
TOML
haproxy_cfg "127.0.0.1:18445 ssl crt $W/c/haproxy.pem alpn h2,http/1.1" > "$W/ha.cfg"
taskset -c 0 nginx -c "$W/up.conf" &
taskset -c 1 "$FG" run --listen 127.0.0.1:18443 --upstream 127.0.0.1:18081 --workers 1 \
  --tls-cert "$W/c/cert.pem" --tls-key "$W/c/key.pem" 2>"$W/fg.log" & FPID=$!
taskset -c 1 "$FG" run -c "$W/hs.toml" 2>"$W/fg-hs.log" & FHS=$!
taskset -c 1 nginx -c "$W/ng.conf" &
taskset -c 1 haproxy -f "$W/ha.cfg" & HPID=$!
sleep 1
NPID=$(pgrep -P "$(cat "$W/ng.pid")" | head -1)   # the nginx worker, not the master

echo "== 1. TLS 1.3 handshakes per second, one worker (client: rustls, 8 in parallel)"
printf "%-8s %-8s %10s %14s %s\n" server mode hs_per_s cpu_us_per_hs detail
for srv in fluxgate:18453:$FHS nginx:18454:$NPID; do
  IFS=: read -r name port pid <<<"$srv"
  for mode in full resumed; do
    c0=$(ticks "$pid")
    out=$(taskset -c 0 "$HS" 127.0.0.1:$port "$W/c/ca.pem" $mode "$D" 8)
    c1=$(ticks "$pid")
    echo "$out" | grep -q 'failed 0$' || failed_run "$name $mode handshakes: $out"
    n=$(echo "$out" | awk '{print $2}')
    rate=$(echo "$out" | sed -E 's/.*: ([0-9]+)\/s.*/\1/')
    cpu=$(awk -v a=$c0 -v b=$c1 -v n=$n -v t=$TCK 'BEGIN{printf "%.1f", (b-a)/t*1e6/n}')
    printf "%-8s %-8s %10s %14s %s\n" $name $mode "$rate" "$cpu" "$(echo "$out" | sed -E 's/.*, (resumed .*)/\1/')"
  done
done

echo
echo "== 2. h2load over TLS (-c50 -m10), ALPN h2"
printf "%-8s %10s %12s\n" server req_s cpu_us_req
for srv in fluxgate:18443:$FPID nginx:18444:$NPID haproxy:18445:$HPID; do
  IFS=: read -r name port pid <<<"$srv"
  c0=$(ticks "$pid")
  out=$(taskset -c 0 h2load -c50 -m10 -D "$D" -t1 https://127.0.0.1:$port/ 2>&1)
  c1=$(ticks "$pid")
  check_h2load "$name h2 over TLS" "$out"
  r=$(echo "$out" | awk '/^finished in/ {print $4}')
  n=$(echo "$out" | awk '/^requests:/ {print $6}')
  cpu=$(awk -v a=$c0 -v b=$c1 -v n=${n:-1} -v t=$TCK 'BEGIN{ if (n>0) printf "%.1f", (b-a)/t*1e6/n; else print "-" }')
  printf "%-8s %10s %12s\n" $name "$r" "$cpu"
done
exit_if_failed
