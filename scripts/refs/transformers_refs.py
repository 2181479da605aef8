#!/usr/bin/env python3
"""Writes tests/fixtures/transformers_refs.json: Hugging Face transformers' (f32, eager attention) greedy
ids and last-prompt logits for the tiny seeded models that `tests/transformers_refs.rs` writes as Hugging
Face directories (Llama 3.x rope_scaling, Mistral sliding window, Qwen3, Phi-3, Gemma 3).

    pip install torch transformers safetensors    # torch pulls ~2.5 GB of CUDA wheels: run once
    python3 scripts/refs/transformers_refs.py
"""
import os, sys

from refs_common import fnv1a64, reference_models, write_fixture


def main():
    import torch, transformers
    from transformers import AutoModelForCausalLM

    out, spec = reference_models("transformers_refs::write_transformers_reference_models")
    prompt, n = spec["prompt"], spec["generate"]
    result = {"transformers": transformers.__version__, "torch": torch.__version__, "prompt": prompt, "models": {}}
    for name in spec["models"]:
        d = os.path.join(out, name)
        model = AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32, attn_implementation="eager")
        model.eval()
        ids = list(prompt)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
            last = [float(x) for x in logits[-1]]
            gen = []
            for _ in range(n):
                t = int(torch.argmax(model(torch.tensor([ids])).logits[0, -1]))
                gen.append(t)
                ids.append(t)
        result["models"][name] = {
            "hash": fnv1a64([os.path.join(d, "config.json"), os.path.join(d, "model.safetensors")]),
            "greedy": gen,
            "last_prompt_logits": last,
        }
        print(f"{name}: {gen}", file=sys.stderr)
    write_fixture("transformers_refs.json", result)


if __name__ == "__main__":
    main()
