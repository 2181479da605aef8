//! Kiln's importers: model files in, IR graphs + weights + tokenizer out.

pub mod gguf;
pub mod tokenizer;
