//! Weight tensors as raw bytes in their stored dtype (possibly block-quantized), shared zero-copy with
//! the file they were read from (`bytes::Bytes` over an mmap).

use crate::dtype::DType;
use crate::quant;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::ops::Range;

/// Why a derived weight (slice, gather, concatenation) cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum DeriveError {
    #[error("{op}: needs a 2-D weight, found shape {shape:?}")]
    NotMatrix { op: &'static str, shape: Vec<usize> },
    #[error("{op}: {what} out of range (size {size})")]
    OutOfRange { op: &'static str, what: String, size: usize },
    #[error("slice_cols: columns {start}..{end} are not aligned to {dtype}'s {block}-element blocks")]
    Unaligned { start: usize, end: usize, dtype: DType, block: usize },
    #[error("concat_rows: parts differ ({0})")]
    Mismatch(String),
    #[error(transparent)]
    Quant(#[from] quant::QuantError),
}

/// One tensor's data. `shape` is row-major, outermost first (the reverse of GGUF's `ne` order).
#[derive(Clone, Debug)]
pub struct TensorData {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub bytes: Bytes,
}

impl TensorData {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Dequantizes (or converts) the whole tensor to f32.
    pub fn to_f32(&self) -> Result<Vec<f32>, quant::QuantError> {
        let mut out = vec![0f32; self.numel()];
        if self.dtype.is_column() {
            let [k, n] = self.shape[..] else {
                return Err(quant::QuantError::Unsupported(format!("{} tensor of shape {:?}", self.dtype, self.shape)));
            };
            crate::column::dequantize(self.dtype, k, n, &self.bytes, &mut out)
                .map_err(|e| quant::QuantError::Unsupported(e.to_string()))?;
            return Ok(out);
        }
        if self.dtype.is_gathered() {
            let [k, n] = self.shape[..] else {
                return Err(quant::QuantError::Unsupported(format!("{} tensor of shape {:?}", self.dtype, self.shape)));
            };
            crate::column::dequantize_gathered(self.dtype, k, n, &self.bytes, &mut out)
                .map_err(|e| quant::QuantError::Unsupported(e.to_string()))?;
            return Ok(out);
        }
        quant::dequantize(self.dtype, &self.bytes, &mut out)?;
        Ok(out)
    }

    /// Builds an f32 tensor from values (used by tests and writers).
    pub fn from_f32(shape: Vec<usize>, values: &[f32]) -> TensorData {
        assert_eq!(shape.iter().product::<usize>(), values.len());
        let mut bytes = Vec::with_capacity(values.len() * 4);
        for v in values {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        TensorData { dtype: DType::F32, shape, bytes: Bytes::from(bytes) }
    }
}

/// Derived weights: new tensors made from slices, gathers and concatenations of a 2-D weight `[rows, cols]`
/// (rows = output features of a `linear`). Row operations keep the stored dtype (a row of a block format
/// is whole blocks); column slices keep it when block-aligned; column gathers give f32.
impl TensorData {
    fn dims2(&self, op: &'static str) -> Result<(usize, usize, usize), DeriveError> {
        match self.shape[..] {
            [r, c] => {
                let rb = self.dtype.row_bytes(c).ok_or(DeriveError::Unaligned {
                    start: 0,
                    end: c,
                    dtype: self.dtype,
                    block: self.dtype.block_size(),
                })?;
                Ok((r, c, rb))
            }
            _ => Err(DeriveError::NotMatrix { op, shape: self.shape.clone() }),
        }
    }

    /// Rows `range` (zero-copy).
    pub fn slice_rows(&self, range: Range<usize>) -> Result<TensorData, DeriveError> {
        let (r, c, rb) = self.dims2("slice_rows")?;
        if range.start > range.end || range.end > r {
            return Err(DeriveError::OutOfRange { op: "slice_rows", what: format!("rows {range:?}"), size: r });
        }
        Ok(TensorData {
            dtype: self.dtype,
            shape: vec![range.len(), c],
            bytes: self.bytes.slice(range.start * rb..range.end * rb),
        })
    }

    /// The listed rows, in the order given (repeats allowed).
    pub fn gather_rows(&self, rows: &[usize]) -> Result<TensorData, DeriveError> {
        let (r, c, rb) = self.dims2("gather_rows")?;
        let mut out = Vec::with_capacity(rows.len() * rb);
        for &i in rows {
            if i >= r {
                return Err(DeriveError::OutOfRange { op: "gather_rows", what: format!("row {i}"), size: r });
            }
            out.extend_from_slice(&self.bytes[i * rb..(i + 1) * rb]);
        }
        Ok(TensorData { dtype: self.dtype, shape: vec![rows.len(), c], bytes: Bytes::from(out) })
    }

    /// The parts stacked row-wise; all must share dtype and column count.
    pub fn concat_rows(parts: &[&TensorData]) -> Result<TensorData, DeriveError> {
        let first = parts.first().ok_or_else(|| DeriveError::Mismatch("no parts".into()))?;
        let (_, c, _) = first.dims2("concat_rows")?;
        let mut rows = 0;
        let mut out = Vec::new();
        for p in parts {
            let (r, pc, _) = p.dims2("concat_rows")?;
            if p.dtype != first.dtype || pc != c {
                return Err(DeriveError::Mismatch(format!("{} [_, {c}] vs {} [_, {pc}]", first.dtype, p.dtype)));
            }
            rows += r;
            out.extend_from_slice(&p.bytes);
        }
        Ok(TensorData { dtype: first.dtype, shape: vec![rows, c], bytes: Bytes::from(out) })
    }

    /// Columns `range` of every row, in the stored dtype; the bounds must be multiples of the block size.
    pub fn slice_cols(&self, range: Range<usize>) -> Result<TensorData, DeriveError> {
        let (r, c, rb) = self.dims2("slice_cols")?;
        if range.start > range.end || range.end > c {
            return Err(DeriveError::OutOfRange { op: "slice_cols", what: format!("columns {range:?}"), size: c });
        }
        let block = self.dtype.block_size();
        if !range.start.is_multiple_of(block) || !range.end.is_multiple_of(block) {
            return Err(DeriveError::Unaligned { start: range.start, end: range.end, dtype: self.dtype, block });
        }
        let (b0, b1) = (range.start / block * self.dtype.type_size(), range.end / block * self.dtype.type_size());
        let mut out = Vec::with_capacity(r * (b1 - b0));
        for i in 0..r {
            out.extend_from_slice(&self.bytes[i * rb + b0..i * rb + b1]);
        }
        Ok(TensorData { dtype: self.dtype, shape: vec![r, range.len()], bytes: Bytes::from(out) })
    }

    /// The column ranges of every row, concatenated in the order given, in the stored dtype (every bound
    /// a multiple of the block size): e.g. the columns of some attention heads.
    pub fn gather_col_ranges(&self, ranges: &[Range<usize>]) -> Result<TensorData, DeriveError> {
        let (r, _, _) = self.dims2("gather_col_ranges")?;
        let parts = ranges.iter().map(|g| self.slice_cols(g.clone())).collect::<Result<Vec<_>, _>>()?;
        let cols: usize = parts.iter().map(|p| p.shape[1]).sum();
        let mut out = Vec::with_capacity(parts.iter().map(|p| p.bytes.len()).sum());
        for i in 0..r {
            for p in &parts {
                let rb = p.bytes.len() / r.max(1);
                out.extend_from_slice(&p.bytes[i * rb..(i + 1) * rb]);
            }
        }
        Ok(TensorData { dtype: self.dtype, shape: vec![r, cols], bytes: Bytes::from(out) })
    }

    /// The listed columns of every row, in the order given, dequantized to f32.
    pub fn gather_cols(&self, cols: &[usize]) -> Result<TensorData, DeriveError> {
        let (r, c, _) = self.dims2("gather_cols")?;
        if let Some(&bad) = cols.iter().find(|&&j| j >= c) {
            return Err(DeriveError::OutOfRange { op: "gather_cols", what: format!("column {bad}"), size: c });
        }
        let all = self.to_f32()?;
        let mut vals = Vec::with_capacity(r * cols.len());
        for i in 0..r {
            vals.extend(cols.iter().map(|&j| all[i * c + j]));
        }
        Ok(TensorData::from_f32(vec![r, cols.len()], &vals))
    }
}

/// Named weights of a model, in a deterministic (sorted) order.
#[derive(Clone, Debug, Default)]
pub struct WeightStore {
    tensors: BTreeMap<String, TensorData>,
}

impl WeightStore {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn insert(&mut self, name: impl Into<String>, t: TensorData) {
        self.tensors.insert(name.into(), t);
    }
    pub fn get(&self, name: &str) -> Option<&TensorData> {
        self.tensors.get(name)
    }
    pub fn remove(&mut self, name: &str) -> Option<TensorData> {
        self.tensors.remove(name)
    }
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
    pub fn iter(&self) -> impl Iterator<Item = (&String, &TensorData)> {
        self.tensors.iter()
    }
    pub fn len(&self) -> usize {
        self.tensors.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Q4_1 [rows, cols] weight and its dequantized values.
    fn q41(rows: usize, cols: usize) -> (TensorData, Vec<f32>) {
        let vals: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919) % 113) as f32 / 17.0 - 3.0).collect();
        let t = TensorData {
            dtype: DType::Q4_1,
            shape: vec![rows, cols],
            bytes: Bytes::from(quant::quantize(DType::Q4_1, &vals).unwrap()),
        };
        let deq = t.to_f32().unwrap();
        (t, deq)
    }

    #[test]
    fn derived_weights_match_dequantized_slices() {
        let (t, d) = q41(5, 96);
        let at = |r: usize, c: usize| d[r * 96 + c];
        let s = t.slice_rows(1..4).unwrap();
        assert_eq!((s.dtype, s.shape.clone()), (DType::Q4_1, vec![3, 96]));
        assert_eq!(
            s.to_f32().unwrap(),
            (1..4).flat_map(|r| (0..96).map(move |c| (r, c))).map(|(r, c)| at(r, c)).collect::<Vec<_>>()
        );
        let g = t.gather_rows(&[4, 0, 4]).unwrap();
        assert_eq!(
            g.to_f32().unwrap(),
            [4, 0, 4].iter().flat_map(|&r| (0..96).map(move |c| (r, c))).map(|(r, c)| at(r, c)).collect::<Vec<_>>()
        );
        let cc = TensorData::concat_rows(&[&s, &g]).unwrap();
        assert_eq!(cc.shape, vec![6, 96]);
        assert_eq!(cc.to_f32().unwrap(), [s.to_f32().unwrap(), g.to_f32().unwrap()].concat());
        let sc = t.slice_cols(32..96).unwrap();
        assert_eq!(
            sc.to_f32().unwrap(),
            (0..5).flat_map(|r| (32..96).map(move |c| (r, c))).map(|(r, c)| at(r, c)).collect::<Vec<_>>()
        );
        let gc = t.gather_cols(&[95, 3, 40]).unwrap();
        assert_eq!(gc.dtype, DType::F32);
        assert_eq!(gc.to_f32().unwrap(), (0..5).flat_map(|r| [95, 3, 40].map(|c| at(r, c))).collect::<Vec<_>>());
        let gr = t.gather_col_ranges(&[64..96, 0..32]).unwrap();
        assert_eq!((gr.dtype, gr.shape.clone()), (DType::Q4_1, vec![5, 64]));
        assert_eq!(
            gr.to_f32().unwrap(),
            (0..5).flat_map(|r| (64..96).chain(0..32).map(move |c| (r, c))).map(|(r, c)| at(r, c)).collect::<Vec<_>>()
        );
        assert!(matches!(t.gather_col_ranges(&[0..32, 40..56]), Err(DeriveError::Unaligned { .. })));
    }

    #[test]
    fn derived_weights_reject_bad_requests() {
        let (t, _) = q41(5, 96);
        assert!(matches!(t.slice_rows(3..6), Err(DeriveError::OutOfRange { .. })));
        assert!(matches!(t.gather_rows(&[5]), Err(DeriveError::OutOfRange { .. })));
        assert!(matches!(t.slice_cols(16..48), Err(DeriveError::Unaligned { .. })));
        assert!(matches!(t.gather_cols(&[96]), Err(DeriveError::OutOfRange { .. })));
        let (u, _) = q41(2, 64);
        assert!(matches!(TensorData::concat_rows(&[&t, &u]), Err(DeriveError::Mismatch(_))));
        let v = TensorData::from_f32(vec![4], &[1.0; 4]);
        assert!(matches!(v.slice_rows(0..1), Err(DeriveError::NotMatrix { .. })));
    }
}
