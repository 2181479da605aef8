//! FlexPrefill block-sparse attention: the reference math of `flex_attention` (the interpreter's arm
//! and the oracle of the generated kernels, which follow the same steps in f32).
//!
//! Positions are cut into blocks of `block` on an absolute grid (key block `kb` holds positions
//! `kb·block .. (kb+1)·block`; a query at position `p` lies in query block `p / block`). Per batch row and
//! query head:
//!
//! 1. **Estimate.** The last `min(block, seq)` queries attend to all their visible keys (true softmax):
//!    `vert[kb]` sums their attention falling in key block `kb`, `slash[ob]` the attention at distance
//!    `pos − j` in `ob·block .. (ob+1)·block` (diagonal bands). The pooled estimate is the softmax of
//!    (mean of those queries) · (mean of each key block's keys) · scale over the key blocks.
//! 2. **Choose.** `d = sqrt(JSD(pooled ‖ vert / rows))` (natural log). `d < tau`: the pooled estimate is
//!    trustworthy, so the head is **query-aware**: each query block keeps the key blocks its own pooled
//!    scores select. Otherwise **vertical-slash**: the columns blocks and diagonal bands `vert`/`slash`
//!    select are kept for every query block.
//! 3. **Select to mass γ.** A set of non-negative weights keeps `{x ≥ t}` for the largest threshold `t`
//!    found by 30 bisection steps whose kept mass is still ≥ γ · total (ties kept together; γ ≥ 1 keeps
//!    everything). Block column 0 and the diagonal block are always kept.
//! 4. **Attend** with an exact softmax over the keys of the kept blocks only (causal).
//!
//! With `seq < min_len` the op is exactly dense causal attention.

/// The attributes of `flex_attention` other than `scale`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FlexParams {
    pub block: i64,
    pub gamma: f32,
    pub tau: f32,
    pub min_len: i64,
}

/// Bisection steps of the γ selection (kernels use the same count).
pub const BISECT_STEPS: usize = 30;

impl FlexParams {
    pub fn validate(&self) -> Result<(), String> {
        if self.block < 1 {
            return Err(format!("flex_attention block {} must be ≥ 1", self.block));
        }
        if !(self.gamma > 0.0 && self.gamma <= 1.0) {
            return Err(format!("flex_attention gamma {} must be in (0, 1]", self.gamma));
        }
        if !(self.tau >= 0.0 && self.tau.is_finite()) {
            return Err(format!("flex_attention tau {} must be a finite number ≥ 0", self.tau));
        }
        if self.min_len < 0 {
            return Err(format!("flex_attention min_len {} must be ≥ 0", self.min_len));
        }
        Ok(())
    }
}

/// Which of `x` (non-negative weights) the γ rule keeps: `x ≥ t` for the bisected threshold `t`.
pub fn select_to_mass(x: &[f64], gamma: f64) -> Vec<bool> {
    if gamma >= 1.0 {
        return vec![true; x.len()];
    }
    let total: f64 = x.iter().sum();
    let target = gamma * total;
    let max = x.iter().copied().fold(0.0, f64::max);
    let (mut lo, mut hi) = (0.0f64, 2.0 * max);
    for _ in 0..BISECT_STEPS {
        let mid = (lo + hi) * 0.5;
        let mass: f64 = x.iter().filter(|&&v| v >= mid).sum();
        if mass >= target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    x.iter().map(|&v| v >= lo).collect()
}

/// Natural-log Jensen–Shannon divergence of two distributions of equal length.
pub fn js_divergence(p: &[f64], q: &[f64]) -> f64 {
    let mut js = 0.0;
    for (&a, &b) in p.iter().zip(q) {
        let m = 0.5 * (a + b);
        if a > 0.0 {
            js += 0.5 * a * (a / m).ln();
        }
        if b > 0.0 {
            js += 0.5 * b * (b / m).ln();
        }
    }
    js.max(0.0)
}

fn softmax(x: &mut [f64]) {
    let m = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - m).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

fn dot64(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// One head's view of q (`seq` rows) and k (`t` rows), each row `d` floats.
pub struct HeadView<'a> {
    pub q: &'a dyn Fn(usize) -> &'a [f32],
    pub k: &'a dyn Fn(usize) -> &'a [f32],
    pub seq: usize,
    pub t: usize,
    pub d: usize,
}

/// The pattern of one head (step 1–2).
#[derive(Clone, Debug, PartialEq)]
pub struct HeadPattern {
    pub query_aware: bool,
    /// The Jensen–Shannon distance `sqrt(JSD)` that chose the pattern.
    pub distance: f64,
    /// Vertical-slash: kept key-block columns and kept diagonal bands (by block distance).
    pub vert: Vec<bool>,
    pub slash: Vec<bool>,
    /// Mean key of each key block.
    pub pooled_k: Vec<Vec<f64>>,
}

fn mean_rows<'a>(rows: impl Iterator<Item = usize>, get: &dyn Fn(usize) -> &'a [f32], d: usize) -> Vec<f64> {
    let mut acc = vec![0f64; d];
    let mut n = 0usize;
    for r in rows {
        for (a, &x) in acc.iter_mut().zip(get(r)) {
            *a += x as f64;
        }
        n += 1;
    }
    acc.iter_mut().for_each(|a| *a /= n.max(1) as f64);
    acc
}

/// Steps 1–2 for one head.
pub fn head_pattern(h: &HeadView, p: &FlexParams, scale: f64) -> HeadPattern {
    let b = p.block as usize;
    let past = h.t - h.seq;
    let nkb = h.t.div_ceil(b);
    let pooled_k: Vec<Vec<f64>> = (0..nkb).map(|kb| mean_rows(kb * b..((kb + 1) * b).min(h.t), h.k, h.d)).collect();
    let rows = b.min(h.seq);
    let r0 = h.seq - rows;
    let (mut vert, mut slash) = (vec![0f64; nkb], vec![0f64; nkb]);
    let mut scores = vec![0f64; h.t];
    for i in r0..h.seq {
        let pos = past + i;
        let qi = h.q(i);
        for (j, s) in scores[..=pos].iter_mut().enumerate() {
            *s = crate::numeric::dot(qi, (h.k)(j)) * scale;
        }
        softmax(&mut scores[..=pos]);
        for (j, &a) in scores[..=pos].iter().enumerate() {
            vert[j / b] += a;
            slash[(pos - j) / b] += a;
        }
    }
    let pq = mean_rows(r0..h.seq, h.q, h.d);
    let mut est: Vec<f64> = pooled_k.iter().map(|k| dot64(&pq, k) * scale).collect();
    softmax(&mut est);
    let observed: Vec<f64> = vert.iter().map(|v| v / rows as f64).collect();
    let distance = js_divergence(&est, &observed).sqrt();
    let gamma = p.gamma as f64;
    HeadPattern {
        query_aware: distance < p.tau as f64,
        distance,
        vert: select_to_mass(&vert, gamma),
        slash: select_to_mass(&slash, gamma),
        pooled_k,
    }
}

impl HeadView<'_> {
    fn q(&self, i: usize) -> &[f32] {
        (self.q)(i)
    }
}

/// Step 3: the key blocks `0..=qb` that query block `qb` keeps.
pub fn block_mask(h: &HeadView, pat: &HeadPattern, p: &FlexParams, scale: f64, qb: usize) -> Vec<bool> {
    let b = p.block as usize;
    let past = h.t - h.seq;
    let (qs, qe) = ((qb * b).max(past), ((qb + 1) * b).min(h.t) - 1);
    let mut keep = if p.gamma >= 1.0 {
        vec![true; qb + 1]
    } else if pat.query_aware {
        let pq = mean_rows(qs - past..=qe - past, h.q, h.d);
        let mut w: Vec<f64> = pat.pooled_k[..=qb].iter().map(|k| dot64(&pq, k) * scale).collect();
        softmax(&mut w);
        select_to_mass(&w, p.gamma as f64)
    } else {
        (0..=qb)
            .map(|kb| {
                let (ks, ke) = (kb * b, ((kb + 1) * b).min(h.t) - 1);
                let (lo, hi) = (qs.saturating_sub(ke) / b, (qe - ks) / b);
                pat.vert[kb] || (lo..=hi).any(|ob| pat.slash[ob])
            })
            .collect()
    };
    keep[0] = true;
    keep[qb] = true;
    keep
}

/// The whole op on `q[B, S, Hq, D]`, `k`/`v[B, T, Hkv, D]` (row-major), returning `[B, S, Hq, D]`.
#[allow(clippy::too_many_arguments)]
pub fn flex_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (bsz, s, hq, d): (usize, usize, usize, usize),
    (t, hkv): (usize, usize),
    scale: f32,
    p: &FlexParams,
) -> Vec<f32> {
    let group = hq / hkv;
    let blk = p.block as usize;
    let past = t - s;
    let dense = (s as i64) < p.min_len;
    let mut out = vec![0f32; q.len()];
    let mut scores = vec![0f64; t];
    for bi in 0..bsz {
        for h in 0..hq {
            let kh = h / group;
            let qrow = |i: usize| &q[((bi * s + i) * hq + h) * d..][..d];
            let krow = |j: usize| &k[((bi * t + j) * hkv + kh) * d..][..d];
            let view = HeadView { q: &qrow, k: &krow, seq: s, t, d };
            let pat = (!dense).then(|| head_pattern(&view, p, scale as f64));
            let mut mask: Option<(usize, Vec<bool>)> = None;
            for i in 0..s {
                let pos = past + i;
                let visible: Vec<usize> = match &pat {
                    None => (0..=pos).collect(),
                    Some(pat) => {
                        let qb = pos / blk;
                        if mask.as_ref().is_none_or(|(b, _)| *b != qb) {
                            mask = Some((qb, block_mask(&view, pat, p, scale as f64, qb)));
                        }
                        let keep = &mask.as_ref().expect("just set").1;
                        (0..=pos).filter(|j| keep[j / blk]).collect()
                    }
                };
                let sc = &mut scores[..visible.len()];
                for (x, &j) in sc.iter_mut().zip(&visible) {
                    *x = crate::numeric::dot(qrow(i), krow(j)) * scale as f64;
                }
                softmax(sc);
                let orow = &mut out[((bi * s + i) * hq + h) * d..][..d];
                for (c, o) in orow.iter_mut().enumerate() {
                    let acc: f64 =
                        sc.iter().zip(&visible).map(|(w, &j)| w * v[((bi * t + j) * hkv + kh) * d + c] as f64).sum();
                    *o = acc as f32;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_keeps_the_smallest_heaviest_set_reaching_gamma() {
        let x = [0.5, 0.05, 0.3, 0.1, 0.05];
        assert_eq!(select_to_mass(&x, 0.75), vec![true, false, true, false, false]);
        assert_eq!(select_to_mass(&x, 0.85), vec![true, false, true, true, false]);
        // Ties go together.
        assert_eq!(select_to_mass(&x, 0.92), vec![true, true, true, true, true]);
        assert_eq!(select_to_mass(&x, 1.0), vec![true; 5]);
        assert_eq!(select_to_mass(&x, 0.1), vec![true, false, false, false, false]);
    }

    #[test]
    fn js_divergence_is_zero_for_equal_and_ln2_for_disjoint() {
        assert!(js_divergence(&[0.3, 0.7], &[0.3, 0.7]).abs() < 1e-15);
        assert!((js_divergence(&[1.0, 0.0], &[0.0, 1.0]) - 2f64.ln()).abs() < 1e-12);
    }

    /// Over random weights and γ: the kept mass reaches γ, and dropping the lightest kept value (with
    /// its ties) would fall below it (the set is the smallest such, up to ties and bisection precision).
    #[test]
    fn kept_mass_invariant_over_gamma() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..300 {
            let n = rng.random_range(1..40);
            let x: Vec<f64> = (0..n).map(|_| rng.random_range(0.0f64..1.0).powi(3)).collect();
            let gamma = rng.random_range(0.05f64..1.0);
            let keep = select_to_mass(&x, gamma);
            let total: f64 = x.iter().sum();
            let kept: f64 = x.iter().zip(&keep).filter(|(_, &k)| k).map(|(v, _)| v).sum();
            assert!(kept >= gamma * total * (1.0 - 1e-12), "kept {kept} of {total} at γ {gamma}");
            let lightest = x.iter().zip(&keep).filter(|(_, &k)| k).map(|(v, _)| *v).fold(f64::INFINITY, f64::min);
            let without: f64 = x.iter().filter(|&&v| v > lightest).sum();
            assert!(without < gamma * total * (1.0 + 1e-6), "not minimal: {without} still ≥ γ·{total}");
            // Everything heavier than a kept value is kept.
            for (v, k) in x.iter().zip(&keep) {
                assert!(*k || *v < lightest);
            }
        }
    }

    /// Over random heads, γ and τ: every query block keeps key block 0 and its diagonal block, only
    /// visible blocks, and the op with γ = 1 equals dense attention.
    #[test]
    fn first_column_and_diagonal_always_kept() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        for _ in 0..60 {
            let (seq, past, d) = (rng.random_range(1..60), rng.random_range(0..20), rng.random_range(1..6));
            let t = seq + past;
            let q: Vec<f32> = (0..seq * d).map(|_| rng.random_range(-2.0..2.0)).collect();
            let k: Vec<f32> = (0..t * d).map(|_| rng.random_range(-2.0..2.0)).collect();
            let v: Vec<f32> = (0..t * d).map(|_| rng.random_range(-1.0..1.0)).collect();
            let p = FlexParams {
                block: rng.random_range(1..12),
                gamma: rng.random_range(0.05..1.0),
                tau: rng.random_range(0.0..0.9),
                min_len: 0,
            };
            let (qr, kr) = (|i: usize| &q[i * d..][..d], |j: usize| &k[j * d..][..d]);
            let view = HeadView { q: &qr, k: &kr, seq, t, d };
            let pat = head_pattern(&view, &p, 0.5);
            let b = p.block as usize;
            for qb in past / b..=(t - 1) / b {
                let keep = block_mask(&view, &pat, &p, 0.5, qb);
                assert_eq!(keep.len(), qb + 1);
                assert!(keep[0] && keep[qb], "{p:?} qb {qb}: {keep:?}");
            }
            let all = FlexParams { gamma: 1.0, ..p };
            let sparse = flex_attention(&q, &k, &v, (1, seq, 1, d), (t, 1), 0.5, &all);
            let dense = crate::interp::eval(
                &crate::Op::Attention { scale: 0.5 },
                &[
                    &crate::Tensor::f32(vec![1, seq, 1, d], q.clone()),
                    &crate::Tensor::f32(vec![1, t, 1, d], k.clone()),
                    &crate::Tensor::f32(vec![1, t, 1, d], v.clone()),
                ],
                &Default::default(),
            )
            .unwrap();
            for (a, b) in sparse.iter().zip(dense.as_f32().unwrap()) {
                assert!((a - b).abs() < 1e-6);
            }
        }
    }
}
