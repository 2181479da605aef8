//! `kiln run --tp N`: starting the ranks (re-executing under `mpirun`), the rank's communicator, and
//! recording what generation communicated and which logits it chose from.

use anyhow::{bail, Context, Result};
use kiln::runtime::dist::{CommStats, Counting};
use kiln::runtime::{Backend, Logits, RuntimeError};
use std::sync::Arc;

/// This process's place in a tensor-parallel group.
pub struct Dist {
    pub rank: usize,
    pub comm: Arc<Counting>,
    /// MPI, kept alive (and finalised when dropped) when another communicator does the collectives.
    _mpi: Option<Box<dyn std::any::Any>>,
}

/// Whether mpirun (OpenMPI) started this process.
fn under_mpirun() -> bool {
    std::env::var_os("OMPI_COMM_WORLD_SIZE").is_some()
}

/// For `--tp 1`: nothing. Otherwise, outside mpirun: runs `mpirun -np N` on this very command line and
/// exits with its status (this call does not return); inside: initialises MPI and returns the rank.
pub fn setup(tp: usize, comm: CommKind) -> Result<Option<Dist>> {
    if tp == 0 {
        bail!("--tp 0: at least one rank is needed");
    }
    if tp == 1 {
        return Ok(None);
    }
    if !under_mpirun() {
        let exe = std::env::current_exe().context("finding the kiln executable to start under mpirun")?;
        let status = std::process::Command::new("mpirun")
            .args(["--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "--mca", "mpi_yield_when_idle", "1"])
            .args(["-np", &tp.to_string()])
            .arg(exe)
            .args(std::env::args_os().skip(1))
            .status()
            .map_err(|e| {
                anyhow::anyhow!("--tp {tp} starts its ranks with mpirun, which could not be run ({e}); install OpenMPI (apt-get install openmpi-bin)")
            })?;
        std::process::exit(status.code().unwrap_or(1));
    }
    rank_communicator(tp, comm)
}

/// How the ranks communicate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CommKind {
    /// OpenMPI between the CPU processes.
    Mpi,
    /// NCCL between GPUs (one per rank), through cudarc; the tensors are copied to the GPU and back.
    Nccl,
}

#[cfg(feature = "mpi")]
fn rank_communicator(tp: usize, kind: CommKind) -> Result<Option<Dist>> {
    use kiln::runtime::dist::{Collective, MpiCollective};
    let c = MpiCollective::init().map_err(anyhow::Error::msg)?;
    if c.world() != tp {
        bail!("--tp {tp} but mpirun started {} ranks", c.world());
    }
    let rank = c.rank();
    let (inner, mpi): (Arc<dyn Collective>, Option<Box<dyn std::any::Any>>) = match kind {
        CommKind::Mpi => (Arc::new(c), None),
        CommKind::Nccl => {
            let n = nccl(&c)?;
            (n, Some(Box::new(c)))
        }
    };
    Ok(Some(Dist { rank, comm: Arc::new(Counting::new(inner)), _mpi: mpi }))
}

/// NCCL over the ranks MPI started: rank 0 makes the NCCL id and broadcasts it.
#[cfg(all(feature = "mpi", feature = "nccl"))]
fn nccl(c: &kiln::runtime::dist::MpiCollective) -> Result<Arc<dyn kiln::runtime::dist::Collective>> {
    use kiln::runtime::dist::nccl::{available, unique_id, NcclCollective};
    use kiln::runtime::dist::Collective;
    // Every rank checks, and all agree, before any waits on another in NCCL.
    let ok = available();
    let mut failed = [if ok.is_err() { 1.0 } else { 0.0 }];
    c.all_reduce(&mut failed).map_err(anyhow::Error::msg)?;
    ok.map_err(|e| anyhow::anyhow!("--comm nccl: {e}"))?;
    if failed[0] > 0.0 {
        bail!("--comm nccl: another rank cannot use NCCL");
    }
    let mut id: Vec<u32> = if c.rank() == 0 {
        unique_id().map_err(anyhow::Error::msg)?.iter().map(|&b| b as u32).collect()
    } else {
        Vec::new()
    };
    c.broadcast_u32(&mut id);
    let bytes: [u8; 128] = std::array::from_fn(|i| id[i] as u8);
    let n = NcclCollective::new(c.rank(), c.world(), bytes).map_err(|e| anyhow::anyhow!("--comm nccl: {e}"))?;
    Ok(Arc::new(n))
}

#[cfg(all(feature = "mpi", not(feature = "nccl")))]
fn nccl(_: &kiln::runtime::dist::MpiCollective) -> Result<Arc<dyn kiln::runtime::dist::Collective>> {
    bail!("--comm nccl: this kiln was built without NCCL (cargo feature `nccl`)")
}

#[cfg(not(feature = "mpi"))]
fn rank_communicator(tp: usize, _: CommKind) -> Result<Option<Dist>> {
    bail!("--tp {tp}: this kiln was built without MPI (cargo feature `mpi`)")
}

/// Wraps the backend generation runs on: keeps the last logits row of each step (for `--logits-out`)
/// and what each step communicated.
pub struct Recorder<'a> {
    inner: &'a mut dyn Backend,
    comm: Option<Arc<Counting>>,
    keep_rows: bool,
    pub rows: Vec<Vec<f32>>,
    /// Per step: tokens, communication during it.
    steps: Vec<(usize, CommStats)>,
}

impl<'a> Recorder<'a> {
    pub fn new(inner: &'a mut dyn Backend, comm: Option<Arc<Counting>>, keep_rows: bool) -> Self {
        Recorder { inner, comm, keep_rows, rows: Vec::new(), steps: Vec::new() }
    }

    /// Per-step communication: the prefill step, and the mean of the decode steps.
    pub fn comm_report(&self) -> serde_json::Value {
        let total = self.comm.as_ref().map(|c| c.stats()).unwrap_or_default();
        let step = |s: &CommStats, n: f64| {
            serde_json::json!({
                "bytes": s.bytes as f64 / n,
                "calls": s.calls as f64 / n,
                "ms": s.time.as_secs_f64() * 1e3 / n,
            })
        };
        let mut decode = CommStats::default();
        for (_, s) in self.steps.iter().skip(1) {
            decode.bytes += s.bytes;
            decode.calls += s.calls;
            decode.time += s.time;
        }
        let nd = self.steps.len().saturating_sub(1).max(1) as f64;
        serde_json::json!({
            "bytes": total.bytes,
            "calls": total.calls,
            "ms": total.time.as_secs_f64() * 1e3,
            "prefill": self.steps.first().map(|(_, s)| step(s, 1.0)),
            "decode_step": step(&decode, nd),
        })
    }
}

impl Backend for Recorder<'_> {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }
    fn context_length(&self) -> usize {
        self.inner.context_length()
    }
    fn position(&self) -> usize {
        self.inner.position()
    }
    fn reset(&mut self) {
        self.inner.reset()
    }
    fn output(&self, name: &str) -> Option<&[f32]> {
        self.inner.output(name)
    }
    fn state(&self, name: &str) -> Option<&[f32]> {
        self.inner.state(name)
    }
    fn sequence(&self) -> kiln::runtime::SeqId {
        self.inner.sequence()
    }
    fn select(&mut self, seq: kiln::runtime::SeqId) -> Result<(), RuntimeError> {
        self.inner.select(seq)
    }
    fn release(&mut self, seq: kiln::runtime::SeqId) {
        self.inner.release(seq)
    }
    fn forward(&mut self, tokens: &[u32]) -> Result<Logits, RuntimeError> {
        let before = self.comm.as_ref().map(|c| c.stats()).unwrap_or_default();
        let l = self.inner.forward(tokens)?;
        let after = self.comm.as_ref().map(|c| c.stats()).unwrap_or_default();
        self.steps.push((
            tokens.len(),
            CommStats {
                calls: after.calls - before.calls,
                bytes: after.bytes - before.bytes,
                time: after.time - before.time,
            },
        ));
        if self.keep_rows {
            self.rows.push(l.last().to_vec());
        }
        Ok(l)
    }
}
