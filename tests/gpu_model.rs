//! Whole-model logits: the GPU forward (bf16, f32 accumulate) vs the CPU reference (f32) on the
//! dense tiny presets (LLaDA, Dream; LLaDA-MoE: tests/gpu_moe_model.rs), full canvases of several
//! sequences in one varlen batch, and a forward whose live rows are a subset (the rest read from
//! the KV cache written by an earlier forward).
#![cfg(feature = "cuda")]
use demask::batch::{RowBatch, SeqSpan};
use demask::checkpoint::random_weights;
use demask::config::ModelConfig;
use demask::cpu::forward::CpuModel;
use demask::gpu::test_gpu;
use demask::model::{Capacity, GpuModel, GpuWeights};

/// Worst |gpu − cpu| / max|cpu| per row; top-1 agreement on rows whose CPU top-2 gap exceeds
/// `gap`; rows inside the gap are near-ties and only counted.
struct Cmp {
    worst_rel: f32,
    disagree: usize,
    near_ties: usize,
    rows: usize,
}

fn compare(gpu: &[f32], cpu: &[f32], vocab: usize, gap: f32) -> Cmp {
    let mut c = Cmp { worst_rel: 0.0, disagree: 0, near_ties: 0, rows: cpu.len() / vocab };
    for (g, r) in gpu.chunks(vocab).zip(cpu.chunks(vocab)) {
        let scale = r.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = g.iter().zip(r).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(g.iter().all(|v| v.is_finite()), "non-finite GPU logits");
        c.worst_rel = c.worst_rel.max(err / scale);
        let am = |v: &[f32]| v.iter().enumerate().fold((0usize, f32::NEG_INFINITY), |b, (i, &x)| if x > b.1 { (i, x) } else { b });
        let (ri, rv) = am(r);
        let second = r.iter().enumerate().filter(|&(i, _)| i != ri).fold(f32::NEG_INFINITY, |m, (_, &x)| m.max(x));
        if rv - second <= gap {
            c.near_ties += 1;
        } else if am(g).0 != ri {
            c.disagree += 1;
        }
    }
    c
}

/// bf16 forward vs f32 reference: relative logits error budget and the top-2 gap below which
/// a row counts as a near-tie (absolute logit units; tiny-model logits have std ≈ 1).
const REL_TOL: f32 = 3e-2;
const TIE_GAP: f32 = 0.05;

fn run_preset(name: &str, seed: u64) {
    let Some(gpu) = test_gpu() else { return };
    let cfg = ModelConfig::preset(name).unwrap();
    let hw = random_weights(&cfg, seed);
    let cpu = CpuModel::new(&hw).unwrap();
    let seqs: Vec<Vec<u32>> = [37usize, 1, 99, 64]
        .iter()
        .enumerate()
        .map(|(i, &n)| demask::bench::synthetic_tokens(n, cfg.vocab, seed + i as u64))
        .collect();
    let total: usize = seqs.iter().map(|s| s.len()).sum();
    let cap = Capacity { rows: total, logit_rows: total, cache_rows: total + 64, seqs: seqs.len() };
    let mut model = GpuModel::new(gpu.clone(), cfg.clone(), GpuWeights::upload(&gpu, &hw).unwrap(), cap).unwrap();
    let want = cpu.forward_full(&seqs).unwrap();
    let got = model.forward_full(&seqs).unwrap();
    let c = compare(&got, &want, cfg.vocab, TIE_GAP);
    println!(
        "{name}: full canvas, {} rows: worst relative logits error {:.3e} (tol {REL_TOL}), top-1 disagreements {} (near-ties excluded: {})",
        c.rows, c.worst_rel, c.disagree, c.near_ties
    );
    assert!(c.worst_rel <= REL_TOL, "{name}: relative logits error {} > {REL_TOL}", c.worst_rel);
    assert_eq!(c.disagree, 0, "{name}: top-1 disagreements outside near-ties");

    // Cached rows: after the full forward, recompute only some rows of sequence 2 (others read
    // from the cache) with logits for a subset: must equal the full forward's rows, since no
    // input changed.
    let s = &seqs[2];
    let live: Vec<u32> = (0..s.len() as u32).filter(|p| p % 3 == 1).collect();
    let b = RowBatch {
        tokens: live.iter().map(|&p| s[p as usize]).collect(),
        positions: live.clone(),
        seqs: vec![SeqSpan { row_start: 0, row_count: live.len() as u32, cache_base: 38, kv_len: s.len() as u32 }],
        logit_rows: (0..live.len() as u32).rev().collect(),
    };
    model.forward(&b).unwrap();
    let got = model.logits_to_host().unwrap();
    let v = cfg.vocab;
    let base = 38usize; // rows of sequence 2 start after 37 + 1 rows
    let mut want_rows = Vec::new();
    for &r in &b.logit_rows {
        let p = live[r as usize] as usize;
        want_rows.extend_from_slice(&want[(base + p) * v..(base + p + 1) * v]);
    }
    let c = compare(&got, &want_rows, v, TIE_GAP);
    println!("{name}: partial live rows ({} of {}), cached K/V: worst relative error {:.3e}, disagreements {} (near-ties {})", live.len(), s.len(), c.worst_rel, c.disagree, c.near_ties);
    assert!(c.worst_rel <= REL_TOL);
    assert_eq!(c.disagree, 0);
}

#[test]
fn tiny_llada_gpu_matches_cpu() {
    run_preset("tiny-llada", 3);
}

#[test]
fn tiny_dream_gpu_matches_cpu() {
    run_preset("tiny-dream", 5);
}

#[test]
fn bad_token_id_is_refused_before_launch() {
    let Some(gpu) = test_gpu() else { return };
    let cfg = ModelConfig::preset("tiny-llada").unwrap();
    let hw = random_weights(&cfg, 1);
    let cap = Capacity { rows: 8, logit_rows: 8, cache_rows: 8, seqs: 1 };
    let mut model = GpuModel::new(gpu.clone(), cfg.clone(), GpuWeights::upload(&gpu, &hw).unwrap(), cap).unwrap();
    let e = model.forward_full(&[vec![1, 2, cfg.vocab as u32]]).unwrap_err().to_string();
    assert!(e.contains("token id"), "{e}");
    let e = model.forward_full(&[vec![1; 9]]).unwrap_err().to_string();
    assert!(e.contains("live rows"), "{e}");
}

/// The L2 prefetch is a hint: every setting gives bit-identical logits, eager, captured and
/// replayed, for bf16 and FP8 weights, with the budgets cut so that each path of the plan runs
/// (whole regions, the head of gate|up, a spread share, the next layer's QKV; in line and on
/// the side branch).
#[test]
fn l2_prefetch_changes_no_result() {
    use demask::ops::prefetch::L2Prefetch;
    use demask::quant::{ScaleLayout, WeightFormat};
    let Some(gpu) = test_gpu() else { return };
    let cfg = ModelConfig::preset("tiny-llada").unwrap();
    let hw = random_weights(&cfg, 11);
    let (h, ffn) = (cfg.hidden, cfg.dense_ffn());
    for format in [WeightFormat::Bf16, WeightFormat::Fp8(ScaleLayout::Channel)] {
        let byte = if format == WeightFormat::Bf16 { 2 } else { 1 };
        let (o, gu) = (h * h * byte, 2 * ffn * h * byte);
        let settings = [
            L2Prefetch::OFF,
            L2Prefetch { after_qkv: 1 << 30, spread: false, after_down: 1 << 30, side: false },
            L2Prefetch { after_qkv: o + gu / 3, spread: false, after_down: 0, side: false },
            L2Prefetch { after_qkv: o + gu / 3, spread: true, after_down: cfg.qkv_dim() * h * byte / 2, side: false },
            L2Prefetch { after_qkv: o + gu / 3, spread: true, after_down: cfg.qkv_dim() * h * byte / 2, side: true },
            L2Prefetch { after_qkv: 1 << 30, spread: false, after_down: 0, side: true },
        ];
        let seqs: Vec<Vec<u32>> = (0..2).map(|i| demask::bench::synthetic_tokens(48, cfg.vocab, 20 + i)).collect();
        let cap = Capacity { rows: 96, logit_rows: 96, cache_rows: 96, seqs: 2 };
        let mut model = GpuModel::new(gpu.clone(), cfg.clone(), GpuWeights::upload_as(&gpu, &hw, format).unwrap(), cap).unwrap();
        model.forward_full(&seqs).unwrap();
        // A decode step: 16 live rows of each sequence over its cached 48.
        let live: Vec<u32> = (16..32).collect();
        let b = RowBatch {
            tokens: (0..2).flat_map(|s| live.iter().map(move |&p| p + 7 * s)).collect(),
            positions: live.iter().chain(&live).copied().collect(),
            seqs: vec![
                SeqSpan { row_start: 0, row_count: 16, cache_base: 0, kv_len: 48 },
                SeqSpan { row_start: 16, row_count: 16, cache_base: 48, kv_len: 48 },
            ],
            logit_rows: (0..32).collect(),
        };
        let mut want: Option<Vec<f32>> = None;
        for p in settings {
            model.set_l2_prefetch(p).unwrap();
            assert_eq!(model.l2_prefetch(), p);
            // Eager, captured, replayed (graphs on by default).
            for pass in 0..3 {
                model.forward(&b).unwrap();
                let got = model.logits_to_host().unwrap();
                assert!(got.iter().all(|v| v.is_finite()), "{format:?} {p}: non-finite logits");
                match &want {
                    None => want = Some(got),
                    Some(w) => {
                        let same = w.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "{format:?}, prefetch {p:?}, pass {pass}: logits differ from the forward without prefetch");
                    }
                }
            }
        }
        let (captures, replays, _) = model.graph_stats();
        assert!(captures >= 4 && replays >= 4, "{format:?}: {captures} captures, {replays} replays");
        println!("{format:?}: {} settings × eager/captured/replayed, logits bit-identical", settings.len());
    }
}
