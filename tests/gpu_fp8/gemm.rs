//! FP8 on the GPU (kernels/gemm_fp8.cu, `ops::gemm_fp8`) against the CPU reference:
//! - the device E4M3 conversion (`__nv_cvt_float_to_fp8`, satfinite) equals `quant::e4m3_encode`
//!   bit for bit on every rounding midpoint, saturation and random values;
//! - the device quantiser equals `Fp8Matrix::quantize_bf16` (codes and scales, both layouts);
//! - the W8A16 GEMM equals `cpu::gemm_fp8::linear_fp8` at awkward shapes and every LLaDA-8B /
//!   Dream-7B linear shape, t from 1 to 64 (and 100: the chunked path), bias or not, bf16 and
//!   f32 out, both scale layouts, every split count; subnormal codes are not flushed; the
//!   SwiGLU epilogue is bit-identical to the two-step path; bad shapes are refused by name;
//! - a timing table against the bf16 skinny kernel and cuBLASLt (prints, never fails on time).
//!
//! Tolerance: x ~ N(0, 1), w ~ N(0, 1/k) so |y| ~ 1. The reference multiplies the same bf16
//! operands (`Fp8Matrix::mma_operands`) in f32, so f32 out differs by accumulation order only,
//! |d| ≤ 2e-3 + 1e-3·|ref|; bf16 out adds one rounding, |d| ≤ 4e-3 + 8e-3·|ref| (as
//! tests/gpu_gemm_skinny.rs).
use crate::lock;
use cudarc::driver::sys::CUevent_flags;
use demask::cpu::gemm_fp8 as cpu_fp8;
use demask::gpu::gemm::GemmOut;
use demask::gpu::{test_gpu, DTensor, Gpu};
use demask::ops::fill::fill_normal;
use demask::ops::gemm::{self, SkinnyConfig, MAX_SPLITS};
use demask::ops::gemm_fp8::{self as fp8, Fp8Config, Fp8Kernel, Fp8Weight};
use demask::quant::{e4m3_decode, e4m3_encode, Fp8Matrix, ScaleLayout};
use half::bf16;
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

const TS: [usize; 6] = [1, 7, 19, 32, 33, 64];
const MAX_T: usize = 100;
const LAYOUTS: [ScaleLayout; 2] = [ScaleLayout::Channel, ScaleLayout::Block128];

/// The W8A16 kernels this GPU runs: `mma` everywhere, `wgmma` on sm_90.
fn kernels(gpu: &Gpu) -> Vec<Fp8Kernel> {
    if gpu.cc_major == 9 {
        vec![Fp8Kernel::Mma, Fp8Kernel::Wgmma]
    } else {
        eprintln!("the wgmma W8A16 kernel is not checked: {} is not an sm_90 GPU", gpu.name);
        vec![Fp8Kernel::Mma]
    }
}


#[test]
fn device_encode_matches_the_reference_bit_for_bit() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    let mut xs = Vec::new();
    // Every code, the midpoints between neighbours and one f32 ulp either side of them.
    let pos: Vec<f32> = (0u8..=0x7E).map(e4m3_decode).collect();
    for w in pos.windows(2) {
        let mid = 0.5 * (w[0] + w[1]);
        for v in [w[0], mid, f32::from_bits(mid.to_bits() - 1), f32::from_bits(mid.to_bits() + 1)] {
            xs.extend([v, -v]);
        }
    }
    // Saturation and f32 subnormals.
    xs.extend([448.0, 448.5, 464.0, 479.9, 480.0, 1e6, f32::MAX, f32::INFINITY, -f32::INFINITY, 1e-40, -1e-40]);
    let mut rng = StdRng::seed_from_u64(3);
    for _ in 0..100_000 {
        let s = if rng.gen::<bool>() { 1.0 } else { -1.0 };
        xs.push(s * 2f32.powf(rng.gen_range(-14.0..10.0)));
    }
    let x = gpu.upload(&xs, &[xs.len()]).unwrap();
    let mut q = gpu.alloc::<u8>(&[xs.len()]).unwrap();
    fp8::encode_e4m3(&gpu, &x, &mut q).unwrap();
    let got = q.to_host(&gpu).unwrap();
    let bad: Vec<_> = xs
        .iter()
        .zip(&got)
        .filter(|(v, g)| e4m3_encode(**v) != **g)
        .map(|(v, g)| (*v, *g, e4m3_encode(*v)))
        .take(8)
        .collect();
    assert!(bad.is_empty(), "(x, device, reference) codes differ: {bad:?}");
    // NaN: a NaN code either way (the sign of a NaN is not specified).
    let nan = gpu.upload(&[f32::NAN], &[1]).unwrap();
    let mut qn = gpu.alloc::<u8>(&[1]).unwrap();
    fp8::encode_e4m3(&gpu, &nan, &mut qn).unwrap();
    assert_eq!(qn.to_host(&gpu).unwrap()[0] & 0x7F, 0x7F);
}

/// A bf16 weight `[n, k]` ~ N(0, 1/k) synthesised on the device, quantised on the device.
fn device_weight(gpu: &Gpu, n: usize, k: usize, seed: u64, layout: ScaleLayout) -> (DTensor<bf16>, Fp8Weight) {
    let mut w = gpu.alloc::<bf16>(&[n, k]).unwrap();
    fill_normal(gpu, &mut w, seed, 0.0, 1.0 / (k as f32).sqrt()).unwrap();
    let q = Fp8Weight::quantize(gpu, &w, layout).unwrap();
    (w, q)
}

#[test]
fn device_quantiser_matches_the_host() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    for &(n, k) in &[(1, 16), (13, 144), (129, 272), (300, 400), (4096, 4096)] {
        for layout in LAYOUTS {
            let (w, q) = device_weight(&gpu, n, k, (n * 31 + k) as u64, layout);
            let host = Fp8Matrix::quantize_bf16("w", &w.to_host(&gpu).unwrap(), n, k, layout).unwrap();
            let dev = q.to_host(&gpu).unwrap();
            assert_eq!(dev.scales, host.scales, "{n}x{k} {layout:?}: scales");
            let diff = dev.q.iter().zip(&host.q).position(|(a, b)| a != b);
            assert!(diff.is_none(), "{n}x{k} {layout:?}: first differing code at {diff:?}");
        }
    }
}

/// One weight with its operands on both sides and the f32 reference (no bias) for MAX_T rows.
struct Problem {
    n: usize,
    k: usize,
    x: DTensor<bf16>,
    w: Fp8Weight,
    bias: DTensor<bf16>,
    bias_f: Vec<f32>,
    want: Vec<f32>,
}

fn rand_bf16(n: usize, std: f32, rng: &mut StdRng) -> (Vec<bf16>, Vec<f32>) {
    let d = Normal::new(0.0f32, std).unwrap();
    let b: Vec<bf16> = (0..n).map(|_| bf16::from_f32(d.sample(rng))).collect();
    let f = b.iter().map(|x| x.to_f32()).collect();
    (b, f)
}

impl Problem {
    fn new(gpu: &Gpu, n: usize, k: usize, seed: u64, layout: ScaleLayout) -> Problem {
        let (_, w) = device_weight(gpu, n, k, seed ^ 0x5eed, layout);
        Self::with_weight(gpu, w, seed)
    }

    fn with_weight(gpu: &Gpu, w: Fp8Weight, seed: u64) -> Problem {
        let (n, k) = (w.n(), w.k());
        let mut rng = StdRng::seed_from_u64(seed);
        let (xb, xf) = rand_bf16(MAX_T * k, 1.0, &mut rng);
        let (bb, bias_f) = rand_bf16(n, 0.5, &mut rng);
        let (ops, post) = w.to_host(gpu).unwrap().mma_operands();
        // Reference in slabs of W rows (cache-friendly for the big shapes).
        const SLAB: usize = 512;
        let mut want = vec![0f32; MAX_T * n];
        for c0 in (0..n).step_by(SLAB) {
            let c1 = (c0 + SLAB).min(n);
            let mut part = vec![0f32; MAX_T * (c1 - c0)];
            cpu_fp8::linear_fp8_operands(&xf, &ops[c0 * k..c1 * k], &post[c0..c1], None, k, &mut part);
            for r in 0..MAX_T {
                want[r * n + c0..r * n + c1].copy_from_slice(&part[r * (c1 - c0)..(r + 1) * (c1 - c0)]);
            }
        }
        Problem { n, k, x: gpu.upload(&xb, &[MAX_T, k]).unwrap(), w, bias: gpu.upload(&bb, &[n]).unwrap(), bias_f, want }
    }

    /// Runs `t` rows into an output of t + 2 rows poisoned with NaN; checks rows < t against
    /// the reference and rows ≥ t untouched. Returns the output as f32.
    fn check(&self, gpu: &Gpu, kernel: Fp8Kernel, splits: Option<usize>, t: usize, bias: bool, f32_out: bool) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        let rows = t + 2;
        let b = bias.then_some(&self.bias);
        let cfg = Fp8Config { splits, kernel };
        let got: Vec<f32> = if f32_out {
            let mut y = gpu.upload(&vec![f32::NAN; rows * n], &[rows, n]).unwrap();
            fp8::skinny_fp8(gpu, &cfg, t, &self.x, &self.w, b, &mut y).unwrap();
            y.to_host(gpu).unwrap()
        } else {
            let mut y = gpu.upload(&vec![bf16::NAN; rows * n], &[rows, n]).unwrap();
            fp8::skinny_fp8(gpu, &cfg, t, &self.x, &self.w, b, &mut y).unwrap();
            y.to_host(gpu).unwrap().iter().map(|v| v.to_f32()).collect()
        };
        let (atol, rtol) = if f32_out { (2e-3, 1e-3) } else { (4e-3, 8e-3) };
        let mut bad = Vec::new();
        for r in 0..t {
            for c in 0..n {
                let want = self.want[r * n + c] + if bias { self.bias_f[c] } else { 0.0 };
                let g = got[r * n + c];
                let ok = (g - want).abs() <= atol + rtol * want.abs(); // false for NaN
                if !ok {
                    bad.push((r, c, g, want));
                }
            }
        }
        let what = format!("{} {:?} t={t} n={n} k={k} splits={splits:?} bias={bias} f32={f32_out}", kernel.name(), self.w.layout);
        assert!(bad.is_empty(), "{what}: {} mismatches, first (row, col, got, want) {:?}", bad.len(), &bad[..bad.len().min(6)]);
        assert!(got[t * n..].iter().all(|v| v.is_nan()), "{what}: rows >= t were written");
        got
    }

    fn check_all_t(&self, gpu: &Gpu) {
        for kernel in kernels(gpu) {
            for (i, &t) in TS.iter().enumerate() {
                self.check(gpu, kernel, None, t, i % 2 == 1, false);
                self.check(gpu, kernel, None, t, i % 2 == 0, true);
            }
        }
    }
}

#[test]
fn fp8_awkward_shapes() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    // n not a multiple of 16 or 128; k with a partial 128-column stage or a single 16-byte
    // chunk; 4112 × 4112 splits k with a tail stage.
    for (i, &(n, k)) in [(13, 16), (1000, 144), (129, 528), (33, 1040), (1, 4096), (4112, 4112), (300, 400)].iter().enumerate() {
        for layout in LAYOUTS {
            Problem::new(&gpu, n, k, 100 + i as u64, layout).check_all_t(&gpu);
        }
    }
}

#[test]
fn fp8_more_than_64_rows_runs_in_chunks() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    for layout in LAYOUTS {
        let p = Problem::new(&gpu, 384, 512, 9, layout);
        for kernel in kernels(&gpu) {
            for t in [65, 100] {
                p.check(&gpu, kernel, None, t, true, false);
            }
        }
    }
}

#[test]
fn fp8_model_shapes() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    // (n, k): LLaDA-8B QKV, O, gate|up, down; Dream-7B QKV, O, gate|up, down.
    let shapes = [(12288, 4096), (4096, 4096), (24576, 4096), (4096, 12288), (4608, 3584), (3584, 3584), (37888, 3584), (3584, 18944)];
    for (i, &(n, k)) in shapes.iter().enumerate() {
        for layout in LAYOUTS {
            let p = Problem::new(&gpu, n, k, 200 + i as u64, layout);
            for kernel in kernels(&gpu) {
                for t in [1, 32, 64] {
                    p.check(&gpu, kernel, None, t, false, false);
                }
                p.check(&gpu, kernel, None, 19, true, true);
            }
        }
    }
}

#[test]
fn fp8_every_split_count_is_exact_and_deterministic() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    if gpu.cc_major < 9 {
        eprintln!("skipping split-K sweep: no thread-block clusters on this device");
        return;
    }
    for layout in LAYOUTS {
        let p = Problem::new(&gpu, 512, 4096, 31, layout);
        for kernel in kernels(&gpu) {
            for s in 1..=MAX_SPLITS {
                for t in [1, 32] {
                    let a = p.check(&gpu, kernel, Some(s), t, true, true);
                    let b = p.check(&gpu, kernel, Some(s), t, true, true);
                    let same = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()));
                    assert!(same, "{} {layout:?} splits={s} t={t}: two runs differ", kernel.name());
                }
            }
        }
    }
}

#[test]
fn fp8_subnormal_codes_are_not_flushed() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    // Rows made only of subnormal codes (0x01..=0x07 and their negatives) and rows mixing
    // them with normals: a kernel that flushed subnormals would give 0 (or miss them).
    let (n, k) = (256, 512);
    let mut rng = StdRng::seed_from_u64(77);
    let q: Vec<u8> = (0..n * k)
        .map(|i| {
            let sub = rng.gen_range(1u8..=7) | if rng.gen::<bool>() { 0x80 } else { 0 };
            if (i / k) % 2 == 0 { sub } else { rng.gen_range(0u8..0x7E) | (sub & 0x80) }
        })
        .collect();
    for layout in LAYOUTS {
        let scales: Vec<f32> = (0..layout.count(n, k)).map(|_| rng.gen_range(0.5f32..2.0)).collect();
        let m = Fp8Matrix::from_parts("subnormal", n, k, q.clone(), scales, layout).unwrap();
        let p = Problem::with_weight(&gpu, Fp8Weight::upload(&gpu, &m).unwrap(), 5);
        for kernel in kernels(&gpu) {
            let y = p.check(&gpu, kernel, None, 8, false, true);
            // The all-subnormal rows' outputs are not all zero.
            assert!((0..8).any(|r| y[r * n] != 0.0), "{} {layout:?}: subnormal row gave 0", kernel.name());
        }
    }
}

#[test]
fn fp8_swiglu_epilogue_is_exact() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    for layout in LAYOUTS {
        for &(ffn, k) in &[(12288, 4096), (192, 272), (64, 16)] {
            let p = Problem::new(&gpu, 2 * ffn, k, 40 + ffn as u64, layout);
            for kernel in kernels(&gpu) {
                // The plain kernel without split-K, so both sides sum in the same order.
                let cfg = Fp8Config { splits: Some(1), kernel };
                for t in [1, 19, 32, 64, 70] {
                    let mut gu = gpu.alloc::<bf16>(&[t, 2 * ffn]).unwrap();
                    fp8::skinny_fp8(&gpu, &cfg, t, &p.x, &p.w, None, &mut gu).unwrap();
                    let mut two = gpu.alloc::<bf16>(&[t, ffn]).unwrap();
                    demask::ops::swiglu::swiglu(&gpu, t, &gu, &mut two).unwrap();
                    let mut fused = gpu.upload(&vec![bf16::NAN; (t + 1) * ffn], &[t + 1, ffn]).unwrap();
                    fp8::skinny_fp8_swiglu(&gpu, &cfg, t, &p.x, &p.w, &mut fused).unwrap();
                    let (a, b) = (two.to_host(&gpu).unwrap(), fused.to_host(&gpu).unwrap());
                    let diff = (0..t * ffn).find(|&i| a[i].to_bits() != b[i].to_bits());
                    let k = kernel.name();
                    assert!(diff.is_none(), "{k} {layout:?} ffn {ffn} t={t}: fused != two-step at {diff:?}");
                    assert!(b[t * ffn..].iter().all(|v| v.is_nan()), "{k} {layout:?} ffn {ffn} t={t}: row t written");
                }
            }
        }
    }
}

#[test]
fn fp8_rejects_bad_input_by_name() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    let (_, w) = device_weight(&gpu, 32, 64, 1, ScaleLayout::Channel);
    let mut xr = gpu.alloc::<bf16>(&[8, 64]).unwrap();
    fill_normal(&gpu, &mut xr, 2, 0.0, 1.0).unwrap();
    let mut y = gpu.alloc::<bf16>(&[8, 32]).unwrap();
    let err = |r: demask::Result<()>| r.expect_err("must be refused").to_string();
    // Scales of the wrong layout.
    let bad_scales = Fp8Weight { q: gpu.alloc(&[32, 64]).unwrap(), scales: gpu.alloc(&[1, 1]).unwrap(), layout: ScaleLayout::Channel };
    assert!(err(fp8::linear_fp8(&gpu, 4, &xr, &bad_scales, None, &mut y)).contains("scales"));
    // k % 16 != 0.
    let odd = Fp8Weight { q: gpu.alloc(&[32, 40]).unwrap(), scales: gpu.alloc(&[32]).unwrap(), layout: ScaleLayout::Channel };
    let x40 = gpu.alloc::<bf16>(&[8, 40]).unwrap();
    assert!(err(fp8::linear_fp8(&gpu, 4, &x40, &odd, None, &mut y)).contains("`w`"));
    // x with too few rows or the wrong k; y too small; bias of the wrong length.
    assert!(err(fp8::linear_fp8(&gpu, 9, &xr, &w, None, &mut y)).contains("`x`"));
    let x32 = gpu.alloc::<bf16>(&[8, 32]).unwrap();
    assert!(err(fp8::linear_fp8(&gpu, 4, &x32, &w, None, &mut y)).contains("`x`"));
    let mut y_wide = gpu.alloc::<f32>(&[8, 33]).unwrap();
    assert!(err(fp8::linear_fp8(&gpu, 4, &xr, &w, None, &mut y_wide)).contains("`y`"));
    let bias = gpu.alloc::<bf16>(&[31]).unwrap();
    assert!(err(fp8::linear_fp8(&gpu, 4, &xr, &w, Some(&bias), &mut y)).contains("bias"));
    // SwiGLU: `act` must be [t, n/2].
    let mut act = gpu.alloc::<bf16>(&[8, 15]).unwrap();
    assert!(err(fp8::linear_fp8_swiglu(&gpu, 4, &xr, &w, &mut act)).contains("`act`"));
    // t = 0 is a no-op.
    assert!(fp8::linear_fp8(&gpu, 0, &xr, &w, None, &mut y).is_ok());
}

/// Median µs of 20 calls after 5 warm-ups, call i using weight i % 3 (never L2-resident).
fn time_us(gpu: &Gpu, mut call: impl FnMut(usize)) -> f64 {
    for i in 0..5 {
        call(i);
    }
    let ev: Vec<_> = (0..21).map(|_| gpu.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).unwrap()).collect();
    ev[0].record(&gpu.stream).unwrap();
    for i in 0..20 {
        call(i);
        ev[i + 1].record(&gpu.stream).unwrap();
    }
    ev[20].synchronize().unwrap();
    let mut us: Vec<f64> = (0..20).map(|i| ev[i].elapsed_ms(&ev[i + 1]).unwrap() as f64 * 1e3).collect();
    us.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (us[9] + us[10]) / 2.0
}

fn time_row<Y: GemmOut>(gpu: &Gpu, name: &str, n: usize, k: usize, t: usize, y: &mut DTensor<Y>) {
    let bf: Vec<DTensor<bf16>> = (0..3).map(|i| device_weight(gpu, n, k, 900 + i, ScaleLayout::Channel).0).collect();
    let f8: Vec<Fp8Weight> = bf.iter().map(|w| Fp8Weight::quantize(gpu, w, ScaleLayout::Channel).unwrap()).collect();
    let f8b: Vec<Fp8Weight> = bf.iter().map(|w| Fp8Weight::quantize(gpu, w, ScaleLayout::Block128).unwrap()).collect();
    let mut x = gpu.alloc::<bf16>(&[64, k]).unwrap();
    fill_normal(gpu, &mut x, 5, 0.0, 1.0).unwrap();
    let sk = SkinnyConfig::default();
    let lt = time_us(gpu, |i| demask::gpu::gemm::linear(gpu, t, &x, &bf[i % 3], None, y).unwrap());
    let sb = time_us(gpu, |i| gemm::skinny_linear(gpu, &sk, t, &x, &bf[i % 3], None, y).unwrap());
    let gbs = |us: f64, bytes: usize| bytes as f64 / us / 1e3;
    let mut line = format!(
        "{name:<14} t={t:<3} cuBLASLt {lt:7.1} µs ({:5.0} GB/s) | skinny bf16 {sb:7.1} ({:5.0})",
        gbs(lt, 2 * n * k),
        gbs(sb, 2 * n * k)
    );
    for kernel in kernels(gpu) {
        let cfg = Fp8Config { splits: None, kernel };
        let f = time_us(gpu, |i| fp8::skinny_fp8(gpu, &cfg, t, &x, &f8[i % 3], None, y).unwrap());
        let fb = time_us(gpu, |i| fp8::skinny_fp8(gpu, &cfg, t, &x, &f8b[i % 3], None, y).unwrap());
        line += &format!(
            " | {} channel {f:6.1} ({:5.0}) block {fb:6.1} ({:5.0}) {:.2}×",
            kernel.name(),
            gbs(f, n * k),
            gbs(fb, n * k),
            lt.min(sb) / f
        );
    }
    println!("{line}  (× = best bf16 / fp8 channel)");
}

#[test]
fn fp8_vs_bf16_timing() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    println!("device {} ({} SMs); µs median of 20, W rotated over 3 buffers; GB/s of W bytes", gpu.name, gpu.sm_count);
    let shapes = [
        ("llada qkv", 12288, 4096),
        ("llada o", 4096, 4096),
        ("llada gate|up", 24576, 4096),
        ("llada down", 4096, 12288),
        ("dream qkv", 4608, 3584),
        ("dream gate|up", 37888, 3584),
        ("dream down", 3584, 18944),
    ];
    for (name, n, k) in shapes {
        for t in [1, 32, 64] {
            let mut y = gpu.alloc::<bf16>(&[64, n]).unwrap();
            time_row(&gpu, name, n, k, t, &mut y);
        }
    }
}

#[test]
fn fp8_split_sweep() {
    // Prints µs per k-split count at t = 32 for the LLaDA-8B shapes (W rotated over 3 copies),
    // marking the count `skinny_plan` picks: data for tuning the FP8 plan (never fails on time).
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    if gpu.cc_major < 9 {
        eprintln!("skipping split sweep: no thread-block clusters on this device");
        return;
    }
    let t = 32;
    for (name, n, k) in [("qkv", 12288, 4096), ("o", 4096, 4096), ("gate|up", 24576, 4096), ("down", 4096, 12288)] {
        let ws: Vec<Fp8Weight> = (0..3).map(|i| device_weight(&gpu, n, k, 950 + i, ScaleLayout::Channel).1).collect();
        let mut x = gpu.alloc::<bf16>(&[t, k]).unwrap();
        fill_normal(&gpu, &mut x, 9, 0.0, 1.0).unwrap();
        let mut y = gpu.alloc::<bf16>(&[t, n]).unwrap();
        let auto = gemm::skinny_plan(&SkinnyConfig { splits: None, k128: true }, gpu.sm_count, true, n, k).splits;
        for kernel in kernels(&gpu) {
            let mut line = format!("{name:<8} {n}x{k} t={t} {:<5}:", kernel.name());
            for s in 1..=MAX_SPLITS {
                let cfg = Fp8Config { splits: Some(s), kernel };
                let us = time_us(&gpu, |i| fp8::skinny_fp8(&gpu, &cfg, t, &x, &ws[i % 3], None, &mut y).unwrap());
                line += &format!(" {s}:{us:.1}{}", if s == auto { "*" } else { "" });
            }
            println!("{line}  (µs per split count; * = the plan's choice; {:.0} GB/s at the plan's)", {
                let cfg = Fp8Config { splits: Some(auto), kernel };
                (n * k) as f64 / time_us(&gpu, |i| fp8::skinny_fp8(&gpu, &cfg, t, &x, &ws[i % 3], None, &mut y).unwrap()) / 1e3
            });
        }
    }
}
