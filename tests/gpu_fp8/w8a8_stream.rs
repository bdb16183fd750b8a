//! The `stream` W8A8 path (kernels/gemm_w8a8_stream.cu: the `skinny` contract and multiply,
//! the weight streamed stream-K by one persistent block per SM through TMA copies) against
//! the CPU
//! reference `cpu::gemm_fp8::linear_w8a8`:
//! - small shapes whose tiles are split over many blocks (every contributor count from 1 to 4,
//!   homes that also contribute, more blocks than a tile has units) and every LLaDA-8B /
//!   Dream-7B linear shape, t from 1 to 64, with and without bias, on the default block count
//!   (one per SM) and forced ones; the same launch twice is bit-identical;
//! - the gate|up entry points bit for bit against the plain kernel followed by `ops::swiglu`
//!   (on one block per tile, where both sum each output in the same order), and the default
//!   launch within tolerance of the CPU;
//! - `stream` runs only when selected, up to 64 rows with k a multiple of 128; refusals name
//!   what they refuse;
//! - a whole tiny-model forward on `stream` against the same forward on `skinny`;
//! - a timing table against `skinny` and cuBLASLt's FP8 GEMM (prints, never fails on time).
//!
//! At sanitizer scale (`DEMASK_SANITIZE_SHAPES=small`) the production shapes keep their k and
//! cut n to 384 rows, which keeps every launch configuration at a fraction of the work.
//!
//! Tolerance: tests/gpu_fp8/w8a8_skinny.rs's `compare` (the same E4M3 codes multiplied in f32).
use super::w8a8::{normal, to_f32, w8a8};
use super::w8a8_skinny::{compare, has_skinny, time_us, time_us_b2b, Case, TimingOperands, DECODE_SHAPES};
use crate::lock;
use demask::config::ModelConfig;
use demask::cpu::gemm_fp8 as cpu_fp8;
use demask::fp8_fidelity::compare_logits;
use demask::gpu::{sanitizer_shapes, test_gpu};
use demask::model::{Capacity, GpuModel, GpuWeights};
use demask::ops::gemm::GemmVariant;
use demask::ops::gemm_fp8::{linear_any, linear_fp8, Fp8Weight, LinearWeight};
use demask::ops::gemm_w8a8::{quantize_rows, skinny_w8a8, stream_w8a8, stream_w8a8_swiglu, StreamScratch, W8a8Path, W8a8Select};
use demask::quant::{ScaleLayout, WeightFormat};
use half::bf16;

/// The production shape or, at sanitizer scale, its first 384 rows.
fn cut(n: usize) -> usize {
    if sanitizer_shapes() {
        n.min(384)
    } else {
        n
    }
}

#[test]
fn stream_matches_the_reference() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    if !has_skinny(&gpu) {
        return;
    }
    let mut scratch = StreamScratch::new(&gpu).unwrap();
    let sms = scratch.ctas();
    // (n, k): small (3 tiles of 4 units; 8 tiles of 2; a 2-tile weight with a partial tile),
    // then LLaDA-8B (qkv, o, gate|up, down) and Dream-7B (qkv, gate|up, down).
    let shapes: [(usize, usize); 10] = [
        (384, 512),
        (1008, 256),
        (136, 4096),
        (12288, 4096),
        (4096, 4096),
        (24576, 4096),
        (4096, 12288),
        (4608, 3584),
        (37888, 3584),
        (3584, 18944),
    ];
    let mut m = w8a8(&gpu, 64, 18944, W8a8Select::Stream);
    for (si, &(n, k)) in shapes.iter().enumerate() {
        let n = cut(n);
        let Case { w, x, bt, rows, want, want_b, ts } = Case::new(&gpu, n, k, 700 + 10 * si as u64);
        for (i, &t) in ts.iter().enumerate() {
            let bias = i % 2 == 1;
            let mut y = gpu.upload(&vec![bf16::NAN; (t + 1) * n], &[t + 1, n]).unwrap();
            let path = m.linear(&gpu, t, &x, &w, bias.then_some(&bt), &mut y).unwrap();
            assert_eq!(path, Some(W8a8Path::Stream), "{n}x{k} t={t}");
            let got = to_f32(&gpu, &y);
            assert!(got[t * n..].iter().all(|v| v.is_nan()), "{n}x{k} t={t}: row t written");
            compare(&format!("{n}x{k} t={t} bias={bias}"), &got, if bias { &want_b } else { &want }, &rows, t, n);
        }
        // Forced block counts at 32 rows: one block (no fixup), a few (long runs across tiles),
        // one per unit where small (every tile shared by all its units' blocks), the SM count.
        let t = 32;
        let mut q = gpu.alloc::<u8>(&[t, k]).unwrap();
        let mut s = gpu.alloc::<f32>(&[t]).unwrap();
        quantize_rows(&gpu, t, &x, &mut q, &mut s).unwrap();
        let units = n.div_ceil(128) * (k / 128);
        for ctas in [Some(1), Some(3), Some(7), Some(units.min(sms)), None] {
            let mut y = gpu.alloc::<bf16>(&[t, n]).unwrap();
            stream_w8a8(&gpu, &mut scratch, ctas, t, &q, &s, &w, Some(&bt), &mut y).unwrap();
            let label = format!("{n}x{k} t={t} ctas={ctas:?}");
            compare(&label, &to_f32(&gpu, &y), &want_b, &rows, t, n);
            let mut again = gpu.alloc::<bf16>(&[t, n]).unwrap();
            stream_w8a8(&gpu, &mut scratch, ctas, t, &q, &s, &w, Some(&bt), &mut again).unwrap();
            assert_eq!(y.to_host(&gpu).unwrap(), again.to_host(&gpu).unwrap(), "{label}: not deterministic");
        }
    }
}

#[test]
fn stream_swiglu_is_the_linear_then_swiglu() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    if !has_skinny(&gpu) {
        return;
    }
    let mut scratch = StreamScratch::new(&gpu).unwrap();
    // ffn = 1000: the last tile's 64 gate rows run past ffn. (4096, 4096): 64 tiles of 32 units,
    // split over the SMs' blocks by default.
    for &(ffn, k) in &[(1536, 1024), (1000, 512), (if sanitizer_shapes() { 192 } else { 4096 }, 4096)] {
        let wb = normal(&gpu, &[2 * ffn, k], 31, 1.0 / (k as f32).sqrt());
        let w = Fp8Weight::quantize(&gpu, &wb, ScaleLayout::Channel).unwrap();
        let x = normal(&gpu, &[64, k], 32, 1.0);
        let mut m = w8a8(&gpu, 64, k, W8a8Select::Stream);
        let small = ffn * k <= 1 << 21;
        let mut want = vec![0f32; 64 * ffn];
        if small {
            let mut want_gu = vec![0f32; 64 * 2 * ffn];
            cpu_fp8::linear_w8a8(&to_f32(&gpu, &x), &w.to_host(&gpu).unwrap(), None, &mut want_gu);
            demask::cpu::swiglu::swiglu(&want_gu, ffn, &mut want);
        }
        // One block per tile: both entry points tile alike (2·ffn / 128 plain tiles, ffn / 64
        // SwiGLU tiles) and sum every output in the same order.
        let tiles = ffn.div_ceil(64);
        assert!(tiles <= scratch.ctas(), "{tiles} tiles: more than the SMs");
        for t in [1, 19, 32, 64] {
            let mut gu = gpu.upload(&vec![bf16::NAN; t * 2 * ffn], &[t, 2 * ffn]).unwrap();
            let mut act = gpu.upload(&vec![bf16::NAN; (t + 1) * ffn], &[t + 1, ffn]).unwrap();
            let p = m.linear_swiglu(&gpu, t, &x, &w, &mut gu, &mut act).unwrap();
            assert_eq!(p, Some(W8a8Path::Stream), "ffn={ffn} t={t}");
            assert!(gu.to_host(&gpu).unwrap().iter().all(|v| v.is_nan()), "ffn={ffn} t={t}: stream SwiGLU wrote gu");
            let a = act.to_host(&gpu).unwrap();
            assert!(a[t * ffn..].iter().all(|v| v.is_nan()), "ffn={ffn} t={t}: row t written");
            if small {
                let worst = (0..t * ffn).map(|i| (a[i].to_f32() - want[i]).abs() / (0.05 + want[i].abs())).fold(0f32, f32::max);
                assert!(worst < 0.05, "ffn={ffn} t={t}: worst relative difference to the CPU {worst}");
            }
            let mut q = gpu.alloc::<u8>(&[t, k]).unwrap();
            let mut s = gpu.alloc::<f32>(&[t]).unwrap();
            quantize_rows(&gpu, t, &x, &mut q, &mut s).unwrap();
            stream_w8a8(&gpu, &mut scratch, Some(tiles), t, &q, &s, &w, None, &mut gu).unwrap();
            let mut two = gpu.alloc::<bf16>(&[t, ffn]).unwrap();
            demask::ops::swiglu::swiglu(&gpu, t, &gu, &mut two).unwrap();
            let mut fused = gpu.alloc::<bf16>(&[t, ffn]).unwrap();
            stream_w8a8_swiglu(&gpu, &mut scratch, Some(tiles), t, &q, &s, &w, &mut fused).unwrap();
            let (two, fused) = (two.to_host(&gpu).unwrap(), fused.to_host(&gpu).unwrap());
            let diff = (0..t * ffn).find(|&i| two[i].to_bits() != fused[i].to_bits());
            assert!(diff.is_none(), "ffn={ffn} t={t}: fused != two-step at {diff:?}");
            // The default launch (tiles shared between blocks) sums in another order.
            let worst = (0..t * ffn).map(|i| (a[i].to_f32() - two[i].to_f32()).abs() / (0.05 + two[i].to_f32().abs())).fold(0f32, f32::max);
            assert!(worst < 0.02, "ffn={ffn} t={t}: default launch vs one block per tile: worst relative difference {worst}");
        }
    }
}

#[test]
fn stream_runs_when_selected_and_refusals_say_why() {
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
    let mut m = w8a8(&gpu, 128, k, W8a8Select::Stream);
    m.set_min_rows(1).unwrap();
    for t in [1, 32, 64, 65, 128] {
        let mut y = gpu.alloc::<bf16>(&[t, n]).unwrap();
        linear_any(&gpu, GemmVariant::Auto, t, &x, &w, None, &mut y, Some(&mut m)).unwrap();
        assert_eq!(m.last_path(), (t <= 64).then_some(W8a8Path::Stream), "t = {t}");
    }
    let auto = w8a8(&gpu, 128, k, W8a8Select::Auto);
    assert!(auto.refusal::<bf16>(32, fw, false).is_none());
    let why = m.refusal::<bf16>(65, fw, false).expect("65 rows refused");
    assert!(why.contains("stream") && why.contains("64 rows"), "{why}");
    // k not a multiple of 128.
    let odd = Fp8Weight::quantize(&gpu, &normal(&gpu, &[n, 528], 43, 0.05), ScaleLayout::Channel).unwrap();
    let why = m.refusal::<bf16>(8, &odd, false).expect("k = 528 refused");
    assert!(why.contains("multiple of 128"), "{why}");
    let block = Fp8Weight::quantize(&gpu, &wb, ScaleLayout::Block128).unwrap();
    assert!(m.refusal::<bf16>(8, &block, false).is_some_and(|r| r.contains("channel scales")));
    // The kernel entry point checks its operands and block count.
    let mut scratch = StreamScratch::new(&gpu).unwrap();
    let mut q = gpu.alloc::<u8>(&[64, k]).unwrap();
    let mut sx = gpu.alloc::<f32>(&[64]).unwrap();
    quantize_rows(&gpu, 64, &x, &mut q, &mut sx).unwrap();
    let mut y = gpu.alloc::<bf16>(&[128, n]).unwrap();
    let e = stream_w8a8(&gpu, &mut scratch, None, 65, &q, &sx, fw, None, &mut y).unwrap_err().to_string();
    assert!(e.contains("64 rows"), "{e}");
    let short = gpu.alloc::<f32>(&[16]).unwrap();
    let e = stream_w8a8(&gpu, &mut scratch, None, 32, &q, &short, fw, None, &mut y).unwrap_err().to_string();
    assert!(e.contains("sx"), "{e}");
    let bad_bias = gpu.alloc::<bf16>(&[n - 8]).unwrap();
    let e = stream_w8a8(&gpu, &mut scratch, None, 32, &q, &sx, fw, Some(&bad_bias), &mut y).unwrap_err().to_string();
    assert!(e.contains("bias"), "{e}");
    for ctas in [0, scratch.ctas() + 1] {
        let e = stream_w8a8(&gpu, &mut scratch, Some(ctas), 32, &q, &sx, fw, None, &mut y).unwrap_err().to_string();
        assert!(e.contains("blocks"), "ctas {ctas}: {e}");
    }
    let mut odd_act = gpu.alloc::<bf16>(&[64, n / 2 + 1]).unwrap();
    let e = stream_w8a8_swiglu(&gpu, &mut scratch, None, 32, &q, &sx, fw, &mut odd_act).unwrap_err().to_string();
    assert!(e.contains("act"), "{e}");
    // A gate|up weight of 2·1001 rows: ffn not a multiple of 4, refused by name.
    let w2002 = Fp8Weight::quantize(&gpu, &normal(&gpu, &[2002, k], 44, 0.05), ScaleLayout::Channel).unwrap();
    let mut act = gpu.alloc::<bf16>(&[64, 1001]).unwrap();
    let e = stream_w8a8_swiglu(&gpu, &mut scratch, None, 32, &q, &sx, &w2002, &mut act).unwrap_err().to_string();
    assert!(e.contains("multiple of 8"), "{e}");
}

#[test]
fn stream_forward_matches_skinny() {
    // A whole forward of 58 rows (every GEMM of the layers W8A8) on `stream` against the same
    // forward on `skinny`: the same codes, scales and epilogue, but `stream` multiplies on
    // `wgmma`, whose FP8 accumulator keeps fewer bits than f32 within each 128-column unit
    // (`skinny`'s `mma.sync` rounds differently again), so a few bf16 outputs round the other
    // way and, through the next layer's E4M3 activation codes, spread. The yardstick is the
    // other tensor-core W8A8 path, cuBLASLt's (`split-scale`), on the same forward: `stream`
    // must stay as close to `skinny` as it does (within 2× of its relative L2 and its top-1
    // disagreements, plus 1e-2).
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    if !has_skinny(&gpu) {
        return;
    }
    for preset in crate::common::DENSE_PRESETS {
        let cfg = ModelConfig::preset(preset).unwrap();
        let hw = crate::common::sharp_weights(&cfg, 3);
        let lens = [37usize, 1, 20];
        let s: Vec<Vec<u32>> =
            lens.iter().enumerate().map(|(i, &n)| demask::bench::synthetic_tokens(n, cfg.vocab.min(500), 70 + i as u64)).collect();
        let total: usize = lens.iter().sum();
        let logits = |select: W8a8Select| {
            let cap = Capacity { rows: total, logit_rows: total, cache_rows: total, seqs: s.len() };
            let w = GpuWeights::upload_as(&gpu, &hw, WeightFormat::Fp8(ScaleLayout::Channel)).unwrap();
            let mut m = GpuModel::new(gpu.clone(), cfg.clone(), w, cap).unwrap();
            m.set_w8a8_min_rows(1).unwrap();
            m.set_w8a8_select(select).unwrap();
            let a = m.forward_full(&s).unwrap();
            assert_eq!(a, m.forward_full(&s).unwrap(), "{preset} {select}: the same forward twice differs");
            a
        };
        let skinny = logits(W8a8Select::Skinny);
        let c = compare_logits(&logits(W8a8Select::Stream), &skinny, cfg.vocab, 0.05);
        let y = compare_logits(&logits(W8a8Select::SplitScale), &skinny, cfg.vocab, 0.05);
        println!(
            "{preset}: {total} rows, against skinny: stream logits rel L2 {:.3e}, top-1 {}/{}; split-scale {:.3e}, top-1 {}/{}",
            c.rel_l2, c.top1_agree, c.top1_rows, y.rel_l2, y.top1_agree, y.top1_rows
        );
        let misses = |c: &demask::fp8_fidelity::LogitCmp| c.top1_rows - c.top1_agree;
        assert!(c.rel_l2 <= 2.0 * y.rel_l2 + 1e-2 && misses(&c) <= 2 * misses(&y) + 1, "{preset}: stream {c:?}, split-scale {y:?}");
    }
}

#[test]
fn stream_vs_skinny_timing() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    if !has_skinny(&gpu) {
        return;
    }
    println!(
        "device {}; W8A8 decode kernels alone (rows already quantised), µs per call: back to back (21 calls between \
         two events, median of 5; as in a forward) and, for stream, also one call between events (median of 20, \
         the launch's host work included); W rotated over 3 copies (L2 never holds the weight); GB/s of W codes; \
         split-scale = cuBLASLt FP8 with the quantiser and the scale epilogue; w8a16 = the W8A16 kernel on the \
         bf16 rows (what runs below the W8A8 crossover)",
        gpu.name
    );
    let mut scratch = StreamScratch::new(&gpu).unwrap();
    for (name, n, k) in DECODE_SHAPES {
        let TimingOperands { ws, x, q, s, mut y } = TimingOperands::new(&gpu, n, k);
        let mut split = w8a8(&gpu, 64, k, W8a8Select::SplitScale);
        for t in [1usize, 4, 8, 16, 32, 64] {
            let gbs = |us: f64| (n * k) as f64 / us / 1e3;
            let st1 = time_us(&gpu, &mut |i| stream_w8a8(&gpu, &mut scratch, None, t, &q, &s, &ws[i % 3], None, &mut y).unwrap());
            let st = time_us_b2b(&gpu, &mut |i| stream_w8a8(&gpu, &mut scratch, None, t, &q, &s, &ws[i % 3], None, &mut y).unwrap());
            let sk = time_us_b2b(&gpu, &mut |i| skinny_w8a8(&gpu, None, t, &q, &s, &ws[i % 3], None, &mut y).unwrap());
            let ss = time_us_b2b(&gpu, &mut |i| {
                split.linear(&gpu, t, &x, &ws[i % 3], None, &mut y).unwrap();
            });
            let wa = time_us_b2b(&gpu, &mut |i| linear_fp8(&gpu, t, &x, &ws[i % 3], None, &mut y).unwrap());
            let mut line = format!(
                "{name:<14} t={t:<3} | stream {st:6.1} ({:4.0}) 1x {st1:6.1} | skinny {sk:6.1} ({:4.0}) | split-scale {ss:6.1} ({:4.0}) | w8a16 {wa:6.1} ({:4.0})",
                gbs(st),
                gbs(sk),
                gbs(ss),
                gbs(wa)
            );
            if name.contains("gate|up") {
                let mut act = gpu.alloc::<bf16>(&[64, n / 2]).unwrap();
                let sw = time_us_b2b(&gpu, &mut |i| stream_w8a8_swiglu(&gpu, &mut scratch, None, t, &q, &s, &ws[i % 3], &mut act).unwrap());
                line += &format!(" | stream swiglu {sw:6.1} ({:4.0})", gbs(sw));
            }
            println!("{line}");
        }
    }
}
