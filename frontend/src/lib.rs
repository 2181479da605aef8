//! Kiln's importers: model files in, IR graphs + weights + tokenizer out.
//!
//! - [`gguf`]: llama.cpp's GGUF format (reader hardened against hostile files, and a writer).
//! - [`model`]: loading GGUF or Hugging Face safetensors + config.json into one normalised [`Model`].
//! - [`llama`]: the Llama-family decoder graph builder (Llama, SmolLM2, Mistral, Qwen2).
//! - [`export`]: writing models back out (HF directory, GGUF), used by tests and conversions.
//! - [`tokenizer`]: BPE tokenizers from GGUF metadata or tokenizer.json, chat templates.

pub mod error;
pub mod export;
pub mod gguf;
pub mod llama;
pub mod model;
pub mod tokenizer;

pub use error::FrontendError;
pub use llama::{Arch, LlamaConfig, RopeScaling};
pub use model::Model;
