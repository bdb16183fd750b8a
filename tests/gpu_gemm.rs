//! cuBLASLt linear (bf16 in, f32 accumulate, bf16 or f32 out, optional bias) vs the CPU
//! reference `cpu::gemm::linear`, on seeded random inputs at awkward and production shapes.
#![cfg(feature = "cuda")]
use demask::cpu::gemm;
use demask::gpu::{gemm::linear, test_gpu};
use half::bf16;
use rand::{rngs::StdRng, SeedableRng};
use rand_distr::{Distribution, Normal};

fn rand_bf16(n: usize, std: f32, rng: &mut StdRng) -> (Vec<bf16>, Vec<f32>) {
    let d = Normal::new(0.0f32, std).unwrap();
    let b: Vec<bf16> = (0..n).map(|_| bf16::from_f32(d.sample(rng))).collect();
    let f = b.iter().map(|x| x.to_f32()).collect();
    (b, f)
}

/// Tolerance: f32 out ≈ exact dot of bf16 values (only accumulation order differs):
/// |d| ≤ 1e-3·‖x‖‖w‖-scale; bf16 out adds one rounding (2⁻⁸ relative).
fn check(t: usize, n: usize, k: usize, bias: bool, f32_out: bool, seed: u64) {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = StdRng::seed_from_u64(seed);
    let (xb, xf) = rand_bf16(t * k, 1.0, &mut rng);
    let (wb, wf) = rand_bf16(n * k, 1.0 / (k as f32).sqrt(), &mut rng);
    let (bb, bf) = rand_bf16(n, 0.5, &mut rng);
    let mut want = vec![0f32; t * n];
    gemm::linear(&xf, &wf, bias.then_some(&bf[..]), k, &mut want);
    let x = gpu.upload(&xb, &[t, k]).unwrap();
    let w = gpu.upload(&wb, &[n, k]).unwrap();
    let b = gpu.upload(&bb, &[n]).unwrap();
    let got: Vec<f32> = if f32_out {
        let mut y = gpu.upload(&vec![f32::NAN; t * n], &[t, n]).unwrap();
        linear(&gpu, t, &x, &w, bias.then_some(&b), &mut y).unwrap();
        y.to_host(&gpu).unwrap()
    } else {
        let mut y = gpu.upload(&vec![bf16::NAN; t * n], &[t, n]).unwrap();
        linear(&gpu, t, &x, &w, bias.then_some(&b), &mut y).unwrap();
        y.to_host(&gpu).unwrap().iter().map(|v| v.to_f32()).collect()
    };
    let (atol, rtol) = if f32_out { (2e-3, 1e-3) } else { (4e-3, 8e-3) };
    let mut bad = Vec::new();
    for (i, (&g, &r)) in got.iter().zip(&want).enumerate() {
        if !((g - r).abs() <= atol + rtol * r.abs()) {
            bad.push((i, g, r));
        }
    }
    assert!(bad.is_empty(), "linear t={t} n={n} k={k} bias={bias} f32={f32_out}: {} mismatches, first {:?}", bad.len(), &bad[..bad.len().min(5)]);
}

#[test]
fn linear_awkward_rows() {
    for (i, &t) in [1usize, 19, 99, 111].iter().enumerate() {
        check(t, 384, 256, i % 2 == 0, i % 2 == 1, 100 + i as u64);
    }
}

#[test]
fn linear_llada_qkv_and_down_shapes() {
    check(32, 3 * 4096, 4096, false, false, 7);
    check(19, 4096, 12288, false, false, 8);
}

#[test]
fn linear_dream_qkv_bias_and_lm_head_f32() {
    check(19, (28 + 8) * 128, 3584, true, false, 9);
    check(7, 152064, 3584, false, true, 10);
}
