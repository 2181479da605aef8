//! The op table: every IR operation, its text name, arity, attributes and family.
//!
//! `ops!` below is the single list of ops; it generates the `Op` enum, the name/arity lookups, the
//! attribute (de)serialisation used by the text form, and the dispatch of each op's rules to its
//! family's file (`op/<family>.rs`: `infer`, the type rule the verifier re-runs; `eval`, the interpreter
//! rule; `expandable`/`expand`, the decomposition into primitives). A unary elementwise op is its table
//! line alone: `=> unary(f, flops)` gives its scalar rule, from which its type rule, interpreter arm and
//! cost follow. `docs/adding-an-op.md` lists every place a new op touches.

use crate::dtype::DType;
use crate::shape::{Dim, SymEnv, TensorType};
use crate::tensor::Tensor;
use serde::{Deserialize, Serialize};
use std::fmt;

// One file per op family: its ops' type rules (`infer`) and interpreter rules (`eval`).
mod attention;
mod collective;
mod coreinfer;
mod elementwise;
mod layout;
mod linear;
mod norm;
mod reduce;
mod rope;
mod source;

/// Attribute values as they appear in the text form, before being given a type.
#[derive(Clone, Debug, PartialEq)]
pub enum AttrValue {
    /// A quoted string.
    Str(String),
    /// A bare token: number, identifier or dimension expression.
    Raw(String),
    List(Vec<AttrValue>),
}

impl fmt::Display for AttrValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttrValue::Str(s) => write!(f, "{s:?}"),
            AttrValue::Raw(s) => f.write_str(s),
            AttrValue::List(items) => {
                f.write_str("[")?;
                for (i, it) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{it}")?;
                }
                f.write_str("]")
            }
        }
    }
}

/// A Rust type usable as an op attribute.
pub trait Attr: Sized {
    fn to_attr(&self) -> AttrValue;
    fn from_attr(v: &AttrValue) -> Result<Self, String>;
}

fn raw(v: &AttrValue) -> Result<&str, String> {
    match v {
        AttrValue::Raw(s) => Ok(s),
        other => Err(format!("expected a bare value, found `{other}`")),
    }
}

impl Attr for String {
    fn to_attr(&self) -> AttrValue {
        AttrValue::Str(self.clone())
    }
    fn from_attr(v: &AttrValue) -> Result<Self, String> {
        match v {
            AttrValue::Str(s) => Ok(s.clone()),
            other => Err(format!("expected a string, found `{other}`")),
        }
    }
}

impl Attr for i64 {
    fn to_attr(&self) -> AttrValue {
        AttrValue::Raw(self.to_string())
    }
    fn from_attr(v: &AttrValue) -> Result<Self, String> {
        let s = raw(v)?;
        s.parse().map_err(|_| format!("expected an integer, found `{s}`"))
    }
}

impl Attr for f32 {
    fn to_attr(&self) -> AttrValue {
        // `{:?}` prints the shortest string that parses back to the same f32.
        AttrValue::Raw(format!("{self:?}"))
    }
    fn from_attr(v: &AttrValue) -> Result<Self, String> {
        let s = raw(v)?;
        s.parse().map_err(|_| format!("expected a number, found `{s}`"))
    }
}

impl Attr for DType {
    fn to_attr(&self) -> AttrValue {
        AttrValue::Raw(self.name().to_string())
    }
    fn from_attr(v: &AttrValue) -> Result<Self, String> {
        raw(v)?.parse()
    }
}

impl Attr for Dim {
    fn to_attr(&self) -> AttrValue {
        AttrValue::Raw(self.to_string())
    }
    fn from_attr(v: &AttrValue) -> Result<Self, String> {
        Dim::parse(raw(v)?)
    }
}

impl<T: Attr> Attr for Vec<T> {
    fn to_attr(&self) -> AttrValue {
        AttrValue::List(self.iter().map(Attr::to_attr).collect())
    }
    fn from_attr(v: &AttrValue) -> Result<Self, String> {
        match v {
            AttrValue::List(items) => items.iter().map(T::from_attr).collect(),
            other => Err(format!("expected a list, found `{other}`")),
        }
    }
}

/// Rotary embedding layouts. `Normal` rotates adjacent pairs (x[2i], x[2i+1]) — GPT-J, and llama.cpp's
/// layout for GGUF llama weights whose Q/K rows were permuted at conversion; `Neox` rotates halves
/// (x[i], x[i+n/2]) — GPT-NeoX, Hugging Face Llama/Qwen2.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RopeMode {
    Normal,
    Neox,
}

impl Attr for RopeMode {
    fn to_attr(&self) -> AttrValue {
        AttrValue::Raw(match self {
            RopeMode::Normal => "normal".into(),
            RopeMode::Neox => "neox".into(),
        })
    }
    fn from_attr(v: &AttrValue) -> Result<Self, String> {
        match raw(v)? {
            "normal" => Ok(RopeMode::Normal),
            "neox" => Ok(RopeMode::Neox),
            s => Err(format!("unknown rope mode `{s}` (expected normal or neox)")),
        }
    }
}

/// What the op table says of a unary elementwise op: its value at each element (f64, as the interpreter
/// computes it) and its work per element in flops (the e-graph's cost model reads it). Its type rule is
/// "an f32 tensor in, the same type out".
#[derive(Clone, Copy, Debug)]
pub struct UnaryRule {
    pub eval: fn(f64) -> f64,
    pub flops: f64,
}

macro_rules! ops {
    ($( $(#[$doc:meta])* $variant:ident $( { $($field:ident : $fty:ty),* $(,)? } )? = $name:literal / $arity:literal
        in $family:ident $( => unary($rule:expr, $flops:expr) )? ;)*) => {
        /// An IR operation with its attributes. Operands live on the node.
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        pub enum Op {
            $( $(#[$doc])* $variant $( { $($field: $fty),* } )?, )*
        }

        impl Op {
            /// Every op's text name, in table order.
            pub const NAMES: &'static [&'static str] = &[$($name),*];

            pub fn name(&self) -> &'static str {
                match self { $( Op::$variant { .. } => $name, )* }
            }

            /// The scalar rule of a unary elementwise op (`=> unary(f, flops)` in the table), from which its
            /// type rule, interpreter arm and cost follow; `None` for every other op.
            pub fn unary(&self) -> Option<UnaryRule> {
                match self { $( Op::$variant { .. } => { None $( .or(Some(UnaryRule { eval: $rule, flops: $flops })) )? } )* }
            }

            /// The op family whose file (`ir/src/op/<family>.rs`) holds this op's type rule and
            /// interpreter rule.
            pub fn family(&self) -> &'static str {
                match self { $( Op::$variant { .. } => stringify!($family), )* }
            }

            fn family_infer(&self, ins: &[&TensorType], declared: Option<&TensorType>) -> Result<TensorType, String> {
                match self { $( Op::$variant { .. } => $family::infer(self, ins, declared), )* }
            }

            /// The interpreter rule: this (non-source) op on concrete operands (plain loops, f64 sums).
            pub fn eval(&self, args: &[&Tensor], env: &SymEnv) -> Result<Tensor, String> {
                match self { $( Op::$variant { .. } => $family::eval(self, args, env), )* }
            }

            /// Whether this op has a decomposition into primitives on operands of these types (its
            /// family's rule; `crate::decompose` drives it).
            pub fn expandable(&self, ins: &[&TensorType]) -> bool {
                match self { $( Op::$variant { .. } => $family::expandable(self, ins), )* }
            }

            /// This op's decomposition on `ins` (of types `tys`) into `b`; `Ok(None)` without one.
            pub fn expand<B: Builder>(&self, b: &mut B, ins: &[B::V], tys: &[TensorType]) -> Result<Option<B::V>, B::Err> {
                match self { $( Op::$variant { .. } => $family::expand(b, self, ins, tys), )* }
            }

            /// Number of operands in the table (see [`Op::arity`] for the ops whose attributes add one).
            fn table_arity(&self) -> usize {
                match self { $( Op::$variant { .. } => $arity, )* }
            }

            /// Attributes as (name, value), sorted by name (the canonical order of the text form).
            pub fn attrs(&self) -> Vec<(&'static str, AttrValue)> {
                #[allow(unused_mut)]
                let mut out: Vec<(&'static str, AttrValue)> = Vec::new();
                match self {
                    $( Op::$variant $( { $($field),* } )? => {
                        $( $( out.push((stringify!($field), Attr::to_attr($field))); )* )?
                    } )*
                }
                out.sort_by_key(|(k, _)| *k);
                out
            }

            /// Builds an op from its text name and attributes; every attribute must be present and known.
            pub fn from_parts(name: &str, attrs: &[(String, AttrValue)]) -> Result<Op, String> {
                #[allow(unused_variables)]
                let get = |key: &str| -> Result<&AttrValue, String> {
                    attrs.iter().find(|(k, _)| k == key).map(|(_, v)| v)
                        .ok_or_else(|| format!("op `{name}` needs attribute `{key}`"))
                };
                let op = match name {
                    $( $name => Op::$variant $( { $($field: <$fty as Attr>::from_attr(get(stringify!($field))?)
                        .map_err(|e| format!("op `{name}`, attribute `{}`: {e}", stringify!($field)))?),* } )?, )*
                    _ => return Err(format!("unknown op `{name}`")),
                };
                let known = op.attrs();
                for (k, _) in attrs {
                    if !known.iter().any(|(n, _)| n == k) {
                        return Err(format!("op `{name}` has no attribute `{k}`"));
                    }
                }
                Ok(op)
            }
        }
    };
}

ops! {
    /// A graph input, fed by the caller (token ids, positions, KV cache).
    Input { name: String } = "input" / 0 in source;
    /// A named weight from the model's weight store, in its stored dtype (possibly quantized).
    Weight { name: String } = "weight" / 0 in source;
    /// An f32 scalar constant.
    Constant { value: f32 } = "constant" / 0 in source;
    /// Gathers rows of `table[V, D]` by integer `ids[...]` → `[..., D]`.
    Embedding = "embedding" / 2 in source;
    /// `x[..., K] · w[N, K]ᵀ → [..., N]`; `w` may be block-quantized.
    Linear = "linear" / 2 in linear;
    /// Batched matrix product `a[..., M, K] · b[..., K, N]`.
    MatMul = "matmul" / 2 in linear;
    /// Elementwise with numpy broadcasting.
    Add = "add" / 2 in elementwise;
    Sub = "sub" / 2 in elementwise;
    Mul = "mul" / 2 in elementwise;
    Div = "div" / 2 in elementwise;
    Neg = "neg" / 1 in elementwise => unary(|x| -x, 1.0);
    Exp = "exp" / 1 in elementwise => unary(f64::exp, 10.0);
    Sqrt = "sqrt" / 1 in elementwise => unary(f64::sqrt, 4.0);
    Rsqrt = "rsqrt" / 1 in elementwise => unary(|x| 1.0 / x.sqrt(), 4.0);
    Sigmoid = "sigmoid" / 1 in elementwise => unary(|x| 1.0 / (1.0 + (-x).exp()), 10.0);
    Silu = "silu" / 1 in elementwise => unary(|x| x / (1.0 + (-x).exp()), 12.0);
    /// Reductions keep the reduced axis with size 1 so results broadcast back.
    ReduceSum { axis: i64 } = "reduce_sum" / 1 in reduce;
    ReduceMax { axis: i64 } = "reduce_max" / 1 in reduce;
    ReduceMean { axis: i64 } = "reduce_mean" / 1 in reduce;
    Softmax { axis: i64 } = "softmax" / 1 in reduce;
    /// `x / sqrt(mean(x², last axis) + eps) * w[D]`.
    RmsNorm { eps: f32 } = "rms_norm" / 2 in norm;
    /// Rotary position embedding of `x[B, S, H, Dh]` at positions `pos[B, S]`, rotating the first `n_rot` dims.
    Rope { mode: RopeMode, theta: f32, n_rot: i64 } = "rope" / 2 in rope;
    /// Causal attention `q[B, S, Hq, Dh]`, `k`/`v[B, T, Hkv, Dh]` (T ≥ S; query i sits at position
    /// T−S+i), grouped-query when Hkv divides Hq. Result `[B, S, Hq, Dh]`.
    Attention { scale: f32 } = "attention" / 3 in attention;
    /// `silu(gate) * up`.
    SwiGlu = "swiglu" / 2 in elementwise;
    /// `x` where `|x| > t`, else 0: `t[C]` is a per-channel threshold on the last axis of `x[..., C]`
    /// (activation sparsity, CHESS). NaN is not above any threshold, so it becomes 0.
    Threshold = "threshold" / 2 in elementwise;
    /// `linear(x, w)` computed only where `mask ≠ 0`: `x[..., K] · w[N, K]ᵀ` with element `[..., n]` set
    /// to 0 where `mask[..., n]` is 0. Lets a kernel skip the output rows a sparse activation discards.
    MaskedLinear = "masked_linear" / 3 in linear;
    /// Input-sparse linear on a transposed weight: `x[..., K] · wt[K, N] → [..., N]`, summing only over
    /// the channels where x ≠ 0 (so a kernel reads only those rows of `wt`; an inf/NaN weight row of a
    /// zero channel does not poison the result). `wt` may be a column-major block format (`q4_1c`, …,
    /// `kiln_ir::column`): the source weight's exact codes and scales, transposed; or a gathered one
    /// (`q4_1g`, …): some input channels of such a weight (structured pruning), which kernels read whole.
    ActiveLinear = "active_linear" / 2 in linear;
    /// A pruned linear in two layouts with equal values: `w[N, K]` dense (pruned blocks zero) and the
    /// same matrix block-sparse (`blocks` = the kept 32-element blocks' bytes, in `w`'s dtype as a flat
    /// tensor; `row_ptr` i32[N+1]; `col_idx` i32[nnz], see `kiln_ir::sparse`). The result is `x · wᵀ`;
    /// `decode`/`prefill` (0 or 1) say which layout a kernel reads for small (< 8) and large row counts,
    /// as chosen by the kernel-selection cost model.
    SparseLinear { decode: i64, prefill: i64 } = "sparse_linear" / 5 in linear;
    Reshape { shape: Vec<Dim> } = "reshape" / 1 in layout;
    Transpose { perm: Vec<i64> } = "transpose" / 1 in layout;
    Concat { axis: i64 } = "concat" / 2 in layout;
    /// Elements `start..end` along `axis`; the bounds may be symbolic (`seq-1`).
    Slice { axis: i64, start: Dim, end: Dim } = "slice" / 1 in layout;
    Cast { dtype: DType } = "cast" / 1 in layout;
    /// Primitives of the rope and attention decompositions (`decompose.rs`); no CPU lowering: graphs
    /// that use them are lifted back to `rope`/`attention` by the `lift` pass before codegen.
    Sin = "sin" / 1 in elementwise => unary(f64::sin, 10.0);
    Cos = "cos" / 1 in elementwise => unary(f64::cos, 10.0);
    /// `a ** b`, elementwise with broadcasting.
    Pow = "pow" / 2 in elementwise;
    /// `f32[n]` holding 0, 1, …, n−1.
    Iota { n: i64 } = "iota" / 0 in source;
    /// Causal mask over the last two axes `[…, S, T]` (T ≥ S; row i sits at position T−S+i): entries
    /// with column j > T−S+i become −∞, the rest pass through.
    CausalMask = "causal_mask" / 1 in attention;
    // collectives (tensor parallelism)
    /// Sum over the ranks of the tensor-parallel group; every rank gets the sum (see `collective.rs`).
    AllReduce = "all_reduce" / 1 in collective;
    /// Sum over the ranks, of which this rank keeps its slice along `axis`: `[.., s, ..] → [.., s_shard, ..]`.
    ReduceScatter { axis: i64 } = "reduce_scatter" / 1 in collective;
    /// This rank's slice along `axis`, no communication: `[.., s, ..] → [.., s_shard, ..]`.
    Shard { axis: i64 } = "shard" / 1 in collective;
    /// Every rank's slice along `axis`, concatenated in rank order: `[.., s_shard, ..] → [.., s, ..]`.
    AllGather { axis: i64 } = "all_gather" / 1 in collective;
    /// FlexPrefill block-sparse causal attention: operands and result as `attention`. Keys are cut into
    /// `block`-position blocks; per head, a Jensen–Shannon test (threshold `tau`) on the last query
    /// block picks a query-aware or a vertical-slash pattern, blocks are kept until their attention
    /// mass reaches `gamma`, block column 0 and the diagonal always. With fewer than `min_len` query
    /// rows it is exactly `attention` (see `kiln_ir::flex`).
    FlexAttention { scale: f32, block: i64, gamma: f32, tau: f32, min_len: i64 } = "flex_attention" / 3 in attention;
    /// CoreInfer's MLP mask for this step: `x[B, S, _]`, `core[B, C]` → `[B, S, C]`, all ones when
    /// `past` (a dim, e.g. the symbol `past`) is 0 — the prefill chunk runs the dense MLP — else every
    /// row is the prompt's core set `core[b]` (see `kiln_ir::coreinfer`). `x` only gives the rows.
    CoreKeep { past: Dim } = "core_keep" / 2 in coreinfer;
    /// CoreInfer's core-set state after this step: `act[B, S, C]`, `core[B, C]` → `[B, C]`. When `past`
    /// is 0 the sentence-wise core set of `act` (top `alpha` share per token, kept by at least a `beta`
    /// share of the tokens; `kiln_ir::coreinfer::core_set`), else `core` unchanged.
    CoreSelect { alpha: f32, beta: f32, past: Dim } = "core_select" / 2 in coreinfer;
    /// CoreInfer's gathered projection: `x[B, S, K]`, `w[N, K]`, `core[B, N]` → `[B, S, N]`, equal to
    /// `masked_linear(x, w, core_keep{past}(x, core))` — the dense linear when `past` is 0, else zero
    /// outside the core set. A kernel may (and the CPU one does) copy the core rows of `w` into a
    /// smaller dense matrix once per prompt and run the dense kernel on it.
    CoreLinear { past: Dim } = "core_linear" / 3 in coreinfer;
    /// A linear on N:M-pruned weights in the compact form (`kiln_ir::sparse::nm`): `x[..., K] · Wᵀ`
    /// with `W[N_out, K]` of `dtype` held as `packed` (`i32[N_out, row_bytes / 4]`, the rows' bytes),
    /// `keep` of every `group` consecutive elements of a row kept. `decode`/`prefill` (0 or 1, not both
    /// 0) say whether a kernel reads the compact form (1) or the dense layout (0) for small (< 8) and
    /// large row counts; when one is 0 the op has a third operand, the same matrix dense `w[N_out, K]`
    /// of `dtype` (pruned elements exact zeros). Arity 2, or 3 with the dense layout ([`Op::arity`]).
    NmLinear { dtype: DType, keep: i64, group: i64, decode: i64, prefill: i64 } = "nm_linear" / 2 in linear;
    /// A linear on unstructured (`gran` 1) or 1×8 (`gran` 8) pruned weights in the bitmap form
    /// (`kiln_ir::sparse::bitmap`): `x[..., K] · Wᵀ` with `W[N_out, K]` of `dtype` held as `packed`
    /// (`i32[N_out, row_bytes / 4]`), every row keeping `kept` elements. `decode`/`prefill` and the
    /// optional dense layout as for `nm_linear`.
    BitmapLinear { dtype: DType, gran: i64, kept: i64, decode: i64, prefill: i64 } = "bitmap_linear" / 2 in linear;
    /// GELU, tanh approximation (Gemma, GPT-2; PyTorch's `gelu(approximate="tanh")`):
    /// `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
    GeluTanh = "gelu_tanh" / 1 in elementwise
        => unary(|x| 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh()), 14.0);
    /// `rope` with per-frequency scaling (Llama 3.x `rope_freqs`, linear position interpolation): the
    /// third operand `factors` is `f32[n_rot/2]` and frequency i becomes θ^(−2i/n_rot) / factors[i].
    RopeScaled { mode: RopeMode, theta: f32, n_rot: i64 } = "rope_scaled" / 3 in rope;
    /// `attention` where each query sees only the last `window` positions up to its own (sliding-window,
    /// "local" attention: Mistral, Qwen2 with `use_sliding_window`, Phi-3, Gemma 3's local layers): query
    /// at position p reads keys p−window+1 ..= p; a kernel does not read the KV outside.
    SlidingAttention { scale: f32, window: i64 } = "sliding_attention" / 3 in attention;
}

pub use crate::shape::norm_axis;

pub(crate) fn broadcast(a: &[Dim], b: &[Dim]) -> Result<Vec<Dim>, String> {
    let n = a.len().max(b.len());
    let one = Dim::fixed(1);
    (0..n)
        .map(|i| {
            let da = if i + a.len() >= n { &a[i + a.len() - n] } else { &one };
            let db = if i + b.len() >= n { &b[i + b.len() - n] } else { &one };
            if da == db || *db == one {
                Ok(da.clone())
            } else if *da == one {
                Ok(db.clone())
            } else {
                Err(format!("cannot broadcast dims {da} and {db}"))
            }
        })
        .collect()
}

pub(crate) fn want_float(t: &TensorType, what: &str) -> Result<(), String> {
    if t.dtype == DType::F32 {
        Ok(())
    } else {
        Err(format!("{what} must be f32, found {}", t.dtype))
    }
}

pub(crate) fn want_rank(t: &TensorType, rank: usize, what: &str) -> Result<(), String> {
    if t.rank() == rank {
        Ok(())
    } else {
        Err(format!("{what} must have rank {rank}, found {t}"))
    }
}

pub(crate) fn same_dim(a: &Dim, b: &Dim, what: &str) -> Result<(), String> {
    if a == b {
        Ok(())
    } else {
        Err(format!("{what}: {a} ≠ {b}"))
    }
}

impl Op {
    /// A linear map of `inputs[0]` by the weight `inputs[1]` (dense, masked-output, input-sparse,
    /// block-sparse, N:M, bitmap): the ops a pass may read as "the projection by this weight".
    pub fn is_weight_linear(&self) -> bool {
        matches!(
            self,
            Op::Linear
                | Op::MaskedLinear
                | Op::CoreLinear { .. }
                | Op::ActiveLinear
                | Op::SparseLinear { .. }
                | Op::NmLinear { .. }
                | Op::BitmapLinear { .. }
        )
    }

    /// Number of operands: the table's, plus the dense layout of an `nm_linear`/`bitmap_linear` that
    /// some phase reads it in.
    pub fn arity(&self) -> usize {
        match self {
            Op::NmLinear { decode, prefill, .. } | Op::BitmapLinear { decode, prefill, .. } => {
                self.table_arity() + usize::from(*decode != 1 || *prefill != 1)
            }
            _ => self.table_arity(),
        }
    }

    /// Which operands of a weight linear ([`Op::is_weight_linear`]) a kernel reads as the weight in
    /// the decode (m < 8) or the prefill phase: the block-sparse arrays or the dense matrix of a
    /// `sparse_linear`, the compact form or the dense layout of an `nm_linear`/`bitmap_linear`, else
    /// the weight operand. Byte estimates and the cost model count these.
    pub fn phase_weights(&self, decode: bool) -> std::ops::Range<usize> {
        let pick = |d: &i64, p: &i64| *if decode { d } else { p } != 0;
        match self {
            Op::SparseLinear { decode: d, prefill: p } if pick(d, p) => 2..5,
            Op::NmLinear { decode: d, prefill: p, .. } | Op::BitmapLinear { decode: d, prefill: p, .. }
                if !pick(d, p) =>
            {
                2..3
            }
            _ => 1..2,
        }
    }

    /// The type rule: the result type from operand types. Source ops (`input`, `weight`) declare their
    /// own type, which is passed as `declared`.
    pub fn infer(&self, ins: &[&TensorType], declared: Option<&TensorType>) -> Result<TensorType, String> {
        if ins.len() != self.arity() {
            return Err(format!("`{}` takes {} operands, got {}", self.name(), self.arity(), ins.len()));
        }
        self.family_infer(ins, declared)
    }
}

/// Where an expansion puts its nodes.
pub trait Builder {
    type V: Copy;
    type Err;
    /// The type of a value already built.
    fn ty(&self, v: Self::V) -> TensorType;
    /// Adds `op` on `ins`. High-level ops used inside an expansion (`silu` in `swiglu`, `softmax` in
    /// `attention`) go through here too; a builder decides whether to expand them in turn.
    fn add(&mut self, op: Op, ins: &[Self::V]) -> Result<Self::V, Self::Err>;
}

/// `f32` of `shape`: the result type of most ops.
pub(crate) fn f32t(shape: Vec<Dim>) -> TensorType {
    TensorType::new(DType::F32, shape)
}

/// The error of a family's rule asked about an op of another family (the table's dispatch never does).
pub(crate) fn not_in_family(op: &Op, family: &str) -> String {
    format!("`{}` is not a {family} op", op.name())
}
