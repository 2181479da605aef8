//! Graph rewrites: the [`Pass`] trait, the pipeline (the one place pass order lives), and the passes.
//!
//! Every pass maps a verified graph to a verified graph computing the same function (lossless passes)
//! or records what it gave up (lossy passes, later). In debug builds the verifier runs after every pass.

pub mod blocks;
pub mod calibration;
pub mod chess;
pub mod coreinfer;
pub mod cse;
pub mod dce;
pub mod decompose;
pub mod egraph;
pub mod flexprefill;
pub mod fuse_allreduce_rmsnorm;
pub mod lift;
pub mod prune;
pub mod rules;
pub mod shard;
pub mod skip_layers;
pub mod structured_prune;

use kiln_ir::{Graph, GraphError, WeightStore};
use std::cell::RefCell;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a pass is given besides the graph: shared data (the calibration file) and where lossy passes
/// record what they did (for the artifact's manifest).
#[derive(Clone, Debug, Default)]
pub struct PassCx {
    pub calibration: Option<Arc<calibration::Calibration>>,
    pub records: RefCell<Vec<PassRecord>>,
    /// Why passes decided what they decided (`kiln compile --explain`): (pass, line).
    pub explanations: RefCell<Vec<(String, String)>>,
    /// Measured cost coefficients of the target (bytes, flops, launches) for e-graph extraction; the
    /// defaults of [`egraph::cost::CostCoefficients`] when absent.
    pub cost: Option<egraph::cost::CostCoefficients>,
    /// The weights the graph's `weight` nodes name: the model's, plus derived tensors passes add (slices,
    /// gathers, concatenations — see `kiln_ir::weights::TensorData`) under new names (`<name>#<what>`).
    /// A pass never replaces a model tensor in place.
    pub weights: RefCell<WeightStore>,
}

/// What a (lossy) pass did, as it goes into the manifest.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PassRecord {
    pub pass: String,
    pub detail: serde_json::Value,
}

impl PassCx {
    pub fn record(&self, pass: &str, detail: serde_json::Value) {
        self.records.borrow_mut().push(PassRecord { pass: pass.to_string(), detail });
    }

    /// Notes one line of a pass's reasoning (shown by `kiln compile --explain`).
    pub fn explain(&self, pass: &str, line: impl Into<String>) {
        self.explanations.borrow_mut().push((pass.to_string(), line.into()));
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error("unknown pass `{0}` (known: {1})")]
    Unknown(String, String),
    #[error("pass `{pass}` produced an invalid graph: {source}")]
    Verify {
        pass: &'static str,
        #[source]
        source: GraphError,
    },
    #[error("pass `{pass}`: {msg}")]
    Failed { pass: &'static str, msg: String },
}

pub trait Pass {
    /// Kebab-case stage name, as used by `--passes` and `--stop-after`.
    fn name(&self) -> &'static str;
    /// Rewrites `g`; returns whether anything changed.
    fn run(&self, g: &mut Graph, cx: &PassCx) -> Result<bool, PassError>;
}

/// One pass's entry in a pipeline report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PassReport {
    pub pass: &'static str,
    pub changed: bool,
    pub nodes_before: usize,
    pub nodes_after: usize,
    #[serde(rename = "time_ms", serialize_with = "millis")]
    pub time: Duration,
}

fn millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1e3)
}

/// Every pass Kiln knows, by name.
pub fn registry() -> Vec<Box<dyn Pass>> {
    vec![
        Box::new(dce::DeadCodeElimination),
        Box::new(cse::CommonSubexpressionElimination),
        // Unconfigured it skips nothing; configure it with `Pipeline::from_passes`.
        Box::new(skip_layers::SkipLayers::default()),
        Box::new(decompose::Decompose),
        Box::new(lift::Lift::default()),
        // Unconfigured (one rank) it changes nothing; `kiln run --tp N` configures it per rank.
        Box::new(shard::Shard { tp: 1, rank: 0 }),
        Box::new(fuse_allreduce_rmsnorm::FuseAllReduceRmsNorm),
    ]
}

/// The registered pass named `name`.
pub fn lookup(name: &str) -> Result<Box<dyn Pass>, PassError> {
    registry().into_iter().find(|p| p.name() == name).ok_or_else(|| {
        let known: Vec<&str> = registry().iter().map(|p| p.name()).collect();
        PassError::Unknown(name.to_string(), known.join(", "))
    })
}

/// The default pipeline, in order. `lift` is first: it is a no-op on graphs whose fused ops the
/// frontend already built (~15 ms on SmolLM2) and fuses graphs that arrive in primitive form.
pub const DEFAULT_PIPELINE: &[&str] = &["lift", "cse", "dce"];

pub struct Pipeline {
    passes: Vec<Box<dyn Pass>>,
}

impl Pipeline {
    /// Builds a pipeline from stage names.
    pub fn from_names(names: &[&str]) -> Result<Pipeline, PassError> {
        Ok(Pipeline { passes: names.iter().map(|n| lookup(n)).collect::<Result<_, _>>()? })
    }

    pub fn from_passes(passes: Vec<Box<dyn Pass>>) -> Pipeline {
        Pipeline { passes }
    }

    pub fn default_pipeline() -> Pipeline {
        Pipeline::from_names(DEFAULT_PIPELINE).expect("default passes exist")
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.passes.iter().map(|p| p.name()).collect()
    }

    /// Runs the passes in order, stopping after `stop_after` if given.
    pub fn run(&self, g: &mut Graph, cx: &PassCx, stop_after: Option<&str>) -> Result<Vec<PassReport>, PassError> {
        let mut reports = Vec::new();
        for p in &self.passes {
            let before = g.nodes.len();
            let t = Instant::now();
            let changed = p.run(g, cx)?;
            let time = t.elapsed();
            if cfg!(debug_assertions) {
                g.verify().map_err(|source| PassError::Verify { pass: p.name(), source })?;
            }
            reports.push(PassReport {
                pass: p.name(),
                changed,
                nodes_before: before,
                nodes_after: g.nodes.len(),
                time,
            });
            if stop_after == Some(p.name()) {
                break;
            }
        }
        Ok(reports)
    }
}

/// Rebuilds `g` keeping the nodes for which `keep` is true and redirecting operands through `remap`
/// (`remap[i]` = the node that replaces node i). Shared by the passes that delete or merge nodes.
pub(crate) fn rebuild(g: &Graph, keep: &[bool], remap: &[usize]) -> Graph {
    let mut new_index = vec![u32::MAX; g.nodes.len()];
    let mut out = Graph::new(g.name.clone());
    for (i, n) in g.nodes.iter().enumerate() {
        if !keep[i] {
            continue;
        }
        let mut node = n.clone();
        for v in &mut node.inputs {
            v.0 = new_index[remap[v.index()]];
        }
        new_index[i] = out.nodes.len() as u32;
        out.nodes.push(node);
    }
    out.outputs =
        g.outputs.iter().map(|(name, v)| (name.clone(), kiln_ir::ValueId(new_index[remap[v.index()]]))).collect();
    out
}

/// `n` copied into `out` with its inputs mapped through `map` (old value → new value): the rebuild
/// loops of the passes that rewrite some nodes and keep the rest.
pub(crate) fn copy_node(out: &mut Graph, map: &[kiln_ir::ValueId], n: &kiln_ir::Node) -> kiln_ir::ValueId {
    let inputs = n.inputs.iter().map(|v| map[v.index()]).collect();
    out.nodes.push(kiln_ir::Node { op: n.op.clone(), inputs, ty: n.ty.clone() });
    kiln_ir::ValueId(out.nodes.len() as u32 - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipeline_rejects_unknown_passes_by_name() {
        let err = Pipeline::from_names(&["dce", "fuse-everything"]).err().unwrap().to_string();
        assert!(err.contains("fuse-everything") && err.contains("dce"), "{err}");
        assert_eq!(Pipeline::default_pipeline().names(), DEFAULT_PIPELINE);
    }
}
