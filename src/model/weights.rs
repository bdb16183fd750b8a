//! The model's weights on the device: upload of host weights and synthesis of random weights of
//! the exact architecture on the device, dense (LLaDA, Dream), LLaDA-MoE and LLaDA2 (dense
//! layers below `first_k_dense_replace`, then routed experts with an f32 selection bias and a
//! shared expert).
use half::bf16;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

use super::moe::GpuMoe;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::gpu::{DTensor, Gpu};
use crate::ops;
use crate::weights::HostWeights;

/// A layer's FFN: dense SwiGLU, or routed experts.
pub enum GpuFfn {
    Dense {
        /// `[2 * ffn, hidden]`: rows gate | up.
        w_gate_up: DTensor<bf16>,
        /// `[hidden, ffn]`
        w_down: DTensor<bf16>,
    },
    Moe(GpuMoe),
}

pub struct GpuLayer {
    pub attn_norm: DTensor<bf16>,
    pub wqkv: DTensor<bf16>,
    pub bqkv: Option<DTensor<bf16>>,
    pub wo: DTensor<bf16>,
    pub ffn_norm: DTensor<bf16>,
    /// Per-head q / k RMSNorm weights `[head_dim]` (`cfg.qk_norm`: LLaDA-MoE, LLaDA2).
    pub q_norm: Option<DTensor<bf16>>,
    pub k_norm: Option<DTensor<bf16>>,
    pub ffn: GpuFfn,
}

impl GpuLayer {
    /// Every tensor of the layer (no allocation: the graph binding walks this each forward).
    pub(crate) fn tensors(&self) -> impl Iterator<Item = &DTensor<bf16>> {
        let (dense, moe) = match &self.ffn {
            GpuFfn::Dense { w_gate_up, w_down } => (Some([w_gate_up, w_down]), None),
            GpuFfn::Moe(m) => (None, Some(m)),
        };
        [&self.attn_norm, &self.wqkv, &self.wo, &self.ffn_norm]
            .into_iter()
            .chain(dense.into_iter().flatten())
            .chain(moe.into_iter().flat_map(GpuMoe::tensors))
            .chain(self.bqkv.as_ref())
            .chain(self.q_norm.as_ref())
            .chain(self.k_norm.as_ref())
    }

    /// The layer's f32 tensors (LLaDA2's expert bias).
    pub(crate) fn f32_tensors(&self) -> impl Iterator<Item = &DTensor<f32>> {
        match &self.ffn {
            GpuFfn::Moe(m) => m.expert_bias.as_ref(),
            GpuFfn::Dense { .. } => None,
        }
        .into_iter()
    }
}

pub struct GpuWeights {
    pub embed: DTensor<bf16>,
    pub layers: Vec<GpuLayer>,
    pub final_norm: DTensor<bf16>,
    pub lm_head: DTensor<bf16>,
}

/// Shapes of every weight tensor of `cfg`, in one place for upload and synthesis.
struct Shapes {
    hidden: usize,
    qkv: usize,
    q: usize,
    /// Width of the dense FFN layers (LLaDA2: `intermediate_size`; else `cfg.ffn`).
    dense_ffn: usize,
    vocab: usize,
    head_dim: usize,
}

impl Shapes {
    fn of(cfg: &ModelConfig) -> Self {
        Shapes {
            hidden: cfg.hidden,
            qkv: cfg.qkv_dim(),
            q: cfg.q_dim(),
            dense_ffn: cfg.dense_ffn(),
            vocab: cfg.vocab,
            head_dim: cfg.head_dim,
        }
    }
}

/// Refuses MoE shapes beyond the expert kernels' limits and widths the GPU kernels cannot
/// take, so such a model is never run wrong.
pub fn check_gpu_support(cfg: &ModelConfig) -> Result<()> {
    if let Some(l) = &cfg.llada2 {
        for (name, v) in [("intermediate_size", l.dense_ffn), ("moe_intermediate_size · num_shared_experts", l.shared_ffn)] {
            if !v.is_multiple_of(8) {
                return Err(Error::config(name, format!("{v}: the GPU kernels need a multiple of 8 (pass --device cpu)")));
            }
        }
        if l.block == 0 || l.block > i32::MAX as usize {
            return Err(Error::config("block_length", format!("{}: must be in 1..2^31 on the GPU", l.block)));
        }
    }
    if let Some(m) = &cfg.moe {
        if m.n_experts > ops::moe::MAX_EXPERTS || m.top_k > ops::moe::MAX_TOP_K {
            return Err(Error::bad_input(format!(
                "{} experts, top {}: the GPU expert kernels take at most {} experts and top {} \
                 (pass --device cpu)",
                m.n_experts,
                m.top_k,
                ops::moe::MAX_EXPERTS,
                ops::moe::MAX_TOP_K
            )));
        }
        for (name, v) in [("hidden_size", cfg.hidden), ("expert_intermediate_size", cfg.ffn)] {
            if !v.is_multiple_of(8) {
                return Err(Error::config(name, format!("{v}: the GPU expert kernels need a multiple of 8 (pass --device cpu)")));
            }
        }
    }
    Ok(())
}

impl GpuWeights {
    /// Copies host weights to the device.
    pub fn upload(gpu: &Gpu, w: &HostWeights) -> Result<Self> {
        check_gpu_support(&w.cfg)?;
        let s = Shapes::of(&w.cfg);
        let up = |v: &[bf16], dims: &[usize]| gpu.upload(v, dims);
        let mut layers = Vec::with_capacity(w.layers.len());
        for (i, l) in w.layers.iter().enumerate() {
            let ffn = match (&l.moe, w.cfg.is_moe_layer(i)) {
                (Some(m), true) => GpuFfn::Moe(GpuMoe::upload(gpu, &w.cfg, i, m)?),
                (None, false) => GpuFfn::Dense {
                    w_gate_up: up(&l.w_gate_up, &[2 * s.dense_ffn, s.hidden])?,
                    w_down: up(&l.w_down, &[s.hidden, s.dense_ffn])?,
                },
                (m, _) => {
                    return Err(Error::weights(
                        format!("layer {i} mlp"),
                        format!("{} where the config expects {}", if m.is_some() { "experts" } else { "a dense FFN" }, if m.is_some() { "a dense FFN" } else { "experts" }),
                    ))
                }
            };
            let norm = |v: &Option<Vec<bf16>>, name: &str| -> Result<Option<DTensor<bf16>>> {
                match (v, w.cfg.qk_norm) {
                    (Some(v), true) => Ok(Some(up(v, &[s.head_dim])?)),
                    (None, false) => Ok(None),
                    (None, true) => Err(Error::weights(format!("layer {i} {name}"), "missing (the config sets qk_norm)")),
                    (Some(_), false) => Ok(None),
                }
            };
            layers.push(GpuLayer {
                attn_norm: up(&l.attn_norm, &[s.hidden])?,
                wqkv: up(&l.wqkv, &[s.qkv, s.hidden])?,
                bqkv: l.bqkv.as_deref().map(|b| up(b, &[s.qkv])).transpose()?,
                wo: up(&l.wo, &[s.hidden, s.q])?,
                ffn_norm: up(&l.ffn_norm, &[s.hidden])?,
                q_norm: norm(&l.q_norm, "q_norm")?,
                k_norm: norm(&l.k_norm, "k_norm")?,
                ffn,
            });
        }
        Ok(GpuWeights {
            embed: up(&w.embed, &[s.vocab, s.hidden])?,
            layers,
            final_norm: up(&w.final_norm, &[s.hidden])?,
            lm_head: up(&w.lm_head, &[s.vocab, s.hidden])?,
        })
    }

    /// Random weights of the exact architecture, generated on the device (no host copy), with
    /// the scales of `checkpoint::random_weights` (linear N(0, 1/√fan_in), embedding N(0, 1),
    /// norms 1 + 0.1·N, biases 0.1·N). Not bit-identical to the host generator.
    pub fn synthesize(gpu: &Gpu, cfg: &ModelConfig, seed: u64) -> Result<Self> {
        check_gpu_support(cfg)?;
        let s = Shapes::of(cfg);
        let mut counter = 0u64;
        let mut gen = |dims: &[usize], mean: f32, std: f32| -> Result<DTensor<bf16>> {
            let mut t = gpu.alloc::<bf16>(dims)?;
            counter += 1;
            ops::fill::fill_normal(gpu, &mut t, seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ counter, mean, std)?;
            Ok(t)
        };
        // f32 tensors (LLaDA2's expert bias): few values, drawn on the host and copied.
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0xB1A5);
        let mut gen_f32 = |dims: &[usize], mean: f32, std: f32| -> Result<DTensor<f32>> {
            let n: usize = dims.iter().product();
            let normal = Normal::new(mean, std).map_err(|e| Error::bad_input(format!("synthetic weights: {e}")))?;
            let v: Vec<f32> = (0..n).map(|_| normal.sample(&mut rng)).collect();
            gpu.upload(&v, dims)
        };
        let inv = |fan_in: usize| 1.0 / (fan_in as f32).sqrt();
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            // Generation order of the dense model kept (its synthetic weights do not change).
            let attn_norm = gen(&[s.hidden], 1.0, 0.1)?;
            let wqkv = gen(&[s.qkv, s.hidden], 0.0, inv(s.hidden))?;
            let bqkv = if cfg.qkv_bias { Some(gen(&[s.qkv], 0.0, 0.1)?) } else { None };
            let wo = gen(&[s.hidden, s.q], 0.0, inv(s.q))?;
            let ffn_norm = gen(&[s.hidden], 1.0, 0.1)?;
            let ffn = if cfg.is_moe_layer(i) {
                GpuFfn::Moe(GpuMoe::synthesize(cfg, &mut gen, &mut gen_f32)?)
            } else {
                GpuFfn::Dense {
                    w_gate_up: gen(&[2 * s.dense_ffn, s.hidden], 0.0, inv(s.hidden))?,
                    w_down: gen(&[s.hidden, s.dense_ffn], 0.0, inv(s.dense_ffn))?,
                }
            };
            let (q_norm, k_norm) = if cfg.qk_norm {
                (Some(gen(&[s.head_dim], 1.0, 0.1)?), Some(gen(&[s.head_dim], 1.0, 0.1)?))
            } else {
                (None, None)
            };
            layers.push(GpuLayer { attn_norm, wqkv, bqkv, wo, ffn_norm, q_norm, k_norm, ffn });
        }
        let w = GpuWeights {
            embed: gen(&[s.vocab, s.hidden], 0.0, 1.0)?,
            layers,
            final_norm: gen(&[s.hidden], 1.0, 0.1)?,
            lm_head: gen(&[s.vocab, s.hidden], 0.0, inv(s.hidden))?,
        };
        gpu.synchronize()?;
        Ok(w)
    }

    pub fn bytes(&self) -> usize {
        let l: usize = self.layers.iter().flat_map(GpuLayer::tensors).map(DTensor::bytes).sum();
        let b: usize = self.layers.iter().flat_map(GpuLayer::f32_tensors).map(DTensor::bytes).sum();
        l + b + self.embed.bytes() + self.final_norm.bytes() + self.lm_head.bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_runs_on_the_gpu_path_and_bad_widths_are_refused() {
        for name in crate::config::PRESETS {
            check_gpu_support(&ModelConfig::preset(name).unwrap()).unwrap();
        }
        let mut cfg = ModelConfig::preset("tiny-llada2").unwrap();
        cfg.llada2.as_mut().unwrap().shared_ffn = 60;
        let e = check_gpu_support(&cfg).unwrap_err().to_string();
        assert!(e.contains("num_shared_experts") && e.contains("60") && e.contains("--device cpu"), "{e}");
        let mut cfg = ModelConfig::preset("tiny-llada2").unwrap();
        cfg.llada2.as_mut().unwrap().dense_ffn = 250;
        let e = check_gpu_support(&cfg).unwrap_err().to_string();
        assert!(e.contains("intermediate_size") && e.contains("250"), "{e}");
        let l2 = ModelConfig::preset("tiny-llada2").unwrap();
        assert!(!l2.is_moe_layer(0) && l2.is_moe_layer(1) && l2.is_moe_layer(2));
        assert_eq!(l2.dense_ffn(), 256);
        let moe = ModelConfig::preset("tiny-llada-moe").unwrap();
        assert!(moe.is_moe_layer(0) && !ModelConfig::preset("tiny-llada").unwrap().is_moe_layer(0));
        let mut cfg = ModelConfig::preset("tiny-llada-moe").unwrap();
        cfg.moe.as_mut().unwrap().n_experts = ops::moe::MAX_EXPERTS + 1;
        let e = check_gpu_support(&cfg).unwrap_err().to_string();
        assert!(e.contains("experts") && e.contains("--device cpu"), "{e}");
        let mut cfg = ModelConfig::preset("tiny-llada-moe").unwrap();
        cfg.ffn = 100;
        let e = check_gpu_support(&cfg).unwrap_err().to_string();
        assert!(e.contains("expert_intermediate_size"), "{e}");
    }
}
