#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 machine: installs what is missing, fetches the default
# model, then runs every test (unit, integration, bounded fuzz), clippy and the format check.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Gemma-3-270M (Gemma terms: fetched, never committed) for tests/gemma3.rs's real-model check.
bash scripts/fetch-gemma3.sh >/dev/null
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
