//! Lowering a decoder graph to a [`Program`] (buffers + kernel launches) and the set of kernels to
//! generate for it.
//!
//! Decisions made here, per op: which kernel implements it, which sizes are compile-time constants
//! (widths, heads) and which are step dims (`seq`, `past`), which values share a buffer (reshape is free),
//! and how the KV cache is kept: the graph's functional `concat(k_cache.L, k) → output k_cache.L`
//! becomes an in-place append into a persistent buffer, so decode never copies the cache.

use crate::kernels::fused::{Arg, Bcast, EwOp, FusedKernel, Step};
use crate::kernels::ops::OpKernel;
use crate::linear_family::{Epilogue, InputForm, LinearDesc, OutputForm, WeightForm};
use crate::CodegenError;
use kiln_ir::program::{Buffer, BufferKind, CollectiveKind, Launch, Program, Region};
use kiln_ir::{DType, Dim, Graph, Op, TensorData, WeightStore};
use serde::{Deserialize, Serialize};

/// One kernel to generate, by family: the target generates each family once (see [`crate::Target`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum KernelSpec {
    /// The linear family ([`LinearDesc`]). Buffers by form: plain `[x, w0, y0, w1, y1, …]` (dims [m, n0,
    /// n1, …]; items n0 + n1 + … output rows) or `[x, w, y, r]` with the residual epilogue; masked `[x, w,
    /// mask, y]`; core rows `[x, w, gathered, y]` (dims [m, n, past]); active channels `[x, wt, y]` (dims
    /// [m]; items n / 32 output blocks); block-sparse `[x, w, blocks, row_ptr, col_idx, y]`; N:M and bitmap
    /// `[x, packed, y]` or `[x, packed, w, y]` with the dense layout (dims [m, n]; items n rows).
    Linear(LinearDesc),
    /// bufs [table, ids(i32), y]; items: ids.
    Embedding {
        dtype: DType,
        d: usize,
    },
    Op(OpKernel),
    /// A tree of elementwise ops computed in one pass (see [`FusedKernel`]).
    Fused(FusedKernel),
}

impl KernelSpec {
    /// The symbol the program calls (the uniform-ABI entry point).
    pub fn symbol(&self) -> String {
        match self {
            KernelSpec::Linear(d) => d.symbol(),
            KernelSpec::Embedding { dtype, d } => format!("kiln_embedding_{}_d{d}", dtype.name()),
            KernelSpec::Op(op) => op.symbol(),
            KernelSpec::Fused(f) => f.symbol(),
        }
    }

    /// The family, for messages: `linear`, `embedding`, `op`, `fused`.
    pub fn family(&self) -> &'static str {
        match self {
            KernelSpec::Linear(_) => "linear",
            KernelSpec::Embedding { .. } => "embedding",
            KernelSpec::Op(_) => "op",
            KernelSpec::Fused(_) => "fused",
        }
    }

    /// What the kernel is, for messages and `--explain`.
    pub fn describe(&self) -> String {
        match self {
            KernelSpec::Linear(d) => d.describe(),
            other => other.symbol(),
        }
    }
}

/// A lowered graph: the program, its kernels (deduplicated, in first-use order), and the weight data the
/// program's weight buffers refer to (offsets into one 64-byte-aligned blob, in buffer order).
pub struct Lowered {
    pub program: Program,
    pub kernels: Vec<KernelSpec>,
    pub weights: Vec<(String, TensorData)>,
}

const WEIGHT_ALIGN: u64 = 64;

struct Cx<'g> {
    g: &'g Graph,
    store: &'g WeightStore,
    program: Program,
    kernels: Vec<KernelSpec>,
    weights: Vec<(String, TensorData)>,
    blob_len: u64,
    val_buf: Vec<Option<usize>>,
    /// Linear launches that later linears on the same input may join: (x, dtype, k, launch index).
    linear_groups: Vec<(usize, DType, usize, usize)>,
    /// Values computed inside their consumer's fused kernel instead of a buffer of their own.
    folded: Vec<bool>,
    /// Uses of each value: operands reading it plus graph outputs returning it.
    uses: Vec<usize>,
    /// The launch computing each linear node.
    linear_launch: std::collections::HashMap<usize, usize>,
    /// The nodes reading each value.
    readers: Vec<Vec<usize>>,
    /// Residual-stream values at decoder-block boundaries (a block's input or output): computed in
    /// their own block's launches, so that skipping blocks keeps them right.
    boundary: Vec<bool>,
    /// `rms_norm` nodes that compute the residual add before them: node → (a, b, sum buffer).
    add_into_norm: std::collections::HashMap<usize, (usize, usize, usize)>,
}

impl Cx<'_> {
    fn unsupported(&self, i: usize, why: impl Into<String>) -> CodegenError {
        CodegenError::UnsupportedOp {
            target: "cpu".into(),
            op: self.g.nodes[i].op.name(),
            value: format!("%{i}: {}", why.into()),
        }
    }

    fn buffer(&mut self, kind: BufferKind, dtype: DType, shape: Vec<Dim>) -> usize {
        self.program.buffers.push(Buffer { kind, dtype, shape });
        self.program.buffers.len() - 1
    }

    fn temp(&mut self, i: usize) -> usize {
        let ty = &self.g.nodes[i].ty;
        self.buffer(BufferKind::Temp, ty.dtype, ty.shape.clone())
    }

    fn weight(&mut self, name: String, t: TensorData) -> usize {
        let offset = self.blob_len.div_ceil(WEIGHT_ALIGN) * WEIGHT_ALIGN;
        let len = t.bytes.len() as u64;
        self.blob_len = offset + len;
        let shape = t.shape.iter().map(|&d| Dim::from(d)).collect();
        let b = self.buffer(BufferKind::Weight { name: name.clone(), offset, len }, t.dtype, shape);
        self.weights.push((name, t));
        b
    }

    fn operand(&self, i: usize, k: usize) -> usize {
        self.val_buf[self.g.nodes[i].inputs[k].index()].expect("operands are lowered before use")
    }

    fn is_weight(&self, b: usize) -> bool {
        matches!(self.program.buffers[b].kind, BufferKind::Weight { .. })
    }

    fn is_state(&self, b: usize) -> bool {
        matches!(self.program.buffers[b].kind, BufferKind::State { .. })
    }

    /// Adds a linear launch, or joins an earlier one reading the same input with the same kernel, so
    /// projections of one activation (Q/K/V, gate/up) run as one parallel launch. Safe because temps are
    /// written once: the input is unchanged at the earlier launch's position, and nothing between reads
    /// the new output (it did not exist yet).
    #[allow(clippy::too_many_arguments)]
    fn linear(&mut self, i: usize, dtype: DType, k: usize, x: usize, w: usize, out: usize, m: Vec<Dim>, n: usize) {
        let joinable = self.linear_groups.iter().position(|&(lx, ld, lk, _)| lx == x && ld == dtype && lk == k);
        if let Some(gi) = joinable {
            let li = self.linear_groups[gi].3;
            let l = &mut self.program.launches[li];
            l.bufs.extend([w, out]);
            l.dims.push(vec![Dim::from(n)]);
            let total = l.items[0].add(&Dim::from(n));
            l.items = vec![total];
            l.label.push_str(&format!(" +%{i}"));
            let group = (l.bufs.len() - 1) / 2;
            let spec = KernelSpec::Linear(LinearDesc::dense(dtype, k).grouped(group));
            l.kernel = spec.symbol();
            if !self.kernels.iter().any(|s| s.symbol() == l.kernel) {
                self.kernels.push(spec);
            }
            return;
        }
        let spec = KernelSpec::Linear(LinearDesc::dense(dtype, k));
        self.launch(i, spec, vec![x, w, out], vec![m, vec![Dim::from(n)]], vec![Dim::from(n)], true);
        self.linear_groups.push((x, dtype, k, self.program.launches.len() - 1));
        self.linear_launch.insert(i, self.program.launches.len() - 1);
    }

    fn launch(
        &mut self,
        i: usize,
        spec: KernelSpec,
        bufs: Vec<usize>,
        dims: Vec<Vec<Dim>>,
        items: Vec<Dim>,
        parallel: bool,
    ) {
        let kernel = spec.symbol();
        if !self.kernels.iter().any(|k| k.symbol() == kernel) {
            self.kernels.push(spec);
        }
        let label = format!("%{i} {}", self.g.nodes[i].op.name());
        self.program.launches.push(Launch { kernel, label, bufs, dims, items, parallel, collective: None });
    }

    /// A communication step of node `i` (no kernel; the runtime's communicator executes it).
    fn collective(&mut self, i: usize, kind: CollectiveKind, bufs: Vec<usize>, dims: Vec<Vec<Dim>>) {
        let label = format!("%{i} {}", self.g.nodes[i].op.name());
        self.program.launches.push(Launch {
            kernel: String::new(),
            label,
            bufs,
            dims,
            items: vec![],
            parallel: false,
            collective: Some(kind),
        });
    }
}

/// Elementwise fusion: which values are computed inside their consumer's kernel. An elementwise value is
/// folded into its consumer when that consumer is its only reader, is elementwise too, has the same type
/// (no broadcast of the intermediate), and the value is not a graph output; scalar constants read only by
/// elementwise ops become literals. Each remaining elementwise value roots one fused kernel.
fn folded_into_consumers(g: &Graph, readers: &[Vec<usize>]) -> Vec<bool> {
    let is_ew = |j: usize| EwOp::from_op(&g.nodes[j].op).is_some() && g.nodes[j].ty.dtype == DType::F32;
    let is_output = |i: usize| g.outputs.iter().any(|(_, v)| v.index() == i);
    (0..g.nodes.len())
        .map(|i| {
            let r = &readers[i];
            if is_output(i) || r.is_empty() {
                return false;
            }
            match g.nodes[i].op {
                Op::Constant { .. } => r.iter().all(|&j| is_ew(j)),
                _ => is_ew(i) && r.len() == 1 && is_ew(r[0]) && g.nodes[r[0]].ty == g.nodes[i].ty,
            }
        })
        .collect()
}

/// The nodes reading each value, once per operand that reads it.
fn reader_lists(g: &Graph) -> Vec<Vec<usize>> {
    let mut readers: Vec<Vec<usize>> = vec![Vec::new(); g.nodes.len()];
    for (j, node) in g.nodes.iter().enumerate() {
        for v in &node.inputs {
            readers[v.index()].push(j);
        }
    }
    readers
}

/// How an input of type `leaf` is indexed when fused into a kernel producing `root` (rows × `cols`,
/// `cols` the last dim when that is a constant, else 1 with every element a row).
fn broadcast(leaf: &kiln_ir::TensorType, root: &kiln_ir::TensorType, cols_is_last: bool) -> Option<Bcast> {
    let ones = |s: &[Dim]| s.iter().all(|d| d.as_fixed() == Some(1));
    if leaf.shape == root.shape {
        return Some(Bcast::Full);
    }
    if ones(&leaf.shape) {
        return Some(Bcast::Scalar);
    }
    if !cols_is_last {
        return None;
    }
    let (lr, rr) = (leaf.rank(), root.rank());
    if lr <= rr && leaf.shape.last() == root.shape.last() && ones(&leaf.shape[..lr - 1]) {
        return Some(Bcast::Row);
    }
    if lr == rr && leaf.shape[..lr - 1] == root.shape[..rr - 1] && leaf.shape[lr - 1].as_fixed() == Some(1) {
        return Some(Bcast::Col);
    }
    None
}

impl Cx<'_> {
    /// `add(linear(x, w), r)` where the linear's result is read only by the add, runs alone (not grouped)
    /// and `r` (same type) is computed before it: fused into the linear as its residual. Returns the
    /// buffer now holding the sum.
    fn residual_into_linear(&mut self, i: usize) -> Option<usize> {
        let g = self.g;
        let n = &g.nodes[i];
        if !matches!(n.op, Op::Add) || n.inputs.iter().any(|v| self.folded[v.index()]) {
            return None;
        }
        let (a, b) = (n.inputs[0].index(), n.inputs[1].index());
        let (lin, r) = match (self.linear_launch.get(&a), self.linear_launch.get(&b)) {
            (Some(_), _) if b < a => (a, b),
            (_, Some(_)) if a < b => (b, a),
            _ => return None,
        };
        let li = self.linear_launch[&lin];
        let rb = self.val_buf[r]?;
        let l = &self.program.launches[li];
        if self.uses[lin] != 1 || g.nodes[r].ty != n.ty || l.bufs.len() != 3 || self.is_state(rb) {
            return None;
        }
        let KernelSpec::Linear(d) = self.kernels.iter().find(|s| s.symbol() == l.kernel)?.clone() else {
            return None;
        };
        if !d.is_plain() {
            return None;
        }
        let spec = KernelSpec::Linear(LinearDesc::dense(d.dtype, d.k).with_epilogue(Epilogue::Residual));
        let symbol = spec.symbol();
        if !self.kernels.iter().any(|s| s.symbol() == symbol) {
            self.kernels.push(spec);
        }
        let l = &mut self.program.launches[li];
        l.bufs.push(rb);
        l.kernel = symbol;
        l.label.push_str(&format!(" +%{i} add"));
        let out = l.bufs[2];
        // Nothing may join the launch any more: its kernel takes a residual.
        self.linear_groups.retain(|&(.., launch)| launch != li);
        Some(out)
    }

    /// `h = add(a, b)` whose first reader is `rms_norm(h, w)`, with nothing reading `h` in between:
    /// the add is computed by the norm's launch (one pass over each row writes the sum and its norm),
    /// instead of a launch of its own. Not for the residual add fused into a linear (tried first, it
    /// saves the linear's output round trip) nor at a block boundary. Returns the buffer the sum will
    /// be in.
    fn add_before_norm(&mut self, i: usize) -> Option<usize> {
        let g = self.g;
        let n = &g.nodes[i];
        if !matches!(n.op, Op::Add) || self.boundary[i] || n.ty.dtype != DType::F32 {
            return None;
        }
        let d = fixed(n.ty.shape.last()?)?;
        let (a, b) = (n.inputs[0].index(), n.inputs[1].index());
        if d == 0 || [a, b].iter().any(|&v| self.folded[v] || g.nodes[v].ty != n.ty) {
            return None;
        }
        let (ab, bb) = (self.val_buf[a]?, self.val_buf[b]?);
        if self.is_state(ab) || self.is_state(bb) {
            return None;
        }
        let j = *self.readers[i].iter().min()?;
        let norm = &g.nodes[j];
        if !matches!(norm.op, Op::RmsNorm { .. }) || norm.inputs[0].index() != i || norm.inputs[1].index() == i {
            return None;
        }
        if norm.ty != n.ty || self.add_into_norm.contains_key(&j) {
            return None;
        }
        let out = self.temp(i);
        self.add_into_norm.insert(j, (ab, bb, out));
        Some(out)
    }

    /// Lowers the elementwise value `i` and every value folded into it as one fused kernel.
    fn fused(&mut self, i: usize) -> Result<usize, CodegenError> {
        if let Some(out) = self.residual_into_linear(i) {
            return Ok(out);
        }
        if let Some(out) = self.add_before_norm(i) {
            return Ok(out);
        }
        let g = self.g;
        let root = &g.nodes[i].ty;
        if root.dtype != DType::F32 {
            return Err(self.unsupported(i, format!("elementwise op on {}", root.dtype)));
        }
        let cols = root.shape.last().and_then(fixed).filter(|&c| c > 0);
        let mut k = FusedKernel { cols: cols.unwrap_or(1), inputs: Vec::new(), steps: Vec::new() };
        let mut leaves: Vec<usize> = Vec::new();
        let mut label = String::new();
        self.fuse_tree(i, &mut k, &mut leaves, &mut label, root, cols.is_some())?;
        let mut bufs: Vec<usize> = leaves.iter().map(|&v| self.val_buf[v].expect("lowered before use")).collect();
        if let Some(&b) = bufs.iter().find(|&&b| self.program.buffers[b].dtype != DType::F32) {
            return Err(self.unsupported(i, format!("elementwise input of dtype {}", self.program.buffers[b].dtype)));
        }
        let out = self.temp(i);
        bufs.push(out);
        let items = if cols.is_some() { root.shape[..root.rank() - 1].to_vec() } else { root.shape.clone() };
        self.launch(i, KernelSpec::Fused(k), bufs, vec![], items, true);
        let l = self.program.launches.last_mut().expect("just pushed");
        l.label.push_str(&label);
        Ok(out)
    }

    /// Appends the steps computing value `v` to `k` and returns the argument that reads it.
    fn fuse_tree(
        &self,
        v: usize,
        k: &mut FusedKernel,
        leaves: &mut Vec<usize>,
        label: &mut String,
        root: &kiln_ir::TensorType,
        cols_is_last: bool,
    ) -> Result<Arg, CodegenError> {
        let node = &self.g.nodes[v];
        let op = EwOp::from_op(&node.op).expect("fused trees are elementwise");
        let mut args = Vec::new();
        for input in &node.inputs {
            let u = input.index();
            let a = match &self.g.nodes[u].op {
                Op::Constant { value } if self.folded[u] => Arg::Const(*value),
                _ if self.folded[u] => {
                    label.push_str(&format!(" +%{u}"));
                    self.fuse_tree(u, k, leaves, label, root, cols_is_last)?
                }
                _ => {
                    let idx = match leaves.iter().position(|&l| l == u) {
                        Some(p) => p,
                        None => {
                            let b = broadcast(&self.g.nodes[u].ty, root, cols_is_last).ok_or_else(|| {
                                self.unsupported(v, format!("broadcast of {} to {root}", self.g.nodes[u].ty))
                            })?;
                            leaves.push(u);
                            k.inputs.push(b);
                            leaves.len() - 1
                        }
                    };
                    Arg::Input(idx)
                }
            };
            args.push(a);
        }
        k.steps.push(Step { op, args });
        Ok(Arg::Step(k.steps.len() - 1))
    }
}

/// The weight operand (operand 1) of a matrix op and the sizes around it.
struct MatrixOperands {
    w: usize,
    dtype: DType,
    /// The weight's two dims, as stored.
    dims: [usize; 2],
    /// The leading dims of x (operand 0): the rows of the product.
    m: Vec<Dim>,
}

/// The operands and sizes of an attention node.
struct Attn {
    q: usize,
    k: usize,
    v: usize,
    hq: usize,
    hkv: usize,
    hd: usize,
    seq: Dim,
    past: Dim,
}

impl Cx<'_> {
    /// Checks that a matrix op's operand 1 is a weight of constant shape; returns it with x's rows.
    fn matrix_operands(&self, i: usize) -> Result<MatrixOperands, CodegenError> {
        let n = &self.g.nodes[i];
        let w = self.operand(i, 1);
        if !self.is_weight(w) {
            return Err(self.unsupported(i, format!("{} weight must be a weight", n.op.name())));
        }
        let wty = self.g.ty(n.inputs[1]);
        let (Some(d0), Some(d1)) = (fixed(&wty.shape[0]), fixed(&wty.shape[1])) else {
            return Err(self.unsupported(i, "symbolic weight shape"));
        };
        let xs = &self.g.ty(n.inputs[0]).shape;
        Ok(MatrixOperands { w, dtype: wty.dtype, dims: [d0, d1], m: xs[..xs.len() - 1].to_vec() })
    }

    /// Checks an attention node's operands (keys and values from the KV cache, constant head counts and
    /// head dim) and returns them with the step's query and past lengths.
    fn attention(&self, i: usize) -> Result<Attn, CodegenError> {
        let n = &self.g.nodes[i];
        let (q, k, v) = (self.operand(i, 0), self.operand(i, 1), self.operand(i, 2));
        if !self.is_state(k) || !self.is_state(v) {
            return Err(self.unsupported(i, "keys and values must come from the KV cache"));
        }
        let (qt, kt) = (self.g.ty(n.inputs[0]), self.g.ty(n.inputs[1]));
        let (Some(hq), Some(hkv), Some(hd)) = (fixed(&qt.shape[2]), fixed(&kt.shape[2]), fixed(&qt.shape[3])) else {
            return Err(self.unsupported(i, "symbolic heads"));
        };
        let seq = qt.shape[1].clone();
        let past = kt.shape[1].sub(&seq);
        Ok(Attn { q, k, v, hq, hkv, hd, seq, past })
    }
}

fn fixed(d: &Dim) -> Option<usize> {
    d.as_fixed().and_then(|v| usize::try_from(v).ok())
}

/// Lowers `g` (whose weights are in `store`) for the CPU.
pub fn lower(g: &Graph, store: &WeightStore) -> Result<Lowered, CodegenError> {
    g.verify().map_err(|e| CodegenError::Llvm(format!("invalid graph: {e}")))?;
    let readers = reader_lists(g);
    let mut cx = Cx {
        g,
        store,
        program: Program { buffers: Vec::new(), launches: Vec::new(), outputs: Vec::new(), regions: Vec::new() },
        kernels: Vec::new(),
        weights: Vec::new(),
        blob_len: 0,
        val_buf: vec![None; g.nodes.len()],
        linear_groups: Vec::new(),
        folded: folded_into_consumers(g, &readers),
        uses: readers
            .iter()
            .enumerate()
            .map(|(i, r)| r.len() + g.outputs.iter().filter(|(_, v)| v.index() == i).count())
            .collect(),
        linear_launch: Default::default(),
        boundary: block_boundaries(g),
        add_into_norm: Default::default(),
        readers: readers.clone(),
    };
    // The node whose lowering created each launch.
    let mut launch_node: Vec<usize> = Vec::new();
    for (i, n) in g.nodes.iter().enumerate() {
        launch_node.resize(cx.program.launches.len(), i.saturating_sub(1));
        if cx.folded[i] {
            continue;
        }
        let ty = &n.ty;
        let buf = match &n.op {
            Op::Input { name } => {
                if ty.dtype.is_int() {
                    cx.buffer(BufferKind::Input { name: name.clone() }, DType::I32, ty.shape.clone())
                } else if g.output_named(name).is_some() && !ty.shape.iter().any(|d| d.as_sym() == Some("past")) {
                    // Whole state (CoreInfer's core set): [batch, …] with constant trailing dims, overwritten
                    // in place by the op that returns it.
                    let row: Option<usize> = match ty.shape.as_slice() {
                        [b, rest @ ..] if b.as_sym() == Some("batch") || b.as_fixed() == Some(1) => {
                            rest.iter().map(fixed).try_fold(1usize, |a, d| Some(a * d?))
                        }
                        _ => None,
                    };
                    let row = row.ok_or_else(|| {
                        cx.unsupported(i, format!("state `{name}` must be [batch, …] or [batch, past, …]"))
                    })?;
                    cx.buffer(
                        BufferKind::State { name: name.clone(), row_elems: row as u64, whole: true },
                        DType::F32,
                        ty.shape.clone(),
                    )
                } else if g.output_named(name).is_some() {
                    // A KV cache: [batch, past, heads, head_dim] with constant trailing dims.
                    let row: Option<usize> = match ty.shape.as_slice() {
                        [_, past, rest @ ..] if past.as_sym() == Some("past") => {
                            rest.iter().map(fixed).try_fold(1usize, |a, d| Some(a * d?))
                        }
                        _ => None,
                    };
                    let row =
                        row.ok_or_else(|| cx.unsupported(i, format!("state `{name}` must be [batch, past, …]")))?;
                    cx.buffer(
                        BufferKind::State { name: name.clone(), row_elems: row as u64, whole: false },
                        DType::F32,
                        ty.shape.clone(),
                    )
                } else {
                    return Err(cx.unsupported(i, format!("float input `{name}` that is not a cache")));
                }
            }
            Op::Weight { name } => {
                let t = store.get(name).ok_or_else(|| cx.unsupported(i, format!("weight `{name}` missing")))?.clone();
                cx.weight(name.clone(), t)
            }
            Op::Cast { dtype: DType::F32 } if cx.is_weight(cx.operand(i, 0)) => {
                // Constant-fold casts of weights: store them as f32.
                let src = n.inputs[0].index();
                let Op::Weight { name } = &g.nodes[src].op else { unreachable!() };
                let t = store.get(name).expect("checked when lowered");
                if t.dtype == DType::F32 {
                    cx.operand(i, 0)
                } else {
                    let vals = t.to_f32().map_err(|e| cx.unsupported(i, e.to_string()))?;
                    cx.weight(format!("{name}@f32"), TensorData::from_f32(t.shape.clone(), &vals))
                }
            }
            Op::Reshape { .. } => cx.operand(i, 0),
            Op::Embedding => {
                let (table, ids) = (cx.operand(i, 0), cx.operand(i, 1));
                if !cx.is_weight(table) {
                    return Err(cx.unsupported(i, "embedding table must be a weight"));
                }
                let tty = g.ty(n.inputs[0]);
                let d = fixed(&tty.shape[1]).ok_or_else(|| cx.unsupported(i, "symbolic width"))?;
                let out = cx.temp(i);
                let items = g.ty(n.inputs[1]).shape.clone();
                cx.launch(
                    i,
                    KernelSpec::Embedding { dtype: tty.dtype, d },
                    vec![table, ids, out],
                    vec![],
                    items,
                    false,
                );
                out
            }
            Op::Linear => {
                let x = cx.operand(i, 0);
                let MatrixOperands { w, dtype, dims: [nn, k], m } = cx.matrix_operands(i)?;
                let out = cx.temp(i);
                cx.linear(i, dtype, k, x, w, out, m, nn);
                out
            }
            Op::MaskedLinear => {
                let (x, mask) = (cx.operand(i, 0), cx.operand(i, 2));
                let MatrixOperands { w, dtype, dims: [nn, k], m } = cx.matrix_operands(i)?;
                let out = cx.temp(i);
                let spec = KernelSpec::Linear(LinearDesc::dense(dtype, k).with_output(OutputForm::Masked));
                cx.launch(i, spec, vec![x, w, mask, out], vec![m, vec![Dim::from(nn)]], vec![Dim::from(nn)], true);
                out
            }
            Op::SparseLinear { decode, prefill } => {
                let bufs: Vec<usize> = (0..5).map(|k| cx.operand(i, k)).collect();
                if !bufs[1..].iter().all(|&b| cx.is_weight(b)) {
                    return Err(cx.unsupported(i, "sparse_linear weights must be weights"));
                }
                let MatrixOperands { dtype, dims: [nn, k], m, .. } = cx.matrix_operands(i)?;
                let (decode, prefill) = (*decode != 0, *prefill != 0);
                if decode || prefill {
                    crate::kernels::sparse::SparseLinearKernelSpec::new(dtype, k)
                        .validate()
                        .map_err(|e| cx.unsupported(i, e.to_string()))?;
                }
                let out = cx.temp(i);
                let mut bufs = bufs;
                bufs.push(out);
                let spec = KernelSpec::Linear(
                    LinearDesc::dense(dtype, k).with_weight(WeightForm::BlockSparse { decode, prefill }),
                );
                cx.launch(i, spec, bufs, vec![m, vec![Dim::from(nn)]], vec![Dim::from(nn)], true);
                out
            }
            Op::NmLinear { dtype, keep, group, decode, prefill } => {
                let mut bufs: Vec<usize> = (0..n.inputs.len()).map(|k| cx.operand(i, k)).collect();
                if !bufs[1..].iter().all(|&b| cx.is_weight(b)) {
                    return Err(cx.unsupported(i, "nm_linear packed weights and dense layout must be weights"));
                }
                let xs = &g.ty(n.inputs[0]).shape;
                let k = fixed(xs.last().expect("typed")).ok_or_else(|| cx.unsupported(i, "symbolic k"))?;
                let nn = fixed(&g.ty(n.inputs[1]).shape[0]).ok_or_else(|| cx.unsupported(i, "symbolic rows"))?;
                let pattern = kiln_ir::sparse::NmPattern::new(*keep as usize, *group as usize)
                    .map_err(|e| cx.unsupported(i, e.to_string()))?;
                crate::kernels::nm::NmLinearKernelSpec::new(*dtype, pattern, k)
                    .validate()
                    .map_err(|e| cx.unsupported(i, e.to_string()))?;
                let m = xs[..xs.len() - 1].to_vec();
                let out = cx.temp(i);
                bufs.push(out);
                let (decode, prefill) = (*decode != 0, *prefill != 0);
                let (keep, group) = (pattern.keep, pattern.group);
                let spec = KernelSpec::Linear(LinearDesc::dense(*dtype, k).with_weight(WeightForm::Nm {
                    keep,
                    group,
                    decode,
                    prefill,
                }));
                cx.launch(i, spec, bufs, vec![m, vec![Dim::from(nn)]], vec![Dim::from(nn)], true);
                out
            }
            Op::BitmapLinear { dtype, gran, kept, decode, prefill } => {
                let mut bufs: Vec<usize> = (0..n.inputs.len()).map(|k| cx.operand(i, k)).collect();
                if !bufs[1..].iter().all(|&b| cx.is_weight(b)) {
                    return Err(cx.unsupported(i, "bitmap_linear packed weights and dense layout must be weights"));
                }
                let xs = &g.ty(n.inputs[0]).shape;
                let k = fixed(xs.last().expect("typed")).ok_or_else(|| cx.unsupported(i, "symbolic k"))?;
                let nn = fixed(&g.ty(n.inputs[1]).shape[0]).ok_or_else(|| cx.unsupported(i, "symbolic rows"))?;
                let (gran, kept) = (*gran as usize, *kept as usize);
                crate::kernels::bitmap::BitmapLinearKernelSpec::new(*dtype, gran, kept, k)
                    .validate()
                    .map_err(|e| cx.unsupported(i, e.to_string()))?;
                let m = xs[..xs.len() - 1].to_vec();
                let out = cx.temp(i);
                bufs.push(out);
                let (decode, prefill) = (*decode != 0, *prefill != 0);
                let spec = KernelSpec::Linear(LinearDesc::dense(*dtype, k).with_weight(WeightForm::Bitmap {
                    gran,
                    kept,
                    decode,
                    prefill,
                }));
                cx.launch(i, spec, bufs, vec![m, vec![Dim::from(nn)]], vec![Dim::from(nn)], true);
                out
            }
            Op::ActiveLinear => {
                let x = cx.operand(i, 0);
                let MatrixOperands { w: wt, dtype, dims: [k, nn], m } = cx.matrix_operands(i)?;
                if dtype.is_gathered() {
                    let spec = crate::kernels::colactive::ColActiveKernelSpec::new(dtype, nn, 1);
                    spec.validate().map_err(|e| cx.unsupported(i, e.to_string()))?;
                } else if dtype.is_column() {
                    let spec = crate::kernels::colactive::ColActiveKernelSpec::new(dtype, nn, 1);
                    spec.validate().map_err(|e| cx.unsupported(i, e.to_string()))?;
                    if !k.is_multiple_of(32) {
                        return Err(cx.unsupported(i, format!("{dtype} weight: k = {k} is not a multiple of 32")));
                    }
                } else {
                    let spec = crate::kernels::sparse::ActiveLinearKernelSpec::new(dtype, nn);
                    spec.validate().map_err(|e| cx.unsupported(i, e.to_string()))?;
                }
                if k > crate::kernels::abi::ACTIVE_MAX_K {
                    return Err(cx.unsupported(i, format!("k = {k} > {}", crate::kernels::abi::ACTIVE_MAX_K)));
                }
                let out = cx.temp(i);
                let spec =
                    KernelSpec::Linear(LinearDesc::dense(dtype, k).with_input(InputForm::ActiveChannels { n: nn }));
                cx.launch(i, spec, vec![x, wt, out], vec![m], vec![Dim::from(nn / 32)], true);
                out
            }
            Op::CoreLinear { past } => {
                let (x, core) = (cx.operand(i, 0), cx.operand(i, 2));
                let MatrixOperands { w, dtype, dims: [nn, k], m } = cx.matrix_operands(i)?;
                let BufferKind::State { name, whole: true, .. } = cx.program.buffers[core].kind.clone() else {
                    return Err(
                        cx.unsupported(i, "the core set must be a whole state (a graph input returned as an output)")
                    );
                };
                let row_bytes = dtype
                    .row_bytes(k)
                    .ok_or_else(|| cx.unsupported(i, format!("{dtype} rows of {k} elements are not whole blocks")))?;
                let layout = crate::kernels::coreinfer::GatherLayout::new(nn, row_bytes);
                // The gathered copy: per-prompt state of this op alone (not a graph input), rewritten at the
                // first step after each prefill.
                let gathered = cx.buffer(
                    BufferKind::State {
                        name: format!("{name}#gather%{i}"),
                        row_elems: layout.words() as u64,
                        whole: true,
                    },
                    DType::F32,
                    vec![Dim::from(layout.words())],
                );
                let out = cx.temp(i);
                let past = vec![past.clone()];
                let spec = KernelSpec::Op(OpKernel::CoreGather { n: nn, row_bytes });
                cx.launch(i, spec, vec![core, w, gathered], vec![past.clone()], vec![Dim::from(1usize)], false);
                let spec = KernelSpec::Linear(LinearDesc::dense(dtype, k).with_output(OutputForm::CoreRows));
                let dims = vec![m.clone(), vec![Dim::from(nn)], past.clone()];
                cx.launch(i, spec, vec![x, w, gathered, out], dims, vec![Dim::from(nn)], true);
                let spec = KernelSpec::Op(OpKernel::CoreExpand { n: nn });
                cx.launch(i, spec, vec![gathered, out], vec![past], m, true);
                out
            }
            Op::CoreKeep { past } => {
                let core = cx.operand(i, 1);
                let c = fixed(&ty.shape[2]).ok_or_else(|| cx.unsupported(i, "symbolic width"))?;
                let out = cx.temp(i);
                let (dims, items) = (vec![vec![past.clone()], vec![ty.shape[1].clone()]], ty.shape[..2].to_vec());
                cx.launch(i, KernelSpec::Op(OpKernel::CoreKeep { c }), vec![core, out], dims, items, true);
                out
            }
            Op::CoreSelect { alpha, beta, past } => {
                let (act, state) = (cx.operand(i, 0), cx.operand(i, 1));
                let BufferKind::State { name, whole: true, .. } = cx.program.buffers[state].kind.clone() else {
                    return Err(
                        cx.unsupported(i, "the core set must be a whole state (a graph input returned as an output)")
                    );
                };
                // Written in place: the result must be returned as the state, and only core_keep and
                // core_linear (which read it when this does not write it: past > 0) may read the old value.
                if g.output_named(&name) != Some(kiln_ir::ValueId(i as u32)) {
                    return Err(cx.unsupported(i, format!("core set `{name}` is not returned as `{name}`")));
                }
                let others = cx.readers[n.inputs[1].index()]
                    .iter()
                    .any(|&r| r != i && !matches!(g.nodes[r].op, Op::CoreKeep { .. } | Op::CoreLinear { .. }));
                if others || cx.uses[n.inputs[1].index()] != cx.readers[n.inputs[1].index()].len() {
                    return Err(
                        cx.unsupported(i, format!("core set `{name}` is read by more than core_keep/core_linear"))
                    );
                }
                let at = g.ty(n.inputs[0]);
                let c = fixed(&at.shape[2]).ok_or_else(|| cx.unsupported(i, "symbolic width"))?;
                let scratch = cx.buffer(BufferKind::Temp, DType::F32, at.shape[..2].to_vec());
                let k = kiln_ir::coreinfer::core_k(*alpha, c);
                let rows = at.shape[..2].to_vec();
                let spec = KernelSpec::Op(OpKernel::CoreThresholds { c, k });
                cx.launch(i, spec, vec![act, scratch], vec![vec![past.clone()]], rows, true);
                let spec = KernelSpec::Op(OpKernel::CoreSelect { c, beta: *beta });
                let dims = vec![vec![past.clone()], vec![at.shape[1].clone()]];
                let items = vec![at.shape[0].clone(), Dim::from(c)];
                cx.launch(i, spec, vec![act, scratch, state], dims, items, true);
                state
            }
            Op::RmsNorm { eps } => {
                let (x, w) = (cx.operand(i, 0), cx.operand(i, 1));
                let d = fixed(ty.shape.last().unwrap()).ok_or_else(|| cx.unsupported(i, "symbolic width"))?;
                let out = cx.temp(i);
                let rows = ty.shape[..ty.rank() - 1].to_vec();
                if let Some((a, b, sum)) = cx.add_into_norm.remove(&i) {
                    let spec = KernelSpec::Op(OpKernel::AddRmsNorm { d, eps: *eps });
                    cx.launch(i, spec, vec![a, b, w, sum, out], vec![], rows, false);
                    cx.program
                        .launches
                        .last_mut()
                        .expect("just pushed")
                        .label
                        .push_str(&format!(" +{} add", n.inputs[0]));
                } else {
                    cx.launch(
                        i,
                        KernelSpec::Op(OpKernel::RmsNorm { d, eps: *eps }),
                        vec![x, w, out],
                        vec![],
                        rows,
                        false,
                    );
                }
                out
            }
            Op::Rope { mode, theta, n_rot } | Op::RopeScaled { mode, theta, n_rot } => {
                let (x, pos) = (cx.operand(i, 0), cx.operand(i, 1));
                let scaled = matches!(n.op, Op::RopeScaled { .. });
                let (heads, hd) = match (fixed(&ty.shape[2]), fixed(&ty.shape[3])) {
                    (Some(h), Some(d)) => (h, d),
                    _ => return Err(cx.unsupported(i, "symbolic heads")),
                };
                let spec = OpKernel::Rope {
                    heads,
                    head_dim: hd,
                    n_rot: *n_rot as usize,
                    theta: *theta,
                    neox: *mode == kiln_ir::RopeMode::Neox,
                    scaled,
                };
                let mut bufs = vec![x, pos];
                if scaled {
                    if cx.program.buffers[cx.operand(i, 2)].dtype != DType::F32 {
                        return Err(cx.unsupported(i, "rope factors that are not f32"));
                    }
                    bufs.push(cx.operand(i, 2));
                }
                let out = cx.temp(i);
                bufs.push(out);
                let rows = ty.shape[..2].to_vec();
                cx.launch(i, KernelSpec::Op(spec), bufs, vec![], rows, false);
                out
            }
            Op::Concat { axis: 1 } if cx.is_state(cx.operand(i, 0)) => {
                let (state, new) = (cx.operand(i, 0), cx.operand(i, 1));
                let BufferKind::State { name, row_elems, whole: false } = cx.program.buffers[state].kind.clone() else {
                    return Err(cx.unsupported(i, "append to a whole (fixed-size) state"));
                };
                // The grown cache must be the graph's output of the same name, and nothing else may read
                // the old cache: then appending in place is exactly the concat.
                if g.output_named(&name) != Some(kiln_ir::ValueId(i as u32)) {
                    return Err(cx.unsupported(i, format!("cache `{name}` is not returned as `{name}`")));
                }
                if cx.uses[n.inputs[0].index()] != 1 {
                    return Err(cx.unsupported(i, format!("cache `{name}` is read by more than the append")));
                }
                let rows = g.ty(n.inputs[1]).shape[..2].to_vec();
                let spec = OpKernel::AppendKv { row: row_elems as usize };
                cx.launch(i, KernelSpec::Op(spec), vec![new, state], vec![vec![Dim::sym("past")]], rows, false);
                state
            }
            Op::Attention { scale } | Op::SlidingAttention { scale, .. } => {
                let Attn { q, k, v, hq, hkv, hd, seq, past } = cx.attention(i)?;
                let window = match n.op {
                    Op::SlidingAttention { window, .. } => window as usize,
                    _ => 0,
                };
                let spec = OpKernel::Attention { q_heads: hq, kv_heads: hkv, head_dim: hd, scale: *scale, window };
                let out = cx.temp(i);
                let items = vec![seq.clone(), Dim::from(hq)];
                cx.launch(i, KernelSpec::Op(spec), vec![q, k, v, out], vec![vec![seq], vec![past]], items, true);
                out
            }
            Op::FlexAttention { scale, block, gamma, tau, min_len } => {
                let Attn { q, k, v, hq, hkv, hd, seq, past } = cx.attention(i)?;
                let (block, min_len) = (*block as usize, *min_len as usize);
                // Per head: [query_aware, vert[nkb], slash[nkb], pooled_k[nkb][hd]], nkb ≤ past+seq.
                let scratch = cx.buffer(
                    BufferKind::Temp,
                    DType::F32,
                    vec![g.ty(n.inputs[1]).shape[1].add(&Dim::from(1usize)), Dim::from(hq * (hd + 2))],
                );
                let dims = vec![vec![seq.clone()], vec![past]];
                let pat = OpKernel::FlexPattern {
                    q_heads: hq,
                    kv_heads: hkv,
                    head_dim: hd,
                    scale: *scale,
                    block,
                    gamma: *gamma,
                    tau: *tau,
                    min_len,
                };
                cx.launch(i, KernelSpec::Op(pat), vec![q, k, scratch], dims.clone(), vec![Dim::from(hq)], true);
                let att = OpKernel::FlexAttention {
                    q_heads: hq,
                    kv_heads: hkv,
                    head_dim: hd,
                    scale: *scale,
                    block,
                    gamma: *gamma,
                    min_len,
                };
                let out = cx.temp(i);
                let items = vec![seq, Dim::from(hq)];
                cx.launch(i, KernelSpec::Op(att), vec![q, k, v, scratch, out], dims, items, true);
                out
            }
            Op::Slice { axis, start, end: _ } => {
                // Rows of a [batch, rows, …] tensor: with batch = 1 at run time, a contiguous copy.
                let x = cx.operand(i, 0);
                let xt = g.ty(n.inputs[0]);
                let ax = kiln_ir::op::norm_axis(*axis, xt.rank()).map_err(|e| cx.unsupported(i, e))?;
                let outer_ok = xt.shape[..ax].iter().all(|d| d.as_sym() == Some("batch") || d.as_fixed() == Some(1));
                let row: Option<usize> = xt.shape[ax + 1..].iter().map(fixed).try_fold(1usize, |a, d| Some(a * d?));
                let (Some(row), true) = (row, outer_ok) else {
                    return Err(cx.unsupported(i, "only row slices of [batch, rows, …] tensors"));
                };
                let out = cx.temp(i);
                let rows = vec![ty.shape[ax].clone()];
                let spec = KernelSpec::Op(OpKernel::SliceRows { row });
                cx.launch(i, spec, vec![x, out], vec![vec![start.clone()]], rows, false);
                out
            }
            Op::AllReduce => {
                let x = cx.operand(i, 0);
                let out = cx.temp(i);
                cx.collective(i, CollectiveKind::AllReduce, vec![x, out], vec![ty.shape.clone()]);
                out
            }
            Op::ReduceScatter { axis } | Op::Shard { axis } | Op::AllGather { axis } => {
                // Whole rows of a [batch, rows, …] tensor (batch = 1 at run time): each rank's share is
                // one contiguous block.
                let x = cx.operand(i, 0);
                let xt = g.ty(n.inputs[0]);
                let ax = kiln_ir::op::norm_axis(*axis, xt.rank()).map_err(|e| cx.unsupported(i, e))?;
                let outer_ok = xt.shape[..ax].iter().all(|d| d.as_sym() == Some("batch") || d.as_fixed() == Some(1));
                let row: Option<usize> = xt.shape[ax + 1..].iter().map(fixed).try_fold(1usize, |a, d| Some(a * d?));
                let (Some(row), true) = (row, outer_ok) else {
                    return Err(cx.unsupported(i, "only rows of [batch, rows, …] tensors are split over ranks"));
                };
                let (kind, full) = match &n.op {
                    Op::ReduceScatter { .. } => (CollectiveKind::ReduceScatter, xt.shape[ax].clone()),
                    Op::Shard { .. } => (CollectiveKind::Shard, xt.shape[ax].clone()),
                    _ => (CollectiveKind::AllGather, ty.shape[ax].clone()),
                };
                let out = cx.temp(i);
                cx.collective(i, kind, vec![x, out], vec![vec![full], vec![Dim::from(row)]]);
                out
            }
            op if EwOp::from_op(op).is_some() => cx.fused(i)?,
            _ => return Err(cx.unsupported(i, "no CPU lowering")),
        };
        cx.val_buf[i] = Some(buf);
    }
    for (name, v) in &g.outputs {
        let b = cx.val_buf[v.index()].expect("lowered");
        if !cx.is_state(b) {
            cx.program.outputs.push((name.clone(), b));
        }
    }
    launch_node.resize(cx.program.launches.len(), g.nodes.len().saturating_sub(1));
    cx.program.regions = block_regions(g, &readers, &cx.val_buf, &cx.program, &launch_node);
    let _ = cx.store;
    // Kernels that only served as stepping stones of a growing group are not called by any launch.
    let used: std::collections::HashSet<&str> = cx.program.launches.iter().map(|l| l.kernel.as_str()).collect();
    cx.kernels.retain(|k| used.contains(k.symbol().as_str()));
    Ok(Lowered { program: cx.program, kernels: cx.kernels, weights: cx.weights })
}

/// Per node: whether it is some decoder block's residual input or output.
fn block_boundaries(g: &Graph) -> Vec<bool> {
    let mut out = vec![false; g.nodes.len()];
    for b in kiln_ir::blocks::find_blocks(g).unwrap_or_default() {
        out[b.x_in.index()] = true;
        out[b.x_out.index()] = true;
    }
    out
}

/// The program's decoder blocks as skippable [`Region`]s, or none when the graph has no blocks or one
/// of them is not self-contained (a value inside read from outside, other than the block's residual
/// output and its caches; launches not contiguous).
fn block_regions(
    g: &Graph,
    readers: &[Vec<usize>],
    val_buf: &[Option<usize>],
    program: &Program,
    launch_node: &[usize],
) -> Vec<Region> {
    let Ok(blocks) = kiln_ir::blocks::find_blocks(g) else { return Vec::new() };
    let n = g.nodes.len();
    // Ancestors of v (v included).
    let ancestors = |v: usize| {
        let mut seen = vec![false; n];
        let mut stack = vec![v];
        while let Some(u) = stack.pop() {
            if !std::mem::replace(&mut seen[u], true) {
                stack.extend(g.nodes[u].inputs.iter().map(|x| x.index()));
            }
        }
        seen
    };
    let mut regions = Vec::new();
    for b in &blocks {
        let (x_in, x_out) = (b.x_in.index(), b.x_out.index());
        let before = ancestors(x_in);
        // Sources (inputs, weights, constants) belong to no block: they launch nothing.
        let inside: Vec<bool> = ancestors(x_out)
            .iter()
            .zip(&before)
            .enumerate()
            .map(|(v, (&a, &o))| a && !o && !g.nodes[v].inputs.is_empty())
            .collect();
        // Only the residual output and the caches may be used outside the block.
        let state_out = |v: usize| g.outputs.iter().any(|(name, o)| o.index() == v && b.caches.contains(name));
        for v in (0..n).filter(|&v| inside[v] && v != x_out) {
            let leaks = readers[v].iter().any(|&r| !inside[r])
                || g.outputs.iter().any(|(_, o)| o.index() == v) && !state_out(v);
            if leaks {
                return Vec::new();
            }
        }
        let mine: Vec<usize> = (0..program.launches.len()).filter(|&l| inside[launch_node[l]]).collect();
        let (Some(&first), Some(&last)) = (mine.first(), mine.last()) else { return Vec::new() };
        if last + 1 - first != mine.len() {
            return Vec::new();
        }
        let (Some(input), Some(output)) = (val_buf[x_in], val_buf[x_out]) else { return Vec::new() };
        let states = b
            .caches
            .iter()
            .filter_map(|name| {
                program
                    .buffers
                    .iter()
                    .position(|buf| matches!(&buf.kind, BufferKind::State { name: s, .. } if s == name))
            })
            .collect();
        regions.push(Region { layer: b.layer, launches: (first, last + 1), input, output, states });
    }
    regions
}
