//! Source ops and lookups: graph inputs, weights, constants, `iota`, `embedding`.

use super::*;
use crate::tensor::*;

/// The type rule of a source op.
pub(super) fn infer(op: &Op, ins: &[&TensorType], declared: Option<&TensorType>) -> Result<TensorType, String> {
    let _ = declared;
    match op {
        Op::Input { .. } | Op::Weight { .. } => {
            declared.cloned().ok_or_else(|| format!("`{}` needs a declared type", op.name()))
        }
        Op::Constant { .. } => Ok(f32t(vec![])),
        Op::Embedding => {
            let (table, ids) = (ins[0], ins[1]);
            want_rank(table, 2, "embedding table")?;
            if !ids.dtype.is_int() {
                return Err(format!("embedding ids must be integers, found {}", ids.dtype));
            }
            let mut shape = ids.shape.clone();
            shape.push(table.shape[1].clone());
            Ok(f32t(shape))
        }
        Op::Iota { n } => {
            if *n < 0 {
                return Err(format!("iota length {n} is negative"));
            }
            Ok(f32t(vec![Dim::fixed(*n)]))
        }
        other => Err(not_in_family(other, "source")),
    }
}

/// The interpreter rule of a source op.
pub(super) fn eval(op: &Op, args: &[&Tensor], env: &SymEnv) -> Result<Tensor, String> {
    let _ = env;
    match op {
        Op::Input { .. } | Op::Weight { .. } => Err("source ops are evaluated by the interpreter".into()),
        Op::Constant { value } => Ok(Tensor::f32(vec![], vec![*value])),
        Op::Embedding => {
            let (table, ids) = (f(args[0])?, ints(args[1])?);
            let (v, d) = (args[0].shape[0], args[0].shape[1]);
            let mut out = Vec::with_capacity(ids.len() * d);
            for &id in ids {
                if id < 0 || id as usize >= v {
                    return Err(format!("token id {id} is outside the vocabulary of {v}"));
                }
                out.extend_from_slice(&table[id as usize * d..(id as usize + 1) * d]);
            }
            let mut shape = args[1].shape.clone();
            shape.push(d);
            Ok(Tensor::f32(shape, out))
        }
        Op::Iota { n } => Ok(Tensor::f32(vec![*n as usize], (0..*n).map(|i| i as f32).collect())),
        other => Err(not_in_family(other, "source")),
    }
}

/// No source op has a decomposition.
pub(super) fn expandable(_: &Op, _: &[&TensorType]) -> bool {
    false
}

pub(super) fn expand<B: Builder>(_: &mut B, _: &Op, _: &[B::V], _: &[TensorType]) -> Result<Option<B::V>, B::Err> {
    Ok(None)
}
