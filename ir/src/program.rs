//! The lowered form of a graph: buffers and a schedule of kernel launches.
//!
//! Code generation turns a [`crate::Graph`] into a `Program` plus native kernels; the runtime executes
//! the program by evaluating each launch's symbolic dims, splitting its work items over threads, and
//! calling the kernel. It lives here (not in codegen) so the runtime can read it without linking LLVM.
//!
//! Kernel ABI (every generated kernel): `extern "C" fn(bufs: *const *mut u8, dims: *const i64, begin: i64,
//! end: i64)` — `bufs` are the launch's buffers in order, `dims` its evaluated dims, and `begin..end` the
//! slice of its work items this call computes.

use crate::dtype::DType;
use crate::shape::{Dim, SymEnv};
use serde::{Deserialize, Serialize};

/// Where a buffer's memory comes from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BufferKind {
    /// Filled by the caller each step (token ids, positions), as i32.
    Input { name: String },
    /// A weight in the artifact's weight file, at `offset` (bytes, 64-aligned), `len` bytes.
    Weight { name: String, offset: u64, len: u64 },
    /// A per-step temporary.
    Temp,
    /// Persistent across steps: a KV cache of `capacity` rows (positions) of `row_elems` f32 each.
    /// Launches append rows at position `past`; reads see rows `0..past+seq`. With `whole`, one row of
    /// `row_elems` f32 that launches overwrite in place (CoreInfer's core set, `core_set.L`): state of a
    /// fixed size, not one row per position.
    State {
        name: String,
        row_elems: u64,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        whole: bool,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Buffer {
    pub kind: BufferKind,
    pub dtype: DType,
    /// Shape per step (symbolic); the element count is its product. Unused for `State` (sized by capacity).
    pub shape: Vec<Dim>,
}

/// A launch that is a collective communication step (tensor parallelism): the runtime executes it with
/// its rank's communicator instead of calling a kernel. `bufs` are [x, out]. `AllReduce` has
/// `dims` [[elements]]; the others move whole rows of `[batch = 1, rows, …]` tensors and have `dims`
/// [[full rows], [row elements]], the full row count being the unsharded one (`seq`), from which each
/// rank's share follows (`kiln_ir::collective::shard_range`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CollectiveKind {
    AllReduce,
    ReduceScatter,
    Shard,
    AllGather,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Launch {
    /// Symbol of the kernel in the artifact's library.
    pub kernel: String,
    /// The IR op this launch implements, for profiles and errors (e.g. `%42 linear`).
    pub label: String,
    pub bufs: Vec<usize>,
    /// Scalar arguments, each a product of dims.
    pub dims: Vec<Vec<Dim>>,
    /// Number of independent work items (a product of dims); the runtime splits `0..items` across threads.
    pub items: Vec<Dim>,
    /// Whether the launch is worth splitting across threads.
    pub parallel: bool,
    /// Set for communication steps, which have no kernel (`kernel` is empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collective: Option<CollectiveKind>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Program {
    pub buffers: Vec<Buffer>,
    pub launches: Vec<Launch>,
    /// Named results: the output name and its buffer. State outputs are not listed (they stay inside).
    pub outputs: Vec<(String, usize)>,
    /// The decoder blocks, in layer order, when the graph has them and each block's launches form a
    /// self-contained run (see [`Region`]); empty otherwise.
    #[serde(default)]
    pub regions: Vec<Region>,
}

/// One decoder block of a program: launches `launches.0..launches.1`, which read from outside only the
/// residual stream `input` (plus weights, inputs and the block's own state) and whose only result used
/// outside is `output` (plus appended KV rows in `states`). Skipping the block = not running those
/// launches and copying `input` to `output` (the block is the identity on the residual stream), so the
/// runtime can run any subset of blocks per step (early exit) from one program.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Region {
    pub layer: usize,
    pub launches: (usize, usize),
    pub input: usize,
    pub output: usize,
    /// The block's KV-cache buffers (`State`).
    pub states: Vec<usize>,
}

/// One graph pass's effect, as the manifest records it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageReport {
    pub pass: String,
    pub changed: bool,
    pub nodes_before: usize,
    pub nodes_after: usize,
    /// Seconds the pass took: reported, never written (like `Manifest::compile_seconds`).
    #[serde(skip)]
    pub seconds: f64,
}

/// A per-position early-exit schedule an artifact runs by default (`kiln compile --early-exit`): from
/// position `schedule[i].0` on, positions run `schedule[i].1` blocks — the top ones dropped (`top`) or the
/// lower ones (`lower`). The runtime checks it (non-increasing) when it loads the artifact.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EarlyExitSpec {
    pub mode: String,
    pub schedule: Vec<(usize, usize)>,
}

impl Program {
    /// Evaluates a product of dims under `env`, as a non-negative count.
    pub fn eval(dims: &[Dim], env: &SymEnv) -> Option<usize> {
        dims.iter().try_fold(1usize, |acc, d| acc.checked_mul(d.eval(env).and_then(|v| usize::try_from(v).ok())?))
    }
}

/// What an artifact directory holds, as `manifest.json`. Written by codegen, checked by the runtime.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Bumped when the artifact layout or kernel ABI changes.
    pub format_version: u32,
    pub kiln_version: String,
    pub model_name: String,
    /// Hash of the model's source (file, or config + weights) that was compiled.
    pub source_hash: String,
    /// Target description: triple, CPU name and the features the code was compiled for.
    pub target: TargetInfo,
    pub context_length: usize,
    pub vocab_size: usize,
    /// The tokenizer's end-of-sequence token, if it has one (for programs that embed the code).
    #[serde(default)]
    pub eos_token: Option<u32>,
    /// Stages of the pipeline, in order.
    pub passes: Vec<String>,
    /// What each stage that ran did (no timings: artifacts are byte-identical for the same inputs;
    /// `kiln compile --json` reports times).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<StageReport>,
    /// What lossy passes did (layers removed, …) and the quality measured for the choice, one JSON
    /// object per record. Absent in artifacts without lossy passes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub records: Vec<serde_json::Value>,
    /// The kernel library's file name and blake3 hash.
    pub library: String,
    pub library_hash: String,
    /// The weight blob's file name, size and blake3 hash.
    pub weights: String,
    pub weights_len: u64,
    pub weights_hash: String,
    /// Generated kernels (symbol → description), for `inspect` and `--explain`.
    pub kernels: Vec<(String, String)>,
    pub program: Program,
    /// The early-exit schedule the program runs unless the caller sets another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub early_exit: Option<EarlyExitSpec>,
    /// Seconds spent compiling: reported, never written, so the same inputs give byte-identical artifacts.
    #[serde(skip)]
    pub compile_seconds: f64,
}

pub const ARTIFACT_FORMAT_VERSION: u32 = 2;

/// Version of the C ABI of libraries from `kiln compile --emit lib` (`KILN_ABI_VERSION` in
/// `kiln_model.h`): the header's functions and the embedded-model descriptor below. Bumped on any change.
///
/// A library object made by codegen defines a constant descriptor (C layout, pointers 8 bytes) —
/// `{ u32 abi_version; u32 kernel_count; const u8 *manifest; u64 manifest_len; const char *const *names;
/// KernelFn const *kernels; u32 vocab_count; const u8 *vocab_bytes; const u32 *vocab_offsets; }` — holding
/// the manifest JSON, a table of the kernels by symbol, and the detokenization table (token `i` is
/// `vocab_bytes[vocab_offsets[i]..vocab_offsets[i + 1]]`; `vocab_count` 0 when there is none), and
/// `int32_t kiln_model_create(const char *weights, uint32_t threads, uint32_t context, KilnModel **out)`,
/// which passes that descriptor to `kiln_capi_create_embedded` (in `kiln-capi`). So the runtime finds
/// the kernels without `dlopen`, and one library holds the code for one model.
pub const C_ABI_VERSION: u32 = 1;

/// The `library` a manifest names when its kernels are linked into the embedding program (no file).
pub const EMBEDDED_LIBRARY: &str = "(embedded)";

/// LLVM feature names whose absence on a host makes code compiled with them unsafe to run: codegen
/// records those it compiled with, the runtime refuses hosts lacking one.
pub const CHECKED_CPU_FEATURES: &[&str] = &[
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
    "avxvnni",
];

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetInfo {
    pub triple: String,
    pub cpu: String,
    /// LLVM feature names (`avx2`, `fma`, …) the code may use; the runtime refuses hosts lacking one.
    pub features: Vec<String>,
}
