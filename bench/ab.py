#!/usr/bin/env python3
"""Two kiln binaries side by side (e.g. before and after a refactor): same model, prompt and threads,
runs interleaved A, B, A, B, …, each `kiln run --prompt-ids … -n N --json` from its own artifact cache
(compiled once, before timing). Prints the best and the median of each metric and the B/A ratios.

    python3 bench/ab.py --a /tmp/kiln-before --b target/release/kiln --rounds 5
"""
import argparse, json, os, statistics, subprocess, sys, tempfile


def run(binary, cache, model, ids, n, threads):
    env = dict(os.environ, KILN_CACHE_DIR=cache)
    cmd = [binary, "run", model, "--prompt-ids", ",".join(map(str, ids)), "-n", str(n), "--json"]
    if threads:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", required=True, help="the baseline kiln binary")
    ap.add_argument("--b", required=True, help="the kiln binary compared with it")
    ap.add_argument("--model", default=os.environ.get("KILN_MODEL") or os.path.expanduser(
        "~/.cache/kiln/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--prompt-tokens", type=int, nargs="+", default=[180, 512])
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as ca, tempfile.TemporaryDirectory() as cb:
        for cache in (ca, cb):
            os.makedirs(os.path.join(cache, "models"))
            os.symlink(a.model, os.path.join(cache, "models", os.path.basename(a.model)))
        for p in a.prompt_tokens:
            # Deterministic ids inside SmolLM2's vocabulary (any model with ≥ 4000 tokens).
            ids = [1 + (i * 7919) % 4000 for i in range(p)]
            for b, c in ((a.a, ca), (a.b, cb)):
                run(b, c, a.model, ids, 2, a.threads)  # compile into the cache
            res = {"a": [], "b": []}
            for _ in range(a.rounds):
                for key, b, c in (("a", a.a, ca), ("b", a.b, cb)):
                    res[key].append(run(b, c, a.model, ids, a.decode_tokens, a.threads))
            same = all(r["generated_ids"] == res["a"][0]["generated_ids"] for r in res["a"] + res["b"])
            for metric in ("prefill_tok_per_s", "decode_tok_per_s", "peak_rss_mib"):
                va = [r[metric] for r in res["a"]]
                vb = [r[metric] for r in res["b"]]
                best = (min if metric == "peak_rss_mib" else max)
                rows.append((p, metric, best(va), best(vb), statistics.median(va), statistics.median(vb), same))
    print(f"| prompt | metric | A best | B best | B/A best | A median | B median | B/A median | same ids |")
    print("|---|---|---|---|---|---|---|---|---|")
    for p, m, ba, bb, ma, mb, same in rows:
        print(f"| {p} | {m} | {ba:.1f} | {bb:.1f} | {bb / ba:.3f} | {ma:.1f} | {mb:.1f} | {mb / ma:.3f} | {same} |")


if __name__ == "__main__":
    sys.exit(main())
