//! Kiln's intermediate representation: a typed tensor graph with symbolic dimensions, a canonical text
//! form, a verifier, and the reference interpreter that is the oracle for every other stage.

pub mod dtype;
pub mod quant;
pub mod weights;

pub use dtype::DType;
pub use weights::{TensorData, WeightStore};
