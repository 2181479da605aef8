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
use crate::shape::{Dim, TensorType};
use crate::DType;

/// Where an expansion puts its nodes.
pub trait Builder {
    type V: Copy;
    type Err;
    /// The type of a value already built.
    fn ty(&self, v: Self::V) -> TensorType;
    /// Adds `op` on `ins`. High-level ops used inside an expansion (`silu` in `swiglu`, `softmax` in
    /// `attention`) go through here too; a builder decides whether to expand them in turn.
    fn add(&mut self, op: Op, ins: &[Self::V]) -> Result<Self::V, Self::Err>;
}

/// Whether [`expand`] has an expansion for this op applied to operands of these types.
pub fn expandable(op: &Op, ins: &[&TensorType]) -> bool {
    match op {
        Op::RmsNorm { .. } | Op::Silu | Op::SwiGlu | Op::Softmax { .. } | Op::Attention { .. } => true,
        Op::Rope { n_rot, .. } => ins.first().is_some_and(|x| x.rank() == 4 && x.shape[3].as_fixed() == Some(*n_rot)),
        _ => false,
    }
}

/// Expands one high-level op on `ins` into `b`; `Ok(None)` when `op` has no expansion (see [`expandable`]).
pub fn expand<B: Builder>(b: &mut B, op: &Op, ins: &[B::V]) -> Result<Option<B::V>, B::Err> {
    let tys: Vec<TensorType> = ins.iter().map(|&v| b.ty(v)).collect();
    if !expandable(op, &tys.iter().collect::<Vec<_>>()) {
        return Ok(None);
    }
    let v = match op {
        Op::RmsNorm { eps } => {
            // x * rsqrt(mean(x², -1) + eps) * w
            let sq = b.add(Op::Mul, &[ins[0], ins[0]])?;
            let ms = b.add(Op::ReduceMean { axis: -1 }, &[sq])?;
            let e = b.add(Op::Constant { value: *eps }, &[])?;
            let ms = b.add(Op::Add, &[ms, e])?;
            let inv = b.add(Op::Rsqrt, &[ms])?;
            let y = b.add(Op::Mul, &[ins[0], inv])?;
            b.add(Op::Mul, &[y, ins[1]])?
        }
        Op::Silu => {
            let s = b.add(Op::Sigmoid, &[ins[0]])?;
            b.add(Op::Mul, &[ins[0], s])?
        }
        Op::SwiGlu => {
            let s = b.add(Op::Silu, &[ins[0]])?;
            b.add(Op::Mul, &[s, ins[1]])?
        }
        Op::Softmax { axis } => {
            let m = b.add(Op::ReduceMax { axis: *axis }, &[ins[0]])?;
            let d = b.add(Op::Sub, &[ins[0], m])?;
            let e = b.add(Op::Exp, &[d])?;
            let s = b.add(Op::ReduceSum { axis: *axis }, &[e])?;
            b.add(Op::Div, &[e, s])?
        }
        Op::Rope { mode, theta, n_rot } => rope(b, ins[0], ins[1], *mode, *theta, *n_rot, &tys[0].shape)?,
        Op::Attention { scale } => attention(b, ins, *scale, &tys[0].shape, &tys[1].shape)?,
        _ => return Ok(None),
    };
    Ok(Some(v))
}

/// Rotary embedding of `x[B, S, H, D]` (`n_rot = D`) at integer positions `pos[B, S]`:
/// angles = pos · θ^(−2i/D), pairs (x0, x1) → (x0·cos − x1·sin, x0·sin + x1·cos). The pairs are the two
/// halves (`neox`) or adjacent elements (`normal`); either way a reshape exposes them as an axis of 2.
fn rope<B: Builder>(
    b: &mut B,
    x: B::V,
    pos: B::V,
    mode: crate::RopeMode,
    theta: f32,
    n_rot: i64,
    xs: &[Dim],
) -> Result<B::V, B::Err> {
    let half = n_rot / 2;
    let (bd, sd, hd) = (xs[0].clone(), xs[1].clone(), xs[2].clone());
    let one = || Dim::fixed(1);
    let posf = b.add(Op::Cast { dtype: DType::F32 }, &[pos])?;
    let posr = b.add(Op::Reshape { shape: vec![bd.clone(), sd.clone(), one(), one(), one()] }, &[posf])?;
    let iota = b.add(Op::Iota { n: half }, &[])?;
    let k = b.add(Op::Constant { value: -2.0 / n_rot as f32 }, &[])?;
    let ex = b.add(Op::Mul, &[iota, k])?;
    let th = b.add(Op::Constant { value: theta }, &[])?;
    let mut freqs = b.add(Op::Pow, &[th, ex])?;
    let (axis, pairs) = match mode {
        crate::RopeMode::Neox => (3, vec![bd.clone(), sd.clone(), hd.clone(), Dim::fixed(2), Dim::fixed(half)]),
        crate::RopeMode::Normal => {
            freqs = b.add(Op::Reshape { shape: vec![Dim::fixed(half), one()] }, &[freqs])?;
            (4, vec![bd.clone(), sd.clone(), hd.clone(), Dim::fixed(half), Dim::fixed(2)])
        }
    };
    let ang = b.add(Op::Mul, &[posr, freqs])?;
    let (cos, sin) = (b.add(Op::Cos, &[ang])?, b.add(Op::Sin, &[ang])?);
    let xr = b.add(Op::Reshape { shape: pairs }, &[x])?;
    let x0 = b.add(Op::Slice { axis, start: Dim::fixed(0), end: Dim::fixed(1) }, &[xr])?;
    let x1 = b.add(Op::Slice { axis, start: Dim::fixed(1), end: Dim::fixed(2) }, &[xr])?;
    let (a, c) = (b.add(Op::Mul, &[x0, cos])?, b.add(Op::Mul, &[x1, sin])?);
    let o0 = b.add(Op::Sub, &[a, c])?;
    let (a, c) = (b.add(Op::Mul, &[x0, sin])?, b.add(Op::Mul, &[x1, cos])?);
    let o1 = b.add(Op::Add, &[a, c])?;
    let o = b.add(Op::Concat { axis }, &[o0, o1])?;
    b.add(Op::Reshape { shape: xs.to_vec() }, &[o])
}

/// Causal grouped-query attention. Query heads are split as (kv head, group) so each query head meets
/// its kv head by broadcasting (no copies of K/V): scores = Σ_d q·k over a `[B, Hkv, G, S, T, D]`
/// product, masked, softmaxed over T, then Σ_T p·v.
fn attention<B: Builder>(b: &mut B, ins: &[B::V], scale: f32, qs: &[Dim], ks: &[Dim]) -> Result<B::V, B::Err> {
    let (q, k, v) = (ins[0], ins[1], ins[2]);
    let (bd, s, hq, d) = (qs[0].clone(), qs[1].clone(), qs[2].clone(), qs[3].clone());
    let (t, hkv) = (ks[1].clone(), ks[2].clone());
    let g = Dim::fixed(hq.as_fixed().unwrap_or(1) / hkv.as_fixed().unwrap_or(1).max(1));
    let one = || Dim::fixed(1);
    let q5 = b.add(Op::Reshape { shape: vec![bd.clone(), s.clone(), hkv.clone(), g.clone(), d.clone()] }, &[q])?;
    let qt = b.add(Op::Transpose { perm: vec![0, 2, 3, 1, 4] }, &[q5])?;
    let q6 =
        b.add(Op::Reshape { shape: vec![bd.clone(), hkv.clone(), g.clone(), s.clone(), one(), d.clone()] }, &[qt])?;
    let kv6 = |b: &mut B, x: B::V| -> Result<B::V, B::Err> {
        let xt = b.add(Op::Transpose { perm: vec![0, 2, 1, 3] }, &[x])?;
        b.add(Op::Reshape { shape: vec![bd.clone(), hkv.clone(), one(), one(), t.clone(), d.clone()] }, &[xt])
    };
    let k6 = kv6(b, k)?;
    let prod = b.add(Op::Mul, &[q6, k6])?;
    let sc = b.add(Op::ReduceSum { axis: 5 }, &[prod])?;
    let sc = b.add(Op::Reshape { shape: vec![bd.clone(), hkv.clone(), g.clone(), s.clone(), t.clone()] }, &[sc])?;
    let c = b.add(Op::Constant { value: scale }, &[])?;
    let sc = b.add(Op::Mul, &[sc, c])?;
    let sc = b.add(Op::CausalMask, &[sc])?;
    let p = b.add(Op::Softmax { axis: -1 }, &[sc])?;
    let p6 =
        b.add(Op::Reshape { shape: vec![bd.clone(), hkv.clone(), g.clone(), s.clone(), t.clone(), one()] }, &[p])?;
    let v6 = kv6(b, v)?;
    let pv = b.add(Op::Mul, &[p6, v6])?;
    let o = b.add(Op::ReduceSum { axis: 4 }, &[pv])?;
    let o = b.add(Op::Reshape { shape: vec![bd.clone(), hkv.clone(), g.clone(), s.clone(), d.clone()] }, &[o])?;
    let o = b.add(Op::Transpose { perm: vec![0, 3, 1, 2, 4] }, &[o])?;
    b.add(Op::Reshape { shape: qs.to_vec() }, &[o])
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
