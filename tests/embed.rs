//! Ahead-of-time libraries (`kiln compile --emit lib|obj`): the CMake example's tokens against `kiln run`,
//! the C ABI misuse suite under valgrind, byte-identical artifacts from the same inputs, and object code
//! for another architecture.
//!
//! These tests run external tools as CI does from a clean checkout: cargo (to build `libkiln_capi.a`
//! beside the kiln binary under test), cc, cmake, valgrind — scripts/setup.sh installs the last two.

use crate::common::{kiln_bin, random_weights, tiny_config};
use kiln::frontend::Arch;
use kiln::ir::DType;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `cmd`, panicking with its output unless it succeeds; returns stdout.
fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Builds `libkiln_capi.a` beside the kiln binary under test (same profile), once per test run, so
/// `kiln compile --emit lib` links the runtime of this checkout.
fn ensure_capi() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let release = Path::new(kiln_bin()).parent().is_some_and(|d| d.ends_with("release"));
        let mut cmd = Command::new(option_env!("CARGO").unwrap_or("cargo"));
        cmd.current_dir(repo()).args(["build", "--quiet", "--locked", "-p", "kiln-capi"]);
        if release {
            cmd.arg("--release");
        }
        run_ok(&mut cmd);
    });
}

fn kiln(args: &[&str]) -> Command {
    let mut cmd = Command::new(kiln_bin());
    cmd.args(args);
    cmd
}

/// A tiny random GGUF model (`arch` and `seed` vary its size and values).
fn tiny_gguf(dir: &Path, arch: Arch, seed: u64) -> PathBuf {
    let cfg = tiny_config(arch);
    let path = dir.join(format!("tiny-{arch:?}-{seed}.gguf"));
    kiln::frontend::export::write_gguf(&path, "tiny", &cfg, &random_weights(&cfg, DType::F32, seed), None).unwrap();
    path
}

fn compile_lib(model: &Path, out: &Path, extra: &[&str]) {
    ensure_capi();
    let mut args = vec!["compile", model.to_str().unwrap(), "--emit", "lib", "-o", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    run_ok(&mut kiln(&args));
}

/// `kiln run MODEL ARGS --json`'s report. Each call compiles into its own artifact cache, so tests
/// running side by side never share a cache entry.
fn kiln_run_json(model: &Path, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["run", model.to_str().unwrap(), "--json"];
    all.extend_from_slice(args);
    let cache = tempfile::tempdir().unwrap();
    let out = run_ok(kiln(&all).env("KILN_CACHE_DIR", cache.path()));
    serde_json::from_str(&out).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u64> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
}

/// `kiln run`'s generated ids for `prompt` (ids) and generation `args` (`-n`, sampling, `--ignore-eos`).
fn kiln_run_ids(model: &Path, prompt: &str, args: &[&str]) -> Vec<u64> {
    let mut all = vec!["--prompt-ids", prompt];
    all.extend_from_slice(args);
    ids(&kiln_run_json(model, &all)["generated_ids"])
}

/// Cases for the embedding examples, which take the same generation options as `kiln run`: (prompt ids,
/// options, `kiln run`'s tokens). Greedy and seeded sampling for 24 tokens past EOS, and a chat prompt
/// that stops at the end-of-sequence token.
fn example_cases(model: &Path) -> Vec<(String, Vec<&'static str>, Vec<u64>)> {
    let plain = "6403,1980,253,655".to_string();
    let mut cases = Vec::new();
    for opts in [
        vec!["-n", "24", "--ignore-eos"],
        vec!["-n", "24", "--ignore-eos", "--temperature", "0.8", "--top-k", "40", "--top-p", "0.9", "--seed", "3"],
    ] {
        let want = kiln_run_ids(model, &plain, &opts);
        assert_eq!(want.len(), 24);
        cases.push((plain.clone(), opts, want));
    }
    let chat = kiln_run_json(model, &["--chat", "--prompt", "What is the capital of France?", "-n", "48"]);
    assert_eq!(chat["stop"], "eos", "the chat case must end at the end-of-sequence token: {chat}");
    let prompt: Vec<String> = ids(&chat["prompt_ids"]).iter().map(u64::to_string).collect();
    cases.push((prompt.join(","), vec!["-n", "48"], ids(&chat["generated_ids"])));
    cases
}

/// `kiln run`'s text for the chat case of [`example_cases`] (the last one).
fn chat_text(model: &Path) -> String {
    let chat = kiln_run_json(model, &["--chat", "--prompt", "What is the capital of France?", "-n", "48"]);
    chat["text"].as_str().unwrap().to_string()
}

/// Runs an example binary on every case of [`example_cases`], and with `--text` on the chat case.
fn check_example(exe: &Path, cases: &[(String, Vec<&str>, Vec<u64>)], text: Option<&str>) {
    for (prompt, opts, want) in cases {
        let mut cmd = Command::new(exe);
        cmd.args(["--prompt-ids", prompt, "--threads", "2"]).args(opts);
        let got = parse_ids(&run_ok(&mut cmd));
        assert_eq!(&got, want, "{} {opts:?} differs from kiln run", exe.display());
    }
    if let (Some(want), Some((prompt, opts, _))) = (text, cases.last()) {
        let mut cmd = Command::new(exe);
        cmd.args(["--prompt-ids", prompt, "--threads", "2", "--text"]).args(opts);
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout), want, "{} --text differs from kiln run", exe.display());
    }
}

fn parse_ids(line: &str) -> Vec<u64> {
    line.split_whitespace().map(|t| t.parse().unwrap_or_else(|_| panic!("not a token id: {t:?} in {line:?}"))).collect()
}

#[test]
fn c_embed_example_builds_with_cmake_and_matches_kiln_run() {
    ensure_capi();
    let model = kiln::default_model_path();
    assert!(model.exists(), "default model missing at {} — run scripts/setup.sh", model.display());
    let build = tempfile::tempdir().unwrap();
    let cmake = |args: &[&str]| {
        let mut c = Command::new("cmake");
        c.args(args);
        run_ok(&mut c)
    };
    cmake(&[
        "-S",
        repo().join("examples/c-embed").to_str().unwrap(),
        "-B",
        build.path().to_str().unwrap(),
        &format!("-DKILN_EXECUTABLE={}", kiln_bin()),
        &format!("-DKILN_MODEL_PATH={}", model.display()),
    ]);
    let first = cmake(&["--build", build.path().to_str().unwrap()]);
    assert!(first.contains("kiln: compiling"), "the first build compiles the model:\n{first}");
    let lib = build.path().join("kiln/smollm2");
    for f in ["libkiln_model.a", "libkiln_model.so", "kiln_model.h", "weights.bin", "manifest.json"] {
        assert!(lib.join(f).is_file(), "{f} missing from {}", lib.display());
    }
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(lib.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["passes"], serde_json::json!(["cse", "dce"]), "kiln_add_model's PASSES reach kiln");
    // Nothing changed: the model is not compiled again.
    let second = cmake(&["--build", build.path().to_str().unwrap()]);
    assert!(!second.contains("kiln: compiling"), "an up-to-date build recompiled the model:\n{second}");

    check_example(&build.path().join("c-embed"), &example_cases(&model), Some(&chat_text(&model)));
}

#[test]
fn rust_embed_example_builds_with_kiln_build_and_matches_kiln_run() {
    ensure_capi();
    let model = kiln::default_model_path();
    assert!(model.exists(), "default model missing at {} — run scripts/setup.sh", model.display());
    let project = repo().join("examples/rust-embed");
    let cases = example_cases(&model);
    let text = chat_text(&model);
    // Linked against the shared library (the default) and the static one, each in its own target dir.
    for (link_static, target) in [("0", "target/rust-embed"), ("1", "target/rust-embed-static")] {
        let target = repo().join(target);
        let build = || {
            let out = Command::new(option_env!("CARGO").unwrap_or("cargo"))
                .current_dir(&project)
                .args(["build", "--locked"])
                .env("CARGO_TARGET_DIR", &target)
                .env("KILN", kiln_bin())
                .env("KILN_EMBED_MODEL", &model)
                .env("KILN_EMBED_STATIC", link_static)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(out.status.success(), "building examples/rust-embed failed:\n{stderr}");
            stderr
        };
        build();
        // Unchanged inputs: the build script (and so kiln) does not run again.
        let again = build();
        assert!(!again.contains("Compiling rust-embed"), "an up-to-date build reran:\n{again}");
        let exe = target.join("debug/rust-embed");
        // The static build runs the greedy case only: the link, not the generation, is what differs.
        if link_static == "0" {
            check_example(&exe, &cases, Some(&text));
        } else {
            check_example(&exe, &cases[..1], None);
        }
    }
}

#[test]
fn c_abi_misuse_returns_errors_under_valgrind() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = tiny_gguf(d, Arch::Llama, 1);
    let other = tiny_gguf(d, Arch::Qwen2, 2);
    compile_lib(&good, &d.join("good"), &[]);
    compile_lib(&other, &d.join("other"), &[]);
    let weights = std::fs::read(d.join("good/weights.bin")).unwrap();
    std::fs::write(d.join("truncated.bin"), &weights[..weights.len() - 64]).unwrap();
    let mut flipped = weights.clone();
    flipped[weights.len() / 2] ^= 1;
    std::fs::write(d.join("flipped.bin"), &flipped).unwrap();

    let args = [
        d.join("good/weights.bin"),
        d.join("other/weights.bin"),
        d.join("truncated.bin"),
        d.join("flipped.bin"),
        d.join("no-such-dir/weights.bin"),
    ];
    // valgrind cannot execute AVX-512 instructions; on such a host the code compiled for it runs natively.
    let manifest = std::fs::read_to_string(d.join("good/manifest.json")).unwrap();
    let valgrind = !manifest.contains("\"avx512");
    if !valgrind {
        eprintln!("note: the host has AVX-512, which valgrind cannot run; running the misuse suite natively");
    }
    // The suite linked against the static library, then against the shared one (its exports).
    for shared in [false, true] {
        let exe = d.join(if shared { "misuse-shared" } else { "misuse-static" });
        let mut cc = Command::new("cc");
        cc.args(["-g", "-O1", "-Wall", "-Wextra", "-Werror", "-o"]).arg(&exe).arg(repo().join("tests/c/misuse.c"));
        cc.arg("-I").arg(d.join("good"));
        if shared {
            cc.arg("-L")
                .arg(d.join("good"))
                .arg("-lkiln_model")
                .arg(format!("-Wl,-rpath,{}", d.join("good").display()));
        } else {
            cc.arg(d.join("good/libkiln_model.a"));
        }
        run_ok(cc.args(["-pthread", "-ldl", "-lm"]));
        let mut cmd = if valgrind {
            let mut c = Command::new("valgrind");
            c.args(["-q", "--error-exitcode=99", "--leak-check=full", "--errors-for-leak-kinds=definite"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let out = cmd.args(&args).output().expect("run valgrind (scripts/setup.sh installs it)");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "misuse suite (shared: {shared}) failed ({}):\n{stdout}\n{stderr}", out.status);
        let summary = stdout.lines().last().unwrap_or_default();
        assert!(summary.ends_with(" passed, 0 failed") && !summary.starts_with("0 "), "{stdout}");
    }
}

/// Every file under `dir`, by relative name, with its bytes.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap())
        })
        .collect();
    v.sort();
    v
}

fn assert_identical(a: &Path, b: &Path, expect: &[&str]) {
    let (fa, fb) = (files(a), files(b));
    let names: Vec<&str> = fa.iter().map(|(n, _)| n.as_str()).collect();
    for e in expect {
        assert!(names.contains(e), "{e} missing from {}: {names:?}", a.display());
    }
    assert_eq!(names, fb.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>());
    for ((n, x), (_, y)) in fa.iter().zip(&fb) {
        assert!(x == y, "{n} differs between two compiles of the same model with the same options");
    }
}

#[test]
fn same_inputs_give_byte_identical_artifacts() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = tiny_gguf(d, Arch::Qwen2, 5);
    let m = model.to_str().unwrap();
    for (i, out) in ["lib1", "lib2"].iter().enumerate() {
        // Different output paths (and times) must not leak into the files.
        let out = d.join(format!("{out}/nested{i}"));
        compile_lib(&model, &out, &["--passes", "cse,dce"]);
    }
    assert_identical(
        &d.join("lib1/nested0"),
        &d.join("lib2/nested1"),
        &["libkiln_model.a", "libkiln_model.so", "kiln_model.h", "weights.bin", "manifest.json"],
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("lib1/nested0/manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["passes"], serde_json::json!(["cse", "dce"]));
    for out in ["art1", "art2"] {
        run_ok(&mut kiln(&["compile", m, "-o", d.join(out).to_str().unwrap()]));
    }
    assert_identical(&d.join("art1"), &d.join("art2"), &["kernels.so", "weights.bin", "manifest.json"]);
    for out in ["obj1", "obj2"] {
        let o = d.join(out);
        run_ok(&mut kiln(&[
            "compile",
            m,
            "--emit",
            "obj",
            "--target",
            "aarch64-unknown-linux-gnu",
            "-o",
            o.to_str().unwrap(),
        ]));
    }
    assert_identical(&d.join("obj1"), &d.join("obj2"), &["kiln_model.o"]);
}

/// (class, endianness, e_type, e_machine) from an ELF header, read by hand.
fn elf_header(bytes: &[u8]) -> (u8, u8, u16, u16) {
    assert!(bytes.len() >= 20 && bytes[..4] == *b"\x7fELF", "not an ELF file");
    assert_eq!(bytes[5], 1, "expected little-endian");
    (bytes[4], bytes[5], u16::from_le_bytes([bytes[16], bytes[17]]), u16::from_le_bytes([bytes[18], bytes[19]]))
}

const ELFCLASS64: u8 = 2;
const ET_REL: u16 = 1;
const EM_X86_64: u16 = 62;
const EM_AARCH64: u16 = 183;

#[test]
fn cross_target_objects_have_the_target_architecture() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = tiny_gguf(d, Arch::Llama, 3);
    let m = model.to_str().unwrap();
    let obj = |target: &str, out: &str| {
        let o = d.join(out);
        run_ok(&mut kiln(&["compile", m, "--emit", "obj", "--target", target, "-o", o.to_str().unwrap()]));
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(o.join("manifest.json")).unwrap()).unwrap();
        (elf_header(&std::fs::read(o.join("kiln_model.o")).unwrap()), manifest["target"].clone())
    };
    let (h, t) = obj("aarch64-unknown-linux-gnu:cortex-a76", "arm");
    assert_eq!(h, (ELFCLASS64, 1, ET_REL, EM_AARCH64));
    assert_eq!(t["triple"], "aarch64-unknown-linux-gnu");
    assert_eq!(t["cpu"], "cortex-a76");
    let (h, _) = obj("cpu", "host");
    #[cfg(target_arch = "x86_64")]
    assert_eq!(h, (ELFCLASS64, 1, ET_REL, EM_X86_64));
    let _ = h;

    // Misuse: a library for another machine, an unknown triple, a malformed target, an unknown pass, no
    // runtime library to link.
    let out = d.join("x");
    let o = out.to_str().unwrap();
    for (args, needle) in [
        (vec!["--emit", "lib", "--target", "aarch64-unknown-linux-gnu"], "--emit obj"),
        (vec!["--emit", "lib", "--target", "x86_64-unknown-linux-gnu:znver4"], "x86-64-v3"),
        (vec!["--target", "aarch64-unknown-linux-gnu"], "--emit obj"),
        (vec!["--emit", "obj", "--target", "sparc9-nothing-here:foo"], "sparc9"),
        (vec!["--emit", "obj", "--target", "aarch64"], "TRIPLE"),
        (vec!["--emit", "obj", "--passes", "cse,no-such-pass"], "no-such-pass"),
        (vec!["--emit", "lib"], "no-such-libkiln_capi.a"),
    ] {
        let mut a = vec!["compile", m, "-o", o];
        a.extend(args.iter().copied());
        let res = kiln(&a).env("KILN_CAPI_LIB", d.join("no-such-libkiln_capi.a")).output().unwrap();
        let err = String::from_utf8_lossy(&res.stderr);
        assert_eq!(res.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(needle) && !err.contains("panicked"), "{args:?}: {err}");
    }
}

/// Whether this CPU has an LLVM-named feature (the ones portable levels record).
#[cfg(target_arch = "x86_64")]
fn host_has(feature: &str) -> bool {
    match feature {
        "sse4.2" => std::arch::is_x86_feature_detected!("sse4.2"),
        "avx" => std::arch::is_x86_feature_detected!("avx"),
        "avx2" => std::arch::is_x86_feature_detected!("avx2"),
        "fma" => std::arch::is_x86_feature_detected!("fma"),
        "f16c" => std::arch::is_x86_feature_detected!("f16c"),
        "bmi2" => std::arch::is_x86_feature_detected!("bmi2"),
        "avx512f" => std::arch::is_x86_feature_detected!("avx512f"),
        "avx512bw" => std::arch::is_x86_feature_detected!("avx512bw"),
        "avx512vl" => std::arch::is_x86_feature_detected!("avx512vl"),
        "avx512dq" => std::arch::is_x86_feature_detected!("avx512dq"),
        other => panic!("unexpected feature {other}"),
    }
}

/// Portable libraries (x86-64 psABI levels): the manifest records the level's features; where this CPU
/// has them the library's tokens equal `kiln run`'s, where it lacks one, `kiln_model_create` refuses
/// with KILN_ERR_UNSUPPORTED_CPU naming it (v4 = AVX-512 exercises that on most machines).
#[test]
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn portable_x86_64_levels_record_features_and_are_checked_at_create() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = tiny_gguf(d, Arch::Llama, 7);
    for (level, want) in [
        ("x86-64-v2", &["sse4.2"][..]),
        ("x86-64-v4", &["sse4.2", "avx", "avx2", "fma", "f16c", "bmi2", "avx512f", "avx512bw", "avx512vl", "avx512dq"]),
    ] {
        let out = d.join(level);
        compile_lib(&model, &out, &["--target", &format!("x86_64-unknown-linux-gnu:{level}")]);
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
        assert_eq!(manifest["target"]["features"], serde_json::json!(want), "{level}");
        let exe = out.join("c-embed");
        run_ok(
            Command::new("cc")
                .arg("-o")
                .arg(&exe)
                .arg(repo().join("examples/c-embed/main.c"))
                .arg("-I")
                .arg(&out)
                .arg(out.join("libkiln_model.a"))
                .args(["-pthread", "-ldl", "-lm"]),
        );
        let weights = out.join("weights.bin");
        let res = Command::new(&exe)
            .args(["--prompt-ids", "5,3,9", "-n", "8", "--weights", weights.to_str().unwrap()])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&res.stderr);
        match want.iter().find(|f| !host_has(f)) {
            None => {
                assert!(res.status.success(), "{level}: {stderr}");
                let got = parse_ids(&String::from_utf8_lossy(&res.stdout));
                assert_eq!(got, kiln_run_ids(&model, "5,3,9", &["-n", "8"]), "{level} library vs kiln run");
            }
            Some(missing) => {
                assert_eq!(res.status.code(), Some(1), "{level}: {stderr}");
                assert!(
                    stderr.contains("lacks") && stderr.contains(missing) && stderr.contains("CPU lacks features"),
                    "{level}: {stderr}"
                );
            }
        }
    }
}
