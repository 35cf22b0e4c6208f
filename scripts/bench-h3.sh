#!/usr/bin/env bash
# HTTP/3 against HTTP/2 over TLS and Caddy, in one run: fluxgate serving HTTP/3, fluxgate
# serving HTTP/2 over TLS (the same listener), and Caddy (Debian's, quic-go) serving HTTP/3
# as a reverse proxy, all to the same nginx upstream; each proxy pinned to CPU 1 (one worker,
# GOMAXPROCS=1), upstream and load on CPU 0. Load: benches/src/bin/h3load (quinn + h3: 10
# connections x 5 streams) and h2load over TLS (the same 10 x 5), the same duration, in alternation (the order turns each round). Prints the proxy's CPU microseconds per request and req/s
# per run, then the means, and last:
#   h3: fluxgate X us/req, fluxgate-h2tls Y us/req, caddy Z us/req
# Usage: scripts/bench-h3.sh FLUXGATE_BIN [ROUNDS] [DURATION_S]   (defaults 3 rounds of 8 s)
# Exits non-zero when a run had errors.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench-lib.sh
BIN=$1 R=${2:-3} D=${3:-8}
scripts/deps.sh bench
command -v caddy >/dev/null || { SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo; $SUDO apt-get install -y -q caddy; }
# The HTTP/3 load: our own, on quinn and h3 (oha's http3 build hangs against Caddy here).
cargo build --release -q -p fluxgate-benches --bin h3load
H3LOAD=$PWD/target/release/h3load
W=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$W"' EXIT
bash scripts/cert.sh "$W/c" localhost >/dev/null
cat > "$W/up.conf" <<NG
worker_processes 1; daemon off; pid $W/up.pid; error_log $W/up.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:18081 backlog=4096;
    location / { return 200 "hello from upstream, a small body of 64 bytes..................\n"; } } }
NG
cat > "$W/fg.toml" <<TOML
[runtime]
workers = 1
[[listener]]
address = "127.0.0.1:18443"
upstream = "u"
[listener.tls]
certificates = [{ cert = "$W/c/cert.pem", key = "$W/c/key.pem" }]
[[upstream]]
name = "u"
endpoints = ["127.0.0.1:18081"]
TOML
cat > "$W/Caddyfile" <<CADDY
{
  auto_https off
  admin off
  default_sni localhost
}
https://:18444 {
  tls $W/c/cert.pem $W/c/key.pem
  reverse_proxy 127.0.0.1:18081
}
CADDY
taskset -c 0 nginx -c "$W/up.conf" &
sleep 0.5
declare -A PID SUM
taskset -c 1 "$BIN" run -c "$W/fg.toml" 2>"$W/fg.log" & PID[fluxgate]=$!; PID[fluxgate-h2tls]=${PID[fluxgate]}
GOMAXPROCS=1 taskset -c 1 caddy run --config "$W/Caddyfile" --adapter caddyfile 2>"$W/caddy.log" & PID[caddy]=$!
sleep 2
run() { # NAME: prints requests done
  case $1 in
    fluxgate) taskset -c 0 "$H3LOAD" 127.0.0.1:18443 "$W/c/ca.pem" / $D 10 5 ;;
    caddy) taskset -c 0 "$H3LOAD" 127.0.0.1:18444 "$W/c/ca.pem" / $D 10 5 ;;
    fluxgate-h2tls) taskset -c 0 h2load -c10 -m5 -D $D -t1 https://127.0.0.1:18443/ ;;
  esac
}
count() { # NAME OUTPUT: requests that succeeded; any failure makes the run invalid
  case $1 in
    fluxgate-h2tls)
      check_h2load "$1" "$2"
      echo "$2" | awk '/^requests:/ {print $8}' ;;
    *)
      read -r _ ok _ bad _ <<<"$2"
      [ "${bad:-1}" = 0 ] || failed_run "$1: ${ok:-0} ok, ${bad:-?} failed"
      echo "${ok:-0}" ;;
  esac
}
printf "%-15s %10s %11s\n" proxy req_s cpu_us_req
all=(fluxgate fluxgate-h2tls caddy)
for round in $(seq "$R"); do
  k=$(( (round - 1) % 3 )); order="${all[*]:k} ${all[*]:0:k}"
  for p in $order; do
    c0=$(ticks ${PID[$p]})
    out=$(run $p 2>&1) || true
    c1=$(ticks ${PID[$p]})
    n=$(count $p "$out")
    if [ "${n:-0}" -eq 0 ]; then failed_run "round $round $p: no request succeeded"; continue; fi
    us=$(awk -v a=$c0 -v b=$c1 -v n=$n -v t=$TCK 'BEGIN{printf "%.1f", (b-a)/t*1e6/n}')
    printf "%-15s %10.0f %11s\n" $p "$(awk -v n=$n -v d=$D 'BEGIN{print n/d}')" "$us"
    SUM[$p]=$(awk -v a=${SUM[$p]:-0} -v b=$us 'BEGIN{print a+b}')
  done
done
awk -v f=${SUM[fluxgate]:-0} -v h=${SUM[fluxgate-h2tls]:-0} -v c=${SUM[caddy]:-0} -v r=$R \
  'BEGIN{printf "h3: fluxgate %.1f us/req, fluxgate-h2tls %.1f us/req, caddy %.1f us/req (h3/h2tls %.2f, fluxgate/caddy %.2f)\n", f/r, h/r, c/r, f/h, f/c}'
exit_if_failed
