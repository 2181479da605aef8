//! `rope` (both modes) from its primitive form: positions × θ^(−2i/D) as angles, the pairs exposed as
//! an axis of 2 by a reshape (axis 3 for `neox`, 4 for `normal`), rotated, concatenated, reshaped back.
//!
//! Reshapes are wildcards (their attribute is their result shape, checked by the replay); θ is read
//! from the `pow` that builds the frequencies.

use super::{constant, lift, var, KRewrite};
use crate::egraph::KGraph;
use egg::Id;
use kiln_ir::{Op, RopeMode};

/// Binds what the candidates need (`?x`, `?pos`, the frequencies `?f`) from the first rotated half;
/// the rest (`?b`, `?c`) is left to the replay (a wildcard needs a variable of its own beneath it).
fn pattern(axis: i64, normal: bool) -> String {
    let freqs = if normal { "(reshape:* ?f)" } else { "?f" };
    let ang = format!("(mul (reshape:* (cast:dtype=f32 ?pos)) {freqs})");
    let x0 = format!("(slice:axis={axis};end=1;start=0 (reshape:* ?x))");
    format!("(reshape:* (concat:axis={axis} (sub (mul {x0} (cos {ang})) ?b) ?c))")
}

/// θ of the frequencies `pow(θ, …)` in e-class `f`.
fn theta(eg: &KGraph, f: Id) -> Option<f32> {
    eg[f].nodes.iter().find(|n| matches!(n.op(), Op::Pow)).and_then(|n| constant(eg, n.children[0]))
}

fn candidates(eg: &KGraph, s: &egg::Subst, mode: RopeMode) -> Vec<(Op, Vec<Id>)> {
    let (x, pos) = (s[var("?x")], s[var("?pos")]);
    let (Some(theta), Some(n_rot)) = (theta(eg, s[var("?f")]), eg[x].data.ty.shape.last().and_then(|d| d.as_fixed()))
    else {
        return vec![];
    };
    vec![(Op::Rope { mode, theta, n_rot }, vec![x, pos])]
}

pub fn rules() -> Vec<KRewrite> {
    let mut r =
        lift("rope-neox-primitives-to-rope", vec![pattern(3, false)], |eg, s| candidates(eg, s, RopeMode::Neox));
    r.extend(lift("rope-normal-primitives-to-rope", vec![pattern(4, true)], |eg, s| {
        candidates(eg, s, RopeMode::Normal)
    }));
    r
}
