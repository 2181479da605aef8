//! `rms_norm` from `x * rsqrt(mean(x², -1) + eps) * w` and its commuted variants.

use super::{commuted, constant, lift, var, KRewrite};
use kiln_ir::Op;

pub fn rules() -> Vec<KRewrite> {
    lift(
        "rms-norm-primitives-to-rms-norm",
        commuted("(mul (mul ?x (rsqrt (add (reduce_mean:axis=-1 (mul ?x ?x)) ?eps))) ?w)"),
        |eg, s| match constant(eg, s[var("?eps")]) {
            Some(eps) => vec![(Op::RmsNorm { eps }, vec![s[var("?x")], s[var("?w")]])],
            None => vec![],
        },
    )
}
