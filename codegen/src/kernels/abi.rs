//! Adapters from the uniform kernel ABI (`bufs, dims, begin, end`) to kernels with typed signatures.

use super::emit::{Emitter, R};
use inkwell::context::Context;
use inkwell::module::Module;
use inkwell::values::FunctionValue;
use inkwell::IntPredicate;

/// `symbol(bufs=[x, w0, y0, …, w{g-1}, y{g-1}], dims=[m, n0, …, n{g-1}], begin, end)`: rows `begin..end`
/// of the concatenation of the `g` outputs, each segment computed by `inner(w_i, x, y_i, m, n_i, lo, hi)`.
/// When `inner` takes a residual (one linear, `g` = 1), it is the buffer after `y0`.
pub fn wrap_linear<'ctx>(
    ctx: &'ctx Context,
    module: &Module<'ctx>,
    inner: FunctionValue<'ctx>,
    group: usize,
    symbol: &str,
) -> R<FunctionValue<'ctx>> {
    let e = Emitter::kernel(ctx, module, symbol)?;
    let x = e.buf(0)?;
    let m = e.dim(0)?;
    let mut offset = e.i64c(0);
    for g in 0..group as u64 {
        let (w, y, n) = (e.buf(1 + 2 * g)?, e.buf(2 + 2 * g)?, e.dim(1 + g)?);
        // This segment's rows within begin..end: lo = clamp(begin - offset), hi = clamp(end - offset).
        let clamp = |v| -> R<_> {
            let v = e.b.build_int_sub(v, offset, "rel")?;
            let neg = e.b.build_int_compare(IntPredicate::SLT, v, e.i64c(0), "neg")?;
            let v = e.b.build_select(neg, e.i64c(0), v, "lo0")?.into_int_value();
            e.imin(v, n)
        };
        let (lo, hi) = (clamp(e.begin)?, clamp(e.end)?);
        let any = e.b.build_int_compare(IntPredicate::SLT, lo, hi, "any")?;
        let call_bb = ctx.append_basic_block(e.func, "segment");
        let next_bb = ctx.append_basic_block(e.func, "next");
        e.b.build_conditional_branch(any, call_bb, next_bb)?;
        e.b.position_at_end(call_bb);
        let mut args = vec![w.into(), x.into(), y.into(), m.into(), n.into(), lo.into(), hi.into()];
        if inner.count_params() == 8 {
            args.push(e.buf(3)?.into());
        }
        e.b.build_call(inner, &args, "")?;
        e.b.build_unconditional_branch(next_bb)?;
        e.b.position_at_end(next_bb);
        offset = e.add(offset, n)?;
    }
    e.finish()
}
