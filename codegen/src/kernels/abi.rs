//! Adapters from the uniform kernel ABI (`bufs, dims, begin, end`) to kernels with typed signatures.

use super::emit::{Emitter, R};
use inkwell::context::Context;
use inkwell::module::Module;
use inkwell::values::{FunctionValue, IntValue, PointerValue};
use inkwell::{FloatPredicate, IntPredicate};

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

/// `symbol(bufs=[x, w, mask, y], dims=[m, n], begin, end)`: output rows `begin..end` of
/// `masked_linear(x, w, mask)`. Rows that some token's mask keeps are computed by the dense `inner`
/// (`(w, x, y, m, n, lo, hi)`), one call per run of consecutive kept rows; then every element whose mask
/// is 0 is set to 0. At decode (m = 1) the weight rows of dropped outputs are never read.
pub fn wrap_masked_linear<'ctx>(
    ctx: &'ctx Context,
    module: &Module<'ctx>,
    inner: FunctionValue<'ctx>,
    symbol: &str,
) -> R<FunctionValue<'ctx>> {
    let e = Emitter::kernel(ctx, module, symbol)?;
    let (x, w, mask, y) = (e.buf(0)?, e.buf(1)?, e.buf(2)?, e.buf(3)?);
    let (m, n) = (e.dim(0)?, e.dim(1)?);
    let i64t = e.i64t();
    // Start of the current run of kept rows, or -1.
    let start = {
        let entry = e.func.get_first_basic_block().unwrap();
        let tmp = ctx.create_builder();
        match entry.get_first_instruction() {
            Some(i) => tmp.position_before(&i),
            None => tmp.position_at_end(entry),
        }
        tmp.build_alloca(i64t, "run_start")?
    };
    let any = e.var_f32(0.0)?;
    e.b.build_store(start, e.i64c(-1))?;
    let call = |lo, hi| -> R<()> {
        e.b.build_call(inner, &[w.into(), x.into(), y.into(), m.into(), n.into(), lo, hi], "")?;
        Ok(())
    };
    e.for_range(e.begin, e.end, |r| {
        e.set(any, e.f32c(0.0))?;
        e.for_range(e.i64c(0), m, |i| {
            let v = e.load_f32(mask, e.add(e.mul(i, n)?, r)?)?;
            let nz = e.b.build_float_compare(FloatPredicate::UNE, v, e.f32c(0.0), "nz")?;
            let acc = e.get(any)?;
            let acc = e.b.build_select(nz, e.f32c(1.0), acc, "any")?.into_float_value();
            e.set(any, acc)
        })?;
        let active = e.b.build_float_compare(FloatPredicate::ONE, e.get(any)?, e.f32c(0.0), "active")?;
        let s = e.b.build_load(i64t, start, "s")?.into_int_value();
        let open = e.b.build_int_compare(IntPredicate::SGE, s, e.i64c(0), "open")?;
        let inactive = e.b.build_not(active, "inactive")?;
        let close = e.b.build_and(open, inactive, "close")?;
        let call_bb = ctx.append_basic_block(e.func, "close_run");
        let next_bb = ctx.append_basic_block(e.func, "after_close");
        e.b.build_conditional_branch(close, call_bb, next_bb)?;
        e.b.position_at_end(call_bb);
        call(s.into(), r.into())?;
        e.b.build_unconditional_branch(next_bb)?;
        e.b.position_at_end(next_bb);
        // Still open after this row: active and already open; newly opened: active and not open.
        let s1 = e.b.build_select(close, e.i64c(-1), s, "s1")?.into_int_value();
        let idle = e.b.build_int_compare(IntPredicate::SLT, s1, e.i64c(0), "idle")?;
        let opens = e.b.build_and(active, idle, "opens")?;
        let s2 = e.b.build_select(opens, r, s1, "s2")?;
        e.b.build_store(start, s2)?;
        Ok(())
    })?;
    let s = e.b.build_load(i64t, start, "s")?.into_int_value();
    let open = e.b.build_int_compare(IntPredicate::SGE, s, e.i64c(0), "open")?;
    let call_bb = ctx.append_basic_block(e.func, "last_run");
    let next_bb = ctx.append_basic_block(e.func, "masking");
    e.b.build_conditional_branch(open, call_bb, next_bb)?;
    e.b.position_at_end(call_bb);
    call(s.into(), e.end.into())?;
    e.b.build_unconditional_branch(next_bb)?;
    e.b.position_at_end(next_bb);
    e.for_range(e.i64c(0), m, |i| {
        e.for_range(e.begin, e.end, |r| {
            let at = e.add(e.mul(i, n)?, r)?;
            let keep = e.b.build_float_compare(FloatPredicate::UNE, e.load_f32(mask, at)?, e.f32c(0.0), "keep")?;
            let v = e.b.build_select(keep, e.load_f32(y, at)?, e.f32c(0.0), "v")?.into_float_value();
            e.store_f32(y, at, v)
        })
    })?;
    e.finish()
}

/// Largest `k` of an active-linear wrapper: its index list (`4k` bytes) lives on the stack.
pub const ACTIVE_MAX_K: usize = 32768;

/// `symbol(bufs=[x, wt, y], dims=[m], begin, end)`: `active_linear(x, wt)` for output blocks
/// `begin..end` (32 outputs each). Per x row, the channels with x ≠ 0 are listed (branch-free) and the
/// active-channel kernel `inner` (`(wt, idx, x, y, count, k, col_begin, col_end)`) reads only their rows
/// of `wt [k, n]`. NaN counts as non-zero, so it propagates as in the interpreter.
pub fn wrap_active_linear<'ctx>(
    ctx: &'ctx Context,
    module: &Module<'ctx>,
    inner: FunctionValue<'ctx>,
    k: usize,
    n: usize,
    symbol: &str,
) -> R<FunctionValue<'ctx>> {
    let e = Emitter::kernel(ctx, module, symbol)?;
    let (x, wt, y) = (e.buf(0)?, e.buf(1)?, e.buf(2)?);
    let m = e.dim(0)?;
    let (i32t, i64t) = (ctx.i32_type(), e.i64t());
    let (idx, count) = {
        let entry = e.func.get_first_basic_block().unwrap();
        let tmp = ctx.create_builder();
        match entry.get_first_instruction() {
            Some(i) => tmp.position_before(&i),
            None => tmp.position_at_end(entry),
        }
        (tmp.build_alloca(i32t.array_type(k as u32), "idx")?, tmp.build_alloca(i64t, "count")?)
    };
    let (kc, nc, blk) = (e.i64c(k as i64), e.i64c(n as i64), e.i64c(32));
    let (cb, ce) = (e.mul(e.begin, blk)?, e.mul(e.end, blk)?);
    e.for_range(e.i64c(0), m, |i| {
        let xi = e.gep(e.f32t().into(), x, e.mul(i, kc)?)?;
        let yi = e.gep(e.f32t().into(), y, e.mul(i, nc)?)?;
        e.b.build_store(count, e.i64c(0))?;
        e.for_range(e.i64c(0), kc, |j| {
            let c = e.b.build_load(i64t, count, "c")?.into_int_value();
            let slot = e.gep(i32t.into(), idx, c)?;
            e.b.build_store(slot, e.b.build_int_truncate(j, i32t, "j32")?)?;
            let nz = e.b.build_float_compare(FloatPredicate::UNE, e.load_f32(xi, j)?, e.f32c(0.0), "nz")?;
            let inc = e.b.build_int_z_extend(nz, i64t, "inc")?;
            e.b.build_store(count, e.add(c, inc)?)?;
            Ok(())
        })?;
        let c = e.b.build_load(i64t, count, "c")?.into_int_value();
        let args = [wt.into(), idx.into(), xi.into(), yi.into(), c.into(), kc.into(), cb.into(), ce.into()];
        e.b.build_call(inner, &args, "")?;
        Ok(())
    })?;
    e.finish()
}

/// `symbol(bufs=[x, wt, y], dims=[m], begin, end)`: `active_linear(x, wt)` on a column-major weight
/// (`kiln_ir::column`) for output groups `begin..end` (32 outputs each). The rows go in groups of
/// `group` (the prefill kernel `prefill`; a lone row, as at decode, goes to `decode`): per group, the
/// channels where some row's x ≠ 0 are listed (a vector compare per 32 channels and row, then one step
/// per listed channel), with the 32-channel blocks that hold one,
/// and the kernel (`kernels::colactive`) reads only those channels' codes and those blocks' scales.
/// NaN counts as non-zero, as in the interpreter.
#[allow(clippy::too_many_arguments)]
pub fn wrap_active_linear_col<'ctx>(
    ctx: &'ctx Context,
    module: &Module<'ctx>,
    decode: FunctionValue<'ctx>,
    prefill: FunctionValue<'ctx>,
    group: usize,
    k: usize,
    n: usize,
    symbol: &str,
) -> R<FunctionValue<'ctx>> {
    let e = Emitter::kernel(ctx, module, symbol)?;
    let (x, wt, y) = (e.buf(0)?, e.buf(1)?, e.buf(2)?);
    let m = e.dim(0)?;
    let (i32t, i64t) = (ctx.i32_type(), e.i64t());
    let nblk = k / 32;
    let (idx, bptr, blk) = {
        let entry = e.func.get_first_basic_block().unwrap();
        let tmp = ctx.create_builder();
        match entry.get_first_instruction() {
            Some(i) => tmp.position_before(&i),
            None => tmp.position_at_end(entry),
        }
        (
            tmp.build_alloca(i32t.array_type(k as u32), "idx")?,
            tmp.build_alloca(i32t.array_type(nblk as u32 + 1), "bptr")?,
            tmp.build_alloca(i32t.array_type(nblk as u32), "blk")?,
        )
    };
    let (count, nb, any) = (e.var_i64(0)?, e.var_i64(0)?, e.var_i64(0)?);
    let (kc, nc, blk32, gc) = (e.i64c(k as i64), e.i64c(n as i64), e.i64c(32), e.i64c(group as i64));
    let (cb, ce) = (e.mul(e.begin, blk32)?, e.mul(e.end, blk32)?);
    let groups = e.div(e.add(m, e.i64c(group as i64 - 1))?, gc)?;
    let st32 = |arr: PointerValue<'ctx>, at: IntValue<'ctx>, v: IntValue<'ctx>| -> R<()> {
        e.b.build_store(e.gep(i32t.into(), arr, at)?, e.b.build_int_truncate(v, i32t, "v32")?)?;
        Ok(())
    };
    e.for_range(e.i64c(0), groups, |gi| {
        let i0 = e.mul(gi, gc)?;
        let rows = e.imin(gc, e.isub(m, i0)?)?;
        let xi = e.gep(e.f32t().into(), x, e.mul(i0, kc)?)?;
        let yi = e.gep(e.f32t().into(), y, e.mul(i0, nc)?)?;
        e.set_i64(count, e.i64c(0))?;
        e.set_i64(nb, e.i64c(0))?;
        st32(bptr, e.i64c(0), e.i64c(0))?;
        e.for_range(e.i64c(0), e.i64c(nblk as i64), |b| {
            let start = e.get_i64(count)?;
            // Bit t of `any`: channel 32·b + t is non-zero in some row (one vector compare per row).
            e.set_i64(any, e.i64c(0))?;
            e.for_range(e.i64c(0), rows, |r| {
                let v = e.load_vec(xi, e.add(e.mul(r, kc)?, e.mul(b, blk32)?)?, 32)?;
                let nz = e.b.build_float_compare(FloatPredicate::UNE, v, v.get_type().const_zero(), "nz")?;
                let bits = e.b.build_bit_cast(nz, i32t, "bits")?.into_int_value();
                let acc = e.get_i64(any)?;
                e.set_i64(any, e.b.build_or(acc, e.b.build_int_z_extend(bits, i64t, "b64")?, "any")?)
            })?;
            // List the set bits, lowest first (the kernel wants channels increasing).
            let mask = e.get_i64(any)?;
            let set = e.intrinsic_i64("llvm.ctpop", &[mask.into()])?;
            e.for_range(e.i64c(0), set, |_| {
                let (c, mk) = (e.get_i64(count)?, e.get_i64(any)?);
                let t = e.intrinsic_i64("llvm.cttz", &[mk.into(), ctx.bool_type().const_int(1, false).into()])?;
                st32(idx, c, e.add(e.mul(b, blk32)?, t)?)?;
                e.set_i64(count, e.add(c, e.i64c(1))?)?;
                e.set_i64(any, e.b.build_and(mk, e.b.build_int_sub(mk, e.i64c(1), "low")?, "rest")?)
            })?;
            let (c, q) = (e.get_i64(count)?, e.get_i64(nb)?);
            st32(blk, q, b)?;
            st32(bptr, e.add(q, e.i64c(1))?, c)?;
            let used = e.icmp(IntPredicate::SGT, c, start)?;
            e.set_i64(nb, e.add(q, e.b.build_int_z_extend(used, i64t, "used")?)?)
        })?;
        let lone = e.icmp(IntPredicate::EQ, rows, e.i64c(1))?;
        let call = |f: FunctionValue<'ctx>| -> R<()> {
            let args = [
                wt.into(),
                idx.into(),
                bptr.into(),
                blk.into(),
                xi.into(),
                yi.into(),
                e.get_i64(nb)?.into(),
                kc.into(),
                rows.into(),
                cb.into(),
                ce.into(),
            ];
            e.b.build_call(f, &args, "")?;
            Ok(())
        };
        e.if_else(lone, || call(decode), || call(prefill))
    })?;
    e.finish()
}

/// `symbol(bufs=[x, wt, y], dims=[m], begin, end)`: `active_linear(x, wt)` on a gathered column weight
/// (`q4_1g`, …: structured pruning's `W_down`/`W_o`, `kiln_ir::column`) for output groups `begin..end`.
/// Every one of the `k` kept channels is listed (a pruned model's activations are dense: scanning
/// them for zeros would cost more than it saves; a zero channel adds exactly 0 to the finite weights'
/// sums), and every block run of the weight's header is a listed block, so the column kernels (the
/// decode kernel for a lone row, `prefill` for groups of `group` rows) read the whole gathered weight.
#[allow(clippy::too_many_arguments)]
pub fn wrap_active_linear_gathered<'ctx>(
    ctx: &'ctx Context,
    module: &Module<'ctx>,
    decode: FunctionValue<'ctx>,
    prefill: FunctionValue<'ctx>,
    group: usize,
    k: usize,
    n: usize,
    symbol: &str,
) -> R<FunctionValue<'ctx>> {
    let e = Emitter::kernel(ctx, module, symbol)?;
    let (x, wt, y) = (e.buf(0)?, e.buf(1)?, e.buf(2)?);
    let m = e.dim(0)?;
    let i32t = ctx.i32_type();
    // 0, 1, …, k − 1: the listed channels, and (its first nb entries) the listed block runs.
    let iota = {
        let consts: Vec<_> = (0..k as u64).map(|v| i32t.const_int(v, false)).collect();
        let g = module.add_global(i32t.array_type(k as u32), None, &format!("{symbol}_iota"));
        g.set_initializer(&i32t.const_array(&consts));
        g.set_constant(true);
        g.set_linkage(inkwell::module::Linkage::Private);
        g.as_pointer_value()
    };
    // Header: u32 nb, u32 bptr[nb + 1]; the codes follow, then the scale rows.
    let nb = e.load_i32_as_i64(wt, e.i64c(0))?;
    let bptr = e.gep(i32t.into(), wt, e.i64c(1))?;
    let codes = e.gep(i32t.into(), wt, e.add(nb, e.i64c(2))?)?;
    let (kc, nc, blk32, gc) = (e.i64c(k as i64), e.i64c(n as i64), e.i64c(32), e.i64c(group as i64));
    let (cb, ce) = (e.mul(e.begin, blk32)?, e.mul(e.end, blk32)?);
    let groups = e.div(e.add(m, e.i64c(group as i64 - 1))?, gc)?;
    e.for_range(e.i64c(0), groups, |gi| {
        let i0 = e.mul(gi, gc)?;
        let rows = e.imin(gc, e.isub(m, i0)?)?;
        let xi = e.gep(e.f32t().into(), x, e.mul(i0, kc)?)?;
        let yi = e.gep(e.f32t().into(), y, e.mul(i0, nc)?)?;
        let lone = e.icmp(IntPredicate::EQ, rows, e.i64c(1))?;
        let call = |f: FunctionValue<'ctx>| -> R<()> {
            let args = [
                codes.into(),
                iota.into(),
                bptr.into(),
                iota.into(),
                xi.into(),
                yi.into(),
                nb.into(),
                kc.into(),
                rows.into(),
                cb.into(),
                ce.into(),
            ];
            e.b.build_call(f, &args, "")?;
            Ok(())
        };
        e.if_else(lone, || call(decode), || call(prefill))
    })?;
    e.finish()
}

/// `symbol(bufs=[x, w, blocks, row_ptr, col_idx, y], dims=[m, n], begin, end)`: rows `begin..end` of a
/// pruned linear, from the dense layout (`dense(w, x, y, m, n, lo, hi)`) or the block-sparse one
/// (`sparse(blocks, row_ptr, col_idx, x, y, m, n, lo, hi)`), per the kernel selection for small (m < 8)
/// and large m.
pub fn wrap_sparse_linear<'ctx>(
    ctx: &'ctx Context,
    module: &Module<'ctx>,
    dense: FunctionValue<'ctx>,
    sparse: Option<FunctionValue<'ctx>>,
    (decode, prefill): (bool, bool),
    symbol: &str,
) -> R<FunctionValue<'ctx>> {
    let e = Emitter::kernel(ctx, module, symbol)?;
    let (x, w, blocks, row_ptr, col_idx, y) = (e.buf(0)?, e.buf(1)?, e.buf(2)?, e.buf(3)?, e.buf(4)?, e.buf(5)?);
    let (m, n) = (e.dim(0)?, e.dim(1)?);
    let dense_call = |e: &Emitter<'_, 'ctx>| -> R<()> {
        e.b.build_call(dense, &[w.into(), x.into(), y.into(), m.into(), n.into(), e.begin.into(), e.end.into()], "")?;
        Ok(())
    };
    match sparse {
        Some(sp) if decode || prefill => {
            let small = e.b.build_int_compare(IntPredicate::SLT, m, e.i64c(8), "small")?;
            let i1 = ctx.bool_type();
            let (d, p) = (i1.const_int(decode as u64, false), i1.const_int(prefill as u64, false));
            let pick = e.b.build_select(small, d, p, "sparse")?.into_int_value();
            let sparse_bb = ctx.append_basic_block(e.func, "sparse");
            let dense_bb = ctx.append_basic_block(e.func, "dense");
            let done = ctx.append_basic_block(e.func, "done");
            e.b.build_conditional_branch(pick, sparse_bb, dense_bb)?;
            e.b.position_at_end(sparse_bb);
            let args: [inkwell::values::BasicMetadataValueEnum; 9] = [
                blocks.into(),
                row_ptr.into(),
                col_idx.into(),
                x.into(),
                y.into(),
                m.into(),
                n.into(),
                e.begin.into(),
                e.end.into(),
            ];
            e.b.build_call(sp, &args, "")?;
            e.b.build_unconditional_branch(done)?;
            e.b.position_at_end(dense_bb);
            dense_call(&e)?;
            e.b.build_unconditional_branch(done)?;
            e.b.position_at_end(done);
        }
        _ => dense_call(&e)?,
    }
    e.finish()
}

/// `symbol(bufs=[x, packed, w, y], dims=[m, n], begin, end)`: rows `begin..end` of a pruned linear held
/// both in a compact form (`compact(packed, x, y, m, n, lo, hi)`: the N:M or bitmap kernel) and in the
/// dense layout (`dense(w, x, y, m, n, lo, hi)`), the compact kernel where `decode` (m < 8) / `prefill`
/// (m ≥ 8) say so, else the dense one.
pub fn wrap_phase_linear<'ctx>(
    ctx: &'ctx Context,
    module: &Module<'ctx>,
    compact: FunctionValue<'ctx>,
    dense: FunctionValue<'ctx>,
    (decode, prefill): (bool, bool),
    symbol: &str,
) -> R<FunctionValue<'ctx>> {
    let e = Emitter::kernel(ctx, module, symbol)?;
    let (x, packed, w, y) = (e.buf(0)?, e.buf(1)?, e.buf(2)?, e.buf(3)?);
    let (m, n) = (e.dim(0)?, e.dim(1)?);
    let call = |f: FunctionValue<'ctx>, weights: PointerValue<'ctx>| -> R<()> {
        e.b.build_call(f, &[weights.into(), x.into(), y.into(), m.into(), n.into(), e.begin.into(), e.end.into()], "")?;
        Ok(())
    };
    let small = e.b.build_int_compare(IntPredicate::SLT, m, e.i64c(8), "small")?;
    let i1 = ctx.bool_type();
    let (d, p) = (i1.const_int(decode as u64, false), i1.const_int(prefill as u64, false));
    let pick = e.b.build_select(small, d, p, "compact")?.into_int_value();
    e.if_else(pick, || call(compact, packed), || call(dense, w))?;
    e.finish()
}
