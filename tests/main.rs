//! Kiln's integration tests, in one binary (LLVM-linked binaries are large; one link is enough).
//!
//! Tests that need the default model expect it in the cache (`scripts/setup.sh` puts it there; the
//! README's test command runs that first) and fail with a clear message otherwise.

mod bad_input;
mod common;
mod compiled;
mod coreinfer;
mod embed;
mod flexprefill;
mod fuzz;
mod gemma3;
mod golden;
mod import_roundtrip;
mod ir_text;
mod layout;
mod lift;
mod llamacpp;
mod ops;
mod quality;
mod rope_scaling;
mod sliding_window;
mod sparsity;
mod structured;
mod tokenizer;
mod tp;
mod transformers_refs;
