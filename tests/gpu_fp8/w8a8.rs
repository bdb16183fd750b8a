//! The W8A8 paths (`ops::gemm_w8a8`: per-row activation quantiser + cuBLASLt FP8 GEMM) against
//! the CPU reference `cpu::gemm_fp8::linear_w8a8`:
//! - the device activation quantiser equals the host one bit for bit (codes and scales);
//! - `split-scale` (cuBLASLt's plain FP8 GEMM into the output + `w8a8_scale_bf16`), forced, at
//!   awkward and model shapes, 65 to 2048 rows (rows sampled for the reference at the large
//!   shapes: each output row is independent), with and without bias; its epilogue kernels
//!   bit for bit against `cpu::gemm_fp8::w8a8_scale` and against scale-then-`ops::swiglu`;
//! - `outer-vec` (outer-vector scales in cuBLASLt's epilogue), forced, where cuBLASLt offers it
//!   (skipped with the reason where not: the H100 with the CUDA 13.0 cuBLASLt);
//! - `auto` takes one of them; refusals name their reason (n or k not a multiple of 16 for
//!   `split-scale`); dispatch (`linear_any`) uses W8A8 above 64 rows and the W8A16 kernel at
//!   or below, and falls back to it where no path takes the shape;
//! - a timing table against cuBLASLt bf16 (prints, never fails on time).
//!
//! Tolerance: the reference multiplies the same E4M3 codes in f32 (products exact), so the GPU
//! differs by accumulation order and the bf16 output rounding: |d| ≤ 4e-3 + 8e-3·|ref|
//! (|y| ~ 1: x ~ N(0, 1), w ~ N(0, 1/k)); `split-scale` also rounds the unscaled product to
//! bf16 (≤ 2⁻⁸ of |p|, p the scaled product before the bias), so it adds 4e-3·|p|.
use crate::lock;
use demask::cpu::gemm_fp8 as cpu_fp8;
use demask::gpu::{test_gpu, DTensor, Gpu};
use demask::ops::fill::fill_normal;
use demask::ops::gemm::GemmVariant;
use demask::ops::gemm_fp8::{linear_any, linear_swiglu_any, Fp8Weight, LinearWeight};
use demask::ops::gemm_w8a8::{quantize_rows, scale_rows_cols, scale_swiglu, W8a8, W8a8Path, W8a8Select};
use demask::quant::{Fp8Matrix, ScaleLayout};
use half::bf16;
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

pub(crate) fn normal(gpu: &Gpu, dims: &[usize], seed: u64, std: f32) -> DTensor<bf16> {
    let mut t = gpu.alloc::<bf16>(dims).unwrap();
    fill_normal(gpu, &mut t, seed, 0.0, std).unwrap();
    t
}

pub(crate) fn to_f32(gpu: &Gpu, t: &DTensor<bf16>) -> Vec<f32> {
    t.to_host(gpu).unwrap().iter().map(|v| v.to_f32()).collect()
}

/// FP8 tensor cores (sm_89+; Hopper here), or `false` after printing why the test is skipped.
pub(crate) fn has_fp8(gpu: &Gpu) -> bool {
    if gpu.cc_major < 9 {
        eprintln!("skipping: cuBLASLt FP8 GEMMs need sm_89+ (this device is sm_{}x)", gpu.cc_major);
        return false;
    }
    true
}

pub(crate) fn w8a8(gpu: &Gpu, rows: usize, k_max: usize, select: W8a8Select) -> W8a8 {
    let mut m = W8a8::new(gpu, rows, k_max).unwrap();
    m.select(gpu, select).unwrap();
    m
}

#[test]
fn device_row_quantiser_matches_the_host() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    // k % 8 != 0 (100, 36) takes the scalar kernel; the rest the vector one (up to k = 32768).
    for &(t, k) in &[(1, 16), (3, 100), (5, 36), (7, 272), (65, 4096), (300, 12288), (4, 18944), (2, 32768)] {
        let x = normal(&gpu, &[t, k], (t * k) as u64, 1.5);
        let mut q = gpu.alloc::<u8>(&[t, k]).unwrap();
        let mut s = gpu.alloc::<f32>(&[t]).unwrap();
        quantize_rows(&gpu, t, &x, &mut q, &mut s).unwrap();
        let host = Fp8Matrix::quantize_bf16("x", &x.to_host(&gpu).unwrap(), t, k, ScaleLayout::Channel).unwrap();
        assert_eq!(s.to_host(&gpu).unwrap(), host.scales, "{t}x{k}: scales");
        let dq = q.to_host(&gpu).unwrap();
        let diff = dq.iter().zip(&host.q).position(|(a, b)| a != b);
        assert!(diff.is_none(), "{t}x{k}: first differing code at {diff:?}");
    }
}

/// Runs `t` rows through `W8a8::linear` (some path must run) and checks rows `0, step, 2·step..`
/// against the CPU reference; returns the path that ran.
fn check(gpu: &Gpu, m: &mut W8a8, n: usize, k: usize, t: usize, bias: bool, seed: u64) -> W8a8Path {
    try_check(gpu, m, n, k, t, bias, seed).unwrap_or_else(|| {
        panic!(
            "{n}x{k} t={t} bias={bias}: no W8A8 path ran (selection {}): {}",
            m.selected(),
            m.refusal_reason().unwrap_or("no reason recorded")
        )
    })
}

/// [`check`], or `None` where no allowed path ran (cuBLASLt had no algorithm).
fn try_check(gpu: &Gpu, m: &mut W8a8, n: usize, k: usize, t: usize, bias: bool, seed: u64) -> Option<W8a8Path> {
    let wb = normal(gpu, &[n, k], seed, 1.0 / (k as f32).sqrt());
    let w = Fp8Weight::quantize(gpu, &wb, ScaleLayout::Channel).unwrap();
    let x = normal(gpu, &[t, k], seed + 1, 1.0);
    let bt = normal(gpu, &[n], seed + 2, 0.5);
    let mut y = gpu.upload(&vec![bf16::NAN; (t + 1) * n], &[t + 1, n]).unwrap();
    let path = m.linear(gpu, t, &x, &w, bias.then_some(&bt), &mut y).unwrap()?;
    assert_eq!(m.last_path(), Some(path));
    let got = to_f32(gpu, &y);
    assert!(got[t * n..].iter().all(|v| v.is_nan()), "{n}x{k} t={t}: row t written");
    let wm = w.to_host(gpu).unwrap();
    let xf = to_f32(gpu, &x);
    let bf = to_f32(gpu, &bt);
    let step = if n * k > 1 << 24 { 37 } else { 1 };
    // The sampled rows in one reference call (the per-row activation scale depends only on
    // the row, so quantising a subset of rows is exact).
    let rows: Vec<usize> = (0..t).step_by(step).collect();
    let xs: Vec<f32> = rows.iter().flat_map(|&r| xf[r * k..(r + 1) * k].iter().copied()).collect();
    let mut want = vec![0f32; rows.len() * n];
    cpu_fp8::linear_w8a8(&xs, &wm, bias.then_some(&bf[..]), &mut want);
    let d_rtol = if path == W8a8Path::SplitScale { 4e-3 } else { 0.0 };
    let mut bad = Vec::new();
    for (i, &r) in rows.iter().enumerate() {
        for c in 0..n {
            let (g, w) = (got[r * n + c], want[i * n + c]);
            let p = w - if bias { bf[c] } else { 0.0 };
            let ok = (g - w).abs() <= 4e-3 + 8e-3 * w.abs() + d_rtol * p.abs(); // false for NaN
            if !ok {
                bad.push((r, c, g, w));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "{} {n}x{k} t={t} bias={bias}: {} mismatches, first (row, col, got, want) {:?}",
        path.name(),
        bad.len(),
        &bad[..bad.len().min(6)]
    );
    Some(path)
}

/// (n, k, t): awkward row counts and k, every LLaDA-8B and Dream-7B linear shape.
const SHAPES: [(usize, usize, usize); 8] = [
    (384, 512, 65),
    (1008, 144, 100),
    (4096, 4096, 512),
    (24576, 4096, 2048),
    (4096, 12288, 512),
    (4608, 3584, 333),
    (37888, 3584, 256),
    (3584, 18944, 300),
];

#[test]
fn w8a8_split_scale_matches_the_reference() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    if !has_fp8(&gpu) {
        return;
    }
    let mut m = w8a8(&gpu, 2048, 18944, W8a8Select::SplitScale);
    for (i, &(n, k, t)) in SHAPES.iter().enumerate() {
        assert_eq!(check(&gpu, &mut m, n, k, t, i % 2 == 0, 40 + i as u64), W8a8Path::SplitScale);
        assert_eq!(check(&gpu, &mut m, n, k, t.min(97), i % 2 == 1, 90 + i as u64), W8a8Path::SplitScale);
    }
    assert_eq!(m.supported(W8a8Path::SplitScale, false), Some(true));
    assert_eq!(m.supported(W8a8Path::OuterVec, false), None, "split-scale only: outer-vec never tried");
}

#[test]
fn w8a8_outer_vec_matches_the_reference_where_offered() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    if !has_fp8(&gpu) {
        return;
    }
    let mut m = w8a8(&gpu, 2048, 18944, W8a8Select::OuterVec);
    let (wb, x) = (normal(&gpu, &[64, 512], 3, 0.05), normal(&gpu, &[80, 512], 4, 1.0));
    let w = Fp8Weight::quantize(&gpu, &wb, ScaleLayout::Channel).unwrap();
    let mut y = gpu.alloc::<bf16>(&[80, 64]).unwrap();
    if m.linear(&gpu, 80, &x, &w, None, &mut y).unwrap().is_none() {
        eprintln!("skipping: cuBLASLt offers no FP8 GEMM with outer-vector scales here: {}", m.refusal_reason().unwrap_or("?"));
        return;
    }
    // n = 1000: not a multiple of 16, which outer-vec (bf16 rows of 2000 bytes) still takes.
    for (i, &(n, k, t)) in [(1000, 144, 100)].iter().chain(&SHAPES).enumerate() {
        let bias = i % 2 == 0;
        if m.supported(W8a8Path::OuterVec, bias) == Some(false) {
            continue; // no algorithm with the bias epilogue (said below, once)
        }
        match try_check(&gpu, &mut m, n, k, t, bias, 140 + i as u64) {
            Some(p) => assert_eq!(p, W8a8Path::OuterVec),
            None if bias && m.supported(W8a8Path::OuterVec, true) == Some(false) => {
                eprintln!("outer-vec: no algorithm with the bias epilogue here, bias cases skipped: {}", m.refusal_reason().unwrap_or("?"))
            }
            None => panic!("{n}x{k} t={t} bias={bias}: outer-vec ran before but not here: {}", m.refusal_reason().unwrap_or("?")),
        }
    }
}

#[test]
fn w8a8_auto_runs_a_path_and_says_which() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    if !has_fp8(&gpu) {
        return;
    }
    let mut m = w8a8(&gpu, 512, 4096, W8a8Select::Auto);
    for (bias, seed) in [(false, 7), (true, 8)] {
        let path = check(&gpu, &mut m, 4096, 4096, 300, bias, seed);
        println!(
            "auto, bias {bias}: {} (outer-vec {:?}, split-scale {:?}){}",
            path.name(),
            m.supported(W8a8Path::OuterVec, bias),
            m.supported(W8a8Path::SplitScale, false),
            m.refusal_reason().map_or(String::new(), |r| format!("; outer-vec refused: {r}"))
        );
        // Outer-vec first: split-scale runs only where outer-vec has no algorithm.
        assert_eq!(path == W8a8Path::SplitScale, m.supported(W8a8Path::OuterVec, bias) == Some(false));
    }
}

#[test]
fn w8a8_refuses_what_it_cannot_take() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    let mut m = w8a8(&gpu, 128, 512, W8a8Select::Auto);
    let wb = normal(&gpu, &[64, 512], 1, 0.05);
    let block = Fp8Weight::quantize(&gpu, &wb, ScaleLayout::Block128).unwrap();
    let x = normal(&gpu, &[128, 512], 2, 1.0);
    let mut y = gpu.alloc::<bf16>(&[128, 64]).unwrap();
    let e = m.linear(&gpu, 100, &x, &block, None, &mut y).unwrap_err().to_string();
    assert!(e.contains("channel scales"), "{e}");
    let ch = Fp8Weight::quantize(&gpu, &wb, ScaleLayout::Channel).unwrap();
    let e = m.linear(&gpu, 129, &x, &ch, None, &mut y).unwrap_err().to_string();
    assert!(e.contains("t <= 128"), "{e}");
    let mut y_f32 = gpu.alloc::<f32>(&[128, 64]).unwrap();
    assert!(m.linear(&gpu, 100, &x, &ch, None, &mut y_f32).unwrap_err().to_string().contains("bf16 output"));
    let mut y_short = gpu.alloc::<bf16>(&[99, 64]).unwrap();
    assert!(m.linear(&gpu, 100, &x, &ch, None, &mut y_short).unwrap_err().to_string().contains("`y`"));
    // split-scale: n and k must be multiples of 16 (cuBLASLt's FP8 alignment), said so.
    let mut s = w8a8(&gpu, 128, 512, W8a8Select::SplitScale);
    let n1000 = Fp8Weight::quantize(&gpu, &normal(&gpu, &[1000, 512], 5, 0.05), ScaleLayout::Channel).unwrap();
    let mut y1000 = gpu.alloc::<bf16>(&[128, 1000]).unwrap();
    assert!(!s.takes::<bf16>(100, &n1000, false));
    let e = s.linear(&gpu, 100, &x, &n1000, None, &mut y1000).unwrap_err().to_string();
    assert!(e.contains("multiple of 16") && e.contains("split-scale"), "{e}");
    let k40 = Fp8Weight { q: gpu.alloc(&[64, 40]).unwrap(), scales: gpu.alloc(&[64]).unwrap(), layout: ScaleLayout::Channel };
    let x40 = normal(&gpu, &[128, 40], 6, 1.0);
    let e = s.linear(&gpu, 100, &x40, &k40, None, &mut y).unwrap_err().to_string();
    assert!(e.contains("multiple of 16"), "{e}");
    // The W8A16 selection takes nothing.
    let off = w8a8(&gpu, 128, 512, W8a8Select::W8a16);
    assert!(off.refusal::<bf16>(100, &ch, false).is_some_and(|r| r.contains("w8a16")));
}

#[test]
fn scale_epilogue_matches_the_cpu_bit_for_bit() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    let mut rng = StdRng::seed_from_u64(12);
    for &(t, n) in &[(1, 8), (37, 1040), (300, 4096)] {
        // Unscaled products spanning many binades, scales as the quantisers make them.
        let d: Vec<bf16> = (0..t * n).map(|_| bf16::from_f32(rng.gen_range(-1.0f32..1.0) * 2f32.powf(rng.gen_range(-4.0..18.0)))).collect();
        let sx: Vec<f32> = (0..t).map(|_| rng.gen_range(0.5f32..8.0) / 448.0).collect();
        let sw: Vec<f32> = (0..n).map(|_| rng.gen_range(0.01f32..0.2) / 448.0).collect();
        let bias: Vec<bf16> = (0..n).map(|_| bf16::from_f32(rng.gen_range(-2.0f32..2.0))).collect();
        let df: Vec<f32> = d.iter().map(|v| v.to_f32()).collect();
        let bf: Vec<f32> = bias.iter().map(|v| v.to_f32()).collect();
        let (sxd, swd, bd) = (gpu.upload(&sx, &[t]).unwrap(), gpu.upload(&sw, &[n]).unwrap(), gpu.upload(&bias, &[n]).unwrap());
        for with_bias in [false, true] {
            let mut host = d.clone();
            host.extend(vec![bf16::NAN; n]);
            let mut y = gpu.upload(&host, &[t + 1, n]).unwrap();
            scale_rows_cols(&gpu, t, &mut y, &sxd, &swd, with_bias.then_some(&bd)).unwrap();
            let got = to_f32(&gpu, &y);
            let mut want = vec![0f32; t * n];
            cpu_fp8::w8a8_scale(&df, &sx, &sw, with_bias.then_some(&bf[..]), &mut want);
            let diff = (0..t * n).find(|&i| got[i].to_bits() != want[i].to_bits());
            assert!(diff.is_none(), "t={t} n={n} bias={with_bias}: first difference at {diff:?}: {:?}", diff.map(|i| (got[i], want[i])));
            assert!(got[t * n..].iter().all(|v| v.is_nan()), "t={t} n={n}: row t written");
        }
    }
    // Shapes the kernel cannot take are refused by name.
    let mut y12 = gpu.alloc::<bf16>(&[4, 12]).unwrap();
    let (s4, s12) = (gpu.alloc::<f32>(&[4]).unwrap(), gpu.alloc::<f32>(&[12]).unwrap());
    assert!(scale_rows_cols(&gpu, 4, &mut y12, &s4, &s12, None).unwrap_err().to_string().contains("multiple of 8"));
    let mut y16 = gpu.alloc::<bf16>(&[4, 16]).unwrap();
    assert!(scale_rows_cols(&gpu, 4, &mut y16, &s4, &s12, None).unwrap_err().to_string().contains("`sw`"));
}

/// Inputs of the scale + SwiGLU epilogue, `t` rows of `ffn` gate|up pairs: scales as the
/// quantisers make them, and unscaled products drawn as the scaled gate and up values they
/// stand for, N(0, 2²), divided by their two scales (as a GEMM of quantised operands makes
/// them), so the scaled inputs have that spread whatever scales are drawn. At N(0, 1) the
/// 8 outputs of the 1-row shape all stay under 0.5 about one draw in four (a774093's did); at
/// N(0, 2²) about one in a hundred, and this seed's have 4 of 8 above it.
fn swiglu_inputs(rng: &mut StdRng, t: usize, ffn: usize) -> (Vec<bf16>, Vec<f32>, Vec<f32>) {
    let sx: Vec<f32> = (0..t).map(|_| rng.gen_range(0.5f32..2.0) / 448.0).collect();
    let sw: Vec<f32> = (0..2 * ffn).map(|_| rng.gen_range(0.5f32..2.0) * 448.0 / 2e4 / 1.6).collect();
    let z = Normal::new(0.0f32, 2.0).unwrap();
    let gu = (0..t * 2 * ffn).map(|i| bf16::from_f32(z.sample(rng) / (sx[i / (2 * ffn)] * sw[i % (2 * ffn)]))).collect();
    (gu, sx, sw)
}

#[test]
fn scale_swiglu_epilogue_equals_scale_then_swiglu() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    let mut rng = StdRng::seed_from_u64(13);
    for &(t, ffn) in &[(1, 8), (70, 1032), (257, 12288)] {
        let (host, sx, sw) = swiglu_inputs(&mut rng, t, ffn);
        let gu = gpu.upload(&host, &[t, 2 * ffn]).unwrap();
        let (sxd, swd) = (gpu.upload(&sx, &[t]).unwrap(), gpu.upload(&sw, &[2 * ffn]).unwrap());
        let mut scaled = gpu.upload(&host, &[t, 2 * ffn]).unwrap();
        scale_rows_cols(&gpu, t, &mut scaled, &sxd, &swd, None).unwrap();
        let mut two = gpu.alloc::<bf16>(&[t, ffn]).unwrap();
        demask::ops::swiglu::swiglu(&gpu, t, &scaled, &mut two).unwrap();
        let mut fused = gpu.upload(&vec![bf16::NAN; (t + 1) * ffn], &[t + 1, ffn]).unwrap();
        scale_swiglu(&gpu, t, &gu, &sxd, &swd, &mut fused).unwrap();
        let (a, b) = (two.to_host(&gpu).unwrap(), fused.to_host(&gpu).unwrap());
        let diff = (0..t * ffn).find(|&i| a[i].to_bits() != b[i].to_bits());
        assert!(diff.is_none(), "t={t} ffn={ffn}: fused != two-step at {diff:?}");
        assert!(b[t * ffn..].iter().all(|v| v.is_nan()), "t={t} ffn={ffn}: row t written");
        assert!(a[..t * ffn].iter().any(|v| v.to_f32().abs() > 0.5), "t={t} ffn={ffn}: degenerate inputs");
    }
}

#[test]
fn w8a8_swiglu_is_the_linear_then_swiglu() {
    // Through `W8a8::linear_swiglu` (split-scale: the fused epilogue; outer-vec where offered:
    // GEMM + ops::swiglu) against `W8a8::linear` + ops::swiglu: bit-identical (the same plan and
    // algorithm), and within the W8A8 tolerance of the CPU reference + CPU SwiGLU.
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    if !has_fp8(&gpu) {
        return;
    }
    let (ffn, k, t) = (1536, 1024, 200);
    let wb = normal(&gpu, &[2 * ffn, k], 31, 1.0 / (k as f32).sqrt());
    let w = Fp8Weight::quantize(&gpu, &wb, ScaleLayout::Channel).unwrap();
    let x = normal(&gpu, &[t, k], 32, 1.0);
    for select in [W8a8Select::SplitScale, W8a8Select::Auto] {
        let mut m = w8a8(&gpu, t, k, select);
        let mut gu = gpu.alloc::<bf16>(&[t, 2 * ffn]).unwrap();
        let p1 = m.linear(&gpu, t, &x, &w, None, &mut gu).unwrap().expect("a W8A8 path runs");
        let mut two = gpu.alloc::<bf16>(&[t, ffn]).unwrap();
        demask::ops::swiglu::swiglu(&gpu, t, &gu, &mut two).unwrap();
        let mut fused = gpu.upload(&vec![bf16::NAN; (t + 1) * ffn], &[t + 1, ffn]).unwrap();
        let mut scratch = gpu.alloc::<bf16>(&[t, 2 * ffn]).unwrap();
        let p2 = m.linear_swiglu(&gpu, t, &x, &w, &mut scratch, &mut fused).unwrap();
        assert_eq!(Some(p1), p2, "{select}");
        let (a, b) = (two.to_host(&gpu).unwrap(), fused.to_host(&gpu).unwrap());
        let diff = (0..t * ffn).find(|&i| a[i].to_bits() != b[i].to_bits());
        assert!(diff.is_none(), "{select} ({}): fused != two-step at {diff:?}", p1.name());
        assert!(b[t * ffn..].iter().all(|v| v.is_nan()), "{select}: row t written");
        // And against the CPU: W8A8 product, then SwiGLU in f32.
        let mut want_gu = vec![0f32; t * 2 * ffn];
        cpu_fp8::linear_w8a8(&to_f32(&gpu, &x), &w.to_host(&gpu).unwrap(), None, &mut want_gu);
        let mut want = vec![0f32; t * ffn];
        demask::cpu::swiglu::swiglu(&want_gu, ffn, &mut want);
        let worst = (0..t * ffn).map(|i| (b[i].to_f32() - want[i]).abs() / (0.05 + want[i].abs())).fold(0f32, f32::max);
        assert!(worst < 0.05, "{select}: worst relative difference to the CPU {worst}");
    }
}

#[test]
fn dispatch_takes_w8a8_from_min_rows() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    if !has_fp8(&gpu) {
        return;
    }
    let (n, k) = (256, 1024);
    let wb = normal(&gpu, &[n, k], 5, 1.0 / 32.0);
    let w = LinearWeight::Fp8(Fp8Weight::quantize(&gpu, &wb, ScaleLayout::Channel).unwrap());
    let LinearWeight::Fp8(fw) = &w else { unreachable!() };
    let x = normal(&gpu, &[128, k], 6, 1.0);
    let mut m = W8a8::new(&gpu, 128, k).unwrap();
    m.set_min_rows(65).unwrap();
    for t in [64, 65, 128] {
        let mut a = gpu.alloc::<bf16>(&[t, n]).unwrap();
        let mut b = gpu.alloc::<bf16>(&[t, n]).unwrap();
        linear_any(&gpu, GemmVariant::Auto, t, &x, &w, None, &mut a, Some(&mut m)).unwrap();
        demask::ops::gemm_fp8::linear_fp8(&gpu, t, &x, fw, None, &mut b).unwrap();
        let same = a.to_host(&gpu).unwrap() == b.to_host(&gpu).unwrap();
        // At 64 rows both are the W8A16 kernel (bit-identical); above, W8A8 quantises x too.
        assert_eq!(same, t <= 64, "t = {t} (W8A8 path {:?})", m.last_path());
    }
    // The crossover moves (`DEMASK_W8A8_MIN_ROWS`, `GpuModel::set_w8a8_min_rows`): W8A8 from
    // 17 rows on, W8A16 at 16.
    m.set_min_rows(17).unwrap();
    assert_eq!(m.min_rows(), 17);
    for t in [16, 17] {
        let mut a = gpu.alloc::<bf16>(&[t, n]).unwrap();
        let mut b = gpu.alloc::<bf16>(&[t, n]).unwrap();
        linear_any(&gpu, GemmVariant::Auto, t, &x, &w, None, &mut a, Some(&mut m)).unwrap();
        demask::ops::gemm_fp8::linear_fp8(&gpu, t, &x, fw, None, &mut b).unwrap();
        assert_eq!(a.to_host(&gpu).unwrap() == b.to_host(&gpu).unwrap(), t < 17, "min_rows 17, t = {t}");
    }
    assert!(m.set_min_rows(0).unwrap_err().to_string().contains("at least 1"));
    m.set_min_rows(65).unwrap();
    // The gate|up projection: W8A8 + SwiGLU above 64 rows.
    let mut gu = gpu.alloc::<bf16>(&[128, n]).unwrap();
    let (mut a, mut b) = (gpu.alloc::<bf16>(&[128, n / 2]).unwrap(), gpu.alloc::<bf16>(&[128, n / 2]).unwrap());
    linear_swiglu_any(&gpu, GemmVariant::Auto, 128, &x, &w, &mut gu, &mut a, Some(&mut m), None).unwrap();
    demask::ops::gemm_fp8::linear_fp8_swiglu(&gpu, 128, &x, fw, &mut b).unwrap();
    assert!(m.last_path().is_some());
    assert_ne!(a.to_host(&gpu).unwrap(), b.to_host(&gpu).unwrap(), "gate|up at 128 rows did not take W8A8");
    // A shape no W8A8 path takes (split-scale only, n = 1000) falls back to the W8A16 kernel.
    let n1000 = LinearWeight::Fp8(Fp8Weight::quantize(&gpu, &normal(&gpu, &[1000, k], 8, 1.0 / 32.0), ScaleLayout::Channel).unwrap());
    let LinearWeight::Fp8(f1000) = &n1000 else { unreachable!() };
    let mut s = w8a8(&gpu, 128, k, W8a8Select::SplitScale);
    let (mut a, mut b) = (gpu.alloc::<bf16>(&[100, 1000]).unwrap(), gpu.alloc::<bf16>(&[100, 1000]).unwrap());
    linear_any(&gpu, GemmVariant::Auto, 100, &x, &n1000, None, &mut a, Some(&mut s)).unwrap();
    demask::ops::gemm_fp8::linear_fp8(&gpu, 100, &x, f1000, None, &mut b).unwrap();
    assert_eq!(a.to_host(&gpu).unwrap(), b.to_host(&gpu).unwrap(), "n = 1000 must fall back to W8A16");
    println!("n = 1000 falls back: {}", s.refusal::<bf16>(100, f1000, false).unwrap());
}

#[test]
fn w8a8_vs_bf16_timing() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    if !has_fp8(&gpu) {
        return;
    }
    let mut paths: Vec<(W8a8Select, W8a8)> =
        [W8a8Select::Skinny, W8a8Select::OuterVec, W8a8Select::SplitScale]
            .into_iter()
            .map(|s| (s, w8a8(&gpu, 2048, 12288, s)))
            .collect();
    println!(
        "device {}; µs per call (median of 20 after 3 warm-ups); W8A8 includes the activation quantiser, \
         split-scale its epilogue; w8a16 = the chunked fallback",
        gpu.name
    );
    let time = |f: &mut dyn FnMut()| {
        let timer = demask::gpu::Timer::new(&gpu).unwrap();
        let mut v: Vec<f32> = (0..23)
            .map(|_| {
                timer.start(&gpu).unwrap();
                f();
                timer.stop_ms(&gpu).unwrap()
            })
            .skip(3)
            .collect();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[10] as f64 * 1e3
    };
    for &(name, n, k) in &[("llada qkv", 12288, 4096), ("llada o", 4096, 4096), ("llada gate|up", 24576, 4096), ("llada down", 4096, 12288)] {
        let wb = normal(&gpu, &[n, k], 7, 0.02);
        let w = Fp8Weight::quantize(&gpu, &wb, ScaleLayout::Channel).unwrap();
        let x = normal(&gpu, &[2048, k], 8, 1.0);
        let mut y = gpu.alloc::<bf16>(&[2048, n]).unwrap();
        // Decode-sized row counts (where `DEMASK_W8A8_MIN_ROWS` may move the crossover), then
        // full-canvas ones; at ≤ 64 rows also the bf16 skinny kernel and W GB/s.
        for t in [1usize, 16, 32, 48, 64, 512, 2048] {
            let tf = |us: f64| 2.0 * (t * n * k) as f64 / us / 1e6;
            let bf = time(&mut || demask::gpu::gemm::linear(&gpu, t, &x, &wb, None, &mut y).unwrap());
            let mut line = format!("{name:<14} t={t:<5} bf16 {bf:8.1} µs ({:4.0} TFLOP/s)", tf(bf));
            if t <= 64 {
                let sk = time(&mut || demask::ops::gemm::linear(&gpu, GemmVariant::Skinny, t, &x, &wb, None, &mut y).unwrap());
                line += &format!(" | skinny bf16 {sk:7.1} µs ({:4.0} GB/s of W)", (2 * n * k) as f64 / sk / 1e3);
            }
            for (s, m) in paths.iter_mut() {
                if !m.takes::<bf16>(t, &w, false) || m.linear(&gpu, t, &x, &w, None, &mut y).unwrap().is_none() {
                    line += &format!(" | {s}: unavailable");
                    continue;
                }
                let us = time(&mut || {
                    m.linear(&gpu, t, &x, &w, None, &mut y).unwrap();
                });
                line += &format!(" | {s} {us:8.1} µs ({:4.0} TFLOP/s, {:.2}×", tf(us), bf / us);
                line += &if t <= 64 { format!(", {:4.0} GB/s of W)", (n * k) as f64 / us / 1e3) } else { ")".to_string() };
            }
            let c = time(&mut || demask::ops::gemm_fp8::linear_fp8(&gpu, t, &x, &w, None, &mut y).unwrap());
            line += &format!(" | w8a16 {c:8.1} µs ({:.2}×)", bf / c);
            println!("{line}");
        }
    }
    // gate|up with SwiGLU at 2048 rows: bf16 GEMM + swiglu vs split-scale's fused epilogue.
    let (ffn, k, t) = (12288, 4096, 2048);
    let wb = normal(&gpu, &[2 * ffn, k], 9, 0.02);
    let w = Fp8Weight::quantize(&gpu, &wb, ScaleLayout::Channel).unwrap();
    let x = normal(&gpu, &[t, k], 10, 1.0);
    let (mut gu, mut act) = (gpu.alloc::<bf16>(&[t, 2 * ffn]).unwrap(), gpu.alloc::<bf16>(&[t, ffn]).unwrap());
    let bf = time(&mut || {
        demask::gpu::gemm::linear(&gpu, t, &x, &wb, None, &mut gu).unwrap();
        demask::ops::swiglu::swiglu(&gpu, t, &gu, &mut act).unwrap();
    });
    let mut line = format!("gate|up+swiglu t={t} bf16 {bf:8.1} µs");
    for (s, m) in paths.iter_mut() {
        if !m.takes_swiglu(t, &w) || m.linear_swiglu(&gpu, t, &x, &w, &mut gu, &mut act).unwrap().is_none() {
            continue;
        }
        let us = time(&mut || {
            m.linear_swiglu(&gpu, t, &x, &w, &mut gu, &mut act).unwrap();
        });
        line += &format!(" | {s} {us:8.1} µs ({:.2}×)", bf / us);
    }
    println!("{line}");
}

/// The `stream` kernel's workspace exists only once a selection allows `stream` (on Hopper).
#[test]
fn stream_workspace_is_allocated_only_when_selected() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    let hopper = gpu.cc_major == 9;
    let mut m = W8a8::new(&gpu, 32, 4096).unwrap();
    assert_eq!(m.has_stream_scratch(), hopper && m.selected().allows_stream(), "selection {}", m.selected());
    m.select(&gpu, W8a8Select::Auto).unwrap();
    let before = m.has_stream_scratch();
    m.select(&gpu, W8a8Select::Stream).unwrap();
    assert_eq!(m.has_stream_scratch(), hopper);
    // Kept when the selection moves away (a later switch back reuses it).
    m.select(&gpu, W8a8Select::Auto).unwrap();
    assert_eq!(m.has_stream_scratch(), hopper);
    println!("stream workspace allocated: {before} under auto (after the model's own selection), {hopper} once stream was selected");
}
