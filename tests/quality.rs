//! Measured quality: perplexity (`kiln eval`) on both backends, calibration, and the `skip-layers` pass —
//! a filetest, zero skipped blocks being the identity, and a skipped model against a hand-built model
//! that never had those blocks.

use crate::common::{random_weights, run_kiln, smollm2, tiny_config};
use kiln::artifact::{build_graph, compile_build, Build};
use kiln::codegen::CompileOptions;
use kiln::frontend::export::write_hf;
use kiln::frontend::llama::{build_graph as build_decoder, GraphOptions};
use kiln::frontend::{Arch, LlamaConfig, Model};
use kiln::ir::{DType, Graph, WeightStore};
use kiln::passes::skip_layers::{SkipLayers, SkipMethod};
use kiln::passes::{PassCx, Pipeline};
use kiln::runtime::{Backend, CompiledBackend, InterpreterBackend};
use std::path::Path;

fn all_logits() -> CompileOptions {
    CompileOptions { all_logits: true, ..CompileOptions::default() }
}

fn tiny(n_layers: usize, seed: u64) -> (LlamaConfig, WeightStore) {
    let mut cfg = tiny_config(Arch::Llama);
    cfg.n_layers = n_layers;
    let w = random_weights(&cfg, DType::F32, seed);
    (cfg, w)
}

fn tiny_model(n_layers: usize, seed: u64, dir: &Path) -> Model {
    let (cfg, w) = tiny(n_layers, seed);
    write_hf(dir, &cfg, &w, 1).unwrap();
    Model::load(dir).unwrap()
}

fn interp_logits(g: Graph, w: &WeightStore, tokens: &[u32]) -> Vec<f32> {
    let mut b = InterpreterBackend::new(g, w, 64).unwrap();
    b.forward(tokens).unwrap().data
}

fn full_nodes(m: &Model) -> usize {
    m.graph_with(GraphOptions { last_logits_only: false }).unwrap().nodes.len()
}

fn count_inputs(g: &Graph, prefix: &str) -> usize {
    g.inputs().filter(|(n, _)| n.starts_with(prefix)).count()
}

const TOKENS: [u32; 12] = [3, 17, 95, 0, 42, 42, 8, 61, 5, 77, 12, 30];

#[test]
fn skip_layers_filetest() {
    let (cfg, w) = tiny(4, 1);
    let before = build_decoder("tiny", &cfg, &w, GraphOptions::default()).unwrap();
    let input = kiln::ir::text::print(&before);
    let mut g = kiln::ir::text::parse(&input).unwrap();
    let cx = PassCx::default();
    let skip = SkipLayers { count: 2, method: SkipMethod::Even };
    let passes: Vec<Box<dyn kiln::passes::Pass>> = vec![Box::new(skip)];
    let reports = Pipeline::from_passes(passes).run(&mut g, &cx, None).unwrap();
    assert!(reports[0].changed);
    let after = kiln::ir::text::print(&g);
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/filetests/skip-layers-even-2-of-4.kir");
    let file = format!("; skip-layers count=2 method=even on a 4-layer tiny Llama (tests/quality.rs; BLESS=1 rewrites)\n{input}; after:\n{after}");
    if std::env::var_os("BLESS").is_some() {
        std::fs::write(&path, &file).unwrap();
    }
    let expected = std::fs::read_to_string(&path).expect("filetest exists (BLESS=1 writes it)");
    let (want_in, want_out) = expected.split_once("; after:\n").expect("filetest has an `; after:` section");
    assert_eq!(want_in.split_once('\n').unwrap().1, input, "the frontend's tiny graph changed (BLESS=1)");
    assert_eq!(want_out, after, "skip-layers output changed (BLESS=1 after review)");

    // Exact counts: blocks 1 and 2 are gone with their caches, so the graph is exactly as large as a
    // 2-layer model's; the recorded choice says which.
    let (cfg2, w2) = tiny(2, 1);
    let two = build_decoder("tiny", &cfg2, &w2, GraphOptions::default()).unwrap();
    assert_eq!(g.nodes.len(), two.nodes.len());
    assert_eq!((count_inputs(&before, "k_cache."), count_inputs(&g, "k_cache.")), (4, 2));
    assert_eq!((count_inputs(&g, "v_cache."), g.outputs.len()), (2, 1 + 2 * 2));
    let names: Vec<&str> = g.inputs().map(|(n, _)| n).collect();
    assert_eq!(names, ["tokens", "pos", "k_cache.0", "v_cache.0", "k_cache.3", "v_cache.3"]);
    assert!(!after.contains("blk.1.") && !after.contains("blk.2."));
    let rec = cx.records.borrow();
    assert_eq!(rec[0].detail["skipped"], serde_json::json!([1, 2]));
}

/// Copies the weights of `keep`'s layers of `w` into a model of `keep.len()` layers, renumbered.
fn without_layers(cfg: &LlamaConfig, w: &WeightStore, keep: &[usize]) -> (LlamaConfig, WeightStore) {
    let mut small = cfg.clone();
    small.n_layers = keep.len();
    let mut out = WeightStore::new();
    for (name, t) in w.iter() {
        match name.strip_prefix("blk.").and_then(|r| r.split_once('.')) {
            Some((l, rest)) => {
                if let Some(new) = keep.iter().position(|&k| k.to_string() == l) {
                    out.insert(format!("blk.{new}.{rest}"), t.clone());
                }
            }
            None => out.insert(name.clone(), t.clone()),
        }
    }
    (small, out)
}

#[test]
fn skipped_model_equals_a_model_built_without_those_layers() {
    let (cfg, w) = tiny(6, 2);
    let full = build_decoder("tiny", &cfg, &w, GraphOptions::default()).unwrap();
    let layers = kiln::passes::skip_layers::choose_layers(6, 3, SkipMethod::Even, None).unwrap();
    assert_eq!(layers, [1, 2, 4]); // kept: round(0, 2.5, 5) = 0, 3, 5
    let skipped = kiln::passes::skip_layers::skip_blocks(&full, &layers).unwrap();
    let (small_cfg, small_w) = without_layers(&cfg, &w, &[0, 3, 5]);
    let small = build_decoder("tiny", &small_cfg, &small_w, GraphOptions::default()).unwrap();
    let got = interp_logits(skipped.clone(), &w, &TOKENS);
    let want = interp_logits(small, &small_w, &TOKENS);
    assert_eq!(got, want, "same blocks, same weights: bit-identical");
    // And the full model is not (the test would notice a no-op pass).
    assert_ne!(interp_logits(full, &w, &TOKENS), want);

    // Compiled, through the build path, against the interpreter; only the kept caches are allocated.
    let src = tempfile::tempdir().unwrap();
    write_hf(src.path(), &cfg, &w, 1).unwrap();
    let m = Model::load(src.path()).unwrap();
    let build =
        Build { opts: all_logits(), skip: SkipLayers { count: 3, method: SkipMethod::Even }, ..Default::default() };
    let art = tempfile::tempdir().unwrap();
    let manifest = compile_build(&m, "test", &build, art.path()).unwrap();
    let states =
        manifest.program.buffers.iter().filter(|b| matches!(b.kind, kiln::ir::program::BufferKind::State { .. }));
    assert_eq!(states.count(), 3 * 2);
    assert_eq!(manifest.passes, ["lift", "cse", "dce", "skip-layers", "dce"]);
    // Per-stage reports: the default pipeline changes nothing on an imported graph; skip-layers removes
    // the blocks' nodes itself, so the dce after it finds nothing.
    let st = &manifest.stages;
    assert_eq!(st.iter().map(|s| s.pass.as_str()).collect::<Vec<_>>(), manifest.passes);
    assert!(st[..3].iter().all(|s| !s.changed && s.nodes_before == full_nodes(&m)), "{st:?}");
    let st = &st[3..];
    assert_eq!((st[0].changed, st[0].nodes_before), (true, full_nodes(&m)));
    assert!(st[0].nodes_after < st[0].nodes_before, "{st:?}");
    assert_eq!((st[1].changed, st[1].nodes_before, st[1].nodes_after), (false, st[0].nodes_after, st[0].nodes_after));
    assert_eq!(manifest.records[0]["detail"]["skipped"], serde_json::json!([1, 2, 4]));
    let mut c = CompiledBackend::load(art.path(), 1, None).unwrap();
    let mut interp = InterpreterBackend::new(skipped, &w, 64).unwrap();
    // Prefill then decode: the skipped blocks' caches are neither read nor written.
    for step in [&TOKENS[..8], &TOKENS[8..9], &TOKENS[9..]] {
        let (a, b) = (c.forward(step).unwrap().data, interp.forward(step).unwrap().data);
        assert!(crate::common::max_abs_diff(&a, &b) < 1e-4);
    }
}

#[test]
fn skipping_zero_layers_is_bit_identical() {
    let src = tempfile::tempdir().unwrap();
    let m = tiny_model(3, 3, src.path());
    let zero =
        Build { opts: all_logits(), skip: SkipLayers { count: 0, method: SkipMethod::Even }, ..Default::default() };
    let kiln::artifact::BuiltGraph { graph: g0, passes, records, .. } = build_graph(&m, &zero).unwrap();
    let plain = m.graph_with(GraphOptions::default()).unwrap();
    assert_eq!(g0, plain);
    assert!(passes == kiln::passes::DEFAULT_PIPELINE && records.is_empty());
    // The registered pass, unconfigured, changes nothing.
    let mut g = plain.clone();
    let r = Pipeline::from_names(&["skip-layers"]).unwrap().run(&mut g, &PassCx::default(), None).unwrap();
    assert!(!r[0].changed && g == plain);
    assert_eq!(interp_logits(g0, &m.weights, &TOKENS), interp_logits(plain, &m.weights, &TOKENS));
    // Compiled: the zero-skip build and a plain compile give the same bits.
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    compile_build(&m, "test", &zero, a.path()).unwrap();
    kiln::artifact::compile_model(&m, "test", &all_logits(), b.path()).unwrap();
    let run = |d: &Path| CompiledBackend::load(d, 1, None).unwrap().forward(&TOKENS).unwrap().data;
    assert_eq!(run(a.path()), run(b.path()));
    // ... on SmolLM2 too (graph level: the same graph is compiled).
    let s = smollm2();
    let g = build_graph(s, &Build::new(CompileOptions::default())).unwrap().graph;
    assert_eq!(g, s.graph_with(GraphOptions { last_logits_only: true }).unwrap());
}

#[test]
fn perplexity_compiled_equals_interpreter_on_a_tiny_model() {
    let src = tempfile::tempdir().unwrap();
    let m = tiny_model(3, 4, src.path());
    let tokens: Vec<u32> = (0..40u32).map(|i| (i * 37 + 11) % 96).collect();
    let art = tempfile::tempdir().unwrap();
    kiln::artifact::compile_model(&m, "test", &all_logits(), art.path()).unwrap();
    let mut c = CompiledBackend::load(art.path(), 2, None).unwrap();
    let mut i = InterpreterBackend::new(m.graph().unwrap(), &m.weights, 64).unwrap();
    let rc = kiln::eval::evaluate(&mut c, &tokens, 16, 6, |_| {}).unwrap();
    let ri = kiln::eval::evaluate(&mut i, &tokens, 16, 6, |_| {}).unwrap();
    assert_eq!((rc.scored, ri.scored), (39, 39));
    assert!((rc.mean_nll - ri.mean_nll).abs() < 1e-5, "{} vs {}", rc.mean_nll, ri.mean_nll);
    // One window covering the text = the NLL computed by hand from one full forward pass.
    let logits = interp_logits(m.graph().unwrap(), &m.weights, &tokens);
    let v = m.config.vocab_size;
    let by_hand: f64 = (1..tokens.len())
        .map(|j| {
            let row = &logits[(j - 1) * v..j * v];
            let lse = row.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
            lse - row[tokens[j] as usize] as f64
        })
        .sum::<f64>()
        / 39.0;
    let whole = kiln::eval::evaluate(&mut i, &tokens, 64, 64, |_| {}).unwrap();
    assert!((whole.mean_nll - by_hand).abs() < 1e-9);
    // A short window loses context, so the numbers differ (the window is really applied).
    assert!((whole.mean_nll - ri.mean_nll).abs() > 1e-6);
    // A generation artifact (last logits only) is refused with a reason.
    let gen = tempfile::tempdir().unwrap();
    kiln::artifact::compile_model(&m, "test", &CompileOptions::default(), gen.path()).unwrap();
    let mut g = CompiledBackend::load(gen.path(), 1, None).unwrap();
    let e = kiln::eval::evaluate(&mut g, &tokens, 16, 8, |_| {}).unwrap_err().to_string();
    assert!(e.contains("--all-logits"), "{e}");
}

#[test]
fn calibration_statistics_agree_between_backends() {
    let src = tempfile::tempdir().unwrap();
    let m = tiny_model(3, 5, src.path());
    let tokens: Vec<u32> = (0..30u32).map(|i| (i * 53 + 7) % 96).collect();
    let build = Build { opts: all_logits(), expose_calibration: true, ..Default::default() };
    let g = build_graph(&m, &build).unwrap().graph;
    let mut i = InterpreterBackend::new(g.clone(), &m.weights, 64).unwrap();
    let mi = kiln::calibrate::measure(&mut i, &tokens, 12, 3, |_| {}).unwrap();
    let art = tempfile::tempdir().unwrap();
    compile_build(&m, "test", &build, art.path()).unwrap();
    let mut c = CompiledBackend::load(art.path(), 2, None).unwrap();
    let mc = kiln::calibrate::measure(&mut c, &tokens, 12, 3, |_| {}).unwrap();
    assert_eq!(mi.scored, 30 - 3);
    assert!((mi.mean_nll - mc.mean_nll).abs() < 1e-5);
    for (a, b) in mi.layers.iter().zip(&mc.layers) {
        assert!((a.block_influence - b.block_influence).abs() < 1e-5);
        assert!(a.block_influence > 0.0 && a.block_influence < 2.0);
        assert_eq!(a.ffn_act_mean_abs.len(), 64);
        assert!(crate::common::max_abs_diff(&a.attn_in_mean_abs, &b.attn_in_mean_abs) < 1e-4);
    }
    // Block influence by hand for layer 1 from the interpreter's hidden states of the first chunk.
    i.reset();
    i.forward(&tokens[..12]).unwrap();
    let (x_in, x_out) = (i.output("calib.1.x_in").unwrap(), i.output("calib.1.x_out").unwrap());
    let d = m.config.hidden_size;
    let cos: Vec<f64> = (0..12)
        .map(|t| {
            let (a, b) = (&x_in[t * d..(t + 1) * d], &x_out[t * d..(t + 1) * d]);
            let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
            let n = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            1.0 - dot / (n(a) * n(b))
        })
        .collect();
    let mut one = kiln::passes::calibration::StatsAccumulator::new(3);
    let acts = |l: usize| {
        let n = kiln::passes::calibration::exposed_names(l);
        let o = |k: usize| i.output(&n[k]).unwrap();
        kiln::passes::calibration::BlockActivations {
            x_in: o(0),
            x_mid: o(1),
            x_out: o(2),
            attn_in: o(3),
            attn_out_in: o(4),
            ffn_in: o(5),
            ffn_act: o(6),
            ffn_gate_act: o(7),
        }
    };
    one.add(1, 12, &acts(1)).unwrap();
    let want = cos.iter().sum::<f64>() / 12.0;
    assert!((one.finish()[1].block_influence - want).abs() < 1e-12);
}

/// The default model through the CLI: `kiln eval` on the compiled backend equals the interpreter on a
/// few dozen tokens, `kiln calibrate` writes a versioned file, and skipping with it works.
#[test]
fn smollm2_eval_cli_compiled_matches_interpreter() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("t.txt");
    std::fs::write(
        &text,
        "The kettle clicked off, and the kitchen filled with steam. She poured the water over the leaves and waited.",
    )
    .unwrap();
    let model = kiln::default_model_path();
    let cache = dir.path().join("cache");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(crate::common::kiln_bin())
            .args(args)
            .env("KILN_CACHE_DIR", &cache)
            .env("KILN_MODEL", &model)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "kiln {args:?}: {stderr}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let t = text.to_str().unwrap();
    let ppl = |backend: &str| -> (f64, u64) {
        let j: serde_json::Value = serde_json::from_str(&run(&[
            "eval",
            "--text",
            t,
            "--window",
            "16",
            "--stride",
            "8",
            "--json",
            "--backend",
            backend,
        ]))
        .unwrap();
        (j["report"]["mean_nll"].as_f64().unwrap(), j["report"]["scored"].as_u64().unwrap())
    };
    let (c, n) = ppl("compiled");
    let (i, n2) = ppl("interpreter");
    assert!(n >= 20 && n == n2, "{n} {n2}");
    assert!((c - i).abs() < 1e-3, "compiled {c} vs interpreter {i}");
    assert!(c > 0.5 && c < 8.0, "a plausible NLL for English text: {c}");

    let calib = dir.path().join("calib.json");
    let c_str = calib.to_str().unwrap();
    run(&["calibrate", "--text", t, "-o", c_str, "--chunk", "16"]);
    let cal = kiln::passes::calibration::Calibration::from_json(&std::fs::read_to_string(&calib).unwrap()).unwrap();
    assert_eq!((cal.version, cal.layers.len(), cal.hidden_size), (2, 30, 576));
    let j: serde_json::Value = serde_json::from_str(&run(&[
        "eval",
        "--text",
        t,
        "--window",
        "16",
        "--json",
        "--skip-layers",
        "2",
        "--skip-method",
        "influence",
        "--calibration",
        c_str,
    ]))
    .unwrap();
    assert!(j["report"]["mean_nll"].as_f64().unwrap() > c, "removing blocks costs quality");
    let _ = smollm2;
}

#[test]
fn bad_quality_input_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "  \n").unwrap();
    let text = dir.path().join("t.txt");
    std::fs::write(&text, "Some words to score.").unwrap();
    let bad_calib = dir.path().join("bad.json");
    std::fs::write(&bad_calib, "{\"format\": \"kiln-calibration\", \"version\": 7}").unwrap();
    let (e, t, b) = (empty.to_str().unwrap(), text.to_str().unwrap(), bad_calib.to_str().unwrap());
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["eval", "--text", "/nonexistent/eval.txt"], "/nonexistent/eval.txt"),
        (vec!["eval", "--text", e], "is empty"),
        (vec!["calibrate", "--text", e, "-o", "/tmp/x.json"], "is empty"),
        (vec!["eval", "--text", t, "--skip-layers", "2", "--skip-method", "influence", "--calibration", b], "bad.json"),
        (vec!["eval", "--text", t, "--skip-layers", "2", "--skip-method", "influence"], "--calibration"),
        (vec!["eval", "--text", t, "--skip-layers", "30"], "--skip-layers 30"),
        (vec!["eval", "--text", t, "--skip-layers", "29"], "at most 28"),
        (vec!["eval", "--text", t, "--skip-layers", "2", "--skip-method", "random"], "random"),
        (vec!["eval", "--text", t, "--window", "8", "--stride", "9"], "--stride"),
        (vec!["compile", "-o", "/tmp/x", "--quality-budget", "10%"], "ppl+X%"),
        (vec!["compile", "-o", "/tmp/x", "--quality-budget", "ppl+10%"], "--calibration"),
        (vec!["compile", "-o", "/tmp/x", "--quality-budget", "ppl+10%", "--budget-min-saving", "1.5"], "[0, 1)"),
        (vec!["compile", "-o", "/tmp/x", "--quality-budget", "ppl+10%", "--budget-cost", "flops"], "flops"),
        (vec!["eval", "--text", t, "--early-exit", "top", "--exit-schedule", "4:20,8:25"], "never written"),
        (vec!["eval", "--text", t, "--early-exit", "top", "--exit-schedule", "4-20"], "POS:DEPTH"),
        (vec!["run", "--prompt", "Hi", "-n", "2", "--early-exit", "lower", "--exit-schedule", "3:31"], "1..=30"),
        (
            vec!["run", "--prompt", "Hi", "--backend", "interpreter", "--early-exit", "top", "--exit-schedule", "3:20"],
            "compiled",
        ),
        (vec!["compile", "-o", "/tmp/x", "--early-exit", "top", "--exit-schedule", "4:20,8:25"], "never written"),
        (vec!["compile", "-o", "/tmp/x", "--prune-sparsity", "1.5"], "outside [0, 1)"),
        (vec!["compile", "-o", "/tmp/x", "--prune-sparsity", "0.5", "--prune-method", "wanda"], "--calibration"),
        (vec!["compile", "-o", "/tmp/x", "--prune-sparsity", "0.5", "--prune-method", "bogus"], "bogus"),
        (vec!["compile", "-o", "/tmp/x", "--prune-method", "wanda"], "--prune-sparsity"),
        (
            vec!["compile", "-o", "/tmp/x", "--early-exit", "top", "--skip-layers", "2", "--exit-schedule", "4:20"],
            "cannot be used with",
        ),
    ];
    for (args, needle) in cases {
        let (code, _, err) = run_kiln(&args, None);
        assert_ne!(code, 0, "{args:?} should fail");
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
        assert!(err.contains(needle), "{args:?}: `{needle}` not in: {err}");
    }
}

/// Per-position early exit on the interpreter: a non-increasing schedule runs and matches an independent
/// reference; an increasing one is refused, and forced through it trips the runtime's KV check.
#[test]
fn early_exit_schedule_never_reads_unwritten_kv() {
    use kiln::runtime::early_exit::{EarlyExitInterpreter, ExitMode, ExitSchedule};
    let (cfg, w) = tiny(4, 6);
    let full = build_decoder("tiny", &cfg, &w, GraphOptions::default()).unwrap();
    let graphs = |mode: ExitMode| -> Vec<Graph> {
        (1..=4)
            .map(|d| {
                let active = mode.active(4, d);
                let skipped: Vec<usize> = (0..4).filter(|l| !active.contains(l)).collect();
                kiln::passes::skip_layers::skip_blocks(&full, &skipped).unwrap()
            })
            .collect()
    };
    let prompt = &TOKENS[..6];
    let steps = &TOKENS[6..10];
    let run = |mode: ExitMode, schedule: ExitSchedule| -> Result<Vec<Vec<f32>>, kiln::runtime::RuntimeError> {
        let mut b = EarlyExitInterpreter::new(graphs(mode), schedule, &w, 64)?;
        let mut out = vec![b.forward(prompt)?.data];
        for t in steps {
            out.push(b.forward(&[*t])?.data);
        }
        Ok(out)
    };
    // Depth 3 from position 6, 2 from position 8 (Sorted-LLaMA-style: the top blocks go).
    let sched = ExitSchedule::new(vec![(6, 3), (8, 2)], 4).unwrap();
    let got = run(ExitMode::Top, sched.clone()).unwrap();
    // Reference: with the top blocks skipped, a position of depth d sees exactly what the depth-d model
    // computes over the whole prefix (every earlier position ran at least d blocks from the bottom).
    let g = graphs(ExitMode::Top);
    for (i, p) in (6..10).enumerate() {
        let d = sched.depth_at(p, 4);
        let all = interp_logits(g[d - 1].clone(), &w, &TOKENS[..=p]);
        let want = &all[all.len() - 96..];
        let step = &got[i + 1];
        assert!(crate::common::max_abs_diff(want, step) < 1e-4, "position {p} depth {d}");
    }
    // SkipDecode-style (lower blocks skipped) runs the same schedule without touching missing KV rows.
    let lower = run(ExitMode::Lower, sched).unwrap();
    assert_ne!(lower[4], got[4]);
    // Full depth everywhere = the plain model, bit for bit.
    let plain = run(ExitMode::Top, ExitSchedule::new(vec![], 4).unwrap()).unwrap();
    let mut b = InterpreterBackend::new(full.clone(), &w, 64).unwrap();
    assert_eq!(plain[0], b.forward(prompt).unwrap().data);
    assert_eq!(plain[1], b.forward(&steps[..1]).unwrap().data);
    // A schedule that increases is refused; forced through, the runtime catches the first unwritten read.
    assert!(ExitSchedule::new(vec![(6, 2), (8, 4)], 4).is_err());
    let e = run(ExitMode::Top, ExitSchedule::unchecked(vec![(6, 2), (8, 4)])).unwrap_err().to_string();
    assert!(e.contains("k_cache.2") && e.contains("holds 6 rows but the step reads 8"), "{e}");
}

/// Per-position early exit in compiled code (block regions skipped at run time) against the interpreter
/// running per-depth graphs, in both modes; full depth = the plain compiled model bit for bit; the KV
/// check trips on an increasing schedule; a program whose blocks leak values has no regions and says so.
#[test]
fn compiled_early_exit_matches_the_interpreter() {
    use kiln::runtime::early_exit::{EarlyExitInterpreter, ExitMode, ExitSchedule};
    let src = tempfile::tempdir().unwrap();
    let m = tiny_model(4, 6, src.path());
    let art = tempfile::tempdir().unwrap();
    kiln::artifact::compile_model(&m, "test", &CompileOptions::default(), art.path()).unwrap();
    let full = m.graph_with(GraphOptions { last_logits_only: true }).unwrap();
    let prompt = &TOKENS[..6];
    let steps = &TOKENS[6..11];
    let run = |b: &mut dyn Backend| -> Result<Vec<Vec<f32>>, kiln::runtime::RuntimeError> {
        let mut out = vec![b.forward(prompt)?.data];
        for t in steps {
            out.push(b.forward(&[*t])?.data);
        }
        Ok(out)
    };
    let sched = || ExitSchedule::new(vec![(6, 3), (8, 2), (10, 1)], 4).unwrap();
    for mode in [ExitMode::Top, ExitMode::Lower] {
        let graphs: Vec<Graph> = (1..=4)
            .map(|d| {
                let active = mode.active(4, d);
                let skipped: Vec<usize> = (0..4).filter(|l| !active.contains(l)).collect();
                kiln::passes::skip_layers::skip_blocks(&full, &skipped).unwrap()
            })
            .collect();
        let want = run(&mut EarlyExitInterpreter::new(graphs, sched(), &m.weights, 64).unwrap()).unwrap();
        for threads in [1, 2] {
            let mut c = CompiledBackend::load(art.path(), threads, Some(64)).unwrap();
            assert_eq!(c.blocks(), 4);
            c.set_early_exit(mode, sched()).unwrap();
            let got = run(&mut c).unwrap();
            for (i, (a, b)) in want.iter().zip(&got).enumerate() {
                assert!(crate::common::max_abs_diff(a, b) < 1e-4, "{mode:?} step {i}, {threads} threads");
            }
            // Reset starts the schedule over.
            c.reset();
            assert_eq!(run(&mut c).unwrap(), got);
        }
    }
    // Full depth everywhere = the plain compiled model, bit for bit.
    let mut plain = CompiledBackend::load(art.path(), 1, Some(64)).unwrap();
    let want = run(&mut plain).unwrap();
    let mut c = CompiledBackend::load(art.path(), 1, Some(64)).unwrap();
    c.set_early_exit(ExitMode::Lower, ExitSchedule::new(vec![(6, 4)], 4).unwrap()).unwrap();
    assert_eq!(run(&mut c).unwrap(), want);
    // An increasing schedule, forced through, trips the KV check on the first unwritten read.
    let mut c = CompiledBackend::load(art.path(), 1, Some(64)).unwrap();
    c.set_early_exit(ExitMode::Top, ExitSchedule::unchecked(vec![(6, 2), (8, 4)])).unwrap();
    let e = run(&mut c).unwrap_err().to_string();
    assert!(e.contains("k_cache.2") && e.contains("holds 6 rows but the step reads 8"), "{e}");
    // A schedule compiled into the artifact runs by default, the same as one set at run time; a
    // manifest edited to an increasing schedule is refused at load, by name.
    let sched_art = tempfile::tempdir().unwrap();
    let spec = kiln::ir::program::EarlyExitSpec { mode: "lower".into(), schedule: vec![(6, 3), (8, 2), (10, 1)] };
    let build = Build { early_exit: Some(spec), ..Build::new(CompileOptions::default()) };
    let man = compile_build(&m, "test", &build, sched_art.path()).unwrap();
    assert!(man.records.iter().any(|r| r["pass"] == "early-exit"));
    let mut by_manifest = CompiledBackend::load(sched_art.path(), 1, Some(64)).unwrap();
    let mut by_call = CompiledBackend::load(art.path(), 1, Some(64)).unwrap();
    by_call.set_early_exit(ExitMode::Lower, sched()).unwrap();
    assert_eq!(run(&mut by_manifest).unwrap(), run(&mut by_call).unwrap());
    let mpath = sched_art.path().join("manifest.json");
    let text = std::fs::read_to_string(&mpath).unwrap();
    let mut j: serde_json::Value = serde_json::from_str(&text).unwrap();
    j["early_exit"]["schedule"] = serde_json::json!([[6, 2], [8, 3]]);
    std::fs::write(&mpath, serde_json::to_string(&j).unwrap()).unwrap();
    let e = CompiledBackend::load(sched_art.path(), 1, Some(64)).err().unwrap().to_string();
    assert!(e.contains("early-exit schedule") && e.contains("never written"), "{e}");
    // Exposing values inside the blocks (calibration outputs) makes blocks unskippable: no regions.
    let exposed = tempfile::tempdir().unwrap();
    let build = Build { expose_calibration: true, ..Build::new(CompileOptions::default()) };
    compile_build(&m, "test", &build, exposed.path()).unwrap();
    let mut c = CompiledBackend::load(exposed.path(), 1, Some(64)).unwrap();
    assert_eq!(c.blocks(), 0);
    let e = c.set_early_exit(ExitMode::Top, sched()).unwrap_err().to_string();
    assert!(e.contains("skip"), "{e}");
}
