//! Decompositions of high-level ops into primitives, for backends without a fused kernel and as an
//! independent check of the fused ops' interpreter arms.
//!
//! Covered: `rms_norm`, `swiglu`, `silu`, `softmax`. `rope` and `attention` keep their fused form
//! (their decompositions need position tables and masks that the primitive set does not have yet).

use crate::graph::{Graph, GraphError, ValueId};
use crate::op::Op;

/// Returns a graph computing the same outputs with the covered high-level ops expanded.
pub fn decompose(g: &Graph) -> Result<Graph, GraphError> {
    let mut out = Graph::new(g.name.clone());
    let mut map: Vec<ValueId> = Vec::with_capacity(g.nodes.len());
    for n in &g.nodes {
        let ins: Vec<ValueId> = n.inputs.iter().map(|v| map[v.index()]).collect();
        let v = match &n.op {
            Op::RmsNorm { eps } => {
                // x * rsqrt(mean(x², -1) + eps) * w
                let sq = out.add(Op::Mul, &[ins[0], ins[0]])?;
                let ms = out.add(Op::ReduceMean { axis: -1 }, &[sq])?;
                let e = out.add(Op::Constant { value: *eps }, &[])?;
                let ms = out.add(Op::Add, &[ms, e])?;
                let inv = out.add(Op::Rsqrt, &[ms])?;
                let y = out.add(Op::Mul, &[ins[0], inv])?;
                out.add(Op::Mul, &[y, ins[1]])?
            }
            Op::Silu => silu(&mut out, ins[0])?,
            Op::SwiGlu => {
                let s = silu(&mut out, ins[0])?;
                out.add(Op::Mul, &[s, ins[1]])?
            }
            Op::Softmax { axis } => {
                let m = out.add(Op::ReduceMax { axis: *axis }, &[ins[0]])?;
                let d = out.add(Op::Sub, &[ins[0], m])?;
                let e = out.add(Op::Exp, &[d])?;
                let s = out.add(Op::ReduceSum { axis: *axis }, &[e])?;
                out.add(Op::Div, &[e, s])?
            }
            op => out.push(op.clone(), &ins, Some(n.ty.clone()))?,
        };
        map.push(v);
    }
    out.outputs = g.outputs.iter().map(|(name, v)| (name.clone(), map[v.index()])).collect();
    Ok(out)
}

fn silu(g: &mut Graph, x: ValueId) -> Result<ValueId, GraphError> {
    let s = g.add(Op::Sigmoid, &[x])?;
    g.add(Op::Mul, &[x, s])
}
