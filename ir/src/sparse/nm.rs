//! N:M weight sparsity: in every group of `M` consecutive elements of a row (along `k`), exactly `N`
//! are kept (2:4 keeps 50%, 1:4 25%, 2:8 25%, …). M ∈ {4, 8}, 1 ≤ N ≤ M.
//!
//! Compact form ([`NmSparse`]), per 32-element block of a row (the quantization block of the legacy
//! formats, or 32 plain floats), with `K = 32·N/M` kept elements:
//!
//! ```text
//! [header][K codes][K positions]
//! header:    Q4_0/Q8_0: d (f16); Q4_1: d, m (f16, f16); F32/F16: nothing   — the dense block's, unchanged
//! codes:     kept element e's original code: Q4_0/Q4_1 4 bits (element e = low nibble of byte e/2 for
//!            even e, high for odd e), Q8_0 one i8, F16 2 bytes, F32 4 bytes
//! positions: element e = slot e mod N of group e div N of the block; its column in the group, 0..M:
//!            2 bits for M = 4 (byte e/4, bits 2·(e mod 4)), 4 bits for M = 8 (a nibble, as the codes)
//! ```
//!
//! No value is requantized: kept element e dequantizes exactly as in the dense block (`(q − 8)·d`,
//! `q·d + m`, `q·d`, or the float), dropped elements are 0. A row is its blocks back to back, padded
//! with zero bytes to a multiple of 4 ([`nm_row_bytes`]), so a row starts at `r · row_bytes`.
//! Within a group the positions are strictly increasing ([`NmSparse::validate`]).
//!
//! Bytes per 32 elements (dense → 2:4): Q4_0 18 → 14, Q4_1 20 → 16, Q8_0 34 → 22, F16 64 → 36,
//! F32 128 → 68. For 4-bit codes the positions cost half as much as the codes they save, so Q4_1 2:4
//! saves only 20% of the bytes.
//!
//! Pruning ([`prune_nm`]) keeps, in every group, the `N` elements with the largest `|W_ij| · s_j`,
//! `s_j` = 1 (magnitude) or the calibration's activation norm of input channel j (Wanda); ties go to the
//! lower column, NaN ranks last.

use super::{dequantize_matrix, rank_best_first, SparseError};
use crate::DType;
use half::f16;

/// Weight dtypes an [`NmSparse`] can hold.
pub const NM_DTYPES: [DType; 5] = [DType::F32, DType::F16, DType::Q4_0, DType::Q4_1, DType::Q8_0];
/// Group sizes `M`.
pub const NM_GROUPS: [usize; 2] = [4, 8];

/// Elements per block of the compact form (along `k`).
pub const NM_BLOCK: usize = 32;

/// An N:M pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct NmPattern {
    /// Kept per group (`N`).
    pub keep: usize,
    /// Group size (`M`).
    pub group: usize,
}

impl NmPattern {
    pub fn new(keep: usize, group: usize) -> Result<NmPattern, SparseError> {
        let p = NmPattern { keep, group };
        p.check()?;
        Ok(p)
    }

    fn check(self) -> Result<(), SparseError> {
        if !NM_GROUPS.contains(&self.group) || self.keep == 0 || self.keep > self.group {
            return Err(SparseError::Pattern(format!(
                "{}:{} is not an N:M pattern with M in {NM_GROUPS:?} and 1 ≤ N ≤ M",
                self.keep, self.group
            )));
        }
        Ok(())
    }

    /// Parses `N:M`.
    pub fn parse(s: &str) -> Result<NmPattern, SparseError> {
        let bad = || SparseError::Pattern(format!("`{s}` is not N:M (e.g. 2:4)"));
        let (n, m) = s.split_once(':').ok_or_else(bad)?;
        NmPattern::new(n.trim().parse().map_err(|_| bad())?, m.trim().parse().map_err(|_| bad())?)
    }

    /// Kept share `N / M`.
    pub fn density(self) -> f64 {
        self.keep as f64 / self.group as f64
    }

    /// Kept elements per 32-element block.
    pub fn kept_per_block(self) -> usize {
        NM_BLOCK / self.group * self.keep
    }

    /// Bits of one position field.
    pub fn pos_bits(self) -> usize {
        if self.group == 4 {
            2
        } else {
            4
        }
    }
}

impl std::fmt::Display for NmPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.keep, self.group)
    }
}

/// Header bytes (scale, min) of a compact block of `dtype`.
pub fn nm_header_bytes(dtype: DType) -> usize {
    match dtype {
        DType::Q4_1 => 4,
        DType::Q4_0 | DType::Q8_0 => 2,
        _ => 0,
    }
}

/// Bits of one kept code of `dtype`.
pub fn nm_code_bits(dtype: DType) -> usize {
    match dtype {
        DType::Q4_0 | DType::Q4_1 => 4,
        DType::Q8_0 => 8,
        DType::F16 => 16,
        _ => 32,
    }
}

/// Bytes of one compact 32-element block: header, codes, positions.
pub fn nm_block_bytes(dtype: DType, p: NmPattern) -> usize {
    let kept = p.kept_per_block();
    nm_header_bytes(dtype) + kept * nm_code_bits(dtype) / 8 + kept * p.pos_bits() / 8
}

/// Bytes of one compact row of `k` elements (whole blocks, padded to a multiple of 4).
pub fn nm_row_bytes(dtype: DType, p: NmPattern, k: usize) -> usize {
    (k / NM_BLOCK * nm_block_bytes(dtype, p)).div_ceil(4) * 4
}

fn check(dtype: DType, p: NmPattern, k: usize) -> Result<(), SparseError> {
    if !NM_DTYPES.contains(&dtype) {
        return Err(SparseError::NmUnsupported(dtype));
    }
    p.check()?;
    if k == 0 || !k.is_multiple_of(NM_BLOCK) {
        return Err(SparseError::PartialBlock { dtype, k });
    }
    Ok(())
}

/// A `[n, k]` weight matrix of `dtype` pruned to an N:M pattern, in the compact form of the module
/// docs. Fields are public for serialisation; anything built from untrusted data must pass
/// [`NmSparse::validate`] before a kernel sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NmSparse {
    pub dtype: DType,
    pub pattern: NmPattern,
    pub n: usize,
    pub k: usize,
    pub data: Vec<u8>,
}

/// Code `e` of a packed run of 4-bit fields.
pub(crate) fn nibble(bytes: &[u8], e: usize) -> u8 {
    (bytes[e / 2] >> (4 * (e % 2))) & 0x0F
}

impl NmSparse {
    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        nm_row_bytes(self.dtype, self.pattern, self.k)
    }

    /// Kept / all elements (`N / M`).
    pub fn density(&self) -> f64 {
        self.pattern.density()
    }

    /// Position of kept element `e` of the block at `blk`.
    fn position(&self, blk: &[u8], e: usize) -> usize {
        let kept = self.pattern.kept_per_block();
        let at = nm_header_bytes(self.dtype) + kept * nm_code_bits(self.dtype) / 8;
        let pos = &blk[at..];
        if self.pattern.group == 4 {
            ((pos[e / 4] >> (2 * (e % 4))) & 3) as usize
        } else {
            nibble(pos, e) as usize
        }
    }

    /// Checks every invariant a kernel relies on: supported dtype and pattern, `k` a multiple of 32,
    /// `data` exactly `n` rows of [`nm_row_bytes`] with zero padding, every position `< M` and the
    /// positions of each group strictly increasing, and sizes that fit the i64 offsets of the
    /// generated code. (The kernels stay in bounds for any bytes of the right length; the position
    /// rules make the form canonical, so that equal matrices have equal bytes.)
    pub fn validate(&self) -> Result<(), SparseError> {
        check(self.dtype, self.pattern, self.k)?;
        let bad = |what: String| SparseError::NmInconsistent { dtype: self.dtype, n: self.n, k: self.k, what };
        let rb = self.row_bytes();
        let want = self.n.checked_mul(rb).filter(|&b| b <= i64::MAX as usize / 8);
        if want != Some(self.data.len()) {
            return Err(bad(format!(
                "{} data bytes, want n · row bytes = {} · {rb} for {} {}",
                self.data.len(),
                self.n,
                self.pattern,
                self.dtype
            )));
        }
        let (bb, p) = (nm_block_bytes(self.dtype, self.pattern), self.pattern);
        let used = self.k / NM_BLOCK * bb;
        for (r, row) in self.data.chunks_exact(rb.max(1)).enumerate() {
            if row[used..].iter().any(|&b| b != 0) {
                return Err(bad(format!("row {r}: padding bytes are not zero")));
            }
            for (b, blk) in row[..used].chunks_exact(bb).enumerate() {
                for g in 0..NM_BLOCK / p.group {
                    let mut prev = None;
                    for s in 0..p.keep {
                        let pos = self.position(blk, g * p.keep + s);
                        if pos >= p.group {
                            return Err(bad(format!(
                                "row {r} block {b} group {g}: position {pos} is out of range 0..{}",
                                p.group
                            )));
                        }
                        if prev.is_some_and(|q| q >= pos) {
                            return Err(bad(format!("row {r} block {b} group {g}: positions not strictly increasing")));
                        }
                        prev = Some(pos);
                    }
                }
            }
        }
        Ok(())
    }

    /// Keeps the elements `(row, column)` of the dense `[n, k]` matrix `bytes` (in `dtype`'s format)
    /// for which `keep` is true; `keep` must hold for exactly `N` columns of every group of `M`.
    pub fn from_dense(
        dtype: DType,
        pattern: NmPattern,
        n: usize,
        k: usize,
        bytes: &[u8],
        mut keep: impl FnMut(usize, usize) -> bool,
    ) -> Result<NmSparse, SparseError> {
        check(dtype, pattern, k)?;
        let bad = |what: String| SparseError::NmInconsistent { dtype, n, k, what };
        let dense_row = dtype.row_bytes(k).expect("k is a multiple of 32");
        if Some(bytes.len()) != n.checked_mul(dense_row) {
            return Err(bad(format!("{} dense bytes, want {n} rows of {dense_row}", bytes.len())));
        }
        let (rb, bb, kept) =
            (nm_row_bytes(dtype, pattern, k), nm_block_bytes(dtype, pattern), pattern.kept_per_block());
        let dense_bb = NM_BLOCK / dtype.block_size() * dtype.type_size();
        let (hdr, code_bits) = (nm_header_bytes(dtype), nm_code_bits(dtype));
        let mut data = vec![0u8; n.checked_mul(rb).ok_or_else(|| bad("too large".into()))?];
        let mut cols = Vec::with_capacity(kept);
        for r in 0..n {
            for b in 0..k / NM_BLOCK {
                let src = &bytes[r * dense_row + b * dense_bb..][..dense_bb];
                let dst = &mut data[r * rb + b * bb..][..bb];
                cols.clear();
                for g in 0..NM_BLOCK / pattern.group {
                    let before = cols.len();
                    for c in 0..pattern.group {
                        if keep(r, b * NM_BLOCK + g * pattern.group + c) {
                            cols.push((g * pattern.group + c, c));
                        }
                    }
                    if cols.len() - before != pattern.keep {
                        return Err(bad(format!(
                            "row {r}, columns {}..{}: {} kept, want {}",
                            b * NM_BLOCK + g * pattern.group,
                            b * NM_BLOCK + (g + 1) * pattern.group,
                            cols.len() - before,
                            pattern.keep
                        )));
                    }
                }
                dst[..hdr].copy_from_slice(&src[..hdr]);
                let pos_at = hdr + kept * code_bits / 8;
                for (e, &(j, c)) in cols.iter().enumerate() {
                    match dtype {
                        DType::Q4_0 | DType::Q4_1 => {
                            let qs = &src[hdr..];
                            let q = if j < 16 { qs[j] & 0x0F } else { qs[j - 16] >> 4 };
                            dst[hdr + e / 2] |= q << (4 * (e % 2));
                        }
                        _ => {
                            let w = code_bits / 8;
                            dst[hdr + e * w..hdr + (e + 1) * w].copy_from_slice(&src[hdr + j * w..hdr + (j + 1) * w]);
                        }
                    }
                    if pattern.group == 4 {
                        dst[pos_at + e / 4] |= (c as u8) << (2 * (e % 4));
                    } else {
                        dst[pos_at + e / 2] |= (c as u8) << (4 * (e % 2));
                    }
                }
            }
        }
        Ok(NmSparse { dtype, pattern, n, k, data })
    }

    /// Which elements of the dense `[n, k]` matrix are kept (`n · k` flags, row-major).
    pub fn mask(&self) -> Result<Vec<bool>, SparseError> {
        self.validate()?;
        let (rb, bb, p) = (self.row_bytes(), nm_block_bytes(self.dtype, self.pattern), self.pattern);
        let mut out = vec![false; self.n * self.k];
        for r in 0..self.n {
            for b in 0..self.k / NM_BLOCK {
                let blk = &self.data[r * rb + b * bb..][..bb];
                for e in 0..p.kept_per_block() {
                    out[r * self.k + b * NM_BLOCK + (e / p.keep) * p.group + self.position(blk, e)] = true;
                }
            }
        }
        Ok(out)
    }

    /// The dense matrix dequantized to f32 (`n · k`, dropped elements 0): kept elements are
    /// bit-identical to [`quant::dequantize`] of the dense block they came from.
    pub fn dequantize(&self) -> Result<Vec<f32>, SparseError> {
        self.validate()?;
        let (rb, bb, p) = (self.row_bytes(), nm_block_bytes(self.dtype, self.pattern), self.pattern);
        let (hdr, kept) = (nm_header_bytes(self.dtype), p.kept_per_block());
        let mut out = vec![0f32; self.n * self.k];
        let h = |b: &[u8], at: usize| f16::from_le_bytes([b[at], b[at + 1]]).to_f32();
        for r in 0..self.n {
            for b in 0..self.k / NM_BLOCK {
                let blk = &self.data[r * rb + b * bb..][..bb];
                let codes = &blk[hdr..];
                for e in 0..kept {
                    let j = (e / p.keep) * p.group + self.position(blk, e);
                    let v = match self.dtype {
                        DType::Q4_0 => (nibble(codes, e) as i32 - 8) as f32 * h(blk, 0),
                        DType::Q4_1 => nibble(codes, e) as f32 * h(blk, 0) + h(blk, 2),
                        DType::Q8_0 => codes[e] as i8 as f32 * h(blk, 0),
                        DType::F16 => h(codes, 2 * e),
                        _ => f32::from_le_bytes(codes[4 * e..4 * e + 4].try_into().expect("4 bytes")),
                    };
                    out[r * self.k + b * NM_BLOCK + j] = v;
                }
            }
        }
        Ok(out)
    }
}

/// The pruned matrix of `w` in the dense layout of its own dtype, dropped elements exactly 0 (f32/f16
/// 0.0, Q8_0 code 0, Q4_0 code 8, the block scale unchanged), or `None` for a dtype that cannot hold an
/// exact 0 in every block (Q4_1: `q·d + m` is 0 only if `−m/d` happens to be a code).
pub fn nm_dense_layout(w: &NmSparse) -> Result<Option<Vec<u8>>, SparseError> {
    let mask = w.mask()?;
    let (hdr, kept) = (nm_header_bytes(w.dtype), w.pattern.kept_per_block());
    let dense_bb = NM_BLOCK / w.dtype.block_size() * w.dtype.type_size();
    let (rb, bb) = (w.row_bytes(), nm_block_bytes(w.dtype, w.pattern));
    let mut out = match w.dtype {
        DType::F32 | DType::F16 => vec![0u8; w.n * w.k * w.dtype.type_size()],
        DType::Q8_0 | DType::Q4_0 => vec![0u8; w.n * (w.k / NM_BLOCK) * dense_bb],
        _ => return Ok(None),
    };
    for r in 0..w.n {
        for b in 0..w.k / NM_BLOCK {
            let src = &w.data[r * rb + b * bb..][..bb];
            let dst = &mut out[(r * (w.k / NM_BLOCK) + b) * dense_bb..][..dense_bb];
            dst[..hdr].copy_from_slice(&src[..hdr]);
            if w.dtype == DType::Q4_0 {
                dst[hdr..].fill(0x88);
            }
            let cols = (0..NM_BLOCK).filter(|&j| mask[r * w.k + b * NM_BLOCK + j]);
            for (e, j) in (0..kept).zip(cols) {
                match w.dtype {
                    DType::Q4_0 => {
                        let q = nibble(&src[hdr..], e);
                        let (byte, shift) = if j < 16 { (j, 0) } else { (j - 16, 4) };
                        dst[hdr + byte] = (dst[hdr + byte] & !(0x0F << shift)) | (q << shift);
                    }
                    _ => {
                        let sz = nm_code_bits(w.dtype) / 8;
                        dst[hdr + j * sz..hdr + (j + 1) * sz].copy_from_slice(&src[hdr + e * sz..hdr + (e + 1) * sz]);
                    }
                }
            }
        }
    }
    Ok(Some(out))
}

/// Keeps in every group of `M` columns the `N` elements with the largest `|W_ij| · scale_j` (see the
/// module docs). `scale` = `None`: magnitude; `Some(norms)`: Wanda with `k` activation norms.
pub fn prune_nm(
    dtype: DType,
    pattern: NmPattern,
    n: usize,
    k: usize,
    bytes: &[u8],
    scale: Option<&[f32]>,
) -> Result<NmSparse, SparseError> {
    check(dtype, pattern, k)?;
    if let Some(s) = scale {
        if s.len() != k {
            return Err(SparseError::NmInconsistent {
                dtype,
                n,
                k,
                what: format!("{} activation norms, want one per input channel", s.len()),
            });
        }
    }
    let wf = dequantize_matrix(dtype, n, k, bytes)?;
    let mut kept = vec![false; n * k];
    let mut order: Vec<(f64, usize)> = Vec::with_capacity(pattern.group);
    for r in 0..n {
        for g0 in (0..k).step_by(pattern.group) {
            order.clear();
            for j in g0..g0 + pattern.group {
                let v = f64::from(wf[r * k + j]).abs() * scale.map_or(1.0, |s| f64::from(s[j]));
                order.push((v, j));
            }
            rank_best_first(&mut order);
            for &(_, j) in &order[..pattern.keep] {
                kept[r * k + j] = true;
            }
        }
    }
    NmSparse::from_dense(dtype, pattern, n, k, bytes, |r, j| kept[r * k + j])
}

#[cfg(test)]
mod tests {
    use super::super::tests::random;
    use super::*;
    use crate::quant;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn patterns() -> Vec<NmPattern> {
        let mut v = Vec::new();
        for m in NM_GROUPS {
            for n in 1..=m {
                v.push(NmPattern::new(n, m).unwrap());
            }
        }
        v
    }

    #[test]
    fn sizes_match_the_documented_table() {
        let p = NmPattern::new(2, 4).unwrap();
        let got: Vec<usize> = NM_DTYPES.iter().map(|&d| nm_block_bytes(d, p)).collect();
        assert_eq!(got, vec![68, 36, 14, 16, 22]);
        assert_eq!(nm_block_bytes(DType::Q4_1, NmPattern::new(1, 8).unwrap()), 4 + 2 + 2);
        assert_eq!(nm_row_bytes(DType::Q4_0, p, 32), 16, "14 padded to 16");
        for s in ["2:3", "0:4", "5:4", "2", "a:4", "2:16"] {
            assert!(NmPattern::parse(s).is_err(), "{s}");
        }
        assert_eq!(NmPattern::parse(" 3:8").unwrap(), NmPattern { keep: 3, group: 8 });
    }

    /// Kept elements dequantize bit-identically to the dense matrix, dropped ones are 0, every group
    /// keeps exactly N, and N = M is the dense matrix itself.
    #[test]
    fn from_dense_keeps_exact_values_and_zeroes_the_rest() {
        let mut rng = StdRng::seed_from_u64(11);
        for dtype in NM_DTYPES {
            for p in patterns() {
                let (n, k) = (5, 96);
                let (bytes, wf) = random(&mut rng, dtype, n, k);
                // A random choice of N columns per group.
                let mut mask = vec![false; n * k];
                for g0 in (0..n * k).step_by(p.group) {
                    let mut cols: Vec<usize> = (0..p.group).collect();
                    for i in 0..p.keep {
                        let j = rng.random_range(i..p.group);
                        cols.swap(i, j);
                        mask[g0 + cols[i]] = true;
                    }
                }
                let s = NmSparse::from_dense(dtype, p, n, k, &bytes, |r, j| mask[r * k + j]).unwrap();
                s.validate().unwrap();
                assert_eq!(s.data.len(), n * nm_row_bytes(dtype, p, k));
                let got = s.dequantize().unwrap();
                for i in 0..n * k {
                    if mask[i] {
                        assert_eq!(got[i].to_bits(), wf[i].to_bits(), "{dtype} {p} [{i}]");
                    } else {
                        assert_eq!(got[i].to_bits(), 0, "{dtype} {p} [{i}]");
                    }
                }
                if p.keep == p.group {
                    assert_eq!(
                        got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        wf.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                    );
                }
            }
        }
    }

    /// Magnitude: every kept element is at least as large as every dropped one of its group, checked by
    /// brute force; Wanda with uniform norms is magnitude; a loud channel wins over a large weight.
    #[test]
    fn pruning_keeps_the_largest_per_group() {
        let mut rng = StdRng::seed_from_u64(12);
        for dtype in [DType::F32, DType::Q4_1, DType::Q8_0, DType::F16, DType::Q4_0] {
            for p in patterns() {
                let (n, k) = (3, 64);
                let (bytes, wf) = random(&mut rng, dtype, n, k);
                let s = prune_nm(dtype, p, n, k, &bytes, None).unwrap();
                let (got, mask) = (s.dequantize().unwrap(), s.mask().unwrap());
                for g0 in (0..n * k).step_by(p.group) {
                    assert_eq!((g0..g0 + p.group).filter(|&i| mask[i]).count(), p.keep);
                    for i in g0..g0 + p.group {
                        assert_eq!(got[i].to_bits(), if mask[i] { wf[i].to_bits() } else { 0 });
                    }
                    let min_kept =
                        (g0..g0 + p.group).filter(|&i| mask[i]).map(|i| wf[i].abs()).fold(f32::INFINITY, f32::min);
                    let max_dropped = (g0..g0 + p.group).filter(|&i| !mask[i]).map(|i| wf[i].abs()).fold(0.0, f32::max);
                    assert!(min_kept >= max_dropped, "{dtype} {p} group {g0}: {min_kept} < {max_dropped}");
                }
                let ones = vec![2.0f32; k];
                assert_eq!(prune_nm(dtype, p, n, k, &bytes, Some(&ones)).unwrap(), s, "{dtype} {p}");
            }
        }
        // Row [1, 1, 0.1, 0.1]: magnitude 2:4 keeps columns 0, 1; with channels 2, 3 100x louder Wanda
        // keeps 2, 3.
        let mut w = [0f32; 32];
        w[..4].copy_from_slice(&[1.0, 1.0, 0.1, 0.1]);
        let bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        let p = NmPattern::new(2, 4).unwrap();
        let mag = prune_nm(DType::F32, p, 1, 32, &bytes, None).unwrap().dequantize().unwrap();
        assert_eq!(&mag[..4], &[1.0, 1.0, 0.0, 0.0]);
        let mut norms = vec![1.0f32; 32];
        norms[2..4].copy_from_slice(&[100.0, 100.0]);
        let wanda = prune_nm(DType::F32, p, 1, 32, &bytes, Some(&norms)).unwrap().dequantize().unwrap();
        assert_eq!(&wanda[..4], &[0.0, 0.0, 0.1, 0.1]);
        let err = prune_nm(DType::F32, p, 1, 32, &bytes, Some(&norms[1..])).unwrap_err();
        assert!(err.to_string().contains("activation norms"), "{err}");
        assert!(prune_nm(DType::Q4K, p, 1, 256, &[0; 144], None).is_err());
        assert!(prune_nm(DType::F32, p, 1, 48, &[0; 192], None).is_err());
    }

    /// The dense layout dequantizes to exactly the compact form's matrix; Q4_1 has none.
    #[test]
    fn dense_layout_equals_the_compact_form() {
        let mut rng = StdRng::seed_from_u64(15);
        for dtype in NM_DTYPES {
            for p in patterns() {
                let (n, k) = (3, 64);
                let (bytes, _) = random(&mut rng, dtype, n, k);
                let s = prune_nm(dtype, p, n, k, &bytes, None).unwrap();
                let Some(dense) = nm_dense_layout(&s).unwrap() else {
                    assert_eq!(dtype, DType::Q4_1);
                    continue;
                };
                let mut got = vec![0f32; n * k];
                quant::dequantize(dtype, &dense, &mut got).unwrap();
                let want = s.dequantize().unwrap();
                for i in 0..n * k {
                    // Q4_0's exact zero may be -0.0.
                    assert!(got[i] == want[i], "{dtype} {p} [{i}]: {} vs {}", got[i], want[i]);
                }
            }
        }
    }

    #[test]
    fn inconsistent_forms_are_errors() {
        let mut rng = StdRng::seed_from_u64(13);
        let p = NmPattern::new(2, 4).unwrap();
        let (bytes, _) = random(&mut rng, DType::Q4_0, 2, 32);
        let good = prune_nm(DType::Q4_0, p, 2, 32, &bytes, None).unwrap();
        good.validate().unwrap();
        let pos_at = 2 + 8; // header, 16 nibbles
        type Mutation = Box<dyn Fn(&mut NmSparse)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("data bytes", Box::new(|s| s.data.truncate(s.data.len() - 1))),
            ("data bytes", Box::new(|s| s.n = 3)),
            ("padding", Box::new(|s| s.data[15] = 1)),
            // Group 0's two positions equal (0, 0), then reversed (1, 0).
            ("strictly increasing", Box::new(move |s| s.data[pos_at] &= 0xF0)),
            ("strictly increasing", Box::new(move |s| s.data[pos_at] = (s.data[pos_at] & 0xF0) | 0b0001)),
            ("not a positive multiple", Box::new(|s| s.k = 16)),
            ("not supported", Box::new(|s| s.dtype = DType::Q5_0)),
            ("not an N:M pattern", Box::new(|s| s.pattern = NmPattern { keep: 2, group: 6 })),
            ("not an N:M pattern", Box::new(|s| s.pattern = NmPattern { keep: 0, group: 4 })),
        ];
        for (want, mutate) in cases {
            let mut s = good.clone();
            mutate(&mut s);
            let err = s.validate().unwrap_err().to_string();
            assert!(err.contains(want), "want {want:?} in {err:?}");
            assert!(s.dequantize().is_err());
        }
        // An 8-group position past 7 (4-bit field).
        let p8 = NmPattern::new(1, 8).unwrap();
        let (bytes, _) = random(&mut rng, DType::F16, 1, 32);
        let mut s = prune_nm(DType::F16, p8, 1, 32, &bytes, None).unwrap();
        s.data[8] = (s.data[8] & 0xF0) | 9;
        assert!(s.validate().unwrap_err().to_string().contains("out of range"));
        // A mask that keeps the wrong count in a group.
        let err = NmSparse::from_dense(DType::F16, p, 1, 32, &bytes, |_, j| j != 0).unwrap_err();
        assert!(err.to_string().contains("3 kept, want 2"), "{err}");
    }

    /// Hostile input: random byte flips, truncations and field changes of valid forms. Whatever
    /// `validate` accepts dequantizes without panicking to values that are 0 off the kept positions,
    /// and an accepted form re-encodes (through its own dequantized mask) to itself for f32.
    #[test]
    fn hostile_forms_are_rejected_or_safe() {
        let mut rng = StdRng::seed_from_u64(14);
        let mut accepted = 0;
        for _ in 0..600 {
            let dtype = NM_DTYPES[rng.random_range(0..NM_DTYPES.len())];
            let ps = patterns();
            let p = ps[rng.random_range(0..ps.len())];
            let (n, k) = (rng.random_range(1..4), 32 * rng.random_range(1..4));
            let (bytes, _) = random(&mut rng, dtype, n, k);
            let mut s = prune_nm(dtype, p, n, k, &bytes, None).unwrap();
            match rng.random_range(0..5) {
                0 => {
                    let i = rng.random_range(0..s.data.len());
                    s.data[i] ^= 1 << rng.random_range(0..8);
                }
                1 => s.data.truncate(rng.random_range(0..s.data.len())),
                2 => s.n = rng.random_range(0..6),
                3 => s.k = rng.random_range(0..200),
                _ => s.pattern = NmPattern { keep: rng.random_range(0..10), group: rng.random_range(0..10) },
            }
            if s.validate().is_ok() {
                accepted += 1;
                let d = s.dequantize().unwrap();
                assert_eq!(d.len(), s.n * s.k);
                // Exactly N non-zero-able slots per group: at most N non-zeros.
                for g in d.chunks(s.pattern.group) {
                    assert!(g.iter().filter(|v| v.to_bits() != 0).count() <= s.pattern.keep);
                }
            } else {
                assert!(s.dequantize().is_err());
            }
        }
        assert!(accepted > 0, "some mutations (e.g. a flipped code bit) keep the form valid");
    }
}
