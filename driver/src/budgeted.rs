//! `kiln compile --quality-budget ppl+X%`: the greedy search of [`crate::budget::search_joint`] run
//! on a real model — each candidate built once into the artifact cache, its perplexity measured on the
//! calibration text (remembered per artifact and text), its decode cost timed against the dense model in
//! adjacent pairs or estimated in bytes — and the chosen configuration as a [`Build`].

use crate::artifact::Build;
use crate::budget::{Axes, Joint, JointChoice, QualityBudget};
use crate::kernel_table::load_kernel_table;
use crate::options::PassOptions;
use crate::quality::{compiled_backend, load_cached, load_calibration, read_text, tokenize};
use anyhow::{bail, Context, Result};
use kiln_codegen::CompileOptions;
use kiln_frontend::Model;
use kiln_passes::chess::ChessMlp;
use kiln_runtime::CompiledBackend;
use std::path::{Path, PathBuf};

/// The cost `--quality-budget` minimises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BudgetCost {
    /// Each candidate's decode CPU time over the dense model's, timed in adjacent pairs.
    Measured,
    /// The weight bytes one decode step reads (an estimate).
    Bytes,
}

/// The search's settings (`kiln compile --quality-budget … --budget-*`).
#[derive(Clone, Debug)]
pub struct BudgetOptions {
    /// `ppl+X%`.
    pub quality_budget: String,
    pub cost: BudgetCost,
    /// A step must cut the cost by at least this share (default 0.02 measured, 0 bytes).
    pub min_saving: Option<f64>,
    /// The text to measure on (default: the calibration's).
    pub text: Option<PathBuf>,
    /// Worker threads while measuring (0: one per core).
    pub threads: usize,
}

/// The configuration `--quality-budget` chooses for the model at `path`, as a build for `opts` whose
/// records hold the search and its measurements. `skip` gives the calibration file and the MLP form.
pub fn budgeted_build(
    skip: &PassOptions,
    budget: &BudgetOptions,
    opts: CompileOptions,
    m: &Model,
    path: &Path,
) -> Result<(Build, JointChoice)> {
    let qb = QualityBudget::parse(&budget.quality_budget).map_err(anyhow::Error::msg).context("--quality-budget")?;
    let min_saving = budget.min_saving.unwrap_or(match budget.cost {
        BudgetCost::Measured => 0.02,
        BudgetCost::Bytes => 0.0,
    });
    if !(0.0..1.0).contains(&min_saving) {
        bail!("--budget-min-saving must be in [0, 1), got {min_saving}");
    }
    let cpath =
        skip.calibration.as_ref().context("--quality-budget needs --calibration FILE (from `kiln calibrate`)")?;
    let calib = load_calibration(cpath, m, path)?;
    let text_path = budget.text.clone().unwrap_or_else(|| PathBuf::from(&calib.text.file));
    let text = read_text(&text_path).context("the budget is measured on the calibration text (--budget-text)")?;
    if budget.text.is_none() && blake3::hash(text.as_bytes()).to_hex().as_str() != calib.text.blake3 {
        bail!("{} changed since {} was measured on it; re-run `kiln calibrate`", text_path.display(), cpath.display());
    }
    let tokens = tokenize(m.tokenizer.as_ref(), &text, &text_path)?;
    let text_hash = blake3::hash(text.as_bytes()).to_hex().to_string();
    let chunk = calib.chunk.max(2);
    let c = &m.config;
    // Block pruning needs this machine's kernel table; without one that axis is not searched.
    let table = load_kernel_table().ok();
    // The MLP's CHESS form: `--chess-mlp`, else `act` (down's input; the least perplexity per sparsity
    // of the forms on SmolLM2, and the only one whose decode gets faster with sparsity there:
    // docs/quality.md). Its levels go higher than the attention inputs' for the same reason.
    let mlp_form = skip.chess_mlp.unwrap_or(ChessMlp::Act);
    let axes = Axes {
        skip: (0..=c.n_layers.saturating_sub(2)).collect(),
        chess: vec![0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7],
        attn: vec![0.0, 0.1, 0.2, 0.3, 0.4, 0.5],
        prune: if table.is_some() { vec![0.0, 0.05, 0.1, 0.2, 0.3, 0.5] } else { vec![0.0] },
        neurons: vec![0.0, 0.05, 0.1, 0.2, 0.3, 0.5],
        heads: (0..c.n_heads / c.n_kv_heads.max(1)).collect(),
    };
    let joint_build = |j: &Joint, opts: CompileOptions| {
        j.apply(Build {
            opts,
            prune: (j.prune > 0.0).then(|| kiln_passes::prune::Prune {
                method: kiln_passes::prune::PruneMethod::Magnitude,
                sparsity: j.prune,
                table: table.clone(),
                pattern: None,
                bitmap: None,
            }),
            calibration: Some(calib.clone()),
            chess_mlp: (j.chess > 0.0).then_some(mlp_form),
            chess_kernels: (j.chess > 0.0 || j.attn > 0.0).then(|| table.clone()).flatten(),
            ..Default::default()
        })
    };
    let all = CompileOptions { all_logits: true, ..opts.clone() };
    // Decode timing: a short prompt from the text, then 32 steps (the artifact is the one just measured).
    let prompt = &tokens[..tokens.len().min(8)];
    let mut bytes: Vec<(Joint, f64)> = Vec::new();
    // The dense model's backend, loaded once: every candidate is timed in pairs against it.
    let mut reference: Option<CompiledBackend> = None;
    // Per candidate, its graph is built once (the perplexity is asked for first, then the cost): the
    // cached artifact's directory, whether it was just compiled, and the byte estimate.
    let prepared: std::cell::RefCell<std::collections::HashMap<String, (PathBuf, bool, f64)>> = Default::default();
    let prepare = |j: &Joint| -> Result<(Build, PathBuf, bool, f64)> {
        let b = joint_build(j, all.clone());
        if let Some((dir, fresh, est)) = prepared.borrow().get(&format!("{j:?}")) {
            return Ok((b, dir.clone(), *fresh, *est));
        }
        let built = crate::artifact::build_graph(m, &b)?;
        let est = crate::budget::decode_bytes(&built.graph, &built.weights, j.chess, j.attn);
        let t = std::time::Instant::now();
        let (dir, fresh) = crate::artifact::cached_built(path, m, &b, &built)?;
        if fresh {
            eprintln!("[compiled {} in {:.1}s → {}]", m.name, t.elapsed().as_secs_f64(), dir.display());
        }
        prepared.borrow_mut().insert(format!("{j:?}"), (dir.clone(), fresh, est));
        Ok((b, dir, fresh, est))
    };
    let choice = crate::budget::search_joint(
        qb,
        &axes,
        min_saving,
        |j| {
            let (b, dir, fresh, est) = prepare(j)?;
            bytes.push((*j, est));
            match budget.cost {
                BudgetCost::Bytes => Ok(est),
                BudgetCost::Measured => {
                    let cap = prompt.len() + 40;
                    if reference.is_none() {
                        let dense = joint_build(&Joint::default(), all.clone());
                        reference = Some(compiled_backend(path, m, &dense, budget.threads, cap)?);
                    }
                    let dense = reference.as_mut().expect("just loaded");
                    let mut backend = load_cached(path, m, &b, &dir, fresh, budget.threads, cap)?;
                    let r = crate::budget::paired_decode_ratio(dense, &mut backend, prompt, 32, 7)?;
                    eprintln!("[budget: {} → decode CPU time {:.3}× dense]", j.describe(), r);
                    Ok(r)
                }
            }
        },
        |j| {
            let (b, dir, fresh, _) = prepare(j)?;
            // Measurements are remembered by artifact and text, so budgets share them.
            let key = format!("{}-{}-{chunk}", dir.file_name().unwrap_or_default().to_string_lossy(), &text_hash[..32]);
            let memo = crate::cache_dir().join("measurements").join(format!("{key}.txt"));
            let ppl = match std::fs::read_to_string(&memo).ok().and_then(|t| t.trim().parse::<f64>().ok()) {
                Some(ppl) => ppl,
                None => {
                    let mut backend = load_cached(path, m, &b, &dir, fresh, budget.threads, chunk)?;
                    let r = crate::eval::evaluate(&mut backend, &tokens, chunk, chunk, |_| {})?;
                    if let Some(d) = memo.parent() {
                        let _ = std::fs::create_dir_all(d)
                            .and_then(|_| std::fs::write(&memo, format!("{}\n", r.perplexity)));
                    }
                    r.perplexity
                }
            };
            eprintln!("[budget: {} → perplexity {ppl:.4}]", j.describe());
            Ok(ppl)
        },
    )?;
    eprintln!(
        "[budget {}: {}{} (calibration perplexity {:.4} ≤ {:.4}; decode cost ({}) {:.0}% of dense)]",
        choice.budget,
        choice.description,
        if choice.config.chess > 0.0 { format!(" (MLP form {})", mlp_form.name()) } else { String::new() },
        choice.perplexity,
        choice.limit,
        if budget.cost == BudgetCost::Measured { "measured" } else { "estimated bytes" },
        100.0 * choice.cost / choice.baseline_cost
    );
    let record = serde_json::json!({
        "quality_budget": choice,
        "search": "greedy coordinate steps over skip-layers (influence) × chess (MLP, form chess_mlp) × chess (attention inputs), per-layer thresholds × prune (magnitude) × structured-prune, \
                   most decode cost saved per unit of calibration perplexity added; a step is the smallest one up an axis saving min_saving",
        "chess_mlp": mlp_form.name(),
        "cost": match budget.cost {
            BudgetCost::Measured => "measured decode CPU time over the dense model's (median of 7 adjacent pairs of 32-step runs)",
            BudgetCost::Bytes => "estimated weight bytes per decode step",
        },
        "min_saving": min_saving,
        "estimated_bytes": bytes.iter().map(|(j, b)| serde_json::json!({"config": j, "bytes": b})).collect::<Vec<_>>(),
        "kernel_table": table.is_some(),
        "measured_on": {"file": text_path, "tokens": tokens.len(), "window": chunk, "stride": chunk},
    });
    let build = Build { records: vec![record], ..joint_build(&choice.config, opts) };
    Ok((build, choice))
}
