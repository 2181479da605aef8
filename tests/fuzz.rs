//! Mutation fuzzing of the model readers (a stable-toolchain stand-in for cargo fuzz): seeded random
//! byte flips, truncations and insertions of valid files, bounded in time; the readers must return
//! (Ok or Err) and never panic. The GGUF reader has a deeper fuzz test of its own in `frontend`.

use crate::common::{random_weights, tiny_config};
use kiln::frontend::export::{write_gguf, write_hf};
use kiln::frontend::{Arch, Model};
use kiln::ir::DType;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::time::{Duration, Instant};

fn mutate(rng: &mut StdRng, data: &[u8]) -> Vec<u8> {
    let mut b = data.to_vec();
    for _ in 0..rng.random_range(1..8) {
        match rng.random_range(0..5) {
            0 if !b.is_empty() => {
                let i = rng.random_range(0..b.len());
                b[i] ^= 1 << rng.random_range(0..8);
            }
            1 if !b.is_empty() => {
                // Header-heavy: most interesting bytes are near the start.
                let i = rng.random_range(0..b.len().min(512));
                b[i] = rng.random();
            }
            2 => {
                let n = rng.random_range(0..=b.len());
                b.truncate(n);
            }
            3 => {
                let i = rng.random_range(0..=b.len().min(512));
                let v: [u8; 8] = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, rng.random()];
                b.splice(i..i, v);
            }
            _ if b.len() >= 8 => {
                let i = rng.random_range(0..b.len().min(512) - 7);
                b[i..i + 8].copy_from_slice(&rng.random::<u64>().to_le_bytes());
            }
            _ => {}
        }
    }
    b
}

fn fuzz_file(path: &std::path::Path, load: impl Fn() -> bool, budget: Duration, seed: u64) -> (usize, usize) {
    let original = std::fs::read(path).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let start = Instant::now();
    let (mut runs, mut accepted) = (0, 0);
    while start.elapsed() < budget {
        let case = mutate(&mut rng, &original);
        std::fs::write(path, &case).unwrap();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(&load));
        match r {
            Ok(ok) => accepted += ok as usize,
            Err(_) => {
                let keep = std::env::temp_dir().join(format!("kiln-fuzz-crash-{seed}-{runs}"));
                std::fs::write(&keep, &case).unwrap();
                panic!("reader panicked on mutated {} (saved to {})", path.display(), keep.display());
            }
        }
        runs += 1;
    }
    std::fs::write(path, &original).unwrap();
    (runs, accepted)
}

#[test]
fn gguf_model_loader_survives_mutations() {
    let cfg = tiny_config(Arch::Qwen2);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    write_gguf(&p, "tiny", &cfg, &random_weights(&cfg, DType::F16, 1), None).unwrap();
    let (runs, _) = fuzz_file(&p, || Model::load(&p).and_then(|m| m.graph()).is_ok(), Duration::from_secs(3), 1);
    assert!(runs > 100, "only {runs} runs");
}

#[test]
fn safetensors_model_loader_survives_mutations() {
    let cfg = tiny_config(Arch::Llama);
    let dir = tempfile::tempdir().unwrap();
    write_hf(dir.path(), &cfg, &random_weights(&cfg, DType::BF16, 1), 1).unwrap();
    let st = dir.path().join("model.safetensors");
    let d = dir.path().to_path_buf();
    let (runs, _) = fuzz_file(&st, || Model::load(&d).and_then(|m| m.graph()).is_ok(), Duration::from_secs(3), 2);
    assert!(runs > 100, "only {runs} runs");
    let cfgp = dir.path().join("config.json");
    let (runs, _) = fuzz_file(&cfgp, || Model::load(&d).is_ok(), Duration::from_secs(2), 3);
    assert!(runs > 100, "only {runs} runs");
}
