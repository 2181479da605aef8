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

/// `n` copied into `out` with its inputs mapped.
fn copy_node(out: &mut Graph, map: &[ValueId], n: &Node) -> ValueId {
    let inputs = n.inputs.iter().map(|v| map[v.index()]).collect();
    out.nodes.push(Node { op: n.op.clone(), inputs, ty: n.ty.clone() });
    ValueId(out.nodes.len() as u32 - 1)
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
            let copy = |out: &mut Graph, map: &[ValueId]| copy_node(out, map, n);
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

    /// N:M pruning: every eligible linear becomes `nm_linear` on the compact form, or, where the
    /// measured N:M kernel is slower than dense at decode and the dtype holds an exact 0 (f32, f16,
    /// Q4_0, Q8_0), a plain `linear` on the pruned matrix in its own dtype.
    fn run_nm(&self, g: &mut Graph, cx: &PassCx, p: NmPattern) -> Result<bool, PassError> {
        let fail = |msg: String| PassError::Failed { pass: "prune", msg };
        let (table, cal) = self.requirements(cx)?;
        let tag = format!("prune-{}{}of{}", self.method.name(), p.keep, p.group);
        let mut out = Graph::new(g.name.clone());
        let mut map: Vec<ValueId> = Vec::with_capacity(g.nodes.len());
        let mut records = Vec::new();
        let err = |e: kiln_ir::GraphError| fail(e.to_string());
        for n in &g.nodes {
            let copy = |out: &mut Graph, map: &[ValueId]| copy_node(out, map, n);
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
            let dec = table.nm_ratio(w.dtype, k, rows, p, Phase::Decode);
            let pre = table.nm_ratio(w.dtype, k, rows, p, Phase::Prefill);
            let dense = nm_dense_layout(&nm).map_err(|e| fail(format!("{name}: {e}")))?;
            let (use_nm, why) = match (&dec, &dense) {
                (_, None) => (true, format!("{} has no exact dense layout of the pruned matrix: N:M kernel", w.dtype)),
                (None, Some(_)) => (false, format!("no N:M measurement for {} {p}: dense layout", w.dtype)),
                (Some((r, _)), Some(_)) if *r <= 1.0 => (true, "N:M kernel no slower than dense at decode: N:M".into()),
                (Some(_), Some(_)) => {
                    (false, "N:M kernel slower than dense at decode: dense layout (zeros stored)".into())
                }
            };
            let measured: Vec<&str> = [&dec, &pre].iter().filter_map(|m| m.as_ref().map(|(_, s)| s.as_str())).collect();
            cx.explain("prune", format!("{name}: {p}; {}; {why}", measured.join("; ")));
            records.push(serde_json::json!({
                "weight": name,
                "density": p.density(),
                "layout": if use_nm { "nm" } else { "dense" },
                "decode_ratio": dec.as_ref().map(|d| d.0),
                "prefill_ratio": pre.as_ref().map(|d| d.0),
            }));
            let base = format!("{name}#{tag}");
            let x = map[n.inputs[0].index()];
            let (dname, t, op) = if use_nm {
                let shape = vec![rows, nm.row_bytes() / 4];
                let t = TensorData { dtype: DType::I32, shape, bytes: nm.data.clone().into() };
                let op = Op::NmLinear { dtype: w.dtype, keep: p.keep as i64, group: p.group as i64 };
                (format!("{base}.nm"), t, op)
            } else {
                let t = TensorData { dtype: w.dtype, shape: w.shape.clone(), bytes: dense.expect("checked").into() };
                (base, t, Op::Linear)
            };
            let ty = TensorType::new(t.dtype, t.shape.iter().map(|&d| Dim::from(d)).collect());
            let wid = out.weight(&dname, ty).map_err(err)?;
            cx.weights.borrow_mut().insert(dname, t);
            map.push(out.add(op, &[x, wid]).map_err(err)?);
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
    /// row (runs of 8 for 1×8) and becomes `bitmap_linear` on the compact form, or, where the measured
    /// bitmap kernel is slower than dense at decode and the dtype holds an exact 0 (f32, f16, Q4_0,
    /// Q8_0), a plain `linear` on the pruned matrix in its own dtype. At sparsity 0 nothing is dropped
    /// and the linear stays as it is.
    fn run_bitmap(&self, g: &mut Graph, cx: &PassCx, gran: usize) -> Result<bool, PassError> {
        let fail = |msg: String| PassError::Failed { pass: "prune", msg };
        let (table, cal) = self.requirements(cx)?;
        let what = if gran == 1 { "unstructured".to_string() } else { format!("1x{gran}") };
        let tag = format!("prune-{}-{what}{}", self.method.name(), self.sparsity);
        let density = 1.0 - self.sparsity;
        let mut out = Graph::new(g.name.clone());
        let mut map: Vec<ValueId> = Vec::with_capacity(g.nodes.len());
        let mut records = Vec::new();
        let err = |e: kiln_ir::GraphError| fail(e.to_string());
        for n in &g.nodes {
            let copy = |out: &mut Graph, map: &[ValueId]| copy_node(out, map, n);
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
            let dec = table.bitmap_ratio(w.dtype, k, rows, gran, kept, Phase::Decode);
            let pre = table.bitmap_ratio(w.dtype, k, rows, gran, kept, Phase::Prefill);
            let mask = bm.mask().map_err(|e| fail(format!("{name}: {e}")))?;
            let dense = zero_dropped(w.dtype, k, &w.bytes, &mask);
            let (use_bm, why) = match (&dec, &dense) {
                (_, None) => {
                    (true, format!("{} has no exact dense layout of the pruned matrix: bitmap kernel", w.dtype))
                }
                (None, Some(_)) => (false, format!("no bitmap measurement for {} {what}: dense layout", w.dtype)),
                (Some((r, _)), Some(_)) if *r <= 1.0 => {
                    (true, "bitmap kernel no slower than dense at decode: bitmap".into())
                }
                (Some(_), Some(_)) => {
                    (false, "bitmap kernel slower than dense at decode: dense layout (zeros stored)".into())
                }
            };
            let measured: Vec<&str> = [&dec, &pre].iter().filter_map(|m| m.as_ref().map(|(_, s)| s.as_str())).collect();
            cx.explain("prune", format!("{name}: {what} density {kept:.2}; {}; {why}", measured.join("; ")));
            records.push(serde_json::json!({
                "weight": name,
                "density": kept,
                "layout": if use_bm { "bitmap" } else { "dense" },
                "decode_ratio": dec.as_ref().map(|d| d.0),
                "prefill_ratio": pre.as_ref().map(|d| d.0),
            }));
            let base = format!("{name}#{tag}");
            let x = map[n.inputs[0].index()];
            let (dname, t, op) = if use_bm {
                let shape = vec![rows, bm.layout().row_bytes / 4];
                let t = TensorData { dtype: DType::I32, shape, bytes: bm.data.clone().into() };
                let op = Op::BitmapLinear { dtype: w.dtype, gran: gran as i64, kept: bm.kept as i64 };
                (format!("{base}.bitmap"), t, op)
            } else {
                let t = TensorData { dtype: w.dtype, shape: w.shape.clone(), bytes: dense.expect("checked").into() };
                (base, t, Op::Linear)
            };
            let ty = TensorType::new(t.dtype, t.shape.iter().map(|&d| Dim::from(d)).collect());
            let wid = out.weight(&dname, ty).map_err(err)?;
            cx.weights.borrow_mut().insert(dname, t);
            map.push(out.add(op, &[x, wid]).map_err(err)?);
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
}
