//! Measuring, on this machine, where the block-sparse linear kernel beats the dense one: the break-even
//! density per (weight dtype, k, n, m). `kiln bench --kernels` runs it for a model's linear shapes and
//! caches the table that the kernel-selection cost model (`kiln_passes::prune`) reads.
//!
//! Each sparse timing is paired with a dense timing taken right next to it (the machine may be shared:
//! a ratio of adjacent measurements drifts less than one baseline), best of `repeats` runs each.

use super::linear::{emit_linear, LinearKernelFn, LinearKernelSpec};
use super::sparse::{emit_sparse_linear, SparseLinearKernelFn, SparseLinearKernelSpec};
use crate::{llvm, CodegenError};
use inkwell::context::Context;
use inkwell::OptimizationLevel;
use kiln_ir::DType;
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// One measured shape: sparse/dense time per density, and the break-even density.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BreakEven {
    pub dtype: DType,
    pub k: usize,
    pub n: usize,
    pub m: usize,
    /// (kept share of blocks, sparse time / dense time), by increasing density.
    pub ratios: Vec<(f64, f64)>,
    /// The highest density up to which the sparse kernel was faster at every measured density (0: never).
    pub break_even: f64,
}

fn best_time(repeats: usize, budget: Duration, mut f: impl FnMut()) -> f64 {
    f();
    let mut best = f64::INFINITY;
    for _ in 0..repeats {
        let (t, mut calls) = (Instant::now(), 0u32);
        while t.elapsed() < budget || calls == 0 {
            f();
            calls += 1;
        }
        best = best.min(t.elapsed().as_secs_f64() / calls as f64);
    }
    best
}

/// Measures every `(dtype, k, n)` at every `m` and density (one thread, random weights pruned by
/// magnitude). `budget` is the time of one timing run.
pub fn measure_break_even(
    shapes: &[(DType, usize, usize)],
    ms: &[usize],
    densities: &[f64],
    repeats: usize,
    budget: Duration,
) -> Result<Vec<BreakEven>, CodegenError> {
    let ctx = Context::create();
    let module = llvm::create_module(&ctx, "kiln_measure");
    for &(dtype, k, _) in shapes {
        emit_sparse_linear(&ctx, &module, &SparseLinearKernelSpec::new(dtype, k))?;
        if module.get_function(&LinearKernelSpec::new(dtype, k).symbol()).is_none() {
            emit_linear(&ctx, &module, &LinearKernelSpec::new(dtype, k))?;
        }
    }
    let tm = llvm::host_target_machine()?;
    llvm::optimize(&module, &tm)?;
    let ee = module
        .create_jit_execution_engine(OptimizationLevel::Aggressive)
        .map_err(|e| CodegenError::Llvm(format!("JIT: {e}")))?;
    let addr = |s: &str| ee.get_function_address(s).map_err(|e| CodegenError::Llvm(format!("JIT {s}: {e}")));
    let mut out = Vec::new();
    // A small deterministic generator: the measurement needs no statistical quality.
    let mut state = 0x9e3779b97f4a7c15u64;
    let mut rnd = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    };
    for &(dtype, k, n) in shapes {
        let spec = SparseLinearKernelSpec::new(dtype, k);
        // SAFETY: both symbols were generated with exactly these signatures.
        let sparse: SparseLinearKernelFn = unsafe { std::mem::transmute(addr(&spec.symbol())?) };
        let dense: LinearKernelFn = unsafe { std::mem::transmute(addr(&LinearKernelSpec::new(dtype, k).symbol())?) };
        let vals: Vec<f32> = (0..n * k).map(|_| rnd()).collect();
        let dense_w = kiln_ir::quant::quantize(dtype, &vals).map_err(|e| CodegenError::InvalidSpec(e.to_string()))?;
        for &m in ms {
            let x: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
            let mut y = vec![0f32; m * n];
            let mut ratios = Vec::new();
            let (mut break_even, mut all_won) = (0.0, true);
            for &d in densities {
                let w = kiln_ir::sparse::prune_magnitude(dtype, n, k, &dense_w, d)
                    .map_err(|e| CodegenError::InvalidSpec(e.to_string()))?;
                w.validate().map_err(|e| CodegenError::InvalidSpec(e.to_string()))?;
                let (mi, ni) = (m as i64, n as i64);
                // SAFETY: `w` was validated and every buffer is sized as the kernels' ABI requires.
                let ts = best_time(repeats, budget, || unsafe {
                    sparse(
                        w.data.as_ptr(),
                        w.row_ptr.as_ptr(),
                        w.col_idx.as_ptr(),
                        x.as_ptr(),
                        y.as_mut_ptr(),
                        mi,
                        ni,
                        0,
                        ni,
                    )
                });
                // SAFETY: as above.
                let td = best_time(repeats, budget, || unsafe {
                    dense(dense_w.as_ptr(), x.as_ptr(), y.as_mut_ptr(), mi, ni, 0, ni)
                });
                all_won &= ts < td;
                if all_won {
                    break_even = w.density();
                }
                ratios.push((w.density(), ts / td));
            }
            out.push(BreakEven { dtype, k, n, m, ratios, break_even });
        }
    }
    Ok(out)
}

/// One measured N:M kernel: its time over the dense kernel's on the unpruned weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NmRatio {
    pub dtype: DType,
    pub k: usize,
    pub n: usize,
    pub m: usize,
    pub pattern: kiln_ir::sparse::NmPattern,
    /// N:M time / dense time (below 1: the N:M kernel is faster).
    pub ratio: f64,
    /// Seconds per call: (dense, N:M).
    pub times: (f64, f64),
}

/// Times the N:M kernel of every `(dtype, k, n)` (of the dtypes it supports) and pattern against the
/// dense kernel on the unpruned weights, at every `m` (one thread, random weights pruned by
/// magnitude; paired timings as in [`measure_break_even`]).
pub fn measure_nm(
    shapes: &[(DType, usize, usize)],
    patterns: &[kiln_ir::sparse::NmPattern],
    ms: &[usize],
    repeats: usize,
    budget: Duration,
) -> Result<Vec<NmRatio>, CodegenError> {
    use super::nm::{emit_nm_linear, NmLinearKernelSpec};
    let shapes: Vec<_> = shapes.iter().filter(|s| kiln_ir::sparse::NM_DTYPES.contains(&s.0)).copied().collect();
    let ctx = Context::create();
    let module = llvm::create_module(&ctx, "kiln_measure_nm");
    for &(dtype, k, _) in &shapes {
        for &p in patterns {
            emit_nm_linear(&ctx, &module, &NmLinearKernelSpec::new(dtype, p, k))?;
        }
        if module.get_function(&LinearKernelSpec::new(dtype, k).symbol()).is_none() {
            emit_linear(&ctx, &module, &LinearKernelSpec::new(dtype, k))?;
        }
    }
    let tm = llvm::host_target_machine()?;
    llvm::optimize(&module, &tm)?;
    let ee = module
        .create_jit_execution_engine(OptimizationLevel::Aggressive)
        .map_err(|e| CodegenError::Llvm(format!("JIT: {e}")))?;
    let addr = |s: &str| ee.get_function_address(s).map_err(|e| CodegenError::Llvm(format!("JIT {s}: {e}")));
    let mut state = 0x2545f4914f6cdd1du64;
    let mut rnd = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    };
    let mut out = Vec::new();
    for &(dtype, k, n) in &shapes {
        // SAFETY: the symbol was generated with exactly this signature.
        let dense: LinearKernelFn = unsafe { std::mem::transmute(addr(&LinearKernelSpec::new(dtype, k).symbol())?) };
        let vals: Vec<f32> = (0..n * k).map(|_| rnd()).collect();
        let dense_w = kiln_ir::quant::quantize(dtype, &vals).map_err(|e| CodegenError::InvalidSpec(e.to_string()))?;
        for &m in ms {
            let x: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
            let mut y = vec![0f32; m * n];
            for &p in patterns {
                let spec = NmLinearKernelSpec::new(dtype, p, k);
                // SAFETY: as above.
                let nm: LinearKernelFn = unsafe { std::mem::transmute(addr(&spec.symbol())?) };
                let w = kiln_ir::sparse::prune_nm(dtype, p, n, k, &dense_w, None)
                    .map_err(|e| CodegenError::InvalidSpec(e.to_string()))?;
                w.validate().map_err(|e| CodegenError::InvalidSpec(e.to_string()))?;
                let (mi, ni) = (m as i64, n as i64);
                // SAFETY: `w` is valid (n rows of the spec's row bytes); x and y are m · k and m · n.
                let ts = best_time(repeats, budget, || unsafe {
                    nm(w.data.as_ptr(), x.as_ptr(), y.as_mut_ptr(), mi, ni, 0, ni)
                });
                // SAFETY: as above.
                let td = best_time(repeats, budget, || unsafe {
                    dense(dense_w.as_ptr(), x.as_ptr(), y.as_mut_ptr(), mi, ni, 0, ni)
                });
                out.push(NmRatio { dtype, k, n, m, pattern: p, ratio: ts / td, times: (td, ts) });
            }
        }
    }
    Ok(out)
}

/// One measured bitmap-sparse kernel (`kernels::bitmap`): its time over the dense kernel's on the
/// unpruned weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BitmapRatio {
    pub dtype: DType,
    pub k: usize,
    pub n: usize,
    pub m: usize,
    /// 1 (unstructured) or 8 (1×8).
    pub gran: usize,
    /// Kept share of each row.
    pub density: f64,
    /// Bitmap time / dense time (below 1: the bitmap kernel is faster).
    pub ratio: f64,
    /// Seconds per call: (dense, bitmap).
    pub times: (f64, f64),
}

/// Times the bitmap kernel of every `(dtype, k, n)` (of the dtypes it supports), granularity and
/// density against the dense kernel on the unpruned weights, at every `m` (one thread, random weights
/// pruned by magnitude; paired timings as in [`measure_break_even`]).
pub fn measure_bitmap(
    shapes: &[(DType, usize, usize)],
    grans: &[usize],
    densities: &[f64],
    ms: &[usize],
    repeats: usize,
    budget: Duration,
) -> Result<Vec<BitmapRatio>, CodegenError> {
    use super::bitmap::{emit_bitmap_linear, BitmapLinearKernelSpec};
    use kiln_ir::sparse::bitmap::bitmap_kept;
    let shapes: Vec<_> = shapes.iter().filter(|s| kiln_ir::sparse::NM_DTYPES.contains(&s.0)).copied().collect();
    let ctx = Context::create();
    let module = llvm::create_module(&ctx, "kiln_measure_bitmap");
    for &(dtype, k, _) in &shapes {
        for &g in grans {
            for &d in densities {
                emit_bitmap_linear(&ctx, &module, &BitmapLinearKernelSpec::new(dtype, g, bitmap_kept(g, k, d), k))?;
            }
        }
        if module.get_function(&LinearKernelSpec::new(dtype, k).symbol()).is_none() {
            emit_linear(&ctx, &module, &LinearKernelSpec::new(dtype, k))?;
        }
    }
    let tm = llvm::host_target_machine()?;
    llvm::optimize(&module, &tm)?;
    let ee = module
        .create_jit_execution_engine(OptimizationLevel::Aggressive)
        .map_err(|e| CodegenError::Llvm(format!("JIT: {e}")))?;
    let addr = |s: &str| ee.get_function_address(s).map_err(|e| CodegenError::Llvm(format!("JIT {s}: {e}")));
    let mut state = 0x51_7cc1_b727_220au64;
    let mut rnd = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    };
    let err = |e: kiln_ir::sparse::SparseError| CodegenError::InvalidSpec(e.to_string());
    let mut out = Vec::new();
    for &(dtype, k, n) in &shapes {
        // SAFETY: the symbol was generated with exactly this signature.
        let dense: LinearKernelFn = unsafe { std::mem::transmute(addr(&LinearKernelSpec::new(dtype, k).symbol())?) };
        let vals: Vec<f32> = (0..n * k).map(|_| rnd()).collect();
        let dense_w = kiln_ir::quant::quantize(dtype, &vals).map_err(|e| CodegenError::InvalidSpec(e.to_string()))?;
        for &m in ms {
            let x: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
            let mut y = vec![0f32; m * n];
            for &g in grans {
                for &d in densities {
                    let w = kiln_ir::sparse::prune_bitmap(dtype, g, n, k, &dense_w, d, None).map_err(err)?;
                    w.validate().map_err(err)?;
                    let spec = BitmapLinearKernelSpec::new(dtype, g, w.kept, k);
                    // SAFETY: as above.
                    let bm: LinearKernelFn = unsafe { std::mem::transmute(addr(&spec.symbol())?) };
                    let (mi, ni) = (m as i64, n as i64);
                    // SAFETY: `w` is valid (n rows of the spec's layout); x and y are m · k and m · n.
                    let ts = best_time(repeats, budget, || unsafe {
                        bm(w.data.as_ptr(), x.as_ptr(), y.as_mut_ptr(), mi, ni, 0, ni)
                    });
                    // SAFETY: as above.
                    let td = best_time(repeats, budget, || unsafe {
                        dense(dense_w.as_ptr(), x.as_ptr(), y.as_mut_ptr(), mi, ni, 0, ni)
                    });
                    out.push(BitmapRatio {
                        dtype,
                        k,
                        n,
                        m,
                        gran: g,
                        density: w.density(),
                        ratio: ts / td,
                        times: (td, ts),
                    });
                }
            }
        }
    }
    Ok(out)
}
