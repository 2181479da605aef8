//! Reductions along one axis (kept with size 1) and `softmax`.

use super::*;
use crate::tensor::*;

/// The type rule of a reduce op.
pub(super) fn infer(op: &Op, ins: &[&TensorType], declared: Option<&TensorType>) -> Result<TensorType, String> {
    let _ = declared;
    match op {
        Op::ReduceSum { axis } | Op::ReduceMax { axis } | Op::ReduceMean { axis } => {
            want_float(ins[0], "operand")?;
            let a = norm_axis(*axis, ins[0].rank())?;
            let mut shape = ins[0].shape.clone();
            shape[a] = Dim::fixed(1);
            Ok(f32t(shape))
        }
        Op::Softmax { axis } => {
            want_float(ins[0], "operand")?;
            norm_axis(*axis, ins[0].rank())?;
            Ok(ins[0].clone())
        }
        other => Err(not_in_family(other, "reduce")),
    }
}

/// The interpreter rule of a reduce op.
pub(super) fn eval(op: &Op, args: &[&Tensor], env: &SymEnv) -> Result<Tensor, String> {
    let _ = env;
    match op {
        Op::ReduceSum { axis } => reduce(args[0], *axis, |l| l.iter().sum()),
        Op::ReduceMax { axis } => reduce(args[0], *axis, |l| l.iter().copied().fold(f64::NEG_INFINITY, f64::max)),
        Op::ReduceMean { axis } => reduce(args[0], *axis, |l| l.iter().sum::<f64>() / l.len() as f64),
        Op::Softmax { axis } => {
            let x = f(args[0])?;
            let ax = norm_axis(*axis, args[0].shape.len())?;
            let (outer, len, inner) = around(&args[0].shape, ax);
            let mut out = vec![0f32; x.len()];
            let mut lane = vec![0f64; len];
            for o in 0..outer {
                for i in 0..inner {
                    for (k, l) in lane.iter_mut().enumerate() {
                        *l = x[(o * len + k) * inner + i] as f64;
                    }
                    softmax_in_place(&mut lane);
                    for (k, l) in lane.iter().enumerate() {
                        out[(o * len + k) * inner + i] = *l as f32;
                    }
                }
            }
            Ok(Tensor::f32(args[0].shape.clone(), out))
        }
        other => Err(not_in_family(other, "reduce")),
    }
}

/// Whether [`expand`] has a primitive form for `op` on these operands.
pub(super) fn expandable(op: &Op, ins: &[&TensorType]) -> bool {
    let _ = ins;
    matches!(op, Op::Softmax { .. })
}

/// The decomposition of a reduce op into primitives (see `crate::decompose`).
pub(super) fn expand<B: Builder>(b: &mut B, op: &Op, ins: &[B::V], tys: &[TensorType]) -> Result<Option<B::V>, B::Err> {
    let _ = tys;
    Ok(Some(match op {
        Op::Softmax { axis } => {
            let m = b.add(Op::ReduceMax { axis: *axis }, &[ins[0]])?;
            let d = b.add(Op::Sub, &[ins[0], m])?;
            let e = b.add(Op::Exp, &[d])?;
            let s = b.add(Op::ReduceSum { axis: *axis }, &[e])?;
            b.add(Op::Div, &[e, s])?
        }
        _ => return Ok(None),
    }))
}
