//! LLaDA2.0's `config.json` (class `LLaDA2MoeModelLM`, model_type `llada2_moe`), the
//! `llada2-mini` preset, and the LLaDA2 checks of `validate()` (docs/design.md §8).
//!
//! Field semantics follow the official modeling code (inclusionAI/dFactory
//! `models/llada2_moe/{configuration,modeling}_llada2_moe.py`): layers below
//! `first_k_dense_replace` have a dense SwiGLU FFN of width `intermediate_size`; the others
//! route over `num_experts` experts of width `moe_intermediate_size` with a sigmoid,
//! group-limited router (`n_group`, `topk_group`, `expert_bias` for selection only, weights
//! renormalised and scaled by `routed_scaling_factor`) and add `num_shared_experts` shared
//! experts as one SwiGLU of width `moe_intermediate_size · num_shared_experts`; q and k get a
//! per-head RMSNorm; RoPE rotates the first `head_dim · partial_rotary_factor` dims. Options
//! the released models do not use (biases, a normed head, RoPE scaling, sliding windows, a
//! non-sigmoid score function) are refused by name rather than run wrong.
use serde::{Deserialize, Serialize};

use super::{Arch, ModelConfig, MoeConfig, HEAD_DIM};
use crate::error::{Error, Result};

/// Released LLaDA2.0 ids (docs/design.md §8).
pub const LLADA2_MASK: u32 = 156895;
pub const LLADA2_EOS: u32 = 156892;

/// The LLaDA2-only shape and routing parameters; `ModelConfig::ffn` is the routed expert width
/// (`moe_intermediate_size`) and `ModelConfig::moe` the expert count and top-k.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Llada2Config {
    /// Layers `0..first_k_dense_replace` have a dense FFN.
    pub first_k_dense: usize,
    /// Width of the dense FFN (`intermediate_size`).
    pub dense_ffn: usize,
    /// Width of the shared expert (`moe_intermediate_size · num_shared_experts`; 0: none).
    pub shared_ffn: usize,
    /// Expert groups (`n_group`) and how many a row keeps (`topk_group`).
    pub n_group: usize,
    pub topk_group: usize,
    /// Multiplies the renormalised routing weights (`routed_scaling_factor`).
    pub routed_scaling: f32,
    /// Dims of each head RoPE rotates (`head_dim · partial_rotary_factor`), rotate-half.
    pub rotary_dim: usize,
    /// Attention block: a query in block b sees keys in blocks ≤ b (absolute positions).
    /// Not in the official config.json (its `generate` takes `block_length`, default 32);
    /// demask reads the extension field `block_length`.
    pub block: usize,
}

#[derive(Debug, Deserialize)]
struct Llada2Json {
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: usize,
    #[serde(default)]
    head_dim: Option<usize>,
    intermediate_size: usize,
    moe_intermediate_size: usize,
    num_experts: usize,
    num_experts_per_tok: usize,
    #[serde(default)]
    num_shared_experts: Option<usize>,
    #[serde(default)]
    first_k_dense_replace: usize,
    n_group: usize,
    topk_group: usize,
    routed_scaling_factor: f64,
    vocab_size: usize,
    rope_theta: f64,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_partial")]
    partial_rotary_factor: f64,
    #[serde(default)]
    use_qkv_bias: bool,
    #[serde(default = "yes")]
    use_bias: bool,
    #[serde(default)]
    norm_head: bool,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    hidden_act: Option<String>,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    use_sliding_window: bool,
    #[serde(default)]
    score_function: Option<String>,
    #[serde(default)]
    mask_token_id: Option<u32>,
    #[serde(default)]
    eos_token_id: Option<u32>,
    /// demask extension: end-of-turn id (defaults to the EOS id).
    #[serde(default)]
    eot_token_id: Option<u32>,
    /// demask extension: the attention block (default 32, the official `generate`'s).
    #[serde(default)]
    block_length: Option<usize>,
    #[serde(default)]
    max_position_embeddings: Option<usize>,
}

fn default_eps() -> f64 {
    1e-5
}
fn default_partial() -> f64 {
    0.5
}
fn yes() -> bool {
    true
}

/// Whether `model_type` names LLaDA2 (the official file's and dFactory's training variant).
pub(super) fn is_llada2(model_type: &str) -> bool {
    matches!(model_type, "llada2_moe" | "llada2_moe_veomni")
}

/// Parses LLaDA2's config.json; refuses the options the engine does not run.
pub(super) fn from_llada2_json(v: serde_json::Value) -> Result<ModelConfig> {
    let j: Llada2Json =
        serde_json::from_value(v).map_err(|e| Error::bad_input(format!("LLaDA2 config.json: {e}")))?;
    let unsupported = |field: &str, what: String| Err(Error::config(field, format!("{what} is not supported (LLaDA2.0 does not use it)")));
    if j.use_qkv_bias {
        return unsupported("use_qkv_bias", "true".into());
    }
    if j.use_bias {
        return unsupported("use_bias", "true (the class default; LLaDA2.0 sets false)".into());
    }
    if j.norm_head {
        return unsupported("norm_head", "true".into());
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
    if j.use_sliding_window {
        return unsupported("use_sliding_window", "true".into());
    }
    if let Some(f) = j.score_function.as_deref().filter(|f| *f != "sigmoid") {
        return unsupported("score_function", format!("`{f}` (the official router is sigmoid)"));
    }
    let head_dim = j.head_dim.unwrap_or(j.hidden_size.checked_div(j.num_attention_heads).unwrap_or(0));
    if j.num_attention_heads * head_dim != j.hidden_size {
        return unsupported("head_dim", format!("{head_dim} with num_attention_heads · head_dim != hidden_size"));
    }
    let rot = head_dim as f64 * j.partial_rotary_factor;
    if !(rot >= 2.0 && rot <= head_dim as f64 && rot.fract() == 0.0 && (rot as usize).is_multiple_of(2)) {
        return Err(Error::config(
            "partial_rotary_factor",
            format!("{} gives {rot} rotary dims of {head_dim} (need an even count in 2..=head_dim)", j.partial_rotary_factor),
        ));
    }
    let eos = j.eos_token_id.unwrap_or(LLADA2_EOS);
    Ok(ModelConfig {
        arch: Arch::Llada2,
        n_layers: j.num_hidden_layers,
        hidden: j.hidden_size,
        ffn: j.moe_intermediate_size,
        n_heads: j.num_attention_heads,
        n_kv_heads: j.num_key_value_heads,
        head_dim,
        vocab: j.vocab_size,
        rope_theta: j.rope_theta,
        norm_eps: j.rms_norm_eps,
        qkv_bias: false,
        mask_id: j.mask_token_id.unwrap_or(LLADA2_MASK),
        eos_id: eos,
        eot_id: j.eot_token_id.unwrap_or(eos),
        max_seq_len: j.max_position_embeddings.unwrap_or(16384),
        qk_norm: true,
        moe: Some(MoeConfig { n_experts: j.num_experts, top_k: j.num_experts_per_tok, norm_topk_prob: j.num_experts_per_tok > 1 }),
        llada2: Some(Llada2Config {
            first_k_dense: j.first_k_dense_replace,
            dense_ffn: j.intermediate_size,
            shared_ffn: j.moe_intermediate_size * j.num_shared_experts.unwrap_or(0),
            n_group: j.n_group,
            topk_group: j.topk_group,
            routed_scaling: j.routed_scaling_factor as f32,
            rotary_dim: rot as usize,
            block: j.block_length.unwrap_or(32),
        }),
    })
}

/// LLaDA2's config.json for `cfg` (what `make-checkpoint` writes): every field the official
/// config class reads, plus demask's `mask_token_id` / `eot_token_id` / `block_length`.
pub(super) fn to_llada2_json(cfg: &ModelConfig) -> serde_json::Value {
    let (experts, top_k) = cfg.moe.as_ref().map_or((0, 0), |m| (m.n_experts, m.top_k));
    let l = cfg.llada2.clone().unwrap_or_else(|| llada2_mini().llada2.expect("preset has llada2"));
    let mut j = serde_json::json!({
        "architectures": ["LLaDA2MoeModelLM"],
        "model_type": "llada2_moe",
        "hidden_size": cfg.hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": l.dense_ffn,
        "moe_intermediate_size": cfg.ffn,
        "num_experts": experts,
        "num_experts_per_tok": top_k,
        "num_shared_experts": l.shared_ffn / cfg.ffn.max(1),
        "first_k_dense_replace": l.first_k_dense,
        "n_group": l.n_group,
        "topk_group": l.topk_group,
        "routed_scaling_factor": l.routed_scaling,
        "norm_topk_prob": true,
        "score_function": "sigmoid",
        "moe_router_enable_expert_bias": true,
        "router_dtype": "fp32",
        "partial_rotary_factor": l.rotary_dim as f64 / cfg.head_dim as f64,
        "rotary_dim": l.rotary_dim,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": null,
        "rms_norm_eps": cfg.norm_eps,
        "vocab_size": cfg.vocab,
        "max_position_embeddings": cfg.max_seq_len,
        "use_qkv_bias": false,
        "use_bias": false,
        "use_qk_norm": true,
        "norm_head": false,
        "use_rmsnorm": true,
        "use_sliding_window": false,
        "hidden_act": "silu",
        "embedding_dropout": 0.0,
        "attention_dropout": 0.0,
        "output_dropout": 0.0,
        "initializer_range": 0.02,
        "output_router_logits": false
    });
    let ids = serde_json::json!({
        "mask_token_id": cfg.mask_id,
        "eos_token_id": cfg.eos_id,
        "eot_token_id": cfg.eot_id,
        "pad_token_id": cfg.eos_id,
        "block_length": l.block,
        "tie_word_embeddings": false,
        "use_cache": false,
        "torch_dtype": "bfloat16"
    });
    if let (Some(o), serde_json::Value::Object(more)) = (j.as_object_mut(), ids) {
        o.extend(more);
    }
    j
}

/// LLaDA2.0-mini (docs/design.md §8): 20 layers, hidden 2048, 16 / 4 heads, layer 0 dense
/// (5120), 256 experts of width 512 in 8 groups (keep 4), top-8, one shared expert, scaling
/// 2.5, RoPE over 64 of 128 dims with theta 600000, eps 1e-6, block 32.
pub(super) fn llada2_mini() -> ModelConfig {
    ModelConfig {
        arch: Arch::Llada2,
        n_layers: 20,
        hidden: 2048,
        ffn: 512,
        n_heads: 16,
        n_kv_heads: 4,
        head_dim: HEAD_DIM,
        vocab: 157184,
        rope_theta: 600000.0,
        norm_eps: 1e-6,
        qkv_bias: false,
        mask_id: LLADA2_MASK,
        eos_id: LLADA2_EOS,
        eot_id: LLADA2_EOS,
        max_seq_len: 16384,
        qk_norm: true,
        moe: Some(MoeConfig { n_experts: 256, top_k: 8, norm_topk_prob: true }),
        llada2: Some(Llada2Config {
            first_k_dense: 1,
            dense_ffn: 5120,
            shared_ffn: 512,
            n_group: 8,
            topk_group: 4,
            routed_scaling: 2.5,
            rotary_dim: 64,
            block: 32,
        }),
    }
}

/// The LLaDA2 part of `validate()`: groups that split the experts into groups of at least two
/// (the group score sums a group's top 2), `topk_group` groups holding at least `top_k`
/// experts, a dense prefix within the layers, widths that are multiples of 8.
pub(super) fn validate_llada2(cfg: &ModelConfig) -> Result<()> {
    let (l, m) = match (cfg.arch, &cfg.llada2, &cfg.moe) {
        (Arch::Llada2, Some(l), Some(m)) => (l, m),
        (Arch::Llada2, _, _) => return Err(Error::config("num_experts", "missing: LLaDA2 needs its experts and routing")),
        (_, Some(_), _) => return Err(Error::config("model_type", "LLaDA2 parameters on another architecture")),
        _ => return Ok(()),
    };
    if l.n_group == 0 || !m.n_experts.is_multiple_of(l.n_group) || m.n_experts / l.n_group < 2 {
        return Err(Error::config(
            "n_group",
            format!("{} does not split num_experts = {} into groups of at least 2", l.n_group, m.n_experts),
        ));
    }
    if l.topk_group == 0 || l.topk_group > l.n_group || l.topk_group * (m.n_experts / l.n_group) < m.top_k {
        return Err(Error::config(
            "topk_group",
            format!("{} of {} groups cannot hold num_experts_per_tok = {}", l.topk_group, l.n_group, m.top_k),
        ));
    }
    if l.first_k_dense > cfg.n_layers {
        return Err(Error::config("first_k_dense_replace", format!("{} exceeds num_hidden_layers = {}", l.first_k_dense, cfg.n_layers)));
    }
    for (field, v) in [("intermediate_size", l.dense_ffn), ("num_shared_experts", l.shared_ffn)] {
        if !v.is_multiple_of(8) || (field == "intermediate_size" && l.first_k_dense > 0 && v == 0) {
            return Err(Error::config(field, format!("width {v} is not a positive multiple of 8")));
        }
    }
    if !(l.routed_scaling.is_finite() && l.routed_scaling > 0.0) {
        return Err(Error::config("routed_scaling_factor", format!("{} is out of range (> 0)", l.routed_scaling)));
    }
    if l.rotary_dim == 0 || l.rotary_dim > cfg.head_dim || !l.rotary_dim.is_multiple_of(2) {
        return Err(Error::config("partial_rotary_factor", format!("{} rotary dims of {}", l.rotary_dim, cfg.head_dim)));
    }
    if l.block == 0 || l.block > cfg.max_seq_len {
        return Err(Error::config("block_length", format!("{} is out of range (1..=max_position_embeddings)", l.block)));
    }
    Ok(())
}

/// Is layer `i` dense (below `first_k_dense_replace`)?
pub fn llada2_dense_layer(cfg: &ModelConfig, i: usize) -> bool {
    cfg.llada2.as_ref().is_some_and(|l| i < l.first_k_dense)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> serde_json::Value {
        ModelConfig::preset("tiny-llada2").unwrap().to_hf_json()
    }

    fn refused(field: &str, value: serde_json::Value, named: &str) {
        crate::config::assert_refused("tiny-llada2", field, value, named);
    }

    #[test]
    fn released_shape_and_counts() {
        let c = ModelConfig::preset("llada2-mini").unwrap();
        c.validate().unwrap();
        assert_eq!((c.qkv_dim(), c.q_dim(), c.kv_dim()), (24 * 128, 2048, 512));
        // Embedding + LM head; per layer attention (packed QKV 24 heads, dense, q/k norms, two
        // norms); layer 0 dense 3·2048·5120; layers 1-19: 256 experts of 3·2048·512, router
        // and bias 256·2049, shared expert 3·2048·512.
        let attn = 2048u64 * 24 * 128 + 2048 * 2048 + 256 + 2 * 2048;
        let moe = |k: u64| k * 3 * 2048 * 512 + 256 * 2049 + 3 * 2048 * 512;
        let common = 2 * 157184 * 2048 + 20 * attn + 3 * 2048 * 5120 + 2048;
        assert_eq!(c.param_count(), common + 19 * moe(256));
        assert_eq!(c.active_param_count(), common + 19 * moe(8));
        assert_eq!((c.param_count(), c.active_param_count()), (16_255_643_392, 1_432_973_056)); // "16B", 1.4B active
    }

    #[test]
    fn config_json_round_trips_and_reads_the_released_fields() {
        let c = ModelConfig::from_json(&tiny().to_string()).unwrap();
        assert_eq!(c, ModelConfig::preset("tiny-llada2").unwrap());
        assert_eq!(c.arch, Arch::Llada2);
        let l = c.llada2.unwrap();
        assert_eq!((l.first_k_dense, l.dense_ffn, l.shared_ffn, l.n_group, l.topk_group), (1, 256, 64, 4, 2));
        assert_eq!((l.rotary_dim, l.block, l.routed_scaling), (64, 32, 2.5));
        // dFactory's training variant of the model_type reads the same way; absent ids take
        // the released values.
        let mut j = ModelConfig::preset("llada2-mini").unwrap().to_hf_json();
        j["model_type"] = serde_json::json!("llada2_moe_veomni");
        for k in ["mask_token_id", "eos_token_id", "eot_token_id", "block_length"] {
            j.as_object_mut().unwrap().remove(k);
        }
        let c = ModelConfig::from_json(&j.to_string()).unwrap();
        assert_eq!(c, ModelConfig::preset("llada2-mini").unwrap());
        assert_eq!((c.mask_id, c.eos_id), (LLADA2_MASK, LLADA2_EOS));
    }

    #[test]
    fn unsupported_and_bad_values_are_refused_by_name() {
        refused("use_qkv_bias", serde_json::json!(true), "use_qkv_bias");
        refused("use_bias", serde_json::json!(true), "use_bias");
        refused("norm_head", serde_json::json!(true), "norm_head");
        refused("rope_scaling", serde_json::json!({"type": "linear", "factor": 2.0}), "rope_scaling");
        refused("hidden_act", serde_json::json!("gelu"), "hidden_act");
        refused("tie_word_embeddings", serde_json::json!(true), "tie_word_embeddings");
        refused("use_sliding_window", serde_json::json!(true), "use_sliding_window");
        refused("score_function", serde_json::json!("softmax"), "score_function");
        refused("head_dim", serde_json::json!(64), "head_dim");
        refused("partial_rotary_factor", serde_json::json!(0.3), "partial_rotary_factor");
        refused("partial_rotary_factor", serde_json::json!(0.0), "partial_rotary_factor");
        refused("n_group", serde_json::json!(3), "n_group");
        refused("n_group", serde_json::json!(16), "n_group");
        refused("topk_group", serde_json::json!(0), "topk_group");
        refused("topk_group", serde_json::json!(5), "topk_group");
        refused("num_experts_per_tok", serde_json::json!(9), "topk_group");
        refused("first_k_dense_replace", serde_json::json!(4), "first_k_dense_replace");
        refused("intermediate_size", serde_json::json!(100), "intermediate_size");
        refused("routed_scaling_factor", serde_json::json!(0.0), "routed_scaling_factor");
        refused("block_length", serde_json::json!(0), "block_length");
        refused("num_experts", serde_json::json!(0), "num_experts");
        refused("moe_intermediate_size", serde_json::json!(0), "moe_intermediate_size");
        refused("mask_token_id", serde_json::json!(512), "mask_token_id");
    }
}
