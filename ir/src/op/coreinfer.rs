//! CoreInfer's ops: the step's MLP mask, the core-set state, the gathered projection.

use super::*;
use crate::tensor::*;

/// The type rule of a coreinfer op.
pub(super) fn infer(op: &Op, ins: &[&TensorType], declared: Option<&TensorType>) -> Result<TensorType, String> {
    let _ = declared;
    match op {
        Op::CoreKeep { .. } => {
            let (x, core) = (ins[0], ins[1]);
            want_float(core, "core set")?;
            want_rank(x, 3, "core_keep rows")?;
            want_rank(core, 2, "core set")?;
            same_dim(&x.shape[0], &core.shape[0], "core_keep batch")?;
            Ok(f32t(vec![x.shape[0].clone(), x.shape[1].clone(), core.shape[1].clone()]))
        }
        Op::CoreLinear { .. } => {
            let y = Op::Linear.infer(&ins[..2], None)?;
            let core = ins[2];
            want_float(core, "core set")?;
            want_rank(core, 2, "core set")?;
            want_rank(&y, 3, "core_linear result")?;
            same_dim(&y.shape[0], &core.shape[0], "core_linear batch")?;
            same_dim(&y.shape[2], &core.shape[1], "core_linear width")?;
            Ok(y)
        }
        Op::CoreSelect { alpha, beta, .. } => {
            crate::coreinfer::validate(*alpha, *beta)?;
            let (act, core) = (ins[0], ins[1]);
            want_float(act, "core_select activation")?;
            want_float(core, "core set")?;
            want_rank(act, 3, "core_select activation")?;
            want_rank(core, 2, "core set")?;
            same_dim(&act.shape[0], &core.shape[0], "core_select batch")?;
            same_dim(&act.shape[2], &core.shape[1], "core_select width")?;
            Ok(core.clone())
        }
        other => Err(not_in_family(other, "coreinfer")),
    }
}

/// The interpreter rule of a coreinfer op.
pub(super) fn eval(op: &Op, args: &[&Tensor], env: &SymEnv) -> Result<Tensor, String> {
    let _ = env;
    match op {
        Op::CoreKeep { past } => {
            let core = f(args[1])?;
            let [b, s, _] = args[0].shape[..] else { return Err("core_keep rows must have rank 3".into()) };
            let c = args[1].shape[1];
            let past = past.eval(env).ok_or_else(|| format!("cannot evaluate past = {past}"))?;
            let mut out = vec![1f32; b * s * c];
            if past != 0 {
                for (r, row) in out.chunks_mut(c.max(1)).enumerate() {
                    row.copy_from_slice(&core[(r / s.max(1)) * c..][..c]);
                }
            }
            Ok(Tensor::f32(vec![b, s, c], out))
        }
        Op::CoreLinear { past } => {
            let keep = (Op::CoreKeep { past: past.clone() }).eval(&[args[0], args[2]], env)?;
            (Op::MaskedLinear).eval(&[args[0], args[1], &keep], env)
        }
        Op::CoreSelect { alpha, beta, past } => {
            let (act, core) = (f(args[0])?, f(args[1])?);
            let [b, s, c] = args[0].shape[..] else { return Err("core_select activation must have rank 3".into()) };
            let past = past.eval(env).ok_or_else(|| format!("cannot evaluate past = {past}"))?;
            if past != 0 {
                return Ok(args[1].clone());
            }
            let mut out = Vec::with_capacity(core.len());
            for bi in 0..b {
                out.extend(crate::coreinfer::core_set(&act[bi * s * c..(bi + 1) * s * c], s, c, *alpha, *beta));
            }
            Ok(Tensor::f32(vec![b, c], out))
        }
        other => Err(not_in_family(other, "coreinfer")),
    }
}

/// No coreinfer op has a decomposition.
pub(super) fn expandable(_: &Op, _: &[&TensorType]) -> bool {
    false
}

pub(super) fn expand<B: Builder>(_: &mut B, _: &Op, _: &[B::V], _: &[TensorType]) -> Result<Option<B::V>, B::Err> {
    Ok(None)
}
