//! Filetests of the `lift` pass (`filetests/lift-*.kir`): each file holds an input graph in IR text and,
//! after `; after:`, the graph the pass must produce; `BLESS=1` rewrites the expectations (review the
//! diff). Every case also runs the interpreter on the input and the output with seeded random inputs and
//! weights and checks they agree.
//!
//! Most inputs are generated: a fused graph (`CASES`) run through `kiln_ir::decompose`, so they are
//! exactly what the decomposition emits, and the pass must give the fused graph back node for node.
//! The hand-written files test commuted variants and near misses that must stay as they are.

use kiln_ir::decompose::decompose;
use kiln_ir::interp::{Interpreter, Tensor};
use kiln_ir::text::{parse, print};
use kiln_ir::{DType, Graph, Op, SymEnv, TensorData, WeightStore};
use kiln_passes::lift::Lift;
use kiln_passes::{Pass, PassCx};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/filetests")
}

fn g(body: &str) -> String {
    format!("graph \"t\" {{\n{body}\n}}\n")
}

/// (file, fused graph) — the input of each is `decompose(fused)`.
fn cases() -> Vec<(&'static str, String)> {
    vec![
        ("lift-rms-norm.kir", g("  %0 = input {name = \"x\"} : f32[seq, 8]\n  %1 = weight {name = \"w\"} : f32[8]\n  %2 = rms_norm(%0, %1) {eps = 1e-5} : f32[seq, 8]\n  output \"y\" = %2")),
        ("lift-silu-swiglu.kir", g("  %0 = input {name = \"g\"} : f32[seq, 8]\n  %1 = input {name = \"u\"} : f32[seq, 8]\n  %2 = swiglu(%0, %1) : f32[seq, 8]\n  %3 = silu(%2) : f32[seq, 8]\n  output \"y\" = %3")),
        ("lift-softmax.kir", g("  %0 = input {name = \"x\"} : f32[seq, 8]\n  %1 = softmax(%0) {axis = -1} : f32[seq, 8]\n  %2 = softmax(%1) {axis = 0} : f32[seq, 8]\n  output \"y\" = %2")),
        ("lift-rope-neox.kir", g("  %0 = input {name = \"x\"} : f32[batch, seq, 2, 8]\n  %1 = input {name = \"pos\"} : i32[batch, seq]\n  %2 = rope(%0, %1) {mode = neox, n_rot = 8, theta = 10000.0} : f32[batch, seq, 2, 8]\n  output \"y\" = %2")),
        ("lift-rope-normal.kir", g("  %0 = input {name = \"x\"} : f32[batch, seq, 2, 8]\n  %1 = input {name = \"pos\"} : i32[batch, seq]\n  %2 = rope(%0, %1) {mode = normal, n_rot = 8, theta = 500.0} : f32[batch, seq, 2, 8]\n  output \"y\" = %2")),
        ("lift-attention.kir", g("  %0 = input {name = \"q\"} : f32[batch, seq, 4, 8]\n  %1 = input {name = \"k\"} : f32[batch, seq, 2, 8]\n  %2 = input {name = \"v\"} : f32[batch, seq, 2, 8]\n  %3 = input {name = \"k_cache\"} : f32[batch, past, 2, 8]\n  %4 = input {name = \"v_cache\"} : f32[batch, past, 2, 8]\n  %5 = concat(%3, %1) {axis = 1} : f32[batch, past+seq, 2, 8]\n  %6 = concat(%4, %2) {axis = 1} : f32[batch, past+seq, 2, 8]\n  %7 = attention(%0, %5, %6) {scale = 0.35355338} : f32[batch, seq, 4, 8]\n  output \"y\" = %7\n  output \"k_cache\" = %5\n  output \"v_cache\" = %6")),
    ]
}

/// Seeded random values for every input (symbols: batch 1, seq 3, past 2; integer inputs are
/// positions) and a store with random f32 weights.
fn random_io(graph: &Graph, seed: u64) -> (Vec<(String, Tensor)>, WeightStore) {
    let mut rng = StdRng::seed_from_u64(seed);
    let env: SymEnv = [("batch", 1), ("seq", 3), ("past", 2)].into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    let mut ins = Vec::new();
    let mut w = WeightStore::new();
    for n in &graph.nodes {
        let shape = n.ty.concrete(&env).expect("test graphs use batch, seq and past only");
        let count: usize = shape.iter().product();
        match &n.op {
            Op::Input { name } if n.ty.dtype.is_int() => {
                let past = env["past"];
                ins.push((name.clone(), Tensor::i64(shape, (0..count as i64).map(|i| past + i).collect())));
            }
            Op::Input { name } => {
                ins.push((name.clone(), Tensor::f32(shape, (0..count).map(|_| rng.random_range(-2.0..2.0)).collect())))
            }
            Op::Weight { name } => {
                assert_eq!(n.ty.dtype, DType::F32);
                let vals: Vec<f32> = (0..count).map(|_| rng.random_range(-2.0..2.0)).collect();
                w.insert(name.clone(), TensorData::from_f32(shape, &vals));
            }
            _ => {}
        }
    }
    (ins, w)
}

fn agree(a: &Graph, b: &Graph, tol: f32) {
    for seed in 0..3 {
        let (ins, w) = random_io(a, seed);
        let refs: Vec<(&str, Tensor)> = ins.iter().map(|(k, t)| (k.as_str(), t.clone())).collect();
        let interp = Interpreter::new(&w);
        let (ra, rb) = (interp.run(a, &refs).unwrap(), interp.run(b, &refs).unwrap());
        assert_eq!(ra.len(), rb.len());
        for ((na, ta), (nb, tb)) in ra.iter().zip(&rb) {
            assert_eq!((na, &ta.shape), (nb, &tb.shape));
            for (x, y) in ta.as_f32().unwrap().iter().zip(tb.as_f32().unwrap()) {
                assert!((x - y).abs() <= tol * (1.0 + y.abs()), "output {na}: {x} vs {y}");
            }
        }
    }
}

/// Runs `lift` on the file's input, compares with its expectation (or writes it with BLESS=1), checks
/// the interpreter agrees, and returns (input, output).
fn filetest(file: &str, fresh_input: Option<&str>) -> (Graph, Graph) {
    let path = dir().join(file);
    let existing = std::fs::read_to_string(&path).ok();
    let input = match (fresh_input, &existing) {
        (Some(i), _) => i.to_string(),
        (None, Some(text)) => {
            let body = text.split_once("; after:\n").expect("filetest has an `; after:` section").0;
            body.split_once('\n').expect("a header line").1.to_string()
        }
        (None, None) => panic!("{file} is missing"),
    };
    let before = parse(&input).unwrap_or_else(|e| panic!("{file}: {e}"));
    let mut after = before.clone();
    let changed = Lift::default().run(&mut after, &PassCx::default()).unwrap();
    after.verify().unwrap();
    let out = print(&after);
    if std::env::var_os("BLESS").is_some() {
        let header = existing
            .as_deref()
            .and_then(|t| t.lines().next())
            .filter(|l| l.starts_with(';'))
            .unwrap_or("; lift: the primitive form decompose.rs emits; lift must give the fused graph back node for node (passes/tests/lift.rs; BLESS=1 rewrites)")
            .to_string();
        std::fs::write(&path, format!("{header}\n{input}; after:\n{out}")).unwrap();
    }
    let text = std::fs::read_to_string(&path).unwrap_or_else(|_| panic!("{file} missing (BLESS=1 writes it)"));
    let (want_in, want_out) = text.split_once("; after:\n").expect("`; after:` section");
    assert_eq!(want_in.split_once('\n').unwrap().1, input, "{file}: the input changed (decompose.rs?; BLESS=1)");
    assert_eq!(want_out, out, "{file}: lift output changed (BLESS=1 after review)");
    assert_eq!(changed, before != after);
    agree(&before, &after, 1e-4);
    (before, after)
}

#[test]
fn decomposed_fused_ops_lift_back_exactly() {
    for (file, fused) in cases() {
        let fused = parse(&fused).unwrap();
        let input = print(&decompose(&fused).unwrap());
        assert_ne!(input, print(&fused), "{file}: decomposition expanded something");
        let (_, after) = filetest(file, Some(&input));
        assert_eq!(print(&after), print(&fused), "{file}: lifted back to the fused graph node for node");
        // And lifting the fused graph is a no-op.
        let mut again = fused.clone();
        assert!(!Lift::default().run(&mut again, &PassCx::default()).unwrap(), "{file}");
        assert_eq!(again, fused);
    }
}

#[test]
fn commuted_variants_lift() {
    for file in ["lift-rms-norm-commuted.kir", "lift-silu-swiglu-commuted.kir"] {
        let (before, after) = filetest(file, None);
        assert!(after.nodes.len() < before.nodes.len(), "{file}: something was lifted");
    }
}

#[test]
fn near_misses_stay() {
    let (before, after) = filetest("lift-near-misses.kir", None);
    assert_eq!(before, after, "nothing in lift-near-misses.kir is a fused op");
}

#[test]
fn explanations_name_the_rule_and_the_stop_reason() {
    let text = std::fs::read_to_string(dir().join("lift-silu-swiglu.kir")).unwrap();
    let input = text.split_once("; after:\n").unwrap().0.split_once('\n').unwrap().1;
    let mut g = parse(input).unwrap();
    let cx = PassCx::default();
    let lift = Lift { explanations: true, ..Lift::default() };
    assert!(lift.run(&mut g, &cx).unwrap());
    let lines: Vec<String> = cx.explanations.borrow().iter().map(|(_, l)| l.clone()).collect();
    assert!(lines[0].starts_with("egg stopped: Saturated"), "{lines:?}");
    assert!(lines.iter().any(|l| l.contains("lifted: 1 silu, 1 swiglu")), "{lines:?}");
    // egg's explanation of a lift names the rule that made it.
    assert!(
        lines.iter().any(|l| l.starts_with("explanation of silu-") && l.contains("silu-primitives-to-silu")),
        "{lines:?}"
    );
}
