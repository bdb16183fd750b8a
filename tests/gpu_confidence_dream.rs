//! Dream's confidences on the GPU (`SlotParams::with_dist(ConfDist::Filtered)`): logits scaled
//! by 1/T, top-p / top-k applied at every temperature (Dream's default top-k 50 included), the
//! candidate and its confidence taken from the renormalised survivors. Checked against the CPU
//! reference `sampling::candidate(.., ConfDist::Filtered)` on random rows (N(0, σ²), some with a
//! boosted token, one on a 0.5 grid for ties at the cut-off), with the mask column excluded,
//! every confidence kind, several splits: greedy slots must give the same token and a confidence
//! within tolerance; sampled slots the same token unless the two Gumbel scores agree to 1e-12.
//! Skips without a GPU (see `test_gpu`).
#![cfg(feature = "cuda")]

use demask::decode::cpu::MASK_LOGIT;
use demask::decode::policy::ConfKind;
use demask::decode::sampling::{candidate, ConfDist, RngKey, Sampling};
use demask::gpu::{test_gpu, DTensor, Gpu};
use demask::ops::confidence::{confidence, ConfidenceWs, SlotParams};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

const KINDS: [ConfKind; 3] = [ConfKind::Prob, ConfKind::Margin, ConfKind::NegEntropy];

fn logits_rows(rng: &mut StdRng, rows: usize, vocab: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows * vocab);
    for r in 0..rows {
        let d = Normal::new(0.0f32, rng.gen_range(1.0f32..5.0)).unwrap();
        let start = out.len();
        out.extend((0..vocab).map(|_| d.sample(rng)));
        let row = &mut out[start..];
        if r % 2 == 1 {
            let v = rng.gen_range(0..vocab);
            row[v] += rng.gen_range(3.0f32..12.0);
        }
        if r == 0 {
            for l in row.iter_mut() {
                *l = (*l * 2.0).round() / 2.0;
            }
        }
    }
    out
}

fn key_of(i: usize) -> RngKey {
    RngKey { seed: 0xD4EA_0000_0000_0003 ^ (i as u64).wrapping_mul(0x9E37_79B9), seq: (i % 4) as u32, step: 5, slot: i as u32 }
}

fn run(gpu: &Gpu, logits: &DTensor<f32>, rows: usize, vocab: usize, slots: &[SlotParams], splits: Option<usize>, mask: u32) -> (Vec<u32>, Vec<f32>) {
    let n = slots.len();
    let mut ws = ConfidenceWs::new(gpu, n).unwrap();
    ws.splits = splits;
    ws.set_slots(gpu, slots, vocab).unwrap();
    ws.set_exclude_token(Some(mask));
    let mut tokens = gpu.upload(&vec![u32::MAX; n], &[n]).unwrap();
    let mut conf = gpu.upload(&vec![f32::NAN; n], &[n]).unwrap();
    confidence(gpu, logits, rows, &mut ws, &mut tokens, &mut conf).unwrap();
    (tokens.to_host(gpu).unwrap(), conf.to_host(gpu).unwrap())
}

fn close(got: f32, want: f32) -> bool {
    (got - want).abs() <= 1e-7 + 1e-5 * want.abs()
}

#[test]
fn dream_filtered_confidence_matches_cpu() {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = StdRng::seed_from_u64(77);
    // (temperature, top_k, top_p): Dream's default (T 0, top-k 50), top-p at T 0, both, no
    // filter, and sampled slots (T > 0 scales before the filters).
    let samplings = [(0.0f32, 50u32, 1.0f32), (0.0, 50, 0.9), (0.0, 0, 0.8), (0.0, 0, 1.0), (0.0, 1, 1.0), (0.7, 50, 1.0), (1.3, 0, 0.85), (0.5, 20, 0.95)];
    let (mut greedy, mut sampled, mut exempt) = (0usize, 0usize, 0usize);
    for &(vocab, rows) in &[(152064usize, 7usize), (1000, 23), (513, 31), (384, 19)] {
        let mask = (vocab - 1) as u32;
        let host = logits_rows(&mut rng, rows, vocab);
        let dl = gpu.upload(&host, &[rows, vocab]).unwrap();
        let mut slots = Vec::new();
        let mut want = Vec::new();
        for (si, &(temperature, top_k, top_p)) in samplings.iter().enumerate() {
            let s = Sampling { temperature, top_k, top_p };
            for r in 0..rows {
                let i = slots.len();
                let kind = KINDS[(si + r) % 3];
                let key = key_of(i);
                let mut row = host[r * vocab..(r + 1) * vocab].to_vec();
                row[mask as usize] = MASK_LOGIT;
                want.push((s, kind, candidate(&row, &s, kind, key, ConfDist::Filtered)));
                slots.push(SlotParams::new(r as u32, kind, &s, key).with_dist(ConfDist::Filtered));
            }
        }
        for splits in [None, Some(1), Some(5)] {
            let (tok, conf) = run(&gpu, &dl, rows, vocab, &slots, splits, mask);
            let mut bad = Vec::new();
            for (i, &(s, kind, (wt, wc))) in want.iter().enumerate() {
                if tok[i] != wt {
                    if s.temperature > 0.0 {
                        // A sampled pick may differ only where both scores tie to 1e-12.
                        let r = slots[i].logit_row as usize;
                        let sc = |v: u32| (host[r * vocab + v as usize] / s.temperature) as f64 + key_of(i).gumbel(v);
                        if (sc(tok[i]) - sc(wt)).abs() <= 1e-12 {
                            exempt += 1;
                            continue;
                        }
                    }
                    bad.push(format!("slot {i} {s:?} {kind:?}: token got {} want {wt}", tok[i]));
                } else if !close(conf[i], wc) {
                    bad.push(format!("slot {i} {s:?} {kind:?}: conf got {} want {wc}", conf[i]));
                }
                if tok[i] == mask {
                    bad.push(format!("slot {i}: the mask token was chosen"));
                }
            }
            for b in bad.iter().take(8) {
                eprintln!("vocab {vocab} splits {splits:?}: {b}");
            }
            assert!(bad.is_empty(), "vocab {vocab} splits {splits:?}: {} of {} slots differ", bad.len(), want.len());
        }
        for &(s, _, _) in &want {
            if s.temperature > 0.0 {
                sampled += 3;
            } else {
                greedy += 3;
            }
        }
    }
    eprintln!("dream confidences: {greedy} greedy and {sampled} sampled slot checks equal to the CPU, {exempt} exempt (Gumbel scores within 1e-12)");
    assert!(exempt * 1000 <= sampled, "too many exemptions: {exempt} of {sampled}");
}

/// The filtered distribution differs from the raw one (the test above would pass vacuously if
/// the GPU ignored the flag and the rows were unfiltered): top-k 50 over a flat row of 1000
/// logits must raise the winner's probability well above its raw value.
#[test]
fn dream_filter_changes_the_confidence() {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = StdRng::seed_from_u64(78);
    let (vocab, rows) = (1000usize, 2usize);
    let host = logits_rows(&mut rng, rows, vocab);
    let dl = gpu.upload(&host, &[rows, vocab]).unwrap();
    let s = Sampling { temperature: 0.0, top_k: 50, top_p: 1.0 };
    let raw = SlotParams::new(0, ConfKind::Prob, &s, key_of(0));
    let filtered = raw.with_dist(ConfDist::Filtered);
    let (_, conf) = run(&gpu, &dl, rows, vocab, &[raw, filtered], None, (vocab - 1) as u32);
    assert!(conf[1] > conf[0] * 1.05, "filtered {} vs raw {}", conf[1], conf[0]);
}
