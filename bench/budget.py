#!/usr/bin/env python3
"""The joint `--quality-budget` choice against its best single technique and the dense model, side by side.

1. `kiln compile --quality-budget B --calibration C --json` (the search; measured on the calibration text);
2. perplexity of dense, the best single technique (least estimated decode bytes within the budget) and the
   joint choice on the evaluation text (never used by the search);
3. decode speed of the three, interleaved over rounds (bench/kilnbench.py).
Writes the table between the `budget-joint:begin/end` markers of docs/quality.md.

Usage: KILN_BIN=target/debug/kiln python3 bench/budget.py [--budget ppl+10%] [--rounds 3]
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from kilnbench import KILN, ROOT, decode_speeds, kiln, splice, use_memo  # noqa: E402


def flags(j, mlp_form="gate"):
    """`kiln` flags for a budget point (`kiln::budget::Joint::apply`; `mlp_form`: the search's `chess_mlp`)."""
    f = []
    if j["skip"]:
        f += ["--skip-layers", str(j["skip"]), "--skip-method", "influence"]
    if j["chess"] or j["attn"]:
        scope = "all" if j["chess"] and j["attn"] else "mlp" if j["chess"] else "attn"
        f += ["--chess-sparsity", str(j["chess"] or j["attn"]), "--chess-scope", scope, "--chess-thresholds", "layer"]
        if scope == "all":
            f += ["--chess-attn-sparsity", str(j["attn"])]
        if j["chess"]:
            f += ["--chess-mlp", mlp_form]
    if j["prune"]:
        f += ["--prune-sparsity", str(j["prune"]), "--prune-method", "magnitude"]
    if j["neurons"] or j["heads"]:
        f += ["--structured-prune", f"neurons={j['neurons']},heads={j['heads']}"]
    return f


def describe(j):
    p = [f"{k} {100 * v:g}%" if isinstance(v, float) else f"{k} {v}" for k, v in j.items() if v]
    return " + ".join(p) or "dense"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", default="ppl+10%")
    ap.add_argument("--text", default="data/eval.txt")
    ap.add_argument("--work", default=os.path.join(ROOT, "target/quality-budget"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-threads", type=int, default=0)
    ap.add_argument("--cost", default="measured", choices=["measured", "bytes"],
                    help="what the search minimises (kiln compile --budget-cost)")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs/quality.md"))
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    use_memo(os.path.join(a.work, "budget-evals.json"))
    t0 = time.time()
    calib = os.path.join(a.work, "calib.json")
    if not os.path.exists(calib):
        kiln(["calibrate", "--text", "data/calibration.txt", "-o", calib])
    out = json.loads(kiln(["compile", "--quality-budget", a.budget, "--calibration", calib, "--json",
                           "--budget-cost", a.cost, "--budget-threads", str(a.threads), "-o", os.path.join(a.work, "art")]))
    q = out["quality_budget"]
    rec = next(r for r in out["records"] if "estimated_bytes" in r)
    key = lambda j: tuple(sorted((k, float(v)) for k, v in j.items()))
    est = {key(e["config"]): e["bytes"] for e in rec["estimated_bytes"]}
    est_of = lambda j: est[key(j)] / est[key({k: 0 for k in j})]
    single = min(q["best_single"], key=lambda c: c["cost"])
    rows = [("dense", {k: 0 for k in q["config"]}, q["baseline_perplexity"], q["baseline_cost"]),
            ("best single technique", single["config"], single["perplexity"], single["cost"]),
            ("joint budget choice", q["config"], q["perplexity"], q["cost"])]
    form = rec.get("chess_mlp", "gate")
    opts = {r[0]: flags(r[1], form) + (["--calibration", calib] if any(r[1].values()) else []) for r in rows}
    ppl = {}
    for name, _, _, _ in rows:
        r = json.loads(kiln(["eval", "--text", a.text, "--json", "--window", "512", "--stride", "256", "--threads",
                        str(a.eval_threads)] + opts[name]))
        ppl[name] = r["report"]["perplexity"]
        print(f"eval {name}: {ppl[name]:.3f} ({time.time() - t0:.0f}s)", file=sys.stderr)
    cpu, wall = decode_speeds(opts, "The history of the bicycle begins", a.threads, a.rounds, a.decode_tokens)
    d = rows[0][0]
    lines = [
        f"`{a.budget}` on `data/calibration.txt` (limit {q['limit']:.3f}); perplexity on `{a.text}` (window 512, "
        f"stride 256); decode: {a.decode_tokens} greedy tokens, {a.threads} thread(s), {a.rounds} interleaved rounds. "
        f"Search cost: {rec['cost']} (`--budget-cost {a.cost}`, a step must save {100 * rec['min_saving']:g}%). "
        f"Binary: `{os.path.relpath(KILN, ROOT)}`.",
        "",
        "| configuration | flags | calib. ppl | search cost | est. decode bytes | eval ppl | vs dense | CPU tok/s | speedup | wall tok/s | speedup |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, j, cp, cost in rows:
        lines.append(
            f"| {name if name == d else name + ': ' + describe(j)} | `{' '.join(flags(j, form)) or '—'}` | {cp:.3f} | {100 * cost / q['baseline_cost']:.1f}% | {100 * est_of(j):.1f}% | "
            f"{ppl[name]:.3f} | {100 * (ppl[name] / ppl[d] - 1):+.1f}% | {cpu[name]:.1f} | {cpu[name] / cpu[d]:.2f}× | "
            f"{wall[name]:.1f} | {wall[name] / wall[d]:.2f}× |")
    lines += ["", f"Generated by `bench/budget.py` in {time.time() - t0:.0f}s."]
    table = "\n".join(lines)
    print(table)
    splice(a.out, "budget-joint", table)


if __name__ == "__main__":
    main()
