//! Kiln's C ABI (`kiln_model.h`): the runtime half of a library made by `kiln compile --emit lib`.
//!
//! The compiler's half is one object per model (see [`kiln_ir::program::C_ABI_VERSION`]): it defines
//! `kiln_model_create`, which hands this crate a descriptor holding the model's manifest and a table of
//! its kernels. Everything else — stepping, logits, sampling, errors — is here, on top of
//! `kiln_runtime::CompiledBackend` (the same execution path as `kiln run`; only the kernels come from the
//! table instead of `dlopen`).
//!
//! Rules every entry point keeps: pointers are checked for null, Rust panics never cross the boundary
//! (`catch_unwind`; a model whose call panicked refuses further use), and every failure returns a
//! non-zero [`Status`] with a message for `kiln_last_error` (thread-local, naming the file or argument).

use kiln_ir::program::C_ABI_VERSION;
use kiln_runtime::{ArtifactError, Backend, CompiledBackend, KernelFn, KernelSource, Logits, RuntimeError};
use kiln_runtime::{Sampler, SamplingParams};
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// `KILN_ABI_VERSION` in `kiln_model.h`.
pub const KILN_ABI_VERSION: u32 = C_ABI_VERSION;

/// The most worker threads a model may ask for (more is a mistake, not a machine).
const MAX_THREADS: u32 = 1024;

/// Status codes (`KilnStatus` in `kiln_model.h`).
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok = 0,
    NullArgument = 1,
    InvalidArgument = 2,
    Io = 3,
    WrongWeights = 4,
    UnsupportedCpu = 5,
    AbiMismatch = 6,
    BadToken = 7,
    ContextFull = 8,
    NotReady = 9,
    Internal = 10,
    Unavailable = 11,
}

impl Status {
    fn name(code: i32) -> &'static CStr {
        match code {
            0 => c"ok",
            1 => c"null argument",
            2 => c"invalid argument",
            3 => c"i/o error",
            4 => c"weights do not belong to this library",
            5 => c"CPU lacks features the code was compiled for",
            6 => c"ABI version mismatch",
            7 => c"token id outside the vocabulary",
            8 => c"context full",
            9 => c"not ready (prefill first)",
            10 => c"internal error",
            11 => c"not available for this model",
            _ => c"unknown status code",
        }
    }
}

/// An error on its way to C: a status and a message.
struct Error(Status, String);

fn err<T>(status: Status, msg: impl Into<String>) -> Result<T, Error> {
    Err(Error(status, msg.into()))
}

impl From<ArtifactError> for Error {
    fn from(e: ArtifactError) -> Self {
        let status = match &e {
            ArtifactError::WrongWeights { .. } => Status::WrongWeights,
            ArtifactError::UnsupportedCpu { .. } => Status::UnsupportedCpu,
            ArtifactError::Io { .. } => Status::Io,
            ArtifactError::Invalid { .. } => Status::Internal,
        };
        Error(status, e.to_string())
    }
}

impl From<RuntimeError> for Error {
    fn from(e: RuntimeError) -> Self {
        let status = match &e {
            RuntimeError::ContextFull { .. } => Status::ContextFull,
            RuntimeError::BadToken { .. } => Status::BadToken,
            RuntimeError::EmptyPrompt => Status::InvalidArgument,
            _ => Status::Internal,
        };
        Error(status, e.to_string())
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(msg: &str) {
    let c = CString::new(msg.replace('\0', "\\0")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Runs `f`, turning an error or a panic into a status code and the thread's last error message.
fn guard(what: &str, f: impl FnOnce() -> Result<(), Error>) -> i32 {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => Status::Ok as i32,
        Ok(Err(Error(status, msg))) => {
            set_last_error(&format!("{what}: {msg}"));
            status as i32
        }
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_last_error(&format!("{what}: internal error (Kiln bug): {msg}"));
            Status::Internal as i32
        }
    }
}

/// A model instance (`KilnModel` in C): the compiled backend, its KV cache and the last step's logits.
pub struct KilnModel {
    backend: CompiledBackend,
    /// Detokenization table from the descriptor: (bytes, offsets), token `i` = `bytes[offsets[i]..offsets[i+1]]`.
    vocab: Option<(&'static [u8], &'static [u32])>,
    logits: Option<Logits>,
    /// Set when a call panicked part-way: the state may be inconsistent, so the model refuses further use.
    poisoned: bool,
}

/// A sampler (`KilnSampler` in C): sampling parameters and the random generator's state.
pub struct KilnSampler {
    sampler: Sampler,
}

/// Sampling parameters (`KilnSamplingParams` in C).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KilnSamplingParams {
    pub temperature: f32,
    pub top_k: u32,
    pub top_p: f32,
    pub seed: u64,
}

/// The descriptor a library object defines (layout at [`kiln_ir::program::C_ABI_VERSION`]).
#[repr(C)]
pub struct EmbeddedModel {
    pub abi_version: u32,
    pub kernel_count: u32,
    pub manifest: *const u8,
    pub manifest_len: u64,
    pub names: *const *const c_char,
    pub kernels: *const KernelFn,
    pub vocab_count: u32,
    pub vocab_bytes: *const u8,
    pub vocab_offsets: *const u32,
}

fn path_arg(p: *const c_char, what: &str) -> Result<PathBuf, Error> {
    if p.is_null() {
        return err(Status::NullArgument, format!("{what} is NULL"));
    }
    // SAFETY: non-null and, per the header, a NUL-terminated string.
    let bytes = unsafe { CStr::from_ptr(p) }.to_bytes();
    if bytes.is_empty() {
        return err(Status::InvalidArgument, format!("{what} is empty"));
    }
    use std::os::unix::ffi::OsStrExt;
    Ok(PathBuf::from(std::ffi::OsStr::from_bytes(bytes)))
}

/// The model behind `m`, unless null or poisoned; marks it poisoned if `f` panics.
fn with_model(m: *mut KilnModel, f: impl FnOnce(&mut KilnModel) -> Result<(), Error>) -> Result<(), Error> {
    if m.is_null() {
        return err(Status::NullArgument, "model is NULL");
    }
    // SAFETY: non-null and, per the header, a live model from kiln_model_create used by one thread at a time.
    let model = unsafe { &mut *m };
    if model.poisoned {
        return err(Status::Internal, "the model is unusable after an earlier internal error; free it");
    }
    model.poisoned = true;
    let r = f(model);
    model.poisoned = false;
    r
}

/// Called by a library's `kiln_model_create` with its descriptor. Not for direct use.
///
/// # Safety
/// `desc` must point to the descriptor the library object defines; the other arguments as for
/// `kiln_model_create` in `kiln_model.h`.
#[no_mangle]
pub unsafe extern "C" fn kiln_capi_create_embedded(
    desc: *const EmbeddedModel,
    weights_path: *const c_char,
    threads: u32,
    context_length: u32,
    out: *mut *mut KilnModel,
) -> i32 {
    guard("kiln_model_create", || {
        if out.is_null() {
            return err(Status::NullArgument, "out is NULL");
        }
        // SAFETY: checked non-null; writing NULL first so a failed create leaves no dangling handle.
        unsafe { *out = std::ptr::null_mut() };
        if desc.is_null() {
            return err(Status::Internal, "model descriptor is NULL");
        }
        // SAFETY: the descriptor is a constant in the library object (see the function's safety).
        let d = unsafe { &*desc };
        if d.abi_version != KILN_ABI_VERSION {
            return err(
                Status::AbiMismatch,
                format!(
                    "the model code was compiled for Kiln C ABI {}, this runtime (libkiln_capi) implements {}; \
                     compile the model with a matching kiln",
                    d.abi_version, KILN_ABI_VERSION
                ),
            );
        }
        if d.manifest.is_null() || d.names.is_null() || d.kernels.is_null() {
            return err(Status::Internal, "model descriptor has a NULL table");
        }
        let wpath = path_arg(weights_path, "weights_path")?;
        if threads > MAX_THREADS {
            return err(Status::InvalidArgument, format!("threads {threads} is more than {MAX_THREADS}"));
        }
        // SAFETY: the descriptor's arrays have the lengths it states and live as long as the program.
        let (json, names, kernels) = unsafe {
            (
                std::slice::from_raw_parts(d.manifest, d.manifest_len as usize),
                std::slice::from_raw_parts(d.names, d.kernel_count as usize),
                std::slice::from_raw_parts(d.kernels, d.kernel_count as usize),
            )
        };
        let json = std::str::from_utf8(json).map_err(|e| Error(Status::Internal, format!("embedded manifest: {e}")))?;
        let manifest = kiln_runtime::compiled::parse_manifest(json, Path::new("(embedded manifest)"))?;
        kiln_runtime::compiled::check_weights(&manifest, &wpath)?;
        let mut table = HashMap::new();
        for (&name, &f) in names.iter().zip(kernels) {
            // SAFETY: the names are NUL-terminated constants in the library object.
            let name = unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned();
            table.insert(name, f);
        }
        let capacity = (context_length > 0).then_some(context_length as usize);
        let backend =
            CompiledBackend::from_parts(manifest, &wpath, KernelSource::Linked(table), threads as usize, capacity)?;
        let vocab = if d.vocab_count == 0 || d.vocab_bytes.is_null() || d.vocab_offsets.is_null() {
            None
        } else {
            // SAFETY: the descriptor's table holds `vocab_count + 1` offsets into its byte blob, for the
            // program's lifetime.
            let offsets = unsafe { std::slice::from_raw_parts(d.vocab_offsets, d.vocab_count as usize + 1) };
            let len = *offsets.last().expect("count + 1 > 0") as usize;
            if offsets.windows(2).any(|w| w[0] > w[1]) {
                return err(Status::Internal, "model descriptor has a malformed vocabulary table");
            }
            // SAFETY: as above; the last offset is the blob's length.
            Some((unsafe { std::slice::from_raw_parts(d.vocab_bytes, len) }, offsets))
        };
        let model = Box::new(KilnModel { backend, vocab, logits: None, poisoned: false });
        // SAFETY: `out` checked non-null above.
        unsafe { *out = Box::into_raw(model) };
        Ok(())
    })
}

/// Frees a model (NULL is ignored).
///
/// # Safety
/// `model` is NULL or from `kiln_model_create`, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_free(model: *mut KilnModel) {
    if !model.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| {
            // SAFETY: per the function's safety, the box came from kiln_model_create and is freed once.
            drop(unsafe { Box::from_raw(model) })
        }));
    }
}

fn step(m: &mut KilnModel, tokens: &[u32]) -> Result<(), Error> {
    m.logits = None;
    m.logits = Some(m.backend.forward(tokens)?);
    Ok(())
}

/// Appends `n_tokens` tokens to the KV cache and computes the logits after the last one.
///
/// # Safety
/// `tokens` points to `n_tokens` readable ids; `model` as in the header.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_prefill(model: *mut KilnModel, tokens: *const u32, n_tokens: usize) -> i32 {
    guard("kiln_model_prefill", || {
        with_model(model, |m| {
            if tokens.is_null() {
                return err(Status::NullArgument, "tokens is NULL");
            }
            if n_tokens == 0 {
                return err(Status::InvalidArgument, "n_tokens is 0: at least one token is needed");
            }
            // SAFETY: non-null, `n_tokens` ids per the function's safety.
            let tokens = unsafe { std::slice::from_raw_parts(tokens, n_tokens) };
            step(m, tokens)
        })
    })
}

/// Appends one token (the previously sampled one) and computes the next logits.
///
/// # Safety
/// `model` as in the header.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_decode(model: *mut KilnModel, token: u32) -> i32 {
    guard("kiln_model_decode", || {
        with_model(model, |m| {
            if m.backend.position() == 0 {
                return err(Status::NotReady, "nothing prefilled yet: call kiln_model_prefill with the prompt first");
            }
            step(m, &[token])
        })
    })
}

/// The logits after the last prefill/decode: `*logits` points to `*n_vocab` floats, valid until the
/// next call that changes the model.
///
/// # Safety
/// `logits`/`n_vocab` writable; `model` as in the header.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_logits(model: *mut KilnModel, logits: *mut *const f32, n_vocab: *mut usize) -> i32 {
    guard("kiln_model_logits", || {
        with_model(model, |m| {
            if logits.is_null() || n_vocab.is_null() {
                return err(Status::NullArgument, if logits.is_null() { "logits is NULL" } else { "n_vocab is NULL" });
            }
            let Some(l) = &m.logits else {
                return err(Status::NotReady, "no logits yet: call kiln_model_prefill first");
            };
            let last = l.last();
            // SAFETY: both checked non-null.
            unsafe {
                *logits = last.as_ptr();
                *n_vocab = last.len();
            }
            Ok(())
        })
    })
}

/// Empties the KV cache (the next call must be a prefill).
///
/// # Safety
/// `model` as in the header.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_reset(model: *mut KilnModel) -> i32 {
    guard("kiln_model_reset", || {
        with_model(model, |m| {
            m.backend.reset();
            m.logits = None;
            Ok(())
        })
    })
}

/// Vocabulary size, context capacity (positions) and tokens in the cache; 0 for a NULL model.
///
/// # Safety
/// `model` NULL or live.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_vocab_size(model: *const KilnModel) -> usize {
    // SAFETY: NULL or a live model per the function's safety.
    unsafe { model.as_ref() }.map_or(0, |m| m.backend.vocab_size())
}

/// # Safety
/// `model` NULL or live.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_context_length(model: *const KilnModel) -> usize {
    // SAFETY: NULL or a live model per the function's safety.
    unsafe { model.as_ref() }.map_or(0, |m| m.backend.context_length())
}

/// # Safety
/// `model` NULL or live.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_position(model: *const KilnModel) -> usize {
    // SAFETY: NULL or a live model per the function's safety.
    unsafe { model.as_ref() }.map_or(0, |m| m.backend.position())
}

/// The end-of-sequence token of the model's tokenizer, or `KILN_NO_TOKEN` (u32::MAX) if it has none or
/// `model` is NULL.
///
/// # Safety
/// `model` NULL or live.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_eos_token(model: *const KilnModel) -> u32 {
    // SAFETY: NULL or a live model per the function's safety.
    unsafe { model.as_ref() }.and_then(|m| m.backend.manifest().eos_token).unwrap_or(u32::MAX)
}

/// The bytes token `token` stands for in text (empty for control tokens such as BOS/EOS):
/// `*bytes` points to `*len` bytes owned by the library (not NUL-terminated, possibly part of a UTF-8
/// character), valid as long as the program runs.
///
/// # Safety
/// `model` NULL or live; `bytes`/`len` writable.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_token_bytes(
    model: *const KilnModel,
    token: u32,
    bytes: *mut *const u8,
    len: *mut usize,
) -> i32 {
    guard("kiln_model_token_bytes", || {
        // SAFETY: NULL or a live model per the function's safety.
        let Some(m) = (unsafe { model.as_ref() }) else { return err(Status::NullArgument, "model is NULL") };
        if bytes.is_null() || len.is_null() {
            return err(Status::NullArgument, if bytes.is_null() { "bytes is NULL" } else { "len is NULL" });
        }
        let Some((blob, offsets)) = m.vocab else {
            return err(Status::Unavailable, "the model was compiled without a token table (no GGUF tokenizer)");
        };
        let i = token as usize;
        if i + 1 >= offsets.len() {
            return err(
                Status::BadToken,
                format!("token id {token} is outside the vocabulary of {}", offsets.len() - 1),
            );
        }
        let piece = &blob[offsets[i] as usize..offsets[i + 1] as usize];
        // SAFETY: both checked non-null.
        unsafe {
            *bytes = piece.as_ptr();
            *len = piece.len();
        }
        Ok(())
    })
}

/// Makes a sampler; temperature 0 is greedy (arg-max, ties to the lowest id).
///
/// # Safety
/// `params` readable, `out` writable.
#[no_mangle]
pub unsafe extern "C" fn kiln_sampler_create(params: *const KilnSamplingParams, out: *mut *mut KilnSampler) -> i32 {
    guard("kiln_sampler_create", || {
        if out.is_null() {
            return err(Status::NullArgument, "out is NULL");
        }
        // SAFETY: checked non-null.
        unsafe { *out = std::ptr::null_mut() };
        // SAFETY: NULL or readable per the function's safety.
        let Some(p) = (unsafe { params.as_ref() }) else {
            return err(Status::NullArgument, "params is NULL");
        };
        if !p.temperature.is_finite() || p.temperature < 0.0 {
            return err(Status::InvalidArgument, format!("temperature {} must be finite and >= 0", p.temperature));
        }
        if !(p.top_p > 0.0 && p.top_p <= 1.0) {
            return err(Status::InvalidArgument, format!("top_p {} must be in (0, 1]", p.top_p));
        }
        let sampler = Sampler::new(SamplingParams {
            temperature: p.temperature,
            top_k: p.top_k as usize,
            top_p: p.top_p,
            seed: p.seed,
        });
        // SAFETY: checked non-null.
        unsafe { *out = Box::into_raw(Box::new(KilnSampler { sampler })) };
        Ok(())
    })
}

/// Samples the next token from the model's current logits.
///
/// # Safety
/// `sampler`, `model` live; `token` writable.
#[no_mangle]
pub unsafe extern "C" fn kiln_sampler_sample(sampler: *mut KilnSampler, model: *mut KilnModel, token: *mut u32) -> i32 {
    guard("kiln_sampler_sample", || {
        if sampler.is_null() || token.is_null() {
            return err(Status::NullArgument, if sampler.is_null() { "sampler is NULL" } else { "token is NULL" });
        }
        with_model(model, |m| {
            let Some(l) = &m.logits else {
                return err(Status::NotReady, "no logits yet: call kiln_model_prefill first");
            };
            // SAFETY: both checked non-null; live per the function's safety.
            unsafe { *token = (*sampler).sampler.sample(l.last()) };
            Ok(())
        })
    })
}

/// Frees a sampler (NULL is ignored).
///
/// # Safety
/// `sampler` NULL or from `kiln_sampler_create`, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn kiln_sampler_free(sampler: *mut KilnSampler) {
    if !sampler.is_null() {
        // SAFETY: per the function's safety, the box came from kiln_sampler_create and is freed once.
        drop(unsafe { Box::from_raw(sampler) });
    }
}

/// The C ABI version this runtime implements.
#[no_mangle]
pub extern "C" fn kiln_abi_version() -> u32 {
    KILN_ABI_VERSION
}

/// A short description of a status code (a static string).
#[no_mangle]
pub extern "C" fn kiln_status_string(status: i32) -> *const c_char {
    Status::name(status).as_ptr()
}

/// The message of the last failed call on this thread ("" if none); valid until the thread's next failing
/// call.
#[no_mangle]
pub extern "C" fn kiln_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_declares_this_abi_version_and_every_status() {
        let h = include_str!("../include/kiln_model.h");
        assert!(h.contains(&format!("#define KILN_ABI_VERSION {KILN_ABI_VERSION}\n")), "kiln_model.h ABI version");
        for (name, code) in [
            ("KILN_OK", Status::Ok),
            ("KILN_ERR_NULL_ARGUMENT", Status::NullArgument),
            ("KILN_ERR_INVALID_ARGUMENT", Status::InvalidArgument),
            ("KILN_ERR_IO", Status::Io),
            ("KILN_ERR_WRONG_WEIGHTS", Status::WrongWeights),
            ("KILN_ERR_UNSUPPORTED_CPU", Status::UnsupportedCpu),
            ("KILN_ERR_ABI_MISMATCH", Status::AbiMismatch),
            ("KILN_ERR_BAD_TOKEN", Status::BadToken),
            ("KILN_ERR_CONTEXT_FULL", Status::ContextFull),
            ("KILN_ERR_NOT_READY", Status::NotReady),
            ("KILN_ERR_INTERNAL", Status::Internal),
            ("KILN_ERR_UNAVAILABLE", Status::Unavailable),
        ] {
            assert!(h.contains(&format!("{name} = {},", code as i32)), "kiln_model.h lacks `{name} = {}`", code as i32);
        }
        for f in [
            "kiln_abi_version",
            "kiln_model_create",
            "kiln_model_free",
            "kiln_model_prefill",
            "kiln_model_decode",
            "kiln_model_logits",
            "kiln_model_reset",
            "kiln_model_vocab_size",
            "kiln_model_context_length",
            "kiln_model_position",
            "kiln_model_eos_token",
            "kiln_model_token_bytes",
            "kiln_sampler_create",
            "kiln_sampler_sample",
            "kiln_sampler_free",
            "kiln_status_string",
            "kiln_last_error",
        ] {
            assert!(
                h.contains(&format!(" {f}(")) || h.contains(&format!("*{f}(")),
                "kiln_model.h does not declare {f}"
            );
        }
    }

    #[test]
    fn null_pointers_and_bad_parameters_are_errors_with_messages() {
        let last = || unsafe { CStr::from_ptr(kiln_last_error()) }.to_string_lossy().into_owned();
        unsafe {
            assert_eq!(kiln_model_prefill(std::ptr::null_mut(), [1u32].as_ptr(), 1), Status::NullArgument as i32);
            assert!(last().contains("model is NULL"), "{}", last());
            assert_eq!(kiln_model_decode(std::ptr::null_mut(), 1), Status::NullArgument as i32);
            assert_eq!(kiln_model_reset(std::ptr::null_mut()), Status::NullArgument as i32);
            assert_eq!(kiln_model_vocab_size(std::ptr::null()), 0);
            let mut s = std::ptr::null_mut();
            let bad = KilnSamplingParams { temperature: f32::NAN, top_k: 0, top_p: 1.0, seed: 0 };
            assert_eq!(kiln_sampler_create(&bad, &mut s), Status::InvalidArgument as i32);
            assert!(s.is_null() && last().contains("temperature"), "{}", last());
            let bad = KilnSamplingParams { temperature: 1.0, top_k: 0, top_p: 0.0, seed: 0 };
            assert_eq!(kiln_sampler_create(&bad, &mut s), Status::InvalidArgument as i32);
            assert_eq!(kiln_sampler_create(std::ptr::null(), &mut s), Status::NullArgument as i32);
            let mut out = std::ptr::null_mut();
            assert_eq!(
                kiln_capi_create_embedded(std::ptr::null(), c"w".as_ptr(), 1, 0, &mut out),
                Status::Internal as i32
            );
            let d = EmbeddedModel {
                abi_version: KILN_ABI_VERSION + 1,
                kernel_count: 0,
                manifest: std::ptr::null(),
                manifest_len: 0,
                names: std::ptr::null(),
                kernels: std::ptr::null(),
                vocab_count: 0,
                vocab_bytes: std::ptr::null(),
                vocab_offsets: std::ptr::null(),
            };
            assert_eq!(kiln_capi_create_embedded(&d, c"w".as_ptr(), 1, 0, &mut out), Status::AbiMismatch as i32);
            assert!(out.is_null() && last().contains("ABI"), "{}", last());
            kiln_model_free(std::ptr::null_mut());
            kiln_sampler_free(std::ptr::null_mut());
            assert_eq!(kiln_capi_create_embedded(&d, c"w".as_ptr(), 1, 0, std::ptr::null_mut()), 1);
            assert_eq!(CStr::from_ptr(kiln_status_string(99)).to_str().unwrap(), "unknown status code");
        }
    }

    /// A descriptor over `manifest` with no kernels, and the status and message of creating from it.
    fn create_with(manifest: &kiln_ir::program::Manifest, weights: &std::ffi::CStr) -> (i32, String) {
        let json = serde_json::to_string(manifest).unwrap();
        let names: [*const c_char; 0] = [];
        let kernels: [KernelFn; 0] = [];
        let d = EmbeddedModel {
            abi_version: KILN_ABI_VERSION,
            kernel_count: 0,
            manifest: json.as_ptr(),
            manifest_len: json.len() as u64,
            names: names.as_ptr(),
            kernels: kernels.as_ptr(),
            vocab_count: 0,
            vocab_bytes: std::ptr::null(),
            vocab_offsets: std::ptr::null(),
        };
        let mut out = std::ptr::null_mut();
        let status = unsafe { kiln_capi_create_embedded(&d, weights.as_ptr(), 1, 0, &mut out) };
        assert!(out.is_null());
        (status, unsafe { CStr::from_ptr(kiln_last_error()) }.to_string_lossy().into_owned())
    }

    fn manifest(features: &[&str], weights_len: u64) -> kiln_ir::program::Manifest {
        kiln_ir::program::Manifest {
            format_version: kiln_ir::program::ARTIFACT_FORMAT_VERSION,
            kiln_version: "test".into(),
            model_name: "m".into(),
            source_hash: String::new(),
            target: kiln_ir::program::TargetInfo {
                triple: "x".into(),
                cpu: "y".into(),
                features: features.iter().map(|f| f.to_string()).collect(),
            },
            context_length: 4,
            vocab_size: 2,
            eos_token: None,
            passes: Vec::new(),
            records: Vec::new(),
            library: kiln_ir::program::EMBEDDED_LIBRARY.into(),
            library_hash: String::new(),
            weights: "weights.bin".into(),
            weights_len,
            weights_hash: blake3_hex(b"abcd"),
            kernels: Vec::new(),
            program: kiln_ir::program::Program {
                buffers: Vec::new(),
                launches: Vec::new(),
                outputs: Vec::new(),
                regions: Vec::new(),
            },
            early_exit: None,
            compile_seconds: 0.0,
        }
    }

    fn blake3_hex(bytes: &[u8]) -> String {
        blake3::hash(bytes).to_hex().to_string()
    }

    #[test]
    fn token_bytes_reads_the_descriptors_table() {
        let path = std::env::temp_dir().join(format!("kiln-capi-vocab-{}", std::process::id()));
        std::fs::write(&path, b"abcd").unwrap();
        let cpath = CString::new(path.to_str().unwrap()).unwrap();
        let json = serde_json::to_string(&manifest(&[], 4)).unwrap();
        let (names, kernels): ([*const c_char; 0], [KernelFn; 0]) = ([], []);
        let (blob, offsets) = (b"he\xc3llo", [0u32, 2, 2, 6]);
        let mut d = EmbeddedModel {
            abi_version: KILN_ABI_VERSION,
            kernel_count: 0,
            manifest: json.as_ptr(),
            manifest_len: json.len() as u64,
            names: names.as_ptr(),
            kernels: kernels.as_ptr(),
            vocab_count: 3,
            vocab_bytes: blob.as_ptr(),
            vocab_offsets: offsets.as_ptr(),
        };
        let mut m = std::ptr::null_mut();
        unsafe {
            assert_eq!(kiln_capi_create_embedded(&d, cpath.as_ptr(), 1, 0, &mut m), 0);
            let (mut p, mut n) = (std::ptr::null(), 0usize);
            let piece = |p: *const u8, n: usize| std::slice::from_raw_parts(p, n).to_vec();
            assert_eq!(kiln_model_token_bytes(m, 0, &mut p, &mut n), 0);
            assert_eq!(piece(p, n), b"he");
            assert_eq!(kiln_model_token_bytes(m, 1, &mut p, &mut n), 0);
            assert_eq!(n, 0);
            assert_eq!(kiln_model_token_bytes(m, 2, &mut p, &mut n), 0);
            assert_eq!(piece(p, n), b"\xc3llo");
            assert_eq!(kiln_model_token_bytes(m, 3, &mut p, &mut n), Status::BadToken as i32);
            assert_eq!(kiln_model_token_bytes(m, u32::MAX, &mut p, &mut n), Status::BadToken as i32);
            assert_eq!(kiln_model_token_bytes(m, 0, &mut p, std::ptr::null_mut()), Status::NullArgument as i32);
            kiln_model_free(m);
            // Offsets that go backwards are refused at create time.
            let bad = [0u32, 4, 2, 6];
            d.vocab_offsets = bad.as_ptr();
            assert_eq!(kiln_capi_create_embedded(&d, cpath.as_ptr(), 1, 0, &mut m), Status::Internal as i32);
            assert!(m.is_null());
        }
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn create_checks_cpu_features_format_and_weights() {
        let path = std::env::temp_dir().join(format!("kiln-capi-weights-{}", std::process::id()));
        std::fs::write(&path, b"abcd").unwrap();
        let cpath = CString::new(path.to_str().unwrap()).unwrap();
        // Code for a CPU feature this machine lacks is refused, naming the feature.
        #[cfg(target_arch = "x86_64")]
        if let Some(f) = ["avx512f", "avx512vnni", "avxvnni", "avx2"].into_iter().find(|f| match *f {
            "avx512f" => !std::arch::is_x86_feature_detected!("avx512f"),
            "avx512vnni" => !std::arch::is_x86_feature_detected!("avx512vnni"),
            "avxvnni" => !std::arch::is_x86_feature_detected!("avxvnni"),
            _ => !std::arch::is_x86_feature_detected!("avx2"),
        }) {
            let (status, msg) = create_with(&manifest(&[f], 4), &cpath);
            assert_eq!(status, Status::UnsupportedCpu as i32, "{msg}");
            assert!(msg.contains(f), "{msg}");
        }
        let mut m = manifest(&[], 4);
        m.format_version += 1;
        let (status, msg) = create_with(&m, &cpath);
        assert_eq!(status, Status::Internal as i32);
        assert!(msg.contains("format"), "{msg}");
        let (status, msg) = create_with(&manifest(&[], 5), &cpath);
        assert_eq!(status, Status::WrongWeights as i32);
        assert!(msg.contains(path.to_str().unwrap()) && msg.contains("5"), "{msg}");
        std::fs::write(&path, b"abce").unwrap();
        let (status, msg) = create_with(&manifest(&[], 4), &cpath);
        assert_eq!(status, Status::WrongWeights as i32);
        assert!(msg.contains("hash"), "{msg}");
        std::fs::remove_file(&path).unwrap();
    }
}
