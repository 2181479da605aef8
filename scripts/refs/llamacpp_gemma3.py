#!/usr/bin/env python3
"""Writes tests/fixtures/gemma3_270m_llamacpp.json: llama.cpp's view of the real Gemma-3-270M Q4_K_M
(scripts/fetch-gemma3.sh): the tokenization of a few texts (SentencePiece, specials parsed), the greedy
continuation of a prompt, and the perplexity of data/calibration.txt in one window (BOS first).

    pip install llama-cpp-python numpy      # builds llama.cpp from source the first time (~15 min)
    python3 scripts/refs/llamacpp_gemma3.py
"""
import hashlib, os, subprocess

from refs_common import ROOT, write_fixture
TEXTS = [
    "Once upon a time",
    "The capital of France is",
    "Hello, world! 123 4567 \u2014 na\u00efve caf\u00e9 \u2615 \u4f60\u597d",
    "  leading spaces\n\nand\ttabs",
    "<start_of_turn>user\nHi<end_of_turn>\n",
    "def f(x):\n    return x**2  # square",
]


def main():
    import llama_cpp
    import numpy as np

    path = subprocess.run(["bash", "scripts/fetch-gemma3.sh"], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout.strip()
    sha = hashlib.sha256(open(path, "rb").read()).hexdigest()
    # f32 KV cache: llama.cpp's default f16 cache alone moves the logits.
    llm = llama_cpp.Llama(model_path=path, n_ctx=2048, n_batch=2048, n_ubatch=512, n_threads=2, verbose=False,
                          logits_all=True, type_k=0, type_v=0)
    tokens = {t: llm.tokenize(t.encode(), add_bos=True, special=True) for t in TEXTS}
    prompt = tokens["The capital of France is"]
    llm.reset()
    llm.eval(prompt)
    greedy = []
    for _ in range(20):
        t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        greedy.append(t)
        llm.eval([t])
    text = open(os.path.join(ROOT, "data", "calibration.txt")).read()
    ids = llm.tokenize(text.encode(), add_bos=True, special=False)
    llm.reset()
    llm.eval(ids)
    sc = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
    nll = 0.0
    for i in range(1, len(ids)):
        row = sc[i - 1]
        m = row.max()
        nll += m + np.log(np.exp(row - m).sum()) - row[ids[i]]
    nll /= len(ids) - 1
    out = {
        "llama_cpp_python": llama_cpp.__version__,
        "sha256": sha,
        "tokens": tokens,
        "greedy_prompt": prompt,
        "greedy": greedy,
        "calibration": {"tokens": len(ids), "mean_nll": nll, "perplexity": float(np.exp(nll))},
    }
    write_fixture("gemma3_270m_llamacpp.json", out)
    print(f"greedy {greedy}, ppl {np.exp(nll):.4f}")


if __name__ == "__main__":
    main()
