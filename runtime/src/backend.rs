//! The backend trait and the interpreter backend.

use kiln_ir::interp::{Data, InterpError, Interpreter, Tensor};
use kiln_ir::{Graph, WeightStore};

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("context length exceeded: {past} cached + {new} new tokens > {limit}")]
    ContextFull { past: usize, new: usize, limit: usize },
    #[error("the graph has no `{0}` {1}")]
    Interface(String, &'static str),
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    BadToken { id: u32, vocab: usize },
    #[error("empty prompt: at least one token is needed")]
    EmptyPrompt,
    #[error("KV cache `{cache}` holds {written} rows but the step reads {needed}: an early-exit schedule skipped a block that a later position runs")]
    UnwrittenKv { cache: String, written: usize, needed: usize },
    #[error("sequence {seq}: {msg}")]
    Sequence { seq: SeqId, msg: String },
    #[error("collective {launch}: {msg}")]
    Collective { launch: String, msg: String },
    #[error(transparent)]
    Interp(#[from] InterpError),
}

/// Logits of every position of one step, row-major `[rows, vocab]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Logits {
    pub rows: usize,
    pub vocab: usize,
    pub data: Vec<f32>,
}

impl Logits {
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.vocab..(i + 1) * self.vocab]
    }
    pub fn last(&self) -> &[f32] {
        self.row(self.rows - 1)
    }
}

/// A sequence a backend keeps a KV cache for (serving runs many; generation uses sequence 0).
pub type SeqId = u32;

/// One sequence's share of a step: the tokens appended to sequence `seq`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeqTokens<'a> {
    pub seq: SeqId,
    pub tokens: &'a [u32],
}

/// Something that runs the decoder one step at a time, keeping a KV cache per sequence.
///
/// A step ([`Backend::step`]) takes several sequences' tokens and returns each one's logits; the
/// single-sequence call [`Backend::forward`] is the step of a batch of one, on the current sequence
/// ([`Backend::select`] chooses it; sequence 0 at first). The provided `step` runs the sequences one
/// after another; a backend that executes a ragged batch in one pass overrides it with the same result.
pub trait Backend {
    fn name(&self) -> &str;
    fn vocab_size(&self) -> usize;
    fn context_length(&self) -> usize;
    /// Tokens already in the current sequence's cache.
    fn position(&self) -> usize;
    /// Appends `tokens` to the current sequence at its position and returns their logits.
    fn forward(&mut self, tokens: &[u32]) -> Result<Logits, RuntimeError>;
    /// Empties the current sequence's KV cache.
    fn reset(&mut self);
    /// The current sequence (what `forward`, `position`, `reset`, `output` and `state` refer to).
    fn sequence(&self) -> SeqId {
        0
    }
    /// Makes `seq` the current sequence, starting it with an empty cache the first time. A backend that
    /// keeps one sequence only accepts sequence 0.
    fn select(&mut self, seq: SeqId) -> Result<(), RuntimeError> {
        if seq == 0 {
            Ok(())
        } else {
            Err(RuntimeError::Sequence { seq, msg: format!("the {} backend keeps one sequence (0)", self.name()) })
        }
    }
    /// Forgets sequence `seq`'s cache; it starts empty if selected again. Releasing the current
    /// sequence empties it and leaves it current.
    fn release(&mut self, seq: SeqId) {
        if seq == self.sequence() {
            self.reset();
        }
    }
    /// One step over several sequences: appends each entry's tokens to its sequence and returns their
    /// logits in batch order. Every sequence appears at most once and has at least one token. The last
    /// entry's sequence is current afterwards.
    fn step(&mut self, batch: &[SeqTokens<'_>]) -> Result<Vec<Logits>, RuntimeError> {
        check_batch(batch)?;
        let mut out = Vec::with_capacity(batch.len());
        for s in batch {
            self.select(s.seq)?;
            out.push(self.forward(s.tokens)?);
        }
        Ok(out)
    }
    /// A float output of the last step other than `logits` and the state (e.g. hidden states a graph edit
    /// exposed for calibration), row-major; `None` if the graph has no such output.
    fn output(&self, name: &str) -> Option<&[f32]> {
        let _ = name;
        None
    }
    /// The current value of a fixed-size state (CoreInfer's `core_set.L`), row-major; `None` if there
    /// is none of that name.
    fn state(&self, name: &str) -> Option<&[f32]> {
        let _ = name;
        None
    }
}

/// The checks every [`Backend::step`] makes: a non-empty batch, each sequence once, each with tokens.
pub fn check_batch(batch: &[SeqTokens<'_>]) -> Result<(), RuntimeError> {
    if batch.is_empty() {
        return Err(RuntimeError::EmptyPrompt);
    }
    for (i, s) in batch.iter().enumerate() {
        if s.tokens.is_empty() {
            return Err(RuntimeError::Sequence { seq: s.seq, msg: "no tokens in this step".into() });
        }
        if batch[..i].iter().any(|t| t.seq == s.seq) {
            return Err(RuntimeError::Sequence { seq: s.seq, msg: "appears twice in one step".into() });
        }
    }
    Ok(())
}

/// The sequences a backend keeps: which one is current (its state lives in the backend's own fields)
/// and the parked state `T` of the others.
pub(crate) struct Sequences<T> {
    current: SeqId,
    parked: std::collections::BTreeMap<SeqId, T>,
}

impl<T> Sequences<T> {
    pub(crate) fn new() -> Self {
        Sequences { current: 0, parked: Default::default() }
    }

    pub(crate) fn current(&self) -> SeqId {
        self.current
    }

    /// The parked state of `seq` (`None`: never selected, or released), taken out.
    pub(crate) fn take(&mut self, seq: SeqId) -> Option<T> {
        self.parked.remove(&seq)
    }

    /// Parks the current sequence's state `outgoing` and makes `seq` current.
    pub(crate) fn park(&mut self, outgoing: T, seq: SeqId) {
        self.parked.insert(self.current, outgoing);
        self.current = seq;
    }

    /// Forgets `seq`; `true` when it is the current one, whose state the backend then empties.
    pub(crate) fn release(&mut self, seq: SeqId) -> bool {
        self.parked.remove(&seq);
        seq == self.current
    }
}

/// CoreInfer: the share of MLP neurons in the current core sets (`core_set.L`, every layer), if the
/// backend has them.
pub fn core_share(b: &dyn Backend) -> Option<f64> {
    let sets: Vec<&[f32]> = (0..).map_while(|l| b.state(&format!("core_set.{l}"))).collect();
    let n: usize = sets.iter().map(|s| s.len()).sum();
    (n > 0).then(|| sets.iter().flat_map(|s| s.iter()).filter(|&&x| x != 0.0).count() as f64 / n as f64)
}

/// Runs the graph on the reference interpreter. Every graph input whose name is also an output name
/// (`k_cache.L`, `v_cache.L`) is state: it starts empty and is replaced by the output after each step.
pub struct InterpreterBackend<'w> {
    graph: Graph,
    interp: Interpreter<'w>,
    state: Vec<(String, Tensor)>,
    /// The last step's other outputs.
    extra: Vec<(String, Tensor)>,
    vocab: usize,
    context: usize,
    past: usize,
    /// The current sequence; the others' state and position wait here.
    seqs: Sequences<(Vec<(String, Tensor)>, usize)>,
}

impl<'w> InterpreterBackend<'w> {
    pub fn new(graph: Graph, weights: &'w WeightStore, context: usize) -> Result<Self, RuntimeError> {
        Self::with_interpreter(graph, Interpreter::new(weights), context)
    }

    /// A backend on a configured interpreter (e.g. one rank of a tensor-parallel group).
    pub fn with_interpreter(graph: Graph, interp: Interpreter<'w>, context: usize) -> Result<Self, RuntimeError> {
        for name in ["tokens", "pos"] {
            if !graph.inputs().any(|(n, _)| n == name) {
                return Err(RuntimeError::Interface(name.into(), "input"));
            }
        }
        let logits = graph.output_named("logits").ok_or_else(|| RuntimeError::Interface("logits".into(), "output"))?;
        let vocab = graph
            .ty(logits)
            .shape
            .last()
            .and_then(|d| d.as_fixed())
            .ok_or_else(|| RuntimeError::Interface("fixed vocabulary size".into(), "logits dimension"))?
            as usize;
        let mut b = InterpreterBackend {
            graph,
            interp,
            state: Vec::new(),
            extra: Vec::new(),
            vocab,
            context,
            past: 0,
            seqs: Sequences::new(),
        };
        b.reset();
        Ok(b)
    }

    /// Dequantizes all weights now (see [`Interpreter::prepare`]).
    pub fn prepare(&self, tick: impl FnMut()) -> Result<(), RuntimeError> {
        Ok(self.interp.prepare(&self.graph, tick)?)
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }
}

impl Backend for InterpreterBackend<'_> {
    fn name(&self) -> &str {
        "interpreter"
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

    fn output(&self, name: &str) -> Option<&[f32]> {
        self.extra.iter().find(|(n, _)| n == name).and_then(|(_, t)| t.as_f32())
    }

    /// Any state input (`k_cache.L` too), row-major.
    fn state(&self, name: &str) -> Option<&[f32]> {
        self.state.iter().find(|(n, _)| n == name).and_then(|(_, t)| t.as_f32())
    }

    fn sequence(&self) -> SeqId {
        self.seqs.current()
    }

    fn select(&mut self, seq: SeqId) -> Result<(), RuntimeError> {
        if seq == self.seqs.current() {
            return Ok(());
        }
        let incoming = self.seqs.take(seq);
        self.seqs.park((std::mem::take(&mut self.state), self.past), seq);
        match incoming {
            Some((state, past)) => {
                self.state = state;
                self.past = past;
                self.extra.clear();
            }
            None => self.reset(),
        }
        Ok(())
    }

    fn release(&mut self, seq: SeqId) {
        if self.seqs.release(seq) {
            self.reset();
        }
    }

    fn reset(&mut self) {
        self.past = 0;
        self.state.clear();
        self.extra.clear();
        let g = &self.graph;
        for (name, v) in g.inputs() {
            if g.output_named(name).is_none() {
                continue;
            }
            // State starts with every symbolic dim at 0 except batch = 1.
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
            let n = shape.iter().product();
            self.state.push((name.to_string(), Tensor::f32(shape, vec![0.0; n])));
        }
    }

    fn forward(&mut self, tokens: &[u32]) -> Result<Logits, RuntimeError> {
        if tokens.is_empty() {
            return Err(RuntimeError::EmptyPrompt);
        }
        if self.past + tokens.len() > self.context {
            return Err(RuntimeError::ContextFull { past: self.past, new: tokens.len(), limit: self.context });
        }
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= self.vocab) {
            return Err(RuntimeError::BadToken { id, vocab: self.vocab });
        }
        let s = tokens.len();
        let ids = Tensor::i64(vec![1, s], tokens.iter().map(|&t| t as i64).collect());
        let pos = Tensor::i64(vec![1, s], (self.past..self.past + s).map(|p| p as i64).collect());
        let mut inputs: Vec<(&str, Tensor)> = vec![("tokens", ids), ("pos", pos)];
        for (name, t) in &self.state {
            inputs.push((name.as_str(), t.clone()));
        }
        let outputs = self.interp.run(&self.graph, &inputs)?;
        drop(inputs);
        let mut logits = None;
        let mut state = Vec::with_capacity(self.state.len());
        self.extra.clear();
        for (name, t) in outputs {
            if name == "logits" {
                logits = Some(t);
            } else if self.state.iter().any(|(n, _)| *n == name) {
                state.push((name, t));
            } else {
                self.extra.push((name, t));
            }
        }
        self.state = state;
        self.past += s;
        let t = logits.expect("checked in new()");
        let Data::F32(data) = t.data else { unreachable!("logits are f32 by the type rules") };
        // A graph built for generation returns the last position only.
        Ok(Logits { rows: data.len() / self.vocab, vocab: self.vocab, data })
    }
}
