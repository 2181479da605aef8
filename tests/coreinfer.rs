//! CoreInfer (the `coreinfer` pass): every neuron core = the dense model; compiled = interpreter on the
//! same graph (prefill, a second chunk, decode; core sets equal); a core set known by construction;
//! decode after prefill uses exactly the prefill's core set (= a hand-made model whose non-core neurons
//! are removed, on the dense prefill's KV cache); the gathered form (`gather=1`: the core rows copied once
//! per prompt) = the interpreter over several prompts, formats and thread counts; `kiln eval
//! --prompt-len`; bad flags through the CLI.

use crate::common::{max_abs_diff, random_weights, run_kiln, tiny_config};
use crate::sparsity::{all_logits, steps};
use kiln::artifact::{build_graph, compile_build, Build};
use kiln::frontend::export::write_hf;
use kiln::frontend::{Arch, Model};
use kiln::ir::interp::Tensor;
use kiln::ir::{DType, Interpreter, Op, TensorData, WeightStore};
use kiln::passes::coreinfer::{state_name, CoreInfer};
use kiln::runtime::{Backend, CompiledBackend, InterpreterBackend};

const LAYERS: usize = 2;
const NEURONS: usize = 64;
const TOKENS: [u32; 9] = [5, 9, 33, 2, 71, 40, 18, 90, 7];

/// A tiny Llama (hidden 32, MLP 64, 2 layers) in `dtype`, with `edit` applied to its weights.
fn tiny(dtype: DType, seed: u64, edit: impl FnOnce(&mut WeightStore)) -> (tempfile::TempDir, Model) {
    let src = tempfile::tempdir().unwrap();
    let mut cfg = tiny_config(Arch::Llama);
    cfg.n_layers = LAYERS;
    let mut w = random_weights(&cfg, dtype, seed);
    edit(&mut w);
    let path = src.path().join("m.gguf");
    kiln::frontend::export::write_gguf(&path, "tiny", &cfg, &w, None).unwrap();
    let m = Model::load(&path).unwrap();
    (src, m)
}

fn build(alpha: f32, beta: f32) -> Build {
    Build {
        opts: all_logits(),
        coreinfer: Some(CoreInfer { alpha, beta, exact: true, gather: false }),
        ..Default::default()
    }
}

/// Logits of a prefill of `split` tokens then one token per step, and the core sets after it.
fn interp_run(m: &Model, b: &Build, split: usize) -> (Vec<f32>, Vec<Vec<f32>>) {
    let built = build_graph(m, b).unwrap();
    let mut ib = InterpreterBackend::new(built.graph, &built.weights, 64).unwrap();
    let logits = steps(&mut ib, &TOKENS, split);
    let sets = (0..LAYERS).filter_map(|l| ib.state(&state_name(l)).map(<[f32]>::to_vec)).collect();
    (logits, sets)
}

fn compiled_run(m: &Model, b: &Build, split: usize, threads: usize) -> (Vec<f32>, Vec<Vec<f32>>) {
    let art = tempfile::tempdir().unwrap();
    compile_build(m, "test", b, art.path()).unwrap();
    artifact_run(art.path(), split, threads)
}

fn artifact_run(art: &std::path::Path, split: usize, threads: usize) -> (Vec<f32>, Vec<Vec<f32>>) {
    let mut cb = CompiledBackend::load(art, threads, None).unwrap();
    let logits = steps(&mut cb, &TOKENS, split);
    let sets = (0..LAYERS).map(|l| cb.state(&state_name(l)).expect("core set state").to_vec()).collect();
    (logits, sets)
}

fn share(sets: &[Vec<f32>]) -> f64 {
    let n: usize = sets.iter().map(Vec::len).sum();
    sets.iter().flatten().filter(|&&x| x != 0.0).count() as f64 / n as f64
}

#[test]
fn every_neuron_core_is_the_dense_model() {
    let (_src, m) = tiny(DType::F32, 61, |_| {});
    let dense = build_graph(&m, &Build::new(all_logits())).unwrap();
    let mut ib = InterpreterBackend::new(dense.graph, &dense.weights, 64).unwrap();
    let want = steps(&mut ib, &TOKENS, 4);
    for (alpha, beta) in [(1.0, 0.0), (1.0, 1.0), (0.3, 0.0)] {
        let b = build(alpha, beta);
        let built = build_graph(&m, &b).unwrap();
        assert_eq!(built.graph.nodes.iter().filter(|n| matches!(n.op, Op::CoreSelect { .. })).count(), LAYERS);
        let (got, sets) = interp_run(&m, &b, 4);
        assert_eq!(sets, vec![vec![1.0; NEURONS]; LAYERS], "α {alpha} β {beta}: every neuron is core");
        // The same products as dense, summed in another order (down as active_linear): float tolerance.
        let d = max_abs_diff(&got, &want);
        assert!(d < 1e-5, "α {alpha} β {beta}: interpreter vs dense {d}");
        let (cgot, csets) = compiled_run(&m, &b, 4, 2);
        assert_eq!(csets, sets);
        let d = max_abs_diff(&cgot, &want);
        assert!(d < 1e-4, "α {alpha} β {beta}: compiled vs dense {d}");
    }
}

#[test]
fn compiled_matches_the_interpreter() {
    for (dtype, seed) in [(DType::F32, 62), (DType::Q4_1, 63)] {
        let (_src, m) = tiny(dtype, seed, |_| {});
        let dense = build_graph(&m, &Build::new(all_logits())).unwrap();
        let mut ib = InterpreterBackend::new(dense.graph, &dense.weights, 64).unwrap();
        let dense_logits = steps(&mut ib, &TOKENS, 4);
        for (alpha, beta) in [(0.1, 0.2), (0.25, 0.5), (0.5, 0.9)] {
            let mut b = build(alpha, beta);
            b.coreinfer.as_mut().unwrap().exact = false;
            let art = tempfile::tempdir().unwrap();
            compile_build(&m, "test", &b, art.path()).unwrap();
            // Prefill of 4 then decode; and a prompt of 2 then a second chunk of 4 (past > 0) then decode.
            for split in [4, 2] {
                let (want, sets) = interp_run(&m, &b, split);
                let s = share(&sets);
                assert!(s > 0.0 && s < 1.0, "{dtype} α {alpha} β {beta}: core share {s}");
                for threads in [1, 2] {
                    let (got, csets) = artifact_run(art.path(), split, threads);
                    assert_eq!(csets, sets, "{dtype} α {alpha} β {beta} split {split}: core sets");
                    let d = max_abs_diff(&got, &want);
                    assert!(d < 1e-4, "{dtype} α {alpha} β {beta} split {split} {threads} threads: {d}");
                }
                if split == 4 && dtype == DType::F32 {
                    // The prefill is dense (f32: the transposed down weight is exact), the decode steps are not.
                    let v = m.config.vocab_size;
                    let d = max_abs_diff(&want[..4 * v], &dense_logits[..4 * v]);
                    assert!(d < 1e-4, "{dtype}: the prefill runs the dense MLP ({d})");
                    assert!(
                        max_abs_diff(&want[4 * v..], &dense_logits[4 * v..]) > 1e-3,
                        "{dtype} α {alpha}: decode differs"
                    );
                }
            }
        }
    }
}

/// `gather=1`: gate and up become `core_linear`, whose compiled form copies the prompt's core rows into a
/// smaller dense matrix at the first step after each prefill. Compiled = the interpreter (which computes
/// the masked product straight from the full weight) over three prompts in a row on one backend, each
/// with its own core set (so a stale copy would show), with a second prompt chunk, for f32 and the
/// block formats whose rows are copied as bytes, at 1–3 threads (3 splits 64 rows unevenly); and the
/// gathered build decodes like the masked one.
#[test]
fn gathered_core_rows_match_the_interpreter_across_prompts() {
    let prompts: [&[u32]; 3] = [&TOKENS, &[40, 3, 77, 12, 5, 60, 21, 9], &[88, 14, 2, 51, 33, 8, 70]];
    for (dtype, seed) in [(DType::F32, 67), (DType::Q4_1, 68), (DType::Q8_0, 69), (DType::Q4_0, 70)] {
        let (_src, m) = tiny(dtype, seed, |_| {});
        let mut b = build(0.25, 0.5);
        b.coreinfer = Some(CoreInfer { alpha: 0.25, beta: 0.5, exact: false, gather: true });
        let built = build_graph(&m, &b).unwrap();
        let count = |f: fn(&Op) -> bool| built.graph.nodes.iter().filter(|n| f(&n.op)).count();
        assert_eq!(count(|o| matches!(o, Op::CoreLinear { .. })), 2 * LAYERS, "{dtype}: gate and up gathered");
        assert_eq!(count(|o| matches!(o, Op::CoreKeep { .. } | Op::MaskedLinear)), 0, "{dtype}");
        let mut ib = InterpreterBackend::new(built.graph.clone(), &built.weights, 64).unwrap();
        let art = tempfile::tempdir().unwrap();
        compile_build(&m, "test", &b, art.path()).unwrap();
        let mut masked = b.clone();
        masked.coreinfer.as_mut().unwrap().gather = false;
        let art_masked = tempfile::tempdir().unwrap();
        compile_build(&m, "test", &masked, art_masked.path()).unwrap();
        let mut mb = CompiledBackend::load(art_masked.path(), 1, None).unwrap();
        for threads in [1, 2, 3] {
            let mut cb = CompiledBackend::load(art.path(), threads, None).unwrap();
            let mut last_sets: Option<Vec<Vec<f32>>> = None;
            for (p, prompt) in prompts.iter().enumerate() {
                for split in [4, 2] {
                    let want = steps(&mut ib, prompt, split);
                    let got = steps(&mut cb, prompt, split);
                    let d = max_abs_diff(&got, &want);
                    assert!(d < 1e-4, "{dtype} prompt {p} split {split} {threads} threads: {d}");
                    let sets: Vec<Vec<f32>> = (0..LAYERS).map(|l| cb.state(&state_name(l)).unwrap().to_vec()).collect();
                    let s = share(&sets);
                    assert!(s > 0.0 && s < 1.0, "{dtype} prompt {p}: core share {s}");
                    if split == 4 {
                        assert_ne!(last_sets.as_ref(), Some(&sets), "{dtype} prompt {p}: a new core set");
                        last_sets = Some(sets);
                        if threads == 1 {
                            let masked = steps(&mut mb, prompt, split);
                            let d = max_abs_diff(&got, &masked);
                            assert!(d < 1e-5, "{dtype} prompt {p}: gathered vs masked build {d}");
                        }
                    }
                }
            }
        }
    }
}

/// Half the neurons of every block have a zero `up` row, so their activation silu(gate)·0 is 0 for every
/// token; with α = 0.5 (k = 32 of 64) each token's core is exactly the 32 live neurons (random weights
/// make every live activation non-zero), so the core set is the live set at any β, and since the dead
/// neurons contribute nothing the outputs are the dense model's.
#[test]
fn a_core_set_known_by_construction() {
    let dead = |j: usize| j % 2 == 1;
    let (_src, m) = tiny(DType::F32, 64, |w| {
        for l in 0..LAYERS {
            let name = format!("blk.{l}.ffn_up.weight");
            let t = w.get(&name).unwrap();
            let k = t.shape[1];
            let mut v = t.to_f32().unwrap();
            for j in (0..NEURONS).filter(|&j| dead(j)) {
                v[j * k..(j + 1) * k].fill(0.0);
            }
            w.insert(name, TensorData::from_f32(vec![NEURONS, k], &v));
        }
    });
    let live: Vec<f32> = (0..NEURONS).map(|j| if dead(j) { 0.0 } else { 1.0 }).collect();
    let dense = build_graph(&m, &Build::new(all_logits())).unwrap();
    let mut ib = InterpreterBackend::new(dense.graph, &dense.weights, 64).unwrap();
    let want = steps(&mut ib, &TOKENS, 4);
    for beta in [0.1, 0.5, 1.0] {
        let b = build(0.5, beta);
        let (got, sets) = interp_run(&m, &b, 4);
        assert_eq!(sets, vec![live.clone(); LAYERS], "β {beta}");
        assert!(max_abs_diff(&got, &want) < 1e-5);
        let (cgot, csets) = compiled_run(&m, &b, 4, 2);
        assert_eq!(csets, sets, "β {beta}: compiled core sets");
        assert!(max_abs_diff(&cgot, &want) < 1e-4);
    }
    // One more neuron per token than there are live ones: ties at |a| = 0 make every neuron core; and
    // β = 0 keeps every neuron (each is core for at least 0 tokens).
    for (alpha, beta) in [(33.0 / 64.0, 1.0), (0.5, 0.0)] {
        let (_, sets) = interp_run(&m, &build(alpha, beta), 4);
        assert_eq!(sets, vec![vec![1.0; NEURONS]; LAYERS], "α {alpha} β {beta}");
    }
}

fn f32_input(name: &str, shape: Vec<usize>, data: Vec<f32>) -> (String, Tensor) {
    (name.to_string(), Tensor::f32(shape, data))
}

/// Decode after prefill uses the prefill's core set, whatever the decode token activates: its logits
/// equal those of a hand-made model — the dense graph whose non-core neurons (per layer, from the
/// prefill) have zero down columns — run on the dense prefill's KV cache. The dense decode differs, so
/// the decode tokens do activate non-core neurons, which have no effect.
#[test]
fn decode_uses_the_prefill_core_set() {
    let (_src, m) = tiny(DType::F32, 65, |_| {});
    let (prompt, next) = (&TOKENS[..5], &TOKENS[5..8]);
    let b = build(0.2, 0.6);
    let built = build_graph(&m, &b).unwrap();
    let mut ib = InterpreterBackend::new(built.graph, &built.weights, 64).unwrap();
    ib.forward(prompt).unwrap();
    let sets: Vec<Vec<f32>> = (0..LAYERS).map(|l| ib.state(&state_name(l)).unwrap().to_vec()).collect();
    let got = ib.forward(next).unwrap().data; // a second chunk of 3 tokens at past = 5

    // The reference: dense prefill (for the KV cache), then the dense graph with non-core neurons removed.
    let dense = build_graph(&m, &Build::new(all_logits())).unwrap();
    let g = &dense.graph;
    let run = |w: &WeightStore, toks: &[u32], past: usize, caches: &[(String, Tensor)]| {
        let s = toks.len();
        let mut inputs: Vec<(String, Tensor)> = vec![
            ("tokens".into(), Tensor::i64(vec![1, s], toks.iter().map(|&t| t as i64).collect())),
            ("pos".into(), Tensor::i64(vec![1, s], (past..past + s).map(|p| p as i64).collect())),
        ];
        inputs.extend(caches.iter().cloned());
        let refs: Vec<(&str, Tensor)> = inputs.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
        Interpreter::new(w).run(g, &refs).unwrap()
    };
    let empty: Vec<(String, Tensor)> = (0..LAYERS)
        .flat_map(|l| ["k", "v"].map(|kv| f32_input(&format!("{kv}_cache.{l}"), vec![1, 0, 2, 8], vec![])))
        .collect();
    let out = run(&dense.weights, prompt, 0, &empty);
    let caches: Vec<(String, Tensor)> = out.into_iter().filter(|(n, _)| n.contains("_cache.")).collect();
    let mut pruned = dense.weights.clone();
    for (l, set) in sets.iter().enumerate() {
        let name = format!("blk.{l}.ffn_down.weight");
        let t = pruned.get(&name).unwrap();
        let (r, c) = (t.shape[0], t.shape[1]);
        let mut v = t.to_f32().unwrap();
        for i in 0..r {
            for j in (0..c).filter(|&j| set[j] == 0.0) {
                v[i * c + j] = 0.0;
            }
        }
        pruned.insert(name, TensorData::from_f32(vec![r, c], &v));
    }
    let logits =
        |o: Vec<(String, Tensor)>| o.into_iter().find(|(n, _)| n == "logits").unwrap().1.as_f32().unwrap().to_vec();
    let want = logits(run(&pruned, next, prompt.len(), &caches));
    let dense_next = logits(run(&dense.weights, next, prompt.len(), &caches));
    let s = share(&sets);
    assert!(s > 0.05 && s < 0.95, "core share {s}");
    let d = max_abs_diff(&got, &want);
    assert!(d < 1e-5, "decode vs the model without the non-core neurons: {d}");
    assert!(max_abs_diff(&got, &dense_next) > 1e-3, "the decode tokens activate non-core neurons");
    // And the core set stays the prefill's through the decode steps.
    for (l, set) in sets.iter().enumerate() {
        assert_eq!(ib.state(&state_name(l)).unwrap(), &set[..]);
    }
    // Compiled: the same.
    let art = tempfile::tempdir().unwrap();
    let manifest = compile_build(&m, "test", &b, art.path()).unwrap();
    let rec = manifest.records.iter().find(|r| r["pass"] == "coreinfer").expect("recorded");
    assert_eq!(rec["detail"]["beta"], serde_json::json!(0.6f32));
    assert_eq!(rec["detail"]["layers"].as_array().unwrap().len(), LAYERS);
    let mut cb = CompiledBackend::load(art.path(), 2, None).unwrap();
    cb.forward(prompt).unwrap();
    let cgot = cb.forward(next).unwrap().data;
    assert!(max_abs_diff(&cgot, &want) < 1e-4);
    // A new prompt after reset chooses its own set.
    cb.reset();
    cb.forward(&TOKENS[3..9]).unwrap();
    ib.reset();
    ib.forward(&TOKENS[3..9]).unwrap();
    for l in 0..LAYERS {
        assert_eq!(cb.state(&state_name(l)).unwrap(), ib.state(&state_name(l)).unwrap());
    }
}

/// `evaluate_prompted`: the prompt chooses the core set, the rest is scored with it; compiled =
/// interpreter, every neuron core = dense, a small α scores differently from dense.
#[test]
fn prompted_perplexity() {
    let (_src, m) = tiny(DType::F32, 66, |_| {});
    let text: Vec<u32> = (0..40u32).map(|i| (i * 53 + 7) % 96).collect();
    let ppl = |b: &Build, compiled: bool| -> f64 {
        if compiled {
            let art = tempfile::tempdir().unwrap();
            compile_build(&m, "test", b, art.path()).unwrap();
            let mut cb = CompiledBackend::load(art.path(), 2, None).unwrap();
            kiln::eval::evaluate_prompted(&mut cb, &text, 16, 8, 8, |_| {}).unwrap().perplexity
        } else {
            let built = build_graph(&m, b).unwrap();
            let mut ib = InterpreterBackend::new(built.graph, &built.weights, 64).unwrap();
            kiln::eval::evaluate_prompted(&mut ib, &text, 16, 8, 8, |_| {}).unwrap().perplexity
        }
    };
    let dense = ppl(&Build::new(all_logits()), false);
    let all = ppl(&build(1.0, 0.0), false);
    assert!((all - dense).abs() < 1e-4 * dense, "{all} vs {dense}");
    let (i, c) = (ppl(&build(0.2, 0.5), false), ppl(&build(0.2, 0.5), true));
    assert!((i - c).abs() < 1e-4 * i, "interpreter {i} vs compiled {c}");
    assert!((i - dense).abs() > 1e-3 * dense, "CoreInfer at α 0.2 changes the perplexity ({i} vs {dense})");
}

#[test]
fn coreinfer_options_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(Arch::Llama);
    write_hf(dir.path(), &cfg, &random_weights(&cfg, DType::F32, 3), 1).unwrap();
    let model = Some(dir.path());
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["run", "--prompt-ids", "1,2", "--coreinfer", "alpha=0"], "alpha 0 is outside (0, 1]"),
        (vec!["run", "--prompt-ids", "1,2", "--coreinfer", "alpha=1.5"], "outside (0, 1]"),
        (vec!["run", "--prompt-ids", "1,2", "--coreinfer", "beta=-0.1"], "beta -0.1 is outside [0, 1]"),
        (vec!["run", "--prompt-ids", "1,2", "--coreinfer", "alpha=x"], "alpha `x` is not a number"),
        (vec!["run", "--prompt-ids", "1,2", "--coreinfer", "gamma=1"], "unknown key `gamma`"),
        (vec!["compile", "-o", "/tmp/never", "--coreinfer", "alpha"], "not KEY=VALUE"),
        (vec!["run", "--prompt-ids", "1,2", "--coreinfer", "--chess-sparsity", "0.5"], "cannot be combined"),
    ];
    for (args, want) in cases {
        let (code, _, err) = run_kiln(&args, model);
        assert_ne!(code, 0, "{args:?} should fail");
        assert!(err.contains(want) && err.contains("--coreinfer"), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    let text = dir.path().join("t.txt");
    std::fs::write(&text, "a b c").unwrap();
    let t = text.to_str().unwrap();
    for (args, want) in [
        (
            vec!["eval", "--text", t, "--window", "16", "--prompt-len", "16"],
            "--prompt-len 16 must be less than --window 16",
        ),
        (vec!["eval", "--text", t, "--window", "16", "--prompt-len", "8", "--stride", "12"], "at most --window"),
    ] {
        let (code, _, err) = run_kiln(&args, model);
        assert_ne!(code, 0, "{args:?} should fail");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    // A good one runs.
    let (code, out, err) =
        run_kiln(&["run", "--prompt-ids", "1,2,3", "-n", "3", "--coreinfer", "alpha=0.3,beta=0.5"], model);
    assert_eq!(code, 0, "{err}");
    assert!(!out.is_empty(), "{out}");
}

/// The CoreInfer kernels alone on odd widths, with many exact ties (small integer activations, ±0):
/// compiled `core_keep`/`core_select` = the interpreter, bit for bit, over a prefill and a second step,
/// at random α/β and 1/2 threads.
#[test]
fn core_kernels_match_the_interpreter_on_odd_shapes() {
    use kiln::codegen::{compile_to_dir, ArtifactInfo, CompileOptions};
    use kiln::ir::{shape, Dim, Graph, TensorType};
    use rand::{Rng, SeedableRng};
    const VOCAB: usize = 13;
    let mut rng = rand::rngs::StdRng::seed_from_u64(71);
    let mut partial = 0;
    for trial in 0..24u64 {
        let c = [1usize, 7, 33, 100][trial as usize % 4];
        let alpha: f32 = if trial == 0 { 1.0 } else { rng.random_range(0.01..1.0) };
        let beta: f32 = match trial % 6 {
            0 => 0.0,
            3 => 1.0,
            _ => rng.random_range(0.1..0.9),
        };
        let mut store = WeightStore::new();
        let vals: Vec<f32> =
            (0..VOCAB * c).map(|i| if i % 5 == 0 { -0.0 } else { rng.random_range(-3..=3) as f32 }).collect();
        store.insert("table", TensorData::from_f32(vec![VOCAB, c], &vals));
        store.insert("col", TensorData::from_f32(vec![VOCAB, 1], &[0.5; VOCAB]));
        let mut g = Graph::new("core");
        let tokens = g.input("tokens", TensorType::new(DType::I32, shape!["batch", "seq"])).unwrap();
        g.input("pos", TensorType::new(DType::I32, shape!["batch", "seq"])).unwrap();
        let cache = g.input("cache", TensorType::new(DType::F32, shape!["batch", "past", 1i64])).unwrap();
        let core = g.input("core", TensorType::new(DType::F32, vec![Dim::sym("batch"), Dim::from(c)])).unwrap();
        let table = g.weight("table", TensorType::new(DType::F32, vec![Dim::from(VOCAB), Dim::from(c)])).unwrap();
        let colw = g.weight("col", TensorType::new(DType::F32, vec![Dim::from(VOCAB), Dim::from(1usize)])).unwrap();
        let act = g.add(Op::Embedding, &[table, tokens]).unwrap();
        let col = g.add(Op::Embedding, &[colw, tokens]).unwrap();
        let grown = g.add(Op::Concat { axis: 1 }, &[cache, col]).unwrap();
        let keep = g.add(Op::CoreKeep { past: Dim::sym("past") }, &[act, core]).unwrap();
        let sel = g.add(Op::CoreSelect { alpha, beta, past: Dim::sym("past") }, &[act, core]).unwrap();
        g.output("keep", keep);
        g.output("cache", grown);
        g.output("core", sel);
        let dir = tempfile::tempdir().unwrap();
        let info = ArtifactInfo {
            model_name: "core".into(),
            source_hash: "core".into(),
            context_length: 32,
            vocab_size: VOCAB,
            ..Default::default()
        };
        compile_to_dir(&g, &store, &CompileOptions::default(), &info, dir.path()).unwrap();
        let mut cb = CompiledBackend::load(dir.path(), 1 + (trial % 2) as usize, None).unwrap();
        let (mut cache_v, mut core_v, mut past) = (Vec::<f32>::new(), vec![0f32; c], 0usize);
        for step in 0..2 {
            let s = rng.random_range(1..=9usize);
            let toks: Vec<u32> = (0..s).map(|_| rng.random_range(0..VOCAB as u32)).collect();
            cb.step(&toks).unwrap();
            let ids: Vec<i64> = toks.iter().map(|&t| t as i64).collect();
            let inputs = [
                ("tokens", Tensor::i64(vec![1, s], ids)),
                ("pos", Tensor::i64(vec![1, s], (past as i64..(past + s) as i64).collect())),
                ("cache", Tensor::f32(vec![1, past, 1], cache_v.clone())),
                ("core", Tensor::f32(vec![1, c], core_v.clone())),
            ];
            let out = Interpreter::new(&store).run(&g, &inputs).unwrap();
            let get = |n: &str| out.iter().find(|(k, _)| k == n).unwrap().1.as_f32().unwrap().to_vec();
            let what = format!("trial {trial}: C {c}, α {alpha}, β {beta}, step {step}, seq {s}");
            assert_eq!(cb.output("keep").unwrap(), &get("keep")[..], "{what}: keep");
            assert_eq!(cb.state("core").unwrap(), &get("core")[..], "{what}: core set");
            if step == 0 && alpha == 1.0 {
                assert_eq!(get("core"), vec![1.0; c], "{what}: α = 1 keeps every neuron");
            }
            let core_now = get("core");
            partial += usize::from(core_now.contains(&0.0) && core_now.contains(&1.0));
            (cache_v, core_v, past) = (get("cache"), core_now, past + s);
        }
    }
    assert!(partial >= 12, "only {partial} steps had a core set that is neither empty nor everything");
}
