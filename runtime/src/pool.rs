//! A small spinning thread pool for the compiled backend's launches.
//!
//! A decode step is ~150 parallel launches of 20-100 µs each; waking sleeping threads for each (futex
//! round trips, as a general-purpose pool does once its workers go idle) costs a measurable share of the
//! step. Here workers spin on a generation counter while a step runs, so a launch starts within
//! nanoseconds, and back off to short sleeps once idle for a while, so an idle process does not burn CPU.
//!
//! Spinning assumes every thread has a core. When the machine is oversubscribed (more runnable threads
//! than cores: other processes, several ranks on one machine), a spinning thread can hold the core the
//! thread it waits for needs, and a step slows by an order of magnitude. So every waiting loop also
//! yields its core to the scheduler every [`YIELD_EVERY`] spins: a `sched_yield` that returns at once
//! when no other thread wants the core, and lets the one being waited for run when one does.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

type Task = dyn Fn(usize) + Sync;

struct Shared {
    /// The current task; written by the owner only while every worker is waiting on `generation`.
    task: UnsafeCell<Option<*const Task>>,
    generation: AtomicU64,
    finished: AtomicUsize,
    stop: AtomicBool,
}

// SAFETY: `task` is written by the owning thread before a Release increment of `generation` and read by
// workers after the matching Acquire load; the owner waits for every worker before it changes it again.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

pub struct SpinPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

/// How long an idle worker spins before it starts sleeping between checks.
const SPIN_FOR: Duration = Duration::from_millis(2);

/// Spins between yields of the core (see the module docs).
const YIELD_EVERY: u32 = 64;

/// One iteration of a wait loop: a spin hint, or every `YIELD_EVERY`-th time a yield of the core.
fn relax(spins: &mut u32) {
    *spins = spins.wrapping_add(1);
    if spins.is_multiple_of(YIELD_EVERY) {
        std::thread::yield_now();
    } else {
        std::hint::spin_loop();
    }
}

impl SpinPool {
    /// A pool running tasks on `threads` threads in all: the caller plus `threads - 1` workers.
    pub fn new(threads: usize) -> std::io::Result<SpinPool> {
        let shared = Arc::new(Shared {
            task: UnsafeCell::new(None),
            generation: AtomicU64::new(0),
            finished: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        });
        let mut workers = Vec::new();
        for index in 1..threads.max(1) {
            let s = shared.clone();
            workers.push(
                std::thread::Builder::new().name(format!("kiln-worker-{index}")).spawn(move || worker(&s, index))?,
            );
        }
        Ok(SpinPool { shared, workers })
    }

    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `task(i)` for every thread index `i` in `0..threads()`, the caller taking index 0, and returns
    /// when all have finished.
    pub fn run<'a>(&self, task: &'a (dyn Fn(usize) + Sync + 'a)) {
        if self.workers.is_empty() {
            task(0);
            return;
        }
        // SAFETY: workers only dereference the pointer between the generation bump below and their
        // `finished` increment, and we do not return before all of them have incremented it.
        let erased: *const Task =
            unsafe { std::mem::transmute::<&'a (dyn Fn(usize) + Sync + 'a), &'static Task>(task) };
        unsafe { *self.shared.task.get() = Some(erased) };
        self.shared.finished.store(0, Ordering::Relaxed);
        self.shared.generation.fetch_add(1, Ordering::Release);
        task(0);
        let mut spins = 0;
        while self.shared.finished.load(Ordering::Acquire) < self.workers.len() {
            relax(&mut spins);
        }
    }
}

fn worker(s: &Shared, index: usize) {
    // Generation 0 is the state at creation, before any task: a worker that starts late must still run
    // the first task, so it must not read the counter as its starting point.
    let mut seen = 0;
    loop {
        let idle_since = Instant::now();
        let mut spins = 0u32;
        loop {
            if s.stop.load(Ordering::Relaxed) {
                return;
            }
            let g = s.generation.load(Ordering::Acquire);
            if g != seen {
                seen = g;
                break;
            }
            if spins.is_multiple_of(1024) && idle_since.elapsed() > SPIN_FOR {
                std::thread::sleep(Duration::from_micros(100));
            }
            relax(&mut spins);
        }
        // SAFETY: see `Shared`; the task stays alive until we report finished.
        if let Some(task) = unsafe { *s.task.get() } {
            unsafe { (*task)(index) };
        }
        s.finished.fetch_add(1, Ordering::Release);
    }
}

impl Drop for SpinPool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_index_runs_once_per_call() {
        let pool = SpinPool::new(3).unwrap();
        let hits: Vec<AtomicUsize> = (0..3).map(|_| AtomicUsize::new(0)).collect();
        for _ in 0..1000 {
            pool.run(&|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
        }
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1000));
    }
}
