//! `y[t, n] = x[t, k] · w[n, k]ᵀ (+ bias[n])` in f32 (rayon over output rows).
use rayon::prelude::*;

/// Row-major linear layer. `x` is [t, k], `w` is [n, k], `y` is [t, n].
pub fn linear(x: &[f32], w: &[f32], bias: Option<&[f32]>, k: usize, y: &mut [f32]) {
    let n = w.len() / k;
    assert_eq!(w.len(), n * k, "cpu::linear: w is not [n, {k}]");
    let t = x.len() / k;
    assert_eq!(y.len(), t * n, "cpu::linear: y is not [{t}, {n}]");
    if let Some(b) = bias {
        assert_eq!(b.len(), n, "cpu::linear: bias is not [{n}]");
    }
    // Parallel over rows and, inside a row, blocks of 64 outputs, so small t uses every core.
    const NB: usize = 64;
    y.par_chunks_mut(n).enumerate().for_each(|(r, yr)| {
        let xr = &x[r * k..(r + 1) * k];
        yr.par_chunks_mut(NB).enumerate().for_each(|(nb, out)| {
            for (j, o) in out.iter_mut().enumerate() {
                let col = nb * NB + j;
                let wr = &w[col * k..(col + 1) * k];
                *o = dot(xr, wr) + bias.map_or(0.0, |b| b[col]);
            }
        });
    });
}

/// Dot product with 8 independent accumulators (vectorises; stable order).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] += a[c * 8 + l] * b[c * 8 + l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 8..a.len() {
        s += a[i] * b[i];
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn linear_small_hand_case() {
        // x = [[1, 2, 3]], w = [[1, 0, -1], [0.5, 0.5, 0.5]], bias = [10, -1]
        let x = [1.0, 2.0, 3.0, -1.0, 0.0, 2.0];
        let w = [1.0, 0.0, -1.0, 0.5, 0.5, 0.5];
        let mut y = [0.0; 4];
        super::linear(&x, &w, Some(&[10.0, -1.0]), 3, &mut y);
        assert_eq!(y, [8.0, 2.0, 7.0, -0.5]);
    }
}
