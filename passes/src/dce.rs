//! `dce`: removes nodes no output depends on.

use crate::{rebuild, Pass, PassCx, PassError};
use kiln_ir::Graph;

pub struct DeadCodeElimination;

impl Pass for DeadCodeElimination {
    fn name(&self) -> &'static str {
        "dce"
    }

    fn run(&self, g: &mut Graph, _cx: &PassCx) -> Result<bool, PassError> {
        let mut live = vec![false; g.nodes.len()];
        for (_, v) in &g.outputs {
            live[v.index()] = true;
        }
        // Operands point backwards, so one reverse sweep finds everything live.
        for i in (0..g.nodes.len()).rev() {
            if live[i] {
                for v in &g.nodes[i].inputs {
                    live[v.index()] = true;
                }
            }
        }
        // Graph inputs are the interface: keep them even when unused.
        for (i, n) in g.nodes.iter().enumerate() {
            if matches!(n.op, kiln_ir::Op::Input { .. }) {
                live[i] = true;
            }
        }
        if live.iter().all(|&l| l) {
            return Ok(false);
        }
        let identity: Vec<usize> = (0..g.nodes.len()).collect();
        *g = rebuild(g, &live, &identity);
        Ok(true)
    }
}
