//! Reference of the W8A16 GEMM (kernels/gemm_fp8.cu): `y[t, n] = x[t, k] · Wᵀ (+ bias[n])` for
//! an E4M3 weight ([`Fp8Matrix`]), computed in f32 exactly as the kernel defines it: the MMA
//! operand and epilogue factor of `Fp8Matrix::mma_operands` (per-channel: codes, then × `s[n]`;
//! block: `bf16(q · bf16(s))`), f32 accumulation, then the bias. Also the W8A8 path's
//! references ([`linear_w8a8`], [`linear_w8a8_split`], [`w8a8_scale`]) and its activation
//! quantiser as a fake quantisation ([`fake_quant_rows`], what `CpuModel`'s
//! `ActQuant::Fp8Row` applies to the inputs of the W8A8 linears).
use half::bf16;

use crate::error::{Error, Result};
use crate::quant::{Fp8Matrix, ScaleLayout};

/// `x` is `[t, k]` (bf16 values as f32), `y` is `[t, n]`, `bias` `[n]`.
pub fn linear_fp8(x: &[f32], w: &Fp8Matrix, bias: Option<&[f32]>, y: &mut [f32]) {
    let (ops, post) = w.mma_operands();
    linear_fp8_operands(x, &ops, &post, bias, w.k, y);
}

/// [`linear_fp8`] from precomputed `mma_operands` (`ops` `[n, k]`, `post` `[n]`), so a test can
/// reuse them over many row counts.
pub fn linear_fp8_operands(x: &[f32], ops: &[f32], post: &[f32], bias: Option<&[f32]>, k: usize, y: &mut [f32]) {
    let n = post.len();
    assert_eq!(ops.len(), n * k, "cpu::linear_fp8: operands are not [{n}, {k}]");
    super::gemm::linear(x, ops, None, k, y);
    for row in y.chunks_mut(n) {
        for (c, v) in row.iter_mut().enumerate() {
            *v = *v * post[c] + bias.map_or(0.0, |b| b[c]);
        }
    }
}

/// Reference of the W8A8 path (`ops::gemm_w8a8`): rows of `x` (`[t, k]`, bf16 values)
/// quantised per row to E4M3 as the weights are per channel, then
/// `y[r, c] = sx[r] · sw[c] · Σ_k qx[r, k] · qw[c, k] (+ bias[c])` in f32. Channel-scaled
/// weights only (panics otherwise: a test helper).
pub fn linear_w8a8(x: &[f32], w: &Fp8Matrix, bias: Option<&[f32]>, y: &mut [f32]) {
    assert_eq!(w.layout, crate::quant::ScaleLayout::Channel, "cpu::linear_w8a8: channel scales only");
    let (n, k) = (w.n, w.k);
    let t = x.len() / k;
    let xq = Fp8Matrix::quantize("x", x, t, k, crate::quant::ScaleLayout::Channel).expect("finite activations");
    let table = crate::quant::e4m3_table();
    let xd: Vec<f32> = xq.q.iter().map(|&b| table[b as usize]).collect();
    let wd: Vec<f32> = w.q.iter().map(|&b| table[b as usize]).collect();
    super::gemm::linear(&xd, &wd, None, k, y);
    for (r, row) in y.chunks_mut(n).enumerate() {
        for (c, v) in row.iter_mut().enumerate() {
            *v = *v * xq.scales[r] * w.scales[c] + bias.map_or(0.0, |b| b[c]);
        }
    }
}

/// The activations the W8A8 GEMM multiplies, dequantised, in place: each row of `x`
/// (`[t, k]`) quantised to E4M3 with its own scale `sx[r] = max|x[r,:]| / 448` by the
/// quantiser [`linear_w8a8`] uses (`Fp8Matrix::quantize`, channel layout over the rows), then
/// replaced by `e4m3_decode(q) · sx[r]` (an all-zero row stays zero). `name` names the
/// activation in the error a non-finite value gets. `x` empty: nothing to do.
pub fn fake_quant_rows(name: &str, x: &mut [f32], k: usize) -> Result<()> {
    if x.is_empty() {
        return Ok(());
    }
    if k == 0 || !x.len().is_multiple_of(k) {
        return Err(Error::bad_input(format!("{name}: {} values is not a whole number of rows of {k}", x.len())));
    }
    let q = Fp8Matrix::quantize(name, x, x.len() / k, k, ScaleLayout::Channel).map_err(|e| match e {
        Error::Weights { name, msg } => Error::bad_input(format!("W8A8 activation quantisation of `{name}`: {msg}")),
        e => e,
    })?;
    let table = crate::quant::e4m3_table();
    for ((row, codes), &s) in x.chunks_mut(k).zip(q.q.chunks(k)).zip(&q.scales) {
        for (v, &c) in row.iter_mut().zip(codes) {
            *v = table[c as usize] * s;
        }
    }
    Ok(())
}

/// What the input rows of the linear layers the GPU's W8A8 path quantises (attention q|k|v
/// and o, the dense FFN's gate|up and down, LLaDA2's shared expert gate|up and down) go
/// through before the product. The routed experts, the router and the LM head always take f32
/// activations (on the GPU: W8A16 grouped kernels, bf16 GEMMs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ActQuant {
    /// f32 activations: with `fp8_fidelity::fake_quant` weights, the W8A16 reference.
    #[default]
    None,
    /// Each input row `x[r,:]` replaced by its E4M3 fake quantisation
    /// ([`fake_quant_rows`]: `e4m3_decode(q) · sx[r]`, `sx[r] = max|x[r,:]| / 448`):
    /// with `fake_quant` weights, the W8A8 reference. It applies at every row count (the GPU
    /// takes W8A8 above 64 rows only), and quantises the f32 activations where the GPU
    /// quantises their bf16 rounding.
    Fp8Row,
    /// [`ActQuant::Fp8Row`] of the bf16 rounding of each input (the GPU holds its activations
    /// in bf16 and quantises those): the same codes as the GPU's quantiser on the same bf16
    /// values. The rest of the CPU forward stays f32.
    Fp8RowBf16,
}

impl ActQuant {
    /// Fake-quantises `x` (`[t, k]`) in place when on; `what` names the layer's input in errors.
    pub fn apply(self, x: &mut [f32], k: usize, what: impl FnOnce() -> String) -> Result<()> {
        match self {
            ActQuant::None => Ok(()),
            ActQuant::Fp8Row => fake_quant_rows(&what(), x, k),
            ActQuant::Fp8RowBf16 => {
                for v in x.iter_mut() {
                    *v = bf16::from_f32(*v).to_f32();
                }
                fake_quant_rows(&what(), x, k)
            }
        }
    }
}

/// Reference of the `split-scale` epilogue (`w8a8_scale_bf16` in kernels/gemm_w8a8.cu), bit
/// for bit: `y[r, c] = bf16(fma(sx[r]·sw[c], d[r, c], bias[c]))`, or `bf16((sx[r]·sw[c])·d[r, c])`
/// without a bias (`sx[r]·sw[c]` rounded to f32 first). `d` and `y` are `[t, n]`, values as f32.
pub fn w8a8_scale(d: &[f32], sx: &[f32], sw: &[f32], bias: Option<&[f32]>, y: &mut [f32]) {
    let n = sw.len();
    assert_eq!(d.len(), y.len(), "cpu::w8a8_scale: d and y differ in size");
    assert_eq!(d.len(), sx.len() * n, "cpu::w8a8_scale: d is not [{}, {n}]", sx.len());
    for (r, (yr, dr)) in y.chunks_mut(n).zip(d.chunks(n)).enumerate() {
        for (c, (o, &v)) in yr.iter_mut().zip(dr).enumerate() {
            let s = sx[r] * sw[c];
            let v = match bias {
                Some(b) => s.mul_add(v, b[c]),
                None => s * v,
            };
            *o = bf16::from_f32(v).to_f32();
        }
    }
}

/// Reference of the W8A8 `split-scale` path as a whole: the rows of `x` quantised as in
/// [`linear_w8a8`], the f32 product of the codes rounded to bf16 (cuBLASLt's unscaled bf16
/// output), then [`w8a8_scale`]. It differs from [`linear_w8a8`] by two bf16 roundings: at most
/// 2⁻⁸ of |Σ·sx·sw| and 2⁻⁸ of |y| (plus f32 noise).
pub fn linear_w8a8_split(x: &[f32], w: &Fp8Matrix, bias: Option<&[f32]>, y: &mut [f32]) {
    assert_eq!(w.layout, crate::quant::ScaleLayout::Channel, "cpu::linear_w8a8_split: channel scales only");
    let k = w.k;
    let t = x.len() / k;
    let xq = Fp8Matrix::quantize("x", x, t, k, crate::quant::ScaleLayout::Channel).expect("finite activations");
    let table = crate::quant::e4m3_table();
    let xd: Vec<f32> = xq.q.iter().map(|&b| table[b as usize]).collect();
    let wd: Vec<f32> = w.q.iter().map(|&b| table[b as usize]).collect();
    let mut d = vec![0f32; y.len()];
    super::gemm::linear(&xd, &wd, None, k, &mut d);
    for v in d.iter_mut() {
        *v = bf16::from_f32(*v).to_f32();
    }
    w8a8_scale(&d, &xq.scales, &w.scales, bias, y);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{e4m3_decode, ScaleLayout};

    #[test]
    fn matches_the_dequantised_weight() {
        // 3 rows of x, a 130 × 272 weight (partial blocks in both directions), both layouts:
        // y equals x · dequantize(W)ᵀ up to f32 summation order (channel), and up to the bf16
        // rounding of each block-scaled operand, ≤ 2⁻⁸ relative per weight (block).
        let (t, n, k) = (3, 130, 272);
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 7919 % 1009) as f32 - 504.0) / 3000.0).collect();
        let x: Vec<f32> = (0..t * k).map(|i| ((i * 104729 % 997) as f32 - 498.0) / 250.0).collect();
        let bias: Vec<f32> = (0..n).map(|i| i as f32 / 100.0 - 0.6).collect();
        for layout in [ScaleLayout::Channel, ScaleLayout::Block128] {
            let m = Fp8Matrix::quantize("w", &w, n, k, layout).unwrap();
            let mut y = vec![0f32; t * n];
            linear_fp8(&x, &m, Some(&bias), &mut y);
            let deq = m.dequantize();
            let mut want = vec![0f32; t * n];
            crate::cpu::gemm::linear(&x, &deq, Some(&bias), k, &mut want);
            let abs = |v: &[f32]| v.iter().map(|a| a.abs()).collect::<Vec<_>>();
            let mut mag = vec![0f32; t * n];
            crate::cpu::gemm::linear(&abs(&x), &abs(&deq), None, k, &mut mag);
            let rel = if layout == ScaleLayout::Channel { 1e-5 } else { 2f32.powi(-8) };
            for (i, (a, b)) in y.iter().zip(&want).enumerate() {
                assert!((a - b).abs() <= 1e-4 + rel * mag[i], "{layout:?} {i}: {a} vs {b}");
            }
            // And differs from the unquantised product by the quantisation error only.
            let mut exact = vec![0f32; t * n];
            crate::cpu::gemm::linear(&x, &w, Some(&bias), k, &mut exact);
            let err: f32 = y.iter().zip(&exact).map(|(a, b)| (a - b).powi(2)).sum::<f32>().sqrt();
            let norm: f32 = exact.iter().map(|b| b * b).sum::<f32>().sqrt();
            assert!(err / norm < 0.05 && err > 0.0, "{layout:?}: relative error {}", err / norm);
        }
    }

    #[test]
    fn w8a8_is_close_to_the_w8a16_product() {
        // Quantising the activations too adds E4M3's error on x: a few % of |y|, not more.
        let (t, n, k) = (4, 64, 256);
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 7919 % 1009) as f32 - 504.0) / 3000.0).collect();
        let x: Vec<f32> = (0..t * k).map(|i| ((i * 104729 % 997) as f32 - 498.0) / 250.0).collect();
        let m = Fp8Matrix::quantize("w", &w, n, k, ScaleLayout::Channel).unwrap();
        let (mut a, mut b) = (vec![0f32; t * n], vec![0f32; t * n]);
        linear_w8a8(&x, &m, None, &mut a);
        linear_fp8(&x, &m, None, &mut b);
        let err: f32 = a.iter().zip(&b).map(|(p, q)| (p - q).powi(2)).sum::<f32>().sqrt();
        let norm: f32 = b.iter().map(|q| q * q).sum::<f32>().sqrt();
        assert!(err > 0.0 && err / norm < 0.05, "relative difference {}", err / norm);
        // Activations exactly representable (x = codes · 1, one row's max at 448) change nothing.
        let xs: Vec<f32> = (0..k).map(|i| if i == 0 { 448.0 } else { e4m3_decode((i % 120) as u8) }).collect();
        let (mut c, mut d) = (vec![0f32; n], vec![0f32; n]);
        linear_w8a8(&xs, &m, None, &mut c);
        linear_fp8(&xs, &m, None, &mut d);
        for (p, q) in c.iter().zip(&d) {
            assert!((p - q).abs() <= 1e-3 * q.abs().max(1.0), "{p} vs {q}");
        }
    }

    #[test]
    fn split_scale_is_within_two_bf16_roundings_of_the_w8a8_product() {
        // Random operands (never zeros), a bias large enough to cancel some products: the split
        // path's result differs from the single-rounding reference by at most 2⁻⁸·|p| (the
        // bf16 product) + 2⁻⁸·|y| (the output), p the product before the bias; and it is not
        // identical (the extra rounding is really there).
        use rand::{rngs::StdRng, SeedableRng};
        use rand_distr::{Distribution, Normal};
        let (t, n, k) = (5, 48, 272);
        let mut rng = StdRng::seed_from_u64(17);
        let nd = Normal::new(0.0f32, 1.0).unwrap();
        let w: Vec<f32> = (0..n * k).map(|_| nd.sample(&mut rng) / (k as f32).sqrt()).collect();
        let x: Vec<f32> = (0..t * k).map(|_| bf16::from_f32(nd.sample(&mut rng)).to_f32()).collect();
        let bias: Vec<f32> = (0..n).map(|_| bf16::from_f32(0.5 * nd.sample(&mut rng)).to_f32()).collect();
        let m = Fp8Matrix::quantize("w", &w, n, k, ScaleLayout::Channel).unwrap();
        for b in [None, Some(&bias[..])] {
            let (mut one, mut two) = (vec![0f32; t * n], vec![0f32; t * n]);
            linear_w8a8(&x, &m, b, &mut one);
            linear_w8a8_split(&x, &m, b, &mut two);
            let mut same = 0;
            for (i, (&y, &g)) in one.iter().zip(&two).enumerate() {
                let p = y - b.map_or(0.0, |b| b[i % n]);
                let tol = 2f32.powi(-8) * (p.abs() + y.abs()) + 1e-5;
                assert!((g - y).abs() <= tol, "bias {} [{}, {}]: {g} vs {y}", b.is_some(), i / n, i % n);
                same += (g == y) as usize;
            }
            assert!(same < t * n, "bias {}: no rounding happened", b.is_some());
        }
    }

    #[test]
    fn scale_epilogue_hand_case() {
        // s = sx·sw rounded to f32, one fma with the bias, one bf16 rounding.
        let d = [3.0f32, -1.5, 0.25, 1000.0];
        let (sx, sw) = ([0.5f32, 2.0], [0.1f32, 3.0]);
        let mut y = [0f32; 4];
        w8a8_scale(&d, &sx, &sw, Some(&[1.0, -1.0]), &mut y);
        let r = |v: f32| bf16::from_f32(v).to_f32();
        assert_eq!(y, [r((0.5f32 * 0.1).mul_add(3.0, 1.0)), r(-1.5 * 1.5 - 1.0), r((2.0f32 * 0.1).mul_add(0.25, 1.0)), r(6000.0 - 1.0)]);
        w8a8_scale(&d, &sx, &sw, None, &mut y);
        assert_eq!(y, [r(0.5f32 * 0.1 * 3.0), -2.25, r(2.0f32 * 0.1 * 0.25), 6016.0]); // 6000 ties to even
    }

    #[test]
    fn hand_case() {
        // W = [[1, -2], [0.5, 448]] with unit scales: codes exact.
        let q = [1.0f32, -2.0, 0.5, 448.0].map(crate::quant::e4m3_encode).to_vec();
        assert_eq!(q.iter().map(|&b| e4m3_decode(b)).collect::<Vec<_>>(), [1.0, -2.0, 0.5, 448.0]);
        let m = Fp8Matrix::from_parts("h", 2, 2, q, vec![2.0, 0.25], ScaleLayout::Channel).unwrap();
        let mut y = [0f32; 2];
        linear_fp8(&[3.0, 1.0], &m, Some(&[1.0, 0.0]), &mut y);
        assert_eq!(y, [(3.0 - 2.0) * 2.0 + 1.0, (1.5 + 448.0) * 0.25]);
    }
}
