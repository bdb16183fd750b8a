//! LLaDA-MoE's tensor table (docs/design.md §8): OLMoE / Qwen-style names, per-head q/k norm,
//! a router and `num_experts` unfused experts per layer, in the order the official model
//! registers them (so `make-checkpoint` shards like `save_pretrained`). `assemble` stacks the
//! experts as `[E, 2·ffn, hidden]` (gate | up) and `[E, hidden, ffn]`.
use super::{LayerPart, Slot, TensorRole, TensorSpec};
use crate::config::ModelConfig;

/// Every tensor of a LLaDA-MoE checkpoint of `cfg`.
pub(super) fn llada_moe_specs(cfg: &ModelConfig) -> Vec<TensorSpec> {
    use LayerPart::*;
    let (h, f, v, qd, kvd, hd) = (cfg.hidden, cfg.ffn, cfg.vocab, cfg.q_dim(), cfg.kv_dim(), cfg.head_dim);
    let experts = cfg.moe.as_ref().map_or(0, |m| m.n_experts);
    let spec = |name: String, shape: Vec<usize>, role, slot| TensorSpec { name, shape, role, slot };
    let mut out = vec![spec("model.embed_tokens.weight".into(), vec![v, h], TensorRole::Embedding, Slot::Embed)];
    for i in 0..cfg.n_layers {
        let p = format!("model.layers.{i}");
        let mut push = |leaf: String, shape: Vec<usize>, role, part| {
            out.push(spec(format!("{p}.{leaf}"), shape, role, Slot::Layer(i, part)));
        };
        push("self_attn.q_proj.weight".into(), vec![qd, h], TensorRole::Linear, Q);
        push("self_attn.k_proj.weight".into(), vec![kvd, h], TensorRole::Linear, K);
        push("self_attn.v_proj.weight".into(), vec![kvd, h], TensorRole::Linear, V);
        push("self_attn.o_proj.weight".into(), vec![h, qd], TensorRole::Linear, Wo);
        if cfg.qk_norm {
            push("self_attn.q_norm.weight".into(), vec![hd], TensorRole::Norm, QNorm);
            push("self_attn.k_norm.weight".into(), vec![hd], TensorRole::Norm, KNorm);
        }
        push("mlp.gate.weight".into(), vec![experts, h], TensorRole::Linear, Router);
        for e in 0..experts {
            push(format!("mlp.experts.{e}.gate_proj.weight"), vec![f, h], TensorRole::Linear, ExpertGate(e));
            push(format!("mlp.experts.{e}.up_proj.weight"), vec![f, h], TensorRole::Linear, ExpertUp(e));
            push(format!("mlp.experts.{e}.down_proj.weight"), vec![h, f], TensorRole::Linear, ExpertDown(e));
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
    use crate::checkpoint::{random_tensor, random_weights};
    use crate::config::ModelConfig;
    use crate::weights::tensor_specs;

    #[test]
    fn experts_are_stacked_gate_up_then_down() {
        let cfg = ModelConfig::preset("tiny-llada-moe").unwrap();
        let (h, f) = (cfg.hidden, cfg.ffn);
        let w = random_weights(&cfg, 5);
        let specs = tensor_specs(&cfg);
        let find = |n: &str| specs.iter().find(|s| s.name == n).unwrap_or_else(|| panic!("{n}"));
        let l = &w.layers[1];
        let m = l.moe.as_ref().unwrap();
        assert!(l.w_gate_up.is_empty() && l.w_down.is_empty());
        for e in [0, 3, 7] {
            let gate = random_tensor(5, find(&format!("model.layers.1.mlp.experts.{e}.gate_proj.weight")));
            let up = random_tensor(5, find(&format!("model.layers.1.mlp.experts.{e}.up_proj.weight")));
            let down = random_tensor(5, find(&format!("model.layers.1.mlp.experts.{e}.down_proj.weight")));
            let base = e * 2 * f * h;
            assert_eq!(&m.w_gate_up[base..base + f * h], gate.as_slice(), "expert {e} gate");
            assert_eq!(&m.w_gate_up[base + f * h..base + 2 * f * h], up.as_slice(), "expert {e} up");
            assert_eq!(&m.w_down[e * h * f..(e + 1) * h * f], down.as_slice(), "expert {e} down");
        }
        let router = random_tensor(5, find("model.layers.1.mlp.gate.weight"));
        assert_eq!(m.router, router);
        let qn = random_tensor(5, find("model.layers.1.self_attn.q_norm.weight"));
        assert_eq!(l.q_norm.as_deref(), Some(qn.as_slice()));
        assert_eq!(w.param_count(), cfg.param_count());
    }
}
