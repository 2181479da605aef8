//! RoPE frequency scaling (Llama 3.x `rope_freqs` / `rope_scaling: llama3`, linear interpolation): the
//! divisors against hand-computed values, the `rope_scaled` op's interpreter rule against hand math and
//! against `rope`, the compiled kernel and the e-graph lift against the interpreter, and the two
//! importers against each other, with a prompt long enough that ignoring the scaling changes the output.

use crate::common::{logits, max_abs_diff, random_weights, tiny_config};
use kiln::codegen::CompileOptions;
use kiln::frontend::export::{write_gguf, write_hf};
use kiln::frontend::llama::{build_graph, GraphOptions, ROPE_FREQS};
use kiln::frontend::{Arch, LlamaConfig, Model, RopeScaling};
use kiln::ir::decompose::decompose;
use kiln::ir::interp::{eval, Tensor};
use kiln::ir::text::print;
use kiln::ir::{DType, Op, RopeMode, SymEnv};
use kiln::passes::lift::Lift;
use kiln::passes::{Pass, PassCx};
use kiln::runtime::{generate, Backend, CompiledBackend, InterpreterBackend, Sampler, SamplingParams};

/// A 48-token prompt: long enough that positions reach the scaled (long-wavelength) bands.
fn prompt() -> Vec<u32> {
    (0..48u32).map(|i| (i * 37 + 11) % 96).collect()
}

/// The tiny Llama with Llama 3.1-style scaling whose original context (64) makes the tiny head's four
/// frequencies fall in all three bands: wavelength 2π (< 64/4: unchanged), 62.8 (between: blended),
/// 628 and 6283 (> 64/1: divided by 8).
pub fn llama3_config() -> LlamaConfig {
    let mut c = tiny_config(Arch::Llama);
    c.rope_scaling = Some(RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 64,
    });
    c
}

fn greedy(m: &Model, n: usize) -> Vec<u32> {
    let mut b = InterpreterBackend::new(m.graph().unwrap(), &m.weights, m.config.context_length).unwrap();
    let mut sampler = Sampler::new(SamplingParams::default());
    generate(&mut b, &prompt(), n, &mut sampler, &[], |_| true).unwrap().generated
}

fn f32s(t: &kiln::ir::TensorData) -> Vec<f32> {
    t.to_f32().unwrap()
}

/// Llama 3.1 8B's own parameters (θ 500000, head dim 128, factor 8, low 1, high 4, original context
/// 8192). The band edges by hand: wavelength 2π·θ^(i/64) passes 8192/4 = 2048 between i = 28 and 29
/// (θ^(i/64) = 325.9 at i = 28.2) and 8192 between 34 and 35 (1303.8 at i = 35.0); at i = 32 the
/// wavelength is 2π·√θ = 4442.88, smooth = (8192/4442.88 − 1)/3 = 0.28128, and the divisor
/// 1/((1 − 0.28128)/8 + 0.28128) = 2.6945.
#[test]
fn llama3_divisors_match_hand_computed_bands() {
    let rs = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
    };
    let f = rs.factors(500000.0, 128).unwrap();
    assert_eq!(f.len(), 64);
    assert!(f[..=28].iter().all(|&x| x == 1.0), "{f:?}");
    assert!(f[35..].iter().all(|&x| x == 8.0), "{f:?}");
    assert!(f[29..=34].windows(2).all(|w| 1.0 < w[0] && w[0] < w[1] && w[1] < 8.0), "{:?}", &f[28..36]);
    assert!((f[32] - 2.6945).abs() < 1e-3, "{}", f[32]);
    assert_eq!(RopeScaling::Linear { factor: 4.0 }.factors(10000.0, 8).unwrap(), vec![4.0; 4]);
    assert_eq!(RopeScaling::Factors.factors(10000.0, 8), None);
}

fn rope_eval(op: &Op, x: &Tensor, pos: &[i64], factors: Option<&[f32]>) -> Vec<f32> {
    let p = Tensor::i64(vec![1, pos.len()], pos.to_vec());
    let fac = factors.map(|f| Tensor::f32(vec![f.len()], f.to_vec()));
    let mut args = vec![x, &p];
    if let Some(f) = &fac {
        args.push(f);
    }
    eval(op, &args, &SymEnv::default()).unwrap().as_f32().unwrap().to_vec()
}

/// The interpreter rule by hand, and against `rope`: divisors of 1 are `rope`; a uniform divisor c at
/// position c·p is `rope` at p (the angles are equal in binary arithmetic for c = 2).
#[test]
fn rope_scaled_is_rope_with_divided_frequencies() {
    // Hand-checked: neox, n_rot 4 (pairs (0,2) and (1,3)), θ = 100, position 3, divisors [1, 4]:
    // angle₀ = 3·1 = 3, angle₁ = 3·100^(−1/2)/4 = 0.075.
    let x = Tensor::f32(vec![1, 1, 1, 4], vec![1.0, 1.0, 0.0, 0.0]);
    let op = Op::RopeScaled { mode: RopeMode::Neox, theta: 100.0, n_rot: 4 };
    let y = rope_eval(&op, &x, &[3], Some(&[1.0, 4.0]));
    let want = [3f64.cos(), 0.075f64.cos(), 3f64.sin(), 0.075f64.sin()];
    for (a, b) in y.iter().zip(want) {
        assert!((*a as f64 - b).abs() < 1e-6, "{y:?} vs {want:?}");
    }
    let mut rng_state = 7u32;
    let vals: Vec<f32> = (0..2 * 3 * 2 * 8)
        .map(|_| {
            rng_state = rng_state.wrapping_mul(1664525).wrapping_add(1013904223);
            (rng_state >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        })
        .collect();
    let x = Tensor::f32(vec![1, 6, 2, 8], vals);
    for mode in [RopeMode::Neox, RopeMode::Normal] {
        let plain = Op::Rope { mode, theta: 10000.0, n_rot: 8 };
        let scaled = Op::RopeScaled { mode, theta: 10000.0, n_rot: 8 };
        let pos: Vec<i64> = vec![0, 1, 5, 17, 40, 63];
        let twice: Vec<i64> = pos.iter().map(|p| 2 * p).collect();
        assert_eq!(rope_eval(&scaled, &x, &pos, Some(&[1.0; 4])), rope_eval(&plain, &x, &pos, None));
        assert_eq!(rope_eval(&scaled, &x, &twice, Some(&[2.0; 4])), rope_eval(&plain, &x, &pos, None));
        assert_ne!(rope_eval(&scaled, &x, &pos, Some(&[2.0; 4])), rope_eval(&plain, &x, &pos, None));
    }
}

/// The type rule names the factors' shape.
#[test]
fn rope_scaled_refuses_wrong_factor_shapes() {
    let mut g = kiln::ir::Graph::new("t");
    let x = g.input("x", kiln::ir::TensorType::new(DType::F32, kiln::ir::shape![1i64, 2i64, 1i64, 8i64])).unwrap();
    let p = g.input("pos", kiln::ir::TensorType::new(DType::I32, kiln::ir::shape![1i64, 2i64])).unwrap();
    let f = g.input("f", kiln::ir::TensorType::new(DType::F32, kiln::ir::shape![3i64])).unwrap();
    let err = g.add(Op::RopeScaled { mode: RopeMode::Neox, theta: 1e4, n_rot: 8 }, &[x, p, f]).unwrap_err();
    assert!(err.to_string().contains("rope factors"), "{err}");
}

/// The compiled kernel (prefill, then decode steps; one and two threads) against the interpreter.
#[test]
fn compiled_rope_scaled_matches_interpreter() {
    let cfg = llama3_config();
    let dir = tempfile::tempdir().unwrap();
    write_hf(&dir.path().join("hf"), &cfg, &random_weights(&cfg, DType::F32, 21), 1).unwrap();
    let m = Model::load(&dir.path().join("hf")).unwrap();
    let art = dir.path().join("art");
    let opts = CompileOptions { all_logits: true, ..CompileOptions::default() };
    kiln::artifact::compile_model(&m, "test", &opts, &art).unwrap();
    let manifest = std::fs::read_to_string(art.join("manifest.json")).unwrap();
    assert!(manifest.contains("_f\""), "the scaled rope kernel is used: no `_f` kernel symbol");
    let p = prompt();
    let steps: [&[u32]; 3] = [&p, &[5], &[77]];
    let mut interp = InterpreterBackend::new(m.graph().unwrap(), &m.weights, m.config.context_length).unwrap();
    let want: Vec<Vec<f32>> = steps.iter().map(|s| interp.forward(s).unwrap().data).collect();
    for threads in [1, 2] {
        let mut b = CompiledBackend::load(&art, threads, None).unwrap();
        for (s, w) in steps.iter().zip(&want) {
            let got = b.forward(s).unwrap().data;
            let d = max_abs_diff(w, &got);
            assert!(d < 1e-3, "{threads} threads: compiled differs from the interpreter by {d}");
        }
    }
}

/// Decomposing the scaled graph into primitives (the divisors as a `div` of the frequencies) and
/// lifting it gives the frontend's graph back node for node.
#[test]
fn decompose_then_lift_restores_rope_scaled() {
    let cfg = llama3_config();
    let w = random_weights(&cfg, DType::F32, 3);
    let g = build_graph("tiny", &cfg, &w, GraphOptions::default()).unwrap();
    assert_eq!(g.nodes.iter().filter(|n| matches!(n.op, Op::RopeScaled { .. })).count(), 2 * cfg.n_layers);
    let mut d = decompose(&g).unwrap();
    assert!(!d.nodes.iter().any(|n| matches!(n.op, Op::RopeScaled { .. } | Op::Rope { .. })));
    assert!(Lift::default().run(&mut d, &PassCx::default()).unwrap());
    assert_eq!(print(&d), print(&g));
}

/// config.json `rope_scaling: llama3` and llama.cpp's `rope_freqs.weight` (what our GGUF writer stores,
/// as llama.cpp's converter does) give identical logits; without the scaling the same weights give
/// another greedy continuation of the long prompt.
#[test]
fn llama3_from_config_equals_rope_freqs_tensor_and_matters() {
    let cfg = llama3_config();
    let weights = random_weights(&cfg, DType::F32, 9);
    let dir = tempfile::tempdir().unwrap();
    write_hf(&dir.path().join("hf"), &cfg, &weights, 1).unwrap();
    let hf = Model::load(&dir.path().join("hf")).unwrap();
    assert_eq!(hf.config, cfg);
    let text = std::fs::read_to_string(dir.path().join("hf/config.json")).unwrap();
    assert!(text.contains("\"llama3\""), "{text}");
    let (code, out, err) = crate::common::run_kiln(&["inspect", dir.path().join("hf").to_str().unwrap()], None);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("rope scaling: llama3 ×8 from 64 positions"), "{out}");
    let gguf = dir.path().join("m.gguf");
    write_gguf(&gguf, "tiny", &hf.config, &hf.weights, None).unwrap();
    let file = kiln::frontend::gguf::GgufFile::open(&gguf).unwrap();
    assert!(file.tensor(ROPE_FREQS).is_some());
    let gg = Model::load(&gguf).unwrap();
    assert_eq!(gg.config.rope_scaling, Some(RopeScaling::Factors));
    assert_eq!(f32s(gg.weights.get(ROPE_FREQS).unwrap()), f32s(hf.weights.get(ROPE_FREQS).unwrap()));
    let p = prompt();
    assert_eq!(logits(&hf, &p).data, logits(&gg, &p).data);

    let mut plain_cfg = cfg.clone();
    plain_cfg.rope_scaling = None;
    let mut plain_w = weights.clone();
    plain_w.remove(ROPE_FREQS);
    write_hf(&dir.path().join("plain"), &plain_cfg, &plain_w, 1).unwrap();
    let plain = Model::load(&dir.path().join("plain")).unwrap();
    let (scaled_ids, plain_ids) = (greedy(&hf, 16), greedy(&plain, 16));
    assert_eq!(scaled_ids, greedy(&gg, 16));
    assert_ne!(scaled_ids, plain_ids, "ignoring the scaling should change the continuation");
}

/// Linear scaling travels as metadata (GGUF `rope.scaling.type/factor`) and as `rope_scaling: linear`,
/// and equals positions divided by the factor: factor 2 at position 2p is plain RoPE at p.
#[test]
fn linear_scaling_round_trips_through_both_formats() {
    let mut cfg = tiny_config(Arch::Qwen2);
    cfg.rope_scaling = Some(RopeScaling::Linear { factor: 2.5 });
    let weights = random_weights(&cfg, DType::F32, 4);
    let dir = tempfile::tempdir().unwrap();
    write_hf(&dir.path().join("hf"), &cfg, &weights, 1).unwrap();
    let hf = Model::load(&dir.path().join("hf")).unwrap();
    assert_eq!(hf.config, cfg);
    let gguf = dir.path().join("m.gguf");
    write_gguf(&gguf, "tiny", &hf.config, &hf.weights, None).unwrap();
    let file = kiln::frontend::gguf::GgufFile::open(&gguf).unwrap();
    assert!(file.tensor(ROPE_FREQS).is_none(), "linear scaling is metadata in GGUF");
    assert_eq!(file.get_str("qwen2.rope.scaling.type").unwrap(), "linear");
    let gg = Model::load(&gguf).unwrap();
    assert_eq!(gg.config, cfg);
    let p = prompt();
    assert_eq!(logits(&hf, &p).data, logits(&gg, &p).data);
    // llama.cpp's older spelling, rope.scale_linear, reads the same.
    let mut meta = file.metadata.clone();
    meta.retain(|(k, _)| !k.starts_with("qwen2.rope.scaling"));
    meta.push(("qwen2.rope.scale_linear".into(), kiln::frontend::gguf::GgufValue::F32(2.5)));
    let mut w = kiln::frontend::gguf::GgufWriter::new();
    for (k, v) in meta {
        w.add_metadata(k, v);
    }
    for info in &file.tensors {
        w.add_tensor(info.name.clone(), &file.tensor_data_owned(&info.name).unwrap()).unwrap();
    }
    let old = dir.path().join("old.gguf");
    std::fs::write(&old, w.to_bytes()).unwrap();
    assert_eq!(Model::load(&old).unwrap().config, cfg);
}

/// transformers ≥ 5 writes `rope_parameters` (θ and the scaling in one object) instead of `rope_theta`
/// and `rope_scaling`; both spellings give the same model.
#[test]
fn rope_parameters_spelling_reads_the_same() {
    let cfg = llama3_config();
    let dir = tempfile::tempdir().unwrap();
    write_hf(dir.path(), &cfg, &random_weights(&cfg, DType::F32, 2), 1).unwrap();
    let p = dir.path().join("config.json");
    let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    let mut rp = c["rope_scaling"].take();
    rp["rope_theta"] = c["rope_theta"].take();
    let o = c.as_object_mut().unwrap();
    o.remove("rope_scaling");
    o.remove("rope_theta");
    o.insert("rope_parameters".into(), rp);
    std::fs::write(&p, c.to_string()).unwrap();
    assert_eq!(Model::load(dir.path()).unwrap().config, cfg);
}
