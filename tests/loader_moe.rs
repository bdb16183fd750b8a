//! LLaDA-MoE checkpoints end to end on the CPU: `make-checkpoint`'s writer puts every tensor
//! under its Hugging Face name (router, unfused experts, q/k norms), the loader stacks the
//! experts bit-exactly, `inspect` reports experts, top-k and active parameters, a missing expert
//! tensor or a wrong expert / router shape is an error naming the tensor, and the CPU engine
//! decodes text with the tiny tokenizer.
mod common;

use std::collections::BTreeSet;

use demask::checkpoint::{random_weights, write_checkpoint_with};
use demask::engine::{Device, Engine, EngineOptions, Request};
use demask::weights::{inspect, HostWeights};
use demask::ModelConfig;
use safetensors::SafeTensors;

use common::scratch::{load_err, rewrite, shards, TempDir};

const SEED: u64 = 77;

fn tiny_moe(shard_bytes: u64) -> (TempDir, ModelConfig) {
    let dir = TempDir::new("tiny-llada-moe");
    let cfg = ModelConfig::preset("tiny-llada-moe").unwrap();
    let sum = write_checkpoint_with(&cfg, SEED, &dir.0, false, shard_bytes, |_| {}).unwrap();
    assert!(sum.tokenizer);
    assert_eq!(sum.params, cfg.param_count());
    (dir, cfg)
}

#[test]
fn hf_names_round_trip_with_stacked_experts() {
    let (dir, cfg) = tiny_moe(300_000);
    let files = shards(&dir.0);
    assert!(files.len() >= 3, "{} shards", files.len());
    let mut names: BTreeSet<String> = BTreeSet::new();
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        names.extend(SafeTensors::deserialize(&bytes).unwrap().names().into_iter().map(|s| s.to_string()));
    }
    for n in [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_norm.weight",
        "model.layers.1.self_attn.k_norm.weight",
        "model.layers.1.mlp.gate.weight",
        "model.layers.0.mlp.experts.7.down_proj.weight",
        "model.layers.1.post_attention_layernorm.weight",
        "lm_head.weight",
    ] {
        assert!(names.contains(n), "{n} not written");
    }
    assert!(!names.iter().any(|n| n.contains("mlp.gate_proj") || n.contains("shared")), "no dense FFN: {names:?}");
    // 3 + 2 (embed/head/norm) + per layer 4 attention + 2 q/k norms + router + 8 × 3 experts + 2 norms.
    assert_eq!(names.len(), 3 + 2 * (4 + 2 + 1 + 24 + 2));

    let got = HostWeights::load(&dir.0).unwrap();
    let want = random_weights(&cfg, SEED);
    assert_eq!(got.cfg, cfg);
    assert_eq!(got.param_count(), cfg.param_count());
    for (i, (g, w)) in got.layers.iter().zip(&want.layers).enumerate() {
        let (gm, wm) = (g.moe.as_ref().unwrap(), w.moe.as_ref().unwrap());
        assert!(gm.router == wm.router && gm.w_gate_up == wm.w_gate_up && gm.w_down == wm.w_down, "layer {i} experts");
        assert!(g.q_norm == w.q_norm && g.k_norm == w.k_norm && g.wqkv == w.wqkv, "layer {i} attention");
        assert!(g.w_gate_up.is_empty() && g.w_down.is_empty());
    }
    let report = inspect(&dir.0).unwrap();
    assert!(report.trim_end().ends_with("OK"), "{report}");
    for part in ["LladaMoe", "experts      8 per layer (width 128), top-2", "not renormalised", "active"] {
        assert!(report.contains(part), "inspect should show `{part}`:\n{report}");
    }
    assert!(report.contains(&cfg.active_param_count().to_string()), "{report}");
}

#[test]
fn missing_expert_is_named() {
    let (dir, _) = tiny_moe(u64::MAX);
    let gone = "model.layers.1.mlp.experts.5.up_proj.weight";
    rewrite(&dir.0, |n, _, s, b| (n != gone).then(|| (s.to_vec(), b.to_vec())));
    let e = load_err(&dir.0);
    assert!(e.contains(gone) && e.contains("missing"), "{e}");
    let report = inspect(&dir.0).unwrap();
    assert!(report.contains(gone), "{report}");
}

#[test]
fn wrong_expert_and_router_shapes_are_named() {
    let (dir, _) = tiny_moe(u64::MAX);
    let down = "model.layers.0.mlp.experts.2.down_proj.weight";
    rewrite(&dir.0, |n, _, s, b| match n {
        // [256, 128] stored transposed.
        n if n == down => Some((vec![s[1], s[0]], b.to_vec())),
        _ => Some((s.to_vec(), b.to_vec())),
    });
    let e = load_err(&dir.0);
    assert!(e.contains(down) && e.contains("[128, 256]") && e.contains("[256, 128]"), "{e}");

    let (dir, _) = tiny_moe(u64::MAX);
    let router = "model.layers.1.mlp.gate.weight";
    rewrite(&dir.0, |n, _, s, b| match n {
        // 7 experts' rows for 8 experts.
        n if n == router => Some((vec![7, s[1]], b[..7 * s[1] * 2].to_vec())),
        _ => Some((s.to_vec(), b.to_vec())),
    });
    let e = load_err(&dir.0);
    assert!(e.contains(router) && e.contains("[7, 256]") && e.contains("[8, 256]"), "{e}");
}

#[test]
fn config_of_a_checkpoint_with_too_many_active_experts_is_refused() {
    let (dir, _) = tiny_moe(u64::MAX);
    let path = dir.0.join("config.json");
    let mut j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    j["num_experts_per_tok"] = serde_json::json!(9);
    std::fs::write(&path, j.to_string()).unwrap();
    let e = load_err(&dir.0);
    assert!(e.contains("`num_experts_per_tok`") && e.contains("9"), "{e}");
}

#[test]
fn cpu_engine_decodes_text_on_tiny_llada_moe() {
    let (dir, cfg) = tiny_moe(u64::MAX);
    let mut engine = Engine::load(&dir.0, EngineOptions { device: Device::Cpu, ..EngineOptions::default() }).unwrap();
    assert_eq!(engine.config(), &cfg);
    let out = engine
        .generate(&[Request::text("Hello, experts").gen_len(16).block_len(8).policy("threshold:0.9".parse().unwrap())])
        .unwrap();
    assert_eq!(out[0].tokens.len(), 16);
    assert!(out[0].tokens.iter().all(|&t| t != cfg.mask_id));
    assert!(out[0].text.is_some(), "the tiny tokenizer decodes the output");
}
