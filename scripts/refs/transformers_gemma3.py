#!/usr/bin/env python3
"""Writes tests/fixtures/gemma3_270m_transformers.json: Hugging Face transformers (f32, eager attention)
on the real Gemma-3-270M Q4_K_M GGUF dequantized to f32 (transformers' own GGUF loader): the greedy
continuation of a prompt and the perplexity of data/calibration.txt in one window, BOS first. The token
ids come from llama.cpp's tokenizer on the same file (tests/gemma3.rs checks Kiln's tokenizer against it).

    pip install torch transformers gguf accelerate llama-cpp-python numpy
    python3 scripts/refs/transformers_gemma3.py
"""
import hashlib, os, subprocess

from refs_common import ROOT, write_fixture


def main():
    import llama_cpp, numpy as np, torch, transformers
    from transformers import AutoModelForCausalLM

    path = subprocess.run(["bash", "scripts/fetch-gemma3.sh"], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout.strip()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 torch_dtype=torch.float32, attn_implementation="eager")
    model.eval()
    vocab = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    prompt = vocab.tokenize(b"The capital of France is", add_bos=True, special=True)
    text = open(os.path.join(ROOT, "data", "calibration.txt")).read()
    ids = vocab.tokenize(text.encode(), add_bos=True, special=False)
    with torch.no_grad():
        seq = list(prompt)
        for _ in range(20):
            seq.append(int(torch.argmax(model(torch.tensor([seq])).logits[0, -1])))
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    nll = -lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean().item()
    out = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "sha256": hashlib.sha256(open(path, "rb").read()).hexdigest(),
        "greedy_prompt": prompt,
        "greedy": seq[len(prompt):],
        "calibration": {"tokens": len(ids), "mean_nll": nll, "perplexity": float(np.exp(nll))},
    }
    write_fixture("gemma3_270m_transformers.json", out)
    print(f"greedy {out['greedy']}, ppl {out['calibration']['perplexity']:.6f}")


if __name__ == "__main__":
    main()
