#!/usr/bin/env bash
# The main job: set up, build, and run the default model (SmolLM2-135M-Instruct) on a prompt.
# Usage: scripts/demo.sh ["your prompt"] [extra kiln run flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
prompt="${1:-Once upon a time}"
shift || true
cargo build --release --locked
./target/release/kiln inspect
./target/release/kiln run --prompt "$prompt" --max-tokens 48 "$@"
