//! The reference interpreter: runs any graph in plain f32 (int values as i64), weights dequantized.
//!
//! It is the oracle for every other stage, so it is written to be obviously correct rather than fast:
//! one straightforward loop nest per op, dot products and reductions accumulated in f64 (so results do not
//! depend on summation order), every result checked against the node's declared type.

use crate::collective::{
    all_gather_rows, bind_shard_symbols, reduce_scatter_rows, shard_range, Collective, SingleRank,
};
use crate::dtype::DType;
use crate::graph::{Graph, ValueId};
use crate::op::{norm_axis, Op, RopeMode};
use crate::shape::SymEnv;
use crate::weights::WeightStore;
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Element storage: floats for every float dtype (f16/bf16 values are rounded to their precision on
/// cast), i64 for every integer dtype.
#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Data,
}

impl Tensor {
    pub fn f32(shape: Vec<usize>, data: Vec<f32>) -> Tensor {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "tensor data does not match shape");
        Tensor { shape, data: Data::F32(data) }
    }
    pub fn i64(shape: Vec<usize>, data: Vec<i64>) -> Tensor {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "tensor data does not match shape");
        Tensor { shape, data: Data::I64(data) }
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            Data::F32(v) => Some(v),
            Data::I64(_) => None,
        }
    }
    pub fn as_i64(&self) -> Option<&[i64]> {
        match &self.data {
            Data::I64(v) => Some(v),
            Data::F32(_) => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InterpError {
    #[error("input `{0}` was not provided")]
    MissingInput(String),
    #[error("input `{name}`: {msg}")]
    BadInput { name: String, msg: String },
    #[error("weight `{name}`: {msg}")]
    Weight { name: String, msg: String },
    #[error("{value} = {op}: {msg}")]
    Op { value: ValueId, op: &'static str, msg: String },
}

/// Runs graphs against one weight store, caching dequantized weights between runs. Collective ops
/// (`all_reduce`, …) go through the rank's [`Collective`]: a single rank (the identity) unless
/// [`Interpreter::with_collective`] gives another.
pub struct Interpreter<'w> {
    weights: &'w WeightStore,
    dequantized: Mutex<HashMap<String, Arc<Tensor>>>,
    collective: Arc<dyn Collective>,
}

impl<'w> Interpreter<'w> {
    pub fn new(weights: &'w WeightStore) -> Self {
        Interpreter { weights, dequantized: Mutex::new(HashMap::new()), collective: Arc::new(SingleRank) }
    }

    /// Runs as one rank of a tensor-parallel group.
    pub fn with_collective(mut self, c: Arc<dyn Collective>) -> Self {
        self.collective = c;
        self
    }

    pub fn collective(&self) -> &dyn Collective {
        &*self.collective
    }

    fn weight(&self, name: &str, g: &Graph, v: ValueId) -> Result<Arc<Tensor>, InterpError> {
        if let Some(t) = self.dequantized.lock().unwrap().get(name) {
            return Ok(t.clone());
        }
        let werr = |msg: String| InterpError::Weight { name: name.to_string(), msg };
        let data = self.weights.get(name).ok_or_else(|| werr("not in the weight store".into()))?;
        let declared = g.ty(v);
        let want: Option<Vec<usize>> = declared.shape.iter().map(|d| d.as_fixed().map(|x| x as usize)).collect();
        if declared.dtype != data.dtype || want.as_deref() != Some(&data.shape[..]) {
            return Err(werr(format!("graph declares {declared} but the store holds {}{:?}", data.dtype, data.shape)));
        }
        let t = if data.dtype == crate::DType::I32 {
            // Straight from the bytes: through f32 (below) an i32 above 2^24 would be rounded, and
            // `nm_linear` keeps packed bytes in i32 words.
            let vals = data.bytes.chunks_exact(4).map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])));
            Tensor::i64(data.shape.clone(), vals.collect())
        } else if data.dtype.is_int() {
            let vals = data.to_f32().map_err(|e| werr(e.to_string()))?;
            Tensor::i64(data.shape.clone(), vals.into_iter().map(|x| x as i64).collect())
        } else {
            Tensor::f32(data.shape.clone(), data.to_f32().map_err(|e| werr(e.to_string()))?)
        };
        let t = Arc::new(t);
        self.dequantized.lock().unwrap().insert(name.to_string(), t.clone());
        Ok(t)
    }

    /// Dequantizes every weight `g` reads now (instead of on first use), calling `tick` after each.
    pub fn prepare(&self, g: &Graph, mut tick: impl FnMut()) -> Result<(), InterpError> {
        for (name, v) in g.weights() {
            self.weight(name, g, v)?;
            tick();
        }
        Ok(())
    }

    /// Runs `g` on named inputs and returns its named outputs in order.
    pub fn run(&self, g: &Graph, inputs: &[(&str, Tensor)]) -> Result<Vec<(String, Tensor)>, InterpError> {
        let mut env = bind_symbols(g, inputs)?;
        bind_shard_symbols(&mut env, self.collective.rank(), self.collective.world());
        // Last use of each value, so intermediates can be dropped early.
        let mut last_use = vec![0usize; g.nodes.len()];
        for (i, n) in g.nodes.iter().enumerate() {
            for v in &n.inputs {
                last_use[v.index()] = i;
            }
        }
        for (_, v) in &g.outputs {
            last_use[v.index()] = usize::MAX;
        }
        let mut vals: Vec<Option<Arc<Tensor>>> = vec![None; g.nodes.len()];
        for (i, n) in g.nodes.iter().enumerate() {
            let id = ValueId(i as u32);
            let oerr = |msg: String| InterpError::Op { value: id, op: n.op.name(), msg };
            let result = match &n.op {
                Op::Input { name } => {
                    let t = inputs.iter().find(|(k, _)| k == name).map(|(_, t)| t.clone());
                    Arc::new(t.ok_or_else(|| InterpError::MissingInput(name.clone()))?)
                }
                Op::Weight { name } => self.weight(name, g, id)?,
                Op::Reshape { .. } => {
                    // The target shape is the node's type under the bound symbols.
                    let src = vals[n.inputs[0].index()].as_deref().unwrap();
                    let want = n.ty.concrete(&env).ok_or_else(|| oerr(format!("cannot evaluate type {}", n.ty)))?;
                    if want.iter().product::<usize>() != src.numel() {
                        return Err(oerr(format!("cannot reshape {:?} to {want:?}", src.shape)));
                    }
                    Arc::new(Tensor { shape: want, data: src.data.clone() })
                }
                Op::AllReduce | Op::ReduceScatter { .. } | Op::Shard { .. } | Op::AllGather { .. } => {
                    let src = vals[n.inputs[0].index()].as_deref().unwrap();
                    let want = n.ty.concrete(&env).ok_or_else(|| oerr(format!("cannot evaluate type {}", n.ty)))?;
                    Arc::new(self.collective_op(&n.op, src, &want).map_err(oerr)?)
                }
                _ => {
                    let args: Vec<&Tensor> = n.inputs.iter().map(|v| vals[v.index()].as_deref().unwrap()).collect();
                    Arc::new(eval(&n.op, &args, &env).map_err(oerr)?)
                }
            };
            let want = n.ty.concrete(&env).ok_or_else(|| oerr(format!("cannot evaluate type {}", n.ty)))?;
            if result.shape != want {
                return Err(oerr(format!("produced shape {:?}, type says {} = {want:?}", result.shape, n.ty)));
            }
            vals[i] = Some(result);
            for v in &n.inputs {
                if last_use[v.index()] == i {
                    vals[v.index()] = None;
                }
            }
        }
        Ok(g.outputs.iter().map(|(name, v)| (name.clone(), (*vals[v.index()].clone().unwrap()).clone())).collect())
    }
}

impl Interpreter<'_> {
    /// Evaluates a collective op on this rank's operand. The split axis is moved outermost so that each
    /// rank's slice is one contiguous block.
    fn collective_op(&self, op: &Op, x: &Tensor, want: &[usize]) -> Result<Tensor, String> {
        let c = &*self.collective;
        let (rank, world) = (c.rank(), c.world());
        let data = f(x)?;
        let axis = match op {
            Op::AllReduce => {
                let mut out = data.to_vec();
                c.all_reduce(&mut out)?;
                return Ok(Tensor::f32(x.shape.clone(), out));
            }
            Op::ReduceScatter { axis } | Op::Shard { axis } | Op::AllGather { axis } => *axis,
            _ => unreachable!("only collective ops"),
        };
        let ax = norm_axis(axis, x.shape.len())?;
        let (outer, len, inner) = around(&x.shape, ax);
        let row = outer * inner;
        // [outer, len, inner] ↔ [len, outer, inner]
        let to_rows = |v: &[f32], len: usize| -> Vec<f32> {
            let mut out = vec![0f32; v.len()];
            for o in 0..outer {
                for l in 0..len {
                    out[(l * outer + o) * inner..][..inner].copy_from_slice(&v[(o * len + l) * inner..][..inner]);
                }
            }
            out
        };
        let from_rows = |v: &[f32], len: usize| -> Vec<f32> {
            let mut out = vec![0f32; v.len()];
            for o in 0..outer {
                for l in 0..len {
                    out[(o * len + l) * inner..][..inner].copy_from_slice(&v[(l * outer + o) * inner..][..inner]);
                }
            }
            out
        };
        let rows = to_rows(data, len);
        let (out_len, out_rows) = match op {
            Op::ReduceScatter { .. } => {
                let mine = shard_range(len, rank, world).len();
                let mut out = vec![0f32; mine * row];
                reduce_scatter_rows(c, &rows, len, row, &mut out)?;
                (mine, out)
            }
            Op::Shard { .. } => {
                let r = shard_range(len, rank, world);
                (r.len(), rows[r.start * row..r.end * row].to_vec())
            }
            _ => {
                let full = want[ax];
                let share = shard_range(full, rank, world).len();
                if share != len {
                    return Err(format!("this rank holds {len} rows of {full}, its share is {share}"));
                }
                let mut out = vec![0f32; full * row];
                all_gather_rows(c, &rows, full, row, &mut out)?;
                (full, out)
            }
        };
        let mut shape = x.shape.clone();
        shape[ax] = out_len;
        Ok(Tensor::f32(shape, from_rows(&out_rows, out_len)))
    }
}

/// Binds every symbol from the shapes of the inputs and checks their dtypes.
pub fn bind_symbols(g: &Graph, inputs: &[(&str, Tensor)]) -> Result<SymEnv, InterpError> {
    let mut env = SymEnv::new();
    let mut deferred = Vec::new();
    for (name, v) in g.inputs() {
        let t = &inputs.iter().find(|(k, _)| *k == name).ok_or_else(|| InterpError::MissingInput(name.into()))?.1;
        let ty = g.ty(v);
        let bad = |msg: String| InterpError::BadInput { name: name.to_string(), msg };
        let is_int = matches!(t.data, Data::I64(_));
        if is_int != ty.dtype.is_int() {
            return Err(bad(format!("expected {}, got {} data", ty.dtype, if is_int { "integer" } else { "float" })));
        }
        if t.shape.len() != ty.rank() {
            return Err(bad(format!("expected {ty}, got shape {:?}", t.shape)));
        }
        for (d, &n) in ty.shape.iter().zip(&t.shape) {
            if let Some(s) = d.as_sym() {
                match env.get(s) {
                    Some(&prev) if prev != n as i64 => {
                        return Err(bad(format!("dimension {s} is {n} here but {prev} elsewhere")));
                    }
                    _ => {
                        env.insert(s.to_string(), n as i64);
                    }
                }
            } else {
                deferred.push((name, d.clone(), n));
            }
        }
    }
    for (name, d, n) in deferred {
        if d.eval(&env) != Some(n as i64) {
            return Err(InterpError::BadInput {
                name: name.into(),
                msg: format!("dimension {d} does not match size {n}"),
            });
        }
    }
    Ok(env)
}

fn f(t: &Tensor) -> Result<&[f32], String> {
    t.as_f32().ok_or_else(|| "expected a float operand".to_string())
}

fn ints(t: &Tensor) -> Result<&[i64], String> {
    t.as_i64().ok_or_else(|| "expected an integer operand".to_string())
}

pub use crate::numeric::dot;

fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

fn broadcast_binary(a: &Tensor, b: &Tensor, op: impl Fn(f32, f32) -> f32) -> Result<Tensor, String> {
    let (av, bv) = (f(a)?, f(b)?);
    let n = a.shape.len().max(b.shape.len());
    let pad = |s: &[usize]| -> Vec<usize> { std::iter::repeat_n(1, n - s.len()).chain(s.iter().copied()).collect() };
    let (sa, sb) = (pad(&a.shape), pad(&b.shape));
    let mut out_shape = Vec::with_capacity(n);
    for i in 0..n {
        out_shape.push(match (sa[i], sb[i]) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            (x, y) => return Err(format!("cannot broadcast {x} with {y}")),
        });
    }
    let (ta, tb) = (strides(&sa), strides(&sb));
    let bs = |s: &[usize], t: &[usize]| -> Vec<usize> { (0..n).map(|i| if s[i] == 1 { 0 } else { t[i] }).collect() };
    let (ba, bb) = (bs(&sa, &ta), bs(&sb, &tb));
    let total: usize = out_shape.iter().product();
    let mut out = Vec::with_capacity(total);
    let mut idx = vec![0usize; n];
    for _ in 0..total {
        let ia: usize = (0..n).map(|i| idx[i] * ba[i]).sum();
        let ib: usize = (0..n).map(|i| idx[i] * bb[i]).sum();
        out.push(op(av[ia], bv[ib]));
        for d in (0..n).rev() {
            idx[d] += 1;
            if idx[d] < out_shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    Ok(Tensor::f32(out_shape, out))
}

fn unary(t: &Tensor, op: impl Fn(f64) -> f64) -> Result<Tensor, String> {
    Ok(Tensor::f32(t.shape.clone(), f(t)?.iter().map(|&x| op(x as f64) as f32).collect()))
}

/// Splits `shape` around `axis` into (outer, len, inner).
fn around(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    (shape[..axis].iter().product(), shape[axis], shape[axis + 1..].iter().product())
}

fn reduce(t: &Tensor, axis: i64, op: impl Fn(&[f64]) -> f64) -> Result<Tensor, String> {
    let x = f(t)?;
    let ax = norm_axis(axis, t.shape.len())?;
    let (outer, len, inner) = around(&t.shape, ax);
    let mut out = vec![0f32; outer * inner];
    let mut lane = vec![0f64; len];
    for o in 0..outer {
        for i in 0..inner {
            for (k, l) in lane.iter_mut().enumerate() {
                *l = x[(o * len + k) * inner + i] as f64;
            }
            out[o * inner + i] = op(&lane) as f32;
        }
    }
    let mut shape = t.shape.clone();
    shape[ax] = 1;
    Ok(Tensor::f32(shape, out))
}

fn softmax_in_place(row: &mut [f64]) {
    let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut sum = 0.0;
    for x in row.iter_mut() {
        *x = (*x - m).exp();
        sum += *x;
    }
    for x in row.iter_mut() {
        *x /= sum;
    }
}

/// Evaluates one (non-source) op on concrete operands.
pub fn eval(op: &Op, args: &[&Tensor], env: &SymEnv) -> Result<Tensor, String> {
    if let Some(rule) = op.unary() {
        return unary(args[0], rule.eval);
    }
    match op {
        Op::Input { .. } | Op::Weight { .. } => Err("source ops are evaluated by the interpreter".into()),
        Op::Constant { value } => Ok(Tensor::f32(vec![], vec![*value])),
        Op::Embedding => {
            let (table, ids) = (f(args[0])?, ints(args[1])?);
            let (v, d) = (args[0].shape[0], args[0].shape[1]);
            let mut out = Vec::with_capacity(ids.len() * d);
            for &id in ids {
                if id < 0 || id as usize >= v {
                    return Err(format!("token id {id} is outside the vocabulary of {v}"));
                }
                out.extend_from_slice(&table[id as usize * d..(id as usize + 1) * d]);
            }
            let mut shape = args[1].shape.clone();
            shape.push(d);
            Ok(Tensor::f32(shape, out))
        }
        Op::Linear => {
            let (x, w) = (f(args[0])?, f(args[1])?);
            let (n, k) = (args[1].shape[0], args[1].shape[1]);
            let m = x.len() / k.max(1);
            // Column-major scratch so each weight row is read once and the work splits over output features.
            let mut cols = vec![0f32; n * m];
            cols.par_chunks_mut(m.max(1)).zip(w.par_chunks(k.max(1))).for_each(|(col, wrow)| {
                for (r, c) in col.iter_mut().enumerate() {
                    *c = dot(&x[r * k..(r + 1) * k], wrow) as f32;
                }
            });
            let mut out = vec![0f32; m * n];
            for r in 0..m {
                for c in 0..n {
                    out[r * n + c] = cols[c * m + r];
                }
            }
            let mut shape = args[0].shape.clone();
            *shape.last_mut().unwrap() = n;
            Ok(Tensor::f32(shape, out))
        }
        Op::MatMul => {
            let (a, b) = (f(args[0])?, f(args[1])?);
            let r = args[0].shape.len();
            let (m, k, n) = (args[0].shape[r - 2], args[0].shape[r - 1], args[1].shape[r - 1]);
            let batch: usize = args[0].shape[..r - 2].iter().product();
            let mut out = vec![0f32; batch * m * n];
            let mut bt = vec![0f32; k * n];
            for bi in 0..batch {
                let bb = &b[bi * k * n..(bi + 1) * k * n];
                for i in 0..k {
                    for j in 0..n {
                        bt[j * k + i] = bb[i * n + j];
                    }
                }
                for i in 0..m {
                    let arow = &a[(bi * m + i) * k..(bi * m + i + 1) * k];
                    for j in 0..n {
                        out[(bi * m + i) * n + j] = dot(arow, &bt[j * k..(j + 1) * k]) as f32;
                    }
                }
            }
            let mut shape = args[0].shape[..r - 1].to_vec();
            shape.push(n);
            Ok(Tensor::f32(shape, out))
        }
        Op::Add => broadcast_binary(args[0], args[1], |a, b| a + b),
        Op::Sub => broadcast_binary(args[0], args[1], |a, b| a - b),
        Op::Mul => broadcast_binary(args[0], args[1], |a, b| a * b),
        Op::Div => broadcast_binary(args[0], args[1], |a, b| a / b),
        Op::Pow => broadcast_binary(args[0], args[1], |a, b| (a as f64).powf(b as f64) as f32),
        Op::Iota { n } => Ok(Tensor::f32(vec![*n as usize], (0..*n).map(|i| i as f32).collect())),
        Op::CausalMask => {
            let t = args[0];
            let x = f(t)?;
            let r = t.shape.len();
            let (s, tl) = (t.shape[r - 2], t.shape[r - 1]);
            if tl < s {
                return Err(format!("causal_mask: {tl} columns are fewer than the {s} rows"));
            }
            let mut out = x.to_vec();
            for (k, v) in out.iter_mut().enumerate() {
                let (i, j) = ((k / tl) % s.max(1), k % tl);
                if j > tl - s + i {
                    *v = f32::NEG_INFINITY;
                }
            }
            Ok(Tensor::f32(t.shape.clone(), out))
        }
        Op::ReduceSum { axis } => reduce(args[0], *axis, |l| l.iter().sum()),
        Op::ReduceMax { axis } => reduce(args[0], *axis, |l| l.iter().copied().fold(f64::NEG_INFINITY, f64::max)),
        Op::ReduceMean { axis } => reduce(args[0], *axis, |l| l.iter().sum::<f64>() / l.len() as f64),
        Op::Softmax { axis } => {
            let x = f(args[0])?;
            let ax = norm_axis(*axis, args[0].shape.len())?;
            let (outer, len, inner) = around(&args[0].shape, ax);
            let mut out = vec![0f32; x.len()];
            let mut lane = vec![0f64; len];
            for o in 0..outer {
                for i in 0..inner {
                    for (k, l) in lane.iter_mut().enumerate() {
                        *l = x[(o * len + k) * inner + i] as f64;
                    }
                    softmax_in_place(&mut lane);
                    for (k, l) in lane.iter().enumerate() {
                        out[(o * len + k) * inner + i] = *l as f32;
                    }
                }
            }
            Ok(Tensor::f32(args[0].shape.clone(), out))
        }
        Op::RmsNorm { eps } => {
            let (x, w) = (f(args[0])?, f(args[1])?);
            let d = w.len();
            let mut out = Vec::with_capacity(x.len());
            for row in x.chunks(d.max(1)) {
                let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / d as f64;
                let inv = 1.0 / (ms + *eps as f64).sqrt();
                out.extend(row.iter().zip(w).map(|(&v, &g)| (v as f64 * inv * g as f64) as f32));
            }
            Ok(Tensor::f32(args[0].shape.clone(), out))
        }
        Op::Rope { mode, theta, n_rot } => {
            let (x, pos) = (f(args[0])?, ints(args[1])?);
            let [b, s, h, d] = args[0].shape[..] else {
                return Err("rope needs rank 4".into());
            };
            let n_rot = *n_rot as usize;
            let half = n_rot / 2;
            let mut out = x.to_vec();
            for bi in 0..b {
                for si in 0..s {
                    let p = pos[bi * s + si] as f64;
                    for hi in 0..h {
                        let base = ((bi * s + si) * h + hi) * d;
                        for i in 0..half {
                            let angle = p * (*theta as f64).powf(-2.0 * i as f64 / n_rot as f64);
                            let (sin, cos) = angle.sin_cos();
                            let (i0, i1) = match mode {
                                RopeMode::Normal => (2 * i, 2 * i + 1),
                                RopeMode::Neox => (i, i + half),
                            };
                            let (x0, x1) = (x[base + i0] as f64, x[base + i1] as f64);
                            out[base + i0] = (x0 * cos - x1 * sin) as f32;
                            out[base + i1] = (x0 * sin + x1 * cos) as f32;
                        }
                    }
                }
            }
            Ok(Tensor::f32(args[0].shape.clone(), out))
        }
        Op::Attention { scale } => {
            let (q, k, v) = (f(args[0])?, f(args[1])?, f(args[2])?);
            let [b, s, hq, d] = args[0].shape[..] else {
                return Err("attention needs rank 4".into());
            };
            let [_, t, hkv, _] = args[1].shape[..] else {
                return Err("attention needs rank 4".into());
            };
            if t < s {
                return Err(format!("kv length {t} is shorter than the query length {s}"));
            }
            let group = hq / hkv;
            let mut out = vec![0f32; q.len()];
            let mut scores = vec![0f64; t];
            for bi in 0..b {
                for h in 0..hq {
                    let kh = h / group;
                    for i in 0..s {
                        // Query i sits at absolute position t - s + i and sees keys 0..=that.
                        let visible = t - s + i + 1;
                        let qrow = &q[((bi * s + i) * hq + h) * d..][..d];
                        for (j, sc) in scores.iter_mut().enumerate().take(visible) {
                            let krow = &k[((bi * t + j) * hkv + kh) * d..][..d];
                            *sc = dot(qrow, krow) * *scale as f64;
                        }
                        softmax_in_place(&mut scores[..visible]);
                        let orow = &mut out[((bi * s + i) * hq + h) * d..][..d];
                        for (c, o) in orow.iter_mut().enumerate() {
                            let mut acc = 0f64;
                            for (j, p) in scores[..visible].iter().enumerate() {
                                acc += p * v[((bi * t + j) * hkv + kh) * d + c] as f64;
                            }
                            *o = acc as f32;
                        }
                    }
                }
            }
            Ok(Tensor::f32(args[0].shape.clone(), out))
        }
        Op::FlexAttention { scale, block, gamma, tau, min_len } => {
            let p = crate::flex::FlexParams { block: *block, gamma: *gamma, tau: *tau, min_len: *min_len };
            p.validate()?;
            let [b, s, hq, d] = args[0].shape[..] else {
                return Err("flex_attention needs rank 4".into());
            };
            let [_, t, hkv, _] = args[1].shape[..] else {
                return Err("flex_attention needs rank 4".into());
            };
            if (s as i64) < *min_len {
                // Exactly the dense op.
                return eval(&Op::Attention { scale: *scale }, args, env);
            }
            if t < s {
                return Err(format!("kv length {t} is shorter than the query length {s}"));
            }
            let out =
                crate::flex::flex_attention(f(args[0])?, f(args[1])?, f(args[2])?, (b, s, hq, d), (t, hkv), *scale, &p);
            Ok(Tensor::f32(args[0].shape.clone(), out))
        }
        Op::SwiGlu => {
            let (g, u) = (f(args[0])?, f(args[1])?);
            Ok(Tensor::f32(
                args[0].shape.clone(),
                g.iter().zip(u).map(|(&g, &u)| (silu(g as f64) * u as f64) as f32).collect(),
            ))
        }
        Op::Threshold => {
            let (x, t) = (f(args[0])?, f(args[1])?);
            let c = t.len().max(1);
            let out = x.iter().enumerate().map(|(i, &v)| if v.abs() > t[i % c] { v } else { 0.0 }).collect();
            Ok(Tensor::f32(args[0].shape.clone(), out))
        }
        Op::MaskedLinear => {
            let y = eval(&Op::Linear, &args[..2], env)?;
            let mask = f(args[2])?;
            let Data::F32(mut v) = y.data else { unreachable!("linear gives floats") };
            for (o, &m) in v.iter_mut().zip(mask) {
                if m == 0.0 {
                    *o = 0.0;
                }
            }
            Ok(Tensor::f32(y.shape, v))
        }
        // Both layouts hold the same values; the dense one is the reference (a wrong CSR shows up as a
        // compiled result that differs from this).
        Op::SparseLinear { .. } => eval(&Op::Linear, &args[..2], env),
        // The compact form decoded to the dense pruned matrix (validated first), then a plain linear. The
        // dense layout, when present, holds the same values and is the kernels' to read (a wrong one
        // shows up as a compiled result that differs from this).
        Op::NmLinear { dtype, keep, group, .. } => {
            let words = ints(args[1])?;
            let data: Vec<u8> = words.iter().flat_map(|&w| (w as i32).to_le_bytes()).collect();
            let w = crate::sparse::NmSparse {
                dtype: *dtype,
                pattern: crate::sparse::NmPattern { keep: *keep as usize, group: *group as usize },
                n: args[1].shape[0],
                k: *args[0].shape.last().ok_or("nm_linear input must have rank ≥ 1")?,
                data,
            };
            let wf = w.dequantize().map_err(|e| format!("nm_linear: {e}"))?;
            let wt = Tensor::f32(vec![w.n, w.k], wf);
            eval(&Op::Linear, &[args[0], &wt], env)
        }
        // Decoded to the dense pruned matrix (validated first), then a plain linear; the dense layout, when
        // present, is the kernels' (as for `nm_linear`).
        Op::BitmapLinear { dtype, gran, kept, .. } => {
            let words = ints(args[1])?;
            let w = crate::sparse::BitmapSparse {
                dtype: *dtype,
                gran: *gran as usize,
                n: args[1].shape[0],
                k: *args[0].shape.last().ok_or("bitmap_linear input must have rank ≥ 1")?,
                kept: *kept as usize,
                data: words.iter().flat_map(|&w| (w as i32).to_le_bytes()).collect(),
            };
            let wf = w.dequantize().map_err(|e| format!("bitmap_linear: {e}"))?;
            let wt = Tensor::f32(vec![w.n, w.k], wf);
            eval(&Op::Linear, &[args[0], &wt], env)
        }
        Op::ActiveLinear => {
            let (x, wt) = (f(args[0])?, f(args[1])?);
            let (k, n) = (args[1].shape[0], args[1].shape[1]);
            let m = x.len() / k.max(1);
            let mut out = vec![0f32; m * n];
            out.par_chunks_mut(n.max(1)).enumerate().for_each(|(r, orow)| {
                let mut acc = vec![0f64; n];
                for (j, &xj) in x[r * k..(r + 1) * k].iter().enumerate() {
                    if xj != 0.0 {
                        for (a, &w) in acc.iter_mut().zip(&wt[j * n..(j + 1) * n]) {
                            *a += xj as f64 * w as f64;
                        }
                    }
                }
                for (o, a) in orow.iter_mut().zip(acc) {
                    *o = a as f32;
                }
            });
            let mut shape = args[0].shape.clone();
            *shape.last_mut().unwrap() = n;
            Ok(Tensor::f32(shape, out))
        }
        Op::CoreKeep { past } => {
            let core = f(args[1])?;
            let [b, s, _] = args[0].shape[..] else { return Err("core_keep rows must have rank 3".into()) };
            let c = args[1].shape[1];
            let past = past.eval(env).ok_or_else(|| format!("cannot evaluate past = {past}"))?;
            let mut out = vec![1f32; b * s * c];
            if past != 0 {
                for (r, row) in out.chunks_mut(c.max(1)).enumerate() {
                    row.copy_from_slice(&core[(r / s.max(1)) * c..][..c]);
                }
            }
            Ok(Tensor::f32(vec![b, s, c], out))
        }
        Op::CoreLinear { past } => {
            let keep = eval(&Op::CoreKeep { past: past.clone() }, &[args[0], args[2]], env)?;
            eval(&Op::MaskedLinear, &[args[0], args[1], &keep], env)
        }
        Op::CoreSelect { alpha, beta, past } => {
            let (act, core) = (f(args[0])?, f(args[1])?);
            let [b, s, c] = args[0].shape[..] else { return Err("core_select activation must have rank 3".into()) };
            let past = past.eval(env).ok_or_else(|| format!("cannot evaluate past = {past}"))?;
            if past != 0 {
                return Ok(args[1].clone());
            }
            let mut out = Vec::with_capacity(core.len());
            for bi in 0..b {
                out.extend(crate::coreinfer::core_set(&act[bi * s * c..(bi + 1) * s * c], s, c, *alpha, *beta));
            }
            Ok(Tensor::f32(vec![b, c], out))
        }
        Op::Reshape { .. } => Err("reshape needs the bound symbols; the interpreter evaluates it".into()),
        Op::Transpose { perm } => {
            let t = args[0];
            let r = t.shape.len();
            let perm: Vec<usize> = perm.iter().map(|&p| norm_axis(p, r)).collect::<Result<_, _>>()?;
            let out_shape: Vec<usize> = perm.iter().map(|&p| t.shape[p]).collect();
            let src_strides = strides(&t.shape);
            let total = t.numel();
            let mut idx = vec![0usize; r];
            let mut order = Vec::with_capacity(total);
            for _ in 0..total {
                order.push((0..r).map(|i| idx[i] * src_strides[perm[i]]).sum::<usize>());
                for dd in (0..r).rev() {
                    idx[dd] += 1;
                    if idx[dd] < out_shape[dd] {
                        break;
                    }
                    idx[dd] = 0;
                }
            }
            Ok(match &t.data {
                Data::F32(v) => Tensor::f32(out_shape, order.iter().map(|&i| v[i]).collect()),
                Data::I64(v) => Tensor::i64(out_shape, order.iter().map(|&i| v[i]).collect()),
            })
        }
        Op::Concat { axis } => {
            let (a, b) = (args[0], args[1]);
            let ax = norm_axis(*axis, a.shape.len())?;
            let (outer, la, inner) = around(&a.shape, ax);
            let lb = b.shape[ax];
            let mut shape = a.shape.clone();
            shape[ax] = la + lb;
            fn cat<T: Copy>(x: &[T], y: &[T], outer: usize, ca: usize, cb: usize) -> Vec<T> {
                let mut out = Vec::with_capacity(x.len() + y.len());
                for o in 0..outer {
                    out.extend_from_slice(&x[o * ca..(o + 1) * ca]);
                    out.extend_from_slice(&y[o * cb..(o + 1) * cb]);
                }
                out
            }
            Ok(match (&a.data, &b.data) {
                (Data::F32(x), Data::F32(y)) => Tensor::f32(shape, cat(x, y, outer, la * inner, lb * inner)),
                (Data::I64(x), Data::I64(y)) => Tensor::i64(shape, cat(x, y, outer, la * inner, lb * inner)),
                _ => return Err("concat of float and integer tensors".into()),
            })
        }
        Op::Slice { axis, start, end } => {
            let t = args[0];
            let ax = norm_axis(*axis, t.shape.len())?;
            let (outer, len, inner) = around(&t.shape, ax);
            let bound = |d: &crate::shape::Dim| d.eval(env).and_then(|v| usize::try_from(v).ok());
            let (s, e) = match (bound(start), bound(end)) {
                (Some(s), Some(e)) if s <= e && e <= len => (s, e),
                _ => return Err(format!("slice {start}..{end} is outside dimension {len}")),
            };
            let mut shape = t.shape.clone();
            shape[ax] = e - s;
            fn cut<T: Copy>(x: &[T], outer: usize, len: usize, inner: usize, s: usize, e: usize) -> Vec<T> {
                (0..outer).flat_map(|o| x[(o * len + s) * inner..(o * len + e) * inner].iter().copied()).collect()
            }
            Ok(match &t.data {
                Data::F32(x) => Tensor::f32(shape, cut(x, outer, len, inner, s, e)),
                Data::I64(x) => Tensor::i64(shape, cut(x, outer, len, inner, s, e)),
            })
        }
        Op::AllReduce | Op::ReduceScatter { .. } | Op::Shard { .. } | Op::AllGather { .. } => {
            Err("collective ops need the rank's communicator; the interpreter evaluates them".into())
        }
        Op::Cast { dtype } => {
            let t = args[0];
            Ok(match (&t.data, dtype) {
                (Data::F32(v), DType::F32) => Tensor::f32(t.shape.clone(), v.clone()),
                (Data::F32(v), DType::F16) => {
                    Tensor::f32(t.shape.clone(), v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect())
                }
                (Data::F32(v), DType::BF16) => {
                    Tensor::f32(t.shape.clone(), v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect())
                }
                (Data::F32(v), DType::I32 | DType::I64) => {
                    Tensor::i64(t.shape.clone(), v.iter().map(|&x| x as i64).collect())
                }
                (Data::I64(v), DType::I32) => {
                    Tensor::i64(t.shape.clone(), v.iter().map(|&x| x as i32 as i64).collect())
                }
                (Data::I64(v), DType::I64) => Tensor::i64(t.shape.clone(), v.clone()),
                (Data::I64(v), _) => Tensor::f32(t.shape.clone(), v.iter().map(|&x| x as f32).collect()),
                (_, d) => return Err(format!("cannot cast to {d}")),
            })
        }
        // Only the unary ops, evaluated by their table rule above, reach here.
        other => Err(format!("the interpreter has no rule for `{}`", other.name())),
    }
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}
