//! `chess`: activation sparsity in the MLP and the attention projections (CHESS: channel-wise thresholds
//! on activations; lossy).
//!
//! Per decoder block the SwiGLU MLP `down(silu(gate(x)) · up(x))` becomes
//! ```text
//! a  = threshold(silu(gate(x)), t)      t[c] = the calibrated |silu(gate)| quantile of channel c at the
//!                                             target sparsity (`Calibration::ffn_gate_abs_quantiles`)
//! u  = masked_linear(x, W_up, a)        up computed only for the channels a keeps
//! y  = active_linear(a · u, W_downᵀ)    down reading only the rows of the kept channels
//! ```
//! so at decode the up and down projections read a share `1 − sparsity` of their weights. `W_downᵀ` is a
//! derived weight (`blk.L.ffn_down.weight#t`, `[intermediate, hidden]`): f32/f16/bf16 are transposed
//! exactly; quantized formats are re-quantized along the hidden axis as Q8_0 (1.7× the bytes of Q4_1,
//! but re-rounding into Q4_1 cost +7% perplexity at sparsity 0; see `docs/quality.md`). A threshold of
//! 0 (sparsity 0) drops only exact zeros, which contribute nothing.
//!
//! With `scope` = `Attn` or `All` ([`ChessScope`]), the inputs of the attention projections are
//! thresholded the same way (per channel, `attn_in_abs_quantiles` / `attn_out_in_abs_quantiles`): Q/K/V
//! read `threshold(rms_norm(x_in), t_in)` (one threshold for the three) and the output projection
//! `threshold(attention, t_out)`, each as `active_linear` on its transposed weight (`blk.L.attn_q.weight#t`,
//! …; widths that are not a multiple of 32 keep the dense linear of the thresholded input).
//!
//! Other MLP forms ([`ChessMlp`], `--chess-mlp`) threshold projection inputs instead of the gate, the way
//! the attention projections are: `act` thresholds down's input silu(gate)·up (`ffn_act_abs_quantiles`;
//! gate and up stay dense), `input` thresholds the MLP input read by gate and up (`ffn_in_abs_quantiles`;
//! down stays dense), `io` both. With `per_layer` every activation gets one threshold per layer (the
//! quantile of all its channels pooled, `layer_abs_quantiles`) instead of one per channel.
//!
//! R-Sparse (`rsparse_rank`) adds to every projection that reads a thresholded input (attention, and the
//! MLP in the `io`/`act`/`input` forms — `io` is the MLP's default form with a rank) the dropped channels'
//! contribution through rank-r factors of its weight. The gate form cannot take it: the masked up never
//! computes the dropped channels.
//!
//! Runs after `skip-layers` (it finds blocks by their down projection, which it replaces).

use crate::blocks::find_blocks;
use crate::calibration::Activation;
use crate::{Pass, PassCx, PassError};
use kiln_ir::sparse::SPARSE_DTYPES;
use kiln_ir::{DType, Dim, Graph, Op, TensorData, TensorType, ValueId};
use std::collections::HashMap;

/// Which projections' inputs the pass thresholds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ChessScope {
    /// The SwiGLU gate activation (up masked, down input-sparse): the original CHESS MLP rewrite.
    #[default]
    Mlp,
    /// The inputs of the attention projections: the normed block input read by Q/K/V and the attention
    /// result read by the output projection (each input-sparse).
    Attn,
    /// Both.
    All,
}

impl ChessScope {
    pub const NAMES: [&'static str; 3] = ["mlp", "attn", "all"];

    pub fn parse(s: &str) -> Result<ChessScope, String> {
        match s {
            "mlp" => Ok(ChessScope::Mlp),
            "attn" => Ok(ChessScope::Attn),
            "all" => Ok(ChessScope::All),
            _ => Err(format!("unknown chess scope `{s}` (expected one of mlp, attn, all)")),
        }
    }

    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }

    pub fn mlp(self) -> bool {
        self != ChessScope::Attn
    }

    pub fn attn(self) -> bool {
        self != ChessScope::Mlp
    }
}

/// How the MLP is sparsified (with scope `mlp` or `all`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ChessMlp {
    /// CHESS: threshold silu(gate); up masked to the kept channels, down input-sparse.
    #[default]
    Gate,
    /// Threshold the down projection's input silu(gate)·up (TEAL-style; gate and up stay dense).
    Act,
    /// Threshold the MLP input x read by gate and up (both input-sparse; down stays dense).
    Input,
    /// Both `input` and `act`: every MLP projection reads a thresholded input. This is the form R-Sparse
    /// compensates (`rsparse_rank`): each projection adds the dropped channels through its low-rank factors.
    Io,
}

impl ChessMlp {
    pub const NAMES: [&'static str; 4] = ["gate", "act", "input", "io"];

    pub fn parse(s: &str) -> Result<ChessMlp, String> {
        match s {
            "gate" => Ok(ChessMlp::Gate),
            "act" => Ok(ChessMlp::Act),
            "input" => Ok(ChessMlp::Input),
            "io" => Ok(ChessMlp::Io),
            _ => Err(format!("unknown chess MLP form `{s}` (expected one of gate, act, input, io)")),
        }
    }

    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }

    /// Thresholds the MLP input (gate/up input-sparse).
    fn input(self) -> bool {
        matches!(self, ChessMlp::Input | ChessMlp::Io)
    }

    /// Thresholds the down projection's input.
    fn act(self) -> bool {
        matches!(self, ChessMlp::Act | ChessMlp::Io)
    }
}

/// The pass, configured with a target share of channels to drop per token, in `[0, 1)`.
#[derive(Clone, Debug, PartialEq)]
pub struct Chess {
    pub sparsity: f64,
    /// Keep the transposed weights in f32 (the dequantized weights exactly, 4 bytes each): the reference
    /// variant, equal to the dense model at sparsity 0 up to summation order. Off: Q8_0 for quantized weights.
    pub exact: bool,
    /// Which activations are thresholded.
    pub scope: ChessScope,
    /// R-Sparse: add to each projection that reads a thresholded input the dropped channels'
    /// contribution through a rank-`r` truncated SVD of its weight (`W·x ≈ W·x_kept + A·(B·x_dropped)`,
    /// `A·B = U_r·Σ_r·V_rᵀ` from [`low_rank_factors`], f32 derived weights). `None`: plain CHESS.
    pub rsparse_rank: Option<usize>,
    /// The MLP's form; `None`: [`ChessMlp::Gate`], or [`ChessMlp::Io`] with `rsparse_rank` (the gate form
    /// never computes the dropped up channels, so it has nothing to compensate).
    pub mlp: Option<ChessMlp>,
    /// One threshold per layer and activation (the quantile of all its channels pooled, TEAL-style)
    /// instead of one per channel (CHESS).
    pub per_layer: bool,
    /// With scope `all`: the attention projections' inputs at this sparsity instead of `sparsity`
    /// (which then applies to the MLP only), so a search can set the two separately.
    pub attn_sparsity: Option<f64>,
    /// This machine's kernel table (`kiln bench --kernels`): a projection whose column-layout kernel
    /// measured no faster than the dense one at its active share (1 − its sparsity) keeps the dense
    /// linear of the thresholded input (the same values). `None`: every eligible projection goes
    /// column-major.
    pub kernels: Option<std::sync::Arc<crate::prune::KernelTable>>,
}

impl Chess {
    pub fn new(sparsity: f64) -> Result<Chess, String> {
        if !(0.0..1.0).contains(&sparsity) {
            return Err(format!("chess sparsity {sparsity} is outside [0, 1)"));
        }
        Ok(Chess {
            sparsity,
            exact: false,
            scope: ChessScope::Mlp,
            rsparse_rank: None,
            mlp: None,
            per_layer: false,
            attn_sparsity: None,
            kernels: None,
        })
    }

    /// The MLP form this configuration uses (see [`Chess::mlp`]).
    pub fn mlp_form(&self) -> ChessMlp {
        self.mlp.unwrap_or(if self.rsparse_rank.is_some() { ChessMlp::Io } else { ChessMlp::Gate })
    }
}

/// One thresholded projection input of a block: the projections that read it.
struct AttnInput {
    layer: usize,
    /// `attn_in` (Q/K/V), `attn_out_in` (output projection), `ffn_in` (gate/up) or `ffn_act` (down).
    what: Activation,
    value: ValueId,
    /// (linear node, weight name) of each projection reading `value`.
    linears: Vec<(usize, String)>,
}

fn find_attn_inputs(g: &Graph, blocks: &[crate::blocks::Block]) -> Result<Vec<AttnInput>, String> {
    let mut out = Vec::new();
    for b in blocks {
        let l = b.layer;
        for (what, value, suffixes) in [
            (Activation::AttnIn, b.attn_in, &["attn_q.weight", "attn_k.weight", "attn_v.weight"][..]),
            (Activation::AttnOutIn, b.attn_out_in, &["attn_output.weight"][..]),
        ] {
            let mut linears = Vec::new();
            for sfx in suffixes {
                let want = format!("blk.{l}.{sfx}");
                let i = g
                    .nodes
                    .iter()
                    .position(|n| {
                        n.op == Op::Linear && n.inputs[0] == value && weight_name(g, n.inputs[1]) == Some(&want)
                    })
                    .ok_or_else(|| {
                        format!("block {l}: no linear of weight `{want}` reads {value} ({})", what.name())
                    })?;
                linears.push((i, want));
            }
            out.push(AttnInput { layer: l, what, value, linears });
        }
    }
    Ok(out)
}

/// The MLP inputs `form` thresholds (as [`AttnInput`]s): the input of gate and up, the input of down.
fn mlp_inputs(g: &Graph, mlps: &[Mlp], form: ChessMlp) -> Vec<AttnInput> {
    let name = |node: usize| weight_name(g, g.nodes[node].inputs[1]).expect("checked by find_mlps").to_string();
    let mut out = Vec::new();
    for m in mlps {
        if form.input() {
            let linears = vec![(m.gate.index(), name(m.gate.index())), (m.up.index(), name(m.up.index()))];
            out.push(AttnInput { layer: m.layer, what: Activation::FfnIn, value: m.ffn_in, linears });
        }
        if form.act() {
            let linears = vec![(m.down, m.down_w.clone())];
            out.push(AttnInput { layer: m.layer, what: Activation::FfnAct, value: ValueId(m.swiglu as u32), linears });
        }
    }
    out
}

/// What one block's MLP is made of.
pub(crate) struct Mlp {
    pub(crate) layer: usize,
    pub(crate) swiglu: usize,
    pub(crate) gate: ValueId,
    pub(crate) up: ValueId,
    pub(crate) ffn_in: ValueId,
    pub(crate) up_w: ValueId,
    pub(crate) down: usize,
    pub(crate) down_w: String,
}

pub(crate) fn weight_name(g: &Graph, v: ValueId) -> Option<&str> {
    match &g.node(v).op {
        Op::Weight { name } => Some(name),
        _ => None,
    }
}

pub(crate) fn find_mlps(g: &Graph, blocks: &[crate::blocks::Block]) -> Result<Vec<Mlp>, String> {
    let mut out = Vec::new();
    for b in blocks {
        let l = b.layer;
        let act = g.node(b.ffn_act);
        if act.op != Op::SwiGlu {
            return Err(format!("block {l}: the down projection does not read a swiglu"));
        }
        let (gate, up) = (act.inputs[0], act.inputs[1]);
        let upn = g.node(up);
        if upn.op != Op::Linear || weight_name(g, upn.inputs[1]).is_none() {
            return Err(format!("block {l}: the up projection is not a linear of a weight"));
        }
        let gn = g.node(gate);
        if gn.op != Op::Linear || weight_name(g, gn.inputs[1]).is_none() || gn.inputs[0] != upn.inputs[0] {
            return Err(format!("block {l}: the gate projection is not a linear of a weight reading up's input"));
        }
        // A linear, or (after structured pruning) an active_linear on a gathered column weight.
        let down = g
            .nodes
            .iter()
            .position(|n| {
                n.inputs.first() == Some(&b.ffn_act)
                    && (n.op == Op::Linear || (n.op == Op::ActiveLinear && g.ty(n.inputs[1]).dtype.is_gathered()))
            })
            .ok_or_else(|| format!("block {l}: no linear reads the MLP activation"))?;
        let down_w = weight_name(g, g.nodes[down].inputs[1])
            .ok_or_else(|| format!("block {l}: the down projection's weight is not a weight node"))?
            .to_string();
        out.push(Mlp {
            layer: l,
            swiglu: b.ffn_act.index(),
            gate,
            up,
            ffn_in: upn.inputs[0],
            up_w: upn.inputs[1],
            down,
            down_w,
        });
    }
    Ok(out)
}

/// `Wᵀ` of an `[n, k]` weight as `[k, n]`: for Q4_0/Q4_1/Q8_0 the exact column-major form (the same
/// codes and scales, `kiln_ir::column`), else quantized along `n` in `dtype` (or Q8_0 when the
/// active-channel kernel does not read `dtype`; f32 stays f32).
pub(crate) fn transposed(t: &TensorData, exact: bool) -> Result<TensorData, String> {
    // Structured pruning's gathered down weight is already `[k', n]` in an exact column format.
    if t.dtype.is_gathered() && !exact {
        return Ok(t.clone());
    }
    if t.dtype.is_gathered() {
        let [k, n] = t.shape[..] else { return Err(format!("weight of shape {:?} is not a matrix", t.shape)) };
        return Ok(TensorData::from_f32(vec![k, n], &t.to_f32().map_err(|e| e.to_string())?));
    }
    let [n, k] = t.shape[..] else { return Err(format!("weight of shape {:?} is not a matrix", t.shape)) };
    if !exact && t.dtype.column_of().is_some() && n.is_multiple_of(32) && k.is_multiple_of(32) {
        let (dtype, bytes) = kiln_ir::column::from_rows(t.dtype, n, k, &t.bytes).map_err(|e| e.to_string())?;
        return Ok(TensorData { dtype, shape: vec![k, n], bytes: bytes.into() });
    }
    let w = t.to_f32().map_err(|e| e.to_string())?;
    let mut wt = vec![0f32; n * k];
    for r in 0..n {
        for j in 0..k {
            wt[j * n + r] = w[r * k + j];
        }
    }
    // Other quantized weights go to Q8_0: re-rounding Q4_1 into Q4_1 along the other axis cost +7%
    // perplexity on SmolLM2 at sparsity 0 (docs/quality.md); 8 bits keep that error small.
    let dtype = match t.dtype {
        _ if exact => DType::F32,
        DType::F32 | DType::F16 | DType::BF16 if SPARSE_DTYPES.contains(&t.dtype) => t.dtype,
        _ => DType::Q8_0,
    };
    if dtype == DType::F32 {
        return Ok(TensorData::from_f32(vec![k, n], &wt));
    }
    let bytes = kiln_ir::quant::quantize(dtype, &wt).map_err(|e| e.to_string())?;
    Ok(TensorData { dtype, shape: vec![k, n], bytes: bytes.into() })
}

/// Kernel selection for one projection of weight `w` (row-major `src_dtype`) at input sparsity
/// `sparsity`, whose transposed weight is `wt` (`k = wt.shape[0]` inputs, `n = wt.shape[1]` outputs),
/// to be named `wt_name`: whether the active-channel kernel on `wt` is used, and the projection's
/// description for `--explain` and the manifest. A column-major `wt` (not a gathered one, which has no
/// dense form) is used where `table`'s measured decode ratio is below 1 at active share 1 − sparsity,
/// or without a table or a measurement of the dtype; other transposed weights always.
fn choose_layout(
    table: Option<&crate::prune::KernelTable>,
    w: &str,
    src_dtype: DType,
    wt: &TensorData,
    wt_name: &str,
    sparsity: f64,
) -> (bool, String) {
    let (k, n) = (wt.shape[0], wt.shape[1]);
    let active = 1.0 - sparsity;
    let (column, why) = match table {
        _ if !wt.dtype.is_column() || src_dtype.is_gathered() => (true, None),
        None => (true, Some("no kernel table: column kernel".to_string())),
        Some(table) => match table.column_ratio(src_dtype, k, n, active) {
            None => (true, Some(format!("no {src_dtype} column measurement in the kernel table: column kernel"))),
            Some(c) => {
                let near = if c.measured == (k, n) {
                    String::new()
                } else {
                    format!(", nearest measured {}→{}", c.measured.0, c.measured.1)
                };
                let why = format!(
                    "column kernel {:.2}× dense decode time at {:.0}% active (faster at every measured share up to {:.0}%{near})",
                    c.ratio,
                    active * 100.0,
                    c.break_even * 100.0
                );
                (c.ratio < 1.0, Some(why))
            }
        },
    };
    let desc = match (column, why) {
        (true, None) => format!("{wt_name} ({} [{k}, {n}])", wt.dtype),
        (true, Some(why)) => format!("{wt_name} ({} [{k}, {n}]; {why})", wt.dtype),
        (false, why) => format!("{w} dense ({})", why.unwrap_or_default()),
    };
    (column, desc)
}

/// How the rebuild treats one node of the input graph.
enum Action {
    /// The swiglu of MLP `i`: thresholded gate, masked up.
    Swiglu(usize),
    /// The down projection of MLP `i`: active-channel on the transposed weight.
    Down(usize),
    /// A projection reading thresholded input `t` (index into the attention inputs): active-channel on
    /// the transposed weight when it has one, else the dense linear of the thresholded input.
    Proj { t: usize, wt: Option<(String, TensorType)>, low_rank: Option<LowRank> },
}

/// R-Sparse's compensation of one projection: the names and types of `A [n, r]` and `B [r, k]`
/// ([`low_rank_factors`]).
struct LowRank {
    a: (String, TensorType),
    b: (String, TensorType),
}

/// Rank-`r` factors of the `[n, k]` matrix `w` whose product `A·B` (`A [n, r]`, `B [r, k]`, row-major f32)
/// is its rank-`r` truncated SVD `U_r·Σ_r·V_rᵀ` (`r` ≤ min(n, k); the best rank-`r` approximation,
/// Eckart–Young). Computed through the eigenvectors of the smaller Gram matrix (`W·Wᵀ` when n ≤ k, giving
/// `A = U_r`, `B = U_rᵀ·W`; else `Wᵀ·W`, giving `A = W·V_r`, `B = V_rᵀ`), in f64: one `min(n, k)`-square
/// symmetric eigenproblem instead of a full SVD, which made compiling SmolLM2's 90 MLP weights take minutes.
pub fn low_rank_factors(w: &[f32], n: usize, k: usize, r: usize) -> Result<(Vec<f32>, Vec<f32>), String> {
    if w.len() != n * k || r > n.min(k) {
        return Err(format!("rank {r} factors of a [{n}, {k}] matrix of {} values", w.len()));
    }
    let m = nalgebra::DMatrix::from_row_iterator(n, k, w.iter().map(|&v| v as f64));
    let wide = n <= k;
    let gram = if wide { &m * m.transpose() } else { m.transpose() * &m };
    let eig = gram.symmetric_eigen();
    let mut order: Vec<usize> = (0..eig.eigenvalues.len()).collect();
    order.sort_by(|&i, &j| eig.eigenvalues[j].total_cmp(&eig.eigenvalues[i]));
    // The top-r eigenvectors as columns: U_r [n, r] (wide) or V_r [k, r].
    let basis = nalgebra::DMatrix::from_fn(eig.eigenvectors.nrows(), r, |row, c| eig.eigenvectors[(row, order[c])]);
    let (a, b) = if wide {
        let b = basis.transpose() * &m;
        (basis, b)
    } else {
        (&m * &basis, basis.transpose())
    };
    let row_major = |x: &nalgebra::DMatrix<f64>| {
        (0..x.nrows()).flat_map(|i| (0..x.ncols()).map(move |j| x[(i, j)] as f32)).collect::<Vec<f32>>()
    };
    Ok((row_major(&a), row_major(&b)))
}

fn median(t: &[f32]) -> f32 {
    let mut s = t.to_vec();
    s.sort_by(f32::total_cmp);
    s.get(s.len() / 2).copied().unwrap_or(0.0)
}

impl Pass for Chess {
    fn name(&self) -> &'static str {
        "chess"
    }

    fn run(&self, g: &mut Graph, cx: &PassCx) -> Result<bool, PassError> {
        let fail = |msg: String| PassError::Failed { pass: "chess", msg };
        Chess::new(self.sparsity).map_err(fail)?;
        if let Some(s) = self.attn_sparsity {
            Chess::new(s).map_err(|e| fail(format!("attention inputs: {e}")))?;
        }
        let form = self.mlp_form();
        if self.rsparse_rank.is_some() && self.scope.mlp() && form == ChessMlp::Gate {
            return Err(fail(
                "R-Sparse on the MLP needs an input-sparse MLP form (io, act or input): the gate form never \
                 computes the dropped up channels, so there is nothing to compensate"
                    .into(),
            ));
        }
        if self.rsparse_rank == Some(0) {
            return Err(fail("R-Sparse rank 0 compensates nothing (use plain chess, or a rank ≥ 1)".into()));
        }
        let cal = cx
            .calibration
            .as_ref()
            .ok_or_else(|| fail("needs a calibration file (--calibration FILE, from `kiln calibrate`)".into()))?;
        let blocks = find_blocks(g).map_err(fail)?;
        let all_mlps = if self.scope.mlp() { find_mlps(g, &blocks).map_err(fail)? } else { Vec::new() };
        let mut attn = if self.scope.attn() { find_attn_inputs(g, &blocks).map_err(fail)? } else { Vec::new() };
        // The gate form rewrites the swiglu and down; the others threshold projection inputs like attention.
        if form != ChessMlp::Gate {
            attn.extend(mlp_inputs(g, &all_mlps, form));
        }
        let mlps = if form == ChessMlp::Gate { all_mlps } else { Vec::new() };
        let stats_of = |layer: usize| {
            cal.layers
                .get(layer)
                .ok_or_else(|| fail(format!("the calibration file has no layer {layer} ({} layers)", cal.layers.len())))
        };
        let wt_suffix = if self.exact { "#t-f32" } else { "#t" };
        let t_kind = if self.per_layer { "-layer" } else { "" };
        let t_desc = if self.per_layer { "the layer's pooled" } else { "their" };
        let mut weights = cx.weights.borrow_mut();
        let mut actions: HashMap<usize, Action> = HashMap::new();
        let mut derived = Vec::new();
        let mut layer_records = Vec::new();
        for (i, m) in mlps.iter().enumerate() {
            let stats = stats_of(m.layer)?;
            let width = g.ty(m.gate).shape.last().and_then(Dim::as_fixed).unwrap_or(-1);
            if width as usize != stats.ffn_gate_abs_quantiles.len() {
                return Err(fail(format!(
                    "layer {}: the calibration file has {} gate channels, the graph {width}",
                    m.layer,
                    stats.ffn_gate_abs_quantiles.len()
                )));
            }
            let t = stats
                .thresholds(Activation::FfnGate, &cal.quantile_levels, self.sparsity, self.per_layer)
                .map_err(fail)?;
            let gate_w = weight_of_gate(g, m.gate).map_err(fail)?;
            let t_name = format!("{}#chess{}{t_kind}", weight_name(g, gate_w).expect("checked"), self.sparsity);
            weights.insert(t_name.clone(), TensorData::from_f32(vec![t.len()], &t));
            let src =
                weights.get(&m.down_w).ok_or_else(|| fail(format!("weight `{}` is not in the store", m.down_w)))?;
            let src_dtype = src.dtype;
            let wt = transposed(src, self.exact).map_err(|e| fail(format!("{}: {e}", m.down_w)))?;
            let wt_name = format!("{}{wt_suffix}", m.down_w);
            let wt_ty = TensorType::new(wt.dtype, wt.shape.iter().map(|&d| Dim::from(d)).collect());
            let (column, down) =
                choose_layout(self.kernels.as_deref(), &m.down_w, src_dtype, &wt, &wt_name, self.sparsity);
            let median = median(&t);
            cx.explain(
                "chess",
                format!(
                    "layer {}: {} gate channels thresholded at {t_desc} {:.0}% |silu(gate)| quantile (median t = {median:.4}); \
                     up masked, down reads {down}",
                    m.layer,
                    t.len(),
                    self.sparsity * 100.0,
                ),
            );
            layer_records
                .push(serde_json::json!({"layer": m.layer, "input": "ffn_gate_act", "median_threshold": median,
                "down_t_dtype": column.then(|| wt.dtype.name()), "down": down}));
            let down_t = if column {
                weights.insert(wt_name.clone(), wt);
                Some((wt_name, wt_ty))
            } else {
                None
            };
            derived.push((t_name, down_t));
            actions.insert(m.swiglu, Action::Swiglu(i));
            actions.insert(m.down, Action::Down(i));
        }
        // Attention: per block, the normed input of Q/K/V and the input of the output projection.
        let mut attn_thresholds: Vec<(String, usize)> = Vec::new();
        for (ti, a) in attn.iter().enumerate() {
            let stats = stats_of(a.layer)?;
            let sparsity = match a.what {
                Activation::AttnIn | Activation::AttnOutIn => self.attn_sparsity.unwrap_or(self.sparsity),
                _ => self.sparsity,
            };
            let t = stats.thresholds(a.what, &cal.quantile_levels, sparsity, self.per_layer).map_err(fail)?;
            let width = g.ty(a.value).shape.last().and_then(Dim::as_fixed).unwrap_or(-1);
            if width as usize != t.len() {
                return Err(fail(format!(
                    "layer {}: the calibration file has {} {} channels, the graph {width}",
                    a.layer,
                    t.len(),
                    a.what.name()
                )));
            }
            let t_name = format!("blk.{}.{}#chess{}{t_kind}", a.layer, a.what.name(), sparsity);
            let median = median(&t);
            weights.insert(t_name.clone(), TensorData::from_f32(vec![t.len()], &t));
            attn_thresholds.push((t_name, t.len()));
            let mut projs = Vec::new();
            for (node, w) in &a.linears {
                let src = weights.get(w).ok_or_else(|| fail(format!("weight `{w}` is not in the store")))?;
                let n = src.shape.first().copied().unwrap_or(0);
                // The active-channel kernel writes whole blocks of 32 outputs; other widths keep the
                // dense linear (of the thresholded input: the same values, no saving).
                let wt = if n % 32 == 0 {
                    let src_dtype = src.dtype;
                    let wt = transposed(src, self.exact).map_err(|e| fail(format!("{w}: {e}")))?;
                    let wt_name = format!("{w}{wt_suffix}");
                    let wt_ty = TensorType::new(wt.dtype, wt.shape.iter().map(|&d| Dim::from(d)).collect());
                    let (column, desc) = choose_layout(self.kernels.as_deref(), w, src_dtype, &wt, &wt_name, sparsity);
                    projs.push(desc);
                    if column {
                        weights.insert(wt_name.clone(), wt);
                        Some((wt_name, wt_ty))
                    } else {
                        None
                    }
                } else {
                    projs.push(format!("{w} dense ({n} outputs, not a multiple of 32)"));
                    None
                };
                let low_rank = match self.rsparse_rank {
                    Some(r) if r > 0 => {
                        let src = weights.get(w).expect("read above");
                        let [n, k] = src.shape[..] else { return Err(fail(format!("{w} is not a matrix"))) };
                        let r = r.min(n).min(k);
                        let vals = src.to_f32().map_err(|e| fail(format!("{w}: {e}")))?;
                        let (a, b) = low_rank_factors(&vals, n, k, r).map_err(|e| fail(format!("{w}: {e}")))?;
                        let (an, bn) = (format!("{w}#rsparse{r}a"), format!("{w}#rsparse{r}b"));
                        weights.insert(an.clone(), TensorData::from_f32(vec![n, r], &a));
                        weights.insert(bn.clone(), TensorData::from_f32(vec![r, k], &b));
                        projs.push(format!("+ rank-{r} compensation ({an} [{n}, {r}], {bn} [{r}, {k}], f32)"));
                        let ty = |d0: usize, d1: usize| TensorType::new(DType::F32, vec![Dim::from(d0), Dim::from(d1)]);
                        Some(LowRank { a: (an, ty(n, r)), b: (bn, ty(r, k)) })
                    }
                    _ => None,
                };
                actions.insert(*node, Action::Proj { t: ti, wt, low_rank });
            }
            cx.explain(
                "chess",
                format!(
                    "layer {}: {} {} channels thresholded at {t_desc} {:.0}% |x| quantile (median t = {median:.4}); reads {}",
                    a.layer,
                    t.len(),
                    a.what.name(),
                    sparsity * 100.0,
                    projs.join(", ")
                ),
            );
            layer_records
                .push(serde_json::json!({"layer": a.layer, "input": a.what.name(), "median_threshold": median,
                "projections": projs}));
        }
        drop(weights);

        // Rebuild in order, replacing each swiglu by the thresholded, masked MLP, each down projection by
        // the active-channel one, and each attention projection by the active-channel one on its thresholded
        // input (one threshold per input, made where its first reader was). The old weights die (dce).
        let mut out = Graph::new(g.name.clone());
        let mut map: Vec<ValueId> = Vec::with_capacity(g.nodes.len());
        let mut thresholded: HashMap<usize, ValueId> = HashMap::new();
        let mut dropped: HashMap<usize, ValueId> = HashMap::new();
        let err = |e: kiln_ir::GraphError| fail(e.to_string());
        for (i, n) in g.nodes.iter().enumerate() {
            let new = match actions.get(&i) {
                Some(&Action::Swiglu(mi)) => {
                    let m = &mlps[mi];
                    let (t_name, _) = &derived[mi];
                    let width = g.ty(m.gate).shape.last().cloned().expect("rank ≥ 1");
                    let t = out.weight(t_name, TensorType::new(DType::F32, vec![width])).map_err(err)?;
                    let a = out.add(Op::Silu, &[map[m.gate.index()]]).map_err(err)?;
                    let a = out.add(Op::Threshold, &[a, t]).map_err(err)?;
                    let up =
                        out.add(Op::MaskedLinear, &[map[m.ffn_in.index()], map[m.up_w.index()], a]).map_err(err)?;
                    out.add(Op::Mul, &[a, up]).map_err(err)?
                }
                Some(Action::Down(mi)) => match &derived[*mi].1 {
                    Some((wt_name, wt_ty)) => {
                        let wt = out.weight(wt_name, wt_ty.clone()).map_err(err)?;
                        out.add(Op::ActiveLinear, &[map[n.inputs[0].index()], wt]).map_err(err)?
                    }
                    // The dense kernel measured faster: the same projection of the masked product.
                    None => crate::copy_node(&mut out, &map, n),
                },
                Some(Action::Proj { t, wt, low_rank }) => {
                    let x = map[n.inputs[0].index()];
                    let xs = match thresholded.get(t) {
                        Some(&v) => v,
                        None => {
                            let (t_name, width) = &attn_thresholds[*t];
                            let tv = out
                                .weight(t_name, TensorType::new(DType::F32, vec![Dim::from(*width)]))
                                .map_err(err)?;
                            let v = out.add(Op::Threshold, &[x, tv]).map_err(err)?;
                            thresholded.insert(*t, v);
                            v
                        }
                    };
                    let y = match wt {
                        Some((wt_name, wt_ty)) => {
                            let wt = out.weight(wt_name, wt_ty.clone()).map_err(err)?;
                            out.add(Op::ActiveLinear, &[xs, wt]).map_err(err)?
                        }
                        None => out.add(Op::Linear, &[xs, map[n.inputs[1].index()]]).map_err(err)?,
                    };
                    match low_rank {
                        // y + A·(B·(x − x_kept)): the dropped channels through the rank-r factors.
                        Some(lr) => {
                            let xd = match dropped.get(t) {
                                Some(&v) => v,
                                None => {
                                    let v = out.add(Op::Sub, &[x, xs]).map_err(err)?;
                                    dropped.insert(*t, v);
                                    v
                                }
                            };
                            let b = out.weight(&lr.b.0, lr.b.1.clone()).map_err(err)?;
                            let a = out.weight(&lr.a.0, lr.a.1.clone()).map_err(err)?;
                            let z = out.add(Op::Linear, &[xd, b]).map_err(err)?;
                            let c = out.add(Op::Linear, &[z, a]).map_err(err)?;
                            out.add(Op::Add, &[y, c]).map_err(err)?
                        }
                        None => y,
                    }
                }
                None => crate::copy_node(&mut out, &map, n),
            };
            map.push(new);
        }
        out.outputs = g.outputs.iter().map(|(name, v)| (name.clone(), map[v.index()])).collect();
        *g = out;
        cx.record(
            "chess",
            serde_json::json!({
                "sparsity": self.sparsity,
                "attn_sparsity": self.scope.attn().then(|| self.attn_sparsity.unwrap_or(self.sparsity)),
                "scope": self.scope.name(),
                "rsparse_rank": self.rsparse_rank,
                "mlp": self.scope.mlp().then_some(form.name()),
                "thresholds": if self.per_layer {
                    "per layer of each thresholded activation: the calibrated |activation| quantile of all its channels pooled at the sparsity"
                } else {
                    "per channel of each thresholded activation: the calibrated |activation| quantile at the sparsity"
                },
                "calibration_text": cal.text.file,
                "layers": layer_records,
            }),
        );
        Ok(!actions.is_empty())
    }
}

/// The gate projection's weight node.
pub(crate) fn weight_of_gate(g: &Graph, gate: ValueId) -> Result<ValueId, String> {
    let n = g.node(gate);
    match n.op {
        Op::Linear if weight_name(g, n.inputs[1]).is_some() => Ok(n.inputs[1]),
        _ => Err(format!("{gate} (the gate) is not a linear of a weight")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `A·B` of the rank-r factors, `[n, k]`.
    fn product(a: &[f32], b: &[f32], n: usize, k: usize, r: usize) -> Vec<f64> {
        let mut out = vec![0f64; n * k];
        for i in 0..n {
            for j in 0..k {
                out[i * k + j] = (0..r).map(|c| a[i * r + c] as f64 * b[c * k + j] as f64).sum();
            }
        }
        out
    }

    #[test]
    fn low_rank_factors_by_hand() {
        // W = 3·e0·f0ᵀ + 2·e1·f1ᵀ + 1·e2·f2ᵀ with orthonormal f (a rotation in the first two columns):
        // singular values 3, 2, 1 by construction.
        let (n, k) = (3, 4);
        let (c, s) = (0.6f32, 0.8f32);
        let f = [[c, s, 0.0, 0.0], [-s, c, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]];
        let sv = [3.0f32, 2.0, 1.0];
        let mut w = vec![0f32; n * k];
        for i in 0..n {
            for j in 0..k {
                w[i * k + j] = sv[i] * f[i][j];
            }
        }
        // Full rank reconstructs W.
        let (a, b) = low_rank_factors(&w, n, k, 3).unwrap();
        let p = product(&a, &b, n, k, 3);
        assert!(p.iter().zip(&w).all(|(x, &y)| (x - y as f64).abs() < 1e-5), "{p:?} vs {w:?}");
        // Rank 1 keeps the largest term, 3·e0·f0ᵀ (up to the factors' joint sign); the error is what
        // Eckart–Young says: sqrt(2² + 1²).
        let (a, b) = low_rank_factors(&w, n, k, 1).unwrap();
        let p = product(&a, &b, n, k, 1);
        for j in 0..k {
            assert!((p[j] - (3.0 * f[0][j]) as f64).abs() < 1e-5, "{p:?}");
            assert!(p[k + j].abs() < 1e-5 && p[2 * k + j].abs() < 1e-5, "{p:?}");
        }
        let err: f64 = p.iter().zip(&w).map(|(x, &y)| (x - y as f64).powi(2)).sum::<f64>().sqrt();
        assert!((err - 5f64.sqrt()).abs() < 1e-5, "{err}");
        // A tall matrix (Wᵀ, [4, 3]) goes through the other Gram matrix: the same errors.
        let wt: Vec<f32> = (0..k).flat_map(|j| (0..n).map(move |i| (i, j))).map(|(i, j)| w[i * k + j]).collect();
        for (r, want) in [(1, 5f64.sqrt()), (2, 1.0), (3, 0.0)] {
            let (a, b) = low_rank_factors(&wt, k, n, r).unwrap();
            let p = product(&a, &b, k, n, r);
            let err: f64 = p.iter().zip(&wt).map(|(x, &y)| (x - y as f64).powi(2)).sum::<f64>().sqrt();
            assert!((err - want).abs() < 1e-5, "tall rank {r}: {err} vs {want}");
        }
        assert!(low_rank_factors(&w, n, k, 4).is_err(), "rank above min(n, k)");
        assert!(low_rank_factors(&w[..5], n, k, 1).is_err(), "wrong size");
    }
}
