//! Perplexity of a model on a text, with a sliding window for texts longer than the window.
//!
//! Every token but the first is scored exactly once, by the logits of the position before it. Windows of
//! `window` fed tokens start every `stride` tokens; each scores only the targets no earlier window scored,
//! so after the first window every target sees at least `window − stride + 1` tokens of context (Hugging
//! Face's "strided perplexity"). Each window runs from an empty KV cache.

use kiln_runtime::{Backend, RuntimeError};
use serde::Serialize;
use std::ops::Range;

/// One forward pass: tokens `start..targets.end - 1` are fed; target `j` is scored by row `j - 1 - start`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    pub start: usize,
    pub targets: Range<usize>,
}

impl Window {
    pub fn fed(&self) -> Range<usize> {
        self.start..self.targets.end - 1
    }
}

/// The windows that score targets `1..n` of an `n`-token text, each exactly once.
pub fn window_plan(n: usize, window: usize, stride: usize) -> Result<Vec<Window>, String> {
    window_plan_prompted(n, window, stride, 0)
}

/// Like [`window_plan`], but each window's first `prompt` fed tokens are a prompt that is not scored:
/// a window scores only targets `j ≥ start + prompt + 1` (predicted after the prompt), so targets
/// `1..=prompt` of the text are never scored and the rest exactly once. Needs `prompt < window` and
/// `stride ≤ window − prompt` (no gaps).
pub fn window_plan_prompted(n: usize, window: usize, stride: usize, prompt: usize) -> Result<Vec<Window>, String> {
    if window == 0 || stride == 0 || stride > window {
        return Err(format!("need 1 <= stride <= window (window {window}, stride {stride})"));
    }
    if prompt >= window || stride > window - prompt {
        return Err(format!(
            "need prompt < window and stride <= window - prompt (window {window}, stride {stride}, prompt {prompt})"
        ));
    }
    let mut plan = Vec::new();
    if n < prompt + 2 {
        return Ok(plan);
    }
    let (mut next, mut start) = (prompt + 1, 0usize);
    loop {
        let fed_end = (start + window).min(n - 1);
        let t_end = fed_end + 1;
        let first = next.max(start + prompt + 1);
        if first < t_end {
            debug_assert!(next > start + prompt, "stride <= window - prompt leaves no gap");
            plan.push(Window { start, targets: first..t_end });
            next = t_end;
        }
        if t_end == n {
            return Ok(plan);
        }
        start += stride;
    }
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// −log softmax(row)[target], in f64.
pub fn token_nll(row: &[f32], target: u32) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    max + sum.ln() - row[target as usize] as f64
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct EvalReport {
    /// Tokens in the text; `scored` = tokens − 1 of them are predicted.
    pub tokens: usize,
    pub scored: usize,
    /// Mean negative log-likelihood, nats per scored token.
    pub mean_nll: f64,
    pub perplexity: f64,
    pub window: usize,
    pub stride: usize,
    /// Unscored prompt tokens at the start of each window (`evaluate_prompted`); 0: none.
    #[serde(skip_serializing_if = "is_zero")]
    pub prompt: usize,
    pub windows: usize,
    /// Tokens fed through the model (overlapping windows feed some twice).
    pub tokens_fed: usize,
    pub seconds: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("{0}")]
    Plan(String),
    #[error("the text has {0} token(s); at least 2 (and 2 more than the prompt length) are needed to score one")]
    TooShort(usize),
    #[error("the backend returned {got} logits rows for {fed} tokens: it computes the last position only (compile with --all-logits)")]
    LastOnly { got: usize, fed: usize },
    #[error("window {window} exceeds the backend's context of {context} tokens")]
    Context { window: usize, context: usize },
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

/// Scores `tokens` on `backend` (which must return logits for every position). `progress` is called
/// with the number of targets scored so far after each window.
pub fn evaluate(
    backend: &mut dyn Backend,
    tokens: &[u32],
    window: usize,
    stride: usize,
    progress: impl FnMut(usize),
) -> Result<EvalReport, EvalError> {
    evaluate_prompted(backend, tokens, window, stride, 0, progress)
}

/// [`evaluate`] where each window first runs its first `prompt` tokens as a step of their own (a
/// prompt: for CoreInfer, the prefill that chooses the core set) and scores only the targets predicted
/// by the second step ([`window_plan_prompted`]). `prompt` 0 is [`evaluate`].
pub fn evaluate_prompted(
    backend: &mut dyn Backend,
    tokens: &[u32],
    window: usize,
    stride: usize,
    prompt: usize,
    mut progress: impl FnMut(usize),
) -> Result<EvalReport, EvalError> {
    if tokens.len() < prompt + 2 {
        return Err(EvalError::TooShort(tokens.len()));
    }
    let plan = window_plan_prompted(tokens.len(), window, stride, prompt).map_err(EvalError::Plan)?;
    let longest = plan.iter().map(|w| w.fed().len()).max().unwrap_or(0);
    if longest > backend.context_length() {
        return Err(EvalError::Context { window: longest, context: backend.context_length() });
    }
    let t0 = std::time::Instant::now();
    let (mut sum, mut scored, mut fed_total) = (0f64, 0usize, 0usize);
    for w in &plan {
        backend.reset();
        let fed = w.fed();
        if prompt > 0 {
            backend.forward(&tokens[w.start..w.start + prompt])?;
        }
        let scored_fed = w.start + prompt..fed.end;
        let logits = backend.forward(&tokens[scored_fed.clone()])?;
        if logits.rows != scored_fed.len() {
            return Err(EvalError::LastOnly { got: logits.rows, fed: scored_fed.len() });
        }
        for j in w.targets.clone() {
            sum += token_nll(logits.row(j - 1 - w.start - prompt), tokens[j]);
        }
        scored += w.targets.len();
        fed_total += fed.len();
        progress(scored);
    }
    backend.reset();
    let mean_nll = sum / scored as f64;
    Ok(EvalReport {
        tokens: tokens.len(),
        scored,
        mean_nll,
        perplexity: mean_nll.exp(),
        window,
        stride,
        prompt,
        windows: plan.len(),
        tokens_fed: fed_total,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Scores `tokens` by teacher-forced decoding: one prefill of the first `prefill` tokens, then one token
/// per step (what a generating model sees, e.g. under an early-exit schedule). Targets `1..n`, once each.
pub fn evaluate_stepwise(
    backend: &mut dyn Backend,
    tokens: &[u32],
    prefill: usize,
    mut progress: impl FnMut(usize),
) -> Result<EvalReport, EvalError> {
    if tokens.len() < 2 {
        return Err(EvalError::TooShort(tokens.len()));
    }
    let n = tokens.len();
    let prefill = prefill.clamp(1, n - 1);
    if n - 1 > backend.context_length() {
        return Err(EvalError::Context { window: n - 1, context: backend.context_length() });
    }
    let t0 = std::time::Instant::now();
    backend.reset();
    let logits = backend.forward(&tokens[..prefill])?;
    if logits.rows != prefill {
        return Err(EvalError::LastOnly { got: logits.rows, fed: prefill });
    }
    let mut sum: f64 = (1..=prefill).map(|j| token_nll(logits.row(j - 1), tokens[j])).sum();
    progress(prefill);
    for j in prefill + 1..n {
        let l = backend.forward(&tokens[j - 1..j])?;
        sum += token_nll(l.last(), tokens[j]);
        progress(j);
    }
    backend.reset();
    let mean_nll = sum / (n - 1) as f64;
    Ok(EvalReport {
        tokens: n,
        scored: n - 1,
        mean_nll,
        perplexity: mean_nll.exp(),
        window: n - 1,
        stride: n - 1,
        prompt: 0,
        windows: 1,
        tokens_fed: n - 1,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_target_is_scored_once_with_enough_context() {
        for n in 0..60 {
            for window in 1..12 {
                for stride in 1..=window {
                    let plan = window_plan(n, window, stride).unwrap();
                    let mut count = vec![0; n];
                    for w in &plan {
                        assert!(w.fed().len() <= window && !w.targets.is_empty());
                        for j in w.targets.clone() {
                            count[j] += 1;
                            // Target j is predicted from inside the window, with j - start tokens of context.
                            let ctx = j - w.start;
                            assert!(ctx >= 1 && ctx <= window);
                            assert!(ctx >= (window - stride + 1).min(j), "n {n} w {window} s {stride} j {j}");
                        }
                    }
                    let want: Vec<usize> = (0..n).map(|j| usize::from(j >= 1)).collect();
                    assert_eq!(count, want, "n {n} window {window} stride {stride}");
                }
            }
        }
        assert!(window_plan(10, 4, 5).is_err() && window_plan(10, 0, 0).is_err());
        // Hand-checked: 10 tokens, window 4, stride 2.
        let p = window_plan(10, 4, 2).unwrap();
        let got: Vec<(usize, Range<usize>)> = p.iter().map(|w| (w.start, w.targets.clone())).collect();
        assert_eq!(got, vec![(0, 1..5), (2, 5..7), (4, 7..9), (6, 9..10)]);
    }

    #[test]
    fn prompted_plan_scores_every_target_after_the_prompt_once() {
        for n in 0..40 {
            for window in 2..10 {
                for prompt in 0..window {
                    for stride in 1..=window - prompt {
                        let plan = window_plan_prompted(n, window, stride, prompt).unwrap();
                        let mut count = vec![0; n];
                        for w in &plan {
                            assert!(w.fed().len() <= window && !w.targets.is_empty());
                            for j in w.targets.clone() {
                                count[j] += 1;
                                // Predicted by the second step: at least prompt + 1 tokens of context.
                                assert!(j - w.start > prompt && j - w.start <= window, "n {n} w {window} p {prompt}");
                            }
                        }
                        let want: Vec<usize> = (0..n).map(|j| usize::from(j > prompt)).collect();
                        assert_eq!(count, want, "n {n} window {window} stride {stride} prompt {prompt}");
                    }
                }
            }
        }
        assert!(window_plan_prompted(10, 4, 2, 3).is_err(), "stride > window - prompt leaves gaps");
        assert!(window_plan_prompted(10, 4, 1, 4).is_err(), "prompt must be shorter than the window");
        // Hand-checked: 10 tokens, window 5, stride 3, prompt 2.
        let p = window_plan_prompted(10, 5, 3, 2).unwrap();
        let got: Vec<(usize, Range<usize>)> = p.iter().map(|w| (w.start, w.targets.clone())).collect();
        assert_eq!(got, vec![(0, 3..6), (3, 6..9), (6, 9..10)]);
    }

    #[test]
    fn prompted_evaluation_feeds_the_prompt_as_its_own_step() {
        let tokens = [0u32, 1, 2, 3, 0, 2];
        let mut b = Counting { past: 0, calls: Vec::new() };
        // window 4, stride 2, prompt 2: windows (0, targets 3..5) and (2, targets 5..6).
        let r = evaluate_prompted(&mut b, &tokens, 4, 2, 2, |_| {}).unwrap();
        assert_eq!(b.calls, vec![2, 2, 2, 1]);
        // Targets 3, 4 (p = 1/2) and 5 (0 → 2, p = 1/6).
        let want = (2.0 * 2f64.ln() + 6f64.ln()) / 3.0;
        assert!((r.mean_nll - want).abs() < 1e-6 && r.scored == 3 && r.prompt == 2, "{r:?}");
        assert!(matches!(evaluate_prompted(&mut b, &tokens[..3], 4, 2, 2, |_| {}), Err(EvalError::TooShort(3))));
    }

    #[test]
    fn nll_by_hand() {
        // Uniform over 4: ln 4.
        assert!((token_nll(&[0.0; 4], 2) - 4f64.ln()).abs() < 1e-12);
        // logits [ln 1, ln 3]: p(1) = 3/4.
        let row = [0.0f32, 3f32.ln()];
        assert!((token_nll(&row, 1) - (4.0f64 / 3.0).ln()).abs() < 1e-6);
        assert!((token_nll(&row, 0) - 4f64.ln()).abs() < 1e-6);
        // Shifting every logit changes nothing; huge logits do not overflow.
        let big = [1000.0f32, 1000.0 + 3f32.ln()];
        assert!((token_nll(&big, 1) - (4.0f64 / 3.0).ln()).abs() < 1e-4);
    }

    /// A fake backend whose logits make the next token's probability known: p(target) = 1/2 when the
    /// target equals the previous token + 1, else uniform share of the rest.
    struct Counting {
        past: usize,
        calls: Vec<usize>,
    }
    impl Backend for Counting {
        fn name(&self) -> &str {
            "counting"
        }
        fn vocab_size(&self) -> usize {
            4
        }
        fn context_length(&self) -> usize {
            8
        }
        fn position(&self) -> usize {
            self.past
        }
        fn forward(&mut self, tokens: &[u32]) -> Result<kiln_runtime::Logits, RuntimeError> {
            self.calls.push(tokens.len());
            let mut data = Vec::new();
            for &t in tokens {
                // logit ln 3 for t+1 (mod 4), 0 elsewhere: p = 3/6 = 1/2, others 1/6.
                for v in 0..4u32 {
                    data.push(if v == (t + 1) % 4 { 3f32.ln() } else { 0.0 });
                }
            }
            self.past += tokens.len();
            Ok(kiln_runtime::Logits { rows: tokens.len(), vocab: 4, data })
        }
        fn reset(&mut self) {
            self.past = 0;
        }
    }

    #[test]
    fn perplexity_from_known_logits() {
        // 0 1 2 3 0 | 2: five targets, four predicted with p = 1/2, one (0 → 2) with p = 1/6.
        let tokens = [0u32, 1, 2, 3, 0, 2];
        let mut b = Counting { past: 0, calls: Vec::new() };
        let r = evaluate(&mut b, &tokens, 3, 2, |_| {}).unwrap();
        let want = (4.0 * 2f64.ln() + 6f64.ln()) / 5.0;
        assert!((r.mean_nll - want).abs() < 1e-6, "{} vs {want}", r.mean_nll);
        assert!((r.perplexity - want.exp()).abs() < 1e-5);
        assert_eq!((r.scored, r.windows), (5, 2));
        assert_eq!(b.calls, vec![3, 3]); // tokens 0..3, then 2..5
        assert!(matches!(evaluate(&mut b, &[1], 3, 2, |_| {}), Err(EvalError::TooShort(1))));
        assert!(matches!(evaluate(&mut b, &[0; 12], 9, 2, |_| {}), Err(EvalError::Context { .. })));
        // Teacher-forced decoding scores the same targets with the same (context-free) fake logits.
        let mut b = Counting { past: 0, calls: Vec::new() };
        let s = evaluate_stepwise(&mut b, &tokens, 2, |_| {}).unwrap();
        assert!((s.mean_nll - want).abs() < 1e-6 && s.scored == 5);
        assert_eq!(b.calls, vec![2, 1, 1, 1]);
    }
}
