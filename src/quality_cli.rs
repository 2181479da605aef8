//! The CLI side of measured quality: `kiln eval`, `kiln calibrate`, the layer-skipping options shared by
//! `compile`/`run`/`eval`, and `--quality-budget` for `compile`.

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressStyle};
use kiln::artifact::Build;
use kiln::budget::{Axes, Joint, JointChoice, QualityBudget};
use kiln::codegen::CompileOptions;
use kiln::frontend::tokenizer::Tokenizer;
use kiln::frontend::Model;
use kiln::passes::calibration::{Calibration, CalibrationText, CALIBRATION_FORMAT, CALIBRATION_VERSION};
use kiln::passes::skip_layers::{SkipLayers, SkipMethod};
use kiln::passes::structured_prune::StructuredPrune;
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

/// Where `kiln bench --kernels` caches its table.
pub fn kernel_table_path() -> PathBuf {
    kiln::cache_dir().join("kernel-table.json")
}

/// The cached kernel table, checked to come from this CPU.
pub fn load_kernel_table() -> Result<Arc<kiln::passes::prune::KernelTable>> {
    let p = kernel_table_path();
    let text = std::fs::read_to_string(&p).with_context(|| {
        format!("--prune-sparsity needs the kernel table {} (measure it: `kiln bench --kernels`)", p.display())
    })?;
    let t: kiln::passes::prune::KernelTable =
        serde_json::from_str(&text).with_context(|| format!("kernel table {}", p.display()))?;
    if t.format != kiln::passes::prune::KERNEL_TABLE_FORMAT || t.version != 1 {
        bail!("kernel table {} has an unknown format; re-run `kiln bench --kernels`", p.display());
    }
    let cpu = kiln::codegen::host_target_info().cpu;
    if t.cpu != cpu {
        bail!(
            "kernel table {} was measured on {}, this CPU is {cpu}; re-run `kiln bench --kernels`",
            p.display(),
            t.cpu
        );
    }
    Ok(Arc::new(t))
}

/// The N:M patterns `kiln bench --kernels` measures (and `--prune-pattern` can use with a measurement).
pub const NM_PATTERNS: [(usize, usize); 6] = [(1, 4), (2, 4), (3, 4), (1, 8), (2, 8), (4, 8)];

/// The sparsities `kiln bench --kernels` measures the bitmap (unstructured, 1×8) kernels at.
pub const BITMAP_SPARSITIES: [f64; 3] = [0.25, 0.5, 0.7];

/// The active shares of an input-sparse projection's input channels `kiln bench --kernels` measures the
/// column active-channel kernel at (m = 1); `chess` interpolates between them.
pub const COLUMN_DENSITIES: [f64; 8] = [1.0, 0.9, 0.75, 0.6, 0.5, 0.4, 0.3, 0.2];

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
    let mut shapes: Vec<(kiln::ir::DType, usize, usize)> = Vec::new();
    for (name, t) in m.weights.iter() {
        if let (Some(_), [n, k]) = (name.strip_prefix("blk."), &t.shape[..]) {
            let s = (t.dtype, *k, *n);
            let ok =
                kiln::ir::sparse::SPARSE_DTYPES.contains(&t.dtype) || kiln::ir::sparse::NM_DTYPES.contains(&t.dtype);
            if ok && k % 32 == 0 && !shapes.contains(&s) {
                shapes.push(s);
            }
        }
    }
    shapes.sort_by_key(|s| (s.0.name(), s.1, s.2));
    let densities = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0];
    eprintln!("[measuring {} shapes × m ∈ {{1, 64}} × {} densities, one thread]", shapes.len(), densities.len());
    let rows = kiln::codegen::kernels::measure::measure_break_even(
        &shapes,
        &[1, 64],
        &densities,
        3,
        std::time::Duration::from_millis(a.ms),
    )?;
    for r in &rows {
        let ratios: Vec<String> = r.ratios.iter().map(|(d, x)| format!("{d:.2}:{x:.2}")).collect();
        println!(
            "{} {}→{} m={:<2} break-even {:.2}  (density:sparse/dense {})",
            r.dtype,
            r.k,
            r.n,
            r.m,
            r.break_even,
            ratios.join(" ")
        );
    }
    let patterns: Vec<kiln::ir::sparse::NmPattern> =
        NM_PATTERNS.iter().map(|&(n, m)| kiln::ir::sparse::NmPattern::new(n, m)).collect::<Result<_, _>>()?;
    eprintln!("[measuring N:M kernels: {} patterns × m ∈ {{1, 64}}, one thread]", patterns.len());
    let nm = kiln::codegen::kernels::measure::measure_nm(
        &shapes,
        &patterns,
        &[1, 64],
        3,
        std::time::Duration::from_millis(a.ms),
    )?;
    for r in &nm {
        println!(
            "{} {}→{} m={:<2} {} N:M/dense {:.2}  ({:.1} µs dense, {:.1} µs N:M)",
            r.dtype,
            r.k,
            r.n,
            r.m,
            r.pattern,
            r.ratio,
            r.times.0 * 1e6,
            r.times.1 * 1e6
        );
    }
    let densities = BITMAP_SPARSITIES.map(|s| 1.0 - s);
    eprintln!(
        "[measuring bitmap kernels: unstructured and 1x8 × sparsity {BITMAP_SPARSITIES:?} × m ∈ {{1, 64}}, one thread]"
    );
    let bm = kiln::codegen::kernels::measure::measure_bitmap(
        &shapes,
        &[1, 8],
        &densities,
        &[1, 64],
        3,
        std::time::Duration::from_millis(a.ms),
    )?;
    for r in &bm {
        println!(
            "{} {}→{} m={:<2} {} density {:.2} bitmap/dense {:.2}  ({:.1} µs dense, {:.1} µs bitmap)",
            r.dtype,
            r.k,
            r.n,
            r.m,
            if r.gran == 1 { "unstructured" } else { "1x8" },
            r.density,
            r.ratio,
            r.times.0 * 1e6,
            r.times.1 * 1e6
        );
    }
    // CHESS's input-sparse projections on the column layout (down, and the attention projections and
    // gate/up of the other forms): the model's shapes of them whose dtype has one.
    let downs: Vec<(kiln::ir::DType, usize, usize)> = {
        let projection = |name: &str| {
            ["ffn_down", "ffn_gate", "ffn_up", "attn_q", "attn_k", "attn_v", "attn_output"]
                .iter()
                .any(|p| name.ends_with(&format!(".{p}.weight")))
        };
        let mut v: Vec<_> = m
            .weights
            .iter()
            .filter(|(name, t)| name.starts_with("blk.") && projection(name) && t.shape.len() == 2)
            .map(|(_, t)| (t.dtype, t.shape[1], t.shape[0]))
            .filter(|s| s.0.column_of().is_some() && s.1 % 32 == 0 && s.2 % 32 == 0)
            .collect();
        v.sort_by_key(|s| (s.0.name(), s.1, s.2));
        v.dedup();
        v
    };
    eprintln!(
        "[measuring the column active-channel kernel: {} projection shapes × active {COLUMN_DENSITIES:?}, m = 1, weights streamed, one thread]",
        downs.len()
    );
    let col = kiln::codegen::kernels::measure::measure_column_active(
        &downs,
        &COLUMN_DENSITIES,
        3,
        std::time::Duration::from_millis(a.ms),
    )?;
    for r in &col {
        println!(
            "{} {}→{} m={:<2} column active {:.2} column/dense {:.2}  ({:.1} µs dense, {:.1} µs column)",
            r.dtype,
            r.k,
            r.n,
            r.m,
            r.density,
            r.ratio,
            r.times.0 * 1e6,
            r.times.1 * 1e6
        );
    }
    let table = kiln::passes::prune::KernelTable {
        format: kiln::passes::prune::KERNEL_TABLE_FORMAT.into(),
        version: 1,
        cpu: kiln::codegen::host_target_info().cpu,
        entries: rows
            .iter()
            .map(|r| kiln::passes::prune::KernelMeasurement {
                dtype: r.dtype,
                k: r.k,
                n: r.n,
                m: r.m,
                break_even: r.break_even,
            })
            .collect(),
        nm: nm
            .iter()
            .map(|r| kiln::passes::prune::NmMeasurement {
                dtype: r.dtype,
                k: r.k,
                n: r.n,
                m: r.m,
                pattern: r.pattern,
                ratio: r.ratio,
            })
            .collect(),
        bitmap: bm
            .iter()
            .map(|r| kiln::passes::prune::BitmapMeasurement {
                dtype: r.dtype,
                k: r.k,
                n: r.n,
                m: r.m,
                gran: r.gran,
                density: r.density,
                ratio: r.ratio,
            })
            .collect(),
        column: col
            .iter()
            .map(|r| kiln::passes::prune::ColumnMeasurement {
                dtype: r.dtype,
                k: r.k,
                n: r.n,
                m: r.m,
                density: r.density,
                ratio: r.ratio,
            })
            .collect(),
    };
    let p = kernel_table_path();
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(&p, serde_json::to_string_pretty(&table)?).with_context(|| format!("writing {}", p.display()))?;
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
    pub fn skip(&self) -> SkipLayers {
        let method = match self.skip_method {
            SkipMethodArg::Even => SkipMethod::Even,
            SkipMethodArg::Influence => SkipMethod::Influence,
            SkipMethodArg::Top => SkipMethod::Top,
        };
        SkipLayers { count: self.skip_layers, method }
    }

    pub fn chess_scope(&self) -> kiln::passes::chess::ChessScope {
        use kiln::passes::chess::ChessScope;
        match self.chess_scope {
            ChessScopeArg::Mlp => ChessScope::Mlp,
            ChessScopeArg::Attn => ChessScope::Attn,
            ChessScopeArg::All => ChessScope::All,
        }
    }

    pub fn chess_mlp(&self) -> Option<kiln::passes::chess::ChessMlp> {
        use kiln::passes::chess::ChessMlp;
        self.chess_mlp.map(|m| match m {
            ChessMlpArg::Gate => ChessMlp::Gate,
            ChessMlpArg::Act => ChessMlp::Act,
            ChessMlpArg::Input => ChessMlp::Input,
            ChessMlpArg::Io => ChessMlp::Io,
        })
    }

    pub fn is_set(&self) -> bool {
        self.skip_layers > 0
            || self.chess_sparsity.is_some()
            || self.prune_sparsity.is_some()
            || self.prune_pattern.is_some()
            || self.flex_prefill.is_some()
            || self.structured_prune.is_some()
            || self.coreinfer.is_some()
    }

    /// The `--coreinfer` settings, checked (errors name the flag).
    pub fn coreinfer(&self) -> Result<Option<kiln::passes::coreinfer::CoreInfer>> {
        self.coreinfer
            .as_deref()
            .map(|s| {
                kiln::passes::coreinfer::CoreInfer::parse(s).map_err(|e| anyhow::anyhow!("--coreinfer {s:?}: {e}"))
            })
            .transpose()
    }

    /// The N:M pattern of `--prune-pattern` (`None` for none, `block32`, `unstructured` or `1x8`).
    pub fn nm_pattern(&self) -> Result<Option<kiln::ir::sparse::NmPattern>> {
        match self.prune_pattern.as_deref().map(str::trim) {
            None | Some("block32") => Ok(None),
            _ if self.bitmap_gran().is_some() => Ok(None),
            Some(s) => kiln::ir::sparse::NmPattern::parse(s)
                .map(Some)
                .map_err(|e| anyhow::anyhow!("--prune-pattern {s:?}: {e} (or `block32`, `unstructured`, `1x8`)")),
        }
    }

    /// The bitmap granularity of `--prune-pattern unstructured` (1) or `1x8` (8).
    pub fn bitmap_gran(&self) -> Option<usize> {
        match self.prune_pattern.as_deref().map(str::trim) {
            Some("unstructured") => Some(1),
            Some("1x8") => Some(8),
            _ => None,
        }
    }

    /// The `--flex-prefill` settings, checked (errors name the flag).
    pub fn flex(&self) -> Result<Option<kiln::passes::flexprefill::FlexPrefill>> {
        self.flex_prefill
            .as_deref()
            .map(|s| {
                kiln::passes::flexprefill::FlexPrefill::parse(s)
                    .map_err(|e| anyhow::anyhow!("--flex-prefill {s:?}: {e}"))
            })
            .transpose()
    }

    /// The parsed `--structured-prune`, checked against the model's head layout.
    pub fn structured(&self, model: &Model) -> Result<Option<StructuredPrune>> {
        let Some(spec) = &self.structured_prune else { return Ok(None) };
        let sp = StructuredPrune::parse(spec).map_err(anyhow::Error::msg).context("--structured-prune")?;
        let c = &model.config;
        let group = c.n_heads / c.n_kv_heads.max(1);
        if sp.heads >= group {
            bail!(
                "--structured-prune heads={} must be less than the {group} query heads per KV group ({} query heads over {} KV heads)",
                sp.heads,
                c.n_heads,
                c.n_kv_heads
            );
        }
        Ok(Some(sp))
    }

    /// The build for `opts` with these options; checks them against the model.
    pub fn build(&self, opts: CompileOptions, model: &Model, model_path: &Path) -> Result<Build> {
        if let Some(s) = self.chess_sparsity.filter(|s| !(0.0..1.0).contains(s)) {
            bail!("--chess-sparsity {s} is outside [0, 1)");
        }
        if let Some(s) = self.chess_attn_sparsity {
            if !(0.0..1.0).contains(&s) {
                bail!("--chess-attn-sparsity {s} is outside [0, 1)");
            }
            if self.chess_scope() != kiln::passes::chess::ChessScope::All {
                bail!("--chess-attn-sparsity needs --chess-scope all (with scope attn, --chess-sparsity is the attention's)");
            }
        }
        if let Some(r) = self.rsparse_rank {
            let max = model.config.hidden_size.max(model.config.intermediate_size);
            if r == 0 || r > max {
                bail!("--rsparse-rank {r} is outside [1, {max}] (the largest dimension of the model's weights)");
            }
        }
        if let Some(s) = self.prune_sparsity.filter(|s| !(0.0..1.0).contains(s)) {
            bail!("--prune-sparsity {s} is outside [0, 1)");
        }
        let flex = self.flex()?;
        let coreinfer = self.coreinfer()?;
        if coreinfer.is_some()
            && (self.chess_sparsity.is_some() || self.prune_sparsity.is_some() || self.prune_pattern.is_some())
        {
            bail!("--coreinfer cannot be combined with --chess-sparsity, --prune-sparsity or --prune-pattern (each rewrites the MLP's linears)");
        }
        let calibration = match &self.calibration {
            Some(p) => Some(load_calibration(p, model, model_path)?),
            None => None,
        };
        if self.skip_method == SkipMethodArg::Influence && self.skip_layers > 0 && calibration.is_none() {
            bail!("--skip-method influence needs --calibration FILE (make one with `kiln calibrate`)");
        }
        let structured = self.structured(model)?;
        if structured.is_some_and(|s| !s.is_noop()) && calibration.is_none() {
            bail!("--structured-prune needs --calibration FILE (make one with `kiln calibrate`)");
        }
        let n = model.config.n_layers;
        if self.skip_layers >= n {
            bail!("--skip-layers {} is not less than the model's {n} layers", self.skip_layers);
        }
        if self.chess_sparsity.is_some() && calibration.is_none() {
            bail!("--chess-sparsity needs --calibration FILE (make one with `kiln calibrate`)");
        }
        let pattern = self.nm_pattern()?;
        if pattern.is_some() && self.prune_sparsity.is_some() {
            bail!("--prune-sparsity is for block32 pruning; an N:M --prune-pattern fixes the sparsity itself");
        }
        if let Some(p) =
            self.prune_pattern.as_deref().map(str::trim).filter(|p| ["block32", "unstructured", "1x8"].contains(p))
        {
            if self.prune_sparsity.is_none() {
                bail!("--prune-pattern {p} needs --prune-sparsity S");
            }
        }
        let method = match self.prune_method {
            PruneMethodArg::Magnitude => kiln::passes::prune::PruneMethod::Magnitude,
            PruneMethodArg::Wanda => kiln::passes::prune::PruneMethod::Wanda,
        };
        if self.prune_method != PruneMethodArg::Magnitude && pattern.is_none() && self.prune_sparsity.is_none() {
            bail!("--prune-method needs --prune-sparsity S or --prune-pattern N:M");
        }
        let prune = match (self.prune_sparsity, pattern) {
            (None, None) => None,
            (sparsity, pattern) => {
                if method == kiln::passes::prune::PruneMethod::Wanda && calibration.is_none() {
                    bail!("--prune-method wanda needs --calibration FILE (make one with `kiln calibrate`)");
                }
                let sparsity = pattern.map_or(sparsity.unwrap_or(0.0), |p| 1.0 - p.density());
                let table = Some(load_kernel_table()?);
                Some(kiln::passes::prune::Prune { method, sparsity, table, pattern, bitmap: self.bitmap_gran() })
            }
        };
        // The option errors of the passes name (`build_graph` adds it), most specific first.
        let origin =
            if self.structured_prune.is_some() && (self.prune_sparsity.is_some() || self.chess_sparsity.is_some()) {
                "--structured-prune with --chess-sparsity/--prune-sparsity"
            } else if self.prune_sparsity.is_some() {
                "--prune-sparsity"
            } else if self.prune_pattern.is_some() {
                "--prune-pattern"
            } else if self.chess_sparsity.is_some() {
                "--chess-sparsity"
            } else if self.structured_prune.is_some() {
                "--structured-prune"
            } else if self.coreinfer.is_some() {
                "--coreinfer"
            } else if self.flex_prefill.is_some() {
                "--flex-prefill"
            } else {
                "--skip-layers"
            };
        Ok(Build {
            opts,
            skip: self.skip(),
            structured,
            chess: self.chess_sparsity,
            chess_scope: self.chess_scope(),
            rsparse_rank: self.rsparse_rank,
            chess_mlp: self.chess_mlp(),
            chess_per_layer: self.chess_thresholds == ChessThresholdsArg::Layer,
            chess_attn: self.chess_attn_sparsity,
            // The column kernels are chosen per projection from this machine's measurements when
            // there are some (`kiln bench --kernels`); without a table every projection goes column-major.
            chess_kernels: self.chess_sparsity.and_then(|_| load_kernel_table().ok()),
            prune,
            flex,
            coreinfer,
            calibration,
            origin,
            ..Default::default()
        })
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
    let (dir, hit) = kiln::artifact::cached_build(path, m, build)?;
    let fresh = hit.fresh();
    let b = load_cached(path, m, build, &dir, fresh, threads, capacity)?;
    if fresh {
        eprintln!("[compiled {} in {:.1}s → {}]", m.name, t.elapsed().as_secs_f64(), dir.display());
    }
    Ok(b)
}

/// Loads the cached artifact `dir` of `build` (`fresh`: just compiled); a stale cache entry that fails to
/// load is evicted and compiled again.
fn load_cached(
    path: &Path,
    m: &Model,
    build: &Build,
    dir: &Path,
    fresh: bool,
    threads: usize,
    capacity: usize,
) -> Result<CompiledBackend> {
    Ok(match CompiledBackend::load(dir, threads, Some(capacity)) {
        Err(e) if !fresh => {
            eprintln!("[cached artifact unusable ({e}); recompiling]");
            kiln::artifact::evict(dir)?;
            let (dir, _) = kiln::artifact::cached_build(path, m, build)?;
            CompiledBackend::load(&dir, threads, Some(capacity))?
        }
        other => other?,
    })
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
        let j = serde_json::json!({
            "model": name,
            "backend": backend.name(),
            "text": a.text,
            "skip_layers": a.skip.skip_layers,
            "skip_method": a.skip.skip().method.name(),
            "chess_sparsity": a.skip.chess_sparsity,
            "chess_scope": a.skip.chess_sparsity.map(|_| a.skip.chess_scope().name()),
            "chess_mlp": a.skip.chess_mlp().map(|m| m.name()),
            "chess_per_layer": a.skip.chess_sparsity.map(|_| a.skip.chess_thresholds == ChessThresholdsArg::Layer),
            "chess_attn_sparsity": a.skip.chess_attn_sparsity,
            "rsparse_rank": a.skip.rsparse_rank,
            "prune_sparsity": a.skip.prune_sparsity,
            "structured_prune": a.skip.structured_prune,
            "coreinfer": a.skip.coreinfer().ok().flatten().map(|c| c.spec()),
            "report": report,
        });
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
        quantile_levels: kiln::passes::calibration::quantile_levels(),
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
    let qb = QualityBudget::parse(spec).map_err(anyhow::Error::msg).context("--quality-budget")?;
    let min_saving = budget.budget_min_saving.unwrap_or(match budget.budget_cost {
        BudgetCost::Measured => 0.02,
        BudgetCost::Bytes => 0.0,
    });
    if !(0.0..1.0).contains(&min_saving) {
        bail!("--budget-min-saving must be in [0, 1), got {min_saving}");
    }
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
    let c = &m.config;
    // Block pruning needs this machine's kernel table; without one that axis is not searched.
    let table = load_kernel_table().ok();
    // The MLP's CHESS form: `--chess-mlp`, else `act` (down's input; the least perplexity per sparsity
    // of the forms on SmolLM2, and the only one whose decode gets faster with sparsity there:
    // docs/quality.md). Its levels go higher than the attention inputs' for the same reason.
    let mlp_form = skip.chess_mlp().unwrap_or(kiln::passes::chess::ChessMlp::Act);
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
            prune: (j.prune > 0.0).then(|| kiln::passes::prune::Prune {
                method: kiln::passes::prune::PruneMethod::Magnitude,
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
        let built = kiln::artifact::build_graph(m, &b)?;
        let est = kiln::budget::decode_bytes(&built.graph, &built.weights, j.chess, j.attn);
        let t = std::time::Instant::now();
        let (dir, fresh) = kiln::artifact::cached_built(path, m, &b, &built)?;
        if fresh {
            eprintln!("[compiled {} in {:.1}s → {}]", m.name, t.elapsed().as_secs_f64(), dir.display());
        }
        prepared.borrow_mut().insert(format!("{j:?}"), (dir.clone(), fresh, est));
        Ok((b, dir, fresh, est))
    };
    let choice = kiln::budget::search_joint(
        qb,
        &axes,
        min_saving,
        |j| {
            let (b, dir, fresh, est) = prepare(j)?;
            bytes.push((*j, est));
            match budget.budget_cost {
                BudgetCost::Bytes => Ok(est),
                BudgetCost::Measured => {
                    let cap = prompt.len() + 40;
                    if reference.is_none() {
                        let dense = joint_build(&Joint::default(), all.clone());
                        reference = Some(compiled(path, m, &dense, budget.budget_threads, cap)?);
                    }
                    let dense = reference.as_mut().expect("just loaded");
                    let mut backend = load_cached(path, m, &b, &dir, fresh, budget.budget_threads, cap)?;
                    let r = kiln::budget::paired_decode_ratio(dense, &mut backend, prompt, 32, 7)?;
                    eprintln!("[budget: {} → decode CPU time {:.3}× dense]", j.describe(), r);
                    Ok(r)
                }
            }
        },
        |j| {
            let (b, dir, fresh, _) = prepare(j)?;
            // Measurements are remembered by artifact and text, so budgets share them.
            let key = format!("{}-{}-{chunk}", dir.file_name().unwrap_or_default().to_string_lossy(), &text_hash[..32]);
            let memo = kiln::cache_dir().join("measurements").join(format!("{key}.txt"));
            let ppl = match std::fs::read_to_string(&memo).ok().and_then(|t| t.trim().parse::<f64>().ok()) {
                Some(ppl) => ppl,
                None => {
                    let mut backend = load_cached(path, m, &b, &dir, fresh, budget.budget_threads, chunk)?;
                    let r = kiln::eval::evaluate(&mut backend, &tokens, chunk, chunk, |_| {})?;
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
        if budget.budget_cost == BudgetCost::Measured { "measured" } else { "estimated bytes" },
        100.0 * choice.cost / choice.baseline_cost
    );
    let record = serde_json::json!({
        "quality_budget": choice,
        "search": "greedy coordinate steps over skip-layers (influence) × chess (MLP, form chess_mlp) × chess (attention inputs), per-layer thresholds × prune (magnitude) × structured-prune, \
                   most decode cost saved per unit of calibration perplexity added; a step is the smallest one up an axis saving min_saving",
        "chess_mlp": mlp_form.name(),
        "cost": match budget.budget_cost {
            BudgetCost::Measured => "measured decode CPU time over the dense model's (median of 7 adjacent pairs of 32-step runs)",
            BudgetCost::Bytes => "estimated weight bytes per decode step",
        },
        "min_saving": min_saving,
        "estimated_bytes": bytes.iter().map(|(j, b)| serde_json::json!({"config": j, "bytes": b})).collect::<Vec<_>>(),
        "kernel_table": table.is_some(),
        "measured_on": {"file": text_path, "tokens": tokens.len(), "window": chunk, "stride": chunk},
    });
    let build = Build { records: vec![record], ..joint_build(&choice.config, opts) };
    Ok((build, Some(choice)))
}
