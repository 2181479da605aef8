//! Adapters from the uniform kernel ABI (`bufs, dims, begin, end`) to kernels with typed signatures.

use super::emit::{Emitter, R};
use inkwell::context::Context;
use inkwell::module::Module;
use inkwell::values::FunctionValue;

/// `symbol(bufs=[w, x, y], dims=[m, n], begin, end)` → `inner(w, x, y, m, n, begin, end)`.
pub fn wrap_linear<'ctx>(
    ctx: &'ctx Context,
    module: &Module<'ctx>,
    inner: FunctionValue<'ctx>,
    symbol: &str,
) -> R<FunctionValue<'ctx>> {
    let e = Emitter::kernel(ctx, module, symbol)?;
    let args = [
        e.buf(0)?.into(),
        e.buf(1)?.into(),
        e.buf(2)?.into(),
        e.dim(0)?.into(),
        e.dim(1)?.into(),
        e.begin.into(),
        e.end.into(),
    ];
    e.b.build_call(inner, &args, "")?;
    e.finish()
}
