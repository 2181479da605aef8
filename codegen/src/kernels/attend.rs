//! The per-key step of causal attention, shared by the dense attention kernel (`ops`) and the
//! FlexPrefill block-sparse one (`flex`), so both do the same arithmetic on the keys they visit.

use super::emit::{Emitter, R};
use inkwell::values::{FloatValue, IntValue, PointerValue};

/// The per-key step of causal attention for one (query, head), shared by the dense and the
/// block-sparse kernels so that both do exactly the same arithmetic on the keys they visit: q·k (8
/// lanes at a time when the head dim allows), then the online-softmax update of the running max `m`,
/// normalizer `l` and output accumulator `acc`.
pub(crate) struct Attend<'ctx> {
    q: PointerValue<'ctx>,
    kc: PointerValue<'ctx>,
    vc: PointerValue<'ctx>,
    kv_heads: usize,
    head_dim: usize,
    scale: f32,
    acc: PointerValue<'ctx>,
    m: PointerValue<'ctx>,
    l: PointerValue<'ctx>,
}

impl<'ctx> Attend<'ctx> {
    pub(crate) fn new(
        e: &Emitter<'_, 'ctx>,
        q: PointerValue<'ctx>,
        kc: PointerValue<'ctx>,
        vc: PointerValue<'ctx>,
        kv_heads: usize,
        head_dim: usize,
        scale: f32,
    ) -> R<Self> {
        let acc = e.array_f32(head_dim as u32)?;
        let (m, l) = (e.var_f32(0.0)?, e.var_f32(0.0)?);
        Ok(Attend { q, kc, vc, kv_heads, head_dim, scale, acc, m, l })
    }

    pub(crate) fn start(&self, e: &Emitter<'_, 'ctx>) -> R<()> {
        e.set(self.m, e.f32c(f32::NEG_INFINITY))?;
        e.set(self.l, e.f32c(0.0))?;
        e.for_range(e.i64c(0), e.i64c(self.head_dim as i64), |c| e.store_f32(self.acc, c, e.f32c(0.0)))
    }

    /// `q[qbase..]` · k, scaled, for key row `j` of kv head `kh`.
    pub(crate) fn score(
        &self,
        e: &Emitter<'_, 'ctx>,
        qbase: IntValue<'ctx>,
        kbase: IntValue<'ctx>,
    ) -> R<FloatValue<'ctx>> {
        let (head_dim, q, kc) = (self.head_dim, self.q, self.kc);
        let dot = if head_dim % 8 == 0 {
            let mut acc8 = e.f32t().vec_type(8).const_zero();
            for c in (0..head_dim as i64).step_by(8) {
                let qv = e.load_v8(q, e.add(qbase, e.i64c(c))?)?;
                let kv = e.load_v8(kc, e.add(kbase, e.i64c(c))?)?;
                acc8 = e.fma_v8(qv, kv, acc8)?;
            }
            e.reduce_v8(acc8)?
        } else {
            let s = e.var_f32(0.0)?;
            e.for_range(e.i64c(0), e.i64c(head_dim as i64), |c| {
                let qv = e.load_f32(q, e.add(qbase, c)?)?;
                let kv = e.load_f32(kc, e.add(kbase, c)?)?;
                e.set(s, e.fma_reduce(qv, kv, e.get(s)?)?)
            })?;
            e.get(s)?
        };
        e.fmul(dot, e.f32c(self.scale))
    }

    /// The offset of key/value row `j` of kv head `kh`.
    pub(crate) fn kbase(&self, e: &Emitter<'_, 'ctx>, j: IntValue<'ctx>, kh: IntValue<'ctx>) -> R<IntValue<'ctx>> {
        e.mul(e.add(e.mul(j, e.i64c(self.kv_heads as i64))?, kh)?, e.i64c(self.head_dim as i64))
    }

    /// Visits keys `from..to`.
    pub(crate) fn keys(
        &self,
        e: &Emitter<'_, 'ctx>,
        qbase: IntValue<'ctx>,
        kh: IntValue<'ctx>,
        from: IntValue<'ctx>,
        to: IntValue<'ctx>,
    ) -> R<()> {
        let (head_dim, vc, acc, m, l) = (self.head_dim, self.vc, self.acc, self.m, self.l);
        e.for_range(from, to, |j| {
            let kbase = self.kbase(e, j, kh)?;
            // Online softmax: rescale what was accumulated when the running max grows.
            let score = self.score(e, qbase, kbase)?;
            let m_old = e.get(m)?;
            let m_new = e.fmax(m_old, score)?;
            let corr = e.exp(e.fsub(m_old, m_new)?)?;
            let p = e.exp(e.fsub(score, m_new)?)?;
            e.set(l, e.fma(e.get(l)?, corr, p)?)?;
            e.set(m, m_new)?;
            if head_dim % 8 == 0 {
                let (pv, cv) = (e.splat_v8(p)?, e.splat_v8(corr)?);
                for c in (0..head_dim as i64).step_by(8) {
                    let v = e.load_v8(vc, e.add(kbase, e.i64c(c))?)?;
                    let a = e.b.build_float_mul(e.load_v8(acc, e.i64c(c))?, cv, "scaled")?;
                    e.store_v8(acc, e.i64c(c), e.fma_v8(v, pv, a)?)?;
                }
                Ok(())
            } else {
                e.for_range(e.i64c(0), e.i64c(head_dim as i64), |c| {
                    let v = e.load_f32(vc, e.add(kbase, c)?)?;
                    e.store_f32(acc, c, e.fma(v, p, e.fmul(e.load_f32(acc, c)?, corr)?)?)
                })
            }
        })
    }

    /// Writes `acc / l` to `out[qbase..]`.
    pub(crate) fn finish(&self, e: &Emitter<'_, 'ctx>, out: PointerValue<'ctx>, qbase: IntValue<'ctx>) -> R<()> {
        let inv = e.fdiv(e.f32c(1.0), e.get(self.l)?)?;
        e.for_range(e.i64c(0), e.i64c(self.head_dim as i64), |c| {
            e.store_f32(out, e.add(qbase, c)?, e.fmul(e.load_f32(self.acc, c)?, inv)?)
        })
    }
}
