//! Kiln's facade: the crates under one name. The library behind the CLI is `kiln-driver`, re-exported
//! here module by module so `kiln::artifact`, `kiln::eval`, … name the same items.

pub use kiln_codegen as codegen;
pub use kiln_driver as driver;
pub use kiln_frontend as frontend;
pub use kiln_ir as ir;
pub use kiln_passes as passes;
pub use kiln_runtime as runtime;

pub use kiln_driver::{
    aot, artifact, budget, budgeted, cache_dir, calibrate, costs, default_model_path, eval, kernel_table, options,
    quality, DEFAULT_MODEL_FILE,
};
