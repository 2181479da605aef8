//! Kiln's driver: the library behind the `kiln` command line. From a model file to a built graph and a
//! cached artifact (`artifact`, `aot`), perplexity (`eval`), calibration (`calibrate`, `quality`), the
//! lossy-pass options checked against a model (`options`), this machine's kernel table
//! (`kernel_table`), the `--quality-budget` search (`budget`, `budgeted`) and the e-graph's measured cost
//! coefficients (`costs`). The CLI parses arguments, calls these and prints; build.rs and C ABI users
//! call the same functions.

pub mod aot;
pub mod artifact;
pub mod budget;
pub mod budgeted;
pub mod calibrate;
pub mod costs;
pub mod eval;
pub mod kernel_table;
pub mod options;
pub mod quality;

use std::path::PathBuf;

/// File name of the default model inside the cache.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Kiln's cache directory: `$KILN_CACHE_DIR`, else `$XDG_CACHE_HOME/kiln`, else `~/.cache/kiln`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("KILN_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("kiln");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("kiln")
}

/// The model `kiln` uses when none is named: `$KILN_MODEL`, else SmolLM2-135M-Instruct in the cache
/// (put there by `scripts/setup.sh`).
pub fn default_model_path() -> PathBuf {
    match std::env::var_os("KILN_MODEL") {
        Some(p) => PathBuf::from(p),
        None => cache_dir().join("models").join(DEFAULT_MODEL_FILE),
    }
}
