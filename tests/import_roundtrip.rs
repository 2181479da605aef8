//! The safetensors and GGUF importers agree: a tiny random model written as a Hugging Face directory and
//! as GGUF (with llama.cpp's Q/K permutation) imports to the same graph and bit-identical logits.

use crate::common::{logits, max_abs_diff, random_weights, tiny_config};
use kiln::frontend::export::{write_gguf, write_hf};
use kiln::frontend::llama::permute_qk_rows;
use kiln::frontend::{Arch, Model};
use kiln::ir::interp::Interpreter;
use kiln::ir::{DType, Op, RopeMode, TensorData};
use kiln::runtime::{Backend, InterpreterBackend};

const TOKENS: [u32; 6] = [1, 17, 5, 93, 42, 0];

fn body(text: &str) -> &str {
    // Everything after the `graph "name" {` line: the graph name is the model's, which differs.
    text.split_once('\n').unwrap().1
}

fn check_same(arch: Arch, dtype: DType, shards: usize) {
    let cfg = tiny_config(arch);
    let weights = random_weights(&cfg, dtype, 7);
    let dir = tempfile::tempdir().unwrap();
    let hf_dir = dir.path().join("hf");
    write_hf(&hf_dir, &cfg, &weights, shards).unwrap();
    let gguf_path = dir.path().join("tiny.gguf");
    write_gguf(&gguf_path, "tiny", &cfg, &weights, None).unwrap();

    let from_hf = Model::load(&hf_dir).unwrap();
    let from_gguf = Model::load(&gguf_path).unwrap();
    assert_eq!(from_hf.config, cfg);
    assert_eq!(from_gguf.config, cfg);
    if shards > 1 {
        assert_eq!(from_hf.metadata["safetensors.files"], shards.to_string());
    }
    // Same weights byte for byte (the GGUF importer undid the Q/K permutation the writer applied).
    for (name, t) in weights.iter() {
        assert_eq!(from_gguf.weights.get(name).unwrap().bytes, t.bytes, "{name} via GGUF");
        assert_eq!(from_hf.weights.get(name).unwrap().bytes, t.bytes, "{name} via safetensors");
    }
    let (ga, gb) = (from_hf.graph().unwrap(), from_gguf.graph().unwrap());
    assert_eq!(body(&kiln::ir::text::print(&ga)), body(&kiln::ir::text::print(&gb)));
    let (la, lb) = (logits(&from_hf, &TOKENS), logits(&from_gguf, &TOKENS));
    assert_eq!(la.data, lb.data, "{arch:?}/{dtype}: logits differ between imports");
    assert!(la.data.iter().all(|x| x.is_finite()));
    assert!(la.data.iter().any(|&x| x.abs() > 1e-3), "degenerate logits");
}

#[test]
fn llama_f32_tied_safetensors_equals_gguf() {
    check_same(Arch::Llama, DType::F32, 1);
}

#[test]
fn llama_f16_sharded_safetensors_equals_gguf() {
    check_same(Arch::Llama, DType::F16, 3);
}

#[test]
fn qwen2_bias_untied_safetensors_equals_gguf() {
    check_same(Arch::Qwen2, DType::F32, 1);
}

#[test]
fn qwen2_bf16_sharded_safetensors_equals_gguf() {
    check_same(Arch::Qwen2, DType::BF16, 2);
}

/// Qwen3: qk-norm weights (`q_norm`/`k_norm` ↔ `attn_q_norm`/`attn_k_norm`), no biases, head dim 12 with
/// 4 heads on a width of 32, and no Q/K permutation in GGUF (Qwen's RoPE is neox there too).
#[test]
fn qwen3_qk_norm_f16_sharded_safetensors_equals_gguf() {
    check_same(Arch::Qwen3, DType::F16, 2);
}

/// Phi-3: the files hold fused `qkv_proj`/`gate_up_proj` (GGUF `attn_qkv` and a double-height `ffn_up`,
/// as llama.cpp's converter writes them), split at import into the same weights byte for byte.
#[test]
fn phi3_fused_projections_safetensors_equal_gguf() {
    check_same(Arch::Phi3, DType::F32, 1);
    let cfg = tiny_config(Arch::Phi3);
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("phi3.gguf");
    write_gguf(&gguf, "phi3", &cfg, &random_weights(&cfg, DType::F32, 2), None).unwrap();
    let f = kiln::frontend::gguf::GgufFile::open(&gguf).unwrap();
    let (q, kv, ff) = (cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.intermediate_size);
    let shape = |n: &str| f.tensor(n).map(|t| t.ne.clone());
    assert_eq!(shape("blk.0.attn_qkv.weight"), Some(vec![cfg.hidden_size as u64, (q + 2 * kv) as u64]));
    assert_eq!(shape("blk.0.ffn_up.weight"), Some(vec![cfg.hidden_size as u64, 2 * ff as u64]));
    assert_eq!(shape("blk.0.attn_q.weight"), None);
    assert_eq!(shape("blk.0.ffn_gate.weight"), None);
    write_hf(&dir.path().join("hf"), &cfg, &random_weights(&cfg, DType::F32, 2), 1).unwrap();
    let st = std::fs::read(dir.path().join("hf/model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st).unwrap();
    assert_eq!(st.tensor("model.layers.1.mlp.gate_up_proj.weight").unwrap().shape(), [2 * ff, cfg.hidden_size]);
    assert!(st.tensor("model.layers.1.self_attn.qkv_proj.weight").is_ok());
}

/// llama.cpp's layout (permuted Q/K rows + interleaved "normal" RoPE) computes the same function as the
/// Hugging Face layout (original rows + "neox" RoPE): checks both RoPE modes and the permutation.
#[test]
fn normal_rope_on_permuted_rows_equals_neox_on_hf_rows() {
    let cfg = tiny_config(Arch::Llama);
    let weights = random_weights(&cfg, DType::F32, 11);
    let dir = tempfile::tempdir().unwrap();
    write_hf(dir.path(), &cfg, &weights, 1).unwrap();
    let m = Model::load(dir.path()).unwrap();
    let neox = logits(&m, &TOKENS);

    let mut permuted = m.weights.clone();
    for l in 0..cfg.n_layers {
        for (which, heads) in [("attn_q", cfg.n_heads), ("attn_k", cfg.n_kv_heads)] {
            let name = format!("blk.{l}.{which}.weight");
            let t = permuted.get(&name).unwrap().clone();
            let bytes = permute_qk_rows(&t.bytes, t.shape[0], heads);
            permuted.insert(name, TensorData { bytes: bytes.into(), ..t });
        }
    }
    let mut g = m.graph().unwrap();
    let mut n_rope = 0;
    for node in &mut g.nodes {
        if let Op::Rope { mode, .. } = &mut node.op {
            *mode = RopeMode::Normal;
            n_rope += 1;
        }
    }
    assert_eq!(n_rope, 2 * cfg.n_layers);
    let mut b = InterpreterBackend::new(g, &permuted, 64).unwrap();
    let normal = b.forward(&TOKENS).unwrap();
    let d = max_abs_diff(&neox.data, &normal.data);
    assert!(d < 1e-5, "layouts disagree by {d}");
    // And the permutation matters: normal RoPE on HF rows is a different function.
    let mut g2 = m.graph().unwrap();
    for node in &mut g2.nodes {
        if let Op::Rope { mode, .. } = &mut node.op {
            *mode = RopeMode::Normal;
        }
    }
    let wrong = InterpreterBackend::new(g2, &m.weights, 64).unwrap().forward(&TOKENS).unwrap();
    assert!(max_abs_diff(&neox.data, &wrong.data) > 1e-3);
    let _ = Interpreter::new(&m.weights); // the interpreter is usable directly too
}

#[test]
fn batch_of_two_equals_two_single_runs() {
    // The graph is batch-polymorphic: run it on a batch of two sequences directly.
    use kiln::ir::interp::Tensor;
    let cfg = tiny_config(Arch::Qwen2);
    let weights = random_weights(&cfg, DType::F32, 3);
    let dir = tempfile::tempdir().unwrap();
    write_hf(dir.path(), &cfg, &weights, 1).unwrap();
    let m = Model::load(dir.path()).unwrap();
    let g = m.graph().unwrap();
    let seqs: [[u32; 3]; 2] = [[4, 8, 15], [16, 23, 42]];
    let mut inputs = vec![
        ("tokens", Tensor::i64(vec![2, 3], seqs.iter().flatten().map(|&t| t as i64).collect())),
        ("pos", Tensor::i64(vec![2, 3], vec![0, 1, 2, 0, 1, 2])),
    ];
    let names: Vec<String> = (0..cfg.n_layers).flat_map(|l| [format!("k_cache.{l}"), format!("v_cache.{l}")]).collect();
    for n in &names {
        inputs.push((n.as_str(), Tensor::f32(vec![2, 0, cfg.n_kv_heads, cfg.head_dim], vec![])));
    }
    let out = Interpreter::new(&m.weights).run(&g, &inputs).unwrap();
    let batched = out[0].1.as_f32().unwrap();
    let per = 3 * cfg.vocab_size;
    for (i, s) in seqs.iter().enumerate() {
        let single = logits(&m, s);
        assert!(max_abs_diff(&batched[i * per..(i + 1) * per], &single.data) < 1e-6);
    }
}
