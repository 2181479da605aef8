//! `chess`: activation sparsity in the MLP (CHESS: channel-wise thresholds on the gate activation;
//! lossy).
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
//! Runs after `skip-layers` (it finds blocks by their down projection, which it replaces).

use crate::blocks::find_blocks;
use crate::{Pass, PassCx, PassError};
use kiln_ir::sparse::SPARSE_DTYPES;
use kiln_ir::{DType, Dim, Graph, Node, Op, TensorData, TensorType, ValueId};
use std::collections::HashMap;

/// The pass, configured with a target share of gate channels to drop per token, in `[0, 1)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Chess {
    pub sparsity: f64,
    /// Keep `W_downᵀ` in f32 (the dequantized weights exactly, 4 bytes each): the reference variant,
    /// equal to the dense model at sparsity 0 up to summation order. Off: Q8_0 for quantized weights.
    pub exact: bool,
}

impl Chess {
    pub fn new(sparsity: f64) -> Result<Chess, String> {
        if !(0.0..1.0).contains(&sparsity) {
            return Err(format!("chess sparsity {sparsity} is outside [0, 1)"));
        }
        Ok(Chess { sparsity, exact: false })
    }
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

fn find_mlps(g: &Graph) -> Result<Vec<Mlp>, String> {
    let mut out = Vec::new();
    for b in find_blocks(g)? {
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

/// `Wᵀ` of an `[n, k]` weight as `[k, n]`, quantized along `n` in `dtype` (or Q8_0 when the active-channel
/// kernel does not read `dtype`; f32 stays f32).
fn transposed(t: &TensorData, exact: bool) -> Result<TensorData, String> {
    let [n, k] = t.shape[..] else { return Err(format!("weight of shape {:?} is not a matrix", t.shape)) };
    let w = t.to_f32().map_err(|e| e.to_string())?;
    let mut wt = vec![0f32; n * k];
    for r in 0..n {
        for j in 0..k {
            wt[j * n + r] = w[r * k + j];
        }
    }
    // Quantized weights go to Q8_0: re-rounding Q4_1 into Q4_1 along the other axis cost +7% perplexity
    // on SmolLM2 at sparsity 0 (docs/quality.md); 8 bits keep that error small.
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

impl Pass for Chess {
    fn name(&self) -> &'static str {
        "chess"
    }

    fn run(&self, g: &mut Graph, cx: &PassCx) -> Result<bool, PassError> {
        let fail = |msg: String| PassError::Failed { pass: "chess", msg };
        Chess::new(self.sparsity).map_err(fail)?;
        let cal = cx
            .calibration
            .as_ref()
            .ok_or_else(|| fail("needs a calibration file (--calibration FILE, from `kiln calibrate`)".into()))?;
        let mlps = find_mlps(g).map_err(fail)?;
        let mut weights = cx.weights.borrow_mut();
        let mut by_swiglu: HashMap<usize, (usize, ValueId)> = HashMap::new();
        let mut by_down: HashMap<usize, usize> = HashMap::new();
        let mut derived = Vec::new();
        let mut layer_records = Vec::new();
        for (i, m) in mlps.iter().enumerate() {
            let stats = cal.layers.get(m.layer).ok_or_else(|| {
                fail(format!("the calibration file has no layer {} ({} layers)", m.layer, cal.layers.len()))
            })?;
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
            let wt_name = format!("{}#t{}", m.down_w, if self.exact { "-f32" } else { "" });
            let wt_ty = TensorType::new(wt.dtype, wt.shape.iter().map(|&d| Dim::from(d)).collect());
            let median = {
                let mut s = t.clone();
                s.sort_by(f32::total_cmp);
                s[s.len() / 2]
            };
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
            layer_records.push(
                serde_json::json!({"layer": m.layer, "median_threshold": median, "down_t_dtype": wt.dtype.name()}),
            );
            weights.insert(wt_name.clone(), wt);
            derived.push((t_name, wt_name, wt_ty));
            by_swiglu.insert(m.swiglu, (i, m.gate));
            by_down.insert(m.down, i);
        }
        drop(weights);

        // Rebuild in order, replacing each swiglu by the thresholded, masked MLP and each down projection
        // by the active-channel one. The old up projections and down weights die (dce removes them).
        let mut out = Graph::new(g.name.clone());
        let mut map: Vec<ValueId> = Vec::with_capacity(g.nodes.len());
        let err = |e: kiln_ir::GraphError| fail(e.to_string());
        for (i, n) in g.nodes.iter().enumerate() {
            let new = if let Some(&(mi, gate)) = by_swiglu.get(&i) {
                let m = &mlps[mi];
                let (t_name, _, _) = &derived[mi];
                let width = g.ty(gate).shape.last().cloned().expect("rank ≥ 1");
                let t = out.weight(t_name, TensorType::new(DType::F32, vec![width])).map_err(err)?;
                let a = out.add(Op::Silu, &[map[gate.index()]]).map_err(err)?;
                let a = out.add(Op::Threshold, &[a, t]).map_err(err)?;
                let up = out.add(Op::MaskedLinear, &[map[m.ffn_in.index()], map[m.up_w.index()], a]).map_err(err)?;
                out.add(Op::Mul, &[a, up]).map_err(err)?
            } else if let Some(&mi) = by_down.get(&i) {
                let (_, wt_name, wt_ty) = &derived[mi];
                let wt = out.weight(wt_name, wt_ty.clone()).map_err(err)?;
                out.add(Op::ActiveLinear, &[map[n.inputs[0].index()], wt]).map_err(err)?
            } else {
                let inputs = n.inputs.iter().map(|v| map[v.index()]).collect();
                out.nodes.push(Node { op: n.op.clone(), inputs, ty: n.ty.clone() });
                ValueId(out.nodes.len() as u32 - 1)
            };
            map.push(new);
        }
        out.outputs = g.outputs.iter().map(|(name, v)| (name.clone(), map[v.index()])).collect();
        *g = out;
        cx.record(
            "chess",
            serde_json::json!({
                "sparsity": self.sparsity,
                "thresholds": "per channel of silu(gate): the calibrated |activation| quantile at the sparsity",
                "calibration_text": cal.text.file,
                "layers": layer_records,
            }),
        );
        Ok(!mlps.is_empty())
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
