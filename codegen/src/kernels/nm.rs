//! Generated N:M-sparse `linear` kernels: `y = x · Wᵀ` with `W` an [`NmSparse`] matrix (in every group
//! of M consecutive elements of a row, N kept; per 32-element block the dense block's scale(/min), the
//! kept codes and their positions; see `kiln_ir::sparse::nm`).
//!
//! One kernel per (weight dtype, N:M, `k`), with the dense linear ABI
//! `fn(w, x, y, m: i64, n: i64, row_begin: i64, row_end: i64)`: `w` is the compact rows
//! (`nm_row_bytes` each), `x` `[m, k]` and `y` `[m, n]` f32 row-major; the call writes `y[i][r]` for every
//! `i < m` and `r` in `row_begin..row_end`, and nothing else.
//!
//! ```text
//! expand(block) (prefill): 32 weights as 4 <8 x float>, dropped ones 0
//!   vals[K] = dequant(kept codes)                     // one vector op per step, K = 32·N/M
//!   pos[K]  = position fields
//!   chunk c lane l (column j = 8c + l, group g = j / M):
//!     w = 0; for s in 0..N: e = g·N + s; w = pos[e] == j mod M ? vals[e] : w    // shuffles + selects
//! decode (m < 8):   for r: for each tile of ≤ 4 x rows: for each block b: for each run of 8 kept weights v:
//!                     xg = x[t][32b + base + pos] (M constant shuffles of the x span, merged by pos == j)
//!                     acc[t] += v · xg                // N/M of the dense FMAs
//! prefill (m ≥ 8):  for r: buf = expand(every block of row r) (k floats on the stack, once);
//!                   for each tile of ≤ 8 x rows: acc[t][c] += buf[32b + 8c..]·x[t][32b + 8c..]
//! ```
//!
//! Decode does N/M of the dense FMAs but pays M shuffles and M − 1 selects per 8 kept weights and x row
//! to gather x; prefill's expanded row costs as many FMAs as the dense kernel, which shares x loads
//! across 4 rows where this kernel cannot. The weight bytes read are the compact form's. (An earlier
//! decode path expanded the weights in registers, as prefill does; on this machine neither was
//! measurably faster than the other, both slower than dense: `docs/sparsity.md`.)
//!
//! The kernels stay in bounds for any bytes of the right length; [`run_nm_linear`] validates the
//! weights and buffer sizes before a call.

use super::linear::{
    defined_kernel, emit_split_on_m, emit_x_tiles, store_sums, tail_accumulators, Kb, LANES, R, TILE_M,
};
use super::sparse::check_linear_buffers;
use crate::CodegenError;
use inkwell::context::Context;
use inkwell::module::Module;
use inkwell::types::BasicTypeEnum;
use inkwell::values::{BasicValue, FunctionValue, IntValue, PointerValue, VectorValue};
use inkwell::IntPredicate;
use kiln_ir::sparse::nm::{nm_block_bytes, nm_code_bits, nm_header_bytes, nm_row_bytes, NM_BLOCK};
use kiln_ir::sparse::{NmPattern, NmSparse, NM_DTYPES};
use kiln_ir::DType;
use std::ops::Range;

/// An N:M `linear` kernel to generate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct NmLinearKernelSpec {
    pub dtype: DType,
    pub pattern: NmPattern,
    pub k: usize,
}

/// The generated function's type: the dense linear ABI `(w, x, y, m, n, row_begin, row_end)`.
pub type NmLinearKernelFn = super::linear::LinearKernelFn;

/// x rows per tile of the prefill path (weights come from the stack buffer in L1).
const PANEL_TILE_M: usize = 8;
/// Largest `k` whose expanded row (`4k` bytes) the prefill path keeps on the stack.
const PANEL_MAX_K: usize = 16384;

impl NmLinearKernelSpec {
    pub fn new(dtype: DType, pattern: NmPattern, k: usize) -> Self {
        NmLinearKernelSpec { dtype, pattern, k }
    }

    /// The kernel's symbol, e.g. `kiln_nm_linear_q4_1_2of4_k576`.
    pub fn symbol(&self) -> String {
        format!("kiln_nm_linear_{}_{}of{}_k{}", self.dtype.name(), self.pattern.keep, self.pattern.group, self.k)
    }

    /// Checks that a kernel can be generated for this spec.
    pub fn validate(&self) -> Result<(), CodegenError> {
        if !NM_DTYPES.contains(&self.dtype) {
            return Err(CodegenError::UnsupportedDType { kernel: "N:M linear", dtype: self.dtype });
        }
        NmPattern::new(self.pattern.keep, self.pattern.group)
            .map_err(|e| CodegenError::InvalidSpec(format!("N:M linear: {e}")))?;
        if self.k == 0 || !self.k.is_multiple_of(NM_BLOCK) || self.k > (i32::MAX as usize) / 4 {
            return Err(CodegenError::InvalidSpec(format!(
                "N:M linear {}: k = {} is not a positive multiple of {NM_BLOCK} (or is too large)",
                self.dtype, self.k
            )));
        }
        Ok(())
    }

    fn row_bytes(&self) -> usize {
        nm_row_bytes(self.dtype, self.pattern, self.k)
    }
}

/// Emits the kernel for `spec` into `module` (or returns it if already there). Only built, not
/// optimized: run [`crate::llvm::optimize`] on the module.
pub fn emit_nm_linear<'ctx>(
    ctx: &'ctx Context,
    module: &Module<'ctx>,
    spec: &NmLinearKernelSpec,
) -> Result<FunctionValue<'ctx>, CodegenError> {
    spec.validate()?;
    let name = spec.symbol();
    if let Some(f) = defined_kernel(module, &name)? {
        return Ok(f);
    }
    let kb = Kb::new(ctx, module, &name, false)?;
    let (a, rows) = Args::from_params(&kb);
    if spec.k <= PANEL_MAX_K {
        emit_split_on_m(&kb, a.m, || emit_panel(&kb, spec, a, rows), || emit_direct(&kb, spec, a, rows))?;
    } else {
        emit_direct(&kb, spec, a, rows)?;
    }
    kb.b.build_return(None)?;
    kb.verified(&name)
}

/// The linear ABI's buffers and sizes (shared with the bitmap kernels).
#[derive(Clone, Copy)]
pub(super) struct Args<'ctx> {
    pub(super) w: PointerValue<'ctx>,
    pub(super) x: PointerValue<'ctx>,
    pub(super) y: PointerValue<'ctx>,
    pub(super) m: IntValue<'ctx>,
    pub(super) n: IntValue<'ctx>,
}

impl<'ctx> Args<'ctx> {
    /// The buffers and sizes of `kb`'s kernel (declared with the linear ABI by [`Kb::new`]), and its
    /// output row range `(row_begin, row_end)`.
    pub(super) fn from_params(kb: &Kb<'_, 'ctx>) -> (Self, (IntValue<'ctx>, IntValue<'ctx>)) {
        let p = |i: u32| kb.func.get_nth_param(i).expect("7 params");
        let a = Args {
            w: p(0).into_pointer_value(),
            x: p(1).into_pointer_value(),
            y: p(2).into_pointer_value(),
            m: p(3).into_int_value(),
            n: p(4).into_int_value(),
        };
        (a, (p(5).into_int_value(), p(6).into_int_value()))
    }
}

/// `<len x i32>` constant.
pub(super) fn i32_consts<'ctx>(kb: &Kb<'_, 'ctx>, v: impl IntoIterator<Item = usize>) -> VectorValue<'ctx> {
    let vals: Vec<_> = v.into_iter().map(|x| kb.i32t.const_int(x as u64, false)).collect();
    inkwell::types::VectorType::const_vector(&vals)
}

/// `len` packed fields of `bits` (2, 4 or 8) at `p`, field e in byte e·bits/8 from the low bits up, as
/// `<len x i32>`.
fn fields<'ctx>(kb: &Kb<'_, 'ctx>, p: PointerValue<'ctx>, len: usize, bits: usize) -> R<VectorValue<'ctx>> {
    let per = 8 / bits;
    let nbytes = len / per;
    let bytes = kb.load(kb.i8t.vec_type(nbytes as u32).into(), p, 1)?.into_vector_value();
    let wide = kb.b.build_int_z_extend(bytes, kb.i32t.vec_type(nbytes as u32), "bytes")?;
    if per == 1 {
        return Ok(wide);
    }
    let spread = kb.b.build_shuffle_vector(
        wide,
        wide.get_type().get_poison(),
        i32_consts(kb, (0..len).map(|e| e / per)),
        "spread",
    )?;
    let shifted = kb.b.build_right_shift(spread, i32_consts(kb, (0..len).map(|e| bits * (e % per))), false, "shr")?;
    let mask = i32_consts(kb, std::iter::repeat_n((1 << bits) - 1, len));
    Ok(kb.b.build_and(shifted, mask, "field")?)
}

/// The f16 at `p`, widened and broadcast to `<len x float>`.
pub(super) fn splat_f16<'ctx>(kb: &Kb<'_, 'ctx>, p: PointerValue<'ctx>, len: usize) -> R<VectorValue<'ctx>> {
    let h = kb.load(kb.i16t.into(), p, 1)?;
    let h = kb.b.build_bit_cast(h, kb.ctx.f16_type(), "h")?.into_float_value();
    let f = kb.b.build_float_ext(h, kb.f32t, "scale")?;
    kb.splat(f.into(), kb.f32t.vec_type(len as u32))
}

/// The block at `blk` expanded to its 32 weights: 4 `<8 x float>` chunks, dropped weights 0.
fn expand<'ctx>(kb: &Kb<'_, 'ctx>, spec: &NmLinearKernelSpec, blk: PointerValue<'ctx>) -> R<[VectorValue<'ctx>; 4]> {
    let p = spec.pattern;
    let (vals, pos) = kept_values(kb, spec, blk)?;
    let mut out = Vec::with_capacity(4);
    for c in 0..NM_BLOCK / LANES as usize {
        let cols: Vec<usize> = (0..LANES as usize).map(|l| c * LANES as usize + l).collect();
        let want = i32_consts(kb, cols.iter().map(|j| j % p.group));
        let mut w = kb.v8f32.const_zero();
        for s in 0..p.keep {
            let sel = i32_consts(kb, cols.iter().map(|j| j / p.group * p.keep + s));
            let v = kb.b.build_shuffle_vector(vals, vals.get_type().get_poison(), sel, "v")?;
            let i = kb.b.build_shuffle_vector(pos, pos.get_type().get_poison(), sel, "i")?;
            let eq = kb.b.build_int_compare(IntPredicate::EQ, i, want, "at")?;
            w = kb.b.build_select(eq, v, w, "w")?.into_vector_value();
        }
        out.push(w);
    }
    Ok(out.try_into().expect("4 chunks"))
}

/// The block's K kept weights (dequantized, `<K x float>`) and their positions in their groups
/// (`<K x i32>`), kept element e being slot e mod N of group e div N.
fn kept_values<'ctx>(
    kb: &Kb<'_, 'ctx>,
    spec: &NmLinearKernelSpec,
    blk: PointerValue<'ctx>,
) -> R<(VectorValue<'ctx>, VectorValue<'ctx>)> {
    let p = spec.pattern;
    let kept = p.kept_per_block();
    let (hdr, cbits) = (nm_header_bytes(spec.dtype), nm_code_bits(spec.dtype));
    let vk = kb.f32t.vec_type(kept as u32);
    let codes = kb.byte_gep(blk, hdr)?;
    let vals = match spec.dtype {
        DType::F32 => kb.load(vk.into(), codes, 1)?.into_vector_value(),
        DType::F16 => {
            let h = kb.load(kb.i16t.vec_type(kept as u32).into(), codes, 1)?;
            let h = kb.b.build_bit_cast(h, kb.ctx.f16_type().vec_type(kept as u32), "h")?.into_vector_value();
            kb.b.build_float_ext(h, vk, "f16")?
        }
        DType::Q8_0 => {
            let q = kb.load(kb.i8t.vec_type(kept as u32).into(), codes, 1)?.into_vector_value();
            let q = kb.b.build_signed_int_to_float(q, vk, "q")?;
            kb.b.build_float_mul(q, splat_f16(kb, blk, kept)?, "w")?
        }
        DType::Q4_0 => {
            let q = fields(kb, codes, kept, 4)?;
            let q = kb.b.build_int_sub(q, i32_consts(kb, std::iter::repeat_n(8, kept)), "q8")?;
            let q = kb.b.build_signed_int_to_float(q, vk, "q")?;
            kb.b.build_float_mul(q, splat_f16(kb, blk, kept)?, "w")?
        }
        DType::Q4_1 => {
            let q = fields(kb, codes, kept, 4)?;
            let q = kb.b.build_unsigned_int_to_float(q, vk, "q")?;
            let dq = kb.b.build_float_mul(q, splat_f16(kb, blk, kept)?, "qd")?;
            kb.b.build_float_add(dq, splat_f16(kb, kb.byte_gep(blk, 2)?, kept)?, "w")?
        }
        other => return Err(CodegenError::UnsupportedDType { kernel: "N:M linear", dtype: other }),
    };
    let pos = fields(kb, kb.byte_gep(blk, hdr + kept * cbits / 8)?, kept, p.pos_bits())?;
    Ok((vals, pos))
}

/// Row `r`'s compact bytes.
fn row_ptr<'ctx>(
    kb: &Kb<'_, 'ctx>,
    spec: &NmLinearKernelSpec,
    a: Args<'ctx>,
    r: IntValue<'ctx>,
) -> R<PointerValue<'ctx>> {
    kb.gep(kb.i8t.into(), a.w, kb.b.build_int_nsw_mul(r, kb.i64c(spec.row_bytes() as i64), "roff")?)
}

/// Decode-sized m: each tile of x rows sweeps the row's blocks; per block, the kept weights in runs of 8
/// are multiplied with x gathered at their columns. x at column `base + j` of a run (base = the group's
/// first column, j = 0..M) is a constant shuffle of the x span the run covers, and the M candidates are
/// merged by comparing the positions with j (compares shared by the tile's rows): N/M of the FMAs of a
/// dense row, M shuffles and M − 1 selects per 8 kept weights and x row.
fn emit_direct<'ctx>(
    kb: &Kb<'_, 'ctx>,
    spec: &NmLinearKernelSpec,
    a: Args<'ctx>,
    (rb, re): (IntValue<'ctx>, IntValue<'ctx>),
) -> R<()> {
    let bb = nm_block_bytes(spec.dtype, spec.pattern) as i64;
    let p = spec.pattern;
    let kept = p.kept_per_block();
    let lanes = LANES as usize;
    let runs = kept.div_ceil(lanes);
    let k = kb.i64c(spec.k as i64);
    kb.for_loop(rb, re, kb.i64c(1), "row", |r| {
        let wrow = row_ptr(kb, spec, a, r)?;
        emit_x_tiles(kb, TILE_M, kb.i64c(0), a.m, |i0, t| {
            let nacc = tail_accumulators(t).min(runs.max(1));
            let mut xrows = Vec::with_capacity(t);
            let mut youts = Vec::with_capacity(t);
            for ti in 0..t {
                let i = kb.b.build_int_nsw_add(i0, kb.i64c(ti as i64), "i")?;
                xrows.push(kb.gep(kb.f32t.into(), a.x, kb.b.build_int_nsw_mul(i, k, "xoff")?)?);
                let yoff = kb.b.build_int_nsw_add(kb.b.build_int_nsw_mul(i, a.n, "yoff")?, r, "yoff")?;
                youts.push(kb.gep(kb.f32t.into(), a.y, yoff)?);
            }
            let slots: Vec<PointerValue<'ctx>> =
                (0..t * nacc).map(|_| kb.entry_alloca(kb.v8f32.into())).collect::<R<_>>()?;
            for s in &slots {
                kb.store(*s, kb.v8f32.const_zero().into(), 32)?;
            }
            let load_accs = || -> R<Vec<VectorValue<'ctx>>> {
                slots.iter().map(|s| Ok(kb.load(kb.v8f32.into(), *s, 32)?.into_vector_value())).collect()
            };
            let blocks = kb.i64c((spec.k / NM_BLOCK) as i64);
            kb.for_loop(kb.i64c(0), blocks, kb.i64c(1), "blk", |b| {
                let blk = kb.gep(kb.i8t.into(), wrow, kb.b.build_int_nsw_mul(b, kb.i64c(bb), "boff")?)?;
                let (vals, pos) = kept_values(kb, spec, blk)?;
                let xoff = kb.b.build_int_nsw_mul(b, kb.i64c(NM_BLOCK as i64), "xblk")?;
                let zeros = vals.get_type().const_zero();
                let mut accs = load_accs()?;
                for q in 0..runs {
                    let es: Vec<Option<usize>> =
                        (0..lanes).map(|l| Some(q * lanes + l).filter(|&e| e < kept)).collect();
                    // The x span the run touches: whole chunks from the first group's to the last's.
                    let first = es[0].expect("a run has a first element") / p.keep * p.group;
                    let last = es.iter().flatten().max().expect("non-empty") / p.keep * p.group + p.group - 1;
                    let (lo, hi) = (first / lanes * lanes, (last / lanes + 1) * lanes);
                    let base: Vec<usize> = es.iter().map(|e| e.map_or(lo, |e| e / p.keep * p.group)).collect();
                    let v = kb.b.build_shuffle_vector(
                        vals,
                        zeros,
                        i32_consts(kb, es.iter().map(|e| e.unwrap_or(kept))),
                        "v",
                    )?;
                    let pq = kb.b.build_shuffle_vector(
                        pos,
                        pos.get_type().get_poison(),
                        i32_consts(kb, es.iter().map(|e| e.unwrap_or(0))),
                        "pq",
                    )?;
                    let masks: Vec<_> = (0..p.group - 1)
                        .map(|j| {
                            kb.b.build_int_compare(
                                IntPredicate::EQ,
                                pq,
                                i32_consts(kb, std::iter::repeat_n(j, lanes)),
                                "isj",
                            )
                        })
                        .collect::<Result<_, _>>()?;
                    let span = kb.f32t.vec_type((hi - lo) as u32);
                    for (ti, &xr) in xrows.iter().enumerate() {
                        let xp = kb.gep(kb.f32t.into(), kb.gep(kb.f32t.into(), xr, xoff)?, kb.i64c(lo as i64))?;
                        let xs = kb.load(span.into(), xp, 4)?.into_vector_value();
                        let cand = |j: usize| {
                            let m = i32_consts(kb, base.iter().map(|bs| bs + j - lo));
                            kb.b.build_shuffle_vector(xs, span.get_poison(), m, "xj")
                        };
                        let mut xsel = cand(p.group - 1)?;
                        for j in (0..p.group - 1).rev() {
                            xsel = kb.b.build_select(masks[j], cand(j)?, xsel, "xsel")?.into_vector_value();
                        }
                        let s = ti * nacc + q % nacc;
                        accs[s] = kb.fma(v, xsel, accs[s])?;
                    }
                }
                for (s, v) in slots.iter().zip(&accs) {
                    kb.store(*s, v.as_basic_value_enum(), 32)?;
                }
                Ok(())
            })?;
            let accs = load_accs()?;
            store_sums(kb, &accs, nacc, &youts)?;
            Ok(())
        })
    })
}

/// Prefill-sized m: row `r` expanded once into a `k`-float stack buffer, then every x tile runs an f32
/// loop over it.
fn emit_panel<'ctx>(
    kb: &Kb<'_, 'ctx>,
    spec: &NmLinearKernelSpec,
    a: Args<'ctx>,
    (rb, re): (IntValue<'ctx>, IntValue<'ctx>),
) -> R<()> {
    let buf = kb.entry_alloca(kb.f32t.array_type(spec.k as u32).into())?;
    let bb = nm_block_bytes(spec.dtype, spec.pattern) as i64;
    let blocks = kb.i64c((spec.k / NM_BLOCK) as i64);
    kb.for_loop(rb, re, kb.i64c(1), "prow", |r| {
        let wrow = row_ptr(kb, spec, a, r)?;
        kb.for_loop(kb.i64c(0), blocks, kb.i64c(1), "exp", |b| {
            let blk = kb.gep(kb.i8t.into(), wrow, kb.b.build_int_nsw_mul(b, kb.i64c(bb), "boff")?)?;
            let dst = kb.gep(kb.f32t.into(), buf, kb.b.build_int_nsw_mul(b, kb.i64c(NM_BLOCK as i64), "bo")?)?;
            for (c, v) in expand(kb, spec, blk)?.into_iter().enumerate() {
                kb.store(kb.gep(kb.f32t.into(), dst, kb.i64c((c * LANES as usize) as i64))?, v.into(), 4)?;
            }
            Ok(())
        })?;
        emit_x_tiles(kb, PANEL_TILE_M, kb.i64c(0), a.m, |i0, t| {
            emit_tile(kb, spec.k, a, i0, t, r, &|b| {
                let src = kb.gep(kb.f32t.into(), buf, kb.b.build_int_nsw_mul(b, kb.i64c(NM_BLOCK as i64), "bo")?)?;
                let v8: BasicTypeEnum = kb.v8f32.into();
                let chunk = |c: usize| -> R<VectorValue<'ctx>> {
                    let p = kb.gep(kb.f32t.into(), src, kb.i64c((c * LANES as usize) as i64))?;
                    Ok(kb.load(v8, p, 4)?.into_vector_value())
                };
                Ok([chunk(0)?, chunk(1)?, chunk(2)?, chunk(3)?])
            })
        })
    })
}

/// Row `r` against the `t` x rows from `i0`, over all `k / 32` blocks; `weights(b)` gives block b's 4
/// chunks (called once per block, in order).
pub(super) fn emit_tile<'ctx>(
    kb: &Kb<'_, 'ctx>,
    k: usize,
    a: Args<'ctx>,
    i0: IntValue<'ctx>,
    t: usize,
    r: IntValue<'ctx>,
    weights: &dyn Fn(IntValue<'ctx>) -> R<[VectorValue<'ctx>; 4]>,
) -> R<()> {
    let nacc = tail_accumulators(t);
    let blocks = kb.i64c((k / NM_BLOCK) as i64);
    let k = kb.i64c(k as i64);
    let mut xrows = Vec::with_capacity(t);
    let mut youts = Vec::with_capacity(t);
    for ti in 0..t {
        let i = kb.b.build_int_nsw_add(i0, kb.i64c(ti as i64), "i")?;
        xrows.push(kb.gep(kb.f32t.into(), a.x, kb.b.build_int_nsw_mul(i, k, "xoff")?)?);
        let yoff = kb.b.build_int_nsw_add(kb.b.build_int_nsw_mul(i, a.n, "yoff")?, r, "yoff")?;
        youts.push(kb.gep(kb.f32t.into(), a.y, yoff)?);
    }
    let slots: Vec<PointerValue<'ctx>> = (0..t * nacc).map(|_| kb.entry_alloca(kb.v8f32.into())).collect::<R<_>>()?;
    for s in &slots {
        kb.store(*s, kb.v8f32.const_zero().into(), 32)?;
    }
    let load_accs = || -> R<Vec<VectorValue<'ctx>>> {
        slots.iter().map(|s| Ok(kb.load(kb.v8f32.into(), *s, 32)?.into_vector_value())).collect()
    };
    kb.for_loop(kb.i64c(0), blocks, kb.i64c(1), "blk", |b| {
        let xoff = kb.b.build_int_nsw_mul(b, kb.i64c(NM_BLOCK as i64), "xblk")?;
        let w = weights(b)?;
        let mut accs = load_accs()?;
        for (c, wv) in w.iter().enumerate() {
            for (ti, &xr) in xrows.iter().enumerate() {
                let xp = kb.gep(kb.f32t.into(), xr, xoff)?;
                let xv = kb.gep(kb.f32t.into(), xp, kb.i64c((c * LANES as usize) as i64))?;
                let xv = kb.load(kb.v8f32.into(), xv, 4)?.into_vector_value();
                let s = ti * nacc + c % nacc;
                accs[s] = kb.fma(*wv, xv, accs[s])?;
            }
        }
        for (s, v) in slots.iter().zip(&accs) {
            kb.store(*s, v.as_basic_value_enum(), 32)?;
        }
        Ok(())
    })?;
    let accs = load_accs()?;
    store_sums(kb, &accs, nacc, &youts)?;
    Ok(())
}

/// Calls `kernel` (generated for `spec`) on `w` after checking everything it relies on: `w` is a valid
/// [`NmSparse`] of `spec`'s dtype, pattern and `k`, `x` holds `m · k` floats, `y` `m · n`, and `rows`
/// lies in `0..n`.
pub fn run_nm_linear(
    kernel: NmLinearKernelFn,
    spec: &NmLinearKernelSpec,
    w: &NmSparse,
    x: &[f32],
    y: &mut [f32],
    m: usize,
    rows: Range<usize>,
) -> Result<(), CodegenError> {
    let bad = |what: String| Err(CodegenError::InvalidSpec(format!("N:M linear {}: {what}", spec.symbol())));
    spec.validate()?;
    w.validate().map_err(|e| CodegenError::InvalidSpec(format!("N:M linear {}: {e}", spec.symbol())))?;
    if (w.dtype, w.pattern, w.k) != (spec.dtype, spec.pattern, spec.k) {
        return bad(format!("weights are {} {} with k = {}", w.dtype, w.pattern, w.k));
    }
    if let Err(e) = check_linear_buffers(x, y, m, spec.k, w.n, &rows) {
        return bad(e);
    }
    // SAFETY: `w` holds n rows of the spec's row bytes, x and y have the sizes the ABI reads and
    // writes, and rows are in 0..n.
    unsafe {
        kernel(w.data.as_ptr(), x.as_ptr(), y.as_mut_ptr(), m as i64, w.n as i64, rows.start as i64, rows.end as i64)
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::linear::tests::random_weights;
    use super::super::linear::tests::{with_sparse_and_dense, SparseTestSpec};
    use super::super::linear::LinearKernelSpec;
    use super::*;
    use kiln_ir::sparse::prune_nm;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    impl SparseTestSpec for NmLinearKernelSpec {
        fn emit<'ctx>(&self, ctx: &'ctx Context, module: &Module<'ctx>) -> Result<FunctionValue<'ctx>, CodegenError> {
            emit_nm_linear(ctx, module, self)
        }
        fn sparse_symbol(&self) -> String {
            self.symbol()
        }
        fn dense(&self) -> LinearKernelSpec {
            LinearKernelSpec::new(self.dtype, self.k)
        }
    }

    const SENTINEL: u32 = 0x7fc0_dead;

    /// Every N:M pattern and dtype, odd n, both paths (m < 8 and ≥ 8, partial tiles), row sub-ranges:
    /// against dequantize + f64 dot of the pruned matrix (1e-4 of Σ|w·x|), rows outside the range keep
    /// their sentinel; with N = M (nothing dropped) against the dense kernel on the unpruned weights.
    #[test]
    fn nm_kernels_match_the_dequantized_pruned_matrix() {
        let mut rng = StdRng::seed_from_u64(21);
        let mut specs = Vec::new();
        for dtype in NM_DTYPES {
            for (keep, group) in [(1, 4), (2, 4), (3, 4), (4, 4), (1, 8), (2, 8), (5, 8), (8, 8)] {
                let k = [32, 96, 160][rng.random_range(0..3)];
                specs.push(NmLinearKernelSpec::new(dtype, NmPattern::new(keep, group).unwrap(), k));
            }
        }
        with_sparse_and_dense(&specs, |fns| {
            for (spec, &(nm, dense)) in specs.iter().zip(fns) {
                let (dtype, k) = (spec.dtype, spec.k);
                for n in [1usize, 7, 33] {
                    let dense_w = random_weights(&mut rng, dtype, n, k);
                    let norms: Vec<f32> = (0..k).map(|_| rng.random_range(0.0f32..2.0)).collect();
                    let w = prune_nm(dtype, spec.pattern, n, k, &dense_w, Some(&norms)).unwrap();
                    let wf = w.dequantize().unwrap();
                    for m in [1usize, 2, 3, 5, 8, 9, 19] {
                        let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
                        let (lo, hi) = if n > 2 && rng.random_bool(0.5) { (1, n - 1) } else { (0, n) };
                        let mut y = vec![f32::from_bits(SENTINEL); m * n];
                        run_nm_linear(nm, spec, &w, &x, &mut y, m, lo..hi).unwrap();
                        for i in 0..m {
                            for r in 0..n {
                                let got = y[i * n + r];
                                if !(lo..hi).contains(&r) {
                                    assert_eq!(got.to_bits(), SENTINEL, "{} row {r} outside {lo}..{hi}", spec.symbol());
                                    continue;
                                }
                                let (mut want, mut mag) = (0f64, 0f64);
                                for j in 0..k {
                                    let p = f64::from(wf[r * k + j]) * f64::from(x[i * k + j]);
                                    want += p;
                                    mag += p.abs();
                                }
                                assert!(
                                    (f64::from(got) - want).abs() <= 1e-4 * mag + 1e-6,
                                    "{} n={n} m={m} [{i}][{r}]: {got} vs {want}",
                                    spec.symbol()
                                );
                            }
                        }
                        if spec.pattern.keep == spec.pattern.group {
                            let mut yd = vec![0f32; m * n];
                            // SAFETY: dense_w is n rows of k, x m · k, yd m · n.
                            unsafe {
                                dense(dense_w.as_ptr(), x.as_ptr(), yd.as_mut_ptr(), m as i64, n as i64, 0, n as i64)
                            };
                            for i in 0..m {
                                for r in lo..hi {
                                    let (a, b) = (y[i * n + r], yd[i * n + r]);
                                    let mag: f32 = (0..k).map(|j| (wf[r * k + j] * x[i * k + j]).abs()).sum();
                                    assert!(
                                        (a - b).abs() <= 1e-5 * mag + 1e-6,
                                        "{} dense [{i}][{r}]: {a} vs {b}",
                                        spec.symbol()
                                    );
                                }
                            }
                        }
                    }
                }
            }
        });
    }

    #[test]
    fn bad_calls_are_errors_and_the_kernel_is_not_called() {
        let p = NmPattern::new(2, 4).unwrap();
        let spec = NmLinearKernelSpec::new(DType::Q4_1, p, 64);
        // A kernel that must never run.
        unsafe extern "C" fn boom(_: *const u8, _: *const f32, _: *mut f32, _: i64, _: i64, _: i64, _: i64) {
            panic!("kernel called");
        }
        let mut rng = StdRng::seed_from_u64(22);
        // Valid weights of another k.
        let other = prune_nm(DType::Q4_1, p, 3, 32, &random_weights(&mut rng, DType::Q4_1, 3, 32), None).unwrap();
        let mut y = vec![0f32; 3];
        let err = run_nm_linear(boom, &spec, &other, &[0.0; 64], &mut y, 1, 0..3).unwrap_err().to_string();
        assert!(err.contains("weights are q4_1 2:4 with k = 32"), "{err}");
        let dense_w = random_weights(&mut rng, DType::Q4_1, 3, 64);
        let w = prune_nm(DType::Q4_1, p, 3, 64, &dense_w, None).unwrap();
        let x = vec![0f32; 2 * 64];
        let mut y = vec![0f32; 2 * 3];
        type Case = (&'static str, Box<dyn Fn(&mut NmSparse)>, usize, Range<usize>);
        let cases: Vec<Case> = vec![
            ("data bytes", Box::new(|w| w.data.truncate(5)), 2, 0..3),
            ("data bytes", Box::new(|w| w.pattern = NmPattern::new(1, 4).unwrap()), 2, 0..3),
            ("x has", Box::new(|_| {}), 3, 0..3),
            ("rows", Box::new(|_| {}), 2, 1..4),
        ];
        for (want, mutate, m, rows) in cases {
            let mut w = w.clone();
            mutate(&mut w);
            let mut y2 = vec![0f32; m * w.n.max(1)];
            let yy = if m == 2 && w.n == 3 { &mut y } else { &mut y2 };
            let err = run_nm_linear(boom, &spec, &w, &x, yy, m, rows).unwrap_err().to_string();
            assert!(err.contains(want), "want {want:?} in {err:?}");
        }
        assert!(NmLinearKernelSpec::new(DType::Q5_0, p, 64).validate().is_err());
        assert!(NmLinearKernelSpec::new(DType::F32, p, 48).validate().is_err());
        assert!(NmLinearKernelSpec::new(DType::F32, NmPattern { keep: 3, group: 2 }, 64).validate().is_err());
    }
}

#[cfg(test)]
mod bench {
    use super::*;

    /// `cargo test -p kiln-codegen bench_nm_linear -- --ignored --nocapture`: N:M / dense time on
    /// SmolLM2's Q4_1 shapes (what `kiln bench --kernels` records), printed, not asserted.
    #[test]
    #[ignore]
    fn bench_nm_linear() {
        let shapes = [(DType::Q4_1, 576, 1536), (DType::Q4_1, 1536, 576), (DType::Q4_1, 576, 576)];
        let pats: Vec<NmPattern> =
            [(1, 4), (2, 4), (3, 4), (2, 8)].iter().map(|&(n, m)| NmPattern::new(n, m).unwrap()).collect();
        let rows =
            crate::kernels::measure::measure_nm(&shapes, &pats, &[1, 64], 3, std::time::Duration::from_millis(40))
                .unwrap();
        for r in rows {
            println!(
                "{} {}→{} m={:<2} {} N:M/dense {:.2} ({:.1} → {:.1} µs)",
                r.dtype,
                r.k,
                r.n,
                r.m,
                r.pattern,
                r.ratio,
                r.times.0 * 1e6,
                r.times.1 * 1e6
            );
        }
    }
}
