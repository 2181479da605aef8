//! GGUF (llama.cpp's model format) reader and writer, hardened against hostile files.
//!
//! Layout (versions 2 and 3, little-endian):
//!
//! ```text
//! "GGUF" | u32 version | u64 tensor_count | u64 kv_count
//! kv_count × (string key | u32 value type | value)
//! tensor_count × (string name | u32 n_dims | n_dims × u64 ne | u32 ggml type | u64 offset)
//! padding to a multiple of `general.alignment` (default 32), counted from the start of the file
//! tensor data; each tensor at `data_offset + offset`, `offset` a multiple of the alignment
//! ```
//!
//! A string is a u64 byte length followed by UTF-8 bytes (no terminator). An array value is a u32
//! element type, a u64 count and the elements; arrays may nest. `ne[0]` is the fastest-varying
//! dimension (the row length), so Kiln's row-major shape is `ne` reversed.
//!
//! The reader validates everything before trusting it: it never panics on any input, never
//! allocates in proportion to a count it has not checked against the bytes that remain, caps array
//! nesting at [`MAX_ARRAY_DEPTH`], and checks every tensor's shape, type, alignment and data range
//! at parse time, so [`GgufFile::tensor_data`] is a plain zero-copy slice.

use bytes::Bytes;
use kiln_ir::{DType, TensorData};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// The version [`GgufWriter`] writes.
pub const GGUF_VERSION: u32 = 3;
/// Data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// The metadata key that overrides the data alignment (a u32 power of two).
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// Deepest nesting of array values accepted (an array of scalars has depth 1).
pub const MAX_ARRAY_DEPTH: usize = 8;
/// Most dimensions a tensor may have (ggml's `GGML_MAX_DIMS`).
pub const MAX_DIMS: usize = 4;
/// Element counts must stay below this.
const MAX_ELEMENTS: u64 = 1 << 62;
/// Smallest possible encoded metadata entry: key length, value type, a 1-byte value.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
/// Smallest possible encoded tensor info: name length, n_dims, one ne, type, offset.
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 8 + 4 + 8;
/// How a file without a path is named in errors.
const IN_MEMORY: &str = "<in-memory GGUF>";

// GGUF metadata value types.
const T_U8: u32 = 0;
const T_I8: u32 = 1;
const T_U16: u32 = 2;
const T_I16: u32 = 3;
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const T_U64: u32 = 10;
const T_I64: u32 = 11;
const T_F64: u32 = 12;

/// Everything that can go wrong reading or writing GGUF. `file` is the path, or
/// `<in-memory GGUF>` for [`GgufFile::from_bytes`].
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: not a GGUF file: expected magic \"GGUF\" at byte offset 0, found {found}")]
    BadMagic { file: String, found: String },
    #[error("{file}: {message}")]
    UnsupportedVersion { file: String, version: u32, message: String },
    #[error(
        "{file}: truncated GGUF: needed {needed} byte(s) at byte offset {offset} to read {what}, \
         but the file is only {file_len} bytes long"
    )]
    Truncated { file: String, offset: u64, needed: u64, file_len: u64, what: String },
    #[error("{file}: malformed GGUF at byte offset {offset}: {message}")]
    Malformed { file: String, offset: u64, message: String },
    #[error("{file}: tensor '{tensor}' {message}")]
    InvalidTensor { file: String, tensor: String, message: String },
    #[error("{file}: tensor '{tensor}' has ggml type {id} ({ggml_name}), which Kiln does not support")]
    UnsupportedDType { file: String, tensor: String, id: u32, ggml_name: &'static str },
    #[error("{file}: metadata key '{key}' is missing")]
    MissingKey { file: String, key: String },
    #[error("{file}: metadata key '{key}' is {found}, expected {expected}")]
    WrongType { file: String, key: String, expected: &'static str, found: String },
    #[error("GGUF writer: {0}")]
    Writer(String),
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    /// Any integer type holding a non-negative value.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer type holding a value that fits in i64.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::I8(v) => Some(v.into()),
            GgufValue::I16(v) => Some(v.into()),
            GgufValue::I32(v) => Some(v.into()),
            GgufValue::I64(v) => Some(v),
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => i64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any number (integer or float; not bool).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            GgufValue::U64(v) => Some(v as f64),
            GgufValue::I64(v) => Some(v as f64),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }

    pub fn type_name(&self) -> &'static str {
        value_type_name(self.type_id())
    }

    /// GGUF's value type id.
    fn type_id(&self) -> u32 {
        match self {
            GgufValue::U8(_) => T_U8,
            GgufValue::I8(_) => T_I8,
            GgufValue::U16(_) => T_U16,
            GgufValue::I16(_) => T_I16,
            GgufValue::U32(_) => T_U32,
            GgufValue::I32(_) => T_I32,
            GgufValue::F32(_) => T_F32,
            GgufValue::Bool(_) => T_BOOL,
            GgufValue::String(_) => T_STRING,
            GgufValue::Array(_) => T_ARRAY,
            GgufValue::U64(_) => T_U64,
            GgufValue::I64(_) => T_I64,
            GgufValue::F64(_) => T_F64,
        }
    }

    /// "u32", "array of string", ... for error messages.
    fn describe(&self) -> String {
        match self {
            GgufValue::Array(a) => match a.first() {
                Some(first) => format!("an array of {} ({} elements)", first.type_name(), a.len()),
                None => "an empty array".to_string(),
            },
            v => {
                let name = v.type_name();
                let article = if name.starts_with(['i', 'f']) { "an" } else { "a" };
                format!("{article} {name}")
            }
        }
    }
}

fn value_type_name(ty: u32) -> &'static str {
    match ty {
        T_U8 => "u8",
        T_I8 => "i8",
        T_U16 => "u16",
        T_I16 => "i16",
        T_U32 => "u32",
        T_I32 => "i32",
        T_F32 => "f32",
        T_BOOL => "bool",
        T_STRING => "string",
        T_ARRAY => "array",
        T_U64 => "u64",
        T_I64 => "i64",
        T_F64 => "f64",
        _ => "unknown",
    }
}

/// Encoded size of a fixed-size value type.
fn fixed_size(ty: u32) -> Option<usize> {
    match ty {
        T_U8 | T_I8 | T_BOOL => Some(1),
        T_U16 | T_I16 => Some(2),
        T_U32 | T_I32 | T_F32 => Some(4),
        T_U64 | T_I64 | T_F64 => Some(8),
        _ => None,
    }
}

/// Fewest bytes any value of type `ty` can take; `None` for an unknown type.
fn min_encoded_size(ty: u32) -> Option<u64> {
    match ty {
        T_STRING => Some(8),
        T_ARRAY => Some(4 + 8),
        _ => fixed_size(ty).map(|n| n as u64),
    }
}

/// Decodes a fixed-size value from exactly `fixed_size(ty)` bytes. `Err(b)` is a bool byte `b`
/// that is neither 0 nor 1.
fn decode_fixed(ty: u32, b: &[u8]) -> Result<GgufValue, u8> {
    let a2 = || [b[0], b[1]];
    let a4 = || [b[0], b[1], b[2], b[3]];
    let a8 = || [b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]];
    Ok(match ty {
        T_U8 => GgufValue::U8(b[0]),
        T_I8 => GgufValue::I8(b[0] as i8),
        T_BOOL => match b[0] {
            0 => GgufValue::Bool(false),
            1 => GgufValue::Bool(true),
            other => return Err(other),
        },
        T_U16 => GgufValue::U16(u16::from_le_bytes(a2())),
        T_I16 => GgufValue::I16(i16::from_le_bytes(a2())),
        T_U32 => GgufValue::U32(u32::from_le_bytes(a4())),
        T_I32 => GgufValue::I32(i32::from_le_bytes(a4())),
        T_F32 => GgufValue::F32(f32::from_le_bytes(a4())),
        T_U64 => GgufValue::U64(u64::from_le_bytes(a8())),
        T_I64 => GgufValue::I64(i64::from_le_bytes(a8())),
        T_F64 => GgufValue::F64(f64::from_le_bytes(a8())),
        // Callers only pass types with a fixed size; treat anything else as a bad byte.
        _ => return Err(b.first().copied().unwrap_or(0)),
    })
}

/// One tensor's header entry. `ne` is in GGUF order (`ne[0]` = row length); `offset` is relative to
/// [`GgufFile::data_offset`]; `n_bytes` is the size of its data.
#[derive(Clone, Debug)]
pub struct GgufTensorInfo {
    pub name: String,
    pub ne: Vec<u64>,
    pub dtype: DType,
    pub offset: u64,
    pub n_bytes: u64,
}

impl GgufTensorInfo {
    /// Row-major shape, outermost first (`ne` reversed).
    pub fn shape(&self) -> Vec<usize> {
        self.ne.iter().rev().map(|&n| usize::try_from(n).unwrap_or(usize::MAX)).collect()
    }

    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.ne.iter().fold(1u64, |acc, &n| acc.saturating_mul(n))
    }
}

/// A parsed GGUF file. Tensor data stays in the (usually memory-mapped) file bytes.
#[derive(Clone)]
pub struct GgufFile {
    pub path: Option<PathBuf>,
    pub version: u32,
    pub alignment: u64,
    /// Absolute byte offset of the tensor data section.
    pub data_offset: u64,
    /// Metadata in file order.
    pub metadata: Vec<(String, GgufValue)>,
    /// Tensor infos in file order.
    pub tensors: Vec<GgufTensorInfo>,
    data: Bytes,
    tensor_index: HashMap<String, usize>,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .field("file_len", &self.data.len())
            .field("metadata_keys", &self.metadata.iter().map(|(k, _)| k).collect::<Vec<_>>())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Memory-maps and parses `path`. Tensor data is shared zero-copy with the mapping.
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        let io = |source| GgufError::Io { path: path.to_path_buf(), source };
        let file = std::fs::File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let data = if len == 0 {
            Bytes::new()
        } else {
            // SAFETY: the mapping is read-only. As with every mmap-based loader, the file must not be
            // truncated or rewritten by another process while the returned `GgufFile` (or any `Bytes`
            // sliced from it) is alive.
            let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
            Bytes::from_owner(mmap)
        };
        parse(data, Some(path.to_path_buf()))
    }

    /// Parses a GGUF file held in memory.
    pub fn from_bytes(data: Bytes) -> Result<GgufFile, GgufError> {
        parse(data, None)
    }

    /// The file's path for error messages.
    fn file_name(&self) -> String {
        display_name(self.path.as_deref())
    }

    /// Total size of the file in bytes.
    pub fn file_len(&self) -> u64 {
        self.data.len() as u64
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    fn require(&self, key: &str) -> Result<&GgufValue, GgufError> {
        self.get(key).ok_or_else(|| GgufError::MissingKey { file: self.file_name(), key: key.to_string() })
    }

    fn wrong_type(&self, key: &str, expected: &'static str, found: String) -> GgufError {
        GgufError::WrongType { file: self.file_name(), key: key.to_string(), expected, found }
    }

    /// A non-negative integer of any integer type.
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        let v = self.require(key)?;
        v.as_u64().ok_or_else(|| self.wrong_type(key, "a non-negative integer", describe_found(v)))
    }

    /// A number of any numeric type.
    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        let v = self.require(key)?;
        v.as_f64().ok_or_else(|| self.wrong_type(key, "a number", describe_found(v)))
    }

    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        let v = self.require(key)?;
        v.as_str().ok_or_else(|| self.wrong_type(key, "a string", describe_found(v)))
    }

    pub fn get_bool(&self, key: &str) -> Result<bool, GgufError> {
        let v = self.require(key)?;
        v.as_bool().ok_or_else(|| self.wrong_type(key, "a bool", describe_found(v)))
    }

    fn get_array(&self, key: &str, expected: &'static str) -> Result<&[GgufValue], GgufError> {
        let v = self.require(key)?;
        v.as_array().ok_or_else(|| self.wrong_type(key, expected, describe_found(v)))
    }

    /// An array of strings (e.g. `tokenizer.ggml.tokens`).
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        const EXPECTED: &str = "an array of strings";
        let a = self.get_array(key, EXPECTED)?;
        a.iter()
            .enumerate()
            .map(|(i, e)| e.as_str().ok_or_else(|| self.wrong_type(key, EXPECTED, element_found(i, e))))
            .collect()
    }

    /// An array of integers that fit in i64 (e.g. `tokenizer.ggml.token_type`).
    pub fn get_i64_array(&self, key: &str) -> Result<Vec<i64>, GgufError> {
        const EXPECTED: &str = "an array of integers";
        let a = self.get_array(key, EXPECTED)?;
        a.iter()
            .enumerate()
            .map(|(i, e)| e.as_i64().ok_or_else(|| self.wrong_type(key, EXPECTED, element_found(i, e))))
            .collect()
    }

    /// An array of numbers, as f32 (e.g. `tokenizer.ggml.scores`).
    pub fn get_f32_array(&self, key: &str) -> Result<Vec<f32>, GgufError> {
        const EXPECTED: &str = "an array of numbers";
        let a = self.get_array(key, EXPECTED)?;
        a.iter()
            .enumerate()
            .map(|(i, e)| match e {
                GgufValue::F32(v) => Ok(*v),
                _ => e.as_f64().map(|v| v as f32).ok_or_else(|| self.wrong_type(key, EXPECTED, element_found(i, e))),
            })
            .collect()
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        // `tensors` is public and may have been edited; fall back to a scan when the index is stale.
        match self.tensor_index.get(name).and_then(|&i| self.tensors.get(i)) {
            Some(t) if t.name == name => Some(t),
            _ => self.tensors.iter().find(|t| t.name == name),
        }
    }

    /// The tensor's bytes, zero-copy. Ranges of infos parsed from this file were validated at parse
    /// time; an info whose range does not lie within this file yields an empty `Bytes`.
    pub fn tensor_data(&self, info: &GgufTensorInfo) -> Bytes {
        let start = self.data_offset as u128 + info.offset as u128;
        let end = start + info.n_bytes as u128;
        if end <= self.data.len() as u128 {
            self.data.slice(start as usize..end as usize)
        } else {
            Bytes::new()
        }
    }

    /// The named tensor as Kiln weight data (dtype, row-major shape, zero-copy bytes).
    pub fn tensor_data_owned(&self, name: &str) -> Option<TensorData> {
        let info = self.tensor(name)?;
        Some(TensorData { dtype: info.dtype, shape: info.shape(), bytes: self.tensor_data(info) })
    }
}

fn describe_found(v: &GgufValue) -> String {
    v.describe()
}

fn element_found(i: usize, e: &GgufValue) -> String {
    format!("an array whose element {i} is {}", e.describe())
}

fn display_name(path: Option<&Path>) -> String {
    path.map_or_else(|| IN_MEMORY.to_string(), |p| p.display().to_string())
}

/// At most the first 64 bytes, lossily decoded, for showing a bad string.
fn lossy_prefix(b: &[u8]) -> String {
    let shown = &b[..b.len().min(64)];
    let mut s = String::from_utf8_lossy(shown).into_owned();
    if b.len() > shown.len() {
        s.push('…');
    }
    s
}

/// Bounds-checked little-endian reading over the file bytes.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    file: &'a str,
}

type What<'w> = &'w dyn Fn() -> String;

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn take(&mut self, n: u64, what: What) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() as u64 {
            return Err(GgufError::Truncated {
                file: self.file.to_string(),
                offset: self.pos as u64,
                needed: n,
                file_len: self.buf.len() as u64,
                what: what(),
            });
        }
        let start = self.pos;
        self.pos += n as usize;
        Ok(&self.buf[start..self.pos])
    }

    fn bytes<const N: usize>(&mut self, what: What) -> Result<[u8; N], GgufError> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: What) -> Result<u32, GgufError> {
        self.bytes(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: What) -> Result<u64, GgufError> {
        self.bytes(what).map(u64::from_le_bytes)
    }

    fn malformed(&self, offset: usize, message: String) -> GgufError {
        GgufError::Malformed { file: self.file.to_string(), offset: offset as u64, message }
    }

    fn string(&mut self, what: What) -> Result<String, GgufError> {
        let start = self.pos;
        let len = self.u64(&|| format!("the length of {}", what()))?;
        let b = self.take(len, what)?;
        match std::str::from_utf8(b) {
            Ok(s) => Ok(s.to_owned()),
            Err(e) => Err(self.malformed(
                start,
                format!(
                    "{} is not valid UTF-8 (invalid byte at index {}): \"{}\"",
                    what(),
                    e.valid_up_to(),
                    lossy_prefix(b)
                ),
            )),
        }
    }

    /// Reads a value of type `ty` belonging to metadata key `key`; `depth` is the number of arrays
    /// enclosing it.
    fn value(&mut self, ty: u32, depth: usize, key: &str) -> Result<GgufValue, GgufError> {
        let at = self.pos;
        if let Some(size) = fixed_size(ty) {
            let b = self.take(size as u64, &|| format!("a {} value of key '{key}'", value_type_name(ty)))?;
            return decode_fixed(ty, b).map_err(|bad| {
                self.malformed(at, format!("key '{key}' has bool value {bad}, which is neither 0 nor 1"))
            });
        }
        match ty {
            T_STRING => self.string(&|| format!("a string value of key '{key}'")).map(GgufValue::String),
            T_ARRAY => self.array(depth, key),
            _ => Err(self.malformed(
                at.saturating_sub(4),
                format!("key '{key}' has unknown value type {ty} (GGUF types are 0 to 12)"),
            )),
        }
    }

    fn array(&mut self, depth: usize, key: &str) -> Result<GgufValue, GgufError> {
        let at = self.pos;
        if depth >= MAX_ARRAY_DEPTH {
            return Err(self.malformed(at, format!("key '{key}' has arrays nested more than {MAX_ARRAY_DEPTH} deep")));
        }
        let elem_ty = self.u32(&|| format!("the element type of an array in key '{key}'"))?;
        let count = self.u64(&|| format!("the element count of an array in key '{key}'"))?;
        let Some(min) = min_encoded_size(elem_ty) else {
            return Err(self.malformed(
                at,
                format!("key '{key}' has an array of unknown element type {elem_ty} (GGUF types are 0 to 12)"),
            ));
        };
        let needed = count as u128 * min as u128;
        if needed > self.remaining() as u128 {
            return Err(self.malformed(
                at,
                format!(
                    "key '{key}' has an array of {count} {} elements, which needs at least {needed} bytes, \
                     but only {} bytes remain in the file (truncated or corrupt)",
                    value_type_name(elem_ty),
                    self.remaining()
                ),
            ));
        }
        // `count` elements take at least `count` bytes, which the check above found in the file.
        let mut out = Vec::with_capacity(count as usize);
        if let Some(size) = fixed_size(elem_ty) {
            let start = self.pos;
            let raw = self.take(needed as u64, &|| format!("the elements of an array in key '{key}'"))?;
            for (i, chunk) in raw.chunks_exact(size).enumerate() {
                let v = decode_fixed(elem_ty, chunk).map_err(|bad| {
                    self.malformed(
                        start + i * size,
                        format!("key '{key}' has bool value {bad} at array index {i}, which is neither 0 nor 1"),
                    )
                })?;
                out.push(v);
            }
        } else {
            for _ in 0..count {
                out.push(self.value(elem_ty, depth + 1, key)?);
            }
        }
        Ok(GgufValue::Array(out))
    }
}

fn parse(data: Bytes, path: Option<PathBuf>) -> Result<GgufFile, GgufError> {
    let file = display_name(path.as_deref());
    let buf: &[u8] = &data;
    let mut c = Cursor { buf, pos: 0, file: &file };

    // Header.
    let magic: [u8; 4] = c.bytes(&|| "the magic number \"GGUF\"".to_string())?;
    if magic != GGUF_MAGIC {
        let hint = match &magic {
            b"lmgg" | b"fmgg" | b"tjgg" => " (an old GGML/GGMF/GGJT model; convert it to GGUF)",
            _ => "",
        };
        return Err(GgufError::BadMagic { file, found: format!("{:?}{hint}", lossy_prefix(&magic)) });
    }
    let version = c.u32(&|| "the version".to_string())?;
    match version {
        2 | 3 => {}
        1 => {
            return Err(GgufError::UnsupportedVersion {
                message: "GGUF version 1 (the 2023 draft with 32-bit counts) is not supported; \
                          re-convert the model with a current llama.cpp"
                    .to_string(),
                file,
                version,
            })
        }
        v if (1..=3).contains(&v.swap_bytes()) => {
            return Err(GgufError::UnsupportedVersion {
                message: format!(
                    "version field {v:#010x} looks like a big-endian GGUF (version {}); only \
                     little-endian GGUF files are supported",
                    v.swap_bytes()
                ),
                file,
                version,
            })
        }
        v => {
            return Err(GgufError::UnsupportedVersion {
                message: format!("GGUF version {v} is not supported (Kiln reads versions 2 and 3)"),
                file,
                version,
            })
        }
    }
    let tensor_count = c.u64(&|| "the tensor count".to_string())?;
    let kv_count = c.u64(&|| "the metadata kv count".to_string())?;
    let rest = c.remaining() as u128;
    if kv_count as u128 * MIN_KV_BYTES as u128 > rest {
        return Err(c.malformed(
            16,
            format!(
                "metadata kv count {kv_count} is impossible: each entry takes at least {MIN_KV_BYTES} bytes \
                 and only {rest} bytes follow the header (truncated or corrupt)"
            ),
        ));
    }
    if tensor_count as u128 * MIN_TENSOR_INFO_BYTES as u128 > rest {
        return Err(c.malformed(
            8,
            format!(
                "tensor count {tensor_count} is impossible: each tensor info takes at least \
                 {MIN_TENSOR_INFO_BYTES} bytes and only {rest} bytes follow the header (truncated or corrupt)"
            ),
        ));
    }

    // Metadata.
    let mut metadata = Vec::with_capacity(kv_count as usize);
    let mut keys = HashSet::with_capacity(kv_count as usize);
    let mut alignment_at = 0;
    for i in 0..kv_count {
        let at = c.pos;
        let key = c.string(&|| format!("the key of metadata entry #{i}"))?;
        if !keys.insert(key.clone()) {
            return Err(c.malformed(at, format!("duplicate metadata key '{key}' (entry #{i})")));
        }
        if key == ALIGNMENT_KEY {
            alignment_at = at;
        }
        let ty = c.u32(&|| format!("the value type of key '{key}'"))?;
        let value = c.value(ty, 0, &key)?;
        metadata.push((key, value));
    }

    let alignment = match metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
        None => DEFAULT_ALIGNMENT,
        Some((_, v)) => {
            let Some(a) = v.as_u64() else {
                return Err(GgufError::WrongType {
                    file,
                    key: ALIGNMENT_KEY.to_string(),
                    expected: "a u32 power of two",
                    found: v.describe(),
                });
            };
            if a == 0 || !a.is_power_of_two() || a > u64::from(u32::MAX) {
                return Err(GgufError::Malformed {
                    file,
                    offset: alignment_at as u64,
                    message: format!("metadata key '{ALIGNMENT_KEY}' = {a} is not a nonzero power of two u32"),
                });
            }
            a
        }
    };

    // Tensor infos.
    let mut tensors: Vec<GgufTensorInfo> = Vec::with_capacity(tensor_count as usize);
    let mut tensor_index = HashMap::with_capacity(tensor_count as usize);
    for i in 0..tensor_count {
        let at = c.pos;
        let name = c.string(&|| format!("the name of tensor #{i}"))?;
        let bad = |message: String| GgufError::InvalidTensor { file: file.clone(), tensor: name.clone(), message };
        if tensor_index.contains_key(&name) {
            return Err(bad(format!("appears twice (again as tensor #{i} at byte offset {at})")));
        }
        let dims_at = c.pos;
        let n_dims = c.u32(&|| format!("n_dims of tensor '{name}'"))?;
        if n_dims == 0 || n_dims as usize > MAX_DIMS {
            return Err(bad(format!("has n_dims = {n_dims} (at byte offset {dims_at}); GGUF allows 1 to {MAX_DIMS}")));
        }
        let mut ne = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            ne.push(c.u64(&|| format!("ne[{d}] of tensor '{name}'"))?);
        }
        let type_id = c.u32(&|| format!("the ggml type of tensor '{name}'"))?;
        let offset = c.u64(&|| format!("the data offset of tensor '{name}'"))?;

        if let Some(d) = ne.iter().position(|&n| n == 0) {
            return Err(bad(format!("has ne[{d}] = 0 (ne = {ne:?}); empty tensors are not supported")));
        }
        let numel = ne.iter().try_fold(1u64, |acc, &n| acc.checked_mul(n)).filter(|&n| n < MAX_ELEMENTS);
        if numel.is_none() {
            return Err(bad(format!("has ne = {ne:?}, whose element count overflows (must be below 2^62)")));
        }
        let Some(dtype) = DType::from_ggml_id(type_id) else {
            return Err(GgufError::UnsupportedDType {
                file: file.clone(),
                tensor: name.clone(),
                id: type_id,
                ggml_name: DType::ggml_name_of_unsupported(type_id),
            });
        };
        // Every ne is below 2^62, so it fits in usize on 64-bit targets; checked anyway.
        let row = usize::try_from(ne[0]).ok();
        let rows = ne[1..].iter().try_fold(1u64, |acc, &n| acc.checked_mul(n));
        let n_bytes = row.and_then(|r| dtype.row_bytes(r)).and_then(|rb| (rb as u64).checked_mul(rows?));
        let Some(n_bytes) = n_bytes else {
            if ne[0] % dtype.block_size() as u64 != 0 {
                return Err(bad(format!(
                    "has ne[0] = {} (its row length), which is not a multiple of the {dtype} block size {}",
                    ne[0],
                    dtype.block_size()
                )));
            }
            return Err(bad(format!("has ne = {ne:?}, whose {dtype} byte size overflows")));
        };
        if offset % alignment != 0 {
            return Err(bad(format!("has data offset {offset}, which is not a multiple of the alignment {alignment}")));
        }
        tensor_index.insert(name.clone(), tensors.len());
        tensors.push(GgufTensorInfo { name, ne, dtype, offset, n_bytes });
    }

    // Data section: the first multiple of the alignment after the tensor infos (from file start).
    let header_end = c.pos as u64;
    let data_offset = header_end.div_ceil(alignment) * alignment;
    let file_len = buf.len() as u128;
    for t in &tensors {
        let start = data_offset as u128 + t.offset as u128;
        let end = start + t.n_bytes as u128;
        if end > file_len {
            return Err(GgufError::InvalidTensor {
                file,
                tensor: t.name.clone(),
                message: format!(
                    "has data at bytes [{start}, {end}) (offset {} in the data section at byte {data_offset}, \
                     {} bytes), which extends past the end of the file ({file_len} bytes)",
                    t.offset, t.n_bytes
                ),
            });
        }
    }

    Ok(GgufFile { path, version, alignment, data_offset, metadata, tensors, data, tensor_index })
}

/// Builds a GGUF v3 file. Output is deterministic: metadata and tensors in insertion order, each
/// tensor's data aligned to `general.alignment` (a `U32`; 32 when absent) with zero padding.
#[derive(Clone, Debug, Default)]
pub struct GgufWriter {
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<(String, TensorData)>,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a metadata entry; adding an existing key replaces its value in place. Arrays must be
    /// homogeneous and nest at most [`MAX_ARRAY_DEPTH`] deep, and `general.alignment` must be a
    /// `U32` power of two; otherwise [`GgufWriter::write`] and [`GgufWriter::try_to_bytes`] fail.
    pub fn add_metadata(&mut self, key: impl Into<String>, value: GgufValue) {
        let key = key.into();
        match self.metadata.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.metadata.push((key, value)),
        }
    }

    /// Adds a tensor (shape row-major, 1 to 4 dims, no zero dims; bytes exactly its size).
    pub fn add_tensor(&mut self, name: impl Into<String>, data: &TensorData) -> Result<(), GgufError> {
        let name = name.into();
        let bad = |msg: String| Err(GgufError::Writer(format!("tensor '{name}' {msg}")));
        if self.tensors.iter().any(|(n, _)| *n == name) {
            return bad("was added twice".to_string());
        }
        let shape = &data.shape;
        if shape.is_empty() || shape.len() > MAX_DIMS {
            return bad(format!("has shape {shape:?}; GGUF tensors have 1 to {MAX_DIMS} dimensions"));
        }
        if shape.contains(&0) {
            return bad(format!("has shape {shape:?} with a zero dimension"));
        }
        let numel = shape.iter().try_fold(1u64, |acc, &n| acc.checked_mul(n as u64));
        if numel.is_none_or(|n| n >= MAX_ELEMENTS) {
            return bad(format!("has shape {shape:?}, whose element count overflows"));
        }
        let row = shape[shape.len() - 1];
        let rows: usize = shape[..shape.len() - 1].iter().product();
        let Some(expected) = data.dtype.row_bytes(row).and_then(|rb| rb.checked_mul(rows)) else {
            return bad(format!(
                "has row length {row}, which is not a multiple of the {} block size {}",
                data.dtype,
                data.dtype.block_size()
            ));
        };
        if data.bytes.len() != expected {
            return bad(format!(
                "has {} bytes, but a {} tensor of shape {shape:?} takes {expected}",
                data.bytes.len(),
                data.dtype
            ));
        }
        self.tensors.push((name, data.clone()));
        Ok(())
    }

    fn alignment(&self) -> Result<u64, GgufError> {
        match self.metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
            None => Ok(DEFAULT_ALIGNMENT),
            Some((_, GgufValue::U32(a))) if a.is_power_of_two() => Ok(u64::from(*a)),
            Some((_, v)) => {
                Err(GgufError::Writer(format!("metadata key '{ALIGNMENT_KEY}' must be a u32 power of two, got {v:?}")))
            }
        }
    }

    fn check_value(key: &str, v: &GgufValue, depth: usize) -> Result<(), GgufError> {
        let GgufValue::Array(a) = v else {
            return Ok(());
        };
        if depth >= MAX_ARRAY_DEPTH {
            return Err(GgufError::Writer(format!(
                "metadata key '{key}' nests arrays more than {MAX_ARRAY_DEPTH} deep"
            )));
        }
        if let Some(first) = a.first() {
            if let Some((i, e)) = a.iter().enumerate().find(|(_, e)| e.type_id() != first.type_id()) {
                return Err(GgufError::Writer(format!(
                    "metadata key '{key}' is an array mixing {} and {} (element {i}); GGUF arrays are homogeneous",
                    first.type_name(),
                    e.type_name()
                )));
            }
        }
        a.iter().try_for_each(|e| Self::check_value(key, e, depth + 1))
    }

    /// The header (everything before the data section, padding included) and each tensor's
    /// data offset.
    fn header(&self) -> Result<(Vec<u8>, u64), GgufError> {
        let alignment = self.alignment()?;
        for (k, v) in &self.metadata {
            Self::check_value(k, v, 0)?;
        }
        let mut out = Vec::new();
        out.extend_from_slice(&GGUF_MAGIC);
        out.extend_from_slice(&GGUF_VERSION.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_string(&mut out, k);
            out.extend_from_slice(&v.type_id().to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0u64;
        for (name, t) in &self.tensors {
            put_string(&mut out, name);
            out.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
            for &n in t.shape.iter().rev() {
                out.extend_from_slice(&(n as u64).to_le_bytes());
            }
            out.extend_from_slice(&t.dtype.ggml_id().to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offset += (t.bytes.len() as u64).div_ceil(alignment) * alignment;
        }
        let padded = (out.len() as u64).div_ceil(alignment) * alignment;
        out.resize(padded as usize, 0);
        Ok((out, alignment))
    }

    /// Writes the file to `w`.
    pub fn write_to<W: Write>(&self, w: &mut W) -> Result<(), std::io::Error> {
        let (header, alignment) =
            self.header().map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        w.write_all(&header)?;
        let zeros = vec![0u8; alignment as usize];
        for (_, t) in &self.tensors {
            w.write_all(&t.bytes)?;
            let pad = (t.bytes.len() as u64).div_ceil(alignment) * alignment - t.bytes.len() as u64;
            w.write_all(&zeros[..pad as usize])?;
        }
        Ok(())
    }

    /// The file's bytes, or an error for invalid metadata (see [`GgufWriter::add_metadata`]).
    pub fn try_to_bytes(&self) -> Result<Vec<u8>, GgufError> {
        self.header()?;
        let mut out = Vec::new();
        self.write_to(&mut out).map_err(|e| GgufError::Writer(e.to_string()))?;
        Ok(out)
    }

    /// The file's bytes.
    ///
    /// # Panics
    /// If the metadata cannot be encoded (see [`GgufWriter::add_metadata`]); use
    /// [`GgufWriter::try_to_bytes`] to get that as an error.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.try_to_bytes().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Writes the file to `path`.
    pub fn write(&self, path: &Path) -> Result<(), GgufError> {
        self.header()?;
        let io = |source| GgufError::Io { path: path.to_path_buf(), source };
        let file = std::fs::File::create(path).map_err(io)?;
        let mut w = std::io::BufWriter::new(file);
        self.write_to(&mut w).map_err(io)?;
        w.flush().map_err(io)
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Writes a value's payload (without its type id).
fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
    match v {
        GgufValue::U8(x) => out.push(*x),
        GgufValue::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(u8::from(*x)),
        GgufValue::String(s) => put_string(out, s),
        GgufValue::Array(a) => {
            // An empty array's element type is arbitrary; u8 is what readers expect least of.
            let elem_ty = a.first().map_or(T_U8, GgufValue::type_id);
            out.extend_from_slice(&elem_ty.to_le_bytes());
            out.extend_from_slice(&(a.len() as u64).to_le_bytes());
            for e in a {
                put_value(out, e);
            }
        }
        GgufValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn pattern(n: usize, seed: u8) -> Bytes {
        Bytes::from((0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect::<Vec<_>>())
    }

    fn tensor(dtype: DType, shape: &[usize], seed: u8) -> TensorData {
        let numel: usize = shape.iter().product();
        let n = dtype.row_bytes(*shape.last().unwrap()).unwrap() * numel / shape.last().unwrap();
        TensorData { dtype, shape: shape.to_vec(), bytes: pattern(n, seed) }
    }

    fn sample_metadata() -> Vec<(String, GgufValue)> {
        use GgufValue::*;
        vec![
            ("general.architecture".into(), String("llama".into())),
            ("test.u8".into(), U8(200)),
            ("test.i8".into(), I8(-5)),
            ("test.u16".into(), U16(65000)),
            ("test.i16".into(), I16(-30000)),
            ("test.u32".into(), U32(4_000_000_000)),
            ("test.i32".into(), I32(-2_000_000_000)),
            ("test.f32".into(), F32(1.5e-5)),
            ("test.bool".into(), Bool(true)),
            ("test.u64".into(), U64(u64::MAX)),
            ("test.i64".into(), I64(i64::MIN)),
            ("test.f64".into(), F64(-0.1)),
            ("test.unicode".into(), String("wörld ✓ 日本".into())),
            ("test.strings".into(), Array(vec![String("hello".into()), String("".into()), String("ü".into())])),
            ("test.bools".into(), Array(vec![Bool(true), Bool(false), Bool(true)])),
            ("test.ints".into(), Array(vec![I32(-1), I32(0), I32(7)])),
            ("test.empty".into(), Array(vec![])),
            (
                "test.nested".into(),
                Array(vec![
                    Array(vec![U32(1), U32(2)]),
                    Array(vec![String("a".into())]),
                    Array(vec![]),
                    Array(vec![Array(vec![F64(2.5)])]),
                ]),
            ),
        ]
    }

    fn sample_tensors() -> Vec<(&'static str, TensorData)> {
        vec![
            ("t.f32", TensorData::from_f32(vec![2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])),
            ("t.f16", tensor(DType::F16, &[5], 1)),
            ("t.q4_0", tensor(DType::Q4_0, &[2, 64], 2)),
            ("t.q8_0", tensor(DType::Q8_0, &[3, 32], 3)),
            ("t.q4k", tensor(DType::Q4K, &[1, 256], 4)),
            ("t.i32", tensor(DType::I32, &[2, 2, 2], 5)),
            ("t.bf16", tensor(DType::BF16, &[1, 1, 1, 3], 6)),
        ]
    }

    fn sample_writer() -> GgufWriter {
        let mut w = GgufWriter::new();
        for (k, v) in sample_metadata() {
            w.add_metadata(k, v);
        }
        for (n, t) in sample_tensors() {
            w.add_tensor(n, &t).unwrap();
        }
        w
    }

    fn sample() -> Vec<u8> {
        sample_writer().to_bytes()
    }

    fn parse(b: &[u8]) -> Result<GgufFile, GgufError> {
        GgufFile::from_bytes(Bytes::copy_from_slice(b))
    }

    fn find(hay: &[u8], needle: &[u8]) -> usize {
        hay.windows(needle.len()).position(|w| w == needle).unwrap_or_else(|| panic!("{needle:?} not found"))
    }

    fn encoded(s: &str) -> Vec<u8> {
        let mut v = Vec::new();
        put_string(&mut v, s);
        v
    }

    /// Offset of the value type of metadata key `key`.
    fn kv_type_pos(b: &[u8], key: &str) -> usize {
        let e = encoded(key);
        find(b, &e) + e.len()
    }

    /// Offset of the n_dims field of tensor `name`.
    fn tensor_pos(b: &[u8], name: &str) -> usize {
        let e = encoded(name);
        find(b, &e) + e.len()
    }

    fn put_u32(b: &mut [u8], at: usize, v: u32) {
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn put_u64(b: &mut [u8], at: usize, v: u64) {
        b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }

    /// A file with the given raw metadata entries and no tensors.
    fn raw_file(n_kv: u64, kvs: &[u8]) -> Vec<u8> {
        let mut b = GGUF_MAGIC.to_vec();
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(&n_kv.to_le_bytes());
        b.extend_from_slice(kvs);
        b
    }

    /// Key `deep` holding `depth` nested arrays around an empty u8 array.
    fn nested_kv(depth: usize) -> Vec<u8> {
        let mut b = encoded("deep");
        b.extend_from_slice(&T_ARRAY.to_le_bytes());
        for _ in 1..depth {
            b.extend_from_slice(&T_ARRAY.to_le_bytes());
            b.extend_from_slice(&1u64.to_le_bytes());
        }
        b.extend_from_slice(&T_U8.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        b
    }

    #[test]
    fn gguf_round_trip() {
        let bytes = sample();
        assert_eq!(bytes, sample(), "writer output must be deterministic");
        let f = parse(&bytes).unwrap();
        assert_eq!(f.version, 3);
        assert_eq!(f.alignment, 32);
        assert_eq!(f.data_offset % 32, 0);
        assert_eq!(f.metadata, sample_metadata());
        assert_eq!(f.tensors.len(), sample_tensors().len());
        for ((name, t), info) in sample_tensors().iter().zip(&f.tensors) {
            assert_eq!(info.name, *name);
            assert_eq!(info.offset % 32, 0, "{name}");
            assert_eq!(info.shape(), t.shape);
            assert_eq!(info.ne, t.shape.iter().rev().map(|&n| n as u64).collect::<Vec<_>>());
            let got = f.tensor_data_owned(name).unwrap();
            assert_eq!(got.dtype, t.dtype);
            assert_eq!(got.shape, t.shape);
            assert_eq!(got.bytes, t.bytes, "{name}");
            assert_eq!(f.tensor_data(info), t.bytes);
        }
        // The 10-byte f16 tensor is followed by zero padding up to the next aligned offset.
        let f16 = f.tensor("t.f16").unwrap();
        let after = (f.data_offset + f16.offset + 10) as usize;
        assert!(bytes[after..after + 22].iter().all(|&b| b == 0));
        assert_eq!(f.tensor("t.q4_0").unwrap().offset, f16.offset + 32);
        assert_eq!(f.tensor_data_owned("t.f32").unwrap().to_f32().unwrap(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert!(f.tensor("nope").is_none() && f.tensor_data_owned("nope").is_none());

        // Through a file and mmap.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sample.gguf");
        sample_writer().write(&path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        let g = GgufFile::open(&path).unwrap();
        assert_eq!(g.path.as_deref(), Some(path.as_path()));
        assert_eq!(g.metadata, f.metadata);
        assert_eq!(g.tensor_data_owned("t.q4k").unwrap().bytes, f.tensor_data_owned("t.q4k").unwrap().bytes);

        // Parsed files write back identically.
        let mut w = GgufWriter::new();
        for (k, v) in &g.metadata {
            w.add_metadata(k.clone(), v.clone());
        }
        for t in &g.tensors {
            w.add_tensor(t.name.clone(), &g.tensor_data_owned(&t.name).unwrap()).unwrap();
        }
        assert_eq!(w.to_bytes(), bytes);
    }

    #[test]
    fn gguf_custom_alignment_and_v2() {
        let mut w = sample_writer();
        w.add_metadata(ALIGNMENT_KEY, GgufValue::U32(64));
        let mut bytes = w.to_bytes();
        let f = parse(&bytes).unwrap();
        assert_eq!(f.alignment, 64);
        assert_eq!(f.data_offset % 64, 0);
        assert!(f.tensors.iter().all(|t| t.offset % 64 == 0));
        for (name, t) in sample_tensors() {
            assert_eq!(f.tensor_data_owned(name).unwrap().bytes, t.bytes);
        }
        // Version 2 has the same layout.
        put_u32(&mut bytes, 4, 2);
        assert_eq!(parse(&bytes).unwrap().version, 2);
        // Empty file with no tensors and no metadata.
        let empty = GgufWriter::new().to_bytes();
        assert_eq!(empty.len(), 32);
        let e = parse(&empty).unwrap();
        assert!(e.metadata.is_empty() && e.tensors.is_empty());
    }

    #[test]
    fn gguf_getters() {
        let f = parse(&sample()).unwrap();
        assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
        assert_eq!(f.get_u64("test.u32").unwrap(), 4_000_000_000);
        assert_eq!(f.get_u64("test.u8").unwrap(), 200);
        assert_eq!(f.get_f64("test.f32").unwrap(), 1.5e-5f32 as f64);
        assert_eq!(f.get_f64("test.i16").unwrap(), -30000.0);
        assert!(f.get_bool("test.bool").unwrap());
        assert_eq!(f.get_str_array("test.strings").unwrap(), vec!["hello", "", "ü"]);
        assert_eq!(f.get_i64_array("test.ints").unwrap(), vec![-1, 0, 7]);
        assert_eq!(f.get_f32_array("test.ints").unwrap(), vec![-1.0, 0.0, 7.0]);
        assert!(f.get_str_array("test.empty").unwrap().is_empty());
        assert_eq!(f.get("test.i8").unwrap().as_u64(), None);
        assert_eq!(f.get("test.i8").unwrap().as_i64(), Some(-5));
        assert_eq!(f.get("test.u64").unwrap().as_i64(), None);
        assert_eq!(f.get("test.nested").unwrap().type_name(), "array");

        let msg = |e: GgufError| e.to_string();
        let m = msg(f.get_u64("llama.block_count").unwrap_err());
        assert!(m.contains("'llama.block_count'") && m.contains("missing") && m.contains(IN_MEMORY), "{m}");
        let m = msg(f.get_u64("test.i8").unwrap_err());
        assert!(m.contains("'test.i8'") && m.contains("i8"), "{m}");
        let m = msg(f.get_str("test.u32").unwrap_err());
        assert!(m.contains("'test.u32'") && m.contains("u32") && m.contains("string"), "{m}");
        let m = msg(f.get_str_array("test.ints").unwrap_err());
        assert!(m.contains("'test.ints'") && m.contains("element 0"), "{m}");
        let m = msg(f.get_i64_array("test.strings").unwrap_err());
        assert!(m.contains("'test.strings'"), "{m}");
    }

    #[test]
    fn gguf_writer_rejects_bad_input() {
        let mut w = GgufWriter::new();
        w.add_tensor("a", &tensor(DType::F32, &[2], 0)).unwrap();
        let err = |r: Result<(), GgufError>| r.unwrap_err().to_string();
        assert!(err(w.add_tensor("a", &tensor(DType::F32, &[2], 0))).contains("'a' was added twice"));
        let bad_len = TensorData { dtype: DType::F32, shape: vec![3], bytes: pattern(8, 0) };
        assert!(err(w.add_tensor("b", &bad_len)).contains("12"));
        let five = TensorData { dtype: DType::F32, shape: vec![1; 5], bytes: pattern(4, 0) };
        assert!(err(w.add_tensor("c", &five)).contains("1 to 4"));
        let scalar = TensorData { dtype: DType::F32, shape: vec![], bytes: pattern(4, 0) };
        assert!(err(w.add_tensor("d", &scalar)).contains("'d'"));
        let partial_block = TensorData { dtype: DType::Q4_0, shape: vec![33], bytes: pattern(18, 0) };
        assert!(err(w.add_tensor("e", &partial_block)).contains("block size"));
        let zero = TensorData { dtype: DType::F32, shape: vec![0, 4], bytes: Bytes::new() };
        assert!(err(w.add_tensor("f", &zero)).contains("zero"));

        let mut m = GgufWriter::new();
        m.add_metadata("mixed", GgufValue::Array(vec![GgufValue::U8(1), GgufValue::U32(2)]));
        assert!(m.try_to_bytes().unwrap_err().to_string().contains("'mixed'"));
        let dir = tempfile::tempdir().unwrap();
        assert!(m.write(&dir.path().join("x.gguf")).is_err());
        let mut a = GgufWriter::new();
        a.add_metadata(ALIGNMENT_KEY, GgufValue::U32(48));
        assert!(a.try_to_bytes().unwrap_err().to_string().contains(ALIGNMENT_KEY));
        a.add_metadata(ALIGNMENT_KEY, GgufValue::U64(64));
        assert!(a.try_to_bytes().is_err());
        a.add_metadata(ALIGNMENT_KEY, GgufValue::U32(16));
        assert_eq!(a.metadata.len(), 1, "re-adding a key replaces it");
        assert_eq!(parse(&a.to_bytes()).unwrap().alignment, 16);
    }

    #[test]
    fn gguf_nesting_limit() {
        assert!(parse(&raw_file(1, &nested_kv(MAX_ARRAY_DEPTH))).is_ok());
        let e = parse(&raw_file(1, &nested_kv(MAX_ARRAY_DEPTH + 1))).unwrap_err().to_string();
        assert!(e.contains("'deep'") && e.contains("nested"), "{e}");
        // Very deep nesting must fail cleanly, not overflow the stack.
        assert!(parse(&raw_file(1, &nested_kv(100_000))).is_err());
    }

    #[test]
    fn gguf_truncated_everywhere() {
        let bytes = sample();
        let f = parse(&bytes).unwrap();
        let data_end = f.tensors.iter().map(|t| f.data_offset + t.offset + t.n_bytes).max().unwrap() as usize;
        for cut in 0..bytes.len() {
            let r = parse(&bytes[..cut]);
            if cut >= data_end {
                assert!(r.is_ok(), "cut at {cut} (only trailing padding lost) should parse");
                continue;
            }
            let e = r.err().unwrap_or_else(|| panic!("truncation at {cut} parsed")).to_string();
            if cut < f.data_offset as usize - 32 {
                assert!(e.contains("truncated") && e.contains("byte offset"), "cut {cut}: {e}");
            } else {
                assert!(e.contains("truncated") || e.contains("past the end"), "cut {cut}: {e}");
            }
        }
        let e = parse(&[]).unwrap_err().to_string();
        assert!(e.contains("byte offset 0") && e.contains("magic"), "{e}");
        let e = parse(&raw_file(1, &nested_kv(1))[..37]).unwrap_err().to_string();
        assert!(e.contains("byte offset 36") && e.contains("value type of key 'deep'"), "{e}");
        let e = parse(&bytes[..30]).unwrap_err().to_string();
        assert!(e.contains("kv count 18") && e.contains("truncated or corrupt"), "{e}");
    }

    #[test]
    fn gguf_hostile_inputs() {
        let base = sample();
        let aligned = {
            let mut w = sample_writer();
            w.add_metadata(ALIGNMENT_KEY, GgufValue::U32(32));
            w.to_bytes()
        };
        let patch = |src: &Vec<u8>, f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = src.clone();
            f(&mut b);
            b
        };
        let tp = |name: &str| tensor_pos(&base, name);
        let kp = |key: &str| kv_type_pos(&base, key);
        let ap = kv_type_pos(&aligned, ALIGNMENT_KEY);
        let file_size = format!("({} bytes)", base.len());

        let cases: Vec<(&str, Vec<u8>, &[&str])> = vec![
            ("bad magic", patch(&base, &|b| b[0] = b'X'), &["magic", "XGUF"]),
            ("old ggjt", patch(&base, &|b| b[..4].copy_from_slice(b"tjgg")), &["GGJT"]),
            ("version 1", patch(&base, &|b| put_u32(b, 4, 1)), &["version 1"]),
            ("version 4", patch(&base, &|b| put_u32(b, 4, 4)), &["version 4"]),
            ("big-endian", patch(&base, &|b| put_u32(b, 4, 3u32.swap_bytes())), &["big-endian"]),
            ("huge kv count", patch(&base, &|b| put_u64(b, 16, u64::MAX)), &["kv count", "byte offset 16"]),
            ("huge tensor count", patch(&base, &|b| put_u64(b, 8, 1 << 40)), &["tensor count"]),
            ("kv count too high", patch(&base, &|b| put_u64(b, 16, 19)), &["truncated", "tensor"]),
            (
                "huge string length",
                patch(&base, &|b| put_u64(b, kp("general.architecture") + 4, 1 << 60)),
                &["truncated", "general.architecture"],
            ),
            (
                "huge key length",
                patch(&base, &|b| put_u64(b, 24, u64::MAX)),
                &["truncated", "key of metadata entry #0"],
            ),
            (
                "huge string array count",
                patch(&base, &|b| put_u64(b, kp("test.strings") + 8, u64::MAX / 2)),
                &["'test.strings'", "array of"],
            ),
            (
                "huge bool array count",
                patch(&base, &|b| put_u64(b, kp("test.bools") + 8, 1 << 33)),
                &["'test.bools'", "8589934592"],
            ),
            (
                "unknown array element type",
                patch(&base, &|b| put_u32(b, kp("test.ints") + 4, 77)),
                &["'test.ints'", "77"],
            ),
            ("unknown value type", patch(&base, &|b| put_u32(b, kp("test.u8"), 13)), &["'test.u8'", "type 13"]),
            ("bool 2", patch(&base, &|b| b[kp("test.bool") + 4] = 2), &["'test.bool'", "bool value 2"]),
            ("bool 7 in array", patch(&base, &|b| b[kp("test.bools") + 17] = 7), &["'test.bools'", "index 1"]),
            ("nesting too deep", raw_file(1, &nested_kv(9)), &["'deep'", "nested more than 8"]),
            (
                "non-UTF-8 key",
                patch(&base, &|b| {
                    let at = kp("test.u16") - 3;
                    b[at] = 0xFF
                }),
                &["key of metadata entry #3", "UTF-8"],
            ),
            (
                "non-UTF-8 value",
                patch(&base, &|b| {
                    let at = kp("general.architecture") + 12;
                    b[at] = 0xC3
                }),
                &["'general.architecture'", "UTF-8"],
            ),
            (
                "duplicate key",
                patch(&base, &|b| {
                    let at = kp("test.i8") - 2;
                    b[at] = b'u'
                }),
                &["duplicate", "'test.u8'"],
            ),
            ("alignment 0", patch(&aligned, &|b| put_u32(b, ap + 4, 0)), &[ALIGNMENT_KEY, "= 0"]),
            ("alignment 48", patch(&aligned, &|b| put_u32(b, ap + 4, 48)), &[ALIGNMENT_KEY, "48"]),
            ("alignment as f32", patch(&aligned, &|b| put_u32(b, ap, T_F32)), &[ALIGNMENT_KEY, "is an f32"]),
            ("n_dims 5", patch(&base, &|b| put_u32(b, tp("t.f32"), 5)), &["'t.f32'", "n_dims = 5"]),
            ("n_dims 0", patch(&base, &|b| put_u32(b, tp("t.f32"), 0)), &["'t.f32'", "n_dims = 0"]),
            ("n_dims huge", patch(&base, &|b| put_u32(b, tp("t.f32"), u32::MAX)), &["'t.f32'", "n_dims = 4294967295"]),
            ("ne 0", patch(&base, &|b| put_u64(b, tp("t.f32") + 4, 0)), &["'t.f32'", "ne[0] = 0"]),
            (
                "ne product overflows u64",
                patch(&base, &|b| {
                    put_u64(b, tp("t.f32") + 4, 1 << 32);
                    put_u64(b, tp("t.f32") + 12, 1 << 32);
                }),
                &["'t.f32'", "overflows"],
            ),
            (
                "ne product 2^62",
                patch(&base, &|b| {
                    put_u64(b, tp("t.f32") + 4, 1 << 31);
                    put_u64(b, tp("t.f32") + 12, 1 << 31);
                }),
                &["'t.f32'", "overflows"],
            ),
            ("ne u64::MAX", patch(&base, &|b| put_u64(b, tp("t.f16") + 4, u64::MAX)), &["'t.f16'", "overflows"]),
            (
                "byte size overflows",
                patch(&base, &|b| {
                    // An i64 tensor of 2^61 elements: fine as a count, 2^64 bytes.
                    let at = tp("t.i32");
                    put_u64(b, at + 4, 1 << 31);
                    put_u64(b, at + 12, 1 << 29);
                    put_u32(b, at + 28, DType::I64.ggml_id());
                }),
                &["'t.i32'", "byte size overflows"],
            ),
            (
                "unsupported ggml type",
                patch(&base, &|b| put_u32(b, tp("t.f32") + 4 + 16, 10)),
                &["tensor 't.f32' has ggml type 10 (Q2_K), which Kiln does not support"],
            ),
            (
                "unknown ggml type",
                patch(&base, &|b| put_u32(b, tp("t.f32") + 4 + 16, 1000)),
                &["'t.f32'", "1000 (unknown)"],
            ),
            (
                "row not a whole block",
                patch(&base, &|b| put_u64(b, tp("t.q4_0") + 4, 48)),
                &["'t.q4_0'", "ne[0] = 48", "block size 32"],
            ),
            (
                "misaligned offset",
                patch(&base, &|b| {
                    let at = tp("t.q8_0") + 4 + 16 + 4;
                    let off = u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
                    put_u64(b, at, off + 4)
                }),
                &["'t.q8_0'", "not a multiple of the alignment 32"],
            ),
            (
                "data past EOF",
                patch(&base, &|b| put_u64(b, tp("t.bf16") + 4 + 32 + 4, 1 << 40)),
                &["'t.bf16'", "past the end", "FILE_SIZE"],
            ),
            (
                "offset overflows u64",
                patch(&base, &|b| put_u64(b, tp("t.bf16") + 4 + 32 + 4, !31)),
                &["'t.bf16'", "past the end"],
            ),
            ("data cut short", base[..base.len() - 30].to_vec(), &["'t.bf16'", "past the end"]),
            (
                "duplicate tensor",
                patch(&base, &|b| {
                    let at = tp("t.f16") - 2;
                    b[at..at + 2].copy_from_slice(b"32")
                }),
                &["'t.f32'", "appears twice"],
            ),
            (
                "non-UTF-8 tensor name",
                patch(&base, &|b| {
                    let at = tp("t.i32") - 1;
                    b[at] = 0x80
                }),
                &["name of tensor #5", "UTF-8"],
            ),
            (
                "huge tensor name length",
                patch(&base, &|b| {
                    let at = tp("t.i32") - 5 - 8;
                    put_u64(b, at, 1 << 50)
                }),
                &["truncated", "name of tensor #5"],
            ),
        ];
        assert!(cases.len() >= 15);
        for (what, bytes, expected) in &cases {
            let err = match parse(bytes) {
                Ok(_) => panic!("case '{what}' parsed"),
                Err(e) => e.to_string(),
            };
            assert!(err.starts_with(IN_MEMORY), "case '{what}': {err}");
            for &needle in *expected {
                let needle = if needle == "FILE_SIZE" { file_size.as_str() } else { needle };
                assert!(err.contains(needle), "case '{what}': {err:?} lacks {needle:?}");
            }
        }

        // Errors from files name the path.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.gguf");
        std::fs::write(&path, &cases[0].1).unwrap();
        let e = GgufFile::open(&path).unwrap_err().to_string();
        assert!(e.contains(&path.display().to_string()), "{e}");
        let missing = dir.path().join("missing.gguf");
        let e = GgufFile::open(&missing).unwrap_err().to_string();
        assert!(e.contains("missing.gguf"), "{e}");
        std::fs::write(&path, b"").unwrap();
        assert!(GgufFile::open(&path).unwrap_err().to_string().contains("truncated"));
    }

    /// Exercises everything a caller might do with a parsed file.
    fn poke(f: &GgufFile) {
        for (k, v) in &f.metadata {
            let _ = (f.get_u64(k), f.get_f64(k), f.get_str(k), f.get_str_array(k), f.get_i64_array(k));
            let _ = (v.as_u64(), v.as_f64(), v.as_str(), v.type_name());
        }
        for t in &f.tensors {
            assert_eq!(f.tensor_data(t).len() as u64, t.n_bytes);
            let d = f.tensor_data_owned(&t.name).unwrap();
            assert_eq!(d.shape.iter().product::<usize>() as u64, t.numel());
        }
    }

    #[test]
    fn gguf_mutation_fuzz() {
        let mut w = sample_writer();
        w.add_metadata(ALIGNMENT_KEY, GgufValue::U32(32));
        let base = w.to_bytes();
        let header_len = parse(&base).unwrap().data_offset as usize;
        let interesting: [u64; 8] = [0, 1, 5, 32, 0xFF, 1 << 32, u64::MAX, u64::MAX / 2];
        let start = std::time::Instant::now();
        let (mut iters, mut ok) = (0u64, 0u64);
        while iters < 50_000 && start.elapsed() < std::time::Duration::from_secs(2) {
            let seed = 0x6767_7566_0000 + iters;
            let result = std::panic::catch_unwind(|| {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                let mut b = base.clone();
                for _ in 0..rng.random_range(1..=6) {
                    if b.is_empty() {
                        break;
                    }
                    // Mostly hit the header, where the structure is.
                    let hi = if rng.random_bool(0.85) { header_len.min(b.len()) } else { b.len() };
                    let at = rng.random_range(0..hi);
                    match rng.random_range(0..6) {
                        0 => b[at] ^= 1 << rng.random_range(0..8),
                        1 => b[at] = rng.random(),
                        2 => b.truncate(at),
                        3 => {
                            let n = rng.random_range(1..=16);
                            let ins: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                            b.splice(at..at, ins);
                        }
                        4 => {
                            let end = (at + rng.random_range(1..=16)).min(b.len());
                            b.drain(at..end);
                        }
                        _ => {
                            let v = interesting[rng.random_range(0..interesting.len())];
                            let n = if rng.random_bool(0.5) { 4 } else { 8 };
                            let end = (at + n).min(b.len());
                            let len = end - at;
                            b[at..end].copy_from_slice(&v.to_le_bytes()[..len]);
                        }
                    }
                }
                match parse(&b) {
                    Ok(f) => {
                        poke(&f);
                        true
                    }
                    Err(e) => {
                        assert!(!e.to_string().is_empty());
                        false
                    }
                }
            });
            match result {
                Ok(parsed) => ok += u64::from(parsed),
                Err(_) => panic!("GGUF parsing panicked for fuzz seed {seed:#x}"),
            }
            iters += 1;
        }
        eprintln!("gguf fuzz: {iters} mutated files, {ok} still parsed, {:?}", start.elapsed());
        assert!(iters >= 1000, "only {iters} fuzz iterations ran");
    }

    #[test]
    fn gguf_real_model_if_present() {
        let Some(home) = std::env::var_os("HOME") else {
            eprintln!("gguf_real_model_if_present: skipped (no HOME)");
            return;
        };
        let path = PathBuf::from(home).join(".cache/kiln/models/SmolLM2-135M-Instruct.Q4_1.gguf");
        if !path.exists() {
            eprintln!("gguf_real_model_if_present: skipped ({} not found)", path.display());
            return;
        }
        let f = GgufFile::open(&path).unwrap();
        eprintln!(
            "{}: GGUF v{}, {} metadata keys, {} tensors",
            path.display(),
            f.version,
            f.metadata.len(),
            f.tensors.len()
        );
        for (k, v) in &f.metadata {
            let shown = match v {
                GgufValue::Array(a) => format!("[{} x {}]", a.len(), a.first().map_or("?", |e| e.type_name())),
                GgufValue::String(s) if s.len() > 60 => {
                    format!("{:?}…", &s[..s.floor_char_boundary(60)])
                }
                v => format!("{v:?}"),
            };
            eprintln!("  {k} = {shown}");
        }
        assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
        assert_eq!(f.tensors.len(), 272);
        let n_vocab = f.get_str_array("tokenizer.ggml.tokens").unwrap().len();
        assert_eq!(f.get_i64_array("tokenizer.ggml.token_type").unwrap().len(), n_vocab);
        let emb = f.tensor_data_owned("token_embd.weight").unwrap();
        assert_eq!(emb.shape, vec![n_vocab, f.get_u64("llama.embedding_length").unwrap() as usize]);
        poke(&f);

        // Our writer reproduces the file byte for byte.
        let mut w = GgufWriter::new();
        for (k, v) in &f.metadata {
            w.add_metadata(k.clone(), v.clone());
        }
        for t in &f.tensors {
            w.add_tensor(t.name.clone(), &f.tensor_data_owned(&t.name).unwrap()).unwrap();
        }
        let original = std::fs::read(&path).unwrap();
        let written = w.to_bytes();
        assert_eq!(written.len(), original.len());
        assert!(written == original, "rewritten file differs from the original");
    }
}
