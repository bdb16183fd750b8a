//! The whole model with FP8 weights on the GPU (`--weights fp8` / `fp8-block`), on the tiny
//! presets:
//! - parity: the GPU FP8 forward (W8A16 kernel: a forward of ≤ 64 rows) against the f32 CPU
//!   forward of the same FP8 model (`fp8_fidelity::fake_quant`), to the bf16-vs-f32 budget of
//!   tests/gpu_model.rs; a 201-row forward (channel scales: the W8A8 path, which quantises the
//!   activations too) within the fidelity bounds instead;
//! - fidelity (printed, bounded): GPU FP8 logits against GPU bf16 logits, and per-step commit
//!   agreement of FP8 with bf16 along bf16 decodes (`fp8_fidelity::commit_agreement`);
//! - per layer: the residual stream after every block (`GpuModel::set_layer_capture`), GPU bf16
//!   and GPU FP8 against the f32 CPU forward of the same model, within the parity budget;
//!   capturing leaves the logits bit-identical;
//! - decoding: a batched dual-cache decode (CUDA graphs on) commits every slot and is
//!   deterministic (run twice: identical tokens); alone vs batched is reported, not asserted
//!   (as tests/gpu_batching.rs: the row count picks the kernel tile, hence the reduction order).

use crate::{common, lock};
use demask::config::ModelConfig;
use demask::cpu::forward::{ActQuant, CpuModel};
use demask::decode::cpu::CpuStepper;
use demask::decode::gpu::GpuStepper;
use demask::engine::{Engine, EngineOptions};
use demask::fp8_fidelity::{commit_agreement, compare_layers, compare_logits, fake_quant};
use demask::gpu::test_gpu;
use demask::model::{Capacity, GpuModel, GpuWeights};
use demask::ops::gemm_w8a8::W8a8Select;
use demask::quant::{ScaleLayout, WeightFormat};

const LAYOUTS: [ScaleLayout; 2] = [ScaleLayout::Channel, ScaleLayout::Block128];
/// tests/gpu_model.rs's bf16-vs-f32 budget (relative logits error, near-tie gap).
const REL_TOL: f64 = 3e-2;
const TIE_GAP: f32 = 0.05;

fn seqs(vocab: usize, lens: &[usize]) -> Vec<Vec<u32>> {
    lens.iter().enumerate().map(|(i, &n)| demask::bench::synthetic_tokens(n, vocab.min(500), 70 + i as u64)).collect()
}

/// Logits of a full-canvas forward of `s`. With channel-scaled FP8 weights, `w8a16` keeps
/// every GEMM of up to 64 rows on the W8A16 kernel (`set_w8a8_min_rows(65)`), else every GEMM
/// runs W8A8 (`set_w8a8_min_rows(1)`), whatever the default.
fn gpu_logits(gpu: &std::sync::Arc<demask::gpu::Gpu>, cfg: &ModelConfig, w: GpuWeights, s: &[Vec<u32>], w8a16: bool) -> Vec<f32> {
    let total: usize = s.iter().map(|x| x.len()).sum();
    let cap = Capacity { rows: total, logit_rows: total, cache_rows: total, seqs: s.len() };
    let mut m = GpuModel::new(gpu.clone(), cfg.clone(), w, cap).unwrap();
    if m.w8a8_min_rows().is_some() {
        m.set_w8a8_min_rows(if w8a16 { 65 } else { 1 }).unwrap();
    }
    m.forward_full(s).unwrap()
}

#[test]
fn fp8_forward_matches_the_cpu_fp8_model() {
    // 58 rows (one forward) and 201: with block scales always the W8A16 kernel (in 64-row
    // chunks above 64); with channel scales the W8A16 kernel (58 rows) and the W8A8 path (both),
    // each asked for by `set_w8a8_min_rows`.
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    for preset in common::DENSE_PRESETS {
        let cfg = ModelConfig::preset(preset).unwrap();
        let hw = common::sharp_weights(&cfg, 3);
        for lens in [&[37usize, 1, 20][..], &[37, 1, 99, 64][..]] {
            let s = seqs(cfg.vocab, lens);
            let rows: usize = lens.iter().sum();
            let bf = gpu_logits(&gpu, &cfg, GpuWeights::upload(&gpu, &hw).unwrap(), &s, false);
            for layout in LAYOUTS {
                let (q, _) = fake_quant(&hw, layout).unwrap();
                let want16 = CpuModel::new(&q).unwrap().forward_full(&s).unwrap();
                let paths: &[bool] = match (layout, rows <= 64) {
                    (ScaleLayout::Channel, true) => &[true, false],
                    (ScaleLayout::Channel, false) => &[false],
                    _ => &[true],
                };
                for &w8a16 in paths {
                    let w = GpuWeights::upload_as(&gpu, &hw, WeightFormat::Fp8(layout)).unwrap();
                    assert!(w.bytes() < GpuWeights::upload(&gpu, &hw).unwrap().bytes());
                    let got = gpu_logits(&gpu, &cfg, w, &s, w8a16);
                    let c = compare_logits(&got, &want16, cfg.vocab, TIE_GAP);
                    let path = if w8a16 { "W8A16" } else { "W8A8" };
                    println!(
                        "{preset} {} {path} {rows} rows: GPU FP8 vs CPU f32 W8A16 model: rel L2 {:.3e}, worst row {:.3e}, top-1 {}/{} (near-ties {})",
                        layout.name(),
                        c.rel_l2,
                        c.worst_row_rel,
                        c.top1_agree,
                        c.top1_rows,
                        c.near_ties
                    );
                    if w8a16 {
                        assert!(c.worst_row_rel <= REL_TOL, "{preset} {layout:?} {rows} rows: {c:?}");
                        assert!(c.top1_rows - c.top1_agree <= c.rows.div_ceil(100), "{preset} {layout:?}: {c:?}");
                    } else {
                        // W8A8 (E4M3 activations as well): its own reference, the f32 CPU model
                        // with the inputs of the same linears fake-quantised per row from their
                        // bf16 rounding (as the GPU holds them). The rest of the two forwards
                        // still differs at bf16 level, and a value that close to an E4M3
                        // rounding boundary lands on the other side: with ≈ 2⁻⁹ relative
                        // perturbations against a code step of 2⁻³, several % of the codes
                        // move by one step. Measured on the CPU: rounding the activations to
                        // bf16 before quantising alone moves the W8A8 logits by 4.2-4.3 % (the
                        // first H100 run of this test: GPU vs CPU W8A8 4.35 %). So the bound
                        // is that flip noise plus the bf16 forward's budget; a missing or
                        // wrong scale lands far outside it.
                        let mut w8 = CpuModel::new(&q).unwrap();
                        w8.set_act_quant(ActQuant::Fp8RowBf16);
                        let w8_logits = w8.forward_full(&s).unwrap();
                        w8.set_act_quant(ActQuant::Fp8Row);
                        let flip = compare_logits(&w8.forward_full(&s).unwrap(), &w8_logits, cfg.vocab, TIE_GAP);
                        let a = compare_logits(&got, &w8_logits, cfg.vocab, TIE_GAP);
                        println!(
                            "{preset} {} {path} {rows} rows: GPU FP8 vs CPU f32 W8A8 model: rel L2 {:.3e}, worst row {:.3e}, top-1 {}/{} (near-ties {}); flip noise (CPU W8A8, f32 vs bf16 inputs) {:.3e}",
                            layout.name(),
                            a.rel_l2,
                            a.worst_row_rel,
                            a.top1_agree,
                            a.top1_rows,
                            a.near_ties,
                            flip.rel_l2
                        );
                        assert!(a.rel_l2 <= flip.rel_l2 + REL_TOL, "{preset} {layout:?} {rows} rows: W8A8 {a:?}, flip noise {flip:?}, W8A16 {c:?}");
                        // Top-1: the flip noise alone agrees on 94-96 % of these rows (CPU,
                        // f32 vs bf16 inputs); the GPU adds bf16 noise on top (the second H100
                        // run: tiny-dream 58 rows 46/52), so 10 points below it (5 of 52 rows).
                        assert!(a.agreement() >= flip.agreement() - 0.10, "{preset} {layout:?} {rows} rows: {a:?}, flip noise {flip:?}");
                    }
                    let f = compare_logits(&got, &bf, cfg.vocab, TIE_GAP);
                    println!(
                        "{preset} {} {path} {rows} rows: GPU FP8 vs GPU bf16: logits rel L2 {:.4}, worst row {:.4}, top-1 agreement {:.1} % (near-ties {})",
                        layout.name(),
                        f.rel_l2,
                        f.worst_row_rel,
                        100.0 * f.agreement(),
                        f.near_ties
                    );
                    // tests/fp8/fidelity.rs and w8a8.rs measure 3.7-3.8 % (W8A16) and 5.1-5.3 %
                    // (W8A8), top-1 92-97 %, on the CPU.
                    assert!(f.rel_l2 < 0.10 && f.agreement() >= 0.85, "{preset} {layout:?} {path}: {f:?}");
                }
            }
        }
    }
}

#[test]
fn layer_capture_matches_the_cpu_per_layer() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    for preset in common::DENSE_PRESETS {
        let cfg = ModelConfig::preset(preset).unwrap();
        let hw = common::sharp_weights(&cfg, 3);
        // 58 rows, on the W8A16 kernel for FP8 (`set_w8a8_min_rows(65)` below).
        let s = seqs(cfg.vocab, &[37, 1, 20]);
        let rows = 58;
        let cap = Capacity { rows, logit_rows: rows, cache_rows: rows, seqs: s.len() };
        for format in [WeightFormat::Bf16, WeightFormat::Fp8(ScaleLayout::Channel), WeightFormat::Fp8(ScaleLayout::Block128)] {
            let reference = match format {
                WeightFormat::Fp8(layout) => fake_quant(&hw, layout).unwrap().0,
                WeightFormat::Bf16 => hw.clone(),
            };
            let (want_logits, want) = CpuModel::new(&reference).unwrap().forward_full_layers(&s).unwrap();
            let mut m = GpuModel::new(gpu.clone(), cfg.clone(), GpuWeights::upload_as(&gpu, &hw, format).unwrap(), cap).unwrap();
            if m.w8a8_min_rows().is_some() {
                m.set_w8a8_min_rows(65).unwrap();
            }
            // Eager forwards (no graphs); the first also autotunes cuBLASLt for the shape.
            m.set_graphs(false);
            m.forward_full(&s).unwrap();
            let plain = m.forward_full(&s).unwrap();
            assert!(m.layer_hidden().is_err(), "capture off: nothing to read");
            m.set_layer_capture(true).unwrap();
            assert!(m.layer_hidden().is_err(), "no forward since capture was turned on");
            let logits = m.forward_full(&s).unwrap();
            let got = m.layer_hidden().unwrap();
            // Copying the residual stream out changes nothing the forward computes.
            assert_eq!(logits, plain, "{preset} {format}: capture changed the logits");
            assert_eq!(got.len(), cfg.n_layers);
            assert!(got.iter().all(|l| l.len() == rows * cfg.hidden));
            let layers = compare_layers(&got, &want, cfg.hidden);
            let errs: Vec<String> = layers.iter().map(|l| format!("{:.3e} (worst row {:.3e})", l.rel_l2, l.worst_row_rel)).collect();
            println!("{preset} {format}: GPU vs f32 CPU hidden state per layer: {}", errs.join(", "));
            for l in &layers {
                // bf16 activations against f32: the parity budget of the logits.
                assert!(l.rows == rows && l.rel_l2 > 0.0 && l.worst_row_rel <= REL_TOL, "{preset} {format}: {l:?}");
            }
            assert!(compare_logits(&logits, &want_logits, cfg.vocab, TIE_GAP).worst_row_rel <= REL_TOL);
            // Off again: a forward copies nothing and reading is refused.
            m.set_layer_capture(false).unwrap();
            m.forward_full(&s).unwrap();
            assert!(m.layer_hidden().is_err());
        }
    }
}

#[test]
fn fp8_commits_agree_with_bf16_on_the_gpu() {
    // Per-step commit agreement of FP8 with bf16 along bf16 decodes (3 sequences, 106-133
    // rows per step: past the W8A16 kernel's 64-row tile). Tiny random models have flat
    // confidences, so the k-th and (k+1)-th slots of a schedule swap under any perturbation:
    // the figures are printed, and bounded against the same measurement on the f32 CPU (f32
    // against the FP8 model: weights only for W8A16; weights and activations, `ActQuant::Fp8Row`,
    // for W8A8), so that a broken path (near 0) fails and ordinary quantisation noise does not.
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    for preset in common::DENSE_PRESETS {
        let cfg = ModelConfig::preset(preset).unwrap();
        let hw = common::sharp_weights(&cfg, 21);
        let prompts: Vec<Vec<u32>> =
            [12usize, 5, 20].iter().enumerate().map(|(i, &n)| demask::bench::synthetic_tokens(n, 500, 60 + i as u64)).collect();
        let cap = Capacity { rows: 3 * 52, logit_rows: 3 * 8, cache_rows: 3 * 52, seqs: 3 };
        for layout in LAYOUTS {
            let (q, _) = fake_quant(&hw, layout).unwrap();
            let cpu16 = commit_agreement(&mut CpuStepper::new(&hw, 256).unwrap(), &mut CpuStepper::new(&q, 256).unwrap(), &prompts, 32, 8, 4).unwrap();
            let cpu8 = commit_agreement(
                &mut CpuStepper::new(&hw, 256).unwrap(),
                &mut CpuStepper::new(&q, 256).unwrap().with_act_quant(ActQuant::Fp8Row),
                &prompts,
                32,
                8,
                4,
            )
            .unwrap();
            // Channel scales: the W8A16 kernel (in 64-row chunks) and the W8A8 path (the
            // default above 64 rows, activations quantised too); block scales: W8A16 only.
            let paths: &[W8a8Select] =
                if layout == ScaleLayout::Channel { &[W8a8Select::W8a16, W8a8Select::Auto] } else { &[W8a8Select::W8a16] };
            for &path in paths {
                let mut r = GpuStepper::new(gpu.clone(), &hw, cap).unwrap();
                let fw = GpuWeights::upload_as(&gpu, &hw, WeightFormat::Fp8(layout)).unwrap();
                let mut t = GpuStepper::with_weights(gpu.clone(), cfg.clone(), fw, cap).unwrap();
                if layout == ScaleLayout::Channel {
                    t.model_mut().set_w8a8_select(path).unwrap();
                }
                let a = commit_agreement(&mut r, &mut t, &prompts, 32, 8, 4).unwrap();
                let w8a8 = path != W8a8Select::W8a16;
                // The CPU measures the same quantisation: weights only, or weights and activations.
                let cpu = if w8a8 { &cpu8 } else { &cpu16 };
                println!(
                    "{preset} {} {}: GPU FP8 vs bf16: {} of {} sequence-steps commit the same set ({:.1} %; f32 CPU FP8 vs f32: {:.1} %); \
                     same token on {} of {} ({:.1} %; CPU {:.1} %)",
                    layout.name(),
                    if w8a8 { "W8A8" } else { "W8A16" },
                    a.same_commits,
                    a.seq_steps,
                    100.0 * a.fraction(),
                    100.0 * cpu.fraction(),
                    a.same_token,
                    a.both_committed,
                    100.0 * a.token_fraction(),
                    100.0 * cpu.token_fraction()
                );
                assert_eq!(a.seq_steps, 48);
                // bf16 activations on the GPU against f32 on the CPU: the GPU reference itself
                // differs from the CPU's, so a margin.
                let margin = 0.2;
                assert!(a.fraction() >= cpu.fraction() - margin, "{preset} {layout:?} {path}: {a:?} (CPU {cpu:?})");
                assert!(a.token_fraction() >= cpu.token_fraction() - margin / 2.0, "{preset} {layout:?} {path}: {a:?} (CPU {cpu:?})");
            }
        }
    }
}

#[test]
fn fp8_dual_cache_decode_completes_and_is_deterministic() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    for preset in common::DENSE_PRESETS {
        let cfg = ModelConfig::preset(preset).unwrap();
        let hw = common::sharp_weights(&cfg, 9);
        for layout in LAYOUTS {
            let opts = EngineOptions { max_batch: 3, max_rows: 3 * 96, ..Default::default() };
            let w = GpuWeights::upload_as(&gpu, &hw, WeightFormat::Fp8(layout)).unwrap();
            let mut e = Engine::on_gpu(gpu.clone(), cfg.clone(), w, None, &opts).unwrap();
            let reqs: Vec<_> = [(9usize, 1u64), (30, 2), (3, 3)]
                .iter()
                .map(|&(n, sd)| {
                    common::ids_request(&demask::bench::synthetic_tokens(n, 500, sd), 32, 8, "schedule:4")
                        .cache(demask::cache::CacheScheme::Dual)
                })
                .collect();
            let batch = e.generate(&reqs).unwrap();
            let again = e.generate(&reqs).unwrap();
            for (i, r) in reqs.iter().enumerate() {
                assert_eq!(again[i].tokens, batch[i].tokens, "{preset} {layout:?}: request {i}: the same batch twice differs");
                let alone = e.generate(std::slice::from_ref(r)).unwrap();
                let diff = alone[0].tokens.iter().zip(&batch[i].tokens).filter(|(a, b)| a != b).count();
                println!("{preset} {}: request {i}: {diff} of 32 tokens differ alone vs batched", layout.name());
                assert_eq!(batch[i].tokens.len(), 32);
                assert!(batch[i].tokens.iter().all(|&t| t != cfg.mask_id), "{preset} {layout:?}: a slot stayed masked");
                assert_eq!(batch[i].steps, 16, "{preset} {layout:?}: 4 blocks × 4 steps");
            }
        }
    }
}

#[test]
fn published_fp8_checkpoint_runs_as_stored() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    for preset in common::DENSE_PRESETS {
        let cfg = ModelConfig::preset(preset).unwrap();
        let dir = std::env::temp_dir().join(format!("demask-gpu-fp8ck-{preset}-{}", std::process::id()));
        demask::checkpoint::write_checkpoint(&cfg, 5, &dir, true, |_| {}).unwrap();
        demask::weights::fp8::convert_to_fp8(&dir, &cfg).unwrap();
        let hw = demask::weights::HostWeights::load(&dir).unwrap();
        std::fs::remove_dir_all(&dir).ok();
        // `fp8` (channel) asked for: the stored block scales are used as they are.
        let w = GpuWeights::upload_as(&gpu, &hw, WeightFormat::Fp8(ScaleLayout::Channel)).unwrap();
        assert_eq!(w.format, WeightFormat::Fp8(ScaleLayout::Block128));
        let s = seqs(cfg.vocab, &[37, 1, 20]);
        let got = gpu_logits(&gpu, &cfg, w, &s, false);
        // The host weights hold exactly the dequantised operands: the f32 CPU model is the
        // same model.
        let want = CpuModel::new(&hw).unwrap().forward_full(&s).unwrap();
        let c = compare_logits(&got, &want, cfg.vocab, TIE_GAP);
        println!("{preset}: published-layout FP8 checkpoint on the GPU vs its f32 CPU forward: worst row {:.3e}", c.worst_row_rel);
        assert!(c.worst_row_rel <= REL_TOL, "{preset}: {c:?}");
        // And bf16 asked for: the dequantised weights run on the bf16 path.
        let b = gpu_logits(&gpu, &cfg, GpuWeights::upload_as(&gpu, &hw, WeightFormat::Bf16).unwrap(), &s, false);
        assert!(compare_logits(&b, &want, cfg.vocab, TIE_GAP).worst_row_rel <= REL_TOL);
    }
}

#[test]
fn fp8_forwards_allocate_no_device_memory() {
    // After the first forwards of each shape (eager, capture, replay; cuBLASLt FP8 plans made),
    // repeated forwards of an 8-row step (W8A16), a 32-row decode step and a 256-row full step
    // (both W8A8 with `set_w8a8_min_rows(17)`) leave the device's free memory unchanged.
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    let cfg = ModelConfig::preset("tiny-llada").unwrap();
    let hw = common::sharp_weights(&cfg, 2);
    let w = GpuWeights::upload_as(&gpu, &hw, WeightFormat::Fp8(ScaleLayout::Channel)).unwrap();
    let cap = Capacity { rows: 256, logit_rows: 256, cache_rows: 256, seqs: 1 };
    let mut m = GpuModel::new(gpu.clone(), cfg.clone(), w, cap).unwrap();
    m.set_w8a8_min_rows(17).unwrap();
    let step = demask::bench::gpu::decode_batch(&cfg, 256, 32, 224, 1);
    let small = demask::bench::gpu::decode_batch(&cfg, 256, 8, 248, 1);
    let full = demask::bench::gpu::decode_batch(&cfg, 256, 256, 0, 1);
    for _ in 0..3 {
        m.forward(&full).unwrap();
        m.forward(&step).unwrap();
        m.forward(&small).unwrap();
    }
    gpu.synchronize().unwrap();
    let (free0, _) = gpu.mem_info().unwrap();
    for _ in 0..10 {
        m.forward(&full).unwrap();
        m.forward(&step).unwrap();
        m.forward(&small).unwrap();
    }
    gpu.synchronize().unwrap();
    let (free1, _) = gpu.mem_info().unwrap();
    assert_eq!(free0, free1, "device memory changed across FP8 forwards");
}

#[test]
fn fp8_lm_head_matches_the_cpu_model_and_leaves_many_rows_to_bf16() {
    // `GpuModel::set_fp8_lm_head`: an E4M3 copy of the LM head (channel scales) for up to 64
    // logit rows. 58 rows on the W8A16 kernel everywhere: against the f32 CPU forward of the
    // same model with the LM head quantised too (`fake_quant_with(.., true)`), to the
    // bf16-vs-f32 budget, and different from the bf16 head's logits (the copy is used). 201
    // rows: the bf16 head, bit for bit the forward without the copy.
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    for preset in common::DENSE_PRESETS {
        let cfg = ModelConfig::preset(preset).unwrap();
        let hw = common::sharp_weights(&cfg, 3);
        let model = |s: &[Vec<u32>], head: bool| {
            let total: usize = s.iter().map(|x| x.len()).sum();
            let cap = Capacity { rows: total, logit_rows: total, cache_rows: total, seqs: s.len() };
            let w = GpuWeights::upload_as(&gpu, &hw, WeightFormat::Fp8(ScaleLayout::Channel)).unwrap();
            let mut m = GpuModel::new(gpu.clone(), cfg.clone(), w, cap).unwrap();
            m.set_w8a8_min_rows(65).unwrap();
            m.set_fp8_lm_head(head).unwrap();
            assert_eq!(m.fp8_lm_head(), head);
            m
        };
        let s = seqs(cfg.vocab, &[37, 1, 20]);
        let (q, _) = demask::fp8_fidelity::fake_quant_with(&hw, ScaleLayout::Channel, true).unwrap();
        let want = CpuModel::new(&q).unwrap().forward_full(&s).unwrap();
        let mut m = model(&s, true);
        let got = m.forward_full(&s).unwrap();
        let c = compare_logits(&got, &want, cfg.vocab, TIE_GAP);
        println!(
            "{preset} FP8 LM head, 58 rows: GPU vs CPU f32 (LM head quantised too): rel L2 {:.3e}, worst row {:.3e}, top-1 {}/{}",
            c.rel_l2, c.worst_row_rel, c.top1_agree, c.top1_rows
        );
        assert!(c.worst_row_rel <= REL_TOL, "{preset}: {c:?}");
        assert!(c.top1_rows - c.top1_agree <= c.rows.div_ceil(100), "{preset}: {c:?}");
        m.set_fp8_lm_head(false).unwrap();
        let bf16_head = m.forward_full(&s).unwrap();
        assert_ne!(got, bf16_head, "{preset}: the FP8 LM head was not used");
        // 201 logit rows: past the FP8 head's 64, so the bf16 head runs, as without the copy.
        let s = seqs(cfg.vocab, &[37, 1, 99, 64]);
        let (a, b) = (model(&s, true).forward_full(&s).unwrap(), model(&s, false).forward_full(&s).unwrap());
        assert_eq!(a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), b.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{preset}: 201 rows");
    }
}
