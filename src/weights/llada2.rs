//! LLaDA2's tensor table (docs/design.md §8), in the order the official model registers them
//! (so `make-checkpoint` shards like `save_pretrained`): a packed `attention.query_key_value`
//! (rows: Q heads, K heads, V heads, as the official `split` takes them), per-head q/k norms,
//! `attention.dense`; a dense `mlp.{gate,up,down}_proj` below `first_k_dense_replace`, else the
//! experts, the router `mlp.gate.weight` with its f32 `mlp.gate.expert_bias`, and the shared
//! expert `mlp.shared_experts.*`. `assemble` stacks the experts as in LLaDA-MoE.
use super::{LayerPart, Slot, TensorRole, TensorSpec};
use crate::config::{llada2_dense_layer, ModelConfig};

/// Every tensor of a LLaDA2 checkpoint of `cfg`.
pub(super) fn llada2_specs(cfg: &ModelConfig) -> Vec<TensorSpec> {
    use LayerPart::*;
    let (h, f, v, qd, qkv, hd) = (cfg.hidden, cfg.ffn, cfg.vocab, cfg.q_dim(), cfg.qkv_dim(), cfg.head_dim);
    let experts = cfg.moe.as_ref().map_or(0, |m| m.n_experts);
    let (dense_f, shared_f) = cfg.llada2.as_ref().map_or((0, 0), |l| (l.dense_ffn, l.shared_ffn));
    let spec = |name: String, shape: Vec<usize>, role, slot| TensorSpec { name, shape, role, slot };
    let mut out = vec![spec("model.word_embeddings.weight".into(), vec![v, h], TensorRole::Embedding, Slot::Embed)];
    for i in 0..cfg.n_layers {
        let p = format!("model.layers.{i}");
        let mut push = |leaf: String, shape: Vec<usize>, role, part| {
            out.push(spec(format!("{p}.{leaf}"), shape, role, Slot::Layer(i, part)));
        };
        push("attention.query_key_value.weight".into(), vec![qkv, h], TensorRole::Linear, Qkv);
        push("attention.query_layernorm.weight".into(), vec![hd], TensorRole::Norm, QNorm);
        push("attention.key_layernorm.weight".into(), vec![hd], TensorRole::Norm, KNorm);
        push("attention.dense.weight".into(), vec![h, qd], TensorRole::Linear, Wo);
        if llada2_dense_layer(cfg, i) {
            push("mlp.gate_proj.weight".into(), vec![dense_f, h], TensorRole::Linear, Gate);
            push("mlp.up_proj.weight".into(), vec![dense_f, h], TensorRole::Linear, Up);
            push("mlp.down_proj.weight".into(), vec![h, dense_f], TensorRole::Linear, Down);
        } else {
            for e in 0..experts {
                push(format!("mlp.experts.{e}.gate_proj.weight"), vec![f, h], TensorRole::Linear, ExpertGate(e));
                push(format!("mlp.experts.{e}.up_proj.weight"), vec![f, h], TensorRole::Linear, ExpertUp(e));
                push(format!("mlp.experts.{e}.down_proj.weight"), vec![h, f], TensorRole::Linear, ExpertDown(e));
            }
            push("mlp.gate.weight".into(), vec![experts, h], TensorRole::Linear, Router);
            push("mlp.gate.expert_bias".into(), vec![experts], TensorRole::ExpertBias, ExpertBias);
            if shared_f > 0 {
                push("mlp.shared_experts.gate_proj.weight".into(), vec![shared_f, h], TensorRole::Linear, SharedGate);
                push("mlp.shared_experts.up_proj.weight".into(), vec![shared_f, h], TensorRole::Linear, SharedUp);
                push("mlp.shared_experts.down_proj.weight".into(), vec![h, shared_f], TensorRole::Linear, SharedDown);
            }
        }
        push("input_layernorm.weight".into(), vec![h], TensorRole::Norm, AttnNorm);
        push("post_attention_layernorm.weight".into(), vec![h], TensorRole::Norm, FfnNorm);
    }
    out.push(spec("model.norm.weight".into(), vec![h], TensorRole::Norm, Slot::FinalNorm));
    out.push(spec("lm_head.weight".into(), vec![v, h], TensorRole::Linear, Slot::LmHead));
    out
}

#[cfg(test)]
mod tests {
    use crate::checkpoint::{random_tensor, random_tensor_f32, random_weights};
    use crate::config::ModelConfig;
    use crate::weights::tensor_specs;

    #[test]
    fn packed_qkv_dense_prefix_shared_expert_and_f32_bias_land_in_place() {
        let cfg = ModelConfig::preset("tiny-llada2").unwrap();
        let (h, f) = (cfg.hidden, cfg.ffn);
        let l2 = cfg.llada2.clone().unwrap();
        let w = random_weights(&cfg, 9);
        let specs = tensor_specs(&cfg);
        let find = |n: &str| specs.iter().find(|s| s.name == n).unwrap_or_else(|| panic!("{n}"));
        // Layer 0 is dense, with no experts.
        let l0 = &w.layers[0];
        assert!(l0.moe.is_none());
        let gate = random_tensor(9, find("model.layers.0.mlp.gate_proj.weight"));
        let up = random_tensor(9, find("model.layers.0.mlp.up_proj.weight"));
        assert_eq!(&l0.w_gate_up[..l2.dense_ffn * h], gate.as_slice());
        assert_eq!(&l0.w_gate_up[l2.dense_ffn * h..], up.as_slice());
        assert!(specs.iter().all(|s| !s.name.starts_with("model.layers.0.mlp.experts")));
        // The packed QKV is taken whole (the official split: Q heads, K heads, V heads).
        let qkv = random_tensor(9, find("model.layers.1.attention.query_key_value.weight"));
        assert_eq!(w.layers[1].wqkv, qkv);
        let l = &w.layers[2];
        let m = l.moe.as_ref().unwrap();
        assert!(l.w_gate_up.is_empty() && l.w_down.is_empty());
        for e in [0, 5, 15] {
            let gate = random_tensor(9, find(&format!("model.layers.2.mlp.experts.{e}.gate_proj.weight")));
            let down = random_tensor(9, find(&format!("model.layers.2.mlp.experts.{e}.down_proj.weight")));
            assert_eq!(&m.w_gate_up[e * 2 * f * h..e * 2 * f * h + f * h], gate.as_slice(), "expert {e} gate");
            assert_eq!(&m.w_down[e * h * f..(e + 1) * h * f], down.as_slice(), "expert {e} down");
        }
        let bias = random_tensor_f32(9, find("model.layers.2.mlp.gate.expert_bias"));
        assert_eq!(m.expert_bias, bias);
        assert!(bias.iter().any(|&b| half::bf16::from_f32(b).to_f32() != b), "the bias keeps f32 precision");
        let su = random_tensor(9, find("model.layers.2.mlp.shared_experts.up_proj.weight"));
        assert_eq!(&m.shared_gate_up[l2.shared_ffn * h..], su.as_slice());
        assert_eq!(w.param_count(), cfg.param_count());
    }
}
