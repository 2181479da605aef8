//! Dequantization (and reference quantization) of GGUF block formats. Filled in by the quant work.
use crate::dtype::DType;

#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error("{dtype}: {len} bytes is not {expected} bytes for {n} elements")]
    Size { dtype: DType, len: usize, expected: String, n: usize },
    #[error("{0}")]
    Unsupported(String),
}

pub fn dequantize(dtype: DType, bytes: &[u8], out: &mut [f32]) -> Result<(), QuantError> {
    let _ = (dtype, bytes, out);
    Err(QuantError::Unsupported("dequantize: being written".into()))
}
