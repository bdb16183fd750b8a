//! Rotate-half rotary position embedding, head_dim 128, and the per-architecture numerics.
//!
//! `inv_freq[i] = 1 / theta^(2i/128)` as the correctly rounded f32 (computed through f64; the
//! GPU kernel computes it the same way, PyTorch's f32 `pow` is within an ulp of it), the angle
//! `f32(pos) * inv_freq[i]` in f32, then for i < 64:
//! `y[i] = x[i]*cos - x[i+64]*sin`, `y[i+64] = x[i+64]*cos + x[i]*sin`.
use rayon::prelude::*;

use crate::config::{Arch, HEAD_DIM};

const HALF: usize = HEAD_DIM / 2;

/// How cos/sin enter the rotation (the models differ).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeMode {
    /// LLaDA: rotation in f32 (`rope_full_precision`), one rounding at the end.
    Llada,
    /// Dream (HF Qwen2): cos/sin computed in f32, cast to the activation dtype (bf16) first.
    Dream,
}

impl RopeMode {
    pub fn for_arch(arch: Arch) -> Self {
        match arch {
            Arch::Llada => RopeMode::Llada,
            // LLaDA-MoE's (OLMoE) rotary embedding returns cos/sin cast to the activation dtype.
            Arch::Dream | Arch::LladaMoe | Arch::Llada2 => RopeMode::Dream,
        }
    }
}

/// `inv_freq[i]` for `i < 64`, with theta taken as f32 like the kernel's parameter.
pub fn inv_freq(theta: f64, i: usize) -> f32 {
    let theta = theta as f32 as f64;
    (1.0 / theta.powf((2 * i) as f64 / HEAD_DIM as f64)) as f32
}

/// (cos, sin) of the 64 angles of `pos`; in Dream mode rounded to bf16.
pub fn cos_sin(pos: u32, theta: f64, mode: RopeMode) -> ([f32; HALF], [f32; HALF]) {
    let mut c = [0f32; HALF];
    let mut s = [0f32; HALF];
    for i in 0..HALF {
        let ang = (pos as f32 * inv_freq(theta, i)) as f64;
        c[i] = ang.cos() as f32;
        s[i] = ang.sin() as f32;
        if mode == RopeMode::Dream {
            c[i] = half::bf16::from_f32(c[i]).to_f32();
            s[i] = half::bf16::from_f32(s[i]).to_f32();
        }
    }
    (c, s)
}

/// Rotates heads `[col_offset, col_offset + n_heads*128)` of each row of `x` (rows of
/// `row_stride` elements; row r at position `positions[r]`) in place, in f32.
pub fn rope_inplace(
    x: &mut [f32],
    row_stride: usize,
    col_offset: usize,
    n_heads: usize,
    positions: &[u32],
    theta: f64,
    mode: RopeMode,
) {
    let rows = positions.len();
    assert!(
        col_offset + n_heads * HEAD_DIM <= row_stride,
        "rope_inplace: heads overrun the row"
    );
    assert!(
        x.len() >= rows * row_stride,
        "rope_inplace: x has fewer than {rows} rows"
    );
    x[..rows * row_stride]
        .par_chunks_mut(row_stride)
        .zip(positions.par_iter())
        .for_each(|(row, &pos)| {
            let (c, s) = cos_sin(pos, theta, mode);
            for head in row[col_offset..col_offset + n_heads * HEAD_DIM].chunks_mut(HEAD_DIM) {
                let (lo, hi) = head.split_at_mut(HALF);
                for i in 0..HALF {
                    let (a, b) = (lo[i], hi[i]);
                    lo[i] = a * c[i] - b * s[i];
                    hi[i] = b * c[i] + a * s[i];
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_zero_is_identity() {
        let mut x: Vec<f32> = (0..2 * HEAD_DIM).map(|i| i as f32 * 0.25 - 7.0).collect();
        let orig = x.clone();
        rope_inplace(&mut x, 2 * HEAD_DIM, 0, 2, &[0], 10000.0, RopeMode::Llada);
        assert_eq!(x, orig);
    }

    #[test]
    fn rotates_pairs_by_hand_computed_angles() {
        // Row of [pad(3) | one head]: x[i] = 1, x[i+64] = 2 for all i; position 3, theta 100.
        let stride = 3 + HEAD_DIM;
        let mut x = vec![0.5f32; stride];
        x[3..3 + HALF].iter_mut().for_each(|v| *v = 1.0);
        x[3 + HALF..].iter_mut().for_each(|v| *v = 2.0);
        rope_inplace(&mut x, stride, 3, 1, &[3], 100.0, RopeMode::Llada);
        assert_eq!(&x[..3], &[0.5; 3]);
        for i in [0usize, 1, 32, 63] {
            let ang = 3.0 * 100f64.powf(-(2.0 * i as f64) / 128.0);
            let (c, s) = (ang.cos(), ang.sin());
            let (y1, y2) = (c - 2.0 * s, 2.0 * c + s);
            assert!(
                (x[3 + i] as f64 - y1).abs() < 1e-5,
                "i={i}: {} vs {y1}",
                x[3 + i]
            );
            assert!(
                (x[3 + HALF + i] as f64 - y2).abs() < 1e-5,
                "i={i}: {} vs {y2}",
                x[3 + HALF + i]
            );
        }
        // i = 0: angle 3 rad exactly.
        assert!((x[3] - (3f32.cos() - 2.0 * 3f32.sin())).abs() < 1e-6);
    }

    #[test]
    fn dream_mode_rounds_cos_sin_to_bf16() {
        let (c, s) = cos_sin(1, 10000.0, RopeMode::Dream);
        // angle 1 rad at i = 0: cos 0.5403 -> bf16 0.5390625, sin 0.8415 -> bf16 0.83984375.
        assert_eq!((c[0], s[0]), (0.5390625, 0.83984375));
        let (cl, _) = cos_sin(1, 10000.0, RopeMode::Llada);
        assert!((cl[0] - 1f32.cos()).abs() < 1e-7);
        assert_eq!(RopeMode::for_arch(Arch::Dream), RopeMode::Dream);
        assert_eq!(RopeMode::for_arch(Arch::Llada), RopeMode::Llada);
    }
}
