//! The CLI side of measured quality: `kiln eval`, `kiln calibrate`, the layer-skipping options shared by
//! `compile`/`run`/`eval`, and `--quality-budget` for `compile`.

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressStyle};
use kiln::artifact::Build;
use kiln::budget::JointChoice;
use kiln::codegen::CompileOptions;
use kiln::frontend::Model;
use kiln::options::PassOptions;
use kiln::quality::{compiled_backend as compiled, read_text, tokenize};
use kiln::runtime::{Backend, CompiledBackend, InterpreterBackend};
use std::path::{Path, PathBuf};

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

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PruneMethodArg {
    Magnitude,
    Wanda,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChessScopeArg {
    Mlp,
    Attn,
    All,
}

/// `--chess-mlp`: which MLP activation the thresholds apply to (`kiln::passes::chess::ChessMlp`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ChessMlpArg {
    Gate,
    Act,
    Input,
    Io,
}

/// `--chess-thresholds`: one threshold per channel (CHESS) or per layer (TEAL).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ChessThresholdsArg {
    Channel,
    Layer,
}

/// `kiln bench`.
#[derive(clap::Args, Clone, Debug)]
pub struct BenchArgs {
    /// A .gguf file or a Hugging Face model directory (default: the default model): whose linear shapes.
    pub model: Option<PathBuf>,
    /// Time the block-sparse linear kernel against the dense one and cache the break-even table.
    #[arg(long)]
    pub kernels: bool,
    /// Milliseconds per timing run (each ratio is the best of 3 paired runs).
    #[arg(long, default_value_t = 30)]
    pub ms: u64,
}

pub fn bench(a: BenchArgs) -> Result<()> {
    if !a.kernels {
        bail!("nothing to measure: pass --kernels");
    }
    let path = crate::model_path(a.model.clone())?;
    let m = crate::load(&path)?;
    let table = kiln::kernel_table::measure_kernel_table(&m, a.ms, &mut |l| println!("{l}"))?;
    let p = kiln::kernel_table::save_kernel_table(&table)?;
    println!("kernel table → {}", p.display());
    Ok(())
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
    /// Activation sparsity (lossy, CHESS): drop this share of the MLP's gate channels per token, by
    /// per-channel thresholds from --calibration; up and down then skip the dropped channels. In [0, 1).
    #[arg(long, value_name = "S")]
    pub chess_sparsity: Option<f64>,
    /// Which activations --chess-sparsity thresholds: the MLP gate (`mlp`), the inputs of the attention
    /// projections (`attn`: Q/K/V's normed input and the output projection's input), or both (`all`).
    #[arg(long, value_enum, value_name = "SCOPE", default_value = "mlp", requires = "chess_sparsity")]
    pub chess_scope: ChessScopeArg,
    /// Which MLP activation --chess-sparsity thresholds: `gate` (CHESS: silu(gate); up masked, down
    /// input-sparse), `act` (down's input silu(gate)·up), `input` (gate/up's input x), `io` (input and act).
    /// Default: gate, or io with --rsparse-rank.
    #[arg(long, value_enum, value_name = "FORM", requires = "chess_sparsity")]
    pub chess_mlp: Option<ChessMlpArg>,
    /// One calibrated threshold per channel (`channel`, CHESS) or per layer and activation (`layer`,
    /// the quantile of all channels pooled, TEAL-style).
    #[arg(long, value_enum, value_name = "KIND", default_value = "channel", requires = "chess_sparsity")]
    pub chess_thresholds: ChessThresholdsArg,
    /// With `--chess-scope all`: the target sparsity of the attention projections' inputs, when it
    /// differs from `--chess-sparsity` (which then applies to the MLP). `--quality-budget` chooses the
    /// two separately.
    #[arg(long, value_name = "S", requires = "chess_sparsity")]
    pub chess_attn_sparsity: Option<f64>,
    /// R-Sparse: add to each projection reading a thresholded input the dropped channels' contribution
    /// through a rank-R truncated SVD of its weight (attention projections; in the MLP with the `io`,
    /// `act` or `input` form, which --rsparse-rank makes the default). R ≥ 1; above a weight's
    /// min(rows, columns) it is that weight's full rank.
    #[arg(long, value_name = "R", requires = "chess_sparsity")]
    pub rsparse_rank: Option<usize>,
    /// Block-sparse weight pruning (lossy): drop this share of the 32-element blocks of every row of the
    /// blocks' linear weights; the dense or block-sparse kernel is chosen per layer and phase from the
    /// break-even densities `kiln bench --kernels` measured on this machine. In [0, 1).
    #[arg(long, value_name = "S")]
    pub prune_sparsity: Option<f64>,
    /// Structured pruning (lossy): `neurons=S,heads=N` removes the share S of every block's MLP neurons
    /// and N query heads from every KV group, by calibrated importance (needs --calibration); the
    /// weights shrink physically. E.g. `--structured-prune neurons=0.25,heads=1`.
    #[arg(long, value_name = "neurons=S,heads=N")]
    pub structured_prune: Option<String>,
    /// How --prune-sparsity / --prune-pattern rank weights: magnitude, or Wanda (|W|·activation, needs
    /// --calibration).
    #[arg(long, value_enum, default_value = "magnitude")]
    pub prune_method: PruneMethodArg,
    /// Weight pruning pattern (lossy): `block32` (the default; the share is --prune-sparsity) or `N:M`
    /// with M = 4 or 8 (`2:4` keeps 2 of every 4 consecutive weights of a row: 50%), into the compact
    /// N:M form with its generated kernels; per layer the N:M kernel or the dense layout is chosen from
    /// `kiln bench --kernels`' measurements. E.g. `--prune-pattern 2:4`. `unstructured` (any elements)
    /// or `1x8` (runs of 8 consecutive weights) drop --prune-sparsity of every row into the bitmap form.
    #[arg(long, value_name = "block32|N:M|unstructured|1x8")]
    pub prune_pattern: Option<String>,
    /// FlexPrefill sparse attention for long prompts (lossy): `gamma=0.9,tau=0.1,block=64,min-len=1024`
    /// (any subset; bare `--flex-prefill` takes these defaults). Prefill steps of at least min-len tokens
    /// attend per head to the key blocks holding γ of the attention mass; shorter steps and decode are
    /// dense. Quality numbers: docs/quality.md.
    #[arg(long, value_name = "SPEC", num_args = 0..=1, default_missing_value = "")]
    pub flex_prefill: Option<String>,
    /// CoreInfer (lossy, per prompt, no calibration): `alpha=0.4,beta=0.2` (either may be left out;
    /// bare `--coreinfer` takes these). The first step (prefill) runs the dense MLP and keeps, per block,
    /// the neurons in a token's top α share of |silu(gate)·up| for at least a β share of the prompt's
    /// tokens; later steps (decode) run the MLP on those neurons only. α in (0, 1], β in [0, 1].
    /// `gather=1` copies the core gate/up rows into a smaller dense matrix once per prompt instead of
    /// masking the full one (same results). `kiln eval --prompt-len P` scores it meaningfully. See
    /// docs/sparsity.md.
    #[arg(long, value_name = "alpha=A,beta=B,gather=0|1", num_args = 0..=1, default_missing_value = "")]
    pub coreinfer: Option<String>,
    /// A calibration file from `kiln calibrate` (needed by --skip-method influence, --chess-sparsity and
    /// --quality-budget).
    #[arg(long, value_name = "FILE")]
    pub calibration: Option<PathBuf>,
}

impl SkipArgs {
    /// The options as the driver takes them.
    pub fn options(&self) -> PassOptions {
        use kiln::passes::chess::{ChessMlp, ChessScope};
        use kiln::passes::skip_layers::SkipMethod;
        PassOptions {
            skip_layers: self.skip_layers,
            skip_method: match self.skip_method {
                SkipMethodArg::Even => SkipMethod::Even,
                SkipMethodArg::Influence => SkipMethod::Influence,
                SkipMethodArg::Top => SkipMethod::Top,
            },
            chess_sparsity: self.chess_sparsity,
            chess_scope: match self.chess_scope {
                ChessScopeArg::Mlp => ChessScope::Mlp,
                ChessScopeArg::Attn => ChessScope::Attn,
                ChessScopeArg::All => ChessScope::All,
            },
            chess_mlp: self.chess_mlp.map(|m| match m {
                ChessMlpArg::Gate => ChessMlp::Gate,
                ChessMlpArg::Act => ChessMlp::Act,
                ChessMlpArg::Input => ChessMlp::Input,
                ChessMlpArg::Io => ChessMlp::Io,
            }),
            chess_per_layer: self.chess_thresholds == ChessThresholdsArg::Layer,
            chess_attn_sparsity: self.chess_attn_sparsity,
            rsparse_rank: self.rsparse_rank,
            prune_sparsity: self.prune_sparsity,
            structured_prune: self.structured_prune.clone(),
            prune_method: match self.prune_method {
                PruneMethodArg::Magnitude => kiln::passes::prune::PruneMethod::Magnitude,
                PruneMethodArg::Wanda => kiln::passes::prune::PruneMethod::Wanda,
            },
            prune_pattern: self.prune_pattern.clone(),
            flex_prefill: self.flex_prefill.clone(),
            coreinfer: self.coreinfer.clone(),
            calibration: self.calibration.clone(),
        }
    }

    pub fn is_set(&self) -> bool {
        self.options().is_set()
    }

    /// The build for `opts` with these options; checks them against the model.
    pub fn build(&self, opts: CompileOptions, model: &Model, model_path: &Path) -> Result<Build> {
        self.options().build(opts, model, model_path)
    }
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
    /// Each window's first P tokens are a prompt run as a step of their own and not scored; the rest
    /// of the window is scored by a second step (with --coreinfer: the prompt chooses the core set, the
    /// scored part decodes with it). Needs P < --window and --stride ≤ window − P (default stride:
    /// min(window/2, window − P)). Targets 1..=P of the text are never scored: compare runs with the
    /// same P.
    #[arg(long, value_name = "P", default_value_t = 0)]
    prompt_len: usize,
    /// Worker threads for the compiled backend (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Which backend runs the model.
    #[arg(long, value_enum, default_value = "compiled")]
    backend: BackendKind,
    #[command(flatten)]
    skip: SkipArgs,
    /// With --early-exit, `kiln eval` scores the first --window tokens by teacher-forced decoding (one
    /// prefill up to the first schedule position, then one token per step).
    #[command(flatten)]
    exit: ExitArgs,
    /// Print a JSON report.
    #[arg(long)]
    json: bool,
}

/// Per-position early exit (SkipDecode, or truncation of the top blocks).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ExitArgs {
    /// Per-position early exit: skip the `top` or the `lower` blocks as --exit-schedule says (compiled
    /// code skips the blocks' launches; the interpreter runs per-depth graphs).
    #[arg(long, value_enum, requires = "exit_schedule", conflicts_with = "skip_layers")]
    pub early_exit: Option<ExitModeArg>,
    /// POS:DEPTH,… — from token position POS on, positions run DEPTH blocks (depth must not increase).
    #[arg(long, value_delimiter = ',', value_name = "POS:DEPTH,…")]
    pub exit_schedule: Option<Vec<String>>,
}

impl ExitArgs {
    /// The mode and the checked schedule for a model of `n` blocks, or `None` without --early-exit.
    pub fn schedule(
        &self,
        n: usize,
    ) -> Result<Option<(kiln::runtime::early_exit::ExitMode, kiln::runtime::early_exit::ExitSchedule)>> {
        use kiln::runtime::early_exit::{ExitMode, ExitSchedule};
        let Some(mode) = self.early_exit else { return Ok(None) };
        let mut points = Vec::new();
        for p in self.exit_schedule.as_deref().unwrap_or_default() {
            let parsed = p.split_once(':').and_then(|(a, b)| Some((a.trim().parse().ok()?, b.trim().parse().ok()?)));
            points.push(parsed.with_context(|| format!("--exit-schedule entry `{p}` is not POS:DEPTH"))?);
        }
        if points.is_empty() {
            bail!("--exit-schedule needs at least one POS:DEPTH");
        }
        let schedule = ExitSchedule::new(points, n).map_err(anyhow::Error::msg).context("--exit-schedule")?;
        let mode = match mode {
            ExitModeArg::Top => ExitMode::Top,
            ExitModeArg::Lower => ExitMode::Lower,
        };
        Ok(Some((mode, schedule)))
    }

    /// The checked schedule as an artifact records it.
    pub fn spec(&self, n: usize) -> Result<Option<kiln::ir::program::EarlyExitSpec>> {
        Ok(self.schedule(n)?.map(|(mode, s)| kiln::ir::program::EarlyExitSpec {
            mode: mode.name().to_string(),
            schedule: s.points().to_vec(),
        }))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ExitModeArg {
    /// Skip the top blocks; the final norm and LM head read the intermediate state (Sorted-LLaMA).
    Top,
    /// Skip the lower blocks; the embedding feeds the first block run (SkipDecode).
    Lower,
}

fn eval_early_exit(a: &EvalArgs) -> Result<()> {
    use kiln::runtime::early_exit::EarlyExitInterpreter;
    let path = crate::model_path(a.model.clone())?;
    let text = read_text(&a.text)?;
    let artifact = kiln::artifact::is_artifact(&path);
    if artifact && a.backend == BackendKind::Interpreter {
        bail!("the interpreter needs the model file, not an artifact");
    }
    let mut loaded = None;
    let (m, n, tok) = if artifact {
        let b = CompiledBackend::load(&path, a.threads, Some(a.window + 1))?;
        let n = b.blocks();
        loaded = Some(b);
        (None, n, kiln::artifact::artifact_tokenizer(&path)?)
    } else {
        let mut m = crate::load(&path)?;
        let n = m.config.n_layers;
        let tok = m.tokenizer.take();
        (Some(m), n, tok)
    };
    let (mode, schedule) = a.exit.schedule(n)?.expect("called with --early-exit");
    let first = schedule.first_position().expect("schedules have a point");
    let mut tokens = tokenize(tok.as_ref(), &text, &a.text)?;
    tokens.truncate(a.window + 1);
    let build = Build::new(CompileOptions { all_logits: true, ..CompileOptions::default() });
    let mut interp;
    let mut comp;
    let backend: &mut dyn Backend = match (&m, a.backend) {
        (Some(m), BackendKind::Interpreter) => {
            let full = kiln::artifact::build_graph(m, &build)?.graph;
            let mut graphs = Vec::new();
            for d in 1..=n {
                let active = mode.active(n, d);
                let skipped: Vec<usize> = (0..n).filter(|l| !active.contains(l)).collect();
                graphs.push(kiln::passes::skip_layers::skip_blocks(&full, &skipped).map_err(anyhow::Error::msg)?);
            }
            interp = EarlyExitInterpreter::new(graphs, schedule, &m.weights, m.config.context_length)?;
            &mut interp
        }
        (Some(m), BackendKind::Compiled) => {
            comp = compiled(&path, m, &build, a.threads, tokens.len())?;
            comp.set_early_exit(mode, schedule)?;
            &mut comp
        }
        (None, _) => {
            comp = loaded.take().expect("loaded above");
            comp.set_early_exit(mode, schedule)?;
            &mut comp
        }
    };
    let pb = bar(tokens.len() - 1, "scoring");
    let report = kiln::eval::evaluate_stepwise(backend, &tokens, first, |n| pb.set_position(n as u64))
        .with_context(|| format!("evaluating {}", a.text.display()))?;
    pb.finish_and_clear();
    let j = serde_json::json!({
        "model": m.as_ref().map_or_else(|| path.display().to_string(), |m| m.name.clone()), "backend": backend.name(),
        "text": a.text, "early_exit": mode.name(),
        "exit_schedule": a.exit.exit_schedule, "report": report,
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
    if a.exit.early_exit.is_some() && a.prompt_len > 0 {
        bail!("--prompt-len does not apply with --early-exit (which scores by teacher-forced decoding)");
    }
    if a.exit.early_exit.is_some() {
        return eval_early_exit(&a);
    }
    let path = crate::model_path(a.model.clone())?;
    let text = read_text(&a.text)?;
    if a.prompt_len >= a.window {
        bail!("--prompt-len {} must be less than --window {}", a.prompt_len, a.window);
    }
    let stride = a.stride.unwrap_or((a.window / 2).min(a.window - a.prompt_len).max(1));
    if a.window == 0 || stride == 0 || stride > a.window {
        bail!("--stride {stride} must be between 1 and --window {}", a.window);
    }
    if stride > a.window - a.prompt_len {
        bail!(
            "--stride {stride} must be at most --window − --prompt-len = {} (else some tokens are never scored)",
            a.window - a.prompt_len
        );
    }
    let mut interp_model = None;
    let (name, tokenizer, mut compiled_backend, build) = if kiln::artifact::is_artifact(&path) {
        if a.backend == BackendKind::Interpreter {
            bail!("{} is a compiled artifact; the interpreter backend needs the model file", path.display());
        }
        if a.skip.is_set() {
            bail!(
                "--skip-layers/--chess-sparsity/--prune-sparsity/--structured-prune/--coreinfer apply when compiling a model; {} is compiled already",
                path.display()
            );
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
    let report =
        kiln::eval::evaluate_prompted(backend, &tokens, a.window, stride, a.prompt_len, |n| pb.set_position(n as u64))
            .with_context(|| format!("evaluating {}", a.text.display()))?;
    pb.finish_and_clear();
    if a.json {
        let mut j = serde_json::json!({
            "model": name,
            "backend": backend.name(),
            "text": a.text,
        });
        if let (Some(o), serde_json::Value::Object(fields)) = (j.as_object_mut(), a.skip.options().describe()) {
            o.extend(fields);
            o.insert("report".into(), serde_json::to_value(&report)?);
        }
        println!("{}", serde_json::to_string_pretty(&j)?);
    } else {
        println!(
            "perplexity {:.4}  (mean NLL {:.5} nats/token over {} tokens; window {}, stride {}{}, {} windows; {:.1}s, {})",
            report.perplexity,
            report.mean_nll,
            report.scored,
            report.window,
            report.stride,
            if report.prompt > 0 { format!(", prompt {} unscored", report.prompt) } else { String::new() },
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

pub fn calibrate(a: CalibrateArgs) -> Result<()> {
    let path = crate::model_path(a.model.clone())?;
    if kiln::artifact::is_artifact(&path) {
        bail!("{} is a compiled artifact; calibration needs the model file", path.display());
    }
    let m = crate::load(&path)?;
    let pb = bar(0, "calibrating");
    let backend = match a.backend {
        BackendKind::Compiled => kiln::quality::BackendKind::Compiled,
        BackendKind::Interpreter => kiln::quality::BackendKind::Interpreter,
    };
    let c = kiln::quality::calibrate_model(&path, &m, &a.text, a.chunk, a.threads, backend, |n, total| {
        pb.set_length(total as u64);
        pb.set_position(n as u64)
    })?;
    pb.finish_and_clear();
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
    /// Search layer skipping × CHESS (MLP, attention inputs) × block pruning (with a kernel table) ×
    /// structured pruning for the configuration with the least decode cost (--budget-cost) whose
    /// perplexity on the calibration text stays within the budget, e.g. ppl+10% (greedy steps; needs
    /// --calibration; the choice, the path and every measurement go into the manifest).
    #[arg(long, value_name = "ppl+X%", conflicts_with = "skip_layers")]
    pub quality_budget: Option<String>,
    /// What the budget search minimises: `measured` = each candidate's decode CPU time on this machine
    /// over the dense model's, timed in 7 adjacent pairs of 32-step runs (median ratio; with
    /// --budget-threads; use --budget-threads 1 on a busy machine), `bytes` =
    /// the weight bytes one decode step reads (an estimate: deterministic, but blind to kernel
    /// efficiency and launch counts).
    #[arg(long, value_enum, default_value_t = BudgetCost::Measured)]
    pub budget_cost: BudgetCost,
    /// A step must cut the cost by at least this share to be taken (default 0.02 for `measured`, a
    /// margin over timing noise; 0 for `bytes`).
    #[arg(long, value_name = "SHARE")]
    pub budget_min_saving: Option<f64>,
    /// Text to measure the budget on (default: the text the calibration file was measured on).
    #[arg(long, value_name = "FILE")]
    pub budget_text: Option<PathBuf>,
    /// Worker threads while measuring candidates (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub budget_threads: usize,
}

/// The cost `--quality-budget` minimises.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BudgetCost {
    Measured,
    Bytes,
}

/// The build `kiln compile` makes: the skip options, or the configuration `--quality-budget` chooses.
pub fn compile_build(
    skip: &SkipArgs,
    budget: &BudgetArgs,
    opts: CompileOptions,
    m: &Model,
    path: &Path,
) -> Result<(Build, Option<JointChoice>)> {
    let Some(spec) = &budget.quality_budget else { return Ok((skip.build(opts, m, path)?, None)) };
    let options = kiln::budgeted::BudgetOptions {
        quality_budget: spec.clone(),
        cost: match budget.budget_cost {
            BudgetCost::Measured => kiln::budgeted::BudgetCost::Measured,
            BudgetCost::Bytes => kiln::budgeted::BudgetCost::Bytes,
        },
        min_saving: budget.budget_min_saving,
        text: budget.budget_text.clone(),
        threads: budget.budget_threads,
    };
    let (build, choice) = kiln::budgeted::budgeted_build(&skip.options(), &options, opts, m, path)?;
    Ok((build, Some(choice)))
}
