//! The Llama-family decoder (Llama, SmolLM2, Mistral, Qwen2, Qwen3, Phi-3, Gemma 3) as an IR graph.
//!
//! Both importers normalise to one weight layout — GGUF tensor names, row-major shapes, and the
//! Hugging Face ("neox", rotate-halves) RoPE layout — so one builder serves every source.
//!
//! Graph interface (symbols `batch`, `seq`, `past`):
//! - inputs `tokens: i32[batch, seq]`, `pos: i32[batch, seq]` (absolute positions),
//!   `k_cache.L` / `v_cache.L: f32[batch, past, n_kv_heads, head_dim]` for every layer L;
//! - outputs `logits: f32[batch, seq, vocab]` and the grown caches `k_cache.L` / `v_cache.L:
//!   f32[batch, past+seq, n_kv_heads, head_dim]`, which the caller feeds back on the next step.

use kiln_ir::{shape, DType, Dim, Graph, GraphError, Op, RopeMode, TensorData, TensorType, ValueId, WeightStore};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Llama,
    Qwen2,
    /// Qwen2 with qk-norm, no Q/K/V biases and a head dim of its own.
    Qwen3,
    /// Llama's math with fused projections in its files (`qkv_proj`, `gate_up_proj`; GGUF `attn_qkv`,
    /// a double-height `ffn_up`), split at import ([`split_fused`]).
    Phi3,
    /// Gemma 3 text models: embeddings scaled by √hidden, norms after attention and after the MLP as
    /// well as before, a GELU-tanh gated MLP, qk-norm, interleaved local (sliding-window, own RoPE
    /// base) and global layers. Norm weights are stored multiplicative (llama.cpp's form: HF's w + 1).
    Gemma3,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Phi3 => "phi3",
            Arch::Gemma3 => "gemma3",
        }
    }
}

/// Hyper-parameters of a Llama-family decoder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f32,
    pub rms_norm_eps: f32,
    pub context_length: usize,
    /// Q/K/V projections carry biases (Qwen2).
    pub attention_bias: bool,
    /// The LM head reuses `token_embd.weight`.
    pub tie_embeddings: bool,
    /// Queries and keys are RMS-normalised per head before RoPE (`attn_q_norm`/`attn_k_norm`, `[head_dim]`;
    /// Qwen3).
    #[serde(default)]
    pub qk_norm: bool,
    /// Sliding-window attention: each query reads only the last `sliding_window` positions up to its own
    /// (`sliding_attention`), in every layer but those listed in `full_attention_layers`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub full_attention_layers: Vec<usize>,
    /// RoPE base of the windowed layers, which then use plain (unscaled) RoPE (Gemma 3's local layers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_local_theta: Option<f32>,
    /// Attention scale 1/√s instead of 1/√head_dim (Gemma's `query_pre_attn_scalar`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_pre_attn_scalar: Option<f32>,
    /// RoPE frequency scaling (Llama 3.x, linear interpolation); `None`: plain θ^(−2i/d).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
}

/// The weight holding the per-frequency RoPE divisors (`f32[head_dim/2]`) when `rope_scaling` is set:
/// llama.cpp's name for it. A GGUF file may carry it; for every other source the importer computes it
/// from the config ([`RopeScaling::factors`]).
pub const ROPE_FREQS: &str = "rope_freqs.weight";

/// How RoPE frequencies are scaled; each form is a per-frequency divisor (frequency i becomes
/// θ^(−2i/d) / factor_i), which is what the graph's `rope_scaled` op takes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RopeScaling {
    /// Position interpolation: every frequency divided by `factor` (HF `linear`, GGUF `rope.scaling.type
    /// = linear`).
    Linear { factor: f32 },
    /// Llama 3.1's band-wise scaling (HF `rope_type: llama3`): wavelengths shorter than
    /// `original_max_position_embeddings / high_freq_factor` unchanged, longer than `… / low_freq_factor`
    /// divided by `factor`, a smooth blend between.
    Llama3 { factor: f32, low_freq_factor: f32, high_freq_factor: f32, original_max_position_embeddings: usize },
    /// Divisors given as data (a GGUF `rope_freqs.weight` with no config to derive it from).
    Factors,
}

impl RopeScaling {
    /// The divisors for `n_rot` rotated dims at base `theta`; `None` for [`RopeScaling::Factors`], whose
    /// values live in the weight store.
    pub fn factors(&self, theta: f32, n_rot: usize) -> Option<Vec<f32>> {
        let half = n_rot / 2;
        match *self {
            RopeScaling::Linear { factor } => Some(vec![factor; half]),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let old = original_max_position_embeddings as f64;
                let (factor, lo, hi) = (factor as f64, low_freq_factor as f64, high_freq_factor as f64);
                let (low_wavelen, high_wavelen) = (old / lo, old / hi);
                Some(
                    (0..half)
                        .map(|i| {
                            let freq = (theta as f64).powf(-2.0 * i as f64 / n_rot as f64);
                            let wavelen = 2.0 * std::f64::consts::PI / freq;
                            if wavelen < high_wavelen {
                                1.0
                            } else if wavelen > low_wavelen {
                                factor as f32
                            } else {
                                let smooth = (old / wavelen - lo) / (hi - lo);
                                (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
                            }
                        })
                        .collect(),
                )
            }
            RopeScaling::Factors => None,
        }
    }

    fn validate(&self) -> Result<(), String> {
        let positive = |name: &str, v: f32| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(format!("rope_scaling {name} {v} must be positive"))
            }
        };
        match *self {
            RopeScaling::Linear { factor } => positive("factor", factor),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                positive("factor", factor)?;
                positive("low_freq_factor", low_freq_factor)?;
                positive("high_freq_factor", high_freq_factor)?;
                if high_freq_factor <= low_freq_factor {
                    return Err(format!(
                        "rope_scaling high_freq_factor {high_freq_factor} must exceed low_freq_factor {low_freq_factor}"
                    ));
                }
                if original_max_position_embeddings == 0 {
                    return Err("rope_scaling original_max_position_embeddings is 0".into());
                }
                Ok(())
            }
            RopeScaling::Factors => Ok(()),
        }
    }
}

impl LlamaConfig {
    /// Checks the numbers against each other; the message names the offending field.
    pub fn validate(&self) -> Result<(), String> {
        let nonzero = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("head_dim", self.head_dim),
        ];
        for (name, v) in nonzero {
            if v == 0 {
                return Err(format!("{name} is 0"));
            }
            if v > 1 << 24 {
                return Err(format!("{name} = {v} is implausibly large"));
            }
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(format!("n_kv_heads {} does not divide n_heads {}", self.n_kv_heads, self.n_heads));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!("head_dim {} is odd; RoPE needs pairs", self.head_dim));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(format!("rope_theta {} must be positive", self.rope_theta));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return Err(format!("rms_norm_eps {} must be non-negative", self.rms_norm_eps));
        }
        if let Some(rs) = &self.rope_scaling {
            rs.validate()?;
        }
        if self.sliding_window == Some(0) {
            return Err("sliding_window is 0".into());
        }
        for (name, v) in
            [("rope_local_theta", self.rope_local_theta), ("query_pre_attn_scalar", self.query_pre_attn_scalar)]
        {
            if v.is_some_and(|v| !(v.is_finite() && v > 0.0)) {
                return Err(format!("{name} {v:?} must be positive"));
            }
        }
        if let Some(&l) = self.full_attention_layers.iter().find(|&&l| l >= self.n_layers) {
            return Err(format!("full-attention layer {l} is beyond the {} layers", self.n_layers));
        }
        if self.sliding_window.is_none() && !self.full_attention_layers.is_empty() {
            return Err("full-attention layers are listed without a sliding window".into());
        }
        Ok(())
    }

    /// Every weight the graph reads, with its expected row-major shape.
    pub fn expected_weights(&self) -> Vec<(String, Vec<usize>)> {
        let (d, f, hd) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let (q, kv) = (self.n_heads * hd, self.n_kv_heads * hd);
        let mut w = vec![("token_embd.weight".to_string(), vec![self.vocab_size, d])];
        if self.rope_scaling.is_some() {
            w.push((ROPE_FREQS.to_string(), vec![hd / 2]));
        }
        for l in 0..self.n_layers {
            let p = |s: &str| format!("blk.{l}.{s}");
            w.push((p("attn_norm.weight"), vec![d]));
            w.push((p("attn_q.weight"), vec![q, d]));
            w.push((p("attn_k.weight"), vec![kv, d]));
            w.push((p("attn_v.weight"), vec![kv, d]));
            if self.attention_bias {
                w.push((p("attn_q.bias"), vec![q]));
                w.push((p("attn_k.bias"), vec![kv]));
                w.push((p("attn_v.bias"), vec![kv]));
            }
            if self.qk_norm {
                w.push((p("attn_q_norm.weight"), vec![hd]));
                w.push((p("attn_k_norm.weight"), vec![hd]));
            }
            w.push((p("attn_output.weight"), vec![d, q]));
            if self.arch == Arch::Gemma3 {
                w.push((p("post_attention_norm.weight"), vec![d]));
                w.push((p("post_ffw_norm.weight"), vec![d]));
            }
            w.push((p("ffn_norm.weight"), vec![d]));
            w.push((p("ffn_gate.weight"), vec![f, d]));
            w.push((p("ffn_up.weight"), vec![f, d]));
            w.push((p("ffn_down.weight"), vec![d, f]));
        }
        w.push(("output_norm.weight".to_string(), vec![d]));
        if !self.tie_embeddings {
            w.push(("output.weight".to_string(), vec![self.vocab_size, d]));
        }
        w
    }

    /// The RoPE divisors (`rope_freqs.weight`'s values) this config's scaling gives, when it gives them
    /// (`None` without scaling and for [`RopeScaling::Factors`], whose values come with the file).
    pub fn derived_rope_freqs(&self) -> Option<Vec<f32>> {
        self.rope_scaling.as_ref()?.factors(self.rope_theta, self.head_dim)
    }

    /// The attention window of layer `l` (`None`: full causal attention).
    pub fn window_of(&self, l: usize) -> Option<usize> {
        self.sliding_window.filter(|_| !self.full_attention_layers.contains(&l))
    }

    /// The architecture features this model uses, for `kiln inspect`. Every one is supported: a file
    /// that needs one Kiln lacks is refused at load, naming the tensor or key.
    pub fn features(&self) -> Vec<String> {
        let mlp = if self.arch == Arch::Gemma3 { "gelu-tanh gated mlp" } else { "swiglu mlp" };
        let mut f = vec!["rmsnorm".to_string(), mlp.to_string(), "rope (neox layout)".to_string()];
        if self.arch == Arch::Gemma3 {
            f.push("embeddings scaled by √hidden".into());
            f.push("norms before and after attention and mlp".into());
        }
        if let Some(t) = self.rope_local_theta {
            f.push(format!("local layers' rope base {t}"));
        }
        if let Some(s) = self.query_pre_attn_scalar {
            f.push(format!("attention scale 1/√{s}"));
        }
        if self.n_kv_heads < self.n_heads {
            f.push(format!(
                "grouped-query attention ({} query heads per key/value head)",
                self.n_heads / self.n_kv_heads
            ));
        }
        if self.attention_bias {
            f.push("q/k/v biases".into());
        }
        if self.qk_norm {
            f.push("qk-norm".into());
        }
        if self.head_dim * self.n_heads != self.hidden_size {
            f.push(format!("head dim {} independent of hidden/heads", self.head_dim));
        }
        if self.tie_embeddings {
            f.push("tied embeddings".into());
        }
        if let Some(w) = self.sliding_window {
            let local = (0..self.n_layers).filter(|&l| self.window_of(l).is_some()).count();
            f.push(format!("sliding-window attention ({w} positions, {local} of {} layers)", self.n_layers));
        }
        match &self.rope_scaling {
            None => {}
            Some(RopeScaling::Linear { factor }) => f.push(format!("rope scaling: linear ×{factor}")),
            Some(RopeScaling::Llama3 { factor, original_max_position_embeddings, .. }) => {
                f.push(format!("rope scaling: llama3 ×{factor} from {original_max_position_embeddings} positions"))
            }
            Some(RopeScaling::Factors) => f.push(format!("rope scaling: per-frequency divisors ({ROPE_FREQS})")),
        }
        f
    }

    pub fn param_count(&self) -> usize {
        self.expected_weights().iter().map(|(_, s)| s.iter().product::<usize>()).sum()
    }
}

/// Undoes llama.cpp's conversion-time permutation of Q/K rows (which lets it use the interleaved
/// "normal" RoPE), restoring the Hugging Face row order for which RoPE is "neox". Rows are whole
/// (quantized) byte runs, so this works for every dtype.
pub fn unpermute_qk_rows(bytes: &[u8], n_rows: usize, n_heads: usize) -> Vec<u8> {
    move_qk_rows(bytes, n_rows, n_heads, false)
}

/// The inverse of [`unpermute_qk_rows`], as llama.cpp's converter applies it (used by our GGUF writer).
pub fn permute_qk_rows(bytes: &[u8], n_rows: usize, n_heads: usize) -> Vec<u8> {
    move_qk_rows(bytes, n_rows, n_heads, true)
}

/// Within each head, HF row `half * hd/2 + i` is GGUF row `2i + half`; copies rows one way or the other.
fn move_qk_rows(bytes: &[u8], n_rows: usize, n_heads: usize, to_gguf: bool) -> Vec<u8> {
    let row = bytes.len() / n_rows;
    let hd = n_rows / n_heads;
    let mut out = vec![0u8; bytes.len()];
    for h in 0..n_heads {
        for half in 0..2 {
            for i in 0..hd / 2 {
                let hf = h * hd + half * hd / 2 + i;
                let gg = h * hd + 2 * i + half;
                let (dst, src) = if to_gguf { (gg, hf) } else { (hf, gg) };
                out[dst * row..(dst + 1) * row].copy_from_slice(&bytes[src * row..(src + 1) * row]);
            }
        }
    }
    out
}

/// The fused Phi-3 tensors Kiln normalises away: `blk.N.attn_qkv.weight` (Q, K and V rows stacked) and
/// `blk.N.ffn_gate_up.weight` (gate rows, then up rows; GGUF calls it `ffn_up`, HF `gate_up_proj`).
pub const FUSED_QKV: &str = "attn_qkv.weight";
pub const FUSED_GATE_UP: &str = "ffn_gate_up.weight";

/// Rows `[at[i], at[i+1])` of a row-major `[rows, …]` tensor, as views of its bytes (whole rows are
/// whole quantized blocks, so this works for every dtype).
pub fn split_rows(t: &TensorData, sizes: &[usize]) -> Vec<TensorData> {
    let row = t.bytes.len() / t.shape[0].max(1);
    let mut start = 0;
    sizes
        .iter()
        .map(|&n| {
            let mut shape = t.shape.clone();
            shape[0] = n;
            let part = TensorData { dtype: t.dtype, shape, bytes: t.bytes.slice(start * row..(start + n) * row) };
            start += n;
            part
        })
        .collect()
}

/// Replaces each layer's fused tensors by the separate ones the graph reads; a fused tensor with the
/// wrong row count is an error naming it.
pub fn split_fused(cfg: &LlamaConfig, weights: &mut WeightStore) -> Result<(), String> {
    let (q, kv, f) = (cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.intermediate_size);
    for l in 0..cfg.n_layers {
        let p = |s: &str| format!("blk.{l}.{s}");
        for (fused, parts, sizes) in [
            (FUSED_QKV, ["attn_q.weight", "attn_k.weight", "attn_v.weight"].as_slice(), vec![q, kv, kv]),
            (FUSED_GATE_UP, ["ffn_gate.weight", "ffn_up.weight"].as_slice(), vec![f, f]),
        ] {
            let Some(t) = weights.remove(&p(fused)) else { continue };
            let rows: usize = sizes.iter().sum();
            if t.shape.len() != 2 || t.shape[0] != rows {
                return Err(format!(
                    "tensor `{}` has shape {:?}; expected {rows} rows ({})",
                    p(fused),
                    t.shape,
                    parts.join(" + ")
                ));
            }
            for (name, part) in parts.iter().zip(split_rows(&t, &sizes)) {
                if weights.contains(&p(name)) {
                    return Err(format!("tensor `{}` is given both fused and alone", p(name)));
                }
                weights.insert(p(name), part);
            }
        }
    }
    Ok(())
}

struct Builder<'a> {
    g: Graph,
    weights: &'a WeightStore,
}

impl Builder<'_> {
    fn weight(&mut self, name: &str) -> Result<ValueId, GraphError> {
        let t = self.weights.get(name).ok_or_else(|| GraphError::Structure {
            graph: self.g.name.clone(),
            msg: format!("weight `{name}` is missing"),
        })?;
        let ty = TensorType::new(t.dtype, t.shape.iter().map(|&d| d.into()).collect());
        self.g.weight(name, ty)
    }

    /// A weight used elementwise (norm gains, biases) is read as f32 whatever its stored dtype.
    fn f32_weight(&mut self, name: &str) -> Result<ValueId, GraphError> {
        let w = self.weight(name)?;
        if self.g.ty(w).dtype == DType::F32 {
            Ok(w)
        } else {
            self.g.add(Op::Cast { dtype: DType::F32 }, &[w])
        }
    }

    fn op(&mut self, op: Op, ins: &[ValueId]) -> Result<ValueId, GraphError> {
        self.g.add(op, ins)
    }
}

/// Choices in how the decoder graph is built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphOptions {
    /// Compute logits for the last position only (`logits: f32[batch, 1, vocab]`): what generation
    /// needs, and it skips the LM head for every other prompt position. Evaluation needs all positions.
    pub last_logits_only: bool,
}

/// Builds the decoder graph for `cfg` over the weights in `weights` (types and shapes are read from the
/// store; missing weights are an error naming them).
pub fn build_graph(
    name: &str,
    cfg: &LlamaConfig,
    weights: &WeightStore,
    opts: GraphOptions,
) -> Result<Graph, GraphError> {
    let mut b = Builder { g: Graph::new(name), weights };
    let (nh, nkv, hd) = (cfg.n_heads as i64, cfg.n_kv_heads as i64, cfg.head_dim as i64);
    let tokens = b.g.input("tokens", TensorType::new(DType::I32, shape!["batch", "seq"]))?;
    let pos = b.g.input("pos", TensorType::new(DType::I32, shape!["batch", "seq"]))?;
    let cache_ty = TensorType::new(DType::F32, shape!["batch", "past", nkv, hd]);
    let mut caches = Vec::new();
    for l in 0..cfg.n_layers {
        let k = b.g.input(&format!("k_cache.{l}"), cache_ty.clone())?;
        let v = b.g.input(&format!("v_cache.{l}"), cache_ty.clone())?;
        caches.push((k, v));
    }
    let embd = b.weight("token_embd.weight")?;
    let mut x = b.op(Op::Embedding, &[embd, tokens])?;
    let gemma = cfg.arch == Arch::Gemma3;
    if gemma {
        let s = b.op(Op::Constant { value: (cfg.hidden_size as f32).sqrt() }, &[])?;
        x = b.op(Op::Mul, &[x, s])?;
    }
    let scale = 1.0 / cfg.query_pre_attn_scalar.unwrap_or(cfg.head_dim as f32).sqrt();
    let (rope, factors) = match cfg.rope_scaling {
        None => (Op::Rope { mode: RopeMode::Neox, theta: cfg.rope_theta, n_rot: hd }, None),
        Some(_) => {
            (Op::RopeScaled { mode: RopeMode::Neox, theta: cfg.rope_theta, n_rot: hd }, Some(b.f32_weight(ROPE_FREQS)?))
        }
    };
    let local_rope = cfg.rope_local_theta.map(|theta| Op::Rope { mode: RopeMode::Neox, theta, n_rot: hd });
    let mut cache_outs = Vec::new();
    for (l, &(k_cache, v_cache)) in caches.iter().enumerate() {
        let p = |s: &str| format!("blk.{l}.{s}");
        let norm_w = b.f32_weight(&p("attn_norm.weight"))?;
        let h = b.op(Op::RmsNorm { eps: cfg.rms_norm_eps }, &[x, norm_w])?;
        let proj = |b: &mut Builder, which: &str, heads: i64| -> Result<ValueId, GraphError> {
            let w = b.weight(&p(&format!("attn_{which}.weight")))?;
            let mut y = b.op(Op::Linear, &[h, w])?;
            if cfg.attention_bias {
                let bias = b.f32_weight(&p(&format!("attn_{which}.bias")))?;
                y = b.op(Op::Add, &[y, bias])?;
            }
            let y = b.op(Op::Reshape { shape: shape!["batch", "seq", heads, hd] }, &[y])?;
            if cfg.qk_norm && which != "v" {
                let w = b.f32_weight(&p(&format!("attn_{which}_norm.weight")))?;
                return b.op(Op::RmsNorm { eps: cfg.rms_norm_eps }, &[y, w]);
            }
            Ok(y)
        };
        let q = proj(&mut b, "q", nh)?;
        let k = proj(&mut b, "k", nkv)?;
        let v = proj(&mut b, "v", nkv)?;
        // Windowed layers with a local base use plain RoPE at it; the rest the model's (maybe scaled) RoPE.
        let (rope_l, ins_l): (&Op, Vec<ValueId>) = match (&local_rope, cfg.window_of(l)) {
            (Some(local), Some(_)) => (local, vec![pos]),
            _ => (&rope, std::iter::once(pos).chain(factors).collect()),
        };
        let with = |x: ValueId| -> Vec<ValueId> { std::iter::once(x).chain(ins_l.iter().copied()).collect() };
        let q = b.op(rope_l.clone(), &with(q))?;
        let k = b.op(rope_l.clone(), &with(k))?;
        let k_all = b.op(Op::Concat { axis: 1 }, &[k_cache, k])?;
        let v_all = b.op(Op::Concat { axis: 1 }, &[v_cache, v])?;
        cache_outs.push((k_all, v_all));
        let att = match cfg.window_of(l) {
            None => b.op(Op::Attention { scale }, &[q, k_all, v_all])?,
            Some(w) => b.op(Op::SlidingAttention { scale, window: w as i64 }, &[q, k_all, v_all])?,
        };
        let att = b.op(Op::Reshape { shape: shape!["batch", "seq", nh * hd] }, &[att])?;
        let wo = b.weight(&p("attn_output.weight"))?;
        let mut o = b.op(Op::Linear, &[att, wo])?;
        if gemma {
            let w = b.f32_weight(&p("post_attention_norm.weight"))?;
            o = b.op(Op::RmsNorm { eps: cfg.rms_norm_eps }, &[o, w])?;
        }
        x = b.op(Op::Add, &[x, o])?;
        let norm_w = b.f32_weight(&p("ffn_norm.weight"))?;
        let h = b.op(Op::RmsNorm { eps: cfg.rms_norm_eps }, &[x, norm_w])?;
        let wg = b.weight(&p("ffn_gate.weight"))?;
        let wu = b.weight(&p("ffn_up.weight"))?;
        let wd = b.weight(&p("ffn_down.weight"))?;
        let gate = b.op(Op::Linear, &[h, wg])?;
        let up = b.op(Op::Linear, &[h, wu])?;
        let act = if gemma {
            let g = b.op(Op::GeluTanh, &[gate])?;
            b.op(Op::Mul, &[g, up])?
        } else {
            b.op(Op::SwiGlu, &[gate, up])?
        };
        let mut down = b.op(Op::Linear, &[act, wd])?;
        if gemma {
            let w = b.f32_weight(&p("post_ffw_norm.weight"))?;
            down = b.op(Op::RmsNorm { eps: cfg.rms_norm_eps }, &[down, w])?;
        }
        x = b.op(Op::Add, &[x, down])?;
    }
    if opts.last_logits_only {
        x = b.op(Op::Slice { axis: 1, start: Dim::parse("seq-1").expect("dim"), end: Dim::sym("seq") }, &[x])?;
    }
    let norm_w = b.f32_weight("output_norm.weight")?;
    let x = b.op(Op::RmsNorm { eps: cfg.rms_norm_eps }, &[x, norm_w])?;
    let head = if cfg.tie_embeddings { embd } else { b.weight("output.weight")? };
    let logits = b.op(Op::Linear, &[x, head])?;
    b.g.output("logits", logits);
    for (l, (k, v)) in cache_outs.into_iter().enumerate() {
        b.g.output(&format!("k_cache.{l}"), k);
        b.g.output(&format!("v_cache.{l}"), v);
    }
    Ok(b.g)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qk_permutation_round_trips() {
        let bytes: Vec<u8> = (0..8 * 3).map(|i| i as u8).collect(); // 8 rows of 3 bytes, 2 heads
        let p = permute_qk_rows(&bytes, 8, 2);
        assert_ne!(p, bytes);
        assert_eq!(unpermute_qk_rows(&p, 8, 2), bytes);
        // Head 0 of HF order is rows [r0 r1 | r2 r3] (halves); GGUF interleaves them: r0 r2 r1 r3.
        assert_eq!(&p[..12], &[0, 1, 2, 6, 7, 8, 3, 4, 5, 9, 10, 11]);
    }
}
