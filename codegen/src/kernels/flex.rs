//! FlexPrefill kernels (`flex_attention`, the math in `kiln_ir::flex`, here in f32):
//!
//! - `FlexPattern` (one item per query head): mean key of every key block; the last `min(block, seq)`
//!   queries' true attention summed into key-block columns (`vert`) and diagonal bands (`slash`); the
//!   Jensen–Shannon distance between the pooled estimate and `vert`; the head's pattern choice and the
//!   γ selection of `vert`/`slash`, written to a per-head region of the scratch buffer:
//!   `[query_aware, vert[nkb], slash[nkb], pooled_k[nkb][head_dim]]`.
//! - `FlexAttention` (one item per (head, query), head-major): the query block's kept key blocks
//!   (recomputed only when an item starts a new (head, query block)), then the online softmax of the
//!   dense kernel ([`Attend`]) over the keys of those blocks. With `seq < min_len` it runs the dense
//!   kernel's code over all visible keys, so the result is bit-identical to `attention`.
//!
//! The scratch buffer holds `q_heads · (1 + nkb · (head_dim + 2))` floats, `nkb = ⌈(past+seq)/block⌉`
//! (lowering sizes it `(past+seq+1) · q_heads · (head_dim+2)`).

use super::attend::Attend;
use super::emit::{Emitter, R};
use super::ops::OpKernel;
use inkwell::values::{FloatValue, IntValue, PointerValue};
use inkwell::{FloatPredicate, IntPredicate};
use kiln_ir::flex::BISECT_STEPS;

/// `a[abase..+n] · b[bbase..+n]` (scalar, fixed order).
fn dot<'ctx>(
    e: &Emitter<'_, 'ctx>,
    a: PointerValue<'ctx>,
    abase: IntValue<'ctx>,
    b: PointerValue<'ctx>,
    bbase: IntValue<'ctx>,
    n: usize,
) -> R<FloatValue<'ctx>> {
    let s = e.var_f32(0.0)?;
    e.for_range(e.i64c(0), e.i64c(n as i64), |c| {
        let x = e.load_f32(a, e.add(abase, c)?)?;
        let y = e.load_f32(b, e.add(bbase, c)?)?;
        e.set(s, e.fma(x, y, e.get(s)?)?)
    })?;
    e.get(s)
}

/// Replaces `buf[off..off+n]` (non-negative weights) with 1.0 where the γ rule keeps the element and
/// 0.0 elsewhere (`kiln_ir::flex::select_to_mass`).
fn select_to_mass<'ctx>(
    e: &Emitter<'_, 'ctx>,
    buf: PointerValue<'ctx>,
    off: IntValue<'ctx>,
    n: IntValue<'ctx>,
    gamma: f32,
) -> R<()> {
    if gamma >= 1.0 {
        return e.for_range(e.i64c(0), n, |x| e.store_f32(buf, e.add(off, x)?, e.f32c(1.0)));
    }
    let (total, max) = (e.var_f32(0.0)?, e.var_f32(0.0)?);
    e.for_range(e.i64c(0), n, |x| {
        let v = e.load_f32(buf, e.add(off, x)?)?;
        e.set(total, e.fadd(e.get(total)?, v)?)?;
        e.set(max, e.fmax(e.get(max)?, v)?)
    })?;
    let target = e.fmul(e.get(total)?, e.f32c(gamma))?;
    let (lo, hi) = (e.var_f32(0.0)?, e.var_f32(0.0)?);
    e.set(hi, e.fmul(e.get(max)?, e.f32c(2.0))?)?;
    let mass = e.var_f32(0.0)?;
    e.for_range(e.i64c(0), e.i64c(BISECT_STEPS as i64), |_| {
        let mid = e.fmul(e.fadd(e.get(lo)?, e.get(hi)?)?, e.f32c(0.5))?;
        e.set(mass, e.f32c(0.0))?;
        e.for_range(e.i64c(0), n, |x| {
            let v = e.load_f32(buf, e.add(off, x)?)?;
            let ge = e.fcmp(FloatPredicate::OGE, v, mid)?;
            e.set(mass, e.fadd(e.get(mass)?, e.select_f32(ge, v, e.f32c(0.0))?)?)
        })?;
        let ok = e.fcmp(FloatPredicate::OGE, e.get(mass)?, target)?;
        e.set(lo, e.select_f32(ok, mid, e.get(lo)?)?)?;
        e.set(hi, e.select_f32(ok, e.get(hi)?, mid)?)
    })?;
    let t = e.get(lo)?;
    e.for_range(e.i64c(0), n, |x| {
        let i = e.add(off, x)?;
        let ge = e.fcmp(FloatPredicate::OGE, e.load_f32(buf, i)?, t)?;
        e.store_f32(buf, i, e.select_f32(ge, e.f32c(1.0), e.f32c(0.0))?)
    })
}

/// Running max `m` and normalizer `l` of a softmax: adds `s`.
fn online<'ctx>(e: &Emitter<'_, 'ctx>, m: PointerValue<'ctx>, l: PointerValue<'ctx>, s: FloatValue<'ctx>) -> R<()> {
    let m_old = e.get(m)?;
    let m_new = e.fmax(m_old, s)?;
    let corr = e.exp(e.fsub(m_old, m_new)?)?;
    e.set(l, e.fma(e.get(l)?, corr, e.exp(e.fsub(s, m_new)?)?)?)?;
    e.set(m, m_new)
}

struct Geometry<'ctx> {
    seq: IntValue<'ctx>,
    past: IntValue<'ctx>,
    t: IntValue<'ctx>,
    nkb: IntValue<'ctx>,
    /// Floats per head in the scratch buffer.
    region: IntValue<'ctx>,
    block: IntValue<'ctx>,
}

fn geometry<'ctx>(e: &Emitter<'_, 'ctx>, block: usize, head_dim: usize) -> R<Geometry<'ctx>> {
    let (seq, past) = (e.dim(0)?, e.dim(1)?);
    let t = e.add(past, seq)?;
    let bc = e.i64c(block as i64);
    let nkb = e.div(e.add(t, e.i64c(block as i64 - 1))?, bc)?;
    let region = e.add(e.i64c(1), e.mul(nkb, e.i64c(head_dim as i64 + 2))?)?;
    Ok(Geometry { seq, past, t, nkb, region, block: bc })
}

pub(crate) fn emit(e: &Emitter, spec: &OpKernel) -> R<()> {
    match *spec {
        OpKernel::FlexPattern { q_heads, kv_heads, head_dim, scale, block, gamma, tau, min_len } => {
            pattern(e, q_heads, kv_heads, head_dim, scale, block, gamma, tau, min_len)
        }
        OpKernel::FlexAttention { q_heads, kv_heads, head_dim, scale, block, gamma, min_len } => {
            attention(e, q_heads, kv_heads, head_dim, scale, block, gamma, min_len)
        }
        _ => unreachable!("not a FlexPrefill kernel"),
    }
}

#[allow(clippy::too_many_arguments)]
fn pattern<'ctx>(
    e: &Emitter<'_, 'ctx>,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f32,
    block: usize,
    gamma: f32,
    tau: f32,
    min_len: usize,
) -> R<()> {
    let (q, kc, sc) = (e.buf(0)?, e.buf(1)?, e.buf(2)?);
    let g = geometry(e, block, head_dim)?;
    let hd = e.i64c(head_dim as i64);
    let pq = e.array_f32(head_dim as u32)?;
    let a = Attend::new(e, q, kc, kc, kv_heads, head_dim, scale)?;
    let (m, l, js) = (e.var_f32(0.0)?, e.var_f32(0.0)?, e.var_f32(0.0)?);
    let short = e.icmp(IntPredicate::SLT, g.seq, e.i64c(min_len as i64))?;
    let end = e.select_i64(short, e.begin, e.end)?;
    e.for_range(e.begin, end, |h| {
        let kh = e.div(h, e.i64c((q_heads / kv_heads) as i64))?;
        let base = e.mul(h, g.region)?;
        let vs = e.add(base, e.i64c(1))?;
        let ss = e.add(vs, g.nkb)?;
        let pk = e.add(ss, g.nkb)?;
        // Mean key of each block; zeroed vert/slash accumulators.
        e.for_range(e.i64c(0), g.nkb, |kb| {
            let ks = e.mul(kb, g.block)?;
            let ke = e.imin(e.add(ks, g.block)?, g.t)?;
            let off = e.add(pk, e.mul(kb, hd)?)?;
            e.for_range(e.i64c(0), hd, |c| e.store_f32(sc, e.add(off, c)?, e.f32c(0.0)))?;
            e.for_range(ks, ke, |j| {
                let kb_ = a.kbase(e, j, kh)?;
                e.for_range(e.i64c(0), hd, |c| {
                    let o = e.add(off, c)?;
                    e.store_f32(sc, o, e.fadd(e.load_f32(sc, o)?, e.load_f32(kc, e.add(kb_, c)?)?)?)
                })
            })?;
            let inv = e.fdiv(e.f32c(1.0), e.si_to_f32(e.isub(ke, ks)?)?)?;
            e.for_range(e.i64c(0), hd, |c| {
                let o = e.add(off, c)?;
                e.store_f32(sc, o, e.fmul(e.load_f32(sc, o)?, inv)?)
            })?;
            e.store_f32(sc, e.add(vs, kb)?, e.f32c(0.0))?;
            e.store_f32(sc, e.add(ss, kb)?, e.f32c(0.0))
        })?;
        // The last query block's true attention, summed into columns and bands.
        let rows = e.imin(g.block, g.seq)?;
        let r0 = e.isub(g.seq, rows)?;
        e.for_range(e.i64c(0), hd, |c| e.store_f32(pq, c, e.f32c(0.0)))?;
        e.for_range(r0, g.seq, |i| {
            let qbase = e.mul(e.add(e.mul(i, e.i64c(q_heads as i64))?, h)?, hd)?;
            e.for_range(e.i64c(0), hd, |c| {
                e.store_f32(pq, c, e.fadd(e.load_f32(pq, c)?, e.load_f32(q, e.add(qbase, c)?)?)?)
            })?;
            let pos = e.add(g.past, i)?;
            let vis = e.add(pos, e.i64c(1))?;
            e.set(m, e.f32c(f32::NEG_INFINITY))?;
            e.set(l, e.f32c(0.0))?;
            e.for_range(e.i64c(0), vis, |j| online(e, m, l, a.score(e, qbase, a.kbase(e, j, kh)?)?))?;
            let inv_l = e.fdiv(e.f32c(1.0), e.get(l)?)?;
            e.for_range(e.i64c(0), vis, |j| {
                let s = a.score(e, qbase, a.kbase(e, j, kh)?)?;
                let p = e.fmul(e.exp(e.fsub(s, e.get(m)?)?)?, inv_l)?;
                let vi = e.add(vs, e.div(j, g.block)?)?;
                e.store_f32(sc, vi, e.fadd(e.load_f32(sc, vi)?, p)?)?;
                let si = e.add(ss, e.div(e.isub(pos, j)?, g.block)?)?;
                e.store_f32(sc, si, e.fadd(e.load_f32(sc, si)?, p)?)
            })
        })?;
        let inv_rows = e.fdiv(e.f32c(1.0), e.si_to_f32(rows)?)?;
        e.for_range(e.i64c(0), hd, |c| e.store_f32(pq, c, e.fmul(e.load_f32(pq, c)?, inv_rows)?))?;
        // The pooled estimate against the observed column mass: Jensen–Shannon distance.
        let pooled = |kb: IntValue<'ctx>| -> R<FloatValue<'ctx>> {
            e.fmul(dot(e, pq, e.i64c(0), sc, e.add(pk, e.mul(kb, hd)?)?, head_dim)?, e.f32c(scale))
        };
        e.set(m, e.f32c(f32::NEG_INFINITY))?;
        e.set(l, e.f32c(0.0))?;
        e.for_range(e.i64c(0), g.nkb, |kb| online(e, m, l, pooled(kb)?))?;
        e.set(js, e.f32c(0.0))?;
        e.for_range(e.i64c(0), g.nkb, |kb| {
            let pe = e.fdiv(e.exp(e.fsub(pooled(kb)?, e.get(m)?)?)?, e.get(l)?)?;
            let po = e.fmul(e.load_f32(sc, e.add(vs, kb)?)?, inv_rows)?;
            let mm = e.fmul(e.fadd(pe, po)?, e.f32c(0.5))?;
            let term = |x: FloatValue<'ctx>| -> R<FloatValue<'ctx>> {
                let pos = e.fcmp(FloatPredicate::OGT, x, e.f32c(0.0))?;
                let t = e.fmul(x, e.log(e.fdiv(x, mm)?)?)?;
                e.select_f32(pos, t, e.f32c(0.0))
            };
            let add = e.fmul(e.fadd(term(pe)?, term(po)?)?, e.f32c(0.5))?;
            e.set(js, e.fadd(e.get(js)?, add)?)
        })?;
        let d = e.sqrt(e.fmax(e.get(js)?, e.f32c(0.0))?)?;
        let qa = e.fcmp(FloatPredicate::OLT, d, e.f32c(tau))?;
        e.store_f32(sc, base, e.select_f32(qa, e.f32c(1.0), e.f32c(0.0))?)?;
        select_to_mass(e, sc, vs, g.nkb, gamma)?;
        select_to_mass(e, sc, ss, g.nkb, gamma)
    })
}

#[allow(clippy::too_many_arguments)]
fn attention<'ctx>(
    e: &Emitter<'_, 'ctx>,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f32,
    block: usize,
    gamma: f32,
    min_len: usize,
) -> R<()> {
    let (q, kc, vc, sc, out) = (e.buf(0)?, e.buf(1)?, e.buf(2)?, e.buf(3)?, e.buf(4)?);
    let g = geometry(e, block, head_dim)?;
    let hd = e.i64c(head_dim as i64);
    let keep = e.array_f32_dyn(g.nkb)?;
    let pq = e.array_f32(head_dim as u32)?;
    let cached = e.var_i64(-1)?;
    let (m, l, flag) = (e.var_f32(0.0)?, e.var_f32(0.0)?, e.var_f32(0.0)?);
    let a = Attend::new(e, q, kc, vc, kv_heads, head_dim, scale)?;
    let dense = e.icmp(IntPredicate::SLT, g.seq, e.i64c(min_len as i64))?;
    let one = e.f32c(1.0);
    // The kept key blocks 0..=qb of (head h, query block qb) into `keep`.
    let mask = |h: IntValue<'ctx>, qb: IntValue<'ctx>| -> R<()> {
        let n = e.add(qb, e.i64c(1))?;
        let base = e.mul(h, g.region)?;
        let vs = e.add(base, e.i64c(1))?;
        let ss = e.add(vs, g.nkb)?;
        let pk = e.add(ss, g.nkb)?;
        let qs = e.imax(e.mul(qb, g.block)?, g.past)?;
        let qe1 = e.imin(e.mul(n, g.block)?, g.t)?;
        if gamma >= 1.0 {
            e.for_range(e.i64c(0), n, |kb| e.store_f32(keep, kb, one))?;
        } else {
            let qa = e.fcmp(FloatPredicate::OGT, e.load_f32(sc, base)?, e.f32c(0.5))?;
            e.if_else(
                qa,
                || {
                    // Query-aware: this block's mean query against each key block's mean key.
                    e.for_range(e.i64c(0), hd, |c| e.store_f32(pq, c, e.f32c(0.0)))?;
                    e.for_range(e.isub(qs, g.past)?, e.isub(qe1, g.past)?, |i| {
                        let qbase = e.mul(e.add(e.mul(i, e.i64c(q_heads as i64))?, h)?, hd)?;
                        e.for_range(e.i64c(0), hd, |c| {
                            e.store_f32(pq, c, e.fadd(e.load_f32(pq, c)?, e.load_f32(q, e.add(qbase, c)?)?)?)
                        })
                    })?;
                    let inv = e.fdiv(one, e.si_to_f32(e.isub(qe1, qs)?)?)?;
                    e.for_range(e.i64c(0), hd, |c| e.store_f32(pq, c, e.fmul(e.load_f32(pq, c)?, inv)?))?;
                    e.set(m, e.f32c(f32::NEG_INFINITY))?;
                    e.set(l, e.f32c(0.0))?;
                    e.for_range(e.i64c(0), n, |kb| {
                        let s = dot(e, pq, e.i64c(0), sc, e.add(pk, e.mul(kb, hd)?)?, head_dim)?;
                        let s = e.fmul(s, e.f32c(scale))?;
                        e.store_f32(keep, kb, s)?;
                        online(e, m, l, s)
                    })?;
                    e.for_range(e.i64c(0), n, |kb| {
                        let p = e.fdiv(e.exp(e.fsub(e.load_f32(keep, kb)?, e.get(m)?)?)?, e.get(l)?)?;
                        e.store_f32(keep, kb, p)
                    })?;
                    select_to_mass(e, keep, e.i64c(0), n, gamma)
                },
                || {
                    // Vertical-slash: the head's kept columns, and the bands crossing this block.
                    let qe = e.isub(qe1, e.i64c(1))?;
                    e.for_range(e.i64c(0), n, |kb| {
                        let ks = e.mul(kb, g.block)?;
                        let ke = e.isub(e.imin(e.add(ks, g.block)?, g.t)?, e.i64c(1))?;
                        let lo = e.div(e.imax(e.isub(qs, ke)?, e.i64c(0))?, g.block)?;
                        let hi = e.div(e.isub(qe, ks)?, g.block)?;
                        e.set(flag, e.load_f32(sc, e.add(vs, kb)?)?)?;
                        e.for_range(lo, e.add(hi, e.i64c(1))?, |ob| {
                            e.set(flag, e.fmax(e.get(flag)?, e.load_f32(sc, e.add(ss, ob)?)?)?)
                        })?;
                        e.store_f32(keep, kb, e.get(flag)?)
                    })
                },
            )?;
        }
        e.store_f32(keep, e.i64c(0), one)?;
        e.store_f32(keep, qb, one)
    };
    e.for_range(e.begin, e.end, |it| {
        let h = e.div(it, g.seq)?;
        let i = e.rem(it, g.seq)?;
        let kh = e.div(h, e.i64c((q_heads / kv_heads) as i64))?;
        let qbase = e.mul(e.add(e.mul(i, e.i64c(q_heads as i64))?, h)?, hd)?;
        let pos = e.add(g.past, i)?;
        let visible = e.add(pos, e.i64c(1))?;
        a.start(e)?;
        e.if_else(
            dense,
            || a.keys(e, qbase, kh, e.i64c(0), visible),
            || {
                let qb = e.div(pos, g.block)?;
                let key = e.add(e.mul(h, g.nkb)?, qb)?;
                let stale = e.icmp(IntPredicate::NE, key, e.get_i64(cached)?)?;
                e.if_then(stale, || {
                    mask(h, qb)?;
                    e.set_i64(cached, key)
                })?;
                e.for_range(e.i64c(0), e.add(qb, e.i64c(1))?, |kb| {
                    let kept = e.fcmp(FloatPredicate::OGT, e.load_f32(keep, kb)?, e.f32c(0.5))?;
                    e.if_then(kept, || {
                        let ks = e.mul(kb, g.block)?;
                        let ke = e.imin(e.add(ks, g.block)?, visible)?;
                        a.keys(e, qbase, kh, ks, ke)
                    })
                })
            },
        )?;
        a.finish(e, out, qbase)
    })
}

#[cfg(test)]
mod tests {
    use crate::kernels::ops::OpKernel;
    use crate::llvm;
    use inkwell::context::Context;
    use inkwell::OptimizationLevel;
    use kiln_ir::interp::{eval, Tensor};
    use kiln_ir::Op;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    type KernelFn = unsafe extern "C" fn(*const *mut u8, *const i64, i64, i64);

    struct Shape {
        hq: usize,
        hkv: usize,
        hd: usize,
        seq: usize,
        past: usize,
    }

    struct Params {
        block: usize,
        gamma: f32,
        tau: f32,
        min_len: usize,
    }

    /// Runs the dense kernel and the two FlexPrefill kernels (each item range cut at an odd point, as
    /// threads would) on one input; returns (dense, flex, scratch).
    fn run(sh: &Shape, p: &Params, scale: f32, q: &[f32], k: &[f32], v: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let dense = OpKernel::Attention { q_heads: sh.hq, kv_heads: sh.hkv, head_dim: sh.hd, scale, window: 0 };
        let pat = OpKernel::FlexPattern {
            q_heads: sh.hq,
            kv_heads: sh.hkv,
            head_dim: sh.hd,
            scale,
            block: p.block,
            gamma: p.gamma,
            tau: p.tau,
            min_len: p.min_len,
        };
        let att = OpKernel::FlexAttention {
            q_heads: sh.hq,
            kv_heads: sh.hkv,
            head_dim: sh.hd,
            scale,
            block: p.block,
            gamma: p.gamma,
            min_len: p.min_len,
        };
        let ctx = Context::create();
        let module = llvm::create_module(&ctx, "flex_test");
        for s in [&dense, &pat, &att] {
            s.emit(&ctx, &module).unwrap();
        }
        let tm = llvm::host_target_machine().unwrap();
        llvm::optimize(&module, &tm).unwrap();
        let ee = module.create_jit_execution_engine(OptimizationLevel::Aggressive).unwrap();
        let get = |s: &OpKernel| {
            let addr = ee.get_function_address(&s.symbol()).unwrap();
            // SAFETY: generated with the uniform kernel ABI.
            unsafe { std::mem::transmute::<usize, KernelFn>(addr) }
        };
        let (t, items) = (sh.past + sh.seq, sh.seq * sh.hq);
        let dims = [sh.seq as i64, sh.past as i64];
        let split = |n: usize| [(0, n / 3 + 1), (n / 3 + 1, n)].map(|(a, b)| (a.min(n) as i64, b.min(n) as i64));
        let (mut q, mut k, mut v) = (q.to_vec(), k.to_vec(), v.to_vec());
        let mut out_dense = vec![f32::NAN; items * sh.hd];
        let mut out = vec![f32::NAN; items * sh.hd];
        let mut scratch = vec![f32::NAN; (t + 1) * sh.hq * (sh.hd + 2)];
        for (a, b) in split(items) {
            let bufs = [
                q.as_mut_ptr() as *mut u8,
                k.as_mut_ptr() as *mut u8,
                v.as_mut_ptr() as *mut u8,
                out_dense.as_mut_ptr() as *mut u8,
            ];
            // SAFETY: buffers sized as the kernel reads them for these dims.
            unsafe { get(&dense)(bufs.as_ptr(), dims.as_ptr(), a, b) };
        }
        for (a, b) in split(sh.hq) {
            let bufs = [q.as_mut_ptr() as *mut u8, k.as_mut_ptr() as *mut u8, scratch.as_mut_ptr() as *mut u8];
            unsafe { get(&pat)(bufs.as_ptr(), dims.as_ptr(), a, b) };
        }
        for (a, b) in split(items) {
            let bufs = [
                q.as_mut_ptr() as *mut u8,
                k.as_mut_ptr() as *mut u8,
                v.as_mut_ptr() as *mut u8,
                scratch.as_mut_ptr() as *mut u8,
                out.as_mut_ptr() as *mut u8,
            ];
            unsafe { get(&att)(bufs.as_ptr(), dims.as_ptr(), a, b) };
        }
        (out_dense, out, scratch)
    }

    fn interp(sh: &Shape, p: &Params, scale: f32, q: &[f32], k: &[f32], v: &[f32], flex: bool) -> Vec<f32> {
        let t = sh.past + sh.seq;
        let op = if flex {
            Op::FlexAttention { scale, block: p.block as i64, gamma: p.gamma, tau: p.tau, min_len: p.min_len as i64 }
        } else {
            Op::Attention { scale }
        };
        let qt = Tensor::f32(vec![1, sh.seq, sh.hq, sh.hd], q.to_vec());
        let kt = Tensor::f32(vec![1, t, sh.hkv, sh.hd], k.to_vec());
        let vt = Tensor::f32(vec![1, t, sh.hkv, sh.hd], v.to_vec());
        eval(&op, &[&qt, &kt, &vt], &Default::default()).unwrap().as_f32().unwrap().to_vec()
    }

    /// Random q/k/v; keys get a few strong "sink" directions so attention is peaked, as in a model.
    fn inputs(rng: &mut StdRng, sh: &Shape) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let t = sh.past + sh.seq;
        let mut r = |n: usize, amp: f32| -> Vec<f32> { (0..n).map(|_| rng.random_range(-amp..amp)).collect() };
        let q = r(sh.seq * sh.hq * sh.hd, 1.5);
        let mut k = r(t * sh.hkv * sh.hd, 1.5);
        let v = r(t * sh.hkv * sh.hd, 1.0);
        for j in (0..t).step_by(7) {
            for x in &mut k[j * sh.hkv * sh.hd..][..sh.hkv * sh.hd] {
                *x *= 2.5;
            }
        }
        (q, k, v)
    }

    fn close(want: &[f32], got: &[f32], tol: f32, what: &str) {
        assert_eq!(want.len(), got.len());
        for (i, (a, b)) in want.iter().zip(got).enumerate() {
            assert!((a - b).abs() <= tol * a.abs().max(1.0), "{what}: [{i}] kernel {b} vs reference {a}");
        }
    }

    const SHAPES: [(usize, usize, usize, usize, usize); 6] = [
        // hq, hkv, hd, seq, past
        (3, 1, 8, 37, 0),
        (2, 2, 5, 29, 6),
        (6, 2, 16, 50, 13),
        (3, 3, 7, 64, 0),
        (9, 3, 8, 45, 20),
        (4, 4, 3, 1, 30),
    ];

    /// Both patterns (τ = 0 forces vertical-slash, τ = 1 > √ln2 forces query-aware, τ = 0.1 lets the
    /// test choose) at several γ and block sizes, on odd shapes: kernels equal the interpreter.
    #[test]
    fn flex_kernels_match_interpreter_on_odd_shapes() {
        let mut rng = StdRng::seed_from_u64(61);
        for &(hq, hkv, hd, seq, past) in &SHAPES {
            let sh = Shape { hq, hkv, hd, seq, past };
            for (block, gamma, tau) in [(8, 0.9, 0.0), (8, 0.9, 1.0), (5, 0.6, 0.1), (16, 0.95, 0.3), (3, 0.3, 0.0)] {
                let p = Params { block, gamma, tau, min_len: 0 };
                let (q, k, v) = inputs(&mut rng, &sh);
                let scale = 1.0 / (hd as f32).sqrt();
                let (_, got, _) = run(&sh, &p, scale, &q, &k, &v);
                let want = interp(&sh, &p, scale, &q, &k, &v, true);
                close(
                    &want,
                    &got,
                    2e-4,
                    &format!("hq {hq} hkv {hkv} hd {hd} seq {seq} past {past} block {block} γ {gamma} τ {tau}"),
                );
            }
        }
    }

    /// The kernel really drops blocks (the test above would pass for a dense kernel otherwise): at a
    /// low γ the result differs from dense attention, and the interpreter's sparse result agrees.
    #[test]
    fn low_gamma_drops_blocks() {
        let mut rng = StdRng::seed_from_u64(62);
        let sh = Shape { hq: 3, hkv: 1, hd: 8, seq: 96, past: 0 };
        let p = Params { block: 8, gamma: 0.3, tau: 0.0, min_len: 0 };
        let (q, k, v) = inputs(&mut rng, &sh);
        let (dense, got, _) = run(&sh, &p, 0.35, &q, &k, &v);
        let diff = dense.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff > 1e-3, "γ = 0.3 changed nothing (max diff {diff})");
        close(&interp(&sh, &p, 0.35, &q, &k, &v, true), &got, 2e-4, "γ 0.3");
    }

    /// γ = 1 keeps every block: the sparse kernel equals the dense kernel and the dense interpreter.
    #[test]
    fn gamma_one_equals_dense() {
        let mut rng = StdRng::seed_from_u64(63);
        for &(hq, hkv, hd, seq, past) in &SHAPES {
            let sh = Shape { hq, hkv, hd, seq, past };
            for tau in [0.0, 1.0] {
                let p = Params { block: 4, gamma: 1.0, tau, min_len: 0 };
                let (q, k, v) = inputs(&mut rng, &sh);
                let (dense, got, _) = run(&sh, &p, 0.3, &q, &k, &v);
                close(&dense, &got, 1e-5, "γ = 1 vs dense kernel");
                close(&interp(&sh, &p, 0.3, &q, &k, &v, false), &got, 2e-4, "γ = 1 vs dense interpreter");
                close(
                    &interp(&sh, &p, 0.3, &q, &k, &v, false),
                    &interp(&sh, &p, 0.3, &q, &k, &v, true),
                    1e-6,
                    "interp",
                );
            }
        }
    }

    /// Below `min_len` query rows the sparse kernel is the dense kernel, bit for bit.
    #[test]
    fn below_min_len_is_bit_identical_to_dense() {
        let mut rng = StdRng::seed_from_u64(64);
        for &(hq, hkv, hd, seq, past) in &SHAPES {
            let sh = Shape { hq, hkv, hd, seq, past };
            let p = Params { block: 4, gamma: 0.2, tau: 0.1, min_len: seq + 1 };
            let (q, k, v) = inputs(&mut rng, &sh);
            let (dense, got, _) = run(&sh, &p, 0.4, &q, &k, &v);
            for (i, (a, b)) in dense.iter().zip(&got).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "seq {seq} < min_len: [{i}] {b} vs dense {a}");
            }
            let (flex_ref, dense_ref) =
                (interp(&sh, &p, 0.4, &q, &k, &v, true), interp(&sh, &p, 0.4, &q, &k, &v, false));
            assert_eq!(flex_ref, dense_ref, "interpreter below min_len");
            close(&dense_ref, &got, 2e-4, "below min_len vs interpreter");
        }
    }

    /// The pattern kernel chooses each head's pattern as the reference does, and its vertical/slash
    /// selections agree.
    #[test]
    fn pattern_kernel_matches_reference_choice() {
        let mut rng = StdRng::seed_from_u64(65);
        let mut seen = [false; 2];
        for &(hq, hkv, hd, seq, past) in &SHAPES[..5] {
            let sh = Shape { hq, hkv, hd, seq, past };
            for tau in [0.05, 0.1, 0.2, 0.4] {
                let p = Params { block: 8, gamma: 0.8, tau, min_len: 0 };
                let (q, k, v) = inputs(&mut rng, &sh);
                let (_, _, scratch) = run(&sh, &p, 0.4, &q, &k, &v);
                let t = past + seq;
                let nkb = t.div_ceil(p.block);
                let region = 1 + nkb * (hd + 2);
                let fp = kiln_ir::flex::FlexParams { block: 8, gamma: 0.8, tau, min_len: 0 };
                for h in 0..hq {
                    let kh = h / (hq / hkv);
                    let qrow = |i: usize| &q[(i * hq + h) * hd..][..hd];
                    let krow = |j: usize| &k[(j * hkv + kh) * hd..][..hd];
                    let view = kiln_ir::flex::HeadView { q: &qrow, k: &krow, seq, t, d: hd };
                    let pat = kiln_ir::flex::head_pattern(&view, &fp, 0.4);
                    let r = &scratch[h * region..][..region];
                    if (pat.distance - tau as f64).abs() < 1e-4 {
                        continue; // too close to call in f32
                    }
                    assert_eq!(r[0] > 0.5, pat.query_aware, "head {h}: distance {} τ {tau}", pat.distance);
                    seen[pat.query_aware as usize] = true;
                    let flags = |x: &[f32]| x.iter().map(|&f| f > 0.5).collect::<Vec<_>>();
                    assert_eq!(flags(&r[1..1 + nkb]), pat.vert, "head {h} vert");
                    assert_eq!(flags(&r[1 + nkb..1 + 2 * nkb]), pat.slash, "head {h} slash");
                }
            }
        }
        assert!(seen[0] && seen[1], "both patterns were exercised: {seen:?}");
    }
}
