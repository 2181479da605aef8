//! Finding the decoder blocks of a graph: the values a block reads and writes on the residual stream, its
//! KV-cache inputs/outputs, and the activations calibration measures.
//!
//! Blocks are recognised structurally, by the pre-norm residual pattern every Llama-family decoder has,
//! and named by the frontend's weight convention (GGUF names, `blk.L.*`):
//! `x_mid = add(x_in, linear(_, blk.L.attn_output.weight))`, then
//! `x_out = add(x_mid, linear(_, blk.L.ffn_down.weight))`. Nothing else about the block is assumed, so
//! the analysis works on any graph built that way (real models, tiny test models, edited graphs).

use crate::{Graph, Op, ValueId};

/// One decoder block, as found in a graph.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    pub layer: usize,
    /// The residual stream entering the block.
    pub x_in: ValueId,
    /// After the attention half (`x_in + attention`).
    pub x_mid: ValueId,
    /// The residual stream leaving the block.
    pub x_out: ValueId,
    /// Input of the Q/K/V projections (the normed `x_in`).
    pub attn_in: ValueId,
    /// Input of the attention output projection (the attention result).
    pub attn_out_in: ValueId,
    /// Input of the gate/up projections (the normed `x_mid`).
    pub ffn_in: ValueId,
    /// The SwiGLU activation: input of the down projection.
    pub ffn_act: ValueId,
    /// The block's KV-cache graph inputs and outputs (`k_cache.L`, `v_cache.L`), when it has them.
    pub caches: Vec<String>,
}

/// The layer of a weight named `blk.L.<suffix>`.
fn blk_weight(g: &Graph, mut v: ValueId, suffix: &str) -> Option<usize> {
    // Looking through casts: a weight may be read in another dtype.
    while let Op::Cast { .. } = g.node(v).op {
        v = g.node(v).inputs[0];
    }
    let Op::Weight { name } = &g.node(v).op else { return None };
    let rest = name.strip_prefix("blk.")?;
    let (layer, s) = rest.split_once('.')?;
    // A derived weight (`blk.L.<suffix>#<what>`, e.g. structurally pruned) plays the same role.
    let s = s.split_once('#').map_or(s, |(base, _)| base);
    (s == suffix).then(|| layer.parse().ok()).flatten()
}

/// If `v` is `linear(x, blk.L.<suffix>)`, returns (L, x).
fn linear_of(g: &Graph, v: ValueId, suffix: &str) -> Option<(usize, ValueId)> {
    let n = g.node(v);
    match n.op {
        Op::Linear => blk_weight(g, n.inputs[1], suffix).map(|l| (l, n.inputs[0])),
        // Structured pruning's gathered output projections: the same product, on kept channels.
        Op::ActiveLinear if g.ty(n.inputs[1]).dtype.is_gathered() => {
            blk_weight(g, n.inputs[1], suffix).map(|l| (l, n.inputs[0]))
        }
        _ => None,
    }
}

/// If `v` is `add(r, linear(x, blk.L.<suffix>))` (either operand order), returns (L, r, x).
fn residual_add(g: &Graph, v: ValueId, suffix: &str) -> Option<(usize, ValueId, ValueId)> {
    let n = g.node(v);
    if n.op != Op::Add {
        return None;
    }
    let (a, b) = (n.inputs[0], n.inputs[1]);
    if let Some((l, x)) = linear_of(g, b, suffix) {
        return Some((l, a, x));
    }
    linear_of(g, a, suffix).map(|(l, x)| (l, b, x))
}

/// The decoder blocks of `g`, in layer order, checked to form one residual chain (block L+1 reads what
/// block L writes). Errors name what does not fit.
pub fn find_blocks(g: &Graph) -> Result<Vec<Block>, String> {
    let mut blocks: Vec<Block> = Vec::new();
    for i in 0..g.nodes.len() {
        let v = ValueId(i as u32);
        let Some((layer, x_mid, ffn_act)) = residual_add(g, v, "ffn_down.weight") else { continue };
        let Some((l2, x_in, attn_out_in)) = residual_add(g, x_mid, "attn_output.weight") else {
            return Err(format!(
                "block {layer}: the down projection's residual add ({v}) does not follow an attention residual add"
            ));
        };
        if l2 != layer {
            return Err(format!("block {layer}: its attention output weight belongs to layer {l2}"));
        }
        let find_input = |suffix: &str| {
            g.nodes
                .iter()
                .find(|n| n.op == Op::Linear && blk_weight(g, n.inputs[1], suffix) == Some(layer))
                .map(|n| n.inputs[0])
                .ok_or_else(|| format!("block {layer}: no linear reads blk.{layer}.{suffix}"))
        };
        let attn_in = find_input("attn_q.weight")?;
        let ffn_in = find_input("ffn_gate.weight")?;
        let caches: Vec<String> = [format!("k_cache.{layer}"), format!("v_cache.{layer}")]
            .into_iter()
            .filter(|name| g.inputs().any(|(n, _)| n == name) || g.output_named(name).is_some())
            .collect();
        blocks.push(Block { layer, x_in, x_mid, x_out: v, attn_in, attn_out_in, ffn_in, ffn_act, caches });
    }
    blocks.sort_by_key(|b| b.layer);
    for w in blocks.windows(2) {
        if w[0].layer == w[1].layer {
            return Err(format!("layer {} appears as two blocks", w[0].layer));
        }
        if w[1].x_in != w[0].x_out {
            return Err(format!("block {} does not read the residual stream block {} writes", w[1].layer, w[0].layer));
        }
    }
    Ok(blocks)
}
