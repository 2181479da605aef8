//! `coreinfer`: CoreInfer (Wang et al., 2024) — the MLP of every block runs on the prompt's *core
//! neurons* after prefill (lossy, no calibration: the set is chosen per prompt).
//!
//! Per decoder block the SwiGLU MLP `down(silu(gate(x)) · up(x))` becomes
//! ```text
//! keep = core_keep{past}(x, core_in)          ones when past = 0 (prefill), else core_in on every row
//! a    = swiglu(masked_linear(x, W_gate, keep), masked_linear(x, W_up, keep))
//! core = core_select{alpha, beta, past}(a, core_in)   past = 0: the chunk's sentence-wise core set
//! y    = active_linear(a, W_downᵀ)            reads only the rows of channels where a ≠ 0
//! ```
//! `core_in`/`core` are a new graph input and output `core_set.L: f32[batch, C]` — state, like the KV
//! cache's `k_cache.L`: the interpreter backend feeds the output back as the next step's input, and the
//! compiled program keeps it in a persistent buffer that `core_select` writes in place. So the first
//! chunk (past = 0) is the dense MLP and records the core set; every later chunk (decode, or a second
//! prompt chunk) computes gate/up rows and reads down rows of the core neurons only. At decode that is
//! the "smaller dense MLP" of the paper without materialising it: `masked_linear` reads the kept
//! gate/up rows (runs of whole rows, the bytes of gathered rows) and `active_linear` the kept rows of
//! the transposed down weight (`blk.L.ffn_down.weight#t`, Q8_0 for quantized models as in `chess`, f32
//! with `exact`).
//!
//! The activation ranked is `|silu(gate)·up|` (the coefficient of the neuron's down column), not only
//! positive values: a SwiGLU neuron contributes with either sign.

use crate::blocks::find_blocks;
use crate::chess::{find_mlps, transposed, weight_name, weight_of_gate};
use crate::{Pass, PassCx, PassError};
use kiln_ir::{DType, Dim, Graph, Op, TensorType, ValueId};
use std::collections::HashMap;

/// The pass, configured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CoreInfer {
    /// Token-wise core: the top `alpha` share of a token's channels by |activation|, in (0, 1].
    pub alpha: f32,
    /// Sentence-wise core: channels token-wise core for at least a `beta` share of the prompt's tokens,
    /// in [0, 1].
    pub beta: f32,
    /// Keep the transposed down weights in f32 (exact; the reference variant for tests).
    pub exact: bool,
    /// Gate and up as `core_linear`: the compiled program copies the prompt's core rows into a smaller
    /// dense matrix once per prompt and decodes on it, instead of masking the full one.
    pub gather: bool,
}

impl Default for CoreInfer {
    fn default() -> Self {
        CoreInfer { alpha: 0.4, beta: 0.2, exact: false, gather: false }
    }
}

/// The name of block `layer`'s core-set state (graph input and output).
pub fn state_name(layer: usize) -> String {
    format!("core_set.{layer}")
}

impl CoreInfer {
    /// Parses `alpha=A,beta=B,gather=0|1` (any may be left out: defaults 0.4, 0.2 and 0).
    pub fn parse(spec: &str) -> Result<CoreInfer, String> {
        let mut c = CoreInfer::default();
        for part in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (k, v) = part.split_once('=').ok_or_else(|| format!("`{part}` is not KEY=VALUE (alpha=A, beta=B)"))?;
            let num = |what: &str| -> Result<f32, String> {
                v.trim().parse::<f32>().map_err(|_| format!("{what} `{}` is not a number", v.trim()))
            };
            match k.trim() {
                "alpha" => c.alpha = num("alpha")?,
                "beta" => c.beta = num("beta")?,
                "gather" => {
                    c.gather = match v.trim() {
                        "1" | "true" | "on" => true,
                        "0" | "false" | "off" => false,
                        other => return Err(format!("gather `{other}` is not 0 or 1")),
                    }
                }
                other => return Err(format!("unknown key `{other}` (known: alpha, beta, gather)")),
            }
        }
        kiln_ir::coreinfer::validate(c.alpha, c.beta)?;
        Ok(c)
    }

    /// `alpha=A,beta=B[,gather=1]`, as parsed.
    pub fn spec(&self) -> String {
        let gather = if self.gather { ",gather=1" } else { "" };
        format!("alpha={},beta={}{gather}", self.alpha, self.beta)
    }
}

enum Action {
    /// The gate or up projection of MLP `i`: masked by the block's keep mask.
    Masked(usize),
    /// The swiglu of MLP `i`: followed by the core-set selection.
    Swiglu(usize),
    /// The down projection of MLP `i`: active-channel on the transposed weight.
    Down(usize),
}

impl Pass for CoreInfer {
    fn name(&self) -> &'static str {
        "coreinfer"
    }

    fn run(&self, g: &mut Graph, cx: &PassCx) -> Result<bool, PassError> {
        let fail = |msg: String| PassError::Failed { pass: "coreinfer", msg };
        kiln_ir::coreinfer::validate(self.alpha, self.beta).map_err(fail)?;
        let has_past = g.inputs().any(|(_, v)| g.ty(v).shape.iter().any(|d| d.as_sym() == Some("past")));
        if !has_past {
            return Err(fail(
                "needs a graph with a KV cache (a `past` dimension): the core set is chosen at past = 0".into(),
            ));
        }
        let blocks = find_blocks(g).map_err(fail)?;
        let mlps = find_mlps(g, &blocks).map_err(fail)?;
        let past = Dim::sym("past");
        let wt_suffix = if self.exact { "#t-f32" } else { "#t" };
        let mut weights = cx.weights.borrow_mut();
        let mut actions: HashMap<usize, Action> = HashMap::new();
        let mut derived: Vec<(String, TensorType)> = Vec::new();
        let mut layers = Vec::new();
        for (i, m) in mlps.iter().enumerate() {
            let width = g.ty(m.gate).shape.last().and_then(Dim::as_fixed).unwrap_or(0) as usize;
            if g.ty(m.ffn_in).rank() != 3 {
                return Err(fail(format!("layer {}: the MLP input is not [batch, seq, hidden]", m.layer)));
            }
            let gate_w = weight_of_gate(g, m.gate).map_err(fail)?;
            let up = g.node(ValueId(m.swiglu as u32)).inputs[1];
            let src =
                weights.get(&m.down_w).ok_or_else(|| fail(format!("weight `{}` is not in the store", m.down_w)))?;
            let wt = transposed(src, self.exact).map_err(|e| fail(format!("{}: {e}", m.down_w)))?;
            let wt_name = format!("{}{wt_suffix}", m.down_w);
            let wt_ty = TensorType::new(wt.dtype, wt.shape.iter().map(|&d| Dim::from(d)).collect());
            let k = kiln_ir::coreinfer::core_k(self.alpha, width);
            cx.explain(
                "coreinfer",
                format!(
                    "layer {}: {width} neurons; prefill (past = 0) runs dense and keeps the channels in a token's top {k} \
                     |silu(gate)·up| for ≥ {:.0}% of the prompt's tokens; later steps {} {} and {} to them and read \
                     {wt_name} ({} [{}, {}]) rows of them only",
                    m.layer,
                    self.beta * 100.0,
                    if self.gather { "gather the rows of" } else { "mask" },
                    weight_name(g, gate_w).unwrap_or("gate"),
                    weight_name(g, m.up_w).unwrap_or("up"),
                    wt.dtype,
                    wt.shape[0],
                    wt.shape[1]
                ),
            );
            layers.push(serde_json::json!({"layer": m.layer, "neurons": width, "state": state_name(m.layer),
                "down_t_dtype": wt.dtype.name()}));
            weights.insert(wt_name.clone(), wt);
            derived.push((wt_name, wt_ty));
            actions.insert(m.gate.index(), Action::Masked(i));
            actions.insert(up.index(), Action::Masked(i));
            actions.insert(m.swiglu, Action::Swiglu(i));
            actions.insert(m.down, Action::Down(i));
        }
        drop(weights);

        let mut out = Graph::new(g.name.clone());
        let mut map: Vec<ValueId> = Vec::with_capacity(g.nodes.len());
        // Per MLP: its state input and keep mask (none when gathering), made where its first projection was.
        let mut keep: HashMap<usize, (ValueId, Option<ValueId>)> = HashMap::new();
        let mut states: Vec<(String, ValueId)> = Vec::new();
        let err = |e: kiln_ir::GraphError| fail(e.to_string());
        for (i, n) in g.nodes.iter().enumerate() {
            let new = match actions.get(&i) {
                Some(&Action::Masked(mi)) => {
                    let m = &mlps[mi];
                    let x = map[m.ffn_in.index()];
                    let (core_in, mask) = match keep.get(&mi) {
                        Some(&v) => v,
                        None => {
                            let width = g.ty(m.gate).shape.last().cloned().expect("rank ≥ 1");
                            let batch = g.ty(m.ffn_in).shape[0].clone();
                            let ty = TensorType::new(DType::F32, vec![batch, width]);
                            let core_in = out.input(&state_name(m.layer), ty).map_err(err)?;
                            let mask = if self.gather {
                                None
                            } else {
                                Some(out.add(Op::CoreKeep { past: past.clone() }, &[x, core_in]).map_err(err)?)
                            };
                            keep.insert(mi, (core_in, mask));
                            (core_in, mask)
                        }
                    };
                    let w = map[n.inputs[1].index()];
                    match mask {
                        Some(mask) => out.add(Op::MaskedLinear, &[x, w, mask]).map_err(err)?,
                        None => out.add(Op::CoreLinear { past: past.clone() }, &[x, w, core_in]).map_err(err)?,
                    }
                }
                Some(&Action::Swiglu(mi)) => {
                    let m = &mlps[mi];
                    let inputs: Vec<ValueId> = n.inputs.iter().map(|v| map[v.index()]).collect();
                    let a = out.add(Op::SwiGlu, &inputs).map_err(err)?;
                    let &(core_in, _) = keep
                        .get(&mi)
                        .ok_or_else(|| fail(format!("layer {}: swiglu before its projections", m.layer)))?;
                    let op = Op::CoreSelect { alpha: self.alpha, beta: self.beta, past: past.clone() };
                    let core = out.add(op, &[a, core_in]).map_err(err)?;
                    states.push((state_name(m.layer), core));
                    a
                }
                Some(&Action::Down(mi)) => {
                    let (wt_name, wt_ty) = &derived[mi];
                    let wt = out.weight(wt_name, wt_ty.clone()).map_err(err)?;
                    out.add(Op::ActiveLinear, &[map[n.inputs[0].index()], wt]).map_err(err)?
                }
                None => crate::copy_node(&mut out, &map, n),
            };
            map.push(new);
        }
        out.outputs = g.outputs.iter().map(|(name, v)| (name.clone(), map[v.index()])).collect();
        for (name, v) in states {
            out.output(&name, v);
        }
        *g = out;
        cx.record(
            "coreinfer",
            serde_json::json!({
                "alpha": self.alpha,
                "beta": self.beta,
                "gate_up": if self.gather { "core_linear (core rows gathered once per prompt)" } else { "masked_linear" },
                "activation": "|silu(gate)·up|",
                "selected": "at past = 0 (the first chunk), kept for every later step",
                "layers": layers,
            }),
        );
        Ok(!actions.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_checks_specs() {
        assert_eq!(
            CoreInfer::parse("alpha=0.3, beta=0.5").unwrap(),
            CoreInfer { alpha: 0.3, beta: 0.5, exact: false, gather: false }
        );
        assert_eq!(CoreInfer::parse("").unwrap(), CoreInfer::default());
        assert_eq!(CoreInfer::parse("beta=0").unwrap().beta, 0.0);
        let g = CoreInfer::parse("gather=1").unwrap();
        assert!(g.gather);
        assert_eq!(CoreInfer::parse(&g.spec()).unwrap(), g);
        for (bad, want) in [
            ("alpha=0", "alpha 0 is outside (0, 1]"),
            ("alpha=1.5", "outside (0, 1]"),
            ("beta=2", "beta 2 is outside [0, 1]"),
            ("alpha=x", "alpha `x` is not a number"),
            ("gamma=1", "unknown key `gamma`"),
            ("gather=2", "gather `2` is not 0 or 1"),
            ("alpha", "not KEY=VALUE"),
        ] {
            let e = CoreInfer::parse(bad).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }
}
