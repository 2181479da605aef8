//! Shared helpers: the default model (loaded once), tiny random models, running the interpreter.

use kiln::frontend::{Arch, LlamaConfig, Model};
use kiln::ir::{DType, TensorData, WeightStore};
use kiln::runtime::{Backend, InterpreterBackend, Logits};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::Path;
use std::sync::OnceLock;

/// The default SmolLM2 model, loaded once per test binary.
pub fn smollm2() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = kiln::default_model_path();
        assert!(path.exists(), "default model missing at {} — run scripts/setup.sh", path.display());
        Model::load(&path).expect("default model loads")
    })
}

pub fn tiny_config(arch: Arch) -> LlamaConfig {
    LlamaConfig {
        arch,
        vocab_size: 96,
        hidden_size: 32,
        intermediate_size: 64,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        // Qwen3's head dim is its own (4 × 12 ≠ 32).
        head_dim: if arch == Arch::Qwen3 { 12 } else { 8 },
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        context_length: 64,
        attention_bias: arch == Arch::Qwen2,
        tie_embeddings: arch == Arch::Llama,
        qk_norm: arch == Arch::Qwen3,
        sliding_window: None,
        rope_local_theta: None,
        query_pre_attn_scalar: None,
        full_attention_layers: Vec::new(),
        rope_scaling: None,
    }
}

/// Random weights for `cfg` in `dtype` (f32/f16/bf16), deterministic in `seed`.
pub fn random_weights(cfg: &LlamaConfig, dtype: DType, seed: u64) -> WeightStore {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut w = WeightStore::new();
    for (name, shape) in cfg.expected_weights() {
        let n: usize = shape.iter().product();
        if name == kiln::frontend::llama::ROPE_FREQS {
            // The divisors the config gives (what an importer computes), or arbitrary ones in 1..8.
            let vals = cfg.derived_rope_freqs().unwrap_or_else(|| (0..n).map(|_| rng.random_range(1.0..8.0)).collect());
            w.insert(name, TensorData::from_f32(shape, &vals));
            continue;
        }
        let is_norm = name.ends_with("norm.weight");
        let vals: Vec<f32> = (0..n)
            .map(|_| if is_norm { 1.0 + rng.random_range(-0.2..0.2) } else { rng.random_range(-0.3..0.3) })
            .collect();
        let t = TensorData::from_f32(shape, &vals);
        let t = match dtype {
            DType::F32 => t,
            other => {
                let bytes = kiln::ir::quant::quantize(other, &vals).expect("quantize");
                TensorData { dtype: other, shape: t.shape, bytes: bytes.into() }
            }
        };
        w.insert(name, t);
    }
    w
}

/// Runs one forward pass of `model` over `tokens` from an empty cache.
/// `cfg` with weights `w` as a GGUF model whose matrices (not norms or biases) are quantized to
/// `dtype`, as GGUF models are (kept alive by the returned temp dir).
pub fn quantized_gguf(cfg: &LlamaConfig, mut w: WeightStore, dtype: DType) -> (tempfile::TempDir, Model) {
    let names: Vec<String> = w.iter().filter(|(_, t)| t.shape.len() == 2).map(|(n, _)| n.clone()).collect();
    for n in names {
        let t = w.get(&n).unwrap().clone();
        let q = kiln::ir::quant::quantize(dtype, &t.to_f32().unwrap()).unwrap();
        w.insert(n, TensorData { dtype, shape: t.shape, bytes: q.into() });
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.gguf");
    kiln::frontend::export::write_gguf(&path, "q", cfg, &w, None).unwrap();
    let m = Model::load(&path).unwrap();
    (dir, m)
}

pub fn logits(model: &Model, tokens: &[u32]) -> Logits {
    let mut b = InterpreterBackend::new(model.graph().expect("graph"), &model.weights, model.config.context_length)
        .expect("backend");
    b.forward(tokens).expect("forward")
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

pub fn kiln_bin() -> &'static str {
    env!("CARGO_BIN_EXE_kiln")
}

/// Runs the `kiln` binary; returns (exit code, stdout, stderr).
pub fn run_kiln(args: &[&str], model_env: Option<&Path>) -> (i32, String, String) {
    let mut cmd = std::process::Command::new(kiln_bin());
    cmd.args(args);
    if let Some(p) = model_env {
        cmd.env("KILN_MODEL", p);
    }
    let out = cmd.output().expect("run kiln");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Writes a word-level `tokenizer.json` of `vocab_size` ids into the Hugging Face model directory `dir`
/// (9 words, then fillers `w9`, `w10`, … so that every id the model can generate decodes) and a
/// calibration text of its words; returns the text's path. With it, the CLI's text commands (`kiln
/// calibrate`, `kiln eval`, `kiln run --json`) run on a tiny model.
pub fn word_tokenizer_and_text(dir: &Path, vocab_size: usize) -> std::path::PathBuf {
    let words = ["the", "cat", "sat", "on", "mat", "and", "dog", "log", "[UNK]"];
    let words = words.iter().map(|w| w.to_string()).chain((words.len()..vocab_size).map(|i| format!("w{i}")));
    let vocab: serde_json::Map<String, serde_json::Value> =
        words.enumerate().map(|(i, w)| (w, serde_json::json!(i))).collect();
    let tok = serde_json::json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}});
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    let text = dir.join("t.txt");
    std::fs::write(&text, "the cat sat on the mat and the dog sat on the log ".repeat(6)).unwrap();
    text
}
