"""Shared by the bench scripts: running `kiln` (eval results memoised in a work directory), CPU time of a
run, and splicing a generated table between `<!-- marker:begin/end -->` lines of a document."""
import json
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
