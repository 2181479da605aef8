//! The IR text form round-trips for every model Kiln builds: print, parse, print is identical, and the
//! parsed graph computes the same thing.

use crate::common::{logits, random_weights, smollm2, tiny_config};
use kiln::frontend::export::write_hf;
use kiln::frontend::{Arch, Model};
use kiln::ir::text::{parse, print};
use kiln::ir::DType;
use kiln::runtime::{Backend, InterpreterBackend};

fn round_trip(g: &kiln::ir::Graph) {
    let text = print(g);
    let parsed = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(print(&parsed), text);
    assert_eq!(&parsed, g);
}

#[test]
fn smollm2_graph_round_trips() {
    let g = smollm2().graph().unwrap();
    round_trip(&g);
    // Structure sanity: 30 layers → 30 attention nodes, 60 caches out, logits first.
    let text = print(&g);
    assert_eq!(text.matches("= attention(").count(), 30);
    assert_eq!(g.outputs.len(), 61);
    assert!(text.contains(": f32[batch, past+seq, 3, 64]"));
}

#[test]
fn tiny_models_round_trip_and_parsed_graph_runs_identically() {
    for arch in [Arch::Llama, Arch::Qwen2, Arch::Qwen3] {
        let cfg = tiny_config(arch);
        let dir = tempfile::tempdir().unwrap();
        write_hf(dir.path(), &cfg, &random_weights(&cfg, DType::F32, 5), 1).unwrap();
        let m = Model::load(dir.path()).unwrap();
        let g = m.graph().unwrap();
        round_trip(&g);
        let reparsed = parse(&print(&g)).unwrap();
        let a = logits(&m, &[3, 1, 4, 1, 5]);
        let b = InterpreterBackend::new(reparsed, &m.weights, 64).unwrap().forward(&[3, 1, 4, 1, 5]).unwrap();
        assert_eq!(a.data, b.data);
    }
}

#[test]
fn cli_emit_ir_prints_the_parseable_graph() {
    let (code, out, err) = crate::common::run_kiln(&["run", "--emit", "ir"], None);
    assert_eq!(code, 0, "{err}");
    let g = parse(&out).unwrap();
    assert_eq!(print(&g), out);
    let (code, dot, _) = crate::common::run_kiln(&["run", "--emit", "dot"], None);
    assert_eq!(code, 0);
    assert!(dot.starts_with("digraph") && dot.contains("-> n") && dot.trim_end().ends_with('}'));
}
