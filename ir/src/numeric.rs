//! Arithmetic shared by the interpreter and the reference forms of techniques (`flex`), kept apart so
//! neither depends on the other.

/// Dot product accumulated in f64 with four independent lanes.
pub fn dot(a: &[f32], b: &[f32]) -> f64 {
    let mut acc = [0f64; 4];
    let chunks = a.len() / 4;
    for i in 0..chunks {
        for l in 0..4 {
            acc[l] += a[4 * i + l] as f64 * b[4 * i + l] as f64;
        }
    }
    let mut s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for i in chunks * 4..a.len() {
        s += a[i] as f64 * b[i] as f64;
    }
    s
}
