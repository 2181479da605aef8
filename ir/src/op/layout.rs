//! Layout ops: `reshape`, `transpose`, `concat`, `slice`, `cast`.

use super::*;
use crate::tensor::*;

/// The type rule of a layout op.
pub(super) fn infer(op: &Op, ins: &[&TensorType], declared: Option<&TensorType>) -> Result<TensorType, String> {
    let _ = declared;
    match op {
        Op::Reshape { shape } => {
            let x = ins[0];
            // Equal element counts are checked when concrete; symbolic dims must be carried over.
            let (ka, kb) = (fixed_product(&x.shape), fixed_product(shape));
            let (sa, sb) = (symbolic_part(&x.shape), symbolic_part(shape));
            if sa != sb || (ka != kb) {
                return Err(format!("reshape {} → [{}] changes the element count", x, join(shape)));
            }
            Ok(TensorType::new(x.dtype, shape.clone()))
        }
        Op::Transpose { perm } => {
            let x = ins[0];
            let mut seen = vec![false; x.rank()];
            if perm.len() != x.rank() {
                return Err(format!("transpose perm {perm:?} does not match rank {}", x.rank()));
            }
            let mut shape = Vec::with_capacity(perm.len());
            for &p in perm {
                let a = norm_axis(p, x.rank())?;
                if std::mem::replace(&mut seen[a], true) {
                    return Err(format!("transpose perm {perm:?} repeats axis {a}"));
                }
                shape.push(x.shape[a].clone());
            }
            Ok(TensorType::new(x.dtype, shape))
        }
        Op::Concat { axis } => {
            let (a, b) = (ins[0], ins[1]);
            if a.dtype != b.dtype || a.rank() != b.rank() {
                return Err(format!("concat of {a} and {b}"));
            }
            let ax = norm_axis(*axis, a.rank())?;
            let mut shape = a.shape.clone();
            for (i, (da, db)) in a.shape.iter().zip(&b.shape).enumerate() {
                if i == ax {
                    shape[i] = da.add(db);
                } else {
                    same_dim(da, db, "concat dimension")?;
                }
            }
            Ok(TensorType::new(a.dtype, shape))
        }
        Op::Slice { axis, start, end } => {
            let x = ins[0];
            let ax = norm_axis(*axis, x.rank())?;
            let len = end.sub(start);
            if let (Some(s), Some(e)) = (start.as_fixed(), end.as_fixed()) {
                if s < 0 || e < s {
                    return Err(format!("slice {start}..{end} is negative or reversed"));
                }
                if let Some(n) = x.shape[ax].as_fixed() {
                    if e > n {
                        return Err(format!("slice {start}..{end} past dimension {n}"));
                    }
                }
            } else if len.as_fixed().is_none_or(|l| l < 0) {
                return Err(format!("slice {start}..{end} must have a constant, non-negative length"));
            }
            let mut shape = x.shape.clone();
            shape[ax] = len;
            Ok(TensorType::new(x.dtype, shape))
        }
        Op::Cast { dtype } => {
            if dtype.is_quantized() {
                return Err(format!("cast to quantized type {dtype} is not an op; quantize weights instead"));
            }
            Ok(TensorType::new(*dtype, ins[0].shape.clone()))
        }
        other => Err(not_in_family(other, "layout")),
    }
}

/// The interpreter rule of a layout op.
pub(super) fn eval(op: &Op, args: &[&Tensor], env: &SymEnv) -> Result<Tensor, String> {
    let _ = env;
    match op {
        Op::Reshape { .. } => Err("reshape needs the bound symbols; the interpreter evaluates it".into()),
        Op::Transpose { perm } => {
            let t = args[0];
            let r = t.shape.len();
            let perm: Vec<usize> = perm.iter().map(|&p| norm_axis(p, r)).collect::<Result<_, _>>()?;
            let out_shape: Vec<usize> = perm.iter().map(|&p| t.shape[p]).collect();
            let src_strides = strides(&t.shape);
            let total = t.numel();
            let mut idx = vec![0usize; r];
            let mut order = Vec::with_capacity(total);
            for _ in 0..total {
                order.push((0..r).map(|i| idx[i] * src_strides[perm[i]]).sum::<usize>());
                for dd in (0..r).rev() {
                    idx[dd] += 1;
                    if idx[dd] < out_shape[dd] {
                        break;
                    }
                    idx[dd] = 0;
                }
            }
            Ok(match &t.data {
                Data::F32(v) => Tensor::f32(out_shape, order.iter().map(|&i| v[i]).collect()),
                Data::I64(v) => Tensor::i64(out_shape, order.iter().map(|&i| v[i]).collect()),
            })
        }
        Op::Concat { axis } => {
            let (a, b) = (args[0], args[1]);
            let ax = norm_axis(*axis, a.shape.len())?;
            let (outer, la, inner) = around(&a.shape, ax);
            let lb = b.shape[ax];
            let mut shape = a.shape.clone();
            shape[ax] = la + lb;
            fn cat<T: Copy>(x: &[T], y: &[T], outer: usize, ca: usize, cb: usize) -> Vec<T> {
                let mut out = Vec::with_capacity(x.len() + y.len());
                for o in 0..outer {
                    out.extend_from_slice(&x[o * ca..(o + 1) * ca]);
                    out.extend_from_slice(&y[o * cb..(o + 1) * cb]);
                }
                out
            }
            Ok(match (&a.data, &b.data) {
                (Data::F32(x), Data::F32(y)) => Tensor::f32(shape, cat(x, y, outer, la * inner, lb * inner)),
                (Data::I64(x), Data::I64(y)) => Tensor::i64(shape, cat(x, y, outer, la * inner, lb * inner)),
                _ => return Err("concat of float and integer tensors".into()),
            })
        }
        Op::Slice { axis, start, end } => {
            let t = args[0];
            let ax = norm_axis(*axis, t.shape.len())?;
            let (outer, len, inner) = around(&t.shape, ax);
            let bound = |d: &crate::shape::Dim| d.eval(env).and_then(|v| usize::try_from(v).ok());
            let (s, e) = match (bound(start), bound(end)) {
                (Some(s), Some(e)) if s <= e && e <= len => (s, e),
                _ => return Err(format!("slice {start}..{end} is outside dimension {len}")),
            };
            let mut shape = t.shape.clone();
            shape[ax] = e - s;
            fn cut<T: Copy>(x: &[T], outer: usize, len: usize, inner: usize, s: usize, e: usize) -> Vec<T> {
                (0..outer).flat_map(|o| x[(o * len + s) * inner..(o * len + e) * inner].iter().copied()).collect()
            }
            Ok(match &t.data {
                Data::F32(x) => Tensor::f32(shape, cut(x, outer, len, inner, s, e)),
                Data::I64(x) => Tensor::i64(shape, cut(x, outer, len, inner, s, e)),
            })
        }
        Op::Cast { dtype } => {
            let t = args[0];
            Ok(match (&t.data, dtype) {
                (Data::F32(v), DType::F32) => Tensor::f32(t.shape.clone(), v.clone()),
                (Data::F32(v), DType::F16) => {
                    Tensor::f32(t.shape.clone(), v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect())
                }
                (Data::F32(v), DType::BF16) => {
                    Tensor::f32(t.shape.clone(), v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect())
                }
                (Data::F32(v), DType::I32 | DType::I64) => {
                    Tensor::i64(t.shape.clone(), v.iter().map(|&x| x as i64).collect())
                }
                (Data::I64(v), DType::I32) => {
                    Tensor::i64(t.shape.clone(), v.iter().map(|&x| x as i32 as i64).collect())
                }
                (Data::I64(v), DType::I64) => Tensor::i64(t.shape.clone(), v.clone()),
                (Data::I64(v), _) => Tensor::f32(t.shape.clone(), v.iter().map(|&x| x as f32).collect()),
                (_, d) => return Err(format!("cannot cast to {d}")),
            })
        }
        other => Err(not_in_family(other, "layout")),
    }
}

fn fixed_product(shape: &[Dim]) -> i64 {
    shape.iter().filter_map(Dim::as_fixed).product()
}

fn symbolic_part(shape: &[Dim]) -> Vec<Dim> {
    let mut v: Vec<Dim> = shape.iter().filter(|d| d.as_fixed().is_none()).cloned().collect();
    v.sort();
    v
}

fn join(shape: &[Dim]) -> String {
    shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
}

/// No layout op has a decomposition.
pub(super) fn expandable(_: &Op, _: &[&TensorType]) -> bool {
    false
}

pub(super) fn expand<B: Builder>(_: &mut B, _: &Op, _: &[B::V], _: &[TensorType]) -> Result<Option<B::V>, B::Err> {
    Ok(None)
}
