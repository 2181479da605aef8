//! Code generation: turning IR graphs into native code.
//!
//! `lower` maps a graph to a kernel program, `kernels` generates each kernel as LLVM IR, `llvm` optimises
//! and emits code for the host, `artifact` writes the artifact directory the runtime loads. The small
//! [`Target`] trait says which ops a target can lower; [`check_supported`] names the first one it cannot.

use kiln_ir::{DType, Graph, Op};

pub mod artifact;
pub mod kernels;
pub mod library;
pub mod llvm;
pub mod lower;
pub mod mlir;

pub use artifact::{compile_to_dir, emit_stage, host_target_info, ArtifactInfo, CompileOptions, Stage};
pub use library::{compile_library_object, TargetSpec};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CodegenError {
    #[error("target {target}: op `{op}` ({value}) has no lowering yet")]
    UnsupportedOp { target: String, op: &'static str, value: String },
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

/// A code generation target.
pub trait Target {
    /// Short name, e.g. `x86_64-cpu` or `cuda-sm80`.
    fn name(&self) -> String;
    /// Whether this target can lower `op`.
    fn supports(&self, op: &Op) -> bool;
}

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
        // The ops `lower` has a CPU lowering for (each with the patterns it accepts, checked there).
        matches!(
            op,
            Op::Input { .. }
                | Op::Weight { .. }
                | Op::Embedding
                | Op::Linear
                | Op::Constant { .. }
                | Op::Add
                | Op::Sub
                | Op::Mul
                | Op::Div
                | Op::Neg
                | Op::Exp
                | Op::Sqrt
                | Op::Rsqrt
                | Op::Sigmoid
                | Op::Silu
                | Op::RmsNorm { .. }
                | Op::Rope { .. }
                | Op::Concat { .. }
                | Op::Attention { .. }
                | Op::FlexAttention { .. }
                | Op::SwiGlu
                | Op::Threshold
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
