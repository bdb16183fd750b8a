//! The skinny GEMM (`ops::gemm`, kernels/gemm_skinny.cu) vs the CPU reference
//! `cpu::gemm::linear` at every LLaDA-8B / Dream-7B linear shape and awkward ones, t from 1 to
//! 64, with and without bias, bf16 and f32 out; determinism; shape errors; the `auto`
//! dispatch; and a timing table against cuBLASLt (prints, never fails on time).
//!
//! Tolerance (as tests/gpu_gemm.rs, x ~ N(0, 1), w ~ N(0, 1/k), so |y| ~ 1): f32 out differs
//! from the f32 reference only by accumulation order, |d| ≤ 2e-3 + 1e-3·|ref|; bf16 out adds
//! one rounding (2⁻⁹ relative), |d| ≤ 4e-3 + 8e-3·|ref|.
#![cfg(feature = "cuda")]
use std::sync::Mutex;

use cudarc::driver::sys::CUevent_flags;
use demask::cpu::gemm as cpu_gemm;
use demask::gpu::gemm::GemmOut;
use demask::gpu::{sanitizer_shapes, test_gpu, DTensor, Gpu};
use demask::ops::fill::fill_normal;
use demask::ops::gemm::{self, GemmVariant, SkinnyConfig, SKINNY_ROW_LIMIT};
use half::bf16;
use rand::{rngs::StdRng, SeedableRng};
use rand_distr::{Distribution, Normal};

/// Tests in this file share the GPU one at a time (so the timing test runs alone).
static GPU_LOCK: Mutex<()> = Mutex::new(());

const TS: [usize; 6] = [1, 7, 19, 32, 33, 64];
const MAX_T: usize = 64;

fn lock() -> std::sync::MutexGuard<'static, ()> {
    GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn rand_bf16(n: usize, std: f32, rng: &mut StdRng) -> (Vec<bf16>, Vec<f32>) {
    let d = Normal::new(0.0f32, std).unwrap();
    let b: Vec<bf16> = (0..n).map(|_| bf16::from_f32(d.sample(rng))).collect();
    let f = b.iter().map(|x| x.to_f32()).collect();
    (b, f)
}

/// One weight shape with its operands on both sides and the f32 reference for MAX_T rows.
struct Problem {
    n: usize,
    k: usize,
    x: DTensor<bf16>,
    w: DTensor<bf16>,
    bias: DTensor<bf16>,
    bias_f: Vec<f32>,
    /// x[0..MAX_T] · wᵀ without bias, [MAX_T, n].
    want: Vec<f32>,
    /// `Some(s)`: `check` runs the skinny kernel with exactly s k-splits instead of `linear`.
    splits: Option<usize>,
    /// With `splits`: the 128-column-stage kernels.
    k128: bool,
}

impl Problem {
    /// w ~ N(0, 1/k) synthesised on the device (then read back for the reference), x ~ N(0, 1),
    /// bias ~ N(0, 0.25), all bf16.
    fn new(gpu: &Gpu, n: usize, k: usize, seed: u64) -> Problem {
        let mut rng = StdRng::seed_from_u64(seed);
        let (xb, xf) = rand_bf16(MAX_T * k, 1.0, &mut rng);
        let (bb, bias_f) = rand_bf16(n, 0.5, &mut rng);
        let mut w = gpu.alloc::<bf16>(&[n, k]).unwrap();
        fill_normal(gpu, &mut w, seed ^ 0x5eed, 0.0, 1.0 / (k as f32).sqrt()).unwrap();
        let wf: Vec<f32> = w.to_host(gpu).unwrap().iter().map(|v| v.to_f32()).collect();
        // Reference in slabs of W rows (cache-friendly for the big LM heads).
        const SLAB: usize = 512;
        let mut want = vec![0f32; MAX_T * n];
        let mut part = vec![0f32; MAX_T * SLAB];
        for c0 in (0..n).step_by(SLAB) {
            let c1 = (c0 + SLAB).min(n);
            let yp = &mut part[..MAX_T * (c1 - c0)];
            cpu_gemm::linear(&xf, &wf[c0 * k..c1 * k], None, k, yp);
            for r in 0..MAX_T {
                want[r * n + c0..r * n + c1]
                    .copy_from_slice(&yp[r * (c1 - c0)..(r + 1) * (c1 - c0)]);
            }
        }
        Problem {
            n,
            k,
            x: gpu.upload(&xb, &[MAX_T, k]).unwrap(),
            w,
            bias: gpu.upload(&bb, &[n]).unwrap(),
            bias_f,
            want,
            splits: None,
            k128: false,
        }
    }

    /// Runs `t` rows into an output of t + 2 rows poisoned with NaN; checks rows < t against
    /// the reference and rows ≥ t untouched. Returns the raw output bits.
    fn check(
        &mut self,
        gpu: &Gpu,
        variant: GemmVariant,
        t: usize,
        bias: bool,
        f32_out: bool,
    ) -> Vec<u32> {
        let (n, k) = (self.n, self.k);
        let rows = t + 2;
        let b = bias.then_some(&self.bias);
        let got: Vec<f32> = if f32_out {
            let mut y = gpu.upload(&vec![f32::NAN; rows * n], &[rows, n]).unwrap();
            match self.splits {
                Some(s) => {
                    let cfg = SkinnyConfig { splits: Some(s), k128: self.k128 };
                    gemm::skinny_linear(gpu, &cfg, t, &self.x, &self.w, b, &mut y).unwrap()
                }
                None => gemm::linear(gpu, variant, t, &self.x, &self.w, b, &mut y).unwrap(),
            }
            y.to_host(gpu).unwrap()
        } else {
            let mut y = gpu.upload(&vec![bf16::NAN; rows * n], &[rows, n]).unwrap();
            match self.splits {
                Some(s) => {
                    let cfg = SkinnyConfig { splits: Some(s), k128: self.k128 };
                    gemm::skinny_linear(gpu, &cfg, t, &self.x, &self.w, b, &mut y).unwrap()
                }
                None => gemm::linear(gpu, variant, t, &self.x, &self.w, b, &mut y).unwrap(),
            }
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
        let what = format!("{variant} t={t} n={n} k={k} bias={bias} f32={f32_out}");
        assert!(
            bad.is_empty(),
            "{what}: {} mismatches, first (row, col, got, want) {:?}",
            bad.len(),
            &bad[..bad.len().min(5)]
        );
        let written = got[t * n..].iter().filter(|v| !v.is_nan()).count();
        assert_eq!(
            written, 0,
            "{what}: {written} elements written in rows >= t"
        );
        got[..t * n].iter().map(|v| v.to_bits()).collect()
    }

    /// Every t of TS, bf16 and f32 out, bias on alternate t (always when `bias`).
    fn check_all_t(&mut self, gpu: &Gpu, bias: bool) {
        for (i, &t) in TS.iter().enumerate() {
            let with_bias = bias || i % 2 == 1;
            self.check(gpu, GemmVariant::Skinny, t, with_bias, false);
            self.check(gpu, GemmVariant::Skinny, t, with_bias, true);
        }
    }
}

/// A production-shape problem. At sanitizer scale (`gpu::sanitizer_shapes`) only two 128-row
/// slabs and an 8-row tail of its W rows, launched with the split plan of the full shape: the
/// same entry points, split count, k loop and tails, on fewer blocks.
fn production(gpu: &Gpu, n: usize, k: usize, seed: u64) -> Problem {
    if !sanitizer_shapes() {
        return Problem::new(gpu, n, k, seed);
    }
    let plan = gemm::skinny_plan(&SkinnyConfig::default(), gpu.sm_count, clusters(gpu), n, k);
    let mut p = Problem::new(gpu, n.min(2 * 128 + 8), k, seed);
    p.splits = Some(plan.splits);
    eprintln!("sanitizer scale: [{n}, {k}] cut to [{}, {k}], {} split(s) as planned for the full shape", p.n, plan.splits);
    p
}

#[test]
fn skinny_awkward_shapes() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    // n not a multiple of the 32-row warp slab or of 8; k with a partial 64-column stage, a
    // partial X chunk, or a single 8-column vector; 4104 × 4104 exercises split-K with a tail.
    for (i, &(n, k)) in [
        (1000, 136),
        (4104, 4104),
        (13, 8),
        (129, 520),
        (33, 1032),
        (1, 4096),
        (129, 4104),
    ]
    .iter()
    .enumerate()
    {
        let mut p = Problem::new(&gpu, n, k, 100 + i as u64);
        p.check_all_t(&gpu, false);
    }
}

#[test]
fn skinny_every_split_count() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    if !clusters(&gpu) {
        eprintln!("skipping split-K sweep: no thread-block clusters on this device");
        return;
    }
    // Each split count 1..=8 (one cluster of that many blocks per 128-row slab), with an n tail
    // and a k range whose last split is short.
    let mut p = Problem::new(&gpu, 300, 4104, 140);
    for s in 1..=gemm::MAX_SPLITS {
        p.splits = Some(s);
        p.k128 = s % 2 == 1;
        for t in [1, 19, 32, 64] {
            p.check(&gpu, GemmVariant::Skinny, t, s % 2 == 0, s % 3 == 0);
        }
    }
}

/// The gate|up GEMM with SwiGLU in its epilogue equals the plain skinny GEMM followed by
/// `ops::swiglu` bit for bit (each output column is accumulated in the same order; the
/// epilogue rounds g and u to bf16 as the two-step path stores them), at the LLaDA / Dream
/// shapes and an ffn that leaves a partial 64-column group; rows ≥ t stay untouched; the
/// cuBLASLt path of `linear_swiglu` agrees within bf16 rounding.
#[test]
fn skinny_swiglu_epilogue_is_exact() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    for (i, &(ffn, k)) in [(12288, 4096), (18944, 3584), (136, 520)].iter().enumerate() {
        // Sanitizer scale: 264 channels (four 64-column groups and a partial one); the SwiGLU
        // entry points never split, so the launch differs only in its block count.
        let ffn = if sanitizer_shapes() { ffn.min(264) } else { ffn };
        let n = 2 * ffn;
        let mut x = gpu.alloc::<bf16>(&[MAX_T, k]).unwrap();
        fill_normal(&gpu, &mut x, 950 + i as u64, 0.0, 1.0).unwrap();
        let mut w = gpu.alloc::<bf16>(&[n, k]).unwrap();
        fill_normal(&gpu, &mut w, 960 + i as u64, 0.0, 1.5 / (k as f32).sqrt()).unwrap();
        let mut gu = gpu.alloc::<bf16>(&[MAX_T, n]).unwrap();
        let cfg = SkinnyConfig::default();
        for t in [1, 19, 32, 64] {
            let rows = t + 2;
            let bits = |v: &DTensor<bf16>| -> Vec<u16> { v.to_host(&gpu).unwrap().iter().map(|x| x.to_bits()).collect() };
            // The two-step path unsplit, as the production shapes plan it (split-K would sum
            // the columns in another order; at sanitizer scale the default plan splits).
            gemm::skinny_linear(&gpu, &SkinnyConfig { splits: Some(1), ..cfg }, t, &x, &w, None, &mut gu).unwrap();
            let mut two = gpu.upload(&vec![bf16::NAN; rows * ffn], &[rows, ffn]).unwrap();
            demask::ops::swiglu::swiglu(&gpu, t, &gu, &mut two).unwrap();
            let mut fused = gpu.upload(&vec![bf16::NAN; rows * ffn], &[rows, ffn]).unwrap();
            gemm::skinny_linear_swiglu(&gpu, &cfg, t, &x, &w, &mut fused).unwrap();
            let (a, b) = (bits(&two), bits(&fused));
            let diff: Vec<_> = (0..t * ffn).filter(|&j| a[j] != b[j]).take(5).map(|j| (j, a[j], b[j])).collect();
            assert!(diff.is_empty(), "ffn {ffn} k {k} t={t}: fused != skinny + swiglu, first (index, two-step, fused) bits {diff:?}");
            let host = fused.to_host(&gpu).unwrap();
            assert!(host[..t * ffn].iter().all(|v| v.is_finite()), "ffn {ffn} t={t}: unwritten outputs");
            assert!(host[t * ffn..].iter().all(|v| v.is_nan()), "ffn {ffn} t={t}: rows >= t written");
            // The public entry: skinny fused, and the cuBLASLt path through `gu`.
            let mut act = gpu.upload(&vec![bf16::NAN; rows * ffn], &[rows, ffn]).unwrap();
            gemm::linear_swiglu(&gpu, GemmVariant::Skinny, t, &x, &w, &mut gu, &mut act).unwrap();
            assert_eq!(bits(&act)[..t * ffn], b[..t * ffn], "ffn {ffn} t={t}: linear_swiglu(skinny)");
            gemm::linear_swiglu(&gpu, GemmVariant::Cublaslt, t, &x, &w, &mut gu, &mut act).unwrap();
            let (c, want) = (act.to_host(&gpu).unwrap(), two.to_host(&gpu).unwrap());
            let bad = (0..t * ffn)
                .filter(|&j| {
                    let (g, e) = (c[j].to_f32(), want[j].to_f32());
                    !((g - e).abs() <= 1e-2 + 2e-2 * e.abs())
                })
                .count();
            assert_eq!(bad, 0, "ffn {ffn} t={t}: cuBLASLt path differs beyond bf16 rounding");
        }
    }
}

#[test]
fn skinny_llada_shapes() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    // QKV, O, gate|up, down of LLaDA-8B.
    for (i, &(n, k)) in [
        (3 * 4096, 4096),
        (4096, 4096),
        (2 * 12288, 4096),
        (4096, 12288),
    ]
    .iter()
    .enumerate()
    {
        let mut p = production(&gpu, n, k, 200 + i as u64);
        p.check_all_t(&gpu, false);
    }
}

#[test]
fn skinny_dream_shapes() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    // QKV (with bias), O, gate|up, down of Dream-7B.
    let mut qkv = production(&gpu, (28 + 8) * 128, 3584, 300);
    qkv.check_all_t(&gpu, true);
    for (i, &(n, k)) in [(3584, 3584), (2 * 18944, 3584), (3584, 18944)]
        .iter()
        .enumerate()
    {
        let mut p = production(&gpu, n, k, 301 + i as u64);
        p.check_all_t(&gpu, false);
    }
}

#[test]
fn skinny_lm_heads() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    for (i, &(n, k)) in [(126464, 4096), (152064, 3584)].iter().enumerate() {
        let mut p = production(&gpu, n, k, 400 + i as u64);
        for &t in &TS {
            p.check(&gpu, GemmVariant::Skinny, t, false, true);
        }
        p.check(&gpu, GemmVariant::Skinny, 32, false, false);
    }
}

#[test]
fn skinny_is_deterministic() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    // A split-K shape (O projection) and a direct one (gate|up), each run twice.
    for (i, &(n, k)) in [(4096, 4096), (2 * 12288, 4096)].iter().enumerate() {
        let mut p = Problem::new(&gpu, n, k, 500 + i as u64);
        for &t in &[19, 32, 64] {
            for f32_out in [false, true] {
                let a = p.check(&gpu, GemmVariant::Skinny, t, true, f32_out);
                let b = p.check(&gpu, GemmVariant::Skinny, t, true, f32_out);
                let diff = a.iter().zip(&b).filter(|(x, y)| x != y).count();
                assert_eq!(
                    diff, 0,
                    "n={n} k={k} t={t} f32={f32_out}: {diff} elements differ between two runs"
                );
            }
        }
    }
}

#[test]
fn auto_and_cublaslt_dispatch() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    // Sanitizer scale: 264 W rows (the dispatch is the same; cuBLASLt gets a small shape).
    let n = if sanitizer_shapes() { 2 * 128 + 8 } else { 4096 };
    let mut p = Problem::new(&gpu, n, 4096, 600);
    for &t in &[1usize, 32, 33, 64] {
        p.check(&gpu, GemmVariant::Auto, t, true, false);
        // cuBLASLt's bias epilogue needs a bf16 output; f32 output is checked without bias.
        p.check(&gpu, GemmVariant::Cublaslt, t, true, false);
        p.check(&gpu, GemmVariant::Cublaslt, t, false, true);
    }
}

#[test]
fn skinny_rejects_bad_shapes() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    let x = gpu
        .upload(&vec![bf16::from_f32(0.5); 80 * 64], &[80, 64])
        .unwrap();
    let w = gpu
        .upload(&vec![bf16::from_f32(0.25); 16 * 64], &[16, 64])
        .unwrap();
    let mut y = gpu.alloc::<bf16>(&[80, 16]).unwrap();
    let sk = SkinnyConfig::default();
    let too_many = SKINNY_ROW_LIMIT + 1;
    assert!(
        gemm::skinny_linear(&gpu, &sk, too_many, &x, &w, None, &mut y).is_err(),
        "t > 64 must be refused"
    );
    // The `skinny` variant hands what the kernel cannot take to cuBLASLt instead.
    assert!(gemm::linear(&gpu, GemmVariant::Skinny, too_many, &x, &w, None, &mut y).is_ok());
    let bias = gpu.upload(&[bf16::from_f32(1.0); 15], &[15]).unwrap();
    assert!(
        gemm::skinny_linear(&gpu, &sk, 4, &x, &w, Some(&bias), &mut y).is_err(),
        "bias of 15 for n = 16"
    );
    let w_odd = gpu
        .upload(&vec![bf16::from_f32(0.25); 16 * 60], &[16, 60])
        .unwrap();
    let x_odd = gpu
        .upload(&vec![bf16::from_f32(0.5); 4 * 60], &[4, 60])
        .unwrap();
    assert!(
        gemm::skinny_linear(&gpu, &sk, 4, &x_odd, &w_odd, None, &mut y).is_err(),
        "k % 8 != 0"
    );
    let mut y_short = gpu.alloc::<bf16>(&[3, 16]).unwrap();
    assert!(
        gemm::skinny_linear(&gpu, &sk, 4, &x, &w, None, &mut y_short).is_err(),
        "y has 3 rows for t = 4"
    );
    let mut y_wide = gpu.alloc::<f32>(&[4, 17]).unwrap();
    assert!(
        gemm::skinny_linear(&gpu, &sk, 4, &x, &w, None, &mut y_wide).is_err(),
        "y rows of 17 for n = 16"
    );
    assert!(
        gemm::skinny_linear(&gpu, &sk, 0, &x, &w, None, &mut y).is_ok(),
        "t = 0 is a no-op"
    );
}

/// Median µs of 20 calls (after 5 warm-ups), call i using weight buffer i % 3 so W is never
/// L2-resident. Events are recorded between back-to-back calls (the queue stays full).
fn time_us(gpu: &Gpu, mut call: impl FnMut(usize)) -> f64 {
    for i in 0..5 {
        call(i);
    }
    let ev: Vec<_> = (0..21)
        .map(|_| {
            gpu.ctx
                .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .unwrap()
        })
        .collect();
    ev[0].record(&gpu.stream).unwrap();
    for i in 0..20 {
        call(i);
        ev[i + 1].record(&gpu.stream).unwrap();
    }
    ev[20].synchronize().unwrap();
    let mut us: Vec<f64> = (0..20)
        .map(|i| ev[i].elapsed_ms(&ev[i + 1]).unwrap() as f64 * 1e3)
        .collect();
    us.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (us[9] + us[10]) / 2.0
}

struct Bench {
    ws: Vec<DTensor<bf16>>,
    x: DTensor<bf16>,
    bias: DTensor<bf16>,
}

impl Bench {
    fn new(gpu: &Gpu, n: usize, k: usize) -> Bench {
        let ws = (0..3)
            .map(|i| {
                let mut w = gpu.alloc::<bf16>(&[n, k]).unwrap();
                fill_normal(gpu, &mut w, 700 + i, 0.0, 1.0 / (k as f32).sqrt()).unwrap();
                w
            })
            .collect();
        let mut x = gpu.alloc::<bf16>(&[MAX_T, k]).unwrap();
        fill_normal(gpu, &mut x, 710, 0.0, 1.0).unwrap();
        let mut bias = gpu.alloc::<bf16>(&[n]).unwrap();
        fill_normal(gpu, &mut bias, 711, 0.0, 0.5).unwrap();
        Bench {
            ws,
            x,
            bias,
        }
    }

    fn time<Y: GemmOut>(
        &mut self,
        gpu: &Gpu,
        y: &mut DTensor<Y>,
        t: usize,
        bias: bool,
        how: Option<SkinnyConfig>,
    ) -> f64 {
        let Bench {
            ws,
            x,
            bias: b,
        } = self;
        let b = bias.then_some(&*b);
        time_us(gpu, |i| {
            let w = &ws[i % 3];
            match &how {
                Some(cfg) => gemm::skinny_linear(gpu, cfg, t, x, w, b, y).unwrap(),
                None => demask::gpu::gemm::linear(gpu, t, x, w, b, y).unwrap(),
            }
        })
    }
}

#[test]
fn skinny_vs_cublaslt_timing() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    println!(
        "device {} ({} SMs); µs median of 20, W rotated over 3 buffers; GB/s of W",
        gpu.name, gpu.sm_count
    );
    // (name, n, k, bias, f32 out)
    let shapes = [
        ("llada qkv", 3 * 4096, 4096, false, false),
        ("llada o", 4096, 4096, false, false),
        ("llada gate|up", 2 * 12288, 4096, false, false),
        ("llada down", 4096, 12288, false, false),
        ("llada lm_head", 126464, 4096, false, true),
        ("dream qkv+bias", 4608, 3584, true, false),
        ("dream o", 3584, 3584, false, false),
        ("dream gate|up", 2 * 18944, 3584, false, false),
        ("dream down", 3584, 18944, false, false),
        ("dream lm_head", 152064, 3584, false, true),
    ];
    println!(
        "{:<16} {:>3} {:>6} {:>10} {:>8} {:>10} {:>8} {:>7}",
        "shape", "t", "splits", "skinny µs", "GB/s", "cublas µs", "GB/s", "speedup"
    );
    for &(name, n, k, bias, f32_out) in &shapes {
        let mut bench = Bench::new(&gpu, n, k);
        let mut y16 = gpu.alloc::<bf16>(&[MAX_T, n]).unwrap();
        let mut y32 = gpu.alloc::<f32>(&[MAX_T, n]).unwrap();
        let gb = (n * k * 2) as f64 / 1e3; // bytes / µs / 1e3 = GB/s
        for &t in &[1, 16, 32, 64] {
            let cfg = SkinnyConfig::default();
            let plan = gemm::skinny_plan(&cfg, gpu.sm_count, clusters(&gpu), n, k);
            let (sk, cb) = if f32_out {
                (
                    bench.time(&gpu, &mut y32, t, bias, Some(cfg)),
                    bench.time(&gpu, &mut y32, t, bias, None),
                )
            } else {
                (
                    bench.time(&gpu, &mut y16, t, bias, Some(cfg)),
                    bench.time(&gpu, &mut y16, t, bias, None),
                )
            };
            println!(
                "{name:<16} {t:>3} {:>6} {sk:>10.1} {:>8.0} {cb:>10.1} {:>8.0} {:>7.2}",
                plan.splits,
                gb / sk,
                gb / cb,
                cb / sk
            );
        }
    }
}

/// Whether the device runs thread-block clusters (the skinny kernel's split-K).
fn clusters(gpu: &Gpu) -> bool {
    demask::ops::attention::split_kv_supported(gpu).unwrap()
}

#[test]
fn skinny_launch_shape_sweep() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    println!("skinny sweep: µs (median of 20, W rotated over 3 buffers) per split count; '*' = default plan");
    let shapes = [
        ("llada qkv", 3 * 4096, 4096),
        ("llada o", 4096, 4096),
        ("llada gate|up", 2 * 12288, 4096),
        ("llada down", 4096, 12288),
        ("dream qkv", 4608, 3584),
        ("dream down", 3584, 18944),
    ];
    let cl = clusters(&gpu);
    for &(name, n, k) in &shapes {
        let mut bench = Bench::new(&gpu, n, k);
        let mut y = gpu.alloc::<bf16>(&[MAX_T, n]).unwrap();
        for &t in &[1, 32, 64] {
            let def = gemm::skinny_plan(&SkinnyConfig::default(), gpu.sm_count, cl, n, k);
            let mut line = format!("{name:<14} t={t:<2}");
            for k128 in [false, true] {
                for splits in 1..=gemm::MAX_SPLITS {
                    let cfg = SkinnyConfig { splits: Some(splits), k128 };
                    let plan = gemm::skinny_plan(&cfg, gpu.sm_count, cl, n, k);
                    if plan.splits != splits {
                        continue; // clamped (k or no clusters): same as another entry
                    }
                    let us = bench.time(&gpu, &mut y, t, false, Some(cfg));
                    let mark = if plan == def && !k128 { "*" } else { "" };
                    let tag = if k128 { "K" } else { "s" };
                    line += &format!(" {tag}{splits}{mark}={us:.1}");
                }
            }
            println!("{line}");
        }
    }
}
