//! Generated `linear` kernels: `y = x · Wᵀ` with the weights `W` kept in their GGUF storage format.
//!
//! One kernel per (weight dtype, `k`), shape-specialised on `k`, with the C ABI
//! `fn(w: *const u8, x: *const f32, y: *mut f32, m: i64, n: i64, row_begin: i64, row_end: i64)`:
//! `W` is `[n, k]` (row `r` at `w + r * row_bytes(k)`, each row whole GGUF blocks), `x` is `[m, k]` f32
//! and `y` is `[m, n]` f32, both row-major; the call computes `y[i][r] = Σ_j W[r][j] · x[i][j]` for every
//! `i < m` and `r` in `row_begin..row_end` and writes nothing else (the runtime splits rows over threads).
//!
//! Weights are dequantized in registers, a chunk of 8 at a time, and never written back: memory traffic
//! is the quantized bytes. Activations stay f32 and so does all arithmetic (no int8 dot products), so
//! the result matches `dequantize` + an f32 dot product up to rounding.
//!
//! Structure of the generated code (all trip counts over `k` are constants):
//!
//! ```text
//! for r0 in (row_begin..row_end).step_by(ROW_CHUNK)          // weight rows that stay in L2
//!   for each tile of T x-rows (T = 4, then one tail tile of 1..3)
//!     for each group of R weight rows in r0..r0+ROW_CHUNK (then single rows)
//!       acc[T][R][A] = 0                                    // <8 x float> accumulators
//!       for b in 0..k/block_elems                           // constant trip count
//!         prefetch the same block of a row group ~16 KiB ahead
//!         [K-quants: for each group of sub-blocks in b]     // constant trip count
//!         for each 8-element chunk c of the block (group)
//!           w[r] = dequant(chunk c of row r)  for each of the R rows   // once, reused by all T x-rows
//!           for t in T: xv = x[t][chunk]; acc[t][r][c % A] = fmuladd(w[r], xv, acc[t][r][c % A])
//!       y[t][r] = reduce.fadd(Σ_a acc[t][r][a])              // horizontal sum once per output
//! ```
//!
//! That is the decode path (and any `m < PANEL_MIN_M`). With more x rows (prefill), re-dequantizing each
//! weight chunk for every tile of 4 x rows would cost more than the FMAs it feeds, so the kernel switches
//! (on `m`, at run time) to the panel path:
//!
//! ```text
//! for each block of M_BLOCK x rows                          // their rows stay in L2
//!   for each panel of P weight rows (P·k·4 bytes ≈ 32 KiB)   // stays in L1
//!     dequantize the panel's rows into an f32 stack buffer   // once per block, not once per x tile
//!     run the loop nest above on the f32 panel, tiles of 2 x rows × 4 panel rows
//! ```
//!
//! whose inner loop is only vector loads and FMAs (6 loads feed 8 FMAs, the weights from L1).
//!
//! `A` independent accumulators per output hide FMA latency when `T * R` alone is too small; `T * R * A`
//! stays at 4 to 8 so accumulators, dequantized weights and scales fit in the 16 AVX2 registers. A
//! dequantized chunk costs a `vpmovzxbd`, a mask or shift, a conversion and one FMA (`q·d + min` folds
//! into `fma(q, d, min)`), and then feeds `T` FMAs: prefill (`m ≥ 4`) is FMA bound, decode (`m = 1`)
//! bound by the unpacking, or by memory once the weights miss the caches.
//!
//! The offset formats' identity `Σ(q·d + min)·x = d·Σq·x + min·Σx` is not used: with f32 activations it
//! saves at most one FMA per chunk at `m = 1` (and costs extra per-block FMAs for `m ≥ 2`); it pays off
//! with integer dot products on quantized activations, which this kernel does not do.

use crate::CodegenError;
use inkwell::attributes::{Attribute, AttributeLoc};
use inkwell::builder::Builder;
use inkwell::context::Context;
use inkwell::intrinsics::Intrinsic;
use inkwell::module::{Linkage, Module};
use inkwell::types::{BasicType, BasicTypeEnum, FloatType, IntType, VectorType};
use inkwell::values::{
    BasicMetadataValueEnum, BasicValue, BasicValueEnum, FloatValue, FunctionValue, InstructionValue, IntValue,
    PointerValue, VectorValue,
};
use inkwell::{AddressSpace, IntPredicate};
use kiln_ir::DType;
use std::collections::HashMap;

/// A `linear` kernel to generate: weights of `dtype`, rows of `k` elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct LinearKernelSpec {
    pub dtype: DType,
    pub k: usize,
    /// Adds a residual `r` (`[m, n]` f32, the 8th parameter) to the result as it is stored: the
    /// elementwise add after a projection, fused into its producer.
    #[serde(default)]
    pub residual: bool,
}

/// The generated function's type: `(w, x, y, m, n, row_begin, row_end)`, see the module docs.
pub type LinearKernelFn = unsafe extern "C" fn(*const u8, *const f32, *mut f32, i64, i64, i64, i64);
/// With a residual: `(w, x, y, m, n, row_begin, row_end, r)`, storing `y = x · Wᵀ + r`.
pub type LinearResidualKernelFn = unsafe extern "C" fn(*const u8, *const f32, *mut f32, i64, i64, i64, i64, *const f32);

impl LinearKernelSpec {
    /// The weight dtypes [`emit_linear`] generates code for.
    pub const DTYPES: [DType; 11] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::Q4_0,
        DType::Q4_1,
        DType::Q5_0,
        DType::Q5_1,
        DType::Q8_0,
        DType::Q4K,
        DType::Q5K,
        DType::Q6K,
    ];

    pub fn new(dtype: DType, k: usize) -> Self {
        LinearKernelSpec { dtype, k, residual: false }
    }

    /// The kernel's symbol, e.g. `kiln_linear_q4_1_k576` (`…_res` with a residual).
    pub fn symbol(&self) -> String {
        format!("kiln_linear_{}_k{}{}", self.dtype.name(), self.k, if self.residual { "_res" } else { "" })
    }

    /// Bytes per weight row, or `None` when `k` is not a whole number of blocks.
    pub fn row_bytes(&self) -> Option<usize> {
        self.dtype.row_bytes(self.k)
    }

    /// Checks that a kernel can be generated for this spec.
    pub fn validate(&self) -> Result<(), CodegenError> {
        if !Self::DTYPES.contains(&self.dtype) {
            return Err(CodegenError::UnsupportedDType { kernel: "linear", dtype: self.dtype });
        }
        let bs = self.dtype.block_size();
        let row_bytes = self.row_bytes().filter(|_| self.k > 0).ok_or_else(|| {
            CodegenError::InvalidSpec(format!(
                "linear {}: k = {} is not a positive multiple of the {bs}-element block",
                self.dtype, self.k
            ))
        })?;
        // Offsets are computed in i64; keep every row and x row addressable with room to spare.
        if row_bytes > i32::MAX as usize || self.k > (i32::MAX as usize) / 4 {
            return Err(CodegenError::InvalidSpec(format!("linear {}: k = {} is too large", self.dtype, self.k)));
        }
        Ok(())
    }
}

/// Lanes per vector: one AVX2 register of f32. On AVX-512 machines LLVM still uses 256-bit registers
/// (fine for a first version); on SSE-only ones it splits each vector in two.
pub(crate) const LANES: u32 = 8;
/// x rows per tile: each dequantized weight chunk is reused by this many FMAs.
pub(crate) const TILE_M: usize = 4;
/// Weight bytes per row chunk: the rows every x tile sweeps before moving on, sized to stay in L2 so
/// prefill reads each weight from memory once, not once per x tile.
const ROW_CHUNK_BYTES: usize = 64 << 10;
/// From this many x rows on, weights are dequantized into f32 panels first (see [`emit_panels`]).
pub(crate) const PANEL_MIN_M: usize = 8;
/// Bytes of dequantized weights per panel: small enough to stay in L1/L2 while every x row sweeps it.
const PANEL_BYTES: usize = 32 << 10;
/// x rows per block of the panel path: their f32 rows stay in L2 while the panels go by.
const M_BLOCK: usize = 32;
/// Minimum software-prefetch distance for weights, in bytes (see [`prefetch_distance`]).
const PREFETCH_MIN_BYTES: usize = 16384;

/// Register tiling for a tile of `t` x rows: (weight rows per step R, accumulators per output A), at
/// most 8 accumulators; wider tiles spill. For `t = 1`, llvm-mca (Zen 3) puts 4 rows × 1, 2 × 2 and
/// 1 × 4 within a few percent of each other: decode is bound by unpacking, not FMA latency.
fn tile_shape(t: usize) -> (usize, usize) {
    match t {
        4 => (2, 1),
        3 => (2, 1),
        2 => (2, 2),
        _ => (4, 1),
    }
}

/// How far ahead of the rows being read to prefetch weights, in bytes: a whole number of row groups
/// (so it lands on the same block of a later row), at least `PREFETCH_MIN_BYTES`. The hardware
/// prefetchers alone leave decode of a matrix that misses L3 at a third of DRAM bandwidth: each group
/// reads R short rows in parallel, which they do not follow far enough ahead.
fn prefetch_distance(rows: usize, row_bytes: usize) -> usize {
    let group = rows * row_bytes;
    PREFETCH_MIN_BYTES.div_ceil(group) * group
}

/// x rows per tile of the panel path, and its register tiling: (weight rows, accumulators per output).
const PANEL_TILE_M: usize = 2;
fn panel_tile_shape(t: usize) -> (usize, usize) {
    match t {
        2 => (4, 1),
        _ => (4, 2),
    }
}

/// Accumulators per output for the single-row remainder of a row range.
/// Stores at `youts[t]` the sum of output t's `nacc` vector accumulators `accs[t·nacc..(t+1)·nacc]`.
pub(crate) fn store_sums<'ctx>(
    kb: &Kb<'_, 'ctx>,
    accs: &[VectorValue<'ctx>],
    nacc: usize,
    youts: &[PointerValue<'ctx>],
) -> R<()> {
    for (ti, &yp) in youts.iter().enumerate() {
        let mut v = accs[ti * nacc];
        for s in 1..nacc {
            v = kb.b.build_float_add(v, accs[ti * nacc + s], "accsum")?;
        }
        kb.store(yp, kb.reduce_add(v)?.into(), 4)?;
    }
    Ok(())
}

pub(crate) fn tail_accumulators(t: usize) -> usize {
    (8 / t).clamp(1, 4)
}

/// Emits the `linear` kernel for `spec` into `module` (or returns it if the module already has it) and
/// returns the function. It is only built, not optimized: run [`crate::llvm::optimize`] on the module.
pub fn emit_linear<'ctx>(
    ctx: &'ctx Context,
    module: &Module<'ctx>,
    spec: &LinearKernelSpec,
) -> Result<FunctionValue<'ctx>, CodegenError> {
    spec.validate()?;
    let name = spec.symbol();
    if let Some(f) = defined_kernel(module, &name)? {
        return Ok(f);
    }
    let kb = Kb::new(ctx, module, &name, spec.residual)?;
    let fmt = Format::new(spec.dtype, spec.k);
    emit_body(&kb, &fmt, spec)?;
    kb.verified(&name)
}

/// The kernel `name` if `module` already defines it (kernels are shared by equal specs); an error if it
/// is only declared there.
pub(crate) fn defined_kernel<'ctx>(module: &Module<'ctx>, name: &str) -> R<Option<FunctionValue<'ctx>>> {
    match module.get_function(name) {
        Some(f) if f.count_basic_blocks() > 0 => Ok(Some(f)),
        Some(_) => Err(CodegenError::Llvm(format!("{name} is already declared in the module but not defined"))),
        None => Ok(None),
    }
}

// ---------------------------------------------------------------------------------------------------
// Loop nest.

fn emit_body<'ctx>(kb: &Kb<'_, 'ctx>, fmt: &Format, spec: &LinearKernelSpec) -> R<()> {
    let p = |i: u32| kb.func.get_nth_param(i).expect("7 params");
    let res = spec.residual.then(|| p(7).into_pointer_value());
    let bufs = (p(0).into_pointer_value(), p(1).into_pointer_value(), p(2).into_pointer_value(), res);
    let (m, n, row_begin, row_end) =
        (p(3).into_int_value(), p(4).into_int_value(), p(5).into_int_value(), p(6).into_int_value());
    if spec.dtype == DType::F32 {
        emit_direct(kb, fmt, spec, bufs, (m, n, row_begin, row_end))?;
    } else {
        // Prefill-sized m: dequantize weight panels once and run an f32 kernel over them; small m
        // (decode): dequantize in registers as the weights stream by.
        emit_split_on_m(
            kb,
            m,
            || emit_panels(kb, fmt, spec, bufs, (m, n, row_begin, row_end)),
            || emit_direct(kb, fmt, spec, bufs, (m, n, row_begin, row_end)),
        )?;
    }
    kb.b.build_return(None)?;
    Ok(())
}

/// `if m >= PANEL_MIN_M { panel() } else { direct() }`, leaving the builder after both.
pub(crate) fn emit_split_on_m<'ctx>(
    kb: &Kb<'_, 'ctx>,
    m: IntValue<'ctx>,
    panel: impl FnOnce() -> R<()>,
    direct: impl FnOnce() -> R<()>,
) -> R<()> {
    let big = kb.b.build_int_compare(IntPredicate::SGE, m, kb.i64c(PANEL_MIN_M as i64), "big_m")?;
    let (panel_bb, direct_bb, done) = (
        kb.ctx.append_basic_block(kb.func, "panel_path"),
        kb.ctx.append_basic_block(kb.func, "direct_path"),
        kb.ctx.append_basic_block(kb.func, "done"),
    );
    kb.b.build_conditional_branch(big, panel_bb, direct_bb)?;
    kb.b.position_at_end(panel_bb);
    panel()?;
    kb.b.build_unconditional_branch(done)?;
    kb.b.position_at_end(direct_bb);
    direct()?;
    kb.b.build_unconditional_branch(done)?;
    kb.b.position_at_end(done);
    Ok(())
}

/// (w, x, y, residual).
type Bufs<'ctx> = (PointerValue<'ctx>, PointerValue<'ctx>, PointerValue<'ctx>, Option<PointerValue<'ctx>>);
type Sizes<'ctx> = (IntValue<'ctx>, IntValue<'ctx>, IntValue<'ctx>, IntValue<'ctx>);

/// Dequantizing in registers: for each chunk of rows (sized to stay in L2), every tile of x rows.
fn emit_direct<'ctx>(
    kb: &Kb<'_, 'ctx>,
    fmt: &Format,
    spec: &LinearKernelSpec,
    bufs: Bufs<'ctx>,
    (m, n, row_begin, row_end): Sizes<'ctx>,
) -> R<()> {
    let row_bytes = spec.row_bytes().expect("validated");
    let row_chunk = (ROW_CHUNK_BYTES / row_bytes).max(TILE_M) / TILE_M * TILE_M;
    let k = kb.i64c(spec.k as i64);
    kb.for_loop(row_begin, row_end, kb.i64c(row_chunk as i64), "rchunk", |r0| {
        let r1 = kb.imin(kb.b.build_int_nsw_add(r0, kb.i64c(row_chunk as i64), "r0_plus")?, row_end)?;
        emit_x_tiles(kb, TILE_M, kb.i64c(0), m, |i0, t| {
            emit_rows(kb, fmt, t, tile_shape(t), bufs, (i0, k, n), (r0, r1), row_bytes, true)
        })
    })
}

/// The panel path: for each block of `M_BLOCK` x rows (kept in L2) and each panel of weight rows,
/// dequantize the panel into an f32 scratch (once per block, not once per x tile) and compute it with the
/// f32 kernel, whose inner loop is then only loads and FMAs.
fn emit_panels<'ctx>(
    kb: &Kb<'_, 'ctx>,
    fmt: &Format,
    spec: &LinearKernelSpec,
    (w, x, y, res): Bufs<'ctx>,
    (m, n, row_begin, row_end): Sizes<'ctx>,
) -> R<()> {
    let row_bytes = spec.row_bytes().expect("validated");
    let (rgroup, _) = panel_tile_shape(PANEL_TILE_M);
    let prows = ((PANEL_BYTES / (4 * spec.k)).max(rgroup) / rgroup * rgroup) as i64;
    // Slack after the last row: a plain-type tail is stored as a whole vector.
    let panel_len = prows as u32 * spec.k as u32 + LANES;
    let panel = kb.entry_alloca(kb.f32t.array_type(panel_len).into())?;
    let f32fmt = Format::new(DType::F32, spec.k);
    let k = kb.i64c(spec.k as i64);
    kb.for_loop(kb.i64c(0), m, kb.i64c(M_BLOCK as i64), "mblock", |mb| {
        let m1 = kb.imin(kb.b.build_int_nsw_add(mb, kb.i64c(M_BLOCK as i64), "mb_plus")?, m)?;
        kb.for_loop(row_begin, row_end, kb.i64c(prows), "panel", |r0| {
            let r1 = kb.imin(kb.b.build_int_nsw_add(r0, kb.i64c(prows), "r0_plus")?, row_end)?;
            kb.for_loop(r0, r1, kb.i64c(1), "dequant", |r| {
                let src = kb.gep(kb.i8t.into(), w, kb.b.build_int_nsw_mul(r, kb.i64c(row_bytes as i64), "woff")?)?;
                let pr = kb.b.build_int_nsw_sub(r, r0, "prow")?;
                let dst = kb.gep(kb.f32t.into(), panel, kb.b.build_int_nsw_mul(pr, k, "poff")?)?;
                emit_dequant_row(kb, fmt, src, dst)
            })?;
            // The panel's rows are 0..rows; its outputs (and residuals) start at column r0.
            let yp = kb.gep(kb.f32t.into(), y, r0)?;
            let rp = res.map(|r| kb.gep(kb.f32t.into(), r, r0)).transpose()?;
            let rows = kb.b.build_int_nsw_sub(r1, r0, "prows")?;
            emit_x_tiles(kb, PANEL_TILE_M, mb, m1, |i0, t| {
                let shape = panel_tile_shape(t);
                emit_rows(kb, &f32fmt, t, shape, (panel, x, yp, rp), (i0, k, n), (kb.i64c(0), rows), 4 * spec.k, false)
            })
        })
    })
}

/// One weight row at `src`, dequantized into `dst` (f32s, plus up to 7 more for a plain-type tail).
pub(crate) fn emit_dequant_row<'ctx>(
    kb: &Kb<'_, 'ctx>,
    fmt: &Format,
    src: PointerValue<'ctx>,
    dst: PointerValue<'ctx>,
) -> R<()> {
    let store_chunk = |d: PointerValue<'ctx>, c: usize, v: VectorValue<'ctx>| -> R<()> {
        kb.store(kb.gep(kb.f32t.into(), d, kb.i64c((c * LANES as usize) as i64))?, v.into(), 4)
    };
    if fmt.blocks > 0 {
        kb.for_loop(kb.i64c(0), kb.i64c(fmt.blocks as i64), kb.i64c(1), "dblk", |b| {
            let wp = kb.gep(kb.i8t.into(), src, kb.b.build_int_nsw_mul(b, kb.i64c(fmt.block_bytes as i64), "wb")?)?;
            let dp = kb.gep(kb.f32t.into(), dst, kb.b.build_int_nsw_mul(b, kb.i64c(fmt.block_elems as i64), "db")?)?;
            let mut memo: Memo<'ctx> = HashMap::new();
            fmt.prologue(kb, wp, &mut memo)?;
            if fmt.groups == 1 {
                for c in fmt.chunk_order() {
                    store_chunk(dp, c, fmt.chunk(kb, wp, &mut memo, None, c)?)?;
                }
                return Ok(());
            }
            let group_elems = kb.i64c((fmt.block_elems / fmt.groups) as i64);
            kb.for_loop(kb.i64c(0), kb.i64c(fmt.groups as i64), kb.i64c(1), "dgrp", |g| {
                let dg = kb.gep(kb.f32t.into(), dp, kb.b.build_int_nsw_mul(g, group_elems, "dg")?)?;
                let mut gmemo = memo.clone();
                for c in fmt.chunk_order() {
                    store_chunk(dg, c, fmt.chunk(kb, wp, &mut gmemo, Some(g), c)?)?;
                }
                Ok(())
            })
        })?;
    }
    if fmt.tail_elems > 0 {
        let wp = kb.byte_gep(src, fmt.blocks * fmt.block_bytes)?;
        let dp = kb.gep(kb.f32t.into(), dst, kb.i64c((fmt.blocks * fmt.block_elems) as i64))?;
        for c in 0..fmt.tail_elems.div_ceil(LANES as usize) {
            let live = (fmt.tail_elems - c * LANES as usize).min(LANES as usize);
            store_chunk(dp, c, fmt.partial_chunk(kb, wp, c, live)?)?;
        }
    }
    Ok(())
}

/// Calls `body(i0, t)` for tiles of x rows covering `lo..hi`: full tiles of `TILE_M`, then one tile of
/// the remaining 1..TILE_M rows, through a switch that picks code generated for that size.
pub(crate) fn emit_x_tiles<'ctx>(
    kb: &Kb<'_, 'ctx>,
    tile_m: usize,
    lo: IntValue<'ctx>,
    hi: IntValue<'ctx>,
    body: impl Fn(IntValue<'ctx>, usize) -> R<()>,
) -> R<()> {
    let tm = kb.i64c(tile_m as i64);
    let count = kb.b.build_int_nsw_sub(hi, lo, "xcount")?;
    let full = kb.b.build_int_nsw_add(
        lo,
        kb.b.build_int_nsw_mul(kb.b.build_int_signed_div(count, tm, "tiles")?, tm, "full")?,
        "full_end",
    )?;
    let rem = kb.b.build_int_nsw_sub(hi, full, "xrem")?;
    kb.for_loop(lo, full, tm, "xtile", |i0| body(i0, tile_m))?;
    let after = kb.ctx.append_basic_block(kb.func, "rem_done");
    let mut cases = Vec::new();
    for t in 1..tile_m {
        let bb = kb.ctx.append_basic_block(kb.func, &format!("rem{t}"));
        cases.push((kb.i64c(t as i64), bb));
    }
    kb.b.build_switch(rem, after, &cases)?;
    for (t, (_, bb)) in (1..tile_m).zip(&cases) {
        kb.b.position_at_end(*bb);
        body(full, t)?;
        kb.b.build_unconditional_branch(after)?;
    }
    kb.b.position_at_end(after);
    Ok(())
}

/// Weight rows `r0..r1` against the `t` x rows from `i0`: groups of R rows, then single rows.
#[allow(clippy::too_many_arguments)]
fn emit_rows<'ctx>(
    kb: &Kb<'_, 'ctx>,
    fmt: &Format,
    t: usize,
    (rgroup, acc): (usize, usize),
    (w, x, y, res): Bufs<'ctx>,
    (i0, k, n): (IntValue<'ctx>, IntValue<'ctx>, IntValue<'ctx>),
    (r0, r1): (IntValue<'ctx>, IntValue<'ctx>),
    row_bytes: usize,
    prefetch: bool,
) -> R<()> {
    let mut xrows = Vec::with_capacity(t);
    let mut yrows = Vec::with_capacity(t);
    let mut rrows = Vec::with_capacity(t);
    for ti in 0..t {
        let i = kb.b.build_int_nsw_add(i0, kb.i64c(ti as i64), "i")?;
        xrows.push(kb.gep(kb.f32t.as_basic_type_enum(), x, kb.b.build_int_nsw_mul(i, k, "xoff")?)?);
        let yoff = kb.b.build_int_nsw_mul(i, n, "yoff")?;
        yrows.push(kb.gep(kb.f32t.as_basic_type_enum(), y, yoff)?);
        if let Some(r) = res {
            rrows.push(kb.gep(kb.f32t.as_basic_type_enum(), r, yoff)?);
        }
    }
    let tile = |r: IntValue<'ctx>, rows: usize, acc: usize| -> R<()> {
        let mut wrows = Vec::with_capacity(rows);
        let mut outs = Vec::with_capacity(rows);
        for ri in 0..rows {
            let row = kb.b.build_int_nsw_add(r, kb.i64c(ri as i64), "row")?;
            let off = kb.b.build_int_nsw_mul(row, kb.i64c(row_bytes as i64), "woff")?;
            wrows.push(kb.gep(kb.i8t.as_basic_type_enum(), w, off)?);
            outs.push(row);
        }
        let prefetch_bytes = if prefetch { prefetch_distance(rows, row_bytes) } else { 0 };
        emit_tile(kb, fmt, &xrows, &wrows, acc, prefetch_bytes, |ti, ri, v| {
            let p = kb.gep(kb.f32t.as_basic_type_enum(), yrows[ti], outs[ri])?;
            let v = match rrows.get(ti) {
                Some(&rrow) => {
                    let rp = kb.gep(kb.f32t.as_basic_type_enum(), rrow, outs[ri])?;
                    let rv = kb.load(kb.f32t.into(), rp, 4)?.into_float_value();
                    kb.b.build_float_add(v, rv, "res")?
                }
                None => v,
            };
            kb.store(p, v.as_basic_value_enum(), 4)
        })
    };
    // r0 + ⌊(r1 - r0) / R⌋ · R: where the groups of R rows end.
    let span = kb.b.build_int_sub(r1, r0, "span")?;
    let groups = kb.b.build_int_signed_div(span, kb.i64c(rgroup as i64), "groups")?;
    let grouped_end =
        kb.b.build_int_nsw_add(r0, kb.b.build_int_nsw_mul(groups, kb.i64c(rgroup as i64), "g")?, "gend")?;
    kb.for_loop(r0, grouped_end, kb.i64c(rgroup as i64), "rgroup", |r| tile(r, rgroup, acc))?;
    if rgroup > 1 {
        kb.for_loop(grouped_end, r1, kb.i64c(1), "rsingle", |r| tile(r, 1, tail_accumulators(t)))?;
    }
    Ok(())
}

/// One register tile: the dot products of the weight rows `wrows` with the x rows `xrows`, over all of
/// `k`, handed to `store(t, r, value)`.
fn emit_tile<'ctx>(
    kb: &Kb<'_, 'ctx>,
    fmt: &Format,
    xrows: &[PointerValue<'ctx>],
    wrows: &[PointerValue<'ctx>],
    nacc: usize,
    prefetch_bytes: usize,
    mut store: impl FnMut(usize, usize, FloatValue<'ctx>) -> R<()>,
) -> R<()> {
    let (t, rows) = (xrows.len(), wrows.len());
    let idx = |ti: usize, ri: usize, a: usize| (ti * rows + ri) * nacc + a;
    // Accumulators live in entry-block allocas between loop iterations; SROA turns them into phis.
    let slots: Vec<PointerValue<'ctx>> =
        (0..t * rows * nacc).map(|_| kb.entry_alloca(kb.v8f32.into())).collect::<R<_>>()?;
    for s in &slots {
        kb.store(*s, kb.v8f32.const_zero().into(), 32)?;
    }
    let load_accs = || -> R<Vec<VectorValue<'ctx>>> {
        slots.iter().map(|s| Ok(kb.load(kb.v8f32.into(), *s, 32)?.into_vector_value())).collect()
    };
    let store_accs = |accs: &[VectorValue<'ctx>]| -> R<()> {
        for (s, a) in slots.iter().zip(accs) {
            kb.store(*s, a.as_basic_value_enum(), 32)?;
        }
        Ok(())
    };
    // Accumulates `chunks` (indices into the group at `group`, or the block) of every row: weights from
    // the block at `wptrs`, x from `xptrs` (which point at the group's first element). Chunks with
    // fewer than 8 `live` elements only occur in the plain types' tail.
    let accumulate = |accs: &mut [VectorValue<'ctx>],
                      wptrs: &[PointerValue<'ctx>],
                      xptrs: &[PointerValue<'ctx>],
                      memos: &mut [Memo<'ctx>],
                      group: Option<IntValue<'ctx>>,
                      chunks: &[usize],
                      live: &dyn Fn(usize) -> usize|
     -> R<()> {
        for (i, &c) in chunks.iter().enumerate() {
            let n = live(c);
            let wv: Vec<VectorValue<'ctx>> = wptrs
                .iter()
                .zip(memos.iter_mut())
                .map(|(&wp, memo)| {
                    if n == LANES as usize {
                        fmt.chunk(kb, wp, memo, group, c)
                    } else {
                        fmt.partial_chunk(kb, wp, c, n)
                    }
                })
                .collect::<R<_>>()?;
            for (ti, &xp) in xptrs.iter().enumerate() {
                let xv = if n == LANES as usize {
                    let p = kb.gep(kb.f32t.into(), xp, kb.i64c((c * LANES as usize) as i64))?;
                    kb.load(kb.v8f32.into(), p, 4)?.into_vector_value()
                } else {
                    kb.partial_f32(xp, c * LANES as usize, n)?
                };
                for (ri, &w) in wv.iter().enumerate() {
                    let a = idx(ti, ri, i % nacc);
                    accs[a] = kb.fma(w, xv, accs[a])?;
                }
            }
        }
        Ok(())
    };
    let at = |ptrs: &[PointerValue<'ctx>],
              ty: BasicTypeEnum<'ctx>,
              off: IntValue<'ctx>|
     -> R<Vec<PointerValue<'ctx>>> { ptrs.iter().map(|&p| kb.gep(ty, p, off)).collect() };

    if fmt.blocks > 0 {
        let bytes = kb.i64c(fmt.block_bytes as i64);
        let elems = kb.i64c(fmt.block_elems as i64);
        kb.for_loop(kb.i64c(0), kb.i64c(fmt.blocks as i64), kb.i64c(1), "blk", |b| {
            let wptrs = at(wrows, kb.i8t.into(), kb.b.build_int_nsw_mul(b, bytes, "wblk")?)?;
            let xptrs = at(xrows, kb.f32t.into(), kb.b.build_int_nsw_mul(b, elems, "xblk")?)?;
            if prefetch_bytes > 0 {
                // The same block `prefetch_bytes` further on: rows are contiguous, so that is a block of
                // a row group a few groups ahead. One prefetch per cache line of the block.
                for &p in &wptrs {
                    for line in (0..fmt.block_bytes).step_by(64) {
                        kb.prefetch(p, prefetch_bytes + line)?;
                    }
                }
            }
            let mut memos: Vec<Memo<'ctx>> = (0..rows).map(|_| HashMap::new()).collect();
            for (&wp, memo) in wptrs.iter().zip(&mut memos) {
                fmt.prologue(kb, wp, memo)?;
            }
            let order = fmt.chunk_order();
            if fmt.groups == 1 {
                let mut accs = load_accs()?;
                accumulate(&mut accs, &wptrs, &xptrs, &mut memos, None, &order, &|_| LANES as usize)?;
                return store_accs(&accs);
            }
            // K-quants: a loop over the block's groups of sub-blocks, each a small basic block (a whole
            // 256-element super-block unrolled is too big for the register allocator and for compile
            // time).
            let group_elems = kb.i64c((fmt.block_elems / fmt.groups) as i64);
            kb.for_loop(kb.i64c(0), kb.i64c(fmt.groups as i64), kb.i64c(1), "grp", |g| {
                let xg = at(&xptrs, kb.f32t.into(), kb.b.build_int_nsw_mul(g, group_elems, "xgrp")?)?;
                let mut gmemos = memos.clone();
                let mut accs = load_accs()?;
                accumulate(&mut accs, &wptrs, &xg, &mut gmemos, Some(g), &order, &|_| LANES as usize)?;
                store_accs(&accs)
            })
        })?;
    }
    let mut accs = load_accs()?;
    if fmt.tail_elems > 0 {
        let wptrs = at(wrows, kb.i8t.into(), kb.i64c((fmt.blocks * fmt.block_bytes) as i64))?;
        let xptrs = at(xrows, kb.f32t.into(), kb.i64c((fmt.blocks * fmt.block_elems) as i64))?;
        let mut memos: Vec<Memo<'ctx>> = (0..rows).map(|_| HashMap::new()).collect();
        let chunks: Vec<usize> = (0..fmt.tail_elems.div_ceil(LANES as usize)).collect();
        let live = |c: usize| (fmt.tail_elems - c * LANES as usize).min(LANES as usize);
        accumulate(&mut accs, &wptrs, &xptrs, &mut memos, None, &chunks, &live)?;
    }
    for ti in 0..t {
        for ri in 0..rows {
            let mut v = accs[idx(ti, ri, 0)];
            for a in 1..nacc {
                v = kb.b.build_float_add(v, accs[idx(ti, ri, a)], "accsum")?;
            }
            store(ti, ri, kb.reduce_add(v)?)?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------
// Weight formats: how to dequantize 8 consecutive elements of a block into an `<8 x float>`.

/// Values computed once per (weight row, block or group) and shared by its chunks (scales, unpacked
/// bytes), keyed by what they are and an index.
pub(crate) type Memo<'ctx> = HashMap<(&'static str, usize), BasicValueEnum<'ctx>>;

pub(crate) struct Format {
    pub(crate) dtype: DType,
    /// Elements per block the loop steps over: the GGUF block, or 32 for the plain float types.
    pub(crate) block_elems: usize,
    pub(crate) block_bytes: usize,
    /// Whole blocks per row.
    pub(crate) blocks: usize,
    /// Elements after the whole blocks (plain types only, when `k` is not a multiple of 32).
    pub(crate) tail_elems: usize,
    /// Groups of sub-blocks per block that the kernel loops over (K-quants), or 1: the block's chunks
    /// are emitted straight-line.
    pub(crate) groups: usize,
}

impl Format {
    pub(crate) fn new(dtype: DType, k: usize) -> Format {
        let block_elems = if dtype.is_quantized() { dtype.block_size() } else { 32 };
        let block_bytes = block_elems / dtype.block_size() * dtype.type_size();
        // Q4_K/Q5_K: pairs of 32-element sub-blocks that share their bytes of nibbles; Q6_K: halves.
        let groups = match dtype {
            DType::Q4K | DType::Q5K => 4,
            DType::Q6K => 2,
            _ => 1,
        };
        Format { dtype, block_elems, block_bytes, blocks: k / block_elems, tail_elems: k % block_elems, groups }
    }

    /// The order to emit a group's (or block's) chunks in: chunks that unpack the same bytes back to
    /// back, so the unpacked bytes are dead before the next ones are loaded.
    pub(crate) fn chunk_order(&self) -> Vec<usize> {
        match self.dtype {
            // Chunk 4h + c of a pair: nibble h of bytes 8c..8c + 8.
            DType::Q4K | DType::Q5K => vec![0, 4, 1, 5, 2, 6, 3, 7],
            // Chunk 4g + c of a half: bits of ql[32(g & 1) + 8c..] and qh[8c..] for g = 0..4.
            DType::Q6K => (0..4).flat_map(|c| (0..4).map(move |g| 4 * g + c)).collect(),
            _ => (0..self.block_elems / LANES as usize).collect(),
        }
    }

    /// Work done once per (row, block) before its chunks: the K-quant scales.
    pub(crate) fn prologue<'ctx>(&self, kb: &Kb<'_, 'ctx>, blk: PointerValue<'ctx>, memo: &mut Memo<'ctx>) -> R<()> {
        match self.dtype {
            DType::Q4K | DType::Q5K => {
                // All eight scales and mins, decoded in vector registers and parked in a stack array:
                // each group then broadcasts its two straight from memory (a load, no shuffle).
                let (scales, neg_mins) = kmin_all(kb, memo, blk)?;
                let table = kb.entry_alloca(kb.f32t.array_type(16).into())?;
                kb.store(table, scales.into(), 4)?;
                kb.store(kb.gep(kb.f32t.into(), table, kb.i64c(8))?, neg_mins.into(), 4)?;
                memo.insert(("ktable", 0), table.into());
            }
            DType::Q6K => {
                let d = memo_f16(kb, memo, blk, 208)?;
                memo.insert(("d", 0), kb.splat(d.into(), kb.v8f32)?.into());
            }
            _ => {}
        }
        Ok(())
    }

    /// Elements `8c..8c + 8` of the block at `blk` (of its group `group`, for K-quants), dequantized.
    pub(crate) fn chunk<'ctx>(
        &self,
        kb: &Kb<'_, 'ctx>,
        blk: PointerValue<'ctx>,
        memo: &mut Memo<'ctx>,
        group: Option<IntValue<'ctx>>,
        c: usize,
    ) -> R<VectorValue<'ctx>> {
        let c8 = c * LANES as usize;
        match self.dtype {
            DType::F32 => Ok(kb.load(kb.v8f32.into(), kb.byte_gep(blk, 4 * c8)?, 1)?.into_vector_value()),
            DType::F16 => {
                let h = kb.load(kb.v8i16.into(), kb.byte_gep(blk, 2 * c8)?, 1)?;
                let h = kb.b.build_bit_cast(h, kb.ctx.f16_type().vec_type(LANES), "h")?.into_vector_value();
                Ok(kb.b.build_float_ext(h, kb.v8f32, "f16")?)
            }
            DType::BF16 => {
                // bf16 is the top half of an f32: widen by shifting into place.
                let h = kb.load(kb.v8i16.into(), kb.byte_gep(blk, 2 * c8)?, 1)?.into_vector_value();
                let wide = kb.b.build_int_z_extend(h, kb.v8i32, "bf")?;
                let wide = kb.b.build_left_shift(wide, kb.splat_i32(16), "bf")?;
                Ok(kb.b.build_bit_cast(wide, kb.v8f32, "bf16")?.into_vector_value())
            }
            DType::Q8_0 => {
                // y = q * d, q an i8.
                let d = memo_splat_f16(kb, memo, blk, 0, 0)?;
                let q = kb.load(kb.v8i8.into(), kb.byte_gep(blk, 2 + c8)?, 1)?.into_vector_value();
                let q = kb.b.build_signed_int_to_float(q, kb.v8f32, "q")?;
                Ok(kb.b.build_float_mul(q, d, "w")?)
            }
            DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 => {
                // 16 bytes of nibbles: element j < 16 is the low nibble of byte j, element j + 16 the high
                // one. Q5 formats add bit j of the u32 `qh` as bit 4. y = q * d + min where min is -8d,
                // -16d (symmetric formats: exact, a power-of-two multiple) or the stored m.
                let (has_min, qh_at, qs_at) = match self.dtype {
                    DType::Q4_0 => (false, None, 2),
                    DType::Q4_1 => (true, None, 4),
                    DType::Q5_0 => (false, Some(2), 6),
                    _ => (true, Some(4), 8),
                };
                let bytes = memo_bytes_i32(kb, memo, "qs", blk, qs_at + c8 % 16)?;
                let mut q = nibble(kb, bytes, c8 >= 16)?;
                if let Some(at) = qh_at {
                    let qh = memo_get(memo, ("qh", 0), || {
                        let v = kb.load(kb.i32t.into(), kb.byte_gep(blk, at)?, 1)?.into_int_value();
                        Ok(kb.splat(v.into(), kb.v8i32)?.into())
                    })?
                    .into_vector_value();
                    // Bit (8c + lane) of qh, moved to bit 4.
                    let shifts: Vec<IntValue<'ctx>> =
                        (0..LANES).map(|l| kb.i32t.const_int((c8 as u64) + l as u64, false)).collect();
                    let hb = kb.b.build_right_shift(qh, VectorType::const_vector(&shifts), false, "qh")?;
                    let hb = kb.b.build_and(hb, kb.splat_i32(1), "qh")?;
                    let hb = kb.b.build_left_shift(hb, kb.splat_i32(4), "qh")?;
                    q = kb.b.build_or(q, hb, "q5")?;
                }
                let qf = kb.b.build_signed_int_to_float(q, kb.v8f32, "qf")?;
                let (d, min) = if has_min {
                    (memo_splat_f16(kb, memo, blk, 0, 0)?, memo_splat_f16(kb, memo, blk, 0, 1)?)
                } else {
                    let d = memo_splat_f16(kb, memo, blk, 0, 0)?;
                    let offset = if qh_at.is_some() { -16.0 } else { -8.0 };
                    let min = memo_get(memo, ("dmin", 0), || {
                        Ok(kb.b.build_float_mul(d, kb.splat_f32(offset), "dmin")?.into())
                    })?;
                    (d, min.into_vector_value())
                };
                kb.fma(qf, d, min)
            }
            DType::Q4K | DType::Q5K => {
                // Group p of 4: sub-blocks j = 2p + h (h = 0, 1), whose nibbles share the 32 bytes
                // qs[32p..32p + 32] (low nibbles for h = 0, high for h = 1); here elements 8c' of
                // sub-block j, c = 4h + c'. y = (d·sc_j)·q - dmin·m_j.
                let p = group.expect("K-quants are emitted per group");
                let (h, l) = (c8 / 32, c8 % 32);
                let qs_at = if self.dtype == DType::Q4K { 16 } else { 48 };
                let qs = memo_get(memo, ("qs_group", 0), || {
                    let off = kb.b.build_int_nsw_add(
                        kb.b.build_int_nsw_mul(p, kb.i64c(32), "qs")?,
                        kb.i64c(qs_at as i64),
                        "qs",
                    )?;
                    Ok(kb.gep(kb.i8t.into(), blk, off)?.into())
                })?
                .into_pointer_value();
                let bytes = memo_bytes_i32(kb, memo, "qs", qs, l)?;
                let mut q = nibble(kb, bytes, h == 1)?;
                // j = 2p + h, as i64 and broadcast to i32 lanes.
                let j = memo_get(memo, ("j", h), || {
                    let p2 = kb.b.build_int_nsw_mul(p, kb.i64c(2), "p2")?;
                    Ok(kb.b.build_int_nsw_add(p2, kb.i64c(h as i64), "j")?.into())
                })?
                .into_int_value();
                if self.dtype == DType::Q5K {
                    // Bit 4 of element 32j + l is bit j of qh[l]: (qh << 4) >> j, masked to bit 4.
                    let qh = memo_bytes_i32(kb, memo, "qh", blk, 16 + l)?;
                    let qh4 =
                        memo_get(memo, ("qh4", l), || Ok(kb.b.build_left_shift(qh, kb.splat_i32(4), "qh4")?.into()))?
                            .into_vector_value();
                    let shift = memo_get(memo, ("jsplat", h), || {
                        let j32 = kb.b.build_int_truncate(j, kb.i32t, "j32")?;
                        Ok(kb.splat(j32.into(), kb.v8i32)?.into())
                    })?
                    .into_vector_value();
                    let hb = kb.b.build_right_shift(qh4, shift, false, "qh")?;
                    let hb = kb.b.build_and(hb, kb.splat_i32(0x10), "qh")?;
                    q = kb.b.build_or(q, hb, "q5")?;
                }
                let qf = kb.b.build_signed_int_to_float(q, kb.v8f32, "qf")?;
                // Scale j and negated min j from the block's table (see `prologue`).
                let table = memo.get(&("ktable", 0)).expect("prologue ran").into_pointer_value();
                let mut from_table = |key: &'static str, base: i64| -> R<VectorValue<'ctx>> {
                    Ok(memo_get(memo, (key, h), || {
                        let i = kb.b.build_int_nsw_add(j, kb.i64c(base), "ti")?;
                        let v = kb.load(kb.f32t.into(), kb.gep(kb.f32t.into(), table, i)?, 4)?;
                        Ok(kb.splat(v, kb.v8f32)?.into())
                    })?
                    .into_vector_value())
                };
                let scale = from_table("scale", 0)?;
                let neg_min = from_table("neg_min", 8)?;
                kb.fma(qf, scale, neg_min)
            }
            DType::Q6K => {
                // Half h of 2 (the group), quarter g of 4, l = 8c': the low 4 bits come from
                // ql[64h + 32(g & 1) + l] (low nibble for g < 2, high for g >= 2), the high 2 bits from
                // bits 2g..2g+2 of qh[32h + l], the scale from scales[8h + 2g + l / 16].
                // y = (d·sc)·(q - 32).
                let h = group.expect("K-quants are emitted per group");
                let (g, l) = (c8 / 32, c8 % 32);
                let mut base = |key: &'static str, stride: i64, at: i64| -> R<PointerValue<'ctx>> {
                    Ok(memo_get(memo, (key, 0), || {
                        let off =
                            kb.b.build_int_nsw_add(kb.b.build_int_nsw_mul(h, kb.i64c(stride), key)?, kb.i64c(at), key)?;
                        Ok(kb.gep(kb.i8t.into(), blk, off)?.into())
                    })?
                    .into_pointer_value())
                };
                let (ql_base, qh_base, sc_base) =
                    (base("ql_ptr", 64, 0)?, base("qh_ptr", 32, 128)?, base("sc_ptr", 8, 192)?);
                let ql = memo_bytes_i32(kb, memo, "ql", ql_base, 32 * (g & 1) + l)?;
                let lo = nibble(kb, ql, g >= 2)?;
                // Bits 2g..2g+2 of qh, moved to bits 4..6.
                let qh = memo_bytes_i32(kb, memo, "qh", qh_base, l)?;
                let hb = if 2 * g <= 4 {
                    kb.b.build_left_shift(qh, kb.splat_i32(4 - 2 * g as u64), "qh")?
                } else {
                    kb.b.build_right_shift(qh, kb.splat_i32(2 * g as u64 - 4), false, "qh")?
                };
                let hb = kb.b.build_and(hb, kb.splat_i32(0x30), "qh")?;
                let q = kb.b.build_or(lo, hb, "q6")?;
                let q = kb.b.build_int_sub(q, kb.splat_i32(32), "q6")?;
                let qf = kb.b.build_signed_int_to_float(q, kb.v8f32, "qf")?;
                // The half's eight scales times d, then lane 2g + l / 16 of them.
                let d = memo.get(&("d", 0)).expect("prologue ran").into_vector_value();
                let scales = memo_get(memo, ("scales", 0), || {
                    let sc = kb.load(kb.v8i8.into(), sc_base, 1)?.into_vector_value();
                    let sc = kb.b.build_signed_int_to_float(sc, kb.v8f32, "sc")?;
                    Ok(kb.b.build_float_mul(sc, d, "scales")?.into())
                })?
                .into_vector_value();
                let lane = 2 * g + l / 16;
                let scale = memo_get(memo, ("scale", lane), || {
                    let mask = kb.const_splat(kb.i32t.const_int(lane as u64, false).into(), LANES);
                    Ok(kb.b.build_shuffle_vector(scales, scales.get_type().get_poison(), mask, "scale")?.into())
                })?
                .into_vector_value();
                Ok(kb.b.build_float_mul(qf, scale, "w")?)
            }
            other => unreachable!("validate() rejects {other}"),
        }
    }

    /// The first `live` elements of chunk `c` of the tail of a plain-type row (zeros after them),
    /// loaded element by element so nothing past the row is read.
    pub(crate) fn partial_chunk<'ctx>(
        &self,
        kb: &Kb<'_, 'ctx>,
        blk: PointerValue<'ctx>,
        c: usize,
        live: usize,
    ) -> R<VectorValue<'ctx>> {
        let mut v = kb.v8f32.const_zero();
        for l in 0..live {
            let e = c * LANES as usize + l;
            let f = match self.dtype {
                DType::F32 => kb.load(kb.f32t.into(), kb.byte_gep(blk, 4 * e)?, 1)?.into_float_value(),
                DType::F16 => {
                    let h = kb.load(kb.i16t.into(), kb.byte_gep(blk, 2 * e)?, 1)?;
                    let h = kb.b.build_bit_cast(h, kb.ctx.f16_type(), "h")?.into_float_value();
                    kb.b.build_float_ext(h, kb.f32t, "f16")?
                }
                DType::BF16 => {
                    let h = kb.load(kb.i16t.into(), kb.byte_gep(blk, 2 * e)?, 1)?.into_int_value();
                    let wide = kb.b.build_int_z_extend(h, kb.i32t, "bf")?;
                    let wide = kb.b.build_left_shift(wide, kb.i32t.const_int(16, false), "bf")?;
                    kb.b.build_bit_cast(wide, kb.f32t, "bf16")?.into_float_value()
                }
                other => unreachable!("only plain types have a tail, not {other}"),
            };
            v = kb.b.build_insert_element(v, f, kb.i32t.const_int(l as u64, false), "tail")?;
        }
        Ok(v)
    }
}

/// The memoized value `key`, computed by `f` the first time. Chunks of one block are emitted into one
/// basic block, so a value computed for an earlier chunk dominates the later ones.
fn memo_get<'ctx>(
    memo: &mut Memo<'ctx>,
    key: (&'static str, usize),
    f: impl FnOnce() -> R<BasicValueEnum<'ctx>>,
) -> R<BasicValueEnum<'ctx>> {
    if let Some(v) = memo.get(&key) {
        return Ok(*v);
    }
    let v = f()?;
    memo.insert(key, v);
    Ok(v)
}

/// The f16 at byte `at` of the block, widened (exactly) to f32.
fn memo_f16<'ctx>(kb: &Kb<'_, 'ctx>, memo: &mut Memo<'ctx>, blk: PointerValue<'ctx>, at: usize) -> R<FloatValue<'ctx>> {
    Ok(memo_get(memo, ("f16", at), || {
        let h = kb.load(kb.i16t.into(), kb.byte_gep(blk, at)?, 1)?;
        let h = kb.b.build_bit_cast(h, kb.ctx.f16_type(), "h")?.into_float_value();
        Ok(kb.b.build_float_ext(h, kb.f32t, "scale")?.into())
    })?
    .into_float_value())
}

/// The f16 at byte `at + 2 * i` of the block, widened and broadcast to all lanes. The pair at `at` is
/// loaded and converted together (`d` and `m` of Q4_1/Q5_1 are adjacent): one load and one `vcvtph2ps`
/// instead of two of each.
fn memo_splat_f16<'ctx>(
    kb: &Kb<'_, 'ctx>,
    memo: &mut Memo<'ctx>,
    blk: PointerValue<'ctx>,
    at: usize,
    i: u32,
) -> R<VectorValue<'ctx>> {
    let pair = memo_get(memo, ("f16x2", at), || {
        let h = kb.load(kb.i16t.vec_type(2).into(), kb.byte_gep(blk, at)?, 1)?;
        let h = kb.b.build_bit_cast(h, kb.ctx.f16_type().vec_type(2), "h")?.into_vector_value();
        Ok(kb.b.build_float_ext(h, kb.f32t.vec_type(2), "scales")?.into())
    })?
    .into_vector_value();
    Ok(memo_get(memo, ("splat_f16", at + 2 * i as usize), || {
        let mask = kb.const_splat(kb.i32t.const_int(i as u64, false).into(), LANES);
        Ok(kb.b.build_shuffle_vector(pair, pair.get_type().get_poison(), mask, "splat")?.into())
    })?
    .into_vector_value())
}

/// The 8 bytes at `blk + at` (memoized as `(key, at)`), zero-extended to `<8 x i32>` (one `vpmovzxbd` from memory). Nibbles and bit
/// fields are then cut out with 32-bit shifts and masks, which x86 has and 8-bit ones it lacks.
fn memo_bytes_i32<'ctx>(
    kb: &Kb<'_, 'ctx>,
    memo: &mut Memo<'ctx>,
    key: &'static str,
    blk: PointerValue<'ctx>,
    at: usize,
) -> R<VectorValue<'ctx>> {
    Ok(memo_get(memo, (key, at), || {
        let v = kb.load(kb.v8i8.into(), kb.byte_gep(blk, at)?, 1)?.into_vector_value();
        Ok(kb.b.build_int_z_extend(v, kb.v8i32, "bytes")?.into())
    })?
    .into_vector_value())
}

/// The low or high nibble of each (zero-extended) byte.
fn nibble<'ctx>(kb: &Kb<'_, 'ctx>, bytes: VectorValue<'ctx>, high: bool) -> R<VectorValue<'ctx>> {
    Ok(if high {
        kb.b.build_right_shift(bytes, kb.splat_i32(4), false, "hi")?
    } else {
        kb.b.build_and(bytes, kb.splat_i32(0x0F), "lo")?
    })
}

/// The eight Q4_K/Q5_K sub-block scales `d · sc_j` and negated mins `-(dmin · m_j)` of a block. The
/// six-bit `sc_j` and `m_j` are packed in the 12 bytes `s` at offset 4 (ggml's `get_scale_min_k4`):
/// for j < 4 the low 6 bits of s[j] and s[j + 4]; for j >= 4 the nibbles of s[j + 4] with the top 2
/// bits of s[j - 4] (scale) and s[j] (min) on top. With lane j of `a` = s[j], of `b` = s[j + 4] and of
/// `c` = s[j mod 4], both halves are a few 32-bit vector ops and a blend.
fn kmin_all<'ctx>(
    kb: &Kb<'_, 'ctx>,
    memo: &mut Memo<'ctx>,
    blk: PointerValue<'ctx>,
) -> R<(VectorValue<'ctx>, VectorValue<'ctx>)> {
    if let (Some(s), Some(m)) = (memo.get(&("ksc_all", 0)), memo.get(&("kmin_all", 0))) {
        return Ok((s.into_vector_value(), m.into_vector_value()));
    }
    let b = &kb.b;
    let a = memo_bytes_i32(kb, memo, "scales", blk, 4)?;
    let bv = memo_bytes_i32(kb, memo, "scales", blk, 8)?;
    let mask = |lanes: &[u64]| {
        VectorType::const_vector(&lanes.iter().map(|&l| kb.i32t.const_int(l, false)).collect::<Vec<_>>())
    };
    let c = b.build_shuffle_vector(a, a, mask(&[0, 1, 2, 3, 0, 1, 2, 3]), "s_mod4")?;
    // Lanes 0..4 from `lo`, 4..8 from `hi`.
    let halves = |lo: VectorValue<'ctx>, hi: VectorValue<'ctx>, name: &str| -> R<VectorValue<'ctx>> {
        Ok(b.build_shuffle_vector(lo, hi, mask(&[0, 1, 2, 3, 12, 13, 14, 15]), name)?)
    };
    let top = |v: VectorValue<'ctx>| -> R<VectorValue<'ctx>> {
        Ok(b.build_left_shift(b.build_right_shift(v, kb.splat_i32(6), false, "top")?, kb.splat_i32(4), "top")?)
    };
    let sc = halves(
        b.build_and(a, kb.splat_i32(63), "sc_lo")?,
        b.build_or(b.build_and(bv, kb.splat_i32(0x0F), "sc_hi")?, top(c)?, "sc_hi")?,
        "sc",
    )?;
    let mn = halves(
        b.build_and(bv, kb.splat_i32(63), "m_lo")?,
        b.build_or(b.build_right_shift(bv, kb.splat_i32(4), false, "m_hi")?, top(a)?, "m_hi")?,
        "m",
    )?;
    let d = memo_splat_f16(kb, memo, blk, 0, 0)?;
    let dmin = memo_splat_f16(kb, memo, blk, 0, 1)?;
    let scales = b.build_float_mul(b.build_signed_int_to_float(sc, kb.v8f32, "sc")?, d, "scales")?;
    // -(dmin · m), exactly: negation commutes with rounding.
    let neg_dmin = b.build_float_neg(dmin, "neg_dmin")?;
    let neg_mins = b.build_float_mul(b.build_signed_int_to_float(mn, kb.v8f32, "m")?, neg_dmin, "neg_mins")?;
    memo.insert(("ksc_all", 0), scales.into());
    memo.insert(("kmin_all", 0), neg_mins.into());
    Ok((scales, neg_mins))
}

// ---------------------------------------------------------------------------------------------------
// A small IR-building layer: the kernel's function, typed constants, loads with explicit alignment,
// vector helpers and counted loops.

pub(crate) type R<T> = Result<T, CodegenError>;

/// A kernel parameter: a buffer only read, a buffer only written, or an i64.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Param {
    In,
    Out,
    Int,
}

pub(crate) struct Kb<'a, 'ctx> {
    pub(crate) ctx: &'ctx Context,
    pub(crate) module: &'a Module<'ctx>,
    pub(crate) b: Builder<'ctx>,
    pub(crate) func: FunctionValue<'ctx>,
    pub(crate) f32t: FloatType<'ctx>,
    pub(crate) i8t: IntType<'ctx>,
    pub(crate) i16t: IntType<'ctx>,
    pub(crate) i32t: IntType<'ctx>,
    pub(crate) i64t: IntType<'ctx>,
    pub(crate) v8f32: VectorType<'ctx>,
    pub(crate) v8i32: VectorType<'ctx>,
    pub(crate) v8i16: VectorType<'ctx>,
    pub(crate) v8i8: VectorType<'ctx>,
}

impl<'a, 'ctx> Kb<'a, 'ctx> {
    /// The finished kernel `name` (this builder's function), once LLVM's verifier accepts it.
    pub(crate) fn verified(&self, name: &str) -> R<FunctionValue<'ctx>> {
        if !self.func.verify(false) {
            return Err(CodegenError::Llvm(format!("generated kernel {name} does not verify")));
        }
        Ok(self.func)
    }

    /// Declares the kernel `name` with the linear ABI and positions a builder in its entry block.
    pub(crate) fn new(ctx: &'ctx Context, module: &'a Module<'ctx>, name: &str, residual: bool) -> R<Self> {
        use Param::*;
        let mut params =
            vec![("w", In), ("x", In), ("y", Out), ("m", Int), ("n", Int), ("row_begin", Int), ("row_end", Int)];
        if residual {
            params.push(("r", In));
        }
        Self::declare(ctx, module, name, &params)
    }

    /// Declares the kernel `name` with `params` (pointers or i64s) and positions a builder in its entry
    /// block.
    pub(crate) fn declare(
        ctx: &'ctx Context,
        module: &'a Module<'ctx>,
        name: &str,
        params: &[(&str, Param)],
    ) -> R<Self> {
        let ptr = ctx.ptr_type(AddressSpace::default());
        let i64t = ctx.i64_type();
        let types: Vec<_> =
            params.iter().map(|(_, p)| if *p == Param::Int { i64t.into() } else { ptr.into() }).collect();
        let func = module.add_function(name, ctx.void_type().fn_type(&types, false), Some(Linkage::External));
        // The buffers never overlap and are only read (w, x) or written (y): lets LLVM keep loads of x
        // and w around stores to y, and tells it nothing escapes.
        let attr = |n: &str| ctx.create_enum_attribute(Attribute::get_named_enum_kind_id(n), 0);
        for (i, (pname, kind)) in params.iter().enumerate() {
            func.get_nth_param(i as u32).expect("declared above").set_name(pname);
            let access = match kind {
                Param::In => "readonly",
                Param::Out => "writeonly",
                Param::Int => continue,
            };
            for a in ["noalias", "nocapture", access] {
                func.add_attribute(AttributeLoc::Param(i as u32), attr(a));
            }
        }
        func.add_attribute(AttributeLoc::Function, attr("nounwind"));
        let b = ctx.create_builder();
        b.position_at_end(ctx.append_basic_block(func, "entry"));
        let (f32t, i8t, i16t, i32t) = (ctx.f32_type(), ctx.i8_type(), ctx.i16_type(), ctx.i32_type());
        Ok(Kb {
            ctx,
            module,
            b,
            func,
            f32t,
            i8t,
            i16t,
            i32t,
            i64t,
            v8f32: f32t.vec_type(LANES),
            v8i32: i32t.vec_type(LANES),
            v8i16: i16t.vec_type(LANES),
            v8i8: i8t.vec_type(LANES),
        })
    }

    pub(crate) fn i64c(&self, v: i64) -> IntValue<'ctx> {
        self.i64t.const_int(v as u64, true)
    }

    /// `<LANES x i32>` of `v`.
    pub(crate) fn splat_i32(&self, v: u64) -> VectorValue<'ctx> {
        self.const_splat(self.i32t.const_int(v, false).into(), LANES)
    }

    /// `<LANES x float>` of `v`.
    pub(crate) fn splat_f32(&self, v: f32) -> VectorValue<'ctx> {
        self.const_splat(self.f32t.const_float(v as f64).into(), LANES)
    }

    pub(crate) fn const_splat(&self, v: BasicValueEnum<'ctx>, lanes: u32) -> VectorValue<'ctx> {
        VectorType::const_vector(&vec![v; lanes as usize])
    }

    /// A runtime value broadcast to every lane of `vt`.
    pub(crate) fn splat(&self, v: BasicValueEnum<'ctx>, vt: VectorType<'ctx>) -> R<VectorValue<'ctx>> {
        let one = self.b.build_insert_element(vt.get_poison(), v, self.i32t.const_zero(), "splat")?;
        let zeros = self.i32t.vec_type(vt.get_size()).const_zero();
        Ok(self.b.build_shuffle_vector(one, vt.get_poison(), zeros, "splat")?)
    }

    /// `base + idx` elements of `ty`, in bounds.
    pub(crate) fn gep(
        &self,
        ty: BasicTypeEnum<'ctx>,
        base: PointerValue<'ctx>,
        idx: IntValue<'ctx>,
    ) -> R<PointerValue<'ctx>> {
        // SAFETY (of the generated code): every index stays inside the buffers the ABI describes.
        Ok(unsafe { self.b.build_in_bounds_gep(ty, base, &[idx], "p")? })
    }

    /// `base + off` bytes.
    pub(crate) fn byte_gep(&self, base: PointerValue<'ctx>, off: usize) -> R<PointerValue<'ctx>> {
        if off == 0 {
            return Ok(base);
        }
        self.gep(self.i8t.into(), base, self.i64c(off as i64))
    }

    /// A load with an explicit alignment: GGUF blocks are 18, 20, 22... bytes, so nothing inside them
    /// is aligned, and LLVM would otherwise assume a vector type's natural (16/32-byte) alignment.
    pub(crate) fn load(&self, ty: BasicTypeEnum<'ctx>, ptr: PointerValue<'ctx>, align: u32) -> R<BasicValueEnum<'ctx>> {
        let v = self.b.build_load(ty, ptr, "ld")?;
        set_alignment(v.as_instruction_value(), align)?;
        Ok(v)
    }

    pub(crate) fn store(&self, ptr: PointerValue<'ctx>, v: BasicValueEnum<'ctx>, align: u32) -> R<()> {
        let st = self.b.build_store(ptr, v)?;
        set_alignment(Some(st), align)
    }

    /// `ty` stack slot in the entry block, where SROA/mem2reg promote it to registers.
    pub(crate) fn entry_alloca(&self, ty: BasicTypeEnum<'ctx>) -> R<PointerValue<'ctx>> {
        let entry = self.func.get_first_basic_block().expect("entry block");
        let tmp = self.ctx.create_builder();
        match entry.get_first_instruction() {
            Some(i) => tmp.position_before(&i),
            None => tmp.position_at_end(entry),
        }
        Ok(tmp.build_alloca(ty, "acc")?)
    }

    /// The first `live` f32s at `base + start` in the low lanes, zeros above; element by element.
    pub(crate) fn partial_f32(&self, base: PointerValue<'ctx>, start: usize, live: usize) -> R<VectorValue<'ctx>> {
        let mut v = self.v8f32.const_zero();
        for l in 0..live {
            let p = self.gep(self.f32t.into(), base, self.i64c((start + l) as i64))?;
            let f = self.load(self.f32t.into(), p, 4)?;
            v = self.b.build_insert_element(v, f, self.i32t.const_int(l as u64, false), "tail")?;
        }
        Ok(v)
    }

    /// Calls the overloaded intrinsic `name` specialised on `types`.
    pub(crate) fn intrinsic(
        &self,
        name: &str,
        types: &[BasicTypeEnum<'ctx>],
        args: &[BasicMetadataValueEnum<'ctx>],
    ) -> R<inkwell::values::CallSiteValue<'ctx>> {
        let decl = Intrinsic::find(name)
            .and_then(|i| i.get_declaration(self.module, types))
            .ok_or_else(|| CodegenError::Llvm(format!("no intrinsic {name}")))?;
        Ok(self.b.build_call(decl, args, "call")?)
    }

    /// `a * b + c` as `llvm.fmuladd`: one fused FMA on targets that have it (every x86-64-v3 CPU), a
    /// multiply and an add elsewhere, where `llvm.fma` would become eight `fmaf` library calls.
    pub(crate) fn fma(&self, a: VectorValue<'ctx>, b: VectorValue<'ctx>, c: VectorValue<'ctx>) -> R<VectorValue<'ctx>> {
        let call = self.intrinsic("llvm.fmuladd", &[self.v8f32.into()], &[a.into(), b.into(), c.into()])?;
        Ok(call.try_as_basic_value().unwrap_basic().into_vector_value())
    }

    /// Sum of the lanes of `v`. The `reassoc` flag lets LLVM add pairwise (a shuffle tree) instead of
    /// lane by lane; it runs once per output, so either is cheap.
    pub(crate) fn reduce_add(&self, v: VectorValue<'ctx>) -> R<FloatValue<'ctx>> {
        let start = self.f32t.const_float(-0.0);
        let call = self.intrinsic("llvm.vector.reduce.fadd", &[self.v8f32.into()], &[start.into(), v.into()])?;
        let out = call.try_as_basic_value().unwrap_basic();
        if let Some(i) = out.as_instruction_value() {
            i.set_fast_math_flags(inkwell::values::FastMathFlags::AllowReassoc)
                .map_err(|e| CodegenError::Llvm(format!("fast-math flags: {e}")))?;
        }
        Ok(out.into_float_value())
    }

    /// Prefetches the cache line at `base + off` for reading, into all cache levels. Plain (not
    /// in-bounds) address arithmetic: the address may be past the end of the weights, which a prefetch
    /// tolerates.
    pub(crate) fn prefetch(&self, base: PointerValue<'ctx>, off: usize) -> R<()> {
        // SAFETY (of the generated code): the pointer is only used by the prefetch, which never faults.
        let p = unsafe { self.b.build_gep(self.i8t, base, &[self.i64c(off as i64)], "pf")? };
        let i32c = |v: u64| self.i32t.const_int(v, false).into();
        self.intrinsic("llvm.prefetch", &[p.get_type().into()], &[p.into(), i32c(0), i32c(3), i32c(1)])?;
        Ok(())
    }

    pub(crate) fn imin(&self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> R<IntValue<'ctx>> {
        let lt = self.b.build_int_compare(IntPredicate::SLT, a, b, "lt")?;
        Ok(self.b.build_select(lt, a, b, "min")?.into_int_value())
    }

    pub(crate) fn imax(&self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> R<IntValue<'ctx>> {
        let gt = self.b.build_int_compare(IntPredicate::SGT, a, b, "gt")?;
        Ok(self.b.build_select(gt, a, b, "max")?.into_int_value())
    }

    /// `for (i = start; i < end; i += step) body(i)`, leaving the builder after the loop.
    pub(crate) fn for_loop(
        &self,
        start: IntValue<'ctx>,
        end: IntValue<'ctx>,
        step: IntValue<'ctx>,
        name: &str,
        mut body: impl FnMut(IntValue<'ctx>) -> R<()>,
    ) -> R<()> {
        let pre = self.b.get_insert_block().expect("builder is positioned");
        let header = self.ctx.append_basic_block(self.func, name);
        let body_bb = self.ctx.append_basic_block(self.func, &format!("{name}.body"));
        let exit = self.ctx.append_basic_block(self.func, &format!("{name}.end"));
        self.b.build_unconditional_branch(header)?;
        self.b.position_at_end(header);
        let phi = self.b.build_phi(self.i64t, name)?;
        phi.add_incoming(&[(&start, pre)]);
        let i = phi.as_basic_value().into_int_value();
        let more = self.b.build_int_compare(IntPredicate::SLT, i, end, "more")?;
        self.b.build_conditional_branch(more, body_bb, exit)?;
        self.b.position_at_end(body_bb);
        body(i)?;
        let next = self.b.build_int_nsw_add(i, step, "next")?;
        let latch = self.b.get_insert_block().expect("builder is positioned");
        phi.add_incoming(&[(&next, latch)]);
        self.b.build_unconditional_branch(header)?;
        self.b.position_at_end(exit);
        Ok(())
    }
}

fn set_alignment(inst: Option<InstructionValue<'_>>, align: u32) -> R<()> {
    inst.ok_or_else(|| CodegenError::Llvm("load/store folded to a constant".into()))?
        .set_alignment(align)
        .map_err(|e| CodegenError::Llvm(format!("alignment: {e}")))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::llvm;
    use inkwell::OptimizationLevel;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Generates `specs` into one module, optimizes it for the host, JIT-compiles it and hands the
    /// kernels (in `specs` order) to `f`.
    pub(crate) fn with_kernels(specs: &[LinearKernelSpec], f: impl FnOnce(&[LinearKernelFn])) {
        let ctx = Context::create();
        let module = llvm::create_module(&ctx, "linear_test");
        for s in specs {
            emit_linear(&ctx, &module, s).unwrap();
        }
        let tm = llvm::host_target_machine().unwrap();
        llvm::optimize(&module, &tm).unwrap();
        let ee = module.create_jit_execution_engine(OptimizationLevel::Aggressive).unwrap();
        let fns: Vec<LinearKernelFn> = specs
            .iter()
            .map(|s| {
                let addr = ee.get_function_address(&s.symbol()).unwrap();
                // SAFETY: the symbol was generated with exactly this signature.
                unsafe { std::mem::transmute::<usize, LinearKernelFn>(addr) }
            })
            .collect();
        f(&fns);
    }

    /// A sparse linear kernel spec whose tests JIT-compile it beside the dense kernel of its (dtype, k).
    pub(crate) trait SparseTestSpec {
        /// Generates the sparse kernel into `module`.
        fn emit<'ctx>(&self, ctx: &'ctx Context, module: &Module<'ctx>) -> Result<FunctionValue<'ctx>, CodegenError>;
        /// The sparse kernel's symbol.
        fn sparse_symbol(&self) -> String;
        /// The dense kernel of the same dtype and `k`.
        fn dense(&self) -> LinearKernelSpec;
    }

    /// Generates the sparse kernel of each spec and the dense kernel of its (dtype, k) into one module,
    /// optimizes it for the host, JIT-compiles it and hands the (sparse, dense) pairs, in `specs` order,
    /// to `f`. Both kernels share the [`LinearKernelFn`] ABI.
    pub(crate) fn with_sparse_and_dense<S: SparseTestSpec>(
        specs: &[S],
        f: impl FnOnce(&[(LinearKernelFn, LinearKernelFn)]),
    ) {
        let ctx = Context::create();
        let module = llvm::create_module(&ctx, "sparse_test");
        for s in specs {
            s.emit(&ctx, &module).unwrap();
            emit_linear(&ctx, &module, &s.dense()).unwrap();
        }
        let tm = llvm::host_target_machine().unwrap();
        llvm::optimize(&module, &tm).unwrap();
        let ee = module.create_jit_execution_engine(OptimizationLevel::Aggressive).unwrap();
        let fns: Vec<_> = specs
            .iter()
            .map(|s| {
                let a = ee.get_function_address(&s.sparse_symbol()).unwrap();
                let d = ee.get_function_address(&s.dense().symbol()).unwrap();
                // SAFETY: both symbols were generated with exactly this signature.
                unsafe {
                    (std::mem::transmute::<usize, LinearKernelFn>(a), std::mem::transmute::<usize, LinearKernelFn>(d))
                }
            })
            .collect();
        f(&fns);
    }

    /// Byte offsets of the f16 scale fields in a block of `dtype`.
    fn scale_fields(dtype: DType) -> &'static [usize] {
        match dtype {
            DType::Q4_0 | DType::Q5_0 | DType::Q8_0 => &[0],
            DType::Q4_1 | DType::Q5_1 | DType::Q4K | DType::Q5K => &[0, 2],
            DType::Q6K => &[208],
            _ => &[],
        }
    }

    /// `n` rows of `k` weights of `dtype`: the quantized bytes of random f32s for even rows, and for odd
    /// rows of block formats, random bytes (every bit pattern of the packed fields) with finite f16
    /// scales patched in.
    pub(crate) fn random_weights(rng: &mut StdRng, dtype: DType, n: usize, k: usize) -> Vec<u8> {
        let row_bytes = dtype.row_bytes(k).unwrap();
        let mut w = Vec::with_capacity(n * row_bytes);
        for r in 0..n {
            if r % 2 == 1 && dtype.is_quantized() {
                let mut row: Vec<u8> = (0..row_bytes).map(|_| rng.random()).collect();
                for blk in row.chunks_mut(dtype.type_size()) {
                    for &at in scale_fields(dtype) {
                        let v = rng.random_range(0.001f32..0.1) * if rng.random() { 1.0 } else { -1.0 };
                        blk[at..at + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
                    }
                }
                w.extend(row);
            } else {
                let vals: Vec<f32> = (0..k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
                w.extend(kiln_ir::quant::quantize(dtype, &vals).unwrap());
            }
        }
        w
    }

    /// Checks `kernel` (for `dtype`, `k`) against dequantize + f64 dot products, for several m, n and row
    /// ranges; rows outside the range must keep their sentinel.
    fn check(rng: &mut StdRng, kernel: LinearKernelFn, dtype: DType, k: usize) {
        const SENTINEL: u32 = 0x7fc0_dead;
        for n in [1usize, 7, 33] {
            let w = random_weights(rng, dtype, n, k);
            let mut wf = vec![0f32; n * k];
            kiln_ir::quant::dequantize(dtype, &w, &mut wf).unwrap();
            // m ≥ 8 takes the panel path; 70 spans two x-row blocks with a partial tile.
            for m in [1usize, 2, 3, 5, 8, 9, 70] {
                let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
                for (rb, re) in [(0, n), (n / 3, n - n / 3), (n / 2, n / 2 + 1)] {
                    let mut y = vec![f32::from_bits(SENTINEL); m * n];
                    // SAFETY: buffers sized as the ABI requires.
                    unsafe { kernel(w.as_ptr(), x.as_ptr(), y.as_mut_ptr(), m as i64, n as i64, rb as i64, re as i64) };
                    for i in 0..m {
                        for r in 0..n {
                            let got = y[i * n + r];
                            if !(rb..re).contains(&r) {
                                assert_eq!(got.to_bits(), SENTINEL, "{dtype} k={k} n={n} m={m}: row {r} written");
                                continue;
                            }
                            let (mut want, mut mag) = (0f64, 0f64);
                            for j in 0..k {
                                let p = f64::from(wf[r * k + j]) * f64::from(x[i * k + j]);
                                want += p;
                                mag += p.abs();
                            }
                            assert!(
                                (f64::from(got) - want).abs() <= 1e-4 * mag + 1e-30,
                                "{dtype} k={k} n={n} m={m} rows {rb}..{re}: y[{i}][{r}] = {got} vs {want} (Σ|wx| {mag})"
                            );
                        }
                    }
                }
            }
        }
    }

    fn check_dtype(dtype: DType, ks: &[usize]) {
        let specs: Vec<LinearKernelSpec> = ks.iter().map(|&k| LinearKernelSpec::new(dtype, k)).collect();
        let mut rng = StdRng::seed_from_u64(dtype.ggml_id() as u64);
        with_kernels(&specs, |fns| {
            for (s, f) in specs.iter().zip(fns) {
                check(&mut rng, *f, s.dtype, s.k);
            }
        });
    }

    /// The residual variant stores the plain kernel's result plus `r` (up to rounding: LLVM may fold the
    /// add into the final horizontal sum), on the decode and panel paths, for row sub-ranges.
    #[test]
    fn residual_kernels_add_r_to_the_plain_result() {
        let mut rng = StdRng::seed_from_u64(99);
        for (dtype, k) in [(DType::Q4_1, 64), (DType::F16, 40), (DType::Q6K, 256)] {
            let specs = [LinearKernelSpec::new(dtype, k), LinearKernelSpec { dtype, k, residual: true }];
            with_kernels(&specs, |fns| {
                // SAFETY: the residual kernel was generated with this signature.
                let res: LinearResidualKernelFn = unsafe { std::mem::transmute(fns[1]) };
                let n = 13;
                let w = random_weights(&mut rng, dtype, n, k);
                for m in [1usize, 3, 9, 70] {
                    let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
                    let r: Vec<f32> = (0..m * n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
                    let (mut plain, mut with_r) = (vec![0f32; m * n], vec![0f32; m * n]);
                    // SAFETY: buffers sized as the ABI requires.
                    unsafe {
                        fns[0](w.as_ptr(), x.as_ptr(), plain.as_mut_ptr(), m as i64, n as i64, 0, n as i64);
                        res(w.as_ptr(), x.as_ptr(), with_r.as_mut_ptr(), m as i64, n as i64, 2, n as i64, r.as_ptr());
                        res(w.as_ptr(), x.as_ptr(), with_r.as_mut_ptr(), m as i64, n as i64, 0, 2, r.as_ptr());
                    }
                    for i in 0..m * n {
                        let want = plain[i] + r[i];
                        let tol = 1e-5 * (1.0 + plain[i].abs() + r[i].abs());
                        assert!((with_r[i] - want).abs() <= tol, "{dtype} k={k} m={m} [{i}]: {} vs {want}", with_r[i]);
                    }
                }
            });
        }
    }

    // The larger k (rows of over 4 KiB) make row chunks of a few rows, so n = 33 spans several.
    #[test]
    fn f32_matches_reference() {
        check_dtype(DType::F32, &[1, 8, 13, 64, 100, 2050]);
    }

    #[test]
    fn f16_matches_reference() {
        check_dtype(DType::F16, &[3, 40, 96]);
    }

    #[test]
    fn bf16_matches_reference() {
        check_dtype(DType::BF16, &[5, 32, 72]);
    }

    #[test]
    fn q4_0_matches_reference() {
        check_dtype(DType::Q4_0, &[32, 96, 576]);
    }

    #[test]
    fn q4_1_matches_reference() {
        check_dtype(DType::Q4_1, &[32, 96, 576]);
    }

    #[test]
    fn q5_0_matches_reference() {
        check_dtype(DType::Q5_0, &[32, 160]);
    }

    #[test]
    fn q5_1_matches_reference() {
        check_dtype(DType::Q5_1, &[32, 160]);
    }

    #[test]
    fn q8_0_matches_reference() {
        check_dtype(DType::Q8_0, &[32, 96, 576, 4096]);
    }

    #[test]
    fn q4_k_matches_reference() {
        check_dtype(DType::Q4K, &[256, 768]);
    }

    #[test]
    fn q5_k_matches_reference() {
        check_dtype(DType::Q5K, &[256, 512]);
    }

    #[test]
    fn q6_k_matches_reference() {
        check_dtype(DType::Q6K, &[256, 768]);
    }

    #[test]
    fn bad_specs_are_errors() {
        let ctx = Context::create();
        let module = llvm::create_module(&ctx, "bad");
        for dtype in [DType::I32, DType::I64] {
            let err = emit_linear(&ctx, &module, &LinearKernelSpec::new(dtype, 64)).unwrap_err();
            assert_eq!(err, CodegenError::UnsupportedDType { kernel: "linear", dtype });
            assert!(err.to_string().contains(dtype.name()), "{err}");
        }
        for (dtype, k) in [(DType::Q4_1, 48), (DType::Q6K, 576), (DType::F32, 0)] {
            let err = emit_linear(&ctx, &module, &LinearKernelSpec::new(dtype, k)).unwrap_err();
            assert!(matches!(err, CodegenError::InvalidSpec(_)) && err.to_string().contains(&k.to_string()), "{err}");
        }
        assert_eq!(module.get_functions().count(), 0, "nothing is left behind on error");
    }

    #[test]
    fn emits_host_object_and_assembly() {
        let ctx = Context::create();
        let module = llvm::create_module(&ctx, "linear_obj");
        let spec = LinearKernelSpec::new(DType::Q4_1, 576);
        let f = emit_linear(&ctx, &module, &spec).unwrap();
        // Emitting the same spec again returns the existing definition.
        assert_eq!(emit_linear(&ctx, &module, &spec).unwrap(), f);
        assert_eq!(spec.symbol(), "kiln_linear_q4_1_k576");
        let tm = llvm::host_target_machine().unwrap();
        llvm::optimize(&module, &tm).unwrap();
        let ir = llvm::ir_text(&module);
        assert!(ir.contains("define void @kiln_linear_q4_1_k576(") && ir.contains("<8 x float>"), "{ir}");
        let obj = llvm::emit_object(&module, &tm).unwrap();
        #[cfg(target_os = "linux")]
        assert_eq!(&obj[..4], b"\x7fELF");
        assert!(obj.windows(spec.symbol().len()).any(|w| w == spec.symbol().as_bytes()), "symbol in the object");
        let asm = llvm::emit_assembly(&module, &tm).unwrap();
        assert!(asm.contains("kiln_linear_q4_1_k576:"), "{asm}");
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("fma") && std::arch::is_x86_feature_detected!("avx2") {
            assert!(asm.contains("vfmadd") && asm.contains("%ymm"), "host kernel uses 256-bit FMAs");
        }
    }

    /// A CPU other than the host's: baseline x86-64 (SSE2, no FMA, no F16C). The 8-lane vectors are
    /// split in two and multiply-adds stay separate instructions rather than becoming `fmaf` calls.
    /// (f16 widening does become `__extendhfsf2` calls there: slow, but every AVX2 CPU has F16C.)
    #[test]
    fn emits_baseline_x86_64_object() {
        let ctx = Context::create();
        let module = llvm::create_module(&ctx, "linear_baseline");
        for dtype in [DType::Q4K, DType::F16] {
            emit_linear(&ctx, &module, &LinearKernelSpec::new(dtype, 256)).unwrap();
        }
        let triple = inkwell::targets::TargetTriple::create("x86_64-unknown-linux-gnu");
        let tm = llvm::target_machine(&triple, "x86-64", "").unwrap();
        llvm::optimize(&module, &tm).unwrap();
        let asm = llvm::emit_assembly(&module, &tm).unwrap();
        assert!(!asm.contains("%ymm") && !asm.contains("vfmadd"), "baseline x86-64 has no AVX or FMA");
        assert!(asm.contains("mulps") && !asm.contains("fmaf"), "multiply-adds are not libm calls");
        let obj = llvm::emit_object(&module, &tm).unwrap();
        assert_eq!(&obj[..4], b"\x7fELF");
    }
}

/// Timings for SmolLM2-135M's shapes against a naive Rust loop. Print-only; run with
/// `cargo test -p kiln-codegen --release -- --ignored --nocapture bench_linear`.
#[cfg(test)]
pub(crate) mod bench {
    use super::tests::{random_weights, with_kernels};
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::time::{Duration, Instant};

    /// Seconds per call of `f`: the best of 5 runs of enough calls to take ~0.1 s each.
    pub(crate) fn time_per_call(mut f: impl FnMut()) -> f64 {
        f();
        let start = Instant::now();
        f();
        let once = start.elapsed().max(Duration::from_nanos(100));
        let reps = (0.1 / once.as_secs_f64()).ceil().max(1.0) as usize;
        (0..5)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..reps {
                    f();
                }
                t.elapsed().as_secs_f64() / reps as f64
            })
            .fold(f64::INFINITY, f64::min)
    }

    /// The baseline: per weight row, dequantize block by block with `kiln_ir::quant::dequantize` (each
    /// block once, reused for all m rows of x) and accumulate plain f32 dot products.
    fn naive(dtype: DType, k: usize, w: &[u8], x: &[f32], y: &mut [f32], m: usize, n: usize) {
        let (bs, ts) = (dtype.block_size(), dtype.type_size());
        let row_bytes = dtype.row_bytes(k).unwrap();
        let mut buf = vec![0f32; bs];
        let mut acc = vec![0f32; m];
        for r in 0..n {
            acc.fill(0.0);
            for (b, blk) in w[r * row_bytes..(r + 1) * row_bytes].chunks_exact(ts).enumerate() {
                kiln_ir::quant::dequantize(dtype, blk, &mut buf).unwrap();
                for (i, a) in acc.iter_mut().enumerate() {
                    *a += buf.iter().zip(&x[i * k + b * bs..]).map(|(w, x)| w * x).sum::<f32>();
                }
            }
            for i in 0..m {
                y[i * n + r] = acc[i];
            }
        }
    }

    #[test]
    #[ignore = "benchmark; run with --release -- --ignored --nocapture"]
    fn bench_linear() {
        // SmolLM2-135M: attention/MLP projections (Q4_1) and the tied embedding as LM head (Q8_0).
        // `KILN_BENCH=q8_0:576:1536,...` benchmarks other (dtype:k:n) shapes instead.
        let mut shapes = vec![(DType::Q4_1, 576, 1536), (DType::Q4_1, 1536, 576), (DType::Q8_0, 576, 49152)];
        if let Ok(list) = std::env::var("KILN_BENCH") {
            shapes = list
                .split(',')
                .map(|s| {
                    let f: Vec<&str> = s.split(':').collect();
                    (f[0].parse().unwrap(), f[1].parse().unwrap(), f[2].parse().unwrap())
                })
                .collect();
        }
        let specs: Vec<LinearKernelSpec> =
            shapes.iter().map(|&(dtype, k, _)| LinearKernelSpec::new(dtype, k)).collect();
        let t = Instant::now();
        with_kernels(&specs, |fns| {
            println!("generate + O3 + JIT of {} kernels: {:.0} ms", specs.len(), t.elapsed().as_secs_f64() * 1e3);
            let mut rng = StdRng::seed_from_u64(1);
            println!(
                "{:<6} {:>5} {:>6} {:>3} | {:>10} {:>8} {:>7} | {:>10} {:>8} {:>7} | {:>7}",
                "dtype", "k", "n", "m", "kernel µs", "GFLOP/s", "GB/s", "naive µs", "GFLOP/s", "GB/s", "speedup"
            );
            for (&(dtype, k, n), f) in shapes.iter().zip(fns) {
                let w = random_weights(&mut rng, dtype, n, k);
                for m in [1usize, 64] {
                    let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
                    let mut y = vec![0f32; m * n];
                    // SAFETY: buffers sized as the ABI requires.
                    let tk = time_per_call(|| unsafe {
                        f(w.as_ptr(), x.as_ptr(), y.as_mut_ptr(), m as i64, n as i64, 0, n as i64)
                    });
                    let mut y_naive = vec![0f32; m * n];
                    let tn = time_per_call(|| naive(dtype, k, &w, &x, &mut y_naive, m, n));
                    let flops = 2.0 * (m * n * k) as f64;
                    let bytes = w.len() as f64;
                    println!(
                        "{:<6} {:>5} {:>6} {:>3} | {:>10.1} {:>8.2} {:>7.2} | {:>10.1} {:>8.2} {:>7.2} | {:>6.1}x",
                        dtype.name(),
                        k,
                        n,
                        m,
                        tk * 1e6,
                        flops / tk / 1e9,
                        bytes / tk / 1e9,
                        tn * 1e6,
                        flops / tn / 1e9,
                        bytes / tn / 1e9,
                        tn / tk
                    );
                    // Both sum in f32, in different orders: agreement to the largest output's rounding.
                    let scale = y_naive.iter().fold(0f32, |a, v| a.max(v.abs()));
                    for (a, b) in y.iter().zip(&y_naive) {
                        assert!((a - b).abs() <= 1e-4 * scale, "kernel {a} vs naive {b} (max |y| {scale})");
                    }
                }
            }
        });
    }
}
