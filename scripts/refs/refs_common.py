"""What the reference scripts share: the repository root, FNV-1a 64 (the hash the Rust tests compute
over the files a reference ran on), writing the reference models through an ignored Rust test, and
writing a fixture."""
import json, os, subprocess, sys, tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def fnv1a64(paths):
    h = 0xCBF29CE484222325
    for p in paths:
        for b in open(p, "rb").read():
            h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def reference_models(test):
    """Runs the ignored test `test` (it writes the models and spec.json into $KILN_REF_OUT); returns
    (the folder, the spec)."""
    out = tempfile.mkdtemp(prefix="kiln-ref-")
    subprocess.run(["cargo", "test", "--locked", "--test", "main", "--", "--ignored", "--exact", test],
                   cwd=ROOT, env=dict(os.environ, KILN_REF_OUT=out), check=True)
    return out, json.load(open(os.path.join(out, "spec.json")))


def write_fixture(name, result):
    dst = os.path.join(ROOT, "tests", "fixtures", name)
    with open(dst, "w") as f:
        json.dump(result, f, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {dst}", file=sys.stderr)
