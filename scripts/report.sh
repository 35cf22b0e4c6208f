#!/usr/bin/env bash
# Benchmark report: a Markdown table and an SVG chart per comparison (fluxgate against each
# peer: CPU per request, req/s, p99 where the script measures it), from the tables the
# benchmark scripts print (scripts/report.py reads them).
# Usage: scripts/report.sh OUT_DIR [LOG ...]
#   with LOGs: reads saved outputs of scripts/bench.sh, ab.sh, bench-tls.sh, bench-h3.sh,
#   bench-l4.sh; without: runs scripts/bench.sh (ONLY and the duration as it takes them,
#   DURATION_S from the environment, default 8) and keeps its output as OUT_DIR/bench.log.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/report.sh OUT_DIR [LOG ...]}
shift
mkdir -p "$OUT"
if [ $# -eq 0 ]; then
  scripts/bench.sh "${DURATION_S:-8}" 2>&1 | tee "$OUT/bench.log"
  set -- "$OUT/bench.log"
fi
python3 scripts/report.py "$OUT" "$@"
echo "open $OUT/report.md"
