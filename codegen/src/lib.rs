//! Code generation: turning IR graphs into native code.
//!
//! `lower` maps a graph to a target-neutral kernel program (buffers, launches, and the kernels they call
//! by family, the linear family by descriptor: `linear_family`); a [`Target`] generates the kernels and
//! writes the artifact: `cpu` (kernels in `kernels` as LLVM IR, `llvm` optimises and emits for the host,
//! `artifact` lays out weights and manifest). [`check_supported`] names the first op a target cannot lower.

use kiln_ir::{DType, Graph, Op};

pub mod artifact;
pub mod cpu;
pub mod kernels;
pub mod library;
pub mod linear_family;
pub mod llvm;
pub mod lower;
pub mod mlir;

pub use artifact::{
    compile_to_dir, compile_to_dir_for, emit_stage, emit_stage_for, host_target_info, ArtifactInfo, CompileOptions,
    Stage,
};
pub use cpu::CpuTarget;
pub use library::{compile_library_object, TargetSpec};
pub use linear_family::LinearDesc;
pub use lower::{KernelSpec, Lowered};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CodegenError {
    #[error("target {target}: op `{op}` ({value}) has no lowering yet")]
    UnsupportedOp { target: String, op: &'static str, value: String },
    /// A target has no code for a kernel of this family and form.
    #[error("target {target}: no {family} kernel for {kernel}")]
    UnsupportedKernel { target: String, family: &'static str, kernel: String },
    /// A kernel generator was asked for an element type it has no code for.
    #[error("{kernel} kernel: weights of dtype {dtype} are not supported")]
    UnsupportedDType { kernel: &'static str, dtype: DType },
    /// A kernel was asked for with parameters it cannot be generated for (e.g. a partial block).
    #[error("invalid kernel spec: {0}")]
    InvalidSpec(String),
    /// LLVM refused something: building IR, verifying, optimizing, or emitting code.
    #[error("LLVM: {0}")]
    Llvm(String),
}

impl From<inkwell::builder::BuilderError> for CodegenError {
    fn from(e: inkwell::builder::BuilderError) -> Self {
        CodegenError::Llvm(format!("IR builder: {e}"))
    }
}

/// A code generation target. Lowering ([`lower::lower`]) is target-neutral: a graph becomes a
/// [`kiln_ir::program::Program`] of buffers and launches plus the kernels it calls, by family
/// ([`KernelSpec`]: the linear family by [`LinearDesc`], embeddings, ops, fused elementwise trees). A
/// target generates each family — refusing by name what it has no code for
/// ([`CodegenError::UnsupportedKernel`]) — and writes its artifact. [`CpuTarget`] is the one today.
pub trait Target {
    /// Short name, e.g. `x86_64-cpu` or `cuda-sm80`.
    fn name(&self) -> String;
    /// Whether this target can lower `op`.
    fn supports(&self, op: &Op) -> bool;
    /// Generates the kernels of `lowered` and writes the artifact directory `out` (created) but its
    /// manifest, which it returns for the caller to complete and write.
    fn build(
        &self,
        lowered: Lowered,
        opts: &CompileOptions,
        info: &ArtifactInfo,
        out: &std::path::Path,
    ) -> Result<kiln_ir::program::Manifest, CodegenError>;
    /// A printed stage of the code it generates for `lowered` (`kiln compile --emit llvm|asm|mlir`).
    fn emit(&self, lowered: &Lowered, opts: &CompileOptions, stage: Stage) -> Result<String, CodegenError>;
}

/// Checks that `target` can lower every op of `g`; the error names the first op it cannot.
pub fn check_supported(g: &Graph, target: &dyn Target) -> Result<(), CodegenError> {
    for (i, n) in g.nodes.iter().enumerate() {
        if matches!(n.op, Op::Input { .. } | Op::Weight { .. }) {
            continue;
        }
        if !target.supports(&n.op) {
            return Err(CodegenError::UnsupportedOp { target: target.name(), op: n.op.name(), value: format!("%{i}") });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_ops_are_named() {
        let g = kiln_ir::text::parse(
            "graph \"g\" {\n  %0 = input {name = \"x\"} : f32[4]\n  %1 = reduce_max(%0) {axis = 0} : f32[1]\n  output \"y\" = %1\n}\n",
        )
        .unwrap();
        let err = check_supported(&g, &CpuTarget::host()).unwrap_err();
        assert!(err.to_string().contains("op `reduce_max` (%1)"), "{err}");
        #[cfg(target_arch = "x86_64")]
        assert!(CpuTarget::host().features.iter().any(|f| f == "sse4.2"));
    }
}
