//! `silu` from `x * sigmoid(x)`, `swiglu` from `silu(gate) * up` (so a primitive SwiGLU lifts in two
//! steps), with commuted variants.

use super::{commuted, lift, var, KRewrite};
use kiln_ir::Op;

pub fn rules() -> Vec<KRewrite> {
    let mut r =
        lift("silu-primitives-to-silu", commuted("(mul ?x (sigmoid ?x))"), |_, s| vec![(Op::Silu, vec![s[var("?x")]])]);
    r.extend(lift("silu-mul-to-swiglu", commuted("(mul (silu ?g) ?u)"), |_, s| {
        vec![(Op::SwiGlu, vec![s[var("?g")], s[var("?u")]])]
    }));
    r
}
