//! `fuse-allreduce-rmsnorm`: TokenWeave's rewrite of a tensor-parallel decoder's
//! `all_reduce → residual add → rms_norm` into `reduce_scatter → add + rms_norm on this rank's token
//! slice → all_gather`.
//!
//! After a row-parallel projection every rank holds a partial sum `p` of `[batch, seq, D]`. Unfused,
//! each rank all-reduces it, adds the residual and normalises all `seq` tokens — the same work on every
//! rank. Fused, each rank receives only the sum of its own tokens (`reduce_scatter`, half an
//! all-reduce's traffic), adds its slice of the residual and normalises those tokens, and the ranks
//! exchange the normalised slices (`all_gather`, the other half). The residual stream itself stays
//! token-sharded: the next fused point adds to the sharded value directly, and it is gathered only where
//! something needs it whole (the last-position slice before the LM head, an exposed output).
//!
//! Decision per `h = add(r, all_reduce(p))` (the all-reduce read only there, token axis a symbol):
//! the fused form costs one reduce-scatter plus one all-gather per thing needed whole — the output of
//! each `rms_norm` reading `h`, and `h` itself if anything else reads it (residual adds that are fused
//! too take the sharded `h`). An all-reduce costs one reduce-scatter plus one all-gather, so the fused
//! form wins or ties (with 1/tp of the add and norm work) when at most one gather is needed, and is kept
//! then; it loses with two or more, and the point stays unfused — unless `r` exists only token-sharded
//! (the previous point was fused), where unfusing would need a gather of `r` anyway.
//!
//! Steps too short to give every rank a token run the same graph replicated: the runtime binds
//! `seq_shard = seq` and the collectives degenerate to the unfused all-reduce (`kiln_ir::collective`).

use crate::{Pass, PassCx, PassError};
use kiln_ir::{Graph, GraphError, Op, ValueId};

/// The token axis of `[batch, seq, …]` residual values.
const TOKEN_AXIS: i64 = 1;

#[derive(Clone, Copy, Debug, Default)]
pub struct FuseAllReduceRmsNorm;

/// Whether `v` is `add(r, all_reduce(p))` fit for the rewrite: returns (r, p, whether r is operand 0).
fn candidate(g: &Graph, readers: &[Vec<usize>], v: usize) -> Option<(usize, usize, bool)> {
    let n = &g.nodes[v];
    if n.op != Op::Add || n.ty.rank() < 2 {
        return None;
    }
    let tok = n.ty.shape[TOKEN_AXIS as usize].as_sym()?;
    if tok.ends_with(kiln_ir::collective::SHARD_SUFFIX) {
        return None;
    }
    let (a, b) = (n.inputs[0].index(), n.inputs[1].index());
    let is_ar = |x: usize| g.nodes[x].op == Op::AllReduce && readers[x].len() == 1 && g.nodes[x].ty == n.ty;
    let (r, ar, r_first) = if is_ar(b) {
        (a, b, true)
    } else if is_ar(a) {
        (b, a, false)
    } else {
        return None;
    };
    if g.nodes[r].ty != n.ty {
        return None;
    }
    Some((r, g.nodes[ar].inputs[0].index(), r_first))
}

impl Pass for FuseAllReduceRmsNorm {
    fn name(&self) -> &'static str {
        "fuse-allreduce-rmsnorm"
    }

    fn run(&self, g: &mut Graph, cx: &PassCx) -> Result<bool, PassError> {
        let fail = |e: GraphError| PassError::Failed { pass: "fuse-allreduce-rmsnorm", msg: e.to_string() };
        let n = g.nodes.len();
        let mut readers: Vec<Vec<usize>> = vec![Vec::new(); n];
        for (j, node) in g.nodes.iter().enumerate() {
            for v in &node.inputs {
                readers[v.index()].push(j);
            }
        }
        let is_output = |i: usize| g.outputs.iter().any(|(_, v)| v.index() == i);
        let cands: Vec<Option<(usize, usize, bool)>> = (0..n).map(|v| candidate(g, &readers, v)).collect();
        // Decide in order: a point whose residual is sharded is always fused.
        let mut fused = vec![false; n];
        for v in 0..n {
            let Some((r, _, _)) = cands[v] else { continue };
            let norms = readers[v]
                .iter()
                .filter(|&&j| matches!(g.nodes[j].op, Op::RmsNorm { .. }) && g.nodes[j].inputs[0].index() == v)
                .count();
            let other = is_output(v)
                || readers[v].iter().any(|&j| {
                    let norm = matches!(g.nodes[j].op, Op::RmsNorm { .. }) && g.nodes[j].inputs[0].index() == v;
                    let next = cands[j].is_some_and(|(rr, _, _)| rr == v);
                    !norm && !next
                });
            let gathers = norms + usize::from(other);
            if fused[r] || gathers <= 1 {
                fused[v] = true;
                cx.explain(
                    self.name(),
                    format!(
                        "%{v}: fused ({norms} norm(s) gathered{}{})",
                        if other { ", residual gathered" } else { "" },
                        if fused[r] { ", residual already sharded" } else { "" }
                    ),
                );
            } else {
                cx.explain(
                    self.name(),
                    format!("%{v}: kept unfused — {gathers} gathers would cost more than one all-reduce"),
                );
            }
        }
        if !fused.iter().any(|&f| f) {
            return Ok(false);
        }

        let mut out = Graph::new(g.name.clone());
        let mut full: Vec<Option<ValueId>> = vec![None; n];
        let mut sharded: Vec<Option<ValueId>> = vec![None; n];
        // The whole (unsharded) form of old value `v`, gathering it if it exists only sharded.
        fn whole(
            out: &mut Graph,
            full: &mut [Option<ValueId>],
            sharded: &[Option<ValueId>],
            v: usize,
        ) -> Result<ValueId, GraphError> {
            if let Some(x) = full[v] {
                return Ok(x);
            }
            let s = sharded[v].expect("every value has a form");
            let x = out.add(Op::AllGather { axis: TOKEN_AXIS }, &[s])?;
            full[v] = Some(x);
            Ok(x)
        }
        for (i, node) in g.nodes.iter().enumerate() {
            if let Some((r, p, r_first)) = cands[i].filter(|_| fused[i]) {
                let p = whole(&mut out, &mut full, &sharded, p).map_err(fail)?;
                let rs = out.add(Op::ReduceScatter { axis: TOKEN_AXIS }, &[p]).map_err(fail)?;
                let r_s = match sharded[r] {
                    Some(s) => s,
                    None => {
                        let rf = whole(&mut out, &mut full, &sharded, r).map_err(fail)?;
                        let s = out.add(Op::Shard { axis: TOKEN_AXIS }, &[rf]).map_err(fail)?;
                        sharded[r] = Some(s);
                        s
                    }
                };
                let ops = if r_first { [r_s, rs] } else { [rs, r_s] };
                sharded[i] = Some(out.add(Op::Add, &ops).map_err(fail)?);
                continue;
            }
            if let Op::AllReduce = node.op {
                // Read only by a fused add: dropped (the add reduce-scatters its operand instead).
                if readers[i].len() == 1 && cands[readers[i][0]].is_some() && fused[readers[i][0]] {
                    continue;
                }
            }
            let sharded_in = |k: usize| node.inputs.get(k).and_then(|v| sharded[v.index()]);
            if let (Op::RmsNorm { .. }, Some(hs)) = (&node.op, sharded_in(0)) {
                let w = whole(&mut out, &mut full, &sharded, node.inputs[1].index()).map_err(fail)?;
                let ns = out.add(node.op.clone(), &[hs, w]).map_err(fail)?;
                full[i] = Some(out.add(Op::AllGather { axis: TOKEN_AXIS }, &[ns]).map_err(fail)?);
                continue;
            }
            let ins: Vec<ValueId> = node
                .inputs
                .iter()
                .map(|v| whole(&mut out, &mut full, &sharded, v.index()))
                .collect::<Result<_, _>>()
                .map_err(fail)?;
            let declared = matches!(node.op, Op::Input { .. } | Op::Weight { .. }).then(|| node.ty.clone());
            full[i] = Some(out.push(node.op.clone(), &ins, declared).map_err(fail)?);
        }
        for (name, v) in &g.outputs {
            let x = whole(&mut out, &mut full, &sharded, v.index()).map_err(fail)?;
            out.output(name, x);
        }
        *g = out;
        Ok(true)
    }
}
