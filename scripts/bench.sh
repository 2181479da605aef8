#!/usr/bin/env bash
# Kiln vs llama.cpp side by side (see bench/bench.py). Installs llama-cpp-python (builds from source the
# first time, ~15 min; pip caches the wheel) and numpy, builds Kiln in release mode, runs the bench.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -c "import llama_cpp, numpy" 2>/dev/null || python3 -m pip install --quiet llama-cpp-python numpy
cargo build --release --locked
python3 bench/bench.py "$@"
