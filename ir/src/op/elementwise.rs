//! Elementwise ops: the broadcasting binary ops, the unary ops (whose rule is their table line), `swiglu`, `threshold`.

use super::*;
use crate::tensor::*;

/// The type rule of a elementwise op.
pub(super) fn infer(op: &Op, ins: &[&TensorType], declared: Option<&TensorType>) -> Result<TensorType, String> {
    let _ = declared;
    match op {
        Op::Add | Op::Sub | Op::Mul | Op::Div | Op::Pow => {
            want_float(ins[0], "lhs")?;
            want_float(ins[1], "rhs")?;
            Ok(f32t(broadcast(&ins[0].shape, &ins[1].shape)?))
        }
        _ if op.unary().is_some() => {
            want_float(ins[0], "operand")?;
            Ok(ins[0].clone())
        }
        Op::SwiGlu => {
            want_float(ins[0], "gate")?;
            if ins[0] != ins[1] {
                return Err(format!("swiglu operands differ: {} and {}", ins[0], ins[1]));
            }
            Ok(ins[0].clone())
        }
        Op::Threshold => {
            let (x, t) = (ins[0], ins[1]);
            want_float(x, "threshold input")?;
            want_float(t, "threshold")?;
            want_rank(t, 1, "threshold")?;
            same_dim(x.shape.last().ok_or("threshold input must have rank ≥ 1")?, &t.shape[0], "threshold width")?;
            Ok(x.clone())
        }
        other => Err(not_in_family(other, "elementwise")),
    }
}

/// The interpreter rule of a elementwise op.
pub(super) fn eval(op: &Op, args: &[&Tensor], env: &SymEnv) -> Result<Tensor, String> {
    let _ = env;
    if let Some(rule) = op.unary() {
        return unary(args[0], rule.eval);
    }
    match op {
        Op::Add => broadcast_binary(args[0], args[1], |a, b| a + b),
        Op::Sub => broadcast_binary(args[0], args[1], |a, b| a - b),
        Op::Mul => broadcast_binary(args[0], args[1], |a, b| a * b),
        Op::Div => broadcast_binary(args[0], args[1], |a, b| a / b),
        Op::Pow => broadcast_binary(args[0], args[1], |a, b| (a as f64).powf(b as f64) as f32),
        Op::SwiGlu => {
            let (g, u) = (f(args[0])?, f(args[1])?);
            Ok(Tensor::f32(
                args[0].shape.clone(),
                g.iter().zip(u).map(|(&g, &u)| (silu(g as f64) * u as f64) as f32).collect(),
            ))
        }
        Op::Threshold => {
            let (x, t) = (f(args[0])?, f(args[1])?);
            let c = t.len().max(1);
            let out = x.iter().enumerate().map(|(i, &v)| if v.abs() > t[i % c] { v } else { 0.0 }).collect();
            Ok(Tensor::f32(args[0].shape.clone(), out))
        }
        other => Err(not_in_family(other, "elementwise")),
    }
}

/// Whether [`expand`] has a primitive form for `op` on these operands.
pub(super) fn expandable(op: &Op, ins: &[&TensorType]) -> bool {
    let _ = ins;
    matches!(op, Op::Silu | Op::SwiGlu)
}

/// The decomposition of a elementwise op into primitives (see `crate::decompose`).
pub(super) fn expand<B: Builder>(b: &mut B, op: &Op, ins: &[B::V], tys: &[TensorType]) -> Result<Option<B::V>, B::Err> {
    let _ = tys;
    Ok(Some(match op {
        Op::Silu => {
            let s = b.add(Op::Sigmoid, &[ins[0]])?;
            b.add(Op::Mul, &[ins[0], s])?
        }
        Op::SwiGlu => {
            let s = b.add(Op::Silu, &[ins[0]])?;
            b.add(Op::Mul, &[s, ins[1]])?
        }
        _ => return Ok(None),
    }))
}
