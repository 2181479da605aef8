//! The linear family: dense, matmul, masked-output, input-sparse (active channels), block-sparse, N:M and bitmap weights.

use super::*;
use crate::tensor::*;
use rayon::prelude::*;

/// The type rule of a linear op.
pub(super) fn infer(op: &Op, ins: &[&TensorType], declared: Option<&TensorType>) -> Result<TensorType, String> {
    let _ = declared;
    match op {
        Op::Linear => {
            let (x, w) = (ins[0], ins[1]);
            want_float(x, "linear input")?;
            want_rank(w, 2, "linear weight")?;
            if !w.dtype.is_float() {
                return Err(format!("linear weight must be a float type, found {}", w.dtype));
            }
            let k = x.shape.last().ok_or("linear input must have rank ≥ 1")?;
            same_dim(k, &w.shape[1], "linear inner dimension")?;
            let mut shape = x.shape.clone();
            *shape.last_mut().unwrap() = w.shape[0].clone();
            Ok(f32t(shape))
        }
        Op::MatMul => {
            let (a, b) = (ins[0], ins[1]);
            want_float(a, "matmul lhs")?;
            want_float(b, "matmul rhs")?;
            if a.rank() < 2 || a.rank() != b.rank() {
                return Err(format!("matmul needs equal ranks ≥ 2, found {a} and {b}"));
            }
            let r = a.rank();
            same_dim(&a.shape[r - 1], &b.shape[r - 2], "matmul inner dimension")?;
            for i in 0..r - 2 {
                same_dim(&a.shape[i], &b.shape[i], "matmul batch dimension")?;
            }
            let mut shape = a.shape[..r - 1].to_vec();
            shape.push(b.shape[r - 1].clone());
            Ok(f32t(shape))
        }
        Op::MaskedLinear => {
            let y = Op::Linear.infer(&ins[..2], None)?;
            if *ins[2] != y {
                return Err(format!("masked_linear mask is {} but the result is {y}", ins[2]));
            }
            Ok(y)
        }
        Op::SparseLinear { .. } => {
            let y = Op::Linear.infer(&ins[..2], None)?;
            let (w, blocks, row_ptr, col_idx) = (ins[1], ins[2], ins[3], ins[4]);
            if blocks.dtype != w.dtype || blocks.rank() != 1 {
                return Err(format!("sparse_linear blocks must be a flat {} tensor, found {blocks}", w.dtype));
            }
            for (t, what) in [(row_ptr, "row_ptr"), (col_idx, "col_idx")] {
                if t.dtype != DType::I32 || t.rank() != 1 {
                    return Err(format!("sparse_linear {what} must be i32[_], found {t}"));
                }
            }
            same_dim(&row_ptr.shape[0], &w.shape[0].add(&Dim::fixed(1)), "sparse_linear row_ptr length")?;
            Ok(y)
        }
        Op::NmLinear { dtype, keep, group, decode, prefill } => {
            let (x, packed) = (ins[0], ins[1]);
            want_float(x, "nm_linear input")?;
            if packed.dtype != DType::I32 || packed.rank() != 2 {
                return Err(format!("nm_linear packed weights must be i32[_, _], found {packed}"));
            }
            phase_choice("nm_linear", *decode, *prefill, ins, *dtype)?;
            let p = crate::sparse::NmPattern::new(*keep as usize, *group as usize).map_err(|e| e.to_string())?;
            if !crate::sparse::NM_DTYPES.contains(dtype) {
                return Err(format!("nm_linear weights of {dtype} are not supported"));
            }
            let k = x.shape.last().ok_or("nm_linear input must have rank ≥ 1")?;
            if let Some(k) = k.as_fixed() {
                if k <= 0 || k % 32 != 0 {
                    return Err(format!("nm_linear: k = {k} is not a positive multiple of 32"));
                }
                let words = crate::sparse::nm::nm_row_bytes(*dtype, p, k as usize) / 4;
                same_dim(&packed.shape[1], &Dim::fixed(words as i64), "nm_linear packed row words")?;
            }
            let mut shape = x.shape.clone();
            *shape.last_mut().unwrap() = packed.shape[0].clone();
            Ok(f32t(shape))
        }
        Op::BitmapLinear { dtype, gran, kept, decode, prefill } => {
            let (x, packed) = (ins[0], ins[1]);
            want_float(x, "bitmap_linear input")?;
            if packed.dtype != DType::I32 || packed.rank() != 2 {
                return Err(format!("bitmap_linear packed weights must be i32[_, _], found {packed}"));
            }
            phase_choice("bitmap_linear", *decode, *prefill, ins, *dtype)?;
            if !crate::sparse::NM_DTYPES.contains(dtype) {
                return Err(format!("bitmap_linear weights of {dtype} are not supported"));
            }
            if !crate::sparse::bitmap::BITMAP_GRANS.contains(&(*gran as usize)) || *kept < 0 || kept % gran != 0 {
                return Err(format!("bitmap_linear: granularity {gran} with {kept} kept per row is not supported"));
            }
            let k = x.shape.last().ok_or("bitmap_linear input must have rank ≥ 1")?;
            if let Some(k) = k.as_fixed() {
                if k <= 0 || k % 32 != 0 || *kept > k {
                    return Err(format!("bitmap_linear: k = {k} is not a positive multiple of 32 of at least {kept}"));
                }
                let words =
                    crate::sparse::bitmap::bitmap_row_bytes(*dtype, *gran as usize, k as usize, *kept as usize) / 4;
                same_dim(&packed.shape[1], &Dim::fixed(words as i64), "bitmap_linear packed row words")?;
            }
            let mut shape = x.shape.clone();
            *shape.last_mut().unwrap() = packed.shape[0].clone();
            Ok(f32t(shape))
        }
        Op::ActiveLinear => {
            let (x, wt) = (ins[0], ins[1]);
            want_float(x, "active_linear input")?;
            want_rank(wt, 2, "active_linear weight")?;
            if !wt.dtype.is_float() && wt.dtype.column_layout().is_none() {
                return Err(format!("active_linear weight must be a float type, found {}", wt.dtype));
            }
            let k = x.shape.last().ok_or("active_linear input must have rank ≥ 1")?;
            same_dim(k, &wt.shape[0], "active_linear inner dimension")?;
            let mut shape = x.shape.clone();
            *shape.last_mut().unwrap() = wt.shape[1].clone();
            Ok(f32t(shape))
        }
        other => Err(not_in_family(other, "linear")),
    }
}

/// The interpreter rule of a linear op.
pub(super) fn eval(op: &Op, args: &[&Tensor], env: &SymEnv) -> Result<Tensor, String> {
    let _ = env;
    match op {
        Op::Linear => {
            let (x, w) = (f(args[0])?, f(args[1])?);
            let (n, k) = (args[1].shape[0], args[1].shape[1]);
            let m = x.len() / k.max(1);
            // Column-major scratch so each weight row is read once and the work splits over output features.
            let mut cols = vec![0f32; n * m];
            cols.par_chunks_mut(m.max(1)).zip(w.par_chunks(k.max(1))).for_each(|(col, wrow)| {
                for (r, c) in col.iter_mut().enumerate() {
                    *c = dot(&x[r * k..(r + 1) * k], wrow) as f32;
                }
            });
            let mut out = vec![0f32; m * n];
            for r in 0..m {
                for c in 0..n {
                    out[r * n + c] = cols[c * m + r];
                }
            }
            let mut shape = args[0].shape.clone();
            *shape.last_mut().unwrap() = n;
            Ok(Tensor::f32(shape, out))
        }
        Op::MatMul => {
            let (a, b) = (f(args[0])?, f(args[1])?);
            let r = args[0].shape.len();
            let (m, k, n) = (args[0].shape[r - 2], args[0].shape[r - 1], args[1].shape[r - 1]);
            let batch: usize = args[0].shape[..r - 2].iter().product();
            let mut out = vec![0f32; batch * m * n];
            let mut bt = vec![0f32; k * n];
            for bi in 0..batch {
                let bb = &b[bi * k * n..(bi + 1) * k * n];
                for i in 0..k {
                    for j in 0..n {
                        bt[j * k + i] = bb[i * n + j];
                    }
                }
                for i in 0..m {
                    let arow = &a[(bi * m + i) * k..(bi * m + i + 1) * k];
                    for j in 0..n {
                        out[(bi * m + i) * n + j] = dot(arow, &bt[j * k..(j + 1) * k]) as f32;
                    }
                }
            }
            let mut shape = args[0].shape[..r - 1].to_vec();
            shape.push(n);
            Ok(Tensor::f32(shape, out))
        }
        Op::MaskedLinear => {
            let y = (Op::Linear).eval(&args[..2], env)?;
            let mask = f(args[2])?;
            let Data::F32(mut v) = y.data else { unreachable!("linear gives floats") };
            for (o, &m) in v.iter_mut().zip(mask) {
                if m == 0.0 {
                    *o = 0.0;
                }
            }
            Ok(Tensor::f32(y.shape, v))
        }
        // Both layouts hold the same values; the dense one is the reference (a wrong CSR shows up as a
        // compiled result that differs from this).
        Op::SparseLinear { .. } => (Op::Linear).eval(&args[..2], env),
        // The compact form decoded to the dense pruned matrix (validated first), then a plain linear. The
        // dense layout, when present, holds the same values and is the kernels' to read (a wrong one
        // shows up as a compiled result that differs from this).
        Op::NmLinear { dtype, keep, group, .. } => {
            let words = ints(args[1])?;
            let data: Vec<u8> = words.iter().flat_map(|&w| (w as i32).to_le_bytes()).collect();
            let w = crate::sparse::NmSparse {
                dtype: *dtype,
                pattern: crate::sparse::NmPattern { keep: *keep as usize, group: *group as usize },
                n: args[1].shape[0],
                k: *args[0].shape.last().ok_or("nm_linear input must have rank ≥ 1")?,
                data,
            };
            let wf = w.dequantize().map_err(|e| format!("nm_linear: {e}"))?;
            let wt = Tensor::f32(vec![w.n, w.k], wf);
            (Op::Linear).eval(&[args[0], &wt], env)
        }
        // Decoded to the dense pruned matrix (validated first), then a plain linear; the dense layout, when
        // present, is the kernels' (as for `nm_linear`).
        Op::BitmapLinear { dtype, gran, kept, .. } => {
            let words = ints(args[1])?;
            let w = crate::sparse::BitmapSparse {
                dtype: *dtype,
                gran: *gran as usize,
                n: args[1].shape[0],
                k: *args[0].shape.last().ok_or("bitmap_linear input must have rank ≥ 1")?,
                kept: *kept as usize,
                data: words.iter().flat_map(|&w| (w as i32).to_le_bytes()).collect(),
            };
            let wf = w.dequantize().map_err(|e| format!("bitmap_linear: {e}"))?;
            let wt = Tensor::f32(vec![w.n, w.k], wf);
            (Op::Linear).eval(&[args[0], &wt], env)
        }
        Op::ActiveLinear => {
            let (x, wt) = (f(args[0])?, f(args[1])?);
            let (k, n) = (args[1].shape[0], args[1].shape[1]);
            let m = x.len() / k.max(1);
            let mut out = vec![0f32; m * n];
            out.par_chunks_mut(n.max(1)).enumerate().for_each(|(r, orow)| {
                let mut acc = vec![0f64; n];
                for (j, &xj) in x[r * k..(r + 1) * k].iter().enumerate() {
                    if xj != 0.0 {
                        for (a, &w) in acc.iter_mut().zip(&wt[j * n..(j + 1) * n]) {
                            *a += xj as f64 * w as f64;
                        }
                    }
                }
                for (o, a) in orow.iter_mut().zip(acc) {
                    *o = a as f32;
                }
            });
            let mut shape = args[0].shape.clone();
            *shape.last_mut().unwrap() = n;
            Ok(Tensor::f32(shape, out))
        }
        other => Err(not_in_family(other, "linear")),
    }
}

/// The phase attributes of an `nm_linear`/`bitmap_linear` (0 or 1, not both 0) and its dense layout
/// operand when it has one: `w[N_out, K]` of `dtype`, `N_out` the packed form's rows, `K` the input's.
fn phase_choice(op: &str, decode: i64, prefill: i64, ins: &[&TensorType], dtype: DType) -> Result<(), String> {
    if ![0, 1].contains(&decode) || ![0, 1].contains(&prefill) {
        return Err(format!("{op}: decode = {decode}, prefill = {prefill} must each be 0 or 1"));
    }
    if decode == 0 && prefill == 0 {
        return Err(format!("{op}: decode = prefill = 0 reads only the dense layout (use linear)"));
    }
    if let Some(w) = ins.get(2) {
        if w.dtype != dtype || w.rank() != 2 {
            return Err(format!("{op} dense layout must be {dtype}[_, _], found {w}"));
        }
        same_dim(&w.shape[0], &ins[1].shape[0], &format!("{op} dense layout rows"))?;
        let k = ins[0].shape.last().ok_or_else(|| format!("{op} input must have rank ≥ 1"))?;
        same_dim(&w.shape[1], k, &format!("{op} dense layout width"))?;
    }
    Ok(())
}

/// No linear op has a decomposition.
pub(super) fn expandable(_: &Op, _: &[&TensorType]) -> bool {
    false
}

pub(super) fn expand<B: Builder>(_: &mut B, _: &Op, _: &[B::V], _: &[TensorType]) -> Result<Option<B::V>, B::Err> {
    Ok(None)
}
