//! Ahead-of-time libraries for embedding: `kiln compile MODEL --emit lib|obj -o OUT`.
//!
//! `obj` writes the model's object (`kiln_model.o`: kernels, manifest, kernel table and
//! `kiln_model_create`; see `kiln_codegen::library`), `weights.bin`, `manifest.json` and `kiln_model.h`,
//! for any target LLVM knows. `lib` (host target) then combines the object with the prebuilt runtime,
//! `libkiln_capi.a` (the `kiln-capi` crate), into `libkiln_model.a` and links `libkiln_model.so`, exporting
//! only the `kiln_*` functions of the header. The object is removed: the libraries contain it.
//!
//! Every step is deterministic (no timestamps in the manifest, `ar D`), so the same inputs and options
//! give byte-identical files.

use crate::artifact::Build;
use anyhow::{bail, Context, Result};
use kiln_codegen::TargetSpec;
use kiln_frontend::Model;
use kiln_ir::program::Manifest;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The header of the C ABI (installed as `OUT/kiln_model.h`).
pub const HEADER: &str = include_str!("../../capi/include/kiln_model.h");

/// File names in an output directory.
pub const STATIC_LIB: &str = "libkiln_model.a";
pub const SHARED_LIB: &str = "libkiln_model.so";
pub const OBJECT: &str = "kiln_model.o";
pub const HEADER_FILE: &str = "kiln_model.h";

/// The runtime archive `kiln compile --emit lib` links every model with.
pub const CAPI_LIB: &str = "libkiln_capi.a";

/// The functions `kiln_model.h` declares: what the shared library exports.
const EXPORTS: &[&str] = &[
    "kiln_abi_version",
    "kiln_model_create",
    "kiln_model_free",
    "kiln_model_prefill",
    "kiln_model_decode",
    "kiln_model_logits",
    "kiln_model_reset",
    "kiln_model_vocab_size",
    "kiln_model_context_length",
    "kiln_model_position",
    "kiln_model_eos_token",
    "kiln_model_token_bytes",
    "kiln_sampler_create",
    "kiln_sampler_sample",
    "kiln_sampler_free",
    "kiln_status_string",
    "kiln_last_error",
];

/// What to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LibraryKind {
    /// Object, weights, manifest, header (any target).
    Object,
    /// Static and shared library, weights, manifest, header (host target).
    Library,
}

/// Where `libkiln_capi.a` is: `$KILN_CAPI_LIB`, else next to the `kiln` executable (cargo puts both in
/// `target/<profile>/`), else one directory up (for executables under `target/<profile>/deps/`).
pub fn find_capi_lib() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("KILN_CAPI_LIB") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("KILN_CAPI_LIB={} is not a file", p.display());
        }
        return Ok(p);
    }
    let exe = std::env::current_exe().context("locating the kiln executable")?;
    let mut looked = Vec::new();
    for dir in exe.parent().into_iter().flat_map(|d| [d.to_path_buf(), d.join("..")]) {
        let p = dir.join(CAPI_LIB);
        if p.is_file() {
            return Ok(p);
        }
        looked.push(dir.display().to_string());
    }
    bail!(
        "{CAPI_LIB} (Kiln's runtime for embedded models) not found in {}: build it with \
         `cargo build --release -p kiln-capi` (the same profile as this kiln), or set KILN_CAPI_LIB to its path",
        looked.join(" or ")
    )
}

/// An `llvm-ar` that can index Rust's archives (GNU ar's LLVM plugin cannot read the bitcode members of
/// a Rust staticlib and drops their symbols): `$KILN_AR`, else `llvm-ar-19`/`llvm-ar` on PATH, else the
/// LLVM 19 installation scripts/setup.sh makes.
fn find_llvm_ar() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("KILN_AR") {
        return Ok(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in ["llvm-ar-19", "llvm-ar"] {
        if let Some(p) = std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file()) {
            return Ok(p);
        }
    }
    let p = PathBuf::from("/usr/lib/llvm-19/bin/llvm-ar");
    if p.is_file() {
        return Ok(p);
    }
    bail!("llvm-ar not found (install llvm-19, as scripts/setup.sh does, or set KILN_AR)")
}

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {what} ({:?})", cmd.get_program()))?;
    if !out.status.success() {
        bail!("{what} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Compiles `model` (hash of its source: `source_hash`) for `target` into `out` as `kind`.
pub fn compile_library(
    model: &Model,
    source_hash: &str,
    build: &Build,
    target: &TargetSpec,
    kind: LibraryKind,
    out: &Path,
) -> Result<Manifest> {
    if kind == LibraryKind::Library && !target.runs_here() {
        bail!(
            "--emit lib links for this machine (`--target cpu`, or a portable x86-64 level such as \
             x86_64-unknown-linux-gnu:x86-64-v3); use --emit obj for other --target TRIPLE[:CPU]"
        );
    }
    // Find the runtime before the (long) compile, so a missing one fails fast.
    let capi = match kind {
        LibraryKind::Library => Some(find_capi_lib()?),
        LibraryKind::Object => None,
    };
    let built = crate::artifact::build_graph(model, build)?;
    let info = crate::artifact::artifact_info(model, source_hash, &built, build);
    // Each token's bytes, for kiln_model_token_bytes: GGUF tokenizers give them (ids the tokenizer lacks
    // are empty); tokenizer.json ones decode whole sequences only, so those libraries have no table.
    let vocab: Option<Vec<Vec<u8>>> = model.tokenizer.as_ref().and_then(|t| {
        let per_token: Vec<Option<Vec<u8>>> = (0..t.vocab_size() as u32).map(|id| t.token_bytes(id)).collect();
        per_token.iter().any(Option::is_some).then(|| per_token.into_iter().map(Option::unwrap_or_default).collect())
    });
    let manifest = kiln_codegen::compile_library_object(
        &built.graph,
        &built.weights,
        &build.opts,
        &info,
        vocab.as_deref(),
        target,
        out,
    )?;
    let header = out.join(HEADER_FILE);
    std::fs::write(&header, HEADER).with_context(|| format!("writing {}", header.display()))?;
    let Some(capi) = capi else { return Ok(manifest) };
    let obj = out.join(OBJECT);

    let a = out.join(STATIC_LIB);
    std::fs::copy(&capi, &a).with_context(|| format!("copying {} to {}", capi.display(), a.display()))?;
    run(Command::new(find_llvm_ar()?).arg("rsD").arg(&a).arg(&obj), "llvm-ar (making the static library)")?;

    let so = out.join(SHARED_LIB);
    let map = out.join(".kiln_exports.map");
    std::fs::write(&map, format!("{{\n  global: {};\n  local: *;\n}};\n", EXPORTS.join("; ")))
        .with_context(|| format!("writing {}", map.display()))?;
    let mut cc = Command::new("cc");
    cc.args(["-shared", "-o"]).arg(&so).arg(&obj).arg(&capi);
    cc.arg(format!("-Wl,-soname,{SHARED_LIB}"))
        .arg("-Wl,--gc-sections")
        .arg(format!("-Wl,--version-script={}", map.display()));
    for f in EXPORTS {
        cc.arg(format!("-Wl,--undefined={f}"));
    }
    cc.args(["-lpthread", "-ldl", "-lm"]);
    let linked = run(&mut cc, "cc (linking the shared library)");
    std::fs::remove_file(&map).with_context(|| format!("removing {}", map.display()))?;
    linked?;
    std::fs::remove_file(&obj).with_context(|| format!("removing {}", obj.display()))?;
    Ok(manifest)
}

/// `kiln compile MODEL --emit lib|obj -o OUT [--json]`: compiles and reports.
#[allow(clippy::too_many_arguments)]
pub fn compile_command(
    model: &Model,
    model_path: &Path,
    build: &Build,
    target: &TargetSpec,
    lib: bool,
    out: Option<PathBuf>,
    json: bool,
) -> Result<()> {
    let kind = if lib { LibraryKind::Library } else { LibraryKind::Object };
    let out = out.context("--emit lib/obj writes a directory: give it with -o")?;
    let hash = crate::artifact::source_hash(model_path)?;
    let manifest = compile_library(model, &hash, build, target, kind, &out)?;
    let files: Vec<&str> = match kind {
        LibraryKind::Library => vec![STATIC_LIB, SHARED_LIB, HEADER_FILE, "weights.bin", "manifest.json"],
        LibraryKind::Object => vec![OBJECT, HEADER_FILE, "weights.bin", "manifest.json"],
    };
    if json {
        let report = serde_json::json!({
            "output": out,
            "files": files,
            "model": manifest.model_name,
            "target": manifest.target,
            "passes": manifest.passes,
            "kernels": manifest.kernels.len(),
            "compile_seconds": manifest.compile_seconds,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        eprintln!(
            "compiled {} for {} ({}) → {}: {}",
            manifest.model_name,
            manifest.target.triple,
            manifest.target.cpu,
            out.display(),
            files.join(", ")
        );
    }
    Ok(())
}
