#!/usr/bin/env python3
"""Activation sparsity (and later weight sparsity) on the default model: perplexity on data/eval.txt and
decode speed per target sparsity, every configuration measured in the same run.

Writes the table between the `sparsity:begin`/`sparsity:end` markers of docs/quality.md:
  1. `kiln calibrate` on data/calibration.txt (per-channel activation quantiles: the thresholds);
  2. per configuration, `kiln eval` on data/eval.txt;
  3. decode speed from `kiln run`, interleaved over rounds (CPU tok/s as in bench/quality.py).

Usage: scripts/quality.sh --sparsity [--rounds 3] [--sparsities 0,0.25,0.5,0.7,0.9] [--scopes mlp,attn,all]
       python3 bench/sparsity.py --sparsities "" --coreinfer 'alpha=0.4,beta=0.2;…' --prompt-len 128 --marker coreinfer
       [--nm 2:4,3:4 --nm-methods magnitude,wanda]   (N:M weight pruning; needs `kiln bench --kernels`)
       [--unstructured 0.25,0.5,0.7 --unstructured-methods magnitude,wanda --unstructured-patterns unstructured,1x8]
                                                     (per-element / 1×8 weight pruning into the bitmap form)
  [--mlp-forms gate,act,input,io] [--thresholds channel,layer]   CHESS variants (scope mlp; docs/sparsity.md)
  [--rsparse attn:16,mlp:64:layer --rsparse-sparsities 0.25,0.5,0.7]  R-Sparse rows (scope:rank[:thresholds])
  [--no-decode]                                                  perplexity only
"""
import argparse
import json
import os
import sys
import time

from kilnbench import KILN, ROOT, decode_speeds, kiln, splice, use_memo


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sparsities", default="0,0.25,0.5,0.7,0.9", help="chess target sparsities ('' for none)")
    ap.add_argument("--scopes", default="mlp", help="chess scopes measured at each sparsity: mlp, attn, all (comma list)")
    ap.add_argument("--mlp-forms", default="gate", help="--chess-mlp forms measured with scope mlp (comma list)")
    ap.add_argument("--thresholds", default="channel", help="--chess-thresholds kinds measured (comma list)")
    ap.add_argument("--rsparse", default="", help="R-Sparse rows: SCOPE:RANK[:layer] comma list, e.g. attn:16,mlp:64:layer")
    ap.add_argument("--rsparse-sparsities", default="0.25,0.5,0.7")
    ap.add_argument("--no-decode", action="store_true", help="measure perplexity only")
    ap.add_argument("--calibration", default="", help="calibration file (default: made in --work)")
    ap.add_argument("--text", default="data/eval.txt", help="evaluation text")
    ap.add_argument("--prune", default="", help="magnitude-pruning sparsities, e.g. 0.25,0.5,0.7 (needs `kiln bench --kernels`)")
    ap.add_argument("--prune-methods", default="magnitude", help="ranking for --prune: magnitude, wanda (comma list)")
    ap.add_argument("--nm", default="", help="N:M pruning patterns, e.g. 2:4,3:4,2:8 (needs `kiln bench --kernels`)")
    ap.add_argument("--nm-methods", default="magnitude,wanda", help="ranking for --nm: magnitude, wanda (comma list)")
    ap.add_argument("--unstructured", default="", help="bitmap-pruning sparsities, e.g. 0.25,0.5,0.7 (needs `kiln bench --kernels`)")
    ap.add_argument("--unstructured-methods", default="magnitude,wanda", help="ranking for --unstructured (comma list)")
    ap.add_argument("--unstructured-patterns", default="unstructured", help="--prune-pattern for --unstructured: unstructured, 1x8")
    ap.add_argument("--structured", default="", help="structured-pruning specs separated by ';', e.g. 'neurons=0.25;heads=1'")
    ap.add_argument("--coreinfer", default="", help="CoreInfer specs separated by ';', e.g. 'alpha=0.4,beta=0.2;alpha=0.2'")
    ap.add_argument("--prompt-len", type=int, default=0,
                    help="kiln eval --prompt-len: each window's first P tokens are an unscored prompt (every configuration)")
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
    use_memo(os.path.join(a.work, "sparsity-evals.json"))
    t0 = time.time()
    # v2 files without the attention-output quantiles cannot drive `--chess-scope attn/all`.
    # v2 files without the MLP input/down-input quantiles cannot drive `--chess-mlp act/input/io`.
    calib = a.calibration or os.path.join(a.work, "calib-v2c.json")
    needs_calib = a.sparsities or a.structured or a.prune or a.nm or a.rsparse or a.unstructured
    if needs_calib and not os.path.exists(calib):
        kiln(["calibrate", "--text", "data/calibration.txt", "-o", calib])
    scopes = [sc for sc in a.scopes.split(",") if sc]
    sparsities = [float(s) for s in a.sparsities.split(",") if s]
    # A chess configuration: (label, sparsity) with its flags in `chess_flags`.
    chess_flags = {}
    configs = [("dense", None)]
    for sc in scopes:
        forms = a.mlp_forms.split(",") if sc != "attn" else ["gate"]
        for form in forms:
            for kind in a.thresholds.split(","):
                label = "chess" if sc == "mlp" else f"chess ({sc})"
                flags = ["--chess-scope", sc]
                if form != "gate":
                    label += f" {form}"
                    flags += ["--chess-mlp", form]
                if kind != "channel":
                    label += f", per-{kind}"
                    flags += ["--chess-thresholds", kind]
                chess_flags[label] = flags
                configs += [(label, s) for s in sparsities]
    for spec in [x for x in a.rsparse.split(",") if x]:
        sc, rank, *kind = spec.split(":")
        label = f"r-sparse ({sc}, rank {rank}{', per-' + kind[0] if kind else ''})"
        chess_flags[label] = ["--chess-scope", sc, "--rsparse-rank", rank]
        if kind:
            chess_flags[label] += ["--chess-thresholds", kind[0]]
        configs += [(label, float(s)) for s in a.rsparse_sparsities.split(",") if s]
    configs += [(f"prune ({meth})", float(s)) for meth in a.prune_methods.split(",") if meth
                for s in a.prune.split(",") if s]
    configs += [(f"N:M ({meth})", pat) for pat in a.nm.split(",") if pat for meth in a.nm_methods.split(",") if meth]
    configs += [(f"{pat} ({meth})", float(s)) for pat in a.unstructured_patterns.split(",") if pat
                for meth in a.unstructured_methods.split(",") if meth for s in a.unstructured.split(",") if s]
    configs += [("structured", s) for s in a.structured.split(";") if s]
    configs += [("coreinfer", s) for s in a.coreinfer.split(";") if s]

    def opts(c):
        tech, s = c
        if tech in chess_flags:
            return ["--chess-sparsity", str(s)] + chess_flags[tech] + ["--calibration", calib]
        if tech == "structured":
            return ["--structured-prune", s, "--calibration", calib]
        if tech == "coreinfer":
            return ["--coreinfer", s]
        if tech.startswith("N:M"):
            return ["--prune-pattern", s, "--prune-method", tech[len("N:M ("):-1], "--calibration", calib]
        if tech.startswith(("unstructured (", "1x8 (")):
            pat, meth = tech[:-1].split(" (")
            return ["--prune-pattern", pat, "--prune-sparsity", str(s), "--prune-method", meth, "--calibration", calib]
        if tech.startswith("prune"):
            meth = tech[len("prune ("):-1]
            return ["--prune-sparsity", str(s), "--prune-method", meth] + (["--calibration", calib] if meth == "wanda" else [])
        return []

    ppl = {}
    for c in configs:
        out = json.loads(kiln(["eval", "--text", a.text, "--json", "--window", str(a.window), "--stride",
                               str(a.stride), "--threads", str(a.eval_threads)]
                              + (["--prompt-len", str(a.prompt_len)] if a.prompt_len else []) + opts(c)))
        ppl[c] = out["report"]
        print(f"eval {c}: ppl {out['report']['perplexity']:.3f} ({time.time() - t0:.0f}s)", file=sys.stderr)

    base = configs[0]
    prompt = "The history of the bicycle begins"
    # CoreInfer's core set depends on the prompt: its share of the MLP neurons after the decode prompt.
    core = {c: json.loads(kiln(["run", "--prompt", prompt, "-n", "1", "--json"] + opts(c))).get("core_share")
            for c in configs if c[0] == "coreinfer"}
    bp = ppl[base]["perplexity"]
    scored = (f"; each window's first {a.prompt_len} tokens are an unscored prompt (`--prompt-len`), "
              f"{ppl[base]['scored']} tokens scored" if a.prompt_len else "")
    head = (f"Perplexity on `{a.text}` ({ppl[base]['tokens']} tokens, window {a.window}, stride {a.stride}{scored})")
    if a.no_decode:
        cpu, best = {}, {}
        lines = [f"{head}. Binary: `{os.path.relpath(KILN, ROOT)}`.", "",
                 "| technique | target sparsity | perplexity | vs dense |", "|---|---:|---:|---:|"]
    else:
        # Every configuration is compiled (one short run) before any timed run.
        cpu, best = decode_speeds({c: opts(c) for c in configs}, prompt, a.threads,
                                  a.rounds, a.decode_tokens)
        lines = [
            f"{head}; decode: {a.decode_tokens} greedy tokens, {a.threads} thread(s), compiled backend, {a.rounds} "
            f"interleaved rounds, CPU tok/s and wall tok/s as above. Binary: `{os.path.relpath(KILN, ROOT)}`.",
            "",
            "| technique | target sparsity | perplexity | vs dense | CPU tok/s | speedup | wall tok/s | speedup |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
    for c in configs:
        p = ppl[c]["perplexity"]
        target = "—" if c[1] is None else c[1] if isinstance(c[1], str) else f"{100 * c[1]:.0f}%"
        if core.get(c) is not None:
            target += f" (core set {100 * core[c]:.0f}%)"
        if c[0].startswith("N:M"):
            n, m = map(int, c[1].split(":"))
            target = f"{c[1]} = {100 * (1 - n / m):.0f}%"
        row = f"| {c[0]} | {target} | {p:.3f} | {100 * (p / bp - 1):+.1f}% |"
        if not a.no_decode:
            row += f" {cpu[c]:.1f} | {cpu[c] / cpu[base]:.2f}× | {best[c]:.1f} | {best[c] / best[base]:.2f}× |"
        lines.append(row)
    lines.append("")
    lines.append(f"Generated by `bench/sparsity.py` in {time.time() - t0:.0f}s.")
    table = "\n".join(lines)
    print(table)
    splice(a.out, a.marker, table)
    json.dump({"eval": {f"{k}/{s}": v for (k, s), v in ppl.items()}, "cpu_decode": {f"{k}/{s}": v for (k, s), v in cpu.items()},
               "wall_decode": {f"{k}/{s}": v for (k, s), v in best.items()}},
              open(os.path.join(a.work, f"{a.marker}.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
