//! Decompositions of high-level ops into primitives, for backends without a fused kernel and as an
//! independent check of the fused ops' interpreter arms.
//!
//! Covered: `rms_norm`, `swiglu`, `silu`, `softmax`, `rope` (both modes, when it rotates the whole head,
//! `n_rot = head_dim`) and `attention` (causal, grouped-query). The expansions are written once against
//! the [`Builder`] trait: [`decompose`] drives it with a graph, and the e-graph `lift` pass replays the
//! same expansion in look-up mode to check that a candidate really is the decomposition of the fused op
//! it wants to put back — so what `decompose` emits and what `lift` recognises cannot drift apart.

use crate::graph::{Graph, GraphError, ValueId};
use crate::op::Op;
use crate::shape::TensorType;

pub use crate::op::Builder;

/// Whether [`expand`] has an expansion for this op applied to operands of these types (its family's
/// rule: `crate::op::<family>::expandable`).
pub fn expandable(op: &Op, ins: &[&TensorType]) -> bool {
    op.expandable(ins)
}

/// Expands one high-level op on `ins` into `b`; `Ok(None)` when `op` has no expansion (see [`expandable`]).
/// The expansions live with their ops' other rules (`crate::op::<family>::expand`).
pub fn expand<B: Builder>(b: &mut B, op: &Op, ins: &[B::V]) -> Result<Option<B::V>, B::Err> {
    let tys: Vec<TensorType> = ins.iter().map(|&v| b.ty(v)).collect();
    if !expandable(op, &tys.iter().collect::<Vec<_>>()) {
        return Ok(None);
    }
    op.expand(b, ins, &tys)
}

/// Builds into a graph, expanding every high-level op it is given (recursively).
struct GraphBuilder<'g>(&'g mut Graph);

impl Builder for GraphBuilder<'_> {
    type V = ValueId;
    type Err = GraphError;
    fn ty(&self, v: ValueId) -> TensorType {
        self.0.ty(v).clone()
    }
    fn add(&mut self, op: Op, ins: &[ValueId]) -> Result<ValueId, GraphError> {
        match expand(self, &op, ins)? {
            Some(v) => Ok(v),
            None => self.0.add(op, ins),
        }
    }
}

/// Returns a graph computing the same outputs with the covered high-level ops expanded.
pub fn decompose(g: &Graph) -> Result<Graph, GraphError> {
    let mut out = Graph::new(g.name.clone());
    let mut map: Vec<ValueId> = Vec::with_capacity(g.nodes.len());
    for n in &g.nodes {
        let ins: Vec<ValueId> = n.inputs.iter().map(|v| map[v.index()]).collect();
        let v = match expand(&mut GraphBuilder(&mut out), &n.op, &ins)? {
            Some(v) => v,
            None => out.push(n.op.clone(), &ins, Some(n.ty.clone()))?,
        };
        map.push(v);
    }
    out.outputs = g.outputs.iter().map(|(name, v)| (name.clone(), map[v.index()])).collect();
    Ok(out)
}
