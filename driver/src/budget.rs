//! `--quality-budget ppl+X%`: choose a configuration whose perplexity, measured on the calibration text
//! (never the evaluation text), stays within X% of the full model's.
//!
//! [`search_joint`] (what `kiln compile` uses) searches layer skipping × CHESS (MLP) × CHESS (attention
//! inputs) × block pruning × structured pruning greedily for the least decode cost: measured on this
//! machine by default ([`decode_seconds`], CPU time per decode step of each candidate's artifact), or the
//! estimated weight bytes a step reads ([`decode_bytes`], `--budget-cost bytes`); [`search`] is the
//! layer-skipping-only search: candidates (method, count) for every method available, counts tried
//! upwards until one exceeds the budget; the winner has the most skipped blocks (among equals, the lower
//! perplexity).

use kiln_passes::skip_layers::{SkipLayers, SkipMethod};
use serde::Serialize;

/// A parsed budget: perplexity may grow by at most `percent`%.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct QualityBudget {
    pub percent: f64,
}

impl QualityBudget {
    /// Parses `ppl+X%` (X ≥ 0, e.g. `ppl+2%`, `ppl+12.5%`).
    pub fn parse(s: &str) -> Result<QualityBudget, String> {
        let bad = || format!("quality budget `{s}` is not of the form ppl+X% (e.g. ppl+10%)");
        let x = s.trim().strip_prefix("ppl+").and_then(|r| r.strip_suffix('%')).ok_or_else(bad)?;
        let percent: f64 = x.trim().parse().map_err(|_| bad())?;
        if !percent.is_finite() || percent < 0.0 {
            return Err(bad());
        }
        Ok(QualityBudget { percent })
    }

    pub fn limit(&self, baseline_ppl: f64) -> f64 {
        baseline_ppl * (1.0 + self.percent / 100.0)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Candidate {
    pub method: &'static str,
    pub count: usize,
    pub perplexity: f64,
    pub within_budget: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BudgetChoice {
    pub budget: String,
    pub baseline_perplexity: f64,
    pub limit: f64,
    /// The chosen configuration (count 0: nothing fits, the model is left whole).
    pub method: &'static str,
    pub count: usize,
    pub perplexity: f64,
    /// Every configuration measured, in order.
    pub candidates: Vec<Candidate>,
}

impl BudgetChoice {
    pub fn skip(&self) -> SkipLayers {
        let method = SkipMethod::parse(self.method).unwrap_or_default();
        SkipLayers { count: self.count, method }
    }
}

/// Searches `methods` for up to `max_count` skipped blocks; `measure` returns the perplexity of a
/// configuration on the calibration text (count 0 = the full model, measured first).
pub fn search(
    budget: QualityBudget,
    methods: &[SkipMethod],
    max_count: usize,
    mut measure: impl FnMut(SkipLayers) -> anyhow::Result<f64>,
) -> anyhow::Result<BudgetChoice> {
    let baseline = measure(SkipLayers { count: 0, method: SkipMethod::Even })?;
    let limit = budget.limit(baseline);
    let mut candidates = Vec::new();
    let mut best = (0usize, baseline, SkipMethod::Even);
    for &method in methods {
        for count in 1..=max_count {
            let ppl = measure(SkipLayers { count, method })?;
            let ok = ppl <= limit;
            candidates.push(Candidate { method: method.name(), count, perplexity: ppl, within_budget: ok });
            if !ok {
                break;
            }
            if count > best.0 || (count == best.0 && ppl < best.1) {
                best = (count, ppl, method);
            }
        }
    }
    Ok(BudgetChoice {
        budget: format!("ppl+{}%", budget.percent),
        baseline_perplexity: baseline,
        limit,
        method: best.2.name(),
        count: best.0,
        perplexity: best.1,
        candidates,
    })
}

/// A point of the joint space `--quality-budget` searches: layer skipping (influence) × CHESS activation
/// sparsity of the MLP × of the attention projections' inputs × block pruning (magnitude) × structured
/// pruning (neurons, heads per KV group).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Joint {
    pub skip: usize,
    pub chess: f64,
    pub attn: f64,
    pub prune: f64,
    pub neurons: f64,
    pub heads: usize,
}

impl Joint {
    /// CHESS thresholds are calibrated on the dense model: MLP sparsity does not combine with removing
    /// MLP neurons, nor attention-input sparsity with removing heads (the `chess` pass refuses the
    /// narrower layers).
    pub fn valid(&self) -> bool {
        (self.chess == 0.0 || self.neurons == 0.0) && (self.attn == 0.0 || self.heads == 0)
    }

    /// `base` with this point's layer skipping (influence), CHESS and structured pruning set (block
    /// pruning needs the kernel table: the caller sets `prune`). CHESS uses per-layer thresholds: on
    /// SmolLM2 they cost a tenth of the per-channel ones' perplexity at equal sparsity (docs/quality.md).
    pub fn apply(&self, base: crate::artifact::Build) -> crate::artifact::Build {
        use kiln_passes::chess::ChessScope;
        let (chess, scope, attn) = match (self.chess > 0.0, self.attn > 0.0) {
            (false, false) => (None, ChessScope::Mlp, None),
            (true, false) => (Some(self.chess), ChessScope::Mlp, None),
            (false, true) => (Some(self.attn), ChessScope::Attn, None),
            (true, true) => (Some(self.chess), ChessScope::All, Some(self.attn)),
        };
        let structured = (self.neurons > 0.0 || self.heads > 0)
            .then_some(kiln_passes::structured_prune::StructuredPrune { neurons: self.neurons, heads: self.heads });
        crate::artifact::Build {
            skip: SkipLayers { count: self.skip, method: SkipMethod::Influence },
            chess,
            chess_scope: scope,
            chess_attn: attn,
            chess_per_layer: chess.is_some(),
            structured,
            ..base
        }
    }

    /// Short description, e.g. `skip 1 + neurons 10%`; `dense` for nothing.
    pub fn describe(&self) -> String {
        let mut p = Vec::new();
        if self.skip > 0 {
            p.push(format!("skip {}", self.skip));
        }
        for (name, v) in
            [("chess", self.chess), ("chess-attn", self.attn), ("prune", self.prune), ("neurons", self.neurons)]
        {
            if v > 0.0 {
                p.push(format!("{name} {}%", v * 100.0));
            }
        }
        if self.heads > 0 {
            p.push(format!("heads -{}/group", self.heads));
        }
        if p.is_empty() {
            "dense".into()
        } else {
            p.join(" + ")
        }
    }
}

/// The levels each technique may take, increasing from 0 (off); an axis with one level is not searched.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Axes {
    pub skip: Vec<usize>,
    pub chess: Vec<f64>,
    pub attn: Vec<f64>,
    pub prune: Vec<f64>,
    pub neurons: Vec<f64>,
    pub heads: Vec<usize>,
}

pub const AXES: [&str; N_AXES] = ["skip", "chess", "chess-attn", "prune", "neurons", "heads"];
const N_AXES: usize = 6;

impl Axes {
    fn len(&self, a: usize) -> usize {
        [self.skip.len(), self.chess.len(), self.attn.len(), self.prune.len(), self.neurons.len(), self.heads.len()][a]
    }
    fn at(&self, i: [usize; N_AXES]) -> Joint {
        Joint {
            skip: self.skip[i[0]],
            chess: self.chess[i[1]],
            attn: self.attn[i[2]],
            prune: self.prune[i[3]],
            neurons: self.neurons[i[4]],
            heads: self.heads[i[5]],
        }
    }
}

/// One measured point.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct JointCandidate {
    pub config: Joint,
    pub perplexity: f64,
    /// Estimated decode cost (the caller's unit; relative to the dense model in reports).
    pub cost: f64,
    pub within_budget: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct JointChoice {
    pub budget: String,
    pub baseline_perplexity: f64,
    pub baseline_cost: f64,
    pub limit: f64,
    pub config: Joint,
    pub description: String,
    pub perplexity: f64,
    pub cost: f64,
    /// Where the winning greedy walk started: dense, or a technique's best single configuration.
    pub start: Joint,
    /// The path from the dense model to the choice, one accepted step per entry (the start first).
    pub path: Vec<Joint>,
    /// Per technique alone (every other axis off): its cheapest configuration within the budget.
    pub best_single: Vec<JointCandidate>,
    /// Every point measured, in order.
    pub candidates: Vec<JointCandidate>,
}

/// Greedy coordinate search of the joint space: from the dense model, each round measures one step up
/// every open axis (perplexity on the calibration text via `measure`, decode cost via `cost`): the
/// smallest step that saves at least `min_saving` (a share of the current cost: 0 for an exact
/// estimate, a noise margin for a measured time), looking further up the axis past levels that save
/// less; a level over the budget closes its axis (perplexity grows along an axis in practice), while an
/// axis whose levels all fit but save too little is tried again from the next point; the step saving
/// the most cost per unit of perplexity added is taken. It stops when a round takes no step. Each technique is also walked alone (its best single configuration); where one is
/// cheaper than the walk's end, the walk is repeated from it, and the cheapest end is the choice — so
/// the choice is never costlier than the best single technique.
pub fn search_joint(
    budget: QualityBudget,
    axes: &Axes,
    min_saving: f64,
    mut cost: impl FnMut(&Joint) -> anyhow::Result<f64>,
    mut measure: impl FnMut(&Joint) -> anyhow::Result<f64>,
) -> anyhow::Result<JointChoice> {
    let mut memo: Vec<([usize; N_AXES], JointCandidate)> = Vec::new();
    let mut eval = |i: [usize; N_AXES], limit: f64| -> anyhow::Result<JointCandidate> {
        if let Some((_, c)) = memo.iter().find(|(k, _)| *k == i) {
            return Ok(c.clone());
        }
        let config = axes.at(i);
        let perplexity = measure(&config)?;
        let c = JointCandidate { config, perplexity, cost: cost(&config)?, within_budget: perplexity <= limit };
        memo.push((i, c.clone()));
        Ok(c)
    };
    let base = eval([0; N_AXES], f64::INFINITY)?;
    let limit = budget.limit(base.perplexity);
    let (mut cur, mut path) = walk(axes, ([0; N_AXES], base.clone()), limit, min_saving, base.perplexity, &mut eval)?;
    let mut best_single = Vec::new();
    for a in 0..N_AXES {
        let mut top: Option<([usize; N_AXES], JointCandidate)> = None;
        for level in 1..axes.len(a) {
            let mut i = [0; N_AXES];
            i[a] = level;
            let c = eval(i, limit)?;
            if c.perplexity > limit {
                break;
            }
            if top.as_ref().is_none_or(|t| c.cost < t.1.cost) {
                top = Some((i, c));
            }
        }
        best_single.extend(top);
    }
    // The walk from dense commits to its first step; a technique's best alone may beat where it ends
    // (a step that adds no perplexity scores highest however little it saves). Walk on from each single
    // best that is cheaper than the result, and keep the cheapest end.
    let mut start = Joint::default();
    let mut singles = best_single.clone();
    singles.sort_by(|a, b| a.1.cost.total_cmp(&b.1.cost));
    for (i, c) in singles {
        if c.cost < cur.1.cost {
            let (end, rest) = walk(axes, (i, c.clone()), limit, min_saving, base.perplexity, &mut eval)?;
            if end.1.cost < cur.1.cost {
                start = c.config;
                path = std::iter::once(c.config).chain(rest).collect();
                cur = end;
            }
        }
    }
    let cur = cur.1;
    let best_single: Vec<JointCandidate> = best_single.into_iter().map(|(_, c)| c).collect();
    let mut candidates: Vec<JointCandidate> = memo.into_iter().map(|(_, c)| c).collect();
    for c in &mut candidates {
        c.within_budget = c.perplexity <= limit;
    }
    Ok(JointChoice {
        budget: format!("ppl+{}%", budget.percent),
        baseline_perplexity: base.perplexity,
        baseline_cost: base.cost,
        limit,
        config: cur.config,
        description: cur.config.describe(),
        perplexity: cur.perplexity,
        cost: cur.cost,
        start,
        path,
        best_single,
        candidates,
    })
}

type Point = ([usize; N_AXES], JointCandidate);

/// One greedy walk from `from`: each round measures, per open axis, the smallest step up it saving at
/// least `min_saving` of the current cost; an axis that leaves the budget first closes; the step saving
/// the most cost per unit of perplexity added is taken; it ends when a round takes none. Returns where
/// it ends and the steps taken.
fn walk(
    axes: &Axes,
    from: Point,
    limit: f64,
    min_saving: f64,
    base_ppl: f64,
    eval: &mut impl FnMut([usize; N_AXES], f64) -> anyhow::Result<JointCandidate>,
) -> anyhow::Result<(Point, Vec<Joint>)> {
    let (mut cur_i, mut cur) = from;
    let mut open: Vec<bool> = (0..N_AXES).map(|a| axes.len(a) > 1).collect();
    let mut path = Vec::new();
    loop {
        let mut best: Option<(f64, [usize; N_AXES], JointCandidate)> = None;
        for a in 0..N_AXES {
            if !open[a] {
                continue;
            }
            if cur_i[a] + 1 >= axes.len(a) {
                open[a] = false;
                continue;
            }
            // The smallest step up this axis that saves at least `min_saving`, looking past levels that
            // save less (a gradual technique saves little per level, below a measured cost's noise).
            // An axis closes where it leaves the budget (or the valid combinations); one whose levels
            // all fit but save too little stays open: from a later point they may save more.
            let mut next = cur_i;
            let mut step = None;
            let mut fits = true;
            while next[a] + 1 < axes.len(a) {
                next[a] += 1;
                if !axes.at(next).valid() {
                    fits = false;
                    break;
                }
                let c = eval(next, limit)?;
                if c.perplexity > limit {
                    fits = false;
                    break;
                }
                if c.cost < cur.cost * (1.0 - min_saving) {
                    step = Some(c);
                    break;
                }
            }
            let Some(c) = step else {
                open[a] = fits;
                continue;
            };
            let score = (cur.cost - c.cost) / (c.perplexity - cur.perplexity).max(1e-9 * base_ppl);
            if best.as_ref().is_none_or(|(s, _, b)| score > *s || (score == *s && c.cost < b.cost)) {
                best = Some((score, next, c));
            }
        }
        let Some((_, i, c)) = best else { break };
        path.push(c.config);
        (cur_i, cur) = (i, c);
    }
    Ok(((cur_i, cur), path))
}

/// Measured CPU seconds per decode step of `backend` (emptied first and after): a prefill of `prompt`,
/// then `steps` single-token forwards feeding back the argmax, timed together; the best of `rounds`
/// such runs. CPU time of this process, not wall time: time-sharing the cores with other work does not
/// inflate it (on a busy machine wall times of candidates measured minutes apart are not comparable).
/// With one worker thread it is the work itself; with T threads the workers spin between launches, so
/// it is about T × the wall time (still comparable between candidates run with the same T).
pub fn decode_seconds(
    backend: &mut dyn kiln_runtime::Backend,
    prompt: &[u32],
    steps: usize,
    rounds: usize,
) -> anyhow::Result<f64> {
    anyhow::ensure!(!prompt.is_empty() && steps > 0 && rounds > 0, "decode timing needs a prompt, steps and rounds");
    let mut best = f64::INFINITY;
    for _ in 0..rounds {
        backend.reset();
        let mut next = kiln_runtime::sample::argmax(backend.forward(prompt)?.last());
        let t = process_cpu_seconds()?;
        for _ in 0..steps {
            next = kiln_runtime::sample::argmax(backend.forward(&[next])?.last());
        }
        best = best.min((process_cpu_seconds()? - t) / steps as f64);
    }
    backend.reset();
    Ok(best)
}

/// The decode time of `candidate` over that of `reference`, measured in `rounds` adjacent pairs (the
/// order alternating) of [`decode_seconds`] runs of `steps` steps; the median ratio. Pairing is what
/// makes candidates measured minutes apart comparable on a shared machine: the load drifts between
/// candidates, much less between two runs a second apart.
pub fn paired_decode_ratio(
    reference: &mut dyn kiln_runtime::Backend,
    candidate: &mut dyn kiln_runtime::Backend,
    prompt: &[u32],
    steps: usize,
    rounds: usize,
) -> anyhow::Result<f64> {
    anyhow::ensure!(rounds > 0, "decode timing needs a prompt, steps and rounds");
    let mut ratios = Vec::with_capacity(rounds);
    for r in 0..rounds {
        let (c, d) = if r % 2 == 0 {
            let d = decode_seconds(reference, prompt, steps, 1)?;
            (decode_seconds(candidate, prompt, steps, 1)?, d)
        } else {
            let c = decode_seconds(candidate, prompt, steps, 1)?;
            (c, decode_seconds(reference, prompt, steps, 1)?)
        };
        ratios.push(c / d.max(f64::MIN_POSITIVE));
    }
    ratios.sort_by(f64::total_cmp);
    Ok(ratios[ratios.len() / 2])
}

/// CPU seconds this process has used (every thread).
fn process_cpu_seconds() -> anyhow::Result<f64> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_PROCESS_CPUTIME_ID is supported on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    anyhow::ensure!(rc == 0, "cannot read the process CPU clock: {}", std::io::Error::last_os_error());
    Ok(ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9)
}

/// Estimated bytes of weights one decode step reads (decode is memory-bound): every linear's weight;
/// CHESS's masked/active linears a share `1 − s` of theirs, `s` = `attn` for the attention projections
/// (weights named `attn_*`) and `chess` for the MLP's (on a column-major weight, the active channels'
/// codes and the active blocks' scales: `kiln_ir::column::read_share`); a pruned linear the layout its
/// decode kernel reads (`Op::phase_weights`: block-sparse, N:M or bitmap when the decode choice is the
/// sparse kernel, else the dense matrix). The embedding (one row) is not counted.
pub fn decode_bytes(g: &kiln_ir::Graph, w: &kiln_ir::WeightStore, chess: f64, attn: f64) -> f64 {
    use kiln_ir::Op;
    let name = |v: &kiln_ir::ValueId| match &g.node(*v).op {
        Op::Weight { name } => Some(name.as_str()),
        _ => None,
    };
    let bytes = |v: &kiln_ir::ValueId| name(v).and_then(|n| w.get(n)).map_or(0.0, |t| t.bytes.len() as f64);
    let sparsity = |v: &kiln_ir::ValueId| if name(v).is_some_and(|n| n.contains("attn_")) { attn } else { chess };
    g.nodes
        .iter()
        .map(|n| match &n.op {
            Op::Linear => bytes(&n.inputs[1]),
            // Structured pruning's gathered weights are read whole (every kept channel, its blocks' scales).
            Op::ActiveLinear if g.ty(n.inputs[1]).dtype.is_gathered() => bytes(&n.inputs[1]),
            Op::ActiveLinear if g.ty(n.inputs[1]).dtype.is_column() => {
                let keep = 1.0 - sparsity(&n.inputs[1]);
                bytes(&n.inputs[1]) * kiln_ir::column::read_share(g.ty(n.inputs[1]).dtype, keep)
            }
            Op::MaskedLinear | Op::CoreLinear { .. } | Op::ActiveLinear => {
                bytes(&n.inputs[1]) * (1.0 - sparsity(&n.inputs[1]))
            }
            // Pruned linears: the layout the decode kernel reads (block-sparse or dense, compact or dense).
            Op::SparseLinear { .. } | Op::NmLinear { .. } | Op::BitmapLinear { .. } => {
                n.inputs[n.op.phase_weights(true)].iter().map(bytes).sum()
            }
            _ => 0.0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_budgets_and_refuses_nonsense() {
        assert_eq!(QualityBudget::parse("ppl+10%").unwrap().percent, 10.0);
        assert_eq!(QualityBudget::parse("ppl+2.5%").unwrap().percent, 2.5);
        for bad in ["10%", "ppl+10", "ppl+-3%", "ppl+x%", "ppl+nan%"] {
            assert!(QualityBudget::parse(bad).unwrap_err().contains("ppl+X%"), "{bad}");
        }
        assert!((QualityBudget { percent: 50.0 }.limit(10.0) - 15.0).abs() < 1e-12);
    }

    #[test]
    fn picks_the_most_aggressive_configuration_within_budget() {
        // Made-up perplexities: even grows 10 per layer, influence 4 per layer; baseline 100.
        let ppl = |s: SkipLayers| match s.method {
            SkipMethod::Even => 100.0 + 10.0 * s.count as f64,
            SkipMethod::Influence => 100.0 + 4.0 * s.count as f64,
            SkipMethod::Top => 100.0 + 50.0 * s.count as f64,
        };
        let both = [SkipMethod::Even, SkipMethod::Influence];
        let c = search(QualityBudget { percent: 10.0 }, &both, 8, |s| Ok(ppl(s))).unwrap();
        assert_eq!((c.method, c.count, c.perplexity), ("influence", 2, 108.0));
        // Even stopped at its first failure (count 2 = 120 > 110).
        assert_eq!(c.candidates.iter().filter(|x| x.method == "even").count(), 2);
        let c = search(QualityBudget { percent: 1.0 }, &both, 8, |s| Ok(ppl(s))).unwrap();
        assert_eq!((c.count, c.perplexity), (0, 100.0));
        let c = search(QualityBudget { percent: 1000.0 }, &[SkipMethod::Even], 5, |s| Ok(ppl(s))).unwrap();
        assert_eq!((c.method, c.count), ("even", 5));
    }

    fn axes() -> Axes {
        Axes {
            skip: vec![0, 1, 2],
            chess: vec![0.0, 0.5],
            attn: vec![0.0],
            prune: vec![0.0, 0.25, 0.5],
            neurons: vec![0.0, 0.25, 0.5],
            heads: vec![0, 1],
        }
    }

    /// Made-up model: perplexity adds per technique, cost is the share of weight bytes left.
    fn ppl(j: &Joint) -> f64 {
        100.0 + 20.0 * j.skip as f64 + 40.0 * j.chess + 8.0 * j.prune + 16.0 * j.neurons + 3.0 * j.heads as f64
    }
    fn cost(j: &Joint) -> f64 {
        1.0 - 0.03 * j.skip as f64 - 0.2 * j.chess - 0.2 * j.prune - 0.3 * j.neurons - 0.05 * j.heads as f64
    }

    #[test]
    fn joint_search_combines_techniques_greedily() {
        let c = search_joint(QualityBudget { percent: 10.0 }, &axes(), 0.0, |j| Ok(cost(j)), |j| Ok(ppl(j))).unwrap();
        // Cost saved per unit of perplexity added, per step: prune 0.05/2 = 0.025, neurons 0.075/4 =
        // 0.019, heads 0.05/3 = 0.017, chess 0.1/20, skip 0.03/20. Round 1 takes prune 25% (ppl 102),
        // round 2 prune 50% (104, the axis ends), round 3 neurons 25% (108); then neurons 50% (112) and
        // heads (111) are over 110, skip and chess (124) too: stop at cost 1 − 0.1 − 0.075 = 0.825.
        let p50 = Joint { prune: 0.5, ..Default::default() };
        assert_eq!(c.path, vec![Joint { prune: 0.25, ..Default::default() }, p50, Joint { neurons: 0.25, ..p50 }]);
        assert_eq!(c.config, Joint { neurons: 0.25, ..p50 });
        assert!(c.perplexity == 108.0 && (c.limit - 110.0).abs() < 1e-9);
        assert!((c.cost - 0.825).abs() < 1e-12);
        // Every open step from the choice is over the budget or saves nothing.
        for cand in &c.candidates {
            assert_eq!(cand.within_budget, cand.perplexity <= c.limit);
        }
        // Alone, the cheapest within 10% is neurons 50% (ppl 108, cost 0.85): the joint choice is cheaper.
        let single = c.best_single.iter().min_by(|a, b| a.cost.total_cmp(&b.cost)).unwrap();
        assert_eq!(single.config, Joint { neurons: 0.5, ..Default::default() });
        assert!(c.cost < single.cost);
        // Chess never combines with neuron pruning.
        assert!(c.candidates.iter().all(|x| x.config.valid()));
        // A budget nothing fits leaves the model dense.
        let c = search_joint(QualityBudget { percent: 0.5 }, &axes(), 0.0, |j| Ok(cost(j)), |j| Ok(ppl(j))).unwrap();
        assert_eq!((c.config, c.description.as_str()), (Joint::default(), "dense"));
    }

    #[test]
    fn steps_below_the_margin_look_further_up_their_axis() {
        // Prune saves 1% per level, attention inputs 0.5% in all, neurons 5%; each adds 0.1–1 perplexity.
        let axes = Axes {
            skip: vec![0],
            chess: vec![0.0],
            attn: vec![0.0, 0.1],
            prune: vec![0.0, 0.1, 0.2, 0.3],
            neurons: vec![0.0, 0.1],
            heads: vec![0],
        };
        let cost = |j: &Joint| Ok(1.0 - 0.1 * j.prune - 0.5 * j.neurons - 0.05 * j.attn);
        let ppl = |j: &Joint| Ok(100.0 + j.prune + j.neurons + j.attn);
        let exact = search_joint(QualityBudget { percent: 10.0 }, &axes, 0.0, cost, ppl).unwrap();
        assert_eq!(exact.config, Joint { prune: 0.3, neurons: 0.1, attn: 0.1, ..Default::default() });
        // With a 2% margin: neurons first (5%); then prune's first level saving 2% of 0.95 is 20% (one
        // level saves 1.05%, two 2.1%), a two-level step; from there 30% saves 1.08%, the axis ends, and
        // attention never saves 2%: neither is taken.
        let margin = search_joint(QualityBudget { percent: 10.0 }, &axes, 0.02, cost, ppl).unwrap();
        let n10 = Joint { neurons: 0.1, ..Default::default() };
        assert_eq!(margin.path, vec![n10, Joint { prune: 0.2, ..n10 }]);
        assert_eq!(margin.config, Joint { prune: 0.2, ..n10 });
        // The prune 10% level was measured and passed over (it saves 1.05% after neurons).
        assert!(margin.candidates.iter().any(|c| c.config == Joint { prune: 0.1, ..n10 }));
        // A budget that ends the axis before its saving reaches the margin closes it.
        let tight = search_joint(QualityBudget { percent: 0.15 }, &axes, 0.02, cost, ppl).unwrap();
        assert_eq!(tight.config, n10);
    }

    #[test]
    fn a_single_technique_cheaper_than_the_walk_restarts_it() {
        // Prune 10% adds no perplexity (the walk from dense takes it first) but saves 1%, and rules out
        // neurons; neurons 20% alone saves 10%. The choice must be neurons 20%, reached from its single.
        let axes = Axes {
            skip: vec![0],
            chess: vec![0.0],
            attn: vec![0.0],
            prune: vec![0.0, 0.1],
            neurons: vec![0.0, 0.1, 0.2],
            heads: vec![0],
        };
        let cost = |j: &Joint| Ok(1.0 - 0.1 * j.prune - 0.5 * j.neurons);
        let ppl = |j: &Joint| Ok(100.0 + 40.0 * j.neurons + if j.prune > 0.0 && j.neurons > 0.0 { 20.0 } else { 0.0 });
        let c = search_joint(QualityBudget { percent: 10.0 }, &axes, 0.0, cost, ppl).unwrap();
        let n20 = Joint { neurons: 0.2, ..Default::default() };
        assert_eq!((c.config, c.start, c.path.clone()), (n20, n20, vec![n20]));
        assert!((c.cost - 0.9).abs() < 1e-12 && (c.perplexity - 108.0).abs() < 1e-12);
        let single = c.best_single.iter().map(|b| b.cost).fold(f64::INFINITY, f64::min);
        assert!(c.cost <= single);
    }
}
