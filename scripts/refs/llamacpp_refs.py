#!/usr/bin/env python3
"""Writes tests/fixtures/llamacpp_refs.json: llama.cpp's greedy ids and last-prompt logits for the tiny
seeded random GGUF models that `tests/llamacpp.rs` generates (Llama 3.x with a rope_freqs.weight tensor
as llama.cpp's converter writes it, the same model without it, Qwen3, Phi-3, Gemma 3).

Run once when the generated models change (the fixture records each file's FNV-1a hash, and the test
says so when they no longer match):

    pip install llama-cpp-python numpy      # builds llama.cpp from source the first time (~15 min)
    python3 scripts/refs/llamacpp_refs.py
"""
import os, sys

from refs_common import fnv1a64, reference_models, write_fixture


def main():
    import llama_cpp
    import numpy as np

    out, spec = reference_models("llamacpp::write_llamacpp_reference_models")
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
            "fnv1a64": fnv1a64([path]),
            "greedy": ids,
            "last_prompt_logits": last,
        }
        print(f"{name}: {ids}", file=sys.stderr)
    write_fixture("llamacpp_refs.json", result)


if __name__ == "__main__":
    main()
