//! Rewrite rules for the e-graph, grouped by topic; each file exports `fn rules() -> Vec<KRewrite>`.
//! `README.md` here says how to write one.
//!
//! Every rule so far is a *lift*: it recognises the primitive form of a fused op and puts the fused op
//! back ([`Lift`]). A lift is applied only after the fused op's own expansion (`kiln_ir::decompose`)
//! has been replayed against the e-graph in look-up mode and found to end in the matched e-class, so a
//! pattern that is looser than the decomposition (wildcard attributes, commuted operands) can find
//! candidates but never lift something that is not exactly the decomposition.

pub mod activation;
pub mod attention;
pub mod norm;
pub mod rope;
pub mod softmax;

use crate::egraph::{infer, KGraph, KNode, LookupBuilder, TypeAnalysis};
use egg::{Applier, Id, Pattern, PatternAst, Rewrite, Subst, Symbol, Var};
use kiln_ir::Op;

pub type KRewrite = Rewrite<KNode, TypeAnalysis>;

/// Every rule set, in the order the `lift` pass uses them.
pub fn all() -> Vec<KRewrite> {
    let mut r = norm::rules();
    r.extend(activation::rules());
    r.extend(softmax::rules());
    r.extend(rope::rules());
    r.extend(attention::rules());
    r
}

pub fn var(name: &str) -> Var {
    name.parse().expect("pattern variables start with ?")
}

/// The constant value of e-class `id`, if it is a scalar constant.
pub fn constant(eg: &KGraph, id: Id) -> Option<f32> {
    eg[id].data.constant
}

/// The fused op(s) a match may stand for: candidate (op, operands); the first that checks out is used.
pub type Candidates = fn(&KGraph, &Subst) -> Vec<(Op, Vec<Id>)>;

/// Puts a fused op back into the e-class of its decomposition.
pub struct Lift {
    pub candidates: Candidates,
}

impl Applier<KNode, TypeAnalysis> for Lift {
    fn apply_one(
        &self,
        eg: &mut KGraph,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<KNode>>,
        rule: Symbol,
    ) -> Vec<Id> {
        for (op, ins) in (self.candidates)(eg, subst) {
            let Ok(ty) = infer(eg, &op, None, &ins) else { continue };
            if ty != eg[eclass].data.ty {
                continue;
            }
            let replay = kiln_ir::decompose::expand(&mut LookupBuilder(eg), &op, &ins);
            if !matches!(replay, Ok(Some(id)) if eg.find(id) == eg.find(eclass)) {
                continue;
            }
            let new = eg.add(KNode::new(op, None, ins));
            eg.analysis.lifted.push((eclass, new, rule.to_string()));
            return if eg.union_trusted(eclass, new, rule) { vec![eclass] } else { vec![] };
        }
        vec![]
    }
}

/// The variants of an s-expression pattern with the operands of `add`/`mul` in either order (the
/// "obvious commuted variants" of a decomposition), without duplicates.
pub fn commuted(pattern: &str) -> Vec<String> {
    #[derive(Clone)]
    enum S {
        Atom(String),
        List(Vec<S>),
    }
    fn parse(toks: &mut std::iter::Peekable<std::vec::IntoIter<String>>) -> S {
        match toks.next().as_deref() {
            Some("(") => {
                let mut items = Vec::new();
                while toks.peek().map(|t| t.as_str()) != Some(")") {
                    items.push(parse(toks));
                }
                toks.next();
                S::List(items)
            }
            Some(a) => S::Atom(a.to_string()),
            None => S::List(vec![]),
        }
    }
    fn variants(s: &S) -> Vec<String> {
        match s {
            S::Atom(a) => vec![a.clone()],
            S::List(items) => {
                let mut acc: Vec<Vec<String>> = vec![vec![]];
                for it in items {
                    let vs = variants(it);
                    acc = acc
                        .iter()
                        .flat_map(|a| vs.iter().map(move |v| [a.clone(), vec![v.clone()]].concat()))
                        .collect();
                }
                let head = match items.first() {
                    Some(S::Atom(h)) => h.as_str(),
                    _ => "",
                };
                let mut out: Vec<String> = Vec::new();
                for a in acc {
                    out.push(format!("({})", a.join(" ")));
                    if (head == "add" || head == "mul") && a.len() == 3 {
                        out.push(format!("({} {} {})", a[0], a[2], a[1]));
                    }
                }
                out.sort();
                out.dedup();
                out
            }
        }
    }
    let spaced = pattern.replace('(', " ( ").replace(')', " ) ");
    let toks: Vec<String> = spaced.split_whitespace().map(String::from).collect();
    variants(&parse(&mut toks.into_iter().peekable()))
}

/// One lift rule per pattern variant, named `name`, `name/1`, ….
pub fn lift(name: &str, patterns: Vec<String>, candidates: Candidates) -> Vec<KRewrite> {
    patterns
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let pat: Pattern<KNode> = p.parse().unwrap_or_else(|e| panic!("rule {name}: bad pattern {p}: {e}"));
            let n = if i == 0 { name.to_string() } else { format!("{name}/{i}") };
            Rewrite::new(n, pat, Lift { candidates }).unwrap_or_else(|e| panic!("rule {name}: {e}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rule_set_builds() {
        // A pattern typo (unknown op, bad attribute, wrong arity) panics here, in CI, not at compile time.
        let sets = [norm::rules(), activation::rules(), softmax::rules(), rope::rules(), attention::rules()];
        for set in &sets {
            assert!(!set.is_empty());
        }
        let all = all();
        let mut names: Vec<String> = all.iter().map(|r| r.name.to_string()).collect();
        names.sort();
        let n = names.len();
        names.dedup();
        assert_eq!(names.len(), n, "rule names are unique");
    }

    #[test]
    fn commuted_variants_swap_add_and_mul_only() {
        let v = commuted("(mul (sub ?a ?b) (add ?c ?c))");
        assert_eq!(v, ["(mul (add ?c ?c) (sub ?a ?b))", "(mul (sub ?a ?b) (add ?c ?c))"]);
    }
}
