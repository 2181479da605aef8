#!/usr/bin/env bash
# Tensor parallelism on CPU ranks through MPI: tp=1, tp=N unfused and tp=N fused in one run (see
# bench/bench_tp.py; options pass through, e.g. --tp 2 --prompt-tokens 128 --rounds 5).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --locked
python3 bench/bench_tp.py "$@"
