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
