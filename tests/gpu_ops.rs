//! GPU parity of the elementwise kernels (embed, add+RMSNorm, SwiGLU, fills; RoPE + KV store
//! is in tests/gpu_rope.rs) against the f32 CPU references, on seeded random bf16 inputs at awkward row counts and
//! production widths. Every output is poisoned (NaN) before the kernel runs, and rows the
//! kernel must not touch are checked to be unchanged. Skips without a GPU (see `test_gpu`).
#![cfg(feature = "cuda")]

mod common;

use common::elementwise::*;
use demask::cpu;
use demask::cpu::rope::RopeMode;
use demask::gpu::{test_gpu, DTensor, Gpu, Timer};
use demask::ops;
use demask::Error;
use half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[test]
fn embed_gathers_rows() {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = StdRng::seed_from_u64(11);
    let table_rows = 5003;
    for row_len in [4096usize, 3584] {
        let (tb, tf) = normal_bf16(&mut rng, table_rows * row_len, 0.0, 0.02);
        let table = gpu.upload(&tb, &[table_rows, row_len]).unwrap();
        for n in ROWS {
            let mut ids: Vec<u32> = (0..n)
                .map(|_| rng.gen_range(0..table_rows as u32))
                .collect();
            ids[0] = table_rows as u32 - 1;
            if n > 2 {
                ids[n - 1] = 0;
                ids[1] = ids[n / 2];
            }
            let ids_d = gpu.upload(&ids, &[n]).unwrap();
            let mut out = poisoned(&gpu, &[n + 3, row_len]);
            ops::embed::gather_rows(&gpu, n, &ids_d, &table, &mut out).unwrap();
            let got = out.to_host(&gpu).unwrap();
            let mut want = vec![0f32; n * row_len];
            cpu::embed::gather_rows(&tf, row_len, &ids, &mut want);
            let want: Vec<bf16> = want.iter().map(|&v| bf16::from_f32(v)).collect();
            check_bits(&format!("embed {n}x{row_len}"), &got[..n * row_len], &want);
            assert!(
                got[n * row_len..].iter().all(|v| v.is_nan()),
                "embed wrote past row {n}"
            );
        }
    }
}

#[test]
fn add_rmsnorm_matches_reference() {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = StdRng::seed_from_u64(12);
    // Two bf16 roundings (normalised x, then w * x): ~2 * 2^-9 relative; atol for tiny values.
    let (atol, rtol) = (1e-3, 1e-2);
    for (hidden, eps) in [
        (4096usize, 1e-5f32),
        (3584, 1e-6),
        (8192, 1e-5),
        (136, 1e-6),
    ] {
        let (wb, wf) = normal_bf16(&mut rng, hidden, 0.8, 0.3);
        let weight = gpu.upload(&wb, &[hidden]).unwrap();
        for rows in ROWS {
            for with_delta in [true, false] {
                let what = format!("add_rmsnorm {rows}x{hidden} delta={with_delta}");
                let total = (rows + 2) * hidden;
                let (rb, rf) = normal_bf16(&mut rng, total, 0.1, 2.0);
                let (db, df) = normal_bf16(&mut rng, total, -0.1, 1.0);
                let mut residual = gpu.upload(&rb, &[rows + 2, hidden]).unwrap();
                let delta = gpu.upload(&db, &[rows + 2, hidden]).unwrap();
                let mut out = poisoned(&gpu, &[rows + 2, hidden]);
                ops::norm::add_rmsnorm(
                    &gpu,
                    rows,
                    &mut residual,
                    with_delta.then_some(&delta),
                    &weight,
                    eps,
                    &mut out,
                )
                .unwrap();
                let got_res = residual.to_host(&gpu).unwrap();
                let got_out = out.to_host(&gpu).unwrap();

                // residual: bf16(r + d) on live rows (bit-exact), untouched beyond.
                let mut want_res = rb.clone();
                if with_delta {
                    for i in 0..rows * hidden {
                        want_res[i] = bf16::from_f32(rf[i] + df[i]);
                    }
                }
                check_bits(&format!("{what} residual"), &got_res, &want_res);

                let x = to_f32(&want_res[..rows * hidden]);
                let mut want = vec![0f32; rows * hidden];
                cpu::norm::rms_norm(&x, &wf, eps, &mut want);
                check_close(&what, &got_out[..rows * hidden], &want, atol, rtol);
                assert!(
                    got_out[rows * hidden..].iter().all(|v| v.is_nan()),
                    "{what}: wrote past row {rows}"
                );

                // The kernel's exact steps: bf16(w * bf16(x * inv)).
                let emul: Vec<f32> = x
                    .chunks(hidden)
                    .flat_map(|r| {
                        let ss: f64 = r.iter().map(|&v| v as f64 * v as f64).sum();
                        let inv = 1.0 / ((ss / hidden as f64) as f32 + eps).sqrt();
                        r.iter()
                            .zip(&wf)
                            .map(move |(&v, &w)| w * bf(v * inv))
                            .collect::<Vec<_>>()
                    })
                    .collect();
                check_mostly_exact(&what, &got_out[..rows * hidden], &emul, 0.01);
            }
        }
    }
}

#[test]
fn add_rmsnorm_cpu_add_matches_gpu_residual() {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = StdRng::seed_from_u64(13);
    let (rows, hidden) = (19, 3584);
    let (rb, rf) = normal_bf16(&mut rng, rows * hidden, 0.0, 3.0);
    let (db, df) = normal_bf16(&mut rng, rows * hidden, 0.0, 0.5);
    let (wb, _) = normal_bf16(&mut rng, hidden, 1.0, 0.2);
    let mut residual = gpu.upload(&rb, &[rows, hidden]).unwrap();
    let delta = gpu.upload(&db, &[rows, hidden]).unwrap();
    let weight = gpu.upload(&wb, &[hidden]).unwrap();
    let mut out = poisoned(&gpu, &[rows, hidden]);
    ops::norm::add_rmsnorm(
        &gpu,
        rows,
        &mut residual,
        Some(&delta),
        &weight,
        1e-6,
        &mut out,
    )
    .unwrap();
    let mut sum = rf.clone();
    cpu::norm::add_inplace(&mut sum, &df);
    // One bf16 rounding of the f32 sum.
    check_close(
        "residual add",
        &residual.to_host(&gpu).unwrap(),
        &sum,
        1e-6,
        2f32.powi(-8),
    );
}

#[test]
fn swiglu_matches_reference() {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = StdRng::seed_from_u64(17);
    // Two bf16 roundings (silu, then the product): ~2 * 2^-9 relative.
    let (atol, rtol) = (1e-3, 1e-2);
    for ffn in [12288usize, 18944] {
        for rows in ROWS {
            let what = format!("swiglu {rows}x{ffn}");
            let (gb, gf) = normal_bf16(&mut rng, (rows + 1) * 2 * ffn, 0.0, 2.5);
            let gu = gpu.upload(&gb, &[rows + 1, 2 * ffn]).unwrap();
            let mut out = poisoned(&gpu, &[rows + 1, ffn]);
            ops::swiglu::swiglu(&gpu, rows, &gu, &mut out).unwrap();
            let got = out.to_host(&gpu).unwrap();
            let mut want = vec![0f32; rows * ffn];
            cpu::swiglu::swiglu(&gf[..rows * 2 * ffn], ffn, &mut want);
            check_close(&what, &got[..rows * ffn], &want, atol, rtol);
            assert!(
                got[rows * ffn..].iter().all(|v| v.is_nan()),
                "{what}: wrote past row {rows}"
            );
            let emul: Vec<f32> = gf[..rows * 2 * ffn]
                .chunks(2 * ffn)
                .flat_map(|r| (0..ffn).map(move |j| bf(r[j] / (1.0 + (-r[j]).exp())) * r[ffn + j]))
                .collect();
            check_mostly_exact(&what, &got[..rows * ffn], &emul, 0.01);
        }
    }
}

#[test]
fn fill_const_sets_every_element() {
    let Some(gpu) = test_gpu() else { return };
    for n in [5usize, 8, 1_000_005] {
        let mut t = gpu.upload(&vec![bf16::from_f32(-7.25); n], &[n]).unwrap();
        ops::fill::fill_const(&gpu, &mut t, 0.3).unwrap();
        let want = bf16::from_f32(0.3);
        assert!(
            t.to_host(&gpu)
                .unwrap()
                .iter()
                .all(|v| v.to_bits() == want.to_bits()),
            "fill_const 0.3, n = {n}"
        );
        ops::fill::fill_const(&gpu, &mut t, f32::NAN).unwrap();
        assert!(
            t.to_host(&gpu).unwrap().iter().all(|v| v.is_nan()),
            "fill_const NaN, n = {n}"
        );
    }
}

#[test]
fn fill_normal_statistics() {
    let Some(gpu) = test_gpu() else { return };
    let n = 1_000_003;
    let (mean, std) = (0.5f32, 2.0f32);
    let mut t = poisoned(&gpu, &[n]);
    ops::fill::fill_normal(&gpu, &mut t, 42, mean, std).unwrap();
    let z = to_f32(&t.to_host(&gpu).unwrap());
    assert!(
        z.iter().all(|v| v.is_finite()),
        "fill_normal: non-finite sample"
    );
    let m = z.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
    let var = z.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / n as f64;
    let s = var.sqrt();
    let frac = |k: f64| {
        z.iter()
            .filter(|&&v| (v as f64 - mean as f64).abs() <= k * std as f64)
            .count() as f64
            / n as f64
    };
    let (f1, f2, f3) = (frac(1.0), frac(2.0), frac(3.0));
    let zmax = z
        .iter()
        .map(|&v| ((v - mean) / std).abs())
        .fold(0f32, f32::max);
    let lag1 = z
        .windows(2)
        .map(|w| (w[0] as f64 - m) * (w[1] as f64 - m))
        .sum::<f64>()
        / ((n - 1) as f64 * var);
    eprintln!("fill_normal: mean {m:.5} std {s:.5} within 1/2/3 std {f1:.5}/{f2:.5}/{f3:.5} max |z| {zmax} lag-1 corr {lag1:.5}");
    // Bounds are ~6 standard errors of each statistic at n = 1e6 (plus bf16 rounding at the
    // interval edges).
    assert!((m - mean as f64).abs() < 0.012, "mean {m}");
    assert!((s - std as f64).abs() < 0.012, "std {s}");
    assert!((f1 - 0.682_689).abs() < 0.004, "within 1 std: {f1}");
    assert!((f2 - 0.954_500).abs() < 0.003, "within 2 std: {f2}");
    assert!((f3 - 0.997_300).abs() < 0.0006, "within 3 std: {f3}");
    assert!(zmax > 4.0 && zmax < 6.0, "max |z| {zmax}");
    assert!(lag1.abs() < 0.006, "lag-1 correlation {lag1}");
}

#[test]
fn fill_normal_is_deterministic_in_seed_and_index() {
    let Some(gpu) = test_gpu() else { return };
    let n = 1_000_003;
    let run = |len: usize, seed: u64| {
        let mut t = poisoned(&gpu, &[len]);
        ops::fill::fill_normal(&gpu, &mut t, seed, 0.0, 0.02).unwrap();
        t.to_host(&gpu).unwrap()
    };
    let a = run(n, 7);
    check_bits("fill_normal same seed", &run(n, 7), &a);
    // A shorter tensor (other grid, tail path) gets the same value at each index.
    check_bits("fill_normal prefix 1000", &run(1000, 7), &a[..1000]);
    check_bits("fill_normal prefix 13", &run(13, 7), &a[..13]);
    let b = run(n, 8);
    let same = a
        .iter()
        .zip(&b)
        .filter(|(x, y)| x.to_bits() == y.to_bits())
        .count();
    // Equal bf16 values by chance: ~1% at std 0.02 (256 mantissa steps per octave).
    assert!(
        same < n / 20,
        "seeds 7 and 8 agree on {same} of {n} elements"
    );
}

#[test]
fn wrappers_reject_bad_shapes() {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = StdRng::seed_from_u64(18);
    let (b, _) = normal_bf16(&mut rng, 4 * 132, 0.0, 1.0);
    let t = |dims: &[usize]| {
        gpu.upload(&b[..dims.iter().product::<usize>()], dims)
            .unwrap()
    };
    let ids = gpu.upload(&[0u32, 1, 2, 3], &[4]).unwrap();
    // Row length not a multiple of 8.
    let mut out = t(&[4, 132]);
    let e = ops::embed::gather_rows(&gpu, 4, &ids, &t(&[4, 132]), &mut out).unwrap_err();
    assert!(matches!(e, Error::BadInput(_)), "{e}");
    // Output with too few rows.
    let mut out = t(&[3, 128]);
    let e = ops::embed::gather_rows(&gpu, 4, &ids, &t(&[4, 128]), &mut out).unwrap_err();
    assert!(
        matches!(&e, Error::Shape { tensor, .. } if tensor == "out"),
        "{e}"
    );
    // Norm: delta of another width.
    let (mut res, mut out) = (t(&[2, 128]), t(&[2, 128]));
    let e = ops::norm::add_rmsnorm(
        &gpu,
        2,
        &mut res,
        Some(&t(&[4, 64])),
        &t(&[128]),
        1e-5,
        &mut out,
    )
    .unwrap_err();
    assert!(
        matches!(&e, Error::Shape { tensor, .. } if tensor == "delta"),
        "{e}"
    );
    // SwiGLU: gu not twice as wide as out.
    let mut out = t(&[2, 64]);
    let e = ops::swiglu::swiglu(&gpu, 2, &t(&[2, 136]), &mut out).unwrap_err();
    assert!(
        matches!(&e, Error::Shape { tensor, .. } if tensor == "gu"),
        "{e}"
    );
    // RoPE: v cache of another shape; qkv of the wrong width.
    let mut qkv = t(&[1, 3 * 128]);
    let pos = gpu.upload(&[5u32], &[1]).unwrap();
    let (mut k, mut v) = (t(&[2, 128]), t(&[1, 128]));
    let e = ops::rope::rope_kv_store(
        &gpu,
        1,
        &mut qkv,
        &pos,
        &pos,
        &mut k,
        &mut v,
        1,
        1,
        1e4,
        RopeMode::Llada,
        &ops::rope::RopeExtras::none(),
    )
    .unwrap_err();
    assert!(
        matches!(&e, Error::Shape { tensor, .. } if tensor == "v_cache"),
        "{e}"
    );
    let mut v = t(&[2, 128]);
    let e = ops::rope::rope_kv_store(
        &gpu,
        1,
        &mut qkv,
        &pos,
        &pos,
        &mut k,
        &mut v,
        2,
        1,
        1e4,
        RopeMode::Llada,
        &ops::rope::RopeExtras::none(),
    )
    .unwrap_err();
    assert!(
        matches!(&e, Error::Shape { tensor, .. } if tensor == "qkv"),
        "{e}"
    );
}

/// Achieved bandwidth of each kernel at a production size (printed, not asserted).
#[test]
fn elementwise_bandwidth() {
    let Some(gpu) = test_gpu() else { return };
    let timer = Timer::new(&gpu).unwrap();
    let time = |f: &mut dyn FnMut()| {
        f();
        timer.start(&gpu).unwrap();
        for _ in 0..10 {
            f();
        }
        timer.stop_ms(&gpu).unwrap() / 10.0
    };
    let report = |name: &str, bytes: usize, ms: f32| {
        eprintln!(
            "bandwidth {name:<40} {ms:8.4} ms {:8.1} GB/s",
            bytes as f64 / ms as f64 / 1e6
        );
    };
    let mut rng = StdRng::seed_from_u64(19);
    let n = 1usize << 30;
    let mut big: DTensor<bf16> = gpu.alloc(&[n]).unwrap();
    let ms = time(&mut || ops::fill::fill_normal(&gpu, &mut big, 1, 0.0, 0.02).unwrap());
    report("fill_normal/bf16/2^30", 2 * n, ms);
    let ms = time(&mut || ops::fill::fill_const(&gpu, &mut big, 0.5).unwrap());
    report("fill_const/bf16/2^30", 2 * n, ms);
    drop(big);

    let rows = 4096;
    for (hidden, ffn, nh, nkv) in [
        (4096usize, 12288usize, 32usize, 32usize),
        (3584, 18944, 28, 4),
    ] {
        let mk = |g: &Gpu, dims: &[usize]| -> DTensor<bf16> {
            let mut t = g.alloc(dims).unwrap();
            ops::fill::fill_normal(g, &mut t, 3, 0.0, 1.0).unwrap();
            t
        };
        let mut res = mk(&gpu, &[rows, hidden]);
        let delta = mk(&gpu, &[rows, hidden]);
        let w = mk(&gpu, &[hidden]);
        let mut out = mk(&gpu, &[rows, hidden]);
        let ms = time(&mut || {
            ops::norm::add_rmsnorm(&gpu, rows, &mut res, Some(&delta), &w, 1e-5, &mut out).unwrap()
        });
        report(
            &format!("add_rmsnorm/bf16/{rows}x{hidden}"),
            4 * rows * hidden * 2,
            ms,
        );

        let gu = mk(&gpu, &[rows, 2 * ffn]);
        let mut o = mk(&gpu, &[rows, ffn]);
        let ms = time(&mut || ops::swiglu::swiglu(&gpu, rows, &gu, &mut o).unwrap());
        report(&format!("swiglu/bf16/{rows}x{ffn}"), 3 * rows * ffn * 2, ms);

        let vocab = 32768;
        let table = mk(&gpu, &[vocab, hidden]);
        let ids: Vec<u32> = (0..rows).map(|_| rng.gen_range(0..vocab as u32)).collect();
        let ids = gpu.upload(&ids, &[rows]).unwrap();
        let ms = time(&mut || ops::embed::gather_rows(&gpu, rows, &ids, &table, &mut out).unwrap());
        report(
            &format!("embed/bf16/{rows}x{hidden}"),
            2 * rows * hidden * 2,
            ms,
        );

        let qkv_dim = (nh + 2 * nkv) * HEAD_DIM;
        let mut qkv = mk(&gpu, &[rows, qkv_dim]);
        let pos: Vec<u32> = (0..rows as u32).collect();
        let pos = gpu.upload(&pos, &[rows]).unwrap();
        let mut k = mk(&gpu, &[rows, nkv * HEAD_DIM]);
        let mut v = mk(&gpu, &[rows, nkv * HEAD_DIM]);
        for mode in [RopeMode::Llada, RopeMode::Dream] {
            let ms = time(&mut || {
                ops::rope::rope_kv_store(
                    &gpu,
                    rows,
                    &mut qkv,
                    &pos,
                    &pos,
                    &mut k,
                    &mut v,
                    nh,
                    nkv,
                    1e6,
                    mode,
                    &ops::rope::RopeExtras::none(),
                )
                .unwrap()
            });
            // q read+written, k and v read and written once.
            report(
                &format!("rope_kv_store/bf16/{mode:?}/{rows}x{nh}x{nkv}"),
                2 * rows * qkv_dim * 2,
                ms,
            );
        }
    }
}
