//! `structured-prune`: removes whole MLP neurons and attention query heads (lossy), physically
//! shrinking the weights, so every kernel simply does less work (no new op, no sparse kernel).
//!
//! Per decoder block:
//! - **Neurons.** Neuron `j` of the SwiGLU MLP `down(silu(gate(x)) · up(x))` contributes
//!   `a_j · W_down[:, j]` to the block's output, so its importance is the calibrated mean `|a_j|`
//!   (`LayerStats::ffn_act_mean_abs`, `a = silu(gate)·up`) times `‖W_down[:, j]‖₂`. The
//!   `round(neurons · I)` least important are dropped: rows of `W_gate`/`W_up` (gathered in their stored
//!   dtype, exactly) and the matching columns of `W_down`. Gathered columns of a block-quantized `W_down`
//!   no longer line up with its blocks: for Q4_0/Q4_1/Q8_0 they are stored in the **gathered column
//!   format** (`q4_1g`, …, `kiln_ir::column::gather`: the kept channels' own codes and the scales of
//!   the blocks they came from, exact) and the down projection becomes `active_linear`, which reads it
//!   with the column kernels; other block formats are re-quantized as Q8_0 (kept count a multiple of
//!   32); f32 stays f32 (exact), f16/bf16 are re-encoded exactly.
//! - **Heads.** Query head `h` contributes `o_h · W_o[:, h·d:(h+1)·d]`; its importance is
//!   `Σ_c mean|o_c| · ‖W_o[:, c]‖₂` over its `d` channels (`attn_out_in_mean_abs`). Grouped-query
//!   attention shares one KV head among `Hq/Hkv` query heads, so the same number (`heads`) of query
//!   heads is dropped from **every** group: the group size stays uniform, the KV projections, the KV
//!   cache and the rope are untouched. The kept heads' rows of `W_q` and columns of `W_o` are gathered
//!   in their stored dtype when a head's columns are whole quantization blocks (else gathered like
//!   `W_down`), exactly; the reshapes around the attention get the new head count.
//!
//! Runs after `skip-layers` and before `chess`/`prune`. Needs a calibration file.

use crate::blocks::find_blocks;
use crate::{Pass, PassCx, PassError};
use kiln_ir::{DType, Dim, Graph, Node, Op, TensorData, TensorType, ValueId};
use std::collections::HashMap;

/// The pass, configured.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct StructuredPrune {
    /// Share of each block's MLP neurons removed, in `[0, 1)`.
    pub neurons: f64,
    /// Query heads removed from every KV group (fewer than the group size).
    pub heads: usize,
}

impl StructuredPrune {
    /// Parses `neurons=S,heads=N` (either part may be left out).
    pub fn parse(spec: &str) -> Result<StructuredPrune, String> {
        let mut p = StructuredPrune::default();
        for part in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("structured pruning `{part}` is not KEY=VALUE (neurons=S, heads=N)"))?;
            match k.trim() {
                "neurons" => {
                    p.neurons =
                        v.trim().parse().map_err(|_| format!("structured pruning neurons `{v}` is not a number"))?
                }
                "heads" => {
                    p.heads =
                        v.trim().parse().map_err(|_| format!("structured pruning heads `{v}` is not a whole number"))?
                }
                other => return Err(format!("structured pruning has no `{other}` (known: neurons, heads)")),
            }
        }
        p.check()?;
        Ok(p)
    }

    pub fn check(&self) -> Result<(), String> {
        if !(0.0..1.0).contains(&self.neurons) {
            return Err(format!("structured pruning neurons {} is outside [0, 1)", self.neurons));
        }
        Ok(())
    }

    pub fn is_noop(&self) -> bool {
        self.neurons == 0.0 && self.heads == 0
    }

    /// `neurons=S,heads=N`, as parsed.
    pub fn spec(&self) -> String {
        format!("neurons={},heads={}", self.neurons, self.heads)
    }
}

fn weight_name(g: &Graph, v: ValueId) -> Option<&str> {
    match &g.node(v).op {
        Op::Weight { name } => Some(name),
        _ => None,
    }
}

/// `linear(x, weight)`: (x, the weight node, its name).
fn linear_weight(g: &Graph, v: ValueId) -> Option<(ValueId, ValueId, String)> {
    let n = g.node(v);
    (n.op == Op::Linear).then_some(())?;
    Some((n.inputs[0], n.inputs[1], weight_name(g, n.inputs[1])?.to_string()))
}

/// Column L2 norms of an `[rows, cols]` weight.
fn col_norms(t: &TensorData) -> Result<Vec<f64>, String> {
    let [r, c] = t.shape[..] else { return Err(format!("shape {:?} is not a matrix", t.shape)) };
    let w = t.to_f32().map_err(|e| e.to_string())?;
    let mut n = vec![0f64; c];
    for i in 0..r {
        for (j, acc) in n.iter_mut().enumerate() {
            *acc += (w[i * c + j] as f64).powi(2);
        }
    }
    Ok(n.into_iter().map(f64::sqrt).collect())
}

/// Indices of the `keep` largest scores, ascending (ties: the lower index is kept).
fn top_indices(scores: &[f64], keep: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let mut kept = order[..keep].to_vec();
    kept.sort_unstable();
    kept
}

/// Neurons kept out of `width` at `share` dropped, for a down weight of `dtype` (requantized to Q8_0,
/// i.e. a block format without a gathered form: a multiple of 32, at least 32; f32/f16/bf16 and the
/// gathered Q4_0/Q4_1/Q8_0: any count).
pub fn neurons_kept(width: usize, share: f64, dtype: DType) -> usize {
    let keep = width - ((share * width as f64).round() as usize).min(width - 1);
    if dtype.block_size() > 1 && dtype.gathered_of().is_none() && width >= 32 {
        (((keep + 16) / 32) * 32).clamp(32, width)
    } else {
        keep.max(1)
    }
}

/// `W_down`'s (or `W_o`'s) kept columns: Q4_0/Q4_1/Q8_0 in their gathered column format (the kept
/// channels' own codes and their blocks' scales, exact; read by `active_linear`, so `gathered` is true),
/// f32 exactly, f16/bf16 re-encoded (exact), other block formats requantized as Q8_0.
fn down_columns(t: &TensorData, kept: &[usize]) -> Result<(TensorData, bool), String> {
    if let (Some(_), [n, k]) = (t.dtype.gathered_of(), &t.shape[..]) {
        let (dtype, bytes) = kiln_ir::column::gather(t.dtype, *n, *k, &t.bytes, kept).map_err(|e| e.to_string())?;
        return Ok((TensorData { dtype, shape: vec![kept.len(), *n], bytes: bytes.into() }, true));
    }
    let g = t.gather_cols(kept).map_err(|e| e.to_string())?;
    let dtype = match t.dtype {
        DType::F32 => return Ok((g, false)),
        DType::F16 | DType::BF16 => t.dtype,
        _ => DType::Q8_0,
    };
    let vals = g.to_f32().map_err(|e| e.to_string())?;
    let bytes = kiln_ir::quant::quantize(dtype, &vals).map_err(|e| e.to_string())?;
    Ok((TensorData { dtype, shape: g.shape, bytes: bytes.into() }, false))
}

/// What the pass changes in one block's attention.
struct HeadEdit {
    q_reshape: usize,
    out_reshape: usize,
    kept_heads: usize,
    head_dim: usize,
}

impl Pass for StructuredPrune {
    fn name(&self) -> &'static str {
        "structured-prune"
    }

    fn run(&self, g: &mut Graph, cx: &PassCx) -> Result<bool, PassError> {
        let fail = |msg: String| PassError::Failed { pass: "structured-prune", msg };
        self.check().map_err(fail)?;
        if self.is_noop() {
            return Ok(false);
        }
        let cal = cx.calibration.as_ref().ok_or_else(|| {
            fail(
                "needs a calibration file (--calibration FILE, from `kiln calibrate`): importance is calibrated".into(),
            )
        })?;
        let blocks = find_blocks(g).map_err(fail)?;
        // Weight name → (derived name, data); reshape node → new op.
        let mut replace: HashMap<String, (String, TensorData)> = HashMap::new();
        let mut reshapes: HashMap<usize, Op> = HashMap::new();
        // Linears whose weight became a gathered column tensor (`[k', n]`): rewritten to active_linear.
        let mut active: std::collections::HashSet<usize> = std::collections::HashSet::new();
        let mut layers = Vec::new();
        let tag_n = format!("#sprune-n{}", self.neurons);
        let tag_h = format!("#sprune-h{}", self.heads);
        for b in &blocks {
            let l = b.layer;
            let stats = cal
                .layers
                .get(l)
                .ok_or_else(|| fail(format!("the calibration file has no layer {l} ({} layers)", cal.layers.len())))?;
            let mut rec = serde_json::json!({"layer": l});
            let weights = cx.weights.borrow();
            let get =
                |name: &str| weights.get(name).ok_or_else(|| fail(format!("weight `{name}` is not in the store")));
            if self.neurons > 0.0 {
                let act = g.node(b.ffn_act);
                if act.op != Op::SwiGlu {
                    return Err(fail(format!("block {l}: the down projection does not read a swiglu")));
                }
                let (_, _, gate_w) = linear_weight(g, act.inputs[0])
                    .ok_or_else(|| fail(format!("block {l}: the gate projection is not a linear of a weight")))?;
                let (_, _, up_w) = linear_weight(g, act.inputs[1])
                    .ok_or_else(|| fail(format!("block {l}: the up projection is not a linear of a weight")))?;
                let down = g
                    .nodes
                    .iter()
                    .position(|n| n.op == Op::Linear && n.inputs[0] == b.ffn_act)
                    .ok_or_else(|| fail(format!("block {l}: no linear reads the MLP activation")))?;
                let (_, _, down_w) = linear_weight(g, ValueId(down as u32))
                    .ok_or_else(|| fail(format!("block {l}: the down projection's weight is not a weight node")))?;
                let down_t = get(&down_w)?;
                let width = down_t.shape.get(1).copied().unwrap_or(0);
                if stats.ffn_act_mean_abs.len() != width {
                    return Err(fail(format!(
                        "layer {l}: the calibration file has {} MLP neurons, the graph {width} (calibrate the model being pruned)",
                        stats.ffn_act_mean_abs.len()
                    )));
                }
                let norms = col_norms(down_t).map_err(|e| fail(format!("{down_w}: {e}")))?;
                let score: Vec<f64> = stats.ffn_act_mean_abs.iter().zip(&norms).map(|(&a, &n)| a as f64 * n).collect();
                let keep = neurons_kept(width, self.neurons, down_t.dtype);
                let kept = top_indices(&score, keep);
                let gate_t = get(&gate_w)?.gather_rows(&kept).map_err(|e| fail(format!("{gate_w}: {e}")))?;
                let up_t = get(&up_w)?.gather_rows(&kept).map_err(|e| fail(format!("{up_w}: {e}")))?;
                let (down_new, gathered) = down_columns(down_t, &kept).map_err(|e| fail(format!("{down_w}: {e}")))?;
                let mut dropped: Vec<f64> =
                    (0..width).filter(|j| kept.binary_search(j).is_err()).map(|j| score[j]).collect();
                dropped.sort_by(f64::total_cmp);
                cx.explain(
                    "structured-prune",
                    format!(
                        "layer {l}: kept {keep} of {width} MLP neurons by mean|silu(gate)·up|·‖W_down col‖ \
                         (dropped scores {:.4}..{:.4}, kept from {:.4}); gate/up {} rows gathered, down {} → {}",
                        dropped.first().copied().unwrap_or(0.0),
                        dropped.last().copied().unwrap_or(0.0),
                        kept.iter().map(|&j| score[j]).fold(f64::INFINITY, f64::min),
                        gate_t.dtype,
                        down_t.dtype,
                        down_new.dtype
                    ),
                );
                rec["neurons_kept"] = keep.into();
                rec["neurons"] = width.into();
                rec["down_dtype"] = down_new.dtype.name().into();
                replace.insert(gate_w.clone(), (format!("{gate_w}{tag_n}"), gate_t));
                replace.insert(up_w.clone(), (format!("{up_w}{tag_n}"), up_t));
                if gathered {
                    active.insert(down);
                }
                replace.insert(down_w.clone(), (format!("{down_w}{tag_n}"), down_new));
            }
            if self.heads > 0 {
                let e =
                    |m: &str| fail(format!("block {l}: {m} (head pruning needs reshape → rope → attention → reshape)"));
                let out_r = g.node(b.attn_out_in);
                if !matches!(out_r.op, Op::Reshape { .. }) {
                    return Err(e("the attention output projection does not read a reshape"));
                }
                let att = g.node(out_r.inputs[0]);
                if !matches!(att.op, Op::Attention { .. } | Op::SlidingAttention { .. }) {
                    return Err(e("the output reshape does not read an attention"));
                }
                let rope = g.node(att.inputs[0]);
                if !matches!(rope.op, Op::Rope { .. } | Op::RopeScaled { .. }) {
                    return Err(e("the attention's queries are not a rope"));
                }
                let q_r = rope.inputs[0];
                if !matches!(g.node(q_r).op, Op::Reshape { .. }) {
                    return Err(e("the rope's input is not a reshape"));
                }
                let Some((_, _, q_w)) = linear_weight(g, g.node(q_r).inputs[0]) else {
                    return Err(e(
                        "the query reshape does not read a linear of a weight (biased queries are not supported)",
                    ));
                };
                let (_, _, o_w) = linear_weight(
                    g,
                    ValueId(
                        g.nodes
                            .iter()
                            .position(|n| n.op == Op::Linear && n.inputs[0] == b.attn_out_in)
                            .expect("found by find_blocks") as u32,
                    ),
                )
                .ok_or_else(|| e("the output projection's weight is not a weight node"))?;
                let qt = g.ty(att.inputs[0]);
                let kt = g.ty(att.inputs[1]);
                let (Some(hq), Some(hd), Some(hkv)) =
                    (qt.shape[2].as_fixed(), qt.shape[3].as_fixed(), kt.shape[2].as_fixed())
                else {
                    return Err(e("head counts are not fixed"));
                };
                let (hq, hd, hkv) = (hq as usize, hd as usize, hkv as usize);
                let group = hq / hkv;
                if self.heads >= group {
                    return Err(fail(format!(
                        "heads {} would remove every query head of a KV group ({hq} query heads over {hkv} KV heads: {group} per group)",
                        self.heads
                    )));
                }
                if stats.attn_out_in_mean_abs.len() != hq * hd {
                    return Err(fail(format!(
                        "layer {l}: the calibration file has {} attention output channels, the graph {} (calibrate the model being pruned)",
                        stats.attn_out_in_mean_abs.len(),
                        hq * hd
                    )));
                }
                let o_t = get(&o_w)?;
                let norms = col_norms(o_t).map_err(|m| fail(format!("{o_w}: {m}")))?;
                let score: Vec<f64> = (0..hq)
                    .map(|h| (h * hd..(h + 1) * hd).map(|c| stats.attn_out_in_mean_abs[c] as f64 * norms[c]).sum())
                    .collect();
                // Query head h reads KV head h / group: drop the same number from every group.
                let mut kept = Vec::new();
                for grp in 0..hkv {
                    let s = &score[grp * group..(grp + 1) * group];
                    kept.extend(top_indices(s, group - self.heads).into_iter().map(|h| grp * group + h));
                }
                let rows: Vec<usize> = kept.iter().flat_map(|&h| h * hd..(h + 1) * hd).collect();
                let q_new = get(&q_w)?.gather_rows(&rows).map_err(|m| fail(format!("{q_w}: {m}")))?;
                let ranges: Vec<std::ops::Range<usize>> = kept.iter().map(|&h| h * hd..(h + 1) * hd).collect();
                let o_new = match o_t.gather_col_ranges(&ranges) {
                    Ok(t) => t,
                    Err(kiln_ir::weights::DeriveError::Unaligned { .. }) => {
                        let cols: Vec<usize> = ranges.iter().flat_map(|r| r.clone()).collect();
                        let (t, gathered) = down_columns(o_t, &cols).map_err(|m| fail(format!("{o_w}: {m}")))?;
                        if gathered {
                            let o = g
                                .nodes
                                .iter()
                                .position(|n| n.op == Op::Linear && n.inputs[0] == b.attn_out_in)
                                .expect("found above");
                            active.insert(o);
                        }
                        t
                    }
                    Err(m) => return Err(fail(format!("{o_w}: {m}"))),
                };
                cx.explain(
                    "structured-prune",
                    format!(
                        "layer {l}: kept query heads {kept:?} of {hq} ({} per KV group of {group}, by Σ mean|o|·‖W_o col‖; \
                         scores {}); W_q rows and W_o columns gathered ({} → {})",
                        group - self.heads,
                        score.iter().map(|s| format!("{s:.3}")).collect::<Vec<_>>().join(" "),
                        o_t.dtype,
                        o_new.dtype
                    ),
                );
                rec["heads_kept"] = serde_json::json!(kept);
                rec["heads"] = hq.into();
                let edit = HeadEdit {
                    q_reshape: q_r.index(),
                    out_reshape: b.attn_out_in.index(),
                    kept_heads: kept.len(),
                    head_dim: hd,
                };
                let Op::Reshape { shape } = &g.node(q_r).op else { unreachable!("checked") };
                let mut s = shape.clone();
                if s.len() != 4 {
                    return Err(e("the query reshape is not to [batch, seq, heads, head_dim]"));
                }
                s[2] = Dim::from(edit.kept_heads);
                reshapes.insert(edit.q_reshape, Op::Reshape { shape: s });
                let Op::Reshape { shape } = &out_r.op else { unreachable!("checked") };
                let mut s = shape.clone();
                *s.last_mut().ok_or_else(|| e("empty output reshape"))? = Dim::from(edit.kept_heads * edit.head_dim);
                reshapes.insert(edit.out_reshape, Op::Reshape { shape: s });
                replace.insert(q_w.clone(), (format!("{q_w}{tag_h}"), q_new));
                replace.insert(o_w.clone(), (format!("{o_w}{tag_h}"), o_new));
            }
            layers.push(rec);
        }

        // Rebuild: pruned weights under their derived names, the reshapes with the new head counts, every
        // other op re-typed from its (possibly smaller) operands.
        let mut out = Graph::new(g.name.clone());
        let mut map: Vec<ValueId> = Vec::with_capacity(g.nodes.len());
        let err = |e: kiln_ir::GraphError| fail(e.to_string());
        for (i, n) in g.nodes.iter().enumerate() {
            let new = match &n.op {
                Op::Weight { name } if replace.contains_key(name) => {
                    let (dname, t) = &replace[name];
                    let ty = TensorType::new(t.dtype, t.shape.iter().map(|&d| Dim::from(d)).collect());
                    out.weight(dname, ty).map_err(err)?
                }
                _ if n.inputs.is_empty() => {
                    out.nodes.push(Node { op: n.op.clone(), inputs: vec![], ty: n.ty.clone() });
                    ValueId(out.nodes.len() as u32 - 1)
                }
                _ if active.contains(&i) => {
                    let inputs: Vec<ValueId> = n.inputs.iter().map(|v| map[v.index()]).collect();
                    out.add(Op::ActiveLinear, &inputs).map_err(err)?
                }
                op => {
                    let op = reshapes.get(&i).cloned().unwrap_or_else(|| op.clone());
                    let inputs: Vec<ValueId> = n.inputs.iter().map(|v| map[v.index()]).collect();
                    out.add(op, &inputs).map_err(err)?
                }
            };
            map.push(new);
        }
        out.outputs = g.outputs.iter().map(|(name, v)| (name.clone(), map[v.index()])).collect();
        *g = out;
        let mut store = cx.weights.borrow_mut();
        for (dname, t) in replace.into_values() {
            store.insert(dname, t);
        }
        cx.record(
            "structured-prune",
            serde_json::json!({
                "neurons": self.neurons,
                "heads_per_kv_group": self.heads,
                "importance": "neurons: mean|silu(gate)·up| × ‖W_down column‖; heads: Σ mean|attention output| × ‖W_o column‖ (calibration)",
                "calibration_text": cal.text.file,
                "layers": layers,
            }),
        );
        Ok(!blocks.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs_and_refuses_bad_values_by_name() {
        assert_eq!(
            StructuredPrune::parse("neurons=0.25,heads=1").unwrap(),
            StructuredPrune { neurons: 0.25, heads: 1 }
        );
        assert_eq!(StructuredPrune::parse("heads=2").unwrap(), StructuredPrune { neurons: 0.0, heads: 2 });
        for (bad, want) in [
            ("neurons=1.0", "outside [0, 1)"),
            ("neurons=-0.1", "outside [0, 1)"),
            ("neurons=x", "neurons `x`"),
            ("heads=-1", "heads `-1`"),
            ("rows=3", "no `rows`"),
            ("neurons", "KEY=VALUE"),
        ] {
            let e = StructuredPrune::parse(bad).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn kept_counts_round_to_quantization_blocks() {
        assert_eq!(neurons_kept(1536, 0.25, DType::Q5_1), 1152);
        assert_eq!(neurons_kept(1536, 0.05, DType::Q5_1), 1472);
        assert_eq!(neurons_kept(1536, 0.0, DType::Q5_1), 1536);
        assert_eq!(neurons_kept(1536, 0.99, DType::Q5_1), 32);
        // Gathered (exact, any count).
        assert_eq!(neurons_kept(1536, 0.05, DType::Q4_1), 1459);
        assert_eq!(neurons_kept(1536, 0.99, DType::Q4_1), 15);
        assert_eq!(neurons_kept(64, 0.25, DType::F32), 48);
        assert_eq!(neurons_kept(64, 0.999, DType::F32), 1);
        assert_eq!(top_indices(&[0.5, 3.0, 1.0, 3.0], 2), vec![1, 3]);
    }
}
