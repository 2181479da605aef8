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
//! Runs after `skip-layers` (it finds blocks by their down projection, which it replaces).

use crate::blocks::find_blocks;
use crate::{Pass, PassCx, PassError};
use kiln_ir::sparse::SPARSE_DTYPES;
use kiln_ir::{DType, Dim, Graph, Node, Op, TensorData, TensorType, ValueId};
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

/// The pass, configured with a target share of channels to drop per token, in `[0, 1)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Chess {
    pub sparsity: f64,
    /// Keep the transposed weights in f32 (the dequantized weights exactly, 4 bytes each): the reference
    /// variant, equal to the dense model at sparsity 0 up to summation order. Off: Q8_0 for quantized weights.
    pub exact: bool,
    /// Which activations are thresholded.
    pub scope: ChessScope,
    /// R-Sparse: add to each attention projection the dropped channels' contribution through a rank-`r`
    /// truncated SVD of its weight (`W·x ≈ W·x_kept + A·(B·x_dropped)`, `A = U_r·Σ_r`, `B = V_rᵀ`, f32
    /// derived weights). `None`: plain CHESS.
    pub rsparse_rank: Option<usize>,
}

impl Chess {
    pub fn new(sparsity: f64) -> Result<Chess, String> {
        if !(0.0..1.0).contains(&sparsity) {
            return Err(format!("chess sparsity {sparsity} is outside [0, 1)"));
        }
        Ok(Chess { sparsity, exact: false, scope: ChessScope::Mlp, rsparse_rank: None })
    }
}

/// One thresholded attention-projection input of a block: the projections that read it.
struct AttnInput {
    layer: usize,
    /// `attn_in` (Q/K/V) or `attn_out_in` (output projection).
    what: &'static str,
    value: ValueId,
    /// (linear node, weight name) of each projection reading `value`.
    linears: Vec<(usize, String)>,
}

fn find_attn_inputs(g: &Graph, blocks: &[crate::blocks::Block]) -> Result<Vec<AttnInput>, String> {
    let mut out = Vec::new();
    for b in blocks {
        let l = b.layer;
        for (what, value, suffixes) in [
            ("attn_in", b.attn_in, &["attn_q.weight", "attn_k.weight", "attn_v.weight"][..]),
            ("attn_out_in", b.attn_out_in, &["attn_output.weight"][..]),
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
                    .ok_or_else(|| format!("block {l}: no linear of weight `{want}` reads {value} ({what})"))?;
                linears.push((i, want));
            }
            out.push(AttnInput { layer: l, what, value, linears });
        }
    }
    Ok(out)
}

/// What one block's MLP is made of.
struct Mlp {
    layer: usize,
    swiglu: usize,
    gate: ValueId,
    ffn_in: ValueId,
    up_w: ValueId,
    down: usize,
    down_w: String,
}

fn weight_name(g: &Graph, v: ValueId) -> Option<&str> {
    match &g.node(v).op {
        Op::Weight { name } => Some(name),
        _ => None,
    }
}

fn find_mlps(g: &Graph, blocks: &[crate::blocks::Block]) -> Result<Vec<Mlp>, String> {
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
        let down = g
            .nodes
            .iter()
            .position(|n| n.op == Op::Linear && n.inputs[0] == b.ffn_act)
            .ok_or_else(|| format!("block {l}: no linear reads the MLP activation"))?;
        let down_w = weight_name(g, g.nodes[down].inputs[1])
            .ok_or_else(|| format!("block {l}: the down projection's weight is not a weight node"))?
            .to_string();
        out.push(Mlp {
            layer: l,
            swiglu: b.ffn_act.index(),
            gate,
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
fn transposed(t: &TensorData, exact: bool) -> Result<TensorData, String> {
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

/// R-Sparse's compensation of one projection: the names and types of `A [n, r]` and `B [r, k]`.
struct LowRank {
    a: (String, TensorType),
    b: (String, TensorType),
}

/// The rank-`r` truncated SVD of the `[n, k]` matrix `w` as (`A = U_r·Σ_r` `[n, r]`, `B = V_rᵀ` `[r, k]`),
/// row-major f32, singular values in decreasing order (`r` ≤ min(n, k)).
pub fn low_rank_factors(w: &[f32], n: usize, k: usize, r: usize) -> Result<(Vec<f32>, Vec<f32>), String> {
    if w.len() != n * k || r > n.min(k) {
        return Err(format!("rank {r} factors of a [{n}, {k}] matrix of {} values", w.len()));
    }
    let m = nalgebra::DMatrix::from_row_iterator(n, k, w.iter().map(|&v| v as f64));
    let svd = m.svd(true, true);
    let (u, vt) = (svd.u.ok_or("SVD gave no U")?, svd.v_t.ok_or("SVD gave no Vᵀ")?);
    let mut order: Vec<usize> = (0..svd.singular_values.len()).collect();
    order.sort_by(|&i, &j| svd.singular_values[j].total_cmp(&svd.singular_values[i]));
    let mut a = vec![0f32; n * r];
    let mut b = vec![0f32; r * k];
    for (c, &i) in order.iter().take(r).enumerate() {
        let sv = svd.singular_values[i];
        for row in 0..n {
            a[row * r + c] = (u[(row, i)] * sv) as f32;
        }
        for col in 0..k {
            b[c * k + col] = vt[(i, col)] as f32;
        }
    }
    Ok((a, b))
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
        if self.rsparse_rank.is_some() && !self.scope.attn() {
            return Err(fail("R-Sparse compensates the attention projections: it needs scope attn or all".into()));
        }
        let cal = cx
            .calibration
            .as_ref()
            .ok_or_else(|| fail("needs a calibration file (--calibration FILE, from `kiln calibrate`)".into()))?;
        let blocks = find_blocks(g).map_err(fail)?;
        let mlps = if self.scope.mlp() { find_mlps(g, &blocks).map_err(fail)? } else { Vec::new() };
        let attn = if self.scope.attn() { find_attn_inputs(g, &blocks).map_err(fail)? } else { Vec::new() };
        let stats_of = |layer: usize| {
            cal.layers
                .get(layer)
                .ok_or_else(|| fail(format!("the calibration file has no layer {layer} ({} layers)", cal.layers.len())))
        };
        let wt_suffix = if self.exact { "#t-f32" } else { "#t" };
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
            let t = stats.ffn_gate_thresholds(&cal.quantile_levels, self.sparsity);
            let gate_w = weight_of_gate(g, m.gate).map_err(fail)?;
            let t_name = format!("{}#chess{}", weight_name(g, gate_w).expect("checked"), self.sparsity);
            weights.insert(t_name.clone(), TensorData::from_f32(vec![t.len()], &t));
            let src =
                weights.get(&m.down_w).ok_or_else(|| fail(format!("weight `{}` is not in the store", m.down_w)))?;
            let wt = transposed(src, self.exact).map_err(|e| fail(format!("{}: {e}", m.down_w)))?;
            let wt_name = format!("{}{wt_suffix}", m.down_w);
            let wt_ty = TensorType::new(wt.dtype, wt.shape.iter().map(|&d| Dim::from(d)).collect());
            let median = median(&t);
            cx.explain(
                "chess",
                format!(
                    "layer {}: {} gate channels thresholded at their {:.0}% |silu(gate)| quantile (median t = {median:.4}); \
                     up masked, down reads {wt_name} ({} [{}, {}])",
                    m.layer,
                    t.len(),
                    self.sparsity * 100.0,
                    wt.dtype,
                    wt.shape[0],
                    wt.shape[1]
                ),
            );
            layer_records
                .push(serde_json::json!({"layer": m.layer, "input": "ffn_gate_act", "median_threshold": median,
                "down_t_dtype": wt.dtype.name()}));
            weights.insert(wt_name.clone(), wt);
            derived.push((t_name, wt_name, wt_ty));
            actions.insert(m.swiglu, Action::Swiglu(i));
            actions.insert(m.down, Action::Down(i));
        }
        // Attention: per block, the normed input of Q/K/V and the input of the output projection.
        let mut attn_thresholds: Vec<(String, usize)> = Vec::new();
        for (ti, a) in attn.iter().enumerate() {
            let stats = stats_of(a.layer)?;
            let t = if a.what == "attn_in" {
                stats.attn_in_thresholds(&cal.quantile_levels, self.sparsity)
            } else {
                stats.attn_out_in_thresholds(&cal.quantile_levels, self.sparsity)
            };
            if t.is_empty() {
                return Err(fail(format!(
                    "the calibration file has no per-channel quantiles of {} (layer {}); re-run `kiln calibrate`",
                    a.what, a.layer
                )));
            }
            let width = g.ty(a.value).shape.last().and_then(Dim::as_fixed).unwrap_or(-1);
            if width as usize != t.len() {
                return Err(fail(format!(
                    "layer {}: the calibration file has {} {} channels, the graph {width}",
                    a.layer,
                    t.len(),
                    a.what
                )));
            }
            let t_name = format!("blk.{}.{}#chess{}", a.layer, a.what, self.sparsity);
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
                    let wt = transposed(src, self.exact).map_err(|e| fail(format!("{w}: {e}")))?;
                    let wt_name = format!("{w}{wt_suffix}");
                    let wt_ty = TensorType::new(wt.dtype, wt.shape.iter().map(|&d| Dim::from(d)).collect());
                    projs.push(format!("{wt_name} ({} [{}, {}])", wt.dtype, wt.shape[0], wt.shape[1]));
                    weights.insert(wt_name.clone(), wt);
                    Some((wt_name, wt_ty))
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
                    "layer {}: {} {} channels thresholded at their {:.0}% |x| quantile (median t = {median:.4}); reads {}",
                    a.layer,
                    t.len(),
                    a.what,
                    self.sparsity * 100.0,
                    projs.join(", ")
                ),
            );
            layer_records.push(serde_json::json!({"layer": a.layer, "input": a.what, "median_threshold": median,
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
                    let (t_name, _, _) = &derived[mi];
                    let width = g.ty(m.gate).shape.last().cloned().expect("rank ≥ 1");
                    let t = out.weight(t_name, TensorType::new(DType::F32, vec![width])).map_err(err)?;
                    let a = out.add(Op::Silu, &[map[m.gate.index()]]).map_err(err)?;
                    let a = out.add(Op::Threshold, &[a, t]).map_err(err)?;
                    let up =
                        out.add(Op::MaskedLinear, &[map[m.ffn_in.index()], map[m.up_w.index()], a]).map_err(err)?;
                    out.add(Op::Mul, &[a, up]).map_err(err)?
                }
                Some(Action::Down(mi)) => {
                    let (_, wt_name, wt_ty) = &derived[*mi];
                    let wt = out.weight(wt_name, wt_ty.clone()).map_err(err)?;
                    out.add(Op::ActiveLinear, &[map[n.inputs[0].index()], wt]).map_err(err)?
                }
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
                None => {
                    let inputs = n.inputs.iter().map(|v| map[v.index()]).collect();
                    out.nodes.push(Node { op: n.op.clone(), inputs, ty: n.ty.clone() });
                    ValueId(out.nodes.len() as u32 - 1)
                }
            };
            map.push(new);
        }
        out.outputs = g.outputs.iter().map(|(name, v)| (name.clone(), map[v.index()])).collect();
        *g = out;
        cx.record(
            "chess",
            serde_json::json!({
                "sparsity": self.sparsity,
                "scope": self.scope.name(),
                "rsparse_rank": self.rsparse_rank,
                "thresholds": "per channel of each thresholded activation: the calibrated |activation| quantile at the sparsity",
                "calibration_text": cal.text.file,
                "layers": layer_records,
            }),
        );
        Ok(!actions.is_empty())
    }
}

/// The gate projection's weight node.
fn weight_of_gate(g: &Graph, gate: ValueId) -> Result<ValueId, String> {
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
        assert!(low_rank_factors(&w, n, k, 4).is_err(), "rank above min(n, k)");
        assert!(low_rank_factors(&w[..5], n, k, 1).is_err(), "wrong size");
    }
}
