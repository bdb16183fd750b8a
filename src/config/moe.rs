//! LLaDA-MoE's `config.json` (class `LLaDAMoEModelLM`, OLMoE-derived names; its `model_type`
//! is "llada", like dense LLaDA's, so it is told apart by `architectures` or `num_experts`),
//! the `llada-moe-7b` preset, and the MoE checks of `validate()`.
//!
//! Field semantics follow the official modeling code (inclusionAI/dInfer
//! `tools/configuration_lladamoe.py`, `tools/modeling_fused_lladamoe.py`): the routed MoE block
//! takes a softmax over all experts in f32 and the top `num_experts_per_tok`, and never
//! renormalises them (it hard-codes `norm_topk_prob = False` whatever the config says); q and
//! k get a per-head RMSNorm when `qk_layernorm` is true; RoPE rotates
//! `head_dim · partial_rotary_factor` dims (the class default -1 rotates none). Options the
//! released model does not use (dense layers, a shared expert, expert bias, partial RoPE,
//! q/k/v clipping, RoPE scaling, biases) are refused by name rather than run wrong.
use serde::Deserialize;

use super::{Arch, ModelConfig, MoeConfig, MAX_EXPERTS};
use crate::error::{Error, Result};

/// Released LLaDA-MoE ids (docs/design.md §8); the mask id is absent from its config.json.
pub const LLADA_MOE_MASK: u32 = 156895;
pub const LLADA_MOE_EOS: u32 = 156892;

/// LLaDA-MoE `config.json`, the fields demask reads (names as the official config class).
#[derive(Debug, Deserialize)]
struct LladaMoeJson {
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    expert_intermediate_size: usize,
    num_experts: usize,
    num_experts_per_tok: usize,
    vocab_size: usize,
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default)]
    partial_rotary_factor: Option<f64>,
    #[serde(default)]
    norm_topk_prob: Option<bool>,
    #[serde(default)]
    qk_layernorm: Option<bool>,
    #[serde(default)]
    moe_layer_freq: Option<Vec<i64>>,
    #[serde(default)]
    shared_expert_intermediate_size: Option<usize>,
    #[serde(default)]
    moe_router_enable_expert_bias: Option<bool>,
    #[serde(default)]
    moe_router_score_function: Option<String>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    clip_qkv: Option<f64>,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    hidden_act: Option<String>,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    mask_token_id: Option<u32>,
    #[serde(default)]
    eos_token_id: Option<u32>,
    /// demask extension: end-of-turn id (defaults to the EOS id).
    #[serde(default)]
    eot_token_id: Option<u32>,
    #[serde(default)]
    max_position_embeddings: Option<usize>,
}

fn default_eps() -> f64 {
    1e-5
}

/// Whether a `config.json` (model_type "llada" or "lladamoe") describes LLaDA-MoE.
pub(super) fn is_llada_moe(v: &serde_json::Value) -> bool {
    let mt = v.get("model_type").and_then(|m| m.as_str()).unwrap_or("").to_ascii_lowercase();
    let class = v
        .get("architectures")
        .and_then(|a| a.as_array())
        .is_some_and(|a| a.iter().any(|c| matches!(c.as_str(), Some("LLaDAMoEModelLM" | "LLaDAMoEModel"))));
    mt != "llada" || class || v.get("num_experts").is_some()
}

/// Parses LLaDA-MoE's config.json; refuses the options the engine does not run.
pub(super) fn from_llada_moe_json(v: serde_json::Value) -> Result<ModelConfig> {
    let j: LladaMoeJson =
        serde_json::from_value(v).map_err(|e| Error::bad_input(format!("LLaDA-MoE config.json: {e}")))?;
    let unsupported = |field: &str, what: String| Err(Error::config(field, format!("{what} is not supported (LLaDA-MoE-7B-A1B does not use it)")));
    match j.partial_rotary_factor {
        Some(1.0) => {}
        Some(f) => return unsupported("partial_rotary_factor", format!("{f} (partial RoPE)")),
        None => {
            return Err(Error::config(
                "partial_rotary_factor",
                "missing: the official class default (-1) rotates no dimension; LLaDA-MoE-7B-A1B uses 1.0",
            ))
        }
    }
    if j.norm_topk_prob == Some(true) {
        return Err(Error::config(
            "norm_topk_prob",
            "true, but the official LLaDA-MoE block never renormalises the top-k weights (it hard-codes False): set it to false",
        ));
    }
    if let Some(freq) = &j.moe_layer_freq {
        if freq.len() < j.num_hidden_layers {
            return Err(Error::config(
                "moe_layer_freq",
                format!("has {} entries for num_hidden_layers = {}", freq.len(), j.num_hidden_layers),
            ));
        }
        if let Some(i) = freq.iter().take(j.num_hidden_layers).position(|&f| f == 0) {
            return unsupported("moe_layer_freq", format!("a dense layer (layer {i})"));
        }
    }
    if let Some(s) = j.shared_expert_intermediate_size.filter(|&s| s > 0) {
        return unsupported("shared_expert_intermediate_size", format!("a shared expert (width {s})"));
    }
    if j.moe_router_enable_expert_bias == Some(true) {
        return unsupported("moe_router_enable_expert_bias", "an expert bias".into());
    }
    if let Some(f) = j.moe_router_score_function.as_deref().filter(|f| *f != "softmax") {
        return unsupported("moe_router_score_function", format!("`{f}`"));
    }
    if j.attention_bias {
        return unsupported("attention_bias", "true".into());
    }
    if let Some(c) = j.clip_qkv {
        return unsupported("clip_qkv", format!("{c}"));
    }
    if let Some(r) = j.rope_scaling.as_ref().filter(|r| !r.is_null()) {
        return unsupported("rope_scaling", format!("{r}"));
    }
    if let Some(a) = j.hidden_act.as_deref().filter(|a| *a != "silu") {
        return unsupported("hidden_act", format!("`{a}`"));
    }
    if j.tie_word_embeddings {
        return unsupported("tie_word_embeddings", "true".into());
    }
    let rope_theta = j.rope_theta.ok_or_else(|| Error::config("rope_theta", "missing (the official class has no default)"))?;
    let eos = j.eos_token_id.unwrap_or(LLADA_MOE_EOS);
    Ok(ModelConfig {
        arch: Arch::LladaMoe,
        n_layers: j.num_hidden_layers,
        hidden: j.hidden_size,
        ffn: j.expert_intermediate_size,
        n_heads: j.num_attention_heads,
        n_kv_heads: j.num_key_value_heads.unwrap_or(j.num_attention_heads),
        head_dim: j.hidden_size.checked_div(j.num_attention_heads).unwrap_or(0),
        vocab: j.vocab_size,
        rope_theta,
        norm_eps: j.rms_norm_eps,
        qkv_bias: false,
        mask_id: j.mask_token_id.unwrap_or(LLADA_MOE_MASK),
        eos_id: eos,
        eot_id: j.eot_token_id.unwrap_or(eos),
        max_seq_len: j.max_position_embeddings.unwrap_or(4096),
        qk_norm: j.qk_layernorm.unwrap_or(false),
        moe: Some(MoeConfig { n_experts: j.num_experts, top_k: j.num_experts_per_tok, norm_topk_prob: false }),
        llada2: None,
    })
}

/// LLaDA-MoE's config.json for `cfg` (what `make-checkpoint` writes), every field the official
/// config class reads, plus demask's `mask_token_id` / `eot_token_id`.
pub(super) fn to_llada_moe_json(cfg: &ModelConfig) -> serde_json::Value {
    let (experts, top_k) = cfg.moe.as_ref().map_or((0, 0), |m| (m.n_experts, m.top_k));
    serde_json::json!({
        "architectures": ["LLaDAMoEModelLM"],
        "model_type": "llada",
        "hidden_size": cfg.hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "expert_intermediate_size": cfg.ffn,
        "dense_intermediate_size": 4 * cfg.hidden,
        "shared_expert_intermediate_size": null,
        "num_experts": experts,
        "num_experts_per_tok": top_k,
        "norm_topk_prob": false,
        "qk_layernorm": cfg.qk_norm,
        "moe_layer_freq": vec![1; cfg.n_layers],
        "moe_router_enable_expert_bias": false,
        "moe_router_score_function": "softmax",
        "routed_scaling_factor": 1,
        "router_num_group": -2,
        "router_topk_group": -2,
        "router_aux_loss_coef": 0.01,
        "output_router_logits": false,
        "partial_rotary_factor": 1.0,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": null,
        "rms_norm_eps": cfg.norm_eps,
        "vocab_size": cfg.vocab,
        "max_position_embeddings": cfg.max_seq_len,
        "attention_bias": false,
        "attention_dropout": 0.0,
        "clip_qkv": null,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "mask_token_id": cfg.mask_id,
        "eos_token_id": cfg.eos_id,
        "eot_token_id": cfg.eot_id,
        "pad_token_id": cfg.eos_id,
        "tie_word_embeddings": false,
        "use_cache": false,
        "torch_dtype": "bfloat16"
    })
}

/// LLaDA-MoE-7B-A1B (docs/design.md §8): 16 layers, hidden 2048, 16 heads, 64 experts of
/// width 1024, top-8, q/k norm, theta 50000.
pub(super) fn llada_moe_7b() -> ModelConfig {
    ModelConfig {
        arch: Arch::LladaMoe,
        n_layers: 16,
        hidden: 2048,
        ffn: 1024,
        n_heads: 16,
        n_kv_heads: 16,
        head_dim: 128,
        vocab: 157184,
        rope_theta: 50000.0,
        norm_eps: 1e-5,
        qkv_bias: false,
        mask_id: LLADA_MOE_MASK,
        eos_id: LLADA_MOE_EOS,
        eot_id: LLADA_MOE_EOS,
        max_seq_len: 8192,
        qk_norm: true,
        moe: Some(MoeConfig { n_experts: 64, top_k: 8, norm_topk_prob: false }),
        llada2: None,
    }
}

/// The MoE part of `validate()`: an MoE config exactly when the architecture has one, at
/// least one expert, `1 <= top_k <= experts`, and no q/k bias.
pub(super) fn validate_moe(cfg: &ModelConfig) -> Result<()> {
    match (cfg.arch, &cfg.moe) {
        (Arch::LladaMoe, None) => Err(Error::config("num_experts", "missing: LLaDA-MoE needs its expert count")),
        (Arch::Llada | Arch::Dream, Some(_)) => {
            Err(Error::config("num_experts", "set on a dense architecture (only LLaDA-MoE and LLaDA2 have experts)"))
        }
        (Arch::Llada | Arch::Dream, None) => Ok(()),
        (Arch::Llada2, None) => Err(Error::config("num_experts", "missing: LLaDA2 needs its expert count")),
        (Arch::LladaMoe | Arch::Llada2, Some(m)) => {
            if m.n_experts == 0 || m.n_experts > MAX_EXPERTS {
                return Err(Error::config("num_experts", format!("{} is out of range (1..={MAX_EXPERTS})", m.n_experts)));
            }
            if m.top_k == 0 || m.top_k > m.n_experts {
                return Err(Error::config(
                    "num_experts_per_tok",
                    format!("{} is out of range (1..=num_experts = {})", m.top_k, m.n_experts),
                ));
            }
            if cfg.qkv_bias {
                return Err(Error::config("attention_bias", "LLaDA-MoE has no q/k/v bias"));
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> serde_json::Value {
        ModelConfig::preset("tiny-llada-moe").unwrap().to_hf_json()
    }

    fn refused(field: &str, value: serde_json::Value, named: &str) {
        crate::config::assert_refused("tiny-llada-moe", field, value, named);
    }

    #[test]
    fn released_shape_and_counts() {
        let c = ModelConfig::preset("llada-moe-7b").unwrap();
        c.validate().unwrap();
        // Embedding + LM head 2·157184·2048; per layer: attention 4·2048², router 64·2048,
        // q/k norms 2·128, two norms 2·2048, experts 64·3·2048·1024.
        let attn = 4 * 2048u64 * 2048 + 64 * 2048 + 2 * 128 + 2 * 2048;
        let total = 2 * 157184 * 2048 + 16 * (attn + 64 * 3 * 2048 * 1024) + 2048;
        let active = 2 * 157184 * 2048 + 16 * (attn + 8 * 3 * 2048 * 1024) + 2048;
        assert_eq!(c.param_count(), total);
        assert_eq!(c.active_param_count(), active);
        assert_eq!((c.param_count(), c.active_param_count()), (7_356_880_896, 1_719_736_320)); // "7B", 1.7B active with embeddings
        let dense = ModelConfig::preset("llada-8b").unwrap();
        assert_eq!(dense.param_count(), dense.active_param_count());
    }

    #[test]
    fn told_apart_from_dense_llada_by_class_or_experts() {
        let c = ModelConfig::from_json(&tiny().to_string()).unwrap();
        assert_eq!(c.arch, Arch::LladaMoe);
        assert!(c.qk_norm);
        assert_eq!(c.moe, Some(MoeConfig { n_experts: 8, top_k: 2, norm_topk_prob: false }));
        let mut j = tiny();
        j["architectures"] = serde_json::json!(["SomethingElse"]);
        assert_eq!(ModelConfig::from_json(&j.to_string()).unwrap().arch, Arch::LladaMoe, "num_experts alone says MoE");
        let dense = ModelConfig::preset("tiny-llada").unwrap().to_hf_json();
        assert_eq!(ModelConfig::from_json(&dense.to_string()).unwrap().arch, Arch::Llada);
    }

    #[test]
    fn released_defaults_for_absent_ids() {
        let mut j = tiny();
        let o = j.as_object_mut().unwrap();
        for k in ["mask_token_id", "eos_token_id", "eot_token_id"] {
            o.remove(k);
        }
        j["vocab_size"] = serde_json::json!(157184);
        let c = ModelConfig::from_json(&j.to_string()).unwrap();
        assert_eq!((c.mask_id, c.eos_id, c.eot_id), (LLADA_MOE_MASK, LLADA_MOE_EOS, LLADA_MOE_EOS));
    }

    #[test]
    fn bad_moe_values_are_refused_by_name() {
        refused("num_experts", serde_json::json!(0), "num_experts");
        refused("num_experts", serde_json::json!(100_000), "num_experts");
        refused("num_experts_per_tok", serde_json::json!(0), "num_experts_per_tok");
        refused("num_experts_per_tok", serde_json::json!(9), "num_experts_per_tok");
        refused("expert_intermediate_size", serde_json::json!(0), "expert_intermediate_size");
        refused("expert_intermediate_size", serde_json::json!(100), "expert_intermediate_size");
        refused("norm_topk_prob", serde_json::json!(true), "norm_topk_prob");
        refused("partial_rotary_factor", serde_json::json!(0.5), "partial_rotary_factor");
        refused("moe_layer_freq", serde_json::json!([1, 0]), "moe_layer_freq");
        refused("moe_layer_freq", serde_json::json!([1]), "moe_layer_freq");
        refused("shared_expert_intermediate_size", serde_json::json!(512), "shared_expert_intermediate_size");
        refused("moe_router_enable_expert_bias", serde_json::json!(true), "moe_router_enable_expert_bias");
        refused("moe_router_score_function", serde_json::json!("sigmoid"), "moe_router_score_function");
        refused("attention_bias", serde_json::json!(true), "attention_bias");
        refused("clip_qkv", serde_json::json!(8.0), "clip_qkv");
        refused("hidden_size", serde_json::json!(384), "num_attention_heads");
        refused("rope_theta", serde_json::json!(null), "rope_theta");
        refused("mask_token_id", serde_json::json!(512), "mask_token_id");
        let mut j = tiny();
        j.as_object_mut().unwrap().remove("partial_rotary_factor");
        let e = ModelConfig::from_json(&j.to_string()).unwrap_err().to_string();
        assert!(e.contains("`partial_rotary_factor`"), "{e}");
    }
}
