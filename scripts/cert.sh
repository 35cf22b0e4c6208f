#!/usr/bin/env bash
# Makes a self-signed test certificate and key (PEM, EC P-256) for fluxgate's TLS listeners.
# Usage: scripts/cert.sh OUT_DIR [NAME ...]   (names default to localhost; the first is the CN)
#   -> OUT_DIR/cert.pem, OUT_DIR/key.pem
# Then: fluxgate run --listen 127.0.0.1:18443 --upstream 127.0.0.1:18081 \
#         --tls-cert OUT_DIR/cert.pem --tls-key OUT_DIR/key.pem
set -euo pipefail
out=${1:?usage: scripts/cert.sh OUT_DIR [NAME ...]}
shift || true
names=("${@:-localhost}")
san=$(printf 'DNS:%s,' "${names[@]}"); san="${san%,}"
mkdir -p "$out"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
  -subj "/CN=${names[0]}" -addext "subjectAltName=$san,IP:127.0.0.1" \
  -keyout "$out/key.pem" -out "$out/cert.pem" 2>/dev/null
echo "$out/cert.pem $out/key.pem (${names[*]})"
