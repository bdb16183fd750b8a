//! RMSNorm and the residual add that precedes it (the fused GPU kernel's two halves).
use rayon::prelude::*;

/// `out[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * w`, rows = `x.len() / w.len()`.
/// The sum of squares is accumulated in f64; everything else is f32.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let hidden = w.len();
    assert!(
        hidden > 0 && x.len().is_multiple_of(hidden),
        "rms_norm: x is not [rows, {hidden}]"
    );
    assert_eq!(out.len(), x.len(), "rms_norm: out and x differ in length");
    out.par_chunks_mut(hidden)
        .zip(x.par_chunks(hidden))
        .for_each(|(o, xr)| {
            let ss: f64 = xr.iter().map(|&v| (v as f64) * (v as f64)).sum();
            let inv = 1.0 / ((ss / hidden as f64) as f32 + eps).sqrt();
            for ((o, &v), &wv) in o.iter_mut().zip(xr).zip(w) {
                *o = v * inv * wv;
            }
        });
}

/// `x += d` elementwise (the residual add).
pub fn add_inplace(x: &mut [f32], d: &[f32]) {
    assert_eq!(x.len(), d.len(), "add_inplace: lengths differ");
    x.par_iter_mut()
        .zip(d.par_iter())
        .for_each(|(a, &b)| *a += b);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_each_row() {
        // Row 0: [3, 4] -> mean square 12.5; row 1: [1, -1] -> mean square 1.
        let x = [3.0, 4.0, 1.0, -1.0];
        let w = [2.0, 0.5];
        let mut out = [f32::NAN; 4];
        rms_norm(&x, &w, 0.0, &mut out);
        let s = 12.5f32.sqrt();
        let want = [3.0 / s * 2.0, 4.0 / s * 0.5, 2.0, -0.5];
        for (g, w) in out.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{out:?} vs {want:?}");
        }
    }

    #[test]
    fn eps_is_added_to_the_mean_square() {
        let mut out = [0.0f32; 2];
        rms_norm(&[0.5, -0.5], &[1.5, 1.5], 0.75, &mut out);
        // mean square 0.25, + 0.75 = 1 -> out = x * w
        assert_eq!(out, [0.75, -0.75]);
    }

    #[test]
    fn adds_in_place() {
        let mut x = [1.5, -2.0, 0.25];
        add_inplace(&mut x, &[0.5, 3.0, -1.25]);
        assert_eq!(x, [2.0, 1.0, -1.0]);
    }
}
