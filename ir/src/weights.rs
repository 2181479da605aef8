//! Weight tensors as raw bytes in their stored dtype (possibly block-quantized), shared zero-copy with
//! the file they were read from (`bytes::Bytes` over an mmap).

use crate::dtype::DType;
use crate::quant;
use bytes::Bytes;
use std::collections::BTreeMap;

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
