//! `skip-layers`: removes whole decoder blocks (static layer skipping; lossy).
//!
//! A skipped block becomes the identity on the residual stream: whatever read the block's output reads its
//! input instead. Its KV-cache inputs and outputs are removed from the graph interface, so no backend
//! allocates them, and the block's nodes die. Which blocks go is chosen by
//! - `even`: the kept blocks are evenly spaced, the first and the last always kept (a target speedup);
//! - `influence`: the blocks with the lowest block influence (1 − cos(x_in, x_out), from the calibration
//!   file in [`PassCx::calibration`]) go first (ShortGPT);
//! - `top`: the last blocks go, and the final norm and LM head read the intermediate state: a static
//!   early exit at depth n − k for every position (Sorted-LLaMA-style truncation).
//!
//! The choice, and the calibration numbers it used, are recorded in [`PassCx::records`].

use crate::blocks::find_blocks;
use crate::{rebuild, Pass, PassCx, PassError};
use kiln_ir::{Graph, Op};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SkipMethod {
    #[default]
    Even,
    Influence,
    Top,
}

impl SkipMethod {
    pub fn name(self) -> &'static str {
        match self {
            SkipMethod::Even => "even",
            SkipMethod::Influence => "influence",
            SkipMethod::Top => "top",
        }
    }

    pub fn parse(s: &str) -> Result<SkipMethod, String> {
        match s {
            "even" => Ok(SkipMethod::Even),
            "influence" => Ok(SkipMethod::Influence),
            "top" => Ok(SkipMethod::Top),
            _ => Err(format!("unknown skip method `{s}` (known: even, influence, top)")),
        }
    }
}

/// The pass, configured: skip `count` blocks chosen by `method`. `count` 0 changes nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkipLayers {
    pub count: usize,
    pub method: SkipMethod,
}

/// The `count` layers of `n` to skip under `method`, ascending. `influence` is needed for
/// [`SkipMethod::Influence`] (one value per layer).
pub fn choose_layers(
    n: usize,
    count: usize,
    method: SkipMethod,
    influence: Option<&[f64]>,
) -> Result<Vec<usize>, String> {
    if count == 0 {
        return Ok(Vec::new());
    }
    let mut skip = match method {
        SkipMethod::Even => {
            if count + 2 > n {
                return Err(format!(
                    "cannot skip {count} of {n} layers evenly: the first and last are kept, so at most {} can go",
                    n.saturating_sub(2)
                ));
            }
            let keep = n - count;
            // Kept layers round(i·(n−1)/(keep−1)): distinct since keep ≤ n, first 0 and last n−1.
            let kept: Vec<usize> = (0..keep).map(|i| (i * (n - 1) + (keep - 1) / 2) / (keep - 1)).collect();
            (0..n).filter(|l| !kept.contains(l)).collect::<Vec<_>>()
        }
        SkipMethod::Influence => {
            let inf = influence.ok_or("skip method `influence` needs a calibration file")?;
            if inf.len() != n {
                return Err(format!("the calibration file has {} layers, the graph has {n}", inf.len()));
            }
            if count >= n {
                return Err(format!("cannot skip {count} of {n} layers: at least one must stay"));
            }
            let mut order: Vec<usize> = (0..n).collect();
            // Lowest influence first; ties to the later layer (deeper blocks are usually safer to drop).
            order.sort_by(|&a, &b| inf[a].total_cmp(&inf[b]).then(b.cmp(&a)));
            order[..count].to_vec()
        }
        SkipMethod::Top => {
            if count >= n {
                return Err(format!("cannot skip {count} of {n} layers: at least one must stay"));
            }
            (n - count..n).collect()
        }
    };
    skip.sort_unstable();
    Ok(skip)
}

/// Removes the blocks of `layers` from `g` (see the module docs). Errors name a layer that is not there.
pub fn skip_blocks(g: &Graph, layers: &[usize]) -> Result<Graph, String> {
    let blocks = find_blocks(g)?;
    let mut remap: Vec<usize> = (0..g.nodes.len()).collect();
    let mut dropped_state: Vec<String> = Vec::new();
    for &l in layers {
        if !blocks.iter().any(|b| b.layer == l) {
            return Err(format!("layer {l} is not a block of the graph"));
        }
    }
    // In layer order, so a run of skipped blocks collapses onto the first one's input.
    for b in blocks.iter().filter(|b| layers.contains(&b.layer)) {
        remap[b.x_out.index()] = remap[b.x_in.index()];
        dropped_state.extend(b.caches.iter().cloned());
    }
    let mut h = g.clone();
    h.outputs.retain(|(name, _)| !dropped_state.contains(name));
    let mut live = vec![false; h.nodes.len()];
    for (_, v) in &h.outputs {
        live[remap[v.index()]] = true;
    }
    for i in (0..h.nodes.len()).rev() {
        if live[i] {
            for v in &h.nodes[i].inputs {
                live[remap[v.index()]] = true;
            }
        }
    }
    for (i, n) in h.nodes.iter().enumerate() {
        if let Op::Input { name } = &n.op {
            if !dropped_state.contains(name) {
                live[i] = true;
            }
        }
    }
    Ok(rebuild(&h, &live, &remap))
}

impl Pass for SkipLayers {
    fn name(&self) -> &'static str {
        "skip-layers"
    }

    fn run(&self, g: &mut Graph, cx: &PassCx) -> Result<bool, PassError> {
        if self.count == 0 {
            return Ok(false);
        }
        let fail = |msg: String| PassError::Failed { pass: "skip-layers", msg };
        let n = find_blocks(g).map_err(fail)?.len();
        let influence = cx.calibration.as_ref().map(|c| c.influence());
        let layers = choose_layers(n, self.count, self.method, influence.as_deref()).map_err(fail)?;
        *g = skip_blocks(g, &layers).map_err(fail)?;
        let used: Option<Vec<f64>> = influence.map(|inf| layers.iter().map(|&l| inf[l]).collect());
        cx.record(
            self.name(),
            serde_json::json!({
                "method": self.method.name(),
                "count": self.count,
                "layers_before": n,
                "skipped": layers,
                "skipped_block_influence": used,
            }),
        );
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn even_choice_keeps_first_and_last_and_spreads_the_rest() {
        assert_eq!(choose_layers(30, 0, SkipMethod::Even, None).unwrap(), Vec::<usize>::new());
        // 6 layers, keep 4 → kept at round(0, 5/3, 10/3, 5) = 0, 2, 3, 5.
        assert_eq!(choose_layers(6, 2, SkipMethod::Even, None).unwrap(), vec![1, 4]);
        for k in 1..=28 {
            let s = choose_layers(30, k, SkipMethod::Even, None).unwrap();
            assert_eq!(s.len(), k);
            assert!(!s.contains(&0) && !s.contains(&29));
        }
        let e = choose_layers(30, 29, SkipMethod::Even, None).unwrap_err();
        assert!(e.contains("at most 28"), "{e}");
    }

    #[test]
    fn influence_choice_takes_the_lowest() {
        let inf = [0.5, 0.01, 0.2, 0.02, 0.3];
        assert_eq!(choose_layers(5, 2, SkipMethod::Influence, Some(&inf)).unwrap(), vec![1, 3]);
        assert!(choose_layers(5, 2, SkipMethod::Influence, None).unwrap_err().contains("calibration"));
        assert!(choose_layers(4, 2, SkipMethod::Influence, Some(&inf)).unwrap_err().contains("5 layers"));
        assert!(choose_layers(5, 5, SkipMethod::Influence, Some(&inf)).unwrap_err().contains("at least one"));
        assert!(SkipMethod::parse("random").unwrap_err().contains("even, influence, top"));
        assert_eq!(choose_layers(5, 2, SkipMethod::Top, None).unwrap(), vec![3, 4]);
        assert!(choose_layers(5, 5, SkipMethod::Top, None).is_err());
    }
}
