//! A loaded model: its config, weights (normalised to GGUF names, HF row order) and tokenizer, from either
//! a GGUF file or a Hugging Face directory (config.json + safetensors, single or sharded).

use crate::error::{FrontendError, Result};
use crate::gguf::{GgufFile, GgufValue};
use crate::llama::{self, Arch, LlamaConfig, RopeScaling, FUSED_GATE_UP, FUSED_QKV, ROPE_FREQS};
use crate::tokenizer::{GgufVocab, Tokenizer};
use bytes::Bytes;
use kiln_ir::{DType, Graph, TensorData, WeightStore};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub struct Model {
    pub name: String,
    pub source: PathBuf,
    /// "gguf" or "safetensors".
    pub format: &'static str,
    pub config: LlamaConfig,
    pub weights: WeightStore,
    pub tokenizer: Option<Tokenizer>,
    /// Format-level facts shown by `kiln inspect` (GGUF metadata scalars, file version…), sorted.
    pub metadata: BTreeMap<String, String>,
}

impl Model {
    /// Loads a `.gguf` file, or a directory / `config.json` of a Hugging Face model.
    pub fn load(path: &Path) -> Result<Model> {
        if !path.exists() {
            return Err(FrontendError::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
            ));
        }
        if path.is_dir() {
            load_hf(path)
        } else if path.file_name().is_some_and(|n| n == "config.json") {
            load_hf(path.parent().unwrap_or(Path::new(".")))
        } else {
            load_gguf(path)
        }
    }

    /// The decoder graph over this model's weights.
    pub fn graph(&self) -> Result<Graph> {
        self.graph_with(llama::GraphOptions::default())
    }

    /// The decoder graph built with `opts`.
    pub fn graph_with(&self, opts: llama::GraphOptions) -> Result<Graph> {
        llama::build_graph(&self.name, &self.config, &self.weights, opts)
            .map_err(|source| FrontendError::Graph { path: self.source.clone(), source })
    }

    /// Weight bytes by dtype, for summaries.
    pub fn dtype_histogram(&self) -> BTreeMap<DType, (usize, usize)> {
        let mut h = BTreeMap::new();
        for (_, t) in self.weights.iter() {
            let e = h.entry(t.dtype).or_insert((0, 0));
            e.0 += 1;
            e.1 += t.bytes.len();
        }
        h
    }
}

/// The last decoder block's norm weight: present in any file that really has `cfg.n_layers` blocks. Checked
/// before anything is sized by the block count, which a hostile header could otherwise set to millions
/// (every per-block allocation then runs the machine out of memory instead of failing).
fn check_last_block(path: &Path, cfg: &LlamaConfig, has: impl Fn(&str) -> bool) -> Result<()> {
    let last = format!("blk.{}.attn_norm.weight", cfg.n_layers.saturating_sub(1));
    if has(&last) {
        Ok(())
    } else {
        Err(FrontendError::MissingTensor { path: path.into(), tensor: last })
    }
}

/// Checks every expected weight is present with the expected shape, and that nothing else is.
fn check_weights(path: &Path, cfg: &LlamaConfig, weights: &WeightStore) -> Result<()> {
    check_last_block(path, cfg, |n| weights.get(n).is_some())?;
    for (name, shape) in cfg.expected_weights() {
        let t = weights
            .get(&name)
            .ok_or_else(|| FrontendError::MissingTensor { path: path.into(), tensor: name.clone() })?;
        if t.shape != shape {
            return Err(FrontendError::Shape {
                path: path.into(),
                tensor: name,
                expected: shape,
                found: t.shape.clone(),
            });
        }
    }
    Ok(())
}

fn gguf_err(path: &Path, msg: String) -> FrontendError {
    FrontendError::invalid(path, msg)
}

pub fn load_gguf(path: &Path) -> Result<Model> {
    let f = GgufFile::open(path)?;
    let arch_name = f.get_str("general.architecture")?.to_string();
    let arch = match arch_name.as_str() {
        "llama" | "mistral" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
        "qwen3" => Arch::Qwen3,
        "phi3" => Arch::Phi3,
        "gemma3" => Arch::Gemma3,
        _ => return Err(FrontendError::UnsupportedArch { path: path.into(), arch: arch_name }),
    };
    let key = |k: &str| format!("{arch_name}.{k}");
    let get = |k: &str| -> Result<usize> {
        let v = f.get_u64(&key(k))?;
        usize::try_from(v).map_err(|_| gguf_err(path, format!("{} = {v} does not fit in memory", key(k))))
    };
    let get_or = |k: &str, d: usize| -> Result<usize> {
        if f.get(&key(k)).is_some() {
            get(k)
        } else {
            Ok(d)
        }
    };
    let hidden = get("embedding_length")?;
    let n_heads = get("attention.head_count")?;
    if n_heads == 0 {
        return Err(gguf_err(path, format!("{} is 0", key("attention.head_count"))));
    }
    let head_dim = get_or("attention.key_length", hidden / n_heads)?;
    let vocab = match f.tensor("token_embd.weight") {
        Some(t) => t.ne.get(1).copied().unwrap_or(0) as usize,
        None => return Err(FrontendError::MissingTensor { path: path.into(), tensor: "token_embd.weight".into() }),
    };
    let theta = match f.get(&key("rope.freq_base")) {
        Some(_) => f.get_f64(&key("rope.freq_base"))? as f32,
        None => 10000.0,
    };
    check_gguf_arch_keys(path, &f, &arch_name)?;
    for k in ["expert_count", "expert_used_count"] {
        if get_or(k, 0)? != 0 {
            return Err(gguf_err(
                path,
                format!("{} = {}: mixture-of-experts models are not supported", key(k), get(k)?),
            ));
        }
    }
    if get_or("attention.value_length", head_dim)? != head_dim {
        return Err(gguf_err(
            path,
            format!(
                "{} = {} differs from the key length {head_dim}; Kiln's attention needs them equal",
                key("attention.value_length"),
                get("attention.value_length")?
            ),
        ));
    }
    // 0 is llama.cpp's "no window", as its Phi-3 converter writes when the config has none.
    let sliding_window = match f.get(&key("attention.sliding_window")) {
        Some(_) => Some(get("attention.sliding_window")?).filter(|&w| w > 0),
        None => None,
    };
    let n_layers = get("block_count")?;
    // Gemma 3 (llama.cpp's conventions): local layers by `attention.sliding_window_pattern` (n: layer l
    // is local unless l % n = n − 1; default 6), their RoPE base `rope.freq_base_swa` (default 10000).
    let (full_attention_layers, rope_local_theta) = match (arch, sliding_window) {
        (Arch::Gemma3, Some(_)) => {
            let n = get_or("attention.sliding_window_pattern", 6)?;
            if n == 0 || n > 1 << 20 {
                return Err(gguf_err(
                    path,
                    format!("{} = {n} is out of range", key("attention.sliding_window_pattern")),
                ));
            }
            let full = (0..n_layers.min(1 << 24)).filter(|l| l % n == n - 1).collect();
            let local = match f.get(&key("rope.freq_base_swa")) {
                Some(_) => f.get_f64(&key("rope.freq_base_swa"))? as f32,
                None => 10000.0,
            };
            (full, Some(local))
        }
        _ => (Vec::new(), None),
    };
    if arch != Arch::Gemma3 {
        for k in ["attention.sliding_window_pattern", "rope.freq_base_swa"] {
            if f.get(&key(k)).is_some() {
                return Err(gguf_err(path, format!("metadata key `{}` is not supported for {arch_name}", key(k))));
            }
        }
    }
    if f.get(&key("final_logit_softcapping")).is_some() && f.get_f64(&key("final_logit_softcapping"))? != 0.0 {
        return Err(gguf_err(path, format!("{} (logit softcapping) is not supported", key("final_logit_softcapping"))));
    }
    let config = LlamaConfig {
        arch,
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: get("feed_forward_length")?,
        n_layers,
        n_heads,
        n_kv_heads: get_or("attention.head_count_kv", n_heads)?,
        head_dim,
        rope_theta: theta,
        rms_norm_eps: f.get_f64(&key("attention.layer_norm_rms_epsilon"))? as f32,
        context_length: get_or("context_length", 2048)?,
        attention_bias: f.tensor("blk.0.attn_q.bias").is_some(),
        tie_embeddings: f.tensor("output.weight").is_none(),
        qk_norm: matches!(arch, Arch::Qwen3 | Arch::Gemma3),
        sliding_window,
        full_attention_layers,
        rope_local_theta,
        // llama.cpp scales Gemma 3's attention by 1/√head_dim.
        query_pre_attn_scalar: (arch == Arch::Gemma3).then_some(head_dim as f32),
        rope_scaling: gguf_rope_scaling(path, &f, &arch_name)?,
    };
    config.validate().map_err(|m| gguf_err(path, m))?;
    if f.get(&key("rope.dimension_count")).is_some() {
        let n_rot = get("rope.dimension_count")?;
        if n_rot != head_dim {
            return Err(gguf_err(
                path,
                format!(
                    "partial rotary embedding ({} = {n_rot}, head_dim {head_dim}) is not supported",
                    key("rope.dimension_count")
                ),
            ));
        }
    }
    check_last_block(path, &config, |n| f.tensor(n).is_some())?;
    let mut weights = WeightStore::new();
    let expected: BTreeMap<String, Vec<usize>> = config.expected_weights().into_iter().collect();
    for info in &f.tensors {
        // Phi-3's fused projections (split below); its `ffn_up` holds gate and up.
        let name = match (arch, info.name.strip_prefix("blk.").and_then(|r| r.split_once('.'))) {
            (Arch::Phi3, Some((l, "ffn_up.weight"))) => format!("blk.{l}.{FUSED_GATE_UP}"),
            _ => info.name.clone(),
        };
        let fused = arch == Arch::Phi3 && (name.ends_with(FUSED_QKV) || name.ends_with(FUSED_GATE_UP));
        if !expected.contains_key(&name) && !fused {
            if gguf_redundant_tensor(&info.name) {
                continue;
            }
            return Err(gguf_err(
                path,
                format!("tensor `{}` is not part of a {arch_name} model Kiln knows; refusing to ignore it", info.name),
            ));
        }
        let mut t = f.tensor_data_owned(&info.name).expect("listed tensor");
        // llama.cpp's converter permuted Q/K rows of llama models for its interleaved RoPE; undo it.
        if arch == Arch::Llama {
            let heads = match info.name.rsplit('.').nth(1) {
                Some("attn_q") => Some(config.n_heads),
                Some("attn_k") => Some(config.n_kv_heads),
                _ => None,
            };
            if let Some(h) = heads {
                if t.shape[0] % (2 * h) != 0 {
                    return Err(gguf_err(
                        path,
                        format!("tensor `{}`: {} rows do not split into {h} heads", info.name, t.shape[0]),
                    ));
                }
                t.bytes = Bytes::from(llama::unpermute_qk_rows(&t.bytes, t.shape[0], h));
            }
        }
        if info.name == ROPE_FREQS && t.dtype != DType::F32 {
            return Err(gguf_err(path, format!("tensor `{ROPE_FREQS}` is {}; Kiln reads it as f32", t.dtype)));
        }
        weights.insert(name, t);
    }
    llama::split_fused(&config, &mut weights).map_err(|m| gguf_err(path, m))?;
    // Scaling given by metadata alone (linear) becomes the divisors tensor the graph reads.
    if !weights.contains(ROPE_FREQS) {
        if let Some(factors) = config.derived_rope_freqs() {
            weights.insert(ROPE_FREQS, TensorData::from_f32(vec![factors.len()], &factors));
        }
    }
    check_weights(path, &config, &weights)?;
    let tokenizer = if f.get("tokenizer.ggml.model").is_some() {
        Some(
            Tokenizer::from_gguf_vocab(gguf_vocab(&f)?)
                .map_err(|source| FrontendError::Tokenizer { path: path.into(), source })?,
        )
    } else {
        None
    };
    let mut metadata = BTreeMap::new();
    metadata.insert("gguf.version".into(), f.version.to_string());
    for (k, v) in &f.metadata {
        let shown = match v {
            GgufValue::Array(a) => format!("[{} items]", a.len()),
            GgufValue::String(s) if s.chars().count() > 80 => format!("{:?}…", s.chars().take(77).collect::<String>()),
            GgufValue::String(s) => format!("{s:?}"),
            other => format!("{other:?}").split(['(', ')']).nth(1).unwrap_or_default().to_string(),
        };
        metadata.insert(k.clone(), shown);
    }
    let name = f.get("general.name").and_then(|v| v.as_str()).map(str::to_string).unwrap_or_else(|| file_stem(path));
    Ok(Model { name, source: path.into(), format: "gguf", config, weights, tokenizer, metadata })
}

/// Tensors a GGUF file may hold that carry nothing the graph needs, each with why.
fn gguf_redundant_tensor(name: &str) -> bool {
    // Old llama.cpp conversions of Meta's checkpoints kept each block's precomputed RoPE inverse
    // frequencies: θ^(−2i/d) again, which `rope.freq_base` and the head dim already give.
    name.strip_prefix("blk.")
        .and_then(|r| r.split_once('.'))
        .is_some_and(|(l, t)| l.parse::<usize>().is_ok() && t == "attn_rot_embd")
}

/// The `{arch}.*` keys Kiln reads or knows to be harmless; any other key of the architecture may change
/// the math (softcapping, partial rotary, other norms, MoE, …) and is refused by name.
const GGUF_ARCH_KEYS: &[&str] = &[
    // Read by the importer.
    "context_length",
    "embedding_length",
    "block_count",
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.layer_norm_rms_epsilon",
    "attention.key_length",
    "attention.value_length",
    "attention.sliding_window",
    "rope.dimension_count",
    "rope.freq_base",
    "rope.scaling.type",
    "rope.scaling.factor",
    "rope.scale_linear",
    "expert_count",
    "expert_used_count",
    "attention.sliding_window_pattern",
    "rope.freq_base_swa",
    "final_logit_softcapping",
    // Harmless: the vocabulary size is the embedding's row count; the context the scaling was trained
    // from matters to yarn only (refused); whether it was finetuned is a note; the data layout string
    // is a note of where the tensors came from (the Q/K row order is always llama.cpp's).
    "vocab_size",
    "rope.scaling.original_context_length",
    "rope.scaling.finetuned",
    "tensor_data_layout",
];

fn check_gguf_arch_keys(path: &Path, f: &GgufFile, arch: &str) -> Result<()> {
    for (k, _) in &f.metadata {
        if let Some(rest) = k.strip_prefix(arch).and_then(|r| r.strip_prefix('.')) {
            if !GGUF_ARCH_KEYS.contains(&rest) {
                return Err(gguf_err(path, format!("metadata key `{k}` is not supported; refusing to ignore it")));
            }
        }
    }
    Ok(())
}

/// RoPE scaling from GGUF metadata and a `rope_freqs.weight` tensor.
fn gguf_rope_scaling(path: &Path, f: &GgufFile, arch: &str) -> Result<Option<RopeScaling>> {
    let key = |k: &str| format!("{arch}.{k}");
    let kind = match f.get(&key("rope.scaling.type")) {
        None => None,
        Some(_) => Some(f.get_str(&key("rope.scaling.type"))?.to_string()),
    };
    let mut factor = None;
    for k in ["rope.scaling.factor", "rope.scale_linear"] {
        if f.get(&key(k)).is_some() {
            let v = f.get_f64(&key(k))? as f32;
            // llama.cpp treats 0 as unset; 1 is no scaling.
            if v != 0.0 && v != 1.0 {
                factor = Some(v);
            }
        }
    }
    let metadata = match kind.as_deref() {
        Some("none") => None,
        None | Some("linear") => factor.map(|factor| RopeScaling::Linear { factor }),
        Some(other) => {
            return Err(gguf_err(
                path,
                format!(
                    "{} = `{other}` is not supported (Kiln implements linear and rope_freqs scaling)",
                    key("rope.scaling.type")
                ),
            ))
        }
    };
    match (metadata, f.tensor(ROPE_FREQS).is_some()) {
        (Some(_), true) => Err(gguf_err(
            path,
            format!(
                "both {} and tensor `{ROPE_FREQS}` scale RoPE; refusing to guess how they combine",
                key("rope.scaling.factor")
            ),
        )),
        (m, false) => Ok(m),
        (None, true) => Ok(Some(RopeScaling::Factors)),
    }
}

/// Adds `shift` to every norm weight (Gemma's HF files store w − 1 of the multiplicative weight), as f32.
pub fn gemma_norms(weights: &mut WeightStore, shift: f32) -> std::result::Result<(), String> {
    let names: Vec<String> = weights.iter().map(|(n, _)| n.clone()).filter(|n| n.ends_with("norm.weight")).collect();
    for n in names {
        let t = weights.get(&n).expect("listed");
        let v = t.to_f32().map_err(|e| format!("tensor `{n}`: {e}"))?;
        let shifted: Vec<f32> = v.iter().map(|x| x + shift).collect();
        weights.insert(n, TensorData::from_f32(t.shape.clone(), &shifted));
    }
    Ok(())
}

fn file_stem(path: &Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into())
}

/// Reads `tokenizer.ggml.*` metadata.
pub fn gguf_vocab(f: &GgufFile) -> Result<GgufVocab> {
    let strs = |k: &str| -> Result<Vec<String>> { Ok(f.get_str_array(k)?.into_iter().map(str::to_string).collect()) };
    let id =
        |k: &str| -> Result<Option<u32>> {
            match f.get(k) {
                None => Ok(None),
                Some(_) => Ok(Some(u32::try_from(f.get_u64(k)?).map_err(|_| {
                    gguf_err(f.path.as_deref().unwrap_or(Path::new("?")), format!("{k} is out of range"))
                })?)),
            }
        };
    let token_types = match f.get("tokenizer.ggml.token_type").and_then(|v| v.as_array()) {
        Some(a) => a.iter().map(|v| v.as_f64().unwrap_or(1.0) as i32).collect(),
        None => Vec::new(),
    };
    let model = f.get_str("tokenizer.ggml.model")?.to_string();
    let pre = f.get("tokenizer.ggml.pre").and_then(|v| v.as_str()).map(str::to_string);
    let add_bos = match f.get("tokenizer.ggml.add_bos_token") {
        Some(_) => f.get_bool("tokenizer.ggml.add_bos_token")?,
        None => GgufVocab::default_add_bos(&model, pre.as_deref()),
    };
    Ok(GgufVocab {
        model: model.clone(),
        pre,
        tokens: strs("tokenizer.ggml.tokens")?,
        token_types,
        merges: if f.get("tokenizer.ggml.merges").is_some() { strs("tokenizer.ggml.merges")? } else { Vec::new() },
        scores: match f.get("tokenizer.ggml.scores").and_then(|v| v.as_array()) {
            Some(a) => a.iter().map(|v| v.as_f64().unwrap_or(f64::NAN) as f32).collect(),
            None => Vec::new(),
        },
        add_space_prefix: match f.get("tokenizer.ggml.add_space_prefix") {
            Some(_) => f.get_bool("tokenizer.ggml.add_space_prefix")?,
            None => model == "llama",
        },
        bos: id("tokenizer.ggml.bos_token_id")?,
        eos: id("tokenizer.ggml.eos_token_id")?,
        add_bos,
        chat_template: f.get("tokenizer.chat_template").and_then(|v| v.as_str()).map(str::to_string),
    })
}

/// Hugging Face `config.json` fields Kiln reads.
#[derive(serde::Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rope_theta: Option<f32>,
    rms_norm_eps: f32,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    rope_scaling: Option<serde_json::Value>,
    /// transformers ≥ 5 spelling: `rope_theta` and the scaling in one object.
    rope_parameters: Option<serde_json::Value>,
    hidden_act: Option<String>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<usize>,
    layer_types: Option<Vec<String>>,
    // Gemma 3.
    hidden_activation: Option<String>,
    query_pre_attn_scalar: Option<f32>,
    rope_local_base_freq: Option<f32>,
    #[serde(alias = "_sliding_window_pattern")]
    sliding_window_pattern: Option<usize>,
    attn_logit_softcapping: Option<f64>,
    final_logit_softcapping: Option<f64>,
    use_bidirectional_attention: Option<bool>,
}

/// Which layers of a config.json model attend through a sliding window: the window and the layers that
/// stay full. Mistral/Llama/Phi-3: `sliding_window` applies to every layer. Qwen2/Qwen3: only with
/// `use_sliding_window`, and then to layers ≥ `max_window_layers` (transformers' default 28). An
/// explicit `layer_types` (full_attention | sliding_attention per layer) decides over both.
fn hf_sliding_window(path: &Path, arch: Arch, hf: &HfConfig) -> Result<(Option<usize>, Vec<usize>)> {
    let err = |m: String| FrontendError::invalid(path, m);
    let n = hf.num_hidden_layers;
    let window = match arch {
        Arch::Qwen2 | Arch::Qwen3 => hf.sliding_window.filter(|_| hf.use_sliding_window == Some(true)),
        Arch::Llama | Arch::Phi3 | Arch::Gemma3 => {
            if hf.use_sliding_window == Some(true) {
                return Err(err(format!("config key `use_sliding_window` is not supported for {}", arch.name())));
            }
            hf.sliding_window
        }
    };
    if window == Some(0) {
        return Err(err("config key `sliding_window` is 0".into()));
    }
    let sliding: Vec<bool> = match &hf.layer_types {
        Some(types) => {
            if types.len() != n {
                return Err(err(format!("config key `layer_types` lists {} layers for {n}", types.len())));
            }
            types
                .iter()
                .map(|t| match t.as_str() {
                    "full_attention" => Ok(false),
                    "sliding_attention" => Ok(true),
                    other => Err(err(format!(
                        "config key `layer_types` has `{other}`; Kiln implements full_attention and sliding_attention"
                    ))),
                })
                .collect::<Result<_>>()?
        }
        None => match arch {
            Arch::Qwen2 | Arch::Qwen3 => (0..n).map(|l| l >= hf.max_window_layers.unwrap_or(28)).collect(),
            Arch::Llama | Arch::Phi3 => vec![true; n],
            // Every `sliding_window_pattern`-th layer (default 6) is global.
            Arch::Gemma3 => {
                let p = hf.sliding_window_pattern.unwrap_or(6).max(1);
                (0..n).map(|l| (l + 1) % p != 0).collect()
            }
        },
    };
    match window {
        Some(w) if sliding.iter().any(|&s| s) => Ok((Some(w), (0..n).filter(|&l| !sliding[l]).collect())),
        None if hf.layer_types.is_some()
            && sliding.iter().any(|&s| s)
            && !matches!(arch, Arch::Qwen2 | Arch::Qwen3) =>
        {
            Err(err("config key `layer_types` has sliding_attention layers but no `sliding_window`".into()))
        }
        _ => Ok((None, Vec::new())),
    }
}

/// config.json keys the importer reads (through [`HfConfig`] or checks of their own).
const HF_READ_KEYS: &[&str] = &[
    "model_type",
    "architectures",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rope_theta",
    "rms_norm_eps",
    "max_position_embeddings",
    "tie_word_embeddings",
    "attention_bias",
    "rope_scaling",
    "rope_parameters",
    "hidden_act",
    "sliding_window",
    "use_sliding_window",
    "mlp_bias",
    "use_mrope",
    "rope_interleaved",
    "layer_types",
    "max_window_layers",
    "partial_rotary_factor",
    "hidden_activation",
    "query_pre_attn_scalar",
    "rope_local_base_freq",
    "sliding_window_pattern",
    "_sliding_window_pattern",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "use_bidirectional_attention",
];

/// config.json keys that do not change inference math: training-only settings (dropouts,
/// initialisation, tensor-parallel pretraining splits, which compute the same product), token ids the
/// tokenizer files also carry, storage and bookkeeping notes.
const HF_HARMLESS_KEYS: &[&str] = &[
    "_name_or_path",
    "attention_dropout",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "initializer_range",
    "pretraining_tp",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "use_cache",
    "is_llama_config",
    "transformers.js_config",
    "residual_dropout",
    "embedding_dropout",
    "embd_pdrop",
    "resid_pdrop",
    // Where transformers finds remote code for the class; Kiln implements the architecture itself.
    "auto_map",
    // The context a scaling started from: read by longrope/yarn only, which are refused.
    "original_max_position_embeddings",
];

/// Refuses every config.json key the importer neither reads nor knows to be harmless (a key that may
/// change the math: softcapping, qk-norm, other scalings, quantization…), naming it.
fn check_hf_keys(path: &Path, raw: &serde_json::Value) -> Result<()> {
    let Some(obj) = raw.as_object() else {
        return Err(FrontendError::invalid(path, "config.json is not a JSON object"));
    };
    for k in obj.keys() {
        if !HF_READ_KEYS.contains(&k.as_str()) && !HF_HARMLESS_KEYS.contains(&k.as_str()) {
            return Err(FrontendError::invalid(
                path,
                format!("config key `{k}` is not supported; refusing to ignore it"),
            ));
        }
    }
    let flag = |k: &str| obj.get(k).and_then(|v| v.as_bool()).unwrap_or(false);
    for (k, what) in [
        ("mlp_bias", "MLP projections with biases"),
        ("use_mrope", "multimodal RoPE"),
        ("rope_interleaved", "interleaved RoPE on Hugging Face weights"),
    ] {
        if flag(k) {
            return Err(FrontendError::invalid(path, format!("config key `{k}` = true ({what}) is not supported")));
        }
    }
    if let Some(p) = obj.get("partial_rotary_factor").filter(|p| p.as_f64() != Some(1.0)) {
        return Err(FrontendError::invalid(
            path,
            format!("config key `partial_rotary_factor` = {p} (partial rotary) is not supported"),
        ));
    }
    Ok(())
}

/// RoPE scaling from a config's `rope_scaling` (or `rope_parameters`) object; unknown kinds and fields
/// are refused by name.
fn hf_rope_scaling(path: &Path, key: &str, v: &serde_json::Value) -> Result<Option<RopeScaling>> {
    if v.is_null() {
        return Ok(None);
    }
    let err = |m: String| FrontendError::invalid(path, format!("{key}: {m}"));
    let obj = v.as_object().ok_or_else(|| err(format!("{v} is not an object")))?;
    let kind = obj.get("rope_type").or_else(|| obj.get("type")).and_then(|t| t.as_str()).unwrap_or("default");
    let allowed: &[&str] = match kind {
        "default" => &[],
        "linear" => &["factor"],
        "llama3" => &["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"],
        other => {
            return Err(err(format!(
                "rope_type `{other}` is not supported (Kiln implements default, linear and llama3)"
            )))
        }
    };
    for k in obj.keys() {
        if !["rope_type", "type", "rope_theta"].contains(&k.as_str()) && !allowed.contains(&k.as_str()) {
            return Err(err(format!("field `{k}` of a `{kind}` scaling is not supported")));
        }
    }
    let num = |k: &str| -> Result<f64> {
        obj.get(k).and_then(|x| x.as_f64()).ok_or_else(|| err(format!("`{kind}` scaling needs a numeric `{k}`")))
    };
    Ok(match kind {
        "linear" => Some(RopeScaling::Linear { factor: num("factor")? as f32 }),
        "llama3" => {
            let orig = num("original_max_position_embeddings")?;
            if !(orig >= 1.0 && orig.fract() == 0.0 && orig < (1u64 << 40) as f64) {
                return Err(err(format!("original_max_position_embeddings {orig} is not a positive integer")));
            }
            Some(RopeScaling::Llama3 {
                factor: num("factor")? as f32,
                low_freq_factor: num("low_freq_factor")? as f32,
                high_freq_factor: num("high_freq_factor")? as f32,
                original_max_position_embeddings: orig as usize,
            })
        }
        _ => None,
    })
}

/// HF tensor name → Kiln's (GGUF) name. Gemma 3 names its norms differently: `post_attention_layernorm`
/// follows attention there (Llama's is the MLP's input norm), `pre_feedforward_layernorm` is the MLP's.
pub fn hf_to_gguf_name(arch: Arch, name: &str) -> Option<String> {
    let rest = name.strip_prefix("model.").unwrap_or(name);
    Some(match rest {
        "embed_tokens.weight" => "token_embd.weight".into(),
        "norm.weight" => "output_norm.weight".into(),
        "lm_head.weight" => "output.weight".into(),
        _ => {
            let rest = rest.strip_prefix("layers.")?;
            let (l, tail) = rest.split_once('.')?;
            let l: usize = l.parse().ok()?;
            let mapped = match tail {
                "input_layernorm.weight" => "attn_norm.weight",
                "post_attention_layernorm.weight" if arch == Arch::Gemma3 => "post_attention_norm.weight",
                "pre_feedforward_layernorm.weight" if arch == Arch::Gemma3 => "ffn_norm.weight",
                "post_feedforward_layernorm.weight" if arch == Arch::Gemma3 => "post_ffw_norm.weight",
                "post_attention_layernorm.weight" => "ffn_norm.weight",
                "self_attn.q_proj.weight" => "attn_q.weight",
                "self_attn.k_proj.weight" => "attn_k.weight",
                "self_attn.v_proj.weight" => "attn_v.weight",
                "self_attn.q_proj.bias" => "attn_q.bias",
                "self_attn.k_proj.bias" => "attn_k.bias",
                "self_attn.v_proj.bias" => "attn_v.bias",
                "self_attn.q_norm.weight" => "attn_q_norm.weight",
                "self_attn.k_norm.weight" => "attn_k_norm.weight",
                "self_attn.o_proj.weight" => "attn_output.weight",
                "self_attn.qkv_proj.weight" => llama::FUSED_QKV,
                "mlp.gate_up_proj.weight" => llama::FUSED_GATE_UP,
                "mlp.gate_proj.weight" => "ffn_gate.weight",
                "mlp.up_proj.weight" => "ffn_up.weight",
                "mlp.down_proj.weight" => "ffn_down.weight",
                _ => return None,
            };
            format!("blk.{l}.{mapped}")
        }
    })
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| FrontendError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| FrontendError::invalid(path, format!("invalid JSON: {e}")))
}

pub fn load_hf(dir: &Path) -> Result<Model> {
    let cfg_path = dir.join("config.json");
    let raw = read_json(&cfg_path)?;
    check_hf_keys(&cfg_path, &raw)?;
    let hf: HfConfig = serde_json::from_value(raw).map_err(|e| FrontendError::invalid(&cfg_path, e.to_string()))?;
    let model_type = hf.model_type.clone().unwrap_or_default();
    let arch = match model_type.as_str() {
        "llama" | "mistral" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
        "qwen3" => Arch::Qwen3,
        "phi3" => Arch::Phi3,
        "gemma3_text" => Arch::Gemma3,
        _ => {
            let shown =
                if model_type.is_empty() { format!("{:?}", hf.architectures.unwrap_or_default()) } else { model_type };
            return Err(FrontendError::UnsupportedArch { path: cfg_path, arch: shown });
        }
    };
    let mut rope_theta = hf.rope_theta;
    let rope_scaling = match (&hf.rope_scaling, &hf.rope_parameters) {
        (Some(rs), None) => hf_rope_scaling(&cfg_path, "rope_scaling", rs)?,
        (None, Some(rp)) => {
            if let Some(t) = rp.get("rope_theta") {
                rope_theta = Some(t.as_f64().ok_or_else(|| {
                    FrontendError::invalid(&cfg_path, format!("rope_parameters: rope_theta {t} is not a number"))
                })? as f32);
            }
            hf_rope_scaling(&cfg_path, "rope_parameters", rp)?
        }
        (None, None) => None,
        (Some(_), Some(_)) => {
            return Err(FrontendError::invalid(&cfg_path, "both rope_scaling and rope_parameters are set"));
        }
    };
    let (sliding_window, full_attention_layers) = hf_sliding_window(&cfg_path, arch, &hf)?;
    let (act_key, act, want) = match arch {
        Arch::Gemma3 => ("hidden_activation", hf.hidden_activation.as_deref(), "gelu_pytorch_tanh"),
        _ => ("hidden_act", hf.hidden_act.as_deref(), "silu"),
    };
    if let Some(act) = act.filter(|a| *a != want) {
        return Err(FrontendError::invalid(
            &cfg_path,
            format!("{act_key} `{act}` is not supported (only {want} here)"),
        ));
    }
    for (k, v) in [
        ("attn_logit_softcapping", &hf.attn_logit_softcapping),
        ("final_logit_softcapping", &hf.final_logit_softcapping),
    ] {
        if let Some(v) = v {
            return Err(FrontendError::invalid(
                &cfg_path,
                format!("config key `{k}` = {v} (softcapping) is not supported"),
            ));
        }
    }
    if hf.use_bidirectional_attention == Some(true) {
        return Err(FrontendError::invalid(
            &cfg_path,
            "config key `use_bidirectional_attention` = true is not supported",
        ));
    }
    if arch != Arch::Gemma3 {
        for (k, set) in [
            ("rope_local_base_freq", hf.rope_local_base_freq.is_some()),
            ("query_pre_attn_scalar", hf.query_pre_attn_scalar.is_some()),
            ("hidden_activation", hf.hidden_activation.is_some()),
            ("sliding_window_pattern", hf.sliding_window_pattern.is_some()),
        ] {
            if set {
                return Err(FrontendError::invalid(
                    &cfg_path,
                    format!("config key `{k}` is not supported for {model_type}"),
                ));
            }
        }
    }
    if hf.num_attention_heads == 0 {
        return Err(FrontendError::invalid(&cfg_path, "num_attention_heads is 0"));
    }
    let config = LlamaConfig {
        arch,
        vocab_size: hf.vocab_size,
        hidden_size: hf.hidden_size,
        intermediate_size: hf.intermediate_size,
        n_layers: hf.num_hidden_layers,
        n_heads: hf.num_attention_heads,
        n_kv_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
        head_dim: hf.head_dim.unwrap_or(if arch == Arch::Gemma3 {
            256
        } else {
            hf.hidden_size / hf.num_attention_heads
        }),
        rope_theta: rope_theta.unwrap_or(10000.0),
        rms_norm_eps: hf.rms_norm_eps,
        context_length: hf.max_position_embeddings.unwrap_or(2048),
        attention_bias: hf.attention_bias.unwrap_or(arch == Arch::Qwen2),
        tie_embeddings: hf.tie_word_embeddings.unwrap_or(arch == Arch::Gemma3),
        qk_norm: matches!(arch, Arch::Qwen3 | Arch::Gemma3),
        rope_local_theta: match arch {
            Arch::Gemma3 if sliding_window.is_some() => Some(hf.rope_local_base_freq.unwrap_or(10000.0)),
            _ => None,
        },
        query_pre_attn_scalar: match arch {
            Arch::Gemma3 => Some(hf.query_pre_attn_scalar.unwrap_or(256.0)),
            _ => None,
        },
        sliding_window,
        full_attention_layers,
        rope_scaling,
    };
    config.validate().map_err(|m| FrontendError::invalid(&cfg_path, m))?;

    // Single file or shards listed by the index.
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if index.exists() {
        let v = read_json(&index)?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| FrontendError::invalid(&index, "no `weight_map` object"))?;
        let mut files: Vec<String> = Vec::new();
        for (tensor, file) in map {
            let file = file
                .as_str()
                .ok_or_else(|| FrontendError::invalid(&index, format!("weight_map[{tensor}] is not a string")))?;
            if file.contains('/') || file.contains('\\') || file.starts_with('.') {
                return Err(FrontendError::invalid(&index, format!("shard name `{file}` leaves the model directory")));
            }
            if !files.iter().any(|f| f == file) {
                files.push(file.to_string());
            }
        }
        files.sort();
        files.into_iter().map(|f| dir.join(f)).collect()
    } else {
        vec![dir.join("model.safetensors")]
    };
    let mut weights = WeightStore::new();
    for file in &files {
        read_safetensors(file, arch, &mut weights)?;
    }
    if config.tie_embeddings {
        weights.remove("output.weight");
    }
    llama::split_fused(&config, &mut weights).map_err(|m| FrontendError::invalid(dir, m))?;
    if arch == Arch::Gemma3 {
        // Gemma3RMSNorm multiplies by (1 + w); Kiln's rms_norm (like llama.cpp's files) by the weight itself.
        gemma_norms(&mut weights, 1.0).map_err(|m| FrontendError::invalid(dir, m))?;
    }
    if let Some(factors) = config.derived_rope_freqs() {
        weights.insert(ROPE_FREQS, TensorData::from_f32(vec![factors.len()], &factors));
    }
    check_weights(dir, &config, &weights)?;
    let tok_path = dir.join("tokenizer.json");
    let tokenizer = if tok_path.exists() {
        Some(
            Tokenizer::from_tokenizer_json(&tok_path)
                .map_err(|source| FrontendError::Tokenizer { path: tok_path.clone(), source })?,
        )
    } else {
        None
    };
    let mut metadata = BTreeMap::new();
    metadata.insert("safetensors.files".into(), files.len().to_string());
    Ok(Model { name: file_stem(dir), source: dir.into(), format: "safetensors", config, weights, tokenizer, metadata })
}

/// Reads one safetensors file zero-copy (mmap) into `out`, renaming tensors to Kiln's names.
fn read_safetensors(path: &Path, arch: Arch, out: &mut WeightStore) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| FrontendError::io(path, e))?;
    // SAFETY: the file is opened read-only and mapped privately; like every mmap-based loader we assume
    // it is not truncated underneath us while the model is loaded.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| FrontendError::io(path, e))?;
    let all = Bytes::from_owner(mmap);
    let st = safetensors::SafeTensors::deserialize(&all)
        .map_err(|e| FrontendError::invalid(path, format!("invalid safetensors: {e}")))?;
    let base = all.as_ptr() as usize;
    let mut names = st.names();
    names.sort();
    for name in names {
        let view = st.tensor(name).map_err(|e| FrontendError::invalid(path, format!("tensor `{name}`: {e}")))?;
        let dtype = match view.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            other => {
                return Err(FrontendError::invalid(
                    path,
                    format!("tensor `{name}` has dtype {other:?}; Kiln reads F32, F16, BF16"),
                ))
            }
        };
        let Some(kiln_name) = hf_to_gguf_name(arch, name) else {
            if name.ends_with("rotary_emb.inv_freq") {
                continue;
            }
            return Err(FrontendError::invalid(path, format!("unexpected tensor `{name}` for a Llama-family model")));
        };
        let start = view.data().as_ptr() as usize - base;
        let bytes = all.slice(start..start + view.data().len());
        if out.contains(&kiln_name) {
            return Err(FrontendError::invalid(path, format!("tensor `{name}` appears twice")));
        }
        out.insert(kiln_name, TensorData { dtype, shape: view.shape().to_vec(), bytes });
    }
    Ok(())
}
