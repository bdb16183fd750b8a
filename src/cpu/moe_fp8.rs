//! Reference of the FP8 expert GEMMs (kernels/moe_gemm_fp8.cu, `ops::moe_fp8`): the expert FFN
//! of `cpu::moe::expert_ffn_bf16` with E4M3 expert weights and per-expert channel scales, in f32
//! exactly as the kernels define it: the dot products of x with the decoded code values, the
//! channel scale on the f32 sum, then the bf16 kernels' roundings (g, u, silu(g) and act
//! rounded to bf16; y in f32; the weighted sum rounded once).
//!
//! The model-level reference is different: `fp8_fidelity::fake_quant` turns the FP8 experts
//! into bf16 host weights (`bf16(q · s)`) that the CPU forward (`cpu::moe`, `cpu::llada2`) runs.
use crate::cpu::moe::{expert_ffn_scaled, ExpertFfnBf16, Route};
use crate::error::{Error, Result};
use crate::quant::e4m3_table;

/// One FP8 expert stack on the host: codes `[E, n, k]` and channel scales `[E, n]`.
pub struct Fp8ExpertsHost<'a> {
    pub q: &'a [u8],
    pub scales: &'a [f32],
}

/// The FP8 expert FFN on given routes (`routes[r]`: `k` (expert, weight) pairs): `x`
/// `[t, hidden]` (bf16 values), gate|up `[E, 2·ffn, hidden]` and down `[E, hidden, ffn]` in
/// E4M3 with scales `[E, 2·ffn]` and `[E, hidden]`. Returns act and y by pair and out.
pub fn expert_ffn_fp8(
    x: &[f32],
    routes: &[Route],
    gate_up: &Fp8ExpertsHost,
    down: &Fp8ExpertsHost,
    hidden: usize,
    ffn: usize,
) -> Result<ExpertFfnBf16> {
    let e = gate_up.scales.len().checked_div(2 * ffn).unwrap_or(0);
    if e == 0 || gate_up.scales.len() != e * 2 * ffn || down.scales.len() != e * hidden {
        return Err(Error::shape("expert_ffn_fp8", "scales", &[e * 2 * ffn, e * hidden], &[gate_up.scales.len(), down.scales.len()]));
    }
    let t = e4m3_table();
    let decode = |q: &[u8]| q.iter().map(|&b| t[b as usize]).collect::<Vec<f32>>();
    expert_ffn_scaled(x, routes, &decode(gate_up.q), Some(gate_up.scales), &decode(down.q), Some(down.scales), hidden, ffn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::moe::{expert_ffn_bf16, route, round_bf16};
    use rand::{rngs::StdRng, SeedableRng};
    use rand_distr::{Distribution, Normal};

    /// Against the bf16 expert FFN of the dequantised weights: the same up to where the scale
    /// is applied (f32 noise, and a bf16 rounding of g or u landing on the other side), and far
    /// from the unquantised weights' result only by the quantisation error.
    #[test]
    fn matches_the_dequantised_expert_ffn() {
        let (t, hidden, ffn, experts, k) = (9usize, 64usize, 32usize, 5usize, 2usize);
        let mut rng = StdRng::seed_from_u64(5);
        let nd = Normal::new(0.0f32, 1.0).unwrap();
        let mut randn = |n: usize, std: f32| (0..n).map(|_| round_bf16(nd.sample(&mut rng) * std)).collect::<Vec<f32>>();
        let x = randn(t * hidden, 1.0);
        let router = randn(experts * hidden, 1.0);
        let gu = randn(experts * 2 * ffn * hidden, 1.0 / (hidden as f32).sqrt());
        let dn = randn(experts * hidden * ffn, 1.0 / (ffn as f32).sqrt());
        let bf = |v: &[f32]| v.iter().map(|&a| half::bf16::from_f32(a)).collect::<Vec<_>>();
        let (gq, gs) = crate::quant::quantize_experts_bf16("gu", &bf(&gu), [experts, 2 * ffn, hidden]).unwrap();
        let (dq, ds) = crate::quant::quantize_experts_bf16("down", &bf(&dn), [experts, hidden, ffn]).unwrap();
        let routes = route(&x, &router, hidden, k, false);
        let got = expert_ffn_fp8(&x, &routes, &Fp8ExpertsHost { q: &gq, scales: &gs }, &Fp8ExpertsHost { q: &dq, scales: &ds }, hidden, ffn).unwrap();
        let tab = e4m3_table();
        let deq = |q: &[u8], s: &[f32], k: usize| q.iter().enumerate().map(|(i, &b)| tab[b as usize] * s[i / k]).collect::<Vec<f32>>();
        let want = expert_ffn_bf16(&x, &routes, &deq(&gq, &gs, hidden), &deq(&dq, &ds, ffn), hidden, ffn).unwrap();
        let rms = |v: &[f32]| (v.iter().map(|a| a * a).sum::<f32>() / v.len() as f32).sqrt();
        for (name, a, b) in [("act", &got.act, &want.act), ("y", &got.y, &want.y), ("out", &got.out, &want.out)] {
            let r = rms(b);
            for (i, (&p, &q)) in a.iter().zip(b.iter()).enumerate() {
                assert!((p - q).abs() <= 0.01 * r + 0.02 * q.abs(), "{name} {i}: {p} vs {q}");
            }
        }
        assert!(got.act.iter().chain(&got.out).all(|&v| v == round_bf16(v)));
        let exact = expert_ffn_bf16(&x, &routes, &gu, &dn, hidden, ffn).unwrap();
        let err = got.out.iter().zip(&exact.out).map(|(a, b)| (a - b).powi(2)).sum::<f32>().sqrt();
        let norm = exact.out.iter().map(|b| b * b).sum::<f32>().sqrt();
        assert!(err > 0.0 && err / norm < 0.08, "relative error vs bf16 weights {}", err / norm);
        let bad = expert_ffn_fp8(&x, &routes, &Fp8ExpertsHost { q: &gq, scales: &gs[1..] }, &Fp8ExpertsHost { q: &dq, scales: &ds }, hidden, ffn);
        assert!(bad.err().unwrap().to_string().contains("scales"));
    }
}
