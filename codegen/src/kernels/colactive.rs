//! Active-channel GEMV on the exact column-major block formats (`q4_0c`, `q4_1c`, `q8_0c`;
//! `kiln_ir::column`): `y = Σ_{j ∈ S} x_j · W[:, j]` reading the weight's own 4/8-bit codes and scales,
//! only those of the active channels (codes) and of the 32-channel blocks holding one (scales).
//!
//! The gathered formats (`q4_0g`, `q4_1g`, `q8_0g`: some channels of a column tensor and the scales of
//! the blocks they came from, structured pruning's weights) use the same kernel: `wt` points at the
//! codes, `blk[q]` names a block run (a scale row) instead of a 32-channel block, and that row holds the
//! run's `d` then `m` (the only difference in the generated code).
//!
//! One kernel per (format, `n`, group size `G`), with the C ABI
//! `fn(wt, idx: *const u32, bptr: *const u32, blk: *const u32, x, y, nb: i64, k: i64, rows: i64,
//! col_begin: i64, col_end: i64)`: `blk[0..nb]` are the active 32-channel blocks (increasing) and
//! `idx[bptr[q]..bptr[q+1]]` the listed channels of block `blk[q]`; `x` is `[rows, k]`, `y` `[rows, n]`
//! (`1 ≤ rows ≤ G`), and the call writes `y[i][col_begin..col_end]` for every `i < rows`.
//!
//! ```text
//! acc[g][col_begin..col_end] = 0                               // per row g of the group, on the stack
//! for each active block b
//!   t[g][..] = 0; s[g] = 0
//!   for each listed channel j of b                             // channel outside: its codes are one run
//!     for each group of 32 outputs c in col_begin..col_end
//!       q = the 32 codes of channel j at c                     // loaded once for the G rows
//!       t[g][c..c+32] += x[g][j] · q                           // (q − 8 for q4_0c)
//!     s[g] += x[g][j]
//!   acc[g][r] += d[b, r] · t[g][r]  (+ m[b, r] · s[g] for q4_1c)
//! y[g][col_begin..col_end] = acc[g]
//! ```
//!
//! The channel loop is outside the output loop so that each active channel's codes are read as one
//! contiguous run (streamed from memory) rather than 16 bytes at a time from rows 288 bytes apart;
//! `t` and `acc` live in L1 (`G · n` floats each), which measured ~1.6× less time in the kernel on
//! SmolLM2 decode (`docs/quality.md`).
//!
//! This is the row-major block's `Σ_j x_j (q_j·d + m)` with `d` and `m` factored out of the block's
//! sum, so it equals the interpreter on the dequantized weight up to f32 rounding. Decode uses `G = 1`;
//! prefill lists the union of a group's active channels (a row's entry of a channel it does not use is
//! 0 and adds exactly 0) and shares each code load and conversion between the `G` rows.

// The row loops index several per-row arrays in step; a range loop reads plainest.
#![allow(clippy::needless_range_loop)]

use super::linear::{Kb, Param, LANES, R};
use crate::CodegenError;
use inkwell::context::Context;
use inkwell::module::Module;
use inkwell::values::{FunctionValue, IntValue, PointerValue, VectorValue};
use kiln_ir::DType;
use std::ops::Range;

/// Rows a prefill kernel shares one code load between.
pub const PREFILL_GROUP: usize = 4;

/// Channels a decode kernel (`G = 1`) accumulates per load and store of `t` (half that with `G > 1`,
/// whose rows hold more vectors live).
const CHANNEL_BLOCK: usize = 4;

/// How far ahead in the list of active channels to prefetch their codes, in listed channels. Measured
/// with weights streamed from memory (`kernels::measure::measure_column_active`, 2-core EPYC): 8–16 are
/// best on SmolLM2's shapes; 16 KiB of codes ahead (57 channels of a 576-output row, 171 of a 192-output one)
/// left a small matrix's first rows unprefetched and made 576 → 192 1.3–1.7× dense time.
const PREFETCH_AHEAD: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct ColActiveKernelSpec {
    /// A column-major format (`DType::is_column`).
    pub dtype: DType,
    pub n: usize,
    /// Rows per call (`G`).
    pub group: usize,
}

pub type ColActiveKernelFn =
    unsafe extern "C" fn(*const u8, *const u32, *const u32, *const u32, *const f32, *mut f32, i64, i64, i64, i64, i64);

impl ColActiveKernelSpec {
    pub fn new(dtype: DType, n: usize, group: usize) -> Self {
        ColActiveKernelSpec { dtype, n, group }
    }

    /// e.g. `kiln_active_col_q4_1c_n576_g1`.
    pub fn symbol(&self) -> String {
        format!("kiln_active_col_{}_n{}_g{}", self.dtype.name(), self.n, self.group)
    }

    pub fn validate(&self) -> Result<(), CodegenError> {
        if self.dtype.column_layout().is_none() {
            return Err(CodegenError::UnsupportedDType { kernel: "column active-channel linear", dtype: self.dtype });
        }
        if self.n == 0 || !self.n.is_multiple_of(32) || self.n > 1 << 14 || !(1..=8).contains(&self.group) {
            return Err(CodegenError::InvalidSpec(format!(
                "column active-channel linear {}: n = {} must be a positive multiple of 32 and the group 1..=8 (got {})",
                self.dtype, self.n, self.group
            )));
        }
        Ok(())
    }
}

/// The 32 codes of a channel at one output group as four `<8 x float>` (outputs 0..8, 8..16, 16..24,
/// 24..32), shifted by −8 for q4_0c.
fn codes<'ctx>(kb: &Kb<'_, 'ctx>, dtype: DType, at: PointerValue<'ctx>) -> R<[VectorValue<'ctx>; 4]> {
    let b = &kb.b;
    let mut out = Vec::with_capacity(4);
    if dtype == DType::Q8_0C {
        for c in 0..4 {
            let v = kb.load(kb.v8i8.into(), kb.byte_gep(at, 8 * c)?, 1)?.into_vector_value();
            let v = b.build_int_s_extend(v, kb.v8i32, "q")?;
            out.push(b.build_signed_int_to_float(v, kb.v8f32, "qf")?);
        }
    } else {
        let half = |o: usize| -> R<VectorValue<'ctx>> {
            let v = kb.load(kb.v8i8.into(), kb.byte_gep(at, o)?, 1)?.into_vector_value();
            Ok(b.build_int_z_extend(v, kb.v8i32, "bytes")?)
        };
        let (lo8, hi8) = (half(0)?, half(8)?);
        for (v, high) in [(lo8, false), (hi8, false), (lo8, true), (hi8, true)] {
            let mut q = if high {
                b.build_right_shift(v, kb.splat_i32(4), false, "hi")?
            } else {
                b.build_and(v, kb.splat_i32(0x0F), "lo")?
            };
            if dtype == DType::Q4_0C {
                q = b.build_int_sub(q, kb.splat_i32(8), "q8")?;
            }
            out.push(b.build_signed_int_to_float(q, kb.v8f32, "qf")?);
        }
    }
    Ok([out[0], out[1], out[2], out[3]])
}

/// Eight f16 at `at`, widened to `<8 x float>`.
fn f16x8<'ctx>(kb: &Kb<'_, 'ctx>, at: PointerValue<'ctx>) -> R<VectorValue<'ctx>> {
    let h = kb.load(kb.i16t.vec_type(LANES).into(), at, 2)?;
    let h = kb.b.build_bit_cast(h, kb.ctx.f16_type().vec_type(LANES), "h")?.into_vector_value();
    Ok(kb.b.build_float_ext(h, kb.v8f32, "scale")?)
}

/// Emits the kernel for `spec` (or returns it if already in `module`).
pub fn emit_col_active<'ctx>(
    ctx: &'ctx Context,
    module: &Module<'ctx>,
    spec: &ColActiveKernelSpec,
) -> Result<FunctionValue<'ctx>, CodegenError> {
    spec.validate()?;
    let name = spec.symbol();
    if let Some(f) = super::linear::defined_kernel(module, &name)? {
        return Ok(f);
    }
    use Param::*;
    let params = [
        ("wt", In),
        ("idx", In),
        ("bptr", In),
        ("blk", In),
        ("x", In),
        ("y", Out),
        ("nb", Int),
        ("k", Int),
        ("rows", Int),
        ("col_begin", Int),
        ("col_end", Int),
    ];
    let kb = &Kb::declare(ctx, module, &name, &params)?;
    let p = |i: u32| kb.func.get_nth_param(i).expect("11 params");
    let [wt, idx, bptr, blk, x, y] = [0, 1, 2, 3, 4, 5].map(|i| p(i).into_pointer_value());
    let [nb, k, rows, cb, ce] = [6, 7, 8, 9, 10].map(|i| p(i).into_int_value());
    let (n, g) = (spec.n, spec.group);
    // A gathered format reads its codes like its column format; only where a block's scales lie differs.
    let dtype = spec.dtype.column_layout().expect("validated");
    let gathered = spec.dtype.is_gathered();
    let b = &kb.b;
    let crow = kiln_ir::column::code_row_bytes(dtype, n) as i64;
    let with_min = dtype == DType::Q4_1C;
    // d table at k·crow bytes, m table (q4_1c) n·k/32·2 bytes after it; gathered: scale rows at k·crow,
    // row q = d then m of block run q.
    let d_tab = kb.gep(kb.i8t.into(), wt, b.build_int_nsw_mul(k, kb.i64c(crow), "dat")?)?;
    let m_tab = {
        let tab = b.build_int_nsw_mul(b.build_int_signed_div(k, kb.i64c(32), "kb")?, kb.i64c(2 * n as i64), "tab")?;
        kb.gep(kb.i8t.into(), d_tab, tab)?
    };
    // Row g of the group reads x row min(g, rows − 1): rows past `rows` repeat the last one and are
    // stored first, so the real row's store comes last.
    let last = b.build_int_nsw_sub(rows, kb.i64c(1), "last")?;
    let row_of = |gi: usize| -> R<IntValue<'ctx>> { kb.imin(kb.i64c(gi as i64), last) };
    let x_rows: Vec<PointerValue<'ctx>> =
        (0..g).map(|gi| kb.gep(kb.f32t.into(), x, b.build_int_nsw_mul(row_of(gi)?, k, "xo")?)).collect::<R<_>>()?;
    // Per row: `t` (the current block's sums) and `acc` (the result) for all n outputs, on the stack;
    // only `col_begin..col_end` of them are used.
    let buf = |name: &str| -> R<PointerValue<'ctx>> {
        let p = kb.entry_alloca(kb.f32t.array_type((g * n) as u32).into())?;
        p.set_name(name);
        Ok(p)
    };
    let (tbuf, abuf) = (buf("t")?, buf("acc")?);
    let s: Vec<PointerValue<'ctx>> = (0..g).map(|_| kb.entry_alloca(kb.f32t.into())).collect::<R<_>>()?;
    let zero = kb.v8f32.const_zero();
    let group_bytes = if dtype == DType::Q8_0C { 32 } else { 16 };
    let vec_at = |base: PointerValue<'ctx>, gi: usize, c0: IntValue<'ctx>, c: usize| -> R<PointerValue<'ctx>> {
        let at = b.build_int_nsw_add(c0, kb.i64c((gi * n + 8 * c) as i64), "v")?;
        kb.gep(kb.f32t.into(), base, at)
    };
    let over_cols = |body: &dyn Fn(IntValue<'ctx>) -> R<()>| kb.for_loop(cb, ce, kb.i64c(32), "ogrp", body);
    over_cols(&|c0| {
        for gi in 0..g {
            for c in 0..4 {
                kb.store(vec_at(abuf, gi, c0, c)?, zero.into(), 4)?;
            }
        }
        Ok(())
    })?;
    let ld_u32 = |base: PointerValue<'ctx>, at: IntValue<'ctx>| -> R<IntValue<'ctx>> {
        let v = kb.load(kb.i32t.into(), kb.gep(kb.i32t.into(), base, at)?, 4)?.into_int_value();
        Ok(b.build_int_z_extend(v, kb.i64t, "u")?)
    };
    // Weights are prefetched PREFETCH_AHEAD listed channels in front of the one being read: the
    // hardware prefetchers follow the sequence of rows, not which rows are listed, so without this the
    // kernel streams skipped rows too and its time hardly falls with sparsity.
    let last_listed = b.build_int_nsw_sub(ld_u32(bptr, nb)?, kb.i64c(1), "lastp")?;
    // Within a channel's code row: the offset of output column `c` (a multiple of 32), and the bytes of
    // columns col_begin..col_end.
    let to_bytes = |c: IntValue<'ctx>| -> R<IntValue<'ctx>> {
        Ok(b.build_int_nsw_mul(b.build_int_signed_div(c, kb.i64c(32), "grp")?, kb.i64c(group_bytes), "coff")?)
    };
    let span_off = to_bytes(cb)?;
    let span_len = b.build_int_nsw_sub(to_bytes(ce)?, span_off, "span")?;
    let span_last = kb.imax(b.build_int_nsw_sub(span_len, kb.i64c(1), "sl")?, kb.i64c(0))?;
    kb.for_loop(kb.i64c(0), nb, kb.i64c(1), "ablk", |q| {
        over_cols(&|c0| {
            for gi in 0..g {
                for c in 0..4 {
                    kb.store(vec_at(tbuf, gi, c0, c)?, zero.into(), 4)?;
                }
            }
            Ok(())
        })?;
        for ss in &s {
            kb.store(*ss, kb.f32t.const_zero().into(), 4)?;
        }
        let p0 = ld_u32(bptr, q)?;
        let p1 = ld_u32(bptr, b.build_int_nsw_add(q, kb.i64c(1), "q1")?)?;
        // Channel outside, outputs inside: each active channel's codes are read as one contiguous run.
        // `u` channels at a time share each load and store of `t` (register blocking: one channel at a
        // time spends two memory operations of `t` per FMA, which starves the weight stream of
        // outstanding loads once the weights come from memory rather than cache); the rest one by one.
        let chans = |pis: &[IntValue<'ctx>]| -> R<()> {
            // Per listed channel: its code row and, per row of the group, x (scalar and splat).
            type XS<'c> = Vec<(inkwell::values::BasicValueEnum<'c>, VectorValue<'c>)>;
            let mut rows_of = Vec::with_capacity(pis.len());
            let mut xs_of: Vec<XS<'ctx>> = Vec::with_capacity(pis.len());
            for &pi in pis {
                // The codes this call reads of the channel PREFETCH_AHEAD places later in the list (the
                // last one near the end): its columns col_begin..col_end, every cache line of them (a
                // thread's share only, so threads do not fetch each other's columns).
                let later = kb.imin(b.build_int_nsw_add(pi, kb.i64c(PREFETCH_AHEAD as i64), "later")?, last_listed)?;
                let later_row = b.build_int_nsw_mul(ld_u32(idx, later)?, kb.i64c(crow), "lrow")?;
                let base = kb.gep(kb.i8t.into(), wt, b.build_int_nsw_add(later_row, span_off, "lcol")?)?;
                kb.for_loop(kb.i64c(0), span_len, kb.i64c(64), "pf", |off| {
                    kb.prefetch(kb.gep(kb.i8t.into(), base, off)?, 0)
                })?;
                kb.prefetch(kb.gep(kb.i8t.into(), base, span_last)?, 0)?;
                let j = ld_u32(idx, pi)?;
                rows_of.push(b.build_int_nsw_mul(j, kb.i64c(crow), "row")?);
                xs_of.push(
                    (0..g)
                        .map(|gi| -> R<_> {
                            let xj = kb.load(kb.f32t.into(), kb.gep(kb.f32t.into(), x_rows[gi], j)?, 4)?;
                            Ok((xj, kb.splat(xj, kb.v8f32)?))
                        })
                        .collect::<R<_>>()?,
                );
            }
            over_cols(&|c0| {
                let off = to_bytes(c0)?;
                let qvs: Vec<[VectorValue<'ctx>; 4]> = rows_of
                    .iter()
                    .map(|&row| codes(kb, dtype, kb.gep(kb.i8t.into(), wt, b.build_int_nsw_add(row, off, "at")?)?))
                    .collect::<R<_>>()?;
                for gi in 0..g {
                    for c in 0..4 {
                        let p = vec_at(tbuf, gi, c0, c)?;
                        let mut tv = kb.load(kb.v8f32.into(), p, 4)?.into_vector_value();
                        for (qv, xs) in qvs.iter().zip(&xs_of) {
                            tv = kb.fma(qv[c], xs[gi].1, tv)?;
                        }
                        kb.store(p, tv.into(), 4)?;
                    }
                }
                Ok(())
            })?;
            if with_min {
                for gi in 0..g {
                    let mut sv = kb.load(kb.f32t.into(), s[gi], 4)?.into_float_value();
                    for xs in &xs_of {
                        sv = b.build_float_add(sv, xs[gi].0.into_float_value(), "s")?;
                    }
                    kb.store(s[gi], sv.into(), 4)?;
                }
            }
            Ok(())
        };
        let u = if g == 1 { CHANNEL_BLOCK } else { CHANNEL_BLOCK / 2 };
        let whole = {
            let cnt = b.build_int_nsw_sub(p1, p0, "cnt")?;
            let blocks = b.build_int_signed_div(cnt, kb.i64c(u as i64), "nblk")?;
            b.build_int_nsw_add(p0, b.build_int_nsw_mul(blocks, kb.i64c(u as i64), "span")?, "whole")?
        };
        kb.for_loop(p0, whole, kb.i64c(u as i64), "chanu", |pi| {
            let pis: Vec<IntValue<'ctx>> =
                (0..u).map(|i| b.build_int_nsw_add(pi, kb.i64c(i as i64), "pu")).collect::<Result<_, _>>()?;
            chans(&pis)
        })?;
        kb.for_loop(whole, p1, kb.i64c(1), "chan", |pi| chans(&[pi]))?;
        // acc += d[b, r]·t[r] (+ m[b, r]·s): scales of block blk[q], entry (b·n + r) of each table.
        let bi = ld_u32(blk, q)?;
        let row_len = if gathered { kiln_ir::column::scale_tables(dtype) * n } else { n };
        let bn = b.build_int_nsw_mul(bi, kb.i64c(row_len as i64), "bn")?;
        let svs: Vec<Option<VectorValue<'ctx>>> = (0..g)
            .map(|gi| -> R<_> {
                if with_min {
                    let sv = kb.load(kb.f32t.into(), s[gi], 4)?;
                    Ok(Some(kb.splat(sv, kb.v8f32)?))
                } else {
                    Ok(None)
                }
            })
            .collect::<R<_>>()?;
        over_cols(&|c0| {
            for c in 0..4 {
                let e = b.build_int_nsw_add(b.build_int_nsw_add(bn, c0, "sb")?, kb.i64c(8 * c as i64), "e")?;
                let d = f16x8(kb, kb.gep(kb.i16t.into(), d_tab, e)?)?;
                let m = match (with_min, gathered) {
                    (false, _) => None,
                    (true, false) => Some(f16x8(kb, kb.gep(kb.i16t.into(), m_tab, e)?)?),
                    (true, true) => {
                        let em = b.build_int_nsw_add(e, kb.i64c(n as i64), "em")?;
                        Some(f16x8(kb, kb.gep(kb.i16t.into(), d_tab, em)?)?)
                    }
                };
                for gi in 0..g {
                    let pa = vec_at(abuf, gi, c0, c)?;
                    let a = kb.load(kb.v8f32.into(), pa, 4)?.into_vector_value();
                    let tv = kb.load(kb.v8f32.into(), vec_at(tbuf, gi, c0, c)?, 4)?.into_vector_value();
                    let mut a = kb.fma(d, tv, a)?;
                    if let (Some(m), Some(sv)) = (m, svs[gi]) {
                        a = kb.fma(m, sv, a)?;
                    }
                    kb.store(pa, a.into(), 4)?;
                }
            }
            Ok(())
        })
    })?;
    // Rows past `rows` repeat the last real one; storing in reverse leaves the real row's values.
    over_cols(&|c0| {
        for gi in (0..g).rev() {
            let yrow = kb.gep(kb.f32t.into(), y, b.build_int_nsw_mul(row_of(gi)?, kb.i64c(n as i64), "yo")?)?;
            for c in 0..4 {
                let v = kb.load(kb.v8f32.into(), vec_at(abuf, gi, c0, c)?, 4)?;
                let at = b.build_int_nsw_add(c0, kb.i64c(8 * c as i64), "yc")?;
                kb.store(kb.gep(kb.f32t.into(), yrow, at)?, v, 4)?;
            }
        }
        Ok(())
    })?;
    kb.b.build_return(None)?;
    kb.verified(&name)
}

/// The active-block lists of channels `idx` (increasing, each `< k`): `(bptr, blk)` as the kernel
/// takes them.
pub fn block_lists(idx: &[u32]) -> (Vec<u32>, Vec<u32>) {
    block_lists_by(idx, |j| j / 32)
}

/// [`block_lists`] with the block of channel `j` given by `block_of` (non-decreasing in `j`): for a
/// gathered weight, the index of the block run holding kept channel `j`.
pub fn block_lists_by(idx: &[u32], block_of: impl Fn(u32) -> u32) -> (Vec<u32>, Vec<u32>) {
    let (mut bptr, mut blk) = (vec![0u32], Vec::new());
    for (p, &j) in idx.iter().enumerate() {
        if blk.last() != Some(&block_of(j)) {
            if !blk.is_empty() {
                bptr.push(p as u32);
            }
            blk.push(block_of(j));
        }
    }
    if !blk.is_empty() {
        bptr.push(idx.len() as u32);
    }
    (bptr, blk)
}

/// Calls a column kernel after checking what it trusts: `wt` is a `[k, n]` column tensor (or a gathered
/// one with a consistent header, `kiln_ir::column::gathered_parts`), `idx` is increasing and `< k`, `x`
/// has `rows · k` floats, `y` `rows · n`, `rows` is `1..=G`, and `cols` is whole 32-output groups
/// within `0..n`.
#[allow(clippy::too_many_arguments)]
pub fn run_col_active(
    kernel: ColActiveKernelFn,
    spec: &ColActiveKernelSpec,
    wt: &[u8],
    k: usize,
    idx: &[u32],
    x: &[f32],
    y: &mut [f32],
    rows: usize,
    cols: Range<usize>,
) -> Result<(), CodegenError> {
    spec.validate()?;
    let bad = |what: String| Err(CodegenError::InvalidSpec(format!("{}: {what}", spec.symbol())));
    let (codes, runs) = if spec.dtype.is_gathered() {
        match kiln_ir::column::gathered_parts(spec.dtype, k, spec.n, wt) {
            Ok((runs, codes, _)) if k <= i32::MAX as usize => (codes, Some(runs)),
            Ok(_) => return bad(format!("k = {k} is too large")),
            Err(e) => return bad(format!("weight: {e}")),
        }
    } else {
        let want = k.checked_mul(spec.n).map(|e| e / 32 * spec.dtype.type_size());
        if !k.is_multiple_of(32) || k == 0 || Some(wt.len()) != want || k > i32::MAX as usize {
            return bad(format!("{} weight bytes for k = {k} (a positive multiple of 32)", wt.len()));
        }
        (0, None)
    };
    if idx.windows(2).any(|w| w[0] >= w[1]) || idx.last().is_some_and(|&j| j as usize >= k) {
        return bad(format!("channel list is not increasing within 0..{k}"));
    }
    if !(1..=spec.group).contains(&rows) || x.len() != rows * k || y.len() != rows * spec.n {
        return bad(format!("{rows} rows, x {} floats, y {} (k = {k}, n = {})", x.len(), y.len(), spec.n));
    }
    let whole = |v: usize| v.is_multiple_of(32);
    if cols.start > cols.end || cols.end > spec.n || !whole(cols.start) || !whole(cols.end) {
        return bad(format!("columns {cols:?} are not whole groups of 32 within 0..{}", spec.n));
    }
    let (bptr, blk) = match &runs {
        // The run holding kept channel j: the last q with runs[q] ≤ j.
        Some(runs) => block_lists_by(idx, |j| (runs.partition_point(|&p| p <= j) - 1) as u32),
        None => block_lists(idx),
    };
    // SAFETY: checked above: every listed channel is a row of `wt` and an entry of each x row, every
    // block's scales lie in the tables, and the written columns lie in every y row.
    unsafe {
        kernel(
            wt[codes..].as_ptr(),
            idx.as_ptr(),
            bptr.as_ptr(),
            blk.as_ptr(),
            x.as_ptr(),
            y.as_mut_ptr(),
            blk.len() as i64,
            k as i64,
            rows as i64,
            cols.start as i64,
            cols.end as i64,
        )
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::linear::tests::random_weights;
    use super::*;
    use crate::llvm;
    use inkwell::OptimizationLevel;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const SENTINEL: u32 = 0x7fc0_dead;

    /// The column kernels (decode G = 1 and prefill groups) against the interpreter's arithmetic on the
    /// ORIGINAL row-major weight: dequantize `W [n, k]` with `quant::dequantize`, then an f64 sum of
    /// `x_j · W[r, j]` over each row's non-zero channels. Unlisted x entries (every entry of a single
    /// row that is not active) are NaN, so a kernel that reads one fails; a group's rows use different
    /// active sets (0 in the entries of the union a row does not use); unwritten columns keep a sentinel.
    #[test]
    fn column_kernels_match_the_original_weight() {
        let mut rng = StdRng::seed_from_u64(31);
        let ns = [32usize, 96, 160];
        for base in [DType::Q4_0, DType::Q4_1, DType::Q8_0] {
            let dtype = base.column_of().unwrap();
            let ctx = Context::create();
            let module = llvm::create_module(&ctx, "col_test");
            let specs: Vec<ColActiveKernelSpec> =
                ns.iter().flat_map(|&n| [1, 3, PREFILL_GROUP].map(|g| ColActiveKernelSpec::new(dtype, n, g))).collect();
            for s in &specs {
                emit_col_active(&ctx, &module, s).unwrap();
            }
            let tm = llvm::host_target_machine().unwrap();
            llvm::optimize(&module, &tm).unwrap();
            let ee = module.create_jit_execution_engine(OptimizationLevel::Aggressive).unwrap();
            for spec in &specs {
                // SAFETY: generated with exactly this signature.
                let f = unsafe {
                    std::mem::transmute::<usize, ColActiveKernelFn>(ee.get_function_address(&spec.symbol()).unwrap())
                };
                let n = spec.n;
                for k in [32usize, 96] {
                    let w = random_weights(&mut rng, base, n, k);
                    let mut wf = vec![0f32; n * k];
                    kiln_ir::quant::dequantize(base, &w, &mut wf).unwrap();
                    let (_, wt) = kiln_ir::column::from_rows(base, n, k, &w).unwrap();
                    for share in [0.0, 0.05, 0.3, 0.7, 1.0] {
                        for rows in 1..=spec.group {
                            // Per row: its own active set.
                            let act: Vec<Vec<bool>> =
                                (0..rows).map(|_| (0..k).map(|_| rng.random_bool(share)).collect()).collect();
                            let idx: Vec<u32> = (0..k as u32).filter(|&j| act.iter().any(|a| a[j as usize])).collect();
                            let mut x = vec![0f32; rows * k];
                            for (i, a) in act.iter().enumerate() {
                                for j in 0..k {
                                    x[i * k + j] = if a[j] {
                                        rng.random_range(-1.0f32..1.0)
                                    } else if idx.binary_search(&(j as u32)).is_ok() {
                                        0.0
                                    } else {
                                        f32::NAN
                                    };
                                }
                            }
                            for cols in [0..n, n - 32..n] {
                                let mut y = vec![f32::from_bits(SENTINEL); rows * n];
                                run_col_active(f, spec, &wt, k, &idx, &x, &mut y, rows, cols.clone()).unwrap();
                                for i in 0..rows {
                                    for r in 0..n {
                                        let got = y[i * n + r];
                                        let what =
                                            format!("{} k={k} share {share} row {i}/{rows} y[{r}]", spec.symbol());
                                        if !cols.contains(&r) {
                                            assert_eq!(got.to_bits(), SENTINEL, "{what} written");
                                            continue;
                                        }
                                        // The kernel factors d and m out of each block's sum, so its
                                        // rounding scales with |x_j| · (|q·d| + |m|) ≤ |x_j| · 3 max|w|
                                        // over the block rather than with |x_j · w_j|.
                                        let (mut want, mut mag) = (0f64, 0f64);
                                        for j in (0..k).filter(|&j| act[i][j]) {
                                            let p = f64::from(x[i * k + j]) * f64::from(wf[r * k + j]);
                                            want += p;
                                            let blk = &wf[r * k + j / 32 * 32..r * k + j / 32 * 32 + 32];
                                            let wmax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
                                            mag += f64::from(x[i * k + j]).abs() * 3.0 * f64::from(wmax);
                                        }
                                        assert!(
                                            (f64::from(got) - want).abs() <= 1e-5 * mag + 1e-30,
                                            "{what} = {got} vs {want}"
                                        );
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Gathered weights (structured pruning): the same kernels on some channels of a weight, against
    /// the ORIGINAL row-major weight's kept columns (exact dequantization, f64 sums): every kept channel
    /// listed (the dense-input case structured pruning uses) and random subsets, decode and prefill
    /// groups, all columns and the last group.
    #[test]
    fn gathered_kernels_match_the_original_kept_columns() {
        let mut rng = StdRng::seed_from_u64(33);
        for base in [DType::Q4_0, DType::Q4_1, DType::Q8_0] {
            let dtype = base.gathered_of().unwrap();
            let ctx = Context::create();
            let module = llvm::create_module(&ctx, "gth_test");
            let specs: Vec<ColActiveKernelSpec> = [32usize, 96]
                .iter()
                .flat_map(|&n| [1, PREFILL_GROUP].map(|g| ColActiveKernelSpec::new(dtype, n, g)))
                .collect();
            for s in &specs {
                emit_col_active(&ctx, &module, s).unwrap();
            }
            llvm::optimize(&module, &llvm::host_target_machine().unwrap()).unwrap();
            let ee = module.create_jit_execution_engine(OptimizationLevel::Aggressive).unwrap();
            for spec in &specs {
                // SAFETY: generated with exactly this signature.
                let f = unsafe {
                    std::mem::transmute::<usize, ColActiveKernelFn>(ee.get_function_address(&spec.symbol()).unwrap())
                };
                let (n, k) = (spec.n, 160);
                let w = random_weights(&mut rng, base, n, k);
                let mut wf = vec![0f32; n * k];
                kiln_ir::quant::dequantize(base, &w, &mut wf).unwrap();
                for keep in [0.3, 0.75, 1.0] {
                    let kept: Vec<usize> = (0..k).filter(|_| rng.random_bool(keep)).collect();
                    let (_, wg) = kiln_ir::column::gather(base, n, k, &w, &kept).unwrap();
                    let kk = kept.len();
                    for share in [1.0, 0.4] {
                        for rows in [1, spec.group] {
                            let act: Vec<Vec<bool>> =
                                (0..rows).map(|_| (0..kk).map(|_| rng.random_bool(share)).collect()).collect();
                            let idx: Vec<u32> = (0..kk as u32).filter(|&j| act.iter().any(|a| a[j as usize])).collect();
                            let x: Vec<f32> = (0..rows * kk)
                                .map(|e| if act[e / kk][e % kk] { rng.random_range(-1.0f32..1.0) } else { 0.0 })
                                .collect();
                            for cols in [0..n, n - 32..n] {
                                let mut y = vec![f32::from_bits(SENTINEL); rows * n];
                                run_col_active(f, spec, &wg, kk, &idx, &x, &mut y, rows, cols.clone()).unwrap();
                                for i in 0..rows {
                                    for r in 0..n {
                                        let got = y[i * n + r];
                                        let what =
                                            format!("{} keep {keep} share {share} row {i} y[{r}]", spec.symbol());
                                        if !cols.contains(&r) {
                                            assert_eq!(got.to_bits(), SENTINEL, "{what} written");
                                            continue;
                                        }
                                        let (mut want, mut mag) = (0f64, 0f64);
                                        for (jj, &j) in kept.iter().enumerate().filter(|(jj, _)| act[i][*jj]) {
                                            let xv = f64::from(x[i * kk + jj]);
                                            want += xv * f64::from(wf[r * k + j]);
                                            let blk = &wf[r * k + j / 32 * 32..r * k + j / 32 * 32 + 32];
                                            mag += xv.abs()
                                                * 3.0
                                                * f64::from(blk.iter().fold(0f32, |a, v| a.max(v.abs())));
                                        }
                                        assert!(
                                            (f64::from(got) - want).abs() <= 1e-5 * mag + 1e-30,
                                            "{what} = {got} vs {want}"
                                        );
                                    }
                                }
                            }
                        }
                    }
                }
                // A header that does not match the shape is refused before the kernel runs.
                let (_, wg) = kiln_ir::column::gather(base, n, k, &w, &[0, 1, 40]).unwrap();
                let mut y = vec![0f32; n];
                let err = run_col_active(f, spec, &wg, 2, &[0], &[1.0; 2], &mut y[..], 1, 0..n).unwrap_err();
                assert!(err.to_string().contains("weight"), "{err}");
            }
        }
    }

    /// The entry point refuses what the kernel would read or write out of bounds.
    #[test]
    fn column_kernel_bad_inputs_are_errors() {
        let mut rng = StdRng::seed_from_u64(32);
        let (base, n, k) = (DType::Q4_1, 64, 64);
        let spec = ColActiveKernelSpec::new(DType::Q4_1C, n, 2);
        let ctx = Context::create();
        let module = llvm::create_module(&ctx, "col_bad");
        emit_col_active(&ctx, &module, &spec).unwrap();
        let ee = module.create_jit_execution_engine(OptimizationLevel::None).unwrap();
        // SAFETY: generated with exactly this signature.
        let f = unsafe {
            std::mem::transmute::<usize, ColActiveKernelFn>(ee.get_function_address(&spec.symbol()).unwrap())
        };
        let (_, wt) = kiln_ir::column::from_rows(base, n, k, &random_weights(&mut rng, base, n, k)).unwrap();
        let x = vec![1f32; k];
        let mut y = vec![0f32; n];
        run_col_active(f, &spec, &wt, k, &[0, 40], &x, &mut y, 1, 0..n).unwrap();
        type Case<'a> = (&'a [u8], &'a [u32], usize, Range<usize>, &'a str);
        let cases: Vec<Case> = vec![
            (&wt[1..], &[0], 1, 0..n, "weight bytes"),
            (&wt, &[64], 1, 0..n, "not increasing"),
            (&wt, &[3, 3], 1, 0..n, "not increasing"),
            (&wt, &[0], 2, 0..n, "2 rows"),
            (&wt, &[0], 1, 0..n + 32, "whole groups"),
            (&wt, &[0], 1, 16..n, "whole groups"),
        ];
        for (w, idx, rows, cols, want) in cases {
            let mut yy = vec![f32::from_bits(SENTINEL); n];
            let err = run_col_active(f, &spec, w, k, idx, &x, &mut yy, rows, cols).unwrap_err();
            assert!(err.to_string().contains(want), "want {want:?} in {err}");
            assert!(yy.iter().all(|v| v.to_bits() == SENTINEL), "{want}: y was written");
        }
        for s in [ColActiveKernelSpec::new(DType::Q4_1, 64, 1), ColActiveKernelSpec::new(DType::Q4_1C, 48, 1)] {
            assert!(emit_col_active(&ctx, &module, &s).is_err());
        }
    }
}

#[cfg(test)]
mod bench {
    use super::super::linear::bench::time_per_call;
    use super::super::linear::tests::random_weights;
    use super::super::linear::{emit_linear, LinearKernelFn, LinearKernelSpec};
    use super::super::sparse::{emit_active_linear, run_active_linear, ActiveLinearKernelFn, ActiveLinearKernelSpec};
    use super::*;
    use crate::llvm;
    use inkwell::OptimizationLevel;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Structured pruning's down projection on SmolLM2's shape (Q4_1, 1536 → 576) per share of neurons
    /// dropped: the dense Q4_1 linear on all 1536 channels, the old path (the kept columns requantized
    /// to Q8_0, kept count rounded to 32, dense Q8_0 linear) and the gathered `q4_1g` kernels with every
    /// kept channel listed (decode G = 1, prefill groups of `PREFILL_GROUP`); m = 1 and m = 64.
    #[test]
    #[ignore = "benchmark; run with -- --ignored --nocapture"]
    fn bench_gathered_down() {
        let (base, k, n) = (DType::Q4_1, 1536, 576);
        let mut rng = StdRng::seed_from_u64(5);
        let w = random_weights(&mut rng, base, n, k);
        let mut wf = vec![0f32; n * k];
        kiln_ir::quant::dequantize(base, &w, &mut wf).unwrap();
        println!(
            "{:>3} {:>5} | {:>8} {:>8} {:>8} | {:>6} {:>6} | {:>7} {:>7} {:>7}",
            "m", "drop", "dense µs", "q8_0 µs", "q4_1g µs", "q8/d", "g/d", "dense B", "q8_0 B", "q4_1g B"
        );
        for m in [1usize, 64] {
            for drop in [0.05, 0.1, 0.25, 0.5] {
                let keep = k - (drop * k as f64).round() as usize;
                let mut all: Vec<usize> = (0..k).collect();
                for i in (1..k).rev() {
                    all.swap(i, rng.random_range(0..=i));
                }
                let pick = |c: usize| {
                    let mut v = all[..c].to_vec();
                    v.sort_unstable();
                    v
                };
                // The old path kept a multiple of 32 (nearest).
                let (kept, k8) = (pick(keep), (keep + 16) / 32 * 32);
                let kept8 = pick(k8);
                let cols: Vec<f32> =
                    (0..n).flat_map(|r| kept8.iter().map(move |&j| (r, j))).map(|(r, j)| wf[r * k + j]).collect();
                let w8 = kiln_ir::quant::quantize(DType::Q8_0, &cols).unwrap();
                let (gd, wg) = kiln_ir::column::gather(base, n, k, &w, &kept).unwrap();
                let ctx = Context::create();
                let module = llvm::create_module(&ctx, "gbench");
                let (dspec, qspec) = (LinearKernelSpec::new(base, k), LinearKernelSpec::new(DType::Q8_0, k8));
                let (g1, gg) = (ColActiveKernelSpec::new(gd, n, 1), ColActiveKernelSpec::new(gd, n, PREFILL_GROUP));
                emit_linear(&ctx, &module, &dspec).unwrap();
                emit_linear(&ctx, &module, &qspec).unwrap();
                emit_col_active(&ctx, &module, &g1).unwrap();
                emit_col_active(&ctx, &module, &gg).unwrap();
                llvm::optimize(&module, &llvm::host_target_machine().unwrap()).unwrap();
                let ee = module.create_jit_execution_engine(OptimizationLevel::Aggressive).unwrap();
                let addr = |s: &str| ee.get_function_address(s).unwrap();
                // SAFETY: generated with exactly these signatures.
                let (dense, q8, col1, colg) = unsafe {
                    (
                        std::mem::transmute::<usize, LinearKernelFn>(addr(&dspec.symbol())),
                        std::mem::transmute::<usize, LinearKernelFn>(addr(&qspec.symbol())),
                        std::mem::transmute::<usize, ColActiveKernelFn>(addr(&g1.symbol())),
                        std::mem::transmute::<usize, ColActiveKernelFn>(addr(&gg.symbol())),
                    )
                };
                let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
                let xk: Vec<f32> = (0..m * keep).map(|_| rng.random_range(-1.0f32..1.0)).collect();
                let x8: Vec<f32> = (0..m * k8).map(|_| rng.random_range(-1.0f32..1.0)).collect();
                let mut y = vec![0f32; m * n];
                let td = time_per_call(|| unsafe {
                    dense(w.as_ptr(), x.as_ptr(), y.as_mut_ptr(), m as i64, n as i64, 0, n as i64)
                });
                let tq = time_per_call(|| unsafe {
                    q8(w8.as_ptr(), x8.as_ptr(), y.as_mut_ptr(), m as i64, n as i64, 0, n as i64)
                });
                let idx: Vec<u32> = (0..keep as u32).collect();
                let (g, f, spec) = if m == 1 { (1, col1, &g1) } else { (PREFILL_GROUP, colg, &gg) };
                let tg = time_per_call(|| {
                    for gi in 0..m.div_ceil(g) {
                        let rows = (gi * g + g).min(m) - gi * g;
                        let (xi, yi) =
                            (&xk[gi * g * keep..(gi * g + rows) * keep], &mut y[gi * g * n..(gi * g + rows) * n]);
                        run_col_active(f, spec, &wg, keep, &idx, xi, yi, rows, 0..n).unwrap();
                    }
                });
                println!(
                    "{m:>3} {drop:>5.2} | {:>8.1} {:>8.1} {:>8.1} | {:>6.2} {:>6.2} | {:>7} {:>7} {:>7}",
                    td * 1e6,
                    tq * 1e6,
                    tg * 1e6,
                    tq / td,
                    tg / td,
                    w.len(),
                    w8.len(),
                    wg.len()
                );
            }
        }
    }

    /// Decode (m = 1) and prefill (m = 64) on SmolLM2's down shape (Q4_1, k 1536 → n 576) per active
    /// share: the dense Q4_1 linear, the Q8_0-requantized active kernel (per row at m = 64, as before)
    /// and the column kernels (q4_1c; groups of `PREFILL_GROUP` rows over the union at m = 64).
    #[test]
    #[ignore = "benchmark; run with -- --ignored --nocapture"]
    fn bench_column_active() {
        let (base, k, n) = (DType::Q4_1, 1536, 576);
        let ctx = Context::create();
        let module = llvm::create_module(&ctx, "col_bench");
        let (aspec, dspec) = (ActiveLinearKernelSpec::new(base, n), LinearKernelSpec::new(base, k));
        let (c1, cg) =
            (ColActiveKernelSpec::new(DType::Q4_1C, n, 1), ColActiveKernelSpec::new(DType::Q4_1C, n, PREFILL_GROUP));
        emit_active_linear(&ctx, &module, &aspec).unwrap();
        emit_linear(&ctx, &module, &dspec).unwrap();
        emit_col_active(&ctx, &module, &c1).unwrap();
        emit_col_active(&ctx, &module, &cg).unwrap();
        llvm::optimize(&module, &llvm::host_target_machine().unwrap()).unwrap();
        let ee = module.create_jit_execution_engine(OptimizationLevel::Aggressive).unwrap();
        let addr = |s: &str| ee.get_function_address(s).unwrap();
        // SAFETY: generated with exactly these signatures.
        let (active, dense, col1, colg) = unsafe {
            (
                std::mem::transmute::<usize, ActiveLinearKernelFn>(addr(&aspec.symbol())),
                std::mem::transmute::<usize, LinearKernelFn>(addr(&dspec.symbol())),
                std::mem::transmute::<usize, ColActiveKernelFn>(addr(&c1.symbol())),
                std::mem::transmute::<usize, ColActiveKernelFn>(addr(&cg.symbol())),
            )
        };
        let mut rng = StdRng::seed_from_u64(3);
        let w = random_weights(&mut rng, base, n, k);
        let wq8 = kiln_ir::sparse::transpose_requantize(base, n, k, &w).unwrap();
        let (_, wc) = kiln_ir::column::from_rows(base, n, k, &w).unwrap();
        println!(
            "{:>3} {:>6} | {:>8} {:>9} {:>9} | {:>6} {:>6}",
            "m", "active", "dense µs", "q8_0 µs", "q4_1c µs", "q8/d", "col/d"
        );
        for m in [1usize, 64] {
            for frac in [0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0] {
                let act: Vec<Vec<u32>> =
                    (0..m).map(|_| (0..k as u32).filter(|_| rng.random_bool(frac)).collect()).collect();
                let mut x = vec![0f32; m * k];
                for (i, a) in act.iter().enumerate() {
                    for &j in a {
                        x[i * k + j as usize] = rng.random_range(-1.0f32..1.0);
                    }
                }
                let mut y = vec![0f32; m * n];
                let td = time_per_call(|| unsafe {
                    dense(w.as_ptr(), x.as_ptr(), y.as_mut_ptr(), m as i64, n as i64, 0, n as i64)
                });
                let tq = time_per_call(|| {
                    for (i, a) in act.iter().enumerate() {
                        let (xi, yi) = (&x[i * k..(i + 1) * k], &mut y[i * n..(i + 1) * n]);
                        run_active_linear(active, &aspec, &wq8, k, a, xi, yi, 0..n).unwrap();
                    }
                });
                // Union lists per group, built outside the timed region (the wrapper builds them in
                // generated code: one pass over the group's x).
                let g = if m == 1 { 1 } else { PREFILL_GROUP };
                let groups: Vec<Vec<u32>> = (0..m.div_ceil(g))
                    .map(|gi| {
                        let rows = gi * g..(gi * g + g).min(m);
                        (0..k as u32).filter(|&j| rows.clone().any(|i| x[i * k + j as usize] != 0.0)).collect()
                    })
                    .collect();
                let (f, spec) = if m == 1 { (col1, &c1) } else { (colg, &cg) };
                let tc = time_per_call(|| {
                    for (gi, u) in groups.iter().enumerate() {
                        let rows = (gi * g + g).min(m) - gi * g;
                        let (xi, yi) = (&x[gi * g * k..(gi * g + rows) * k], &mut y[gi * g * n..(gi * g + rows) * n]);
                        run_col_active(f, spec, &wc, k, u, xi, yi, rows, 0..n).unwrap();
                    }
                });
                println!(
                    "{m:>3} {frac:>6.2} | {:>8.1} {:>9.1} {:>9.1} | {:>6.2} {:>6.2}",
                    td * 1e6,
                    tq * 1e6,
                    tc * 1e6,
                    tq / td,
                    tc / td
                );
            }
        }
    }
}
