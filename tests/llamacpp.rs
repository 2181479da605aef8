//! llama.cpp as the reference on GGUF files Kiln writes: tiny seeded random models per feature (Llama 3.x
//! `rope_freqs.weight`, the same model without it, Qwen3's qk-norm and own head dim, Phi-3's fused
//! projections, Gemma 3's local/global layers), run once through
//! llama-cpp-python by `scripts/refs/llamacpp_refs.py`, which records llama.cpp's greedy ids and
//! last-prompt logits with each file's hash in `tests/fixtures/llamacpp_refs.json`. Kiln's interpreter and
//! compiled code must give the same ids and logits within 1e-3 on the same files.

use crate::common::{max_abs_diff, random_weights, tiny_config};
use crate::rope_scaling::llama3_config;
use kiln::codegen::CompileOptions;
use kiln::frontend::export::write_gguf;
use kiln::frontend::llama::ROPE_FREQS;
use kiln::frontend::tokenizer::GgufVocab;
use kiln::frontend::{Arch, LlamaConfig, Model};
use kiln::ir::DType;
use kiln::runtime::{generate, Backend, CompiledBackend, InterpreterBackend, Sampler, SamplingParams};
use std::path::{Path, PathBuf};

/// A byte-level BPE vocabulary of `n` tokens (llama.cpp needs one to load a file; the ids are fed
/// directly, so its contents do not matter): printable ASCII, then merged pairs.
fn vocab(n: usize) -> GgufVocab {
    let mut tokens: Vec<String> = (33u8..=126).map(|c| (c as char).to_string()).collect();
    tokens.extend(["ab".to_string(), "cd".to_string()]);
    tokens.truncate(n);
    assert_eq!(tokens.len(), n);
    GgufVocab {
        model: "gpt2".into(),
        pre: None,
        token_types: vec![1; n],
        tokens,
        merges: vec!["a b".into(), "c d".into()],
        scores: Vec::new(),
        add_space_prefix: false,
        bos: None,
        eos: None,
        add_bos: false,
        chat_template: None,
    }
}

/// The reference models: (name, file). Context 128, so a 64-token prompt and 32 generated tokens fit.
fn models(dir: &Path) -> Vec<(&'static str, PathBuf)> {
    let mut out = Vec::new();
    let mut write = |name: &'static str, cfg: &LlamaConfig, w: &kiln::ir::WeightStore| {
        let p = dir.join(format!("{name}.gguf"));
        // (general.name is neutral: llama.cpp keys vocabulary quirks off names like "phi3".)
        write_gguf(&p, "kiln-reference", cfg, w, Some(&vocab(cfg.vocab_size))).unwrap();
        out.push((name, p));
    };
    let mut cfg = llama3_config();
    cfg.context_length = 128;
    let weights = random_weights(&cfg, DType::F32, 31);
    write("llama3-rope-freqs", &cfg, &weights);
    let mut plain = cfg.clone();
    plain.rope_scaling = None;
    let mut plain_w = weights;
    plain_w.remove(ROPE_FREQS);
    write("llama3-without-rope-freqs", &plain, &plain_w);
    let mut q3 = tiny_config(Arch::Qwen3);
    q3.context_length = 128;
    write("qwen3-qk-norm", &q3, &random_weights(&q3, DType::F32, 32));
    let mut phi3 = tiny_config(Arch::Phi3);
    phi3.context_length = 128;
    write("phi3-fused", &phi3, &random_weights(&phi3, DType::F32, 33));
    let gemma = crate::gemma3::gemma_config();
    write("gemma3", &gemma, &crate::gemma3::gemma_weights(&gemma, 34));
    out
}

fn prompt() -> Vec<u32> {
    (0..64u32).map(|i| (i * 53 + 7) % 96).collect()
}

fn fnv1a64(bytes: &[u8]) -> String {
    let h = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    format!("{h:016x}")
}

/// Writes the reference models and what to run into `$KILN_REF_OUT` (for the fixture script).
#[test]
#[ignore = "run by scripts/refs/llamacpp_refs.py"]
fn write_llamacpp_reference_models() {
    let out = PathBuf::from(std::env::var("KILN_REF_OUT").expect("KILN_REF_OUT"));
    let names: Vec<&str> = models(&out).into_iter().map(|(n, _)| n).collect();
    let spec = serde_json::json!({ "models": names, "prompt": prompt(), "generate": 32, "context": 128 });
    std::fs::write(out.join("spec.json"), spec.to_string()).unwrap();
}

fn greedy(b: &mut dyn Backend, n: usize) -> Vec<u32> {
    let mut sampler = Sampler::new(SamplingParams::default());
    generate(b, &prompt(), n, &mut sampler, &[], |_| true).unwrap().generated
}

#[test]
fn kiln_matches_llamacpp_on_the_reference_models() {
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/llamacpp_refs.json")).expect("fixture JSON");
    let want_prompt: Vec<u32> = serde_json::from_value(fixture["prompt"].clone()).unwrap();
    assert_eq!(prompt(), want_prompt, "the fixture's prompt");
    let dir = tempfile::tempdir().unwrap();
    let models = models(dir.path());
    assert_eq!(fixture["models"].as_object().map(|m| m.len()), Some(models.len()), "one fixture entry per model");
    for (name, path) in &models {
        let f = &fixture["models"][name];
        assert_eq!(
            fnv1a64(&std::fs::read(path).unwrap()),
            f["fnv1a64"].as_str().unwrap_or_default(),
            "{name}.gguf is not the file llama.cpp ran: rerun scripts/refs/llamacpp_refs.py"
        );
        let want: Vec<u32> = serde_json::from_value(f["greedy"].clone()).unwrap();
        let want_logits: Vec<f32> = serde_json::from_value(f["last_prompt_logits"].clone()).unwrap();
        assert_eq!(want.len(), 32);
        let m = Model::load(path).unwrap();
        let mut b = InterpreterBackend::new(m.graph().unwrap(), &m.weights, m.config.context_length).unwrap();
        let last = b.forward(&prompt()).unwrap().last().to_vec();
        let d = max_abs_diff(&last, &want_logits);
        assert!(d < 1e-3, "{name}: last prompt logits differ from llama.cpp's by {d}");
        b.reset();
        assert_eq!(greedy(&mut b, want.len()), want, "{name}: interpreter vs llama.cpp");
        let art = dir.path().join(format!("{name}.kiln"));
        kiln::artifact::compile_model(&m, "test", &CompileOptions::default(), &art).unwrap();
        let mut c = CompiledBackend::load(&art, 2, None).unwrap();
        assert_eq!(greedy(&mut c, want.len()), want, "{name}: compiled vs llama.cpp");
    }
    // llama.cpp itself continues differently without the scaling: the scaled ids are not a coincidence.
    let ids = |n: &str| fixture["models"][n]["greedy"].clone();
    assert_ne!(ids("llama3-rope-freqs"), ids("llama3-without-rope-freqs"));
}
