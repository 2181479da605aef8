#!/usr/bin/env python3
"""Writes tests/fixtures/transformers_refs.json: Hugging Face transformers' (f32, eager attention) greedy
ids and last-prompt logits for the tiny seeded models that `tests/transformers_refs.rs` writes as Hugging
Face directories (Llama 3.x rope_scaling, Mistral sliding window, Qwen3, Phi-3, Gemma 3).

    pip install torch transformers safetensors    # torch pulls ~2.5 GB of CUDA wheels: run once
    python3 scripts/refs/transformers_refs.py
"""
import json, os, subprocess, sys, tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def fnv1a64(paths):
    h = 0xCBF29CE484222325
    for p in paths:
        for b in open(p, "rb").read():
            h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def main():
    import torch, transformers
    from transformers import AutoModelForCausalLM

    out = tempfile.mkdtemp(prefix="kiln-hf-ref-")
    subprocess.run(["cargo", "test", "--locked", "--test", "main", "--", "--ignored", "--exact",
                    "transformers_refs::write_transformers_reference_models"],
                   cwd=ROOT, env=dict(os.environ, KILN_REF_OUT=out), check=True)
    spec = json.load(open(os.path.join(out, "spec.json")))
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
    dst = os.path.join(ROOT, "tests", "fixtures", "transformers_refs.json")
    with open(dst, "w") as f:
        json.dump(result, f)
        f.write("\n")
    print(f"wrote {dst}", file=sys.stderr)


if __name__ == "__main__":
    main()
