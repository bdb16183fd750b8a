//! LLaDA-MoE through the GPU forward (`GpuModel`): the grouped expert kernels against the
//! reference variant on the same batch, the logits against the CPU f32 forward row by row (a
//! varlen batch, and a prefill-sized one where every expert gets more rows than one 64-row
//! tile), and the synthetic weights of the real architecture (router, 64 stacked experts per
//! layer, q/k norms) loading and running. Graphs, caches and batching of `tiny-llada-moe` are in
//! the shared GPU suites (tests/common `PRESETS`). Skips without a GPU
//! (`DEMASK_REQUIRE_GPU=1` makes that a failure).
#![cfg(feature = "cuda")]

use demask::config::ModelConfig;
use demask::gpu::test_gpu;
use demask::model::{Capacity, GpuFfn, GpuModel, GpuWeights};

#[path = "common/moe_rows.rs"]
mod moe_rows;
use moe_rows::{check_reference_expert_kernels, check_rows, model, seqs};

#[test]
fn reference_expert_kernels_give_the_grouped_logits() {
    check_reference_expert_kernels("tiny-llada-moe", 21);
}

#[test]
fn gpu_logits_match_the_cpu_row_by_row() {
    // Mixed lengths in one varlen batch (1 row to 99), then 4 × 300 rows, top 2 of 8 experts:
    // about 150 rows per expert, so each expert runs several 64-row tiles.
    for (seed, lens) in [(9u64, vec![37usize, 1, 99, 64]), (22, vec![300, 300, 300, 300])] {
        let rows: usize = lens.iter().sum();
        let Some((mut m, cpu, cfg)) = model("tiny-llada-moe", seed, rows, lens.len()) else { return };
        let s = seqs(cfg.vocab, &lens, seed);
        let got = m.forward_full(&s).unwrap();
        let want = cpu.forward_full(&s).unwrap();
        check_rows(&format!("tiny-llada-moe {rows} rows"), &got, &want, cfg.vocab);
    }
}

#[test]
fn expert_tally_counts_the_experts_each_layer_touched() {
    let Some((mut m, _, cfg)) = model("tiny-llada-moe", 23, 1200, 4) else { return };
    let moe = cfg.moe.clone().unwrap();
    let layers = cfg.n_layers as u64;
    assert_eq!(m.expert_stats().unwrap(), Some((0, 0)), "nothing counted before it is turned on");
    m.set_expert_stats(true).unwrap();
    // One row selects exactly top_k experts in every layer.
    m.forward_full(&seqs(cfg.vocab, &[1], 4)).unwrap();
    assert_eq!(m.expert_stats().unwrap(), Some((moe.top_k as u64 * layers, layers)));
    // 1200 random rows reach every expert of every layer; the tally adds up.
    m.forward_full(&seqs(cfg.vocab, &[300, 300, 300, 300], 5)).unwrap();
    let want = (moe.top_k as u64 * layers + moe.n_experts as u64 * layers, 2 * layers);
    assert_eq!(m.expert_stats().unwrap(), Some(want));
    // Turning it on again resets; off stops counting.
    m.set_expert_stats(true).unwrap();
    assert_eq!(m.expert_stats().unwrap(), Some((0, 0)));
    m.set_expert_stats(false).unwrap();
    m.forward_full(&seqs(cfg.vocab, &[7], 6)).unwrap();
    assert_eq!(m.expert_stats().unwrap(), Some((0, 0)));
}

#[test]
fn llada_moe_7b_synthetic_weights_run() {
    let Some(gpu) = test_gpu() else { return };
    let cfg = ModelConfig::preset("llada-moe-7b").unwrap();
    let w = GpuWeights::synthesize(&gpu, &cfg, 0).unwrap();
    let m = cfg.moe.as_ref().unwrap();
    for l in &w.layers {
        let GpuFfn::Moe(e) = &l.ffn else { panic!("llada-moe-7b layer without experts") };
        assert_eq!(e.w_gate_up.dims(), [m.n_experts, 2 * cfg.ffn, cfg.hidden]);
        assert_eq!(e.w_down.dims(), [m.n_experts, cfg.hidden, cfg.ffn]);
        assert!(l.q_norm.is_some() && l.k_norm.is_some());
    }
    let gb = w.bytes() as f64 / 1e9;
    assert!((cfg.param_count() as f64 * 2.0 / 1e9 - gb).abs() < 0.01, "{gb} GB vs the config's parameter count");
    let cap = Capacity { rows: 64, logit_rows: 64, cache_rows: 512, seqs: 2 };
    let mut model = GpuModel::new(gpu.clone(), cfg.clone(), w, cap).unwrap();
    let s = seqs(cfg.vocab.min(cfg.mask_id as usize), &[32, 32], 3);
    let logits = model.forward_full(&s).unwrap();
    assert_eq!(logits.len(), 64 * cfg.vocab);
    assert!(logits.iter().all(|v| v.is_finite()), "non-finite logits");
    let spread = logits.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(spread > 0.0, "all-zero logits");
    println!("llada-moe-7b synthetic: {gb:.2} GB of weights, 64-row forward finite (max |logit| {spread:.2})");
}
