//! GPU decoding kernels against the CPU spec (src/decode/sampling.rs, src/decode/policy.rs):
//! (a) the confidence kernel vs `sampling::candidate` on random f32 logits rows (every
//!     ConfKind, argmax with planted ties, Gumbel sampling with the same Philox / f64 math,
//!     top-k and top-p with ties at the cut-off);
//! (b) sampling as a distribution: chi-square of 10^5 samples against the tempered softmax;
//! (c) the commit kernel vs `Policy::select` for every policy (exact ties, conf exactly at τ,
//!     NaN confidences), canvas writes and the full rank order.
//! Step-level parity of `GpuStepper` against the CPU is in tests/gpu_step_parity.rs.
//! Logits are f32 (what the LM head GEMM writes), so they are uploaded as f32. Outputs are
//! poisoned before every launch and checked to be fully written. Skips without a GPU.
#![cfg(feature = "cuda")]

mod common;

use common::policies;
use demask::decode::policy::{rank, ConfKind, Policy, StepCtx};
use demask::decode::sampling::{candidate, filter_cutoff, row_stats, ConfDist, RngKey, Sampling};
use demask::gpu::{test_gpu, DTensor, Gpu, Timer};
use demask::ops::commit::{commit, parse_commits, CommitWs, SeqCommitParams};
use demask::decode::gpu::{commit_rule, count_ctx};
use demask::ops::confidence::{confidence, ConfidenceWs, SlotParams};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

const KINDS: [ConfKind; 4] = [ConfKind::Prob, ConfKind::Margin, ConfKind::NegEntropy, ConfKind::Random];
const TOKEN_POISON: u32 = 0xFFFF_FFFF;

/// `rows` logits rows of `vocab` entries with a realistic spread: N(0, σ²) with σ in [1.5, 4],
/// and in every other row one token boosted by 5-15 (a confident prediction).
fn logits_rows(rng: &mut StdRng, rows: usize, vocab: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows * vocab);
    for r in 0..rows {
        let sigma = rng.gen_range(1.5f32..4.0);
        let d = Normal::new(0.0f32, sigma).unwrap();
        let start = out.len();
        out.extend((0..vocab).map(|_| d.sample(rng)));
        if r % 2 == 1 {
            let v = rng.gen_range(0..vocab);
            out[start + v] += rng.gen_range(5.0f32..15.0);
        }
    }
    out
}

/// Plants an exact tie for the maximum at two ids of `row`, returns the lower one.
fn plant_max_tie(rng: &mut StdRng, row: &mut [f32]) -> u32 {
    let mx = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) + 1.0;
    let a = rng.gen_range(0..row.len() / 2);
    let b = rng.gen_range(row.len() / 2..row.len());
    row[a] = mx;
    row[b] = mx;
    a as u32
}

struct ConfOut {
    tokens: Vec<u32>,
    conf: Vec<f32>,
}

/// Uploads `slots`, runs the confidence kernels, downloads (poisoned outputs first).
fn run_conf(
    gpu: &Gpu,
    logits: &DTensor<f32>,
    rows: usize,
    vocab: usize,
    slots: &[SlotParams],
    splits: Option<usize>,
) -> ConfOut {
    let n = slots.len();
    let mut ws = ConfidenceWs::new(gpu, n).unwrap();
    ws.splits = splits;
    ws.set_slots(gpu, slots, vocab).unwrap();
    let mut tokens = gpu.upload(&vec![TOKEN_POISON; n], &[n]).unwrap();
    let mut conf = gpu.upload(&vec![f32::NAN; n], &[n]).unwrap();
    confidence(gpu, logits, rows, &mut ws, &mut tokens, &mut conf).unwrap();
    let out = ConfOut {
        tokens: tokens.to_host(gpu).unwrap(),
        conf: conf.to_host(gpu).unwrap(),
    };
    for (i, &t) in out.tokens.iter().enumerate() {
        assert!(
            (t as usize) < vocab,
            "slot {i}: token {t:#x} not written or out of range"
        );
    }
    out
}

fn key_of(i: usize, step: u32) -> RngKey {
    RngKey {
        seed: 0x5EED_0000_0000_0001 ^ (i as u64).wrapping_mul(0x9E37_79B9),
        seq: (i % 3) as u32,
        step,
        slot: (i * 5 + 1) as u32,
    }
}

/// conf within atol + rtol·|want| (atol 1e-7 covers margins of near-flat rows, where p1 and p2
/// are both ~1e-5 and the f32 rounding of each dominates).
fn conf_close(got: f32, want: f32, kind: ConfKind) -> bool {
    if kind == ConfKind::Random {
        return got.to_bits() == want.to_bits();
    }
    let (atol, rtol) = (1e-7f32, 1e-5f32);
    (got - want).abs() <= atol + rtol * want.abs()
}

/// (a) T = 0: tokens equal (ties → lowest id), conf within tolerance, every kind.
#[test]
fn confidence_argmax_matches_cpu() {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = StdRng::seed_from_u64(11);
    for &(vocab, rows) in &[(126464usize, 19usize), (152064, 11), (1000, 99), (513, 111)] {
        let mut logits = logits_rows(&mut rng, rows, vocab);
        let tie_row = rows / 2;
        let tie_id = plant_max_tie(&mut rng, &mut logits[tie_row * vocab..(tie_row + 1) * vocab]);
        // A row whose logits sit on a 0.25 grid: many exact ties, also for the second max.
        let grid_row = rows - 1;
        for l in &mut logits[grid_row * vocab..(grid_row + 1) * vocab] {
            *l = (*l * 4.0).round() / 4.0;
        }
        let dl = gpu.upload(&logits, &[rows, vocab]).unwrap();
        let s = Sampling::default();
        let mut slots = Vec::new();
        let mut want = Vec::new();
        for i in 0..rows * 4 {
            let row = (i * 7) % rows;
            let kind = KINDS[i % 4];
            let key = key_of(i, 3);
            slots.push(SlotParams::new(row as u32, kind, &s, key));
            want.push((
                row,
                kind,
                candidate(&logits[row * vocab..(row + 1) * vocab], &s, kind, key, ConfDist::Raw),
            ));
        }
        for splits in [None, Some(1), Some(7)] {
            let got = run_conf(&gpu, &dl, rows, vocab, &slots, splits);
            let mut bad = Vec::new();
            for (i, &(row, kind, (wt, wc))) in want.iter().enumerate() {
                if got.tokens[i] != wt || !conf_close(got.conf[i], wc, kind) {
                    bad.push((i, row, kind, got.tokens[i], wt, got.conf[i], wc));
                }
                if row == tie_row {
                    assert_eq!(got.tokens[i], tie_id, "planted tie: lowest id wins");
                }
            }
            for b in bad.iter().take(8) {
                eprintln!(
                    "vocab {vocab} splits {splits:?}: slot {} row {} {:?}: token got {} want {}, conf got {} want {}",
                    b.0, b.1, b.2, b.3, b.4, b.5, b.6
                );
            }
            assert!(
                bad.is_empty(),
                "vocab {vocab} splits {splits:?}: {} of {} slots differ",
                bad.len(),
                want.len()
            );
        }
        eprintln!(
            "confidence argmax vocab {vocab}: {} slots ok (3 split settings)",
            want.len()
        );
    }
}

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

/// (c) The commit kernel vs Policy::select on random confidences: exact ties (values on a
/// 1/16 grid), confidences exactly at τ, NaN, counts 1..1500 (more than one ranking tile).
#[test]
fn commit_matches_policy_select() {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = StdRng::seed_from_u64(14);
    let stride = 4096usize;
    let counts = [1usize, 2, 7, 19, 32, 99, 111, 1500, 3, 64];
    for policy in policies() {
        let n_seqs = 23;
        let mut seqs = Vec::new();
        let mut positions = Vec::new();
        let mut tokens = Vec::new();
        let mut conf = Vec::new();
        let mut want = Vec::new();
        let mut ranked_want = Vec::new();
        for si in 0..n_seqs {
            let n = counts[si % counts.len()];
            let mut pos: Vec<u32> = (0..stride as u32)
                .collect::<Vec<_>>()
                .choose_multiple(&mut rng, n)
                .cloned()
                .collect();
            pos.sort();
            let c: Vec<f32> = (0..n)
                .map(|j| match (si + j) % 5 {
                    0 => (rng.gen_range(0..17) as f32) / 16.0, // exact ties
                    1 => match policy {
                        Policy::Threshold { tau } | Policy::Confident { tau, .. } => tau,
                        _ => 0.75,
                    },
                    2 if j % 7 == 3 => f32::NAN,
                    _ => rng.gen_range(0.0f32..1.0),
                })
                .collect();
            let steps = policy.steps().unwrap_or(4).max(1);
            let step = rng.gen_range(0..steps + 1);
            let ctx = StepCtx {
                step,
                block_masked: n as u32 + rng.gen_range(0..20),
                masked: n as u32,
                block_len: n as u32 + 20,
            };
            let eligible: Vec<(u32, f32)> = pos.iter().cloned().zip(c.iter().cloned()).collect();
            let toks: Vec<u32> = (0..n).map(|_| rng.gen_range(0..152064)).collect();
            let sel = policy.select(ctx, &eligible);
            let tok_of = |p: u32| toks[pos.iter().position(|&q| q == p).unwrap()];
            want.push(sel.iter().map(|&p| (p, tok_of(p))).collect::<Vec<_>>());
            let mut ranked = eligible.clone();
            rank(&mut ranked);
            ranked_want.push(ranked.iter().map(|&(p, _)| (p, tok_of(p))).collect::<Vec<_>>());
            seqs.push(SeqCommitParams::new(commit_rule(&policy).unwrap(), count_ctx(ctx), positions.len(), n, n_seqs - 1 - si));
            positions.extend_from_slice(&pos);
            tokens.extend_from_slice(&toks);
            conf.extend_from_slice(&c);
        }
        let n_slots = positions.len();
        let mut ws = CommitWs::new(&gpu, n_seqs, n_slots).unwrap();
        ws.set_seqs(&gpu, &seqs, &positions, stride).unwrap();
        let dt = gpu.upload(&tokens, &[n_slots]).unwrap();
        let dc = gpu.upload(&conf, &[n_slots]).unwrap();
        let canvas0: Vec<u32> = (0..n_seqs * stride).map(|_| rng.gen_range(0..126464)).collect();
        let mut canvas = gpu.upload(&canvas0, &[n_seqs, stride]).unwrap();
        let out_len = ws.out_len();
        let mut out = gpu.upload(&vec![TOKEN_POISON; out_len], &[out_len]).unwrap();
        commit(&gpu, &mut ws, &dt, &dc, &mut canvas, &mut out).unwrap();
        let host = out.to_host(&gpu).unwrap();
        assert!(
            host.iter().all(|&x| x != TOKEN_POISON),
            "{policy}: part of the output was not written"
        );
        let lists = parse_commits(&host, &seqs).unwrap();
        let mut expect_canvas = canvas0.clone();
        for si in 0..n_seqs {
            let row = n_seqs - 1 - si;
            let got: Vec<(u32, u32)> = lists[si].iter().map(|c| (c.pos, c.token)).collect();
            assert_eq!(
                got, want[si],
                "{policy}: sequence {si} ({} slots) commits differ",
                seqs[si].slot_count
            );
            let base = n_seqs + 2 * seqs[si].slot_offset as usize;
            let full: Vec<(u32, u32)> = host[base..base + 2 * seqs[si].slot_count as usize]
                .chunks(2)
                .map(|c| (c[0], c[1]))
                .collect();
            assert_eq!(
                full, ranked_want[si],
                "{policy}: sequence {si}: full rank order differs"
            );
            for &(p, t) in &want[si] {
                expect_canvas[row * stride + p as usize] = t;
            }
        }
        let got_canvas = canvas.to_host(&gpu).unwrap();
        let diff = (0..got_canvas.len())
            .filter(|&i| got_canvas[i] != expect_canvas[i])
            .count();
        assert_eq!(
            diff, 0,
            "{policy}: {diff} canvas entries differ (committed slots written, others untouched)"
        );
        eprintln!("commit {policy}: {n_seqs} sequences, {n_slots} slots ok");
    }
}

/// Bad input is refused on the host before any launch.
#[test]
fn commit_and_confidence_reject_bad_input() {
    let Some(gpu) = test_gpu() else { return };
    let mut ws = CommitWs::new(&gpu, 2, 8).unwrap();
    let p = Policy::Threshold { tau: 0.9 };
    let ctx = StepCtx {
        step: 0,
        block_masked: 2,
        masked: 2,
        block_len: 2,
    };
    let seqs = [SeqCommitParams::new(commit_rule(&p).unwrap(), count_ctx(ctx), 0, 2, 0)];
    assert!(ws.set_seqs(&gpu, &seqs, &[5, 5], 16).is_err(), "duplicate positions");
    assert!(
        ws.set_seqs(&gpu, &seqs, &[3, 16], 16).is_err(),
        "position past the canvas stride"
    );
    assert!(ws.set_seqs(&gpu, &seqs, &[3, 4, 5], 16).is_err(), "slots not covered");
    let mut cw = ConfidenceWs::new(&gpu, 2).unwrap();
    let s = Sampling::default();
    let key = RngKey {
        seed: 1,
        seq: 0,
        step: 0,
        slot: 0,
    };
    cw.set_slots(&gpu, &[SlotParams::new(3, ConfKind::Prob, &s, key)], 100)
        .unwrap();
    let logits = gpu.upload(&vec![0.5f32; 200], &[2, 100]).unwrap();
    let mut t = gpu.alloc::<u32>(&[2]).unwrap();
    let mut c = gpu.alloc::<f32>(&[2]).unwrap();
    assert!(
        confidence(&gpu, &logits, 2, &mut cw, &mut t, &mut c).is_err(),
        "logit row 3 of 2"
    );
    assert!(
        cw.set_slots(&gpu, &[SlotParams::new(0, ConfKind::Prob, &s, key); 3], 100)
            .is_err(),
        "too many slots"
    );
}

/// Queues ~5 ms of memsets so the host can enqueue the timed launches ahead of the GPU.
fn head_start(gpu: &Gpu, busy: &mut DTensor<u8>) {
    for _ in 0..10 {
        gpu.stream.memset_zeros(&mut busy.buf).unwrap();
    }
}

/// Throughput at T = 0: 32 rows of 126464 f32 logits (the LLaDA-8B vocab). Prints µs per launch
/// and the achieved read bandwidth (target: near the ~3 TB/s of an H100, ≈ 10 µs).
#[test]
fn confidence_throughput() {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = StdRng::seed_from_u64(15);
    let mut busy = gpu.alloc::<u8>(&[1 << 30]).unwrap();
    for &(rows, vocab) in &[(32usize, 126464usize), (1, 126464), (256, 126464), (32, 152064)] {
        let logits = logits_rows(&mut rng, rows, vocab);
        let dl = gpu.upload(&logits, &[rows, vocab]).unwrap();
        let s = Sampling::default();
        let slots: Vec<SlotParams> = (0..rows)
            .map(|r| SlotParams::new(r as u32, ConfKind::Prob, &s, key_of(r, 0)))
            .collect();
        let mut ws = ConfidenceWs::new(&gpu, rows).unwrap();
        ws.set_slots(&gpu, &slots, vocab).unwrap();
        let mut tokens = gpu.alloc::<u32>(&[rows]).unwrap();
        let mut conf = gpu.alloc::<f32>(&[rows]).unwrap();
        for _ in 0..5 {
            confidence(&gpu, &dl, rows, &mut ws, &mut tokens, &mut conf).unwrap();
        }
        let iters = 200;
        let timer = Timer::new(&gpu).unwrap();
        // Keep the GPU busy for a few ms first so the launches queue up and the events time
        // the kernels, not the host's launch rate.
        head_start(&gpu, &mut busy);
        timer.start(&gpu).unwrap();
        for _ in 0..iters {
            confidence(&gpu, &dl, rows, &mut ws, &mut tokens, &mut conf).unwrap();
        }
        let ms = timer.stop_ms(&gpu).unwrap() as f64 / iters as f64;
        let gbs = (rows * vocab * 4) as f64 / (ms * 1e-3) / 1e9;
        eprintln!(
            "confidence_f32 T=0 {rows}x{vocab}: {:.2} µs, {gbs:.0} GB/s (default splits)",
            ms * 1e3
        );
        if std::env::var("DEMASK_SWEEP_SPLITS").is_ok_and(|v| v == "1") {
            for splits in [1usize, 2, 4, 6, 8, 12, 16, 24, 32] {
                ws.splits = Some(splits);
                head_start(&gpu, &mut busy);
                timer.start(&gpu).unwrap();
                for _ in 0..iters {
                    confidence(&gpu, &dl, rows, &mut ws, &mut tokens, &mut conf).unwrap();
                }
                let ms = timer.stop_ms(&gpu).unwrap() as f64 / iters as f64;
                eprintln!("  splits {splits}: {:.2} µs", ms * 1e3);
            }
            ws.splits = None;
        }
        let st: Vec<u32> = (0..rows)
            .map(|r| row_stats(&logits[r * vocab..(r + 1) * vocab]).argmax)
            .collect();
        assert_eq!(tokens.to_host(&gpu).unwrap(), st, "argmax after the timing loop");
    }
}
