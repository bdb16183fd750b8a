//! FP8 (E4M3) weight quantisation: the format's encode/decode, per-output-channel and 128×128
//! block scales, and [`Fp8Matrix`], a quantised `[n, k]` weight as the GPU kernels read it.
//!
//! E4M3 here is the `e4m3fn` format of CUDA's `__nv_fp8_e4m3` (1 sign, 4 exponent bits with
//! bias 7, 3 mantissa bits, subnormals, no infinities, NaN = `S.1111.111`, largest finite 448).
//! [`e4m3_encode`] is bit-exact with `__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3)`
//! (the `cvt.rn.satfinite.e4m3x2.f32` instruction): round to nearest even, magnitudes beyond
//! 448 (and ±∞) saturate to ±448, NaN stays NaN. Quantisation itself never sees NaN or ∞: a
//! non-finite weight is refused with an error naming the tensor and the element.
//!
//! Scales are dequantisation multipliers (`w ≈ q · s`, the `weight_scale_inv` convention of the
//! published FP8 checkpoints):
//! - [`ScaleLayout::Channel`]: one f32 per output row, `s[r] = max|w[r, :]| / 448`; the GEMM
//!   multiplies its f32 accumulator by `s[r]` (exact up to f32 rounding).
//! - [`ScaleLayout::Block128`]: one f32 per 128×128 block, `[ceil(n/128), ceil(k/128)]`
//!   row-major; the GEMM dequantises each weight to `bf16(q · bf16(s))` before the bf16 MMA.
//!   Scales this module makes are `max|w| / 448` rounded *up* to a bf16 value, so `bf16(s) == s`
//!   and the block's largest weight still lands at ±448; the remaining rounding of `q · s` to
//!   bf16 is ≤ 2⁻⁸ relative per weight (RMS about 2⁻¹⁰), against E4M3's own ≤ 2⁻⁴. (Power-of-two
//!   scales would make `q · s` exact but leave up to one binade of the code range unused:
//!   measured 45 % more GEMM error on uniform weights, so not used.) Published scales are used
//!   as they are; their own rounding to bf16 adds ≤ 2⁻⁸ relative per block.
use std::str::FromStr;

use half::bf16;
use rayon::prelude::*;

use crate::error::{Error, Result};

/// Largest finite E4M3 magnitude.
pub const E4M3_MAX: f32 = 448.0;
/// Side of a scale block ([`ScaleLayout::Block128`]).
pub const BLOCK: usize = 128;
/// Range accepted for a scale: positive, and small enough that `2^120 · s` (the GPU kernel's
/// dequantisation multiplier, see kernels/gemm_fp8.cu) is a finite normal bf16.
pub const SCALE_MIN: f32 = 1.0e-30;
pub const SCALE_MAX: f32 = 128.0;

/// `f32` → E4M3 bits: round to nearest even, saturate to ±448, NaN → `0x7F` (with sign).
pub fn e4m3_encode(x: f32) -> u8 {
    let bits = x.to_bits();
    let sign = ((bits >> 31) as u8) << 7;
    let a = x.abs();
    if a.is_nan() {
        return sign | 0x7F;
    }
    if a >= E4M3_MAX {
        return sign | 0x7E;
    }
    if a < 2f32.powi(-6) {
        // Subnormal range: multiples of 2⁻⁹ (the scaling by 512 is exact); code q ∈ 0..=8,
        // and q = 8 is the smallest normal, whose code is also 8.
        return sign | (a * 512.0).round_ties_even() as u8;
    }
    let exp = ((a.to_bits() >> 23) & 0xFF) as i32 - 127; // -6 ..= 8
    let man = a.to_bits() & 0x7F_FFFF;
    let mut m3 = man >> 20;
    let rem = man & 0xF_FFFF;
    if rem > 0x8_0000 || (rem == 0x8_0000 && m3 & 1 == 1) {
        m3 += 1;
    }
    // A mantissa carry moves to the next binade; a < 448 keeps the code ≤ 0x7E.
    let code = (((exp + 7) as u32) << 3) + m3;
    sign | code.min(0x7E) as u8
}

/// E4M3 bits → `f32` (exact). `0x7F` / `0xFF` are NaN.
pub fn e4m3_decode(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = ((b >> 3) & 0xF) as i32;
    let m = (b & 7) as f32;
    if e == 15 && b & 7 == 7 {
        return f32::NAN;
    }
    let mag = if e == 0 { m / 8.0 * 2f32.powi(-6) } else { (1.0 + m / 8.0) * 2f32.powi(e - 7) };
    sign * mag
}

/// The 256 decoded values (index = code), for fast dequantisation.
pub fn e4m3_table() -> [f32; 256] {
    let mut t = [0f32; 256];
    for (i, v) in t.iter_mut().enumerate() {
        *v = e4m3_decode(i as u8);
    }
    t
}

/// The smallest bf16 value ≥ `s` (`s` positive and finite).
pub fn bf16_ceil(s: f32) -> f32 {
    let b = s.to_bits();
    if b & 0xFFFF == 0 {
        s
    } else {
        f32::from_bits((b & 0xFFFF_0000) + 0x1_0000)
    }
}

/// Where the scales of an [`Fp8Matrix`] apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleLayout {
    /// One scale per output row (`[n]`).
    Channel,
    /// One scale per 128×128 block (`[ceil(n/128), ceil(k/128)]`).
    Block128,
}

impl ScaleLayout {
    pub fn name(self) -> &'static str {
        match self {
            ScaleLayout::Channel => "channel",
            ScaleLayout::Block128 => "block128",
        }
    }
    /// Number of scales for an `[n, k]` weight.
    pub fn count(self, n: usize, k: usize) -> usize {
        match self {
            ScaleLayout::Channel => n,
            ScaleLayout::Block128 => n.div_ceil(BLOCK) * k.div_ceil(BLOCK),
        }
    }
}

impl FromStr for ScaleLayout {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "channel" => Ok(ScaleLayout::Channel),
            "block128" | "block" => Ok(ScaleLayout::Block128),
            _ => Err(Error::bad_input(format!("unknown FP8 scale layout `{s}` (expected channel or block128)"))),
        }
    }
}

/// Storage format of the linear layers' weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum WeightFormat {
    #[default]
    Bf16,
    /// E4M3 with the given scales.
    Fp8(ScaleLayout),
}

impl WeightFormat {
    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::Bf16 => "bf16",
            WeightFormat::Fp8(ScaleLayout::Channel) => "fp8",
            WeightFormat::Fp8(ScaleLayout::Block128) => "fp8-block",
        }
    }
    /// Bytes per weight element of a linear layer (scales not counted).
    pub fn bytes_per_weight(self) -> usize {
        match self {
            WeightFormat::Bf16 => 2,
            WeightFormat::Fp8(_) => 1,
        }
    }
}

impl FromStr for WeightFormat {
    type Err = Error;
    /// `bf16`, `fp8` (per-channel scales) or `fp8-block` (128×128 block scales).
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "bf16" => Ok(WeightFormat::Bf16),
            "fp8" | "fp8-channel" => Ok(WeightFormat::Fp8(ScaleLayout::Channel)),
            "fp8-block" | "fp8-block128" => Ok(WeightFormat::Fp8(ScaleLayout::Block128)),
            _ => Err(Error::bad_input(format!("unknown weight format `{s}` (expected bf16, fp8 or fp8-block)"))),
        }
    }
}

impl std::fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A quantised `[n, k]` weight: E4M3 codes row-major and its scales (see the module doc).
#[derive(Clone, Debug, PartialEq)]
pub struct Fp8Matrix {
    pub n: usize,
    pub k: usize,
    /// E4M3 codes, `[n, k]` row-major.
    pub q: Vec<u8>,
    /// Dequantisation multipliers, `layout.count(n, k)` of them.
    pub scales: Vec<f32>,
    pub layout: ScaleLayout,
}

impl Fp8Matrix {
    /// Quantises an `[n, k]` f32 weight. Errors (naming `name`): a shape that does not match
    /// `w.len()`, or a NaN / ±∞ element.
    pub fn quantize(name: &str, w: &[f32], n: usize, k: usize, layout: ScaleLayout) -> Result<Self> {
        Self::quantize_with(name, w, |v| v, n, k, layout)
    }

    /// [`Fp8Matrix::quantize`] of a bf16 weight.
    pub fn quantize_bf16(name: &str, w: &[bf16], n: usize, k: usize, layout: ScaleLayout) -> Result<Self> {
        Self::quantize_with(name, w, bf16::to_f32, n, k, layout)
    }

    /// The quantiser over any element type (rayon over rows, or over 128-row bands of blocks).
    fn quantize_with<T: Copy + Sync>(
        name: &str,
        w: &[T],
        f: impl Fn(T) -> f32 + Sync,
        n: usize,
        k: usize,
        layout: ScaleLayout,
    ) -> Result<Self> {
        if n == 0 || k == 0 || w.len() != n * k {
            return Err(Error::weights(name, format!("{} elements is not a nonzero [{n}, {k}] matrix", w.len())));
        }
        if let Some(i) = w.par_iter().position_first(|&v| !f(v).is_finite()) {
            return Err(Error::weights(
                name,
                format!("non-finite value {} at [{}, {}]: FP8 quantisation refuses NaN and ±inf", f(w[i]), i / k, i % k),
            ));
        }
        let mut q = vec![0u8; n * k];
        let scales = match layout {
            ScaleLayout::Channel => {
                let mut s = vec![0f32; n];
                q.par_chunks_mut(k).zip(s.par_iter_mut()).zip(w.par_chunks(k)).for_each(|((qr, sr), row)| {
                    *sr = channel_scale(row.iter().fold(0f32, |m, &v| m.max(f(v).abs())));
                    for (d, &v) in qr.iter_mut().zip(row) {
                        *d = e4m3_encode(f(v) / *sr);
                    }
                });
                s
            }
            ScaleLayout::Block128 => {
                let kb = k.div_ceil(BLOCK);
                let mut s = vec![0f32; n.div_ceil(BLOCK) * kb];
                // One band of up to 128 rows (and its row of scales) per task.
                q.par_chunks_mut(BLOCK * k).zip(s.par_chunks_mut(kb)).zip(w.par_chunks(BLOCK * k)).for_each(
                    |((qb, sb), band)| {
                        let rows = band.len() / k;
                        for (bj, sc) in sb.iter_mut().enumerate() {
                            let (c0, c1) = (bj * BLOCK, ((bj + 1) * BLOCK).min(k));
                            let amax = (0..rows).flat_map(|r| &band[r * k + c0..r * k + c1]).fold(0f32, |m, &v| m.max(f(v).abs()));
                            *sc = block_scale(amax);
                            for r in 0..rows {
                                for c in c0..c1 {
                                    qb[r * k + c] = e4m3_encode(f(band[r * k + c]) / *sc);
                                }
                            }
                        }
                    },
                );
                s
            }
        };
        Self::from_parts(name, n, k, q, scales, layout)
    }

    /// An already quantised weight (a published FP8 checkpoint). Checks the code and scale
    /// counts, that no code is NaN and that every scale is finite in
    /// [[`SCALE_MIN`], [`SCALE_MAX`]]; errors name `name`.
    pub fn from_parts(name: &str, n: usize, k: usize, q: Vec<u8>, scales: Vec<f32>, layout: ScaleLayout) -> Result<Self> {
        if n == 0 || k == 0 || q.len() != n * k {
            return Err(Error::weights(name, format!("{} FP8 codes is not a nonzero [{n}, {k}] matrix", q.len())));
        }
        let want = layout.count(n, k);
        if scales.len() != want {
            return Err(Error::weights(
                name,
                format!("{} scales for a [{n}, {k}] weight; {} layout needs {want}", scales.len(), layout.name()),
            ));
        }
        if let Some(i) = q.iter().position(|&b| b & 0x7F == 0x7F) {
            return Err(Error::weights(name, format!("FP8 code at [{}, {}] is NaN", i / k, i % k)));
        }
        if let Some(i) = scales.iter().position(|s| !(s.is_finite() && (SCALE_MIN..=SCALE_MAX).contains(s))) {
            return Err(Error::weights(
                name,
                format!("scale {i} is {} (must be finite, in [{SCALE_MIN:e}, {SCALE_MAX}])", scales[i]),
            ));
        }
        Ok(Fp8Matrix { n, k, q, scales, layout })
    }

    /// The scale that applies to element `[r, c]`.
    pub fn scale_at(&self, r: usize, c: usize) -> f32 {
        match self.layout {
            ScaleLayout::Channel => self.scales[r],
            ScaleLayout::Block128 => self.scales[(r / BLOCK) * self.k.div_ceil(BLOCK) + c / BLOCK],
        }
    }

    /// The weight this matrix stands for, `q · s` in f32 (the quantised model's exact weights).
    pub fn dequantize(&self) -> Vec<f32> {
        let t = e4m3_table();
        let mut out = vec![0f32; self.n * self.k];
        for r in 0..self.n {
            for c in 0..self.k {
                out[r * self.k + c] = t[self.q[r * self.k + c] as usize] * self.scale_at(r, c);
            }
        }
        out
    }

    /// Row-wise weight the GPU's bf16 MMA multiplies (see the module doc), and the per-row f32
    /// factor its epilogue applies: Channel → (`q`, `s[r]`), Block128 → (`bf16(q·bf16(s))`, 1).
    pub fn mma_operands(&self) -> (Vec<f32>, Vec<f32>) {
        let t = e4m3_table();
        let mut w = vec![0f32; self.n * self.k];
        match self.layout {
            ScaleLayout::Channel => {
                for (d, &b) in w.iter_mut().zip(&self.q) {
                    *d = t[b as usize];
                }
                (w, self.scales.clone())
            }
            ScaleLayout::Block128 => {
                for r in 0..self.n {
                    for c in 0..self.k {
                        let s = bf16::from_f32(self.scale_at(r, c)).to_f32();
                        w[r * self.k + c] = bf16::from_f32(t[self.q[r * self.k + c] as usize] * s).to_f32();
                    }
                }
                (w, vec![1.0; self.n])
            }
        }
    }

    /// Device bytes: codes plus f32 scales.
    pub fn bytes(&self) -> usize {
        self.q.len() + 4 * self.scales.len()
    }
}

/// Channel quantisation of an `[E, n, k]` bf16 expert weight, expert by expert: codes
/// `[E, n, k]` and scales `[E, n]`. Errors name `name`, the expert and the element.
pub fn quantize_experts_bf16(name: &str, w: &[bf16], dims: [usize; 3]) -> Result<(Vec<u8>, Vec<f32>)> {
    let [e, n, k] = dims;
    if e == 0 || n == 0 || k == 0 || w.len() != e * n * k {
        return Err(Error::weights(name, format!("{} values is not a nonzero [{e}, {n}, {k}] expert stack", w.len())));
    }
    let (mut q, mut s) = (Vec::with_capacity(e * n * k), Vec::with_capacity(e * n));
    for (i, we) in w.chunks(n * k).enumerate() {
        let m = Fp8Matrix::quantize_bf16(&format!("{name} expert {i}"), we, n, k, ScaleLayout::Channel)?;
        q.extend_from_slice(&m.q);
        s.extend_from_slice(&m.scales);
    }
    Ok((q, s))
}

/// Per-channel scale for a row whose largest magnitude is `amax` (1 for an all-zero row).
pub fn channel_scale(amax: f32) -> f32 {
    if amax > 0.0 {
        (amax / E4M3_MAX).max(SCALE_MIN)
    } else {
        1.0
    }
}

/// Block scale for a block whose largest magnitude is `amax`: `amax / 448` rounded up to a
/// bf16 value (1 for an all-zero block).
pub fn block_scale(amax: f32) -> f32 {
    if amax > 0.0 {
        bf16_ceil((amax / E4M3_MAX).max(SCALE_MIN))
    } else {
        1.0
    }
}

/// Default of `ops::gemm_w8a8::W8a8::min_rows`, the row count from which FP8 linear layers
/// with channel scales run W8A8 (activations quantised per row to E4M3, as SGLang's and
/// dInfer's dynamic per-token FP8) on the GPU: 17. Measured on an H100 (benches/RESULTS.md
/// v0.11-v0.13): W8A8 is much faster from 17 rows up (W1 `dual` batch 1, 32-row steps: 4.3-4.5
/// ms per step against 6.4 with the W8A16 kernel), the W8A16 kernel below (t <= 16). The
/// fidelity cost of quantising the activations is in docs/fp8.md; `DEMASK_W8A8_MIN_ROWS=65`
/// keeps every GEMM of up to 64 rows weights-only.
pub const W8A8_MIN_ROWS: usize = 17;

/// `DEMASK_W8A8_MIN_ROWS` (unset: [`W8A8_MIN_ROWS`]): a positive row count.
pub fn w8a8_min_rows_from_env() -> crate::error::Result<usize> {
    match std::env::var("DEMASK_W8A8_MIN_ROWS") {
        Err(_) => Ok(W8A8_MIN_ROWS),
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => Err(crate::error::Error::bad_input(format!("DEMASK_W8A8_MIN_ROWS: `{v}` is not a positive row count"))),
        },
    }
}

/// Rows up to which a model with an FP8 copy of its LM head (`GpuModel::set_fp8_lm_head`)
/// uses it: one pass of the W8A16 kernel's 64-row tile. More logit rows (full-canvas steps,
/// batches) use the bf16 LM head, whose GEMM reads the weight once at any row count.
pub const FP8_LM_HEAD_MAX_ROWS: usize = 64;

/// `DEMASK_FP8_LM_HEAD` (unset or `0`: off; `1`: FP8 models also keep an E4M3 copy of the LM
/// head for steps of up to [`FP8_LM_HEAD_MAX_ROWS`] logit rows).
pub fn fp8_lm_head_from_env() -> crate::error::Result<bool> {
    std::env::var("DEMASK_FP8_LM_HEAD").map_or(Ok(false), |v| parse_fp8_lm_head(&v))
}

/// The value of `DEMASK_FP8_LM_HEAD`: `0` (or empty) off, `1` on, anything else an error.
pub fn parse_fp8_lm_head(v: &str) -> crate::error::Result<bool> {
    match v.trim() {
        "" | "0" => Ok(false),
        "1" => Ok(true),
        _ => Err(crate::error::Error::bad_input(format!("DEMASK_FP8_LM_HEAD: `{v}` is not 0 or 1"))),
    }
}

#[cfg(test)]
#[path = "quant_tests.rs"]
mod tests;
