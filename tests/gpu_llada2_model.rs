//! LLaDA2 through the GPU forward (`GpuModel`): block-causal attention, partial RoPE with q/k
//! norms, a dense first layer, sigmoid + `expert_bias` group routing, the shared expert. The
//! logits against the CPU f32 forward row by row (a varlen batch over several blocks, and a
//! prefill-sized one), the grouped expert kernels against the reference variant, a block step
//! over cached earlier blocks against the full forward with every cache row it must not read
//! poisoned with NaN, the expert tally over the MoE layers only, and the synthetic weights of
//! `llada2-mini` loading and running. Skips without a GPU (`DEMASK_REQUIRE_GPU=1` makes that a
//! failure).
#![cfg(feature = "cuda")]

use demask::batch::{RowBatch, SeqSpan};
use demask::config::ModelConfig;
use demask::gpu::test_gpu;
use demask::model::{Capacity, GpuFfn, GpuModel, GpuWeights};
use demask::ops::gemm_fp8::LinearWeight;

#[path = "common/moe_rows.rs"]
mod moe_rows;
use moe_rows::{check_reference_expert_kernels, check_rows, model, rel_err, seqs};

#[test]
fn gpu_logits_match_the_cpu_row_by_row() {
    // Lengths across block boundaries (1 row, 37 = one block + 5, 99, exactly 64), then 4 × 300
    // rows (16 experts, top 4: about 300 rows per expert, several 64-row tiles each).
    for (seed, lens) in [(9u64, vec![37usize, 1, 99, 64]), (22, vec![300, 300, 300, 300])] {
        let rows: usize = lens.iter().sum();
        let Some((mut m, cpu, cfg)) = model("tiny-llada2", seed, rows, lens.len()) else { return };
        let s = seqs(cfg.vocab, &lens, seed);
        let got = m.forward_full(&s).unwrap();
        let want = cpu.forward_full(&s).unwrap();
        check_rows(&format!("tiny-llada2 {rows} rows"), &got, &want, cfg.vocab);
    }
}

/// Without block-causal attention (the model told its block is the whole canvas) the logits
/// move far beyond the tolerance: the check above has teeth for the mask.
#[test]
fn bidirectional_attention_is_far_from_the_reference() {
    let Some(gpu) = test_gpu() else { return };
    let cfg = ModelConfig::preset("tiny-llada2").unwrap();
    let hw = demask::checkpoint::random_weights(&cfg, 9);
    let want = demask::cpu::forward::CpuModel::new(&hw).unwrap().forward_full(&seqs(cfg.vocab, &[99], 9)).unwrap();
    let mut wrong = cfg.clone();
    wrong.llada2.as_mut().unwrap().block = 1024;
    let cap = Capacity { rows: 99, logit_rows: 99, cache_rows: 99, seqs: 1 };
    let mut m = GpuModel::new(gpu.clone(), wrong, GpuWeights::upload(&gpu, &hw).unwrap(), cap).unwrap();
    let got = m.forward_full(&seqs(cfg.vocab, &[99], 9)).unwrap();
    // Rows of the last block see every key either way; the earlier ones must differ.
    let e = rel_err(&got[..64 * cfg.vocab], &want[..64 * cfg.vocab]);
    println!("tiny-llada2 bidirectional vs block-causal reference: relative error {e:.3e}");
    assert!(e > 0.1, "bidirectional attention gives the block-causal logits ({e})");
}

#[test]
fn reference_expert_kernels_give_the_grouped_logits() {
    check_reference_expert_kernels("tiny-llada2", 21);
}

#[test]
fn block_step_over_cached_blocks_matches_the_full_forward() {
    let lens = [128usize, 96];
    let rows: usize = lens.iter().sum();
    let Some((mut m, _, cfg)) = model("tiny-llada2", 31, rows, 2) else { return };
    let s = seqs(cfg.vocab, &lens, 31);
    let full = m.forward_full(&s).unwrap();
    let v = cfg.vocab;
    // Fresh cache rows: NaN everywhere.
    let nan = vec![half::bf16::NAN; m.cache.k[0].len()];
    for l in 0..cfg.n_layers {
        m.cache.k[l].write(&m.gpu, &nan).unwrap();
        m.cache.v[l].write(&m.gpu, &nan).unwrap();
    }
    // Prefill blocks 0-1 of sequence 0 ([0, 64)) and block 0 of sequence 1 ([0, 32)).
    let (pre0, pre1) = (64usize, 32usize);
    let prefill = RowBatch {
        tokens: s[0][..pre0].iter().chain(&s[1][..pre1]).copied().collect(),
        positions: (0..pre0 as u32).chain(0..pre1 as u32).collect(),
        seqs: vec![
            SeqSpan { row_start: 0, row_count: pre0 as u32, cache_base: 0, kv_len: pre0 as u32 },
            SeqSpan { row_start: pre0 as u32, row_count: pre1 as u32, cache_base: lens[0] as u32, kv_len: pre1 as u32 },
        ],
        logit_rows: vec![0],
    };
    m.forward(&prefill).unwrap();
    // The step: block 2 of sequence 0 ([64, 96)), block 1 of sequence 1 ([32, 64)), kv_len the
    // whole canvas of each.
    let step = RowBatch {
        tokens: s[0][64..96].iter().chain(&s[1][32..64]).copied().collect(),
        positions: (64..96).chain(32..64).collect(),
        seqs: vec![
            SeqSpan { row_start: 0, row_count: 32, cache_base: 0, kv_len: lens[0] as u32 },
            SeqSpan { row_start: 32, row_count: 32, cache_base: lens[0] as u32, kv_len: lens[1] as u32 },
        ],
        logit_rows: (0..64).collect(),
    };
    m.forward(&step).unwrap();
    let got = m.logits_to_host().unwrap();
    assert!(got.iter().all(|x| x.is_finite()), "the block step read a cache row past its block");
    let want: Vec<f32> = full[64 * v..96 * v].iter().chain(&full[(lens[0] + 32) * v..(lens[0] + 64) * v]).copied().collect();
    let e = rel_err(&got, &want);
    println!("tiny-llada2 cached block step vs full forward: relative logits difference {e:.3e}");
    // Same weights and kernels; only GEMM row counts (and so roundings and near-tie routes)
    // differ: the row-by-row rule of the CPU comparison, tighter in the median.
    check_rows("tiny-llada2 cached block step vs full forward", &got, &want, v);
}

#[test]
fn expert_tally_counts_the_moe_layers_only() {
    let Some((mut m, _, cfg)) = model("tiny-llada2", 23, 1200, 4) else { return };
    let moe = cfg.moe.clone().unwrap();
    let layers = (0..cfg.n_layers).filter(|&i| cfg.is_moe_layer(i)).count() as u64;
    assert!(layers > 0 && layers < cfg.n_layers as u64, "tiny-llada2 has dense and MoE layers");
    m.set_expert_stats(true).unwrap();
    m.forward_full(&seqs(cfg.vocab, &[1], 4)).unwrap();
    assert_eq!(m.expert_stats().unwrap(), Some((moe.top_k as u64 * layers, layers)));
    m.forward_full(&seqs(cfg.vocab, &[300, 300, 300, 300], 5)).unwrap();
    let want = (moe.top_k as u64 * layers + moe.n_experts as u64 * layers, 2 * layers);
    assert_eq!(m.expert_stats().unwrap(), Some(want));
}

#[test]
fn llada2_mini_synthetic_weights_run() {
    let Some(gpu) = test_gpu() else { return };
    let cfg = ModelConfig::preset("llada2-mini").unwrap();
    let w = GpuWeights::synthesize(&gpu, &cfg, 0).unwrap();
    let m = cfg.moe.as_ref().unwrap();
    let l2 = cfg.llada2.as_ref().unwrap();
    for (i, l) in w.layers.iter().enumerate() {
        match &l.ffn {
            GpuFfn::Moe(e) => {
                assert!(i >= l2.first_k_dense, "layer {i}: experts in a dense layer");
                assert_eq!(e.w_gate_up.dims(), [m.n_experts, 2 * cfg.ffn, cfg.hidden]);
                assert_eq!(e.w_down.dims(), [m.n_experts, cfg.hidden, cfg.ffn]);
                assert_eq!(e.expert_bias.as_ref().map(|b| b.dims.clone()), Some(vec![m.n_experts]));
                let s = e.shared.as_ref().expect("llada2-mini has a shared expert");
                assert_eq!((s.w_gate_up.dims().to_vec(), s.w_down.dims().to_vec()), (vec![2 * l2.shared_ffn, cfg.hidden], vec![cfg.hidden, l2.shared_ffn]));
            }
            GpuFfn::Dense { w_gate_up, w_down } => {
                assert!(i < l2.first_k_dense, "layer {i}: dense past first_k_dense_replace");
                let (LinearWeight::Bf16(w_gate_up), LinearWeight::Bf16(w_down)) = (w_gate_up, w_down) else {
                    panic!("layer {i}: the dense FFN of a bf16 model is not bf16");
                };
                assert_eq!((w_gate_up.dims.clone(), w_down.dims.clone()), (vec![2 * l2.dense_ffn, cfg.hidden], vec![cfg.hidden, l2.dense_ffn]));
            }
        }
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
    println!("llada2-mini synthetic: {gb:.2} GB of weights, 64-row forward finite (max |logit| {spread:.2})");
}
