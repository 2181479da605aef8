//! Graphviz DOT rendering of a graph, for looking at it (`kiln run --emit dot | dot -Tsvg`).

use crate::graph::Graph;
use crate::op::Op;
use std::fmt::Write;

pub fn to_dot(g: &Graph) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "digraph {:?} {{", g.name);
    let _ = writeln!(s, "  rankdir=TB; node [fontname=\"monospace\", fontsize=10];");
    for (i, n) in g.nodes.iter().enumerate() {
        let (shape, label) = match &n.op {
            Op::Input { name } => ("invhouse", format!("input {name}\\n{}", n.ty)),
            Op::Weight { name } => ("box", format!("{name}\\n{}", n.ty)),
            op => {
                let attrs: Vec<String> = op.attrs().iter().map(|(k, v)| format!("{k}={v}")).collect();
                let a = if attrs.is_empty() { String::new() } else { format!(" {{{}}}", attrs.join(", ")) };
                ("ellipse", format!("%{i} {}{a}\\n{}", op.name(), n.ty))
            }
        };
        let _ = writeln!(s, "  n{i} [shape={shape}, label={:?}];", label.replace('"', "'"));
        for v in &n.inputs {
            let _ = writeln!(s, "  n{} -> n{i};", v.0);
        }
    }
    for (name, v) in &g.outputs {
        let _ = writeln!(s, "  out_{} [shape=house, label={:?}];", sanitize(name), format!("output {name}"));
        let _ = writeln!(s, "  n{} -> out_{};", v.0, sanitize(name));
    }
    s.push_str("}\n");
    s
}

fn sanitize(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect()
}
