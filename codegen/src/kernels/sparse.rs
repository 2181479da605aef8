//! Generated block-sparse `linear` kernels: `y = x · Wᵀ` with `W` a [`BlockSparse`] matrix (CSR over
//! 32-element blocks along `k`, kept blocks' bytes unchanged; see `kiln_ir::sparse`).
//!
//! One kernel per (weight dtype, `k`), with the C ABI
//! `fn(w, row_ptr: *const u32, col_idx: *const u32, x, y, m: i64, n: i64, row_begin: i64, row_end: i64)`:
//! `w` is the kept blocks' bytes, `x` `[m, k]` and `y` `[m, n]` f32 row-major as for [`super::linear`];
//! the call writes `y[i][r]` for every `i < m` and `r` in `row_begin..row_end`, and nothing else. A row
//! with no kept block gets 0.
//!
//! ```text
//! for r in row_begin..row_end
//!   [m ≥ 8: dequantize row r's kept blocks into a k-float stack buffer, once]
//!   for each tile of T x rows (T = 4, or 8 from the buffer; then one tail tile of 1..T-1)
//!     acc[T][A] = 0
//!     for p in row_ptr[r]..row_ptr[r+1]                     // only the kept blocks
//!       c = col_idx[p]
//!       for each 8-element chunk j of block p (dequantized with linear's `Format`, or from the buffer)
//!         acc[t][j % A] = fmuladd(w_chunk, x[t][32c + 8j ..], acc[t][j % A])
//!     y[t][r] = reduce.fadd(Σ_a acc[t][a])
//! ```
//!
//! Decode (`m = 1`) reads each kept block once, so the weight bytes read are proportional to density;
//! x is read at the kept blocks' columns (it is small and stays in cache). Unlike the dense kernel,
//! rows are computed one at a time (their block lists differ), so a dequantized chunk is never shared
//! between rows, and `A = 4` independent accumulators hide the FMA latency instead. For prefill-sized
//! `m`, each row's kept blocks are dequantized once into a stack buffer and every tile of 8 x rows then
//! only loads and FMAs: one weight load feeds 8 FMAs, but each FMA needs its own x load (rows differ in
//! their kept columns, so x loads cannot be shared across rows as the dense panel path shares them),
//! which is why m = 64 breaks even at a lower density than decode (`docs/sparsity.md`).
//!
//! Nothing here checks the CSR arrays: the generated code trusts them. [`run_sparse_linear`] validates
//! a [`BlockSparse`] and the buffer sizes before calling a kernel; a runtime that calls kernels directly
//! must run [`BlockSparse::validate`] on the weights once, when it loads them.

use super::linear::{
    defined_kernel, emit_split_on_m, emit_x_tiles, store_sums, tail_accumulators, Format, Kb, Memo, Param, LANES, R,
    TILE_M,
};
use crate::CodegenError;
use inkwell::context::Context;
use inkwell::module::Module;
use inkwell::values::{BasicValue, FunctionValue, IntValue, PointerValue, VectorValue};
use kiln_ir::sparse::{BlockSparse, SPARSE_BLOCK, SPARSE_DTYPES};
use kiln_ir::DType;
use std::collections::HashMap;
use std::ops::Range;

/// A block-sparse `linear` kernel to generate: weights of `dtype`, dense rows of `k` elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct SparseLinearKernelSpec {
    pub dtype: DType,
    pub k: usize,
}

/// The generated function's type: `(w, row_ptr, col_idx, x, y, m, n, row_begin, row_end)`.
pub type SparseLinearKernelFn =
    unsafe extern "C" fn(*const u8, *const u32, *const u32, *const f32, *mut f32, i64, i64, i64, i64);

/// Largest `k` for which the prefill path keeps a dequantized row (`4k` bytes) on the stack; above it
/// every `m` takes the in-register path.
const PANEL_MAX_K: usize = 16384;
/// x rows per tile of the prefill path: the weights come from L1, so each w chunk loaded feeds this
/// many FMAs (one accumulator each), against one load of x per FMA.
const PANEL_TILE_M: usize = 8;

impl SparseLinearKernelSpec {
    pub fn new(dtype: DType, k: usize) -> Self {
        SparseLinearKernelSpec { dtype, k }
    }

    /// The kernel's symbol, e.g. `kiln_sparse_linear_q4_1_k576`.
    pub fn symbol(&self) -> String {
        format!("kiln_sparse_linear_{}_k{}", self.dtype.name(), self.k)
    }

    /// Checks that a kernel can be generated for this spec.
    pub fn validate(&self) -> Result<(), CodegenError> {
        if !SPARSE_DTYPES.contains(&self.dtype) {
            return Err(CodegenError::UnsupportedDType { kernel: "sparse linear", dtype: self.dtype });
        }
        if self.k == 0 || !self.k.is_multiple_of(SPARSE_BLOCK) || self.k > (i32::MAX as usize) / 4 {
            return Err(CodegenError::InvalidSpec(format!(
                "sparse linear {}: k = {} is not a positive multiple of {SPARSE_BLOCK} (or is too large)",
                self.dtype, self.k
            )));
        }
        Ok(())
    }
}

/// Emits the kernel for `spec` into `module` (or returns it if already there). Only built, not
/// optimized: run [`crate::llvm::optimize`] on the module.
pub fn emit_sparse_linear<'ctx>(
    ctx: &'ctx Context,
    module: &Module<'ctx>,
    spec: &SparseLinearKernelSpec,
) -> Result<FunctionValue<'ctx>, CodegenError> {
    spec.validate()?;
    let name = spec.symbol();
    if let Some(f) = defined_kernel(module, &name)? {
        return Ok(f);
    }
    use Param::*;
    let params = [
        ("w", In),
        ("row_ptr", In),
        ("col_idx", In),
        ("x", In),
        ("y", Out),
        ("m", Int),
        ("n", Int),
        ("row_begin", Int),
        ("row_end", Int),
    ];
    let kb = Kb::declare(ctx, module, &name, &params)?;
    emit_body(&kb, spec)?;
    kb.verified(&name)
}

/// The kernel's parameters.
#[derive(Clone, Copy)]
struct Args<'ctx> {
    w: PointerValue<'ctx>,
    row_ptr: PointerValue<'ctx>,
    col_idx: PointerValue<'ctx>,
    x: PointerValue<'ctx>,
    y: PointerValue<'ctx>,
    m: IntValue<'ctx>,
    n: IntValue<'ctx>,
    k: IntValue<'ctx>,
}

fn emit_body<'ctx>(kb: &Kb<'_, 'ctx>, spec: &SparseLinearKernelSpec) -> R<()> {
    let p = |i: u32| kb.func.get_nth_param(i).expect("9 params");
    let a = Args {
        w: p(0).into_pointer_value(),
        row_ptr: p(1).into_pointer_value(),
        col_idx: p(2).into_pointer_value(),
        x: p(3).into_pointer_value(),
        y: p(4).into_pointer_value(),
        m: p(5).into_int_value(),
        n: p(6).into_int_value(),
        k: kb.i64c(spec.k as i64),
    };
    let rows = (p(7).into_int_value(), p(8).into_int_value());
    let fmt = Format::new(spec.dtype, spec.k);
    if spec.dtype != DType::F32 && spec.k <= PANEL_MAX_K {
        emit_split_on_m(kb, a.m, || emit_panel(kb, &fmt, spec, a, rows), || emit_direct(kb, &fmt, a, rows))?;
    } else {
        emit_direct(kb, &fmt, a, rows)?;
    }
    kb.b.build_return(None)?;
    Ok(())
}

/// Row `r`'s kept positions `row_ptr[r]..row_ptr[r + 1]`, as i64.
fn row_span<'ctx>(kb: &Kb<'_, 'ctx>, a: Args<'ctx>, r: IntValue<'ctx>) -> R<(IntValue<'ctx>, IntValue<'ctx>)> {
    let at = |i: IntValue<'ctx>| -> R<IntValue<'ctx>> {
        let v = kb.load(kb.i32t.into(), kb.gep(kb.i32t.into(), a.row_ptr, i)?, 4)?.into_int_value();
        Ok(kb.b.build_int_z_extend(v, kb.i64t, "rp")?)
    };
    Ok((at(r)?, at(kb.b.build_int_nsw_add(r, kb.i64c(1), "r1")?)?))
}

/// Dequantizing in registers as the kept blocks stream by: for each row, every tile of x rows.
fn emit_direct<'ctx>(
    kb: &Kb<'_, 'ctx>,
    fmt: &Format,
    a: Args<'ctx>,
    (rb, re): (IntValue<'ctx>, IntValue<'ctx>),
) -> R<()> {
    let bytes = kb.i64c(fmt.block_bytes as i64);
    kb.for_loop(rb, re, kb.i64c(1), "row", |r| {
        let span = row_span(kb, a, r)?;
        emit_x_tiles(kb, TILE_M, kb.i64c(0), a.m, |i0, t| {
            emit_tile(kb, fmt, a, i0, t, r, span, &|p| {
                kb.gep(kb.i8t.into(), a.w, kb.b.build_int_nsw_mul(p, bytes, "wp")?)
            })
        })
    })
}

/// Prefill-sized m: each row's kept blocks dequantized once into a stack buffer (kept block `p` of the
/// row at float `32 (p - row_ptr[r])`), then every x tile runs the f32 loop over it.
fn emit_panel<'ctx>(
    kb: &Kb<'_, 'ctx>,
    fmt: &Format,
    spec: &SparseLinearKernelSpec,
    a: Args<'ctx>,
    (rb, re): (IntValue<'ctx>, IntValue<'ctx>),
) -> R<()> {
    let buf = kb.entry_alloca(kb.f32t.array_type(spec.k as u32).into())?;
    let f32fmt = Format::new(DType::F32, spec.k);
    let (bytes, elems) = (kb.i64c(fmt.block_bytes as i64), kb.i64c(SPARSE_BLOCK as i64));
    kb.for_loop(rb, re, kb.i64c(1), "prow", |r| {
        let (p0, p1) = row_span(kb, a, r)?;
        let slot = |p: IntValue<'ctx>| -> R<PointerValue<'ctx>> {
            let off = kb.b.build_int_nsw_mul(kb.b.build_int_nsw_sub(p, p0, "q")?, elems, "boff")?;
            kb.gep(kb.f32t.into(), buf, off)
        };
        kb.for_loop(p0, p1, kb.i64c(1), "deq", |p| {
            let wp = kb.gep(kb.i8t.into(), a.w, kb.b.build_int_nsw_mul(p, bytes, "wp")?)?;
            let dst = slot(p)?;
            let mut memo: Memo<'ctx> = HashMap::new();
            fmt.prologue(kb, wp, &mut memo)?;
            for c in fmt.chunk_order() {
                let v = fmt.chunk(kb, wp, &mut memo, None, c)?;
                kb.store(kb.gep(kb.f32t.into(), dst, kb.i64c((c * LANES as usize) as i64))?, v.into(), 4)?;
            }
            Ok(())
        })?;
        emit_x_tiles(kb, PANEL_TILE_M, kb.i64c(0), a.m, |i0, t| emit_tile(kb, &f32fmt, a, i0, t, r, (p0, p1), &slot))
    })
}

/// Row `r` against the `t` x rows from `i0`, over the kept positions `p0..p1`, weights of kept block `p`
/// at `wptr(p)` in `fmt`.
#[allow(clippy::too_many_arguments)]
fn emit_tile<'ctx>(
    kb: &Kb<'_, 'ctx>,
    fmt: &Format,
    a: Args<'ctx>,
    i0: IntValue<'ctx>,
    t: usize,
    r: IntValue<'ctx>,
    (p0, p1): (IntValue<'ctx>, IntValue<'ctx>),
    wptr: &dyn Fn(IntValue<'ctx>) -> R<PointerValue<'ctx>>,
) -> R<()> {
    let nacc = tail_accumulators(t);
    let mut xrows = Vec::with_capacity(t);
    let mut youts = Vec::with_capacity(t);
    for ti in 0..t {
        let i = kb.b.build_int_nsw_add(i0, kb.i64c(ti as i64), "i")?;
        xrows.push(kb.gep(kb.f32t.into(), a.x, kb.b.build_int_nsw_mul(i, a.k, "xoff")?)?);
        let yoff = kb.b.build_int_nsw_add(kb.b.build_int_nsw_mul(i, a.n, "yoff")?, r, "yoff")?;
        youts.push(kb.gep(kb.f32t.into(), a.y, yoff)?);
    }
    // Accumulators live in entry-block allocas between iterations; SROA turns them into phis.
    let slots: Vec<PointerValue<'ctx>> = (0..t * nacc).map(|_| kb.entry_alloca(kb.v8f32.into())).collect::<R<_>>()?;
    for s in &slots {
        kb.store(*s, kb.v8f32.const_zero().into(), 32)?;
    }
    let load_accs = || -> R<Vec<VectorValue<'ctx>>> {
        slots.iter().map(|s| Ok(kb.load(kb.v8f32.into(), *s, 32)?.into_vector_value())).collect()
    };
    kb.for_loop(p0, p1, kb.i64c(1), "kept", |p| {
        let c = kb.load(kb.i32t.into(), kb.gep(kb.i32t.into(), a.col_idx, p)?, 4)?.into_int_value();
        let c = kb.b.build_int_z_extend(c, kb.i64t, "col")?;
        let xoff = kb.b.build_int_nsw_mul(c, kb.i64c(SPARSE_BLOCK as i64), "xblk")?;
        let xptrs: Vec<PointerValue<'ctx>> =
            xrows.iter().map(|&xr| kb.gep(kb.f32t.into(), xr, xoff)).collect::<R<_>>()?;
        let wp = wptr(p)?;
        let mut memo: Memo<'ctx> = HashMap::new();
        fmt.prologue(kb, wp, &mut memo)?;
        let mut accs = load_accs()?;
        for (j, c) in fmt.chunk_order().into_iter().enumerate() {
            let wv = fmt.chunk(kb, wp, &mut memo, None, c)?;
            for (ti, &xp) in xptrs.iter().enumerate() {
                let xv = kb.gep(kb.f32t.into(), xp, kb.i64c((c * LANES as usize) as i64))?;
                let xv = kb.load(kb.v8f32.into(), xv, 4)?.into_vector_value();
                let s = ti * nacc + j % nacc;
                accs[s] = kb.fma(wv, xv, accs[s])?;
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

/// The buffer checks of a checked linear entry point: `x` holds `m · k` floats, `y` `m · n`, `rows` lies
/// in `0..n`, and both sizes fit the ABI's i64 element counts.
pub(crate) fn check_linear_buffers(
    x: &[f32],
    y: &[f32],
    m: usize,
    k: usize,
    n: usize,
    rows: &Range<usize>,
) -> Result<(), String> {
    if Some(x.len()) != m.checked_mul(k) {
        return Err(format!("x has {} floats, want m · k = {m} · {k}", x.len()));
    }
    if Some(y.len()) != m.checked_mul(n) {
        return Err(format!("y has {} floats, want m · n = {m} · {n}", y.len()));
    }
    if rows.start > rows.end || rows.end > n {
        return Err(format!("rows {rows:?} are not within 0..{n}"));
    }
    if y.len() > i64::MAX as usize / 4 || x.len() > i64::MAX as usize / 4 {
        return Err("buffers too large".into());
    }
    Ok(())
}

/// Calls `kernel` (generated for `spec`) on `w` after checking everything it trusts: `w` is a valid
/// [`BlockSparse`] of `spec`'s dtype and `k`, `x` holds `m · k` floats, `y` `m · n`, and `rows` lies in
/// `0..n`. Validation walks the block indices (O(kept blocks)); a runtime validates once at load time
/// instead and calls the kernel directly.
pub fn run_sparse_linear(
    kernel: SparseLinearKernelFn,
    spec: &SparseLinearKernelSpec,
    w: &BlockSparse,
    x: &[f32],
    y: &mut [f32],
    m: usize,
    rows: Range<usize>,
) -> Result<(), CodegenError> {
    let bad = |what: String| Err(CodegenError::InvalidSpec(format!("sparse linear {}: {what}", spec.symbol())));
    spec.validate()?;
    w.validate().map_err(|e| CodegenError::InvalidSpec(format!("sparse linear {}: {e}", spec.symbol())))?;
    if (w.dtype, w.k) != (spec.dtype, spec.k) {
        return bad(format!("weights are {} with k = {}", w.dtype, w.k));
    }
    if let Err(e) = check_linear_buffers(x, y, m, spec.k, w.n, &rows) {
        return bad(e);
    }
    // SAFETY: `w` is valid (every row_ptr entry ≤ the kept blocks, every block index < k / 32, data
    // exactly the kept blocks), x and y have the sizes the ABI reads and writes, and rows are in 0..n.
    unsafe {
        kernel(
            w.data.as_ptr(),
            w.row_ptr.as_ptr(),
            w.col_idx.as_ptr(),
            x.as_ptr(),
            y.as_mut_ptr(),
            m as i64,
            w.n as i64,
            rows.start as i64,
            rows.end as i64,
        )
    };
    Ok(())
}

// ---------------------------------------------------------------------------------------------------
// Input-sparse ("active-channel") GEMV.

/// An active-channel kernel: `y = Σ_{j ∈ S} x_j · W[:, j]` for one x row whose only non-zero entries are
/// the listed channels `S`, reading only those channels' weights. The weights are the transpose
/// `Wᵀ [k, n]` in `dtype`, quantized along `n` (see `kiln_ir::sparse::transpose_requantize`), so an
/// active channel is one contiguous row of `n` elements.
///
/// ABI: `fn(wt, idx: *const u32, x, y, count: i64, k: i64, col_begin: i64, col_end: i64)`: `idx` holds
/// `count` channels (< `k`), `x` `k` floats (only the listed ones are read), `y` `n` floats of which
/// `col_begin..col_end` (multiples of 32) are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct ActiveLinearKernelSpec {
    pub dtype: DType,
    pub n: usize,
}

pub type ActiveLinearKernelFn = unsafe extern "C" fn(*const u8, *const u32, *const f32, *mut f32, i64, i64, i64, i64);

impl ActiveLinearKernelSpec {
    pub fn new(dtype: DType, n: usize) -> Self {
        ActiveLinearKernelSpec { dtype, n }
    }

    /// The kernel's symbol, e.g. `kiln_active_linear_q4_1_n576`.
    pub fn symbol(&self) -> String {
        format!("kiln_active_linear_{}_n{}", self.dtype.name(), self.n)
    }

    pub fn validate(&self) -> Result<(), CodegenError> {
        SparseLinearKernelSpec::new(self.dtype, self.n).validate().map_err(|e| match e {
            CodegenError::UnsupportedDType { dtype, .. } => {
                CodegenError::UnsupportedDType { kernel: "active-channel linear", dtype }
            }
            CodegenError::InvalidSpec(_) => CodegenError::InvalidSpec(format!(
                "active-channel linear {}: n = {} is not a positive multiple of {SPARSE_BLOCK} (or is too large)",
                self.dtype, self.n
            )),
            other => other,
        })
    }
}

/// Emits the active-channel kernel for `spec` (or returns it if already in `module`).
///
/// ```text
/// for each block of 32 outputs b in col_begin..col_end
///   acc[4] = 0                                  // <8 x float>, one per chunk of the block
///   for q in 0..count: j = idx[q]; acc[c] = fmuladd(dequant(chunk c of block b of Wᵀ row j), x[j], acc[c])
///   y[b..b+32] = acc
/// ```
pub fn emit_active_linear<'ctx>(
    ctx: &'ctx Context,
    module: &Module<'ctx>,
    spec: &ActiveLinearKernelSpec,
) -> Result<FunctionValue<'ctx>, CodegenError> {
    spec.validate()?;
    let name = spec.symbol();
    if let Some(f) = defined_kernel(module, &name)? {
        return Ok(f);
    }
    use Param::*;
    let params = [
        ("wt", In),
        ("idx", In),
        ("x", In),
        ("y", Out),
        ("count", Int),
        ("k", Int),
        ("col_begin", Int),
        ("col_end", Int),
    ];
    let kb = &Kb::declare(ctx, module, &name, &params)?;
    let p = |i: u32| kb.func.get_nth_param(i).expect("8 params");
    let (wt, idx, x, y) =
        (p(0).into_pointer_value(), p(1).into_pointer_value(), p(2).into_pointer_value(), p(3).into_pointer_value());
    let (count, cb, ce) = (p(4).into_int_value(), p(6).into_int_value(), p(7).into_int_value());
    let fmt = Format::new(spec.dtype, spec.n);
    let row_bytes = kb.i64c(spec.dtype.row_bytes(spec.n).expect("validated") as i64);
    let nchunks = SPARSE_BLOCK / LANES as usize;
    let slots: Vec<PointerValue<'ctx>> = (0..nchunks).map(|_| kb.entry_alloca(kb.v8f32.into())).collect::<R<_>>()?;
    kb.for_loop(cb, ce, kb.i64c(SPARSE_BLOCK as i64), "oblk", |b0| {
        for s in &slots {
            kb.store(*s, kb.v8f32.const_zero().into(), 32)?;
        }
        let boff = kb.b.build_int_nsw_mul(
            kb.b.build_int_signed_div(b0, kb.i64c(SPARSE_BLOCK as i64), "b")?,
            kb.i64c(fmt.block_bytes as i64),
            "boff",
        )?;
        kb.for_loop(kb.i64c(0), count, kb.i64c(1), "active", |q| {
            let j = kb.load(kb.i32t.into(), kb.gep(kb.i32t.into(), idx, q)?, 4)?.into_int_value();
            let j = kb.b.build_int_z_extend(j, kb.i64t, "j")?;
            let xj = kb.load(kb.f32t.into(), kb.gep(kb.f32t.into(), x, j)?, 4)?;
            let xj = kb.splat(xj, kb.v8f32)?;
            let off = kb.b.build_int_nsw_add(kb.b.build_int_nsw_mul(j, row_bytes, "wrow")?, boff, "woff")?;
            let wp = kb.gep(kb.i8t.into(), wt, off)?;
            let mut memo: Memo<'ctx> = HashMap::new();
            fmt.prologue(kb, wp, &mut memo)?;
            for c in fmt.chunk_order() {
                let acc = kb.load(kb.v8f32.into(), slots[c], 32)?.into_vector_value();
                let acc = kb.fma(fmt.chunk(kb, wp, &mut memo, None, c)?, xj, acc)?;
                kb.store(slots[c], acc.into(), 32)?;
            }
            Ok(())
        })?;
        for (c, s) in slots.iter().enumerate() {
            let v = kb.load(kb.v8f32.into(), *s, 32)?;
            let at = kb.b.build_int_nsw_add(b0, kb.i64c((c * LANES as usize) as i64), "yc")?;
            kb.store(kb.gep(kb.f32t.into(), y, at)?, v, 4)?;
        }
        Ok(())
    })?;
    kb.b.build_return(None)?;
    kb.verified(&name)
}

/// Calls an active-channel `kernel` after checking what it trusts: `wt` is exactly `k` rows of `n`
/// elements of `spec.dtype`, every index is `< k`, `x` has `k` floats, `y` `n`, and `cols` is a range
/// of whole 32-output blocks within `0..n`.
#[allow(clippy::too_many_arguments)]
pub fn run_active_linear(
    kernel: ActiveLinearKernelFn,
    spec: &ActiveLinearKernelSpec,
    wt: &[u8],
    k: usize,
    idx: &[u32],
    x: &[f32],
    y: &mut [f32],
    cols: Range<usize>,
) -> Result<(), CodegenError> {
    spec.validate()?;
    let bad = |what: String| Err(CodegenError::InvalidSpec(format!("active-channel linear {}: {what}", spec.symbol())));
    let row_bytes = spec.dtype.row_bytes(spec.n).expect("validated");
    if Some(wt.len()) != k.checked_mul(row_bytes) || k > i32::MAX as usize {
        return bad(format!("{} weight bytes, want k = {k} rows of {row_bytes}", wt.len()));
    }
    if let Some(j) = idx.iter().find(|&&j| j as usize >= k) {
        return bad(format!("active channel {j} is out of range 0..{k}"));
    }
    if x.len() != k || y.len() != spec.n {
        return bad(format!("x has {} floats (want k = {k}), y {} (want n = {})", x.len(), y.len(), spec.n));
    }
    let whole = |v: usize| v.is_multiple_of(SPARSE_BLOCK);
    if cols.start > cols.end || cols.end > spec.n || !whole(cols.start) || !whole(cols.end) {
        return bad(format!("columns {cols:?} are not whole blocks of {SPARSE_BLOCK} within 0..{}", spec.n));
    }
    // SAFETY: checked above: every index selects a row of `wt` and an entry of `x`, and the written
    // columns are whole blocks inside `y` and inside every row.
    unsafe {
        kernel(
            wt.as_ptr(),
            idx.as_ptr(),
            x.as_ptr(),
            y.as_mut_ptr(),
            idx.len() as i64,
            k as i64,
            cols.start as i64,
            cols.end as i64,
        )
    };
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::linear::tests::random_weights;
    use super::super::linear::{emit_linear, LinearKernelFn, LinearKernelSpec};
    use super::*;
    use crate::llvm;
    use inkwell::OptimizationLevel;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Generates the sparse and the dense kernel for each (dtype, k) into one module, optimizes it for
    /// the host, JIT-compiles it, and hands `f` the pairs in order.
    pub(crate) fn with_sparse_and_dense(
        shapes: &[(DType, usize)],
        f: impl FnOnce(&[(SparseLinearKernelSpec, SparseLinearKernelFn, LinearKernelFn)]),
    ) {
        let ctx = Context::create();
        let module = llvm::create_module(&ctx, "sparse_test");
        for &(dtype, k) in shapes {
            emit_sparse_linear(&ctx, &module, &SparseLinearKernelSpec::new(dtype, k)).unwrap();
            emit_linear(&ctx, &module, &LinearKernelSpec::new(dtype, k)).unwrap();
        }
        let tm = llvm::host_target_machine().unwrap();
        llvm::optimize(&module, &tm).unwrap();
        let ee = module.create_jit_execution_engine(OptimizationLevel::Aggressive).unwrap();
        let fns: Vec<_> = shapes
            .iter()
            .map(|&(dtype, k)| {
                let spec = SparseLinearKernelSpec::new(dtype, k);
                let s = ee.get_function_address(&spec.symbol()).unwrap();
                let d = ee.get_function_address(&LinearKernelSpec::new(dtype, k).symbol()).unwrap();
                // SAFETY: both symbols were generated with exactly these signatures.
                unsafe {
                    (
                        spec,
                        std::mem::transmute::<usize, SparseLinearKernelFn>(s),
                        std::mem::transmute::<usize, LinearKernelFn>(d),
                    )
                }
            })
            .collect();
        f(&fns);
    }

    const SENTINEL: u32 = 0x7fc0_dead;

    /// The sparse kernel against dequantize + f64 dot products of the pruned matrix at several densities
    /// (random block masks, row 0 always empty below density 1), m (both paths, partial tiles), n and row
    /// sub-ranges; rows outside the range keep their sentinel, empty rows are exactly 0. At density 1 it
    /// also matches the dense kernel on the same weights.
    fn check(rng: &mut StdRng, spec: SparseLinearKernelSpec, sparse: SparseLinearKernelFn, dense: LinearKernelFn) {
        let (dtype, k) = (spec.dtype, spec.k);
        let bpr = k / SPARSE_BLOCK;
        for n in [1usize, 7, 33] {
            let dense_w = random_weights(rng, dtype, n, k);
            for density in [0.0, 0.1, 0.25, 0.5, 0.9, 1.0] {
                let mask: Vec<bool> =
                    (0..n * bpr).map(|i| (i >= bpr || density == 1.0) && rng.random_bool(density)).collect();
                let w = BlockSparse::from_dense(dtype, n, k, &dense_w, |r, b| mask[r * bpr + b]).unwrap();
                let wf = w.dequantize().unwrap();
                for m in [1usize, 2, 3, 5, 8, 9, 70] {
                    let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
                    let mut y_dense = vec![0f32; m * n];
                    if density == 1.0 {
                        // SAFETY: buffers sized as the ABI requires.
                        unsafe {
                            dense(dense_w.as_ptr(), x.as_ptr(), y_dense.as_mut_ptr(), m as i64, n as i64, 0, n as i64)
                        };
                    }
                    for (rb, re) in [(0, n), (n / 3, n - n / 3), (n / 2, n / 2 + 1)] {
                        let mut y = vec![f32::from_bits(SENTINEL); m * n];
                        run_sparse_linear(sparse, &spec, &w, &x, &mut y, m, rb..re).unwrap();
                        for i in 0..m {
                            for r in 0..n {
                                let got = y[i * n + r];
                                let ctx = format!("{dtype} k={k} n={n} m={m} d={density} rows {rb}..{re}: y[{i}][{r}]");
                                if !(rb..re).contains(&r) {
                                    assert_eq!(got.to_bits(), SENTINEL, "{ctx} written");
                                    continue;
                                }
                                let (mut want, mut mag) = (0f64, 0f64);
                                for j in 0..k {
                                    let p = f64::from(wf[r * k + j]) * f64::from(x[i * k + j]);
                                    want += p;
                                    mag += p.abs();
                                }
                                if w.row_ptr[r] == w.row_ptr[r + 1] {
                                    assert_eq!(got, 0.0, "{ctx}: empty row");
                                }
                                assert!((f64::from(got) - want).abs() <= 1e-4 * mag + 1e-30, "{ctx} = {got} vs {want}");
                                if density == 1.0 {
                                    // Same products, summed in a different order (one row at a time
                                    // with 4 accumulators vs rows in groups).
                                    let d = y_dense[i * n + r];
                                    assert!(
                                        (f64::from(got) - f64::from(d)).abs() <= 1e-5 * mag + 1e-30,
                                        "{ctx} = {got} vs dense {d}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    fn check_dtype(dtype: DType, ks: &[usize]) {
        let shapes: Vec<(DType, usize)> = ks.iter().map(|&k| (dtype, k)).collect();
        let mut rng = StdRng::seed_from_u64(1000 + dtype.ggml_id() as u64);
        with_sparse_and_dense(&shapes, |fns| {
            for &(spec, s, d) in fns {
                check(&mut rng, spec, s, d);
            }
        });
    }

    #[test]
    fn sparse_f32_matches_reference() {
        check_dtype(DType::F32, &[32, 96, 544]);
    }

    #[test]
    fn sparse_f16_matches_reference() {
        check_dtype(DType::F16, &[32, 160]);
    }

    #[test]
    fn sparse_bf16_matches_reference() {
        check_dtype(DType::BF16, &[64]);
    }

    #[test]
    fn sparse_q4_0_matches_reference() {
        check_dtype(DType::Q4_0, &[32, 576]);
    }

    #[test]
    fn sparse_q4_1_matches_reference() {
        check_dtype(DType::Q4_1, &[32, 96, 576]);
    }

    #[test]
    fn sparse_q5_0_matches_reference() {
        check_dtype(DType::Q5_0, &[32, 160]);
    }

    #[test]
    fn sparse_q5_1_matches_reference() {
        check_dtype(DType::Q5_1, &[64, 160]);
    }

    #[test]
    fn sparse_q8_0_matches_reference() {
        check_dtype(DType::Q8_0, &[32, 576]);
    }

    /// Magnitude-pruned weights (the format's intended producer) through the kernel, against the
    /// reference on the pruned matrix; and at density 1 pruning keeps everything.
    #[test]
    fn pruned_weights_run_through_the_kernel() {
        let mut rng = StdRng::seed_from_u64(77);
        let (dtype, k, n, m) = (DType::Q4_1, 192, 11, 3);
        with_sparse_and_dense(&[(dtype, k)], |fns| {
            let (spec, sparse, _) = fns[0];
            let dense_w = random_weights(&mut rng, dtype, n, k);
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            for density in [0.25, 0.5, 1.0] {
                let w = kiln_ir::sparse::prune_magnitude(dtype, n, k, &dense_w, density).unwrap();
                assert_eq!(w.nnz_blocks(), n * (density * 6.0_f64).round() as usize);
                let wf = w.dequantize().unwrap();
                let mut y = vec![0f32; m * n];
                run_sparse_linear(sparse, &spec, &w, &x, &mut y, m, 0..n).unwrap();
                for i in 0..m {
                    for r in 0..n {
                        let want: f64 = (0..k).map(|j| f64::from(wf[r * k + j]) * f64::from(x[i * k + j])).sum();
                        let mag: f64 = (0..k).map(|j| (f64::from(wf[r * k + j]) * f64::from(x[i * k + j])).abs()).sum();
                        assert!((f64::from(y[i * n + r]) - want).abs() <= 1e-4 * mag, "d={density} y[{i}][{r}]");
                    }
                }
            }
        });
    }

    /// Inconsistent weights or buffers are refused before the kernel runs (the output is untouched).
    #[test]
    fn bad_inputs_are_errors_not_calls() {
        let mut rng = StdRng::seed_from_u64(3);
        let (dtype, k, n, m) = (DType::Q8_0, 64, 4, 2);
        with_sparse_and_dense(&[(dtype, k)], |fns| {
            let (spec, sparse, _) = fns[0];
            let dense_w = random_weights(&mut rng, dtype, n, k);
            let good = BlockSparse::from_dense(dtype, n, k, &dense_w, |r, b| r != b).unwrap();
            let x = vec![1f32; m * k];
            let mut y = vec![f32::from_bits(SENTINEL); m * n];
            run_sparse_linear(sparse, &spec, &good, &x, &mut y, m, 0..n).unwrap();
            let mut bad_cols = good.clone();
            bad_cols.col_idx[0] = 2; // k / 32 = 2 blocks
            let mut bad_ptr = good.clone();
            bad_ptr.row_ptr[n] += 1;
            let mut short = good.clone();
            short.data.truncate(short.data.len() - 1);
            let other_k =
                BlockSparse::from_dense(dtype, n, 96, &random_weights(&mut rng, dtype, n, 96), |_, _| true).unwrap();
            let cases: [(&BlockSparse, usize, usize, Range<usize>, &str); 8] = [
                (&bad_cols, m * k, m * n, 0..n, "out of range"),
                (&bad_ptr, m * k, m * n, 0..n, "row_ptr[n]"),
                (&short, m * k, m * n, 0..n, "data bytes"),
                (&other_k, m * k, m * n, 0..n, "k = 96"),
                (&good, m * k - 1, m * n, 0..n, "x has"),
                (&good, m * k, m * n + 1, 0..n, "y has"),
                (&good, m * k, m * n, 0..n + 1, "rows"),
                #[allow(clippy::reversed_empty_ranges)]
                (&good, m * k, m * n, 3..2, "rows"),
            ];
            for (w, xl, yl, rows, want) in cases {
                let mut yy = vec![f32::from_bits(SENTINEL); yl];
                let err = run_sparse_linear(sparse, &spec, w, &x[..xl.min(x.len())], &mut yy, m, rows).unwrap_err();
                assert!(err.to_string().contains(want), "want {want:?} in {err}");
                assert!(yy.iter().all(|v| v.to_bits() == SENTINEL), "{want}: y was written");
            }
        });
        let ctx = Context::create();
        let module = llvm::create_module(&ctx, "bad");
        let err = emit_sparse_linear(&ctx, &module, &SparseLinearKernelSpec::new(DType::Q4K, 256)).unwrap_err();
        assert_eq!(err, CodegenError::UnsupportedDType { kernel: "sparse linear", dtype: DType::Q4K });
        for k in [0, 48, 100] {
            let err = emit_sparse_linear(&ctx, &module, &SparseLinearKernelSpec::new(DType::Q4_1, k)).unwrap_err();
            assert!(
                matches!(err, CodegenError::InvalidSpec(_)) && err.to_string().contains(&format!("k = {k}")),
                "{err}"
            );
        }
        assert_eq!(module.get_functions().count(), 0, "nothing is left behind on error");
    }
    /// The active-channel kernel against dequantize(Wᵀ) + f64 dot over the listed channels. Every
    /// unlisted x entry is NaN, so reading one would poison the result; columns outside the range keep
    /// their sentinel.
    #[test]
    fn active_channel_kernel_matches_reference_and_reads_only_active_channels() {
        let mut rng = StdRng::seed_from_u64(21);
        let ns = [32usize, 96, 576];
        for dtype in SPARSE_DTYPES {
            let ctx = Context::create();
            let module = llvm::create_module(&ctx, "active_test");
            let specs: Vec<ActiveLinearKernelSpec> =
                ns.iter().map(|&n| ActiveLinearKernelSpec::new(dtype, n)).collect();
            for s in &specs {
                emit_active_linear(&ctx, &module, s).unwrap();
            }
            let tm = llvm::host_target_machine().unwrap();
            llvm::optimize(&module, &tm).unwrap();
            let ee = module.create_jit_execution_engine(OptimizationLevel::Aggressive).unwrap();
            for spec in &specs {
                let addr = ee.get_function_address(&spec.symbol()).unwrap();
                // SAFETY: generated with exactly this signature.
                let f = unsafe { std::mem::transmute::<usize, ActiveLinearKernelFn>(addr) };
                let n = spec.n;
                for k in [1usize, 7, 50] {
                    // Wᵀ: k rows of n, generated directly in the transposed layout.
                    let wt = random_weights(&mut rng, dtype, k, n);
                    let mut wtf = vec![0f32; k * n];
                    kiln_ir::quant::dequantize(dtype, &wt, &mut wtf).unwrap();
                    for frac in [0.0, 0.1, 0.5, 1.0] {
                        let idx: Vec<u32> = (0..k as u32).filter(|_| rng.random_bool(frac)).collect();
                        let mut x = vec![f32::NAN; k];
                        for &j in &idx {
                            x[j as usize] = rng.random_range(-1.0f32..1.0);
                        }
                        for cols in [0..n, 32..n, 0..32, n - 32..n] {
                            let mut y = vec![f32::from_bits(SENTINEL); n];
                            run_active_linear(f, spec, &wt, k, &idx, &x, &mut y, cols.clone()).unwrap();
                            for r in 0..n {
                                let ctx = format!("{dtype} n={n} k={k} active {} cols {cols:?}: y[{r}]", idx.len());
                                if !cols.contains(&r) {
                                    assert_eq!(y[r].to_bits(), SENTINEL, "{ctx} written");
                                    continue;
                                }
                                let (mut want, mut mag) = (0f64, 0f64);
                                for &j in &idx {
                                    let p = f64::from(wtf[j as usize * n + r]) * f64::from(x[j as usize]);
                                    want += p;
                                    mag += p.abs();
                                }
                                assert!(
                                    (f64::from(y[r]) - want).abs() <= 1e-4 * mag + 1e-30,
                                    "{ctx} = {} vs {want}",
                                    y[r]
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// The active-channel entry point refuses what the kernel would read out of bounds.
    #[test]
    fn active_channel_bad_inputs_are_errors() {
        let mut rng = StdRng::seed_from_u64(22);
        let (dtype, n, k) = (DType::Q4_1, 64, 5);
        let spec = ActiveLinearKernelSpec::new(dtype, n);
        let ctx = Context::create();
        let module = llvm::create_module(&ctx, "active_bad");
        emit_active_linear(&ctx, &module, &spec).unwrap();
        let ee = module.create_jit_execution_engine(OptimizationLevel::None).unwrap();
        // SAFETY: generated with exactly this signature.
        let f = unsafe {
            std::mem::transmute::<usize, ActiveLinearKernelFn>(ee.get_function_address(&spec.symbol()).unwrap())
        };
        let wt = random_weights(&mut rng, dtype, k, n);
        let x = vec![1f32; k];
        let mut y = vec![0f32; n];
        run_active_linear(f, &spec, &wt, k, &[0, 4], &x, &mut y, 0..n).unwrap();
        // (weight bytes, active channels, k, y length, columns, expected message); x has 5 floats.
        let r4 = 4 * dtype.row_bytes(n).unwrap();
        type Case<'a> = (&'a [u8], &'a [u32], usize, usize, Range<usize>, &'a str);
        let cases: Vec<Case> = vec![
            (&wt[1..], &[0], k, n, 0..n, "weight bytes"),
            (&wt, &[5], k, n, 0..n, "out of range"),
            (&wt, &[0], k, n - 1, 0..n, "y 63"),
            (&wt, &[0], k, n, 0..n + 32, "not whole blocks"),
            (&wt, &[0], k, n, 16..n, "not whole blocks"),
            (&wt[..r4], &[0], k - 1, n, 0..n, "x has 5"),
        ];
        for (w, idx, kk, yl, cols, want) in cases {
            let mut yy = vec![f32::from_bits(SENTINEL); yl];
            let err = run_active_linear(f, &spec, w, kk, idx, &x, &mut yy, cols).unwrap_err();
            assert!(err.to_string().contains(want), "want {want:?} in {err}");
            assert!(yy.iter().all(|v| v.to_bits() == SENTINEL), "{want}: y was written");
        }
        for (dtype, n) in [(DType::Q6K, 256), (DType::Q4_0, 48)] {
            assert!(emit_active_linear(&ctx, &module, &ActiveLinearKernelSpec::new(dtype, n)).is_err());
        }
    }
}

/// Dense vs block-sparse timings on SmolLM2-135M's MLP shapes, single thread, across densities, with the
/// density below which sparse wins. Print-only; run with
/// `cargo test -p kiln-codegen --release -- --ignored --nocapture bench_sparse_linear`.
#[cfg(test)]
mod bench {
    use super::super::linear::bench::time_per_call;
    use super::super::linear::tests::random_weights;
    use super::tests::with_sparse_and_dense;
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    #[test]
    #[ignore = "benchmark; run with --release -- --ignored --nocapture"]
    fn bench_sparse_linear() {
        // (dtype, k, n): up/gate (576 → 1536) and down (1536 → 576).
        let shapes = [(DType::Q4_1, 576, 1536), (DType::Q4_1, 1536, 576)];
        let densities = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0];
        let kernels: Vec<(DType, usize)> = shapes.iter().map(|&(d, k, _)| (d, k)).collect();
        with_sparse_and_dense(&kernels, |fns| {
            let mut rng = StdRng::seed_from_u64(2);
            let mut summary = Vec::new();
            println!(
                "{:<6} {:>5} {:>5} {:>3} | {:>8} | {:>7} {:>10} {:>7}",
                "dtype", "k", "n", "m", "density", "dense µs", "sparse µs", "ratio"
            );
            for (&(dtype, k, n), &(spec, sparse, dense)) in shapes.iter().zip(fns) {
                let dense_w = random_weights(&mut rng, dtype, n, k);
                for m in [1usize, 64] {
                    let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
                    let mut y = vec![0f32; m * n];
                    let mut wins_below = None;
                    let mut all_won = true;
                    for &d in &densities {
                        let w = kiln_ir::sparse::prune_magnitude(dtype, n, k, &dense_w, d).unwrap();
                        w.validate().unwrap();
                        // SAFETY: `w` was validated and the buffers are sized as the ABI requires.
                        let ts = time_per_call(|| unsafe {
                            sparse(
                                w.data.as_ptr(),
                                w.row_ptr.as_ptr(),
                                w.col_idx.as_ptr(),
                                x.as_ptr(),
                                y.as_mut_ptr(),
                                m as i64,
                                n as i64,
                                0,
                                n as i64,
                            )
                        });
                        // The dense kernel is timed again next to each sparse timing: the machine is
                        // shared, and a ratio of adjacent measurements drifts less than one baseline.
                        // SAFETY: buffers sized as the ABI requires.
                        let td = time_per_call(|| unsafe {
                            dense(dense_w.as_ptr(), x.as_ptr(), y.as_mut_ptr(), m as i64, n as i64, 0, n as i64)
                        });
                        all_won &= ts < td;
                        if all_won {
                            wins_below = Some(d);
                        }
                        println!(
                            "{:<6} {:>5} {:>5} {:>3} | {:>8.2} | {:>7.1} {:>10.1} {:>7.2}",
                            dtype.name(),
                            k,
                            n,
                            m,
                            w.density(),
                            td * 1e6,
                            ts * 1e6,
                            ts / td
                        );
                    }
                    summary.push((spec, n, m, wins_below));
                }
            }
            println!("break-even (highest density measured up to which sparse is faster at every density):");
            for (spec, n, m, d) in summary {
                let d = d.map_or("never (even at 0.05)".to_string(), |d| format!("{d}"));
                println!("  {} {}→{} m={m}: {d}", spec.dtype, spec.k, n);
            }
        });
    }
    /// The active-channel kernel on the `down` projection (Q4_1, 1536 → 576, m = 1) against the dense
    /// kernel, across the share of active input channels.
    #[test]
    #[ignore = "benchmark; run with --release -- --ignored --nocapture"]
    fn bench_active_linear() {
        use super::super::linear::{emit_linear, LinearKernelFn, LinearKernelSpec};
        use crate::llvm;
        use inkwell::OptimizationLevel;
        let (dtype, k, n) = (DType::Q4_1, 1536, 576);
        let ctx = Context::create();
        let module = llvm::create_module(&ctx, "active_bench");
        let (aspec, dspec) = (ActiveLinearKernelSpec::new(dtype, n), LinearKernelSpec::new(dtype, k));
        emit_active_linear(&ctx, &module, &aspec).unwrap();
        emit_linear(&ctx, &module, &dspec).unwrap();
        llvm::optimize(&module, &llvm::host_target_machine().unwrap()).unwrap();
        let ee = module.create_jit_execution_engine(OptimizationLevel::Aggressive).unwrap();
        // SAFETY: generated with exactly these signatures.
        let (active, dense) = unsafe {
            (
                std::mem::transmute::<usize, ActiveLinearKernelFn>(ee.get_function_address(&aspec.symbol()).unwrap()),
                std::mem::transmute::<usize, LinearKernelFn>(ee.get_function_address(&dspec.symbol()).unwrap()),
            )
        };
        let mut rng = StdRng::seed_from_u64(3);
        let w = random_weights(&mut rng, dtype, n, k);
        let wt = kiln_ir::sparse::transpose_requantize(dtype, n, k, &w).unwrap();
        let x: Vec<f32> = (0..k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let mut y = vec![0f32; n];
        println!(
            "{:<6} {:>5} {:>5} | {:>6} | {:>8} {:>9} {:>6}",
            "dtype", "k", "n", "active", "dense µs", "active µs", "ratio"
        );
        let mut wins_below = None;
        let mut all_won = true;
        for frac in [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0] {
            let idx: Vec<u32> = (0..k as u32).filter(|_| rng.random_bool(frac)).collect();
            let ta = time_per_call(|| run_active_linear(active, &aspec, &wt, k, &idx, &x, &mut y, 0..n).unwrap());
            // SAFETY: buffers sized as the ABI requires.
            let td =
                time_per_call(|| unsafe { dense(w.as_ptr(), x.as_ptr(), y.as_mut_ptr(), 1, n as i64, 0, n as i64) });
            all_won &= ta < td;
            if all_won {
                wins_below = Some(frac);
            }
            let share = idx.len() as f64 / k as f64;
            println!(
                "{:<6} {:>5} {:>5} | {share:>6.2} | {:>8.1} {:>9.1} {:>6.2}",
                dtype.name(),
                k,
                n,
                td * 1e6,
                ta * 1e6,
                ta / td
            );
        }
        println!("active-channel break-even: {wins_below:?}");
    }
}
