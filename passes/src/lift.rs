//! `lift`: runs the e-graph with the lifting rules (`rules/`) and extracts the cheapest graph by the
//! cost model. On a graph whose fused ops were decomposed into primitives it puts `rms_norm`, `silu`,
//! `swiglu`, `softmax`, `rope` and `attention` back; on an already fused graph it finds nothing and
//! returns the graph unchanged.
//!
//! The runner is bounded by a node limit, an iteration limit and a time limit; `--explain` shows egg's
//! stop reason, the e-graph's size, the cost before and after and which ops were lifted. With
//! `KILN_EGG_EXPLAIN=1` egg's explanations are recorded and the first few lifts are explained (slow;
//! for debugging rules).

use crate::egraph::cost::{best_nodes, CostModel};
use crate::egraph::{extract, to_egraph};
use crate::{Pass, PassCx, PassError};
use egg::{Runner, SimpleScheduler};
use kiln_ir::Graph;
use std::collections::BTreeMap;
use std::time::Duration;

pub struct Lift {
    pub node_limit: usize,
    pub iter_limit: usize,
    pub time_limit: Duration,
    /// Record egg explanations and print the first few (env `KILN_EGG_EXPLAIN=1`).
    pub explanations: bool,
}

impl Default for Lift {
    fn default() -> Self {
        Lift {
            node_limit: 500_000,
            iter_limit: 16,
            time_limit: Duration::from_secs(10),
            explanations: std::env::var_os("KILN_EGG_EXPLAIN").is_some_and(|v| v != "0"),
        }
    }
}

fn op_counts(g: &Graph) -> BTreeMap<&'static str, i64> {
    let mut m = BTreeMap::new();
    for n in &g.nodes {
        *m.entry(n.op.name()).or_insert(0) += 1;
    }
    m
}

impl Pass for Lift {
    fn name(&self) -> &'static str {
        "lift"
    }

    fn run(&self, g: &mut Graph, cx: &PassCx) -> Result<bool, PassError> {
        let model = CostModel::new(cx.cost.clone().unwrap_or_default());
        let t0 = std::time::Instant::now();
        let loaded = to_egraph(g, self.explanations);
        let t_load = t0.elapsed();
        let start_nodes = loaded.egraph.total_number_of_nodes();
        let runner = Runner::default()
            .with_egraph(loaded.egraph)
            .with_node_limit(self.node_limit)
            .with_iter_limit(self.iter_limit)
            .with_time_limit(self.time_limit)
            .with_scheduler(SimpleScheduler)
            .run(&crate::rules::all());
        let t_run = t0.elapsed() - t_load;
        let mut eg = runner.egraph;
        let stop = runner.stop_reason.map(|r| format!("{r:?}")).unwrap_or_else(|| "none".into());
        let mut order = std::collections::HashMap::new();
        for (i, &c) in loaded.classes.iter().enumerate() {
            order.entry(eg.find(c)).or_insert(i);
        }
        let best = best_nodes(&eg, &model, &order);
        let out = extract(g, &eg, &loaded.classes, |c| best[&c].clone())
            .map_err(|e| PassError::Failed { pass: "lift", msg: format!("extraction gave an invalid graph: {e}") })?;
        let t_extract = t0.elapsed() - t_load - t_run;
        let (before, after) = (model.graph_cost(g), model.graph_cost(&out));
        cx.explain(
            "lift",
            format!(
                "egg stopped: {stop} after {} iterations; e-graph {start_nodes} → {} e-nodes, {} e-classes; {} lifts applied",
                runner.iterations.len(),
                eg.total_number_of_nodes(),
                eg.number_of_classes(),
                eg.analysis.lifted.len()
            ),
        );
        cx.explain(
            "lift",
            format!(
                "time: load {:.0} ms, rewrite {:.0} ms, extract {:.0} ms",
                t_load.as_secs_f64() * 1e3,
                t_run.as_secs_f64() * 1e3,
                t_extract.as_secs_f64() * 1e3
            ),
        );
        cx.explain(
            "lift",
            format!(
                "cost ({}): {:.1} → {:.1} µs per decode step; nodes {} → {}",
                model.coef.target,
                before / 1e3,
                after / 1e3,
                g.nodes.len(),
                out.nodes.len()
            ),
        );
        let (cb, ca) = (op_counts(g), op_counts(&out));
        let gained: Vec<String> = ca
            .iter()
            .filter_map(|(op, &n)| {
                let d = n - cb.get(op).copied().unwrap_or(0);
                (d > 0).then(|| format!("{d} {op}"))
            })
            .collect();
        if !gained.is_empty() {
            cx.explain("lift", format!("lifted: {}", gained.join(", ")));
        }
        if self.explanations {
            let lifted = std::mem::take(&mut eg.analysis.lifted);
            for (class, node, rule) in lifted.iter().take(3) {
                let text = eg.explain_id_equivalence(*class, *node).get_flat_string();
                let short: String = text.chars().take(2000).collect();
                cx.explain("lift", format!("explanation of {rule}:\n{short}"));
            }
        }
        if out == *g {
            return Ok(false);
        }
        if after > before {
            cx.explain("lift", "kept the input: the extracted graph costs more");
            return Ok(false);
        }
        *g = out;
        Ok(true)
    }
}
