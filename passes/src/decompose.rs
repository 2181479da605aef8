//! `decompose`: expands the high-level ops into primitives (`kiln_ir::decompose`). Codegen has no CPU
//! lowering for some primitives it produces (reductions, `sin`/`cos`/`pow`/`iota`/`causal_mask`), so a
//! compile needs `lift` after it: `--passes decompose,lift` round-trips a model through its primitive
//! form (what a frontend without fused ops would produce).

use crate::{Pass, PassCx, PassError};
use kiln_ir::Graph;

pub struct Decompose;

impl Pass for Decompose {
    fn name(&self) -> &'static str {
        "decompose"
    }

    fn run(&self, g: &mut Graph, _cx: &PassCx) -> Result<bool, PassError> {
        let d = kiln_ir::decompose::decompose(g)
            .map_err(|e| PassError::Failed { pass: "decompose", msg: e.to_string() })?;
        let changed = d != *g;
        *g = d;
        Ok(changed)
    }
}
