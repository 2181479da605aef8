//! Measured cost coefficients for the e-graph extraction of the `lift` pass: nanoseconds per byte
//! moved and per flop on this machine, cached in the Kiln cache directory
//! (`cost-model/<arch>-<version>.json`) so they are measured once.
//!
//! Bytes: a single-threaded streaming sum over 64 MiB (what a memory-bound kernel does, like a decode
//! GEMV). Flops: 64 independent multiply-add lanes in registers (a compute-bound inner loop). Both
//! take the best of a few runs. Launches: an empty task dispatched through the runtime's worker pool
//! ([`kiln_runtime::pool::SpinPool`]) on every hardware thread, as each kernel launch of a compiled
//! program is — the fixed cost a fused kernel saves per launch it removes.

use kiln_passes::egraph::cost::CostCoefficients;
use std::hint::black_box;
use std::path::PathBuf;
use std::time::Instant;

/// Bumped when what is measured changes, so cached coefficients from an older method are re-measured.
const METHOD: u32 = 2;

fn cache_file() -> PathBuf {
    crate::cache_dir().join("cost-model").join(format!(
        "{}-{}-m{METHOD}.json",
        std::env::consts::ARCH,
        env!("CARGO_PKG_VERSION")
    ))
}

/// The coefficients for this machine: from the cache, else measured now (≈0.3 s) and cached. A cache
/// that cannot be read or written is re-measured, never an error.
pub fn coefficients() -> CostCoefficients {
    let path = cache_file();
    if let Some(c) = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice::<CostCoefficients>(&b).ok()) {
        return c;
    }
    let c = measure();
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
        let _ = std::fs::write(&path, serde_json::to_vec_pretty(&c).expect("coefficients serialise"));
    }
    c
}

/// Times the three loops (best of 3 each).
pub fn measure() -> CostCoefficients {
    let buf = vec![1.0f32; 16 << 20];
    let mut best_bytes = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        let mut acc = [0f32; 16];
        for chunk in black_box(&buf).chunks_exact(16) {
            for (a, x) in acc.iter_mut().zip(chunk) {
                *a += x;
            }
        }
        black_box(acc);
        best_bytes = best_bytes.min(t.elapsed().as_nanos() as f64 / (buf.len() * 4) as f64);
    }
    // 64 independent lanes, so the loop measures throughput (vector multiply-adds), not the latency
    // of one dependency chain.
    let iters = 2_000_000u64;
    let mut best_flop = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        let mut v = black_box([1.0f32; 64]);
        let (m, a) = black_box((0.999_999f32, 1e-7f32));
        for _ in 0..iters {
            for x in v.iter_mut() {
                *x = *x * m + a;
            }
        }
        black_box(v);
        best_flop = best_flop.min(t.elapsed().as_nanos() as f64 / (iters * 64 * 2) as f64);
    }
    CostCoefficients {
        target: format!("{}-cpu measured", std::env::consts::ARCH),
        ns_per_byte: best_bytes,
        ns_per_flop: best_flop,
        ns_per_launch: measure_launch(threads()).unwrap_or(CostCoefficients::default().ns_per_launch),
    }
}

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Nanoseconds per empty launch through a worker pool of `threads` threads (best of 3 runs of 2,000
/// launches, after a warm-up that lets the workers start spinning); `None` when no thread can start.
pub fn measure_launch(threads: usize) -> Option<f64> {
    let pool = kiln_runtime::pool::SpinPool::new(threads).ok()?;
    let task = |i: usize| {
        black_box(i);
    };
    for _ in 0..200 {
        pool.run(&task);
    }
    let launches = 2_000u32;
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..launches {
            pool.run(&task);
        }
        best = best.min(t.elapsed().as_nanos() as f64 / launches as f64);
    }
    Some(best)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_cost_is_measured_and_positive() {
        // Not a timing threshold: only that the measurement ran and produced a usable coefficient.
        for threads in [1, 2] {
            let ns = measure_launch(threads).expect("pool starts");
            assert!(ns.is_finite() && ns > 0.0, "{threads} threads: {ns}");
        }
    }
}
