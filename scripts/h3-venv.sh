#!/usr/bin/env bash
# The Python HTTP/3 client the tests use (aioquic from PyPI, in a venv under target/).
# Idempotent and safe to run from tests in parallel (one creates it, the others wait);
# prints the venv's python.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=target/venv-h3
mkdir -p target
exec 9>target/venv-h3.lock
flock 9
if ! "$VENV/bin/python" -c "import aioquic" 2>/dev/null; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "aioquic>=1.2,<2" >&2
fi
echo "$PWD/$VENV/bin/python"
