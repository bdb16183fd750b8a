use super::*;

/// The Gumbel score of `v` exactly as `candidate` computes it.
fn score(l: f32, t: f32, key: RngKey, v: u32) -> f64 {
    l as f64 * (1.0 / t as f64) + key.gumbel(v)
}

/// (a) T > 0, with and without top-k / top-p: tokens identical to the CPU. A disagreement is
/// exempt only when the two tokens' f64 scores lie within 1e-12 (f64 exp/log rounding of the
/// device math library); exemptions are counted and printed.
#[test]
fn confidence_sampling_matches_cpu() {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = StdRng::seed_from_u64(12);
    let samplings = [
        Sampling {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        },
        Sampling {
            temperature: 0.5,
            top_k: 0,
            top_p: 1.0,
        },
        Sampling {
            temperature: 1.3,
            top_k: 0,
            top_p: 1.0,
        },
        Sampling {
            temperature: 1.0,
            top_k: 50,
            top_p: 1.0,
        },
        Sampling {
            temperature: 0.7,
            top_k: 1,
            top_p: 1.0,
        },
        Sampling {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.9,
        },
        Sampling {
            temperature: 0.8,
            top_k: 0,
            top_p: 0.5,
        },
        Sampling {
            temperature: 1.0,
            top_k: 200,
            top_p: 0.95,
        },
        Sampling {
            temperature: 2.0,
            top_k: 3000,
            top_p: 0.2,
        },
    ];
    let mut exempt = 0usize;
    let mut total = 0usize;
    for &(vocab, rows) in &[(126464usize, 6usize), (152064, 5), (1000, 19), (513, 19)] {
        let mut logits = logits_rows(&mut rng, rows, vocab);
        // One row on a 0.5 grid: ties at the top-k / top-p cut-off.
        for l in &mut logits[0..vocab] {
            *l = (*l * 2.0).round() / 2.0;
        }
        let dl = gpu.upload(&logits, &[rows, vocab]).unwrap();
        let mut slots = Vec::new();
        let mut want = Vec::new();
        for (si, s) in samplings.iter().enumerate() {
            for r in 0..rows {
                let i = si * rows + r;
                let kind = KINDS[i % 4];
                let key = key_of(i, 17 + si as u32);
                let row = &logits[r * vocab..(r + 1) * vocab];
                slots.push(SlotParams::new(r as u32, kind, s, key));
                want.push((r, *s, kind, key, candidate(row, s, kind, key, ConfDist::Raw)));
            }
        }
        let got = run_conf(&gpu, &dl, rows, vocab, &slots, None);
        let mut bad = Vec::new();
        for (i, &(r, s, kind, key, (wt, wc))) in want.iter().enumerate() {
            let row = &logits[r * vocab..(r + 1) * vocab];
            let gt = got.tokens[i];
            if gt != wt {
                let st = row_stats(row);
                let cut = filter_cutoff(row, &s, &st);
                let (sg, sw) = (
                    score(row[gt as usize], s.temperature, key, gt),
                    score(row[wt as usize], s.temperature, key, wt),
                );
                if row[gt as usize] >= cut && (sg - sw).abs() <= 1e-12 {
                    exempt += 1;
                    eprintln!("exempt: vocab {vocab} slot {i} {s:?}: got {gt} ({sg:.17}) want {wt} ({sw:.17})");
                } else {
                    bad.push(format!("slot {i} row {r} {s:?}: token got {gt} (score {sg}, l {}) want {wt} (score {sw}, l {}), cut {cut}", row[gt as usize], row[wt as usize]));
                }
                continue;
            }
            if !conf_close(got.conf[i], wc, kind) {
                bad.push(format!("slot {i} {kind:?}: conf got {} want {wc}", got.conf[i]));
            }
        }
        total += want.len();
        for b in bad.iter().take(8) {
            eprintln!("vocab {vocab}: {b}");
        }
        assert!(
            bad.is_empty(),
            "vocab {vocab}: {} of {} sampled slots differ",
            bad.len(),
            want.len()
        );
    }
    eprintln!("confidence sampling: {total} slots, {exempt} exempt (scores within 1e-12)");
    assert!(
        exempt * 1000 <= total,
        "too many rounding exemptions: {exempt} of {total}"
    );
}

/// Upper tail of χ²(k) by the Wilson–Hilferty normal approximation.
fn chi2_pvalue(x: f64, k: f64) -> f64 {
    let z = ((x / k).powf(1.0 / 3.0) - (1.0 - 2.0 / (9.0 * k))) / (2.0 / (9.0 * k)).sqrt();
    0.5 * erfc(z / std::f64::consts::SQRT_2)
}

/// erfc by Numerical Recipes' Chebyshev fit (relative error < 1.2e-7).
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.26551223
            + t * (1.00002368
                + t * (0.37409196
                    + t * (0.09678418
                        + t * (-0.18628806
                            + t * (0.27886807
                                + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277)))))))))
            .exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

/// (b) 10^5 samples (one per slot; slot and step vary the counter) from a 50-token row at
/// T = 1, T = 0.5 and T = 1 with top-k 10, against the tempered (renormalised) softmax.
/// Bins with expected count < 5 are pooled. Passes when the χ² p-value exceeds 1e-4 (seeded,
/// so the outcome is fixed; a biased sampler gives p-values of 0 at this sample size).
#[test]
fn sampling_distribution_chi_square() {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = StdRng::seed_from_u64(13);
    let vocab = 50usize;
    let d = Normal::new(0.0f32, 1.5).unwrap();
    let logits: Vec<f32> = (0..vocab).map(|_| d.sample(&mut rng)).collect();
    let dl = gpu.upload(&logits, &[1, vocab]).unwrap();
    const N: usize = 100_000;
    const BATCH: usize = 25_000;
    let mut ws = ConfidenceWs::new(&gpu, BATCH).unwrap();
    let mut tokens = gpu.alloc::<u32>(&[BATCH]).unwrap();
    let mut conf = gpu.alloc::<f32>(&[BATCH]).unwrap();
    for (t, top_k) in [(1.0f32, 0u32), (0.5, 0), (1.0, 10)] {
        let s = Sampling {
            temperature: t,
            top_k,
            top_p: 1.0,
        };
        let mut counts = vec![0u64; vocab];
        // Sanitizer scale (`gpu::sanitizer_shapes`): one batch of samples (the same launches).
        let n = if demask::gpu::sanitizer_shapes() { BATCH } else { N };
        for b in 0..n / BATCH {
            let slots: Vec<SlotParams> = (0..BATCH)
                .map(|i| {
                    SlotParams::new(
                        0,
                        ConfKind::Prob,
                        &s,
                        RngKey {
                            seed: 2024,
                            seq: 1,
                            step: b as u32,
                            slot: i as u32,
                        },
                    )
                })
                .collect();
            ws.set_slots(&gpu, &slots, vocab).unwrap();
            tokens.write(&gpu, &vec![TOKEN_POISON; BATCH]).unwrap();
            confidence(&gpu, &dl, 1, &mut ws, &mut tokens, &mut conf).unwrap();
            for tok in tokens.to_host(&gpu).unwrap() {
                assert!((tok as usize) < vocab, "token {tok:#x} not written");
                counts[tok as usize] += 1;
            }
        }
        // Expected: softmax(l / T) over the survivors of top-k.
        let mut order: Vec<usize> = (0..vocab).collect();
        order.sort_by(|&a, &b| logits[b].partial_cmp(&logits[a]).unwrap());
        let keep: Vec<bool> = (0..vocab)
            .map(|v| top_k == 0 || order[..top_k as usize].contains(&v))
            .collect();
        let mx = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let w: Vec<f64> = (0..vocab)
            .map(|v| {
                if keep[v] {
                    ((logits[v] as f64 - mx) / t as f64).exp()
                } else {
                    0.0
                }
            })
            .collect();
        let z: f64 = w.iter().sum();
        let mut chi2 = 0.0;
        let mut bins = 0usize;
        let (mut pool_o, mut pool_e) = (0f64, 0f64);
        for v in 0..vocab {
            let e = w[v] / z * n as f64;
            if !keep[v] {
                assert_eq!(
                    counts[v], 0,
                    "T {t} top-k {top_k}: token {v} is filtered out but was sampled"
                );
                continue;
            }
            if e < 5.0 {
                pool_o += counts[v] as f64;
                pool_e += e;
                continue;
            }
            chi2 += (counts[v] as f64 - e).powi(2) / e;
            bins += 1;
        }
        if pool_e > 0.0 {
            chi2 += (pool_o - pool_e).powi(2) / pool_e;
            bins += 1;
        }
        let dof = (bins - 1) as f64;
        let p = chi2_pvalue(chi2, dof);
        eprintln!("chi-square T {t} top-k {top_k}: χ² = {chi2:.2} over {bins} bins, p = {p:.4}");
        assert!(
            p > 1e-4,
            "T {t} top-k {top_k}: samples do not follow the tempered softmax (χ² {chi2:.1}, dof {dof}, p {p:e})"
        );
    }
}
