//! Causal grouped-query `attention` from its primitive form (see `kiln_ir::decompose`): q split into
//! (kv head, group), scores as a broadcast product summed over the head dim, scaled, causally masked,
//! softmaxed (lifted first by `softmax.rs`), weighted sum of v, heads merged back.
//!
//! Reshapes are wildcards (their attribute is their result shape, checked by the replay).

use super::{constant, lift, var, KRewrite};
use kiln_ir::Op;

pub fn rules() -> Vec<KRewrite> {
    let kv = |v: &str| format!("(reshape:* (transpose:perm=[0,2,1,3] {v}))");
    let q = "(reshape:* (transpose:perm=[0,2,3,1,4] (reshape:* ?q)))";
    let scores = format!("(mul (reshape:* (reduce_sum:axis=5 (mul {q} {}))) ?scale)", kv("?k"));
    let p = format!("(reshape:* (softmax:axis=-1 (causal_mask {scores})))");
    let pattern =
        format!("(reshape:* (transpose:perm=[0,3,1,2,4] (reshape:* (reduce_sum:axis=4 (mul {p} {})))))", kv("?v"));
    lift("attention-primitives-to-attention", vec![pattern], |eg, s| match constant(eg, s[var("?scale")]) {
        Some(scale) => vec![(Op::Attention { scale }, vec![s[var("?q")], s[var("?k")], s[var("?v")]])],
        None => vec![],
    })
}
