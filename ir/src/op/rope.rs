//! Rotary position embedding.

use super::*;
use crate::tensor::*;

/// The type rule of a rope op.
pub(super) fn infer(op: &Op, ins: &[&TensorType], declared: Option<&TensorType>) -> Result<TensorType, String> {
    let _ = declared;
    match op {
        Op::Rope { n_rot, .. } | Op::RopeScaled { n_rot, .. } => {
            let (x, pos) = (ins[0], ins[1]);
            if let Some(fac) = ins.get(2) {
                want_float(fac, "rope factors")?;
                want_rank(fac, 1, "rope factors")?;
                same_dim(&fac.shape[0], &Dim::fixed(n_rot / 2), "rope factors (n_rot/2)")?;
            }
            want_float(x, "rope input")?;
            want_rank(x, 4, "rope input")?;
            want_rank(pos, 2, "rope positions")?;
            if !pos.dtype.is_int() {
                return Err(format!("rope positions must be integers, found {}", pos.dtype));
            }
            same_dim(&x.shape[0], &pos.shape[0], "rope batch")?;
            same_dim(&x.shape[1], &pos.shape[1], "rope sequence")?;
            if let Some(hd) = x.shape[3].as_fixed() {
                if *n_rot <= 0 || *n_rot > hd || n_rot % 2 != 0 {
                    return Err(format!("rope n_rot {n_rot} must be even and in 1..={hd}"));
                }
            }
            Ok(x.clone())
        }
        other => Err(not_in_family(other, "rope")),
    }
}

/// The interpreter rule of a rope op.
pub(super) fn eval(op: &Op, args: &[&Tensor], env: &SymEnv) -> Result<Tensor, String> {
    let _ = env;
    match op {
        Op::Rope { mode, theta, n_rot } | Op::RopeScaled { mode, theta, n_rot } => {
            let (x, pos) = (f(args[0])?, ints(args[1])?);
            let factors = args.get(2).map(|t| f(t)).transpose()?;
            let [b, s, h, d] = args[0].shape[..] else {
                return Err("rope needs rank 4".into());
            };
            let n_rot = *n_rot as usize;
            let half = n_rot / 2;
            let mut out = x.to_vec();
            for bi in 0..b {
                for si in 0..s {
                    let p = pos[bi * s + si] as f64;
                    for hi in 0..h {
                        let base = ((bi * s + si) * h + hi) * d;
                        for i in 0..half {
                            let mut freq = (*theta as f64).powf(-2.0 * i as f64 / n_rot as f64);
                            if let Some(fac) = factors {
                                freq /= fac[i] as f64;
                            }
                            let angle = p * freq;
                            let (sin, cos) = angle.sin_cos();
                            let (i0, i1) = match mode {
                                RopeMode::Normal => (2 * i, 2 * i + 1),
                                RopeMode::Neox => (i, i + half),
                            };
                            let (x0, x1) = (x[base + i0] as f64, x[base + i1] as f64);
                            out[base + i0] = (x0 * cos - x1 * sin) as f32;
                            out[base + i1] = (x0 * sin + x1 * cos) as f32;
                        }
                    }
                }
            }
            Ok(Tensor::f32(args[0].shape.clone(), out))
        }
        other => Err(not_in_family(other, "rope")),
    }
}

/// Whether [`expand`] has a primitive form for `op` on these operands.
pub(super) fn expandable(op: &Op, ins: &[&TensorType]) -> bool {
    let _ = ins;
    matches!(op, Op::Rope { n_rot, .. } | Op::RopeScaled { n_rot, .. } if ins.first().is_some_and(|x| x.rank() == 4 && x.shape[3].as_fixed() == Some(*n_rot)))
}

/// The decomposition of a rope op into primitives (see `crate::decompose`).
pub(super) fn expand<B: Builder>(b: &mut B, op: &Op, ins: &[B::V], tys: &[TensorType]) -> Result<Option<B::V>, B::Err> {
    let _ = tys;
    Ok(Some(match op {
        Op::Rope { mode, theta, n_rot } => rope(b, ins[0], ins[1], None, *mode, *theta, *n_rot, &tys[0].shape)?,
        Op::RopeScaled { mode, theta, n_rot } => {
            rope(b, ins[0], ins[1], Some(ins[2]), *mode, *theta, *n_rot, &tys[0].shape)?
        }
        _ => return Ok(None),
    }))
}

/// Rotary embedding of `x[B, S, H, D]` (`n_rot = D`) at integer positions `pos[B, S]`:
/// angles = pos · θ^(−2i/D), pairs (x0, x1) → (x0·cos − x1·sin, x0·sin + x1·cos). The pairs are the two
/// halves (`neox`) or adjacent elements (`normal`); either way a reshape exposes them as an axis of 2.
/// With `factors` (`rope_scaled`) the frequencies are divided by them: `Div(Pow(θ, ·), factors)`.
#[allow(clippy::too_many_arguments)]
fn rope<B: Builder>(
    b: &mut B,
    x: B::V,
    pos: B::V,
    factors: Option<B::V>,
    mode: RopeMode,
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
    if let Some(fac) = factors {
        freqs = b.add(Op::Div, &[freqs, fac])?;
    }
    let (axis, pairs) = match mode {
        RopeMode::Neox => (3, vec![bd.clone(), sd.clone(), hd.clone(), Dim::fixed(2), Dim::fixed(half)]),
        RopeMode::Normal => {
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
