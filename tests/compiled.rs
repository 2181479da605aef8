//! The compiled CPU backend against the reference interpreter: whole real model, tiny random models with
//! odd sizes, prefill-then-decode, thread-count determinism, the artifact cache, and refusal of
//! corrupted or foreign artifacts.

use crate::common::{max_abs_diff, random_weights, run_kiln, smollm2};
use kiln::codegen::CompileOptions;
use kiln::frontend::export::write_hf;
use kiln::frontend::{Arch, LlamaConfig, Model};
use kiln::ir::DType;
use kiln::runtime::{generate, Backend, CompiledBackend, InterpreterBackend, Sampler, SamplingParams};
use std::path::Path;

fn compile(m: &Model, dir: &Path) {
    compile_with(m, dir, false);
}

fn compile_with(m: &Model, dir: &Path, all_logits: bool) {
    let opts = CompileOptions { all_logits, ..CompileOptions::default() };
    kiln::artifact::compile_model(m, "test", &opts, dir).expect("compiles");
}

/// Compares compiled logits with the interpreter's: all rows, or the last row when the artifact
/// computes only the last position.
fn check_close(want: &[f32], got: &[f32], vocab: usize, tol: f32, what: &str) {
    let want = if got.len() == vocab { &want[want.len() - vocab..] } else { want };
    let d = max_abs_diff(want, got);
    assert!(d < tol, "{what}: compiled logits differ from the interpreter by {d}");
}

fn interp_logits(m: &Model, steps: &[&[u32]]) -> Vec<Vec<f32>> {
    let mut b = InterpreterBackend::new(m.graph().unwrap(), &m.weights, m.config.context_length).unwrap();
    steps.iter().map(|s| b.forward(s).unwrap().data).collect()
}

fn compiled_logits(dir: &Path, threads: usize, steps: &[&[u32]]) -> Vec<Vec<f32>> {
    let mut b = CompiledBackend::load(dir, threads, None).unwrap();
    steps.iter().map(|s| b.forward(s).unwrap().data).collect()
}

#[test]
fn smollm2_compiled_matches_interpreter_and_reference() {
    let m = smollm2();
    let dir = tempfile::tempdir().unwrap();
    compile(m, dir.path());
    let prompt = [6403u32, 1980, 253, 655];
    let mut b = CompiledBackend::load(dir.path(), 0, Some(256)).unwrap();
    let mut sampler = Sampler::new(SamplingParams::default());
    let stats = generate(&mut b, &prompt, 20, &mut sampler, &[], |_| true).unwrap();
    assert_eq!(
        stats.generated,
        [
            28, 260, 2240, 282, 23324, 27108, 436, 253, 15114, 39228, 28, 351, 25854, 41658, 284, 14055, 9018, 30,
            1249, 347
        ]
    );
    // Logits: prefill and two decode steps, against the interpreter.
    let steps: [&[u32]; 3] = [&prompt, &[28], &[260]];
    let want = interp_logits(m, &steps);
    let got = compiled_logits(dir.path(), 0, &steps);
    let vocab = m.config.vocab_size;
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        assert_eq!(g.len(), vocab, "generation artifacts return the last position only");
        check_close(w, g, vocab, 1e-3, &format!("step {i}"));
    }
    // Prefill-then-decode equals recomputing everything at once.
    let all = compiled_logits(dir.path(), 0, &[&[6403, 1980, 253, 655, 28, 260]]);
    assert!(max_abs_diff(&all[0], &got[2]) < 1e-4);
    // Thread count does not change a single bit.
    let one = compiled_logits(dir.path(), 1, &steps);
    assert_eq!(one, got);
}

fn odd_config(arch: Arch, seed: u64) -> LlamaConfig {
    // Sizes that are not multiples of vector widths, GQA ratios 1 and >1, several layers.
    let (heads, kv) = [(5, 1), (3, 3), (6, 2)][seed as usize % 3];
    let head_dim = [6, 8, 10][seed as usize % 3];
    LlamaConfig {
        arch,
        vocab_size: 101 + seed as usize,
        hidden_size: 37 + seed as usize,
        intermediate_size: 61 + 2 * seed as usize,
        n_layers: 2,
        n_heads: heads,
        n_kv_heads: kv,
        head_dim,
        rope_theta: 10000.0 + 5000.0 * seed as f32,
        rms_norm_eps: 1e-5,
        context_length: 32,
        attention_bias: arch == Arch::Qwen2,
        tie_embeddings: seed.is_multiple_of(2),
        ..crate::common::tiny_config(arch)
    }
}

/// Projections of one activation run as one launch: per layer, Q/K/V is one grouped linear launch over
/// the three weights and gate/up another (x read once, one launch instead of three or two); the residual
/// adds after o_proj and down run in those linears' epilogues, so no separate add launches exist.
#[test]
fn projections_of_one_input_are_one_launch_per_layer() {
    for (arch, dtype) in [(Arch::Llama, DType::F32), (Arch::Qwen2, DType::F16), (Arch::Qwen3, DType::F32)] {
        let cfg = crate::common::tiny_config(arch);
        let src = tempfile::tempdir().unwrap();
        write_hf(src.path(), &cfg, &random_weights(&cfg, dtype, 3), 1).unwrap();
        let m = Model::load(src.path()).unwrap();
        let art = tempfile::tempdir().unwrap();
        let manifest = kiln::artifact::compile_model(&m, "test", &CompileOptions::default(), art.path()).unwrap();
        let p = &manifest.program;
        let weight = |b: usize| match &p.buffers[b].kind {
            kiln::ir::program::BufferKind::Weight { name, .. } => name.clone(),
            _ => String::new(),
        };
        for layer in 0..cfg.n_layers {
            for group in [&["attn_q", "attn_k", "attn_v"][..], &["ffn_gate", "ffn_up"][..]] {
                let names: Vec<String> = group.iter().map(|w| format!("blk.{layer}.{w}.weight")).collect();
                let launches: Vec<Vec<String>> = p
                    .launches
                    .iter()
                    .map(|l| l.bufs.iter().map(|&b| weight(b)).filter(|n| names.contains(n)).collect())
                    .filter(|ws: &Vec<String>| !ws.is_empty())
                    .collect();
                assert_eq!(launches, vec![names.clone()], "{arch:?} layer {layer}: launches reading {names:?}");
            }
        }
        let res = p.launches.iter().filter(|l| l.kernel.contains("_res_x1")).count();
        assert_eq!(res, 2 * cfg.n_layers, "{arch:?}: residual adds fused into o_proj and down");
        let steps: [&[u32]; 2] = [&[1, 7, 3], &[42]];
        for (w, g) in interp_logits(&m, &steps).iter().zip(compiled_logits(art.path(), 2, &steps)) {
            check_close(w, &g, cfg.vocab_size, 1e-4, &format!("{arch:?}"));
        }
    }
}

#[test]
fn tiny_models_with_odd_sizes_match_interpreter() {
    for seed in 0..4u64 {
        for (arch, dtype) in [
            (Arch::Llama, DType::F32),
            (Arch::Qwen2, DType::F16),
            (Arch::Llama, DType::BF16),
            (Arch::Qwen3, DType::BF16),
        ] {
            let cfg = odd_config(arch, seed);
            let src = tempfile::tempdir().unwrap();
            write_hf(src.path(), &cfg, &random_weights(&cfg, dtype, seed), 1).unwrap();
            let m = Model::load(src.path()).unwrap();
            let art = tempfile::tempdir().unwrap();
            compile_with(&m, art.path(), seed.is_multiple_of(2));
            let steps: [&[u32]; 3] = [&[1, 7, 3, 99, 0], &[42], &[5, 6]];
            let want = interp_logits(&m, &steps);
            let got = compiled_logits(art.path(), 2, &steps);
            for (i, (w, g)) in want.iter().zip(&got).enumerate() {
                if seed.is_multiple_of(2) {
                    assert_eq!(w.len(), g.len(), "all-logits artifact");
                }
                check_close(w, g, cfg.vocab_size, 1e-4, &format!("{arch:?}/{dtype} seed {seed} step {i}"));
            }
        }
    }
}

#[test]
fn quantized_tiny_model_matches_interpreter() {
    // Widths that are multiples of 32 so every block format applies; one format per run.
    for (i, dtype) in [DType::Q8_0, DType::Q4_0, DType::Q4_1, DType::Q5_0].into_iter().enumerate() {
        let mut cfg = crate::common::tiny_config(Arch::Qwen2);
        cfg.hidden_size = 64;
        cfg.intermediate_size = 96;
        cfg.n_heads = 8;
        cfg.n_kv_heads = 2;
        cfg.head_dim = 8;
        cfg.vocab_size = 70;
        let (_dir, m) = crate::common::quantized_gguf(&cfg, random_weights(&cfg, DType::F32, i as u64), dtype);
        let art = tempfile::tempdir().unwrap();
        compile_with(&m, art.path(), true);
        let steps: [&[u32]; 2] = [&[3, 1, 4, 1, 5, 9, 2, 6], &[53]];
        let want = interp_logits(&m, &steps);
        let got = compiled_logits(art.path(), 2, &steps);
        for (s, (w, g)) in want.iter().zip(&got).enumerate() {
            check_close(w, g, cfg.vocab_size, 1e-4, &format!("{dtype} step {s}"));
        }
    }
}

#[test]
fn corrupted_or_foreign_artifacts_are_refused() {
    let cfg = crate::common::tiny_config(Arch::Llama);
    let src = tempfile::tempdir().unwrap();
    write_hf(src.path(), &cfg, &random_weights(&cfg, DType::F32, 1), 1).unwrap();
    let m = Model::load(src.path()).unwrap();
    let good = tempfile::tempdir().unwrap();
    compile(&m, good.path());
    assert!(CompiledBackend::load(good.path(), 1, None).is_ok());

    // The load error of a copy of the good artifact edited by `f` (None: it loaded).
    let try_copy = |f: &dyn Fn(&Path)| -> Option<String> {
        let d = tempfile::tempdir().unwrap();
        for e in std::fs::read_dir(good.path()).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), d.path().join(e.file_name())).unwrap();
        }
        f(d.path());
        CompiledBackend::load(d.path(), 1, None).err().map(|e| e.to_string())
    };
    let copy = |f: &dyn Fn(&Path)| try_copy(f).expect("corrupted artifact was accepted");
    let e = copy(&|d| {
        let p = d.join("weights.bin");
        let b = std::fs::read(&p).unwrap();
        std::fs::write(&p, &b[..b.len() - 10]).unwrap();
    });
    assert!(e.contains("weights.bin") && e.contains("truncated"), "{e}");
    let e = copy(&|d| {
        let p = d.join("weights.bin");
        let mut b = std::fs::read(&p).unwrap();
        b[100] ^= 0x40;
        std::fs::write(&p, b).unwrap();
    });
    assert!(e.contains("hash"), "{e}");
    let e = try_copy(&|d| {
        edit_manifest(d, |m| m["target"]["features"] = serde_json::json!(["avx512vnni-missing", "avx512f"]))
    });
    // Either the host has avx512f (then the unknown name is ignored and this must load) or it is refused.
    if std::arch::is_x86_feature_detected!("avx512f") {
        assert_eq!(e, None, "an artifact needing only avx512f must load on this avx512f host");
    } else {
        let e = e.expect("an artifact needing avx512f was accepted on a host without it");
        assert!(e.contains("avx512f") && e.contains("lacks"), "{e}");
    }
    let e = copy(&|d| std::fs::write(d.join("manifest.json"), "{ not json").unwrap());
    assert!(e.contains("manifest"), "{e}");
    let e = copy(&|d| edit_manifest(d, |m| m["format_version"] = 999.into()));
    assert!(e.contains("format"), "{e}");
    let e = copy(&|d| std::fs::write(d.join("kernels.so"), b"not a library").unwrap());
    assert!(e.contains("kernels.so"), "{e}");
}

fn edit_manifest(dir: &Path, f: impl Fn(&mut serde_json::Value)) {
    let p = dir.join("manifest.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(p, v.to_string()).unwrap();
}

#[test]
fn unsupported_op_fails_at_compile_time_naming_it() {
    let g = kiln::ir::text::parse(
        "graph \"g\" {\n  %0 = input {name = \"tokens\"} : i32[batch, seq]\n  %1 = input {name = \"x\"} : f32[seq, 4]\n  %2 = exp(%1) : f32[seq, 4]\n  output \"logits\" = %2\n}\n",
    )
    .unwrap();
    let err = kiln::codegen::lower::lower(&g, &kiln::ir::WeightStore::new()).err().expect("must fail").to_string();
    assert!(err.contains("float input `x`") || err.contains("`exp`"), "{err}");
    let g = kiln::ir::text::parse(
        "graph \"g\" {\n  %0 = input {name = \"tokens\"} : i32[seq]\n  %1 = cast(%0) {dtype = f32} : f32[seq]\n  %2 = exp(%1) : f32[seq]\n  output \"logits\" = %2\n}\n",
    )
    .unwrap();
    let err = kiln::codegen::lower::lower(&g, &kiln::ir::WeightStore::new()).err().expect("must fail").to_string();
    assert!(err.contains("`cast`") && err.contains("%1"), "{err}");
}

/// `kiln run MODEL` finds a build's artifact by its recipe, without running the passes (`artifact_cache`:
/// `recipe`), only while every input the passes read is unchanged: a calibration re-measured into the
/// same file compiles anew; an evicted entry falls back to the full path and records the recipe again;
/// without the recipe index the passes run and find their graph's entry (`graph`). The ids equal the
/// interpreter's on the same flags each time; the recipe key sees a one-ulp change of one calibration
/// statistic.
#[test]
fn cli_reuses_a_build_recipe_only_while_its_inputs_hold() {
    let cfg = crate::common::tiny_config(Arch::Llama);
    let src = tempfile::tempdir().unwrap();
    write_hf(src.path(), &cfg, &random_weights(&cfg, DType::F32, 5), 1).unwrap();
    let text = crate::common::word_tokenizer_and_text(src.path(), cfg.vocab_size);
    let cache = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(crate::common::kiln_bin())
            .args(args)
            .env("KILN_CACHE_DIR", cache.path())
            .env("KILN_MODEL", src.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // Outside the model directory: every `.json` there is part of the model's source hash.
    let work = tempfile::tempdir().unwrap();
    let cal = work.path().join("cal.json");
    let (t, c) = (text.to_str().unwrap(), cal.to_str().unwrap());
    run(&["calibrate", "--text", t, "-o", c, "--chunk", "16"]);
    let gen = |backend: &str| {
        let args = ["run", "--prompt-ids", "1,2,3", "-n", "6", "--json", "--chess-sparsity", "0.5"];
        let out = run(&[&args[..], &["--calibration", c, "--backend", backend]].concat());
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        (v["artifact_cache"].as_str().unwrap_or("none").to_string(), v["generated_ids"].clone())
    };
    let (hit, ids) = gen("compiled");
    assert_eq!(hit, "compiled");
    assert_eq!(gen("interpreter").1, ids);
    assert_eq!(gen("compiled"), ("recipe".to_string(), ids.clone()));
    // The same calibration file, re-measured on another text: other thresholds, so no recipe hit.
    std::fs::write(&text, "dog log mat on cat the sat and ".repeat(8)).unwrap();
    run(&["calibrate", "--text", t, "-o", c, "--chunk", "16"]);
    let (hit, ids) = gen("compiled");
    assert_eq!(hit, "compiled", "a changed calibration must not reuse the old artifact");
    assert_eq!(gen("interpreter").1, ids);
    assert_eq!(gen("compiled"), ("recipe".to_string(), ids.clone()));
    // The artifact evicted: the recipe names a missing entry, so the passes run and compile again.
    std::fs::remove_dir_all(cache.path().join("artifacts")).unwrap();
    assert_eq!(gen("compiled"), ("compiled".to_string(), ids.clone()));
    assert_eq!(gen("compiled"), ("recipe".to_string(), ids.clone()));
    // No recipe index: the passes run and find their graph's artifact.
    std::fs::remove_dir_all(cache.path().join("recipes")).unwrap();
    assert_eq!(gen("compiled"), ("graph".to_string(), ids));
    // The key itself: equal builds agree, one statistic one ulp away does not.
    let calib = kiln::passes::calibration::Calibration::from_json(&std::fs::read_to_string(&cal).unwrap()).unwrap();
    let build = |calib: &kiln::passes::calibration::Calibration| kiln::artifact::Build {
        chess: Some(0.5),
        calibration: Some(std::sync::Arc::new(calib.clone())),
        ..Default::default()
    };
    let key = |b: &kiln::artifact::Build| kiln::artifact::recipe_key("source", b);
    assert_eq!(key(&build(&calib)), key(&build(&calib.clone())));
    let mut nudged = calib.clone();
    let v = &mut nudged.layers[0].ffn_in_mean_abs[0];
    *v = f32::from_bits(v.to_bits() + 1);
    assert_ne!(key(&build(&calib)), key(&build(&nudged)));
    assert_ne!(key(&build(&calib)), key(&kiln::artifact::Build { chess: Some(0.25), ..build(&calib) }));
}

/// A Hugging Face model's artifact carries its `chat_template.jinja` (the template the loader prefers to
/// `tokenizer_config.json`'s), so `kiln run ARTIFACT --chat` renders what `kiln run MODEL --chat` does;
/// the model's source hash covers that template (an edit misses the cache) but not a calibration file
/// saved beside the model.
#[test]
fn hf_artifacts_carry_the_chat_template_and_hash_only_what_the_loader_reads() {
    let cfg = crate::common::tiny_config(Arch::Llama);
    let src = tempfile::tempdir().unwrap();
    write_hf(src.path(), &cfg, &random_weights(&cfg, DType::F32, 6), 1).unwrap();
    crate::common::word_tokenizer_and_text(src.path(), cfg.vocab_size);
    let template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}";
    std::fs::write(src.path().join("chat_template.jinja"), template).unwrap();
    let hash = kiln::artifact::source_hash(src.path()).unwrap();
    std::fs::write(src.path().join("calibration.json"), "{}").unwrap();
    assert_eq!(kiln::artifact::source_hash(src.path()).unwrap(), hash, "a calibration file is not the model");
    let m = Model::load(src.path()).unwrap();
    assert_eq!(m.tokenizer.as_ref().and_then(|t| t.chat_template()), Some(template));
    let out = tempfile::tempdir().unwrap();
    compile(&m, out.path());
    let tok = kiln::artifact::artifact_tokenizer(out.path()).unwrap().expect("the artifact has a tokenizer");
    assert_eq!(tok.chat_template(), Some(template));
    std::fs::write(src.path().join("chat_template.jinja"), "{{ messages[0].content }}").unwrap();
    assert_ne!(kiln::artifact::source_hash(src.path()).unwrap(), hash, "the chat template is part of the model");
}

#[test]
fn cli_caches_compiled_artifacts() {
    let cfg = crate::common::tiny_config(Arch::Llama);
    let src = tempfile::tempdir().unwrap();
    write_hf(src.path(), &cfg, &random_weights(&cfg, DType::F32, 4), 1).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let run = || {
        let out = std::process::Command::new(crate::common::kiln_bin())
            .args(["run", src.path().to_str().unwrap(), "--prompt-ids", "1,2,3", "-n", "5", "--json"])
            .env("KILN_CACHE_DIR", cache.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (String::from_utf8_lossy(&out.stderr).contains("[compiled"), v["generated_ids"].clone(), v["backend"].clone())
    };
    let (compiled_first, ids1, backend) = run();
    let (compiled_second, ids2, _) = run();
    assert!(compiled_first && !compiled_second, "second run must reuse the cache");
    assert_eq!(ids1, ids2);
    assert_eq!(backend, "compiled-cpu");
    // And the interpreter agrees on the ids.
    let (code, out, err) = run_kiln(
        &[
            "run",
            src.path().to_str().unwrap(),
            "--prompt-ids",
            "1,2,3",
            "-n",
            "5",
            "--json",
            "--backend",
            "interpreter",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["generated_ids"], ids1);
}

/// A second target behind the `Target` seam: lowering is target-neutral, the target generates kernel
/// families. This one has a dense linear and nothing else, and refuses by family and descriptor; the
/// CPU target behind the same seam gives what `compile_to_dir` gives.
struct DenseLinearOnly;

impl DenseLinearOnly {
    fn refuse(&self, kernels: &[kiln::codegen::KernelSpec]) -> Result<(), kiln::codegen::CodegenError> {
        match kernels.iter().find(|k| !matches!(k, kiln::codegen::KernelSpec::Linear(d) if d.is_plain())) {
            Some(k) => Err(kiln::codegen::CodegenError::UnsupportedKernel {
                target: self.name(),
                family: k.family(),
                kernel: k.describe(),
            }),
            None => Ok(()),
        }
    }
    fn name(&self) -> String {
        "dense-linear-only".into()
    }
}

impl kiln::codegen::Target for DenseLinearOnly {
    fn name(&self) -> String {
        DenseLinearOnly::name(self)
    }
    fn supports(&self, _: &kiln::ir::Op) -> bool {
        true
    }
    fn build(
        &self,
        lowered: kiln::codegen::Lowered,
        _: &CompileOptions,
        _: &kiln::codegen::ArtifactInfo,
        _: &Path,
    ) -> Result<kiln::ir::program::Manifest, kiln::codegen::CodegenError> {
        self.refuse(&lowered.kernels)?;
        Err(kiln::codegen::CodegenError::InvalidSpec("this target writes no artifact".into()))
    }
    fn emit(
        &self,
        lowered: &kiln::codegen::Lowered,
        _: &CompileOptions,
        _: kiln::codegen::Stage,
    ) -> Result<String, kiln::codegen::CodegenError> {
        self.refuse(&lowered.kernels)?;
        Ok(String::new())
    }
}

#[test]
fn a_second_target_refuses_kernel_families_by_name_and_the_cpu_one_is_unchanged() {
    let cfg = crate::common::tiny_config(Arch::Llama);
    let src = tempfile::tempdir().unwrap();
    write_hf(src.path(), &cfg, &random_weights(&cfg, DType::F32, 3), 1).unwrap();
    let m = Model::load(src.path()).unwrap();
    let g = m.graph().unwrap();
    let opts = CompileOptions::default();
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("art");
    let refused = DenseLinearOnly;
    let err = kiln::codegen::compile_to_dir_for(&refused, &g, &m.weights, &opts, &Default::default(), &dir)
        .unwrap_err()
        .to_string();
    // The embedding is the first kernel the program calls.
    assert!(err.starts_with("target dense-linear-only: no embedding kernel for kiln_embedding_f32_d"), "{err}");
    assert!(!dir.join("manifest.json").exists(), "a refused build writes no manifest");
    let err = kiln::codegen::emit_stage_for(&refused, &g, &m.weights, &opts, kiln::codegen::Stage::Llvm).unwrap_err();
    assert!(err.to_string().contains("no embedding kernel"), "{err}");
    // The descriptor is what a target sees of a linear: a masked one (CHESS's up) is named by its form.
    let masked = kiln::codegen::LinearDesc::dense(DType::Q4_1, 576)
        .with_output(kiln::codegen::linear_family::OutputForm::Masked);
    let k = kiln::codegen::KernelSpec::Linear(masked);
    assert_eq!(k.describe(), "linear q4_1 k=576 weight=dense input=dense output=masked");
    assert!(refused.refuse(std::slice::from_ref(&k)).unwrap_err().to_string().ends_with("output=masked"));
    // The CPU target through the seam: the same program and kernels as the host compile, the same logits.
    let (a, b) = (out.path().join("a"), out.path().join("b"));
    let host = kiln::codegen::CpuTarget::host();
    let info = kiln::codegen::ArtifactInfo {
        context_length: m.config.context_length,
        vocab_size: m.config.vocab_size,
        ..Default::default()
    };
    let ma = kiln::codegen::compile_to_dir_for(&host, &g, &m.weights, &opts, &info, &a).unwrap();
    let mb = kiln::codegen::compile_to_dir(&g, &m.weights, &opts, &info, &b).unwrap();
    assert_eq!(ma.kernels, mb.kernels);
    assert_eq!(serde_json::to_string(&ma.program).unwrap(), serde_json::to_string(&mb.program).unwrap());
    let steps: [&[u32]; 2] = [&[1, 7, 3], &[42]];
    let (la, lb) = (compiled_logits(&a, 1, &steps), compiled_logits(&b, 1, &steps));
    assert_eq!(la, lb);
    for (w, g) in interp_logits(&m, &steps).iter().zip(&la) {
        check_close(w, g, m.config.vocab_size, 1e-4, "cpu target");
    }
}

/// One backend over three sequences: a step takes several sequences' tokens (in any order, any subset)
/// and each sequence's logits equal those of the same tokens run alone on a fresh backend, for the
/// interpreter and the compiled code (1 and 2 threads); positions are per sequence, a released sequence
/// starts empty, and a bad batch is refused naming the sequence.
#[test]
fn a_step_over_several_sequences_equals_each_sequence_alone() {
    use kiln::runtime::SeqTokens;
    let mut cfg = crate::common::tiny_config(Arch::Llama);
    cfg.context_length = 32;
    let src = tempfile::tempdir().unwrap();
    write_hf(src.path(), &cfg, &random_weights(&cfg, DType::F32, 11), 1).unwrap();
    let m = Model::load(src.path()).unwrap();
    let art = tempfile::tempdir().unwrap();
    compile_with(&m, art.path(), true);
    let prompts: [&[u32]; 3] = [&[1, 7, 3, 90], &[5, 6], &[42, 3, 3, 8, 1]];
    // Per sequence, its steps: the prompt, then one token, then another.
    let steps = |s: usize| -> [Vec<u32>; 3] { [prompts[s].to_vec(), vec![11 + s as u32], vec![20 + s as u32]] };
    type Make<'a> = Box<dyn Fn() -> Box<dyn Backend + 'a> + 'a>;
    let makers: Vec<(&str, Make)> = vec![
        ("interpreter", Box::new(|| Box::new(InterpreterBackend::new(m.graph().unwrap(), &m.weights, 32).unwrap()))),
        ("compiled ×1", Box::new(|| Box::new(CompiledBackend::load(art.path(), 1, None).unwrap()))),
        ("compiled ×2", Box::new(|| Box::new(CompiledBackend::load(art.path(), 2, None).unwrap()))),
    ];
    for (what, make) in &makers {
        let alone: Vec<Vec<Vec<f32>>> = (0..3)
            .map(|s| {
                let mut b = make();
                steps(s).iter().map(|t| b.forward(t).unwrap().data).collect()
            })
            .collect();
        let mut b = make();
        let st: Vec<[Vec<u32>; 3]> = (0..3).map(steps).collect();
        let entry = |s: usize, k: usize| SeqTokens { seq: 10 + s as u32, tokens: &st[s][k] };
        // Prefill of all three, then decode in another order, then a subset, then the rest.
        let plan: [&[(usize, usize)]; 4] =
            [&[(0, 0), (1, 0), (2, 0)], &[(2, 1), (0, 1), (1, 1)], &[(1, 2), (2, 2)], &[(0, 2)]];
        for (i, round) in plan.iter().enumerate() {
            let batch: Vec<SeqTokens> = round.iter().map(|&(s, k)| entry(s, k)).collect();
            let got = b.step(&batch).unwrap();
            assert_eq!(got.len(), round.len());
            for (&(s, k), l) in round.iter().zip(&got) {
                assert_eq!(l.data, alone[s][k], "{what}: round {i}, sequence {s}, step {k}");
            }
        }
        assert_eq!(b.sequence(), 10, "the last entry's sequence is current");
        for (s, p) in prompts.iter().enumerate() {
            b.select(10 + s as u32).unwrap();
            assert_eq!(b.position(), p.len() + 2, "{what}: sequence {s}'s position");
        }
        // A released sequence starts empty; the others keep their caches.
        b.release(11);
        let again = b.step(&[SeqTokens { seq: 11, tokens: &st[1][0] }]).unwrap();
        assert_eq!(again[0].data, alone[1][0], "{what}: released sequence");
        b.select(12).unwrap();
        assert_eq!(b.position(), prompts[2].len() + 2);
        // `forward` is the batch of one on the current sequence.
        let one = b.forward(&[7]).unwrap();
        let mut c = make();
        for t in steps(2) {
            c.forward(&t).unwrap();
        }
        assert_eq!(one.data, c.forward(&[7]).unwrap().data, "{what}: forward on the current sequence");
        // Bad batches are refused naming the sequence.
        let dup = [SeqTokens { seq: 3, tokens: &[1] }, SeqTokens { seq: 3, tokens: &[2] }];
        assert!(b.step(&dup).unwrap_err().to_string().contains("sequence 3: appears twice"), "{what}");
        let empty = [SeqTokens { seq: 4, tokens: &[] }];
        assert!(b.step(&empty).unwrap_err().to_string().contains("sequence 4"), "{what}");
        assert!(b.step(&[]).is_err());
    }
}
