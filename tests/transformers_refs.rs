//! Hugging Face transformers (f32, eager attention) as the reference on the Hugging Face directories
//! Kiln writes: tiny seeded models per family (Llama 3.x `rope_scaling: llama3` with a prompt long
//! enough for the scaling to matter, Mistral's sliding window, Qwen3, Phi-3, Gemma 3), run once by
//! `scripts/refs/transformers_refs.py`, which records transformers' 32 greedy ids and last-prompt logits
//! with each directory's hash in `tests/fixtures/transformers_refs.json`. Kiln must give the same ids
//! and logits within 1e-3 from the directory and from the GGUF file written from it.

use crate::common::{max_abs_diff, random_weights, tiny_config};
use crate::rope_scaling::llama3_config;
use kiln::frontend::export::{write_gguf, write_hf};
use kiln::frontend::{Arch, LlamaConfig, Model};
use kiln::ir::{DType, WeightStore};
use kiln::runtime::{generate, Backend, InterpreterBackend, Sampler, SamplingParams};
use std::path::{Path, PathBuf};

fn models() -> Vec<(&'static str, LlamaConfig, WeightStore)> {
    let long = |mut c: LlamaConfig| {
        c.context_length = 128;
        c
    };
    let llama3 = long(llama3_config());
    let mut mistral = long(tiny_config(Arch::Llama));
    mistral.sliding_window = Some(8);
    let qwen3 = long(tiny_config(Arch::Qwen3));
    let phi3 = long(tiny_config(Arch::Phi3));
    let gemma = crate::gemma3::gemma_config();
    vec![
        ("llama3-rope-scaling", llama3.clone(), random_weights(&llama3, DType::F32, 41)),
        ("mistral-sliding-window", mistral.clone(), random_weights(&mistral, DType::F32, 42)),
        ("qwen3", qwen3.clone(), random_weights(&qwen3, DType::F32, 43)),
        ("phi3", phi3.clone(), random_weights(&phi3, DType::F32, 44)),
        ("gemma3", gemma.clone(), crate::gemma3::gemma_weights(&gemma, 45)),
    ]
}

fn prompt() -> Vec<u32> {
    (0..64u32).map(|i| (i * 29 + 3) % 96).collect()
}

/// FNV-1a over the directory's config.json and model.safetensors.
fn dir_hash(dir: &Path) -> String {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for f in ["config.json", "model.safetensors"] {
        for b in std::fs::read(dir.join(f)).unwrap() {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

#[test]
#[ignore = "run by scripts/refs/transformers_refs.py"]
fn write_transformers_reference_models() {
    let out = PathBuf::from(std::env::var("KILN_REF_OUT").expect("KILN_REF_OUT"));
    let mut names = Vec::new();
    for (name, cfg, w) in models() {
        write_hf(&out.join(name), &cfg, &w, 1).unwrap();
        names.push(name);
    }
    let spec = serde_json::json!({ "models": names, "prompt": prompt(), "generate": 32 });
    std::fs::write(out.join("spec.json"), spec.to_string()).unwrap();
}

fn check(name: &str, m: &Model, want: &[u32], want_logits: &[f32]) {
    let mut b = InterpreterBackend::new(m.graph().unwrap(), &m.weights, m.config.context_length).unwrap();
    let last = b.forward(&prompt()).unwrap().last().to_vec();
    let d = max_abs_diff(&last, want_logits);
    assert!(d < 1e-3, "{name} ({}): last prompt logits differ from transformers' by {d}", m.format);
    b.reset();
    let mut sampler = Sampler::new(SamplingParams::default());
    let got = generate(&mut b, &prompt(), want.len(), &mut sampler, &[], |_| true).unwrap().generated;
    assert_eq!(got, want, "{name} ({}): greedy ids vs transformers", m.format);
}

#[test]
fn kiln_matches_transformers_on_the_reference_models() {
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/transformers_refs.json")).expect("fixture JSON");
    let want_prompt: Vec<u32> = serde_json::from_value(fixture["prompt"].clone()).unwrap();
    assert_eq!(prompt(), want_prompt, "the fixture's prompt");
    let dir = tempfile::tempdir().unwrap();
    let models = models();
    assert_eq!(fixture["models"].as_object().map(|m| m.len()), Some(models.len()), "one fixture entry per model");
    for (name, cfg, w) in &models {
        let f = &fixture["models"][name];
        let hf = dir.path().join(name);
        write_hf(&hf, cfg, w, 1).unwrap();
        assert_eq!(
            dir_hash(&hf),
            f["hash"].as_str().unwrap_or_default(),
            "{name} is not the directory transformers ran: rerun scripts/refs/transformers_refs.py"
        );
        let want: Vec<u32> = serde_json::from_value(f["greedy"].clone()).unwrap();
        let want_logits: Vec<f32> = serde_json::from_value(f["last_prompt_logits"].clone()).unwrap();
        assert_eq!(want.len(), 32);
        let from_hf = Model::load(&hf).unwrap();
        check(name, &from_hf, &want, &want_logits);
        let gguf = dir.path().join(format!("{name}.gguf"));
        write_gguf(&gguf, name, &from_hf.config, &from_hf.weights, None).unwrap();
        check(name, &Model::load(&gguf).unwrap(), &want, &want_logits);
    }
}
