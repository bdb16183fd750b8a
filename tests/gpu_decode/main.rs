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
//! Layout: the shared helpers and (a)'s argmax, bad-input and throughput tests here, (a)'s
//! sampling and (b) in `sampling`, (c) in `commit`.
#![cfg(feature = "cuda")]

#[path = "../common/mod.rs"]
mod common;
mod commit;
mod sampling;

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
