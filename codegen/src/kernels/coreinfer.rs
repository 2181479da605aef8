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

use super::emit::{Emitter, R};
use super::ops::OpKernel;
use inkwell::values::{FloatValue, IntValue, PointerValue};
use inkwell::{FloatPredicate, IntPredicate};

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
        _ => unreachable!("only CoreInfer kernels"),
    }
    Ok(())
}
