//! Writing models: a Hugging Face directory (config.json + safetensors, optionally sharded) and GGUF.
//!
//! Both take Kiln's normalised weights (GGUF names, HF row order). The GGUF writer applies llama.cpp's
//! Q/K row permutation for llama models, exactly as its converter does, so files we write load in
//! llama.cpp and our importer's un-permutation is exercised.

use crate::error::{FrontendError, Result};
use crate::gguf::{GgufValue, GgufWriter};
use crate::llama::{self, Arch, LlamaConfig, RopeScaling, FUSED_GATE_UP, FUSED_QKV, ROPE_FREQS};
use crate::tokenizer::GgufVocab;
use kiln_ir::{DType, TensorData, WeightStore};
use std::collections::BTreeMap;
use std::path::Path;

/// Kiln (GGUF) tensor name → HF name.
pub fn gguf_to_hf_name(arch: Arch, name: &str) -> Option<String> {
    Some(match name {
        "token_embd.weight" => "model.embed_tokens.weight".into(),
        "output_norm.weight" => "model.norm.weight".into(),
        "output.weight" => "lm_head.weight".into(),
        _ => {
            let rest = name.strip_prefix("blk.")?;
            let (l, tail) = rest.split_once('.')?;
            let mapped = match tail {
                "attn_norm.weight" => "input_layernorm.weight",
                "post_attention_norm.weight" if arch == Arch::Gemma3 => "post_attention_layernorm.weight",
                "ffn_norm.weight" if arch == Arch::Gemma3 => "pre_feedforward_layernorm.weight",
                "post_ffw_norm.weight" if arch == Arch::Gemma3 => "post_feedforward_layernorm.weight",
                "ffn_norm.weight" => "post_attention_layernorm.weight",
                "attn_q.weight" => "self_attn.q_proj.weight",
                "attn_k.weight" => "self_attn.k_proj.weight",
                "attn_v.weight" => "self_attn.v_proj.weight",
                "attn_q.bias" => "self_attn.q_proj.bias",
                "attn_k.bias" => "self_attn.k_proj.bias",
                "attn_v.bias" => "self_attn.v_proj.bias",
                "attn_q_norm.weight" => "self_attn.q_norm.weight",
                "attn_k_norm.weight" => "self_attn.k_norm.weight",
                "attn_output.weight" => "self_attn.o_proj.weight",
                FUSED_QKV => "self_attn.qkv_proj.weight",
                FUSED_GATE_UP => "mlp.gate_up_proj.weight",
                "ffn_gate.weight" => "mlp.gate_proj.weight",
                "ffn_up.weight" => "mlp.up_proj.weight",
                "ffn_down.weight" => "mlp.down_proj.weight",
                _ => return None,
            };
            format!("model.layers.{l}.{mapped}")
        }
    })
}

fn hf_config(cfg: &LlamaConfig) -> serde_json::Value {
    let mut v = serde_json::json!({
        "architectures": [match cfg.arch {
            Arch::Llama if cfg.sliding_window.is_some() => "MistralForCausalLM",
            Arch::Llama => "LlamaForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Qwen3 => "Qwen3ForCausalLM",
            Arch::Phi3 => "Phi3ForCausalLM",
            Arch::Gemma3 => "Gemma3ForCausalLM",
        }],
        "model_type": match cfg.arch {
            Arch::Gemma3 => "gemma3_text",
            // A Llama with a sliding window is what transformers calls Mistral (its Llama has no window).
            Arch::Llama if cfg.sliding_window.is_some() => "mistral",
            a => a.name(),
        },
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.context_length,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": cfg.attention_bias,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        // Kiln's config has no padding id (transformers' Phi-3 default, 32000, may lie outside the vocabulary).
        "pad_token_id": null,
    });
    let scaling = match cfg.rope_scaling {
        None | Some(RopeScaling::Factors) => None,
        Some(RopeScaling::Linear { factor }) => Some(serde_json::json!({ "rope_type": "linear", "factor": factor })),
        Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }) => {
            Some(serde_json::json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings,
            }))
        }
    };
    if let Some(s) = scaling {
        v["rope_scaling"] = s;
    }
    if cfg.arch == Arch::Gemma3 {
        let o = v.as_object_mut().expect("object");
        o.remove("hidden_act");
        o.insert("hidden_activation".into(), "gelu_pytorch_tanh".into());
        // An integer in transformers' Gemma3TextConfig (its validation refuses 16.0).
        let s = cfg.query_pre_attn_scalar.unwrap_or(cfg.head_dim as f32);
        let s = if s.fract() == 0.0 && s.abs() < 1e9 { serde_json::json!(s as i64) } else { serde_json::json!(s) };
        o.insert("query_pre_attn_scalar".into(), s);
        if let Some(t) = cfg.rope_local_theta {
            o.insert("rope_local_base_freq".into(), t.into());
        }
    }
    if let Some(w) = cfg.sliding_window {
        v["sliding_window"] = w.into();
        let types: Vec<&str> = (0..cfg.n_layers)
            .map(|l| if cfg.window_of(l).is_some() { "sliding_attention" } else { "full_attention" })
            .collect();
        v["layer_types"] = types.into();
        if matches!(cfg.arch, Arch::Qwen2 | Arch::Qwen3) {
            v["use_sliding_window"] = true.into();
            // For transformers versions before `layer_types`: the leading full layers, when that is the shape.
            let lead = (0..cfg.n_layers).take_while(|&l| cfg.window_of(l).is_none()).count();
            if (lead..cfg.n_layers).all(|l| cfg.window_of(l).is_some()) {
                v["max_window_layers"] = lead.into();
            }
        }
    }
    v
}

/// Phi-3's files hold Q/K/V and gate/up fused (as its checkpoints and llama.cpp's converter store them):
/// the weights with each layer's parts replaced by the fused tensor (other archs: unchanged).
fn fuse_for_file(dir: &Path, cfg: &LlamaConfig, weights: &WeightStore) -> Result<WeightStore> {
    let mut w = weights.clone();
    if cfg.arch != Arch::Phi3 {
        return Ok(w);
    }
    for l in 0..cfg.n_layers {
        let p = |s: &str| format!("blk.{l}.{s}");
        for (fused, parts) in [
            (FUSED_QKV, ["attn_q.weight", "attn_k.weight", "attn_v.weight"].as_slice()),
            (FUSED_GATE_UP, ["ffn_gate.weight", "ffn_up.weight"].as_slice()),
        ] {
            let ts: Vec<TensorData> = parts
                .iter()
                .map(|n| w.remove(&p(n)).ok_or_else(|| FrontendError::MissingTensor { path: dir.into(), tensor: p(n) }))
                .collect::<Result<_>>()?;
            if ts.iter().any(|t| t.dtype != ts[0].dtype || t.shape[1..] != ts[0].shape[1..]) {
                return Err(FrontendError::invalid(
                    dir,
                    format!("cannot fuse {} of layer {l}: dtypes or widths differ", parts.join(", ")),
                ));
            }
            let mut shape = ts[0].shape.clone();
            shape[0] = ts.iter().map(|t| t.shape[0]).sum();
            let bytes: Vec<u8> = ts.iter().flat_map(|t| t.bytes.iter().copied()).collect();
            w.insert(p(fused), TensorData { dtype: ts[0].dtype, shape, bytes: bytes.into() });
        }
    }
    Ok(w)
}

/// A config-derived `rope_freqs.weight` may be left out of a file only if it is what the config gives
/// (else the written model would compute other frequencies than the one in memory).
fn check_derived_freqs(path: &Path, cfg: &LlamaConfig, weights: &WeightStore) -> Result<()> {
    match (cfg.derived_rope_freqs(), weights.get(ROPE_FREQS)) {
        (Some(want), Some(t)) => {
            if t.dtype != DType::F32 || t.to_f32().ok() != Some(want) {
                return Err(FrontendError::invalid(
                    path,
                    format!("tensor `{ROPE_FREQS}` differs from what the config's rope_scaling gives"),
                ));
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Writes `config.json` and the weights as `model.safetensors`, or, with `shards > 1`, as that many
/// `model-0000N-of-0000M.safetensors` files plus `model.safetensors.index.json`.
pub fn write_hf(dir: &Path, cfg: &LlamaConfig, weights: &WeightStore, shards: usize) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| FrontendError::io(dir, e))?;
    let cfg_path = dir.join("config.json");
    if cfg.rope_scaling == Some(RopeScaling::Factors) {
        return Err(FrontendError::invalid(
            dir,
            format!("RoPE scaling given only as tensor `{ROPE_FREQS}` has no Hugging Face config form"),
        ));
    }
    check_derived_freqs(dir, cfg, weights)?;
    let mut weights = fuse_for_file(dir, cfg, weights)?;
    if cfg.arch == Arch::Gemma3 {
        crate::model::gemma_norms(&mut weights, -1.0).map_err(|m| FrontendError::invalid(dir, m))?;
    }
    let weights = &weights;
    if cfg.rope_local_theta.is_some() && cfg.arch != Arch::Gemma3 {
        return Err(FrontendError::invalid(dir, "a local RoPE base has a Hugging Face form for Gemma 3 only"));
    }
    let text = serde_json::to_string_pretty(&hf_config(cfg)).expect("json");
    std::fs::write(&cfg_path, text).map_err(|e| FrontendError::io(&cfg_path, e))?;
    let mut tensors: Vec<(String, &TensorData)> = Vec::new();
    for (name, t) in weights.iter() {
        if name == ROPE_FREQS {
            continue; // derived from config.json's rope_scaling on import
        }
        let hf = gguf_to_hf_name(cfg.arch, name)
            .ok_or_else(|| FrontendError::invalid(dir, format!("no HF name for `{name}`")))?;
        if !matches!(t.dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(FrontendError::invalid(
                dir,
                format!("tensor `{name}` is {}; safetensors export takes f32/f16/bf16", t.dtype),
            ));
        }
        tensors.push((hf, t));
    }
    let shards = shards.max(1);
    let per = tensors.len().div_ceil(shards);
    let mut weight_map = BTreeMap::new();
    for (i, chunk) in tensors.chunks(per.max(1)).enumerate() {
        let file = if shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, shards)
        };
        let views: Vec<(String, safetensors::tensor::TensorView)> = chunk
            .iter()
            .map(|(name, t)| {
                let dt = match t.dtype {
                    DType::F16 => safetensors::Dtype::F16,
                    DType::BF16 => safetensors::Dtype::BF16,
                    _ => safetensors::Dtype::F32,
                };
                let view =
                    safetensors::tensor::TensorView::new(dt, t.shape.clone(), &t.bytes).expect("consistent tensor");
                (name.clone(), view)
            })
            .collect();
        for (name, _) in chunk {
            weight_map.insert(name.clone(), file.clone());
        }
        let path = dir.join(&file);
        safetensors::serialize_to_file(views, None, &path).map_err(|e| FrontendError::invalid(&path, e.to_string()))?;
    }
    if shards > 1 {
        let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
        let path = dir.join("model.safetensors.index.json");
        std::fs::write(&path, serde_json::to_string_pretty(&index).expect("json"))
            .map_err(|e| FrontendError::io(&path, e))?;
    }
    Ok(())
}

/// Writes a GGUF file with llama.cpp's metadata keys for `cfg`, the weights (Q/K permuted for llama), and
/// the vocabulary if given.
pub fn write_gguf(
    path: &Path,
    name: &str,
    cfg: &LlamaConfig,
    weights: &WeightStore,
    vocab: Option<&GgufVocab>,
) -> Result<()> {
    let mut w = GgufWriter::new();
    let a = cfg.arch.name();
    let u32v = |v: usize| GgufValue::U32(v as u32);
    w.add_metadata("general.architecture", GgufValue::String(a.into()));
    w.add_metadata("general.name", GgufValue::String(name.into()));
    w.add_metadata(format!("{a}.vocab_size"), u32v(cfg.vocab_size));
    w.add_metadata(format!("{a}.context_length"), u32v(cfg.context_length));
    w.add_metadata(format!("{a}.embedding_length"), u32v(cfg.hidden_size));
    w.add_metadata(format!("{a}.feed_forward_length"), u32v(cfg.intermediate_size));
    w.add_metadata(format!("{a}.block_count"), u32v(cfg.n_layers));
    w.add_metadata(format!("{a}.attention.head_count"), u32v(cfg.n_heads));
    w.add_metadata(format!("{a}.attention.head_count_kv"), u32v(cfg.n_kv_heads));
    w.add_metadata(format!("{a}.attention.key_length"), u32v(cfg.head_dim));
    w.add_metadata(format!("{a}.attention.value_length"), u32v(cfg.head_dim));
    w.add_metadata(format!("{a}.rope.dimension_count"), u32v(cfg.head_dim));
    w.add_metadata(format!("{a}.rope.freq_base"), GgufValue::F32(cfg.rope_theta));
    w.add_metadata(format!("{a}.attention.layer_norm_rms_epsilon"), GgufValue::F32(cfg.rms_norm_eps));
    if cfg.arch == Arch::Gemma3 {
        // llama.cpp's Gemma 3: 1/√head_dim scale, local layers every but each n-th, their own RoPE base.
        if cfg.query_pre_attn_scalar.is_some_and(|s| s != cfg.head_dim as f32) {
            return Err(FrontendError::invalid(path, "query_pre_attn_scalar ≠ head_dim has no gemma3 GGUF form"));
        }
    }
    if let (Arch::Gemma3, Some(win)) = (cfg.arch, cfg.sliding_window) {
        let n = (1..=cfg.n_layers + 1)
            .find(|&n| (0..cfg.n_layers).all(|l| cfg.window_of(l).is_some() == (l % n != n - 1)))
            .ok_or_else(|| {
                FrontendError::invalid(path, "local/global layers without a period have no gemma3 GGUF form")
            })?;
        w.add_metadata(format!("{a}.attention.sliding_window"), u32v(win));
        w.add_metadata(format!("{a}.attention.sliding_window_pattern"), u32v(n));
        w.add_metadata(format!("{a}.rope.freq_base_swa"), GgufValue::F32(cfg.rope_local_theta.unwrap_or(10000.0)));
    } else if let Some(win) = cfg.sliding_window {
        if cfg.rope_local_theta.is_some() {
            return Err(FrontendError::invalid(path, format!("a local RoPE base has no {a} GGUF form")));
        }
        if !cfg.full_attention_layers.is_empty() {
            return Err(FrontendError::invalid(
                path,
                format!(
                    "full-attention layers {:?} beside a sliding window have no {a} GGUF form",
                    cfg.full_attention_layers
                ),
            ));
        }
        w.add_metadata(format!("{a}.attention.sliding_window"), u32v(win));
    }
    // llama.cpp's converter conventions: linear scaling as metadata, Llama 3's as the divisors tensor.
    let linear = matches!(cfg.rope_scaling, Some(RopeScaling::Linear { .. }));
    if let Some(RopeScaling::Linear { factor }) = cfg.rope_scaling {
        check_derived_freqs(path, cfg, weights)?;
        w.add_metadata(format!("{a}.rope.scaling.type"), GgufValue::String("linear".into()));
        w.add_metadata(format!("{a}.rope.scaling.factor"), GgufValue::F32(factor));
    }
    if let Some(v) = vocab {
        w.add_metadata("tokenizer.ggml.model", GgufValue::String(v.model.clone()));
        if let Some(pre) = &v.pre {
            w.add_metadata("tokenizer.ggml.pre", GgufValue::String(pre.clone()));
        }
        let strs = |xs: &[String]| GgufValue::Array(xs.iter().map(|s| GgufValue::String(s.clone())).collect());
        w.add_metadata("tokenizer.ggml.tokens", strs(&v.tokens));
        w.add_metadata(
            "tokenizer.ggml.token_type",
            GgufValue::Array(v.token_types.iter().map(|&t| GgufValue::I32(t)).collect()),
        );
        if !v.scores.is_empty() {
            w.add_metadata(
                "tokenizer.ggml.scores",
                GgufValue::Array(v.scores.iter().map(|&x| GgufValue::F32(x)).collect()),
            );
        }
        if v.model == "llama" {
            w.add_metadata("tokenizer.ggml.add_space_prefix", GgufValue::Bool(v.add_space_prefix));
        }
        if !v.merges.is_empty() {
            w.add_metadata("tokenizer.ggml.merges", strs(&v.merges));
        }
        if let Some(b) = v.bos {
            w.add_metadata("tokenizer.ggml.bos_token_id", GgufValue::U32(b));
        }
        if let Some(e) = v.eos {
            w.add_metadata("tokenizer.ggml.eos_token_id", GgufValue::U32(e));
        }
        w.add_metadata("tokenizer.ggml.add_bos_token", GgufValue::Bool(v.add_bos));
        if let Some(t) = &v.chat_template {
            w.add_metadata("tokenizer.chat_template", GgufValue::String(t.clone()));
        }
    }
    let weights = &fuse_for_file(path, cfg, weights)?;
    for (tname, t) in weights.iter() {
        if linear && tname == ROPE_FREQS {
            continue;
        }
        // llama.cpp's Phi-3 name for the fused gate/up is `ffn_up` (twice the height).
        let tname = &match tname.strip_suffix(FUSED_GATE_UP) {
            Some(blk) => format!("{blk}ffn_up.weight"),
            None => tname.clone(),
        };
        let heads = match tname.rsplit('.').nth(1) {
            Some("attn_q") if cfg.arch == Arch::Llama => Some(cfg.n_heads),
            Some("attn_k") if cfg.arch == Arch::Llama => Some(cfg.n_kv_heads),
            _ => None,
        };
        match heads {
            Some(h) => {
                let permuted = llama::permute_qk_rows(&t.bytes, t.shape[0], h);
                w.add_tensor(
                    tname.clone(),
                    &TensorData { dtype: t.dtype, shape: t.shape.clone(), bytes: permuted.into() },
                )?;
            }
            None => w.add_tensor(tname.clone(), t)?,
        }
    }
    w.write(path)?;
    Ok(())
}
