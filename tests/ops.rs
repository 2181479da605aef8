//! Op-level property tests of the CPU backend: every op it lowers (and fused chains of elementwise
//! ops, with each kind of broadcast), compiled on random shapes with odd sizes and tails, against the
//! reference interpreter. Row-dependent values come from embedding lookups of the step's tokens, so the
//! number of rows is the step's `seq` and multi-threaded launches split them at odd boundaries.

use kiln::codegen::{compile_to_dir, ArtifactInfo, CompileOptions};
use kiln::ir::interp::{Interpreter, Tensor};
use kiln::ir::{shape, DType, Dim, Graph, Op, RopeMode, TensorData, TensorType, ValueId, WeightStore};
use kiln::runtime::{Backend, CompiledBackend};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const VOCAB: usize = 11;

/// A graph under construction with its weights; values `x`, `x2` (`[batch, seq, d]`), `col`
/// (`[batch, seq, 1]`) and `w` (`[d]`) are ready to use.
struct Case {
    g: Graph,
    store: WeightStore,
    rng: StdRng,
    d: usize,
    tokens: ValueId,
    x: ValueId,
    x2: ValueId,
    col: ValueId,
    w: ValueId,
    outputs: Vec<String>,
}

impl Case {
    fn new(seed: u64, d: usize, lo: f32, hi: f32) -> Case {
        let mut c = Case {
            g: Graph::new("ops"),
            store: WeightStore::new(),
            rng: StdRng::seed_from_u64(seed),
            d,
            tokens: ValueId(0),
            x: ValueId(0),
            x2: ValueId(0),
            col: ValueId(0),
            w: ValueId(0),
            outputs: Vec::new(),
        };
        let tokens = c.g.input("tokens", TensorType::new(DType::I32, shape!["batch", "seq"])).unwrap();
        c.tokens = tokens;
        c.g.input("pos", TensorType::new(DType::I32, shape!["batch", "seq"])).unwrap();
        c.x = c.lookup("table_x", d, tokens, lo, hi);
        c.x2 = c.lookup("table_x2", d, tokens, lo, hi);
        c.col = c.lookup("table_col", 1, tokens, lo, hi);
        c.w = c.weight("w", vec![d], lo, hi);
        c
    }

    fn weight(&mut self, name: &str, dims: Vec<usize>, lo: f32, hi: f32) -> ValueId {
        let n: usize = dims.iter().product();
        let vals: Vec<f32> = (0..n).map(|_| self.rng.random_range(lo..hi)).collect();
        self.store.insert(name, TensorData::from_f32(dims.clone(), &vals));
        let ty = TensorType::new(DType::F32, dims.iter().map(|&v| Dim::from(v)).collect());
        self.g.weight(name, ty).unwrap()
    }

    fn lookup(&mut self, name: &str, d: usize, tokens: ValueId, lo: f32, hi: f32) -> ValueId {
        let table = self.weight(name, vec![VOCAB, d], lo, hi);
        self.g.add(Op::Embedding, &[table, tokens]).unwrap()
    }

    fn op(&mut self, op: Op, inputs: &[ValueId]) -> ValueId {
        self.g.add(op, inputs).unwrap()
    }

    fn out(&mut self, name: &str, v: ValueId) {
        self.g.output(name, v);
        self.outputs.push(name.to_string());
    }

    /// Compiles the graph, runs one step on `tokens` with `threads` threads, and checks every output
    /// against the interpreter: |compiled − reference| ≤ tol · max(1, |reference|).
    fn check(&self, tokens: &[u32], threads: usize, tol: f32) -> kiln::ir::program::Manifest {
        let dir = tempfile::tempdir().unwrap();
        let info = ArtifactInfo {
            model_name: "ops".into(),
            source_hash: "ops".into(),
            context_length: 64,
            vocab_size: VOCAB,
            eos_token: None,
            ..Default::default()
        };
        let manifest = compile_to_dir(&self.g, &self.store, &CompileOptions::default(), &info, dir.path())
            .unwrap_or_else(|e| panic!("compiles: {e}\n{}", kiln::ir::text::print(&self.g)));
        let mut b = CompiledBackend::load(dir.path(), threads, None).unwrap();
        b.step(tokens).unwrap();
        let s = tokens.len();
        let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        let reference = Interpreter::new(&self.store)
            .run(
                &self.g,
                &[("tokens", Tensor::i64(vec![1, s], ids)), ("pos", Tensor::i64(vec![1, s], (0..s as i64).collect()))],
            )
            .unwrap();
        for name in &self.outputs {
            let want = reference.iter().find(|(n, _)| n == name).unwrap().1.as_f32().unwrap().to_vec();
            let got = b.output(name).unwrap_or_else(|| panic!("no output {name}"));
            assert_eq!(want.len(), got.len(), "{name}: element count");
            for (i, (a, b)) in want.iter().zip(got).enumerate() {
                assert!(
                    (a - b).abs() <= tol * a.abs().max(1.0),
                    "{name}[{i}]: compiled {b} vs interpreter {a} (d = {}, seq = {s}, threads = {threads})",
                    self.d
                );
            }
        }
        manifest
    }
}

fn random_tokens(rng: &mut StdRng) -> Vec<u32> {
    let s = rng.random_range(1..=9);
    (0..s).map(|_| rng.random_range(0..VOCAB as u32)).collect()
}

/// Odd widths and tails around the 8-lane vector width.
const WIDTHS: [usize; 8] = [1, 3, 7, 8, 9, 17, 33, 100];

#[test]
fn elementwise_ops_with_every_broadcast_match_interpreter() {
    let mut rng = StdRng::seed_from_u64(7);
    for (trial, &d) in WIDTHS.iter().enumerate() {
        // Positive inputs keep sqrt/rsqrt/div defined.
        let mut c = Case::new(trial as u64, d, 0.25, 2.0);
        let (x, x2, col, w) = (c.x, c.x2, c.col, c.w);
        let k = c.op(Op::Constant { value: 0.75 }, &[]);
        for (name, op) in [("add", Op::Add), ("sub", Op::Sub), ("mul", Op::Mul), ("div", Op::Div)] {
            for (bname, rhs) in [("full", x2), ("row", w), ("col", col), ("scalar", k)] {
                let v = c.op(op.clone(), &[x, rhs]);
                c.out(&format!("{name}_{bname}"), v);
            }
            // Broadcast on the left too.
            let v = c.op(op.clone(), &[w, x]);
            c.out(&format!("{name}_row_lhs"), v);
        }
        for (name, op) in [
            ("neg", Op::Neg),
            ("exp", Op::Exp),
            ("sqrt", Op::Sqrt),
            ("rsqrt", Op::Rsqrt),
            ("sigmoid", Op::Sigmoid),
            ("silu", Op::Silu),
        ] {
            let v = c.op(op, &[x]);
            c.out(name, v);
        }
        let v = c.op(Op::SwiGlu, &[x, x2]);
        c.out("swiglu", v);
        let tokens = random_tokens(&mut rng);
        c.check(&tokens, 1 + trial % 2, 1e-5);
    }
}

#[test]
fn elementwise_chains_fuse_into_one_kernel_and_match_interpreter() {
    let mut rng = StdRng::seed_from_u64(11);
    for (trial, &d) in WIDTHS.iter().enumerate() {
        let mut c = Case::new(100 + trial as u64, d, -2.0, 2.0);
        let (x, x2, col, w) = (c.x, c.x2, c.col, c.w);
        // silu(x * w + col) * x2 − 0.5·x: six ops, four inputs, one kernel.
        let a = c.op(Op::Mul, &[x, w]);
        let b = c.op(Op::Add, &[a, col]);
        let s = c.op(Op::Silu, &[b]);
        let m = c.op(Op::Mul, &[s, x2]);
        let half = c.op(Op::Constant { value: 0.5 }, &[]);
        let hx = c.op(Op::Mul, &[x, half]);
        let y = c.op(Op::Sub, &[m, hx]);
        c.out("chain", y);
        // A value read twice (by two consumers) is computed once, in its own kernel.
        let e = c.op(Op::Exp, &[x]);
        let e1 = c.op(Op::Neg, &[e]);
        let e2 = c.op(Op::Mul, &[e, x2]);
        c.out("shared_a", e1);
        c.out("shared_b", e2);
        let tokens = random_tokens(&mut rng);
        let manifest = c.check(&tokens, 2, 1e-5);
        let fused: Vec<&str> = manifest
            .program
            .launches
            .iter()
            .filter(|l| l.kernel.starts_with("kiln_fused_"))
            .map(|l| l.label.as_str())
            .collect();
        // chain; exp; neg; mul.
        assert_eq!(fused.len(), 4, "fused launches: {fused:?}");
        assert_eq!(manifest.program.launches.len(), 3 + 4, "three embeddings and four fused kernels");
        assert!(fused[0].contains("sub") && fused[0].matches('+').count() == 5, "{fused:?}");
    }
}

#[test]
fn symbolic_width_elementwise_uses_one_element_rows() {
    // [batch, seq] results: the last dim is symbolic, so every element is a row.
    let mut rng = StdRng::seed_from_u64(3);
    for trial in 0..3 {
        let mut c = Case::new(200 + trial, 5, -1.0, 1.0);
        let col = c.col;
        let flat = c.op(Op::Reshape { shape: shape!["batch", "seq"] }, &[col]);
        let k = c.op(Op::Constant { value: -3.0 }, &[]);
        let e = c.op(Op::Exp, &[flat]);
        let y = c.op(Op::Mul, &[e, k]);
        c.out("y", y);
        c.check(&random_tokens(&mut rng), 2, 1e-5);
    }
}

#[test]
fn norm_rope_linear_and_slice_match_interpreter_on_odd_shapes() {
    let mut rng = StdRng::seed_from_u64(5);
    for trial in 0..6u64 {
        let heads = rng.random_range(1..=3);
        let head_dim = 2 * rng.random_range(1..=9); // even, odd halves included
        let d = heads * head_dim;
        let mut c = Case::new(300 + trial, d, -1.5, 1.5);
        let (x, w, tokens) = (c.x, c.w, c.tokens);
        let norm = c.op(Op::RmsNorm { eps: 1e-5 }, &[x, w]);
        c.out("rms_norm", norm);
        let xr =
            c.op(Op::Reshape { shape: vec![Dim::sym("batch"), Dim::sym("seq"), heads.into(), head_dim.into()] }, &[x]);
        let pos = c.g.inputs().find(|(n, _)| *n == "pos").unwrap().1;
        for (name, mode, n_rot) in
            [("rope_normal", RopeMode::Normal, head_dim), ("rope_neox", RopeMode::Neox, head_dim - head_dim % 4)]
        {
            let r = c.op(Op::Rope { mode, theta: 10000.0, n_rot: n_rot as i64 }, &[xr, pos]);
            c.out(name, r);
        }
        let n_out = rng.random_range(1..=40);
        let lw = c.weight("lin", vec![n_out, d], -1.0, 1.0);
        let y = c.op(Op::Linear, &[x, lw]);
        c.out("linear", y);
        // A residual add after a projection runs inside the linear kernel.
        let r = c.lookup("table_r", n_out, tokens, -1.0, 1.0);
        let lw2 = c.weight("lin2", vec![n_out, d], -1.0, 1.0);
        let y2 = c.op(Op::Linear, &[c.x2, lw2]);
        let sum = c.op(Op::Add, &[y2, r]);
        c.out("linear_residual", sum);
        let last =
            c.op(Op::Slice { axis: 1, start: Dim::sym("seq").sub(&Dim::from(1i64)), end: Dim::sym("seq") }, &[y]);
        c.out("slice_last", last);
        let manifest = c.check(&random_tokens(&mut rng), 1 + (trial % 2) as usize, 1e-4);
        let fused: Vec<&str> = manifest.program.launches.iter().map(|l| l.kernel.as_str()).collect();
        assert_eq!(fused.iter().filter(|k| k.contains("_res_x1")).count(), 1, "{fused:?}");
        assert!(!fused.iter().any(|k| k.starts_with("kiln_fused_")), "the add is fused into the linear: {fused:?}");
    }
}

/// `rms_norm(add(a, b))` where the sum is also read later (a residual stream): one launch writes the sum
/// and its norm. When something reads the sum before the norm, the add keeps its own launch. Both
/// against the interpreter, on odd widths, 1 and 2 threads.
#[test]
fn residual_add_fuses_into_the_following_rms_norm() {
    let mut rng = StdRng::seed_from_u64(17);
    for (trial, &d) in WIDTHS.iter().enumerate() {
        let mut c = Case::new(500 + trial as u64, d, -2.0, 2.0);
        let (x, x2, w) = (c.x, c.x2, c.w);
        let h = c.op(Op::Add, &[x, x2]);
        let n = c.op(Op::RmsNorm { eps: 1e-5 }, &[h, w]);
        let later = c.op(Op::Mul, &[n, h]);
        c.out("norm", n);
        c.out("later", later);
        // Read before its norm: not fused.
        let h2 = c.op(Op::Add, &[x2, later]);
        let e = c.op(Op::Exp, &[h2]);
        let n2 = c.op(Op::RmsNorm { eps: 1e-6 }, &[h2, w]);
        c.out("e", e);
        c.out("norm2", n2);
        let manifest = c.check(&random_tokens(&mut rng), 1 + trial % 2, 1e-5);
        let kernels: Vec<(&str, &str)> =
            manifest.program.launches.iter().map(|l| (l.kernel.as_str(), l.label.as_str())).collect();
        let fused: Vec<_> = kernels.iter().filter(|(k, _)| k.starts_with("kiln_add_rms_norm_")).collect();
        assert_eq!(fused.len(), 1, "{kernels:?}");
        assert!(fused[0].1.contains(&format!("%{} rms_norm +%{} add", n.0, h.0)), "{kernels:?}");
        assert_eq!(kernels.iter().filter(|(k, _)| k.starts_with("kiln_rms_norm_")).count(), 1, "{kernels:?}");
        // embeddings 3; add+norm; mul; add; exp; norm.
        assert_eq!(kernels.len(), 3 + 5, "{kernels:?}");
    }
}

/// The CHESS MLP (`threshold` of silu(gate), `masked_linear` up, `active_linear` down on a transposed
/// weight) compiled vs the interpreter: f32 and Q4_1 weights, thresholds from keep-all to drop-all,
/// decode (seq 1) and prefill steps, 1 and 2 threads. Checks that the sparse paths drop exactly what
/// the interpreter drops.
#[test]
fn activation_sparse_mlp_matches_interpreter() {
    let mut rng = StdRng::seed_from_u64(11);
    for trial in 0..8u64 {
        let dtype = if trial % 2 == 0 { DType::F32 } else { DType::Q4_1 };
        let d = if dtype == DType::F32 { rng.random_range(1..=40) } else { 32 * rng.random_range(1..=3) };
        let inter = if dtype == DType::F32 { rng.random_range(1..=50) } else { 32 * rng.random_range(1..=3) };
        let n_out = 32 * rng.random_range(1..=3);
        let mut c = Case::new(500 + trial, d, -1.5, 1.5);
        let x = c.x;
        let quantized = |c: &mut Case, name: &str, dims: Vec<usize>| {
            let v = c.weight(name, dims.clone(), -1.0, 1.0);
            if dtype != DType::F32 {
                let vals = c.store.get(name).unwrap().to_f32().unwrap();
                let bytes = kiln::ir::quant::quantize(dtype, &vals).unwrap();
                c.store.insert(name, TensorData { dtype, shape: dims.clone(), bytes: bytes.into() });
                c.g.nodes[v.index()].ty = TensorType::new(dtype, dims.iter().map(|&v| Dim::from(v)).collect());
            }
            v
        };
        let wg = quantized(&mut c, "gate", vec![inter, d]);
        let wu = quantized(&mut c, "up", vec![inter, d]);
        let wt = quantized(&mut c, "down_t", vec![inter, n_out]);
        // Thresholds: trial 0 keeps everything (t = 0 only drops exact zeros), the last drops everything.
        let scale = match trial {
            0 => 0.0,
            7 => 1e9,
            _ => rng.random_range(0.05..1.0),
        };
        let tv: Vec<f32> = (0..inter).map(|_| scale * rng.random_range(0.0..1.0f32)).collect();
        c.store.insert("t", TensorData::from_f32(vec![inter], &tv));
        let t = c.g.weight("t", TensorType::new(DType::F32, vec![Dim::from(inter)])).unwrap();
        let gate = c.op(Op::Linear, &[x, wg]);
        let a = c.op(Op::Silu, &[gate]);
        let a = c.op(Op::Threshold, &[a, t]);
        let up = c.op(Op::MaskedLinear, &[x, wu, a]);
        let h = c.op(Op::Mul, &[a, up]);
        let y = c.op(Op::ActiveLinear, &[h, wt]);
        c.out("act", a);
        c.out("up", up);
        c.out("h", h);
        c.out("down", y);
        let tokens = if trial % 3 == 0 { vec![rng.random_range(0..VOCAB as u32)] } else { random_tokens(&mut rng) };
        let manifest = c.check(&tokens, 1 + (trial % 2) as usize, 1e-4);
        let kernels: Vec<&str> = manifest.program.launches.iter().map(|l| l.kernel.as_str()).collect();
        assert!(kernels.iter().any(|k| k.starts_with("kiln_masked_linear_")), "{kernels:?}");
        assert!(kernels.iter().any(|k| k.starts_with("kiln_active_linear_")), "{kernels:?}");
    }
}

/// `active_linear` on a gathered column weight (structured pruning's down projection): SmolLM2's
/// 1536 → 576 down with 5% and 25% of the channels dropped (and a small odd shape), Q4_0/Q4_1/Q8_0;
/// compiled = interpreter for 1–6 rows (decode and prefill groups), 1–2 threads; and the interpreter's
/// result equals a dense f32 `linear` on the ORIGINAL row-major weight's kept columns.
#[test]
fn gathered_active_linear_matches_interpreter_and_the_kept_columns() {
    let mut rng = StdRng::seed_from_u64(13);
    for trial in 0..6u64 {
        let base = [DType::Q4_0, DType::Q4_1, DType::Q8_0][trial as usize % 3];
        let (d, inter, n_out, drop) = match trial {
            0..=2 => (32, 1536, 576, [0.05, 0.25, 0.05][trial as usize]),
            _ => (32, 96, 64, 0.4),
        };
        let kept: Vec<usize> = (0..inter).filter(|_| !rng.random_bool(drop)).collect();
        let kk = kept.len();
        let mut c = Case::new(700 + trial, d, -1.5, 1.5);
        let x = c.x;
        let wu = c.weight("up", vec![kk, d], -1.0, 1.0);
        let vals: Vec<f32> = (0..n_out * inter).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let bytes = kiln::ir::quant::quantize(base, &vals).unwrap();
        let mut wf = vec![0f32; n_out * inter];
        kiln::ir::quant::dequantize(base, &bytes, &mut wf).unwrap();
        let (gd, gbytes) = kiln::ir::column::gather(base, n_out, inter, &bytes, &kept).unwrap();
        c.store.insert("down_g", TensorData { dtype: gd, shape: vec![kk, n_out], bytes: gbytes.into() });
        let wg = c.g.weight("down_g", TensorType::new(gd, vec![Dim::from(kk), Dim::from(n_out)])).unwrap();
        // The original weight's kept columns, dequantized, as a dense f32 [n_out, kk] weight.
        let cols: Vec<f32> =
            (0..n_out).flat_map(|r| kept.iter().map(move |&j| (r, j))).map(|(r, j)| wf[r * inter + j]).collect();
        c.store.insert("down_kept", TensorData::from_f32(vec![n_out, kk], &cols));
        let wk = c.g.weight("down_kept", TensorType::new(DType::F32, vec![Dim::from(n_out), Dim::from(kk)])).unwrap();
        let h = c.op(Op::Linear, &[x, wu]);
        let y = c.op(Op::ActiveLinear, &[h, wg]);
        let dense = c.op(Op::Linear, &[h, wk]);
        c.out("down", y);
        c.out("dense", dense);
        let tokens: Vec<u32> = (0..1 + trial as usize).map(|_| rng.random_range(0..VOCAB as u32)).collect();
        let manifest = c.check(&tokens, 1 + (trial % 2) as usize, 1e-4);
        let kernels: Vec<&str> = manifest.program.launches.iter().map(|l| l.kernel.as_str()).collect();
        assert!(kernels.iter().any(|k| k.starts_with(&format!("kiln_active_linear_{gd}"))), "{kernels:?}");
        let s = tokens.len();
        let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        let out = Interpreter::new(&c.store)
            .run(
                &c.g,
                &[("tokens", Tensor::i64(vec![1, s], ids)), ("pos", Tensor::i64(vec![1, s], (0..s as i64).collect()))],
            )
            .unwrap();
        let get = |n: &str| out.iter().find(|(o, _)| o == n).unwrap().1.as_f32().unwrap().to_vec();
        for (a, b) in get("down").iter().zip(get("dense")) {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{gd}: gathered {a} vs kept columns {b}");
        }
    }
}

/// `active_linear` on the exact column-major formats (`q4_0c`, `q4_1c`, `q8_0c`, made from a row-major
/// weight by `kiln_ir::column::from_rows`): compiled = interpreter at decode and prefill (one to nine
/// rows, so prefill groups of 4 and a partial last group), one and two threads, with thresholded input
/// whose active channels differ per row; and the interpreter's result equals a dense `linear` on the
/// original row-major weight (the layout changes nothing but the bytes read).
#[test]
fn column_active_linear_matches_interpreter_and_the_dense_weight() {
    let mut rng = StdRng::seed_from_u64(12);
    for trial in 0..9u64 {
        let base = [DType::Q4_0, DType::Q4_1, DType::Q8_0][trial as usize % 3];
        // SmolLM2's down shape on every third trial, small odd multiples of 32 otherwise.
        let (d, inter, n_out) = if trial % 3 == 2 {
            (32, 1536, 576)
        } else {
            (32, 32 * rng.random_range(1..=5), 32 * rng.random_range(1..=5))
        };
        let mut c = Case::new(600 + trial, d, -1.5, 1.5);
        let x = c.x;
        let wu = c.weight("up", vec![inter, d], -1.0, 1.0);
        // The row-major down weight W [n_out, inter] in `base`, and its column-major form.
        let w = c.weight("down", vec![n_out, inter], -1.0, 1.0);
        let vals = c.store.get("down").unwrap().to_f32().unwrap();
        let bytes = kiln::ir::quant::quantize(base, &vals).unwrap();
        let (col, cbytes) = kiln::ir::column::from_rows(base, n_out, inter, &bytes).unwrap();
        c.store.insert("down", TensorData { dtype: base, shape: vec![n_out, inter], bytes: bytes.into() });
        c.g.nodes[w.index()].ty = TensorType::new(base, vec![Dim::from(n_out), Dim::from(inter)]);
        c.store.insert("down_t", TensorData { dtype: col, shape: vec![inter, n_out], bytes: cbytes.into() });
        let wt = c.g.weight("down_t", TensorType::new(col, vec![Dim::from(inter), Dim::from(n_out)])).unwrap();
        let scale = if trial == 0 { 0.0 } else { rng.random_range(0.2..1.5) };
        // Every third block of 32 channels is always off (its scales are never needed).
        let tv: Vec<f32> =
            (0..inter).map(|j| if j / 32 % 3 == 1 { 1e9 } else { scale * rng.random_range(0.0..1.0f32) }).collect();
        c.store.insert("t", TensorData::from_f32(vec![inter], &tv));
        let t = c.g.weight("t", TensorType::new(DType::F32, vec![Dim::from(inter)])).unwrap();
        let h = c.op(Op::Linear, &[x, wu]);
        let h = c.op(Op::Threshold, &[h, t]);
        let y = c.op(Op::ActiveLinear, &[h, wt]);
        let dense = c.op(Op::Linear, &[h, w]);
        c.out("h", h);
        c.out("down", y);
        c.out("dense", dense);
        let tokens: Vec<u32> = (0..1 + trial as usize).map(|_| rng.random_range(0..VOCAB as u32)).collect();
        let manifest = c.check(&tokens, 1 + (trial % 2) as usize, 1e-4);
        let kernels: Vec<&str> = manifest.program.launches.iter().map(|l| l.kernel.as_str()).collect();
        assert!(kernels.iter().any(|k| k.starts_with(&format!("kiln_active_linear_{col}"))), "{kernels:?}");
        // Interpreter: the column-major active_linear equals the dense linear on W.
        let s = tokens.len();
        let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        let out = Interpreter::new(&c.store)
            .run(
                &c.g,
                &[("tokens", Tensor::i64(vec![1, s], ids)), ("pos", Tensor::i64(vec![1, s], (0..s as i64).collect()))],
            )
            .unwrap();
        let get = |n: &str| out.iter().find(|(o, _)| o == n).unwrap().1.as_f32().unwrap().to_vec();
        for (a, b) in get("down").iter().zip(get("dense")) {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{col}: active {a} vs dense {b}");
        }
    }
}

/// GELU (tanh approximation): the interpreter against the formula evaluated independently (Python's
/// math module, which PyTorch's `gelu(approximate="tanh")` agrees with), far tails included; the
/// compiled fused kernel against the interpreter on both signs, alone and fused into a chain.
#[test]
fn gelu_tanh_matches_the_formula_and_compiles() {
    let reference = [
        (-20.0, -0.0),
        (-3.0, -0.0036373920817729943),
        (-1.0, -0.15880800939172324),
        (-0.5, -0.15428599017485606),
        (0.0, 0.0),
        (0.5, 0.34571400982514394),
        (1.0, 0.8411919906082768),
        (3.0, 2.996362607918227),
        (20.0, 20.0),
    ];
    let x = Tensor::f32(vec![reference.len()], reference.iter().map(|r| r.0 as f32).collect());
    let y = kiln::ir::interp::eval(&Op::GeluTanh, &[&x], &Default::default()).unwrap();
    for ((xi, want), got) in reference.iter().zip(y.as_f32().unwrap()) {
        assert!((*got as f64 - want).abs() <= 1e-6 * want.abs().max(1.0), "gelu_tanh({xi}) = {got}, want {want}");
    }
    let mut rng = StdRng::seed_from_u64(41);
    for (trial, &d) in WIDTHS.iter().enumerate() {
        // Both signs and the tails where exp(2u) under- and overflows in f32.
        let mut c = Case::new(100 + trial as u64, d, -12.0, 12.0);
        let (x, w) = (c.x, c.w);
        let v = c.op(Op::GeluTanh, &[x]);
        c.out("gelu_tanh", v);
        let m = c.op(Op::Mul, &[x, w]);
        let g = c.op(Op::GeluTanh, &[m]);
        let v = c.op(Op::Add, &[g, x]);
        c.out("gelu_tanh_chain", v);
        let tokens = random_tokens(&mut rng);
        c.check(&tokens, 1 + trial % 2, 1e-5);
    }
}
