//! The generation loop: prefill the prompt, then decode one token at a time.

use crate::backend::{Backend, RuntimeError};
use crate::sample::Sampler;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    MaxTokens,
    Eos,
    ContextFull,
    Callback,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct GenerateStats {
    pub prompt_tokens: usize,
    pub generated: Vec<u32>,
    pub stop: StopReason,
    pub prefill: Duration,
    pub decode: Duration,
}

/// Generates up to `max_tokens` after `prompt`, calling `on_token` with each new id (return `false` to
/// stop). Stops at any id in `stop_ids` (which is not passed to `on_token`) or when the context is full.
pub fn generate(
    backend: &mut dyn Backend,
    prompt: &[u32],
    max_tokens: usize,
    sampler: &mut Sampler,
    stop_ids: &[u32],
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<GenerateStats, RuntimeError> {
    let t0 = Instant::now();
    let logits = backend.forward(prompt)?;
    let prefill = t0.elapsed();
    let t1 = Instant::now();
    let mut generated = Vec::new();
    let mut next = sampler.sample(logits.last());
    let stop = loop {
        if generated.len() >= max_tokens {
            break StopReason::MaxTokens;
        }
        if stop_ids.contains(&next) {
            break StopReason::Eos;
        }
        generated.push(next);
        if !on_token(next) {
            break StopReason::Callback;
        }
        if generated.len() >= max_tokens {
            break StopReason::MaxTokens;
        }
        if backend.position() + 1 > backend.context_length() {
            break StopReason::ContextFull;
        }
        let logits = backend.forward(&[next])?;
        next = sampler.sample(logits.last());
    };
    Ok(GenerateStats { prompt_tokens: prompt.len(), generated, stop, prefill, decode: t1.elapsed() })
}
