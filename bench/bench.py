#!/usr/bin/env python3
"""Kiln vs llama.cpp (llama-cpp-python) on the same GGUF file, same thread count, in one run.

Prints a Markdown table of prefill and decode throughput (median of N alternating rounds), their
Kiln/llama.cpp ratios, peak RSS, Kiln's cold and cached compile times, and decode bytes per token against
the machine's measured memory read bandwidth. Usage:
    bench/bench.py [--model M.gguf] [--threads 2] [--rounds 3] [--prompt-tokens 180] [--decode-tokens 128]
Run through scripts/bench.sh, which builds Kiln in release mode and installs llama-cpp-python.
"""
import argparse, json, os, resource, shutil, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILN = os.path.join(ROOT, "target", "release", "kiln")


RUN_RSS_MIB = [0.0]  # peak RSS of the measured `kiln run`s of the compiled artifact (not of compiling)


def kiln(*args, env=None, track_rss=False):
    p = subprocess.Popen([KILN, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    stdout, stderr = p.communicate()
    if p.returncode != 0:
        sys.exit(f"kiln {' '.join(args)} failed:\n{stderr}")
    if track_rss:
        RUN_RSS_MIB[0] = max(RUN_RSS_MIB[0], json.loads(stdout).get("peak_rss_mib", 0.0))
    return subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)


def prompt_text():
    # A fixed, ordinary English text; its ids (cut to the prompt length) are fed to both engines.
    return ("The history of the printing press begins in the fifteenth century, when movable type made books "
            "cheap enough for ordinary readers. Within a few decades presses were running in every major city "
            "of Europe, and the flow of pamphlets, maps, calendars and scientific treatises changed how people "
            "learned, argued and governed. ") * 8


def read_bandwidth_gbs():
    """Best-of-5 single pass read of a 512 MiB buffer with all threads (numpy sum is memory bound)."""
    import numpy as np
    a = np.ones(128 * 1024 * 1024, dtype=np.float32)
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        a.sum()
        best = max(best, a.nbytes / (time.perf_counter() - t) / 1e9)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.environ.get("KILN_MODEL") or os.path.expanduser(
        "~/.cache/kiln/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=180)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    import llama_cpp

    work = tempfile.mkdtemp(prefix="kiln-bench-")
    env = dict(os.environ, KILN_CACHE_DIR=os.path.join(work, "cache"))
    # Compile: cold (fresh cache), then cached (same command again).
    t = time.perf_counter(); kiln("run", args.model, "--prompt-ids", "1", "-n", "1", "--json", env=env)
    cold = time.perf_counter() - t
    t = time.perf_counter(); kiln("run", args.model, "--prompt-ids", "1", "-n", "1", "--json", env=env)
    cached_run = time.perf_counter() - t
    art = os.path.join(work, "artifact")
    t = time.perf_counter(); kiln("compile", args.model, "-o", art)
    compile_only = time.perf_counter() - t
    manifest = json.load(open(os.path.join(art, "manifest.json")))

    # The prompt: ordinary text cut to the requested number of tokens.
    text = prompt_text()
    llm = llama_cpp.Llama(model_path=args.model, n_threads=args.threads, n_threads_batch=args.threads,
                          n_ctx=args.prompt_tokens + args.decode_tokens + 8, n_batch=512, verbose=False)
    ids = llm.tokenize(text.encode(), add_bos=False)[: args.prompt_tokens]
    ids_arg = ",".join(map(str, ids))

    def kiln_round():
        p = json.loads(kiln("run", art, "--prompt-ids", ids_arg, "-n", "1", "--json", "--threads", str(args.threads),
                            track_rss=True).stdout)
        d = json.loads(kiln("run", art, "--prompt-ids", ",".join(map(str, ids[:8])), "-n", str(args.decode_tokens + 1),
                            "--ignore-eos", "--json", "--threads", str(args.threads), track_rss=True).stdout)
        return p["prefill_tok_per_s"], d["decode_tok_per_s"]

    def llama_round():
        llm.reset()
        t = time.perf_counter(); llm.eval(ids); prefill = len(ids) / (time.perf_counter() - t)
        llm.reset()
        llm.eval(ids[:8])
        tok = llm.sample(temp=0)
        t = time.perf_counter()
        for _ in range(args.decode_tokens):
            llm.eval([int(tok)])
            tok = llm.sample(temp=0)
        return prefill, args.decode_tokens / (time.perf_counter() - t)

    # One discarded warm-up round each (llama.cpp's first decode after a prefill is far slower), then
    # alternating measured rounds.
    kiln_round()
    llama_round()
    k_runs, l_runs = [], []
    for _ in range(args.rounds):
        k_runs.append(kiln_round())
        l_runs.append(llama_round())
    med = lambda xs, i: statistics.median(x[i] for x in xs)
    kp, kd, lp, ld = med(k_runs, 0), med(k_runs, 1), med(l_runs, 0), med(l_runs, 1)
    kiln_rss = RUN_RSS_MIB[0]
    self_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    bw = read_bandwidth_gbs()
    bytes_per_token = manifest["weights_len"]
    pct = bytes_per_token * kd / (bw * 1e9) * 100
    lpct = bytes_per_token * ld / (bw * 1e9) * 100
    rows = [
        ("prefill tok/s (%d-token prompt)" % len(ids), f"{kp:.1f}", f"{lp:.1f}", f"{kp / lp:.2f}x"),
        ("decode tok/s (%d tokens)" % args.decode_tokens, f"{kd:.1f}", f"{ld:.1f}", f"{kd / ld:.2f}x"),
        ("peak RSS (MiB; Kiln: `kiln run` of the artifact)", f"{kiln_rss:.0f}", f"{self_rss:.0f} (python+llama.cpp)", ""),
        ("compile: cold `kiln compile`", f"{compile_only:.2f} s", "", ""),
        ("compile: first `kiln run` (cold cache, incl. load+1 token)", f"{cold:.2f} s", "", ""),
        ("compile: second `kiln run` (cached, incl. load+1 token)", f"{cached_run:.2f} s", "", ""),
        ("decode bytes/token (weights)", f"{bytes_per_token / 1e6:.1f} MB", "same file", ""),
        ("decode bandwidth use (of %.1f GB/s measured)" % bw, f"{pct:.0f}%", f"{lpct:.0f}%", ""),
    ]
    print(f"model: {os.path.basename(args.model)}; threads: {args.threads}; rounds: {args.rounds} (median); "
          f"CPU: {manifest['target']['cpu']} ({', '.join(manifest['target']['features'])})\n")
    print("| metric | Kiln | llama.cpp | Kiln/llama.cpp |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    if args.json:
        print(json.dumps({"kiln": k_runs, "llama_cpp": l_runs, "bandwidth_gbs": bw}))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
