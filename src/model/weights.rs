//! The model's weights on the device: upload of host weights and synthesis of random weights of
//! the exact architecture on the device, dense (LLaDA, Dream), LLaDA-MoE and LLaDA2 (dense
//! layers below `first_k_dense_replace`, then routed experts with an f32 selection bias and a
//! shared expert), with the linear layers of the dense models in a chosen format (`--weights`:
//! bf16, or FP8 quantised on the host or device; a published FP8 checkpoint is uploaded as
//! stored). In the MoE models (LLaDA-MoE, LLaDA2) FP8 covers the experts too (per-expert
//! channel scales, `ops::moe_fp8`; `fp8-block` is refused for them) and the shared expert;
//! the router stays bf16.
use half::bf16;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

use super::moe::GpuMoe;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::gpu::{DTensor, Gpu};
use crate::ops::{self, gemm_fp8::LinearWeight, moe_fp8::ExpertWeight};
use crate::quant::WeightFormat;
use crate::weights::HostWeights;

/// A layer's FFN: dense SwiGLU, or routed experts. Built once per layer at load and never
/// moved in the forward, so the variants' size difference does not matter.
#[allow(clippy::large_enum_variant)]
pub enum GpuFfn {
    Dense {
        /// `[2 * ffn, hidden]`: rows gate | up.
        w_gate_up: LinearWeight,
        /// `[hidden, ffn]`
        w_down: LinearWeight,
    },
    Moe(GpuMoe),
}

/// One layer's weights. The linear layers, experts and shared expert are bf16 or FP8
/// (`--weights`); norms, the bias and the router stay bf16, LLaDA2's expert bias f32.
pub struct GpuLayer {
    pub attn_norm: DTensor<bf16>,
    pub wqkv: LinearWeight,
    pub bqkv: Option<DTensor<bf16>>,
    pub wo: LinearWeight,
    pub ffn_norm: DTensor<bf16>,
    /// Per-head q / k RMSNorm weights `[head_dim]` (`cfg.qk_norm`: LLaDA-MoE, LLaDA2).
    pub q_norm: Option<DTensor<bf16>>,
    pub k_norm: Option<DTensor<bf16>>,
    pub ffn: GpuFfn,
}

impl GpuLayer {
    /// The layer's bf16 tensors: norms, bias, router (no allocation: the graph binding walks
    /// this every forward).
    pub(crate) fn tensors(&self) -> impl Iterator<Item = &DTensor<bf16>> {
        let moe = match &self.ffn {
            GpuFfn::Dense { .. } => None,
            GpuFfn::Moe(m) => Some(m),
        };
        [&self.attn_norm, &self.ffn_norm]
            .into_iter()
            .chain(moe.into_iter().flat_map(GpuMoe::tensors))
            .chain(self.bqkv.as_ref())
            .chain(self.q_norm.as_ref())
            .chain(self.k_norm.as_ref())
    }

    /// The layer's linear weights in the weight format (the dense FFN's and LLaDA2's shared
    /// expert's included).
    pub(crate) fn linears(&self) -> impl Iterator<Item = &LinearWeight> {
        let (ffn, moe) = match &self.ffn {
            GpuFfn::Dense { w_gate_up, w_down } => (Some([w_gate_up, w_down]), None),
            GpuFfn::Moe(m) => (None, Some(m)),
        };
        [&self.wqkv, &self.wo].into_iter().chain(ffn.into_iter().flatten()).chain(moe.into_iter().flat_map(GpuMoe::shared_linears))
    }

    /// The layer's routed expert weights in the weight format (none for a dense FFN).
    pub(crate) fn experts(&self) -> impl Iterator<Item = &ExpertWeight> {
        match &self.ffn {
            GpuFfn::Moe(m) => Some(m),
            GpuFfn::Dense { .. } => None,
        }
        .into_iter()
        .flat_map(GpuMoe::experts)
    }

    /// The layer's f32 tensors (LLaDA2's expert bias).
    pub(crate) fn f32_tensors(&self) -> impl Iterator<Item = &DTensor<f32>> {
        match &self.ffn {
            GpuFfn::Moe(m) => m.expert_bias.as_ref(),
            GpuFfn::Dense { .. } => None,
        }
        .into_iter()
    }

    fn bytes(&self) -> usize {
        self.tensors().map(DTensor::bytes).sum::<usize>()
            + self.linears().map(LinearWeight::bytes).sum::<usize>()
            + self.f32_tensors().map(DTensor::bytes).sum::<usize>()
            + self.experts().map(ExpertWeight::bytes).sum::<usize>()
    }
}

/// The model's weights on the device. The embedding, norms and LM head are bf16: the
/// embedding is only gathered (32 rows a step, no bandwidth to save) and the LM head's logits
/// feed the confidence/commit decisions directly (docs/fp8.md measures the cost of an FP8 LM
/// head). `lm_head_fp8` is an opt-in E4M3 copy of it (`GpuModel::set_fp8_lm_head`) for steps
/// of few logit rows.
pub struct GpuWeights {
    pub embed: DTensor<bf16>,
    pub layers: Vec<GpuLayer>,
    pub final_norm: DTensor<bf16>,
    pub lm_head: DTensor<bf16>,
    /// E4M3 copy of `lm_head` with channel scales, used for up to
    /// `quant::FP8_LM_HEAD_MAX_ROWS` logit rows (`None`: off, the default).
    pub lm_head_fp8: Option<crate::ops::gemm_fp8::Fp8Weight>,
    /// Format of the layers' linear weights.
    pub format: WeightFormat,
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
        Self::upload_as(gpu, w, WeightFormat::Bf16)
    }

    /// Copies host weights to the device with the dense linear layers in `format` (FP8:
    /// quantised on the host; a NaN or ±∞ weight is refused with an error naming the layer's
    /// tensor). A published FP8 checkpoint (`HostWeights::fp8`) with an FP8 `format` is uploaded
    /// as stored, with its own 128×128 block scales, whichever FP8 layout was asked for. MoE
    /// models take `fp8` (channel scales; their experts are quantised per expert and channel)
    /// and refuse `fp8-block` and published FP8 checkpoints by name.
    pub fn upload_as(gpu: &Gpu, w: &HostWeights, format: WeightFormat) -> Result<Self> {
        check_gpu_support(&w.cfg)?;
        check_format(&w.cfg, format)?;
        let s = Shapes::of(&w.cfg);
        let up = |v: &[bf16], dims: &[usize]| gpu.upload(v, dims);
        let stored = w.fp8.as_ref().filter(|_| format != WeightFormat::Bf16);
        if stored.is_some() && w.cfg.moe.is_some() {
            return Err(Error::bad_input(format!(
                "--weights {format}: published FP8 checkpoints of {} are not supported (load it with --weights bf16)",
                arch_name(&w.cfg)
            )));
        }
        let format = if stored.is_some() { WeightFormat::Fp8(crate::quant::ScaleLayout::Block128) } else { format };
        let pick = |i: usize, f: fn(&crate::weights::fp8::Fp8Linears) -> &crate::quant::Fp8Matrix| stored.map(|l| f(&l[i]));
        let lin = |i: usize, name: &str, v: &[bf16], dims: [usize; 2], m: Option<&crate::quant::Fp8Matrix>| match m {
            Some(m) => Ok(LinearWeight::Fp8(ops::gemm_fp8::Fp8Weight::upload(gpu, m)?)),
            None => LinearWeight::upload(gpu, &format!("layer {i} {name}"), v, dims, format),
        };
        let mut layers = Vec::with_capacity(w.layers.len());
        for (i, l) in w.layers.iter().enumerate() {
            let ffn = match (&l.moe, w.cfg.is_moe_layer(i)) {
                (Some(m), true) => GpuFfn::Moe(GpuMoe::upload(gpu, &w.cfg, i, m, format)?),
                (None, false) => GpuFfn::Dense {
                    w_gate_up: lin(i, "gate|up projection", &l.w_gate_up, [2 * s.dense_ffn, s.hidden], pick(i, |l| &l.w_gate_up))?,
                    w_down: lin(i, "down projection", &l.w_down, [s.hidden, s.dense_ffn], pick(i, |l| &l.w_down))?,
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
                    (None, true) => Err(Error::weights(format!("layer {i} {name}"), "missing (the config sets qk_norm)")),
                    (_, false) => Ok(None),
                }
            };
            layers.push(GpuLayer {
                attn_norm: up(&l.attn_norm, &[s.hidden])?,
                wqkv: lin(i, "q|k|v projection", &l.wqkv, [s.qkv, s.hidden], pick(i, |l| &l.wqkv))?,
                bqkv: l.bqkv.as_deref().map(|b| up(b, &[s.qkv])).transpose()?,
                wo: lin(i, "o projection", &l.wo, [s.hidden, s.q], pick(i, |l| &l.wo))?,
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
            lm_head_fp8: None,
            format,
        })
    }

    /// Random weights of the exact architecture, generated on the device (no host copy), with
    /// the scales of `checkpoint::random_weights` (linear N(0, 1/√fan_in), embedding N(0, 1),
    /// norms 1 + 0.1·N, biases 0.1·N). Not bit-identical to the host generator.
    pub fn synthesize(gpu: &Gpu, cfg: &ModelConfig, seed: u64) -> Result<Self> {
        Self::synthesize_as(gpu, cfg, seed, WeightFormat::Bf16)
    }

    /// [`GpuWeights::synthesize`] with the dense linear layers in `format` (FP8: each bf16
    /// weight quantised on the device as it is made, so the bf16 model is never resident at
    /// once). The generation order is the bf16 model's, so both formats quantise the same weights.
    pub fn synthesize_as(gpu: &Gpu, cfg: &ModelConfig, seed: u64, format: WeightFormat) -> Result<Self> {
        check_gpu_support(cfg)?;
        check_format(cfg, format)?;
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
            let wqkv = LinearWeight::from_bf16(gpu, gen(&[s.qkv, s.hidden], 0.0, inv(s.hidden))?, format)?;
            let bqkv = if cfg.qkv_bias { Some(gen(&[s.qkv], 0.0, 0.1)?) } else { None };
            let wo = LinearWeight::from_bf16(gpu, gen(&[s.hidden, s.q], 0.0, inv(s.q))?, format)?;
            let ffn_norm = gen(&[s.hidden], 1.0, 0.1)?;
            let ffn = if cfg.is_moe_layer(i) {
                GpuFfn::Moe(GpuMoe::synthesize(gpu, cfg, i, format, &mut gen, &mut gen_f32)?)
            } else {
                GpuFfn::Dense {
                    w_gate_up: LinearWeight::from_bf16(gpu, gen(&[2 * s.dense_ffn, s.hidden], 0.0, inv(s.hidden))?, format)?,
                    w_down: LinearWeight::from_bf16(gpu, gen(&[s.hidden, s.dense_ffn], 0.0, inv(s.dense_ffn))?, format)?,
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
            lm_head_fp8: None,
            format,
        };
        gpu.synchronize()?;
        Ok(w)
    }

    pub fn bytes(&self) -> usize {
        let l: usize = self.layers.iter().map(GpuLayer::bytes).sum();
        l + self.embed.bytes() + self.final_norm.bytes() + self.lm_head.bytes() + self.lm_head_fp8.as_ref().map_or(0, |w| w.bytes())
    }

    /// Adds (`on`) or drops the E4M3 copy of the LM head (channel scales, quantised on the
    /// device from `lm_head`): `vocab · hidden` bytes more (LLaDA-8B: 0.52 GB).
    pub fn set_fp8_lm_head(&mut self, gpu: &crate::gpu::Gpu, on: bool) -> Result<()> {
        self.lm_head_fp8 = match (on, self.lm_head_fp8.take()) {
            (false, _) => None,
            (true, Some(w)) => Some(w),
            (true, None) => Some(crate::ops::gemm_fp8::Fp8Weight::quantize(gpu, &self.lm_head, crate::quant::ScaleLayout::Channel)?),
        };
        Ok(())
    }
}

fn arch_name(cfg: &ModelConfig) -> &'static str {
    if cfg.llada2.is_some() {
        "LLaDA2"
    } else {
        "LLaDA-MoE"
    }
}

/// MoE models (LLaDA-MoE, LLaDA2) take `bf16` and `fp8` (channel scales); `fp8-block` is
/// refused by name (the FP8 expert kernels take per-channel scales only).
fn check_format(cfg: &ModelConfig, format: WeightFormat) -> Result<()> {
    if cfg.moe.is_some() && format == WeightFormat::Fp8(crate::quant::ScaleLayout::Block128) {
        return Err(Error::bad_input(format!(
            "--weights {format}: {}'s FP8 expert kernels take per-channel scales only (use --weights fp8)",
            arch_name(cfg)
        )));
    }
    Ok(())
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

    #[test]
    fn moe_models_take_channel_fp8_and_refuse_block_scales_by_name() {
        use crate::quant::ScaleLayout;
        let (ch, blk) = (WeightFormat::Fp8(ScaleLayout::Channel), WeightFormat::Fp8(ScaleLayout::Block128));
        for (name, arch, other) in [
            ("tiny-llada-moe", "LLaDA-MoE", "LLaDA2"),
            ("llada-moe-7b", "LLaDA-MoE", "LLaDA2"),
            ("tiny-llada2", "LLaDA2", "LLaDA-MoE"),
            ("llada2-mini", "LLaDA2", "LLaDA-MoE"),
        ] {
            let cfg = ModelConfig::preset(name).unwrap();
            check_format(&cfg, WeightFormat::Bf16).unwrap();
            check_format(&cfg, ch).unwrap();
            let e = check_format(&cfg, blk).unwrap_err().to_string();
            assert!(e.contains(arch) && !e.contains(other) && e.contains("fp8-block") && e.contains("--weights fp8)"), "{name}: {e}");
        }
        for name in ["tiny-llada", "tiny-dream", "llada-8b", "dream-7b"] {
            let cfg = ModelConfig::preset(name).unwrap();
            for f in [ch, blk] {
                check_format(&cfg, f).unwrap();
            }
        }
    }
}
