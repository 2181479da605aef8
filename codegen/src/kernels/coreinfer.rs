//! CoreInfer kernels (`core_keep`, `core_select`; the rules in `kiln_ir::coreinfer`):
//!
//! - `CoreKeep` (bufs [core, out]; dims [past, seq]; items: rows): row r of the MLP mask is all ones
//!   when past = 0, else the core set of its batch row (`core[r / seq]`).
//! - `CoreThresholds` (bufs [act, scratch]; dims [past]; items: rows; nothing when past > 0): each
//!   token's k-th largest `|a|` key (its f32 bit pattern with the sign cleared), found exactly by 31
//!   bisection steps over the key range — the largest key t with `#{key ≥ t} ≥ k` — written as an i32.
//! - `CoreSelect` (bufs [act, scratch, core]; dims [past, seq]; items: batch · C channels; nothing when
//!   past > 0): per channel, the tokens whose key reaches their threshold; core = 1 where that count
//!   is at least β·seq − 1e-6 (f64, as the interpreter computes it), else 0, written in place.
//! - `core_linear` (the gathered gate/up projections), three launches over a per-op state buffer laid out
//!   as [`GatherLayout`] (`count`, the listed channels, then the copied rows):
//!   - `CoreGather` (bufs [core, w, gathered]; dims [past]; one item): at past = 0 marks the copy stale
//!     (`valid = 0`: the core set is about to change); at the first later step copies the rows of the
//!     core channels of `w`, ascending, to the start of the row area — whole rows of the weight's own
//!     bytes (any format whose rows are whole blocks), so the copy is exact — and records them.
//!   - [`wrap_core_linear`] (bufs [x, w, gathered, y]; dims [m, n, past]; items: n rows): at past = 0
//!     the dense linear kernel on `w`; later, the same kernel on the `count` gathered rows (a smaller dense
//!     matrix), the runtime's item range `begin..end` of `n` scaled to `begin·count/n..end·count/n`
//!     so the threads split the live rows; result `j` lands at column `j` of each row.
//!   - `CoreExpand` (bufs [gathered, y]; dims [past]; items: rows): after past = 0, per row, moves result
//!     `j` to its channel (listed ascending, so channel ≥ j: a backward pass in place) and zeroes the rest.

use super::emit::{Emitter, R};
use super::ops::OpKernel;
use inkwell::context::Context;
use inkwell::module::Module;
use inkwell::values::{FloatValue, FunctionValue, IntValue, PointerValue};
use inkwell::{FloatPredicate, IntPredicate};

/// The state buffer of one `core_linear` (32-bit words): `[0]` valid (1 once gathered for this prompt),
/// `[1]` count, `[2..2 + n]` the core channels ascending, then from word [`rows_word`](Self::rows_word)
/// (64-byte aligned) `n` rows of `row_bytes`, the first `count` of them the core channels' rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GatherLayout {
    pub n: usize,
    pub row_bytes: usize,
}

impl GatherLayout {
    pub fn new(n: usize, row_bytes: usize) -> Self {
        GatherLayout { n, row_bytes }
    }
    /// Where the rows start, in words.
    pub fn rows_word(n: usize) -> usize {
        (2 + n).div_ceil(16) * 16
    }
    /// The buffer's size in words.
    pub fn words(&self) -> usize {
        Self::rows_word(self.n) + (self.n * self.row_bytes).div_ceil(4)
    }
}

/// `i32` word `idx` of `buf`, widened to i64.
fn word<'ctx>(e: &Emitter<'_, 'ctx>, buf: PointerValue<'ctx>, idx: i64) -> R<IntValue<'ctx>> {
    e.load_i32_as_i64(buf, e.i64c(idx))
}

/// Stores the i64 `v` as the `i32` word `idx` of `buf`.
fn set_word<'ctx>(e: &Emitter<'_, 'ctx>, buf: PointerValue<'ctx>, idx: IntValue<'ctx>, v: IntValue<'ctx>) -> R<()> {
    let i32t = e.ctx.i32_type();
    let p = e.gep(i32t.into(), buf, idx)?;
    e.b.build_store(p, e.b.build_int_truncate(v, i32t, "w")?)?;
    Ok(())
}

/// `symbol(bufs=[x, w, gathered, y], dims=[m, n, past], begin, end)`: see the module doc. `inner` is the
/// dense linear kernel `(w, x, y, m, n, lo, hi)` of the weight's format.
pub fn wrap_core_linear<'ctx>(
    ctx: &'ctx Context,
    module: &Module<'ctx>,
    inner: FunctionValue<'ctx>,
    symbol: &str,
) -> R<FunctionValue<'ctx>> {
    let e = Emitter::kernel(ctx, module, symbol)?;
    let (x, w, gathered, y) = (e.buf(0)?, e.buf(1)?, e.buf(2)?, e.buf(3)?);
    let (m, n, past) = (e.dim(0)?, e.dim(1)?, e.dim(2)?);
    let call = |w: PointerValue<'ctx>, lo: IntValue<'ctx>, hi: IntValue<'ctx>| -> R<()> {
        e.b.build_call(inner, &[w.into(), x.into(), y.into(), m.into(), n.into(), lo.into(), hi.into()], "")?;
        Ok(())
    };
    let first = e.icmp(IntPredicate::EQ, past, e.i64c(0))?;
    e.if_else(
        first,
        || call(w, e.begin, e.end),
        || {
            let count = word(&e, gathered, 1)?;
            let nn = e.imax(n, e.i64c(1))?;
            let lo = e.div(e.mul(e.begin, count)?, nn)?;
            let hi = e.div(e.mul(e.end, count)?, nn)?;
            // rows_word(n) = ceil((2 + n) / 16) · 16 words.
            let rows_word = e.mul(e.div(e.add(n, e.i64c(17))?, e.i64c(16))?, e.i64c(16))?;
            let rows = e.gep(e.ctx.i32_type().into(), gathered, rows_word)?;
            e.if_then(e.icmp(IntPredicate::SLT, lo, hi)?, || call(rows, lo, hi))
        },
    )?;
    e.finish()
}

/// `|x|`'s order key (bit pattern, sign cleared) of `x = buf[idx]`, as i64.
fn key<'ctx>(e: &Emitter<'_, 'ctx>, buf: PointerValue<'ctx>, idx: IntValue<'ctx>) -> R<IntValue<'ctx>> {
    let i32t = e.ctx.i32_type();
    let v: FloatValue<'ctx> = e.load_f32(buf, idx)?;
    let bits = e.b.build_bit_cast(v, i32t, "bits")?.into_int_value();
    let abs = e.b.build_and(bits, i32t.const_int(0x7fff_ffff, false), "abs")?;
    Ok(e.b.build_int_z_extend(abs, e.i64t(), "key")?)
}

pub fn emit(e: &Emitter<'_, '_>, k: &OpKernel) -> R<()> {
    let i32t = e.ctx.i32_type();
    match *k {
        OpKernel::CoreKeep { c } => {
            let (core, out) = (e.buf(0)?, e.buf(1)?);
            let (past, seq) = (e.dim(0)?, e.dim(1)?);
            let cc = e.i64c(c as i64);
            let first = e.icmp(IntPredicate::EQ, past, e.i64c(0))?;
            e.for_range(e.begin, e.end, |r| {
                let base = e.mul(r, cc)?;
                let src = e.mul(e.div(r, e.imax(seq, e.i64c(1))?)?, cc)?;
                e.for_range(e.i64c(0), cc, |j| {
                    let v = e.load_f32(core, e.add(src, j)?)?;
                    e.store_f32(out, e.add(base, j)?, e.select_f32(first, e.f32c(1.0), v)?)
                })
            })?;
        }
        OpKernel::CoreThresholds { c, k } => {
            let (act, scratch) = (e.buf(0)?, e.buf(1)?);
            let past = e.dim(0)?;
            let cc = e.i64c(c as i64);
            let (lo, hi, count) = (e.var_i64(0)?, e.var_i64(0)?, e.var_i64(0)?);
            let first = e.icmp(IntPredicate::EQ, past, e.i64c(0))?;
            e.if_then(first, || {
                e.for_range(e.begin, e.end, |r| {
                    let base = e.mul(r, cc)?;
                    e.set_i64(lo, e.i64c(0))?;
                    e.set_i64(hi, e.i64c(0x8000_0000))?;
                    e.for_range(e.i64c(0), e.i64c(31), |_| {
                        let (l, h) = (e.get_i64(lo)?, e.get_i64(hi)?);
                        let mid = e.div(e.add(l, h)?, e.i64c(2))?;
                        e.set_i64(count, e.i64c(0))?;
                        e.for_range(e.i64c(0), cc, |j| {
                            let ge = e.icmp(IntPredicate::SGE, key(e, act, e.add(base, j)?)?, mid)?;
                            let inc = e.b.build_int_z_extend(ge, e.i64t(), "inc")?;
                            e.set_i64(count, e.add(e.get_i64(count)?, inc)?)
                        })?;
                        let enough = e.icmp(IntPredicate::SGE, e.get_i64(count)?, e.i64c(k as i64))?;
                        e.set_i64(lo, e.select_i64(enough, mid, l)?)?;
                        e.set_i64(hi, e.select_i64(enough, h, mid)?)
                    })?;
                    let t = e.b.build_int_truncate(e.get_i64(lo)?, i32t, "t")?;
                    let p = e.gep(i32t.into(), scratch, r)?;
                    e.b.build_store(p, t)?;
                    Ok(())
                })
            })?;
        }
        OpKernel::CoreSelect { c, beta } => {
            let (act, scratch, core) = (e.buf(0)?, e.buf(1)?, e.buf(2)?);
            let (past, seq) = (e.dim(0)?, e.dim(1)?);
            let cc = e.i64c(c as i64);
            let f64t = e.ctx.f64_type();
            let count = e.var_i64(0)?;
            let first = e.icmp(IntPredicate::EQ, past, e.i64c(0))?;
            e.if_then(first, || {
                let seqf = e.b.build_signed_int_to_float(seq, f64t, "seqf")?;
                let need = e.b.build_float_mul(f64t.const_float(beta as f64), seqf, "bs")?;
                let need = e.b.build_float_sub(need, f64t.const_float(1e-6), "need")?;
                e.for_range(e.begin, e.end, |i| {
                    let (b, ch) = (e.div(i, cc)?, e.rem(i, cc)?);
                    e.set_i64(count, e.i64c(0))?;
                    e.for_range(e.i64c(0), seq, |t| {
                        let row = e.add(e.mul(b, seq)?, t)?;
                        let tp = e.gep(i32t.into(), scratch, row)?;
                        let th = e.b.build_load(i32t, tp, "th")?.into_int_value();
                        let th = e.b.build_int_z_extend(th, e.i64t(), "th64")?;
                        let ge = e.icmp(IntPredicate::SGE, key(e, act, e.add(e.mul(row, cc)?, ch)?)?, th)?;
                        let inc = e.b.build_int_z_extend(ge, e.i64t(), "inc")?;
                        e.set_i64(count, e.add(e.get_i64(count)?, inc)?)
                    })?;
                    let n = e.b.build_signed_int_to_float(e.get_i64(count)?, f64t, "n")?;
                    let is_core = e.b.build_float_compare(FloatPredicate::OGE, n, need, "core")?;
                    e.store_f32(core, i, e.select_f32(is_core, e.f32c(1.0), e.f32c(0.0))?)
                })
            })?;
        }
        OpKernel::CoreGather { n, row_bytes } => {
            let (core, w, gathered) = (e.buf(0)?, e.buf(1)?, e.buf(2)?);
            let past = e.dim(0)?;
            let first = e.icmp(IntPredicate::EQ, past, e.i64c(0))?;
            let rows = e.gep(i32t.into(), gathered, e.i64c(GatherLayout::rows_word(n) as i64))?;
            let rb = e.i64c(row_bytes as i64);
            let count = e.var_i64(0)?;
            e.if_else(
                first,
                || set_word(e, gathered, e.i64c(0), e.i64c(0)),
                || {
                    let stale = e.icmp(IntPredicate::EQ, word(e, gathered, 0)?, e.i64c(0))?;
                    e.if_then(stale, || {
                        e.set_i64(count, e.i64c(0))?;
                        e.for_range(e.i64c(0), e.i64c(n as i64), |c| {
                            let v = e.load_f32(core, c)?;
                            let keep = e.b.build_float_compare(FloatPredicate::UNE, v, e.f32c(0.0), "core")?;
                            e.if_then(keep, || {
                                let j = e.get_i64(count)?;
                                set_word(e, gathered, e.add(j, e.i64c(2))?, c)?;
                                let dst = e.gep(e.ctx.i8_type().into(), rows, e.mul(j, rb)?)?;
                                let src = e.gep(e.ctx.i8_type().into(), w, e.mul(c, rb)?)?;
                                e.b.build_memcpy(dst, 1, src, 1, rb)?;
                                e.set_i64(count, e.add(j, e.i64c(1))?)
                            })
                        })?;
                        set_word(e, gathered, e.i64c(1), e.get_i64(count)?)?;
                        set_word(e, gathered, e.i64c(0), e.i64c(1))
                    })
                },
            )?;
        }
        OpKernel::CoreExpand { n } => {
            let (gathered, y) = (e.buf(0)?, e.buf(1)?);
            let past = e.dim(0)?;
            let nc = e.i64c(n as i64);
            let later = e.icmp(IntPredicate::NE, past, e.i64c(0))?;
            let top = e.var_i64(0)?;
            e.if_then(later, || {
                let count = word(e, gathered, 1)?;
                e.for_range(e.begin, e.end, |r| {
                    let base = e.mul(r, nc)?;
                    // Positions top.. are final; results 0..j are still packed below them.
                    e.set_i64(top, nc)?;
                    e.for_range(e.i64c(0), count, |jj| {
                        let j = e.isub(e.isub(count, jj)?, e.i64c(1))?;
                        let c = e.load_i32_as_i64(gathered, e.add(j, e.i64c(2))?)?;
                        e.for_range(e.add(c, e.i64c(1))?, e.get_i64(top)?, |q| {
                            e.store_f32(y, e.add(base, q)?, e.f32c(0.0))
                        })?;
                        let v = e.load_f32(y, e.add(base, j)?)?;
                        e.store_f32(y, e.add(base, c)?, v)?;
                        e.set_i64(top, c)
                    })?;
                    e.for_range(e.i64c(0), e.get_i64(top)?, |q| e.store_f32(y, e.add(base, q)?, e.f32c(0.0)))
                })
            })?;
        }
        _ => unreachable!("only CoreInfer kernels"),
    }
    Ok(())
}
