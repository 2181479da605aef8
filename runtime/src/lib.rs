//! Kiln's runtime: runs a decoder graph step by step with a KV cache (prefill, then decode) on a
//! [`Backend`], and samples tokens.
//!
//! Backends today: the reference interpreter ([`InterpreterBackend`]). Compiled CPU code and CUDA plug in
//! behind the same trait. The runtime never depends on the frontend: it takes a graph and weights.

pub mod backend;
pub mod compiled;
pub mod dist;
pub mod early_exit;
pub mod generate;
pub mod pool;
pub mod sample;

pub use backend::{check_batch, core_share, Backend, InterpreterBackend, Logits, RuntimeError, SeqId, SeqTokens};
pub use compiled::{ArtifactError, CompiledBackend, KernelFn, KernelSource};
pub use generate::{generate, GenerateStats, StopReason};
pub use sample::{Sampler, SamplingParams};
