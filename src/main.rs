//! The `kiln` command line.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use kiln::codegen::CompileOptions;
use kiln::frontend::tokenizer::ChatMessage;
use kiln::frontend::Model;
use kiln::runtime::{Backend, InterpreterBackend, Sampler, SamplingParams};
use std::io::Write;
use std::path::{Path, PathBuf};

mod quality_cli;
mod tp_cli;

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Kiln: compile and run transformer models (GGUF, Hugging Face safetensors)",
    long_about = "Kiln imports a Llama-family model (GGUF or a Hugging Face directory with config.json and \
safetensors), turns it into a typed tensor graph, and runs it.\n\nWithout a MODEL argument the default \
model is used: $KILN_MODEL, else SmolLM2-135M-Instruct (Q4_1 GGUF) in the cache, fetched by scripts/setup.sh."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Summarise a model: architecture, sizes, parameter count, weight dtypes, tokenizer.
    Inspect {
        /// A .gguf file or a Hugging Face model directory (default: the default model).
        model: Option<PathBuf>,
        /// Print a machine-readable JSON report instead of text.
        #[arg(long)]
        json: bool,
        /// Also list every tensor with its dtype and shape.
        #[arg(long)]
        tensors: bool,
    },
    /// Generate text from a prompt, streaming tokens as they come.
    Run(RunArgs),
    /// Compile a model to a native artifact directory (manifest, kernel library, weights, tokenizer).
    Compile(CompileArgs),
    /// Perplexity of a model on a text (sliding window), e.g. `kiln eval --text data/eval.txt`.
    Eval(quality_cli::EvalArgs),
    /// Measure per-layer statistics (block influence, activation magnitudes) on a calibration text.
    Calibrate(quality_cli::CalibrateArgs),
    /// Measure kernels on this machine: `--kernels` times the block-sparse linear against the dense one
    /// for the model's linear shapes and caches the break-even densities `--prune-sparsity` selects with.
    Bench(quality_cli::BenchArgs),
}

#[derive(clap::Args)]
struct CompileArgs {
    /// A .gguf file or a Hugging Face model directory (default: the default model).
    model: Option<PathBuf>,
    /// Output directory (replaced if it exists).
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Optimisation level of the generated code (0-3).
    #[arg(short = 'O', long = "opt-level", default_value_t = 3, value_parser = clap::value_parser!(u8).range(0..=3))]
    opt_level: u8,
    /// Code generation target: `cpu` (this machine, every feature it has) or TRIPLE[:CPU] — object code for
    /// any LLVM target with --emit obj (e.g. aarch64-unknown-linux-gnu:cortex-a76), libraries for x86-64
    /// levels with --emit lib (e.g. x86_64-unknown-linux-gnu:x86-64-v3).
    #[arg(long, default_value = "cpu")]
    target: String,
    /// Graph passes to run before code generation, comma separated, instead of the default pipeline
    /// (lift,cse,dce); `none` runs no graph pass (e.g. --passes decompose --emit ir).
    #[arg(long, value_delimiter = ',')]
    passes: Vec<String>,
    /// Print a compiler stage instead of (or besides, with -o) writing the artifact; `lib`/`obj` write a
    /// library for embedding into -o instead (see docs/embedding.md).
    #[arg(long, value_enum)]
    emit: Option<CompileEmit>,
    /// Compute logits for every prompt position (for evaluation), not only the last.
    #[arg(long)]
    all_logits: bool,
    #[command(flatten)]
    skip: quality_cli::SkipArgs,
    #[command(flatten)]
    budget: quality_cli::BudgetArgs,
    /// With --early-exit, the artifact runs the schedule by default (recorded in its manifest).
    #[command(flatten)]
    exit: quality_cli::ExitArgs,
    /// Stop the graph pipeline after this stage (with --emit ir: the graph as that stage left it).
    #[arg(long, value_name = "STAGE")]
    stop_after: Option<String>,
    /// Print, per graph pass, what it changed, how long it took and why it decided what it did.
    #[arg(long)]
    explain: bool,
    /// Print a JSON report.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum CompileEmit {
    /// The IR graph that is compiled.
    Ir,
    /// The lowered program: buffers and kernel launches (JSON).
    Program,
    /// The MLIR of the fused elementwise kernels (linalg on memrefs), before lowering to LLVM.
    Mlir,
    /// The generated LLVM IR, optimised.
    Llvm,
    /// The generated machine code, as assembly.
    Asm,
    /// A C library for embedding: libkiln_model.a/.so, kiln_model.h, weights, manifest (into -o).
    Lib,
    /// The model's object code for linking with a libkiln_capi built for the target (into -o).
    Obj,
}

#[derive(Clone, Copy, ValueEnum)]
enum Emit {
    /// The IR graph in Kiln's canonical text form.
    Ir,
    /// The IR graph as Graphviz DOT.
    Dot,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BackendKind {
    /// Native code generated by Kiln for this CPU (compiled once, then cached).
    Compiled,
    /// The reference interpreter (slow, exact: the oracle).
    Interpreter,
}

#[derive(clap::Args)]
struct RunArgs {
    /// A .gguf file, a Hugging Face model directory, or an artifact from `kiln compile` (default: the default model).
    model: Option<PathBuf>,
    /// Text to continue (or, with --chat, the user's message).
    #[arg(short, long, conflicts_with = "prompt_ids")]
    prompt: Option<String>,
    /// Token ids to continue, comma separated, instead of --prompt.
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    chat: bool,
    /// Maximum number of tokens to generate.
    #[arg(short = 'n', long, default_value_t = 64)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Keep only the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling mass (1: all).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Do not stop at the end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// Print a stage instead of running: the IR text or a DOT graph.
    #[arg(long, value_enum)]
    emit: Option<Emit>,
    /// Which backend runs the graph.
    #[arg(long, value_enum, default_value = "compiled")]
    backend: BackendKind,
    /// Worker threads for the compiled backend (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    #[command(flatten)]
    skip: quality_cli::SkipArgs,
    #[command(flatten)]
    exit: quality_cli::ExitArgs,
    /// Print a JSON report (ids, text, timings) instead of streaming text.
    #[arg(long)]
    json: bool,
    /// Tensor parallelism: split the model over N ranks (MPI processes; `kiln` starts itself under
    /// `mpirun -np N` unless mpirun started it). Rank 0 prints.
    #[arg(long, default_value_t = 1, value_name = "N")]
    tp: usize,
    /// With --tp: how ranks communicate — `mpi` (OpenMPI, CPU) or `nccl` (GPUs through CUDA/NCCL; MPI
    /// still starts the ranks and hands out the NCCL id).
    #[arg(long, value_enum, default_value = "mpi")]
    comm: tp_cli::CommKind,
    /// With --tp: keep AllReduce → add → RMSNorm unfused (no fuse-allreduce-rmsnorm).
    #[arg(long)]
    no_fuse: bool,
    /// Write the logits each generated token was chosen from to FILE (JSON: one array per token).
    #[arg(long, value_name = "FILE")]
    logits_out: Option<PathBuf>,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Inspect { model, json, tensors } => inspect(model, json, tensors),
        Cmd::Run(args) => run(args),
        Cmd::Compile(args) => compile(args),
        Cmd::Eval(args) => quality_cli::eval(args),
        Cmd::Calibrate(args) => quality_cli::calibrate(args),
        Cmd::Bench(args) => quality_cli::bench(args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn model_path(p: Option<PathBuf>) -> Result<PathBuf> {
    let path = p.unwrap_or_else(kiln::default_model_path);
    if !path.exists() {
        bail!(
            "model {} does not exist{}",
            path.display(),
            if path == kiln::default_model_path() { " (run scripts/setup.sh to fetch the default model)" } else { "" }
        );
    }
    Ok(path)
}

fn load(path: &Path) -> Result<Model> {
    Model::load(path).map_err(anyhow::Error::from).with_context(|| format!("cannot load {}", path.display()))
}

fn inspect(model: Option<PathBuf>, json: bool, tensors: bool) -> Result<()> {
    let path = model_path(model)?;
    let m = load(&path)?;
    let c = &m.config;
    let hist = m.dtype_histogram();
    let total_bytes: usize = hist.values().map(|(_, b)| b).sum();
    if json {
        let report = serde_json::json!({
            "name": m.name,
            "source": m.source,
            "format": m.format,
            "config": c,
            "features": c.features(),
            "parameters": c.param_count(),
            "weight_bytes": total_bytes,
            "dtypes": hist.iter().map(|(d, (n, b))| (d.name().to_string(), serde_json::json!({"tensors": n, "bytes": b}))).collect::<serde_json::Map<_, _>>(),
            "tokenizer": m.tokenizer.as_ref().map(|t| serde_json::json!({
                "vocab_size": t.vocab_size(), "bos": t.bos(), "eos": t.eos(), "chat_template": t.chat_template().is_some(),
            })),
            "metadata": m.metadata,
            "tensors": tensors.then(|| m.weights.iter().map(|(n, t)| serde_json::json!({"name": n, "dtype": t.dtype.name(), "shape": t.shape})).collect::<Vec<_>>()),
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("{}  ({}, {})", m.name, m.format, m.source.display());
    println!("  architecture   {}", c.arch.name());
    println!("  parameters     {:.1} M", c.param_count() as f64 / 1e6);
    println!("  layers         {}", c.n_layers);
    println!("  hidden         {}   ffn {}", c.hidden_size, c.intermediate_size);
    println!("  heads          {} query, {} key/value, head dim {}", c.n_heads, c.n_kv_heads, c.head_dim);
    println!("  vocabulary     {}", c.vocab_size);
    println!("  context        {}", c.context_length);
    println!("  rope theta     {}   rms eps {:e}", c.rope_theta, c.rms_norm_eps);
    println!("  qkv bias       {}   tied embeddings {}", c.attention_bias, c.tie_embeddings);
    println!(
        "  features       {} (all supported: a file needing anything else is refused at load)",
        c.features().join(", ")
    );
    println!("  weights        {:.1} MiB", total_bytes as f64 / (1 << 20) as f64);
    for (d, (n, b)) in &hist {
        println!("    {:<6} {:>4} tensors  {:>8.1} MiB", d.name(), n, *b as f64 / (1 << 20) as f64);
    }
    match &m.tokenizer {
        Some(t) => println!(
            "  tokenizer      {} tokens, bos {:?}, eos {:?}, chat template: {}",
            t.vocab_size(),
            t.bos(),
            t.eos(),
            if t.chat_template().is_some() { "yes" } else { "no" }
        ),
        None => println!("  tokenizer      none"),
    }
    if tensors {
        for (n, t) in m.weights.iter() {
            println!("    {n:<32} {:<5} {:?}", t.dtype.name(), t.shape);
        }
    }
    Ok(())
}

/// `--explain`: per pass, its time, node counts and its own reasons.
fn explain(b: &kiln::artifact::BuiltGraph) {
    for r in &b.reports {
        eprintln!(
            "pass {:<14} {:>8.2} ms  nodes {} → {}{}",
            r.pass,
            r.time.as_secs_f64() * 1e3,
            r.nodes_before,
            r.nodes_after,
            if r.changed { "" } else { "  (no change)" }
        );
        for (_, line) in b.explanations.iter().filter(|(p, _)| p == r.pass) {
            eprintln!("  {line}");
        }
    }
}

fn compile(a: CompileArgs) -> Result<()> {
    let path = model_path(a.model.clone())?;
    let target = kiln::codegen::TargetSpec::parse(&a.target)?;
    let opts = CompileOptions { opt_level: a.opt_level, all_logits: a.all_logits };
    let m = load(&path)?;
    let (mut build, choice) = quality_cli::compile_build(&a.skip, &a.budget, opts.clone(), &m, &path)?;
    build.no_default_passes = !a.passes.is_empty();
    build.passes = a.passes.iter().filter(|p| p.as_str() != "none").cloned().collect();
    build.stop_after = a.stop_after.clone();
    build.early_exit = a.exit.spec(m.config.n_layers)?;
    if let Some(kind @ (CompileEmit::Lib | CompileEmit::Obj)) = a.emit {
        if a.explain {
            // The library path builds its graph itself; explaining it costs one more pipeline run.
            explain(&kiln::artifact::build_graph(&m, &build)?);
        }
        return kiln::aot::compile_command(
            &m,
            &path,
            &build,
            &target,
            matches!(kind, CompileEmit::Lib),
            a.output,
            a.json,
        );
    }
    if target != kiln::codegen::TargetSpec::Host {
        bail!("--target {} needs --emit obj (only object code is made for other machines)", a.target);
    }
    // One pipeline run serves --explain, --emit and the artifact.
    let built = kiln::artifact::build_graph(&m, &build)?;
    if a.explain {
        explain(&built);
    }
    if let Some(stage) = a.emit {
        let (graph, weights) = (&built.graph, &built.weights);
        match stage {
            CompileEmit::Ir => print!("{}", kiln::ir::text::print(graph)),
            CompileEmit::Program => {
                let lowered = kiln::codegen::lower::lower(graph, weights)?;
                println!("{}", serde_json::to_string_pretty(&lowered.program)?);
            }
            CompileEmit::Mlir | CompileEmit::Llvm | CompileEmit::Asm => {
                let stage = match stage {
                    CompileEmit::Mlir => kiln::codegen::Stage::Mlir,
                    CompileEmit::Llvm => kiln::codegen::Stage::Llvm,
                    _ => kiln::codegen::Stage::Asm,
                };
                print!("{}", kiln::codegen::emit_stage(graph, weights, &opts, stage)?)
            }
            CompileEmit::Lib | CompileEmit::Obj => unreachable!("handled above"),
        }
        if a.output.is_none() {
            return Ok(());
        }
    }
    let out = a.output.context("give an output directory with -o (or a stage with --emit)")?;
    let spinner = ProgressBar::new_spinner();
    spinner.set_message(format!("compiling {} for {}", m.name, kiln::codegen::host_target_info().cpu));
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    let hash = kiln::artifact::source_hash(&path)?;
    let manifest = kiln::artifact::compile_built(&m, &built, &hash, &build, &out)?;
    spinner.finish_and_clear();
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "artifact": out,
                "model": manifest.model_name,
                "target": manifest.target,
                "kernels": manifest.kernels.len(),
                "launches": manifest.program.launches.len(),
                "compile_seconds": manifest.compile_seconds,
                "passes": manifest.passes,
                "stages": manifest.stages.iter().map(|s| serde_json::json!({
                    "pass": s.pass, "changed": s.changed, "nodes_before": s.nodes_before,
                    "nodes_after": s.nodes_after, "ms": s.seconds * 1e3,
                })).collect::<Vec<_>>(),
                "records": manifest.records,
                "quality_budget": choice,
            }))?
        );
    } else {
        eprintln!(
            "compiled {} → {} ({} kernels, {} launches, {:.2}s)",
            manifest.model_name,
            out.display(),
            manifest.kernels.len(),
            manifest.program.launches.len(),
            manifest.compile_seconds
        );
    }
    Ok(())
}

/// A loaded model or artifact, ready to make a backend.
struct Loaded {
    model: Option<Model>,
    compiled: Option<kiln::runtime::CompiledBackend>,
    tokenizer: Option<kiln::frontend::tokenizer::Tokenizer>,
    name: String,
    build: Option<kiln::artifact::Build>,
}

fn run(mut a: RunArgs) -> Result<()> {
    let path = model_path(a.model.clone())?;
    let opts = CompileOptions::default();
    let is_artifact = kiln::artifact::is_artifact(&path);
    if a.emit.is_some() && is_artifact {
        bail!("--emit needs a model, not an artifact");
    }
    if a.tp > 1 && is_artifact {
        bail!("--tp {} needs a model (each rank compiles its own part), not an artifact", a.tp);
    }
    let dist = if a.emit.is_some() { None } else { tp_cli::setup(a.tp, a.comm)? };
    if let (Some(_), 0) = (&dist, a.threads) {
        // Ranks share the machine's cores.
        a.threads = (std::thread::available_parallelism().map_or(1, |n| n.get()) / a.tp).max(1);
    }
    // How the compiled backend of a model was found in the artifact cache (`None`: an artifact was
    // given, or the interpreter runs).
    let mut cache_hit = None;
    let loaded = if is_artifact {
        if a.backend == BackendKind::Interpreter {
            bail!("{} is a compiled artifact; the interpreter backend needs the model file", path.display());
        }
        if a.skip.is_set() {
            bail!("--skip-layers applies when compiling a model; {} is compiled already", path.display());
        }
        let compiled = kiln::runtime::CompiledBackend::load(&path, a.threads, None)?;
        Loaded {
            model: None,
            tokenizer: kiln::artifact::artifact_tokenizer(&path)?,
            name: compiled.manifest().model_name.clone(),
            compiled: Some(compiled),
            build: None,
        }
    } else {
        let mut m = load(&path)?;
        let mut build = a.skip.build(opts.clone(), &m, &path)?;
        if a.tp > 1 {
            let rank = dist.as_ref().map_or(0, |d| d.rank);
            build.tp = Some(kiln::artifact::TensorParallel { tp: a.tp, rank, fuse: !a.no_fuse });
        }
        match a.emit {
            Some(Emit::Ir) => {
                print!("{}", kiln::ir::text::print(&kiln::artifact::build_graph(&m, &build)?.graph));
                return Ok(());
            }
            Some(Emit::Dot) => {
                print!("{}", kiln::ir::dot::to_dot(&kiln::artifact::build_graph(&m, &build)?.graph));
                return Ok(());
            }
            None => {}
        }
        let compiled = if a.backend == BackendKind::Compiled {
            let t = std::time::Instant::now();
            let (dir, hit) = kiln::artifact::cached_build(&path, &m, &build)?;
            let fresh = hit.fresh();
            cache_hit = Some(hit);
            let backend = match kiln::runtime::CompiledBackend::load(&dir, a.threads, None) {
                Err(e) if !fresh => {
                    // A damaged or incompatible cache entry: compile it again, once.
                    eprintln!("[cached artifact unusable ({e}); recompiling]");
                    kiln::artifact::evict(&dir)?;
                    let (dir, _) = kiln::artifact::cached_build(&path, &m, &build)?;
                    kiln::runtime::CompiledBackend::load(&dir, a.threads, None)?
                }
                other => other?,
            };
            let backend = match &dist {
                Some(d) => backend.with_collective(d.comm.clone()),
                None => backend,
            };
            if fresh {
                eprintln!("[compiled {} in {:.1}s → {}]", m.name, t.elapsed().as_secs_f64(), dir.display());
            }
            Some(backend)
        } else {
            None
        };
        let name = m.name.clone();
        let tokenizer = m.tokenizer.take();
        Loaded { model: Some(m), tokenizer, compiled, name, build: Some(build) }
    };
    let mut loaded = loaded;
    let built;
    let mut interp;
    let backend: &mut dyn Backend = match (&mut loaded.compiled, &loaded.model) {
        (Some(compiled), _) => {
            if let Some((mode, schedule)) = a.exit.schedule(compiled.blocks())? {
                compiled.set_early_exit(mode, schedule)?;
            }
            compiled
        }
        (None, Some(_)) if a.exit.early_exit.is_some() => {
            bail!("`kiln run --early-exit` runs on the compiled backend (`kiln eval` also has the interpreter's)")
        }
        (None, Some(m)) => {
            let build = loaded.build.as_ref().expect("built for a model");
            built = kiln::artifact::build_graph(m, build)?;
            let mut i = kiln::ir::Interpreter::new(&built.weights);
            if let Some(d) = &dist {
                i = i.with_collective(d.comm.clone());
            }
            interp = InterpreterBackend::with_interpreter(built.graph.clone(), i, m.config.context_length)?;
            prepare_weights(&interp)?;
            &mut interp
        }
        (None, None) => unreachable!("an artifact or a model is loaded"),
    };
    let mut rec = tp_cli::Recorder::new(backend, dist.as_ref().map(|d| d.comm.clone()), a.logits_out.is_some());
    let rank = dist.as_ref().map_or(0, |d| d.rank);
    let report = generate_and_print(&a, &mut rec, loaded.tokenizer.as_ref(), &loaded.name, rank)?;
    if rank == 0 {
        if let Some(p) = &a.logits_out {
            std::fs::write(p, serde_json::to_string(&rec.rows)?).with_context(|| format!("writing {}", p.display()))?;
        }
        if let Some(mut report) = report {
            report["tp"] = a.tp.into();
            report["fused"] = (a.tp > 1 && !a.no_fuse).into();
            report["comm"] = rec.comm_report();
            if let Some(hit) = cache_hit {
                report["artifact_cache"] = hit.name().into();
            }
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else if a.tp > 1 {
            let c = rec.comm_report();
            eprintln!(
                "[tp {} ({}): each rank sent {:.2} MB in {} collectives, {:.1} ms]",
                a.tp,
                if a.no_fuse { "unfused" } else { "fused AllReduce-RMSNorm" },
                c["bytes"].as_f64().unwrap_or(0.0) / 1e6,
                c["calls"],
                c["ms"].as_f64().unwrap_or(0.0)
            );
        }
    }
    Ok(())
}

/// Generates and prints (only on rank 0); with --json, returns the report instead of printing it.
fn generate_and_print(
    a: &RunArgs,
    backend: &mut dyn Backend,
    tok: Option<&kiln::frontend::tokenizer::Tokenizer>,
    name: &str,
    rank: usize,
) -> Result<Option<serde_json::Value>> {
    let quiet = rank != 0;
    let prompt_ids: Vec<u32> = match (&a.prompt_ids, &a.prompt) {
        (Some(ids), _) => ids.clone(),
        (None, Some(text)) => {
            let tok = tok.context("the model has no tokenizer; pass --prompt-ids")?;
            if a.chat {
                let text = tok.apply_chat_template(&[ChatMessage::user(text.clone())], true)?;
                tok.encode(&text, false)?
            } else {
                tok.encode(text, true)?
            }
        }
        (None, None) => bail!("give a --prompt or --prompt-ids"),
    };
    let mut sampler =
        Sampler::new(SamplingParams { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p, seed: a.seed });
    let stop: Vec<u32> = if a.ignore_eos { vec![] } else { tok.and_then(|t| t.eos()).into_iter().collect() };
    let mut decoder = tok.map(|t| t.stream_decoder(true));
    let mut out = std::io::stdout().lock();
    if !a.json && !a.chat && !quiet {
        if let (Some(_), Some(text)) = (tok, &a.prompt) {
            write!(out, "{text}")?;
            out.flush()?;
        }
    }
    let json = a.json || quiet;
    let stats = kiln::runtime::generate(backend, &prompt_ids, a.max_tokens, &mut sampler, &stop, |id| {
        if !json {
            match decoder.as_mut() {
                Some(d) => {
                    if let Ok(Some(piece)) = d.push(id) {
                        let _ = write!(out, "{piece}");
                    }
                }
                None => {
                    let _ = write!(out, " {id}");
                }
            }
            let _ = out.flush();
        }
        true
    })?;
    let decode_tps = stats.generated.len().saturating_sub(1) as f64 / stats.decode.as_secs_f64().max(1e-9);
    let prefill_tps = stats.prompt_tokens as f64 / stats.prefill.as_secs_f64().max(1e-9);
    if json {
        let text = tok.map(|t| t.decode(&stats.generated, true)).transpose()?;
        let report = serde_json::json!({
            "model": name,
            "backend": backend.name(),
            "prompt_ids": prompt_ids,
            "generated_ids": stats.generated,
            "text": text,
            "stop": stats.stop,
            "prefill_ms": stats.prefill.as_secs_f64() * 1e3,
            "decode_ms": stats.decode.as_secs_f64() * 1e3,
            "prefill_tok_per_s": prefill_tps,
            "decode_tok_per_s": decode_tps,
            "peak_rss_mib": peak_rss_mib(),
        });
        let mut report = report;
        if let Some(s) = kiln::runtime::core_share(backend) {
            report["core_share"] = serde_json::json!(s);
        }
        return Ok(Some(report));
    } else if !quiet {
        if let Some(rest) = decoder.as_mut().and_then(|d| d.finish()) {
            write!(out, "{rest}")?;
        }
        writeln!(out)?;
        let core = kiln::runtime::core_share(backend)
            .map(|s| format!("; CoreInfer core set {:.1}% of MLP neurons", 100.0 * s))
            .unwrap_or_default();
        eprintln!(
            "[{} prompt tokens, {} generated, stop: {:?}; prefill {:.1} tok/s, decode {:.1} tok/s; backend {}{core}]",
            stats.prompt_tokens,
            stats.generated.len(),
            stats.stop,
            prefill_tps,
            decode_tps,
            backend.name()
        );
    }
    Ok(None)
}

/// Dequantizes every weight up front, with a progress bar, so generation timings measure generation.
fn prepare_weights(backend: &InterpreterBackend) -> Result<()> {
    let names: Vec<String> = backend.graph().weights().map(|(n, _)| n.to_string()).collect();
    let bar = ProgressBar::new(names.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg:>18} [{bar:30}] {pos}/{len} {elapsed}").unwrap().progress_chars("=> "),
    );
    bar.set_message("preparing weights");
    backend.prepare(|| bar.inc(1))?;
    bar.finish_and_clear();
    Ok(())
}

/// This process's peak resident set size (Linux `VmHWM`), in MiB; `None` where unavailable.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 =
        status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb / 1024.0)
}
