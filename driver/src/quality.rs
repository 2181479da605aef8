//! What measuring quality needs around the evaluator: reading and tokenizing a text, loading and
//! checking a calibration file, a compiled backend from the artifact cache, and measuring a
//! calibration file (`kiln calibrate`).

use crate::artifact::Build;
use anyhow::{bail, Context, Result};
use kiln_codegen::CompileOptions;
use kiln_frontend::tokenizer::Tokenizer;
use kiln_frontend::Model;
use kiln_passes::calibration::{Calibration, CalibrationText, CALIBRATION_FORMAT, CALIBRATION_VERSION};
use kiln_runtime::{Backend, CompiledBackend, InterpreterBackend};
use std::path::Path;
use std::sync::Arc;

/// Which backend runs a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// Compiled native code (from the artifact cache).
    Compiled,
    /// The reference interpreter.
    Interpreter,
}

/// Loads and checks a calibration file; errors name it.
pub fn load_calibration(path: &Path, model: &Model, model_path: &Path) -> Result<Arc<Calibration>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read calibration file {}", path.display()))?;
    let c = Calibration::from_json(&text)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("calibration file {}", path.display()))?;
    if c.layers.len() != model.config.n_layers {
        bail!(
            "calibration file {} has {} layers but {} has {}",
            path.display(),
            c.layers.len(),
            model.name,
            model.config.n_layers
        );
    }
    if c.source_hash != crate::artifact::source_hash(model_path)? {
        eprintln!("[warning: calibration file {} was measured on another model file ({})]", path.display(), c.model);
    }
    Ok(Arc::new(c))
}

/// A text file to score or calibrate on; empty is an error naming it.
pub fn read_text(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read text file {}", path.display()))?;
    if text.trim().is_empty() {
        bail!("text file {} is empty", path.display());
    }
    Ok(text)
}

/// `text` (read from `path`) as token ids; fewer than 2 is an error naming the file.
pub fn tokenize(tok: Option<&Tokenizer>, text: &str, path: &Path) -> Result<Vec<u32>> {
    let tok = tok.context("the model has no tokenizer")?;
    let ids = tok.encode(text, true).with_context(|| format!("tokenizing {}", path.display()))?;
    if ids.len() < 2 {
        bail!("text file {} has {} token(s); at least 2 are needed", path.display(), ids.len());
    }
    Ok(ids)
}

/// The compiled backend for `build` of the model at `path` (from the artifact cache), holding `capacity`
/// positions.
pub fn compiled_backend(
    path: &Path,
    m: &Model,
    build: &Build,
    threads: usize,
    capacity: usize,
) -> Result<CompiledBackend> {
    let t = std::time::Instant::now();
    let (dir, hit) = crate::artifact::cached_build(path, m, build)?;
    let fresh = hit.fresh();
    let b = load_cached(path, m, build, &dir, fresh, threads, capacity)?;
    if fresh {
        eprintln!("[compiled {} in {:.1}s → {}]", m.name, t.elapsed().as_secs_f64(), dir.display());
    }
    Ok(b)
}

/// Loads the cached artifact `dir` of `build` (`fresh`: just compiled); a stale cache entry that fails to
/// load is evicted and compiled again.
pub fn load_cached(
    path: &Path,
    m: &Model,
    build: &Build,
    dir: &Path,
    fresh: bool,
    threads: usize,
    capacity: usize,
) -> Result<CompiledBackend> {
    Ok(match CompiledBackend::load(dir, threads, Some(capacity)) {
        Err(e) if !fresh => {
            eprintln!("[cached artifact unusable ({e}); recompiling]");
            crate::artifact::evict(dir)?;
            let (dir, _) = crate::artifact::cached_build(path, m, build)?;
            CompiledBackend::load(&dir, threads, Some(capacity))?
        }
        other => other?,
    })
}

/// Measures a calibration file for the model at `path` on the text at `text_path`, in chunks of
/// `chunk` tokens; `progress` gets the tokens done and the total.
pub fn calibrate_model(
    path: &Path,
    m: &Model,
    text_path: &Path,
    chunk: usize,
    threads: usize,
    backend_kind: BackendKind,
    mut progress: impl FnMut(usize, usize),
) -> Result<Calibration> {
    let text = read_text(text_path)?;
    if chunk < 2 {
        bail!("--chunk {chunk} must be at least 2");
    }
    let tokens = tokenize(m.tokenizer.as_ref(), &text, text_path)?;
    let build = Build {
        opts: CompileOptions { all_logits: true, ..CompileOptions::default() },
        expose_calibration: true,
        ..Default::default()
    };
    let built;
    let mut interp;
    let mut comp;
    let backend: &mut dyn Backend = match backend_kind {
        BackendKind::Compiled => {
            comp = compiled_backend(path, m, &build, threads, chunk)?;
            &mut comp
        }
        BackendKind::Interpreter => {
            built = crate::artifact::build_graph(m, &build)?;
            interp = InterpreterBackend::new(built.graph.clone(), &built.weights, m.config.context_length)?;
            &mut interp
        }
    };
    let total = tokens.len();
    let measured = crate::calibrate::measure(backend, &tokens, chunk, m.config.n_layers, |n| progress(n, total))?;
    Ok(Calibration {
        format: CALIBRATION_FORMAT.into(),
        version: CALIBRATION_VERSION,
        model: m.name.clone(),
        source_hash: crate::artifact::source_hash(path)?,
        text: CalibrationText {
            file: text_path.display().to_string(),
            blake3: blake3::hash(text.as_bytes()).to_hex().to_string(),
            tokens: tokens.len(),
        },
        chunk,
        hidden_size: m.config.hidden_size,
        intermediate_size: m.config.intermediate_size,
        mean_nll: measured.mean_nll,
        perplexity: measured.mean_nll.exp(),
        quantile_levels: kiln_passes::calibration::quantile_levels(),
        layers: measured.layers,
    })
}
