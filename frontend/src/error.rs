//! Import errors. Every variant names the file and the tensor/key/field that was wrong.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error(transparent)]
    Gguf(#[from] crate::gguf::GgufError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Invalid { path: PathBuf, msg: String },
    #[error("{path}: unsupported architecture `{arch}` (Kiln imports llama, mistral, qwen2)")]
    UnsupportedArch { path: PathBuf, arch: String },
    #[error("{path}: tensor `{tensor}` is missing")]
    MissingTensor { path: PathBuf, tensor: String },
    #[error("{path}: tensor `{tensor}` has shape {found:?}, expected {expected:?}")]
    Shape { path: PathBuf, tensor: String, expected: Vec<usize>, found: Vec<usize> },
    #[error("{path}: tokenizer: {source}")]
    Tokenizer {
        path: PathBuf,
        #[source]
        source: crate::tokenizer::TokenizerError,
    },
    #[error("{path}: building the graph: {source}")]
    Graph {
        path: PathBuf,
        #[source]
        source: kiln_ir::GraphError,
    },
}

impl FrontendError {
    pub(crate) fn invalid(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        FrontendError::Invalid { path: path.into(), msg: msg.into() }
    }
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        FrontendError::Io { path: path.into(), source }
    }
}

pub type Result<T, E = FrontendError> = std::result::Result<T, E>;
