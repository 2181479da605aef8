//! The CLI side of measured quality: `kiln eval`, `kiln calibrate`, the layer-skipping options shared by
//! `compile`/`run`/`eval`, and `--quality-budget` for `compile`.

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressStyle};
use kiln::artifact::Build;
use kiln::budget::{BudgetChoice, QualityBudget};
use kiln::codegen::CompileOptions;
use kiln::frontend::tokenizer::Tokenizer;
use kiln::frontend::Model;
use kiln::passes::calibration::{Calibration, CalibrationText, CALIBRATION_FORMAT, CALIBRATION_VERSION};
use kiln::passes::skip_layers::{SkipLayers, SkipMethod};
use kiln::runtime::{Backend, CompiledBackend, InterpreterBackend};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::BackendKind;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SkipMethodArg {
    /// Keep evenly spaced blocks, always the first and the last.
    Even,
    /// Drop the blocks with the lowest block influence in --calibration.
    Influence,
    /// Drop the last blocks: the final norm and LM head read the intermediate state (static early exit).
    Top,
}

/// Layer skipping (lossy): the `skip-layers` pass.
#[derive(clap::Args, Clone, Debug)]
pub struct SkipArgs {
    /// Remove K decoder blocks (lossy: the block becomes identity on the residual stream and its KV cache
    /// is not allocated). Quality numbers: docs/quality.md.
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub skip_layers: usize,
    /// How --skip-layers chooses the blocks.
    #[arg(long, value_enum, value_name = "METHOD", default_value = "even")]
    pub skip_method: SkipMethodArg,
    /// A calibration file from `kiln calibrate` (needed by --skip-method influence and --quality-budget).
    #[arg(long, value_name = "FILE")]
    pub calibration: Option<PathBuf>,
}

impl SkipArgs {
    pub fn skip(&self) -> SkipLayers {
        let method = match self.skip_method {
            SkipMethodArg::Even => SkipMethod::Even,
            SkipMethodArg::Influence => SkipMethod::Influence,
            SkipMethodArg::Top => SkipMethod::Top,
        };
        SkipLayers { count: self.skip_layers, method }
    }

    fn is_set(&self) -> bool {
        self.skip_layers > 0
    }

    /// The build for `opts` with these options; checks them against the model.
    pub fn build(&self, opts: CompileOptions, model: &Model, model_path: &Path) -> Result<Build> {
        let calibration = match &self.calibration {
            Some(p) => Some(load_calibration(p, model, model_path)?),
            None => None,
        };
        if self.skip_method == SkipMethodArg::Influence && self.is_set() && calibration.is_none() {
            bail!("--skip-method influence needs --calibration FILE (make one with `kiln calibrate`)");
        }
        let n = model.config.n_layers;
        if self.skip_layers >= n {
            bail!("--skip-layers {} is not less than the model's {n} layers", self.skip_layers);
        }
        let build = Build { opts, skip: self.skip(), calibration, ..Default::default() };
        // Resolve the choice now, so errors name the option.
        kiln::artifact::build_graph(model, &build).context("--skip-layers")?;
        Ok(build)
    }
}

/// Loads and checks a calibration file; errors name it.
pub fn load_calibration(path: &Path, model: &Model, model_path: &Path) -> Result<Arc<Calibration>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read calibration file {}", path.display()))?;
    let c = Calibration::from_json(&text)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("calibration file {}", path.display()))?;
    if c.layers.len() != model.config.n_layers {
        bail!(
            "calibration file {} has {} layers but {} has {}",
            path.display(),
            c.layers.len(),
            model.name,
            model.config.n_layers
        );
    }
    if c.source_hash != kiln::artifact::source_hash(model_path)? {
        eprintln!("[warning: calibration file {} was measured on another model file ({})]", path.display(), c.model);
    }
    Ok(Arc::new(c))
}

fn read_text(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read text file {}", path.display()))?;
    if text.trim().is_empty() {
        bail!("text file {} is empty", path.display());
    }
    Ok(text)
}

fn tokenize(tok: Option<&Tokenizer>, text: &str, path: &Path) -> Result<Vec<u32>> {
    let tok = tok.context("the model has no tokenizer")?;
    let ids = tok.encode(text, true).with_context(|| format!("tokenizing {}", path.display()))?;
    if ids.len() < 2 {
        bail!("text file {} has {} token(s); at least 2 are needed", path.display(), ids.len());
    }
    Ok(ids)
}

fn bar(len: usize, msg: &str) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len} tokens {elapsed} (eta {eta})")
            .unwrap()
            .progress_chars("=> "),
    );
    bar.set_message(msg.to_string());
    bar
}

/// The compiled backend for `build` of the model at `path` (from the artifact cache), holding `capacity`
/// positions.
fn compiled(path: &Path, m: &Model, build: &Build, threads: usize, capacity: usize) -> Result<CompiledBackend> {
    let t = std::time::Instant::now();
    let (dir, fresh) = kiln::artifact::cached_build(path, m, build)?;
    let b = match CompiledBackend::load(&dir, threads, Some(capacity)) {
        Err(e) if !fresh => {
            eprintln!("[cached artifact unusable ({e}); recompiling]");
            kiln::artifact::evict(&dir)?;
            let (dir, _) = kiln::artifact::cached_build(path, m, build)?;
            CompiledBackend::load(&dir, threads, Some(capacity))?
        }
        other => other?,
    };
    if fresh {
        eprintln!("[compiled {} in {:.1}s → {}]", m.name, t.elapsed().as_secs_f64(), dir.display());
    }
    Ok(b)
}

#[derive(clap::Args)]
pub struct EvalArgs {
    /// A .gguf file, a Hugging Face model directory, or an artifact compiled with --all-logits.
    model: Option<PathBuf>,
    /// The text to score (e.g. data/eval.txt).
    #[arg(long, value_name = "FILE")]
    text: PathBuf,
    /// Tokens per forward pass.
    #[arg(long, default_value_t = 512)]
    window: usize,
    /// Tokens the window advances by (default: window/2); each token is scored once, with at least
    /// window − stride + 1 tokens of context after the first window.
    #[arg(long)]
    stride: Option<usize>,
    /// Worker threads for the compiled backend (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Which backend runs the model.
    #[arg(long, value_enum, default_value = "compiled")]
    backend: BackendKind,
    #[command(flatten)]
    skip: SkipArgs,
    /// Per-position early exit (interpreter only): skip the `top` or the `lower` blocks as --exit-schedule
    /// says. Scores the first --window tokens by teacher-forced decoding (one prefill up to the first
    /// schedule position, then one token per step).
    #[arg(long, value_enum, requires = "exit_schedule", conflicts_with = "skip_layers")]
    early_exit: Option<ExitModeArg>,
    /// POS:DEPTH,… — from token position POS on, positions run DEPTH blocks (depth must not increase).
    #[arg(long, value_delimiter = ',', value_name = "POS:DEPTH,…")]
    exit_schedule: Option<Vec<String>>,
    /// Print a JSON report.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ExitModeArg {
    /// Skip the top blocks; the final norm and LM head read the intermediate state (Sorted-LLaMA).
    Top,
    /// Skip the lower blocks; the embedding feeds the first block run (SkipDecode).
    Lower,
}

fn eval_early_exit(a: &EvalArgs, mode: ExitModeArg) -> Result<()> {
    use kiln::runtime::early_exit::{EarlyExitInterpreter, ExitMode, ExitSchedule};
    let path = crate::model_path(a.model.clone())?;
    let text = read_text(&a.text)?;
    if kiln::artifact::is_artifact(&path) {
        bail!("--early-exit runs on the interpreter and needs the model file, not an artifact");
    }
    let m = crate::load(&path)?;
    let n = m.config.n_layers;
    let mut points = Vec::new();
    for p in a.exit_schedule.as_deref().unwrap_or_default() {
        let parsed = p.split_once(':').and_then(|(a, b)| Some((a.trim().parse().ok()?, b.trim().parse().ok()?)));
        points.push(parsed.with_context(|| format!("--exit-schedule entry `{p}` is not POS:DEPTH"))?);
    }
    let first = points.first().map(|p| p.0).context("--exit-schedule needs at least one POS:DEPTH")?;
    let schedule = ExitSchedule::new(points, n).map_err(anyhow::Error::msg).context("--exit-schedule")?;
    let mode = match mode {
        ExitModeArg::Top => ExitMode::Top,
        ExitModeArg::Lower => ExitMode::Lower,
    };
    let build = Build::new(CompileOptions { all_logits: true, ..CompileOptions::default() });
    let full = kiln::artifact::build_graph(&m, &build)?.graph;
    let mut graphs = Vec::new();
    for d in 1..=n {
        let active = mode.active(n, d);
        let skipped: Vec<usize> = (0..n).filter(|l| !active.contains(l)).collect();
        graphs.push(kiln::passes::skip_layers::skip_blocks(&full, &skipped).map_err(anyhow::Error::msg)?);
    }
    let mut tokens = tokenize(m.tokenizer.as_ref(), &text, &a.text)?;
    tokens.truncate(a.window + 1);
    let mut backend = EarlyExitInterpreter::new(graphs, schedule, &m.weights, m.config.context_length)?;
    let pb = bar(tokens.len() - 1, "scoring");
    let report = kiln::eval::evaluate_stepwise(&mut backend, &tokens, first, |n| pb.set_position(n as u64))
        .with_context(|| format!("evaluating {}", a.text.display()))?;
    pb.finish_and_clear();
    let j = serde_json::json!({
        "model": m.name, "backend": backend.name(), "text": a.text, "early_exit": format!("{mode:?}").to_lowercase(),
        "exit_schedule": a.exit_schedule, "report": report,
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&j)?);
    } else {
        println!(
            "perplexity {:.4}  (mean NLL {:.5} over {} tokens, teacher-forced decoding, early exit {mode:?}; {:.1}s)",
            report.perplexity, report.mean_nll, report.scored, report.seconds
        );
    }
    Ok(())
}

pub fn eval(a: EvalArgs) -> Result<()> {
    if let Some(mode) = a.early_exit {
        return eval_early_exit(&a, mode);
    }
    let path = crate::model_path(a.model.clone())?;
    let text = read_text(&a.text)?;
    let stride = a.stride.unwrap_or((a.window / 2).max(1));
    if a.window == 0 || stride == 0 || stride > a.window {
        bail!("--stride {stride} must be between 1 and --window {}", a.window);
    }
    let mut interp_model = None;
    let (name, tokenizer, mut compiled_backend, build) = if kiln::artifact::is_artifact(&path) {
        if a.backend == BackendKind::Interpreter {
            bail!("{} is a compiled artifact; the interpreter backend needs the model file", path.display());
        }
        if a.skip.is_set() {
            bail!("--skip-layers applies when compiling a model; {} is compiled already", path.display());
        }
        let b = CompiledBackend::load(&path, a.threads, Some(a.window))?;
        (b.manifest().model_name.clone(), kiln::artifact::artifact_tokenizer(&path)?, Some(b), None)
    } else {
        let mut m = crate::load(&path)?;
        let build = a.skip.build(CompileOptions { all_logits: true, ..CompileOptions::default() }, &m, &path)?;
        let b = match a.backend {
            BackendKind::Compiled => Some(compiled(&path, &m, &build, a.threads, a.window)?),
            BackendKind::Interpreter => None,
        };
        let tok = m.tokenizer.take();
        let name = m.name.clone();
        interp_model = Some(m);
        (name, tok, b, Some(build))
    };
    let tokens = tokenize(tokenizer.as_ref(), &text, &a.text)?;
    let built;
    let mut interp;
    let backend: &mut dyn Backend = match (&mut compiled_backend, &interp_model) {
        (Some(b), _) => b,
        (None, Some(m)) => {
            built = kiln::artifact::build_graph(m, build.as_ref().expect("built for a model"))?;
            interp = InterpreterBackend::new(built.graph.clone(), &built.weights, m.config.context_length)?;
            crate::prepare_weights(&interp)?;
            &mut interp
        }
        (None, None) => unreachable!("an artifact or a model is loaded"),
    };
    let pb = bar(tokens.len() - 1, "scoring");
    let report = kiln::eval::evaluate(backend, &tokens, a.window, stride, |n| pb.set_position(n as u64))
        .with_context(|| format!("evaluating {}", a.text.display()))?;
    pb.finish_and_clear();
    if a.json {
        let j = serde_json::json!({
            "model": name,
            "backend": backend.name(),
            "text": a.text,
            "skip_layers": a.skip.skip_layers,
            "skip_method": a.skip.skip().method.name(),
            "report": report,
        });
        println!("{}", serde_json::to_string_pretty(&j)?);
    } else {
        println!(
            "perplexity {:.4}  (mean NLL {:.5} nats/token over {} tokens; window {}, stride {}, {} windows; {:.1}s, {})",
            report.perplexity,
            report.mean_nll,
            report.scored,
            report.window,
            report.stride,
            report.windows,
            report.seconds,
            backend.name()
        );
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct CalibrateArgs {
    /// A .gguf file or a Hugging Face model directory (default: the default model).
    model: Option<PathBuf>,
    /// The calibration text (e.g. data/calibration.txt; never the evaluation text).
    #[arg(long, value_name = "FILE")]
    text: PathBuf,
    /// Where to write the calibration file (JSON; schema in docs/calibration.md).
    #[arg(short, long, value_name = "FILE")]
    output: PathBuf,
    /// Tokens per forward pass (each chunk starts from an empty cache).
    #[arg(long, default_value_t = 512)]
    chunk: usize,
    /// Worker threads for the compiled backend (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Which backend runs the model (both give the same statistics within float tolerance).
    #[arg(long, value_enum, default_value = "compiled")]
    backend: BackendKind,
}

/// Measures a calibration file for the model at `path`.
pub fn calibrate_model(
    path: &Path,
    m: &Model,
    text_path: &Path,
    chunk: usize,
    threads: usize,
    backend_kind: BackendKind,
) -> Result<Calibration> {
    let text = read_text(text_path)?;
    if chunk < 2 {
        bail!("--chunk {chunk} must be at least 2");
    }
    let tokens = tokenize(m.tokenizer.as_ref(), &text, text_path)?;
    let build = Build {
        opts: CompileOptions { all_logits: true, ..CompileOptions::default() },
        expose_calibration: true,
        ..Default::default()
    };
    let built;
    let mut interp;
    let mut comp;
    let backend: &mut dyn Backend = match backend_kind {
        BackendKind::Compiled => {
            comp = compiled(path, m, &build, threads, chunk)?;
            &mut comp
        }
        BackendKind::Interpreter => {
            built = kiln::artifact::build_graph(m, &build)?;
            interp = InterpreterBackend::new(built.graph.clone(), &built.weights, m.config.context_length)?;
            crate::prepare_weights(&interp)?;
            &mut interp
        }
    };
    let pb = bar(tokens.len(), "calibrating");
    let measured = kiln::calibrate::measure(backend, &tokens, chunk, m.config.n_layers, |n| pb.set_position(n as u64))?;
    pb.finish_and_clear();
    Ok(Calibration {
        format: CALIBRATION_FORMAT.into(),
        version: CALIBRATION_VERSION,
        model: m.name.clone(),
        source_hash: kiln::artifact::source_hash(path)?,
        text: CalibrationText {
            file: text_path.display().to_string(),
            blake3: blake3::hash(text.as_bytes()).to_hex().to_string(),
            tokens: tokens.len(),
        },
        chunk,
        hidden_size: m.config.hidden_size,
        intermediate_size: m.config.intermediate_size,
        mean_nll: measured.mean_nll,
        perplexity: measured.mean_nll.exp(),
        layers: measured.layers,
    })
}

pub fn calibrate(a: CalibrateArgs) -> Result<()> {
    let path = crate::model_path(a.model.clone())?;
    if kiln::artifact::is_artifact(&path) {
        bail!("{} is a compiled artifact; calibration needs the model file", path.display());
    }
    let m = crate::load(&path)?;
    let c = calibrate_model(&path, &m, &a.text, a.chunk, a.threads, a.backend)?;
    std::fs::write(&a.output, c.to_json()).with_context(|| format!("writing {}", a.output.display()))?;
    let mut order: Vec<usize> = (0..c.layers.len()).collect();
    order.sort_by(|&x, &y| c.layers[x].block_influence.total_cmp(&c.layers[y].block_influence));
    eprintln!(
        "calibrated {} on {} ({} tokens, perplexity {:.3}) → {}",
        m.name,
        a.text.display(),
        c.text.tokens,
        c.perplexity,
        a.output.display()
    );
    eprintln!("block influence, lowest first:");
    for &l in order.iter().take(10) {
        eprintln!("  layer {l:>3}  {:.5}", c.layers[l].block_influence);
    }
    Ok(())
}

/// `--quality-budget` for `kiln compile`.
#[derive(clap::Args, Clone, Debug)]
pub struct BudgetArgs {
    /// Choose the most aggressive layer skipping whose perplexity on the calibration text stays within
    /// the budget, e.g. ppl+10% (needs --calibration; the choice and the numbers go into the manifest).
    #[arg(long, value_name = "ppl+X%", conflicts_with = "skip_layers")]
    pub quality_budget: Option<String>,
    /// Text to measure the budget on (default: the text the calibration file was measured on).
    #[arg(long, value_name = "FILE")]
    pub budget_text: Option<PathBuf>,
    /// Worker threads while measuring candidates (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub budget_threads: usize,
}

/// The build `kiln compile` makes: the skip options, or the configuration `--quality-budget` chooses.
pub fn compile_build(
    skip: &SkipArgs,
    budget: &BudgetArgs,
    opts: CompileOptions,
    m: &Model,
    path: &Path,
) -> Result<(Build, Option<BudgetChoice>)> {
    let Some(spec) = &budget.quality_budget else { return Ok((skip.build(opts, m, path)?, None)) };
    let qb = QualityBudget::parse(spec).map_err(anyhow::Error::msg).context("--quality-budget")?;
    let cpath =
        skip.calibration.as_ref().context("--quality-budget needs --calibration FILE (from `kiln calibrate`)")?;
    let calib = load_calibration(cpath, m, path)?;
    let text_path = budget.budget_text.clone().unwrap_or_else(|| PathBuf::from(&calib.text.file));
    let text = read_text(&text_path).context("the budget is measured on the calibration text (--budget-text)")?;
    if budget.budget_text.is_none() && blake3::hash(text.as_bytes()).to_hex().as_str() != calib.text.blake3 {
        bail!("{} changed since {} was measured on it; re-run `kiln calibrate`", text_path.display(), cpath.display());
    }
    let tokens = tokenize(m.tokenizer.as_ref(), &text, &text_path)?;
    let text_hash = blake3::hash(text.as_bytes()).to_hex().to_string();
    let chunk = calib.chunk.max(2);
    let methods = [SkipMethod::Even, SkipMethod::Influence, SkipMethod::Top];
    let max = m.config.n_layers.saturating_sub(2);
    let choice = kiln::budget::search(qb, &methods, max, |s| {
        let b = Build {
            opts: CompileOptions { all_logits: true, ..opts.clone() },
            skip: s,
            calibration: Some(calib.clone()),
            ..Default::default()
        };
        // Measurements are remembered by artifact and text, so budgets share them.
        let (dir, _) = kiln::artifact::cached_build(path, m, &b)?;
        let key = format!("{}-{}-{chunk}", dir.file_name().unwrap_or_default().to_string_lossy(), &text_hash[..32]);
        let memo = kiln::cache_dir().join("measurements").join(format!("{key}.txt"));
        let ppl = match std::fs::read_to_string(&memo).ok().and_then(|t| t.trim().parse::<f64>().ok()) {
            Some(ppl) => ppl,
            None => {
                let mut backend = compiled(path, m, &b, budget.budget_threads, chunk)?;
                let r = kiln::eval::evaluate(&mut backend, &tokens, chunk, chunk, |_| {})?;
                if let Some(d) = memo.parent() {
                    let _ =
                        std::fs::create_dir_all(d).and_then(|_| std::fs::write(&memo, format!("{}\n", r.perplexity)));
                }
                r.perplexity
            }
        };
        eprintln!("[budget: skip {} ({}) → perplexity {:.4}]", s.count, s.method.name(), ppl);
        Ok(ppl)
    })?;
    let record = serde_json::json!({
        "quality_budget": choice,
        "measured_on": {"file": text_path, "tokens": tokens.len(), "window": chunk, "stride": chunk},
    });
    let build =
        Build { opts, skip: choice.skip(), calibration: Some(calib), records: vec![record], ..Default::default() };
    Ok((build, Some(choice)))
}
