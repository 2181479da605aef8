//! Compiling a model into an artifact directory, the content-addressed artifact cache, and loading an
//! artifact's tokenizer.
//!
//! An artifact directory holds `manifest.json`, `kernels.so`, `weights.bin` (written by codegen) and the
//! tokenizer: `tokenizer.gguf` (the GGUF source's tokenizer metadata, no tensors) or the Hugging Face
//! `tokenizer.json` (+ `tokenizer_config.json`).

use anyhow::{Context, Result};
use kiln_codegen::CompileOptions;
use kiln_frontend::gguf::{GgufFile, GgufWriter};
use kiln_frontend::tokenizer::Tokenizer;
use kiln_frontend::Model;
use kiln_ir::program::Manifest;
use std::path::{Path, PathBuf};

/// Hash identifying a model source: the GGUF file, or a Hugging Face directory's config, tokenizer and
/// weight files.
pub fn source_hash(path: &Path) -> Result<String> {
    let mut h = blake3::Hasher::new();
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let n = p.file_name().unwrap_or_default().to_string_lossy();
                n.ends_with(".safetensors") || n.ends_with(".json")
            })
            .collect();
        v.sort();
        v
    } else {
        vec![path.to_path_buf()]
    };
    for f in files {
        h.update(f.file_name().unwrap_or_default().as_encoded_bytes());
        h.update_mmap_rayon(&f).with_context(|| format!("hashing {}", f.display()))?;
    }
    Ok(h.finalize().to_hex().to_string())
}

/// The cache key of compiling `source_hash` with `opts` for this host with this Kiln.
pub fn cache_key(source_hash: &str, opts: &CompileOptions) -> String {
    let mut h = blake3::Hasher::new();
    h.update(source_hash.as_bytes());
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    h.update(serde_json::to_string(opts).expect("options serialise").as_bytes());
    h.update(serde_json::to_string(&kiln_codegen::host_target_info()).expect("target serialises").as_bytes());
    h.finalize().to_hex()[..32].to_string()
}

/// Compiles `model` into `out` (created or replaced) and writes its tokenizer beside the code.
pub fn compile_model(model: &Model, source_hash: &str, opts: &CompileOptions, out: &Path) -> Result<Manifest> {
    compile_model_with(model, source_hash, opts, &[], out)
}

/// The graph `model` is compiled from: built for `opts`, then rewritten by the graph `passes` in order.
pub fn compile_graph(model: &Model, opts: &CompileOptions, passes: &[String]) -> Result<kiln_ir::Graph> {
    let mut graph = model.graph_with(kiln_frontend::llama::GraphOptions { last_logits_only: !opts.all_logits })?;
    if !passes.is_empty() {
        let names: Vec<&str> = passes.iter().map(String::as_str).collect();
        let pipeline = kiln_passes::Pipeline::from_names(&names).context("--passes")?;
        pipeline.run(&mut graph, &kiln_passes::PassCx::default(), None)?;
    }
    Ok(graph)
}

/// What the manifest records about `model`.
pub fn artifact_info(model: &Model, source_hash: &str, passes: &[String]) -> kiln_codegen::ArtifactInfo {
    kiln_codegen::ArtifactInfo {
        model_name: model.name.clone(),
        source_hash: source_hash.to_string(),
        context_length: model.config.context_length,
        vocab_size: model.config.vocab_size,
        eos_token: model.tokenizer.as_ref().and_then(|t| t.eos()),
        passes: passes.to_vec(),
    }
}

/// [`compile_model`], running the graph `passes` first.
pub fn compile_model_with(
    model: &Model,
    source_hash: &str,
    opts: &CompileOptions,
    passes: &[String],
    out: &Path,
) -> Result<Manifest> {
    let graph = compile_graph(model, opts, passes)?;
    let info = artifact_info(model, source_hash, passes);
    let manifest = kiln_codegen::compile_to_dir(&graph, &model.weights, opts, &info, out)?;
    write_tokenizer(model, out)?;
    Ok(manifest)
}

pub(crate) fn write_tokenizer(model: &Model, out: &Path) -> Result<()> {
    match model.format {
        "gguf" => {
            let src = GgufFile::open(&model.source)?;
            let mut w = GgufWriter::new();
            for (k, v) in &src.metadata {
                if k.starts_with("tokenizer.") || k == "general.architecture" {
                    w.add_metadata(k.clone(), v.clone());
                }
            }
            w.write(&out.join("tokenizer.gguf"))?;
        }
        _ => {
            for f in ["tokenizer.json", "tokenizer_config.json"] {
                let p = model.source.join(f);
                if p.exists() {
                    std::fs::copy(&p, out.join(f)).with_context(|| format!("copying {}", p.display()))?;
                }
            }
        }
    }
    Ok(())
}

/// Loads the tokenizer stored in an artifact directory, if any.
pub fn artifact_tokenizer(dir: &Path) -> Result<Option<Tokenizer>> {
    let g = dir.join("tokenizer.gguf");
    if g.exists() {
        let f = GgufFile::open(&g)?;
        return Ok(Some(Tokenizer::from_gguf_vocab(kiln_frontend::model::gguf_vocab(&f)?)?));
    }
    let j = dir.join("tokenizer.json");
    if j.exists() {
        return Ok(Some(Tokenizer::from_tokenizer_json(&j)?));
    }
    Ok(None)
}

pub fn is_artifact(path: &Path) -> bool {
    path.join("manifest.json").is_file()
}

/// The cached artifact for `model` (loaded from `model_path`) with `opts`, compiling it first if it is
/// not cached. Returns the directory and whether it was compiled now.
pub fn cached_artifact(model_path: &Path, opts: &CompileOptions, model: &Model) -> Result<(PathBuf, bool)> {
    let hash = source_hash(model_path)?;
    let dir = crate::cache_dir().join("artifacts").join(cache_key(&hash, opts));
    // Integrity (hashes, CPU features) is checked when the artifact is loaded; see `evict`.
    if is_artifact(&dir) {
        return Ok((dir, false));
    }
    // Compile into a fresh sibling and rename, so a crash never leaves a half-written cache entry.
    let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    compile_model(model, &hash, opts, &tmp)?;
    // Another process may have finished the same entry meanwhile: then keep theirs (it may already be
    // loaded) and drop ours. Only an entry that is not a complete artifact is replaced.
    if !is_artifact(&dir) {
        let _ = std::fs::remove_dir_all(&dir);
    }
    if let Err(e) = std::fs::rename(&tmp, &dir) {
        let _ = std::fs::remove_dir_all(&tmp);
        if !is_artifact(&dir) {
            return Err(e).with_context(|| format!("moving artifact into {}", dir.display()));
        }
    }
    Ok((dir, true))
}

/// Removes a cache entry that failed to load (corrupted, or made by an incompatible Kiln), so the next
/// `cached_artifact` compiles it afresh.
pub fn evict(dir: &Path) -> Result<()> {
    std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))
}
