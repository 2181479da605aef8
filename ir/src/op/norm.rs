//! `rms_norm`.

use super::*;
use crate::tensor::*;

/// The type rule of a norm op.
pub(super) fn infer(op: &Op, ins: &[&TensorType], declared: Option<&TensorType>) -> Result<TensorType, String> {
    let _ = declared;
    match op {
        Op::RmsNorm { .. } => {
            let (x, w) = (ins[0], ins[1]);
            want_float(x, "rms_norm input")?;
            want_float(w, "rms_norm weight")?;
            want_rank(w, 1, "rms_norm weight")?;
            same_dim(x.shape.last().ok_or("rms_norm input must have rank ≥ 1")?, &w.shape[0], "rms_norm width")?;
            Ok(x.clone())
        }
        other => Err(not_in_family(other, "norm")),
    }
}

/// The interpreter rule of a norm op.
pub(super) fn eval(op: &Op, args: &[&Tensor], env: &SymEnv) -> Result<Tensor, String> {
    let _ = env;
    match op {
        Op::RmsNorm { eps } => {
            let (x, w) = (f(args[0])?, f(args[1])?);
            let d = w.len();
            let mut out = Vec::with_capacity(x.len());
            for row in x.chunks(d.max(1)) {
                let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / d as f64;
                let inv = 1.0 / (ms + *eps as f64).sqrt();
                out.extend(row.iter().zip(w).map(|(&v, &g)| (v as f64 * inv * g as f64) as f32));
            }
            Ok(Tensor::f32(args[0].shape.clone(), out))
        }
        other => Err(not_in_family(other, "norm")),
    }
}

/// Whether [`expand`] has a primitive form for `op` on these operands.
pub(super) fn expandable(op: &Op, ins: &[&TensorType]) -> bool {
    let _ = ins;
    matches!(op, Op::RmsNorm { .. })
}

/// The decomposition of a norm op into primitives (see `crate::decompose`).
pub(super) fn expand<B: Builder>(b: &mut B, op: &Op, ins: &[B::V], tys: &[TensorType]) -> Result<Option<B::V>, B::Err> {
    let _ = tys;
    Ok(Some(match op {
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
        _ => return Ok(None),
    }))
}
