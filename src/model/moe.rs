//! MoE layers on the GPU (LLaDA-MoE, LLaDA2): a layer's experts on the device ([`GpuMoe`]),
//! the preallocated routing state ([`MoeState`]); `GpuModel::run` runs the FFN of a layer:
//! router GEMM (f32 logits) → `ops::moe::moe_route` (LLaDA-MoE: softmax top-k; LLaDA2:
//! sigmoid plus `expert_bias` group-limited top-k, scaled) → grouped gate|up with SwiGLU → grouped down
//! with the weighted combine into `out`. LLaDA2's shared expert runs first as a dense SwiGLU
//! into `out`, and the combine adds the routed sum to it. Every step stays on the device (no
//! host sync, no allocation), so a forward with MoE layers is captured in a CUDA graph like a
//! dense one. With `--weights fp8` the experts are E4M3 with per-expert channel scales
//! (`ops::moe_fp8`), the shared expert an FP8 `LinearWeight`; the router stays bf16 (its logits
//! pick the experts: an FP8 error there moves whole rows to other experts).
use half::bf16;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::gpu::{DTensor, Gpu};
use crate::ops::gemm_fp8::LinearWeight;
use crate::ops::moe::{MoeWorkspace, RouteScoring};
use crate::ops::moe_fp8::ExpertWeight;
use crate::quant::WeightFormat;
use crate::weights::HostMoe;

/// One layer's routed experts on the device.
pub struct GpuMoe {
    /// `[n_experts, hidden]`, always bf16.
    pub router: DTensor<bf16>,
    /// `[n_experts, 2 * ffn, hidden]` (gate | up rows per expert), bf16 or FP8.
    pub w_gate_up: ExpertWeight,
    /// `[n_experts, hidden, ffn]`, bf16 or FP8.
    pub w_down: ExpertWeight,
    /// LLaDA2's selection bias `[n_experts]` in f32 (`None` for LLaDA-MoE).
    pub expert_bias: Option<DTensor<f32>>,
    /// LLaDA2's shared expert (`None` when the config has none).
    pub shared: Option<SharedExpert>,
}

/// A dense SwiGLU expert every row goes through (LLaDA2's `shared_experts`).
pub struct SharedExpert {
    /// `[2 * shared_ffn, hidden]`: rows gate | up (bf16 or FP8, as the dense layers).
    pub w_gate_up: LinearWeight,
    /// `[hidden, shared_ffn]`
    pub w_down: LinearWeight,
}

impl GpuMoe {
    /// The router (the one bf16 tensor; experts are [`GpuMoe::experts`], the shared expert's
    /// weights [`GpuMoe::shared_linears`], the f32 bias [`GpuMoe::expert_bias`]).
    pub fn tensors(&self) -> impl Iterator<Item = &DTensor<bf16>> {
        std::iter::once(&self.router)
    }

    /// The routed expert weights (gate|up, down).
    pub fn experts(&self) -> impl Iterator<Item = &ExpertWeight> {
        [&self.w_gate_up, &self.w_down].into_iter()
    }

    /// The shared expert's weights (none without one).
    pub fn shared_linears(&self) -> impl Iterator<Item = &LinearWeight> {
        self.shared.iter().flat_map(|s| [&s.w_gate_up, &s.w_down])
    }

    /// Device bytes of the layer's experts, router, bias and shared expert.
    pub fn bytes(&self) -> usize {
        self.router.bytes()
            + self.experts().map(ExpertWeight::bytes).sum::<usize>()
            + self.shared_linears().map(LinearWeight::bytes).sum::<usize>()
            + self.expert_bias.as_ref().map_or(0, DTensor::bytes)
    }

    /// Copies a host layer's experts (`layer` names it in errors), the experts and the shared
    /// expert in `format` (FP8: quantised on the host, channel scales only for the experts).
    pub fn upload(gpu: &Gpu, cfg: &ModelConfig, layer: usize, m: &HostMoe, format: WeightFormat) -> Result<Self> {
        let (e, h, f) = dims(cfg)?;
        let shared_ffn = cfg.llada2.as_ref().map_or(0, |l| l.shared_ffn);
        let want_bias = if cfg.llada2.is_some() { e } else { 0 };
        for (name, got, want) in [
            ("router", m.router.len(), e * h),
            ("experts gate|up", m.w_gate_up.len(), e * 2 * f * h),
            ("experts down", m.w_down.len(), e * h * f),
            ("expert_bias", m.expert_bias.len(), want_bias),
            ("shared expert gate|up", m.shared_gate_up.len(), 2 * shared_ffn * h),
            ("shared expert down", m.shared_down.len(), h * shared_ffn),
        ] {
            if got != want {
                return Err(Error::weights(format!("layer {layer} {name}"), format!("{got} values, expected {want}")));
            }
        }
        if let Some(i) = m.expert_bias.iter().position(|b| !b.is_finite()) {
            return Err(Error::weights(format!("layer {layer} expert_bias"), format!("value {i} is {}", m.expert_bias[i])));
        }
        Ok(GpuMoe {
            router: gpu.upload(&m.router, &[e, h])?,
            w_gate_up: ExpertWeight::upload(gpu, &format!("layer {layer} experts gate|up"), &m.w_gate_up, [e, 2 * f, h], format)?,
            w_down: ExpertWeight::upload(gpu, &format!("layer {layer} experts down"), &m.w_down, [e, h, f], format)?,
            expert_bias: (want_bias > 0).then(|| gpu.upload(&m.expert_bias, &[e])).transpose()?,
            shared: (shared_ffn > 0)
                .then(|| -> Result<SharedExpert> {
                    let name = |p: &str| format!("layer {layer} shared expert {p}");
                    Ok(SharedExpert {
                        w_gate_up: LinearWeight::upload(gpu, &name("gate|up"), &m.shared_gate_up, [2 * shared_ffn, h], format)?,
                        w_down: LinearWeight::upload(gpu, &name("down"), &m.shared_down, [h, shared_ffn], format)?,
                    })
                })
                .transpose()?,
        })
    }

    /// Random experts made on the device by `gen(dims, mean, std)` (the synthetic-weights
    /// scales: router and gate|up N(0, 1/√hidden), down N(0, 1/√ffn)); LLaDA2's expert bias
    /// N(0, 0.01²) in f32 (made by `gen_f32`) and its shared expert at the same scales. The
    /// experts and the shared expert are quantised on the device as they are made when
    /// `format` is FP8 (the generation order is the bf16 model's).
    pub fn synthesize(
        gpu: &Gpu,
        cfg: &ModelConfig,
        layer: usize,
        format: WeightFormat,
        gen: &mut impl FnMut(&[usize], f32, f32) -> Result<DTensor<bf16>>,
        gen_f32: &mut impl FnMut(&[usize], f32, f32) -> Result<DTensor<f32>>,
    ) -> Result<Self> {
        let (e, h, f) = dims(cfg)?;
        let inv = |fan_in: usize| 1.0 / (fan_in as f32).sqrt();
        let shared_ffn = cfg.llada2.as_ref().map_or(0, |l| l.shared_ffn);
        Ok(GpuMoe {
            router: gen(&[e, h], 0.0, inv(h))?,
            w_gate_up: ExpertWeight::from_bf16(gpu, &format!("layer {layer} experts gate|up"), gen(&[e, 2 * f, h], 0.0, inv(h))?, format)?,
            w_down: ExpertWeight::from_bf16(gpu, &format!("layer {layer} experts down"), gen(&[e, h, f], 0.0, inv(f))?, format)?,
            expert_bias: cfg.llada2.is_some().then(|| gen_f32(&[e], 0.0, 0.01)).transpose()?,
            shared: (shared_ffn > 0)
                .then(|| -> Result<SharedExpert> {
                    Ok(SharedExpert {
                        w_gate_up: LinearWeight::from_bf16(gpu, gen(&[2 * shared_ffn, h], 0.0, inv(h))?, format)?,
                        w_down: LinearWeight::from_bf16(gpu, gen(&[h, shared_ffn], 0.0, inv(shared_ffn))?, format)?,
                    })
                })
                .transpose()?,
        })
    }

    /// How this layer's router scores (LLaDA2: sigmoid + its bias, groups from `cfg`).
    pub fn scoring<'a>(&'a self, cfg: &ModelConfig, norm_topk: bool) -> Result<RouteScoring<'a>> {
        match (&cfg.llada2, &self.expert_bias) {
            (None, _) => Ok(RouteScoring::Softmax { norm_topk }),
            (Some(l), Some(bias)) => Ok(RouteScoring::SigmoidGroup {
                bias,
                n_group: l.n_group,
                topk_group: l.topk_group,
                routed_scaling: l.routed_scaling,
            }),
            (Some(_), None) => Err(Error::bad_input("LLaDA2 MoE layer without its expert_bias on the device")),
        }
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
    /// LLaDA2's shared expert: gate|up output `[max_rows, 2 * shared_ffn]` and activation
    /// `[max_rows, shared_ffn]` (`None` without a shared expert).
    pub shared_gu: Option<DTensor<bf16>>,
    pub shared_act: Option<DTensor<bf16>>,
    pub norm_topk: bool,
}

impl MoeState {
    /// `None` for a dense model.
    pub fn new(gpu: &Gpu, cfg: &ModelConfig, max_rows: usize) -> Result<Option<Self>> {
        let Some(m) = &cfg.moe else { return Ok(None) };
        let shared = cfg.llada2.as_ref().map_or(0, |l| l.shared_ffn);
        Ok(Some(MoeState {
            logits: gpu.alloc(&[max_rows, m.n_experts])?,
            ws: MoeWorkspace::new(gpu, max_rows, m.n_experts, m.top_k, cfg.hidden, cfg.ffn)?,
            tally: gpu.upload(&[0u32, 0], &[2])?,
            tally_on: false,
            shared_gu: (shared > 0).then(|| gpu.alloc(&[max_rows, 2 * shared])).transpose()?,
            shared_act: (shared > 0).then(|| gpu.alloc(&[max_rows, shared])).transpose()?,
            norm_topk: m.norm_topk_prob,
        }))
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
            + max_rows * 3 * cfg.llada2.as_ref().map_or(0, |l| l.shared_ffn) * 2 // shared gu, act
            + 8 // tally
    }
}
