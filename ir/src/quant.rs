//! Dequantization, and reference quantization, of ggml/GGUF element formats.
//!
//! Every block format is decoded exactly as ggml's `dequantize_row_*` (ggml-quants.c) decodes it, with
//! the same f32 operations in the same order, so the results are bit-identical to ggml's scalar code
//! and to gguf-py (`ir/tests/fixtures/make_quant_fixtures.py` makes the fixture the tests compare
//! against). All multi-byte fields are little endian and every scale is an IEEE f16 unless noted.
//!
//! The quantizers follow ggml's `quantize_row_*_ref`, the deterministic round-to-nearest reference used
//! to write model files when no importance matrix is given: for the 32-element formats they give the
//! same bytes as ggml and gguf-py; the K-quant ones port ggml's scale search step by step (gguf-py has
//! no K-quant quantizer to check them against, so only their round-trip accuracy is tested).
//!
//! Work on large tensors is split over rayon's pool in chunks of whole blocks; the result does not
//! depend on the split.
// The block codecs index their arrays the way ggml's C does; keeping that shape makes them easy to check
// line by line against the reference.
#![allow(clippy::needless_range_loop)]

use crate::dtype::{DType, QK_K};
use half::{bf16, f16};
use rayon::prelude::*;

#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error("{dtype}: {n} elements is not a whole number of {block_size}-element blocks")]
    PartialBlock { dtype: DType, n: usize, block_size: usize },
    #[error(
        "{dtype}: got {len} bytes, but {n} elements take exactly {expected} bytes \
         ({} bytes per block of {} elements)",
        .dtype.type_size(),
        .dtype.block_size()
    )]
    Size { dtype: DType, len: usize, expected: usize, n: usize },
    #[error("{dtype}: the byte size of {n} elements overflows usize")]
    TooLarge { dtype: DType, n: usize },
    #[error("{0}")]
    Unsupported(String),
}

/// Decodes `out.len()` elements of `dtype` from `bytes` into `out`.
///
/// `out.len()` must be a whole number of blocks and `bytes.len()` must be exactly
/// `dtype.row_bytes(out.len())`; otherwise an error is returned and `out` is left untouched.
/// Plain types convert: f16/bf16 widen exactly, i32/i64 are cast to the nearest f32.
pub fn dequantize(dtype: DType, bytes: &[u8], out: &mut [f32]) -> Result<(), QuantError> {
    check_sizes(dtype, out.len(), bytes.len())?;
    match dtype {
        DType::F32 => for_each_block(bytes, out, |b: &[u8; 4], y: &mut [f32; 1]| y[0] = f32::from_le_bytes(*b)),
        DType::F16 => {
            for_each_block(bytes, out, |b: &[u8; 2], y: &mut [f32; 1]| y[0] = f16::from_le_bytes(*b).to_f32())
        }
        DType::BF16 => {
            for_each_block(bytes, out, |b: &[u8; 2], y: &mut [f32; 1]| y[0] = bf16::from_le_bytes(*b).to_f32())
        }
        DType::I32 => for_each_block(bytes, out, |b: &[u8; 4], y: &mut [f32; 1]| y[0] = i32::from_le_bytes(*b) as f32),
        DType::I64 => for_each_block(bytes, out, |b: &[u8; 8], y: &mut [f32; 1]| y[0] = i64::from_le_bytes(*b) as f32),
        DType::Q4_0 => for_each_block(bytes, out, dequantize_q4_0),
        DType::Q4_1 => for_each_block(bytes, out, dequantize_q4_1),
        DType::Q5_0 => for_each_block(bytes, out, dequantize_q5_0),
        DType::Q5_1 => for_each_block(bytes, out, dequantize_q5_1),
        DType::Q8_0 => for_each_block(bytes, out, dequantize_q8_0),
        DType::Q4K => for_each_block(bytes, out, dequantize_q4_k),
        DType::Q5K => for_each_block(bytes, out, dequantize_q5_k),
        DType::Q6K => for_each_block(bytes, out, dequantize_q6_k),
        DType::Q4_0C | DType::Q4_1C | DType::Q8_0C | DType::Q4_0G | DType::Q4_1G | DType::Q8_0G => {
            return Err(QuantError::Unsupported(format!(
                "{dtype} is column-major: decode it with its shape (kiln_ir::column::dequantize)"
            )))
        }
    }
    Ok(())
}

/// Encodes `values` as `dtype`, with ggml's reference (round-to-nearest) quantizers; returns
/// `dtype.row_bytes(values.len())` bytes. `values.len()` must be a whole number of blocks.
/// f16/bf16 round to nearest even (overflow gives ±inf, NaN stays NaN); integer types are rejected.
pub fn quantize(dtype: DType, values: &[f32]) -> Result<Vec<u8>, QuantError> {
    let mut out = vec![0u8; byte_len(dtype, values.len())?];
    match dtype {
        DType::F32 => quantize_blocks(values, &mut out, |x: &[f32; 1], b: &mut [u8; 4]| *b = x[0].to_le_bytes()),
        DType::F16 => {
            quantize_blocks(values, &mut out, |x: &[f32; 1], b: &mut [u8; 2]| *b = f16::from_f32(x[0]).to_le_bytes())
        }
        DType::BF16 => {
            quantize_blocks(values, &mut out, |x: &[f32; 1], b: &mut [u8; 2]| *b = bf16::from_f32(x[0]).to_le_bytes())
        }
        DType::I32 | DType::I64 => {
            return Err(QuantError::Unsupported(format!(
                "quantize: {dtype} is an integer type; f32 values are not converted to it"
            )))
        }
        DType::Q4_0 => quantize_blocks(values, &mut out, quantize_q4_0),
        DType::Q4_1 => quantize_blocks(values, &mut out, quantize_q4_1),
        DType::Q5_0 => quantize_blocks(values, &mut out, quantize_q5_0),
        DType::Q5_1 => quantize_blocks(values, &mut out, quantize_q5_1),
        DType::Q8_0 => quantize_blocks(values, &mut out, quantize_q8_0),
        DType::Q4K => quantize_blocks(values, &mut out, quantize_q4_k),
        DType::Q5K => quantize_blocks(values, &mut out, quantize_q5_k),
        DType::Q6K => quantize_blocks(values, &mut out, quantize_q6_k),
        DType::Q4_0C | DType::Q4_1C | DType::Q8_0C | DType::Q4_0G | DType::Q4_1G | DType::Q8_0G => {
            return Err(QuantError::Unsupported(format!(
                "quantize: {dtype} is column-major; make it from a row-major weight (kiln_ir::column::from_rows)"
            )))
        }
    }
    Ok(out)
}

/// Bytes taken by `n` elements, which must be whole blocks.
fn byte_len(dtype: DType, n: usize) -> Result<usize, QuantError> {
    let block_size = dtype.block_size();
    if !n.is_multiple_of(block_size) {
        return Err(QuantError::PartialBlock { dtype, n, block_size });
    }
    dtype.row_bytes(n).ok_or(QuantError::TooLarge { dtype, n })
}

/// Checks that `n` elements are whole blocks stored in exactly `len` bytes.
fn check_sizes(dtype: DType, n: usize, len: usize) -> Result<(), QuantError> {
    let expected = byte_len(dtype, n)?;
    if len != expected {
        return Err(QuantError::Size { dtype, len, expected, n });
    }
    Ok(())
}

/// Elements per rayon task: small tensors are decoded on the calling thread.
const TASK_ELEMS: usize = 1 << 15;

/// Runs `f` on every block: `B` elements of `out` from `T` bytes of `bytes` (sizes already checked).
fn for_each_block<const T: usize, const B: usize>(
    bytes: &[u8],
    out: &mut [f32],
    f: impl Fn(&[u8; T], &mut [f32; B]) + Sync,
) {
    debug_assert_eq!(bytes.len() / T, out.len() / B);
    let run = |(src, dst): (&[u8], &mut [f32])| {
        for (b, y) in src.chunks_exact(T).zip(dst.chunks_exact_mut(B)) {
            f(b.try_into().expect("chunks_exact gives T bytes"), y.try_into().expect("B elements"));
        }
    };
    if out.len() <= TASK_ELEMS {
        run((bytes, out));
    } else {
        let blocks = (TASK_ELEMS / B).max(1);
        bytes.par_chunks(blocks * T).zip(out.par_chunks_mut(blocks * B)).for_each(run);
    }
}

/// Runs `f` on every block: `T` bytes of `out` from `B` elements of `values` (sizes already checked).
fn quantize_blocks<const B: usize, const T: usize>(
    values: &[f32],
    out: &mut [u8],
    f: impl Fn(&[f32; B], &mut [u8; T]) + Sync,
) {
    debug_assert_eq!(values.len() / B, out.len() / T);
    let run = |(src, dst): (&[f32], &mut [u8])| {
        for (x, b) in src.chunks_exact(B).zip(dst.chunks_exact_mut(T)) {
            f(x.try_into().expect("chunks_exact gives B elements"), b.try_into().expect("T bytes"));
        }
    };
    if values.len() <= TASK_ELEMS {
        run((values, out));
    } else {
        let blocks = (TASK_ELEMS / B).max(1);
        values.par_chunks(blocks * B).zip(out.par_chunks_mut(blocks * T)).for_each(run);
    }
}

/// The f16 at byte offset `at`, widened (exactly) to f32 — ggml's `GGML_FP16_TO_FP32`.
fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Stores `v` rounded to the nearest f16 (ties to even) at byte offset `at` — `GGML_FP32_TO_FP16`.
fn put_f16(b: &mut [u8], at: usize, v: f32) {
    b[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

// ---------------------------------------------------------------------------------------------------
// 32-element formats. In all of them element j < 16 comes from the low nibble of qs[j] and element
// j + 16 from its high nibble; Q5 formats take bit 4 of element i from bit i of the u32 `qh`.

/// Q4_0, 18 bytes: `d: f16`, `qs: [u8; 16]`; y = (q - 8) * d with q in 0..16.
fn dequantize_q4_0(b: &[u8; 18], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        let x0 = (qs[j] & 0x0F) as i32 - 8;
        let x1 = (qs[j] >> 4) as i32 - 8;
        y[j] = x0 as f32 * d;
        y[j + 16] = x1 as f32 * d;
    }
}

/// Q4_1, 20 bytes: `d: f16`, `m: f16`, `qs: [u8; 16]`; y = q * d + m with q in 0..16.
fn dequantize_q4_1(b: &[u8; 20], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    for j in 0..16 {
        let x0 = qs[j] & 0x0F;
        let x1 = qs[j] >> 4;
        y[j] = x0 as f32 * d + m;
        y[j + 16] = x1 as f32 * d + m;
    }
}

/// Q5_0, 22 bytes: `d: f16`, `qh: u32`, `qs: [u8; 16]`; y = (q - 16) * d with q in 0..32.
fn dequantize_q5_0(b: &[u8; 22], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let xh0 = (((qh >> j) << 4) & 0x10) as u8;
        let xh1 = ((qh >> (j + 12)) & 0x10) as u8;
        let x0 = ((qs[j] & 0x0F) | xh0) as i32 - 16;
        let x1 = ((qs[j] >> 4) | xh1) as i32 - 16;
        y[j] = x0 as f32 * d;
        y[j + 16] = x1 as f32 * d;
    }
}

/// Q5_1, 24 bytes: `d: f16`, `m: f16`, `qh: u32`, `qs: [u8; 16]`; y = q * d + m with q in 0..32.
fn dequantize_q5_1(b: &[u8; 24], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..16 {
        let xh0 = (((qh >> j) << 4) & 0x10) as u8;
        let xh1 = ((qh >> (j + 12)) & 0x10) as u8;
        let x0 = (qs[j] & 0x0F) | xh0;
        let x1 = (qs[j] >> 4) | xh1;
        y[j] = x0 as f32 * d + m;
        y[j + 16] = x1 as f32 * d + m;
    }
}

/// Q8_0, 34 bytes: `d: f16`, `qs: [i8; 32]`; y = q * d.
fn dequantize_q8_0(b: &[u8; 34], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    for j in 0..32 {
        y[j] = b[2 + j] as i8 as f32 * d;
    }
}

// ---------------------------------------------------------------------------------------------------
// K-quants: 256-element super-blocks of sub-blocks, each sub-block with its own quantized scale.

/// Scale and min of sub-block `j` (0..8) of a Q4_K/Q5_K block, six bits each, packed in 12 bytes `s`
/// (ggml's `get_scale_min_k4`): for j < 4 they are the low 6 bits of s[j] and s[j + 4]; for j >= 4 the
/// low 4 bits are the two nibbles of s[j + 4] (scale low, min high) and the top 2 bits are the top 2
/// bits of s[j - 4] (scale) and s[j] (min).
fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        let sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
        let m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
        (sc, m)
    }
}

/// Q4_K, 144 bytes: `d: f16`, `dmin: f16`, `scales: [u8; 12]` (8 six-bit scale/min pairs, see
/// [`scale_min_k4`]), `qs: [u8; 128]`. Eight sub-blocks of 32; each 64 elements share 32 bytes of
/// `qs`: the first 32 are the low nibbles (sub-block 2c), the next 32 the high nibbles (2c + 1).
/// y = (d * sc) * q - (dmin * m).
fn dequantize_q4_k(b: &[u8; 144], y: &mut [f32; QK_K]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for c in 0..4 {
        let (sc1, m1) = scale_min_k4(2 * c, scales);
        let (sc2, m2) = scale_min_k4(2 * c + 1, scales);
        let (d1, min1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, min2) = (d * sc2 as f32, dmin * m2 as f32);
        let q = &qs[32 * c..32 * c + 32];
        let y = &mut y[64 * c..64 * c + 64];
        for l in 0..32 {
            y[l] = d1 * (q[l] & 0x0F) as f32 - min1;
            y[l + 32] = d2 * (q[l] >> 4) as f32 - min2;
        }
    }
}

/// Q5_K, 176 bytes: `d: f16`, `dmin: f16`, `scales: [u8; 12]`, `qh: [u8; 32]`, `qs: [u8; 128]`. As
/// Q4_K, plus bit 4 of element 32k + l (sub-block k) in bit k of qh[l].
/// y = (d * sc) * q - (dmin * m) with q in 0..32.
fn dequantize_q5_k(b: &[u8; 176], y: &mut [f32; QK_K]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for c in 0..4 {
        let (sc1, m1) = scale_min_k4(2 * c, scales);
        let (sc2, m2) = scale_min_k4(2 * c + 1, scales);
        let (d1, min1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, min2) = (d * sc2 as f32, dmin * m2 as f32);
        let (u1, u2) = (1u8 << (2 * c), 2u8 << (2 * c));
        let q = &qs[32 * c..32 * c + 32];
        let y = &mut y[64 * c..64 * c + 64];
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            y[l] = d1 * ((q[l] & 0x0F) + h1) as f32 - min1;
            y[l + 32] = d2 * ((q[l] >> 4) + h2) as f32 - min2;
        }
    }
}

/// Q6_K, 210 bytes: `ql: [u8; 128]` (low 4 bits), `qh: [u8; 64]` (high 2 bits), `scales: [i8; 16]`
/// (one per 16 elements), `d: f16` (last!). Each half h of 128 elements uses ql[64h..64h + 64],
/// qh[32h..32h + 32] and scales[8h..8h + 8]; for l < 32 its elements l, l + 32, l + 64, l + 96 take
/// the low nibble of ql[l], of ql[l + 32], the high nibble of ql[l], of ql[l + 32], and bit pairs
/// 0-1, 2-3, 4-5, 6-7 of qh[l]. y = (d * scale) * (q - 32).
fn dequantize_q6_k(b: &[u8; 210], y: &mut [f32; QK_K]) {
    let d = f16_at(b, 208);
    for h in 0..2 {
        let ql = &b[64 * h..64 * h + 64];
        let qh = &b[128 + 32 * h..128 + 32 * h + 32];
        let sc = &b[192 + 8 * h..192 + 8 * h + 8];
        let y = &mut y[128 * h..128 * h + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * sc[is] as i8 as f32 * q1 as f32;
            y[l + 32] = d * sc[is + 2] as i8 as f32 * q2 as f32;
            y[l + 64] = d * sc[is + 4] as i8 as f32 * q3 as f32;
            y[l + 96] = d * sc[is + 6] as i8 as f32 * q4 as f32;
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Reference quantizers for the 32-element formats (ggml's `quantize_row_*_ref`). The symmetric ones
// pick the value of largest magnitude (the first, on ties) and map it to the most negative level, so
// its sign is kept exactly; the asymmetric ones map [min, max] onto 0..=qmax. Levels are found with
// f32 arithmetic and truncation of `x / d + 0.5 + offset`, exactly as ggml's C, and `d` (and `m`) are
// stored rounded to f16 after being used unrounded for the levels.

/// The value of largest magnitude (the first one on ties), or 0.
fn signed_absmax(x: &[f32]) -> f32 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

fn min_max(x: &[f32]) -> (f32, f32) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

fn inverse(d: f32) -> f32 {
    if d != 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

fn quantize_q4_0(x: &[f32; 32], b: &mut [u8; 18]) {
    let d = signed_absmax(x) / -8.0;
    let id = inverse(d);
    put_f16(b, 0, d);
    for j in 0..16 {
        // C: `MIN(15, (int8_t)(x0 + 8.5f))`, a truncating conversion.
        let xi0 = ((x[j] * id + 8.5) as i8).min(15) as u8;
        let xi1 = ((x[j + 16] * id + 8.5) as i8).min(15) as u8;
        b[2 + j] = xi0 | (xi1 << 4);
    }
}

fn quantize_q4_1(x: &[f32; 32], b: &mut [u8; 20]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 15.0;
    let id = inverse(d);
    put_f16(b, 0, d);
    put_f16(b, 2, min);
    for j in 0..16 {
        let xi0 = (((x[j] - min) * id + 0.5) as i8).min(15) as u8;
        let xi1 = (((x[j + 16] - min) * id + 0.5) as i8).min(15) as u8;
        b[4 + j] = xi0 | (xi1 << 4);
    }
}

fn quantize_q5_0(x: &[f32; 32], b: &mut [u8; 22]) {
    let d = signed_absmax(x) / -16.0;
    let id = inverse(d);
    put_f16(b, 0, d);
    let mut qh = 0u32;
    for j in 0..16 {
        let xi0 = ((x[j] * id + 16.5) as i8).min(31) as u8;
        let xi1 = ((x[j + 16] * id + 16.5) as i8).min(31) as u8;
        b[6 + j] = (xi0 & 0x0F) | ((xi1 & 0x0F) << 4);
        qh |= (((xi0 & 0x10) >> 4) as u32) << j;
        qh |= (((xi1 & 0x10) >> 4) as u32) << (j + 16);
    }
    b[2..6].copy_from_slice(&qh.to_le_bytes());
}

fn quantize_q5_1(x: &[f32; 32], b: &mut [u8; 24]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 31.0;
    let id = inverse(d);
    put_f16(b, 0, d);
    put_f16(b, 2, min);
    let mut qh = 0u32;
    for j in 0..16 {
        // ggml has no clamp here (the level cannot exceed 31 for finite input); gguf-py clamps to 31.
        let xi0 = (((x[j] - min) * id + 0.5) as u8).min(31);
        let xi1 = (((x[j + 16] - min) * id + 0.5) as u8).min(31);
        b[8 + j] = (xi0 & 0x0F) | ((xi1 & 0x0F) << 4);
        qh |= (((xi0 & 0x10) >> 4) as u32) << j;
        qh |= (((xi1 & 0x10) >> 4) as u32) << (j + 16);
    }
    b[4..8].copy_from_slice(&qh.to_le_bytes());
}

fn quantize_q8_0(x: &[f32; 32], b: &mut [u8; 34]) {
    let mut amax = 0f32;
    for &v in x {
        amax = if amax > v.abs() { amax } else { v.abs() }; // C's MAX(amax, fabsf(v))
    }
    let d = amax / 127.0;
    let id = inverse(d);
    put_f16(b, 0, d);
    for j in 0..32 {
        // `roundf`: halves away from zero, like f32::round.
        b[2 + j] = (x[j] * id).round() as i8 as u8;
    }
}

// ---------------------------------------------------------------------------------------------------
// Reference quantizers for the K-quants (ggml's `quantize_row_q{4,5,6}_K_ref`): each sub-block gets a
// scale (and min) from a small search minimising a weighted squared error, the sub-block scales are
// themselves quantized against the f16 super-block scale(s), and finally every element is re-quantized
// to the nearest level of its decoded sub-block scale. Ported operation by operation; ggml's own
// output can still differ in rare last-bit cases where a C compiler contracts `a*b + c` into an FMA.

/// Sub-block magnitudes below this count as all-zero (ggml's GROUP_MAX_EPS).
const GROUP_MAX_EPS: f32 = 1e-15;

/// Round to nearest, ties to even: ggml's `nearest_int` (its float trick is exact for |v| < 2^22).
fn nearest_int(v: f32) -> i32 {
    v.round_ties_even() as i32
}

/// ggml's `make_qx_quants` with `rmse_type = 1` and no importance weights: symmetric levels
/// -nmax..nmax-1 (stored biased by nmax in `levels`) for `x`, with the scale chosen among 19 candidates
/// around `max / -nmax` to minimise the x²-weighted error; returns the scale.
fn make_qx_quants(nmax: i32, x: &[f32], levels: &mut [u8]) -> f32 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        levels.fill(0);
        return 0.0;
    }
    let level = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let mut iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    for (i, &v) in x.iter().enumerate() {
        let l = level(iscale, v);
        levels[i] = (l + nmax) as u8;
        let w = v * v;
        sumlx += w * v * l as f32;
        suml2 += w * l as f32 * l as f32;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        let (mut sumlx, mut suml2) = (0f32, 0f32);
        for &v in x {
            let l = level(iscale, v);
            let w = v * v;
            sumlx += w * v * l as f32;
            suml2 += w * l as f32 * l as f32;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (i, &v) in x.iter().enumerate() {
                levels[i] = (nmax + level(iscale, v)) as u8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// ggml's `make_qkx2_quants` (squared error, `use_mad = false`) for 32 values: levels 0..=nmax with
/// y = scale * l - the_min, searching nstep + 1 scales from (nmax + rmin) / range in steps of rdelta and
/// refitting scale and min by weighted least squares. Returns (scale, the_min), the_min >= 0.
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32; 32],
    weights: &[f32; 32],
    levels: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (f32, f32) {
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..32 {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        levels.fill(0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..32 {
        let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        levels[i] = l as u8;
        let diff = scale * l as f32 + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    let mut aux = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..32 {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            aux[i] = l as u8;
            let (w, l) = (weights[i], l as f32);
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..32 {
                let diff = this_scale * aux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * (diff * diff);
            }
            if cur_error < best_error {
                levels[..32].copy_from_slice(&aux);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// The common part of the Q4_K and Q5_K reference quantizers: fills the `d`, `dmin` and 12 packed
/// scale bytes of `head` (16 bytes) and returns the final levels 0..=nmax of the 256 elements.
fn quantize_k_scales(x: &[f32; QK_K], nmax: i32, rmin: f32, nstep: i32, head: &mut [u8]) -> [u8; QK_K] {
    let mut levels = [0u8; QK_K];
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..8 {
        let xs: &[f32; 32] = x[32 * j..32 * j + 32].try_into().expect("32 elements");
        let mut sum_x2 = 0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        let weights: [f32; 32] = std::array::from_fn(|l| av_x + xs[l].abs());
        let lv = &mut levels[32 * j..32 * j + 32];
        (scales[j], mins[j]) = make_qkx2_quants(nmax, xs, &weights, lv, rmin, 0.1, nstep);
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let s = &mut head[4..16];
    s.fill(0);
    for j in 0..8 {
        // C stores nearest_int's result in a uint8_t (wrapping) before clamping to 63.
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            s[j] = ls;
            s[j + 4] = lm;
        } else {
            s[j + 4] = (ls & 0x0F) | ((lm & 0x0F) << 4);
            s[j - 4] |= (ls >> 4) << 6;
            s[j] |= (lm >> 4) << 6;
        }
    }
    put_f16(head, 0, max_scale / 63.0);
    put_f16(head, 2, max_min / 63.0);
    let (d, dmin) = (f16_at(head, 0), f16_at(head, 2));
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, &head[4..16]);
        let d = d * sc as f32;
        if d == 0.0 {
            continue;
        }
        let dm = dmin * m as f32;
        for i in 32 * j..32 * j + 32 {
            levels[i] = nearest_int((x[i] + dm) / d).clamp(0, nmax) as u8;
        }
    }
    levels
}

fn quantize_q4_k(x: &[f32; QK_K], b: &mut [u8; 144]) {
    let levels = quantize_k_scales(x, 15, -1.0, 20, &mut b[..16]);
    let qs = &mut b[16..144];
    for c in 0..4 {
        for l in 0..32 {
            qs[32 * c + l] = levels[64 * c + l] | (levels[64 * c + l + 32] << 4);
        }
    }
}

fn quantize_q5_k(x: &[f32; QK_K], b: &mut [u8; 176]) {
    let levels = quantize_k_scales(x, 31, -0.5, 15, &mut b[..16]);
    let (qh, qs) = b[16..176].split_at_mut(32);
    qh.fill(0);
    for c in 0..4 {
        let (m1, m2) = (1u8 << (2 * c), 2u8 << (2 * c));
        for j in 0..32 {
            let mut l1 = levels[64 * c + j];
            if l1 > 15 {
                l1 -= 16;
                qh[j] |= m1;
            }
            let mut l2 = levels[64 * c + j + 32];
            if l2 > 15 {
                l2 -= 16;
                qh[j] |= m2;
            }
            qs[32 * c + j] = l1 | (l2 << 4);
        }
    }
}

fn quantize_q6_k(x: &[f32; QK_K], b: &mut [u8; 210]) {
    let mut levels = [0u8; QK_K];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
    for ib in 0..16 {
        let range = 16 * ib..16 * ib + 16;
        scales[ib] = make_qx_quants(32, &x[range.clone()], &mut levels[range]);
        if scales[ib].abs() > max_abs_scale {
            max_abs_scale = scales[ib].abs();
            max_scale = scales[ib];
        }
    }
    b.fill(0);
    if max_abs_scale < GROUP_MAX_EPS {
        return; // all (near) zero: d = 0
    }
    let iscale = -128.0 / max_scale;
    put_f16(b, 208, 1.0 / iscale);
    for ib in 0..16 {
        b[192 + ib] = nearest_int(iscale * scales[ib]).min(127) as i8 as u8;
    }
    let d = f16_at(b, 208);
    for j in 0..16 {
        let d = d * b[192 + j] as i8 as f32;
        if d == 0.0 {
            continue;
        }
        for i in 16 * j..16 * j + 16 {
            levels[i] = (nearest_int(x[i] / d).clamp(-32, 31) + 32) as u8;
        }
    }
    for h in 0..2 {
        let lv = &levels[128 * h..128 * h + 128];
        for l in 0..32 {
            b[64 * h + l] = (lv[l] & 0x0F) | ((lv[l + 64] & 0x0F) << 4);
            b[64 * h + l + 32] = (lv[l + 32] & 0x0F) | ((lv[l + 96] & 0x0F) << 4);
            b[128 + 32 * h + l] =
                (lv[l] >> 4) | ((lv[l + 32] >> 4) << 2) | ((lv[l + 64] >> 4) << 4) | ((lv[l + 96] >> 4) << 6);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use serde_json::Value;

    const FIXTURES: &str = include_str!("../tests/fixtures/quant_fixtures.json");

    fn fixtures() -> Value {
        serde_json::from_str(FIXTURES).expect("quant_fixtures.json parses")
    }

    fn unhex(s: &str) -> Vec<u8> {
        assert!(s.len().is_multiple_of(2));
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    /// JSON numbers written as the exact value of an f32 parse back to that f32.
    fn f32s(v: &Value) -> Vec<f32> {
        v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
    }

    const BLOCK_TYPES: [DType; 8] =
        [DType::Q4_0, DType::Q4_1, DType::Q5_0, DType::Q5_1, DType::Q8_0, DType::Q4K, DType::Q5K, DType::Q6K];

    #[test]
    fn dequantize_matches_gguf_py_bit_for_bit() {
        let fx = fixtures();
        for dtype in BLOCK_TYPES {
            let case = &fx["dequant"][dtype.name()];
            let bytes = unhex(case["bytes_hex"].as_str().unwrap());
            let want = f32s(&case["values"]);
            assert_eq!(want.len(), 3 * dtype.block_size(), "{dtype}");
            let mut got = vec![f32::NAN; want.len()];
            dequantize(dtype, &bytes, &mut got).unwrap();
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.to_bits(), w.to_bits(), "{dtype} element {i}: got {g:e}, gguf-py {w:e}");
            }
        }
    }

    #[test]
    fn quantize_matches_gguf_py_bytes() {
        let fx = fixtures();
        let inputs = f32s(&fx["quant"]["inputs"]);
        assert_eq!(inputs.len(), 6 * 32);
        for dtype in [DType::Q8_0, DType::Q4_0, DType::Q4_1, DType::Q5_0, DType::Q5_1] {
            let want = unhex(fx["quant"][dtype.name()].as_str().unwrap());
            let got = quantize(dtype, &inputs).unwrap();
            assert_eq!(got.len(), want.len(), "{dtype}");
            let ts = dtype.type_size();
            for (b, (g, w)) in got.chunks(ts).zip(want.chunks(ts)).enumerate() {
                assert_eq!(g, w, "{dtype} block {b}");
            }
        }
    }

    #[test]
    fn f16_bf16_f32_conversions() {
        let fx = fixtures();
        let inputs = f32s(&fx["float"]["inputs"]);
        for dtype in [DType::F16, DType::BF16] {
            let want = unhex(fx["float"][dtype.name()].as_str().unwrap());
            let got = quantize(dtype, &inputs).unwrap();
            assert_eq!(got, want, "{dtype} encoding differs from numpy/gguf-py");
            // Widening is exact, and re-encoding the widened values gives the same bytes.
            let mut wide = vec![0f32; inputs.len()];
            dequantize(dtype, &got, &mut wide).unwrap();
            assert_eq!(quantize(dtype, &wide).unwrap(), got, "{dtype}");
        }
        // Known encodings (little endian).
        let mut y = [0f32; 5];
        dequantize(DType::F16, &[0x00, 0x3c, 0x00, 0xc1, 0x01, 0x00, 0x00, 0x7c, 0xff, 0x7b], &mut y).unwrap();
        assert_eq!(y, [1.0, -2.5, 2f32.powi(-24), f32::INFINITY, 65504.0]);
        let mut y = [0f32; 3];
        dequantize(DType::BF16, &[0x80, 0x3f, 0x20, 0xc0, 0x49, 0x40], &mut y).unwrap();
        assert_eq!(y, [1.0, -2.5, 3.140625]);
        assert_eq!(quantize(DType::BF16, &[f32::NAN]).unwrap()[1] & 0x7f, 0x7f, "NaN stays NaN");
        // f32 is a bit-exact copy, NaN payloads and signed zeros included.
        let odd = [f32::from_bits(0x7fc0_1234), -0.0, f32::MIN_POSITIVE / 8.0, -3.5];
        let bytes = quantize(DType::F32, &odd).unwrap();
        assert_eq!(bytes[..4], 0x7fc0_1234u32.to_le_bytes());
        let mut y = [0f32; 4];
        dequantize(DType::F32, &bytes, &mut y).unwrap();
        assert_eq!(y.map(f32::to_bits), odd.map(f32::to_bits));
        // Integers are value casts.
        let mut y = [0f32; 3];
        let ints: Vec<u8> = [-7i32, 0, 16_777_217].iter().flat_map(|v| v.to_le_bytes()).collect();
        dequantize(DType::I32, &ints, &mut y).unwrap();
        assert_eq!(y, [-7.0, 0.0, 16_777_216.0]);
        let longs: Vec<u8> = [-1i64, 1 << 40, i64::MIN].iter().flat_map(|v| v.to_le_bytes()).collect();
        dequantize(DType::I64, &longs, &mut y).unwrap();
        assert_eq!(y, [-1.0, 2f32.powi(40), -(2f32.powi(63))]);
    }

    #[test]
    fn wrong_sizes_are_errors_not_panics() {
        for dtype in DType::ALL {
            let (bs, ts) = (dtype.block_size(), dtype.type_size());
            // Empty is fine.
            dequantize(dtype, &[], &mut []).unwrap();
            if dtype.is_float() {
                assert!(quantize(dtype, &[]).unwrap().is_empty());
            }
            let good = vec![0u8; 2 * ts];
            let mut out = vec![0f32; 2 * bs];
            dequantize(dtype, &good, &mut out).unwrap();
            for len in [0, 2 * ts - 1, 2 * ts + 1, 3 * ts] {
                let err = dequantize(dtype, &good_or_more(len), &mut out).unwrap_err();
                assert!(matches!(err, QuantError::Size { .. }), "{dtype} {len}: {err}");
                let msg = err.to_string();
                assert!(msg.contains(dtype.name()) && msg.contains(&len.to_string()), "{msg}");
                assert!(msg.contains(&(2 * ts).to_string()), "{msg}");
            }
            if bs > 1 {
                let mut partial = vec![0f32; bs + 1];
                let err = dequantize(dtype, &good, &mut partial).unwrap_err();
                assert!(matches!(err, QuantError::PartialBlock { .. }), "{dtype}: {err}");
                assert!(err.to_string().contains(&(bs + 1).to_string()), "{err}");
                let err = quantize(dtype, &partial).unwrap_err();
                assert!(matches!(err, QuantError::PartialBlock { .. }), "{dtype}: {err}");
            }
            // The output is untouched on error.
            let mut out = vec![7f32; 2 * bs];
            assert!(dequantize(dtype, &good[1..], &mut out).is_err());
            assert!(out.iter().all(|&v| v == 7.0));
        }
        let err = quantize(DType::I32, &[1.0]).unwrap_err();
        assert!(matches!(err, QuantError::Unsupported(_)) && err.to_string().contains("i32"), "{err}");
        assert!(quantize(DType::I64, &[1.0]).is_err());
    }

    fn good_or_more(len: usize) -> Vec<u8> {
        vec![0x11; len]
    }

    /// Roughly normal samples (Box-Muller) times `scale` plus `offset`.
    fn normal(rng: &mut StdRng, n: usize, scale: f32, offset: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let (u, v): (f32, f32) = (rng.random_range(1e-7..1.0), rng.random());
                offset + scale * (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
            })
            .collect()
    }

    /// Test inputs: blocks of varied scale and offset, with outliers, zeros and constant blocks.
    fn test_rows(block: usize) -> Vec<Vec<f32>> {
        let mut rng = StdRng::seed_from_u64(7);
        let mut rows = vec![
            normal(&mut rng, 64 * block, 1.0, 0.0),
            normal(&mut rng, 16 * block, 0.02, 0.0),
            normal(&mut rng, 16 * block, 1e-3, 0.5),
            normal(&mut rng, 16 * block, 30.0, -100.0),
            vec![0.0; block],
            vec![-0.25; block],
        ];
        let mut spiky = normal(&mut rng, 16 * block, 0.1, 0.0);
        for i in (0..spiky.len()).step_by(37) {
            spiky[i] *= 50.0;
        }
        rows.push(spiky);
        rows
    }

    /// The 32-element formats: every value decodes to within half a quantization step `d` of the
    /// input, except values past the top level that had to be clamped to it (ggml's symmetric
    /// formats map the largest-magnitude value to -8 or -16 steps, so the other sign reaches only
    /// +7 or +15 steps) — those are within one step. Slack: `d` and `m` are used unrounded to pick
    /// the levels but stored as f16, which moves level q by q * |d - d16| + |m - m16|.
    #[test]
    fn round_trip_32_blocks_within_half_step() {
        for dtype in [DType::Q4_0, DType::Q4_1, DType::Q5_0, DType::Q5_1, DType::Q8_0] {
            let (qmax, symmetric) = match dtype {
                DType::Q4_0 => (8.0, true),
                DType::Q5_0 => (16.0, true),
                DType::Q8_0 => (127.0, true),
                DType::Q4_1 => (15.0, false),
                _ => (31.0, false),
            };
            for row in test_rows(32) {
                let bytes = quantize(dtype, &row).unwrap();
                let mut back = vec![0f32; row.len()];
                dequantize(dtype, &bytes, &mut back).unwrap();
                for (b, (x, y)) in row.chunks(32).zip(back.chunks(32)).enumerate() {
                    let blk = &bytes[b * dtype.type_size()..];
                    let (d, d16, m, m16) = if symmetric {
                        let d = if dtype == DType::Q8_0 {
                            x.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0
                        } else {
                            signed_absmax(x) / -qmax
                        };
                        (d, f16_at(blk, 0), 0.0, 0.0)
                    } else {
                        let (min, max) = min_max(x);
                        ((max - min) / qmax, f16_at(blk, 0), min, f16_at(blk, 2))
                    };
                    let slack = qmax * (d - d16).abs() + (m - m16).abs() + 1e-6 * x[0].abs().max(1e-30);
                    let half = 0.5 * d.abs() * (1.0 + 1e-5) + slack;
                    // The top level, which the other sign of a symmetric format may exceed.
                    let top = if symmetric { (qmax - 1.0) * d16.abs() } else { f32::INFINITY };
                    for (i, (&xv, &yv)) in x.iter().zip(y).enumerate() {
                        let err = (xv - yv).abs();
                        let clamped = dtype != DType::Q8_0
                            && xv * d16.signum() > 0.0
                            && xv.abs() > top
                            && (yv.abs() - top).abs() <= slack;
                        let bound = if clamped { 2.0 * half } else { half };
                        assert!(
                            err <= bound,
                            "{dtype} block {b} elt {i}: {xv} -> {yv}, error {err} > {bound} (d = {d})"
                        );
                    }
                }
            }
        }
    }

    /// The K-quant reference quantizers: each element sits at the nearest level of its decoded
    /// sub-block (ggml re-quantizes every element against the final f16/6-bit scales), or at the end
    /// level it was clamped to; and the overall error is small.
    #[test]
    fn round_trip_k_quants() {
        for (dtype, max_rel_rmse) in [(DType::Q4K, 0.1), (DType::Q5K, 0.06), (DType::Q6K, 0.04)] {
            for row in test_rows(QK_K) {
                let bytes = quantize(dtype, &row).unwrap();
                assert_eq!(bytes.len(), dtype.row_bytes(row.len()).unwrap());
                let mut back = vec![0f32; row.len()];
                dequantize(dtype, &bytes, &mut back).unwrap();
                let (mut se, mut sx) = (0f64, 0f64);
                for (b, (x, y)) in row.chunks(QK_K).zip(back.chunks(QK_K)).enumerate() {
                    let blk = &bytes[b * dtype.type_size()..(b + 1) * dtype.type_size()];
                    for i in 0..QK_K {
                        // (step, offset, lowest level, highest level) of element i: y = step * q - offset.
                        let (step, offset, lo, hi) = match dtype {
                            DType::Q6K => {
                                let sc = blk[192 + i / 16] as i8 as f32;
                                (f16_at(blk, 208) * sc, 0.0, -32.0, 31.0)
                            }
                            _ => {
                                let (sc, m) = scale_min_k4(i / 32, &blk[4..16]);
                                let hi = if dtype == DType::Q4K { 15.0 } else { 31.0 };
                                (f16_at(blk, 0) * sc as f32, f16_at(blk, 2) * m as f32, 0.0, hi)
                            }
                        };
                        let (xv, yv) = (x[i], y[i]);
                        se += f64::from(xv - yv).powi(2);
                        sx += f64::from(xv).powi(2);
                        if step == 0.0 {
                            assert_eq!(yv, -offset, "{dtype} block {b} elt {i}");
                            continue;
                        }
                        let q = ((yv + offset) / step).round();
                        let tol = 0.5 * step.abs() * (1.0 + 1e-4) + 1e-6 * xv.abs();
                        let below = xv - yv < -tol; // x is below y by more than half a step
                        let above = xv - yv > tol;
                        let at_lo = q == if step > 0.0 { lo } else { hi };
                        let at_hi = q == if step > 0.0 { hi } else { lo };
                        assert!(
                            (!below || at_lo) && (!above || at_hi),
                            "{dtype} block {b} elt {i}: {xv} -> {yv} (step {step}, level {q})"
                        );
                    }
                }
                let rel = (se / sx.max(1e-30)).sqrt();
                assert!(rel <= max_rel_rmse || sx == 0.0, "{dtype}: relative rms error {rel}");
            }
        }
    }

    #[test]
    fn k_quant_zero_block_is_zero() {
        for dtype in [DType::Q4K, DType::Q5K, DType::Q6K] {
            let bytes = quantize(dtype, &[0.0; QK_K]).unwrap();
            let mut y = [1f32; QK_K];
            dequantize(dtype, &bytes, &mut y).unwrap();
            assert!(y.iter().all(|&v| v == 0.0), "{dtype}");
        }
    }

    /// Large inputs take the parallel path; it must agree with block-by-block decoding.
    #[test]
    fn parallel_split_matches_single_blocks() {
        let mut rng = StdRng::seed_from_u64(3);
        for dtype in BLOCK_TYPES.into_iter().chain([DType::F16, DType::BF16, DType::F32]) {
            let n = (TASK_ELEMS * 3 / dtype.block_size() + 5) * dtype.block_size();
            let values = normal(&mut rng, n, 1.0, 0.0);
            let bytes = quantize(dtype, &values).unwrap();
            let ts = dtype.type_size();
            for (b, x) in values.chunks(dtype.block_size()).enumerate().step_by(97) {
                assert_eq!(quantize(dtype, x).unwrap(), bytes[b * ts..(b + 1) * ts], "{dtype} {b}");
            }
            let mut all = vec![0f32; n];
            dequantize(dtype, &bytes, &mut all).unwrap();
            let mut one = vec![0f32; dtype.block_size()];
            for (b, y) in all.chunks(dtype.block_size()).enumerate().step_by(97) {
                dequantize(dtype, &bytes[b * ts..(b + 1) * ts], &mut one).unwrap();
                assert_eq!(one, y, "{dtype} block {b}");
            }
        }
    }
}
