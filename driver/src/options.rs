//! The lossy-pass options a user gives (`kiln compile/run/eval`'s `--skip-layers`, `--chess-*`,
//! `--prune-*`, `--structured-prune`, `--flex-prefill`, `--coreinfer`, `--calibration`) as plain data,
//! and [`PassOptions::build`], which checks them against the model and turns them into a [`Build`].
//!
//! Errors name the command-line option they come from, since that is what a user typed; a build.rs or
//! C ABI caller sets the same fields.

use crate::artifact::Build;
use crate::kernel_table::load_kernel_table;
use crate::quality::load_calibration;
use anyhow::{bail, Context, Result};
use kiln_codegen::CompileOptions;
use kiln_frontend::Model;
use kiln_passes::chess::{ChessMlp, ChessScope};
use kiln_passes::prune::PruneMethod;
use kiln_passes::skip_layers::{SkipLayers, SkipMethod};
use kiln_passes::structured_prune::StructuredPrune;
use std::path::{Path, PathBuf};

/// Every lossy-pass option, unchecked (see the CLI's `--help` for what each does).
#[derive(Clone, Debug)]
pub struct PassOptions {
    pub skip_layers: usize,
    pub skip_method: SkipMethod,
    pub chess_sparsity: Option<f64>,
    pub chess_scope: ChessScope,
    pub chess_mlp: Option<ChessMlp>,
    /// One threshold per layer (TEAL) instead of per channel (CHESS).
    pub chess_per_layer: bool,
    pub chess_attn_sparsity: Option<f64>,
    pub rsparse_rank: Option<usize>,
    pub prune_sparsity: Option<f64>,
    /// `neurons=S,heads=N`.
    pub structured_prune: Option<String>,
    pub prune_method: PruneMethod,
    /// `block32`, `N:M`, `unstructured` or `1x8`.
    pub prune_pattern: Option<String>,
    /// `gamma=…,tau=…,block=…,min-len=…` (empty: the defaults).
    pub flex_prefill: Option<String>,
    /// `alpha=…,beta=…,gather=0|1` (empty: the defaults).
    pub coreinfer: Option<String>,
    pub calibration: Option<PathBuf>,
}

impl Default for PassOptions {
    fn default() -> Self {
        PassOptions {
            skip_layers: 0,
            skip_method: SkipMethod::Even,
            chess_sparsity: None,
            chess_scope: ChessScope::Mlp,
            chess_mlp: None,
            chess_per_layer: false,
            chess_attn_sparsity: None,
            rsparse_rank: None,
            prune_sparsity: None,
            structured_prune: None,
            prune_method: PruneMethod::Magnitude,
            prune_pattern: None,
            flex_prefill: None,
            coreinfer: None,
            calibration: None,
        }
    }
}

impl PassOptions {
    pub fn skip(&self) -> SkipLayers {
        SkipLayers { count: self.skip_layers, method: self.skip_method }
    }

    /// Whether any lossy pass is asked for.
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
    pub fn coreinfer(&self) -> Result<Option<kiln_passes::coreinfer::CoreInfer>> {
        self.coreinfer
            .as_deref()
            .map(|s| kiln_passes::coreinfer::CoreInfer::parse(s).map_err(|e| anyhow::anyhow!("--coreinfer {s:?}: {e}")))
            .transpose()
    }

    /// The N:M pattern of `--prune-pattern` (`None` for none, `block32`, `unstructured` or `1x8`).
    pub fn nm_pattern(&self) -> Result<Option<kiln_ir::sparse::NmPattern>> {
        match self.prune_pattern.as_deref().map(str::trim) {
            None | Some("block32") => Ok(None),
            _ if self.bitmap_gran().is_some() => Ok(None),
            Some(s) => kiln_ir::sparse::NmPattern::parse(s)
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
    pub fn flex(&self) -> Result<Option<kiln_passes::flexprefill::FlexPrefill>> {
        self.flex_prefill
            .as_deref()
            .map(|s| {
                kiln_passes::flexprefill::FlexPrefill::parse(s)
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

    /// What the options asked for, as `kiln eval --json` reports it.
    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "skip_layers": self.skip_layers,
            "skip_method": self.skip_method.name(),
            "chess_sparsity": self.chess_sparsity,
            "chess_scope": self.chess_sparsity.map(|_| self.chess_scope.name()),
            "chess_mlp": self.chess_mlp.map(|m| m.name()),
            "chess_per_layer": self.chess_sparsity.map(|_| self.chess_per_layer),
            "chess_attn_sparsity": self.chess_attn_sparsity,
            "rsparse_rank": self.rsparse_rank,
            "prune_sparsity": self.prune_sparsity,
            "structured_prune": self.structured_prune,
            "coreinfer": self.coreinfer().ok().flatten().map(|c| c.spec()),
        })
    }

    /// The build for `opts` with these options; checks them against the model at `model_path`.
    pub fn build(&self, opts: CompileOptions, model: &Model, model_path: &Path) -> Result<Build> {
        if let Some(s) = self.chess_sparsity.filter(|s| !(0.0..1.0).contains(s)) {
            bail!("--chess-sparsity {s} is outside [0, 1)");
        }
        if let Some(s) = self.chess_attn_sparsity {
            if !(0.0..1.0).contains(&s) {
                bail!("--chess-attn-sparsity {s} is outside [0, 1)");
            }
            if self.chess_scope != ChessScope::All {
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
        if self.skip_method == SkipMethod::Influence && self.skip_layers > 0 && calibration.is_none() {
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
        let method = self.prune_method;
        if method != PruneMethod::Magnitude && pattern.is_none() && self.prune_sparsity.is_none() {
            bail!("--prune-method needs --prune-sparsity S or --prune-pattern N:M");
        }
        let prune = match (self.prune_sparsity, pattern) {
            (None, None) => None,
            (sparsity, pattern) => {
                if method == PruneMethod::Wanda && calibration.is_none() {
                    bail!("--prune-method wanda needs --calibration FILE (make one with `kiln calibrate`)");
                }
                let sparsity = pattern.map_or(sparsity.unwrap_or(0.0), |p| 1.0 - p.density());
                let table = Some(load_kernel_table()?);
                Some(kiln_passes::prune::Prune { method, sparsity, table, pattern, bitmap: self.bitmap_gran() })
            }
        };
        Ok(Build {
            opts,
            skip: self.skip(),
            structured,
            chess: self.chess_sparsity,
            chess_scope: self.chess_scope,
            rsparse_rank: self.rsparse_rank,
            chess_mlp: self.chess_mlp,
            chess_per_layer: self.chess_per_layer,
            chess_attn: self.chess_attn_sparsity,
            // The column kernels are chosen per projection from this machine's measurements when
            // there are some (`kiln bench --kernels`); without a table every projection goes column-major.
            chess_kernels: self.chess_sparsity.and_then(|_| load_kernel_table().ok()),
            prune,
            flex,
            coreinfer,
            calibration,
            origin: self.origin(),
            ..Default::default()
        })
    }

    /// The option the passes' errors name (`build_graph` adds it), most specific first.
    fn origin(&self) -> &'static str {
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
        }
    }
}
