//! The cost model of e-graph extraction: bytes moved + flops + a fixed cost per kernel launch, each
//! with a per-target coefficient in nanoseconds.
//!
//! Bytes are what a kernel reads (every operand, weights in their stored dtype, so a Q4_1 matrix costs
//! 0.625 bytes per element) plus what it writes; flops are counted per op below. Symbolic dimensions are
//! evaluated at a representative step (`batch = 1`, `seq = 1`, `past = 255`: decode, where most of a
//! generation's time goes); unknown symbols count as 1. The coefficients come from measurements on the
//! machine (`kiln::costs`, cached in the Kiln cache directory) when the CLI runs the pipeline, else
//! from [`CostCoefficients::default`].

use super::{KGraph, KNode};
use egg::{Id, Language};
use kiln_ir::shape::SymEnv;
use kiln_ir::{Graph, Op, TensorType};
use num_bigint::BigUint;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Nanoseconds per byte moved, per flop and per kernel launch on one target.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CostCoefficients {
    /// Which target (and how) these were measured for, e.g. `x86_64-cpu measured`.
    pub target: String,
    pub ns_per_byte: f64,
    pub ns_per_flop: f64,
    pub ns_per_launch: f64,
}

impl Default for CostCoefficients {
    /// Round numbers for a desktop CPU core (≈10 GB/s, ≈20 GFLOP/s, ≈1 µs per launch); used when no
    /// measurement was passed in (unit tests, library users).
    fn default() -> Self {
        CostCoefficients { target: "default".into(), ns_per_byte: 0.1, ns_per_flop: 0.05, ns_per_launch: 1000.0 }
    }
}

#[derive(Clone, Debug)]
pub struct CostModel {
    pub coef: CostCoefficients,
    pub env: SymEnv,
}

impl CostModel {
    pub fn new(coef: CostCoefficients) -> CostModel {
        let env = [("batch", 1), ("seq", 1), ("past", 255)].into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        CostModel { coef, env }
    }

    fn numel(&self, t: &TensorType) -> f64 {
        t.shape
            .iter()
            .map(|d| {
                let mut env = self.env.clone();
                for s in d.symbols() {
                    env.entry(s.to_string()).or_insert(1);
                }
                d.eval(&env).unwrap_or(1).max(0) as f64
            })
            .product()
    }

    fn bytes(&self, t: &TensorType) -> f64 {
        self.numel(t) * t.dtype.type_size() as f64 / t.dtype.block_size() as f64
    }

    /// Estimated nanoseconds of one op producing `out` from operands of types `ins`.
    pub fn op_cost(&self, op: &Op, out: &TensorType, ins: &[&TensorType]) -> f64 {
        let n = self.numel(out);
        let flops_per_elem = match op {
            // A unary elementwise op's work per element is in the op table.
            _ if op.unary().is_some() => op.unary().map_or(0.0, |r| r.flops),
            // Sources cost nothing themselves (their bytes are charged to whoever reads them), and a
            // reshape is a view.
            Op::Input { .. } | Op::Weight { .. } | Op::Constant { .. } | Op::Reshape { .. } => return 0.0,
            // Pruned linears hold their matrix in two layouts; the kernel of the representative (decode)
            // step reads one (`Op::phase_weights`), so only its bytes are charged, with the dense
            // product's flops (an upper bound: the lift rules never choose between them; the prune pass
            // selects kernels from measured ratios).
            Op::SparseLinear { .. } | Op::NmLinear { .. } | Op::BitmapLinear { .. } => {
                let read: Vec<&TensorType> =
                    std::iter::once(ins[0]).chain(ins[op.phase_weights(true)].iter().copied()).collect();
                let k = ins[0].shape.last().map(|d| self.numel(&TensorType::new(out.dtype, vec![d.clone()])));
                return self.launch_and_moves(out, &read) + self.coef.ns_per_flop * 2.0 * k.unwrap_or(1.0) * n;
            }
            // Sparse variants are costed as the dense product (an upper bound: the lift rules never
            // choose between them).
            Op::Linear | Op::MatMul | Op::MaskedLinear | Op::CoreLinear { .. } | Op::ActiveLinear => {
                let k = ins[0].shape.last().map(|d| self.numel(&TensorType::new(out.dtype, vec![d.clone()])));
                2.0 * k.unwrap_or(1.0)
            }
            // FlexPrefill is costed as dense attention (an upper bound; no rule chooses between them).
            Op::Attention { .. } | Op::SlidingAttention { .. } | Op::FlexAttention { .. } => {
                4.0 * self.numel(&TensorType::new(out.dtype, vec![ins[1].shape[1].clone()]))
            }
            Op::Add | Op::Sub | Op::Mul | Op::Div | Op::CausalMask | Op::Iota { .. } | Op::Threshold => 1.0,
            Op::Pow => 10.0,
            Op::SwiGlu => 12.0,
            Op::ReduceSum { .. } | Op::ReduceMax { .. } | Op::ReduceMean { .. } => {
                return self.launch_and_moves(out, ins) + self.coef.ns_per_flop * self.numel(ins[0]);
            }
            // CoreInfer: a copy of the core set per row; the selection's per-token bisection (prefill only).
            Op::CoreKeep { .. } => 1.0,
            Op::CoreSelect { .. } => 32.0,
            Op::Softmax { .. } => 14.0,
            Op::RmsNorm { .. } => 4.0,
            Op::Rope { .. } | Op::RopeScaled { .. } => 24.0,
            Op::Embedding | Op::Transpose { .. } | Op::Concat { .. } | Op::Slice { .. } | Op::Cast { .. } => 0.0,
            // Collectives: their bytes (charged by launch_and_moves) stand for the traffic; the e-graph
            // never chooses between them (the shard and fuse passes place them).
            Op::AllReduce | Op::ReduceScatter { .. } | Op::Shard { .. } | Op::AllGather { .. } => 1.0,
            // The unary ops are costed by their table rule above; any op added without an arm here is
            // charged one flop per element (its bytes and launch are still counted).
            _ => 1.0,
        };
        self.launch_and_moves(out, ins) + self.coef.ns_per_flop * flops_per_elem * n
    }

    fn launch_and_moves(&self, out: &TensorType, ins: &[&TensorType]) -> f64 {
        let moved: f64 = ins.iter().map(|t| self.bytes(t)).sum::<f64>() + self.bytes(out);
        self.coef.ns_per_launch + self.coef.ns_per_byte * moved
    }

    /// The cost of a whole graph: every node once (values are computed once however often they are read).
    pub fn graph_cost(&self, g: &Graph) -> f64 {
        g.nodes
            .iter()
            .map(|n| {
                let ins: Vec<&TensorType> = n.inputs.iter().map(|&v| g.ty(v)).collect();
                self.op_cost(&n.op, &n.ty, &ins)
            })
            .sum()
    }
}

/// The cheapest e-node of every e-class by tree cost: the node's own cost plus its children's (shared
/// values count once per reader, which only matters for ranking alternatives of one e-class — the
/// reported cost of the result is [`CostModel::graph_cost`], which counts each value once).
///
/// Written here rather than with `egg::Extractor` for two reasons. The sums are exact integers
/// (nanoseconds, each node at least 1): a tree cost over a 30-layer residual stream counts the bottom
/// layers ~10⁴⁰ times, and in f64 the few-µs difference between two alternatives of one e-class is
/// rounded away (it was: extraction then picked at random). And the classes are visited in `order`
/// (the original graph order), so the fixpoint takes two or three sweeps; each node's own cost is
/// computed once, from its class's type.
pub fn best_nodes(eg: &KGraph, model: &CostModel, order: &HashMap<Id, usize>) -> HashMap<Id, KNode> {
    let mut classes: Vec<Id> = eg.classes().map(|c| c.id).collect();
    classes.sort_by_key(|&c| (order.get(&c).copied().unwrap_or(usize::MAX), c));
    let own: HashMap<Id, Vec<BigUint>> = classes
        .iter()
        .map(|&c| {
            let costs = eg[c]
                .nodes
                .iter()
                .map(|n| {
                    let ins: Vec<&TensorType> = n.children().iter().map(|&k| &eg[k].data.ty).collect();
                    BigUint::from(model.op_cost(n.op(), &eg[c].data.ty, &ins).round().max(1.0) as u64)
                })
                .collect();
            (c, costs)
        })
        .collect();
    let mut best: HashMap<Id, (BigUint, usize)> = HashMap::new();
    loop {
        let mut changed = false;
        for &c in &classes {
            for (i, n) in eg[c].nodes.iter().enumerate() {
                let mut total = own[&c][i].clone();
                let mut ok = true;
                for &k in n.children() {
                    match best.get(&eg.find(k)) {
                        Some((kc, _)) => total += kc,
                        None => {
                            ok = false;
                            break;
                        }
                    }
                }
                if ok && best.get(&c).is_none_or(|(b, _)| total < *b) {
                    best.insert(c, (total, i));
                    changed = true;
                }
            }
        }
        if !changed {
            break;
        }
    }
    best.into_iter().map(|(c, (_, i))| (c, eg[c].nodes[i].clone())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::{DType, Dim};

    /// A pruned linear holding two layouts is charged the bytes of the one its decode kernel reads: the
    /// compact form as the compact-only op, the dense layout as a plain linear on it.
    #[test]
    fn two_layout_linears_cost_the_layout_decode_reads() {
        let model = CostModel::new(CostCoefficients::default());
        let x = TensorType::new(DType::F32, vec![Dim::from(1usize), Dim::from(64usize)]);
        let packed = TensorType::new(DType::I32, vec![Dim::from(32usize), Dim::from(17usize)]);
        let dense = TensorType::new(DType::F32, vec![Dim::from(32usize), Dim::from(64usize)]);
        let y = TensorType::new(DType::F32, vec![Dim::from(1usize), Dim::from(32usize)]);
        let nm = |decode, prefill| Op::NmLinear { dtype: DType::F32, keep: 2, group: 4, decode, prefill };
        let compact_only = model.op_cost(&nm(1, 1), &y, &[&x, &packed]);
        let linear = model.op_cost(&Op::Linear, &y, &[&x, &dense]);
        assert!(compact_only < linear, "the compact form is smaller");
        assert_eq!(model.op_cost(&nm(1, 0), &y, &[&x, &packed, &dense]), compact_only);
        assert_eq!(model.op_cost(&nm(0, 1), &y, &[&x, &packed, &dense]), linear);
    }
}
