//! Communicators for tensor-parallel ranks: MPI between processes on CPUs (feature `mpi`, OpenMPI), and
//! NCCL between GPUs (feature `nccl`, through cudarc; see [`nccl`]). Both implement
//! [`kiln_ir::collective::Collective`], which the interpreter and the compiled backend call for the
//! graph's collective ops.

pub use kiln_ir::collective::{Collective, LocalGroup, SingleRank};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bytes and time a rank spent communicating.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct CommStats {
    pub calls: u64,
    /// Bytes this rank sends under ring algorithms (the usual model of MPI's and NCCL's large-message
    /// collectives): all-reduce 2(n−1)/n·S, reduce-scatter and all-gather (n−1)/n·S, for a tensor of
    /// S bytes (the whole, unsharded tensor) over n ranks.
    pub bytes: u64,
    #[serde(serialize_with = "secs")]
    pub time: Duration,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// A [`Collective`] that counts what passes through another.
pub struct Counting {
    inner: Arc<dyn Collective>,
    stats: Mutex<CommStats>,
}

impl Counting {
    pub fn new(inner: Arc<dyn Collective>) -> Counting {
        Counting { inner, stats: Mutex::new(CommStats::default()) }
    }

    pub fn stats(&self) -> CommStats {
        *self.stats.lock().unwrap()
    }

    fn count<T>(&self, whole: usize, halves: u64, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let r = f();
        let n = self.inner.world() as u64;
        let mut s = self.stats.lock().unwrap();
        s.calls += 1;
        s.bytes += halves * (n - 1) * (whole as u64 * 4) / n;
        s.time += t.elapsed();
        r
    }
}

impl Collective for Counting {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world(&self) -> usize {
        self.inner.world()
    }
    fn all_reduce(&self, data: &mut [f32]) -> Result<(), String> {
        self.count(data.len(), 2, || self.inner.all_reduce(data))
    }
    fn reduce_scatter(&self, data: &[f32], counts: &[usize], out: &mut [f32]) -> Result<(), String> {
        self.count(data.len(), 1, || self.inner.reduce_scatter(data, counts, out))
    }
    fn all_gather(&self, local: &[f32], counts: &[usize], out: &mut [f32]) -> Result<(), String> {
        self.count(out.len(), 1, || self.inner.all_gather(local, counts, out))
    }
}

/// MPI's world communicator as a [`Collective`]. Create it once per process ([`MpiCollective::init`]);
/// dropping it finalises MPI.
#[cfg(feature = "mpi")]
pub struct MpiCollective {
    world: mpi::topology::SimpleCommunicator,
    rank: usize,
    size: usize,
    // Declared last: MPI is finalised when the universe drops, after the communicator.
    _universe: mpi::environment::Universe,
}

// SAFETY: MPI is initialised with the `Funneled` threading level's guarantee in mind: collectives are
// only ever called from the thread driving the decoder step (the interpreter and the compiled backend
// call them between kernel launches, never from worker threads), one call at a time.
#[cfg(feature = "mpi")]
unsafe impl Send for MpiCollective {}
#[cfg(feature = "mpi")]
unsafe impl Sync for MpiCollective {}

#[cfg(feature = "mpi")]
impl MpiCollective {
    /// Initialises MPI (once per process; an error if it was initialised before).
    pub fn init() -> Result<MpiCollective, String> {
        use mpi::traits::Communicator;
        let universe = mpi::initialize().ok_or("MPI is already initialised in this process")?;
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        Ok(MpiCollective { world, rank, size, _universe: universe })
    }

    /// Broadcasts `data` from rank 0 to every rank (used to agree on the prompt and sampled tokens).
    pub fn broadcast_u32(&self, data: &mut Vec<u32>) {
        use mpi::traits::{Communicator, Root};
        let root = self.world.process_at_rank(0);
        let mut len = data.len() as u64;
        root.broadcast_into(&mut len);
        data.resize(len as usize, 0);
        root.broadcast_into(&mut data[..]);
    }

    /// Waits until every rank gets here.
    pub fn barrier(&self) {
        use mpi::collective::CommunicatorCollectives;
        self.world.barrier();
    }
}

#[cfg(feature = "mpi")]
impl Collective for MpiCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.size
    }
    fn all_reduce(&self, data: &mut [f32]) -> Result<(), String> {
        use mpi::collective::{CommunicatorCollectives, SystemOperation};
        let send = data.to_vec();
        self.world.all_reduce_into(&send[..], data, SystemOperation::sum());
        Ok(())
    }
    fn reduce_scatter(&self, data: &[f32], counts: &[usize], out: &mut [f32]) -> Result<(), String> {
        use mpi::collective::SystemOperation;
        use mpi::datatype::Equivalence;
        use mpi::raw::AsRaw;
        if counts.len() != self.size || counts.iter().sum::<usize>() != data.len() || out.len() != counts[self.rank] {
            return Err(format!("reduce_scatter: counts {counts:?} do not fit {} elements", data.len()));
        }
        let counts: Vec<i32> = counts.iter().map(|&c| c as i32).collect();
        // SAFETY: `data` holds Σcounts f32s and `out` counts[rank] f32s (checked above); the datatype and
        // operation handles are MPI's own for f32 and sum; the communicator is live.
        let rc = unsafe {
            mpi::ffi::MPI_Reduce_scatter(
                data.as_ptr() as *const std::ffi::c_void,
                out.as_mut_ptr() as *mut std::ffi::c_void,
                counts.as_ptr(),
                f32::equivalent_datatype().as_raw(),
                SystemOperation::sum().as_raw(),
                self.world.as_raw(),
            )
        };
        if rc != 0 {
            return Err(format!("MPI_Reduce_scatter failed with code {rc}"));
        }
        Ok(())
    }
    fn all_gather(&self, local: &[f32], counts: &[usize], out: &mut [f32]) -> Result<(), String> {
        use mpi::collective::CommunicatorCollectives;
        use mpi::datatype::PartitionMut;
        if counts.len() != self.size || counts.iter().sum::<usize>() != out.len() || local.len() != counts[self.rank] {
            return Err(format!("all_gather: counts {counts:?} do not fit {} elements", out.len()));
        }
        let c: Vec<i32> = counts.iter().map(|&c| c as i32).collect();
        let displs: Vec<i32> = c.iter().scan(0, |acc, &x| Some(std::mem::replace(acc, *acc + x))).collect();
        let mut part = PartitionMut::new(out, &c[..], &displs[..]);
        self.world.all_gather_varcount_into(local, &mut part);
        Ok(())
    }
}

/// NCCL between GPUs (feature `nccl`): the ranks' tensors are copied to the rank's GPU, reduced or
/// gathered there by NCCL, and copied back, so the CPU backends can run with GPU interconnects. CUDA and
/// NCCL are loaded at run time (cudarc's `dynamic-loading`): every entry point checks that the libraries
/// are present and the driver initialises first, so a machine without a GPU gets an error, not a panic.
#[cfg(feature = "nccl")]
pub mod nccl {
    use super::Collective;
    use cudarc::driver::{CudaContext, CudaStream};
    use cudarc::nccl::safe::{Comm, Id, ReduceOp};
    use std::sync::{Arc, Mutex};

    /// Whether CUDA and NCCL can be used here: the libraries load and the driver initialises.
    pub fn available() -> Result<(), String> {
        // SAFETY: only probes whether the shared libraries can be loaded.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err("NCCL needs a CUDA driver (libcuda), which this machine does not have".into());
        }
        // SAFETY: as above.
        if !unsafe { cudarc::nccl::sys::is_culib_present() } {
            return Err("NCCL (libnccl) is not installed on this machine".into());
        }
        cudarc::driver::result::init().map_err(|e| format!("the CUDA driver does not initialise: {e:?}"))?;
        let n = cudarc::driver::result::device::get_count().map_err(|e| format!("counting CUDA devices: {e:?}"))?;
        if n == 0 {
            return Err("no CUDA device is visible".into());
        }
        Ok(())
    }

    /// A fresh NCCL unique id (rank 0 makes it and sends it to the others), as bytes.
    pub fn unique_id() -> Result<[u8; 128], String> {
        available()?;
        let id = Id::new().map_err(|e| format!("ncclGetUniqueId: {e:?}"))?;
        Ok(id.internal().map(|c| c as u8))
    }

    /// One rank's NCCL communicator on GPU `rank % devices`.
    pub struct NcclCollective {
        comm: Comm,
        stream: Arc<CudaStream>,
        rank: usize,
        world: usize,
        /// NCCL calls are issued one at a time.
        lock: Mutex<()>,
    }

    // SAFETY: the communicator and stream are used under `lock`, one call at a time.
    unsafe impl Send for NcclCollective {}
    unsafe impl Sync for NcclCollective {}

    impl NcclCollective {
        pub fn new(rank: usize, world: usize, id: [u8; 128]) -> Result<NcclCollective, String> {
            available()?;
            let n = cudarc::driver::result::device::get_count().map_err(|e| format!("{e:?}"))? as usize;
            let ctx = CudaContext::new(rank % n).map_err(|e| format!("CUDA device {}: {e:?}", rank % n))?;
            let stream = ctx.default_stream();
            let id = Id::uninit(id.map(|b| b as ::core::ffi::c_char));
            let comm =
                Comm::from_rank(stream.clone(), rank, world, id).map_err(|e| format!("ncclCommInitRank: {e:?}"))?;
            Ok(NcclCollective { comm, stream, rank, world, lock: Mutex::new(()) })
        }

        fn err(what: &str, e: impl std::fmt::Debug) -> String {
            format!("{what}: {e:?}")
        }
    }

    impl Collective for NcclCollective {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world(&self) -> usize {
            self.world
        }
        fn all_reduce(&self, data: &mut [f32]) -> Result<(), String> {
            let _g = self.lock.lock().unwrap();
            let send = self.stream.clone_htod(data).map_err(|e| Self::err("copy to GPU", e))?;
            let mut recv = self.stream.alloc_zeros::<f32>(data.len()).map_err(|e| Self::err("GPU alloc", e))?;
            self.comm.all_reduce(&send, &mut recv, &ReduceOp::Sum).map_err(|e| Self::err("ncclAllReduce", e))?;
            self.stream.memcpy_dtoh(&recv, data).map_err(|e| Self::err("copy from GPU", e))?;
            self.stream.synchronize().map_err(|e| Self::err("synchronize", e))
        }
        fn reduce_scatter(&self, data: &[f32], counts: &[usize], out: &mut [f32]) -> Result<(), String> {
            // NCCL's reduce-scatter has equal blocks: pad each rank's block to the largest.
            let _g = self.lock.lock().unwrap();
            let max = counts.iter().copied().max().unwrap_or(0);
            let mut padded = vec![0f32; max * self.world];
            let mut at = 0;
            for (r, &c) in counts.iter().enumerate() {
                padded[r * max..r * max + c].copy_from_slice(&data[at..at + c]);
                at += c;
            }
            let send = self.stream.clone_htod(&padded).map_err(|e| Self::err("copy to GPU", e))?;
            let mut recv = self.stream.alloc_zeros::<f32>(max).map_err(|e| Self::err("GPU alloc", e))?;
            self.comm
                .reduce_scatter(&send, &mut recv, &ReduceOp::Sum)
                .map_err(|e| Self::err("ncclReduceScatter", e))?;
            let mine = self.stream.clone_dtoh(&recv).map_err(|e| Self::err("copy from GPU", e))?;
            out.copy_from_slice(&mine[..counts[self.rank]]);
            Ok(())
        }
        fn all_gather(&self, local: &[f32], counts: &[usize], out: &mut [f32]) -> Result<(), String> {
            let _g = self.lock.lock().unwrap();
            let max = counts.iter().copied().max().unwrap_or(0);
            let mut padded = vec![0f32; max];
            padded[..local.len()].copy_from_slice(local);
            let send = self.stream.clone_htod(&padded).map_err(|e| Self::err("copy to GPU", e))?;
            let mut recv = self.stream.alloc_zeros::<f32>(max * self.world).map_err(|e| Self::err("GPU alloc", e))?;
            self.comm.all_gather(&send, &mut recv).map_err(|e| Self::err("ncclAllGather", e))?;
            let all = self.stream.clone_dtoh(&recv).map_err(|e| Self::err("copy from GPU", e))?;
            let mut at = 0;
            for (r, &c) in counts.iter().enumerate() {
                out[at..at + c].copy_from_slice(&all[r * max..r * max + c]);
                at += c;
            }
            Ok(())
        }
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn nccl_runs_with_a_gpu_and_is_a_clear_error_without() {
            match super::available() {
                Ok(()) => {
                    // A GPU: one rank's communicator through real NCCL calls (uneven counts padded).
                    use super::Collective;
                    let c = super::NcclCollective::new(0, 1, super::unique_id().unwrap()).unwrap();
                    let mut x = vec![1.5f32, -2.0, 3.25];
                    c.all_reduce(&mut x).unwrap();
                    assert_eq!(x, [1.5, -2.0, 3.25]);
                    let mut out = vec![0f32; 3];
                    c.reduce_scatter(&x, &[3], &mut out).unwrap();
                    assert_eq!(out, x);
                    let mut g = vec![0f32; 3];
                    c.all_gather(&x, &[3], &mut g).unwrap();
                    assert_eq!(g, x);
                }
                Err(e) => {
                    assert!(e.contains("CUDA") || e.contains("NCCL"), "{e}");
                    let e = super::NcclCollective::new(0, 1, [0; 128]).err().expect("refused without a GPU");
                    assert!(e.contains("CUDA") || e.contains("NCCL"), "{e}");
                    assert!(super::unique_id().is_err());
                }
            }
        }
    }
}
