//! The op table: every IR operation, its text name, arity, attributes and type rule.
//!
//! `ops!` below is the single list of ops; it generates the `Op` enum, the name/arity lookups and the
//! attribute (de)serialisation used by the text form. A unary elementwise op is its table line alone:
//! `=> unary(f, flops)` gives its scalar rule, from which its type rule, verifier, interpreter arm and
//! cost follow. Other ops have their type rule in `Op::infer` and their interpreter arm in `interp.rs`.
//! `docs/adding-an-op.md` lists every place a new op touches.

use crate::dtype::DType;
use crate::shape::{Dim, TensorType};
use serde::{Deserialize, Serialize};
use std::fmt;

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
        $( => unary($rule:expr, $flops:expr) )? ;)*) => {
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
    Input { name: String } = "input" / 0;
    /// A named weight from the model's weight store, in its stored dtype (possibly quantized).
    Weight { name: String } = "weight" / 0;
    /// An f32 scalar constant.
    Constant { value: f32 } = "constant" / 0;
    /// Gathers rows of `table[V, D]` by integer `ids[...]` → `[..., D]`.
    Embedding = "embedding" / 2;
    /// `x[..., K] · w[N, K]ᵀ → [..., N]`; `w` may be block-quantized.
    Linear = "linear" / 2;
    /// Batched matrix product `a[..., M, K] · b[..., K, N]`.
    MatMul = "matmul" / 2;
    /// Elementwise with numpy broadcasting.
    Add = "add" / 2;
    Sub = "sub" / 2;
    Mul = "mul" / 2;
    Div = "div" / 2;
    Neg = "neg" / 1 => unary(|x| -x, 1.0);
    Exp = "exp" / 1 => unary(f64::exp, 10.0);
    Sqrt = "sqrt" / 1 => unary(f64::sqrt, 4.0);
    Rsqrt = "rsqrt" / 1 => unary(|x| 1.0 / x.sqrt(), 4.0);
    Sigmoid = "sigmoid" / 1 => unary(|x| 1.0 / (1.0 + (-x).exp()), 10.0);
    Silu = "silu" / 1 => unary(|x| x / (1.0 + (-x).exp()), 12.0);
    /// Reductions keep the reduced axis with size 1 so results broadcast back.
    ReduceSum { axis: i64 } = "reduce_sum" / 1;
    ReduceMax { axis: i64 } = "reduce_max" / 1;
    ReduceMean { axis: i64 } = "reduce_mean" / 1;
    Softmax { axis: i64 } = "softmax" / 1;
    /// `x / sqrt(mean(x², last axis) + eps) * w[D]`.
    RmsNorm { eps: f32 } = "rms_norm" / 2;
    /// Rotary position embedding of `x[B, S, H, Dh]` at positions `pos[B, S]`, rotating the first `n_rot` dims.
    Rope { mode: RopeMode, theta: f32, n_rot: i64 } = "rope" / 2;
    /// Causal attention `q[B, S, Hq, Dh]`, `k`/`v[B, T, Hkv, Dh]` (T ≥ S; query i sits at position
    /// T−S+i), grouped-query when Hkv divides Hq. Result `[B, S, Hq, Dh]`.
    Attention { scale: f32 } = "attention" / 3;
    /// `silu(gate) * up`.
    SwiGlu = "swiglu" / 2;
    /// `x` where `|x| > t`, else 0: `t[C]` is a per-channel threshold on the last axis of `x[..., C]`
    /// (activation sparsity, CHESS). NaN is not above any threshold, so it becomes 0.
    Threshold = "threshold" / 2;
    /// `linear(x, w)` computed only where `mask ≠ 0`: `x[..., K] · w[N, K]ᵀ` with element `[..., n]` set
    /// to 0 where `mask[..., n]` is 0. Lets a kernel skip the output rows a sparse activation discards.
    MaskedLinear = "masked_linear" / 3;
    /// Input-sparse linear on a transposed weight: `x[..., K] · wt[K, N] → [..., N]`, summing only over
    /// the channels where x ≠ 0 (so a kernel reads only those rows of `wt`; an inf/NaN weight row of a
    /// zero channel does not poison the result). `wt` may be a column-major block format (`q4_1c`, …,
    /// `kiln_ir::column`): the source weight's exact codes and scales, transposed; or a gathered one
    /// (`q4_1g`, …): some input channels of such a weight (structured pruning), which kernels read whole.
    ActiveLinear = "active_linear" / 2;
    /// A pruned linear in two layouts with equal values: `w[N, K]` dense (pruned blocks zero) and the
    /// same matrix block-sparse (`blocks` = the kept 32-element blocks' bytes, in `w`'s dtype as a flat
    /// tensor; `row_ptr` i32[N+1]; `col_idx` i32[nnz], see `kiln_ir::sparse`). The result is `x · wᵀ`;
    /// `decode`/`prefill` (0 or 1) say which layout a kernel reads for small (< 8) and large row counts,
    /// as chosen by the kernel-selection cost model.
    SparseLinear { decode: i64, prefill: i64 } = "sparse_linear" / 5;
    Reshape { shape: Vec<Dim> } = "reshape" / 1;
    Transpose { perm: Vec<i64> } = "transpose" / 1;
    Concat { axis: i64 } = "concat" / 2;
    /// Elements `start..end` along `axis`; the bounds may be symbolic (`seq-1`).
    Slice { axis: i64, start: Dim, end: Dim } = "slice" / 1;
    Cast { dtype: DType } = "cast" / 1;
    /// Primitives of the rope and attention decompositions (`decompose.rs`); no CPU lowering: graphs
    /// that use them are lifted back to `rope`/`attention` by the `lift` pass before codegen.
    Sin = "sin" / 1 => unary(f64::sin, 10.0);
    Cos = "cos" / 1 => unary(f64::cos, 10.0);
    /// `a ** b`, elementwise with broadcasting.
    Pow = "pow" / 2;
    /// `f32[n]` holding 0, 1, …, n−1.
    Iota { n: i64 } = "iota" / 0;
    /// Causal mask over the last two axes `[…, S, T]` (T ≥ S; row i sits at position T−S+i): entries
    /// with column j > T−S+i become −∞, the rest pass through.
    CausalMask = "causal_mask" / 1;
    // collectives (tensor parallelism)
    /// Sum over the ranks of the tensor-parallel group; every rank gets the sum (see `collective.rs`).
    AllReduce = "all_reduce" / 1;
    /// Sum over the ranks, of which this rank keeps its slice along `axis`: `[.., s, ..] → [.., s_shard, ..]`.
    ReduceScatter { axis: i64 } = "reduce_scatter" / 1;
    /// This rank's slice along `axis`, no communication: `[.., s, ..] → [.., s_shard, ..]`.
    Shard { axis: i64 } = "shard" / 1;
    /// Every rank's slice along `axis`, concatenated in rank order: `[.., s_shard, ..] → [.., s, ..]`.
    AllGather { axis: i64 } = "all_gather" / 1;
    /// FlexPrefill block-sparse causal attention: operands and result as `attention`. Keys are cut into
    /// `block`-position blocks; per head, a Jensen–Shannon test (threshold `tau`) on the last query
    /// block picks a query-aware or a vertical-slash pattern, blocks are kept until their attention
    /// mass reaches `gamma`, block column 0 and the diagonal always. With fewer than `min_len` query
    /// rows it is exactly `attention` (see `kiln_ir::flex`).
    FlexAttention { scale: f32, block: i64, gamma: f32, tau: f32, min_len: i64 } = "flex_attention" / 3;
    /// CoreInfer's MLP mask for this step: `x[B, S, _]`, `core[B, C]` → `[B, S, C]`, all ones when
    /// `past` (a dim, e.g. the symbol `past`) is 0 — the prefill chunk runs the dense MLP — else every
    /// row is the prompt's core set `core[b]` (see `kiln_ir::coreinfer`). `x` only gives the rows.
    CoreKeep { past: Dim } = "core_keep" / 2;
    /// CoreInfer's core-set state after this step: `act[B, S, C]`, `core[B, C]` → `[B, C]`. When `past`
    /// is 0 the sentence-wise core set of `act` (top `alpha` share per token, kept by at least a `beta`
    /// share of the tokens; `kiln_ir::coreinfer::core_set`), else `core` unchanged.
    CoreSelect { alpha: f32, beta: f32, past: Dim } = "core_select" / 2;
    /// CoreInfer's gathered projection: `x[B, S, K]`, `w[N, K]`, `core[B, N]` → `[B, S, N]`, equal to
    /// `masked_linear(x, w, core_keep{past}(x, core))` — the dense linear when `past` is 0, else zero
    /// outside the core set. A kernel may (and the CPU one does) copy the core rows of `w` into a
    /// smaller dense matrix once per prompt and run the dense kernel on it.
    CoreLinear { past: Dim } = "core_linear" / 3;
    /// A linear on N:M-pruned weights in the compact form (`kiln_ir::sparse::nm`): `x[..., K] · Wᵀ`
    /// with `W[N_out, K]` of `dtype` held as `packed` (`i32[N_out, row_bytes / 4]`, the rows' bytes),
    /// `keep` of every `group` consecutive elements of a row kept. `decode`/`prefill` (0 or 1, not both
    /// 0) say whether a kernel reads the compact form (1) or the dense layout (0) for small (< 8) and
    /// large row counts; when one is 0 the op has a third operand, the same matrix dense `w[N_out, K]`
    /// of `dtype` (pruned elements exact zeros). Arity 2, or 3 with the dense layout ([`Op::arity`]).
    NmLinear { dtype: DType, keep: i64, group: i64, decode: i64, prefill: i64 } = "nm_linear" / 2;
    /// A linear on unstructured (`gran` 1) or 1×8 (`gran` 8) pruned weights in the bitmap form
    /// (`kiln_ir::sparse::bitmap`): `x[..., K] · Wᵀ` with `W[N_out, K]` of `dtype` held as `packed`
    /// (`i32[N_out, row_bytes / 4]`), every row keeping `kept` elements. `decode`/`prefill` and the
    /// optional dense layout as for `nm_linear`.
    BitmapLinear { dtype: DType, gran: i64, kept: i64, decode: i64, prefill: i64 } = "bitmap_linear" / 2;
    /// GELU, tanh approximation (Gemma, GPT-2; PyTorch's `gelu(approximate="tanh")`):
    /// `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
    GeluTanh = "gelu_tanh" / 1
        => unary(|x| 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh()), 14.0);
}

/// Resolves a possibly negative axis against `rank`.
pub fn norm_axis(axis: i64, rank: usize) -> Result<usize, String> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if (0..r).contains(&a) {
        Ok(a as usize)
    } else {
        Err(format!("axis {axis} out of range for rank {rank}"))
    }
}

fn broadcast(a: &[Dim], b: &[Dim]) -> Result<Vec<Dim>, String> {
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

fn want_float(t: &TensorType, what: &str) -> Result<(), String> {
    if t.dtype == DType::F32 {
        Ok(())
    } else {
        Err(format!("{what} must be f32, found {}", t.dtype))
    }
}

fn want_rank(t: &TensorType, rank: usize, what: &str) -> Result<(), String> {
    if t.rank() == rank {
        Ok(())
    } else {
        Err(format!("{what} must have rank {rank}, found {t}"))
    }
}

/// The phase attributes of an `nm_linear`/`bitmap_linear` (0 or 1, not both 0) and its dense layout
/// operand when it has one: `w[N_out, K]` of `dtype`, `N_out` the packed form's rows, `K` the input's.
fn phase_choice(op: &str, decode: i64, prefill: i64, ins: &[&TensorType], dtype: DType) -> Result<(), String> {
    if ![0, 1].contains(&decode) || ![0, 1].contains(&prefill) {
        return Err(format!("{op}: decode = {decode}, prefill = {prefill} must each be 0 or 1"));
    }
    if decode == 0 && prefill == 0 {
        return Err(format!("{op}: decode = prefill = 0 reads only the dense layout (use linear)"));
    }
    if let Some(w) = ins.get(2) {
        if w.dtype != dtype || w.rank() != 2 {
            return Err(format!("{op} dense layout must be {dtype}[_, _], found {w}"));
        }
        same_dim(&w.shape[0], &ins[1].shape[0], &format!("{op} dense layout rows"))?;
        let k = ins[0].shape.last().ok_or_else(|| format!("{op} input must have rank ≥ 1"))?;
        same_dim(&w.shape[1], k, &format!("{op} dense layout width"))?;
    }
    Ok(())
}

fn same_dim(a: &Dim, b: &Dim, what: &str) -> Result<(), String> {
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
        let f32t = |shape: Vec<Dim>| TensorType::new(DType::F32, shape);
        match self {
            Op::Input { .. } | Op::Weight { .. } => {
                declared.cloned().ok_or_else(|| format!("`{}` needs a declared type", self.name()))
            }
            Op::Constant { .. } => Ok(f32t(vec![])),
            Op::Embedding => {
                let (table, ids) = (ins[0], ins[1]);
                want_rank(table, 2, "embedding table")?;
                if !ids.dtype.is_int() {
                    return Err(format!("embedding ids must be integers, found {}", ids.dtype));
                }
                let mut shape = ids.shape.clone();
                shape.push(table.shape[1].clone());
                Ok(f32t(shape))
            }
            Op::Linear => {
                let (x, w) = (ins[0], ins[1]);
                want_float(x, "linear input")?;
                want_rank(w, 2, "linear weight")?;
                if !w.dtype.is_float() {
                    return Err(format!("linear weight must be a float type, found {}", w.dtype));
                }
                let k = x.shape.last().ok_or("linear input must have rank ≥ 1")?;
                same_dim(k, &w.shape[1], "linear inner dimension")?;
                let mut shape = x.shape.clone();
                *shape.last_mut().unwrap() = w.shape[0].clone();
                Ok(f32t(shape))
            }
            Op::MatMul => {
                let (a, b) = (ins[0], ins[1]);
                want_float(a, "matmul lhs")?;
                want_float(b, "matmul rhs")?;
                if a.rank() < 2 || a.rank() != b.rank() {
                    return Err(format!("matmul needs equal ranks ≥ 2, found {a} and {b}"));
                }
                let r = a.rank();
                same_dim(&a.shape[r - 1], &b.shape[r - 2], "matmul inner dimension")?;
                for i in 0..r - 2 {
                    same_dim(&a.shape[i], &b.shape[i], "matmul batch dimension")?;
                }
                let mut shape = a.shape[..r - 1].to_vec();
                shape.push(b.shape[r - 1].clone());
                Ok(f32t(shape))
            }
            Op::Add | Op::Sub | Op::Mul | Op::Div | Op::Pow => {
                want_float(ins[0], "lhs")?;
                want_float(ins[1], "rhs")?;
                Ok(f32t(broadcast(&ins[0].shape, &ins[1].shape)?))
            }
            _ if self.unary().is_some() => {
                want_float(ins[0], "operand")?;
                Ok(ins[0].clone())
            }
            Op::ReduceSum { axis } | Op::ReduceMax { axis } | Op::ReduceMean { axis } => {
                want_float(ins[0], "operand")?;
                let a = norm_axis(*axis, ins[0].rank())?;
                let mut shape = ins[0].shape.clone();
                shape[a] = Dim::fixed(1);
                Ok(f32t(shape))
            }
            Op::Softmax { axis } => {
                want_float(ins[0], "operand")?;
                norm_axis(*axis, ins[0].rank())?;
                Ok(ins[0].clone())
            }
            Op::RmsNorm { .. } => {
                let (x, w) = (ins[0], ins[1]);
                want_float(x, "rms_norm input")?;
                want_float(w, "rms_norm weight")?;
                want_rank(w, 1, "rms_norm weight")?;
                same_dim(x.shape.last().ok_or("rms_norm input must have rank ≥ 1")?, &w.shape[0], "rms_norm width")?;
                Ok(x.clone())
            }
            Op::Rope { n_rot, .. } => {
                let (x, pos) = (ins[0], ins[1]);
                want_float(x, "rope input")?;
                want_rank(x, 4, "rope input")?;
                want_rank(pos, 2, "rope positions")?;
                if !pos.dtype.is_int() {
                    return Err(format!("rope positions must be integers, found {}", pos.dtype));
                }
                same_dim(&x.shape[0], &pos.shape[0], "rope batch")?;
                same_dim(&x.shape[1], &pos.shape[1], "rope sequence")?;
                if let Some(hd) = x.shape[3].as_fixed() {
                    if *n_rot <= 0 || *n_rot > hd || n_rot % 2 != 0 {
                        return Err(format!("rope n_rot {n_rot} must be even and in 1..={hd}"));
                    }
                }
                Ok(x.clone())
            }
            Op::FlexAttention { scale, block, gamma, tau, min_len } => {
                crate::flex::FlexParams { block: *block, gamma: *gamma, tau: *tau, min_len: *min_len }.validate()?;
                Op::Attention { scale: *scale }.infer(ins, None)
            }
            Op::Attention { .. } => {
                let (q, k, v) = (ins[0], ins[1], ins[2]);
                for (t, what) in [(q, "q"), (k, "k"), (v, "v")] {
                    want_float(t, what)?;
                    want_rank(t, 4, what)?;
                }
                same_dim(&q.shape[0], &k.shape[0], "attention batch")?;
                same_dim(&k.shape[0], &v.shape[0], "attention batch")?;
                same_dim(&k.shape[1], &v.shape[1], "attention kv length")?;
                same_dim(&k.shape[2], &v.shape[2], "attention kv heads")?;
                same_dim(&q.shape[3], &k.shape[3], "attention head dim")?;
                same_dim(&k.shape[3], &v.shape[3], "attention head dim")?;
                if let (Some(hq), Some(hkv)) = (q.shape[2].as_fixed(), k.shape[2].as_fixed()) {
                    if hkv == 0 || hq % hkv != 0 {
                        return Err(format!("attention: {hkv} kv heads do not divide {hq} query heads"));
                    }
                }
                Ok(q.clone())
            }
            Op::SwiGlu => {
                want_float(ins[0], "gate")?;
                if ins[0] != ins[1] {
                    return Err(format!("swiglu operands differ: {} and {}", ins[0], ins[1]));
                }
                Ok(ins[0].clone())
            }
            Op::Threshold => {
                let (x, t) = (ins[0], ins[1]);
                want_float(x, "threshold input")?;
                want_float(t, "threshold")?;
                want_rank(t, 1, "threshold")?;
                same_dim(x.shape.last().ok_or("threshold input must have rank ≥ 1")?, &t.shape[0], "threshold width")?;
                Ok(x.clone())
            }
            Op::MaskedLinear => {
                let y = Op::Linear.infer(&ins[..2], None)?;
                if *ins[2] != y {
                    return Err(format!("masked_linear mask is {} but the result is {y}", ins[2]));
                }
                Ok(y)
            }
            Op::SparseLinear { .. } => {
                let y = Op::Linear.infer(&ins[..2], None)?;
                let (w, blocks, row_ptr, col_idx) = (ins[1], ins[2], ins[3], ins[4]);
                if blocks.dtype != w.dtype || blocks.rank() != 1 {
                    return Err(format!("sparse_linear blocks must be a flat {} tensor, found {blocks}", w.dtype));
                }
                for (t, what) in [(row_ptr, "row_ptr"), (col_idx, "col_idx")] {
                    if t.dtype != DType::I32 || t.rank() != 1 {
                        return Err(format!("sparse_linear {what} must be i32[_], found {t}"));
                    }
                }
                same_dim(&row_ptr.shape[0], &w.shape[0].add(&Dim::fixed(1)), "sparse_linear row_ptr length")?;
                Ok(y)
            }
            Op::NmLinear { dtype, keep, group, decode, prefill } => {
                let (x, packed) = (ins[0], ins[1]);
                want_float(x, "nm_linear input")?;
                if packed.dtype != DType::I32 || packed.rank() != 2 {
                    return Err(format!("nm_linear packed weights must be i32[_, _], found {packed}"));
                }
                phase_choice("nm_linear", *decode, *prefill, ins, *dtype)?;
                let p = crate::sparse::NmPattern::new(*keep as usize, *group as usize).map_err(|e| e.to_string())?;
                if !crate::sparse::NM_DTYPES.contains(dtype) {
                    return Err(format!("nm_linear weights of {dtype} are not supported"));
                }
                let k = x.shape.last().ok_or("nm_linear input must have rank ≥ 1")?;
                if let Some(k) = k.as_fixed() {
                    if k <= 0 || k % 32 != 0 {
                        return Err(format!("nm_linear: k = {k} is not a positive multiple of 32"));
                    }
                    let words = crate::sparse::nm::nm_row_bytes(*dtype, p, k as usize) / 4;
                    same_dim(&packed.shape[1], &Dim::fixed(words as i64), "nm_linear packed row words")?;
                }
                let mut shape = x.shape.clone();
                *shape.last_mut().unwrap() = packed.shape[0].clone();
                Ok(f32t(shape))
            }
            Op::BitmapLinear { dtype, gran, kept, decode, prefill } => {
                let (x, packed) = (ins[0], ins[1]);
                want_float(x, "bitmap_linear input")?;
                if packed.dtype != DType::I32 || packed.rank() != 2 {
                    return Err(format!("bitmap_linear packed weights must be i32[_, _], found {packed}"));
                }
                phase_choice("bitmap_linear", *decode, *prefill, ins, *dtype)?;
                if !crate::sparse::NM_DTYPES.contains(dtype) {
                    return Err(format!("bitmap_linear weights of {dtype} are not supported"));
                }
                if !crate::sparse::bitmap::BITMAP_GRANS.contains(&(*gran as usize)) || *kept < 0 || kept % gran != 0 {
                    return Err(format!("bitmap_linear: granularity {gran} with {kept} kept per row is not supported"));
                }
                let k = x.shape.last().ok_or("bitmap_linear input must have rank ≥ 1")?;
                if let Some(k) = k.as_fixed() {
                    if k <= 0 || k % 32 != 0 || *kept > k {
                        return Err(format!(
                            "bitmap_linear: k = {k} is not a positive multiple of 32 of at least {kept}"
                        ));
                    }
                    let words =
                        crate::sparse::bitmap::bitmap_row_bytes(*dtype, *gran as usize, k as usize, *kept as usize) / 4;
                    same_dim(&packed.shape[1], &Dim::fixed(words as i64), "bitmap_linear packed row words")?;
                }
                let mut shape = x.shape.clone();
                *shape.last_mut().unwrap() = packed.shape[0].clone();
                Ok(f32t(shape))
            }
            Op::ActiveLinear => {
                let (x, wt) = (ins[0], ins[1]);
                want_float(x, "active_linear input")?;
                want_rank(wt, 2, "active_linear weight")?;
                if !wt.dtype.is_float() && wt.dtype.column_layout().is_none() {
                    return Err(format!("active_linear weight must be a float type, found {}", wt.dtype));
                }
                let k = x.shape.last().ok_or("active_linear input must have rank ≥ 1")?;
                same_dim(k, &wt.shape[0], "active_linear inner dimension")?;
                let mut shape = x.shape.clone();
                *shape.last_mut().unwrap() = wt.shape[1].clone();
                Ok(f32t(shape))
            }
            Op::CoreKeep { .. } => {
                let (x, core) = (ins[0], ins[1]);
                want_float(core, "core set")?;
                want_rank(x, 3, "core_keep rows")?;
                want_rank(core, 2, "core set")?;
                same_dim(&x.shape[0], &core.shape[0], "core_keep batch")?;
                Ok(f32t(vec![x.shape[0].clone(), x.shape[1].clone(), core.shape[1].clone()]))
            }
            Op::CoreLinear { .. } => {
                let y = Op::Linear.infer(&ins[..2], None)?;
                let core = ins[2];
                want_float(core, "core set")?;
                want_rank(core, 2, "core set")?;
                want_rank(&y, 3, "core_linear result")?;
                same_dim(&y.shape[0], &core.shape[0], "core_linear batch")?;
                same_dim(&y.shape[2], &core.shape[1], "core_linear width")?;
                Ok(y)
            }
            Op::CoreSelect { alpha, beta, .. } => {
                crate::coreinfer::validate(*alpha, *beta)?;
                let (act, core) = (ins[0], ins[1]);
                want_float(act, "core_select activation")?;
                want_float(core, "core set")?;
                want_rank(act, 3, "core_select activation")?;
                want_rank(core, 2, "core set")?;
                same_dim(&act.shape[0], &core.shape[0], "core_select batch")?;
                same_dim(&act.shape[2], &core.shape[1], "core_select width")?;
                Ok(core.clone())
            }
            Op::Reshape { shape } => {
                let x = ins[0];
                // Equal element counts are checked when concrete; symbolic dims must be carried over.
                let (ka, kb) = (fixed_product(&x.shape), fixed_product(shape));
                let (sa, sb) = (symbolic_part(&x.shape), symbolic_part(shape));
                if sa != sb || (ka != kb) {
                    return Err(format!("reshape {} → [{}] changes the element count", x, join(shape)));
                }
                Ok(TensorType::new(x.dtype, shape.clone()))
            }
            Op::Transpose { perm } => {
                let x = ins[0];
                let mut seen = vec![false; x.rank()];
                if perm.len() != x.rank() {
                    return Err(format!("transpose perm {perm:?} does not match rank {}", x.rank()));
                }
                let mut shape = Vec::with_capacity(perm.len());
                for &p in perm {
                    let a = norm_axis(p, x.rank())?;
                    if std::mem::replace(&mut seen[a], true) {
                        return Err(format!("transpose perm {perm:?} repeats axis {a}"));
                    }
                    shape.push(x.shape[a].clone());
                }
                Ok(TensorType::new(x.dtype, shape))
            }
            Op::Concat { axis } => {
                let (a, b) = (ins[0], ins[1]);
                if a.dtype != b.dtype || a.rank() != b.rank() {
                    return Err(format!("concat of {a} and {b}"));
                }
                let ax = norm_axis(*axis, a.rank())?;
                let mut shape = a.shape.clone();
                for (i, (da, db)) in a.shape.iter().zip(&b.shape).enumerate() {
                    if i == ax {
                        shape[i] = da.add(db);
                    } else {
                        same_dim(da, db, "concat dimension")?;
                    }
                }
                Ok(TensorType::new(a.dtype, shape))
            }
            Op::Slice { axis, start, end } => {
                let x = ins[0];
                let ax = norm_axis(*axis, x.rank())?;
                let len = end.sub(start);
                if let (Some(s), Some(e)) = (start.as_fixed(), end.as_fixed()) {
                    if s < 0 || e < s {
                        return Err(format!("slice {start}..{end} is negative or reversed"));
                    }
                    if let Some(n) = x.shape[ax].as_fixed() {
                        if e > n {
                            return Err(format!("slice {start}..{end} past dimension {n}"));
                        }
                    }
                } else if len.as_fixed().is_none_or(|l| l < 0) {
                    return Err(format!("slice {start}..{end} must have a constant, non-negative length"));
                }
                let mut shape = x.shape.clone();
                shape[ax] = len;
                Ok(TensorType::new(x.dtype, shape))
            }
            Op::Iota { n } => {
                if *n < 0 {
                    return Err(format!("iota length {n} is negative"));
                }
                Ok(f32t(vec![Dim::fixed(*n)]))
            }
            Op::CausalMask => {
                let x = ins[0];
                want_float(x, "causal_mask operand")?;
                if x.rank() < 2 {
                    return Err(format!("causal_mask needs rank ≥ 2, found {x}"));
                }
                Ok(x.clone())
            }
            Op::AllReduce => {
                want_float(ins[0], "all_reduce operand")?;
                Ok(ins[0].clone())
            }
            Op::ReduceScatter { axis } | Op::Shard { axis } | Op::AllGather { axis } => {
                let x = ins[0];
                want_float(x, "operand")?;
                let ax = norm_axis(*axis, x.rank())?;
                let d = &x.shape[ax];
                let sym =
                    d.as_sym().ok_or_else(|| format!("axis {ax} ({d}) must be one symbol to be split over ranks"))?;
                let suffix = crate::collective::SHARD_SUFFIX;
                let to = match (self, sym.strip_suffix(suffix)) {
                    (Op::AllGather { .. }, Some(full)) => full.to_string(),
                    (Op::AllGather { .. }, None) => {
                        return Err(format!("all_gather axis {ax} ({d}) is not a shard dimension"))
                    }
                    (_, Some(_)) => return Err(format!("axis {ax} ({d}) is already sharded")),
                    (_, None) => format!("{sym}{suffix}"),
                };
                let mut shape = x.shape.clone();
                shape[ax] = Dim::sym(&to);
                Ok(f32t(shape))
            }
            Op::Cast { dtype } => {
                if dtype.is_quantized() {
                    return Err(format!("cast to quantized type {dtype} is not an op; quantize weights instead"));
                }
                Ok(TensorType::new(*dtype, ins[0].shape.clone()))
            }
            // Only the unary ops, whose rule is the guard arm above, reach here.
            other => Err(format!("`{}` has no type rule", other.name())),
        }
    }
}

fn fixed_product(shape: &[Dim]) -> i64 {
    shape.iter().filter_map(Dim::as_fixed).product()
}

fn symbolic_part(shape: &[Dim]) -> Vec<Dim> {
    let mut v: Vec<Dim> = shape.iter().filter(|d| d.as_fixed().is_none()).cloned().collect();
    v.sort();
    v
}

fn join(shape: &[Dim]) -> String {
    shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
}
