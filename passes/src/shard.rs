//! `shard`: rank r's part of a decoder split Megatron-style over `tp` ranks (tensor parallelism).
//!
//! Per block: Q/K/V and gate/up are column-parallel (each rank computes some output features: whole
//! KV-head groups — a KV head with the query heads that read it — and a range of FFN channels), the
//! attention output and down projections are row-parallel (each rank multiplies its slice of the inner
//! dimension) and followed by an `all_reduce` that sums the partial results. Each rank's KV cache holds
//! only its KV heads. Embedding, norms and the LM head are replicated.
//!
//! Shards may be uneven: KV groups are dealt out as evenly as possible, earlier ranks taking the extra
//! ones (SmolLM2's 3 KV heads over 2 ranks: 2 + 1, i.e. 6 + 3 query heads), and FFN channels in units
//! of 32 so that the row-parallel slices of block-quantized weights stay whole blocks. A rank left with
//! no KV head is an error. The sliced weights are derived tensors (`<name>#tp<r>of<n>`) in
//! [`PassCx::weights`].

use crate::blocks::find_blocks;
use crate::{Pass, PassCx, PassError};
use kiln_ir::{Dim, Graph, Op, TensorType, ValueId};
use std::collections::HashMap;
use std::ops::Range;

/// Rank `rank`'s part of `tp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub tp: usize,
    pub rank: usize,
}

/// Units `0..n` dealt over `parts`: part `i` gets a contiguous range, the first `n % parts` one more.
pub fn deal(n: usize, parts: usize, i: usize) -> Range<usize> {
    let (base, extra) = (n / parts, n % parts);
    let start = i * base + i.min(extra);
    start..start + base + usize::from(i < extra)
}

/// FFN channels are split in units of this many (a quantized block), when the width allows.
const CHANNEL_UNIT: usize = 32;

/// How one layer is split for this rank.
struct LayerSplit {
    /// Rows of Q (query heads × head dim), of K/V, and FFN channels.
    q: Range<usize>,
    kv: Range<usize>,
    ffn: Range<usize>,
    kv_heads: usize,
}

fn err(msg: impl Into<String>) -> PassError {
    PassError::Failed { pass: "shard", msg: msg.into() }
}

impl Shard {
    fn split_layer(&self, g: &Graph, layer: usize) -> Result<LayerSplit, PassError> {
        let shape_of = |suffix: &str| -> Result<Vec<i64>, PassError> {
            let name = format!("blk.{layer}.{suffix}");
            let (_, v) = g
                .weights()
                .find(|(n, _)| *n == name)
                .ok_or_else(|| err(format!("weight `{name}` is not in the graph")))?;
            g.ty(v)
                .shape
                .iter()
                .map(|d| d.as_fixed().ok_or_else(|| err(format!("`{name}` has a symbolic shape"))))
                .collect()
        };
        let cache = g
            .inputs()
            .find(|(n, _)| *n == format!("k_cache.{layer}"))
            .ok_or_else(|| err(format!("layer {layer} has no `k_cache.{layer}` input")))?
            .1;
        let hd = g.ty(cache).shape[3].as_fixed().ok_or_else(|| err("symbolic head dim"))? as usize;
        let nkv = g.ty(cache).shape[2].as_fixed().ok_or_else(|| err("symbolic kv heads"))? as usize;
        let q_rows = shape_of("attn_q.weight")?[0] as usize;
        let ffn = shape_of("ffn_gate.weight")?[0] as usize;
        let nh = q_rows / hd;
        if nkv < self.tp {
            return Err(err(format!(
                "layer {layer} has {nkv} KV heads: {} ranks would leave a rank without attention heads (use --tp ≤ {nkv})",
                self.tp
            )));
        }
        let group = nh / nkv;
        let kvh = deal(nkv, self.tp, self.rank);
        let unit = if ffn.is_multiple_of(CHANNEL_UNIT) { CHANNEL_UNIT } else { 1 };
        let f = deal(ffn / unit, self.tp, self.rank);
        Ok(LayerSplit {
            q: kvh.start * group * hd..kvh.end * group * hd,
            kv: kvh.start * hd..kvh.end * hd,
            ffn: f.start * unit..f.end * unit,
            kv_heads: kvh.len(),
        })
    }

    /// The derived weight for `name` (a `blk.L.*` tensor this rank holds part of), or `None` when the
    /// weight is replicated.
    fn derive(
        &self,
        name: &str,
        splits: &HashMap<usize, LayerSplit>,
        cx: &PassCx,
    ) -> Result<Option<String>, PassError> {
        let Some((layer, suffix)) = name.strip_prefix("blk.").and_then(|r| r.split_once('.')) else { return Ok(None) };
        let Some(s) = layer.parse().ok().and_then(|l: usize| splits.get(&l)) else { return Ok(None) };
        enum Cut {
            Rows(Range<usize>),
            Cols(Range<usize>),
        }
        let cut = match suffix {
            "attn_q.weight" | "attn_q.bias" => Cut::Rows(s.q.clone()),
            "attn_k.weight" | "attn_k.bias" | "attn_v.weight" | "attn_v.bias" => Cut::Rows(s.kv.clone()),
            "ffn_gate.weight" | "ffn_up.weight" => Cut::Rows(s.ffn.clone()),
            "attn_output.weight" => Cut::Cols(s.q.clone()),
            "ffn_down.weight" => Cut::Cols(s.ffn.clone()),
            _ => return Ok(None),
        };
        let derived = format!("{name}#tp{}of{}", self.rank, self.tp);
        let mut store = cx.weights.borrow_mut();
        if !store.contains(&derived) {
            let t = store.get(name).ok_or_else(|| err(format!("weight `{name}` is not in the weight store")))?;
            let why = |e: kiln_ir::weights::DeriveError| {
                err(format!("slicing `{name}` for rank {} of {}: {e}", self.rank, self.tp))
            };
            let d = match (cut, t.shape.len()) {
                // A bias: rows of a one-column matrix.
                (Cut::Rows(r), 1) => {
                    let mut m = t.clone();
                    m.shape = vec![t.shape[0], 1];
                    let mut d = m.slice_rows(r).map_err(why)?;
                    d.shape.pop();
                    d
                }
                (Cut::Rows(r), _) => t.slice_rows(r).map_err(why)?,
                (Cut::Cols(r), _) => t.slice_cols(r).map_err(why)?,
            };
            store.insert(derived.clone(), d);
        }
        Ok(Some(derived))
    }
}

/// Whether `v` (looking through casts) is the weight `blk.L.<suffix>` for some L.
fn reads_weight(g: &Graph, mut v: ValueId, suffix: &str) -> bool {
    while let Op::Cast { .. } = g.node(v).op {
        v = g.node(v).inputs[0];
    }
    matches!(&g.node(v).op, Op::Weight { name } if name.starts_with("blk.") && name.ends_with(&format!(".{suffix}")))
}

impl Pass for Shard {
    fn name(&self) -> &'static str {
        "shard"
    }

    fn run(&self, g: &mut Graph, cx: &PassCx) -> Result<bool, PassError> {
        if self.tp == 0 || self.rank >= self.tp {
            return Err(err(format!("rank {} of {} ranks", self.rank, self.tp)));
        }
        if self.tp == 1 {
            return Ok(false);
        }
        // Only dense linears are split (rows or columns + AllReduce); a sparse form would be copied whole.
        if let Some(n) = g.nodes.iter().find(|n| n.op.is_weight_linear() && n.op != Op::Linear) {
            return Err(err(format!("`{}` cannot be split across ranks yet (only dense linears)", n.op.name())));
        }
        let blocks = find_blocks(g).map_err(err)?;
        if blocks.is_empty() {
            return Err(err("no decoder blocks found"));
        }
        let mut splits = HashMap::new();
        for b in &blocks {
            let s = self.split_layer(g, b.layer)?;
            if b.layer == blocks[0].layer {
                cx.explain(
                    self.name(),
                    format!(
                        "rank {} of {}: {} KV heads (Q rows {:?}), FFN channels {:?}",
                        self.rank, self.tp, s.kv_heads, s.q, s.ffn
                    ),
                );
            }
            splits.insert(b.layer, s);
        }
        let mut out = Graph::new(g.name.clone());
        let mut map: Vec<ValueId> = Vec::with_capacity(g.nodes.len());
        let fail = |e: kiln_ir::GraphError| err(e.to_string());
        for node in &g.nodes {
            let ins: Vec<ValueId> = node.inputs.iter().map(|v| map[v.index()]).collect();
            let new = match &node.op {
                Op::Input { name } => {
                    let layer = name
                        .strip_prefix("k_cache.")
                        .or_else(|| name.strip_prefix("v_cache."))
                        .and_then(|l| l.parse::<usize>().ok());
                    let mut ty = node.ty.clone();
                    if let Some(s) = layer.and_then(|l| splits.get(&l)) {
                        ty.shape[2] = Dim::from(s.kv_heads);
                    }
                    out.input(name, ty).map_err(fail)?
                }
                Op::Weight { name } => match self.derive(name, &splits, cx)? {
                    Some(derived) => {
                        let store = cx.weights.borrow();
                        let t = store.get(&derived).expect("just inserted");
                        let ty = TensorType::new(t.dtype, t.shape.iter().map(|&d| Dim::from(d)).collect());
                        out.weight(&derived, ty).map_err(fail)?
                    }
                    None => out.weight(name, node.ty.clone()).map_err(fail)?,
                },
                Op::Reshape { shape } => {
                    // Reshapes of split activations ([.., heads, hd] ↔ [.., heads·hd]) keep their
                    // symbolic dims and scale the head (or width) dim by how much the operand shrank.
                    let fp = |s: &[Dim]| s.iter().filter_map(Dim::as_fixed).product::<i64>();
                    let (old, new) = (fp(&g.ty(node.inputs[0]).shape), fp(&out.ty(ins[0]).shape));
                    let mut shape = shape.clone();
                    if old != new {
                        let j = shape
                            .iter()
                            .position(|d| d.as_fixed().is_some_and(|x| x * new % old == 0 && x * new / old > 0))
                            .ok_or_else(|| err(format!("cannot split reshape to {shape:?}")))?;
                        let x = shape[j].as_fixed().expect("fixed");
                        shape[j] = Dim::from(x * new / old);
                    }
                    out.add(Op::Reshape { shape }, &ins).map_err(fail)?
                }
                Op::Linear
                    if reads_weight(g, node.inputs[1], "attn_output.weight")
                        || reads_weight(g, node.inputs[1], "ffn_down.weight") =>
                {
                    let partial = out.add(Op::Linear, &ins).map_err(fail)?;
                    out.add(Op::AllReduce, &[partial]).map_err(fail)?
                }
                op => out.add(op.clone(), &ins).map_err(fail)?,
            };
            map.push(new);
        }
        for (name, v) in &g.outputs {
            out.output(name, map[v.index()]);
        }
        *g = out;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::deal;

    #[test]
    fn dealing_is_contiguous_even_and_front_loaded() {
        assert_eq!((0..2).map(|i| deal(3, 2, i)).collect::<Vec<_>>(), [0..2, 2..3]);
        assert_eq!((0..3).map(|i| deal(48, 3, i)).collect::<Vec<_>>(), [0..16, 16..32, 32..48]);
        assert_eq!((0..4).map(|i| deal(6, 4, i).len()).collect::<Vec<_>>(), [2, 2, 1, 1]);
    }
}
