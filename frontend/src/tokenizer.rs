//! Tokenizers: text ⇄ token ids, streaming detokenization and chat templates.
//!
//! Two sources are supported:
//!
//! * **GGUF metadata** ([`GgufVocab`], filled by the GGUF reader from `tokenizer.ggml.*`): byte-level
//!   BPE vocabularies (`tokenizer.ggml.model == "gpt2"`). The pre-tokenizer is chosen from
//!   `tokenizer.ggml.pre` the same way llama.cpp does (`llama-vocab.cpp`), see [`pre_tokenizer_regexes`].
//!   SentencePiece (`"llama"`) and other vocab types are rejected with [`TokenizerError::Unsupported`].
//! * **Hugging Face `tokenizer.json`**, plus `tokenizer_config.json` / `chat_template.jinja` beside it
//!   for the chat template and the BOS/EOS tokens.
//!
//! Both are backed by the HF `tokenizers` crate for encoding. Decoding of byte-level vocabularies is done
//! on raw bytes here (each id maps to a byte string), which makes the streaming decoder exact and cheap:
//! it holds back bytes of an unfinished UTF-8 character and emits them once the character is complete.
//!
//! Chat templates are rendered with `minijinja`, configured like `transformers` configures Jinja2
//! (`trim_blocks`, `lstrip_blocks`, loop controls, `raise_exception`, `strftime_now`, a Python-style
//! `tojson`) and with the Python `str`/`dict` methods templates commonly call (`strip`, `startswith`,
//! `split`, `items`, ...).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use minijinja::value::{from_args, Kwargs, ValueKind};
use minijinja::{Environment, ErrorKind, State, Value};
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, DecoderWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

/// What a GGUF file's `tokenizer.ggml.*` metadata says.
#[derive(Debug, Clone, Default)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`, e.g. `"gpt2"` (byte-level BPE) or `"llama"` (SentencePiece).
    pub model: String,
    /// `tokenizer.ggml.pre`, e.g. `"smollm"`, `"qwen2"`, `"llama-bpe"`, `"default"`; `None` if absent.
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`: token text, indexed by id (byte-level encoded for `gpt2`, e.g. `"Ġthe"`).
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.token_type`: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    /// May be empty (all tokens normal).
    pub token_types: Vec<i32>,
    /// `tokenizer.ggml.merges`: `"a b"` pairs in priority order.
    pub merges: Vec<String>,
    /// `tokenizer.ggml.scores`: SentencePiece piece scores (higher merges first); empty for BPE.
    pub scores: Vec<f32>,
    /// `tokenizer.ggml.add_space_prefix`: SentencePiece prepends "▁" to the text (default true).
    pub add_space_prefix: bool,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`. When the key is absent use [`GgufVocab::default_add_bos`].
    pub add_bos: bool,
    /// `tokenizer.chat_template`.
    pub chat_template: Option<String>,
}

impl GgufVocab {
    /// llama.cpp's default for `add_bos_token` when the GGUF file does not say: SentencePiece vocabularies
    /// and the llama3-style BPE pre-tokenizers add a BOS token, other BPE vocabularies do not.
    pub fn default_add_bos(model: &str, pre: Option<&str>) -> bool {
        match model {
            "llama" => true,
            "gpt2" => matches!(pre, Some(p) if LLAMA3_NAMES.contains(&p)),
            _ => false,
        }
    }
}

/// GGUF `tokenizer.ggml.token_type` values.
mod token_type {
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const BYTE: i32 = 6;
}

/// Errors from loading a tokenizer, encoding, decoding or rendering a chat template.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The tokenizer type is recognised but not implemented.
    #[error("unsupported tokenizer: {0}")]
    Unsupported(String),
    /// `tokenizer.ggml.pre` names a pre-tokenizer this crate does not know.
    #[error(
        "unknown pre-tokenizer type '{0}' (tokenizer.ggml.pre); known: default, {known}",
        known = known_pre_names().join(", ")
    )]
    UnknownPreTokenizer(String),
    /// The vocabulary metadata is inconsistent (lengths, ids out of range, bad merges, ...).
    #[error("invalid tokenizer vocabulary: {0}")]
    InvalidVocab(String),
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A tokenizer file could not be parsed.
    #[error("cannot load tokenizer from {path}: {message}")]
    Load { path: PathBuf, message: String },
    /// A token id outside the vocabulary was given to a decoder.
    #[error("token id {id} is out of range (vocabulary size {vocab_size})")]
    InvalidTokenId { id: u32, vocab_size: usize },
    /// The underlying tokenizer failed to encode the text.
    #[error("encoding failed: {0}")]
    Encode(String),
    /// The underlying tokenizer failed to decode the ids.
    #[error("decoding failed: {0}")]
    Decode(String),
    /// [`Tokenizer::apply_chat_template`] was called on a model without a chat template.
    #[error("this model has no chat template (no tokenizer.chat_template / chat_template in tokenizer_config.json)")]
    NoChatTemplate,
    /// The chat template failed to compile or render (includes `raise_exception` messages).
    #[error("chat template error: {0}")]
    ChatTemplate(String),
}

/// One chat message, as passed to the chat template (`messages[i].role`, `messages[i].content`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into() }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

// ------------------------------------------------------------------------------------------------
// Pre-tokenizer regexes (tokenizer.ggml.pre → regex sequence)
// ------------------------------------------------------------------------------------------------
//
// Source: llama.cpp `src/llama-vocab.cpp` (the `tokenizer_pre` string → `LLAMA_VOCAB_PRE_TYPE_*` mapping in
// `llama_vocab::impl::load`, and the `regex_exprs` table in `llm_tokenizer_bpe`). Each entry is a list of
// regexes applied in sequence; every match *and* every gap between matches becomes its own piece, which
// is exactly HF's `Split` pre-tokenizer with `Isolated` behaviour. Where llama.cpp rewrote a case-insensitive
// group as character classes (its regex engine lacks `(?i:)`), the original tokenizer.json form is used
// here since fancy-regex supports it.

/// GPT-2's pattern (also the pattern inside HF's `ByteLevel` pre-tokenizer). The trailing `|\s+` is HF's;
/// llama.cpp omits it, which gives the same pieces under isolated splitting (a lone whitespace char that
/// no alternative matches becomes a gap piece of its own).
const GPT2_RE: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Llama 3 (tiktoken cl100k style): numbers in groups of up to three digits.
const LLAMA3_RE: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2: as Llama 3 but every digit is its own piece.
const QWEN2_RE: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// GPT-4o / Llama 4 (tiktoken o200k style): case-aware word pieces.
const GPT4O_RE: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// One digit per piece (applied before GPT-2's pattern by the `smollm`/`starcoder` family).
const DIGIT_RE: &str = r"\p{N}";

/// `tokenizer.ggml.pre` values using GPT-2's pattern alone. (`gpt2` is not a llama.cpp name, accepted
/// as an alias of `gpt-2`.)
const GPT2_NAMES: &[&str] = &["gpt-2", "gpt2", "phi-2", "mpt", "olmo", "jais", "gigachat", "trillion", "exaone4"];
/// Individual digits, then GPT-2's pattern.
const DIGITS_GPT2_NAMES: &[&str] = &["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"];
/// Llama 3's pattern; llama.cpp also sets `ignore_merges` (a piece that is a whole vocab token is used as is).
const LLAMA3_NAMES: &[&str] =
    &["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"];
/// Llama 3's pattern without `ignore_merges`.
const LLAMA3_PLAIN_NAMES: &[&str] = &["dbrx", "smaug-bpe", "chatglm-bpe", "glm4"];
const QWEN2_NAMES: &[&str] = &["qwen2", "deepseek-r1-qwen", "megrez", "stablelm2"];
const GPT4O_NAMES: &[&str] = &["gpt-4o", "llama4"];
const FALCON_NAMES: &[&str] = &["falcon"];

fn known_pre_names() -> Vec<&'static str> {
    [GPT2_NAMES, DIGITS_GPT2_NAMES, LLAMA3_NAMES, LLAMA3_PLAIN_NAMES, QWEN2_NAMES, GPT4O_NAMES, FALCON_NAMES].concat()
}

/// How a GGUF byte-level BPE vocabulary splits text before BPE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreTokenizerSpec {
    /// Regexes applied in sequence, each splitting every piece into matches and gaps.
    pub regexes: Vec<&'static str>,
    /// A piece that is itself a vocabulary token is emitted whole, without applying merges.
    pub ignore_merges: bool,
}

/// The pre-tokenizer llama.cpp uses for a `tokenizer.ggml.pre` value (`None` = key absent).
///
/// An absent key and `"default"` give llama.cpp's `LLAMA_VOCAB_PRE_TYPE_DEFAULT` sequence (punctuation
/// runs, then GPT-2, then digit runs, then groups of three ASCII digits) — *not* plain GPT-2; llama.cpp
/// warns that such files tokenize poorly. An unknown name is an error, as in llama.cpp.
pub fn pre_tokenizer_regexes(pre: Option<&str>) -> Result<PreTokenizerSpec, TokenizerError> {
    let spec = |regexes: Vec<&'static str>, ignore_merges| PreTokenizerSpec { regexes, ignore_merges };
    let name = match pre {
        None | Some("default") => {
            return Ok(spec(vec![r"[\p{P}\$\+<=>\^~\|]+", GPT2_RE, r"\p{N}+", r"[0-9][0-9][0-9]"], false))
        }
        Some(name) => name,
    };
    Ok(if GPT2_NAMES.contains(&name) {
        spec(vec![GPT2_RE], false)
    } else if DIGITS_GPT2_NAMES.contains(&name) {
        spec(vec![DIGIT_RE, GPT2_RE], false)
    } else if LLAMA3_NAMES.contains(&name) {
        spec(vec![LLAMA3_RE], true)
    } else if LLAMA3_PLAIN_NAMES.contains(&name) {
        spec(vec![LLAMA3_RE], false)
    } else if QWEN2_NAMES.contains(&name) {
        spec(vec![QWEN2_RE], false)
    } else if GPT4O_NAMES.contains(&name) {
        spec(vec![GPT4O_RE], false)
    } else if FALCON_NAMES.contains(&name) {
        spec(vec![r"[\p{P}\$\+<=>\^~\|`]+", GPT2_RE, r"[0-9][0-9][0-9]"], false)
    } else {
        return Err(TokenizerError::UnknownPreTokenizer(name.to_string()));
    })
}

/// `Split(regex, Isolated)` for each regex, then byte-level mapping without GPT-2's own regex.
fn build_pre_tokenizer(spec: &PreTokenizerSpec) -> Result<PreTokenizerWrapper, TokenizerError> {
    let mut steps = Vec::with_capacity(spec.regexes.len() + 1);
    for re in &spec.regexes {
        let split = Split::new(SplitPattern::Regex((*re).to_string()), SplitDelimiterBehavior::Isolated, false)
            .map_err(|e| TokenizerError::InvalidVocab(format!("bad pre-tokenizer regex {re:?}: {e}")))?;
        steps.push(PreTokenizerWrapper::Split(split));
    }
    steps.push(PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)));
    Ok(PreTokenizerWrapper::Sequence(Sequence::new(steps)))
}

// ------------------------------------------------------------------------------------------------
// Byte-level alphabet
// ------------------------------------------------------------------------------------------------

/// GPT-2's byte → char table: printable Latin-1 bytes map to themselves, the other 68 bytes to
/// U+0100.. in byte order (so the space byte is `Ġ`, newline `Ċ`).
/// Registers a GGUF vocabulary's control and unknown tokens as special and its user-defined ones as
/// added tokens (each matched as one id wherever it appears in the text); returns which ids are special.
fn add_vocab_specials(inner: &mut tokenizers::Tokenizer, tokens: &[String], ty: impl Fn(usize) -> i32) -> Vec<bool> {
    let (mut specials, mut user_defined) = (Vec::new(), Vec::new());
    let mut special = vec![false; tokens.len()];
    for (id, tok) in tokens.iter().enumerate() {
        match ty(id) {
            token_type::CONTROL | token_type::UNKNOWN => {
                special[id] = true;
                specials.push(AddedToken::from(tok.clone(), true).normalized(false));
            }
            token_type::USER_DEFINED => user_defined.push(AddedToken::from(tok.clone(), false).normalized(false)),
            _ => {}
        }
    }
    inner.add_special_tokens(&specials);
    inner.add_tokens(&user_defined);
    special
}

/// The byte a SentencePiece byte piece `<0xNN>` stands for.
fn sentencepiece_byte(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    u8::from_str_radix(hex, 16).ok().filter(|_| hex.len() == 2)
}

fn byte_to_char_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for (b, slot) in table.iter_mut().enumerate() {
        let printable = (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        let cp = if printable {
            b as u32
        } else {
            next += 1;
            next - 1
        };
        *slot = char::from_u32(cp).expect("byte-level code points are valid chars");
    }
    table
}

fn char_to_byte_map() -> HashMap<char, u8> {
    byte_to_char_table().iter().enumerate().map(|(b, &c)| (c, b as u8)).collect()
}

/// Bytes a byte-level token stands for. Like HF's `ByteLevel` decoder: if some char is outside the
/// byte-level alphabet the token is taken as literal UTF-8 text.
fn byte_level_token_bytes(token: &str, map: &HashMap<char, u8>) -> Vec<u8> {
    token
        .chars()
        .map(|c| map.get(&c).copied())
        .collect::<Option<Vec<u8>>>()
        .unwrap_or_else(|| token.as_bytes().to_vec())
}

// ------------------------------------------------------------------------------------------------
// Tokenizer
// ------------------------------------------------------------------------------------------------

/// How ids are turned back into text.
enum DecodeMode {
    /// Every id is a byte string (`bytes[id]`); decoding concatenates and converts UTF-8 lossily.
    Bytes(Vec<Option<Vec<u8>>>),
    /// Context-dependent decoders (SentencePiece-style tokenizer.json): defer to the HF decoder.
    Hf,
}

/// A tokenizer: encode/decode, streaming decode, special tokens and chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    decode_mode: DecodeMode,
    /// Token text by id, as the vocabulary stores it (byte-level encoded for BPE, e.g. `"Ġthe"`).
    tokens: Vec<Option<String>>,
    /// Ids skipped by `decode(.., skip_special = true)` (control/unknown tokens, HF "special" tokens).
    special: Vec<bool>,
    bos: Option<u32>,
    eos: Option<u32>,
    /// Whether `encode(.., add_special = true)` prepends `bos` itself (no post-processor does it).
    prepend_bos: bool,
    chat_template: Option<String>,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("prepend_bos", &self.prepend_bos)
            .field("byte_level", &matches!(self.decode_mode, DecodeMode::Bytes(_)))
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

impl Tokenizer {
    /// Builds a tokenizer from GGUF `tokenizer.ggml.*` metadata. Only byte-level BPE (`model == "gpt2"`)
    /// is supported. Control, unknown and user-defined tokens are matched as single ids wherever they
    /// appear in the text; control/unknown ones are "special" (dropped by `decode(.., true)`).
    pub fn from_gguf_vocab(v: GgufVocab) -> Result<Tokenizer, TokenizerError> {
        match v.model.as_str() {
            "gpt2" | "llama" => {}
            other => {
                return Err(TokenizerError::Unsupported(format!(
                "tokenizer.ggml.model = {other:?}; Kiln reads byte-level BPE (\"gpt2\") and SentencePiece (\"llama\")"
            )))
            }
        }
        let n = v.tokens.len();
        if n == 0 {
            return Err(TokenizerError::InvalidVocab("tokenizer.ggml.tokens is empty".into()));
        }
        if u32::try_from(n).is_err() {
            return Err(TokenizerError::InvalidVocab(format!("{n} tokens do not fit u32 ids")));
        }
        if !v.token_types.is_empty() && v.token_types.len() != n {
            return Err(TokenizerError::InvalidVocab(format!("{} token types for {n} tokens", v.token_types.len())));
        }
        for (what, id) in [("bos", v.bos), ("eos", v.eos)] {
            if let Some(id) = id {
                if id as usize >= n {
                    return Err(TokenizerError::InvalidVocab(format!("{what} id {id} >= vocabulary size {n}")));
                }
            }
        }
        if v.model == "llama" {
            return Self::from_sentencepiece(v);
        }
        let ty = |id: usize| v.token_types.get(id).copied().unwrap_or(1);
        let spec = pre_tokenizer_regexes(v.pre.as_deref())?;

        // Later duplicates win, as in llama.cpp's token → id map.
        let vocab: Vocab = v.tokens.iter().enumerate().map(|(id, t)| (t.clone(), id as u32)).collect();
        let mut merges = Vec::with_capacity(v.merges.len());
        for (i, m) in v.merges.iter().enumerate() {
            let (a, b) = m
                .split_once(' ')
                .ok_or_else(|| TokenizerError::InvalidVocab(format!("merge #{i} {m:?} is not of the form \"a b\"")))?;
            merges.push((a.to_string(), b.to_string()));
        }
        let mut bpe = BPE::builder().vocab_and_merges(vocab, merges).ignore_merges(spec.ignore_merges);
        if let Some(unk) = (0..n).find(|&id| ty(id) == token_type::UNKNOWN) {
            bpe = bpe.unk_token(v.tokens[unk].clone());
        }
        let bpe = bpe.build().map_err(|e| TokenizerError::InvalidVocab(format!("BPE model: {e}")))?;

        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(build_pre_tokenizer(&spec)?));
        inner.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())));

        let special = add_vocab_specials(&mut inner, &v.tokens, ty);

        // Control and user-defined tokens are stored as plain text (llama.cpp prints them verbatim);
        // normal tokens are byte-level encoded.
        let map = char_to_byte_map();
        let bytes = v
            .tokens
            .iter()
            .enumerate()
            .map(|(id, t)| {
                Some(match ty(id) {
                    token_type::CONTROL | token_type::USER_DEFINED => t.as_bytes().to_vec(),
                    _ => byte_level_token_bytes(t, &map),
                })
            })
            .collect();

        Ok(Tokenizer::from_vocab_parts(inner, bytes, special, v))
    }

    /// A SentencePiece vocabulary (GGUF `tokenizer.ggml.model = "llama"`: Gemma, Llama 2, Mistral,
    /// TinyLlama) as a `tokenizers` BPE model, the way Hugging Face converts SentencePiece models: the
    /// merges are every split of a normal piece into two pieces of the vocabulary, ordered by the
    /// merged piece's score (highest first; then by id), so merging follows llama.cpp's highest-score
    /// bigram rule; characters outside the vocabulary fall back to `<0xNN>` byte pieces; spaces become
    /// "▁" (with one prepended when `add_space_prefix`). Decoding concatenates each piece's bytes.
    fn from_sentencepiece(v: GgufVocab) -> Result<Tokenizer, TokenizerError> {
        use tokenizers::normalizers::{Prepend, Replace, Sequence as Normalizers};
        let n = v.tokens.len();
        if v.scores.len() != n {
            return Err(TokenizerError::InvalidVocab(format!(
                "{} scores for {n} tokens (SentencePiece needs tokenizer.ggml.scores)",
                v.scores.len()
            )));
        }
        let ty = |id: usize| v.token_types.get(id).copied().unwrap_or(token_type::NORMAL);
        let vocab: Vocab = v.tokens.iter().enumerate().map(|(id, t)| (t.clone(), id as u32)).collect();
        let mut merges: Vec<(usize, u32, u32)> = Vec::new(); // (merged id, left id, right id)
        for (id, piece) in v.tokens.iter().enumerate() {
            if ty(id) != token_type::NORMAL || vocab.get(piece) != Some(&(id as u32)) {
                continue;
            }
            for (at, _) in piece.char_indices().skip(1) {
                if let (Some(&l), Some(&r)) = (vocab.get(&piece[..at]), vocab.get(&piece[at..])) {
                    merges.push((id, l, r));
                }
            }
        }
        merges.sort_by(|a, b| v.scores[b.0].total_cmp(&v.scores[a.0]).then((a.0, a.1, a.2).cmp(&(b.0, b.1, b.2))));
        let merges: Vec<(String, String)> =
            merges.into_iter().map(|(_, l, r)| (v.tokens[l as usize].clone(), v.tokens[r as usize].clone())).collect();
        let mut bpe = BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(true).fuse_unk(true);
        if let Some(unk) = (0..n).find(|&id| ty(id) == token_type::UNKNOWN) {
            bpe = bpe.unk_token(v.tokens[unk].clone());
        }
        let bpe = bpe.build().map_err(|e| TokenizerError::InvalidVocab(format!("SentencePiece model: {e}")))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let replace = Replace::new(" ", "▁").map_err(|e| TokenizerError::InvalidVocab(e.to_string()))?;
        let mut norms = vec![];
        if v.add_space_prefix {
            norms.push(Prepend::new("▁".into()).into());
        }
        norms.push(replace.into());
        inner.with_normalizer(Some(Normalizers::new(norms)));

        let special = add_vocab_specials(&mut inner, &v.tokens, ty);
        let bytes = v
            .tokens
            .iter()
            .enumerate()
            .map(|(id, t)| {
                Some(match ty(id) {
                    token_type::BYTE => sentencepiece_byte(t).map(|b| vec![b]).unwrap_or_else(|| t.as_bytes().to_vec()),
                    token_type::CONTROL => t.as_bytes().to_vec(),
                    _ => t.replace('▁', " ").into_bytes(),
                })
            })
            .collect();
        Ok(Tokenizer::from_vocab_parts(inner, bytes, special, v))
    }

    /// A tokenizer over a GGUF vocabulary whose ids decode to `bytes`.
    fn from_vocab_parts(
        inner: tokenizers::Tokenizer,
        bytes: Vec<Option<Vec<u8>>>,
        special: Vec<bool>,
        v: GgufVocab,
    ) -> Tokenizer {
        Tokenizer {
            inner,
            decode_mode: DecodeMode::Bytes(bytes),
            tokens: v.tokens.into_iter().map(Some).collect(),
            special,
            bos: v.bos,
            eos: v.eos,
            prepend_bos: v.add_bos && v.bos.is_some(),
            chat_template: v.chat_template,
        }
    }

    /// Loads a Hugging Face `tokenizer.json`. If a `tokenizer_config.json` sits beside it, its
    /// `chat_template`, `bos_token`, `eos_token` and `add_bos_token` are used; a `chat_template.jinja`
    /// beside it takes precedence for the template. Truncation and padding settings are ignored.
    pub fn from_tokenizer_json(path: &Path) -> Result<Tokenizer, TokenizerError> {
        let load_err = |message: String| TokenizerError::Load { path: path.to_path_buf(), message };
        let text =
            std::fs::read_to_string(path).map_err(|source| TokenizerError::Io { path: path.to_path_buf(), source })?;
        let mut inner: tokenizers::Tokenizer = text.parse().map_err(|e| load_err(format!("{e}")))?;
        inner.with_truncation(None).map_err(|e| load_err(format!("{e}")))?;
        inner.with_padding(None);

        let vocab = inner.get_vocab(true);
        let size = vocab.values().map(|&id| id as usize + 1).max().unwrap_or(0);
        let mut tokens = vec![None; size];
        for (tok, &id) in &vocab {
            tokens[id as usize] = Some(tok.clone());
        }
        let mut special = vec![false; size];
        for (id, tok) in inner.get_added_tokens_decoder() {
            if tok.special {
                special[id as usize] = true;
            }
        }

        let decode_mode = if matches!(inner.get_decoder(), Some(DecoderWrapper::ByteLevel(_))) {
            let map = char_to_byte_map();
            DecodeMode::Bytes(tokens.iter().map(|t| t.as_deref().map(|t| byte_level_token_bytes(t, &map))).collect())
        } else {
            DecodeMode::Hf
        };

        let dir = path.parent().unwrap_or(Path::new("."));
        let config = read_tokenizer_config(&dir.join("tokenizer_config.json"))?;
        let token_id = |name: &str| -> Option<u32> {
            let tok = config.as_ref()?.get(name).and_then(special_token_content)?;
            inner.token_to_id(&tok)
        };
        let bos = token_id("bos_token");
        let eos = token_id("eos_token");
        let add_bos = config.as_ref().and_then(|c| c.get("add_bos_token")).and_then(|v| v.as_bool()).unwrap_or(false);
        // Most tokenizer.json files add BOS through their post-processor; only add it ourselves if the
        // config asks for it and the post-processor does not.
        let prepend_bos = match bos {
            Some(bos) if add_bos => {
                let probe = inner.encode_fast("", true).map_err(|e| load_err(format!("{e}")))?;
                !probe.get_ids().contains(&bos)
            }
            _ => false,
        };

        let jinja_path = dir.join("chat_template.jinja");
        let chat_template = if jinja_path.is_file() {
            Some(
                std::fs::read_to_string(&jinja_path)
                    .map_err(|source| TokenizerError::Io { path: jinja_path, source })?,
            )
        } else {
            config.as_ref().and_then(|c| c.get("chat_template")).and_then(chat_template_from_config)
        };

        Ok(Tokenizer { inner, decode_mode, tokens, special, bos, eos, prepend_bos, chat_template })
    }

    /// Encodes `text`. Special and user-defined tokens written in the text (e.g. `<|im_start|>`) become
    /// their single ids. With `add_special`, the BOS token is added if the model asks for it
    /// (`add_bos_token`, or the tokenizer.json post-processor).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc = self.inner.encode_fast(text, add_special).map_err(|e| TokenizerError::Encode(e.to_string()))?;
        let ids = enc.get_ids();
        match self.bos {
            Some(bos) if add_special && self.prepend_bos => {
                let mut out = Vec::with_capacity(ids.len() + 1);
                out.push(bos);
                out.extend_from_slice(ids);
                Ok(out)
            }
            _ => Ok(ids.to_vec()),
        }
    }

    /// Decodes `ids` to text. With `skip_special`, control tokens (BOS, EOS, `<|im_start|>`, ...) are
    /// dropped; user-defined tokens are kept. Invalid UTF-8 becomes U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        self.check_ids(ids)?;
        match &self.decode_mode {
            DecodeMode::Bytes(table) => {
                let mut bytes = Vec::new();
                for &id in ids {
                    if !(skip_special && self.special[id as usize]) {
                        bytes.extend_from_slice(table[id as usize].as_deref().unwrap_or_default());
                    }
                }
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
            DecodeMode::Hf => self.inner.decode(ids, skip_special).map_err(|e| TokenizerError::Decode(e.to_string())),
        }
    }

    /// The bytes token `id` stands for in `decode(.., skip_special = true)`'s output (empty for control
    /// tokens), so a program can detokenize by concatenation. `None` for an unknown id, and for tokenizers
    /// from tokenizer.json, whose decoders do not work token by token.
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        self.check_ids(&[id]).ok()?;
        match &self.decode_mode {
            DecodeMode::Bytes(_) if self.special[id as usize] => Some(Vec::new()),
            DecodeMode::Bytes(table) => Some(table[id as usize].as_deref().unwrap_or_default().to_vec()),
            DecodeMode::Hf => None,
        }
    }

    /// A streaming decoder that keeps special tokens (the concatenation of its output equals
    /// `decode(ids, false)`).
    pub fn decoder(&self) -> StreamDecoder<'_> {
        self.stream_decoder(false)
    }

    /// A streaming decoder; `skip_special` as in [`Tokenizer::decode`].
    pub fn stream_decoder(&self, skip_special: bool) -> StreamDecoder<'_> {
        StreamDecoder {
            tok: self,
            skip_special,
            pending: Vec::new(),
            ids: Vec::new(),
            prefix: String::new(),
            prefix_index: 0,
        }
    }

    /// Number of token ids (one more than the largest id).
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// Token text as the vocabulary stores it (byte-level encoded for BPE, e.g. `"Ġthe"`).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.tokens.get(id as usize).cloned().flatten()
    }

    /// Id of a vocabulary token given in its stored form (e.g. `"<|im_end|>"`, `"Ġthe"`).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Whether `id` is a special (control) token, skipped by `decode(.., true)`.
    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    /// The model's chat template source, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Renders the model's chat template for `messages` (variables: `messages`, `add_generation_prompt`,
    /// `bos_token`, `eos_token`). The result is meant to be encoded with `encode(prompt, false)` since
    /// templates normally write the BOS token themselves.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        let template = self.chat_template.as_deref().ok_or(TokenizerError::NoChatTemplate)?;
        let text_of = |id: Option<u32>| id.and_then(|id| self.decode(&[id], false).ok()).unwrap_or_default();
        render_chat_template(template, messages, add_generation_prompt, &text_of(self.bos), &text_of(self.eos))
    }

    fn check_ids(&self, ids: &[u32]) -> Result<(), TokenizerError> {
        let vocab_size = self.vocab_size();
        for &id in ids {
            if self.tokens.get(id as usize).is_none_or(|t| t.is_none()) {
                return Err(TokenizerError::InvalidTokenId { id, vocab_size });
            }
        }
        Ok(())
    }
}

fn read_tokenizer_config(path: &Path) -> Result<Option<serde_json::Value>, TokenizerError> {
    if !path.is_file() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).map_err(|source| TokenizerError::Io { path: path.to_path_buf(), source })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| TokenizerError::Load { path: path.to_path_buf(), message: e.to_string() })
}

/// `bos_token` / `eos_token` in tokenizer_config.json: a string or an `AddedToken` object.
fn special_token_content(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// `chat_template` in tokenizer_config.json: a string, or a list of `{name, template}` (use "default").
fn chat_template_from_config(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(list) => {
            let named = |name: &str| {
                list.iter().find(|t| t.get("name").and_then(|n| n.as_str()) == Some(name))?.get("template")?.as_str()
            };
            named("default").or_else(|| list.first()?.get("template")?.as_str()).map(str::to_string)
        }
        _ => None,
    }
}

// ------------------------------------------------------------------------------------------------
// Streaming decoder
// ------------------------------------------------------------------------------------------------

/// Incremental detokenizer: feed generated ids one at a time, get back text as soon as it is complete
/// UTF-8. Bytes of a character split across tokens are held back until the character is complete;
/// bytes that can never form a valid character are emitted as U+FFFD right away.
pub struct StreamDecoder<'a> {
    tok: &'a Tokenizer,
    skip_special: bool,
    /// Byte-level mode: bytes of an unfinished UTF-8 sequence.
    pending: Vec<u8>,
    /// HF mode: ids whose decoding is not fully emitted yet, the already-emitted decoding of
    /// `ids[..prefix_index]`, and that index.
    ids: Vec<u32>,
    prefix: String,
    prefix_index: usize,
}

impl StreamDecoder<'_> {
    /// Adds one id; returns the newly completed text, or `None` if there is none yet.
    pub fn push(&mut self, id: u32) -> Result<Option<String>, TokenizerError> {
        self.tok.check_ids(&[id])?;
        if self.skip_special && self.tok.special[id as usize] {
            return Ok(None);
        }
        match &self.tok.decode_mode {
            DecodeMode::Bytes(table) => {
                self.pending.extend_from_slice(table[id as usize].as_deref().unwrap_or_default());
                let out = drain_utf8(&mut self.pending, false);
                Ok((!out.is_empty()).then_some(out))
            }
            DecodeMode::Hf => {
                self.ids.push(id);
                let text = self.tok.decode(&self.ids, self.skip_special)?;
                if text.len() <= self.prefix.len() || text.ends_with('\u{FFFD}') || !text.starts_with(&self.prefix) {
                    return Ok(None);
                }
                let new = text[self.prefix.len()..].to_string();
                // Keep the ids since the last emission as context (decoders may strip a leading space).
                self.ids.drain(..self.prefix_index);
                self.prefix_index = self.ids.len();
                self.prefix = self.tok.decode(&self.ids, self.skip_special)?;
                Ok(Some(new))
            }
        }
    }

    /// Ends the stream: returns whatever is still held back (an incomplete character becomes U+FFFD).
    pub fn finish(&mut self) -> Option<String> {
        let out = match &self.tok.decode_mode {
            DecodeMode::Bytes(_) => drain_utf8(&mut self.pending, true),
            DecodeMode::Hf => {
                let text = self.tok.decode(&self.ids, self.skip_special).unwrap_or_default();
                let out = text.get(self.prefix.len()..).unwrap_or_default().to_string();
                self.ids.clear();
                self.prefix.clear();
                self.prefix_index = 0;
                out
            }
        };
        (!out.is_empty()).then_some(out)
    }
}

/// Takes the longest decodable prefix of `buf` (U+FFFD for invalid sequences, like
/// `String::from_utf8_lossy`), leaving an incomplete trailing sequence in `buf` unless `flush`.
fn drain_utf8(buf: &mut Vec<u8>, flush: bool) -> String {
    let mut out = String::new();
    let mut start = 0;
    while start < buf.len() {
        match std::str::from_utf8(&buf[start..]) {
            Ok(s) => {
                out.push_str(s);
                start = buf.len();
            }
            Err(e) => {
                let valid = e.valid_up_to();
                out.push_str(std::str::from_utf8(&buf[start..start + valid]).expect("validated prefix"));
                match e.error_len() {
                    Some(bad) => {
                        out.push('\u{FFFD}');
                        start += valid + bad;
                    }
                    None if flush => {
                        out.push('\u{FFFD}');
                        start = buf.len();
                    }
                    None => {
                        start += valid;
                        break;
                    }
                }
            }
        }
    }
    buf.drain(..start);
    out
}

// ------------------------------------------------------------------------------------------------
// Chat templates
// ------------------------------------------------------------------------------------------------

/// Renders a Hugging Face style chat template. Exposed for testing templates without a tokenizer.
pub fn render_chat_template(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String, TokenizerError> {
    let err = |e: minijinja::Error| TokenizerError::ChatTemplate(describe_jinja_error(&e));
    let mut env = Environment::new();
    // As transformers' `_compile_jinja_template`.
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(python_method);
    env.add_function("raise_exception", |msg: String| -> Result<Value, minijinja::Error> {
        Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_function("strftime_now", |fmt: String| strftime_utc_now(&fmt));
    env.add_filter("tojson", tojson_filter);
    let tmpl = env.template_from_str(template).map_err(err)?;
    tmpl.render(minijinja::context! {
        messages => Value::from_serialize(messages),
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token,
        eos_token => eos_token,
    })
    .map_err(err)
}

fn describe_jinja_error(e: &minijinja::Error) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    msg
}

/// Python `str` / `dict` methods that HF chat templates call (a subset of minijinja-contrib's pycompat).
fn python_method(_state: &State, value: &Value, method: &str, args: &[Value]) -> Result<Value, minijinja::Error> {
    let unknown = || Err(minijinja::Error::from(ErrorKind::UnknownMethod));
    if let Some(s) = value.as_str() {
        let strip_set = |chars: Option<&str>| {
            let chars = chars.map(|c| c.chars().collect::<Vec<_>>());
            move |c: char| match &chars {
                Some(set) => set.contains(&c),
                None => c.is_whitespace(),
            }
        };
        let affix_matches = |arg: &Value, f: &dyn Fn(&str) -> bool| -> Result<bool, minijinja::Error> {
            if let Some(a) = arg.as_str() {
                return Ok(f(a));
            }
            for item in arg.try_iter()? {
                if item.as_str().is_some_and(f) {
                    return Ok(true);
                }
            }
            Ok(false)
        };
        return Ok(match method {
            "strip" => {
                let (chars,): (Option<&str>,) = from_args(args)?;
                Value::from(s.trim_matches(strip_set(chars)))
            }
            "lstrip" => {
                let (chars,): (Option<&str>,) = from_args(args)?;
                Value::from(s.trim_start_matches(strip_set(chars)))
            }
            "rstrip" => {
                let (chars,): (Option<&str>,) = from_args(args)?;
                Value::from(s.trim_end_matches(strip_set(chars)))
            }
            "startswith" => {
                let (arg,): (Value,) = from_args(args)?;
                Value::from(affix_matches(&arg, &|p| s.starts_with(p))?)
            }
            "endswith" => {
                let (arg,): (Value,) = from_args(args)?;
                Value::from(affix_matches(&arg, &|p| s.ends_with(p))?)
            }
            "upper" => Value::from(s.to_uppercase()),
            "lower" => Value::from(s.to_lowercase()),
            "title" | "capitalize" => {
                let mut out = String::with_capacity(s.len());
                let mut at_word_start = true;
                for (i, c) in s.chars().enumerate() {
                    let upper = if method == "title" { at_word_start } else { i == 0 };
                    if upper {
                        out.extend(c.to_uppercase());
                    } else {
                        out.extend(c.to_lowercase());
                    }
                    at_word_start = !c.is_alphanumeric();
                }
                Value::from(out)
            }
            "replace" => {
                let (old, new, count): (&str, &str, Option<i64>) = from_args(args)?;
                match count {
                    Some(n) if n >= 0 => Value::from(s.replacen(old, new, n as usize)),
                    _ => Value::from(s.replace(old, new)),
                }
            }
            "split" | "rsplit" => {
                let (sep, maxsplit): (Option<&str>, Option<i64>) = from_args(args)?;
                let max = maxsplit.filter(|&m| m >= 0).map(|m| m as usize + 1).unwrap_or(usize::MAX);
                let parts: Vec<Value> = match (sep, method) {
                    (Some(sep), "split") => s.splitn(max, sep).map(Value::from).collect(),
                    (Some(sep), _) => {
                        let mut p: Vec<Value> = s.rsplitn(max, sep).map(Value::from).collect();
                        p.reverse();
                        p
                    }
                    (None, _) => s.split_whitespace().map(Value::from).collect(),
                };
                Value::from(parts)
            }
            "find" => {
                let (needle,): (&str,) = from_args(args)?;
                Value::from(s.find(needle).map(|b| s[..b].chars().count() as i64).unwrap_or(-1))
            }
            "count" => {
                let (needle,): (&str,) = from_args(args)?;
                Value::from(s.matches(needle).count())
            }
            "join" => {
                let (items,): (Value,) = from_args(args)?;
                let mut parts = Vec::new();
                for item in items.try_iter()? {
                    parts.push(item.to_string());
                }
                Value::from(parts.join(s))
            }
            "isdigit" => Value::from(!s.is_empty() && s.chars().all(|c| c.is_ascii_digit())),
            "isalpha" => Value::from(!s.is_empty() && s.chars().all(char::is_alphabetic)),
            "isspace" => Value::from(!s.is_empty() && s.chars().all(char::is_whitespace)),
            _ => return unknown(),
        });
    }
    if value.kind() == ValueKind::Map {
        return match method {
            "items" => {
                let () = from_args(args)?;
                let mut out = Vec::new();
                for key in value.try_iter()? {
                    let v = value.get_item(&key)?;
                    out.push(Value::from(vec![key, v]));
                }
                Ok(Value::from(out))
            }
            "keys" => {
                let () = from_args(args)?;
                Ok(Value::from(value.try_iter()?.collect::<Vec<_>>()))
            }
            "values" => {
                let () = from_args(args)?;
                let mut out = Vec::new();
                for key in value.try_iter()? {
                    out.push(value.get_item(&key)?);
                }
                Ok(Value::from(out))
            }
            "get" => {
                let (key, default): (Value, Option<Value>) = from_args(args)?;
                let v = value.get_item(&key)?;
                Ok(if v.is_undefined() { default.unwrap_or(Value::from(())) } else { v })
            }
            _ => unknown(),
        };
    }
    unknown()
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=indent)` — Python's
/// separators (`", "`, `": "`), no HTML escaping (minijinja's own `tojson` escapes `<`, `>`, `&`, `'`).
fn tojson_filter(value: &Value, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    // Accepted and ignored (transformers forwards them to json.dumps; we always keep non-ASCII text).
    let _: Option<Value> = kwargs.get("ensure_ascii")?;
    let _: Option<Value> = kwargs.get("sort_keys")?;
    let _: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(value, indent, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

fn write_json(value: &Value, indent: Option<usize>, depth: usize, out: &mut String) -> Result<(), minijinja::Error> {
    let json_err = |e: serde_json::Error| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string());
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match value.kind() {
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_json(item, indent, depth + 1, out)?;
            }
            if !items.is_empty() {
                newline(out, depth);
            }
            out.push(']');
        }
        ValueKind::Map => {
            let keys: Vec<Value> = value.try_iter()?.collect();
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                let key_text = key.as_str().map(str::to_string).unwrap_or_else(|| key.to_string());
                out.push_str(&serde_json::to_string(&key_text).map_err(json_err)?);
                out.push_str(": ");
                write_json(&value.get_item(key)?, indent, depth + 1, out)?;
            }
            if !keys.is_empty() {
                newline(out, depth);
            }
            out.push('}');
        }
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        _ => out.push_str(&serde_json::to_string(value).map_err(json_err)?),
    }
    Ok(())
}

/// `strftime_now(format)` (used by Llama 3 templates for the date), in UTC. Supports
/// `%Y %y %m %d %e %j %H %I %M %S %p %b %B %a %A %%`.
fn strftime_utc_now(fmt: &str) -> Result<String, minijinja::Error> {
    let secs =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    strftime_utc(fmt, secs)
}

fn strftime_utc(fmt: &str, unix_secs: i64) -> Result<String, minijinja::Error> {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"];
    let days = unix_secs.div_euclid(86_400);
    let secs_of_day = unix_secs.rem_euclid(86_400);
    let (hour, minute, second) = (secs_of_day / 3600, secs_of_day / 60 % 60, secs_of_day % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let is_leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let day_of_year = {
        const CUM: [i64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
        CUM[(month - 1) as usize] + day + i64::from(is_leap && month > 2)
    };
    let weekday = (days + 4).rem_euclid(7) as usize;
    let month_name = MONTHS[(month - 1) as usize];

    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:>2}")),
            Some('j') => out.push_str(&format!("{day_of_year:03}")),
            Some('H') => out.push_str(&format!("{hour:02}")),
            Some('I') => out.push_str(&format!("{:02}", if hour % 12 == 0 { 12 } else { hour % 12 })),
            Some('M') => out.push_str(&format!("{minute:02}")),
            Some('S') => out.push_str(&format!("{second:02}")),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('b') => out.push_str(&month_name[..3]),
            Some('B') => out.push_str(month_name),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('%') => out.push('%'),
            other => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!(
                        "strftime_now: unsupported format directive %{}",
                        other.map(String::from).unwrap_or_default()
                    ),
                ))
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

    /// A tiny byte-level vocabulary: the 256 byte tokens (ids 0..256), some merges, then control tokens
    /// and one user-defined token.
    fn tiny_vocab(pre: &str) -> GgufVocab {
        let table = byte_to_char_table();
        let mut tokens: Vec<String> = table.iter().map(|c| c.to_string()).collect();
        let mut types = vec![1; 256];
        let merges = ["Ġ t", "l l", "e ll", "h ell", "hell o", "h e", "Ġt he", "1 2", "Ã ©", "o Ġ"];
        for m in merges {
            tokens.push(m.replace(' ', ""));
            types.push(1);
        }
        for (t, ty) in [("<|endoftext|>", 3), ("<|im_start|>", 3), ("<|im_end|>", 3), ("<tool>", 4)] {
            tokens.push(t.to_string());
            types.push(ty);
        }
        GgufVocab {
            model: "gpt2".into(),
            pre: Some(pre.into()),
            tokens,
            token_types: types,
            merges: merges.iter().map(|s| s.to_string()).collect(),
            scores: Vec::new(),
            add_space_prefix: false,
            bos: Some(266),
            eos: Some(268),
            add_bos: false,
            chat_template: Some(CHATML.into()),
        }
    }

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}\
        {{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}\
        {{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}\
        {% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn tiny(pre: &str) -> Tokenizer {
        Tokenizer::from_gguf_vocab(tiny_vocab(pre)).unwrap()
    }

    fn id(tok: &Tokenizer, s: &str) -> u32 {
        tok.token_to_id(s).unwrap_or_else(|| panic!("no token {s:?}"))
    }

    /// Pieces the regex part of a pre-tokenizer makes of `text`.
    fn pieces(pre: Option<&str>, text: &str) -> Vec<String> {
        let spec = pre_tokenizer_regexes(pre).unwrap();
        let steps = spec
            .regexes
            .iter()
            .map(|re| {
                PreTokenizerWrapper::Split(
                    Split::new(SplitPattern::Regex(re.to_string()), SplitDelimiterBehavior::Isolated, false).unwrap(),
                )
            })
            .collect();
        let mut pts = PreTokenizedString::from(text);
        Sequence::new(steps).pre_tokenize(&mut pts).unwrap();
        pts.get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .map(|(s, _, _)| s.to_string())
            .collect()
    }

    #[test]
    fn tokenizer_is_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Tokenizer>();
    }

    #[test]
    fn byte_table_is_gpt2s() {
        let t = byte_to_char_table();
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[b'a' as usize], 'a');
        assert_eq!(t[0], 'Ā');
        assert_eq!(t[0xAD], 'Ń');
        let distinct: std::collections::HashSet<char> = t.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }

    #[test]
    fn encode_applies_merges_and_round_trips() {
        let tok = tiny("gpt-2");
        let ids = tok.encode("hello the", false).unwrap();
        assert_eq!(ids, vec![id(&tok, "hello"), id(&tok, "Ġthe")]);
        for text in ["hello the", "  two  spaces\n\nnewlines\t", "naïve café 😀 日本語", "x=1+2; // ok", ""] {
            let ids = tok.encode(text, false).unwrap();
            assert_eq!(tok.decode(&ids, false).unwrap(), text, "{text:?}");
        }
        assert_eq!(tok.vocab_size(), 270);
        assert_eq!(tok.id_to_token(id(&tok, "Ġthe")).as_deref(), Some("Ġthe"));
        assert_eq!(tok.id_to_token(9999), None);
    }

    #[test]
    fn special_tokens_are_single_ids() {
        let tok = tiny("smollm");
        let (start, end, tool) = (id(&tok, "<|im_start|>"), id(&tok, "<|im_end|>"), id(&tok, "<tool>"));
        let ids = tok.encode("<|im_start|>hello<|im_end|><tool>", false).unwrap();
        assert_eq!(ids, vec![start, id(&tok, "hello"), end, tool]);
        assert_eq!(tok.decode(&ids, false).unwrap(), "<|im_start|>hello<|im_end|><tool>");
        // Control tokens are skipped, user-defined ones kept.
        assert_eq!(tok.decode(&ids, true).unwrap(), "hello<tool>");
        assert!(tok.is_special(start) && !tok.is_special(tool));
        assert_eq!(tok.bos(), Some(266));
        assert_eq!(tok.eos(), Some(268));
    }

    #[test]
    fn bos_is_added_only_when_asked() {
        let tok = tiny("smollm");
        assert_eq!(tok.encode("he", true).unwrap(), vec![id(&tok, "he")]);
        let tok = Tokenizer::from_gguf_vocab(GgufVocab { add_bos: true, ..tiny_vocab("smollm") }).unwrap();
        assert_eq!(tok.encode("he", true).unwrap(), vec![266, id(&tok, "he")]);
        assert_eq!(tok.encode("he", false).unwrap(), vec![id(&tok, "he")]);
        assert!(GgufVocab::default_add_bos("gpt2", Some("llama-bpe")));
        assert!(!GgufVocab::default_add_bos("gpt2", Some("smollm")));
    }

    #[test]
    fn digits_split_per_pre_tokenizer() {
        // smollm: every digit alone, so the "1 2" merge never applies.
        let tok = tiny("smollm");
        assert_eq!(tok.encode("12345", false).unwrap().len(), 5);
        // gpt-2: digits stay together and merge.
        let tok = tiny("gpt-2");
        assert_eq!(tok.encode("12345", false).unwrap()[0], id(&tok, "12"));
        assert_eq!(tok.encode("12345", false).unwrap().len(), 4);
    }

    #[test]
    fn pre_tokenizer_pieces() {
        let gpt2 = Some("gpt-2");
        assert_eq!(pieces(gpt2, "Hello world's  end!!"), ["Hello", " world", "'s", " ", " end", "!!"]);
        assert_eq!(pieces(gpt2, "a 12345\n\nb"), ["a", " 12345", "\n", "\n", "b"]);
        assert_eq!(pieces(Some("smollm"), "a 123!"), ["a", " ", "1", "2", "3", "!"]);
        assert_eq!(
            pieces(Some("llama-bpe"), "1234567 I'M ok\n\n x"),
            ["123", "456", "7", " I", "'M", " ok", "\n\n", " x"]
        );
        assert_eq!(pieces(Some("qwen2"), "1234 ab\n"), ["1", "2", "3", "4", " ab", "\n"]);
        assert_eq!(pieces(Some("gpt-4o"), "HelloWorld 12345"), ["Hello", "World", " ", "123", "45"]);
        assert_eq!(pieces(None, "a+b 1234"), ["a", "+", "b", " ", "123", "4"]);
        assert_eq!(pieces(Some("default"), "x:=y"), ["x", ":=", "y"]);
        assert!(pre_tokenizer_regexes(Some("llama-bpe")).unwrap().ignore_merges);
        // Every listed name builds.
        for name in known_pre_names() {
            build_pre_tokenizer(&pre_tokenizer_regexes(Some(name)).unwrap()).unwrap();
        }
    }

    #[test]
    fn stream_decoder_holds_partial_utf8() {
        let tok = tiny("gpt-2");
        // "é" is C3 A9: the merged "Ã©" token, or two byte tokens.
        let b = |byte: u8| id(&tok, &byte_to_char_table()[byte as usize].to_string());
        let mut d = tok.decoder();
        assert_eq!(d.push(b(0xC3)).unwrap(), None);
        assert_eq!(d.push(b(0xA9)).unwrap().as_deref(), Some("é"));
        // 😀 = F0 9F 98 80, split over four tokens, then an ASCII token completing nothing extra.
        assert_eq!(d.push(b(0xF0)).unwrap(), None);
        assert_eq!(d.push(b(0x9F)).unwrap(), None);
        assert_eq!(d.push(b(0x98)).unwrap(), None);
        assert_eq!(d.push(b(0x80)).unwrap().as_deref(), Some("😀"));
        assert_eq!(d.push(id(&tok, "Ġthe")).unwrap().as_deref(), Some(" the"));
        // A token that finishes one char and starts the next.
        assert_eq!(d.push(b(0xE6)).unwrap(), None);
        assert_eq!(d.push(b(0x97)).unwrap(), None);
        assert_eq!(d.push(b(0xA5)).unwrap().as_deref(), Some("日"));
        // Invalid bytes are replaced immediately, not held forever.
        assert_eq!(d.push(b(0xFF)).unwrap().as_deref(), Some("\u{FFFD}"));
        assert_eq!(d.push(b(0xE4)).unwrap(), None);
        assert_eq!(d.push(b(b'a')).unwrap().as_deref(), Some("\u{FFFD}a"));
        assert_eq!(d.push(b(0xE4)).unwrap(), None);
        assert_eq!(d.finish().as_deref(), Some("\u{FFFD}"));
        assert_eq!(d.finish(), None);
        assert!(matches!(d.push(100_000), Err(TokenizerError::InvalidTokenId { id: 100_000, .. })));
    }

    #[test]
    fn stream_matches_decode() {
        let tok = tiny("smollm");
        let text = "<|im_start|>user\nnaïve 😀 日本語 12 hello<|im_end|>";
        let ids = tok.encode(text, false).unwrap();
        for skip in [false, true] {
            let mut d = tok.stream_decoder(skip);
            let mut out = String::new();
            for &i in &ids {
                if let Some(s) = d.push(i).unwrap() {
                    assert!(!s.contains('\u{FFFD}'));
                    out.push_str(&s);
                }
            }
            assert_eq!(d.finish(), None);
            assert_eq!(out, tok.decode(&ids, skip).unwrap());
        }
    }

    #[test]
    fn decode_rejects_bad_ids() {
        let tok = tiny("gpt-2");
        let err = tok.decode(&[1, 270], false).unwrap_err();
        assert!(err.to_string().contains("token id 270 is out of range"), "{err}");
    }

    #[test]
    fn chat_template_renders_chatml() {
        let tok = tiny("smollm");
        let prompt = tok.apply_chat_template(&[ChatMessage::user("Hi there")], true).unwrap();
        assert_eq!(
            prompt,
            "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
        );
        let msgs = [ChatMessage::system("Be terse."), ChatMessage::user("2+2?"), ChatMessage::assistant("4")];
        let prompt = tok.apply_chat_template(&msgs, false).unwrap();
        assert_eq!(
            prompt,
            "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
        );
        let ids = tok.encode(&prompt, false).unwrap();
        assert_eq!(ids[0], id(&tok, "<|im_start|>"));
        assert_eq!(ids.iter().filter(|&&i| i == id(&tok, "<|im_end|>")).count(), 3);
    }

    #[test]
    fn chat_template_jinja_features() {
        // namespace, loop variables, python methods, bos/eos variables, trim/lstrip blocks, tojson.
        let template = "{{ bos_token }}{% set ns = namespace(n=0) %}
            {% for m in messages %}
                {% set ns.n = ns.n + 1 %}
                {% if m.content.strip().startswith(('A', 'B')) %}[{{ loop.index }}/{{ loop.length }}:{{ m.role.upper() }}]{% endif %}
                {% if true %}{{ m.content | trim }}{% endif %}{% if not loop.last %}|{% endif %}
            {% endfor %}{{ ns.n }}{{ eos_token }}{{ {'a': [1, 'x<y'], 'b': none} | tojson }}";
        let msgs = [ChatMessage::user("  Apple "), ChatMessage::assistant("cherry"), ChatMessage::user("Banana")];
        let out = render_chat_template(template, &msgs, false, "<s>", "</s>").unwrap();
        assert_eq!(out, "<s>[1/3:USER]Apple|cherry|[3/3:USER]Banana3</s>{\"a\": [1, \"x<y\"], \"b\": null}");

        let out = render_chat_template(
            "{% for k, v in {'x': 1}.items() %}{{ k }}={{ v }}{% endfor %} {{ 'a,b,c'.split(',') | join(' ') }} {{ 'x'.title() }}",
            &[],
            false,
            "",
            "",
        )
        .unwrap();
        assert_eq!(out, "x=1 a b c X");
        // Loop controls (transformers enables jinja2's loopcontrols extension).
        let out = render_chat_template(
            "{% for m in messages %}{% if loop.index0 == 0 %}{% continue %}{% endif %}{% if m.role == 'stop' %}{% break %}{% endif %}{{ m.content }}{% endfor %}",
            &[ChatMessage::user("a"), ChatMessage::user("b"), ChatMessage::new("stop", "c"), ChatMessage::user("d")],
            false,
            "",
            "",
        )
        .unwrap();
        assert_eq!(out, "b");
        let out = render_chat_template("{{ {'a': [1, {'b': 'c'}], 'e': []} | tojson(indent=2) }}", &[], false, "", "")
            .unwrap();
        assert_eq!(out, "{\n  \"a\": [\n    1,\n    {\n      \"b\": \"c\"\n    }\n  ],\n  \"e\": []\n}");
    }

    #[test]
    fn chat_template_errors() {
        let template = "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}ok";
        let err = render_chat_template(template, &[ChatMessage::system("s")], false, "", "").unwrap_err();
        assert!(matches!(err, TokenizerError::ChatTemplate(_)));
        assert!(err.to_string().contains("Conversation must start with user"), "{err}");
        let err = render_chat_template("{% for %}", &[], false, "", "").unwrap_err();
        assert!(matches!(err, TokenizerError::ChatTemplate(_)), "{err}");

        let tok = Tokenizer::from_gguf_vocab(GgufVocab { chat_template: None, ..tiny_vocab("smollm") }).unwrap();
        assert!(matches!(tok.apply_chat_template(&[], true), Err(TokenizerError::NoChatTemplate)));
    }

    #[test]
    fn load_errors_are_clear() {
        let err = Tokenizer::from_gguf_vocab(GgufVocab { model: "llama".into(), ..tiny_vocab("smollm") }).unwrap_err();
        assert!(err.to_string().contains("tokenizer.ggml.scores"), "{err}");
        let err = Tokenizer::from_gguf_vocab(GgufVocab { model: "rwkv".into(), ..tiny_vocab("smollm") }).unwrap_err();
        assert!(matches!(err, TokenizerError::Unsupported(_)) && err.to_string().contains("rwkv"), "{err}");
        let err = Tokenizer::from_gguf_vocab(tiny_vocab("mystery-pre")).unwrap_err();
        assert!(err.to_string().contains("'mystery-pre'"), "{err}");
        let err =
            Tokenizer::from_gguf_vocab(GgufVocab { token_types: vec![1; 3], ..tiny_vocab("smollm") }).unwrap_err();
        assert!(matches!(err, TokenizerError::InvalidVocab(_)), "{err}");
        let err = Tokenizer::from_gguf_vocab(GgufVocab { merges: vec!["nospace".into()], ..tiny_vocab("smollm") })
            .unwrap_err();
        assert!(err.to_string().contains("nospace"), "{err}");
        let err = Tokenizer::from_gguf_vocab(GgufVocab { eos: Some(5000), ..tiny_vocab("smollm") }).unwrap_err();
        assert!(err.to_string().contains("eos id 5000"), "{err}");
        let err = Tokenizer::from_tokenizer_json(Path::new("/nonexistent/tokenizer.json")).unwrap_err();
        assert!(matches!(err, TokenizerError::Io { .. }), "{err}");
    }

    #[test]
    fn strftime() {
        // 2024-07-26 13:05:09 UTC, a Friday.
        let t = 1_722_000_309;
        assert_eq!(strftime_utc("%d %b %Y", t).unwrap(), "26 Jul 2024");
        assert_eq!(strftime_utc("%A %B %e, %H:%M:%S %p %j %y %%", t).unwrap(), "Friday July 26, 13:25:09 PM 208 24 %");
        assert_eq!(strftime_utc("%Y-%m-%d %j %a", 951_782_400).unwrap(), "2000-02-29 060 Tue");
        assert_eq!(strftime_utc("%Y-%m-%d %j", 4_107_542_400).unwrap(), "2100-03-01 060");
        assert_eq!(strftime_utc("%Y-%m-%d %H:%M:%S", -94_608_001).unwrap(), "1967-01-01 23:59:59");
        assert!(strftime_utc("%Q", t).is_err());
    }

    /// A tokenizer.json written from the tiny vocab (the same model through the HF loader), with a
    /// tokenizer_config.json beside it.
    #[test]
    fn tokenizer_json_round_trip() {
        let v = tiny_vocab("smollm");
        let vocab: serde_json::Map<String, serde_json::Value> =
            v.tokens.iter().enumerate().map(|(i, t)| (t.clone(), serde_json::Value::from(i))).collect();
        let added: Vec<serde_json::Value> = v.tokens[266..]
            .iter()
            .enumerate()
            .map(|(i, t)| {
                serde_json::json!({"id": 266 + i, "content": t, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": t != "<tool>"})
            })
            .collect();
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "vocab": vocab, "merges": v.merges},
        });
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, serde_json::to_string(&json).unwrap()).unwrap();
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            serde_json::to_string(&serde_json::json!({
                "bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, "add_bos_token": true,
                "chat_template": CHATML}))
            .unwrap(),
        )
        .unwrap();

        let hf = Tokenizer::from_tokenizer_json(&path).unwrap();
        let gg = Tokenizer::from_gguf_vocab(v).unwrap();
        assert_eq!(hf.bos(), Some(267));
        assert_eq!(hf.eos(), Some(268));
        assert_eq!(hf.vocab_size(), 270);
        for text in ["hello the 12345", "<|im_start|>naïve 😀<|im_end|><tool>", " \n\t x"] {
            let ids = hf.encode(text, false).unwrap();
            assert_eq!(ids, gg.encode(text, false).unwrap(), "{text:?}");
            assert_eq!(hf.decode(&ids, false).unwrap(), text);
            assert_eq!(hf.decode(&ids, true).unwrap(), gg.decode(&ids, true).unwrap());
        }
        // add_bos_token with no post-processor: we prepend it.
        assert_eq!(hf.encode("he", true).unwrap(), vec![267, gg.token_to_id("he").unwrap()]);
        assert_eq!(
            hf.apply_chat_template(&[ChatMessage::user("x")], true).unwrap(),
            gg.apply_chat_template(&[ChatMessage::user("x")], true).unwrap()
        );
    }

    /// A SentencePiece-style tokenizer.json (Metaspace normalizer, byte fallback, Strip decoder): decoding
    /// is context dependent, so it goes through the HF decoder and the prefix-diff streaming path.
    #[test]
    fn tokenizer_json_sentencepiece_style() {
        let mut vocab = serde_json::Map::new();
        for (i, t) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
            vocab.insert(t.to_string(), i.into());
        }
        for b in 0..=255u32 {
            vocab.insert(format!("<0x{b:02X}>"), (3 + b).into());
        }
        for (i, t) in ["▁", "a", "b", "▁a", "▁b"].iter().enumerate() {
            vocab.insert(t.to_string(), (259 + i).into());
        }
        let added: Vec<serde_json::Value> = ["<unk>", "<s>", "</s>"]
            .iter()
            .enumerate()
            .map(|(i, t)| {
                serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        let bos = serde_json::json!({"SpecialToken": {"id": "<s>", "type_id": 0}});
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
            "pre_tokenizer": null,
            "post_processor": {"type": "TemplateProcessing",
                "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
            "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "vocab": vocab,
                "merges": ["▁ a", "▁ b"]},
        });
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, serde_json::to_string(&json).unwrap()).unwrap();
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": true}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("chat_template.jinja"), "{{ bos_token }}{{ messages[0].content }}").unwrap();

        let tok = Tokenizer::from_tokenizer_json(&path).unwrap();
        assert_eq!((tok.bos(), tok.eos()), (Some(1), Some(2)));
        let (c3, a9) = (3 + 0xC3, 3 + 0xA9);
        // The post-processor adds BOS; it must not be added twice.
        assert_eq!(tok.encode("a bé", true).unwrap(), vec![1, 262, 263, c3, a9]);
        let ids = tok.encode("a bé", false).unwrap();
        assert_eq!(ids, vec![262, 263, c3, a9]);
        assert_eq!(tok.decode(&ids, false).unwrap(), "a bé");
        assert_eq!(tok.decode(&[1, 262, 263], true).unwrap(), "a b");

        let mut d = tok.stream_decoder(true);
        let got: Vec<Option<String>> = [1, 262, 263, c3, a9, 262].iter().map(|&i| d.push(i).unwrap()).collect();
        let want = [None, Some("a"), Some(" b"), None, Some("é"), Some(" a")];
        assert_eq!(got, want.map(|s| s.map(String::from)));
        assert_eq!(d.push(c3).unwrap(), None);
        assert_eq!(d.finish().as_deref(), Some("\u{FFFD}"));
        assert_eq!(tok.apply_chat_template(&[ChatMessage::user("hi")], false).unwrap(), "<s>hi");
    }

    /// A hand-built SentencePiece vocabulary: merges follow the merged piece's score, not the order of
    /// the pieces; spaces become "▁" (one prepended with add_space_prefix); characters outside the
    /// vocabulary fall back to byte pieces; control tokens in the text are single ids; decoding
    /// concatenates the pieces' bytes.
    fn spm(add_space_prefix: bool) -> Tokenizer {
        // id: 0 <unk>, 1 <s>, 2 </s>, 3 ▁, 4 a, 5 b, 6 c, 7 ab, 8 bc, 9 ▁a, 10 ▁ab, 11 <0x21> ("!"),
        // 12 <0xC3>, 13 <0xA9> ("é" = C3 A9).
        let t = ["<unk>", "<s>", "</s>", "▁", "a", "b", "c", "ab", "bc", "▁a", "▁ab", "<0x21>", "<0xC3>", "<0xA9>"];
        let types = vec![2, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 6, 6, 6];
        // "bc" outscores "ab": in "abc" the merge b+c wins, leaving a + bc.
        let scores = vec![0.0, 0.0, 0.0, -1.0, -2.0, -2.0, -2.0, -5.0, -3.0, -4.0, -6.0, 0.0, 0.0, 0.0];
        Tokenizer::from_gguf_vocab(GgufVocab {
            model: "llama".into(),
            pre: None,
            tokens: t.iter().map(|s| s.to_string()).collect(),
            token_types: types,
            merges: Vec::new(),
            scores,
            add_space_prefix,
            bos: Some(1),
            eos: Some(2),
            add_bos: true,
            chat_template: None,
        })
        .unwrap()
    }

    #[test]
    fn sentencepiece_merges_by_score_with_byte_fallback() {
        let tok = spm(true);
        // "abc" → ▁abc: ▁+a (−4) … candidates ▁a(−4), ab(−5), bc(−3): bc first, then ▁a: [▁a, bc].
        assert_eq!(tok.encode("abc", false).unwrap(), vec![9, 8]);
        // "ab" → ▁ab: ▁a (−4) before ab (−5), then ▁a+b = ▁ab (−6).
        assert_eq!(tok.encode("ab", false).unwrap(), vec![10]);
        // BOS is added; "!" and "é" are not pieces: bytes; the space becomes ▁.
        assert_eq!(tok.encode("a !é", true).unwrap(), vec![1, 9, 3, 11, 12, 13]);
        assert_eq!(tok.encode("a</s>", false).unwrap(), vec![9, 2]);
        assert_eq!(tok.decode(&[9, 3, 11, 12, 13], false).unwrap(), " a !é");
        assert_eq!(tok.decode(&[1, 9, 2], true).unwrap(), " a");
        // Without the space prefix (Gemma): "ab" → a + b merge = ab.
        assert_eq!(spm(false).encode("ab", false).unwrap(), vec![7]);
        assert_eq!(spm(false).encode("ab ab", false).unwrap(), vec![7, 10]);
    }
}
