//! Shared LLVM plumbing for the CPU code generator: modules, target machines, the optimization
//! pipeline, and emitting object code, assembly or IR text.
//!
//! Kernels are generated as target-independent LLVM IR (explicit vector types and intrinsics); what
//! makes them fast on a given machine is decided here, by the target machine the module is optimized
//! and compiled for. [`host_target_machine`] describes the machine Kiln runs on (its exact CPU name and
//! feature string, e.g. `znver3` with `+avx2,+fma,+f16c,...`), and [`optimize`] stamps that CPU onto
//! every function as `target-cpu`/`target-features` attributes before running `default<O3>`. The
//! attributes matter for the JIT: MCJIT compiles for a generic x86-64 unless the functions say
//! otherwise, which would turn `<8 x float>` FMAs into SSE2 code and `fmaf` libcalls.

use crate::CodegenError;
use inkwell::attributes::AttributeLoc;
use inkwell::context::Context;
use inkwell::module::Module;
use inkwell::passes::PassBuilderOptions;
use inkwell::targets::{CodeModel, FileType, InitializationConfig, RelocMode, Target, TargetMachine, TargetTriple};
use inkwell::OptimizationLevel;
use std::sync::OnceLock;

/// Registers the targets Kiln can generate code for (once per process; LLVM's registry is global).
pub fn init_targets() -> Result<(), CodegenError> {
    static INIT: OnceLock<Result<(), String>> = OnceLock::new();
    INIT.get_or_init(|| {
        // The native target (what the JIT and host object files need) plus x86 and AArch64 explicitly,
        // for cross compiling object code (`--target TRIPLE[:CPU]`); inkwell is built with those two.
        Target::initialize_native(&InitializationConfig::default())?;
        Target::initialize_x86(&InitializationConfig::default());
        Target::initialize_aarch64(&InitializationConfig::default());
        Ok(())
    })
    .clone()
    .map_err(|e| CodegenError::Llvm(format!("initializing the native target: {e}")))
}

/// A fresh module for kernels, named `name`.
pub fn create_module<'ctx>(ctx: &'ctx Context, name: &str) -> Module<'ctx> {
    ctx.create_module(name)
}

/// A target machine for the host: its triple, exact CPU name and feature string, optimizing
/// aggressively, position-independent code (the objects end up in shared libraries).
pub fn host_target_machine() -> Result<TargetMachine, CodegenError> {
    init_targets()?;
    let cpu = TargetMachine::get_host_cpu_name();
    let features = TargetMachine::get_host_cpu_features();
    target_machine(
        &TargetMachine::get_default_triple(),
        cpu.to_str().map_err(|e| CodegenError::Llvm(format!("host CPU name: {e}")))?,
        features.to_str().map_err(|e| CodegenError::Llvm(format!("host CPU features: {e}")))?,
    )
}

/// A target machine for `triple` with the given CPU name (e.g. `x86-64-v3`) and LLVM feature string
/// (e.g. `+avx2,+fma`), optimizing aggressively and generating position-independent code.
pub fn target_machine(triple: &TargetTriple, cpu: &str, features: &str) -> Result<TargetMachine, CodegenError> {
    init_targets()?;
    let target = Target::from_triple(triple)
        .map_err(|e| CodegenError::Llvm(format!("no LLVM target for {}: {e}", triple.as_str().to_string_lossy())))?;
    target
        .create_target_machine(triple, cpu, features, OptimizationLevel::Aggressive, RelocMode::PIC, CodeModel::Default)
        .ok_or_else(|| {
            CodegenError::Llvm(format!(
                "cannot create a target machine for {} (cpu {cpu})",
                triple.as_str().to_string_lossy()
            ))
        })
}

/// Specialises `module` for `tm` and optimizes it with LLVM's `default<O3>` pipeline (new pass
/// manager): sets the module's triple and data layout, marks every defined function with the
/// machine's CPU and features, verifies, and runs the passes.
pub fn optimize(module: &Module, tm: &TargetMachine) -> Result<(), CodegenError> {
    specialise(module, tm);
    verify(module)?;
    module
        .run_passes("default<O3>", tm, PassBuilderOptions::create())
        .map_err(|e| CodegenError::Llvm(format!("optimizing: {}", e.to_string_lossy())))
}

/// Sets `module`'s triple and data layout from `tm`, and the `target-cpu`/`target-features`
/// attributes of its function definitions (see the module docs for why the attributes).
pub fn specialise(module: &Module, tm: &TargetMachine) {
    module.set_triple(&tm.get_triple());
    module.set_data_layout(&tm.get_target_data().get_data_layout());
    let ctx = module.get_context();
    let cpu = tm.get_cpu();
    let cpu = cpu.to_string_lossy();
    let features = tm.get_feature_string().to_string_lossy();
    for f in module.get_functions().filter(|f| f.count_basic_blocks() > 0) {
        f.add_attribute(AttributeLoc::Function, ctx.create_string_attribute("target-cpu", &cpu));
        if !features.is_empty() {
            f.add_attribute(AttributeLoc::Function, ctx.create_string_attribute("target-features", &features));
        }
    }
}

/// Runs LLVM's verifier over `module`.
pub fn verify(module: &Module) -> Result<(), CodegenError> {
    module.verify().map_err(|e| CodegenError::Llvm(format!("invalid module: {}", e.to_string_lossy())))
}

/// Compiles `module` to a relocatable object file for `tm` (ELF on Linux).
pub fn emit_object(module: &Module, tm: &TargetMachine) -> Result<Vec<u8>, CodegenError> {
    Ok(emit(module, tm, FileType::Object)?.as_slice().to_vec())
}

/// Compiles `module` to assembly text for `tm`, for reading what the kernels became.
pub fn emit_assembly(module: &Module, tm: &TargetMachine) -> Result<String, CodegenError> {
    Ok(String::from_utf8_lossy(emit(module, tm, FileType::Assembly)?.as_slice()).into_owned())
}

/// The module as LLVM IR text.
pub fn ir_text(module: &Module) -> String {
    module.print_to_string().to_string()
}

fn emit(
    module: &Module,
    tm: &TargetMachine,
    kind: FileType,
) -> Result<inkwell::memory_buffer::MemoryBuffer<'static>, CodegenError> {
    tm.write_to_memory_buffer(module, kind)
        .map_err(|e| CodegenError::Llvm(format!("emitting code: {}", e.to_string_lossy())))
}
