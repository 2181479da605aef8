//! The reference interpreter: runs any graph in plain f32 (int values as i64), weights dequantized.
//!
//! It is the oracle for every other stage, so it is written to be obviously correct rather than fast:
//! one straightforward loop nest per op, dot products and reductions accumulated in f64 (so results do not
//! depend on summation order), every result checked against the node's declared type.

use crate::collective::{
    all_gather_rows, bind_shard_symbols, reduce_scatter_rows, shard_range, Collective, SingleRank,
};
use crate::graph::{Graph, ValueId};
use crate::op::{norm_axis, Op};
use crate::shape::SymEnv;
use crate::tensor::{around, f};
use crate::weights::WeightStore;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub use crate::tensor::{Data, Tensor};

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

/// Evaluates one (non-source) op on concrete operands.
pub fn eval(op: &Op, args: &[&Tensor], env: &SymEnv) -> Result<Tensor, String> {
    op.eval(args, env)
}
