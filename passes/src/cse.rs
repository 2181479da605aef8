//! `cse`: merges nodes that compute the same op with the same attributes on the same operands.

use crate::{rebuild, Pass, PassCx, PassError};
use kiln_ir::Graph;
use std::collections::HashMap;

pub struct CommonSubexpressionElimination;

impl Pass for CommonSubexpressionElimination {
    fn name(&self) -> &'static str {
        "cse"
    }

    fn run(&self, g: &mut Graph, _cx: &PassCx) -> Result<bool, PassError> {
        let mut remap: Vec<usize> = (0..g.nodes.len()).collect();
        let mut keep = vec![true; g.nodes.len()];
        // Key: the op's text form (name + sorted attributes) and the canonical operands. Every op is pure.
        let mut seen: HashMap<(String, Vec<usize>), usize> = HashMap::new();
        for (i, n) in g.nodes.iter().enumerate() {
            let operands: Vec<usize> = n.inputs.iter().map(|v| remap[v.index()]).collect();
            let attrs: Vec<String> = n.op.attrs().iter().map(|(k, v)| format!("{k}={v}")).collect();
            let key = (format!("{}{{{}}}:{}", n.op.name(), attrs.join(","), n.ty), operands);
            match seen.get(&key) {
                Some(&first) => {
                    remap[i] = first;
                    keep[i] = false;
                }
                None => {
                    seen.insert(key, i);
                }
            }
        }
        if keep.iter().all(|&k| k) {
            return Ok(false);
        }
        *g = rebuild(g, &keep, &remap);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use crate::{PassCx, Pipeline};
    use kiln_ir::interp::{Interpreter, Tensor};
    use kiln_ir::text::{parse, print};
    use kiln_ir::WeightStore;

    const INPUT: &str = r#"graph "t" {
  %0 = input {name = "x"} : f32[seq, 4]
  %1 = weight {name = "g"} : f32[4]
  %2 = rms_norm(%0, %1) {eps = 1e-5} : f32[seq, 4]
  %3 = rms_norm(%0, %1) {eps = 1e-5} : f32[seq, 4]
  %4 = rms_norm(%0, %1) {eps = 0.001} : f32[seq, 4]
  %5 = add(%2, %3) : f32[seq, 4]
  %6 = exp(%0) : f32[seq, 4]
  %7 = mul(%5, %4) : f32[seq, 4]
  output "y" = %7
}
"#;

    const EXPECTED: &str = r#"graph "t" {
  %0 = input {name = "x"} : f32[seq, 4]
  %1 = weight {name = "g"} : f32[4]
  %2 = rms_norm(%0, %1) {eps = 1e-5} : f32[seq, 4]
  %3 = rms_norm(%0, %1) {eps = 0.001} : f32[seq, 4]
  %4 = add(%2, %2) : f32[seq, 4]
  %5 = mul(%4, %3) : f32[seq, 4]
  output "y" = %5
}
"#;

    #[test]
    fn cse_then_dce_merges_duplicates_and_drops_dead_nodes() {
        let mut g = parse(INPUT).unwrap();
        let before = g.clone();
        let cse_dce = || Pipeline::from_names(&["cse", "dce"]).unwrap();
        let reports = cse_dce().run(&mut g, &PassCx::default(), None).unwrap();
        assert_eq!(print(&g), EXPECTED);
        assert!(reports.iter().all(|r| r.changed));
        // Same function before and after.
        let mut w = WeightStore::new();
        w.insert("g", kiln_ir::TensorData::from_f32(vec![4], &[1.0, 0.5, -2.0, 3.0]));
        let x = Tensor::f32(vec![3, 4], (0..12).map(|i| i as f32 * 0.37 - 2.0).collect());
        let interp = Interpreter::new(&w);
        let a = interp.run(&before, &[("x", x.clone())]).unwrap();
        let b = interp.run(&g, &[("x", x)]).unwrap();
        assert_eq!(a, b);
        // Running again changes nothing.
        let again = cse_dce().run(&mut g, &PassCx::default(), None).unwrap();
        assert!(again.iter().all(|r| !r.changed));
    }
}
