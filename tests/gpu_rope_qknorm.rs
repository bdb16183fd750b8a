//! GPU parity of RoPE + KV store with its options (`ops::rope::rope_kv_store` with
//! `RopeExtras`: per-head q/k RMSNorm, partial RoPE → `rope_qknorm_kv_store_bf16`) against the
//! bf16 CPU reference `cpu::rope::rope_qk_bf16` (the kernel's rounding points), at LLaDA-MoE
//! (16/16 heads, qk norm, full RoPE) and LLaDA2-mini (16/4 heads, qk norm, rotary_dim 64)
//! shapes and a few odd ones, rows 1 / 19 / 256, both RoPE modes. Outputs are NaN-poisoned first.
//! Skips without a GPU (see `test_gpu`); fails instead with DEMASK_REQUIRE_GPU=1.
//!
//! What must match how:
//! - bit for bit: v in the cache, k|v left in qkv, every dim that does not rotate (the normed
//!   values; pass-through dims of a partial rotation), every row at position 0 (cos 1, sin 0
//!   exactly: the output is the norm alone), and (Dream mode, full rotation) the fused kernel
//!   against the plain kernel run on the CPU-normed input;
//! - rotated dims: ≥ 99 % bit for bit (in practice nearly all), the rest within a bound. The
//!   only difference between the kernel and the reference there is cos/sin: CUDA's `sincosf` is
//!   within 2 f32 ulps, the CPU's is correctly rounded. LLaDA mode (f32 rotation, one bf16
//!   rounding) may then flip that rounding by one bf16 ulp (≤ 2^-7·|y|), plus the f32
//!   difference itself where the pair cancels: |Δ| ≤ 2^-7·|y| + 2^-20·(|a| + |b|). Dream mode
//!   rounds cos/sin to bf16, so a flip there moves c or s by one bf16 ulp (≤ 2^-8); each bf16
//!   product then moves by ≤ 3·2^-8 of |a| (or |b|) (the shift and both roundings) and the bf16
//!   sum's rounding adds ≤ 2·2^-8·(|a| + |b|): |Δ| ≤ 2^-5·(|a| + |b|), a, b the pair's normed
//!   inputs. Both flips need cos/sin within 2 f32 ulps of a rounding boundary: rare.
#![cfg(feature = "cuda")]

mod common;

use common::elementwise::*;
use demask::cpu::rope::{rope_qk_bf16, RopeExtras as HostExtras, RopeMode};
use demask::error::Error;
use demask::gpu::{test_gpu, Gpu};
use demask::ops;
use demask::ops::rope::RopeExtras;
use half::bf16;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const QK_ROWS: [usize; 3] = [1, 19, 256];

/// One configuration of the op.
#[derive(Clone, Copy, Debug)]
struct Case {
    n_heads: usize,
    n_kv: usize,
    theta: f32,
    q_norm: bool,
    k_norm: bool,
    eps: f32,
    rotary_dim: usize,
}

const LLADA_MOE: Case = Case { n_heads: 16, n_kv: 16, theta: 50000.0, q_norm: true, k_norm: true, eps: 1e-5, rotary_dim: 128 };
const LLADA2_MINI: Case = Case { n_heads: 16, n_kv: 4, theta: 600000.0, q_norm: true, k_norm: true, eps: 1e-6, rotary_dim: 64 };

/// Positions: rows 6, 13, 20, ... at 0 (checked bit for bit), mostly < 4096, some large.
fn positions(rng: &mut StdRng, rows: usize) -> Vec<u32> {
    (0..rows)
        .map(|r| match r % 7 {
            6 => 0,
            3 => rng.gen_range(4096..1 << 24),
            5 => rng.gen_range(1 << 24..1 << 31),
            _ => rng.gen_range(0..4096),
        })
        .collect()
}

/// Rotated-dim comparison (see the module doc): counts bit differences (≤ 1 %), bounds the rest.
/// `x` holds the normed inputs (the reference at position 0), laid out like `got` / `emul`.
fn check_rotated(what: &str, got: &[bf16], emul: &[f32], x: &[f32], rot: usize, mode: RopeMode) {
    let half = rot / 2;
    let (mut n, mut diff) = (0usize, 0usize);
    for (h, head) in got.chunks(HEAD_DIM).enumerate() {
        let base = h * HEAD_DIM;
        for d in 0..rot {
            let (g, e) = (head[d].to_f32(), emul[base + d]);
            let partner = if d < half { d + half } else { d - half };
            let ab = x[base + d].abs() + x[base + partner].abs();
            let bound = match mode {
                RopeMode::Llada => 2f32.powi(-7) * e.abs() + 2f32.powi(-20) * ab,
                RopeMode::Dream => 2f32.powi(-5) * ab,
            };
            n += 1;
            if g.to_bits() != e.to_bits() {
                diff += 1;
                assert!((g - e).abs() <= bound, "{what}: head {h} dim {d}: got {g} want {e} (bound {bound})");
            }
        }
    }
    eprintln!("{what}: {diff} of {n} rotated values differ from the bf16 reference");
    assert!(diff * 100 <= n, "{what}: {diff} of {n} rotated values differ (more than 1 %)");
}

/// The values of `src` (heads of 128) at dims `d >= rot` of each head.
fn pass_through(src: &[f32], rot: usize) -> Vec<bf16> {
    src.chunks(HEAD_DIM).flat_map(|h| h[rot..].iter().map(|&v| bf16::from_f32(v))).collect()
}

/// Runs one case at `rows` rows in `mode` and checks everything the module doc lists.
fn qk_case(gpu: &Gpu, rng: &mut StdRng, rows: usize, c: Case, mode: RopeMode) {
    let what = format!("rope+qknorm {mode:?} {rows} rows {c:?}");
    let (nh, nkv, rot) = (c.n_heads, c.n_kv, c.rotary_dim);
    let qkv_dim = (nh + 2 * nkv) * HEAD_DIM;
    let (q_dim, kv_dim) = (nh * HEAD_DIM, nkv * HEAD_DIM);
    let cap = 2 * rows + 5;
    let (xb, xf) = normal_bf16(rng, rows * qkv_dim, 0.1, 1.5);
    let (wqb, wqf) = normal_bf16(rng, HEAD_DIM, 1.0, 0.3);
    let (wkb, wkf) = normal_bf16(rng, HEAD_DIM, 0.7, 0.4);
    let pos = positions(rng, rows);
    let mut perm: Vec<u32> = (0..cap as u32).collect();
    perm.shuffle(rng);
    let cache_rows = perm[..rows].to_vec();

    let mut qkv = gpu.upload(&xb, &[rows, qkv_dim]).unwrap();
    let pos_d = gpu.upload(&pos, &[rows]).unwrap();
    let cr_d = gpu.upload(&cache_rows, &[rows]).unwrap();
    let wq = gpu.upload(&wqb, &[HEAD_DIM]).unwrap();
    let wk = gpu.upload(&wkb, &[HEAD_DIM]).unwrap();
    let mut k_cache = poisoned(gpu, &[cap, kv_dim]);
    let mut v_cache = poisoned(gpu, &[cap, kv_dim]);
    let ex = RopeExtras {
        q_norm: c.q_norm.then_some(&wq),
        k_norm: c.k_norm.then_some(&wk),
        eps: c.eps,
        rotary_dim: rot,
    };
    ops::rope::rope_kv_store(gpu, rows, &mut qkv, &pos_d, &cr_d, &mut k_cache, &mut v_cache, nh, nkv, c.theta, mode, &ex)
        .unwrap();
    let got_qkv = qkv.to_host(gpu).unwrap();
    let got_k = k_cache.to_host(gpu).unwrap();
    let got_v = v_cache.to_host(gpu).unwrap();

    let hex = HostExtras {
        q_norm: c.q_norm.then_some(&wqf[..]),
        k_norm: c.k_norm.then_some(&wkf[..]),
        eps: c.eps,
        rotary_dim: rot,
    };
    let mut emul = xf.clone();
    rope_qk_bf16(&mut emul, nh, nkv, &pos, c.theta as f64, mode, &hex);
    // The normed inputs: the reference at position 0 is the norm alone.
    let mut normed = xf.clone();
    rope_qk_bf16(&mut normed, nh, nkv, &vec![0; rows], c.theta as f64, mode, &hex);

    for (r, &crow) in cache_rows.iter().enumerate() {
        let row = r * qkv_dim;
        let (q, k, v) = (row..row + q_dim, row + q_dim..row + q_dim + kv_dim, row + q_dim + kv_dim..row + qkv_dim);
        let cr = crow as usize * kv_dim..(crow as usize + 1) * kv_dim;
        let tag = format!("{what} row {r} (pos {})", pos[r]);
        check_bits(&format!("{tag} k|v untouched"), &got_qkv[k.start..v.end], &xb[k.start..v.end]);
        check_bits(&format!("{tag} v cache"), &got_v[cr.clone()], &xb[v.clone()]);
        let (gq, gk) = (&got_qkv[q.clone()], &got_k[cr.clone()]);
        if pos[r] == 0 {
            let want: Vec<bf16> = emul[row..row + q_dim + kv_dim].iter().map(|&v| bf16::from_f32(v)).collect();
            check_bits(&format!("{tag} q"), gq, &want[..q_dim]);
            check_bits(&format!("{tag} k cache"), gk, &want[q_dim..]);
            continue;
        }
        if rot < HEAD_DIM {
            check_bits(&format!("{tag} q pass-through"), &pass_through(&to_f32(gq), rot), &pass_through(&emul[q.clone()], rot));
            check_bits(&format!("{tag} k pass-through"), &pass_through(&to_f32(gk), rot), &pass_through(&emul[k.clone()], rot));
        }
    }
    // Rotated dims over all rows at once (the 1 % share is over the whole call).
    let gather = |src: &[f32], span: fn(usize, usize, usize) -> std::ops::Range<usize>| -> Vec<f32> {
        (0..rows).filter(|&r| pos[r] != 0).flat_map(|r| src[span(r * qkv_dim, q_dim, kv_dim)].to_vec()).collect()
    };
    let q_span: fn(usize, usize, usize) -> std::ops::Range<usize> = |row, qd, _| row..row + qd;
    let k_span: fn(usize, usize, usize) -> std::ops::Range<usize> = |row, qd, kvd| row + qd..row + qd + kvd;
    let got_q: Vec<bf16> = (0..rows).filter(|&r| pos[r] != 0).flat_map(|r| got_qkv[r * qkv_dim..r * qkv_dim + q_dim].to_vec()).collect();
    let got_kr: Vec<bf16> = (0..rows)
        .filter(|&r| pos[r] != 0)
        .flat_map(|r| got_k[cache_rows[r] as usize * kv_dim..(cache_rows[r] as usize + 1) * kv_dim].to_vec())
        .collect();
    check_rotated(&format!("{what} q"), &got_q, &gather(&emul, q_span), &gather(&normed, q_span), rot, mode);
    check_rotated(&format!("{what} k cache"), &got_kr, &gather(&emul, k_span), &gather(&normed, k_span), rot, mode);
    // Cache rows that no live row maps to stay poisoned.
    for &cr in &perm[rows..] {
        let c = cr as usize * kv_dim..(cr as usize + 1) * kv_dim;
        assert!(got_k[c.clone()].iter().chain(&got_v[c]).all(|v| v.is_nan()), "{what}: cache row {cr} was written");
    }
}

#[test]
fn rope_qknorm_llada_moe_shape() {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = StdRng::seed_from_u64(40);
    for rows in QK_ROWS {
        for mode in [RopeMode::Dream, RopeMode::Llada] {
            qk_case(&gpu, &mut rng, rows, LLADA_MOE, mode);
        }
    }
}

#[test]
fn rope_qknorm_partial_llada2_mini_shape() {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = StdRng::seed_from_u64(41);
    for rows in QK_ROWS {
        for mode in [RopeMode::Dream, RopeMode::Llada] {
            qk_case(&gpu, &mut rng, rows, LLADA2_MINI, mode);
        }
    }
}

/// Partial RoPE alone, one norm alone, odd rotary dims (not a multiple of 8; 2; 126), GQA 28/4.
#[test]
fn rope_qknorm_odd_options() {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = StdRng::seed_from_u64(42);
    let base = Case { n_heads: 28, n_kv: 4, theta: 1e6, q_norm: false, k_norm: false, eps: 1e-6, rotary_dim: 64 };
    let cases = [
        base,
        Case { q_norm: true, rotary_dim: 34, ..base },
        Case { k_norm: true, rotary_dim: 2, ..base },
        Case { q_norm: true, k_norm: true, rotary_dim: 126, eps: 1e-2, ..base },
        Case { k_norm: true, rotary_dim: 128, ..base },
    ];
    for rows in [1, 19] {
        for c in cases {
            for mode in [RopeMode::Dream, RopeMode::Llada] {
                qk_case(&gpu, &mut rng, rows, c, mode);
            }
        }
    }
}

/// Dream mode, full rotation: the fused kernel equals, bit for bit, the plain kernel run on the
/// CPU-normed input (same cos/sin and rotation code): the GPU norm matches the reference exactly.
#[test]
fn rope_qknorm_full_dream_equals_plain_kernel_on_normed_input() {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = StdRng::seed_from_u64(43);
    let c = LLADA_MOE;
    let (nh, nkv) = (c.n_heads, c.n_kv);
    let (qkv_dim, kv_dim) = ((nh + 2 * nkv) * HEAD_DIM, nkv * HEAD_DIM);
    for rows in QK_ROWS {
        let (xb, xf) = normal_bf16(&mut rng, rows * qkv_dim, -0.2, 3.0);
        let (wqb, wqf) = normal_bf16(&mut rng, HEAD_DIM, 1.0, 0.3);
        let (wkb, wkf) = normal_bf16(&mut rng, HEAD_DIM, 1.2, 0.5);
        let pos: Vec<u32> = (0..rows).map(|_| rng.gen_range(0..1 << 20)).collect();
        let pos_d = gpu.upload(&pos, &[rows]).unwrap();
        let cr: Vec<u32> = (0..rows as u32).rev().collect();
        let cr_d = gpu.upload(&cr, &[rows]).unwrap();
        let (wq, wk) = (gpu.upload(&wqb, &[HEAD_DIM]).unwrap(), gpu.upload(&wkb, &[HEAD_DIM]).unwrap());
        let hex = HostExtras { q_norm: Some(&wqf[..]), k_norm: Some(&wkf[..]), eps: c.eps, rotary_dim: HEAD_DIM };
        let mut normed = xf.clone();
        rope_qk_bf16(&mut normed, nh, nkv, &vec![0; rows], c.theta as f64, RopeMode::Dream, &hex);
        let normed: Vec<bf16> = normed.iter().map(|&v| bf16::from_f32(v)).collect();

        let run = |input: &[bf16], ex: &RopeExtras| {
            let mut qkv = gpu.upload(input, &[rows, qkv_dim]).unwrap();
            let (mut k, mut v) = (poisoned(&gpu, &[rows, kv_dim]), poisoned(&gpu, &[rows, kv_dim]));
            ops::rope::rope_kv_store(&gpu, rows, &mut qkv, &pos_d, &cr_d, &mut k, &mut v, nh, nkv, c.theta, RopeMode::Dream, ex)
                .unwrap();
            (qkv.to_host(&gpu).unwrap(), k.to_host(&gpu).unwrap())
        };
        let (fq, fk) = run(&xb, &RopeExtras { q_norm: Some(&wq), k_norm: Some(&wk), eps: c.eps, rotary_dim: HEAD_DIM });
        let (pq, pk) = run(&normed, &RopeExtras::none());
        for r in 0..rows {
            let q = r * qkv_dim..r * qkv_dim + nh * HEAD_DIM;
            check_bits(&format!("fused vs plain-on-normed {rows} rows: row {r} q"), &fq[q.clone()], &pq[q]);
        }
        check_bits(&format!("fused vs plain-on-normed {rows} rows: k cache"), &fk, &pk);
    }
}

#[test]
fn rope_qknorm_bad_options_are_refused() {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = StdRng::seed_from_u64(44);
    let t = |dims: &[usize], rng: &mut StdRng| {
        let n: usize = dims.iter().product();
        gpu.upload(&normal_bf16(rng, n, 0.0, 1.0).0, dims).unwrap()
    };
    let mut qkv = t(&[2, 3 * HEAD_DIM], &mut rng);
    let pos = gpu.upload(&[5u32, 6], &[2]).unwrap();
    let (mut k, mut v) = (t(&[2, HEAD_DIM], &mut rng), t(&[2, HEAD_DIM], &mut rng));
    let (w, w64, w2d) = (t(&[HEAD_DIM], &mut rng), t(&[64], &mut rng), t(&[1, HEAD_DIM], &mut rng));
    let mut call = |ex: RopeExtras| {
        ops::rope::rope_kv_store(&gpu, 2, &mut qkv, &pos, &pos, &mut k, &mut v, 1, 1, 1e4, RopeMode::Dream, &ex).unwrap_err()
    };
    let base = RopeExtras { q_norm: Some(&w), k_norm: Some(&w), eps: 1e-6, rotary_dim: 64 };
    for (ex, name) in [
        (RopeExtras { q_norm: Some(&w64), ..base }, "q_norm"),
        (RopeExtras { k_norm: Some(&w2d), ..base }, "k_norm"),
    ] {
        let e = call(ex);
        assert!(matches!(&e, Error::Shape { tensor, .. } if tensor == name), "{e}");
    }
    for rot in [0usize, 63, 130] {
        let e = call(RopeExtras { rotary_dim: rot, ..base });
        assert!(matches!(&e, Error::BadInput(m) if m.contains("rotary_dim")), "{e}");
    }
    let e = call(RopeExtras { eps: 0.0, ..base });
    assert!(matches!(&e, Error::BadInput(m) if m.contains("eps")), "{e}");
}
