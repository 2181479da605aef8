//! The MLIR layer (melior): kernels written as MLIR (`linalg` on memrefs, `arith`, `math`) are parsed,
//! verified, lowered step by step to the LLVM dialect, and translated into an LLVM module in the caller's
//! inkwell context, where they join the kernels generated directly as LLVM IR and are optimised with them.
//!
//! MLIR and inkwell share one statically linked LLVM, so the translated module is an ordinary
//! `inkwell::module::Module` of the same context.

use crate::CodegenError;
use melior::dialect::DialectRegistry;
use melior::ir::Module as MlirModule;
use melior::pass::PassManager;
use melior::utility::{
    parse_pass_pipeline, register_all_dialects, register_all_llvm_translations, register_all_passes,
};
use std::sync::{Arc, Mutex, Once};

/// From `linalg` on memrefs to the LLVM dialect: loops, then control flow, then every dialect's
/// conversion to LLVM.
pub const LOWERING_PIPELINE: &str = "builtin.module(convert-linalg-to-loops,lower-affine,convert-scf-to-cf,\
convert-math-to-llvm,expand-strided-metadata,finalize-memref-to-llvm,convert-arith-to-llvm,convert-cf-to-llvm,\
convert-func-to-llvm,reconcile-unrealized-casts)";

fn mlir_err(stage: &str, diagnostics: &Mutex<Vec<String>>) -> CodegenError {
    let d = diagnostics.lock().map(|d| d.join("; ")).unwrap_or_default();
    CodegenError::Llvm(format!("MLIR {stage} failed: {d}"))
}

/// Parses `source` (an MLIR module's body), lowers it with [`LOWERING_PIPELINE`] and translates the
/// result into an LLVM module of `ctx`.
pub fn lower_to_llvm<'ctx>(
    source: &str,
    ctx: &'ctx inkwell::context::Context,
) -> Result<inkwell::module::Module<'ctx>, CodegenError> {
    static PASSES: Once = Once::new();
    PASSES.call_once(register_all_passes);
    let registry = DialectRegistry::new();
    register_all_dialects(&registry);
    let context = melior::Context::new();
    context.append_dialect_registry(&registry);
    context.load_all_available_dialects();
    register_all_llvm_translations(&context);
    // Kernels are small; MLIR's own thread pool would only add start-up time.
    context.enable_multi_threading(false);
    let diagnostics = Arc::new(Mutex::new(Vec::new()));
    let sink = diagnostics.clone();
    context.attach_diagnostic_handler(move |d| {
        if let Ok(mut v) = sink.lock() {
            v.push(format!("{} at {}", d, d.location()));
        }
        true
    });

    let mut module = MlirModule::parse(&context, source).ok_or_else(|| mlir_err("parsing", &diagnostics))?;
    if !module.as_operation().verify() {
        return Err(mlir_err("verification", &diagnostics));
    }
    let pm = PassManager::new(&context);
    parse_pass_pipeline(pm.as_operation_pass_manager(), LOWERING_PIPELINE)
        .map_err(|e| CodegenError::Llvm(format!("MLIR pass pipeline: {e}")))?;
    pm.run(&mut module).map_err(|_| mlir_err("lowering", &diagnostics))?;
    // SAFETY: `ctx` is a live LLVM context of the same (statically linked) LLVM that MLIR translates into;
    // the returned module is owned by the inkwell wrapper, which disposes of it.
    let raw = unsafe { mlir_sys::mlirTranslateModuleToLLVMIR(module.as_operation().to_raw(), ctx.raw() as _) };
    if raw.is_null() {
        return Err(mlir_err("translation to LLVM IR", &diagnostics));
    }
    Ok(unsafe { inkwell::module::Module::new(raw as _) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowers_a_linalg_kernel_into_the_inkwell_context() {
        let src = r#"
func.func @scale(%x: memref<?xf32>, %y: memref<?xf32>) {
  linalg.generic {indexing_maps = [affine_map<(i) -> (i)>, affine_map<(i) -> (i)>], iterator_types = ["parallel"]}
      ins(%x : memref<?xf32>) outs(%y : memref<?xf32>) {
  ^bb0(%a: f32, %o: f32):
    %two = arith.constant 2.0 : f32
    %r = arith.mulf %a, %two : f32
    linalg.yield %r : f32
  }
  return
}
"#;
        let ctx = inkwell::context::Context::create();
        let m = lower_to_llvm(src, &ctx).unwrap();
        let f = m.get_function("scale").expect("function translated");
        // Expanded memref descriptors: (allocated, aligned, offset, size, stride) per memref.
        assert_eq!(f.count_params(), 10);
        assert!(m.verify().is_ok());
    }

    #[test]
    fn invalid_mlir_is_an_error_with_the_diagnostic() {
        let ctx = inkwell::context::Context::create();
        let err = lower_to_llvm("func.func @f(%x: f32) -> f32 { return %y : f32 }", &ctx).unwrap_err();
        assert!(err.to_string().contains("MLIR parsing failed"), "{err}");
        assert!(err.to_string().contains("undeclared SSA value"), "{err}");
    }
}
