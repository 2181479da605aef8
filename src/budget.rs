//! `--quality-budget ppl+X%`: choose the most aggressive layer skipping whose perplexity, measured on the
//! calibration text (never the evaluation text), stays within X% of the full model's.
//!
//! Candidates are (method, count) for every method available (`even`; `influence` when a calibration file
//! is given). Per method, counts are tried upwards from 1 until one exceeds the budget (perplexity grows
//! with the count in practice; the search stops at the first failure, so it measures few candidates). The
//! winner has the most skipped blocks; among equals, the lower perplexity.

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
}
