//! LLaDA2 checkpoints end to end on the CPU: `make-checkpoint`'s writer puts every tensor under
//! its Hugging Face name (packed QKV, q/k norms, dense layer 0, unfused experts, router, f32
//! expert bias, shared expert), the loader stacks the experts and keeps the bias in f32
//! bit-exactly, `inspect` reports the routing, a missing bias or a misshapen packed QKV is an
//! error naming the tensor, and the CPU engine decodes text with the tiny tokenizer.
mod common;

use std::collections::BTreeMap;

use demask::checkpoint::{random_weights, write_checkpoint_with};
use demask::engine::{Device, Engine, EngineOptions, Request};
use demask::weights::{inspect, HostWeights};
use demask::ModelConfig;
use safetensors::{Dtype, SafeTensors};

use common::scratch::{load_err, rewrite, shards, TempDir};

const SEED: u64 = 91;

fn tiny(shard_bytes: u64) -> (TempDir, ModelConfig) {
    let dir = TempDir::new("tiny-llada2");
    let cfg = ModelConfig::preset("tiny-llada2").unwrap();
    let sum = write_checkpoint_with(&cfg, SEED, &dir.0, false, shard_bytes, |_| {}).unwrap();
    assert!(sum.tokenizer);
    assert_eq!(sum.params, cfg.param_count());
    (dir, cfg)
}

#[test]
fn hf_names_and_dtypes_round_trip() {
    let (dir, cfg) = tiny(400_000);
    let files = shards(&dir.0);
    assert!(files.len() >= 3, "{} shards", files.len());
    let mut stored: BTreeMap<String, (Dtype, Vec<usize>)> = BTreeMap::new();
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        for (n, v) in SafeTensors::deserialize(&bytes).unwrap().tensors() {
            stored.insert(n.to_string(), (v.dtype(), v.shape().to_vec()));
        }
    }
    let want = [
        ("model.word_embeddings.weight", Dtype::BF16, vec![512, 512]),
        ("model.layers.0.attention.query_key_value.weight", Dtype::BF16, vec![(4 + 2 * 2) * 128, 512]),
        ("model.layers.0.attention.query_layernorm.weight", Dtype::BF16, vec![128]),
        ("model.layers.2.attention.key_layernorm.weight", Dtype::BF16, vec![128]),
        ("model.layers.1.attention.dense.weight", Dtype::BF16, vec![512, 512]),
        ("model.layers.0.mlp.gate_proj.weight", Dtype::BF16, vec![256, 512]),
        ("model.layers.0.mlp.down_proj.weight", Dtype::BF16, vec![512, 256]),
        ("model.layers.1.mlp.gate.weight", Dtype::BF16, vec![16, 512]),
        ("model.layers.2.mlp.gate.expert_bias", Dtype::F32, vec![16]),
        ("model.layers.1.mlp.experts.15.down_proj.weight", Dtype::BF16, vec![512, 64]),
        ("model.layers.2.mlp.shared_experts.up_proj.weight", Dtype::BF16, vec![64, 512]),
        ("model.norm.weight", Dtype::BF16, vec![512]),
        ("lm_head.weight", Dtype::BF16, vec![512, 512]),
    ];
    for (n, dt, shape) in want {
        assert_eq!(stored.get(n), Some(&(dt, shape)), "{n}");
    }
    assert!(!stored.keys().any(|n| n.contains("layers.0.mlp.experts") || n.contains("layers.1.mlp.gate_proj")));
    // 3 (embed, norm, head) + 3 layers × (4 attention + 2 norms) + layer 0's 3 dense
    // + 2 × (16 × 3 experts + router + bias + 3 shared).
    assert_eq!(stored.len(), 3 + 3 * 6 + 3 + 2 * (48 + 2 + 3));

    let got = HostWeights::load(&dir.0).unwrap();
    let want = random_weights(&cfg, SEED);
    assert_eq!(got.cfg, cfg);
    assert_eq!(got.param_count(), cfg.param_count());
    for (i, (g, w)) in got.layers.iter().zip(&want.layers).enumerate() {
        assert!(g.wqkv == w.wqkv && g.q_norm == w.q_norm && g.k_norm == w.k_norm && g.wo == w.wo, "layer {i} attention");
        assert!(g.w_gate_up == w.w_gate_up && g.w_down == w.w_down, "layer {i} dense FFN");
        match (&g.moe, &w.moe) {
            (None, None) => assert_eq!(i, 0),
            (Some(gm), Some(wm)) => {
                assert!(gm.router == wm.router && gm.w_gate_up == wm.w_gate_up && gm.w_down == wm.w_down, "layer {i}");
                assert!(gm.shared_gate_up == wm.shared_gate_up && gm.shared_down == wm.shared_down, "layer {i} shared");
                assert_eq!(gm.expert_bias, wm.expert_bias, "layer {i} bias (f32, bit-exact)");
            }
            _ => panic!("layer {i}: MoE in one and not the other"),
        }
    }
    let report = inspect(&dir.0).unwrap();
    assert!(report.trim_end().ends_with("OK"), "{report}");
    for part in ["Llada2", "16 per layer (width 64) in 4 groups (keep 2), top-4", "sigmoid", "block-causal (block 32)", "64 of 128", "F32 x2"] {
        assert!(report.contains(part), "inspect should show `{part}`:\n{report}");
    }
}

#[test]
fn missing_bias_and_misshapen_qkv_are_named() {
    let (dir, _) = tiny(u64::MAX);
    let gone = "model.layers.1.mlp.gate.expert_bias";
    rewrite(&dir.0, |n, _, s, b| (n != gone).then(|| (s.to_vec(), b.to_vec())));
    let e = load_err(&dir.0);
    assert!(e.contains(gone) && e.contains("missing"), "{e}");

    let (dir, _) = tiny(u64::MAX);
    let qkv = "model.layers.2.attention.query_key_value.weight";
    // Q|K|V with 4 KV heads' rows where the config says 2.
    rewrite(&dir.0, |n, _, s, b| match n {
        n if n == qkv => Some((vec![12 * 128, s[1]], [b, &b[..4 * 128 * s[1] * 2]].concat())),
        _ => Some((s.to_vec(), b.to_vec())),
    });
    let e = load_err(&dir.0);
    assert!(e.contains(qkv) && e.contains("[1536, 512]") && e.contains("[1024, 512]"), "{e}");
}

#[test]
fn cpu_engine_decodes_text_on_tiny_llada2() {
    let (dir, cfg) = tiny(u64::MAX);
    let mut engine = Engine::load(&dir.0, EngineOptions { device: Device::Cpu, ..EngineOptions::default() }).unwrap();
    assert_eq!(engine.config(), &cfg);
    let out = engine
        .generate(&[Request::text("Hello, blocks").gen_len(16).policy("threshold:0.9".parse().unwrap())])
        .unwrap();
    // LLaDA2 cuts its output after the first EOS (stop-at-EOS is on by default).
    let t = &out[0].tokens;
    assert!(t.len() == 16 || (t.len() < 16 && t.last() == Some(&cfg.eos_id)), "{t:?}");
    assert!(out[0].tokens.iter().all(|&t| t != cfg.mask_id));
    assert!(out[0].text.is_some(), "the tiny tokenizer decodes the output");
}
