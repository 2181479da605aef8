#!/usr/bin/env bash
# Regenerates the quality tables in docs/quality.md. Default: the layer-skipping tables (bench/quality.py):
# builds Kiln, calibrates on data/calibration.txt, evaluates every configuration on data/eval.txt, measures
# decode speed side by side, and checks --quality-budget choices against the evaluation text. With
# `--sparsity`: the activation-sparsity (chess) and pruning tables and the measured kernel break-even
# (bench/sparsity.py; `kiln bench --kernels` first). With `--flexprefill`: FlexPrefill sparse attention at
# 2k/4k/8k-token prompts (bench/flexprefill.py). Each takes tens of minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --locked -p kiln
if [[ "${1:-}" == "--flexprefill" ]]; then
  shift
  python3 bench/flexprefill.py "$@"
elif [[ "${1:-}" == "--sparsity" ]]; then
  shift
  target/release/kiln bench --kernels | tee target/kernel-table.txt
  python3 bench/sparsity.py "$@"
  python3 bench/sparsity.py --sparsities "" --prune 0.25,0.5,0.7 --marker prune "$@"
else
  python3 bench/quality.py "$@"
fi
