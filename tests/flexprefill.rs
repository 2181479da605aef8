//! FlexPrefill sparse attention (`--flex-prefill`) end to end: whole tiny models compiled with the
//! `flexprefill` pass against the interpreter on the same graph, exact dense behaviour below
//! `min-len`, the manifest record, and bad flag values refused by name.

use crate::common::{random_weights, run_kiln};
use kiln::artifact::{build_graph, compile_build, Build};
use kiln::codegen::CompileOptions;
use kiln::frontend::export::write_hf;
use kiln::frontend::{Arch, LlamaConfig, Model};
use kiln::ir::DType;
use kiln::passes::flexprefill::FlexPrefill;
use kiln::runtime::{Backend, CompiledBackend, InterpreterBackend};

fn config(heads: usize, kv: usize, head_dim: usize) -> LlamaConfig {
    LlamaConfig {
        arch: Arch::Llama,
        vocab_size: 97,
        hidden_size: 36,
        intermediate_size: 50,
        n_layers: 2,
        n_heads: heads,
        n_kv_heads: kv,
        head_dim,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        context_length: 96,
        attention_bias: false,
        tie_embeddings: true,
        qk_norm: false,
        sliding_window: None,
        rope_local_theta: None,
        query_pre_attn_scalar: None,
        full_attention_layers: Vec::new(),
        rope_scaling: None,
    }
}

fn model(cfg: &LlamaConfig, seed: u64) -> (tempfile::TempDir, Model) {
    let src = tempfile::tempdir().unwrap();
    // Larger weights than the default helper's: peaked attention, so dropping blocks matters.
    let mut w = random_weights(cfg, DType::F32, seed);
    for (name, t) in w.clone().iter() {
        if name.contains("attn_q") || name.contains("attn_k") || name.contains("q_proj") || name.contains("k_proj") {
            let v: Vec<f32> = t.to_f32().unwrap().iter().map(|x| x * 4.0).collect();
            w.insert(name, kiln::ir::TensorData::from_f32(t.shape.clone(), &v));
        }
    }
    write_hf(src.path(), cfg, &w, 1).unwrap();
    let m = Model::load(src.path()).unwrap();
    (src, m)
}

fn prompt(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 37 + 11) % vocab) as u32).collect()
}

/// Prefill of a prompt then two decode steps, interpreter on the build's graph vs compiled artifact.
fn logits(m: &Model, build: &Build, steps: &[&[u32]]) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let built = build_graph(m, build).unwrap();
    let mut ib = InterpreterBackend::new(built.graph.clone(), &built.weights, m.config.context_length).unwrap();
    let want: Vec<Vec<f32>> = steps.iter().map(|s| ib.forward(s).unwrap().data).collect();
    let art = tempfile::tempdir().unwrap();
    compile_build(m, "test", build, art.path()).unwrap();
    let mut cb = CompiledBackend::load(art.path(), 2, None).unwrap();
    let got = steps.iter().map(|s| cb.forward(s).unwrap().data).collect();
    (want, got)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// GQA ratios 1, 3 and 5 and an odd head dim; a prompt that is not a multiple of the block; a small
/// min-len so the prefill is sparse: the compiled model equals the interpreter on the same graph, and
/// differs from the dense model (blocks were dropped).
#[test]
fn compiled_flexprefill_matches_interpreter() {
    for (seed, (heads, kv, hd)) in [(3, 3, 8), (6, 2, 8), (5, 1, 6)].into_iter().enumerate() {
        let cfg = config(heads, kv, hd);
        let (_src, m) = model(&cfg, seed as u64);
        let p = prompt(61, cfg.vocab_size);
        let steps: [&[u32]; 3] = [&p, &[5], &[9]];
        let flex = FlexPrefill { block: 4, gamma: 0.6, tau: 0.1, min_len: 8 };
        let build = Build { flex: Some(flex), ..Build::new(CompileOptions::default()) };
        let (want, got) = logits(&m, &build, &steps);
        for (i, (w, g)) in want.iter().zip(&got).enumerate() {
            let d = max_diff(&w[w.len() - g.len()..], g);
            assert!(d < 1e-3, "heads {heads}/{kv} step {i}: compiled vs interpreter differ by {d}");
        }
        let (dense, _) = logits(&m, &Build::new(CompileOptions::default()), &steps[..1]);
        let moved = max_diff(&dense[0], &want[0]);
        assert!(moved > 1e-4, "heads {heads}/{kv}: γ 0.6 left the logits unchanged ({moved})");
    }
}

/// Below min-len (every step of this run) the compiled flexprefill model is the dense one bit for bit,
/// and the manifest records the settings.
#[test]
fn below_min_len_is_dense_bit_for_bit() {
    let cfg = config(6, 2, 8);
    let (_src, m) = model(&cfg, 9);
    let p = prompt(40, cfg.vocab_size);
    let steps: [&[u32]; 3] = [&p, &[5], &[9, 10]];
    let flex = FlexPrefill { block: 4, gamma: 0.5, tau: 0.1, min_len: 41 };
    let build = Build { flex: Some(flex), ..Build::new(CompileOptions::default()) };
    let (_, got) = logits(&m, &build, &steps);
    let (_, dense) = logits(&m, &Build::new(CompileOptions::default()), &steps);
    for (i, (a, b)) in dense.iter().zip(&got).enumerate() {
        assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()), "step {i} differs from dense");
    }
    let art = tempfile::tempdir().unwrap();
    let manifest = compile_build(&m, "test", &build, art.path()).unwrap();
    let json = serde_json::to_string(&manifest).unwrap();
    assert!(json.contains("\"flexprefill\"") && json.contains("\"min_len\":41"), "{json}");
}

/// Bad --flex-prefill values fail before compiling, naming the flag and the bad key.
#[test]
fn bad_flex_prefill_flags_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("t.txt");
    std::fs::write(&text, "Some words to score.").unwrap();
    let t = text.to_str().unwrap();
    let cases: [(&[&str], &str); 6] = [
        (&["compile", "-o", "/tmp/x", "--flex-prefill", "gamma=1.5"], "gamma"),
        (&["compile", "-o", "/tmp/x", "--flex-prefill", "block=0"], "block"),
        (&["run", "--prompt", "Hi", "-n", "1", "--flex-prefill", "tau=-0.1"], "tau"),
        (&["run", "--prompt", "Hi", "-n", "1", "--flex-prefill", "min-len=x"], "min-len"),
        (&["eval", "--text", t, "--flex-prefill", "gama=0.9"], "gama"),
        (&["compile", "-o", "/tmp/x", "--flex-prefill", "gamma"], "KEY=VALUE"),
    ];
    for (args, needle) in cases {
        let (code, _, err) = run_kiln(args, None);
        assert_ne!(code, 0, "{args:?} should fail");
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
        assert!(err.contains("--flex-prefill") && err.contains(needle), "{args:?}: `{needle}` not in: {err}");
    }
}
