//! The bridge between Kiln graphs and egg e-graphs.
//!
//! [`KNode`] is egg's `Language` for whole Kiln graphs: an e-node is one IR op with all its attributes
//! (compared through its canonical text, so f32 attributes are hashable and ordered) and its operands as
//! children; `input`, `weight` and `constant` are leaves (sources also carry their declared type).
//! [`TypeAnalysis`] gives every e-class its type (shape with symbolic dims, dtype) through the op table's
//! own `Op::infer`, and its value when it is a scalar constant. [`to_egraph`] loads a graph,
//! [`extract`] turns the cheapest e-node of every needed e-class back into a graph, keeping the input
//! order, the named outputs and the original node order wherever it can (so an unchanged graph comes
//! back identical).
//!
//! In rule patterns an op is written `name` or `name:key=value;key=value` (list values as `[a,b]`,
//! no spaces), and `name:*` matches the op with any attributes — for reshapes and transposes whose
//! attributes follow from types the applier checks anyway (see `rules/README.md`).

pub mod cost;

use egg::{Analysis, DidMerge, EGraph, Id, Language};
use kiln_ir::op::AttrValue;
use kiln_ir::{Graph, Op, TensorType, ValueId};
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::sync::Arc;

/// An op with its attributes, identified by its canonical text (`rms_norm{eps=1e-5}`).
#[derive(Clone, Debug)]
pub struct OpKey {
    pub op: Op,
    /// Declared type of a source op (`input`, `weight`); part of its identity.
    pub declared: Option<TensorType>,
    key: String,
}

impl OpKey {
    pub fn new(op: Op, declared: Option<TensorType>) -> OpKey {
        let attrs: Vec<String> = op.attrs().iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut key = format!("{}{{{}}}", op.name(), attrs.join(","));
        if let Some(t) = &declared {
            key.push_str(&format!(":{t}"));
        }
        OpKey { op, declared, key }
    }
}

impl PartialEq for OpKey {
    fn eq(&self, o: &Self) -> bool {
        self.key == o.key
    }
}
impl Eq for OpKey {}
impl std::hash::Hash for OpKey {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.key.hash(h)
    }
}
impl PartialOrd for OpKey {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for OpKey {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.key.cmp(&o.key)
    }
}

/// One e-node. `kind` (the op's index in the op table) comes first so that nodes of one kind sort
/// together: egg's matcher finds them by binary search on the discriminant, which is what lets a
/// pattern's wildcard (`op: None`) match every attribute value of its kind.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KNode {
    pub kind: u16,
    /// `None` only in patterns: any attributes.
    pub op: Option<Arc<OpKey>>,
    pub children: Vec<Id>,
}

fn kind_of(name: &str) -> Option<u16> {
    Op::NAMES.iter().position(|n| *n == name).map(|i| i as u16)
}

impl KNode {
    pub fn new(op: Op, declared: Option<TensorType>, children: Vec<Id>) -> KNode {
        let kind = kind_of(op.name()).expect("every op is in the table");
        KNode { kind, op: Some(Arc::new(OpKey::new(op, declared))), children }
    }

    pub fn op(&self) -> &Op {
        &self.op.as_ref().expect("e-nodes in an e-graph have attributes").op
    }
}

impl Language for KNode {
    type Discriminant = u16;

    fn discriminant(&self) -> u16 {
        self.kind
    }

    fn matches(&self, other: &Self) -> bool {
        self.kind == other.kind
            && self.children.len() == other.children.len()
            && match (&self.op, &other.op) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }

    fn children(&self) -> &[Id] {
        &self.children
    }

    fn children_mut(&mut self) -> &mut [Id] {
        &mut self.children
    }
}

impl fmt::Display for KNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = Op::NAMES[self.kind as usize];
        match &self.op {
            None => write!(f, "{name}:*"),
            Some(k) => {
                let attrs: Vec<String> =
                    k.op.attrs().iter().map(|(k, v)| format!("{k}={}", v.to_string().replace(' ', ""))).collect();
                if attrs.is_empty() {
                    f.write_str(name)
                } else {
                    write!(f, "{name}:{}", attrs.join(";"))
                }
            }
        }
    }
}

/// Parses a pattern attribute value: `[a,b]`, `"s"` or a bare token.
fn parse_attr(v: &str) -> AttrValue {
    if let Some(inner) = v.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        if inner.is_empty() {
            return AttrValue::List(vec![]);
        }
        AttrValue::List(inner.split(',').map(parse_attr).collect())
    } else if let Some(s) = v.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        AttrValue::Str(s.to_string())
    } else {
        AttrValue::Raw(v.to_string())
    }
}

impl egg::FromOp for KNode {
    type Error = String;

    fn from_op(op: &str, children: Vec<Id>) -> Result<Self, String> {
        let (name, attrs) = op.split_once(':').unwrap_or((op, ""));
        let kind = kind_of(name).ok_or_else(|| format!("unknown op `{name}` in pattern"))?;
        if attrs == "*" {
            return Ok(KNode { kind, op: None, children });
        }
        let parsed: Vec<(String, AttrValue)> = attrs
            .split(';')
            .filter(|s| !s.is_empty())
            .map(|kv| {
                let (k, v) = kv.split_once('=').ok_or_else(|| format!("bad attribute `{kv}` in `{op}`"))?;
                Ok((k.to_string(), parse_attr(v)))
            })
            .collect::<Result<_, String>>()?;
        let o = Op::from_parts(name, &parsed)?;
        if o.arity() != children.len() {
            return Err(format!("`{name}` takes {} operands, the pattern gives {}", o.arity(), children.len()));
        }
        Ok(KNode::new(o, None, children))
    }
}

/// What every e-class knows: its type, whether it depends on weights and constants only (so it could be
/// folded at compile time), and for scalar constants the value.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassData {
    pub ty: TensorType,
    pub is_const: bool,
    pub constant: Option<f32>,
}

#[derive(Default)]
pub struct TypeAnalysis {
    /// Every lift applied: (e-class, the fused e-node's id, rule), for explanations.
    pub lifted: Vec<(Id, Id, String)>,
}

pub type KGraph = EGraph<KNode, TypeAnalysis>;

/// The type `node` would have in `eg`, or why it is ill-typed.
pub fn infer(eg: &KGraph, op: &Op, declared: Option<&TensorType>, children: &[Id]) -> Result<TensorType, String> {
    let tys: Vec<&TensorType> = children.iter().map(|&c| &eg[c].data.ty).collect();
    op.infer(&tys, declared)
}

impl Analysis<KNode> for TypeAnalysis {
    type Data = ClassData;

    fn make(eg: &mut KGraph, n: &KNode) -> ClassData {
        let key = n.op.as_ref().expect("e-graph nodes have attributes");
        // Appliers type-check before they add a node, so an ill-typed node here is a bug in a rule.
        let ty = infer(eg, &key.op, key.declared.as_ref(), &n.children)
            .unwrap_or_else(|e| panic!("ill-typed e-node {n}: {e} (a rule added it without checking)"));
        let constant = match key.op {
            Op::Constant { value } => Some(value),
            _ => None,
        };
        let is_const = match key.op {
            Op::Input { .. } => false,
            _ => n.children.iter().all(|&c| eg[c].data.is_const),
        };
        ClassData { ty, is_const, constant }
    }

    fn merge(&mut self, a: &mut ClassData, b: ClassData) -> DidMerge {
        assert_eq!(a.ty, b.ty, "a rule merged values of different types");
        // Equal values: if either form is constant, both are.
        let c = DidMerge(!a.is_const && b.is_const, a.is_const && !b.is_const);
        a.is_const |= b.is_const;
        c | egg::merge_option(&mut a.constant, b.constant, |x, y| {
            assert_eq!(x.to_bits(), y.to_bits(), "a rule merged different constants");
            DidMerge(false, false)
        })
    }
}

/// A graph loaded into an e-graph: the root of every graph value and of every named output.
pub struct Loaded {
    pub egraph: KGraph,
    /// E-class of each original node.
    pub classes: Vec<Id>,
}

/// Adds every node of `g` to a fresh e-graph (identical nodes are shared, as in CSE).
pub fn to_egraph(g: &Graph, explanations: bool) -> Loaded {
    let mut egraph = KGraph::default();
    if explanations {
        egraph = egraph.with_explanations_enabled();
    }
    let mut classes = Vec::with_capacity(g.nodes.len());
    for n in &g.nodes {
        let declared = matches!(n.op, Op::Input { .. } | Op::Weight { .. }).then(|| n.ty.clone());
        let children = n.inputs.iter().map(|v| classes[v.index()]).collect();
        classes.push(egraph.add(KNode::new(n.op.clone(), declared, children)));
    }
    egraph.rebuild();
    Loaded { egraph, classes }
}

/// Builds the graph that computes `g`'s outputs from the e-node `choose` picks in each e-class.
///
/// Order: graph inputs first, in their original order (all of them, used or not: they are the
/// interface); then a topological order that prefers each e-class's earliest original position, so
/// values keep their relative order and an unchanged graph is reproduced node for node.
pub fn extract(
    g: &Graph,
    eg: &KGraph,
    classes: &[Id],
    choose: impl Fn(Id) -> KNode,
) -> Result<Graph, kiln_ir::GraphError> {
    let mut first_pos: HashMap<Id, usize> = HashMap::new();
    for (i, &c) in classes.iter().enumerate() {
        first_pos.entry(eg.find(c)).or_insert(i);
    }
    // The needed classes and their chosen nodes (iterative DFS from the outputs and inputs).
    let mut chosen: HashMap<Id, KNode> = HashMap::new();
    let mut stack: Vec<Id> = g.outputs.iter().map(|(_, v)| eg.find(classes[v.index()])).collect();
    stack.extend(g.inputs().map(|(_, v)| eg.find(classes[v.index()])));
    while let Some(c) = stack.pop() {
        if chosen.contains_key(&c) {
            continue;
        }
        let n = choose(c);
        stack.extend(n.children.iter().map(|&k| eg.find(k)));
        chosen.insert(c, n);
    }
    // Kahn's algorithm, ready classes ordered by (original position, id).
    let mut pending: HashMap<Id, usize> = HashMap::new();
    let mut users: HashMap<Id, Vec<Id>> = HashMap::new();
    for (&c, n) in &chosen {
        let mut kids: Vec<Id> = n.children.iter().map(|&k| eg.find(k)).collect();
        kids.sort();
        kids.dedup();
        pending.insert(c, kids.len());
        for k in kids {
            users.entry(k).or_default().push(c);
        }
    }
    let key = |c: Id| std::cmp::Reverse((first_pos.get(&c).copied().unwrap_or(usize::MAX), c));
    let mut ready: BinaryHeap<_> = pending.iter().filter(|(_, &p)| p == 0).map(|(&c, _)| key(c)).collect();
    let mut out = Graph::new(g.name.clone());
    let mut value: HashMap<Id, ValueId> = HashMap::new();
    // Inputs first, in order.
    for (_, v) in g.inputs() {
        let c = eg.find(classes[v.index()]);
        let n = &g.nodes[v.index()];
        value.insert(c, out.push(n.op.clone(), &[], Some(n.ty.clone()))?);
    }
    while let Some(std::cmp::Reverse((_, c))) = ready.pop() {
        if !value.contains_key(&c) {
            let n = &chosen[&c];
            let key = n.op.as_ref().expect("e-graph nodes have attributes");
            let ins: Vec<ValueId> = n.children.iter().map(|&k| value[&eg.find(k)]).collect();
            value.insert(c, out.push(key.op.clone(), &ins, key.declared.clone())?);
        }
        for &u in users.get(&c).map(|v| v.as_slice()).unwrap_or(&[]) {
            let p = pending.get_mut(&u).expect("user is chosen");
            *p -= 1;
            if *p == 0 {
                ready.push(key(u));
            }
        }
    }
    out.outputs = g.outputs.iter().map(|(name, v)| (name.clone(), value[&eg.find(classes[v.index()])])).collect();
    Ok(out)
}

/// Looks up an e-node with these operands (in this order, or swapped for `add`/`mul`, which are
/// commutative in IEEE arithmetic) without adding anything.
pub fn lookup(eg: &KGraph, op: &Op, ins: &[Id]) -> Option<Id> {
    let node = KNode::new(op.clone(), None, ins.to_vec());
    eg.lookup(node).or_else(|| match op {
        Op::Add | Op::Mul if ins.len() == 2 => eg.lookup(KNode::new(op.clone(), None, vec![ins[1], ins[0]])),
        _ => None,
    })
}

/// A [`kiln_ir::decompose::Builder`] that only looks nodes up: replaying a fused op's expansion with it
/// succeeds iff the whole decomposition is already in the e-graph, and ends at its e-class.
pub struct LookupBuilder<'a>(pub &'a KGraph);

impl kiln_ir::decompose::Builder for LookupBuilder<'_> {
    type V = Id;
    type Err = ();
    fn ty(&self, v: Id) -> TensorType {
        self.0[v].data.ty.clone()
    }
    fn add(&mut self, op: Op, ins: &[Id]) -> Result<Id, ()> {
        if let Some(id) = lookup(self.0, &op, ins) {
            return Ok(self.0.find(id));
        }
        // A nested high-level op not lifted yet: look for its decomposition instead.
        kiln_ir::decompose::expand(self, &op, ins)?.ok_or(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::text::{parse, print};

    #[test]
    fn analysis_types_constness_and_round_trip() {
        let src = r#"graph "t" {
  %0 = input {name = "x"} : f32[seq, 4]
  %1 = weight {name = "w"} : f16[4]
  %2 = cast(%1) {dtype = f32} : f32[4]
  %3 = constant {value = 0.5} : f32[]
  %4 = mul(%2, %3) : f32[4]
  %5 = add(%0, %4) : f32[seq, 4]
  %6 = add(%0, %4) : f32[seq, 4]
  %7 = mul(%5, %6) : f32[seq, 4]
  output "y" = %7
  output "z" = %0
}
"#;
        let g = parse(src).unwrap();
        let l = to_egraph(&g, false);
        let data = |i: usize| &l.egraph[l.classes[i]].data;
        assert_eq!(data(1).ty.to_string(), "f16[4]");
        assert_eq!(data(5).ty.to_string(), "f32[seq, 4]");
        assert_eq!((data(0).is_const, data(4).is_const, data(5).is_const), (false, true, false));
        assert_eq!((data(3).constant, data(4).constant), (Some(0.5), None));
        // Identical nodes share an e-class (%5, %6), so extraction also does CSE; the outputs keep names.
        assert_eq!(l.egraph.find(l.classes[5]), l.egraph.find(l.classes[6]));
        let out = extract(&g, &l.egraph, &l.classes, |c| l.egraph[c].nodes[0].clone()).unwrap();
        let text = print(&out);
        assert!(text.contains("%6 = mul(%5, %5)") && text.contains("output \"z\" = %0"), "{text}");
        // Pattern syntax: attributes, wildcards, arity checks.
        assert!("(reduce_mean:axis=-1 ?x)".parse::<egg::Pattern<KNode>>().is_ok());
        assert!("(reshape:* ?x)".parse::<egg::Pattern<KNode>>().is_ok());
        assert!("(frobnicate ?x)".parse::<egg::Pattern<KNode>>().is_err());
        assert!("(add ?x)".parse::<egg::Pattern<KNode>>().is_err());
        assert!("(softmax ?x)".parse::<egg::Pattern<KNode>>().is_err(), "missing attribute");
    }
}
