//! The `kiln` command line.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use kiln::frontend::tokenizer::ChatMessage;
use kiln::frontend::Model;
use kiln::runtime::{Backend, InterpreterBackend, Sampler, SamplingParams};
use std::io::Write;
use std::path::{Path, PathBuf};

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
}

#[derive(Clone, Copy, ValueEnum)]
enum Emit {
    /// The IR graph in Kiln's canonical text form.
    Ir,
    /// The IR graph as Graphviz DOT.
    Dot,
}

#[derive(Clone, Copy, ValueEnum)]
enum BackendKind {
    /// The reference interpreter (slow, exact: the oracle).
    Interpreter,
}

#[derive(clap::Args)]
struct RunArgs {
    /// A .gguf file or a Hugging Face model directory (default: the default model).
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
    #[arg(long, value_enum, default_value = "interpreter")]
    backend: BackendKind,
    /// Print a JSON report (ids, text, timings) instead of streaming text.
    #[arg(long)]
    json: bool,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Inspect { model, json, tensors } => inspect(model, json, tensors),
        Cmd::Run(args) => run(args),
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

fn run(a: RunArgs) -> Result<()> {
    let path = model_path(a.model.clone())?;
    let m = load(&path)?;
    let graph = m.graph()?;
    match a.emit {
        Some(Emit::Ir) => {
            print!("{}", kiln::ir::text::print(&graph));
            return Ok(());
        }
        Some(Emit::Dot) => {
            print!("{}", kiln::ir::dot::to_dot(&graph));
            return Ok(());
        }
        None => {}
    }
    let tok = m.tokenizer.as_ref();
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
    let BackendKind::Interpreter = a.backend;
    let mut backend = InterpreterBackend::new(graph, &m.weights, m.config.context_length)?;
    prepare_weights(&backend)?;
    let mut sampler =
        Sampler::new(SamplingParams { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p, seed: a.seed });
    let stop: Vec<u32> = if a.ignore_eos { vec![] } else { tok.and_then(|t| t.eos()).into_iter().collect() };
    let mut decoder = tok.map(|t| t.stream_decoder(true));
    let mut out = std::io::stdout().lock();
    if !a.json {
        if let (Some(t), Some(text)) = (tok, &a.prompt) {
            if !a.chat {
                write!(out, "{text}")?;
            } else {
                let _ = t;
            }
        }
        out.flush()?;
    }
    let json = a.json;
    let stats = kiln::runtime::generate(&mut backend, &prompt_ids, a.max_tokens, &mut sampler, &stop, |id| {
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
    if json {
        let text = tok.map(|t| t.decode(&stats.generated, true)).transpose()?;
        let report = serde_json::json!({
            "model": m.name,
            "backend": backend.name(),
            "prompt_ids": prompt_ids,
            "generated_ids": stats.generated,
            "text": text,
            "stop": stats.stop,
            "prefill_ms": stats.prefill.as_secs_f64() * 1e3,
            "decode_ms": stats.decode.as_secs_f64() * 1e3,
            "decode_tok_per_s": stats.generated.len() as f64 / stats.decode.as_secs_f64().max(1e-9),
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        if let Some(rest) = decoder.as_mut().and_then(|d| d.finish()) {
            write!(out, "{rest}")?;
        }
        writeln!(out)?;
        eprintln!(
            "[{} prompt tokens, {} generated, stop: {:?}, prefill {:.2}s, decode {:.2} tok/s, backend {}]",
            stats.prompt_tokens,
            stats.generated.len(),
            stats.stop,
            stats.prefill.as_secs_f64(),
            stats.generated.len() as f64 / stats.decode.as_secs_f64().max(1e-9),
            backend.name()
        );
    }
    Ok(())
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
