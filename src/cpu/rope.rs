//! Rotate-half rotary position embedding, head_dim 128, and the per-architecture numerics.
//!
//! `inv_freq[i] = 1 / theta^(2i/128)` as the correctly rounded f32 (computed through f64; the
//! GPU kernel computes it the same way, PyTorch's f32 `pow` is within an ulp of it), the angle
//! `f32(pos) * inv_freq[i]` in f32, then for i < 64:
//! `y[i] = x[i]*cos - x[i+64]*sin`, `y[i+64] = x[i+64]*cos + x[i]*sin`.
//!
//! Also the bf16 reference of the fused op's options ([`RopeExtras`]: per-head q/k RMSNorm and
//! partial RoPE), [`rope_qk_bf16`], which follows `rope_qknorm_kv_store_bf16`'s rounding points.
use rayon::prelude::*;

use crate::config::{Arch, HEAD_DIM};
use crate::error::{Error, Result};

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
    inv_freq_rot(theta, i, HEAD_DIM)
}

/// `inv_freq[i] = 1 / theta^(2i / rot)` for `i < rot / 2` (partial RoPE over `rot` dims; as
/// `cpu::llada2::partial_rope_inplace` and the kernel compute it).
pub fn inv_freq_rot(theta: f64, i: usize, rot: usize) -> f32 {
    let theta = theta as f32 as f64;
    (1.0 / theta.powf((2 * i) as f64 / rot as f64)) as f32
}

/// (cos, sin) of the 64 angles of `pos`; in Dream mode rounded to bf16.
pub fn cos_sin(pos: u32, theta: f64, mode: RopeMode) -> ([f32; HALF], [f32; HALF]) {
    cos_sin_rot(pos, theta, mode, HEAD_DIM)
}

/// (cos, sin) of the `rot / 2` angles of `pos` over `rot` rotary dims (entries from `rot / 2`
/// on are 0); in Dream mode rounded to bf16.
pub fn cos_sin_rot(pos: u32, theta: f64, mode: RopeMode, rot: usize) -> ([f32; HALF], [f32; HALF]) {
    let mut c = [0f32; HALF];
    let mut s = [0f32; HALF];
    for i in 0..rot.min(HEAD_DIM) / 2 {
        let ang = (pos as f32 * inv_freq_rot(theta, i, rot)) as f64;
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

/// Options of the fused RoPE + kv_store beyond a full rotation: per-head q/k RMSNorm before the
/// rotation (LLaDA-MoE, LLaDA2) and partial RoPE (LLaDA2). `W` holds a norm weight of
/// `HEAD_DIM` values: `&DTensor<bf16>` for `ops::rope::rope_kv_store`, `&[f32]` (bf16 values)
/// for [`rope_qk_bf16`]. [`RopeExtras::none`] (the `Default`) is the plain full rotation.
#[derive(Clone, Copy, Debug)]
pub struct RopeExtras<W> {
    /// RMSNorm weight `[128]` of every q head (`query_layernorm` / `q_norm`), or none.
    pub q_norm: Option<W>,
    /// RMSNorm weight `[128]` of every k head (`key_layernorm` / `k_norm`), or none.
    pub k_norm: Option<W>,
    /// The norms' epsilon (read only when a norm is given; then finite and > 0).
    pub eps: f32,
    /// Dims of each head that rotate: rotate-half over `[0, rotary_dim)`, pairs
    /// `(i, i + rotary_dim/2)`, `inv_freq` over `rotary_dim`; the rest pass through. Even, in
    /// `2..=128`; 128 is the full rotation.
    pub rotary_dim: usize,
}

impl<W> RopeExtras<W> {
    /// No norm, full rotation: today's `rope_kv_store`.
    pub const fn none() -> Self {
        RopeExtras { q_norm: None, k_norm: None, eps: 0.0, rotary_dim: HEAD_DIM }
    }

    /// True when nothing differs from [`RopeExtras::none`] (the GPU op then runs the plain kernel).
    pub fn is_none(&self) -> bool {
        self.q_norm.is_none() && self.k_norm.is_none() && self.rotary_dim == HEAD_DIM
    }

    /// Checks `rotary_dim` and (with a norm) `eps`; errors name the field and `op`.
    pub fn check_scalars(&self, op: &str) -> Result<()> {
        let r = self.rotary_dim;
        if !(2..=HEAD_DIM).contains(&r) || !r.is_multiple_of(2) {
            return Err(Error::bad_input(format!(
                "{op}: rotary_dim {r} must be even and in 2..={HEAD_DIM}"
            )));
        }
        let norm = self.q_norm.is_some() || self.k_norm.is_some();
        if norm && !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(Error::bad_input(format!(
                "{op}: q/k norm eps {} must be finite and > 0",
                self.eps
            )));
        }
        Ok(())
    }
}

impl<W> Default for RopeExtras<W> {
    fn default() -> Self {
        Self::none()
    }
}

fn bf(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

/// The kernel's per-head RMSNorm of one head (128 bf16 values held in f32, in place), step for
/// step: the head's 8 lanes each sum the squares of their 16 values (lane j: dims
/// `[8j, 8j+8)` then `[64+8j, 64+8j+8)`) with an f32 fma chain; the 8 partial sums meet in a
/// butterfly (xor 1, 2, 4: `((p0+p1)+(p2+p3))+((p4+p5)+(p6+p7))`); `inv = 1 / sqrt(ss/128 + eps)`
/// with every step rounded to f32; then `x = bf16(w · bf16(x · inv))`, the official bf16
/// module's rounding points (normalise in f32, cast to bf16, times the bf16 weight in bf16).
pub fn head_norm_bf16(head: &mut [f32], w: &[f32], eps: f32) {
    assert!(head.len() == HEAD_DIM && w.len() == HEAD_DIM, "head_norm_bf16: head and weight are 128 values");
    let mut p = [0f32; 8];
    for (j, pj) in p.iter_mut().enumerate() {
        for base in [8 * j, HALF + 8 * j] {
            for &x in &head[base..base + 8] {
                *pj = x.mul_add(x, *pj);
            }
        }
    }
    for off in [1, 2, 4] {
        p = std::array::from_fn(|j| p[j] + p[j ^ off]);
    }
    let inv = 1.0 / (p[0] / HEAD_DIM as f32 + eps).sqrt();
    for (x, &wv) in head.iter_mut().zip(w) {
        *x = bf(wv * bf(*x * inv));
    }
}

/// Rotate-half over the first `rot` dims of one head (bf16 values in f32, in place) with the
/// kernel's rounding: LLaDA `bf16(a·c − b·s)`, `bf16(b·c + a·s)` (products and sum each rounded
/// to f32, no fma); Dream `bf16(bf16(a·c) + bf16(−b·s))`, `bf16(bf16(b·c) + bf16(a·s))`.
fn rotate_head_bf16(head: &mut [f32], c: &[f32], s: &[f32], rot: usize, mode: RopeMode) {
    let half = rot / 2;
    for i in 0..half {
        let (a, b) = (head[i], head[i + half]);
        let (y1, y2) = match mode {
            RopeMode::Llada => (a * c[i] - b * s[i], b * c[i] + a * s[i]),
            RopeMode::Dream => (bf(a * c[i]) + bf(-b * s[i]), bf(b * c[i]) + bf(a * s[i])),
        };
        head[i] = bf(y1);
        head[i + half] = bf(y2);
    }
}

/// Reference of the fused op's q and k (`rope_qknorm_kv_store_bf16`, and `rope_kv_store_bf16`
/// up to its fma pattern): `qkv` is `[positions.len(), (n_heads + 2·n_kv_heads)·128]` of bf16
/// values in f32 (q | k | v). Every q head becomes `rotate(norm_q(x))` and every k head
/// `rotate(norm_k(x))` in place (a missing norm is skipped; see [`head_norm_bf16`] and the
/// rotation's rounding above), v is left as it is. With [`RopeExtras::none`] in LLaDA mode this
/// is `bf16` of [`rope_inplace`]'s result, bit for bit.
pub fn rope_qk_bf16(
    qkv: &mut [f32],
    n_heads: usize,
    n_kv_heads: usize,
    positions: &[u32],
    theta: f64,
    mode: RopeMode,
    ex: &RopeExtras<&[f32]>,
) {
    ex.check_scalars("rope_qk_bf16").unwrap_or_else(|e| panic!("{e}"));
    for w in [ex.q_norm, ex.k_norm].into_iter().flatten() {
        assert_eq!(w.len(), HEAD_DIM, "rope_qk_bf16: a norm weight has {} values", w.len());
    }
    let stride = (n_heads + 2 * n_kv_heads) * HEAD_DIM;
    let rows = positions.len();
    assert!(qkv.len() >= rows * stride, "rope_qk_bf16: qkv has fewer than {rows} rows");
    qkv[..rows * stride].par_chunks_mut(stride).zip(positions.par_iter()).for_each(|(row, &pos)| {
        let (c, s) = cos_sin_rot(pos, theta, mode, ex.rotary_dim);
        for (h, head) in row[..(n_heads + n_kv_heads) * HEAD_DIM].chunks_mut(HEAD_DIM).enumerate() {
            if let Some(w) = if h < n_heads { ex.q_norm } else { ex.k_norm } {
                head_norm_bf16(head, w, ex.eps);
            }
            rotate_head_bf16(head, &c, &s, ex.rotary_dim, mode);
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

#[cfg(test)]
mod qk_tests {
    use super::*;
    use crate::cpu::{llada2, moe};
    use rand::{Rng, SeedableRng};

    /// Seeded N(0, std²)-ish values rounded to bf16 (sum of uniforms; never zeros or ones).
    fn rand_bf16(rng: &mut rand::rngs::StdRng, n: usize, mean: f32, std: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let u: f32 = (0..4).map(|_| rng.gen::<f32>()).sum::<f32>() - 2.0;
                bf(mean + std * u * 1.7)
            })
            .collect()
    }

    fn positions(rng: &mut rand::rngs::StdRng, rows: usize) -> Vec<u32> {
        (0..rows).map(|r| if r % 5 == 3 { rng.gen_range(1 << 20..1 << 31) } else { rng.gen_range(0..4096) }).collect()
    }

    fn bits_equal(what: &str, got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        let bad: Vec<usize> = (0..got.len()).filter(|&i| got[i].to_bits() != want[i].to_bits()).collect();
        assert!(bad.is_empty(), "{what}: {} of {} differ, first [{}] {} vs {}", bad.len(), got.len(), bad[0], got[bad[0]], want[bad[0]]);
    }

    #[test]
    fn without_extras_llada_mode_is_the_f32_reference_rounded_bit_for_bit() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(101);
        let (rows, nh, nkv) = (19usize, 4usize, 2usize);
        let stride = (nh + 2 * nkv) * HEAD_DIM;
        let x = rand_bf16(&mut rng, rows * stride, 0.0, 1.0);
        let pos = positions(&mut rng, rows);
        let mut got = x.clone();
        rope_qk_bf16(&mut got, nh, nkv, &pos, 500000.0, RopeMode::Llada, &RopeExtras::none());
        let mut want = x.clone();
        rope_inplace(&mut want, stride, 0, nh + nkv, &pos, 500000.0, RopeMode::Llada);
        want.iter_mut().for_each(|v| *v = bf(*v));
        bits_equal("llada, no extras", &got, &want);
        // Dream mode: three bf16 roundings instead of one, so within a few bf16 ulps of |x|.
        let mut got = x.clone();
        rope_qk_bf16(&mut got, nh, nkv, &pos, 1e6, RopeMode::Dream, &RopeExtras::none());
        let mut want = x.clone();
        rope_inplace(&mut want, stride, 0, nh + nkv, &pos, 1e6, RopeMode::Dream);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 3e-2 + 1e-2 * w.abs(), "dream [{i}]: {g} vs {w}");
        }
        assert_eq!(&got[(nh + nkv) * HEAD_DIM..stride], &x[(nh + nkv) * HEAD_DIM..stride], "v untouched");
    }

    #[test]
    fn partial_rope_without_norm_is_the_llada2_reference_rounded_bit_for_bit() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(102);
        let (rows, nh, nkv) = (7usize, 3usize, 1usize);
        let stride = (nh + 2 * nkv) * HEAD_DIM;
        let x = rand_bf16(&mut rng, rows * stride, 0.0, 1.0);
        let pos = positions(&mut rng, rows);
        for rot in [2usize, 34, 64, 126, 128] {
            let ex = RopeExtras { rotary_dim: rot, ..RopeExtras::none() };
            let mut got = x.clone();
            rope_qk_bf16(&mut got, nh, nkv, &pos, 600000.0, RopeMode::Llada, &ex);
            let mut want = x.clone();
            llada2::partial_rope_inplace(&mut want, stride, 0, nh + nkv, HEAD_DIM, rot, &pos, 600000.0);
            want.iter_mut().for_each(|v| *v = bf(*v));
            bits_equal(&format!("rot {rot}"), &got, &want);
            for r in 0..rows {
                for h in 0..nh + nkv {
                    let b = r * stride + h * HEAD_DIM;
                    assert_eq!(&got[b + rot..b + HEAD_DIM], &x[b + rot..b + HEAD_DIM], "rot {rot}: pass-through dims");
                }
            }
        }
    }

    #[test]
    fn head_norm_matches_the_f32_reference_within_its_two_bf16_roundings() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(103);
        for (scale, eps) in [(1.0f32, 1e-6f32), (37.0, 1e-5), (0.003, 1e-6)] {
            let x = rand_bf16(&mut rng, 3 * HEAD_DIM, 0.1 * scale, scale);
            let w = rand_bf16(&mut rng, HEAD_DIM, 1.0, 0.3);
            let mut want = x.clone();
            moe::head_rms_norm_inplace(&mut want, 3 * HEAD_DIM, 0, 3, &w, eps);
            for h in 0..3 {
                let mut got = x[h * HEAD_DIM..(h + 1) * HEAD_DIM].to_vec();
                head_norm_bf16(&mut got, &w, eps);
                for (i, (g, &wv)) in got.iter().zip(&want[h * HEAD_DIM..]).enumerate() {
                    assert_eq!(*g, bf(*g), "output is bf16");
                    // bf16(x·inv) then bf16(w·that): two roundings of at most 2^-8 relative
                    // each (bf16 keeps 8 significant bits), plus f32 noise.
                    assert!((g - wv).abs() <= 2.02 * 2f32.powi(-8) * wv.abs(), "scale {scale} head {h} [{i}]: {g} vs {wv}");
                }
            }
        }
    }

    #[test]
    fn norm_then_rope_is_the_norm_at_position_zero_and_each_weight_hits_its_heads() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(104);
        let (rows, nh, nkv) = (5usize, 4usize, 2usize);
        let stride = (nh + 2 * nkv) * HEAD_DIM;
        let x = rand_bf16(&mut rng, rows * stride, 0.2, 2.0);
        let (wq, wk) = (rand_bf16(&mut rng, HEAD_DIM, 1.0, 0.3), rand_bf16(&mut rng, HEAD_DIM, 0.8, 0.3));
        for mode in [RopeMode::Llada, RopeMode::Dream] {
            let ex = RopeExtras { q_norm: Some(&wq[..]), k_norm: Some(&wk[..]), eps: 1e-6, rotary_dim: 64 };
            let mut got = x.clone();
            rope_qk_bf16(&mut got, nh, nkv, &[0; 5], 600000.0, mode, &ex);
            let mut want = x.clone();
            for r in 0..rows {
                for h in 0..nh + nkv {
                    let b = r * stride + h * HEAD_DIM;
                    head_norm_bf16(&mut want[b..b + HEAD_DIM], if h < nh { &wq } else { &wk }, 1e-6);
                }
            }
            bits_equal(&format!("{mode:?} pos 0"), &got, &want);
            // Only q normed: k heads are rotated raw (position 0: unchanged).
            let ex = RopeExtras { k_norm: None, ..ex };
            let mut got_q = x.clone();
            rope_qk_bf16(&mut got_q, nh, nkv, &[0; 5], 600000.0, mode, &ex);
            for r in 0..rows {
                let b = r * stride;
                assert_eq!(&got_q[b..b + nh * HEAD_DIM], &want[b..b + nh * HEAD_DIM]);
                assert_eq!(&got_q[b + nh * HEAD_DIM..b + stride], &x[b + nh * HEAD_DIM..b + stride]);
            }
        }
    }

    #[test]
    fn bad_extras_are_refused_naming_the_field() {
        let w = [1f32; HEAD_DIM];
        for rot in [0usize, 1, 3, 63, 130, 256] {
            let ex: RopeExtras<&[f32]> = RopeExtras { rotary_dim: rot, ..RopeExtras::none() };
            let e = ex.check_scalars("op").unwrap_err().to_string();
            assert!(e.contains("rotary_dim") && e.contains(&rot.to_string()), "{e}");
        }
        for eps in [0.0f32, -1e-6, f32::NAN, f32::INFINITY] {
            let ex = RopeExtras { q_norm: Some(&w[..]), eps, ..RopeExtras::none() };
            let e = ex.check_scalars("op").unwrap_err().to_string();
            assert!(e.contains("eps"), "{e}");
        }
        let ex: RopeExtras<&[f32]> = RopeExtras::default();
        assert!(ex.is_none() && ex.check_scalars("op").is_ok(), "no norm: eps is not read");
        assert!(!RopeExtras { rotary_dim: 64, ..ex }.is_none());
        assert!(!RopeExtras { k_norm: Some(&w[..]), eps: 1e-6, ..ex }.is_none());
    }
}
