#!/usr/bin/env bash
# The test command: installs what the tests need, then formatting, lints, every test of the
# workspace, and a smoke run of the embedded default. Exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh test
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo nextest run --workspace --no-fail-fast
scripts/smoke.sh
