//! The `skinny` W8A8 path (kernels/gemm_w8a8_skinny.cu: E4M3 activations × E4M3 weights on
//! `mma.sync` m16n8k32, t ≤ 64) against the CPU reference `cpu::gemm_fp8::linear_w8a8`:
//! - awkward shapes (n not a multiple of 128, k a multiple of 16 but not of 128) and every
//!   LLaDA-8B / Dream-7B linear shape, t from 1 to 64 (every n-tile count and partial tiles),
//!   with and without bias, with the split count from the plan and forced (1, 2, 3, 4: the
//!   cluster reduction);
//! - the gate|up entry points (SwiGLU in the epilogue) bit for bit against the plain kernel
//!   into bf16 followed by `ops::swiglu`, and within tolerance of the CPU;
//! - `skinny` runs only when selected (`auto` keeps cuBLASLt: measured faster in W1 steps),
//!   up to 64 rows, with the W8A16 fallback above; refusals say why;
//! - `ops::norm::add_rmsnorm_quant` (the norm writing the codes the skinny GEMM reads) bit for
//!   bit against `add_rmsnorm` followed by `quantize_rows`;
//! - a timing sweep (split counts; prints, never fails on time).
//!
//! Tolerance: as tests/gpu_fp8/w8a8.rs (`check`): the same E4M3 codes multiplied in f32, so the
//! GPU differs by accumulation order and the bf16 output rounding: |d| ≤ 4e-3 + 8e-3·|ref|.
use super::w8a8::{has_fp8, normal, to_f32, w8a8};
use crate::lock;
use demask::cpu::gemm_fp8 as cpu_fp8;
use demask::gpu::{test_gpu, DTensor, Gpu};
use demask::ops::gemm::GemmVariant;
use demask::ops::gemm_fp8::{linear_any, linear_swiglu_any, Fp8Weight, LinearWeight};
use demask::ops::gemm_w8a8::{quantize_rows, skinny_w8a8, W8a8Path, W8a8Select};
use demask::quant::ScaleLayout;
use half::bf16;

/// Hopper (the kernel's only SASS target), or `false` after printing why the test is skipped.
pub(crate) fn has_skinny(gpu: &Gpu) -> bool {
    if gpu.cc_major != 9 {
        eprintln!("skipping: the skinny W8A8 kernel runs on sm_90 only (this device is sm_{}x)", gpu.cc_major);
        return false;
    }
    has_fp8(gpu)
}

/// Compares rows `rows ∩ [0, t)` of `got` (`[>= t, n]`) with `want` (`[rows.len(), n]`).
pub(crate) fn compare(label: &str, got: &[f32], want: &[f32], rows: &[usize], t: usize, n: usize) {
    let mut bad = Vec::new();
    for (i, &r) in rows.iter().enumerate().filter(|&(_, &r)| r < t) {
        for c in 0..n {
            let (g, w) = (got[r * n + c], want[i * n + c]);
            let ok = (g - w).abs() <= 4e-3 + 8e-3 * w.abs(); // false for NaN
            if !ok {
                bad.push((r, c, g, w));
            }
        }
    }
    assert!(bad.is_empty(), "{label}: {} mismatches, first (row, col, got, want) {:?}", bad.len(), &bad[..bad.len().min(6)]);
}

/// One weight of a W8A8 parity test: `w` `[n, k]` (channel-scaled codes of normal weights),
/// 64 input rows `x`, a bias `bt`, and the CPU reference (`cpu::gemm_fp8::linear_w8a8`) without
/// and with the bias for the reference `rows`: all 64 for small weights, a spread (every
/// n-tile, both tile halves) for large ones (each output row depends only on its input row);
/// `ts`, the row counts to test.
pub(crate) struct Case {
    pub w: Fp8Weight,
    pub x: DTensor<bf16>,
    pub bt: DTensor<bf16>,
    pub rows: Vec<usize>,
    pub want: Vec<f32>,
    pub want_b: Vec<f32>,
    pub ts: &'static [usize],
}

impl Case {
    pub fn new(gpu: &Gpu, n: usize, k: usize, seed: u64) -> Case {
        let wb = normal(gpu, &[n, k], seed, 1.0 / (k as f32).sqrt());
        let w = Fp8Weight::quantize(gpu, &wb, ScaleLayout::Channel).unwrap();
        let x = normal(gpu, &[64, k], seed + 1, 1.0);
        let bt = normal(gpu, &[n], seed + 2, 0.5);
        let small = n * k <= 1 << 22;
        let rows: Vec<usize> = if small { (0..64).collect() } else { vec![0, 5, 8, 18, 31, 32, 47, 63] };
        let (wm, xf, bf) = (w.to_host(gpu).unwrap(), to_f32(gpu, &x), to_f32(gpu, &bt));
        let xs: Vec<f32> = rows.iter().flat_map(|&r| xf[r * k..(r + 1) * k].iter().copied()).collect();
        let (mut want, mut want_b) = (vec![0f32; rows.len() * n], vec![0f32; rows.len() * n]);
        cpu_fp8::linear_w8a8(&xs, &wm, None, &mut want);
        cpu_fp8::linear_w8a8(&xs, &wm, Some(&bf), &mut want_b);
        let ts: &'static [usize] = if small { &[1, 7, 8, 9, 16, 19, 32, 33, 48, 64] } else { &[1, 19, 32, 64] };
        Case { w, x, bt, rows, want, want_b, ts }
    }
}

#[test]
fn skinny_matches_the_reference() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    if !has_skinny(&gpu) {
        return;
    }
    // (n, k): awkward, then LLaDA-8B (qkv, o, gate|up, down) and Dream-7B (qkv, gate|up, down).
    let shapes: [(usize, usize); 10] = [
        (384, 512),
        (1008, 144),
        (136, 4112),
        (12288, 4096),
        (4096, 4096),
        (24576, 4096),
        (4096, 12288),
        (4608, 3584),
        (37888, 3584),
        (3584, 18944),
    ];
    let mut m = w8a8(&gpu, 64, 18944, W8a8Select::Skinny);
    for (si, &(n, k)) in shapes.iter().enumerate() {
        let Case { w, x, bt, rows, want, want_b, ts } = Case::new(&gpu, n, k, 300 + 10 * si as u64);
        for (i, &t) in ts.iter().enumerate() {
            let bias = i % 2 == 1;
            let mut y = gpu.upload(&vec![bf16::NAN; (t + 1) * n], &[t + 1, n]).unwrap();
            let path = m.linear(&gpu, t, &x, &w, bias.then_some(&bt), &mut y).unwrap();
            assert_eq!(path, Some(W8a8Path::Skinny), "{n}x{k} t={t}");
            let got = to_f32(&gpu, &y);
            assert!(got[t * n..].iter().all(|v| v.is_nan()), "{n}x{k} t={t}: row t written");
            compare(&format!("{n}x{k} t={t} bias={bias}"), &got, if bias { &want_b } else { &want }, &rows, t, n);
        }
        // Forced split counts (cluster split-K through distributed shared memory) at 32 rows.
        let t = 32;
        let mut q = gpu.alloc::<u8>(&[t, k]).unwrap();
        let mut s = gpu.alloc::<f32>(&[t]).unwrap();
        quantize_rows(&gpu, t, &x, &mut q, &mut s).unwrap();
        for splits in [1, 2, 3, 4] {
            let mut y = gpu.alloc::<bf16>(&[t, n]).unwrap();
            skinny_w8a8(&gpu, Some(splits), t, &q, &s, &w, Some(&bt), &mut y).unwrap();
            compare(&format!("{n}x{k} t={t} splits={splits}"), &to_f32(&gpu, &y), &want_b, &rows, t, n);
        }
    }
}

#[test]
fn skinny_swiglu_is_the_linear_then_swiglu() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    if !has_skinny(&gpu) {
        return;
    }
    // ffn = 1000: the last block's 64 gate rows run past ffn (rows zero-filled, columns skipped).
    for &(ffn, k) in &[(1536, 1024), (1000, 528)] {
        let wb = normal(&gpu, &[2 * ffn, k], 31, 1.0 / (k as f32).sqrt());
        let w = Fp8Weight::quantize(&gpu, &wb, ScaleLayout::Channel).unwrap();
        let x = normal(&gpu, &[64, k], 32, 1.0);
        let mut m = w8a8(&gpu, 64, k, W8a8Select::Skinny);
        let mut want_gu = vec![0f32; 64 * 2 * ffn];
        cpu_fp8::linear_w8a8(&to_f32(&gpu, &x), &w.to_host(&gpu).unwrap(), None, &mut want_gu);
        let mut want = vec![0f32; 64 * ffn];
        demask::cpu::swiglu::swiglu(&want_gu, ffn, &mut want);
        for t in [1, 19, 32, 64] {
            let mut gu = gpu.upload(&vec![bf16::NAN; t * 2 * ffn], &[t, 2 * ffn]).unwrap();
            let mut fused = gpu.upload(&vec![bf16::NAN; (t + 1) * ffn], &[t + 1, ffn]).unwrap();
            let p = m.linear_swiglu(&gpu, t, &x, &w, &mut gu, &mut fused).unwrap();
            assert_eq!(p, Some(W8a8Path::Skinny), "ffn={ffn} t={t}");
            assert!(gu.to_host(&gpu).unwrap().iter().all(|v| v.is_nan()), "ffn={ffn} t={t}: skinny SwiGLU wrote gu");
            // The plain kernel, unsplit (as the SwiGLU entry points always are), then ops::swiglu.
            let mut q = gpu.alloc::<u8>(&[t, k]).unwrap();
            let mut s = gpu.alloc::<f32>(&[t]).unwrap();
            quantize_rows(&gpu, t, &x, &mut q, &mut s).unwrap();
            skinny_w8a8(&gpu, Some(1), t, &q, &s, &w, None, &mut gu).unwrap();
            let mut two = gpu.alloc::<bf16>(&[t, ffn]).unwrap();
            demask::ops::swiglu::swiglu(&gpu, t, &gu, &mut two).unwrap();
            let (a, b) = (two.to_host(&gpu).unwrap(), fused.to_host(&gpu).unwrap());
            let diff = (0..t * ffn).find(|&i| a[i].to_bits() != b[i].to_bits());
            assert!(diff.is_none(), "ffn={ffn} t={t}: fused != two-step at {diff:?}");
            assert!(b[t * ffn..].iter().all(|v| v.is_nan()), "ffn={ffn} t={t}: row t written");
            let worst = (0..t * ffn).map(|i| (b[i].to_f32() - want[i]).abs() / (0.05 + want[i].abs())).fold(0f32, f32::max);
            assert!(worst < 0.05, "ffn={ffn} t={t}: worst relative difference to the CPU {worst}");
        }
    }
}

#[test]
fn skinny_runs_when_selected_up_to_64_rows_and_refusals_say_why() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    if !has_skinny(&gpu) {
        return;
    }
    let (n, k) = (512, 1024);
    let wb = normal(&gpu, &[n, k], 41, 1.0 / 32.0);
    let w = LinearWeight::Fp8(Fp8Weight::quantize(&gpu, &wb, ScaleLayout::Channel).unwrap());
    let LinearWeight::Fp8(fw) = &w else { unreachable!() };
    let x = normal(&gpu, &[128, k], 42, 1.0);
    for select in [W8a8Select::Auto, W8a8Select::Skinny] {
        let mut m = w8a8(&gpu, 128, k, select);
        m.set_min_rows(1).unwrap();
        for t in [1, 32, 64, 65, 128] {
            let mut y = gpu.alloc::<bf16>(&[t, n]).unwrap();
            linear_any(&gpu, GemmVariant::Auto, t, &x, &w, None, &mut y, Some(&mut m)).unwrap();
            let path = m.last_path();
            match select {
                // `skinny` alone: the kernel up to 64 rows, nothing above (the W8A16 fallback).
                W8a8Select::Skinny => assert_eq!(path, (t <= 64).then_some(W8a8Path::Skinny), "skinny, t = {t}"),
                _ => assert!(path.is_some_and(|p| p != W8a8Path::Skinny), "auto, t = {t}: {path:?}"),
            }
        }
        let mut gu = gpu.alloc::<bf16>(&[32, n]).unwrap();
        let mut act = gpu.alloc::<bf16>(&[32, n / 2]).unwrap();
        linear_swiglu_any(&gpu, GemmVariant::Auto, 32, &x, &w, &mut gu, &mut act, Some(&mut m), None).unwrap();
        assert_eq!(m.last_path() == Some(W8a8Path::Skinny), select == W8a8Select::Skinny, "{select}");
    }
    // `skinny` alone: above 64 rows nothing takes it (the caller falls back to W8A16), said so.
    let s = w8a8(&gpu, 128, k, W8a8Select::Skinny);
    let why = s.refusal::<bf16>(65, fw, false).expect("65 rows refused");
    assert!(why.contains("skinny") && why.contains("64 rows"), "{why}");
    assert!(s.refusal::<bf16>(64, fw, true).is_none());
    let block = Fp8Weight::quantize(&gpu, &wb, ScaleLayout::Block128).unwrap();
    assert!(s.refusal::<bf16>(8, &block, false).is_some_and(|r| r.contains("channel scales")));
    // The kernel entry point checks its operands.
    let mut q = gpu.alloc::<u8>(&[64, k]).unwrap();
    let mut sx = gpu.alloc::<f32>(&[64]).unwrap();
    quantize_rows(&gpu, 64, &x, &mut q, &mut sx).unwrap();
    let mut y = gpu.alloc::<bf16>(&[128, n]).unwrap();
    let e = skinny_w8a8(&gpu, None, 65, &q, &sx, fw, None, &mut y).unwrap_err().to_string();
    assert!(e.contains("64 rows"), "{e}");
    let short = gpu.alloc::<f32>(&[16]).unwrap();
    let e = skinny_w8a8(&gpu, None, 32, &q, &short, fw, None, &mut y).unwrap_err().to_string();
    assert!(e.contains("sx"), "{e}");
    let bad_bias = gpu.alloc::<bf16>(&[n - 8]).unwrap();
    let e = skinny_w8a8(&gpu, None, 32, &q, &sx, fw, Some(&bad_bias), &mut y).unwrap_err().to_string();
    assert!(e.contains("bias"), "{e}");
}

#[test]
fn norm_quant_is_the_norm_then_the_quantiser() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    for &(rows, hidden, with_delta) in &[(1, 4096, false), (32, 4096, true), (64, 3584, true), (7, 528, false), (33, 2048, true)] {
        let seed = (rows * hidden) as u64;
        let x0 = normal(&gpu, &[rows, hidden], seed, 2.0);
        let d = normal(&gpu, &[rows, hidden], seed + 1, 1.0);
        let w = normal(&gpu, &[hidden], seed + 2, 0.3);
        let delta = with_delta.then_some(&d);
        // Reference: the plain norm, then the row quantiser on its output.
        let mut xa = gpu.upload(&x0.to_host(&gpu).unwrap(), &[rows, hidden]).unwrap();
        let mut ha = gpu.alloc::<bf16>(&[rows, hidden]).unwrap();
        demask::ops::norm::add_rmsnorm(&gpu, rows, &mut xa, delta, &w, 1e-5, &mut ha).unwrap();
        let (mut qa, mut sa) = (gpu.alloc::<u8>(&[rows, hidden]).unwrap(), gpu.alloc::<f32>(&[rows]).unwrap());
        quantize_rows(&gpu, rows, &ha, &mut qa, &mut sa).unwrap();
        // Fused.
        let mut xb = gpu.upload(&x0.to_host(&gpu).unwrap(), &[rows, hidden]).unwrap();
        let mut hb = gpu.alloc::<bf16>(&[rows, hidden]).unwrap();
        let (mut qb, mut sb) = (gpu.alloc::<u8>(&[rows, hidden]).unwrap(), gpu.alloc::<f32>(&[rows]).unwrap());
        demask::ops::norm::add_rmsnorm_quant(&gpu, rows, &mut xb, delta, &w, 1e-5, &mut hb, &mut qb, &mut sb).unwrap();
        let label = format!("{rows}x{hidden} delta={with_delta}");
        assert_eq!(xa.to_host(&gpu).unwrap(), xb.to_host(&gpu).unwrap(), "{label}: residual");
        assert_eq!(ha.to_host(&gpu).unwrap(), hb.to_host(&gpu).unwrap(), "{label}: out");
        assert_eq!(sa.to_host(&gpu).unwrap(), sb.to_host(&gpu).unwrap(), "{label}: scales");
        let (a, b) = (qa.to_host(&gpu).unwrap(), qb.to_host(&gpu).unwrap());
        assert_eq!(a.iter().zip(&b).position(|(p, q)| p != q), None, "{label}: first differing code");
        assert!(a.iter().filter(|&&c| c & 0x7f != 0).count() > a.len() / 2, "{label}: degenerate codes");
    }
    // hidden must be a multiple of 16 for 16-byte code rows.
    let (mut x, w) = (normal(&gpu, &[2, 520], 1, 1.0), normal(&gpu, &[520], 2, 1.0));
    let mut h = gpu.alloc::<bf16>(&[2, 520]).unwrap();
    let (mut q, mut s) = (gpu.alloc::<u8>(&[2, 520]).unwrap(), gpu.alloc::<f32>(&[2]).unwrap());
    let e = demask::ops::norm::add_rmsnorm_quant(&gpu, 2, &mut x, None, &w, 1e-5, &mut h, &mut q, &mut s).unwrap_err();
    assert!(e.to_string().contains("16"), "{e}");
}

/// µs per call, median of 20 after 3 warm-ups (CUDA events).
pub(crate) fn time_us(gpu: &Gpu, f: &mut dyn FnMut(usize)) -> f64 {
    let timer = demask::gpu::Timer::new(gpu).unwrap();
    let mut v: Vec<f32> = (0..23)
        .map(|i| {
            timer.start(gpu).unwrap();
            f(i);
            timer.stop_ms(gpu).unwrap()
        })
        .skip(3)
        .collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[10] as f64 * 1e3
}

/// µs per call of `f(i)` run back to back, as in a forward: 5 repetitions of 21 calls between
/// two events, the median of their means. Unlike [`time_us`] (one call between events), the
/// host's launch work overlaps the GPU's, as it does when a graph replays.
pub(crate) fn time_us_b2b(gpu: &Gpu, f: &mut dyn FnMut(usize)) -> f64 {
    let timer = demask::gpu::Timer::new(gpu).unwrap();
    for i in 0..3 {
        f(i);
    }
    let mut v: Vec<f32> = (0..5)
        .map(|_| {
            timer.start(gpu).unwrap();
            for i in 0..21 {
                f(i);
            }
            timer.stop_ms(gpu).unwrap() / 21.0
        })
        .collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[2] as f64 * 1e3
}

/// The LLaDA-8B and Dream-7B linear shapes the timing tables sweep.
pub(crate) const DECODE_SHAPES: [(&str, usize, usize); 8] = [
    ("llada qkv", 12288, 4096),
    ("llada o", 4096, 4096),
    ("llada gate|up", 24576, 4096),
    ("llada down", 4096, 12288),
    ("dream qkv", 4608, 3584),
    ("dream o", 3584, 3584),
    ("dream gate|up", 37888, 3584),
    ("dream down", 3584, 18944),
];

/// Operands of a timing row: three copies of an `[n, k]` weight (rotated, so the L2 never holds
/// it), 64 input rows and their codes and scales, an output.
pub(crate) struct TimingOperands {
    pub ws: Vec<Fp8Weight>,
    pub x: DTensor<bf16>,
    pub q: DTensor<u8>,
    pub s: DTensor<f32>,
    pub y: DTensor<bf16>,
}

impl TimingOperands {
    pub fn new(gpu: &Gpu, n: usize, k: usize) -> Self {
        let ws = (0..3).map(|i| Fp8Weight::quantize(gpu, &normal(gpu, &[n, k], 50 + i, 0.02), ScaleLayout::Channel).unwrap()).collect();
        let x = normal(gpu, &[64, k], 60, 1.0);
        let mut q = gpu.alloc::<u8>(&[64, k]).unwrap();
        let mut s = gpu.alloc::<f32>(&[64]).unwrap();
        quantize_rows(gpu, 64, &x, &mut q, &mut s).unwrap();
        TimingOperands { ws, x, q, s, y: gpu.alloc(&[64, n]).unwrap() }
    }
}

#[test]
fn skinny_split_sweep_timing() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    if !has_skinny(&gpu) {
        return;
    }
    println!(
        "device {}; skinny W8A8 kernel alone (rows already quantised), µs per call, median of 20; \
         W rotated over 3 copies (L2 never holds the weight); GB/s of W codes",
        gpu.name
    );
    for (name, n, k) in DECODE_SHAPES {
        let TimingOperands { ws, x, q, s, mut y } = TimingOperands::new(&gpu, n, k);
        for t in [1usize, 16, 32, 64] {
            let mut line = format!("{name:<14} t={t:<3}");
            for splits in [None, Some(1), Some(2), Some(3), Some(4), Some(6), Some(8)] {
                let us = time_us(&gpu, &mut |i| skinny_w8a8(&gpu, splits, t, &q, &s, &ws[i % 3], None, &mut y).unwrap());
                let label = splits.map_or("auto".to_string(), |s| s.to_string());
                line += &format!(" | {label} {us:6.1} ({:4.0})", (n * k) as f64 / us / 1e3);
            }
            if name.contains("gate|up") {
                let mut m = w8a8(&gpu, 64, k, W8a8Select::Skinny);
                let mut act = gpu.alloc::<bf16>(&[64, n / 2]).unwrap();
                let mut gu = gpu.alloc::<bf16>(&[64, n]).unwrap();
                let us = time_us(&gpu, &mut |i| {
                    m.linear_swiglu(&gpu, t, &x, &ws[i % 3], &mut gu, &mut act).unwrap();
                });
                line += &format!(" | swiglu+quant {us:6.1} ({:4.0})", (n * k) as f64 / us / 1e3);
            }
            println!("{line}");
        }
    }
}
