"""Shared by the bench scripts: running `kiln` (eval results memoised in a work directory), CPU time of a
run, and splicing a generated table between `<!-- marker:begin/end -->` lines of a document."""
import json
import statistics
import os
import resource
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILN = os.environ.get("KILN_BIN", os.path.join(ROOT, "target/release/kiln"))

_MEMO = {}
_MEMO_FILE = None


def use_memo(path):
    """Remembers `kiln eval` outputs in `path` (delete it to measure afresh)."""
    global _MEMO_FILE
    _MEMO_FILE = path
    if os.path.exists(path):
        _MEMO.update(json.load(open(path)))


def kiln(args):
    """Runs kiln with `args`, returns its stdout; exits with its stderr if it fails."""
    key = " ".join(args)
    if args[0] == "eval" and key in _MEMO:
        return _MEMO[key]
    r = subprocess.run([KILN] + args, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"failed: kiln {' '.join(args)}\n{r.stderr}")
    if args[0] == "eval" and _MEMO_FILE:
        _MEMO[key] = r.stdout
        json.dump(_MEMO, open(_MEMO_FILE, "w"))
    return r.stdout


def cpu_run(args):
    """Runs kiln; returns (stdout, CPU seconds it used)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = kiln(args)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return out, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def splice(path, marker, table):
    """Replaces the text between `<!-- marker:begin -->` and `<!-- marker:end -->` in `path`."""
    text = open(path).read() if os.path.exists(path) else ""
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    open(path, "w").write(head + begin + "\n" + table + "\n" + end + tail)


def decode_speeds(configs, prompt, threads, rounds, decode_tokens):
    """Decode tok/s of every configuration (key -> extra `kiln run` arguments), measured together.

    Each configuration runs once first (compiling its artifact into the cache), then `rounds` interleaved
    rounds of a 16-token and a (16 + decode_tokens)-token run. Returns ({key: CPU tok/s}, {key: wall tok/s}):
    the extra tokens over the extra CPU seconds, median of the rounds (what time-sharing with other work
    does not inflate), and `kiln run`'s own decode rate, best of the rounds (other work only slows a run).
    """
    for args in configs.values():
        kiln(["run", "--prompt", prompt, "-n", "1", "--threads", str(threads)] + args)
    cpu = {c: [] for c in configs}
    wall = {c: [] for c in configs}
    for _ in range(rounds):
        for c, args in configs.items():
            base = ["run", "--prompt", prompt, "--ignore-eos", "--json", "--threads", str(threads)] + args
            _, short = cpu_run(base + ["-n", "16"])
            out, long = cpu_run(base + ["-n", str(16 + decode_tokens)])
            wall[c].append(json.loads(out)["decode_tok_per_s"])
            cpu[c].append(decode_tokens / max(long - short, 1e-9))
    return {c: statistics.median(v) for c, v in cpu.items()}, {c: max(v) for c, v in wall.items()}
