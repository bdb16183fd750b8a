//! GPU parity of RoPE + KV store (`ops::rope::rope_kv_store`) against the f32 CPU reference
//! and a bf16 emulation of the kernel's exact steps: LLaDA (f32 rotation) and Dream (bf16
//! cos/sin) modes, awkward row counts, positions up to ~2e9 rad, the cache scatter, and
//! position 0. Outputs are NaN-poisoned first. Skips without a GPU (see `test_gpu`).
#![cfg(feature = "cuda")]

mod common;

use common::elementwise::*;
use demask::cpu;
use demask::cpu::rope::RopeMode;
use demask::gpu::{test_gpu, Gpu};
use demask::ops;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// RoPE + kv_store for one shape, both modes.
fn rope_case(
    gpu: &Gpu,
    rng: &mut StdRng,
    rows: usize,
    n_heads: usize,
    n_kv: usize,
    theta: f32,
    mode: RopeMode,
) {
    let what = format!("rope {mode:?} {rows} rows {n_heads}/{n_kv} heads");
    let qkv_dim = (n_heads + 2 * n_kv) * HEAD_DIM;
    let kv_dim = n_kv * HEAD_DIM;
    let cap = 2 * rows + 5;
    let (xb, xf) = normal_bf16(rng, rows * qkv_dim, 0.0, 1.0);
    // Positions: mostly < 4096, some large (angles of up to ~2e9 rad).
    let positions: Vec<u32> = (0..rows)
        .map(|r| match r % 7 {
            3 => rng.gen_range(4096..1 << 24),
            5 => rng.gen_range(1 << 24..1 << 31),
            _ => rng.gen_range(0..4096),
        })
        .collect();
    let mut perm: Vec<u32> = (0..cap as u32).collect();
    perm.shuffle(rng);
    let cache_rows = perm[..rows].to_vec();

    let mut qkv = gpu.upload(&xb, &[rows, qkv_dim]).unwrap();
    let pos_d = gpu.upload(&positions, &[rows]).unwrap();
    let cr_d = gpu.upload(&cache_rows, &[rows]).unwrap();
    let mut k_cache = poisoned(gpu, &[cap, kv_dim]);
    let mut v_cache = poisoned(gpu, &[cap, kv_dim]);
    ops::rope::rope_kv_store(
        gpu,
        rows,
        &mut qkv,
        &pos_d,
        &cr_d,
        &mut k_cache,
        &mut v_cache,
        n_heads,
        n_kv,
        theta,
        mode,
        &ops::rope::RopeExtras::none(),
    )
    .unwrap();
    let got_qkv = qkv.to_host(gpu).unwrap();
    let got_k = k_cache.to_host(gpu).unwrap();
    let got_v = v_cache.to_host(gpu).unwrap();

    // Reference: q and k are contiguous, rotate both in one call.
    let mut want = xf.clone();
    cpu::rope::rope_inplace(
        &mut want,
        qkv_dim,
        0,
        n_heads + n_kv,
        &positions,
        theta as f64,
        mode,
    );
    // Host emulation of the kernel's bf16 steps (cos/sin from the CPU reference).
    let mut emul = xf.clone();
    for (r, &pos) in positions.iter().enumerate() {
        let (c, s) = cpu::rope::cos_sin(pos, theta as f64, mode);
        for h in 0..n_heads + n_kv {
            let base = r * qkv_dim + h * HEAD_DIM;
            for i in 0..HEAD_DIM / 2 {
                let (a, b) = (xf[base + i], xf[base + i + 64]);
                let (y1, y2) = match mode {
                    RopeMode::Llada => (a * c[i] - b * s[i], b * c[i] + a * s[i]),
                    RopeMode::Dream => (bf(a * c[i]) + bf(-b * s[i]), bf(b * c[i]) + bf(a * s[i])),
                };
                emul[base + i] = y1;
                emul[base + i + 64] = y2;
            }
        }
    }

    let mut got_q = Vec::new();
    let (mut want_q, mut emul_q) = (Vec::new(), Vec::new());
    let (mut got_kr, mut want_k, mut emul_k) = (Vec::new(), Vec::new(), Vec::new());
    for (r, &cache_row) in cache_rows.iter().enumerate() {
        let row = r * qkv_dim;
        let q_end = row + n_heads * HEAD_DIM;
        let k_end = q_end + kv_dim;
        got_q.extend_from_slice(&got_qkv[row..q_end]);
        want_q.extend_from_slice(&want[row..q_end]);
        emul_q.extend_from_slice(&emul[row..q_end]);
        // k and v in qkv are left as they were.
        check_bits(
            &format!("{what} row {r} k|v untouched"),
            &got_qkv[q_end..row + qkv_dim],
            &xb[q_end..row + qkv_dim],
        );
        let c = cache_row as usize * kv_dim;
        got_kr.extend_from_slice(&got_k[c..c + kv_dim]);
        want_k.extend_from_slice(&want[q_end..k_end]);
        emul_k.extend_from_slice(&emul[q_end..k_end]);
        check_bits(
            &format!("{what} row {r} v cache"),
            &got_v[c..c + kv_dim],
            &xb[k_end..k_end + kv_dim],
        );
    }
    // Cache rows that no live row maps to stay poisoned.
    for &cr in &perm[rows..] {
        let c = cr as usize * kv_dim;
        assert!(
            got_k[c..c + kv_dim].iter().all(|v| v.is_nan()),
            "{what}: k cache row {cr} was written"
        );
        assert!(
            got_v[c..c + kv_dim].iter().all(|v| v.is_nan()),
            "{what}: v cache row {cr} was written"
        );
    }
    // LLaDA: one bf16 rounding of an f32 result (2^-9 relative). Dream: three bf16 roundings
    // (x*c, x*s, their sum), each up to 2^-9 of |x| ~ N(0,1) (|x| <= ~5), so a larger atol.
    let (atol, rtol) = match mode {
        RopeMode::Llada => (2e-3, 1e-2),
        RopeMode::Dream => (3e-2, 1e-2),
    };
    check_close(&format!("{what} q"), &got_q, &want_q, atol, rtol);
    check_close(&format!("{what} k cache"), &got_kr, &want_k, atol, rtol);
    check_mostly_exact(&format!("{what} q"), &got_q, &emul_q, 0.01);
    check_mostly_exact(&format!("{what} k cache"), &got_kr, &emul_k, 0.01);
}

#[test]
fn rope_kv_store_llada_shape() {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = StdRng::seed_from_u64(14);
    for rows in ROWS {
        for mode in [RopeMode::Llada, RopeMode::Dream] {
            rope_case(&gpu, &mut rng, rows, 32, 32, 500000.0, mode);
        }
    }
}

#[test]
fn rope_kv_store_dream_shape() {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = StdRng::seed_from_u64(15);
    for rows in ROWS {
        for mode in [RopeMode::Dream, RopeMode::Llada] {
            rope_case(&gpu, &mut rng, rows, 28, 4, 1e6, mode);
        }
    }
}

#[test]
fn rope_position_zero_copies_q_and_k() {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = StdRng::seed_from_u64(16);
    let (rows, nh, nkv) = (19, 28, 4);
    let qkv_dim = (nh + 2 * nkv) * HEAD_DIM;
    let (xb, _) = normal_bf16(&mut rng, rows * qkv_dim, 0.0, 1.0);
    let mut qkv = gpu.upload(&xb, &[rows, qkv_dim]).unwrap();
    let pos = gpu.upload(&vec![0u32; rows], &[rows]).unwrap();
    let cr: Vec<u32> = (0..rows as u32).rev().collect();
    let cr_d = gpu.upload(&cr, &[rows]).unwrap();
    let mut k = poisoned(&gpu, &[rows, nkv * HEAD_DIM]);
    let mut v = poisoned(&gpu, &[rows, nkv * HEAD_DIM]);
    for mode in [RopeMode::Llada, RopeMode::Dream] {
        ops::rope::rope_kv_store(
            &gpu,
            rows,
            &mut qkv,
            &pos,
            &cr_d,
            &mut k,
            &mut v,
            nh,
            nkv,
            1e6,
            mode,
            &ops::rope::RopeExtras::none(),
        )
        .unwrap();
        // cos 0 = 1, sin 0 = 0 exactly: q and k come out bit-identical.
        check_bits(
            &format!("rope pos 0 {mode:?} qkv"),
            &qkv.to_host(&gpu).unwrap(),
            &xb,
        );
        let got_k = k.to_host(&gpu).unwrap();
        for (r, &cache_row) in cr.iter().enumerate() {
            let c = cache_row as usize * nkv * HEAD_DIM;
            let src = r * qkv_dim + nh * HEAD_DIM;
            check_bits(
                "rope pos 0 k",
                &got_k[c..c + nkv * HEAD_DIM],
                &xb[src..src + nkv * HEAD_DIM],
            );
        }
    }
}
