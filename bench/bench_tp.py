#!/usr/bin/env python3
"""Tensor parallelism on CPU ranks: tp=1 vs tp=N unfused vs tp=N fused (fuse-allreduce-rmsnorm), one run.

Each configuration runs `kiln run --json` (under mpirun for tp > 1; kiln starts it) on the same prompt,
rounds interleaved so that machine noise hits all three alike; the table gives medians over rounds.
Communicated bytes are per rank per step, under the ring model (all-reduce 2(n-1)/n of the tensor,
reduce-scatter and all-gather (n-1)/n each); time is wall time inside the collectives on rank 0.
Greedy ids of every configuration must equal tp=1's (the run stops otherwise).
"""
import argparse, json, statistics, subprocess, sys

p = argparse.ArgumentParser()
p.add_argument("--kiln", default="target/release/kiln")
p.add_argument("--model", default=None)
p.add_argument("--tp", type=int, default=2)
p.add_argument("--prompt-tokens", type=int, default=64)
p.add_argument("--gen", type=int, default=32)
p.add_argument("--rounds", type=int, default=3)
p.add_argument("--threads", type=int, default=1, help="threads per rank")
a = p.parse_args()

prompt = ",".join(str(1000 + (i * 37) % 20000) for i in range(a.prompt_tokens))
per_rank = a.threads or 1
# tp=1 on as many threads as the N ranks together (same cores), and on one thread (same per-rank work).
configs = [
    ("tp=1", ["--tp", "1", "--threads", str(per_rank * a.tp)]),
    (f"tp=1, {per_rank} thread(s)", ["--tp", "1", "--threads", str(per_rank)]),
    (f"tp={a.tp} unfused", ["--tp", str(a.tp), "--no-fuse", "--threads", str(per_rank)]),
    (f"tp={a.tp} fused", ["--tp", str(a.tp), "--threads", str(per_rank)]),
]

def run(extra):
    cmd = [a.kiln, "run"] + ([a.model] if a.model else []) + ["--prompt-ids", prompt, "-n", str(a.gen), "--ignore-eos", "--json"] + extra
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr}")
    return json.loads(out.stdout)

for _, extra in configs:  # compile (cached) before timing
    run(extra)
res = {name: [] for name, _ in configs}
for r in range(a.rounds):
    for name, extra in configs:
        res[name].append(run(extra))
base_ids = res["tp=1"][0]["generated_ids"]
for name, rs in res.items():
    for r in rs:
        if r["generated_ids"] != base_ids:
            sys.exit(f"{name}: greedy ids differ from tp=1")

med = lambda xs: statistics.median(xs)
print(f"prompt {a.prompt_tokens} tokens, {a.gen} generated, {a.rounds} rounds (medians); greedy ids identical in every run\n")
print("| config | prefill ms | decode ms/token | comm bytes/prefill | comm ms/prefill | comm bytes/decode step | comm ms/decode step | calls/decode step |")
print("|---|---|---|---|---|---|---|---|")
base = None
for name, rs in res.items():
    pre = med([r["prefill_ms"] for r in rs])
    dec = med([r["decode_ms"] / max(1, len(r["generated_ids"]) - 1) for r in rs])
    c = rs[0]["comm"]
    cp = med([(r["comm"]["prefill"] or {}).get("ms", 0.0) for r in rs])
    cd = med([r["comm"]["decode_step"]["ms"] for r in rs])
    print(f"| {name} | {pre:.1f} | {dec:.2f} | {int((c['prefill'] or {}).get('bytes', 0))} | {cp:.2f} | {int(c['decode_step']['bytes'])} | {cd:.2f} | {c['decode_step']['calls']:.0f} |")
    if base is None:
        base = (pre, dec)
print()
for name, rs in res.items():
    pre = med([r["prefill_ms"] for r in rs]); dec = med([r["decode_ms"] / max(1, len(r["generated_ids"]) - 1) for r in rs])
    print(f"- {name}: prefill {base[0] / pre:.2f}x, decode {base[1] / dec:.2f}x of tp=1")
