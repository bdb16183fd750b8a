//! The fused W8A8 `split-scale` epilogues, bit for bit against the unfused kernels they
//! replace:
//! - `w8a8_scale_swiglu_quant_bf16` = `w8a8_scale_swiglu_bf16` then the row quantiser on act
//!   (codes, scales, and act when it is written; the row scales in place, as the model runs it);
//! - `add_rmsnorm{,_quant}_scaled_bf16` (`ops::norm::add_rmsnorm_deferred`) = `w8a8_scale_bf16`
//!   on the delta then `add_rmsnorm{,_quant}` (residual, output, codes, scales; with and
//!   without bias; the output scales in the buffer the delta's row scales came from);
//! - `W8a8::linear_deferred` leaves the epilogue pending, and a GEMM before it is taken errors;
//! - `rope_scale_kv_store_bf16` (`ops::rope::rope_kv_store_scaled`) = `w8a8_scale_bf16` on the
//!   QKV product then `rope_kv_store` (q, both caches; with and without bias, both modes);
//! - the whole W8A8 forward gives the same logits bits with the fusions on and off.
use crate::w8a8::{has_fp8, normal, w8a8};
use crate::{common, lock};
use demask::config::ModelConfig;
use demask::gpu::{test_gpu, DTensor, Gpu};
use demask::model::{Capacity, GpuModel, GpuWeights};
use demask::ops::gemm_fp8::{Fp8Weight, LinearWeight};
use demask::ops::gemm_w8a8::{quantize_rows, scale_rows_cols, scale_swiglu, scale_swiglu_quant, W8a8Path, W8a8Select};
use demask::ops::norm::{add_rmsnorm, add_rmsnorm_deferred, add_rmsnorm_quant, DeltaScale};
use demask::ops::rope::{rope_kv_store, rope_kv_store_scaled, RopeExtras, RopeMode};
use demask::quant::{ScaleLayout, WeightFormat};
use half::bf16;
use rand::{rngs::StdRng, Rng, SeedableRng};

fn scales(rng: &mut StdRng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(lo..hi)).collect()
}

fn copy(gpu: &Gpu, t: &DTensor<bf16>) -> DTensor<bf16> {
    gpu.upload(&t.to_host(gpu).unwrap(), &t.dims).unwrap()
}

fn copy_f32(gpu: &Gpu, t: &DTensor<f32>) -> DTensor<f32> {
    gpu.upload(&t.to_host(gpu).unwrap(), &t.dims).unwrap()
}

#[test]
fn swiglu_quant_is_the_swiglu_epilogue_then_the_quantiser() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    let mut rng = StdRng::seed_from_u64(29);
    // ffn: a multiple of 8 only (1000), LLaDA (12288), Dream (18944), 32768; rows split over
    // clusters of 2-8 blocks (few rows, wide rows) or none (300 rows of 1000).
    for &(t, ffn) in &[(1, 1000), (32, 12288), (5, 18944), (130, 4096), (3, 4096 * 8), (300, 1000)] {
        // gu ~ N(0, 4) / (sx·sw), so the scaled gate and up values are ~N(0, 4).
        let sx = scales(&mut rng, t, 0.5 / 448.0, 2.0 / 448.0);
        let sw = scales(&mut rng, 2 * ffn, 0.01, 0.03);
        let gu = normal(&gpu, &[t, 2 * ffn], (t * ffn) as u64, 2.0);
        let host: Vec<bf16> = gu.to_host(&gpu).unwrap();
        let gu_host: Vec<bf16> =
            host.iter().enumerate().map(|(i, v)| bf16::from_f32(v.to_f32() / (sx[i / (2 * ffn)] * sw[i % (2 * ffn)]))).collect();
        let gu = gpu.upload(&gu_host, &[t, 2 * ffn]).unwrap();
        let (sxd, swd) = (gpu.upload(&sx, &[t]).unwrap(), gpu.upload(&sw, &[2 * ffn]).unwrap());
        // Reference: the SwiGLU epilogue into act, then the row quantiser.
        let mut act = gpu.alloc::<bf16>(&[t, ffn]).unwrap();
        scale_swiglu(&gpu, t, &gu, &sxd, &swd, &mut act).unwrap();
        let (mut qa, mut sa) = (gpu.alloc::<u8>(&[t, ffn]).unwrap(), gpu.alloc::<f32>(&[t]).unwrap());
        quantize_rows(&gpu, t, &act, &mut qa, &mut sa).unwrap();
        let (qa, sa, act) = (qa.to_host(&gpu).unwrap(), sa.to_host(&gpu).unwrap(), act.to_host(&gpu).unwrap());
        assert!(qa.iter().filter(|&&c| c & 0x7f != 0).count() > qa.len() / 2, "t={t} ffn={ffn}: degenerate codes");
        for write_act in [true, false] {
            let label = format!("t={t} ffn={ffn} act={write_act}");
            // The row scales in place: in sx, out act's (as the model's scratch).
            let mut s = copy_f32(&gpu, &sxd);
            let mut q = gpu.upload(&vec![0xA5u8; (t + 1) * ffn], &[t + 1, ffn]).unwrap();
            let mut a = gpu.upload(&vec![bf16::NAN; t * ffn], &[t, ffn]).unwrap();
            scale_swiglu_quant(&gpu, t, &gu, &swd, write_act.then_some(&mut a), &mut q, &mut s).unwrap();
            let (q, s, a) = (q.to_host(&gpu).unwrap(), s.to_host(&gpu).unwrap(), a.to_host(&gpu).unwrap());
            assert_eq!(s.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), sa.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{label}: scales");
            assert_eq!(q[..t * ffn].iter().zip(&qa).position(|(x, y)| x != y), None, "{label}: first differing code");
            assert!(q[t * ffn..].iter().all(|&c| c == 0xA5), "{label}: row t written");
            if write_act {
                assert_eq!(a.iter().zip(&act).position(|(x, y)| x.to_bits() != y.to_bits()), None, "{label}: act");
            } else {
                assert!(a.iter().all(|v| v.is_nan()), "{label}: act written");
            }
        }
    }
    // Refusals name the tensor: ffn past one cluster's registers, a short q.
    let gu = normal(&gpu, &[2, 2 * 65544], 1, 1.0);
    let (sw, mut s) = (gpu.alloc::<f32>(&[2 * 65544]).unwrap(), gpu.alloc::<f32>(&[2]).unwrap());
    let mut q = gpu.alloc::<u8>(&[2, 65544]).unwrap();
    let e = scale_swiglu_quant(&gpu, 2, &gu, &sw, None, &mut q, &mut s).unwrap_err().to_string();
    assert!(e.contains("gu") && e.contains("65536"), "{e}");
    let gu = normal(&gpu, &[2, 64], 1, 1.0);
    let (sw, mut q) = (gpu.alloc::<f32>(&[64]).unwrap(), gpu.alloc::<u8>(&[1, 32]).unwrap());
    let e = scale_swiglu_quant(&gpu, 2, &gu, &sw, None, &mut q, &mut s).unwrap_err().to_string();
    assert!(e.contains("`q`"), "{e}");
}

#[test]
fn deferred_norm_is_the_scale_epilogue_then_the_norm() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    let mut rng = StdRng::seed_from_u64(31);
    for &(rows, hidden, bias, quant) in
        &[(1, 4096, false, true), (32, 4096, false, true), (32, 4096, true, false), (64, 3584, true, true), (7, 520, false, false), (300, 2048, false, true)]
    {
        let label = format!("{rows}x{hidden} bias={bias} quant={quant}");
        let seed = (rows * hidden) as u64 + bias as u64;
        let x0 = normal(&gpu, &[rows, hidden], seed, 2.0);
        let w = normal(&gpu, &[hidden], seed + 2, 0.3);
        let sx = scales(&mut rng, rows, 0.5 / 448.0, 2.0 / 448.0);
        let sw = scales(&mut rng, hidden, 0.01, 0.03);
        // D ~ N(0, 1) / (sx·sw): the scaled delta is ~N(0, 1).
        let dn: Vec<bf16> = normal(&gpu, &[rows, hidden], seed + 1, 1.0).to_host(&gpu).unwrap();
        let dh: Vec<bf16> = dn.iter().enumerate().map(|(i, v)| bf16::from_f32(v.to_f32() / (sx[i / hidden] * sw[i % hidden]))).collect();
        let d = gpu.upload(&dh, &[rows, hidden]).unwrap();
        let b = normal(&gpu, &[hidden], seed + 3, 0.5);
        let bias = bias.then_some(&b);
        let (sxd, swd) = (gpu.upload(&sx, &[rows]).unwrap(), gpu.upload(&sw, &[hidden]).unwrap());
        // Reference: the epilogue in place, then the plain (or quantising) norm.
        let mut scaled = copy(&gpu, &d);
        scale_rows_cols(&gpu, rows, &mut scaled, &sxd, &swd, bias).unwrap();
        let mut xa = copy(&gpu, &x0);
        let mut ha = gpu.alloc::<bf16>(&[rows, hidden]).unwrap();
        let (mut qa, mut sa) = (gpu.alloc::<u8>(&[rows, hidden]).unwrap(), gpu.alloc::<f32>(&[rows]).unwrap());
        if quant {
            add_rmsnorm_quant(&gpu, rows, &mut xa, Some(&scaled), &w, 1e-5, &mut ha, &mut qa, &mut sa).unwrap();
        } else {
            add_rmsnorm(&gpu, rows, &mut xa, Some(&scaled), &w, 1e-5, &mut ha).unwrap();
        }
        // Fused; the output scales go where the delta's row scales are read from.
        let mut xb = copy(&gpu, &x0);
        let mut hb = gpu.alloc::<bf16>(&[rows, hidden]).unwrap();
        let mut sb = copy_f32(&gpu, &sxd);
        let mut qb = gpu.alloc::<u8>(&[rows, hidden]).unwrap();
        let ds = DeltaScale::new(&gpu, &d, rows, &sb, &swd, bias).unwrap();
        add_rmsnorm_deferred(&gpu, rows, &mut xb, &d, &ds, &w, 1e-5, &mut hb, quant.then_some((&mut qb, &mut sb))).unwrap();
        let xa = xa.to_host(&gpu).unwrap();
        assert!(xa.iter().zip(x0.to_host(&gpu).unwrap()).filter(|(p, q)| p != &q).count() > xa.len() / 2, "{label}: no add");
        assert_eq!(xa, xb.to_host(&gpu).unwrap(), "{label}: residual");
        assert_eq!(ha.to_host(&gpu).unwrap(), hb.to_host(&gpu).unwrap(), "{label}: out");
        if quant {
            assert_eq!(sa.to_host(&gpu).unwrap(), sb.to_host(&gpu).unwrap(), "{label}: scales");
            let (a, b) = (qa.to_host(&gpu).unwrap(), qb.to_host(&gpu).unwrap());
            assert_eq!(a.iter().zip(&b).position(|(p, q)| p != q), None, "{label}: first differing code");
        } else {
            assert_eq!(sb.to_host(&gpu).unwrap(), sx, "{label}: the row scales are only read");
        }
    }
    // A DeltaScale of another tensor or shape is refused by name.
    let (d, other) = (normal(&gpu, &[4, 256], 1, 1.0), normal(&gpu, &[4, 256], 2, 1.0));
    let (sx, sw) = (gpu.alloc::<f32>(&[4]).unwrap(), gpu.alloc::<f32>(&[256]).unwrap());
    let (mut x, w) = (normal(&gpu, &[4, 256], 3, 1.0), normal(&gpu, &[256], 4, 1.0));
    let mut h = gpu.alloc::<bf16>(&[4, 256]).unwrap();
    let ds = DeltaScale::new(&gpu, &d, 4, &sx, &sw, None).unwrap();
    let e = add_rmsnorm_deferred(&gpu, 4, &mut x, &other, &ds, &w, 1e-5, &mut h, None).unwrap_err().to_string();
    assert!(e.contains("deferred") && e.contains("delta"), "{e}");
    let e = add_rmsnorm_deferred(&gpu, 3, &mut x, &d, &ds, &w, 1e-5, &mut h, None).unwrap_err().to_string();
    assert!(e.contains("deferred"), "{e}");
    let e = DeltaScale::new(&gpu, &d, 4, &sx, &gpu.alloc::<f32>(&[255]).unwrap(), None).unwrap_err().to_string();
    assert!(e.contains("sw"), "{e}");
}

#[test]
fn linear_deferred_leaves_the_epilogue_to_the_norm() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    if !has_fp8(&gpu) {
        return;
    }
    let (n, k, t) = (1024, 2048, 32);
    let w = Fp8Weight::quantize(&gpu, &normal(&gpu, &[n, k], 5, 1.0 / 45.0), ScaleLayout::Channel).unwrap();
    let x = normal(&gpu, &[t, k], 6, 1.0);
    let mut m = w8a8(&gpu, 64, k, W8a8Select::SplitScale);
    m.set_min_rows(1).unwrap();
    let mut want = gpu.alloc::<bf16>(&[t, n]).unwrap();
    assert_eq!(m.linear(&gpu, t, &x, &w, None, &mut want).unwrap(), Some(W8a8Path::SplitScale));
    let mut y = gpu.alloc::<bf16>(&[t, n]).unwrap();
    assert_eq!(m.linear_deferred(&gpu, t, &x, &w, None, &mut y).unwrap(), Some(W8a8Path::SplitScale));
    assert!(m.has_deferred());
    // A GEMM before the epilogue is taken would overwrite its row scales: refused.
    let mut z = gpu.alloc::<bf16>(&[t, n]).unwrap();
    let e = m.linear(&gpu, t, &x, &w, None, &mut z).unwrap_err().to_string();
    assert!(e.contains("deferred"), "{e}");
    assert!(m.take_deferred(&gpu, &z).is_err(), "taken for another tensor");
    let ds = m.take_deferred(&gpu, &y).unwrap().expect("pending");
    assert!(!m.has_deferred());
    // Applied through the norm: the residual gets exactly the finished GEMM output.
    let w_norm = normal(&gpu, &[n], 7, 0.3);
    let x0 = normal(&gpu, &[t, n], 8, 1.0);
    let (mut xa, mut xb) = (copy(&gpu, &x0), copy(&gpu, &x0));
    let (mut ha, mut hb) = (gpu.alloc::<bf16>(&[t, n]).unwrap(), gpu.alloc::<bf16>(&[t, n]).unwrap());
    add_rmsnorm(&gpu, t, &mut xa, Some(&want), &w_norm, 1e-5, &mut ha).unwrap();
    add_rmsnorm_deferred(&gpu, t, &mut xb, &y, &ds, &w_norm, 1e-5, &mut hb, None).unwrap();
    assert_eq!(xa.to_host(&gpu).unwrap(), xb.to_host(&gpu).unwrap(), "residual");
    assert_eq!(ha.to_host(&gpu).unwrap(), hb.to_host(&gpu).unwrap(), "out");
    // With the fusions off, linear_deferred finishes y itself.
    m.set_fused_epilogues(false);
    let mut y2 = gpu.alloc::<bf16>(&[t, n]).unwrap();
    m.linear_deferred(&gpu, t, &x, &w, None, &mut y2).unwrap();
    assert!(!m.has_deferred());
    assert_eq!(y2.to_host(&gpu).unwrap(), want.to_host(&gpu).unwrap());
    let _ = LinearWeight::Fp8(w);
}

#[test]
fn w8a8_forward_is_bit_identical_with_and_without_fused_epilogues() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    if !has_fp8(&gpu) {
        return;
    }
    for preset in common::DENSE_PRESETS {
        let cfg = ModelConfig::preset(preset).unwrap();
        let hw = common::sharp_weights(&cfg, 17);
        let s: Vec<Vec<u32>> =
            [37usize, 1, 20].iter().enumerate().map(|(i, &n)| demask::bench::synthetic_tokens(n, cfg.vocab.min(500), 90 + i as u64)).collect();
        let total: usize = s.iter().map(|x| x.len()).sum();
        let cap = Capacity { rows: total, logit_rows: total, cache_rows: total, seqs: s.len() };
        let mut logits = Vec::new();
        for fused in [true, false] {
            let w = GpuWeights::upload_as(&gpu, &hw, WeightFormat::Fp8(ScaleLayout::Channel)).unwrap();
            let mut m = GpuModel::new(gpu.clone(), cfg.clone(), w, cap).unwrap();
            m.set_w8a8_min_rows(1).unwrap();
            m.set_w8a8_select(W8a8Select::SplitScale).unwrap();
            m.set_w8a8_fused_epilogues(fused).unwrap();
            // Twice: the first forward writes act for the down GEMM (its plan is new), the
            // second skips it.
            let a = m.forward_full(&s).unwrap();
            let b = m.forward_full(&s).unwrap();
            assert_eq!(a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), b.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{preset} fused={fused}: not deterministic");
            logits.push(b);
        }
        let first = logits[0].iter().zip(&logits[1]).position(|(a, b)| a.to_bits() != b.to_bits());
        assert_eq!(first, None, "{preset}: fused and unfused W8A8 forwards differ");
        assert!(logits[0].iter().all(|v| v.is_finite()) && logits[0].iter().any(|&v| v != 0.0), "{preset}: degenerate logits");
        println!("{preset}: W8A8 forward of {total} rows, fused epilogues on and off: identical logits");
    }
}

#[test]
fn rope_scaled_is_the_scale_epilogue_then_rope() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    let (nh, nkv, t, cap) = (4usize, 2usize, 19usize, 40usize);
    let (qkv_dim, kv_dim) = ((nh + 2 * nkv) * 128, nkv * 128);
    let mut rng = StdRng::seed_from_u64(31);
    // The unscaled product of a QKV GEMM (|D| up to a few hundred, as E4M3 codes give).
    let d = normal(&gpu, &[t, qkv_dim], 32, 60.0);
    let sx = gpu.upload(&scales(&mut rng, t, 2e-3, 2e-2), &[t]).unwrap();
    let sw = gpu.upload(&scales(&mut rng, qkv_dim, 2e-3, 2e-2), &[qkv_dim]).unwrap();
    let bias = normal(&gpu, &[qkv_dim], 33, 0.2);
    let pos: Vec<u32> = (0..t).map(|_| rng.gen_range(0..4096)).collect();
    let mut rows: Vec<u32> = (0..cap as u32).collect();
    for i in (1..rows.len()).rev() {
        rows.swap(i, rng.gen_range(0..=i));
    }
    let (pos, crow) = (gpu.upload(&pos, &[t]).unwrap(), gpu.upload(&rows[..t], &[t]).unwrap());
    let k0 = normal(&gpu, &[cap, kv_dim], 34, 1.0);
    let v0 = normal(&gpu, &[cap, kv_dim], 35, 1.0);
    let none = RopeExtras::none();
    for mode in [RopeMode::Llada, RopeMode::Dream] {
        for b in [None, Some(&bias)] {
            let label = format!("{mode:?}, bias {}", b.is_some());
            // The epilogue's own launch, then the plain op.
            let (mut qa, mut ka, mut va) = (copy(&gpu, &d), copy(&gpu, &k0), copy(&gpu, &v0));
            let ds = DeltaScale::new(&gpu, &qa, t, &sx, &sw, b).unwrap();
            demask::ops::gemm_w8a8::W8a8::apply_deferred(&gpu, &ds).unwrap();
            rope_kv_store(&gpu, t, &mut qa, &pos, &crow, &mut ka, &mut va, nh, nkv, 10000.0, mode, &none).unwrap();
            // Fused.
            let (mut qb, mut kb, mut vb) = (copy(&gpu, &d), copy(&gpu, &k0), copy(&gpu, &v0));
            let ds = DeltaScale::new(&gpu, &qb, t, &sx, &sw, b).unwrap();
            rope_kv_store_scaled(&gpu, t, &mut qb, Some(&ds), &pos, &crow, &mut kb, &mut vb, nh, nkv, 10000.0, mode, &none).unwrap();
            let bits = |x: &DTensor<bf16>| x.to_host(&gpu).unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            let (qa, qb, d_host) = (bits(&qa), bits(&qb), bits(&d));
            for r in 0..t {
                let q = r * qkv_dim..r * qkv_dim + nh * 128;
                assert_eq!(qa[q.clone()], qb[q.clone()], "{label}: q of row {r}");
                // k and v in qkv stay as the GEMM left them.
                assert_eq!(qb[q.end..(r + 1) * qkv_dim], d_host[q.end..(r + 1) * qkv_dim], "{label}: k, v of row {r} in qkv");
            }
            assert_eq!(bits(&ka), bits(&kb), "{label}: k cache");
            assert_eq!(bits(&va), bits(&vb), "{label}: v cache");
            assert_ne!(bits(&ka), bits(&k0), "{label}: nothing written");
        }
    }
    // A scale epilogue of another tensor, or of other rows, is refused by name.
    let mut q = copy(&gpu, &d);
    let (mut k, mut v) = (copy(&gpu, &k0), copy(&gpu, &v0));
    let other = DeltaScale::new(&gpu, &d, t, &sx, &sw, None).unwrap();
    let e = rope_kv_store_scaled(&gpu, t, &mut q, Some(&other), &pos, &crow, &mut k, &mut v, nh, nkv, 1e4, RopeMode::Llada, &none).unwrap_err().to_string();
    assert!(e.contains("deferred scale"), "{e}");
    let short = DeltaScale::new(&gpu, &q, t - 1, &sx, &sw, None).unwrap();
    let e = rope_kv_store_scaled(&gpu, t, &mut q, Some(&short), &pos, &crow, &mut k, &mut v, nh, nkv, 1e4, RopeMode::Llada, &none).unwrap_err().to_string();
    assert!(e.contains("deferred scale"), "{e}");
    println!("rope_scale_kv_store_bf16: q and both caches bit-identical to the epilogue then RoPE ({t} rows, both modes, with and without bias)");
}
