//! Helpers of the elementwise-kernel GPU tests (tests/gpu_ops.rs, tests/gpu_rope.rs): seeded
//! bf16 inputs, NaN-poisoned outputs, and the three comparisons (tolerance, bits, mostly exact
//! against a bf16 emulation).
use demask::gpu::{DTensor, Gpu};
use half::bf16;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal};

pub const ROWS: [usize; 4] = [1, 19, 99, 111];
pub const HEAD_DIM: usize = 128;

/// Random N(mean, std²) values rounded to bf16: (device input, the same values in f32).
pub fn normal_bf16(rng: &mut StdRng, n: usize, mean: f32, std: f32) -> (Vec<bf16>, Vec<f32>) {
    let d = Normal::new(mean, std).unwrap();
    let b: Vec<bf16> = (0..n).map(|_| bf16::from_f32(d.sample(rng))).collect();
    let f = b.iter().map(|v| v.to_f32()).collect();
    (b, f)
}

pub fn to_f32(v: &[bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

pub fn bf(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

/// A device tensor of NaNs (every element must be overwritten by the kernel under test).
pub fn poisoned(gpu: &Gpu, dims: &[usize]) -> DTensor<bf16> {
    let n: usize = dims.iter().product();
    gpu.upload(&vec![bf16::NAN; n], dims).unwrap()
}

/// `|got - want| <= atol + rtol*|want|` for every element (NaN fails); prints the first misses.
pub fn check_close(what: &str, got: &[bf16], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut bad = Vec::new();
    let mut worst = 0f32;
    for (i, (g, &w)) in got.iter().zip(want).enumerate() {
        let g = g.to_f32();
        let err = (g - w).abs();
        // NaN fails: only a finite error within the bound passes.
        if err.is_finite() && err <= atol + rtol * w.abs() {
            worst = worst.max(err / (atol + rtol * w.abs()));
        } else {
            bad.push((i, g, w));
        }
    }
    if !bad.is_empty() {
        for (i, g, w) in bad.iter().take(8) {
            eprintln!("{what}: [{i}] got {g} want {w}");
        }
        panic!(
            "{what}: {} of {} elements outside atol {atol} rtol {rtol}",
            bad.len(),
            got.len()
        );
    }
    eprintln!(
        "{what}: ok ({} elements, worst error {:.2} of the tolerance)",
        got.len(),
        worst
    );
}

/// Bit-exact equality.
pub fn check_bits(what: &str, got: &[bf16], want: &[bf16]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let bad: Vec<usize> = (0..got.len())
        .filter(|&i| got[i].to_bits() != want[i].to_bits())
        .collect();
    if !bad.is_empty() {
        for &i in bad.iter().take(8) {
            eprintln!(
                "{what}: [{i}] got {:?} ({:#06x}) want {:?} ({:#06x})",
                got[i],
                got[i].to_bits(),
                want[i],
                want[i].to_bits()
            );
        }
        panic!("{what}: {} of {} elements differ", bad.len(), got.len());
    }
}

/// Elements whose bits differ from a host emulation of the kernel's exact bf16 steps must be
/// rare (libm vs CUDA sin/cos/exp differ by an ulp or two, which can flip a rounding).
pub fn check_mostly_exact(what: &str, got: &[bf16], emul: &[f32], max_frac: f64) {
    let diff = got
        .iter()
        .zip(emul)
        .filter(|(g, &e)| g.to_bits() != bf16::from_f32(e).to_bits())
        .count();
    let frac = diff as f64 / got.len().max(1) as f64;
    eprintln!(
        "{what}: {diff} of {} differ from the bf16 emulation",
        got.len()
    );
    assert!(
        frac <= max_frac,
        "{what}: {diff} of {} elements differ from the bf16 emulation",
        got.len()
    );
}
