//! Code for embedding: one relocatable object holding the kernels, the manifest and a kernel table, for
//! `kiln compile --emit lib|obj`.
//!
//! The object defines the descriptor and `kiln_model_create` described at
//! [`kiln_ir::program::C_ABI_VERSION`]; `kiln_model_create` hands the descriptor to `kiln-capi`, whose
//! runtime resolves each launch's kernel through the table instead of `dlopen`. The manifest is the one
//! written beside it (`manifest.json`), so the library knows the weights' size and hash and the CPU
//! features its code needs, and checks both when a model is created.

use crate::artifact::{io_err, make_manifest, write_manifest, write_weights};
use crate::cpu::{emit_kernels, optimize_for};
use crate::lower::lower;
use crate::{host_target_info, llvm, ArtifactInfo, CodegenError, CompileOptions};
use inkwell::context::Context;
use inkwell::module::{Linkage, Module};
use inkwell::targets::{TargetMachine, TargetTriple};
use inkwell::values::BasicValueEnum;
use inkwell::AddressSpace;
use kiln_ir::program::{Manifest, TargetInfo, C_ABI_VERSION, EMBEDDED_LIBRARY};
use kiln_ir::{Graph, WeightStore};
use std::path::Path;

/// What machine the code is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetSpec {
    /// This machine: its exact CPU and every feature it has (the code runs here).
    Host,
    /// An LLVM triple and CPU name (`generic` when not given), e.g. `aarch64-unknown-linux-gnu:cortex-a76`.
    Cross { triple: String, cpu: String },
}

impl TargetSpec {
    /// Parses `cpu` (the host) or `TRIPLE[:CPU]`.
    pub fn parse(s: &str) -> Result<TargetSpec, CodegenError> {
        if s == "cpu" || s == "host" {
            return Ok(TargetSpec::Host);
        }
        let (triple, cpu) = s.split_once(':').unwrap_or((s, "generic"));
        if triple.split('-').count() < 2 || triple.is_empty() || cpu.is_empty() {
            return Err(CodegenError::InvalidSpec(format!(
                "target `{s}`: expected `cpu` (this machine) or TRIPLE[:CPU], e.g. aarch64-unknown-linux-gnu:cortex-a76"
            )));
        }
        Ok(TargetSpec::Cross { triple: triple.to_string(), cpu: cpu.to_string() })
    }

    /// A target machine and the description the manifest records. For the x86-64 psABI levels the
    /// checked features are known ([`x86_64_level_features`]); other cross targets record none (LLVM
    /// derives them from the CPU name, and the code does not run on the compiling machine).
    fn machine(&self) -> Result<(TargetMachine, TargetInfo), CodegenError> {
        match self {
            TargetSpec::Host => Ok((llvm::host_target_machine()?, host_target_info())),
            TargetSpec::Cross { triple, cpu } => {
                let tm = llvm::target_machine(&TargetTriple::create(triple), cpu, "")?;
                let features = x86_64_level_features(triple, cpu).unwrap_or_default();
                let features = features.iter().map(|f| f.to_string()).collect();
                Ok((tm, TargetInfo { triple: triple.clone(), cpu: cpu.clone(), features }))
            }
        }
    }

    /// Whether code for this target runs on this machine and the runtime can check its CPU features: the
    /// host, or an x86-64 psABI level (`x86-64`, `x86-64-v2` … `-v4`) for Linux on an x86-64 Linux host
    /// (portable libraries).
    pub fn runs_here(&self) -> bool {
        match self {
            TargetSpec::Host => true,
            TargetSpec::Cross { triple, cpu } => {
                cfg!(all(target_arch = "x86_64", target_os = "linux")) && x86_64_level_features(triple, cpu).is_some()
            }
        }
    }
}

/// The features of [`kiln_ir::program::CHECKED_CPU_FEATURES`] an x86-64 psABI level implies, for
/// `x86_64-*-linux-*` triples; `None` for any other target or CPU name.
pub fn x86_64_level_features(triple: &str, cpu: &str) -> Option<&'static [&'static str]> {
    if !(triple.starts_with("x86_64-") && triple.contains("-linux")) {
        return None;
    }
    const V3: &[&str] = &["sse4.2", "avx", "avx2", "fma", "f16c", "bmi2"];
    const V4: &[&str] =
        &["sse4.2", "avx", "avx2", "fma", "f16c", "bmi2", "avx512f", "avx512bw", "avx512vl", "avx512dq"];
    match cpu {
        "x86-64" => Some(&[]),
        "x86-64-v2" => Some(&["sse4.2"]),
        "x86-64-v3" => Some(V3),
        "x86-64-v4" => Some(V4),
        _ => None,
    }
}

/// Compiles `g` over `weights` for `target` into `out`: `weights.bin`, `manifest.json` (the library is
/// [`EMBEDDED_LIBRARY`]) and `kiln_model.o`, the object to link into a program or library. `vocab`, if
/// given, is each token's bytes for detokenization (embedded in the object).
pub fn compile_library_object(
    g: &Graph,
    weights: &WeightStore,
    opts: &CompileOptions,
    info: &ArtifactInfo,
    vocab: Option<&[Vec<u8>]>,
    target: &TargetSpec,
    out: &Path,
) -> Result<Manifest, CodegenError> {
    let t0 = std::time::Instant::now();
    std::fs::create_dir_all(out).map_err(|e| io_err(out, e))?;
    let (tm, target_info) = target.machine()?;
    let lowered = lower(g, weights)?;
    let (weights_len, weights_hash) = write_weights(&lowered, out)?;
    let symbols: Vec<String> = lowered.kernels.iter().map(|k| k.symbol()).collect();
    let ctx = Context::create();
    let module = ctx.create_module("kiln_model");
    emit_kernels(&ctx, &module, &lowered)?;
    let mut manifest =
        make_manifest(lowered, info, target_info, (EMBEDDED_LIBRARY, String::new()), weights_len, weights_hash);
    let json = serde_json::to_string_pretty(&manifest).expect("manifest serialises");
    emit_descriptor(&ctx, &module, json.as_bytes(), &symbols, vocab.unwrap_or_default())?;
    optimize_for(&module, opts, &tm)?;
    let obj = out.join("kiln_model.o");
    std::fs::write(&obj, llvm::emit_object(&module, &tm)?).map_err(|e| io_err(&obj, e))?;
    write_manifest(&manifest, out)?;
    manifest.compile_seconds = t0.elapsed().as_secs_f64();
    Ok(manifest)
}

/// Adds the descriptor (manifest + kernel table) and `kiln_model_create` to `module`.
fn emit_descriptor<'ctx>(
    ctx: &'ctx Context,
    module: &Module<'ctx>,
    manifest_json: &[u8],
    symbols: &[String],
    vocab: &[Vec<u8>],
) -> Result<(), CodegenError> {
    let ptr = ctx.ptr_type(AddressSpace::default());
    let (i32t, i64t) = (ctx.i32_type(), ctx.i64_type());
    let constant = |name: &str, value: BasicValueEnum<'ctx>| {
        let g = module.add_global(value.get_type(), None, name);
        g.set_initializer(&value);
        g.set_constant(true);
        g.set_linkage(Linkage::Private);
        g.as_pointer_value()
    };
    let manifest = constant("kiln_model.manifest", ctx.const_string(manifest_json, false).into());
    let mut names = Vec::new();
    let mut fns = Vec::new();
    for (i, s) in symbols.iter().enumerate() {
        let f = module
            .get_function(s)
            .ok_or_else(|| CodegenError::Llvm(format!("kernel `{s}` was not generated into the module")))?;
        names.push(constant(&format!("kiln_model.name.{i}"), ctx.const_string(s.as_bytes(), true).into()));
        fns.push(f.as_global_value().as_pointer_value());
    }
    let names = constant("kiln_model.names", ptr.const_array(&names).into());
    let fns = constant("kiln_model.kernels", ptr.const_array(&fns).into());
    let mut offsets = vec![0u32];
    let mut bytes = Vec::new();
    for t in vocab {
        bytes.extend_from_slice(t);
        let end = u32::try_from(bytes.len())
            .map_err(|_| CodegenError::InvalidSpec("vocabulary text exceeds 4 GiB".into()))?;
        offsets.push(end);
    }
    let vocab_bytes = constant("kiln_model.vocab_bytes", ctx.const_string(&bytes, false).into());
    let offsets: Vec<_> = offsets.iter().map(|&o| i32t.const_int(o as u64, false)).collect();
    let vocab_offsets = constant("kiln_model.vocab_offsets", i32t.const_array(&offsets).into());
    let descriptor = ctx.const_struct(
        &[
            i32t.const_int(C_ABI_VERSION as u64, false).into(),
            i32t.const_int(symbols.len() as u64, false).into(),
            manifest.into(),
            i64t.const_int(manifest_json.len() as u64, false).into(),
            names.into(),
            fns.into(),
            i32t.const_int(vocab.len() as u64, false).into(),
            vocab_bytes.into(),
            vocab_offsets.into(),
        ],
        false,
    );
    let descriptor = constant("kiln_model.descriptor", descriptor.into());

    // int32_t kiln_model_create(const char *weights, uint32_t threads, uint32_t context, KilnModel **out)
    let create_ty = i32t.fn_type(&[ptr.into(), i32t.into(), i32t.into(), ptr.into()], false);
    let capi_ty = i32t.fn_type(&[ptr.into(), ptr.into(), i32t.into(), i32t.into(), ptr.into()], false);
    let capi = module.add_function("kiln_capi_create_embedded", capi_ty, Some(Linkage::External));
    let create = module.add_function("kiln_model_create", create_ty, Some(Linkage::External));
    let b = ctx.create_builder();
    b.position_at_end(ctx.append_basic_block(create, "entry"));
    let p = |i| create.get_nth_param(i).expect("declared parameter");
    let r = b.build_call(capi, &[descriptor.into(), p(0).into(), p(1).into(), p(2).into(), p(3).into()], "r")?;
    let inkwell::values::ValueKind::Basic(r) = r.try_as_basic_value() else {
        return Err(CodegenError::Llvm("kiln_capi_create_embedded returns a value".into()));
    };
    b.build_return(Some(&r))?;
    Ok(())
}
