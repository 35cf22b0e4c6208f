#!/usr/bin/env bash
# The test command: installs what the tests need, then formatting, lints, every test of the
# workspace (the codec interop test sets up its Python packages itself, in a venv under
# target/), the benchmark report's self-test, a smoke run of the embedded default and a
# bounded run of every fuzz target.
# Exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh test
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo nextest run --workspace --no-fail-fast
python3 scripts/report.py --self-test
scripts/smoke.sh
scripts/fuzz-smoke.sh
