//! `prune`: block-sparse weight pruning (magnitude or Wanda) with sparse-kernel selection (lossy).
//!
//! Every `linear` of a decoder block (`blk.L.*` weights in a format the block-sparse kernel reads) keeps,
//! per output row, the `round((1 − sparsity) · k/32)` 32-element blocks with the largest L2 norm of the
//! weights (`magnitude`) or of `|W_ij|·‖x_j‖` (`wanda`, with the per-channel mean |x| of the calibration
//! file standing in for Wanda's activation norm) — `kiln_ir::sparse`. The linear becomes a
//! `sparse_linear` reading derived weights: the pruned matrix dense (dropped blocks zero) and
//! block-sparse (`<name>#prune-<method><s>`, `….blocks`, `….row_ptr`, `….col_idx`).
//!
//! Kernel selection: per linear and per phase (decode, m < 8; prefill, m ≥ 8) the block-sparse kernel is
//! chosen when the layer's density is at most the break-even density **measured on this machine** for
//! that shape and phase (`kiln bench --kernels` writes the [`KernelTable`]), else the dense kernel on the
//! zeroed matrix; the choice goes into the op's attributes, the manifest and `--explain`.

use crate::{Pass, PassCx, PassError};
use kiln_ir::sparse::bitmap::{prune_bitmap, zero_dropped};
use kiln_ir::sparse::nm::{nm_dense_layout, NM_DTYPES};
use kiln_ir::sparse::{prune_magnitude, prune_nm, prune_wanda, NmPattern, SPARSE_DTYPES};
use kiln_ir::{DType, Dim, Graph, Node, Op, TensorData, TensorType, ValueId};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PruneMethod {
    Magnitude,
    Wanda,
}

impl PruneMethod {
    pub fn name(self) -> &'static str {
        match self {
            PruneMethod::Magnitude => "magnitude",
            PruneMethod::Wanda => "wanda",
        }
    }
}

/// One measured break-even density: the block-sparse kernel was faster than the dense one at every
/// measured density up to `break_even`, for weights of `dtype`, `[n, k]`, and `m` x rows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KernelMeasurement {
    pub dtype: DType,
    pub k: usize,
    pub n: usize,
    pub m: usize,
    pub break_even: f64,
}

/// One measured N:M kernel: its time over the dense kernel's on the unpruned weights (same dtype,
/// `[n, k]`, `m` x rows); below 1 the N:M kernel is faster.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NmMeasurement {
    pub dtype: DType,
    pub k: usize,
    pub n: usize,
    pub m: usize,
    pub pattern: NmPattern,
    pub ratio: f64,
}

/// One measured bitmap-sparse kernel (unstructured or 1×8): its time over the dense kernel's on the
/// unpruned weights at one kept share; below 1 it is faster.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BitmapMeasurement {
    pub dtype: DType,
    pub k: usize,
    pub n: usize,
    pub m: usize,
    pub gran: usize,
    pub density: f64,
    pub ratio: f64,
}

/// One measured column-layout active-channel kernel (`active_linear` on `q4_0c`/`q4_1c`/`q8_0c`, the
/// input-sparse projections of `chess`) at decode (m = 1), weights streamed from memory: its time over
/// the dense kernel's on the row-major `dtype` weight `[n, k]` with a share `density` of the input
/// channels active; below 1 it is faster. `chess` reads it ([`KernelTable::column_ratio`]) to keep a
/// projection on the dense kernel where the column one would not pay.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ColumnMeasurement {
    pub dtype: DType,
    pub k: usize,
    pub n: usize,
    pub m: usize,
    pub density: f64,
    pub ratio: f64,
}

/// What [`KernelTable::column_ratio`] found for one projection.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ColumnChoice {
    /// Column kernel time over the dense kernel's at the asked density.
    pub ratio: f64,
    /// The highest measured active share up to which the column kernel was faster at every measured
    /// share (0: at the lowest already not).
    pub break_even: f64,
    /// The measured shape used, `(k, n)`.
    pub measured: (usize, usize),
}

/// The cached table `kiln bench --kernels` writes (`format` = `kiln-kernel-table`, version 1).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KernelTable {
    pub format: String,
    pub version: u32,
    /// The CPU it was measured on (as LLVM names it); a table from another CPU is not used.
    pub cpu: String,
    pub entries: Vec<KernelMeasurement>,
    /// N:M kernels (absent in tables written before they existed).
    #[serde(default)]
    pub nm: Vec<NmMeasurement>,
    /// Bitmap kernels (absent in tables written before they existed).
    #[serde(default)]
    pub bitmap: Vec<BitmapMeasurement>,
    /// The column-layout active-channel kernel of CHESS's down projection (absent in older tables).
    #[serde(default)]
    pub column: Vec<ColumnMeasurement>,
}

pub const KERNEL_TABLE_FORMAT: &str = "kiln-kernel-table";

/// Which phase a choice is for: decode (m < 8, measured at m = 1) or prefill (m ≥ 8, measured at 64).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Decode,
    Prefill,
}

impl Phase {
    fn measured_m(self) -> usize {
        match self {
            Phase::Decode => 1,
            Phase::Prefill => 64,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Phase::Decode => "decode",
            Phase::Prefill => "prefill",
        }
    }
}

impl KernelTable {
    /// The measured N:M/dense time ratio for a `[n, k]` weight of `dtype` in `phase` (the exact shape,
    /// else the nearest `k·n` of the same dtype and pattern), with a description.
    pub fn nm_ratio(
        &self,
        dtype: DType,
        k: usize,
        n: usize,
        pattern: NmPattern,
        phase: Phase,
    ) -> Option<(f64, String)> {
        let m = phase.measured_m();
        let e = self
            .nm
            .iter()
            .filter(|e| e.dtype == dtype && e.m == m && e.pattern == pattern)
            .min_by_key(|e| (e.k * e.n).abs_diff(k * n) + usize::from(e.k != k || e.n != n))?;
        let shape = if e.k == k && e.n == n { String::new() } else { format!(" (nearest measured {}→{})", e.k, e.n) };
        Some((e.ratio, format!("{}: {pattern} kernel {:.2}× dense time at m={m}{shape}", phase.name(), e.ratio)))
    }

    /// The column/dense decode time ratio for a `[n, k]` weight of `dtype` with a share `density` of its
    /// input channels active: the exact shape's measurements (else the nearest measured `k·n` of that
    /// dtype), linearly interpolated in density (clamped to the measured range); `None` without a
    /// measurement of the dtype. Also the break-even: the highest measured density up to which the
    /// column kernel was faster at every measured density, 0 if none (as for block-sparse kernels).
    pub fn column_ratio(&self, dtype: DType, k: usize, n: usize, density: f64) -> Option<ColumnChoice> {
        let key = |e: &ColumnMeasurement| (e.k * e.n).abs_diff(k * n) + usize::from(e.k != k || e.n != n);
        let near = self.column.iter().filter(|e| e.dtype == dtype && e.m == 1).min_by_key(|e| key(e))?;
        let mut pts: Vec<(f64, f64)> = self
            .column
            .iter()
            .filter(|e| e.dtype == dtype && e.m == 1 && e.k == near.k && e.n == near.n)
            .map(|e| (e.density, e.ratio))
            .collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let ratio = match pts.iter().position(|p| p.0 >= density) {
            None => pts.last()?.1,
            Some(0) => pts[0].1,
            Some(i) => {
                let ((d0, r0), (d1, r1)) = (pts[i - 1], pts[i]);
                if d1 > d0 {
                    r0 + (r1 - r0) * (density - d0) / (d1 - d0)
                } else {
                    r1
                }
            }
        };
        let break_even = pts.iter().take_while(|p| p.1 < 1.0).last().map_or(0.0, |p| p.0);
        Some(ColumnChoice { ratio, break_even, measured: (near.k, near.n) })
    }

    /// The measured bitmap/dense time ratio for a `[n, k]` weight of `dtype`, granularity `gran`, kept
    /// share `density`, in `phase` (the nearest measured shape, then the nearest measured density), with
    /// a description.
    pub fn bitmap_ratio(
        &self,
        dtype: DType,
        k: usize,
        n: usize,
        gran: usize,
        density: f64,
        phase: Phase,
    ) -> Option<(f64, String)> {
        let m = phase.measured_m();
        let e = self.bitmap.iter().filter(|e| e.dtype == dtype && e.m == m && e.gran == gran).min_by(|a, b| {
            let key = |e: &BitmapMeasurement| (e.k * e.n).abs_diff(k * n) + usize::from(e.k != k || e.n != n);
            key(a).cmp(&key(b)).then((a.density - density).abs().total_cmp(&(b.density - density).abs()))
        })?;
        let shape = if e.k == k && e.n == n { String::new() } else { format!(", nearest measured {}→{}", e.k, e.n) };
        Some((
            e.ratio,
            format!(
                "{}: bitmap kernel {:.2}× dense time at m={m} (measured at density {:.2}{shape})",
                phase.name(),
                e.ratio,
                e.density
            ),
        ))
    }

    /// Sparse or dense for a `[n, k]` weight of `dtype` at `density`, with the reason. Uses the exact
    /// shape's measurement, else the same dtype's with the nearest `k·n`; with none, dense.
    pub fn choose(&self, dtype: DType, k: usize, n: usize, density: f64, phase: Phase) -> (bool, String) {
        let m = phase.measured_m();
        let same: Vec<&KernelMeasurement> = self.entries.iter().filter(|e| e.dtype == dtype && e.m == m).collect();
        let Some(e) = same.iter().min_by_key(|e| (e.k * e.n).abs_diff(k * n) + usize::from(e.k != k || e.n != n))
        else {
            return (false, format!("{}: no measurement for {dtype} at m = {m}: dense", phase.name()));
        };
        let shape = if e.k == k && e.n == n { String::new() } else { format!(" (nearest measured {}→{})", e.k, e.n) };
        let sparse = density <= e.break_even;
        let why = format!(
            "{}: density {density:.2} {} break-even {:.2} measured for {dtype} {}→{} m={m}{shape}: {}",
            phase.name(),
            if sparse { "≤" } else { ">" },
            e.break_even,
            k,
            n,
            if sparse { "block-sparse" } else { "dense" }
        );
        (sparse, why)
    }
}

/// The pass, configured.
#[derive(Clone, Debug)]
pub struct Prune {
    pub method: PruneMethod,
    /// Share of each row's blocks dropped, in [0, 1).
    pub sparsity: f64,
    pub table: Option<Arc<KernelTable>>,
    /// N:M pruning instead of 32-element blocks (`sparsity` is then ignored: the pattern fixes it).
    pub pattern: Option<NmPattern>,
    /// Unstructured (1) or 1×8 (8) pruning instead of 32-element blocks, `sparsity` of every row.
    pub bitmap: Option<usize>,
}

/// A `linear` of a decoder block's weight: (weight name, layer, role suffix such as `ffn_down.weight`).
fn block_linear<'g>(g: &'g Graph, n: &Node) -> Option<(String, usize, &'g str)> {
    match (&n.op, n.inputs.get(1).map(|w| &g.node(*w).op)) {
        (Op::Linear, Some(Op::Weight { name })) => layer_and_suffix(name).map(|(l, s)| (name.clone(), l, s)),
        _ => None,
    }
}

/// The weight `name` and its shape as a matrix `[rows, k]`.
fn weight_matrix(cx: &PassCx, name: &str) -> Result<(TensorData, usize, usize), String> {
    let w = cx.weights.borrow().get(name).cloned().ok_or_else(|| format!("weight `{name}` missing"))?;
    let [rows, k] = w.shape[..] else { return Err(format!("`{name}` is not a matrix")) };
    Ok((w, rows, k))
}

fn layer_and_suffix(name: &str) -> Option<(usize, &str)> {
    let (l, s) = name.strip_prefix("blk.")?.split_once('.')?;
    // A derived weight (`blk.L.<suffix>#<what>`, e.g. structurally pruned) has its base's role.
    Some((l.parse().ok()?, s.split_once('#').map_or(s, |(base, _)| base)))
}

fn i32_tensor(v: &[u32]) -> TensorData {
    let bytes: Vec<u8> = v.iter().flat_map(|x| (*x as i32).to_le_bytes()).collect();
    TensorData { dtype: DType::I32, shape: vec![v.len()], bytes: bytes.into() }
}

impl Pass for Prune {
    fn name(&self) -> &'static str {
        "prune"
    }

    fn run(&self, g: &mut Graph, cx: &PassCx) -> Result<bool, PassError> {
        let fail = |msg: String| PassError::Failed { pass: "prune", msg };
        if let Some(p) = self.pattern {
            return self.run_nm(g, cx, p);
        }
        if !(0.0..1.0).contains(&self.sparsity) {
            return Err(fail(format!("sparsity {} is outside [0, 1)", self.sparsity)));
        }
        if let Some(gran) = self.bitmap {
            return self.run_bitmap(g, cx, gran);
        }
        let (table, cal) = self.requirements(cx)?;
        let density = 1.0 - self.sparsity;
        let tag = format!("prune-{}{}", self.method.name(), self.sparsity);
        let mut out = Graph::new(g.name.clone());
        let mut map: Vec<ValueId> = Vec::with_capacity(g.nodes.len());
        let mut records = Vec::new();
        let err = |e: kiln_ir::GraphError| fail(e.to_string());
        for n in &g.nodes {
            let copy = |out: &mut Graph, map: &[ValueId]| crate::copy_node(out, map, n);
            let Some((name, layer, suffix)) = block_linear(g, n) else {
                map.push(copy(&mut out, &map));
                continue;
            };
            let (w, rows, k) = weight_matrix(cx, &name).map_err(fail)?;
            if !SPARSE_DTYPES.contains(&w.dtype) || !k.is_multiple_of(32) {
                cx.explain(
                    "prune",
                    format!("{name}: {} [{rows}, {k}] has no block-sparse kernel: kept dense", w.dtype),
                );
                map.push(copy(&mut out, &map));
                continue;
            }
            let sparse = match self.method {
                PruneMethod::Magnitude => prune_magnitude(w.dtype, rows, k, &w.bytes, density),
                PruneMethod::Wanda => {
                    let norms = act_norms(cal.expect("checked"), &name, layer, suffix, k).map_err(fail)?;
                    prune_wanda(w.dtype, rows, k, &w.bytes, norms, density)
                }
            }
            .map_err(|e| fail(format!("{name}: {e}")))?;
            sparse.validate().map_err(|e| fail(format!("{name}: {e}")))?;
            if sparse.nnz_blocks() == 0 {
                return Err(fail(format!("{name}: sparsity {} keeps no block of {} per row", self.sparsity, k / 32)));
            }
            let dense = sparse.to_dense().map_err(|e| fail(format!("{name}: {e}")))?;
            let kept = sparse.density();
            let (dec, why_d) = table.choose(w.dtype, k, rows, kept, Phase::Decode);
            let (pre, why_p) = table.choose(w.dtype, k, rows, kept, Phase::Prefill);
            cx.explain("prune", format!("{name}: {why_d}; {why_p}"));
            records.push(serde_json::json!({"weight": name, "density": kept, "decode": if dec {"sparse"} else {"dense"}, "prefill": if pre {"sparse"} else {"dense"}}));
            let base = format!("{name}#{tag}");
            let nnz = sparse.nnz_blocks();
            let derived = [
                (base.clone(), TensorData { dtype: w.dtype, shape: w.shape.clone(), bytes: dense.into() }),
                (
                    format!("{base}.blocks"),
                    TensorData { dtype: w.dtype, shape: vec![nnz * 32], bytes: sparse.data.clone().into() },
                ),
                (format!("{base}.row_ptr"), i32_tensor(&sparse.row_ptr)),
                (format!("{base}.col_idx"), i32_tensor(&sparse.col_idx)),
            ];
            let mut ids = vec![map[n.inputs[0].index()]];
            for (dname, t) in derived {
                let ty = TensorType::new(t.dtype, t.shape.iter().map(|&d| Dim::from(d)).collect());
                ids.push(out.weight(&dname, ty).map_err(err)?);
                cx.weights.borrow_mut().insert(dname, t);
            }
            let op = Op::SparseLinear { decode: dec as i64, prefill: pre as i64 };
            map.push(out.add(op, &ids).map_err(err)?);
        }
        out.outputs = g.outputs.iter().map(|(name, v)| (name.clone(), map[v.index()])).collect();
        let changed = !records.is_empty();
        *g = out;
        cx.record(
            "prune",
            serde_json::json!({"method": self.method.name(), "sparsity": self.sparsity, "kernel_table_cpu": table.cpu, "linears": records}),
        );
        Ok(changed)
    }
}

/// The calibration's per-channel mean |x| of the input of the linear `suffix` of `layer` (`k` entries).
fn act_norms<'c>(
    cal: &'c crate::calibration::Calibration,
    name: &str,
    layer: usize,
    suffix: &str,
    k: usize,
) -> Result<&'c [f32], String> {
    let st = cal.layers.get(layer).ok_or_else(|| format!("no calibration for layer {layer}"))?;
    let norms = match suffix {
        "attn_q.weight" | "attn_k.weight" | "attn_v.weight" => &st.attn_in_mean_abs,
        "attn_output.weight" => &st.attn_out_in_mean_abs,
        "ffn_gate.weight" | "ffn_up.weight" => &st.ffn_in_mean_abs,
        "ffn_down.weight" => &st.ffn_act_mean_abs,
        _ => return Err(format!("{name}: no calibrated activations for its input")),
    };
    if norms.len() != k {
        return Err(format!("{name}: calibration has {} input channels, weight {k}", norms.len()));
    }
    Ok(norms)
}

impl Prune {
    /// What every form of the pass needs: the measured kernel table, and the calibration when ranking by
    /// Wanda (its activation norms).
    fn requirements<'a>(
        &'a self,
        cx: &'a PassCx,
    ) -> Result<(&'a KernelTable, Option<&'a crate::calibration::Calibration>), PassError> {
        let fail = |msg: &str| PassError::Failed { pass: "prune", msg: msg.into() };
        let table = self
            .table
            .as_deref()
            .ok_or_else(|| fail("needs the measured kernel table (run `kiln bench --kernels` on this machine)"))?;
        let cal = cx.calibration.as_deref();
        if self.method == PruneMethod::Wanda && cal.is_none() {
            return Err(fail("--prune-method wanda needs --calibration FILE (activation norms)"));
        }
        Ok((table, cal))
    }

    /// N:M pruning: every eligible linear is computed, per phase ([`choose_compact`]), by the N:M kernel
    /// on the compact form or, where the measured N:M kernel is slower than dense in that phase and the
    /// dtype holds an exact 0 (f32, f16, Q4_0, Q8_0), by the dense kernel on the pruned matrix in its
    /// own dtype ([`Compacted::place`]).
    fn run_nm(&self, g: &mut Graph, cx: &PassCx, p: NmPattern) -> Result<bool, PassError> {
        let fail = |msg: String| PassError::Failed { pass: "prune", msg };
        let (table, cal) = self.requirements(cx)?;
        let tag = format!("prune-{}{}of{}", self.method.name(), p.keep, p.group);
        let mut out = Graph::new(g.name.clone());
        let mut map: Vec<ValueId> = Vec::with_capacity(g.nodes.len());
        let mut records = Vec::new();
        for n in &g.nodes {
            let copy = |out: &mut Graph, map: &[ValueId]| crate::copy_node(out, map, n);
            let Some((name, layer, suffix)) = block_linear(g, n) else {
                map.push(copy(&mut out, &map));
                continue;
            };
            let (w, rows, k) = weight_matrix(cx, &name).map_err(fail)?;
            if !NM_DTYPES.contains(&w.dtype) || !k.is_multiple_of(32) {
                cx.explain("prune", format!("{name}: {} [{rows}, {k}] has no N:M kernel: kept dense", w.dtype));
                map.push(copy(&mut out, &map));
                continue;
            }
            let norms = match self.method {
                PruneMethod::Magnitude => None,
                PruneMethod::Wanda => Some(act_norms(cal.expect("checked"), &name, layer, suffix, k).map_err(fail)?),
            };
            let nm = prune_nm(w.dtype, p, rows, k, &w.bytes, norms).map_err(|e| fail(format!("{name}: {e}")))?;
            nm.validate().map_err(|e| fail(format!("{name}: {e}")))?;
            let ratios = [Phase::Decode, Phase::Prefill].map(|ph| table.nm_ratio(w.dtype, k, rows, p, ph));
            let dense = nm_dense_layout(&nm).map_err(|e| fail(format!("{name}: {e}")))?;
            let packed =
                TensorData { dtype: DType::I32, shape: vec![rows, nm.row_bytes() / 4], bytes: nm.data.clone().into() };
            let c = Compacted {
                kind: "N:M",
                layout: "nm",
                name: name.clone(),
                base: format!("{name}#{tag}"),
                head: p.to_string(),
                density: p.density(),
                shape: w.shape.clone(),
                dtype: w.dtype,
                packed,
                dense,
                ratios,
            };
            let (dtype, keep, group) = (w.dtype, p.keep as i64, p.group as i64);
            let op = |decode, prefill| Op::NmLinear { dtype, keep, group, decode, prefill };
            let y = c.place(&mut out, cx, &mut records, map[n.inputs[0].index()], op)?;
            map.push(y);
        }
        out.outputs = g.outputs.iter().map(|(name, v)| (name.clone(), map[v.index()])).collect();
        let changed = !records.is_empty();
        *g = out;
        cx.record(
            "prune",
            serde_json::json!({"method": self.method.name(), "pattern": p.to_string(), "kernel_table_cpu": table.cpu, "linears": records}),
        );
        Ok(changed)
    }
}

impl Prune {
    /// Unstructured / 1×8 pruning: every eligible linear keeps `round((1 − sparsity) · k)` elements per
    /// row (runs of 8 for 1×8) and is computed, per phase, by the bitmap kernel on the compact form or,
    /// where the measured bitmap kernel is slower than dense in that phase and the dtype holds an exact
    /// 0 (f32, f16, Q4_0, Q8_0), by the dense kernel on the pruned matrix in its own dtype (as N:M). At
    /// sparsity 0 nothing is dropped and the linear stays as it is.
    fn run_bitmap(&self, g: &mut Graph, cx: &PassCx, gran: usize) -> Result<bool, PassError> {
        let fail = |msg: String| PassError::Failed { pass: "prune", msg };
        let (table, cal) = self.requirements(cx)?;
        let what = if gran == 1 { "unstructured".to_string() } else { format!("1x{gran}") };
        let tag = format!("prune-{}-{what}{}", self.method.name(), self.sparsity);
        let density = 1.0 - self.sparsity;
        let mut out = Graph::new(g.name.clone());
        let mut map: Vec<ValueId> = Vec::with_capacity(g.nodes.len());
        let mut records = Vec::new();
        for n in &g.nodes {
            let copy = |out: &mut Graph, map: &[ValueId]| crate::copy_node(out, map, n);
            let Some((name, layer, suffix)) = block_linear(g, n) else {
                map.push(copy(&mut out, &map));
                continue;
            };
            let (w, rows, k) = weight_matrix(cx, &name).map_err(fail)?;
            if !NM_DTYPES.contains(&w.dtype) || !k.is_multiple_of(32) {
                cx.explain("prune", format!("{name}: {} [{rows}, {k}] has no bitmap kernel: kept dense", w.dtype));
                map.push(copy(&mut out, &map));
                continue;
            }
            if self.sparsity == 0.0 {
                cx.explain("prune", format!("{name}: {what} sparsity 0 drops nothing: dense"));
                map.push(copy(&mut out, &map));
                continue;
            }
            let norms = match self.method {
                PruneMethod::Magnitude => None,
                PruneMethod::Wanda => Some(act_norms(cal.expect("checked"), &name, layer, suffix, k).map_err(fail)?),
            };
            let bm = prune_bitmap(w.dtype, gran, rows, k, &w.bytes, density, norms)
                .map_err(|e| fail(format!("{name}: {e}")))?;
            bm.validate().map_err(|e| fail(format!("{name}: {e}")))?;
            if bm.kept == 0 {
                return Err(fail(format!("{name}: sparsity {} keeps nothing of {k} per row", self.sparsity)));
            }
            let kept = bm.density();
            let ratios = [Phase::Decode, Phase::Prefill].map(|ph| table.bitmap_ratio(w.dtype, k, rows, gran, kept, ph));
            let mask = bm.mask().map_err(|e| fail(format!("{name}: {e}")))?;
            let dense = zero_dropped(w.dtype, k, &w.bytes, &mask);
            let shape = vec![rows, bm.layout().row_bytes / 4];
            let packed = TensorData { dtype: DType::I32, shape, bytes: bm.data.clone().into() };
            let c = Compacted {
                kind: "bitmap",
                layout: "bitmap",
                name: name.clone(),
                base: format!("{name}#{tag}"),
                head: format!("{what} density {kept:.2}"),
                density: kept,
                shape: w.shape.clone(),
                dtype: w.dtype,
                packed,
                dense,
                ratios,
            };
            let (dtype, gran, kept) = (w.dtype, gran as i64, bm.kept as i64);
            let op = |decode, prefill| Op::BitmapLinear { dtype, gran, kept, decode, prefill };
            let y = c.place(&mut out, cx, &mut records, map[n.inputs[0].index()], op)?;
            map.push(y);
        }
        out.outputs = g.outputs.iter().map(|(name, v)| (name.clone(), map[v.index()])).collect();
        let changed = !records.is_empty();
        *g = out;
        cx.record(
            "prune",
            serde_json::json!({"method": self.method.name(), "pattern": what, "sparsity": self.sparsity, "kernel_table_cpu": table.cpu, "linears": records}),
        );
        Ok(changed)
    }
}

/// One phase's kernel for a linear pruned to a compact form (`kind`: `N:M` or `bitmap`), with the reason:
/// the compact kernel (true) when `dtype` has no exact dense layout of the pruned matrix (`has_dense`
/// false: Q4_1's blocks have an offset, so a dropped weight is not 0) or when its measured time over the
/// dense kernel's in `phase` is at most 1; else the dense kernel on that layout, also when nothing was
/// measured for this dtype and phase.
pub fn choose_compact(
    kind: &str,
    dtype: DType,
    has_dense: bool,
    measured: Option<&(f64, String)>,
    phase: Phase,
) -> (bool, String) {
    match (measured, has_dense) {
        (m, false) => {
            let what = m.map_or_else(|| phase.name().to_string(), |(_, d)| d.clone());
            (true, format!("{what}; {dtype} has no exact dense layout of the pruned matrix: {kind} kernel"))
        }
        (None, true) => (
            false,
            format!("{}: no {kind} measurement for {dtype} at m={}: dense layout", phase.name(), phase.measured_m()),
        ),
        (Some((r, d)), true) if *r <= 1.0 => (true, format!("{d}, no slower than dense: {kind} kernel")),
        (Some((_, d)), true) => (false, format!("{d}, slower than dense: dense layout (zeros stored)")),
    }
}

/// A linear pruned to a compact form (N:M or bitmap): the form, the same matrix dense in the weight's
/// dtype where that dtype holds an exact 0, and the measured compact/dense time ratios at decode and
/// prefill.
struct Compacted {
    /// `N:M` or `bitmap` (explanations).
    kind: &'static str,
    /// `nm` or `bitmap`: the compact form's kernel in the manifest and its weight's suffix.
    layout: &'static str,
    /// The weight's name, the derived weights' base name (`<name>#<tag>`), what the explanation says
    /// first (pattern, density), and the kept share.
    name: String,
    base: String,
    head: String,
    density: f64,
    /// The weight's shape `[n, k]` and dtype.
    shape: Vec<usize>,
    dtype: DType,
    packed: TensorData,
    /// The dense layout's bytes (the pruned matrix in `dtype`).
    dense: Option<Vec<u8>>,
    /// The measured ratio and its description at decode, then prefill.
    ratios: [Option<(f64, String)>; 2],
}

impl Compacted {
    /// Chooses each phase's kernel ([`choose_compact`]), explains and records the choice, and adds the
    /// linear of `x` to `out`: `op(1, 1)` on the compact form (`<base>.<layout>`) when both phases take
    /// the compact kernel, a plain `linear` on the dense layout (`<base>`) when both take the dense one,
    /// else `op(decode, prefill)` on both layouts (the generated wrapper branches on m < 8).
    fn place(
        self,
        out: &mut Graph,
        cx: &PassCx,
        records: &mut Vec<serde_json::Value>,
        x: ValueId,
        op: impl Fn(i64, i64) -> Op,
    ) -> Result<ValueId, PassError> {
        let fail = |e: kiln_ir::GraphError| PassError::Failed { pass: "prune", msg: e.to_string() };
        let has_dense = self.dense.is_some();
        let phases = [Phase::Decode, Phase::Prefill];
        let [(dec, why_d), (pre, why_p)] =
            [0, 1].map(|i| choose_compact(self.kind, self.dtype, has_dense, self.ratios[i].as_ref(), phases[i]));
        cx.explain("prune", format!("{}: {}; {why_d}; {why_p}", self.name, self.head));
        let kernel = |compact: bool| if compact { self.layout } else { "dense" };
        records.push(serde_json::json!({
            "weight": self.name,
            "density": self.density,
            "decode": kernel(dec),
            "prefill": kernel(pre),
            "decode_ratio": self.ratios[0].as_ref().map(|d| d.0),
            "prefill_ratio": self.ratios[1].as_ref().map(|d| d.0),
        }));
        let mut add = |dname: String, t: TensorData| {
            let ty = TensorType::new(t.dtype, t.shape.iter().map(|&d| Dim::from(d)).collect());
            let id = out.weight(&dname, ty).map_err(fail)?;
            cx.weights.borrow_mut().insert(dname, t);
            Ok::<ValueId, PassError>(id)
        };
        let mut ids = vec![x];
        if dec || pre {
            ids.push(add(format!("{}.{}", self.base, self.layout), self.packed)?);
        }
        if !(dec && pre) {
            let bytes = self.dense.expect("a phase takes the dense kernel only where there is a dense layout");
            ids.push(add(self.base, TensorData { dtype: self.dtype, shape: self.shape, bytes: bytes.into() })?);
        }
        let op = if dec || pre { op(dec as i64, pre as i64) } else { Op::Linear };
        out.add(op, &ids).map_err(fail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(break_even: f64) -> KernelTable {
        let e = |m| KernelMeasurement { dtype: DType::Q4_1, k: 576, n: 1536, m, break_even };
        KernelTable {
            format: KERNEL_TABLE_FORMAT.into(),
            version: 1,
            cpu: "test".into(),
            entries: vec![e(1), e(64)],
            nm: vec![],
            bitmap: vec![],
            column: vec![],
        }
    }

    #[test]
    fn selection_follows_the_measured_break_even() {
        let t = table(0.4);
        // Below break-even: sparse; above: dense; at it: sparse (it won there).
        assert!(t.choose(DType::Q4_1, 576, 1536, 0.3, Phase::Decode).0);
        assert!(t.choose(DType::Q4_1, 576, 1536, 0.4, Phase::Prefill).0);
        let (s, why) = t.choose(DType::Q4_1, 576, 1536, 0.5, Phase::Decode);
        assert!(!s && why.contains("> break-even 0.40"), "{why}");
        // Another shape uses the nearest measured one and says so; another dtype has none: dense.
        let (s, why) = t.choose(DType::Q4_1, 1536, 576, 0.1, Phase::Decode);
        assert!(s && why.contains("nearest measured 576→1536"), "{why}");
        let (s, why) = t.choose(DType::Q8_0, 576, 1536, 0.1, Phase::Decode);
        assert!(!s && why.contains("no measurement"), "{why}");
        // Per phase: a table where decode breaks even at 0.9 and prefill at 0.3.
        let mut t = table(0.9);
        t.entries[1].break_even = 0.3;
        assert!(t.choose(DType::Q4_1, 576, 1536, 0.5, Phase::Decode).0);
        assert!(!t.choose(DType::Q4_1, 576, 1536, 0.5, Phase::Prefill).0);
    }

    #[test]
    fn column_ratio_interpolates_the_nearest_measured_shape() {
        let col = |k, n, density, ratio| ColumnMeasurement { dtype: DType::Q4_1, k, n, m: 1, density, ratio };
        let mut t = table(0.5);
        t.column = vec![
            col(576, 192, 1.0, 1.2),
            col(576, 192, 0.5, 1.5),
            col(1536, 576, 1.0, 1.0),
            col(1536, 576, 0.5, 0.7),
            col(1536, 576, 0.3, 0.6),
            col(576, 1536, 0.3, 0.6),
            col(576, 1536, 0.7, 1.05),
            col(576, 1536, 1.0, 0.9),
        ];
        let c = t.column_ratio(DType::Q4_1, 1536, 576, 0.4).unwrap();
        assert!((c.ratio - 0.65).abs() < 1e-12 && c.break_even == 0.5 && c.measured == (1536, 576), "{c:?}");
        // Clamped outside the measured densities; never faster on 576 → 192: break-even 0.
        assert!((t.column_ratio(DType::Q4_1, 1536, 576, 0.1).unwrap().ratio - 0.6).abs() < 1e-12);
        let kv = t.column_ratio(DType::Q4_1, 576, 192, 0.7).unwrap();
        assert!((kv.ratio - 1.38).abs() < 1e-12 && kv.break_even == 0.0, "{kv:?}");
        // The break-even stops at the first share where the column kernel lost, however later ones went.
        assert_eq!(t.column_ratio(DType::Q4_1, 576, 1536, 0.9).unwrap().break_even, 0.3);
        // An unmeasured shape takes the nearest k·n (576 → 256 is nearest 576 → 192); no dtype: none.
        assert_eq!(t.column_ratio(DType::Q4_1, 576, 256, 0.7).unwrap().measured, (576, 192));
        assert!(t.column_ratio(DType::Q8_0, 1536, 576, 0.5).is_none());
    }

    /// A table with one N:M (2:4) and one bitmap (unstructured, density 0.5) measurement of `dtype`
    /// [64, 64] per phase.
    fn phase_table(dtype: DType, decode: f64, prefill: f64) -> KernelTable {
        let pattern = NmPattern::new(2, 4).unwrap();
        let nm =
            [(1, decode), (64, prefill)].map(|(m, ratio)| NmMeasurement { dtype, k: 64, n: 64, m, pattern, ratio });
        let bitmap = [(1, decode), (64, prefill)].map(|(m, ratio)| BitmapMeasurement {
            dtype,
            k: 64,
            n: 64,
            m,
            gran: 1,
            density: 0.5,
            ratio,
        });
        KernelTable {
            format: KERNEL_TABLE_FORMAT.into(),
            version: 1,
            cpu: "test".into(),
            entries: vec![],
            nm: nm.to_vec(),
            bitmap: bitmap.to_vec(),
            column: vec![],
        }
    }

    #[test]
    fn compact_or_dense_is_chosen_per_phase_from_the_measured_ratio() {
        let p = NmPattern::new(2, 4).unwrap();
        let t = phase_table(DType::F32, 0.5, 1.5);
        let [d, pf] = [Phase::Decode, Phase::Prefill].map(|ph| t.nm_ratio(DType::F32, 64, 64, p, ph));
        // Decode measured faster: N:M; prefill slower: the dense layout. At exactly 1: compact.
        let (c, why) = choose_compact("N:M", DType::F32, true, d.as_ref(), Phase::Decode);
        assert!(c && why.starts_with("decode: 2:4 kernel 0.50×") && why.ends_with("N:M kernel"), "{why}");
        let (c, why) = choose_compact("N:M", DType::F32, true, pf.as_ref(), Phase::Prefill);
        assert!(!c && why.starts_with("prefill: 2:4 kernel 1.50×") && why.contains("dense layout (zeros"), "{why}");
        assert!(choose_compact("N:M", DType::F32, true, Some(&(1.0, String::new())), Phase::Prefill).0);
        // The reverse (bitmap): dense at decode, compact at prefill.
        let t = phase_table(DType::Q8_0, 1.2, 0.8);
        let [d, pf] = [Phase::Decode, Phase::Prefill].map(|ph| t.bitmap_ratio(DType::Q8_0, 64, 64, 1, 0.5, ph));
        assert!(!choose_compact("bitmap", DType::Q8_0, true, d.as_ref(), Phase::Decode).0);
        assert!(choose_compact("bitmap", DType::Q8_0, true, pf.as_ref(), Phase::Prefill).0);
        // No dense layout (Q4_1): compact in both phases, whatever was measured, and it says why.
        for ph in [Phase::Decode, Phase::Prefill] {
            let (c, why) = choose_compact("N:M", DType::Q4_1, false, Some(&(3.0, "x".into())), ph);
            assert!(c && why.contains("q4_1 has no exact dense layout"), "{why}");
            let (c, why) = choose_compact("N:M", DType::Q4_1, false, None, ph);
            assert!(c && why.contains("no exact dense layout"), "{why}");
        }
        // No measurement for this dtype/phase: the dense layout where there is one.
        let (c, why) = choose_compact("bitmap", DType::Q4_0, true, None, Phase::Prefill);
        assert!(!c && why == "prefill: no bitmap measurement for q4_0 at m=64: dense layout", "{why}");
    }

    /// The pass on a one-linear graph: both phases compact → `nm_linear` on the compact form only; both
    /// dense → a plain `linear` on the dense layout only; mixed → `nm_linear`/`bitmap_linear` with the
    /// phase attributes and both layouts (the dense one the pruned matrix); the record names each
    /// phase's kernel with both ratios.
    #[test]
    fn mixed_phases_store_both_layouts() {
        let k: usize = 64;
        let vals: Vec<f32> = (0..64 * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0 + 0.01).collect();
        let graph = || {
            let mut g = Graph::new("t");
            let x = g.input("x", TensorType::new(DType::F32, vec![Dim::sym("seq"), Dim::from(k)])).unwrap();
            let w =
                g.weight("blk.0.ffn_up.weight", TensorType::new(DType::F32, vec![Dim::from(64usize), Dim::from(k)]));
            let y = g.add(Op::Linear, &[x, w.unwrap()]).unwrap();
            g.output("y", y);
            g
        };
        let nm = Some(NmPattern::new(2, 4).unwrap());
        let cases = [
            (nm, None, 0.5, 0.7, Some((1, 1)), "nm", "nm"),
            (nm, None, 1.5, 1.2, None, "dense", "dense"),
            (nm, None, 0.5, 1.5, Some((1, 0)), "nm", "dense"),
            (None, Some(1), 1.5, 0.5, Some((0, 1)), "dense", "bitmap"),
        ];
        for (pattern, bitmap, dec, pre, want_attrs, want_d, want_p) in cases {
            let cx = PassCx::default();
            cx.weights.borrow_mut().insert("blk.0.ffn_up.weight", TensorData::from_f32(vec![64, k], &vals));
            let table = Some(Arc::new(phase_table(DType::F32, dec, pre)));
            let pass = Prune { method: PruneMethod::Magnitude, sparsity: 0.5, table, pattern, bitmap };
            let mut g = graph();
            assert!(pass.run(&mut g, &cx).unwrap());
            g.verify().unwrap();
            let y = &g.nodes[g.output_named("y").unwrap().index()];
            let weights: Vec<String> = y.inputs[1..]
                .iter()
                .map(|v| match &g.node(*v).op {
                    Op::Weight { name } => name.clone(),
                    op => panic!("{op:?}"),
                })
                .collect();
            let attrs = match &y.op {
                Op::NmLinear { decode, prefill, .. } | Op::BitmapLinear { decode, prefill, .. } => {
                    Some((*decode, *prefill))
                }
                Op::Linear => None,
                op => panic!("{op:?}"),
            };
            assert_eq!(attrs, want_attrs, "{dec}/{pre}");
            let compact = weights.iter().filter(|n| n.ends_with(".nm") || n.ends_with(".bitmap")).count();
            let dense: Vec<&String> =
                weights.iter().filter(|n| !n.ends_with(".nm") && !n.ends_with(".bitmap")).collect();
            assert_eq!(compact, usize::from(want_d != "dense" || want_p != "dense"), "{weights:?}");
            assert_eq!(dense.len(), usize::from(want_d == "dense" || want_p == "dense"), "{weights:?}");
            if let Some(d) = dense.first() {
                // The dense layout is the pruned matrix: half of every row zero, the rest the weights'.
                let t = cx.weights.borrow().get(d).unwrap().to_f32().unwrap();
                assert_eq!(t.iter().filter(|v| **v == 0.0).count(), 64 * k / 2);
                assert!(t.iter().zip(&vals).all(|(a, b)| *a == 0.0 || a == b));
            }
            let rec = &cx.records.borrow()[0].detail["linears"][0];
            assert_eq!((rec["decode"].as_str().unwrap(), rec["prefill"].as_str().unwrap()), (want_d, want_p));
            assert_eq!((rec["decode_ratio"].as_f64(), rec["prefill_ratio"].as_f64()), (Some(dec), Some(pre)));
            let why = &cx.explanations.borrow()[0].1;
            assert!(why.contains("decode: ") && why.contains("prefill: "), "{why}");
        }
    }
}
