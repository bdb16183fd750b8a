//! The built-in architectures (`--preset`): the released models' shapes (llada-8b, dream-7b,
//! llada-moe-7b, llada2-mini) and the tiny test models, whose 512-token vocabulary ends in the special ids of
//! the tiny tokenizer.
use super::{llada2, moe, Arch, Llada2Config, ModelConfig, MoeConfig};
use crate::error::{Error, Result};

impl ModelConfig {
    /// A built-in architecture by name: tiny-llada, tiny-dream, tiny-llada-moe, tiny-llada2,
    /// llada-8b, dream-7b, llada-moe-7b, llada2-mini.
    pub fn preset(name: &str) -> Result<Self> {
        let llada8b = ModelConfig {
            arch: Arch::Llada,
            n_layers: 32,
            hidden: 4096,
            ffn: 12288,
            n_heads: 32,
            n_kv_heads: 32,
            head_dim: 128,
            vocab: 126464,
            rope_theta: 500000.0,
            norm_eps: 1e-5,
            qkv_bias: false,
            mask_id: 126336,
            eos_id: 126081,
            eot_id: 126348,
            max_seq_len: 4096,
            qk_norm: false,
            moe: None,
            llada2: None,
        };
        let dream7b = ModelConfig {
            arch: Arch::Dream,
            n_layers: 28,
            hidden: 3584,
            ffn: 18944,
            n_heads: 28,
            n_kv_heads: 4,
            head_dim: 128,
            vocab: 152064,
            rope_theta: 1e6,
            norm_eps: 1e-6,
            qkv_bias: true,
            mask_id: 151666,
            eos_id: 151643,
            eot_id: 151645,
            max_seq_len: 131072,
            qk_norm: false,
            moe: None,
            llada2: None,
        };
        let llada_moe7b = moe::llada_moe_7b();
        let cfg = match name {
            "llada-8b" => llada8b,
            "dream-7b" => dream7b,
            // Tiny presets keep head_dim 128 (the kernels' only size) and a 512-token vocab
            // whose top ids are the special tokens of the tiny tokenizer (see checkpoint.rs).
            "tiny-llada" => ModelConfig {
                n_layers: 2,
                hidden: 256,
                ffn: 512,
                n_heads: 2,
                n_kv_heads: 2,
                vocab: 512,
                mask_id: TINY_MASK,
                eos_id: TINY_EOS,
                eot_id: TINY_EOT,
                max_seq_len: 1024,
                ..llada8b
            },
            "tiny-dream" => ModelConfig {
                n_layers: 2,
                hidden: 512,
                ffn: 1024,
                n_heads: 4,
                n_kv_heads: 2,
                vocab: 512,
                mask_id: TINY_MASK,
                eos_id: TINY_EOS,
                eot_id: TINY_EOT,
                max_seq_len: 1024,
                ..dream7b
            },
            "llada-moe-7b" => llada_moe7b,
            // 8 experts, top-2: with 8-32 rows a step, every expert is used and most rows'
            // routes differ, so the tests see every path of the expert FFN.
            "tiny-llada-moe" => ModelConfig {
                n_layers: 2,
                hidden: 256,
                ffn: 128,
                n_heads: 2,
                n_kv_heads: 2,
                vocab: 512,
                mask_id: TINY_MASK,
                eos_id: TINY_EOS,
                eot_id: TINY_EOT,
                max_seq_len: 1024,
                moe: Some(MoeConfig { n_experts: 8, top_k: 2, norm_topk_prob: false }),
                ..llada_moe7b
            },
            "llada2-mini" => llada2::llada2_mini(),
            // LLaDA2's structure at test scale: 4 / 2 heads of 128 (GQA), a dense layer 0 then
            // two MoE layers of 16 experts in 4 groups (keep 2), top-4, one shared expert.
            "tiny-llada2" => {
                let mini = llada2::llada2_mini();
                ModelConfig {
                    n_layers: 3,
                    hidden: 512,
                    ffn: 64,
                    n_heads: 4,
                    n_kv_heads: 2,
                    vocab: 512,
                    mask_id: TINY_MASK,
                    eos_id: TINY_EOS,
                    eot_id: TINY_EOT,
                    max_seq_len: 1024,
                    moe: Some(MoeConfig { n_experts: 16, top_k: 4, norm_topk_prob: true }),
                    llada2: Some(Llada2Config {
                        dense_ffn: 256,
                        shared_ffn: 64,
                        n_group: 4,
                        topk_group: 2,
                        ..mini.llada2.clone().expect("llada2-mini has LLaDA2 parameters")
                    }),
                    ..mini
                }
            }
            other => {
                return Err(Error::bad_input(format!(
                    "unknown preset `{other}` (expected one of: {})",
                    PRESETS.join(", ")
                )))
            }
        };
        Ok(cfg)
    }
}

/// Names accepted by [`ModelConfig::preset`].
pub const PRESETS: &[&str] =
    &["tiny-llada", "tiny-dream", "tiny-llada-moe", "tiny-llada2", "llada-8b", "dream-7b", "llada-moe-7b", "llada2-mini"];

/// Special token ids of the tiny presets' tokenizer (bytes take ids 0..256).
pub const TINY_MASK: u32 = 511;
pub const TINY_EOS: u32 = 510;
pub const TINY_EOT: u32 = 509;
