//! Tokenizers from GGUF metadata and tokenizer.json (being written).
