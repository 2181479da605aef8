//! Causal (grouped-query) attention, its sliding-window form, FlexPrefill's block-sparse attention, and `causal_mask`.

use super::*;
use crate::tensor::*;

/// The type rule of a attention op.
pub(super) fn infer(op: &Op, ins: &[&TensorType], declared: Option<&TensorType>) -> Result<TensorType, String> {
    let _ = declared;
    match op {
        Op::FlexAttention { scale, block, gamma, tau, min_len } => {
            crate::flex::FlexParams { block: *block, gamma: *gamma, tau: *tau, min_len: *min_len }.validate()?;
            Op::Attention { scale: *scale }.infer(ins, None)
        }
        Op::SlidingAttention { scale, window } => {
            if *window < 1 {
                return Err(format!("sliding_attention window {window} must be at least 1"));
            }
            Op::Attention { scale: *scale }.infer(ins, None)
        }
        Op::Attention { .. } => {
            let (q, k, v) = (ins[0], ins[1], ins[2]);
            for (t, what) in [(q, "q"), (k, "k"), (v, "v")] {
                want_float(t, what)?;
                want_rank(t, 4, what)?;
            }
            same_dim(&q.shape[0], &k.shape[0], "attention batch")?;
            same_dim(&k.shape[0], &v.shape[0], "attention batch")?;
            same_dim(&k.shape[1], &v.shape[1], "attention kv length")?;
            same_dim(&k.shape[2], &v.shape[2], "attention kv heads")?;
            same_dim(&q.shape[3], &k.shape[3], "attention head dim")?;
            same_dim(&k.shape[3], &v.shape[3], "attention head dim")?;
            if let (Some(hq), Some(hkv)) = (q.shape[2].as_fixed(), k.shape[2].as_fixed()) {
                if hkv == 0 || hq % hkv != 0 {
                    return Err(format!("attention: {hkv} kv heads do not divide {hq} query heads"));
                }
            }
            Ok(q.clone())
        }
        Op::CausalMask => {
            let x = ins[0];
            want_float(x, "causal_mask operand")?;
            if x.rank() < 2 {
                return Err(format!("causal_mask needs rank ≥ 2, found {x}"));
            }
            Ok(x.clone())
        }
        other => Err(not_in_family(other, "attention")),
    }
}

/// The interpreter rule of a attention op.
pub(super) fn eval(op: &Op, args: &[&Tensor], env: &SymEnv) -> Result<Tensor, String> {
    let _ = env;
    match op {
        Op::CausalMask => {
            let t = args[0];
            let x = f(t)?;
            let r = t.shape.len();
            let (s, tl) = (t.shape[r - 2], t.shape[r - 1]);
            if tl < s {
                return Err(format!("causal_mask: {tl} columns are fewer than the {s} rows"));
            }
            let mut out = x.to_vec();
            for (k, v) in out.iter_mut().enumerate() {
                let (i, j) = ((k / tl) % s.max(1), k % tl);
                if j > tl - s + i {
                    *v = f32::NEG_INFINITY;
                }
            }
            Ok(Tensor::f32(t.shape.clone(), out))
        }
        Op::Attention { scale } => dense_attention(args, *scale, None),
        Op::SlidingAttention { scale, window } => dense_attention(args, *scale, Some(*window as usize)),
        Op::FlexAttention { scale, block, gamma, tau, min_len } => {
            let p = crate::flex::FlexParams { block: *block, gamma: *gamma, tau: *tau, min_len: *min_len };
            p.validate()?;
            let [b, s, hq, d] = args[0].shape[..] else {
                return Err("flex_attention needs rank 4".into());
            };
            let [_, t, hkv, _] = args[1].shape[..] else {
                return Err("flex_attention needs rank 4".into());
            };
            if (s as i64) < *min_len {
                // Exactly the dense op.
                return (Op::Attention { scale: *scale }).eval(args, env);
            }
            if t < s {
                return Err(format!("kv length {t} is shorter than the query length {s}"));
            }
            let out =
                crate::flex::flex_attention(f(args[0])?, f(args[1])?, f(args[2])?, (b, s, hq, d), (t, hkv), *scale, &p);
            Ok(Tensor::f32(args[0].shape.clone(), out))
        }
        other => Err(not_in_family(other, "attention")),
    }
}

/// Causal attention of `q`, `k`, `v`; with `window`, query i sees only the last `window` keys up to
/// its own position.
fn dense_attention(args: &[&Tensor], scale: f32, window: Option<usize>) -> Result<Tensor, String> {
    let (q, k, v) = (f(args[0])?, f(args[1])?, f(args[2])?);
    let [b, s, hq, d] = args[0].shape[..] else {
        return Err("attention needs rank 4".into());
    };
    let [_, t, hkv, _] = args[1].shape[..] else {
        return Err("attention needs rank 4".into());
    };
    if t < s {
        return Err(format!("kv length {t} is shorter than the query length {s}"));
    }
    let group = hq / hkv;
    let mut out = vec![0f32; q.len()];
    let mut scores = vec![0f64; t];
    for bi in 0..b {
        for h in 0..hq {
            let kh = h / group;
            for i in 0..s {
                // Query i sits at absolute position t - s + i and sees keys 0..=that (the last
                // `window` of them with a window).
                let visible = t - s + i + 1;
                let first = window.map_or(0, |w| visible.saturating_sub(w));
                let qrow = &q[((bi * s + i) * hq + h) * d..][..d];
                for (j, sc) in scores.iter_mut().enumerate().take(visible).skip(first) {
                    let krow = &k[((bi * t + j) * hkv + kh) * d..][..d];
                    *sc = dot(qrow, krow) * scale as f64;
                }
                softmax_in_place(&mut scores[first..visible]);
                let orow = &mut out[((bi * s + i) * hq + h) * d..][..d];
                for (c, o) in orow.iter_mut().enumerate() {
                    let mut acc = 0f64;
                    for (j, p) in scores.iter().enumerate().take(visible).skip(first) {
                        acc += p * v[((bi * t + j) * hkv + kh) * d + c] as f64;
                    }
                    *o = acc as f32;
                }
            }
        }
    }
    Ok(Tensor::f32(args[0].shape.clone(), out))
}

/// Whether [`expand`] has a primitive form for `op` on these operands.
pub(super) fn expandable(op: &Op, ins: &[&TensorType]) -> bool {
    let _ = ins;
    matches!(op, Op::Attention { .. })
}

/// The decomposition of a attention op into primitives (see `crate::decompose`).
pub(super) fn expand<B: Builder>(b: &mut B, op: &Op, ins: &[B::V], tys: &[TensorType]) -> Result<Option<B::V>, B::Err> {
    let _ = tys;
    Ok(Some(match op {
        Op::Attention { scale } => attention(b, ins, *scale, &tys[0].shape, &tys[1].shape)?,
        _ => return Ok(None),
    }))
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
