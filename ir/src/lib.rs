//! Kiln's intermediate representation: a typed tensor graph with symbolic dimensions, a canonical text
//! form, a verifier, and the reference interpreter that is the oracle for every other stage.

pub mod blocks;
pub mod collective;
pub mod column;
pub mod coreinfer;
pub mod decompose;
pub mod dot;
pub mod dtype;
pub mod flex;
pub mod graph;
pub mod interp;
pub mod numeric;
pub mod op;
pub mod program;
pub mod quant;
pub mod shape;
pub mod sparse;
pub mod tensor;
pub mod text;
pub mod weights;

pub use dtype::DType;
pub use graph::{Graph, GraphError, Node, ValueId};
pub use interp::{Interpreter, Tensor};
pub use op::{Op, RopeMode, UnaryRule};
pub use shape::{Dim, SymEnv, TensorType};
pub use weights::{TensorData, WeightStore};
