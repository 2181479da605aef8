//! Compiles the model into this program: $KILN_EMBED_MODEL, else the default model in Kiln's cache.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=KILN_EMBED_MODEL");
    let model = match std::env::var_os("KILN_EMBED_MODEL") {
        Some(p) => PathBuf::from(p),
        None => {
            let cache = std::env::var_os("KILN_CACHE_DIR").map(PathBuf::from).unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/kiln")
            });
            cache.join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
        }
    };
    if let Err(e) = kiln_build::compile(&model).passes(&["cse", "dce"]).target("cpu").run() {
        eprintln!("{e}");
        std::process::exit(1);
    }
}
