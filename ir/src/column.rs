//! The column-major ("exact transposed") block formats `q4_0c`, `q4_1c` and `q8_0c`: `Wᵀ [k, n]` of a
//! row-major `[n, k]` Q4_0 / Q4_1 / Q8_0 weight `W`, keeping `W`'s own codes and per-(row, 32-block)
//! scales (nothing is requantized, so every element dequantizes to exactly the f32 that `W`'s element
//! does), laid out for the active-channel GEMV `y = Σ_{j ∈ S} x_j · W[:, j]`: input channel `j`'s
//! codes are one contiguous row, so bytes read grow with the active channels, not with `k`.
//!
//! Layout of a `[k, n]` tensor (`k` and `n` multiples of 32; `b = j / 32` is the block of channel `j`):
//!
//! ```text
//! codes   k rows, row j = the codes q[j, 0..n] of channel j:
//!           4-bit: n/2 bytes; output group g (32 outputs) is bytes 16g..16g+16, byte i holding
//!                  output 32g+i in its low nibble and 32g+16+i in its high nibble (ggml's order)
//!           8-bit: n signed bytes
//! d       [k/32, n] f16: d[b, r] = the scale of W's block (r, b)
//! m       [k/32, n] f16 (q4_1c only): the min of W's block (r, b)
//! ```
//!
//! Element `[j, r]` is `q·d + m` (q4_1c), `(q − 8)·d` (q4_0c) or `q·d` (q8_0c), as the row-major
//! block decodes it (`quant.rs`). The bytes per 32 elements equal the row-major format's (codes 16 or
//! 32, scales 2 or 4), so a `[k, n]` column tensor and the `[n, k]` weight it came from are the same size.
//! The scale tables are `[k/32, n]` (block-major) so that a kernel loads the scales of 32 consecutive
//! outputs of one active block contiguously.
//!
//! **Gathered** (`q4_0g`, `q4_1g`, `q8_0g`): some channels of a column tensor, for a weight whose input
//! channels were pruned (structured pruning's `W_down` / `W_o`). Kept channels stay in ascending order,
//! so the ones from one source block are one run; only the source blocks with a kept channel keep
//! their scales. A `[k', n]` gathered tensor (any `k' ≥ 1`, `n` a multiple of 32) is
//!
//! ```text
//! header  u32 nb, then u32 bptr[0..=nb]: kept channels bptr[q]..bptr[q+1] share source block run q
//! codes   k' rows, row j' = the column format's code row of the j'-th kept channel
//! scales  nb rows of (1 or 2)·n f16: row q = d[b_q, 0..n] of the run's source block b_q, then
//!         (q4_1g) m[b_q, 0..n]
//! ```
//!
//! so every element decodes with the same f32 operations as the source weight's element (exact), and
//! the bytes are `4·(nb + 2) + k'·code_row + nb·(scale bytes per row)`: the kept channels' codes, plus
//! the scales of the touched blocks. A block's `d` and `m` rows are adjacent so that the kernel reads
//! one block's scales from one place (`codegen::kernels::colactive` with a gathered spec).

use crate::quant::QuantError;
use crate::DType;
use half::f16;

/// Why a column-major weight cannot be made or read.
#[derive(Debug, thiserror::Error)]
pub enum ColumnError {
    #[error("no column-major format for {0} (only q4_0, q4_1, q8_0)")]
    Unsupported(DType),
    #[error("{dtype} [{rows}, {cols}]: {what}")]
    Shape { dtype: DType, rows: usize, cols: usize, what: String },
    #[error("{0}")]
    Quant(#[from] QuantError),
}

/// Bytes of the codes of one channel row of `n` outputs.
pub fn code_row_bytes(dtype: DType, n: usize) -> usize {
    match dtype.column_base() {
        Some(DType::Q8_0) => n,
        _ => n / 2,
    }
}

/// Scale tables (`d`, and `m` for q4_1c) of a column tensor.
pub fn scale_tables(dtype: DType) -> usize {
    if dtype == DType::Q4_1C {
        2
    } else {
        1
    }
}

/// Byte offsets of the `d` and `m` tables in a `[k, n]` column tensor of `dtype`.
pub fn table_offsets(dtype: DType, k: usize, n: usize) -> (usize, usize) {
    let d = k * code_row_bytes(dtype, n);
    (d, d + (k / 32) * n * 2)
}

/// Expected share of a column tensor's bytes that one active-channel product reads when each channel
/// is active with probability `active` independently: the codes of the active channels, and the
/// scales of the 32-channel blocks with at least one active channel (`1 − (1 − active)^32`).
pub fn read_share(dtype: DType, active: f64) -> f64 {
    let active = active.clamp(0.0, 1.0);
    let scales = (2 * scale_tables(dtype)) as f64 / dtype.type_size() as f64;
    (1.0 - scales) * active + scales * (1.0 - (1.0 - active).powi(32))
}

fn check(dtype: DType, k: usize, n: usize, len: usize) -> Result<(), ColumnError> {
    let shape = |what: String| ColumnError::Shape { dtype, rows: k, cols: n, what };
    if k == 0 || n == 0 || !k.is_multiple_of(32) || !n.is_multiple_of(32) {
        return Err(shape("both dimensions must be positive multiples of 32".into()));
    }
    let want =
        k.checked_mul(n).map(|e| e / 32 * dtype.type_size()).ok_or_else(|| shape("the byte size overflows".into()))?;
    if len != want {
        return Err(shape(format!("{len} bytes, want {want}")));
    }
    Ok(())
}

/// The column-major form (`[k, n]`, format `base.column_of()`) of the row-major `[n, k]` weight `bytes`
/// of format `base` (Q4_0, Q4_1 or Q8_0): the same codes and scales, moved.
pub fn from_rows(base: DType, n: usize, k: usize, bytes: &[u8]) -> Result<(DType, Vec<u8>), ColumnError> {
    let dtype = base.column_of().ok_or(ColumnError::Unsupported(base))?;
    check(dtype, k, n, bytes.len())?;
    let (ts, nb) = (base.type_size(), k / 32);
    let crow = code_row_bytes(dtype, n);
    let (d_at, m_at) = table_offsets(dtype, k, n);
    let mut out = vec![0u8; bytes.len()];
    for r in 0..n {
        for b in 0..nb {
            let blk = &bytes[(r * nb + b) * ts..(r * nb + b + 1) * ts];
            let t = (b * n + r) * 2;
            out[d_at + t..d_at + t + 2].copy_from_slice(&blk[..2]);
            let qs = match base {
                DType::Q4_1 => {
                    out[m_at + t..m_at + t + 2].copy_from_slice(&blk[2..4]);
                    &blk[4..]
                }
                _ => &blk[2..],
            };
            for e in 0..32 {
                let j = b * 32 + e;
                let q = if base == DType::Q8_0 {
                    qs[e]
                } else if e < 16 {
                    qs[e] & 0x0F
                } else {
                    qs[e - 16] >> 4
                };
                if base == DType::Q8_0 {
                    out[j * crow + r] = q;
                } else {
                    let (g, i) = (r / 32, r % 32);
                    let at = j * crow + g * 16 + i % 16;
                    out[at] |= if i < 16 { q } else { q << 4 };
                }
            }
        }
    }
    Ok((dtype, out))
}

/// Decodes a `[k, n]` column tensor of `dtype` into `out` (`k · n` floats, row-major `[k, n]`), with the
/// row-major format's f32 operations (so `out[j·n + r]` equals element `[r, j]` of the source weight).
pub fn dequantize(dtype: DType, k: usize, n: usize, bytes: &[u8], out: &mut [f32]) -> Result<(), ColumnError> {
    check(dtype, k, n, bytes.len())?;
    if out.len() != k * n {
        return Err(ColumnError::Shape { dtype, rows: k, cols: n, what: format!("{} output floats", out.len()) });
    }
    let crow = code_row_bytes(dtype, n);
    let (d_at, m_at) = table_offsets(dtype, k, n);
    let f16_at = |at: usize| f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32();
    for j in 0..k {
        let b = j / 32;
        for r in 0..n {
            let t = (b * n + r) * 2;
            let d = f16_at(d_at + t);
            let code = |r: usize| {
                let byte = bytes[j * crow + (r / 32) * 16 + (r % 32) % 16];
                if r % 32 < 16 {
                    byte & 0x0F
                } else {
                    byte >> 4
                }
            };
            out[j * n + r] = match dtype {
                DType::Q4_0C => (code(r) as i32 - 8) as f32 * d,
                DType::Q4_1C => code(r) as f32 * d + f16_at(m_at + t),
                _ => bytes[j * crow + r] as i8 as f32 * d,
            };
        }
    }
    Ok(())
}

/// Bytes of a `[k', n]` gathered tensor of `dtype` whose kept channels come from `nb` source blocks.
pub fn gathered_len(dtype: DType, k: usize, n: usize, nb: usize) -> Option<usize> {
    let col = dtype.column_layout()?;
    let codes = k.checked_mul(code_row_bytes(col, n))?;
    let scales = nb.checked_mul(scale_tables(col) * n * 2)?;
    4usize.checked_mul(nb.checked_add(2)?)?.checked_add(codes)?.checked_add(scales)
}

/// The parts of a gathered tensor: the run boundaries `bptr` (`nb + 1` entries) and the byte offsets
/// of the codes and of the scale rows, after checking that the header is consistent with `k'`, `n`
/// and the byte length.
pub fn gathered_parts(dtype: DType, k: usize, n: usize, bytes: &[u8]) -> Result<(Vec<u32>, usize, usize), ColumnError> {
    let shape = |what: String| ColumnError::Shape { dtype, rows: k, cols: n, what };
    if !dtype.is_gathered() {
        return Err(ColumnError::Unsupported(dtype));
    }
    if k == 0 || n == 0 || !n.is_multiple_of(32) {
        return Err(shape("k' must be positive and n a positive multiple of 32".into()));
    }
    let u32_at =
        |i: usize| -> Option<u32> { bytes.get(4 * i..4 * i + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])) };
    let nb = u32_at(0).ok_or_else(|| shape(format!("{} bytes: no header", bytes.len())))? as usize;
    if nb == 0 || nb > k {
        return Err(shape(format!("{nb} source blocks for {k} kept channels")));
    }
    let want = gathered_len(dtype, k, n, nb).ok_or_else(|| shape("the byte size overflows".into()))?;
    if bytes.len() != want {
        return Err(shape(format!("{} bytes, want {want} for {nb} source blocks", bytes.len())));
    }
    let bptr: Vec<u32> = (0..=nb).map(|q| u32_at(1 + q).expect("length checked")).collect();
    if bptr[0] != 0 || bptr[nb] as usize != k || bptr.windows(2).any(|w| w[0] >= w[1]) {
        return Err(shape(format!("block runs {bptr:?} do not split 0..{k} into non-empty runs")));
    }
    let codes = 4 * (nb + 2);
    Ok((bptr, codes, codes + k * code_row_bytes(dtype.column_layout().expect("gathered"), n)))
}

/// The gathered form (`[kept.len(), n]`, format `base.gathered_of()`) of channels `kept` (strictly
/// increasing, each `< k`) of the row-major `[n, k]` weight `bytes` of format `base`: the kept columns'
/// own codes and the scales of the blocks they lie in, moved (nothing requantized).
pub fn gather(base: DType, n: usize, k: usize, bytes: &[u8], kept: &[usize]) -> Result<(DType, Vec<u8>), ColumnError> {
    let dtype = base.gathered_of().ok_or(ColumnError::Unsupported(base))?;
    let shape = |what: String| ColumnError::Shape { dtype, rows: kept.len(), cols: n, what };
    if kept.is_empty() || kept.windows(2).any(|w| w[0] >= w[1]) || kept.last().is_some_and(|&j| j >= k) {
        return Err(shape(format!("kept channels must be non-empty, increasing and below {k}")));
    }
    let (col, full) = from_rows(base, n, k, bytes)?;
    let crow = code_row_bytes(col, n);
    let (d_at, m_at) = table_offsets(col, k, n);
    let mut bptr = vec![0u32];
    let mut blocks = Vec::new();
    for (p, &j) in kept.iter().enumerate() {
        if blocks.last() != Some(&(j / 32)) {
            if p > 0 {
                bptr.push(p as u32);
            }
            blocks.push(j / 32);
        }
    }
    bptr.push(kept.len() as u32);
    let nb = blocks.len();
    let len = gathered_len(dtype, kept.len(), n, nb).ok_or_else(|| shape("the byte size overflows".into()))?;
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&(nb as u32).to_le_bytes());
    for p in &bptr {
        out.extend_from_slice(&p.to_le_bytes());
    }
    for &j in kept {
        out.extend_from_slice(&full[j * crow..(j + 1) * crow]);
    }
    for &b in &blocks {
        out.extend_from_slice(&full[d_at + b * n * 2..d_at + (b + 1) * n * 2]);
        if scale_tables(col) == 2 {
            out.extend_from_slice(&full[m_at + b * n * 2..m_at + (b + 1) * n * 2]);
        }
    }
    debug_assert_eq!(out.len(), len);
    Ok((dtype, out))
}

/// Decodes a `[k', n]` gathered tensor into `out` (`k' · n` floats, row-major), with the source format's
/// f32 operations: `out[j'·n + r]` equals element `[r, kept[j']]` of the source weight.
pub fn dequantize_gathered(dtype: DType, k: usize, n: usize, bytes: &[u8], out: &mut [f32]) -> Result<(), ColumnError> {
    let (bptr, codes, scales) = gathered_parts(dtype, k, n, bytes)?;
    if out.len() != k * n {
        return Err(ColumnError::Shape { dtype, rows: k, cols: n, what: format!("{} output floats", out.len()) });
    }
    let col = dtype.column_layout().expect("gathered");
    let crow = code_row_bytes(col, n);
    let srow = scale_tables(col) * n * 2;
    let f16_at = |at: usize| f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32();
    for (q, run) in bptr.windows(2).enumerate() {
        let (d_at, m_at) = (scales + q * srow, scales + q * srow + n * 2);
        for j in run[0] as usize..run[1] as usize {
            let row = &bytes[codes + j * crow..codes + (j + 1) * crow];
            for r in 0..n {
                let d = f16_at(d_at + 2 * r);
                let nib = |r: usize| {
                    let byte = row[(r / 32) * 16 + (r % 32) % 16];
                    if r % 32 < 16 {
                        byte & 0x0F
                    } else {
                        byte >> 4
                    }
                };
                out[j * n + r] = match col {
                    DType::Q4_0C => (nib(r) as i32 - 8) as f32 * d,
                    DType::Q4_1C => nib(r) as f32 * d + f16_at(m_at + 2 * r),
                    _ => row[r] as i8 as f32 * d,
                };
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    #[test]
    fn column_form_dequantizes_to_the_transposed_weight_exactly() {
        let mut rng = StdRng::seed_from_u64(7);
        for base in [DType::Q4_0, DType::Q4_1, DType::Q8_0] {
            for (n, k) in [(32, 32), (96, 64), (160, 96)] {
                let vals: Vec<f32> = (0..n * k).map(|_| rng.random_range(-2.0f32..2.0)).collect();
                let bytes = quant::quantize(base, &vals).unwrap();
                let mut w = vec![0f32; n * k];
                quant::dequantize(base, &bytes, &mut w).unwrap();
                let (dtype, col) = from_rows(base, n, k, &bytes).unwrap();
                assert_eq!(col.len(), bytes.len(), "{base}: same size");
                let mut t = vec![0f32; n * k];
                dequantize(dtype, k, n, &col, &mut t).unwrap();
                for r in 0..n {
                    for j in 0..k {
                        assert_eq!(t[j * n + r].to_bits(), w[r * k + j].to_bits(), "{base} [{r}, {j}]");
                    }
                }
            }
        }
    }

    /// The gathered form decodes to the ORIGINAL row-major weight's kept columns bit for bit, and holds
    /// only the touched blocks' scales.
    #[test]
    fn gathered_form_dequantizes_to_the_kept_columns_exactly() {
        let mut rng = StdRng::seed_from_u64(8);
        for base in [DType::Q4_0, DType::Q4_1, DType::Q8_0] {
            for (n, k) in [(32, 32), (96, 160)] {
                let vals: Vec<f32> = (0..n * k).map(|_| rng.random_range(-2.0f32..2.0)).collect();
                let bytes = quant::quantize(base, &vals).unwrap();
                let mut w = vec![0f32; n * k];
                quant::dequantize(base, &bytes, &mut w).unwrap();
                // Random subsets, one whole block dropped, and a single channel.
                let mut sets: Vec<Vec<usize>> =
                    (0..3).map(|_| (0..k).filter(|_| rng.random_bool(0.6)).collect()).collect();
                sets.push((0..k).filter(|j| j / 32 != 0 || k == 32).collect());
                sets.push(vec![k - 1]);
                for kept in sets.into_iter().filter(|s| !s.is_empty()) {
                    let (dtype, g) = gather(base, n, k, &bytes, &kept).unwrap();
                    assert_eq!(dtype, base.gathered_of().unwrap());
                    let mut blocks: Vec<usize> = kept.iter().map(|j| j / 32).collect();
                    blocks.dedup();
                    assert_eq!(g.len(), gathered_len(dtype, kept.len(), n, blocks.len()).unwrap());
                    let mut t = vec![0f32; kept.len() * n];
                    dequantize_gathered(dtype, kept.len(), n, &g, &mut t).unwrap();
                    for (jj, &j) in kept.iter().enumerate() {
                        for r in 0..n {
                            assert_eq!(t[jj * n + r].to_bits(), w[r * k + j].to_bits(), "{base} [{r}, {j}]");
                        }
                    }
                }
            }
        }
        // Bad headers and sets are errors, not panics.
        let bytes = quant::quantize(DType::Q4_1, &[0.5; 64 * 32]).unwrap();
        assert!(gather(DType::Q4_1, 32, 64, &bytes, &[3, 3]).is_err());
        assert!(gather(DType::Q4_1, 32, 64, &bytes, &[64]).is_err());
        assert!(gather(DType::Q5_1, 32, 64, &bytes, &[1]).is_err());
        let (dt, mut g) = gather(DType::Q4_1, 32, 64, &bytes, &[1, 40]).unwrap();
        assert!(dequantize_gathered(dt, 2, 32, &g[1..], &mut [0.0; 64]).is_err());
        g[4..8].copy_from_slice(&1u32.to_le_bytes());
        let e = dequantize_gathered(dt, 2, 32, &g, &mut [0.0; 64]).unwrap_err().to_string();
        assert!(e.contains("block runs"), "{e}");
    }

    #[test]
    fn read_share_counts_codes_and_active_blocks() {
        // q4_1c: 16 code bytes and 4 scale bytes per 32 elements.
        assert_eq!(read_share(DType::Q4_1C, 0.0), 0.0);
        assert!((read_share(DType::Q4_1C, 1.0) - 1.0).abs() < 1e-12);
        let half = 0.8 * 0.5 + 0.2 * (1.0 - 0.5f64.powi(32));
        assert!((read_share(DType::Q4_1C, 0.5) - half).abs() < 1e-12);
        assert!(
            (read_share(DType::Q8_0C, 1.0 / 32.0)
                - (32.0 / 34.0 / 32.0 + 2.0 / 34.0 * (1.0 - (31.0f64 / 32.0).powi(32))))
            .abs()
                < 1e-12
        );
    }

    #[test]
    fn bad_shapes_and_formats_are_errors() {
        assert!(matches!(from_rows(DType::Q5_1, 32, 32, &[0; 24 * 32]), Err(ColumnError::Unsupported(_))));
        let e = from_rows(DType::Q4_1, 48, 32, &[0; 48 * 20]).unwrap_err().to_string();
        assert!(e.contains("multiples of 32"), "{e}");
        let e = from_rows(DType::Q4_1, 32, 32, &[0; 10]).unwrap_err().to_string();
        assert!(e.contains("10 bytes, want 640"), "{e}");
        assert!(dequantize(DType::Q8_0C, 32, 32, &[0; 34 * 32], &mut [0.0; 31]).is_err());
    }
}
