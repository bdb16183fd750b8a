//! The mask-token exclusion fused into the confidence kernels (`ConfidenceWs::set_exclude_token`)
//! against the two-launch path it replaces (`set_column(logits, rows, mask, MASK_LOGIT)`, then
//! `confidence` with no exclusion): candidate tokens and confidences must be equal bit for bit,
//! for greedy slots of every confidence kind and for sampled slots with and without top-k /
//! top-p, on rows where the mask column is the argmax (so the exclusion decides the
//! candidate), and with the excluded column in the scalar head, the 16-byte body and the scalar
//! tail of a row, under several block splits. The fused path must leave the logits unchanged.
//! Outputs are poisoned before every launch. Skips without a GPU (see `test_gpu`).
#![cfg(feature = "cuda")]

use demask::decode::cpu::MASK_LOGIT;
use demask::decode::policy::ConfKind;
use demask::decode::sampling::{RngKey, Sampling};
use demask::gpu::{test_gpu, DTensor, Gpu};
use demask::ops::confidence::{confidence, set_column, ConfidenceWs, SlotParams};
use demask::Error;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

const KINDS: [ConfKind; 4] = [
    ConfKind::Prob,
    ConfKind::Margin,
    ConfKind::NegEntropy,
    ConfKind::Random,
];
const TOKEN_POISON: u32 = 0xFFFF_FFFF;

/// `rows` rows of N(0, σ²) logits (σ in [1.5, 4]); every other row has one token boosted by
/// 5-15, and every third row has the `mask` column boosted above the row's maximum by 2-12 (the
/// argmax, and most of the probability mass, sit on the excluded column).
fn logits_rows(rng: &mut StdRng, rows: usize, vocab: usize, mask: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows * vocab);
    for r in 0..rows {
        let d = Normal::new(0.0f32, rng.gen_range(1.5f32..4.0)).unwrap();
        let start = out.len();
        out.extend((0..vocab).map(|_| d.sample(rng)));
        let row = &mut out[start..];
        if r % 2 == 1 {
            let v = rng.gen_range(0..vocab);
            row[v] += rng.gen_range(5.0f32..15.0);
        }
        if r % 3 == 0 {
            let mx = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            row[mask] = mx + rng.gen_range(2.0f32..12.0);
        }
    }
    out
}

fn key_of(i: usize) -> RngKey {
    RngKey {
        seed: 0xC0FF_EE00_0000_0007 ^ (i as u64).wrapping_mul(0x9E37_79B9),
        seq: (i % 5) as u32,
        step: 9,
        slot: (i * 3 + 2) as u32,
    }
}

/// Slots over every row: greedy slots of every kind, then sampled slots (T in {0.7, 1, 1.5})
/// with no filter, top-k (1, 5, 50), top-p (0.5, 0.9) and both.
fn slots_for(rows: usize) -> Vec<SlotParams> {
    let sampled = [
        (1.0, 0, 1.0),
        (0.7, 1, 1.0),
        (1.0, 5, 1.0),
        (1.5, 50, 1.0),
        (1.0, 0, 0.5),
        (0.7, 0, 0.9),
        (1.0, 50, 0.9),
    ];
    let mut slots = Vec::new();
    for r in 0..rows {
        for kind in KINDS {
            slots.push(SlotParams::new(
                r as u32,
                kind,
                &Sampling::default(),
                key_of(slots.len()),
            ));
        }
        for (j, &(temperature, top_k, top_p)) in sampled.iter().enumerate() {
            let s = Sampling {
                temperature,
                top_k,
                top_p,
            };
            let kind = KINDS[(r + j) % 4];
            slots.push(SlotParams::new(r as u32, kind, &s, key_of(slots.len())));
        }
    }
    slots
}

/// Runs the confidence kernels over `logits` with `exclude`; (tokens, conf bits).
fn run(
    gpu: &Gpu,
    logits: &DTensor<f32>,
    rows: usize,
    vocab: usize,
    slots: &[SlotParams],
    splits: Option<usize>,
    exclude: Option<u32>,
) -> (Vec<u32>, Vec<u32>) {
    let n = slots.len();
    let mut ws = ConfidenceWs::new(gpu, n).unwrap();
    ws.splits = splits;
    ws.set_slots(gpu, slots, vocab).unwrap();
    ws.set_exclude_token(exclude);
    let mut tokens = gpu.upload(&vec![TOKEN_POISON; n], &[n]).unwrap();
    let mut conf = gpu.upload(&vec![f32::NAN; n], &[n]).unwrap();
    confidence(gpu, logits, rows, &mut ws, &mut tokens, &mut conf).unwrap();
    let tokens = tokens.to_host(gpu).unwrap();
    let conf = conf.to_host(gpu).unwrap();
    for (i, &t) in tokens.iter().enumerate() {
        assert!(
            (t as usize) < vocab,
            "slot {i}: token {t:#x} not written or out of range"
        );
    }
    (tokens, conf.iter().map(|c| c.to_bits()).collect())
}

#[test]
fn fused_exclusion_matches_set_column() {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = StdRng::seed_from_u64(41);
    // (vocab, rows, excluded ids): LLaDA and Dream with their mask ids; 513 (rows start at
    // every alignment, so ids 0-2 fall in the scalar head of some rows and 512 in the tail of
    // others); 1000 with an id in the body.
    let cases: [(usize, usize, &[usize]); 4] = [
        (126464, 19, &[126336]),
        (152064, 11, &[151666]),
        (513, 111, &[0, 1, 2, 257, 512]),
        (1000, 99, &[999, 3, 500]),
    ];
    for (vocab, rows, masks) in cases {
        // Sanitizer scale (`gpu::sanitizer_shapes`): 3 rows of the production vocabularies.
        let rows = if demask::gpu::sanitizer_shapes() && vocab > 100_000 { rows.min(3) } else { rows };
        let slots = slots_for(rows);
        for &mask in masks {
            let host = logits_rows(&mut rng, rows, vocab, mask);
            // Path A: the column written first, no exclusion in the kernels.
            let mut la = gpu.upload(&host, &[rows, vocab]).unwrap();
            set_column(&gpu, &mut la, rows, mask, MASK_LOGIT).unwrap();
            // Path B: untouched logits, the column excluded inside the kernels.
            let lb = gpu.upload(&host, &[rows, vocab]).unwrap();
            for splits in [None, Some(1), Some(7), Some(32)] {
                let what = format!("vocab {vocab} rows {rows} mask {mask} splits {splits:?}");
                let (ta, ca) = run(&gpu, &la, rows, vocab, &slots, splits, None);
                let (tb, cb) = run(&gpu, &lb, rows, vocab, &slots, splits, Some(mask as u32));
                let bad: Vec<usize> = (0..slots.len())
                    .filter(|&i| ta[i] != tb[i] || ca[i] != cb[i])
                    .collect();
                for &i in bad.iter().take(8) {
                    eprintln!(
                        "{what}: slot {i} {:?}: set_column ({}, {}) fused ({}, {})",
                        slots[i],
                        ta[i],
                        f32::from_bits(ca[i]),
                        tb[i],
                        f32::from_bits(cb[i])
                    );
                }
                assert!(
                    bad.is_empty(),
                    "{what}: {} of {} slots differ",
                    bad.len(),
                    slots.len()
                );
                assert!(
                    !tb.contains(&(mask as u32)),
                    "{what}: the excluded token was chosen"
                );
            }
            // Rows where the mask column was the argmax: the exclusion changed the greedy pick.
            let r0 = &host[..vocab];
            let argmax = (0..vocab).fold(0, |b, v| if r0[v] > r0[b] { v } else { b });
            assert_eq!(
                argmax, mask,
                "row 0 should have its argmax on the mask column"
            );
            // The fused path reads the logits and never writes them.
            let back = lb.to_host(&gpu).unwrap();
            assert!(
                back.iter()
                    .zip(&host)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "vocab {vocab} mask {mask}: the fused path modified the logits"
            );
            eprintln!(
                "vocab {vocab} rows {rows} mask {mask}: {} slots equal on both paths",
                slots.len()
            );
        }
    }
}

#[test]
fn exclude_token_out_of_range_is_refused() {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = StdRng::seed_from_u64(42);
    let (vocab, rows) = (1000usize, 3usize);
    let logits = gpu
        .upload(&logits_rows(&mut rng, rows, vocab, 7), &[rows, vocab])
        .unwrap();
    let slots = slots_for(rows);
    let mut ws = ConfidenceWs::new(&gpu, slots.len()).unwrap();
    ws.set_slots(&gpu, &slots, vocab).unwrap();
    ws.set_exclude_token(Some(vocab as u32));
    let mut tokens = gpu
        .upload(&vec![TOKEN_POISON; slots.len()], &[slots.len()])
        .unwrap();
    let mut conf = gpu
        .upload(&vec![f32::NAN; slots.len()], &[slots.len()])
        .unwrap();
    let e = confidence(&gpu, &logits, rows, &mut ws, &mut tokens, &mut conf).unwrap_err();
    assert!(matches!(e, Error::BadInput(_)), "{e}");
    // Nothing was launched: the outputs keep their poison.
    assert!(tokens
        .to_host(&gpu)
        .unwrap()
        .iter()
        .all(|&t| t == TOKEN_POISON));
    ws.set_exclude_token(Some(vocab as u32 - 1));
    confidence(&gpu, &logits, rows, &mut ws, &mut tokens, &mut conf).unwrap();
    assert!(tokens
        .to_host(&gpu)
        .unwrap()
        .iter()
        .all(|&t| (t as usize) < vocab - 1));
}
