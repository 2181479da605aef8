//! The interpreter against hand-checked math, the fused ops against their decompositions on random
//! inputs, and the text parser's error messages.

use kiln_ir::decompose::decompose;
use kiln_ir::interp::{Interpreter, Tensor};
use kiln_ir::text::{parse, print};
use kiln_ir::{TensorData, WeightStore};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn run1(src: &str, inputs: &[(&str, Tensor)], w: &WeightStore) -> Tensor {
    let g = parse(src).unwrap_or_else(|e| panic!("{e}\n{src}"));
    Interpreter::new(w).run(&g, inputs).unwrap().remove(0).1
}

fn close(a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol * (1.0 + y.abs()), "element {i}: {x} vs {y}\n{a:?}\n{b:?}");
    }
}

fn g1(body: &str) -> String {
    format!("graph \"t\" {{\n{body}\n}}\n")
}

#[test]
fn rms_norm_softmax_linear_by_hand() {
    let mut w = WeightStore::new();
    w.insert("g", TensorData::from_f32(vec![4], &[1.0, 1.0, 2.0, 0.5]));
    let src = g1("  %0 = input {name = \"x\"} : f32[1, 4]\n  %1 = weight {name = \"g\"} : f32[4]\n  %2 = rms_norm(%0, %1) {eps = 0.0} : f32[1, 4]\n  output \"y\" = %2");
    let y = run1(&src, &[("x", Tensor::f32(vec![1, 4], vec![1.0, 2.0, 3.0, 4.0]))], &w);
    let r = 1.0 / 7.5f32.sqrt(); // mean of squares = 30/4
    close(y.as_f32().unwrap(), &[r, 2.0 * r, 6.0 * r, 2.0 * r], 1e-6);

    let src =
        g1("  %0 = input {name = \"x\"} : f32[2, 2]\n  %1 = softmax(%0) {axis = -1} : f32[2, 2]\n  output \"y\" = %1");
    let y = run1(&src, &[("x", Tensor::f32(vec![2, 2], vec![0.0, 2f32.ln(), 5.0, 5.0]))], &w);
    close(y.as_f32().unwrap(), &[1.0 / 3.0, 2.0 / 3.0, 0.5, 0.5], 1e-6);

    let mut w = WeightStore::new();
    w.insert("m", TensorData::from_f32(vec![3, 2], &[1.0, 2.0, 0.0, -1.0, 0.5, 0.5]));
    let src = g1("  %0 = input {name = \"x\"} : f32[seq, 2]\n  %1 = weight {name = \"m\"} : f32[3, 2]\n  %2 = linear(%0, %1) : f32[seq, 3]\n  output \"y\" = %2");
    let y = run1(&src, &[("x", Tensor::f32(vec![2, 2], vec![1.0, 1.0, 2.0, -4.0]))], &w);
    assert_eq!(y.shape, [2, 3]);
    close(y.as_f32().unwrap(), &[3.0, -1.0, 1.0, -6.0, 4.0, -1.0], 1e-6);
}

#[test]
fn attention_is_causal_and_grouped() {
    // q = k = 0 makes every visible key equally likely: query i averages v[0..=i + (t - s)].
    let src = g1("  %0 = input {name = \"q\"} : f32[1, seq, 2, 2]\n  %1 = input {name = \"k\"} : f32[1, kv, 1, 2]\n  %2 = input {name = \"v\"} : f32[1, kv, 1, 2]\n  %3 = attention(%0, %1, %2) {scale = 1.0} : f32[1, seq, 2, 2]\n  output \"y\" = %3");
    let v = vec![1.0, 10.0, 3.0, 20.0, 5.0, 60.0];
    let ins = [
        ("q", Tensor::f32(vec![1, 2, 2, 2], vec![0.0; 8])),
        ("k", Tensor::f32(vec![1, 3, 1, 2], vec![0.0; 6])),
        ("v", Tensor::f32(vec![1, 3, 1, 2], v)),
    ];
    let y = run1(&src, &ins, &WeightStore::new());
    // kv length 3, 2 queries: query 0 at position 1 sees v0, v1; query 1 sees all three. Both heads share kv head 0.
    close(y.as_f32().unwrap(), &[2.0, 15.0, 2.0, 15.0, 3.0, 30.0, 3.0, 30.0], 1e-6);
}

#[test]
fn rope_rotates_pairs_by_position() {
    let src = g1("  %0 = input {name = \"x\"} : f32[1, 2, 1, 4]\n  %1 = input {name = \"p\"} : i32[1, 2]\n  %2 = rope(%0, %1) {mode = normal, n_rot = 4, theta = 100.0} : f32[1, 2, 1, 4]\n  %3 = rope(%0, %1) {mode = neox, n_rot = 4, theta = 100.0} : f32[1, 2, 1, 4]\n  output \"a\" = %2\n  output \"b\" = %3");
    let g = parse(&src).unwrap();
    let x = Tensor::f32(vec![1, 2, 1, 4], vec![1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0]);
    let out =
        Interpreter::new(&WeightStore::new()).run(&g, &[("x", x), ("p", Tensor::i64(vec![1, 2], vec![0, 3]))]).unwrap();
    // Position 0: identity. Position 3: pair i turns by 3·100^(-i/2): pair 0 by 3 rad, pair 1 by 0.3 rad.
    let (normal, neox) = (out[0].1.as_f32().unwrap(), out[1].1.as_f32().unwrap());
    close(&normal[..4], &[1.0, 0.0, 1.0, 0.0], 1e-7);
    close(&normal[4..], &[3f32.cos(), 3f32.sin(), 0.3f32.cos(), 0.3f32.sin()], 1e-6);
    // neox pairs (x0, x2) and (x1, x3): x = [1, 0, 1, 0] → pair 0 = (1, 1), pair 1 = (0, 0).
    close(&neox[4..], &[3f32.cos() - 3f32.sin(), 0.0, 3f32.sin() + 3f32.cos(), 0.0], 1e-6);
}

#[test]
fn shape_ops_by_hand() {
    let src = g1("  %0 = input {name = \"x\"} : f32[2, 3]\n  %1 = transpose(%0) {perm = [1, 0]} : f32[3, 2]\n  %2 = slice(%1) {axis = 0, end = 3, start = 1} : f32[2, 2]\n  %3 = concat(%2, %2) {axis = 1} : f32[2, 4]\n  %4 = reshape(%3) {shape = [8]} : f32[8]\n  output \"y\" = %4");
    let y = run1(&src, &[("x", Tensor::f32(vec![2, 3], vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]))], &WeightStore::new());
    assert_eq!(y.as_f32().unwrap(), &[1.0, 4.0, 1.0, 4.0, 2.0, 5.0, 2.0, 5.0]);
}

#[test]
fn embedding_rejects_out_of_range_ids() {
    let mut w = WeightStore::new();
    w.insert("e", TensorData::from_f32(vec![3, 2], &[0.0; 6]));
    let g = parse(&g1("  %0 = input {name = \"ids\"} : i32[n]\n  %1 = weight {name = \"e\"} : f32[3, 2]\n  %2 = embedding(%1, %0) : f32[n, 2]\n  output \"y\" = %2")).unwrap();
    let err = Interpreter::new(&w).run(&g, &[("ids", Tensor::i64(vec![2], vec![1, 3]))]).unwrap_err().to_string();
    assert!(err.contains("token id 3") && err.contains("embedding"), "{err}");
}

/// Fused ops equal their decompositions on random inputs of odd sizes.
#[test]
fn fused_ops_match_decompositions() {
    let mut rng = StdRng::seed_from_u64(9);
    for trial in 0..20 {
        let (s, d) = (rng.random_range(1..6), rng.random_range(1..40));
        let src = g1(&format!(
            "  %0 = input {{name = \"x\"}} : f32[seq, {d}]\n  %1 = input {{name = \"u\"}} : f32[seq, {d}]\n  %2 = weight {{name = \"g\"}} : f32[{d}]\n  %3 = rms_norm(%0, %2) {{eps = 1e-5}} : f32[seq, {d}]\n  %4 = swiglu(%3, %1) : f32[seq, {d}]\n  %5 = softmax(%4) {{axis = {}}} : f32[seq, {d}]\n  %6 = silu(%5) : f32[seq, {d}]\n  output \"y\" = %6",
            if trial % 2 == 0 { -1 } else { 0 }
        ));
        let g = parse(&src).unwrap();
        let dg = decompose(&g).unwrap();
        dg.verify().unwrap();
        assert!(!print(&dg).contains("rms_norm") && !print(&dg).contains("swiglu"));
        let mut w = WeightStore::new();
        let gv: Vec<f32> = (0..d).map(|_| rng.random_range(-2.0..2.0)).collect();
        w.insert("g", TensorData::from_f32(vec![d], &gv));
        let mut rand_t = || Tensor::f32(vec![s, d], (0..s * d).map(|_| rng.random_range(-3.0..3.0)).collect());
        let ins = [("x", rand_t()), ("u", rand_t())];
        let interp = Interpreter::new(&w);
        let a = interp.run(&g, &ins).unwrap();
        let b = interp.run(&dg, &ins).unwrap();
        close(a[0].1.as_f32().unwrap(), b[0].1.as_f32().unwrap(), 1e-5);
    }
}

#[test]
fn parser_errors_name_the_line_and_problem() {
    let cases = [
        ("graph \"t\" {\n  %0 = input {name = \"x\"} : f32[4]\n  %1 = frobnicate(%0) : f32[4]\n}\n", "unknown op `frobnicate`"),
        ("graph \"t\" {\n  %0 = input {name = \"x\"} : f32[4]\n  %1 = exp(%7) : f32[4]\n}\n", "undefined value %7"),
        ("graph \"t\" {\n  %0 = input {name = \"x\"} : f32[4]\n  %1 = exp(%0) : f32[5]\n}\n", "recorded type f32[5]"),
        ("graph \"t\" {\n  %0 = input {name = \"x\"} : q9_9[4]\n}\n", "unknown dtype"),
        ("graph \"t\" {\n  %0 = input {name = \"x\"} : f32[4]\n  %1 = softmax(%0) : f32[4]\n}\n", "needs attribute `axis`"),
        ("graph \"t\" {\n  %0 = input {name = \"x\"} : f32[4]\n  %1 = exp(%0) {axis = 1} : f32[4]\n}\n", "has no attribute `axis`"),
        ("graph \"t\" {\n  %0 = input {name = \"x\"} : f32[4]\n  %1 = add(%0, %0) : f32[4]\n  output \"y\" = %1\n", "end of input"),
        ("graph \"t\" {\n  %0 = input {name = \"x\"} : f32[seq, 4]\n  %1 = reshape(%0) {shape = [seq, 5]} : f32[seq, 5]\n}\n", "element count"),
        ("graph \"t\" {\n  %0 = input {name = \"x\"} : f32[4]\n  %0 = exp(%0) : f32[4]\n}\n", "defined twice"),
    ];
    for (src, want) in cases {
        let err = parse(src).unwrap_err().to_string();
        assert!(err.contains(want), "expected `{want}` in: {err}");
    }
}

/// Random garbage and mutated valid text never panic the parser.
#[test]
fn parser_survives_mutations() {
    let valid = g1("  %0 = input {name = \"x\"} : f32[seq, 4]\n  %1 = weight {name = \"g\"} : f32[4]\n  %2 = rms_norm(%0, %1) {eps = 1e-5} : f32[seq, 4]\n  %3 = reshape(%2) {shape = [seq, 2, 2]} : f32[seq, 2, 2]\n  output \"y\" = %3");
    let chars: Vec<char> = valid.chars().collect();
    let alphabet: Vec<char> = "%{}()[],=:\"\\ \n0123456789abcxyz+-*._#é".chars().collect();
    let mut rng = StdRng::seed_from_u64(4);
    for _ in 0..20000 {
        let mut c = chars.clone();
        for _ in 0..rng.random_range(1..5) {
            let i = rng.random_range(0..c.len());
            match rng.random_range(0..3) {
                0 => c[i] = alphabet[rng.random_range(0..alphabet.len())],
                1 => {
                    c.remove(i);
                }
                _ => c.insert(i, alphabet[rng.random_range(0..alphabet.len())]),
            }
        }
        let s: String = c.into_iter().collect();
        if let Ok(g) = parse(&s) {
            assert_eq!(print(&parse(&print(&g)).unwrap()), print(&g));
        }
    }
}

/// Rope (both modes) and causal grouped-query attention with a cache against their decompositions,
/// including the new primitives (`sin`, `cos`, `pow`, `iota`, `causal_mask`) and a hand-checked mask.
#[test]
fn rope_and_attention_match_decompositions() {
    let mut rng = StdRng::seed_from_u64(11);
    for trial in 0..8 {
        let (s, past) = (rng.random_range(1..5), rng.random_range(0..4));
        let mode = if trial % 2 == 0 { "neox" } else { "normal" };
        let src = g1(&format!(
            "  %0 = input {{name = \"q\"}} : f32[batch, seq, 6, 4]\n  %1 = input {{name = \"k\"}} : f32[batch, seq, 2, 4]\n  %2 = input {{name = \"kc\"}} : f32[batch, past, 2, 4]\n  %3 = input {{name = \"v\"}} : f32[batch, past+seq, 2, 4]\n  %4 = input {{name = \"pos\"}} : i32[batch, seq]\n  %5 = rope(%0, %4) {{mode = {mode}, n_rot = 4, theta = 100.0}} : f32[batch, seq, 6, 4]\n  %6 = rope(%1, %4) {{mode = {mode}, n_rot = 4, theta = 100.0}} : f32[batch, seq, 2, 4]\n  %7 = concat(%2, %6) {{axis = 1}} : f32[batch, past+seq, 2, 4]\n  %8 = attention(%5, %7, %3) {{scale = 0.5}} : f32[batch, seq, 6, 4]\n  output \"y\" = %8\n  output \"r\" = %5"
        ));
        let g = parse(&src).unwrap();
        let dg = decompose(&g).unwrap();
        dg.verify().unwrap();
        let text = print(&dg);
        assert!(!text.contains("rope(") && !text.contains("attention(") && text.contains("causal_mask("), "{text}");
        let mut t = |shape: Vec<usize>| {
            let n = shape.iter().product();
            Tensor::f32(shape, (0..n).map(|_| rng.random_range(-2.0..2.0)).collect())
        };
        let ins = [
            ("q", t(vec![1, s, 6, 4])),
            ("k", t(vec![1, s, 2, 4])),
            ("kc", t(vec![1, past, 2, 4])),
            ("v", t(vec![1, past + s, 2, 4])),
            ("pos", Tensor::i64(vec![1, s], (0..s as i64).map(|i| i + past as i64).collect())),
        ];
        let w = WeightStore::new();
        let interp = Interpreter::new(&w);
        let (a, b) = (interp.run(&g, &ins).unwrap(), interp.run(&dg, &ins).unwrap());
        close(a[0].1.as_f32().unwrap(), b[0].1.as_f32().unwrap(), 1e-5);
        close(a[1].1.as_f32().unwrap(), b[1].1.as_f32().unwrap(), 1e-5);
    }
    // A partial rotation (n_rot < head_dim) keeps its fused form.
    let g = parse(&g1("  %0 = input {name = \"x\"} : f32[1, 2, 1, 8]\n  %1 = input {name = \"p\"} : i32[1, 2]\n  %2 = rope(%0, %1) {mode = neox, n_rot = 4, theta = 10.0} : f32[1, 2, 1, 8]\n  output \"y\" = %2")).unwrap();
    assert!(print(&decompose(&g).unwrap()).contains("rope("));
    // causal_mask by hand: 2 rows, 3 columns → row 0 sees columns 0..=1, row 1 all.
    let y = run1(
        &g1("  %0 = input {name = \"x\"} : f32[2, 3]\n  %1 = causal_mask(%0) : f32[2, 3]\n  output \"y\" = %1"),
        &[("x", Tensor::f32(vec![2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))],
        &WeightStore::new(),
    );
    assert_eq!(y.as_f32().unwrap(), &[1.0, 2.0, f32::NEG_INFINITY, 4.0, 5.0, 6.0]);
}

#[test]
fn activation_sparsity_ops_by_hand() {
    // threshold: keep |x| > t per channel (strictly), NaN dropped.
    let mut w = WeightStore::new();
    w.insert("t", TensorData::from_f32(vec![3], &[0.5, 0.0, 2.0]));
    let src = g1("  %0 = input {name = \"x\"} : f32[seq, 3]\n  %1 = weight {name = \"t\"} : f32[3]\n  %2 = threshold(%0, %1) : f32[seq, 3]\n  output \"y\" = %2");
    let x = Tensor::f32(vec![2, 3], vec![0.5, -0.1, -2.5, -0.6, 0.0, f32::NAN]);
    let y = run1(&src, &[("x", x)], &w);
    assert_eq!(y.as_f32().unwrap(), &[0.0, -0.1, -2.5, -0.6, 0.0, 0.0]);

    // masked_linear: rows of linear(x, w) where the mask is non-zero, else 0.
    w.insert("m", TensorData::from_f32(vec![3, 2], &[1.0, 2.0, 0.0, -1.0, 0.5, 0.5]));
    let src = g1("  %0 = input {name = \"x\"} : f32[seq, 2]\n  %1 = weight {name = \"m\"} : f32[3, 2]\n  %2 = input {name = \"mask\"} : f32[seq, 3]\n  %3 = masked_linear(%0, %1, %2) : f32[seq, 3]\n  output \"y\" = %3");
    let x = Tensor::f32(vec![2, 2], vec![1.0, 1.0, 2.0, -4.0]);
    let mask = Tensor::f32(vec![2, 3], vec![1.0, 0.0, -3.0, 0.0, 0.5, 0.0]);
    let y = run1(&src, &[("x", x), ("mask", mask)], &w);
    close(y.as_f32().unwrap(), &[3.0, 0.0, 1.0, 0.0, 4.0, 0.0], 1e-6);

    // active_linear: x · wt with wt [K, N]; a zero channel's weight row is never read (inf there is harmless).
    w.insert("wt", TensorData::from_f32(vec![3, 2], &[1.0, 2.0, f32::INFINITY, f32::NAN, 0.5, -1.0]));
    let src = g1("  %0 = input {name = \"x\"} : f32[seq, 3]\n  %1 = weight {name = \"wt\"} : f32[3, 2]\n  %2 = active_linear(%0, %1) : f32[seq, 2]\n  output \"y\" = %2");
    let x = Tensor::f32(vec![2, 3], vec![2.0, 0.0, 4.0, 0.0, 0.0, -2.0]);
    let y = run1(&src, &[("x", x)], &w);
    close(y.as_f32().unwrap(), &[4.0, 0.0, -1.0, 2.0], 1e-6);

    // nm_linear, 2:4 on f32 by hand: one row of k = 32 keeping columns 1 and 3 of every group g with
    // values g + 1 and -(g + 1); with x[j] = j, y = Σ_g (g + 1)·((4g + 1) − (4g + 3)) = −2 · 36 = −72.
    let mut bytes: Vec<u8> =
        (0..8).flat_map(|g| [(g + 1) as f32, -((g + 1) as f32)]).flat_map(|v| v.to_le_bytes()).collect();
    bytes.extend([0xDD; 4]); // positions 1, 3, 1, 3 per byte (2 bits each, low first)
    w.insert("nm", TensorData { dtype: kiln_ir::DType::I32, shape: vec![1, 17], bytes: bytes.into() });
    let src = g1("  %0 = input {name = \"x\"} : f32[seq, 32]\n  %1 = weight {name = \"nm\"} : i32[1, 17]\n  %2 = nm_linear(%0, %1) {decode = 1, dtype = f32, group = 4, keep = 2, prefill = 1} : f32[seq, 1]\n  output \"y\" = %2");
    let x = Tensor::f32(vec![1, 32], (0..32).map(|j| j as f32).collect());
    let y = run1(&src, &[("x", x.clone())], &w);
    close(y.as_f32().unwrap(), &[-72.0], 1e-6);
    // A packed row of the wrong length for the pattern is a type error.
    let bad = src.replace("i32[1, 17]", "i32[1, 16]");
    assert!(parse(&bad).unwrap_err().to_string().contains("nm_linear packed row words"));
    // Per phase: the compact form at decode, the dense layout (same matrix, zeros stored) at prefill, a
    // third operand. The text form round-trips; the value is the compact form's.
    let dense: Vec<f32> = (0..32)
        .map(|j| if j % 2 == 1 { (j / 4 + 1) as f32 * if j % 4 == 1 { 1.0 } else { -1.0 } } else { 0.0 })
        .collect();
    w.insert("nm_dense", TensorData::from_f32(vec![1, 32], &dense));
    let phased = g1("  %0 = input {name = \"x\"} : f32[seq, 32]\n  %1 = weight {name = \"nm\"} : i32[1, 17]\n  %2 = weight {name = \"nm_dense\"} : f32[1, 32]\n  %3 = nm_linear(%0, %1, %2) {decode = 1, dtype = f32, group = 4, keep = 2, prefill = 0} : f32[seq, 1]\n  output \"y\" = %3");
    assert_eq!(print(&parse(&phased).unwrap()), phased, "the text form round-trips");
    close(run1(&phased, &[("x", x.clone())], &w).as_f32().unwrap(), &[-72.0], 1e-6);
    let dense_y: f32 = dense.iter().enumerate().map(|(j, v)| v * j as f32).sum();
    assert_eq!(dense_y, -72.0, "the dense layout holds the same matrix");
    for (from, to, want) in [
        // Both phases on the compact form: no dense operand.
        ("prefill = 0", "prefill = 1", "takes 2 operands, got 3"),
        // Neither phase on the compact form: that is a plain linear.
        ("decode = 1", "decode = 0", "use linear"),
        ("prefill = 0", "prefill = 2", "must each be 0 or 1"),
        ("f32[1, 32]\n  %3", "f16[1, 32]\n  %3", "dense layout must be f32[_, _]"),
        ("f32[1, 32]\n  %3", "f32[2, 32]\n  %3", "dense layout rows"),
    ] {
        let bad = phased.replace(from, to);
        let e = parse(&bad).unwrap_err().to_string();
        assert!(e.contains(want), "{from} → {to}: {e}");
    }
    // One phase on the dense layout without it: too few operands.
    let bad = src.replace("prefill = 1", "prefill = 0");
    assert!(parse(&bad).unwrap_err().to_string().contains("takes 3 operands, got 2"));

    // bitmap_linear, unstructured f32 by hand: one row of k = 32 keeping columns 3 (2.0) and 30 (−1.0):
    // codes, the block's u32 mask, 4 bytes of padding (8 past the codes). x[j] = j: y = 6 − 30 = −24.
    let mut bytes: Vec<u8> = [2.0f32, -1.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    bytes.extend(((1u32 << 3) | (1 << 30)).to_le_bytes());
    bytes.extend([0; 4]);
    w.insert("bm", TensorData { dtype: kiln_ir::DType::I32, shape: vec![1, 4], bytes: bytes.into() });
    let src = g1("  %0 = input {name = \"x\"} : f32[seq, 32]\n  %1 = weight {name = \"bm\"} : i32[1, 4]\n  %2 = bitmap_linear(%0, %1) {decode = 1, dtype = f32, gran = 1, kept = 2, prefill = 1} : f32[seq, 1]\n  output \"y\" = %2");
    let x = Tensor::f32(vec![1, 32], (0..32).map(|j| j as f32).collect());
    let y = run1(&src, &[("x", x)], &w);
    close(y.as_f32().unwrap(), &[-24.0], 1e-6);
    let bad = src.replace("i32[1, 4]", "i32[1, 3]");
    assert!(parse(&bad).unwrap_err().to_string().contains("bitmap_linear packed row words"));
    let bad = src.replace("gran = 1", "gran = 4");
    assert!(parse(&bad).unwrap_err().to_string().contains("granularity 4"));
    // Per phase, the reverse way round: the dense layout at decode, the bitmap form at prefill.
    let mut dense = vec![0f32; 32];
    (dense[3], dense[30]) = (2.0, -1.0);
    w.insert("bm_dense", TensorData::from_f32(vec![1, 32], &dense));
    let phased = g1("  %0 = input {name = \"x\"} : f32[seq, 32]\n  %1 = weight {name = \"bm\"} : i32[1, 4]\n  %2 = weight {name = \"bm_dense\"} : f32[1, 32]\n  %3 = bitmap_linear(%0, %1, %2) {decode = 0, dtype = f32, gran = 1, kept = 2, prefill = 1} : f32[seq, 1]\n  output \"y\" = %3");
    assert_eq!(print(&parse(&phased).unwrap()), phased, "the text form round-trips");
    let x = Tensor::f32(vec![1, 32], (0..32).map(|j| j as f32).collect());
    close(run1(&phased, &[("x", x)], &w).as_f32().unwrap(), &[-24.0], 1e-6);
    let bad = phased.replace("f32[1, 32]\n  %3", "f32[1, 64]\n  %3");
    assert!(parse(&bad).unwrap_err().to_string().contains("bitmap_linear dense layout width"));

    // Type rules: mismatched widths are errors naming the dimension.
    let bad = g1("  %0 = input {name = \"x\"} : f32[seq, 4]\n  %1 = weight {name = \"t\"} : f32[3]\n  %2 = threshold(%0, %1) : f32[seq, 4]\n  output \"y\" = %2");
    assert!(parse(&bad).unwrap_err().to_string().contains("threshold width"));
    let bad = g1("  %0 = input {name = \"x\"} : f32[seq, 2]\n  %1 = weight {name = \"wt\"} : f32[3, 2]\n  %2 = active_linear(%0, %1) : f32[seq, 2]\n  output \"y\" = %2");
    assert!(parse(&bad).unwrap_err().to_string().contains("active_linear inner dimension"));
}

#[test]
fn coreinfer_ops_by_hand() {
    let w = WeightStore::new();
    // `past` comes from the cache input's shape: 0 rows → prefill, 2 rows → decode.
    let src = g1("  %0 = input {name = \"a\"} : f32[1, seq, 4]\n  %1 = input {name = \"core\"} : f32[1, 4]\n  %2 = input {name = \"cache\"} : f32[1, past, 1]\n  %3 = core_keep(%0, %1) {past = past} : f32[1, seq, 4]\n  %4 = core_select(%0, %1) {alpha = 0.5, beta = 0.5, past = past} : f32[1, 4]\n  output \"keep\" = %3\n  output \"core\" = %4\n  output \"cache\" = %2");
    let g = parse(&src).unwrap();
    assert_eq!(print(&g), src, "the text form round-trips");
    // Token-wise top 2 of 4: {0, 1}, {1, 2}, {1, 3} → counts 1, 3, 1, 1; ≥ 1.5 of 3 tokens: only 1.
    let a = Tensor::f32(vec![1, 3, 4], vec![3.0, -5.0, 1.0, 0.0, 0.5, 4.0, -4.0, 1.0, 0.0, 2.0, 1.0, -3.0]);
    let core = Tensor::f32(vec![1, 4], vec![0.0, 0.0, 1.0, 1.0]);
    let run = |past: usize| {
        let cache = Tensor::f32(vec![1, past, 1], vec![0.0; past]);
        let inputs = [("a", a.clone()), ("core", core.clone()), ("cache", cache)];
        Interpreter::new(&w).run(&g, &inputs).unwrap()
    };
    let out = run(0);
    assert_eq!(out[0].1.as_f32().unwrap(), &[1.0; 12], "prefill keeps every neuron");
    assert_eq!(out[1].1.as_f32().unwrap(), &[0.0, 1.0, 0.0, 0.0], "the prompt's core set");
    let out = run(2);
    assert_eq!(out[0].1.as_f32().unwrap(), &[0.0, 0.0, 1.0, 1.0].repeat(3), "decode keeps the state's set");
    assert_eq!(out[1].1.as_f32().unwrap(), &[0.0, 0.0, 1.0, 1.0], "the state is unchanged after prefill");
    // Bad parameters and widths are type errors.
    let bad = src.replace("alpha = 0.5", "alpha = 0.0");
    assert!(parse(&bad).unwrap_err().to_string().contains("alpha 0 is outside (0, 1]"));
    let bad = src.replace("%1 = input {name = \"core\"} : f32[1, 4]", "%1 = input {name = \"core\"} : f32[1, 5]");
    assert!(parse(&bad).is_err());
}
