//! `flexprefill`: FlexPrefill sparse attention for long prompts (lossy). Replaces every `attention`
//! with `flex_attention` (same operands and type), which at prefill steps of at least `min_len` tokens
//! attends per head only to the key blocks its pattern keeps (see `kiln_ir::flex`), and below that is
//! exactly dense attention — decode steps are never affected.
//!
//! The settings go into the manifest (and so the cache key) as this pass's record.

use crate::{Pass, PassCx, PassError};
use kiln_ir::flex::FlexParams;
use kiln_ir::{Graph, Op};
use serde::{Deserialize, Serialize};

/// The pass, configured.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlexPrefill {
    /// Block size in positions.
    pub block: i64,
    /// Attention mass each selection keeps, in (0, 1].
    pub gamma: f32,
    /// Jensen–Shannon distance below which a head is query-aware (else vertical-slash).
    pub tau: f32,
    /// Steps with fewer query tokens run dense attention.
    pub min_len: i64,
}

impl Default for FlexPrefill {
    fn default() -> Self {
        FlexPrefill { block: 64, gamma: 0.9, tau: 0.1, min_len: 1024 }
    }
}

impl FlexPrefill {
    /// Parses `gamma=0.9,tau=0.1,block=64,min-len=1024` (any subset, the rest default; empty: all
    /// defaults). Errors name the bad key or value.
    pub fn parse(spec: &str) -> Result<FlexPrefill, String> {
        let mut f = FlexPrefill::default();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (k, v) = item.split_once('=').ok_or_else(|| format!("`{item}` is not KEY=VALUE"))?;
            let (k, v) = (k.trim(), v.trim());
            let num = |what: &str| format!("{k} = `{v}` is not {what}");
            match k {
                "gamma" => f.gamma = v.parse().map_err(|_| num("a number"))?,
                "tau" => f.tau = v.parse().map_err(|_| num("a number"))?,
                "block" => f.block = v.parse().map_err(|_| num("an integer"))?,
                "min-len" | "min_len" => f.min_len = v.parse().map_err(|_| num("an integer"))?,
                _ => return Err(format!("unknown key `{k}` (known: gamma, tau, block, min-len)")),
            }
        }
        f.validate()?;
        Ok(f)
    }

    pub fn validate(&self) -> Result<(), String> {
        FlexParams { block: self.block, gamma: self.gamma, tau: self.tau, min_len: self.min_len }.validate()
    }
}

impl Pass for FlexPrefill {
    fn name(&self) -> &'static str {
        "flexprefill"
    }

    fn run(&self, g: &mut Graph, cx: &PassCx) -> Result<bool, PassError> {
        self.validate().map_err(|msg| PassError::Failed { pass: "flexprefill", msg })?;
        let mut n = 0;
        for node in &mut g.nodes {
            if let Op::Attention { scale } = node.op {
                // Same operands and result type: the op changes, the graph's edges do not.
                node.op = Op::FlexAttention {
                    scale,
                    block: self.block,
                    gamma: self.gamma,
                    tau: self.tau,
                    min_len: self.min_len,
                };
                n += 1;
            }
        }
        cx.explain(
            "flexprefill",
            format!(
                "{n} attention ops → flex_attention (block {}, γ {}, τ {}): dense below {} query tokens, \
                 per-head query-aware / vertical-slash block patterns above",
                self.block, self.gamma, self.tau, self.min_len
            ),
        );
        cx.record(
            "flexprefill",
            serde_json::json!({"block": self.block, "gamma": self.gamma, "tau": self.tau, "min_len": self.min_len, "attention_ops": n}),
        );
        Ok(n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::interp::{Interpreter, Tensor};

    #[test]
    fn parse_defaults_and_errors() {
        assert_eq!(FlexPrefill::parse("").unwrap(), FlexPrefill::default());
        let f = FlexPrefill::parse("gamma=0.8, min-len=16,block=8").unwrap();
        assert_eq!((f.gamma, f.min_len, f.block, f.tau), (0.8, 16, 8, 0.1));
        for (bad, says) in [
            ("gamma=1.5", "gamma"),
            ("gamma=0", "gamma"),
            ("block=0", "block"),
            ("tau=-1", "tau"),
            ("min-len=-3", "min_len"),
            ("gama=0.9", "gama"),
            ("block=x", "block"),
            ("gamma", "KEY=VALUE"),
        ] {
            let e = FlexPrefill::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    /// The pass swaps the op and records it; with `min_len` above the step length the interpreter's
    /// result is unchanged bit for bit, and at a small `min_len` with γ < 1 it changes.
    #[test]
    fn rewrites_attention_and_is_dense_below_min_len() {
        let src = "graph \"g\" {\n  %0 = input {name = \"q\"} : f32[1, seq, 3, 4]\n  %1 = input {name = \"k\"} : f32[1, seq, 1, 4]\n  %2 = input {name = \"v\"} : f32[1, seq, 1, 4]\n  %3 = attention(%0, %1, %2) {scale = 0.5} : f32[1, seq, 3, 4]\n  output \"y\" = %3\n}\n";
        let g0 = kiln_ir::text::parse(src).unwrap();
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let s = 40;
        let mut r =
            |h: usize| Tensor::f32(vec![1, s, h, 4], (0..s * h * 4).map(|_| rng.random_range(-2.0f32..2.0)).collect());
        let (q, k, v) = (r(3), r(1), r(1));
        let run = |g: &Graph| {
            let store = kiln_ir::WeightStore::new();
            let out = Interpreter::new(&store).run(g, &[("q", q.clone()), ("k", k.clone()), ("v", v.clone())]).unwrap();
            out[0].1.as_f32().unwrap().to_vec()
        };
        let dense = run(&g0);
        for (min_len, same) in [(41, true), (8, false)] {
            let mut g = g0.clone();
            let cx = PassCx::default();
            let pass = FlexPrefill { block: 4, gamma: 0.5, tau: 0.1, min_len };
            assert!(pass.run(&mut g, &cx).unwrap());
            g.verify().unwrap();
            assert!(kiln_ir::text::print(&g).contains("flex_attention("));
            assert_eq!(cx.records.borrow()[0].detail["attention_ops"], 1);
            assert_eq!(run(&g) == dense, same, "min_len {min_len}");
        }
    }
}
