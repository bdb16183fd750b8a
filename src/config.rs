//! `ModelConfig`: the architecture of a checkpoint, read from Hugging Face `config.json` in
//! its dialect (LLaDA's OLMo-style names, Dream's Qwen2 names, LLaDA-MoE's OLMoE names; the
//! last is in `config/moe.rs`), plus the built-in presets. `validate()` refuses anything the
//! engine cannot run, naming the field.
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

mod llada2;
mod moe;
mod presets;
pub use llada2::{llada2_dense_layer, Llada2Config, LLADA2_EOS, LLADA2_MASK};
pub use presets::{PRESETS, TINY_EOS, TINY_EOT, TINY_MASK};

/// Which of the supported architectures (docs/design.md §3, §8).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Arch {
    /// LLaDA-8B: MHA, no biases, row i predicts token i.
    Llada,
    /// Dream-7B / Dimple-7B: GQA, q/k/v bias, shifted logits (row i-1 predicts token i).
    Dream,
    /// LLaDA-MoE-7B-A1B (`LLaDAMoEModelLM`, OLMoE-derived): every FFN a mixture of experts,
    /// per-head q/k RMSNorm, no biases, row i predicts token i. CPU and GPU backends.
    LladaMoe,
    /// LLaDA2.0 (`LLaDA2MoeModelLM`, model_type `llada2_moe`): packed QKV with GQA, q/k norm,
    /// partial RoPE, dense first layers then sigmoid group-limited MoE with a shared expert,
    /// block-causal attention, row i predicts token i. CPU backend only in this build.
    Llada2,
}

/// The mixture-of-experts FFN of every layer (LLaDA-MoE). `ModelConfig::ffn` is then the
/// width of one expert (`expert_intermediate_size`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoeConfig {
    /// Routed experts per layer (`num_experts`).
    pub n_experts: usize,
    /// Experts each row uses (`num_experts_per_tok`).
    pub top_k: usize,
    /// Renormalise the top-k routing weights to sum to 1. The official LLaDA-MoE block never
    /// does (it hard-codes False), so configs that ask for it are refused there; kept for
    /// the router's other users.
    pub norm_topk_prob: bool,
}

/// The architecture as the engine uses it. All sizes in elements.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub n_layers: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Rows of the embedding and LM head (LLaDA's `embedding_size`, Dream's `vocab_size`).
    pub vocab: usize,
    pub rope_theta: f64,
    pub norm_eps: f64,
    pub qkv_bias: bool,
    pub mask_id: u32,
    pub eos_id: u32,
    /// End-of-turn token (LLaDA `<|eot_id|>`, Dream `<|im_end|>`), also a stop token.
    pub eot_id: u32,
    /// Longest canvas (prompt + gen) the model accepts.
    pub max_seq_len: usize,
    /// Per-head RMSNorm (weight `[head_dim]`) of q and k before RoPE (LLaDA-MoE).
    #[serde(default)]
    pub qk_norm: bool,
    /// Mixture-of-experts FFN in every layer (LLaDA-MoE); `None` for dense models.
    #[serde(default)]
    pub moe: Option<MoeConfig>,
    /// LLaDA2's dense prefix, shared expert, group routing, partial RoPE and attention block.
    #[serde(default)]
    pub llada2: Option<Llada2Config>,
}

/// The only head dimension the attention kernels are built for.
pub const HEAD_DIM: usize = 128;

/// Upper bounds `validate()` enforces (far above any released model).
pub const MAX_LAYERS: usize = 1024;
pub const MAX_HIDDEN: usize = 1 << 16;
pub const MAX_FFN: usize = 1 << 20;
pub const MAX_SEQ_LEN: usize = 1 << 24;
pub const MAX_EXPERTS: usize = 4096;

/// LLaDA `config.json` (model_type "llada"), the fields demask reads.
#[derive(Debug, Deserialize, Serialize)]
pub struct LladaJson {
    pub model_type: String,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    #[serde(default)]
    pub n_kv_heads: Option<usize>,
    pub mlp_hidden_size: usize,
    pub vocab_size: usize,
    #[serde(default)]
    pub embedding_size: Option<usize>,
    #[serde(default = "default_llada_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_llada_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub include_bias: bool,
    #[serde(default)]
    pub include_qkv_bias: Option<bool>,
    #[serde(default)]
    pub mask_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    #[serde(default)]
    pub max_sequence_length: Option<usize>,
    /// demask extension: end-of-turn id (defaults to `<|eot_id|>` = 126348 when in vocab).
    #[serde(default)]
    pub eot_token_id: Option<u32>,
    #[serde(default)]
    pub weight_tying: bool,
}

impl LladaJson {
    /// `vocab_size` and `embedding_size` (the embedding's rows, padded) before they are merged
    /// into one vocabulary: both must be positive and the embedding must hold every token.
    fn check_vocab(&self) -> Result<()> {
        if self.vocab_size == 0 {
            return Err(Error::config("vocab_size", "must be > 0"));
        }
        match self.embedding_size {
            Some(0) => Err(Error::config("embedding_size", "must be > 0")),
            Some(e) if e < self.vocab_size => Err(Error::config(
                "embedding_size",
                format!("{e} is smaller than vocab_size = {} (the embedding needs a row per token)", self.vocab_size),
            )),
            _ => Ok(()),
        }
    }
}

fn default_llada_theta() -> f64 {
    500000.0
}
fn default_llada_eps() -> f64 {
    1e-5
}

/// Dream `config.json` (model_type "Dream", Qwen2 names), the fields demask reads.
#[derive(Debug, Deserialize, Serialize)]
pub struct DreamJson {
    pub model_type: String,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    #[serde(default = "default_dream_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_dream_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub mask_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
    /// demask extension: end-of-turn id (defaults to `<|im_end|>` = 151645 when in vocab).
    #[serde(default)]
    pub eot_token_id: Option<u32>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

fn default_dream_theta() -> f64 {
    1e6
}
fn default_dream_eps() -> f64 {
    1e-6
}

impl ModelConfig {
    /// Width of the dense FFN layers: LLaDA2's `intermediate_size` (its `ffn` is the expert
    /// width), else `ffn`.
    pub fn dense_ffn(&self) -> usize {
        self.llada2.as_ref().map_or(self.ffn, |l| l.dense_ffn)
    }

    /// Whether layer `i` routes to experts (every layer of LLaDA-MoE; LLaDA2's from
    /// `first_k_dense_replace` on).
    pub fn is_moe_layer(&self, i: usize) -> bool {
        self.moe.is_some() && self.llada2.as_ref().is_none_or(|l| i >= l.first_k_dense)
    }

    /// Reads and validates `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::file(&path, e))?;
        let cfg = Self::from_json(&text).map_err(|e| match e {
            Error::BadInput(m) => Error::file(&path, m),
            other => other,
        })?;
        Ok(cfg)
    }

    /// Parses either dialect, chosen by `model_type`, and validates.
    pub fn from_json(text: &str) -> Result<Self> {
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| Error::bad_input(format!("config.json is not valid JSON: {e}")))?;
        let model_type = v.get("model_type").and_then(|m| m.as_str()).unwrap_or("");
        let cfg = match model_type.to_ascii_lowercase().as_str() {
            t if llada2::is_llada2(t) => llada2::from_llada2_json(v)?,
            // LLaDA-MoE's config.json says model_type "llada" too: told apart by its class.
            "llada" | "lladamoe" | "llada_moe" if moe::is_llada_moe(&v) => moe::from_llada_moe_json(v)?,
            "llada" => {
                let j: LladaJson = serde_json::from_value(v)
                    .map_err(|e| Error::bad_input(format!("LLaDA config.json: {e}")))?;
                j.check_vocab()?;
                Self::from_llada(&j)
            }
            "dream" | "qwen2" => {
                let j: DreamJson = serde_json::from_value(v)
                    .map_err(|e| Error::bad_input(format!("Dream config.json: {e}")))?;
                Self::from_dream(&j)
            }
            other => {
                return Err(Error::config(
                    "model_type",
                    format!("`{other}` is not supported (expected \"llada\" (LLaDA, LLaDA-MoE), \"llada2_moe\" or \"Dream\")"),
                ))
            }
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn from_llada(j: &LladaJson) -> Self {
        let vocab = j.embedding_size.unwrap_or(j.vocab_size).max(j.vocab_size);
        ModelConfig {
            arch: Arch::Llada,
            n_layers: j.n_layers,
            hidden: j.d_model,
            ffn: j.mlp_hidden_size,
            n_heads: j.n_heads,
            n_kv_heads: j.n_kv_heads.unwrap_or(j.n_heads),
            head_dim: j.d_model.checked_div(j.n_heads).unwrap_or(0),
            vocab,
            rope_theta: j.rope_theta,
            norm_eps: j.rms_norm_eps,
            qkv_bias: j.include_qkv_bias.unwrap_or(j.include_bias),
            mask_id: j.mask_token_id.unwrap_or(126336),
            eos_id: j.eos_token_id.unwrap_or(126081),
            eot_id: j.eot_token_id.unwrap_or(if vocab > 126348 { 126348 } else { j.eos_token_id.unwrap_or(126081) }),
            max_seq_len: j.max_sequence_length.unwrap_or(4096),
            qk_norm: false,
            moe: None,
            llada2: None,
        }
    }

    fn from_dream(j: &DreamJson) -> Self {
        ModelConfig {
            arch: Arch::Dream,
            n_layers: j.num_hidden_layers,
            hidden: j.hidden_size,
            ffn: j.intermediate_size,
            n_heads: j.num_attention_heads,
            n_kv_heads: j.num_key_value_heads,
            head_dim: j.hidden_size.checked_div(j.num_attention_heads).unwrap_or(0),
            vocab: j.vocab_size,
            rope_theta: j.rope_theta,
            norm_eps: j.rms_norm_eps,
            qkv_bias: true,
            mask_id: j.mask_token_id.unwrap_or(151666),
            eos_id: j.eos_token_id.unwrap_or(151643),
            eot_id: j.eot_token_id.unwrap_or(if j.vocab_size > 151645 { 151645 } else { j.eos_token_id.unwrap_or(151643) }),
            max_seq_len: j.max_position_embeddings.unwrap_or(131072),
            qk_norm: false,
            moe: None,
            llada2: None,
        }
    }

    /// Serialises to the HF dialect of this architecture (what `make-checkpoint` writes).
    pub fn to_hf_json(&self) -> serde_json::Value {
        match self.arch {
            Arch::Llada => serde_json::json!({
                "architectures": ["LLaDAModelLM"],
                "model_type": "llada",
                "d_model": self.hidden,
                "n_layers": self.n_layers,
                "n_heads": self.n_heads,
                "n_kv_heads": self.n_kv_heads,
                "mlp_hidden_size": self.ffn,
                "mlp_ratio": self.ffn / self.hidden.max(1),
                "vocab_size": self.vocab,
                "embedding_size": self.vocab,
                "rope_theta": self.rope_theta,
                "rms_norm_eps": self.norm_eps,
                "include_bias": false,
                "include_qkv_bias": self.qkv_bias,
                "mask_token_id": self.mask_id,
                "eos_token_id": self.eos_id,
                "eot_token_id": self.eot_id,
                "pad_token_id": self.eos_id,
                "max_sequence_length": self.max_seq_len,
                "weight_tying": false,
                "block_type": "llama",
                "activation_type": "silu",
                "layer_norm_type": "rms",
                "rope": true,
                "torch_dtype": "bfloat16"
            }),
            Arch::Dream => serde_json::json!({
                "architectures": ["DreamModel"],
                "model_type": "Dream",
                "hidden_size": self.hidden,
                "num_hidden_layers": self.n_layers,
                "num_attention_heads": self.n_heads,
                "num_key_value_heads": self.n_kv_heads,
                "intermediate_size": self.ffn,
                "vocab_size": self.vocab,
                "rope_theta": self.rope_theta,
                "rms_norm_eps": self.norm_eps,
                "mask_token_id": self.mask_id,
                "eos_token_id": self.eos_id,
                "eot_token_id": self.eot_id,
                "pad_token_id": self.eos_id,
                "bos_token_id": self.eos_id,
                "max_position_embeddings": self.max_seq_len,
                "tie_word_embeddings": false,
                "hidden_act": "silu",
                "torch_dtype": "bfloat16"
            }),
            Arch::LladaMoe => moe::to_llada_moe_json(self),
            Arch::Llada2 => llada2::to_llada2_json(self),
        }
    }

    /// Invariants the engine relies on; the error names the offending field.
    pub fn validate(&self) -> Result<()> {
        let (f_hidden, f_layers, f_heads, f_kv, f_ffn, f_vocab, f_ctx) = match self.arch {
            Arch::Llada => (
                "d_model",
                "n_layers",
                "n_heads",
                "n_kv_heads",
                "mlp_hidden_size",
                "embedding_size",
                "max_sequence_length",
            ),
            Arch::Dream => (
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "intermediate_size",
                "vocab_size",
                "max_position_embeddings",
            ),
            Arch::LladaMoe | Arch::Llada2 => (
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                if self.arch == Arch::Llada2 { "moe_intermediate_size" } else { "expert_intermediate_size" },
                "vocab_size",
                "max_position_embeddings",
            ),
        };
        let pos = |field: &str, v: usize| {
            if v == 0 {
                Err(Error::config(field, "must be > 0"))
            } else {
                Ok(())
            }
        };
        pos(f_layers, self.n_layers)?;
        pos(f_hidden, self.hidden)?;
        pos(f_heads, self.n_heads)?;
        pos(f_kv, self.n_kv_heads)?;
        pos(f_ffn, self.ffn)?;
        pos(f_vocab, self.vocab)?;
        pos(f_ctx, self.max_seq_len)?;
        // Upper bounds far above any released model: a typo (an extra digit) is refused here
        // rather than turned into a huge allocation.
        for (field, v, max) in [
            (f_layers, self.n_layers, MAX_LAYERS),
            (f_hidden, self.hidden, MAX_HIDDEN),
            (f_ffn, self.ffn, MAX_FFN),
            (f_ctx, self.max_seq_len, MAX_SEQ_LEN),
        ] {
            if v > max {
                return Err(Error::config(field, format!("{v} is out of range (1..={max})")));
            }
        }
        if !self.hidden.is_multiple_of(self.n_heads) {
            return Err(Error::config(f_heads, format!("{} does not divide {f_hidden} = {}", self.n_heads, self.hidden)));
        }
        if self.head_dim != HEAD_DIM {
            return Err(Error::config(
                f_heads,
                format!("head dim {f_hidden}/{f_heads} = {} is unsupported (kernels need {HEAD_DIM})", self.head_dim),
            ));
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(Error::config(f_kv, format!("{} does not divide {f_heads} = {}", self.n_kv_heads, self.n_heads)));
        }
        for (field, v) in [(f_hidden, self.hidden), (f_ffn, self.ffn)] {
            if !v.is_multiple_of(8) {
                return Err(Error::config(field, format!("{v} is not a multiple of 8 (rows must be 16-byte aligned)")));
            }
        }
        if self.vocab > u32::MAX as usize / 2 {
            return Err(Error::config(f_vocab, format!("{} is out of range", self.vocab)));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return Err(Error::config("rope_theta", format!("{} is out of range (> 1)", self.rope_theta)));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0 && self.norm_eps < 1.0) {
            return Err(Error::config("rms_norm_eps", format!("{} is out of range (0, 1)", self.norm_eps)));
        }
        for (field, id) in [("mask_token_id", self.mask_id), ("eos_token_id", self.eos_id), ("eot_token_id", self.eot_id)] {
            if id as usize >= self.vocab {
                return Err(Error::config(field, format!("{id} is not below {f_vocab} = {}", self.vocab)));
            }
        }
        moe::validate_moe(self)?;
        llada2::validate_llada2(self)?;
        // The mask token must differ from the stop tokens: a committed EOS would read as a mask.
        for (field, id) in [("eos_token_id", self.eos_id), ("eot_token_id", self.eot_id)] {
            if id == self.mask_id {
                return Err(Error::config(
                    "mask_token_id",
                    format!("{} is also the {field}; the mask token must be a token of its own", self.mask_id),
                ));
            }
        }
        Ok(())
    }

    /// Rows of the fused QKV projection: (n_heads + 2 n_kv_heads) * head_dim.
    pub fn qkv_dim(&self) -> usize {
        (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
    }
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
    /// Logits are shifted (Dream): the slot at position p is predicted by row p - 1.
    pub fn shifted(&self) -> bool {
        self.arch == Arch::Dream
    }

    /// Parameter count (embedding + layers + final norm + LM head, biases, q/k norms, routers
    /// and every expert included).
    pub fn param_count(&self) -> u64 {
        self.params_with_experts(self.moe.as_ref().map_or(1, |m| m.n_experts))
    }

    /// Parameters one row's forward uses: as [`param_count`](Self::param_count) but with
    /// only `top_k` experts per layer (the router counted whole). Equal to it for dense models.
    pub fn active_param_count(&self) -> u64 {
        self.params_with_experts(self.moe.as_ref().map_or(1, |m| m.top_k))
    }

    /// Parameter count with `experts` FFNs of width `ffn` per layer (LLaDA2: per MoE layer,
    /// plus its dense layers, shared experts and expert biases).
    fn params_with_experts(&self, experts: usize) -> u64 {
        if let Some(l) = &self.llada2 {
            let (h, f, v) = (self.hidden as u64, self.ffn as u64, self.vocab as u64);
            let n_experts = self.moe.as_ref().map_or(0, |m| m.n_experts as u64);
            let attn = h * self.qkv_dim() as u64 + self.q_dim() as u64 * h + 2 * self.head_dim as u64 + 2 * h;
            let dense = l.first_k_dense as u64;
            let moe_layers = self.n_layers as u64 - dense;
            let moe = n_experts * (h + 1) + experts as u64 * 3 * h * f + 3 * h * l.shared_ffn as u64;
            return 2 * v * h + self.n_layers as u64 * attn + dense * 3 * h * l.dense_ffn as u64 + moe_layers * moe + h;
        }
        let (h, f, v) = (self.hidden as u64, self.ffn as u64, self.vocab as u64);
        let qkv = self.qkv_dim() as u64;
        let router = self.moe.as_ref().map_or(0, |m| m.n_experts as u64 * h);
        let qk_norm = if self.qk_norm { 2 * self.head_dim as u64 } else { 0 };
        let per_layer = h * qkv
            + if self.qkv_bias { qkv } else { 0 }
            + self.q_dim() as u64 * h
            + experts as u64 * 3 * h * f
            + router
            + qk_norm
            + 2 * h;
        2 * v * h + self.n_layers as u64 * per_layer + h
    }
}

/// Test helper: `field = value` in `preset`'s config.json is refused by an error naming
/// `named` (in backquotes).
#[cfg(test)]
pub(crate) fn assert_refused(preset: &str, field: &str, value: serde_json::Value, named: &str) {
    let mut j = ModelConfig::preset(preset).unwrap().to_hf_json();
    j[field] = value.clone();
    let e = match ModelConfig::from_json(&j.to_string()) {
        Ok(c) => panic!("{preset}: {field} = {value} was accepted: {c:?}"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains(&format!("`{named}`")), "{preset}: {field} = {value}: {e}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llada_param_count_matches_checkpoint() {
        assert_eq!(ModelConfig::preset("llada-8b").unwrap().param_count(), 8_015_581_184);
    }

    #[test]
    fn presets_validate_and_roundtrip_through_hf_json() {
        for name in PRESETS {
            let cfg = ModelConfig::preset(name).unwrap();
            cfg.validate().unwrap();
            let back = ModelConfig::from_json(&cfg.to_hf_json().to_string()).unwrap();
            assert_eq!(back, cfg, "{name}");
        }
    }

    #[test]
    fn out_of_range_fields_are_named() {
        let mut j = ModelConfig::preset("tiny-llada").unwrap().to_hf_json();
        j["rms_norm_eps"] = serde_json::json!(-1.0);
        let e = ModelConfig::from_json(&j.to_string()).unwrap_err().to_string();
        assert!(e.contains("rms_norm_eps"), "{e}");
        let mut j = ModelConfig::preset("tiny-dream").unwrap().to_hf_json();
        j["num_key_value_heads"] = serde_json::json!(3);
        let e = ModelConfig::from_json(&j.to_string()).unwrap_err().to_string();
        assert!(e.contains("num_key_value_heads"), "{e}");
        let mut j = ModelConfig::preset("tiny-dream").unwrap().to_hf_json();
        j["mask_token_id"] = serde_json::json!(100000);
        let e = ModelConfig::from_json(&j.to_string()).unwrap_err().to_string();
        assert!(e.contains("mask_token_id"), "{e}");
        let e = ModelConfig::from_json("{not json").unwrap_err().to_string();
        assert!(e.contains("JSON"), "{e}");
    }

    /// Sets `field` to `value` in `preset`'s config.json and returns the error, which must
    /// name `named`.
    fn refused(preset: &str, field: &str, value: serde_json::Value, named: &str) {
        let mut j = ModelConfig::preset(preset).unwrap().to_hf_json();
        j[field] = value.clone();
        let e = match ModelConfig::from_json(&j.to_string()) {
            Ok(c) => panic!("{preset}: {field} = {value} was accepted: {c:?}"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(&format!("`{named}`")), "{preset}: {field} = {value}: {e}");
    }

    #[test]
    fn zero_and_out_of_range_sizes_are_refused_by_name() {
        // LLaDA merges vocab_size and embedding_size: each is still checked on its own.
        refused("tiny-llada", "vocab_size", serde_json::json!(0), "vocab_size");
        refused("tiny-llada", "embedding_size", serde_json::json!(0), "embedding_size");
        refused("tiny-llada", "embedding_size", serde_json::json!(256), "embedding_size");
        refused("tiny-dream", "vocab_size", serde_json::json!(0), "vocab_size");
        refused("tiny-llada", "max_sequence_length", serde_json::json!(0), "max_sequence_length");
        refused("tiny-dream", "max_position_embeddings", serde_json::json!(0), "max_position_embeddings");
        refused("tiny-dream", "max_position_embeddings", serde_json::json!(1u64 << 40), "max_position_embeddings");
        refused("tiny-llada", "mlp_hidden_size", serde_json::json!(0), "mlp_hidden_size");
        refused("tiny-llada", "mlp_hidden_size", serde_json::json!(100), "mlp_hidden_size");
        refused("tiny-dream", "intermediate_size", serde_json::json!(1u64 << 30), "intermediate_size");
        refused("tiny-dream", "num_hidden_layers", serde_json::json!(5000), "num_hidden_layers");
        refused("tiny-dream", "num_key_value_heads", serde_json::json!(0), "num_key_value_heads");
        refused("tiny-llada", "mask_token_id", serde_json::json!(crate::config::TINY_EOS), "mask_token_id");
        refused("tiny-dream", "rope_theta", serde_json::json!(0.0), "rope_theta");
    }
}
