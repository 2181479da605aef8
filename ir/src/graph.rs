//! The graph: an arena of nodes in topological order, each producing one value.
//!
//! An arena (a `Vec` indexed by `ValueId`) rather than a general graph library: operands always point
//! backwards, so the node order *is* a topological order, value numbering is stable and printing is
//! deterministic, and passes rebuild graphs instead of mutating edges in place.

use crate::op::Op;
use crate::shape::TensorType;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Index of a node, and so of the value it produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ValueId(pub u32);

impl ValueId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for ValueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "%{}", self.0)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub op: Op,
    pub inputs: Vec<ValueId>,
    pub ty: TensorType,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Graph {
    pub name: String,
    pub nodes: Vec<Node>,
    /// Named results, in order.
    pub outputs: Vec<(String, ValueId)>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GraphError {
    #[error("graph `{graph}`, {value} = {op}: {msg}")]
    Type { graph: String, value: ValueId, op: &'static str, msg: String },
    #[error("graph `{graph}`: {msg}")]
    Structure { graph: String, msg: String },
}

impl Graph {
    pub fn new(name: impl Into<String>) -> Self {
        Graph { name: name.into(), ..Default::default() }
    }

    pub fn node(&self, v: ValueId) -> &Node {
        &self.nodes[v.index()]
    }

    pub fn ty(&self, v: ValueId) -> &TensorType {
        &self.nodes[v.index()].ty
    }

    /// Appends a node, inferring its type. Source ops (`input`, `weight`) take their type from `declared`.
    pub fn push(&mut self, op: Op, inputs: &[ValueId], declared: Option<TensorType>) -> Result<ValueId, GraphError> {
        let id = ValueId(self.nodes.len() as u32);
        for &i in inputs {
            if i.index() >= self.nodes.len() {
                return Err(self.type_err(id, &op, format!("operand {i} is not defined before use")));
            }
        }
        let tys: Vec<&TensorType> = inputs.iter().map(|&i| self.ty(i)).collect();
        let ty = op.infer(&tys, declared.as_ref()).map_err(|m| self.type_err(id, &op, m))?;
        self.nodes.push(Node { op, inputs: inputs.to_vec(), ty });
        Ok(id)
    }

    /// `push` for ops that compute their type.
    pub fn add(&mut self, op: Op, inputs: &[ValueId]) -> Result<ValueId, GraphError> {
        self.push(op, inputs, None)
    }

    pub fn input(&mut self, name: &str, ty: TensorType) -> Result<ValueId, GraphError> {
        self.push(Op::Input { name: name.into() }, &[], Some(ty))
    }

    pub fn weight(&mut self, name: &str, ty: TensorType) -> Result<ValueId, GraphError> {
        self.push(Op::Weight { name: name.into() }, &[], Some(ty))
    }

    pub fn output(&mut self, name: &str, v: ValueId) {
        self.outputs.push((name.into(), v));
    }

    pub fn output_named(&self, name: &str) -> Option<ValueId> {
        self.outputs.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
    }

    /// Graph inputs as (name, value), in node order.
    pub fn inputs(&self) -> impl Iterator<Item = (&str, ValueId)> {
        self.nodes.iter().enumerate().filter_map(|(i, n)| match &n.op {
            Op::Input { name } => Some((name.as_str(), ValueId(i as u32))),
            _ => None,
        })
    }

    /// Weights referenced by the graph as (name, value), in node order.
    pub fn weights(&self) -> impl Iterator<Item = (&str, ValueId)> {
        self.nodes.iter().enumerate().filter_map(|(i, n)| match &n.op {
            Op::Weight { name } => Some((name.as_str(), ValueId(i as u32))),
            _ => None,
        })
    }

    fn type_err(&self, value: ValueId, op: &Op, msg: String) -> GraphError {
        GraphError::Type { graph: self.name.clone(), value, op: op.name(), msg }
    }

    /// Checks every invariant: operands defined before use, arities, recorded types equal inferred types,
    /// unique input/weight/output names, outputs defined.
    pub fn verify(&self) -> Result<(), GraphError> {
        let structure = |msg: String| GraphError::Structure { graph: self.name.clone(), msg };
        let mut names = std::collections::BTreeSet::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let id = ValueId(i as u32);
            if n.inputs.iter().any(|v| v.index() >= i) {
                return Err(self.type_err(id, &n.op, "operand used before it is defined".into()));
            }
            let tys: Vec<&TensorType> = n.inputs.iter().map(|&v| self.ty(v)).collect();
            let inferred = n.op.infer(&tys, Some(&n.ty)).map_err(|m| self.type_err(id, &n.op, m))?;
            if inferred != n.ty {
                return Err(self.type_err(id, &n.op, format!("recorded type {} but operands give {inferred}", n.ty)));
            }
            if let Op::Input { name } | Op::Weight { name } = &n.op {
                if !names.insert((n.op.name(), name.clone())) {
                    return Err(structure(format!("{} `{name}` is declared twice", n.op.name())));
                }
            }
        }
        let mut out_names = std::collections::BTreeSet::new();
        for (name, v) in &self.outputs {
            if v.index() >= self.nodes.len() {
                return Err(structure(format!("output `{name}` refers to undefined {v}")));
            }
            if !out_names.insert(name) {
                return Err(structure(format!("output `{name}` is declared twice")));
            }
        }
        Ok(())
    }
}
