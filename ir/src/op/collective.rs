//! Tensor-parallel collectives (evaluated through the rank's communicator by the interpreter).

use super::*;
use crate::tensor::*;

/// The type rule of a collective op.
pub(super) fn infer(op: &Op, ins: &[&TensorType], declared: Option<&TensorType>) -> Result<TensorType, String> {
    let _ = declared;
    match op {
        Op::AllReduce => {
            want_float(ins[0], "all_reduce operand")?;
            Ok(ins[0].clone())
        }
        Op::ReduceScatter { axis } | Op::Shard { axis } | Op::AllGather { axis } => {
            let x = ins[0];
            want_float(x, "operand")?;
            let ax = norm_axis(*axis, x.rank())?;
            let d = &x.shape[ax];
            let sym = d.as_sym().ok_or_else(|| format!("axis {ax} ({d}) must be one symbol to be split over ranks"))?;
            let suffix = crate::collective::SHARD_SUFFIX;
            let to = match (op, sym.strip_suffix(suffix)) {
                (Op::AllGather { .. }, Some(full)) => full.to_string(),
                (Op::AllGather { .. }, None) => {
                    return Err(format!("all_gather axis {ax} ({d}) is not a shard dimension"))
                }
                (_, Some(_)) => return Err(format!("axis {ax} ({d}) is already sharded")),
                (_, None) => format!("{sym}{suffix}"),
            };
            let mut shape = x.shape.clone();
            shape[ax] = Dim::sym(&to);
            Ok(f32t(shape))
        }
        other => Err(not_in_family(other, "collective")),
    }
}

/// The interpreter rule of a collective op.
pub(super) fn eval(op: &Op, args: &[&Tensor], env: &SymEnv) -> Result<Tensor, String> {
    let _ = (args, env);
    match op {
        Op::AllReduce | Op::ReduceScatter { .. } | Op::Shard { .. } | Op::AllGather { .. } => {
            Err("collective ops need the rank's communicator; the interpreter evaluates them".into())
        }
        other => Err(not_in_family(other, "collective")),
    }
}

/// No collective op has a decomposition.
pub(super) fn expandable(_: &Op, _: &[&TensorType]) -> bool {
    false
}

pub(super) fn expand<B: Builder>(_: &mut B, _: &Op, _: &[B::V], _: &[TensorType]) -> Result<Option<B::V>, B::Err> {
    Ok(None)
}
