//! Sliding-window attention: the `sliding_attention` op by hand and against `attention`, the compiled
//! kernel against the interpreter past the window (prefill and decode), which layers the importers give
//! a window (Mistral, Qwen2's `use_sliding_window` + `max_window_layers`, `layer_types`, GGUF), and the
//! round trip through both formats.

use crate::common::{logits, max_abs_diff, random_weights, tiny_config};
use kiln::codegen::CompileOptions;
use kiln::frontend::export::{write_gguf, write_hf};
use kiln::frontend::{Arch, LlamaConfig, Model};
use kiln::ir::interp::{eval, Tensor};
use kiln::ir::{DType, Op, SymEnv};
use kiln::runtime::{Backend, CompiledBackend, InterpreterBackend};

fn tensor(shape: Vec<usize>, seed: u32) -> Tensor {
    let mut st = seed;
    let n = shape.iter().product();
    let vals = (0..n)
        .map(|_| {
            st = st.wrapping_mul(1664525).wrapping_add(1013904223);
            (st >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        })
        .collect();
    Tensor::f32(shape, vals)
}

fn att(op: &Op, q: &Tensor, k: &Tensor, v: &Tensor) -> Vec<f32> {
    eval(op, &[q, k, v], &SymEnv::default()).unwrap().as_f32().unwrap().to_vec()
}

/// By hand: a window of 1 leaves each query its own key, so the output is its own value row; a window
/// of 2 is the softmax over the last two keys. A window at least the kv length is `attention` exactly;
/// a shorter one differs.
#[test]
fn sliding_attention_by_hand_and_against_attention() {
    // q: [1, 3, 2, 4] (3 queries after 2 cached positions: t = 5), GQA 2 query heads over 1 kv head.
    let (q, k, v) = (tensor(vec![1, 3, 2, 4], 1), tensor(vec![1, 5, 1, 4], 2), tensor(vec![1, 5, 1, 4], 3));
    let (vq, vk, vv) = (q.as_f32().unwrap(), k.as_f32().unwrap(), v.as_f32().unwrap());
    let one = att(&Op::SlidingAttention { scale: 0.5, window: 1 }, &q, &k, &v);
    for i in 0..3 {
        for h in 0..2 {
            let own = &vv[(2 + i) * 4..][..4];
            assert_eq!(&one[(i * 2 + h) * 4..][..4], own, "query {i} head {h}");
        }
    }
    let two = att(&Op::SlidingAttention { scale: 0.5, window: 2 }, &q, &k, &v);
    for i in 0..3 {
        let p = 2 + i; // absolute position
        for h in 0..2 {
            let qrow = &vq[(i * 2 + h) * 4..][..4];
            let s = |j: usize| 0.5 * (0..4).map(|c| qrow[c] as f64 * vk[j * 4 + c] as f64).sum::<f64>();
            let (a, b) = (s(p - 1), s(p));
            let m = a.max(b);
            let (ea, eb) = ((a - m).exp(), (b - m).exp());
            for c in 0..4 {
                let want = (ea * vv[(p - 1) * 4 + c] as f64 + eb * vv[p * 4 + c] as f64) / (ea + eb);
                assert!((two[(i * 2 + h) * 4 + c] as f64 - want).abs() < 1e-6);
            }
        }
    }
    let full = att(&Op::Attention { scale: 0.5 }, &q, &k, &v);
    assert_eq!(att(&Op::SlidingAttention { scale: 0.5, window: 5 }, &q, &k, &v), full);
    assert_eq!(att(&Op::SlidingAttention { scale: 0.5, window: 100 }, &q, &k, &v), full);
    assert_ne!(att(&Op::SlidingAttention { scale: 0.5, window: 3 }, &q, &k, &v), full);
    let mut g = kiln::ir::Graph::new("t");
    let ty = kiln::ir::TensorType::new(DType::F32, kiln::ir::shape![1i64, 2i64, 1i64, 4i64]);
    let (a, b, c) = (g.input("q", ty.clone()).unwrap(), g.input("k", ty.clone()).unwrap(), g.input("v", ty).unwrap());
    let e = g.add(Op::SlidingAttention { scale: 1.0, window: 0 }, &[a, b, c]).unwrap_err();
    assert!(e.to_string().contains("window 0"), "{e}");
}

/// A tiny Mistral-style model (window 5 in every layer but layer 1) compiled against the interpreter
/// over a prompt longer than the window, then decode steps whose KV reaches far past it.
#[test]
fn compiled_sliding_attention_matches_interpreter_past_the_window() {
    let mut cfg = tiny_config(Arch::Llama);
    cfg.n_layers = 3;
    cfg.sliding_window = Some(5);
    cfg.full_attention_layers = vec![1];
    let dir = tempfile::tempdir().unwrap();
    write_hf(&dir.path().join("hf"), &cfg, &random_weights(&cfg, DType::F32, 8), 1).unwrap();
    let m = Model::load(&dir.path().join("hf")).unwrap();
    assert_eq!(m.config, cfg);
    let g = m.graph().unwrap();
    let windows: Vec<&Op> =
        g.nodes.iter().map(|n| &n.op).filter(|op| matches!(op, Op::SlidingAttention { .. })).collect();
    assert_eq!(windows.len(), 2, "layers 0 and 2 slide, layer 1 is full");
    let art = dir.path().join("art");
    let opts = CompileOptions { all_logits: true, ..CompileOptions::default() };
    kiln::artifact::compile_model(&m, "test", &opts, &art).unwrap();
    let manifest = std::fs::read_to_string(art.join("manifest.json")).unwrap();
    assert!(manifest.contains("_w5"), "a windowed attention kernel");
    let prompt: Vec<u32> = (0..12).map(|i| (i * 7 + 3) % 96).collect();
    let steps: Vec<Vec<u32>> = vec![prompt.clone(), vec![4], vec![50], vec![9, 10, 11]];
    let mut interp = InterpreterBackend::new(g, &m.weights, m.config.context_length).unwrap();
    let want: Vec<Vec<f32>> = steps.iter().map(|s| interp.forward(s).unwrap().data).collect();
    for threads in [1, 2] {
        let mut b = CompiledBackend::load(&art, threads, None).unwrap();
        for (i, (s, w)) in steps.iter().zip(&want).enumerate() {
            let d = max_abs_diff(w, &b.forward(s).unwrap().data);
            assert!(d < 1e-4, "{threads} threads, step {i}: compiled differs from the interpreter by {d}");
        }
    }
    // The window matters: the same weights with full attention everywhere give other logits.
    let mut full = cfg.clone();
    full.sliding_window = None;
    full.full_attention_layers.clear();
    write_hf(&dir.path().join("full"), &full, &random_weights(&full, DType::F32, 8), 1).unwrap();
    let fm = Model::load(&dir.path().join("full")).unwrap();
    assert!(max_abs_diff(&logits(&m, &prompt).data, &logits(&fm, &prompt).data) > 1e-3);
}

fn hf_config_with(arch: Arch, edit: serde_json::Value) -> LlamaConfig {
    let cfg = tiny_config(arch);
    let dir = tempfile::tempdir().unwrap();
    write_hf(dir.path(), &cfg, &random_weights(&cfg, DType::F32, 2), 1).unwrap();
    let p = dir.path().join("config.json");
    let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    for (k, v) in edit.as_object().unwrap() {
        c[k] = v.clone();
    }
    std::fs::write(&p, c.to_string()).unwrap();
    Model::load(dir.path()).unwrap().config
}

/// Which layers slide, as transformers decides it per family.
#[test]
fn importers_give_windows_to_the_layers_transformers_does() {
    let win = |c: &LlamaConfig| (c.sliding_window, c.full_attention_layers.clone(), c.context_length);
    assert_eq!(
        win(&hf_config_with(Arch::Llama, serde_json::json!({"model_type": "mistral", "sliding_window": 32}))),
        (Some(32), vec![], 64)
    );
    assert_eq!(
        win(&hf_config_with(Arch::Llama, serde_json::json!({"model_type": "mistral", "sliding_window": null}))),
        (None, vec![], 64)
    );
    // Qwen2: only with use_sliding_window, and then from max_window_layers on (default 28: none of 2).
    assert_eq!(
        win(&hf_config_with(Arch::Qwen2, serde_json::json!({"sliding_window": 32, "use_sliding_window": false}))),
        (None, vec![], 64)
    );
    assert_eq!(
        win(&hf_config_with(Arch::Qwen2, serde_json::json!({"sliding_window": 32, "use_sliding_window": true}))),
        (None, vec![], 64)
    );
    assert_eq!(
        win(&hf_config_with(
            Arch::Qwen2,
            serde_json::json!({"sliding_window": 32, "use_sliding_window": true, "max_window_layers": 1})
        )),
        (Some(32), vec![0], 64)
    );
    assert_eq!(
        win(&hf_config_with(
            Arch::Qwen3,
            serde_json::json!({"sliding_window": 16, "use_sliding_window": true, "layer_types": ["sliding_attention", "full_attention"]})
        )),
        (Some(16), vec![1], 64)
    );
    // GGUF: attention.sliding_window applies to every layer; 0 means none (llama.cpp's Phi-3 converter).
    let mut cfg = tiny_config(Arch::Llama);
    cfg.sliding_window = Some(24);
    let dir = tempfile::tempdir().unwrap();
    let w = random_weights(&cfg, DType::F32, 4);
    write_gguf(&dir.path().join("a.gguf"), "a", &cfg, &w, None).unwrap();
    let a = Model::load(&dir.path().join("a.gguf")).unwrap();
    assert_eq!(a.config, cfg);
    write_hf(&dir.path().join("hf"), &cfg, &w, 1).unwrap();
    let h = Model::load(&dir.path().join("hf")).unwrap();
    assert_eq!(h.config, cfg);
    let prompt: Vec<u32> = (0..40).map(|i| (i * 11 + 5) % 96).collect();
    assert_eq!(logits(&a, &prompt).data, logits(&h, &prompt).data);
    let mut phi = tiny_config(Arch::Phi3);
    let pw = random_weights(&phi, DType::F32, 4);
    phi.sliding_window = None;
    let f = kiln::frontend::gguf::GgufFile::open({
        write_gguf(&dir.path().join("p.gguf"), "p", &phi, &pw, None).unwrap();
        &dir.path().join("p.gguf")
    })
    .unwrap();
    let mut meta = f.metadata.clone();
    meta.push(("phi3.attention.sliding_window".into(), kiln::frontend::gguf::GgufValue::U32(0)));
    let mut wr = kiln::frontend::gguf::GgufWriter::new();
    for (k, v) in meta {
        wr.add_metadata(k, v);
    }
    for info in &f.tensors {
        wr.add_tensor(info.name.clone(), &f.tensor_data_owned(&info.name).unwrap()).unwrap();
    }
    std::fs::write(dir.path().join("p0.gguf"), wr.to_bytes()).unwrap();
    assert_eq!(Model::load(&dir.path().join("p0.gguf")).unwrap().config.sliding_window, None);
    // Mixed windows have no GGUF form for these families: refused, not written wrong.
    let mut mixed = cfg.clone();
    mixed.full_attention_layers = vec![0];
    let e = write_gguf(&dir.path().join("m.gguf"), "m", &mixed, &w, None).unwrap_err();
    assert!(e.to_string().contains("full-attention layers"), "{e}");
}
