//! Compiling a model into an artifact directory, the content-addressed artifact cache, and loading an
//! artifact's tokenizer.
//!
//! An artifact directory holds `manifest.json`, `kernels.so`, `weights.bin` (written by codegen) and the
//! tokenizer: `tokenizer.gguf` (the GGUF source's tokenizer metadata, no tensors) or the Hugging Face
//! `tokenizer.json` (+ `tokenizer_config.json`, `chat_template.jinja`).

use anyhow::{Context, Result};
use kiln_codegen::CompileOptions;
use kiln_frontend::gguf::{GgufFile, GgufWriter};
use kiln_frontend::tokenizer::Tokenizer;
use kiln_frontend::Model;
use kiln_ir::program::Manifest;
use kiln_ir::Graph;
use kiln_passes::calibration::Calibration;
use kiln_passes::skip_layers::SkipLayers;
use kiln_passes::{Pass, PassCx, Pipeline};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Everything that decides what is compiled besides the model: codegen options, the lossy passes and
/// their inputs, graph edits for calibration, and records to put into the manifest.
#[derive(Clone, Debug, Default)]
pub struct Build {
    pub opts: CompileOptions,
    /// Named graph passes to run first (`--passes`), in order; empty: the default pipeline
    /// ([`kiln_passes::DEFAULT_PIPELINE`]) unless `no_default_passes`.
    pub passes: Vec<String>,
    /// Run no default pipeline when `passes` is empty (`--passes none`).
    pub no_default_passes: bool,
    /// Decoder blocks to remove (`count` 0: none).
    pub skip: SkipLayers,
    /// Activation sparsity (`chess` pass): the target share of channels dropped per token.
    pub chess: Option<f64>,
    /// With `chess`: keep the transposed weights in f32 (exact; the reference variant for tests).
    pub chess_exact: bool,
    /// With `chess`: which activations are thresholded (MLP gate, attention-projection inputs, or both).
    pub chess_scope: kiln_passes::chess::ChessScope,
    /// Structured pruning (`structured-prune` pass): MLP neurons and attention query heads removed.
    pub structured: Option<kiln_passes::structured_prune::StructuredPrune>,
    /// With `chess`: R-Sparse's rank of the low-rank compensation of each input-sparse projection.
    pub rsparse_rank: Option<usize>,
    /// With `chess`: the MLP's form (`None`: gate, or io with `rsparse_rank`).
    pub chess_mlp: Option<kiln_passes::chess::ChessMlp>,
    /// With `chess`: one threshold per layer and activation instead of per channel.
    pub chess_per_layer: bool,
    /// With `chess_scope` all: the attention inputs' sparsity, when it differs from `chess` (the MLP's).
    pub chess_attn: Option<f64>,
    /// With `chess`: this machine's kernel table, to keep projections whose column kernel does not pay
    /// on the dense kernel (`kiln_passes::chess::Chess::kernels`). `None`: every one column-major.
    pub chess_kernels: Option<Arc<kiln_passes::prune::KernelTable>>,
    /// Block-sparse weight pruning (`prune` pass) with its measured kernel table.
    pub prune: Option<kiln_passes::prune::Prune>,
    /// FlexPrefill sparse attention (`flexprefill` pass).
    pub flex: Option<kiln_passes::flexprefill::FlexPrefill>,
    /// CoreInfer (`coreinfer` pass): the MLP decodes on the prompt's core neurons.
    pub coreinfer: Option<kiln_passes::coreinfer::CoreInfer>,
    /// The calibration file lossy passes read (needed by `skip.method = influence`).
    pub calibration: Option<Arc<Calibration>>,
    /// Expose each block's activations as extra outputs (`calib.L.*`) for `kiln calibrate`.
    pub expose_calibration: bool,
    /// Extra records for the manifest (e.g. the `--quality-budget` search and its measurements).
    pub records: Vec<serde_json::Value>,
    /// Stop the pipeline after this stage (`--stop-after`).
    pub stop_after: Option<String>,
    /// The early-exit schedule the artifact runs by default (`--early-exit`, checked by the caller).
    pub early_exit: Option<kiln_ir::program::EarlyExitSpec>,
    /// The command-line option that configured the passes (e.g. `--chess-sparsity`): [`build_graph`]'s
    /// errors name it. Empty: none.
    pub origin: &'static str,
    /// Build one rank's part of a tensor-parallel decoder (`kiln run --tp N`).
    pub tp: Option<TensorParallel>,
}

/// One rank of a tensor-parallel build: the `shard` pass for (`tp`, `rank`), then (with `fuse`)
/// `fuse-allreduce-rmsnorm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorParallel {
    pub tp: usize,
    pub rank: usize,
    pub fuse: bool,
}

/// The graph a build compiles and what the pipeline said about it.
pub struct BuiltGraph {
    pub graph: Graph,
    /// The stages of the pipeline, in order (all of them, also past `--stop-after`).
    pub passes: Vec<String>,
    /// Records of lossy passes, then the build's own.
    pub records: Vec<serde_json::Value>,
    /// Per stage that ran: changed?, node counts, time.
    pub reports: Vec<kiln_passes::PassReport>,
    /// (pass, line) reasons for `--explain`.
    pub explanations: Vec<(String, String)>,
    /// The weights the graph reads: the model's and the derived ones passes made.
    pub weights: kiln_ir::WeightStore,
}

impl BuiltGraph {
    /// The derived weights (those the model does not have), by name: part of the cache key.
    fn derived_weights<'a>(
        &'a self,
        model: &'a Model,
    ) -> impl Iterator<Item = (&'a String, &'a kiln_ir::weights::TensorData)> {
        self.weights.iter().filter(move |(n, _)| !model.weights.contains(n))
    }
}

impl Build {
    pub fn new(opts: CompileOptions) -> Build {
        Build { opts, ..Default::default() }
    }
}

/// The named passes `build` runs first: `--passes`, else the default pipeline (unless `--passes none`).
fn named_passes(build: &Build) -> Vec<String> {
    if build.passes.is_empty() && !build.no_default_passes {
        kiln_passes::DEFAULT_PIPELINE.iter().map(|s| s.to_string()).collect()
    } else {
        build.passes.clone()
    }
}

/// The graph a build compiles: the decoder graph, then the pipeline (the named passes or the default
/// pipeline, then `skip-layers` and `dce` when configured, …), then the calibration edit.
pub fn build_graph(model: &Model, build: &Build) -> Result<BuiltGraph> {
    let built = build_graph_unnamed(model, build);
    if build.origin.is_empty() {
        built
    } else {
        built.context(build.origin)
    }
}

/// [`build_graph`] without naming `build.origin` in its errors.
fn build_graph_unnamed(model: &Model, build: &Build) -> Result<BuiltGraph> {
    let mut g = model.graph_with(kiln_frontend::llama::GraphOptions { last_logits_only: !build.opts.all_logits })?;
    let mut passes: Vec<Box<dyn Pass>> = Vec::new();
    for name in &named_passes(build) {
        passes.push(kiln_passes::lookup(name).context("--passes")?);
    }
    if build.skip.count > 0 {
        passes.push(Box::new(build.skip));
        passes.push(Box::new(kiln_passes::dce::DeadCodeElimination));
    }
    if let Some(sp) = build.structured.filter(|s| !s.is_noop()) {
        passes.push(Box::new(sp));
        passes.push(Box::new(kiln_passes::dce::DeadCodeElimination));
    }
    if let Some(s) = build.chess {
        let chess = kiln_passes::chess::Chess::new(s).map_err(anyhow::Error::msg)?;
        passes.push(Box::new(kiln_passes::chess::Chess {
            exact: build.chess_exact,
            scope: build.chess_scope,
            rsparse_rank: build.rsparse_rank,
            mlp: build.chess_mlp,
            per_layer: build.chess_per_layer,
            attn_sparsity: build.chess_attn,
            kernels: build.chess_kernels.clone(),
            ..chess
        }));
        passes.push(Box::new(kiln_passes::dce::DeadCodeElimination));
    }
    if let Some(c) = build.coreinfer {
        passes.push(Box::new(c));
        passes.push(Box::new(kiln_passes::dce::DeadCodeElimination));
    }
    if let Some(p) = &build.prune {
        passes.push(Box::new(p.clone()));
        passes.push(Box::new(kiln_passes::dce::DeadCodeElimination));
    }
    if let Some(f) = build.flex {
        passes.push(Box::new(f));
    }
    if let Some(tp) = build.tp.filter(|t| t.tp > 1) {
        passes.push(Box::new(kiln_passes::shard::Shard { tp: tp.tp, rank: tp.rank }));
        if tp.fuse {
            passes.push(Box::new(kiln_passes::fuse_allreduce_rmsnorm::FuseAllReduceRmsNorm));
        }
    }
    let pipeline = Pipeline::from_passes(passes);
    let names: Vec<String> = pipeline.names().into_iter().map(str::to_string).collect();
    // Only the e-graph extraction reads the cost model; measure (or read the cached) coefficients then.
    let cost = names.iter().any(|n| n == "lift").then(crate::costs::coefficients);
    let cx = PassCx {
        calibration: build.calibration.clone(),
        weights: std::cell::RefCell::new(model.weights.clone()),
        cost,
        ..Default::default()
    };
    if let Some(stop) = &build.stop_after {
        if !names.contains(stop) {
            anyhow::bail!("--stop-after {stop}: no such stage in this pipeline (stages: {})", names.join(", "));
        }
    }
    let reports = pipeline.run(&mut g, &cx, build.stop_after.as_deref())?;
    let mut records: Vec<serde_json::Value> =
        cx.records.take().into_iter().map(|r| serde_json::json!({"pass": r.pass, "detail": r.detail})).collect();
    if let Some(e) = &build.early_exit {
        // Not a graph pass: the program keeps every block and the runtime follows the schedule.
        records.push(serde_json::json!({"pass": "early-exit", "detail": {"mode": e.mode, "schedule": e.schedule}}));
    }
    records.extend(build.records.iter().cloned());
    if build.expose_calibration {
        kiln_passes::calibration::expose_block_values(&mut g).map_err(anyhow::Error::msg)?;
    }
    let weights = cx.weights.take();
    for (name, t) in model.weights.iter() {
        if let Some(now) = weights.get(name) {
            if now.bytes.as_ptr() != t.bytes.as_ptr() || now.bytes.len() != t.bytes.len() || now.dtype != t.dtype {
                anyhow::bail!("a pass replaced the model's weight `{name}` in place (derived weights need new names)");
            }
        }
    }
    Ok(BuiltGraph { graph: g, passes: names, records, reports, explanations: cx.explanations.take(), weights })
}

/// The files of a Hugging Face model directory the loader reads besides its `.safetensors` shards.
const HF_SOURCE_FILES: [&str; 5] =
    ["config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"];

/// The tokenizer files of a Hugging Face model an artifact carries (`chat_template.jinja`, where
/// present, overrides `tokenizer_config.json`'s template, as in the loader).
const HF_TOKENIZER_FILES: [&str; 3] = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"];

/// Hash identifying a model source: the GGUF file, or exactly the files of a Hugging Face directory the
/// loader reads (config, index, weight shards, tokenizer, chat template) — not other files kept beside
/// them, such as a calibration file.
pub fn source_hash(path: &Path) -> Result<String> {
    let mut h = blake3::Hasher::new();
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let n = p.file_name().unwrap_or_default().to_string_lossy();
                n.ends_with(".safetensors") || HF_SOURCE_FILES.contains(&n.as_ref())
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

/// Identifies the running Kiln executable (path, size, modification time): part of every cache key.
fn compiler_identity() -> String {
    let exe = std::env::current_exe().ok();
    let meta = exe.as_ref().and_then(|e| std::fs::metadata(e).ok());
    let mtime =
        meta.as_ref().and_then(|m| m.modified().ok()).and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
    format!("{exe:?} {:?} {mtime:?}", meta.map(|m| m.len()))
}

/// The cache key of compiling `graph` (the graph after every pass, so pass choices are part of the key)
/// of the model `source_hash` with `opts`, for this host with this Kiln; `records` (manifest notes) too.
pub fn cache_key(source_hash: &str, opts: &CompileOptions, graph: &Graph, records: &[serde_json::Value]) -> String {
    let mut h = blake3::Hasher::new();
    h.update(source_hash.as_bytes());
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    h.update(&kiln_ir::program::ARTIFACT_FORMAT_VERSION.to_le_bytes());
    // This build of Kiln: two builds (branches, versions) sharing a cache never trade entries.
    h.update(compiler_identity().as_bytes());
    h.update(serde_json::to_string(opts).expect("options serialise").as_bytes());
    h.update(kiln_ir::text::print(graph).as_bytes());
    h.update(serde_json::to_string(records).expect("records serialise").as_bytes());
    h.update(serde_json::to_string(&kiln_codegen::host_target_info()).expect("target serialises").as_bytes());
    h.finalize().to_hex()[..32].to_string()
}

/// Compiles `model` into `out` (created or replaced) and writes its tokenizer beside the code.
pub fn compile_model(model: &Model, source_hash: &str, opts: &CompileOptions, out: &Path) -> Result<Manifest> {
    compile_build(model, source_hash, &Build::new(opts.clone()), out)
}

/// Compiles `build` of `model` into `out`; the manifest lists the passes and their records.
pub fn compile_build(model: &Model, source_hash: &str, build: &Build, out: &Path) -> Result<Manifest> {
    compile_built(model, &build_graph(model, build)?, source_hash, build, out)
}

/// Compiles an already built graph of `build` (see [`build_graph`]) into `out`.
pub fn compile_built(
    model: &Model,
    built: &BuiltGraph,
    source_hash: &str,
    build: &Build,
    out: &Path,
) -> Result<Manifest> {
    let info = artifact_info(model, source_hash, built, build);
    let manifest = kiln_codegen::compile_to_dir(&built.graph, &built.weights, &build.opts, &info, out)?;
    write_tokenizer(model, out)?;
    Ok(manifest)
}

/// What the manifest records about `model`, and the passes that ran on its graph with their records.
pub fn artifact_info(
    model: &Model,
    source_hash: &str,
    built: &BuiltGraph,
    build: &Build,
) -> kiln_codegen::ArtifactInfo {
    kiln_codegen::ArtifactInfo {
        model_name: model.name.clone(),
        source_hash: source_hash.to_string(),
        context_length: model.config.context_length,
        vocab_size: model.config.vocab_size,
        eos_token: model.tokenizer.as_ref().and_then(|t| t.eos()),
        passes: built.passes.clone(),
        stages: built
            .reports
            .iter()
            .map(|r| kiln_ir::program::StageReport {
                pass: r.pass.to_string(),
                changed: r.changed,
                nodes_before: r.nodes_before,
                nodes_after: r.nodes_after,
                seconds: r.time.as_secs_f64(),
            })
            .collect(),
        records: built.records.clone(),
        early_exit: build.early_exit.clone(),
    }
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
            for f in HF_TOKENIZER_FILES {
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

/// How [`cached_build`] found its artifact.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheHit {
    /// Not in the cache: compiled now.
    Compiled,
    /// The passes ran and the artifact of their graph was cached.
    Graph,
    /// Found by the build's recipe ([`recipe_key`]): no pass ran.
    Recipe,
}

impl CacheHit {
    /// Compiled now (not loaded from the cache).
    pub fn fresh(self) -> bool {
        self == CacheHit::Compiled
    }

    /// `compiled`, `graph` or `recipe` (the `artifact_cache` field of `kiln run --json`).
    pub fn name(self) -> &'static str {
        match self {
            CacheHit::Compiled => "compiled",
            CacheHit::Graph => "graph",
            CacheHit::Recipe => "recipe",
        }
    }
}

/// `fmt::Write` into a hasher, so a `Debug` form is hashed without being built as a string.
struct HashWriter<'a>(&'a mut blake3::Hasher);

impl std::fmt::Write for HashWriter<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.update(s.as_bytes());
        Ok(())
    }
}

/// The recipe key of `build` of the model `source_hash`: everything [`build_graph`] reads — the model
/// source, the whole build (its calibration, kernel table and every pass setting: `Debug` prints floats
/// so that they read back exactly), the cost coefficients the e-graph extraction reads, this Kiln and
/// this host. Equal keys build equal graphs, so the artifact the last build of a recipe produced can be
/// reused without running its passes (R-Sparse's factorisations, Wanda's rankings: seconds to minutes).
/// A field whose `Debug` form were not deterministic would only cost cache misses, never a wrong hit.
pub fn recipe_key(source_hash: &str, build: &Build) -> String {
    use std::fmt::Write;
    let mut h = blake3::Hasher::new();
    h.update(b"kiln recipe 1\0");
    h.update(source_hash.as_bytes());
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    h.update(&kiln_ir::program::ARTIFACT_FORMAT_VERSION.to_le_bytes());
    h.update(compiler_identity().as_bytes());
    h.update(serde_json::to_string(&kiln_codegen::host_target_info()).expect("target serialises").as_bytes());
    let _ = write!(HashWriter(&mut h), "{build:?}");
    if named_passes(build).iter().any(|n| n == "lift") {
        let _ = write!(HashWriter(&mut h), "{:?}", crate::costs::coefficients());
    }
    h.finalize().to_hex()[..32].to_string()
}

/// The file recording which artifact recipe `key` built last.
fn recipe_file(key: &str) -> PathBuf {
    crate::cache_dir().join("recipes").join(key)
}

/// The artifact recipe `key` built last, if it is still a whole cache entry.
fn recipe_artifact(key: &str) -> Option<PathBuf> {
    let name = std::fs::read_to_string(recipe_file(key)).ok()?;
    let name = name.trim();
    // Only an artifact directory name of this cache (hex), never a path read from the file.
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let dir = crate::cache_dir().join("artifacts").join(name);
    is_artifact(&dir).then_some(dir)
}

/// Records that recipe `key` built the artifact `dir` (best effort: a cache that cannot be written only
/// loses the shortcut). Written to a sibling and renamed, so a reader never sees half a name.
fn record_recipe(key: &str, dir: &Path) {
    let (Some(name), file) = (dir.file_name().and_then(|n| n.to_str()), recipe_file(key)) else { return };
    let tmp = file.with_extension(format!("tmp{}", std::process::id()));
    let ok = file.parent().is_some_and(|p| std::fs::create_dir_all(p).is_ok()) && std::fs::write(&tmp, name).is_ok();
    if !ok || std::fs::rename(&tmp, &file).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// The cached artifact for `model` (loaded from `model_path`) with `opts`, compiling it first if it is
/// not cached. Returns the directory and how it was found.
pub fn cached_artifact(model_path: &Path, opts: &CompileOptions, model: &Model) -> Result<(PathBuf, CacheHit)> {
    cached_build(model_path, model, &Build::new(opts.clone()))
}

/// [`cached_artifact`] for a whole [`Build`]. The artifact the build's recipe ([`recipe_key`]) made last
/// is reused without running the passes; otherwise the passes run and the artifact of their graph is
/// found or compiled (content-addressed by the graph: [`cache_key`]).
pub fn cached_build(model_path: &Path, model: &Model, build: &Build) -> Result<(PathBuf, CacheHit)> {
    let hash = source_hash(model_path)?;
    let recipe = recipe_key(&hash, build);
    if let Some(dir) = recipe_artifact(&recipe) {
        return Ok((dir, CacheHit::Recipe));
    }
    let built = build_graph(model, build)?;
    let (dir, fresh) = cached_built_with_hash(&hash, model, build, &built)?;
    record_recipe(&recipe, &dir);
    Ok((dir, if fresh { CacheHit::Compiled } else { CacheHit::Graph }))
}

/// [`cached_build`] when the caller already built `build`'s graph (`built`), so it is not built twice.
pub fn cached_built(model_path: &Path, model: &Model, build: &Build, built: &BuiltGraph) -> Result<(PathBuf, bool)> {
    cached_built_with_hash(&source_hash(model_path)?, model, build, built)
}

/// [`cached_built`] of the model whose [`source_hash`] is `hash`.
fn cached_built_with_hash(hash: &str, model: &Model, build: &Build, built: &BuiltGraph) -> Result<(PathBuf, bool)> {
    let mut key_hash = blake3::Hasher::new();
    key_hash.update(hash.as_bytes());
    for (name, t) in built.derived_weights(model) {
        key_hash.update(name.as_bytes());
        key_hash.update(t.dtype.name().as_bytes());
        key_hash.update(&t.bytes);
    }
    let key_source = key_hash.finalize().to_hex().to_string();
    let dir =
        crate::cache_dir().join("artifacts").join(cache_key(&key_source, &build.opts, &built.graph, &built.records));
    // Integrity (hashes, CPU features) is checked when the artifact is loaded; see `evict`.
    if is_artifact(&dir) {
        return Ok((dir, false));
    }
    // Compile into a fresh sibling and rename, so a crash never leaves a half-written cache entry.
    let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    compile_built(model, built, hash, build, &tmp)?;
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
