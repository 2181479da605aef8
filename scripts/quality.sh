#!/usr/bin/env bash
# Regenerates the layer-skipping tables in docs/quality.md (see bench/quality.py): builds Kiln, calibrates
# on data/calibration.txt, evaluates every configuration on data/eval.txt, measures decode speed side by
# side, and checks --quality-budget choices against the evaluation text. Takes tens of minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --locked -p kiln
python3 bench/quality.py "$@"
