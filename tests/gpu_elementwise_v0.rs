//! The rewritten elementwise kernels (add_rmsnorm, swiglu, rope_kv_store) against the previous
//! versions, kept as `*_v0_bf16` entry points: outputs must be equal bit for bit (the rewrite
//! changed memory access and launch shape only, never a rounding step), on seeded random bf16
//! inputs at awkward row counts, the decode (32) and prefill (512) row counts and production
//! widths, with every output buffer poisoned (NaN) first and compared whole, so rows and cache
//! rows the kernels must not touch are checked too. Then both versions are timed side by side
//! (printed, not asserted). Skips without a GPU (see `test_gpu`).
#![cfg(feature = "cuda")]

use demask::cpu::rope::RopeMode;
use demask::gpu::{test_gpu, DTensor, Gpu, Timer};
use demask::ops;
use half::bf16;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

const ROWS: [usize; 6] = [1, 19, 32, 99, 111, 512];
const HEAD_DIM: usize = 128;

/// N(mean, std²) values rounded to bf16, with about 1 in 500 replaced by a large value
/// (|x| in [30, 300]: exp overflow in silu, big squares in the norm).
fn normal_bf16(rng: &mut StdRng, n: usize, mean: f32, std: f32) -> Vec<bf16> {
    let d = Normal::new(mean, std).unwrap();
    (0..n)
        .map(|_| {
            let x = if rng.gen_range(0..500) == 0 {
                rng.gen_range(30.0f32..300.0) * if rng.gen::<bool>() { 1.0 } else { -1.0 }
            } else {
                d.sample(rng)
            };
            bf16::from_f32(x)
        })
        .collect()
}

fn poisoned(gpu: &Gpu, dims: &[usize]) -> DTensor<bf16> {
    let n: usize = dims.iter().product();
    gpu.upload(&vec![bf16::NAN; n], dims).unwrap()
}

/// Bit-exact equality of whole buffers (NaN poison included); prints the first differences.
fn check_bits(what: &str, got: &[bf16], want: &[bf16]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let bad: Vec<usize> = (0..got.len())
        .filter(|&i| got[i].to_bits() != want[i].to_bits())
        .collect();
    if !bad.is_empty() {
        for &i in bad.iter().take(8) {
            eprintln!(
                "{what}: [{i}] new {:?} ({:#06x}) v0 {:?} ({:#06x})",
                got[i],
                got[i].to_bits(),
                want[i],
                want[i].to_bits()
            );
        }
        panic!(
            "{what}: {} of {} elements differ from the v0 kernel",
            bad.len(),
            got.len()
        );
    }
}

/// Every element of `v[from..]` is still the NaN poison.
fn check_untouched(what: &str, v: &[bf16], from: usize) {
    if let Some(i) = v[from..].iter().position(|x| !x.is_nan()) {
        panic!(
            "{what}: element {} past the live rows was written",
            from + i
        );
    }
}

#[test]
fn add_rmsnorm_matches_v0_bitwise() {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = StdRng::seed_from_u64(31);
    // 24576 = the largest hidden size (768 threads).
    for (hidden, eps) in [
        (4096usize, 1e-5f32),
        (3584, 1e-6),
        (8192, 1e-5),
        (136, 1e-6),
        (24576, 1e-5),
    ] {
        let weight = gpu
            .upload(&normal_bf16(&mut rng, hidden, 0.8, 0.3), &[hidden])
            .unwrap();
        for rows in ROWS {
            for with_delta in [true, false] {
                let what = format!("add_rmsnorm {rows}x{hidden} delta={with_delta}");
                let n = (rows + 2) * hidden;
                let rb = normal_bf16(&mut rng, n, 0.1, 2.0);
                let db = normal_bf16(&mut rng, n, -0.1, 1.0);
                let delta = gpu.upload(&db, &[rows + 2, hidden]).unwrap();
                let mut res = [(); 2].map(|_| gpu.upload(&rb, &[rows + 2, hidden]).unwrap());
                let mut out = [(); 2].map(|_| poisoned(&gpu, &[rows + 2, hidden]));
                let [res0, res1] = &mut res;
                let [out0, out1] = &mut out;
                let d = with_delta.then_some(&delta);
                ops::norm::add_rmsnorm_v0(&gpu, rows, res0, d, &weight, eps, out0).unwrap();
                ops::norm::add_rmsnorm(&gpu, rows, res1, d, &weight, eps, out1).unwrap();
                let (r0, r1) = (res0.to_host(&gpu).unwrap(), res1.to_host(&gpu).unwrap());
                let (o0, o1) = (out0.to_host(&gpu).unwrap(), out1.to_host(&gpu).unwrap());
                check_bits(&format!("{what} residual"), &r1, &r0);
                check_bits(&format!("{what} out"), &o1, &o0);
                check_bits(
                    &format!("{what} residual rows past the live ones"),
                    &r1[rows * hidden..],
                    &rb[rows * hidden..],
                );
                check_untouched(&format!("{what} out"), &o1, rows * hidden);
            }
        }
    }
}

#[test]
fn swiglu_matches_v0_bitwise() {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = StdRng::seed_from_u64(32);
    // 18944 / 8 = 2368 vectors: a partial last block; 8: one vector per row.
    for ffn in [12288usize, 18944, 136, 8] {
        for rows in ROWS {
            let what = format!("swiglu {rows}x{ffn}");
            let gu = gpu
                .upload(
                    &normal_bf16(&mut rng, (rows + 1) * 2 * ffn, 0.0, 2.5),
                    &[rows + 1, 2 * ffn],
                )
                .unwrap();
            let mut out0 = poisoned(&gpu, &[rows + 1, ffn]);
            let mut out1 = poisoned(&gpu, &[rows + 1, ffn]);
            ops::swiglu::swiglu_v0(&gpu, rows, &gu, &mut out0).unwrap();
            ops::swiglu::swiglu(&gpu, rows, &gu, &mut out1).unwrap();
            let (o0, o1) = (out0.to_host(&gpu).unwrap(), out1.to_host(&gpu).unwrap());
            check_bits(&what, &o1, &o0);
            check_untouched(&what, &o1, rows * ffn);
        }
    }
}

#[test]
fn rope_kv_store_matches_v0_bitwise() {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = StdRng::seed_from_u64(33);
    // (heads, kv heads, theta): LLaDA, Dream, a tiny shape; both modes on each. Row counts
    // below and above sm_count / chunks exercise both block sizes of the new launch.
    for (nh, nkv, theta) in [(32usize, 32usize, 500000.0f32), (28, 4, 1e6), (2, 1, 1e4)] {
        for mode in [RopeMode::Llada, RopeMode::Dream] {
            for rows in ROWS {
                let what = format!("rope {mode:?} {rows} rows {nh}/{nkv} heads");
                let qkv_dim = (nh + 2 * nkv) * HEAD_DIM;
                let kv_dim = nkv * HEAD_DIM;
                let cap = 2 * rows + 5;
                let xb = normal_bf16(&mut rng, (rows + 1) * qkv_dim, 0.0, 1.0);
                // Positions: mostly < 4096, some large (sincosf's slow path).
                let positions: Vec<u32> = (0..rows)
                    .map(|r| match r % 7 {
                        3 => rng.gen_range(4096..1 << 24),
                        5 => rng.gen_range(1 << 24..1 << 31),
                        _ => rng.gen_range(0..4096),
                    })
                    .collect();
                let mut perm: Vec<u32> = (0..cap as u32).collect();
                perm.shuffle(&mut rng);
                let pos = gpu.upload(&positions, &[rows]).unwrap();
                let crows = gpu.upload(&perm[..rows], &[rows]).unwrap();
                let mut got = Vec::new();
                for v0 in [true, false] {
                    let mut qkv = gpu.upload(&xb, &[rows + 1, qkv_dim]).unwrap();
                    let mut k = poisoned(&gpu, &[cap, kv_dim]);
                    let mut v = poisoned(&gpu, &[cap, kv_dim]);
                    let f = if v0 {
                        ops::rope::rope_kv_store_v0
                    } else {
                        ops::rope::rope_kv_store
                    };
                    f(
                        &gpu, rows, &mut qkv, &pos, &crows, &mut k, &mut v, nh, nkv, theta, mode,
                    )
                    .unwrap();
                    got.push((
                        qkv.to_host(&gpu).unwrap(),
                        k.to_host(&gpu).unwrap(),
                        v.to_host(&gpu).unwrap(),
                    ));
                }
                let (q0, k0, v0) = &got[0];
                let (q1, k1, v1) = &got[1];
                check_bits(&format!("{what} qkv"), q1, q0);
                check_bits(&format!("{what} k cache"), k1, k0);
                check_bits(&format!("{what} v cache"), v1, v0);
                check_bits(
                    &format!("{what} qkv row past the live ones"),
                    &q1[rows * qkv_dim..],
                    &xb[rows * qkv_dim..],
                );
                for &cr in &perm[rows..] {
                    let c = cr as usize * kv_dim;
                    check_untouched(&format!("{what} k cache row {cr}"), &k1[c..c + kv_dim], 0);
                    check_untouched(&format!("{what} v cache row {cr}"), &v1[c..c + kv_dim], 0);
                }
            }
        }
    }
}

/// Side-by-side time of v0 and the new kernel at the W4 shapes (LLaDA-8B prefill 512 rows,
/// decode 32 rows; Dream-7B likewise), 50 back-to-back launches each. Printed, not asserted;
/// bytes are the real bytes moved. The new kernels are launched with PDL as in the model (each
/// launch's prologue overlaps the previous one); run with `DEMASK_PDL=0` to time them without.
#[test]
fn elementwise_v0_vs_new_timing() {
    let Some(gpu) = test_gpu() else { return };
    let timer = Timer::new(&gpu).unwrap();
    let iters = 50;
    let time = |f: &mut dyn FnMut()| -> f32 {
        f();
        timer.start(&gpu).unwrap();
        for _ in 0..iters {
            f();
        }
        timer.stop_ms(&gpu).unwrap() / iters as f32 * 1000.0
    };
    let report = |name: &str, bytes: usize, us0: f32, us1: f32| {
        eprintln!(
            "v0-vs-new {name:<36} v0 {us0:7.2} us {:7.0} GB/s   new {us1:7.2} us {:7.0} GB/s   x{:.2}",
            bytes as f64 / us0 as f64 / 1e3,
            bytes as f64 / us1 as f64 / 1e3,
            us0 / us1
        );
    };
    let mk = |g: &Gpu, dims: &[usize]| -> DTensor<bf16> {
        let mut t = g.alloc(dims).unwrap();
        ops::fill::fill_normal(g, &mut t, 3, 0.0, 1.0).unwrap();
        t
    };
    for (hidden, ffn, nh, nkv, mode) in [
        (4096usize, 12288usize, 32usize, 32usize, RopeMode::Llada),
        (3584, 18944, 28, 4, RopeMode::Dream),
    ] {
        for rows in [512usize, 32] {
            let mut res = mk(&gpu, &[rows, hidden]);
            let delta = mk(&gpu, &[rows, hidden]);
            let w = mk(&gpu, &[hidden]);
            let mut out = mk(&gpu, &[rows, hidden]);
            let mut t = [0f32; 2];
            for (i, f) in [ops::norm::add_rmsnorm_v0, ops::norm::add_rmsnorm]
                .into_iter()
                .enumerate()
            {
                t[i] = time(&mut || {
                    f(&gpu, rows, &mut res, Some(&delta), &w, 1e-5, &mut out).unwrap()
                });
            }
            // residual and delta read, residual and out written.
            report(
                &format!("add_rmsnorm/{rows}x{hidden}"),
                4 * rows * hidden * 2,
                t[0],
                t[1],
            );

            let gu = mk(&gpu, &[rows, 2 * ffn]);
            let mut o = mk(&gpu, &[rows, ffn]);
            for (i, f) in [ops::swiglu::swiglu_v0, ops::swiglu::swiglu]
                .into_iter()
                .enumerate()
            {
                t[i] = time(&mut || f(&gpu, rows, &gu, &mut o).unwrap());
            }
            report(
                &format!("swiglu/{rows}x{ffn}"),
                3 * rows * ffn * 2,
                t[0],
                t[1],
            );

            let qkv_dim = (nh + 2 * nkv) * HEAD_DIM;
            let mut qkv = mk(&gpu, &[rows, qkv_dim]);
            let p: Vec<u32> = (0..rows as u32).map(|r| 256 + r).collect();
            let pos = gpu.upload(&p, &[rows]).unwrap();
            let crow: Vec<u32> = (0..rows as u32).collect();
            let crow = gpu.upload(&crow, &[rows]).unwrap();
            let mut k = mk(&gpu, &[rows, nkv * HEAD_DIM]);
            let mut v = mk(&gpu, &[rows, nkv * HEAD_DIM]);
            for (i, f) in [ops::rope::rope_kv_store_v0, ops::rope::rope_kv_store]
                .into_iter()
                .enumerate()
            {
                t[i] = time(&mut || {
                    f(
                        &gpu, rows, &mut qkv, &pos, &crow, &mut k, &mut v, nh, nkv, 1e6, mode,
                    )
                    .unwrap()
                });
            }
            // q read and written in place, k and v read and written once.
            report(
                &format!("rope_kv_store/{mode:?}/{rows}x{nh}x{nkv}"),
                2 * rows * qkv_dim * 2,
                t[0],
                t[1],
            );
        }
    }
}
