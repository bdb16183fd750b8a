//! `GpuWeights` in a chosen linear-layer format (`--weights`): upload of host weights (a
//! bf16 checkpoint quantised on the host, or a published FP8 checkpoint as stored) and device
//! synthesis (quantised on the device as each weight is made).
use half::bf16;

use super::{GpuLayer, GpuWeights, Shapes};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::gpu::{DTensor, Gpu};
use crate::ops::{self, gemm_fp8::LinearWeight};
use crate::quant::WeightFormat;
use crate::weights::HostWeights;

impl GpuWeights {
    /// Copies host weights to the device with the linear layers in `format` (FP8: quantised
    /// on the host; a NaN or ±∞ weight is refused with an error naming the layer's tensor). A
    /// published FP8 checkpoint (`HostWeights::fp8`) with an FP8 `format` is uploaded as
    /// stored, with its own 128×128 block scales, whichever FP8 layout was asked for.
    pub fn upload_as(gpu: &Gpu, w: &HostWeights, format: WeightFormat) -> Result<Self> {
        super::check_gpu_support(&w.cfg)?;
        let s = Shapes::of(&w.cfg);
        let up = |v: &[bf16], dims: &[usize]| gpu.upload(v, dims);
        let stored = w.fp8.as_ref().filter(|_| format != WeightFormat::Bf16);
        let format = if stored.is_some() { WeightFormat::Fp8(crate::quant::ScaleLayout::Block128) } else { format };
        let pick = |i: usize, f: fn(&crate::weights::fp8::Fp8Linears) -> &crate::quant::Fp8Matrix| stored.map(|l| f(&l[i]));
        let lin = |i: usize, name: &str, v: &[bf16], dims: [usize; 2], m: Option<&crate::quant::Fp8Matrix>| match m {
            Some(m) => Ok(LinearWeight::Fp8(ops::gemm_fp8::Fp8Weight::upload(gpu, m)?)),
            None => LinearWeight::upload(gpu, &format!("layer {i} {name}"), v, dims, format),
        };
        let mut layers = Vec::with_capacity(w.layers.len());
        for (i, l) in w.layers.iter().enumerate() {
            layers.push(GpuLayer {
                attn_norm: up(&l.attn_norm, &[s.hidden])?,
                wqkv: lin(i, "q|k|v projection", &l.wqkv, [s.qkv, s.hidden], pick(i, |l| &l.wqkv))?,
                bqkv: l.bqkv.as_deref().map(|b| up(b, &[s.qkv])).transpose()?,
                wo: lin(i, "o projection", &l.wo, [s.hidden, s.q], pick(i, |l| &l.wo))?,
                ffn_norm: up(&l.ffn_norm, &[s.hidden])?,
                w_gate_up: lin(i, "gate|up projection", &l.w_gate_up, [2 * s.ffn, s.hidden], pick(i, |l| &l.w_gate_up))?,
                w_down: lin(i, "down projection", &l.w_down, [s.hidden, s.ffn], pick(i, |l| &l.w_down))?,
            });
        }
        Ok(GpuWeights {
            embed: up(&w.embed, &[s.vocab, s.hidden])?,
            layers,
            final_norm: up(&w.final_norm, &[s.hidden])?,
            lm_head: up(&w.lm_head, &[s.vocab, s.hidden])?,
            format,
        })
    }

    /// [`GpuWeights::synthesize`] with the linear layers in `format` (FP8: each bf16 weight
    /// quantised on the device as it is made, so the bf16 model is never resident at once).
    pub fn synthesize_as(gpu: &Gpu, cfg: &ModelConfig, seed: u64, format: WeightFormat) -> Result<Self> {
        super::check_gpu_support(cfg)?;
        let s = Shapes::of(cfg);
        let mut counter = 0u64;
        let mut gen = |dims: &[usize], mean: f32, std: f32| -> Result<DTensor<bf16>> {
            let mut t = gpu.alloc::<bf16>(dims)?;
            counter += 1;
            ops::fill::fill_normal(gpu, &mut t, seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ counter, mean, std)?;
            Ok(t)
        };
        let inv = |fan_in: usize| 1.0 / (fan_in as f32).sqrt();
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for _ in 0..cfg.n_layers {
            // Same generation order as the bf16 model, so both formats quantise the same weights.
            let attn_norm = gen(&[s.hidden], 1.0, 0.1)?;
            let wqkv = LinearWeight::from_bf16(gpu, gen(&[s.qkv, s.hidden], 0.0, inv(s.hidden))?, format)?;
            let bqkv = if cfg.qkv_bias { Some(gen(&[s.qkv], 0.0, 0.1)?) } else { None };
            let wo = LinearWeight::from_bf16(gpu, gen(&[s.hidden, s.q], 0.0, inv(s.q))?, format)?;
            let ffn_norm = gen(&[s.hidden], 1.0, 0.1)?;
            let w_gate_up = LinearWeight::from_bf16(gpu, gen(&[2 * s.ffn, s.hidden], 0.0, inv(s.hidden))?, format)?;
            let w_down = LinearWeight::from_bf16(gpu, gen(&[s.hidden, s.ffn], 0.0, inv(s.ffn))?, format)?;
            layers.push(GpuLayer { attn_norm, wqkv, bqkv, wo, ffn_norm, w_gate_up, w_down });
        }
        let w = GpuWeights {
            embed: gen(&[s.vocab, s.hidden], 0.0, 1.0)?,
            layers,
            final_norm: gen(&[s.hidden], 1.0, 0.1)?,
            lm_head: gen(&[s.vocab, s.hidden], 0.0, inv(s.hidden))?,
            format,
        };
        gpu.synchronize()?;
        Ok(w)
    }
}
