//! Corrupted and hostile model files: each gives a clear error naming what is wrong and a non-zero exit
//! from the CLI, never a panic.

use crate::common::{random_weights, run_kiln, tiny_config};
use kiln::frontend::export::{write_gguf, write_hf};
use kiln::frontend::gguf::{GgufValue, GgufWriter};
use kiln::frontend::Arch;
use kiln::ir::DType;
use std::path::{Path, PathBuf};

fn valid_gguf() -> Vec<u8> {
    let cfg = tiny_config(Arch::Llama);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    write_gguf(&p, "tiny", &cfg, &random_weights(&cfg, DType::F32, 1), None).unwrap();
    std::fs::read(p).unwrap()
}

fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).position(|w| w == needle).expect("needle present")
}

/// Offset of the tensor-info record that follows the name `name` (the u32 n_dims field).
fn tensor_info(bytes: &[u8], name: &str) -> usize {
    // The name is stored as u64 length + bytes; search for the length-prefixed form to skip metadata.
    let mut needle = (name.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(name.as_bytes());
    find(bytes, &needle) + needle.len()
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Rebuilds the tiny model's GGUF with a change to its metadata or tensors.
fn gguf_with(change: impl Fn(&mut Vec<(String, GgufValue)>, &mut kiln::ir::WeightStore)) -> Vec<u8> {
    let cfg = tiny_config(Arch::Llama);
    let mut weights = random_weights(&cfg, DType::F32, 1);
    let f = kiln::frontend::gguf::GgufFile::from_bytes(valid_gguf().into()).unwrap();
    let mut meta = f.metadata.clone();
    change(&mut meta, &mut weights);
    let mut w = GgufWriter::new();
    for (k, v) in meta {
        w.add_metadata(k, v);
    }
    for (n, t) in weights.iter() {
        w.add_tensor(n.clone(), t).unwrap();
    }
    w.to_bytes()
}

fn set_meta(meta: &mut [(String, GgufValue)], key: &str, v: GgufValue) {
    meta.iter_mut().find(|(k, _)| k == key).expect("key").1 = v;
}

enum Case {
    Gguf(Vec<u8>),
    Hf(Box<dyn Fn(&Path)>),
    Path(PathBuf),
}

fn cases() -> Vec<(&'static str, Case, &'static str)> {
    let valid = valid_gguf();
    let q_info = tensor_info(&valid, "blk.0.attn_q.weight");
    let mut v = vec![
        ("missing file", Case::Path(PathBuf::from("/nonexistent/model.gguf")), "does not exist"),
        ("empty file", Case::Gguf(vec![]), "truncated"),
    ];
    v.push(("truncated header", Case::Gguf(valid[..10].to_vec()), "truncated"));
    v.push(("truncated in metadata", Case::Gguf(valid[..200].to_vec()), "truncated"));
    let mut b = valid.clone();
    b[..4].copy_from_slice(b"GGML");
    v.push(("bad magic", Case::Gguf(b), "magic"));
    let mut b = valid.clone();
    put_u32(&mut b, 4, 99);
    v.push(("unsupported version", Case::Gguf(b), "version"));
    v.push(("tensor data past EOF", Case::Gguf(valid[..valid.len() - 100].to_vec()), "past the end of the file"));
    let mut b = valid.clone();
    put_u64(&mut b, 8, u64::MAX / 3);
    v.push(("huge tensor count", Case::Gguf(b), "tensor"));
    let mut b = valid.clone();
    put_u64(&mut b, 16, 1 << 60);
    v.push(("huge metadata count", Case::Gguf(b), "metadata"));
    let mut b = valid.clone();
    put_u64(&mut b, 24, 1 << 50); // length of the first key
    v.push(("huge string length", Case::Gguf(b), "key of metadata entry #0"));
    let mut b = valid.clone();
    put_u64(&mut b, q_info + 4, 1 << 40);
    put_u64(&mut b, q_info + 12, 1 << 40);
    v.push(("overflowing dims", Case::Gguf(b), "blk.0.attn_q.weight"));
    let mut b = valid.clone();
    put_u32(&mut b, q_info, 9);
    v.push(("too many dims", Case::Gguf(b), "blk.0.attn_q.weight"));
    let mut b = valid.clone();
    put_u32(&mut b, q_info + 4 + 16, 10); // ggml type after 2 dims: Q2_K
    v.push(("unsupported dtype", Case::Gguf(b), "Q2_K"));
    let mut b = valid.clone();
    put_u32(&mut b, q_info + 4 + 16, 4242);
    v.push(("unknown dtype", Case::Gguf(b), "4242"));
    let mut b = valid.clone();
    let at = find(&b, b"general.architecture");
    b[at] = 0xff;
    b[at + 1] = 0xfe;
    v.push(("non-UTF-8 key", Case::Gguf(b), "UTF-8"));
    let mut b = valid.clone();
    b[q_info + 4 + 16 + 4] ^= 1; // misalign the data offset
    v.push(("misaligned tensor offset", Case::Gguf(b), "blk.0.attn_q.weight"));
    v.push((
        "unsupported architecture",
        Case::Gguf(gguf_with(|m, _| set_meta(m, "general.architecture", GgufValue::String("gptj".into())))),
        "gptj",
    ));
    v.push((
        "missing tensor",
        Case::Gguf(gguf_with(|_, w| {
            w.remove("blk.1.ffn_down.weight");
        })),
        "blk.1.ffn_down.weight",
    ));
    v.push((
        "wrong shape",
        Case::Gguf(gguf_with(|_, w| {
            let t = w.remove("blk.0.ffn_up.weight").unwrap();
            let vals = t.to_f32().unwrap();
            w.insert("blk.0.ffn_up.weight", kiln::ir::TensorData::from_f32(vec![32, 64], &vals));
        })),
        "blk.0.ffn_up.weight",
    ));
    v.push((
        "kv heads do not divide heads",
        Case::Gguf(gguf_with(|m, _| set_meta(m, "llama.attention.head_count_kv", GgufValue::U32(3)))),
        "n_kv_heads",
    ));
    // Found by the mutation fuzzer on a fast machine: a block count of millions made the loader list
    // millions of expected weights and run out of memory.
    v.push((
        "block count far beyond the tensors",
        Case::Gguf(gguf_with(|m, _| set_meta(m, "llama.block_count", GgufValue::U32(1 << 23)))),
        "blk.8388607.attn_norm.weight",
    ));
    v.push((
        "missing hyper-parameter",
        Case::Gguf(gguf_with(|m, _| m.retain(|(k, _)| k != "llama.block_count"))),
        "llama.block_count",
    ));
    // No silent drops: one tensor or key that Kiln does not implement at a time, each refused by name.
    v.push((
        "unknown tensor (qk-norm)",
        Case::Gguf(gguf_with(|_, w| {
            w.insert("blk.0.attn_q_norm.weight", kiln::ir::TensorData::from_f32(vec![8], &[1.0; 8]));
        })),
        "blk.0.attn_q_norm.weight",
    ));
    v.push((
        "unknown architecture key (softcapping)",
        Case::Gguf(gguf_with(|m, _| m.push(("llama.attn_logit_softcapping".into(), GgufValue::F32(50.0))))),
        "llama.attn_logit_softcapping",
    ));
    v.push((
        "yarn RoPE scaling",
        Case::Gguf(gguf_with(|m, _| m.push(("llama.rope.scaling.type".into(), GgufValue::String("yarn".into()))))),
        "yarn",
    ));
    v.push((
        "mixture of experts",
        Case::Gguf(gguf_with(|m, _| m.push(("llama.expert_count".into(), GgufValue::U32(8))))),
        "llama.expert_count",
    ));
    v.push((
        "partial rotary",
        Case::Gguf(gguf_with(|m, _| set_meta(m, "llama.rope.dimension_count", GgufValue::U32(4)))),
        "llama.rope.dimension_count",
    ));
    v.push((
        "value length differs from key length",
        Case::Gguf(gguf_with(|m, _| set_meta(m, "llama.attention.value_length", GgufValue::U32(4)))),
        "llama.attention.value_length",
    ));
    v.push((
        "rope_freqs in f16",
        Case::Gguf(gguf_with(|_, w| {
            let t = kiln::ir::TensorData::from_f32(vec![4], &[1.0; 4]);
            let bytes = kiln::ir::quant::quantize(DType::F16, &t.to_f32().unwrap()).unwrap();
            w.insert(
                "rope_freqs.weight",
                kiln::ir::TensorData { dtype: DType::F16, shape: vec![4], bytes: bytes.into() },
            );
        })),
        "rope_freqs.weight",
    ));
    v.push((
        "linear scaling and rope_freqs at once",
        Case::Gguf(gguf_with(|m, w| {
            m.push(("llama.rope.scaling.factor".into(), GgufValue::F32(4.0)));
            w.insert("rope_freqs.weight", kiln::ir::TensorData::from_f32(vec![4], &[2.0; 4]));
        })),
        "rope_freqs.weight",
    ));
    v.push((
        "phi3 fused qkv with the wrong height",
        Case::Gguf(gguf_with(|m, w| {
            set_meta(m, "general.architecture", GgufValue::String("phi3".into()));
            for (k, _) in m.iter_mut() {
                if let Some(rest) = k.strip_prefix("llama.") {
                    *k = format!("phi3.{rest}");
                }
            }
            for l in 0..2 {
                for n in ["attn_q", "attn_k", "attn_v", "ffn_gate"] {
                    w.remove(&format!("blk.{l}.{n}.weight"));
                }
                let up = w.remove(&format!("blk.{l}.ffn_up.weight")).unwrap();
                let rows = 2 * up.shape[0];
                w.insert(
                    format!("blk.{l}.ffn_up.weight"),
                    kiln::ir::TensorData::from_f32(vec![rows, 32], &vec![0.1; rows * 32]),
                );
                w.insert(
                    format!("blk.{l}.attn_qkv.weight"),
                    kiln::ir::TensorData::from_f32(vec![40, 32], &[0.1; 40 * 32]),
                );
            }
        })),
        "blk.0.attn_qkv.weight",
    ));
    v.push((
        "partial rotary factor",
        Case::Hf(Box::new(|d| edit_config(d, |c| c["partial_rotary_factor"] = 0.5.into()))),
        "partial_rotary_factor",
    ));
    let hf_key = |k: &'static str, v: serde_json::Value| -> Case {
        Case::Hf(Box::new(move |d| edit_config(d, |c| c[k] = v.clone())))
    };
    v.push((
        "unknown config key (softcapping)",
        hf_key("final_logit_softcapping", 30.0.into()),
        "final_logit_softcapping",
    ));
    v.push((
        "quantization_config",
        hf_key("quantization_config", serde_json::json!({"quant_method": "gptq", "bits": 4})),
        "quantization_config",
    ));
    v.push(("mlp_bias", hf_key("mlp_bias", true.into()), "mlp_bias"));
    v.push((
        "yarn rope_scaling",
        hf_key("rope_scaling", serde_json::json!({"rope_type": "yarn", "factor": 4.0})),
        "yarn",
    ));
    v.push((
        "dynamic rope_scaling",
        hf_key("rope_scaling", serde_json::json!({"type": "dynamic", "factor": 2.0})),
        "dynamic",
    ));
    v.push((
        "unknown field of a llama3 rope_scaling",
        hf_key(
            "rope_scaling",
            serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32}),
        ),
        "beta_fast",
    ));
    v.push((
        "chunked-attention layer types",
        hf_key("layer_types", serde_json::json!(["full_attention", "chunked_attention"])),
        "chunked_attention",
    ));
    // Hugging Face directories.
    v.push(("directory without config.json", Case::Hf(Box::new(|_| {})), "config.json"));
    v.push((
        "config.json not JSON",
        Case::Hf(Box::new(|d| std::fs::write(d.join("config.json"), "{ nope").unwrap())),
        "invalid JSON",
    ));
    v.push((
        "rope scaling",
        Case::Hf(Box::new(|d| {
            edit_config(d, |c| c["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0}))
        })),
        "rope_scaling",
    ));
    v.push((
        "num_hidden_layers far beyond the tensors",
        Case::Hf(Box::new(|d| edit_config(d, |c| c["num_hidden_layers"] = (1u32 << 23).into()))),
        "blk.8388607.attn_norm.weight",
    ));
    v.push((
        "unsupported model_type",
        Case::Hf(Box::new(|d| edit_config(d, |c| c["model_type"] = "gpt_neox".into()))),
        "gpt_neox",
    ));
    v.push((
        "truncated safetensors",
        Case::Hf(Box::new(|d| {
            let p = d.join("model.safetensors");
            let b = std::fs::read(&p).unwrap();
            std::fs::write(&p, &b[..b.len() / 2]).unwrap();
        })),
        "model.safetensors",
    ));
    v.push((
        "safetensors header length huge",
        Case::Hf(Box::new(|d| {
            let p = d.join("model.safetensors");
            let mut b = std::fs::read(&p).unwrap();
            put_u64(&mut b, 0, u64::MAX - 7);
            std::fs::write(&p, b).unwrap();
        })),
        "model.safetensors",
    ));
    v.push((
        "shard path escapes the directory",
        Case::Hf(Box::new(|d| {
            let index = serde_json::json!({"weight_map": {"model.norm.weight": "../../etc/passwd"}});
            std::fs::write(d.join("model.safetensors.index.json"), index.to_string()).unwrap();
        })),
        "leaves the model directory",
    ));
    v
}

fn edit_config(dir: &Path, f: impl Fn(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut c);
    std::fs::write(p, c.to_string()).unwrap();
}

#[test]
fn hostile_files_give_clear_errors_and_nonzero_exit() {
    let cases = cases();
    assert!(cases.len() >= 15);
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for (i, (what, case, expect)) in cases.into_iter().enumerate() {
        let path = match case {
            Case::Gguf(bytes) => {
                let p = dir.path().join(format!("case{i}.gguf"));
                std::fs::write(&p, bytes).unwrap();
                p
            }
            Case::Hf(mutate) => {
                let d = dir.path().join(format!("case{i}"));
                let cfg = tiny_config(Arch::Llama);
                write_hf(&d, &cfg, &random_weights(&cfg, DType::F32, 2), 1).unwrap();
                if what == "directory without config.json" {
                    std::fs::remove_file(d.join("config.json")).unwrap();
                }
                mutate(&d);
                d
            }
            Case::Path(p) => p,
        };
        let (code, _out, err) = run_kiln(&["inspect", path.to_str().unwrap()], None);
        let ok = code != 0 && err.contains("error:") && err.contains(expect) && !err.contains("panicked");
        if !ok {
            failures.push(format!("{what}: exit {code}, stderr: {err}"));
        }
    }
    assert!(failures.is_empty(), "{} cases failed:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn run_rejects_out_of_vocabulary_prompt_ids_and_long_prompts() {
    let cfg = tiny_config(Arch::Llama);
    let dir = tempfile::tempdir().unwrap();
    write_hf(dir.path(), &cfg, &random_weights(&cfg, DType::F32, 2), 1).unwrap();
    let d = dir.path().to_str().unwrap();
    let (code, _, err) = run_kiln(&["run", d, "--prompt-ids", "5,96", "-n", "1"], None);
    assert!(code != 0 && err.contains("token id 96"), "{err}");
    let long: Vec<String> = (0..65).map(|i| (i % 90).to_string()).collect();
    let (code, _, err) = run_kiln(&["run", d, "--prompt-ids", &long.join(","), "-n", "1"], None);
    assert!(code != 0 && err.contains("context length exceeded"), "{err}");
    let (code, _, err) = run_kiln(&["run", d, "--prompt", "hi"], None);
    assert!(code != 0 && err.contains("no tokenizer"), "{err}");
}
