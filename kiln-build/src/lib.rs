//! Compile a Kiln model at build time, from a `build.rs`:
//!
//! ```no_run
//! // in build.rs's main:
//! kiln_build::compile("model.gguf").passes(&["cse", "dce"]).target("cpu").run().unwrap();
//! ```
//! ```ignore
//! // src/main.rs
//! include!(concat!(env!("OUT_DIR"), "/kiln_model.rs"));
//! let mut model = kiln_model::Model::new(0)?; // the weights compiled with the code, all cores
//! ```
//!
//! [`Builder::run`] runs the `kiln` CLI (`$KILN`, else `kiln` on `PATH`) as
//! `kiln compile MODEL --emit lib -o $OUT_DIR/kiln_model`, prints the `cargo:` directives that link the
//! result and rerun the build script only when the model files or the kiln executable change, and writes
//! `$OUT_DIR/kiln_model.rs`: safe bindings (`kiln_model::Model`, `kiln_model::Sampler`) over the C ABI
//! of `kiln_model.h`.
//!
//! By default the program links `libkiln_model.so` (with an rpath to it, for the package's own binaries,
//! tests and examples): the shared library exports only the `kiln_*` functions, so the Rust standard
//! library inside it never meets the program's. [`Builder::static_link`] links `libkiln_model.a`
//! instead (a self-contained binary; the program should be built by the same Rust toolchain as
//! kiln-capi, since both carry a standard library). This crate has no dependencies (no LLVM): the
//! compiler is the `kiln` executable.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The bindings written to `$OUT_DIR/kiln_model.rs`; `@WEIGHTS@` becomes the weights path.
const BINDINGS: &str = include_str!("bindings.rs.in");

/// Starts configuring the compile of `model` (a .gguf file or a Hugging Face directory).
pub fn compile(model: impl AsRef<Path>) -> Builder {
    Builder {
        model: model.as_ref().to_path_buf(),
        passes: Vec::new(),
        target: None,
        opt_level: None,
        kiln: None,
        out_dir: None,
        static_link: false,
    }
}

/// A configured compile; see [`compile`].
#[derive(Clone, Debug)]
pub struct Builder {
    model: PathBuf,
    passes: Vec<String>,
    target: Option<String>,
    opt_level: Option<u8>,
    kiln: Option<PathBuf>,
    out_dir: Option<PathBuf>,
    static_link: bool,
}

/// What [`Builder::run`] produced.
#[derive(Clone, Debug)]
pub struct Output {
    /// The directory holding the libraries, header, weights and manifest.
    pub dir: PathBuf,
    /// The weights file the generated bindings load by default.
    pub weights: PathBuf,
    /// The generated bindings (`$OUT_DIR/kiln_model.rs`).
    pub bindings: PathBuf,
}

/// Why a build-time compile failed.
#[derive(Debug)]
pub enum Error {
    /// No `kiln` executable: neither `$KILN` nor `PATH` has one.
    KilnNotFound(String),
    /// The model path does not exist.
    ModelNotFound(PathBuf),
    /// `OUT_DIR` is not set (not running inside a build script) and no [`Builder::out_dir`] was given.
    NoOutDir,
    /// `kiln compile` failed; its stderr.
    Compile {
        command: String,
        stderr: String,
    },
    Io(PathBuf, std::io::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::KilnNotFound(why) => write!(
                f,
                "kiln-build: the kiln executable was not found ({why}); set KILN=/path/to/kiln or put kiln on \
                 PATH (cargo build --release -p kiln -p kiln-capi builds it with its runtime library)"
            ),
            Error::ModelNotFound(p) => write!(f, "kiln-build: model {} does not exist", p.display()),
            Error::NoOutDir => write!(f, "kiln-build: OUT_DIR is not set; call it from build.rs or give out_dir()"),
            Error::Compile { command, stderr } => write!(f, "kiln-build: `{command}` failed:\n{}", stderr.trim()),
            Error::Io(p, e) => write!(f, "kiln-build: {}: {e}", p.display()),
        }
    }
}

impl std::error::Error for Error {}

impl Builder {
    /// Graph passes to run before code generation, in order (e.g. `["cse", "dce"]`).
    pub fn passes(mut self, passes: &[&str]) -> Self {
        self.passes = passes.iter().map(|s| s.to_string()).collect();
        self
    }

    /// The code generation target; `cpu` (the default: the building machine) is the only one a runnable
    /// library can be made for.
    pub fn target(mut self, target: &str) -> Self {
        self.target = Some(target.to_string());
        self
    }

    /// LLVM optimisation level, 0-3 (default 3).
    pub fn opt_level(mut self, level: u8) -> Self {
        self.opt_level = Some(level);
        self
    }

    /// The kiln executable to use instead of `$KILN` / `PATH`.
    pub fn kiln(mut self, path: impl AsRef<Path>) -> Self {
        self.kiln = Some(path.as_ref().to_path_buf());
        self
    }

    /// Link the static library instead of the shared one (see the crate docs).
    pub fn static_link(mut self, yes: bool) -> Self {
        self.static_link = yes;
        self
    }

    /// Where to write (default: `$OUT_DIR`).
    pub fn out_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.out_dir = Some(dir.as_ref().to_path_buf());
        self
    }

    /// The `kiln` executable: [`Builder::kiln`], else `$KILN`, else `kiln` on `PATH`.
    pub fn find_kiln(&self) -> Result<PathBuf, Error> {
        if let Some(k) = &self.kiln {
            return if k.is_file() {
                Ok(k.clone())
            } else {
                Err(Error::KilnNotFound(format!("{} is not a file", k.display())))
            };
        }
        if let Some(k) = std::env::var_os("KILN") {
            let k = PathBuf::from(k);
            return if k.is_file() {
                Ok(k)
            } else {
                Err(Error::KilnNotFound(format!("KILN={} is not a file", k.display())))
            };
        }
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .map(|d| d.join("kiln"))
            .find(|p| p.is_file())
            .ok_or_else(|| Error::KilnNotFound("KILN is not set and PATH has no kiln".into()))
    }

    /// The model's files whose change must rerun the build script.
    fn inputs(&self) -> Result<Vec<PathBuf>, Error> {
        if !self.model.exists() {
            return Err(Error::ModelNotFound(self.model.clone()));
        }
        if !self.model.is_dir() {
            return Ok(vec![self.model.clone()]);
        }
        let mut v = vec![self.model.clone()];
        let entries = std::fs::read_dir(&self.model).map_err(|e| Error::Io(self.model.clone(), e))?;
        for e in entries {
            let p = e.map_err(|e| Error::Io(self.model.clone(), e))?.path();
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            if name.ends_with(".json") || name.ends_with(".safetensors") {
                v.push(p);
            }
        }
        v.sort();
        Ok(v)
    }

    /// Compiles, writes the bindings and prints the cargo directives.
    pub fn run(self) -> Result<Output, Error> {
        let (out, directives) = self.run_quiet()?;
        for d in directives {
            println!("{d}");
        }
        Ok(out)
    }

    /// [`Builder::run`] without printing: returns the `cargo:` directives instead.
    pub fn run_quiet(self) -> Result<(Output, Vec<String>), Error> {
        let inputs = self.inputs()?;
        let kiln = self.find_kiln()?;
        let out_dir = match &self.out_dir {
            Some(d) => d.clone(),
            None => PathBuf::from(std::env::var_os("OUT_DIR").ok_or(Error::NoOutDir)?),
        };
        let dir = out_dir.join("kiln_model");
        let mut cmd = Command::new(&kiln);
        cmd.arg("compile").arg(&self.model).args(["--emit", "lib", "-o"]).arg(&dir);
        if !self.passes.is_empty() {
            cmd.arg("--passes").arg(self.passes.join(","));
        }
        if let Some(t) = &self.target {
            cmd.arg("--target").arg(t);
        }
        if let Some(o) = self.opt_level {
            cmd.arg(format!("-O{o}"));
        }
        let command = format!("{cmd:?}");
        let res = cmd.output().map_err(|e| Error::Io(kiln.clone(), e))?;
        if !res.status.success() {
            return Err(Error::Compile { command, stderr: String::from_utf8_lossy(&res.stderr).into_owned() });
        }
        let weights = dir.join("weights.bin");
        let bindings = out_dir.join("kiln_model.rs");
        let weights_lit = format!("{:?}", weights.to_string_lossy());
        std::fs::write(&bindings, BINDINGS.replace("\"@WEIGHTS@\"", &weights_lit))
            .map_err(|e| Error::Io(bindings.clone(), e))?;

        let mut directives = Vec::new();
        for p in inputs {
            directives.push(format!("cargo:rerun-if-changed={}", p.display()));
        }
        directives.push(format!("cargo:rerun-if-changed={}", kiln.display()));
        directives.push("cargo:rerun-if-env-changed=KILN".into());
        directives.push(format!("cargo:rustc-link-search=native={}", dir.display()));
        if self.static_link {
            directives.push("cargo:rustc-link-lib=static=kiln_model".into());
            for lib in ["pthread", "dl", "m"] {
                directives.push(format!("cargo:rustc-link-lib=dylib={lib}"));
            }
        } else {
            directives.push("cargo:rustc-link-lib=dylib=kiln_model".into());
            directives.push(format!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display()));
        }
        Ok((Output { dir, weights, bindings }, directives))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bindings_declare_every_function_of_the_header() {
        let header = include_str!("../../capi/include/kiln_model.h");
        // Declarations: lines (outside comments) with `kiln_name(`.
        let mut declared = Vec::new();
        for line in header.lines().filter(|l| !l.trim_start().starts_with('*') && !l.trim_start().starts_with("/*")) {
            for (i, _) in line.match_indices("kiln_") {
                let name: String = line[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                if line[i + name.len()..].starts_with('(') {
                    declared.push(name);
                }
            }
        }
        assert!(declared.len() >= 15, "{declared:?}");
        for f in declared {
            assert!(BINDINGS.contains(&format!("fn {f}(")), "bindings.rs.in does not declare {f}");
        }
        let version = header.lines().find_map(|l| l.strip_prefix("#define KILN_ABI_VERSION ")).unwrap();
        assert!(BINDINGS.contains(&format!("pub const ABI_VERSION: u32 = {version};")), "ABI version differs");
    }

    /// A stand-in `kiln` that records its arguments (or fails with a message).
    fn fake_kiln(dir: &Path, fail: bool) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join(if fail { "kiln-failing" } else { "kiln" });
        let body = if fail {
            "echo 'error: model is broken' >&2; exit 1".to_string()
        } else {
            // compile MODEL --emit lib -o DIR ...
            "mkdir -p \"$6\" && echo \"$@\" > \"$6/args\"".to_string()
        };
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[test]
    fn runs_kiln_with_the_options_and_prints_link_and_rerun_directives() {
        let dir = std::env::temp_dir().join(format!("kiln-build-run-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let model = dir.join("m.gguf");
        std::fs::write(&model, b"x").unwrap();
        let kiln = fake_kiln(&dir, false);
        let b = compile(&model).passes(&["cse", "dce"]).target("cpu").opt_level(2).kiln(&kiln).out_dir(&dir);
        let (out, directives) = b.clone().run_quiet().unwrap();
        let args = std::fs::read_to_string(out.dir.join("args")).unwrap();
        assert_eq!(
            args.trim(),
            format!(
                "compile {} --emit lib -o {} --passes cse,dce --target cpu -O2",
                model.display(),
                out.dir.display()
            )
        );
        let has = |d: &str| directives.iter().any(|x| x == d);
        assert!(has(&format!("cargo:rerun-if-changed={}", model.display())), "{directives:?}");
        assert!(has(&format!("cargo:rerun-if-changed={}", kiln.display())), "{directives:?}");
        assert!(has(&format!("cargo:rustc-link-search=native={}", out.dir.display())), "{directives:?}");
        assert!(has("cargo:rustc-link-lib=dylib=kiln_model"), "{directives:?}");
        assert!(has(&format!("cargo:rustc-link-arg=-Wl,-rpath,{}", out.dir.display())), "{directives:?}");
        let bindings = std::fs::read_to_string(&out.bindings).unwrap();
        assert!(bindings.contains(&format!("pub const WEIGHTS: &str = {:?};", out.weights.to_string_lossy())));
        let (_, directives) = b.static_link(true).run_quiet().unwrap();
        assert!(directives.iter().any(|x| x == "cargo:rustc-link-lib=static=kiln_model"), "{directives:?}");
        assert!(!directives.iter().any(|x| x.contains("rpath")), "{directives:?}");
        let e = compile(&model).kiln(fake_kiln(&dir, true)).out_dir(&dir).run_quiet().unwrap_err();
        assert!(e.to_string().contains("model is broken"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_kiln_and_model_are_clear_errors() {
        let dir = std::env::temp_dir();
        let e =
            compile(dir.join("no-such-model.gguf")).kiln("/nonexistent/kiln").out_dir(&dir).run_quiet().unwrap_err();
        assert!(e.to_string().contains("no-such-model.gguf"), "{e}");
        let model = dir.join(format!("kiln-build-test-{}.gguf", std::process::id()));
        std::fs::write(&model, b"x").unwrap();
        let e = compile(&model).kiln("/nonexistent/kiln").out_dir(&dir).run_quiet().unwrap_err();
        std::fs::remove_file(&model).unwrap();
        assert!(e.to_string().contains("/nonexistent/kiln") && e.to_string().contains("KILN="), "{e}");
    }
}
