//! From a graph to an artifact directory: lower, generate every kernel into one LLVM module, optimise
//! for the host CPU, emit an object, link it into `kernels.so`, lay the weights out in `weights.bin`,
//! and describe it all in `manifest.json`.

use crate::lower::{lower, KernelSpec, Lowered};
use crate::{CodegenError, Target};
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

/// Stages `kiln compile --emit` can print.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// The MLIR of the fused kernels, before lowering.
    Mlir,
    Llvm,
    Asm,
}

pub(crate) fn io_err(path: &Path, e: std::io::Error) -> CodegenError {
    CodegenError::Llvm(format!("{}: {e}", path.display()))
}

/// The optimised LLVM IR or the assembly of the kernels for `g` on the host CPU.
pub fn emit_stage(
    g: &Graph,
    weights: &WeightStore,
    opts: &CompileOptions,
    stage: Stage,
) -> Result<String, CodegenError> {
    emit_stage_for(&crate::CpuTarget::host(), g, weights, opts, stage)
}

/// A printed stage of what `target` generates for `g` (the MLIR of the fused kernels is the same for
/// every target that takes it: [`mlir_source`]).
pub fn emit_stage_for(
    target: &dyn Target,
    g: &Graph,
    weights: &WeightStore,
    opts: &CompileOptions,
    stage: Stage,
) -> Result<String, CodegenError> {
    let lowered = lower(g, weights)?;
    if stage == Stage::Mlir {
        return Ok(mlir_source(&lowered));
    }
    target.emit(&lowered, opts, stage)
}

/// Compiles `g` over `weights` for the host CPU into the artifact directory `out` (created; existing
/// files replaced).
pub fn compile_to_dir(
    g: &Graph,
    weights: &WeightStore,
    opts: &CompileOptions,
    info: &ArtifactInfo,
    out: &Path,
) -> Result<Manifest, CodegenError> {
    compile_to_dir_for(&crate::CpuTarget::host(), g, weights, opts, info, out)
}

/// Lowers `g` to its target-neutral program and has `target` generate its kernels and write the
/// artifact directory `out`.
pub fn compile_to_dir_for(
    target: &dyn Target,
    g: &Graph,
    weights: &WeightStore,
    opts: &CompileOptions,
    info: &ArtifactInfo,
    out: &Path,
) -> Result<Manifest, CodegenError> {
    let t0 = Instant::now();
    let lowered = lower(g, weights)?;
    let mut manifest = target.build(lowered, opts, info, out)?;
    manifest.compile_seconds = t0.elapsed().as_secs_f64();
    write_manifest(&manifest, out)?;
    Ok(manifest)
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
