//! Host-side weights in the engine's layout (bf16, [out, in] row-major), with Q|K|V and
//! gate|up fused at load. Loaded from Hugging Face safetensors checkpoints (sharded with
//! `model.safetensors.index.json`, or one `model.safetensors`), memory-mapped, every tensor
//! checked for name, dtype and shape.
use half::bf16;

use crate::config::ModelConfig;

/// One transformer block.
#[derive(Clone)]
pub struct HostLayer {
    /// [hidden]
    pub attn_norm: Vec<bf16>,
    /// [(n_heads + 2 n_kv_heads) * head_dim, hidden]: rows q | k | v.
    pub wqkv: Vec<bf16>,
    /// [(n_heads + 2 n_kv_heads) * head_dim] when the model has q/k/v biases (Dream).
    pub bqkv: Option<Vec<bf16>>,
    /// [hidden, n_heads * head_dim]
    pub wo: Vec<bf16>,
    /// [hidden]
    pub ffn_norm: Vec<bf16>,
    /// [2 * ffn, hidden]: rows gate | up.
    pub w_gate_up: Vec<bf16>,
    /// [hidden, ffn]
    pub w_down: Vec<bf16>,
}

#[derive(Clone)]
pub struct HostWeights {
    pub cfg: ModelConfig,
    /// [vocab, hidden]
    pub embed: Vec<bf16>,
    pub layers: Vec<HostLayer>,
    /// [hidden]
    pub final_norm: Vec<bf16>,
    /// [vocab, hidden]
    pub lm_head: Vec<bf16>,
}
