#!/usr/bin/env python3
"""Writes tests/fixtures/llamacpp_refs.json: llama.cpp's greedy ids and last-prompt logits for the tiny
seeded random GGUF models that `tests/llamacpp.rs` generates (Llama 3.x with a rope_freqs.weight tensor
as llama.cpp's converter writes it, the same model without it, Qwen3 with qk-norm).

Run once when the generated models change (the fixture records each file's FNV-1a hash, and the test
says so when they no longer match):

    pip install llama-cpp-python numpy      # builds llama.cpp from source the first time (~15 min)
    python3 scripts/refs/llamacpp_rope_scaling.py
"""
import json, os, subprocess, sys, tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def fnv1a64(data: bytes) -> str:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def main():
    import llama_cpp
    import numpy as np

    out = tempfile.mkdtemp(prefix="kiln-ref-")
    env = dict(os.environ, KILN_REF_OUT=out)
    subprocess.run(
        ["cargo", "test", "--locked", "--test", "main", "--", "--ignored", "--exact",
         "llamacpp::write_llamacpp_reference_models"],
        cwd=ROOT, env=env, check=True)
    spec = json.load(open(os.path.join(out, "spec.json")))
    prompt, n = spec["prompt"], spec["generate"]
    result = {"llama_cpp_python": llama_cpp.__version__, "prompt": prompt, "models": {}}
    for name in spec["models"]:
        path = os.path.join(out, f"{name}.gguf")
        # f32 KV cache (llama.cpp's default is f16, which alone moves logits by ~1e-3).
        llm = llama_cpp.Llama(model_path=path, n_ctx=spec["context"], n_batch=len(prompt), n_threads=1,
                              logits_all=True, verbose=False, type_k=0, type_v=0)
        llm.eval(prompt)
        last = [float(x) for x in np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float32)]
        ids = []
        for _ in range(n):
            t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            ids.append(t)
            llm.eval([t])
        result["models"][name] = {
            "fnv1a64": fnv1a64(open(path, "rb").read()),
            "greedy": ids,
            "last_prompt_logits": last,
        }
        print(f"{name}: {ids}", file=sys.stderr)
    dst = os.path.join(ROOT, "tests", "fixtures", "llamacpp_refs.json")
    with open(dst, "w") as f:
        json.dump(result, f)
        f.write("\n")
    print(f"wrote {dst}", file=sys.stderr)


if __name__ == "__main__":
    main()
