//! LLaDA-MoE on the GPU: a layer's experts on the device ([`GpuMoe`]), the preallocated
//! routing state ([`MoeState`]); `GpuModel::run` runs the FFN of a layer: router GEMM (f32
//! logits) → `ops::moe::moe_route` (softmax, top-k, grouping by expert) → grouped gate|up with
//! SwiGLU → grouped down with the weighted combine into `out`. Every step stays on the device
//! (no host sync, no allocation), so a forward with MoE layers is captured in a CUDA graph like
//! a dense one. LLaDA2 (sigmoid group routing, shared expert, block-causal attention) is not
//! run here: `model::check_gpu_support` refuses it.
use half::bf16;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::gpu::{DTensor, Gpu};
use crate::ops::moe::{MoeWorkspace, RouteScoring};
use crate::weights::HostMoe;

/// One layer's routed experts on the device.
pub struct GpuMoe {
    /// `[n_experts, hidden]`
    pub router: DTensor<bf16>,
    /// `[n_experts, 2 * ffn, hidden]` (gate | up rows per expert)
    pub w_gate_up: DTensor<bf16>,
    /// `[n_experts, hidden, ffn]`
    pub w_down: DTensor<bf16>,
}

impl GpuMoe {
    pub fn tensors(&self) -> [&DTensor<bf16>; 3] {
        [&self.router, &self.w_gate_up, &self.w_down]
    }

    /// Copies a host layer's experts (`layer` names it in errors).
    pub fn upload(gpu: &Gpu, cfg: &ModelConfig, layer: usize, m: &HostMoe) -> Result<Self> {
        let (e, h, f) = dims(cfg)?;
        if !m.expert_bias.is_empty() || !m.shared_gate_up.is_empty() || !m.shared_down.is_empty() {
            return Err(Error::bad_input(format!(
                "layer {layer}: expert bias / shared expert present; the GPU MoE path runs LLaDA-MoE only"
            )));
        }
        for (name, got, want) in [
            ("router", m.router.len(), e * h),
            ("experts gate|up", m.w_gate_up.len(), e * 2 * f * h),
            ("experts down", m.w_down.len(), e * h * f),
        ] {
            if got != want {
                return Err(Error::weights(format!("layer {layer} {name}"), format!("{got} values, expected {want}")));
            }
        }
        Ok(GpuMoe {
            router: gpu.upload(&m.router, &[e, h])?,
            w_gate_up: gpu.upload(&m.w_gate_up, &[e, 2 * f, h])?,
            w_down: gpu.upload(&m.w_down, &[e, h, f])?,
        })
    }

    /// Random experts made on the device by `gen(dims, mean, std)` (the synthetic-weights
    /// scales: router and gate|up N(0, 1/√hidden), down N(0, 1/√ffn)).
    pub fn synthesize(
        cfg: &ModelConfig,
        gen: &mut impl FnMut(&[usize], f32, f32) -> Result<DTensor<bf16>>,
    ) -> Result<Self> {
        let (e, h, f) = dims(cfg)?;
        let inv = |fan_in: usize| 1.0 / (fan_in as f32).sqrt();
        Ok(GpuMoe {
            router: gen(&[e, h], 0.0, inv(h))?,
            w_gate_up: gen(&[e, 2 * f, h], 0.0, inv(h))?,
            w_down: gen(&[e, h, f], 0.0, inv(f))?,
        })
    }
}

/// (experts, hidden, expert ffn) of an MoE config.
fn dims(cfg: &ModelConfig) -> Result<(usize, usize, usize)> {
    let m = cfg.moe.as_ref().ok_or_else(|| Error::bad_input("GpuMoe: the config has no MoE block"))?;
    Ok((m.n_experts, cfg.hidden, cfg.ffn))
}

/// The routing state of the MoE layers, shared by all of them (a layer routes, runs its experts
/// and is done before the next starts): router logits and the `ops::moe` workspace.
pub struct MoeState {
    pub logits: DTensor<f32>,
    pub ws: MoeWorkspace,
    /// Expert-traffic tally `[experts touched, layer forwards]`, added to after every layer's
    /// routing while `tally_on` (`GpuModel::set_expert_stats`).
    pub tally: DTensor<u32>,
    pub tally_on: bool,
    norm_topk: bool,
}

impl MoeState {
    /// `None` for a dense model.
    pub fn new(gpu: &Gpu, cfg: &ModelConfig, max_rows: usize) -> Result<Option<Self>> {
        let Some(m) = &cfg.moe else { return Ok(None) };
        Ok(Some(MoeState {
            logits: gpu.alloc(&[max_rows, m.n_experts])?,
            ws: MoeWorkspace::new(gpu, max_rows, m.n_experts, m.top_k, cfg.hidden, cfg.ffn)?,
            tally: gpu.upload(&[0u32, 0], &[2])?,
            tally_on: false,
            norm_topk: m.norm_topk_prob,
        }))
    }

    /// LLaDA-MoE's routing: softmax over all experts, top-k (renormalised only if the config
    /// asks, which the official model never does).
    pub fn scoring(&self) -> RouteScoring<'static> {
        RouteScoring::Softmax { norm_topk: self.norm_topk }
    }

    /// Device bytes [`MoeState::new`] allocates for `max_rows` (0 for a dense model).
    pub fn bytes_for(cfg: &ModelConfig, max_rows: usize) -> usize {
        let Some(m) = &cfg.moe else { return 0 };
        let pairs = max_rows * m.top_k;
        max_rows * m.n_experts * 4            // router logits
            + max_rows * m.top_k * 8          // ids, weights
            + (2 * m.n_experts + 1) * 4       // counts, offsets
            + pairs * 8                       // perm, pos
            + pairs * (cfg.ffn * 2 + cfg.hidden * 4) // act (bf16), y (f32)
            + 8 // tally
    }
}
