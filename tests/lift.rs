//! The `lift` pass on a real model: SmolLM2 decomposed into primitives (`decompose`) is lifted back to
//! exactly the graph the frontend builds, which then gives the same greedy tokens and logits on the
//! interpreter and compiled; the decomposed graph itself agrees with the fused one on the interpreter
//! (an independent check of the rope/attention decompositions at full size); and `lift` leaves the
//! imported (fused) graph alone.

use crate::common::smollm2;
use kiln::artifact::{build_graph, compile_build, Build};
use kiln::codegen::CompileOptions;
use kiln::frontend::llama::GraphOptions;
use kiln::ir::decompose::decompose;
use kiln::ir::text::print;
use kiln::ir::Graph;
use kiln::passes::lift::Lift;
use kiln::passes::{Pass, PassCx};
use kiln::runtime::{Backend, CompiledBackend, InterpreterBackend};
use std::collections::BTreeMap;

const PROMPT: [u32; 6] = [1, 9690, 2114, 253, 655, 28];

fn op_counts(g: &Graph) -> BTreeMap<&'static str, usize> {
    let mut m = BTreeMap::new();
    for n in &g.nodes {
        *m.entry(n.op.name()).or_insert(0) += 1;
    }
    m
}

/// Greedy continuation of `PROMPT` for `steps` tokens, with the logits of every step.
fn greedy(b: &mut dyn Backend, steps: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let (mut toks, mut all) = (Vec::new(), Vec::new());
    let mut logits = b.forward(&PROMPT).unwrap().last().to_vec();
    for _ in 0..steps {
        let next = logits.iter().enumerate().fold(0, |best, (i, &v)| if v > logits[best] { i } else { best });
        toks.push(next as u32);
        all.push(logits.clone());
        logits = b.forward(&[next as u32]).unwrap().last().to_vec();
    }
    (toks, all)
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter().zip(b).map(|(x, y)| crate::common::max_abs_diff(x, y)).fold(0.0, f32::max)
}

#[test]
fn decomposed_smollm2_lifts_back_to_the_imported_graph() {
    let m = smollm2();
    let fused = m.graph_with(GraphOptions { last_logits_only: true }).unwrap();
    let prim = decompose(&fused).unwrap();
    let counts = op_counts(&prim);
    for op in ["rms_norm", "rope", "attention", "swiglu", "silu", "softmax"] {
        assert!(!counts.contains_key(op), "decompose left {op}");
    }
    assert!(prim.nodes.len() > 3 * fused.nodes.len(), "{} vs {}", prim.nodes.len(), fused.nodes.len());

    let mut lifted = prim.clone();
    let cx = PassCx::default();
    assert!(Lift::default().run(&mut lifted, &cx).unwrap());
    lifted.verify().unwrap();
    let said: Vec<String> = cx.explanations.borrow().iter().map(|(_, l)| l.clone()).collect();
    assert_eq!(op_counts(&lifted), op_counts(&fused), "{said:?}");
    assert_eq!(lifted.nodes.len(), fused.nodes.len());
    // Node for node, same order, same names: the inputs, the outputs and the KV-cache interface.
    assert_eq!(print(&lifted), print(&fused));
    assert!(said.iter().any(|l| l.contains("egg stopped: Saturated")), "{said:?}");
    assert!(said.iter().any(|l| l.contains("61 rms_norm") && l.contains("30 attention") && l.contains("60 rope")));

    // Interpreter: the decomposed graph agrees with the fused one (tolerance: f32 rounding of the
    // primitives), and the lifted one gives the same tokens and logits as the imported graph.
    let (tf, lf) = greedy(&mut InterpreterBackend::new(fused.clone(), &m.weights, 64).unwrap(), 3);
    let (tl, ll) = greedy(&mut InterpreterBackend::new(lifted, &m.weights, 64).unwrap(), 3);
    assert_eq!(tl, tf);
    assert!(max_diff(&ll, &lf) <= 1e-4);
    let (tp, lp) = greedy(&mut InterpreterBackend::new(prim, &m.weights, 64).unwrap(), 3);
    assert_eq!(tp, tf);
    let d = max_diff(&lp, &lf);
    assert!(d < 2e-2, "decomposed vs fused logits differ by {d}");
}

#[test]
fn compiled_decompose_then_lift_matches_a_plain_compile() {
    let m = smollm2();
    let opts = CompileOptions::default();
    let built =
        build_graph(m, &Build { passes: vec!["decompose".into(), "lift".into()], ..Build::new(opts.clone()) }).unwrap();
    assert!(built.graph == m.graph_with(GraphOptions { last_logits_only: true }).unwrap());
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let round_trip = Build { passes: vec!["decompose".into(), "lift".into()], ..Build::new(opts.clone()) };
    compile_build(m, "test", &round_trip, a.path()).unwrap();
    compile_build(m, "test", &Build::new(opts), b.path()).unwrap();
    let (ta, la) = greedy(&mut CompiledBackend::load(a.path(), 2, None).unwrap(), 4);
    let (tb, lb) = greedy(&mut CompiledBackend::load(b.path(), 2, None).unwrap(), 4);
    assert_eq!(ta, tb);
    assert!(max_diff(&la, &lb) <= 1e-4);
    // Without `lift`, codegen names the first primitive it cannot lower.
    let err = compile_build(m, "test", &Build { passes: vec!["decompose".into()], ..Default::default() }, a.path())
        .unwrap_err();
    assert!(format!("{err:#}").contains("unsupported") || format!("{err:#}").contains("no CPU lowering"), "{err:#}");
}

#[test]
fn lift_leaves_the_imported_graph_alone() {
    let m = smollm2();
    let fused = m.graph_with(GraphOptions { last_logits_only: true }).unwrap();
    let mut g = fused.clone();
    let cx = PassCx::default();
    assert!(!Lift::default().run(&mut g, &cx).unwrap());
    assert_eq!(g, fused);
}

/// Both tiny architectures (Llama: tied embeddings; Qwen2: attention biases), both logits layouts:
/// decompose then lift gives the frontend's graph back node for node.
#[test]
fn decompose_then_lift_is_the_identity_on_tiny_models() {
    use crate::common::{random_weights, tiny_config};
    use kiln::frontend::llama::build_graph as build_decoder;
    use kiln::frontend::Arch;
    for arch in [Arch::Llama, Arch::Qwen2, Arch::Qwen3] {
        let cfg = tiny_config(arch);
        let w = random_weights(&cfg, kiln::ir::DType::F32, 5);
        for last_logits_only in [false, true] {
            let g = build_decoder("tiny", &cfg, &w, GraphOptions { last_logits_only }).unwrap();
            let mut d = decompose(&g).unwrap();
            assert!(d.nodes.len() > 2 * g.nodes.len());
            assert!(Lift::default().run(&mut d, &PassCx::default()).unwrap());
            assert_eq!(print(&d), print(&g), "{arch:?}, last_logits_only {last_logits_only}");
        }
    }
}
