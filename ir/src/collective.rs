//! Collective communication between the ranks of a tensor-parallel group, as the interpreter and the
//! compiled runtime see it: the [`Collective`] trait, how a dimension is split into per-rank slices, and
//! two implementations that need no network — [`SingleRank`] (the identity) and [`LocalGroup`] (ranks
//! as threads of one process, the reference the distributed backends are tested against).
//!
//! Token-sharded values (`reduce_scatter`, `shard`, `all_gather` in the op table) carry the symbol
//! `<s>_shard` for "this rank's part of `<s>`". It is bound per step, next to `<s>`, by
//! [`bind_shard_symbols`]: rank r of n gets rows `r·len/n .. (r+1)·len/n` when [`splits`] says the step is
//! split, and every row otherwise — then `reduce_scatter` is an all-reduce, `shard` and `all_gather` the
//! identity, which is exactly the unfused form. So one graph serves steps of any length (see
//! docs/architecture.md, "tensor parallelism").

use crate::shape::SymEnv;
use std::ops::Range;
use std::sync::{Arc, Barrier, Mutex};

/// The suffix of a token-sharded dimension's symbol (`seq_shard`).
pub const SHARD_SUFFIX: &str = "_shard";

/// What a rank needs from its group. Every rank calls the same operations in the same order; buffers
/// are f32 and contiguous.
pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Sums `data` over ranks, elementwise, in place (every rank gets the sum).
    fn all_reduce(&self, data: &mut [f32]) -> Result<(), String>;
    /// Sums `data` (the whole tensor, `counts` summing to its length) over ranks and writes this rank's
    /// block (`counts[rank]` elements, blocks in rank order) to `out`.
    fn reduce_scatter(&self, data: &[f32], counts: &[usize], out: &mut [f32]) -> Result<(), String>;
    /// Concatenates every rank's `local` (rank r contributes `counts[r]` elements) into `out`, in rank order.
    fn all_gather(&self, local: &[f32], counts: &[usize], out: &mut [f32]) -> Result<(), String>;
}

/// Whether a step of `len` rows is split over `world` ranks: when every rank gets at least one row.
/// Shorter steps (decode: one token) run replicated, i.e. unfused.
pub fn splits(len: usize, world: usize) -> bool {
    world > 1 && len >= world
}

/// The rows of `len` that `rank` of `world` holds in a step.
pub fn shard_range(len: usize, rank: usize, world: usize) -> Range<usize> {
    if splits(len, world) {
        len * rank / world..len * (rank + 1) / world
    } else {
        0..len
    }
}

/// Binds `<s>_shard` for every symbol `<s>` bound in `env` (not already a shard symbol).
pub fn bind_shard_symbols(env: &mut SymEnv, rank: usize, world: usize) {
    let bound: Vec<(String, i64)> =
        env.iter().filter(|(s, _)| !s.ends_with(SHARD_SUFFIX)).map(|(s, v)| (s.clone(), *v)).collect();
    for (s, v) in bound {
        let r = shard_range(v.max(0) as usize, rank, world);
        env.insert(format!("{s}{SHARD_SUFFIX}"), r.len() as i64);
    }
}

/// Per-rank element counts of a tensor whose split axis has `len` rows of `row` elements.
pub fn shard_counts(len: usize, row: usize, world: usize) -> Vec<usize> {
    (0..world).map(|r| shard_range(len, r, world).len() * row).collect()
}

/// `reduce_scatter` of a tensor of `len` rows of `row` elements (`data`, rows outermost) into this
/// rank's rows (`out`); a step that is not split is an all-reduce.
pub fn reduce_scatter_rows(
    c: &dyn Collective,
    data: &[f32],
    len: usize,
    row: usize,
    out: &mut [f32],
) -> Result<(), String> {
    if !splits(len, c.world()) {
        out.copy_from_slice(data);
        return c.all_reduce(out);
    }
    c.reduce_scatter(data, &shard_counts(len, row, c.world()), out)
}

/// `all_gather` into a tensor of `len` rows of `row` elements (`out`) from this rank's rows (`local`); a
/// step that is not split holds every row already.
pub fn all_gather_rows(
    c: &dyn Collective,
    local: &[f32],
    len: usize,
    row: usize,
    out: &mut [f32],
) -> Result<(), String> {
    if !splits(len, c.world()) {
        out.copy_from_slice(local);
        return Ok(());
    }
    c.all_gather(local, &shard_counts(len, row, c.world()), out)
}

/// One rank alone: every collective is the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleRank;

impl Collective for SingleRank {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce(&self, _data: &mut [f32]) -> Result<(), String> {
        Ok(())
    }
    fn reduce_scatter(&self, data: &[f32], _counts: &[usize], out: &mut [f32]) -> Result<(), String> {
        out.copy_from_slice(data);
        Ok(())
    }
    fn all_gather(&self, local: &[f32], _counts: &[usize], out: &mut [f32]) -> Result<(), String> {
        out.copy_from_slice(local);
        Ok(())
    }
}

struct Shared {
    barrier: Barrier,
    slots: Mutex<Vec<Vec<f32>>>,
}

/// Ranks as threads of one process (the reference collective of the tests): `LocalGroup::new(n)` gives
/// one handle per rank; each rank's thread calls the collectives on its own handle. Sums are taken in
/// f64 in rank order, so every rank gets bit-identical results.
#[derive(Clone)]
pub struct LocalGroup {
    rank: usize,
    world: usize,
    shared: Arc<Shared>,
}

impl LocalGroup {
    pub fn new(world: usize) -> Vec<LocalGroup> {
        let shared = Arc::new(Shared { barrier: Barrier::new(world), slots: Mutex::new(vec![Vec::new(); world]) });
        (0..world).map(|rank| LocalGroup { rank, world, shared: shared.clone() }).collect()
    }

    /// Every rank's `data`, in rank order.
    fn exchange(&self, data: &[f32]) -> Vec<Vec<f32>> {
        self.shared.slots.lock().unwrap()[self.rank] = data.to_vec();
        self.shared.barrier.wait();
        let all = self.shared.slots.lock().unwrap().clone();
        // Nobody may overwrite a slot before everyone has read it.
        self.shared.barrier.wait();
        all
    }

    fn sum(&self, data: &[f32]) -> Result<Vec<f32>, String> {
        let all = self.exchange(data);
        if all.iter().any(|v| v.len() != data.len()) {
            return Err("ranks reduce buffers of different lengths".into());
        }
        Ok((0..data.len()).map(|i| all.iter().map(|v| v[i] as f64).sum::<f64>() as f32).collect())
    }
}

impl Collective for LocalGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_reduce(&self, data: &mut [f32]) -> Result<(), String> {
        let s = self.sum(data)?;
        data.copy_from_slice(&s);
        Ok(())
    }
    fn reduce_scatter(&self, data: &[f32], counts: &[usize], out: &mut [f32]) -> Result<(), String> {
        let s = self.sum(data)?;
        let start: usize = counts[..self.rank].iter().sum();
        out.copy_from_slice(&s[start..start + counts[self.rank]]);
        Ok(())
    }
    fn all_gather(&self, local: &[f32], counts: &[usize], out: &mut [f32]) -> Result<(), String> {
        let all = self.exchange(local);
        for (r, v) in all.iter().enumerate() {
            if v.len() != counts[r] {
                return Err(format!("rank {r} gathered {} elements, expected {}", v.len(), counts[r]));
            }
        }
        let cat: Vec<f32> = all.concat();
        out.copy_from_slice(&cat);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_the_rows_once_and_short_steps_replicate() {
        for len in 0..9 {
            for world in 1..5 {
                let rs: Vec<Range<usize>> = (0..world).map(|r| shard_range(len, r, world)).collect();
                if splits(len, world) {
                    assert_eq!(rs[0].start, 0);
                    assert_eq!(rs[world - 1].end, len);
                    for w in rs.windows(2) {
                        assert_eq!(w[0].end, w[1].start);
                    }
                    assert!(rs.iter().all(|r| !r.is_empty()));
                } else {
                    assert!(rs.iter().all(|r| *r == (0..len)));
                }
            }
        }
    }

    #[test]
    fn local_group_sums_and_gathers_like_by_hand() {
        let handles = LocalGroup::new(3);
        let results: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
            let js: Vec<_> = handles
                .iter()
                .map(|h| {
                    s.spawn(move || {
                        let r = h.rank() as f32;
                        let mut a = vec![r, 10.0 * r, 1.0, -r];
                        h.all_reduce(&mut a).unwrap();
                        let counts = [1, 1, 2];
                        let mut rs = vec![0.0; counts[h.rank()]];
                        h.reduce_scatter(&[1.0, r, 2.0 * r, 5.0], &counts, &mut rs).unwrap();
                        let local = vec![r; counts[h.rank()]];
                        let mut g = vec![0.0; 4];
                        h.all_gather(&local, &counts, &mut g).unwrap();
                        (a, rs, g)
                    })
                })
                .collect();
            js.into_iter().map(|j| j.join().unwrap()).collect()
        });
        for (a, _, g) in &results {
            assert_eq!(a, &[3.0, 30.0, 3.0, -3.0]);
            assert_eq!(g, &[0.0, 1.0, 2.0, 2.0]);
        }
        assert_eq!(results[0].1, vec![3.0]);
        assert_eq!(results[1].1, vec![3.0]);
        assert_eq!(results[2].1, vec![6.0, 15.0]);
    }

    #[test]
    fn collective_ops_type_and_run_on_the_interpreter() {
        use crate::{shape, DType, Graph, Interpreter, Op, Tensor, TensorType, WeightStore};
        let mut g = Graph::new("c");
        let x = g.input("x", TensorType::new(DType::F32, shape!["batch", "seq", 2i64])).unwrap();
        let rs = g.add(Op::ReduceScatter { axis: 1 }, &[x]).unwrap();
        assert_eq!(g.ty(rs).to_string(), "f32[batch, seq_shard, 2]");
        let ag = g.add(Op::AllGather { axis: 1 }, &[rs]).unwrap();
        let sh = g.add(Op::Shard { axis: 1 }, &[x]).unwrap();
        let back = g.add(Op::AllGather { axis: 1 }, &[sh]).unwrap();
        let ar = g.add(Op::AllReduce, &[x]).unwrap();
        g.output("ag", ag);
        g.output("back", back);
        g.output("ar", ar);
        // Type errors name the axis.
        let e = g.add(Op::AllGather { axis: 1 }, &[x]).unwrap_err().to_string();
        assert!(e.contains("not a shard dimension"), "{e}");
        let e = g.add(Op::ReduceScatter { axis: 2 }, &[x]).unwrap_err().to_string();
        assert!(e.contains("must be one symbol"), "{e}");
        let e = g.add(Op::Shard { axis: 1 }, &[rs]).unwrap_err().to_string();
        assert!(e.contains("already sharded"), "{e}");

        let w = WeightStore::new();
        // 5 tokens over 2 ranks (2 + 3), and 1 token (replicated).
        for seq in [5usize, 1] {
            let outs: Vec<Vec<(String, Tensor)>> = std::thread::scope(|s| {
                let js: Vec<_> = LocalGroup::new(2)
                    .into_iter()
                    .map(|h| {
                        let (g, w) = (&g, &w);
                        s.spawn(move || {
                            let r = h.rank() as f32;
                            let data: Vec<f32> = (0..seq * 2).map(|i| i as f32 + 10.0 * r).collect();
                            let i = Interpreter::new(w).with_collective(std::sync::Arc::new(h));
                            i.run(g, &[("x", Tensor::f32(vec![1, seq, 2], data))]).unwrap()
                        })
                    })
                    .collect();
                js.into_iter().map(|j| j.join().unwrap()).collect()
            });
            // Rank r holds i + 10r: the sum over ranks is 2i + 10.
            let sum: Vec<f32> = (0..seq * 2).map(|i| 2.0 * i as f32 + 10.0).collect();
            for (r, o) in outs.iter().enumerate() {
                let own: Vec<f32> = (0..seq * 2).map(|i| i as f32 + 10.0 * r as f32).collect();
                assert_eq!(o[0].1.as_f32().unwrap(), &sum[..], "reduce_scatter then all_gather = all_reduce");
                assert_eq!(o[2].1.as_f32().unwrap(), &sum[..]);
                if seq >= 2 {
                    // Shards of different ranks' data, gathered: rank 0's first 2 tokens, rank 1's last 3.
                    let mixed: Vec<f32> = (0..seq * 2).map(|i| i as f32 + if i < 4 { 0.0 } else { 10.0 }).collect();
                    assert_eq!(o[1].1.as_f32().unwrap(), &mixed[..]);
                } else {
                    assert_eq!(o[1].1.as_f32().unwrap(), &own[..], "one token: replicated, shard is the identity");
                }
            }
        }
    }
}
