//! Structured pruning (the `structured-prune` pass): compiled against the interpreter on the same pruned
//! graph, "pruning nothing" against the dense model, neurons and heads that contribute exactly nothing
//! (by construction) pruned without changing the outputs, grouped-query shapes, and bad options.

use crate::common::{max_abs_diff, random_weights, run_kiln, tiny_config};
use crate::sparsity::{all_logits, calibrate, steps};
use kiln::artifact::{build_graph, compile_build, Build};
use kiln::frontend::export::write_hf;
use kiln::frontend::{Arch, Model};
use kiln::ir::{DType, Op, TensorData, WeightStore};
use kiln::passes::calibration::Calibration;
use kiln::passes::structured_prune::StructuredPrune;
use kiln::runtime::{CompiledBackend, InterpreterBackend};
use std::sync::Arc;

fn sp(neurons: f64, heads: usize) -> Option<StructuredPrune> {
    Some(StructuredPrune { neurons, heads })
}

fn build(cal: &Arc<Calibration>, s: Option<StructuredPrune>) -> Build {
    Build { opts: all_logits(), structured: s, calibration: Some(cal.clone()), ..Default::default() }
}

/// A tiny Llama (hidden 32, MLP 64, `heads` query heads over `kv` KV heads of 8) with `weights`
/// edited by `edit`, loaded back, and a calibration of it measured by the interpreter.
fn tiny(
    heads: usize,
    kv: usize,
    seed: u64,
    edit: impl FnOnce(&mut WeightStore),
) -> (tempfile::TempDir, Model, Arc<Calibration>) {
    tiny_with(heads, kv, seed, DType::F32, edit)
}

/// [`tiny`] with its weights stored in `dtype`.
fn tiny_with(
    heads: usize,
    kv: usize,
    seed: u64,
    dtype: DType,
    edit: impl FnOnce(&mut WeightStore),
) -> (tempfile::TempDir, Model, Arc<Calibration>) {
    let mut cfg = tiny_config(Arch::Llama);
    (cfg.n_layers, cfg.n_heads, cfg.n_kv_heads) = (3, heads, kv);
    let mut w = random_weights(&cfg, DType::F32, seed);
    edit(&mut w);
    let (src, m) = if dtype == DType::F32 {
        let src = tempfile::tempdir().unwrap();
        write_hf(src.path(), &cfg, &w, 1).unwrap();
        let m = Model::load(src.path()).unwrap();
        (src, m)
    } else {
        crate::common::quantized_gguf(&cfg, w, dtype)
    };
    let cb = build_graph(&m, &Build { opts: all_logits(), expose_calibration: true, ..Default::default() }).unwrap();
    let mut ib = InterpreterBackend::new(cb.graph, &cb.weights, 64).unwrap();
    let calib_tokens: Vec<u32> = (0..60u32).map(|i| (i * 37 + 11) % 96).collect();
    let cal = calibrate(&m, &mut ib, &calib_tokens, 20);
    (src, m, cal)
}

const TOKENS: [u32; 8] = [5, 9, 33, 2, 71, 40, 18, 90];

fn interp(m: &Model, b: &Build) -> Vec<f32> {
    let built = build_graph(m, b).unwrap();
    let mut ib = InterpreterBackend::new(built.graph, &built.weights, 64).unwrap();
    steps(&mut ib, &TOKENS, 5)
}

#[test]
fn structured_pruning_matches_the_interpreter_and_pruning_nothing_is_dense() {
    let (_src, m, cal) = tiny(4, 2, 31, |_| {});
    let want = interp(&m, &Build::new(all_logits()));
    // A share too small to drop a neuron (round(0.001 · 64) = 0) runs the whole pass: every weight is
    // gathered (all rows/columns, in order) and the graph rebuilt, and the model is the dense one exactly.
    let b = build_graph(&m, &build(&cal, sp(0.001, 0))).unwrap();
    assert!(b.weights.iter().any(|(n, _)| n.contains("#sprune")), "the pass ran");
    assert_eq!(interp(&m, &build(&cal, sp(0.001, 0))), want, "pruning nothing is the dense model, bit for bit");
    assert_eq!(interp(&m, &build(&cal, sp(0.0, 0))), want);

    for (neurons, heads) in [(0.25, 0), (0.0, 1), (0.5, 1), (0.9, 1)] {
        let b = build(&cal, sp(neurons, heads));
        let built = build_graph(&m, &b).unwrap();
        let kept = 64 - (neurons * 64.0f64).round() as usize;
        for l in 0..3 {
            // The weights the graph reads are physically smaller.
            let used = |s: &str| -> Vec<usize> {
                let (name, _) = built.graph.weights().find(|(n, _)| n.starts_with(&format!("blk.{l}.{s}"))).unwrap();
                built.weights.get(name).unwrap().shape.clone()
            };
            assert_eq!(used("ffn_gate.weight"), vec![kept, 32]);
            assert_eq!(used("ffn_up.weight"), vec![kept, 32]);
            assert_eq!(used("ffn_down.weight"), vec![32, kept]);
            let q_heads = 4 - 2 * heads;
            assert_eq!(used("attn_q.weight"), vec![q_heads * 8, 32]);
            assert_eq!(used("attn_output.weight"), vec![32, q_heads * 8]);
            assert_eq!(used("attn_k.weight"), vec![2 * 8, 32], "KV heads are kept");
        }
        let reference = interp(&m, &b);
        assert!(max_abs_diff(&reference, &want) > 1e-4, "{neurons}/{heads} changes the model");
        let art = tempfile::tempdir().unwrap();
        let manifest = compile_build(&m, "test", &b, art.path()).unwrap();
        for threads in [1, 2] {
            let mut cb = CompiledBackend::load(art.path(), threads, None).unwrap();
            let d = max_abs_diff(&steps(&mut cb, &TOKENS, 5), &reference);
            assert!(d < 1e-4, "neurons {neurons}, heads {heads}, {threads} threads: compiled vs interpreter {d}");
        }
        let rec = manifest.records.iter().find(|r| r["pass"] == "structured-prune").expect("recorded");
        assert_eq!(rec["detail"]["neurons"], serde_json::json!(neurons));
        assert_eq!(rec["detail"]["heads_per_kv_group"], serde_json::json!(heads));
        assert_eq!(rec["detail"]["layers"].as_array().unwrap().len(), 3);
        assert!(built.explanations.iter().any(|(p, _)| p == "structured-prune"));
    }
}

/// A block-quantized model (Q4_1, Q4_0, Q8_0): the pruned `W_down` and `W_o` (heads of 8 columns are
/// not whole 32-blocks) become gathered column tensors read by `active_linear`, whose elements are the
/// ORIGINAL weights' kept columns bit for bit (the kept set recovered from the exactly gathered gate /
/// q rows); compiled = interpreter; nothing dropped (neurons 0.001 → all 64 kept) matches the dense
/// model; and `decode_bytes` counts the gathered tensors' real bytes.
#[test]
fn quantized_pruning_gathers_exact_columns() {
    for (dtype, seed) in [(DType::Q4_1, 51), (DType::Q4_0, 52), (DType::Q8_0, 53)] {
        let gathered = dtype.gathered_of().unwrap();
        let (_src, m, cal) = tiny_with(4, 2, seed, dtype, |_| {});
        let want = interp(&m, &Build::new(all_logits()));
        let b0 = build(&cal, sp(0.001, 0));
        let d = max_abs_diff(&interp(&m, &b0), &want);
        assert!(d < 1e-4, "{dtype}: keeping every neuron (gathered down) vs dense: {d}");
        // 0.3 keeps 45 of 64: the gathered form takes any count.
        for (neurons, heads) in [(0.5, 1), (0.3, 0)] {
            let b = build(&cal, sp(neurons, heads));
            let built = build_graph(&m, &b).unwrap();
            let weight = |l: usize, s: &str| {
                let (name, _) = built.graph.weights().find(|(n, _)| n.starts_with(&format!("blk.{l}.{s}"))).unwrap();
                built.weights.get(name).unwrap().clone()
            };
            // Rows of the original `src` weight (gathered exactly) found in `got`, in order.
            let kept_rows = |got: &TensorData, src: &str, width: usize| -> Vec<usize> {
                let full = m.weights.get(src).unwrap().to_f32().unwrap();
                let got = got.to_f32().unwrap();
                got.chunks(width)
                    .map(|row| full.chunks(width).position(|r| r == row).expect("a row of the original"))
                    .collect()
            };
            for l in 0..3 {
                let down = weight(l, "ffn_down.weight");
                assert_eq!(down.dtype, gathered, "layer {l}");
                let kept = kept_rows(&weight(l, "ffn_gate.weight"), &format!("blk.{l}.ffn_gate.weight"), 32);
                assert_eq!(down.shape, vec![kept.len(), 32]);
                let orig = m.weights.get(&format!("blk.{l}.ffn_down.weight")).unwrap().to_f32().unwrap();
                let got = down.to_f32().unwrap();
                for (jj, &j) in kept.iter().enumerate() {
                    for r in 0..32 {
                        assert_eq!(
                            got[jj * 32 + r].to_bits(),
                            orig[r * 64 + j].to_bits(),
                            "{dtype} layer {l} [{r}, {j}]"
                        );
                    }
                }
                let o = weight(l, "attn_output.weight");
                if heads > 0 {
                    assert_eq!(o.dtype, gathered);
                    let q = kept_rows(&weight(l, "attn_q.weight"), &format!("blk.{l}.attn_q.weight"), 32);
                    let orig = m.weights.get(&format!("blk.{l}.attn_output.weight")).unwrap().to_f32().unwrap();
                    let got = o.to_f32().unwrap();
                    for (jj, &j) in q.iter().enumerate() {
                        for r in 0..32 {
                            assert_eq!(got[jj * 32 + r].to_bits(), orig[r * 32 + j].to_bits(), "W_o [{r}, {j}]");
                        }
                    }
                } else {
                    assert_eq!(o.dtype, dtype, "heads = 0 leaves W_o alone");
                }
            }
            // decode_bytes reads the gathered weights whole: the bytes of every linear's weight.
            let total: f64 = built
                .graph
                .nodes
                .iter()
                .filter(|n| matches!(n.op, Op::Linear | Op::ActiveLinear))
                .map(|n| match &built.graph.node(n.inputs[1]).op {
                    Op::Weight { name } => built.weights.get(name).unwrap().bytes.len() as f64,
                    _ => 0.0,
                })
                .sum();
            assert!(built.graph.nodes.iter().any(|n| n.op == Op::ActiveLinear));
            assert_eq!(kiln::budget::decode_bytes(&built.graph, &built.weights, 0.0, 0.0), total);
            let reference = interp(&m, &b);
            let art = tempfile::tempdir().unwrap();
            compile_build(&m, "test", &b, art.path()).unwrap();
            let mut cb = CompiledBackend::load(art.path(), 2, None).unwrap();
            let d = max_abs_diff(&steps(&mut cb, &TOKENS, 5), &reference);
            assert!(d < 1e-4, "{dtype} {neurons}/{heads}: compiled vs interpreter {d}");
        }
    }
}

/// CoreInfer after structured pruning on a Q4_1 model: the down projection stays the gathered weight
/// (read whole: the gathered kernels list every kept channel, a non-core one adds exactly 0), a core set
/// per block; compiled = interpreter over a prompt and decode steps.
#[test]
fn coreinfer_runs_on_a_structured_pruned_quantized_model() {
    use kiln::passes::coreinfer::CoreInfer;
    let (_src, m, cal) = tiny_with(4, 2, 57, DType::Q4_1, |_| {});
    let b = Build {
        coreinfer: Some(CoreInfer { alpha: 0.3, beta: 0.2, exact: false, gather: false }),
        ..build(&cal, sp(0.25, 1))
    };
    let built = build_graph(&m, &b).unwrap();
    let downs: Vec<_> = built
        .graph
        .nodes
        .iter()
        .filter(|n| n.op == Op::ActiveLinear)
        .map(|n| built.graph.ty(n.inputs[1]).dtype)
        .collect();
    assert_eq!(downs, vec![DType::Q4_1G; 6], "down and W_o of 3 blocks read gathered weights");
    assert_eq!(built.graph.nodes.iter().filter(|n| matches!(n.op, Op::CoreSelect { .. })).count(), 3);
    let reference = interp(&m, &b);
    let art = tempfile::tempdir().unwrap();
    compile_build(&m, "test", &b, art.path()).unwrap();
    let mut cb = CompiledBackend::load(art.path(), 2, None).unwrap();
    let d = max_abs_diff(&steps(&mut cb, &TOKENS, 5), &reference);
    assert!(d < 1e-4, "compiled vs interpreter: {d}");
}

/// Zeroes columns of an `[rows, cols]` f32 weight.
fn zero_cols(t: &mut TensorData, cols: &[usize]) {
    let (r, c) = (t.shape[0], t.shape[1]);
    let mut v = t.to_f32().unwrap();
    for i in 0..r {
        for &j in cols {
            v[i * c + j] = 0.0;
        }
    }
    *t = TensorData::from_f32(vec![r, c], &v);
}

/// Neurons whose down-projection column is zero and query heads whose output-projection columns are
/// zero contribute exactly 0 to the residual stream (a·0 = 0), so their importance is 0 and pruning
/// exactly them leaves every output as it was.
#[test]
fn pruning_zero_contribution_neurons_and_heads_keeps_the_outputs() {
    let dead_neurons: Vec<usize> = (0..64).filter(|j| j % 4 == 1).collect(); // 16 of 64 = 25%
                                                                             // Six query heads over two KV groups (heads 0-2 read KV head 0, 3-5 KV head 1): one dead per group.
    let dead_heads = [1usize, 5];
    let (_src, m, cal) = tiny(6, 2, 41, |w| {
        for l in 0..3 {
            let mut t = w.get(&format!("blk.{l}.ffn_down.weight")).unwrap().clone();
            zero_cols(&mut t, &dead_neurons);
            w.insert(format!("blk.{l}.ffn_down.weight"), t);
            let mut t = w.get(&format!("blk.{l}.attn_output.weight")).unwrap().clone();
            let cols: Vec<usize> = dead_heads.iter().flat_map(|&h| h * 8..(h + 1) * 8).collect();
            zero_cols(&mut t, &cols);
            w.insert(format!("blk.{l}.attn_output.weight"), t);
        }
    });
    let want = interp(&m, &Build::new(all_logits()));
    let b = build(&cal, sp(0.25, 1));
    let built = build_graph(&m, &b).unwrap();
    // Exactly the dead neurons and heads went: the kept gate rows are the live ones, in order.
    let live: Vec<usize> = (0..64).filter(|j| !dead_neurons.contains(j)).collect();
    for l in 0..3 {
        let (name, _) =
            built.graph.weights().find(|(n, _)| n.starts_with(&format!("blk.{l}.ffn_gate.weight#"))).unwrap();
        let got = built.weights.get(name).unwrap().to_f32().unwrap();
        let full = m.weights.get(&format!("blk.{l}.ffn_gate.weight")).unwrap().gather_rows(&live).unwrap();
        assert_eq!(got, full.to_f32().unwrap(), "layer {l}: the dead neurons were dropped");
        let rec = built.records.iter().find(|r| r["pass"] == "structured-prune").unwrap();
        assert_eq!(rec["detail"]["layers"][l]["heads_kept"], serde_json::json!([0, 2, 3, 4]));
    }
    let got = interp(&m, &b);
    let d = max_abs_diff(&got, &want);
    assert!(d < 1e-5, "pruning zero-contribution neurons/heads vs dense: {d}");
    let art = tempfile::tempdir().unwrap();
    compile_build(&m, "test", &b, art.path()).unwrap();
    let mut cb = CompiledBackend::load(art.path(), 2, None).unwrap();
    let d = max_abs_diff(&steps(&mut cb, &TOKENS, 5), &want);
    assert!(d < 1e-4, "compiled pruned vs dense: {d}");
}

/// Grouped-query attention: 6 query heads over 2 KV heads; dropping 2 per group leaves 1 query head per
/// KV head, the attention op's shapes stay consistent; dropping 3 (a whole group's) is refused.
#[test]
fn head_pruning_keeps_grouped_query_shapes_valid() {
    let (_src, m, cal) = tiny(6, 2, 43, |_| {});
    let built = build_graph(&m, &build(&cal, sp(0.0, 2))).unwrap();
    built.graph.verify().unwrap();
    let atts: Vec<_> = built.graph.nodes.iter().filter(|n| matches!(n.op, Op::Attention { .. })).collect();
    assert_eq!(atts.len(), 3);
    for a in atts {
        let (q, k) = (built.graph.ty(a.inputs[0]), built.graph.ty(a.inputs[1]));
        assert_eq!(q.shape[2].as_fixed(), Some(2), "{q}");
        assert_eq!(k.shape[2].as_fixed(), Some(2), "{k}");
        assert_eq!(q.shape[3].as_fixed(), Some(8));
    }
    let reference = interp(&m, &build(&cal, sp(0.0, 2)));
    let art = tempfile::tempdir().unwrap();
    compile_build(&m, "test", &build(&cal, sp(0.0, 2)), art.path()).unwrap();
    let mut cb = CompiledBackend::load(art.path(), 2, None).unwrap();
    let d = max_abs_diff(&steps(&mut cb, &TOKENS, 5), &reference);
    assert!(d < 1e-4, "compiled vs interpreter: {d}");
    let err = format!("{:#}", build_graph(&m, &build(&cal, sp(0.0, 3))).err().unwrap());
    assert!(err.contains("heads 3") && err.contains("KV group"), "{err}");
}

#[test]
fn structured_prune_options_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(Arch::Llama); // 4 query heads over 2 KV heads
    write_hf(dir.path(), &cfg, &random_weights(&cfg, DType::F32, 3), 1).unwrap();
    let text = dir.path().join("t.txt");
    std::fs::write(&text, "a b c d e f g h i j k l m n o p").unwrap();
    // A calibration file of the model (the tiny model has no tokenizer: measured on token ids).
    let m = Model::load(dir.path()).unwrap();
    let cb = build_graph(&m, &Build { opts: all_logits(), expose_calibration: true, ..Default::default() }).unwrap();
    let mut ib = InterpreterBackend::new(cb.graph, &cb.weights, 64).unwrap();
    let cal = calibrate(&m, &mut ib, &(0..40u32).map(|i| (i * 7 + 3) % 96).collect::<Vec<_>>(), 20);
    let calib = dir.path().join("c.json");
    std::fs::write(&calib, cal.to_json()).unwrap();
    let (t, model) = (text.to_str().unwrap(), Some(dir.path()));
    let c = calib.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["eval", "--text", t, "--structured-prune", "neurons=1.0", "--calibration", c], "outside [0, 1)"),
        (vec!["eval", "--text", t, "--structured-prune", "neurons=-0.5", "--calibration", c], "outside [0, 1)"),
        (vec!["eval", "--text", t, "--structured-prune", "heads=2", "--calibration", c], "heads=2"),
        (vec!["eval", "--text", t, "--structured-prune", "rows=2", "--calibration", c], "no `rows`"),
        (vec!["eval", "--text", t, "--structured-prune", "neurons=0.5"], "--calibration"),
        (vec!["compile", "-o", "/tmp/never", "--structured-prune", "heads=1"], "--calibration"),
    ];
    for (args, want) in cases {
        let (code, _, err) = run_kiln(&args, model);
        assert_ne!(code, 0, "{args:?} should fail");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    // A good one runs.
    let (code, out, err) = run_kiln(
        &["run", "--prompt-ids", "1,2,3", "-n", "2", "--structured-prune", "neurons=0.5,heads=1", "--calibration", c],
        model,
    );
    assert_eq!(code, 0, "{err}");
    assert!(!out.is_empty(), "{out}");
}

/// `--quality-budget`'s joint search on a tiny model, with perplexities the interpreter measures: the
/// choice is within the budget (re-measured here), every step of its path saves estimated decode bytes,
/// and from the choice every further step of any technique is over the budget or saves nothing (the
/// search's stopping rule, checked against fresh measurements).
#[test]
fn joint_budget_search_on_a_tiny_model() {
    use kiln::budget::{decode_bytes, search_joint, Axes, Joint, QualityBudget};
    let (_src, m, cal) = tiny(4, 2, 47, |_| {});
    let text: Vec<u32> = (0..48u32).map(|i| (i * 53 + 7) % 96).collect();
    let joint = |j: &Joint| j.apply(Build { opts: all_logits(), calibration: Some(cal.clone()), ..Default::default() });
    let ppl = |j: &Joint| -> anyhow::Result<f64> {
        let b = build_graph(&m, &joint(j))?;
        let mut ib = InterpreterBackend::new(b.graph, &b.weights, 64)?;
        Ok(kiln::eval::evaluate(&mut ib, &text, 16, 16, |_| {})?.perplexity)
    };
    let cost = |j: &Joint| -> anyhow::Result<f64> {
        let b = build_graph(&m, &joint(j))?;
        Ok(decode_bytes(&b.graph, &b.weights, j.chess, j.attn))
    };
    let axes = Axes {
        skip: vec![0, 1],
        chess: vec![0.0, 0.3],
        attn: vec![0.0, 0.3],
        prune: vec![0.0],
        neurons: vec![0.0, 0.25, 0.5],
        heads: vec![0, 1],
    };
    let budget = QualityBudget { percent: 3.0 };
    let c = search_joint(budget, &axes, 0.0, cost, ppl).unwrap();
    let dense = ppl(&Joint::default()).unwrap();
    assert_eq!(c.baseline_perplexity, dense);
    assert!((ppl(&c.config).unwrap() - c.perplexity).abs() < 1e-9);
    assert!(c.perplexity <= budget.limit(dense), "{c:?}");
    let mut prev = c.baseline_cost;
    for j in &c.path {
        let now = cost(j).unwrap();
        assert!(now < prev, "each step saves decode bytes: {j:?}");
        prev = now;
    }
    assert_eq!(c.path.last().copied().unwrap_or_default(), c.config);
    // Stopping rule: no single further step is both within the budget and cheaper.
    let base = c.config;
    let steps = [
        Joint { skip: 1, ..base },
        Joint { chess: 0.3, ..base },
        Joint { attn: 0.3, ..base },
        Joint { neurons: if base.neurons == 0.0 { 0.25 } else { 0.5 }, ..base },
        Joint { heads: 1, ..base },
    ];
    for s in steps.into_iter().filter(|s| *s != base && s.valid()) {
        let (p, k) = (ppl(&s).unwrap(), cost(&s).unwrap());
        assert!(p > c.limit || k >= c.cost, "{s:?} (ppl {p}, cost {k}) would improve on {c:?}");
    }
    // The single-technique bests are within the budget.
    assert!(c.best_single.iter().all(|b| b.perplexity <= c.limit));
    eprintln!(
        "tiny joint budget: {} ppl {:.3} cost {:.0} (dense {:.3}, {:.0})",
        c.description, c.perplexity, c.cost, dense, c.baseline_cost
    );
}

/// `kiln compile --quality-budget` end to end on a tiny model (each candidate's graph is built once and
/// its artifact compiled once; bytes as the cost): the manifest records a choice within the budget that
/// the search measured, the artifact it wrote runs, and a second compile finds every measurement cached.
#[test]
fn budget_compile_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny_config(Arch::Llama);
    cfg.n_layers = 2;
    write_hf(dir.path(), &cfg, &random_weights(&cfg, DType::F32, 48), 1).unwrap();
    let model = Some(dir.path());
    let text = crate::common::word_tokenizer_and_text(dir.path(), cfg.vocab_size);
    let (t, cal) = (text.to_str().unwrap(), dir.path().join("cal.json"));
    let c = cal.to_str().unwrap();
    let (code, _, err) = run_kiln(&["calibrate", "--text", t, "-o", c, "--chunk", "16"], model);
    assert_eq!(code, 0, "{err}");
    let out = dir.path().join("art");
    let o = out.to_str().unwrap();
    let args =
        ["compile", "-o", o, "--quality-budget", "ppl+20%", "--calibration", c, "--budget-cost", "bytes", "--json"];
    let start = std::time::Instant::now();
    let (code, _, err) = run_kiln(&args, model);
    assert_eq!(code, 0, "{err}");
    let first = start.elapsed();
    // Each candidate's artifact is compiled once (its graph built once for the estimate, the cache key
    // and the artifact).
    let compiled = err.matches("[compiled").count();
    let measured = err.matches("→ perplexity").count();
    assert!(compiled > 3 && compiled <= measured, "{compiled} compiles for {measured} candidates: {err}");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    let rec = manifest["records"].as_array().unwrap().iter().find(|r| r.get("quality_budget").is_some());
    let rec = rec.expect("the budget's record");
    // Without --chess-mlp the MLP axis thresholds down's input (the form with the least perplexity
    // per sparsity); the record names it so the choice can be rebuilt from flags.
    assert_eq!(rec["chess_mlp"], "act", "{rec}");
    let q = &rec["quality_budget"];
    let (ppl, limit, base) =
        (q["perplexity"].as_f64().unwrap(), q["limit"].as_f64().unwrap(), q["baseline_perplexity"].as_f64().unwrap());
    assert!(ppl <= limit && (limit - base * 1.2).abs() < 1e-9 * limit, "{q}");
    let cands = q["candidates"].as_array().unwrap();
    assert!(cands.len() > 3, "{q}");
    assert!(cands.iter().any(|k| k["config"] == q["config"] && k["perplexity"].as_f64() == Some(ppl)));
    let mut cb = CompiledBackend::load(&out, 1, None).unwrap();
    assert!(kiln::runtime::Backend::forward(&mut cb, &[1, 2, 3]).is_ok());
    let (code, _, err) = run_kiln(&args, model);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("[compiled"), "the second search compiles nothing: {err}");
    eprintln!("budget through the CLI: {} candidates, first run {first:?}", cands.len());
}

/// `decode_seconds` (the budget's measured cost) times real decode steps and leaves the backend empty;
/// it refuses an empty prompt or zero steps instead of dividing by zero.
#[test]
fn budget_decode_timing_runs_steps_and_resets() {
    let (_src, m, _cal) = tiny(4, 2, 47, |_| {});
    let b = build_graph(&m, &Build { opts: all_logits(), ..Default::default() }).unwrap();
    let mut ib = InterpreterBackend::new(b.graph, &b.weights, 64).unwrap();
    let s = kiln::budget::decode_seconds(&mut ib, &[1, 2, 3], 4, 2).unwrap();
    assert!(s.is_finite() && s > 0.0, "{s}");
    assert_eq!(kiln::runtime::Backend::position(&ib), 0);
    for (prompt, steps, rounds) in [(&[][..], 4, 2), (&[1u32][..], 0, 2), (&[1u32][..], 4, 0)] {
        let e = kiln::budget::decode_seconds(&mut ib, prompt, steps, rounds).unwrap_err();
        assert!(e.to_string().contains("decode timing needs"), "{e}");
    }
    // Paired against another backend: a positive ratio, both backends left empty.
    let b2 = build_graph(&m, &Build { opts: all_logits(), ..Default::default() }).unwrap();
    let mut other = InterpreterBackend::new(b2.graph, &b2.weights, 64).unwrap();
    let r = kiln::budget::paired_decode_ratio(&mut ib, &mut other, &[1, 2, 3], 4, 3).unwrap();
    assert!(r.is_finite() && r > 0.0, "{r}");
    assert_eq!((kiln::runtime::Backend::position(&ib), kiln::runtime::Backend::position(&other)), (0, 0));
    assert!(kiln::budget::paired_decode_ratio(&mut ib, &mut other, &[1], 4, 0).is_err());
}
