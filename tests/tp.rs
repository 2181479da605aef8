//! Tensor parallelism: the `shard` and `fuse-allreduce-rmsnorm` filetests, the per-rank graphs run with
//! the in-process reference collective against the unsharded graph (interpreter and compiled code), and
//! `kiln run --tp 2` under mpirun against `--tp 1` (greedy ids identical, logits within 1e-4).

use crate::common::{kiln_bin, max_abs_diff, random_weights, smollm2, tiny_config};
use kiln::codegen::CompileOptions;
use kiln::frontend::llama::{build_graph as build_decoder, GraphOptions};
use kiln::frontend::{Arch, LlamaConfig};
use kiln::ir::collective::LocalGroup;
use kiln::ir::{DType, Graph, Interpreter, WeightStore};
use kiln::passes::fuse_allreduce_rmsnorm::FuseAllReduceRmsNorm;
use kiln::passes::shard::Shard;
use kiln::passes::{Pass, PassCx, Pipeline};
use kiln::runtime::{Backend, CompiledBackend, InterpreterBackend};
use std::path::Path;
use std::sync::Arc;

/// A Llama with SmolLM2's awkward head counts in small: 6 query heads over 3 KV heads (2 ranks get 2 + 1
/// KV groups) and 96 FFN channels (3 blocks of 32: 64 + 32), head dim 32 so quantized column slices are
/// whole blocks.
fn uneven_config() -> LlamaConfig {
    let mut cfg = tiny_config(Arch::Llama);
    cfg.hidden_size = 64;
    cfg.n_heads = 6;
    cfg.n_kv_heads = 3;
    cfg.head_dim = 32;
    cfg.intermediate_size = 96;
    cfg.n_layers = 2;
    cfg
}

fn quantized(cfg: &LlamaConfig, dtype: DType, seed: u64) -> WeightStore {
    let mut w = random_weights(cfg, DType::F32, seed);
    let names: Vec<String> = w.iter().filter(|(_, t)| t.shape.len() == 2).map(|(n, _)| n.clone()).collect();
    for n in names {
        let t = w.get(&n).unwrap().clone();
        let q = kiln::ir::quant::quantize(dtype, &t.to_f32().unwrap()).unwrap();
        w.insert(n, kiln::ir::TensorData { dtype, shape: t.shape, bytes: q.into() });
    }
    w
}

/// Rank `rank`'s graph of `g` over `tp` ranks (fused or not) and the weights it reads.
fn rank_graph(g: &Graph, w: &WeightStore, tp: usize, rank: usize, fuse: bool) -> (Graph, WeightStore) {
    let mut passes: Vec<Box<dyn Pass>> = vec![Box::new(Shard { tp, rank })];
    if fuse {
        passes.push(Box::new(FuseAllReduceRmsNorm));
    }
    let cx = PassCx { weights: std::cell::RefCell::new(w.clone()), ..Default::default() };
    let mut g = g.clone();
    Pipeline::from_passes(passes).run(&mut g, &cx, None).unwrap();
    (g, cx.weights.take())
}

/// Logits of each step, on the interpreter over one rank.
fn steps_single(g: &Graph, w: &WeightStore, steps: &[&[u32]]) -> Vec<Vec<f32>> {
    let mut b = InterpreterBackend::new(g.clone(), w, 64).unwrap();
    steps.iter().map(|s| b.forward(s).unwrap().data).collect()
}

/// Logits of each step on every rank, the ranks as threads with the reference collective.
fn steps_ranks(ranks: &[(Graph, WeightStore)], steps: &[&[u32]]) -> Vec<Vec<Vec<f32>>> {
    let group = LocalGroup::new(ranks.len());
    std::thread::scope(|s| {
        let js: Vec<_> = ranks
            .iter()
            .zip(group)
            .map(|((g, w), h)| {
                s.spawn(move || {
                    let interp = Interpreter::new(w).with_collective(Arc::new(h));
                    let mut b = InterpreterBackend::with_interpreter(g.clone(), interp, 64).unwrap();
                    steps.iter().map(|st| b.forward(st).unwrap().data).collect::<Vec<_>>()
                })
            })
            .collect();
        js.into_iter().map(|j| j.join().unwrap()).collect()
    })
}

/// Compiles each rank's graph and runs the ranks as threads with the reference collective.
/// Each rank's logits per step, and how many launches of its program fuse a residual add into an
/// RMSNorm.
fn steps_ranks_compiled(
    ranks: &[(Graph, WeightStore)],
    vocab: usize,
    steps: &[&[u32]],
) -> (Vec<Vec<Vec<f32>>>, Vec<usize>) {
    let mut add_norms = Vec::new();
    let dirs: Vec<tempfile::TempDir> = ranks
        .iter()
        .map(|(g, w)| {
            let d = tempfile::tempdir().unwrap();
            let info = kiln::codegen::ArtifactInfo {
                model_name: "tp".into(),
                source_hash: "-".into(),
                context_length: 64,
                vocab_size: vocab,
                eos_token: None,
                ..Default::default()
            };
            let opts = CompileOptions { all_logits: true, ..CompileOptions::default() };
            let m = kiln::codegen::compile_to_dir(g, w, &opts, &info, d.path()).unwrap();
            add_norms.push(m.program.launches.iter().filter(|l| l.kernel.starts_with("kiln_add_rms_norm")).count());
            d
        })
        .collect();
    let group = LocalGroup::new(ranks.len());
    let logits = std::thread::scope(|s| {
        let js: Vec<_> = dirs
            .iter()
            .zip(group)
            .map(|(d, h)| {
                s.spawn(move || {
                    let mut b = CompiledBackend::load(d.path(), 1, None).unwrap().with_collective(Arc::new(h));
                    steps.iter().map(|st| b.forward(st).unwrap().data).collect::<Vec<_>>()
                })
            })
            .collect();
        js.into_iter().map(|j| j.join().unwrap()).collect()
    });
    (logits, add_norms)
}

/// Prefill of 5 tokens (uneven over 2 and 3 ranks), a decode step (one token: replicated), then 2.
const STEPS: [&[u32]; 3] = [&[3, 17, 95, 0, 42], &[8], &[61, 5]];

fn check_filetest(name: &str, header: &str, input: &str, after: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/filetests").join(name);
    let file = format!("; {header} (tests/tp.rs; BLESS=1 rewrites)\n{input}; after:\n{after}");
    if std::env::var_os("BLESS").is_some() {
        std::fs::write(&path, &file).unwrap();
    }
    let expected = std::fs::read_to_string(&path).expect("filetest exists (BLESS=1 writes it)");
    let (want_in, want_out) = expected.split_once("; after:\n").expect("filetest has an `; after:` section");
    assert_eq!(want_in.split_once('\n').unwrap().1, input, "{name}: the input graph changed (BLESS=1)");
    assert_eq!(want_out, after, "{name}: the pass output changed (BLESS=1 after review)");
}

#[test]
fn shard_filetest_and_ranks_equal_the_unsharded_graph() {
    let cfg = uneven_config();
    let w = random_weights(&cfg, DType::F32, 7);
    let g = build_decoder("tiny", &cfg, &w, GraphOptions::default()).unwrap();
    let input = kiln::ir::text::print(&g);
    let ranks: Vec<(Graph, WeightStore)> = (0..2).map(|r| rank_graph(&g, &w, 2, r, false)).collect();
    let after = kiln::ir::text::print(&ranks[1].0);
    check_filetest(
        "shard-tp2-rank1.kir",
        "shard tp=2 rank=1 on a 2-layer Llama, 6 q / 3 kv heads, ffn 96",
        &input,
        &after,
    );
    // Rank 0 holds 2 of the 3 KV heads (4 query heads) and 64 FFN channels, rank 1 the rest.
    let text0 = kiln::ir::text::print(&ranks[0].0);
    assert!(text0.contains("input {name = \"k_cache.0\"} : f32[batch, past, 2, 32]"), "{text0}");
    assert!(after.contains("input {name = \"k_cache.0\"} : f32[batch, past, 1, 32]"));
    assert!(text0.contains("\"blk.0.attn_q.weight#tp0of2\"} : f32[128, 64]"));
    assert!(after.contains("\"blk.0.ffn_down.weight#tp1of2\"} : f32[64, 32]"));
    assert_eq!(after.matches("all_reduce(").count(), 2 * cfg.n_layers);

    let want = steps_single(&g, &w, &STEPS);
    for (tp, ranks) in [(2, ranks), (3, (0..3).map(|r| rank_graph(&g, &w, 3, r, false)).collect())] {
        let got = steps_ranks(&ranks, &STEPS);
        for (r, per_rank) in got.iter().enumerate() {
            for (s, (w, g)) in want.iter().zip(per_rank).enumerate() {
                let d = max_abs_diff(w, g);
                assert!(d < 1e-5, "tp {tp} rank {r} step {s}: max |Δlogit| {d}");
            }
        }
    }
}

#[test]
fn fuse_filetest_and_fused_ranks_equal_the_unsharded_graph() {
    let cfg = uneven_config();
    let w = random_weights(&cfg, DType::F32, 8);
    // Last-position logits: the final residual is gathered for the slice before the LM head.
    for last_only in [false, true] {
        let g = build_decoder("tiny", &cfg, &w, GraphOptions { last_logits_only: last_only }).unwrap();
        let unfused = rank_graph(&g, &w, 2, 0, false).0;
        let ranks: Vec<(Graph, WeightStore)> = (0..2).map(|r| rank_graph(&g, &w, 2, r, true)).collect();
        let after = kiln::ir::text::print(&ranks[0].0);
        if !last_only {
            check_filetest(
                "fuse-allreduce-rmsnorm-tp2-rank0.kir",
                "fuse-allreduce-rmsnorm after shard tp=2 rank=0 (same model as shard-tp2-rank1.kir)",
                &kiln::ir::text::print(&unfused),
                &after,
            );
            // Every all-reduce became a reduce-scatter; one gather per norm, none of the residual.
            assert_eq!(after.matches("all_reduce(").count(), 0);
            assert_eq!(after.matches("reduce_scatter(").count(), 2 * cfg.n_layers);
            assert_eq!(after.matches("all_gather(").count(), 2 * cfg.n_layers);
            assert_eq!(after.matches(" shard(").count(), 1, "only the embedding is sliced locally");
        } else {
            // The last point's residual is also needed whole (the slice): one more gather.
            assert_eq!(after.matches("all_gather(").count(), 2 * cfg.n_layers);
        }
        let want = steps_single(&g, &w, &STEPS);
        let got = steps_ranks(&ranks, &STEPS);
        for (r, per_rank) in got.iter().enumerate() {
            for (s, (w, g)) in want.iter().zip(per_rank).enumerate() {
                let d = max_abs_diff(w, g);
                assert!(d < 1e-5, "last_only {last_only} rank {r} step {s}: max |Δlogit| {d}");
            }
        }
    }
}

#[test]
fn fuse_keeps_a_point_unfused_when_two_gathers_would_cost_more() {
    // An exposed residual (an extra output) next to its norm: the fused form would gather both.
    let cfg = uneven_config();
    let w = random_weights(&cfg, DType::F32, 9);
    let g = build_decoder("tiny", &cfg, &w, GraphOptions::default()).unwrap();
    let (mut s, _) = rank_graph(&g, &w, 2, 0, false);
    // The first residual add after an all-reduce: block 0's attention half.
    let mid = s
        .nodes
        .iter()
        .position(|n| n.op == kiln::ir::Op::Add && n.inputs.iter().any(|v| s.node(*v).op == kiln::ir::Op::AllReduce))
        .unwrap();
    s.output("mid.0", kiln::ir::ValueId(mid as u32));
    let cx = PassCx::default();
    assert!(FuseAllReduceRmsNorm.run(&mut s, &cx).unwrap());
    let why: Vec<String> = cx.explanations.take().into_iter().map(|(_, l)| l).collect();
    assert!(why[0].contains("kept unfused"), "{why:?}");
    assert!(why[1..].iter().all(|l| l.contains("fused")), "{why:?}");
    let text = kiln::ir::text::print(&s);
    assert_eq!(text.matches("all_reduce(").count(), 1, "{text}");
}

#[test]
fn compiled_ranks_equal_the_interpreter_fused_and_unfused_quantized() {
    let cfg = uneven_config();
    let w = quantized(&cfg, DType::Q8_0, 10);
    let g = build_decoder("tiny", &cfg, &w, GraphOptions::default()).unwrap();
    let want = steps_single(&g, &w, &STEPS);
    for fuse in [false, true] {
        let ranks: Vec<(Graph, WeightStore)> = (0..2).map(|r| rank_graph(&g, &w, 2, r, fuse)).collect();
        let (got, add_norms) = steps_ranks_compiled(&ranks, cfg.vocab_size, &STEPS);
        if !fuse {
            // Unfused, each all-reduce (attention and MLP, per layer) is added to the residual stream
            // and the sum normalised next (by the MLP norm, the next layer's attention norm or the final
            // norm): one add+norm launch each. (Sharded graphs have no skippable block regions, so
            // block boundaries do not keep the add apart.)
            assert!(kiln::ir::blocks::find_blocks(&ranks[0].0).is_ok_and(|b| b.is_empty()));
            assert_eq!(add_norms, vec![2 * cfg.n_layers; 2], "add+rms_norm launches per rank");
        }
        for (r, per_rank) in got.iter().enumerate() {
            for (s, (w, g)) in want.iter().zip(per_rank).enumerate() {
                let d = max_abs_diff(w, g);
                assert!(d < 1e-4, "fused {fuse} rank {r} step {s}: max |Δlogit| {d}");
            }
        }
    }
}

#[test]
fn too_many_ranks_for_the_kv_heads_is_an_error_naming_them() {
    let cfg = uneven_config();
    let w = random_weights(&cfg, DType::F32, 1);
    let mut g = build_decoder("tiny", &cfg, &w, GraphOptions::default()).unwrap();
    let cx = PassCx { weights: std::cell::RefCell::new(w), ..Default::default() };
    let e = Shard { tp: 4, rank: 0 }.run(&mut g, &cx).unwrap_err().to_string();
    assert!(e.contains("3 KV heads") && e.contains("--tp"), "{e}");
}

/// Runs `kiln run` (under mpirun when `tp` > 1; `kiln` re-executes itself) and returns the JSON report.
fn kiln_run_json(args: &[&str], logits: &Path) -> serde_json::Value {
    let mut cmd = std::process::Command::new(kiln_bin());
    cmd.arg("run").args(args).arg("--json").arg("--logits-out").arg(logits);
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "kiln run {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bad JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

fn read_logits(p: &Path) -> Vec<Vec<f32>> {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn mpirun_present() -> bool {
    std::process::Command::new("mpirun").arg("--version").output().is_ok_and(|o| o.status.success())
}

#[test]
fn tp2_under_mpirun_matches_tp1_on_smollm2() {
    if !mpirun_present() {
        eprintln!("SKIPPED: mpirun is not installed (apt-get install openmpi-bin libopenmpi-dev)");
        return;
    }
    let _ = smollm2();
    let dir = tempfile::tempdir().unwrap();
    let prompt = "6403,1980,253,655,314,29";
    for backend in ["compiled", "interpreter"] {
        let n = if backend == "compiled" { "12" } else { "4" };
        let base = ["--prompt-ids", prompt, "-n", n, "--ignore-eos", "--backend", backend];
        let p1 = dir.path().join(format!("{backend}-tp1.json"));
        let one = kiln_run_json(&[&base[..], &["--tp", "1"]].concat(), &p1);
        for fuse in [false, true] {
            let p2 = dir.path().join(format!("{backend}-tp2-{fuse}.json"));
            let mut args = [&base[..], &["--tp", "2"]].concat();
            if !fuse {
                args.push("--no-fuse");
            }
            let two = kiln_run_json(&args, &p2);
            assert_eq!(one["generated_ids"], two["generated_ids"], "{backend}, fused {fuse}: greedy ids differ");
            assert_eq!(two["tp"], 2);
            let (l1, l2) = (read_logits(&p1), read_logits(&p2));
            assert_eq!(l1.len(), l2.len());
            for (s, (a, b)) in l1.iter().zip(&l2).enumerate() {
                let d = max_abs_diff(a, b);
                assert!(d < 1e-4, "{backend}, fused {fuse}, step {s}: max |Δlogit| {d}");
            }
            assert!(two["comm"]["bytes"].as_f64().unwrap() > 0.0, "{two}");
        }
    }
}

#[test]
fn bad_tp_options_are_clear_errors() {
    let _ = smollm2();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(kiln_bin()).arg("run").args(args).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) = run(&["--prompt-ids", "1,2", "-n", "1", "--tp", "0"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("--tp 0"), "{err}");
    if mpirun_present() && !Path::new("/dev/nvidia0").exists() {
        // NCCL is compiled in, and refuses without a GPU: every rank exits with the reason.
        let (code, err) = run(&["--prompt-ids", "1,2", "-n", "1", "--tp", "2", "--comm", "nccl"]);
        assert_ne!(code, Some(0));
        assert!(err.contains("--comm nccl") && err.contains("CUDA"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        // SmolLM2 has 3 KV heads: four ranks cannot share them.
        let (code, err) = run(&["--prompt-ids", "1,2", "-n", "1", "--tp", "4", "--backend", "interpreter"]);
        assert_ne!(code, Some(0));
        assert!(err.contains("3 KV heads"), "{err}");
    }
}
