#!/usr/bin/env python3
"""Activation sparsity (and later weight sparsity) on the default model: perplexity on data/eval.txt and
decode speed per target sparsity, every configuration measured in the same run.

Writes the table between the `sparsity:begin`/`sparsity:end` markers of docs/quality.md:
  1. `kiln calibrate` on data/calibration.txt (per-channel activation quantiles: the thresholds);
  2. per configuration, `kiln eval` on data/eval.txt;
  3. decode speed from `kiln run`, interleaved over rounds (CPU tok/s as in bench/quality.py).

Usage: scripts/quality.sh --sparsity [--rounds 3] [--sparsities 0,0.25,0.5,0.7,0.9]
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILN = os.environ.get("KILN_BIN", os.path.join(ROOT, "target/release/kiln"))


MEMO = {}
MEMO_FILE = None


def kiln(args):
    """Runs kiln; `eval` results are remembered in the work directory (delete it to measure afresh)."""
    key = " ".join(args)
    if args[0] == "eval" and key in MEMO:
        return MEMO[key]
    r = subprocess.run([KILN] + args, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"failed: kiln {' '.join(args)}\n{r.stderr}")
    if args[0] == "eval":
        MEMO[key] = r.stdout
        json.dump(MEMO, open(MEMO_FILE, "w"))
    return r.stdout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sparsities", default="0,0.25,0.5,0.7,0.9", help="chess target sparsities ('' for none)")
    ap.add_argument("--prune", default="", help="magnitude-pruning sparsities, e.g. 0.25,0.5,0.7 (needs `kiln bench --kernels`)")
    ap.add_argument("--marker", default="sparsity")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-threads", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--out", default=os.path.join(ROOT, "docs/quality.md"))
    ap.add_argument("--work", default=os.path.join(ROOT, "target/quality"))
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    global MEMO_FILE
    MEMO_FILE = os.path.join(a.work, "sparsity-evals.json")
    if os.path.exists(MEMO_FILE):
        MEMO.update(json.load(open(MEMO_FILE)))
    t0 = time.time()
    calib = os.path.join(a.work, "calib-v2.json")
    if not os.path.exists(calib):
        kiln(["calibrate", "--text", "data/calibration.txt", "-o", calib])
    configs = [("dense", None)] + [("chess", float(s)) for s in a.sparsities.split(",") if s]
    configs += [("prune (magnitude)", float(s)) for s in a.prune.split(",") if s]

    def opts(c):
        tech, s = c
        if tech == "chess":
            return ["--chess-sparsity", str(s), "--calibration", calib]
        if tech.startswith("prune"):
            return ["--prune-sparsity", str(s), "--prune-method", "magnitude"]
        return []

    ppl = {}
    for c in configs:
        out = json.loads(kiln(["eval", "--text", "data/eval.txt", "--json", "--window", str(a.window), "--stride",
                               str(a.stride), "--threads", str(a.eval_threads)] + opts(c)))
        ppl[c] = out["report"]
        print(f"eval {c}: ppl {out['report']['perplexity']:.3f} ({time.time() - t0:.0f}s)", file=sys.stderr)

    prompt = "The history of the bicycle begins"
    cpu_speeds = {c: [] for c in configs}
    wall = {c: [] for c in configs}

    def cpu_run(args):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = kiln(args)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return out, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)

    # Compile every configuration's artifact first, so no timed run includes compilation.
    for c in configs:
        kiln(["run", "--prompt", prompt, "-n", "1", "--threads", str(a.threads)] + opts(c))
    for _ in range(a.rounds):
        for c in configs:
            base = ["run", "--prompt", prompt, "--ignore-eos", "--json", "--threads", str(a.threads)] + opts(c)
            _, cpu_short = cpu_run(base + ["-n", "16"])
            out, cpu_long = cpu_run(base + ["-n", str(16 + a.decode_tokens)])
            wall[c].append(json.loads(out)["decode_tok_per_s"])
            cpu_speeds[c].append(a.decode_tokens / max(cpu_long - cpu_short, 1e-9))
    cpu = {c: statistics.median(v) for c, v in cpu_speeds.items()}
    best = {c: max(v) for c, v in wall.items()}
    base = configs[0]
    lines = [
        f"Perplexity on `data/eval.txt` ({ppl[base]['tokens']} tokens, window {a.window}, stride {a.stride}); decode: "
        f"{a.decode_tokens} greedy tokens, {a.threads} thread(s), compiled backend, {a.rounds} interleaved rounds, "
        f"CPU tok/s and wall tok/s as above. Binary: `{os.path.relpath(KILN, ROOT)}`.",
        "",
        "| technique | target sparsity | perplexity | vs dense | CPU tok/s | speedup | wall tok/s | speedup |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    bp = ppl[base]["perplexity"]
    for c in configs:
        p = ppl[c]["perplexity"]
        lines.append(f"| {c[0]} | {'—' if c[1] is None else f'{100 * c[1]:.0f}%'} | {p:.3f} | {100 * (p / bp - 1):+.1f}% | "
                     f"{cpu[c]:.1f} | {cpu[c] / cpu[base]:.2f}× | {best[c]:.1f} | {best[c] / best[base]:.2f}× |")
    lines.append("")
    lines.append(f"Generated by `bench/sparsity.py` in {time.time() - t0:.0f}s.")
    table = "\n".join(lines)
    print(table)
    text = open(a.out).read()
    begin, end = f"<!-- {a.marker}:begin -->", f"<!-- {a.marker}:end -->"
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    open(a.out, "w").write(head + begin + "\n" + table + "\n" + end + tail)
    json.dump({"eval": {f"{k}/{s}": v for (k, s), v in ppl.items()}, "cpu_decode": {f"{k}/{s}": v for (k, s), v in cpu_speeds.items()},
               "wall_decode": {f"{k}/{s}": v for (k, s), v in wall.items()}},
              open(os.path.join(a.work, f"{a.marker}.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
