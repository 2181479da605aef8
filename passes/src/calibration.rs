//! Calibration data: per-layer statistics measured by running a model on a calibration text, shared by
//! every lossy pass (layer skipping reads block influence; sparsity reads activation magnitudes).
//!
//! The file is JSON, schema [`CALIBRATION_FORMAT`] version [`CALIBRATION_VERSION`] (documented field by
//! field on [`Calibration`] and in `docs/calibration.md`). Readers must check `format` and `version`
//! ([`Calibration::from_json`] does); a new field that old readers may ignore does not bump the version, a
//! changed meaning does.
//!
//! [`StatsAccumulator`] turns the activations of each block, token by token, into the statistics. How the
//! activations are obtained (which backend, which text) is the caller's business; the graph side is
//! [`expose_block_values`], which marks the values it needs as extra graph outputs.

use crate::blocks::find_blocks;
use kiln_ir::Graph;
use serde::{Deserialize, Serialize};

pub const CALIBRATION_FORMAT: &str = "kiln-calibration";
pub const CALIBRATION_VERSION: u32 = 2;

/// The quantile levels recorded per channel (`*_abs_quantiles`): 0.05, 0.10, …, 0.95.
pub fn quantile_levels() -> Vec<f32> {
    (1..20).map(|i| i as f32 * 0.05).collect()
}

/// A calibration file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// Always [`CALIBRATION_FORMAT`].
    pub format: String,
    /// Schema version, [`CALIBRATION_VERSION`].
    pub version: u32,
    /// The model's name and the blake3 hash of its source files (as in artifact manifests).
    pub model: String,
    pub source_hash: String,
    /// The calibration text: file name as given, blake3 of its bytes, tokens scored.
    pub text: CalibrationText,
    /// Tokens per forward pass (each chunk is run from an empty cache).
    pub chunk: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    /// Mean negative log-likelihood (nats per token) and perplexity of the full model on the text,
    /// chunk by chunk (the first token of each chunk is not scored).
    pub mean_nll: f64,
    pub perplexity: f64,
    /// The levels `q` of every `*_abs_quantiles` vector, increasing in (0, 1).
    pub quantile_levels: Vec<f32>,
    /// One entry per decoder block, in layer order.
    pub layers: Vec<LayerStats>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CalibrationText {
    pub file: String,
    pub blake3: String,
    pub tokens: usize,
}

/// Statistics of one decoder block, averaged over every token of the calibration text.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerStats {
    pub layer: usize,
    /// Block influence: mean over tokens of 1 − cos(x_in, x_out), the residual stream entering and
    /// leaving the block (ShortGPT's "block influence"). 0: the block changes nothing's direction.
    pub block_influence: f64,
    /// The same for the attention half (x_in → x_mid) and the MLP half (x_mid → x_out).
    pub attn_influence: f64,
    pub ffn_influence: f64,
    /// Mean over tokens of ‖x_out − x_in‖ / ‖x_in‖.
    pub relative_update: f64,
    /// Per channel, mean |activation| over tokens: the input of the Q/K/V projections (`hidden_size`).
    pub attn_in_mean_abs: Vec<f32>,
    /// Input of the attention output projection (`n_heads · head_dim`).
    pub attn_out_in_mean_abs: Vec<f32>,
    /// Input of the gate/up projections (`hidden_size`).
    pub ffn_in_mean_abs: Vec<f32>,
    /// The SwiGLU activation silu(gate)·up, the input of the down projection (`intermediate_size`).
    pub ffn_act_mean_abs: Vec<f32>,
    /// Per channel of the gate activation silu(gate) (`intermediate_size`), the |activation| below which
    /// a share `q` of the tokens fall, for each `q` of `quantile_levels` (activation sparsity thresholds).
    pub ffn_gate_abs_quantiles: Vec<Vec<f32>>,
    /// The same for the input of the Q/K/V projections (`hidden_size`).
    pub attn_in_abs_quantiles: Vec<Vec<f32>>,
    /// The same for the input of the attention output projection (`n_heads · head_dim`). Empty in files
    /// written before it was recorded (`chess` on the output projection then asks for a new calibration).
    #[serde(default)]
    pub attn_out_in_abs_quantiles: Vec<Vec<f32>>,
    /// The same for the MLP input (the normed hidden state gate/up read, `hidden_size`). Empty in older
    /// files.
    #[serde(default)]
    pub ffn_in_abs_quantiles: Vec<Vec<f32>>,
    /// The same for the down projection's input silu(gate)·up (`intermediate_size`). Empty in older files.
    #[serde(default)]
    pub ffn_act_abs_quantiles: Vec<Vec<f32>>,
    /// Per thresholdable activation ([`Activation::name`]), the quantiles of |value| over every channel
    /// and token pooled (one curve per layer: per-layer thresholds). Empty in older files.
    #[serde(default)]
    pub layer_abs_quantiles: std::collections::BTreeMap<String, Vec<f32>>,
}

/// An activation whose channels `chess` can threshold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// silu(gate) (`intermediate_size`).
    FfnGate,
    /// The MLP input, read by gate and up (`hidden_size`).
    FfnIn,
    /// silu(gate)·up, read by down (`intermediate_size`).
    FfnAct,
    /// The normed block input, read by Q/K/V (`hidden_size`).
    AttnIn,
    /// The attention result, read by the output projection.
    AttnOutIn,
}

impl Activation {
    pub const ALL: [Activation; 5] =
        [Activation::FfnGate, Activation::FfnIn, Activation::FfnAct, Activation::AttnIn, Activation::AttnOutIn];

    pub fn name(self) -> &'static str {
        match self {
            Activation::FfnGate => "ffn_gate",
            Activation::FfnIn => "ffn_in",
            Activation::FfnAct => "ffn_act",
            Activation::AttnIn => "attn_in",
            Activation::AttnOutIn => "attn_out_in",
        }
    }
}

impl LayerStats {
    /// Per channel of the gate activation, the threshold below which a share `sparsity` of its
    /// calibration values fall (linear between the recorded levels; 0 at sparsity 0).
    pub fn ffn_gate_thresholds(&self, levels: &[f32], sparsity: f64) -> Vec<f32> {
        self.ffn_gate_abs_quantiles.iter().map(|q| interpolate_quantile(levels, q, sparsity)).collect()
    }

    /// The same for the input of the Q/K/V projections.
    pub fn attn_in_thresholds(&self, levels: &[f32], sparsity: f64) -> Vec<f32> {
        self.attn_in_abs_quantiles.iter().map(|q| interpolate_quantile(levels, q, sparsity)).collect()
    }

    /// The same for the input of the attention output projection (empty when the file does not have it).
    pub fn attn_out_in_thresholds(&self, levels: &[f32], sparsity: f64) -> Vec<f32> {
        self.attn_out_in_abs_quantiles.iter().map(|q| interpolate_quantile(levels, q, sparsity)).collect()
    }

    /// The thresholds of `which` at `sparsity`, one per channel: each channel's own quantile, or with
    /// `per_layer` the quantile of all channels pooled (the same value for every channel). Errors when
    /// the file does not record that activation (older calibration files).
    pub fn thresholds(
        &self,
        which: Activation,
        levels: &[f32],
        sparsity: f64,
        per_layer: bool,
    ) -> Result<Vec<f32>, String> {
        let (per_channel, width) = match which {
            Activation::FfnGate => (&self.ffn_gate_abs_quantiles, self.ffn_act_mean_abs.len()),
            Activation::FfnIn => (&self.ffn_in_abs_quantiles, self.ffn_in_mean_abs.len()),
            Activation::FfnAct => (&self.ffn_act_abs_quantiles, self.ffn_act_mean_abs.len()),
            Activation::AttnIn => (&self.attn_in_abs_quantiles, self.attn_in_mean_abs.len()),
            Activation::AttnOutIn => (&self.attn_out_in_abs_quantiles, self.attn_out_in_mean_abs.len()),
        };
        let missing = |what: &str| {
            format!(
                "the calibration file has no {what} quantiles of {} (layer {}); re-run `kiln calibrate`",
                which.name(),
                self.layer
            )
        };
        if per_layer {
            let q = self.layer_abs_quantiles.get(which.name()).ok_or_else(|| missing("per-layer"))?;
            Ok(vec![interpolate_quantile(levels, q, sparsity); width])
        } else if per_channel.is_empty() {
            Err(missing("per-channel"))
        } else {
            Ok(per_channel.iter().map(|q| interpolate_quantile(levels, q, sparsity)).collect())
        }
    }
}

/// The value at level `p` of a quantile curve known at `levels` (increasing): 0 at p = 0, linear
/// between levels, the last level's value above it.
pub fn interpolate_quantile(levels: &[f32], values: &[f32], p: f64) -> f32 {
    if p <= 0.0 || levels.is_empty() {
        return 0.0;
    }
    let mut prev = (0f64, 0f64);
    for (&l, &v) in levels.iter().zip(values) {
        let (l, v) = (l as f64, v as f64);
        if p <= l {
            let t = (p - prev.0) / (l - prev.0);
            return (prev.1 + t * (v - prev.1)) as f32;
        }
        prev = (l, v);
    }
    prev.1 as f32
}

impl Calibration {
    /// Parses and checks a calibration file's text; errors say what is wrong (the caller adds the path).
    pub fn from_json(text: &str) -> Result<Calibration, String> {
        let head: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        let format = head.get("format").and_then(|v| v.as_str());
        if format != Some(CALIBRATION_FORMAT) {
            return Err(format!(
                "not a Kiln calibration file (`format` is {format:?}, expected \"{CALIBRATION_FORMAT}\")"
            ));
        }
        let version = head.get("version").and_then(|v| v.as_u64());
        if version != Some(CALIBRATION_VERSION as u64) {
            return Err(format!(
                "calibration format version {version:?}; this Kiln reads version {CALIBRATION_VERSION} (re-run `kiln calibrate`)"
            ));
        }
        let c: Calibration = serde_json::from_value(head).map_err(|e| format!("invalid calibration file: {e}"))?;
        c.check()?;
        Ok(c)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("calibration serialises")
    }

    fn check(&self) -> Result<(), String> {
        if self.layers.is_empty() {
            return Err("no layers".into());
        }
        let lv = &self.quantile_levels;
        if lv.iter().any(|&q| !(q > 0.0 && q < 1.0)) || lv.windows(2).any(|w| w[0] >= w[1]) {
            return Err("quantile_levels must increase strictly within (0, 1)".into());
        }
        for (i, l) in self.layers.iter().enumerate() {
            if l.layer != i {
                return Err(format!("layers[{i}] is layer {}; layers must be listed in order from 0", l.layer));
            }
            let finite = [l.block_influence, l.attn_influence, l.ffn_influence, l.relative_update];
            if finite.iter().any(|v| !v.is_finite()) {
                return Err(format!("layer {i}: a statistic is not finite"));
            }
            if l.attn_in_mean_abs.len() != self.hidden_size || l.ffn_in_mean_abs.len() != self.hidden_size {
                return Err(format!(
                    "layer {i}: per-channel statistics do not have hidden_size = {}",
                    self.hidden_size
                ));
            }
            let q = self.quantile_levels.len();
            if l.ffn_gate_abs_quantiles.len() != self.intermediate_size
                || l.attn_in_abs_quantiles.len() != self.hidden_size
                || l.ffn_gate_abs_quantiles.iter().chain(&l.attn_in_abs_quantiles).any(|v| v.len() != q)
            {
                return Err(format!(
                    "layer {i}: per-channel quantiles must be intermediate_size/hidden_size vectors of {q} levels"
                ));
            }
            let out_width = l.attn_out_in_mean_abs.len();
            if !l.attn_out_in_abs_quantiles.is_empty()
                && (l.attn_out_in_abs_quantiles.len() != out_width
                    || l.attn_out_in_abs_quantiles.iter().any(|v| v.len() != q))
            {
                return Err(format!(
                    "layer {i}: attn_out_in_abs_quantiles must be {out_width} vectors (attn_out_in_mean_abs) of {q} levels"
                ));
            }
            for (name, v, width) in [
                ("ffn_in", &l.ffn_in_abs_quantiles, self.hidden_size),
                ("ffn_act", &l.ffn_act_abs_quantiles, self.intermediate_size),
            ] {
                if !v.is_empty() && (v.len() != width || v.iter().any(|c| c.len() != q)) {
                    return Err(format!("layer {i}: {name}_abs_quantiles must be {width} vectors of {q} levels"));
                }
            }
            if let Some((name, v)) = l.layer_abs_quantiles.iter().find(|(_, v)| v.len() != q) {
                return Err(format!("layer {i}: layer_abs_quantiles.{name} must have {q} levels, not {}", v.len()));
            }
            if l.ffn_act_mean_abs.len() != self.intermediate_size {
                return Err(format!(
                    "layer {i}: ffn_act_mean_abs does not have intermediate_size = {}",
                    self.intermediate_size
                ));
            }
        }
        Ok(())
    }

    /// Block influence per layer.
    pub fn influence(&self) -> Vec<f64> {
        self.layers.iter().map(|l| l.block_influence).collect()
    }
}

/// Output names [`expose_block_values`] adds for layer `l`.
pub fn exposed_names(l: usize) -> [String; 8] {
    ["x_in", "x_mid", "x_out", "attn_in", "attn_out_in", "ffn_in", "ffn_act", "ffn_gate_act"]
        .map(|s| format!("calib.{l}.{s}"))
}

/// Marks the values calibration measures as extra graph outputs (`calib.L.x_in`, …; see
/// [`exposed_names`]), a generic graph edit so any backend can return them. Returns the number of blocks.
pub fn expose_block_values(g: &mut Graph) -> Result<usize, String> {
    let blocks = find_blocks(g)?;
    for b in &blocks {
        let names = exposed_names(b.layer);
        // The gate activation silu(gate) is inside the swiglu op; expose it as a node of its own.
        let act = g.node(b.ffn_act);
        if act.op != kiln_ir::Op::SwiGlu {
            return Err(format!("block {}: the down projection does not read a swiglu", b.layer));
        }
        let gate = act.inputs[0];
        let gate_act = g.add(kiln_ir::Op::Silu, &[gate]).map_err(|e| e.to_string())?;
        let vals = [b.x_in, b.x_mid, b.x_out, b.attn_in, b.attn_out_in, b.ffn_in, b.ffn_act, gate_act];
        for (n, v) in names.iter().zip(vals) {
            g.output(n, v);
        }
    }
    Ok(blocks.len())
}

/// 1 − cos(a, b), in f64; 0 for zero vectors.
pub fn one_minus_cos(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 || bb == 0.0 {
        return 0.0;
    }
    1.0 - ab / (aa.sqrt() * bb.sqrt())
}

#[derive(Clone, Debug, Default)]
struct LayerAcc {
    tokens: usize,
    block: f64,
    attn: f64,
    ffn: f64,
    update: f64,
    attn_in: Vec<f64>,
    attn_out_in: Vec<f64>,
    ffn_in: Vec<f64>,
    ffn_act: Vec<f64>,
    gate_hist: AbsHistogram,
    attn_in_hist: AbsHistogram,
    attn_out_in_hist: AbsHistogram,
    ffn_in_hist: AbsHistogram,
    ffn_act_hist: AbsHistogram,
}

/// Per-channel histograms of |x| on a log scale: bin 0 holds |x| < 2^LOG_MIN (and 0), then
/// `BINS_PER_OCTAVE` bins per octave up to 2^LOG_MAX (larger values go to the last bin). Quantiles are
/// read off by interpolating geometrically within a bin (relative error ≤ 2^(1/8) − 1 ≈ 9%), which keeps
/// memory fixed however long the calibration text is.
#[derive(Clone, Debug, Default)]
struct AbsHistogram {
    channels: usize,
    counts: Vec<u32>,
    total: u64,
}

const LOG_MIN: i32 = -24;
const LOG_MAX: i32 = 8;
const BINS_PER_OCTAVE: i32 = 8;
const BINS: usize = ((LOG_MAX - LOG_MIN) * BINS_PER_OCTAVE + 1) as usize;

impl AbsHistogram {
    fn bin(x: f32) -> usize {
        let a = x.abs();
        if a.is_nan() || a < (LOG_MIN as f32).exp2() {
            return 0;
        }
        let b = ((a.log2() - LOG_MIN as f32) * BINS_PER_OCTAVE as f32).floor() as i64 + 1;
        b.clamp(1, BINS as i64 - 1) as usize
    }

    fn add(&mut self, rows: &[f32], width: usize) {
        if self.channels == 0 {
            self.channels = width;
            self.counts = vec![0; width * BINS];
        }
        for row in rows.chunks_exact(width) {
            for (c, &x) in row.iter().enumerate() {
                self.counts[c * BINS + Self::bin(x)] += 1;
            }
            self.total += 1;
        }
    }

    /// Per channel, the |x| below which a share `q` of the values fall, for each level.
    fn quantiles(&self, levels: &[f32]) -> Vec<Vec<f32>> {
        (0..self.channels)
            .map(|c| {
                let h = &self.counts[c * BINS..(c + 1) * BINS];
                levels.iter().map(|&q| quantile_of(h, self.total, q as f64)).collect()
            })
            .collect()
    }

    /// The quantiles of every channel's values pooled.
    fn pooled_quantiles(&self, levels: &[f32]) -> Vec<f32> {
        let mut h = vec![0u32; BINS];
        for c in 0..self.channels {
            for (p, &n) in h.iter_mut().zip(&self.counts[c * BINS..(c + 1) * BINS]) {
                *p = p.saturating_add(n); // 2^32 values per bin: far beyond any calibration text
            }
        }
        let total = self.total * self.channels as u64;
        levels.iter().map(|&q| quantile_of(&h, total, q as f64)).collect()
    }
}

fn quantile_of(h: &[u32], total: u64, q: f64) -> f32 {
    // Levels are f32 (0.8 is 0.8000000119…): a relative slack keeps exact shares on their bin.
    let target = q * total as f64 * (1.0 - 1e-6);
    let mut below = 0f64;
    for (b, &n) in h.iter().enumerate() {
        let n = n as f64;
        if n > 0.0 && below + n >= target {
            if b == 0 {
                return 0.0;
            }
            let frac = ((target - below) / n).clamp(0.0, 1.0);
            let lo = LOG_MIN as f64 + (b - 1) as f64 / BINS_PER_OCTAVE as f64;
            return (lo + frac / BINS_PER_OCTAVE as f64).exp2() as f32;
        }
        below += n;
    }
    (LOG_MAX as f32).exp2()
}

fn add_abs(acc: &mut Vec<f64>, rows: &[f32], width: usize) {
    if acc.is_empty() {
        acc.resize(width, 0.0);
    }
    for row in rows.chunks_exact(width) {
        for (a, &x) in acc.iter_mut().zip(row) {
            *a += x.abs() as f64;
        }
    }
}

/// The activations of one block over `tokens` positions, row-major `[tokens, width]` each.
pub struct BlockActivations<'a> {
    pub x_in: &'a [f32],
    pub x_mid: &'a [f32],
    pub x_out: &'a [f32],
    pub attn_in: &'a [f32],
    pub attn_out_in: &'a [f32],
    pub ffn_in: &'a [f32],
    pub ffn_act: &'a [f32],
    /// silu(gate), the gate activation (`intermediate_size` wide).
    pub ffn_gate_act: &'a [f32],
}

/// Sums per-token statistics over chunks; [`StatsAccumulator::finish`] averages them.
#[derive(Clone, Debug)]
pub struct StatsAccumulator {
    layers: Vec<LayerAcc>,
}

impl StatsAccumulator {
    pub fn new(n_layers: usize) -> Self {
        StatsAccumulator { layers: vec![LayerAcc::default(); n_layers] }
    }

    /// Adds `tokens` positions of block `layer`. Widths come from the slices (`len / tokens`).
    pub fn add(&mut self, layer: usize, tokens: usize, a: &BlockActivations) -> Result<(), String> {
        let d = a.x_in.len() / tokens.max(1);
        if tokens == 0 || a.x_in.len() != tokens * d || a.x_mid.len() != a.x_in.len() || a.x_out.len() != a.x_in.len() {
            return Err(format!("layer {layer}: residual activations do not have {tokens} rows of one width"));
        }
        let acc = &mut self.layers[layer];
        for t in 0..tokens {
            let r = t * d..(t + 1) * d;
            let (xi, xm, xo) = (&a.x_in[r.clone()], &a.x_mid[r.clone()], &a.x_out[r]);
            acc.block += one_minus_cos(xi, xo);
            acc.attn += one_minus_cos(xi, xm);
            acc.ffn += one_minus_cos(xm, xo);
            let (mut diff, mut norm) = (0f64, 0f64);
            for (&i, &o) in xi.iter().zip(xo) {
                diff += ((o - i) as f64).powi(2);
                norm += (i as f64).powi(2);
            }
            acc.update += if norm > 0.0 { (diff / norm).sqrt() } else { 0.0 };
        }
        add_abs(&mut acc.attn_in, a.attn_in, a.attn_in.len() / tokens);
        add_abs(&mut acc.attn_out_in, a.attn_out_in, a.attn_out_in.len() / tokens);
        add_abs(&mut acc.ffn_in, a.ffn_in, a.ffn_in.len() / tokens);
        add_abs(&mut acc.ffn_act, a.ffn_act, a.ffn_act.len() / tokens);
        acc.gate_hist.add(a.ffn_gate_act, a.ffn_gate_act.len() / tokens);
        acc.attn_in_hist.add(a.attn_in, a.attn_in.len() / tokens);
        acc.attn_out_in_hist.add(a.attn_out_in, a.attn_out_in.len() / tokens);
        acc.ffn_in_hist.add(a.ffn_in, a.ffn_in.len() / tokens);
        acc.ffn_act_hist.add(a.ffn_act, a.ffn_act.len() / tokens);
        acc.tokens += tokens;
        Ok(())
    }

    /// Per-layer averages, and quantiles at `quantile_levels()`.
    pub fn finish(self) -> Vec<LayerStats> {
        let levels = quantile_levels();
        self.layers
            .into_iter()
            .enumerate()
            .map(|(layer, a)| {
                let n = a.tokens.max(1) as f64;
                let mean = |v: Vec<f64>| v.into_iter().map(|s| (s / n) as f32).collect();
                let layer_abs_quantiles = [
                    (Activation::FfnGate, &a.gate_hist),
                    (Activation::FfnIn, &a.ffn_in_hist),
                    (Activation::FfnAct, &a.ffn_act_hist),
                    (Activation::AttnIn, &a.attn_in_hist),
                    (Activation::AttnOutIn, &a.attn_out_in_hist),
                ]
                .into_iter()
                .map(|(w, h)| (w.name().to_string(), h.pooled_quantiles(&levels)))
                .collect();
                LayerStats {
                    layer,
                    block_influence: a.block / n,
                    attn_influence: a.attn / n,
                    ffn_influence: a.ffn / n,
                    relative_update: a.update / n,
                    attn_in_mean_abs: mean(a.attn_in),
                    attn_out_in_mean_abs: mean(a.attn_out_in),
                    ffn_in_mean_abs: mean(a.ffn_in),
                    ffn_act_mean_abs: mean(a.ffn_act),
                    ffn_gate_abs_quantiles: a.gate_hist.quantiles(&levels),
                    attn_in_abs_quantiles: a.attn_in_hist.quantiles(&levels),
                    attn_out_in_abs_quantiles: a.attn_out_in_hist.quantiles(&levels),
                    ffn_in_abs_quantiles: a.ffn_in_hist.quantiles(&levels),
                    ffn_act_abs_quantiles: a.ffn_act_hist.quantiles(&levels),
                    layer_abs_quantiles,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_distance_by_hand() {
        assert_eq!(one_minus_cos(&[1.0, 0.0], &[2.0, 0.0]), 0.0);
        assert!((one_minus_cos(&[1.0, 0.0], &[0.0, 3.0]) - 1.0).abs() < 1e-12);
        assert!((one_minus_cos(&[1.0, 0.0], &[-1.0, 0.0]) - 2.0).abs() < 1e-12);
        // 45 degrees: 1 - 1/sqrt(2).
        assert!((one_minus_cos(&[1.0, 0.0], &[1.0, 1.0]) - (1.0 - 0.5f64.sqrt())).abs() < 1e-12);
    }

    #[test]
    fn accumulator_averages_over_tokens_and_chunks() {
        let mut acc = StatsAccumulator::new(1);
        // Token 1: x_out = x_in (influence 0); token 2: orthogonal (influence 1); a second chunk: opposite (2).
        let act = |x_in: &'static [f32], x_out: &'static [f32]| BlockActivations {
            x_in,
            x_mid: x_in,
            x_out,
            attn_in: &[1.0, -3.0],
            attn_out_in: &[2.0],
            ffn_in: &[0.5, 0.5],
            ffn_act: &[-4.0],
            ffn_gate_act: &[0.25],
        };
        acc.add(0, 1, &act(&[1.0, 0.0], &[1.0, 0.0])).unwrap();
        acc.add(0, 1, &act(&[1.0, 0.0], &[0.0, 1.0])).unwrap();
        acc.add(0, 1, &act(&[0.0, 2.0], &[0.0, -2.0])).unwrap();
        let s = acc.finish();
        assert!((s[0].block_influence - 1.0).abs() < 1e-12, "{}", s[0].block_influence); // (0 + 1 + 2) / 3
        assert_eq!(s[0].attn_influence, 0.0);
        assert_eq!(s[0].attn_in_mean_abs, vec![1.0, 3.0]);
        assert_eq!(s[0].ffn_act_mean_abs, vec![4.0]);
        // Relative update: 0, sqrt(2), 2.
        assert!((s[0].relative_update - (2f64.sqrt() + 2.0) / 3.0).abs() < 1e-9);
    }

    #[test]
    fn quantiles_from_histograms_by_hand() {
        // One channel, values 1..=100: the q-quantile is about 100q (within a bin's 9%).
        let mut h = AbsHistogram::default();
        let vals: Vec<f32> = (1..=100).map(|v| -(v as f32)).collect();
        h.add(&vals, 1);
        let levels = quantile_levels();
        let q = &h.quantiles(&levels)[0];
        for (&l, &v) in levels.iter().zip(q) {
            let want = 100.0 * l;
            assert!((v - want).abs() <= 0.1 * want + 1.0, "level {l}: {v} vs {want}");
        }
        // A channel that is 0 on 80% of tokens has quantiles 0 up to 0.8.
        let mut h = AbsHistogram::default();
        let vals: Vec<f32> = (0..10).map(|i| if i < 8 { 0.0 } else { 3.0 }).collect();
        h.add(&vals, 1);
        let q = &h.quantiles(&levels)[0];
        assert_eq!(q[15], 0.0); // level 0.8
        assert!((q[16] - 3.0).abs() < 0.3, "{}", q[16]); // level 0.85
                                                         // Interpolation between levels, 0 at 0, clamped above the last level.
        assert_eq!(interpolate_quantile(&[0.5, 1.0], &[2.0, 4.0], 0.0), 0.0);
        assert_eq!(interpolate_quantile(&[0.5, 1.0], &[2.0, 4.0], 0.25), 1.0);
        assert_eq!(interpolate_quantile(&[0.5, 1.0], &[2.0, 4.0], 0.75), 3.0);
        assert_eq!(interpolate_quantile(&[0.5, 0.9], &[2.0, 4.0], 0.95), 4.0);
    }

    #[test]
    fn pooled_quantiles_by_hand() {
        // Channel 0 holds 1..=100, channel 1 holds 101..=200: per channel the medians are about 50 and
        // 150, pooled about 100 (within a bin's 9%).
        let mut h = AbsHistogram::default();
        let rows: Vec<f32> = (1..=100).flat_map(|v| [v as f32, (v + 100) as f32]).collect();
        h.add(&rows, 2);
        let levels = quantile_levels();
        let mid = levels.iter().position(|&l| l == 0.5).unwrap();
        let per = h.quantiles(&levels);
        assert!((per[0][mid] - 50.0).abs() < 5.0 && (per[1][mid] - 150.0).abs() < 14.0, "{per:?}");
        let pooled = h.pooled_quantiles(&levels);
        assert!((pooled[mid] - 100.0).abs() < 10.0, "{pooled:?}");
        let l10 = levels.iter().position(|&l| (l - 0.1).abs() < 1e-6).unwrap();
        assert!((pooled[l10] - 20.0).abs() < 2.0, "{pooled:?}");
        // `thresholds` reads them: one value for every channel with `per_layer`, else each channel's own.
        let mut stats = StatsAccumulator::new(1);
        let rows_in = vec![0.0f32; 200];
        let rows3: Vec<f32> = (1..=100).flat_map(|v| [v as f32, (v + 100) as f32, 0.0]).collect();
        let a = BlockActivations {
            x_in: &rows_in,
            x_mid: &rows_in,
            x_out: &rows_in,
            attn_in: &rows,
            attn_out_in: &rows,
            ffn_in: &rows,
            ffn_act: &rows3,
            ffn_gate_act: &rows3,
        };
        stats.add(0, 100, &a).unwrap();
        let s = &stats.finish()[0];
        let t = s.thresholds(Activation::FfnAct, &levels, 0.5, true).unwrap();
        assert_eq!(t.len(), 3);
        // Pooled over three channels (one always 0): the median is the 150th of 300 values, about 50.
        assert!(t.iter().all(|&v| v == t[0]) && (t[0] - 50.0).abs() < 6.0, "{t:?}");
        let t = s.thresholds(Activation::FfnIn, &levels, 0.5, false).unwrap();
        assert!((t[0] - 50.0).abs() < 5.0 && (t[1] - 150.0).abs() < 14.0, "{t:?}");
        let mut old = s.clone();
        old.ffn_in_abs_quantiles.clear();
        assert!(old.thresholds(Activation::FfnIn, &levels, 0.5, false).unwrap_err().contains("re-run"));
    }

    #[test]
    fn bad_files_are_refused_with_reasons() {
        assert!(Calibration::from_json("{").unwrap_err().contains("not JSON"));
        assert!(Calibration::from_json("{\"format\": \"x\"}").unwrap_err().contains("not a Kiln calibration"));
        let e = Calibration::from_json("{\"format\": \"kiln-calibration\", \"version\": 99}").unwrap_err();
        assert!(e.contains("version"), "{e}");
        let e = Calibration::from_json("{\"format\": \"kiln-calibration\", \"version\": 1}").unwrap_err();
        assert!(e.contains("version 2"), "{e}");
        let e = Calibration::from_json("{\"format\": \"kiln-calibration\", \"version\": 2}").unwrap_err();
        assert!(e.contains("invalid calibration file"), "{e}");
    }
}
