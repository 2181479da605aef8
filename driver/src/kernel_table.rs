//! This machine's kernel table (`kiln bench --kernels`): the measured speed of every sparse linear
//! kernel against the dense one at the model's shapes, which kernel selection in `prune` and `chess`
//! reads. Measured once, cached in the Kiln cache directory, refused when it comes from another CPU.

use anyhow::{bail, Context, Result};
use kiln_codegen::kernels::measure;
use kiln_frontend::Model;
use kiln_ir::DType;
use kiln_passes::prune::{
    BitmapMeasurement, ColumnMeasurement, KernelMeasurement, KernelTable, NmMeasurement, KERNEL_TABLE_FORMAT,
};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The N:M patterns `kiln bench --kernels` measures (and `--prune-pattern` can use with a measurement).
pub const NM_PATTERNS: [(usize, usize); 6] = [(1, 4), (2, 4), (3, 4), (1, 8), (2, 8), (4, 8)];

/// The sparsities `kiln bench --kernels` measures the bitmap (unstructured, 1×8) kernels at.
pub const BITMAP_SPARSITIES: [f64; 3] = [0.25, 0.5, 0.7];

/// The active shares of an input-sparse projection's input channels `kiln bench --kernels` measures the
/// column active-channel kernel at (m = 1); `chess` interpolates between them.
pub const COLUMN_DENSITIES: [f64; 8] = [1.0, 0.9, 0.75, 0.6, 0.5, 0.4, 0.3, 0.2];

/// The block-sparse kernel's measured densities.
const BLOCK_DENSITIES: [f64; 11] = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0];

/// Where `kiln bench --kernels` caches its table.
pub fn kernel_table_path() -> PathBuf {
    crate::cache_dir().join("kernel-table.json")
}

/// The cached kernel table, checked to come from this CPU.
pub fn load_kernel_table() -> Result<Arc<KernelTable>> {
    let p = kernel_table_path();
    let text = std::fs::read_to_string(&p).with_context(|| {
        format!("--prune-sparsity needs the kernel table {} (measure it: `kiln bench --kernels`)", p.display())
    })?;
    let t: KernelTable = serde_json::from_str(&text).with_context(|| format!("kernel table {}", p.display()))?;
    if t.format != KERNEL_TABLE_FORMAT || t.version != 1 {
        bail!("kernel table {} has an unknown format; re-run `kiln bench --kernels`", p.display());
    }
    let cpu = kiln_codegen::host_target_info().cpu;
    if t.cpu != cpu {
        bail!(
            "kernel table {} was measured on {}, this CPU is {cpu}; re-run `kiln bench --kernels`",
            p.display(),
            t.cpu
        );
    }
    Ok(Arc::new(t))
}

/// The decoder blocks' linear shapes `(dtype, k, n)` a sparse kernel exists for.
fn linear_shapes(m: &Model) -> Vec<(DType, usize, usize)> {
    let mut shapes = Vec::new();
    for (name, t) in m.weights.iter() {
        if let (Some(_), [n, k]) = (name.strip_prefix("blk."), &t.shape[..]) {
            let s = (t.dtype, *k, *n);
            let ok = kiln_ir::sparse::SPARSE_DTYPES.contains(&t.dtype) || kiln_ir::sparse::NM_DTYPES.contains(&t.dtype);
            if ok && k % 32 == 0 && !shapes.contains(&s) {
                shapes.push(s);
            }
        }
    }
    shapes.sort_by_key(|s| (s.0.name(), s.1, s.2));
    shapes
}

/// CHESS's input-sparse projections on the column layout (down, and the attention projections and
/// gate/up of the other forms): the model's shapes of them whose dtype has one.
fn projection_shapes(m: &Model) -> Vec<(DType, usize, usize)> {
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
}

/// Measures every sparse kernel against the dense one at `m`'s shapes (one thread, `ms` milliseconds a
/// timing run, best of 3 paired runs), reporting each measurement as a line to `line`, and returns the
/// table for this CPU. Stage notes go to stderr.
pub fn measure_kernel_table(m: &Model, ms: u64, line: &mut dyn FnMut(String)) -> Result<KernelTable> {
    let shapes = linear_shapes(m);
    let run = Duration::from_millis(ms);
    eprintln!("[measuring {} shapes × m ∈ {{1, 64}} × {} densities, one thread]", shapes.len(), BLOCK_DENSITIES.len());
    let rows = measure::measure_break_even(&shapes, &[1, 64], &BLOCK_DENSITIES, 3, run)?;
    for r in &rows {
        let ratios: Vec<String> = r.ratios.iter().map(|(d, x)| format!("{d:.2}:{x:.2}")).collect();
        line(format!(
            "{} {}→{} m={:<2} break-even {:.2}  (density:sparse/dense {})",
            r.dtype,
            r.k,
            r.n,
            r.m,
            r.break_even,
            ratios.join(" ")
        ));
    }
    let patterns: Vec<kiln_ir::sparse::NmPattern> =
        NM_PATTERNS.iter().map(|&(n, m)| kiln_ir::sparse::NmPattern::new(n, m)).collect::<Result<_, _>>()?;
    eprintln!("[measuring N:M kernels: {} patterns × m ∈ {{1, 64}}, one thread]", patterns.len());
    let nm = measure::measure_nm(&shapes, &patterns, &[1, 64], 3, run)?;
    for r in &nm {
        line(format!(
            "{} {}→{} m={:<2} {} N:M/dense {:.2}  ({:.1} µs dense, {:.1} µs N:M)",
            r.dtype,
            r.k,
            r.n,
            r.m,
            r.pattern,
            r.ratio,
            r.times.0 * 1e6,
            r.times.1 * 1e6
        ));
    }
    let densities = BITMAP_SPARSITIES.map(|s| 1.0 - s);
    eprintln!(
        "[measuring bitmap kernels: unstructured and 1x8 × sparsity {BITMAP_SPARSITIES:?} × m ∈ {{1, 64}}, one thread]"
    );
    let bm = measure::measure_bitmap(&shapes, &[1, 8], &densities, &[1, 64], 3, run)?;
    for r in &bm {
        line(format!(
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
        ));
    }
    let projections = projection_shapes(m);
    eprintln!(
        "[measuring the column active-channel kernel: {} projection shapes × active {COLUMN_DENSITIES:?}, m = 1, weights streamed, one thread]",
        projections.len()
    );
    let col = measure::measure_column_active(&projections, &COLUMN_DENSITIES, 3, run)?;
    for r in &col {
        line(format!(
            "{} {}→{} m={:<2} column active {:.2} column/dense {:.2}  ({:.1} µs dense, {:.1} µs column)",
            r.dtype,
            r.k,
            r.n,
            r.m,
            r.density,
            r.ratio,
            r.times.0 * 1e6,
            r.times.1 * 1e6
        ));
    }
    Ok(KernelTable {
        format: KERNEL_TABLE_FORMAT.into(),
        version: 1,
        cpu: kiln_codegen::host_target_info().cpu,
        entries: rows
            .iter()
            .map(|r| KernelMeasurement { dtype: r.dtype, k: r.k, n: r.n, m: r.m, break_even: r.break_even })
            .collect(),
        nm: nm
            .iter()
            .map(|r| NmMeasurement { dtype: r.dtype, k: r.k, n: r.n, m: r.m, pattern: r.pattern, ratio: r.ratio })
            .collect(),
        bitmap: bm
            .iter()
            .map(|r| BitmapMeasurement {
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
            .map(|r| ColumnMeasurement { dtype: r.dtype, k: r.k, n: r.n, m: r.m, density: r.density, ratio: r.ratio })
            .collect(),
    })
}

/// Writes `table` where [`load_kernel_table`] reads it; returns the path.
pub fn save_kernel_table(table: &KernelTable) -> Result<PathBuf> {
    let p = kernel_table_path();
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(&p, serde_json::to_string_pretty(table)?).with_context(|| format!("writing {}", p.display()))?;
    Ok(p)
}
