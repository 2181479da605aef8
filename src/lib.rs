//! Kiln's facade: the crates under one name, and the few things the CLI and embedders share (where the
//! default model lives, loading a model ready to run).

pub use kiln_codegen as codegen;
pub use kiln_frontend as frontend;
pub use kiln_ir as ir;
pub use kiln_passes as passes;
pub use kiln_runtime as runtime;

pub mod aot;
pub mod artifact;
pub mod budget;
pub mod calibrate;
pub mod costs;
pub mod eval;

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
