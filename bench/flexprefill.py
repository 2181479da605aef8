#!/usr/bin/env python3
"""FlexPrefill (`--flex-prefill`) on long prompts: dense vs sparse prefill time side by side, how far the
last-position logits move, and how many of the following greedy tokens stay the same.

Prompts are real text (data/eval.txt, tokenized by one short `kiln run`) repeated to ~2k, 4k and ~8k tokens
(the 8k one leaves room for the greedy tokens in the 8192-token context). Each configuration is compiled
first (untimed); then dense and FlexPrefill runs alternate, and the table reports the median `prefill_ms`
of each and their ratio. Writes a table between `<!-- flexprefill:begin/end -->` in docs/quality.md.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kilnbench import ROOT, kiln, splice  # noqa: E402

CONTEXT = 8192


def text_ids(chars):
    text = open(os.path.join(ROOT, "data/eval.txt")).read()[:chars]
    out = kiln(["run", "--prompt", text, "-n", "1", "--json", "--threads", "1"])
    return json.loads(out)["prompt_ids"]


def run(ids, n, threads, extra, logits_path):
    args = ["run", "--prompt-ids", ",".join(map(str, ids)), "-n", str(n), "--ignore-eos", "--json",
            "--threads", str(threads), "--logits-out", logits_path] + extra
    r = json.loads(kiln(args))
    logits = json.load(open(logits_path))
    return r["prefill_ms"], r["generated_ids"], logits[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="2048,4096,8160")
    ap.add_argument("--greedy", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--flex", default="gamma=0.9,tau=0.1,block=64,min-len=1024")
    ap.add_argument("--build", default="release", help="which kiln build measured (for the table's text)")
    ap.add_argument("--doc", default=os.path.join(ROOT, "docs/quality.md"))
    a = ap.parse_args()
    lengths = [int(x) for x in a.lengths.split(",")]
    base = text_ids(9000)
    flex = ["--flex-prefill", a.flex]
    tmp = tempfile.mkdtemp()
    lp = os.path.join(tmp, "logits.json")
    # Compile both artifacts (cached) before timing.
    for extra in ([], flex):
        kiln(["run", "--prompt-ids", ",".join(map(str, base[:8])), "-n", "1", "--threads", "1"] + extra)
    rows = []
    for n in lengths:
        if n + a.greedy > CONTEXT:
            sys.exit(f"{n} prompt tokens + {a.greedy} greedy tokens exceed the {CONTEXT}-token context")
        ids = (base * (n // len(base) + 1))[:n]
        times = {"dense": [], "flex": []}
        for _ in range(a.rounds):
            dt, dgen, dlog = run(ids, a.greedy, a.threads, [], lp)
            ft, fgen, flog = run(ids, a.greedy, a.threads, flex, lp)
            times["dense"].append(dt)
            times["flex"].append(ft)
        diff = max(abs(x - y) for x, y in zip(dlog, flog))
        scale = max(abs(x) for x in dlog)
        same_prefix = next((i for i, (x, y) in enumerate(zip(dgen, fgen)) if x != y), len(dgen))
        same = sum(x == y for x, y in zip(dgen, fgen))
        d, f = statistics.median(times["dense"]), statistics.median(times["flex"])
        row = dict(tokens=n, dense_ms=d, flex_ms=f, speedup=d / f, max_abs=diff, rel=diff / scale,
                   argmax_same=dlog.index(max(dlog)) == flog.index(max(flog)), prefix=same_prefix, same=same,
                   greedy=len(dgen))
        print(json.dumps(row), flush=True)
        rows.append(row)
    lines = [
        f"FlexPrefill `--flex-prefill {a.flex}` vs dense attention, SmolLM2-135M Q4_1, {a.threads} threads, "
        f"{a.build} build of kiln (the kernels are LLVM -O3 either way), prompts of data/eval.txt tokens repeated; median of {a.rounds} alternating run(s). "
        "Logit difference: the last prompt position's logits; greedy: the following tokens (same prefix / same "
        "positions of all).",
        "",
        "| prompt tokens | dense prefill | FlexPrefill prefill | speedup | last-logits max abs diff (rel.) "
        "| same argmax | greedy tokens same (prefix / all) |",
        "|---:|---:|---:|---:|---:|:-:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tokens']} | {r['dense_ms'] / 1e3:.1f} s | {r['flex_ms'] / 1e3:.1f} s | {r['speedup']:.2f}× "
            f"| {r['max_abs']:.3f} ({r['rel']:.2%}) | {'yes' if r['argmax_same'] else 'no'} "
            f"| {r['prefix']} / {r['same']} of {r['greedy']} |"
        )
    splice(a.doc, "flexprefill", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
