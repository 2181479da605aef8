//! Decoder blocks of a graph: the analysis lives in `kiln_ir::blocks` (codegen uses it too, to mark each
//! block's launches so the runtime can skip whole blocks); re-exported here for the passes.

pub use kiln_ir::blocks::*;
