//! Per-position early exit on the interpreter (SkipDecode; Sorted-LLaMA-style truncation): each position
//! runs only `depth(position)` of the decoder's blocks.
//!
//! The schedule is non-increasing in position and shared by the whole batch. Then every KV entry a later
//! token reads exists: a block skipped at position p is skipped at every later position, so no one reads
//! its missing rows. The backend checks this at run time anyway ([`RuntimeError::UnwrittenKv`]): before a
//! step, every cache the step's graph reads must hold exactly `past` rows.
//!
//! The caller supplies one graph per depth (e.g. `kiln_passes::skip_layers::skip_blocks` of the full
//! graph): [`ExitMode::Top`] keeps blocks `0..depth` (the final norm and LM head read the intermediate
//! state), [`ExitMode::Lower`] keeps blocks `n-depth..n` (the embedding feeds the first kept block).
//! Compiled programs run schedules without per-depth code: [`crate::CompiledBackend::set_early_exit`]
//! skips the launches of inactive blocks (each block is a `Region` of the program) and copies the
//! residual stream across them, checking the same KV invariant per cache.

use crate::backend::{Backend, Logits, RuntimeError};
use kiln_ir::interp::{Data, Interpreter, Tensor};
use kiln_ir::{Graph, WeightStore};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitMode {
    /// Skip the top blocks (Sorted-LLaMA truncation).
    Top,
    /// Skip the lower blocks (SkipDecode).
    Lower,
}

impl ExitMode {
    /// The name manifests and reports use (`top`, `lower`).
    pub fn name(self) -> &'static str {
        match self {
            ExitMode::Top => "top",
            ExitMode::Lower => "lower",
        }
    }

    pub fn parse(s: &str) -> Option<ExitMode> {
        [ExitMode::Top, ExitMode::Lower].into_iter().find(|m| m.name() == s)
    }

    /// The blocks a position of `depth` runs, of `n`.
    pub fn active(self, n: usize, depth: usize) -> std::ops::Range<usize> {
        match self {
            ExitMode::Top => 0..depth,
            ExitMode::Lower => n - depth..n,
        }
    }
}

/// Depth per position: `points` are (from position, depth); before the first point every block runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExitSchedule {
    points: Vec<(usize, usize)>,
}

impl ExitSchedule {
    /// Checks positions increase, depths lie in 1..=n and never increase.
    pub fn new(points: Vec<(usize, usize)>, n_layers: usize) -> Result<ExitSchedule, String> {
        let mut prev = (None, n_layers);
        for &(pos, depth) in &points {
            if prev.0.is_some_and(|p| pos <= p) {
                return Err(format!("schedule positions must increase ({pos} after {})", prev.0.unwrap_or(0)));
            }
            if depth == 0 || depth > n_layers {
                return Err(format!("depth {depth} at position {pos} is not in 1..={n_layers}"));
            }
            if depth > prev.1 {
                return Err(format!(
                    "depth increases from {} to {depth} at position {pos}: later tokens would read KV entries that were never written",
                    prev.1
                ));
            }
            prev = (Some(pos), depth);
        }
        Ok(ExitSchedule { points })
    }

    /// A schedule without the checks, so tests can show the runtime catches a bad one.
    pub fn unchecked(points: Vec<(usize, usize)>) -> ExitSchedule {
        ExitSchedule { points }
    }

    /// (from position, depth), in order.
    pub fn points(&self) -> &[(usize, usize)] {
        &self.points
    }

    /// The first position the schedule changes the depth at.
    pub fn first_position(&self) -> Option<usize> {
        self.points.first().map(|p| p.0)
    }

    pub fn depth_at(&self, pos: usize, n_layers: usize) -> usize {
        self.points.iter().take_while(|(p, _)| *p <= pos).last().map_or(n_layers, |&(_, d)| d)
    }
}

/// The depth of a step of `s` tokens at positions `past..past + s`: all must share one depth.
fn step_depth(schedule: &ExitSchedule, n: usize, past: usize, s: usize) -> Result<usize, RuntimeError> {
    let depth = schedule.depth_at(past, n);
    if s > 0 && schedule.depth_at(past + s - 1, n) != depth {
        return Err(RuntimeError::Interface("steps that stay at one depth".into(), "early-exit schedule"));
    }
    Ok(depth)
}

/// Which of `n` blocks a step at `past..past + s` runs (compiled backends skip the others).
pub fn step_blocks(
    mode: ExitMode,
    schedule: &ExitSchedule,
    n: usize,
    past: usize,
    s: usize,
) -> Result<Vec<bool>, RuntimeError> {
    let active = mode.active(n, step_depth(schedule, n, past, s)?);
    Ok((0..n).map(|b| active.contains(&b)).collect())
}

/// The interpreter running a schedule over per-depth graphs.
pub struct EarlyExitInterpreter<'w> {
    /// `graphs[d - 1]`: the graph of depth d.
    graphs: Vec<Graph>,
    schedule: ExitSchedule,
    interp: Interpreter<'w>,
    /// Every cache of the full model (the graph of depth n), with its rows so far.
    state: Vec<(String, Tensor)>,
    vocab: usize,
    context: usize,
    past: usize,
}

impl<'w> EarlyExitInterpreter<'w> {
    /// `graphs[d - 1]` is the graph of depth d, for d in 1..=n (the last is the full model).
    pub fn new(
        graphs: Vec<Graph>,
        schedule: ExitSchedule,
        weights: &'w WeightStore,
        context: usize,
    ) -> Result<Self, RuntimeError> {
        let full = graphs.last().ok_or_else(|| RuntimeError::Interface("graph of full depth".into(), "graph"))?;
        let logits = full.output_named("logits").ok_or_else(|| RuntimeError::Interface("logits".into(), "output"))?;
        let vocab = full.ty(logits).shape.last().and_then(|d| d.as_fixed()).unwrap_or(0) as usize;
        let mut b = EarlyExitInterpreter {
            graphs,
            schedule,
            interp: Interpreter::new(weights),
            state: Vec::new(),
            vocab,
            context,
            past: 0,
        };
        b.reset();
        Ok(b)
    }
}

impl Backend for EarlyExitInterpreter<'_> {
    fn name(&self) -> &str {
        "interpreter-early-exit"
    }
    fn vocab_size(&self) -> usize {
        self.vocab
    }
    fn context_length(&self) -> usize {
        self.context
    }
    fn position(&self) -> usize {
        self.past
    }

    fn reset(&mut self) {
        self.past = 0;
        let g = self.graphs.last().expect("checked in new()");
        self.state = g
            .inputs()
            .filter(|(name, _)| g.output_named(name).is_some())
            .map(|(name, v)| {
                let shape: Vec<usize> = g
                    .ty(v)
                    .shape
                    .iter()
                    .map(|d| match (d.as_fixed(), d.as_sym()) {
                        (Some(n), _) => n as usize,
                        (None, Some("batch")) => 1,
                        _ => 0,
                    })
                    .collect();
                (name.to_string(), Tensor::f32(shape, Vec::new()))
            })
            .collect();
    }

    fn forward(&mut self, tokens: &[u32]) -> Result<Logits, RuntimeError> {
        if tokens.is_empty() {
            return Err(RuntimeError::EmptyPrompt);
        }
        let (s, n) = (tokens.len(), self.graphs.len());
        if self.past + s > self.context {
            return Err(RuntimeError::ContextFull { past: self.past, new: s, limit: self.context });
        }
        let depth = step_depth(&self.schedule, n, self.past, s)?;
        let g = &self.graphs[depth - 1];
        let ids = Tensor::i64(vec![1, s], tokens.iter().map(|&t| t as i64).collect());
        let pos = Tensor::i64(vec![1, s], (self.past..self.past + s).map(|p| p as i64).collect());
        let mut inputs: Vec<(&str, Tensor)> = vec![("tokens", ids), ("pos", pos)];
        for (name, _) in g.inputs() {
            if let Some((_, t)) = self.state.iter().find(|(n, _)| n == name) {
                // Every KV row before this step must have been written.
                if t.shape[1] != self.past {
                    return Err(RuntimeError::UnwrittenKv {
                        cache: name.to_string(),
                        written: t.shape[1],
                        needed: self.past,
                    });
                }
                inputs.push((name, t.clone()));
            }
        }
        let outputs = self.interp.run(g, &inputs)?;
        drop(inputs);
        let mut logits = None;
        for (name, t) in outputs {
            if name == "logits" {
                logits = Some(t);
            } else if let Some(slot) = self.state.iter_mut().find(|(n, _)| *n == name) {
                slot.1 = t;
            }
        }
        self.past += s;
        let t = logits.ok_or_else(|| RuntimeError::Interface("logits".into(), "output"))?;
        let Data::F32(data) = t.data else { unreachable!("logits are f32 by the type rules") };
        Ok(Logits { rows: data.len() / self.vocab, vocab: self.vocab, data })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_must_not_increase() {
        assert!(ExitSchedule::new(vec![(4, 3), (6, 2)], 4).is_ok());
        let e = ExitSchedule::new(vec![(4, 2), (6, 3)], 4).unwrap_err();
        assert!(e.contains("never written"), "{e}");
        assert!(ExitSchedule::new(vec![(4, 0)], 4).is_err() && ExitSchedule::new(vec![(4, 5)], 4).is_err());
        assert!(ExitSchedule::new(vec![(4, 2), (4, 1)], 4).is_err());
        let s = ExitSchedule::new(vec![(4, 3), (6, 2)], 4).unwrap();
        assert_eq!([0, 3, 4, 5, 6, 100].map(|p| s.depth_at(p, 4)), [4, 4, 3, 3, 2, 2]);
        assert_eq!(ExitMode::Lower.active(4, 1), 3..4);
        assert_eq!(ExitMode::parse(ExitMode::Lower.name()), Some(ExitMode::Lower));
        assert_eq!((ExitMode::parse("top"), ExitMode::parse("middle")), (Some(ExitMode::Top), None));
    }
}
