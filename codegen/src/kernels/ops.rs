//! Kernels for the non-matrix, non-elementwise ops of a decoder: RMSNorm, RoPE, KV-cache append, row
//! slices, causal attention (elementwise ops are fused kernels, see `fused`). Each is shape-specialised on the model's constant sizes (width, heads,
//! head dim) and takes the step's sizes (rows, `seq`, `past`) as dims.

use super::attend::Attend;
use super::emit::{Emitter, R};
use crate::CodegenError;
use inkwell::values::{FloatValue, IntValue, PointerValue};
use serde::{Deserialize, Serialize};

/// What to generate for one launch; equal specs share one kernel.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum OpKernel {
    /// bufs [x, w, y]; items: rows; y[r] = x[r] / sqrt(mean(x[r]²) + eps) * w.
    RmsNorm { d: usize, eps: f32 },
    /// A residual add and the RMSNorm of its sum in one pass over each row: bufs [a, b, w, s, y];
    /// items: rows; s[r] = a[r] + b[r] and y[r] = rms_norm(s[r]) * w.
    AddRmsNorm { d: usize, eps: f32 },
    /// bufs [x, pos(i32), y], or [x, pos(i32), factors(f32[n_rot/2]), y] when `scaled` (frequency i is
    /// divided by factors[i]: Llama 3.x `rope_freqs`, linear interpolation); items: rows of `heads * head_dim`.
    Rope {
        heads: usize,
        head_dim: usize,
        n_rot: usize,
        theta: f32,
        neox: bool,
        #[serde(default)]
        scaled: bool,
    },
    /// bufs [src, cache]; dims [past]; items: rows of `row` floats, written at rows `past..`.
    AppendKv { row: usize },
    /// bufs [src, dst]; dims [start]; items: rows of `row` floats; dst[r] = src[start + r].
    SliceRows { row: usize },
    /// bufs [q, k_cache, v_cache, out]; dims [seq, past]; items: `seq * q_heads` (query, head) pairs.
    /// `window` > 0: each query reads only its last `window` keys (sliding-window attention).
    Attention {
        q_heads: usize,
        kv_heads: usize,
        head_dim: usize,
        scale: f32,
        #[serde(default)]
        window: usize,
    },
    /// FlexPrefill step 1–2 (`kiln_ir::flex`): bufs [q, k_cache, scratch]; dims [seq, past]; items:
    /// `q_heads`. Writes each head's pattern to `scratch` (nothing when `seq < min_len`).
    FlexPattern {
        q_heads: usize,
        kv_heads: usize,
        head_dim: usize,
        scale: f32,
        block: usize,
        gamma: f32,
        tau: f32,
        min_len: usize,
    },
    /// FlexPrefill step 3–4: bufs [q, k_cache, v_cache, scratch, out]; dims [seq, past]; items:
    /// `q_heads * seq`, head-major. With `seq < min_len` each item is exactly the dense kernel's.
    FlexAttention {
        q_heads: usize,
        kv_heads: usize,
        head_dim: usize,
        scale: f32,
        block: usize,
        gamma: f32,
        min_len: usize,
    },
    /// CoreInfer's MLP mask (`core_keep`): bufs [core, out]; dims [past, seq]; items: rows of `c`.
    CoreKeep { c: usize },
    /// CoreInfer, per prefill token the k-th largest |activation| key: bufs [act, scratch(i32)]; dims
    /// [past]; items: rows.
    CoreThresholds { c: usize, k: usize },
    /// CoreInfer's core set (`core_select`) from the thresholds: bufs [act, scratch, core]; dims [past,
    /// seq]; items: batch · `c` channels, written in place into the state `core`.
    CoreSelect { c: usize, beta: f32 },
    /// CoreInfer's gather (`core_linear`'s first launch): bufs [core, w, gathered]; dims [past]; items: 1
    /// (one thread). At past = 0 marks the copy stale; at the first later step copies the core rows of
    /// `w` (`row_bytes` each, `n` rows) into `gathered` (`GatherLayout`).
    CoreGather { n: usize, row_bytes: usize },
    /// CoreInfer, `core_linear`'s last launch: bufs [gathered, y]; dims [past]; items: rows of `n`. After
    /// past = 0, moves each row's packed results to their channels and zeroes the rest, in place.
    CoreExpand { n: usize },
}

impl OpKernel {
    pub fn symbol(&self) -> String {
        let f = |x: f32| format!("{:08x}", x.to_bits());
        match self {
            OpKernel::RmsNorm { d, eps } => format!("kiln_rms_norm_d{d}_e{}", f(*eps)),
            OpKernel::AddRmsNorm { d, eps } => format!("kiln_add_rms_norm_d{d}_e{}", f(*eps)),
            OpKernel::Rope { heads, head_dim, n_rot, theta, neox, scaled } => format!(
                "kiln_rope_{}_h{heads}_hd{head_dim}_r{n_rot}_t{}{}",
                if *neox { "neox" } else { "normal" },
                f(*theta),
                if *scaled { "_f" } else { "" }
            ),
            OpKernel::AppendKv { row } => format!("kiln_append_kv_{row}"),
            OpKernel::SliceRows { row } => format!("kiln_slice_rows_{row}"),
            OpKernel::Attention { q_heads, kv_heads, head_dim, scale, window } => {
                let w = if *window > 0 { format!("_w{window}") } else { String::new() };
                format!("kiln_attention_q{q_heads}_kv{kv_heads}_hd{head_dim}_s{}{w}", f(*scale))
            }
            OpKernel::FlexPattern { q_heads, kv_heads, head_dim, scale, block, gamma, tau, min_len } => format!(
                "kiln_flex_pattern_q{q_heads}_kv{kv_heads}_hd{head_dim}_s{}_b{block}_g{}_t{}_m{min_len}",
                f(*scale),
                f(*gamma),
                f(*tau)
            ),
            OpKernel::FlexAttention { q_heads, kv_heads, head_dim, scale, block, gamma, min_len } => format!(
                "kiln_flex_attention_q{q_heads}_kv{kv_heads}_hd{head_dim}_s{}_b{block}_g{}_m{min_len}",
                f(*scale),
                f(*gamma)
            ),
            OpKernel::CoreKeep { c } => format!("kiln_core_keep_c{c}"),
            OpKernel::CoreThresholds { c, k } => format!("kiln_core_thresholds_c{c}_k{k}"),
            OpKernel::CoreSelect { c, beta } => format!("kiln_core_select_c{c}_b{}", f(*beta)),
            OpKernel::CoreGather { n, row_bytes } => format!("kiln_core_gather_n{n}_rb{row_bytes}"),
            OpKernel::CoreExpand { n } => format!("kiln_core_expand_n{n}"),
        }
    }

    /// The body of a kernel whose code lives here (every one but the FlexPrefill and CoreInfer kernels,
    /// which [`OpKernel::emit`] in `kernels/mod.rs` sends to their own modules).
    pub(crate) fn emit_body(&self, e: &Emitter) -> R<()> {
        match *self {
            OpKernel::RmsNorm { d, eps } => {
                let (x, w, y) = (e.buf(0)?, e.buf(1)?, e.buf(2)?);
                let dc = e.i64c(d as i64);
                e.for_range(e.begin, e.end, |r| {
                    let base = e.mul(r, dc)?;
                    let ss = e.var_f32(0.0)?;
                    e.for_range(e.i64c(0), dc, |j| {
                        let v = e.load_f32(x, e.add(base, j)?)?;
                        e.set(ss, e.fma_reduce(v, v, e.get(ss)?)?)
                    })?;
                    normalize_row(e, [x, w, y], base, d, eps, e.get(ss)?)
                })?;
            }
            OpKernel::AddRmsNorm { d, eps } => {
                let (a, b, w, s, y) = (e.buf(0)?, e.buf(1)?, e.buf(2)?, e.buf(3)?, e.buf(4)?);
                let dc = e.i64c(d as i64);
                e.for_range(e.begin, e.end, |r| {
                    let base = e.mul(r, dc)?;
                    let ss = e.var_f32(0.0)?;
                    e.for_range(e.i64c(0), dc, |j| {
                        let i = e.add(base, j)?;
                        let v = e.fadd(e.load_f32(a, i)?, e.load_f32(b, i)?)?;
                        e.store_f32(s, i, v)?;
                        e.set(ss, e.fma_reduce(v, v, e.get(ss)?)?)
                    })?;
                    normalize_row(e, [s, w, y], base, d, eps, e.get(ss)?)
                })?;
            }
            OpKernel::Rope { heads, head_dim, n_rot, theta, neox, scaled } => {
                if n_rot % 2 != 0 || n_rot > head_dim {
                    return Err(CodegenError::Llvm(format!("rope n_rot {n_rot} for head dim {head_dim}")));
                }
                let half = n_rot / 2;
                let freqs: Vec<f64> = (0..half).map(|i| (theta as f64).powf(-2.0 * i as f64 / n_rot as f64)).collect();
                let fr = e.const_f64_array(&format!("{}_freqs", self.symbol()), &freqs);
                let (x, pos) = (e.buf(0)?, e.buf(1)?);
                let (factors, y) = if scaled { (Some(e.buf(2)?), e.buf(3)?) } else { (None, e.buf(2)?) };
                let row = e.i64c((heads * head_dim) as i64);
                let f64t = e.ctx.f64_type();
                e.for_range(e.begin, e.end, |r| {
                    let p = e.load_i32_as_i64(pos, r)?;
                    let pf = e.b.build_signed_int_to_float(p, f64t, "p")?;
                    let base = e.mul(r, row)?;
                    e.for_range(e.i64c(0), e.i64c(half as i64), |i| {
                        let fp = unsafe { e.b.build_in_bounds_gep(f64t, fr, &[i], "fp")? };
                        let mut freq = e.b.build_load(f64t, fp, "freq")?.into_float_value();
                        if let Some(fac) = factors {
                            let fac = e.b.build_float_ext(e.load_f32(fac, i)?, f64t, "factor")?;
                            freq = e.b.build_float_div(freq, fac, "freq_scaled")?;
                        }
                        let angle = e.b.build_float_mul(pf, freq, "angle")?;
                        let cos = e.b.build_float_trunc(e.intrinsic_f64("llvm.cos", angle)?, e.f32t(), "cos")?;
                        let sin = e.b.build_float_trunc(e.intrinsic_f64("llvm.sin", angle)?, e.f32t(), "sin")?;
                        let (i0, i1) = if neox {
                            (i, e.add(i, e.i64c(half as i64))?)
                        } else {
                            let two_i = e.mul(i, e.i64c(2))?;
                            (two_i, e.add(two_i, e.i64c(1))?)
                        };
                        e.for_range(e.i64c(0), e.i64c(heads as i64), |h| {
                            let hb = e.add(base, e.mul(h, e.i64c(head_dim as i64))?)?;
                            let (a, b) = (e.add(hb, i0)?, e.add(hb, i1)?);
                            let (x0, x1) = (e.load_f32(x, a)?, e.load_f32(x, b)?);
                            e.store_f32(y, a, e.fsub(e.fmul(x0, cos)?, e.fmul(x1, sin)?)?)?;
                            e.store_f32(y, b, e.fadd(e.fmul(x0, sin)?, e.fmul(x1, cos)?)?)
                        })
                    })?;
                    // Dimensions past n_rot pass through unrotated.
                    e.for_range(e.i64c(0), e.i64c(heads as i64), |h| {
                        let hb = e.add(base, e.mul(h, e.i64c(head_dim as i64))?)?;
                        e.for_range(e.i64c(n_rot as i64), e.i64c(head_dim as i64), |j| {
                            let a = e.add(hb, j)?;
                            e.store_f32(y, a, e.load_f32(x, a)?)
                        })
                    })
                })?;
            }
            OpKernel::AppendKv { row } => {
                let (src, cache) = (e.buf(0)?, e.buf(1)?);
                let past = e.dim(0)?;
                let rc = e.i64c(row as i64);
                e.for_range(e.begin, e.end, |r| {
                    let from = e.mul(r, rc)?;
                    let to = e.mul(e.add(past, r)?, rc)?;
                    e.for_range(e.i64c(0), rc, |j| e.store_f32(cache, e.add(to, j)?, e.load_f32(src, e.add(from, j)?)?))
                })?;
            }
            OpKernel::SliceRows { row } => {
                let (src, dst) = (e.buf(0)?, e.buf(1)?);
                let start = e.dim(0)?;
                let rc = e.i64c(row as i64);
                e.for_range(e.begin, e.end, |r| {
                    let from = e.mul(e.add(start, r)?, rc)?;
                    let to = e.mul(r, rc)?;
                    e.for_range(e.i64c(0), rc, |j| e.store_f32(dst, e.add(to, j)?, e.load_f32(src, e.add(from, j)?)?))
                })?;
            }
            OpKernel::Attention { q_heads, kv_heads, head_dim, scale, window } => {
                if kv_heads == 0 || q_heads % kv_heads != 0 {
                    return Err(CodegenError::Llvm(format!("attention {q_heads} heads over {kv_heads} kv heads")));
                }
                let (q, kc, vc, out) = (e.buf(0)?, e.buf(1)?, e.buf(2)?, e.buf(3)?);
                let past = e.dim(1)?;
                let a = Attend::new(e, q, kc, vc, kv_heads, head_dim, scale)?;
                e.for_range(e.begin, e.end, |it| {
                    let i = e.div(it, e.i64c(q_heads as i64))?;
                    let h = e.rem(it, e.i64c(q_heads as i64))?;
                    let kh = e.div(h, e.i64c((q_heads / kv_heads) as i64))?;
                    let qbase = e.mul(it, e.i64c(head_dim as i64))?; // (i * q_heads + h) * head_dim
                    let visible = e.add(e.add(past, i)?, e.i64c(1))?;
                    // A window starts the key loop at visible − window: older KV is never read.
                    let first = if window > 0 {
                        e.imax(e.isub(visible, e.i64c(window as i64))?, e.i64c(0))?
                    } else {
                        e.i64c(0)
                    };
                    a.start(e)?;
                    a.keys(e, qbase, kh, first, visible)?;
                    a.finish(e, out, qbase)
                })?;
            }
            OpKernel::FlexPattern { .. }
            | OpKernel::FlexAttention { .. }
            | OpKernel::CoreKeep { .. }
            | OpKernel::CoreThresholds { .. }
            | OpKernel::CoreSelect { .. }
            | OpKernel::CoreGather { .. }
            | OpKernel::CoreExpand { .. } => {
                return Err(CodegenError::InvalidSpec(format!("{} is not emitted by kernels::ops", self.symbol())))
            }
        }
        Ok(())
    }
}

/// `y[base..base+d] = x[base..base+d] / sqrt(sum_sq / d + eps) * w[..d]`: the second half of an RMSNorm
/// row, once the row's sum of squares is known.
fn normalize_row<'ctx>(
    e: &Emitter<'_, 'ctx>,
    [x, w, y]: [PointerValue<'ctx>; 3],
    base: IntValue<'ctx>,
    d: usize,
    eps: f32,
    sum_sq: FloatValue<'ctx>,
) -> R<()> {
    let mean = e.fdiv(sum_sq, e.f32c(d as f32))?;
    let inv = e.fdiv(e.f32c(1.0), e.sqrt(e.fadd(mean, e.f32c(eps))?)?)?;
    e.for_range(e.i64c(0), e.i64c(d as i64), |j| {
        let i = e.add(base, j)?;
        let v = e.fmul(e.fmul(e.load_f32(x, i)?, inv)?, e.load_f32(w, j)?)?;
        e.store_f32(y, i, v)
    })
}
