//! `softmax` from `exp(x - max(x)) / sum(exp(x - max(x)))` along one axis.
//!
//! The reductions' axis is a wildcard in the pattern; the candidates are every axis of `x`, and the
//! replayed decomposition keeps only the one the reductions really use.

use super::{lift, var, KRewrite};
use kiln_ir::Op;

pub fn rules() -> Vec<KRewrite> {
    // `?m` and `?e` stand for the max and the exponentials: a wildcard needs a variable of its own
    // beneath it (README), and the replay checks what they are.
    lift("softmax-primitives-to-softmax", vec!["(div (exp (sub ?x ?m)) (reduce_sum:* ?e))".into()], |eg, s| {
        let x = s[var("?x")];
        let r = eg[x].data.ty.rank() as i64;
        (-r..r).map(|axis| (Op::Softmax { axis }, vec![x])).collect()
    })
}
