//! The compiled backend: loads an artifact directory (manifest, kernel library, weight blob), checks it
//! belongs together and fits this CPU, and executes its program step by step with a persistent KV cache.
//!
//! Execution: for each launch, evaluate its dims for this step (`batch` = 1, `seq`, `past`), point the
//! kernel at its buffers, and split its work items over a thread pool built once per backend.

use crate::backend::{Backend, Logits, RuntimeError, SeqId, Sequences};
use crate::early_exit::{ExitMode, ExitSchedule};
use crate::pool::SpinPool;
use kiln_ir::collective::{
    all_gather_rows, bind_shard_symbols, reduce_scatter_rows, shard_range, Collective, SingleRank,
};
use kiln_ir::program::CollectiveKind;
use kiln_ir::program::{BufferKind, Manifest, Program, ARTIFACT_FORMAT_VERSION};
use kiln_ir::{DType, SymEnv};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A generated kernel (the uniform ABI of `kiln_ir::program`).
pub type KernelFn = unsafe extern "C" fn(*const *mut u8, *const i64, i64, i64);

/// Where a backend's kernels come from.
pub enum KernelSource {
    /// An artifact's shared library, opened with `dlopen` (its hash checked against the manifest).
    Library(PathBuf),
    /// Kernels linked into this program (a library from `kiln compile --emit lib`), by symbol.
    Linked(HashMap<String, KernelFn>),
}

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("{path}: {msg}")]
    Invalid { path: PathBuf, msg: String },
    /// The weight file is not the one the code was compiled with (size or hash).
    #[error("{path}: {msg}")]
    WrongWeights { path: PathBuf, msg: String },
    /// The code needs CPU features this machine lacks.
    #[error("{path}: {msg}")]
    UnsupportedCpu { path: PathBuf, msg: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn invalid(path: &Path, msg: impl Into<String>) -> ArtifactError {
    ArtifactError::Invalid { path: path.to_path_buf(), msg: msg.into() }
}

/// Whether this CPU has an LLVM-named feature; `None` for features the runtime does not know. The
/// names are `kiln_ir::program::CHECKED_CPU_FEATURES` (`is_x86_feature_detected!` needs literals).
fn host_has(feature: &str) -> Option<bool> {
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! check {
            ($($f:tt),*) => { match feature { $( $f => Some(std::arch::is_x86_feature_detected!($f)), )* _ => None } };
        }
        check!(
            "sse4.2",
            "avx",
            "avx2",
            "fma",
            "f16c",
            "bmi2",
            "avx512f",
            "avx512bw",
            "avx512vl",
            "avx512dq",
            "avx512vnni",
            "avxvnni"
        )
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = feature;
        None
    }
}

pub fn blake3_file(path: &Path) -> Result<String, ArtifactError> {
    let mut h = blake3::Hasher::new();
    h.update_mmap_rayon(path).map_err(|source| ArtifactError::Io { path: path.into(), source })?;
    Ok(h.finalize().to_hex().to_string())
}

/// Reads and checks `DIR/manifest.json` and the files it names.
pub fn load_manifest(dir: &Path) -> Result<Manifest, ArtifactError> {
    let mpath = dir.join("manifest.json");
    let text = std::fs::read_to_string(&mpath).map_err(|source| ArtifactError::Io { path: mpath.clone(), source })?;
    let m = parse_manifest(&text, &mpath)?;
    check_weights(&m, &dir.join(&m.weights))?;
    let lpath = dir.join(&m.library);
    if blake3_file(&lpath)? != m.library_hash {
        return Err(invalid(&lpath, "kernel library does not match the manifest's hash"));
    }
    Ok(m)
}

/// Parses a manifest (`path` names it in errors) and checks its format version and that this CPU has
/// the features its code was compiled for.
pub fn parse_manifest(text: &str, path: &Path) -> Result<Manifest, ArtifactError> {
    let m: Manifest = serde_json::from_str(text).map_err(|e| invalid(path, format!("invalid manifest: {e}")))?;
    if m.format_version != ARTIFACT_FORMAT_VERSION {
        return Err(invalid(
            path,
            format!("artifact format {} (this Kiln reads {ARTIFACT_FORMAT_VERSION}); recompile", m.format_version),
        ));
    }
    let missing: Vec<&str> =
        m.target.features.iter().map(String::as_str).filter(|f| host_has(f) == Some(false)).collect();
    if !missing.is_empty() {
        return Err(ArtifactError::UnsupportedCpu {
            path: path.into(),
            msg: format!(
                "compiled for CPU features this machine lacks: {}; recompile for this host",
                missing.join(", ")
            ),
        });
    }
    Ok(m)
}

/// Checks that the weight file `wpath` is the one `m` was compiled with (size, then blake3 hash).
pub fn check_weights(m: &Manifest, wpath: &Path) -> Result<(), ArtifactError> {
    let len = std::fs::metadata(wpath).map_err(|source| ArtifactError::Io { path: wpath.into(), source })?.len();
    if len != m.weights_len {
        return Err(ArtifactError::WrongWeights {
            path: wpath.into(),
            msg: format!(
                "weights are {len} bytes, the code was compiled for {} (truncated, or another model's weights)",
                m.weights_len
            ),
        });
    }
    if blake3_file(wpath)? != m.weights_hash {
        return Err(ArtifactError::WrongWeights {
            path: wpath.into(),
            msg: "weights do not match the manifest's hash (corrupted or from another model)".into(),
        });
    }
    Ok(())
}

/// Raw pointers handed to kernels on worker threads; the buffers outlive the launch and threads write
/// disjoint work items.
#[derive(Clone, Copy)]
struct SendPtr(*const *mut u8, *const i64);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// Calls `kernel` on work items `lo..hi` (a method, so closures capture the whole `SendPtr`).
    ///
    /// # Safety
    /// The pointers must be the launch's live argument arrays and `lo..hi` within its work items.
    unsafe fn call(self, kernel: KernelFn, lo: i64, hi: i64) {
        kernel(self.0, self.1, lo, hi)
    }
}

/// A KV-cache buffer, the block region it belongs to (if any), and the rows written so far.
struct Cache {
    buffer: usize,
    region: Option<usize>,
    rows: usize,
}

enum Storage {
    Weight(usize),
    Floats(Floats),
    Ints(Vec<i32>),
}

/// An f32 buffer whose elements start on a cache line (64 bytes), whatever the allocator's state: the
/// kernels' vector loads and stores then split no line at a buffer's start, and two threads' halves of
/// an output meet where the work split puts them, not where the heap happened to place the buffer. It is
/// a `Vec<f32>` 15 elements longer than needed, used from its first 64-byte boundary; zeroed memory comes
/// from `vec![0.0; n]` (calloc: a KV cache's pages are not touched until written).
struct Floats {
    buf: Vec<f32>,
    /// Index of the first element on a 64-byte boundary.
    off: usize,
    len: usize,
}

/// Slack so that a 64-byte boundary falls within the first 16 elements.
const ALIGN_SLACK: usize = 15;

fn aligned_offset(v: &[f32]) -> usize {
    (64 - v.as_ptr() as usize % 64) % 64 / std::mem::size_of::<f32>()
}

impl Floats {
    fn zeros(len: usize) -> Floats {
        let buf = vec![0.0; len + ALIGN_SLACK];
        Floats { off: aligned_offset(&buf), buf, len }
    }

    /// Like `Vec::resize(len, 0.0)`: elements up to the old length keep their values, the rest are zero.
    fn resize(&mut self, len: usize) {
        let kept = self.len.min(len);
        if self.buf.len() < len + ALIGN_SLACK {
            self.buf.resize(len + ALIGN_SLACK, 0.0);
            let off = aligned_offset(&self.buf);
            if off != self.off {
                self.buf.copy_within(self.off..self.off + kept, off);
                self.off = off;
            }
        }
        self.buf[self.off + kept..self.off + len].fill(0.0);
        self.len = len;
    }

    fn as_slice(&self) -> &[f32] {
        &self.buf[self.off..self.off + self.len]
    }

    fn as_mut_ptr(&mut self) -> *mut f32 {
        self.buf[self.off..].as_mut_ptr()
    }
}

pub struct CompiledBackend {
    manifest: Manifest,
    weights: memmap2::Mmap,
    kernels: Vec<KernelFn>,
    storage: Vec<Storage>,
    /// The KV caches (state buffers, not the whole ones: those are overwritten in place), with the rows
    /// each has written so far: `past` for every cache unless an early-exit schedule skipped blocks.
    caches: Vec<Cache>,
    /// Per-position early exit: which blocks each position runs.
    exit: Option<(ExitMode, ExitSchedule)>,
    past: usize,
    capacity: usize,
    pool: SpinPool,
    /// This rank's communicator (a single rank unless set by [`CompiledBackend::with_collective`]).
    collective: Arc<dyn Collective>,
    /// The current sequence; the others' state buffers, cache rows and positions wait here.
    seqs: Sequences<Parked>,
    /// Keeps a `dlopen`ed kernel library loaded while its functions are in `kernels`.
    _lib: Option<libloading::Library>,
}

/// A sequence that is not current: its state buffers (by buffer index), its caches' rows, its position.
struct Parked {
    states: Vec<(usize, Floats)>,
    rows: Vec<usize>,
    past: usize,
}

impl CompiledBackend {
    /// Loads the artifact in `dir`; `threads` = 0 uses every core; the KV cache holds `capacity`
    /// positions (at most the model's context length).
    pub fn load(dir: &Path, threads: usize, capacity: Option<usize>) -> Result<Self, ArtifactError> {
        let manifest = load_manifest(dir)?;
        let wpath = dir.join(&manifest.weights);
        let lpath = dir.join(&manifest.library);
        Self::from_parts(manifest, &wpath, KernelSource::Library(lpath), threads, capacity)
    }

    /// A backend for `manifest` (already checked: see [`parse_manifest`], [`check_weights`]) over the
    /// weight file `wpath`, with kernels from `source`.
    pub fn from_parts(
        manifest: Manifest,
        wpath: &Path,
        source: KernelSource,
        threads: usize,
        capacity: Option<usize>,
    ) -> Result<Self, ArtifactError> {
        let dir = wpath.parent().unwrap_or(Path::new("."));
        let file = std::fs::File::open(wpath).map_err(|source| ArtifactError::Io { path: wpath.into(), source })?;
        // SAFETY: mapped read-only; the artifact is not modified while loaded (its hash was just checked).
        let weights =
            unsafe { memmap2::Mmap::map(&file) }.map_err(|source| ArtifactError::Io { path: wpath.into(), source })?;
        let mut lib = None;
        let mut kernels = Vec::new();
        match source {
            KernelSource::Library(lpath) => {
                // SAFETY: the library is Kiln's own generated code, whose hash the manifest vouches for;
                // loading runs no initialisers of ours.
                let l = unsafe { libloading::Library::new(&lpath) }
                    .map_err(|e| invalid(&lpath, format!("cannot load: {e}")))?;
                for launch in &manifest.program.launches {
                    if launch.collective.is_some() {
                        kernels.push(no_kernel as KernelFn);
                        continue;
                    }
                    // SAFETY: every kernel symbol has the uniform kernel ABI (see kiln_ir::program).
                    let f: libloading::Symbol<KernelFn> = unsafe { l.get(launch.kernel.as_bytes()) }
                        .map_err(|e| invalid(&lpath, format!("kernel `{}` missing: {e}", launch.kernel)))?;
                    kernels.push(*f);
                }
                lib = Some(l);
            }
            KernelSource::Linked(table) => {
                for launch in &manifest.program.launches {
                    if launch.collective.is_some() {
                        kernels.push(no_kernel as KernelFn);
                        continue;
                    }
                    let f = table.get(&launch.kernel).ok_or_else(|| {
                        invalid(wpath, format!("kernel `{}` is not linked into this program", launch.kernel))
                    })?;
                    kernels.push(*f);
                }
            }
        }
        let capacity = capacity.unwrap_or(manifest.context_length).min(manifest.context_length);
        let mut storage = Vec::new();
        for (i, b) in manifest.program.buffers.iter().enumerate() {
            storage.push(match &b.kind {
                BufferKind::Weight { offset, len, name } => {
                    if offset.checked_add(*len).is_none_or(|end| end > weights.len() as u64) {
                        return Err(invalid(wpath, format!("weight `{name}` lies outside the weight file")));
                    }
                    Storage::Weight(*offset as usize)
                }
                BufferKind::Input { .. } => Storage::Ints(Vec::new()),
                BufferKind::Temp => Storage::Floats(Floats::zeros(0)),
                BufferKind::State { row_elems, whole: true, .. } => Storage::Floats(Floats::zeros(*row_elems as usize)),
                BufferKind::State { row_elems, .. } => Storage::Floats(Floats::zeros(capacity * *row_elems as usize)),
            });
            if !matches!(b.dtype, DType::F32 | DType::I32) && !matches!(b.kind, BufferKind::Weight { .. }) {
                return Err(invalid(dir, format!("buffer {i} has unsupported dtype {}", b.dtype)));
            }
        }
        let threads = if threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { threads };
        let pool = SpinPool::new(threads).map_err(|e| invalid(dir, format!("starting worker threads: {e}")))?;
        let regions = &manifest.program.regions;
        let caches = (manifest.program.buffers.iter().enumerate())
            .filter(|(_, b)| matches!(b.kind, BufferKind::State { whole: false, .. }))
            .map(|(buffer, _)| Cache {
                buffer,
                region: regions.iter().position(|r| r.states.contains(&buffer)),
                rows: 0,
            })
            .collect();
        let exit = match &manifest.early_exit {
            None => None,
            Some(spec) => {
                let mode = ExitMode::parse(&spec.mode)
                    .ok_or_else(|| invalid(dir, format!("early-exit mode `{}` is not top or lower", spec.mode)))?;
                let n = manifest.program.regions.len();
                if n == 0 {
                    return Err(invalid(dir, "an early-exit schedule but no skippable blocks"));
                }
                let schedule = ExitSchedule::new(spec.schedule.clone(), n)
                    .map_err(|e| invalid(dir, format!("early-exit schedule: {e}")))?;
                Some((mode, schedule))
            }
        };
        Ok(CompiledBackend {
            manifest,
            weights,
            kernels,
            storage,
            caches,
            exit,
            past: 0,
            capacity,
            pool,
            collective: Arc::new(SingleRank),
            seqs: Sequences::new(),
            _lib: lib,
        })
    }

    /// Runs as one rank of a tensor-parallel group: the program's collective launches go through `c`.
    pub fn with_collective(mut self, c: Arc<dyn Collective>) -> Self {
        self.collective = c;
        self
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    /// Decoder blocks the program can skip per step ([`Self::step_blocks`]); 0 if it cannot.
    pub fn blocks(&self) -> usize {
        self.manifest.program.regions.len()
    }

    /// Runs `schedule` from now on (SkipDecode / truncation, see [`crate::early_exit`]): each step runs
    /// the blocks `mode` keeps at the depth its positions have. Errors if the program cannot skip blocks.
    pub fn set_early_exit(&mut self, mode: ExitMode, schedule: ExitSchedule) -> Result<(), RuntimeError> {
        if self.blocks() == 0 {
            return Err(RuntimeError::Interface("decoder blocks it can skip (recompile it)".into(), "program"));
        }
        self.exit = Some((mode, schedule));
        Ok(())
    }
}

impl Backend for CompiledBackend {
    fn name(&self) -> &str {
        "compiled-cpu"
    }
    fn vocab_size(&self) -> usize {
        self.manifest.vocab_size
    }
    fn context_length(&self) -> usize {
        self.capacity
    }
    fn position(&self) -> usize {
        self.past
    }
    fn output(&self, name: &str) -> Option<&[f32]> {
        let (_, b) = self.manifest.program.outputs.iter().find(|(n, _)| n == name)?;
        match &self.storage[*b] {
            Storage::Floats(v) => Some(v.as_slice()),
            _ => None,
        }
    }
    /// A whole (fixed-size) state buffer, e.g. CoreInfer's `core_set.L` (not the KV caches).
    fn state(&self, name: &str) -> Option<&[f32]> {
        let b = self
            .manifest
            .program
            .buffers
            .iter()
            .position(|b| matches!(&b.kind, BufferKind::State { name: n, whole: true, .. } if n == name))?;
        match &self.storage[b] {
            Storage::Floats(v) => Some(v.as_slice()),
            _ => None,
        }
    }
    fn reset(&mut self) {
        // Rows past `past` are never read, so the cache need not be cleared.
        self.past = 0;
        self.caches.iter_mut().for_each(|c| c.rows = 0);
    }

    fn sequence(&self) -> SeqId {
        self.seqs.current()
    }

    /// Each sequence has its own state buffers (KV caches of `capacity` rows, whole states), allocated
    /// the first time it is selected; switching moves buffers, it copies nothing.
    fn select(&mut self, seq: SeqId) -> Result<(), RuntimeError> {
        if seq == self.seqs.current() {
            return Ok(());
        }
        let incoming = match self.seqs.take(seq) {
            Some(p) => p,
            None => self.fresh_sequence(),
        };
        let mut outgoing = Parked {
            states: Vec::with_capacity(incoming.states.len()),
            rows: self.caches.iter().map(|c| c.rows).collect(),
            past: self.past,
        };
        for (b, v) in incoming.states {
            let Storage::Floats(cur) = &mut self.storage[b] else { unreachable!("state buffers hold floats") };
            outgoing.states.push((b, std::mem::replace(cur, v)));
        }
        for (c, rows) in self.caches.iter_mut().zip(incoming.rows) {
            c.rows = rows;
        }
        self.past = incoming.past;
        self.seqs.park(outgoing, seq);
        Ok(())
    }

    fn release(&mut self, seq: SeqId) {
        if self.seqs.release(seq) {
            self.reset();
        }
    }

    fn forward(&mut self, tokens: &[u32]) -> Result<Logits, RuntimeError> {
        match &self.exit {
            None => self.step(tokens)?,
            Some((mode, schedule)) => {
                let n = self.blocks();
                let active = crate::early_exit::step_blocks(*mode, schedule, n, self.past, tokens.len())?;
                self.step_blocks(tokens, Some(&active))?;
            }
        }
        let vocab = self.manifest.vocab_size;
        let v = self.output("logits").ok_or(RuntimeError::Interface("logits".into(), "output"))?;
        // Artifacts compiled for generation return the last position only.
        Ok(Logits { rows: v.len() / vocab, vocab, data: v.to_vec() })
    }
}

impl CompiledBackend {
    /// An empty sequence's state: zeroed state buffers (a whole state starts at zero, as at load).
    fn fresh_sequence(&self) -> Parked {
        let states = (self.manifest.program.buffers.iter().enumerate())
            .filter_map(|(i, b)| match &b.kind {
                BufferKind::State { row_elems, whole: true, .. } => Some((i, Floats::zeros(*row_elems as usize))),
                BufferKind::State { row_elems, .. } => Some((i, Floats::zeros(self.capacity * *row_elems as usize))),
                _ => None,
            })
            .collect();
        Parked { states, rows: vec![0; self.caches.len()], past: 0 }
    }

    /// Runs the program on `tokens` at the next positions, appending to the KV cache; the results are
    /// then available from [`Backend::output`].
    pub fn step(&mut self, tokens: &[u32]) -> Result<(), RuntimeError> {
        self.step_blocks(tokens, None)
    }

    /// [`Self::step`] running only the decoder blocks marked in `active` (one flag per block, in layer
    /// order; `None`: all). A skipped block is the identity on the residual stream and appends no KV
    /// rows; a block that runs must find every earlier row of its cache written
    /// ([`RuntimeError::UnwrittenKv`] otherwise), which a non-increasing early-exit schedule guarantees.
    pub fn step_blocks(&mut self, tokens: &[u32], active: Option<&[bool]>) -> Result<(), RuntimeError> {
        let regions = &self.manifest.program.regions;
        if let Some(a) = active {
            if regions.is_empty() {
                return Err(RuntimeError::Interface(
                    "decoder blocks it can skip (recompile it with this Kiln)".into(),
                    "program",
                ));
            }
            if a.len() != regions.len() {
                return Err(RuntimeError::Interface(format!("{} block flags, not {}", regions.len(), a.len()), "step"));
            }
        }
        let skipped = |r: usize| active.is_some_and(|a| !a[r]);
        // The caches this step appends to: all but those of skipped blocks.
        let appends = |c: &Cache| c.region.is_none_or(|r| !skipped(r));
        if let Some(c) = self.caches.iter().find(|c| appends(c) && c.rows != self.past) {
            let BufferKind::State { name, .. } = &self.manifest.program.buffers[c.buffer].kind else { unreachable!() };
            return Err(RuntimeError::UnwrittenKv { cache: name.clone(), written: c.rows, needed: self.past });
        }
        if tokens.is_empty() {
            return Err(RuntimeError::EmptyPrompt);
        }
        if self.past + tokens.len() > self.capacity {
            return Err(RuntimeError::ContextFull { past: self.past, new: tokens.len(), limit: self.capacity });
        }
        let vocab = self.manifest.vocab_size;
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(RuntimeError::BadToken { id, vocab });
        }
        let s = tokens.len();
        let mut env: SymEnv =
            [("batch".to_string(), 1), ("seq".to_string(), s as i64), ("past".to_string(), self.past as i64)].into();
        bind_shard_symbols(&mut env, self.collective.rank(), self.collective.world());
        let program: &Program = &self.manifest.program;
        for (b, st) in program.buffers.iter().zip(self.storage.iter_mut()) {
            match (&b.kind, st) {
                (BufferKind::Input { name }, Storage::Ints(v)) => {
                    v.clear();
                    match name.as_str() {
                        "tokens" => v.extend(tokens.iter().map(|&t| t as i32)),
                        "pos" => v.extend((self.past..self.past + s).map(|p| p as i32)),
                        other => return Err(RuntimeError::Interface(other.to_string(), "input the runtime can fill")),
                    }
                }
                (BufferKind::Temp, Storage::Floats(v)) => {
                    let n = Program::eval(&b.shape, &env).expect("shapes use batch/seq/past only");
                    v.resize(n);
                }
                _ => {}
            }
        }
        let base = self.weights.as_ptr();
        let ptrs: Vec<*mut u8> = self
            .storage
            .iter_mut()
            .map(|st| match st {
                // SAFETY: offsets were checked against the mapping's length at load time.
                Storage::Weight(off) => unsafe { base.add(*off) as *mut u8 },
                Storage::Floats(v) => v.as_mut_ptr() as *mut u8,
                Storage::Ints(v) => v.as_mut_ptr() as *mut u8,
            })
            .collect();
        let threads = self.pool.threads();
        let mut args: Vec<*mut u8> = Vec::with_capacity(8);
        let mut dims: Vec<i64> = Vec::with_capacity(4);
        let mut next_region = 0;
        let mut li = 0;
        while li < program.launches.len() {
            if let Some(region) = program.regions.get(next_region).filter(|r| r.launches.0 == li) {
                next_region += 1;
                if skipped(next_region - 1) {
                    // The identity on the residual stream: output = input.
                    let n = Program::eval(&program.buffers[region.output].shape, &env).expect("step shapes");
                    debug_assert_eq!(Some(n), Program::eval(&program.buffers[region.input].shape, &env));
                    if region.input != region.output {
                        // SAFETY: two distinct f32 temps of n elements each (resized above).
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                ptrs[region.input] as *const f32,
                                ptrs[region.output] as *mut f32,
                                n,
                            )
                        }
                    }
                    li = region.launches.1;
                    continue;
                }
            }
            let (l, kernel) = (&program.launches[li], self.kernels[li]);
            li += 1;
            if let Some(kind) = l.collective {
                self.communicate(kind, l, &ptrs, &env)?;
                continue;
            }
            args.clear();
            args.extend(l.bufs.iter().map(|&b| ptrs[b]));
            dims.clear();
            dims.extend(l.dims.iter().map(|d| Program::eval(d, &env).expect("dims use batch/seq/past") as i64));
            let items = Program::eval(&l.items, &env).expect("items use batch/seq/past") as i64;
            let p = SendPtr(args.as_ptr(), dims.as_ptr());
            if l.parallel && threads > 1 && items > 1 {
                let chunks = (threads as i64).min(items);
                self.pool.run(&|c| {
                    let c = c as i64;
                    if c < chunks {
                        let (lo, hi) = (items * c / chunks, items * (c + 1) / chunks);
                        // SAFETY: each chunk computes disjoint work items of a kernel generated for
                        // exactly these buffers and dims.
                        unsafe { p.call(kernel, lo, hi) }
                    }
                });
            } else {
                // SAFETY: as above, one chunk.
                unsafe { p.call(kernel, 0, items) }
            }
        }
        for c in self.caches.iter_mut().filter(|c| appends(c)) {
            c.rows += s;
        }
        self.past += s;
        Ok(())
    }

    /// Executes a collective launch: bufs [x, out], both f32 temps of the sizes their shapes give.
    fn communicate(
        &self,
        kind: CollectiveKind,
        l: &kiln_ir::program::Launch,
        ptrs: &[*mut u8],
        env: &SymEnv,
    ) -> Result<(), RuntimeError> {
        let program = &self.manifest.program;
        let len_of = |b: usize| Program::eval(&program.buffers[b].shape, env).expect("shapes use bound symbols");
        let (xb, ob) = (l.bufs[0], l.bufs[1]);
        let (nx, no) = (len_of(xb), len_of(ob));
        // SAFETY: both are f32 temps sized for this step above; `x` is computed and `out` is not read by
        // anything else until this launch finishes (temps are written once).
        let (x, out) = unsafe {
            (
                std::slice::from_raw_parts(ptrs[xb] as *const f32, nx),
                std::slice::from_raw_parts_mut(ptrs[ob] as *mut f32, no),
            )
        };
        let c = &*self.collective;
        let fail = |msg: String| RuntimeError::Collective { launch: l.label.clone(), msg };
        let dim = |k: usize| Program::eval(&l.dims[k], env).expect("dims use bound symbols");
        match kind {
            CollectiveKind::AllReduce => {
                out.copy_from_slice(x);
                c.all_reduce(out).map_err(fail)
            }
            CollectiveKind::ReduceScatter => reduce_scatter_rows(c, x, dim(0), dim(1), out).map_err(fail),
            CollectiveKind::AllGather => all_gather_rows(c, x, dim(0), dim(1), out).map_err(fail),
            CollectiveKind::Shard => {
                let (len, row) = (dim(0), dim(1));
                let r = shard_range(len, c.rank(), c.world());
                out.copy_from_slice(&x[r.start * row..r.end * row]);
                Ok(())
            }
        }
    }
}

/// Stands in for the kernel of a collective launch (never called).
unsafe extern "C" fn no_kernel(_: *const *mut u8, _: *const i64, _: i64, _: i64) {}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn knows_every_feature_codegen_records() {
        for f in kiln_ir::program::CHECKED_CPU_FEATURES {
            assert!(super::host_has(f).is_some(), "runtime cannot check `{f}`");
        }
    }
}
