//! `kiln calibrate`: run a model over a calibration text and measure what lossy passes need (see
//! `kiln_passes::calibration` for the file format).
//!
//! The model is built with its block activations exposed as extra graph outputs (a graph edit, not a
//! runtime hook), so the compiled backend and the interpreter produce the same statistics. The text is
//! cut into chunks of `chunk` tokens, each run from an empty cache.

use crate::eval::token_nll;
use kiln_passes::calibration::{exposed_names, BlockActivations, LayerStats, StatsAccumulator};
use kiln_runtime::Backend;

/// Per-layer statistics and the model's mean NLL on `tokens` (targets scored within each chunk).
pub struct Measured {
    pub layers: Vec<LayerStats>,
    pub mean_nll: f64,
    pub scored: usize,
}

/// Runs `backend` (built with `calib.L.*` outputs for `n_layers` blocks, all-position logits) over
/// `tokens` in chunks of `chunk`; `progress` gets the tokens done so far.
pub fn measure(
    backend: &mut dyn Backend,
    tokens: &[u32],
    chunk: usize,
    n_layers: usize,
    mut progress: impl FnMut(usize),
) -> anyhow::Result<Measured> {
    anyhow::ensure!(chunk >= 2, "calibration chunk must be at least 2 tokens (got {chunk})");
    anyhow::ensure!(tokens.len() >= 2, "the calibration text has {} token(s); at least 2 are needed", tokens.len());
    let chunk = chunk.min(backend.context_length());
    let mut acc = StatsAccumulator::new(n_layers);
    let (mut sum, mut scored, mut done) = (0f64, 0usize, 0usize);
    for piece in tokens.chunks(chunk) {
        backend.reset();
        let logits = backend.forward(piece)?;
        anyhow::ensure!(logits.rows == piece.len(), "the backend returns the last position's logits only");
        for (j, &target) in piece.iter().enumerate().skip(1) {
            sum += token_nll(logits.row(j - 1), target);
        }
        scored += piece.len() - 1;
        for l in 0..n_layers {
            let names = exposed_names(l);
            let get = |i: usize| {
                backend
                    .output(&names[i])
                    .ok_or_else(|| anyhow::anyhow!("the model graph does not expose `{}`", names[i]))
            };
            let a = BlockActivations {
                x_in: get(0)?,
                x_mid: get(1)?,
                x_out: get(2)?,
                attn_in: get(3)?,
                attn_out_in: get(4)?,
                ffn_in: get(5)?,
                ffn_act: get(6)?,
                ffn_gate_act: get(7)?,
            };
            acc.add(l, piece.len(), &a).map_err(anyhow::Error::msg)?;
        }
        done += piece.len();
        progress(done);
    }
    backend.reset();
    anyhow::ensure!(scored > 0, "no token could be scored (chunks of one token)");
    Ok(Measured { layers: acc.finish(), mean_nll: sum / scored as f64, scored })
}
