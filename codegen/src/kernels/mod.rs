//! Generated CPU kernels: functions emitted as LLVM IR into a caller's module, shape-specialised at
//! generation time, then optimized and compiled with [`crate::llvm`].
//!
//! - [`linear`]: quantized matrix × activations, weights dequantized in registers;
//! - [`sparse`]: the same on block-sparse weights (CSR over 32-element blocks), walking only kept blocks,
//!   and input-sparse (active-channel) GEMV on transposed weights;
//! - [`nm`]: the same on N:M-sparse weights (kept codes and their positions per 32-element block);
//! - [`colactive`]: active-channel GEMV on the exact column-major 4/8-bit formats (`kiln_ir::column`);
//! - [`ops`]: normalisation, rotary embedding, KV append, attention;
//! - [`fused`]: chains of elementwise ops, generated as MLIR (`linalg.generic`) and lowered by [`crate::mlir`];
//! - [`embedding`]: row gathers from (quantized) tables;
//! - [`emit`]: the inkwell layer they share and the uniform kernel ABI; [`abi`]: adapters onto it.

pub mod abi;
pub mod attend;
pub mod bitmap;
pub mod colactive;
pub mod coreinfer;
pub mod embedding;
pub mod emit;
pub mod flex;
pub mod fused;
pub mod linear;
pub mod measure;
pub mod nm;
pub mod ops;
pub mod sparse;

pub use linear::{emit_linear, LinearKernelFn, LinearKernelSpec};
pub use sparse::{
    emit_active_linear, emit_sparse_linear, run_active_linear, run_sparse_linear, ActiveLinearKernelFn,
    ActiveLinearKernelSpec, SparseLinearKernelFn, SparseLinearKernelSpec,
};

impl ops::OpKernel {
    /// Generates this kernel into `module` under [`ops::OpKernel::symbol`]. The dispatch lives here, not
    /// in `ops`, so that `flex` and `coreinfer` can read `OpKernel` without `ops` depending on them.
    pub fn emit<'ctx>(
        &self,
        ctx: &'ctx inkwell::context::Context,
        module: &inkwell::module::Module<'ctx>,
    ) -> emit::R<inkwell::values::FunctionValue<'ctx>> {
        use ops::OpKernel as K;
        let e = emit::Emitter::kernel(ctx, module, &self.symbol())?;
        match self {
            K::FlexPattern { .. } | K::FlexAttention { .. } => flex::emit(&e, self)?,
            K::CoreKeep { .. }
            | K::CoreThresholds { .. }
            | K::CoreSelect { .. }
            | K::CoreGather { .. }
            | K::CoreExpand { .. } => coreinfer::emit(&e, self)?,
            _ => self.emit_body(&e)?,
        }
        e.finish()
    }
}
