//! Generated unstructured / 1×8 sparse `linear` kernels: `y = x · Wᵀ` with `W` a [`BitmapSparse`]
//! matrix (every row keeps `kept` elements; per 32-element block a keep mask and the dense block's
//! header, the kept codes packed in column order; see `kiln_ir::sparse::bitmap`).
//!
//! One kernel per (weight dtype, granularity, kept per row, `k`), with the dense linear ABI
//! `fn(w, x, y, m: i64, n: i64, row_begin: i64, row_end: i64)` (as the N:M kernels).
//!
//! ```text
//! expand(block b), code position e carried from block to block:
//!   mask = the block's 32 keep bits; d, m = its header
//!   chunk c (8 lanes): byte = mask >> 8c & 0xFF
//!     pfx[l] = popcount(byte & (1 << l) − 1)      // a 256 × 8 table (gran 1) or 0..7 (gran 8)
//!     code[l] = the code at e + pfx[l]            // 4/8-bit: one 8-byte window, per-lane shifts;
//!                                                 // f16/f32: one load per lane
//!     w[l] = bit l of byte ? dequant(code[l]) : 0 // a select: no NaN leaks from dropped lanes
//!     e += popcount(byte)
//! decode (m < 8):  for r: for each tile of ≤ 4 x rows: e = 0; for each block: acc += expand(b) · x
//! prefill (m ≥ 8): for r: expand the row once into a k-float stack buffer; f32 tiles of 8 x rows
//! ```
//!
//! Decode does the dense kernel's FMAs plus the expansion, reading the compact bytes: it can only win
//! where the bytes saved outweigh the expansion (`docs/sparsity.md` has the measured ratios). The
//! kernels stay in bounds for any bytes of the right length whose masks keep `kept` per row (the
//! layout leaves 8 bytes after the codes for the windows); [`run_bitmap_linear`] validates.

use super::linear::{defined_kernel, emit_split_on_m, emit_x_tiles, Kb, LANES, R, TILE_M};
use super::nm::{emit_tile, i32_consts, splat_f16, Args};
use super::sparse::check_linear_buffers;
use crate::CodegenError;
use inkwell::context::Context;
use inkwell::module::{Linkage, Module};
use inkwell::values::{BasicValue, FunctionValue, IntValue, PointerValue, VectorValue};
use inkwell::IntPredicate;
use kiln_ir::sparse::bitmap::{bitmap_layout, BitmapLayout, BITMAP_BLOCK, BITMAP_GRANS};
use kiln_ir::sparse::nm::{nm_header_bytes, NM_DTYPES};
use kiln_ir::sparse::BitmapSparse;
use kiln_ir::DType;
use std::ops::Range;

/// A bitmap-sparse `linear` kernel to generate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct BitmapLinearKernelSpec {
    pub dtype: DType,
    /// 1 (unstructured) or 8 (runs of 8).
    pub gran: usize,
    /// Elements kept per row.
    pub kept: usize,
    pub k: usize,
}

/// The generated function's type: the dense linear ABI.
pub type BitmapLinearKernelFn = super::linear::LinearKernelFn;

/// x rows per tile of the prefill path.
const PANEL_TILE_M: usize = 8;
/// Largest `k` whose expanded row the prefill path keeps on the stack.
const PANEL_MAX_K: usize = 16384;
/// The popcount-prefix table's symbol.
const PREFIX_TABLE: &str = "kiln_bitmap_prefix8";

impl BitmapLinearKernelSpec {
    pub fn new(dtype: DType, gran: usize, kept: usize, k: usize) -> Self {
        BitmapLinearKernelSpec { dtype, gran, kept, k }
    }

    /// The kernel's symbol, e.g. `kiln_bitmap_linear_q4_1_g1_kept288_k576`.
    pub fn symbol(&self) -> String {
        format!("kiln_bitmap_linear_{}_g{}_kept{}_k{}", self.dtype.name(), self.gran, self.kept, self.k)
    }

    /// Checks that a kernel can be generated for this spec.
    pub fn validate(&self) -> Result<(), CodegenError> {
        if !NM_DTYPES.contains(&self.dtype) {
            return Err(CodegenError::UnsupportedDType { kernel: "bitmap linear", dtype: self.dtype });
        }
        let bad = |what: String| Err(CodegenError::InvalidSpec(format!("bitmap linear {}: {what}", self.dtype)));
        if !BITMAP_GRANS.contains(&self.gran) {
            return bad(format!("granularity {} is not one of {BITMAP_GRANS:?}", self.gran));
        }
        if self.k == 0 || !self.k.is_multiple_of(BITMAP_BLOCK) || self.k > (i32::MAX as usize) / 4 {
            return bad(format!("k = {} is not a positive multiple of {BITMAP_BLOCK} (or is too large)", self.k));
        }
        if self.kept > self.k || !self.kept.is_multiple_of(self.gran) {
            return bad(format!("{} kept is not a multiple of {} in 0..={}", self.kept, self.gran, self.k));
        }
        Ok(())
    }

    fn layout(&self) -> BitmapLayout {
        bitmap_layout(self.dtype, self.gran, self.k, self.kept)
    }
}

/// Emits the kernel for `spec` into `module` (or returns it if already there). Only built, not
/// optimized: run [`crate::llvm::optimize`] on the module.
pub fn emit_bitmap_linear<'ctx>(
    ctx: &'ctx Context,
    module: &Module<'ctx>,
    spec: &BitmapLinearKernelSpec,
) -> Result<FunctionValue<'ctx>, CodegenError> {
    spec.validate()?;
    let name = spec.symbol();
    if let Some(f) = defined_kernel(module, &name)? {
        return Ok(f);
    }
    let kb = Kb::new(ctx, module, &name, false)?;
    let (a, rows) = Args::from_params(&kb);
    let e_slot = kb.entry_alloca(kb.i64t.into())?;
    if spec.k <= PANEL_MAX_K {
        emit_split_on_m(
            &kb,
            a.m,
            || emit_panel(&kb, spec, a, rows, e_slot),
            || emit_direct(&kb, spec, a, rows, e_slot),
        )?;
    } else {
        emit_direct(&kb, spec, a, rows, e_slot)?;
    }
    kb.b.build_return(None)?;
    kb.verified(&name)
}

/// The module's 256 × 8-byte table: entry `8·byte + l` = popcount(byte & ((1 << l) − 1)).
fn prefix_table<'ctx>(kb: &Kb<'_, 'ctx>) -> PointerValue<'ctx> {
    if let Some(g) = kb.module.get_global(PREFIX_TABLE) {
        return g.as_pointer_value();
    }
    let vals: Vec<_> = (0..256u32)
        .flat_map(|b| (0..8).map(move |l| (b & ((1 << l) - 1)).count_ones() as u64))
        .map(|v| kb.i8t.const_int(v, false))
        .collect();
    let init = kb.i8t.const_array(&vals);
    let g = kb.module.add_global(init.get_type(), None, PREFIX_TABLE);
    g.set_initializer(&init);
    g.set_constant(true);
    g.set_linkage(Linkage::Private);
    g.as_pointer_value()
}

/// Row `r`'s compact bytes.
fn row_ptr<'ctx>(
    kb: &Kb<'_, 'ctx>,
    spec: &BitmapLinearKernelSpec,
    a: Args<'ctx>,
    r: IntValue<'ctx>,
) -> R<PointerValue<'ctx>> {
    kb.gep(kb.i8t.into(), a.w, kb.b.build_int_nsw_mul(r, kb.i64c(spec.layout().row_bytes as i64), "roff")?)
}

/// Block `b` of the row at `wrow` expanded to its 32 weights (4 `<8 x float>`, dropped ones 0); the
/// row's code position is read from and advanced in `e_slot`.
fn expand<'ctx>(
    kb: &Kb<'_, 'ctx>,
    spec: &BitmapLinearKernelSpec,
    wrow: PointerValue<'ctx>,
    b: IntValue<'ctx>,
    e_slot: PointerValue<'ctx>,
) -> R<[VectorValue<'ctx>; 4]> {
    let l = spec.layout();
    let i64t = kb.i64t;
    let lanes = LANES as usize;
    let c64 = |v: u64| i64t.const_int(v, false);
    let masks = kb.byte_gep(wrow, l.masks_at)?;
    let mask32 = if spec.gran == 1 {
        let p = kb.gep(kb.i8t.into(), masks, kb.b.build_int_nsw_mul(b, kb.i64c(4), "moff")?)?;
        let m = kb.load(kb.i32t.into(), p, 1)?.into_int_value();
        kb.b.build_int_z_extend(m, i64t, "mask")?
    } else {
        let p = kb.gep(kb.i8t.into(), masks, kb.b.build_right_shift(b, kb.i64c(1), false, "mb")?)?;
        let byte = kb.b.build_int_z_extend(kb.load(kb.i8t.into(), p, 1)?.into_int_value(), i64t, "mbyte")?;
        let sh = kb.b.build_int_mul(kb.b.build_and(b, kb.i64c(1), "odd")?, kb.i64c(4), "msh")?;
        let nib = kb.b.build_right_shift(byte, sh, false, "nib")?;
        // Bit g of the nibble → byte g of the mask all ones.
        let mut m = c64(0);
        for g in 0..4u64 {
            let bit = kb.b.build_and(nib, c64(1 << g), "bit")?;
            let run = kb.b.build_int_mul(bit, c64((0xFFu64 << (8 * g)) >> g), "run")?;
            m = kb.b.build_or(m, run, "mask")?;
        }
        m
    };
    let hdr = nm_header_bytes(spec.dtype);
    let hp = kb.gep(
        kb.i8t.into(),
        kb.byte_gep(wrow, l.headers_at)?,
        kb.b.build_int_nsw_mul(b, kb.i64c(hdr as i64), "hoff")?,
    )?;
    let (d, mn) = match spec.dtype {
        DType::Q4_0 | DType::Q8_0 => (Some(splat_f16(kb, hp, lanes)?), None),
        DType::Q4_1 => (Some(splat_f16(kb, hp, lanes)?), Some(splat_f16(kb, kb.byte_gep(hp, 2)?, lanes)?)),
        _ => (None, None),
    };
    let v8i64 = i64t.vec_type(LANES);
    let bits = i32_consts(kb, (0..lanes).map(|l| 1 << l));
    let table = prefix_table(kb);
    let mut e = kb.load(i64t.into(), e_slot, 8)?.into_int_value();
    let mut out = Vec::with_capacity(4);
    for c in 0..BITMAP_BLOCK / lanes {
        let byte =
            kb.b.build_and(kb.b.build_right_shift(mask32, c64(8 * c as u64), false, "sh")?, c64(0xFF), "byte")?;
        let byte32 = kb.b.build_int_truncate(byte, kb.i32t, "byte32")?;
        let keep = kb.b.build_and(kb.splat(byte32.into(), kb.v8i32)?, bits, "bits")?;
        let keep = kb.b.build_int_compare(IntPredicate::NE, keep, kb.v8i32.const_zero(), "keep")?;
        // Lane l's code position relative to e: the popcount prefix of the byte.
        let pfx32 = if spec.gran == 1 {
            let tp = kb.gep(kb.i8t.into(), table, kb.b.build_int_nsw_mul(byte, kb.i64c(8), "toff")?)?;
            let t = kb.load(kb.v8i8.into(), tp, 1)?.into_vector_value();
            kb.b.build_int_z_extend(t, kb.v8i32, "pfx")?
        } else {
            i32_consts(kb, 0..lanes)
        };
        let pfx = kb.b.build_int_z_extend(pfx32, v8i64, "pfx64")?;
        let window = |at: IntValue<'ctx>| -> R<VectorValue<'ctx>> {
            let wp = kb.gep(kb.i8t.into(), wrow, at)?;
            let w = kb.load(i64t.into(), wp, 1)?;
            kb.splat(w, v8i64)
        };
        let vals = match spec.dtype {
            DType::Q4_0 | DType::Q4_1 => {
                // The 8 nibbles from code e as one i32 (8 bytes loaded at e/2, shifted by the odd
                // nibble), then per lane a 32-bit shift by 4 · pfx.
                let wp = kb.gep(kb.i8t.into(), wrow, kb.b.build_right_shift(e, kb.i64c(1), false, "ebyte")?)?;
                let w64 = kb.load(i64t.into(), wp, 1)?.into_int_value();
                let odd = kb.b.build_left_shift(kb.b.build_and(e, kb.i64c(1), "odd")?, kb.i64c(2), "oddsh")?;
                let w32 = kb.b.build_int_truncate(kb.b.build_right_shift(w64, odd, false, "w64")?, kb.i32t, "w32")?;
                let win = kb.splat(w32.into(), kb.v8i32)?;
                let sh = kb.b.build_left_shift(pfx32, kb.splat_i32(2), "sh")?;
                let q = kb.b.build_right_shift(win, sh, false, "q")?;
                let q = kb.b.build_and(q, kb.splat_i32(15), "q")?;
                if spec.dtype == DType::Q4_0 {
                    let q = kb.b.build_int_sub(q, kb.splat_i32(8), "q8")?;
                    let q = kb.b.build_signed_int_to_float(q, kb.v8f32, "qf")?;
                    kb.b.build_float_mul(q, d.expect("scale"), "w")?
                } else {
                    let q = kb.b.build_signed_int_to_float(q, kb.v8f32, "qf")?;
                    kb.fma(q, d.expect("scale"), mn.expect("min"))?
                }
            }
            DType::Q8_0 => {
                let win = window(e)?;
                let sh = kb.b.build_left_shift(pfx, kb.splat(c64(3).into(), v8i64)?, "sh")?;
                let q = kb.b.build_right_shift(win, sh, false, "q")?;
                let q = kb.b.build_int_truncate(q, kb.v8i8, "q8")?;
                let q = kb.b.build_signed_int_to_float(q, kb.v8f32, "qf")?;
                kb.b.build_float_mul(q, d.expect("scale"), "w")?
            }
            _ => {
                // One load per lane: code e + pfx[l] (≤ kept, inside the row's slack).
                let (ty, sz) = if spec.dtype == DType::F16 { (kb.i16t, 2) } else { (kb.i32t, 4) };
                let mut v = ty.vec_type(LANES).get_poison();
                for ln in 0..lanes {
                    let idx = kb.b.build_extract_element(pfx, kb.i32t.const_int(ln as u64, false), "pl")?;
                    let idx = kb.b.build_int_add(e, idx.into_int_value(), "idx")?;
                    let off = kb.b.build_int_nsw_mul(idx, kb.i64c(sz), "coff")?;
                    let x = kb.load(ty.into(), kb.gep(kb.i8t.into(), wrow, off)?, 1)?;
                    v = kb.b.build_insert_element(v, x, kb.i32t.const_int(ln as u64, false), "v")?;
                }
                if spec.dtype == DType::F16 {
                    let h = kb.b.build_bit_cast(v, kb.ctx.f16_type().vec_type(LANES), "h")?.into_vector_value();
                    kb.b.build_float_ext(h, kb.v8f32, "w")?
                } else {
                    kb.b.build_bit_cast(v, kb.v8f32, "w")?.into_vector_value()
                }
            }
        };
        let w = kb.b.build_select(keep, vals, kb.v8f32.const_zero(), "w")?.into_vector_value();
        out.push(w);
        let cnt = kb.intrinsic("llvm.ctpop", &[i64t.into()], &[byte.into()])?;
        let cnt = cnt.try_as_basic_value().unwrap_basic().into_int_value();
        e = kb.b.build_int_nsw_add(e, cnt, "e")?;
    }
    kb.store(e_slot, e.as_basic_value_enum(), 8)?;
    Ok(out.try_into().expect("4 chunks"))
}

/// Decode-sized m: each tile of x rows sweeps the row's blocks, expanding each in registers.
fn emit_direct<'ctx>(
    kb: &Kb<'_, 'ctx>,
    spec: &BitmapLinearKernelSpec,
    a: Args<'ctx>,
    (rb, re): (IntValue<'ctx>, IntValue<'ctx>),
    e_slot: PointerValue<'ctx>,
) -> R<()> {
    kb.for_loop(rb, re, kb.i64c(1), "row", |r| {
        let wrow = row_ptr(kb, spec, a, r)?;
        emit_x_tiles(kb, TILE_M, kb.i64c(0), a.m, |i0, t| {
            kb.store(e_slot, kb.i64c(0).into(), 8)?;
            emit_tile(kb, spec.k, a, i0, t, r, &|b| expand(kb, spec, wrow, b, e_slot))
        })
    })
}

/// Prefill-sized m: row `r` expanded once into a `k`-float stack buffer, then every x tile runs an f32
/// loop over it.
fn emit_panel<'ctx>(
    kb: &Kb<'_, 'ctx>,
    spec: &BitmapLinearKernelSpec,
    a: Args<'ctx>,
    (rb, re): (IntValue<'ctx>, IntValue<'ctx>),
    e_slot: PointerValue<'ctx>,
) -> R<()> {
    let buf = kb.entry_alloca(kb.f32t.array_type(spec.k as u32).into())?;
    let blocks = kb.i64c((spec.k / BITMAP_BLOCK) as i64);
    let lanes = LANES as usize;
    kb.for_loop(rb, re, kb.i64c(1), "prow", |r| {
        let wrow = row_ptr(kb, spec, a, r)?;
        kb.store(e_slot, kb.i64c(0).into(), 8)?;
        kb.for_loop(kb.i64c(0), blocks, kb.i64c(1), "exp", |b| {
            let dst = kb.gep(kb.f32t.into(), buf, kb.b.build_int_nsw_mul(b, kb.i64c(BITMAP_BLOCK as i64), "bo")?)?;
            for (c, v) in expand(kb, spec, wrow, b, e_slot)?.into_iter().enumerate() {
                kb.store(kb.gep(kb.f32t.into(), dst, kb.i64c((c * lanes) as i64))?, v.into(), 4)?;
            }
            Ok(())
        })?;
        emit_x_tiles(kb, PANEL_TILE_M, kb.i64c(0), a.m, |i0, t| {
            emit_tile(kb, spec.k, a, i0, t, r, &|b| {
                let src =
                    kb.gep(kb.f32t.into(), buf, kb.b.build_int_nsw_mul(b, kb.i64c(BITMAP_BLOCK as i64), "bo")?)?;
                let chunk = |c: usize| -> R<VectorValue<'ctx>> {
                    let p = kb.gep(kb.f32t.into(), src, kb.i64c((c * lanes) as i64))?;
                    Ok(kb.load(kb.v8f32.into(), p, 4)?.into_vector_value())
                };
                Ok([chunk(0)?, chunk(1)?, chunk(2)?, chunk(3)?])
            })
        })
    })
}

/// Calls `kernel` (generated for `spec`) on `w` after checking everything it relies on: `w` is a valid
/// [`BitmapSparse`] of `spec`'s dtype, granularity, kept count and `k`, `x` holds `m · k` floats, `y`
/// `m · n`, and `rows` lies in `0..n`.
pub fn run_bitmap_linear(
    kernel: BitmapLinearKernelFn,
    spec: &BitmapLinearKernelSpec,
    w: &BitmapSparse,
    x: &[f32],
    y: &mut [f32],
    m: usize,
    rows: Range<usize>,
) -> Result<(), CodegenError> {
    let bad = |what: String| Err(CodegenError::InvalidSpec(format!("bitmap linear {}: {what}", spec.symbol())));
    spec.validate()?;
    w.validate().map_err(|e| CodegenError::InvalidSpec(format!("bitmap linear {}: {e}", spec.symbol())))?;
    if (w.dtype, w.gran, w.kept, w.k) != (spec.dtype, spec.gran, spec.kept, spec.k) {
        return bad(format!("weights are {} g{} with {} kept of k = {}", w.dtype, w.gran, w.kept, w.k));
    }
    if let Err(e) = check_linear_buffers(x, y, m, spec.k, w.n, &rows) {
        return bad(e);
    }
    // SAFETY: `w` holds n valid rows of the spec's layout (every row's masks keep `kept`, so the code
    // windows stay in the row), x and y have the sizes the ABI reads and writes, and rows are in 0..n.
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
    use kiln_ir::sparse::bitmap::bitmap_kept;
    use kiln_ir::sparse::prune_bitmap;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    impl SparseTestSpec for BitmapLinearKernelSpec {
        fn emit<'ctx>(&self, ctx: &'ctx Context, module: &Module<'ctx>) -> Result<FunctionValue<'ctx>, CodegenError> {
            emit_bitmap_linear(ctx, module, self)
        }
        fn sparse_symbol(&self) -> String {
            self.symbol()
        }
        fn dense(&self) -> LinearKernelSpec {
            LinearKernelSpec::new(self.dtype, self.k)
        }
    }

    const SENTINEL: u32 = 0x7fc0_dead;

    /// Every dtype and granularity over sparsity levels (0 to all dropped), odd n, both paths (m < 8
    /// and ≥ 8, partial tiles), row sub-ranges: against dequantize + f64 dot of the pruned matrix (1e-4
    /// of Σ|w·x|), rows outside the range keep their sentinel; with nothing dropped against the dense
    /// kernel on the unpruned weights.
    #[test]
    fn bitmap_kernels_match_the_dequantized_pruned_matrix() {
        let mut rng = StdRng::seed_from_u64(41);
        let mut specs = Vec::new();
        for dtype in NM_DTYPES {
            for gran in BITMAP_GRANS {
                for density in [0.0, 0.13, 0.3, 0.5, 0.75, 1.0] {
                    let k = [32, 96, 160][rng.random_range(0..3)];
                    specs.push(BitmapLinearKernelSpec::new(dtype, gran, bitmap_kept(gran, k, density), k));
                }
            }
        }
        with_sparse_and_dense(&specs, |fns| {
            for (spec, &(bm, dense)) in specs.iter().zip(fns) {
                let (dtype, k) = (spec.dtype, spec.k);
                let density = spec.kept as f64 / k as f64;
                for n in [1usize, 7, 33] {
                    let dense_w = random_weights(&mut rng, dtype, n, k);
                    let norms: Vec<f32> = (0..k).map(|_| rng.random_range(0.0f32..2.0)).collect();
                    let w = prune_bitmap(dtype, spec.gran, n, k, &dense_w, density, Some(&norms)).unwrap();
                    assert_eq!(w.kept, spec.kept);
                    let wf = w.dequantize().unwrap();
                    for m in [1usize, 2, 3, 5, 8, 9, 19] {
                        let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
                        let (lo, hi) = if n > 2 && rng.random_bool(0.5) { (1, n - 1) } else { (0, n) };
                        let mut y = vec![f32::from_bits(SENTINEL); m * n];
                        run_bitmap_linear(bm, spec, &w, &x, &mut y, m, lo..hi).unwrap();
                        for i in 0..m {
                            for r in 0..n {
                                let got = y[i * n + r];
                                if !(lo..hi).contains(&r) {
                                    assert_eq!(got.to_bits(), SENTINEL, "{} row {r} outside", spec.symbol());
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
                        if spec.kept == k {
                            let mut yd = vec![0f32; m * n];
                            // SAFETY: dense_w is n rows of k, x m · k, yd m · n.
                            unsafe {
                                dense(dense_w.as_ptr(), x.as_ptr(), yd.as_mut_ptr(), m as i64, n as i64, 0, n as i64)
                            };
                            for i in 0..m {
                                for r in lo..hi {
                                    let (a, b) = (y[i * n + r], yd[i * n + r]);
                                    let mag: f32 = (0..k).map(|j| (wf[r * k + j] * x[i * k + j]).abs()).sum();
                                    assert!((a - b).abs() <= 1e-5 * mag + 1e-6, "{} dense [{i}][{r}]", spec.symbol());
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
        let spec = BitmapLinearKernelSpec::new(DType::Q4_1, 1, 32, 64);
        // A kernel that must never run.
        unsafe extern "C" fn boom(_: *const u8, _: *const f32, _: *mut f32, _: i64, _: i64, _: i64, _: i64) {
            panic!("kernel called");
        }
        let mut rng = StdRng::seed_from_u64(42);
        let dense_w = random_weights(&mut rng, DType::Q4_1, 3, 64);
        let w = prune_bitmap(DType::Q4_1, 1, 3, 64, &dense_w, 0.5, None).unwrap();
        let x = vec![0f32; 2 * 64];
        let mut y = vec![0f32; 2 * 3];
        let other = prune_bitmap(DType::Q4_1, 1, 3, 64, &dense_w, 0.25, None).unwrap();
        let err = run_bitmap_linear(boom, &spec, &other, &x, &mut y, 2, 0..3).unwrap_err().to_string();
        assert!(err.contains("16 kept of k = 64"), "{err}");
        let mut bad = w.clone();
        let at = bad.layout().masks_at;
        bad.data[at] ^= 1;
        let err = run_bitmap_linear(boom, &spec, &bad, &x, &mut y, 2, 0..3).unwrap_err().to_string();
        assert!(err.contains("masks keep"), "{err}");
        let err = run_bitmap_linear(boom, &spec, &w, &x, &mut y, 3, 0..3).unwrap_err().to_string();
        assert!(err.contains("x has"), "{err}");
        let err = run_bitmap_linear(boom, &spec, &w, &x, &mut y, 2, 1..4).unwrap_err().to_string();
        assert!(err.contains("rows"), "{err}");
        assert!(BitmapLinearKernelSpec::new(DType::Q5_0, 1, 32, 64).validate().is_err());
        assert!(BitmapLinearKernelSpec::new(DType::F32, 1, 32, 48).validate().is_err());
        assert!(BitmapLinearKernelSpec::new(DType::F32, 8, 12, 64).validate().is_err());
        assert!(BitmapLinearKernelSpec::new(DType::F32, 4, 32, 64).validate().is_err());
    }
}

#[cfg(test)]
mod bench {
    /// `cargo test -p kiln-codegen --release bench_bitmap_linear -- --ignored --nocapture`: bitmap /
    /// dense time on SmolLM2's Q4_1 shapes (what `kiln bench --kernels` records), printed, not asserted.
    #[test]
    #[ignore]
    fn bench_bitmap_linear() {
        use kiln_ir::DType;
        let shapes = [(DType::Q4_1, 576, 1536), (DType::Q4_1, 1536, 576), (DType::Q4_1, 576, 576)];
        let rows = crate::kernels::measure::measure_bitmap(
            &shapes,
            &[1, 8],
            &[0.3, 0.5, 0.75],
            &[1, 64],
            3,
            std::time::Duration::from_millis(40),
        )
        .unwrap();
        for r in rows {
            println!(
                "{} {}→{} m={:<2} g{} density {:.2} bitmap/dense {:.2} ({:.1} → {:.1} µs)",
                r.dtype,
                r.k,
                r.n,
                r.m,
                r.gran,
                r.density,
                r.ratio,
                r.times.0 * 1e6,
                r.times.1 * 1e6
            );
        }
    }
}
