//! Block-sparse weights: a `[n, k]` weight matrix pruned at the granularity of whole 32-element blocks
//! along `k`, stored as CSR over blocks, and the pruning functions that produce it.
//!
//! The unit is the quantization block (32 elements for Q4_0/Q4_1/Q5_0/Q5_1/Q8_0; 32 consecutive elements
//! for the plain F32/F16/BF16): each block dequantizes on its own, so a kept block's bytes are stored
//! unchanged and a kernel that walks only kept blocks reads only their bytes. K-quants (256-element
//! super-blocks) are not supported: a 256-wide unit is too coarse to prune usefully.
//!
//! Layout ([`BlockSparse`]): `row_ptr` (`n + 1` u32, non-decreasing, from 0 to the number of kept
//! blocks) gives row `r`'s kept blocks as positions `row_ptr[r]..row_ptr[r + 1]`; `col_idx[p]` is the
//! block index along `k` (`0..k / 32`, strictly increasing within a row) of position `p`, whose bytes are
//! `data[p * block_bytes..(p + 1) * block_bytes]`. Dropped blocks are zeros.
//!
//! Pruning keeps, in every row, the same number of blocks (`round(density · k / 32)`): per-row rather
//! than global selection, so every output keeps the same share of its terms (as Wanda's per-output
//! comparison group) and rows split over threads carry equal work. Blocks are ranked by L2 norm of their
//! dequantized values ([`prune_magnitude`]) or, Wanda-style, by the L2 norm of `|W_ij| · ‖x_j‖`
//! ([`prune_wanda`]); ties go to the lower block index.

use crate::quant::{self, QuantError};
use crate::DType;

pub mod bitmap;
pub mod nm;
pub use bitmap::{prune_bitmap, BitmapSparse};
pub use nm::{prune_nm, NmPattern, NmSparse, NM_DTYPES};

/// Elements per sparse block (along `k`).
pub const SPARSE_BLOCK: usize = 32;

/// Weight dtypes a [`BlockSparse`] can hold.
pub const SPARSE_DTYPES: [DType; 8] =
    [DType::F32, DType::F16, DType::BF16, DType::Q4_0, DType::Q4_1, DType::Q5_0, DType::Q5_1, DType::Q8_0];

#[derive(Debug, thiserror::Error)]
pub enum SparseError {
    #[error("block-sparse weights of dtype {0} are not supported (only {SPARSE_DTYPES:?})")]
    Unsupported(DType),
    #[error("block-sparse {dtype}: k = {k} is not a positive multiple of {SPARSE_BLOCK}")]
    PartialBlock { dtype: DType, k: usize },
    #[error("block-sparse {dtype} [{n}, {k}]: {what}")]
    Inconsistent { dtype: DType, n: usize, k: usize, what: String },
    #[error("N:M-sparse weights of dtype {0} are not supported (only {NM_DTYPES:?})")]
    NmUnsupported(DType),
    #[error("{0}")]
    Pattern(String),
    #[error("N:M-sparse {dtype} [{n}, {k}]: {what}")]
    NmInconsistent { dtype: DType, n: usize, k: usize, what: String },
    #[error("bitmap-sparse {dtype} [{n}, {k}]: {what}")]
    BitmapInconsistent { dtype: DType, n: usize, k: usize, what: String },
    #[error("density {0} is not in 0..=1")]
    Density(f64),
    #[error("{0}")]
    Quant(#[from] QuantError),
}

/// A `[n, k]` weight matrix of `dtype` with whole 32-element blocks dropped, as CSR over blocks (see
/// the module docs). Fields are public for serialisation; anything built from untrusted data must pass
/// [`BlockSparse::validate`] before a kernel sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockSparse {
    pub dtype: DType,
    pub n: usize,
    pub k: usize,
    pub row_ptr: Vec<u32>,
    pub col_idx: Vec<u32>,
    pub data: Vec<u8>,
}

/// Bytes of one 32-element block of `dtype`.
pub fn block_bytes(dtype: DType) -> usize {
    SPARSE_BLOCK / dtype.block_size() * dtype.type_size()
}

fn check_shape(dtype: DType, k: usize) -> Result<(), SparseError> {
    if !SPARSE_DTYPES.contains(&dtype) {
        return Err(SparseError::Unsupported(dtype));
    }
    if k == 0 || !k.is_multiple_of(SPARSE_BLOCK) {
        return Err(SparseError::PartialBlock { dtype, k });
    }
    Ok(())
}

impl BlockSparse {
    /// Blocks per row of the dense matrix.
    pub fn blocks_per_row(&self) -> usize {
        self.k / SPARSE_BLOCK
    }

    /// Kept blocks.
    pub fn nnz_blocks(&self) -> usize {
        self.col_idx.len()
    }

    /// Kept blocks / all blocks (1 for an empty matrix).
    pub fn density(&self) -> f64 {
        let all = self.n * self.blocks_per_row();
        if all == 0 {
            1.0
        } else {
            self.nnz_blocks() as f64 / all as f64
        }
    }

    /// Checks every invariant a kernel relies on: supported dtype, `k` a multiple of 32, `row_ptr` of
    /// `n + 1` non-decreasing entries from 0 to `col_idx.len()`, block indices in range and strictly
    /// increasing within each row, `data` exactly the kept blocks' bytes, and sizes that fit the u32/i64
    /// offsets of the generated code.
    pub fn validate(&self) -> Result<(), SparseError> {
        check_shape(self.dtype, self.k)?;
        let bad = |what: String| SparseError::Inconsistent { dtype: self.dtype, n: self.n, k: self.k, what };
        if self.row_ptr.len() != self.n + 1 {
            return Err(bad(format!("row_ptr has {} entries, want n + 1 = {}", self.row_ptr.len(), self.n + 1)));
        }
        if self.row_ptr[0] != 0 {
            return Err(bad(format!("row_ptr[0] = {}, want 0", self.row_ptr[0])));
        }
        let nnz = self.col_idx.len();
        if self.row_ptr[self.n] as usize != nnz {
            return Err(bad(format!("row_ptr[n] = {} but there are {nnz} block indices", self.row_ptr[self.n])));
        }
        let bpr = self.blocks_per_row();
        if bpr > u32::MAX as usize || nnz.checked_mul(block_bytes(self.dtype)).is_none_or(|b| b > i64::MAX as usize) {
            return Err(bad("too large".into()));
        }
        for r in 0..self.n {
            let (s, e) = (self.row_ptr[r] as usize, self.row_ptr[r + 1] as usize);
            if s > e {
                return Err(bad(format!("row_ptr decreases at row {r}: {s} > {e}")));
            }
            if e > nnz {
                return Err(bad(format!("row_ptr[{}] = {e} is past the {nnz} block indices", r + 1)));
            }
            if e - s > bpr {
                return Err(bad(format!("row {r} keeps {} blocks of {bpr}", e - s)));
            }
            for p in s..e {
                let c = self.col_idx[p] as usize;
                if c >= bpr {
                    return Err(bad(format!("row {r}: block index {c} at position {p} is out of range 0..{bpr}")));
                }
                if p > s && self.col_idx[p - 1] as usize >= c {
                    return Err(bad(format!("row {r}: block indices not strictly increasing at position {p}")));
                }
            }
        }
        let want = nnz * block_bytes(self.dtype);
        if self.data.len() != want {
            return Err(bad(format!("{} data bytes, want {want} for {nnz} kept blocks", self.data.len())));
        }
        Ok(())
    }

    /// Keeps the blocks `(row, block)` for which `keep` is true of the dense `[n, k]` matrix `bytes`.
    pub fn from_dense(
        dtype: DType,
        n: usize,
        k: usize,
        bytes: &[u8],
        mut keep: impl FnMut(usize, usize) -> bool,
    ) -> Result<BlockSparse, SparseError> {
        check_shape(dtype, k)?;
        let row_bytes = dtype.row_bytes(k).expect("k is a multiple of 32");
        if Some(bytes.len()) != n.checked_mul(row_bytes) {
            return Err(SparseError::Inconsistent {
                dtype,
                n,
                k,
                what: format!("{} dense bytes, want {n} rows of {row_bytes}", bytes.len()),
            });
        }
        let bb = block_bytes(dtype);
        let mut out = BlockSparse { dtype, n, k, row_ptr: vec![0], col_idx: Vec::new(), data: Vec::new() };
        for r in 0..n {
            for b in 0..k / SPARSE_BLOCK {
                if keep(r, b) {
                    out.col_idx.push(b as u32);
                    let at = r * row_bytes + b * bb;
                    out.data.extend_from_slice(&bytes[at..at + bb]);
                }
            }
            let len = u32::try_from(out.col_idx.len()).map_err(|_| SparseError::Inconsistent {
                dtype,
                n,
                k,
                what: "more than 2^32 kept blocks".into(),
            })?;
            out.row_ptr.push(len);
        }
        Ok(out)
    }

    /// The dense matrix in `dtype`'s storage format, dropped blocks as zero bytes (which dequantize to
    /// ±0.0 in every supported format: a zero scale, or a zero float).
    pub fn to_dense(&self) -> Result<Vec<u8>, SparseError> {
        self.validate()?;
        let (bb, row_bytes) = (block_bytes(self.dtype), self.dtype.row_bytes(self.k).expect("validated"));
        let mut out = vec![0u8; self.n * row_bytes];
        for r in 0..self.n {
            for p in self.row_ptr[r] as usize..self.row_ptr[r + 1] as usize {
                let at = r * row_bytes + self.col_idx[p] as usize * bb;
                out[at..at + bb].copy_from_slice(&self.data[p * bb..(p + 1) * bb]);
            }
        }
        Ok(out)
    }

    /// The dense matrix dequantized to f32 (`n · k`, dropped blocks 0).
    pub fn dequantize(&self) -> Result<Vec<f32>, SparseError> {
        let dense = self.to_dense()?;
        let mut out = vec![0f32; self.n * self.k];
        quant::dequantize(self.dtype, &dense, &mut out)?;
        Ok(out)
    }
}

/// Keeps in every row the `round(density · k / 32)` blocks of largest L2 norm (of their dequantized
/// values). `bytes` is the dense `[n, k]` matrix in `dtype`'s format (F32 for plain f32 weights).
pub fn prune_magnitude(
    dtype: DType,
    n: usize,
    k: usize,
    bytes: &[u8],
    density: f64,
) -> Result<BlockSparse, SparseError> {
    prune_by(dtype, n, k, bytes, density, |_| 1.0)
}

/// Wanda: keeps in every row the `round(density · k / 32)` blocks with the largest
/// `‖(|W_ij| · ‖x_j‖)_j‖₂` over the block's columns `j`, where `act_norms[j] = ‖x_j‖₂` is the L2 norm
/// of input channel `j` over calibration activations (`k` entries).
pub fn prune_wanda(
    dtype: DType,
    n: usize,
    k: usize,
    bytes: &[u8],
    act_norms: &[f32],
    density: f64,
) -> Result<BlockSparse, SparseError> {
    if act_norms.len() != k {
        return Err(SparseError::Inconsistent {
            dtype,
            n,
            k,
            what: format!("{} activation norms, want one per input channel", act_norms.len()),
        });
    }
    prune_by(dtype, n, k, bytes, density, |j| f64::from(act_norms[j]))
}

/// `Wᵀ` (`[k, n]`, quantized along `n`) of the `[n, k]` matrix `bytes` of `dtype`: the layout of the
/// active-channel kernels, in which an input channel is one contiguous row. Quantized formats are
/// dequantized and quantized again along the other axis, which changes the rounding error (plain f32
/// is transposed exactly). `n` must be a multiple of 32.
pub fn transpose_requantize(dtype: DType, n: usize, k: usize, bytes: &[u8]) -> Result<Vec<u8>, SparseError> {
    check_shape(dtype, n)?;
    let wf = dequantize_matrix(dtype, n, k, bytes)?;
    let mut t = vec![0f32; n * k];
    for r in 0..n {
        for j in 0..k {
            t[j * n + r] = wf[r * k + j];
        }
    }
    Ok(quant::quantize(dtype, &t)?)
}

/// The `n × k` matrix `bytes` of `dtype`, dequantized (for ranking weights by magnitude).
pub(crate) fn dequantize_matrix(dtype: DType, n: usize, k: usize, bytes: &[u8]) -> Result<Vec<f32>, SparseError> {
    let mut wf = vec![0f32; n.checked_mul(k).ok_or(QuantError::TooLarge { dtype, n: usize::MAX })?];
    quant::dequantize(dtype, bytes, &mut wf)?;
    Ok(wf)
}

/// Sorts `(score, index)` pairs best first: by decreasing score, ties by increasing index; NaN scores
/// (from NaN weights) rank last.
pub(crate) fn rank_best_first(order: &mut [(f64, usize)]) {
    for e in order.iter_mut() {
        if e.0.is_nan() {
            e.0 = f64::NEG_INFINITY;
        }
    }
    order.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
}

/// Per row, the blocks ranked by `Σ_j (w_j · scale(j))²` (descending, ties to the lower index), the
/// first `round(density · blocks)` kept.
fn prune_by(
    dtype: DType,
    n: usize,
    k: usize,
    bytes: &[u8],
    density: f64,
    scale: impl Fn(usize) -> f64,
) -> Result<BlockSparse, SparseError> {
    check_shape(dtype, k)?;
    if !(0.0..=1.0).contains(&density) {
        return Err(SparseError::Density(density));
    }
    let wf = dequantize_matrix(dtype, n, k, bytes)?;
    let bpr = k / SPARSE_BLOCK;
    let keep_per_row = ((density * bpr as f64).round() as usize).min(bpr);
    let mut kept = vec![false; n * bpr];
    let mut order: Vec<(f64, usize)> = Vec::with_capacity(bpr);
    for r in 0..n {
        order.clear();
        for b in 0..bpr {
            let score: f64 = (b * SPARSE_BLOCK..(b + 1) * SPARSE_BLOCK)
                .map(|j| {
                    let v = f64::from(wf[r * k + j]) * scale(j);
                    v * v
                })
                .sum();
            order.push((score, b));
        }
        rank_best_first(&mut order);
        for &(_, b) in &order[..keep_per_row] {
            kept[r * bpr + b] = true;
        }
    }
    BlockSparse::from_dense(dtype, n, k, bytes, |r, b| kept[r * bpr + b])
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// A random `n × k` matrix of `dtype` (values uniform in [-1, 1) before quantizing): its bytes and
    /// their dequantized values.
    pub(crate) fn random(rng: &mut StdRng, dtype: DType, n: usize, k: usize) -> (Vec<u8>, Vec<f32>) {
        let vals: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let bytes = quant::quantize(dtype, &vals).unwrap();
        let mut wf = vec![0f32; n * k];
        quant::dequantize(dtype, &bytes, &mut wf).unwrap();
        (bytes, wf)
    }

    /// Every block's dequantized values: kept ones equal the dense ones, dropped ones are zero.
    #[test]
    fn from_dense_round_trips_kept_blocks_and_zeroes_the_rest() {
        let mut rng = StdRng::seed_from_u64(5);
        for dtype in SPARSE_DTYPES {
            let (n, k) = (7, 96);
            let (bytes, wf) = random(&mut rng, dtype, n, k);
            let mask: Vec<bool> = (0..n * 3).map(|_| rng.random_bool(0.5)).collect();
            let s = BlockSparse::from_dense(dtype, n, k, &bytes, |r, b| mask[r * 3 + b]).unwrap();
            s.validate().unwrap();
            assert_eq!(s.nnz_blocks(), mask.iter().filter(|&&m| m).count());
            let got = s.dequantize().unwrap();
            for r in 0..n {
                for j in 0..k {
                    let got = got[r * k + j];
                    if mask[r * 3 + j / 32] {
                        assert_eq!(got.to_bits(), wf[r * k + j].to_bits(), "{dtype} [{r}][{j}]");
                    } else {
                        // Q4_0's zero block is (0 - 8) · 0 = -0.0.
                        assert_eq!(got, 0.0, "{dtype} [{r}][{j}]");
                    }
                }
            }
            // Everything kept is the dense matrix itself.
            let all = BlockSparse::from_dense(dtype, n, k, &bytes, |_, _| true).unwrap();
            assert_eq!(all.to_dense().unwrap(), bytes, "{dtype}");
            assert_eq!(all.density(), 1.0);
        }
    }

    #[test]
    fn inconsistent_formats_are_errors() {
        let mut rng = StdRng::seed_from_u64(6);
        let (bytes, _) = random(&mut rng, DType::Q4_1, 3, 64);
        let good = BlockSparse::from_dense(DType::Q4_1, 3, 64, &bytes, |r, b| (r + b) % 2 == 0).unwrap();
        good.validate().unwrap();
        type Mutation = Box<dyn Fn(&mut BlockSparse)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("row_ptr has", Box::new(|s| s.row_ptr.pop().map(drop).unwrap())),
            ("row_ptr[0]", Box::new(|s| s.row_ptr[0] = 1)),
            ("row_ptr[n]", Box::new(|s| s.row_ptr[3] += 1)),
            ("decreases", Box::new(|s| s.row_ptr[2] = 0)),
            ("past the", Box::new(|s| s.row_ptr[1] = 9)),
            ("out of range", Box::new(|s| s.col_idx[0] = 2)),
            ("out of range", Box::new(|s| s.col_idx[1] = u32::MAX)),
            ("strictly increasing", Box::new(|s| (s.row_ptr, s.col_idx) = (vec![0, 2, 2, 3], vec![1, 1, 0]))),
            ("data bytes", Box::new(|s| s.data.pop().map(drop).unwrap())),
            ("not a positive multiple", Box::new(|s| s.k = 48)),
            ("not a positive multiple", Box::new(|s| s.k = 0)),
            ("not supported", Box::new(|s| s.dtype = DType::Q4K)),
        ];
        for (want, mutate) in cases {
            let mut s = good.clone();
            mutate(&mut s);
            let err = s.validate().unwrap_err().to_string();
            assert!(err.contains(want), "want {want:?} in {err:?}");
            assert!(s.to_dense().is_err() && s.dequantize().is_err());
        }
        let err = BlockSparse::from_dense(DType::Q4_1, 3, 64, &bytes[1..], |_, _| true).unwrap_err();
        assert!(err.to_string().contains("dense bytes"), "{err}");
        assert!(BlockSparse::from_dense(DType::Q8_0, 1, 40, &[0; 40], |_, _| true).is_err());
    }

    /// The kept blocks are exactly the top-`round(d · blocks)` by L2 norm in every row, checked against
    /// an independent brute-force selection (every kept block at least every dropped block's norm).
    #[test]
    fn magnitude_pruning_keeps_the_largest_blocks_per_row() {
        let mut rng = StdRng::seed_from_u64(7);
        for dtype in [DType::F32, DType::Q4_1, DType::Q8_0, DType::F16] {
            let (n, k) = (9, 320);
            let (bytes, wf) = random(&mut rng, dtype, n, k);
            for density in [0.0, 0.1, 0.25, 0.5, 0.9, 1.0] {
                let s = prune_magnitude(dtype, n, k, &bytes, density).unwrap();
                s.validate().unwrap();
                let want_keep = (density * 10.0_f64).round() as usize;
                let norm = |r: usize, b: usize| -> f64 {
                    wf[r * k + b * 32..r * k + b * 32 + 32].iter().map(|&v| f64::from(v).powi(2)).sum()
                };
                for r in 0..n {
                    let cols: Vec<usize> = s.col_idx[s.row_ptr[r] as usize..s.row_ptr[r + 1] as usize]
                        .iter()
                        .map(|&c| c as usize)
                        .collect();
                    assert_eq!(cols.len(), want_keep, "{dtype} d={density} row {r}");
                    let min_kept = cols.iter().map(|&b| norm(r, b)).fold(f64::INFINITY, f64::min);
                    let max_dropped =
                        (0..10).filter(|b| !cols.contains(b)).map(|b| norm(r, b)).fold(f64::NEG_INFINITY, f64::max);
                    assert!(min_kept >= max_dropped, "{dtype} d={density} row {r}: {min_kept} < {max_dropped}");
                }
                assert!((s.density() - want_keep as f64 / 10.0).abs() < 1e-12);
            }
        }
        assert!(matches!(prune_magnitude(DType::F32, 1, 32, &[0; 128], 1.5), Err(SparseError::Density(_))));
        assert!(prune_magnitude(DType::F32, 1, 32, &[0; 128], f64::NAN).is_err());
    }

    /// Wanda weighs each column by its activation norm: a block of small weights on a loud channel beats
    /// a block of large weights on a quiet one, which plain magnitude pruning would drop.
    #[test]
    fn wanda_pruning_weighs_columns_by_activation_norm() {
        let (n, k) = (2, 64);
        // Row 0: block 0 weights 1.0, block 1 weights 0.1; row 1 the other way round.
        let mut w = vec![0f32; n * k];
        for j in 0..k {
            w[j] = if j < 32 { 1.0 } else { 0.1 };
            w[k + j] = if j < 32 { 0.1 } else { 1.0 };
        }
        let bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mag = prune_magnitude(DType::F32, n, k, &bytes, 0.5).unwrap();
        assert_eq!(mag.col_idx, vec![0, 1]);
        // Channels 32.. are 100x louder: 0.1 · 100 > 1.0 · 1.
        let norms: Vec<f32> = (0..k).map(|j| if j < 32 { 1.0 } else { 100.0 }).collect();
        let wanda = prune_wanda(DType::F32, n, k, &bytes, &norms, 0.5).unwrap();
        assert_eq!(wanda.col_idx, vec![1, 1]);
        assert_eq!(wanda.row_ptr, vec![0, 1, 2]);
        // Uniform norms rank as magnitude does, on random quantized weights too.
        let mut rng = StdRng::seed_from_u64(8);
        let (bytes, _) = random(&mut rng, DType::Q4_0, 5, 256);
        let ones = vec![3.0f32; 256];
        assert_eq!(
            prune_wanda(DType::Q4_0, 5, 256, &bytes, &ones, 0.25).unwrap(),
            prune_magnitude(DType::Q4_0, 5, 256, &bytes, 0.25).unwrap()
        );
        let err = prune_wanda(DType::Q4_0, 5, 256, &bytes, &ones[1..], 0.25).unwrap_err();
        assert!(err.to_string().contains("activation norms"), "{err}");
    }

    #[test]
    fn transpose_requantize_transposes() {
        let mut rng = StdRng::seed_from_u64(9);
        let (n, k) = (64, 3);
        let vals: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let t = transpose_requantize(DType::F32, n, k, &bytes).unwrap();
        for r in 0..n {
            for j in 0..k {
                let got = f32::from_le_bytes(t[4 * (j * n + r)..4 * (j * n + r) + 4].try_into().unwrap());
                assert_eq!(got, vals[r * k + j], "[{r}][{j}]");
            }
        }
        // Q8_0: the same values up to the rounding of the new blocks (half a step, d ≤ 1/127).
        let (bytes, wf) = random(&mut rng, DType::Q8_0, 64, 32);
        let t = transpose_requantize(DType::Q8_0, 64, 32, &bytes).unwrap();
        let mut tf = vec![0f32; 64 * 32];
        quant::dequantize(DType::Q8_0, &t, &mut tf).unwrap();
        for r in 0..64 {
            for j in 0..32 {
                assert!((tf[j * 64 + r] - wf[r * 32 + j]).abs() <= 1.0 / 127.0 + 1e-6, "[{r}][{j}]");
            }
        }
        assert!(transpose_requantize(DType::Q8_0, 48, 32, &[0; 48 * 34]).is_err(), "n not whole blocks");
    }
}
