//! Compiles the model into this program: $KILN_EMBED_MODEL, else the default model in Kiln's cache;
//! linked as a shared library, or statically with KILN_EMBED_STATIC=1.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=KILN_EMBED_MODEL");
    println!("cargo:rerun-if-env-changed=KILN_EMBED_STATIC");
    let static_link = std::env::var("KILN_EMBED_STATIC").is_ok_and(|v| v == "1");
    let model = match std::env::var_os("KILN_EMBED_MODEL") {
        Some(p) => PathBuf::from(p),
        None => {
            let cache = std::env::var_os("KILN_CACHE_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/kiln"));
            cache.join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
        }
    };
    if let Err(e) = kiln_build::compile(&model).passes(&["cse", "dce"]).target("cpu").static_link(static_link).run() {
        eprintln!("{e}");
        std::process::exit(1);
    }
}
