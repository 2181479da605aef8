//! The CPU target: generates every kernel family of a lowered program as LLVM IR (the fused
//! elementwise kernels through MLIR) into one module, optimises it for the host, links `kernels.so`,
//! and lays out the artifact beside it.
//!
//! The families, each implemented once here: the linear family by descriptor ([`emit_linear_family`]:
//! dense, masked, core rows, active channels on row-major / column-major / gathered layouts,
//! block-sparse, N:M, bitmap, with the residual epilogue and grouping), embeddings, the ops of
//! `kernels::ops` (norms, rope, KV append, attention, FlexPrefill, CoreInfer) and fused elementwise trees.

use crate::artifact::{host_target_info, io_err, make_manifest, mlir_source, write_weights, ArtifactInfo, Stage};
use crate::kernels::linear::{emit_linear, LinearKernelSpec};
use crate::linear_family::{Epilogue, InputForm, LinearDesc, OutputForm, WeightForm};
use crate::lower::{KernelSpec, Lowered};
use crate::{kernels, llvm, CodegenError, CompileOptions, Target};
use inkwell::context::Context;
use inkwell::module::Module;
use inkwell::values::FunctionValue;
use kiln_ir::program::Manifest;
use kiln_ir::{DType, Op};
use std::path::Path;

/// The CPU Kiln runs on, with the instruction-set features codegen will specialise for.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CpuTarget {
    pub arch: String,
    pub features: Vec<String>,
}

impl CpuTarget {
    /// The host CPU, with the features LLVM detects on it (those in
    /// [`kiln_ir::program::CHECKED_CPU_FEATURES`], as manifests record them).
    pub fn host() -> CpuTarget {
        CpuTarget { arch: std::env::consts::ARCH.to_string(), features: host_target_info().features }
    }
}

impl Target for CpuTarget {
    fn name(&self) -> String {
        format!("{}-cpu", self.arch)
    }

    fn supports(&self, op: &Op) -> bool {
        // The ops `lower` has a CPU lowering for (each with the patterns it accepts, checked there): the
        // elementwise ops a fused kernel computes, and these.
        crate::kernels::fused::EwOp::from_op(op).is_some()
            || matches!(
                op,
                Op::Input { .. }
                    | Op::Weight { .. }
                    | Op::Embedding
                    | Op::Linear
                    | Op::Constant { .. }
                    | Op::RmsNorm { .. }
                    | Op::Rope { .. }
                    | Op::RopeScaled { .. }
                    | Op::Concat { .. }
                    | Op::Attention { .. }
                    | Op::SlidingAttention { .. }
                    | Op::FlexAttention { .. }
                    | Op::MaskedLinear
                    | Op::CoreLinear { .. }
                    | Op::ActiveLinear
                    | Op::CoreKeep { .. }
                    | Op::CoreSelect { .. }
                    | Op::SparseLinear { .. }
                    | Op::NmLinear { .. }
                    | Op::BitmapLinear { .. }
                    | Op::Reshape { .. }
                    | Op::Slice { .. }
                    | Op::Cast { .. }
                    | Op::AllReduce
                    | Op::ReduceScatter { .. }
                    | Op::Shard { .. }
                    | Op::AllGather { .. }
            )
    }

    fn build(
        &self,
        lowered: Lowered,
        opts: &CompileOptions,
        info: &ArtifactInfo,
        out: &Path,
    ) -> Result<Manifest, CodegenError> {
        std::fs::create_dir_all(out).map_err(|e| io_err(out, e))?;
        let ctx = Context::create();
        let module = ctx.create_module("kiln_kernels");
        emit_kernels(&ctx, &module, &lowered)?;
        let tm = optimized(&module, opts)?;
        let obj = out.join("kernels.o");
        std::fs::write(&obj, llvm::emit_object(&module, &tm)?).map_err(|e| io_err(&obj, e))?;
        let lib = out.join("kernels.so");
        let status = std::process::Command::new("cc")
            .args(["-shared", "-o"])
            .arg(&lib)
            .arg(&obj)
            .arg("-lm")
            .status()
            .map_err(|e| CodegenError::Llvm(format!("running the system linker `cc`: {e}")))?;
        if !status.success() {
            return Err(CodegenError::Llvm(format!("linking {} failed ({status})", lib.display())));
        }
        std::fs::remove_file(&obj).map_err(|e| io_err(&obj, e))?;
        let (weights_len, weights_hash) = write_weights(&lowered, out)?;
        let library_hash = blake3::hash(&std::fs::read(&lib).map_err(|e| io_err(&lib, e))?).to_hex().to_string();
        Ok(make_manifest(lowered, info, host_target_info(), ("kernels.so", library_hash), weights_len, weights_hash))
    }

    fn emit(&self, lowered: &Lowered, opts: &CompileOptions, stage: Stage) -> Result<String, CodegenError> {
        if stage == Stage::Mlir {
            return Ok(mlir_source(lowered));
        }
        let ctx = Context::create();
        let module = ctx.create_module("kiln_kernels");
        emit_kernels(&ctx, &module, lowered)?;
        let tm = optimized(&module, opts)?;
        match stage {
            Stage::Mlir => unreachable!("returned above"),
            Stage::Llvm => Ok(llvm::ir_text(&module)),
            Stage::Asm => llvm::emit_assembly(&module, &tm),
        }
    }
}

/// Generates every kernel of `lowered` into `module`: the fused kernels' MLIR is lowered and linked in
/// first, then each kernel is emitted (or, for fused ones, wrapped) as LLVM IR, family by family.
pub(crate) fn emit_kernels<'ctx>(
    ctx: &'ctx Context,
    module: &Module<'ctx>,
    lowered: &Lowered,
) -> Result<(), CodegenError> {
    let mlir = mlir_source(lowered);
    if !mlir.is_empty() {
        let m = crate::mlir::lower_to_llvm(&mlir, ctx)?;
        module.link_in_module(m).map_err(|e| CodegenError::Llvm(format!("linking MLIR kernels: {e}")))?;
    }
    for spec in &lowered.kernels {
        match spec {
            KernelSpec::Linear(d) => emit_linear_family(ctx, module, d)?,
            KernelSpec::Embedding { dtype, d } => {
                kernels::embedding::emit_embedding(ctx, module, *dtype, *d, &spec.symbol())?;
            }
            KernelSpec::Op(op) => {
                op.emit(ctx, module)?;
            }
            KernelSpec::Fused(f) => {
                f.wrap(ctx, module)?;
            }
        }
    }
    module.verify().map_err(|e| CodegenError::Llvm(format!("module does not verify: {e}")))?;
    Ok(())
}

/// The dense linear kernel of `dtype` × `k` (generated once per module).
fn dense_linear<'ctx>(
    ctx: &'ctx Context,
    module: &Module<'ctx>,
    dtype: DType,
    k: usize,
    residual: bool,
) -> Result<FunctionValue<'ctx>, CodegenError> {
    let lin = LinearKernelSpec { dtype, k, residual };
    match module.get_function(&lin.symbol()) {
        Some(f) => Ok(f),
        None => emit_linear(ctx, module, &lin),
    }
}

/// The linear family on the CPU: the uniform-ABI entry point of descriptor `d`, over the generator of
/// its weight form, input form and output form.
pub(crate) fn emit_linear_family<'ctx>(
    ctx: &'ctx Context,
    module: &Module<'ctx>,
    d: &LinearDesc,
) -> Result<(), CodegenError> {
    d.validate().map_err(CodegenError::InvalidSpec)?;
    let (dtype, k, symbol) = (d.dtype, d.k, d.symbol());
    match (d.weight, d.input, d.output) {
        (WeightForm::Dense, InputForm::Dense, OutputForm::All) => {
            let inner = dense_linear(ctx, module, dtype, k, d.epilogue == Epilogue::Residual)?;
            kernels::abi::wrap_linear(ctx, module, inner, d.group, &symbol)?;
        }
        (WeightForm::Dense, InputForm::Dense, OutputForm::Masked) => {
            let inner = dense_linear(ctx, module, dtype, k, false)?;
            kernels::abi::wrap_masked_linear(ctx, module, inner, &symbol)?;
        }
        (WeightForm::Dense, InputForm::Dense, OutputForm::CoreRows) => {
            let inner = dense_linear(ctx, module, dtype, k, false)?;
            kernels::coreinfer::wrap_core_linear(ctx, module, inner, &symbol)?;
        }
        (WeightForm::Dense, InputForm::ActiveChannels { n }, OutputForm::All)
            if dtype.is_gathered() || dtype.is_column() =>
        {
            use kernels::colactive::{emit_col_active, ColActiveKernelSpec, PREFILL_GROUP};
            let decode = emit_col_active(ctx, module, &ColActiveKernelSpec::new(dtype, n, 1))?;
            let prefill = emit_col_active(ctx, module, &ColActiveKernelSpec::new(dtype, n, PREFILL_GROUP))?;
            let wrap = if dtype.is_gathered() {
                kernels::abi::wrap_active_linear_gathered
            } else {
                kernels::abi::wrap_active_linear_col
            };
            wrap(ctx, module, decode, prefill, PREFILL_GROUP, k, n, &symbol)?;
        }
        (WeightForm::Dense, InputForm::ActiveChannels { n }, OutputForm::All) => {
            let act = kernels::sparse::ActiveLinearKernelSpec::new(dtype, n);
            let inner = kernels::sparse::emit_active_linear(ctx, module, &act)?;
            kernels::abi::wrap_active_linear(ctx, module, inner, k, n, &symbol)?;
        }
        (WeightForm::BlockSparse { decode, prefill }, InputForm::Dense, OutputForm::All) => {
            let dense = dense_linear(ctx, module, dtype, k, false)?;
            let sparse = if decode || prefill {
                let sp = kernels::sparse::SparseLinearKernelSpec::new(dtype, k);
                Some(kernels::sparse::emit_sparse_linear(ctx, module, &sp)?)
            } else {
                None
            };
            kernels::abi::wrap_sparse_linear(ctx, module, dense, sparse, (decode, prefill), &symbol)?;
        }
        (WeightForm::Nm { keep, group, decode, prefill }, InputForm::Dense, OutputForm::All) => {
            let nm = kernels::nm::NmLinearKernelSpec::new(dtype, crate::linear_family::nm_pattern(keep, group), k);
            let inner = match module.get_function(&nm.symbol()) {
                Some(f) => f,
                None => kernels::nm::emit_nm_linear(ctx, module, &nm)?,
            };
            wrap_compact(ctx, module, inner, dtype, k, (decode, prefill), &symbol)?;
        }
        (WeightForm::Bitmap { gran, kept, decode, prefill }, InputForm::Dense, OutputForm::All) => {
            let bm = kernels::bitmap::BitmapLinearKernelSpec::new(dtype, gran, kept, k);
            let inner = match module.get_function(&bm.symbol()) {
                Some(f) => f,
                None => kernels::bitmap::emit_bitmap_linear(ctx, module, &bm)?,
            };
            wrap_compact(ctx, module, inner, dtype, k, (decode, prefill), &symbol)?;
        }
        _ => {
            return Err(CodegenError::UnsupportedKernel {
                target: "cpu".into(),
                family: "linear",
                kernel: d.describe(),
            })
        }
    }
    Ok(())
}

/// The uniform-ABI wrapper of an N:M or bitmap linear whose compact kernel is `compact`: that kernel
/// alone when both phases read the compact form, else a branch on m to it or to the dense linear kernel
/// of `dtype` on the dense layout.
fn wrap_compact<'ctx>(
    ctx: &'ctx Context,
    module: &Module<'ctx>,
    compact: FunctionValue<'ctx>,
    dtype: DType,
    k: usize,
    (decode, prefill): (bool, bool),
    symbol: &str,
) -> Result<(), CodegenError> {
    if decode && prefill {
        kernels::abi::wrap_linear(ctx, module, compact, 1, symbol)?;
        return Ok(());
    }
    let dense = dense_linear(ctx, module, dtype, k, false)?;
    kernels::abi::wrap_phase_linear(ctx, module, compact, dense, (decode, prefill), symbol)?;
    Ok(())
}

/// Specialises `module` for the host and runs LLVM's `default<O{level}>` pipeline.
fn optimized(module: &Module, opts: &CompileOptions) -> Result<inkwell::targets::TargetMachine, CodegenError> {
    let tm = llvm::host_target_machine()?;
    optimize_for(module, opts, &tm)?;
    Ok(tm)
}

/// Specialises `module` for `tm` and runs LLVM's `default<O{level}>` pipeline.
pub(crate) fn optimize_for(
    module: &Module,
    opts: &CompileOptions,
    tm: &inkwell::targets::TargetMachine,
) -> Result<(), CodegenError> {
    if opts.opt_level == 3 {
        llvm::optimize(module, tm)?;
    } else {
        llvm::specialise(module, tm);
        llvm::verify(module)?;
        module
            .run_passes(&format!("default<O{}>", opts.opt_level), tm, inkwell::passes::PassBuilderOptions::create())
            .map_err(|e| CodegenError::Llvm(format!("optimizing: {}", e.to_string_lossy())))?;
    }
    Ok(())
}
