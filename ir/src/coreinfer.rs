//! CoreInfer's core-neuron selection (Wang et al., 2024), shared by the interpreter (the oracle) and the
//! code generator, so both use the same integer rules.
//!
//! For one prompt chunk of `s` tokens with MLP activations `a[s, C]` (`a = silu(gate) · up`):
//! - **token-wise core**: token t's core neurons are the channels whose `|a[t, c]|` is at least the
//!   `k`-th largest `|a[t, ·]|`, `k = core_k(alpha, C)` — the top α share, ties at the boundary kept
//!   (so at least `k` channels). `|a|` is compared by its f32 bit pattern (the order of non-negative
//!   floats; a NaN ranks above +∞, so a broken activation shows up as core rather than vanishing);
//! - **sentence-wise core**: channel c is core when it is token-wise core for at least a β share of the
//!   chunk's tokens: `count[c] ≥ β·s − 1e-6` (f64; the tolerance absorbs the rounding of β, e.g. β = 0.2
//!   of 5 tokens means 1 token).

/// Tokens' core size `k = ceil(α·C)`, at least 1 and at most `c` (α in (0, 1]).
pub fn core_k(alpha: f32, c: usize) -> usize {
    let k = (alpha as f64 * c as f64 - 1e-6).ceil();
    (k.max(1.0) as usize).min(c.max(1))
}

/// Whether a channel token-wise core for `count` of `s` tokens is sentence-wise core.
pub fn is_core(count: usize, s: usize, beta: f32) -> bool {
    count as f64 >= beta as f64 * s as f64 - 1e-6
}

/// `|x|` as an ordered integer key (non-negative floats order as their bit patterns).
pub fn abs_key(x: f32) -> u32 {
    x.to_bits() & 0x7fff_ffff
}

/// The key of the `k`-th largest `|x|` of `row` (`1 ≤ k ≤ row.len()`).
pub fn kth_largest_key(row: &[f32], k: usize) -> u32 {
    let mut keys: Vec<u32> = row.iter().map(|&x| abs_key(x)).collect();
    keys.sort_unstable_by(|a, b| b.cmp(a));
    keys[k - 1]
}

/// The sentence-wise core set (1.0 core, 0.0 not) of one chunk's activations `act[s, c]`.
pub fn core_set(act: &[f32], s: usize, c: usize, alpha: f32, beta: f32) -> Vec<f32> {
    let k = core_k(alpha, c);
    let mut count = vec![0usize; c];
    for row in act.chunks(c.max(1)).take(s) {
        let t = kth_largest_key(row, k);
        for (n, &x) in count.iter_mut().zip(row) {
            *n += (abs_key(x) >= t) as usize;
        }
    }
    count.iter().map(|&n| if is_core(n, s, beta) { 1.0 } else { 0.0 }).collect()
}

/// Checks CoreInfer's parameters: α in (0, 1], β in [0, 1].
pub fn validate(alpha: f32, beta: f32) -> Result<(), String> {
    if !(alpha > 0.0 && alpha <= 1.0) {
        return Err(format!("coreinfer alpha {alpha} is outside (0, 1]"));
    }
    if !(0.0..=1.0).contains(&beta) {
        return Err(format!("coreinfer beta {beta} is outside [0, 1]"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_k_rounds_up_and_stays_in_range() {
        assert_eq!(core_k(0.4, 1536), 615); // 614.4 → 615
        assert_eq!(core_k(0.25, 8), 2); // exactly 2, not 3 from rounding of 0.25
        assert_eq!(core_k(0.2, 5), 1);
        assert_eq!(core_k(1.0, 7), 7);
        assert_eq!(core_k(1e-9, 7), 1);
    }

    #[test]
    fn sentence_core_by_hand() {
        // 4 channels, α = 0.5 → k = 2 per token.
        let act = [
            3.0, -5.0, 1.0, 0.0, // token 0: core {0, 1}
            0.5, 4.0, -4.0, 1.0, // token 1: core {1, 2}
            1.0, 1.0, 1.0, 2.0, // token 2: 2 is the largest, then a 3-way tie at 1: core {0, 1, 2, 3}
        ];
        // counts: c0 2, c1 3, c2 2, c3 1
        assert_eq!(core_set(&act, 3, 4, 0.5, 1.0), vec![0.0, 1.0, 0.0, 0.0]);
        assert_eq!(core_set(&act, 3, 4, 0.5, 0.5), vec![1.0, 1.0, 1.0, 0.0]); // ≥ 1.5
        assert_eq!(core_set(&act, 3, 4, 0.5, 0.3), vec![1.0; 4]); // ≥ 0.9
        assert_eq!(core_set(&act, 3, 4, 0.5, 0.0), vec![1.0; 4]);
        assert_eq!(core_set(&act, 3, 4, 1.0, 1.0), vec![1.0; 4]);
        // β = 0.2 of 5 tokens is one token, despite 0.2f32 · 5 > 1 in f64.
        assert!(is_core(1, 5, 0.2) && !is_core(0, 5, 0.2));
    }

    #[test]
    fn bad_parameters_are_refused() {
        assert!(validate(0.0, 0.5).is_err());
        assert!(validate(1.5, 0.5).is_err());
        assert!(validate(f32::NAN, 0.5).is_err());
        assert!(validate(0.5, -0.1).is_err());
        assert!(validate(0.5, 1.1).is_err());
        assert!(validate(0.5, 0.5).is_ok() && validate(1.0, 0.0).is_ok());
    }
}
