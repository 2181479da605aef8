//! Unstructured and 1×8 weight sparsity: every row of a `[n, k]` matrix keeps the same number `K` of
//! its elements (`gran` = 1: any elements; `gran` = 8: whole runs of 8 consecutive elements, a quarter
//! of a quantization block), chosen per row by magnitude or Wanda ([`prune_bitmap`]).
//!
//! Compact form ([`BitmapSparse`]), one row of `nb = k / 32` blocks:
//!
//! ```text
//! [codes][masks][headers][zero padding]
//! codes:   the K kept elements' original codes in column order: Q4_0/Q4_1 4 bits (code e = low nibble
//!          of byte e/2 for even e, high for odd e), Q8_0 one i8, F16 2 bytes, F32 4 bytes
//! masks:   per block a keep mask of 32/gran bits (gran 1: a u32, bit j = column 32b + j kept; gran 8:
//!          a nibble, bit g = columns 32b + 8g .. 32b + 8g + 8 kept), packed from the low bits up
//! headers: per block its dense header unchanged: Q4_0/Q8_0 d (f16); Q4_1 d, m; F32/F16 nothing
//! padding: zero bytes up to a multiple of 4 and at least 8 bytes past the codes
//! ```
//!
//! No value is requantized: a kept element dequantizes exactly as in the dense block, a dropped one is
//! 0. Because every row keeps exactly `K`, every row has the same size ([`bitmap_row_bytes`]) — rows
//! start at `r · row_bytes`, need no offsets table, and rows split over threads carry equal work (the
//! per-output comparison group of Wanda). A kernel walks a row's blocks in order, advancing its code
//! position by each mask's popcount; the 8 bytes past the codes let it load an 8-byte code window at
//! any position ≤ `K` without leaving the row.
//!
//! Why a bitmap rather than CSR: a u16 column index per kept element costs 16 bits against a 4-bit
//! code, the bitmap 1 bit per element (kept or not); for Q4_1 at 50% the row is 16.5 bytes per 32
//! elements (CSR: 36) against 20 dense. Bytes per 32 elements (Q4_1, gran 1): 4 (mask) + 4 (header) +
//! 16·(1 − s) → 50%: 16, 70%: 12.8; gran 8 saves 3.5 bytes of mask: 50%: 12.5.

use super::nm::{nibble, nm_code_bits, nm_header_bytes, NM_DTYPES};
use super::{dequantize_matrix, rank_best_first, SparseError};
use crate::DType;
use half::f16;

/// Elements per block (along `k`): the quantization block.
pub const BITMAP_BLOCK: usize = 32;
/// Supported granularities: 1 (unstructured) and 8 (runs of 8 consecutive elements).
pub const BITMAP_GRANS: [usize; 2] = [1, 8];

/// The layout of one row: byte offsets of masks and headers, and the row size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BitmapLayout {
    pub codes_bytes: usize,
    pub masks_at: usize,
    pub headers_at: usize,
    pub row_bytes: usize,
}

/// The row layout of `dtype`, granularity `gran`, `k` columns and `kept` kept per row.
pub fn bitmap_layout(dtype: DType, gran: usize, k: usize, kept: usize) -> BitmapLayout {
    let nb = k / BITMAP_BLOCK;
    let codes_bytes = (kept * nm_code_bits(dtype)).div_ceil(8);
    let masks_bytes = (nb * (BITMAP_BLOCK / gran.max(1))).div_ceil(8);
    let used = codes_bytes + masks_bytes + nb * nm_header_bytes(dtype);
    BitmapLayout {
        codes_bytes,
        masks_at: codes_bytes,
        headers_at: codes_bytes + masks_bytes,
        row_bytes: used.max(codes_bytes + 8).div_ceil(4) * 4,
    }
}

/// Bytes of one compact row (see [`bitmap_layout`]).
pub fn bitmap_row_bytes(dtype: DType, gran: usize, k: usize, kept: usize) -> usize {
    bitmap_layout(dtype, gran, k, kept).row_bytes
}

fn check(dtype: DType, gran: usize, k: usize, kept: usize) -> Result<(), SparseError> {
    if !NM_DTYPES.contains(&dtype) {
        return Err(SparseError::NmUnsupported(dtype));
    }
    if !BITMAP_GRANS.contains(&gran) {
        return Err(SparseError::Pattern(format!("granularity {gran} is not one of {BITMAP_GRANS:?}")));
    }
    if k == 0 || !k.is_multiple_of(BITMAP_BLOCK) {
        return Err(SparseError::PartialBlock { dtype, k });
    }
    if kept > k || !kept.is_multiple_of(gran) {
        return Err(SparseError::Pattern(format!(
            "{kept} kept elements per row is not a multiple of {gran} in 0..={k}"
        )));
    }
    Ok(())
}

/// A `[n, k]` weight matrix of `dtype` keeping `kept` elements per row, in the compact form of the
/// module docs. Fields are public for serialisation; anything built from untrusted data must pass
/// [`BitmapSparse::validate`] before a kernel sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapSparse {
    pub dtype: DType,
    pub gran: usize,
    pub n: usize,
    pub k: usize,
    pub kept: usize,
    pub data: Vec<u8>,
}

impl BitmapSparse {
    pub fn layout(&self) -> BitmapLayout {
        bitmap_layout(self.dtype, self.gran, self.k, self.kept)
    }

    /// Kept / all elements.
    pub fn density(&self) -> f64 {
        self.kept as f64 / self.k.max(1) as f64
    }

    /// The keep mask of block `b` of `row` (its 32 columns as bits, whatever the granularity).
    fn block_mask(&self, row: &[u8], b: usize) -> u32 {
        let l = self.layout();
        let m = &row[l.masks_at..];
        if self.gran == 1 {
            u32::from_le_bytes(m[4 * b..4 * b + 4].try_into().expect("4 bytes"))
        } else {
            let g = nibble(m, b) as u32;
            (0..4).filter(|i| g >> i & 1 == 1).map(|i| 0xFFu32 << (8 * i)).sum()
        }
    }

    /// Checks every invariant a kernel relies on: supported dtype and granularity, `k` a multiple of
    /// 32, `kept` a multiple of the granularity in `0..=k`, `data` exactly `n` rows of
    /// [`bitmap_row_bytes`], every row's masks keeping exactly `kept` elements, unused code bits,
    /// unused mask bits and padding zero (so equal matrices have equal bytes), and sizes that fit the
    /// i64 offsets of the generated code.
    pub fn validate(&self) -> Result<(), SparseError> {
        check(self.dtype, self.gran, self.k, self.kept)?;
        let bad = |what: String| SparseError::BitmapInconsistent { dtype: self.dtype, n: self.n, k: self.k, what };
        let l = self.layout();
        let want = self.n.checked_mul(l.row_bytes).filter(|&b| b <= i64::MAX as usize / 8);
        if want != Some(self.data.len()) {
            return Err(bad(format!(
                "{} data bytes, want n · row bytes = {} · {} for {} kept of {} {}",
                self.data.len(),
                self.n,
                l.row_bytes,
                self.kept,
                self.k,
                self.dtype
            )));
        }
        let nb = self.k / BITMAP_BLOCK;
        let code_bits = self.kept * nm_code_bits(self.dtype);
        let mask_bits = nb * (BITMAP_BLOCK / self.gran);
        let used = l.headers_at + nb * nm_header_bytes(self.dtype);
        for (r, row) in self.data.chunks_exact(l.row_bytes.max(1)).enumerate() {
            if !code_bits.is_multiple_of(8) && row[l.codes_bytes - 1] >> (code_bits % 8) != 0 {
                return Err(bad(format!("row {r}: unused code bits are not zero")));
            }
            if !mask_bits.is_multiple_of(8) && row[l.headers_at - 1] >> (mask_bits % 8) != 0 {
                return Err(bad(format!("row {r}: unused mask bits are not zero")));
            }
            if row[used..].iter().any(|&b| b != 0) {
                return Err(bad(format!("row {r}: padding bytes are not zero")));
            }
            let count: usize = (0..nb).map(|b| self.block_mask(row, b).count_ones() as usize).sum();
            if count != self.kept {
                return Err(bad(format!("row {r}: masks keep {count} elements, want {}", self.kept)));
            }
        }
        Ok(())
    }

    /// Keeps the elements `(row, column)` of the dense `[n, k]` matrix `bytes` (in `dtype`'s format)
    /// for which `keep` is true; `keep` must hold for exactly `kept` columns of every row, and with
    /// `gran` 8 for all or none of every run of 8.
    pub fn from_dense(
        dtype: DType,
        gran: usize,
        n: usize,
        k: usize,
        kept: usize,
        bytes: &[u8],
        mut keep: impl FnMut(usize, usize) -> bool,
    ) -> Result<BitmapSparse, SparseError> {
        check(dtype, gran, k, kept)?;
        let bad = |what: String| SparseError::BitmapInconsistent { dtype, n, k, what };
        let dense_row = dtype.row_bytes(k).expect("k is a multiple of 32");
        if Some(bytes.len()) != n.checked_mul(dense_row) {
            return Err(bad(format!("{} dense bytes, want {n} rows of {dense_row}", bytes.len())));
        }
        let l = bitmap_layout(dtype, gran, k, kept);
        let dense_bb = BITMAP_BLOCK / dtype.block_size() * dtype.type_size();
        let (hdr, code_bits) = (nm_header_bytes(dtype), nm_code_bits(dtype));
        let mut data = vec![0u8; n.checked_mul(l.row_bytes).ok_or_else(|| bad("too large".into()))?];
        for r in 0..n {
            let row = &mut data[r * l.row_bytes..][..l.row_bytes];
            let mut e = 0;
            for b in 0..k / BITMAP_BLOCK {
                let src = &bytes[r * dense_row + b * dense_bb..][..dense_bb];
                let mut mask = 0u32;
                for j in 0..BITMAP_BLOCK {
                    let c = b * BITMAP_BLOCK + j;
                    let kj = keep(r, c);
                    if gran > 1 && j % gran != 0 && kj != (mask >> (j / gran * gran) & 1 == 1) {
                        return Err(bad(format!(
                            "row {r}, column {c}: the run of {gran} is not all kept or all dropped"
                        )));
                    }
                    if !kj {
                        continue;
                    }
                    mask |= 1 << j;
                    if e == kept {
                        return Err(bad(format!("row {r}: more than {kept} kept")));
                    }
                    match dtype {
                        DType::Q4_0 | DType::Q4_1 => {
                            let qs = &src[hdr..];
                            let q = if j < 16 { qs[j] & 0x0F } else { qs[j - 16] >> 4 };
                            row[e / 2] |= q << (4 * (e % 2));
                        }
                        _ => {
                            let w = code_bits / 8;
                            row[e * w..(e + 1) * w].copy_from_slice(&src[hdr + j * w..hdr + (j + 1) * w]);
                        }
                    }
                    e += 1;
                }
                if gran == 1 {
                    row[l.masks_at + 4 * b..][..4].copy_from_slice(&mask.to_le_bytes());
                } else {
                    let g = (0..4).filter(|i| mask >> (8 * i) & 1 == 1).map(|i| 1u8 << i).sum::<u8>();
                    row[l.masks_at + b / 2] |= g << (4 * (b % 2));
                }
                row[l.headers_at + b * hdr..][..hdr].copy_from_slice(&src[..hdr]);
            }
            if e != kept {
                return Err(bad(format!("row {r}: {e} kept, want {kept}")));
            }
        }
        Ok(BitmapSparse { dtype, gran, n, k, kept, data })
    }

    /// Which elements of the dense `[n, k]` matrix are kept (`n · k` flags, row-major).
    pub fn mask(&self) -> Result<Vec<bool>, SparseError> {
        self.validate()?;
        let rb = self.layout().row_bytes;
        let mut out = vec![false; self.n * self.k];
        for r in 0..self.n {
            let row = &self.data[r * rb..][..rb];
            for b in 0..self.k / BITMAP_BLOCK {
                let m = self.block_mask(row, b);
                for j in 0..BITMAP_BLOCK {
                    out[r * self.k + b * BITMAP_BLOCK + j] = m >> j & 1 == 1;
                }
            }
        }
        Ok(out)
    }

    /// The dense matrix dequantized to f32 (`n · k`, dropped elements 0): kept elements are
    /// bit-identical to [`quant::dequantize`] of the dense block they came from.
    pub fn dequantize(&self) -> Result<Vec<f32>, SparseError> {
        let mask = self.mask()?;
        let l = self.layout();
        let hdr = nm_header_bytes(self.dtype);
        let h = |b: &[u8], at: usize| f16::from_le_bytes([b[at], b[at + 1]]).to_f32();
        let mut out = vec![0f32; self.n * self.k];
        for r in 0..self.n {
            let row = &self.data[r * l.row_bytes..][..l.row_bytes];
            let mut e = 0;
            for c in 0..self.k {
                if !mask[r * self.k + c] {
                    continue;
                }
                let hd = &row[l.headers_at + c / BITMAP_BLOCK * hdr..];
                out[r * self.k + c] = match self.dtype {
                    DType::Q4_0 => (nibble(row, e) as i32 - 8) as f32 * h(hd, 0),
                    DType::Q4_1 => nibble(row, e) as f32 * h(hd, 0) + h(hd, 2),
                    DType::Q8_0 => row[e] as i8 as f32 * h(hd, 0),
                    DType::F16 => h(row, 2 * e),
                    _ => f32::from_le_bytes(row[4 * e..4 * e + 4].try_into().expect("4 bytes")),
                };
                e += 1;
            }
        }
        Ok(out)
    }
}

/// The dense `[n, k]` matrix `bytes` of `dtype` with the elements `mask` drops set to exactly 0 in the
/// dtype's own layout (f32/f16 0.0, Q8_0 code 0, Q4_0 code 8, scales unchanged), or `None` for a dtype
/// that cannot hold an exact 0 in every block (Q4_1: `q·d + m` is 0 only if `−m/d` is a code).
pub fn zero_dropped(dtype: DType, k: usize, bytes: &[u8], mask: &[bool]) -> Option<Vec<u8>> {
    let mut out = bytes.to_vec();
    let (hdr, dense_bb) = (nm_header_bytes(dtype), BITMAP_BLOCK / dtype.block_size() * dtype.type_size());
    for (i, _) in mask.iter().enumerate().filter(|(_, &m)| !m) {
        let (r, c) = (i / k, i % k);
        let blk = (r * (k / BITMAP_BLOCK) + c / BITMAP_BLOCK) * dense_bb;
        let j = c % BITMAP_BLOCK;
        match dtype {
            DType::F32 | DType::F16 => {
                let sz = dtype.type_size();
                out[i * sz..(i + 1) * sz].fill(0);
            }
            DType::Q8_0 => out[blk + hdr + j] = 0,
            DType::Q4_0 => {
                let (byte, shift) = if j < 16 { (j, 0) } else { (j - 16, 4) };
                let b = &mut out[blk + hdr + byte];
                *b = (*b & !(0x0F << shift)) | (8 << shift);
            }
            _ => return None,
        }
    }
    Some(out)
}

/// Elements kept per row at `density` with granularity `gran`: `gran · round(density · k / gran)`.
pub fn bitmap_kept(gran: usize, k: usize, density: f64) -> usize {
    let units = k / gran.max(1);
    gran * ((density * units as f64).round() as usize).min(units)
}

/// Keeps in every row the [`bitmap_kept`] elements (`gran` 1) or runs of 8 (`gran` 8) with the largest
/// `|W_ij| · s_j` (a run: the L2 norm of those), `s_j` = 1 (magnitude) or the calibration's activation
/// norm of input channel j (Wanda, compared per output row as in the paper); ties go to the lower
/// column, NaN ranks last.
pub fn prune_bitmap(
    dtype: DType,
    gran: usize,
    n: usize,
    k: usize,
    bytes: &[u8],
    density: f64,
    scale: Option<&[f32]>,
) -> Result<BitmapSparse, SparseError> {
    if !(0.0..=1.0).contains(&density) {
        return Err(SparseError::Density(density));
    }
    let kept = bitmap_kept(gran, k, density);
    check(dtype, gran, k, kept)?;
    if let Some(s) = scale {
        if s.len() != k {
            return Err(SparseError::BitmapInconsistent {
                dtype,
                n,
                k,
                what: format!("{} activation norms, want one per input channel", s.len()),
            });
        }
    }
    let wf = dequantize_matrix(dtype, n, k, bytes)?;
    let units = k / gran;
    let mut keep = vec![false; n * k];
    let mut order: Vec<(f64, usize)> = Vec::with_capacity(units);
    for r in 0..n {
        order.clear();
        for u in 0..units {
            let score: f64 = (u * gran..(u + 1) * gran)
                .map(|j| {
                    let v = f64::from(wf[r * k + j]).abs() * scale.map_or(1.0, |s| f64::from(s[j]));
                    v * v
                })
                .sum();
            order.push((score, u));
        }
        rank_best_first(&mut order);
        for &(_, u) in &order[..kept / gran] {
            keep[r * k + u * gran..r * k + (u + 1) * gran].fill(true);
        }
    }
    BitmapSparse::from_dense(dtype, gran, n, k, kept, bytes, |r, j| keep[r * k + j])
}

#[cfg(test)]
mod tests {
    use super::super::tests::random;
    use super::*;
    use crate::quant;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    #[test]
    fn sizes_match_the_documented_numbers() {
        // Q4_1, k = 32: 50% → 8 code bytes, 4 mask, 4 header = 16; 70% (10 kept) → 5 + 4 + 4 = 13 → 16.
        assert_eq!(bitmap_row_bytes(DType::Q4_1, 1, 32, 16), 16);
        // k = 320 at 70%: 96 kept → 48 + 40 + 40 = 128 (12.8 per block).
        assert_eq!(bitmap_row_bytes(DType::Q4_1, 1, 320, 96), 128);
        // gran 8 at 50%, k = 64: 16 + 1 + 8 = 25 → 28.
        assert_eq!(bitmap_row_bytes(DType::Q4_1, 8, 64, 32), 28);
        // At least 8 bytes past the codes: f32 k = 32 all kept → 128 + 4 → 136.
        assert_eq!(bitmap_row_bytes(DType::F32, 1, 32, 32), 136);
        assert_eq!(bitmap_kept(1, 576, 0.5), 288);
        assert_eq!(bitmap_kept(8, 576, 0.3), 176, "round(0.3 · 72) = 22 runs");
    }

    /// Kept elements dequantize bit-identically to the dense matrix, dropped ones are 0, all kept is
    /// the dense matrix itself, for every dtype and granularity.
    #[test]
    fn from_dense_keeps_exact_values_and_zeroes_the_rest() {
        let mut rng = StdRng::seed_from_u64(31);
        for dtype in NM_DTYPES {
            for gran in BITMAP_GRANS {
                for density in [0.0, 0.2, 0.5, 0.9, 1.0] {
                    let (n, k) = (5, 96);
                    let (bytes, wf) = random(&mut rng, dtype, n, k);
                    let norms: Vec<f32> = (0..k).map(|_| rng.random_range(0.0f32..2.0)).collect();
                    let s = prune_bitmap(dtype, gran, n, k, &bytes, density, Some(&norms)).unwrap();
                    s.validate().unwrap();
                    assert_eq!(s.kept, bitmap_kept(gran, k, density));
                    let (got, mask) = (s.dequantize().unwrap(), s.mask().unwrap());
                    for r in 0..n {
                        assert_eq!(mask[r * k..(r + 1) * k].iter().filter(|&&m| m).count(), s.kept);
                    }
                    for i in 0..n * k {
                        let want = if mask[i] { wf[i].to_bits() } else { 0 };
                        assert_eq!(got[i].to_bits(), want, "{dtype} g{gran} d{density} [{i}]");
                        if gran == 8 {
                            assert_eq!(mask[i], mask[i / 8 * 8]);
                        }
                    }
                }
            }
        }
    }

    /// Magnitude: in every row, every kept element is at least as large as every dropped one (brute
    /// force); uniform Wanda norms are magnitude; a loud channel beats a large weight.
    #[test]
    fn pruning_keeps_the_largest_per_row() {
        let mut rng = StdRng::seed_from_u64(32);
        for dtype in NM_DTYPES {
            let (n, k) = (4, 128);
            let (bytes, wf) = random(&mut rng, dtype, n, k);
            for gran in BITMAP_GRANS {
                let s = prune_bitmap(dtype, gran, n, k, &bytes, 0.3, None).unwrap();
                let mask = s.mask().unwrap();
                let score = |r: usize, u: usize| -> f64 {
                    (u * gran..(u + 1) * gran).map(|j| f64::from(wf[r * k + j]).powi(2)).sum()
                };
                for r in 0..n {
                    let units = (0..k / gran).map(|u| (score(r, u), mask[r * k + u * gran]));
                    let min_kept = units.clone().filter(|u| u.1).map(|u| u.0).fold(f64::INFINITY, f64::min);
                    let max_dropped = units.filter(|u| !u.1).map(|u| u.0).fold(0.0, f64::max);
                    assert!(min_kept >= max_dropped, "{dtype} g{gran} row {r}");
                }
                let ones = vec![3.0f32; k];
                assert_eq!(prune_bitmap(dtype, gran, n, k, &bytes, 0.3, Some(&ones)).unwrap(), s);
            }
        }
        let mut w = [0f32; 32];
        w[..4].copy_from_slice(&[1.0, 1.0, 0.1, 0.1]);
        let bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mag = prune_bitmap(DType::F32, 1, 1, 32, &bytes, 2.0 / 32.0, None).unwrap().dequantize().unwrap();
        assert_eq!(&mag[..4], &[1.0, 1.0, 0.0, 0.0]);
        let mut norms = vec![1.0f32; 32];
        norms[2..4].copy_from_slice(&[100.0, 100.0]);
        let wanda = prune_bitmap(DType::F32, 1, 1, 32, &bytes, 2.0 / 32.0, Some(&norms)).unwrap();
        assert_eq!(&wanda.dequantize().unwrap()[..4], &[0.0, 0.0, 0.1, 0.1]);
        let err = prune_bitmap(DType::F32, 1, 1, 32, &bytes, 0.5, Some(&norms[1..])).unwrap_err();
        assert!(err.to_string().contains("activation norms"), "{err}");
        assert!(prune_bitmap(DType::F32, 1, 1, 32, &bytes, 1.5, None).is_err());
        assert!(prune_bitmap(DType::Q4K, 1, 1, 256, &[0; 144], 0.5, None).is_err());
        assert!(prune_bitmap(DType::F32, 4, 1, 32, &bytes, 0.5, None).unwrap_err().to_string().contains("granularity"));
    }

    /// The zeroed dense layout dequantizes to exactly the compact form's matrix; Q4_1 has none.
    #[test]
    fn zero_dropped_equals_the_compact_form() {
        let mut rng = StdRng::seed_from_u64(35);
        for dtype in NM_DTYPES {
            let (n, k) = (3, 64);
            let (bytes, _) = random(&mut rng, dtype, n, k);
            let s = prune_bitmap(dtype, 1, n, k, &bytes, 0.4, None).unwrap();
            let Some(dense) = zero_dropped(dtype, k, &bytes, &s.mask().unwrap()) else {
                assert_eq!(dtype, DType::Q4_1);
                continue;
            };
            let mut got = vec![0f32; n * k];
            quant::dequantize(dtype, &dense, &mut got).unwrap();
            let want = s.dequantize().unwrap();
            for i in 0..n * k {
                // Q4_0's exact zero may be -0.0.
                assert!(got[i] == want[i], "{dtype} [{i}]: {} vs {}", got[i], want[i]);
            }
        }
    }

    #[test]
    fn inconsistent_forms_are_errors() {
        let mut rng = StdRng::seed_from_u64(33);
        let (bytes, _) = random(&mut rng, DType::Q4_1, 2, 64);
        let good = prune_bitmap(DType::Q4_1, 1, 2, 64, &bytes, 30.0 / 64.0, None).unwrap();
        assert_eq!(good.layout().row_bytes, 32, "31 bytes and one of padding");
        good.validate().unwrap();
        let l = good.layout();
        let rb = l.row_bytes;
        type Mutation = Box<dyn Fn(&mut BitmapSparse)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("data bytes", Box::new(|s| s.data.truncate(s.data.len() - 1))),
            ("data bytes", Box::new(|s| s.n = 3)),
            ("data bytes", Box::new(|s| s.kept = 8)),
            ("padding", Box::new(move |s| s.data[rb - 1] = 1)),
            // One mask bit more or less: 31 or 33 kept in row 0.
            ("masks keep 3", Box::new(move |s| s.data[l.masks_at] ^= 1)),
            ("not a positive multiple", Box::new(|s| s.k = 48)),
            ("not supported", Box::new(|s| s.dtype = DType::Q5_0)),
            ("granularity", Box::new(|s| s.gran = 2)),
            ("not a multiple of 8", Box::new(|s| (s.gran, s.kept) = (8, 36))),
        ];
        for (want, mutate) in cases {
            let mut s = good.clone();
            mutate(&mut s);
            let err = s.validate().expect_err(want).to_string();
            assert!(err.contains(want), "want {want:?} in {err:?}");
            assert!(s.dequantize().is_err());
        }
        // Odd kept count of 4-bit codes: the last code byte's high nibble must be zero.
        let (b, _) = random(&mut rng, DType::Q4_0, 1, 32);
        let mut s = prune_bitmap(DType::Q4_0, 1, 1, 32, &b, 3.0 / 32.0, None).unwrap();
        s.data[1] |= 0xF0;
        assert!(s.validate().unwrap_err().to_string().contains("unused code bits"));
        // A keep set with the wrong count, or a split run of 8.
        let (b, _) = random(&mut rng, DType::F16, 1, 32);
        let err = BitmapSparse::from_dense(DType::F16, 1, 1, 32, 4, &b, |_, j| j < 5).unwrap_err();
        assert!(err.to_string().contains("more than 4"), "{err}");
        let err = BitmapSparse::from_dense(DType::F16, 8, 1, 32, 8, &b, |_, j| (4..12).contains(&j)).unwrap_err();
        assert!(err.to_string().contains("run of 8"), "{err}");
    }

    /// Hostile input: random byte flips, truncations and field changes of valid forms. Whatever
    /// `validate` accepts dequantizes without panicking to at most `kept` non-zeros per row.
    #[test]
    fn hostile_forms_are_rejected_or_safe() {
        let mut rng = StdRng::seed_from_u64(34);
        let mut accepted = 0;
        for _ in 0..800 {
            let dtype = NM_DTYPES[rng.random_range(0..NM_DTYPES.len())];
            let gran = BITMAP_GRANS[rng.random_range(0..2)];
            let (n, k) = (rng.random_range(1..4), 32 * rng.random_range(1..4));
            let (bytes, _) = random(&mut rng, dtype, n, k);
            let mut s = prune_bitmap(dtype, gran, n, k, &bytes, rng.random_range(0.0..1.0), None).unwrap();
            match rng.random_range(0..6) {
                0 | 1 => {
                    let i = rng.random_range(0..s.data.len());
                    s.data[i] ^= 1 << rng.random_range(0..8);
                }
                2 => s.data.truncate(rng.random_range(0..s.data.len())),
                3 => s.n = rng.random_range(0..6),
                4 => s.k = rng.random_range(0..200),
                _ => (s.gran, s.kept) = (rng.random_range(0..10), rng.random_range(0..100)),
            }
            if s.validate().is_ok() {
                accepted += 1;
                let d = s.dequantize().unwrap();
                assert_eq!(d.len(), s.n * s.k);
                for row in d.chunks(s.k.max(1)) {
                    assert!(row.iter().filter(|v| v.to_bits() != 0).count() <= s.kept);
                }
            } else {
                assert!(s.dequantize().is_err());
            }
        }
        assert!(accepted > 0, "some mutations (e.g. a flipped code bit) keep the form valid");
    }
}
