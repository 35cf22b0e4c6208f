#!/usr/bin/env bash
# Installs what the tests and benchmarks need on a fresh Debian machine, skipping what is
# already there. Usage: scripts/deps.sh [test|bench]
set -euo pipefail
what=${1:-test}
need=()
have() { command -v "$1" >/dev/null 2>&1; }
if [ "$what" = bench ]; then
  have nginx   || need+=(nginx-light)
  have haproxy || need+=(haproxy)
  have wrk     || need+=(wrk)
  have h2load  || need+=(nghttp2-client)
fi
have curl || need+=(curl)
have gtlsclient || need+=(ngtcp2-client)
have openssl || need+=(openssl)
have nats-server || need+=(nats-server)
have redis-server || need+=(redis-server)
have chromium || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${need[@]}"
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install --locked cargo-nextest
fi
