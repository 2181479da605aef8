//! From a graph to an artifact directory: lower, generate every kernel into one LLVM module, optimise
//! for the host CPU, emit an object, link it into `kernels.so`, lay the weights out in `weights.bin`,
//! and describe it all in `manifest.json`.

use crate::kernels::linear::{emit_linear, LinearKernelSpec};
use crate::lower::{lower, KernelSpec, Lowered};
use crate::{kernels, llvm, CodegenError};
use inkwell::context::Context;
use inkwell::module::Module;
use kiln_ir::program::{BufferKind, Manifest, TargetInfo, ARTIFACT_FORMAT_VERSION, CHECKED_CPU_FEATURES};
use kiln_ir::{Graph, WeightStore};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;
use std::time::Instant;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompileOptions {
    /// LLVM optimisation level, 0-3.
    pub opt_level: u8,
    /// Return logits for every position (evaluation) instead of the last one only (generation).
    pub all_logits: bool,
}

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions { opt_level: 3, all_logits: false }
    }
}

/// Facts about the model that the manifest records.
#[derive(Clone, Debug, Default)]
pub struct ArtifactInfo {
    pub model_name: String,
    pub source_hash: String,
    pub context_length: usize,
    pub vocab_size: usize,
    /// The tokenizer's end-of-sequence token, if any.
    pub eos_token: Option<u32>,
    /// Graph passes that ran before code generation, in order.
    pub passes: Vec<String>,
    /// What each stage that ran did.
    pub stages: Vec<kiln_ir::program::StageReport>,
    /// What lossy passes (and the `--quality-budget` search) recorded, for the manifest.
    pub records: Vec<serde_json::Value>,
    /// The early-exit schedule the artifact runs by default.
    pub early_exit: Option<kiln_ir::program::EarlyExitSpec>,
}

/// The host target as recorded in manifests.
pub fn host_target_info() -> TargetInfo {
    let triple = inkwell::targets::TargetMachine::get_default_triple().as_str().to_string_lossy().into_owned();
    let cpu = inkwell::targets::TargetMachine::get_host_cpu_name().to_string_lossy().into_owned();
    let features = inkwell::targets::TargetMachine::get_host_cpu_features().to_string_lossy().into_owned();
    let features = features
        .split(',')
        .filter_map(|f| f.strip_prefix('+'))
        .filter(|f| CHECKED_CPU_FEATURES.contains(f))
        .map(str::to_string)
        .collect();
    TargetInfo { triple, cpu, features }
}

/// The MLIR module holding the bodies of `lowered`'s fused kernels (empty when it has none).
pub fn mlir_source(lowered: &Lowered) -> String {
    let bodies: Vec<String> = lowered
        .kernels
        .iter()
        .filter_map(|k| match k {
            KernelSpec::Fused(f) => Some(f.mlir()),
            _ => None,
        })
        .collect();
    bodies.join("\n")
}

/// The uniform-ABI wrapper of an N:M or bitmap linear whose compact kernel is `compact`: that kernel
/// alone when both phases read the compact form, else a branch on m to it or to the dense linear kernel
/// of `dtype` on the dense layout.
fn wrap_compact<'ctx>(
    ctx: &'ctx Context,
    module: &Module<'ctx>,
    compact: inkwell::values::FunctionValue<'ctx>,
    dtype: kiln_ir::DType,
    k: usize,
    (decode, prefill): (bool, bool),
    symbol: &str,
) -> Result<(), CodegenError> {
    if decode && prefill {
        kernels::abi::wrap_linear(ctx, module, compact, 1, symbol)?;
        return Ok(());
    }
    let lin = LinearKernelSpec { dtype, k, residual: false };
    let dense = match module.get_function(&lin.symbol()) {
        Some(f) => f,
        None => emit_linear(ctx, module, &lin)?,
    };
    kernels::abi::wrap_phase_linear(ctx, module, compact, dense, (decode, prefill), symbol)?;
    Ok(())
}

/// Generates every kernel of `lowered` into `module`: the fused kernels' MLIR is lowered and linked in
/// first, then each kernel is emitted (or, for fused ones, wrapped) as LLVM IR.
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
            KernelSpec::Linear { dtype, k, group, residual } => {
                let lin = LinearKernelSpec { dtype: *dtype, k: *k, residual: *residual };
                let inner = match module.get_function(&lin.symbol()) {
                    Some(f) => f,
                    None => emit_linear(ctx, module, &lin)?,
                };
                kernels::abi::wrap_linear(ctx, module, inner, *group, &spec.symbol())?;
            }
            KernelSpec::MaskedLinear { dtype, k } => {
                let lin = LinearKernelSpec { dtype: *dtype, k: *k, residual: false };
                let inner = match module.get_function(&lin.symbol()) {
                    Some(f) => f,
                    None => emit_linear(ctx, module, &lin)?,
                };
                kernels::abi::wrap_masked_linear(ctx, module, inner, &spec.symbol())?;
            }
            KernelSpec::CoreLinear { dtype, k } => {
                let lin = LinearKernelSpec { dtype: *dtype, k: *k, residual: false };
                let inner = match module.get_function(&lin.symbol()) {
                    Some(f) => f,
                    None => emit_linear(ctx, module, &lin)?,
                };
                kernels::coreinfer::wrap_core_linear(ctx, module, inner, &spec.symbol())?;
            }
            KernelSpec::SparseLinear { dtype, k, decode, prefill } => {
                let lin = LinearKernelSpec { dtype: *dtype, k: *k, residual: false };
                let dense = match module.get_function(&lin.symbol()) {
                    Some(f) => f,
                    None => emit_linear(ctx, module, &lin)?,
                };
                let sparse = if *decode || *prefill {
                    let sp = kernels::sparse::SparseLinearKernelSpec::new(*dtype, *k);
                    Some(kernels::sparse::emit_sparse_linear(ctx, module, &sp)?)
                } else {
                    None
                };
                kernels::abi::wrap_sparse_linear(ctx, module, dense, sparse, (*decode, *prefill), &spec.symbol())?;
            }
            KernelSpec::NmLinear { dtype, keep, group, k, decode, prefill } => {
                let nm = kernels::nm::NmLinearKernelSpec::new(*dtype, crate::lower::nm_pattern(*keep, *group), *k);
                let inner = match module.get_function(&nm.symbol()) {
                    Some(f) => f,
                    None => kernels::nm::emit_nm_linear(ctx, module, &nm)?,
                };
                wrap_compact(ctx, module, inner, *dtype, *k, (*decode, *prefill), &spec.symbol())?;
            }
            KernelSpec::ActiveLinear { dtype, k, n } if dtype.is_gathered() => {
                use kernels::colactive::{emit_col_active, ColActiveKernelSpec, PREFILL_GROUP};
                let decode = emit_col_active(ctx, module, &ColActiveKernelSpec::new(*dtype, *n, 1))?;
                let prefill = emit_col_active(ctx, module, &ColActiveKernelSpec::new(*dtype, *n, PREFILL_GROUP))?;
                kernels::abi::wrap_active_linear_gathered(
                    ctx,
                    module,
                    decode,
                    prefill,
                    PREFILL_GROUP,
                    *k,
                    *n,
                    &spec.symbol(),
                )?;
            }
            KernelSpec::BitmapLinear { dtype, gran, kept, k, decode, prefill } => {
                let bm = kernels::bitmap::BitmapLinearKernelSpec::new(*dtype, *gran, *kept, *k);
                let inner = match module.get_function(&bm.symbol()) {
                    Some(f) => f,
                    None => kernels::bitmap::emit_bitmap_linear(ctx, module, &bm)?,
                };
                wrap_compact(ctx, module, inner, *dtype, *k, (*decode, *prefill), &spec.symbol())?;
            }
            KernelSpec::ActiveLinear { dtype, k, n } if dtype.is_column() => {
                use kernels::colactive::{emit_col_active, ColActiveKernelSpec, PREFILL_GROUP};
                let decode = emit_col_active(ctx, module, &ColActiveKernelSpec::new(*dtype, *n, 1))?;
                let prefill = emit_col_active(ctx, module, &ColActiveKernelSpec::new(*dtype, *n, PREFILL_GROUP))?;
                kernels::abi::wrap_active_linear_col(
                    ctx,
                    module,
                    decode,
                    prefill,
                    PREFILL_GROUP,
                    *k,
                    *n,
                    &spec.symbol(),
                )?;
            }
            KernelSpec::ActiveLinear { dtype, k, n } => {
                let act = kernels::sparse::ActiveLinearKernelSpec::new(*dtype, *n);
                let inner = kernels::sparse::emit_active_linear(ctx, module, &act)?;
                kernels::abi::wrap_active_linear(ctx, module, inner, *k, *n, &spec.symbol())?;
            }
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

/// Stages `kiln compile --emit` can print.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// The MLIR of the fused kernels, before lowering.
    Mlir,
    Llvm,
    Asm,
}

/// The optimised LLVM IR or the assembly of the kernels for `g`.
pub fn emit_stage(
    g: &Graph,
    weights: &WeightStore,
    opts: &CompileOptions,
    stage: Stage,
) -> Result<String, CodegenError> {
    let lowered = lower(g, weights)?;
    if stage == Stage::Mlir {
        return Ok(mlir_source(&lowered));
    }
    let ctx = Context::create();
    let module = ctx.create_module("kiln_kernels");
    emit_kernels(&ctx, &module, &lowered)?;
    let tm = optimized(&module, opts)?;
    match stage {
        Stage::Mlir => unreachable!("returned above"),
        Stage::Llvm => Ok(llvm::ir_text(&module)),
        Stage::Asm => llvm::emit_assembly(&module, &tm),
    }
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

pub(crate) fn io_err(path: &Path, e: std::io::Error) -> CodegenError {
    CodegenError::Llvm(format!("{}: {e}", path.display()))
}

/// Compiles `g` over `weights` into the artifact directory `out` (created; existing files replaced).
pub fn compile_to_dir(
    g: &Graph,
    weights: &WeightStore,
    opts: &CompileOptions,
    info: &ArtifactInfo,
    out: &Path,
) -> Result<Manifest, CodegenError> {
    let t0 = Instant::now();
    std::fs::create_dir_all(out).map_err(|e| io_err(out, e))?;
    let lowered = lower(g, weights)?;
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
    let mut manifest =
        make_manifest(lowered, info, host_target_info(), ("kernels.so", library_hash), weights_len, weights_hash);
    manifest.compile_seconds = t0.elapsed().as_secs_f64();
    write_manifest(&manifest, out)?;
    Ok(manifest)
}

/// Writes the weights at the offsets lowering assigned, zero-padded between, to `out/weights.bin`;
/// returns its length and blake3 hash.
pub(crate) fn write_weights(lowered: &Lowered, out: &Path) -> Result<(u64, String), CodegenError> {
    let wpath = out.join("weights.bin");
    let mut file = std::io::BufWriter::new(std::fs::File::create(&wpath).map_err(|e| io_err(&wpath, e))?);
    let mut hasher = blake3::Hasher::new();
    let mut pos = 0u64;
    let mut weights_iter = lowered.weights.iter();
    for b in &lowered.program.buffers {
        if let BufferKind::Weight { offset, len, .. } = &b.kind {
            let (_, t) = weights_iter.next().expect("one weight per weight buffer");
            debug_assert_eq!(t.bytes.len() as u64, *len);
            let pad = vec![0u8; (offset - pos) as usize];
            hasher.update(&pad);
            hasher.update(&t.bytes);
            file.write_all(&pad).and_then(|_| file.write_all(&t.bytes)).map_err(|e| io_err(&wpath, e))?;
            pos = offset + len;
        }
    }
    file.flush().map_err(|e| io_err(&wpath, e))?;
    Ok((pos, hasher.finalize().to_hex().to_string()))
}

/// The manifest of `lowered` with its code in `library` (file name, hash).
pub(crate) fn make_manifest(
    lowered: Lowered,
    info: &ArtifactInfo,
    target: TargetInfo,
    library: (&str, String),
    weights_len: u64,
    weights_hash: String,
) -> Manifest {
    let kernels =
        lowered.kernels.iter().map(|k| (k.symbol(), serde_json::to_string(k).expect("serialisable"))).collect();
    Manifest {
        format_version: ARTIFACT_FORMAT_VERSION,
        kiln_version: env!("CARGO_PKG_VERSION").to_string(),
        model_name: info.model_name.clone(),
        source_hash: info.source_hash.clone(),
        target,
        context_length: info.context_length,
        vocab_size: info.vocab_size,
        eos_token: info.eos_token,
        passes: info.passes.clone(),
        stages: info.stages.clone(),
        records: info.records.clone(),
        library: library.0.into(),
        library_hash: library.1,
        weights: "weights.bin".into(),
        weights_len,
        weights_hash,
        kernels,
        program: lowered.program,
        early_exit: info.early_exit.clone(),
        compile_seconds: 0.0,
    }
}

pub(crate) fn write_manifest(manifest: &Manifest, out: &Path) -> Result<(), CodegenError> {
    let mpath = out.join("manifest.json");
    let text = serde_json::to_string_pretty(manifest).expect("manifest serialises");
    std::fs::write(&mpath, text).map_err(|e| io_err(&mpath, e))
}
