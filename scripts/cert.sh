#!/usr/bin/env bash
# Makes a throwaway test CA and a certificate it signs (PEM, EC P-256, or RSA-2048 with
# KEY=rsa; good for server and client auth) for fluxgate's TLS listeners and upstreams.
# Usage: scripts/cert.sh OUT_DIR [NAME ...]   (names default to localhost; the
# first is the CN)  ->  OUT_DIR/cert.pem (leaf), OUT_DIR/key.pem, OUT_DIR/ca.pem (to trust)
# Then: fluxgate run --listen 127.0.0.1:18443 --upstream 127.0.0.1:18081 \
#         --tls-cert OUT_DIR/cert.pem --tls-key OUT_DIR/key.pem
set -euo pipefail
out=${1:?usage: scripts/cert.sh OUT_DIR [NAME ...]}
shift || true
names=("${@:-localhost}")
san=$(printf 'DNS:%s,' "${names[@]}"); san="${san%,}"
mkdir -p "$out"
if [ "${KEY:-ec}" = rsa ]; then
  ec=(-newkey rsa:2048 -nodes)
else
  ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
fi
openssl req -x509 "${ec[@]}" -days 30 -subj "/CN=fluxgate test CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign" \
  -keyout "$out/ca.key" -out "$out/ca.pem" 2>/dev/null
openssl req "${ec[@]}" -subj "/CN=${names[0]}" -keyout "$out/key.pem" -out "$out/leaf.csr" 2>/dev/null
printf 'subjectAltName=%s,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth,clientAuth\n' "$san" >"$out/leaf.ext"
openssl x509 -req -in "$out/leaf.csr" -CA "$out/ca.pem" -CAkey "$out/ca.key" -CAcreateserial \
  -days 30 -extfile "$out/leaf.ext" -out "$out/cert.pem" 2>/dev/null
rm -f "$out/leaf.csr" "$out/leaf.ext" "$out/ca.srl"
echo "$out/cert.pem $out/key.pem (${names[*]}), trust $out/ca.pem"
