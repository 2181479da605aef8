//! `rope` (both modes) from its primitive form: positions × θ^(−2i/D) as angles, the pairs exposed as
//! an axis of 2 by a reshape (axis 3 for `neox`, 4 for `normal`), rotated, concatenated, reshaped back.
//!
//! Reshapes are wildcards (their attribute is their result shape, checked by the replay); θ is read
//! from the `pow` that builds the frequencies. Frequencies `div(pow(θ, …), factors)` lift to
//! `rope_scaled` with `factors` as its third operand.

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

/// θ and the factors of scaled frequencies `div(pow(θ, …), factors)` in e-class `f`.
fn scaled(eg: &KGraph, f: Id) -> Option<(f32, Id)> {
    eg[f]
        .nodes
        .iter()
        .filter(|n| matches!(n.op(), Op::Div))
        .find_map(|n| Some((theta(eg, n.children[0])?, n.children[1])))
}

fn candidates(eg: &KGraph, s: &egg::Subst, mode: RopeMode) -> Vec<(Op, Vec<Id>)> {
    let (x, pos, f) = (s[var("?x")], s[var("?pos")], s[var("?f")]);
    let Some(n_rot) = eg[x].data.ty.shape.last().and_then(|d| d.as_fixed()) else {
        return vec![];
    };
    let mut out = vec![];
    if let Some(theta) = theta(eg, f) {
        out.push((Op::Rope { mode, theta, n_rot }, vec![x, pos]));
    }
    if let Some((theta, factors)) = scaled(eg, f) {
        out.push((Op::RopeScaled { mode, theta, n_rot }, vec![x, pos, factors]));
    }
    out
}

pub fn rules() -> Vec<KRewrite> {
    let mut r =
        lift("rope-neox-primitives-to-rope", vec![pattern(3, false)], |eg, s| candidates(eg, s, RopeMode::Neox));
    r.extend(lift("rope-normal-primitives-to-rope", vec![pattern(4, true)], |eg, s| {
        candidates(eg, s, RopeMode::Normal)
    }));
    r
}
